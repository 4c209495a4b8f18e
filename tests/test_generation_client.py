"""A generation task's client on a tiny causal LM: local rounds, its upload, the acceptance rule on held-out
ROUGE-L, saving and restoring."""

from __future__ import annotations

import pytest
import torch

from crosslm.client import generation_client as gc
from crosslm.client.client import ClientData
from crosslm.config import ClientConfig, GenerationTaskConfig
from crosslm.errors import ConfigError
from crosslm.protocol import SLMEnhanced, decode, encode, model_config_dict
from crosslm.task import GenerationPairs, TaskSpec
from tests.conftest import make_llm, make_tokenizer

TASK = TaskSpec(name="pets", labels=("cats", "dogs"), descriptions=("cats", "dogs"), verbalizer=("Cats", "Dogs"),
                generation_prompt="Write a story about {description}, then its headline.", classification_prompt="",
                kind="generation", target_noun="headline")  # fmt: skip
MAX = 50 * 2**20


def _pairs(n: int, offset: int = 0) -> GenerationPairs:
    topics = [("cats", 0), ("dogs", 1)]
    rows = [topics[i % 2] for i in range(offset, offset + n)]
    return GenerationPairs([f"{t} story {i}" for i, (t, _) in enumerate(rows)], [f"{t} win" for t, _ in rows],
                           [c for _, c in rows])  # fmt: skip


def _client(monkeypatch, tied: bool = False, **cfg) -> gc.GenerationClient:
    from tokenizers import decoders

    tok = make_tokenizer(chat=False)
    tok.backend_tokenizer.decoder = decoders.Fuse()  # characters decode back without spaces between them

    def load(name):
        model = make_llm(len(tok))
        if tied:
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
        return model, tok

    monkeypatch.setattr(gc, "load_causal_slm", load)
    settings = dict(epochs=25, lr=5e-3, batch_size=4, validation_fraction=0.5, max_length=32)
    settings.update(cfg)
    data = ClientData(train=_pairs(16), test=_pairs(8, 16), global_test=GenerationPairs())
    return gc.GenerationClient("client-0", "tiny", TASK, data, ClientConfig(**settings),
                               task_cfg=GenerationTaskConfig(max_target_tokens=10), eval_batch_size=8,
                               max_payload_bytes=MAX, seed=0)  # fmt: skip


def _reply(c: gc.GenerationClient, state: dict[str, torch.Tensor], update: int):
    msg = SLMEnhanced(client_id=c.client_id, slm=c.slm, model_type=c.model.config.model_type,
                      model_config=model_config_dict(c.model), labels=list(TASK.labels), server_update=update,
                      state_dict=state)  # fmt: skip
    return encode(msg, dtype="float32")


def test_a_round_learns_the_pairs_and_uploads_generation_metrics(monkeypatch) -> None:
    c = _client(monkeypatch)
    assert len(c.data.held_out) == 4 and c.data.held_out.label_counts(2) == [2, 2]  # stratified by topic
    wire, event = c.local_round()
    assert event["validation"]["rouge_l"] > 0.9  # held-out stories: the headline follows the topic
    upload = decode(wire, expected_labels=list(TASK.labels), max_bytes=MAX, kind="generation")
    assert upload.num_examples == 16 and upload.label_counts == [8, 8]  # all its training pairs
    assert set(upload.metrics) == {"rouge_l", "target_perplexity", "distinct_2"}


def test_a_broken_reply_is_refused_and_a_good_one_adopted(monkeypatch) -> None:
    c = _client(monkeypatch)
    c.local_round()
    good = {k: v.clone() for k, v in c.model.state_dict().items()}
    broken = {**good, "lm_head.weight": torch.zeros_like(good["lm_head.weight"])}
    refused = c.receive_enhanced(_reply(c, broken, update=1))
    assert refused["adopted"] == 0 and refused["worse_share"] > 0.9
    assert refused["offered"]["validation"]["rouge_l"] < 0.5
    assert all(torch.equal(v, good[k]) for k, v in c.model.state_dict().items())  # it kept its own
    adopted = c.receive_enhanced(_reply(c, good, update=2))
    assert adopted["adopted"] == 1 and adopted["worse_share"] == 0.0 and c.base_version == 2


def test_the_bootstrap_share_follows_the_rouge_gap() -> None:
    own = [1.0, 1.0, 0.8, 0.9]
    assert gc.rouge_worse_share(own, [0.0] * 4, tolerance=0.05) == 1.0
    assert gc.rouge_worse_share(own, own, tolerance=0.05) == 0.0
    assert 0.0 < gc.rouge_worse_share(own, [1.0, 1.0, 0.8, 0.6], tolerance=0.05) < 0.9  # one pair worse


def test_keep_weight_is_refused_for_a_generation_task(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="clients.keep_weight"):
        _client(monkeypatch, keep_weight=0.5)


def test_a_saved_client_with_a_tied_head_restores(monkeypatch, tmp_path) -> None:
    c = _client(monkeypatch, tied=True, epochs=2)
    c.local_round()
    c.save(tmp_path / "c")
    other = _client(monkeypatch, tied=True, epochs=2)
    assert other.restore(tmp_path / "c") and other.round == 1
    assert all(torch.equal(v, c.model.state_dict()[k]) for k, v in other.model.state_dict().items())
