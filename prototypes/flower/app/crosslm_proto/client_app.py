"""CrossLM prototype ClientApp (runs on each SuperNode).

IMPORTANT (flwr 1.42, subprocess isolation): every incoming Message is handled by a
*fresh* `flwr-clientapp` process spawned by the SuperNode's SuperExec. Module-level
globals do NOT survive between messages. Persist state via
  * context.state (RecordDict; kept in SuperNode memory per run series, shipped to/from
    the ClientApp process on every message -> keep it SMALL), or
  * the node's own disk (path from --node-config), for models / large blobs.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from crosslm_proto.payload import pack, unpack

app = ClientApp()


def _node_cfg(context: Context) -> dict:
    # --node-config 'partition-id=0 slm-name="gpt2" data-path="/x" work-dir="/y" delay=0.5'
    nc = context.node_config
    return {
        "partition-id": int(nc.get("partition-id", -1)),
        "slm-name": str(nc.get("slm-name", "unknown-slm")),
        "data-path": str(nc.get("data-path", "")),
        "work-dir": str(nc.get("work-dir", "/tmp/crosslm_node")),
        "delay": float(nc.get("delay", 0.0)),
    }


def _proc_start_time() -> float:
    """Wall-clock start time of this (flwr-clientapp) process, from /proc."""
    try:
        with open("/proc/self/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            btime = next(int(l.split()[1]) for l in f if l.startswith(b"btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except Exception:  # noqa: BLE001
        return float("nan")


def _bump_counter(context: Context, key: str) -> int:
    """Small persistent counter in context.state (survives across messages of a run)."""
    if "counters" not in context.state:
        context.state["counters"] = MetricRecord({})
    rec = context.state["counters"]
    rec[key] = int(rec.get(key, 0)) + 1  # type: ignore[arg-type]
    return int(rec[key])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """'local training + upload': sleep `delay` s, return a blob of `reply-mb` MB."""
    t0 = time.time()
    cfg = _node_cfg(context)
    header, blob = unpack(msg.content)
    n_train = _bump_counter(context, "train")
    time.sleep(cfg["delay"] * float(header.get("delay_scale", 1.0)))
    reply_bytes = int(float(header.get("reply_mb", 0.0)) * 2**20)
    out_blob = os.urandom(reply_bytes) if reply_bytes else b""
    # Also persist something to the node's own disk (the pattern for big state)
    wd = Path(cfg["work-dir"]); wd.mkdir(parents=True, exist_ok=True)
    (wd / "last_train.txt").write_text(f"{context.run_id} {n_train} {time.time()}\n")
    reply_header = {
        "kind": "slm_update",
        "task_seq": header.get("seq"),
        "node_id": context.node_id,
        "partition_id": cfg["partition-id"],
        "slm_name": cfg["slm-name"],
        "data_path": cfg["data-path"],
        "n_train_on_this_node": n_train,
        "pid": os.getpid(),  # differs per message -> proves fresh process per message
        "in_blob_len": len(blob) if blob is not None else 0,
        "in_blob_sha256": hashlib.sha256(blob).hexdigest() if blob else None,
        "in_sha_ok": (hashlib.sha256(blob).hexdigest() == header.get("sha256")) if blob else None,
        "out_blob_sha256": hashlib.sha256(out_blob).hexdigest(),
        "handler_s": None,
    }
    reply_header["handler_s"] = time.time() - t0
    return Message(pack(reply_header, out_blob), reply_to=msg)


@app.query("enhanced")  # routed for message_type == "query.enhanced"
def receive_enhanced(msg: Message, context: Context) -> Message:
    """'receive enhanced model' (server -> node push; reply is a small ack)."""
    header, blob = unpack(msg.content)
    n = _bump_counter(context, "enhanced")
    cfg = _node_cfg(context)
    wd = Path(cfg["work-dir"]); wd.mkdir(parents=True, exist_ok=True)
    if blob:
        (wd / "enhanced_model.bin").write_bytes(blob)
    ack = {
        "kind": "ack_enhanced",
        "task_seq": header.get("seq"),
        "node_id": context.node_id,
        "n_enhanced_on_this_node": n,
        "len": len(blob) if blob else 0,
        "sha_ok": (hashlib.sha256(blob).hexdigest() == header.get("sha256")) if blob else None,
    }
    return Message(pack(ack), reply_to=msg)


@app.query()  # plain "query": echo, used for latency measurement
def echo(msg: Message, context: Context) -> Message:
    t_handler = time.time()
    header, blob = unpack(msg.content)
    header["echo_node"] = context.node_id
    # timing breakdown: message creation (server) -> process start -> handler entry
    header["t_created"] = msg.metadata.created_at
    header["t_proc_start"] = _proc_start_time()
    header["t_handler"] = t_handler
    return Message(pack(header, blob, carrier=header.get("carrier", "array")), reply_to=msg)


@app.evaluate("crash")  # "evaluate.crash": raises -> error reply to the ServerApp
def crash(msg: Message, context: Context) -> Message:
    raise RuntimeError("deliberate failure for testing")
