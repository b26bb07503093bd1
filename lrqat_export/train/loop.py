"""The training loop (every method's) with periodic checkpoints and exact resume.

The loss on fixed-length windows is next-token cross-entropy, distillation from the float model or a mix
(train/objective.py); AdamW (β = 0.9, 0.95) over the method's parameter groups (methods.registry;
LR-QAT: A and B at lr 1e-3, scales at 1e-5, the paper's values); linear warmup then linear decay to zero;
gradient-norm clip 1.0; optional bf16 autocast.

Exact resume: the data order is a function of (seed, sample index) only — epoch e is a permutation drawn from a
generator seeded with seed + e — so the data position is just the step counter. A checkpoint holds the trainable
tensors (A, B, s), the optimizer and scheduler state, the torch RNG state and the step; the frozen Φ0 is rebuilt
deterministically from the source model. A run resumed from any checkpoint ends with the same weights, bit for
bit, as an uninterrupted one. Checkpoints are written atomically (temp dir + rename), so `kill -9` at any moment
leaves the previous complete checkpoint.

Under torchrun (`dist` given, see train/dist.py and train/fsdp.py) the model is FSDP2-sharded: batch_size is the
global batch and rank r trains on slice r of the same global windows; checkpoints are sharded DCP directories
(state.json "format": "dcp") that any number of ranks — or one plain process — can resume from; a one-process
checkpoint resumes sharded too.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError
from ..core.quant import QuantSpec
from ..core.fsio import write_json
from ..methods import registry
from ..methods.common import MethodOptions, trainable_parameters
from ..methods.registry import ParamGroup
from . import dist as D
from . import objective
from .config import INIT_STEPS, TrainConfig
from .fsdp import clip_grad_norm_ as fsdp_clip_grad_norm_
from .memory import gather_memory, reset_peak_rss
from .state import CKPT_DIR, load_train_state, save_train_state

log = logging.getLogger(__name__)


def batch_indices(step: int, batch_size: int, n_windows: int, seed: int) -> torch.Tensor:
    """Window indices of optimizer step `step` (0-based): a pure function of its arguments."""
    idx = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + epoch))
        idx.append(int(perm[pos]))
    return torch.tensor(idx, dtype=torch.long)


def lr_lambda(cfg: TrainConfig):
    """The learning rate's factor at each step: linear warmup over `warmup_fraction` of the steps, then
    `schedule`: linear decay to zero at `steps` (the paper's), cosine decay to zero, or constant."""
    warm = max(1, int(round(cfg.steps * cfg.warmup_fraction)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        left = max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))  # 1 at the end of warmup, 0 at `steps`
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * left))
        return 1.0 if cfg.schedule == "constant" else left

    return f


def make_optimizer(model: nn.Module, cfg: TrainConfig, groups: list[ParamGroup] | None = None,
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the model's trainable parameters, split into `groups` by name suffix (default: LR-QAT's, at
    `cfg`'s learning rates). Every trainable parameter must fall in exactly one group; a group with lr 0 is frozen
    instead."""
    params = trainable_parameters(model)
    if groups is None:
        cfg = cfg.resolved("lrqat")
        groups = registry.param_groups("lrqat", cfg.hyper())
    members = {name: [n for n in params if n.endswith(suffixes)] for name, suffixes, _, _ in groups}
    other = set(params) - {n for ns in members.values() for n in ns}
    if other:
        expected = "/".join(s for _, suffixes, _, _ in groups for s in suffixes)
        raise UserError(f"train: unexpected trainable parameters {sorted(other)[:3]}; expected only {expected}")
    if not any(members.values()):
        raise UserError(f"train: no trainable parameters match the groups {[g[0] for g in groups]}; expected a "
                        f"prepared model (call the method's prepare() first)")
    opt_groups = []
    for name, _, lr, wd in groups:
        ps = [params[n] for n in members[name]]
        if ps and lr > 0:
            opt_groups.append({"params": ps, "lr": lr, "weight_decay": wd, "name": name})
        else:
            for p in ps:
                p.requires_grad_(False)
    if not opt_groups:
        raise UserError(f"train: every parameter group has lr 0 ({[(g[0], g[2]) for g in groups]}); nothing to train")
    opt = torch.optim.AdamW(opt_groups, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def enable_layer_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer (HF's, non-reentrant): only each layer's input is kept for
    backward and the layer's forward runs again there. Recomputation repeats the same operations on the same
    inputs, so losses, gradients and the fused integers are unchanged (tests: bit for bit); the memory of the
    activations falls to about one layer's, at the cost of a second forward."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"--checkpoint-layers: expected a model that supports gradient checkpointing, got "
                        f"{type(model).__name__}")
    # transformers 5.2x renamed it (the old name warns); older releases have gradient_checkpointing_enable only
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def model_spec(model: nn.Module) -> QuantSpec | None:
    """The grid of the prepared model's first quantized layer (the preset's; a mixed K preset such as Q4_K_M gives
    its main grid or the other, both K grids with the same defaults), None for a model without any (float LoRA)."""
    return next((m.spec for m in model.modules() if isinstance(getattr(m, "spec", None), QuantSpec)), None)


def train(model: nn.Module, train_windows: torch.Tensor, cfg: TrainConfig, out: str | Path | None = None,
          resume: bool = False, progress: bool = True, stop_after: int | None = None,
          dist: D.Dist | None = None, method: str = "lrqat", opts: MethodOptions | None = None,
          desc: str | None = None, teacher: objective.TeacherCache | None = None,
          recipe: str = registry.DEFAULT_RECIPE, spec: QuantSpec | None = None) -> list[dict]:
    """Train the prepared model in place. Returns the history [{step, loss, lr, tokens_per_s}, ...].

    out: directory for checkpoints (out/train_state) and train_log.json; None = no checkpoints.
    stop_after: return after this many total steps (an interruption, for tests); the run can be resumed.
    dist: this rank under torchrun, the model already sharded (train/fsdp.shard); None = one plain process.
    method: which method's parameter groups and default learning rates (methods.registry) the optimizer uses;
    opts: its resolved options (full-qat reads lr_weight from them); recipe: which named set of defaults fills the
    unset ones.
    teacher: the float model's top-k targets on the training windows (objective.build_teacher_cache), needed by the
    kl and mix objectives.
    spec: the grid the model was prepared on, whose grid-dependent defaults fill the unset options
    (registry.Method.grid_defaults); None = the grid of the model's quantized layers.
    """
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume and out is None:
        raise UserError("--resume needs an output directory holding a checkpoint")
    model.train()
    if cfg.checkpoint_layers:
        enable_layer_checkpointing(model)
    spec = spec if spec is not None else model_spec(model)
    cfg = cfg.resolved(method, recipe, spec)
    opts = registry.resolve_options(method, opts, recipe, spec)
    if cfg.objective != "ce" and teacher is None:
        raise UserError(f"objective {cfg.objective}: expected the teacher's targets (objective.build_teacher_cache on "
                        f"the float model before prepare), got none")
    opt, sched = make_optimizer(model, cfg, registry.param_groups(method, cfg.hyper(opts)))
    torch.manual_seed(cfg.seed)
    step, history = (load_train_state(out, model, opt, sched, cfg, dist) if resume else (0, []))
    params = [p for g in opt.param_groups for p in g["params"]]
    device = params[0].device if dist is None else dist.device
    n_windows, seq_len = train_windows.shape
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
    D.check_batch(cfg.batch_size, cfg.grad_accum, world)
    per_rank = cfg.batch_size // world  # this rank's slice of the global batch
    micro = per_rank // cfg.grad_accum

    def rank_slice(s: int) -> torch.Tensor:  # step s's windows that this rank trains on (the data init too)
        return batch_indices(s, cfg.batch_size, n_windows, cfg.seed)[rank * per_rank:(rank + 1) * per_rank]

    tokens_per_step = cfg.batch_size * seq_len
    peak_before = reset_peak_rss() if dist is not None else None
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=desc or ("LR-QAT" if method == "lrqat" else method),
                   unit="step", dynamic_ncols=True)
    data_init = registry.get(method).data_init
    if step == 0 and data_init is not None and opts.ab_init not in (None, "lora"):
        def init_loss(mb, mb_idx):
            with torch.autocast(device_type=mb.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                return objective.loss(model, mb, cfg.objective, teacher, mb_idx, cfg.ce_weight, cfg.kd_layer,
                                      cfg.kd_layer_target)

        # the first steps' windows (the teacher's cache holds exactly those), this rank's slice of each, in the
        # micro-batches the steps themselves will take
        first = ([(train_windows[i].to(device), i) for i in rank_slice(s).split(micro)]
                 for s in range(min(INIT_STEPS, cfg.steps)))
        gather = None if dist is None else functools.partial(D.all_gather_cat, d=dist)  # all ranks, rank order
        data_init(model, opts, first, init_loss, gather)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    while step < end:
        t0 = time.perf_counter()
        idx = rank_slice(step)
        batch = train_windows[idx].to(device)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i, (mb, mb_idx) in enumerate(zip(batch.split(micro), idx.split(micro))):
            if dist is not None:  # reduce-scatter gradients once per step, after the last micro-batch
                model.set_requires_gradient_sync(i == cfg.grad_accum - 1)
            with torch.autocast(device_type=mb.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = objective.loss(model, mb, cfg.objective, teacher, mb_idx, cfg.ce_weight,
                                      cfg.kd_layer, cfg.kd_layer_target) / cfg.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        if dist is not None:
            loss_sum = D.all_reduce_mean(loss_sum, dist)  # the same loss on every rank: they stop together
        gnorm = (float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if dist is None
                 else fsdp_clip_grad_norm_(params, cfg.grad_clip))
        if not (math.isfinite(loss_sum) and math.isfinite(gnorm)):  # checked before the update touches anything
            what = f"loss {loss_sum}" if not math.isfinite(loss_sum) else f"gradient norm {gnorm} (loss {loss_sum})"
            raise UserError(f"training: expected a finite loss and gradient, got {what} at step {step + 1}; stopped "
                            f"without updating, the last good checkpoint is kept in "
                            f"{out / CKPT_DIR if out else '(none: no output directory)'}")
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        dt = time.perf_counter() - t0
        history.append({"step": step, "loss": loss_sum, "lr": lr, "grad_norm": gnorm,
                        "tokens_per_s": tokens_per_step / dt})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_step / dt:.0f}")
        if out is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps):
            save_train_state(out, model, opt, sched, step, cfg, history, dist)
    if bar is not None:
        bar.close()
    log_extra = {}
    if dist is not None:
        log_extra = {"world_size": world, "memory_per_rank": gather_memory(model, opt, dist, peak_before)}
    if out is not None and rank == 0:
        write_json(out / "train_log.json", {"config": dataclasses.asdict(cfg), **log_extra, "history": history})
    model.eval()
    return history
