"""The experiment grid: its config, its cells (every (task, method, seed) is one main job with the
method's preset), each cell's config, and whether a finished cell still matches the grid.

A finished cell whose saved config differs from the one the grid would run now is reused as it is, with
a warning naming the keys (and a section in results.md): delete its folder to rerun it.
A precision key left at `auto` counts as the dtype the cell resolved it to, and a catalogue task's prompts
are compared with the wording the cell ran with (both recorded in its run_start).
The resolved experiment config is saved beside the results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crosslm.config import PRECISION_KEYS, all_keys, load_config, option, read_yaml, unknown_key_error
from crosslm.errors import ConfigError
from crosslm.io import read_jsonl
from crosslm.methods import METHOD_NAMES


@dataclass
class ExperimentConfig:
    name: str = option("experiment", "Folder name of this experiment under output_dir.")
    output_dir: str = option("runs/experiments", "Parent folder of experiments.")
    base_config: str = option("configs/default.yaml", "crosslm config every cell starts from.")
    overrides: dict = option({}, "crosslm config keys set in every cell, e.g. {federation.updates: 3}.")
    task_overrides: dict = option(
        {}, "Per task, keys set after `overrides`, e.g. {bbc-news: {data.max_chars: 400}} for long texts."
    )
    methods: list = option(list(METHOD_NAMES), f"Methods to compare: {', '.join(METHOD_NAMES)}.")
    tasks: list = option(["rotten-tomatoes", "bbc-news", "trec"], "Datasets (catalogue names, ids or files).")
    seeds: list = option([0, 1, 2], "Seeds; every (task, method) runs once per seed.")
    judge_max_examples: int = option(
        3000, "Training examples of the independent fidelity judge (per task, seed)."
    )
    judge_epochs: int = option(2, "Training epochs of the judge.")


def load_experiment(path: str | None, overrides: list[str]) -> ExperimentConfig:
    exp = ExperimentConfig()
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path, "experiment config")
        if not isinstance(data, dict):
            raise ConfigError(f"experiment config '{path}' must be a mapping of keys to values.")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"--set expects key=value, got {o!r} (e.g. --set seeds=[0]).")
        k, v = o.split("=", 1)
        if k.startswith("overrides."):
            data.setdefault("overrides", {})[k[len("overrides.") :]] = yaml.safe_load(v)
        elif k.startswith("task_overrides."):
            task, key = _split_task_key(k[len("task_overrides.") :])
            _task_mapping(task, data.setdefault("task_overrides", {}).setdefault(task, {}))[key] = (
                yaml.safe_load(v)
            )
        else:
            data[k] = yaml.safe_load(v)
    names = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    for k, value in data.items():
        if k not in names:
            raise ConfigError(f"unknown experiment key '{k}'; known: {', '.join(names)}.")
        expected = type(getattr(exp, k))
        if expected is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, expected):
            raise ConfigError(f"experiment key '{k}' = {value!r}: expected a {expected.__name__}.")
        setattr(exp, k, value)
    bad = [m for m in exp.methods if m not in METHOD_NAMES]
    if bad:
        raise ConfigError(
            f"experiment key 'methods' has unknown method '{bad[0]}'; known: {', '.join(METHOD_NAMES)}."
        )
    if not exp.methods or not exp.tasks or not exp.seeds:
        raise ConfigError("experiment keys 'methods', 'tasks' and 'seeds' must each list at least one value.")
    for c in cells(exp):  # every cell's config is checked before the first one runs
        cell_config(exp, *c, Path("/nonexistent"))
    return exp


def _split_task_key(rest: str) -> tuple[str, str]:
    """'trec.feedback.tau' -> ('trec', 'feedback.tau'): the config key is the longest known key that ends
    `rest`, so a task given as a file path with dots ('data/my.tsv.feedback.tau') still splits right."""
    parts = rest.split(".")
    known = all_keys()
    for i in range(1, len(parts)):
        if ".".join(parts[i:]) in known:
            return ".".join(parts[:i]), ".".join(parts[i:])
    guess = unknown_key_error(".".join(parts[1:]), known, f"--set task_overrides.{rest}")  # task = first part
    raise ConfigError(
        f"expected task_overrides.TASK.SECTION.KEY (e.g. task_overrides.trec.feedback.tau=0.2): {guess}"
    )


def cells(exp: ExperimentConfig) -> list[tuple[str, str, int]]:
    """(task, method, seed) in run order: for each task and seed, CrossLM first (the other methods'
    rows are read against it), then the rest."""
    order = sorted(exp.methods, key=lambda m: (m != "crosslm", exp.methods.index(m)))
    return [(t, m, int(s)) for t in exp.tasks for s in exp.seeds for m in order]


def _task_mapping(task: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(
            f"experiment key 'task_overrides.{task}' must be a mapping of config keys to values."
        )
    return value


def cell_name(task: str, method: str, seed: int) -> str:
    return f"{Path(task).stem}__{method}__seed{seed}"


def cell_config(exp: ExperimentConfig, task: str, method: str, seed: int, cells_dir: Path):
    per_task = _task_mapping(task, exp.task_overrides.get(task) or {})
    sets = [f"{k}={_yaml(v)}" for k, v in {**exp.overrides, **per_task}.items()]
    sets += [f"data.dataset={task}", f"seed={seed}", f"method={method}", f"output_dir={cells_dir}",
             f"name={cell_name(task, method, seed)}"]  # fmt: skip
    base = exp.base_config if exp.base_config else None
    return load_config(base, sets)


def _yaml(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def cell_done(run_dir: Path) -> bool:
    if not (run_dir / "metrics.jsonl").is_file():
        return False
    ends = [e for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "run_end"]
    return bool(ends) and ends[-1].get("reason") == "completed"


# Where a cell is stored, not what it computes: never reported as drift.
DRIFT_IGNORED_KEYS = frozenset({"output_dir", "name"})
# The config key that sets a recorded wording field: a change there is listed once, as the key.
WORDING_CONFIG_KEYS = {
    "task.generation_prompt": "data.generation_prompt",
    "task.descriptions": "data.label_descriptions",
}


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "(absent)"
        tree = tree[part]
    return tree


def config_drift(run_dir: Path, cfg: Any) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every config key on which a finished cell's saved
    config.yaml differs from `cfg`, the config the grid would run for it now. A default changed or a
    setting edited since the cell ran shows here; the cell itself is reused unchanged. Keys the cell's
    method never reads (methods.UNREAD_KEYS) are skipped. A precision key set to `auto` counts as the
    dtype it resolved to, so `auto` that ran in float32 differs from `auto` that now means bfloat16."""
    from crosslm.methods import UNREAD_KEYS

    unread = (*DRIFT_IGNORED_KEYS, *UNREAD_KEYS.get(cfg.method, ()))
    path = run_dir / "config.yaml"
    saved = read_yaml(path, "cell config") if path.is_file() else {}
    current = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))  # the same value types as the saved file
    start = _run_start(run_dir)
    auto_then, auto_now = _recorded_auto_dtype(start), _auto_dtype_here()

    def pair(key: str) -> tuple[Any, Any]:
        then, now = _lookup(saved, key), _lookup(current, key)
        if key in PRECISION_KEYS:  # `auto` compared by what it resolved to, where both sides are known
            resolved = (auto_then if then == "auto" else then, auto_now if now == "auto" else now)
            if None not in resolved:
                return resolved
        return then, now

    diffs = []
    for key in all_keys(cfg):
        if key.startswith(unread):
            continue
        then, now = pair(key)
        if then != now:
            diffs.append((key, then, now))
    shown = {key for key, _, _ in diffs}
    wording = [d for d in _wording_drift(start, cfg) if WORDING_CONFIG_KEYS.get(d[0]) not in shown]
    return diffs + wording


def _run_start(run_dir: Path) -> dict[str, Any]:
    """A cell's run_start event ({} when its log has none)."""
    path = run_dir / "metrics.jsonl"
    starts = [e for e in read_jsonl(path) if e.get("event") == "run_start"] if path.is_file() else []
    return starts[0] if starts else {}


def _recorded_auto_dtype(run_start: dict[str, Any]) -> str | None:
    """What precision `auto` meant for a finished CPU-only cell, as its run_start recorded it (None for a
    run with a GPU or from before the record). Two cells both set to `auto` differ when one ran in
    float32 and the other in bfloat16."""
    machine = run_start.get("machine") or {}
    return None if machine.get("gpu") else machine.get("cpu_auto_dtype")


def _auto_dtype_here() -> str | None:
    """What `auto` resolves to for a CPU run on this machine now (None where a GPU is present)."""
    import torch

    from crosslm.precision import dtype_name, resolve_dtype

    return None if torch.cuda.is_available() else dtype_name(resolve_dtype("auto", "cpu"))


def _wording_drift(run_start: dict[str, Any], cfg: Any) -> list[tuple[str, Any, Any]]:
    """`task.<field>` diffs between the LLM wording a cell recorded and what its catalogue task says now
    (an edited prompt or description in crosslm.catalogue.datasets changes no config key). Skipped for
    methods without an LLM, for data outside the catalogue, and for cells from before the record."""
    from crosslm.catalogue.datasets import catalogue_task
    from crosslm.methods import WITHOUT_LLM

    then = run_start.get("task_wording")
    if then is None or cfg.method in WITHOUT_LLM or (task := catalogue_task(cfg.data)) is None:
        return []
    return [(f"task.{k}", then.get(k), v) for k, v in task.wording().items() if then.get(k) != v]


def describe_drift(diffs: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs)
