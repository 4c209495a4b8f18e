"""Property-based fuzzing of what a participant can send: the decoder and the Flower server's receive path.

Every generated input (mutated valid messages, random bytes, hostile strings in every string field) must be
either accepted as valid or refused with the protocol's error; nothing else may escape, and nothing may be
written outside the run directory. CROSSLM_FUZZ_EXAMPLES sets the number of cases per test (CI: the
default; `CROSSLM_FUZZ_EXAMPLES=50000 pytest tests/test_fuzz_protocol.py` for a long run).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crosslm.config import RunConfig
from crosslm.errors import ProtocolError
from crosslm.io import JsonlWriter, read_jsonl
from crosslm.lifecycle import RunLog
from crosslm.protocol import SLMEnhanced, SLMUpload, WireMessage, decode, encode, model_config_dict
from crosslm.runtime.flower.checkpoint import ServerCheckpoint
from crosslm.runtime.flower.payload import pack
from crosslm.runtime.flower.server_app import ENHANCED, EVALUATE, TRAIN, AsyncLoop, Inflight
from crosslm.server.server import CrossLMServer
from crosslm.task import LabelledTexts, TaskSpec
from tests.conftest import make_classifier

EXAMPLES = int(os.environ.get("CROSSLM_FUZZ_EXAMPLES", "1500"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
LABELS = ["neg", "pos"]
MAX_BYTES = 2_000_000
MODEL = make_classifier("bert", 100)
TASK = TaskSpec(
    "toy", ("neg", "pos"), ("negative", "positive"), ("Negative", "Positive"), "W {description}", "{t}"
)

HOSTILE = [
    "../../../escaped", "..", ".", "/etc/passwd", "a" * 300, "x" * 5000, "nul\x00byte", "\u202egnp.exe",
    "C:\\windows", "~root", "$(rm -rf /)", "%s%n", "' OR 1=1 --", "<script>", "\ud7ff", "😀" * 40, "",
    "client-0/../../x", "a\nb", "minilm-l6/../../etc",
]  # fmt: skip
hostile_text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=200))
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), hostile_text,
)  # fmt: skip
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)),
    max_leaves=12,
)


def _valid(kind: str) -> WireMessage:
    common = dict(client_id="client-0", slm="minilm-l6", model_type="bert", model_config=model_config_dict(MODEL),
                  labels=LABELS, state_dict=MODEL.state_dict())  # fmt: skip
    if kind == "slm_upload":
        return encode(SLMUpload(num_examples=10, label_counts=[5, 5], version=1, base_version=0,
                                metrics={"accuracy": 0.5}, **common))  # fmt: skip
    return encode(SLMEnhanced(server_update=1, **common))


VALID = {k: _valid(k) for k in ("slm_upload", "slm_enhanced")}


@st.composite
def headers(draw: Any, base: str) -> str:
    """A valid header with hostile edits: fields replaced, deleted or added, or not JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(hostile_text, st.just("{"), st.just('{"a": NaN}'), st.just("[]")))
    head = json.loads(base)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.one_of(st.sampled_from(sorted(head)), hostile_text))
        action = draw(st.sampled_from(["replace", "replace", "delete", "hostile"]))
        if action == "delete":
            head.pop(key, None)
        elif action == "hostile" and isinstance(head.get(key), str):
            head[key] = draw(hostile_text)
        else:
            head[key] = draw(json_value)
    return json.dumps(head)


@st.composite
def payloads(draw: Any, base: bytes) -> bytes:
    """The valid payload, cut, grown, with flipped bytes, random bytes, or other tensors."""
    how = draw(st.sampled_from(["same", "cut", "grow", "flip", "random", "tensors"]))
    if how == "same":
        return base
    if how == "cut":
        return base[: draw(st.integers(0, len(base)))]
    if how == "grow":
        return base + draw(st.binary(max_size=64))
    if how == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    if how == "random":
        return draw(st.binary(max_size=512))
    state = {k: v.clone() for k, v in MODEL.state_dict().items()}
    name = draw(st.sampled_from(sorted(state)))
    state[name] = draw(
        st.sampled_from(
            [
                torch.zeros(3, 7),
                torch.full_like(state[name], float("nan")),
                state[name].to(torch.int64),
                torch.zeros(0),
            ]
        )
    )
    if draw(st.booleans()):
        state[draw(hostile_text) or "extra"] = torch.zeros(2)
    return safetensors.torch.save(state)


@st.composite
def wires(draw: Any) -> WireMessage:
    kind = draw(st.sampled_from(sorted(VALID)))
    base = VALID[kind]
    edit_header, edit_payload = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    header = draw(headers(base.header)) if edit_header else base.header
    payload = draw(payloads(base.payload)) if edit_payload else base.payload
    return WireMessage(header=header, payload=payload)


@FUZZ
@given(wire=wires(), framed=st.booleans())
def test_the_decoder_accepts_or_refuses_and_nothing_else_escapes(wire: WireMessage, framed: bool) -> None:
    try:
        if framed:
            wire = WireMessage.from_bytes(wire.to_bytes(), max_bytes=MAX_BYTES)
        msg = decode(wire, expected_labels=LABELS, max_bytes=MAX_BYTES)
    except ProtocolError:
        return
    assert isinstance(msg, SLMUpload | SLMEnhanced)  # accepted: then it is a valid, complete message
    assert all(torch.isfinite(t).all() for t in msg.state_dict.values() if t.is_floating_point())


@FUZZ
@given(data=st.binary(max_size=256))
def test_random_frames_are_refused_with_the_protocol_error(data: bytes) -> None:
    try:
        decode(WireMessage.from_bytes(data, max_bytes=MAX_BYTES), expected_labels=LABELS, max_bytes=MAX_BYTES)
    except ProtocolError:
        return
    raise AssertionError("random bytes decoded as a message")


# ------------------------------------------------------------------------------- the server's receive path
class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _reply(content: RecordDict) -> SimpleNamespace:
    meta = SimpleNamespace(reply_to_message_id="m", created_at=0.0)
    return SimpleNamespace(metadata=meta, content=content, error=None, has_error=lambda: False)


@st.composite
def replies(draw: Any) -> RecordDict:
    """What a node can put in a reply: the records crosslm declares, edited, plus records of its own."""
    wire = draw(wires())
    report = draw(
        st.one_of(
            json_value,
            st.fixed_dictionaries(
                {"event": st.sampled_from(["client_trained", "client_eval", "enhanced", "x"]),
                 "client": st.one_of(st.just("client-0"), hostile_text)},
                optional={"round": json_value, "base_version": json_value, "train_loss": json_value,
                          "local": json_value, "update": json_value},
            ),
        )
    )  # fmt: skip
    if isinstance(report, dict) and draw(st.booleans()):
        report[draw(hostile_text)] = draw(json_value)
    rd = pack(wire=wire) if draw(st.booleans()) else RecordDict()
    if draw(st.booleans()):
        rd["report"] = ConfigRecord({"json": json.dumps(report)})
    extra = draw(st.sampled_from(["none", "none", "config", "array", "bad-payload"]))
    if extra == "config":
        rd[draw(hostile_text) or "x"] = ConfigRecord({"json": draw(hostile_text)})
    elif extra == "array":
        rd["payload"] = ArrayRecord(
            {"safetensors": Array(dtype="float32", shape=(2,), stype="raw", data=b"\0" * 8)}
        )
    elif extra == "bad-payload":
        rd["payload"] = ArrayRecord(
            {"safetensors": Array(dtype="uint8", shape=(10**9,), stype="raw", data=b"x")}
        )
    return rd


def test_the_server_receive_path_never_stops_and_never_writes_outside_the_run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outer = Path(tmp)
        run = outer / "run"
        cfg = RunConfig()
        log = RunLog(run / "metrics.jsonl")
        server = CrossLMServer(cfg, TASK, None, None, LabelledTexts(), log=log, log_synthetic=lambda e: None)
        server.max_bytes = MAX_BYTES
        loop = AsyncLoop(_Grid(), server, cfg, log, ServerCheckpoint(run / "checkpoint"),
                         JsonlWriter(run / "synthetic.jsonl"))  # fmt: skip

        @FUZZ
        @given(content=replies(), node=st.integers(1, 3), kind=st.sampled_from([TRAIN, ENHANCED, EVALUATE]))
        def receive(content: RecordDict, node: int, kind: str) -> None:
            loop.inflight["m"] = Inflight(node, kind, 0.0, loop.node_client.get(node))
            before = log.writer.lines
            loop.handle(_reply(content))  # must not raise, whatever the content
            assert log.writer.lines > before  # every message is answered by an event: accepted or refused

        receive()
        log.writer.close()
        outside = [p for p in outer.rglob("*") if run not in p.parents and p != run]
        assert outside == []
        kinds = {e["event"] for e in read_jsonl(run / "metrics.jsonl")}
        assert kinds <= {"upload", "report_rejected", "message_refused", "client_trained", "client_eval",
                         "enhanced"}  # fmt: skip
