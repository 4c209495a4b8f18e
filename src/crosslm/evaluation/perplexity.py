"""The LLM's generality check: perplexity on held-out general English text it is never trained on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from crosslm.modeling.llm_text import continuation_logprobs, pair_batch
from crosslm.precision import model_device
from crosslm.progress import progress


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int,
    block: int = 256,
    batch_size: int = 8,
) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping blocks of the concatenated texts, up to `max_tokens` tokens.
    Returns (perplexity, number of scored tokens). Deterministic: same texts, same blocks."""
    model.eval()
    device = model_device(model)
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False).input_ids
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens + 1:
            break
    ids = ids[: max_tokens + 1]
    blocks = [ids[i : i + block] for i in range(0, len(ids) - 1, block) if len(ids[i : i + block]) > 1]
    nll, count = 0.0, 0
    for s in progress(range(0, len(blocks), batch_size), desc="perplexity", leave=False):
        chunk = blocks[s : s + batch_size]
        batch = pair_batch([b[:1] for b in chunk], [b[1:] for b in chunk], tokenizer.pad_token_id, device)
        logp = continuation_logprobs(model, batch)
        nll -= float((logp * batch.target_mask).sum())
        count += int(batch.target_mask.sum())
    return math.exp(nll / max(count, 1)), count
