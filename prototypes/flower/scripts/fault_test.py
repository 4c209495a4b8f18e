"""Fault injection: kill the slow SuperNode while it is processing a train message,
restart it later with the same auth key, and record what the async ServerApp sees.

  venv/bin/python scripts/fault_test.py --signal KILL --restart-after 80
  venv/bin/python scripts/fault_test.py --signal KILL --restart-after 10   # fast restart
  venv/bin/python scripts/fault_test.py --signal TERM --restart-after 30   # graceful stop
  venv/bin/python scripts/fault_test.py --insecure ...                    # no auth: new node id
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import ROOT, Cluster  # noqa: E402
from launch import make_nodes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--signal", default="KILL", choices=["KILL", "TERM"])
    ap.add_argument("--restart-after", type=float, default=80.0)
    ap.add_argument("--num-updates", type=int, default=14)
    ap.add_argument("--reply-timeout", type=float, default=120.0)
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    tag = f"fault_{a.signal}_{int(a.restart_after)}{'_insecure' if a.insecure else ''}"
    workdir = Path(a.workdir or ROOT / "runs" / tag).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    nodes = make_nodes(workdir, [0.5, 8.0])
    cl = Cluster(workdir, tls=not a.insecure, auth=not a.insecure, nodes=nodes)
    result_path = workdir / "result.json"
    rep: dict = {"scenario": vars(a)}
    try:
        ids = cl.start_all()
        rep["node_ids_initial"] = ids
        t_run = time.time()
        run_id = cl.run_app({"mode": "async", "num-updates": a.num_updates, "min-nodes": 2,
                             "payload-mb": 1.0, "reply-mb": 1.0, "send-enhanced": False,
                             "reply-timeout": a.reply_timeout, "result-path": str(result_path)})
        # wait until node1 (slow) has started its 2nd ClientApp process, i.e. mid-task
        log1 = cl.procs["node1"].log
        while log1.read_text(errors="replace").count("Start `flwr-clientapp` process") < 2:
            time.sleep(0.2)
        time.sleep(2.0)
        sig = signal.SIGKILL if a.signal == "KILL" else signal.SIGTERM
        t_kill = time.time()
        cl.kill("node1", sig)
        rep["t_kill_rel_run"] = round(t_kill - t_run, 2)
        print(f"[fault] SIG{a.signal} node1 at +{t_kill - t_run:.1f}s", flush=True)
        time.sleep(a.restart_after)
        # A SIGKILLed *registered* SuperNode cannot re-activate until the SuperLink has
        # marked it offline (online_until = last heartbeat + 2 x 30 s): ActivateNode
        # fails with [code: 2004] and flower-supernode exits with code 305 (no retry).
        # => supervise it with a restart loop (systemd Restart=on-failure, etc.).
        attempts = 0
        while True:
            attempts += 1
            t_restart = time.time()
            try:
                new_id = cl.start_supernode(nodes[1])
                break
            except RuntimeError as err:
                print(f"[fault] restart attempt {attempts} failed: {err}", flush=True)
                time.sleep(5)
        rep["restart_attempts"] = attempts
        rep["t_restart_rel_run"] = round(t_restart - t_run, 2)
        rep["node1_id_after_restart"] = new_id
        rep["node1_same_id"] = new_id == ids["node1"]
        print(f"[fault] node1 restarted at +{t_restart - t_run:.1f}s id={new_id} "
              f"(same={new_id == ids['node1']})", flush=True)
        rep["status"] = cl.wait_run(run_id, timeout=600)
        ls = cl.flwr("supernode", "list", cl.conn, "--format", "json")
        rep["supernode_list_end"] = json.loads(ls.stdout).get("nodes") if ls.stdout else ls.stderr
    finally:
        cl.stop_all()
    if result_path.exists():
        res = json.loads(result_path.read_text())
        asy = res["async"]
        # ServerApp event times are relative to its loop start (~ run start + a few s)
        rep["server"] = {k: v for k, v in asy.items() if k != "events"}
        rep["events"] = asy["events"]
        # same clock as the ServerApp event "t" values
        rep["t_kill_rel_server"] = round(t_kill - asy["t_start_epoch"], 2)
        rep["t_restart_rel_server"] = round(t_restart - asy["t_start_epoch"], 2)
    (workdir / "fault_report.json").write_text(json.dumps(rep, indent=1))
    print(json.dumps({k: v for k, v in rep.items() if k != "events"}, indent=1))
    for e in rep.get("events", []):
        print(e)


if __name__ == "__main__":
    main()
