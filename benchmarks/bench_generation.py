"""Benchmark: synthetic-data generation speed against this machine's matmul roofline.

Measures, in one run on one machine: a 2048x2048 fp32 matmul probe (GFLOP/s), plain Hugging Face
`generate` at batch 1 and batch 8, and crosslm's own generation path (`generate_samples`), all on the
same model, prompts and sampling settings; prints tokens/s and the ratios as one JSON line.
Usage: python benchmarks/bench_generation.py [--model smollm2-135m-instruct] [--samples-per-label 24]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crosslm.catalogue.datasets import DATASETS
from crosslm.catalogue.models import load_llm
from crosslm.config import GenerationConfig
from crosslm.server.generate import generate_samples, sample_batch
from crosslm.server.llm_text import user_prompt_ids


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def plain_generate(model, tok, prompts: list[list[int]], cfg: GenerationConfig, batch: int) -> float:
    """tokens/s of plain `model.generate` (the call crosslm makes, same sampling) in batches of `batch`."""
    tokens, t0 = 0, time.perf_counter()
    for s in range(0, len(prompts), batch):
        for row in sample_batch(model, tok, prompts[s : s + batch], cfg).tolist():
            tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--samples-per-label", type=int, default=24)
    args = ap.parse_args()
    torch.manual_seed(0)
    task = DATASETS["rotten-tomatoes"].load()[0]
    model, tok = load_llm(args.model)
    cfg = GenerationConfig(samples_per_label=args.samples_per_label)
    params = sum(p.numel() for p in model.parameters())
    gflop_per_token = 2 * params / 1e9
    probe = matmul_gflops()
    prompts = [user_prompt_ids(tok, task.prompt_for(y)) for y in range(task.num_labels)]
    b1 = plain_generate(model, tok, [prompts[i % 2] for i in range(4)], cfg, 1)
    b8 = plain_generate(model, tok, [prompts[i % 2] for i in range(16)], cfg, 8)
    _, stats = generate_samples(model, tok, task, cfg, seen=set(), seed=0)
    ours = stats.tokens_per_s
    limit = probe / gflop_per_token
    print(
        json.dumps(
            {
                "model": args.model,
                "params_m": round(params / 1e6, 1),
                "gflop_per_token": round(gflop_per_token, 3),
                "matmul_gflops": round(probe, 1),
                "compute_limit_tokens_per_s": round(limit, 1),
                "generate_b1_tokens_per_s": round(b1, 1),
                "generate_b8_tokens_per_s": round(b8, 1),
                "crosslm_tokens_per_s": round(ours, 1),
                "crosslm_batch": cfg.batch_size,
                "crosslm_over_b8": round(ours / b8, 2),
                "crosslm_share_of_limit": round(ours / limit, 3),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
