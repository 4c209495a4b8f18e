"""Benchmark: the loopback Flower deployment against the in-process runtime on the same config.

Measures the wall time of `crosslm run CONFIG` and of `crosslm flower local CONFIG` (run one after the
other, never together: this machine has two cores), and from the Flower run's metrics the bytes each
client sent (uploads) and received (enhanced SLMs) per server update, and the message round trips.
Usage: python benchmarks/bench_flower.py [CONFIG] [--set key=value ...] [--skip-inprocess]
Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from crosslm.io import read_jsonl  # noqa: E402


def _timed(command: list[str], out: Path, name: str) -> tuple[float, int]:
    cmd = [
        sys.executable,
        "-m",
        "crosslm.cli",
        *command,
        "--set",
        f"output_dir={out}",
        "--set",
        f"name={name}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
    return time.perf_counter() - t0, proc.returncode


def traffic(run_dir: Path) -> dict:
    ev = read_jsonl(run_dir / "metrics.jsonl")
    updates = sum(1 for e in ev if e.get("event") == "server_update")
    up, down, rt = defaultdict(int), defaultdict(int), defaultdict(list)
    for e in ev:
        c = e.get("client")
        if e.get("event") == "upload" and e.get("accepted"):
            up[c] += int(e["bytes"])
            if "waited" in e:
                rt["train (round trip incl. local training)"].append(e["waited"])
        elif e.get("event") == "enhanced" and "bytes_sent" in e:
            down[c] += int(e["bytes_sent"])
            rt["query.enhanced (round trip incl. adopting + evaluating)"].append(e["round_trip"])
    clients = sorted(set(up) | set(down))
    return {
        "server_updates": updates,
        "per_client": {
            c: {
                "sent_bytes": up[c],
                "received_bytes": down[c],
                "sent_mib_per_update": round(up[c] / max(updates, 1) / 2**20, 2),
                "received_mib_per_update": round(down[c] / max(updates, 1) / 2**20, 2),
            }
            for c in clients
        },
        "round_trip_s_median": {k: round(statistics.median(v), 1) for k, v in rt.items()},
    }


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--skip-inprocess"] or ["configs/default.yaml"]
    out = Path(tempfile.mkdtemp(prefix="crosslm-bench-flower-"))
    result: dict = {"config_args": args}
    if "--skip-inprocess" not in sys.argv:
        wall, rc = _timed(["run", *args], out, "inprocess")
        result["inprocess"] = {"wall_s": round(wall, 1), "returncode": rc}
    wall, rc = _timed(["flower", "local", *args], out, "flower")
    result["flower"] = {"wall_s": round(wall, 1), "returncode": rc, **traffic(out / "flower")}
    result["run_dirs"] = [str(out / "inprocess"), str(out / "flower")]
    for name in ("inprocess", "flower"):
        if name in result:
            print(f"{name:10s} wall {result[name]['wall_s']:8.1f} s  (exit {result[name]['returncode']})")
    for c, t in result["flower"]["per_client"].items():
        print(
            f"  {c}: sent {t['sent_mib_per_update']} MiB/update, received {t['received_mib_per_update']} MiB/update"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
