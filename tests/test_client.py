"""A client's own guard: it adopts an enhanced SLM only if it is not worse on its held-out validation part."""

from __future__ import annotations

import torch

from crosslm.client import client as client_module
from crosslm.client.client import Client, ClientData
from crosslm.config import ClientConfig
from crosslm.partition import stratified_holdout
from crosslm.protocol import SLMEnhanced, decode, encode, model_config_dict
from crosslm.task import LabelledTexts
from tests.conftest import TOY_TASK, make_classifier, make_tokenizer


def _easy_data(n: int, offset: int = 0) -> LabelledTexts:
    """Label 0 texts are runs of 'a', label 1 texts runs of 'z': a tiny model learns them in a few epochs."""
    texts = [("a" if i % 2 == 0 else "z") * (5 + (i + offset) % 7) for i in range(n)]
    return LabelledTexts(texts, [i % 2 for i in range(n)])


def _client(monkeypatch, **cfg) -> Client:
    tok = make_tokenizer(chat=False)
    monkeypatch.setattr(
        client_module, "load_slm", lambda name, labels: (make_classifier("bert", len(tok)), tok)
    )
    data = ClientData(train=_easy_data(40), test=_easy_data(20, 3), global_test=LabelledTexts())
    settings = dict(epochs=8, lr=3e-3, batch_size=8, validation_fraction=0.5, accept_tolerance=0.05)
    settings.update(cfg)
    return Client("client-0", "minilm-l6", TOY_TASK, data, ClientConfig(**settings),
                  eval_batch_size=16, max_payload_bytes=50 * 2**20, seed=0)  # fmt: skip


def _reply(client: Client, state: dict[str, torch.Tensor], update: int):
    msg = SLMEnhanced(client_id=client.client_id, slm=client.slm, model_type=client.model.config.model_type,
                      model_config=model_config_dict(client.model), labels=list(TOY_TASK.labels),
                      server_update=update, state_dict=state)  # fmt: skip
    return encode(msg, dtype="float32")


def _one_label(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights with the classifier pushed to label 0 for every text: a worse model."""
    out = {k: v.clone() for k, v in state.items()}
    out["classifier.bias"] = torch.tensor([50.0, -50.0])
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_holdout_is_stratified_disjoint_and_seeded() -> None:
    data = LabelledTexts([f"t{i}" for i in range(100)], [0] * 80 + [1] * 20)
    kept, held = stratified_holdout(data, 2, 0.1, seed=3)
    assert held.label_counts(2) == [8, 2] and len(kept) == 90
    assert not set(kept.texts) & set(held.texts)
    assert stratified_holdout(data, 2, 0.1, seed=3)[1].texts == held.texts
    assert stratified_holdout(data, 2, 0.1, seed=4)[1].texts != held.texts


def test_the_validation_part_comes_from_the_evaluation_texts_and_leaves_training_whole(monkeypatch) -> None:
    c = _client(monkeypatch)
    assert len(c.data.validation) == 10 and len(c.data.test) == 10 and len(c.data.train) == 40
    assert c.data.validation.label_counts(2) == [5, 5]
    assert not set(c.data.validation.texts) & set(c.data.test.texts) - set(c.data.train.texts)
    wire, event = c.local_round()
    upload = decode(wire, expected_labels=list(TOY_TASK.labels), max_bytes=50 * 2**20)
    assert upload.num_examples == 40  # every training text is trained on
    assert "validation" in event and "validation" not in upload.metrics


def test_a_validation_part_from_training_data_is_never_trained_on(monkeypatch) -> None:
    c = _client(monkeypatch, validation_fraction=0.25, validation_source="train")
    assert len(c.data.validation) == 10 and len(c.data.train) == 30 and len(c.data.test) == 20
    wire, _ = c.local_round()
    upload = decode(wire, expected_labels=list(TOY_TASK.labels), max_bytes=50 * 2**20)
    assert upload.num_examples == 30  # the upload declares what the client trained on


def test_a_split_too_small_to_share_holds_nothing_out(monkeypatch) -> None:
    from crosslm.client.client import hold_out

    data = ClientData(train=_easy_data(40), test=_easy_data(1), global_test=LabelledTexts())
    assert hold_out(data, 2, 0.5, "test", seed=0) is data  # one text: it stays the test split


def test_a_worse_enhancement_is_refused_and_a_better_one_adopted(monkeypatch) -> None:
    c = _client(monkeypatch)
    c.local_round()
    good = {k: v.clone() for k, v in c.model.state_dict().items()}
    assert c.metrics["validation"]["macro_f1"] == 1.0  # the client learnt its easy task

    calls = []
    measure = c.evaluate
    c.evaluate = lambda: calls.append(1) or measure()  # type: ignore[method-assign]
    refused = c.receive_enhanced(_reply(c, _one_label(good), update=1))
    assert not calls and refused["after"] == refused["before"]  # its own weights are back: not measured again
    c.evaluate = measure  # type: ignore[method-assign]
    assert refused["adopted"] == 0
    assert refused["offered"]["validation"]["macro_f1"] < 0.5
    assert _same(c.model.state_dict(), good)  # it continues from its own weights
    assert c.base_version == 0 and refused["after"]["validation"]["macro_f1"] == 1.0

    c.model.load_state_dict(_one_label(good))  # now the client's own model is the poor one
    c.metrics = c.evaluate()
    adopted = c.receive_enhanced(_reply(c, good, update=2))
    assert adopted["adopted"] == 1 and c.base_version == 2
    assert _same(c.model.state_dict(), good)
    assert adopted["after"]["validation"]["macro_f1"] == 1.0


def test_without_a_validation_part_every_reply_is_adopted(monkeypatch) -> None:
    c = _client(monkeypatch, validation_fraction=0.0)
    c.local_round()
    state = _one_label(c.model.state_dict())
    event = c.receive_enhanced(_reply(c, state, update=1))
    assert event["adopted"] == 1 and "offered" not in event and _same(c.model.state_dict(), state)


def test_the_enhanced_report_with_its_refusal_passes_validation(monkeypatch) -> None:
    from crosslm.protocol.reports import validate_report

    c = _client(monkeypatch)
    c.local_round()
    event = c.receive_enhanced(_reply(c, _one_label(c.model.state_dict()), update=1))
    clean = validate_report(event, client_id="client-0", expected_event="enhanced")
    assert clean["adopted"] == 0 and "validation" in clean["offered"]


def _predictions(c: Client) -> torch.Tensor:
    from crosslm.modeling.slm import predict_logits

    return torch.softmax(predict_logits(c.model, c.tokenizer, c.data.train.texts), -1)


def _after_reply_and_a_round(monkeypatch, keep_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A client adopts a reply that learnt the opposite of its labels, then trains one local round: how
    far the round moves it from the adopted model's predictions on its own texts."""
    c = _client(monkeypatch, keep_weight=keep_weight, validation_fraction=0.0)
    c.local_round()
    flipped = {k: v.clone() for k, v in c.model.state_dict().items()}
    flipped["classifier.weight"] = -flipped["classifier.weight"]
    flipped["classifier.bias"] = -flipped["classifier.bias"]
    c.receive_enhanced(_reply(c, flipped, update=1))
    adopted = _predictions(c)
    c.local_round()
    return adopted, _predictions(c)


def test_keeping_the_reply_pulls_local_training_toward_the_adopted_model(monkeypatch) -> None:
    adopted0, plain = _after_reply_and_a_round(monkeypatch, keep_weight=0.0)
    adopted1, kept = _after_reply_and_a_round(monkeypatch, keep_weight=0.8)
    assert torch.allclose(adopted0, adopted1)  # the same start: only the keep term differs
    gap_plain = (plain - adopted0).abs().sum(-1).mean()
    gap_kept = (kept - adopted1).abs().sum(-1).mean()
    assert gap_kept < 0.7 * gap_plain


def test_the_adopted_model_predictions_survive_save_and_restore(monkeypatch, tmp_path) -> None:
    c = _client(monkeypatch, keep_weight=0.5)
    c.local_round()
    c.receive_enhanced(_reply(c, {k: v.clone() for k, v in c.model.state_dict().items()}, update=1))
    assert c.keep_targets is not None and c.keep_targets.shape == (len(c.data.train), 2)
    c.save(tmp_path / "c")
    other = _client(monkeypatch, keep_weight=0.5)
    assert other.restore(tmp_path / "c")
    assert torch.equal(other.keep_targets, c.keep_targets)


def test_the_bootstrap_tells_a_one_text_wobble_from_a_collapse() -> None:
    from crosslm.client.client import worse_share

    labels = [0] * 12 + [1] * 3  # a label-skewed client's 15 held-out texts
    own = list(labels)
    noisy = [0] * 12 + [1, 1, 0]  # one minority text missed: macro-F1 1.00 -> 0.89
    flat = [0] * 15  # every text called the majority label: macro-F1 1.00 -> 0.44
    kw = {"tolerance": 0.05, "seed": 0}
    assert 0.1 < worse_share(labels, own, noisy, 2, **kw) < 0.9  # the point rule would refuse it
    assert worse_share(labels, own, flat, 2, **kw) > 0.9  # a collapse is sure
    assert worse_share(labels, noisy, own, 2, **kw) == 0.0  # a better reply never is


def test_with_a_confidence_only_a_sure_drop_refuses_a_reply(monkeypatch) -> None:
    c = _client(monkeypatch, accept_confidence=0.9)
    c.local_round()
    good = {k: v.clone() for k, v in c.model.state_dict().items()}
    calls = []
    measure = c.evaluate
    c.evaluate = lambda: calls.append(1) or measure()  # type: ignore[method-assign]
    refused = c.receive_enhanced(_reply(c, _one_label(good), update=1))
    assert not calls and refused["after"] == refused["before"]  # its own weights are back: not measured again
    c.evaluate = measure  # type: ignore[method-assign]
    assert refused["adopted"] == 0 and refused["worse_share"] > 0.9
    adopted = c.receive_enhanced(_reply(c, good, update=2))
    assert adopted["adopted"] == 1 and adopted["worse_share"] == 0.0


def _flipped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights with the classifier reversed: every text gets the other label."""
    out = {k: v.clone() for k, v in state.items()}
    out["classifier.weight"], out["classifier.bias"] = -out["classifier.weight"], -out["classifier.bias"]
    return out


def test_the_final_round_adapts_an_adopted_reply_to_the_clients_data(monkeypatch) -> None:
    from crosslm.protocol.reports import validate_report

    c = _client(monkeypatch, validation_fraction=0.0, final_round=True)
    c.local_round()
    c.receive_enhanced(_reply(c, _flipped(c.model.state_dict()), update=1))
    arrived = c.metrics["local"]["accuracy"]
    assert arrived < 0.5  # the reply as it arrived is wrong on the client's texts
    end = c.finish()
    assert end["final_epochs"] == c.cfg.epochs and end["local"]["accuracy"] > arrived
    assert end["round"] == 1  # the final round is not uploaded: no new version
    assert validate_report(end, client_id="client-0", expected_event="client_eval")["final_epochs"] == 8
    again = c.finish()  # nothing changed since: no second final round
    assert again["final_epochs"] == 0 and again["local"] == end["local"]


def test_without_the_final_round_a_client_ends_with_the_reply_as_it_arrived(monkeypatch) -> None:
    c = _client(monkeypatch, validation_fraction=0.0, final_round=False)
    c.local_round()
    reply = _flipped(c.model.state_dict())
    c.receive_enhanced(_reply(c, reply, update=1))
    end = c.finish()
    assert end["final_epochs"] == 0 and _same(c.model.state_dict(), reply)


def test_a_refused_reply_or_no_reply_leaves_nothing_to_adapt(monkeypatch, tmp_path) -> None:
    c = _client(monkeypatch, final_round=True)
    c.local_round()
    own = {k: v.clone() for k, v in c.model.state_dict().items()}
    assert c.receive_enhanced(_reply(c, _one_label(own), update=1))["adopted"] == 0
    assert c.finish()["final_epochs"] == 0 and _same(c.model.state_dict(), own)

    d = _client(monkeypatch, validation_fraction=0.0, final_round=True)
    d.local_round()
    d.receive_enhanced(_reply(d, _flipped(d.model.state_dict()), update=1))
    d.save(tmp_path / "d")  # a Flower node restores its client between the reply and the end
    e = _client(monkeypatch, validation_fraction=0.0, final_round=True)
    assert e.restore(tmp_path / "d") and e.changed_since_round
    assert e.finish()["final_epochs"] == 8
