"""The fused quantizer's native CPU kernel: fused_native.c built once per machine and called through ctypes.

What it replaces in methods/fused.py, per projection and step, on the CPU:
* the forward's compiled pass plus the scan of its int8 event flags and the gathers that made the `Events`
  (one C loop writes Ŵ and collects the events as it goes);
* the backward's compiled RTN pass plus the `index_put_` of the events (one loop);
* the clipped entries' correction of dA and dB: the CSR pattern, `sampled_addmm`, the sparse product and the
  scatter (one loop over the K entries);
* the small ops around them: the fp16 scales and fp16_ste's mask (`scales`, seven torch ops), and the backward's
  (dy·S·α/r)ᵀ with Σ_t dy·y0 for the scale's gradient (`dy_pass`: a strided product, a product and a reduction,
  and the two α/r products of dA and dB).
Each call costs a few µs through ctypes, where a compiled pass went through dynamo's wrapper and guards (about
0.1 ms) and the correction's torch ops had about 0.4 ms of fixed cost (BENCHMARKS.md, issue 18).

Exactness is the compiled pass's: the same IEEE float32 operations per weight, in the same order, compiled with
-ffp-contract=off and without fast math (fused_native.c); tests/test_fused.py compares Ŵ with the eager layer's bit
for bit on exact .5 ties and both clip boundaries.

The library is compiled by the system C compiler (`$CC`, else cc / gcc: the compiler inductor's C++ backend needs
too) with -march=native and OpenMP, into the user's cache (`$XDG_CACHE_HOME`, else ~/.cache, `lrqat-export/native/`),
named by a hash of the source, the flags, the compiler and the CPU's feature flags; written to a temporary name and
renamed, so concurrent first runs cannot load a half-written file. Each load touches its library; a new build removes
the libraries nobody has loaded for `STALE_DAYS` (an older version's, another compiler's), so upgrades do not pile up
builds in the cache. Where no compiler works, or
`LRQAT_FUSED_NATIVE=0` is set, `lib()` is None and fused.py runs its compiled passes instead (one log line says
why).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_native.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared")
STALE_DAYS = 30  # a cached build not loaded for this long is removed by the next build
ENV_OFF = "LRQAT_FUSED_NATIVE"  # "0": never build or use the native kernel
KINDS = {"fp32": 0, "bf16": 1, "int8": 2}  # Φ0 storages the kernel reads (int4's packed nibbles stay compiled)

_STATE: dict[str, object] = {}  # "lib": the loaded CDLL | None; "why": why it is None
_FRAC: dict[tuple, float] = {}  # (bits, φ) -> the divisor 2^frac of the fixed-point upcast (upcast(spec, φ))

_P, _I64, _I32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "lrq_forward": (_P, [_P, _I32, _F, _P, _F, _P, _P, _I64, _I64, _I64, _F, _F, _P, _I32, _I64, _P, _I32]),
    "lrq_take": (None, [_P, _P, _I32, _P, _P, _I64]),
    "lrq_rebuild": (None, [_P, _I32, _F, _P, _P, _I64, _I64, _I64, _F, _F, _P, _P, _I32, _P, _I64, _I32]),
    "lrq_clip_correction": (_I32, [_P, _P, _I64, _I64, _P, _P, _I64, _P, _I64, _F, _P, _P, _I32]),
    "lrq_scales": (None, [_P, _I64, _F, _F, _P, _P]),
    "lrq_dy_pass": (None, [_P, _P, _P, _P, _F, _I64, _I64, _P, _P, _I32]),
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return c
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lrqat-export" / "native"


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"fused_native_{key}.so"
    if out.exists():
        try:
            os.utime(out)  # loaded now: not stale (`_prune`)
        except OSError:
            pass  # a read-only cache: the library still loads
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                             timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(res.stderr.strip().splitlines() or [''])[-1][:200]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _prune(out)
    return out


def _prune(keep: Path) -> None:
    """Remove the cached libraries beside `keep` that no process has loaded for STALE_DAYS (their mtime: `_build`
    touches a library each time it loads it). A library in use stays mapped even if another checkout removes it."""
    cutoff = time.time() - STALE_DAYS * 86400
    for old in keep.parent.glob("fused_native_*.so"):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass  # removed meanwhile by another process, or not ours to remove


def lib() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None where it cannot be (why: `why_off()`) or is turned off."""
    if "lib" not in _STATE:
        _STATE["lib"] = None
        if os.environ.get(ENV_OFF, "1") == "0":
            _STATE["why"] = f"{ENV_OFF}=0"
        else:
            try:
                so = ctypes.CDLL(str(_build()))
                for name, (res, args) in _SIGNATURES.items():
                    fn = getattr(so, name)
                    fn.restype, fn.argtypes = res, args
                _STATE["lib"] = so
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _STATE["why"] = f"{type(e).__name__}: {e}"
                log.warning("native CPU kernel of the fused quantizer not built (%s): its compiled passes run "
                            "instead, same numbers", _STATE["why"])
    return _STATE["lib"]  # type: ignore[return-value]


def why_off() -> str | None:
    return _STATE.get("why")  # type: ignore[return-value]


def reset(enabled: bool | None = None) -> None:
    """Forget the loaded kernel (tests, benchmarks); `enabled` False sets LRQAT_FUSED_NATIVE=0, True clears it."""
    _STATE.clear()
    if enabled is False:
        os.environ[ENV_OFF] = "0"
    elif enabled is True:
        os.environ.pop(ENV_OFF, None)


def storage(phi: str, phi0: torch.Tensor, spec, upcast) -> tuple[int, float] | None:
    """(kind, divisor) of Φ0's storage for the kernel, or None where it does not read it. The fixed-point divisor
    2^frac is read off the upcast itself (the value it gives an int8 1), so it is the eager layer's by construction."""
    kind = KINDS.get(phi)
    if kind is None or phi0.device.type != "cpu" or not phi0.is_contiguous():
        return None
    if kind != 2:
        return kind, 1.0
    key = (spec.bits, phi)
    if key not in _FRAC:
        _FRAC[key] = 1.0 / float(upcast(torch.ones(1, 1, dtype=torch.int8), spec, phi))
    return kind, _FRAC[key]


_SCRATCH = threading.local()  # per thread: {role: float32 buffer} reused across calls, grown to the largest shape


def scratch(role: str, out_f: int, in_f: int) -> torch.Tensor:
    """A float32 (out_f, in_f) view of this thread's buffer for `role`, the same memory on every call (grown when a
    larger shape asks): for the weight-sized temporaries (Ŵ, A·B) whose life ends inside one call of the fused layer.
    Allocating them afresh costs page faults on the CPU (glibc hands large blocks back to the OS and maps them again);
    one buffer a role holds what one such temporary of the largest layer does at a time anyway."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    n = out_f * in_f
    buf = bufs.get(role)
    if buf is None or buf.numel() < n:
        buf = bufs[role] = torch.empty(n)
    return buf[:n].view(out_f, in_f)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def forward(phi0, kind: int, div: float, ab, ls: float, s16, zf, qmin: int, qmax: int, events: bool,
            limit: float, in_place: bool = False):
    """(Ŵ (out, in) float32, events | None) from one pass; events = (pos int32 | int64, Ŵ there, (Kc, 2) clipped
    (row, column) int64), exactly sized; None without events or past `limit` of them. s16, zf: (out, G) float32,
    contiguous. in_place: Ŵ overwrites ab (float32 (out, in), contiguous), which the caller no longer needs."""
    out_f, in_f = phi0.shape
    w = ab if in_place else torch.empty(out_f, in_f)
    counts = (ctypes.c_int64 * 3)()
    h = lib().lrq_forward(_ptr(phi0), kind, div, _ptr(ab), ls, _ptr(s16), _ptr(zf), out_f, in_f,
                          in_f // s16.shape[1], qmin, qmax, _ptr(w), int(events), int(limit), counts,
                          torch.get_num_threads())
    n, nclip, status = counts
    if not events or status:
        if h:  # events were collected (past the limit): free them
            lib().lrq_take(h, None, 0, None, None, in_f)
        if status == 2:
            raise MemoryError("fused_native: out of memory collecting the forward's events")
        return w, None
    pos64 = phi0.numel() >= 2 ** 31
    pos = torch.empty(n, dtype=torch.int64 if pos64 else torch.int32)
    vals, clip = torch.empty(n), torch.empty(nclip, 2, dtype=torch.int64)
    lib().lrq_take(h, _ptr(pos), int(pos64), _ptr(vals), _ptr(clip), in_f)
    return w, (pos, vals, clip)


def rebuild(phi0, kind: int, div: float, s16, zf, qmin: int, qmax: int, pos, vals, reuse: bool = False
            ) -> torch.Tensor:
    """RTN's Ŵ from Φ0 with the forward's values put back at its events: the forward's Ŵ bit for bit."""
    out_f, in_f = phi0.shape
    w = scratch("w", out_f, in_f) if reuse else torch.empty(out_f, in_f)
    lib().lrq_rebuild(_ptr(phi0), kind, div, _ptr(s16), _ptr(zf), out_f, in_f, in_f // s16.shape[1], qmin, qmax,
                      _ptr(w), _ptr(pos), int(pos.dtype == torch.int64), _ptr(vals), pos.shape[0],
                      torch.get_num_threads())
    return w


def scales(scale: torch.Tensor, tiny: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s16, keep), float32 like `scale` (contiguous float32): fp16(clamp(scale, tiny, hi)) as float32, and 1.0 where
    the clamp was the identity, else 0.0."""
    s16, keep = torch.empty_like(scale), torch.empty_like(scale)
    lib().lrq_scales(_ptr(scale), scale.numel(), tiny, hi, _ptr(s16), _ptr(keep))
    return s16, keep


def dy_pass(dy, y, bias, s, ls: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gs_t, dsum): gs_t = (dy·diag(s·ls))ᵀ (out, T), dsum = Σ_t dy·(y − bias) (out,). dy, y (T, out), bias (out,)
    | None, s (out, 1): contiguous float32."""
    n_tok, out_f = dy.shape
    gs_t, dsum = torch.empty(out_f, n_tok), torch.empty(out_f)
    lib().lrq_dy_pass(_ptr(dy), _ptr(y), _ptr(bias), _ptr(s), ls, n_tok, out_f, _ptr(gs_t), _ptr(dsum),
                      torch.get_num_threads())
    return gs_t, dsum


def clip_correction(gs_t, x2, a, b, idx, neg: float, da, db) -> None:
    """da += the clipped entries' part of dA, db += theirs of dB, in place: neg·Σ_t gs_t[i, t]·x2[t, j] at each
    (i, j) of idx (fused._correction_csr's values when gs_t = (dy·S)ᵀ and neg = −α/r; `dy_pass`'s gs_t has α/r in it,
    then neg = −1). gs_t (out, T), x2 (T, in), a (out, r), b (r, in), da (out, r), db (r, in): contiguous float32;
    idx (K, 2) int64."""
    rc = idx.contiguous()
    res = lib().lrq_clip_correction(_ptr(gs_t), _ptr(x2), x2.shape[0], x2.shape[1], _ptr(a), _ptr(b), a.shape[1],
                                    _ptr(rc), rc.shape[0], neg, _ptr(da), _ptr(db), torch.get_num_threads())
    if res != 0:
        raise MemoryError("fused_native: out of memory in the clip correction")
