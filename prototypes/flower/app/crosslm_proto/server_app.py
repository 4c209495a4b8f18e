"""CrossLM prototype ServerApp: asynchronous push/pull loop over flwr 1.42 Grid.

No Strategy / lock-step rounds: each idle node gets a work message; replies are
pulled as they arrive, handled one by one, and the node that replied immediately
gets new work. A slow node never blocks the others. Stops after U handled replies.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import Context, Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from crosslm_proto.payload import pack, unpack

app = ServerApp()


@dataclass
class InFlight:
    node_id: int
    kind: str  # "train" | "query.enhanced" | "query"
    seq: int
    t_sent: float
    t_push_done: float
    nbytes_down: int


@dataclass
class Stats:
    events: list = field(default_factory=list)
    handled_train: int = 0
    errors: list = field(default_factory=list)


def _blob(mb: float, seed: int) -> bytes:
    n = int(mb * 2**20)
    if n <= 0:
        return b""
    # cheap deterministic-ish bytes (os.urandom of 40 MB is fine too, ~0.1 s)
    return os.urandom(n)


def _push_one(grid: Grid, node_id: int, kind: str, header: dict, blob: bytes | None,
              ttl: float, group: str, carrier: str = "array") -> tuple[str | None, float]:
    """Push a single message; return (message_id, push_seconds)."""
    if blob:
        header = dict(header, sha256=hashlib.sha256(blob).hexdigest(), blob_len=len(blob))
    msg = Message(pack(header, blob if blob else None, carrier), dst_node_id=node_id,
                  message_type=kind, ttl=ttl, group_id=group)
    t = time.time()
    ids = list(grid.push_messages([msg]))
    dt = time.time() - t
    return (ids[0] if ids else None), dt


def _wait_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    t0 = time.time()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.time() - t0 > timeout:
            return nodes
        time.sleep(0.5)


def _pull_blocking(grid: Grid, msg_id: str, poll: float, timeout: float) -> Message | None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        res = list(grid.pull_messages([msg_id]))
        if res:
            return res[0]
        time.sleep(poll)
    return None


def latency_probe(grid: Grid, cfg: dict, nodes: list[int], out: dict) -> None:
    """Sequential request/response timings against the first node."""
    node = nodes[0]
    poll, ttl = float(cfg["poll-interval"]), float(cfg["msg-ttl"])
    big_mb = float(cfg["payload-mb"]) or 40.0
    probes = []
    plan = [("small-echo", 0.0, "query", 0.0, "array")] * 4 + [
        ("big-down", big_mb, "train", 0.0, "array"),  # 40 MB server->node, tiny reply
        ("big-up", 0.0, "train", big_mb, "array"),    # tiny request, 40 MB node->server
        ("big-echo", big_mb, "query", 0.0, "array"),  # 40 MB both ways
    ]
    for extra in str(cfg.get("extra-sizes", "")).split(","):
        if extra.strip():  # e.g. "50:config,200:array"
            mb, _, carrier = extra.partition(":")
            plan.append((f"echo-{mb}MB-{carrier or 'array'}", float(mb), "query", 0.0,
                         carrier or "array"))
    for i, (name, down_mb, kind, up_mb, carrier) in enumerate(plan):
        blob = _blob(down_mb, i)
        t0 = time.time()
        mid, push_s = _push_one(grid, node, kind,
                                {"seq": i, "reply_mb": up_mb, "delay_scale": 0.0,
                                 "carrier": carrier}, blob, ttl, "probe", carrier)
        rep = _pull_blocking(grid, mid, poll, 600) if mid else None
        rtt = time.time() - t0
        ok = rep is not None and not rep.has_error()
        rec = {"name": name, "down_mb": down_mb, "up_mb": up_mb, "rtt_s": round(rtt, 3),
               "push_s": round(push_s, 3), "ok": ok}
        if ok:
            h, b = unpack(rep.content)
            rec["reply_blob_len"] = len(b) if b else 0
            if "echo" in name and blob:
                rec["echo_intact"] = b == blob
            if kind == "query" and "t_proc_start" in h:
                rec["created_to_proc_start_s"] = round(h["t_proc_start"] - h["t_created"], 3)
                rec["proc_start_to_handler_s"] = round(h["t_handler"] - h["t_proc_start"], 3)
                rec["handler_to_server_s"] = round(time.time() - h["t_handler"], 3)
            if kind == "train":
                rec["in_sha_ok"] = h.get("in_sha_ok")
                rec["out_sha_ok"] = hashlib.sha256(b or b"").hexdigest() == h.get("out_blob_sha256")
        elif rep is not None:
            rec["error"] = f"{rep.error.code}: {rep.error.reason}"
        log(INFO, "[probe] %s", rec)
        probes.append(rec)
    out["probes"] = probes


def async_loop(grid: Grid, cfg: dict, nodes: list[int], out: dict) -> None:
    U = int(cfg["num-updates"])
    poll, ttl = float(cfg["poll-interval"]), float(cfg["msg-ttl"])
    reply_timeout = float(cfg["reply-timeout"])
    down_mb, up_mb = float(cfg["payload-mb"]), float(cfg["reply-mb"])
    send_enh = bool(cfg["send-enhanced"])
    st = Stats()
    inflight: dict[str, InFlight] = {}
    busy: set[int] = set()          # nodes that currently hold a train task
    lost: set[int] = set()
    seq = 0
    t_start = time.time()
    last_discovery = 0.0

    def ev(event: str, **kw) -> None:
        rec = {"t": round(time.time() - t_start, 3), "ev": event, **kw}
        st.events.append(rec)
        log(INFO, "[async] %s", rec)

    def give_work(node: int) -> None:
        nonlocal seq
        seq += 1
        blob = _blob(down_mb, seq)
        t = time.time()
        mid, push_s = _push_one(grid, node, "train",
                                {"seq": seq, "reply_mb": up_mb, "kind": "work"},
                                blob, ttl, f"task-{seq}")
        if mid is None:
            ev("push_failed", node=node, seq=seq)
            return
        inflight[mid] = InFlight(node, "train", seq, t, time.time(), len(blob))
        busy.add(node)
        ev("push_train", node=node, seq=seq, push_s=round(push_s, 3))

    for n in nodes:
        give_work(n)

    while st.handled_train < U:
        now = time.time()
        # (re)discover nodes: new SuperNodes or ones that came back get work
        if now - last_discovery > 2.0:
            last_discovery = now
            online = set(grid.get_node_ids())
            for n in sorted(online - busy):
                if n in lost:
                    ev("node_back", node=n)
                    lost.discard(n)
                else:
                    ev("node_new", node=n)
                give_work(n)
        if not inflight:
            time.sleep(poll)
            continue
        replies = list(grid.pull_messages(list(inflight.keys())))
        for rep in replies:
            mid = rep.metadata.reply_to_message_id
            info = inflight.pop(mid, None)
            if info is None:
                continue
            rtt = time.time() - info.t_sent
            if rep.has_error():
                code, reason = rep.error.code, rep.error.reason
                st.errors.append({"node": info.node_id, "kind": info.kind, "seq": info.seq,
                                  "code": code, "reason": reason, "after_s": round(rtt, 2)})
                ev("error_reply", node=info.node_id, kind=info.kind, seq=info.seq, code=code,
                   reason=reason[:100], after_s=round(rtt, 2))
                if info.kind == "train":
                    busy.discard(info.node_id)
                    if code == ErrorCode.NODE_UNAVAILABLE:
                        lost.add(info.node_id)       # wait for it in discovery
                    elif info.node_id in set(grid.get_node_ids()):
                        give_work(info.node_id)      # app-level error: retry
                continue
            h, b = unpack(rep.content)
            if info.kind == "train":
                st.handled_train += 1
                busy.discard(info.node_id)
                ev("train_reply", node=info.node_id, seq=info.seq, rtt_s=round(rtt, 3),
                   handled=st.handled_train, pid=h.get("pid"), part=h.get("partition_id"),
                   slm=h.get("slm_name"), n_on_node=h.get("n_train_on_this_node"),
                   in_sha_ok=h.get("in_sha_ok"), up_len=len(b or b""))
                if st.handled_train >= U:
                    break
                if send_enh:
                    eb = _blob(down_mb, -info.seq)
                    emid, _ = _push_one(grid, info.node_id, "query.enhanced",
                                        {"seq": info.seq}, eb, ttl, f"enh-{info.seq}")
                    if emid:
                        inflight[emid] = InFlight(info.node_id, "query.enhanced", info.seq,
                                                  time.time(), time.time(), len(eb))
                give_work(info.node_id)
            else:
                ev("ack", node=info.node_id, kind=info.kind, seq=info.seq, rtt_s=round(rtt, 3),
                   n_on_node=h.get("n_enhanced_on_this_node"), sha_ok=h.get("sha_ok"))
        # client-side timeouts (independent of Flower's heartbeat-based detection)
        for mid, info in list(inflight.items()):
            if time.time() - info.t_sent > reply_timeout:
                inflight.pop(mid)
                busy.discard(info.node_id)
                ev("timeout", node=info.node_id, kind=info.kind, seq=info.seq)
        if not replies:
            time.sleep(poll)
    out["async"] = {
        "handled_train": st.handled_train,
        "t_start_epoch": t_start,
        "elapsed_s": round(time.time() - t_start, 3),
        "left_in_flight": len(inflight),
        "errors": st.errors,
        "events": st.events,
    }


def error_probe(grid: Grid, cfg: dict, nodes: list[int], out: dict) -> None:
    """What does the ServerApp get back for failing / unroutable / invalid messages?"""
    res = []
    for mtype in ["evaluate.crash", "query.nohandler", "enhanced", "query.enhanced.v2"]:
        rec: dict = {"message_type": mtype}
        try:
            msg = Message(pack({"seq": 0}), dst_node_id=nodes[0], message_type=mtype,
                          ttl=float(cfg["msg-ttl"]))
            ids = list(grid.push_messages([msg]))
            rec["push_ids"] = [i for i in ids]
            if ids and ids[0]:
                rep = _pull_blocking(grid, ids[0], 0.2, 60)
                if rep is None:
                    rec["reply"] = None
                elif rep.has_error():
                    rec["reply_error"] = {"code": rep.error.code, "reason": rep.error.reason[:160]}
                else:
                    rec["reply_ok"] = True
        except Exception as e:  # noqa: BLE001
            rec["exception"] = f"{type(e).__name__}: {str(e)[:200]}"
        log(INFO, "[errors] %s", rec)
        res.append(rec)
    out["error_probe"] = res


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    out: dict = {"run_id": context.run_id, "config": cfg}
    t0 = time.time()
    nodes = _wait_nodes(grid, int(cfg["min-nodes"]), float(cfg["node-wait-timeout"]))
    out["nodes"] = nodes
    out["wait_nodes_s"] = round(time.time() - t0, 3)
    log(INFO, "[server] online nodes: %s", nodes)
    try:
        if not nodes:
            log(WARNING, "[server] no nodes online")
        elif cfg.get("mode") == "errors":
            error_probe(grid, cfg, nodes, out)
        elif cfg.get("mode", "async") == "latency":
            latency_probe(grid, cfg, nodes, out)
        else:
            async_loop(grid, cfg, nodes, out)
    finally:
        if cfg.get("result-path"):
            with open(str(cfg["result-path"]), "w", encoding="utf-8") as f:
                json.dump(out, f, indent=1)
    log(INFO, "[server] done")
