"""Runs the experiment grid: cells one after another (this is a 2-core machine) into
`<output_dir>/<name>/cells/`; a finished cell is never run again, an unfinished one is started over, so an
interrupted experiment resumes where it stopped. The resolved experiment config is saved beside the
results.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import yaml

from crosslm.experiment.grid import (
    ExperimentConfig,
    cell_config,
    cell_done,
    cell_name,
    cells,
    config_drift,
    describe_drift,
)
from crosslm.experiment.results import write_results
from crosslm.io import atomic_write_text


def run_experiment(exp: ExperimentConfig) -> Path:
    from crosslm.progress import progress
    from crosslm.run import run

    root = Path(exp.output_dir) / exp.name
    cells_dir = root / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "experiment.yaml", yaml.safe_dump(dataclasses.asdict(exp), sort_keys=False))
    grid = cells(exp)
    bar = progress(grid, desc="experiment cells", unit="cell")
    for task, method, seed in bar:
        bar.set_postfix_str(cell_name(task, method, seed))
        cfg = cell_config(exp, task, method, seed, cells_dir)
        run_dir = cells_dir / cell_name(task, method, seed)
        if cell_done(run_dir):
            diffs = config_drift(run_dir, cfg)
            if diffs:
                bar.write(
                    f"warning: finished cell {run_dir.name} is reused, but its config differs from this "
                    f"experiment's ({describe_drift(diffs)}); delete {run_dir} to rerun it."
                )
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished cell starts over; finished ones are kept
        run(cfg)
    return write_results(exp, root)
