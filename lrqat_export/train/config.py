"""The training loop's options (TrainConfig): steps, batch, optimizer, schedule, precision, checkpoints.

Learning rates left unset (None) take the trained method's defaults from methods.registry (`resolved`), so a
Python caller and the CLI get the same numbers for the same method.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.errors import UserError
from ..methods import registry
from ..methods.common import MethodOptions


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 2  # windows per optimizer step (per micro-batch × grad_accum)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr_ab: float | None = None  # A, B; None = the method's default (methods.registry: 1e-3 for lrqat, the paper's)
    lr_scale: float | None = None  # scales; None = the method's default (1e-5 for lrqat, the paper's)
    beta1: float = 0.9
    beta2: float = 0.95  # paper
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1  # paper: 10 % linear warmup, then linear decay
    grad_clip: float = 1.0
    bf16: bool = False  # autocast the model's matmuls to bf16 (weights are still quantized in fp32)
    seed: int = 0
    ckpt_every: int = 50  # steps between checkpoints (0 = only at the end)
    checkpoint_layers: bool = False  # recompute each decoder layer's activations in backward (same numbers)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserError(f"train {name}: expected >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise UserError(f"train batch_size {self.batch_size}: expected a multiple of grad_accum {self.grad_accum}")

    def resolved(self, method: str = "lrqat") -> TrainConfig:
        """This config with every unset learning rate taken from `method`'s defaults (methods.registry)."""
        fill = {k: registry.default(method, k) for k in ("lr_ab", "lr_scale") if getattr(self, k) is None}
        return dataclasses.replace(self, **fill) if fill else self

    def hyper(self, opts: MethodOptions | None = None) -> dict:
        """The resolved values a method's parameter groups read (registry.param_groups)."""
        return {"lr_ab": self.lr_ab, "lr_scale": self.lr_scale, "weight_decay": self.weight_decay,
                "lr_weight": None if opts is None else opts.lr_weight}
