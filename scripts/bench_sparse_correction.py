"""Benchmark: the fused LR-QAT backward's correction for clipped entries, route by route, on this machine.

    PYTHONPATH=. .venv/bin/python -m scripts.bench_sparse_correction      # SmolLM2-135M's shapes, 128 tokens, r 32

Per channel, the fused backward (methods/fused.py) takes dA and dB from low-rank products over every entry and then
subtracts the part of the entries the clamp stopped: −(α/r)·s_i·G_ij at K clipped (i, j), times B's column j (dA)
or A's row i (dB). Routes timed, on the same random inputs:
  csr         `fused._correction_csr` (today's CPU route): the entries as a CSR pattern, one sampled product,
              dA = corr·Bᵀ (sparse × dense), dB as a scatter of the values times A's rows
  csr-t       the route before it: dB = (corrᵀ·A)ᵀ, a sparse × dense product on the transposed pattern, which
              sorts the pattern into CSC order on every call
  gather      `fused._correction_gather` (the route on devices without measured sparse kernels)
Each route is checked against the dense reference first. Rounds alternate the routes; the figure is the median
over rounds of each round's median. Prints a table and writes JSON (--json).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))  # (out, in): q/o, k/v, gate/up, down


def _csr_transposed(gs_t, x2, a, b, idx, ls):
    """The previous CPU route: as fused._correction_csr, but dB from the transposed sparse product."""
    from lrqat_export.methods.fused import sampled_csr

    corr = sampled_csr(gs_t, x2, idx, ls)
    return corr @ b.T, (corr.t() @ a).T


def measure(tokens: int, rank: int, fractions, rounds: int, repeats: int) -> list[dict]:
    import torch

    from lrqat_export.methods import fused

    routes = {"csr": fused._correction_csr, "csr-t": _csr_transposed, "gather": fused._correction_gather}
    rows = []
    for out_f, in_f in SHAPES:
        for frac in fractions:
            g = torch.Generator().manual_seed(0)
            k = max(1, round(frac * out_f * in_f))
            gs_t, x2 = torch.randn(out_f, tokens, generator=g), torch.randn(tokens, in_f, generator=g)
            a, b = torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g)
            flat = torch.randperm(out_f * in_f, generator=g)[:k].sort().values
            idx = torch.stack((flat // in_f, flat % in_f), 1)
            mask = torch.zeros(out_f * in_f)
            mask[flat] = 1.0
            dense = -0.5 * (gs_t @ x2) * mask.view(out_f, in_f)
            ref = (dense @ b.T, a.T @ dense)
            err = {}
            for name, f in routes.items():
                da, db = f(gs_t, x2, a, b, idx, 0.5)
                err[name] = max(float((da - ref[0]).abs().max() / ref[0].abs().max()),
                                float((db - ref[1]).abs().max() / ref[1].abs().max()))
                if err[name] > 1e-5:
                    raise SystemExit(f"route {name} at {out_f}x{in_f}, K {k}: relative error {err[name]:.2e}")
            per_round = {name: [] for name in routes}
            for _ in range(rounds):
                for name, f in routes.items():
                    ts = []
                    for _ in range(repeats):
                        t = time.perf_counter()
                        f(gs_t, x2, a, b, idx, 0.5)
                        ts.append(time.perf_counter() - t)
                    per_round[name].append(statistics.median(ts))
            rows.append({"out": out_f, "in": in_f, "tokens": tokens, "rank": rank, "clipped_fraction": frac,
                         "entries": k, "ms": {n: statistics.median(v) * 1e3 for n, v in per_round.items()},
                         "max_rel_error": err})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="tokens of the micro-batch (default 128: 1 × 128)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.001, 0.0023, 0.01],
                    help="clipped share of the weight (default 0.1 %%, 0.23 %% as under lp scales, 1 %%)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "docs/bench/sparse_correction.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        rows = measure(args.tokens, args.rank, args.fractions, args.rounds, args.repeats)
    print("| out × in | clipped | entries | csr ms | csr-t ms | gather ms | csr ÷ csr-t |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms"]
        print(f"| {r['out']} × {r['in']} | {r['clipped_fraction']:.2%} | {r['entries']:,} | {ms['csr']:.3f} | "
              f"{ms['csr-t']:.3f} | {ms['gather']:.3f} | {ms['csr'] / ms['csr-t']:.2f} |")
    from lrqat_export.core.fsio import write_json

    write_json(Path(args.json), {"machine": {"cpu": platform.processor() or platform.machine(),
                                             "threads": args.threads, "cpus": os.cpu_count(),
                                             "torch": torch.__version__, "loadavg_1m": os.getloadavg()[0]},
                                 "args": vars(args), "rows": rows})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
