"""The federation split: disjoint exact-size parts, same-seed reproducibility, and Dirichlet label skew."""

from __future__ import annotations

import numpy as np
import pytest

from crosslm.errors import DataError
from crosslm.partition import FederatedSplit, federated_split, label_histogram
from crosslm.task import LabelledTexts


def make_data(counts: list[int]) -> LabelledTexts:
    labels = [y for y, n in enumerate(counts) for _ in range(n)]
    order = np.random.default_rng(123).permutation(len(labels))
    labels = [labels[i] for i in order]
    return LabelledTexts([f"text {i}" for i in range(len(labels))], labels)


def split(data: LabelledTexts, num_labels: int, **kw: object) -> FederatedSplit:
    args: dict = dict(
        num_clients=5, alpha=0.5, train_per_client=40, test_per_client=20, global_test_size=100, seed=0
    )
    args.update(kw)
    return federated_split(data, num_labels, **args)


def all_indices(s: FederatedSplit) -> list[int]:
    return [i for ix in s.train_idx + s.test_idx + [s.global_test_idx] for i in ix]


def test_parts_are_disjoint_and_exact_sizes() -> None:
    data = make_data([300, 200, 100, 50])
    s = split(data, 4)
    assert len(s.train) == len(s.test) == 5
    assert all(len(p) == 40 for p in s.train) and all(len(p) == 20 for p in s.test)
    assert len(s.global_test) == 100
    idx = all_indices(s)
    assert len(idx) == len(set(idx)) == 5 * 60 + 100
    texts = [t for p in s.train + s.test + [s.global_test] for t in p.texts]
    assert len(set(texts)) == len(texts)
    for part, ix in zip(
        s.train + s.test + [s.global_test], s.train_idx + s.test_idx + [s.global_test_idx], strict=True
    ):
        assert part.texts == [data.texts[i] for i in ix] and part.labels == [data.labels[i] for i in ix]


def test_global_test_is_stratified_and_client_test_matches_train_mix() -> None:
    data = make_data([600, 300, 100])
    s = split(
        data, 3, alpha=0.3, num_clients=4, train_per_client=60, test_per_client=30, global_test_size=200
    )
    g = s.global_test.label_counts(3)
    assert all(abs(g[c] - 200 * n / 1000) <= 1 for c, n in enumerate([600, 300, 100]))
    for tr, te in zip(s.train, s.test, strict=True):
        total = np.array(tr.label_counts(3)) + np.array(te.label_counts(3))
        assert np.all(np.abs(np.array(te.label_counts(3)) - total * 30 / 90) < 1)


def test_reproducible_by_seed_and_differs_across_seeds() -> None:
    data = make_data([200, 200, 200])
    a, b, c = split(data, 3, seed=7), split(data, 3, seed=7), split(data, 3, seed=8)
    assert a.train_idx == b.train_idx and a.test_idx == b.test_idx and a.global_test_idx == b.global_test_idx
    assert a.train[0].texts == b.train[0].texts
    assert a.train_idx != c.train_idx and a.global_test_idx != c.global_test_idx


def mean_max_share(alpha: float) -> float:
    data = make_data([500] * 5)
    shares = []
    for seed in range(5):
        s = split(data, 5, alpha=alpha, num_clients=5, train_per_client=60, test_per_client=20, seed=seed)
        shares += [max(h) / sum(h) for h in label_histogram(s.train, 5)]
    return float(np.mean(shares))


def test_small_alpha_skews_labels() -> None:
    skewed, even = mean_max_share(0.1), mean_max_share(100.0)
    assert skewed > 0.6 and even < 0.35
    assert skewed > even + 0.3


def test_exhausted_labels_are_renormalised() -> None:
    data = make_data([10, 10, 200])  # small labels run out; the request uses every example
    s = split(
        data, 3, alpha=0.05, num_clients=4, train_per_client=40, test_per_client=10, global_test_size=20
    )
    assert sorted(all_indices(s)) == list(range(220))


def test_label_histogram() -> None:
    parts = [LabelledTexts(["a", "b", "c"], [0, 2, 2]), LabelledTexts([], [])]
    assert label_histogram(parts, 3) == [[1, 0, 2], [0, 0, 0]]


def test_impossible_partitions() -> None:
    data = make_data([100, 0, 100])
    with pytest.raises(DataError, match="label 'neutral' has no examples"):
        federated_split(data, 3, 2, 0.5, 10, 5, 10, 0, label_names=["neg", "neutral", "pos"])
    data = make_data([100, 100])
    with pytest.raises(DataError, match=r"needs 230 examples.*only 200"):
        federated_split(data, 2, 4, 0.5, 40, 10, 30, 0)
    with pytest.raises(DataError, match="at least 1 client"):
        federated_split(data, 2, 0, 0.5, 40, 10, 30, 0)
    with pytest.raises(DataError, match="outside 0..0"):
        federated_split(data, 1, 1, 0.5, 10, 5, 10, 0)


def test_validation_split_is_disjoint_stratified_and_changes_nothing_else() -> None:
    data = make_data([300, 200, 100, 50])
    plain = split(data, 4)
    s = split(data, 4, validation_size=80)
    assert s.train_idx == plain.train_idx and s.test_idx == plain.test_idx
    assert s.global_test_idx == plain.global_test_idx
    assert len(s.validation) == len(s.validation_idx) == 80
    assert not set(s.validation_idx) & set(all_indices(s))
    # the test split's label mix (300:200:100:50 of 80), as far as the clients left examples of each label
    used = np.bincount([data.labels[i] for i in all_indices(s)], minlength=4)
    left = np.array([300, 200, 100, 50]) - used
    got = s.validation.label_counts(4)
    for c, target in enumerate([37, 25, 12, 6]):
        assert got[c] >= min(target, left[c]), (got, left)
    assert plain.validation_idx == []
    with pytest.raises(DataError, match="80 validation"):
        split(data, 4, validation_size=80, global_test_size=300)


def test_eval_split_validation_measures_on_validation(tmp_path) -> None:
    from crosslm.config import RunConfig
    from crosslm.lifecycle import split_task_data
    from crosslm.task import TaskSpec

    cfg = RunConfig()
    cfg.data.num_clients, cfg.data.train_per_client, cfg.data.test_per_client = 2, 20, 5
    cfg.data.global_test_size = 30
    names = ("a", "b", "c", "d")
    task = TaskSpec("t", names, names, names, "Write {description}.", "{text} {options}")
    data = make_data([300, 200, 100, 50])
    test_split = split_task_data(cfg, task, data)
    cfg.eval.split = "validation"
    val_split = split_task_data(cfg, task, data)
    assert val_split.train_idx == test_split.train_idx
    assert len(val_split.global_test) == 30
    assert not set(val_split.global_test_idx) & set(test_split.global_test_idx)
