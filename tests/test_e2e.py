"""End to end on the real default models (SmolLM2-135M-Instruct, MiniLM) through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import crosslm_cli, run_events

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


_crosslm, _events = crosslm_cli, run_events


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    res = _crosslm(
        "run", "configs/tiny.yaml", "--set", f"output_dir={out}", "--set", "name=tiny",
        "--set", "clients.final_round=true", timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "standalone" in res.stdout  # the summary table
    return out / "tiny"


def test_run_directory_is_complete(tiny_run):
    for name in [
        "config.yaml",
        "metrics.jsonl",
        "synthetic.jsonl",
        "report.md",
        "plots/slm_global_accuracy.png",
        "plots/llm_accuracy.png",
        "plots/synthetic_quality.png",
        "llm_adapter/adapter_config.json",
    ]:
        assert (tiny_run / name).exists(), name
    ev = _events(tiny_run)
    kinds = [e["event"] for e in ev]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and not ev[-1]["interrupted"]
    machine = ev[0]["machine"]  # what the numbers depend on beyond the config
    assert machine["torch"] == torch.__version__ and machine["cpu_auto_dtype"] in ("bfloat16", "float32")
    assert ev[0]["task_wording"]["generation_prompt"] == "Write a short {description} movie review."
    assert "Machine:" in (tiny_run / "report.md").read_text()
    assert kinds.count("server_update") == 2
    assert kinds.count("enhanced") == 2
    assert sorted(e["update"] for e in ev if e["event"] == "llm_eval") == [0, 1, 2]
    assert {e["stage"] for e in ev if e["event"] == "perplexity"} == {"start", "end"}
    for e in ev:
        if e["event"] == "client_trained":
            assert 0.0 <= e["global"]["accuracy"] <= 1.0 and "macro_f1" in e["local"]
    report = (tiny_run / "report.md").read_text()
    assert "standalone" in report.lower() and "perplexity" in report.lower()


def test_a_client_whose_last_reply_changed_it_ends_with_a_final_local_round(tiny_run):
    ev = _events(tiny_run)
    last: dict[str, dict] = {}
    for e in ev:
        if e["event"] in ("client_trained", "enhanced"):
            last[e["client"]] = e
    ends = {e["client"]: e for e in ev if e["event"] == "client_eval"}
    assert set(ends) == set(last)
    epochs = yaml.safe_load((tiny_run / "config.yaml").read_text())["clients"]["epochs"]
    for cid, e in last.items():
        adapted = e["event"] == "enhanced" and e["adopted"] == 1
        assert ends[cid]["final_epochs"] == (epochs if adapted else 0), cid
        if not adapted:  # nothing changed after its last local round: it ends with that model as measured
            assert ends[cid]["global"] == (e["after"] if e["event"] == "enhanced" else e)["global"]
    assert any(e["final_epochs"] for e in ends.values())


def test_asynchrony_shows_interleaving_and_staleness(tiny_run):
    ev = _events(tiny_run)
    uploads = [e for e in ev if e["event"] == "upload" and e["accepted"]]
    assert [u["client"] for u in uploads][:2] == ["client-0", "client-1"]  # arrival order, fast client first
    updates = [e for e in ev if e["event"] == "server_update"]
    assert updates[0]["trigger_clients"] == ["client-0"] and updates[1]["trigger_clients"] == ["client-1"]
    assert max(max(u["staleness"].values()) for u in updates) >= 1
    assert all(abs(sum(u["weights"].values()) - 1) < 1e-6 for u in updates)


def test_synthetic_rows(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "synthetic.jsonl").read_text().splitlines()]
    assert rows, "no synthetic data was kept"
    for r in rows:
        assert set(r) >= {"text", "label", "q", "slm_probs", "update", "llm_version", "slm_versions", "hash"}
        assert r["label"] in ("negative", "positive") and 0.0 <= r["q"] <= 1.0
    assert len({r["hash"] for r in rows}) == len(rows)


def test_saved_models_load_with_from_pretrained(tiny_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for cid in ("client-0", "client-1"):
        path = tiny_run / "clients" / cid
        model = AutoModelForSequenceClassification.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.id2label == {0: "negative", 1: "positive"}
        with torch.no_grad():
            assert model(**tok(["a fine film"], return_tensors="pt")).logits.shape == (1, 2)

    from crosslm.catalogue.models import llm_path

    base = AutoModelForCausalLM.from_pretrained(llm_path("smollm2-135m-instruct"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, tiny_run / "llm_adapter")
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after)  # the trained adapter was saved, not a fresh one


def test_bad_inputs_give_one_clear_error(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"review {i},{['neg', 'pos'][i % 2]}\n" for i in range(400)))
    cases = [
        (["--set", f"data.dataset={csv}"], "data.task_description"),  # before any model is loaded
        (["--set", "data.dataset=no-such-data"], "rotten-tomatoes"),
        (["--set", "federation.update=3"], "Did you mean 'federation.updates'"),
        (["--set", "data.num_clients=500", "--set", "data.train_per_client=100"], "has only"),
        (["--set", "output_dir=/proc/crosslm"], "not writable"),
        (["--set", "clients.slms=[no-such-slm]", "--set", "data.num_clients=1"], "no-such-slm"),
    ]
    for i, (args, expected) in enumerate(cases):
        res = _crosslm(
            "run",
            "configs/tiny.yaml",
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            f"name=bad{i}",
            *args,
            timeout=300,
        )
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, res.stderr[-2000:]
        assert expected in res.stderr, (expected, res.stderr)


def test_ctrl_c_leaves_valid_files(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crosslm.cli",
            "run",
            "configs/tiny.yaml",
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "name=int",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "int" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and "client_trained" in metrics.read_text()):
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[:3000] + err[-2000:]
    assert "Traceback" not in err
    ev = _events(tmp_path / "int")  # every line is complete JSON
    assert ev[-1]["event"] == "run_end" and ev[-1]["interrupted"] is True
    assert "interrupted" in (tmp_path / "int" / "report.md").read_text().lower()
    assert not list((tmp_path / "int").glob(".*.tmp"))


def test_shuffled_labels_find_no_signal_and_harm_no_model(tmp_path):
    """Labels shuffled over rotten-tomatoes' texts carry nothing to learn: with the guard at its defaults
    (tiny.yaml turns it off) the server must notice, leave the LLM and the SLMs as they are, say so at the
    top of the report, and no reply may lower a client's validation macro-F1."""
    path = tmp_path / "shuffled.csv"
    made = subprocess.run([sys.executable, "scripts/catalogue_csv.py", "rotten-tomatoes", str(path), "--shuffle"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    res = _crosslm(
        "run", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}", "--set", "name=shuffled",
        "--set", f"data.dataset={path}", "--set", "data.task_description=movie reviews",
        "--set", "feedback.min_separation=0.05", timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "shuffled"
    ev = _events(run_dir)
    updates = [e for e in ev if e["event"] == "server_update"]
    assert len(updates) == 2 and all(u["signal"] is False and u["splus_size"] == 0 for u in updates)
    assert [e["update"] for e in ev if e["event"] == "llm_eval"] == [0]  # the LLM was never changed
    ppl = [e["perplexity"] for e in ev if e["event"] == "perplexity"]
    assert len(ppl) == 2 and ppl[1] == pytest.approx(ppl[0], rel=1e-4)
    enhanced = [e for e in ev if e["event"] == "enhanced"]
    assert enhanced
    tolerance = 0.15  # clients.accept_tolerance's default
    for e in enhanced:
        assert e["after"]["validation"]["macro_f1"] >= e["before"]["validation"]["macro_f1"] - tolerance
    head = (run_dir / "report.md").read_text(encoding="utf-8").split("Dataset **")[0]
    assert "**No signal at update(s) 1, 2** of 2" in head


@pytest.mark.slow
def test_pool_distillation_with_the_llm_as_labeller_runs_end_to_end(tmp_path):
    """The distillation levers together on the real models: the pool labelled by the SLMs, the LLM's
    verbalizer and the generator's own posterior, per-label weights, no SLM re-scoring its own distilled
    texts, drawn prompt attributes, and clients keeping their replies."""
    res = _crosslm(
        "run", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}", "--set", "name=levers",
        "--set", "distill.source=pool", "--set", "distill.labeller=slms+llm+generator", "--set", "distill.steps=4",
        "--set", "feedback.per_label_weights=true", "--set", "feedback.exclude_distilled=true",
        "--set", "clients.keep_weight=0.5", "--set", "distill.agreement=false",
        "--set", "generation.attributes=[Keep it to one sentence., Write it in a casual tone.]", timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "levers"
    ev = _events(run_dir)
    syn = {r["hash"]: r for r in map(json.loads, (run_dir / "synthetic.jsonl").read_text().splitlines())}
    assert syn and all(0.0 <= r["llm_q"] <= 1.0 for r in syn.values())  # the LLM labelled every text
    assert all(0.0 <= r["generator_q"] <= 1.0 for r in syn.values())  # and so did the generator
    updates = [e for e in ev if e["event"] == "server_update"]
    distilled = [e for e in ev if e["event"] == "distilled"]
    assert [d["update"] for d in distilled] == [u["update"] for u in updates] == [1, 2]
    for u, d in zip(updates, distilled, strict=True):
        assert isinstance(u["weights"]["client-0"], list) and len(u["weights"]["client-0"]) == 2
        assert 0.0 <= u["llm_agreement"] <= 1.0 and 0.0 <= u["generator_agreement"] <= 1.0
        # agreement off: the whole pool so far, every text weighted, each label carrying the same total
        assert u["distilled_size"] == len(d["hashes"]) == u["pool_size"] and set(d["hashes"]) <= set(syn)
        by_label = [sum(w for w, h in zip(d["weights"], d["hashes"], strict=True) if syn[h]["label"] == name)
                    for name in ("negative", "positive")]  # fmt: skip
        assert by_label[0] == pytest.approx(by_label[1], rel=1e-2)
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "distilled (per label)" in report
