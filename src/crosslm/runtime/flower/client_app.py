"""The CrossLM ClientApp: what runs on each organisation's SuperNode.

Flower starts a fresh process for every message, so the client's state (SLM weights, round, base
version, metrics) lives on the node's own disk, under `work-dir`, and is reloaded per message. Private
data never leaves the node: it comes from `data-dir` (the organisation's files) or, in a simulation, from
`partition-id` (this node's share of the catalogue dataset, split exactly as `crosslm run` splits it).

Node config (`flower-supernode --node-config '...'`, string values quoted):
  work-dir          folder for this client's state and SLM (required)
  client-id         the client's name (default: client-<partition-id>)
  slm               this client's SLM: catalogue name, Hugging Face id or path (default: from the config)
  data-dir          folder with train.jsonl and test.jsonl ({"text": ..., "label": <name>}); optional
                    global_test.jsonl for simulation-only global evaluation
  partition-id      simulation instead of data-dir: this node's partition of the run's dataset
  delay             extra seconds per local round (emulates slower hardware in demonstrations)
  threads           torch threads for this node's processes
  outbox-audit-dir  if set, a copy of every message this client sends is written here for inspection
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from crosslm.client.client import ClientBase, ClientData
from crosslm.config import RunConfig
from crosslm.errors import ConfigError, DataError, ProtocolError
from crosslm.io import atomic_write_bytes, atomic_write_text, read_jsonl
from crosslm.lifecycle import build_client, prepare_data
from crosslm.protocol import check_client_id
from crosslm.runtime.flower.deploy import read_run_config
from crosslm.runtime.flower.payload import pack, unpack_request, unpack_wire
from crosslm.task import GenerationPairs, LabelledTexts, TaskSpec

app = ClientApp()


@dataclass
class NodeSettings:
    work_dir: Path
    client_id: str
    slm: str
    data_dir: Path
    partition_id: int | None
    delay: float
    threads: int
    audit_dir: Path | None


def _get(node: dict[str, Any], key: str, typ: type, default: Any = None) -> Any:
    if key not in node:
        if default is None:
            raise ConfigError(f"node config lacks '{key}' (set it with flower-supernode --node-config)")
        return default
    v = node[key]
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise ConfigError(f"node config '{key}' = {v!r}: expected a {typ.__name__}")
    return v


def node_settings(node: dict[str, Any], cfg: RunConfig) -> NodeSettings:
    """Parse and check the SuperNode's node config; a mistake names the key and what was expected."""
    work = Path(_get(node, "work-dir", str)).expanduser()
    pid = _get(node, "partition-id", int, -1)
    if "data-dir" not in node and pid < 0:
        raise ConfigError("node config needs 'data-dir' (the client's data) or 'partition-id' (a simulation)")
    if pid >= cfg.data.num_clients:
        raise ConfigError(f"node config 'partition-id' = {pid}: expected 0..{cfg.data.num_clients - 1}")
    cid = _get(node, "client-id", str, f"client-{pid}" if pid >= 0 else "")
    if not cid:
        raise ConfigError("node config lacks 'client-id' (needed with 'data-dir')")
    try:
        check_client_id(cid, "node config 'client-id'")
    except ProtocolError as e:
        raise ConfigError(str(e)) from None
    slms = cfg.clients.slms
    slm = _get(node, "slm", str, str(slms[pid % len(slms)]) if pid >= 0 else "")
    if not slm:
        raise ConfigError("node config lacks 'slm' (needed with 'data-dir')")
    audit = _get(node, "outbox-audit-dir", str, "")
    data_dir = Path(_get(node, "data-dir", str, str(work / "data"))).expanduser()
    return NodeSettings(
        work_dir=work,
        client_id=cid,
        slm=slm,
        data_dir=data_dir,
        partition_id=pid if pid >= 0 and "data-dir" not in node else None,
        delay=_get(node, "delay", float, 0.0),
        threads=_get(node, "threads", int, 0),
        audit_dir=Path(audit).expanduser() if audit else None,
    )


def run_settings(run_config: dict[str, Any]) -> tuple[RunConfig, TaskSpec]:
    """The run's config and task, as the server submitted them (`crosslm flower submit`)."""
    cfg = read_run_config(run_config)
    try:
        fields = json.loads(str(run_config["task"]))
        task = TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})  # type: ignore[arg-type]
    except (KeyError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"run config lacks a valid 'task' ({e}); submit with crosslm flower") from None
    return cfg, task


def _label_id(value: Any, task: TaskSpec) -> int | None:
    """A row's label (a condition for a generation task) as its index: its name or the index itself."""
    if isinstance(value, str) and value in task.labels:
        value = task.labels.index(value)
    return value if isinstance(value, int) and 0 <= value < task.num_labels else None


def _read_split(path: Path, task: TaskSpec, required: bool) -> LabelledTexts | GenerationPairs:
    """A node's data file: JSONL rows {"text", "label"} for classification, {"input", "target", "label"}
    (the label being the condition) for a generation task."""
    fields = ("input", "target") if task.kind == "generation" else ("text",)
    if not path.is_file():
        if required:
            raise DataError(
                f"client data file '{path}' does not exist (expected JSONL rows with {', '.join(fields)} and label)"
            )
        return GenerationPairs() if task.kind == "generation" else LabelledTexts([], [])
    columns: list[list[str]] = [[] for _ in fields]
    labels: list[int] = []
    for i, row in enumerate(read_jsonl(path), 1):
        label = _label_id(row.get("label"), task)
        if label is None or not all(isinstance(row.get(f), str) for f in fields):
            expected = ", ".join(f'"{f}": str' for f in fields)
            raise DataError(
                f"'{path}' row {i}: expected {{{expected}, \"label\": one of {list(task.labels)}}}, got {row!r:.120}"
            )
        for col, f in zip(columns, fields, strict=True):
            col.append(row[f])
        labels.append(label)
    if task.kind == "generation":
        return GenerationPairs(columns[0], columns[1], labels)
    return LabelledTexts(columns[0], labels)


def write_split(path: Path, data: LabelledTexts | GenerationPairs, task: TaskSpec) -> None:
    if isinstance(data, GenerationPairs):
        rows = [json.dumps({"input": x, "target": y, "label": task.labels[c]})
                for x, y, c in zip(data.inputs, data.targets, data.conditions, strict=True)]  # fmt: skip
    else:
        rows = [
            json.dumps({"text": t, "label": task.labels[y]})
            for t, y in zip(data.texts, data.labels, strict=True)
        ]
    atomic_write_text(path, "".join(r + "\n" for r in rows))


def _materialise_partition(s: NodeSettings, cfg: RunConfig, task: TaskSpec) -> None:
    """Simulation: write this node's partition to its data dir once (the same split as `crosslm run`)."""
    if (s.data_dir / "train.jsonl").is_file():
        return
    _, split = prepare_data(cfg)
    assert s.partition_id is not None
    write_split(s.data_dir / "test.jsonl", split.test[s.partition_id], task)
    write_split(s.data_dir / "global_test.jsonl", split.global_test, task)
    write_split(s.data_dir / "train.jsonl", split.train[s.partition_id], task)  # last: marks it complete


def load_client(context: Context) -> tuple[ClientBase, NodeSettings]:
    cfg, task = run_settings(context.run_config)
    s = node_settings(dict(context.node_config), cfg)
    torch.set_num_threads(s.threads or cfg.flower.threads_per_node)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if s.partition_id is not None:
        _materialise_partition(s, cfg, task)
    data: ClientData[Any] = ClientData(
        *(
            _read_split(s.data_dir / f"{name}.jsonl", task, name != "global_test")
            for name in ("train", "test", "global_test")
        )
    )
    index = s.partition_id if s.partition_id is not None else zlib.crc32(s.client_id.encode()) % 1000
    client = build_client(cfg, task, s.client_id, s.slm, data, index)
    client.restore(s.work_dir / "model")
    return client, s


def _audit(s: NodeSettings, kind: str, content: RecordDict) -> None:
    """Keep an exact copy of an outgoing message: each record as JSON or as its raw bytes."""
    if s.audit_dir is None:
        return
    folder = s.audit_dir / f"{time.time_ns()}-{kind}"
    for name, rec in content.items():
        if isinstance(rec, ConfigRecord):
            atomic_write_text(folder / f"{name}.json", json.dumps(dict(rec)))
        elif isinstance(rec, ArrayRecord):
            for key, arr in rec.items():
                atomic_write_bytes(folder / f"{name}.{key}.bin", bytes(arr.data))
        else:
            atomic_write_text(folder / f"{name}.unknown", repr(rec))


def _reply(msg: Message, s: NodeSettings, kind: str, content: RecordDict) -> Message:
    _audit(s, kind, content)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round on private data; reply with the SLM upload and a metrics report."""
    unpack_request(msg.content)
    client, s = load_client(context)
    wire, event = client.local_round()
    if s.delay > 0:
        time.sleep(s.delay)
    client.save(s.work_dir / "model")
    return _reply(msg, s, "train", pack(wire=wire, report=event))


@app.query("enhanced")
def enhanced(msg: Message, context: Context) -> Message:
    """Validate and adopt the server's enhanced SLM; reply with accuracy before and after."""
    client, s = load_client(context)
    wire = unpack_wire(msg.content, client.max_payload_bytes)
    event = client.receive_enhanced(wire)
    client.save(s.work_dir / "model")
    return _reply(msg, s, "enhanced", pack(report=event))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """End the run on this node: the final local round (clients.final_round), then the SLM it ends with,
    evaluated on the client's own test split (and the global one in a simulation)."""
    unpack_request(msg.content)
    client, s = load_client(context)
    report = client.finish()
    if report["final_epochs"]:  # the weights changed: the saved client is the one evaluated
        client.save(s.work_dir / "model")
    return _reply(msg, s, "evaluate", pack(report=report))
