"""Baselines trained inside the tool on the same data, steps and loop as LR-QAT (issue 6), each ending where LR-QAT
ends: an IntCheckpoint (codes, fp16 scales, integer zeros) that exports and verifies like ours.

    method     trained                        frozen                     forward weight                  → IntCheckpoint
    full-qat   W, s   (LSQ, paper Eq. 3)      z                          s·(clip(⌊W/s + z⌉) − z)         exact
    peqa       s      (Kim et al. 2023)       RTN codes c, z             s·(c − z)                       exact
    qlora      A, B   (Dettmers et al. 2023)  NF4(W) blocks of 64        NF4⁻¹ + (α/r)·B·A (outside)     merge, then RTN
    qalora     A, B   (Xu et al. 2024)        RTN codes c, s; z          s·(c − z) + (α/r)·B·A·pool(x)   merge into zeros, rounded
    lora-fp    A, B   (the control)           float W                    W + (α/r)·B·A                   none (float model)

Shared conventions: ⌊·⌉ is torch.round with a straight-through gradient; scales enter every forward fp16-rounded
(fp16_ste), the exactness rule of quant.py; the float-LoRA adapters follow PEFT (A: r × in Kaiming, B: out × r zero,
so every method starts at its base). Activation checkpointing, when on, wraps each layer's weight construction and
matmul, so no weight-sized intermediate (Ŵ, the NF4 dequant) is kept for backward — the same treatment LR-QAT gets.

What exports exactly, per method:
* full-qat, peqa: the forward's integers are the checkpoint's integers; the reloaded IntCheckpoint reproduces the
  trained model's logits bit for bit.
* qlora: the adapter lives outside the quantizer, so the merged weight NF4⁻¹(W) + (α/r)BA is off any integer grid and
  is re-quantized by RTN (Lp range search) — the merge error the adapter never saw (anchors.md §4, QLoRA issues).
* qalora: the group-pooled adapter is constant inside each quantization group, so it merges into the zero point:
  z' = z − (α/r)(BA)[o, g] / (L·s[o, g]) with L the group length. z' is a float (QA-LoRA issue #35); the IntCheckpoint
  stores round(z') clamped to the code range on the asymmetric twin of the spec (zeros start at 0 from the symmetric
  RTN codes and scales every method starts from). `merged_float_model` keeps the float z' (what was trained), so the
  rounding cost is measured, not hidden. On per-channel grids the pool is over the whole row: the adapter reduces to
  a per-output offset times mean(x) — the method's own limit, reported as such.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..core.intckpt import IntCheckpoint, QuantLayer, build_intckpt
from ..core.models import quantized_layer_names, set_module
from ..core.quant import FP16_MAX, FP16_TINY, QuantSpec, dequantize, grouped, init_scales, quantize_codes, rtn_quantize
from .common import (MethodOptions, RoundSTE, check_init, check_linears, fp16_scales, fp16_ste, frozen_bias, linear,
                     maybe_checkpoint)

log = logging.getLogger(__name__)

NF4_BLOCK = 64  # QLoRA: one absmax per 64 weights (the second-level "double quantization" of absmax is not modelled)


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels (QLoRA): quantiles of N(0, 1), 8 on the positive side and 7 on the negative side plus an
    exact 0, normalised to [-1, 1]. offset = (1 − 1/(2·15) + 1 − 1/(2·16)) / 2 as in the paper's construction."""
    offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


def nf4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) → (codes uint8 (out, in/2) two nibbles per byte, absmax float32 (out·in/64,))."""
    blocks = w.detach().float().reshape(-1, NF4_BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
    x = blocks / absmax[:, None]
    levels = nf4_levels().to(x.device)
    idx = (x[..., None] - levels).abs().argmin(dim=-1).to(torch.uint8).reshape(w.shape)  # (out, in) in 0..15
    return idx[:, 0::2] | (idx[:, 1::2] << 4), absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Inverse of nf4_quantize → float32 (out, in)."""
    idx = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1).long()  # (out, in)
    return (levels[idx].reshape(-1, NF4_BLOCK) * absmax[:, None]).reshape(idx.shape)


# ---------------------------------------------------------------------------------------------------------------
# Layers. Each keeps HF's bias (if any) frozen as a buffer.


def _fq_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    s = fp16_ste(scale.float()).unsqueeze(-1)  # (out, G, 1)
    x = grouped(w.float(), spec) / s
    z = None if zero is None else zero.float().unsqueeze(-1)
    if z is not None:
        x = x + z
    c = torch.clamp(RoundSTE.apply(x), spec.qmin, spec.qmax)
    if z is not None:
        c = c - z
    return (c * s).reshape(w.shape)


class FakeQuantLinear(nn.Module):
    """Full-model QAT, LSQ-style: float W and scale s both trained, Ŵ = s·(clip(⌊W/s + z⌉) − z)."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, checkpointing: bool, init):
        super().__init__()
        w = linear.weight.detach().float()
        s0, z0 = init
        self.spec, self.checkpointing = spec, checkpointing
        self.weight = nn.Parameter(w.clone())
        self.scale = nn.Parameter(s0.float().clone())
        self.register_buffer("zero", None if z0 is None else z0.float().to(torch.int8))
        self.register_buffer("bias", frozen_bias(linear))

    @staticmethod
    def _forward(x, w, scale, zero, bias, spec):
        return linear(x, _fq_weight(w, scale, zero, spec), bias)

    def forward(self, x):
        return maybe_checkpoint(self.checkpointing, self._forward, x, self.weight, self.scale, self.zero, self.bias,
                                 self.spec)

    @torch.no_grad()
    def fused(self) -> QuantLayer:
        s16 = fp16_scales(self.scale)
        z = None if self.zero is None else self.zero.float()
        codes = quantize_codes(self.weight, s16.float(), z, self.spec)  # the same ops as _fq_weight's forward
        return QuantLayer(codes, s16, None if self.zero is None else self.zero.clone(), self.bias)


class PEQALinear(nn.Module):
    """PEQA: frozen RTN integer codes, trained scales: Ŵ = s·(c − z)."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, checkpointing: bool, init):
        super().__init__()
        w = linear.weight.detach().float()
        s0, z0 = init
        self.spec, self.checkpointing = spec, checkpointing
        self.register_buffer("codes", quantize_codes(w, s0, z0, spec))
        self.register_buffer("zero", None if z0 is None else z0.float().to(torch.int8))
        self.register_buffer("bias", frozen_bias(linear))
        self.scale = nn.Parameter(s0.float().clone())

    @staticmethod
    def _forward(x, codes, scale, zero, bias, spec):
        return linear(x, dequantize(codes, fp16_ste(scale.float()), zero, spec), bias)

    def forward(self, x):
        return maybe_checkpoint(self.checkpointing, self._forward, x, self.codes, self.scale, self.zero, self.bias,
                                 self.spec)

    @torch.no_grad()
    def fused(self) -> QuantLayer:
        s16 = fp16_scales(self.scale)
        return QuantLayer(self.codes.clone(), s16, None if self.zero is None else self.zero.clone(), self.bias)


class LoRALinear(nn.Module):
    """Frozen base (float W for lora-fp, NF4 blocks for qlora) + float adapter outside: y = x·Wᵀ + (α/r)·x·Aᵀ·Bᵀ."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, base: str, checkpointing: bool):
        super().__init__()
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        self.base, self.checkpointing, self.lora_scale = base, checkpointing, alpha / rank
        if base == "nf4":
            if w.numel() % NF4_BLOCK or in_f % 2:
                raise UserError(f"NF4 base: weight {tuple(w.shape)} must hold whole blocks of {NF4_BLOCK}")
            packed, absmax = nf4_quantize(w)
            self.register_buffer("nf4", packed)
            self.register_buffer("absmax", absmax)
            self.register_buffer("levels", nf4_levels())
            self.register_buffer("weight", None)
        else:
            self.register_buffer("weight", w.clone())
        self.register_buffer("bias", frozen_bias(linear))
        self.lora_A = nn.Parameter(torch.empty(rank, in_f))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank))

    def base_weight(self) -> torch.Tensor:
        return self.weight if self.base == "float" else nf4_dequantize(self.nf4, self.absmax, self.levels)

    @staticmethod
    def _nf4_base(x, nf4, absmax, levels, bias):
        return linear(x, nf4_dequantize(nf4, absmax, levels), bias)

    def forward(self, x):
        if self.base == "nf4":
            y = maybe_checkpoint(self.checkpointing, self._nf4_base, x, self.nf4, self.absmax, self.levels, self.bias)
        else:
            y = linear(x, self.weight, self.bias)
        return y + self.lora_scale * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.base_weight() + self.lora_scale * (self.lora_B.float() @ self.lora_A.float())


class QALoRALinear(nn.Module):
    """QA-LoRA: frozen RTN integers + scales; adapter on group-pooled inputs: y = x·Ŵᵀ + (α/r)·pool(x)·Aᵀ·Bᵀ with
    pool = mean over each quantization group (in → G features)."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, rank: int, alpha: float, checkpointing: bool, init):
        super().__init__()
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        sym = QuantSpec(spec.bits, spec.group_size, True)  # every method starts from the symmetric RTN point
        s0 = init[0]
        self.spec = QuantSpec(spec.bits, spec.group_size, False)  # zeros carry the merged adapter
        self.checkpointing, self.lora_scale = checkpointing, alpha / rank
        self.n_groups, self.g_len = sym.n_groups(in_f), sym.group_len(in_f)
        self.register_buffer("codes", quantize_codes(w, s0, None, sym))
        self.register_buffer("scale", s0.float().clamp(FP16_TINY, FP16_MAX).to(torch.float16))
        self.register_buffer("zero", torch.zeros(out_f, self.n_groups))  # float z' (0 at start)
        self.register_buffer("bias", frozen_bias(linear))
        self.lora_A = nn.Parameter(torch.empty(rank, self.n_groups))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank))

    @staticmethod
    def _base(x, codes, scale, bias, spec):
        return linear(x, dequantize(codes, scale, None, spec), bias)

    def forward(self, x):
        y = maybe_checkpoint(self.checkpointing, self._base, x, self.codes, self.scale, self.bias, self.spec)
        pooled = x.reshape(*x.shape[:-1], self.n_groups, self.g_len).mean(-1)  # (..., G)
        return y + self.lora_scale * F.linear(F.linear(pooled, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    @torch.no_grad()
    def merged_zero(self) -> torch.Tensor:
        """Float zero points z' (out, G) with s·(c − z') = s·c + adapter offset."""
        delta = self.lora_scale * (self.lora_B.float() @ self.lora_A.float()) / self.g_len  # (out, G) weight offset
        return self.zero - delta / self.scale.float()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.merged_zero(), self.spec)

    @torch.no_grad()
    def fused(self) -> QuantLayer:
        z = torch.round(self.merged_zero()).clamp_(self.spec.qmin, self.spec.qmax).to(torch.int8)
        return QuantLayer(self.codes.clone(), self.scale.clone(), z, self.bias)


BASELINE_LAYERS = (FakeQuantLinear, PEQALinear, LoRALinear, QALoRALinear)


# ---------------------------------------------------------------------------------------------------------------


def _swap(model: nn.Module, what: str, spec: QuantSpec | None, init: IntCheckpoint | None, make) -> nn.Module:
    """In place: freeze everything, then replace each projection by make(linear, name) — every layer checked first
    (an nn.Linear, a width the grid tiles when `spec` is given), so a refusal leaves the model untouched."""
    names = quantized_layer_names(model)
    check_linears(model, names, spec)
    if spec is not None:
        check_init(init, spec, names, f"prepare {what}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        lin = model.get_submodule(name)
        set_module(model, name, make(lin, name).to(lin.weight.device))
    log.info("prepared %d layers for %s (%s)", len(names), what, spec.name if spec else "float")
    return model


def _start(lin: nn.Linear, name: str, spec: QuantSpec, opts: MethodOptions, init: IntCheckpoint | None):
    """(scales, zeros) a quantized baseline starts from: `init`'s, or the same range search as LR-QAT's."""
    if init is None:
        return init_scales(lin.weight.detach().float(), spec, opts.builder_range)
    q = init.layers[name]
    return q.scales.float(), None if q.zeros is None else q.zeros.float()


def prepare_full_qat(model: nn.Module, spec: QuantSpec, opts: MethodOptions, init: IntCheckpoint | None = None):
    return _swap(model, "full-qat", spec, init,
                 lambda lin, n: FakeQuantLinear(lin, spec, opts.checkpointing, _start(lin, n, spec, opts, init)))


def prepare_peqa(model: nn.Module, spec: QuantSpec, opts: MethodOptions, init: IntCheckpoint | None = None):
    return _swap(model, "peqa", spec, init,
                 lambda lin, n: PEQALinear(lin, spec, opts.checkpointing, _start(lin, n, spec, opts, init)))


def prepare_qalora(model: nn.Module, spec: QuantSpec, opts: MethodOptions, init: IntCheckpoint | None = None):
    if not spec.symmetric:
        raise UserError(f"qalora: expected a symmetric spec (its zero points are what the adapter trains), "
                        f"got {spec.name}")
    opts.require("alpha", method="qalora")
    return _swap(model, "qalora", spec, init, lambda lin, n: QALoRALinear(
        lin, spec, opts.rank, opts.alpha, opts.checkpointing, _start(lin, n, spec, opts, init)))


def prepare_qlora(model: nn.Module, spec: QuantSpec, opts: MethodOptions, init: IntCheckpoint | None = None):
    """NF4 base (its own blocks, not the grid) + float LoRA; `spec` is the grid the merged weight is rounded to."""
    opts.require("alpha", method="qlora")
    return _swap(model, "qlora", spec, None,
                 lambda lin, n: LoRALinear(lin, opts.rank, opts.alpha, "nf4", opts.checkpointing))


def prepare_lora_fp(model: nn.Module, spec: QuantSpec | None, opts: MethodOptions, init: IntCheckpoint | None = None):
    """The float control: no grid at all (`spec` is ignored)."""
    opts.require("alpha", method="lora-fp")
    return _swap(model, "lora-fp", None, None,
                 lambda lin, n: LoRALinear(lin, opts.rank, opts.alpha, "float", opts.checkpointing))


PREPARE = {"full-qat": prepare_full_qat, "peqa": prepare_peqa, "qlora": prepare_qlora, "qalora": prepare_qalora,
           "lora-fp": prepare_lora_fp}


def prepare_baseline(model: nn.Module, method: str, spec: QuantSpec, opts: MethodOptions,
                     init: IntCheckpoint | None = None) -> nn.Module:
    """prepare_<method> by name. Scales (and zeros) start from the same range search as LR-QAT's
    (`opts.range_method`), or from `init`, an IntCheckpoint of the same model and spec (full-qat, peqa, qalora).
    `opts` must be resolved (methods.registry)."""
    if method not in PREPARE:
        raise UserError(f"baseline method: expected one of {tuple(PREPARE)}, got {method!r}")
    return PREPARE[method](model, spec, opts, init)


def baseline_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BASELINE_LAYERS)}


@torch.no_grad()
def merged_float_model(model: nn.Module) -> nn.Module:
    """In place: every baseline layer becomes an nn.Linear holding the weight the trained model computes with
    (LoRA: base + (α/r)BA, QA-LoRA: float z'; full-qat/peqa: s·(c − z))."""
    for name, m in baseline_layers(model).items():
        if isinstance(m, (LoRALinear, QALoRALinear)):
            w = m.merged_weight()
        else:
            q = m.fused()
            w = dequantize(q.codes, q.scales, q.zeros, m.spec)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=w.device)
        lin.weight.copy_(w)
        if m.bias is not None:
            lin.bias.copy_(m.bias)
        lin.requires_grad_(False)
        set_module(model, name, lin)
    return model.eval()


@torch.no_grad()
def fuse_baseline(model: nn.Module, method: str, spec: QuantSpec, source: dict, range_method: str, exact: bool,
                  extra: dict | None = None) -> IntCheckpoint:
    """The trained baseline as an IntCheckpoint (see the module docstring for what is exact; `exact` comes from
    the registry and is recorded in the manifest)."""
    layers_m = baseline_layers(model)
    if not layers_m:
        raise UserError(f"fuse {method}: the model has no baseline layers; expected a prepared model")
    if any(isinstance(m, LoRALinear) and m.base == "float" for m in layers_m.values()):
        raise UserError(f"fuse {method}: the float control (lora-fp) has no integer checkpoint; use "
                        f"merged_float_model")
    layers: dict[str, QuantLayer] = {}
    out_spec = spec
    for name, m in layers_m.items():
        if isinstance(m, LoRALinear):  # qlora: merge, then RTN with the same range search as everyone's start
            codes, s, z = rtn_quantize(m.merged_weight(), spec, range_method)
            layers[name] = QuantLayer(codes, s, z, m.bias)
        else:
            layers[name] = m.fused()
            out_spec = m.spec
    info = {"baseline": method, "exact": exact, **(extra or {})}
    return build_intckpt(out_spec, model.config, layers, model.state_dict(), source, method, info)
