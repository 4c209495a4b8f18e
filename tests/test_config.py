"""YAML + --set config loading: types, unknown keys with suggestions, range checks."""

from __future__ import annotations

import pytest

from crosslm.config import RunConfig, all_keys, load_config
from crosslm.errors import ConfigError


def test_defaults_and_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\ndata:\n  num_clients: 3\nclients:\n  slms: [minilm-l3]\n")
    cfg = load_config(
        p, ["federation.updates=2", "tune.hard=true", "feedback.tau=0.75", "clients.speeds=[1, 2]"]
    )
    assert cfg.seed == 3 and cfg.data.num_clients == 3 and cfg.clients.slms == ["minilm-l3"]
    assert cfg.federation.updates == 2 and cfg.tune.hard is True and cfg.feedback.tau == 0.75
    assert cfg.clients.speeds == [1, 2]
    assert cfg.llm.model == RunConfig().llm.model  # untouched keys keep defaults


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"federation\.updates"):
        load_config(None, ["federation.update=3"])
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  num_client: 2\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'data\.num_client'.*Did you mean 'data\.num_clients'"
    ):
        load_config(p)


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"'data\.num_clients' expects an integer"):
        load_config(None, ["data.num_clients=many"])
    with pytest.raises(ConfigError, match=r"'tune\.hard' expects true or false"):
        load_config(None, ["tune.hard=maybe"])
    with pytest.raises(ConfigError, match=r"expects key=value"):
        load_config(None, ["federation.updates"])


def test_tau_is_a_number_or_auto_resolved_from_the_label_count():
    assert RunConfig().feedback.tau == "auto"  # the default scales with the task
    fb = load_config(None, []).feedback
    assert fb.threshold(2) == pytest.approx(0.6) and fb.threshold(5) == pytest.approx(0.24)
    assert fb.threshold(6) == pytest.approx(0.2)
    fixed = load_config(None, ["feedback.tau=0.3"]).feedback
    assert fixed.tau == 0.3 and fixed.threshold(6) == 0.3  # a number is used as given
    with pytest.raises(ConfigError, match=r"feedback\.tau.*\[0, 1\] or auto"):
        load_config(None, ["feedback.tau=high"])
    with pytest.raises(ConfigError, match=r"feedback\.tau"):
        load_config(None, ["feedback.tau=1.5"])


def test_s_plus_floor_is_a_count_or_auto_resolved_from_the_label_count():
    fb = load_config(None, []).feedback
    assert fb.min_per_label == "auto"
    assert fb.floor(2, 24) == 0  # two labels: no floor
    assert fb.floor(5, 24) == 24 and fb.floor(6, 10) == 10  # more: one update's samples per label
    fixed = load_config(None, ["feedback.min_per_label=7"]).feedback
    assert fixed.min_per_label == 7 and fixed.floor(2, 24) == 7 and fixed.floor(6, 24) == 7
    assert load_config(None, ["feedback.min_per_label=0"]).feedback.floor(6, 24) == 0
    with pytest.raises(ConfigError, match=r"feedback\.min_per_label.*0 or more, or auto"):
        load_config(None, ["feedback.min_per_label=many"])
    with pytest.raises(ConfigError, match=r"feedback\.min_per_label"):
        load_config(None, ["feedback.min_per_label=-1"])
    with pytest.raises(ConfigError, match=r"feedback\.min_per_label"):
        load_config(None, ["feedback.min_per_label=2.5"])


def test_range_checks():
    with pytest.raises(ConfigError, match=r"feedback\.gamma"):
        load_config(None, ["feedback.gamma=0"])
    with pytest.raises(ConfigError, match=r"federation\.buffer_size"):
        load_config(None, ["data.num_clients=2", "federation.buffer_size=3"])
    with pytest.raises(ConfigError, match=r"eval\.split.*test or validation"):
        load_config(None, ["eval.split=train"])
    with pytest.raises(ConfigError, match=r"generation\.dtype.*auto, float32 or bfloat16"):
        load_config(None, ["generation.dtype=int4"])
    with pytest.raises(ConfigError, match=r"llm\.device.*auto, cpu, cuda or cuda:N"):
        load_config(None, ["llm.device=gpu"])
    with pytest.raises(ConfigError, match=r"clients\.device"):
        load_config(None, ["clients.device=cuda:x"])
    with pytest.raises(ConfigError, match=r"clients\.logit_adjust.*0 or more"):
        load_config(None, ["clients.logit_adjust=-1"])
    assert load_config(None, ["llm.device=cuda:1", "clients.device=cpu"]).llm.device == "cuda:1"
    for bad in ("both", "slms+slms", "slms+"):
        with pytest.raises(ConfigError, match=r"distill\.labeller.*joined by '\+'"):
            load_config(None, [f"distill.labeller={bad}"])
    assert load_config(None, ["distill.labeller=slms+generator"]).distill.labellers == ("slms", "generator")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for p in root.glob("*.yaml"):
        load_config(p)
    assert "tune.alpha" in all_keys()


def test_the_precision_probe_runs_on_one_thread_and_restores_the_count(monkeypatch):
    """The probe asks about kernels, so it times one thread; the run's thread count must survive it."""
    import torch

    from crosslm.precision import bf16_is_faster

    before = torch.get_num_threads()
    seen = []
    real = torch.nn.functional.linear

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    bf16_is_faster.cache_clear()
    try:
        assert isinstance(bf16_is_faster(), bool)
    finally:
        bf16_is_faster.cache_clear()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
