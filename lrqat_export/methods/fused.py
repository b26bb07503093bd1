"""LR-QAT's quantized linear as one autograd function: y = x·Ŵᵀ + b with

    Ŵ = s · ( clip(⌊Φ0 + (α/r)·A·B⌉, qmin, qmax) − z )           (methods/lrqat.py; ⌊·⌉ straight-through)

The eager layer builds Ŵ from a chain of fp32 element-wise ops and runs it under activation checkpointing, so every
step walks each weight about ten times (forward, recomputation, autograd's backward of each op) and forms the
weight gradient G = dyᵀx. Here:

* forward: A·B (the same fp32 matmul as `fused_codes`), then ONE compiled element-wise pass over the weight —
  upcast Φ0, add (α/r)·AB, round, clip, subtract z, scale — and the matmul in x's dtype (`common.linear`, so bf16
  autocast behaves as in the eager layer). Saved for backward: x, Φ0, A, B, the fp16 scales, z and fp16_ste's
  mask (out × G each) and, per channel, the output y and the events below; no weight-sized tensor.
  Per channel the forward's pass also marks its *events* (one int8 a weight, dropped at once): the entries whose
  code is not RTN's c0 = clip(⌊Φ0⌉) or was clipped, usually well under 1 % of them. Their positions and Ŵ values
  are kept (`Events`: 8 bytes each, 16 more for a clipped one; at most EVENT_FRACTION of the weight, past it none).
* backward: Ŵ again, dx = dy·Ŵ. With events, without A·B: RTN's Ŵ from Φ0 in one pass, then the forward's own Ŵ
  values put back at the events, so it is the forward's Ŵ bit for bit. Otherwise A·B again and one pass (plus a
  flag where a code was clipped). Then
    - per channel (one scale a row): no weight-sized gradient at all. With S = diag(s) and the clip mask M,
          dA = (α/r)·(G∘SM)·Bᵀ = (α/r)·[ S·dyᵀ·(x·Bᵀ) − (G∘S∘(1−M))·Bᵀ ]
          dB = (α/r)·Aᵀ·(G∘SM) = (α/r)·[ (dy·S·A)ᵀ·x − Aᵀ·(G∘S∘(1−M)) ]
          ds_i = Σ_t dy_ti · (y_ti − b_i) / s_i        (= Σ_j G_ij (c − z)_ij: y/s is x·(c − z)ᵀ)
      where the clipped entries (usually few) are corrected one by one: dyᵀx sampled there only, then
      subtracted (the native kernel's loop; else a sparse CSR pattern on the CPU, SDDMM, a sparse × dense product
      and a scatter; elsewhere gathers in chunks); past 1/64 of the weights the dense route below is cheaper.
    - grouped scales: G = dyᵀx, then one compiled pass gives G∘S∘M and the per-group sums Σ G·(c − z).
  The gradients are today's eager autograd's (straight-through round, clamp's mask, fp16_ste's identity inside
  its clamp), summed in another order: equal to a float tolerance, not bit for bit.

Exactness: the forward's Ŵ is bit for bit the eager layer's, so the codes it uses are `fused_codes`'s. Each
element is the same sequence of IEEE operations (fp32 multiply by α/r, add, round half to even, clamp, subtract,
multiply; no reduction), A·B is the same matmul call, and inductor compiles with -ffp-contract=off and without
unsafe math, so nothing is contracted into an FMA or reordered. tests/test_fused.py checks it on exact .5 ties of
the fixed-point Φ0 and on the clip boundaries for every φ and grid.

One path per device: on the CPU the native kernel (`fused_native`: fused_native.c, built once per machine by the
system C compiler, called through ctypes) computes the forward's pass and its events in one loop, the backward's
rebuild, and the clipped entries' correction, for Φ0 in fp32, bf16 and int8 (int4's packed nibbles stay compiled),
and for every φ the fp16 scales and the backward's scaled dy (`_scales`, `_lowrank_grads`); inside the autograd
function the CPU's A·B goes to a reused buffer and the forward's Ŵ overwrites it, the backward's Ŵ to a second one
(`fused_native.scratch`: no fresh weight-sized allocation, so no page faults, per projection);
everything else is `torch.compile` of the element-wise passes (inductor: C++ on the CPU, Triton on CUDA). Without
the native kernel (no working C compiler, or LRQAT_FUSED_NATIVE=0) the compiled passes do its work, with one log
line; where torch.compile cannot compile either (no C++ compiler, no Triton) the layer keeps the eager chain, with
one warning. All routes give the same Ŵ bit for bit (tests/test_fused.py runs the exactness tests on both CPU
routes).

K-quant grids (a `super_block` in the spec): the layer computes each sub-block's d·sc and dmin·m from its trained
scale and min with the eager straight-through rounding (tensors of out × in/32), and `FusedLRQATLinearK` takes it
from there: the same forward pass with Ŵ = (d·sc)·(c + offset) − dmin·m in ggml's order, and the dense backward
(G = dyᵀx, one pass for G∘S∘M and the per-sub-block sums), as on the other grouped grids.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Callable, NamedTuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..core.quant import FP16_MAX, FP16_TINY, QuantSpec
from . import fused_native
from .common import fp16_scales, linear

log = logging.getLogger(__name__)

SPARSE_CLIP_FRACTION = 1 / 64  # per channel: clipped entries corrected one by one up to this fraction of a weight
EVENT_FRACTION = 1 / 64  # per channel: the forward keeps its moved or clipped entries up to this fraction (5 B each)
CSR_DEVICES = ("cpu",)  # the correction as a sparse CSR product here (measured); gathers elsewhere
_GATHER_ELEMENTS = 1 << 22  # tokens × clipped entries gathered at once by the gather correction

RECOMPILE_LIMIT = 20  # variants of one pass: φ (4) × per channel or grouped × symmetric or not, a few spare
_KERNELS: dict[tuple, Callable] = {}
_LORA_SCALES: dict[tuple, torch.Tensor] = {}  # (α/r, device) -> the 0-dim float32 tensor the passes take
_BROKEN: dict[str, str] = {}  # device type -> why torch.compile is not used there
_CHECKED: set[str] = set()
_CSR_SEEN: list[bool] = []  # a CSR tensor was made in this process (its beta notice is then spent)
COMPILE_SECONDS: dict[str, float] = {}  # kernel name -> seconds of its first (compiling) call, for the benchmark


def available(device: torch.device | str) -> bool:
    """Whether the fused path runs on `device` (False after torch.compile failed there; warned once)."""
    dev = torch.device(device).type
    if dev in _BROKEN:
        return False
    if dev == "cuda" and dev not in _CHECKED:
        from torch.utils._triton import has_triton

        if not has_triton():
            _disable(dev, "Triton is not installed")
            return False
        _CHECKED.add(dev)
    elif dev not in ("cpu", "cuda"):
        _disable(dev, f"no fused kernel for device type {dev!r}")
        return False
    return True


def off_reasons() -> dict[str, str]:
    """{device type: why the fused path is off there} (empty while it runs everywhere it was asked to)."""
    return dict(_BROKEN)


def _disable(dev: str, why: str) -> None:
    if dev not in _BROKEN:
        _BROKEN[dev] = why
        log.warning("fused LR-QAT quantizer off on %s (%s): the eager quantizer runs instead, same numbers, slower",
                    dev, why)


# ---------------------------------------------------------------------------------------------------------------
# The element-wise passes. One Python function per pass; torch.compile turns each into one kernel. The eager
# function is the fallback and the reference: both compute the same operations element by element.


def _codes(phi0, ab, ls, upcast, qmin, qmax):
    """(rounded, clipped codes) of Φ0 + (α/r)·AB, float32 (out, in) each. ls: (α/r) as a 0-dim float32 tensor, so
    the product is the eager layer's fp32 multiply by the Python float."""
    r = torch.round(upcast(phi0) + ls * ab)
    return r, r.clamp(qmin, qmax)


def _dequant(c, s16, zf):
    """(s·(c − z), c − z), each float32 (out, G, g): grouped, as every pass returns its weight-shaped outputs (`_run`
    views them as (out, in) after the compiled call; reshaped inside, with symbolic sizes inductor cannot prove the
    view contiguous and copies the whole weight once more). s16, zf: (out, G)."""
    g = c.reshape(c.shape[0], s16.shape[1], -1)  # (out, G, g)
    if zf is not None:
        g = g - zf.unsqueeze(-1)
    return g * s16.unsqueeze(-1), g


def _make(kind: str, upcast, qmin: int, qmax: int, offset: int = 0):
    def weight(phi0, ab, ls, s16, zf):
        return _dequant(_codes(phi0, ab, ls, upcast, qmin, qmax)[1], s16, zf)[0]

    def weight_clipped(phi0, ab, ls, s16, zf):
        r, c = _codes(phi0, ab, ls, upcast, qmin, qmax)
        w, g = _dequant(c, s16, zf)
        # sign of the clipping as int8: a bool output makes inductor's C++ store scalar (7× slower on AVX2). Taken
        # in the grouped (out, G, g) view that Ŵ is computed in, so inductor writes both outputs from one loop
        # (a flat (out·in) flag was a second loop reading Φ0 and A·B again: the pass took 1.7× as long)
        return w, (r.reshape(g.shape) - c.reshape(g.shape)).clamp(-1, 1).to(torch.int8)

    def weight_events(phi0, ab, ls, s16, zf):
        """Ŵ and, in one int8 per weight, the entries the backward cannot rebuild from Φ0 alone: 0 where the code
        is RTN's c0 = clip(⌊Φ0⌉) and did not clip, 1 where it moved from c0 inside the grid, 2 where it clipped."""
        r, c = _codes(phi0, ab, ls, upcast, qmin, qmax)
        w, g = _dequant(c, s16, zf)
        c0 = torch.round(upcast(phi0)).clamp(qmin, qmax)
        r3, c3, c03 = r.reshape(g.shape), c.reshape(g.shape), c0.reshape(g.shape)
        ev = torch.where(r3 != c3, 2.0, (c3 != c03).float())
        return w, ev.to(torch.int8)

    def weight_rtn(phi0, s16, zf):
        """Ŵ with RTN's codes c0 = clip(⌊Φ0⌉) (no A·B): the backward's Ŵ before the recorded events go in."""
        c0 = torch.round(upcast(phi0)).clamp(qmin, qmax)
        return _dequant(c0, s16, zf)[0]

    def grads(phi0, ab, ls, s16, zf, gw):
        """gw = G = dyᵀx (out, in) -> (G∘S∘M (out, in), Σ_group G·(c − z) (out, G))."""
        r, c = _codes(phi0, ab, ls, upcast, qmin, qmax)
        _, cz = _dequant(c, s16, zf)
        gg = gw.reshape(cz.shape)
        ds = (gg * cz).sum(-1)
        dt = torch.where((r == c).reshape(cz.shape), gg * s16.unsqueeze(-1), 0.0)
        return dt, ds

    def weight_k(phi0, ab, ls, s_eff, m_eff):
        """K grids: Ŵ = (d·sc)·(c + offset) − dmin·m per sub-block, in the eager layer's (and ggml's) order.
        s_eff, m_eff: (out, G) the sub-blocks' d·sc and dmin·m (m_eff None: symmetric)."""
        c = _codes(phi0, ab, ls, upcast, qmin, qmax)[1]
        w = s_eff.unsqueeze(-1) * (c.reshape(c.shape[0], s_eff.shape[1], -1) + offset)
        return w if m_eff is None else w - m_eff.unsqueeze(-1)

    def grads_k(phi0, ab, ls, s_eff, gw):
        """K grids: gw = G -> (G∘S∘M (out, in), Σ_sub-block G·(c + offset), −Σ_sub-block G (out, G) each)."""
        r, c = _codes(phi0, ab, ls, upcast, qmin, qmax)
        q = c.reshape(c.shape[0], s_eff.shape[1], -1) + offset
        gg = gw.reshape(q.shape)
        dt = torch.where((r == c).reshape(q.shape), gg * s_eff.unsqueeze(-1), 0.0)
        return dt, (gg * q).sum(-1), -gg.sum(-1)

    return {"weight": weight, "weight_clipped": weight_clipped, "weight_events": weight_events,
            "weight_rtn": weight_rtn, "grads": grads, "weight_k": weight_k, "grads_k": grads_k}[kind]


def _kernel(kind: str, spec: QuantSpec, phi: str, upcast: Callable,
            device: torch.device) -> tuple[Callable, Callable, str]:
    """(compiled, eager, name) of pass `kind` for this grid and φ; one compilation serves every shape."""
    key = (kind, spec.bits, spec.group_size == -1, spec.symmetric, spec.is_k and spec.offset, phi, device.type)
    if key not in _KERNELS:
        # every grid and φ of a process shares a pass's code object, and dynamo counts their variants against one
        # recompile limit (8 by default): raised once, here, rather than patched around every call
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
        eager = _make(kind, lambda t: upcast(t, spec, phi), spec.qmin, spec.qmax, spec.offset if spec.is_k else 0)
        name = f"{kind}/{phi}/w{spec.bits}{'pc' if spec.group_size == -1 else 'g'}/{device.type}"
        _KERNELS[key] = (torch.compile(eager, dynamic=True, fullgraph=True), eager, name)
    return _KERNELS[key]


def _run(kind: str, spec, phi, upcast, *args):
    dev = args[0].device
    compiled, eager, name = _kernel(kind, spec, phi, upcast, dev)
    # a Python dispatch mode (FlopCounterMode, a profiler of ops, FakeTensorMode) is not something dynamo traces
    # under: this call runs the eager function, the same numbers, and the compiled pass stays on for later calls
    if dev.type in _BROKEN or _get_current_dispatch_mode() is not None:
        return _flat(eager(*args))
    first = name not in COMPILE_SECONDS
    t0 = time.perf_counter() if first else 0.0
    try:  # element-wise fp32, no autograd (the contexts are entered only where they change something: each costs
        # a few µs, and the passes run twice per projection per step)
        if torch.is_grad_enabled() or torch.is_autocast_enabled(dev.type):
            with torch.autocast(device_type=dev.type, enabled=False), torch.no_grad():
                res = compiled(*args)
        else:
            res = compiled(*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure: the same numbers from the eager function
        _disable(dev.type, f"torch.compile failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
        return _flat(eager(*args))
    if first:
        COMPILE_SECONDS[name] = time.perf_counter() - t0
        log.info("fused LR-QAT kernel %s compiled in %.1f s", name, COMPILE_SECONDS[name])
    return _flat(res)


def _flat(res):
    """A pass's grouped (out, G, g) outputs as (out, in) views; per-group outputs (out, G) as they are."""
    if isinstance(res, tuple):
        return tuple(_flat(t) for t in res)
    return res.flatten(1) if res.dim() == 3 else res


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t as float32, without a dispatch where it already is (a no-op `.float()` still costs a few µs a call)."""
    return t if t.dtype == torch.float32 else t.float()


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _fp32_math(device: torch.device):
    """A context in which matmuls run in float32: autocast off where it is on, else nothing to enter."""
    return torch.autocast(device_type=device.type, enabled=False) if torch.is_autocast_enabled(device.type) \
        else contextlib.nullcontext()


def _dx(dy2, w, cdt, x):
    """dx = dy·Ŵ in the forward's compute dtype, returned in x's dtype and shape: F.linear's backward."""
    return _as(_as(dy2, cdt) @ _as(w, cdt), x.dtype).reshape(x.shape)


def _ab(lora_a, lora_b, reuse: bool = False):
    """fp32 A·B (out, in): the matmul `fused_codes` uses. reuse: into this thread's buffer for the shape
    (`fused_native.scratch`, CPU only), for a product that dies inside the caller."""
    with _fp32_math(lora_a.device):
        a, b = _f32(lora_a.detach()), _f32(lora_b.detach())
        if reuse and a.device.type == "cpu":
            return torch.matmul(a, b, out=fused_native.scratch("ab", a.shape[0], b.shape[1]))
        return a @ b


def _lora_scale(lora_scale: float, device) -> torch.Tensor:
    """α/r as a 0-dim float32 tensor on `device` (one per value and device)."""
    ls = _LORA_SCALES.get((lora_scale, device))
    if ls is None:
        ls = _LORA_SCALES[(lora_scale, device)] = torch.tensor(lora_scale, dtype=torch.float32, device=device)
    return ls


def ds_mask(scale: torch.Tensor) -> torch.Tensor:
    """Where common.fp16_ste passes the scale's gradient: the identity inside its clamp to fp16's range."""
    s_c = _f32(scale.detach())
    return (s_c >= FP16_TINY) & (s_c <= FP16_MAX)


def _scales(scale, zero, lora_scale, device, mask: bool = False):
    """(α/r as a 0-dim float32 tensor, the fp16 scales as float32 (out, G), the float zeros, fp16_ste's mask | None).
    On the CPU one native call gives the scales and the mask (1.0 / 0.0; the values of `fp16_scales(scale).float()`
    and `ds_mask(scale)`, seven small torch ops); elsewhere the mask is computed only when asked (`mask`)."""
    ls = _lora_scale(lora_scale, device)
    zf = None if zero is None else zero.float()
    if scale.dtype == torch.float32 and scale.is_contiguous() and _native_on(scale.device):
        s16, keep = fused_native.scales(scale.detach(), FP16_TINY, FP16_MAX)
        return ls, s16, zf, keep
    # the value of common.fp16_ste: s_c + (fp16(s_c) − s_c) is fp16(s_c) exactly (the difference is exact)
    return ls, fp16_scales(scale).float(), zf, ds_mask(scale) if mask else None


def _prologue(phi0, lora_a, lora_b, scale, zero, lora_scale):
    """fp32 A·B, α/r as a 0-dim tensor, the fp16 scales and float zeros."""
    return (_ab(lora_a, lora_b), *_scales(scale, zero, lora_scale, phi0.device)[:3])


def fused_weight(phi0, lora_a, lora_b, scale, zero, spec: QuantSpec, phi: str, lora_scale: float,
                 upcast: Callable) -> torch.Tensor:
    """Ŵ (out, in) float32 from the fused pass, without gradient: the eager layer's `weight()` bit for bit."""
    return _weight_pass(phi0, *_prologue(phi0, lora_a, lora_b, scale, zero, lora_scale), spec, phi, upcast)


class Events(NamedTuple):
    """What the forward keeps of the entries the backward cannot rebuild from Φ0: those whose code is not RTN's
    c0 = clip(⌊Φ0⌉) or was clipped."""
    pos: torch.Tensor  # (K,) their flat row-major positions, int32 (int64 past 2³¹ weights)
    w: torch.Tensor  # (K,) the forward's Ŵ there, float32
    clipped: torch.Tensor  # (Kc, 2) (row, column) of the clipped ones, row-major: the backward's sparse correction


def weight_and_events(phi0, lora_a, lora_b, scale, zero, spec: QuantSpec, phi: str, lora_scale: float,
                      upcast: Callable) -> tuple[torch.Tensor, Events | None]:
    """(Ŵ as `fused_weight`, Events | None): None past EVENT_FRACTION of the weight (the backward then forms A·B
    again)."""
    return _events_pass(phi0, *_prologue(phi0, lora_a, lora_b, scale, zero, lora_scale), spec, phi, upcast)


def _native(phi0, spec: QuantSpec, phi: str, upcast: Callable) -> tuple[int, float] | None:
    """(Φ0's kind, divisor) where the native CPU kernel (fused_native) computes this layer's passes, else None:
    off the CPU, under a Python dispatch mode (it reads raw memory), for int4's packed Φ0, or where it was not
    built."""
    return fused_native.storage(phi, phi0, spec, upcast) if _native_on(phi0.device) else None


def _native_on(device: torch.device) -> bool:
    """The native CPU kernel computes here: on the CPU, outside a Python dispatch mode, where it was built."""
    return device.type == "cpu" and _get_current_dispatch_mode() is None and fused_native.lib() is not None


def _weight_pass(phi0, ab, ls, s16, zf, spec, phi, upcast):
    """Ŵ from one pass over the weight: the native kernel's where it runs, else the compiled one's."""
    nat = _native(phi0, spec, phi, upcast)
    if nat is not None:
        return fused_native.forward(phi0, *nat, ab, float(ls), s16, zf, spec.qmin, spec.qmax, False, 0)[0]
    return _run("weight", spec, phi, upcast, phi0, ab, ls, s16, zf)


def _events_pass(phi0, ab, ls, s16, zf, spec, phi, upcast, in_place=False):
    """(Ŵ, Events | None) from one pass (in_place: the native pass writes Ŵ over ab, which dies in the caller)."""
    nat = _native(phi0, spec, phi, upcast)
    if nat is not None:  # Ŵ and the events from one C loop: no flags to scan, no gathers
        w, ev = fused_native.forward(phi0, *nat, ab, float(ls), s16, zf, spec.qmin, spec.qmax, True,
                                     EVENT_FRACTION * phi0.numel(), in_place)
        return w, None if ev is None else Events(*ev)
    w, ev = _run("weight_events", spec, phi, upcast, phi0, ab, ls, s16, zf)
    pos = flagged_positions(ev)
    if pos.shape[0] > EVENT_FRACTION * ev.numel():
        return w, None
    clip = pos[ev.view(-1)[pos] == 2]
    in_f = w.shape[1]
    return w, Events(pos.to(torch.int32) if ev.numel() < 2 ** 31 else pos, w.view(-1)[pos],
                     torch.stack((clip // in_f, clip % in_f), 1))


def rebuilt_weight(phi0, s16, zf, events: Events, spec: QuantSpec, phi: str, upcast: Callable, reuse=False):
    """(Ŵ, (K, 2) clipped entries) from Φ0 and the forward's events, without A·B: RTN's Ŵ from one pass, then the
    forward's own Ŵ values put back at the events, so Ŵ is the forward's bit for bit."""
    nat = _native(phi0, spec, phi, upcast)
    if nat is not None:
        return (fused_native.rebuild(phi0, *nat, s16, zf, spec.qmin, spec.qmax, events.pos, events.w, reuse),
                events.clipped)
    w = _run("weight_rtn", spec, phi, upcast, phi0, s16, zf)
    w.view(-1).index_put_((events.pos,), events.w)
    return w, events.clipped


class FusedLRQATLinear(torch.autograd.Function):
    """y = x·Ŵᵀ + b; gradients for x, A, B, s (module docstring)."""

    @staticmethod
    def forward(ctx, x, phi0, lora_a, lora_b, scale, zero, bias,  # type: ignore[override]
                spec, phi, lora_scale, upcast):
        ctx.per_channel = scale.shape[1] == 1
        events = None
        ab = _ab(lora_a, lora_b, reuse=True)
        ls, s16, zf, keep = _scales(scale, zero, lora_scale, phi0.device, mask=True)
        if ctx.per_channel:  # the forward records its events (module docstring), on every per-channel grid
            w, events = _events_pass(phi0, ab, ls, s16, zf, spec, phi, upcast, in_place=True)  # ab dies here
        else:
            w = _weight_pass(phi0, ab, ls, s16, zf, spec, phi, upcast)
        del ab
        y = linear(x, w, bias)
        # the backward keeps the fp16 scales, float zeros and fp16_ste's mask (out × G each) rather than recompute
        ctx.meta = (spec, phi, lora_scale, upcast, y.dtype, lora_a.dtype, lora_b.dtype, scale.dtype)
        ctx.save_for_backward(x, phi0, lora_a, lora_b, s16, zf, keep, bias,
                              y if ctx.per_channel else None, *(events or (None, None, None)))
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, phi0, lora_a, lora_b, s16, zf, keep, bias, y, *events = ctx.saved_tensors
        spec, phi, ls_f, upcast, cdt, a_dt, b_dt, s_dt = ctx.meta
        out_f, in_f = phi0.shape[0], lora_b.shape[1]
        ls = _lora_scale(ls_f, phi0.device)
        ab = None
        dy2 = dy.reshape(-1, out_f)
        if events[0] is not None:  # per channel, the forward's events: Ŵ without A·B
            w, idx = rebuilt_weight(phi0, s16, zf, Events(*events), spec, phi, upcast, reuse=True)
        elif ctx.per_channel:
            ab = _ab(lora_a, lora_b)
            w, clipped = _run("weight_clipped", spec, phi, upcast, phi0, ab, ls, s16, zf)
            idx = clipped_entries(clipped)  # (K, 2): the clipped entries
            del clipped
        else:
            ab = _ab(lora_a, lora_b)
            w, idx = _weight_pass(phi0, ab, ls, s16, zf, spec, phi, upcast), None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _dx(dy2, w, cdt, x)
        del w
        a, b = _f32(lora_a), _f32(lora_b)
        with _fp32_math(dy.device):
            x2, g2 = _f32(x.reshape(-1, in_f)), _f32(dy2)
            if idx is not None and idx.shape[0] <= SPARSE_CLIP_FRACTION * out_f * in_f:
                del ab
                da, db, ds = _lowrank_grads(x2, g2, y, bias, a, b, s16, idx, ls_f)
            else:
                ab = _ab(lora_a, lora_b) if ab is None else ab
                gw = g2.T @ x2  # (out, in): G = dyᵀx
                dt, ds = _run("grads", spec, phi, upcast, phi0, ab, ls, s16, zf, gw)
                del gw, ab
                da, db = ls_f * (dt @ b.T), ls_f * (a.T @ dt)
        ds = ds * keep  # fp16_ste: identity inside its clamp
        return (dx, None, _as(da, a_dt), _as(db, b_dt), _as(ds, s_dt), None, None, None, None, None, None)


class FusedLRQATLinearK(torch.autograd.Function):
    """K grids: y = x·Ŵᵀ + b with Ŵ = s_eff·(c + offset) − m_eff per sub-block. s_eff, m_eff (out, G) are the
    sub-blocks' d·sc and dmin·m as the eager layer computes them (`lrqat.k_sub_ste`, whose straight-through
    gradient autograd applies outside); gradients for x, A, B, s_eff, m_eff. The dense route: G = dyᵀx."""

    @staticmethod
    def forward(ctx, x, phi0, lora_a, lora_b, s_eff, m_eff, bias,  # type: ignore[override]
                spec, phi, lora_scale, upcast):
        w = _weight_k(phi0, _ab(lora_a, lora_b), _lora_scale(lora_scale, phi0.device), s_eff, m_eff, spec, phi,
                      upcast)
        y = linear(x, w, bias)
        ctx.meta = (spec, phi, lora_scale, upcast, y.dtype)
        ctx.save_for_backward(x, phi0, lora_a, lora_b, s_eff, m_eff)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, phi0, lora_a, lora_b, s_eff, m_eff = ctx.saved_tensors
        spec, phi, ls_f, upcast, cdt = ctx.meta
        ls, in_f = _lora_scale(ls_f, phi0.device), lora_b.shape[1]
        ab = _ab(lora_a, lora_b)
        dy2 = dy.reshape(-1, phi0.shape[0])
        dx = None
        if ctx.needs_input_grad[0]:
            w = _weight_k(phi0, ab, ls, s_eff, m_eff, spec, phi, upcast)
            dx = _dx(dy2, w, cdt, x)
            del w
        a, b = _f32(lora_a), _f32(lora_b)
        with _fp32_math(dy.device):
            gw = _f32(dy2).T @ _f32(x.reshape(-1, in_f))  # (out, in): G = dyᵀx
            dt, ds, dm = _run("grads_k", spec, phi, upcast, phi0, ab, ls, _f32(s_eff.detach()), gw)
            del gw, ab
            da, db = ls_f * (dt @ b.T), ls_f * (a.T @ dt)
        return (dx, None, _as(da, lora_a.dtype), _as(db, lora_b.dtype), _as(ds, s_eff.dtype),
                None if m_eff is None else _as(dm, m_eff.dtype), None, None, None, None, None)


def _weight_k(phi0, ab, ls, s_eff, m_eff, spec, phi, upcast):
    """K grids: Ŵ (out, in) float32 from the `weight_k` pass; s_eff, m_eff (out, G) | None, taken without grad."""
    return _run("weight_k", spec, phi, upcast, phi0, ab, ls, _f32(s_eff.detach()),
                None if m_eff is None else _f32(m_eff.detach()))


def quantized_linear_k(x, phi0, lora_a, lora_b, s_eff, m_eff, bias, spec: QuantSpec, phi: str, lora_scale: float,
                       upcast: Callable) -> torch.Tensor:
    """The fused K-grid y = x·Ŵᵀ + b (LRQATLinear.forward with `fused` on a K grid). s_eff, m_eff: (out, G)."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad
                                              for t in (x, lora_a, lora_b, s_eff, m_eff)):
        return linear(x, _weight_k(phi0, _ab(lora_a, lora_b), _lora_scale(lora_scale, phi0.device), s_eff, m_eff,
                                   spec, phi, upcast), bias)
    return FusedLRQATLinearK.apply(x, phi0, lora_a, lora_b, s_eff, m_eff, bias, spec, phi, lora_scale, upcast)


def flagged_positions(flags: torch.Tensor) -> torch.Tensor:
    """Flat row-major positions (int64, ascending) of the nonzero entries of int8 flags: what
    `flags.reshape(-1).nonzero()` returns, about 4× faster while few entries are set. The flags are read 8 at a
    time as int64 words; only the words holding a set flag are looked into."""
    flat = flags.reshape(-1)
    if flat.numel() % 8 or not flat.is_contiguous():
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64).nonzero().squeeze(1)  # words with at least one set flag
    inner = flat.view(-1, 8)[words].nonzero()  # (K, 2): (word, byte) pairs
    return words[inner[:, 0]] * 8 + inner[:, 1]


def clipped_entries(flags: torch.Tensor) -> torch.Tensor:
    """(K, 2) (row, column) of the nonzero entries of the int8 (out, in) flags, in row-major order: what
    `flags.nonzero()` returns (`flagged_positions`, split)."""
    pos = flagged_positions(flags)
    return torch.stack((pos // flags.shape[1], pos % flags.shape[1]), 1)


def _lowrank_grads(x2, g2, y, bias, a, b, s16, idx, ls):
    """Per-channel gradients of A, B, s without G = dyᵀx (module docstring). x2 (T, in), g2 = dy (T, out) fp32;
    idx (K, 2): the clipped (row, column) entries."""
    if _native_on(x2.device):  # (dy·S·(α/r))ᵀ and Σ_t dy·y0 from one pass
        y0 = _f32(y.reshape(-1, g2.shape[1])).contiguous()
        gs_t, dsum = fused_native.dy_pass(g2.contiguous(), y0, None if bias is None else _f32(bias).contiguous(),
                                          s16.contiguous(), ls)
        da = gs_t @ (x2 @ b.T)  # (out, r)
        db = (a.T @ gs_t) @ x2  # (r, in)
        if idx.shape[0]:
            fused_native.clip_correction(gs_t, x2.contiguous(), a.contiguous(), b.contiguous(), idx, -1.0, da, db)
        return da, db, dsum.unsqueeze(1) / s16
    # (out, T): (dy·S)ᵀ; stored token-minor when the correction below reads its rows (a transposed view is 5× slower
    # to sample), a view of the (T, out) product otherwise; the matmuls take either layout
    # (written row-major by the product itself: `(g2.T * s16).contiguous()` wrote it in g2's layout, then copied it)
    gs_t = torch.mul(g2.T, s16, out=g2.new_empty(g2.shape[1], g2.shape[0])) if idx.shape[0] else (g2 * s16.T).T
    da = ls * (gs_t @ (x2 @ b.T))  # (out, r)
    db = ls * ((a.T @ gs_t) @ x2)  # (r, in)
    if idx.shape[0]:
        correction = _correction_csr if x2.device.type in CSR_DEVICES else _correction_gather
        da_c, db_c = correction(gs_t, x2, a, b, idx, ls)
        da += da_c
        db += db_c
    y0 = _f32(y.reshape(-1, g2.shape[1]))
    if bias is not None:
        y0 = y0 - _f32(bias)
    ds = (g2 * y0).sum(0, keepdim=True).T / s16  # (out, 1): Σ_t dy·x·(c − z)ᵀ
    return da, db, ds


def sampled_csr(gs_t, x2, idx, ls):
    """−(α/r)·s_i·G_ij at the K clipped (row, column) entries `idx` (row-major, unique), as a sparse CSR (out, in)
    tensor: dyᵀx sampled there only (SDDMM). gs_t: (dy·S)ᵀ, (out, T); x2: (T, in)."""
    out_f, in_f = gs_t.shape[0], x2.shape[1]
    rows, cols = idx.unbind(1)
    crow = torch.zeros(out_f + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(torch.bincount(rows, minlength=out_f), 0, out=crow[1:])
    # torch's notice that the CSR layout is "in beta" comes once a process: silenced around the first call only
    # (catch_warnings copies the filter list, a cost on every projection of every step)
    quiet = warnings.catch_warnings() if not _CSR_SEEN else contextlib.nullcontext()
    with quiet:
        if not _CSR_SEEN:
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            _CSR_SEEN.append(True)
        pattern = torch.sparse_csr_tensor(crow, cols.contiguous(), x2.new_zeros(idx.shape[0]), (out_f, in_f),
                                          check_invariants=False)  # valid by construction: row-major, unique
    return torch.sparse.sampled_addmm(pattern, gs_t, x2, beta=0.0, alpha=-ls)


def _correction_csr(gs_t, x2, a, b, idx, ls):
    """(dA, dB) parts of the clipped entries, whose gradient the clamp stops: the entries as a sparse (out, in)
    pattern, one sampled product −(α/r)·s_i·G_ij there (`sampled_csr`), one sparse × dense product for dA and one
    scatter of the values for dB. On the CPU 1.7–1.9× faster than gathering (0.39 vs 0.65 ms at 2,000 entries of a
    1536 × 576 layer, with the sparse product for dB too). gs_t: (dy·S)ᵀ, (out, T)."""
    corr = sampled_csr(gs_t, x2, idx, ls)
    rows, cols = idx.unbind(1)
    # dB's part as a scatter of the K values times A's rows: the transposed product (corr.t() @ a) sorts the
    # pattern into CSC order first, and took 0.34 against 0.24 ms here (1536 × 576, K 2,900, 2 threads)
    db_t = a.new_zeros(x2.shape[1], a.shape[1]).index_add_(0, cols, corr.values().unsqueeze(1) * a[rows])
    return corr @ b.T, db_t.T


def _correction_gather(gs_t, x2, a, b, idx, ls):
    """The same (dA, dB) parts from dense gathers, in chunks of at most _GATHER_ELEMENTS: the route on devices
    whose sparse kernels this project has not measured (CUDA)."""
    x_t, b_t = x2.T.contiguous(), b.T.contiguous()
    da, db_t = torch.zeros_like(a), torch.zeros_like(b_t)
    chunk = max(1, _GATHER_ELEMENTS // max(1, x2.shape[0]))
    for k in range(0, idx.shape[0], chunk):
        i, j = idx[k:k + chunk].unbind(1)
        c = (gs_t[i] * x_t[j]).sum(1, keepdim=True) * -ls  # (K, 1): −(α/r)·s_i·G_ij
        da.index_add_(0, i, c * b_t[j])
        db_t.index_add_(0, j, c * a[i])
    return da, db_t.T


def quantized_linear(x, phi0, lora_a, lora_b, scale, zero, bias, spec: QuantSpec, phi: str, lora_scale: float,
                     upcast: Callable) -> torch.Tensor:
    """The fused y = x·Ŵᵀ + b (LRQATLinear.forward with `fused`). upcast: lrqat.phi_up."""
    if not torch.is_grad_enabled() or not (lora_a.requires_grad or lora_b.requires_grad or scale.requires_grad
                                           or x.requires_grad):
        return linear(x, fused_weight(phi0, lora_a, lora_b, scale, zero, spec, phi, lora_scale, upcast), bias)
    return FusedLRQATLinear.apply(x, phi0, lora_a, lora_b, scale, zero, bias, spec, phi, lora_scale, upcast)
