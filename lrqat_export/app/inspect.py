"""`lrqat inspect`: a readable summary of an artefact (IntCheckpoint directory, .gguf file, GPTQ directory)."""
from __future__ import annotations

from pathlib import Path

from converters.gguf import inspect_gguf
from converters.gptq import inspect_gptq
from converters.sniff import artifact_kind

from ..core.errors import UserError
from ..core.intckpt import load_intckpt
from .report import moved_line


def _grid_counts(ck) -> str:
    counts: dict[str, int] = {}
    for name in ck.layers:
        counts[ck.spec_of(name).name] = counts.get(ck.spec_of(name).name, 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))


def inspect_intckpt(path: str | Path) -> str:
    ck = load_intckpt(path)
    m = ck.manifest
    lines = [
        f"IntCheckpoint {path}",
        f"  format        {m['format']} v{m['format_version']} (tool {m['tool']['name']} {m['tool']['version']})",
        f"  method        {m.get('method')}",
        f"  architecture  {m['architecture']}  ({ck.config.num_hidden_layers} layers, hidden {ck.config.hidden_size})",
        f"  spec          {ck.spec.name}: " + (f"llama.cpp's per-layer plan, grids {_grid_counts(ck)}" if ck.spec.plan
                                             else f"bits {ck.spec.bits}, group_size {ck.spec.group_size}, "
                                                  f"{'symmetric' if ck.spec.symmetric else 'asymmetric'}"
                                                  f"{', K grid (super-block 256)' if ck.spec.is_k else ''}"),
        f"  source        {m.get('source', {}).get('name')} ({m.get('source', {}).get('kind')})",
        f"  quantized     {len(ck.layers)} layers",
        *([f"  adapters      {moved_line(m['adapters'])}"] if m.get("adapters") else []),
        "",
        f"  {'tensor':<48} {'grid':>6} {'shape':>14} {'codes':>10} {'scale min..max':>24}",
    ]
    for name, q in ck.layers.items():
        s = q.scales.float()
        lines.append(f"  {name:<48} {ck.spec_of(name).name:>6} {str(tuple(q.codes.shape)):>14} "
                     f"{f'[{int(q.codes.min())},{int(q.codes.max())}]':>10} "
                     f"{f'{s.min().item():.3g}..{s.max().item():.3g}':>24}")
    lines.append("")
    for name, t in ck.float_tensors.items():
        lines.append(f"  {name:<48} {str(tuple(t.shape)):>14} {str(t.dtype).replace('torch.', ''):>10}")
    return "\n".join(lines)


def inspect_path(target: str) -> str:
    kind = artifact_kind(target)
    if kind == "intckpt":
        return inspect_intckpt(target)
    if kind == "gguf":
        return inspect_gguf(target)
    if kind == "gptq":
        return inspect_gptq(target)
    raise UserError(f"inspect {target}: expected an IntCheckpoint directory (with lrqat_manifest.json), "
                    f"a .gguf file or a GPTQ directory")
