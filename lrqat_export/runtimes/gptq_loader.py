"""Run a GPTQ directory the way users do: transformers `from_pretrained` with GPTQModel as the kernel provider.

Kernel choice (measured, docs/gptq.md): GPTQModel's `TorchLinear` (GPTQConfig backend "torch") in float16. It is
pure torch — no JIT-compiled C++ op on first load (7.7.0's AUTO kernel compiles for ~135 s), it takes every width
(2/3/4/8), per-channel groups (the aten int4 kernel refuses group_size −1) and symmetric or asymmetric grids, and it
is the tightest of the CPU kernels (it dequantizes scales[g_idx]·(q − z) exactly and runs the matmul in fp16; the
aten/fused int4 kernels differ from the torch reference by ~7e-3 in logits, this one by ~1e-3). It refuses
float32, so fp16 is the most precise dtype it runs in.

Scoring reuses `runtimes.torch_eval.perplexity` on the loaded model, so the numbers are computed exactly as for
the torch reference; only the model differs.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch

from ..core import quiet
from ..core.errors import UserError
from .torch_eval import perplexity

log = logging.getLogger(__name__)

BACKEND = "torch"  # GPTQModel TorchLinear: no JIT compile, all widths, tightest CPU match
DTYPE = torch.float16  # TorchLinear accepts fp16/bf16 only; fp16 has 3 more mantissa bits than bf16


def load_gptq(path: str | Path, dtype: torch.dtype = DTYPE, backend: str = BACKEND):
    """transformers AutoModelForCausalLM over a GPTQ directory on CPU, GPTQModel kernels (eval mode)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet.import_gptqmodel()  # transformers loads it for the GPTQ kernels; its banner stays out of the terminal
    from transformers import AutoModelForCausalLM, GPTQConfig

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"GPTQ directory {path}: expected config.json, not found")
    qc = json.loads(cfg_file.read_text()).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "gptq":
        raise UserError(f"GPTQ directory {path}: config.json expected quantization_config with quant_method 'gptq' "
                        f"(without it transformers silently loads random weights), got {qc!r:.120}")
    # Only loading attributes (the backend) are taken from this object; bits, group size, format come from the file.
    loading = GPTQConfig(bits=qc["bits"], backend=backend)
    with warnings.catch_warnings():  # "...quantization_config from the model will be used" is exactly the intent
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=dtype, quantization_config=loading)
    return model.eval()


@torch.inference_mode()
def gptq_logits(path_or_model, input_ids: torch.Tensor, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """Float32 logits (N, T, V) of the GPTQ model for token ids (N, T): for comparisons with the torch model."""
    model = load_gptq(path_or_model, dtype) if isinstance(path_or_model, (str, Path)) else path_or_model
    return model(input_ids=input_ids).logits.float()


def perplexity_gptq(path: str | Path, windows: torch.Tensor, protocol: str = "full", dtype: torch.dtype = DTYPE,
                    progress: bool = True) -> dict:
    """{'ppl', 'nll_sum', 'tokens', 'per_window_nll', 'runtime'} on (N, T) windows, scored as the torch reference."""
    model = load_gptq(path, dtype)
    r = perplexity(model, windows, protocol, progress=progress, desc="ppl (GPTQ loader)")
    r["runtime"] = f"transformers+gptqmodel (backend {BACKEND}, {str(dtype).replace('torch.', '')})"
    return r
