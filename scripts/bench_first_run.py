"""Benchmark: the first run a new user makes — the README's main job with its defaults, timed stage by stage, and
the GPTQ loader's seconds per window before and after the switch to the default CPU path, in one run of this script.

    PYTHONPATH=. .venv/bin/python -m scripts.bench_first_run                 # main job + loader comparison
    PYTHONPATH=. .venv/bin/python -m scripts.bench_first_run --skip-main --gptq DIR   # loader comparison only

Time it on a quiet machine (one job at a time on the 2 cores, default allocator). Writes --json (default
docs/bench/first_run.json) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main_job(out: Path) -> dict:
    """`lrqat run --out OUT` as README.md prints it (its defaults), in a fresh process; wall time and stage times."""
    from lrqat_export.core.quiet import foreign_stderr

    t = time.perf_counter()
    r = subprocess.run([str(Path(sys.executable).parent / "lrqat"), "run", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"bench_first_run: lrqat run exited {r.returncode}: {r.stderr[-2000:]}")
    rep = json.loads((out / "report.json").read_text())
    parity = json.loads((out / "parity" / "parity.json").read_text())
    return {"wall_s": wall, "stages_s": rep["timings"], "verify_timings_s": parity["timings"],
            "eval_windows": rep["eval"]["windows"], "ppl": rep["ppl"], "ppl_ood": rep.get("ppl_ood"),
            "rtn_gap_closed": rep["rtn_gap_closed"], "parity": rep["parity"],
            "stderr_lines": len(r.stderr.splitlines()),  # \r-redrawn progress bars count once per redraw
            "stderr_foreign": foreign_stderr(r.stderr)}  # other projects' lines on the terminal: expected none


def loader_seconds(gptq: Path, windows: int) -> dict:
    """Seconds per 512-token window through the previous loader settings (GPTQConfig backend 'torch', fp16:
    GPTQModel's TorchLinear) and through the user's default path, on the same windows; perplexities beside."""
    import torch

    from lrqat_export.core import data as D
    from lrqat_export.core import quiet
    from lrqat_export.core.models import load_tokenizer
    from lrqat_export.runtimes.gptq_loader import kernels, load_gptq
    from lrqat_export.runtimes.torch_eval import perplexity

    quiet.setup(verbose=False)
    tok = load_tokenizer(gptq)
    w = D.windows(D.tokenize(tok, D.split_corpus(D.embedded_corpus())[1], (windows + 1) * 512), 512, windows, "eval")
    out = {}
    for name, kw in (("before: backend torch, fp16", {"backend": "torch", "dtype": torch.float16}),
                     ("after: default path", {})):
        model = load_gptq(gptq, **kw)
        t = time.perf_counter()
        r = perplexity(model, w)
        out[name] = {"s_per_window": (time.perf_counter() - t) / windows, "ppl": r["ppl"], "kernels": kernels(model),
                     "dtype": str(model.dtype)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_first_run"), help="the main job's output directory")
    ap.add_argument("--skip-main", action="store_true", help="only the loader comparison (needs --gptq)")
    ap.add_argument("--gptq", help="GPTQ directory for the loader comparison (default: the main job's)")
    ap.add_argument("--windows", type=int, default=2, help="windows for the loader comparison (default 2)")
    ap.add_argument("--json", default=str(ROOT / "docs" / "bench" / "first_run.json"))
    args = ap.parse_args(argv)
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                             "loadavg_1m_start": os.getloadavg()[0]}}
    out = Path(args.out)
    if not args.skip_main:
        if out.exists():
            import shutil

            shutil.rmtree(out)
        res["main_job"] = main_job(out)
    gptq = Path(args.gptq) if args.gptq else out / "gptq"
    res["gptq_loader"] = loader_seconds(gptq, args.windows)
    res["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    from lrqat_export.core.fsio import write_json

    write_json(args.json, res)
    if "main_job" in res:
        m = res["main_job"]
        print(f"main job: {m['wall_s'] / 60:.1f} min wall; RTN→FP gap closed {100 * m['rtn_gap_closed']:.1f} %")
        print("| stage | s |\n|---|---|")
        for k, v in m["stages_s"].items():
            print(f"| {k.removesuffix('_s')} | {v:.1f} |")
    print("| GPTQ loader | s / window | ppl | kernels |\n|---|---|---|---|")
    for k, v in res["gptq_loader"].items():
        print(f"| {k} | {v['s_per_window']:.1f} | {v['ppl']:.4f} | {', '.join(v['kernels'])} ({v['dtype']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
