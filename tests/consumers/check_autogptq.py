"""AutoGPTQ 0.7.1 environment (.venv-autogptq): load each GPTQ checkpoint in float32 and compare logits.

    .venv-autogptq/bin/python tests/consumers/check_autogptq.py WORKDIR

AutoGPTQ's CPU path (qlinear_cuda_old without the CUDA extension) dequantizes scales·(q − zero) in float32, which is
exact for fp16 scales, so its logits must equal the fused float32 model's bit for bit (max |Δ| == 0.0). Two
references: the logits written by the main environment (transformers 5.x) and the same fused float model run here
(transformers 4.x); both differences are reported, the check requires both to be 0.0.
Exit status 1 if any case fails. Prints one line per case and a JSON summary line prefixed "RESULT ".
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def main(work: Path) -> int:
    from auto_gptq import AutoGPTQForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    results, ok = {}, True
    for case in sorted(p for p in work.iterdir() if (p / "ref.json").is_file()):
        meta = json.loads((case / "ref.json").read_text())
        if "autogptq" not in meta["consumers"]:
            continue
        ref = load_file(str(case / "ref.safetensors"))
        try:
            model = AutoGPTQForCausalLM.from_quantized(
                str(case / "gptq"), device="cpu", use_triton=False, disable_exllama=True, disable_exllamav2=True,
                use_safetensors=True, torch_dtype=torch.float32)
            with torch.inference_mode():
                got = model(input_ids=ref["input_ids"]).logits.float()
            local = AutoModelForCausalLM.from_pretrained(str(case / "ref_float"), torch_dtype=torch.float32).eval()
            with torch.inference_mode():
                here = local(input_ids=ref["input_ids"]).logits.float()
            d_main = float((got - ref["logits"]).abs().max())
            d_here = float((got - here).abs().max())
            kernel = sorted({type(m).__module__.rsplit(".", 1)[-1] for m in model.modules()
                             if type(m).__name__ == "QuantLinear"})
            passed = d_main == 0.0 and d_here == 0.0
            results[meta["case"]] = {"max_abs_diff_vs_main_env_ref": d_main, "max_abs_diff_vs_local_ref": d_here,
                                     "kernel": kernel, "passed": passed}
            print(f"  autogptq {meta['case']:<16} fp32 max|Δlogits| vs reference {d_main:.3e}, "
                  f"vs fused model here {d_here:.3e}  [{', '.join(kernel)}]  {'ok' if passed else 'FAIL'}")
        except Exception as e:  # report every case, then fail
            passed = False
            results[meta["case"]] = {"error": f"{type(e).__name__}: {e}", "passed": False}
            print(f"  autogptq {meta['case']:<16} ERROR {type(e).__name__}: {e}")
        ok &= passed
    if not results:
        print("  autogptq: no cases found")
        ok = False
    print("RESULT " + json.dumps({"consumer": "autogptq", "passed": ok, "cases": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
