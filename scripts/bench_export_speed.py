"""Benchmark: export speed on SmolLM2-135M — our GGUF export vs llama.cpp's own path (convert_hf_to_gguf.py, then
llama-quantize), and our GPTQ packing vs GPTQModel's packer on the same integers.

    PYTHONPATH=. nice -n 10 .venv/bin/python -m scripts.bench_export_speed --llama-cpp DIR   # DIR: llama.cpp source tree
    PYTHONPATH=. .venv/bin/python -m scripts.bench_export_speed --full ...                    # 5 repeats instead of 3

DIR is the llama.cpp tree vendored in the llama-cpp-python 0.3.36 sdist, with llama-quantize built in DIR/build
(reference/env-llamacpp.md; fetched and built outside the repository, never committed):
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d sdist && tar xzf sdist/*.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_CURL=OFF && cmake --build build -j2 --target llama-quantize

What is timed (median of --repeats; every run on the same machine, in this one process or its children):
* ours, GGUF: `export_gguf(IntCheckpoint → Q4_0 file)` in process, and `lrqat export gguf` as a fresh process
  (imports included). Input: the q4_0 RTN IntCheckpoint of SmolLM2 (the integers are already decided).
* llama.cpp: `python convert_hf_to_gguf.py HF_DIR --outtype f16` (fresh process) + `llama-quantize --pure
  --token-embedding-type f16 F16.gguf Q4_0` — the route users take for a merged float model (it decides the
  integers itself, by its own rounding; our export never re-quantizes, DESIGN.md). Same embeddings type (f16).
* ours, GPTQ: `export_gptq` in process (pack + write + read-back verification) and pack_layer alone over all
  210 layers; GPTQModel: TorchLinear.pack_block (its Python path, GPTQMODEL_DISABLE_PACK_EXT=1) over the same
  layers and integers, outputs compared word for word (scripts/bench_gptq_pack.py's harness).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def sh(cmd: list[str], **kw) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({p.returncode}): {p.stderr[-800:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", help="llama.cpp source tree with build/bin/llama-quantize (see above); "
                                        "without it only our side and GPTQModel's are timed")
    ap.add_argument("--converter-pythonpath", default="",
                    help="extra PYTHONPATH for convert_hf_to_gguf.py (e.g. a --target dir holding sentencepiece, "
                         "which the converter imports for Llama vocabularies)")
    ap.add_argument("--repeats", type=int, help="timed repeats, median reported (default 3; --full 5)")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "docs/bench/export_speed.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs/bench/export_speed.png"))
    args = ap.parse_args(argv)
    reps = args.repeats or (5 if args.full else 3)
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from converters.gguf import export_gguf
    from converters.gptq import export_gptq, pack_layer
    from lrqat_export.core.fsio import write_json
    from lrqat_export.core.intckpt import load_intckpt, write_intckpt
    from lrqat_export.methods.rtn import ptq_rtn
    from lrqat_export.core.models import cached_hf_copy, load_model, resolve
    from lrqat_export.core.quant import PRESETS
    from scripts.bench_gptq_pack import gptqmodel_pack

    spec = PRESETS["q4_0"]
    model, tok, src = load_model("smollm2-135m")
    hf_dir = cached_hf_copy(resolve("smollm2-135m"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        tmp = Path(tmp)
        ck_dir = write_intckpt(tmp / "ck", ptq_rtn(model, spec, src.to_dict()), tok)
        del model
        # --- GGUF
        med, ts = timed(lambda: export_gguf(ck_dir, tmp / "ours.gguf", overwrite=True), reps)
        rows["ours_gguf_inprocess"] = {"s": med, "runs": ts, "bytes": (tmp / "ours.gguf").stat().st_size}
        cli = [sys.executable, "-m", "lrqat_export.cli", "export", "gguf", str(ck_dir), "--out", str(tmp / "o2.gguf"),
               "--overwrite"]
        med, ts = timed(lambda: sh(cli, env=env), reps)
        rows["ours_gguf_cli"] = {"s": med, "runs": ts}
        if args.llama_cpp:
            lc = Path(args.llama_cpp)
            quant = lc / "build" / "bin" / "llama-quantize"
            if not (lc / "convert_hf_to_gguf.py").is_file():
                sys.exit(f"bench_export_speed: {lc / 'convert_hf_to_gguf.py'} not found; expected a llama.cpp tree")
            lenv = {**env, "PYTHONPATH": os.pathsep.join(x for x in (str(lc / "gguf-py"), args.converter_pythonpath)
                                                         if x)}  # the converter's own gguf-py
            conv = [sys.executable, str(lc / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f16",
                    "--outfile", str(tmp / "f16.gguf")]
            med, ts = timed(lambda: sh(conv, env=lenv), reps)
            rows["llamacpp_convert_f16"] = {"s": med, "runs": ts}
            q = [str(quant), "--pure", "--token-embedding-type", "f16", str(tmp / "f16.gguf"), str(tmp / "lq.gguf"),
                 "Q4_0", "2"]
            if quant.is_file():
                med, ts = timed(lambda: sh(q), reps)
                rows["llamacpp_quantize_q4_0"] = {"s": med, "runs": ts, "bytes": (tmp / "lq.gguf").stat().st_size}
                rows["llamacpp_total"] = {"s": rows["llamacpp_convert_f16"]["s"]
                                          + rows["llamacpp_quantize_q4_0"]["s"]}
            else:
                print(f"  {quant} not built: llama-quantize not timed", flush=True)
        # --- GPTQ
        med, ts = timed(lambda: export_gptq(ck_dir, tmp / "gptq", overwrite=True), reps)
        rows["ours_gptq_export_inprocess"] = {"s": med, "runs": ts}
        ck = load_intckpt(ck_dir)
        layers = [(n, q.codes.numpy(), q.scales.numpy()) for n, q in ck.layers.items()]
        med, ts = timed(lambda: [pack_layer(c, s, None, 4, 32, "gptq_v2", n) for n, c, s in layers], reps)
        rows["ours_gptq_pack_only"] = {"s": med, "runs": ts}
        theirs, identical = 0.0, True
        for n, c, s in layers:
            qw, qz, dt = gptqmodel_pack(c, s, None, 4, 32)
            lay = pack_layer(c, s, None, 4, 32, "gptq_v2", n)
            identical &= bool(np.array_equal(qw, lay.qweight) and np.array_equal(qz, lay.qzeros))
            theirs += dt
        rows["gptqmodel_pack_block"] = {"s": theirs, "runs": [theirs], "identical_to_ours": identical}
    import gptqmodel

    res = {"model": "smollm2-135m", "spec": spec.name, "repeats": reps, "rows": rows, "loadavg_1m": os.getloadavg()[0],
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gptqmodel": gptqmodel.__version__}}
    print("\n| path | seconds (median) | note |\n|---|---|---|")
    notes = {"ours_gguf_inprocess": "IntCheckpoint → Q4_0 GGUF, in process",
             "ours_gguf_cli": "`lrqat export gguf`, fresh process (imports included)",
             "llamacpp_convert_f16": "convert_hf_to_gguf.py → F16 GGUF, fresh process",
             "llamacpp_quantize_q4_0": "llama-quantize --pure F16 → Q4_0",
             "llamacpp_total": "convert + quantize",
             "ours_gptq_export_inprocess": "IntCheckpoint → GPTQ dir (pack, write, read-back check)",
             "ours_gptq_pack_only": "pack_layer over 210 layers (numpy)",
             "gptqmodel_pack_block": f"TorchLinear.pack_block over the same layers; identical words: {identical}"}
    for k, r in rows.items():
        print(f"| {k} | {r['s']:.2f} | {notes[k]} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, res)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = [k for k in rows if k != "llamacpp_total"]
    ax.barh(names, [rows[k]["s"] for k in names], color=["C0" if k.startswith("ours") else "C7" for k in names])
    ax.set_xlabel("seconds (median)")
    ax.set_title(f"SmolLM2-135M export, q4_0 (load 1m {res['loadavg_1m']:.1f})")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.json} and {args.plot}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
