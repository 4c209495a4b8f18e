"""Metrics of a generation task: ROUGE-L of greedy outputs, perplexity of the reference targets, distinct-2.

ROUGE-L F1 (longest common subsequence of words, Porter-stemmed, as the `rouge-score` package computes
it) compares what a model writes with the reference; the per-token perplexity of the references given
their inputs measures the same skill without decoding, so it moves before greedy outputs change. Both use
the causal SLMs' prompt format (crosslm.modeling.causal_slm). Distinct-2 measures the diversity of a set of
texts (e.g. synthetic targets), not their quality.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from crosslm.modeling.causal_slm import PairFormat, greedy_generate, target_logprobs
from crosslm.modeling.metrics import distinct_n


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference, in [0, 1] (an empty prediction scores 0)."""
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length ({len(predictions)}, {len(references)})"
        )
    scorer = _scorer()
    return [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    ]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over the pairs, in [0, 1]; nan for none."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores) if scores else float("nan")


def target_perplexity(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[str],
    targets: Sequence[str],
    *,
    fmt: PairFormat | None = None,
    batch_size: int = 32,
) -> float:
    """exp(mean negative log-likelihood per target token) of the reference targets given their inputs,
    pooled over every target token of the set (the end-of-sequence token included); nan for no pairs."""
    if not len(inputs):
        return float("nan")
    total, count = target_logprobs(model, tokenizer, inputs, targets, fmt=fmt, batch_size=batch_size)
    return math.exp(-float(total.sum()) / max(float(count.sum()), 1.0))


def distinct_2(texts: Sequence[str]) -> float:
    """Unique word bigrams / all word bigrams over the set (lower-cased)."""
    return distinct_n(texts, 2)


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[str],
    targets: Sequence[str],
    *,
    max_new_tokens: int,
    fmt: PairFormat | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """ROUGE-L F1 of the model's greedy outputs against the targets, the targets' per-token perplexity,
    and distinct-2 of the outputs, over the same pairs."""
    outputs = greedy_generate(
        model, tokenizer, inputs, max_new_tokens=max_new_tokens, fmt=fmt, batch_size=batch_size
    )
    return {
        "rouge_l": rouge_l(outputs, targets),
        "target_perplexity": target_perplexity(
            model, tokenizer, inputs, targets, fmt=fmt, batch_size=batch_size
        ),
        "distinct_2": distinct_2(outputs),
    }
