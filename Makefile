# The two commands a newcomer needs: `make run` and `make test`. Both install first.
VENV := .venv/bin
.PHONY: install run test test-slow lint bench

install:
	bash scripts/install.sh

run: install
	$(VENV)/crosslm run configs/default.yaml

test: install lint
	$(VENV)/python -m pytest -q --durations=15

test-slow: install
	$(VENV)/python -m pytest -q --durations=15 -m slow

lint:
	$(VENV)/ruff check src tests benchmarks
	$(VENV)/ruff format --check src tests benchmarks
	$(VENV)/mypy src/crosslm

bench: install
	$(VENV)/python benchmarks/bench_main_job.py
