"""Benchmark: our GPTQ packer (converters.gptq.pack_layer) vs GPTQModel's packer (`pack_block`, its Python path)
on the same integers, in the same run.

Layers: the seven projection shapes of a Llama-2-7B block (q/k/v/o 4096x4096, gate/up 11008x4096, down
4096x11008; 202 M weights). Default: one block (CPU-friendly); --full: all 32 blocks (6.5 B weights, the whole 7B
layer set). Both packers get the same signed codes/scales/zeros: ours as integers, GPTQModel's in its API's form
(a float Linear holding s·(q − z), scales and unsigned zeros; it re-derives q = round((W + z·s)/s) — exact here).
The outputs are compared word for word (qweight and v2 qzeros) for every layer.

    .venv/bin/python -m scripts.bench_gptq_pack [--full] [--bits 4] [--group-size 128] [--asym] [--json FILE]

GPTQModel runs with GPTQMODEL_DISABLE_PACK_EXT=1 (its Python path; the native extension is JIT-compiled on first
use, ~100 s on this machine) and torch's default threads; ours is single-threaded numpy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from converters.gptq import pack_layer  # noqa: E402

BLOCK_7B = [  # (name, out_features, in_features) of one Llama-2-7B decoder block
    ("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 4096, 4096), ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096), ("mlp.gate_proj", 11008, 4096), ("mlp.up_proj", 11008, 4096),
    ("mlp.down_proj", 4096, 11008),
]
N_BLOCKS_7B = 32


def gptqmodel_pack(codes, scales, zeros, bits, group_size):
    """GPTQModel 7.x TorchLinear.pack_block on the same integers; returns (qweight, qzeros v2) as numpy, seconds."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    out_f, in_f = codes.shape
    half = 1 << (bits - 1)
    g = in_f if group_size == -1 else group_size
    z_u = np.full(scales.shape, half, np.int64) if zeros is None else zeros.astype(np.int64) + half  # (out, G)
    s = torch.from_numpy(scales.astype(np.float32))
    zt = torch.from_numpy(z_u.astype(np.float32))
    w = (torch.from_numpy(codes.astype(np.float32)) - torch.from_numpy((z_u - half).astype(np.float32))
         .repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)  # s·(c − z) = s·(q − z_u), exact
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = w
    m = TorchLinear(bits=bits, group_size=group_size, sym=zeros is None, desc_act=False, in_features=in_f,
                    out_features=out_f, bias=False, register_buffers=False)
    g_idx = torch.arange(in_f, dtype=torch.int32) // g
    t = time.perf_counter()
    m.pack_block(lin, s, zt, g_idx)
    dt = time.perf_counter() - t
    return m.qweight.numpy(), m.qzeros.numpy(), dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # --- workload
    ap.add_argument("--full", action="store_true", help="all 32 blocks of 7B (6.5 B weights); default one block")
    ap.add_argument("--blocks", type=int, help="number of 7B blocks (overrides --full; default 1)")
    ap.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    ap.add_argument("--group-size", type=int, default=128, help="input features per scale; -1 = per channel")
    ap.add_argument("--asym", action="store_true", help="asymmetric grid (integer zero points)")
    ap.add_argument("--skip-gptqmodel", action="store_true", help="time only our packer")
    # --- output
    ap.add_argument("--json", default="runs/bench_gptq_pack.json", help="where to write the results")
    args = ap.parse_args(argv)
    n_blocks = args.blocks or (N_BLOCKS_7B if args.full else 1)
    rng = np.random.default_rng(0)
    qmin, qmax = -(1 << (args.bits - 1)), (1 << (args.bits - 1)) - 1
    rows, ours_total, theirs_total, n_weights = [], 0.0, 0.0, 0
    for b in range(n_blocks):
        for name, out_f, in_f in BLOCK_7B:
            n_g = 1 if args.group_size == -1 else in_f // args.group_size
            codes = rng.integers(qmin, qmax + 1, (out_f, in_f), dtype=np.int8)
            scales = rng.uniform(1e-3, 1e-2, (out_f, n_g)).astype(np.float16)
            zeros = rng.integers(qmin, qmax + 1, (out_f, n_g), dtype=np.int8) if args.asym else None
            t = time.perf_counter()
            lay = pack_layer(codes, scales, zeros, args.bits, args.group_size, "gptq_v2", name)
            ours = time.perf_counter() - t
            ours_total += ours
            n_weights += out_f * in_f
            row = {"layer": f"layers.{b}.{name}", "shape": [out_f, in_f], "ours_s": ours}
            if not args.skip_gptqmodel:
                qw, qz, theirs = gptqmodel_pack(codes, scales, zeros, args.bits, args.group_size)
                row.update(gptqmodel_s=theirs, identical=bool(np.array_equal(qw, lay.qweight)
                                                              and np.array_equal(qz, lay.qzeros)))
                theirs_total += theirs
                if not row["identical"]:
                    print(f"MISMATCH in {row['layer']}", file=sys.stderr)
            rows.append(row)
            print(f"  {row['layer']:<28} {out_f:>5}x{in_f:<5}  ours {ours:7.3f} s"
                  + ("" if args.skip_gptqmodel else f"  gptqmodel {row['gptqmodel_s']:7.3f} s  "
                     f"x{row['gptqmodel_s'] / ours:6.1f}  {'identical' if row['identical'] else 'DIFFERENT'}"),
                  flush=True)
    res = {
        "bits": args.bits, "group_size": args.group_size, "symmetric": not args.asym, "blocks": n_blocks,
        "layers": len(rows), "weights": n_weights, "ours_s": ours_total,
        "gptqmodel_s": None if args.skip_gptqmodel else theirs_total,
        "speedup": None if args.skip_gptqmodel else theirs_total / ours_total,
        "all_identical": None if args.skip_gptqmodel else all(r["identical"] for r in rows),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "numpy": np.__version__, "torch": torch.__version__},
        "rows": rows,
    }
    try:
        import gptqmodel

        res["machine"]["gptqmodel"] = gptqmodel.__version__
    except ImportError:
        pass
    print()
    print("| packer | layers | weights | seconds | Mweights/s |")
    print("|---|---|---|---|---|")
    print(f"| lrqat-export (numpy) | {len(rows)} | {n_weights / 1e6:.0f} M | {ours_total:.2f} | "
          f"{n_weights / 1e6 / ours_total:.0f} |")
    if not args.skip_gptqmodel:
        print(f"| GPTQModel pack_block (python path) | {len(rows)} | {n_weights / 1e6:.0f} M | {theirs_total:.2f} | "
              f"{n_weights / 1e6 / theirs_total:.0f} |")
        print(f"\nratio GPTQModel / ours: {res['speedup']:.1f}x; outputs identical: {res['all_identical']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")
    return 0 if res["all_identical"] in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
