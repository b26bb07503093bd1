"""IntCheckpoint → GGUF (llama.cpp), written straight from the integer codes; read-back and inspect beside it.

Legacy GGUF blocks hold 32 weights of one row with fp16 fields (formats.md A2), and dequantize as

    Q4_0, Q5_0:  w = d·(q − 2^(b−1))        Q8_0:  w = d·q (q signed)        Q4_1, Q5_1:  w = d·q + m

An IntCheckpoint layer holds signed codes c ∈ [−2^(b−1), 2^(b−1)−1], fp16 scales s and (asymmetric) integer zeros z
with w = s·(c − z). Every 32-block lies inside one scale group (group size a multiple of 32, or per channel), so
the block inherits its group's (s, z) and

    symmetric:   q = c + 2^(b−1), d = s              → d·(q − 2^(b−1)) = s·c           exact
    Q8_0:        q = c,           d = s              → s·c                             exact
    asymmetric:  q = c + 2^(b−1), d = s, m = fp16(−s·(z + 2^(b−1)))  → s·(c − z) + (m − (−s·(z + 2^(b−1))))

so Q4_1/Q5_1 are exact where s·(z + 2^(b−1)) is fp16-representable and otherwise off by the fp16 rounding of m,
at most 2^−11·|m| < 2^(b−1)·2^−10·s — never more than a 1/64 step at 4 bits (measured by `verify_gguf`).

K grids (q4_k, q5_k, q6_k; core/quant.py "K grids") are stored as they were trained: the IntCheckpoint holds
ggml's own fields (fp16 d and dmin per 256 weights, integer sub-block scales and mins, codes), so Q4_K, Q5_K and
Q6_K blocks are a repacking of those integers (`pack_k`, formats.md A2) and exact. A per-layer plan (q4_k_m,
q4_k_s) writes each layer in its own type; token embeddings and the output take llama.cpp's choice for the plan
(`embed_plan`), rounded here at export (they are not trained).
Weights are never dequantized and re-quantized: re-running a GGUF quantizer on s·W_int moves codes (the naive
path, scripts/gguf_direct_vs_naive.py).

Per architecture (ARCHS), as convert_hf_to_gguf: Llama/Mistral store Q and K rows in llama.cpp's interleaved
RoPE order (`permute`): rows of codes, scales, zeros and biases are permuted together; Qwen2/Qwen3/Gemma 3/Phi-3
use NEOX RoPE and are not permuted. Gemma 3's RMSNorm weights are written as 1 + w (its norm computes x·(1 + w)).
Phi-3's fused qkv_proj / gate_up_proj stay fused (attn_qkv, ffn_up holding gate then up, as llama.cpp splits
them). Tensor names come from gguf-py's TensorNameMap; the rope tables (Llama 3 rope_freqs, LongRoPE factors) and
the metadata from gguf_meta.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from lrqat_export.core.errors import UserError
from lrqat_export.core.fsio import atomic_path, check_apart, check_output_path, claim_output
from lrqat_export.core.intckpt import IntCheckpoint, load_intckpt
from lrqat_export.core.quant import K_SUPER, PRESETS, QuantSpec, init_k, quantize_codes_k, sub_value

from . import gguf_meta as M

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Format tables.

BLOCK = 32  # weights per block in every legacy type
# ggml type → (weights per block, bytes per block): the layouts of formats.md A2, as arithmetic.
LAYOUT: dict[QT, tuple[int, int]] = {
    QT.Q4_0: (BLOCK, 2 + BLOCK // 2),  # d, 16 nibble bytes
    QT.Q4_1: (BLOCK, 2 + 2 + BLOCK // 2),  # d, m, 16 nibble bytes
    QT.Q5_0: (BLOCK, 2 + 4 + BLOCK // 2),  # d, qh (u32 of 5th bits), 16 nibble bytes
    QT.Q5_1: (BLOCK, 2 + 2 + 4 + BLOCK // 2),  # d, m, qh, nibbles
    QT.Q8_0: (BLOCK, 2 + BLOCK),  # d, 32 int8
}
# ggml type → offset o of its unsigned codes q = c + o (Q8_0 stores the signed code itself)
OFFSET: dict[QT, int] = {QT.Q4_0: 8, QT.Q4_1: 8, QT.Q5_0: 16, QT.Q5_1: 16, QT.Q8_0: 0}
# (bits, symmetric) → the type that stores these codes at their own width.
NATIVE_TYPES: dict[tuple[int, bool], QT] = {
    (4, True): QT.Q4_0, (4, False): QT.Q4_1, (5, True): QT.Q5_0, (5, False): QT.Q5_1, (8, True): QT.Q8_0,
}
K_TYPES: dict[str, QT] = {"q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K}  # K grid name → ggml type
FILE_TYPES: dict[QT | str, gguf.LlamaFileType] = {  # the linear layers' type (or the plan) → general.file_type
    QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, QT.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    QT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S, QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q4_k_s": gguf.LlamaFileType.MOSTLY_Q4_K_S,
}
# token_embd / output: a type, or "auto" (a K plan or grid: llama.cpp's choice, `embed_plan`; otherwise f16)
EMBED_TYPES: dict[str, QT] = {"f16": QT.F16, "q8_0": QT.Q8_0, "f32": QT.F32, "q6_k": QT.Q6_K, "q4_k": QT.Q4_K,
                              "q5_0": QT.Q5_0}
EMBED_CHOICES = ("auto", *EMBED_TYPES)



@dataclass(frozen=True)
class GGUFArch:
    """How one HF architecture is written (convert_hf_to_gguf's transformations)."""

    arch: gguf.MODEL_ARCH  # llama.cpp architecture: tensor names (TensorNameMap) and metadata keys
    permute_qk: bool = False  # Q/K rows to llama.cpp's interleaved RoPE order (Llama's NORM rope; NEOX needs none)
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma stores w, computes x·(1 + w))


ARCHS: dict[str, GGUFArch] = {
    "LlamaForCausalLM": GGUFArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": GGUFArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": GGUFArch(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": GGUFArch(gguf.MODEL_ARCH.QWEN3),
    "Gemma3ForCausalLM": GGUFArch(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0),
    "Phi3ForCausalLM": GGUFArch(gguf.MODEL_ARCH.PHI3),
}
EMBED_NAMES = ("token_embd.weight", "output.weight")
# GGUF tensor-name stem → config field giving the head count its rows are permuted with
QK_PERMUTE = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


def ggml_type_for(spec: QuantSpec, widen: bool = False) -> QT:
    """The GGUF type that holds this grid's codes exactly, or a UserError naming the spec and the types that would.

    widen=True also accepts narrower grids in the next wider type of the same symmetry (e.g. 3-bit symmetric codes
    in Q4_0, exact at 4.5 bits/weight instead of ~3.5)."""
    if spec.is_k:  # a plan: its main type (each layer's own: layer_types)
        return K_TYPES[dataclasses.replace(spec, plan="").name]
    if spec.group_size != -1 and spec.group_size % BLOCK:
        raise UserError(f"GGUF export: spec {spec.name} (group_size {spec.group_size}) cannot be written exactly: GGUF "
                        f"blocks hold {BLOCK} weights under one scale, so the group size must be {BLOCK}, a multiple "
                        f"of {BLOCK}, or -1 (per channel)")
    t = NATIVE_TYPES.get((spec.bits, spec.symmetric))
    if t is None and widen:
        wider = sorted(b for b, sym in NATIVE_TYPES if sym == spec.symmetric and b > spec.bits)
        t = NATIVE_TYPES[(wider[0], spec.symmetric)] if wider else None
    if t is None:
        exact = ", ".join(f"{t.name} ({b}-bit {'symmetric' if s else 'asymmetric'})" for (b, s), t in NATIVE_TYPES.items())
        raise UserError(f"GGUF export: spec {spec.name} ({spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'})"
                        f" has no GGUF type that stores its codes exactly; exact types: {exact}, each with group size "
                        f"{BLOCK}, a multiple of {BLOCK} or per channel; and the K grids q4_k, q5_k, q6_k (plans "
                        f"q4_k_m, q4_k_s). Narrower symmetric/asymmetric grids fit exactly into a wider type with "
                        f"widen=True (no size saving).")
    return t


def layer_types(ck: IntCheckpoint, widen: bool = False) -> dict[str, QT]:
    """Each quantized layer's GGUF type: the type of the grid it was trained on (a plan: one per layer)."""
    return {name: ggml_type_for(ck.spec_of(name), widen) for name in ck.layers}


def file_type(ck: IntCheckpoint, types: dict[str, QT]) -> tuple[gguf.LlamaFileType, str]:
    """general.file_type and the type name the provenance records: the plan, else the one linear type."""
    if ck.spec.plan:
        return FILE_TYPES[ck.spec.plan], ck.spec.plan.upper()
    (t,) = set(types.values())
    return FILE_TYPES[t], t.name


def embed_plan(ck: IntCheckpoint, embed_type: str) -> dict[str, QT]:
    """token_embd / output types. "auto" on a K grid or plan follows llama.cpp (llama_tensor_get_type_impl): the
    output — and token_embd when tied — Q6_K, or Q8_0 where rows are not a multiple of 256; an untied token_embd
    the plan's main type, Q4_K (Q5_0 where rows are not a multiple of 256). "auto" otherwise: F16. A named type:
    both tensors."""
    if embed_type not in EMBED_CHOICES:
        raise UserError(f"--embed-type: expected one of {list(EMBED_CHOICES)}, got {embed_type!r}")
    if embed_type != "auto":
        return {n: EMBED_TYPES[embed_type] for n in EMBED_NAMES}
    if not ck.spec.is_k:
        return {n: QT.F16 for n in EMBED_NAMES}
    width = ck.float_tensors["model.embed_tokens.weight"].shape[1]
    out = QT.Q6_K if width % K_SUPER == 0 else QT.Q8_0
    tied = getattr(ck.config, "tie_word_embeddings", False) or "lm_head.weight" not in ck.float_tensors
    return {"output.weight": out, "token_embd.weight": out if tied else (QT.Q4_K if width % K_SUPER == 0 else QT.Q5_0)}


def byte_shape(shape: tuple[int, int], qtype: QT) -> tuple[int, int]:
    """(rows, cols) weights → (rows, bytes per row) of qtype, or a UserError with the numbers."""
    block, size = LAYOUT[qtype] if qtype in LAYOUT else gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise UserError(f"GGUF {qtype.name}: row length {shape[-1]} is not a multiple of the block size {block}")
    return shape[0], shape[-1] // block * size


# ---------------------------------------------------------------------------------------------------------------
# Pure layout functions (numpy). Rows are output features; blocks run along the input features.


def permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half Q/K row order → llama.cpp interleaved pairs: new row 2i+j of a head = old row j·hd/2 + i."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_rows."""
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def block_fields(scales: np.ndarray, zeros: np.ndarray | None, spec: QuantSpec, in_f: int, qtype: QT
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-block d (out, nb) fp16 = the group's scale, and m (out, nb) fp16 = −s·(z + o) or None (o = OFFSET)."""
    reps = spec.group_len(in_f) // BLOCK  # 32-blocks per scale group
    d = np.repeat(scales.astype(np.float16), reps, axis=1)  # (out, nb)
    if zeros is None:
        return d, None
    m = -(scales.astype(np.float64) * (zeros.astype(np.float64) + OFFSET[qtype]))  # exact in float64
    return d, np.repeat(m.astype(np.float16), reps, axis=1)  # (out, nb): the one rounding of the asymmetric path


def offset_rounding(ck: IntCheckpoint, qtype: QT, names: list[str] | None = None) -> tuple[float, float]:
    """Asymmetric grids: (fraction of groups whose m = −s·(z + o) is not fp16-representable, largest resulting
    deviation in units of s), over `names` (default: every layer)."""
    bad = total = 0
    worst = 0.0
    for q in (ck.layers[n] for n in (names or ck.layers)):
        exact = q.scales.double().numpy() * (q.zeros.double().numpy() + OFFSET[qtype])  # (out, G)
        err = np.abs(exact.astype(np.float16).astype(np.float64) - exact) / q.scales.double().numpy()
        bad, total, worst = bad + int((err > 0).sum()), total + err.size, max(worst, float(err.max()))
    return bad / max(total, 1), worst


def pack_blocks(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None, qtype: QT) -> np.ndarray:
    """Signed codes (out, in) int8 + block fields → uint8 (out, bytes per row) in qtype's block layout."""
    out_f, in_f = codes.shape
    nb = in_f // BLOCK
    head = [d.astype("<f2").view(np.uint8).reshape(out_f, nb, 2)]
    if m is not None:
        head.append(m.astype("<f2").view(np.uint8).reshape(out_f, nb, 2))
    c = codes.reshape(out_f, nb, BLOCK).astype(np.int16)
    lo_c, hi_c = -OFFSET[qtype] if qtype != QT.Q8_0 else -128, OFFSET[qtype] - 1 if qtype != QT.Q8_0 else 127
    if c.size and (c.min() < lo_c or c.max() > hi_c):  # out-of-range codes would wrap into other nibbles: refuse
        raise ValueError(f"{qtype.name}: codes must lie in [{lo_c}, {hi_c}], got [{c.min()}, {c.max()}]")
    if qtype == QT.Q8_0:
        body = [c.astype(np.int8).view(np.uint8)]  # (out, nb, 32) two's complement
    else:
        q = (c + OFFSET[qtype]).astype(np.uint8)  # unsigned q = c + o in [0, 2o)
        lo = q & 0x0F
        nib = lo[..., : BLOCK // 2] | (lo[..., BLOCK // 2:] << 4)  # byte j: element j (low), j+16 (high)
        body = [nib]
        if qtype in (QT.Q5_0, QT.Q5_1):
            hi = ((q >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)  # bit j = 5th bit of element j
            qh = hi.sum(axis=-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(out_f, nb, 4)
            body = [qh, nib]
    out = np.concatenate(head + body, axis=-1).reshape(out_f, -1)
    assert out.shape == byte_shape(codes.shape, qtype), (out.shape, qtype)
    return out


def _k_scales12(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K `scales[12]` from 8 six-bit scales and mins per super-block ((..., 8) each → (..., 12) uint8):
    the inverse of ggml's get_scale_min_k4 (formats.md A2)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((*sc.shape[:-1], 12), np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0xF) | ((m[..., 4:8] & 0xF) << 4)
    return out


def pack_k(codes: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray | None, m: np.ndarray | None,
           qtype: QT) -> np.ndarray:
    """Signed codes (out, in) + the K fields (d, dmin (out, S) fp16; sc, m (out, G) integers) → uint8
    (out, bytes per row) in qtype's block layout (Q4_K, Q5_K: d, dmin, scales[12], [qh[32]], qs[128];
    Q6_K: ql[128], qh[64], int8 scales[16], d)."""
    out_f, in_f = codes.shape
    nb = in_f // K_SUPER
    bits = {QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 6}[qtype]
    off = 0 if qtype == QT.Q6_K else 2 ** (bits - 1)
    c = codes.reshape(out_f, nb, K_SUPER).astype(np.int16)
    lo_c, hi_c = (-32, 31) if qtype == QT.Q6_K else (-off, off - 1)
    if c.size and (c.min() < lo_c or c.max() > hi_c):
        raise ValueError(f"{qtype.name}: codes must lie in [{lo_c}, {hi_c}], got [{c.min()}, {c.max()}]")
    q = (c + (32 if qtype == QT.Q6_K else off)).astype(np.uint8)  # unsigned 0 .. 2^b − 1
    f16 = lambda a: a.astype("<f2").view(np.uint8).reshape(out_f, nb, 2)  # noqa: E731
    if qtype == QT.Q6_K:
        q5 = q.reshape(out_f, nb, 2, 4, 32)  # [half n, quarter j, l]: element 128n + 32j + l
        ql = (q5[:, :, :, 0:2] & 0xF) | ((q5[:, :, :, 2:4] & 0xF) << 4)  # ql[64n + 32(j&1) + l]
        qh = sum(((q5[:, :, :, j] >> 4) & 3) << (2 * j) for j in range(4)).astype(np.uint8)  # qh[32n + l]
        scales = sc.astype(np.int8).reshape(out_f, nb, 16).view(np.uint8)
        body = [ql.reshape(out_f, nb, 128), qh.reshape(out_f, nb, 64), scales, f16(d)]
    else:
        q4 = q.reshape(out_f, nb, 4, 2, 32)  # [k, low/high nibble, l]: element 64k + 32h + l
        qs = ((q4[:, :, :, 0] & 0xF) | ((q4[:, :, :, 1] & 0xF) << 4)).reshape(out_f, nb, 128)
        head = [f16(d), f16(dmin), _k_scales12(sc.reshape(out_f, nb, 8), m.reshape(out_f, nb, 8))]
        if qtype == QT.Q5_K:
            hb = ((q.reshape(out_f, nb, 8, 32) >> 4) & 1).astype(np.uint8)  # [sub-block s, l]
            qh = sum(hb[:, :, s] << s for s in range(8)).astype(np.uint8)  # qh[l] bit s
            head.append(qh)
        body = head + [qs]
    out = np.concatenate(body, axis=-1).reshape(out_f, -1)
    assert out.shape == byte_shape(codes.shape, qtype), (out.shape, qtype)
    return out


def round_float_k(x: np.ndarray, qtype: QT) -> np.ndarray:
    """A float tensor (embeddings) rounded to a K type at export by our K range search (gguf-py has no K
    quantizer), packed."""
    import torch

    spec = PRESETS[{v: k for k, v in K_TYPES.items()}[qtype]]
    w = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    d, sc, dmin, m = init_k(w, spec, "lp")
    codes = quantize_codes_k(w, d, sc, dmin, m, spec)
    as_np = lambda t: None if t is None else t.numpy()  # noqa: E731
    return pack_k(codes.numpy(), d.numpy().astype(np.float16), sc.numpy(), as_np(dmin), as_np(m), qtype)


def represent(x: np.ndarray, qtype: QT) -> np.ndarray:
    """The float32 values a float tensor takes after being written as qtype (F32 = itself)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QT.F32:
        return x
    return gguf.quants.dequantize(_encode_float(x, qtype), qtype).reshape(x.shape)


def _encode_float(x: np.ndarray, qtype: QT) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QT.F16:
        return x.astype(np.float16)
    if qtype in K_TYPES.values():
        return round_float_k(x, qtype)
    return x if qtype == QT.F32 else gguf.quants.quantize(x, qtype)


# ---------------------------------------------------------------------------------------------------------------
# Names.


def tensor_name_map(ck: IntCheckpoint) -> dict[str, str]:
    """Every HF tensor name of the checkpoint → its GGUF name (gguf-py's TensorNameMap for the architecture), in
    file order: token embedding, blocks, the rest. A tensor gguf-py does not map is a UserError naming it."""
    tmap = gguf.get_tensor_name_map(_arch(ck).arch, ck.config.num_hidden_layers)
    hf = [f"{n}.weight" for n in ck.layers] + [f"{n}.bias" for n, q in ck.layers.items() if q.bias is not None]
    out, unmapped = {}, []
    for name in hf + list(ck.float_tensors):
        gg = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gg is None:
            unmapped.append(name)
        out[name] = gg
    if unmapped:
        raise UserError(f"GGUF export: tensors with no GGUF name in {ck.architecture} "
                        f"({gguf.MODEL_ARCH_NAMES[_arch(ck).arch]}): {sorted(unmapped)[:5]}")

    def order(item: tuple[str, str]) -> tuple:
        part = item[1].split(".")
        return (1, int(part[1])) if part[0] == "blk" else (0 if part[0] == "token_embd" else 2, 0)

    return dict(sorted(out.items(), key=order))


def _arch(ck: IntCheckpoint) -> GGUFArch:
    if ck.architecture not in ARCHS:
        raise UserError(f"GGUF export: architecture {ck.architecture} is not supported; expected one of {sorted(ARCHS)}")
    return ARCHS[ck.architecture]


def gguf_float(ck: IntCheckpoint, hf: str) -> np.ndarray:
    """A float tensor as the GGUF holds it before encoding: Gemma's norms shifted by 1 (in float32, as its forward)."""
    t = ck.float_tensors[hf].float().numpy()
    shift = _arch(ck).norm_shift
    return t + np.float32(shift) if shift and hf.endswith("norm.weight") else t


# ---------------------------------------------------------------------------------------------------------------
# Writer.


def gguf_tensors(ck: IntCheckpoint, qtype: QT | dict[str, QT], embed_type: str
                 ) -> Iterator[tuple[str, np.ndarray, QT]]:
    """(GGUF name, array to write, type) for every tensor, in the model's order; unmapped tensors are an error.
    qtype: the linear layers' type, or each layer's (layer_types)."""
    types = qtype if isinstance(qtype, dict) else {n: qtype for n in ck.layers}
    embed = embed_plan(ck, embed_type)
    cfg = ck.config
    permute = _arch(ck).permute_qk
    names = tensor_name_map(ck)
    heads = {stem: getattr(cfg, attr) or cfg.num_attention_heads for stem, attr in QK_PERMUTE.items()}
    sources = {f"{n}.weight": ("q", n) for n in ck.layers}
    sources.update({f"{n}.bias": ("b", n) for n, q in ck.layers.items() if q.bias is not None})
    sources.update({n: ("f", n) for n in ck.float_tensors})
    for gg, table in M.rope_tensors(cfg).items():  # Llama 3 rope_freqs, LongRoPE factors: F32, first
        yield gg, table, QT.F32
    for hf, gg in names.items():
        kind, src = sources[hf]
        stem = gg.split(".")[-2]
        n_head = heads.get(stem) if permute else None
        if kind == "q":
            q, t = ck.layers[src], types[src]
            fields = {k: None if v is None else v.numpy() for k, v in vars(q).items() if k != "bias"}
            if n_head:  # rows of codes and of every per-row field move together
                fields = {k: None if v is None else permute_rows(v, n_head) for k, v in fields.items()}
            codes = fields["codes"]
            if codes.shape[1] % BLOCK:
                raise UserError(f"GGUF export: layer {src}: in_features {codes.shape[1]} is not a multiple of "
                                f"{BLOCK} (the GGUF block size)")
            if t in K_TYPES.values():
                yield gg, pack_k(codes, fields["scales"], fields["sub_scales"], fields["mins"], fields["sub_mins"],
                                 t), t
                continue
            d, m = block_fields(fields["scales"], fields["zeros"], ck.spec_of(src), codes.shape[1], t)
            yield gg, pack_blocks(codes, d, m, t), t
        elif kind == "b":
            b = ck.layers[src].bias.float().numpy()
            yield gg, (permute_rows(b, n_head) if n_head else b).astype(np.float32), QT.F32
        else:
            t = gguf_float(ck, src)
            if n_head and t.ndim == 2:  # a float model's own Q/K projections (export_float_gguf)
                t = permute_rows(t, n_head)
            ftype = embed[gg] if gg in EMBED_NAMES else QT.F32  # norms: always F32
            if ftype not in (QT.F32, QT.F16):
                byte_shape(t.shape, ftype)
            yield gg, _encode_float(t, ftype), ftype


def export_gguf(intckpt_path: str | Path, out: str | Path, embed_type: str = "auto", overwrite: bool = False,
                widen: bool = False) -> Path:
    """Write the IntCheckpoint as a GGUF file (atomically). Returns the path. The output is checked and claimed
    (core.fsio.claim_output) before the checkpoint is read: a second writer of `out` is refused at once."""
    if embed_type not in EMBED_CHOICES:
        raise UserError(f"--embed-type: expected one of {list(EMBED_CHOICES)}, got {embed_type!r}")
    out = Path(out)
    check_apart(out, {"IntCheckpoint": intckpt_path})
    with claim_output(out):
        check_output_path(out, overwrite, is_file=True)
        return _export_gguf(intckpt_path, out, embed_type, overwrite, widen)


def _export_gguf(intckpt_path: str | Path, out: Path, embed_type: str, overwrite: bool, widen: bool) -> Path:
    ck = load_intckpt(intckpt_path)
    _arch(ck)  # unsupported architecture: refuse before any work
    types = layer_types(ck, widen)
    tensors = list(gguf_tensors(ck, types, embed_type))  # all checks before anything is written
    for qtype in sorted({t for t in types.values() if t in (QT.Q4_1, QT.Q5_1)}):
        frac, step = offset_rounding(ck, qtype, [n for n, t in types.items() if t == qtype])
        if frac:
            log.warning("GGUF %s: m = fp16(-s*(z+%d)) is rounded in %.1f %% of groups (max %.2g of a step); "
                        "those weights differ from s*W_int (verify_gguf reports it)", qtype.name,
                        OFFSET[qtype], 100 * frac, step)
    return write_gguf(ck, out, tensors, file_type(ck, types), overwrite)


def export_float_gguf(model, tok, source: dict, out: str | Path, overwrite: bool = False) -> Path:
    """The float model itself as an all-F32 GGUF (same names, Q/K order, metadata and tokenizer as our quantized
    exports): the input llama.cpp's own quantizer takes (runtimes.llamacpp.llama_quantize) — the baseline a user
    has today. Written atomically; nothing is quantized."""
    from lrqat_export.core.intckpt import float_tensors, manifest

    out = Path(out)
    with claim_output(out):
        check_output_path(out, overwrite, is_file=True)
        floats = float_tensors(model.state_dict(), model.config, [])
        ck = IntCheckpoint(PRESETS["q8_0"], model.config, {}, floats,
                           manifest(PRESETS["q8_0"], model.config, [], source, "float", {}))
        with tempfile.TemporaryDirectory(prefix=".lrqat-float-gguf.") as tmp:
            tok.save_pretrained(tmp)  # the tokenizer files add_tokenizer reads
            ck.path = Path(tmp)
            tensors = list(gguf_tensors(ck, {}, "f32"))
            return write_gguf(ck, out, tensors, (gguf.LlamaFileType.ALL_F32, "F32"), overwrite)


def write_gguf(ck: IntCheckpoint, out: str | Path, tensors: list[tuple[str, np.ndarray, QT]],
               ftype: tuple[gguf.LlamaFileType, str], overwrite: bool = False) -> Path:
    """Metadata (architecture, tokenizer, provenance) + the given tensors → `out`, atomically. export_gguf's
    back end; scripts/gguf_direct_vs_naive.py passes re-quantized tensors through it to build the naive file."""
    out = Path(out)
    check_output_path(out, overwrite, is_file=True)
    src = M.source_gguf(ck)
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[_arch(ck).arch])
    n_vocab = M.add_tokenizer(w, ck, src)
    emb = ck.float_tensors["model.embed_tokens.weight"]
    if emb.shape[0] != n_vocab:
        raise UserError(f"GGUF export: token embedding has {emb.shape[0]} rows but the tokenizer has {n_vocab} tokens")
    M.add_arch_metadata(w, ck.config, n_vocab)
    M.add_provenance(w, ck, int(ftype[0]), ftype[1], src)
    for name, arr, t in tensors:
        if t in (QT.F32, QT.F16):
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=t)
    with atomic_path(out, overwrite) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    log.info("wrote %s: %d tensors, linear %s", out, len(tensors), ftype[1])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Read-back, parity reference, inspect.


def verify_gguf(gguf_path: str | Path, intckpt: str | Path | IntCheckpoint) -> dict:
    """Dequantize every tensor of the file with gguf.quants.dequantize and compare it with the IntCheckpoint:
    quantized weights with s·W_int (after the inverse Q/K permutation), biases exactly, float tensors with their
    GGUF representation (and, for information, with the original float values).

    Returns {"exact": bool, "quantized": {...}, "tensors": {gguf name: {...}}}; max_step is the largest deviation
    in units of the group's scale (0 when exact)."""
    ck = intckpt if isinstance(intckpt, IntCheckpoint) else load_intckpt(intckpt)
    cfg = ck.config
    permute = _arch(ck).permute_qk
    r = M.open_gguf(gguf_path)
    file_tensors = {t.name: t for t in r.tensors}
    names = tensor_name_map(ck)
    heads = {stem: getattr(cfg, attr) or cfg.num_attention_heads for stem, attr in QK_PERMUTE.items()}
    report: dict[str, dict] = {}

    def read(hf: str, shape: tuple[int, ...]) -> tuple[str, np.ndarray, QT]:
        gg = names[hf]
        if gg not in file_tensors:
            raise UserError(f"GGUF {gguf_path}: tensor {gg} (for {hf}) missing")
        t = file_tensors[gg]
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if a.shape != tuple(shape):  # another model's export: refuse before comparing values
            raise UserError(f"GGUF {gguf_path}: tensor {gg} expected shape {tuple(shape)} as {hf} in IntCheckpoint "
                            f"{ck.path}, got {a.shape}; is it an export of another model?")
        n_head = heads.get(gg.split(".")[-2]) if permute else None
        return gg, (unpermute_rows(a, n_head) if n_head else a), t.tensor_type

    for name, q in ck.layers.items():
        gg, got, t = read(f"{name}.weight", tuple(q.codes.shape))
        want = ck.dequantized(name).numpy()
        diff = np.abs(got - want)
        step = diff / np.repeat(step_size(q, ck.spec_of(name)), ck.spec_of(name).group_len(want.shape[1]), axis=1)
        report[gg] = {"type": t.name, "shape": list(want.shape), "n_diff": int((diff > 0).sum()),
                      "max_abs": float(diff.max()), "max_step": float(step.max()), "exact": bool((diff == 0).all())}
        if q.bias is not None:
            gb, gotb, tb = read(f"{name}.bias", tuple(q.bias.shape))
            report[gb] = {"type": tb.name, "exact": bool(np.array_equal(gotb, q.bias.float().numpy()))}
    for hf, x in ck.float_tensors.items():
        gg, got, t = read(hf, tuple(x.shape))
        x = gguf_float(ck, hf)
        report[gg] = {"type": t.name, "exact": bool(np.array_equal(got, represent(x, t))),
                      "max_abs_vs_float": float(np.abs(got - x).max())}
    for gg, table in M.rope_tensors(cfg).items():
        t = file_tensors.get(gg)
        ok = t is not None and np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1), table)
        report[gg] = {"type": t.tensor_type.name if t is not None else "missing", "exact": bool(ok)}
    qrep = [v for k, v in report.items() if "max_step" in v]
    summary = {"n": len(qrep), "exact": all(v["exact"] for v in qrep),
               "n_diff": sum(v["n_diff"] for v in qrep), "n_weights": sum(math.prod(v["shape"]) for v in qrep),
               "max_abs": max(v["max_abs"] for v in qrep), "max_step": max(v["max_step"] for v in qrep)}
    extra = sorted(set(file_tensors) - set(report))
    return {"file": str(gguf_path), "exact": all(v["exact"] for v in report.values()) and not extra,
            "quantized": summary, "unexpected_tensors": extra, "tensors": report}


def step_size(q, spec: QuantSpec) -> np.ndarray:
    """(out, G) float64: the quantization step of each group (K grids: each sub-block's d·sc)."""
    if spec.is_k:
        return sub_value(q.scales, q.sub_scales, spec).double().numpy()
    return q.scales.double().numpy()


def file_embed_types(path: str | Path) -> dict[str, QT]:
    """The types a GGUF file stores token_embd (and output) in."""
    return {t.name: QT(t.tensor_type) for t in M.open_gguf(path).tensors if t.name in EMBED_NAMES}


def reference_model(intckpt: str | Path | IntCheckpoint, embed_type: str | dict[str, QT] = "auto"):
    """The IntCheckpoint's float32 torch model (s·W_int) with token embeddings / untied output replaced by their
    GGUF-represented values, so torch-vs-llama.cpp parity compares like with like. embed_type: as export_gguf
    takes it, or the types a file holds (file_embed_types)."""
    import torch

    ck = intckpt if isinstance(intckpt, IntCheckpoint) else load_intckpt(intckpt)
    model = ck.to_torch_model()
    types = embed_type if isinstance(embed_type, dict) else embed_plan(ck, embed_type)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        for gg, mod in (("token_embd.weight", model.get_input_embeddings()),
                        ("output.weight", None if tied else model.get_output_embeddings())):
            if mod is not None:
                mod.weight.copy_(torch.from_numpy(represent(mod.weight.numpy(), types[gg])))
    return model


def _fmt_value(f) -> str:
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        n = len(f.data)
        head = [f.contents(i) for i in range(min(n, 4))]
        return f"[{f.types[-1].name} × {n}] {str(head)[:60]}{' …' if n > 4 else ''}"
    v = f.contents()
    s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= 90 else s[:87] + "..."


def inspect_gguf(path: str | Path) -> str:
    """Metadata, tensor types and shapes of a GGUF file."""
    r = M.open_gguf(path)
    lines = [f"GGUF {path}  ({Path(path).stat().st_size / 2**20:.1f} MiB, {len(r.tensors)} tensors)", "", "metadata:"]
    for k, f in r.fields.items():
        lines.append(f"  {k:<44} {_fmt_value(f)}")
    counts: dict[str, int] = {}
    lines += ["", f"  {'tensor':<32} {'type':>6} {'shape (torch order)':>22} {'bytes':>12}"]
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        lines.append(f"  {t.name:<32} {t.tensor_type.name:>6} {str(shape):>22} {int(t.n_bytes):>12,}")
    lines += ["", "types: " + ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))]
    return "\n".join(lines)
