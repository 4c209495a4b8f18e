"""Training and inference of a causal SLM on (input, target) pairs, for generation tasks.

The counterpart of slm.py for a client SLM that writes: one fixed prompt format for training, scoring and
decoding, so what a model is tuned on, what it is scored on and what it is asked to write are the same
sequences:

    "{input}\\n{Marker}:" + " {target}" + <eos>          (Marker = the task's target noun, e.g. Headline)

Only the target tokens (and the closing end-of-sequence token) carry loss or score; the prompt is context.
Rows are padded on the left, so every target ends its row and the LM head and the softmax over the
vocabulary run on the target positions only (`crosslm.modeling.llm_text.pair_batch`), which the LLM's
scoring already uses: the head is 28 M of a 6-layer SmolLM2 truncation's 50 M parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crosslm import precision
from crosslm.modeling.llm_text import continuation_logprobs, pair_batch
from crosslm.progress import progress
from crosslm.seeding import own_rng
from crosslm.task import marker


def prompt_text(text: str, target_noun: str) -> str:
    """The prompt a causal SLM continues with the target, e.g. 'Shares rose ...\\nHeadline:'."""
    return f"{text}\n{marker(target_noun)}:"


@dataclass(frozen=True)
class PairFormat:
    """How pairs become tokens: the target noun of the prompt and the token budgets.

    The input is cut to `max_input_tokens` before the marker is appended, so a long input never loses the
    marker; a target is cut to `max_target_tokens` including its end-of-sequence token, which a cut target
    does not get (it did not end there)."""

    target_noun: str = "headline"
    max_input_tokens: int = 128
    max_target_tokens: int = 32

    def __post_init__(self) -> None:
        if self.max_input_tokens < 1 or self.max_target_tokens < 1:
            raise ValueError(
                f"token budgets must be at least 1, got max_input_tokens={self.max_input_tokens}, "
                f"max_target_tokens={self.max_target_tokens}"
            )


def prompt_ids(tokenizer: Any, text: str, fmt: PairFormat) -> list[int]:
    """Token ids of the prompt for `text`: the input (with the tokenizer's special prefix, if any) cut to
    the budget, then the newline and marker."""
    ids = list(tokenizer(text, add_special_tokens=True).input_ids)[: fmt.max_input_tokens]
    return ids + list(tokenizer(f"\n{marker(fmt.target_noun)}:", add_special_tokens=False).input_ids)


def target_ids(tokenizer: Any, target: str, fmt: PairFormat) -> list[int]:
    """Token ids of ' {target}' closed by the end-of-sequence token, cut to the budget."""
    ids = list(tokenizer(f" {target}", add_special_tokens=False).input_ids)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if len(ids) + len(eos) > fmt.max_target_tokens:
        return ids[: fmt.max_target_tokens]
    return ids + eos


def encode_pairs(
    tokenizer: Any, inputs: Sequence[str], targets: Sequence[str], fmt: PairFormat
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) per pair."""
    if len(inputs) != len(targets):
        raise ValueError(f"inputs and targets differ in length ({len(inputs)}, {len(targets)})")
    return [
        (prompt_ids(tokenizer, x, fmt), target_ids(tokenizer, y, fmt))
        for x, y in zip(inputs, targets, strict=True)
    ]


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token")
    return int(pad)


def target_nll(model: Any, tokenizer: Any, pairs: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Per-pair mean negative log-likelihood of the target tokens given the prompt [B], with gradients.
    Prompt and padding positions carry no loss (they are outside the batch's target mask)."""
    batch = pair_batch(
        [p for p, _ in pairs], [t for _, t in pairs], _pad_id(tokenizer), precision.model_device(model)
    )
    logp = continuation_logprobs(model, batch)
    mask = batch.target_mask.float()
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def pair_loss(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_i w_i * (mean NLL of target i's tokens): every pair counts once whatever its length, and a
    weight of 0 removes a pair from the gradient (distillation weights pairs by quality)."""
    nll = target_nll(model, tokenizer, pairs)
    return (nll if weights is None else weights.to(nll.device) * nll).mean()


Pairs = list[tuple[list[int], list[int]]]
BatchLoss = Callable[[Any, Pairs, list[int]], torch.Tensor]
"""(model, a batch of encoded (prompt, target) pairs, their indices among the pairs) -> the batch's loss."""


def fit_pairs(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[str],
    targets: Sequence[str],
    *,
    lr: float,
    batch_size: int,
    seed: int,
    epochs: int = 1,
    max_steps: int = 0,
    fmt: PairFormat | None = None,
    sample_weights: torch.Tensor | Sequence[float] | None = None,
    weight_decay: float = 0.0,
    autocast: str = "float32",
    desc: str = "train",
    batch_loss: BatchLoss | None = None,
) -> float:
    """Supervised tuning of `model` in place on input -> target (loss on the target tokens only), leaving
    it in eval mode; returns the mean loss of the last pass over the pairs (nan for no pairs).

    `max_steps` > 0 replaces `epochs` by a number of optimizer steps (passes over the pairs repeat until it
    is reached). `sample_weights` [N] weight each pair's loss (`pair_loss`); pass weights with mean 1 to
    keep the step size of unweighted training. Shuffling and dropout draw only from `seed` (own_rng), so
    the result does not depend on what ran before in the process. `autocast` bfloat16 (or auto, where
    bfloat16 runs faster here) runs the passes under torch autocast; weights and AdamW stay float32.
    `batch_loss` replaces the weighted target NLL (`pair_loss`) by another loss of the same batches, e.g.
    one that adds a teacher's token distributions (crosslm.server.generation_update)."""
    if len(inputs) != len(targets):
        raise ValueError(f"inputs and targets differ in length ({len(inputs)}, {len(targets)})")
    if len(inputs) == 0:
        return float("nan")
    fmt = fmt or PairFormat()
    weights = None
    if sample_weights is not None:
        weights = torch.as_tensor(sample_weights, dtype=torch.float)
        if weights.shape != (len(inputs),):
            raise ValueError(f"sample_weights has shape {tuple(weights.shape)}, expected ({len(inputs)},)")
    pairs = encode_pairs(tokenizer, inputs, targets, fmt)
    device = precision.model_device(model)
    per_epoch = -(-len(pairs) // batch_size)
    total_steps = max_steps if max_steps > 0 else epochs * per_epoch
    with own_rng(seed, device):
        amp = precision.autocast(autocast, device)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total_steps, 1))
        step = 0
        last = float("nan")
        with progress(total=total_steps, desc=desc, leave=False, unit="step") as bar:
            while step < total_steps:
                order = torch.randperm(len(pairs), generator=gen)
                losses: list[float] = []
                for start in range(0, len(pairs), batch_size):
                    if step == total_steps:
                        break
                    idx = order[start : start + batch_size].tolist()
                    with amp:
                        if batch_loss is not None:
                            loss = batch_loss(model, [pairs[i] for i in idx], idx)
                        else:
                            loss = pair_loss(
                                model,
                                tokenizer,
                                [pairs[i] for i in idx],
                                None if weights is None else weights[idx],
                            )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    step += 1
                    losses.append(loss.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if losses:
                    last = sum(losses) / len(losses)
    model.eval()
    return last


@torch.no_grad()
def target_logprobs(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[str],
    targets: Sequence[str],
    *,
    fmt: PairFormat | None = None,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target token | prompt, earlier target tokens) [N], number of target tokens [N]),
    the end-of-sequence token included. Batched by similar length; no gradients."""
    model.eval()
    fmt = fmt or PairFormat()
    pairs = encode_pairs(tokenizer, inputs, targets, fmt)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    total = torch.zeros(len(pairs))
    count = torch.zeros(len(pairs))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [pairs[i] for i in idx]
        batch = pair_batch(
            [p for p, _ in chunk], [t for _, t in chunk], _pad_id(tokenizer), precision.model_device(model)
        )
        logp = continuation_logprobs(model, batch).float()
        mask = batch.target_mask
        total[idx] = (logp * mask).sum(-1).cpu()
        count[idx] = mask.sum(-1).float().cpu()
    return total, count


def mean_target_loglik(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[str],
    targets: Sequence[str],
    *,
    fmt: PairFormat | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-pair mean log-likelihood per target token [N]: how well the model writes each target from its
    input (higher is better; 0 = certain). The mean per token makes long and short targets comparable;
    comparing models of different depths needs a per-model normalisation on top (e.g. against the
    model's own score on real pairs), which is the feedback's to choose."""
    total, count = target_logprobs(model, tokenizer, inputs, targets, fmt=fmt, batch_size=batch_size)
    return total / count.clamp(min=1.0)


def _stop_ids(tokenizer: Any) -> list[int]:
    """End-of-sequence plus the tokens that are only line breaks: a target is one line, so decoding can
    stop at the first of them (the text is cut at the first newline anyway)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in ("\n", "\n\n"):
        tok = tokenizer(text, add_special_tokens=False).input_ids
        if len(tok) == 1 and tok[0] not in ids:
            ids.append(int(tok[0]))
    return ids


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[str],
    *,
    max_new_tokens: int,
    fmt: PairFormat | None = None,
    batch_size: int = 16,
) -> list[str]:
    """The model's greedy target for each input: the prompt of `prompt_ids`, decoded greedily for at most
    `max_new_tokens`, cut at the first newline and stripped. Batched by similar prompt length, rows padded
    on the left (with right padding a short row's continuation would follow its padding)."""
    model.eval()
    fmt = fmt or PairFormat()
    device = precision.model_device(model)
    prompts = [prompt_ids(tokenizer, x, fmt) for x in inputs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad, stop = _pad_id(tokenizer), _stop_ids(tokenizer)
    out = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pair_batch([[] for _ in idx], [prompts[i] for i in idx], pad, device)
        generated = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=stop,
        )[:, batch.input_ids.shape[1] :]
        for i, row in zip(idx, generated.tolist(), strict=True):
            end = next((j for j, t in enumerate(row) if t in stop), len(row))  # then padding follows
            out[i] = tokenizer.decode(row[:end], skip_special_tokens=True).split("\n", 1)[0].strip()
    return out
