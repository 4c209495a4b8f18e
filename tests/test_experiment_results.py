"""The experiment's measures and table, from hand-written cell logs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from crosslm.errors import ConfigError
from crosslm.experiment.grid import cells, load_experiment
from crosslm.experiment.results import ZERO_SHOT, cell_row, mean_std, results_markdown


def _write(path, events):
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def test_cell_row_reads_final_slms_llm_perplexity_and_traffic(tmp_path):
    g = lambda a: {"global": {"accuracy": a, "macro_f1": a - 0.1}, "local": {"accuracy": a + 0.1}}  # noqa: E731
    _write(tmp_path / "metrics.jsonl", [
        {"event": "client_trained", "client": "a", "round": 1, "seconds": 2.0, **g(0.5)},
        {"event": "client_trained", "client": "b", "round": 1, "seconds": 3.0, **g(0.7)},
        {"event": "upload", "client": "a", "accepted": True, "bytes": 2 * 2**20},
        {"event": "upload", "client": "b", "accepted": False, "bytes": 9 * 2**20},
        {"event": "llm_eval", "update": 0, "raw_accuracy": 0.6, "calibrated_accuracy": 0.65},
        {"event": "server_update", "update": 1, "distinct2": 0.8, "seconds": 10.0},
        {"event": "llm_eval", "update": 1, "raw_accuracy": 0.7, "calibrated_accuracy": 0.68},
        {"event": "server_update", "update": 2, "distinct2": 0.76, "seconds": 12.0, "signal": False},
        {"event": "enhanced", "client": "a", "update": 1, "bytes": 2**20, "before": g(0.5), "after": g(0.75)},
        {"event": "enhanced", "client": "b", "update": 2, "bytes": 2**20, "adopted": 0, "before": g(0.7),
         "after": g(0.7)},
        {"event": "perplexity", "stage": "start", "perplexity": 20.0},
        {"event": "perplexity", "stage": "end", "perplexity": 20.1},
        {"event": "client_eval", "client": "a", **g(0.6)},
        {"event": "client_eval", "client": "b", **g(0.8)},
        {"event": "run_end", "reason": "completed", "wall": 99.0},
    ])  # fmt: skip
    r = cell_row(tmp_path)
    assert r["machine"] == ""  # a log without run_start names no machine
    events = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "run_start"}) + "\n" + events)
    assert cell_row(tmp_path)["machine"] == ""  # nor does an older run_start without the record
    (tmp_path / "metrics.jsonl").write_text(events)
    machine = {
        "torch": "2.13.0+cpu",
        "cpu": "Xeon",
        "cpu_threads": 2,
        "gpu": None,
        "cpu_auto_dtype": "float32",
    }
    events = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"event": "run_start", "machine": machine}) + "\n" + events
    )
    r = cell_row(tmp_path)
    assert r["machine"] == "Xeon (2 threads), torch 2.13.0+cpu, CPU precision auto = float32"
    assert r["slm_acc"] == pytest.approx(0.7) and r["slm_start_acc"] == pytest.approx(0.6)
    assert r["slm_served_acc"] == pytest.approx(0.7)  # 'a' and 'b' were replied to ('b' refused its reply)
    assert r["slm_reply_gain"] == pytest.approx(0.125)  # 0.5 -> 0.75 and 0.7 -> 0.7
    assert (r["refused_replies"], r["no_signal_updates"], r["llm_rollbacks"]) == (1, 1, 0)
    assert r["slm_f1"] == pytest.approx(0.6) and r["slm_local_acc"] == pytest.approx(0.8)
    assert r["llm_acc"] == 0.7 and r["llm_zero_shot"] == 0.65
    assert r["ppl_change_pct"] == pytest.approx(0.5)
    assert (r["distinct2_first"], r["distinct2_last"]) == (0.8, 0.76)
    assert (
        r["upload_mib_per_client"] == 2.0 and r["download_mib_per_client"] == 1.0
    )  # refused uploads excluded
    assert r["client_seconds"] == 5.0 and r["server_seconds"] == 22.0 and math.isnan(r["fidelity_last"])
    assert r["replies_min"] == 1  # one reply each to 'a' and 'b', the refused one counted
    unserved = {"event": "client_trained", "client": "c", "round": 1, "seconds": 1.0, **g(0.4)}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(unserved) + "\n" + events)
    assert cell_row(tmp_path)["replies_min"] == 0  # 'c' was never served


def test_table_and_targets_report_mean_std_and_missed_targets():
    rows = []
    for seed, (c, s, k) in enumerate([(0.70, 0.55, 0.66), (0.72, 0.57, 0.70)]):
        rows += [
            {"task": "t", "method": "crosslm", "seed": seed, "slm_acc": c, "llm_acc": 0.8, "fidelity_last": 0.92, "fidelity_distilled": 0.92,
             "fidelity_q_ge_tau": 0.96, "distinct2_first": 0.8, "distinct2_last": 0.78, "ppl_change_pct": 0.2},
            {"task": "t", "method": "standalone", "seed": seed, "slm_acc": s},
            {"task": "t", "method": "kd-no-feedback", "seed": seed, "slm_acc": k},
            {"task": "t", "method": ZERO_SHOT, "seed": seed, "llm_acc": 0.7},
        ]  # fmt: skip
    exp = SimpleNamespace(
        name="x", methods=["crosslm", "standalone", "kd-no-feedback"], base_config="b", overrides={}
    )
    md = results_markdown(rows, exp)
    assert "| crosslm | 71.0 ± 1.4 |" in md and "| standalone | 56.0 ± 1.4 |" in md
    assert "SLM: CrossLM ≥ standalone + 10 pp | 0.71 | 0.56 | +15.0 | met |" in md
    assert "SLM: CrossLM ≥ KD without feedback + 3 pp | 0.71 | 0.68 | +3.0 | met |" in md
    assert "LLM: CrossLM ≥ best zero-shot + 15 pp | 0.8 | 0.7 | +10.0 | **missed** |" in md
    assert "any CrossLM cell) | – | 2 | – | – |" in md  # no cell recorded its replies
    rows[0]["replies_min"], rows[4]["replies_min"] = 2, 1  # seed 1 left one client served once
    assert "any CrossLM cell) | 1 | 2 | -1.0 | **missed** |" in results_markdown(rows, exp)
    rows[4]["replies_min"] = 3
    assert "any CrossLM cell) | 2 | 2 | +0.0 | met |" in results_markdown(rows, exp)
    assert mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(1.4142, rel=1e-3))
    assert "## SLM accuracy on the global test split (%), final" in md
    assert (
        "scored q ≥ tau\n\n| method | t | mean over tasks |\n| --- | ---: | ---: |\n| crosslm | 96.0 ± 0.0 |"
        in md
    )
    # paired by seed: crosslm - kd is +0.04 then +0.02
    assert "| kd-no-feedback | +3.0 ± 1.4 (n=2) | +3.0 |" in md and "| standalone | +15.0 ± 0.0 (n=2) |" in md
    rows.append({"task": "t", "method": "crosslm-no-qg", "seed": 1, "slm_acc": 0.60})  # one seed of two
    exp.methods.append("crosslm-no-qg")
    md = results_markdown(rows, exp)
    assert "| crosslm-no-qg | 60.0 ± 0.0 (n=1) |" in md and "| crosslm-no-qg | +12.0 ± 0.0 (n=1) |" in md
    assert "| crosslm | 71.0 ± 1.4 |" in md  # a cell with every seed carries no count
    assert "of the clients the server replied to" not in md  # no cell recorded the served clients
    for r in rows:
        if r["method"] in ("crosslm", "standalone"):
            r["slm_served_acc"] = r["slm_acc"] + (0.1 if r["method"] == "crosslm" else 0.0)
    md = results_markdown(rows, exp)
    served = md.split("## CrossLM minus each method, SLM accuracy of the clients the server replied to")[1]
    # paired on the served clients: +25 against standalone; kd-no-feedback recorded none, so no row
    assert "| standalone | +25.0 ± 0.0 (n=2) |" in served and "kd-no-feedback" not in served
    exp.overrides = {"eval.split": "validation"}  # a tuning run names the split its numbers are on
    md = results_markdown(rows, exp)
    assert "## SLM accuracy on the validation split (eval.split) (%), final" in md
    assert "global test split" not in md


def test_experiment_config_is_checked_before_anything_runs(tmp_path):
    exp = load_experiment(None, ["methods=[standalone, crosslm]", "tasks=[trec]", "seeds=[1, 2]"])
    assert cells(exp)[0] == ("trec", "crosslm", 1)  # CrossLM first in each (task, seed)
    for bad, why in [(["methods=[fedprox]"], "fedprox"), (["seeds=[]"], "at least one"), (["sed=[1]"], "unknown"),
                     (["overrides.tune.alpah=1"], "tune.alpah")]:  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            load_experiment(None, bad)


def test_task_overrides_apply_to_their_task_only(tmp_path):
    from crosslm.experiment.grid import cell_config

    exp = load_experiment(
        None,
        ["tasks=[trec, bbc-news]", "seeds=[0]", "methods=[crosslm]", "overrides={data.max_chars: 500}",
         "task_overrides={bbc-news: {data.max_chars: 300, generation.samples_per_label: 5}}"],
    )  # fmt: skip
    trec = cell_config(exp, "trec", "crosslm", 0, tmp_path)
    bbc = cell_config(exp, "bbc-news", "crosslm", 0, tmp_path)
    assert trec.data.max_chars == 500 and bbc.data.max_chars == 300
    assert bbc.generation.samples_per_label == 5 and trec.generation.samples_per_label != 5
    with pytest.raises(ConfigError, match="task_overrides.bbc-news"):
        load_experiment(None, ["tasks=[bbc-news]", "task_overrides={bbc-news: 3}"])


def test_one_task_override_can_be_set_from_the_command_line(tmp_path):
    """--set task_overrides.TASK.KEY=V adds one key and keeps the file's other keys for that task."""
    from crosslm.experiment.grid import cell_config

    path = tmp_path / "exp.yaml"
    path.write_text("tasks: [trec, bbc-news]\nseeds: [0]\nmethods: [crosslm]\n"
                    "task_overrides:\n  trec:\n    feedback.tau: 0.2\n")  # fmt: skip
    exp = load_experiment(str(path), ["task_overrides.trec.feedback.min_per_label=7",
                                      "task_overrides.data/my.v2.tsv.generation.samples_per_label=5"])  # fmt: skip
    assert exp.task_overrides["trec"] == {"feedback.tau": 0.2, "feedback.min_per_label": 7}
    assert exp.task_overrides["data/my.v2.tsv"] == {"generation.samples_per_label": 5}
    trec = cell_config(exp, "trec", "crosslm", 0, tmp_path)
    bbc = cell_config(exp, "bbc-news", "crosslm", 0, tmp_path)
    assert trec.feedback.min_per_label == 7 and trec.feedback.tau == 0.2
    assert bbc.feedback.min_per_label != 7
    with pytest.raises(ConfigError, match="TASK.SECTION.KEY"):
        load_experiment(str(path), ["task_overrides.trec.feedback.min_per_labl=7"])


def test_the_shipped_grids_run_what_crosslm_run_gives_a_user(tmp_path):
    """One set of defaults for every task: a grid's cell is `crosslm run configs/default.yaml` on that
    dataset, apart from the evaluation's split and budget (and where the cell is written)."""
    from pathlib import Path

    from crosslm.config import all_keys, get_key, load_config
    from crosslm.experiment.grid import cell_config

    root = Path(__file__).resolve().parents[1]
    for name in ("validation", "small", "full"):
        exp = load_experiment(str(root / "configs" / "experiments" / f"{name}.yaml"), [])
        assert not exp.task_overrides, name
        for task in exp.tasks:
            cell = cell_config(exp, task, "crosslm", 0, tmp_path)
            user = load_config(str(root / "configs" / "default.yaml"), [f"data.dataset={task}"])
            differ = {k for k in all_keys(cell) if get_key(cell, k) != get_key(user, k)}
            allowed = {"name", "output_dir"} | {k for k in differ if k.startswith("eval.")}
            assert differ <= allowed, (name, differ)


def test_a_reused_cell_whose_config_changed_is_named_with_its_keys(tmp_path):
    from crosslm.config import load_config, save_config
    from crosslm.experiment.grid import config_drift

    for method in ["crosslm", "standalone"]:
        save_config(
            load_config(None, [f"method={method}", "feedback.missing_labels=empty"]), tmp_path / "config.yaml"
        )
        now = load_config(None, [f"method={method}", "output_dir=elsewhere", "name=other"])  # where, not what
        # standalone never reads the feedback settings: its cell stays valid
        assert config_drift(tmp_path, now) == (
            [("feedback.missing_labels", "empty", "fill")] if method == "crosslm" else []
        )
        now = load_config(None, [f"method={method}", "feedback.missing_labels=empty", "clients.epochs=7"])
        assert config_drift(tmp_path, now) == [("clients.epochs", 5, 7)]
    prompt = "Write about {description}."
    for method, override, drift in [
        # logit adjustment is a client setting: standalone's clients read it, centralized's one SLM does not
        ("standalone", "clients.logit_adjust=1.0", [("clients.logit_adjust", 0.0, 1.0)]),
        ("centralized", "clients.logit_adjust=1.0", []),
        # the generation prompt only reaches the LLM: a method without one ignores it, kd-no-feedback does not
        ("standalone", f"data.generation_prompt={prompt}", []),
        ("kd-no-feedback", f"data.generation_prompt={prompt}", [("data.generation_prompt", "", prompt)]),
    ]:
        save_config(load_config(None, [f"method={method}"]), tmp_path / "config.yaml")
        assert config_drift(tmp_path, load_config(None, [f"method={method}", override])) == drift
    exp = SimpleNamespace(name="x", methods=["crosslm"], base_config="b", overrides={})
    rows = [{"task": "t", "method": "crosslm", "seed": 0, "slm_acc": 0.7}]
    assert "Cells reused with a different config" not in results_markdown(rows, exp)
    md = results_markdown(rows, exp, drift={"t__crosslm__seed0": [("clients.epochs", 5, 7)]})
    assert (
        "## Cells reused with a different config" in md
        and "| t__crosslm__seed0 | clients.epochs | 5 | 7 |" in md
    )


def test_auto_precision_is_compared_by_the_dtype_it_resolved_to(tmp_path, monkeypatch):
    """A cell whose `auto` ran in float32 is not the cell an `auto` that now means bfloat16 would run."""
    import json

    import crosslm.precision
    from crosslm.config import PRECISION_KEYS, load_config, save_config
    from crosslm.experiment.grid import config_drift

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    save_config(load_config(None, []), tmp_path / "config.yaml")  # every precision key: auto

    def ran_in(dtype: str | None, gpu: str | None = None) -> None:
        machine = {"gpu": gpu} | ({"cpu_auto_dtype": dtype} if dtype else {})
        (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "run_start", "machine": machine}) + "\n")

    pinned = load_config(None, [f"{key}=bfloat16" for key in PRECISION_KEYS])
    for probe_says_bf16 in (True, False):
        monkeypatch.setattr(crosslm.precision, "bf16_is_faster", lambda says=probe_says_bf16: says)
        ran_in("bfloat16")
        assert sorted(config_drift(tmp_path, pinned)) == []
        same_now = [] if probe_says_bf16 else [(k, "bfloat16", "float32") for k in sorted(PRECISION_KEYS)]
        assert sorted(config_drift(tmp_path, load_config(None, []))) == same_now
        ran_in("float32")
        assert sorted(config_drift(tmp_path, pinned)) == [
            (k, "float32", "bfloat16") for k in sorted(PRECISION_KEYS)
        ]
    ran_in(None)  # a cell from before the record, or one that ran on a GPU: compared as written
    assert sorted(config_drift(tmp_path, load_config(None, []))) == []
    assert sorted(config_drift(tmp_path, pinned)) == [(k, "auto", "bfloat16") for k in sorted(PRECISION_KEYS)]
    ran_in("float32", gpu="NVIDIA H100")
    assert sorted(config_drift(tmp_path, pinned)) == [(k, "auto", "bfloat16") for k in sorted(PRECISION_KEYS)]


def test_a_catalogue_prompt_edited_since_a_cell_ran_is_drift(tmp_path, monkeypatch):
    """No config key changes when the catalogue's wording does: the cell's run_start record shows it."""
    import dataclasses
    import json

    from crosslm.catalogue import datasets as cat
    from crosslm.config import load_config, save_config
    from crosslm.experiment.grid import config_drift

    monkeypatch.setattr("crosslm.experiment.grid._auto_dtype_here", lambda: None)
    trec = cat.DATASETS["trec"]
    ran_with = trec.task.wording()
    for method in ["kd-no-feedback", "standalone"]:
        cfg = load_config(None, [f"method={method}", "data.dataset=trec"])
        save_config(cfg, tmp_path / "config.yaml")
        log = tmp_path / "metrics.jsonl"
        log.write_text(json.dumps({"event": "run_start", "task_wording": ran_with}) + "\n")
        assert config_drift(tmp_path, cfg) == []
        edited = dataclasses.replace(trec.task, generation_prompt="Ask a question about {description}.")
        monkeypatch.setitem(cat.DATASETS, "trec", dataclasses.replace(trec, task=edited))
        expected = [
            ("task.generation_prompt", trec.task.generation_prompt, "Ask a question about {description}.")
        ]
        # standalone never prompts an LLM: its cell stays valid
        assert config_drift(tmp_path, cfg) == (expected if method == "kd-no-feedback" else [])
        log.write_text(json.dumps({"event": "run_start"}) + "\n")  # a cell from before the record
        assert config_drift(tmp_path, cfg) == []
        monkeypatch.setitem(cat.DATASETS, "trec", trec)
    # a prompt changed through the config is listed once, by its key, not again as task wording
    cfg = load_config(None, ["method=crosslm", "data.dataset=trec"])
    save_config(cfg, tmp_path / "config.yaml")
    log.write_text(json.dumps({"event": "run_start", "task_wording": ran_with}) + "\n")
    desc = {"ABBR": "an abbreviation question"}
    now = load_config(
        None, ["method=crosslm", "data.dataset=trec", "data.generation_prompt=Ask about {description}."]
    )
    now.data.label_descriptions = desc
    assert sorted(k for k, _, _ in config_drift(tmp_path, now)) == [
        "data.generation_prompt",
        "data.label_descriptions",
    ]


def test_results_name_the_machines_and_flag_a_grid_from_several():
    exp = SimpleNamespace(name="x", methods=["crosslm", "standalone"], base_config="b", overrides={})
    bf16, fp32 = "Xeon (2 threads), torch 2.13, CPU precision auto = bfloat16", "Xeon ... = float32"
    rows = [{"task": "t", "method": m, "seed": 0, "slm_acc": 0.7, "machine": bf16} for m in exp.methods]
    md = results_markdown(rows, exp)
    assert f"All 2 cells: {bf16}." in md and "different machines" not in md
    rows[0]["machine"] = fp32
    md = results_markdown(rows, exp)
    assert "**The cells ran on 2 different machines or precisions**" in md
    assert f"| {fp32} | t / crosslm / seed 0 |" in md and f"| {bf16} | t / standalone / seed 0 |" in md


def test_distilled_fidelity_weighs_the_judges_agreement_by_the_loss_weights(monkeypatch):
    from crosslm.experiment.results import distilled_fidelity

    syn = [
        {"hash": "a", "text": "good film"},
        {"hash": "b", "text": "bad film"},
        {"hash": "c", "text": "meh"},
    ]
    judge = {"good film": 1, "bad film": 0, "meh": 0}
    monkeypatch.setattr(
        "crosslm.evaluation.judge.judge_predictions", lambda model, tok, texts: [judge[t] for t in texts]
    )
    event = {"hashes": ["a", "b", "c"], "labels": [1, 0, 1], "weights": [1.0, 0.5, 1.5]}
    assert distilled_fidelity(event, syn, None, None) == pytest.approx(1.5 / 3.0)  # 'meh' is not label 1
