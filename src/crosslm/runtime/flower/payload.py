"""Flower records for crosslm messages: a WireMessage travels as a JSON header (ConfigRecord) plus the
safetensors bytes as one raw uint8 Array (Flower chunks arrays, so large SLMs move efficiently); a client
report travels as JSON. Unpacking is strict: unexpected records, keys or types are a ProtocolError."""

from __future__ import annotations

import json
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from crosslm.errors import ProtocolError
from crosslm.protocol import WireMessage, validate_report

HEADER, PAYLOAD, REPORT, REQUEST = "header", "payload", "report", "request"


def pack(
    wire: WireMessage | None = None, report: dict[str, Any] | None = None, request: dict | None = None
) -> RecordDict:
    rd = RecordDict()
    if wire is not None:
        rd[HEADER] = ConfigRecord({"json": wire.header})
        data = wire.payload
        rd[PAYLOAD] = ArrayRecord(
            {"safetensors": Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)}
        )
    if report is not None:
        rd[REPORT] = ConfigRecord({"json": json.dumps(report)})
    if request is not None:
        rd[REQUEST] = ConfigRecord({"json": json.dumps(request)})
    return rd


def _only(rd: RecordDict, allowed: set[str]) -> None:
    extra = sorted(set(rd.keys()) - allowed)
    if extra:
        raise ProtocolError(
            f"message holds an undeclared record '{extra[0][:40]}' (declared: {sorted(allowed)})"
        )


def _json(rd: RecordDict, key: str) -> Any:
    rec = rd.get(key)
    if not isinstance(rec, ConfigRecord) or set(rec.keys()) != {"json"} or not isinstance(rec["json"], str):
        raise ProtocolError(f"message record '{key}' must be a ConfigRecord with one string field 'json'")
    try:
        return json.loads(rec["json"])
    except json.JSONDecodeError as e:
        raise ProtocolError(f"message record '{key}' is not valid JSON ({e.msg})") from None


def unpack_wire(rd: RecordDict, max_bytes: int, *, with_report: bool = False) -> WireMessage:
    """The WireMessage in a received RecordDict (size-checked before any bytes are copied)."""
    _only(rd, {HEADER, PAYLOAD, REPORT} if with_report else {HEADER, PAYLOAD})
    rec = rd.get(PAYLOAD)
    if not isinstance(rec, ArrayRecord) or list(rec.keys()) != ["safetensors"]:
        raise ProtocolError(f"message record '{PAYLOAD}' must be an ArrayRecord with one array 'safetensors'")
    arr = rec["safetensors"]
    if arr.dtype != "uint8" or arr.stype != "raw" or len(arr.shape) != 1:
        raise ProtocolError("message payload must be a 1-D raw uint8 array")
    header = _json(rd, HEADER)  # parsed here only to fail early; decode() validates its fields
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object")
    wire = WireMessage(header=str(rd[HEADER]["json"]), payload=b"")
    if len(wire) + arr.shape[0] > max_bytes:
        raise ProtocolError(f"message is {len(wire) + arr.shape[0]} bytes, over the {max_bytes}-byte limit")
    wire.payload = bytes(arr.data)
    if len(wire.payload) != arr.shape[0]:
        raise ProtocolError("message payload length disagrees with its declared shape")
    return wire


def unpack_report(
    rd: RecordDict,
    client_id: str | None = None,
    *,
    with_wire: bool = False,
    expected_event: str | None = None,
) -> dict[str, Any]:
    _only(rd, {HEADER, PAYLOAD, REPORT} if with_wire else {REPORT})
    return validate_report(_json(rd, REPORT), client_id=client_id, expected_event=expected_event)


def unpack_request(rd: RecordDict) -> dict[str, Any]:
    _only(rd, {REQUEST, HEADER, PAYLOAD})
    req = _json(rd, REQUEST) if REQUEST in rd else {}
    if not isinstance(req, dict):
        raise ProtocolError("request is not a JSON object")
    return req
