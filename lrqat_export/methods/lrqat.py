"""LR-QAT (Bondarenko, Del Chiaro, Nagel 2024): its linear layer (Eq. 8), prepare and fuse.

The layer:

    Ŵ = s · ( clip(⌊Φ0 + (α/r)·A·B⌉, qmin, qmax) − z )          ⌊·⌉ with a straight-through estimator

* Φ0 = φ(W0/s0 + z) is frozen. φ is the downcast that makes the frozen weight cheap to hold:
    - "fp32" / "bf16": a float copy;
    - "int8": fixed point Q(b).(8−b) in one int8 per weight: φ(x) = round(2^(8−b)·clip(x, qmin, qmax)),
      upcast as y / 2^(8−b) (Q4.4 for 4-bit, Q3.5 for 3-bit, plain codes for 8-bit) — the paper's default;
    - "int4": fixed point Q(b).(4−b) in a nibble, two per byte (0.5 byte per weight; b ≤ 4) — the paper's
      "double-packed" variant; for b = 4 it keeps exactly the RTN codes.
  Ties: fixed point (and bf16) can land exactly on k + 1/2, which round-half-even may send away from the RTN code
  of the unrounded W0/s0. Those values are moved one step of the fixed-point grid toward the RTN code, so with
  A·B = 0 the layer equals its round-to-nearest start exactly (docs/ARCHITECTURE.md, "Traps").
* A (out × r) starts at zero, B (r × in) Kaiming-uniform, so training starts at the RTN point; s (out × G) is
  trainable and used fp16-rounded (straight-through), the exactness rule; z is a frozen integer (asymmetric grids).
* The whole upcast + A·B + round + clip + scale + matmul runs under activation checkpointing when gradients are
  on, so no weight-sized intermediate is kept for backward. With `fused` (prepare's default) it runs instead as one
  autograd function with compiled element-wise passes and a low-rank backward (methods/fused.py): the same Ŵ bit
  for bit, the same gradients to float tolerance, no weight-sized tensor saved.
* `fused_codes()` gives W_int = clip(round(Φ0 + (α/r)AB)) — exactly the integers the forward used.

`prepare` swaps a model's projections (core.models.quantized_layer_names) for LRQATLinear layers; `fuse` walks them
back out into an IntCheckpoint (core.intckpt.build_intckpt). The method's defaults live in methods/registry.py.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable

import torch
from torch import nn

from ..core.errors import UserError
from ..core.intckpt import IntCheckpoint, QuantLayer, build_intckpt
from ..core.models import quantized_layer_names, set_module
from ..core.quant import (QuantSpec, grouped, init_k, init_scales, k_code_units, per_sub_block, plan_layer_specs,
                          sub_value)
from . import fused as fused_quantizer
from .common import (AB_INITS, PHI_CHOICES, MethodOptions, RoundSTE, check_init, fp16_scales, fp16_ste, init_fields,
                     layer_specs, linear, maybe_checkpoint, trainable_parameters)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# φ: downcast of x = W0/s0 + z (in code units) and its upcast.


def frac_bits(phi: str, bits: int) -> int:
    return {"int8": 8 - bits, "int4": 4 - bits}.get(phi, 0)


def _untie(y: torch.Tensor, rtn: torch.Tensor, step: float) -> torch.Tensor:
    """Move exact .5 ties of y (code units) one `step` toward the RTN code, so round(y) == rtn."""
    tie = (y - torch.floor(y)) == 0.5
    return torch.where(tie, y + step * torch.sign(rtn - y), y)


def pack_int4(v: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], (out, in) with even in -> uint8 (out, in/2): low nibble = even column."""
    u = (v.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4 -> int8 (out, in) in [-8, 7]."""
    lo = (p & 0xF).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    v = torch.stack((lo, hi), dim=-1).reshape(p.shape[0], p.shape[1] * 2)
    return torch.where(v >= 8, v - 16, v)


def phi_down(x: torch.Tensor, spec: QuantSpec, phi: str) -> torch.Tensor:
    """Frozen storage of x = W0/s0 + z (float32, (out, in)). Ties resolved toward round(x) (see module doc)."""
    rtn = torch.round(x).clamp(spec.qmin, spec.qmax)
    if phi == "fp32":
        return x.clone()
    if phi == "bf16":
        y = x.to(torch.bfloat16)
        tie = (y.float() - torch.floor(y.float())) == 0.5
        toward = rtn.to(torch.bfloat16)
        return torch.where(tie, torch.nextafter(y, toward), y)
    f = frac_bits(phi, spec.bits)
    y = torch.round(x.clamp(spec.qmin, spec.qmax) * 2**f) / 2**f  # fixed point, still in code units
    y = _untie(y, rtn, 2.0**-f) * 2**f  # integer fixed-point values
    if phi == "int8":
        return y.to(torch.int8)
    return pack_int4(y)


def phi_up(stored: torch.Tensor, spec: QuantSpec, phi: str) -> torch.Tensor:
    """Upcast the frozen storage back to code units, float32 (division by a power of two: exact)."""
    if phi in ("fp32", "bf16"):
        return stored.float()
    v = stored if phi == "int8" else unpack_int4(stored)
    return v.float() / 2 ** frac_bits(phi, spec.bits)


# ---------------------------------------------------------------------------------------------------------------


def _lrqat_weight(
    phi0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor,
    zero: torch.Tensor | None, spec: QuantSpec, phi: str, lora_scale: float,
) -> torch.Tensor:
    """Ŵ (out, in) float32 from the layer's state; RoundSTE inside, gradients reach A, B and s.
    Autocast is off here: the codes must not depend on bf16 matmul rounding (fused_codes computes them in fp32)."""
    with torch.autocast(device_type=phi0.device.type, enabled=False):
        return _lrqat_weight_fp32(phi0, lora_a, lora_b, scale, zero, spec, phi, lora_scale)


def _lrqat_weight_fp32(phi0, lora_a, lora_b, scale, zero, spec, phi, lora_scale):
    z_int = phi_up(phi0, spec, phi) + lora_scale * (lora_a.float() @ lora_b.float())  # (out, in) code units
    c = torch.clamp(RoundSTE.apply(z_int), spec.qmin, spec.qmax)
    c = grouped(c, spec)  # (out, G, g)
    if zero is not None:
        c = c - zero.float().unsqueeze(-1)
    return (c * fp16_ste(scale.float()).unsqueeze(-1)).reshape(phi0.shape[0], -1)


def _lrqat_forward(x, phi0, lora_a, lora_b, scale, zero, bias, spec, phi, lora_scale):
    return linear(x, _lrqat_weight(phi0, lora_a, lora_b, scale, zero, spec, phi, lora_scale), bias)


# K grids (core/quant.py "K grids"): the trained sub-block scale (and min) is a float whose forward value is
# d·clip(⌊s/d⌉) — the integer sub-scale the file stores times the frozen fp16 super-scale — with straight-through
# gradient, and the weight is computed in ggml's order: (d·sc)·q − dmin·m.


def k_sub_ste(v: torch.Tensor, sup: torch.Tensor, spec: QuantSpec, lo: int, hi: int) -> torch.Tensor:
    """sup·clip(⌊v/sup⌉, lo, hi) per sub-block (out, G), sup (out, S) repeated over its sub-blocks; STE."""
    sup_r = per_sub_block(sup, spec)
    return sup_r * torch.clamp(RoundSTE.apply(v.float() / sup_r), lo, hi)


def k_sub_ints(v: torch.Tensor, sup: torch.Tensor, spec: QuantSpec, lo: int, hi: int) -> torch.Tensor:
    """The integers k_sub_ste multiplies by, int8 (out, G): what the IntCheckpoint stores."""
    sup_r = per_sub_block(sup, spec)
    return torch.round(v.detach().float() / sup_r).clamp_(lo, hi).to(torch.int8)


def k_sub_values(scale, kd, kmin, kdmin, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d·sc, dmin·m | None), float32 (out, G): each sub-block's scale and min as the forward multiplies them, with
    the straight-through rounding of the sub-block integers (the eager chain and the fused K path alike)."""
    m_eff = None if kmin is None else k_sub_ste(kmin, kdmin, spec, 0, spec.sub_range[1])
    return k_sub_ste(scale, kd, spec, *spec.sub_range), m_eff


def _lrqat_weight_k(phi0, lora_a, lora_b, scale, kd, kmin, kdmin, spec, phi, lora_scale):
    with torch.autocast(device_type=phi0.device.type, enabled=False):
        z_int = phi_up(phi0, spec, phi) + lora_scale * (lora_a.float() @ lora_b.float())
        q = grouped(torch.clamp(RoundSTE.apply(z_int), spec.qmin, spec.qmax) + spec.offset, spec)  # (out, G, g)
        s_eff, m_eff = k_sub_values(scale, kd, kmin, kdmin, spec)
        w = s_eff.unsqueeze(-1) * q
        if m_eff is not None:
            w = w - m_eff.unsqueeze(-1)
        return w.reshape(phi0.shape[0], -1)


def _lrqat_forward_k(x, phi0, lora_a, lora_b, scale, kd, kmin, kdmin, bias, spec, phi, lora_scale):
    return linear(x, _lrqat_weight_k(phi0, lora_a, lora_b, scale, kd, kmin, kdmin, spec, phi, lora_scale), bias)


class LRQATLinear(nn.Module):
    """Drop-in replacement for nn.Linear during LR-QAT. State-dict keys: phi0, zero (asym), bias (if any),
    lora_A, lora_B, scale. Build with `from_linear`; the float weight is not kept."""

    def __init__(
        self, in_features: int, out_features: int, spec: QuantSpec, *, rank: int, alpha: float,
        phi: str = "int8", bias: bool = False, checkpointing: bool = True, fused: bool = False,
    ) -> None:
        super().__init__()
        if phi not in PHI_CHOICES:
            raise UserError(f"phi: expected one of {PHI_CHOICES}, got {phi!r}")
        if phi == "int4" and spec.bits > 4:
            raise UserError(f"phi int4 (double-packed Q(b).(4-b)) needs bits <= 4, got bits {spec.bits}; use phi int8")
        if phi == "int4" and in_features % 2:
            raise UserError(f"phi int4 packs two weights per byte: in_features must be even, got {in_features}")
        if rank < 1:
            raise UserError(f"rank: expected >= 1, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.rank, self.alpha, self.phi = spec, rank, float(alpha), phi
        self.checkpointing = checkpointing
        self.fused = fused  # the fused quantizer (methods/fused.py) where the grid and the device allow it
        n_groups = spec.n_groups(in_features)
        store = {"int8": (torch.int8, in_features), "int4": (torch.uint8, in_features // 2),
                 "bf16": (torch.bfloat16, in_features), "fp32": (torch.float32, in_features)}[phi]
        self.register_buffer("phi0", torch.zeros(out_features, store[1], dtype=store[0]))
        self.register_buffer("zero", None if spec.symmetric or spec.is_k
                             else torch.zeros(out_features, n_groups, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.lora_A = nn.Parameter(torch.zeros(out_features, rank))
        self.lora_B = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        self.scale = nn.Parameter(torch.ones(out_features, n_groups))
        # the initial scales s0 (Φ0 = W0/s0 + z): with them Φ0 gives the float weights back (as_teacher); rebuilt by
        # prepare, so not part of the state dict
        self.register_buffer("scale0", torch.ones(out_features, n_groups), persistent=False)
        # K grids: frozen fp16 super-scales d (and dmin); `scale` (and `kmin`) are the sub-blocks' d·sc (and dmin·m)
        k_asym = spec.is_k and not spec.symmetric
        n_super = spec.n_super(in_features)
        self.register_buffer("kd", torch.ones(out_features, n_super) if spec.is_k else None)
        self.register_buffer("kdmin", torch.ones(out_features, n_super) if k_asym else None)
        self.kmin = nn.Parameter(torch.zeros(out_features, n_groups)) if k_asym else None
        self.register_buffer("kmin0", torch.zeros(out_features, n_groups) if k_asym else None, persistent=False)
        self.teacher = False  # as_teacher: forward with the float weights s0·(Φ0 − z), no rounding, no A·B

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, spec: QuantSpec, *, rank: int, alpha: float, phi: str = "int8",
        range_method: str = "lp", checkpointing: bool = True, name: str = "linear",
        init: tuple[torch.Tensor, ...] | None = None, fused: bool = False,
    ) -> LRQATLinear:
        """init: precomputed (scales (out, G), zeros (out, G) | None) — K grids: (d, sc, dmin, m) — e.g. from a
        PTQ IntCheckpoint; else range search with `range_method`."""
        spec.check_layer(name, linear.in_features)
        w = linear.weight.detach().float()
        if not torch.isfinite(w).all():
            raise UserError(f"layer {name}: weight has NaN/Inf values; expected finite weights")
        layer = cls(linear.in_features, linear.out_features, spec, rank=rank, alpha=alpha, phi=phi,
                    bias=linear.bias is not None, checkpointing=checkpointing, fused=fused)
        if spec.is_k:
            return layer._init_k(linear, w, range_method, init)
        if init is None:
            s0, z0 = init_scales(w, spec, range_method)
        else:
            s0 = init[0].float().to(w.device)
            z0 = None if init[1] is None else init[1].float().to(w.device)
            if s0.shape != (linear.out_features, spec.n_groups(linear.in_features)) or (z0 is None) != spec.symmetric:
                raise UserError(f"layer {name}: initial scales/zeros do not fit spec {spec.name} "
                                f"(scales {tuple(s0.shape)}, zeros {'absent' if z0 is None else 'present'})")
        x = grouped(w, spec) / s0.unsqueeze(-1)
        if z0 is not None:
            x = x + z0.unsqueeze(-1)
            layer.zero.copy_(z0.to(torch.int8))
        layer.phi0.copy_(phi_down(x.reshape(w.shape), spec, phi))
        layer.scale.copy_(s0)
        layer.scale0.copy_(s0)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    @torch.no_grad()
    def _init_k(self, linear: nn.Linear, w: torch.Tensor, range_method: str, init) -> LRQATLinear:
        spec = self.spec
        d, sc, dmin, m = (init_k(w, spec, range_method) if init is None
                          else (None if t is None else t.float().to(w.device) for t in init))
        d1 = sub_value(d, sc, spec)
        m1 = None if dmin is None else sub_value(dmin, m, spec)
        self.phi0.copy_(phi_down(k_code_units(w, d1, m1, spec), spec, self.phi))
        self.kd.copy_(d)
        self.scale.copy_(d1)
        self.scale0.copy_(d1)
        if m1 is not None:
            self.kdmin.copy_(dmin)
            self.kmin.copy_(m1)
            self.kmin0.copy_(m1)
        if linear.bias is not None:
            self.bias.copy_(linear.bias.detach().float())
        return self.to(linear.weight.device)

    def weight(self) -> torch.Tensor:
        """Ŵ (out, in) float32 — the fake-quantized weight the forward uses."""
        if self.spec.is_k:
            return _lrqat_weight_k(self.phi0, self.lora_A, self.lora_B, self.scale, self.kd, self.kmin, self.kdmin,
                                   self.spec, self.phi, self.lora_scale)
        return _lrqat_weight(self.phi0, self.lora_A, self.lora_B, self.scale, self.zero, self.spec, self.phi,
                             self.lora_scale)

    def holds_float_weights(self) -> bool:
        """Φ0 keeps more than the codes (bf16, fp32, or fixed point with fraction bits): s0·(Φ0 − z) is the float
        weight to Φ0's resolution."""
        return self.phi in ("bf16", "fp32") or frac_bits(self.phi, self.spec.bits) > 0

    @torch.no_grad()
    def teacher_weight(self) -> torch.Tensor:
        """s0·(Φ0 − z), (out, in) float32: the float weight the layer was prepared from, to Φ0's resolution."""
        w = grouped(phi_up(self.phi0, self.spec, self.phi), self.spec)
        if self.spec.is_k:  # d1_0·(Φ0 + offset) − m1_0
            w = (w + self.spec.offset) * self.scale0.unsqueeze(-1)
            if self.kmin0 is not None:
                w = w - self.kmin0.unsqueeze(-1)
            return w.reshape(self.out_features, -1)
        if self.zero is not None:
            w = w - self.zero.float().unsqueeze(-1)
        return (w * self.scale0.unsqueeze(-1)).reshape(self.out_features, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher:
            with torch.no_grad():
                return linear(x, self.teacher_weight(), self.bias)
        if self.fused and fused_quantizer.available(self.phi0.device):
            if self.spec.is_k:  # the sub-blocks' d·sc and dmin·m (out × G), eager; the weight-sized rest fused
                with torch.autocast(device_type=self.phi0.device.type, enabled=False):
                    s_eff, m_eff = k_sub_values(self.scale, self.kd, self.kmin, self.kdmin, self.spec)
                return fused_quantizer.quantized_linear_k(x, self.phi0, self.lora_A, self.lora_B, s_eff, m_eff,
                                                          self.bias, self.spec, self.phi, self.lora_scale, phi_up)
            return fused_quantizer.quantized_linear(x, self.phi0, self.lora_A, self.lora_B, self.scale, self.zero,
                                                    self.bias, self.spec, self.phi, self.lora_scale, phi_up)
        if self.spec.is_k:  # K grids, eager
            return maybe_checkpoint(self.checkpointing, _lrqat_forward_k, x, self.phi0, self.lora_A, self.lora_B,
                                    self.scale, self.kd, self.kmin, self.kdmin, self.bias, self.spec, self.phi,
                                    self.lora_scale)
        return maybe_checkpoint(self.checkpointing, _lrqat_forward, x, self.phi0, self.lora_A, self.lora_B, self.scale,
                                self.zero, self.bias, self.spec, self.phi, self.lora_scale)

    @torch.no_grad()
    def rounded_codes(self) -> torch.Tensor:
        """round(Φ0 + (α/r)AB), float32 (out, in), before the clip: outside [qmin, qmax] where the clamp holds a
        code."""
        z = phi_up(self.phi0, self.spec, self.phi) + self.lora_scale * (self.lora_A.float() @ self.lora_B.float())
        return torch.round(z)

    def _clipped(self, rounded: torch.Tensor) -> torch.Tensor:
        return rounded.clamp_(self.spec.qmin, self.spec.qmax).to(torch.int8)

    @torch.no_grad()
    def start_codes(self) -> torch.Tensor:
        """clip(round(Φ0)), int8 (out, in): the integers before training moved A·B (RTN's, or the --init's)."""
        return self._clipped(torch.round(phi_up(self.phi0, self.spec, self.phi)))

    @torch.no_grad()
    def fused_codes(self) -> torch.Tensor:
        """W_int = clip(round(Φ0 + (α/r)AB)), int8 (out, in): the integers the forward uses."""
        return self._clipped(self.rounded_codes())

    @torch.no_grad()
    def fused_scales(self) -> torch.Tensor:
        """fp16 scales (out, G) — the values the forward multiplies by (K grids: the super-scales d, (out, S))."""
        return self.kd.to(torch.float16) if self.spec.is_k else fp16_scales(self.scale)

    @torch.no_grad()
    def fused_layer(self) -> QuantLayer:
        """The layer as the IntCheckpoint stores it: the integers and scales the forward used."""
        bias = None if self.bias is None else self.bias.clone()
        if not self.spec.is_k:
            return QuantLayer(self.fused_codes(), self.fused_scales(), None if self.zero is None else self.zero.clone(),
                              bias)
        lo, hi = self.spec.sub_range
        k_asym = self.kmin is not None
        return QuantLayer(self.fused_codes(), self.fused_scales(), None, bias,
                          k_sub_ints(self.scale, self.kd, self.spec, lo, hi),
                          self.kdmin.to(torch.float16) if k_asym else None,
                          k_sub_ints(self.kmin, self.kdmin, self.spec, 0, hi) if k_asym else None)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, spec={self.spec.name}, r={self.rank}, "
                f"alpha={self.alpha}, phi={self.phi}, bias={self.bias is not None}")


# ---------------------------------------------------------------------------------------------------------------
# A whole model: prepare (swap projections for LRQATLinear), inspect, fuse.


def prepare(model: nn.Module, spec: QuantSpec, opts: MethodOptions, init: IntCheckpoint | None = None) -> nn.Module:
    """In place: freeze everything, then replace each projection by LRQATLinear.from_linear. Returns the model.

    Every layer is validated before any is replaced, so a bad spec leaves the model untouched.
    init: an IntCheckpoint of the same model and spec (e.g. the RTN baseline) whose scales and zero points start
    the training instead of a new range search.
    """
    opts.require("alpha", "phi", method="lrqat")
    names = quantized_layer_names(model)
    check_init(init, spec, names, "prepare")
    specs = layer_specs(model, names, spec)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        lin = model.get_submodule(name)
        q = None if init is None else init.layers[name]
        set_module(model, name, LRQATLinear.from_linear(
            lin, specs[name], rank=opts.rank, alpha=opts.alpha, phi=opts.phi, range_method=opts.builder_range,
            checkpointing=opts.checkpointing, name=name, init=None if q is None else init_fields(q, specs[name]),
            fused=opts.fused))
    log.info("prepared %d layers with %s, r=%d, alpha=%g, phi=%s, %s quantizer", len(names), spec.name, opts.rank,
             opts.alpha, opts.phi, "fused" if opts.fused else "eager")
    return model


def data_aware_init(model: nn.Module, steps, mode: str, loss_fn=None, seed: int = 0, gather=None) -> dict:
    """Point each layer's B (r × in) at the input directions that matter, keeping A = 0: the start is still the RTN
    point exactly. `steps` yields, for each of the first training steps, this process's micro-batches of it: lists
    of (windows, their row indices) — windows the run trains on anyway, so no extra tokens. One pass accumulates,
    per layer, a randomized range sketch Y (in × 2r):

        act    Y += Xᵀ (X Ω)     the top principal directions of the layer's inputs
        grad   Y += Xᵀ (δ Ω')    the row space of the loss gradient w.r.t. the weight, G = Σ δ xᵀ

    X: the layer's inputs; δ: the gradient of loss_fn(windows, indices) at its output; Ω, Ω': fixed Gaussian test
    matrices. Memory is in × 2r per layer, never in × in or out × in. B's rows become Y's top-r left singular
    vectors scaled to the row norm of the Kaiming start (1/√3): the step sizes stay those of the default init, only
    the direction of A·B's updates changes.

    gather (under torchrun): takes this rank's terms of one layer for one step, (n, in, 2r), and returns every
    rank's, (world·n, in, 2r), in rank order. Y then adds the same terms in the same order as one process taking
    the whole global batch in world × as many micro-batches, so every rank, and that process, computes the same B
    bit for bit; B is written into each rank's shard. Returns {"layers": n, "windows": m}."""
    if mode not in AB_INITS:
        raise UserError(f"ab_init: expected one of {AB_INITS}, got {mode!r}")
    layers = lrqat_layers(model)
    if mode == "lora" or not layers:
        return {"layers": 0}
    if mode == "grad" and loss_fn is None:
        raise UserError("ab_init grad: expected the training loss (loss_fn), got none")
    gen = torch.Generator().manual_seed(seed)
    sketch, omega, terms, hooks = {}, {}, {}, []
    for name, m in layers.items():
        k = min(2 * m.rank, m.in_features)
        dev = m.phi0.device
        omega[name] = torch.randn(m.in_features if mode == "act" else m.out_features, k, generator=gen).to(dev)
        sketch[name] = torch.zeros(m.in_features, k, device=dev)
        terms[name] = []  # this step's terms, in the order one process adds them

        def hook(mod, inp, out, name=name):
            x = inp[0].detach().reshape(-1, mod.in_features).float()
            if mode == "act":
                terms[name].append(x.T @ (x @ omega[name]))
            elif out.requires_grad:
                def grad_hook(g):  # returns None: the gradient itself is left as it is
                    terms[name].append(x.T @ (g.reshape(-1, mod.out_features).float() @ omega[name]))
                out.register_hook(grad_hook)
        hooks.append(m.register_forward_hook(hook))
    n = 0
    try:
        for micro_batches in steps:
            for mb, idx in micro_batches:
                n += mb.shape[0]
                if mode == "act":
                    with torch.no_grad():
                        model(input_ids=mb)
                else:
                    loss_fn(mb, idx).backward()
            for name, ts in terms.items():
                for t in (ts if gather is None else gather(torch.stack(ts)).unbind(0)):
                    sketch[name] += t
                ts.clear()
    finally:
        for h in hooks:
            h.remove()
        for p in trainable_parameters(model).values():
            p.grad = None
    with torch.no_grad():
        for name, m in layers.items():
            u = torch.linalg.svd(sketch[name], full_matrices=False)[0]  # (in, k), columns by singular value
            r = min(m.rank, u.shape[1])
            b = _full(m.lora_B).clone()  # in < r: the Kaiming rows past r stay
            b[:r] = u[:, :r].T.to(b.dtype) / math.sqrt(3.0)
            _assign(m.lora_B, b)
    log.info("ab_init %s: B of %d layers from %d windows", mode, len(layers), n)
    return {"layers": len(layers), "windows": n}


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: a DTensor shard (FSDP2) gathered, a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def _assign(p: torch.Tensor, value: torch.Tensor) -> None:
    """p ← value, value whole: into this rank's shard where p is a DTensor (FSDP2), else in place."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    p.copy_(distribute_tensor(value, p.device_mesh, p.placements) if isinstance(p, DTensor) else value)


@contextlib.contextmanager
def as_teacher(model: nn.Module):
    """Within: every LRQATLinear computes with its float weight s0·(Φ0 − z) (no rounding, no A·B, no gradient), so
    the prepared model is its own float teacher and distillation needs no second model and no cache
    (`--kd-teacher online`). Refused where Φ0 holds only the codes (int4 at 4 bits, int8 at 8 bits)."""
    layers = list(lrqat_layers(model).values())
    coarse = sorted({f"phi {m.phi} at {m.spec.bits} bits" for m in layers if not m.holds_float_weights()})
    if coarse:
        raise UserError(f"--kd-teacher online: Φ0 must hold more than the codes to be the float teacher; got "
                        f"{', '.join(coarse)}; use --phi bf16 or --kd-teacher cache")
    for m in layers:
        m.teacher = True
    try:
        yield model
    finally:
        for m in layers:
            m.teacher = False


def lrqat_layers(model: nn.Module) -> dict[str, LRQATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LRQATLinear)}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable (A, B, s) vs everything the model holds (float params + frozen Φ0 weights counted as weights)."""
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    frozen_float = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen_int = sum(m.out_features * m.in_features for m in lrqat_layers(model).values())
    total = trainable + frozen_float + frozen_int
    return {"trainable": trainable, "total": total, "frozen_quantized_weights": frozen_int}


def frozen_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the frozen Φ0 buffers (1 per weight for int8, 0.5 for double-packed int4)."""
    return sum(m.phi0.numel() * m.phi0.element_size() for m in lrqat_layers(model).values())


def fuse(model: nn.Module, source: dict, extra: dict | None = None, spec: QuantSpec | None = None) -> IntCheckpoint:
    """Fuse every LRQATLinear into integers: W_int = clip(round(Φ0 + (α/r)AB)), fp16 scales, zero points (K grids:
    super-scales and the sub-block integers). spec: the spec the model was prepared with (a plan); None = the
    layers' own, which must be one."""
    return fuse_layers(lrqat_layers(model), model.config, model.state_dict(), source, extra, spec)


def fuse_layers(lr: dict[str, LRQATLinear], config, state_dict: dict[str, torch.Tensor], source: dict,
                extra: dict | None = None, spec: QuantSpec | None = None) -> IntCheckpoint:
    """fuse() from its parts: the LRQATLinear layers by name, the HF config and the model's full state dict (the
    float tensors are taken from it). A sharded run calls this on rank 0 with the gathered state (train/fsdp.py)."""
    if not lr:
        raise UserError("fuse: the model has no LRQATLinear layers; expected a prepared (trained) model")
    if spec is None:
        own = {m.spec for m in lr.values()}
        if len(own) != 1:
            raise UserError(f"fuse: the layers hold {len(own)} grids ({sorted(s.name for s in own)}); expected the "
                            f"plan they were prepared with (spec=)")
        spec = own.pop()
    want = plan_layer_specs(spec, {n: m.in_features for n, m in lr.items()})
    wrong = [n for n, m in lr.items() if m.spec != want[n]]
    if wrong:
        raise UserError(f"fuse: layer {wrong[0]} was trained on {lr[wrong[0]].spec.name}, expected "
                        f"{want[wrong[0]].name} under {spec.name}")
    layers = {name: m.fused_layer() for name, m in lr.items()}
    # what the adapters did: the integers that left clip(round(Φ0)), the codes the run started from (0 when the
    # scales alone trained, as PEQA; BENCHMARKS.md, "What the adapters move")
    extra = {**(extra or {}), "adapters": codes_moved((q.codes, lr[n].start_codes()) for n, q in layers.items())}
    return build_intckpt(spec, config, layers, state_dict, source, "lrqat", extra)


def codes_moved(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """How many integers differ between each (codes, start codes) pair, summed: {codes_moved, codes, fraction}.
    Pass a generator to keep one pair alive at a time."""
    moved, total = 0, 0
    for codes, start in pairs:
        moved += int((codes != start).sum())
        total += codes.numel()
    return {"codes_moved": moved, "codes": total, "fraction": moved / total if total else 0.0}
