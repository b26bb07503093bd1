"""Resumable training state: OUT/train_state/step-N/ directories and the latest.json that names the newest one.

A one-process checkpoint holds the trainable tensors (A, B, s; trainable.safetensors), the optimizer and scheduler
state and the torch RNG state (optim.pt, read with weights_only=True) and state.json (step, config, history); the
frozen Φ0 is rebuilt deterministically from the source model. Sharded runs write DCP directories (train/dcp.py).
Each step directory is built under a temp name and renamed, then latest.json is replaced atomically: a kill at any
instant leaves latest.json naming a complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.fsio import atomic_dir, write_json
from ..methods.common import trainable_parameters
from . import dcp
from .config import TrainConfig
from .dist import Dist
from .dist import barrier as dist_barrier

log = logging.getLogger(__name__)

CKPT_DIR = "train_state"
RESUME_MAY_CHANGE = ("ckpt_every", "grad_accum", "checkpoint_layers")  # they change memory/time, not the numbers


def latest_checkpoint(out: str | Path) -> Path | None:
    """The complete checkpoint directory named by OUT/train_state/latest.json, or None."""
    d = Path(out) / CKPT_DIR
    try:
        name = json.loads((d / "latest.json").read_text())["dir"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return d / name if (d / name / "state.json").is_file() else None


def save_train_state(out: Path, model, opt, sched, step: int, cfg: TrainConfig, history: list,
                     dist: Dist | None = None) -> None:
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
        dcp.save_dcp(step_dir, model, opt, sched, meta, dist)
        if dist.is_main:
            write_json(d / "latest.json", {"step": step, "dir": step_dir.name})
            dcp.remove_older(d, step_dir.name)
        dist_barrier(dist)
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
    dcp.remove_older(d, step_dir.name)


def load_train_state(out: Path, model, opt, sched, cfg: TrainConfig,
                     dist: Dist | None = None) -> tuple[int, list]:
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
    # a field added after the checkpoint was written counts as its default there
    diff = {k: (saved.get(k, TrainConfig.field_default(k)), v) for k, v in mine.items()
            if k not in RESUME_MAY_CHANGE and saved.get(k, TrainConfig.field_default(k)) != v}
    if diff:
        raise UserError(f"--resume: training options differ from the checkpoint's (saved, now): {diff}")
    if state.get("format") == dcp.DCP_FORMAT or dist is not None:
        try:
            if state.get("format") == dcp.DCP_FORMAT:  # sharded checkpoint: any world size, or one process
                dcp.load_dcp(d, model, opt, sched)
            else:  # a one-process checkpoint, resumed sharded
                dcp.load_plain(d, model, opt, sched)
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
