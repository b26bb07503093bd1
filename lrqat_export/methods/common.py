"""Pieces every method's layer shares: the straight-through rounding, fp16 scales in the forward (the exactness
rule, docs/ARCHITECTURE.md), the matmul, activation checkpointing of a layer's weight construction, and the
options a method is prepared with.

`MethodOptions` carries no per-method values of its own: a field left None takes the method's default from
`methods.registry` (one spelling, one value for the CLI, the Python API and the benchmarks).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import UserError
from ..core.intckpt import IntCheckpoint
from ..core.models import quantized_layer_names
from ..core.quant import FP16_MAX, FP16_TINY, QuantSpec, plan_layer_specs

PHI_CHOICES = ("int8", "int4", "bf16", "fp32")
AB_INITS = ("lora", "act", "grad")  # LR-QAT's start of B: Kaiming | inputs' principal subspace | gradient rows


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """How a method's layers are built. None = the method's default (methods.registry.resolve_options)."""

    rank: int = 32  # adapter rank r (the paper's)
    alpha: float | None = None  # adapter scale numerator α; A·B is scaled by α/r
    phi: str | None = None  # LR-QAT frozen-weight storage (PHI_CHOICES): bf16 by default, int8 = the paper's
    # the start's scale search (core.quant.RANGE_METHODS): None = the method's default (registry: imatrix, on the
    # float model's inputs over the first training windows, where the method starts from a checkpoint and the grid
    # is grouped single-level; lp, the paper's, elsewhere and in recipe "paper")
    range_method: str | None = None
    checkpointing: bool = True  # recompute each layer's weight construction in backward
    fused: bool = True  # LR-QAT: the fused quantizer (methods/fused.py; same Ŵ, faster); False = the eager chain
    lr_weight: float | None = None  # full-qat: learning rate of the float weights
    ab_init: str | None = None  # LR-QAT: B's start — Kaiming ("lora") or data-aware ("act", "grad"; AB_INITS)

    @property
    def builder_range(self) -> str:
        """The range search a layer builder runs when no start checkpoint is given: the option, or the weight-only
        Lp search where it is unset (a builder has no data; train_method finds the imatrix start itself)."""
        return self.range_method or "lp"

    def require(self, *names: str, method: str = "method") -> None:
        """Refuse unresolved (None) fields: low-level builders take every hyperparameter explicitly."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise UserError(f"{method}: options {missing} are unset; expected values (methods.registry."
                            f"resolve_options fills each method's defaults)")


class RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def fp16_ste(s: torch.Tensor) -> torch.Tensor:
    """Value: s rounded to fp16 (exactly, see core/quant.py); gradient: identity."""
    s_c = s.clamp(FP16_TINY, FP16_MAX)
    return s_c + (s_c.to(torch.float16).to(s.dtype) - s_c).detach()


def fp16_scales(scale: torch.Tensor) -> torch.Tensor:
    """The fp16 scales a trained scale parameter stands for: the values the forward multiplied by."""
    return scale.detach().float().clamp(FP16_TINY, FP16_MAX).to(torch.float16)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x·Wᵀ + b in x's dtype (bf16 under autocast), from float32 weight and bias."""
    same = w.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)  # then no cast (each costs a dispatch)
    return F.linear(x, w, bias) if same else F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def maybe_checkpoint(enabled: bool, fn, *args):
    """fn(*args), recomputed in backward instead of keeping its weight-sized intermediates when `enabled`."""
    return checkpoint(fn, *args, use_reentrant=False) if enabled and torch.is_grad_enabled() else fn(*args)


def frozen_bias(lin: nn.Linear) -> torch.Tensor | None:
    """HF's bias (if any) as a float32 copy, kept frozen as a buffer by every method's layer."""
    return None if lin.bias is None else lin.bias.detach().float().clone()


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_linears(model: nn.Module, names: list[str], spec=None) -> None:
    """Every layer to be replaced is still an nn.Linear whose width the grid tiles (checked before any is replaced,
    so a bad spec leaves the model untouched)."""
    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise UserError(f"layer {name}: expected nn.Linear, got {type(lin).__name__} (already prepared?)")
        if spec is not None:
            spec.check_layer(name, lin.in_features)


def layer_specs(model: nn.Module, names: list[str], spec: QuantSpec) -> dict[str, QuantSpec]:
    """Each layer's own grid (a plan: llama.cpp's choice for it), every layer checked still an nn.Linear the grid
    tiles, before any is replaced."""
    check_linears(model, names)
    specs = plan_layer_specs(spec, {n: model.get_submodule(n).in_features for n in names})
    for name in names:
        specs[name].check_layer(name, model.get_submodule(name).in_features)
    return specs


def init_fields(q, spec: QuantSpec) -> tuple:
    """An init IntCheckpoint layer's starting scales as a method's from_linear takes them: (scales, zeros), or for
    a K grid (d, sc, dmin, m)."""
    return (q.scales, q.sub_scales, q.mins, q.sub_mins) if spec.is_k else (q.scales, q.zeros)


def check_init(init, spec, names: list[str], what: str) -> None:
    """An init IntCheckpoint must hold the same spec and layers as the model being prepared."""
    if init is not None and (init.spec != spec or set(init.layers) != set(names)):
        raise UserError(f"{what}: init checkpoint has spec {init.spec.name} and {len(init.layers)} layers; "
                        f"expected spec {spec.name} and {len(names)} layers")


def check_weights_fit(model, ck: IntCheckpoint) -> None:
    """Refuse an init checkpoint whose quantized layers are not the model's, or not of their shapes."""
    names = quantized_layer_names(model)
    if set(names) != set(ck.layers):
        raise UserError(f"init checkpoint {ck.path}: layers differ from the model's: "
                        f"{sorted(set(names) ^ set(ck.layers))[:5]}")
    for name in names:
        shape, want = tuple(ck.layers[name].codes.shape), tuple(model.get_submodule(name).weight.shape)
        if shape != want:
            raise UserError(f"init checkpoint {ck.path}: layer {name} has shape {shape}, expected {want}")


@torch.no_grad()
def load_weights_from(model, ck: IntCheckpoint) -> None:
    """Put s·(c − z) of `ck` into the model's projections, so a later prepare(init=ck) freezes exactly ck's codes
    (W/s = c exactly for fp16 s: a GPTQ-initialised method starts at the GPTQ model). A distillation teacher must
    be taken from the float model before this (train_method's init_weights)."""
    check_weights_fit(model, ck)
    for name in quantized_layer_names(model):
        lin = model.get_submodule(name)
        lin.weight.copy_(ck.dequantized(name).to(lin.weight.dtype))
