"""SuperLink restart with a persistent --database while SuperNodes keep running."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import ROOT, Cluster  # noqa: E402
from launch import make_nodes  # noqa: E402

workdir = (ROOT / "runs" / "superlink_restart").resolve()
shutil.rmtree(workdir, ignore_errors=True)
workdir.mkdir(parents=True)
db = str(workdir / "superlink.db")
cl = Cluster(workdir, database=db, nodes=make_nodes(workdir, [0.5, 2.0]))
rep: dict = {}
try:
    rep["ids_before"] = cl.start_all()
    cl.kill("superlink")
    t_down = time.time()
    time.sleep(5)
    rep["restart_s"] = cl.start_superlink()
    # give SuperNodes time to notice / reconnect
    time.sleep(20)
    ls = cl.flwr("supernode", "list", cl.conn, "--format", "json")
    rep["nodes_after"] = [(n["node-id"], n["status"]) for n in json.loads(ls.stdout)["nodes"]]
    res = workdir / "result.json"
    run_id = cl.run_app({"mode": "async", "num-updates": 4, "min-nodes": 2, "node-wait-timeout": 30.0,
                         "result-path": str(res)})
    rep["status"] = cl.wait_run(run_id, timeout=300)
    if res.exists():
        r = json.loads(res.read_text())
        rep["server_nodes"] = r.get("nodes")
        rep["handled"] = r.get("async", {}).get("handled_train")
finally:
    cl.stop_all()
print(json.dumps(rep, indent=1))
