"""Progress off a terminal: one line per phase, with its count and unit."""

from __future__ import annotations

from crosslm.progress import PhaseLine


def test_a_phase_prints_one_line_with_its_count_and_unit(capsys) -> None:
    for _ in PhaseLine(range(3), desc="tune LLM", unit="step"):
        pass
    with PhaseLine(total=5, desc="generate", unit="text") as bar:
        bar.update(1)
    list(PhaseLine(range(2), desc="score", unit="it"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("tune LLM: 3 steps in ")
    assert lines[1].startswith("generate: 1/5 text in ")
    assert lines[2].startswith("score: 2 it in ")
