"""GGUF metadata of an exported IntCheckpoint: architecture keys, provenance, and the tokenizer.

The tokenizer comes from the source GGUF's tokenizer.* keys when the model was loaded from one (manifest
source.gguf_path), else from the Hugging Face tokenizer files in the IntCheckpoint directory, one of three vocab
kinds tried in convert_hf_to_gguf's order (formats.md A3):
* `tokenizer.model` present → SentencePiece, `tokenizer.ggml.model = "llama"`, tokens + scores + types;
* `tokenizer.json` BPE with byte_fallback (Llama 2, Mistral) → `"llama"` via gguf's LlamaHfVocab;
* `tokenizer.json` byte-level BPE (Llama 3, Qwen2, SmolLM, GPT-2) → `"gpt2"` with merges and a pre-tokenizer name.

llama.cpp picks its pre-tokenizer regex by name, so the name must describe the HF pre-tokenizer exactly.
convert_hf_to_gguf identifies it by hashing a test tokenization; here the pre-tokenizer description in
tokenizer.json is matched against a table, and an unknown one is refused rather than guessed.
"""
from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

from lrqat_export.core.errors import UserError
from lrqat_export.core.fsio import missing_file
from lrqat_export.core.intckpt import IntCheckpoint
from lrqat_export.core.version import __version__

log = logging.getLogger(__name__)

# llama.cpp pre-tokenizer name → the Split regex of the HF tokenizers it stands for (Llama 3, Qwen2/Qwen3)
SPLIT_REGEX: dict[str, str] = {
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
# pre-tokenizer signature (see _signature) → llama.cpp `tokenizer.ggml.pre` name
PRE_TOKENIZERS: dict[str, str] = {
    "ByteLevel(regex)": "gpt-2",
    "Digits(individual)+ByteLevel(regex)": "smollm",
    **{f"Split({rx})+ByteLevel": name for name, rx in SPLIT_REGEX.items()},
}
# source-GGUF general.* keys that still describe the model after our export
GENERAL_COPY = ("general.organization", "general.basename", "general.finetune", "general.size_label",
                "general.license", "general.languages")


def _signature(pt: dict | None) -> str:
    """A readable description of an HF pre-tokenizer: the parts llama.cpp's regexes depend on."""
    if pt is None:
        return "none"
    t = pt["type"]
    if t == "Sequence":
        return "+".join(_signature(p) for p in pt["pretokenizers"])
    if t == "ByteLevel":
        return "ByteLevel(regex)" if pt.get("use_regex", True) else "ByteLevel"
    if t == "Split":
        return f"Split({pt['pattern'].get('Regex', pt['pattern'].get('String'))})"
    if t == "Digits":
        return f"Digits({'individual' if pt.get('individual_digits') else 'grouped'})"
    return t


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    if sig not in PRE_TOKENIZERS:
        raise UserError(f"GGUF export: tokenizer.json pre-tokenizer {sig[:200]!r} has no known llama.cpp name "
                        f"(known: {sorted(set(PRE_TOKENIZERS.values()))}); add it to converters/gguf_meta.py "
                        f"PRE_TOKENIZERS, or export from the model's GGUF source")
    return PRE_TOKENIZERS[sig]


def add_hf_tokenizer(w: gguf.GGUFWriter, tok_dir: str | Path, vocab_size: int) -> int:
    """Write tokenizer.* keys from the HF tokenizer files in tok_dir; pads to vocab_size. Returns the token count."""
    d = Path(tok_dir)
    tj_path = d / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else None
    scores = None
    if (d / "tokenizer.model").is_file():
        try:
            vocab = SentencePieceVocab(d)
        except RuntimeError as e:  # sentencepiece missing
            raise UserError(f"GGUF export: {d / 'tokenizer.model'} needs the sentencepiece package ({e})") from None
        model, pre = "llama", "default"
    elif tj is not None and tj["model"]["type"] == "BPE" and tj["model"].get("byte_fallback"):
        vocab, model, pre = LlamaHfVocab(d), "llama", "default"
    elif tj is not None and tj["model"]["type"] == "BPE":
        vocab, model, pre = BpeVocab(d), "gpt2", pre_tokenizer_name(tj)
    else:
        raise UserError(f"GGUF export: no usable tokenizer in {d}; expected tokenizer.model (SentencePiece) or a "
                        f"BPE tokenizer.json")
    toks = list(vocab.all_tokens())
    texts = [t if isinstance(t, bytes) else t.encode("utf-8") for t, _, _ in toks]
    types = [int(tt) for _, _, tt in toks]
    if model == "gpt2" and tj is not None:  # as convert_hf_to_gguf: added tokens are CONTROL when special, else
        added = {a["content"]: a.get("special", False) for a in tj.get("added_tokens", [])}  # USER_DEFINED
        kind = {True: int(gguf.TokenType.CONTROL), False: int(gguf.TokenType.USER_DEFINED)}
        types = [kind[added[t.decode("utf-8")]] if t.decode("utf-8", "replace") in added else ty
                 for t, ty in zip(texts, types)]
    if model == "llama":
        scores = [float(s) for _, s, _ in toks]
    if len(texts) > vocab_size:
        raise UserError(f"GGUF export: tokenizer in {d} has {len(texts)} tokens, more than the model's vocab_size "
                        f"{vocab_size}")
    for i in range(len(texts), vocab_size):  # rows of the embedding no token uses
        texts.append(f"[PAD{i}]".encode())
        types.append(int(gguf.TokenType.UNUSED))
        if scores is not None:
            scores.append(-1000.0)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(texts)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    SpecialVocab(d, load_merges=(model == "gpt2"), n_vocab=len(texts)).add_to_gguf(w, quiet=True)
    log.info("tokenizer from %s: %s/%s, %d tokens", d, model, pre, len(texts))
    return len(texts)


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope(cfg: Any, layer_type: str = "full_attention") -> tuple[float, dict]:
    """(rope theta, rope parameters) from a transformers 4 or 5 config; Gemma 3 keeps one set per layer type."""
    rp = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rp = dict(rp.get(layer_type, rp))
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return float(theta), rp


def _rope_type(rp: dict) -> str:
    return rp.get("rope_type", rp.get("type", "default"))


def rotary_dim(cfg: Any) -> int:
    """Rotated dimensions per head (Phi-4-mini rotates 3/4 of each head: partial_rotary_factor)."""
    return int(head_dim(cfg) * _rope(cfg)[1].get("partial_rotary_factor", 1.0))


# llama.cpp architecture → the rope scalings it reproduces from this converter's tables (others are refused)
ROPE_TYPES: dict[str, tuple[str, ...]] = {"llama": ("default", "llama3"), "phi3": ("default", "longrope")}


def rope_tensors(cfg: Any) -> dict[str, np.ndarray]:
    """The float32 rope tables convert_hf_to_gguf writes: Llama 3's `rope_freqs` (per frequency the divisor of
    θ^(−2i/d): 1 for short wavelengths, `factor` for long ones, interpolated between) and LongRoPE's
    `rope_factors_long` / `rope_factors_short` (Phi-3), each of rotary_dim/2 entries."""
    theta, rp = _rope(cfg)
    n = rotary_dim(cfg) // 2
    if _rope_type(rp) == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old_ctx = rp["original_max_position_embeddings"]
        freqs = 1.0 / (theta ** (np.arange(0, 2 * n, 2, dtype=np.float64) / (2 * n)))
        wavelen = 2 * math.pi / freqs
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        div = np.where(wavelen < old_ctx / hi, 1.0,
                       np.where(wavelen > old_ctx / lo, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        return {_tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS): div.astype(np.float32)}
    if _rope_type(rp) == "longrope":
        out = {}
        for key, t in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                       ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            f = np.asarray(rp[key], dtype=np.float32)
            if f.shape != (n,):
                raise UserError(f"GGUF export: rope_parameters {key} expected {n} values (rotary dim / 2), got "
                                f"{f.size}")
            out[_tensor_name(t)] = f
        return out
    return {}


def _tensor_name(t: gguf.MODEL_TENSOR) -> str:
    return f"{gguf.TENSOR_NAMES[t]}.weight"


def _longrope_attn_factor(cfg: Any, rp: dict) -> float:
    """LongRoPE's attention (cos/sin) factor as transformers computes it: given, or √(1 + ln s / ln L0) with
    s = max_position_embeddings / L0 (1 when s ≤ 1)."""
    if rp.get("attention_factor") is not None:
        return float(rp["attention_factor"])
    orig = _orig_ctx(cfg, rp)
    s = rp.get("factor") or cfg.max_position_embeddings / orig
    return math.sqrt(1 + math.log(s) / math.log(orig)) if s > 1.0 else 1.0


def _orig_ctx(cfg: Any, rp: dict) -> int:
    return int(rp.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
               or cfg.max_position_embeddings)


def _check_gemma3(cfg: Any) -> None:
    """What llama.cpp's gemma3 graph fixes (src/llama-model.cpp): every 6th layer global (set_swa_pattern(6)),
    local layers at rope base 10000 unscaled, queries scaled by 1/√head_dim (1/√(hidden/heads) at 62 layers),
    GELU-tanh, no attention softcap. A config that differs would export to a file llama.cpp runs differently."""
    n = cfg.num_hidden_layers
    types = list(getattr(cfg, "layer_types", None) or [])
    want = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n)]
    qpas = cfg.hidden_size // cfg.num_attention_heads if n == 62 else head_dim(cfg)
    local_theta, local = _rope(cfg, "sliding_attention")
    checks = [("layer_types", types, want), ("query_pre_attn_scalar", cfg.query_pre_attn_scalar, qpas),
              ("sliding-window rope", (local_theta, _rope_type(local)), (10000.0, "default")),
              ("hidden_activation", cfg.hidden_activation, "gelu_pytorch_tanh"),
              ("attn_logit_softcapping", getattr(cfg, "attn_logit_softcapping", None), None)]
    for what, got, expected in checks:
        if got != expected:
            raise UserError(f"GGUF export: Gemma 3 {what} expected {str(expected)[:160]} (what llama.cpp's gemma3 "
                            f"architecture computes), got {str(got)[:160]}")


def add_arch_metadata(w: gguf.GGUFWriter, cfg: Any, n_vocab: int) -> None:
    """The {arch}.* keys convert_hf_to_gguf writes for this architecture (w.arch), through gguf-py's helpers."""
    theta, rp = _rope(cfg)
    rope_type = _rope_type(rp)
    if rope_type not in ROPE_TYPES.get(w.arch, ("default",)):
        raise UserError(f"GGUF export: rope scaling {rope_type!r} is not supported for the {w.arch} architecture "
                        f"by this converter; expected one of {list(ROPE_TYPES.get(w.arch, ('default',)))}")
    if w.arch == "gemma3":
        _check_gemma3(cfg)
    sw = getattr(cfg, "sliding_window", None)
    if (w.arch != "gemma3" and sw and getattr(cfg, "use_sliding_window", True)
            and sw < cfg.max_position_embeddings):
        log.warning("sliding_window %d is not written (llama.cpp's %s graph attends to the whole context, as "
                    "convert_hf_to_gguf); outputs match the HF model only for contexts up to %d tokens", sw,
                    w.arch, sw)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(rotary_dim(cfg))
    if head_dim(cfg) != cfg.hidden_size // cfg.num_attention_heads or w.arch == "gemma3":
        w.add_key_length(head_dim(cfg))
        w.add_value_length(head_dim(cfg))
    w.add_vocab_size(n_vocab)
    if w.arch == "gemma3":
        if "sliding_attention" in cfg.layer_types:
            w.add_sliding_window(sw)
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if w.arch == "phi3":
        w.add_sliding_window(0)  # llama.cpp runs Phi-3 without SWA (see the warning above); 0 says "none"
        w.add_rope_scaling_orig_ctx_len(_orig_ctx(cfg, rp))
        if rope_type == "longrope":
            w.add_rope_scaling_attn_factors(_longrope_attn_factor(cfg, rp))


def add_provenance(w: gguf.GGUFWriter, ck: IntCheckpoint, file_type: int, qtype_name: str,
                   src: gguf.GGUFReader | None) -> None:
    m, spec = ck.manifest, ck.spec
    base = m.get("source", {}).get("name") or getattr(ck.config, "_name_or_path", "") or ck.architecture
    if src is not None and "general.name" in src.fields:
        base = src.fields["general.name"].contents()
    w.add_type("model")
    float_model = m.get("method") == "float"  # export_float_gguf: the float source, for llama.cpp's quantizer
    w.add_name(f"{base} {'F32' if float_model else spec.name} ({m.get('method', 'lrqat')})")
    w.add_quantized_by(f"lrqat-export {__version__}")
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if not float_model:
        w.add_string("lrqat.spec", spec.name)
        w.add_string("lrqat.spec_json", json.dumps(spec.to_dict(), sort_keys=True))
    w.add_string("lrqat.method", str(m.get("method")))
    w.add_string("lrqat.gguf_type", qtype_name)
    if src is not None:
        copy_fields(w, src, lambda k: k in GENERAL_COPY)


def copy_fields(w: gguf.GGUFWriter, src: gguf.GGUFReader, keep) -> list[str]:
    """The metadata keys of `src` for which keep(key) is true, written to `w` with their types; returns them."""
    copied = []
    for k, f in src.fields.items():
        if not keep(k):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(k, f.contents(), f.types[0])
        copied.append(k)
    return copied


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length + 1-byte key + value type + smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length + name + n_dims + one dim + type + offset


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """gguf-py's reader behind a trust boundary: the header is checked first (magic, version, counts that the file
    size can hold), any parse failure becomes a UserError naming the file, and every tensor's data must lie inside
    the file. Nothing in a GGUF is executed; arrays are read through a read-only memory map."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF {path}: {missing_file(path)}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise UserError(f"GGUF {path}: expected a GGUF file (magic {GGUF_MAGIC!r}, header of 24 bytes), "
                        f"got {head[:4]!r} and {size} bytes")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in GGUF_VERSIONS:
        raise UserError(f"GGUF {path}: expected format version {' or '.join(map(str, GGUF_VERSIONS))}, got {version}")
    if 24 + n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > size:
        raise UserError(f"GGUF {path}: header announces {n_tensors} tensors and {n_kv} metadata keys, more than "
                        f"a {size}-byte file can hold (truncated or corrupted)")
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # untrusted bytes through a third-party parser: every failure is the file's fault
        raise UserError(f"GGUF {path}: not a readable GGUF file, truncated or corrupted "
                        f"({type(e).__name__}: {str(e)[:200]})") from None
    for t in r.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise UserError(f"GGUF {path}: tensor {t.name} expected {int(t.n_bytes)} bytes at offset "
                            f"{int(t.data_offset)}, but the file has {size} bytes (truncated)")
    return r


def source_gguf(ck: IntCheckpoint) -> gguf.GGUFReader | None:
    p = (ck.manifest.get("source") or {}).get("gguf_path")
    if not p:
        return None
    if not Path(p).is_file():
        log.warning("source GGUF %s named in the manifest is gone; building the tokenizer from the HF files", p)
        return None
    return open_gguf(p)


def add_tokenizer(w: gguf.GGUFWriter, ck: IntCheckpoint, src: gguf.GGUFReader | None) -> int:
    """Tokenizer keys from the source GGUF, else from the IntCheckpoint's HF tokenizer files. Returns n_vocab."""
    if src is not None:
        copied = copy_fields(w, src, lambda k: k.startswith("tokenizer."))
        if "tokenizer.ggml.tokens" not in copied:
            raise UserError(f"source GGUF {src.data.filename}: expected tokenizer.ggml.tokens, not found")
        return len(src.fields["tokenizer.ggml.tokens"].data)
    if ck.path is None:
        raise UserError("GGUF export: the IntCheckpoint has no directory to read tokenizer files from")
    return add_hf_tokenizer(w, ck.path, ck.config.vocab_size)
