"""From finished cells to the experiment's table: results.csv (one row per cell), results.md (mean and
standard deviation over seeds, the targets the table is held against) and plots."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from crosslm.io import atomic_write_text, read_jsonl
from crosslm.precision import describe_machine

ZERO_SHOT = "llm-zero-shot"  # a row read from the CrossLM cells' update-0 evaluation, not a run of its own
COLUMNS = [
    "task", "method", "seed", "slm_acc", "slm_served_acc", "slm_f1", "slm_local_acc", "slm_start_acc", "slm_reply_gain", "llm_acc",
    "llm_raw_acc", "llm_cal_acc", "ppl_start", "ppl_end", "ppl_change_pct", "fidelity_first", "fidelity_last",
    "fidelity_q_ge_tau", "fidelity_distilled", "distinct2_first", "distinct2_last", "synthetic", "upload_mib_per_client",
    "download_mib_per_client", "client_seconds", "server_seconds", "wall_seconds", "refused_replies", "replies_min",
    "no_signal_updates", "llm_rollbacks", "machine",
    # a generation task's measures (ROUGE-L F1 in [0, 1], perplexities per token)
    "slm_rouge_l", "slm_served_rouge_l", "slm_local_rouge_l", "slm_start_rouge_l", "slm_target_ppl", "llm_rouge_l",
    "llm_target_ppl", "judge_ppl_last", "judge_real_like_last", "judge_ppl_distilled", "judge_real_like_distilled",
]  # fmt: skip


def _is_number(x: Any) -> TypeGuard[float]:
    return isinstance(x, int | float) and not math.isnan(x)


def _mean(xs: Sequence[float | None]) -> float:
    return mean_std(xs)[0]


def cell_row(run_dir: Path, judge: Any = None) -> dict[str, Any]:
    """The measures of one finished cell (SLM numbers on the global test split unless named local). `judge`
    is the task kind's judge: (classifier, tokenizer, labels, tau) or a `WriterJudge`."""
    ev = read_jsonl(run_dir / "metrics.jsonl")
    by: dict[str, list[dict]] = defaultdict(list)
    for e in ev:
        by[str(e.get("event"))].append(e)
    kind = (by["run_start"] or [{}])[0].get("task_kind", "classification")
    ppl = {e["stage"]: e["perplexity"] for e in by["perplexity"]}
    updates = by["server_update"]
    row: dict[str, Any] = {
        "kind": kind,
        "ppl_start": ppl.get("start", float("nan")),
        "ppl_end": ppl.get("end", float("nan")),
        "distinct2_first": updates[0].get("distinct2", float("nan")) if updates else float("nan"),
        "distinct2_last": updates[-1].get("distinct2", float("nan")) if updates else float("nan"),
        "upload_mib_per_client": _per_client_mib(by["upload"], "bytes", accepted_only=True),
        "download_mib_per_client": _per_client_mib(by["enhanced"], "bytes"),
        "client_seconds": sum(e.get("seconds", 0.0) for e in by["client_trained"]),
        "server_seconds": sum(e.get("seconds", 0.0) for e in updates),
        "wall_seconds": by["run_end"][-1].get("wall", float("nan")) if by["run_end"] else float("nan"),
        "refused_replies": sum(1 for e in by["enhanced"] if e.get("adopted") == 0),  # the guards' work
        "replies_min": _fewest_replies(by),
        "no_signal_updates": sum(1 for e in updates if e.get("signal") is False),
        "llm_rollbacks": sum(1 for e in updates if e.get("rolled_back")),
        "machine": describe_machine(m) if (m := (by["run_start"] or [{}])[0].get("machine")) else "",
    }
    row["ppl_change_pct"] = 100 * (row["ppl_end"] / row["ppl_start"] - 1) if ppl else float("nan")
    syn = read_jsonl(run_dir / "synthetic.jsonl") if (run_dir / "synthetic.jsonl").exists() else []
    row["synthetic"] = len(syn)
    if kind == "generation":
        row.update(_generation_measures(by, syn, judge))
    else:
        row.update(_classification_measures(by, syn, judge))
    return row


def _fewest_replies(by: dict[str, list[dict]]) -> int:
    """Server replies to the least-served client (adopted or refused): 0 means the schedule never let the
    method reach some client, whose final SLM is the same under every method."""
    clients = {e["client"] for e in by["client_trained"]}
    replies = [sum(1 for e in by["enhanced"] if e.get("client") == c) for c in clients]
    return min(replies, default=0)


def _slm_measures(by: dict[str, list[dict]], metric: str, name: str) -> dict[str, Any]:
    """The SLMs' global-test `metric` at the end (`slm_{name}`), for the served clients, on their own test
    splits, at the start, and at each reply, plus the final value per client."""
    final = _final_evals(by)
    start = {e["client"]: e for e in by["client_trained"] if e.get("round") == 1}
    served = {e["client"] for e in by["enhanced"]}
    return {
        f"slm_{name}": _mean([_get(e, "global", metric) for e in final.values()]),
        # A client the server never replied to (the slowest, when updates < clients) ends the same under
        # every method: the virtual clock, not the method, decides who is served, so this is a like-for-like
        # subset that shows what a reply is worth without that dilution.
        f"slm_served_{name}": _mean([_get(e, "global", metric) for c, e in final.items() if c in served]),
        f"slm_local_{name}": _mean([_get(e, "local", metric) for e in final.values()]),
        f"slm_start_{name}": _mean([_get(e, "global", metric) for e in start.values()]),
        "slm_reply_gain": _mean([_reply_gain(e, metric) for e in by["enhanced"]]),
        "per_client": {c: _get(e, "global", metric) for c, e in final.items()},
    }


def _final_evals(by: dict[str, list[dict]]) -> dict[str, dict]:
    """The last evaluation of each client."""
    return {e["client"]: e for e in by["client_eval"]}


def _last_tuned_llm_eval(by: dict[str, list[dict]]) -> dict:
    """The LLM's last evaluation after a tuning ({} when it was never tuned: that LLM is the zero-shot row,
    not a row of its own)."""
    tuned = [e for e in by["llm_eval"] if e["update"] > 0]
    return tuned[-1] if tuned else {}


def _classification_measures(by: dict[str, list[dict]], syn: list[dict], judge: Any) -> dict[str, Any]:
    llm, last = by["llm_eval"], _last_tuned_llm_eval(by)
    row: dict[str, Any] = {
        **_slm_measures(by, "accuracy", "acc"),
        "slm_f1": _mean([_get(e, "global", "macro_f1") for e in _final_evals(by).values()]),
        "llm_raw_acc": last.get("raw_accuracy", float("nan")),
        "llm_cal_acc": last.get("calibrated_accuracy", float("nan")),
        "llm_zero_shot": _best_zero_shot(llm[0]) if llm else None,
    }
    row["llm_acc"] = _nanmax(row["llm_raw_acc"], row["llm_cal_acc"])
    nan = float("nan")
    row.update(fidelity_first=nan, fidelity_last=nan, fidelity_q_ge_tau=nan, fidelity_distilled=nan)
    if judge is not None and syn:
        from crosslm.evaluation.judge import label_fidelity

        model, tok, labels, tau = judge

        def fid(rows: list[dict]) -> float:
            return label_fidelity(
                model, tok, [r["text"] for r in rows], [labels.index(r["label"]) for r in rows]
            )

        first, last_u = min(r["update"] for r in syn), max(r["update"] for r in syn)
        row["fidelity_first"] = fid([r for r in syn if r["update"] == first])
        row["fidelity_last"] = fid([r for r in syn if r["update"] == last_u])
        scored = [
            r for r in syn if isinstance(r.get("q"), float) and not math.isnan(r["q"]) and r["q"] >= tau
        ]
        row["fidelity_q_ge_tau"] = fid(scored) if scored else float("nan")
        if by["distilled"]:
            row["fidelity_distilled"] = distilled_fidelity(by["distilled"][-1], syn, model, tok)
    return row


@dataclass
class WriterJudge:
    """A generation task's judge (crosslm.evaluation.judge.load_writer_judge) with what scoring needs."""

    model: Any
    tokenizer: Any
    fmt: Any
    reference: float
    """The median per-token log-likelihood of the real global-test pairs under the judge."""


def _generation_measures(
    by: dict[str, list[dict]], syn: list[dict], judge: WriterJudge | None
) -> dict[str, Any]:
    llm, last = by["llm_eval"], _last_tuned_llm_eval(by)
    row: dict[str, Any] = {
        **_slm_measures(by, "rouge_l", "rouge_l"),
        "slm_target_ppl": _mean([_get(e, "global", "target_perplexity") for e in _final_evals(by).values()]),
        "llm_rouge_l": last.get("rouge_l", float("nan")),
        "llm_target_ppl": last.get("target_perplexity", float("nan")),
        "llm_zero_shot": llm[0].get("rouge_l") if llm else None,
    }
    nan = float("nan")
    row.update(
        judge_ppl_last=nan, judge_real_like_last=nan, judge_ppl_distilled=nan, judge_real_like_distilled=nan
    )
    if judge is not None and syn:
        from crosslm.evaluation.judge import pair_quality

        def quality(rows: list[dict]) -> dict[str, float]:
            return pair_quality(judge.model, judge.tokenizer, [r["input"] for r in rows], [r["target"] for r in rows],
                                fmt=judge.fmt, reference=judge.reference)  # fmt: skip

        last_u = max(r["update"] for r in syn)
        q = quality([r for r in syn if r["update"] == last_u])
        row.update(judge_ppl_last=q["target_perplexity"], judge_real_like_last=q["real_like"])
        if by["distilled"]:
            by_hash = {r["hash"]: r for r in syn}
            rows = [by_hash[h] for h in by["distilled"][-1]["hashes"] if h in by_hash]
            q = quality(rows)
            row.update(judge_ppl_distilled=q["target_perplexity"], judge_real_like_distilled=q["real_like"])
    return row


def distilled_fidelity(event: dict, syn: list[dict], model: Any, tok: Any) -> float:
    """The judge's label fidelity of what the last update's replies were distilled on: the share of the
    loss weight on texts whose target's most likely label the judge agrees with."""
    from crosslm.evaluation.judge import judge_predictions

    text = {r["hash"]: r["text"] for r in syn}
    rows = [
        (text[h], y, w)
        for h, y, w in zip(event["hashes"], event["labels"], event["weights"], strict=True)
        if h in text
    ]
    if not rows:
        return float("nan")
    pred = judge_predictions(model, tok, [t for t, _, _ in rows])
    agree = sum(w for (_, y, w), p in zip(rows, pred, strict=True) if p == y)
    return agree / sum(w for _, _, w in rows)


def _reply_gain(e: dict, metric: str = "accuracy") -> float | None:
    """Global-test `metric` of a client's SLM just after the server's reply minus just before it: what the
    reply itself did (distillation under CrossLM and KD, extra local epochs under standalone), before the
    client's next local round moves it again."""
    after, before = _get(e, "after", "global", metric), _get(e, "before", "global", metric)
    return None if after is None or before is None else after - before


def _best_zero_shot(e: dict) -> float:
    """The zero-shot baseline at its best: max over label-word forms, raw and calibrated."""
    forms = [e, *(e.get("label_word_variants") or {}).values()]
    return max(max(f.get("raw_accuracy", 0.0), f.get("calibrated_accuracy", 0.0)) for f in forms)


def _get(d: dict, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, int | float) else None


def _nanmax(a: float, b: float) -> float:
    vals = [x for x in (a, b) if x is not None and not math.isnan(x)]
    return max(vals) if vals else float("nan")


def _per_client_mib(events: list[dict], key: str, accepted_only: bool = False) -> float:
    per: dict[str, int] = defaultdict(int)
    for e in events:
        if key in e and (not accepted_only or e.get("accepted")):
            per[str(e.get("client"))] += int(e[key])
    return _mean([v / 2**20 for v in per.values()]) if per else 0.0


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    xs = [x for x in values if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return sum(xs) / len(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(m: float, s: float, scale: float = 100.0, digits: int = 1) -> str:
    if math.isnan(m):
        return "–"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def write_results(exp: Any, root: Path) -> Path:
    """Judge, measure and tabulate every finished cell of the experiment under `root`."""
    from crosslm.experiment.grid import cell_config, cell_done, cell_name, cells, config_drift

    rows: list[dict[str, Any]] = []
    judges: dict[tuple[str, int], Any] = {}
    judge_info: dict[str, dict] = {}
    drift: dict[str, list[tuple[str, Any, Any]]] = {}
    for task, method, seed in cells(exp):
        run_dir = root / "cells" / cell_name(task, method, seed)
        if not cell_done(run_dir):
            continue
        cfg = cell_config(exp, task, method, seed, root / "cells")
        if diffs := config_drift(run_dir, cfg):
            drift[run_dir.name] = diffs
        if (task, seed) not in judges:
            judges[(task, seed)] = _judge(cfg, exp)
        judge, info = judges[(task, seed)]
        judge_info[f"{task}, seed {seed}"] = info
        row = {"task": task, "method": method, "seed": seed, **cell_row(run_dir, judge)}
        rows.append(row)
        if method == "crosslm" and row["llm_zero_shot"] is not None:
            llm_key = "llm_rouge_l" if row["kind"] == "generation" else "llm_acc"
            rows.append({"task": task, "method": ZERO_SHOT, "seed": seed, "kind": row["kind"],
                         llm_key: row["llm_zero_shot"], "ppl_start": row["ppl_start"], "ppl_end": row["ppl_start"],
                         "ppl_change_pct": 0.0})  # fmt: skip
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in COLUMNS})
    atomic_write_text(root / "results.csv", buf.getvalue())
    atomic_write_text(root / "results.md", results_markdown(rows, exp, judge_info, drift))
    plot_curves(root, exp)
    return root


def _judge(cfg: Any, exp: Any) -> tuple[Any, dict]:
    """(the judge `cell_row` takes, its info) for a cell's task, trained on the data outside its global test
    split: a classifier for a classification task, a writer judge for a generation task."""
    from crosslm.evaluation.judge import judge_training_data, load_judge, load_writer_judge
    from crosslm.lifecycle import load_data, split_task_data
    from crosslm.modeling.causal_slm import PairFormat

    task, data = load_data(cfg)  # loaded once: the judge needs the data beyond the split
    split = split_task_data(cfg, task, data)
    train = judge_training_data(data, split.global_test_idx, exp.judge_max_examples, cfg.seed)
    if task.kind == "generation":
        fmt = PairFormat(task.target_noun, max_input_tokens=cfg.clients.max_length,
                         max_target_tokens=cfg.generation_task.max_target_tokens)  # fmt: skip
        model, tok, info = load_writer_judge(task, train, split.global_test, fmt=fmt, epochs=exp.judge_epochs,
                                             seed=cfg.seed)  # fmt: skip
        return WriterJudge(model, tok, fmt, info["global_test"]["median_loglik"]), info
    model, tok, info = load_judge(task, train, split.global_test, epochs=exp.judge_epochs, seed=cfg.seed)
    return (model, tok, list(task.labels), cfg.feedback.threshold(task.num_labels)), info


TABLES = [
    ("SLM accuracy on the global test split (%), final", "slm_acc", 100.0),
    (
        "SLM accuracy on the global test split (%), final, only the clients the server replied to "
        "(the virtual clock serves the same clients under every method)",
        "slm_served_acc",
        100.0,
    ),
    ("SLM macro-F1 on the global test split (%), final", "slm_f1", 100.0),
    ("SLM accuracy on each client's own test split (%), final", "slm_local_acc", 100.0),
    (
        "SLM accuracy gain at a server reply (points on the global test split, mean over replies)",
        "slm_reply_gain",
        100.0,
    ),
    ("LLM task accuracy (%), best of raw and calibrated", "llm_acc", 100.0),
    ("LLM held-out perplexity change (%)", "ppl_change_pct", 1.0),
    ("Synthetic label fidelity, judge (%), last update's samples", "fidelity_last", 100.0),
    ("Synthetic label fidelity, judge (%), first update's samples", "fidelity_first", 100.0),
    (
        "Synthetic label fidelity, judge (%), every update's samples the SLMs scored q ≥ tau",
        "fidelity_q_ge_tau",
        100.0,
    ),
    (
        "Label fidelity of the data the SLMs were distilled on, judge (%), last update",
        "fidelity_distilled",
        100.0,
    ),
    ("Synthetic distinct-2, last update", "distinct2_last", 1.0),
    ("Server replies to the least-served client", "replies_min", 1.0),
    ("Upload per client (MiB)", "upload_mib_per_client", 1.0),
    ("Client compute (s, all clients)", "client_seconds", 1.0),
    ("Server compute (s)", "server_seconds", 1.0),
]


GENERATION_TABLES = [
    ("SLM ROUGE-L F1 on the global test split (x100), final", "slm_rouge_l", 100.0),
    (
        "SLM ROUGE-L F1 on the global test split (x100), final, only the clients the server replied to",
        "slm_served_rouge_l",
        100.0,
    ),
    ("SLM ROUGE-L F1 on each client's own test split (x100), final", "slm_local_rouge_l", 100.0),
    (
        "SLM ROUGE-L gain at a server reply (points on the global test split, mean over replies)",
        "slm_reply_gain",
        100.0,
    ),
    ("SLM per-token perplexity of the global test split's targets, final", "slm_target_ppl", 1.0),
    ("LLM ROUGE-L F1 (x100)", "llm_rouge_l", 100.0),
    ("LLM per-token perplexity of the reference targets", "llm_target_ppl", 1.0),
    ("LLM held-out perplexity change (%)", "ppl_change_pct", 1.0),
    (
        "Synthetic pairs, the writer judge's per-token perplexity of their targets, last update",
        "judge_ppl_last",
        1.0,
    ),
    (
        "Synthetic pairs whose target the writer judge finds at least as likely as the median real pair's (%), "
        "last update",
        "judge_real_like_last",
        100.0,
    ),
    (
        "The pairs the SLMs were distilled on, writer judge's perplexity, last update",
        "judge_ppl_distilled",
        1.0,
    ),
    (
        "The pairs the SLMs were distilled on, share at least as likely as the median real pair (%), last update",
        "judge_real_like_distilled",
        100.0,
    ),
    ("Synthetic distinct-2 of the targets, last update", "distinct2_last", 1.0),
    ("Server replies to the least-served client", "replies_min", 1.0),
    ("Upload per client (MiB)", "upload_mib_per_client", 1.0),
    ("Client compute (s, all clients)", "client_seconds", 1.0),
    ("Server compute (s)", "server_seconds", 1.0),
]


def results_markdown(
    rows: list[dict[str, Any]],
    exp: Any,
    judges: dict[str, dict] | None = None,
    drift: dict[str, list[tuple[str, Any, Any]]] | None = None,
) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    out = [f"# Experiment '{exp.name}'", "",
           f"Tasks: {', '.join(tasks)}; seeds: {seeds}; each cell is one `crosslm run` with the method's preset "
           f"on `{exp.base_config}` + {exp.overrides or 'no overrides'}. Mean ± standard deviation over seeds.", ""]  # fmt: skip
    validation = (exp.overrides or {}).get("eval.split") == "validation"
    # a tuning run: its "global" numbers are on the validation split
    where = "the validation split (eval.split)" if validation else "the global test split"
    for kind in ("classification", "generation"):
        kind_rows = [r for r in rows if r.get("kind", "classification") == kind]
        if not kind_rows:
            continue
        kind_tasks = list(dict.fromkeys(r["task"] for r in kind_rows))
        methods = [m for m in [*exp.methods, ZERO_SHOT] if any(r["method"] == m for r in kind_rows)]
        tables = GENERATION_TABLES if kind == "generation" else TABLES
        out += _tables(kind_rows, kind_tasks, methods, seeds, tables, where)
        if kind == "generation":
            out += paired_section(kind_rows, kind_tasks, methods, where, "slm_rouge_l", metric="ROUGE-L F1")
            out += paired_section(kind_rows, kind_tasks, methods, where, "slm_served_rouge_l",
                                  " of the clients the server replied to", metric="ROUGE-L F1")  # fmt: skip
            out += generation_targets_section(kind_rows, kind_tasks)
        else:
            out += paired_section(kind_rows, kind_tasks, methods, where)
            out += paired_section(
                kind_rows,
                kind_tasks,
                methods,
                where,
                "slm_served_acc",
                " of the clients the server replied to",
            )
            out += targets_section(kind_rows, kind_tasks)
    if judges:
        out += judges_section(judges)
    out += machines_section(rows)
    if drift:
        out += ["## Cells reused with a different config", "",
                "These cells finished before a setting changed and were not rerun; the tables above hold their "
                "saved numbers. Delete a cell's folder and run the experiment again to recompute it.", "",
                "| cell | key | saved | now |", "| --- | --- | --- | --- |"]  # fmt: skip
        out += [
            f"| {cell} | {k} | {old!r} | {new!r} |" for cell, diffs in drift.items() for k, old, new in diffs
        ]
        out.append("")
    return "\n".join(out) + "\n"


def _tables(
    rows: list[dict[str, Any]],
    tasks: list[str],
    methods: list[str],
    seeds: list[int],
    tables: list[tuple[str, str, float]],
    where: str,
) -> list[str]:
    """One table per measure: methods by tasks, mean ± sd over seeds and the mean over tasks."""
    out: list[str] = []
    for title, key, scale in tables:
        title = title.replace("the global test split", where)
        lines = [f"## {title}", "", "| method | " + " | ".join(tasks) + " | mean over tasks |",
                 "| --- |" + " ---: |" * (len(tasks) + 1)]  # fmt: skip
        any_value = False
        for m in methods:
            if math.isnan(mean_std([r.get(key) for r in rows if r["method"] == m])[0]):
                continue  # a method this measure does not apply to
            cells_ = []
            task_means = []
            for t in tasks:
                xs = _values(rows, key, t, m)
                mu, sd = mean_std(xs)
                n = f" (n={len(xs)})" if 0 < len(xs) < len(seeds) else ""  # fewer seeds than the grid ran
                cells_.append(_fmt(mu, sd, scale, 1 if scale == 100 else 2) + n)
                task_means.append(mu)
                any_value |= not math.isnan(mu)
            overall = _mean(task_means)
            lines.append(
                f"| {m} | "
                + " | ".join(cells_)
                + f" | {_fmt(overall, 0.0, scale, 1 if scale == 100 else 2).split(' ±')[0]} |"
            )
        if any_value:
            out += [*lines, ""]
    return out


def judges_section(judges: dict[str, dict]) -> list[str]:
    """What each judge is and how well it does on real data."""
    classifiers = {k: v for k, v in judges.items() if "median_loglik" not in v.get("global_test", {})}
    writers = {k: v for k, v in judges.items() if k not in classifiers}
    out: list[str] = []
    if classifiers:
        out += ["## The fidelity judge", "", "An SLM trained centrally on the task's training data outside the "
                "global test split; used only to measure label fidelity, never by a method.", "",
                "| task | SLM | training examples | epochs | its global-test accuracy |", "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
        for name, info in classifiers.items():
            acc = info.get("global_test", {}).get("accuracy", float("nan"))
            out.append(
                f"| {name} | {info.get('slm')} | {info.get('train_size')} | {info.get('epochs')} | {100 * acc:.1f} % |"
            )
        out.append("")
    if writers:
        out += ["## The writer judge", "", "A causal LM tuned on the task's real (input, target) pairs outside the "
                "global test split; used only to measure how plausible synthetic pairs are, never by a method.", "",
                "| task | model | training pairs | epochs | its perplexity of the global test targets | median real "
                "log-likelihood per token |", "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for name, info in writers.items():
            g = info.get("global_test", {})
            out.append(f"| {name} | {info.get('model')} | {info.get('train_size')} | {info.get('epochs')} | "
                       f"{g.get('target_perplexity', float('nan')):.2f} | {g.get('median_loglik', float('nan')):.3f} |")  # fmt: skip
        out.append("")
    return out


def machines_section(rows: list[dict[str, Any]]) -> list[str]:
    """Where the cells ran. Numbers compare cleanly only between cells of one machine and one `auto`
    precision: a grid assembled from several runs says so here."""
    by: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r.get("machine"):
            by[r["machine"]].append(f"{r['task']} / {r['method']} / seed {r['seed']}")
    if not by:
        return []
    if len(by) == 1:
        [(machine, names)] = by.items()
        return ["## Where the cells ran", "", f"All {len(names)} cells: {machine}.", ""]
    out = ["## Where the cells ran", "", f"**The cells ran on {len(by)} different machines or precisions**; "
           "compare methods within one of these groups.", "", "| machine | cells |", "| --- | --- |"]  # fmt: skip
    return out + [f"| {machine} | {', '.join(names)} |" for machine, names in by.items()] + [""]


def _values(rows: list[dict], key: str, task: str, method: str) -> list[float]:
    xs = [r.get(key) for r in rows if r["task"] == task and r["method"] == method]
    return [float(x) for x in xs if _is_number(x)]


def paired_differences(rows: list[dict], key: str, task: str, a: str, b: str) -> list[float]:
    """a - b seed by seed, over the seeds where both cells finished: a seed fixes the clients' data and
    their first local round under every method, so the paired difference carries less noise than the
    difference of two means."""
    by_seed = {
        (r["method"], r["seed"]): r.get(key) for r in rows if r["task"] == task and r["method"] in (a, b)
    }
    return [
        float(va) - float(vb)
        for (m, seed), va in by_seed.items()
        if m == a and _is_number(va) and _is_number(vb := by_seed.get((b, seed)))
    ]


def paired_section(
    rows: list[dict[str, Any]],
    tasks: list[str],
    methods: list[str],
    where: str,
    key: str = "slm_acc",
    clients: str = "",
    metric: str = "accuracy",
) -> list[str]:
    """CrossLM's SLM `metric` (row key `key`) minus every other method's, paired by seed: mean ± sd (n
    seeds); `where` names the split the numbers are on, `clients` the clients averaged when not all."""
    others = [m for m in methods if m not in ("crosslm", ZERO_SHOT)]
    others = [m for m in others if any(_is_number(r.get(key)) for r in rows if r["method"] == m)]
    if "crosslm" not in methods or not others:
        return []
    lines = [f"## CrossLM minus each method, SLM {metric}{clients} on {where} (points, paired by seed)", "",
             "| CrossLM minus | " + " | ".join(tasks) + " | mean over tasks |",
             "| --- |" + " ---: |" * (len(tasks) + 1)]  # fmt: skip
    for m in others:
        cells_, means = [], []
        for t in tasks:
            d = paired_differences(rows, key, t, "crosslm", m)
            mu, sd = mean_std(d)
            cells_.append("–" if not d else f"{100 * mu:+.1f} ± {100 * sd:.1f} (n={len(d)})")
            means.append(mu)
        overall = _mean(means)
        lines.append(
            f"| {m} | "
            + " | ".join(cells_)
            + f" | {'–' if math.isnan(overall) else f'{100 * overall:+.1f}'} |"
        )
    return [*lines, ""]


def _task_mean(rows: list[dict], method: str, key: str, task: str) -> float:
    return mean_std(_values(rows, key, task, method))[0]


def targets_section(rows: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """The project's targets, each with the measured numbers and met / missed."""

    def avg(method: str, key: str) -> float:
        return _mean([_task_mean(rows, method, key, t) for t in tasks])

    checks = []
    c, s, k = avg("crosslm", "slm_acc"), avg("standalone", "slm_acc"), avg("kd-no-feedback", "slm_acc")
    checks.append(("SLM: CrossLM ≥ standalone + 10 pp", c, s, 100 * (c - s), 100 * (c - s) >= 10))
    checks.append(("SLM: CrossLM ≥ KD without feedback + 3 pp", c, k, 100 * (c - k), 100 * (c - k) >= 3))
    f = avg("crosslm", "fidelity_distilled")
    checks.append(("Fidelity of the distilled data ≥ 90 %", f, 0.9, 100 * (f - 0.9), f >= 0.9))
    d1, d2 = avg("crosslm", "distinct2_first"), avg("crosslm", "distinct2_last")
    change = 100 * (d2 / d1 - 1) if d1 else float("nan")
    checks.append(
        ("distinct-2 falls by ≤ 10 % (last vs first update; difference in %)", d2, d1, change, change >= -10)
    )
    llm, zs = avg("crosslm", "llm_acc"), avg(ZERO_SHOT, "llm_acc")
    checks.append(
        ("LLM: CrossLM ≥ best zero-shot + 15 pp", llm, zs, 100 * (llm - zs), 100 * (llm - zs) >= 15)
    )
    p = avg("crosslm", "ppl_change_pct")
    checks.append(("Perplexity rises by ≤ 1 % (measured: % change)", p, 1.0, p - 1.0, p <= 1))
    served = [r["replies_min"] for r in rows if r["method"] == "crosslm" and _is_number(r.get("replies_min"))]
    fewest = float(min(served)) if served else float("nan")
    checks.append(("Every client served at least twice (fewest replies to a client, any CrossLM cell)",
                   fewest, 2.0, fewest - 2.0, fewest >= 2))  # fmt: skip
    return _targets_table(checks)


def _targets_table(checks: list[tuple[str, float, float, float, bool]], unit: str = "") -> list[str]:
    note = f"; {unit}" if unit else ""
    lines = [f"## Targets (averaged over tasks; difference in points, + = above the reference{note})", "",
             "| target | measured | reference | difference | |",
             "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for name, a, b, diff, ok in checks:
        fa = "–" if math.isnan(a) else f"{a:.4g}"
        fb = "–" if math.isnan(b) else f"{b:.4g}"
        status = "–" if math.isnan(diff) else ("met" if ok else "**missed**")
        lines.append(f"| {name} | {fa} | {fb} | {'–' if math.isnan(diff) else f'{diff:+.1f}'} | {status} |")
    return [*lines, ""]


def generation_targets_section(rows: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    """A generation task's targets, each with the measured numbers and met / missed."""

    def avg(method: str, key: str) -> float:
        return _mean([_task_mean(rows, method, key, t) for t in tasks])

    c, s, k = (
        avg("crosslm", "slm_rouge_l"),
        avg("standalone", "slm_rouge_l"),
        avg("kd-no-feedback", "slm_rouge_l"),
    )
    llm, zs = avg("crosslm", "llm_rouge_l"), avg(ZERO_SHOT, "llm_rouge_l")
    p = avg("crosslm", "ppl_change_pct")
    eps = 1e-9  # a difference of exactly the target, computed in floating point, meets it
    checks = [
        ("SLM ROUGE-L: CrossLM ≥ standalone + 3 points", c, s, 100 * (c - s), 100 * (c - s) >= 3 - eps),
        (
            "SLM ROUGE-L: CrossLM ≥ KD without feedback + 1 point",
            c,
            k,
            100 * (c - k),
            100 * (c - k) >= 1 - eps,
        ),
        (
            "LLM ROUGE-L: CrossLM ≥ zero-shot + 5 points",
            llm,
            zs,
            100 * (llm - zs),
            100 * (llm - zs) >= 5 - eps,
        ),
        ("Perplexity rises by ≤ 1 % (measured: % change)", p, 1.0, p - 1.0, p <= 1),
    ]
    return _targets_table(checks, "ROUGE-L F1 in [0, 1]")


def plot_curves(root: Path, exp: Any) -> None:
    """Per-update curves of each task's CrossLM cells: SLM and LLM accuracy and synthetic-data quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crosslm.experiment.grid import cell_done, cell_name

    (root / "plots").mkdir(exist_ok=True)
    for task in exp.tasks:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for method in exp.methods:
            for seed in exp.seeds:
                run_dir = root / "cells" / cell_name(task, method, seed)
                if not cell_done(run_dir):
                    continue
                ev = read_jsonl(run_dir / "metrics.jsonl")
                generation = any(
                    e.get("event") == "run_start" and e.get("task_kind") == "generation" for e in ev
                )
                slm_metric, llm_metric = (
                    ("rouge_l", "rouge_l") if generation else ("accuracy", "calibrated_accuracy")
                )
                enh = [e for e in ev if e.get("event") == "enhanced"]
                pts = [(e["update"], _get(e, "after", "global", slm_metric)) for e in enh]
                pts = [(u, 100 * a) for u, a in pts if a is not None]
                if pts:
                    axes[0].plot(*zip(*pts, strict=True), ".-", alpha=0.7, label=f"{method} s{seed}")

                llm = [e for e in ev if e.get("event") == "llm_eval"]
                if len(llm) > 1:
                    axes[1].plot([e["update"] for e in llm], [100 * e[llm_metric] for e in llm], ".-",
                                 label=f"{method} s{seed}")  # fmt: skip
                ups = [e for e in ev if e.get("event") == "server_update" and "mean_q" in e]
                if ups:
                    axes[2].plot(
                        [e["update"] for e in ups],
                        [e["mean_q"] for e in ups],
                        ".-",
                        label=f"{method} s{seed}",
                    )
        for ax, title in zip(axes, ["SLM global accuracy (or ROUGE-L x100) after enhancement",
                                    "LLM calibrated accuracy (or ROUGE-L x100)",
                                    "mean q of new synthetic samples"], strict=True):  # fmt: skip
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("server update")
            if ax.lines:
                ax.legend(fontsize=6)
        fig.suptitle(task)
        fig.tight_layout()
        fig.savefig(root / "plots" / f"{Path(task).stem}_curves.png", dpi=110)
        plt.close(fig)
