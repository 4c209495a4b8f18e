"""Step 3: the LLM writes labelled task data, x ~ G(. | P(y)), through its chat template.

With in-context feedback, each prompt also shows a few texts of its label that the SLMs scored best,
rotated per sample (ProGen, Ye et al. 2022): the generator sees what the clients' models recognise.

Samples are cleaned lightly (a preamble line like "Here is a review:" and a sentence cut off by the token
limit are removed), then empty, too-short and duplicate texts (also against earlier updates) are dropped.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from crosslm.config import GenerationConfig
from crosslm.modeling.llm_text import user_prompt_ids
from crosslm.precision import dtype_name, model_device, resolve_dtype
from crosslm.progress import progress
from crosslm.seeding import own_rng
from crosslm.server.decoding import SnapshotCache, generation_model, sample_tokens
from crosslm.task import TaskSpec

_SENTENCE_END = re.compile(r"[.!?](?=[\"')\]]?\s|[\"')\]]?$)")


def content_hash(text: str) -> str:
    norm = " ".join(text.lower().split())
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()[:16]


def clean_sample(text: str, truncated: bool, min_words: int) -> str:
    text = text.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]  # "Here is a short positive review:" preamble
    text = " ".join(lines)
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    if truncated:
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if ends and len(text[: ends[-1]].split()) >= min_words:
            text = text[: ends[-1]]
    return text.strip()


@dataclass
class GeneratedSample:
    text: str
    label: int
    hash: str


@dataclass
class GenerationStats:
    generated: int
    kept: int
    tokens: int
    seconds: float
    dtype: str = "float32"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


EXAMPLE_CHARS = 300
"""An in-context example is cut to this many characters: the prompt stays short."""


def with_examples(prompt: str, examples: list[str]) -> str:
    """P(y) followed by example texts of label y and a request for a new one."""
    if not examples:
        return prompt
    shown = "\n".join(f"- {' '.join(t.split())[:EXAMPLE_CHARS]}" for t in examples)
    return f"{prompt}\n\nExamples:\n{shown}\n\nWrite a new one, different from the examples."


def rotated_examples(candidates: list[str], row: int, k: int) -> list[str]:
    """The k examples of a label's `row`-th sample: consecutive candidates, shifted by k per sample, so
    successive samples see different examples and every candidate is used."""
    if not candidates or k <= 0:
        return []
    return [candidates[(row * k + j) % len(candidates)] for j in range(min(k, len(candidates)))]


@torch.no_grad()
def generate_samples(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    cfg: GenerationConfig,
    *,
    seen: set[str],
    seed: int,
    snapshots: SnapshotCache | None = None,
    examples: dict[int, list[str]] | None = None,
) -> tuple[list[GeneratedSample], GenerationStats]:
    """cfg.samples_per_label samples for each label; `seen` (content hashes) is updated in place.
    With `snapshots`, an unchanged model's sampling snapshot is reused instead of rebuilt. `examples`
    (label -> candidate texts) puts cfg.examples_per_prompt of them into each prompt, rotated per sample."""
    dtype = resolve_dtype(cfg.dtype, model_device(model))
    # Every draw (and anything the snapshot build draws) from `seed` alone; the global RNG is left as it was.
    with own_rng(seed, model_device(model)):
        t0 = time.perf_counter()
        # the current adapter merged in
        snapshot = snapshots.get(model, dtype) if snapshots is not None else generation_model(model, dtype)
        jobs = [(y, r) for y in range(task.num_labels) for r in range(cfg.samples_per_label)]
        k, cands = cfg.examples_per_prompt, examples or {}
        plain = {y: user_prompt_ids(tokenizer, task.prompt_for(y)) for y in range(task.num_labels)}

        def prompt_ids(y: int, r: int) -> list[int]:
            shown = rotated_examples(cands.get(y, []), r, k)
            return user_prompt_ids(tokenizer, with_examples(task.prompt_for(y), shown)) if shown else plain[y]

        eos = tokenizer.eos_token_id
        kept: list[GeneratedSample] = []
        tokens = 0
        with progress(total=len(jobs), desc="generate", unit="text", leave=False) as bar:
            for s in range(0, len(jobs), cfg.batch_size):
                batch = jobs[s : s + cfg.batch_size]
                labels = [y for y, _ in batch]
                rows = sample_tokens(
                    snapshot,
                    [prompt_ids(y, r) for y, r in batch],
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    eos_id=eos,
                    pad_id=tokenizer.pad_token_id,
                )
                for y, row in zip(labels, rows, strict=True):
                    tokens += len(row)
                    text = clean_sample(
                        tokenizer.decode(row, skip_special_tokens=True), eos not in row, cfg.min_words
                    )
                    h = content_hash(text)
                    if len(text.split()) < cfg.min_words or h in seen:
                        continue
                    seen.add(h)
                    kept.append(GeneratedSample(text, y, h))
                bar.update(len(labels))
    stats = GenerationStats(len(jobs), len(kept), tokens, time.perf_counter() - t0, dtype_name(dtype))
    return kept, stats
