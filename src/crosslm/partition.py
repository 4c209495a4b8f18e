"""The federation split: a global test set kept apart, and Dirichlet label-skewed private data per client.

Each client's test split has the same label mix as its training split, so per-client accuracy measures the
client on its own distribution, while the global test split measures it on the overall one.

The split reads only each example's integer label, so one implementation serves both task kinds: it takes
any `Partitionable` (classification's `LabelledTexts`, or generation's `GenerationPairs`, whose labels are
the conditions) and returns parts of the same type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

from crosslm.errors import DataError

D = TypeVar("D", bound="Partitionable")


class Partitionable(Protocol):
    """Examples with one integer label (or condition) each, that can be cut to a subset by index."""

    @property
    def labels(self) -> list[int]: ...

    def __len__(self) -> int: ...

    def subset(self: D, idx: list[int]) -> D: ...

    def label_counts(self, num_labels: int) -> list[int]: ...


@dataclass
class FederatedSplit(Generic[D]):
    train: list[D]
    """Per client."""
    test: list[D]
    """Per client, same label mix as its train split."""
    global_test: D
    validation: D
    """Stratified, disjoint from everything else; for tuning settings without looking at the test split
    (empty unless asked for)."""
    train_idx: list[list[int]] = field(default_factory=list)
    """Indices into the partitioned data, so a run can record exactly which examples each client holds."""
    test_idx: list[list[int]] = field(default_factory=list)
    global_test_idx: list[int] = field(default_factory=list)
    validation_idx: list[int] = field(default_factory=list)


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to weights that sum exactly to total."""
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(int)
    rest = total - int(counts.sum())
    if rest > 0:
        order = np.argsort(-(share - counts), kind="stable")
        counts[order[:rest]] += 1
    return counts


def _capped_counts(rng: np.random.Generator, p: np.ndarray, n: int, available: np.ndarray) -> np.ndarray:
    """Multinomial(n, p) counts capped by availability; what a depleted label cannot give is redrawn over the
    labels that still have examples, with p renormalised over them."""
    counts = np.zeros_like(available)
    need = n
    while need > 0:
        room = available - counts
        q = np.where(room > 0, p, 0.0)
        if q.sum() <= 0:  # p puts no mass on any label that is left: fall back to what is available
            q = room.astype(float)
        draw = rng.multinomial(need, q / q.sum())
        counts += np.minimum(draw, room)
        need = n - int(counts.sum())
    return counts


def federated_split(
    data: D,
    num_labels: int,
    num_clients: int,
    alpha: float,
    train_per_client: int,
    test_per_client: int,
    global_test_size: int,
    seed: int,
    label_names: Sequence[str] | None = None,
    validation_size: int = 0,
) -> FederatedSplit[D]:
    """Split data into a stratified global test set and num_clients Dirichlet(alpha)-skewed client splits,
    then (from what is left) a stratified validation set.

    All parts are disjoint by index, have exactly the requested sizes, and depend only on the seed. The
    validation set is drawn last, so asking for it leaves the test set and every client's data unchanged.
    """
    if num_clients < 1:
        raise DataError(f"num_clients is {num_clients}; a federation needs at least 1 client.")
    if alpha <= 0:
        raise DataError(f"dirichlet_alpha is {alpha}; it must be positive.")
    if train_per_client < 1 or test_per_client < 0 or global_test_size < 0:
        raise DataError(
            f"split sizes must be train_per_client >= 1, test_per_client >= 0, global_test_size >= 0; got "
            f"{train_per_client}, {test_per_client}, {global_test_size}."
        )
    names = list(label_names) if label_names is not None else [str(i) for i in range(num_labels)]
    labels = np.asarray(data.labels, dtype=int)
    bad = labels[(labels < 0) | (labels >= num_labels)]
    if bad.size:
        raise DataError(f"label id {int(bad[0])} is outside 0..{num_labels - 1} ({num_labels} labels).")
    n_label = np.bincount(labels, minlength=num_labels)
    empty = [names[c] for c in range(num_labels) if n_label[c] == 0]
    if empty:
        raise DataError(f"label '{empty[0]}' has no examples, so it cannot be partitioned.")
    per_client = train_per_client + test_per_client
    requested = num_clients * per_client + global_test_size + validation_size
    if requested > len(data):
        extra = f" + {validation_size} validation" if validation_size else ""
        raise DataError(
            f"the split needs {requested} examples ({num_clients} clients x ({train_per_client} train + "
            f"{test_per_client} test) + {global_test_size} global test{extra}) but the data has only "
            f"{len(data)}."
        )

    rng = np.random.default_rng(seed)
    # Per-label pools in random order; taking from the front of a pool is sampling without replacement.
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_labels)]

    def take(counts: np.ndarray) -> list[list[int]]:
        out = []
        for c, k in enumerate(counts):
            out.append([int(i) for i in pools[c][:k]])
            pools[c] = pools[c][k:]
        return out

    global_idx = [
        i for part in take(_largest_remainder(n_label.astype(float), global_test_size)) for i in part
    ]
    global_idx = [int(i) for i in rng.permutation(global_idx)] if global_idx else []

    train_idx: list[list[int]] = []
    test_idx: list[list[int]] = []
    for _ in range(num_clients):
        p = np.nan_to_num(rng.dirichlet(np.full(num_labels, alpha)), nan=0.0)
        available = np.array([len(pool) for pool in pools])
        by_label = take(_capped_counts(rng, p, per_client, available))
        # Same label mix in train and test: split each label's share in the ratio test : train.
        n_test = _largest_remainder(np.array([len(b) for b in by_label], dtype=float), test_per_client)
        tr = [i for b, k in zip(by_label, n_test, strict=True) for i in b[k:]]
        te = [i for b, k in zip(by_label, n_test, strict=True) for i in b[:k]]
        train_idx.append([int(i) for i in rng.permutation(tr)])
        test_idx.append([int(i) for i in rng.permutation(te)] if te else [])

    # the test split's label mix where the clients left enough examples; a shortfall is filled from the rest
    left = np.array([len(pool) for pool in pools])
    val_counts = np.minimum(_largest_remainder(n_label.astype(float), validation_size), left)
    if validation_size > val_counts.sum():
        room = left - val_counts
        val_counts += _capped_counts(
            rng, room / max(room.sum(), 1), validation_size - int(val_counts.sum()), room
        )
    val_idx = [i for part in take(val_counts) for i in part] if validation_size else []
    val_idx = [int(i) for i in rng.permutation(val_idx)] if val_idx else []

    return FederatedSplit(
        validation=data.subset(val_idx),
        validation_idx=val_idx,
        train=[data.subset(ix) for ix in train_idx],
        test=[data.subset(ix) for ix in test_idx],
        global_test=data.subset(global_idx),
        train_idx=train_idx,
        test_idx=test_idx,
        global_test_idx=global_idx,
    )


def label_histogram(parts: Sequence[Partitionable], num_labels: int) -> list[list[int]]:
    """Label counts per part (rows = parts), for logs and the label-skew plot."""
    return [part.label_counts(num_labels) for part in parts]


def stratified_holdout(data: D, num_labels: int, fraction: float, seed: int) -> tuple[D, D]:
    """(kept, held out): round(fraction * n_c) texts of each label c held out, drawn with `seed`, so the
    held-out part has the label mix of the whole (a label with a handful of texts may give none)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)
    held: list[int] = []
    for c in range(num_labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * len(idx)))
        held += rng.choice(idx, size=k, replace=False).tolist() if k else []
    out = set(held)
    return data.subset([i for i in range(len(data)) if i not in out]), data.subset(sorted(held))
