"""Scale-out: LR-QAT under `torchrun` with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Launch `lrqat train` under torchrun; every rank runs the same program:

    env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) ──init──▶ process group (gloo CPU, nccl CUDA)
    load + prepare the model (every rank, deterministic: same Φ0, s0 and B init everywhere)
    ──shard──▶  each decoder layer one FSDP unit, then the root (embeddings, final norm, lm_head)
    train: global batch = per-rank batch × ranks × grad_accum; rank r takes slice r of the same global windows
    ──checkpoint──▶  torch.distributed.checkpoint (DCP), sharded, resumable on any number of ranks
    ──fuse──▶  full state gathered to rank 0 (CPU), which fuses and writes the IntCheckpoint like one process.

Φ0 is frozen, but FSDP2 shards parameters only (buffers stay whole on every rank), so in distributed mode each
LRQATLinear's Φ0 buffer is re-registered as an nn.Parameter with requires_grad=False: it is then sharded row-wise
with A, B and s, and all-gathered per layer just before use (FSDP2 all-gathers mixed dtypes — int8 Φ0 beside fp32
A/B/s — through a uint8 view; only the *trainable* parameters of a unit must share a dtype). The state-dict key
stays `phi0`. The small per-group `zero` (asymmetric grids) and `bias` buffers stay replicated.

Exactness. Each rank computes the gradient of its slice; FSDP2 reduce-scatters the average. With 2 ranks a sum of
two terms does not depend on order, so a 2-rank run equals, bit for bit, one process that takes the same global
batch as 2 micro-batches of the same size (`--grad-accum 2`): the per-slice forward/backward are the same
computations on the same tensors, and (g0 + g1) / 2 == g0/2 + g1/2 in floating point. With more ranks, or against
a one-process run whose micro-batch differs in size, the summation order differs and the last bits may too.
Gradient clipping: torch's clip_grad_norm_ on DTensors sums squared shard norms, which differs from one process in
the last bit and so changes the clip factor whenever clipping is active; clip_grad_norm_ below takes each
gradient's norm over the whole tensor instead (one all-gather per trainable tensor per step — A, B, s are about
1 % of the weights), which keeps the 2-rank run bit-identical (tests/test_distributed.py).

RNG: training draws no random numbers (Llama has no dropout; the data order is a pure function of (seed, step),
`train.batch_indices`), so a DCP checkpoint holds the trainable state, the optimizer state and the step only.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

# torchrun sets all of these on every rank; a partial set means a launch by hand that went wrong.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DCP_FORMAT = "dcp"  # state.json "format" of a sharded checkpoint ("safetensors" is the one-process format)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo" | "nccl"
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """RANK, WORLD_SIZE or LOCAL_RANK set (MASTER_ADDR/PORT alone may come from a cluster's environment)."""
    return any(k in os.environ for k in TORCHRUN_ENV[:3])


def from_env(device: str = "cpu", backend: str = "auto") -> Dist | None:
    """The rank's place in the job from torchrun's environment, or None for an ordinary single process.
    Every wrong launch is a UserError naming what was expected and what was found."""
    present = {k: os.environ[k] for k in TORCHRUN_ENV if k in os.environ}
    if not launched_by_torchrun():
        if backend != "auto":
            raise UserError(f"--dist-backend {backend}: expected a launch by torchrun (env {', '.join(TORCHRUN_ENV)}), "
                            f"got none of these variables; run `torchrun --nproc-per-node N -m lrqat_export.cli "
                            f"train ...`")
        return None
    missing = [k for k in TORCHRUN_ENV if k not in present]
    if missing:
        raise UserError(f"distributed launch: expected all of {', '.join(TORCHRUN_ENV)} (set by torchrun), got "
                        f"{', '.join(sorted(present))} but not {', '.join(missing)}; launch with torchrun")
    try:
        rank, world, local = (int(present[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise UserError(f"distributed launch: RANK/WORLD_SIZE/LOCAL_RANK expected integers, got "
                        f"{present['RANK']!r}/{present['WORLD_SIZE']!r}/{present['LOCAL_RANK']!r}") from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local <= rank):
        raise UserError(f"distributed launch: expected 0 <= LOCAL_RANK <= RANK < WORLD_SIZE, got RANK {rank}, "
                        f"LOCAL_RANK {local}, WORLD_SIZE {world}")
    dev = torch.device(device)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise UserError(f"--dist-backend: expected auto, gloo or nccl, got {backend!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: expected CUDA GPUs, got none (torch {torch.__version__}); "
                            f"use --device cpu (backend gloo)")
        if dev.index is not None and world > 1:
            raise UserError(f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; expected --device "
                            f"cuda without an index, got index {dev.index}")
        n_gpu = torch.cuda.device_count()
        if local >= n_gpu:
            raise UserError(f"--device cuda: local rank {local} needs GPU {local}, but this node has {n_gpu} GPU(s); "
                            f"expected --nproc-per-node <= {n_gpu}")
        dev = torch.device("cuda", local if dev.index is None else dev.index)
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: distributed training supports cpu (gloo) and cuda (nccl), got {dev.type}")
    if backend == "nccl" and dev.type != "cuda":
        raise UserError(f"--dist-backend nccl: expected --device cuda (nccl runs on GPUs only), got --device {device}; "
                        f"use gloo on CPU")
    return Dist(rank, world, local, backend, dev)


@contextlib.contextmanager
def session(d: Dist | None) -> Iterator[Dist | None]:
    """Init the process group for `d` (from from_env; None = one plain process); destroy it on the way out."""
    if d is None:
        yield None
        return
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
    dist.init_process_group(d.backend, rank=d.rank, world_size=d.world_size,
                            device_id=d.device if d.device.type == "cuda" else None)
    try:
        yield d
    finally:
        dist.destroy_process_group()


def check_batch(batch_size: int, grad_accum: int, world_size: int) -> None:
    """--batch-size is the global batch: it must split evenly into ranks × micro-batches."""
    if batch_size % (world_size * grad_accum):
        raise UserError(f"--batch-size {batch_size} (global): expected a multiple of world_size × grad_accum = "
                        f"{world_size} × {grad_accum} = {world_size * grad_accum}")


def barrier(d: Dist | None) -> None:
    if d is not None:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Sharding


def phi0_as_parameters(model: nn.Module) -> None:
    """Re-register every LRQATLinear's Φ0 buffer as a frozen nn.Parameter (same key), so FSDP2 shards it."""
    from .prepare import lrqat_layers

    for m in lrqat_layers(model).values():
        phi0 = m._buffers.pop("phi0")
        m.register_parameter("phi0", nn.Parameter(phi0, requires_grad=False))


def shard(model: nn.Module, d: Dist) -> nn.Module:
    """FSDP2 in place: one unit per decoder layer, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise UserError(f"distributed training: expected torch >= 2.6 (public FSDP2 fully_shard), got torch "
                        f"{torch.__version__}") from None
    phi0_as_parameters(model)
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    log.info("rank %d/%d: FSDP2 over %d decoder layers + root, backend %s, device %s", d.rank, d.world_size,
             len(model.model.layers), d.backend, d.device)
    return model


def local_bytes(tensors) -> int:
    """Bytes this rank holds for these (possibly sharded DTensor) tensors."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        loc = t.to_local() if isinstance(t, DTensor) else t
        total += loc.numel() * loc.element_size()
    return total


def rank_memory(model: nn.Module, opt: torch.optim.Optimizer, peak_before: int | None = None) -> dict[str, int]:
    """What this rank holds: Φ0, trainable A/B/s, optimizer state, other frozen tensors; and its peak RSS: during
    training (since reset_peak_rss), before it (`peak_before`: loading, preparing, sharding) and overall."""
    named = dict(model.named_parameters())
    phi0 = [p for n, p in named.items() if n.endswith(".phi0")]
    trainable = [p for p in named.values() if p.requires_grad]
    other = [p for n, p in named.items() if not p.requires_grad and not n.endswith(".phi0")]
    optim = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    mem = {"phi0_bytes": local_bytes(phi0), "trainable_bytes": local_bytes(trainable),
           "optimizer_bytes": local_bytes(optim),
           "other_frozen_bytes": local_bytes(other) + local_bytes(model.buffers()),
           # ru_maxrss follows VmHWM, so after reset_peak_rss it is the training-phase peak too
           "peak_rss_training_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if peak_before is not None:
        mem["peak_rss_before_training_bytes"] = peak_before
        mem["peak_rss_bytes"] = max(peak_before, mem["peak_rss_training_bytes"])
    return mem


def reset_peak_rss() -> int | None:
    """Linux: hand freed heap pages back (glibc malloc_trim: the full weights dropped by sharding) and reset this
    process's VmHWM (peak RSS), so the training-phase peak can be read apart from loading and preparing.
    Returns the peak before the reset (bytes; None where /proc does not tell)."""
    import ctypes
    import gc

    before = _vm_hwm()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return before


def _vm_hwm() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def gather_memory(model: nn.Module, opt, d: Dist, peak_before: int | None = None) -> list[dict[str, int]]:
    """rank_memory of every rank (a list on every rank)."""
    out: list = [None] * d.world_size
    dist.all_gather_object(out, rank_memory(model, opt, peak_before))
    return out


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ with the numerics of one process: each gradient's norm is taken over the
    whole tensor (all-gathered one at a time, trainable tensors only), not summed from shard norms, so the clip
    factor — and the update — are the same bits as a one-process run's."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch._foreach_norm([g.full_tensor() if isinstance(g, DTensor) else g])[0] for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)
    return float(total)


def all_reduce_mean(x: float, d: Dist) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item()) / d.world_size


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint (DCP), sharded; any world size can load them (DCP reshards).


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

    from .fsio import atomic_dir

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
    """Older checkpoints, and the temp dirs a killed writer left behind."""
    for old in [*ckpt_root.glob("step-*"), *ckpt_root.glob(".step-*")]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Fuse: gather the full state to rank 0 and build plain LRQATLinear layers from it.


def fuse_on_main(model: nn.Module, source: dict, extra: dict, d: Dist):
    """IntCheckpoint on rank 0 (None elsewhere), identical in format to a one-process fuse()."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .intckpt import fuse_layers
    from .lrqat_linear import LRQATLinear
    from .prepare import lrqat_layers

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return None
    layers = {}
    for name, m in lrqat_layers(model).items():
        plain = LRQATLinear(m.in_features, m.out_features, m.spec, m.rank, m.alpha, m.phi, bias=m.bias is not None,
                            checkpointing=False)
        plain.load_state_dict({k.removeprefix(f"{name}."): v for k, v in sd.items() if k.startswith(f"{name}.")})
        layers[name] = plain
    return fuse_layers(layers, model.config, sd, source, extra)


def training_metadata(d: Dist | None) -> dict:
    return {"world_size": 1 if d is None else d.world_size, "backend": None if d is None else d.backend}

