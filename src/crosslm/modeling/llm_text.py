"""Token plumbing for the server LLM: chat prompts, batches of (context, continuation) pairs, and the
log-probability of each continuation token. Generation scoring, L_QG, L_task, the verbalizer and the
perplexity check all read token probabilities through `continuation_logprobs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def user_prompt_ids(tokenizer: Any, user_text: str) -> list[int]:
    """Token ids of a user turn ready for the assistant's answer (chat template when the model has one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(user_text + "\n", add_special_tokens=True).input_ids)


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """An assistant answer as generated tokens, closed by the end-of-turn token (so 'Pos' != 'Positive')."""
    ids = list(tokenizer(answer, add_special_tokens=False).input_ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def truncate_text(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


@dataclass
class PairBatch:
    """Left-padded (context + continuation) sequences. Continuations end every row, so the logits needed
    are those of the last `keep` + 1 positions only (the LM head and softmax over the vocabulary are the
    costly part for short continuations)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    target_mask: torch.Tensor  # [B, keep]: True where input_ids[:, -keep:] is a continuation token
    keep: int

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[:, -self.keep :]


def pair_batch(
    contexts: Sequence[list[int]], continuations: Sequence[list[int]], pad_id: int, device: Any = None
) -> PairBatch:
    """The batch on `device` (None: the CPU); pass the device of the model that will read it."""
    seqs = [list(c) + list(x) for c, x in zip(contexts, continuations, strict=True)]
    length = max(len(s) for s in seqs)
    keep = max(len(x) for x in continuations)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    tmask = torch.zeros((len(seqs), keep), dtype=torch.bool)
    for i, (x, s) in enumerate(zip(continuations, seqs, strict=True)):
        ids[i, length - len(s) :] = torch.tensor(s)
        attn[i, length - len(s) :] = 1
        tmask[i, keep - len(x) :] = True
    if device is not None:
        ids, attn, tmask = ids.to(device), attn.to(device), tmask.to(device)
    return PairBatch(ids, attn, tmask, keep)


def next_token_logits(model: Any, batch: PairBatch) -> torch.Tensor:
    """Logits predicting each of the last `keep` tokens: [B, keep, V]."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.keep + 1,
        use_cache=False,
    )
    return out.logits[:, :-1].float()


def gather_logprobs(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """log p(x_t | x_<t) for the last `keep` tokens [B, keep] (padding positions: use target_mask)."""
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)


def continuation_logprobs(model: Any, batch: PairBatch) -> torch.Tensor:
    return gather_logprobs(next_token_logits(model, batch), batch)


def cache_kwarg(model: Any) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; find which one this model takes."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
