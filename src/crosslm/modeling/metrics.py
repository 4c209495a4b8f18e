"""Classification metrics (numpy only, so the evaluation has no sklearn dependency)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if len(t) else float("nan")


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> float:
    """Mean F1 over all labels of the task (a label absent from both truth and prediction scores 0)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    f1s = []
    for c in range(num_labels):
        tp = float(((p == c) & (t == c)).sum())
        fp = float(((p == c) & (t != c)).sum())
        fn = float(((p != c) & (t == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1s))


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, float]:
    return {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred, num_labels)}


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n: unique n-grams / all n-grams over the whole set (a diversity measure)."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.lower().split()
        grams += [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
