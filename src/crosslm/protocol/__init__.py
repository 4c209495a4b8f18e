"""Client <-> server wire protocol: JSON headers plus safetensors payloads, validated on receipt."""

from crosslm.protocol.messages import (
    ALLOWED_MODEL_TYPES,
    MAX_PARAMS,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    SLMEnhanced,
    SLMUpload,
    WireMessage,
    build_model,
    check_client_id,
    decode,
    encode,
    is_slm_name,
    model_config_dict,
    wire_state,
)
from crosslm.protocol.reports import validate_report

__all__ = [
    "ALLOWED_MODEL_TYPES",
    "MAX_PARAMS",
    "PROTOCOL_VERSION",
    "WIRE_DTYPES",
    "SLMEnhanced",
    "SLMUpload",
    "WireMessage",
    "build_model",
    "check_client_id",
    "decode",
    "encode",
    "is_slm_name",
    "model_config_dict",
    "wire_state",
    "validate_report",
]
