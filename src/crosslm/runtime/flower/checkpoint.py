"""The server's checkpoint: everything a restarted server needs to go on without losing an accepted upload.

Layout under `<run_dir>/checkpoint/`:
  state.json             update counter, pending triggers, synthetic pool (texts or pairs), dedup hashes, log line counts,
                         the runtime's own state (node bindings, undelivered messages, counters)
  uploads/<file>.wire    each client's latest accepted upload, byte for byte as it arrived
  outbox/<file>.wire     enhanced SLMs computed but not yet handed to the transport
  adapter/               the LLM's LoRA adapter after the last completed update (peft `save_pretrained`)

Every file is written atomically, and state.json (written last) only names files that already exist,
so a SIGKILL at any instant leaves the previous checkpoint or the new one, never a mix. Restoring
re-validates every stored upload through `CrossLMServer.receive`, exactly as when it first arrived.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crosslm.errors import CrossLMError
from crosslm.io import atomic_write_bytes, atomic_write_json, child_path
from crosslm.protocol import WireMessage, check_client_id
from crosslm.server.generation_update import SyntheticPair
from crosslm.server.server import CrossLMServer
from crosslm.server.update import SyntheticExample

FORMAT_VERSION = 1


class ServerCheckpoint:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.uploads: dict[str, str] = {}  # client id -> file under uploads/
        self.outbox: dict[str, str] = {}  # client id -> file under outbox/
        self.adapter_update = -1  # server update whose adapter is on disk

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    # -- writing -------------------------------------------------------------------------------------
    def upload_path(self, client_id: str, version: int) -> Path:
        """Where a client's upload is stored; refuses (ProtocolError) a name that would leave uploads/."""
        return child_path(self.root / "uploads", f"{check_client_id(client_id)}-r{version}.wire")

    def store_upload(self, client_id: str, version: int, wire: WireMessage) -> None:
        path = self.upload_path(client_id, version)
        atomic_write_bytes(path, wire.to_bytes())
        self.uploads[client_id] = path.name

    def store_outgoing(self, client_id: str, update: int, wire: WireMessage) -> None:
        path = child_path(self.root / "outbox", f"{check_client_id(client_id)}-u{update}.wire")
        atomic_write_bytes(path, wire.to_bytes())
        self.outbox[client_id] = path.name

    def delivered(self, client_id: str) -> None:
        self.outbox.pop(client_id, None)

    def save(self, server: CrossLMServer, *, log_lines: int, synthetic_lines: int, runtime: dict) -> None:
        """Write the adapter if it changed, then state.json; then drop files no state names any more."""
        if server.update != self.adapter_update:
            if server.llm is not None:  # a baseline's server has no LLM, so no adapter
                server.save_adapter(self.root / "adapter")
            self.adapter_update = server.update
        state = {
            "format": FORMAT_VERSION,
            "update": server.update,
            "adapter_update": self.adapter_update,
            "pending": list(server.pending),
            "pool": [vars(e) for e in server.pool],
            "pairs": [vars(p) for p in server.pairs],
            "seen": sorted(server.seen),
            "uploads": dict(self.uploads),
            "outbox": dict(self.outbox),
            "log_lines": log_lines,
            "synthetic_lines": synthetic_lines,
            "runtime": runtime,
        }
        atomic_write_json(self.state_path, state)
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        for folder, keep in (("uploads", self.uploads), ("outbox", self.outbox)):
            for f in (self.root / folder).glob("*.wire"):
                if f.name not in keep.values():
                    f.unlink(missing_ok=True)

    # -- reading -------------------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CrossLMError(
                f"checkpoint '{self.state_path}' cannot be read ({e}); start a new run"
            ) from None
        if state.get("format") != FORMAT_VERSION:
            raise CrossLMError(
                f"checkpoint '{self.state_path}' has format {state.get('format')!r}, expected {FORMAT_VERSION}"
            )
        return state

    def restore(self, server: CrossLMServer) -> dict[str, Any]:
        """Bring a freshly built server to the checkpointed state; returns the state (runtime part too)."""
        state = self.load_state()
        server.update = int(state["update"])  # before the uploads: their base versions are checked against it
        for cid, name in state["uploads"].items():
            wire = WireMessage.from_bytes(
                child_path(self.root / "uploads", name).read_bytes(), max_bytes=server.max_bytes
            )
            event = server.receive(wire, sender=cid)
            if not event["accepted"]:
                raise CrossLMError(f"checkpointed upload '{name}' no longer validates: {event['reason']}")
        self.uploads = dict(state["uploads"])
        self.outbox = dict(state["outbox"])
        server.pending = list(state["pending"])
        server.pool = [SyntheticExample(**e) for e in state["pool"]]
        server.pairs = [SyntheticPair(**p) for p in state.get("pairs", [])]
        server.seen = set(state["seen"])
        self.adapter_update = int(state["adapter_update"])
        if self.adapter_update > 0 and server.llm is not None:
            server.load_adapter(self.root / "adapter")
        return state

    def outgoing(self, client_id: str, max_bytes: int) -> WireMessage:
        data = child_path(self.root / "outbox", self.outbox[client_id]).read_bytes()
        return WireMessage.from_bytes(data, max_bytes=max_bytes)
