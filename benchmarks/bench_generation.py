"""Benchmark: synthetic-data generation speed against this machine's matmul roofline.

Measures, in one run on one machine, on the same model, prompts and sampling settings:
- matmul probes (2048x2048, float32 and bfloat16): the roofline of this run;
- plain Hugging Face `generate` at batch 1 and batch 8 (float32, the call crosslm used to make);
- crosslm's generation path (`generate_samples`, the server's code) with `generation.dtype` auto and float32:
  the first call in the process, a call that reuses the snapshot (the server's case: its evaluation of the
  tuned LLM built it), and a call that builds its own; and the snapshot-reusing call again with the
  model's own forward for each decode step in place of the lean one (`server/lean_decode.py`);
- that the output distribution is unchanged: greedy tokens of the float32 path against `generate`
  (identical or not), and a chi-square test of token frequencies, crosslm's sampled path against
  `generate`'s (p-value; same temperature and top-p);
- LLM tuning tokens/s (`tune_adapter`, the default TuneConfig) and SLM training examples/s (`fit`, minilm-l6).
Prints one JSON line. Usage: python benchmarks/bench_generation.py [--model smollm2-135m-instruct]

On a GPU (`--device cuda`, or auto where one is present) everything above runs there, with a larger matmul
probe. `--random-init` builds the LLM (and the SLM, from `--slm`) from their config files with random
weights, for a machine that has no copy of the weights (the lent GPU machine has no network): speed does
not depend on the values, but with random weights rows rarely end early, so every row runs to
max_new_tokens, for `generate` and crosslm alike. Example, a 1.7B-parameter architecture on a GPU:
  python benchmarks/bench_generation.py --device cuda --random-init --model DIR_WITH_CONFIG_AND_TOKENIZER
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter

import torch

from crosslm.catalogue.datasets import DATASETS
from crosslm.catalogue.models import load_llm, load_slm
from crosslm.config import GenerationConfig, LLMConfig, TuneConfig
from crosslm.modeling.llm_text import pair_batch, user_prompt_ids
from crosslm.modeling.slm import train_supervised
from crosslm.precision import resolve_device, resolve_dtype
from crosslm.server.decoding import SnapshotCache, generation_model, sample_tokens
from crosslm.server.generate import generate_samples
from crosslm.server.tune_llm import add_lora, tune_adapter
from crosslm.task import LabelledTexts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    n = 8192 if device.type == "cuda" else 2048  # a GPU needs a larger product to fill it
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def load_models(args: argparse.Namespace, labels: list[str]) -> tuple:
    """(LLM, its tokenizer, SLM, its tokenizer): from the catalogue, or random weights from config files."""
    if not args.random_init:
        return (*load_llm(args.model), *load_slm(args.slm, labels))
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    slm_cfg = AutoConfig.from_pretrained(args.slm, num_labels=len(labels))
    slm = AutoModelForSequenceClassification.from_config(slm_cfg)
    return llm, tok, slm, AutoTokenizer.from_pretrained(args.slm)


@torch.no_grad()
def plain_generate(model, tok, prompts: list[list[int]], cfg: GenerationConfig, greedy: bool = False):
    """One left-padded batch through `model.generate`; new tokens per row, up to and including EOS."""
    batch = pair_batch([[] for _ in prompts], prompts, tok.pad_token_id, model.device)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": cfg.temperature}
    out = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        top_p=None if greedy else cfg.top_p,
        top_k=None if greedy else 0,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **sampling,
    )[:, batch.input_ids.shape[1] :].tolist()
    eos = tok.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


def generate_speed(model, tok, prompts, cfg, batch: int) -> tuple[float, list[list[int]]]:
    rows, t0 = [], time.perf_counter()
    for s in range(0, len(prompts), batch):
        rows += plain_generate(model, tok, prompts[s : s + batch], cfg)
    return sum(map(len, rows)) / (time.perf_counter() - t0), rows


def chi_square_p(a: list[list[int]], b: list[list[int]], top: int = 60) -> float:
    """Two-sample chi-square test on token frequencies (the `top` most common tokens + the rest)."""
    ca, cb = Counter(t for r in a for t in r), Counter(t for r in b for t in r)
    keys = [t for t, _ in (ca + cb).most_common(top)]
    rows = [[ca[k] for k in keys] + [sum(ca.values()) - sum(ca[k] for k in keys)]]
    rows.append([cb[k] for k in keys] + [sum(cb.values()) - sum(cb[k] for k in keys)])
    table = torch.tensor(rows, dtype=torch.float64)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected.clamp(min=1e-12)).sum()
    df = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--samples-per-label", type=int, default=GenerationConfig().samples_per_label)
    ap.add_argument(
        "--slm", default="minilm-l6", help="SLM for the training measure (a folder with --random-init)"
    )
    ap.add_argument("--check-texts", type=int, default=96, help="texts per side of the frequency test")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument(
        "--random-init", action="store_true", help="random weights from --model's and --slm's configs"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    device = resolve_device(args.device)
    task, texts_all, labels_all = DATASETS["rotten-tomatoes"].load()
    model, tok, slm, slm_tok = load_models(args, list(task.labels))
    model.to(device)
    cfg = GenerationConfig(samples_per_label=args.samples_per_label)
    params = sum(p.numel() for p in model.parameters())
    gflop_per_token = 2 * params / 1e9
    probe32, probe16 = matmul_gflops(torch.float32, device), matmul_gflops(torch.bfloat16, device)
    prompts = [user_prompt_ids(tok, task.prompt_for(y)) for y in range(task.num_labels)]
    b1, _ = generate_speed(model, tok, [prompts[i % 2] for i in range(4)], cfg, 1)
    b8, _ = generate_speed(model, tok, [prompts[i % 2] for i in range(16)], cfg, 8)
    # the first call in a process pays one-off costs (dtype probe, oneDNN kernel set-up): reported apart
    # the server's order: its evaluation builds the snapshot of the tuned LLM, the next update's sampling
    # reuses it (SnapshotCache); a call that builds its own snapshot is reported too
    snapshots = SnapshotCache()
    _, cold_stats = generate_samples(model, tok, task, cfg, seen=set(), seed=0, snapshots=snapshots)
    auto_rows, auto_stats = generate_samples(model, tok, task, cfg, seen=set(), seed=1, snapshots=snapshots)
    # the same call with the model's own forward for each decode step instead of the lean one
    snap = snapshots.get(model, resolve_dtype(cfg.dtype, device))
    lean, snap.crosslm_decoder = snap.crosslm_decoder, None
    model_step_rows, model_step_stats = generate_samples(
        model, tok, task, cfg, seen=set(), seed=1, snapshots=snapshots
    )
    snap.crosslm_decoder = lean
    _, build_stats = generate_samples(model, tok, task, cfg, seen=set(), seed=2)
    cfg32 = GenerationConfig(samples_per_label=args.samples_per_label, dtype="float32")
    _, f32_stats = generate_samples(model, tok, task, cfg32, seen=set(), seed=0)

    batched_bf16 = None
    if device.type == "cuda":  # a GPU user's own baseline: generate in bfloat16 at crosslm's batch size
        model_bf16 = generation_model(model, torch.bfloat16)  # on the model's device
        many = [prompts[i % 2] for i in range(2 * cfg.batch_size)]
        batched_bf16, _ = generate_speed(model_bf16, tok, many, cfg, cfg.batch_size)
        del model_bf16

    # same distribution: greedy tokens (float32 path) and sampled token frequencies (configured path)
    greedy_ref = plain_generate(model, tok, prompts, cfg, greedy=True)
    kw = {"max_new_tokens": cfg.max_new_tokens, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id}
    greedy_ours = sample_tokens(
        generation_model(model, torch.float32), prompts, temperature=1.0, top_p=1.0, greedy=True, **kw
    )
    check = [prompts[i % len(prompts)] for i in range(args.check_texts)]
    _, ref_rows = generate_speed(model, tok, check, cfg, 48)
    snapshot = generation_model(model, resolve_dtype(cfg.dtype, device))
    our_rows = sample_tokens(snapshot, check, temperature=cfg.temperature, top_p=cfg.top_p, **kw)

    # LLM tuning and SLM training throughput (the defaults of the main job)
    tcfg = TuneConfig()
    peft_model = add_lora(model, LLMConfig())
    texts = [tok.decode(r, skip_special_tokens=True) for r in our_rows]
    generated = [(t, i % task.num_labels, 0.5) for i, t in enumerate(texts)]
    good = [(t, y) for t, y, _ in generated]
    if device.type == "cuda":  # CUDA sets up its kernels on first use: one untimed step first
        warm = dataclasses.replace(tcfg, steps=1)
        tune_adapter(peft_model, tok, task, generated, good, warm, max_text_tokens=96, tau=0.6, seed=1)
        sync(device)
    t0 = time.perf_counter()
    tune_adapter(peft_model, tok, task, generated, good, tcfg, max_text_tokens=96, tau=0.6, seed=0)
    sync(device)
    tune_s = time.perf_counter() - t0
    # tokens through the LLM per step: L_QG batch (prompt + text, plus the frozen pass for L_PR) + L_task
    seq = sum(len(p) for p in prompts) / len(prompts) + sum(map(len, our_rows)) / len(our_rows)
    tune_tokens = tcfg.steps * tcfg.batch_size * seq * (2 if tcfg.alpha > 0 else 1)
    slm.to(device)
    n_train = 64 if device.type == "cpu" else 512
    t0 = time.perf_counter()
    train_supervised(
        slm, slm_tok, LabelledTexts(texts_all[:n_train], labels_all[:n_train]), task.num_labels,
        epochs=1, lr=5e-5, batch_size=16, max_length=128, seed=0,
    )  # fmt: skip
    sync(device)
    slm_s = time.perf_counter() - t0

    ours, ours32 = auto_stats.tokens_per_s, f32_stats.tokens_per_s
    limit = probe32 / gflop_per_token
    print(
        json.dumps(
            {
                "model": args.model,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "random_init": args.random_init,
                "params_m": round(params / 1e6, 1),
                "gflop_per_token": round(gflop_per_token, 3),
                "matmul_gflops_fp32": round(probe32, 1),
                "matmul_gflops_bf16": round(probe16, 1),
                "compute_limit_tokens_per_s_fp32": round(limit, 1),
                "compute_limit_tokens_per_s_bf16": round(probe16 / gflop_per_token, 1),
                "generate_b1_tokens_per_s": round(b1, 1),
                "generate_b8_tokens_per_s": round(b8, 1),
                f"generate_b{cfg.batch_size}_bf16_tokens_per_s": batched_bf16 and round(batched_bf16, 1),
                "crosslm_tokens_per_s": round(ours, 1),
                "crosslm_first_call_tokens_per_s": round(cold_stats.tokens_per_s, 1),
                "crosslm_with_snapshot_build_tokens_per_s": round(build_stats.tokens_per_s, 1),
                "crosslm_lean_step": lean is not None,
                "crosslm_model_step_tokens_per_s": round(model_step_stats.tokens_per_s, 1),
                "crosslm_lean_and_model_step_same_texts": [r.text for r in auto_rows]
                == [r.text for r in model_step_rows],
                "crosslm_dtype": auto_stats.dtype,
                "crosslm_fp32_tokens_per_s": round(ours32, 1),
                "crosslm_texts": auto_stats.generated,
                "crosslm_batch": cfg.batch_size,
                "crosslm_over_b8": round(ours / b8, 2),
                "crosslm_share_of_fp32_limit": round(ours / limit, 3),
                "greedy_identical_fp32": greedy_ours == greedy_ref,
                "token_freq_chi2_p": round(chi_square_p(ref_rows, our_rows), 4),
                "token_freq_tokens": [sum(map(len, ref_rows)), sum(map(len, our_rows))],
                "tune_tokens_per_s": round(tune_tokens / tune_s, 1),
                "tune_seconds_per_step": round(tune_s / tcfg.steps, 2),
                "slm_train_examples_per_s": round(n_train / slm_s, 1),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
