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
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .fsio import atomic_dir, write_json
from .prepare import trainable_parameters

log = logging.getLogger(__name__)

CKPT_DIR = "train_state"


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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = trainable_parameters(model)
    ab = [p for n, p in params.items() if n.endswith(("lora_A", "lora_B"))]
    sc = [p for n, p in params.items() if n.endswith(".scale")]
    other = set(params) - {n for n in params if n.endswith(("lora_A", "lora_B", ".scale"))}
    if other:
        raise UserError(f"train: unexpected trainable parameters {sorted(other)[:3]}; expected only lora_A/lora_B/scale")
    if not ab:
        raise UserError("train: the model has no LR-QAT adapters; call prepare() first")
    groups = [{"params": ab, "lr": cfg.lr_ab, "name": "ab"}]
    if sc and cfg.lr_scale > 0:
        groups.append({"params": sc, "lr": cfg.lr_scale, "name": "scale"})
    else:
        for p in sc:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def latest_checkpoint(out: str | Path) -> Path | None:
    """The complete checkpoint directory named by OUT/train_state/latest.json, or None."""
    d = Path(out) / CKPT_DIR
    try:
        name = json.loads((d / "latest.json").read_text())["dir"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return d / name if (d / name / "state.json").is_file() else None


def save_train_state(out: Path, model, opt, sched, step: int, cfg: TrainConfig, history: list) -> None:
    """OUT/train_state/step-N/ (built under a temp name, renamed), then latest.json is replaced atomically to point
    at it, then older step dirs are removed: a kill at any instant leaves latest.json naming a complete checkpoint."""
    from safetensors.torch import save_file

    d = out / CKPT_DIR
    d.mkdir(exist_ok=True)
    step_dir = d / f"step-{step:08d}"
    with atomic_dir(step_dir, overwrite=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model).items()},
                  str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "config": dataclasses.asdict(cfg), "history": history}, indent=1))
    write_json(d / "latest.json", {"step": step, "dir": step_dir.name})
    for old in [*d.glob("step-*"), *d.glob(".step-*")]:  # older checkpoints, and temp dirs of a killed writer
        if old.name != step_dir.name:
            shutil.rmtree(old, ignore_errors=True)


def load_train_state(out: Path, model, opt, sched, cfg: TrainConfig) -> tuple[int, list]:
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
    diff = {k: (saved.get(k), v) for k, v in mine.items() if k != "ckpt_every" and saved.get(k) != v}
    if diff:
        raise UserError(f"--resume: training options differ from the checkpoint's (saved, now): {diff}")
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


def train(model: nn.Module, train_windows: torch.Tensor, cfg: TrainConfig, out: str | Path | None = None,
          resume: bool = False, progress: bool = True, stop_after: int | None = None) -> list[dict]:
    """Train the prepared model in place. Returns the history [{step, loss, lr, tokens_per_s}, ...].

    out: directory for checkpoints (out/train_state) and train_log.json; None = no checkpoints.
    stop_after: return after this many total steps (an interruption, for tests); the run can be resumed.
    """
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume and out is None:
        raise UserError("--resume needs an output directory holding a checkpoint")
    model.train()
    opt, sched = make_optimizer(model, cfg)
    torch.manual_seed(cfg.seed)
    step, history = (load_train_state(out, model, opt, sched, cfg) if resume else (0, []))
    params = [p for g in opt.param_groups for p in g["params"]]
    device = params[0].device
    n_windows, seq_len = train_windows.shape
    micro = cfg.batch_size // cfg.grad_accum
    tokens_per_step = cfg.batch_size * seq_len
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="LR-QAT", unit="step", dynamic_ncols=True)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    while step < end:
        t0 = time.perf_counter()
        batch = train_windows[batch_indices(step, cfg.batch_size, n_windows, cfg.seed)].to(device)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for mb in batch.split(micro):
            with torch.autocast(device_type=mb.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = model(input_ids=mb, labels=mb).loss / cfg.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
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
            save_train_state(out, model, opt, sched, step, cfg, history)
    if bar is not None:
        bar.close()
    if out is not None:
        write_json(out / "train_log.json", {"config": dataclasses.asdict(cfg), "history": history})
    model.eval()
    return history
