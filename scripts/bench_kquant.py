"""Benchmark: LR-QAT's Q4_K_M file against llama.cpp's own Q4_K_M of the float model — what a user makes today with
`llama-quantize model-f32.gguf out.gguf Q4_K_M` — both run by llama.cpp on the same windows, in domain and out of
domain, with their file sizes.

    PYTHONPATH=. nice -n 10 .venv/bin/python -m scripts.bench_kquant                  # SmolLM2, 60 steps (CPU)
    PYTHONPATH=. .venv/bin/python -m scripts.bench_kquant --plan q4_k_s --steps 300
    PYTHONPATH=. .venv/bin/python -m scripts.bench_kquant --range-method imatrix   # RTN and LR-QAT's start: imatrix

Rows (SmolLM2-135M, the embedded default):
    fp (F32 GGUF)            our all-F32 export of the float model (converters.gguf.export_float_gguf), in llama.cpp
    llama.cpp Q4_K_M         llama_model_quantize (llama-cpp-python, in process) on that F32 file: the anchor
    llama.cpp Q4_K_M + imatrix  the same types, each tensor through llama.cpp's ggml_quantize_chunk with an
                             importance matrix of the float model's inputs on the first 32 training windows
                             (what `llama-imatrix` + `llama-quantize --imatrix` make;
                             runtimes.llamacpp.llama_quantize_imatrix)
    RTN Q4_K_M (ours)        our range search on the plan's grids (each layer on llama.cpp's type for it), exported
    LR-QAT Q4_K_M (ours)     LR-QAT trained on those grids (registry defaults, the quality benchmark's budget:
                             --steps × --batch windows of --seq tokens of WikiText-2 valid), fused, exported
Every row is scored by llama.cpp (runtimes.llamacpp.perplexity_gguf: 2 threads, all-position logits) on
--eval-windows windows of --eval-seq tokens of WikiText-2 test (in domain) and of the held-out pydoc tail (out of
domain), the windows scripts/bench_quality.py uses. Our files are also checked bit for bit against their
IntCheckpoints (verify_gguf) and scored in torch. The training cells come from scripts/bench_quality.run_cell
(same data, defaults and seeds as the quality table). Writes OUT/kquant_<plan>_<tag>.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from scripts import bench_quality as BQ

ROOT = Path(__file__).resolve().parent.parent


def _llamacpp(path: Path, ev, ood) -> dict:
    from lrqat_export.runtimes.llamacpp import perplexity_gguf

    return {"ppl": perplexity_gguf(path, ev)["ppl"], "ppl_ood": perplexity_gguf(path, ood)["ppl"],
            "file_mib": path.stat().st_size / 2**20}


def options(argv=None) -> tuple[argparse.Namespace, set[str]]:
    """(arguments, the names of this script's own options): every other attribute that bench_quality.run_cell and
    data_windows read comes from bench_quality's defaults."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default="q4_k_m", choices=["q4_k_m", "q4_k_s"])
    ap.add_argument("--steps", type=int, default=60, help="LR-QAT optimizer steps (default 60, the quality budget)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-seq", type=int, default=512)
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--range-method", default=None, choices=["lp", "mse", "minmax", "imatrix"],
                    help="the range search of our RTN row and of LR-QAT's start (default: lp for RTN, the method's "
                         "default for LR-QAT); imatrix calibrates on the first training windows")
    ap.add_argument("--wikitext", default=str(ROOT.parent / "shared/data/wikitext-2"))
    ap.add_argument("--out", default=str(ROOT / "docs/bench/kquant"))
    ap.add_argument("--work", default=str(ROOT / "runs/bench_kquant"), help="checkpoints and GGUF files")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    own = set(vars(args))  # the options its JSON records
    # what bench_quality.run_cell and data_windows read besides these: bench_quality's own defaults
    for key, value in vars(BQ.parser().parse_args([])).items():
        if not hasattr(args, key):
            setattr(args, key, value)
    args.overrides, args.kd = {}, {}
    return args, own


def main(argv=None) -> int:
    args, own = options(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    args.keep = str(work)

    from converters import gguf as G
    from lrqat_export.core import quiet
    from lrqat_export.core.fsio import write_json
    from lrqat_export.core.intckpt import load_intckpt
    from lrqat_export.core.models import load_model
    from lrqat_export.methods.rtn import IMATRIX_WINDOWS, activation_importance
    from lrqat_export.runtimes.llamacpp import llama_quantize, llama_quantize_imatrix
    from lrqat_export.runtimes.torch_eval import perplexity

    quiet.setup()  # llama.cpp's quantizer prints a line per tensor; keep the table readable
    model, tok, src = load_model("smollm2-135m")
    base = (model, tok, src, BQ.data_windows(tok, args))
    _, ev, ood = base[3]
    rows: dict[str, dict] = {}
    t = time.perf_counter()
    f32 = G.export_float_gguf(model, tok, src.to_dict(), work / "fp-f32.gguf", overwrite=True)
    rows["fp"] = {"label": "FP (F32 GGUF)", **_llamacpp(f32, ev, ood), "s": time.perf_counter() - t}
    t = time.perf_counter()
    theirs = llama_quantize(f32, work / f"llamacpp-{args.plan}.gguf", args.plan)
    rows["llamacpp"] = {"label": f"llama.cpp {args.plan.upper()} (llama_model_quantize)",
                        **_llamacpp(theirs, ev, ood), "s": time.perf_counter() - t}
    for method in ("rtn", "lrqat"):
        t = time.perf_counter()
        cell = BQ.run_cell(args.plan, method, args, work, base)
        ck_dir = work / f"{args.plan}__{method}"
        path = G.export_gguf(ck_dir, work / f"{method}-{args.plan}.gguf", overwrite=True)
        readback = G.verify_gguf(path, ck_dir)
        ck = load_intckpt(ck_dir)
        torch_ref = G.reference_model(ck, G.file_embed_types(path))
        rows[method] = {"label": f"{'LR-QAT' if method == 'lrqat' else 'RTN'} {args.plan.upper()} (ours)",
                        **_llamacpp(path, ev, ood), "torch_ppl": perplexity(torch_ref, ev)["ppl"],
                        "torch_ppl_ood": perplexity(torch_ref, ood)["ppl"], "readback_exact": readback["exact"],
                        "types": sorted({v["type"] for v in readback["tensors"].values()}),
                        "cell": {k: v for k, v in cell.items() if k not in ("options",)},
                        "s": time.perf_counter() - t}
        if method == "lrqat":
            rows[method]["fuse_max_abs_logit_diff"] = cell.get("fuse_max_abs_logit_diff")
    # the anchor a llama.cpp user with calibration data makes: `llama-imatrix` on the same text our imatrix start
    # uses (the first IMATRIX_WINDOWS training windows), then `llama-quantize --imatrix` (llama.cpp's own code)
    t = time.perf_counter()
    to_gguf = G.tensor_name_map(load_intckpt(work / f"{args.plan}__rtn"))
    imp = activation_importance(model, base[3][0][:IMATRIX_WINDOWS])
    imx = llama_quantize_imatrix(f32, theirs, work / f"llamacpp-{args.plan}-imatrix.gguf",
                                 {to_gguf[f"{n}.weight"]: v.numpy() for n, v in imp.items()})
    rows["llamacpp_imatrix"] = {"label": f"llama.cpp {args.plan.upper()} + imatrix (ggml_quantize_chunk)",
                                **_llamacpp(imx, ev, ood), "imatrix_windows": IMATRIX_WINDOWS,
                                "s": time.perf_counter() - t}
    rows = {k: rows[k] for k in ("fp", "llamacpp", "llamacpp_imatrix", "rtn", "lrqat")}
    fp, ref = rows["fp"], rows["llamacpp"]
    lines = [f"SmolLM2-135M, {args.plan.upper()}: llama.cpp perplexity on {args.eval_windows}×{args.eval_seq} tokens "
             f"(WikiText-2 test | pydoc tail, out of domain); LR-QAT {args.steps} steps × {args.batch} × {args.seq}",
             "", "| model | file MiB | WikiText-2 | OOD (pydoc) | gap to FP closed vs llama.cpp's, in / out |",
             "|---|---|---|---|---|"]
    for key, r in rows.items():
        closed = ""
        if key in ("rtn", "lrqat"):
            c = [(ref[k] - r[k]) / (ref[k] - fp[k]) if ref[k] != fp[k] else float("nan") for k in ("ppl", "ppl_ood")]
            closed = f"{100 * c[0]:.1f} % / {100 * c[1]:.1f} %"
        lines.append(f"| {r['label']} | {r['file_mib']:.1f} | {r['ppl']:.3f} | {r['ppl_ood']:.3f} | {closed} |")
    text = "\n".join(lines)
    print(text)
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_1m": os.getloadavg()[0]},
           "command": "python -m scripts.bench_kquant " + " ".join(argv if argv is not None else sys.argv[1:]),
           "args": {k: v for k, v in vars(args).items() if k in own},
           "rows": rows, "table": text}
    tag = f"s{args.steps}_b{args.batch}_t{args.seq}_e{args.eval_windows}x{args.eval_seq}_{args.recipe}"
    tag += f"_range{args.range_method}" if args.range_method else ""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"kquant_{args.plan}_{tag}.json", res)
    print(f"wrote {out / f'kquant_{args.plan}_{tag}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
