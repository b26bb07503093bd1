"""`lrqat run`: the main job. FP and RTN baselines, LR-QAT training, fuse, evaluate; one report.

OUT/
  rtn/            IntCheckpoint of the round-to-nearest baseline (same range search)
  lrqat/          IntCheckpoint of the fused LR-QAT model, plus train_state/ and train_log.json
  model.gguf      GGUF export (when a GGUF type holds the grid exactly)
  gptq/           GPTQ export
  parity/         parity.json + parity.md from `lrqat verify` on the same eval windows
  report.json     perplexities, parity, spec, timings, artefact paths
Every stage can be re-run alone from these artefacts (lrqat export / verify / eval).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from . import data as D
from .errors import CheckFailed, UserError
from .evaluate import perplexity
from .fsio import atomic_file, check_run_output, write_json
from .intckpt import load_intckpt, ptq_rtn, write_intckpt
from .models import load_model
from .pipeline import train_and_fuse

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    print(f"[lrqat run] {msg}", flush=True)


def run_pipeline(args) -> dict:
    from .cli import _opts, _spec, _train_cfg

    out = Path(args.out)
    check_run_output(out, args.overwrite)
    spec, opts, cfg = _spec(args), _opts(args), _train_cfg(args)
    out.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    _say(f"loading {args.model}")
    model, tok, src = load_model(args.model, args.trust_remote_code)
    model.to(args.device)
    text = D.read_texts(args.train_data)
    if args.eval_data:
        train_text, eval_text, eval_name = text, D.read_texts(args.eval_data), ", ".join(args.eval_data)
    else:
        train_text, eval_text = D.split_corpus(text)
        eval_name = f"held-out 10 % of {', '.join(args.train_data)}"
    train_w = D.windows(D.tokenize(tok, train_text), args.seq_len, args.max_train_windows, "train data")
    eval_w = D.windows(D.tokenize(tok, eval_text, (args.eval_windows + 1) * args.eval_seq_len),
                       args.eval_seq_len, args.eval_windows, "eval data")
    # Training on a text also adapts the model to its domain (DESIGN.md, trap 2): evaluate out of domain too.
    ood_w, ood_name = None, None
    if args.ood_data:
        ood_text, ood_name = D.read_texts(args.ood_data), ", ".join(args.ood_data)
    elif D.DEFAULT_CORPUS not in args.train_data:
        ood_text, ood_name = D.split_corpus(D.embedded_corpus())[1], "held-out 10 % of pydoc (embedded corpus)"
    if ood_name:
        ood_w = D.windows(D.tokenize(tok, ood_text, (args.eval_windows + 1) * args.eval_seq_len),
                          args.eval_seq_len, args.eval_windows, "ood data")
    timings["load_s"] = time.perf_counter() - t
    ppl: dict[str, float] = {}
    ppl_ood: dict[str, float] = {}

    def evaluate(name: str, m) -> None:
        t0 = time.perf_counter()
        ppl[name] = perplexity(m, eval_w, args.protocol, progress=True)["ppl"]
        msg = f"perplexity {name}: {ppl[name]:.4f}"
        if ood_w is not None:
            ppl_ood[name] = perplexity(m, ood_w, args.protocol, progress=True)["ppl"]
            msg += f" (out of domain: {ppl_ood[name]:.4f})"
        timings[f"eval_{name}_s"] = time.perf_counter() - t0
        _say(msg)

    evaluate("fp", model)

    _say(f"RTN baseline ({spec.name})")
    t = time.perf_counter()
    rtn_ck = ptq_rtn(model, spec, src.to_dict(), opts.range_method)
    rtn_dir = write_intckpt(out / "rtn", rtn_ck, tok, overwrite=args.overwrite)
    timings["rtn_s"] = time.perf_counter() - t
    evaluate("rtn", load_intckpt(rtn_dir).to_torch_model().to(args.device))

    _say(f"LR-QAT: {cfg.steps} steps x {cfg.batch_size} x {args.seq_len} tokens, r={opts.rank}, phi={opts.phi}")
    res = train_and_fuse(model, tok, src.to_dict(), train_w, spec, opts, cfg, out / "lrqat", args.train_data,
                         resume=args.resume, init=rtn_ck)
    counts, history, lrqat_dir = res["parameters"], res["history"], Path(res["intckpt"])
    timings["train_s"] = res["timings"]["prepare_s"] + res["timings"]["train_s"]
    t = time.perf_counter()
    fused = load_intckpt(lrqat_dir).to_torch_model().to(args.device)
    timings["fuse_s"] = res["timings"]["fuse_s"] + time.perf_counter() - t
    with torch.inference_mode():
        probe = eval_w[:1, :128].to(args.device)
        fuse_diff = float((model(input_ids=probe).logits - fused(input_ids=probe).logits).abs().max())
    evaluate("lrqat_torch", fused)

    exports, artifacts, parity = _export_and_verify(args, out, lrqat_dir, eval_w, ppl, timings)

    gap = ppl["rtn"] - ppl["fp"]
    report = {
        "model": args.model,
        "spec": spec.to_dict(),
        "steps": cfg.steps,
        "train": {"tokens": cfg.steps * cfg.batch_size * args.seq_len, "windows": int(train_w.shape[0]),
                  "seq_len": args.seq_len, "data": args.train_data, "final_loss": history[-1]["loss"] if history else None,
                  "lrqat": dataclasses.asdict(opts), "config": dataclasses.asdict(cfg)},
        "eval": {"data": eval_name, "windows": int(eval_w.shape[0]), "seq_len": args.eval_seq_len,
                 "protocol": args.protocol},
        "ppl": ppl,
        "ppl_ood": ppl_ood,
        "ood": None if ood_w is None else {"data": ood_name, "windows": int(ood_w.shape[0])},
        "rtn_gap_closed": (ppl["rtn"] - ppl["lrqat_torch"]) / gap if gap > 0 else None,
        "fuse_max_abs_logit_diff": fuse_diff,
        "parameters": counts,
        "parity": parity,
        "exports": exports,
        "artifacts": {"intckpt": str(Path(lrqat_dir).resolve()), "rtn_intckpt": str(Path(rtn_dir).resolve()),
                      **artifacts},
        "timings": timings,
    }
    from .plot import plot_report

    report["artifacts"]["plot"] = str(plot_report(report, history, out / "report.png").resolve())
    write_json(out / "report.json", report)
    with atomic_file(out / "report.md", "w") as f:
        f.write(report_markdown(report))
    _say(json.dumps({"ppl": ppl, "rtn_gap_closed": report["rtn_gap_closed"]}, indent=None))
    _say(f"report: {out / 'report.json'}")
    return report


def _export_and_verify(args, out: Path, intckpt: Path, eval_w, ppl: dict, timings: dict) -> tuple[dict, dict, dict]:
    """Export GGUF and GPTQ (a format that cannot hold the grid exactly is skipped with its reason), then verify
    both on the evaluation windows. Returns (exports, artifacts, parity)."""
    from converters.gguf import export_gguf
    from converters.gptq import export_gptq

    from .verify import verify

    exports: dict[str, dict] = {}
    artifacts: dict[str, str | None] = {"gguf": None, "gptq": None}
    for name, fn, target in (("gguf", lambda: export_gguf(intckpt, out / "model.gguf", overwrite=True), "model.gguf"),
                             ("gptq", lambda: export_gptq(intckpt, out / "gptq", overwrite=True), "gptq")):
        t = time.perf_counter()
        try:
            fn()
        except UserError as e:
            exports[name] = {"skipped": str(e)}
            _say(f"{name} export skipped: {e}")
            continue
        timings[f"export_{name}_s"] = time.perf_counter() - t
        p = out / target
        size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        exports[name] = {"path": str(p.resolve()), "bytes": size}
        artifacts[name] = str(p.resolve())
        _say(f"exported {name}: {p} ({size / 2**20:.1f} MiB)")
    if not any(artifacts.values()):
        return exports, artifacts, {"passed": False, "reason": "no export"}
    _say("verifying exports (weights read back; perplexity in llama.cpp and transformers+GPTQModel)")
    t = time.perf_counter()
    try:
        rep = verify(intckpt, artifacts["gguf"], artifacts["gptq"], windows=eval_w, protocol=args.protocol,
                     report_dir=out / "parity")
    except CheckFailed as e:
        _say(f"PARITY FAILED: {e}")
        rep = json.loads((out / "parity" / "parity.json").read_text())
    timings["verify_s"] = time.perf_counter() - t
    for rt in ("gguf", "gptq"):
        if rt in rep["ppl"]:
            ppl[f"lrqat_{rt}"] = rep["ppl"][rt]
            _say(f"perplexity lrqat_{rt}: {rep['ppl'][rt]:.4f} (gap {100 * rep['parity'][rt]['rel_gap']:+.3f} %)")
    parity = {rt: {k: rep["parity"][rt][k] for k in ("rel_gap", "threshold", "weights_ok", "passed")}
              for rt in ("gguf", "gptq") if rt in rep["parity"]}
    parity["passed"] = rep["parity"]["passed"]
    return exports, artifacts, parity


def report_markdown(r: dict) -> str:
    """Human-readable report.md: perplexities, parity, artefact sizes, stage timings."""
    names = {"fp": "FP (float32)", "rtn": "RTN (same range search)", "lrqat_torch": "LR-QAT, fused (torch)",
             "lrqat_gguf": "LR-QAT, GGUF in llama.cpp", "lrqat_gptq": "LR-QAT, GPTQ in transformers+GPTQModel"}
    e, t = r["eval"], r["train"]
    ood = r.get("ppl_ood") or {}
    lines = [f"# lrqat run: {r['model']}, spec {r['spec']['name']}", "",
             f"Training: {r['steps']} steps, {t['tokens']:,} tokens of {', '.join(t['data'])} "
             f"(rank {t['lrqat']['rank']}, alpha {t['lrqat']['alpha']}, phi {t['lrqat']['phi']}). "
             f"Evaluation: {e['windows']} windows x {e['seq_len']} tokens of {e['data']}, protocol {e['protocol']}.",
             "", "| model / runtime | perplexity |" + (" out of domain |" if ood else ""),
             "|---|---|" + ("---|" if ood else "")]
    for k, label in names.items():
        if k in r["ppl"]:
            lines.append(f"| {label} | {r['ppl'][k]:.4f} |" + (f" {ood[k]:.4f} |" if k in ood else (" — |" if ood else "")))
    if r.get("rtn_gap_closed") is not None:
        lines += ["", f"RTN→FP gap closed by LR-QAT: {100 * r['rtn_gap_closed']:.1f} %; trained vs fused "
                      f"IntCheckpoint logits: max |Δ| = {r['fuse_max_abs_logit_diff']}"]
    p = r.get("parity", {})
    lines += ["", "| parity | rel. gap (runtime − torch) / torch | threshold | weights == s·W_int | passed |",
              "|---|---|---|---|---|"]
    for rt in ("gguf", "gptq"):
        if rt in p:
            q = p[rt]
            lines.append(f"| {rt} | {100 * q['rel_gap']:+.3f} % | ±{100 * q['threshold']:.2f} % | "
                         f"{'yes' if q['weights_ok'] else 'no'} | {'yes' if q['passed'] else '**no**'} |")
        elif rt in r.get("exports", {}):
            lines.append(f"| {rt} | skipped: {r['exports'][rt].get('skipped')} | | | |")
    verdict = "not run (no exports)" if "passed" not in p else ("passed" if p["passed"] else "FAILED")
    lines += ["", f"**parity {verdict}**", "", "| artefact | size |", "|---|---|"]
    for k, v in r.get("exports", {}).items():
        if "bytes" in v:
            lines.append(f"| {k}: {v['path']} | {v['bytes'] / 2**20:.1f} MiB |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in r.get("timings", {}).items()]
    return "\n".join(lines) + "\n"
