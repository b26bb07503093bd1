"""Real llama.cpp (llama-cpp-python) on a GGUF file: logits, perplexity, greedy generation, tokenizer.

Perplexity uses the same windows and the same scoring code as the torch side (runtimes/torch_eval.nll_from_logits), so the
two numbers differ only by what the runtimes compute. Settings (env-llamacpp.md): 2 threads (the library default
is cpu_count()//2), flash attention off (the Python default; `llama-perplexity -fa auto` turns it on and moves ppl
by ~0.3 %), logits for every position, KV cache cleared between windows (reset + eval).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..core import quiet
from ..core.errors import UserError
from ..core.fsio import atomic_path, missing_file
from .torch_eval import nll_from_logits

log = logging.getLogger(__name__)

N_THREADS = 2


def load_llama(path: str | Path, n_ctx: int = 512):
    """A llama_cpp.Llama for `path` with the project's fixed settings (all-position logits, 2 threads, no FA)."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise UserError(f"llama.cpp runtime: llama-cpp-python is not installed ({e}); run scripts/install.sh") from None
    if not Path(path).is_file():
        raise UserError(f"GGUF {path}: {missing_file(path)}")
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=N_THREADS,
                     n_threads_batch=N_THREADS, flash_attn=False, verbose=False)
    except ValueError as e:  # llama-cpp-python reports a failed load as ValueError
        raise UserError(f"GGUF {path}: llama.cpp could not load it ({e})") from None


def window_logits(llm, ids: torch.Tensor | list[int]) -> np.ndarray:
    """float32 (T, V) logits of one window; row i predicts token i+1. Clears the KV cache first."""
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # copy: scores is a view reused by the next eval


def perplexity_gguf(path: str | Path, windows: torch.Tensor, protocol: str = "full", llm=None) -> dict:
    """{'ppl', 'nll_sum', 'tokens', 'per_window_nll', 'seconds'} of llama.cpp on (N, T) token windows."""
    n, t = windows.shape
    with contextlib.ExitStack() as stack:
        if llm is None:
            llm = stack.enter_context(contextlib.closing(load_llama(path, n_ctx=t)))
        return _perplexity(llm, path, windows, protocol)


def _perplexity(llm, path: str | Path, windows: torch.Tensor, protocol: str) -> dict:
    if max(int(windows.max()), 0) >= llm.n_vocab():
        raise UserError(f"GGUF {path}: token id {int(windows.max())} out of range for its vocab of {llm.n_vocab()}")
    total, count, per_window = 0.0, 0, []
    t0 = time.perf_counter()
    for ids in windows:
        nll, k = nll_from_logits(torch.from_numpy(window_logits(llm, ids)), ids, protocol)
        total += nll
        count += k
        per_window.append(nll / k)
    return {"ppl": math.exp(total / count), "nll_sum": total, "tokens": count, "per_window_nll": per_window,
            "seconds": time.perf_counter() - t0}


def generate_greedy(path: str | Path, prompt: str, max_new_tokens: int = 16, llm=None) -> str:
    """Greedy continuation of `prompt` (argmax of llama.cpp's logits, token by token); returns the new text."""
    with contextlib.ExitStack() as stack:
        if llm is None:
            llm = stack.enter_context(contextlib.closing(load_llama(path, n_ctx=512)))
        return _generate(llm, prompt, max_new_tokens)


def _generate(llm, prompt: str, max_new_tokens: int) -> str:
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)  # BOS only if the vocab wants it
    return llm.detokenize(greedy_ids(llm, ids, max_new_tokens)).decode("utf-8", errors="replace")


def greedy_ids(llm, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of the token ids `ids` (argmax of llama.cpp's logits, stopping at EOS): the new ids."""
    llm.reset()
    llm.eval([int(i) for i in ids])
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt == llm.token_eos():
            break
        new.append(nxt)
        llm.eval([nxt])
    return new


def gguf_tokenizer(path: str | Path):
    """An HF tokenizer built from the GGUF's own vocab (transformers reads the tokenizer.* keys)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_file():
        raise UserError(f"GGUF {path}: {missing_file(p)}")
    try:
        return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"GGUF {path}: transformers could not build a tokenizer from it ({e}); "
                        f"pass --tokenizer DIR") from None


def llama_quantize(src: str | Path, out: str | Path, ftype: str = "q4_k_m", n_threads: int = N_THREADS) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize, in process) on a float GGUF — what a user runs today with
    `llama-quantize model-f32.gguf out.gguf Q4_K_M`. The baseline our trained K-quant files are measured against;
    its type choice per tensor is the one core.quant.plan_layer_specs reproduces. Written to a temp name, renamed."""
    import llama_cpp

    names = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
             "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
             "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
    if ftype not in names:
        raise UserError(f"llama.cpp quantize: expected a type in {sorted(names)}, got {ftype!r}")
    if not Path(src).is_file():
        raise UserError(f"llama.cpp quantize: source GGUF {src}: {missing_file(src)}")
    out = Path(out)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = n_threads
    params.ftype = getattr(llama_cpp, names[ftype])
    tmp = out.with_name(f".{out.name}.lrqat-tmp")
    with quiet.captured_fds():  # llama.cpp prints a line per tensor on stderr
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise UserError(f"llama.cpp quantize {src} → {ftype}: llama_model_quantize returned {rc}")
    tmp.replace(out)
    return out


@functools.lru_cache(maxsize=1)
def _ggml_base():
    """llama.cpp's libggml-base (shipped inside llama-cpp-python), with ggml_quantize_chunk's signature."""
    import ctypes

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]
    f.restype = ctypes.c_size_t
    return lib


def ggml_quantize(rows: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """One tensor through llama.cpp's own quantizer (ggml_quantize_chunk, in process, the code `llama-quantize`
    runs): float32 (rows, n) → the type's blocks, uint8 (rows, bytes per row). imatrix (n,): the mean squared input
    of each input feature (what `llama-imatrix` collects); the K and legacy quantizers then weigh each weight's
    error by it, as `llama-quantize --imatrix` does."""
    import ctypes

    import gguf

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise UserError(f"ggml quantize: expected a 2-d float32 tensor (rows, n), got shape {rows.shape}")
    n_rows, n = rows.shape
    block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    if n % block:
        raise UserError(f"ggml quantize: row length {n} is not a multiple of {gguf.GGMLQuantizationType(qtype).name}'s "
                        f"block of {block}")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n,):
            raise UserError(f"ggml quantize: imatrix shape expected ({n},), got {imatrix.shape}")
    out = np.zeros((n_rows, n // block * type_bytes), dtype=np.uint8)
    written = _ggml_base().ggml_quantize_chunk(
        int(qtype), rows.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), 0, n_rows, n,
        None if imatrix is None else imatrix.ctypes.data_as(ctypes.c_void_p))
    if written != out.nbytes:
        raise UserError(f"ggml quantize: expected {out.nbytes} bytes, llama.cpp wrote {written}")
    return out


def llama_quantize_imatrix(src: str | Path, like: str | Path, out: str | Path, imatrix: dict[str, np.ndarray]
                           ) -> Path:
    """What `llama-imatrix` + `llama-quantize --imatrix` make, in process: every tensor of the float GGUF `src`
    quantized by llama.cpp's own code (ggml_quantize) to the type llama.cpp chose for it in `like` (its
    llama_model_quantize of the same file, e.g. Q4_K_M), with the importance `imatrix[gguf tensor name]` of its
    input features where one is given; float tensors and every metadata key are copied from `like`. (The
    llama_model_quantize API takes its imatrix as a C++ map, out of reach of ctypes.) Written atomically
    (core.fsio.atomic_path)."""
    import gguf

    from converters.gguf_meta import copy_fields, open_gguf

    src_r, like_r = open_gguf(src), open_gguf(like)
    floats = {t.name: t for t in src_r.tensors}
    unknown = sorted(set(imatrix) - {t.name for t in like_r.tensors})
    if unknown:
        raise UserError(f"llama.cpp imatrix quantize: imatrix names tensors {unknown[:5]} that {like} does not hold")
    arch = bytes(like_r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(None, arch)
    copy_fields(w, like_r, lambda k: not k.startswith("GGUF.") and k != "general.architecture")
    for t in like_r.tensors:
        qt = gguf.GGMLQuantizationType(int(t.tensor_type))
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, np.array(t.data))
            continue
        if t.name not in floats or floats[t.name].tensor_type != gguf.GGMLQuantizationType.F32:
            raise UserError(f"llama.cpp imatrix quantize: {src} has no F32 tensor {t.name}")
        x = np.array(floats[t.name].data, dtype=np.float32)
        w.add_tensor(t.name, ggml_quantize(x.reshape(x.shape[0], -1), int(qt), imatrix.get(t.name)), raw_dtype=qt)
    with atomic_path(out) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)
