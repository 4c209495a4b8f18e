"""Benchmark: wall time and peak memory (RSS) of the default main job, `crosslm run configs/default.yaml`.

Targets: at most 10 min and 8 GB on a 2-core CPU machine.
Usage: python benchmarks/bench_main_job.py [CONFIG] [--set key=value ...]
Prints one JSON line with the measurements and the run directory.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    args = sys.argv[1:] or ["configs/default.yaml"]
    out = Path(tempfile.mkdtemp(prefix="crosslm-bench-"))
    cmd = [
        sys.executable,
        "-m",
        "crosslm.cli",
        "run",
        *args,
        "--set",
        f"output_dir={out}",
        "--set",
        "name=bench",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    result = {
        "command": " ".join(["crosslm", "run", *args]),
        "returncode": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak_kib / 1024**2, 2),
        "targets": {"wall_s": 600, "peak_rss_gib": 8},
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "run_dir": str(out / "bench"),
    }
    print(proc.stdout)
    print(json.dumps(result))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
