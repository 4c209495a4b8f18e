"""Client reports: the small JSON a client sends beside (or instead of) model weights.

A report holds aggregate numbers about the client's own SLM (loss, accuracy, macro-F1, seconds) and
nothing else: every key is declared here, every value is a finite number or one of the declared
identifiers, so a report cannot carry text from the client's private data.
"""

from __future__ import annotations

import json
import math
from typing import Any

from crosslm.errors import ProtocolError

METRIC_KEYS = frozenset({"accuracy", "macro_f1", "rouge_l", "target_perplexity", "distinct_2"})
"""Classification's and generation's (crosslm.evaluation.generation) aggregate metrics."""
SPLITS = frozenset({"local", "global", "validation"})
# event kind -> its numeric fields; "client" and "event" are always present, split metrics are optional.
REPORT_FIELDS: dict[str, frozenset[str]] = {
    "client_trained": frozenset({"round", "base_version", "train_loss", "seconds"}),
    "enhanced": frozenset({"update", "adopted", "worse_share"}),
    "client_eval": frozenset({"round", "base_version", "final_epochs"}),
}
NESTED = {"client_trained": None, "enhanced": ("before", "offered", "after"), "client_eval": None}
MAX_REPORT_BYTES = 4096


def _number(v: Any, where: str) -> float | int:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ProtocolError(f"report field '{where}' must be a finite number, got {type(v).__name__}")
    return v


def _metrics(d: Any, where: str) -> dict[str, dict[str, float]]:
    """{split: {metric: number}} with declared splits and metrics only."""
    if not isinstance(d, dict):
        raise ProtocolError(f"report field '{where}' must be an object")
    out: dict[str, dict[str, float]] = {}
    for split, metrics in d.items():
        if split not in SPLITS or not isinstance(metrics, dict):
            raise ProtocolError(f"report field '{where}.{split}' is not a declared split ({sorted(SPLITS)})")
        bad = sorted(set(metrics) - METRIC_KEYS)
        if bad:
            raise ProtocolError(f"report field '{where}.{split}.{bad[0][:40]}' is not a declared metric")
        out[split] = {k: float(_number(v, f"{where}.{split}.{k}")) for k, v in metrics.items()}
    return out


def validate_report(
    report: Any, *, client_id: str | None = None, expected_event: str | None = None
) -> dict[str, Any]:
    """Check a received report against its declared fields; returns a clean copy or raises ProtocolError.

    `expected_event` is the report kind the message it came with allows (a train reply carries a
    'client_trained' report, never a 'client_eval' one), so a node cannot write another kind of result."""
    if not isinstance(report, dict):
        raise ProtocolError("report is not a JSON object")
    if len(json.dumps(report)) > MAX_REPORT_BYTES:
        raise ProtocolError(f"report is larger than {MAX_REPORT_BYTES} bytes")
    kind = report.get("event")
    if kind not in REPORT_FIELDS:
        raise ProtocolError(f"report event {str(kind)[:40]!r} is not one of {sorted(REPORT_FIELDS)}")
    if expected_event is not None and kind != expected_event:
        raise ProtocolError(
            f"report event {kind!r} does not answer this message (expected {expected_event!r})"
        )
    cid = report.get("client")
    if not isinstance(cid, str) or (client_id is not None and cid != client_id):
        raise ProtocolError(f"report claims client {str(cid)[:40]!r}, expected {client_id!r}")
    out: dict[str, Any] = {"event": kind, "client": cid}
    nested = NESTED[kind]
    for key, value in report.items():
        if key in ("event", "client"):
            continue
        if key in REPORT_FIELDS[kind]:
            out[key] = _number(value, key)
        elif nested is None and key in SPLITS:
            out.update(_metrics({key: value}, "metrics"))
        elif nested is not None and key in nested:
            out[key] = _metrics(value, key)
        else:
            raise ProtocolError(f"report field '{str(key)[:40]}' is not declared for '{kind}' reports")
    return out
