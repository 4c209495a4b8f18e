"""End-to-end: start SuperLink (TLS + SuperNode auth) + 2 SuperNodes, `flwr run`,
wait for completion, shut everything down, print timings + ServerApp results.

  venv/bin/python scripts/launch.py                       # async loop, TLS+auth
  venv/bin/python scripts/launch.py --mode latency --payload-mb 40
  venv/bin/python scripts/launch.py --insecure            # no TLS, no auth
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import PKI, ROOT, Cluster, NodeSpec  # noqa: E402


def make_nodes(workdir: Path, delays: list[float]) -> list[NodeSpec]:
    return [
        NodeSpec(
            name=f"node{i}",
            runtime_port=9101 + i,
            key=PKI / f"node{i}_key",
            node_config={
                "partition-id": i,
                "slm-name": f"slm-{i}",
                "data-path": f"/data/crosslm/part{i}",
                "work-dir": str(workdir / f"work{i}"),
                "delay": d,
            },
        )
        for i, d in enumerate(delays)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "launch"))
    ap.add_argument("--mode", default="async", choices=["async", "latency", "errors"])
    ap.add_argument("--num-updates", type=int, default=8)
    ap.add_argument("--payload-mb", type=float, default=1.0)
    ap.add_argument("--reply-mb", type=float, default=1.0)
    ap.add_argument("--delays", type=float, nargs="+", default=[0.5, 8.0])
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument("--database", default=None, help="SuperLink --database path (default: in-memory)")
    ap.add_argument("--superexec-poll", type=float, default=None,
                    help="FLWR_SUPEREXEC_TASK_POLL_INTERVAL for all components (default 1.0 s)")
    ap.add_argument("--extra-sizes", default="", help='latency mode, e.g. "50:config,200:array"')
    ap.add_argument("--fresh", action="store_true", help="wipe workdir first")
    a = ap.parse_args()

    workdir = Path(a.workdir).resolve()
    if a.fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cl = Cluster(workdir, tls=not a.insecure, auth=not a.insecure, database=a.database,
                 nodes=make_nodes(workdir, a.delays), superexec_poll=a.superexec_poll)
    result_path = workdir / f"result_{a.mode}_{int(time.time())}.json"
    summary: dict = {}
    t_all = time.time()
    try:
        ids = cl.start_all()
        print(f"node ids: {ids}", flush=True)
        t_run = time.time()
        run_id = cl.run_app({
            "mode": a.mode, "num-updates": a.num_updates, "min-nodes": len(a.delays),
            "payload-mb": a.payload_mb, "reply-mb": a.reply_mb,
            "result-path": str(result_path), "extra-sizes": a.extra_sizes,
        })
        print(f"run {run_id} submitted", flush=True)
        status = cl.wait_run(run_id)
        summary["run_wall_s"] = round(time.time() - t_run, 2)
        summary["run_id"], summary["status"] = run_id, status
    finally:
        cl.stop_all()
        summary["timings"] = {k: round(v, 3) for k, v in cl.timings.items()}
        summary["total_s"] = round(time.time() - t_all, 2)
    if result_path.exists():
        res = json.loads(result_path.read_text())
        summary["server_result"] = {k: v for k, v in res.items() if k != "config"}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "server_result"}, indent=1))
    sr = summary.get("server_result", {})
    for p in sr.get("probes", []):
        print(p)
    for p in sr.get("error_probe", []):
        print(p)
    if "async" in sr:
        asy = sr["async"]
        print({k: v for k, v in asy.items() if k != "events"})
        for e in asy["events"]:
            print(e)


if __name__ == "__main__":
    main()
