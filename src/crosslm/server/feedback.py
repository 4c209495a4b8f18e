"""Step 4: the SLMs score the synthetic data, and the good, class-balanced set S+ is chosen.

q(x, y) = sum_j w_j p_j(y | x) over the latest SLM of each client, w_j proportional to n_j * gamma^s_j
(or, with per-label weights, w_jy proportional to (n_jy + 1) * gamma^s_j: a client's vote on a label counts
as much as it holds of that label).

Label-prior correction: an SLM trained on label-skewed data scores toward its majority labels. Each client's
probabilities are prior-corrected before they are combined, and S+ is selected per label so that it stays
class-balanced. Two corrections are available:
- "counts": logit adjustment, logits - log prior_j, with prior_j from the label counts client j declares.
- "pool": divide p_j by its mean over the scored pool, which holds N samples of every label by
  construction; this removes whatever label bias the SLM has, however it arose (contextual calibration).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crosslm.config import MISSING_LABEL_RULES
from crosslm.modeling.slm import log_prior, predict_logits


@dataclass
class ClientModel:
    """The server's copy of client j's latest accepted SLM."""

    client_id: str
    slm: str
    model: Any
    tokenizer: Any
    num_examples: int
    label_counts: list[int]
    base_version: int
    """The server update the client's weights started from; staleness s_j = current update - base_version."""
    round: int


def staleness_weights(models: Sequence[ClientModel], current_update: int, gamma: float) -> dict[str, float]:
    """w_j = n_j * gamma^s_j / sum_i n_i * gamma^s_i, with s_j = current_update - base_version_j."""
    raw = {m.client_id: m.num_examples * gamma ** max(current_update - m.base_version, 0) for m in models}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def label_weights(models: Sequence[ClientModel], current_update: int, gamma: float) -> dict[str, list[float]]:
    """w_jc = (n_jc + 1) * gamma^s_j / sum_i (n_ic + 1) * gamma^s_i: per label c, each client's vote counts
    by what it declared it holds of c (a Dirichlet-skewed client knows its few labels, not the others)."""
    raw = {
        m.client_id: (torch.tensor(m.label_counts, dtype=torch.float) + 1.0)
        * gamma ** max(current_update - m.base_version, 0)
        for m in models
    }
    total = torch.stack(list(raw.values())).sum(0)
    return {k: (v / total).tolist() for k, v in raw.items()}


def pool_calibrate(p: torch.Tensor) -> torch.Tensor:
    """p(c|x) / mean over the texts of p(c|x), renormalised: on a label-balanced set of texts this removes
    whatever label bias a classifier has, however it arose (contextual calibration on the pool)."""
    p = p / p.mean(0, keepdim=True).clamp(min=1e-6)
    return p / p.sum(-1, keepdim=True)


def combine(*posteriors: torch.Tensor) -> torch.Tensor:
    """The normalised product of label posteriors that each assume a uniform prior (naive Bayes: two
    classifiers that err independently, each calibrated on the label-balanced pool)."""
    out = posteriors[0].clamp(min=1e-9)
    for p in posteriors[1:]:
        out = out * p.clamp(min=1e-9)
    return out / out.sum(-1, keepdim=True)


@dataclass
class Feedback:
    q: torch.Tensor  # [N] ensemble probability of the intended label
    ensemble_probs: torch.Tensor  # [N, C] sum_j w_j p_j(.|x)
    per_client: dict[str, torch.Tensor]  # client_id -> [N, C] p_j(.|x) (prior-corrected if enabled)
    blind: torch.Tensor | None = None  # [N] bool: no SLM was allowed to score the text (its row is NaN)

    @property
    def ensemble_logits(self) -> torch.Tensor:
        return torch.log(self.ensemble_probs.clamp(min=1e-12))

    @property
    def predicted(self) -> torch.Tensor:
        return self.ensemble_probs.argmax(-1)

    @classmethod
    def unscored(cls, n: int, num_labels: int) -> Feedback:
        """No feedback (the data-free KD baseline): q is NaN and the ensemble is uniform."""
        return cls(q=torch.full((n,), float("nan")), ensemble_probs=torch.full((n, num_labels), 1.0 / num_labels),
                   per_client={})  # fmt: skip


@torch.no_grad()
def score(
    texts: Sequence[str],
    labels: Sequence[int],
    models: Sequence[ClientModel],
    weights: Mapping[str, float | Sequence[float]],
    *,
    prior_correction: str,
    batch_size: int = 64,
    max_length: int = 128,
    usable: Mapping[str, torch.Tensor] | None = None,
) -> Feedback:
    """The ensemble's posterior: sum_j w_j p_j(.|x) with one weight per client, or w_jc per label (then
    renormalised over labels). With `usable` (client -> [N] bool), a client scores only the texts it may:
    the weights are renormalised over the clients left, and a text no client may score is marked `blind`."""
    per_client: dict[str, torch.Tensor] = {}
    num, den = None, None
    for m in models:
        logits = predict_logits(m.model, m.tokenizer, texts, batch_size=batch_size, max_length=max_length)
        if prior_correction == "counts":
            logits = logits - log_prior(m.label_counts)
        p = torch.softmax(logits, dim=-1)
        if prior_correction == "pool":
            p = pool_calibrate(p)
        per_client[m.client_id] = p
        w = torch.as_tensor(weights[m.client_id], dtype=torch.float).expand_as(p)
        if usable is not None:
            w = w * usable[m.client_id].float().unsqueeze(1)
        num = w * p if num is None else num + w * p
        den = w if den is None else den + w
    assert num is not None and den is not None, "score() needs at least one client model"
    blind = den[:, 0] <= 0
    ens = num / den.clamp(min=1e-12)
    ens = ens / ens.sum(-1, keepdim=True).clamp(min=1e-12)
    ens[blind] = float("nan")
    y = torch.tensor(list(labels), dtype=torch.long)
    q = ens.gather(1, y.unsqueeze(1)).squeeze(1)
    return Feedback(q=q, ensemble_probs=ens, per_client=per_client, blind=blind)


def candidates(labels: Sequence[int], feedback: Feedback, *, num_labels: int, tau: float) -> list[list[int]]:
    """Per label, the indices that qualify for S+ (ensemble argmax = intended label and q >= tau), highest
    q first. An empty list marks a label the SLMs cannot yet recognise in the pool."""
    y = torch.tensor(list(labels), dtype=torch.long)
    ok = (feedback.predicted == y) & (feedback.q >= tau)
    return [_by_q(torch.nonzero(ok & (y == c)).flatten(), feedback.q) for c in range(num_labels)]


def _by_q(idx: torch.Tensor, q: torch.Tensor) -> list[int]:
    return idx[torch.argsort(q[idx], descending=True)].tolist()


def _top_up(first: list[int], ranked: list[int]) -> list[int]:
    """`first`, then the indices of `ranked` not in it, in ranked order."""
    taken = set(first)
    return first + [i for i in ranked if i not in taken]


def select_good(
    labels: Sequence[int],
    feedback: Feedback,
    *,
    num_labels: int,
    tau: float,
    max_per_label: int,
    missing_labels: str = "empty",
    min_per_label: int = 0,
    qualifying: list[list[int]] | None = None,
) -> list[int]:
    """S+: the candidates of every label, the same count m per label (m = the smallest label's count,
    capped), highest q first.

    When some label has no candidate (weak SLMs never predict it), `missing_labels` decides:
    - "empty": S+ is empty (strict class balance; the client gets its SLM back unchanged);
    - "skip": m is the smallest count among the labels that have candidates, the others are left out;
    - "fill": as "skip", then each label left out gets its m highest-q samples anyway, so S+ stays
      balanced over every label (the SLMs' best guesses for a label they cannot yet recognise).
    With no candidate for any label, S+ is empty under every rule. When S+ is not empty and m is below
    `min_per_label`, m is raised to it (capped) and every label in S+ is topped up with its next-highest-q
    samples: a label with one qualifying sample no longer shrinks S+ to one per label. `qualifying` is
    `candidates(...)` for the same arguments, when the caller has already computed it."""
    if missing_labels not in MISSING_LABEL_RULES:
        raise ValueError(f"missing_labels must be one of {MISSING_LABEL_RULES}, got {missing_labels!r}")
    per_label = (
        qualifying if qualifying is not None else candidates(labels, feedback, num_labels=num_labels, tau=tau)
    )
    counts = [len(p) for p in per_label if p or missing_labels == "empty"]
    m = min(min(counts, default=0), max_per_label)
    y = torch.tensor(list(labels), dtype=torch.long)

    def ranked(c: int) -> list[int]:  # every sample of label c, highest q first
        return _by_q(torch.nonzero(y == c).flatten(), feedback.q)

    if missing_labels == "fill":
        per_label = [p or ranked(c) for c, p in enumerate(per_label)]
    if 0 < m < min_per_label:
        m = min(min_per_label, max_per_label)
        per_label = [_top_up(p, ranked(c)) if p else p for c, p in enumerate(per_label)]
    return sorted(i for p in per_label for i in p[:m])


def label_separation(probs: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """mean_c [mean p(c|x) over texts meant as c  -  mean p(c|x) over texts meant as another label].

    0 when the scores do not depend on the intended label (an ensemble that predicts one label, or the
    prior, everywhere), 1 when it is certain and right. Unlike mean q it does not move with a bias toward
    one label, so it compares across tasks and label counts."""
    gaps = []
    for c in range(num_labels):
        mine, other = labels == c, labels != c
        if mine.any() and other.any():
            gaps.append(probs[mine, c].mean() - probs[other, c].mean())
    return float(torch.stack(gaps).mean()) if gaps else 0.0


@dataclass
class Signal:
    """Whether the SLM ensemble tells the intended labels apart on the scored pool."""

    separation: float
    upper: float  # the one-sided bootstrap upper bound of the separation
    found: bool
    reason: str  # why not, when not found


def label_signal(
    labels: Sequence[int],
    feedback: Feedback,
    *,
    num_labels: int,
    min_separation: float,
    confidence: float,
    resamples: int = 200,
    seed: int = 0,
) -> Signal:
    """No signal when the ensemble is sure to separate the labels by less than `min_separation`: the
    `confidence` upper bound of the separation, over `resamples` bootstrap draws of the pool's texts
    (within each label), is below it. A flat ensemble (every text scored alike) is caught on a few texts;
    a weak but noisy one, whose separation could be real, is given the benefit of the doubt."""
    y = torch.tensor(list(labels), dtype=torch.long)
    probs = feedback.ensemble_probs
    observed = label_separation(probs, y, num_labels)
    gen = torch.Generator().manual_seed(seed)
    groups = [torch.nonzero(y == c).flatten() for c in range(num_labels)]
    draws = []
    for _ in range(resamples):
        idx = torch.cat([g[torch.randint(len(g), (len(g),), generator=gen)] for g in groups if len(g)])
        draws.append(label_separation(probs[idx], y[idx], num_labels))
    upper = float(torch.tensor(draws).quantile(confidence)) if draws else observed
    found = upper >= min_separation
    reason = (
        ""
        if found
        else (
            f"label separation {observed:.3f}, {100 * confidence:.0f} % upper bound {upper:.3f}, is below {min_separation}"
        )
    )
    return Signal(observed, upper, found, reason)
