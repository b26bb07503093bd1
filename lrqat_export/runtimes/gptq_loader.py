"""Run a GPTQ directory the way users do: `AutoModelForCausalLM.from_pretrained(dir, device_map="cpu")`, with no
backend or dtype argument, so transformers + GPTQModel pick the kernel a CPU user gets.

What that default path picks on CPU (GPTQModel 7.6, measured on SmolLM2-135M, docs/gptq.md): for 4-bit files
`TorchAtenLinear` (aten's packed int4 matmul, float32 activations) — 3.4 s per 512-token window against 67 s for
`TorchLinear` in fp16, the kernel this module used before, and +0.07 % perplexity from the float32 fused model;
for 2/3/8-bit files `TorchLinear`. The aten int4 matmul takes group sizes 32..256 only, so the exporter writes
per-channel grids as groups (converters/gptq.py: file_group_size); before that, every per-channel checkpoint
crashed on its first forward through this path. `backend="torch"` and `dtype=torch.float16` still select the old
kernel where a caller wants it.

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


def load_gptq(path: str | Path, dtype: torch.dtype | None = None, backend: str | None = None):
    """transformers AutoModelForCausalLM over a GPTQ directory on CPU (eval mode). dtype / backend None: the
    defaults a user gets from a plain from_pretrained."""
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
    kw: dict = {"device_map": "cpu"}
    if dtype is not None:
        kw["dtype"] = dtype
    if backend is not None:  # only loading attributes are taken from this object; bits, groups, format from the file
        kw["quantization_config"] = GPTQConfig(bits=qc["bits"], backend=backend)
    with warnings.catch_warnings():  # "...quantization_config from the model will be used" is exactly the intent
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return model.eval()


def kernels(model) -> list[str]:
    """The quantized-linear classes the loader chose, e.g. ['TorchAtenLinear']."""
    return sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})


@torch.inference_mode()
def gptq_logits(path_or_model, input_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float32 logits (N, T, V) of the GPTQ model for token ids (N, T): for comparisons with the torch model."""
    model = load_gptq(path_or_model, dtype) if isinstance(path_or_model, (str, Path)) else path_or_model
    return model(input_ids=input_ids).logits.float()


def perplexity_gptq(path: str | Path, windows: torch.Tensor, protocol: str = "full", dtype: torch.dtype | None = None,
                    progress: bool = True) -> dict:
    """{'ppl', 'nll_sum', 'tokens', 'per_window_nll', 'runtime'} on (N, T) windows, scored as the torch reference."""
    model = load_gptq(path, dtype)
    r = perplexity(model, windows, protocol, progress=progress, desc="ppl (GPTQ loader)")
    r["runtime"] = (f"transformers+gptqmodel (default path: {', '.join(kernels(model))}, "
                    f"{str(model.dtype).replace('torch.', '')})")
    return r
