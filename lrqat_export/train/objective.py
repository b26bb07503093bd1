"""Training objectives: next-token cross-entropy, distillation from the source float model, or a mix.

    ce    mean next-token cross-entropy on the training text (what the loop always did)
    kl    τ² · KL(teacher_τ ‖ student_τ) per next-token position, averaged: the student is trained to reproduce the
          float model's distribution, not to adapt to the training text (Gemma 3 QAT, NVIDIA's QAD)
    mix   ce_weight · ce + (1 − ce_weight) · kl
and, with --kd-layer λ > 0 (LR-QAT with a Φ0 finer than the codes), + λ · the mean over quantized layers of each
layer's output error against its own float weight on the same input (`layer_terms`).

The teacher is the source float model itself, run once before the model is prepared: a no-grad pre-pass over every
window the run will draw keeps, per position, the teacher's top-k log-probabilities (at temperature τ) and the
log of the probability mass outside them. Training then needs no second model in memory — the 7B-on-24 GB budget is
unchanged — and a resumed run recomputes the same cache (the pre-pass is deterministic).

KL against a top-k teacher ("top-k plus the rest of the mass"): with p_i the teacher's probabilities on its top-k
tokens, p_r = 1 − Σ p_i the rest, and q the student's (same τ),

    KL = Σ_i p_i (log p_i − log q_i) + p_r (log p_r − log q_r),      q_r = 1 − Σ_i q_i

the exact KL between the two distributions coarsened to k + 1 outcomes (a lower bound of the full-vocabulary KL that
is tight when the rest mass is small; `TeacherCache.rest_mass` reports how small it was).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import UserError
from ..core.models import eval_mode

log = logging.getLogger(__name__)

OBJECTIVES = ("ce", "kl", "mix")
KD_TEACHERS = ("cache", "online")  # where the distillation targets come from (TrainConfig.kd_teacher)
KD_LAYER_TARGETS = ("input", "float")  # what a layer's --kd-layer term compares with (layer_terms)


@dataclass
class TeacherCache:
    """Per training window w (a row of the windows tensor): top-k token ids and log-probabilities of the teacher at
    every next-token position (T − 1 of them), and the log of the remaining mass."""

    ids: dict[int, torch.Tensor]  # window → (T − 1, k) int32
    logp: dict[int, torch.Tensor]  # window → (T − 1, k) float32
    log_rest: dict[int, torch.Tensor]  # window → (T − 1,) float32
    topk: int
    temperature: float

    @property
    def rest_mass(self) -> float:
        """Mean teacher probability outside the cached top-k (0 = the cache is the whole distribution)."""
        r = torch.cat([v.exp() for v in self.log_rest.values()])
        return float(r.mean()) if r.numel() else 0.0

    def targets(self, batch: torch.Tensor, idx: torch.Tensor, device):
        """(ids, log p, log p_rest) of the windows `idx` (the tokens `batch` are already known to the cache)."""
        return self.batch(idx, device)

    def batch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ks = [int(i) for i in idx]
        return (torch.stack([self.ids[k] for k in ks]).to(device).long(),
                torch.stack([self.logp[k] for k in ks]).to(device),
                torch.stack([self.log_rest[k] for k in ks]).to(device))


@dataclass
class OnlineTeacher:
    """The teacher computed at every step by the model being trained, switched to its float weights by `mode`
    (methods.registry `teacher_mode`; LR-QAT's Φ0 and initial scales give the float weights back): no second model,
    no cache, one more no-grad forward per step (`--kd-teacher online`)."""

    model: torch.nn.Module
    mode: object  # (model) -> context manager
    topk: int
    temperature: float

    def targets(self, batch: torch.Tensor, idx: torch.Tensor, device):
        with torch.no_grad(), self.mode(self.model):
            logits = self.model(input_ids=batch).logits[:, :-1]
        ids, logp, rest = topk_targets(logits, self.topk, self.temperature)
        return ids.to(device).long(), logp.to(device), rest.to(device)


def cache_bytes(n_windows: int, seq_len: int, topk: int) -> int:
    """Host memory of a TeacherCache: per next-token position k int32 ids, k fp32 log-probs and one fp32 rest."""
    return n_windows * (seq_len - 1) * (topk * 8 + 4)


def check_cache_fits(need: int, available: int, method: str) -> None:
    """Refuse a teacher cache larger than half the available host memory, before the pre-pass spends its time."""
    if need > available // 2:
        alt = "--kd-teacher online (the model is its own teacher), " if method == "lrqat" else ""
        raise UserError(f"teacher cache: expected at most half the available memory ({available / 2**30:.1f} GiB), "
                        f"got {need / 2**30:.1f} GiB for this run's windows; use {alt}a smaller --kd-topk, fewer "
                        f"steps, or --objective ce")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends, in value and in gradient: each branch is evaluated only on
    its own side of −log 2 (the other side clamped to it). Evaluated everywhere, log1p(−exp(x)) is −inf near 0 and
    its infinite gradient, multiplied by torch.where's zero, made the gradient NaN once a student put all but
    ~1e-8 of its mass on the teacher's top-k (seen at τ 0.5)."""
    x = x.clamp(max=-1e-12)
    ln2 = math.log(2)
    return torch.where(x > -ln2, torch.log(-torch.expm1(x.clamp(min=-ln2))), torch.log1p(-torch.exp(x.clamp(max=-ln2))))


def topk_targets(logits: torch.Tensor, topk: int, temperature: float):
    """(ids (…, k) int32, log p (…, k) float32, log p_rest (…)) of softmax(logits / τ)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    top = logp.topk(min(topk, logp.shape[-1]), dim=-1)
    log_rest = _log1mexp(torch.logsumexp(top.values, dim=-1))
    return top.indices.to(torch.int32), top.values, log_rest


@torch.no_grad()
def build_teacher_cache(model, windows: torch.Tensor, indices: list[int], topk: int, temperature: float,
                        bf16: bool = False, progress: bool = False, batch_size: int = 4) -> TeacherCache:
    """The float model's top-k targets on the windows the run will draw (`indices`), `batch_size` windows per
    forward (each window is scored on its own: no position attends across windows)."""
    if topk < 1:
        raise UserError(f"--kd-topk: expected >= 1, got {topk}")
    if not temperature > 0:
        raise UserError(f"--kd-temperature: expected > 0, got {temperature}")
    device = next(model.parameters()).device
    ids, logp, rest = {}, {}, {}
    chunks = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]
    it = chunks
    if progress:
        from tqdm import tqdm

        it = tqdm(chunks, desc="teacher pre-pass", unit="batch", leave=False)
    with eval_mode(model):
        for chunk in it:
            x = windows[chunk].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=x).logits[:, :-1]
            i, lp, lr = topk_targets(logits, topk, temperature)
            for k, w in enumerate(chunk):
                ids[w], logp[w], rest[w] = i[k].cpu(), lp[k].cpu(), lr[k].cpu()
    cache = TeacherCache(ids, logp, rest, topk, temperature)
    log.info("teacher cache: %d windows, top-%d, τ %g, mean rest mass %.4f", len(indices), topk, temperature,
             cache.rest_mass)
    return cache


def kl_topk(student_logits: torch.Tensor, ids: torch.Tensor, t_logp: torch.Tensor, t_log_rest: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Mean over positions of τ² · KL(teacher ‖ student) on the top-k + rest coarsening (module docstring).
    student_logits (B, T − 1, V); ids, t_logp (B, T − 1, k); t_log_rest (B, T − 1)."""
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = s_logp.gather(-1, ids)  # (B, T − 1, k)
    s_log_rest = _log1mexp(torch.logsumexp(s_top, dim=-1))
    p = t_logp.exp()
    kl = (p * (t_logp - s_top)).sum(-1) + t_log_rest.exp() * (t_log_rest - s_log_rest)
    return kl.mean() * temperature**2


def loss(model, batch: torch.Tensor, objective: str, teacher: TeacherCache | OnlineTeacher | None = None,
         idx: torch.Tensor | None = None, ce_weight: float = 0.5, layer_weight: float = 0.0,
         layer_target: str = "input") -> torch.Tensor:
    """The training loss of `model` on token windows `batch` (rows `idx` of the training windows); with
    `layer_weight` > 0 plus that times the layers' output reconstruction (`layer_terms`)."""
    if layer_weight > 0:
        with layer_terms(model, batch if layer_target == "float" else None) as terms:
            main = loss(model, batch, objective, teacher, idx, ce_weight)
        return main + layer_weight * torch.stack(terms).mean()
    if objective == "ce":
        return model(input_ids=batch, labels=batch).loss
    if teacher is None or idx is None:
        raise UserError(f"objective {objective}: expected a teacher cache (build_teacher_cache), got none")
    ids, t_logp, t_rest = teacher.targets(batch, idx, batch.device)  # an online teacher runs before the student
    logits = model(input_ids=batch).logits[:, :-1]
    kl = kl_topk(logits, ids, t_logp, t_rest, teacher.temperature)
    if objective == "kl":
        return kl
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return ce_weight * ce + (1 - ce_weight) * kl


@contextmanager
def layer_terms(model, float_batch: torch.Tensor | None = None) -> Iterator[list[torch.Tensor]]:
    """Within: every forward of a quantized layer that keeps its float weight W0 (LR-QAT with a Φ0 finer than the
    codes: `teacher_weight`) appends ‖y − t‖² / ‖t‖², its output's relative error against a float target t: a
    target for each layer's own codes next to the model-level one. t = x·W0ᵀ on the layer's own input x (target
    "input": the AdaRound / GPTQ reconstruction), or, given `float_batch` (target "float"), the float model's output
    of that layer on those tokens, from one more no-grad forward with every layer on W0 (the student must then also
    make up for the error of the layers before it). The teacher's own forwards and no-grad forwards add nothing."""
    layers = [m for m in model.modules() if callable(getattr(m, "teacher_weight", None))]
    coarse = sorted({type(m).__name__ for m in layers if not m.holds_float_weights()})
    if not layers or coarse:
        raise UserError(f"--kd-layer: expected quantized layers that keep the float weights (LR-QAT with --phi "
                        f"bf16), got {'none' if not layers else ', '.join(coarse) + ' with a Φ0 of codes only'}")
    terms: list[torch.Tensor] = []
    targets: dict[int, list[torch.Tensor]] = {}
    if float_batch is not None:
        from ..methods.lrqat import as_teacher

        def keep(m, inp, out):
            targets.setdefault(id(m), []).append(out.detach().float())

        kept = [m.register_forward_hook(keep) for m in layers]
        try:
            with torch.no_grad(), as_teacher(model):
                model(input_ids=float_batch)
        finally:
            for h in kept:
                h.remove()

    def hook(m, inp, out):
        if getattr(m, "teacher", False) or not torch.is_grad_enabled():
            return
        if float_batch is not None:
            ref = targets[id(m)].pop(0)
        else:
            with torch.no_grad():
                ref = F.linear(inp[0], m.teacher_weight().to(out.dtype),
                               None if m.bias is None else m.bias.to(out.dtype)).float()
        terms.append((out.float() - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        yield terms
    finally:
        for h in handles:
            h.remove()
