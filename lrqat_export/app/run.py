"""`lrqat run`: the main job. FP and RTN baselines, LR-QAT training, fuse, evaluate; one report.

OUT/
  rtn/            IntCheckpoint of the round-to-nearest baseline (LR-QAT's range search; lp where LR-QAT's is imatrix)
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

from converters.gguf import export_gguf
from converters.gptq import export_gptq

from ..core import data as D
from ..core import quiet
from ..core.errors import CheckFailed, UserError
from ..core.fsio import atomic_file, check_apart, check_run_output, claim_output, write_json
from ..core.intckpt import load_intckpt, write_intckpt
from ..core.models import load_model
from ..methods import registry
from ..methods.rtn import ptq_rtn
from ..runtimes.torch_eval import perplexity
from ..train.job import train_method
from .jobs import RunJob
from .report import plot_report, report_markdown
from .verify import verify

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    print(f"[lrqat run] {msg}", flush=True)


def run(job: RunJob) -> dict:
    """The main job; returns the report (also written to OUT/report.{json,md,png})."""
    out = Path(job.out)
    check_apart(out, {"--model": job.model, "--train-data": list(job.data.train_data),
                      "--eval-data": list(job.eval.eval_data or []), "--ood-data": list(job.ood_data or [])})
    with claim_output(out):  # a second `lrqat run` of OUT is refused at once
        check_run_output(out, job.overwrite)
        recipe = registry.check_recipe(job.recipe)
        out.mkdir(parents=True, exist_ok=True)
        with quiet.log_file(out / "run.log"):  # every log record, and other projects' captured output
            return _run(job, out, recipe)


def _run(job: RunJob, out: Path, recipe: str) -> dict:
    spec = job.spec
    opts, cfg = registry.resolve_options("lrqat", job.options, recipe, spec), job.train.resolved("lrqat", recipe, spec)
    ev, data = job.eval, job.data
    timings: dict[str, float] = {}
    t = time.perf_counter()

    _say(f"loading {job.model}")
    model, tok, src = load_model(job.model, job.trust_remote_code)
    model.to(job.device)
    text = D.read_texts(list(data.train_data))
    if ev.eval_data:
        train_text, eval_text, eval_name = text, D.read_texts(list(ev.eval_data)), ", ".join(ev.eval_data)
    else:
        train_text, eval_text = D.split_corpus(text)
        eval_name = f"held-out 10 % of {', '.join(data.train_data)}"
    train_w = D.windows(D.tokenize(tok, train_text), data.seq_len, data.max_train_windows, "train data")
    eval_w = D.windows(D.tokenize(tok, eval_text, (ev.windows + 1) * ev.seq_len),
                       ev.seq_len, ev.windows, "eval data")
    # Training on a text also adapts the model to its domain (docs/ARCHITECTURE.md, "Traps"): evaluate out of domain too.
    ood_w, ood_name = None, None
    if job.ood_data:
        ood_text, ood_name = D.read_texts(list(job.ood_data)), ", ".join(job.ood_data)
    elif D.DEFAULT_CORPUS not in data.train_data:
        ood_text, ood_name = D.split_corpus(D.embedded_corpus())[1], "held-out 10 % of pydoc (embedded corpus)"
    if ood_name:
        ood_w = D.windows(D.tokenize(tok, ood_text, (ev.windows + 1) * ev.seq_len),
                          ev.seq_len, ev.windows, "ood data")
    timings["load_s"] = time.perf_counter() - t
    ppl: dict[str, float] = {}
    ppl_ood: dict[str, float] = {}

    def evaluate(name: str, m) -> None:
        t0 = time.perf_counter()
        ppl[name] = perplexity(m, eval_w, ev.protocol, progress=True)["ppl"]
        msg = f"perplexity {name}: {ppl[name]:.4f}"
        if ood_w is not None:
            ppl_ood[name] = perplexity(m, ood_w, ev.protocol, progress=True)["ppl"]
            msg += f" (out of domain: {ppl_ood[name]:.4f})"
        timings[f"eval_{name}_s"] = time.perf_counter() - t0
        _say(msg)

    evaluate("fp", model)

    _say(f"RTN baseline ({spec.name})")
    t = time.perf_counter()
    # the baseline is `lrqat ptq`'s RTN (weight-only search); LR-QAT starts from it, or, with the imatrix search,
    # from the RTN that train_method calibrates on the first training windows
    ref_range = "lp" if opts.range_method == "imatrix" else opts.range_method
    rtn_ck = ptq_rtn(model, spec, src.to_dict(), ref_range)
    rtn_dir = write_intckpt(out / "rtn", rtn_ck, tok, overwrite=job.overwrite)
    timings["rtn_s"] = time.perf_counter() - t
    evaluate("rtn", load_intckpt(rtn_dir).to_torch_model().to(job.device))

    _say(f"LR-QAT: {cfg.steps} steps x {cfg.batch_size} x {data.seq_len} tokens, r={opts.rank}, phi={opts.phi}")
    res = train_method(model, tok, src.to_dict(), train_w, "lrqat", spec, opts, cfg, out / "lrqat",
                       list(data.train_data), resume=job.resume,
                       init=rtn_ck if ref_range == opts.range_method else None, recipe=recipe)
    counts, history, lrqat_dir = res["parameters"], res["history"], Path(res["intckpt"])
    timings["train_s"] = res["timings"]["teacher_s"] + res["timings"]["prepare_s"] + res["timings"]["train_s"]
    t = time.perf_counter()
    fused = load_intckpt(lrqat_dir).to_torch_model().to(job.device)
    timings["fuse_s"] = res["timings"]["fuse_s"] + time.perf_counter() - t
    with torch.inference_mode():
        probe = eval_w[:1, :128].to(job.device)
        fuse_diff = float((model(input_ids=probe).logits - fused(input_ids=probe).logits).abs().max())
    evaluate("lrqat_torch", fused)

    exports, artifacts, parity = _export_and_verify(ev.protocol, out, lrqat_dir, eval_w, ppl, timings)

    gap = ppl["rtn"] - ppl["fp"]
    report = {
        "model": job.model,
        "spec": spec.to_dict(),
        "steps": cfg.steps,
        "train": {"tokens": cfg.steps * cfg.batch_size * data.seq_len, "windows": int(train_w.shape[0]),
                  "seq_len": data.seq_len, "data": list(data.train_data), "recipe": recipe,
                  "objective": cfg.objective,
                  "final_loss": history[-1]["loss"] if history else None,
                  "lrqat": dataclasses.asdict(opts), "config": dataclasses.asdict(cfg)},
        "eval": {"data": eval_name, "windows": int(eval_w.shape[0]), "seq_len": ev.seq_len,
                 "protocol": ev.protocol},
        "ppl": ppl,
        "ppl_ood": ppl_ood,
        "ood": None if ood_w is None else {"data": ood_name, "windows": int(ood_w.shape[0])},
        "rtn_gap_closed": (ppl["rtn"] - ppl["lrqat_torch"]) / gap if gap > 0 else None,
        "fuse_max_abs_logit_diff": fuse_diff,
        "adapters": res.get("adapters"),
        "parameters": counts,
        "parity": parity,
        "exports": exports,
        "artifacts": {"intckpt": str(Path(lrqat_dir).resolve()), "rtn_intckpt": str(Path(rtn_dir).resolve()),
                      **artifacts},
        "timings": timings,
    }
    report["artifacts"]["plot"] = str(plot_report(report, history, out / "report.png").resolve())
    write_json(out / "report.json", report)
    with atomic_file(out / "report.md", "w") as f:
        f.write(report_markdown(report))
    _say(json.dumps({"ppl": ppl, "rtn_gap_closed": report["rtn_gap_closed"]}, indent=None))
    _say(f"report: {out / 'report.json'}")
    return report


def _export_and_verify(protocol: str, out: Path, intckpt: Path, eval_w, ppl: dict, timings: dict,
                       ) -> tuple[dict, dict, dict]:
    """Export GGUF and GPTQ (a format that cannot hold the grid exactly is skipped with its reason), then verify
    both on the evaluation windows. Returns (exports, artifacts, parity)."""
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
        rep = verify(intckpt, artifacts["gguf"], artifacts["gptq"], windows=eval_w, protocol=protocol,
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
