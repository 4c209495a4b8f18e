"""Turns a run's metrics.jsonl events into report.md, three plots and a terminal summary.

Every event type and field may be missing (interrupted run, 0 server updates, older logs), so all
lookups go through tolerant helpers and absent values render as "n/a" instead of raising: a report
is most needed exactly when a run went wrong.

A run is a classification or a generation task (run_start's task_kind). Both log events of the same
shape under different metric keys, so every section takes its metric names from one `_Metrics`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosslm.io import atomic_write_bytes, atomic_write_text
from crosslm.precision import describe_machine

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NA = "n/a"
SYNTHETIC_PLOT = "synthetic_quality.png"

__all__ = ["write_report", "summary_table"]


# --------------------------------------------------------------------------- tolerant accessors


def _num(x: Any) -> float | None:
    """A finite number or None, so NaN/None/strings in a log never reach arithmetic or formatting."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _get(d: Any, *keys: str) -> Any:
    """Nested dict lookup that yields None on any missing level or non-dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _pct(x: Any) -> str:
    v = _num(x)
    return NA if v is None else f"{100 * v:.1f}"


def _fmt(x: Any, digits: int = 3) -> str:
    v = _num(x)
    return NA if v is None else f"{v:.{digits}f}"


def _int(x: Any) -> str:
    v = _num(x)
    return NA if v is None else f"{int(v)}"


def _pp(before: Any, after: Any) -> str:
    """Difference of two fractions in percentage points, signed so improvements read as '+'."""
    a, b = _num(before), _num(after)
    return NA if a is None or b is None else f"{100 * (b - a):+.1f}"


def _arrow(before: Any, after: Any) -> str:
    return f"{_pct(before)} → {_pct(after)}"


def _mean(values: list[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return sum(vs) / len(vs) if vs else None


def _rel_change(start: Any, end: Any) -> str:
    s, e = _num(start), _num(end)
    if s is None or e is None or s == 0:
        return NA
    return f"{100 * (e / s - 1):+.1f}%"


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    return NA if s is None else f"{s:.0f} s ({s / 60:.1f} min)"


def _cell(x: Any) -> str:
    """Markdown table cell: pipes and newlines would break the table layout."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[Any]], align: str = "") -> str:
    align = align.ljust(len(headers), "l")
    sep = ["---:" if a == "r" else ":---:" if a == "c" else "---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt2(x: Any) -> str:
    return _fmt(x, 2)


# --------------------------------------------------------------------------- the task kind's metrics


@dataclass(frozen=True)
class _Metrics:
    """What a task kind measures and how the report names and prints it, so no section spells out
    'accuracy'. The primary metric is higher-is-better, lies in [0, 1] and prints ×100 with one decimal."""

    kind: str
    primary: str  # key in the per-split metric dicts ("local", "global", "validation")
    name: str  # in prose and titles
    abbr: str  # in column headers
    unit: str  # after a ×100 value in prose
    scale: str  # what a ×100 column holds, in headers
    points: str  # a difference of two ×100 values
    secondary: str
    secondary_abbr: str
    secondary_pct: bool  # a fraction shown ×100, or a plain number (perplexity)
    validation: str  # what a client's refusal is decided on
    validation_name: str
    validation_pct: bool
    label: str  # what run_start's labels are
    slm_note: str  # the SLM table's note on its units
    llm_what: str  # what the LLM plot shows
    llm_columns: tuple[tuple[str, str, Callable[[Any], str]], ...]  # header, llm_eval key, format

    def secondary_fmt(self, x: Any) -> str:
        return _pct(x) if self.secondary_pct else _fmt2(x)

    def validation_fmt(self, x: Any) -> str:
        return _pct(x) if self.validation_pct else _fmt2(x)

    @property
    def slm_plot(self) -> str:
        return f"slm_global_{self.primary}.png"

    @property
    def llm_plot(self) -> str:
        return f"llm_{self.primary}.png"

    @property
    def plots(self) -> dict[str, str]:
        """Plot file name -> title, in the report's order."""
        return {
            self.slm_plot: f"SLM global {self.name} per server update",
            self.llm_plot: f"LLM {self.llm_what} per server update",
            SYNTHETIC_PLOT: "Synthetic data quality per server update",
        }


CLASSIFICATION = _Metrics(
    kind="classification",
    primary="accuracy",
    name="accuracy",
    abbr="acc",
    unit=" %",
    scale="%",
    points="pp",
    secondary="macro_f1",
    secondary_abbr="F1",
    secondary_pct=True,
    validation="macro_f1",
    validation_name="macro-F1",
    validation_pct=False,
    label="label",
    slm_note="Accuracies and macro-F1 in %.",
    llm_what="accuracy (raw / calibrated)",
    llm_columns=(
        ("raw acc", "raw_accuracy", _pct),
        ("calibrated acc", "calibrated_accuracy", _pct),
        ("raw macro-F1", "raw_macro_f1", _pct),
        ("calibrated macro-F1", "calibrated_macro_f1", _pct),
    ),
)
GENERATION = _Metrics(
    kind="generation",
    primary="rouge_l",
    name="ROUGE-L",
    abbr="ROUGE-L",
    unit="",
    scale="×100",
    points="points",
    secondary="target_perplexity",
    secondary_abbr="target ppl",
    secondary_pct=False,
    validation="rouge_l",
    validation_name="ROUGE-L",
    validation_pct=True,
    label="condition",
    slm_note=(
        "ROUGE-L F1 ×100 (higher is better); target ppl = per-token perplexity of the reference "
        "targets (lower is better)."
    ),
    llm_what="ROUGE-L and target perplexity",
    llm_columns=(
        ("ROUGE-L", "rouge_l", _pct),
        ("target perplexity", "target_perplexity", _fmt2),
        ("distinct-2", "distinct_2", _fmt),
    ),
)
METRICS = {m.kind: m for m in (CLASSIFICATION, GENERATION)}


# --------------------------------------------------------------------------- event digestion


@dataclass
class _Run:
    """The events grouped by type, in log order, plus the derived per-client view."""

    run_start: dict[str, Any] = field(default_factory=dict)
    run_end: dict[str, Any] | None = None
    trained: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    llm_evals: list[dict[str, Any]] = field(default_factory=list)
    perplexity: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    enhanced: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    clients: list[str] = field(default_factory=list)
    client_info: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        labels = self.run_start.get("labels")
        return [str(x) for x in labels] if isinstance(labels, list) else []

    @property
    def metrics(self) -> _Metrics:
        """run_start's task_kind; a log without it is classification's unless its metrics say otherwise
        (run_start lost from a truncated generation log)."""
        kind = self.run_start.get("task_kind")
        if kind in METRICS:
            return METRICS[str(kind)]
        generation = any("rouge_l" in e for e in self.llm_evals) or any(
            isinstance(g := _get(e, "global"), dict) and "rouge_l" in g for e in self.trained
        )
        return GENERATION if kind is None and generation else CLASSIFICATION

    @property
    def interrupted(self) -> bool:
        return self.run_end is None or bool(self.run_end.get("interrupted"))

    @property
    def n_updates(self) -> int:
        n = _num(_get(self.run_end, "updates"))
        return int(n) if n is not None else len(self.updates)

    def standalone(self, client: str) -> dict[str, Any] | None:
        """Round 1 is local training only: the baseline every later number is compared against."""
        return next((e for e in self.trained if e.get("client") == client and e.get("round") == 1), None)

    def final(self, client: str) -> dict[str, Any] | None:
        """The metrics of the SLM the client ended the run with: its `client_eval` (taken after its final
        local round, clients.final_round), else the 'after' of its last enhancement (a log cut short)."""
        ended = [e for e in self.evals if e.get("client") == client]
        if ended:
            return {k: v for k, v in ended[-1].items() if isinstance(v, dict)}
        last = [
            e["after"]
            for e in self.enhanced
            if e.get("client") == client and isinstance(e.get("after"), dict)
        ]
        return last[-1] if last else None

    def llm_zero_shot(self) -> dict[str, Any] | None:
        return next((e for e in self.llm_evals if e.get("update") == 0), None)

    def llm_final(self) -> dict[str, Any] | None:
        """Last evaluation after at least one tuning step (update 0 is the zero-shot baseline)."""
        tuned = [e for e in self.llm_evals if (_num(e.get("update")) or 0) > 0]
        return tuned[-1] if tuned else None

    def ppl(self, stage: str) -> dict[str, Any] | None:
        hits = [e for e in self.perplexity if e.get("stage") == stage]
        if not hits:
            return None
        return hits[0] if stage == "start" else hits[-1]


def _digest(events: list[dict[str, Any]]) -> _Run:
    run = _Run()
    buckets = {
        "client_trained": run.trained,
        "upload": run.uploads,
        "llm_eval": run.llm_evals,
        "perplexity": run.perplexity,
        "server_update": run.updates,
        "enhanced": run.enhanced,
        "client_eval": run.evals,
    }
    for e in events:
        if not isinstance(e, dict):
            continue
        run.last = e
        kind = e.get("event")
        if kind == "run_start" and not run.run_start:
            run.run_start = e
        elif kind == "run_end":
            run.run_end = e
        elif kind in buckets:
            buckets[kind].append(e)
        if kind in ("upload", "server_update"):
            run.timeline.append(e)
    # Clients in run_start order, then any that only appear later (e.g. run_start missing).
    for c in run.run_start.get("clients") or []:
        if isinstance(c, dict) and c.get("client") is not None:
            name = str(c["client"])
            if name not in run.client_info:
                run.clients.append(name)
                run.client_info[name] = c
    for e in run.trained + run.uploads + run.enhanced:
        other = e.get("client")
        if other is not None and str(other) not in run.client_info:
            run.clients.append(str(other))
            run.client_info[str(other)] = {"client": str(other)}
        if e.get("event") == "upload" and e.get("accepted") and other is not None:
            # a Flower run learns its clients from their uploads (run_start cannot list them)
            info = run.client_info[str(other)]
            for key in ("slm", "train_size"):
                if key in e:
                    info.setdefault(key, e[key])
    return run


# --------------------------------------------------------------------------- report sections


def _status(run: _Run) -> str:
    if run.run_end is None:
        t = _num(run.last.get("t"))
        where = f" at virtual t={t:.0f} s" if t is not None else ""
        return f"**interrupted / incomplete** (no run_end event; the log stops{where})"
    return "**interrupted**" if run.run_end.get("interrupted") else "completed"


def _summary(run: _Run, config: dict[str, Any]) -> str:
    rs, m = run.run_start, run.metrics
    dataset = rs.get("dataset") or _get(config, "data", "name") or _get(config, "data", "dataset") or NA
    labels = ", ".join(run.labels) or NA
    llm = rs.get("llm") or _get(config, "llm", "name") or NA
    seed = rs.get("seed", config.get("seed", NA))
    clients = (
        ", ".join(f"{c} ({run.client_info[c].get('slm', NA)})" for c in run.clients)
        if run.clients
        else "none"
    )
    if run.run_end is not None and _num(run.run_end.get("wall")) is not None:
        wall = _duration(run.run_end.get("wall"))
    else:
        wall = f"{_duration(run.last.get('wall'))} until the last logged event"
    task = f" — {rs['task_description']}" if rs.get("task_description") else ""
    text = _guards(run) + (
        f"Dataset **{dataset}**{task} ({m.label}s: {labels}), seed {seed}. "
        f"{len(run.clients)} client(s): {clients}. Server LLM **{llm}**. "
        f"{run.n_updates} server update(s); wall time {wall}. Status: {_status(run)}."
    )
    text += _first_update(run)
    machine = rs.get("machine")
    if isinstance(machine, dict):
        text += f"\n\nMachine: {describe_machine(machine)}."
    links = "\n".join(f"- [{title}](plots/{name})" for name, title in m.plots.items())
    return f"{text}\n\nPlots:\n\n{links}"


def _guards(run: _Run) -> str:
    """What the run's guards did, first: updates that found no signal, LLM updates undone, enhanced SLMs
    a client refused. Empty when none fired."""
    lines = []
    silent = [u for u in run.updates if u.get("signal") is False]
    if silent:
        which = ", ".join(_int(u.get("update")) for u in silent)
        lines.append(
            f"**No signal at update(s) {which}** of {len(run.updates)}: the SLM ensemble could not tell the "
            f"intended labels of the synthetic texts apart ({silent[0].get('no_signal_reason')}), so those "
            "updates neither tuned the LLM nor distilled into the SLMs. Check that the generator writes your "
            "kind of text (data.task_description, data.label_descriptions) and that the labels can be learnt."
        )
    undone = [u for u in run.updates if u.get("rolled_back")]
    if undone:
        shares = ", ".join(f"{_int(u.get('update'))} ({_pct(_majority_after(u))} %)" for u in undone)
        lines.append(
            f"**LLM updates undone: {shares}** — after tuning, the LLM called that share of S+ by one label, "
            "so its adapter went back to the weights before the update."
        )
    refused = [e for e in run.enhanced if e.get("adopted") == 0]
    if refused:
        items = ", ".join(_refusal(e, run.metrics) for e in refused)
        lines.append(
            f"**{len(refused)} of {len(run.enhanced)} enhanced SLMs refused** by their clients, which kept "
            f"their own weights: {items}."
        )
    return "".join(f"{line}\n\n" for line in lines)


def _refusal(e: dict[str, Any], m: _Metrics) -> str:
    val, key = m.validation, m.primary
    text = (
        f"{e.get('client', NA)} at update {_int(e.get('update'))} (validation {m.validation_name} "
        f"{m.validation_fmt(_get(e, 'before', 'validation', val))} → offered "
        f"{m.validation_fmt(_get(e, 'offered', 'validation', val))}"
    )
    if e.get("worse_share") is not None:  # how sure the client was that the reply is worse
        text += f", worse in {_pct(e['worse_share'])} % of bootstrap draws"
    for split, where in (("local", "own test"), ("global", "global")):  # a simulation has a global split
        if _get(e, "offered", split, key) is not None:
            text += (
                f"; {where} {m.name} kept {_pct(_get(e, 'before', split, key))}{m.unit}, offered "
                f"{_pct(_get(e, 'offered', split, key))}{m.unit}"
            )
    return text + ")"


def _majority_after(update: dict[str, Any]) -> float | None:
    share = update.get("llm_majority_share")  # [before, after] the update's tuning
    return share[1] if isinstance(share, list) and len(share) == 2 else None


def _first_update(run: _Run) -> str:
    """Whether the generator writes the task's kind of text and the SLMs can tell its labels apart: the
    first update's mean q against chance, the ensemble's agreement, and a few of its texts per label."""
    first = next((u for u in run.updates if u.get("update") == 1 and "samples_by_label" in u), None)
    if first is None:
        return ""
    q, chance, agree = (
        _num(first.get("mean_q")),
        _num(first.get("chance_q")),
        _num(first.get("ensemble_agreement")),
    )
    text = "\n\nFirst update: "
    if q is not None:
        text += f"mean q {q:.2f}" + (f" (chance {chance:.2f})" if chance is not None else "")
        if agree is not None:
            text += f"; the SLM ensemble agrees with {_pct(agree)} % of the intended labels"
        text += ". "
    text += "A few of its texts:\n"
    for label, texts in (first.get("samples_by_label") or {}).items():
        text += "".join(f"\n- {label}: {t!r}" for t in texts)
    return text


def _label_counts(info: dict[str, Any]) -> str:
    counts = info.get("label_counts")
    return " / ".join(_int(c) for c in counts) if isinstance(counts, list) and counts else NA


def _slm_section(run: _Run) -> str:
    if not run.clients:
        return "No clients were logged."
    m = run.metrics
    label_order = " / ".join(run.labels) if run.labels else f"per {m.label}"
    headers = [
        "client",
        "SLM",
        "train / test",
        f"{m.label} counts ({label_order})",
        *(
            f"{stage} {split} {abbr}"
            for stage in ("standalone", "final")
            for split in ("local", "global")
            for abbr in (m.abbr, m.secondary_abbr)
        ),
        f"Δ global {m.abbr} ({m.points})",
    ]
    fmts = [_pct, m.secondary_fmt] * 4
    rows: list[list[Any]] = []
    cols: list[list[float | None]] = [[] for _ in range(8)]
    deltas: list[float | None] = []
    for c in run.clients:
        info = run.client_info[c]
        base = run.standalone(c) or {}
        fin = run.final(c) or {}
        vals = [
            _get(d, split, key)
            for d in (base, fin)
            for split in ("local", "global")
            for key in (m.primary, m.secondary)
        ]
        for col, v in zip(cols, vals, strict=True):
            col.append(_num(v))
        b, f = _num(vals[2]), _num(vals[6])
        deltas.append(None if b is None or f is None else f - b)
        size = f"{_int(info.get('train_size'))} / {_int(info.get('test_size'))}"
        rows.append(
            [c, info.get("slm", NA), size, _label_counts(info)]
            + [f(v) for f, v in zip(fmts, vals, strict=True)]
            + [_pp(vals[2], vals[6])]
        )
    means = [_mean(col) for col in cols]
    mean_delta = _mean(deltas)
    rows.append(
        ["**mean**", "", "", ""]
        + [f(v) for f, v in zip(fmts, means, strict=True)]
        + [NA if mean_delta is None else f"{100 * mean_delta:+.1f}"]
    )
    notes = (
        f"{m.slm_note} *local* = the client's own test split, *global* = the shared "
        "test set. *Standalone* = round 1 (local training only); *final* = the SLM the client ends the "
        "run with (after its final local round when its last reply changed it, clients.final_round). "
        "Means are over the clients that have a value; the mean Δ only over clients with both."
    )
    return _md_table(headers, rows, "lllr" + "r" * 9) + "\n\n" + notes


def _enhanced_section(run: _Run) -> str:
    """Before → after of each enhancement; a generation task also shows the global target perplexity,
    which can worsen while ROUGE-L improves."""
    if not run.enhanced:
        return "No client was enhanced (no `enhanced` events)."
    m = run.metrics
    plain = not m.secondary_pct  # a secondary metric that is not a share gets its own column
    rows = []
    for e in run.enhanced:
        local = (_get(e, "before", "local", m.primary), _get(e, "after", "local", m.primary))
        glob = (_get(e, "before", "global", m.primary), _get(e, "after", "global", m.primary))
        row = [_int(e.get("update")), e.get("client", NA), _arrow(*local), _arrow(*glob), _pp(*glob)]
        if plain:
            before, after = _get(e, "before", "global", m.secondary), _get(e, "after", "global", m.secondary)
            row.append(f"{m.secondary_fmt(before)} → {m.secondary_fmt(after)}")
        rows.append([*row, "**refused**" if e.get("adopted") == 0 else "yes"])
    headers = [
        "update",
        "client",
        f"local {m.abbr} {m.scale} before → after",
        f"global {m.abbr} {m.scale} before → after",
        f"Δ global ({m.points})",
        *([f"global {m.secondary_abbr} before → after"] if plain else []),
        "adopted",
    ]
    return _md_table(headers, rows, "rlrrr" + "r" * plain + "l")


def _llm_change(run: _Run, zs: dict[str, Any], fin: dict[str, Any]) -> str:
    """Zero-shot → final of the LLM's headline numbers (the part after 'update N): ')."""
    if run.metrics.kind == "generation":
        return (
            f"ROUGE-L {_arrow(zs.get('rouge_l'), fin.get('rouge_l'))} "
            f"({_pp(zs.get('rouge_l'), fin.get('rouge_l'))} points), target perplexity "
            f"{_fmt2(zs.get('target_perplexity'))} → {_fmt2(fin.get('target_perplexity'))}"
        )
    return (
        f"raw accuracy {_arrow(zs.get('raw_accuracy'), fin.get('raw_accuracy'))} "
        f"({_pp(zs.get('raw_accuracy'), fin.get('raw_accuracy'))} pp), calibrated "
        f"{_arrow(zs.get('calibrated_accuracy'), fin.get('calibrated_accuracy'))} "
        f"({_pp(zs.get('calibrated_accuracy'), fin.get('calibrated_accuracy'))} pp)"
    )


def _llm_section(run: _Run) -> str:
    parts = []
    columns = run.metrics.llm_columns
    if run.llm_evals:
        rows = []
        for e in sorted(run.llm_evals, key=lambda e: _num(e.get("update")) or 0):
            upd = _int(e.get("update"))
            rows.append(
                [
                    f"{upd} (zero-shot)" if e.get("update") == 0 else upd,
                    *(fmt(e.get(key)) for _, key, fmt in columns),
                    _int(e.get("n")),
                ]
            )
        headers = ["update", *(header for header, _, _ in columns), "n"]
        parts.append(_md_table(headers, rows, "l" + "r" * (len(columns) + 1)))
        zs, fin = run.llm_zero_shot(), run.llm_final()
        if zs and fin:
            parts.append(
                f"Zero-shot → final (update {_int(fin.get('update'))}): {_llm_change(run, zs, fin)}."
            )
    else:
        parts.append("No LLM evaluation was logged.")
    start, end = run.ppl("start"), run.ppl("end")
    s, p = (start or {}).get("perplexity"), (end or {}).get("perplexity")
    end_txt = (
        _fmt(p, 2) if end else f"{NA} (no end measurement{' — run interrupted' if run.interrupted else ''})"
    )
    parts.append(
        f"Held-out perplexity: start {_fmt(s, 2)} → end {end_txt}; relative change {_rel_change(s, p)} "
        f"(lower is better; tokens: {_int((start or {}).get('tokens'))} / {_int((end or {}).get('tokens'))})."
    )
    return "\n\n".join(parts)


def _client_map(d: Any, fmt: str) -> str:
    """'client: value' pairs; a per-label value (a list) shows as value/value/..."""
    if not isinstance(d, dict) or not d:
        return NA

    def one(v: Any) -> str:
        if isinstance(v, list):
            return "/".join(one(x) for x in v)
        return fmt.format(v) if _num(v) is not None else NA

    return ", ".join(f"{k}: {one(v)}" for k, v in d.items())


def _loss(d: Any) -> str:
    if not isinstance(d, dict) or not d:
        return NA
    order = ["total", "qg", "task", "pr"]
    keys = [k for k in order if k in d] + [k for k in d if k not in order]
    return " · ".join(f"{k} {_num(d[k]):.4g}" if _num(d[k]) is not None else f"{k} {NA}" for k in keys)


def _tau(run: _Run, config: dict[str, Any]) -> float | None:
    """The threshold the server used (logged with each update; feedback.tau may be 'auto')."""
    logged = [t for t in (_num(u.get("tau")) for u in run.updates) if t is not None]
    return logged[-1] if logged else _num(_get(config, "feedback", "tau"))


def _synthetic_section(run: _Run, config: dict[str, Any]) -> str:
    """One row per server update; a generation task also counts the pairs dropped as unparsable or
    repeated, the first thing to check when few pairs are kept."""
    m = run.metrics
    dropped = m.kind == "generation"
    tau = _tau(run, config)
    tau_txt = f"{tau:g}" if tau is not None else NA
    if not run.updates:
        return "No server update happened (no `server_update` events), so no synthetic data was generated."
    rows = []
    for u in run.updates:
        per_label = u.get("splus_per_label")
        splus = _int(u.get("splus_size"))
        if isinstance(per_label, list) and per_label:
            splus += f" ({' / '.join(_int(x) for x in per_label)})"
        missing = u.get("labels_without_candidates")
        if isinstance(missing, list) and missing:  # under missing_labels 'fill' these were topped up by q
            splus += f"; no candidate: {', '.join(map(str, missing))}"
        distilled = _int(u.get("distilled_size"))
        if isinstance(d_per := u.get("distilled_per_label"), list) and d_per:
            distilled += f" ({' / '.join(_int(x) for x in d_per)})"
        trig = u.get("trigger_clients")
        rows.append(
            [
                _int(u.get("update")),
                ", ".join(map(str, trig)) if isinstance(trig, list) and trig else NA,
                _int(u.get("generated")),
                _int(u.get("kept")),
                *([_int(u.get("malformed")), _int(u.get("duplicates"))] if dropped else []),
                _fmt(u.get("mean_q")),
                _pct(u.get("share_q_ge_tau")),
                splus,
                distilled,
                _fmt(u.get("distinct2")),
                _loss(u.get("loss")),
                _client_map(u.get("staleness"), "{:.0f}"),
                _client_map(u.get("weights"), "{:.3f}"),
                _fmt(u.get("gen_tokens_per_s"), 1),
                _fmt(u.get("seconds"), 1),
            ]
        )
    headers = [
        "update",
        "trigger clients",
        "generated",
        "kept",
        *(["malformed", "duplicates"] if dropped else []),
        "mean q",
        f"share q ≥ τ (%, τ={tau_txt})",
        f"S+ size (per {m.label})",
        f"distilled (per {m.label})",
        "distinct-2",
        "loss",
        "staleness",
        "weight",
        "gen tok/s",
        "seconds",
    ]
    return _md_table(headers, rows, "rlrr" + "rr" * dropped + "rrrrrlllrr")


def _async_section(run: _Run) -> str:
    if not run.timeline:
        return "No uploads were logged."
    rows = []
    for e in run.timeline:
        if e.get("event") == "upload":
            accepted = e.get("accepted")
            outcome = "accepted" if accepted else f"rejected: {e.get('reason') or 'no reason given'}"
            if accepted is None:
                outcome = NA
            mb = _num(e.get("bytes"))
            rows.append(
                [
                    _fmt(e.get("t"), 1),
                    "upload",
                    e.get("client", NA),
                    _int(e.get("round")),
                    _int(e.get("staleness")),
                    outcome,
                    NA if mb is None else f"{mb / 1e6:.1f}",
                ]
            )
        else:
            trig = e.get("trigger_clients")
            rows.append(
                [
                    _fmt(e.get("t"), 1),
                    f"**server update {_int(e.get('update'))}**",
                    ", ".join(map(str, trig)) if isinstance(trig, list) else NA,
                    "",
                    _client_map(e.get("staleness"), "{:.0f}"),
                    f"kept {_int(e.get('kept'))} / {_int(e.get('generated'))}",
                    "",
                ]
            )
    headers = ["t (virtual s)", "event", "client(s)", "round", "staleness", "outcome", "MB"]
    order = " → ".join(f"{e.get('client', NA)} r{_int(e.get('round'))}" for e in run.uploads)
    n_ok = sum(1 for e in run.uploads if e.get("accepted"))
    head = (
        f"{len(run.uploads)} upload(s), {n_ok} accepted. Upload order: {order or NA}.\n\n"
        "Uploads and server updates in log order (virtual time), showing how clients interleave:"
    )
    return head + "\n\n" + _md_table(headers, rows, "rllrrlr")


# --------------------------------------------------------------------------- plots


def _new_fig(title: str, ylabel: str) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A bare Figure (no pyplot) renders with Agg, needs no display and is never registered in
    # pyplot's global figure list, so nothing accumulates across calls.
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("server update")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Figure, ax: Any, path: Path, empty_msg: str | None) -> None:
    if empty_msg is not None:
        ax.set_axis_off()
        ax.text(0.5, 0.5, empty_msg, ha="center", va="center", transform=ax.transAxes, wrap=True)
    elif ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fig.clear()
    atomic_write_bytes(path, buf.getvalue())


def _plot_slm(run: _Run, path: Path) -> None:
    m = run.metrics
    fig, ax = _new_fig(f"Client SLM {m.name} on the global test set", f"global {m.name} ({m.scale})")
    drawn = False
    for c in run.clients:
        pts: list[tuple[float, float]] = []
        base = _num(_get(run.standalone(c), "global", m.primary))
        if base is not None:
            pts.append((0.0, 100 * base))
        for e in run.enhanced:
            x, y = _num(e.get("update")), _num(_get(e, "after", "global", m.primary))
            if e.get("client") == c and x is not None and y is not None:
                pts.append((x, 100 * y))
        if pts:
            pts.sort(key=lambda p: p[0])
            slm = run.client_info[c].get("slm")
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{c} ({slm})" if slm else c)
            drawn = True
    _save(fig, ax, path, None if drawn else f"no client {m.name} logged (run interrupted?)")


def _series(evals: list[dict[str, Any]], key: str, scale: float) -> list[tuple[float, float]]:
    pts = [(_num(e.get("update")), _num(e.get(key))) for e in evals]
    return [(x, scale * y) for x, y in pts if x is not None and y is not None]


def _plot_llm(run: _Run, path: Path) -> None:
    """Classification: raw and calibrated accuracy. Generation: ROUGE-L, with the target perplexity on a
    second axis since it is on another scale and lower is better."""
    m = run.metrics
    fig, ax = _new_fig(f"Server LLM {m.llm_what} (update 0 = zero-shot)", f"{m.name} ({m.scale})")
    evals = sorted(run.llm_evals, key=lambda e: _num(e.get("update")) or 0)
    drawn = False
    series = (
        (("rouge_l", "ROUGE-L"),)
        if m.kind == "generation"
        else (("raw_accuracy", "raw"), ("calibrated_accuracy", "calibrated"))
    )
    for key, label in series:
        if xy := _series(evals, key, 100.0):
            ax.plot(*zip(*xy, strict=True), marker="o", label=label)
            drawn = True
    if m.kind == "generation" and (xy := _series(evals, "target_perplexity", 1.0)):
        right = ax.twinx()
        right.set_ylabel("target perplexity (lower is better)")
        right.plot(
            *zip(*xy, strict=True), marker="s", linestyle="--", color="tab:red", label="target perplexity"
        )
        handles, labels = ax.get_legend_handles_labels()
        more, more_labels = right.get_legend_handles_labels()
        ax.legend(handles + more, labels + more_labels, fontsize="small")
        ax.set_zorder(right.get_zorder() + 1)  # the legend above the second axis's line
        ax.patch.set_visible(False)
        drawn = True
    _save(fig, ax, path, None if drawn else "no LLM evaluation logged")


def _plot_synthetic(run: _Run, tau: float | None, path: Path) -> None:
    fig, ax = _new_fig("Synthetic data quality", "value")
    share_label = f"share q ≥ τ (τ={tau:g})" if tau is not None else "share q ≥ τ"
    drawn = False
    for key, label in (("mean_q", "mean q"), ("share_q_ge_tau", share_label), ("distinct2", "distinct-2")):
        pts = [(_num(u.get("update")), _num(u.get(key))) for u in run.updates]
        xy = [(x, y) for x, y in pts if x is not None and y is not None]
        if xy:
            ax.plot(*zip(*xy, strict=True), marker="o", label=label)
            drawn = True
    if drawn and tau is not None:
        ax.axhline(tau, color="grey", linestyle="--", linewidth=1, label="τ (threshold on q)")
    _save(fig, ax, path, None if drawn else "no server update logged")


# --------------------------------------------------------------------------- public API


def write_report(run_dir: Path, events: list[dict], config: dict) -> Path:
    """Write run_dir/report.md and run_dir/plots/*.png from the run's events; returns the report path.

    Never raises on missing or partial events, so it can run after a crash or Ctrl-C.
    """
    run_dir = Path(run_dir)
    config = config if isinstance(config, dict) else {}
    run = _digest(events or [])
    m = run.metrics
    plots = run_dir / "plots"
    tau = _tau(run, config)
    _plot_slm(run, plots / m.slm_plot)
    _plot_llm(run, plots / m.llm_plot)
    _plot_synthetic(run, tau, plots / SYNTHETIC_PLOT)

    dataset = run.run_start.get("dataset") or "run"
    sections = [
        f"# CrossLM run report: {dataset}",
        _summary(run, config),
        "## Client SLMs: standalone vs. final",
        _slm_section(run),
        "## Enhancements",
        _enhanced_section(run),
        "## Server LLM",
        _llm_section(run),
        "## Synthetic data per server update",
        _synthetic_section(run, config),
        "## Asynchrony",
        _async_section(run),
        "## Plots",
        "\n\n".join(f"![{title}](plots/{name})" for name, title in m.plots.items()),
        "## Configuration",
        "<details><summary>resolved config</summary>\n\n```json\n"
        + json.dumps(config, indent=2, sort_keys=True, default=str)
        + "\n```\n\n</details>",
    ]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return path


def summary_table(events: list[dict]) -> str:
    """A compact fixed-width summary for the terminal: the headline numbers without opening the report."""
    run = _digest(events or [])
    m = run.metrics
    rows = [["client", "SLM", "standalone", "final", f"Δ {m.points}"]]
    base_all: list[float | None] = []
    fin_all: list[float | None] = []
    for c in run.clients:
        b = _get(run.standalone(c), "global", m.primary)
        f = _get(run.final(c), "global", m.primary)
        base_all.append(_num(b))
        fin_all.append(_num(f))
        rows.append([c, str(run.client_info[c].get("slm", NA)), _pct(b), _pct(f), _pp(b, f)])
    if run.clients:
        deltas = [f - b for b, f in zip(base_all, fin_all, strict=True) if b is not None and f is not None]
        mean_delta = NA if not deltas else f"{100 * sum(deltas) / len(deltas):+.1f}"
        rows.append(["mean", "", _pct(_mean(base_all)), _pct(_mean(fin_all)), mean_delta])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"Client SLMs, global test {m.name} ({m.scale})"]
    for r in rows:
        left = "  ".join(r[i].ljust(widths[i]) for i in range(2))
        right = "  ".join(r[i].rjust(widths[i]) for i in range(2, 5))
        lines.append(f"  {left}  {right}".rstrip())
    zs, fin = run.llm_zero_shot() or {}, run.llm_final() or {}
    fin_upd = f" (update {_int(fin.get('update'))})" if fin else ""
    if m.kind == "generation":
        lines.append(
            f"LLM zero-shot → final{fin_upd}: ROUGE-L (×100) {_arrow(zs.get('rouge_l'), fin.get('rouge_l'))}"
            f", target perplexity {_fmt2(zs.get('target_perplexity'))} → {_fmt2(fin.get('target_perplexity'))}"
        )
    else:
        lines.append(
            f"LLM accuracy (%), zero-shot → final{fin_upd}: raw {_arrow(zs.get('raw_accuracy'), fin.get('raw_accuracy'))}"
            f", calibrated {_arrow(zs.get('calibrated_accuracy'), fin.get('calibrated_accuracy'))}"
        )
    s = (run.ppl("start") or {}).get("perplexity")
    e = (run.ppl("end") or {}).get("perplexity")
    lines.append(f"LLM held-out perplexity: {_fmt(s, 2)} → {_fmt(e, 2)} ({_rel_change(s, e)})")
    status = "completed" if not run.interrupted else "INTERRUPTED / incomplete"
    lines.append(f"Server updates: {run.n_updates}; status: {status}")
    return "\n".join(lines)
