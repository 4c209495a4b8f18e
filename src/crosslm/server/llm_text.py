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
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L]
    target_mask: torch.Tensor  # [B, L-1]: True where position t+1 is a continuation token


def pair_batch(contexts: Sequence[list[int]], continuations: Sequence[list[int]], pad_id: int) -> PairBatch:
    seqs = [list(c) + list(x) for c, x in zip(contexts, continuations, strict=True)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    tmask = torch.zeros((len(seqs), length - 1), dtype=torch.bool)
    for i, (c, s) in enumerate(zip(contexts, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        tmask[i, len(c) - 1 : len(s) - 1] = True
    return PairBatch(ids, attn, tmask)


def next_token_logits(model: Any, batch: PairBatch) -> torch.Tensor:
    """Logits predicting token t+1 from positions 0..L-2: [B, L-1, V]."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()


def gather_logprobs(logits: torch.Tensor, batch: PairBatch) -> torch.Tensor:
    """log p(x_{t+1} | x_<=t) at every position [B, L-1] (masked positions hold garbage: use target_mask)."""
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def continuation_logprobs(model: Any, batch: PairBatch) -> torch.Tensor:
    return gather_logprobs(next_token_logits(model, batch), batch)
