"""The LLM as a classifier: score each whole label string as the assistant's answer (label-word bias).

Raw prediction = argmax_c log p(verbalizer_c | prompt(x)). Small LLMs carry a strong label-word bias, so we
also report contextual calibration (Zhao et al., 2021): divide by the label distribution the model gives
to content-free inputs. The same scoring, with gradients, is L_task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from crosslm.modeling.llm_text import (
    answer_ids,
    cache_kwarg,
    pair_batch,
    truncate_text,
    user_prompt_ids,
)
from crosslm.modeling.metrics import classification_metrics
from crosslm.precision import model_device
from crosslm.progress import progress as phase_progress
from crosslm.task import LabelledTexts, TaskSpec

CONTENT_FREE = ("N/A", "", "[MASK]")


def label_scores(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    texts: Sequence[str],
    *,
    max_text_tokens: int = 160,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """[N, C] summed log-probabilities of each whole label string as the answer to prompt(x).

    Each prompt is run once and its KV cache is shared by the C label continuations (C times less work
    than one sequence per pair). Differentiable: L_task backpropagates through the shared cache."""
    answers = [answer_ids(tokenizer, v) for v in task.verbalizer]
    prompts = classify_prompts(tokenizer, task, texts, max_text_tokens)
    return _shared_prefix_scores(model, prompts, answers, tokenizer.pad_token_id, batch_size, progress)


def classify_prompts(
    tokenizer: Any, task: TaskSpec, texts: Sequence[str], max_text_tokens: int
) -> list[list[int]]:
    return [
        user_prompt_ids(tokenizer, task.classify_prompt(truncate_text(tokenizer, t, max_text_tokens)))
        for t in texts
    ]


def _shared_prefix_scores(
    model: Any,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    from transformers import DynamicCache

    kw = cache_kwarg(model)
    device = model_device(model)
    out = torch.empty(len(prompts), len(answers), device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    starts = range(0, len(order), batch_size)
    for s in phase_progress(starts, desc="LLM label scores", leave=False, disable=not progress):
        idx = order[s : s + batch_size]
        rows = torch.tensor(idx, device=device)
        batch = pair_batch([[] for _ in idx], [prompts[i] for i in idx], pad_id, device)
        cache = DynamicCache(config=getattr(model, "config", None))
        first = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=1,
            use_cache=True,
            **{kw: cache},
        )
        first_logp = torch.log_softmax(first.logits[:, -1].float(), dim=-1)
        last_pos = batch.position_ids[:, -1:]
        for c, ans in enumerate(answers):
            score = first_logp[:, ans[0]].clone()
            if len(ans) > 1:
                n = len(ans) - 1
                step = model(
                    input_ids=torch.tensor(ans[:-1], device=device).expand(len(idx), -1),
                    attention_mask=torch.cat(
                        [batch.attention_mask, torch.ones(len(idx), n, dtype=torch.long, device=device)], 1
                    ),
                    position_ids=last_pos + torch.arange(1, n + 1, device=device),
                    use_cache=True,
                    **{kw: cache},
                )
                logp = torch.log_softmax(step.logits.float(), dim=-1)
                score += (
                    logp.gather(-1, torch.tensor(ans[1:], device=device).expand(len(idx), -1).unsqueeze(-1))
                    .squeeze(-1)
                    .sum(-1)
                )
                cache.crop(-n)  # drop this label's tokens: back to the shared prompt
            out[rows, c] = score
    return out


def calibrated(scores: torch.Tensor, content_free_scores: torch.Tensor) -> torch.Tensor:
    """log softmax(scores) - log p_cf, p_cf = mean label distribution on content-free inputs."""
    p_cf = torch.softmax(content_free_scores, dim=-1).mean(0)
    return torch.log_softmax(scores, dim=-1) - torch.log(p_cf)


@torch.no_grad()
def evaluate_llm(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    data: LabelledTexts,
    *,
    max_text_tokens: int,
    batch_size: int,
    other_verbalizers: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Raw and calibrated accuracy / macro-F1 of the LLM on `data` with the task's label words, and under
    `label_word_variants` the same for each of `other_verbalizers` (label-word forms). All forms share
    one pass over each prompt: only the short label continuations are scored per form."""
    model.eval()
    forms = {"": list(task.verbalizer), **{k: list(v) for k, v in (other_verbalizers or {}).items()}}
    answers = [answer_ids(tokenizer, w) for words in forms.values() for w in words]
    pad = tokenizer.pad_token_id
    prompts = classify_prompts(tokenizer, task, data.texts, max_text_tokens)
    cf_prompts = classify_prompts(tokenizer, task, CONTENT_FREE, max_text_tokens)
    scores = _shared_prefix_scores(model, prompts, answers, pad, batch_size, True)
    cf = _shared_prefix_scores(model, cf_prompts, answers, pad, batch_size, False)
    result: dict[str, Any] = {"label_word_variants": {}}
    c = task.num_labels
    for i, name in enumerate(forms):
        s, f = scores[:, i * c : (i + 1) * c], cf[:, i * c : (i + 1) * c]
        raw = classification_metrics(data.labels, s.argmax(-1).tolist(), c)
        cal = classification_metrics(data.labels, calibrated(s, f).argmax(-1).tolist(), c)
        metrics = {
            "raw_accuracy": raw["accuracy"],
            "raw_macro_f1": raw["macro_f1"],
            "calibrated_accuracy": cal["accuracy"],
            "calibrated_macro_f1": cal["macro_f1"],
            "n": len(data),
        }
        if name:
            result["label_word_variants"][name] = metrics
        else:
            result.update(metrics)
    if not other_verbalizers:
        del result["label_word_variants"]
    return result
