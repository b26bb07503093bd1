"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): any world size — or one plain process —
can load them (DCP reshards); a one-process checkpoint loads into a sharded model too."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import UserError
from ..core.fsio import atomic_dir
from .dist import Dist, barrier

DCP_FORMAT = "dcp"  # state.json "format" of a sharded checkpoint ("safetensors" is the one-process format)


def _dcp_state(model: nn.Module, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # A tied lm_head.weight slips through ignore_frozen_params (named_parameters lists the shared tensor once);
    # the frozen weights are rebuilt from the source model, so keep exactly the trainable tensors.
    return {"model": {k: v for k, v in msd.items() if k in trainable}, "optim": osd}


def save_dcp(step_dir: Path, model: nn.Module, opt, sched, meta: dict, d: Dist | None) -> None:
    """Every rank writes its shards into a temp dir beside `step_dir`; rank 0 adds state.json and the scheduler,
    then renames the dir into place (a kill leaves either no step_dir or a complete one)."""
    import torch.distributed.checkpoint as dcp

    main = d is None or d.is_main
    with atomic_dir(step_dir, overwrite=True) if main else contextlib.nullcontext(None) as tmp:
        box = [str(tmp) if main else None]
        if d is not None:
            dist.broadcast_object_list(box, src=0)
        tmp_dir = Path(box[0])
        dcp.save(_dcp_state(model, opt), checkpoint_id=str(tmp_dir))  # returns once all ranks' shards are written
        if main:
            torch.save({"scheduler": sched.state_dict()}, tmp_dir / "scheduler.pt")
            (tmp_dir / "state.json").write_text(json.dumps({**meta, "format": DCP_FORMAT}, indent=1))
    barrier(d)


def load_dcp(ckpt_dir: Path, model: nn.Module, opt, sched) -> None:
    """Load a DCP checkpoint into this (sharded or plain) model and optimizer, whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=str(ckpt_dir))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    sched.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True)["scheduler"])


def load_plain(ckpt_dir: Path, model: nn.Module, opt, sched) -> None:
    """A one-process checkpoint (trainable.safetensors + optim.pt, keyed by parameter index) into the sharded model:
    every rank reads the full tensors, set_state_dict keeps its shard."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    tensors = load_file(str(ckpt_dir / "trainable.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != trainable:
        raise UserError(f"--resume: checkpoint {ckpt_dir} holds {len(tensors)} trainable tensors, the prepared model "
                        f"{len(trainable)}; was it prepared with the same spec/rank?")
    blob = torch.load(ckpt_dir / "optim.pt", weights_only=True, map_location="cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]  # index → name, as opt.state_dict() counts
    osd = blob["optimizer"]
    full_osd = {"state": {order[i]: st for i, st in osd["state"].items()},
                "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in osd["param_groups"]]}
    set_state_dict(model, opt, model_state_dict=tensors, optim_state_dict=full_osd,
                   options=StateDictOptions(full_state_dict=True, strict=False))
    sched.load_state_dict(blob["scheduler"])


def remove_older(ckpt_root: Path, keep: str) -> None:
    """Older checkpoints, and the temp dirs and files a killed writer left behind (a step directory's, or
    latest.json's when kill -9 landed inside its write)."""
    for old in [*ckpt_root.glob("step-*"), *ckpt_root.glob(".step-*")]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for old in ckpt_root.glob(".latest.json.*.tmp"):
        old.unlink(missing_ok=True)
