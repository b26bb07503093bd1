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
import re
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
STEP_DIR = re.compile(r"step-(\d+)")  # the name of one checkpoint directory under CKPT_DIR
RESUME_MAY_CHANGE = ("ckpt_every", "grad_accum", "checkpoint_layers")  # they change memory/time, not the numbers


def _step_of(name: str) -> int | None:
    """N of a step directory's name "step-N"; None for any other name (temp dirs, a hostile latest.json)."""
    m = STEP_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


def is_complete(step_dir: Path) -> bool:
    """A step directory a resume can load: state.json holds an object with an integer step, and the files of its
    format (one-process or DCP) are there."""
    try:
        state = json.loads((step_dir / "state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    need = (".metadata", "scheduler.pt") if state.get("format") == dcp.DCP_FORMAT else ("trainable.safetensors",
                                                                                       "optim.pt")
    return all((step_dir / n).is_file() for n in need)


def _named_by_latest(d: Path) -> Path | None:
    """The step directory latest.json names, when latest.json is readable and the directory has its state.json."""
    try:
        name = json.loads((d / "latest.json").read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(name, str) or _step_of(name) is None:
        return None
    return d / name if (d / name / "state.json").is_file() else None


def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint a resume continues from: the step directory OUT/train_state/latest.json names; where
    latest.json is missing, unreadable or names no checkpoint, the newest complete step directory (with a warning).
    None when there is no checkpoint at all (a run killed before its first one). A resume never starts over beside
    a checkpoint it could not read: latest.json or step directories with no complete one among them are a
    UserError (starting over would delete them at the first save)."""
    d = Path(out) / CKPT_DIR
    named = _named_by_latest(d)
    if named is not None:
        return named
    steps = sorted((p for p in d.glob("step-*") if p.is_dir() and _step_of(p.name) is not None),
                   key=lambda p: _step_of(p.name), reverse=True)
    complete = next((p for p in steps if is_complete(p)), None)
    latest = d / "latest.json"
    if complete is not None:
        log.warning("--resume: %s does not name a complete checkpoint; resuming from the newest complete one, %s",
                    latest, complete)
        return complete
    if steps or latest.exists():
        raise UserError(f"--resume {d}: expected a complete step-N directory (state.json, tensors, optimizer state), "
                        f"got none among {[p.name for p in steps][:3]} and latest.json "
                        f"{'naming none' if latest.exists() else 'missing'}; refusing to start over beside them "
                        f"(move {d} aside to start from step 0)")
    return None


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
