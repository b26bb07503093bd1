"""Benchmark: what LR-QAT's fp32 A·B product costs on this machine, against the same machine's large-GEMM rate and
the cost of only writing the (out × in) result — the bound on what fusing A·B into the element-wise pass could save.

    PYTHONPATH=. .venv/bin/python -m scripts.bench_ab_product            # SmolLM2-135M's projection shapes, r 32

Every LR-QAT step forms A·B twice per layer (forward, and backward to rebuild Ŵ; methods/fused.py). If the product
runs near the GEMM rate, it is bound by its 2·r flops per weight, not by writing the product, and a fused pass
(which inductor compiles without FMA contraction, so each multiply-add is two operations) cannot make it cheaper.
Prints a table and writes JSON (--json).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"smollm2-135m": ((576, 576), (192, 576), (1536, 576), (576, 1536))}  # (out, in): q/o, k/v, gate/up, down


def _seconds(f, n: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def measure(shapes, rank: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    rows = []
    for out_f, in_f in shapes:
        a, b = torch.randn(out_f, rank), torch.randn(rank, in_f)
        dst = torch.empty(out_f, in_f)
        t_ab = _seconds(lambda: torch.mm(a, b, out=dst), repeats)
        t_write = _seconds(lambda: dst.fill_(1.0), repeats)
        rows.append({"out": out_f, "in": in_f, "rank": rank, "ab_s": t_ab, "write_s": t_write,
                     "ab_gflops": 2 * out_f * in_f * rank / t_ab / 1e9})
    n = 1024
    x, y = torch.randn(n, n), torch.randn(n, n)
    t_gemm = _seconds(lambda: x @ y, max(3, repeats // 10))
    return {"rows": rows, "gemm_gflops": 2 * n ** 3 / t_gemm / 1e9, "threads": torch.get_num_threads()}


def table(res: dict) -> str:
    lines = [f"| out × in | r | A·B ms | GFLOP/s | share of the {res['gemm_gflops']:.0f} GFLOP/s GEMM rate "
             f"| writing the product, ms |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['out']} × {r['in']} | {r['rank']} | {1e3 * r['ab_s']:.3f} | {r['ab_gflops']:.0f} | "
                     f"{100 * r['ab_gflops'] / res['gemm_gflops']:.0f} % | {1e3 * r['write_s']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--rank", type=int, default=32, help="adapter rank (default 32, LR-QAT's)")
    ap.add_argument("--repeats", type=int, default=100, help="timed calls per figure (default 100)")
    ap.add_argument("--json", default=str(ROOT / "docs/bench/ab_product.json"))
    args = ap.parse_args(argv)
    res = measure(SHAPES[args.shape], args.rank, args.repeats)
    res.update(shape=args.shape, machine={"cpus": os.cpu_count(), "platform": platform.platform()},
               loadavg_1m=os.getloadavg()[0])
    print(table(res))
    if args.json:
        from lrqat_export.core.fsio import write_json

        write_json(Path(args.json), res)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
