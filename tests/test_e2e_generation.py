"""A generation run end to end on the real default models (SmolLM2-135M-Instruct as the LLM, causal SLMs cut
from it) through the real CLI, on a small cut of configs/headlines.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import HEADLINES_SMALL as SMALL
from tests.conftest import crosslm_cli as _crosslm
from tests.conftest import run_events as _events

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def headlines_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    res = _crosslm("run", "configs/headlines.yaml", "--set", f"output_dir={out}", "--set", "name=headlines",
                   *SMALL, timeout=1200)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ROUGE-L" in res.stdout  # the summary table
    return out / "headlines"


def test_generation_run_measures_and_logs_every_step(headlines_run):
    ev = _events(headlines_run)
    kinds = [e["event"] for e in ev]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and not ev[-1]["interrupted"]
    assert ev[0]["task_kind"] == "generation" and len(ev[0]["labels"]) == 5
    llm = {e["update"]: e for e in ev if e["event"] == "llm_eval"}
    assert set(llm) == {0, 1, 2}
    for e in llm.values():
        assert 0.0 <= e["rouge_l"] <= 1.0 and e["target_perplexity"] > 1.0 and e["n"] == 6
    assert llm[0]["rouge_l"] > 0.0  # the zero-shot LLM writes headlines that share words with the real ones
    updates = [e for e in ev if e["event"] == "server_update"]
    assert len(updates) == 2
    for u in updates:
        assert u["generated"] == 10 and u["kept"] + sum(u["dropped"].values()) == u["generated"]
        assert u["kept"] > 0 and len(u["splus_per_label"]) == 5 and u["loss"]["total"] > 0
    assert {e["stage"] for e in ev if e["event"] == "perplexity"} == {"start", "end"}
    for e in ev:
        if e["event"] == "client_trained":
            assert 0.0 <= e["global"]["rouge_l"] <= 1.0 and e["local"]["target_perplexity"] > 1.0
    enhanced = [e for e in ev if e["event"] == "enhanced"]
    assert len(enhanced) == 2 and all("rouge_l" in e["offered"]["validation"] for e in enhanced)
    report = (headlines_run / "report.md").read_text()
    assert "ROUGE-L" in report and "accuracy" not in report.split("## Configuration")[0].lower()


def test_generation_synthetic_pairs_are_logged(headlines_run):
    rows = [json.loads(line) for line in (headlines_run / "synthetic.jsonl").read_text().splitlines()]
    assert rows
    for r in rows:
        assert r["input"].strip() and r["target"].strip() and "\n" not in r["target"]
        assert r["label"] in ("business", "entertainment", "politics", "sport", "tech")
        assert 0.0 <= r["q"] <= 1.0 and set(r["slm_loglik"]) <= {"client-0", "client-1"}
    assert len({r["hash"] for r in rows}) == len(rows)


def test_generation_clients_save_causal_lms(headlines_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    depths = []
    for cid in ("client-0", "client-1"):
        path = headlines_run / "clients" / cid
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        with torch.no_grad():
            logits = model(**tok(["Shares rose on Monday.\nHeadline:"], return_tensors="pt")).logits
        assert logits.shape[-1] == model.config.vocab_size
        depths.append(model.config.num_hidden_layers)
    assert depths == [6, 12]


def test_generation_bad_inputs_give_one_clear_error(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "input,summary\n" + "".join(f"story number {i} about things,headline {i}\n" for i in range(300))
    )
    cases = [
        (["--set", "clients.slms=[minilm-l6]", "--set", "data.num_clients=1"], "generation task"),
        (
            [
                "--set",
                f"data.dataset={pairs}",
                "--set",
                "data.target_column=headline",
                "--set",
                "data.task_description=stories",
            ],
            "headline",
        ),  # fmt: skip
        (["--set", "clients.keep_weight=0.5"], "clients.keep_weight"),
    ]
    for i, (args, expected) in enumerate(cases):
        res = _crosslm("run", "configs/headlines.yaml", "--set", f"output_dir={tmp_path}", "--set", f"name=bad{i}",
                       *args, timeout=300)  # fmt: skip
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, res.stderr[-2000:]
        assert expected in res.stderr, (expected, res.stderr)
