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
from .objective import KD_LAYER_TARGETS, KD_TEACHERS, OBJECTIVES

SCHEDULES = ("linear", "cosine", "constant")

INIT_STEPS = 4  # a data-aware start (registry data_init, e.g. LR-QAT's ab_init) looks at the first 4 steps' windows
# (all of them in a shorter run)


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
    schedule: str = "linear"  # after the warmup: linear (paper) or cosine decay to zero, or constant
    grad_clip: float = 1.0
    bf16: bool = False  # autocast the model's matmuls to bf16 (weights are still quantized in fp32)
    seed: int = 0
    ckpt_every: int = 50  # steps between checkpoints (0 = only at the end)
    checkpoint_layers: bool = False  # recompute each decoder layer's activations in backward (same numbers)
    objective: str | None = None  # ce | kl | mix (train/objective.py); None = the method's default
    kd_temperature: float = 1.0  # τ of the distillation targets (kl, mix)
    kd_topk: int = 64  # teacher tokens kept per position (the rest of its mass is one more outcome)
    kd_teacher: str = "cache"  # cache: one pre-pass of the float model; online: the model is its own teacher (lrqat)
    ce_weight: float = 0.5  # mix: weight of cross-entropy (1 − it on the KL)
    kd_layer: float = 0.0  # weight of the layers' output error against their float weights (objective.layer_terms)
    kd_layer_target: str = "input"  # input: x·W0ᵀ on the layer's own input; float: the float model's layer output

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserError(f"train {name}: expected >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise UserError(f"train batch_size {self.batch_size}: expected a multiple of grad_accum {self.grad_accum}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise UserError(f"--objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if not self.kd_temperature > 0:
            raise UserError(f"--kd-temperature: expected > 0, got {self.kd_temperature}")
        if self.kd_teacher not in KD_TEACHERS:
            raise UserError(f"--kd-teacher: expected one of {KD_TEACHERS}, got {self.kd_teacher!r}")
        if not self.kd_layer >= 0:
            raise UserError(f"--kd-layer: expected >= 0, got {self.kd_layer}")
        if self.kd_layer_target not in KD_LAYER_TARGETS:
            raise UserError(f"--kd-layer-target: expected one of {KD_LAYER_TARGETS}, got {self.kd_layer_target!r}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.kd_topk < 1:
            raise UserError(f"--kd-topk: expected >= 1, got {self.kd_topk}")
        if not 0 <= self.ce_weight <= 1:
            raise UserError(f"--ce-weight: expected a number in [0, 1], got {self.ce_weight}")

    def resolved(self, method: str = "lrqat", recipe: str = registry.DEFAULT_RECIPE, spec=None) -> TrainConfig:
        """This config with every unset learning rate and the objective taken from `method`'s defaults in
        `recipe` on the grid `spec` (methods.registry)."""
        fill = {k: registry.default(method, k, recipe, spec) for k in ("lr_ab", "lr_scale", "objective")
                if getattr(self, k) is None}
        return dataclasses.replace(self, **fill) if fill else self

    @classmethod
    def field_default(cls, name: str):
        """The default of field `name` (a checkpoint written before the field existed resumes with it)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}[name]

    def hyper(self, opts: MethodOptions | None = None) -> dict:
        """The resolved values a method's parameter groups read (registry.param_groups)."""
        return {"lr_ab": self.lr_ab, "lr_scale": self.lr_scale, "weight_decay": self.weight_decay,
                "lr_weight": None if opts is None else opts.lr_weight}
