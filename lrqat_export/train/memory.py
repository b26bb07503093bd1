"""What one rank holds in memory: Φ0, trainable tensors, optimizer state, and peak RSS apart from loading."""
from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .dist import Dist


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


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
