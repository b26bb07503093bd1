"""Benchmark: quality of every method on SmolLM2-135M, side by side — FP, RTN, GPTQ (GPTQModel), LR-QAT, GPTQ-init
LR-QAT, PEQA, full-model QAT (LSQ), QLoRA (+merge+RTN), QA-LoRA (merged zeros) and the FP-LoRA control — per grid.

    PYTHONPATH=. nice -n 10 .venv/bin/python -m scripts.bench_quality               # CPU defaults (resumable)
    PYTHONPATH=. .venv/bin/python -m scripts.bench_quality --full                    # 300 steps, 8 eval windows
    PYTHONPATH=. .venv/bin/python -m scripts.bench_quality --presets w4pc --methods fp rtn lrqat

Same data and token budget for every trained method: WikiText-2 valid (--wikitext DIR, default ../shared/data/wikitext-2, read
in place) in windows of --seq tokens, --steps × --batch windows drawn in the same order (train.batch_indices, seed 0);
RTN is the weight-only Lp range search; the trained quantized methods start from RTN with their own default range
search (imatrix for LR-QAT, PEQA and full QAT on grouped grids, calibrated on the first 32 training windows;
--range-method sets one for all) (GPTQ-init LR-QAT from GPTQ's integers). GPTQ calibrates on the first
--calib-windows windows of the same training text. Evaluation: --eval-windows windows
of --eval-seq tokens of WikiText-2 test (in domain) and of the held-out tail of the embedded pydoc corpus (out of
domain: training on WikiText also adapts the model to WikiText, docs/ARCHITECTURE.md "Traps"). Every quantized method is scored
on its IntCheckpoint reloaded as a torch model (what exports); QLoRA and QA-LoRA are also scored as trained (float
merge / float zero points) so their merge cost shows.

Each (preset, method) cell writes CELLS/<preset>__<method>.json atomically and is skipped when present, so a killed
run resumes where it stopped. Hyperparameters per method: lrqat_export.methods.registry (not tuned here).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("fp", "rtn", "gptq", "lrqat", "gptq-lrqat", "peqa", "full-qat", "qlora", "qalora", "lora-fp")
PRESET_FREE = ("fp", "lora-fp")  # one cell, shown in every preset's table


def data_windows(tok, args, model=None):
    from lrqat_export.core import data as D

    valid, test = Path(args.wikitext) / "valid.txt", Path(args.wikitext) / "test.txt"
    if not (valid.is_file() and test.is_file()):
        sys.exit(f"bench_quality: {args.wikitext}/{{valid,test}}.txt not found (--wikitext DIR)")
    train = D.windows(D.tokenize(tok, valid.read_text()), args.seq, None, "train")
    if args.train_text == "sampled":
        train = _sampled(train, args, model)
    ev = D.windows(D.tokenize(tok, test.read_text(), (args.eval_windows + 1) * args.eval_seq), args.eval_seq,
                   args.eval_windows, "eval")
    ood = D.windows(D.tokenize(tok, D.split_corpus(D.embedded_corpus())[1], (args.eval_windows + 1) * args.eval_seq),
                    args.eval_seq, args.eval_windows, "ood")
    return train, ev, ood


def _sampled(train, args, model):
    """--train-text sampled: as many windows as the budget draws (steps × batch), each the first
    --prompt-tokens tokens of a WikiText-2 valid window (evenly spaced) continued by the float model's own samples
    (core.data.sampled_windows, seed --sample-seed); kept in --work so every cell and rerun trains on the same tokens."""
    import torch

    from lrqat_export.core import data as D
    from lrqat_export.core.fsio import atomic_path

    n = args.steps * args.batch
    f = Path(args.work) / f"sampled_n{n}_t{args.seq}_p{args.prompt_tokens}" \
        f"{f'_s{args.sample_seed}' if args.sample_seed else ''}.pt"
    if f.is_file():
        return torch.load(f)
    pick = torch.linspace(0, train.shape[0] - 1, n).round().long()
    t = time.perf_counter()
    w = D.sampled_windows(model, train[pick, : args.prompt_tokens], args.seq, seed=args.sample_seed, batch_size=64)
    print(f"  sampled {n} windows of {args.seq} tokens in {time.perf_counter() - t:.0f} s", flush=True)
    f.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(f) as tmp:
        torch.save(w, tmp)
    return w


def dithered(model, fraction: float, seed: int = 0) -> None:
    """--dither: add to every quantized projection's weights uniform noise of ±fraction/2 of the level spacing
    d = (max − min)/15 of its 32-weight block, in place (seeded). The embedded model's blocks are Q4_1 blocks, exactly
    m + d·k (BENCHMARKS "The benchmark model is already on a 4-bit grid"); the noise spreads each weight inside its
    level's rounding bin, so at fraction 1 the model is a float model that Q4_1 rounds back to the shipped one,
    whose weights no longer sit on any 4-bit grid. Perplexities then change: its FP cell is the reference."""
    import torch

    from lrqat_export.core.models import quantized_layer_names

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in quantized_layer_names(model):
            w = model.get_submodule(name).weight
            b = w.view(-1, 32)
            d = (b.max(1, keepdim=True).values - b.min(1, keepdim=True).values) / 15
            b += (torch.rand(b.shape, generator=g) - 0.5) * fraction * d


def _ppl(model, ev, ood) -> dict:
    from lrqat_export.runtimes.torch_eval import perplexity

    return {"ppl": perplexity(model, ev)["ppl"], "ppl_ood": perplexity(model, ood)["ppl"]}


def method_config(method: str, steps: int, batch: int, recipe: str = "default", objective: str | None = None,
                  overrides: dict | None = None, kd: dict | None = None, spec=None):
    """(registry name, resolved MethodOptions, resolved TrainConfig) of a trained cell: every method at its
    registry defaults in `recipe` on grid `spec` (tests/test_architecture.py checks that they are exactly the
    CLI's), then the sweep's `overrides` (MethodOptions / TrainConfig fields) and distillation settings `kd`."""
    import dataclasses

    from lrqat_export.methods import registry
    from lrqat_export.methods.common import MethodOptions
    from lrqat_export.train.config import TrainConfig

    name = method.removeprefix("gptq-")
    ov = dict(overrides or {})
    opt_fields = {f.name for f in dataclasses.fields(MethodOptions)}
    # the paper's full QAT keeps checkpointing off unless memory forces it; time it as such
    opts = MethodOptions(checkpointing=name != "full-qat", **{k: v for k, v in ov.items() if k in opt_fields})
    opts = registry.resolve_options(name, opts, recipe, spec)
    cfg = TrainConfig(steps=steps, batch_size=batch, seed=ov.pop("seed", 0), objective=objective, **(kd or {}),
                      **{k: v for k, v in ov.items() if k not in opt_fields})
    return name, opts, cfg.resolved(name, recipe, spec)


_TEACHERS: dict = {}  # one pre-pass per (objective settings, budget): every cell trains on the same windows


def _teacher(model, train_w, cfg):
    from lrqat_export.train.job import teacher_targets

    if cfg.objective == "ce":
        return None
    key = (cfg.steps, cfg.batch_size, cfg.seed, cfg.kd_topk, cfg.kd_temperature, cfg.bf16)
    if key not in _TEACHERS:
        _TEACHERS[key] = teacher_targets(model, train_w, cfg)
    return _TEACHERS[key]


def _keep(args, preset: str, method: str, ck, tok) -> None:
    """With args.keep (a directory; scripts/bench_kquant.py), write the cell's IntCheckpoint there."""
    if getattr(args, "keep", None):
        from lrqat_export.core.intckpt import write_intckpt

        write_intckpt(Path(args.keep) / f"{preset}__{method}", ck, tok, overwrite=True)


def _moved_from(rtn, ck) -> dict:
    """How far training moved the integers from RTN's: the share of codes changed, and the median |Δs|/s of the
    scales (what PEQA can move is the scales only; LR-QAT's adapters change codes)."""
    import torch

    from lrqat_export.methods.lrqat import codes_moved

    rel = [((q.scales.float() - rtn.layers[n].scales.float()).abs() / rtn.layers[n].scales.float()).flatten()
           for n, q in ck.layers.items()]
    return {"codes_changed_fraction": codes_moved((q.codes, rtn.layers[n].codes) for n, q in ck.layers.items())["fraction"],
            "scale_rel_change_median": float(torch.cat(rel).median())}


def run_cell(preset: str, method: str, args, work: Path, base) -> dict:
    """One (preset, method) cell on a fresh copy of the base model. base = (model, tok, src, (train, ev, ood))."""
    import torch

    from lrqat_export.core.intckpt import load_intckpt, write_intckpt
    from lrqat_export.core.quant import PRESETS
    from lrqat_export.methods import registry
    from lrqat_export.methods.baselines import merged_float_model
    from lrqat_export.methods.common import load_weights_from
    from lrqat_export.methods.gptq_ptq import ptq_gptq
    from lrqat_export.methods.rtn import rtn_start
    from lrqat_export.train.loop import train

    torch.manual_seed(0)
    model, tok, src = copy.deepcopy(base[0]), base[1], base[2]
    train_w, ev, ood = base[3]
    spec = PRESETS[preset]
    t0 = time.perf_counter()
    res: dict = {"preset": preset, "method": method}
    if method == "fp":
        return {**res, **_ppl(model, ev, ood)}
    if method not in ("fp", "lora-fp"):
        registry.check_grid(method.removeprefix("gptq-"), spec)  # K grids: the methods that train on them only
    ref = args.range_method or "lp"  # the RTN baseline: lp unless --range-method says otherwise
    rtn = rtn_start(model, spec, src.to_dict(), ref, train_w) if method != "lora-fp" else None
    if method == "rtn":
        _keep(args, preset, method, rtn, tok)
        return {**res, **_ppl(rtn.to_torch_model(), ev, ood)}
    if method in ("gptq", "gptq-lrqat"):
        gdir = work / f"{preset}__gptq"
        if not (gdir / "lrqat_manifest.json").is_file():
            t = time.perf_counter()
            ck = ptq_gptq(model, tok, spec, src.to_dict(), train_w[: args.calib_windows])
            write_intckpt(gdir, ck, tok, overwrite=True)
            res["gptq_s"] = time.perf_counter() - t
        gck = load_intckpt(gdir)
        res["gptq_import_check"] = gck.manifest["gptq"].get("import_check")
        if method == "gptq":
            return {**res, **_ppl(gck.to_torch_model(), ev, ood), "wall_s": time.perf_counter() - t0}
    name, opts, cfg = method_config(method, args.steps, args.batch, args.recipe, args.objective,
                                    {**({"range_method": args.range_method} if args.range_method else {}),
                                     **args.overrides.get(method.removeprefix("gptq-"), {})}, args.kd, spec)
    res.update(steps=args.steps, batch=args.batch, seq=args.seq, tokens=args.steps * args.batch * args.seq,
               alpha=opts.alpha, lr_ab=cfg.lr_ab, lr_scale=cfg.lr_scale, objective=cfg.objective,
               recipe=args.recipe, options={k: v for k, v in vars(opts).items()},
               overrides=args.overrides.get(name, {}))
    t = time.perf_counter()
    teacher = _teacher(model, train_w, cfg)  # the float model, before anything is prepared or loaded into it
    res["teacher_s"] = time.perf_counter() - t
    t = time.perf_counter()
    m = registry.get(name, trains=True)
    init = None
    if method == "gptq-lrqat":
        load_weights_from(model, gck)  # Φ0 = GPTQ's codes exactly
        init = gck
    elif m.uses_init:  # the method's start: the baseline, or RTN with the method's own range search
        init = rtn if opts.range_method == ref else rtn_start(model, spec, src.to_dict(), opts.range_method, train_w)
    torch.manual_seed(0)
    m.prepare(model, spec, opts, init)
    hist = train(model, train_w, cfg, progress=args.progress, method=name, opts=opts, desc=method, teacher=teacher,
                 recipe=args.recipe)
    res["train_s"] = time.perf_counter() - t
    if m.output == "float":
        res.update(_ppl(merged_float_model(model), ev, ood))
    else:
        ck = m.fuse(model, spec, src.to_dict(), opts, None)
        _keep(args, preset, method, ck, tok)
        fused = ck.to_torch_model()
        res["exported_spec"] = ck.spec.name
        if rtn is not None and not ck.spec.is_k:
            res.update(_moved_from(init if init is not None else rtn, ck))
        if m.exact:
            with torch.no_grad():
                probe = ev[:1, :128]
                res["fuse_max_abs_logit_diff"] = float((model(input_ids=probe).logits
                                                        - fused(input_ids=probe).logits).abs().max())
        res.update(_ppl(fused, ev, ood))
        if not m.exact:  # as trained: float merge / float zero points (not exportable)
            asf = _ppl(merged_float_model(model), ev, ood)
            res.update(ppl_as_trained=asf["ppl"], ppl_ood_as_trained=asf["ppl_ood"])
    res["final_loss"] = sum(h["loss"] for h in hist[-10:]) / min(10, len(hist))
    res["step_s_median"] = sorted(args.batch * args.seq / h["tokens_per_s"] for h in hist)[len(hist) // 2]
    res["wall_s"] = time.perf_counter() - t0
    return res


def summary(cells: dict, presets: list[str]) -> tuple[str, dict]:
    lines, derived = [], {}
    fp, lora = cells.get(("-", "fp")), cells.get(("-", "lora-fp"))
    for preset in presets:
        rtn = cells.get((preset, "rtn"))
        lines += [f"\n### {preset}\n", "| method | WikiText-2 test ppl | gap closed vs RTN→FP | gap closed vs "
                  "RTN→FP-LoRA | pydoc (OOD) ppl | OOD gap closed vs RTN→FP | train s | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in METHODS:
            c = cells.get(("-" if m in PRESET_FREE else preset, m))
            if c is None:
                lines.append(f"| {m} | not run | | | | | | |")
                continue

            def closed(key, ref):
                if rtn is None or ref is None or m in PRESET_FREE or m == "rtn":
                    return None
                gap = rtn[key] - ref[key]
                return (rtn[key] - c[key]) / gap if gap else None

            g_fp, g_lo, g_ood = closed("ppl", fp), closed("ppl", lora), closed("ppl_ood", fp)
            derived[f"{preset}/{m}"] = {"gap_closed_fp": g_fp, "gap_closed_lora_fp": g_lo, "gap_closed_ood": g_ood}
            pct = lambda v: "—" if v is None else f"{100 * v:.1f} %"  # noqa: E731
            note = []
            if "ppl_as_trained" in c:
                note.append(f"as trained {c['ppl_as_trained']:.2f} / OOD {c['ppl_ood_as_trained']:.2f}")
            if c.get("exported_spec") and c["exported_spec"] != preset:
                note.append(f"exports as {c['exported_spec']}")
            if "fuse_max_abs_logit_diff" in c:
                note.append(f"fused Δlogit {c['fuse_max_abs_logit_diff']:.1g}")
            lines.append(f"| {m} | {c['ppl']:.2f} | {pct(g_fp)} | {pct(g_lo)} | {c['ppl_ood']:.2f} | {pct(g_ood)} | "
                         f"{c.get('train_s', 0):.0f} | {'; '.join(note)} |")
    return "\n".join(lines), derived


def plot(cells: dict, presets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    methods = [m for m in METHODS if m not in PRESET_FREE]
    width = 0.8 / max(1, len(presets))
    for ax, key, title in ((axes[0], "ppl", "WikiText-2 test"), (axes[1], "ppl_ood", "pydoc tail (out of domain)")):
        for i, preset in enumerate(presets):
            ys = [cells[(preset, m)][key] if (preset, m) in cells else 0 for m in methods]
            ax.bar([j + i * width for j in range(len(methods))], ys, width, label=preset)
        for m, ls in (("fp", "-"), ("lora-fp", "--")):
            if ("-", m) in cells:
                ax.axhline(cells[("-", m)][key], color="k", ls=ls, lw=1, label=m)
        ax.set_xticks([j + width * (len(presets) - 1) / 2 for j in range(len(methods))], methods, rotation=40)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(f"SmolLM2-135M: {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parser() -> argparse.ArgumentParser:
    """The command line; scripts/bench_kquant.py takes its defaults for what run_cell reads."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # --- grid
    ap.add_argument("--presets", nargs="+", default=["w4pc", "q4_0", "w3g64"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    # --- budget (same for every trained method)
    ap.add_argument("--steps", type=int, help="optimizer steps per trained method (default 60; --full 300)")
    ap.add_argument("--batch", type=int, default=2, help="windows per step (default 2)")
    ap.add_argument("--seq", type=int, default=256, help="training window length (default 256)")
    ap.add_argument("--calib-windows", type=int, default=32, help="GPTQ calibration windows of --seq tokens")
    ap.add_argument("--eval-windows", type=int, help="evaluation windows per text (default 4; --full 8)")
    ap.add_argument("--eval-seq", type=int, default=512, help="evaluation window length (default 512)")
    ap.add_argument("--wikitext", default=str(ROOT.parent / "shared/data/wikitext-2"),
                    help="directory with WikiText-2 valid.txt / test.txt (default ../shared/data/wikitext-2)")
    ap.add_argument("--train-text", choices=["wikitext", "sampled"], default="wikitext",
                    help="training text: WikiText-2 valid, or the float model's own continuations of its windows' "
                         "first --prompt-tokens tokens (one window per step × batch)")
    ap.add_argument("--prompt-tokens", type=int, default=8, help="--train-text sampled: prompt length (default 8)")
    ap.add_argument("--sample-seed", type=int, default=0, help="--train-text sampled: the sampler's seed (default 0)")
    ap.add_argument("--dither", type=float, default=0.0, metavar="F",
                    help="spread the model's Q4_1 weights by ±F/2 of their block's level spacing first (`dithered`)")
    ap.add_argument("--range-method", choices=["lp", "mse", "minmax", "imatrix"],
                    help="scale search of RTN and of every trained method's start (default: RTN lp, each method "
                         "its registry default, imatrix for lrqat/peqa/full-qat on grouped grids; imatrix "
                         "calibrates on the first 32 training windows)")
    ap.add_argument("--full", action="store_true", help="300 steps and 8 evaluation windows (docs/results.md's run)")
    # --- objective and recipe (every trained method under the same ones)
    ap.add_argument("--recipe", default="default", help="named per-method defaults (methods.registry.RECIPES)")
    ap.add_argument("--objective", choices=["ce", "kl", "mix"], help="training loss (default: the recipe's)")
    ap.add_argument("--kd-topk", type=int, help="teacher tokens kept per position (default TrainConfig's)")
    ap.add_argument("--kd-temperature", type=float, help="distillation temperature (default TrainConfig's)")
    ap.add_argument("--hp", nargs="+", default=[], metavar="METHOD.KEY=VALUE",
                    help="override one option of one method (MethodOptions or TrainConfig field), e.g. "
                         "lrqat.alpha=16 lrqat.lr_ab=3e-3; the cells go to their own directory (--tag)")
    ap.add_argument("--tag", default="", help="suffix of the cells directory (a sweep point's name)")
    ap.add_argument("--progress", action="store_true", help="show training progress bars")
    # --- output
    ap.add_argument("--out", default=str(ROOT / "docs/bench/quality"), help="cells/, quality.json, quality.png")
    ap.add_argument("--work", default=str(ROOT / "runs/bench_quality"), help="GPTQ checkpoints (reused)")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    args.steps = args.steps or (300 if args.full else 60)
    args.eval_windows = args.eval_windows or (8 if args.full else 4)
    args.overrides = {}
    for item in args.hp:
        key, _, value = item.partition("=")
        meth, _, field = key.partition(".")
        if not (meth and field and value):
            ap.error(f"--hp {item!r}: expected METHOD.KEY=VALUE")
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            v = value
        args.overrides.setdefault(meth, {})[field] = v
    args.kd = {k: v for k, v in (("kd_topk", args.kd_topk), ("kd_temperature", args.kd_temperature)) if v is not None}
    from lrqat_export.core.fsio import write_json

    out = Path(args.out)
    # the recipe is always in the name: cells measured under another recipe (the unsuffixed directories predate
    # the distillation default and hold cross-entropy cells) are never picked up as cached
    text = "" if args.train_text == "wikitext" else \
        f"_sampled{args.prompt_tokens}" + (f"s{args.sample_seed}" if args.sample_seed else "")
    text += f"_dither{args.dither:g}" if args.dither else ""
    # lp-started cells (every cell before the imatrix default) have no suffix; the registry defaults' have rangedef
    text += "" if args.range_method == "lp" else f"_range{args.range_method or 'def'}"
    tag = (f"s{args.steps}_b{args.batch}_t{args.seq}_e{args.eval_windows}x{args.eval_seq}_{args.recipe}"
           f"_{args.objective or 'rdef'}{text}" + (f"_{args.tag}" if args.tag else ""))
    cells_dir, work = out / f"cells_{tag}", Path(args.work)
    cells_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    todo = []
    for m in args.methods:  # preset-free cells first (they are every table's references), then preset by preset
        if m in PRESET_FREE:
            todo.append(("-", m))
    for p in args.presets:
        todo += [(p, m) for m in args.methods if m not in PRESET_FREE]
    base = None
    for preset, m in todo:
        f = cells_dir / f"{preset}__{m}.json"
        if f.is_file():
            print(f"  {preset:<6} {m:<11} done (cached)", flush=True)
            continue
        if base is None:  # load and tokenize once per process
            from lrqat_export.core.models import load_model

            model, tok, src = load_model("smollm2-135m")
            if args.dither:
                dithered(model, args.dither)
            base = (model, tok, src, data_windows(tok, args, model))
        t = time.perf_counter()
        r = run_cell(preset if preset != "-" else args.presets[0], m, args, work, base)
        r.update(preset=preset, loadavg_1m=os.getloadavg()[0], cell_s=time.perf_counter() - t)
        write_json(f, r)
        print(f"  {preset:<6} {m:<11} ppl {r['ppl']:.2f}  ood {r['ppl_ood']:.2f}  ({r['cell_s']:.0f} s)", flush=True)
    cells = {}
    for f in sorted(cells_dir.glob("*.json")):
        c = json.loads(f.read_text())
        cells[(c["preset"], c["method"])] = c
    text, derived = summary(cells, args.presets)
    print(text)
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "args": vars(args),
           "cells": [cells[k] for k in sorted(cells)], "gap_closed": derived}
    write_json(out / f"quality_{tag}.json", res)
    plot(cells, args.presets, out / f"quality_{tag}.png")
    print(f"wrote {out / f'quality_{tag}.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
