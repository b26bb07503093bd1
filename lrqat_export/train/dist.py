"""Scale-out: LR-QAT under `torchrun` with FSDP2 (`torch.distributed.fsdp.fully_shard`). This module: the launch
(torchrun's environment → Dist), the process group and the collectives the loop uses; sharding and the sharded
fuse are in train/fsdp.py, sharded checkpoints in train/dcp.py, per-rank memory in train/memory.py.

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
import gc
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..core.errors import UserError

log = logging.getLogger(__name__)

# torchrun sets all of these on every rank; a partial set means a launch by hand that went wrong.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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
        # free the job's reference cycles (FSDP2's hooks hold the sharded model) while the interpreter and the
        # group are alive: tensors still held by gloo's work objects and freed only at interpreter finalization can
        # abort the process (pytorch/pytorch#179291). One CI run saw rank 1 end with SIGABRT after training; this
        # is a likely cause, not a proven one (it did not recur in six reruns)
        gc.collect()
        dist.destroy_process_group()


def check_batch(batch_size: int, grad_accum: int, world_size: int) -> None:
    """--batch-size is the global batch: it must split evenly into ranks × micro-batches."""
    if batch_size % (world_size * grad_accum):
        raise UserError(f"--batch-size {batch_size} (global): expected a multiple of world_size × grad_accum = "
                        f"{world_size} × {grad_accum} = {world_size * grad_accum}")


def barrier(d: Dist | None) -> None:
    if d is not None:
        dist.barrier()


def all_reduce_mean(x: float, d: Dist) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t.item()) / d.world_size


def all_gather_cat(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's t (same shape everywhere), concatenated along dim 0 in rank order."""
    parts = [torch.empty_like(t) for _ in range(d.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def training_metadata(d: Dist | None) -> dict:
    return {"world_size": 1 if d is None else d.world_size, "backend": None if d is None else d.backend}

