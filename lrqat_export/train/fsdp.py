"""FSDP2 sharding of a prepared model, the clip that keeps one-process numerics, and the fuse on rank 0
(the design and its exactness argument: train/dist.py)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..core.errors import UserError
from ..methods.lrqat import LRQATLinear, fuse_layers, lrqat_layers
from .dist import Dist

log = logging.getLogger(__name__)


def phi0_as_parameters(model: nn.Module) -> None:
    """Re-register every LRQATLinear's Φ0 buffer as a frozen nn.Parameter (same key), so FSDP2 shards it."""
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


def fuse_on_main(model: nn.Module, source: dict, extra: dict, d: Dist, spec=None):
    """IntCheckpoint on rank 0 (None elsewhere), identical in format to a one-process fuse()."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return None
    layers = {}
    for name, m in lrqat_layers(model).items():
        plain = LRQATLinear(m.in_features, m.out_features, m.spec, rank=m.rank, alpha=m.alpha, phi=m.phi,
                            bias=m.bias is not None, checkpointing=False)
        plain.load_state_dict({k.removeprefix(f"{name}."): v for k, v in sd.items() if k.startswith(f"{name}.")})
        layers[name] = plain
    return fuse_layers(layers, model.config, sd, source, extra, spec)
