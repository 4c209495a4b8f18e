"""The CrossLM ServerApp: an asynchronous push/pull loop around `CrossLMServer`.

Flower's built-in strategies run lock-step rounds; CrossLM does not. The loop here gives every idle
node a `train` message, pulls replies as they arrive and handles them one at a time in arrival order:
an accepted upload is checkpointed at once and, when the buffer is full, triggers a server update
whose enhanced SLMs go back to their clients (`query.enhanced`) together with their next `train`.
A slow node only delays itself. A node that disappears keeps its last accepted SLM in the registry and
is given work again when it comes back; a reply that does not come within `flower.straggler_timeout`
is dropped with a logged reason. Every accepted upload and every update is checkpointed atomically,
so a killed server resumes where it stopped (`run-dir` with a checkpoint = resume).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from crosslm import interrupts
from crosslm.config import RunConfig
from crosslm.errors import ConfigError, CrossLMError, ProtocolError
from crosslm.io import JsonlWriter
from crosslm.lifecycle import RunSession
from crosslm.protocol import check_client_id
from crosslm.runtime.flower.checkpoint import ServerCheckpoint
from crosslm.runtime.flower.deploy import read_run_config
from crosslm.runtime.flower.payload import pack, unpack_report, unpack_wire
from crosslm.server.server import CrossLMServer

TRAIN, ENHANCED, EVALUATE = "train", "query.enhanced", "evaluate"
# The report kind each message's reply must carry: a node cannot answer `train` with a `client_eval`.
REPLY_EVENT = {TRAIN: "client_trained", ENHANCED: "enhanced", EVALUATE: "client_eval"}


class GridLike(Protocol):
    def get_node_ids(self) -> Iterable[int]: ...
    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]: ...
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]: ...


MessageFactory = Callable[[RecordDict, int, str, float], Any]


def flower_message(content: RecordDict, node_id: int, message_type: str, ttl: float) -> Message:
    return Message(content, dst_node_id=node_id, message_type=message_type, ttl=ttl)


@dataclass
class Inflight:
    node: int
    kind: str
    sent: float
    client: str | None
    bytes: int = 0  # payload bytes of the message (weights + header)


class AsyncLoop:
    """Drives one CrossLM run over a Flower grid (or anything with the same three methods)."""

    def __init__(
        self,
        grid: GridLike,
        server: CrossLMServer,
        cfg: RunConfig,
        log: Any,
        checkpoint: ServerCheckpoint,
        synthetic: JsonlWriter,
        *,
        new_message: MessageFactory = flower_message,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        runtime_state: dict | None = None,
    ):
        self.grid, self.server, self.cfg, self.log = grid, server, cfg, log
        self.ckpt, self.synthetic = checkpoint, synthetic
        self.new_message, self.clock, self.sleep = new_message, clock, sleep
        self.fl = cfg.flower
        self.inflight: dict[str, Inflight] = {}
        self.lost: set[int] = set()
        self.known: set[int] = set()  # nodes seen online in this server process
        state = runtime_state or {}
        self.node_client: dict[int, str] = {int(k): v for k, v in state.get("node_client", {}).items()}
        self.arrivals = int(state.get("arrivals", 0))
        # nodes whose accepted upload waits for its server update (after a resume too: no second round)
        self.waiting: set[int] = {n for n, c in self.node_client.items() if c in server.pending}
        self.t0 = self.clock() - float(state.get("elapsed", 0.0))
        log.clock = lambda: self.clock() - self.t0  # events carry seconds since the run started

    # -- helpers -------------------------------------------------------------------------------------
    def _client_node(self, cid: str) -> int | None:
        return next((n for n, c in self.node_client.items() if c == cid), None)

    def _busy(self, node: int) -> bool:
        return any(f.node == node for f in self.inflight.values())

    def _push(self, node: int, kind: str, content: RecordDict) -> None:
        msg = self.new_message(content, node, kind, self.fl.message_ttl)
        ids = list(self.grid.push_messages([msg]))
        if not ids or not ids[0]:
            self.log(
                {"event": "push_failed", "node": node, "kind": kind, "client": self.node_client.get(node)}
            )
            return
        size = sum(len(a.data) for r in content.values() if isinstance(r, ArrayRecord) for a in r.values())
        size += sum(len(str(v)) for r in content.values() if isinstance(r, ConfigRecord) for v in r.values())
        self.inflight[ids[0]] = Inflight(node, kind, self.clock(), self.node_client.get(node), size)

    def save_checkpoint(self) -> None:
        self.ckpt.save(
            self.server,
            log_lines=self.log.writer.lines,
            synthetic_lines=self.synthetic.lines,
            runtime={
                "node_client": {str(k): v for k, v in self.node_client.items()},
                "arrivals": self.arrivals,
                "elapsed": self.clock() - self.t0,
            },
        )

    def _online(self) -> set[int]:
        return set(self.grid.get_node_ids())

    # -- the loop ------------------------------------------------------------------------------------
    def wait_for_nodes(self) -> None:
        deadline = self.clock() + self.fl.node_wait_timeout
        while len(self._online()) < self.fl.min_nodes:
            if self.clock() > deadline:
                raise CrossLMError(
                    f"only {len(self._online())} of flower.min_nodes={self.fl.min_nodes} nodes came online "
                    f"within {self.fl.node_wait_timeout:.0f} s; start the SuperNodes or lower flower.min_nodes"
                )
            self.sleep(self.fl.poll_interval)

    def assign_work(self) -> None:
        """Give every online, idle node its next message: an undelivered enhanced SLM first, then train."""
        online = self._online()
        for node in sorted(
            self.known - online - self.lost
        ):  # gone without a reply pending: heartbeats stopped
            self.lost.add(node)
            self.waiting.discard(node)
            self.log({"event": "node_lost", "node": node, "client": self.node_client.get(node), "kind": "heartbeat",
                       "reason": "the node stopped sending heartbeats (crashed or disconnected)"})  # fmt: skip
        self.known |= online
        for node in sorted(online):
            if node in self.lost:
                self.lost.discard(node)
                self.log({"event": "node_rejoined", "node": node, "client": self.node_client.get(node)})
            if self._busy(node) or node in self.waiting:
                continue
            cid = self.node_client.get(node)
            if cid is not None and cid in self.ckpt.outbox:
                wire = self.ckpt.outgoing(cid, self.server.max_bytes)
                self._push(node, ENHANCED, pack(wire=wire))
            self._push(node, TRAIN, pack(request={"server_update": self.server.update}))

    def run(self) -> None:
        fed = self.cfg.federation
        while self.server.update < fed.updates:
            self.assign_work()
            handled = self.poll()
            self.sweep_timeouts()
            if self.server.ready() and self.server.update < fed.updates:
                self.server_update()
            elif not handled:
                self.sleep(self.fl.poll_interval)
        self.finish()

    def poll(self) -> int:
        """Pull whatever replies are ready and handle them in arrival order."""
        if not self.inflight:
            return 0
        replies = list(self.grid.pull_messages(list(self.inflight)))
        replies.sort(key=lambda r: r.metadata.created_at)
        for rep in replies:
            self.handle(rep)
        return len(replies)

    def handle(self, rep: Any, info: Inflight | None = None) -> None:
        """Handle one reply. Whatever a node sends, a failure here refuses that message with a logged
        reason and never stops the server."""
        if info is None:
            info = self.inflight.pop(rep.metadata.reply_to_message_id, None)
        if info is None:
            return  # a reply we stopped waiting for (timed out): already logged
        try:
            self._handle(rep, info)
        except Exception as e:  # noqa: BLE001 - one message must never stop the server
            self.log(
                {
                    "event": "message_refused",
                    "node": info.node,
                    "client": info.client,
                    "kind": info.kind,
                    "reason": f"{type(e).__name__} while handling the reply: {' '.join(str(e).split())[:300]}",
                }
            )

    def _handle(self, rep: Any, info: Inflight) -> None:
        node, waited = info.node, round(self.clock() - info.sent, 2)
        if rep.has_error():
            unavailable = rep.error.code == ErrorCode.NODE_UNAVAILABLE
            first = (
                unavailable and node not in self.lost
            )  # else: one more message lost with a known-lost node
            if unavailable:
                self.lost.add(node)
                self.waiting.discard(node)
            self.log(
                {
                    "event": "node_lost" if first else ("message_lost" if unavailable else "node_error"),
                    "node": node,
                    "client": info.client,
                    "kind": info.kind,
                    "code": int(rep.error.code),
                    "reason": str(rep.error.reason)[:500],
                    "waited": waited,
                }
            )
            return
        if info.kind == TRAIN:
            self._handle_upload(node, rep.content, waited)
        else:
            self._handle_report(node, info, rep.content)

    def _handle_upload(self, node: int, content: RecordDict, waited: float) -> None:
        self.arrivals += 1
        meta = {
            "node": node,
            "arrival": self.arrivals,
            "waited": waited,
            "server_update_at_arrival": self.server.update,
        }
        try:
            wire = unpack_wire(content, self.server.max_bytes, with_report=True)
            header = json.loads(wire.header)  # unpack_wire checked it is a JSON object
            sender = self._sender(node, header)
            report = unpack_report(content, sender, with_wire=True, expected_event=REPLY_EVENT[TRAIN])
            if (report.get("round"), report.get("base_version")) != (
                header.get("version"),
                header.get("base_version"),
            ):
                raise ProtocolError(
                    f"report round/base_version ({report.get('round')}, {report.get('base_version')}) "
                    "disagree with the upload's version/base_version"
                )
        except ProtocolError as e:
            self.log(
                {
                    "event": "upload",
                    "accepted": False,
                    "reason": str(e),
                    "client": self.node_client.get(node),
                    **meta,
                }
            )
            return
        self.log(report)
        event = self.server.receive(wire, sender=sender)
        self.log({"client": sender, **event, **meta})
        if event["accepted"]:
            if node not in self.node_client:
                self.node_client = {n: c for n, c in self.node_client.items() if c != sender}
                self.node_client[node] = sender
            self.waiting.add(node)
            self.ckpt.store_upload(sender, int(event["round"]), wire)
            self.save_checkpoint()

    def _sender(self, node: int, header: dict[str, Any]) -> str:
        """The client id this node may speak for: bound at its first accepted upload. A new node may take
        over an id only while the id's old node is offline (a node that re-registered under a new key)."""
        bound = self.node_client.get(node)
        if bound is not None:
            return bound
        claimed = check_client_id(header.get("client_id"), "upload header's client_id")
        owner = self._client_node(claimed)
        if owner is not None and owner in self._online():
            raise ProtocolError(f"client id '{claimed}' already belongs to online node {owner}")
        return claimed

    def _handle_report(self, node: int, info: Inflight, content: RecordDict) -> None:
        try:
            report = unpack_report(content, self.node_client.get(node), expected_event=REPLY_EVENT[info.kind])
        except ProtocolError as e:
            self.log({"event": "report_rejected", "node": node, "kind": info.kind, "reason": str(e)})
            return
        self.log(
            {
                **report,
                "node": node,
                "bytes_sent": info.bytes,
                "round_trip": round(self.clock() - info.sent, 2),
            }
        )
        if info.kind == ENHANCED:
            self.ckpt.delivered(report["client"])
            self.save_checkpoint()

    def sweep_timeouts(self) -> None:
        now = self.clock()
        for mid, f in list(self.inflight.items()):
            if now - f.sent > self.fl.straggler_timeout:
                del self.inflight[mid]
                self.log(
                    {
                        "event": "straggler_timeout",
                        "node": f.node,
                        "client": f.client,
                        "kind": f.kind,
                        "reason": f"no reply within flower.straggler_timeout={self.fl.straggler_timeout:g} s; "
                        "its reply will be ignored",
                    }
                )

    def server_update(self) -> None:
        """One server update, run in a worker thread while this thread keeps watching the grid: node loss
        and error replies are noticed during the update, and replies that change the server's state are
        handled, in arrival order, once it is done."""
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["responses"] = self.server.step()
            except BaseException as e:  # noqa: BLE001 - re-raised in the loop's thread below
                result["error"] = e

        worker = threading.Thread(target=work, name="crosslm-server-update", daemon=True)
        worker.start()
        deferred: list[tuple[Any, Inflight]] = []
        while True:
            worker.join(self.fl.poll_interval)
            if not worker.is_alive():
                break
            self.watch(deferred)
        if "error" in result:
            raise result["error"]
        responses = result["responses"]
        for cid, wire in responses:
            self.ckpt.store_outgoing(cid, self.server.update, wire)
        self.save_checkpoint()
        for cid, _ in responses:
            node = self._client_node(cid)
            if node is not None:
                self.waiting.discard(node)  # assign_work delivers the outbox entry, then the next train
        for rep, info in sorted(deferred, key=lambda d: d[0].metadata.created_at):
            self.handle(rep, info)

    def watch(self, deferred: list[tuple[Any, Inflight]]) -> None:
        """While an update runs: give idle nodes work, notice lost nodes and error replies at once, keep
        every other reply in `deferred` (it would touch the server's state), and drop stragglers."""
        self.assign_work()
        if self.inflight:
            for rep in self.grid.pull_messages(list(self.inflight)):
                info = self.inflight.pop(rep.metadata.reply_to_message_id, None)
                if info is None:
                    continue
                if rep.has_error():
                    self.handle(rep, info)
                else:
                    deferred.append((rep, info))
        self.sweep_timeouts()

    def finish(self) -> None:
        """Deliver the last enhanced SLMs and collect each client's final evaluation."""
        online = self._online()
        self.inflight = {k: v for k, v in self.inflight.items() if v.kind != TRAIN}
        for node in sorted(online):
            cid = self.node_client.get(node)
            delivering = any(f.node == node and f.kind == ENHANCED for f in self.inflight.values())
            if cid is not None and cid in self.ckpt.outbox and not delivering:
                self._push(node, ENHANCED, pack(wire=self.ckpt.outgoing(cid, self.server.max_bytes)))
            self._push(node, EVALUATE, pack(request={"server_update": self.server.update}))
        deadline = self.clock() + self.fl.straggler_timeout
        while self.inflight and self.clock() < deadline:
            if not self.poll():
                self.sleep(self.fl.poll_interval)
        for f in self.inflight.values():
            self.log(
                {
                    "event": "straggler_timeout",
                    "node": f.node,
                    "client": f.client,
                    "kind": f.kind,
                    "reason": "no reply before the run ended",
                }
            )


# -------------------------------------------------------------------------------------- ServerApp
app = ServerApp()


def run_settings(run_config: dict[str, Any]) -> tuple[RunConfig, Path]:
    cfg = read_run_config(run_config)
    run_dir = str(run_config.get("run-dir", ""))
    if not run_dir:
        raise ConfigError("run config 'run-dir' is empty; it names the server-side run directory")
    return cfg, Path(run_dir)


def check_resumable(saved: Path, cfg: RunConfig) -> None:
    """A checkpoint continues only the run it belongs to: the config may differ in its Flower settings
    (timeouts, polling) and names, nothing else."""
    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = cfg.to_dict()
    free = {"flower", "name", "output_dir", "threads"}
    diff = sorted(k for k in set(old) | set(new) if k not in free and old.get(k) != new.get(k))
    if diff:
        raise ConfigError(
            f"run dir '{saved.parent}' holds a checkpoint of a run whose config differs in '{diff[0]}'; resume "
            "with the same config (only flower.* may change) or choose a new --run-dir"
        )


def serve(
    grid: GridLike,
    cfg: RunConfig,
    run_dir: Path,
    new_message: MessageFactory = flower_message,
    **loop_options: Any,
) -> None:
    """One CrossLM run (or its resumption) over `grid`; writes the same run directory as `crosslm run`.
    `loop_options` (clock, sleep) go to the `AsyncLoop`: a simulated grid brings its own clock."""
    interrupts.install()  # SIGINT / SIGTERM: close the run with a report marked interrupted
    ckpt = ServerCheckpoint(run_dir / "checkpoint")
    state = ckpt.load_state() if ckpt.exists() else None
    if state is not None:
        check_resumable(run_dir / "config.yaml", cfg)
    session = RunSession(cfg, run_dir, runtime="flower", resume_state=state)
    log, synthetic = session.log, session.synthetic
    completed = interrupted = False
    try:
        server = session.build_server()
        if state is not None:
            ckpt.restore(server)
            loop = AsyncLoop(grid, server, cfg, log, ckpt, synthetic, new_message=new_message,
                             runtime_state=state["runtime"], **loop_options)  # fmt: skip
            log(
                {
                    "event": "resumed",
                    "update": server.update,
                    "clients": sorted(ckpt.uploads),
                    "pending": list(server.pending),
                    "undelivered": sorted(ckpt.outbox),
                }
            )
            loop.wait_for_nodes()
        else:
            session.log_start([])
            loop = AsyncLoop(grid, server, cfg, log, ckpt, synthetic, new_message=new_message, **loop_options)
            loop.wait_for_nodes()
            loop.assign_work()  # clients train while the server measures its starting point
            session.measure_start()
            loop.save_checkpoint()
        loop.run()
        session.measure_end()
        session.save_adapter()
        completed = True
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        session.close(completed=completed, interrupted=interrupted)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, run_dir = run_settings(dict(context.run_config))
    serve(grid, cfg, run_dir)
