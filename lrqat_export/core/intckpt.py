"""IntCheckpoint: the on-disk contract between fusing and the converters.

A directory:

    lrqat_manifest.json   format name + version, QuantSpec, architecture, quantized layer list, source, provenance
    model.safetensors     per quantized layer L (e.g. "model.layers.0.self_attn.q_proj"):
                            L.codes   int8    (out, in)  signed codes c in [-2^(b-1), 2^(b-1)-1]
                            L.scales  float16 (out, G)   G = in/group_size (1 for per channel)
                            L.zeros   int8    (out, G)   integer zero points, asymmetric grids only
                            L.bias    float32 (out,)     when the projection has a bias (Qwen2 q/k/v)
                          a layer on a K grid (q4_k, q5_k, q6_k; core/quant.py "K grids") instead of zeros:
                            L.scales      float16 (out, S)   the super-block scales d (S = in/256)
                            L.sub_scales  int8    (out, G)   the integer sub-block scales sc
                            L.mins        float16 (out, S)   dmin (Q4_K, Q5_K)
                            L.sub_mins    int8    (out, G)   the integer sub-block mins m (Q4_K, Q5_K)
                          every other tensor of the model under its HF name, original dtype (float32);
                          a tied lm_head is not stored (config.tie_word_embeddings)
    config.json           the source model's HF config (architecture)
    tokenizer files       tokenizer.json, tokenizer_config.json, ... (tokenizer.save_pretrained)

Dequantization: W[o, i] = scales[o, i // g] · (codes[o, i] − zeros[o, i // g]), in float32 (exact; quant.py);
K grids: ggml's (d·sc)·q − dmin·m (quant.dequantize_k). A per-layer plan (q4_k_m, q4_k_s) gives each layer its own
grid (quant.plan_layer_specs, recomputed and checked at load; the manifest lists them under `layer_grids`).
Converters read only this directory: no training code, no source model needed. Producers build one with
`build_intckpt` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .fsio import atomic_dir, missing_dir, read_json, umask_modes, write_json
from .quant import QuantSpec, dequantize, dequantize_k, plan_layer_specs
from .version import __version__

log = logging.getLogger(__name__)

FORMAT_NAME = "lrqat-intckpt"
FORMAT_VERSION = 1
MANIFEST = "lrqat_manifest.json"
TENSORS = "model.safetensors"
LAYER_SUFFIXES = (".codes", ".scales", ".zeros", ".bias", ".sub_scales", ".mins", ".sub_mins")  # QuantLayer's fields


@dataclass
class QuantLayer:
    codes: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out, G) float16
    zeros: torch.Tensor | None = None  # (out, G) int8
    bias: torch.Tensor | None = None  # (out,) float32
    sub_scales: torch.Tensor | None = None  # K grids: (out, G) int8 sub-block scales sc (scales = d, (out, S))
    mins: torch.Tensor | None = None  # K grids, asymmetric: (out, S) float16 dmin
    sub_mins: torch.Tensor | None = None  # K grids, asymmetric: (out, G) int8 sub-block mins m


@dataclass
class IntCheckpoint:
    spec: QuantSpec
    config: Any  # transformers PretrainedConfig
    layers: dict[str, QuantLayer]
    float_tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    layer_specs: dict[str, QuantSpec] = field(default_factory=dict)  # a plan's per-layer grids (else: all `spec`)

    @property
    def architecture(self) -> str:
        return self.manifest["architecture"]

    def spec_of(self, name: str) -> QuantSpec:
        """The grid layer `name` was trained on and is stored in."""
        return self.layer_specs.get(name, self.spec)

    def dequantized(self, name: str) -> torch.Tensor:
        """s·(c − z) (K grids: (d·sc)·q − dmin·m) as float32 (out, in): the weight every runtime must reproduce."""
        return dequantize_layer(self.layers[name], self.spec_of(name))

    def to_torch_model(self) -> nn.Module:
        """A plain float32 HF model whose quantized projections hold s·W_int (eval mode)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        sd = dict(self.float_tensors)
        for name, q in self.layers.items():
            sd[f"{name}.weight"] = self.dequantized(name)
            if q.bias is not None:
                sd[f"{name}.bias"] = q.bias.float()
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = {"lm_head.weight"} if getattr(self.config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise UserError(f"IntCheckpoint {self.path}: tensors do not match architecture {self.architecture}: "
                            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
        if tied:
            model.tie_weights()
        return model.eval()


def dequantize_layer(q: QuantLayer, spec: QuantSpec) -> torch.Tensor:
    if spec.is_k:
        return dequantize_k(q.codes, q.scales, q.sub_scales, q.mins, q.sub_mins, spec)
    return dequantize(q.codes, q.scales, q.zeros, spec)


def resolve_layer_specs(spec: QuantSpec, layers: dict[str, QuantLayer], where: str) -> dict[str, QuantSpec]:
    """Each layer's grid under `spec` (a plan: from its name and width). Codes must be present and 2-D first."""
    for name, q in layers.items():
        if q.codes is None or q.codes.dim() != 2:
            raise UserError(f"{where}: layer {name} expected 2-D tensor {name}.codes, got "
                            f"{'none' if q.codes is None else tuple(q.codes.shape)}")
    return plan_layer_specs(spec, {n: int(q.codes.shape[1]) for n, q in layers.items()})


def write_intckpt(
    out: str | Path, ckpt: IntCheckpoint, tokenizer: Any, overwrite: bool = False, in_place: bool = False,
) -> Path:
    """Write atomically (temp dir + rename; or, in_place, file by file with the manifest last). Returns the path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, q in ckpt.layers.items():
        tensors[f"{name}.codes"] = q.codes.cpu().to(torch.int8).contiguous()
        tensors[f"{name}.scales"] = q.scales.cpu().to(torch.float16).contiguous()
        if q.zeros is not None:
            tensors[f"{name}.zeros"] = q.zeros.cpu().to(torch.int8).contiguous()
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias.cpu().float().contiguous()
        for suffix, t, dt in ((".sub_scales", q.sub_scales, torch.int8), (".mins", q.mins, torch.float16),
                              (".sub_mins", q.sub_mins, torch.int8)):
            if t is not None:
                tensors[f"{name}{suffix}"] = t.cpu().to(dt).contiguous()
    for name, t in ckpt.float_tensors.items():
        tensors[name] = t.detach().cpu().contiguous()
    out = Path(out)

    def write_all(d: Path) -> None:
        save_file(tensors, str(d / TENSORS), metadata={"format": "pt", "lrqat": FORMAT_NAME})
        ckpt.config.save_pretrained(d)
        if tokenizer is not None:
            tokenizer.save_pretrained(d)

    if in_place:
        # The directory also holds training state (train_state/, train_log.json): write the files one by one
        # through temp names; the manifest, written last, marks the checkpoint complete.
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".intckpt.") as tmp:
            write_all(Path(tmp))
            umask_modes(Path(tmp))
            for f in Path(tmp).iterdir():
                os.replace(f, out / f.name)
        write_json(out / MANIFEST, ckpt.manifest)
    else:
        with atomic_dir(out, overwrite) as tmp:
            write_all(tmp)
            write_json(tmp / MANIFEST, ckpt.manifest)
    log.info("wrote IntCheckpoint %s (%d quantized layers)", out, len(ckpt.layers))
    return out


def is_intckpt(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_intckpt(path: str | Path) -> IntCheckpoint:
    """Read and validate an IntCheckpoint directory; every defect is a UserError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"IntCheckpoint {path}: {missing_dir(path)}")
    m = read_json(path / MANIFEST, "IntCheckpoint manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise UserError(f"IntCheckpoint manifest {path / MANIFEST}: expected format {FORMAT_NAME!r}, "
                        f"got {m.get('format') if isinstance(m, dict) else type(m).__name__!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(f"IntCheckpoint manifest {path / MANIFEST}: expected format_version {FORMAT_VERSION}, "
                        f"got {m.get('format_version')!r}")
    where = f"IntCheckpoint manifest {path / MANIFEST}"
    if not isinstance(m.get("spec"), dict):
        raise UserError(f"{where}: expected field 'spec' to be an object, got {type(m.get('spec')).__name__}")
    spec = QuantSpec.from_dict(m["spec"])  # validates, UserError on a bad value
    layer_names = m.get("quantized_layers")
    if (not isinstance(layer_names, list) or not layer_names or not all(isinstance(n, str) for n in layer_names)
            or len(set(layer_names)) != len(layer_names)):
        raise UserError(f"{where}: expected 'quantized_layers' to be a non-empty list of distinct layer names, "
                        f"got {layer_names!r:.120}")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers reports bad JSON, unknown model types, ... with many exception types
        raise UserError(f"IntCheckpoint {path}: config.json unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"IntCheckpoint tensors {path / TENSORS}: unreadable or corrupted safetensors ({e})") from None
    layers = {name: QuantLayer(*(tensors.pop(f"{name}{s}", None) for s in LAYER_SUFFIXES)) for name in layer_names}
    specs = resolve_layer_specs(spec, layers, f"IntCheckpoint {path}")
    recorded = m.get("layer_grids")
    if recorded is not None and recorded != {n: s.name for n, s in specs.items()}:
        bad = sorted(n for n in specs if not isinstance(recorded, dict) or recorded.get(n) != specs[n].name)
        first = recorded.get(bad[0]) if isinstance(recorded, dict) else recorded
        raise UserError(f"{where}: layer_grids expected plan {spec.name}'s grids, got another grid for "
                        f"{len(bad)} layers (first {bad[0]}: expected {specs[bad[0]].name}, got {first!r:.60})")
    for name, q in layers.items():
        _validate_layer(path, name, q, specs[name])
    stray = sorted(k for k in tensors if k.endswith(tuple(s for s in LAYER_SUFFIXES if s != ".bias")))
    if stray:
        raise UserError(f"IntCheckpoint {path}: tensors {stray[:3]} belong to layers the manifest does not list "
                        f"as quantized; expected every .codes/.scales/.zeros tensor under quantized_layers")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"IntCheckpoint {path}: tensor {name} expected finite values, got "
                            f"{int((~torch.isfinite(t)).sum())} NaN/Inf")
    check_against_config(f"IntCheckpoint {path}", config, layers, tensors)
    return IntCheckpoint(spec, config, layers, tensors, m, path, specs if spec.plan else {})


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face model of `config` holds, with its shape (built on the meta device: no memory,
    no initialisation). A tied lm_head is left out: it is not stored."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        want.pop("lm_head.weight", None)
    return want


def check_against_config(where: str, config: Any, layers: dict[str, QuantLayer],
                         floats: dict[str, torch.Tensor]) -> None:
    """Every tensor of the checkpoint has the shape its config.json gives it, and none is missing or extra: a
    checkpoint that disagrees with its own config would export to files no runtime can load."""
    try:
        want = expected_shapes(config)
    except Exception as e:  # transformers: an unknown or inconsistent architecture
        raise UserError(f"{where}: config.json expected to describe a model transformers can build, got "
                        f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    for name, q in layers.items():
        w, has_bias = want.pop(f"{name}.weight", None), want.pop(f"{name}.bias", None) is not None
        if w is None:
            raise UserError(f"{where}: quantized layer {name} expected to be a linear layer of the model in "
                            f"config.json, got a name it does not have")
        if tuple(q.codes.shape) != w:
            raise UserError(f"{where}: layer {name} codes expected shape {w} from config.json, got "
                            f"{tuple(q.codes.shape)}")
        if has_bias != (q.bias is not None):
            raise UserError(f"{where}: layer {name} bias expected {'present' if has_bias else 'absent'} from "
                            f"config.json, got it {'absent' if has_bias else 'present'}")
    unexpected = sorted(k for k in floats if k not in want)
    for k, t in floats.items():
        if k in want and tuple(t.shape) != want[k]:
            raise UserError(f"{where}: tensor {k} expected shape {want[k]} from config.json, got {tuple(t.shape)}")
    missing = sorted(k for k in want if k not in floats)
    if missing or unexpected:
        raise UserError(f"{where}: expected exactly the tensors of the model in config.json, got {len(missing)} "
                        f"missing {missing[:3]} and {len(unexpected)} unexpected {unexpected[:3]}")


def _validate_layer(path: Path, name: str, q: QuantLayer, spec: QuantSpec) -> None:
    where = f"IntCheckpoint {path}: layer {name}"
    if q.codes is None or q.scales is None:
        raise UserError(f"{where}: expected tensors {name}.codes and {name}.scales, missing")
    if q.codes.dtype != torch.int8 or q.codes.dim() != 2 or 0 in q.codes.shape:
        raise UserError(f"{where}: codes expected int8 2-D, got {q.codes.dtype} {tuple(q.codes.shape)}")
    out_f, in_f = q.codes.shape
    spec.check_layer(name, in_f)
    g_shape = (out_f, spec.n_groups(in_f))
    s_shape = (out_f, spec.n_super(in_f)) if spec.is_k else g_shape
    if q.scales.dtype != torch.float16 or tuple(q.scales.shape) != s_shape:
        raise UserError(f"{where}: scales expected float16 {s_shape}, got {q.scales.dtype} {tuple(q.scales.shape)}")
    _check_finite(where, "scales", q.scales)
    if (q.scales <= 0).any():
        raise UserError(f"{where}: scales expected > 0, got {int((q.scales <= 0).sum())} values <= 0 "
                        f"(min {q.scales.float().min().item()})")
    _validate_k_fields(where, q, spec, g_shape, s_shape)
    if int(q.codes.min()) < spec.qmin or int(q.codes.max()) > spec.qmax:
        raise UserError(f"{where}: codes expected in [{spec.qmin}, {spec.qmax}], "
                        f"got [{int(q.codes.min())}, {int(q.codes.max())}]")
    if (spec.symmetric or spec.is_k) != (q.zeros is None):
        raise UserError(f"{where}: zeros expected {'absent' if spec.symmetric else 'present'} for spec {spec.name}")
    if q.zeros is not None and (q.zeros.dtype != torch.int8 or tuple(q.zeros.shape) != g_shape):
        raise UserError(f"{where}: zeros expected int8 {g_shape}, got {q.zeros.dtype} {tuple(q.zeros.shape)}")
    if q.bias is not None and (not q.bias.is_floating_point() or tuple(q.bias.shape) != (out_f,)):
        raise UserError(f"{where}: bias expected float ({out_f},), got {q.bias.dtype} {tuple(q.bias.shape)}")
    if q.bias is not None:
        _check_finite(where, "bias", q.bias)


def _validate_k_fields(where: str, q: QuantLayer, spec: QuantSpec, g_shape: tuple, s_shape: tuple) -> None:
    """A K-grid layer's sub-block integers (and dmin); a plain layer has none of them."""
    want = {"sub_scales": spec.is_k, "mins": spec.is_k and not spec.symmetric,
            "sub_mins": spec.is_k and not spec.symmetric}
    for field_name, present in want.items():
        if (getattr(q, field_name) is not None) != present:
            raise UserError(f"{where}: {field_name} expected {'present' if present else 'absent'} for grid "
                            f"{spec.name}, got it {'absent' if present else 'present'}")
    if not spec.is_k:
        return
    lo, hi = spec.sub_range
    for field_name, shape, rng in (("sub_scales", g_shape, (lo, hi)), ("sub_mins", g_shape, (0, hi))):
        t = getattr(q, field_name)
        if t is None:
            continue
        if t.dtype != torch.int8 or tuple(t.shape) != shape:
            raise UserError(f"{where}: {field_name} expected int8 {shape}, got {t.dtype} {tuple(t.shape)}")
        if int(t.min()) < rng[0] or int(t.max()) > rng[1]:
            raise UserError(f"{where}: {field_name} expected in [{rng[0]}, {rng[1]}] for grid {spec.name}, got "
                            f"[{int(t.min())}, {int(t.max())}]")
    if q.mins is not None:
        if q.mins.dtype != torch.float16 or tuple(q.mins.shape) != s_shape:
            raise UserError(f"{where}: mins expected float16 {s_shape}, got {q.mins.dtype} {tuple(q.mins.shape)}")
        _check_finite(where, "mins", q.mins)
        if (q.mins < 0).any():
            raise UserError(f"{where}: mins expected >= 0, got {int((q.mins < 0).sum())} negative values")


def _check_finite(where: str, what: str, t: torch.Tensor) -> None:
    """NaN and ±Inf counted by kind, so the message says which one it is."""
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    if nan or inf:
        raise UserError(f"{where}: {what} expected finite values, got {nan} NaN and {inf} Inf of {t.numel()}")


# ---------------------------------------------------------------------------------------------------------------
# Building an IntCheckpoint: the one public builder every producer (fuse, RTN, baselines, GPTQ import, the sharded
# fuse) goes through, so the manifest and the float-tensor selection have one owner.


def float_tensors(state_dict: dict[str, torch.Tensor], config: Any, quantized: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of `state_dict` outside the quantized layers (a tied lm_head is left out)."""
    skip = {f"{n}{s}" for n in quantized for s in (".weight", ".bias")}
    out = {}
    for k, v in state_dict.items():
        if k in skip or any(k.startswith(f"{n}.") for n in quantized):
            continue
        if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        out[k] = v.detach().clone()
    return out


def manifest(spec: QuantSpec, config: Any, layers: list[str], source: dict, method: str, extra: dict) -> dict:
    """The lrqat_manifest.json of a new IntCheckpoint (format, version, provenance, spec, layer list)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "lrqat-export", "version": __version__},
        "method": method,
        "spec": spec.to_dict(),
        "architecture": config.architectures[0] if getattr(config, "architectures", None) else None,
        "codes": "signed int8 container, values in [qmin, qmax]",
        "dequant": "W[o,i] = scales[o, i//g] * (codes[o,i] - zeros[o, i//g]) in float32"
                   + ("; K grids: (d*sc)*q - dmin*m, ggml's order" if spec.is_k else ""),
        "quantized_layers": layers,
        "source": source,
        **extra,
    }


def build_intckpt(spec: QuantSpec, config: Any, layers: dict[str, QuantLayer], state_dict: dict[str, torch.Tensor],
                  source: dict, method: str, extra: dict | None = None) -> IntCheckpoint:
    """An IntCheckpoint from its quantized layers and the model's full state dict (the float tensors are taken from
    it): the manifest records `method`, `source` and `extra`. Every layer is validated as load_intckpt would."""
    if not layers:
        raise UserError(f"IntCheckpoint ({method}): expected at least one quantized layer, got none")
    specs = resolve_layer_specs(spec, layers, f"IntCheckpoint ({method})")
    for name, q in layers.items():
        _validate_layer(Path(f"<{method}>"), name, q, specs[name])
    names = list(layers)
    extra = dict(extra or {})
    if spec.plan:
        extra["layer_grids"] = {n: s.name for n, s in specs.items()}
    return IntCheckpoint(spec, config, layers, float_tensors(state_dict, config, names),
                         manifest(spec, config, names, source, method, extra), None, specs if spec.plan else {})
