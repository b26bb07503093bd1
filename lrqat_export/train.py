"""LR-QAT training loop with periodic checkpoints and exact resume.

Causal-LM loss on fixed-length windows; AdamW (β = 0.9, 0.95, no weight decay) with two parameter groups —
A and B at lr 1e-3, scales at 1e-5 (the paper's values); linear warmup then linear decay to zero; gradient-norm
clip 1.0; optional bf16 autocast.

Exact resume: the data order is a function of (seed, sample index) only — epoch e is a permutation drawn from a
generator seeded with seed + e — so the data position is just the step counter. A checkpoint holds the trainable
tensors (A, B, s), the optimizer and scheduler state, the torch RNG state and the step; the frozen Φ0 is rebuilt
deterministically from the source model. A run resumed from any checkpoint ends with the same weights, bit for
bit, as an uninterrupted one. Checkpoints are written atomically (temp dir + rename), so `kill -9` at any moment
leaves the previous complete checkpoint.

Under torchrun (`dist` given, see distributed.py) the model is FSDP2-sharded: batch_size is the global batch and
rank r trains on slice r of the same global windows; checkpoints are sharded DCP directories (state.json "format":
"dcp") that any number of ranks — or one plain process — can resume from; a one-process checkpoint resumes
sharded too.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .errors import UserError
from .fsio import atomic_dir, write_json
from .prepare import trainable_parameters

log = logging.getLogger(__name__)

CKPT_DIR = "train_state"
RESUME_MAY_CHANGE = ("ckpt_every", "grad_accum", "checkpoint_layers")  # they change memory/time, not the numbers


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 2  # windows per optimizer step (per micro-batch × grad_accum)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr_ab: float = 1e-3  # paper: A, B
    lr_scale: float = 1e-5  # paper: scales
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


def batch_indices(step: int, batch_size: int, n_windows: int, seed: int) -> torch.Tensor:
    """Window indices of optimizer step `step` (0-based): a pure function of its arguments."""
    idx = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + epoch))
        idx.append(int(perm[pos]))
    return torch.tensor(idx, dtype=torch.long)


def lr_lambda(cfg: TrainConfig):
    warm = max(1, int(round(cfg.steps * cfg.warmup_fraction)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))

    return f


# One optimizer parameter group: (name, parameter-name suffixes it takes, lr, weight decay).
ParamGroup = tuple[str, tuple[str, ...], float, float]


def lrqat_groups(cfg: TrainConfig) -> list[ParamGroup]:
    """LR-QAT's groups (the paper's): A and B at lr_ab, the scales at lr_scale."""
    return [("ab", ("lora_A", "lora_B"), cfg.lr_ab, cfg.weight_decay),
            ("scale", (".scale",), cfg.lr_scale, cfg.weight_decay)]


def make_optimizer(model: nn.Module, cfg: TrainConfig, groups: list[ParamGroup] | None = None,
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the model's trainable parameters, split into `groups` by name suffix (default: LR-QAT's).
    Every trainable parameter must fall in exactly one group; a group with lr 0 is frozen instead."""
    params = trainable_parameters(model)
    default = groups is None
    groups = lrqat_groups(cfg) if default else groups
    members = {name: [n for n in params if n.endswith(suffixes)] for name, suffixes, _, _ in groups}
    other = set(params) - {n for ns in members.values() for n in ns}
    if other:
        expected = "/".join(s for _, suffixes, _, _ in groups for s in suffixes)
        raise UserError(f"train: unexpected trainable parameters {sorted(other)[:3]}; expected only {expected}")
    if default and not members["ab"]:
        raise UserError("train: the model has no LR-QAT adapters; call prepare() first")
    if not default and not any(members.values()):
        raise UserError(f"train: no trainable parameters match the groups {[g[0] for g in groups]}")
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


def latest_checkpoint(out: str | Path) -> Path | None:
    """The complete checkpoint directory named by OUT/train_state/latest.json, or None."""
    d = Path(out) / CKPT_DIR
    try:
        name = json.loads((d / "latest.json").read_text())["dir"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return d / name if (d / name / "state.json").is_file() else None


def save_train_state(out: Path, model, opt, sched, step: int, cfg: TrainConfig, history: list,
                     dist: distributed.Dist | None = None) -> None:
    """OUT/train_state/step-N/ (built under a temp name, renamed), then latest.json is replaced atomically to point
    at it, then older step dirs are removed: a kill at any instant leaves latest.json naming a complete checkpoint.
    Sharded runs write a DCP directory (every rank its shards; rank 0 the rest)."""
    from safetensors.torch import save_file

    d = out / CKPT_DIR
    step_dir = d / f"step-{step:08d}"
    if dist is not None:
        if dist.is_main:
            d.mkdir(exist_ok=True)
        meta = {"step": step, "config": dataclasses.asdict(cfg), "history": history, "world_size": dist.world_size}
        distributed.save_dcp(step_dir, model, opt, sched, meta, dist)
        if dist.is_main:
            write_json(d / "latest.json", {"step": step, "dir": step_dir.name})
            distributed.remove_older(d, step_dir.name)
        distributed.barrier(dist)
        return
    d.mkdir(exist_ok=True)
    with atomic_dir(step_dir, overwrite=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model).items()},
                  str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "config": dataclasses.asdict(cfg), "history": history}, indent=1))
    write_json(d / "latest.json", {"step": step, "dir": step_dir.name})
    distributed.remove_older(d, step_dir.name)


def load_train_state(out: Path, model, opt, sched, cfg: TrainConfig,
                     dist: distributed.Dist | None = None) -> tuple[int, list]:
    from safetensors.torch import load_file

    d = latest_checkpoint(out)
    if d is None:  # killed before its first checkpoint: nothing to restore, so the run starts from step 0
        log.warning("--resume: no checkpoint in %s yet; starting from step 0", out / CKPT_DIR)
        return 0, []
    try:
        state = json.loads((d / "state.json").read_text())
        saved, step, history = state["config"], int(state["step"]), list(state["history"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--resume: checkpoint {d / 'state.json'} is corrupted ({type(e).__name__}: {e})") from None
    mine = dataclasses.asdict(cfg)
    # ckpt_every and grad_accum may change on resume: the global batch (batch_size) stays, only its split into
    # micro-batches does (e.g. resuming a 2-rank run on 1 rank with twice the accumulation).
    diff = {k: (saved.get(k), v) for k, v in mine.items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v}
    if diff:
        raise UserError(f"--resume: training options differ from the checkpoint's (saved, now): {diff}")
    if state.get("format") == distributed.DCP_FORMAT or dist is not None:
        try:
            if state.get("format") == distributed.DCP_FORMAT:  # sharded checkpoint: any world size, or one process
                distributed.load_dcp(d, model, opt, sched)
            else:  # a one-process checkpoint, resumed sharded
                distributed.load_plain(d, model, opt, sched)
        except UserError:
            raise
        except Exception as e:  # torch.distributed.checkpoint / safetensors: missing or corrupted shard files
            raise UserError(f"--resume: checkpoint {d} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None
        return step, history
    try:
        tensors = load_file(str(d / "trainable.safetensors"))
    except Exception as e:  # safetensors' parser: truncated or corrupted file
        raise UserError(f"--resume: checkpoint {d / 'trainable.safetensors'} is unreadable "
                        f"({type(e).__name__}: {str(e)[:200]})") from None
    params = trainable_parameters(model)
    if set(tensors) != set(params):
        raise UserError(f"--resume: checkpoint tensors do not match the prepared model "
                        f"({len(tensors)} vs {len(params)}); was it prepared with the same spec/rank?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.device))
    try:  # weights_only: the unpickler accepts tensors and plain containers, never code
        blob = torch.load(d / "optim.pt", weights_only=True, map_location=next(iter(params.values())).device)
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["rng"])
    except Exception as e:
        raise UserError(f"--resume: checkpoint {d / 'optim.pt'} is unreadable or does not match the optimizer "
                        f"({type(e).__name__}: {str(e)[:200]})") from None
    if blob.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    return step, history


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


def train(model: nn.Module, train_windows: torch.Tensor, cfg: TrainConfig, out: str | Path | None = None,
          resume: bool = False, progress: bool = True, stop_after: int | None = None,
          dist: distributed.Dist | None = None, groups: list[ParamGroup] | None = None,
          desc: str = "LR-QAT") -> list[dict]:
    """Train the prepared model in place. Returns the history [{step, loss, lr, tokens_per_s}, ...].

    out: directory for checkpoints (out/train_state) and train_log.json; None = no checkpoints.
    stop_after: return after this many total steps (an interruption, for tests); the run can be resumed.
    dist: this rank under torchrun, the model already sharded (distributed.shard); None = one plain process.
    groups: optimizer parameter groups (default LR-QAT's A/B + scales; the baselines pass their own).
    """
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume and out is None:
        raise UserError("--resume needs an output directory holding a checkpoint")
    model.train()
    if cfg.checkpoint_layers:
        enable_layer_checkpointing(model)
    opt, sched = make_optimizer(model, cfg, groups)
    torch.manual_seed(cfg.seed)
    step, history = (load_train_state(out, model, opt, sched, cfg, dist) if resume else (0, []))
    params = [p for g in opt.param_groups for p in g["params"]]
    device = params[0].device if dist is None else dist.device
    n_windows, seq_len = train_windows.shape
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
    distributed.check_batch(cfg.batch_size, cfg.grad_accum, world)
    per_rank = cfg.batch_size // world  # this rank's slice of the global batch
    micro = per_rank // cfg.grad_accum
    tokens_per_step = cfg.batch_size * seq_len
    peak_before = distributed.reset_peak_rss() if dist is not None else None
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    while step < end:
        t0 = time.perf_counter()
        idx = batch_indices(step, cfg.batch_size, n_windows, cfg.seed)[rank * per_rank:(rank + 1) * per_rank]
        batch = train_windows[idx].to(device)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i, mb in enumerate(batch.split(micro)):
            if dist is not None:  # reduce-scatter gradients once per step, after the last micro-batch
                model.set_requires_gradient_sync(i == cfg.grad_accum - 1)
            with torch.autocast(device_type=mb.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = model(input_ids=mb, labels=mb).loss / cfg.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        if dist is not None:
            loss_sum = distributed.all_reduce_mean(loss_sum, dist)  # the same loss on every rank: they stop together
        gnorm = (float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if dist is None
                 else distributed.clip_grad_norm_(params, cfg.grad_clip))
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
        log_extra = {"world_size": world, "memory_per_rank": distributed.gather_memory(model, opt, dist, peak_before)}
    if out is not None and rank == 0:
        write_json(out / "train_log.json", {"config": dataclasses.asdict(cfg), **log_extra, "history": history})
    model.eval()
    return history
