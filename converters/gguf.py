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

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from lrqat_export.core.errors import UserError
from lrqat_export.core.fsio import atomic_path, check_apart, check_output_path, claim_output
from lrqat_export.core.intckpt import IntCheckpoint, load_intckpt
from lrqat_export.core.quant import QuantSpec

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
FILE_TYPES: dict[QT, gguf.LlamaFileType] = {
    QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, QT.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
EMBED_TYPES: dict[str, QT] = {"f16": QT.F16, "q8_0": QT.Q8_0, "f32": QT.F32}  # token_embd / output



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
                        f"{BLOCK}, a multiple of {BLOCK} or per channel. K-quants (Q2_K..Q6_K) use their own 6-bit "
                        f"sub-scale grid. Narrower symmetric/asymmetric grids fit exactly into a wider type with "
                        f"widen=True (no size saving).")
    return t


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


def offset_rounding(ck: IntCheckpoint, qtype: QT) -> tuple[float, float]:
    """Asymmetric grids: (fraction of groups whose m = −s·(z + o) is not fp16-representable, largest resulting
    deviation in units of s)."""
    bad = total = 0
    worst = 0.0
    for q in ck.layers.values():
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


def represent(x: np.ndarray, qtype: QT) -> np.ndarray:
    """The float32 values a float tensor takes after being written as qtype (F32 = itself)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QT.F32:
        return x
    return gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)


def _encode_float(x: np.ndarray, qtype: QT) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QT.F16:
        return x.astype(np.float16)
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


def gguf_tensors(ck: IntCheckpoint, qtype: QT, embed_type: str) -> Iterator[tuple[str, np.ndarray, QT]]:
    """(GGUF name, array to write, type) for every tensor, in the model's order; unmapped tensors are an error."""
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
            q = ck.layers[src]
            codes, scales = q.codes.numpy(), q.scales.numpy()
            zeros = None if q.zeros is None else q.zeros.numpy()
            if n_head:
                codes, scales = permute_rows(codes, n_head), permute_rows(scales, n_head)
                zeros = None if zeros is None else permute_rows(zeros, n_head)
            if codes.shape[1] % BLOCK:
                raise UserError(f"GGUF export: layer {src}: in_features {codes.shape[1]} is not a multiple of "
                                f"{BLOCK} (the GGUF block size)")
            d, m = block_fields(scales, zeros, ck.spec, codes.shape[1], qtype)
            yield gg, pack_blocks(codes, d, m, qtype), qtype
        elif kind == "b":
            b = ck.layers[src].bias.float().numpy()
            yield gg, (permute_rows(b, n_head) if n_head else b).astype(np.float32), QT.F32
        else:
            t = gguf_float(ck, src)
            ftype = EMBED_TYPES[embed_type] if gg in EMBED_NAMES else QT.F32  # norms: always F32
            if ftype not in (QT.F32, QT.F16):
                byte_shape(t.shape, ftype)
            yield gg, _encode_float(t, ftype), ftype


def export_gguf(intckpt_path: str | Path, out: str | Path, embed_type: str = "f16", overwrite: bool = False,
                widen: bool = False) -> Path:
    """Write the IntCheckpoint as a GGUF file (atomically). Returns the path. The output is checked and claimed
    (core.fsio.claim_output) before the checkpoint is read: a second writer of `out` is refused at once."""
    if embed_type not in EMBED_TYPES:
        raise UserError(f"--embed-type: expected one of {sorted(EMBED_TYPES)}, got {embed_type!r}")
    out = Path(out)
    check_apart(out, {"IntCheckpoint": intckpt_path})
    with claim_output(out):
        check_output_path(out, overwrite, is_file=True)
        return _export_gguf(intckpt_path, out, embed_type, overwrite, widen)


def _export_gguf(intckpt_path: str | Path, out: Path, embed_type: str, overwrite: bool, widen: bool) -> Path:
    ck = load_intckpt(intckpt_path)
    _arch(ck)  # unsupported architecture: refuse before any work
    qtype = ggml_type_for(ck.spec, widen)
    tensors = list(gguf_tensors(ck, qtype, embed_type))  # all checks before anything is written
    if not ck.spec.symmetric:
        frac, step = offset_rounding(ck, qtype)
        if frac:
            log.warning("GGUF %s: m = fp16(-s*(z+%d)) is rounded in %.1f %% of groups (max %.2g of a step); "
                        "those weights differ from s*W_int (verify_gguf reports it)", qtype.name,
                        OFFSET[qtype], 100 * frac, step)
    return write_gguf(ck, out, tensors, qtype, overwrite)


def write_gguf(ck: IntCheckpoint, out: str | Path, tensors: list[tuple[str, np.ndarray, QT]], qtype: QT,
               overwrite: bool = False) -> Path:
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
    M.add_provenance(w, ck, int(FILE_TYPES[qtype]), qtype.name, src)
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
    log.info("wrote %s: %d tensors, linear %s", out, len(tensors), qtype.name)
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
        step = diff / np.repeat(q.scales.float().numpy(), ck.spec.group_len(want.shape[1]), axis=1)
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


def reference_model(intckpt: str | Path | IntCheckpoint, embed_type: str = "f16"):
    """The IntCheckpoint's float32 torch model (s·W_int) with token embeddings / untied output replaced by their
    GGUF-represented values, so torch-vs-llama.cpp parity compares like with like."""
    import torch

    ck = intckpt if isinstance(intckpt, IntCheckpoint) else load_intckpt(intckpt)
    model = ck.to_torch_model()
    qtype = EMBED_TYPES[embed_type]
    with torch.no_grad():
        for mod in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            mod.weight.copy_(torch.from_numpy(represent(mod.weight.numpy(), qtype)))
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
