"""GPTQ post-training quantization by the real GPTQModel (CPU), imported as an IntCheckpoint.

GPTQModel quantizes a float HF directory with calibration windows and saves a GPTQ v1 checkpoint; its integers and
scales are read back (converters.gptq.read_gptq) and turned into our signed convention:

    c = q − 2^(b−1)        (q: unsigned code in qweight)
    z = z_u − 2^(b−1)      (z_u: v1 stored zero + 1; 0 for every group of a symmetric grid — checked)
    scales (G, out) fp16 → (out, G)

so W = s·(c − z) is GPTQModel's own dequantization scales[g_idx]·(q − z_u). `import_gptq` checks that element-wise
against GPTQModel's TorchLinear.dequantize_weight() (fp16 both sides; fp16 rounding of an exact fp32 product is
the same number, so the comparison is exact). Only desc_act=False checkpoints with g_idx = i // group_size map onto
an IntCheckpoint; anything else is refused with its reason.

Fused projections: GPTQModel's Phi-3 definition quantizes gate_up_proj as two layers, gate_proj and up_proj
(UNFUSED). Their rows are stacked back in HF's order (gate, then up): every output row has its own codes and
scales, so the stacked layer is exactly what GPTQModel quantized.

Environment (reference/env-gptq.md): GPTQMODEL_CPU_WORKERS=2 (its default crashes on 2 cores),
GPTQMODEL_DISABLE_PACK_EXT=1 (skips a ~100 s JIT compile; byte-identical output) and HF_HUB_OFFLINE=1 are set
unless the caller set them.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from converters.gptq import read_gptq, unpack_codes

from ..core import quiet
from ..core.errors import UserError
from ..core.intckpt import IntCheckpoint, QuantLayer, build_intckpt
from ..core.models import quantized_layer_names
from ..core.quant import QuantSpec
from .common import check_linears

log = logging.getLogger(__name__)

# fused HF projection → the layers GPTQModel quantizes in its place, in the order of the fused output rows
UNFUSED = {"mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def gptqmodel_parts(name: str, available) -> list[str]:
    """The GPTQModel layer names that hold the rows of our layer `name`: itself, or its unfused parts."""
    for fused, parts in UNFUSED.items():
        if name.endswith(fused) and name not in available:
            return [name[: -len(fused)] + p for p in parts]
    return [name]


def _gptq_env() -> None:
    for k, v in (("GPTQMODEL_CPU_WORKERS", "2"), ("GPTQMODEL_DISABLE_PACK_EXT", "1"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(k, v)


def gptqmodel_quantize(float_dir: str | Path, out_dir: str | Path, spec: QuantSpec, calib: torch.Tensor,
                       damp_percent: float | None = None) -> dict:
    """Run GPTQModel.quantize on `float_dir` (HF model + tokenizer) with calibration windows `calib` (N, T) and
    save to `out_dir`. Returns timings."""
    if not spec.symmetric:
        raise UserError(f"GPTQ PTQ: spec {spec.name} is asymmetric; this importer handles symmetric grids only "
                        f"(GPTQModel's asym v1 zeros can be 0, which v1 cannot store)")
    _gptq_env()
    quiet.import_gptqmodel()
    from gptqmodel import GPTQModel, QuantizeConfig

    t0 = time.perf_counter()
    kw = {} if damp_percent is None else {"damp_percent": damp_percent}
    if spec.group_size == -1:  # GPTQModel's group-aware reordering (its default) refuses per-channel grids
        kw["act_group_aware"] = False
    qc = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, sym=True, desc_act=False, offload_to_disk=False,
                        **kw)
    model = GPTQModel.load(str(float_dir), qc, device="cpu")
    t1 = time.perf_counter()
    data = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in calib]
    model.quantize(data, batch_size=1)
    t2 = time.perf_counter()
    model.save(str(out_dir))
    return {"load_s": t1 - t0, "quantize_s": t2 - t1, "save_s": time.perf_counter() - t2}


def gptq_dir_to_layers(gptq_dir: str | Path, spec: QuantSpec, names: list[str]) -> dict[str, QuantLayer]:
    """Read GPTQModel's qweight/qzeros/scales/g_idx into signed codes, fp16 scales (out, G), no zeros (sym)."""
    qc, layers, _ = read_gptq(gptq_dir)
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if qc.get("bits") != spec.bits or qc.get("group_size") != spec.group_size or qc.get("desc_act"):
        raise UserError(f"GPTQ checkpoint {gptq_dir}: bits {qc.get('bits')}, group_size {qc.get('group_size')}, "
                        f"desc_act {qc.get('desc_act')}; expected bits {spec.bits}, group_size {spec.group_size}, "
                        f"desc_act false")
    parts = {name: gptqmodel_parts(name, layers) for name in names}
    if set(layers) != {p for ps in parts.values() for p in ps}:
        raise UserError(f"GPTQ checkpoint {gptq_dir}: quantized layers differ from the model's: "
                        f"{sorted(set(layers) ^ {p for ps in parts.values() for p in ps})[:5]}")
    half = 1 << (spec.bits - 1)
    out: dict[str, QuantLayer] = {}
    for name in names:
        rows = [_import_layer(gptq_dir, p, layers[p], spec, fmt, half) for p in parts[name]]
        biases = [q.bias for q in rows]
        out[name] = QuantLayer(torch.cat([q.codes for q in rows]), torch.cat([q.scales for q in rows]), None,
                               None if biases[0] is None else torch.cat(biases))  # rows stacked: (out, ·)
    return out


def _import_layer(gptq_dir, name: str, g, spec: QuantSpec, fmt: str, half: int) -> QuantLayer:
    """One GPTQ layer → signed codes (out, in), fp16 scales (out, G), bias; symmetric, g_idx = i // group only."""
    in_f = g.g_idx.shape[0]
    g_len = spec.group_len(in_f)
    if not np.array_equal(g.g_idx, np.arange(in_f, dtype=np.int32) // g_len):
        raise UserError(f"GPTQ checkpoint {gptq_dir}: layer {name} has a permuted g_idx; an IntCheckpoint "
                        f"expects g_idx = i // {g_len} (desc_act false)")
    q = unpack_codes(g.qweight.T, spec.bits).T.astype(np.int16)  # (in, out) unsigned
    z_u = unpack_codes(g.qzeros, spec.bits).astype(np.int16) + (1 if fmt == "gptq" else 0)  # (G, out)
    if (z_u != half).any():
        raise UserError(f"GPTQ checkpoint {gptq_dir}: layer {name} has zero points other than {half} "
                        f"(found {np.unique(z_u)[:5].tolist()}); expected a symmetric grid")
    codes = torch.from_numpy(np.ascontiguousarray((q - half).T).astype(np.int8))  # (out, in)
    scales = torch.from_numpy(np.ascontiguousarray(g.scales.T).astype(np.float16))  # (out, G)
    bias = None if g.bias is None else torch.from_numpy(g.bias).float()
    return QuantLayer(codes, scales, None, bias)


def check_against_gptqmodel(gptq_dir: str | Path, ck: IntCheckpoint) -> dict:
    """Load `gptq_dir` with GPTQModel (TorchLinear, fp16) and compare each layer's dequantize_weight() with the
    IntCheckpoint's s·(c − z) rounded to fp16, element-wise. Returns {'exact', 'layers', 'max_abs_diff'}."""
    _gptq_env()
    quiet.import_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel

    m = GPTQModel.load(str(gptq_dir), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    mods = {n: mod for n, mod in m.model.named_modules() if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight")}
    max_diff, bad = 0.0, []
    for name in ck.layers:
        parts = gptqmodel_parts(name, mods)
        if any(p not in mods for p in parts):
            bad.append(f"{name}: not a GPTQModel quantized module")
            continue
        theirs = torch.cat([mods[p].dequantize_weight().T.float() for p in parts])  # (out, in)
        ours = ck.dequantized(name).to(torch.float16).float()
        d = float((theirs - ours).abs().max()) if theirs.shape == ours.shape else float("inf")
        max_diff = max(max_diff, d)
        if d != 0.0:
            bad.append(f"{name}: max |Δ| {d}")
    return {"exact": not bad, "layers": len(ck.layers), "max_abs_diff": max_diff, "mismatches": bad[:5]}


def ptq_gptq(model, tok, spec: QuantSpec, source: dict, calib: torch.Tensor, keep_dir: str | Path | None = None,
             check: bool = True, damp_percent: float | None = None) -> IntCheckpoint:
    """GPTQ baseline as an IntCheckpoint: save the float model, quantize it with GPTQModel on CPU, import the
    integers, and (check=True) verify them element-wise against GPTQModel's own dequantization."""
    names = quantized_layer_names(model)
    check_linears(model, names, spec)
    with tempfile.TemporaryDirectory(prefix="lrqat-gptq-") as tmp:
        fdir, qdir = Path(tmp) / "float", Path(keep_dir) if keep_dir else Path(tmp) / "gptq"
        model.save_pretrained(fdir)
        tok.save_pretrained(fdir)
        timings = gptqmodel_quantize(fdir, qdir, spec, calib, damp_percent)
        layers = gptq_dir_to_layers(qdir, spec, names)
        for name, q in layers.items():  # keep the float model's exact bias, if any
            lin = model.get_submodule(name)
            if lin.bias is not None:
                q.bias = lin.bias.detach().float().clone()
        extra = {"gptq": {"calib_windows": int(calib.shape[0]), "calib_seq_len": int(calib.shape[1]),
                          "timings": timings, "quantizer": "gptqmodel"}}
        ck = build_intckpt(spec, model.config, layers, model.state_dict(), source, "gptq", extra)
        if check:
            res = check_against_gptqmodel(qdir, ck)
            ck.manifest["gptq"]["import_check"] = res
            if not res["exact"]:
                raise UserError(f"GPTQ import: imported weights differ from GPTQModel's dequantization: "
                                f"{res['mismatches']}")
    return ck
