"""One CrossLM server update, the algorithm in one place (docs/algorithm.md states its formulation):

    generate -> score -> tune the LLM -> distil the SLMs -> log

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
from crosslm.precision import resolve_dtype
from crosslm.progress import note
from crosslm.protocol import WireMessage
from crosslm.seeding import pass_seed
from crosslm.server.feedback import (
    Feedback,
    Signal,
    candidates,
    label_signal,
    score,
    select_good,
    staleness_weights,
)
from crosslm.server.generate import GenerationStats, generate_samples
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


@dataclass
class Selection:
    """The pool scored by the SLM ensemble and the samples kept for the LLM's task loss and distillation."""

    feedback: Feedback
    good: list[int]  # S+: pool indices
    missing: list[int] = field(default_factory=list)  # labels with no qualifying sample


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
    weights = staleness_weights(list(server.models.values()), u - 1, server.cfg.feedback.gamma)
    new, gstats = generate(server, u)
    timer("generate")
    sel = select(server, weights)
    log_samples(server, new, sel.feedback, u)
    signal = check_signal(server, sel, u)
    timer("feedback")
    guard: dict[str, Any] = {}
    if signal is None or signal.found:
        losses, guard = tune_llm(server, new, sel, u)
    else:  # the ensemble cannot tell the labels apart: its scores would teach noise to both sides
        sel.good, losses = [], {}
    timer("tune_llm")
    responses = [(cid, distil(server, cid, sel, u)) for cid in triggers]
    timer("distill")
    if losses and not guard.get("rolled_back") and server.cfg.tune.steps > 0:  # else the LLM is unchanged
        server.evaluate_llm(u)
    timer("evaluate_llm")
    event = update_event(server, u, triggers, weights, new, gstats, sel, losses, timer)
    event.update(signal_fields(signal), **guard)
    if u == 1:  # whether the generator writes the user's kind of text shows in the first minutes
        event["samples_by_label"] = samples_by_label(server, new)
        note(first_update_line(event, server.task.labels))
    elif signal is not None and not signal.found:
        note(f"update {u}: no signal, the LLM and the SLMs are left as they are ({signal.reason})")
    server.log(event)
    return responses


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
    )
    server.pool += [SyntheticExample(s.text, s.label, s.hash, u, u - 1) for s in samples]
    return range(len(server.pool) - len(samples), len(server.pool)), stats


def select(server: CrossLMServer, weights: dict[str, float]) -> Selection:
    """Step 3: the SLM ensemble scores the whole pool (it improves as SLMs arrive) and S+ is chosen;
    without feedback (KD without feedback) nothing is scored and every sample is kept with its label."""
    cfg, num_labels = server.cfg, server.task.num_labels
    texts, labels = pool_texts(server), pool_labels(server)
    if not cfg.feedback.enabled:
        return Selection(Feedback.unscored(len(texts), num_labels), list(range(len(texts))))
    tau = cfg.feedback.threshold(num_labels)
    fb = score(texts, labels, list(server.models.values()), weights, prior_correction=cfg.feedback.prior_correction,
               batch_size=cfg.eval.batch_size, max_length=cfg.clients.max_length)  # fmt: skip
    qualifying = candidates(labels, fb, num_labels=num_labels, tau=tau)
    good = select_good(labels, fb, num_labels=num_labels, tau=tau, max_per_label=cfg.feedback.max_per_label,
                       missing_labels=cfg.feedback.missing_labels, min_per_label=cfg.feedback.min_per_label,
                       qualifying=qualifying)  # fmt: skip
    return Selection(fb, good, [c for c, p in enumerate(qualifying) if not p])


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
    model = server.snapshots.get(server.llm, resolve_dtype(cfg.eval.llm_dtype, server.device))
    scores = label_scores(model, server.tokenizer, server.task, texts,
                          max_text_tokens=cfg.llm.max_text_tokens, batch_size=cfg.eval.batch_size)  # fmt: skip
    counts = torch.bincount(scores.argmax(-1), minlength=server.task.num_labels)
    return float(counts.max()) / len(texts)


def distil(server: CrossLMServer, cid: str, sel: Selection, u: int) -> WireMessage:
    """Step 5: distil S+ into a copy of client `cid`'s latest SLM (the registry keeps the uploaded one)
    and encode it as the reply that goes back to the client."""
    m = server.models[cid]
    student = copy.deepcopy(m.model)
    if sel.good:
        d = server.cfg.distill
        texts, labels = pool_texts(server), pool_labels(server)
        targets = kd_targets(torch.tensor([labels[i] for i in sel.good]), sel.feedback.ensemble_logits[sel.good],
                             mu=d.mu, temperature=d.temperature)  # fmt: skip
        fit(student, m.tokenizer, [texts[i] for i in sel.good], targets, epochs=d.epochs, lr=d.lr,
            batch_size=d.batch_size, max_length=server.cfg.clients.max_length,
            seed=pass_seed(server.cfg.seed, "distil", u), desc=f"distil {cid}", autocast=d.autocast)  # fmt: skip
    return server.reply(cid, student, student.state_dict(), u)


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


def pool_texts(server: CrossLMServer) -> list[str]:
    return [e.text for e in server.pool]


def pool_labels(server: CrossLMServer) -> list[int]:
    return [e.label for e in server.pool]
