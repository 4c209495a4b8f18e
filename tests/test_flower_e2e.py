"""CrossLM over real Flower processes on loopback: flower-superlink with TLS and SuperNode
authentication, one flower-supernode per client, the real default models (tiny config, and the generation
task on a small cut of configs/headlines.yaml), and the faults a deployment meets: a refused node, a
SuperNode killed mid-run, the server killed mid-run, SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crosslm.config import load_config
from crosslm.errors import CrossLMError
from crosslm.io import read_jsonl
from crosslm.lifecycle import make_run_dir, prepare_data
from crosslm.protocol import SLMUpload, validate_report
from crosslm.runtime.flower.deploy import NodeSpec, _alive, loopback, node_key, write_run_config
from tests.conftest import HEADLINES_SMALL

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _events(run_dir: Path, kind: str | None = None) -> list[dict]:
    ev = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    return [e for e in ev if kind is None or e.get("event") == kind]


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flower")
    res = subprocess.run(
        [sys.executable, "-m", "crosslm.cli", "flower", "local", "configs/tiny.yaml",
         "--set", f"output_dir={out}", "--set", "name=fl", "--set", "flower.node_delays=[0,45]",
         "--set", "flower.audit_outbox=true", "--set", "federation.updates=3",
         "--set", "clients.final_round=true"],
        capture_output=True, text=True, cwd=ROOT, timeout=1200,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "standalone" in res.stdout  # the summary table
    return out / "fl"


def test_loopback_deployment_writes_the_run_directory(flower_run):
    for name in ["config.yaml", "metrics.jsonl", "synthetic.jsonl", "report.md", "plots/llm_accuracy.png",
                 "llm_adapter/adapter_config.json", "clients/client-0/model.safetensors",
                 "clients/client-1/config.json", "flower/logs/superlink.log", "flower/logs/serverapp.log"]:  # fmt: skip
        assert (flower_run / name).exists(), name
    ev = _events(flower_run)
    kinds = [e["event"] for e in ev]
    assert kinds[0] == "run_start" and ev[0]["runtime"] == "flower"
    assert kinds[-1] == "run_end" and ev[-1]["reason"] == "completed"
    assert kinds.count("server_update") == 3
    finals = {e["client"]: e for e in ev if e["event"] == "client_eval"}
    assert set(finals) == {"client-0", "client-1"}
    assert all(e["final_epochs"] in (0, 2) for e in finals.values())  # tiny.yaml: 2 local epochs
    enhanced = [e for e in ev if e["event"] == "enhanced"]
    last = [e for e in enhanced if e["update"] == max(x["update"] for x in enhanced) and e["adopted"] == 1]
    if last:  # the node that adopted the last update's reply adapted it in a final local round
        assert any(finals[e["client"]]["final_epochs"] == 2 for e in last)
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(flower_run / "clients" / "client-1")
    assert m.config.num_hidden_layers == 3  # client-1 runs MiniLM-L3, client-0 MiniLM-L6


def test_nodes_are_heterogeneous_and_asynchronous(flower_run):
    ups = [e for e in _events(flower_run, "upload") if e["accepted"]]
    assert {e["client"]: e["slm"] for e in ups} == {"client-0": "minilm-l6", "client-1": "minilm-l3"}
    assert [e["arrival"] for e in _events(flower_run, "upload")] == list(range(1, len(ups) + 1))
    order = [e["client"] for e in ups]
    assert order.count("client-0") > order.count(
        "client-1"
    )  # the fast node went on while the slow one worked
    # the slow node's upload was built on a server state that updates had already moved past
    assert max(e["staleness"] for e in ups if e["client"] == "client-1") > 0
    t = [e["t"] for e in ups]
    assert t == sorted(t)


def test_no_private_text_leaves_a_client(flower_run):
    """Every message each client sent (kept by its outbox audit) holds only declared records and fields,
    and no 20-character piece of any of that client's private training texts."""
    for cid in ("client-0", "client-1"):
        node = flower_run / "nodes" / cid
        texts = [r["text"] for r in read_jsonl(node / "data" / "train.jsonl")]
        pieces = {t[i : i + 20] for t in texts for i in range(0, max(len(t) - 19, 1), 5) if len(t) >= 20}
        sent = sorted((node / "outbox-audit").iterdir())
        kinds = {d.name.split("-", 1)[1] for d in sent}
        assert {"train", "enhanced", "evaluate"} <= kinds
        for msg in sent:
            files = {f.name for f in msg.iterdir()}
            if msg.name.endswith("-train"):
                assert files == {"header.json", "payload.safetensors.bin", "report.json"}
                header = json.loads(json.loads((msg / "header.json").read_text())["json"])
                declared = {"type", "protocol_version", *(f.name for f in dataclasses.fields(SLMUpload))}
                assert set(header) == declared - {"state_dict"}
                validate_report(
                    json.loads(json.loads((msg / "report.json").read_text())["json"]), client_id=cid
                )
            else:
                assert files == {"report.json"}
            blob = b"".join((msg / f).read_bytes() for f in files)
            text = blob.decode("utf-8", errors="ignore")
            leaked = [p for p in pieces if p in text]
            assert not leaked, (cid, msg.name, leaked[:3])


def _cfg(tmp: Path, name: str, **extra: str):
    sets = [f"output_dir={tmp}", f"name={name}", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(ROOT / "configs" / "tiny.yaml", sets)


def test_unregistered_or_keyless_supernodes_are_refused(tmp_path):
    cfg = _cfg(tmp_path, "auth")
    run_dir = make_run_dir(cfg)
    dep, specs = loopback(cfg, run_dir)
    try:
        dep.start(specs[:1])  # a registered node connects
        rogue = node_key(dep.pki, "rogue")  # a valid key that was never registered
        dep.start_node(NodeSpec("rogue", specs[0].node_config, rogue))
        with pytest.raises(CrossLMError, match="Failed to activate|2004"):
            dep.wait_node("rogue", timeout=60)
        dep.start_node(NodeSpec("keyless", specs[0].node_config, None))
        with pytest.raises(CrossLMError, match="authentication is enabled|2001|registered"):
            dep.wait_node("keyless", timeout=60)
    finally:
        dep.stop_all()


def _checkpointed_update(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "checkpoint" / "state.json").read_text())["update"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(1.0)


def test_a_killed_supernode_is_survived_and_rejoins(tmp_path):
    cfg = _cfg(tmp_path, "nodekill", **{"federation.updates": "5", "flower.node_delays": "[0,3]"})
    task, _ = prepare_data(cfg)
    run_dir = make_run_dir(cfg)
    dep, specs = loopback(cfg, run_dir)
    try:
        dep.start(specs)
        run_id = dep.submit(write_run_config(run_dir / "flower" / "rc.toml", cfg, task, run_dir))

        def uploaded(cid: str) -> list[dict]:
            return [e for e in _events(run_dir, "upload") if e.get("client") == cid and e["accepted"]]

        _wait_for(lambda: uploaded("client-1"), 600, "client-1's first upload")
        dep.track()
        node, helpers = dep.procs["client-1"][0], set(dep.procs["client-1"][1])
        os.kill(node.pid, signal.SIGKILL)  # a crash from outside: no goodbye to the SuperLink
        node.wait()
        assert helpers and "client-1" in dep.track()  # Flower's helpers it left behind are ended
        time.sleep(0.5)
        assert not [h for h in helpers if _alive(h)]
        killed_at = _events(run_dir)[-1]["t"]
        rounds_before = max(e["round"] for e in uploaded("client-1"))
        # the server notices (missed heartbeats, or an error reply to a message it sent) and goes on
        _wait_for(lambda: _events(run_dir, "node_lost"), 600, "the server to notice the lost node")
        # a supervisor restarts the node; Flower refuses the key until the old session's deadline passed
        for _ in range(20):
            dep.start_node(specs[1])
            try:
                dep.wait_node("client-1", timeout=30)
                break
            except CrossLMError:
                time.sleep(10)
        status = dep.wait(run_id, timeout=900)
    finally:
        dep.stop_all()
    assert status == "finished:completed", status
    lost = _events(run_dir, "node_lost")[0]
    assert lost["client"] == "client-1" and lost["kind"] in ("train", "query.enhanced", "heartbeat")
    rejoined = _events(run_dir, "node_rejoined")
    assert rejoined and rejoined[0]["client"] == "client-1" and rejoined[0]["t"] > lost["t"]
    during = [s for s in _events(run_dir, "server_update") if killed_at < s["t"] < rejoined[0]["t"]]
    assert any(s["trigger_clients"] == ["client-0"] for s in during)  # the others went on while it was down
    assert all("client-1" in s["staleness"] for s in during)  # ... with client-1's last SLM still scoring
    after = [e for e in uploaded("client-1") if e["t"] > rejoined[0]["t"]]
    assert after and after[0]["round"] == rounds_before + 1  # continued from its own saved state
    enhanced = [e for e in _events(run_dir, "enhanced") if e["client"] == "client-1"]
    assert enhanced and enhanced[0]["t"] > rejoined[0]["t"]  # the SLM enhanced while it was away reached it


def test_a_killed_server_resumes_from_its_checkpoint(tmp_path):
    sets = {"federation.updates": "2", "flower.node_delays": "[0,5]"}
    cfg = _cfg(tmp_path, "serverkill", **sets)
    task, _ = prepare_data(cfg)
    run_dir = make_run_dir(cfg)
    dep, specs = loopback(cfg, run_dir)
    rc = write_run_config(run_dir / "flower" / "rc.toml", cfg, task, run_dir)
    try:
        dep.start(specs)
        dep.submit(rc)
        # kill once an update is checkpointed (the update's event is logged before its replies and
        # checkpoint are written, so waiting on the event alone races the checkpoint)
        _wait_for(lambda: _checkpointed_update(run_dir) >= 1, 900, "a checkpointed server update")
        dep.kill("superlink", signal.SIGKILL)  # the SuperLink and the ServerApp it runs die at once
        state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
        logged = [
            json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()[: state["log_lines"]]
        ]
        dep.start_superlink()  # same database: node registrations survive; the nodes reconnect
        # resubmit as an operator would, with the same run dir: the ServerApp resumes from its checkpoint
        res = subprocess.run(
            [sys.executable, "-m", "crosslm.cli", "flower", "submit", "configs/tiny.yaml",
             *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
             "--superlink", f"127.0.0.1:{dep.port}", "--root-certificates", str(dep.pki / "ca.crt"),
             "--run-dir", str(run_dir)],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        run_id = int(res.stdout.split("submitted run ")[1].split(";")[0])
        status = dep.wait(run_id, timeout=900)
    finally:
        dep.stop_all()
    assert status == "finished:completed", status
    resumed = _events(run_dir, "resumed")
    assert resumed and resumed[0]["update"] == state["update"] >= 1
    latest: dict[str, int] = {}
    for e in logged:
        if e["event"] == "upload" and e["accepted"]:
            latest[e["client"]] = max(e["round"], latest.get(e["client"], 0))
    restored = {
        f.rsplit("-r", 1)[0]: int(f.rsplit("-r", 1)[1].split(".")[0]) for f in state["uploads"].values()
    }
    assert latest and restored == latest  # every upload accepted before the kill is in the checkpoint
    assert set(resumed[0]["clients"]) == set(latest)  # ... and came back into the registry
    updates = [e["update"] for e in _events(run_dir, "server_update")]
    assert updates == [1, 2], updates  # continued; nothing repeated or skipped
    assert _events(run_dir)[-1]["reason"] == "completed"


def _processes_of(run_dir: Path) -> list[int]:
    """Processes whose command line or environment names the run directory (every Flower process that
    `flower local` starts has its FLWR_HOME under it)."""
    needle, found = str(run_dir).encode(), []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            text = Path(f"/proc/{d}/cmdline").read_bytes() + Path(f"/proc/{d}/environ").read_bytes()
        except OSError:
            continue
        if needle in text and _alive(int(d)):
            found.append(int(d))
    return found


def _sigterm_and_resume(tmp_path: Path, config: str, *sets: str) -> Path:
    """`flower local CONFIG` sent SIGTERM after its first checkpointed update must close the whole
    deployment, say how to resume, and `flower local --resume` must finish the run: the run directory."""
    cli = [sys.executable, "-m", "crosslm.cli", "flower", "local"]
    run_dir = tmp_path / "sig"
    p = subprocess.Popen([*cli, config, "--set", f"output_dir={tmp_path}", "--set", "name=sig", *sets], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(lambda: _checkpointed_update(run_dir) >= 1, 900, "a checkpointed server update")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-2000:]
    assert f"--resume {run_dir}" in err
    end = _events(run_dir)[-1]
    assert end["event"] == "run_end" and end["interrupted"] is True
    assert "interrupted" in (run_dir / "report.md").read_text()
    assert _processes_of(run_dir) == []  # the whole deployment is gone

    res = subprocess.run([*cli, "--resume", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    ev = _events(run_dir)
    assert [e["update"] for e in ev if e["event"] == "server_update"] == [1, 2]  # nothing repeated
    assert [e["event"] for e in ev].count("run_end") == 1 and ev[-1]["reason"] == "completed"
    assert _events(run_dir, "resumed")
    assert _processes_of(run_dir) == []
    return run_dir


def test_flower_local_closes_on_sigterm_leaves_nothing_running_and_resumes(tmp_path):
    _sigterm_and_resume(tmp_path, "configs/tiny.yaml", "--set", "federation.updates=2",
                        "--set", "flower.node_delays=[0,5]")  # fmt: skip


@pytest.mark.slow
def test_a_generation_run_over_flower_closes_on_sigterm_and_resumes(tmp_path):
    """The generation task (causal SLMs, pairs, ROUGE-L) over real Flower processes, through the same
    SIGTERM-and-resume lifecycle, its pair pool carried over."""
    run_dir = _sigterm_and_resume(
        tmp_path, "configs/headlines.yaml", *HEADLINES_SMALL, "--set", "eval.llm_eval_size=2",
        "--set", "data.global_test_size=4", "--set", "data.test_per_client=4", "--set", "tune.steps=1",
        "--set", "flower.node_delays=[0,5]",
    )  # fmt: skip
    ev = _events(run_dir)
    assert ev[0]["task_kind"] == "generation"
    updates = [e for e in ev if e["event"] == "server_update"]
    assert all(e["kept"] > 0 and e["loss"]["total"] > 0 for e in updates)
    assert updates[1]["pool_size"] > updates[0]["pool_size"]  # the pairs written before SIGTERM came back
    enhanced = _events(run_dir, "enhanced")
    assert enhanced and all("rouge_l" in e["offered"]["validation"] for e in enhanced)  # judged by the nodes
    finals = {e["client"]: e for e in _events(run_dir, "client_eval")}
    assert set(finals) == {"client-0", "client-1"}
    assert all(0.0 <= e["global"]["rouge_l"] <= 1.0 for e in finals.values())
    assert "ROUGE-L" in (run_dir / "report.md").read_text()


def test_centralized_is_refused_by_flower_local(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "crosslm.cli", "flower", "local", "configs/tiny.yaml", "--set", "method=centralized",
         "--set", f"output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2 and "pooled data" in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written
