"""Each baseline's distinct logic: the presets, FedAvg's architecture groups, KD without feedback really
skipping feedback, standalone getting its own weights back, centralized seeing the union."""

from __future__ import annotations

import pytest
import torch

from crosslm.config import load_config
from crosslm.errors import ConfigError
from crosslm.protocol import decode, encode
from crosslm.server.baselines import fedavg_group, fedavg_state
from crosslm.server.feedback import ClientModel, Feedback
from crosslm.server.generate import GeneratedSample, GenerationStats
from crosslm.server.server import CrossLMServer
from crosslm.task import LabelledTexts
from tests.conftest import TOY_TASK as TASK
from tests.conftest import make_classifier
from tests.conftest import make_upload as _upload


def test_presets_set_the_keys_that_define_each_method():
    c = load_config(None, ["method=standalone", "distill.epochs=7"])
    assert c.federation.server_update == "none" and c.clients.extra_local_epochs == 7  # matched effort
    c = load_config(None, ["method=kd-no-feedback"])
    assert (c.feedback.enabled, c.tune.steps, c.distill.mu) == (False, 0, 0.0)
    assert load_config(None, ["method=crosslm-no-qg"]).tune.qg_weight == 0.0
    assert load_config(None, ["method=crosslm-no-pr"]).tune.alpha == 0.0
    assert load_config(None, ["method=fedavg"]).federation.server_update == "fedavg"
    with pytest.raises(ConfigError, match="method"):
        load_config(None, ["method=fedprox"])
    with pytest.raises(ConfigError, match="feedback.enabled"):
        load_config(None, ["feedback.enabled=false"])  # no scores, yet tuning on q: refused


def _cm(cid: str, kind: str, n: int, seed: int) -> ClientModel:
    return ClientModel(cid, "minilm-l6", make_classifier(kind, 100, seed=seed), None, n, [1, 1], 0, 1)


def test_fedavg_averages_only_clients_that_share_an_architecture():
    a, b, c = _cm("a", "bert", 30, 0), _cm("b", "bert", 10, 1), _cm("c", "distilbert", 50, 2)
    assert [m.client_id for m in fedavg_group(a, [a, b, c])] == ["a", "b"]
    assert [m.client_id for m in fedavg_group(c, [a, b, c])] == ["c"]
    avg = fedavg_state([a.model.state_dict(), b.model.state_dict()], [30, 10])
    k = "classifier.weight"
    expected = 0.75 * a.model.state_dict()[k] + 0.25 * b.model.state_dict()[k]
    assert torch.allclose(avg[k], expected)


def _server(method: str, **sets: str) -> CrossLMServer:
    cfg = load_config(None, [f"method={method}", *[f"{k}={v}" for k, v in sets.items()]])
    log: list[dict] = []
    srv = CrossLMServer(cfg, TASK, object(), None, LabelledTexts(), log=log.append, log_synthetic=log.append)
    srv.events = log
    return srv


def test_standalone_server_returns_each_slm_unchanged():
    srv = _server("standalone")
    model = make_classifier("bert", 100, seed=3)
    srv.receive(encode(_upload(model)), sender="client-0")
    [(cid, wire)] = srv.step()
    back = decode(wire, expected_labels=["neg", "pos"], max_bytes=1 << 30, expected_type="slm_enhanced")
    assert cid == "client-0"
    sd = model.state_dict()
    assert all(torch.allclose(back.state_dict[k].float(), sd[k].float(), atol=1e-2) for k in sd)


def test_kd_without_feedback_never_scores_and_distils_every_sample_on_its_label(monkeypatch):
    srv = _server("kd-no-feedback", **{"distill.epochs": 1})
    srv.receive(encode(_upload(make_classifier("bert", 100))), sender="client-0")
    samples = [GeneratedSample(f"sample number {i}", i % 2, f"h{i}") for i in range(6)]
    monkeypatch.setattr(
        "crosslm.server.update.generate_samples", lambda *a, **k: (samples, GenerationStats(6, 6, 60, 1.0))
    )

    def no_scoring(*a, **k):
        raise AssertionError("the no-feedback baseline must not score with the SLMs")

    monkeypatch.setattr("crosslm.server.update.score", no_scoring)
    seen = {}

    def fake_fit(model, tok, texts, targets, **kw):
        seen.update(texts=list(texts), targets=targets.clone())
        return 0.0

    monkeypatch.setattr("crosslm.server.update.fit", fake_fit)
    monkeypatch.setattr("crosslm.server.server.load_slm_tokenizer", lambda name, kind="slm": None)
    srv.models["client-0"].tokenizer = None
    srv.step()
    assert seen["texts"] == [s.text for s in samples]  # no filtering
    assert torch.equal(
        seen["targets"], torch.nn.functional.one_hot(torch.tensor([i % 2 for i in range(6)]), 2).float()
    )
    update = next(e for e in srv.events if e.get("event") == "server_update")
    assert update["splus_size"] == 6 and update["loss"]["total"] == 0.0  # no LLM tuning either
    assert update["labels_without_candidates"] == []


@pytest.mark.parametrize(("rule", "splus"), [("empty", 0), ("skip", 2), ("fill", 4)])
def test_missing_labels_rule_decides_what_the_server_distils(monkeypatch, rule, splus):
    """Label 'pos' is never the ensemble's argmax: the configured rule reaches select_good, the event names
    the label, and the client's reply is distilled on what the rule kept."""
    srv = _server("crosslm", **{"distill.epochs": 1, "tune.steps": 0, "feedback.tau": 0.5,
                                "feedback.max_per_label": 2, "feedback.missing_labels": rule,
                                "feedback.min_separation": -1})  # fmt: skip
    srv.receive(encode(_upload(make_classifier("bert", 100))), sender="client-0")
    samples = [GeneratedSample(f"sample number {i}", i % 2, f"h{i}") for i in range(6)]
    monkeypatch.setattr(
        "crosslm.server.update.generate_samples", lambda *a, **k: (samples, GenerationStats(6, 6, 60, 1.0))
    )
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45]])
    labels = torch.tensor([s.label for s in samples])
    fb = Feedback(q=probs[torch.arange(6), labels], ensemble_probs=probs, per_client={"client-0": probs})
    monkeypatch.setattr("crosslm.server.update.score", lambda *a, **k: fb)
    seen: dict = {}

    def fake_fit(model, tok, texts, targets, **kw):
        seen.update(texts=list(texts))
        return 0.0

    monkeypatch.setattr("crosslm.server.update.fit", fake_fit)
    monkeypatch.setattr("crosslm.server.server.load_slm_tokenizer", lambda name, kind="slm": None)
    srv.models["client-0"].tokenizer = None
    srv.step()
    update = next(e for e in srv.events if e.get("event") == "server_update")
    assert update["labels_without_candidates"] == ["pos"]
    assert update["splus_size"] == splus
    if rule == "fill":  # label 0's two best (q 0.9, 0.8) and label 1's two best (q 0.45, 0.4)
        assert sorted(seen["texts"]) == sorted(samples[i].text for i in (0, 2, 5, 1))
        assert update["splus_per_label"] == [2, 2]
    if rule == "skip":
        assert sorted(seen["texts"]) == sorted(samples[i].text for i in (0, 2))
    if rule == "empty":
        assert "texts" not in seen  # nothing to distil: the SLM goes back unchanged


def test_centralized_trains_one_slm_on_the_union_of_the_clients_data(tmp_path, monkeypatch):
    from crosslm.lifecycle import prepare_data
    from crosslm.run import run

    cfg = load_config(None, ["method=centralized", f"output_dir={tmp_path}", "name=c", "data.num_clients=3",
                             "data.train_per_client=20", "data.test_per_client=5", "data.global_test_size=30",
                             "federation.updates=3", "clients.epochs=2"])  # fmt: skip
    _, split = prepare_data(cfg)
    got = {}

    def fake_train(model, tok, data, n, **kw):
        got.update(texts=list(data.texts), epochs=kw["epochs"])
        return 0.1

    monkeypatch.setattr("crosslm.modeling.slm.train_supervised", fake_train)
    monkeypatch.setattr(
        "crosslm.catalogue.models.load_slm", lambda s, labels: (make_classifier("bert", 100), _Tok())
    )
    monkeypatch.setattr("crosslm.modeling.slm.evaluate", lambda *a, **k: {"accuracy": 0.5, "macro_f1": 0.5})
    run(cfg)
    assert sorted(got["texts"]) == sorted(t for part in split.train for t in part.texts)
    assert got["epochs"] == (3 // 3 + 1) * 2  # one client's rounds x E, on the union
    assert (tmp_path / "c" / "report.md").exists()


class _Tok:
    pass


def _scored_server(monkeypatch, probs: torch.Tensor, **sets):
    """A CrossLM server whose LLM is a small linear layer, with generation and SLM scoring replaced."""
    cfg = load_config(None, ["method=crosslm", "distill.epochs=1", "tune.steps=2", "feedback.tau=0.5",
                             *[f"{k}={v}" for k, v in sets.items()]])  # fmt: skip
    log: list[dict] = []
    llm = torch.nn.Linear(2, 2)
    srv = CrossLMServer(cfg, TASK, llm, None, LabelledTexts(), log=log.append, log_synthetic=log.append)
    srv.events = log
    model = make_classifier("bert", 100)
    srv.receive(encode(_upload(model)), sender="client-0")
    n = len(probs)
    samples = [GeneratedSample(f"sample number {i}", i % 2, f"h{i}") for i in range(n)]
    monkeypatch.setattr(
        "crosslm.server.update.generate_samples", lambda *a, **k: (samples, GenerationStats(n, n, 60, 1.0))
    )
    labels = torch.tensor([s.label for s in samples])
    fb = Feedback(q=probs[torch.arange(n), labels], ensemble_probs=probs, per_client={"client-0": probs})
    monkeypatch.setattr("crosslm.server.update.score", lambda *a, **k: fb)
    monkeypatch.setattr("crosslm.server.server.load_slm_tokenizer", lambda name, kind="slm": None)
    monkeypatch.setattr("crosslm.server.update.fit", lambda *a, **k: 0.0)  # distillation: not under test
    srv.models["client-0"].tokenizer = None
    return srv, model


def test_an_update_without_signal_neither_tunes_the_llm_nor_distils(monkeypatch):
    """The ensemble gives every text the same scores whatever its intended label: nothing to learn from."""
    probs = torch.tensor([[0.7, 0.3]] * 24)
    srv, model = _scored_server(monkeypatch, probs)

    def forbidden(*a, **k):
        raise AssertionError("a no-signal update must not tune, distil or re-evaluate")

    for name in ("tune_adapter", "fit"):
        monkeypatch.setattr(f"crosslm.server.update.{name}", forbidden)
    monkeypatch.setattr(srv, "evaluate_llm", forbidden)
    [(_, wire)] = srv.step()
    update = next(e for e in srv.events if e.get("event") == "server_update")
    assert update["signal"] is False and "separation" in update["no_signal_reason"]
    assert update["label_separation"] == pytest.approx(0.0, abs=1e-6) and update["splus_size"] == 0
    back = decode(wire, expected_labels=["neg", "pos"], max_bytes=1 << 30, expected_type="slm_enhanced")
    sd = model.state_dict()
    assert all(torch.allclose(back.state_dict[k].float(), sd[k].float(), atol=1e-2) for k in sd)


def _separating(n: int = 24) -> torch.Tensor:
    return torch.tensor([[0.8, 0.2] if i % 2 == 0 else [0.2, 0.8] for i in range(n)])


def test_an_llm_update_that_collapses_its_predictions_on_splus_is_undone(monkeypatch):
    srv, _ = _scored_server(monkeypatch, _separating())
    start = {k: v.clone() for k, v in srv.llm.state_dict().items()}

    def tune(model, *a, **k):
        with torch.no_grad():
            model.weight.add_(1.0)
        return {"total": 1.0, "qg": 1.0, "task": 0.0, "pr": 0.0}

    shares = iter([0.5, 1.0])  # before the update: both labels; after: one label for every S+ text
    monkeypatch.setattr("crosslm.server.update.tune_adapter", tune)
    monkeypatch.setattr("crosslm.server.update.majority_share", lambda server, texts: next(shares))
    monkeypatch.setattr(
        srv, "evaluate_llm", lambda u: pytest.fail("an undone update leaves nothing to evaluate")
    )
    srv.step()
    update = next(e for e in srv.events if e.get("event") == "server_update")
    assert update["signal"] is True and update["separation_upper"] >= update["label_separation"] > 0.5
    assert update["rolled_back"] is True and update["llm_majority_share"] == [0.5, 1.0]
    assert all(torch.equal(srv.llm.state_dict()[k], v) for k, v in start.items())


def test_an_llm_update_that_keeps_both_labels_stays(monkeypatch):
    srv, _ = _scored_server(monkeypatch, _separating())
    evaluated: list[int] = []

    def tune(model, *a, **k):
        with torch.no_grad():
            model.weight.add_(1.0)
        return {"total": 1.0, "qg": 1.0, "task": 0.0, "pr": 0.0}

    shares = iter([0.5, 0.6])
    monkeypatch.setattr("crosslm.server.update.tune_adapter", tune)
    monkeypatch.setattr("crosslm.server.update.majority_share", lambda server, texts: next(shares))
    monkeypatch.setattr(srv, "evaluate_llm", evaluated.append)
    before = srv.llm.weight.clone()
    srv.step()
    update = next(e for e in srv.events if e.get("event") == "server_update")
    assert update["rolled_back"] is False and evaluated == [1]
    assert torch.equal(srv.llm.weight, before + 1.0)
