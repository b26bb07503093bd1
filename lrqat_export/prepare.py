"""Swap a Llama-family model's projections for LRQATLinear layers (and walk them back out for fusing).

Quantized: q/k/v/o projections of self-attention and gate/up/down projections of the MLP in every decoder layer.
Kept float and frozen: token embeddings, lm_head, norms (and anything else).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import UserError
from .lrqat_linear import LRQATLinear
from .quant import QuantSpec

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Module paths inside one decoder layer that get quantized (HF naming, the same in all three architectures).
QUANTIZED_PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def architecture_of(model: nn.Module) -> str:
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"model architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the projections to quantize, in model order."""
    architecture_of(model)
    n_layers = len(model.model.layers)
    return [f"model.layers.{i}.{p}" for i in range(n_layers) for p in QUANTIZED_PROJECTIONS]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def prepare(
    model: nn.Module, spec: QuantSpec, rank: int = 32, alpha: float = 1.0, phi: str = "int8",
    range_method: str = "lp", checkpointing: bool = True, init=None,
) -> nn.Module:
    """In place: freeze everything, then replace each projection by LRQATLinear.from_linear. Returns the model.

    Every layer is validated before any is replaced, so a bad spec leaves the model untouched.
    init: an IntCheckpoint of the same model and spec (e.g. the RTN baseline) whose scales and zero points start
    the training instead of a new range search.
    """
    names = quantized_layer_names(model)
    if init is not None and (init.spec != spec or set(init.layers) != set(names)):
        raise UserError(f"prepare: init checkpoint has spec {init.spec.name} and {len(init.layers)} layers; "
                        f"expected spec {spec.name} and {len(names)} layers")
    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise UserError(f"layer {name}: expected nn.Linear, got {type(lin).__name__} (already prepared?)")
        spec.check_layer(name, lin.in_features)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        lin = model.get_submodule(name)
        q = None if init is None else init.layers[name]
        _set_module(model, name, LRQATLinear.from_linear(
            lin, spec, rank, alpha, phi, range_method, checkpointing, name=name,
            init=None if q is None else (q.scales, q.zeros)))
    log.info("prepared %d layers with %s, r=%d, alpha=%g, phi=%s", len(names), spec.name, rank, alpha, phi)
    return model


def lrqat_layers(model: nn.Module) -> dict[str, LRQATLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LRQATLinear)}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


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


@torch.no_grad()
def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    for m in lrqat_layers(model).values():
        m.checkpointing = enabled
