"""Step 3: the LLM writes labelled task data, x ~ G(. | P(y)), through its chat template.

With `generation.attributes`, each prompt ends with an instruction drawn per sample (a length, a style, a
sub-topic), so samples of one label differ by more than sampling noise. With in-context feedback, each
prompt also shows a few texts of its label that the SLMs scored best,
rotated per sample (ProGen, Ye et al. 2022): the generator sees what the clients' models recognise.

The generator also labels: p(y | x) is proportional to p(x | P(y)), the likelihood of a text under each
label's prompt (SuperGen, Meng et al. 2022), a labeller that needs no classifier.

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
from crosslm.modeling.llm_text import answer_ids, continuation_logprobs, pair_batch, user_prompt_ids
from crosslm.precision import dtype_name, model_device, resolve_dtype
from crosslm.progress import progress
from crosslm.seeding import own_rng
from crosslm.server.decoding import SnapshotCache, sample_tokens, sampling_snapshot
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


def with_attribute(prompt: str, attribute: str) -> str:
    return f"{prompt} {attribute.strip()}" if attribute else prompt


def drawn_attributes(attributes: list[str], n: int, seed: int) -> list[str]:
    """One attribute per sample, uniformly drawn from `seed` alone (the sampling stream is untouched)."""
    if not attributes:
        return [""] * n
    picks = torch.randint(len(attributes), (n,), generator=torch.Generator().manual_seed(seed))
    return [attributes[i] for i in picks.tolist()]


def rotated_examples(candidates: list[str], row: int, k: int) -> list[str]:
    """The k examples of a label's `row`-th sample: consecutive candidates, shifted by k per sample, so
    successive samples see different examples and every candidate is used."""
    if not candidates or k <= 0:
        return []
    return [candidates[(row * k + j) % len(candidates)] for j in range(min(k, len(candidates)))]


def sample_answers(
    snapshot: Any, tokenizer: Any, prompts: list[list[int]], cfg: GenerationConfig, *, desc: str
) -> list[list[int]]:
    """The sampled answer tokens (up to and including EOS) for each prompt, cfg.batch_size rows at a time,
    with the configured temperature, top-p and token budget. Draws from torch's RNG: call it under
    `own_rng`."""
    rows: list[list[int]] = []
    with progress(total=len(prompts), desc=desc, unit="text", leave=False) as bar:
        for s in range(0, len(prompts), cfg.batch_size):
            batch = prompts[s : s + cfg.batch_size]
            rows += sample_tokens(
                snapshot,
                batch,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
            )
            bar.update(len(batch))
    return rows


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
        snapshot = sampling_snapshot(model, dtype, snapshots)  # the current adapter merged in
        jobs = [(y, r) for y in range(task.num_labels) for r in range(cfg.samples_per_label)]
        k, cands = cfg.examples_per_prompt, examples or {}
        attrs = dict(zip(jobs, drawn_attributes(cfg.attributes, len(jobs), seed), strict=True))
        plain: dict[tuple[int, str], list[int]] = {}

        def prompt_ids(y: int, r: int) -> list[int]:
            prompt = with_attribute(task.prompt_for(y), attrs[y, r])
            shown = rotated_examples(cands.get(y, []), r, k)
            if shown:
                return user_prompt_ids(tokenizer, with_examples(prompt, shown))
            if (y, attrs[y, r]) not in plain:
                plain[y, attrs[y, r]] = user_prompt_ids(tokenizer, prompt)
            return plain[y, attrs[y, r]]

        eos = tokenizer.eos_token_id
        rows = sample_answers(snapshot, tokenizer, [prompt_ids(y, r) for y, r in jobs], cfg, desc="generate")
        kept: list[GeneratedSample] = []
        tokens = 0
        for (y, _), row in zip(jobs, rows, strict=True):
            tokens += len(row)
            text = clean_sample(
                tokenizer.decode(row, skip_special_tokens=True), eos not in row, cfg.min_words
            )
            h = content_hash(text)
            if len(text.split()) < cfg.min_words or h in seen:
                continue
            seen.add(h)
            kept.append(GeneratedSample(text, y, h))
    stats = GenerationStats(len(jobs), len(kept), tokens, time.perf_counter() - t0, dtype_name(dtype))
    return kept, stats


@torch.no_grad()
def generator_scores(
    model: Any, tokenizer: Any, task: TaskSpec, texts: list[str], *, batch_size: int = 16
) -> torch.Tensor:
    """[N, C] log p(x | P(c)): each text's summed token log-probability (its closing end-of-turn token
    included) as the answer to each label's plain generation prompt. A softmax over c is the generator's
    posterior under a uniform label prior."""
    device = model_device(model)
    prompts = [user_prompt_ids(tokenizer, task.prompt_for(c)) for c in range(task.num_labels)]
    answers = [answer_ids(tokenizer, t) for t in texts]
    jobs = [
        (i, c) for i in sorted(range(len(texts)), key=lambda i: len(answers[i])) for c in range(len(prompts))
    ]
    out = torch.empty(len(texts), len(prompts))
    for s in progress(range(0, len(jobs), batch_size), desc="generator label scores", leave=False):
        batch = jobs[s : s + batch_size]
        pb = pair_batch([prompts[c] for _, c in batch], [answers[i] for i, _ in batch], tokenizer.pad_token_id,
                        device)  # fmt: skip
        logp = (continuation_logprobs(model, pb) * pb.target_mask).sum(-1).cpu()
        for (i, c), v in zip(batch, logp.tolist(), strict=True):
            out[i, c] = v
    return out
