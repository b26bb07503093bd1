"""Direct GGUF export (blocks written from the integer codes) vs the naive path (dequantize s·W_int to float, then
re-quantize with gguf.quants.quantize, i.e. what `convert_hf_to_gguf` + `llama-quantize` would do), on SmolLM2-135M.

For each IntCheckpoint: the fraction of weights the naive path changes (vs s·W_int), and perplexity of the torch
fused model, of the direct file and of the naive file under real llama.cpp, on the same token windows. Both files
get the same metadata and the same F16 embedding; only the linear weights differ.

    .venv/bin/python -m scripts.gguf_direct_vs_naive [--intckpt DIR ...] [--presets q4_0 w4pc] [--json FILE]

Without --intckpt, RTN IntCheckpoints of --presets are made (cached in --work) with --range-method.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gguf  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from converters import gguf as G  # noqa: E402
from lrqat_export.core import data as D  # noqa: E402
from lrqat_export.core.intckpt import is_intckpt, load_intckpt, write_intckpt  # noqa: E402
from lrqat_export.core.models import load_model, load_tokenizer  # noqa: E402
from lrqat_export.core.quant import PRESETS  # noqa: E402
from lrqat_export.methods.rtn import ptq_rtn  # noqa: E402
from lrqat_export.runtimes.llamacpp import perplexity_gguf  # noqa: E402
from lrqat_export.runtimes.torch_eval import perplexity  # noqa: E402


def rtn_intckpt(preset: str, work: Path, range_method: str) -> Path:
    out = work / f"rtn_{preset}_{range_method}"
    if is_intckpt(out):
        return out
    model, tok, src = load_model("smollm2-135m")
    return write_intckpt(out, ptq_rtn(model, PRESETS[preset], src.to_dict(), range_method), tok)


def naive_tensors(direct: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]):
    """Same tensors, linear weights dequantized (= s·W_int, permuted) and re-quantized by gguf's quantizer."""
    out = []
    for name, arr, t in direct:
        if t in G.LAYOUT:
            arr = gguf.quants.quantize(gguf.quants.dequantize(arr, t), t)
        out.append((name, arr, t))
    return out


def f32_tensors(direct):
    """Same tensors, linear weights written as F32 holding exactly s·W_int: llama.cpp then multiplies in float32
    with no 8-bit activation quantization — the control that isolates the runtime's arithmetic."""
    return [(n, gguf.quants.dequantize(a, t), gguf.GGMLQuantizationType.F32) if t in G.LAYOUT else (n, a, t)
            for n, a, t in direct]


def changed(direct, naive) -> tuple[int, int, float]:
    """(weights whose value the naive path changed, weights, largest change in units of the block scale d)."""
    n = tot = 0
    worst = 0.0
    for (name, a, t), (_, b, _) in zip(direct, naive):
        if t not in G.LAYOUT:
            continue
        wa, wb = gguf.quants.dequantize(a, t), gguf.quants.dequantize(b, t)
        d = a.reshape(a.shape[0], -1, G.LAYOUT[t][1])[..., :2].copy().view("<f2").astype(np.float32)  # (out, nb, 1)
        step = np.abs(wa - wb).reshape(d.shape[0], d.shape[1], -1) / d
        n, tot, worst = n + int((wa != wb).sum()), tot + wa.size, max(worst, float(step.max()))
    return n, tot, worst


def run_one(ck_dir: Path, windows, protocol: str, embed_type: str, work: Path, f32_control: bool) -> dict:
    ck = load_intckpt(ck_dir)
    qtype = G.ggml_type_for(ck.spec)
    ftype = G.file_type(ck, G.layer_types(ck))
    tag = ck_dir.name
    t = time.perf_counter()
    direct_path = G.export_gguf(ck_dir, work / f"{tag}.direct.gguf", embed_type=embed_type, overwrite=True)
    t_export = time.perf_counter() - t
    direct = list(G.gguf_tensors(ck, qtype, embed_type))
    naive = naive_tensors(direct)
    naive_path = G.write_gguf(ck, work / f"{tag}.naive.gguf", naive, ftype, overwrite=True)
    n_changed, n_weights, max_step = changed(direct, naive)
    verify = G.verify_gguf(direct_path, ck)["quantized"]
    t = time.perf_counter()
    ppl_torch = perplexity(G.reference_model(ck, embed_type), windows, protocol)["ppl"]
    t_torch = time.perf_counter() - t
    r_direct = perplexity_gguf(direct_path, windows, protocol)
    r_naive = perplexity_gguf(naive_path, windows, protocol)
    r_f32 = None
    if f32_control:
        f32_path = G.write_gguf(ck, work / f"{tag}.f32.gguf", f32_tensors(direct), ftype, overwrite=True)
        r_f32 = perplexity_gguf(f32_path, windows, protocol)
        f32_path.unlink()  # ~0.5 GB; rebuilt in seconds
    return {
        "intckpt": str(ck_dir), "spec": ck.spec.name, "method": ck.manifest.get("method"), "gguf_type": qtype.name,
        "direct_exact": verify["exact"], "direct_max_step": verify["max_step"],
        "naive_changed_weights": n_changed, "weights": n_weights, "naive_changed_fraction": n_changed / n_weights,
        "naive_max_change_steps": max_step,
        "ppl": {"torch": ppl_torch, "llamacpp_direct": r_direct["ppl"], "llamacpp_naive": r_naive["ppl"],
                "llamacpp_f32_weights": r_f32 and r_f32["ppl"]},
        "gap": {"direct": r_direct["ppl"] / ppl_torch - 1, "naive": r_naive["ppl"] / ppl_torch - 1,
                "f32_weights": r_f32 and r_f32["ppl"] / ppl_torch - 1},
        "seconds": {"export_direct": t_export, "torch_ppl": t_torch, "llamacpp_direct_ppl": r_direct["seconds"],
                    "llamacpp_naive_ppl": r_naive["seconds"], "llamacpp_f32_ppl": r_f32 and r_f32["seconds"]},
        "files": {"direct": str(direct_path), "naive": str(naive_path)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- what to compare
    ap.add_argument("--intckpt", nargs="+", help="IntCheckpoint directories of SmolLM2 (e.g. an LR-QAT one)")
    ap.add_argument("--presets", nargs="+", default=["q4_0", "w4pc"], help="RTN presets when no --intckpt")
    ap.add_argument("--range-method", default="lp", help="RTN range search for --presets (default lp)")
    ap.add_argument("--embed-type", default="f16", choices=list(G.EMBED_CHOICES))
    ap.add_argument("--no-f32-control", action="store_true",
                    help="skip the control file holding the same s·W_int as F32 weights (no activation quantization)")
    # --- evaluation
    ap.add_argument("--eval-data", help="text file (default: WikiText-2 test from --wikitext, else the embedded corpus)")
    ap.add_argument("--wikitext", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2"),
                    help="directory with WikiText-2 test.txt (default ../shared/data/wikitext-2)")
    ap.add_argument("--windows", type=int, default=8, help="number of windows (default 8)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--protocol", default="full", choices=["full", "second_half"])
    # --- outputs
    ap.add_argument("--work", default="runs/gguf_direct_vs_naive", help="IntCheckpoints and .gguf files go here")
    ap.add_argument("--json", default=None, help="results file (default WORK/results.json)")
    args = ap.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cks = [Path(p) for p in args.intckpt] if args.intckpt else [rtn_intckpt(p, work, args.range_method)
                                                                 for p in args.presets]
    wiki = Path(args.wikitext) / "test.txt"
    data = args.eval_data or (str(wiki) if wiki.is_file() else "pydoc")
    windows = D.text_windows(load_tokenizer(cks[0]), [data], args.seq_len, args.windows)
    rows = [run_one(ck, windows, args.protocol, args.embed_type, work, not args.no_f32_control) for ck in cks]

    model = load_intckpt(cks[0]).manifest.get("source", {}).get("name")
    print(f"\n{model}: {windows.shape[0]} windows x {windows.shape[1]} tokens of {Path(data).name}, protocol "
          f"{args.protocol}, embeddings {args.embed_type}; llama.cpp = llama-cpp-python, 2 threads, flash attn off\n")
    print(f"| {'IntCheckpoint':<22} | type | torch ppl | llama.cpp direct (gap) | llama.cpp naive (gap) "
          f"| llama.cpp F32 weights (gap) | weights changed by naive | max change |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, g = r["ppl"], r["gap"]
        f32 = "—" if g["f32_weights"] is None else f"{p['llamacpp_f32_weights']:.4f} ({100 * g['f32_weights']:+.3f} %)"
        print(f"| {Path(r['intckpt']).name:<22} | {r['gguf_type']} | {p['torch']:.4f} | "
              f"{p['llamacpp_direct']:.4f} ({100 * g['direct']:+.3f} %) | {p['llamacpp_naive']:.4f} "
              f"({100 * g['naive']:+.3f} %) | {f32} | {100 * r['naive_changed_fraction']:.2f} % | "
              f"{r['naive_max_change_steps']:.2f} s |")
    out = Path(args.json) if args.json else work / "results.json"
    out.write_text(json.dumps({"args": vars(args), "model": model, "eval_data": data, "windows": list(windows.shape),
                               "host": platform.node(), "results": rows}, indent=2) + "\n")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
