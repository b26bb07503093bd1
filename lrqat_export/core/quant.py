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

RANGE_METHODS = ("minmax", "mse", "lp", "imatrix")  # imatrix: needs per-input-channel importance (init_scales)

K_SUPER = 256  # ggml's QK_K: weights per K-quant super-block
K_GRIDS = {"q4_k": (4, 32, False), "q5_k": (5, 32, False), "q6_k": (6, 16, True)}  # name: (bits, group, symmetric)
K_TYPES = {(b, sym) for b, _, sym in K_GRIDS.values()}
PLANS = ("q4_k_m", "q4_k_s")


@dataclass(frozen=True)
class QuantSpec:
    """One quantization grid: what the exported integers mean. Validated on construction."""

    bits: int = 4  # code width b: codes in [-2^(b-1), 2^(b-1)-1]
    group_size: int = -1  # -1 = one scale per output channel; else input features per scale group
    symmetric: bool = True  # False: an integer zero point per group (asymmetric grid)
    # 256: a GGUF K-quant grid (two-level scales, see "K grids" below); 0: one fp16 scale per group
    super_block: int = 0
    # a per-layer type plan (PLANS, e.g. "q4_k_m"): each layer trains on the grid `plan_layer_specs` gives it; the
    # other fields are the plan's main grid
    plan: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise UserError(f"QuantSpec.bits: expected an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size >= 2):
            raise UserError(f"QuantSpec.group_size: expected -1 (per channel) or an integer >= 2, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise UserError(f"QuantSpec.symmetric: expected a bool, got {self.symmetric!r}")
        if self.super_block not in (0, K_SUPER):
            raise UserError(f"QuantSpec.super_block: expected 0 or {K_SUPER} (a GGUF K-quant grid), "
                            f"got {self.super_block!r}")
        if self.super_block and (self.group_size not in (16, 32) or (self.bits, self.symmetric) not in K_TYPES):
            grids = ", ".join(f"{n} (bits {b}, group_size {g}, symmetric {sym})" for n, (b, g, sym) in K_GRIDS.items())
            raise UserError(f"QuantSpec: a K grid (super_block {K_SUPER}) is one of {grids}; got bits {self.bits}, "
                            f"group_size {self.group_size}, symmetric {self.symmetric}")
        if self.plan and self.plan not in PLANS:
            raise UserError(f"QuantSpec.plan: expected one of {sorted(PLANS)} or empty, got {self.plan!r}")

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
        return f"w{self.bits}{g}{'' if self.symmetric else 'a'}{'k' if self.super_block else ''}"

    @property
    def is_k(self) -> bool:
        """A two-level GGUF K-quant grid (q4_k, q5_k, q6_k)."""
        return self.super_block > 0

    @property
    def sub_range(self) -> tuple[int, int]:
        """K grids: the integer range of a sub-block's scale (and min): 6-bit unsigned for Q4_K/Q5_K, int8 for
        Q6_K (the lowest kept at 1 so no sub-block divides by zero)."""
        return (1, 63) if not self.symmetric else (1, 127)

    @property
    def offset(self) -> int:
        """Unsigned code q = c + offset as the format stores it (asymmetric K grids: q ∈ [0, 2^b − 1])."""
        return 0 if self.symmetric else 2 ** (self.bits - 1)

    def n_super(self, in_features: int) -> int:
        return in_features // self.super_block if self.super_block else 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int) -> None:
        """Refuse a layer whose input width the grid does not tile (e.g. SmolLM2's 576 with group 128)."""
        if self.plan:
            raise UserError(f"layer {name}: spec {self.name} is a per-layer plan; expected the layer's own grid "
                            f"(core.quant.plan_layer_specs)")
        if self.super_block and in_features % self.super_block:
            raise UserError(f"layer {name}: in_features {in_features} is not a multiple of {self.super_block}, the "
                            f"super-block of {self.name}; plans (q4_k_m, q4_k_s) fall such layers back as llama.cpp "
                            f"does, a plain K grid cannot")
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
    "q5_0": QuantSpec(bits=5, group_size=32, symmetric=True),  # GGUF Q5_0 (a K plan's fallback for Q4_K)
    "q5_1": QuantSpec(bits=5, group_size=32, symmetric=False),  # GGUF Q5_1 (the fallback for Q5_K)
    # GGUF K-quants: 256-weight super-blocks, an fp16 d (and dmin) each, integer sub-block scales (and mins)
    "q4_k": QuantSpec(bits=4, group_size=32, symmetric=False, super_block=256),
    "q5_k": QuantSpec(bits=5, group_size=32, symmetric=False, super_block=256),
    "q6_k": QuantSpec(bits=6, group_size=16, symmetric=True, super_block=256),
    # llama.cpp's per-tensor mixtures (src/llama-quant.cpp), each layer trained on its own grid
    "q4_k_m": QuantSpec(bits=4, group_size=32, symmetric=False, super_block=256, plan="q4_k_m"),
    "q4_k_s": QuantSpec(bits=4, group_size=32, symmetric=False, super_block=256, plan="q4_k_s"),
}


DEFAULT_PRESET = "w4pc"  # the grid every verb uses when none is named


def spec_from_args(preset: str | None, bits: int | None, group_size: int | None, asym: bool) -> QuantSpec:
    """Preset first, then explicit options override it (CLI: --preset q4_0 --bits 3 ...)."""
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"--preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        base = PRESETS[preset]
        if base.super_block and (bits is not None or group_size is not None or asym):
            raise UserError(f"--preset {preset}: a K grid or plan fixes bits, group size and symmetry; expected no "
                            f"--bits/--group-size/--asym, got bits {bits}, group_size {group_size}, asym {asym}")
        if base.super_block:
            return base
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


def imatrix_weights(wg: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Per-weight error weights of the 'imatrix' range search, (out, G, g) from grouped weights wg (out, G, g) and
    the layer's input importance (in,) (mean squared activation per input feature, `rtn.activation_importance`):
    importance_j · sqrt(σ²_group + w_j²), llama.cpp's weighting for its legacy types with an importance matrix
    (ggml-quants.c, quantize_row_q4_0_impl): an error counts as much as the input it multiplies, and more on the
    group's large weights."""
    imp = importance.detach().float().reshape(1, wg.shape[1], wg.shape[2])
    return imp * (wg.square().mean(dim=-1, keepdim=True) + wg.square()).sqrt()


def _check_importance(method: str, importance: torch.Tensor | None, in_features: int) -> None:
    """The imatrix search needs the layer's input importance (in,); no other range method takes one."""
    if (method == "imatrix") != (importance is not None):
        raise UserError(f"range method {method!r}: an input importance is "
                        f"{'required' if method == 'imatrix' else 'used only by imatrix'}")
    if importance is not None and tuple(importance.shape) != (in_features,):
        raise UserError(f"range method imatrix: importance shape expected ({in_features},), got "
                        f"{tuple(importance.shape)}")


def init_scales(
    w: torch.Tensor, spec: QuantSpec, method: str = "lp", p: float = 4.0, n_grid: int = 40, min_ratio: float = 0.4,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Range search for per-group scales (and zero points): 'minmax', or a grid search over clipping ratios that
    minimises the MSE ('mse', p = 2), the Lp norm of the quantization error ('lp', paper default p = 4), or the
    squared error weighted by the layer's input importance ('imatrix': `imatrix_weights`; `importance` (in,) is
    required and is used by no other method).

    Returns scales (out, G) float32 holding fp16-representable values, zeros (out, G) float32 integers or None.
    Error is evaluated with the fp16-rounded scales the exported model will use.
    """
    if method not in RANGE_METHODS:
        raise UserError(f"range method: expected one of {RANGE_METHODS}, got {method!r}")
    _check_importance(method, importance, w.shape[1])
    wg = grouped(w.detach().float(), spec)  # (out, G, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (out, G)
    best_s, best_z = _candidate_params(lo, hi, 1.0, spec)
    if method == "minmax":
        return best_s, best_z
    weight = None if importance is None else imatrix_weights(wg, importance)
    p = 2.0 if method in ("mse", "imatrix") else p
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
        e = e.square_().square_() if p == 4.0 else e.abs_().pow_(p)
        err = (e if weight is None else e.mul_(weight)).sum(dim=-1)  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def rtn_quantize(
    w: torch.Tensor, spec: QuantSpec, method: str = "lp", importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PTQ round-to-nearest with range search: (codes int8 (out,in), scales fp16 (out,G), zeros int8 (out,G) | None)."""
    s, z = init_scales(w, spec, method, importance=importance)
    codes = quantize_codes(w, s, z, spec)
    return codes, s.to(torch.float16), None if z is None else z.to(torch.int8)


# ---------------------------------------------------------------------------------------------------------------
# Per-layer plans: llama.cpp's Q4_K_M / Q4_K_S type choice (src/llama-quant.cpp, llama_tensor_get_type_impl and
# tensor_type_fallback), reproduced for the quantized projections.

# a K type whose super-block does not tile a row falls back to this legacy type (tensor_type_fallback)
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits(i_layer, n_layers)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def layer_category(name: str) -> str:
    """llama.cpp's tensor category of a projection, from its HF module name: attn_v (v_proj; a fused qkv_proj is
    attn_v-like too), ffn_down, or other."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("v_proj", "qkv_proj", "query_key_value", "c_attn"):
        return "attn_v"
    if leaf in ("down_proj", "w2", "c_proj") and ".mlp." in f".{name}.":
        return "ffn_down"
    return "other"


def plan_layer_specs(spec: QuantSpec, widths: dict[str, int]) -> dict[str, QuantSpec]:
    """Each quantized layer's grid, from its name and input width (`widths`, in model order). A plain spec gives
    every layer itself; a plan gives llama.cpp's choice for that tensor:

        q4_k_m   attn_v and ffn_down: Q6_K on use_more_bits layers (i < n/8, i ≥ 7n/8, (i − n/8) % 3 = 2), else Q4_K
        q4_k_s   attn_v: Q5_K on the first 4 layers; ffn_down: Q5_K where i < n/8; else Q4_K

    then, where the row length is not a multiple of 256: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0 (SmolLM2's 576-wide
    inputs). A width that is not a multiple of 32 either is refused (llama.cpp would keep it F16: not a trained grid).
    """
    if not spec.plan:
        return {n: spec for n in widths}
    counts = {c: sum(layer_category(n) == c for n in widths) for c in ("attn_v", "ffn_down")}
    seen = {"attn_v": 0, "ffn_down": 0}
    out = {}
    for name, width in widths.items():
        cat = layer_category(name)
        grid = "q4_k"
        if cat in seen:
            i, n = seen[cat], counts[cat]
            seen[cat] += 1
            if spec.plan == "q4_k_m" and _more_bits(i, n):
                grid = "q6_k"
            elif spec.plan == "q4_k_s" and (i < 4 if cat == "attn_v" else i < n // 8):
                grid = "q5_k"
        if width % K_SUPER:
            grid = K_FALLBACK[grid]
        if width % PRESETS[grid].group_size:
            raise UserError(f"layer {name}: in_features {width} is a multiple of neither {K_SUPER} nor 32; plan "
                            f"{spec.plan} has no trainable grid for it (llama.cpp would keep it F16)")
        out[name] = PRESETS[grid]
    return out


# ---------------------------------------------------------------------------------------------------------------
# K grids (GGUF Q4_K, Q5_K, Q6_K). Per super-block of 256 weights of a row: an fp16 super-scale d (and, for the
# asymmetric Q4_K/Q5_K, an fp16 dmin); per sub-block of group_size weights: an integer scale sc (and min m). With
# unsigned codes q = c + offset, ggml dequantizes (dequantize_row_q4_K / _q5_K / _q6_K) in float32 as
#
#     Q4_K, Q5_K:   d1 = d·sc;  m1 = dmin·m;  w = d1·q − m1          (sc, m ∈ [0, 63])
#     Q6_K:         w = (d·sc)·c                                      (sc ∈ [−128, 127], c ∈ [−32, 31])
#
# d·sc (≤ 11 + 7 bits) and d1·q (≤ 23 bits) are exact in float32; the subtraction rounds once, the same way in
# ggml (a fused multiply-add gives the same result because d1·q is exact), in gguf-py and here. `dequantize_k`
# performs exactly these operations, so the trained forward, the IntCheckpoint and the GGUF file agree bit for bit.
# Arrays: d, dmin (out, S) float holding fp16 values (S = in/256); sc, m (out, G) integers (G = in/group_size).


def per_sub_block(sup: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(out, S) super-block values → (out, G) float32: each repeated over its sub-blocks."""
    return sup.float().repeat_interleave(spec.super_block // spec.group_size, dim=1)


def sub_value(sup: torch.Tensor, sub: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """d·sc per sub-block, float32 (out, G): each super-block value repeated over its sub-blocks times the integer."""
    return per_sub_block(sup, spec) * sub.float()


def dequantize_k(codes: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor | None,
                 m: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """w (out, in) float32 of a K grid, in ggml's order of operations (see above)."""
    q = grouped(codes.float() + spec.offset, spec)  # (out, G, g) unsigned codes (signed for Q6_K)
    w = sub_value(d, sc, spec).unsqueeze(-1) * q
    if not spec.symmetric:
        w = w - sub_value(dmin, m, spec).unsqueeze(-1)
    return w.reshape(codes.shape)


def k_code_units(w: torch.Tensor, d1: torch.Tensor, m1: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """x = (w + m1)/d1 − offset: w in signed code units of a K grid (round and clip it to get the codes)."""
    x = grouped(w.float(), spec)
    if m1 is not None:
        x = x + m1.unsqueeze(-1)
    return (x / d1.unsqueeze(-1) - spec.offset).reshape(w.shape)


def _k_error(wg: torch.Tensor, d1: torch.Tensor, m1: torch.Tensor | None, spec: QuantSpec, p: float,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ |ŵ − w|^p per sub-block (out, G) for sub-block scale d1 (and min m1), codes by round-to-nearest; with
    `weight` (out, G, g), Σ weight·(ŵ − w)² (the imatrix search)."""
    x = wg + (m1.unsqueeze(-1) if m1 is not None else 0.0)
    q = torch.round(x / d1.unsqueeze(-1) - spec.offset).clamp_(spec.qmin, spec.qmax) + spec.offset
    e = q * d1.unsqueeze(-1) - (m1.unsqueeze(-1) if m1 is not None else 0.0) - wg
    if weight is not None:
        return e.square_().mul_(weight).sum(-1)
    return e.square_().square_().sum(-1) if p == 4.0 else e.abs_().pow_(p).sum(-1)


def init_k(w: torch.Tensor, spec: QuantSpec, method: str = "lp", p: float = 4.0, n_grid: int = 24,
           min_ratio: float = 0.5, importance: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Range initialisation of a K grid, in the spirit of llama.cpp's make_qkx2_quants / make_qx_quants: per
    sub-block, a search over clipping ratios for the float scale (and min, the sub-block's minimum clamped to ≤ 0
    as ggml does) minimising the Lp error (p = 4; 'mse': p = 2; 'minmax': no search; 'imatrix': the squared error
    weighted by `imatrix_weights` of the layer's input importance (in,), required by it and used by no other
    method, as llama.cpp's K quantizers weigh it with an importance matrix); then the super-block scales
    d = max sc_float / sc_max (dmin likewise) rounded to fp16, the sub-block integers by rounding, and a last pass
    that tries each integer ±1 (scale and min jointly) against the error of the codes they give (the same
    weighted error under 'imatrix').

    Returns (d (out, S), sc (out, G), dmin (out, S) | None, m (out, G) | None), all float32 holding the exact
    stored values (fp16 values and integers)."""
    if method not in RANGE_METHODS:
        raise UserError(f"range method: expected one of {RANGE_METHODS}, got {method!r}")
    _check_importance(method, importance, w.shape[1])
    p = 2.0 if method in ("mse", "imatrix") else p
    wg = grouped(w.detach().float(), spec)  # (out, G, g)
    weight = None if importance is None else imatrix_weights(wg, importance)
    lo, hi = wg.amin(-1).clamp(max=0.0), wg.amax(-1).clamp(min=0.0)
    levels = spec.qmax - spec.qmin

    def params(ratio: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if spec.symmetric:
            return torch.maximum(-lo, hi) * ratio / spec.qmax, None
        return (hi - lo) * ratio / levels, -lo * ratio

    best_s, best_m = params(1.0)
    if method != "minmax":
        best_err = torch.full_like(lo, float("inf"))
        for ratio in torch.linspace(1.0, min_ratio, n_grid).tolist():
            s, m = params(ratio)
            err = _k_error(wg, s.clamp(min=FP16_TINY), m, spec, p, weight)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            if m is not None:
                best_m = torch.where(better, m, best_m)
    lo_i, hi_i = spec.sub_range
    per = spec.super_block // spec.group_size

    def split(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = v.reshape(v.shape[0], -1, per).amax(-1)  # (out, S)
        sup = fp16_round(top / hi_i)
        sub = torch.round(v / per_sub_block(sup, spec)).clamp_(lo_i, hi_i)
        return sup, sub

    d, sc = split(best_s)
    dmin, m = split(best_m) if best_m is not None else (None, None)
    if m is not None:
        m = torch.round(best_m / per_sub_block(dmin, spec)).clamp_(0, hi_i)  # a min may be 0
    # integer refinement: each sub-block's (sc, m) ± 1, judged by the error of the codes they give
    best_err = _k_error(wg, sub_value(d, sc, spec), None if m is None else sub_value(dmin, m, spec), spec, p,
                        weight)
    steps = [(a, b) for a in (-1, 0, 1) for b in ((-1, 0, 1) if m is not None else (0,)) if (a, b) != (0, 0)]
    sc0, m0 = sc.clone(), None if m is None else m.clone()
    for a, b in steps:
        sc_t = (sc0 + a).clamp(lo_i, hi_i)
        m_t = None if m0 is None else (m0 + b).clamp(0, hi_i)
        err = _k_error(wg, sub_value(d, sc_t, spec), None if m_t is None else sub_value(dmin, m_t, spec), spec, p,
                       weight)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        sc = torch.where(better, sc_t, sc)
        if m is not None:
            m = torch.where(better, m_t, m)
    return d, sc, dmin, m


def quantize_codes_k(w: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor | None,
                     m: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest signed codes (out, in) int8 of a K grid for the given super/sub-block values."""
    x = k_code_units(w, sub_value(d, sc, spec), None if m is None else sub_value(dmin, m, spec), spec)
    return torch.round(x).clamp_(spec.qmin, spec.qmax).to(torch.int8)
