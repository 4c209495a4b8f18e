"""The server's steps of one CrossLM update on a generation task (docs/algorithm.md, "Generation tasks"):

    generate pairs -> score them (the clients' causal SLMs) -> tune the LLM -> distil into the SLMs

The classification update (update.py) samples texts for a label and asks the SLMs which label they carry.
Here the LLM writes (input, target) pairs for a condition (a topic), and a client's SLM scores a pair by how
well it writes the target from the input: its mean log-likelihood per target token. Those scores are not
comparable across clients of different depths, so each client's scores become percentile ranks before the
ensemble averages them into q in [0, 1], which L_QG uses as it is.

These steps are functions with their own tests; `generation_update` runs them in sequence on explicit
objects, and `crosslm_generation_update` is the server's update for a generation task (server.py's UPDATES):
it runs them on the server's registry and pool, logs what happened and encodes the replies.
"""

from __future__ import annotations

import copy
import functools
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from crosslm import precision
from crosslm.catalogue.datasets import cut_at_word
from crosslm.config import DistillConfig, GenerationConfig, RunConfig, TuneConfig
from crosslm.evaluation.generation import distinct_2, rouge_l
from crosslm.modeling.causal_slm import (
    PairFormat,
    encode_pairs,
    fit_pairs,
    mean_target_loglik,
)
from crosslm.modeling.llm_text import (
    answer_ids,
    continuation_logprobs,
    gather_logprobs,
    next_token_logits,
    pair_batch,
    truncate_text,
    user_prompt_ids,
)
from crosslm.progress import note, progress
from crosslm.seeding import own_rng, pass_seed
from crosslm.server.decoding import SnapshotCache, sample_tokens, sampling_snapshot
from crosslm.server.feedback import ClientModel, staleness_weights
from crosslm.server.generate import GenerationStats, clean_sample, content_hash, sample_answers
from crosslm.server.losses import qg_weights
from crosslm.server.tune_llm import QGItem, tune_steps
from crosslm.server.update import PhaseTimer, balanced_weights, staleness
from crosslm.task import GenerationPairs, TaskSpec

if TYPE_CHECKING:
    from crosslm.protocol import WireMessage
    from crosslm.server.server import CrossLMServer

DROP_REASONS = ("too_short", "empty_target", "truncated", "target_too_long", "duplicate")
"""Why a generated story is not kept as a pair, in the order the checks run:
too_short       the story has fewer than generation.min_words words once cleaned;
empty_target    the LLM's target for it is empty;
truncated       the token budget ran out on the target's line: it may be cut;
target_too_long the target is longer than data.max_target_chars (real targets longer are refused too);
duplicate       the story or the target was written before (this update or an earlier one)."""


# -- 1. pairs ---------------------------------------------------------------------------------------------


@dataclass
class GeneratedPair:
    input: str
    target: str
    condition: int
    hash: str  # content hash of the input: the pair's identity in the logs


@dataclass
class PairStats(GenerationStats):
    dropped: dict[str, int] = field(default_factory=dict)
    """Stories not kept as pairs, by reason (DROP_REASONS; every reason present, 0 when none)."""


_QUOTE_PAIRS = {'""', "''", "\u201c\u201d", "\u2018\u2019"}


def clean_line(text: str) -> str:
    """One part of a pair: whitespace collapsed, markdown emphasis at its ends and quotes around it removed."""
    text = " ".join(text.split()).strip("*_` ")
    if len(text) >= 2 and text[0] + text[-1] in _QUOTE_PAIRS:
        text = text[1:-1].strip()
    return text


def marker_pattern(word: str) -> re.Pattern[str]:
    """A line that starts with 'Word:' (any case), allowing markdown around it ('**Headline:**', '# Story:')."""
    return re.compile(rf"^[ \t*#>_-]*{re.escape(word)}[ \t*_]*:[ \t*_]*", re.IGNORECASE | re.MULTILINE)


def clean_story(answer: str, task: TaskSpec, *, truncated: bool, min_words: int, max_chars: int) -> str:
    """The input of a pair from the LLM's answer to P(c): a leading '{Input}:' marker and anything from a
    '{Target}:' line on removed (the LLM writes the target separately), cleaned as a classification sample
    is (a preamble line ending in ':' dropped, an unfinished last sentence cut), then cut at a word to
    `max_chars` (data.max_input_chars) as the real inputs are; '' when under `min_words` words."""
    text = answer.strip()
    end = marker_pattern(task.target_marker).search(text)
    text = text[: end.start()] if end else text
    start = marker_pattern(task.input_marker).search(text)
    text = clean_line(clean_sample(text[start.end() :] if start else text, truncated, min_words))
    text = cut_at_word(text, max_chars) if max_chars else text
    return text if len(text.split()) >= min_words else ""


def pair_keys(source: str, target: str) -> tuple[str, str]:
    """The `seen` keys of a pair: its input's and its target's content hashes. A pair repeats an earlier
    one when either repeats: the real data keeps each story once and each headline once, too."""
    return content_hash(source), "target:" + content_hash(target)


@torch.no_grad()
def write_targets(
    snapshot: Any, tokenizer: Any, task: TaskSpec, inputs: Sequence[str], *, max_new_tokens: int,
    max_text_tokens: int, batch_size: int = 16,
) -> list[tuple[str, bool]]:  # fmt: skip
    """The LLM's greedy target for each input as its answer to `target_prompt` (L_task's prompt): the
    answer's first non-empty line, a leading '{Target}:' and quotes removed, with whether that line was
    finished (a later line or the end-of-sequence token followed it) rather than cut by the token budget.
    Batched by similar prompt length."""
    prompts = [target_prompt_ids(tokenizer, task, x, max_text_tokens) for x in inputs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple[str, bool]] = [("", True)] * len(prompts)
    prefix = marker_pattern(task.target_marker)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        rows = sample_tokens(snapshot, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                             temperature=1.0, top_p=1.0, eos_id=tokenizer.eos_token_id,
                             pad_id=tokenizer.pad_token_id, greedy=True)  # fmt: skip
        for i, row in zip(idx, rows, strict=True):
            lines = [ln for ln in tokenizer.decode(row, skip_special_tokens=True).split("\n") if ln.strip()]
            finished = tokenizer.eos_token_id in row or len(lines) > 1
            out[i] = (clean_line(prefix.sub("", lines[0], count=1)) if lines else "", finished)
    return out


def generate_pairs(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    cfg: GenerationConfig,
    *,
    seen: set[str],
    seed: int,
    max_input_chars: int,
    max_target_chars: int,
    max_target_tokens: int,
    max_text_tokens: int,
    snapshots: SnapshotCache | None = None,
) -> tuple[list[GeneratedPair], PairStats]:
    """The LLM writes pairs in two steps: cfg.samples_per_label stories for each condition's prompt P(c)
    (`TaskSpec.prompt_for`), sampled as classification samples are (`sample_answers`) and cleaned
    (`clean_story`); then the target of each story, greedily, as its answer to `target_prompt`, the prompt
    it is tuned (L_task) and evaluated with (`write_targets`). Two short instructions are followed where
    one asking for both in a format is not: SmolLM2-135M-Instruct wrote the format in none of 15 answers.
    `seen` (pair_keys) is updated in place; the stats count what was dropped and why."""
    device = precision.model_device(model)
    dtype = precision.resolve_dtype(cfg.dtype, device)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    with own_rng(seed, device):  # every draw from `seed` alone; the global RNG is left as it was
        t0 = time.perf_counter()
        snapshot = sampling_snapshot(model, dtype, snapshots)
        jobs = [c for c in range(task.num_labels) for _ in range(cfg.samples_per_label)]
        prompts = {c: user_prompt_ids(tokenizer, task.prompt_for(c)) for c in range(task.num_labels)}
        rows = sample_answers(snapshot, tokenizer, [prompts[c] for c in jobs], cfg, desc="generate stories")
        stories: list[tuple[int, str]] = []
        written: set[str] = set()  # this update's stories so far, by content hash
        for c, row in zip(jobs, rows, strict=True):
            story = clean_story(tokenizer.decode(row, skip_special_tokens=True), task,
                                truncated=tokenizer.eos_token_id not in row, min_words=cfg.min_words,
                                max_chars=max_input_chars)  # fmt: skip
            h = content_hash(story)
            if not story:
                dropped["too_short"] += 1
            elif h in seen or h in written:
                dropped["duplicate"] += 1
            else:
                written.add(h)
                stories.append((c, story))
        targets = write_targets(snapshot, tokenizer, task, [x for _, x in stories],
                                max_new_tokens=max_target_tokens, max_text_tokens=max_text_tokens,
                                batch_size=cfg.batch_size)  # fmt: skip
    kept: list[GeneratedPair] = []
    for (c, story), (target, finished) in zip(stories, targets, strict=True):
        keys = pair_keys(story, target)
        reason = (
            "empty_target" if not target
            else "truncated" if not finished
            else "target_too_long" if len(target) > max_target_chars
            else "duplicate" if any(k in seen for k in keys)
            else ""
        )  # fmt: skip
        if reason:
            dropped[reason] += 1
            continue
        seen.update(keys)
        kept.append(GeneratedPair(story, target, c, keys[0]))
    tokens = sum(len(r) for r in rows)
    stats = PairStats(len(jobs), len(kept), tokens, time.perf_counter() - t0, precision.dtype_name(dtype),
                      dropped=dropped)  # fmt: skip
    return kept, stats


# -- 2. feedback ------------------------------------------------------------------------------------------


def percentile_ranks(scores: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
    """Each score's mid-rank percentile within its group, in [0, 1]: (scores below + half the other equal
    scores) / (group size - 1); 0.5 for a group of one. Unchanged by any increasing transform of the scores."""
    scores = scores.float().cpu()
    keys = torch.tensor(list(groups)) if groups is not None else torch.zeros(len(scores), dtype=torch.long)
    out = torch.empty(len(scores))
    for g in keys.unique():
        idx = torch.nonzero(keys == g).flatten()
        s = scores[idx]
        if len(idx) == 1:
            out[idx] = 0.5
            continue
        below = (s.unsqueeze(0) < s.unsqueeze(1)).sum(1).float()  # row i: how many scores are below s_i
        equal = (s.unsqueeze(0) == s.unsqueeze(1)).sum(1).float() - 1.0
        out[idx] = (below + 0.5 * equal) / (len(idx) - 1)
    return out


@dataclass
class PairFeedback:
    q: torch.Tensor  # [N] sum_j w_j rank_j(x), in [0, 1]
    loglik: dict[str, torch.Tensor]  # client_id -> [N] mean log-likelihood per target token
    ranks: dict[str, torch.Tensor]  # client_id -> [N] its percentile ranks
    weights: dict[str, float]  # the w_j used (renormalised over the clients that scored)


@torch.no_grad()
def score_pairs(
    inputs: Sequence[str],
    targets: Sequence[str],
    conditions: Sequence[int],
    models: Sequence[ClientModel],
    weights: Mapping[str, float],
    *,
    fmt: PairFormat,
    within_condition: bool = True,
    batch_size: int = 32,
) -> PairFeedback:
    """q(x) = sum_j w_j rank_j(x): client j's score of pair x is its mean log-likelihood per target token
    (`mean_target_loglik`), turned into x's percentile rank among the scores j gives the pool's pairs (of
    x's condition, with `within_condition`).

    Why ranks: a 12-layer SLM gives every target a higher log-likelihood than a 6-layer one, and how much
    higher varies with the text, so raw scores would let the deeper client outvote the other. A percentile
    rank is uniform on [0, 1] for every client whatever its depth, is unchanged by any increasing transform
    of its scores (a constant offset, a scale), and is not squashed by a few very unlikely pairs, which a
    z-score is (their outlying scores inflate the spread). The price is that q is relative to the pool: it
    ranks what was written and says nothing of its absolute quality. Ranking within a condition removes a
    client's preference for the topics it holds (as 'pool' prior correction does for classification)."""
    if not models:
        raise ValueError("score_pairs needs at least one client model")
    loglik, ranks = {}, {}
    groups = list(conditions) if within_condition else None
    for m in models:
        loglik[m.client_id] = mean_target_loglik(m.model, m.tokenizer, inputs, targets, fmt=fmt,
                                                 batch_size=batch_size)  # fmt: skip
        ranks[m.client_id] = percentile_ranks(loglik[m.client_id], groups)
    total = sum(float(weights[m.client_id]) for m in models)
    if total <= 0:
        raise ValueError(f"the clients' weights sum to {total}; at least one must be positive")
    used = {m.client_id: float(weights[m.client_id]) / total for m in models}
    q = sum((used[cid] * r for cid, r in ranks.items()), torch.zeros(len(inputs)))
    return PairFeedback(q.clamp(0.0, 1.0), loglik, ranks, used)


def select_pairs(
    conditions: Sequence[int], q: torch.Tensor, *, num_conditions: int, tau: float, max_per_condition: int
) -> list[list[int]]:
    """S+ per condition: the pool indices with q >= tau, highest q first (ties: pool order), at most
    `max_per_condition` of each. Unlike classification's `select_good`, there is no label to confirm (no
    ensemble argmax) and S+ is not cut to the smallest condition's count: distillation balances the
    conditions by weight instead (`balanced_weights`)."""
    out: list[list[int]] = [[] for _ in range(num_conditions)]
    for i in sorted(range(len(conditions)), key=lambda i: (-float(q[i]), i)):
        c = conditions[i]
        if float(q[i]) >= tau and len(out[c]) < max_per_condition:
            out[c].append(i)
    return out


# -- 3. tuning the LLM ------------------------------------------------------------------------------------


def target_prompt_ids(tokenizer: Any, task: TaskSpec, text: str, max_text_tokens: int) -> list[int]:
    """The LLM's chat prompt asking for the target of `text` (cut to `max_text_tokens`)."""
    return user_prompt_ids(tokenizer, task.target_prompt(truncate_text(tokenizer, text, max_text_tokens)))


def llm_target_logprobs(
    model: Any, tokenizer: Any, task: TaskSpec, inputs: Sequence[str], targets: Sequence[str], *,
    max_text_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(summed log-probability of each target's tokens, closing end-of-turn token included, as the LLM's
    answer to `target_prompt`, [B]; their number [B]), with gradients. Only the answer's tokens are scored:
    the prompt is context, never a target."""
    prompts = [target_prompt_ids(tokenizer, task, x, max_text_tokens) for x in inputs]
    batch = pair_batch(prompts, [answer_ids(tokenizer, y) for y in targets], tokenizer.pad_token_id,
                       precision.model_device(model))  # fmt: skip
    mask = batch.target_mask.float()
    return (continuation_logprobs(model, batch) * mask).sum(-1), mask.sum(-1)


def generation_task_loss(
    model: Any, tokenizer: Any, task: TaskSpec, inputs: Sequence[str], targets: Sequence[str], *,
    max_text_tokens: int,
) -> torch.Tensor:  # fmt: skip
    """L_task for generation: mean over pairs of the mean negative log-likelihood per target token of the
    LLM writing the target for the input (every pair counts once, whatever its length)."""
    total, count = llm_target_logprobs(
        model, tokenizer, task, inputs, targets, max_text_tokens=max_text_tokens
    )
    return (-total / count.clamp(min=1.0)).mean()


def tune_generation_adapter(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    generated: Sequence[tuple[str, str, int, float]],
    good: Sequence[tuple[str, str]],
    cfg: TuneConfig,
    *,
    max_text_tokens: int,
    tau: float,
    seed: int,
) -> dict[str, float]:
    """One generation update's adapter tuning (`tune_steps`, the loop classification shares).
    `generated` = this update's pairs as (input, target, condition, q); L_QG and L_PR read each pair as the
    two answers the LLM wrote it with (`generate_pairs`), both weighted by the pair's q: the story as its
    answer to P(condition), the target as its answer to `target_prompt(story)`. `good` = S+ as (input,
    target): L_task tunes the LLM to write each target from its input. tune.qg_form 'centred' has no unlikelihood term here (there is no
    other label for the SLMs to read a pair as). Returns the mean of each loss term over the steps."""
    if cfg.steps == 0 or not generated:
        return {"total": 0.0, "qg": 0.0, "task": 0.0, "pr": 0.0}
    q = torch.tensor([g[3] for g in generated], dtype=torch.float)
    conditions = torch.tensor([g[2] for g in generated])
    up, down = qg_weights(
        q, conditions, torch.zeros(len(generated)), form=cfg.qg_form, tau=tau, hard=cfg.hard
    )
    prompts = {c: user_prompt_ids(tokenizer, task.prompt_for(c)) for c in range(task.num_labels)}
    items = [
        item
        for (x, y, c, _), a, b in zip(generated, up, down, strict=True)
        for item in (
            QGItem(prompts[c], answer_ids(tokenizer, x), float(a), float(b)),
            QGItem(
                target_prompt_ids(tokenizer, task, x, max_text_tokens),
                answer_ids(tokenizer, y),
                float(a),
                float(b),
            ),
        )
    ]

    def task_step(rng: Any, amp: Any) -> torch.Tensor | None:
        if not good:
            return None
        picked = rng.sample(list(good), min(cfg.task_batch_size, len(good)))
        with amp:
            return generation_task_loss(model, tokenizer, task, [x for x, _ in picked], [y for _, y in picked],
                                        max_text_tokens=max_text_tokens)  # fmt: skip

    return tune_steps(model, tokenizer, items, cfg, seed=seed, task_step=task_step)


# -- 4. distillation into the SLMs ------------------------------------------------------------------------


def vocab_size(model: Any) -> int:
    """Rows of the model's output layer: the size of the distribution it predicts."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def kd_mismatch(teacher: Any, teacher_tokenizer: Any, student: Any, student_tokenizer: Any) -> str:
    """Why token-level distillation cannot run between these two models ('' when it can): their tokenizers
    must map the same strings to the same ids and their heads predict distributions of the same size, so
    that position t's two distributions are over the same next tokens."""
    if len(teacher_tokenizer) != len(student_tokenizer):
        return f"the tokenizers' vocabularies differ in size ({len(teacher_tokenizer)} and {len(student_tokenizer)})"
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        return "the tokenizers map tokens to different ids"
    if vocab_size(teacher) != vocab_size(student):
        return f"the models' output layers differ in size ({vocab_size(teacher)} and {vocab_size(student)})"
    return ""


@dataclass
class TeacherTargets:
    """The LLM's next-token distributions at every target position of each pair, at temperature T: its
    top_k tokens and their probabilities (the rest of its mass is one bucket, 1 - their sum). Computed once
    per update and student vocabulary; a full distribution would take pairs x positions x vocabulary floats."""

    ids: list[torch.Tensor]  # per pair [n_targets, k] token ids
    probs: list[torch.Tensor]  # per pair [n_targets, k]
    temperature: float

    def batch(self, idx: Sequence[int], keep: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, keep, k] ids, [B, keep, k] probs) for pairs `idx`, right-aligned as `pair_batch` aligns
        targets; padding positions have probability 0."""
        k = self.ids[0].shape[1]
        ids = torch.zeros(len(idx), keep, k, dtype=torch.long)
        probs = torch.zeros(len(idx), keep, k)
        for row, i in enumerate(idx):
            n = self.ids[i].shape[0]
            ids[row, keep - n :] = self.ids[i]
            probs[row, keep - n :] = self.probs[i]
        return ids.to(device), probs.to(device)


@torch.no_grad()
def teacher_targets(
    teacher: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    *,
    temperature: float,
    top_k: int,
    batch_size: int = 16,
) -> TeacherTargets:
    """The teacher's TeacherTargets on encoded (prompt, target) pairs, the student's own token sequences:
    the LLM reads exactly what the SLM is trained on ("{input}\\nHeadline: {target}"), so both distributions
    at a position are over the same next token. (In its chat prompt, the LLM's first answer token has no
    leading space where the SLM's has one, and its turn ends with another token.)"""
    teacher.eval()
    ids: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    probs: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    device = precision.model_device(teacher)
    for s in progress(range(0, len(pairs), batch_size), desc="teacher targets", leave=False):
        chunk = list(range(s, min(s + batch_size, len(pairs))))
        batch = pair_batch([pairs[i][0] for i in chunk], [pairs[i][1] for i in chunk], pad_id, device)
        p = torch.softmax(next_token_logits(teacher, batch) / temperature, dim=-1)
        top = p.topk(min(top_k, p.shape[-1]), dim=-1)
        for row, i in enumerate(chunk):
            n = len(pairs[i][1])
            ids[i] = top.indices[row, batch.keep - n :].cpu()
            probs[i] = top.values[row, batch.keep - n :].float().cpu()
    return TeacherTargets(ids, probs, temperature)


def token_kd_loss(
    student_logits: torch.Tensor,
    target_mask: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per pair [B]: mean over its target positions of KL(LLM || SLM) at temperature T, over the teacher's
    top-k tokens plus one bucket for the rest of the vocabulary. A proper KL between two distributions over
    k + 1 outcomes: >= 0, and 0 with zero gradient when the student's distribution is the teacher's."""
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    logq_k = logq.gather(-1, teacher_ids)
    q_rest = (1.0 - logq_k.exp().sum(-1)).clamp(min=1e-12)
    p_rest = (1.0 - teacher_probs.sum(-1)).clamp(min=0.0)
    kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * logq_k).sum(-1)
    kl = kl + torch.xlogy(p_rest, p_rest) - p_rest * torch.log(q_rest)
    m = target_mask.float()
    return (kl * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def distillation_loss(
    model: Any,
    pairs: list[tuple[list[int], list[int]]],
    idx: list[int],
    *,
    pad_id: int,
    weights: torch.Tensor,
    teacher: TeacherTargets,
    mu: float,
) -> torch.Tensor:
    """mean_i w_i [(1 - mu) NLL_i + mu T^2 KL_i]: sequence-level (the S+ target's tokens) and token-level
    (the LLM's distributions) distillation from one forward pass; T^2 keeps the KL's gradient on the scale
    of the NLL's as T changes (Hinton et al. 2015)."""
    device = precision.model_device(model)
    batch = pair_batch([p for p, _ in pairs], [t for _, t in pairs], pad_id, device)
    logits = next_token_logits(model, batch)
    mask = batch.target_mask.float()
    nll = -(gather_logprobs(logits, batch) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    t_ids, t_probs = teacher.batch(idx, batch.keep, device)
    kl = token_kd_loss(logits, batch.target_mask, t_ids, t_probs, teacher.temperature)
    w = weights[idx].to(device)
    return (w * ((1.0 - mu) * nll + mu * teacher.temperature**2 * kl)).mean()


@dataclass
class DistillReport:
    pairs: int
    token_kd: bool
    skipped_reason: str = ""  # why token-level distillation did not run, when it was asked for


def distil_pairs(
    student: Any,
    tokenizer: Any,
    inputs: Sequence[str],
    targets: Sequence[str],
    weights: torch.Tensor,
    cfg: DistillConfig,
    *,
    fmt: PairFormat,
    seed: int,
    teacher: Any = None,
    teacher_tokenizer: Any = None,
    top_k: int = 64,
    desc: str = "distil",
) -> tuple[Any, DistillReport]:
    """Distil S+ into `student` in place (`fit_pairs`: distill.lr, batch_size, epochs or steps, autocast):
    sequence-level on (input, target) with per-pair `weights` (mean 1), plus token-level from `teacher`'s
    next-token distributions with weight distill.mu at temperature distill.temperature, when a teacher is
    given, mu > 0 and the vocabularies match (`kd_mismatch`; a mismatch is noted and the distillation is
    sequence-level only)."""
    reason = ""
    if teacher is not None and cfg.mu > 0:
        reason = kd_mismatch(teacher, teacher_tokenizer, student, tokenizer)
        if reason:
            note(f"{desc}: token-level distillation skipped: {reason}")
    use_kd = teacher is not None and cfg.mu > 0 and not reason
    loss = None
    if use_kd and len(inputs):
        encoded = encode_pairs(tokenizer, inputs, targets, fmt)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tt = teacher_targets(teacher, encoded, pad, temperature=cfg.temperature, top_k=top_k,
                             batch_size=cfg.batch_size)  # fmt: skip
        loss = functools.partial(
            distillation_loss, pad_id=pad, weights=weights.float(), teacher=tt, mu=cfg.mu
        )
    fit_pairs(student, tokenizer, inputs, targets, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
              epochs=cfg.epochs, max_steps=cfg.steps, fmt=fmt, sample_weights=weights, autocast=cfg.autocast,
              desc=desc, batch_loss=loss)  # fmt: skip
    return student, DistillReport(len(inputs), use_kd, reason)


# -- 5. the LLM as a target writer, for evaluation ------------------------------------------------------


def llm_targets(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    inputs: Sequence[str],
    *,
    max_new_tokens: int,
    max_text_tokens: int,
    dtype: torch.dtype = torch.float32,
    snapshots: SnapshotCache | None = None,
    batch_size: int = 16,
) -> list[str]:
    """The LLM's greedy target for each input (`write_targets`) on a sampling snapshot (adapter merged in).
    ROUGE-L against references: crosslm.evaluation.generation."""
    snapshot = sampling_snapshot(model, dtype, snapshots)
    return [t for t, _ in write_targets(snapshot, tokenizer, task, inputs, max_new_tokens=max_new_tokens,
                                        max_text_tokens=max_text_tokens, batch_size=batch_size)]  # fmt: skip


@torch.no_grad()
def llm_target_perplexity(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    inputs: Sequence[str],
    targets: Sequence[str],
    *,
    max_text_tokens: int,
    batch_size: int = 16,
) -> float:
    """exp(mean NLL per target token) of the reference targets as the LLM's answers to `target_prompt`,
    pooled over every target token (the end-of-turn token included); nan for no pairs."""
    model.eval()
    total, count = 0.0, 0.0
    for s in range(0, len(inputs), batch_size):
        lp, n = llm_target_logprobs(model, tokenizer, task, inputs[s : s + batch_size],
                                    targets[s : s + batch_size], max_text_tokens=max_text_tokens)  # fmt: skip
        total, count = total + float(lp.sum()), count + float(n.sum())
    return float(torch.exp(torch.tensor(-total / count))) if count else float("nan")


# -- one update, in sequence ------------------------------------------------------------------------------


@dataclass
class SyntheticPair:
    input: str
    target: str
    condition: int
    hash: str
    update: int  # the server update that generated it
    llm_version: int  # adapter version that wrote it (= updates completed before)


@dataclass
class GenerationUpdate:
    """What one generation update produced (the caller logs it and encodes the students as replies)."""

    new: range  # this update's pool indices
    stats: PairStats
    feedback: PairFeedback | None  # None without feedback (nothing scored)
    good: list[list[int]]  # S+ per condition, pool indices, highest q first
    losses: dict[str, float]
    students: dict[str, Any]  # client_id -> its enhanced SLM (a copy; the registry keeps the upload)
    distilled: dict[str, DistillReport]


def pair_format(cfg: RunConfig, task: TaskSpec) -> PairFormat:
    """The causal SLMs' pair format for this run: the task's target noun, clients.max_length input tokens,
    generation_task.max_target_tokens target tokens."""
    return PairFormat(task.target_noun, cfg.clients.max_length, cfg.generation_task.max_target_tokens)


def generation_update(
    llm: Any,
    tokenizer: Any,
    task: TaskSpec,
    cfg: RunConfig,
    models: Mapping[str, ClientModel],
    triggers: Sequence[str],
    *,
    pool: list[SyntheticPair],
    seen: set[str],
    u: int,
    snapshots: SnapshotCache | None = None,
) -> GenerationUpdate:
    """Update `u`: the LLM writes pairs into `pool` (in place), the SLMs of `models` score the whole pool,
    the LLM's adapter is tuned, and each trigger's SLM is distilled (a copy) on S+ with the LLM as teacher."""
    pairs, stats = generate_pairs(llm, tokenizer, task, cfg.generation, seen=seen,
                                  seed=pass_seed(cfg.seed, "generate", u), max_input_chars=cfg.data.max_input_chars,
                                  max_target_chars=cfg.data.max_target_chars,
                                  max_target_tokens=cfg.generation_task.max_target_tokens,
                                  max_text_tokens=cfg.llm.max_text_tokens, snapshots=snapshots)  # fmt: skip
    pool += [SyntheticPair(p.input, p.target, p.condition, p.hash, u, u - 1) for p in pairs]
    new = range(len(pool) - len(pairs), len(pool))
    fmt, gt = pair_format(cfg, task), cfg.generation_task
    conditions = [p.condition for p in pool]
    feedback: PairFeedback | None = None
    if cfg.feedback.enabled and pool:
        weights = staleness_weights(list(models.values()), u - 1, cfg.feedback.gamma)
        feedback = score_pairs([p.input for p in pool], [p.target for p in pool], conditions,
                               list(models.values()), weights, fmt=fmt, within_condition=gt.rank_within_condition,
                               batch_size=cfg.eval.batch_size)  # fmt: skip
        q = feedback.q
    else:  # KD without feedback: every pair is kept, alike
        q = torch.ones(len(pool))
    good = select_pairs(conditions, q, num_conditions=task.num_labels, tau=gt.tau if feedback is not None else 0.0,
                        max_per_condition=cfg.feedback.max_per_label)  # fmt: skip
    flat = sorted(i for per in good for i in per)
    losses = tune_generation_adapter(
        llm, tokenizer, task, [(pool[i].input, pool[i].target, pool[i].condition, float(q[i])) for i in new],
        [(pool[i].input, pool[i].target) for i in flat], cfg.tune, max_text_tokens=cfg.llm.max_text_tokens,
        tau=gt.tau, seed=pass_seed(cfg.seed, "tune_llm", u),
    )  # fmt: skip
    weights_splus = (
        balanced_weights(torch.tensor([conditions[i] for i in flat]), q[flat]) if flat else torch.zeros(0)
    )
    students, distilled = {}, {}
    for cid in triggers:
        m = models[cid]
        student = copy.deepcopy(m.model)
        students[cid], distilled[cid] = distil_pairs(
            student, m.tokenizer, [pool[i].input for i in flat], [pool[i].target for i in flat], weights_splus,
            cfg.distill, fmt=fmt, seed=pass_seed(cfg.seed, "distil", u), teacher=llm, teacher_tokenizer=tokenizer,
            top_k=gt.kd_top_k, desc=f"distil {cid}",
        )  # fmt: skip
    return GenerationUpdate(new, stats, feedback, good, losses, students, distilled)


# -- the server's update ----------------------------------------------------------------------------------


def crosslm_generation_update(
    server: CrossLMServer, triggers: list[str], u: int
) -> list[tuple[str, WireMessage]]:
    """Update `u` of a generation run on the server's registry and pair pool: `generation_update`, then the
    logs (every new pair to synthetic.jsonl, a `server_update` and a `distilled` event), the LLM's
    evaluation after its adapter changed, and each trigger's distilled SLM encoded as its reply."""
    timer = PhaseTimer()
    cfg = server.cfg
    res = generation_update(server.llm, server.tokenizer, server.task, cfg, server.models, triggers, pool=server.pairs,
                            seen=server.seen, u=u, snapshots=server.snapshots)  # fmt: skip
    timer("update")
    if res.losses.get("total") and cfg.tune.steps > 0:  # the adapter changed
        server.evaluate_llm(u)
    timer("evaluate_llm")
    pool, labels = server.pairs, server.task.labels
    q = res.feedback.q if res.feedback is not None else torch.ones(len(pool))
    versions = {m.client_id: m.round for m in server.models.values()}
    for i in res.new:
        p = pool[i]
        server.log_synthetic({"input": p.input, "target": p.target, "label": labels[p.condition],
                              "q": float(q[i]) if res.feedback is not None else None,
                              **({"slm_loglik": {cid: float(v[i]) for cid, v in res.feedback.loglik.items()}}
                                 if res.feedback is not None else {}),
                              "update": u, "llm_version": p.llm_version, "slm_versions": versions,
                              "hash": p.hash})  # fmt: skip
    gt = cfg.generation_task
    tau = gt.tau if res.feedback is not None else 0.0
    new_q = q[list(res.new)] if len(res.new) else torch.zeros(0)
    flat = sorted(i for per in res.good for i in per)
    weights = res.feedback.weights if res.feedback is not None else {}
    event = {
        "event": "server_update",
        "update": u,
        "mode": "crosslm",
        "trigger_clients": list(triggers),
        "weights": weights,
        "staleness": staleness(server, u),
        "generated": res.stats.generated,
        "kept": res.stats.kept,
        "malformed": sum(n for r, n in res.stats.dropped.items() if r != "duplicate"),  # unusable as a pair
        "duplicates": res.stats.dropped.get("duplicate", 0),
        "dropped": res.stats.dropped,
        "gen_tokens_per_s": res.stats.tokens_per_s,
        "gen_dtype": res.stats.dtype,
        "distinct2": distinct_2([pool[i].target for i in res.new]),
        "mean_q": float(new_q.mean()) if len(new_q) and res.feedback is not None else float("nan"),
        "tau": tau,
        "share_q_ge_tau": float((new_q >= tau).float().mean()) if len(new_q) else float("nan"),
        "pool_size": len(pool),
        "splus_size": len(flat),
        "splus_per_label": [len(per) for per in res.good],
        "distilled_size": len(flat),
        "distilled_per_label": [len(per) for per in res.good],
        "token_kd": {cid: r.token_kd for cid, r in res.distilled.items()},
        "loss": res.losses,
        "seconds": timer.seconds,
        "phase_seconds": timer.phases,
    }
    server.log(event)
    server.log({"event": "distilled", "update": u, "clients": list(triggers),
                "hashes": [pool[i].hash for i in flat], "labels": [pool[i].condition for i in flat]})  # fmt: skip
    replies = []
    for cid in triggers:
        student = res.students[cid]
        replies.append((cid, server.reply(cid, student, student.state_dict(), u)))
    return replies


def evaluate_llm_generation(server: CrossLMServer, update: int) -> dict[str, Any]:
    """The LLM as a headline writer on the server's evaluation pairs: ROUGE-L F1 of its greedy targets,
    its per-token perplexity of the reference targets and the distinct-2 of what it wrote."""
    cfg, data = server.cfg, server.llm_eval_data
    assert isinstance(data, GenerationPairs)
    dtype = precision.resolve_dtype(cfg.eval.llm_dtype, server.device)
    outputs = llm_targets(server.llm, server.tokenizer, server.task, data.inputs,
                          max_new_tokens=cfg.generation_task.max_target_tokens,
                          max_text_tokens=cfg.llm.max_text_tokens, dtype=dtype, snapshots=server.snapshots,
                          batch_size=cfg.eval.batch_size)  # fmt: skip
    ppl = llm_target_perplexity(server.eval_model(), server.tokenizer, server.task, data.inputs, data.targets,
                                max_text_tokens=cfg.llm.max_text_tokens, batch_size=cfg.eval.batch_size)  # fmt: skip
    event = {"event": "llm_eval", "update": update, "dtype": precision.dtype_name(dtype),
             "rouge_l": rouge_l(outputs, data.targets), "target_perplexity": ppl,
             "distinct_2": distinct_2(outputs), "n": len(outputs),
             "examples": [{"input": x[:160], "target": y, "written": o}
                          for x, y, o in list(zip(data.inputs, data.targets, outputs, strict=True))[:3]]}  # fmt: skip
    server.log(event)
    return event
