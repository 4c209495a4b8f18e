"""The report must put the right numbers in the right rows and survive partial (interrupted) logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from crosslm.evaluation.report import summary_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["slm_global_accuracy.png", "llm_accuracy.png", "synthetic_quality.png"]


def _m(la: float, ga: float) -> dict:
    return {"local": {"accuracy": la, "macro_f1": la - 0.1}, "global": {"accuracy": ga, "macro_f1": ga - 0.1}}


def _events() -> list[dict]:
    clients = [
        {"client": "client-0", "slm": "minilm-l6", "speed": 1.0, "train_size": 150, "test_size": 100,
         "label_counts": [120, 30]},
        {"client": "client-1", "slm": "bert-tiny", "speed": 0.5, "train_size": 80, "test_size": 60,
         "label_counts": [20, 60]},
    ]  # fmt: skip
    return [
        {"event": "run_start", "t": 0, "wall": 0.0, "seed": 0, "dataset": "rotten-tomatoes",
         "labels": ["negative", "positive"], "llm": "smollm2-135m-instruct", "clients": clients,
         "machine": {"torch": "2.13.0+cpu", "cpu": "Xeon", "cpu_threads": 2, "gpu": None, "cpu_auto_dtype": "bfloat16"}},
        {"event": "llm_eval", "t": 0, "wall": 5.0, "update": 0, "raw_accuracy": 0.52,
         "calibrated_accuracy": 0.63, "raw_macro_f1": 0.4, "calibrated_macro_f1": 0.6, "n": 200},
        {"event": "perplexity", "t": 0, "wall": 6.0, "stage": "start", "update": 0, "perplexity": 23.4,
         "tokens": 8192},
        {"event": "client_trained", "t": 3, "wall": 9.0, "client": "client-0", "round": 1, "base_version": 0,
         "train_loss": 0.41, **_m(0.71, 0.55), "seconds": 3.2},
        {"event": "upload", "t": 3.5, "wall": 9.5, "client": "client-0", "round": 1, "accepted": True,
         "reason": None, "bytes": 45_000_000, "staleness": 0},
        {"event": "client_trained", "t": 6, "wall": 12.0, "client": "client-1", "round": 1,
         "base_version": 0, "train_loss": 0.5, **_m(0.80, 0.60), "seconds": 6.0},
        {"event": "server_update", "t": 90, "wall": 95.0, "update": 1, "trigger_clients": ["client-0"],
         "weights": {"client-0": 1.0}, "staleness": {"client-0": 0}, "generated": 48, "kept": 45,
         "gen_tokens_per_s": 120.5, "distinct2": 0.8, "mean_q": 0.62, "share_q_ge_tau": 0.55,
         "splus_size": 30, "splus_per_label": [15, 15],
         "loss": {"total": 1.2, "qg": 0.5, "task": 0.6, "pr": 0.01}, "seconds": 80.1},
        {"event": "upload", "t": 91, "wall": 96.0, "client": "client-1", "round": 1, "accepted": True,
         "reason": None, "bytes": 17_000_000, "staleness": 1},
        {"event": "llm_eval", "t": 92, "wall": 99.0, "update": 1, "raw_accuracy": 0.56,
         "calibrated_accuracy": 0.66, "raw_macro_f1": 0.5, "calibrated_macro_f1": 0.64, "n": 200},
        {"event": "enhanced", "t": 95, "wall": 101.0, "client": "client-0", "update": 1,
         "before": _m(0.71, 0.55), "after": _m(0.73, 0.58)},
        {"event": "upload", "t": 96, "wall": 102.0, "client": "client-0", "round": 2, "accepted": False,
         "reason": "too_stale", "bytes": 45_000_000, "staleness": 3},
        {"event": "server_update", "t": 180, "wall": 190.0, "update": 2, "trigger_clients": ["client-1"],
         "weights": {"client-0": 0.4, "client-1": 0.6}, "staleness": {"client-0": 1, "client-1": 0},
         "generated": 50, "kept": 40, "gen_tokens_per_s": 118.0, "distinct2": 0.75, "mean_q": 0.7,
         "share_q_ge_tau": 0.65, "splus_size": 34, "splus_per_label": [16, 18], "distilled_size": 30, "distilled_per_label": [12, 18],
         "labels_without_candidates": ["pos"],
         "loss": {"total": 0.9, "qg": 0.4, "task": 0.45, "pr": 0.02}, "seconds": 85.0},
        {"event": "llm_eval", "t": 182, "wall": 193.0, "update": 2, "raw_accuracy": 0.60,
         "calibrated_accuracy": 0.70, "raw_macro_f1": 0.55, "calibrated_macro_f1": 0.69, "n": 200},
        {"event": "enhanced", "t": 185, "wall": 196.0, "client": "client-0", "update": 2,
         "before": _m(0.73, 0.58), "after": _m(0.74, 0.62)},
        {"event": "enhanced", "t": 186, "wall": 197.0, "client": "client-1", "update": 2,
         "before": _m(0.80, 0.60), "after": _m(0.82, 0.66)},
        {"event": "perplexity", "t": 190, "wall": 200.0, "stage": "end", "update": 2, "perplexity": 20.1,
         "tokens": 8192},
        {"event": "run_end", "t": 190, "wall": 700.0, "updates": 2, "interrupted": False},
    ]  # fmt: skip


CONFIG = {"data": {"name": "rotten-tomatoes"}, "feedback": {"tau": 0.5}, "seed": 0}


def _row(report: str, first_cell: str) -> list[str]:
    """Cells of the first Markdown table row whose first cell is `first_cell`."""
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def _section(report: str, title: str) -> str:
    return report.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _assert_pngs(run_dir: Path) -> None:
    for name in PLOTS:
        data = (run_dir / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 1000, name


def test_full_report_numbers(tmp_path: Path) -> None:
    path = write_report(tmp_path, _events(), CONFIG)
    assert path == tmp_path / "report.md"
    report = path.read_text(encoding="utf-8")
    assert "rotten-tomatoes" in report and "smollm2-135m-instruct" in report
    assert "Machine: Xeon (2 threads), torch 2.13.0+cpu, CPU precision auto = bfloat16." in report
    assert "completed" in report and "interrupted" not in _section(report, "Client SLMs").lower()
    for name in PLOTS:
        assert f"(plots/{name})" in report

    slms = _section(report, "Client SLMs: standalone vs. final")
    # client, SLM, train/test, counts, standalone la lf ga gf, final la lf ga gf, Δ
    c0 = _row(slms, "client-0")
    assert c0[1] == "minilm-l6" and c0[2] == "150 / 100" and c0[3] == "120 / 30"
    assert c0[4:8] == ["71.0", "61.0", "55.0", "45.0"]
    assert c0[8:12] == ["74.0", "64.0", "62.0", "52.0"]  # last enhancement (update 2), not update 1
    assert c0[12] == "+7.0"
    c1 = _row(slms, "client-1")
    assert c1[6] == "60.0" and c1[10] == "66.0" and c1[12] == "+6.0"
    mean = _row(slms, "**mean**")
    assert mean[6] == "57.5" and mean[10] == "64.0" and mean[12] == "+6.5"

    enh = _section(report, "Enhancements")
    assert _row(enh, "1")[1:4] == ["client-0", "71.0 → 73.0", "55.0 → 58.0"]
    assert sum(1 for line in enh.splitlines() if line.startswith("| 2 |")) == 2

    llm = _section(report, "Server LLM")
    zs = _row(llm, "0 (zero-shot)")
    assert zs[1:6] == ["52.0", "63.0", "40.0", "60.0", "200"]
    assert _row(llm, "2")[1:3] == ["60.0", "70.0"]
    assert "23.40" in llm and "20.10" in llm and "-14.1%" in llm

    syn = _section(report, "Synthetic data per server update")
    assert "τ=0.5" in syn
    logged = [{**e, "tau": 0.6} if e["event"] == "server_update" else e for e in _events()]
    auto = write_report(tmp_path / "auto", logged, {**CONFIG, "feedback": {"tau": "auto"}}).read_text()
    assert "τ=0.6" in _section(auto, "Synthetic data per server update")  # the threshold the server used
    u2 = _row(syn, "2")
    assert u2[1] == "client-1" and u2[2:6] == ["50", "40", "0.700", "65.0"]
    assert u2[6] == "34 (16 / 18); no candidate: pos" and u2[7] == "30 (12 / 18)" and u2[8] == "0.750"
    assert "client-0: 1, client-1: 0" in u2[10] and "client-0: 0.400" in u2[11]

    asyn = _section(report, "Asynchrony")
    assert "client-0 r1 → client-1 r1 → client-0 r2" in asyn
    assert "rejected: too_stale" in asyn
    # The rejected upload comes after server update 1 in the timeline (interleaving preserved).
    assert asyn.index("server update 1") < asyn.index("too_stale") < asyn.index("server update 2")

    _assert_pngs(tmp_path)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_truncated_run_says_interrupted(tmp_path: Path) -> None:
    events = _events()[:4]  # run_start, llm_eval, perplexity start, one client_trained
    report = write_report(tmp_path, events, CONFIG).read_text(encoding="utf-8")
    assert "interrupted" in report.lower()
    c0 = _row(_section(report, "Client SLMs: standalone vs. final"), "client-0")
    assert c0[6] == "55.0" and c0[10] == "n/a" and c0[12] == "n/a"
    assert _row(_section(report, "Client SLMs: standalone vs. final"), "client-1")[6] == "n/a"
    assert "No server update happened" in report
    _assert_pngs(tmp_path)
    assert "INTERRUPTED" in summary_table(events)


@pytest.mark.parametrize(
    "events",
    [
        [],
        [{"event": "run_start"}],
        [{"event": "enhanced", "client": "x"}, {"event": "server_update", "loss": None, "weights": "?"}],
        [{"event": "llm_eval", "update": 0, "raw_accuracy": float("nan")}, {"event": "run_end"}],
    ],
)
def test_degenerate_logs_never_crash(tmp_path: Path, events: list[dict]) -> None:
    report = write_report(tmp_path, events, {}).read_text(encoding="utf-8")
    assert report.startswith("# CrossLM run report")
    _assert_pngs(tmp_path)
    assert "perplexity" in summary_table(events)


def test_summary_table(tmp_path: Path) -> None:
    text = summary_table(_events())
    c0 = next(line for line in text.splitlines() if line.strip().startswith("client-0")).split()
    assert c0 == ["client-0", "minilm-l6", "55.0", "62.0", "+7.0"]
    mean = next(line for line in text.splitlines() if line.strip().startswith("mean")).split()
    assert mean == ["mean", "57.5", "64.0", "+6.5"]
    assert "raw 52.0 → 60.0" in text and "calibrated 63.0 → 70.0" in text and "(update 2)" in text
    assert "23.40 → 20.10 (-14.1%)" in text
    assert "completed" in text


def test_final_is_what_the_client_ends_with_after_its_final_round(tmp_path: Path) -> None:
    events = _events()
    end = events.index(next(e for e in events if e["event"] == "run_end"))
    events.insert(end, {"event": "client_eval", "t": 188, "wall": 198.0, "client": "client-0", "round": 2,
                        "base_version": 2, "final_epochs": 5, **_m(0.9, 0.7)})  # fmt: skip
    c0 = next(line for line in summary_table(events).splitlines() if line.strip().startswith("client-0"))
    assert c0.split()[2:] == ["55.0", "70.0", "+15.0"]  # not the last reply's 62.0
    c1 = next(line for line in summary_table(events).splitlines() if line.strip().startswith("client-1"))
    assert c1.split()[2:] == ["60.0", "66.0", "+6.0"]  # no client_eval logged: its last reply
    slms = _section(
        write_report(tmp_path, events, CONFIG).read_text(encoding="utf-8"),
        "Client SLMs: standalone vs. final",
    )
    assert _row(slms, "client-0")[-1] == "+15.0"


def test_the_first_update_shows_whether_the_loop_has_signal(tmp_path: Path) -> None:
    events = _events()
    first = next(e for e in events if e["event"] == "server_update" and e["update"] == 1)
    first.update(mean_q=0.34, chance_q=1 / 3, ensemble_agreement=0.31,
                 samples_by_label={"neg": ["Pinnacle Discs are a space where logic vanishes"], "pos": ["Great."]})  # fmt: skip
    events[0]["task_description"] = "patient reviews of a medicine"
    report = write_report(tmp_path, events, CONFIG).read_text(encoding="utf-8")
    head = report[: report.index("Plots:")]
    assert "patient reviews of a medicine" in head
    assert (
        "First update: mean q 0.34 (chance 0.33); the SLM ensemble agrees with 31.0 % of the intended labels"
        in head
    )
    assert "- neg: 'Pinnacle Discs are a space where logic vanishes'" in head


def test_the_first_update_line_names_q_chance_and_samples() -> None:
    from crosslm.server.update import first_update_line

    line = first_update_line(
        {"mean_q": 0.51, "chance_q": 0.5, "ensemble_agreement": 0.62, "splus_size": 12,
         "samples_by_label": {"negative": ["Dull."], "positive": []}},
        ("negative", "positive"),
    )  # fmt: skip
    assert line.startswith("update 1: mean q 0.51 (chance 0.50); the SLM ensemble agrees with 62 %")
    assert "  negative: 'Dull.'" in line


def test_the_report_opens_with_what_the_guards_did(tmp_path: Path) -> None:
    events = _events()
    updates = [e for e in events if e["event"] == "server_update"]
    updates[0].update(
        signal=False, label_separation=0.01, no_signal_reason="label separation 0.010 is below 0.05"
    )
    updates[1].update(signal=True, rolled_back=True, llm_majority_share=[0.55, 0.97])
    enhanced = next(e for e in events if e["event"] == "enhanced")
    enhanced.update(adopted=0, worse_share=0.974, before={**enhanced["before"], "validation": {"accuracy": 0.8, "macro_f1": 0.78}},
                    offered={"validation": {"accuracy": 0.5, "macro_f1": 0.33}, "local": {"accuracy": 0.7, "macro_f1": 0.6},
                             "global": {"accuracy": 0.6, "macro_f1": 0.5}})  # fmt: skip
    report = write_report(tmp_path, events, CONFIG).read_text(encoding="utf-8")
    head = report[: report.index("Dataset **")]  # before the summary's first sentence
    assert "**No signal at update(s) 1** of 2" in head and "label separation 0.010 is below 0.05" in head
    assert "**LLM updates undone: 2 (97.0 %)**" in head
    assert (
        "**1 of 3 enhanced SLMs refused**" in head
        and "client-0 at update 1 (validation macro-F1 0.78 → offered 0.33, worse in 97.4 % of bootstrap draws; "
        "own test accuracy kept "
        in head
        and "%, offered 70.0 %; global accuracy kept 55.0 %, offered 60.0 %)" in head
    )
    assert "| **refused** |" in report  # and in the enhanced-SLM table


def test_a_run_where_every_guard_stayed_quiet_has_no_guard_lines(tmp_path: Path) -> None:
    report = write_report(tmp_path, _events(), CONFIG).read_text(encoding="utf-8")
    assert "No signal" not in report and "undone" not in report and "refused" not in report


# --------------------------------------------------------------------------- generation runs

GEN_PLOTS = ["slm_global_rouge_l.png", "llm_rouge_l.png", "synthetic_quality.png"]


def _g(lr: float, gr: float, lp: float = 9.0, gp: float = 10.0) -> dict:
    """Per-split generation metrics: ROUGE-L, target perplexity, distinct-2."""
    return {
        "local": {"rouge_l": lr, "target_perplexity": lp, "distinct_2": 0.5},
        "global": {"rouge_l": gr, "target_perplexity": gp, "distinct_2": 0.6},
    }


def _gen_events() -> list[dict]:
    clients = [
        {"client": "client-0", "slm": "smollm2-135m", "speed": 1.0, "train_size": 200, "test_size": 50,
         "label_counts": [150, 50]},
        {"client": "client-1", "slm": "pythia-70m", "speed": 0.5, "train_size": 120, "test_size": 40,
         "label_counts": [30, 90]},
    ]  # fmt: skip
    update = {"event": "server_update", "generated": 60, "kept": 41, "malformed": 7, "duplicates": 4,
              "mean_q": 0.58, "tau": 0.5, "share_q_ge_tau": 0.6, "pool_size": 41, "splus_size": 24,
              "splus_per_label": [12, 12], "distilled_size": 20, "distilled_per_label": [10, 10],
              "distinct2": 0.71, "loss": {"total": 2.1, "task": 1.9}, "staleness": {"client-0": 0},
              "weights": {"client-0": 1.0}, "gen_tokens_per_s": 80.0, "seconds": 50.0}  # fmt: skip
    return [
        {"event": "run_start", "t": 0, "wall": 0.0, "seed": 1, "dataset": "news-headlines",
         "task_kind": "generation", "labels": ["business", "sports"], "llm": "qwen2.5-0.5b-instruct",
         "clients": clients},
        {"event": "llm_eval", "t": 0, "wall": 4.0, "update": 0, "dtype": "float32", "rouge_l": 0.181,
         "target_perplexity": 14.25, "distinct_2": 0.62, "n": 100},
        {"event": "perplexity", "t": 0, "wall": 5.0, "stage": "start", "update": 0, "perplexity": 23.4,
         "tokens": 4096},
        {"event": "client_trained", "t": 3, "wall": 8.0, "client": "client-0", "round": 1,
         **_g(0.234, 0.212, 9.87, 10.5), "seconds": 3.0},
        {"event": "client_trained", "t": 6, "wall": 11.0, "client": "client-1", "round": 1,
         **_g(0.3, 0.2, 8.0, 12.0), "seconds": 6.0},
        {**update, "t": 60, "wall": 70.0, "update": 1, "trigger_clients": ["client-0"]},
        {"event": "llm_eval", "t": 61, "wall": 72.0, "update": 1, "dtype": "float32", "rouge_l": 0.22,
         "target_perplexity": 12.0, "distinct_2": 0.6, "n": 100},
        {"event": "enhanced", "t": 62, "wall": 74.0, "client": "client-0", "update": 1, "adopted": 1,
         "before": _g(0.234, 0.212, 9.87, 10.5), "after": _g(0.25, 0.23, 9.5, 10.1)},
        {**update, "t": 120, "wall": 140.0, "update": 2, "trigger_clients": ["client-1"], "malformed": 2,
         "duplicates": 9},
        {"event": "llm_eval", "t": 121, "wall": 142.0, "update": 2, "dtype": "float32", "rouge_l": 0.256,
         "target_perplexity": 11.5, "distinct_2": 0.58, "n": 100},
        {"event": "enhanced", "t": 122, "wall": 144.0, "client": "client-0", "update": 2, "adopted": 1,
         "before": _g(0.25, 0.23, 9.5, 10.1), "after": _g(0.27, 0.245, 9.1, 9.75)},
        {"event": "enhanced", "t": 123, "wall": 145.0, "client": "client-1", "update": 2, "adopted": 0,
         "worse_share": 0.95, "before": {**_g(0.3, 0.2, 8.0, 12.0), "validation": {"rouge_l": 0.31}},
         "offered": {**_g(0.26, 0.19, 8.4, 12.5), "validation": {"rouge_l": 0.275}},
         "after": _g(0.3, 0.2, 8.0, 12.0)},
        {"event": "client_eval", "t": 124, "wall": 146.0, "client": "client-0", **_g(0.27, 0.245, 9.1, 9.75)},
        {"event": "perplexity", "t": 125, "wall": 150.0, "stage": "end", "update": 2, "perplexity": 24.0,
         "tokens": 4096},
        {"event": "run_end", "t": 125, "wall": 300.0, "updates": 2, "interrupted": False},
    ]  # fmt: skip


GEN_CONFIG = {"data": {"name": "news-headlines"}, "seed": 1}


def test_generation_report_shows_rouge_l_not_accuracy(tmp_path: Path) -> None:
    report = write_report(tmp_path, _gen_events(), GEN_CONFIG).read_text(encoding="utf-8")
    assert "accuracy" not in report.lower() and "macro-f1" not in report.lower()
    assert "(conditions: business, sports)" in report
    for name in GEN_PLOTS:
        assert f"(plots/{name})" in report
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
    assert not (tmp_path / "plots" / "slm_global_accuracy.png").exists()
    assert not (tmp_path / "plots" / "llm_accuracy.png").exists()

    slms = _section(report, "Client SLMs: standalone vs. final")
    assert "| standalone local ROUGE-L | standalone local target ppl |" in slms
    assert "Δ global ROUGE-L (points)" in slms and "condition counts (business / sports)" in slms
    c0 = _row(slms, "client-0")
    # standalone la lp ga gp, final la lp ga gp, Δ: ROUGE-L ×100 with one decimal, perplexity plain
    assert c0[4:8] == ["23.4", "9.87", "21.2", "10.50"]
    assert c0[8:12] == ["27.0", "9.10", "24.5", "9.75"]  # last enhancement (update 2)
    assert c0[12] == "+3.3"
    assert _row(slms, "**mean**")[7] == "11.25"  # mean standalone global perplexity of 10.5 and 12.0

    enh = _section(report, "Enhancements")
    assert "local ROUGE-L ×100 before → after" in enh
    assert _row(enh, "1")[1:6] == ["client-0", "23.4 → 25.0", "21.2 → 23.0", "+1.8", "10.50 → 10.10"]
    assert "| 2 | client-1 | 30.0 → 30.0 | 20.0 → 20.0 | +0.0 | 12.00 → 12.00 | **refused** |" in enh

    llm = _section(report, "Server LLM")
    assert "| update | ROUGE-L | target perplexity | distinct-2 | n |" in llm
    assert _row(llm, "0 (zero-shot)")[1:5] == ["18.1", "14.25", "0.620", "100"]
    assert _row(llm, "2")[1:4] == ["25.6", "11.50", "0.580"]
    assert (
        "Zero-shot → final (update 2): ROUGE-L 18.1 → 25.6 (+7.5 points), target perplexity 14.25 → 11.50."
        in llm
    )
    assert "start 23.40 → end 24.00; relative change +2.6%" in llm  # held-out text: as for classification

    syn = _section(report, "Synthetic data per server update")
    assert "| kept | malformed | duplicates | mean q |" in syn and "S+ size (per condition)" in syn
    assert _row(syn, "2")[2:7] == ["60", "41", "2", "9", "0.580"]


def test_a_generation_refusal_names_rouge_l(tmp_path: Path) -> None:
    report = write_report(tmp_path, _gen_events(), GEN_CONFIG).read_text(encoding="utf-8")
    head = report[: report.index("Dataset **")]
    assert (
        "**1 of 3 enhanced SLMs refused** by their clients, which kept their own weights: client-1 at update 2 "
        "(validation ROUGE-L 31.0 → offered 27.5, worse in 95.0 % of bootstrap draws; own test ROUGE-L kept "
        "30.0, offered 26.0; global ROUGE-L kept 20.0, offered 19.0)." in head
    )


def test_generation_summary_table() -> None:
    text = summary_table(_gen_events())
    assert text.splitlines()[0] == "Client SLMs, global test ROUGE-L (×100)"
    c0 = next(line for line in text.splitlines() if line.strip().startswith("client-0")).split()
    assert c0 == ["client-0", "smollm2-135m", "21.2", "24.5", "+3.3"]
    assert (
        "LLM zero-shot → final (update 2): ROUGE-L (×100) 18.1 → 25.6, target perplexity 14.25 → 11.50"
        in text
    )
    assert "23.40 → 24.00 (+2.6%)" in text and "accuracy" not in text


def test_the_task_kind_comes_from_the_metrics_when_run_start_is_lost(tmp_path: Path) -> None:
    events = [e for e in _gen_events() if e["event"] != "run_start"]
    report = write_report(tmp_path, events, GEN_CONFIG).read_text(encoding="utf-8")
    assert _row(_section(report, "Client SLMs: standalone vs. final"), "client-0")[4:6] == ["23.4", "9.87"]
    assert (tmp_path / "plots" / "llm_rouge_l.png").exists()
    # while an older log, without task_kind or generation metrics, stays classification
    assert "ROUGE-L" not in summary_table(_events())
