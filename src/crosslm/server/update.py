"""One CrossLM server update, the algorithm in one place (docs/algorithm.md states its formulation):

    generate -> score (the SLMs; the LLM and the generator as further labellers) -> tune the LLM -> distil the SLMs -> log

The server (server.py) keeps the registry of client SLMs, the synthetic pool and the LLM; `crosslm_update`
is its update for the CrossLM methods, as `baselines.py` holds the baselines' updates.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from crosslm.modeling.metrics import distinct_n
from crosslm.modeling.slm import fit
from crosslm.progress import note
from crosslm.protocol import WireMessage
from crosslm.seeding import pass_seed
from crosslm.server.feedback import (
    Feedback,
    Signal,
    candidates,
    combine,
    label_signal,
    label_weights,
    pool_calibrate,
    score,
    select_good,
    staleness_weights,
)
from crosslm.server.generate import GenerationStats, generate_samples, generator_scores
from crosslm.server.losses import kd_targets
from crosslm.server.tune_llm import tune_adapter
from crosslm.server.verbalizer import label_scores

if TYPE_CHECKING:
    from crosslm.server.server import CrossLMServer


@dataclass
class SyntheticExample:
    text: str
    label: int
    hash: str
    update: int  # the server update that generated it
    llm_version: int  # adapter version that wrote it (= updates completed before)
    slm_probs: list[float] | None = None  # the SLM ensemble's posterior at its last scoring
    llm_probs: list[float] | None = None  # the LLM's calibrated posterior, scored once before tuning on it
    gen_probs: list[float] | None = None  # the generator's calibrated posterior p(y|x) ~ p(x|P(y)), likewise


@dataclass
class Selection:
    """The pool scored by the SLM ensemble and the samples kept for the LLM's task loss and distillation."""

    feedback: Feedback
    good: list[int]  # S+: pool indices
    missing: list[int] = field(default_factory=list)  # labels with no qualifying sample


@dataclass
class DistillSet:
    """The texts a reply is distilled on, with their target distributions and loss weights."""

    indices: list[int]  # pool indices
    targets: torch.Tensor  # [n, C]
    weights: torch.Tensor | None = None  # [n], mean 1; None = every text alike


class PhaseTimer:
    """Records the seconds since the previous phase under each phase's name."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self.last, 2)
        self.last = now

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def staleness(server: CrossLMServer, u: int) -> dict[str, int]:
    """Updates since each hosted SLM's starting weights, as seen by update `u`."""
    return {m.client_id: max(u - 1 - m.base_version, 0) for m in server.models.values()}


def crosslm_update(server: CrossLMServer, triggers: list[str], u: int) -> list[tuple[str, WireMessage]]:
    """Update `u`, triggered by `triggers`' uploads; returns their enhanced SLMs."""
    timer = PhaseTimer()
    weights = ensemble_weights(server, u)
    new, gstats = generate(server, u)
    timer("generate")
    sel = select(server, weights)
    label_with_llm(server, new)
    log_samples(server, new, sel.feedback, u)
    signal = check_signal(server, sel, u)
    timer("feedback")
    guard: dict[str, Any] = {}
    if signal is None or signal.found:
        losses, guard = tune_llm(server, new, sel, u)
        dset = distillation_set(server, sel)
    else:  # the ensemble cannot tell the labels apart: its scores would teach noise to both sides
        sel.good, losses = [], {}
        dset = DistillSet([], torch.zeros(0, server.task.num_labels))
    timer("tune_llm")
    responses = [(cid, distil(server, cid, dset, u)) for cid in triggers]
    timer("distill")
    if losses and not guard.get("rolled_back") and server.cfg.tune.steps > 0:  # else the LLM is unchanged
        server.evaluate_llm(u)
    timer("evaluate_llm")
    event = update_event(server, u, triggers, weights, new, gstats, sel, losses, timer)
    event.update(signal_fields(signal), **guard, **distilled_fields(server, dset))
    if u == 1:  # whether the generator writes the user's kind of text shows in the first minutes
        event["samples_by_label"] = samples_by_label(server, new)
        note(first_update_line(event, server.task.labels))
    elif signal is not None and not signal.found:
        note(f"update {u}: no signal, the LLM and the SLMs are left as they are ({signal.reason})")
    server.log(event)
    server.log(distilled_event(server, dset, u, triggers))
    return responses


def ensemble_weights(server: CrossLMServer, u: int) -> dict[str, Any]:
    """w_j (one per client) or w_jc (per label, feedback.per_label_weights) as seen by update `u`."""
    fb, models = server.cfg.feedback, list(server.models.values())
    if fb.per_label_weights:
        return dict(label_weights(models, u - 1, fb.gamma))
    return dict(staleness_weights(models, u - 1, fb.gamma))


def check_signal(server: CrossLMServer, sel: Selection, u: int) -> Signal | None:
    """Whether the ensemble's scores carry the labels (None without feedback: nothing was scored)."""
    fb = server.cfg.feedback
    if not fb.enabled or not server.pool:
        return None
    return label_signal(pool_labels(server), sel.feedback, num_labels=server.task.num_labels,
                        min_separation=fb.min_separation, confidence=fb.signal_confidence,
                        seed=pass_seed(server.cfg.seed, "signal", u))  # fmt: skip


def signal_fields(signal: Signal | None) -> dict[str, Any]:
    if signal is None:
        return {}
    return {"label_separation": signal.separation, "separation_upper": signal.upper,
            "signal": signal.found, "no_signal_reason": signal.reason or None}  # fmt: skip


def generate(server: CrossLMServer, u: int) -> tuple[range, GenerationStats]:
    """Step 2: the LLM writes labelled samples into the pool; returns the new samples' pool indices."""
    samples, stats = generate_samples(
        server.llm,
        server.tokenizer,
        server.task,
        server.cfg.generation,
        seen=server.seen,
        seed=pass_seed(server.cfg.seed, "generate", u),
        snapshots=server.snapshots,
        examples=prompt_examples(server),
    )
    server.pool += [SyntheticExample(s.text, s.label, s.hash, u, u - 1) for s in samples]
    return range(len(server.pool) - len(samples), len(server.pool)), stats


def prompt_examples(server: CrossLMServer) -> dict[int, list[str]]:
    """Per label, the pool texts the SLM ensemble (at its last scoring) reads as that label, highest q
    first, at most generation.example_candidates: the in-context examples of the next prompts. Nothing
    without feedback or before the first scoring."""
    g = server.cfg.generation
    if g.examples_per_prompt <= 0 or not server.cfg.feedback.enabled:
        return {}
    out: dict[int, list[tuple[float, str]]] = {}
    for e in server.pool:
        if e.slm_probs is not None and argmax(e.slm_probs) == e.label:
            out.setdefault(e.label, []).append((e.slm_probs[e.label], e.text))
    return {y: [t for _, t in sorted(c, key=lambda x: -x[0])[: g.example_candidates]] for y, c in out.items()}


def select(server: CrossLMServer, weights: dict[str, Any]) -> Selection:
    """Step 3: the SLM ensemble scores the whole pool (it improves as SLMs arrive) and S+ is chosen;
    without feedback (KD without feedback) nothing is scored and every sample is kept with its label."""
    cfg, num_labels = server.cfg, server.task.num_labels
    texts, labels = pool_texts(server), pool_labels(server)
    if not cfg.feedback.enabled:
        return Selection(Feedback.unscored(len(texts), num_labels), list(range(len(texts))))
    tau = cfg.feedback.threshold(num_labels)
    fb = score(texts, labels, list(server.models.values()), weights, prior_correction=cfg.feedback.prior_correction,
               batch_size=cfg.eval.batch_size, max_length=cfg.clients.max_length,
               usable=undistilled(server) if cfg.feedback.exclude_distilled else None)  # fmt: skip
    keep_last_scores(server, fb, labels)
    qualifying = candidates(labels, fb, num_labels=num_labels, tau=tau)
    good = select_good(labels, fb, num_labels=num_labels, tau=tau, max_per_label=cfg.feedback.max_per_label,
                       missing_labels=cfg.feedback.missing_labels,
                       min_per_label=cfg.feedback.floor(num_labels, cfg.generation.samples_per_label),
                       qualifying=qualifying)  # fmt: skip
    return Selection(fb, good, [c for c, p in enumerate(qualifying) if not p])


def undistilled(server: CrossLMServer) -> dict[str, torch.Tensor]:
    """Per client, the pool texts its SLM may score: those written after the reply its weights descend
    from (base_version). An SLM distilled at update v may have been trained on any text from updates <= v,
    and would score it up because it learnt it: a confirmation loop."""
    written = torch.tensor([e.update for e in server.pool])
    return {m.client_id: written > m.base_version for m in server.models.values()}


def keep_last_scores(server: CrossLMServer, fb: Feedback, labels: list[int]) -> None:
    """A text no SLM may score keeps the ensemble's posterior from its last scoring; every other text's
    posterior is remembered for that. (Each text is scored when it is written: by SLMs from before it.)"""
    if fb.blind is not None and bool(fb.blind.any()):
        rows = torch.nonzero(fb.blind).flatten().tolist()
        uniform = [1.0 / fb.ensemble_probs.shape[1]] * fb.ensemble_probs.shape[1]  # never scored: no opinion
        last = [server.pool[i].slm_probs or uniform for i in rows]
        fb.ensemble_probs[rows] = torch.tensor(last, dtype=fb.ensemble_probs.dtype)
        fb.q[rows] = fb.ensemble_probs[rows, torch.tensor([labels[i] for i in rows])]
    for e, row in zip(server.pool, fb.ensemble_probs.tolist(), strict=True):
        e.slm_probs = row


def label_with_llm(server: CrossLMServer, new: range) -> None:
    """Step 3b: the LLM as a further labeller (distill.labeller names llm and/or generator). Each new text
    gets the LLM's verbalizer posterior and/or the generator's posterior p(y|x) ~ p(x|P(y)) once, now,
    before the LLM is tuned on it, each calibrated over this update's label-balanced new texts (a label
    bias removed as the SLMs' label prior is)."""
    cfg = server.cfg
    parts = cfg.distill.labellers
    if not cfg.feedback.enabled or not len(new) or parts == ("slms",):
        return
    texts = [server.pool[i].text for i in new]
    if "llm" in parts:
        scores = label_scores(server.eval_model(), server.tokenizer, server.task, texts,
                              max_text_tokens=cfg.llm.max_text_tokens, batch_size=cfg.eval.batch_size,
                              progress=True)  # fmt: skip
        for i, row in zip(new, calibrated_rows(scores), strict=True):
            server.pool[i].llm_probs = row
    if "generator" in parts:
        scores = generator_scores(server.eval_model(), server.tokenizer, server.task, texts,
                                  batch_size=cfg.eval.batch_size)  # fmt: skip
        for i, row in zip(new, calibrated_rows(scores), strict=True):
            server.pool[i].gen_probs = row


def calibrated_rows(scores: torch.Tensor) -> list[list[float]]:
    return pool_calibrate(torch.softmax(scores.float().cpu(), dim=-1)).tolist()


def labeller_posterior(server: CrossLMServer, sel: Selection) -> torch.Tensor:
    """[N, C] the posterior distill.labeller names: one labeller's, or the normalised product of several."""
    uniform = [1.0 / server.task.num_labels] * server.task.num_labels
    posteriors = {
        "slms": lambda: sel.feedback.ensemble_probs,
        "llm": lambda: torch.tensor([e.llm_probs or uniform for e in server.pool]),
        "generator": lambda: torch.tensor([e.gen_probs or uniform for e in server.pool]),
    }
    chosen = [posteriors[p]() for p in server.cfg.distill.labellers]
    return chosen[0] if len(chosen) == 1 else combine(*chosen)


def distillation_set(server: CrossLMServer, sel: Selection) -> DistillSet:
    """Step 5a: what the SLMs are distilled on.

    - `splus`: S+ (class-balanced by count), target (1 - mu) onehot(y) + mu softmax(log r / T).
    - `pool`: every pool text whose labeller posterior r agrees with its intended label (a label with no
      such text gets its highest-r texts, when feedback.missing_labels is fill), the same target, and loss
      weights r(y|x) normalised so that every label carries the same total weight.
    Without feedback every text keeps its intended label (KD without feedback), balanced the same way."""
    d, num_labels = server.cfg.distill, server.task.num_labels
    y = torch.tensor(pool_labels(server), dtype=torch.long)
    if not server.cfg.feedback.enabled:
        idx = list(range(len(y)))
        posterior = sel.feedback.ensemble_probs
        weights = balanced_weights(y, torch.ones(len(y))) if d.source == "pool" and len(y) else None
    else:
        posterior = labeller_posterior(server, sel)
        if d.source == "splus":
            idx, weights = list(sel.good), None
        else:
            idx, weights = pool_selection(
                y, posterior, num_labels, d.agreement, server.cfg.feedback.missing_labels
            )
    if not idx:
        return DistillSet([], torch.zeros(0, num_labels))
    rows = torch.tensor(idx)
    targets = kd_targets(
        y[rows], torch.log(posterior[rows].clamp(min=1e-12)), mu=d.mu, temperature=d.temperature
    )
    return DistillSet(idx, targets, weights)


def pool_selection(
    y: torch.Tensor, posterior: torch.Tensor, num_labels: int, agreement: bool, missing_labels: str
) -> tuple[list[int], torch.Tensor | None]:
    """The pool texts to distil and their class-balanced, quality-weighted loss weights."""
    quality = posterior.gather(1, y.unsqueeze(1)).squeeze(1)
    keep = posterior.argmax(-1) == y if agreement else torch.ones(len(y), dtype=torch.bool)
    per_label = [torch.nonzero(keep & (y == c)).flatten() for c in range(num_labels)]
    present = [len(p) for p in per_label if len(p)]
    if not present or (missing_labels == "empty" and len(present) < len(per_label)):
        return [], None
    if missing_labels == "fill":  # a label the labeller never confirms still gets its best candidates
        m = min(present)
        for c, p in enumerate(per_label):
            if not len(p):
                mine = torch.nonzero(y == c).flatten()
                per_label[c] = mine[torch.argsort(quality[mine], descending=True)[:m]]
    idx = torch.cat(per_label).sort().values
    return idx.tolist(), balanced_weights(y[idx], quality[idx])


def balanced_weights(y: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """w_i = quality_i / (sum of quality over label y_i's texts), scaled to mean 1: every label present
    carries the same total weight, and within a label the surer texts weigh more."""
    w = torch.zeros(len(y))
    labels = y.unique()
    for c in labels:
        mine = y == c
        w[mine] = quality[mine] / quality[mine].sum().clamp(min=1e-12)
    return w * len(y) / len(labels)


def tune_llm(
    server: CrossLMServer, new: range, sel: Selection, u: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Step 4: tune the LLM's adapter on this update's samples (L_QG, L_PR) and on S+ (L_task). An update
    after which the LLM calls (nearly) every text of a label-balanced sample of S+ by one label, when it
    did not before, is undone: the adapter goes back to its weights before this update."""
    texts, labels, q = pool_texts(server), pool_labels(server), sel.feedback.q
    probe = collapse_probe(server, sel)
    before = majority_share(server, probe) if probe else None
    saved = (
        {n: p.detach().clone() for n, p in server.llm.named_parameters() if p.requires_grad} if probe else {}
    )
    losses = tune_adapter(
        server.llm,
        server.tokenizer,
        server.task,
        [(texts[i], labels[i], float(q[i])) for i in new],
        [(texts[i], labels[i]) for i in sel.good],
        server.cfg.tune,
        max_text_tokens=server.cfg.llm.max_text_tokens,
        tau=server.cfg.feedback.threshold(server.task.num_labels),
        seed=pass_seed(server.cfg.seed, "tune_llm", u),
        other=[other_label_share(sel.feedback, i, labels[i]) for i in new],
    )
    if before is None:
        return losses, {}
    after = majority_share(server, probe)
    limit = server.cfg.tune.collapse_share
    rolled_back = after >= limit > before
    if rolled_back:
        with torch.no_grad():  # an in-place copy: the snapshot cache sees the weights change back
            for n, p in server.llm.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        note(f"update {u}: the LLM's update was undone (it called {100 * after:.0f} % of S+ one label)")
    return losses, {"llm_majority_share": [before, after], "rolled_back": rolled_back}


def other_label_share(fb: Feedback, i: int, y: int) -> float:
    """The SLM ensemble's highest probability of a label other than y for pool text i."""
    row = fb.ensemble_probs[i].clone()
    row[y] = -1.0
    return float(row.max())


def collapse_probe(server: CrossLMServer, sel: Selection, per_label: int = 16) -> list[str]:
    """Up to `per_label` S+ texts of each label (highest q first), when S+ holds two labels or more."""
    labels, q = pool_labels(server), sel.feedback.q
    if server.cfg.tune.collapse_share >= 1 or server.cfg.tune.steps == 0:
        return []
    by_label: dict[int, list[int]] = {}
    for i in sorted(sel.good, key=lambda i: -float(q[i])):
        by_label.setdefault(labels[i], []).append(i)
    if len(by_label) < 2:
        return []
    return [server.pool[i].text for idx in by_label.values() for i in idx[:per_label]]


def majority_share(server: CrossLMServer, texts: list[str]) -> float:
    """The share of `texts` the LLM (its raw verbalizer prediction) gives its most predicted label."""
    cfg = server.cfg
    scores = label_scores(server.eval_model(), server.tokenizer, server.task, texts,
                          max_text_tokens=cfg.llm.max_text_tokens, batch_size=cfg.eval.batch_size)  # fmt: skip
    counts = torch.bincount(scores.argmax(-1), minlength=server.task.num_labels)
    return float(counts.max()) / len(texts)


def distil(server: CrossLMServer, cid: str, dset: DistillSet, u: int) -> WireMessage:
    """Step 5b: distil the distillation set into a copy of client `cid`'s latest SLM (the registry keeps
    the uploaded one) and encode it as the reply that goes back to the client."""
    m = server.models[cid]
    student = copy.deepcopy(m.model)
    if dset.indices:
        d = server.cfg.distill
        texts = pool_texts(server)
        fit(student, m.tokenizer, [texts[i] for i in dset.indices], dset.targets, epochs=d.epochs, lr=d.lr,
            batch_size=d.batch_size, max_length=server.cfg.clients.max_length, max_steps=d.steps or None,
            sample_weights=dset.weights, seed=pass_seed(server.cfg.seed, "distil", u), desc=f"distil {cid}",
            autocast=d.autocast)  # fmt: skip
    return server.reply(cid, student, student.state_dict(), u)


def distilled_fields(server: CrossLMServer, dset: DistillSet) -> dict[str, Any]:
    """The distillation set's size per label (by its targets' most likely label) for the update event."""
    per_label = (
        torch.bincount(dset.targets.argmax(-1), minlength=server.task.num_labels) if dset.indices else None
    )
    fields: dict[str, Any] = {
        "distilled_size": len(dset.indices),
        "distilled_per_label": per_label.tolist() if per_label is not None else [0] * server.task.num_labels,
    }
    for key, probs in (
        ("llm_agreement", lambda e: e.llm_probs),
        ("generator_agreement", lambda e: e.gen_probs),
    ):
        hits = [argmax(p) == e.label for e in server.pool if (p := probs(e)) is not None]
        if hits:  # how often that labeller confirms the intended label, over the pool
            fields[key] = sum(hits) / len(hits)
    return fields


def distilled_event(server: CrossLMServer, dset: DistillSet, u: int, triggers: list[str]) -> dict[str, Any]:
    """Which texts the update's replies were distilled on (content hashes), with the label their target
    favours and their loss weight: what a judge's label fidelity of the distilled data is measured on."""
    weights = dset.weights.tolist() if dset.weights is not None else [1.0] * len(dset.indices)
    return {"event": "distilled", "update": u, "clients": triggers,
            "hashes": [server.pool[i].hash for i in dset.indices],
            "labels": dset.targets.argmax(-1).tolist() if dset.indices else [],
            "weights": [round(w, 4) for w in weights]}  # fmt: skip


def log_samples(server: CrossLMServer, new: range, fb: Feedback, u: int) -> None:
    """Every new synthetic sample with its score, each SLM's probability and the model versions."""
    versions = {m.client_id: m.round for m in server.models.values()}
    for i in new:
        e = server.pool[i]
        server.log_synthetic(
            {
                "text": e.text,
                "label": server.task.labels[e.label],
                "q": float(fb.q[i]),
                "slm_probs": {cid: float(p[i, e.label]) for cid, p in fb.per_client.items()},
                **({"llm_q": e.llm_probs[e.label]} if e.llm_probs is not None else {}),
                **({"generator_q": e.gen_probs[e.label]} if e.gen_probs is not None else {}),
                "update": u,
                "llm_version": e.llm_version,
                "slm_versions": versions,
                "hash": e.hash,
            }
        )


def update_event(
    server: CrossLMServer,
    u: int,
    triggers: list[str],
    weights: dict[str, float],
    new: range,
    gstats: GenerationStats,
    sel: Selection,
    losses: dict[str, Any],
    timer: PhaseTimer,
) -> dict[str, Any]:
    """The update's `server_update` event for metrics.jsonl."""
    labels, num_labels = pool_labels(server), server.task.num_labels
    tau = server.cfg.feedback.threshold(num_labels)
    new_q = sel.feedback.q[list(new)] if len(new) else torch.zeros(0)
    return {
        "event": "server_update",
        "update": u,
        "trigger_clients": triggers,
        "weights": weights,
        "staleness": staleness(server, u),
        "generated": gstats.generated,
        "kept": gstats.kept,
        "gen_tokens_per_s": gstats.tokens_per_s,
        "gen_dtype": gstats.dtype,
        "distinct2": distinct_n([server.pool[i].text for i in new], 2),
        "mean_q": float(new_q.mean()) if len(new_q) else float("nan"),
        "chance_q": 1.0 / num_labels,
        "ensemble_agreement": agreement(server, new, sel),
        "tau": tau,
        "share_q_ge_tau": float((new_q >= tau).float().mean()) if len(new_q) else float("nan"),
        "pool_size": len(server.pool),
        "splus_size": len(sel.good),
        "splus_per_label": [sum(1 for i in sel.good if labels[i] == c) for c in range(num_labels)],
        "labels_without_candidates": [server.task.labels[c] for c in sel.missing],
        "loss": losses,
        "seconds": timer.seconds,
        "phase_seconds": timer.phases,
    }


def agreement(server: CrossLMServer, new: range, sel: Selection) -> float:
    """Share of the new samples whose intended label is the SLM ensemble's prediction (NaN unscored)."""
    if not server.cfg.feedback.enabled or not len(new):
        return float("nan")
    predicted = sel.feedback.predicted[list(new)]
    intended = torch.tensor([server.pool[i].label for i in new])
    return float((predicted == intended).float().mean())


def samples_by_label(
    server: CrossLMServer, new: range, per_label: int = 2, chars: int = 160
) -> dict[str, list[str]]:
    """The first few new samples of each label, cut short: a look at what the generator writes."""
    out: dict[str, list[str]] = {name: [] for name in server.task.labels}
    for i in new:
        e = server.pool[i]
        shown = out[server.task.labels[e.label]]
        if len(shown) < per_label:
            shown.append(e.text if len(e.text) <= chars else e.text[: chars - 3] + "...")
    return out


def first_update_line(event: dict[str, Any], labels: tuple[str, ...]) -> str:
    """The first update in a few lines: mean q against chance, the ensemble's agreement, sample texts."""
    lines = [
        f"update 1: mean q {event['mean_q']:.2f} (chance {event['chance_q']:.2f}); the SLM ensemble agrees with "
        f"{100 * event['ensemble_agreement']:.0f} % of the intended labels; S+ holds {event['splus_size']} texts"
    ]
    for label, texts in event.get("samples_by_label", {}).items():
        lines += [f"  {label}: {t!r}" for t in texts]
    return "\n".join(lines)


def argmax(p: list[float]) -> int:
    return max(range(len(p)), key=p.__getitem__)


def pool_texts(server: CrossLMServer) -> list[str]:
    return [e.text for e in server.pool]


def pool_labels(server: CrossLMServer) -> list[int]:
    return [e.label for e in server.pool]
