"""IntCheckpoint → GPTQ checkpoint directory (safetensors), read-back, inspect, vLLM compatibility check.

The format (AutoGPTQ 0.7.1 / GPTQModel 7.x; research notes in ../shared/reference/formats.md part B).
Per quantized Linear P with W (out, in), b = bits, G = in / group_size (1 for per channel):

    tensor        dtype     shape             content
    P.qweight     int32     (in*b/32, out)    unsigned codes q = c + 2^(b-1), packed along in_features
    P.qzeros      int32     (G, out*b/32)     unsigned zero points, packed along out_features;
                                              "gptq" (v1) stores zero − 1, "gptq_v2" stores the zero itself
    P.scales      float16   (G, out)          per-group scale s
    P.g_idx       int32     (in,)             group of each input feature: i // group_size (no act-order)
    P.bias        float32   (out,)            when the projection has one (kept float32: exact)

    W[o, i] = scales[g_idx[i], o] · (q[i, o] − zero[g_idx[i], o])          (= s·(c − z) of the IntCheckpoint)

Packing (one rule for every width): each run of 32 consecutive codes is a little-endian bit stream of b 32-bit
words in which code k occupies bits [b·k, b·k + b). For b = 2/4/8 that is "code k of a word at bits b·(k mod 32/b)";
for b = 3 codes 10 and 21 straddle word boundaries (AutoGPTQ's 10 | 1 | 10 | 1 | 10 layout). Because the stream
is little-endian, the words are simply the bytes of the stream read as '<u4': we build the bytes with a few
vectorised shifts (8/b codes per byte for b | 8; 8 codes → 3 bytes through a uint64 for b = 3) and view them.

Zero points. Symmetric grids have zero 2^(b-1) (v1 words 0x77777777 for 4-bit). An asymmetric zero of 0 cannot be
stored in v1 (0 − 1 = −1 fills the field, and a reader's +1 per field carries into its neighbour), so exporting
such a checkpoint as "gptq" is refused with the fix (--format gptq_v2).

Who reads what (measured on this machine, see docs/gptq.md): transformers reads config.json["quantization_config"]
only (without it it silently loads random weights), AutoGPTQ reads quantize_config.json only, so both are written.
AutoGPTQ 0.7.1 and vLLM read every file as v1; GPTQModel and transformers honour "format"/"checkpoint_format".
GPTQModel's own `GPTQModel.load` refuses asymmetric v1 files not quantized by GPTQModel (transformers' path and
AutoGPTQ load them): use "gptq_v2" for GPTQModel.load. vLLM (≥ 0.33) accepts only 4-bit (8-bit on CUDA) symmetric
grids with group size −1/32/64/128 dividing in_features; `vllm_problems` lists what it would reject.

Per-channel grids (group_size −1 in the IntCheckpoint) are written as groups of the largest of 128/64/32 dividing
every width, each row's scale repeated per group (`file_group_size`): the same weights, and the layout that the
loaders' default CPU kernel (aten int4 matmul: groups of 32..256 only) and vLLM run. The config's
meta.per_channel_as_groups records it.
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrqat_export.core.errors import CheckFailed, UserError
from lrqat_export.core.fsio import atomic_dir, check_apart, check_output_path, claim_output, read_json, write_json
from lrqat_export.core.intckpt import expected_shapes, load_intckpt
from lrqat_export.core.version import __version__

log = logging.getLogger(__name__)

# --- format constants -------------------------------------------------------------------------------------------
FORMATS = ("gptq", "gptq_v2")  # v1: stored zero − 1 (AutoGPTQ, default); v2: true zeros (GPTQModel internal)
BITS = (2, 3, 4, 8)
WORD_BITS = 32  # pack dtype int32; 32 codes always fill exactly b words
LAYER_TENSORS = {  # suffix: (dtype, shape as a function of in, out, G, b)
    "qweight": (torch.int32, lambda i, o, g, b: (i * b // WORD_BITS, o)),
    "qzeros": (torch.int32, lambda i, o, g, b: (g, o * b // WORD_BITS)),
    "scales": (torch.float16, lambda i, o, g, b: (g, o)),
    "g_idx": (torch.int32, lambda i, o, g, b: (i,)),
}
VLLM_GROUP_SIZES = (-1, 32, 64, 128)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANTIZE_CONFIG = "quantize_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
TOOL = f"lrqat-export:{__version__}"
URI = "https://github.com/lrqat-export/lrqat-export"


# --- packing: pure functions on numpy arrays ----------------------------------------------------------------------
def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise UserError(f"GPTQ bits: expected one of {BITS}, got {bits!r}")


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (R, N), values in [0, 2^b − 1] → int32 words (R, N·b/32), packed along the last axis.

    Out-of-range values are refused rather than masked: packing wraps modulo 2^b, which would silently turn a
    small error into a full-range one (and a negative value's sign bits would spill into its neighbours).
    """
    _check_bits(bits)
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % WORD_BITS:
        raise UserError(f"pack_codes: expected a 2-D array whose last dim is a multiple of 32, got {q.shape}")
    if q.size and (int(q.min()) < 0 or int(q.max()) > (1 << bits) - 1):
        raise UserError(f"pack_codes: {bits}-bit codes expected in [0, {(1 << bits) - 1}], "
                        f"got [{int(q.min())}, {int(q.max())}]")
    rows, n = q.shape
    q = q.astype(np.uint8, copy=False)
    if 8 % bits == 0:  # 8/b codes per byte
        per = 8 // bits
        qq = q.reshape(rows, n // per, per)
        stream = qq[:, :, 0].copy()  # (R, N/per) uint8
        for k in range(1, per):
            stream |= qq[:, :, k] << np.uint8(bits * k)
    else:  # b = 3: 8 codes = 24 bits = 3 bytes, assembled in a uint64 (its low bytes, little-endian)
        qq = q.reshape(rows, n // 8, 8)
        acc = qq[:, :, 0].astype("<u8")
        for k in range(1, 8):
            acc |= qq[:, :, k].astype("<u8") << np.uint64(bits * k)
        stream = np.ascontiguousarray(acc.view(np.uint8).reshape(rows, n // 8, 8)[:, :, :bits])
    return stream.reshape(rows, n * bits // 8).view("<i4").astype(np.int32, copy=False)  # (R, N·b/32)


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 words (R, W) → unsigned codes (R, W·32/b) uint8; the inverse of `pack_codes`."""
    _check_bits(bits)
    words = np.asarray(words)
    if words.ndim != 2 or words.dtype.kind not in "iu" or words.dtype.itemsize != 4 or words.shape[1] * WORD_BITS % bits:
        raise UserError(f"unpack_codes: expected 2-D 32-bit words holding whole {bits}-bit codes (words per row a "
                        f"multiple of {bits if WORD_BITS % bits else 1}), got {words.dtype} {words.shape}")
    words = np.ascontiguousarray(words).view("<i4")
    rows, w = words.shape
    stream = words.view(np.uint8).reshape(rows, w * 4)  # (R, W·4) bytes of the little-endian bit stream
    mask = np.uint8((1 << bits) - 1)
    if 8 % bits == 0:
        per = 8 // bits
        out = np.stack([(stream >> np.uint8(bits * k)) & mask for k in range(per)], axis=-1)
    else:
        acc = np.zeros((rows, w * 4 // bits, 8), np.uint8)
        acc[:, :, :bits] = stream.reshape(rows, -1, bits)
        acc = acc.view("<u8")[:, :, 0]
        out = np.stack([((acc >> np.uint64(bits * k)) & np.uint64(mask)).astype(np.uint8) for k in range(8)], -1)
    return out.reshape(rows, -1)


def stored_zeros(zero_u: np.ndarray, bits: int, fmt: str) -> np.ndarray:
    """Unsigned zero points → the values packed into qzeros: zero − 1 for v1 ("gptq"), the zero for v2."""
    if fmt not in FORMATS:
        raise UserError(f"GPTQ format: expected one of {FORMATS}, got {fmt!r}")
    return zero_u - 1 if fmt == "gptq" else zero_u


@dataclass
class GPTQLayer:
    """The four (five) tensors of one quantized Linear, as numpy arrays in checkpoint layout."""

    qweight: np.ndarray  # (in*b/32, out) int32
    qzeros: np.ndarray  # (G, out*b/32) int32
    scales: np.ndarray  # (G, out) float16
    g_idx: np.ndarray  # (in,) int32
    bias: np.ndarray | None = None  # (out,) float32


def pack_layer(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, group_size: int,
               fmt: str = "gptq", name: str = "layer", bias: np.ndarray | None = None) -> GPTQLayer:
    """IntCheckpoint tensors of one layer (signed codes (out, in) int8, scales (out, G) fp16, signed zeros (out, G)
    int8 or None) → GPTQ tensors. No re-quantization: the integers are shifted by 2^(b−1) and packed."""
    _check_bits(bits)
    out_f, in_f = codes.shape
    if in_f % WORD_BITS or out_f % WORD_BITS:
        raise UserError(f"layer {name}: GPTQ packing needs in_features and out_features divisible by 32, "
                        f"got in {in_f}, out {out_f}")
    half = 1 << (bits - 1)
    q = codes.astype(np.int16) + half  # (out, in) unsigned codes
    z = np.full(scales.shape, half, np.int16) if zeros is None else zeros.astype(np.int16) + half  # (out, G)
    if fmt == "gptq" and (z == 0).any():
        o, g = (int(v[0]) for v in np.nonzero(z == 0))
        raise UserError(f"layer {name}: asymmetric zero point 0 (output {o}, group {g}; {int((z == 0).sum())} in "
                        f"all) cannot be stored in GPTQ v1 (stored zero − 1 = −1 overflows its {bits}-bit field); "
                        f"expected zeros ≥ 1 for --format gptq, use --format gptq_v2")
    try:
        qweight = np.ascontiguousarray(pack_codes(q, bits).T)  # (in*b/32, out)
        qzeros = pack_codes(np.ascontiguousarray(stored_zeros(z, bits, fmt).T), bits)  # (G, out*b/32)
    except UserError as e:
        raise UserError(f"layer {name}: {e}") from None
    g_len = in_f if group_size == -1 else group_size
    g_idx = (np.arange(in_f, dtype=np.int32) // g_len).astype(np.int32)  # (in,)
    return GPTQLayer(qweight, qzeros, np.ascontiguousarray(scales.T).astype(np.float16), g_idx,
                     None if bias is None else bias.astype(np.float32))


def dequantize_layer(layer: GPTQLayer, bits: int, fmt: str) -> np.ndarray:
    """GPTQ tensors → W (out, in) float32 = scales[g_idx] · (q − zero[g_idx]) — exact for fp16 scales."""
    q = unpack_codes(layer.qweight.T, bits).T.astype(np.float32)  # (in, out)
    z = unpack_codes(layer.qzeros, bits).astype(np.int32)  # (G, out), stored values
    if fmt == "gptq":
        z = z + 1  # v1 readers add 1 to each unpacked field (AutoGPTQ), so a stored field can never mean 0
    g = layer.g_idx.astype(np.int64)
    w = layer.scales.astype(np.float32)[g] * (q - z.astype(np.float32)[g])  # (in, out)
    return np.ascontiguousarray(w.T)


# --- compatibility ------------------------------------------------------------------------------------------------
# Group sizes a per-channel grid is written with, largest first: every one is a size the loaders' default CPU kernels
# take (transformers + GPTQModel pick TorchFusedLinear / TorchAtenLinear for 4-bit, whose aten int4 matmul accepts
# group sizes 32/64/128/256 only — a per-channel file of SmolLM2 asks it for 576 and crashes on the first forward)
# and vLLM takes (−1/32/64/128). Every exportable layer's in_features is a multiple of 32, so one always divides.
PER_CHANNEL_GROUPS = (128, 64, 32)


def file_group_size(group_size: int, shapes: dict[str, tuple[int, int]]) -> int:
    """The group size written to the file: the grid's own, or for a per-channel grid (−1) the largest of
    PER_CHANNEL_GROUPS dividing every layer's in_features, with each row's scale (and zero) repeated in every group
    — the same weights exactly, in a layout every default kernel runs."""
    if group_size != -1:
        return group_size
    for g in PER_CHANNEL_GROUPS:
        if all(i % g == 0 for _, i in shapes.values()):
            return g
    return -1


def vllm_problems(bits: int, group_size: int, symmetric: bool, shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Reasons vLLM (0.32/0.33, CPU; CUDA where noted) would refuse the checkpoint; empty when it loads it."""
    out = []
    if bits == 8:
        out.append("8-bit: vLLM on CPU accepts only 4-bit (uint4b8); 8-bit symmetric loads only on CUDA (Marlin)")
    elif bits != 4:
        out.append(f"{bits}-bit: vLLM accepts only 4-bit (and 8-bit on CUDA) GPTQ")
    if not symmetric:
        out.append("asymmetric (sym=false): vLLM accepts only symmetric GPTQ")
    if group_size not in VLLM_GROUP_SIZES:
        out.append(f"group_size {group_size}: vLLM accepts {list(VLLM_GROUP_SIZES)}")
    bad = [n for n, (o, i) in shapes.items() if group_size != -1 and i % group_size]
    if bad:
        out.append(f"in_features not divisible by group_size {group_size}: {bad[:3]}")
    return out


def quantization_config(bits: int, group_size: int, symmetric: bool, fmt: str, meta: dict | None = None) -> dict:
    """The dict written to config.json["quantization_config"] and quantize_config.json (keys each reader needs:
    vLLM bits/group_size/desc_act/sym + quant_method; AutoGPTQ model_file_base_name; transformers format)."""
    return {
        "quant_method": "gptq", "method": "gptq",
        "bits": bits, "group_size": group_size, "sym": symmetric,
        "desc_act": False, "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
        "lm_head": False, "pack_dtype": "int32",
        "format": fmt, "checkpoint_format": fmt,
        "model_file_base_name": "model", "is_marlin_format": False,
        "meta": {"quantizer": [TOOL], "uri": URI, **(meta or {})},
    }


# --- sharded safetensors ------------------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(s: str | int) -> int:
    """'4GB' → 4·10^9 bytes (GB = 10^9, GiB = 2^30, as Hugging Face's max_shard_size)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(s))
    if not m or m.group(2).upper() not in _SIZE_UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--max-shard-size: expected a size like 4GB, 500MB or 2GiB, got {s!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_shards(d: Path, groups: list[dict[str, torch.Tensor]], max_bytes: int) -> list[str]:
    """Write tensor groups (one group = one module, never split) into ≤ max_bytes shards; returns the file names.
    One shard → model.safetensors; more → model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for grp in groups:
        n = sum(_nbytes(t) for t in grp.values())
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1].update(grp)
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(d / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for name, sh in zip(names, shards):
        save_file(sh, str(d / name), metadata=meta)
        weight_map.update({k: name for k in sh})
    total = sum(_nbytes(t) for sh in shards for t in sh.values())
    write_json(d / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX_FILE]


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / INDEX_FILE).is_file():
        idx = read_json(path / INDEX_FILE, "safetensors index")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict):
            raise UserError(f"GPTQ checkpoint {path / INDEX_FILE}: expected an object with a 'weight_map' object")
        files = sorted(set(map(str, wm.values())))
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise UserError(f"GPTQ checkpoint {path}: expected {SINGLE_FILE} or {INDEX_FILE}, found neither")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not isinstance(f, str) or Path(f).name != f:
            raise UserError(f"GPTQ checkpoint {path}: index names shard {f!r}; expected a file name in the directory")
        try:
            out.update(load_file(str(path / f)))
        except Exception as e:  # safetensors' Rust parser: header, length and dtype errors
            raise UserError(f"GPTQ checkpoint {path / f}: unreadable or corrupted safetensors "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    return out


# --- export -------------------------------------------------------------------------------------------------------
def export_gptq(intckpt_path: str | Path, out: str | Path, fmt: str = "gptq", strict_vllm: bool = False,
                overwrite: bool = False, max_shard_size: str | int = "4GB", verify: bool = True) -> Path:
    """Write the IntCheckpoint at `intckpt_path` as a GPTQ directory `out` (atomic). Returns `out`.

    verify: unpack the written files before the directory is published and compare them with s·W_int bit for bit
    (raises CheckFailed on any difference; nothing is published then).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format: expected one of {FORMATS}, got {fmt!r}")
    max_bytes = parse_size(max_shard_size)
    check_apart(out, {"IntCheckpoint": intckpt_path})
    with claim_output(out):  # a second writer of `out` is refused at once
        check_output_path(Path(out), overwrite)
        return _export_gptq(intckpt_path, out, fmt, strict_vllm, overwrite, max_bytes, verify)


def check_representable(ck, where) -> None:
    """GPTQ holds one grid for the whole model with one fp16 scale (and zero) per group: refuse a K grid (two-level
    scales: d·sc is not an fp16 scale) or a per-layer plan, naming the first layer it cannot hold."""
    for name in ck.layers:
        s = ck.spec_of(name)
        if s.is_k:
            raise UserError(f"IntCheckpoint {where}: GPTQ export cannot hold layer {name} on grid {s.name} (spec "
                            f"{ck.spec.name}): a K grid has two-level scales (fp16 d × a 6/8-bit integer per "
                            f"sub-block), GPTQ one fp16 scale per group; export it to GGUF, or train on a "
                            f"single-level preset (q4_0, w4pc, ...) for GPTQ")
        if ck.spec.plan:
            raise UserError(f"IntCheckpoint {where}: GPTQ export cannot hold plan {ck.spec.name}: layer {name} is on "
                            f"{s.name}, and GPTQ stores one grid for every layer; export it to GGUF")


def _export_gptq(intckpt_path: str | Path, out: str | Path, fmt: str, strict_vllm: bool, overwrite: bool,
                 max_bytes: int, verify: bool) -> Path:
    ck = load_intckpt(intckpt_path)
    spec = ck.spec
    check_representable(ck, intckpt_path)
    if spec.bits not in BITS:
        raise UserError(f"IntCheckpoint {intckpt_path}: GPTQ stores bits {BITS}, got {spec.bits} (spec {spec.name})")
    shapes = {n: tuple(q.codes.shape) for n, q in ck.layers.items()}
    group_size = file_group_size(spec.group_size, shapes)
    problems = vllm_problems(spec.bits, group_size, spec.symmetric, shapes)
    if problems:
        msg = f"GPTQ export of spec {spec.name}: vLLM would reject this checkpoint: " + "; ".join(problems)
        if strict_vllm:
            raise UserError(msg + " (--strict-vllm)")
        log.warning("%s (transformers, GPTQModel and AutoGPTQ still load it)", msg)
    if fmt == "gptq_v2":
        log.warning("GPTQ export: format gptq_v2 is read correctly by GPTQModel and transformers only; AutoGPTQ 0.7.1 "
                    "%sreads every file as v1", "" if spec.symmetric else "and vLLM ")
    elif not spec.symmetric:
        log.warning("GPTQ export: asymmetric v1 file: transformers and AutoGPTQ load it, GPTQModel.load refuses "
                    "asymmetric v1 files it did not quantize (use --format gptq_v2 for GPTQModel.load)")

    groups: list[dict[str, torch.Tensor]] = []
    for name, q in ck.layers.items():  # pack everything first: a UserError leaves nothing on disk
        scales, zeros = q.scales.numpy(), None if q.zeros is None else q.zeros.numpy()
        if group_size != spec.group_size:  # per channel written as groups: each row's (s, z) repeated per group
            reps = q.codes.shape[1] // group_size
            scales, zeros = scales.repeat(reps, axis=1), None if zeros is None else zeros.repeat(reps, axis=1)
        lay = pack_layer(q.codes.numpy(), scales, zeros, spec.bits, group_size, fmt, name,
                         None if q.bias is None else q.bias.numpy())
        grp = {f"{name}.{k}": torch.from_numpy(getattr(lay, k)) for k in LAYER_TENSORS}
        if lay.bias is not None:
            grp[f"{name}.bias"] = torch.from_numpy(lay.bias)
        groups.append(grp)
    groups.append({k: v.contiguous() for k, v in ck.float_tensors.items()})  # embeddings, norms, untied lm_head

    meta = {"source_method": ck.manifest.get("method"), "spec": spec.name}
    if group_size != spec.group_size:
        meta["per_channel_as_groups"] = group_size
    qcfg = quantization_config(spec.bits, group_size, spec.symmetric, fmt, meta)
    src = Path(intckpt_path)
    with atomic_dir(out, overwrite) as tmp:
        write_shards(tmp, groups, max_bytes)
        config = read_json(src / "config.json", "IntCheckpoint config")
        config["quantization_config"] = qcfg
        write_json(tmp / "config.json", config)
        write_json(tmp / QUANTIZE_CONFIG, qcfg)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        if not (tmp / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(ck.config).save_pretrained(tmp)
        if verify:
            rep = compare_with_intckpt(tmp, ck)
            if not rep["exact"]:
                raise CheckFailed(f"GPTQ export {out}: read-back differs from s·W_int: {rep['mismatches'][:3]}")
    log.info("wrote GPTQ %s (%s, %d quantized layers)", out, fmt, len(ck.layers))
    return Path(out)


# --- read-back ----------------------------------------------------------------------------------------------------
def read_quant_config(path: str | Path) -> dict:
    path = Path(path)
    cfg = read_json(path / "config.json", "GPTQ config")
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "gptq":
        raise UserError(f"GPTQ checkpoint {path}: config.json expected quantization_config with quant_method 'gptq', "
                        f"got {qc!r:.200}")
    return qc


def read_gptq(path: str | Path) -> tuple[dict, dict[str, GPTQLayer], dict[str, torch.Tensor]]:
    """(quantization_config, layers by module name, other tensors) of a GPTQ directory."""
    qc = read_quant_config(path)
    bits = qc.get("bits")
    if bits not in BITS:
        raise UserError(f"GPTQ checkpoint {path}: quantization_config bits expected one of {BITS}, got {bits!r}")
    tensors = load_tensors(path)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith((".qweight", ".qzeros", ".g_idx"))})
    layers = {}
    for n in names:
        missing = [k for k in LAYER_TENSORS if f"{n}.{k}" not in tensors]
        if missing:
            raise UserError(f"GPTQ checkpoint {path}: layer {n} expected tensors {list(LAYER_TENSORS)}, "
                            f"missing {missing}")
        t = {k: tensors.pop(f"{n}.{k}") for k in LAYER_TENSORS}
        _check_layer_tensors(path, n, t, bits)
        b = tensors.pop(f"{n}.bias", None)
        layers[n] = GPTQLayer(**{k: v.numpy() for k, v in t.items()}, bias=None if b is None else b.float().numpy())
    return qc, layers, tensors


def validate_gptq(path: str | Path) -> dict:
    """Read a GPTQ directory whole and check it against its own config.json before any runtime loads it: tensors
    consistent with the quantization config's bits, each layer's (out, in) and every float tensor's shape as the
    config gives them, none missing or extra. Returns the quantization config."""
    from transformers import AutoConfig

    qc, layers, rest = read_gptq(path)
    try:
        want = expected_shapes(AutoConfig.from_pretrained(path))
    except Exception as e:  # transformers: unknown or inconsistent architecture
        raise UserError(f"GPTQ checkpoint {path}: config.json expected to describe a model transformers can build, "
                        f"got {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    for n, lay in layers.items():
        w, got = want.pop(f"{n}.weight", None), (lay.scales.shape[1], lay.g_idx.shape[0])
        want.pop(f"{n}.bias", None)
        if w != got:
            raise UserError(f"GPTQ checkpoint {path}: layer {n} expected (out, in) {w} from config.json, got {got} "
                            f"from its {qc['bits']}-bit tensors")
    for k, t in rest.items():
        if k in want and tuple(t.shape) != want[k]:
            raise UserError(f"GPTQ checkpoint {path}: tensor {k} expected shape {want[k]} from config.json, got "
                            f"{tuple(t.shape)}")
    missing, unexpected = sorted(set(want) - set(rest)), sorted(set(rest) - set(want))
    if missing or unexpected:
        raise UserError(f"GPTQ checkpoint {path}: expected exactly the tensors of the model in config.json, got "
                        f"{len(missing)} missing {missing[:3]} and {len(unexpected)} unexpected {unexpected[:3]}")
    return qc


def _check_layer_tensors(path, name: str, t: dict[str, torch.Tensor], bits: int) -> None:
    """dtypes and shapes consistent with one another (in = len(g_idx), out and G from scales), and g_idx in range."""
    sc, gi = t["scales"], t["g_idx"]
    ok = sc.dim() == 2 and gi.dim() == 1 and all(t[k].dtype == dt for k, (dt, _) in LAYER_TENSORS.items())
    if ok:
        (g, o), i = sc.shape, gi.shape[0]
        ok = all(tuple(t[k].shape) == shape(i, o, g, bits) for k, (_, shape) in LAYER_TENSORS.items())
        ok = ok and (i * bits) % WORD_BITS == 0 and (o * bits) % WORD_BITS == 0
        ok = ok and (i == 0 or (int(gi.min()) >= 0 and int(gi.max()) < g))
    if not ok:
        got = {k: (str(v.dtype).replace("torch.", ""), tuple(v.shape)) for k, v in t.items()}
        raise UserError(f"GPTQ checkpoint {path}: layer {name} expected {bits}-bit GPTQ tensors (qweight int32 "
                        f"(in*b/32, out), qzeros int32 (G, out*b/32), scales float16 (G, out), g_idx int32 (in,) "
                        f"in [0, G)), got {got}")


def compare_with_intckpt(gptq_dir: str | Path, intckpt) -> dict:
    """Unpack a written GPTQ directory and compare every layer with s·W_int, every float tensor with the
    IntCheckpoint's (both exactly). `intckpt` is an IntCheckpoint or its path."""
    ck = load_intckpt(intckpt) if isinstance(intckpt, (str, Path)) else intckpt
    qc, layers, rest = read_gptq(gptq_dir)
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    mismatches, max_diff = [], 0.0
    if set(layers) != set(ck.layers):
        mismatches.append(f"layer sets differ: {sorted(set(layers) ^ set(ck.layers))[:5]}")
    for name in sorted(set(layers) & set(ck.layers)):
        w = dequantize_layer(layers[name], qc["bits"], fmt)
        ref = ck.dequantized(name).numpy()
        d = float(np.abs(w - ref).max()) if w.shape == ref.shape else float("inf")
        max_diff = max(max_diff, d)
        if d != 0.0:
            mismatches.append(f"{name}: max |Δ| {d}")
        qb, rb = layers[name].bias, ck.layers[name].bias
        if (qb is None) != (rb is None) or (qb is not None and not np.array_equal(qb, rb.numpy())):
            mismatches.append(f"{name}.bias differs")
    for k, v in ck.float_tensors.items():
        if k not in rest or rest[k].dtype != v.dtype or not torch.equal(rest[k], v):
            mismatches.append(f"float tensor {k} missing or different")
    return {"exact": not mismatches, "layers": len(layers), "max_abs_diff": max_diff, "mismatches": mismatches}


# --- inspect ------------------------------------------------------------------------------------------------------
def inspect_gptq(path: str | Path) -> str:
    path = Path(path)
    qc = read_quant_config(path)
    side = read_json(path / QUANTIZE_CONFIG, "GPTQ quantize_config")
    _, layers, rest = read_gptq(path)
    bits, gs, sym = qc["bits"], qc["group_size"], qc["sym"]
    fmt = qc.get("checkpoint_format", qc.get("format"))
    shapes = {n: (l.scales.shape[1], l.g_idx.shape[0]) for n, l in layers.items()}
    probs = vllm_problems(bits, gs, sym, shapes)
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    lines = [
        f"GPTQ checkpoint {path}",
        f"  quantizer     {', '.join(qc.get('meta', {}).get('quantizer', ['?']))}",
        f"  grid          bits {bits}, group_size {gs}, {'symmetric' if sym else 'asymmetric'}, "
        f"desc_act {qc.get('desc_act')}, format {fmt}",
        f"  config files  config.json quantization_config + {QUANTIZE_CONFIG}"
        f"{'' if side == qc else ' (DIFFERENT from config.json!)'}",
        f"  vLLM          {'accepts' if not probs else 'rejects: ' + '; '.join(probs)}",
        f"  files         {', '.join(files)}",
        f"  quantized     {len(layers)} layers",
        "",
        f"  {'module':<44} {'in x out':>12} {'qweight':>14} {'qzeros':>12} {'scales':>12}",
    ]
    for n, l in layers.items():
        o, i = shapes[n]
        lines.append(f"  {n:<44} {f'{i}x{o}':>12} {str(l.qweight.shape):>14} {str(l.qzeros.shape):>12} "
                     f"{str(l.scales.shape):>12}")
    lines.append("")
    for k, v in rest.items():
        lines.append(f"  {k:<44} {str(tuple(v.shape)):>14} {str(v.dtype).replace('torch.', ''):>10}")
    return "\n".join(lines)
