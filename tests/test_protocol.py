"""Wire protocol: round trips per architecture, and every kind of hostile or broken message is refused."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    LlamaConfig,
    PretrainedConfig,
    RobertaConfig,
)

import crosslm.protocol as protocol
from crosslm.errors import ProtocolError
from crosslm.protocol import (
    SLMEnhanced,
    SLMUpload,
    WireMessage,
    build_model,
    decode,
    encode,
    model_config_dict,
)
from crosslm.protocol.messages import _check_tensors

LABELS = ["neg", "pos"]
MAX = 10_000_000

TINY_CONFIGS: dict[str, PretrainedConfig] = {
    "bert": BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    ),
    "distilbert": DistilBertConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=32),
    "roberta": RobertaConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    ),
    "llama": LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        pad_token_id=0,
    ),
}


def tiny_model(arch: str = "bert") -> torch.nn.Module:
    config = copy.deepcopy(TINY_CONFIGS[arch])
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {label: i for i, label in enumerate(LABELS)}
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return tiny_model("bert")


def upload(model: torch.nn.Module, **overrides) -> SLMUpload:
    fields = dict(
        client_id="client-0",
        slm="tiny-" + model.config.model_type,
        model_type=model.config.model_type,
        model_config=model_config_dict(model),
        labels=list(LABELS),
        num_examples=10,
        label_counts=[4, 6],
        version=3,
        base_version=2,
        metrics={"accuracy": 0.75, "macro_f1": 0.7},
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
    )
    fields.update(overrides)
    return SLMUpload(**fields)


def roundtrip(wire: WireMessage, **kwargs) -> SLMUpload | SLMEnhanced:
    wire = WireMessage.from_bytes(wire.to_bytes(), max_bytes=MAX)
    return decode(
        wire, expected_labels=kwargs.pop("labels", LABELS), max_bytes=kwargs.pop("max_bytes", MAX), **kwargs
    )


def edit_header(wire: WireMessage, edit) -> WireMessage:
    head = json.loads(wire.header)
    edit(head)
    return WireMessage(header=json.dumps(head), payload=wire.payload)


def with_tensors(wire: WireMessage, tensors: dict[str, torch.Tensor]) -> WireMessage:
    return WireMessage(header=wire.header, payload=safetensors.torch.save(tensors))


def rejects(wire: WireMessage, pattern: str, **kwargs) -> None:
    with pytest.raises(ProtocolError, match=pattern):
        roundtrip(wire, **kwargs)


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_upload_round_trip(arch: str, dtype: str) -> None:
    model = tiny_model(arch)
    msg = upload(model)
    got = roundtrip(encode(msg, dtype=dtype), expected_type="slm_upload")
    assert isinstance(got, SLMUpload)
    for field in dataclasses.fields(SLMUpload):
        if field.name != "state_dict":
            assert getattr(got, field.name) == getattr(msg, field.name), field.name
    assert list(got.state_dict) == list(msg.state_dict)
    for name, want in msg.state_dict.items():
        have = got.state_dict[name]
        assert have.dtype == torch.float32
        if dtype == "float32":
            assert torch.equal(have, want), name
        else:
            torch.testing.assert_close(have, want, rtol=1e-3, atol=1e-3)
    # The received weights load strictly into the model the server builds for this client.
    hosted = build_model(got.model_type, got.model_config, len(got.labels))
    hosted.load_state_dict(got.state_dict, strict=True)


def test_enhanced_round_trip_and_wire_size(bert: torch.nn.Module) -> None:
    msg = SLMEnhanced(
        client_id="c1",
        slm="tiny-bert",
        model_type="bert",
        model_config=model_config_dict(bert),
        labels=list(LABELS),
        server_update=5,
        state_dict=bert.state_dict(),
    )
    wire = encode(msg, dtype="bfloat16")
    assert len(wire) == len(wire.to_bytes())
    got = roundtrip(wire, expected_type="slm_enhanced")
    assert isinstance(got, SLMEnhanced) and got.server_update == 5 and got.client_id == "c1"
    with pytest.raises(ProtocolError, match="slm_upload"):
        roundtrip(wire, expected_type="slm_upload")


def test_fp16_halves_payload(bert: torch.nn.Module) -> None:
    msg = upload(bert)
    assert len(encode(msg, "float16").payload) < 0.6 * len(encode(msg, "float32").payload)


def test_model_config_dict_is_json_and_drops_provenance(bert: torch.nn.Module) -> None:
    cfg = model_config_dict(bert)
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["id2label"] == {"0": "neg", "1": "pos"}
    for key in ("_name_or_path", "transformers_version", "architectures", "model_type", "dtype"):
        assert key not in cfg


def test_shared_tensors_are_encoded(bert: torch.nn.Module) -> None:
    msg = upload(bert)
    name_a, name_b = (
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.attention.self.query.weight",
    )
    msg.state_dict[name_b] = msg.state_dict[name_a]  # same storage: safetensors alone would refuse it
    got = roundtrip(encode(msg, dtype="float32"))
    assert torch.equal(got.state_dict[name_a], got.state_dict[name_b])


def test_tied_twin_may_be_omitted() -> None:
    skeleton = tiny_model("bert")
    layers = skeleton.bert.encoder.layer
    layers[1].attention.self.query.weight = layers[0].attention.self.query.weight
    sd = {k: v.clone() for k, v in skeleton.state_dict().items()}
    del sd["bert.encoder.layer.1.attention.self.query.weight"]
    out = _check_tensors(sd, skeleton)
    assert torch.equal(
        out["bert.encoder.layer.1.attention.self.query.weight"],
        out["bert.encoder.layer.0.attention.self.query.weight"],
    )


# ------------------------------------------------------------------------------------------ payload rejects
def test_rejects_wrong_shape(bert: torch.nn.Module) -> None:
    sd = dict(bert.state_dict())
    sd["classifier.weight"] = torch.zeros(3, 16)
    rejects(with_tensors(encode(upload(bert)), sd), r"classifier\.weight.*shape")


def test_rejects_missing_tensor(bert: torch.nn.Module) -> None:
    sd = dict(bert.state_dict())
    del sd["bert.pooler.dense.bias"]
    rejects(with_tensors(encode(upload(bert)), sd), r"lacks tensor 'bert\.pooler\.dense\.bias'")


def test_rejects_extra_tensor(bert: torch.nn.Module) -> None:
    sd = dict(bert.state_dict(), backdoor=torch.zeros(2))
    rejects(with_tensors(encode(upload(bert)), sd), "unexpected tensor 'backdoor'")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rejects_non_finite(bert: torch.nn.Module, bad: float) -> None:
    sd = {k: v.clone() for k, v in bert.state_dict().items()}
    sd["classifier.bias"][0] = bad
    rejects(with_tensors(encode(upload(bert)), sd), r"classifier\.bias.*NaN or Inf")
    with pytest.raises(ProtocolError, match="NaN/Inf"):  # the sender is told first
        encode(upload(bert, state_dict=sd))


def test_fp16_overflow_is_refused_at_encode(bert: torch.nn.Module) -> None:
    sd = {k: v.clone() for k, v in bert.state_dict().items()}
    sd["classifier.bias"][0] = 1e6
    with pytest.raises(ProtocolError, match="overflows float16"):
        encode(upload(bert, state_dict=sd), dtype="float16")


def test_rejects_integer_weight(bert: torch.nn.Module) -> None:
    sd = dict(bert.state_dict())
    sd["classifier.bias"] = torch.zeros(2, dtype=torch.int64)
    rejects(with_tensors(encode(upload(bert)), sd), r"classifier\.bias.*dtype")


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00" * 64, b"garbage bytes that are not safetensors", pickle.dumps({"w": [1.0, 2.0]})],
    ids=["empty", "zeros", "garbage", "pickle"],
)
def test_rejects_unparsable_payload(bert: torch.nn.Module, payload: bytes) -> None:
    rejects(WireMessage(header=encode(upload(bert)).header, payload=payload), "not a valid safetensors")


class _Boom:
    """Unpickling this would run code; it must never happen."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_pickle_payload_is_never_unpickled(bert: torch.nn.Module) -> None:
    rejects(
        WireMessage(header=encode(upload(bert)).header, payload=pickle.dumps(_Boom())),
        "not a valid safetensors",
    )


# ------------------------------------------------------------------------------------------- header rejects
def test_rejects_wrong_labels(bert: torch.nn.Module) -> None:
    rejects(encode(upload(bert)), r"\['neg', 'pos'\].*\['bad', 'good'\]", labels=["bad", "good"])


def test_rejects_unknown_model_type(bert: torch.nn.Module) -> None:
    rejects(edit_header(encode(upload(bert)), lambda h: h.update(model_type="evil")), "model_type 'evil'")


def test_rejects_extra_header_field(bert: torch.nn.Module) -> None:
    rejects(edit_header(encode(upload(bert)), lambda h: h.update(note="hi")), "unexpected field 'note'")


def test_rejects_missing_header_field(bert: torch.nn.Module) -> None:
    rejects(edit_header(encode(upload(bert)), lambda h: h.pop("base_version")), "lacks field 'base_version'")


@pytest.mark.parametrize(
    "field, value",
    [("version", True), ("num_examples", 10.0), ("labels", "neg,pos"), ("label_counts", [4, "6"]),
     ("metrics", {"accuracy": "high"}), ("client_id", 7), ("model_config", [])],
)  # fmt: skip
def test_rejects_wrong_field_type(bert: torch.nn.Module, field: str, value) -> None:
    rejects(edit_header(encode(upload(bert)), lambda h: h.update({field: value})), f"field '{field}' must be")


@pytest.mark.parametrize(
    "header, pattern",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type": "slm_upload", "type": "slm_upload"}', "duplicate key"),
        ('{"metrics": NaN}', "non-standard JSON constant"),
    ],
)
def test_rejects_bad_json(header: str, pattern: str) -> None:
    rejects(WireMessage(header=header, payload=b""), pattern)


def test_rejects_unknown_type_and_version(bert: torch.nn.Module) -> None:
    wire = encode(upload(bert))
    rejects(edit_header(wire, lambda h: h.update(type="shell")), "unknown message type 'shell'")
    rejects(edit_header(wire, lambda h: h.update(protocol_version=99)), "protocol_version is 99")


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(label_counts=[10]), "label_counts"),
        (dict(label_counts=[-1, 11]), "label_counts"),
        (dict(num_examples=11), "num_examples is 11"),
        (dict(num_examples=0, label_counts=[0, 0]), "num_examples is 0"),
        (dict(metrics={"accuracy": float("inf")}), "cannot encode"),
    ],
)
def test_rejects_inconsistent_counts(bert: torch.nn.Module, overrides: dict, pattern: str) -> None:
    with pytest.raises(ProtocolError, match=pattern):
        roundtrip(encode(upload(bert, **overrides)))


# ------------------------------------------------------------------------------------------- config rejects
@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda c: c.update(num_hidden_layers=100_000), "too large"),
        (lambda c: c.update(hidden_size=8192, num_hidden_layers=200, intermediate_size=16), "too large"),
        (lambda c: c.update(vocab_size=10**10), "over the 2,000,000,000 limit"),
        (lambda c: c.update(hidden_size=15), "does not build"),
        (lambda c: c.update(hidden_size="16"), "does not build"),
        (lambda c: c.update(id2label={"0": "a", "1": "b", "2": "c"}), "num_labels=3"),
        (lambda c: c.update(auto_map={"AutoModel": "evil.Model"}), "forbidden key 'auto_map'"),
        (lambda c: c.update(_attn_implementation="kernels-community/evil"), "forbidden key"),
        (lambda c: c.update(model_type="llama"), "disagrees"),
    ],
)
def test_rejects_bad_model_config(bert: torch.nn.Module, edit, pattern: str) -> None:
    rejects(edit_header(encode(upload(bert)), lambda h: edit(h["model_config"])), pattern)


# -------------------------------------------------------------------------------------------- frame rejects
def test_rejects_oversized(bert: torch.nn.Module) -> None:
    wire = encode(upload(bert))
    with pytest.raises(ProtocolError, match="over the 1000-byte limit"):
        decode(wire, expected_labels=LABELS, max_bytes=1000)
    with pytest.raises(ProtocolError, match="over the 1000-byte limit"):
        WireMessage.from_bytes(wire.to_bytes(), max_bytes=1000)


@pytest.mark.parametrize("cut", [0, 5, 8, 50])
def test_rejects_truncated_frame(bert: torch.nn.Module, cut: int) -> None:
    data = encode(upload(bert)).to_bytes()[:cut]
    with pytest.raises(ProtocolError, match="truncated"):
        WireMessage.from_bytes(data, max_bytes=MAX)


def test_truncated_payload_is_rejected(bert: torch.nn.Module) -> None:
    data = encode(upload(bert)).to_bytes()
    wire = WireMessage.from_bytes(data[:-100], max_bytes=MAX)  # the frame cannot tell; safetensors can
    with pytest.raises(ProtocolError, match="not a valid safetensors"):
        decode(wire, expected_labels=LABELS, max_bytes=MAX)


def test_rejects_non_utf8_header() -> None:
    with pytest.raises(ProtocolError, match="UTF-8"):
        WireMessage.from_bytes(b"\x00" * 7 + b"\x02" + b"\xff\xfe", max_bytes=MAX)


# ---------------------------------------------------------------------------------------------- hygiene
_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def unsafe_uses(source: str) -> list[str]:
    """Code, not comments or docstrings: pickle-family imports/names and any torch.load."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in _UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in _UNSAFE_MODULES or (
                module == "torch" and any(a.name == "load" for a in node.names)
            ):
                found.append(module)
        elif isinstance(node, ast.Attribute) and node.attr == "load":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                found.append("torch.load")
        elif isinstance(node, ast.Name) and node.id in _UNSAFE_MODULES:
            found.append(node.id)
    return found


def test_protocol_source_never_unpickles() -> None:
    bad = "import pickle\nfrom torch import load\ntorch.load(f)\nimport dill.x"
    assert sorted(unsafe_uses(bad)) == ["dill.x", "pickle", "torch", "torch.load"]
    assert unsafe_uses('"""no pickle, no torch.load"""  # pickle') == []
    sources = list(Path(protocol.__file__).parent.rglob("*.py"))
    assert len(sources) >= 2
    for path in sources:
        assert unsafe_uses(path.read_text()) == [], path


# ------------------------------------------------------------------------------------ identity and metrics
@pytest.mark.parametrize(
    "client_id",
    ["../../../escaped", "a" * 300, ".", "..", "a/b", "a\\b", "nul\x00byte", " spaced", "ünïcode", "x" * 65],
)
def test_a_client_id_is_a_name_never_a_path(bert: torch.nn.Module, client_id: str) -> None:
    rejects(encode(upload(bert, client_id=client_id)), "is not a client name")


def test_valid_client_names_pass(bert: torch.nn.Module) -> None:
    for client_id in ["client-0", "hospital_a.berlin", "x" * 64]:
        assert roundtrip(encode(upload(bert, client_id=client_id))).client_id == client_id


def test_upload_metrics_are_the_declared_keys_only(bert: torch.nn.Module) -> None:
    rejects(encode(upload(bert, metrics={"accuracy": 0.5, "secret sentence": 1.0})), "undeclared key")


def test_slm_names_are_catalogue_names_or_hub_ids() -> None:
    assert protocol.is_slm_name("minilm-l6") and protocol.is_slm_name("Qwen/Qwen2.5-0.5B-Instruct")
    for bad in ["/etc/passwd", "../x", "a/b/c", "~/models", "org/..", ""]:
        assert not protocol.is_slm_name(bad), bad


# ------------------------------------------------------------------------------------ generation (causal LMs)
TOPICS = ["business", "sport", "tech"]


def tiny_causal(arch: str = "llama") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    configs = {
        "llama": TINY_CONFIGS["llama"],
        "gpt2": GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2),
    }
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(configs[arch])).eval()


def causal_upload(model: torch.nn.Module, **overrides) -> SLMUpload:
    fields = dict(
        labels=list(TOPICS), label_counts=[2, 5, 3], metrics={"rouge_l": 0.31, "target_perplexity": 40.0}
    )
    return upload(model, **{**fields, **overrides})


def test_a_tied_lm_head_crosses_the_wire_once() -> None:
    from crosslm.protocol import wire_state

    model = tiny_causal("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    both = encode(causal_upload(model), dtype="float32")
    once = encode(causal_upload(model, state_dict=wire_state(model)), dtype="float32")
    assert len(both) - len(once) >= model.lm_head.weight.numel() * 4  # one embedding matrix less
    got = decode(once, expected_labels=TOPICS, max_bytes=MAX, kind="generation")
    assert torch.equal(got.state_dict["lm_head.weight"], model.model.embed_tokens.weight)
    fresh = tiny_causal("llama")
    fresh.config.tie_word_embeddings = True
    fresh.tie_weights()
    fresh.load_state_dict(got.state_dict, strict=True)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    untied = tiny_causal("llama")  # nothing tied: nothing left out
    assert set(wire_state(untied)) == set(untied.state_dict())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_causal_slm_round_trips_for_a_generation_task(arch: str) -> None:
    model = tiny_causal(arch)
    msg = causal_upload(model)
    got = roundtrip(encode(msg, dtype="float32"), labels=TOPICS, kind="generation")
    assert isinstance(got, SLMUpload) and got.metrics == msg.metrics and got.labels == TOPICS
    hosted = build_model(got.model_type, got.model_config, len(TOPICS), kind="generation")
    hosted.load_state_dict(got.state_dict, strict=True)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(hosted.eval()(ids).logits, model(ids).logits)  # the very model the client trained


def test_the_receivers_task_kind_decides_which_model_the_weights_must_fit() -> None:
    causal, classifier = tiny_causal("llama"), tiny_model("llama")
    # a classifier's weights (score head) sent to a generation task: the causal LM has an lm_head instead
    rejects(encode(causal_upload(classifier)), "unexpected tensor 'score.weight'|lacks tensor 'lm_head",
            labels=TOPICS, kind="generation")  # fmt: skip
    # a causal LM's weights sent to a classification task
    rejects(encode(upload(causal)), "unexpected tensor 'lm_head|lacks tensor 'score", kind="classification")
    # an encoder is no causal LM, and a generation task declares generation metrics only
    rejects(encode(causal_upload(tiny_model("bert"))), "not allowed for a generation task", labels=TOPICS,
            kind="generation")  # fmt: skip
    wrong_metrics = causal_upload(causal, metrics={"accuracy": 0.9})
    rejects(
        encode(wrong_metrics), "undeclared key 'accuracy'.*generation task", labels=TOPICS, kind="generation"
    )
    rejects(encode(causal_upload(causal)), "differ from the expected labels", labels=["business", "sport"],
            kind="generation")  # fmt: skip
