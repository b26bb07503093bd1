"""Memory per rank of `lrqat train` under torchrun (FSDP2, gloo on CPU) as the number of ranks grows.

    python -m scripts.bench_fsdp_memory [--ranks 1 2 4] [--layers 24] [--hidden 1024] [--intermediate 2816]

Builds a random-init Llama of the given shape (saved once as an ordinary HF directory with a small BPE tokenizer),
then for each rank count N runs the real CLI, `torchrun --nproc-per-node N -m lrqat_export.cli train`, with the
same global batch (4 windows; micro-batch 1 on every rank: --grad-accum 4/N) and reads what each rank reported in
OUT/train_log.json (`memory_per_rank`): bytes of Φ0, trainable A/B/s and AdamW state held by the rank, and its
peak RSS — over the training loop (VmHWM reset after sharding) and before it (loading and preparing the full
model, which every rank does). Prints a table, writes JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lrqat_export.core.fsio import write_json  # noqa: E402

MIB = 2**20


def build_model(out: Path, hidden: int, layers: int, intermediate: int) -> Path:
    if (out / "config.json").is_file():
        return out
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny  # the tests' random-model builder: real HF directory + byte-level BPE tokenizer

    return tiny.make_model(out, "llama", tie=True, hidden=hidden, layers=layers, heads=8, kv_heads=4,
                           intermediate=intermediate)


def run_ranks(model: Path, n: int, work: Path, args) -> dict:
    out = work / f"ranks{n}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "-m", "lrqat_export.cli", "train", "--model", str(model),
           "--out", str(out), "--overwrite", "--preset", "w4pc", "--range-method", "minmax", "--steps",
           str(args.steps), "--seq-len", str(args.seq_len), "--max-train-windows", "16", "--batch-size", "4",
           "--grad-accum", str(4 // n), "--ckpt-every", "0"]
    # MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB: every tensor above it gets its own mapping, returned on free. glibc's
    # default *dynamic* threshold climbs to 32 MiB after the first large free, after which the per-layer weight-sized
    # temporaries of the LR-QAT forward land in the heap and RSS keeps several GB of freed memory (measured: 6.6 GB
    # peak on 1 rank and 6.9 GB on 2 for this model), hiding what the tensors need. --default-malloc keeps glibc's.
    malloc = {} if args.default_malloc else {"MALLOC_MMAP_THRESHOLD_": str(MIB)}
    env = {**os.environ, **malloc, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)}\nexit {r.returncode}\n{r.stderr[-4000:]}")
    log = json.loads((out / "train_log.json").read_text())
    mem = log["memory_per_rank"]
    manifest = json.loads((out / "lrqat_manifest.json").read_text())
    return {"ranks": n, "wall_s": time.perf_counter() - t0, "per_rank": mem,
            "max_over_ranks": {k: max(m[k] for m in mem) for k in mem[0]},
            "step_s": sum(1 / h["tokens_per_s"] for h in log["history"]) * 4 * args.seq_len / len(log["history"]),
            "parameters": manifest["parameters"], "command": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Model shape
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--intermediate", type=int, default=2816)
    # Run
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="rank counts (each must divide 4)")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps (the first allocates the AdamW state)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold")
    ap.add_argument("--work", default="/tmp/lrqat_bench_fsdp", help="model and run directories (scratch)")
    ap.add_argument("--json", default=str(ROOT / "docs" / "bench" / "fsdp_memory.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work / f"llama-h{args.hidden}-l{args.layers}-i{args.intermediate}", args.hidden,
                        args.layers, args.intermediate)
    rows = [run_ranks(model, n, work, args) for n in args.ranks]
    print(f"model: {rows[0]['parameters']['total'] / 1e6:.0f} M parameters, Φ0 int8 "
          f"{rows[0]['max_over_ranks']['phi0_bytes'] * rows[0]['ranks'] / MIB:.0f} MiB in total")
    print("| ranks | Φ0 MiB/rank | A,B,s MiB/rank | AdamW MiB/rank | other frozen MiB/rank | peak RSS in training "
          "MiB/rank | peak RSS before training (load, prepare) MiB/rank | s/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["max_over_ranks"]
        print(f"| {r['ranks']} | {m['phi0_bytes'] / MIB:.1f} | {m['trainable_bytes'] / MIB:.1f} | "
              f"{m['optimizer_bytes'] / MIB:.1f} | {m['other_frozen_bytes'] / MIB:.1f} | "
              f"{m['peak_rss_training_bytes'] / MIB:.0f} | {m.get('peak_rss_before_training_bytes', 0) / MIB:.0f} | "
              f"{r['step_s']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, {"model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate},
                           "malloc_mmap_threshold": None if args.default_malloc else MIB, "runs": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
