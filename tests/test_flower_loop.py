"""The Flower server loop over a simulated grid: arrival order, slow and lost nodes, straggler timeouts,
malformed payloads, identity binding and resuming from a checkpoint. The grid and clock are simulated;
uploads, validation, the registry and the checkpoint are the real ones (tiny BERT classifiers)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import ErrorCode

from crosslm.config import RunConfig
from crosslm.io import JsonlWriter, read_jsonl
from crosslm.lifecycle import RunLog
from crosslm.protocol import SLMEnhanced, SLMUpload, WireMessage, encode, model_config_dict
from crosslm.runtime.flower.checkpoint import ServerCheckpoint
from crosslm.runtime.flower.payload import pack, unpack_wire
from crosslm.runtime.flower.server_app import ENHANCED, TRAIN, AsyncLoop
from crosslm.server.server import CrossLMServer
from crosslm.server.update import SyntheticExample
from crosslm.task import LabelledTexts, TaskSpec
from tests.conftest import make_classifier

TASK = TaskSpec(
    "toy", ("neg", "pos"), ("negative", "positive"), ("Negative", "Positive"), "W {description}", "{t}"
)


class Server(CrossLMServer):
    """The real server (receive, registry, checkpoint state) with the LLM work replaced by a stand-in."""

    def __init__(self, cfg: RunConfig, log):
        super().__init__(cfg, TASK, None, None, LabelledTexts(), log=log, log_synthetic=lambda e: None)
        self.llm = SimpleNamespace()  # an LLM is there: its adapter is checkpointed by the stand-ins below
        self.steps: list[list[str]] = []

    def step(self):
        triggers = self.pending[: self.cfg.federation.buffer_size]
        self.pending = self.pending[len(triggers) :]
        self.update += 1
        self.pool.append(
            SyntheticExample(f"text {self.update}", 0, f"h{self.update}", self.update, self.update - 1)
        )
        self.seen.add(f"h{self.update}")
        self.steps.append(triggers)
        self.log({"event": "server_update", "update": self.update, "trigger_clients": triggers})
        out = []
        for cid in triggers:
            m = self.models[cid].model
            out.append((cid, encode(SLMEnhanced(cid, "minilm-l6", m.config.model_type, model_config_dict(m),
                                                ["neg", "pos"], self.update, m.state_dict()))))  # fmt: skip
        return out

    def save_adapter(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter.json").write_text(json.dumps({"update": self.update}))

    def load_adapter(self, path: Path) -> None:
        self.loaded_adapter = json.loads((path / "adapter.json").read_text())["update"]


MODEL = make_classifier("bert", 100)


def upload(cid: str, version: int, base: int, state=None, **kw) -> WireMessage:
    fields = dict(client_id=cid, slm="minilm-l6", model_type="bert", model_config=model_config_dict(MODEL),
                  labels=["neg", "pos"], num_examples=10, label_counts=[5, 5], version=version, base_version=base,
                  metrics={"accuracy": 0.5}, state_dict=state or MODEL.state_dict())  # fmt: skip
    fields.update(kw)
    return encode(SLMUpload(**fields))


class Node:
    """A simulated SuperNode: answers train with an upload after `latency` simulated seconds."""

    def __init__(self, cid: str, latency: float, faults: list | None = None, labels=("neg", "pos")):
        self.cid, self.latency, self.round, self.base, self.labels = cid, latency, 0, 0, list(labels)
        self.faults = list(faults or [])  # per train reply: None (honest) or a function making a bad reply
        self.offline: tuple[float, float] | None = None  # (from, until) simulated seconds

    def reply(self, kind: str, content: RecordDict) -> RecordDict:
        if kind == ENHANCED:
            wire = unpack_wire(content, 10**9)
            self.base = json.loads(wire.header)["server_update"]
            return pack(report={"event": "enhanced", "client": self.cid, "update": self.base,
                                "before": {"local": {"accuracy": 0.5}}, "after": {"local": {"accuracy": 0.6}}})  # fmt: skip
        if kind == "evaluate":
            return pack(report={"event": "client_eval", "client": self.cid, "round": self.round,
                                "base_version": self.base, "local": {"accuracy": 0.7, "macro_f1": 0.6}})  # fmt: skip
        self.round += 1
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            return fault(self)
        report = {"event": "client_trained", "client": self.cid, "round": self.round, "base_version": self.base,
                  "train_loss": 0.5, "local": {"accuracy": 0.5}, "seconds": self.latency}  # fmt: skip
        return pack(wire=upload(self.cid, self.round, self.base, labels=self.labels), report=report)


class FakeGrid:
    """Delivers each node's messages in order, one at a time, on a simulated clock."""

    def __init__(self, nodes: dict[int, Node], crash_after_updates: int | None = None):
        self.nodes, self.now, self.seq = nodes, 0.0, 0
        self.queue: dict[int, list] = {n: [] for n in nodes}  # node -> [msg, ...] waiting or in work
        self.ready: dict[str, SimpleNamespace] = {}
        self.busy_until: dict[int, float] = dict.fromkeys(nodes, 0.0)

    def sleep(self, s: float) -> None:
        self.now += s
        self._advance()

    def clock(self) -> float:
        return self.now

    def _online(self, n: int) -> bool:
        off = self.nodes[n].offline
        return off is None or not (off[0] <= self.now < off[1])

    def get_node_ids(self):
        return [n for n in self.nodes if self._online(n)]

    def new_message(self, content, node, kind, ttl):
        self.seq += 1
        return SimpleNamespace(id=f"m{self.seq}", content=content, node=node, kind=kind)

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            q = self.queue[m.node]
            start = max(self.now, self.busy_until[m.node])
            done = start + (self.nodes[m.node].latency if m.kind == TRAIN else 1.0)
            self.busy_until[m.node] = done
            q.append((done, m, self.now))
            ids.append(m.id)
        return ids

    def _advance(self):
        for n, q in self.queue.items():
            node = self.nodes[n]
            while q and q[0][0] <= self.now:
                done, m, pushed = q.pop(0)
                if node.offline and node.offline[0] <= done and pushed < node.offline[1]:
                    # crashed while working: the link reports it once the node's deadline passes
                    err = SimpleNamespace(code=ErrorCode.NODE_UNAVAILABLE, reason="node went offline")
                    self.ready[m.id] = _reply(m.id, node.offline[0] + 1, None, err)
                    self.busy_until[n] = node.offline[1]
                    continue
                self.ready[m.id] = _reply(m.id, done, node.reply(m.kind, m.content), None)

    def pull_messages(self, ids):
        self._advance()
        out = [self.ready.pop(i) for i in list(ids) if i in self.ready]
        return out


def _reply(mid, created, content, error):
    meta = SimpleNamespace(reply_to_message_id=mid, created_at=created)
    return SimpleNamespace(metadata=meta, content=content, error=error, has_error=lambda: error is not None)


def _setup(tmp_path: Path, nodes: dict[int, Node], updates: int = 4, **flower):
    cfg = RunConfig()
    cfg.federation.updates = updates
    cfg.flower.poll_interval = 0.5
    for k, v in flower.items():
        setattr(cfg.flower, k, v)
    log = RunLog(tmp_path / "metrics.jsonl")
    synthetic = JsonlWriter(tmp_path / "synthetic.jsonl")
    server = Server(cfg, log)
    grid = FakeGrid(nodes)
    ckpt = ServerCheckpoint(tmp_path / "checkpoint")
    loop = AsyncLoop(grid, server, cfg, log, ckpt, synthetic, new_message=grid.new_message, clock=grid.clock,
                     sleep=grid.sleep)  # fmt: skip
    return cfg, server, grid, loop, log


def _events(tmp_path: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(tmp_path / "metrics.jsonl") if e.get("event") == kind]


def test_uploads_are_handled_in_arrival_order_and_a_slow_node_blocks_nobody(tmp_path):
    nodes = {1: Node("fast", 2.0), 2: Node("slow", 15.0)}
    _, server, _, loop, log = _setup(tmp_path, nodes, updates=8)
    loop.run()
    log.writer.close()
    ups = _events(tmp_path, "upload")
    assert [e["arrival"] for e in ups] == list(range(1, len(ups) + 1))
    assert all(a["t"] <= b["t"] for a, b in zip(ups, ups[1:], strict=False))  # handled in arrival order
    order = [e["client"] for e in ups]
    assert order.index("slow") >= 2  # the fast node uploaded repeatedly before the slow one's first upload
    assert "fast" in order[order.index("slow") + 1 :] or order.count("fast") >= 3  # interleaved
    assert max(e["staleness"] for e in ups if e["client"] == "slow") > 0
    assert server.update == 8
    evals = _events(tmp_path, "client_eval")
    assert {e["client"] for e in evals} == {"fast", "slow"}  # final evaluation reached every node


def test_a_lost_node_keeps_its_model_and_rejoins(tmp_path):
    nodes = {1: Node("a", 2.0), 2: Node("b", 3.0)}
    nodes[2].offline = (5.0, 40.0)  # crashes during its second local round, back 35 s later
    _, server, _, loop, log = _setup(tmp_path, nodes, updates=20)
    loop.run()
    log.writer.close()
    lost = _events(tmp_path, "node_lost")
    assert lost and lost[0]["node"] == 2 and lost[0]["client"] == "b"
    rejoined = _events(tmp_path, "node_rejoined")
    assert rejoined and rejoined[0]["t"] >= 40.0
    b_ups = [e for e in _events(tmp_path, "upload") if e["client"] == "b" and e["accepted"]]
    assert b_ups[0]["t"] < 5.0 and b_ups[-1]["t"] > 40.0 and b_ups[-1]["round"] > b_ups[0]["round"]
    during = [s for s in _events(tmp_path, "server_update") if 5.0 < s["t"] < 40.0]
    assert during and all("b" not in s["trigger_clients"] for s in during)  # others went on
    assert "b" in server.models  # its last accepted SLM stayed in the registry throughout


def test_a_straggler_is_dropped_with_a_reason(tmp_path):
    nodes = {1: Node("a", 2.0), 2: Node("hung", 10_000.0)}
    _, server, _, loop, log = _setup(tmp_path, nodes, updates=15, straggler_timeout=30.0)
    loop.run()
    log.writer.close()
    t = _events(tmp_path, "straggler_timeout")
    assert t and t[0]["client"] is None and t[0]["node"] == 2 and "straggler_timeout=30" in t[0]["reason"]
    assert server.update == 15 and "hung" not in server.models


def _bad(kind: str):
    def make(node: Node) -> RecordDict:
        honest = upload(node.cid, node.round, node.base)
        report = {"event": "client_trained", "client": node.cid, "round": node.round, "base_version": node.base,
                  "train_loss": 0.5, "seconds": 1.0}  # fmt: skip
        if kind == "nan":
            state = {k: v.clone() for k, v in MODEL.state_dict().items()}
            state["classifier.weight"][0, 0] = math.nan
            return pack(wire=WireMessage(honest.header, safetensors.torch.save(state)), report=report)
        if kind == "shape":
            state = {k: v.clone() for k, v in MODEL.state_dict().items()}
            state["classifier.weight"] = torch.zeros(2, 7)
            return pack(wire=WireMessage(honest.header, safetensors.torch.save(state)), report=report)
        if kind == "labels":
            return pack(wire=upload(node.cid, node.round, node.base, labels=["pos", "neg"]), report=report)
        if kind == "arch":
            h = json.loads(honest.header)
            h["model_type"] = "evil-net"
            return pack(wire=WireMessage(json.dumps(h), honest.payload), report=report)
        if kind == "oversize":
            return pack(wire=WireMessage(honest.header, honest.payload + b"\0" * 3_000_000), report=report)
        if kind == "pickle":
            rd = pack(wire=honest, report=report)
            rd["extra"] = ConfigRecord({"json": "{}"})
            return rd
        if kind == "report_text":
            return pack(wire=honest, report={**report, "note": "a private sentence from my data"})
        if kind == "not_safetensors":
            rd = RecordDict()
            rd["header"] = ConfigRecord({"json": honest.header})
            rd["payload"] = ArrayRecord({"safetensors": _raw(b"\x80\x04pickle-bytes")})
            rd["report"] = ConfigRecord({"json": json.dumps(report)})
            return rd
        raise AssertionError(kind)

    return make


def _raw(data: bytes):
    from flwr.app import Array

    return Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)


def test_malformed_payloads_are_rejected_with_reasons_and_the_run_goes_on(tmp_path):
    kinds = ["nan", "shape", "labels", "arch", "oversize", "pickle", "report_text", "not_safetensors"]
    nodes = {1: Node("good", 3.0), 2: Node("bad", 1.0, faults=[_bad(k) for k in kinds])}
    cfg, server, _, loop, log = _setup(tmp_path, nodes, updates=6)
    cfg.federation.max_payload_mb = 2.0  # the oversize payload is ~3 MB
    server.max_bytes = int(2.0 * 1024 * 1024)
    loop.run()
    log.writer.close()
    rejected = [e for e in _events(tmp_path, "upload") if not e["accepted"]]
    reasons = [e["reason"] for e in rejected]
    assert len(rejected) == len(kinds), reasons
    for needle, reason in zip(["NaN", "shape", "label", "evil-net", "limit", "undeclared record 'extra'",
                               "'note' is not declared", "safetensors"], reasons, strict=True):  # fmt: skip
        assert needle in reason, (needle, reason)
    assert server.update == 6
    assert "good" in server.models


def test_a_node_cannot_take_over_an_online_clients_identity(tmp_path):
    impostor = Node("x", 3.0)
    impostor.cid = "victim"
    nodes = {1: Node("victim", 1.5), 2: impostor}
    _, server, _, loop, log = _setup(tmp_path, nodes, updates=3)
    loop.run()
    log.writer.close()
    refused = [e for e in _events(tmp_path, "upload") if not e["accepted"]]
    assert refused and all("already belongs to online node 1" in e["reason"] for e in refused)
    assert loop.node_client == {1: "victim"}


class Crash(Exception):
    pass


def test_a_killed_server_resumes_from_its_checkpoint_without_losing_uploads(tmp_path):
    nodes = {1: Node("a", 2.0), 2: Node("b", 7.0)}
    cfg, server, grid, loop, log = _setup(tmp_path, nodes, updates=6)
    real_step = server.step

    def step_then_crash():
        if server.update == 3:
            raise Crash  # dies inside its 4th update: nothing of that update may survive
        return real_step()

    server.step = step_then_crash
    with pytest.raises(Crash):
        loop.run()
    log.writer.close()
    accepted_before = {(e["client"], e["round"]) for e in _events(tmp_path, "upload") if e["accepted"]}
    last_round = {c: max(r for cc, r in accepted_before if cc == c) for c, _ in accepted_before}

    # restart: a fresh server process, built from disk only
    ckpt = ServerCheckpoint(tmp_path / "checkpoint")
    state = ckpt.load_state()
    log2 = RunLog(tmp_path / "metrics.jsonl", keep_lines=state["log_lines"])
    syn2 = JsonlWriter(tmp_path / "synthetic.jsonl", keep_lines=state["synthetic_lines"])
    server2 = Server(cfg, log2)
    ckpt.restore(server2)
    assert server2.update == 3 and server2.loaded_adapter == 3 and len(server2.pool) == 3
    assert {c: m.round for c, m in server2.models.items()} == last_round  # no accepted upload lost
    assert [e["update"] for e in read_jsonl(tmp_path / "metrics.jsonl") if e["event"] == "server_update"] == [
        1,
        2,
        3,
    ]
    loop2 = AsyncLoop(grid, server2, cfg, log2, ckpt, syn2, new_message=grid.new_message, clock=grid.clock,
                      sleep=grid.sleep, runtime_state=state["runtime"])  # fmt: skip
    assert loop2.node_client == loop.node_client and loop2.waiting <= set(nodes)
    grid.queue = {n: [] for n in nodes}  # the old server's messages died with it
    grid.busy_until = dict.fromkeys(nodes, grid.now)
    loop2.run()
    log2.writer.close()
    updates = [e["update"] for e in read_jsonl(tmp_path / "metrics.jsonl") if e["event"] == "server_update"]
    assert updates == [1, 2, 3, 4, 5, 6]  # continues, nothing repeated, nothing skipped


# ------------------------------------------------------------------------------------------ hostile nodes
def _claiming(cid: str, *, event: str = "client_trained", base: int | None = None, round_: int | None = None):
    """A train reply whose upload (and report) claim `cid`, with the given report kind and versions."""

    def make(node: Node) -> RecordDict:
        b = node.base if base is None else base
        r = node.round if round_ is None else round_
        report = {"event": event, "client": cid, "round": r, "base_version": b}
        if event == "client_trained":
            report.update(train_loss=0.5, seconds=1.0)
        report["local"] = {"accuracy": 1.0}
        return pack(wire=upload(cid, node.round, b), report=report)

    return make


def test_a_node_cannot_choose_where_the_server_writes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    hostile = ["../../../escaped", "x" * 300, "..", "a/b"]
    nodes = {1: Node("good", 3.0), 2: Node("evil", 1.0, faults=[_claiming(c) for c in hostile])}
    _, server, _, loop, log = _setup(run, nodes, updates=6)
    loop.run()
    log.writer.close()
    refused = [e for e in _events(run, "upload") if not e["accepted"]]
    assert len(refused) == len(hostile) and all("not a client name" in e["reason"] for e in refused)
    assert not [p for p in tmp_path.rglob("*") if "escaped" in p.name]
    assert {p.parent for p in (run / "checkpoint").rglob("*.wire")} <= {run / "checkpoint" / "uploads",
                                                                        run / "checkpoint" / "outbox"}  # fmt: skip
    assert server.update == 6 and set(server.models) == {"good", "evil"}


def test_a_reply_carries_only_the_report_kind_its_message_asks_for(tmp_path):
    fake_eval = _claiming("liar", event="client_eval", round_=99)
    nodes = {1: Node("good", 3.0), 2: Node("liar", 1.0, faults=[fake_eval])}
    _, server, _, loop, log = _setup(tmp_path, nodes, updates=4)
    loop.run()
    log.writer.close()
    refused = [e for e in _events(tmp_path, "upload") if not e["accepted"]]
    assert refused and "does not answer this message" in refused[0]["reason"]
    assert all(e["round"] != 99 for e in _events(tmp_path, "client_eval"))  # no forged final result


def test_a_base_version_ahead_of_the_server_is_refused(tmp_path):
    nodes = {1: Node("good", 3.0), 2: Node("future", 1.0, faults=[_claiming("future", base=50)])}
    _, server, _, loop, log = _setup(tmp_path, nodes, updates=4)
    loop.run()
    log.writer.close()
    refused = [e for e in _events(tmp_path, "upload") if not e["accepted"]]
    assert refused and "ahead of the server" in refused[0]["reason"]
    assert all(e.get("staleness", 0) >= 0 for e in _events(tmp_path, "upload"))


def test_a_failure_while_handling_one_message_refuses_it_and_the_server_goes_on(tmp_path):
    nodes = {1: Node("a", 2.0), 2: Node("b", 3.0)}
    _, server, _, loop, log = _setup(tmp_path, nodes, updates=4)
    real_store, calls = loop.ckpt.store_upload, []

    def failing_store(cid, version, wire):
        calls.append(cid)
        if len(calls) == 2:
            raise OSError(36, "File name too long")
        return real_store(cid, version, wire)

    loop.ckpt.store_upload = failing_store
    loop.run()
    log.writer.close()
    refused = _events(tmp_path, "message_refused")
    assert len(refused) == 1 and "OSError" in refused[0]["reason"] and refused[0]["kind"] == TRAIN
    assert server.update == 4


def test_node_loss_is_noticed_while_a_server_update_runs(tmp_path):
    nodes = {1: Node("a", 2.0), 2: Node("b", 3.0)}
    nodes[2].offline = (10.0, 10_000.0)
    cfg, server, grid, loop, log = _setup(tmp_path, nodes, updates=2, poll_interval=0.01)
    real_step = server.step

    def slow_step():  # a 100 s update on the simulated clock (about 1 s of real time)
        start = grid.now
        while grid.now < start + 100:
            grid.now += 1.0
            time.sleep(0.01)
        return real_step()

    server.step = slow_step
    loop.run()
    log.writer.close()
    first_update = _events(tmp_path, "server_update")[0]
    lost = _events(tmp_path, "node_lost")
    assert lost and lost[0]["node"] == 2
    assert lost[0]["t"] < first_update["t"] - 50  # seen during the update, not after it


def test_a_baseline_method_runs_over_the_flower_loop(tmp_path):
    """standalone and fedavg through the ServerApp's own `serve` (the run lifecycle), on the fake grid."""
    from crosslm.config import load_config
    from crosslm.runtime.flower.server_app import serve

    for method in ("standalone", "fedavg"):
        cfg = load_config(None, [f"method={method}", "data.num_clients=2", "data.train_per_client=20",
                                 "data.test_per_client=5", "data.global_test_size=20", "federation.updates=3",
                                 "flower.poll_interval=0.5"])  # fmt: skip
        labels = ("negative", "positive")  # the catalogue task's
        grid = FakeGrid({1: Node("client-0", 2.0, labels=labels), 2: Node("client-1", 3.0, labels=labels)})
        run_dir = tmp_path / method
        serve(grid, cfg, run_dir, new_message=grid.new_message, clock=grid.clock, sleep=grid.sleep)
        ev = read_jsonl(run_dir / "metrics.jsonl")
        assert ev[0]["event"] == "run_start" and ev[0]["method"] == method
        assert ev[-1]["event"] == "run_end" and ev[-1]["reason"] == "completed"
        updates = [e for e in ev if e["event"] == "server_update"]
        assert len(updates) == 3 and all(e["mode"] == cfg.federation.server_update for e in updates)
        assert not [e for e in ev if e["event"] in ("llm_eval", "perplexity")]  # no LLM in a baseline
        assert (run_dir / "report.md").is_file()


def test_centralized_is_refused_over_flower_with_a_reason(tmp_path):
    from crosslm.config import load_config
    from crosslm.errors import ConfigError
    from crosslm.runtime.flower.server_app import serve

    cfg = load_config(None, ["method=centralized"])
    with pytest.raises(ConfigError, match="pooled data"):
        serve(FakeGrid({}), cfg, tmp_path / "c")
    assert not (tmp_path / "c").exists()
