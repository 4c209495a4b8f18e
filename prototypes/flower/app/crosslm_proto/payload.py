"""Opaque CrossLM payload <-> Flower RecordDict.

A CrossLM message = JSON header (str) + opaque blob (bytes, e.g. safetensors).

* header -> ConfigRecord({"json": <str>})        (ConfigRecord values may be str/bytes/
                                                 int/float/bool or lists thereof)
* blob   -> ArrayRecord({"blob": Array(dtype="uint8", shape=(n,), stype="raw", data=blob)})
  Arrays are split by Flower into 5 MiB ArrayChunks (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
  that are pushed/pulled as separate HTTP objects, so the blob never travels as a
  single giant request body. Use Array(...).data to get the raw bytes back.
"""
from __future__ import annotations

import json
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

HEADER_KEY = "header"
BLOB_KEY = "blob"
BLOB_CFG_KEY = "blob_cfg"


def pack(header: dict[str, Any], blob: bytes | None = None, carrier: str = "array") -> RecordDict:
    """carrier="array" (recommended, chunked) or "config" (blob as one bytes value)."""
    rd = RecordDict()
    rd[HEADER_KEY] = ConfigRecord({"json": json.dumps(header)})
    if blob is not None and carrier == "config":
        # Works too, but the whole blob is ONE object (no 5 MiB chunking/dedup).
        rd[BLOB_CFG_KEY] = ConfigRecord({"data": blob})
    elif blob is not None:
        rd[BLOB_KEY] = ArrayRecord(
            {"blob": Array(dtype="uint8", shape=(len(blob),), stype="raw", data=blob)}
        )
    return rd


def unpack(rd: RecordDict) -> tuple[dict[str, Any], bytes | None]:
    header = json.loads(str(rd[HEADER_KEY]["json"]))
    blob = None
    if BLOB_KEY in rd:
        blob = rd[BLOB_KEY]["blob"].data  # type: ignore[union-attr]
    elif BLOB_CFG_KEY in rd:
        blob = bytes(rd[BLOB_CFG_KEY]["data"])  # type: ignore[arg-type]
    return header, blob
