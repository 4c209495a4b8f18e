"""What the SLMs are distilled on: the distillation set (source, labeller, agreement, class-balanced
quality weights), the LLM and the generator as labellers, and no SLM re-scoring a text it may have learnt."""

from __future__ import annotations

import pytest
import torch

from crosslm.config import load_config
from crosslm.modeling.llm_text import answer_ids, user_prompt_ids
from crosslm.modeling.slm import fit, soft_cross_entropy
from crosslm.protocol import encode
from crosslm.server.feedback import Feedback, combine
from crosslm.server.generate import generator_scores
from crosslm.server.server import CrossLMServer
from crosslm.server.update import (
    Selection,
    SyntheticExample,
    balanced_weights,
    distillation_set,
    keep_last_scores,
    label_with_llm,
    labeller_posterior,
    pool_selection,
    undistilled,
)
from crosslm.task import LabelledTexts
from tests.conftest import TOY_TASK, make_classifier, make_tokenizer, make_upload


def _server(*sets: str, llm=None, tokenizer=None) -> CrossLMServer:
    cfg = load_config(None, ["method=crosslm", *sets])
    log: list[dict] = []
    srv = CrossLMServer(cfg, TOY_TASK, llm if llm is not None else object(), tokenizer, LabelledTexts(),
                        log=log.append, log_synthetic=log.append)  # fmt: skip
    srv.events = log
    return srv


def _pool(srv: CrossLMServer, labels: list[int], updates: list[int] | None = None) -> None:
    updates = updates or [1] * len(labels)
    srv.pool = [
        SyntheticExample(f"text {i}", y, f"h{i}", u, u - 1)
        for i, (y, u) in enumerate(zip(labels, updates, strict=True))
    ]


def _selection(probs: torch.Tensor, labels: list[int], good: list[int] | None = None) -> Selection:
    y = torch.tensor(labels)
    fb = Feedback(q=probs[torch.arange(len(y)), y], ensemble_probs=probs, per_client={})
    return Selection(fb, good or [])


def test_pool_selection_keeps_agreeing_texts_with_class_balanced_quality_weights():
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    post = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.45, 0.55], [0.8, 0.2]])
    idx, w = pool_selection(y, post, 2, agreement=True, missing_labels="fill")
    assert idx == [0, 1, 3, 4]  # text 2 and 5: the labeller reads the other label
    assert w is not None and w.mean() == pytest.approx(1.0)
    assert w[0] + w[1] == pytest.approx(w[2] + w[3])  # each label carries the same total weight
    assert w[0] > w[1] and w[2] > w[3]  # the surer texts weigh more
    idx_all, _ = pool_selection(y, post, 2, agreement=False, missing_labels="fill")
    assert idx_all == list(range(6))


@pytest.mark.parametrize(("rule", "expected"), [("fill", [0, 1, 4, 5]), ("skip", [0, 1]), ("empty", [])])
def test_a_label_the_labeller_never_confirms_follows_the_missing_labels_rule(rule, expected):
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    post = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])
    idx, _ = pool_selection(y, post, 2, agreement=True, missing_labels=rule)
    assert idx == expected  # fill: label 1's two highest-q texts (q 0.4, 0.3)


def test_balanced_weights_give_a_rare_label_as_much_weight_as_a_common_one():
    w = balanced_weights(torch.tensor([0, 0, 0, 1]), torch.ones(4))
    assert w.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])


def test_distillation_from_the_pool_uses_the_labellers_product_as_soft_target():
    srv = _server(
        "distill.source=pool", "distill.labeller=slms+llm", "distill.mu=1.0", "distill.temperature=1.0"
    )
    _pool(srv, [0, 1, 0, 1])
    slm = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.6, 0.4], [0.3, 0.7]])
    for e, row in zip(srv.pool, [[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.1, 0.9]], strict=True):
        e.llm_probs = row
    dset = distillation_set(srv, _selection(slm, [0, 1, 0, 1]))
    both = combine(slm, torch.tensor([e.llm_probs for e in srv.pool]))
    assert dset.indices == [0, 3]  # text 1: the LLM outvotes the SLMs; text 2: the reverse
    assert torch.allclose(dset.targets, both[[0, 3]], atol=1e-6)


def test_splus_distillation_is_unchanged_by_default():
    srv = _server("distill.mu=0.5")
    _pool(srv, [0, 1, 0, 1])
    slm = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.6, 0.4], [0.3, 0.7]])
    dset = distillation_set(srv, _selection(slm, [0, 1, 0, 1], good=[0, 1]))
    assert dset.indices == [0, 1] and dset.weights is None
    expected = 0.5 * torch.eye(2) + 0.5 * torch.softmax(torch.log(slm[:2]) / 2.0, -1)
    assert torch.allclose(dset.targets, expected, atol=1e-6)


def test_kd_without_feedback_distils_the_whole_pool_on_intended_labels_balanced():
    srv = _server("method=kd-no-feedback", "distill.source=pool")
    _pool(srv, [0, 0, 0, 1])
    fb = Feedback.unscored(4, 2)
    dset = distillation_set(srv, Selection(fb, [0, 1, 2, 3]))
    assert dset.indices == [0, 1, 2, 3]
    assert torch.equal(dset.targets, torch.eye(2)[[0, 0, 0, 1]])
    assert dset.weights.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])


def test_no_slm_rescores_a_text_it_may_have_been_distilled_on():
    srv = _server("feedback.exclude_distilled=true")
    _pool(srv, [0, 1, 0], updates=[1, 2, 3])
    model = make_classifier("bert", 100)
    srv.receive(encode(make_upload(model, base_version=0)), sender="client-0")
    srv.update = 2
    srv.receive(encode(make_upload(model, client_id="client-1", base_version=2)), sender="client-1")
    may = undistilled(srv)
    assert may["client-0"].tolist() == [True, True, True]  # pretrained start: no reply behind it
    assert may["client-1"].tolist() == [False, False, True]  # from update 2's reply: texts of 1-2 are out

    # texts 0 and 1 have no SLM that may score them: they keep their last scores
    for e, last in zip(srv.pool, [[0.9, 0.1], [0.3, 0.7], None], strict=True):
        e.slm_probs = last
    probs = torch.tensor([[float("nan")] * 2, [float("nan")] * 2, [0.4, 0.6]])
    fb = Feedback(
        q=probs[:, 0].clone(), ensemble_probs=probs, per_client={}, blind=torch.tensor([True, True, False])
    )
    keep_last_scores(srv, fb, [0, 1, 0])
    assert fb.q.tolist() == pytest.approx([0.9, 0.7, 0.4])
    assert srv.pool[2].slm_probs == pytest.approx([0.4, 0.6])  # remembered for its next blind scoring


def test_the_llm_labels_each_new_text_once_with_a_calibrated_posterior(tiny_llm, tiny_tokenizer):
    srv = _server("distill.labeller=llm", "eval.llm_dtype=float32", llm=tiny_llm, tokenizer=tiny_tokenizer)
    _pool(srv, [0, 1, 0, 1])
    label_with_llm(srv, range(2, 4))
    assert srv.pool[0].llm_probs is None  # written before: scored when it was new
    rows = torch.tensor([srv.pool[i].llm_probs for i in (2, 3)])
    assert torch.allclose(rows.sum(-1), torch.ones(2), atol=1e-5)
    srv_slms = _server("distill.labeller=slms", llm=tiny_llm, tokenizer=tiny_tokenizer)
    _pool(srv_slms, [0, 1])
    label_with_llm(srv_slms, range(0, 2))
    assert srv_slms.pool[0].llm_probs is None  # the SLMs alone label: no LLM pass


def test_the_generator_scores_a_text_by_its_likelihood_under_each_labels_prompt(tiny_llm, tiny_tokenizer):
    texts = ["A fine film.", "Dull and long, far too long."]
    scores = generator_scores(tiny_llm, tiny_tokenizer, TOY_TASK, texts, batch_size=3)  # rows mix lengths
    for i, text in enumerate(texts):
        for c in range(2):  # one unpadded sequence at a time: sum_t log p(x_t | P(c), x_<t)
            prompt, answer = (
                user_prompt_ids(tiny_tokenizer, TOY_TASK.prompt_for(c)),
                answer_ids(tiny_tokenizer, text),
            )
            with torch.no_grad():
                logp = torch.log_softmax(tiny_llm(torch.tensor([prompt + answer])).logits[0].float(), -1)
            direct = sum(float(logp[len(prompt) + t - 1, tok]) for t, tok in enumerate(answer))
            assert scores[i, c].item() == pytest.approx(direct, abs=1e-3)


def test_the_generator_labels_new_texts_and_joins_the_product(tiny_llm, tiny_tokenizer):
    srv = _server(
        "distill.labeller=slms+generator", "eval.llm_dtype=float32", llm=tiny_llm, tokenizer=tiny_tokenizer
    )
    _pool(srv, [0, 1, 0, 1])
    label_with_llm(srv, range(4))
    assert all(e.llm_probs is None for e in srv.pool)  # the verbalizer was not asked
    gen = torch.tensor([e.gen_probs for e in srv.pool])
    assert torch.allclose(gen.sum(-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(gen.mean(0), torch.full((2,), 0.5), atol=0.05)  # calibrated on the balanced texts
    slm = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.6, 0.4], [0.3, 0.7]])
    assert torch.allclose(labeller_posterior(srv, _selection(slm, [0, 1, 0, 1])), combine(slm, gen))


def test_fit_weights_examples_and_stops_at_max_steps():
    logits, targets = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.eye(2)[[0, 0]]
    per = -(targets * torch.log_softmax(logits, -1)).sum(-1)
    assert soft_cross_entropy(logits, targets, torch.tensor([2.0, 0.0])) == pytest.approx(float(per[0]))

    tok = make_tokenizer(chat=False)
    texts = ["aaaa", "zzzz", "aaa", "zz", "aaaaa"]
    steps = []
    model = make_classifier("bert", len(tok))
    model.register_forward_hook(lambda *a: steps.append(1))
    fit(model, tok, texts, torch.eye(2)[[0, 1, 0, 1, 0]], epochs=10, lr=1e-3, batch_size=2, max_length=16,
        seed=0, max_steps=4)  # fmt: skip
    assert len(steps) == 4  # 3 batches per pass: the second pass stops after one batch


def test_prompt_examples_are_the_texts_the_slms_read_as_their_label_best_first():
    from crosslm.server.update import prompt_examples

    srv = _server("generation.examples_per_prompt=2", "generation.example_candidates=2")
    _pool(srv, [0, 0, 0, 1, 1])
    for e, p in zip(srv.pool, [[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8], None], strict=True):
        e.slm_probs = p
    assert prompt_examples(srv) == {0: ["text 1", "text 0"], 1: ["text 3"]}  # text 2 reads as label 1
    off = _server()
    off.pool = srv.pool
    assert prompt_examples(off) == {}  # the plain prompt by default
