"""Summary of the GPU memory runs of scripts/bench_memory_speed.py: peak memory of one training step against the
micro-batch, per configuration and frozen-base dtype, with the 24 GB line of the paper's claim (a 7B model's LR-QAT
step on one consumer 24 GB GPU).

    PYTHONPATH=. .venv/bin/python -m scripts.bench_gpu_summary                  # reads docs/bench/gpu/*.json

It measures nothing itself: it reads the JSON that bench_memory_speed wrote on the GPU (each row carries its shape,
batch, seq, bf16 and base dtype), prints one table and writes docs/bench/gpu/summary.json and a plot.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
# The first two GPU runs were measured before bench_memory_speed emptied the allocator's cache after setup: their
# allocated peaks are right, their reserved peaks include the float model the setup freed. Every later run is clean
# (and since the fix each row says so itself: cuda_reserved_setup_freed).
PRE_FIX = {"memory_speed_7b_b4_cuda_first.json", "memory_speed_7b_b1_cuda_first.json"}
GB24 = 24e9 / GiB  # the paper's "24 GB" card (an RTX 4090: 24 GiB of memory, 25.8e9 bytes; 24e9 is the stricter)


def load_rows(paths: list[Path], shape: str) -> list[dict]:
    """One row per (config, batch, seq, base dtype) of the given shape, the best measured: a successful row whose
    reserved peak excludes the setup's freed blocks (cuda_reserved_setup_freed, bench_memory_speed after the fix)
    over an earlier successful row (its allocated peak is right, its reserved peak counts the setup's float model)
    over a failed row."""
    def rank(r: dict) -> int:
        return 2 if r.get("ok") and r["reserved_clean"] else 1 if r.get("ok") else 0

    rows: dict[tuple, dict] = {}
    for p in sorted(paths):
        for r in json.loads(p.read_text())["rows"]:
            if r["shape"] != shape or r.get("device", "cpu") == "cpu":
                continue
            if r.get("checkpoint_layers"):  # lrqat train --checkpoint-layers: its own row
                r = {**r, "config": r["config"] + " +layer-ckpt"}
            key = (r["config"], r["batch"], r["seq"], r.get("base_dtype", "fp32"))
            clean = bool(r.get("cuda_reserved_setup_freed")) or p.name not in PRE_FIX
            r = {**r, "file": p.name, "reserved_clean": clean}
            if key not in rows or rank(r) > rank(rows[key]):
                rows[key] = r
    return sorted(rows.values(), key=lambda r: (r.get("base_dtype", "fp32"), r["config"], r["batch"]))


def table(rows: list[dict]) -> str:
    out = ["| config | frozen base | micro-batch × seq | peak allocated GiB | peak reserved GiB | fits 24 GB | step s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['batch']} × {r['seq']}"
        if not r.get("ok"):
            out.append(f"| {r['config']} | {r.get('base_dtype', 'fp32')} | {shape} | **{r.get('error')}** | | no | |")
            continue
        alloc, res = r["peak_step_bytes"] / GiB, r.get("cuda_peak_reserved_bytes", 0) / GiB
        res_s = f"{res:.2f}" if r["reserved_clean"] else "(counts setup)"
        fits = max(alloc, res if r["reserved_clean"] else alloc) < GB24
        out.append(f"| {r['config']} | {r.get('base_dtype', 'fp32')} | {shape} | {alloc:.2f} | {res_s} | "
                   f"{'yes' if fits else 'no'} | {r['step_s']:.2f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, shape: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list] = {}
    for r in rows:
        if r.get("ok"):
            series.setdefault((r["config"], r.get("base_dtype", "fp32")), []).append(
                (r["batch"], r["peak_step_bytes"] / GiB))
    for (config, base), pts in sorted(series.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [m for _, m in pts], marker="o", ls="-" if base == "fp32" else "--",
                label=f"{config} ({base} base)", color=f"C{sorted({c for c, _ in series}).index(config)}")
    ax.axhline(GB24, color="red", lw=1)
    ax.text(1, GB24 + 0.5, "24 GB card", color="red")
    ax.set_xlabel("micro-batch (× 1024 tokens)")
    ax.set_ylabel("peak allocated GiB (one step)")
    ax.set_title(f"{shape}: one training step on the GPU (bf16 autocast)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(ROOT / "docs/bench/gpu"), help="folder of bench_memory_speed JSON files")
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--json", default=None, help="default: DIR/summary_<shape>.json")
    ap.add_argument("--plot", default=None, help="default: DIR/summary_<shape>.png")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    paths = [p for p in d.glob("memory_speed_*.json")]
    rows = load_rows(paths, args.shape)
    if not rows:
        sys.exit(f"bench_gpu_summary: no GPU rows of shape {args.shape} in {d}/memory_speed_*.json")
    print(table(rows))
    from lrqat_export.core.fsio import write_json

    out = Path(args.json or d / f"summary_{args.shape}.json")
    write_json(out, {"shape": args.shape, "rows": rows})
    plot(rows, Path(args.plot or d / f"summary_{args.shape}.png"), args.shape)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
