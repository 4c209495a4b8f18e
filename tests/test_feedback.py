"""Staleness weights, prior-corrected ensemble feedback and the class-balanced S+ selection."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from crosslm.config import load_config
from crosslm.errors import ConfigError
from crosslm.server.feedback import ClientModel, Feedback, candidates, score, select_good, staleness_weights


class ConstantClassifier(torch.nn.Module):
    """Gives every text the same logits: a caricature of an SLM trained on one majority label."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)
        self.config = SimpleNamespace(num_labels=len(logits))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], -1))


def _client(cid, logits, counts, base_version=0, n=None, tokenizer=None):
    return ClientModel(
        cid, "fake", ConstantClassifier(logits), tokenizer, n or sum(counts), counts, base_version, 1
    )


def test_staleness_weights_discount_and_normalise():
    models = [_client("a", [0, 0], [50, 50], base_version=3), _client("b", [0, 0], [25, 25], base_version=1)]
    w = staleness_weights(models, current_update=3, gamma=0.5)
    # raw: a = 100 * 0.5^0 = 100, b = 50 * 0.5^2 = 12.5
    assert w["a"] == pytest.approx(100 / 112.5)
    assert w["b"] == pytest.approx(12.5 / 112.5)
    assert sum(w.values()) == pytest.approx(1.0)
    w1 = staleness_weights(models, current_update=3, gamma=1.0)
    assert w1["a"] == pytest.approx(100 / 150)  # gamma = 1: proportional to n_j only


def test_q_is_weighted_probability_of_intended_label(tiny_tokenizer):
    a = _client("a", [2.0, 0.0], [50, 50], tokenizer=tiny_tokenizer)
    b = _client("b", [0.0, 1.0], [50, 50], tokenizer=tiny_tokenizer)
    w = {"a": 0.25, "b": 0.75}
    fb = score(["x y", "z"], [0, 1], [a, b], w, prior_correction="none")
    pa, pb = torch.softmax(torch.tensor([2.0, 0.0]), 0), torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert fb.q[0] == pytest.approx(float(0.25 * pa[0] + 0.75 * pb[0]))
    assert fb.q[1] == pytest.approx(float(0.25 * pa[1] + 0.75 * pb[1]))
    assert set(fb.per_client) == {"a", "b"}
    assert torch.allclose(fb.ensemble_probs.sum(-1), torch.ones(2))


def test_prior_correction_removes_majority_label_bias(tiny_tokenizer):
    # An SLM trained on 90 % label 0 that has learnt only the prior: logits = log prior.
    counts = [90, 10]
    prior_logits = torch.log(torch.tensor(counts, dtype=torch.float) / 100).tolist()
    m = _client("a", prior_logits, counts, tokenizer=tiny_tokenizer)
    raw = score(["t1", "t2"], [0, 1], [m], {"a": 1.0}, prior_correction="none")
    assert raw.q[0] > 0.85 and raw.q[1] < 0.15  # biased toward the majority label
    for mode in ("counts", "pool"):
        fixed = score(["t1", "t2"], [0, 1], [m], {"a": 1.0}, prior_correction=mode)
        assert abs(float(fixed.q[0] - fixed.q[1])) < 0.05, mode  # corrected: no preference without evidence


class LengthClassifier(ConstantClassifier):
    """Evidence plus bias: longer texts look more 'positive', and everything leans positive by +2."""

    def forward(self, input_ids, attention_mask=None, **_):
        length = attention_mask.sum(-1).float()
        return SimpleNamespace(logits=torch.stack([-0.2 * length, 0.2 * length + 2.0], -1))


def test_pool_correction_keeps_evidence_and_removes_bias(tiny_tokenizer):
    m = ClientModel("a", "fake", LengthClassifier([0.0, 0.0]), tiny_tokenizer, 100, [50, 50], 0, 1)
    texts, labels = ["ab", "abcd", "abcdefghijk", "abcdefghijklm"], [0, 0, 1, 1]
    raw = score(texts, labels, [m], {"a": 1.0}, prior_correction="none")
    assert raw.predicted.tolist() == [1, 1, 1, 1]  # the bias swamps the evidence
    fixed = score(texts, labels, [m], {"a": 1.0}, prior_correction="pool")
    assert fixed.predicted.tolist() == [0, 0, 1, 1]  # the evidence (length) decides again


def _feedback(q_and_pred):
    q = torch.tensor([q for q, _ in q_and_pred])
    probs = torch.zeros(len(q_and_pred), 2)
    for i, (qq, pred) in enumerate(q_and_pred):
        probs[i, pred] = max(qq, 1 - qq)  # the argmax label holds the larger share
        probs[i, 1 - pred] = 1 - probs[i, pred]
    return Feedback(q=q, ensemble_probs=probs, per_client={})


def test_select_good_is_class_balanced_and_takes_highest_q():
    labels = [0, 0, 0, 0, 1, 1, 1]
    #                q    ensemble argmax
    fb = _feedback([(0.9, 0), (0.95, 0), (0.7, 0), (0.65, 0), (0.8, 1), (0.62, 1), (0.3, 0)])
    good = select_good(labels, fb, num_labels=2, tau=0.6, max_per_label=10)
    chosen = [labels[i] for i in good]
    assert chosen.count(0) == chosen.count(1) == 2  # label 1 has only 2 candidates above tau
    assert set(good) == {0, 1, 4, 5}  # the two highest-q label-0 samples, not 0.7 / 0.65
    capped = select_good(labels, fb, num_labels=2, tau=0.6, max_per_label=1)
    assert sorted(capped) == [1, 4]
    qualifying = candidates(labels, fb, num_labels=2, tau=0.6)  # what the server already has
    assert qualifying == [[1, 0, 2, 3], [4, 5]]
    assert select_good(labels, fb, num_labels=2, tau=0.6, max_per_label=10, qualifying=qualifying) == good


def test_select_good_tops_every_label_up_to_the_floor_with_its_next_highest_q():
    labels = [0, 0, 0, 0, 1, 1, 1]
    fb = _feedback([(0.9, 0), (0.95, 0), (0.7, 0), (0.65, 0), (0.8, 1), (0.62, 1), (0.3, 0)])
    kw = {"num_labels": 2, "tau": 0.6, "max_per_label": 10}
    # m = 2 (label 1's candidates); a floor of 3 adds label 1's best non-candidate (q 0.3) and label 0's
    # third-highest candidate (0.7), so S+ stays balanced at 3 per label
    assert sorted(select_good(labels, fb, min_per_label=3, **kw)) == [0, 1, 2, 4, 5, 6]
    assert sorted(select_good(labels, fb, min_per_label=2, **kw)) == [0, 1, 4, 5]  # m already there
    assert sorted(select_good(labels, fb, min_per_label=3, **{**kw, "max_per_label": 2})) == [0, 1, 4, 5]
    nothing = _feedback([(0.1, 1)] * 4 + [(0.1, 0)] * 3)  # no sample qualifies: no floor either
    assert select_good(labels, nothing, min_per_label=3, missing_labels="fill", **kw) == []
    with pytest.raises(ConfigError, match=r"feedback\.min_per_label"):
        load_config(None, ["feedback.min_per_label=-1"])


def test_select_good_requires_agreeing_argmax_and_threshold():
    labels = [0, 1]
    fb = _feedback([(0.55, 0), (0.9, 1)])
    assert select_good(labels, fb, num_labels=2, tau=0.6, max_per_label=10) == []  # label 0 below tau
    assert sorted(select_good(labels, fb, num_labels=2, tau=0.5, max_per_label=10)) == [0, 1]


# trec's case: label 2 is never the ensemble's argmax, so it has no S+ candidate.
UNPREDICTED_LABELS = [0, 0, 0, 1, 1, 2, 2, 2]
UNPREDICTED_PROBS = torch.tensor(
    [
        [0.9, 0.05, 0.05],
        [0.8, 0.1, 0.1],
        [0.7, 0.2, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.7, 0.1],
        [0.5, 0.3, 0.2],
        [0.4, 0.2, 0.4 - 1e-3],
        [0.6, 0.3, 0.1],
    ]
)


def _unpredicted(q: torch.Tensor | None = None) -> tuple[list[int], Feedback, dict]:
    labels, probs = UNPREDICTED_LABELS, UNPREDICTED_PROBS
    q = probs[torch.arange(len(labels)), torch.tensor(labels)] if q is None else q
    return (
        labels,
        Feedback(q=q, ensemble_probs=probs, per_client={}),
        {"num_labels": 3, "tau": 0.6, "max_per_label": 10},
    )


def test_select_good_skips_a_label_without_candidates_only_when_asked():
    """Strict balance empties S+; 'skip' balances the labels that have candidates."""
    labels, fb, kw = _unpredicted()
    assert select_good(labels, fb, **kw) == []
    good = select_good(labels, fb, missing_labels="skip", **kw)
    assert sorted(good) == [0, 1, 3, 4]  # two per present label, the highest q first; label 2 left out
    labels, nothing, kw = _unpredicted(q=torch.zeros(8))
    assert select_good(labels, nothing, missing_labels="skip", **kw) == []


def test_select_good_fill_keeps_every_label_with_its_highest_q_samples():
    """'fill': a label no SLM predicts still gets m samples, its highest q first, so S+ stays balanced."""
    labels, fb, kw = _unpredicted()
    good = select_good(labels, fb, missing_labels="fill", **kw)
    assert sorted(good) == [0, 1, 3, 4, 5, 6]  # label 2's two highest q (0.2, 0.399), not 0.1
    assert [labels[i] for i in sorted(good)].count(2) == 2
    capped = select_good(labels, fb, missing_labels="fill", **{**kw, "max_per_label": 1})
    assert sorted(capped) == [0, 3, 6]
    _, nothing, _ = _unpredicted(q=torch.zeros(8))
    assert select_good(labels, nothing, missing_labels="fill", **kw) == []  # no label qualifies: no m
    with pytest.raises(ValueError, match="missing_labels"):
        select_good(labels, fb, missing_labels="pad", **kw)
    with pytest.raises(ConfigError, match=r"feedback\.missing_labels.*empty or skip or fill"):
        load_config(None, ["feedback.missing_labels=pad"])


def test_label_separation_ignores_a_bias_and_sees_a_signal():
    from crosslm.server.feedback import label_separation

    y = torch.tensor([0, 1, 2] * 4)
    biased = torch.tensor([[0.8, 0.1, 0.1]] * 12)  # one label everywhere: no information about y
    assert label_separation(biased, y, 3) == pytest.approx(0.0, abs=1e-6)
    right = torch.nn.functional.one_hot(y, 3).float()
    assert label_separation(right, y, 3) == pytest.approx(1.0)


def test_the_guard_skips_a_flat_ensemble_and_keeps_a_weak_noisy_one():
    from crosslm.server.feedback import Feedback, label_signal

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    onehot = torch.nn.functional.one_hot(y, 3).float()

    def signal(probs):
        fb = Feedback(q=probs[torch.arange(60), y], ensemble_probs=probs, per_client={})
        return label_signal(y.tolist(), fb, num_labels=3, min_separation=0.05, confidence=0.95)

    flat = torch.full((60, 3), 1 / 3) + 0.01 * torch.randn(60, 3, generator=gen)  # scores ignore the text
    lost = signal(flat)
    assert not lost.found and lost.upper < 0.05 and "upper bound" in lost.reason
    weak = 0.8 * torch.softmax(3 * torch.randn(60, 3, generator=gen), -1) + 0.2 * onehot  # weak but real
    kept = signal(weak)
    assert kept.found and kept.reason == "" and kept.upper >= kept.separation
    assert signal(onehot).separation == pytest.approx(1.0)


def test_per_label_weights_follow_the_declared_label_counts():
    from crosslm.server.feedback import label_weights

    a = _client("a", [0, 0], [90, 10], base_version=2)
    b = _client("b", [0, 0], [10, 90], base_version=1)
    w = label_weights([a, b], current_update=2, gamma=0.5)
    # label 0: a = 91, b = 11 * 0.5; label 1: a = 11, b = 91 * 0.5
    assert w["a"] == pytest.approx([91 / 96.5, 11 / 56.5])
    assert w["b"] == pytest.approx([5.5 / 96.5, 45.5 / 56.5])


def test_per_label_weights_let_each_client_speak_for_the_labels_it_holds(tiny_tokenizer):
    # a knows label 0 (sure of it everywhere), b knows label 1; each is trusted on its own label
    a = _client("a", [3.0, 0.0], [90, 10], tokenizer=tiny_tokenizer)
    b = _client("b", [0.0, 3.0], [10, 90], tokenizer=tiny_tokenizer)
    w = {"a": [0.9, 0.1], "b": [0.1, 0.9]}
    fb = score(["x", "y"], [0, 1], [a, b], w, prior_correction="none")
    pa, pb = torch.softmax(torch.tensor([3.0, 0.0]), 0), torch.softmax(torch.tensor([0.0, 3.0]), 0)
    raw = torch.stack([0.9 * pa[0] + 0.1 * pb[0], 0.1 * pa[1] + 0.9 * pb[1]])
    assert torch.allclose(fb.ensemble_probs[0], raw / raw.sum())
    assert torch.allclose(fb.ensemble_probs.sum(-1), torch.ones(2))


def test_a_client_scores_only_the_texts_it_may(tiny_tokenizer):
    a = _client("a", [2.0, 0.0], [50, 50], tokenizer=tiny_tokenizer)
    b = _client("b", [0.0, 1.0], [50, 50], tokenizer=tiny_tokenizer)
    usable = {"a": torch.tensor([True, False, False]), "b": torch.tensor([True, True, False])}
    fb = score(
        ["x", "y", "z"], [0, 0, 0], [a, b], {"a": 0.5, "b": 0.5}, prior_correction="none", usable=usable
    )
    pa, pb = torch.softmax(torch.tensor([2.0, 0.0]), 0), torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert fb.q[0] == pytest.approx(float(0.5 * pa[0] + 0.5 * pb[0]))
    assert fb.q[1] == pytest.approx(float(pb[0]))  # b alone, its weight renormalised
    assert fb.blind.tolist() == [False, False, True] and torch.isnan(fb.q[2])


def test_combine_is_the_normalised_product_and_pool_calibration_removes_a_bias():
    from crosslm.server.feedback import combine, pool_calibrate

    p, r = torch.tensor([[0.6, 0.4], [0.2, 0.8]]), torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    both = combine(p, r)
    assert torch.allclose(both[0], torch.tensor([0.42, 0.12]) / 0.54)
    assert torch.allclose(both[1], p[1])  # an undecided labeller leaves the other's posterior as it is
    biased = torch.tensor([[0.9, 0.1], [0.7, 0.3]])  # leans to label 0 on a label-balanced pair
    fixed = pool_calibrate(biased)
    assert fixed[0].argmax() == 0 and fixed[1].argmax() == 1
