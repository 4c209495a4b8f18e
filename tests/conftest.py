"""Tiny, locally built models and tokenizers for tests of mechanics (never downloaded)."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub: unknown ids must fail fast, not after network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import torch


def make_tokenizer(chat: bool = True):
    """A character-level fast tokenizer with pad/eos/unk tokens and an optional ChatML-like template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "[CLS]": 3, "[SEP]": 4}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat:
        tok.chat_template = (
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
        )
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


def make_llm(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llm(tiny_tokenizer):
    return make_llm(len(tiny_tokenizer))


def make_classifier(kind: str, vocab_size: int, num_labels: int = 2, seed: int = 0):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "num_labels": num_labels, "pad_token_id": 0}
    if kind == "bert":
        cfg = AutoConfig.for_model(
            "bert", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **common
        )
    elif kind == "distilbert":
        cfg = AutoConfig.for_model("distilbert", dim=16, n_layers=2, n_heads=2, hidden_dim=32, **common)
    elif kind == "roberta":
        cfg = AutoConfig.for_model(
            "roberta",
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=600,
            **common,
        )
    else:
        raise ValueError(kind)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def _toy_task():
    from crosslm.task import TaskSpec

    return TaskSpec(
        name="toy",
        labels=("neg", "pos"),
        descriptions=("negative", "positive"),
        verbalizer=("Negative", "Positive"),
        generation_prompt="Write a {description} review.",
        classification_prompt="Review: {text}\nOptions: {options}.",
    )


TOY_TASK = _toy_task()  # a two-label task for tests of mechanics


def make_upload(model, **kw):
    """A valid SLMUpload of `model` from client-0 (override any field with keyword arguments)."""
    from crosslm.protocol import SLMUpload, model_config_dict

    fields = dict(
        client_id="client-0",
        slm="minilm-l6",
        model_type=model.config.model_type,
        model_config=model_config_dict(model),
        labels=["neg", "pos"],
        num_examples=10,
        label_counts=[3, 7],
        version=1,
        base_version=0,
        metrics={"accuracy": 0.5},
        state_dict=model.state_dict(),
    )
    fields.update(kw)
    return SLMUpload(**fields)


ROOT = Path(__file__).resolve().parents[1]

# configs/headlines.yaml cut to a few minutes on two cores: the generation end-to-end runs' settings.
HEADLINES_SMALL = [
    "--set", "data.num_clients=2", "--set", "data.train_per_client=16", "--set", "data.test_per_client=8",
    "--set", "data.global_test_size=8", "--set", "clients.slms=[smollm2-l6, smollm2-l12]",
    "--set", "clients.epochs=1", "--set", "generation.samples_per_label=2", "--set", "generation.max_new_tokens=48",
    "--set", "tune.steps=2",
    "--set", "tune.batch_size=4", "--set", "tune.task_batch_size=2", "--set", "distill.epochs=1",
    "--set", "federation.updates=2", "--set", "eval.llm_eval_size=6", "--set", "eval.general_text_tokens=512",
]  # fmt: skip


def crosslm_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    """The real command line, run from the repository root (end-to-end tests)."""
    return subprocess.run(
        [sys.executable, "-m", "crosslm.cli", *args], capture_output=True, text=True, cwd=ROOT, **kw
    )


def run_events(run_dir: Path) -> list[dict]:
    """A run directory's metrics.jsonl events."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
