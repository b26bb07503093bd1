"""The quantization grid shared by training, fusing and every export format.

Integer codes are *signed*: c ∈ [-2^(b-1), 2^(b-1)-1]. A weight group with scale s and integer zero point z
(z = 0 for symmetric grids) dequantizes to

    w = s · (c − z)                                   (computed in float32: exact, see below)

with one (s, z) per output channel (group_size = -1) or per `group_size` consecutive input features.
The formats see unsigned codes q = c + 2^(b-1): GGUF Q4_0 stores q = c + 8 and d = s (w = d·(q − 8)); GPTQ stores
q and the unsigned zero z + 2^(b-1) (8 for symmetric 4-bit).

Exactness rule (docs/ARCHITECTURE.md): GGUF and GPTQ store scales as fp16, so every scale used in a forward pass is
fp16-representable (`fp16_round`). Then s·(c − z) has at most 11 + 9 significant bits and is exact in float32, so
the float32 weights of the trained model, of the fused IntCheckpoint and of every export's dequantization are the
same numbers bit for bit.

Rounding is torch.round (half to even) everywhere on the torch side; ties in the stored Φ0 are removed when it is
built (lrqat_linear.py), so the rounding mode never decides a code at A·B = 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal); scales are clamped above it

RANGE_METHODS = ("minmax", "mse", "lp")


@dataclass(frozen=True)
class QuantSpec:
    """One quantization grid: what the exported integers mean. Validated on construction."""

    bits: int = 4  # code width b: codes in [-2^(b-1), 2^(b-1)-1]
    group_size: int = -1  # -1 = one scale per output channel; else input features per scale group
    symmetric: bool = True  # False: an integer zero point per group (asymmetric grid)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise UserError(f"QuantSpec.bits: expected an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size >= 2):
            raise UserError(f"QuantSpec.group_size: expected -1 (per channel) or an integer >= 2, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise UserError(f"QuantSpec.symmetric: expected a bool, got {self.symmetric!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        for preset, spec in PRESETS.items():
            if spec == self:
                return preset
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{g}{'' if self.symmetric else 'a'}"

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int) -> None:
        """Refuse a layer whose input width the grid does not tile (e.g. SmolLM2's 576 with group 128)."""
        if self.group_size != -1 and in_features % self.group_size != 0:
            raise UserError(
                f"layer {name}: in_features {in_features} is not divisible by group_size {self.group_size} "
                f"(spec {self.name}); use a group size that divides every layer's input width "
                f"(e.g. 32, 64 or -1 for per channel)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "name": self.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        if not isinstance(d, dict):
            raise UserError(f"QuantSpec: expected a mapping of its fields, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields - {"name"}
        if unknown:
            raise UserError(f"QuantSpec: unknown keys {sorted(unknown)}; expected {sorted(fields)}")
        return cls(**{k: v for k, v in d.items() if k in fields})


# Presets are named after the target they export exactly to (docs/ARCHITECTURE.md, grid table).
PRESETS: dict[str, QuantSpec] = {
    "q4_0": QuantSpec(bits=4, group_size=32, symmetric=True),  # GGUF Q4_0, GPTQ 4-bit g32 sym
    "q8_0": QuantSpec(bits=8, group_size=32, symmetric=True),  # GGUF Q8_0, GPTQ 8-bit g32 sym
    "q4_1": QuantSpec(bits=4, group_size=32, symmetric=False),  # GGUF Q4_1, GPTQ 4-bit g32 asym
    "w4pc": QuantSpec(bits=4, group_size=-1, symmetric=True),  # paper's W4 per channel; Q4_0 blocks inherit
    "w4g64": QuantSpec(bits=4, group_size=64, symmetric=True),
    "w3g64": QuantSpec(bits=3, group_size=64, symmetric=True),  # GPTQ 3-bit only (no exact GGUF type)
    "w4g128": QuantSpec(bits=4, group_size=128, symmetric=True),  # paper's g128; not for 576-wide SmolLM2
    "w3g128": QuantSpec(bits=3, group_size=128, symmetric=True),
    "w8pc": QuantSpec(bits=8, group_size=-1, symmetric=True),
    "w2g64a": QuantSpec(bits=2, group_size=64, symmetric=False),
}


DEFAULT_PRESET = "w4pc"  # the grid every verb uses when none is named


def spec_from_args(preset: str | None, bits: int | None, group_size: int | None, asym: bool) -> QuantSpec:
    """Preset first, then explicit options override it (CLI: --preset q4_0 --bits 3 ...)."""
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"--preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        base = PRESETS[preset]
    else:
        base = PRESETS[DEFAULT_PRESET] if bits is None and group_size is None and not asym else QuantSpec()
    return QuantSpec(
        bits=base.bits if bits is None else bits,
        group_size=base.group_size if group_size is None else group_size,
        symmetric=base.symmetric and not asym,
    )


# ---------------------------------------------------------------------------------------------------------------
# Pure functions on weight tensors. W is (out, in) float; scales/zeros are (out, G).


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16-representable value (kept in x's dtype), clamped into fp16's positive range."""
    return x.clamp(FP16_TINY, FP16_MAX).to(torch.float16).to(x.dtype)


def grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(out, in) -> (out, G, g) view for per-group math."""
    out_f, in_f = w.shape
    return w.reshape(out_f, spec.n_groups(in_f), spec.group_len(in_f))


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest codes c = clip(round(w/s + z)) as int8, shape (out, in). The one place RTN rounding happens."""
    x = grouped(w.float(), spec) / scales.float().unsqueeze(-1)  # (out, G, g)
    if zeros is not None:
        x = x + zeros.float().unsqueeze(-1)
    return torch.round(x).clamp_(spec.qmin, spec.qmax).reshape(w.shape).to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """w = s · (c − z) in float32, shape (out, in). Exact for fp16 scales (see module docstring)."""
    c = grouped(codes.float(), spec)  # (out, G, g)
    if zeros is not None:
        c = c - zeros.float().unsqueeze(-1)
    return (c * scales.float().unsqueeze(-1)).reshape(codes.shape)


def _candidate_params(
    lo: torch.Tensor, hi: torch.Tensor, ratio: float, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (fp16-representable) and zero point for the clipping range [ratio·lo, ratio·hi] of each group."""
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs()) * ratio
        # Symmetric signed grid: the largest magnitude maps to the negative end (-2^(b-1)) or positive end.
        # Using qmax keeps both ±amax representable without clipping (the usual choice, e.g. AutoGPTQ uses 2·amax/maxq).
        return fp16_round(amax / spec.qmax), None
    lo_r, hi_r = torch.clamp(lo * ratio, max=0.0), torch.clamp(hi * ratio, min=0.0)  # range always holds 0
    s = fp16_round((hi_r - lo_r) / (spec.qmax - spec.qmin))
    z = torch.round(spec.qmin - lo_r / s).clamp_(spec.qmin, spec.qmax)
    return s, z


def init_scales(
    w: torch.Tensor, spec: QuantSpec, method: str = "lp", p: float = 4.0, n_grid: int = 40, min_ratio: float = 0.4
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Range search for per-group scales (and zero points): 'minmax', or a grid search over clipping ratios that
    minimises the MSE ('mse', p = 2) or the Lp norm of the quantization error ('lp', paper default p = 4).

    Returns scales (out, G) float32 holding fp16-representable values, zeros (out, G) float32 integers or None.
    Error is evaluated with the fp16-rounded scales the exported model will use.
    """
    if method not in RANGE_METHODS:
        raise UserError(f"range method: expected one of {RANGE_METHODS}, got {method!r}")
    wg = grouped(w.detach().float(), spec)  # (out, G, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (out, G)
    best_s, best_z = _candidate_params(lo, hi, 1.0, spec)
    if method == "minmax":
        return best_s, best_z
    p = 2.0 if method == "mse" else p
    best_err = torch.full_like(lo, float("inf"))
    for ratio in torch.linspace(1.0, min_ratio, n_grid).tolist():
        s, z = _candidate_params(lo, hi, ratio, spec)
        x = wg / s.unsqueeze(-1)
        if z is not None:
            x = x + z.unsqueeze(-1)
        c = torch.round(x).clamp_(spec.qmin, spec.qmax)
        if z is not None:
            c = c - z.unsqueeze(-1)
        e = c * s.unsqueeze(-1) - wg
        err = (e.square_().square_() if p == 4.0 else e.abs_().pow_(p)).sum(dim=-1)  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def rtn_quantize(
    w: torch.Tensor, spec: QuantSpec, method: str = "lp"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PTQ round-to-nearest with range search: (codes int8 (out,in), scales fp16 (out,G), zeros int8 (out,G) | None)."""
    s, z = init_scales(w, spec, method)
    codes = quantize_codes(w, s, z, spec)
    return codes, s.to(torch.float16), None if z is None else z.to(torch.int8)
