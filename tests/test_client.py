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
    data = ClientData(train=_easy_data(40), test=_easy_data(10, 3), global_test=LabelledTexts())
    settings = dict(epochs=8, lr=3e-3, batch_size=8, validation_fraction=0.25, accept_tolerance=0.05)
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


def test_the_validation_part_is_never_trained_on(monkeypatch) -> None:
    c = _client(monkeypatch)
    assert len(c.data.validation) == 10 and len(c.data.train) == 30
    assert c.data.validation.label_counts(2) == [5, 5]
    wire, event = c.local_round()
    upload = decode(wire, expected_labels=list(TOY_TASK.labels), max_bytes=50 * 2**20)
    assert upload.num_examples == 30  # the upload declares what the client trained on
    assert "validation" in event and "validation" not in upload.metrics


def test_a_worse_enhancement_is_refused_and_a_better_one_adopted(monkeypatch) -> None:
    c = _client(monkeypatch)
    c.local_round()
    good = {k: v.clone() for k, v in c.model.state_dict().items()}
    assert c.metrics["validation"]["macro_f1"] == 1.0  # the client learnt its easy task

    refused = c.receive_enhanced(_reply(c, _one_label(good), update=1))
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
