"""Wire messages between clients and server: a JSON header plus a safetensors payload.

The same bytes travel in-process today and over Flower's Message API later, so everything that crosses
the trust boundary is JSON or safetensors (never pickle / torch.load), and `decode` treats every
received byte as hostile: anything unexpected becomes a `ProtocolError` with a one-sentence reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from crosslm.errors import ConfigError, ProtocolError

PROTOCOL_VERSION = 1
# Architectures the server is willing to host. A classification task's SLMs are built as sequence
# classifiers from their config, a generation task's as causal LMs (decoder architectures only).
ALLOWED_MODEL_TYPES = frozenset(
    {
        "bert",
        "distilbert",
        "roberta",
        "xlm-roberta",
        "electra",
        "albert",
        "deberta-v2",
        "llama",
        "qwen2",
        "gpt2",
    }
)
CAUSAL_MODEL_TYPES = frozenset({"llama", "qwen2", "gpt2"})
TASK_KINDS = ("classification", "generation")
# Size guards so a hostile config cannot make the receiver build a huge model (even on the meta device).
MAX_LAYERS = 256
MAX_HIDDEN_X_LAYERS = 2**20
MAX_PARAMS = 2_000_000_000

WIRE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_INT_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})
_FRAME_PREFIX = struct.Struct(">Q")  # 8-byte big-endian header length

# Identity fields are names, never paths: the server builds file names from a client id and loads a
# tokenizer by an SLM name, so both are held to a strict pattern before anything else looks at them.
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# An SLM name: a catalogue name or a Hugging Face id ("org/name"); a local path is accepted only when the
# server's own config names it (see `CrossLMServer.receive`).
SLM_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
# Metric keys an upload may declare (aggregates of the client's own test split, nothing else), per task kind.
UPLOAD_METRIC_KEYS = {
    "classification": frozenset({"accuracy", "macro_f1"}),
    "generation": frozenset({"rouge_l", "target_perplexity", "distinct_2"}),
}

# Config keys that describe provenance, not architecture: dropped when sending and ignored when received
# ("dtype" in particular would otherwise make `from_config` build a half-precision model).
_METADATA_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_commit_hash"}
)
# Config keys that could make the receiver run remote code, download kernels or quantize: refused outright.
_FORBIDDEN_CONFIG_KEYS = frozenset(
    {"auto_map", "quantization_config", "attn_implementation", "trust_remote_code", "custom_pipelines"}
)


# --------------------------------------------------------------------------------------------- messages
@dataclass
class SLMUpload:
    """Client -> server after local training: the SLM's weights plus what the server needs to host it."""

    client_id: str
    slm: str  # tokenizer/model identity: catalogue name, HF id or path (no files are sent)
    model_type: str
    model_config: dict
    labels: list[str]
    num_examples: int
    label_counts: list[int]  # the client's label histogram, for prior correction of its feedback
    version: int  # client's local round counter
    base_version: int  # the server update its starting weights came from (0 = pretrained)
    metrics: dict[str, float]  # on the client's own test split
    state_dict: dict[str, torch.Tensor]


@dataclass
class SLMEnhanced:
    """Server -> client after distillation: the client's SLM with the server's knowledge folded in."""

    client_id: str
    slm: str
    model_type: str
    model_config: dict
    labels: list[str]
    server_update: int  # the server update that produced these weights
    state_dict: dict[str, torch.Tensor]


_MESSAGE_TYPES: dict[str, type[SLMUpload] | type[SLMEnhanced]] = {
    "slm_upload": SLMUpload,
    "slm_enhanced": SLMEnhanced,
}


@dataclass
class WireMessage:
    """One message as it crosses the boundary; `to_bytes`/`from_bytes` frame it for byte-only transports."""

    header: str  # JSON
    payload: bytes  # safetensors

    def to_bytes(self) -> bytes:
        head = self.header.encode("utf-8")
        return _FRAME_PREFIX.pack(len(head)) + head + self.payload

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int) -> WireMessage:
        if len(data) > max_bytes:
            raise ProtocolError(f"frame is {len(data)} bytes, over the {max_bytes}-byte limit")
        if len(data) < _FRAME_PREFIX.size:
            raise ProtocolError(
                f"frame is truncated: {len(data)} bytes, shorter than its 8-byte length prefix"
            )
        (head_len,) = _FRAME_PREFIX.unpack_from(data)
        end = _FRAME_PREFIX.size + head_len
        if end > len(data):
            raise ProtocolError(
                f"frame is truncated: header claims {head_len} bytes, only {len(data) - 8} follow"
            )
        try:
            header = bytes(data[_FRAME_PREFIX.size : end]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"frame header is not valid UTF-8 ({e.reason})") from None
        return cls(header=header, payload=bytes(data[end:]))

    def __len__(self) -> int:
        return _FRAME_PREFIX.size + len(self.header.encode("utf-8")) + len(self.payload)

    def __repr__(self) -> str:  # a payload is megabytes: never print it whole
        return f"WireMessage(header={self.header[:300]!r}..., payload=<{len(self.payload)} bytes>)"


# ------------------------------------------------------------------------------- model config <-> model
def model_config_dict(model: PreTrainedModel) -> dict:
    """The JSON-safe architecture config of `model` for a header (provenance and unsafe keys dropped)."""
    out: dict[str, Any] = {}
    for key, value in model.config.to_dict().items():
        if key == "model_type" or key in _METADATA_CONFIG_KEYS or key in _FORBIDDEN_CONFIG_KEYS:
            continue
        if key.startswith("_"):
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue  # not JSON: cannot cross the wire, and not needed to rebuild the architecture
        out[key] = value
    # Round-trip so the sender holds exactly what the receiver will see (e.g. id2label keys become str).
    return json.loads(json.dumps(out))


def _build_config(
    model_type: str, model_config: dict, num_labels: int, kind: str = "classification"
) -> PretrainedConfig:
    """Validate a received (model_type, config) pair and build its config; the single entry for both
    `build_model` and `decode`, so the server hosts exactly the architecture it validated. A classifier's
    head must have one output per label; a causal LM's labels are a generation task's conditions, which
    its architecture does not see."""
    allowed = ALLOWED_MODEL_TYPES if kind == "classification" else CAUSAL_MODEL_TYPES
    if model_type not in allowed:
        raise ProtocolError(
            f"model_type {model_type!r} is not allowed for a {kind} task (allowed: {sorted(allowed)})"
        )
    cfg = {k: v for k, v in model_config.items() if k not in _METADATA_CONFIG_KEYS}
    if cfg.pop("model_type", model_type) != model_type:
        raise ProtocolError(f"model_config.model_type disagrees with the header's model_type {model_type!r}")
    bad = sorted(k for k in cfg if k in _FORBIDDEN_CONFIG_KEYS or k.startswith("_"))
    if bad:
        raise ProtocolError(f"model_config contains forbidden key {bad[0]!r}")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except Exception as e:  # transformers raises many types (ValueError, TypeError, strict-dataclass errors)
        raise ProtocolError(f"model_config does not build a {model_type} config: {_one_line(e)}") from None
    if kind == "classification" and config.num_labels != num_labels:
        raise ProtocolError(
            f"model_config has num_labels={config.num_labels}, but there are {num_labels} labels"
        )
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(hidden, int) or layers < 1 or hidden < 1:
        raise ProtocolError("model_config lacks a positive integer num_hidden_layers / hidden_size")
    if layers > MAX_LAYERS or hidden * layers > MAX_HIDDEN_X_LAYERS:
        raise ProtocolError(
            f"model_config is too large: {layers} layers x hidden_size {hidden} "
            f"(limits: {MAX_LAYERS} layers, {MAX_HIDDEN_X_LAYERS} for their product)"
        )
    return config


def _instantiate(config: PretrainedConfig, *, meta: bool, kind: str = "classification") -> PreTrainedModel:
    """Build the classifier (or causal LM); on the meta device nothing is allocated, which makes size
    checks free."""
    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = auto.from_config(config, dtype=torch.float32)
    except Exception as e:
        raise ProtocolError(f"model_config does not build a model: {_one_line(e)}") from None
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > MAX_PARAMS:
        raise ProtocolError(f"model_config describes {n_params:,} parameters, over the {MAX_PARAMS:,} limit")
    return model


def build_model(
    model_type: str, model_config: dict, num_labels: int, kind: str = "classification"
) -> PreTrainedModel:
    """A randomly initialised fp32 classifier (causal LM for a generation task) for a client's
    architecture, so the server can host its SLM."""
    config = _build_config(model_type, model_config, num_labels, kind)
    _instantiate(config, meta=True, kind=kind)  # refuse oversized models before allocating anything
    return _instantiate(config, meta=False, kind=kind)


# ----------------------------------------------------------------------------------------------- encode
def wire_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """`state` (default: the model's own) with each tied parameter of `model` under its first name only.
    The receiver's skeleton, built from the same config, ties the others back (`_check_tensors`), so a tied
    LM head is not sent a second time (SmolLM2's embedding: 57 MB at float16)."""
    state = model.state_dict() if state is None else state
    first: dict[int, str] = {}
    twins = {n for n, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n}
    return {name: t for name, t in state.items() if name not in twins}


def encode(msg: SLMUpload | SLMEnhanced, dtype: str = "float16") -> WireMessage:
    """Serialise a message; floating tensors are cast to `dtype` to halve (or not) the bytes on the wire."""
    if dtype not in WIRE_DTYPES:
        raise ConfigError(f"wire dtype {dtype!r} is not supported; use one of {sorted(WIRE_DTYPES)}")
    msg_type = "slm_upload" if isinstance(msg, SLMUpload) else "slm_enhanced"
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != "state_dict"}
    try:
        header = json.dumps(
            {"type": msg_type, "protocol_version": PROTOCOL_VERSION, **fields}, allow_nan=False
        )
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"cannot encode {msg_type} header as JSON: {e}") from None
    return WireMessage(header=header, payload=safetensors.torch.save(_wire_tensors(msg.state_dict, dtype)))


def _wire_tensors(state_dict: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Cast, make contiguous and un-share tensors (safetensors refuses shared storage, e.g. tied weights);
    non-finite values are refused here so a sender learns of them before the receiver drops the message."""
    target = WIRE_DTYPES[dtype]
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(target)
            if not bool(torch.isfinite(t).all()):
                raise ProtocolError(
                    f"tensor {name!r} has NaN/Inf (or overflows {dtype}); refusing to send it"
                )
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# ----------------------------------------------------------------------------------------------- decode
def decode(
    wire: WireMessage,
    *,
    expected_labels: list[str],
    max_bytes: int,
    expected_type: str | None = None,
    kind: str = "classification",
) -> SLMUpload | SLMEnhanced:
    """Validate every part of a received message and return it with fp32 tensors, or raise ProtocolError.
    `kind` is the receiver's task kind: it decides which model the weights must fit (a classifier or a
    causal LM) and which metrics an upload may declare; the sender cannot choose it."""
    if kind not in TASK_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {TASK_KINDS}")
    if not isinstance(wire.header, str) or not isinstance(wire.payload, bytes | bytearray):
        raise ProtocolError("wire message must hold a str header and a bytes payload")
    if len(wire) > max_bytes:
        raise ProtocolError(f"message is {len(wire)} bytes, over the {max_bytes}-byte limit")
    head = _parse_header(wire.header)
    msg_type = head.pop("type", None)
    if not isinstance(msg_type, str) or msg_type not in _MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {msg_type!r} (expected one of {sorted(_MESSAGE_TYPES)})")
    if expected_type is not None and msg_type != expected_type:
        raise ProtocolError(f"got a {msg_type!r} message where {expected_type!r} was expected")
    version = head.pop("protocol_version", None)
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol_version is {version!r}, this receiver speaks {PROTOCOL_VERSION}")
    cls = _MESSAGE_TYPES[msg_type]
    fields = _check_fields(cls, head)
    _check_semantics(fields, expected_labels, kind)

    config = _build_config(fields["model_type"], fields["model_config"], len(fields["labels"]), kind)
    skeleton = _instantiate(config, meta=True, kind=kind)
    try:
        received = safetensors.torch.load(bytes(wire.payload))
    except Exception as e:  # SafetensorError and friends: pickle or garbage bytes land here, never unpickled
        raise ProtocolError(f"payload is not a valid safetensors buffer: {_one_line(e)}") from None
    fields["state_dict"] = _check_tensors(received, skeleton)
    return cls(**fields)


def _parse_header(header: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise ValueError("duplicate key in a JSON object")
        return obj

    def no_constants(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    try:
        head = json.loads(header, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"header is not valid JSON: {_one_line(e)}") from None
    if not isinstance(head, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(head).__name__}")
    return head


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# One checker per annotation used in the message dataclasses: the dataclasses are the wire schema.
_TYPE_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "dict": lambda v: isinstance(v, dict),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[int]": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "dict[str, float]": lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
}
_TYPE_NAMES = {"dict": "a JSON object", "dict[str, float]": "an object of finite numbers"}


def _check_fields(cls: type[SLMUpload] | type[SLMEnhanced], head: dict[str, Any]) -> dict[str, Any]:
    """Exactly the dataclass's fields (minus the tensors), each of its declared type."""
    declared = {f.name: str(f.type) for f in dataclasses.fields(cls) if f.name != "state_dict"}
    missing = [name for name in declared if name not in head]
    if missing:
        raise ProtocolError(f"header lacks field {missing[0]!r}")
    extra = sorted(set(head) - set(declared))
    if extra:
        raise ProtocolError(f"header has unexpected field {extra[0]!r}")
    for name, type_name in declared.items():
        if not _TYPE_CHECKS[type_name](head[name]):
            want = _TYPE_NAMES.get(type_name, type_name)
            raise ProtocolError(f"header field {name!r} must be {want}, got {head[name]!r:.80}")
    if "metrics" in head:
        head["metrics"] = {k: float(v) for k, v in head["metrics"].items()}
    return head


def check_client_id(value: Any, where: str = "client_id") -> str:
    """A client id is a name: letters, digits, '.', '_' and '-', at most 64 characters, never '.'/'..'."""
    if not isinstance(value, str) or not CLIENT_ID_PATTERN.fullmatch(value) or value in (".", ".."):
        raise ProtocolError(
            f"{where} {str(value)[:80]!r} is not a client name (1-64 letters, digits, '.', '_' or '-'; "
            "not '.' or '..')"
        )
    return value


def is_slm_name(value: str) -> bool:
    """A catalogue name or a Hugging Face id: no path separators beyond one 'org/', no '..'."""
    return bool(SLM_NAME_PATTERN.fullmatch(value)) and ".." not in value


def _check_semantics(fields: dict[str, Any], expected_labels: list[str], kind: str) -> None:
    """Cross-field rules the types alone cannot express."""
    for name in ("client_id", "slm", "model_type"):
        if not fields[name]:
            raise ProtocolError(f"header field {name!r} is empty")
    check_client_id(fields["client_id"])
    if len(fields["slm"]) > 1024:
        raise ProtocolError(f"header field 'slm' is {len(fields['slm'])} characters, over the 1024 limit")
    if "metrics" in fields:
        declared = UPLOAD_METRIC_KEYS[kind]
        bad = sorted(set(fields["metrics"]) - declared)
        if bad:
            raise ProtocolError(
                f"header field 'metrics' has undeclared key {bad[0][:40]!r} (declared for a {kind} task: "
                f"{sorted(declared)})"
            )
    if fields["labels"] != list(expected_labels):
        raise ProtocolError(
            f"labels {fields['labels']} differ from the expected labels {list(expected_labels)}"
        )
    for name in ("version", "base_version", "server_update"):
        if name in fields and fields[name] < 0:
            raise ProtocolError(f"header field {name!r} is negative ({fields[name]})")
    if "label_counts" in fields:
        counts = fields["label_counts"]
        if len(counts) != len(fields["labels"]) or any(c < 0 for c in counts):
            raise ProtocolError(
                f"label_counts {counts} must be {len(fields['labels'])} non-negative counts, one per label"
            )
        if fields["num_examples"] < 1 or fields["num_examples"] != sum(counts):
            raise ProtocolError(
                f"num_examples is {fields['num_examples']}, must be positive and equal sum(label_counts)={sum(counts)}"
            )


def _check_tensors(received: dict[str, torch.Tensor], skeleton: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Names, shapes, dtypes and values must be exactly those of the model the config builds."""
    expected = skeleton.state_dict()  # persistent entries only: non-persistent buffers are never required
    # Tied weights appear under several names; a sender may ship just one of them.
    alias_of: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        alias_of[name] = first_name.setdefault(id(param), name)
    twins: dict[str, list[str]] = {}
    for name, canonical in alias_of.items():
        twins.setdefault(canonical, []).append(name)

    extra = sorted(set(received) - set(expected))
    if extra:
        raise ProtocolError(f"payload has unexpected tensor {extra[0]!r} ({len(extra)} extra)")
    out: dict[str, torch.Tensor] = {}
    for name, want in expected.items():
        if name not in received:
            present = [n for n in twins.get(alias_of.get(name, name), []) if n in received]
            if present:
                continue  # filled in from its tied twin below
            raise ProtocolError(f"payload lacks tensor {name!r}")
        t = received[name]
        if t.shape != want.shape:
            raise ProtocolError(
                f"tensor {name!r} has shape {list(t.shape)}, the config needs {list(want.shape)}"
            )
        if want.is_floating_point():
            if t.dtype not in _FLOAT_DTYPES:
                raise ProtocolError(f"tensor {name!r} has dtype {t.dtype}, expected a floating dtype")
            t = t.to(torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise ProtocolError(f"tensor {name!r} contains NaN or Inf")
        elif t.dtype not in _INT_DTYPES or want.dtype not in _INT_DTYPES:
            raise ProtocolError(f"tensor {name!r} has dtype {t.dtype}, expected {want.dtype}")
        out[name] = t
    for name in expected:
        if name not in out:
            out[name] = next(out[n] for n in twins[alias_of[name]] if n in out)
    return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
