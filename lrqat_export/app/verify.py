"""`lrqat verify`: prove that the exports run what was trained.

For an IntCheckpoint and any of its exports, on the *same token windows*:
* weights: every exported tensor is read back (gguf.quants.dequantize / GPTQ unpack) and compared element-wise with
  s·W_int — exact for symmetric grids; Q4_1/Q5_1 within the fp16 rounding of their offset (converters/gguf.py);
* perplexity three ways: the fused torch model, llama.cpp on the GGUF (real llama-cpp-python), the GPTQ directory
  through transformers + GPTQModel. The torch reference for the GGUF uses the file's embedding representation
  (F16/Q8_0), so like is compared with like.
Parity fails (CheckFailed, exit 1) when a weight differs or a runtime's relative perplexity gap
(runtime − torch) / torch exceeds its threshold; the message names the runtime and the gap.
Report: JSON (stable keys) and Markdown in --report DIR.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from converters.gguf import file_embed_types, reference_model, verify_gguf
from converters.gptq import compare_with_intckpt

from ..core import data as D
from ..core.errors import CheckFailed, UserError
from ..core.fsio import atomic_file, check_apart, claim_output, missing_dir, missing_file, write_json
from ..core.intckpt import load_intckpt
from ..core.models import load_tokenizer
from ..runtimes.torch_eval import perplexity
from .jobs import DEFAULT_MAX_GAP, VerifyJob
from .report import VERIFY_LABELS, plot_report

log = logging.getLogger(__name__)

ASYM_MAX_STEP = 2.0**-6  # Q4_1/Q5_1: fp16 rounding of the offset m, in units of the group's scale


def _gguf_embed_types(path: Path) -> dict:
    types = file_embed_types(path)
    if "token_embd.weight" not in types:
        raise UserError(f"GGUF {path}: expected a token_embd.weight tensor, not found")
    return types


def verify(intckpt: str | Path, gguf_path: str | Path | None = None, gptq_dir: str | Path | None = None,
           eval_data: list[str] | None = None, seq_len: int = 512, n_windows: int = 8, protocol: str = "full",
           max_gap: dict[str, float] | None = None, report_dir: str | Path | None = None, windows=None) -> dict:
    """Run the checks; returns the report (and writes it when report_dir is given). Raises CheckFailed on failure."""
    if gguf_path is None and gptq_dir is None:
        raise UserError("verify: expected at least one export (--gguf FILE and/or --gptq DIR)")
    for p, what in ((gguf_path, "--gguf"), (gptq_dir, "--gptq")):
        if p is not None and not Path(p).exists():
            raise UserError(f"verify {what} {p}: not found")
    if gguf_path is not None and Path(gguf_path).is_dir():
        raise UserError(f"verify --gguf {gguf_path}: {missing_file(gguf_path)}")
    if gptq_dir is not None and not Path(gptq_dir).is_dir():
        raise UserError(f"verify --gptq {gptq_dir}: {missing_dir(gptq_dir)}")
    args = (intckpt, gguf_path, gptq_dir, eval_data, seq_len, n_windows, protocol, max_gap, report_dir, windows)
    if report_dir is None:
        return _verify(*args)
    check_apart(report_dir, {"IntCheckpoint": intckpt, "--gguf": gguf_path, "--gptq": gptq_dir,
                             "--eval-data": list(eval_data or [])})
    with claim_output(report_dir):  # checked and claimed before the evaluation runs
        check_report_dir(Path(report_dir))
        return _verify(*args)


def check_report_dir(d: Path) -> None:
    """The report directory may exist (its files are replaced) but must be a directory, or a new path."""
    if d.exists() and not d.is_dir():
        raise UserError(f"verify --report {d}: expected a directory (or a new path), got an existing file")


def _verify(intckpt, gguf_path, gptq_dir, eval_data, seq_len, n_windows, protocol, max_gap, report_dir,
            windows) -> dict:
    limits = {**DEFAULT_MAX_GAP, **(max_gap or {})}
    ck = load_intckpt(intckpt)
    if windows is None:
        if not eval_data:
            raise UserError("verify: expected --eval-data")
        windows = D.text_windows(load_tokenizer(intckpt), eval_data, seq_len, n_windows, "eval data")
    report: dict = {"intckpt": str(Path(intckpt).resolve()), "spec": ck.spec.to_dict(),
                    "eval": {"data": eval_data, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                             "protocol": protocol},
                    "ppl": {}, "parity": {}, "weights": {}, "timings": {}}
    failures: list[str] = []

    def timed(key, fn):
        t = time.perf_counter()
        out = fn()
        report["timings"][key] = time.perf_counter() - t
        return out

    report["ppl"]["torch"] = timed("torch_s", lambda: perplexity(ck.to_torch_model(), windows, protocol))["ppl"]
    if gguf_path is not None:
        from ..runtimes.llamacpp import perplexity_gguf

        w = timed("gguf_weights_s", lambda: verify_gguf(gguf_path, ck))
        q = w["quantized"]
        floats_exact = all(v["exact"] for v in w["tensors"].values() if "max_step" not in v)
        # exact except where a legacy asymmetric type rounds its offset to fp16 (Q4_1, Q5_1: a q4_k_s fallback)
        bound = ASYM_MAX_STEP if {v["type"] for v in w["tensors"].values()} & {"Q4_1", "Q5_1"} else 0.0
        ok_w = floats_exact and q["max_step"] <= bound and not w["unexpected_tensors"]
        trained: dict[str, int] = {}
        for v in (v for v in w["tensors"].values() if "max_step" in v):
            trained[v["type"]] = trained.get(v["type"], 0) + 1
        report["weights"]["gguf"] = {"exact": w["exact"], "passed": ok_w, "max_step": q["max_step"],
                                     "max_abs": q["max_abs"], "n_diff": q["n_diff"], "n_weights": q["n_weights"],
                                     "bound_step": bound,
                                     # the quantized layers, by GGUF type: the trained integers, packed as they are
                                     "trained": dict(sorted(trained.items())),
                                     # float tensors the export rounded (not trained): embeddings / output
                                     "rounded_at_export": {k: v["type"] for k, v in w["tensors"].items()
                                                           if "max_step" not in v and v["type"] not in ("F32",)}}
        types = _gguf_embed_types(Path(gguf_path))
        embed = "/".join(sorted({t.name.lower() for t in types.values()}))
        ref = timed("torch_gguf_ref_s", lambda: perplexity(reference_model(ck, types), windows, protocol))["ppl"]
        got = timed("gguf_s", lambda: perplexity_gguf(gguf_path, windows, protocol))["ppl"]
        report["ppl"]["torch_gguf_ref"], report["ppl"]["gguf"] = ref, got
        _parity(report, "gguf", got, ref, limits["gguf"], ok_w, failures, f"embeddings {embed}")
    if gptq_dir is not None:
        from ..runtimes.gptq_loader import perplexity_gptq

        c = timed("gptq_weights_s", lambda: compare_with_intckpt(gptq_dir, ck))
        report["weights"]["gptq"] = {"exact": c["exact"], "passed": c["exact"], "max_abs": c["max_abs_diff"],
                                     "mismatches": c["mismatches"][:10]}
        got = timed("gptq_s", lambda: perplexity_gptq(gptq_dir, windows, protocol, progress=True))["ppl"]
        report["ppl"]["gptq"] = got
        _parity(report, "gptq", got, report["ppl"]["torch"], limits["gptq"], c["exact"], failures,
                "transformers+gptqmodel, default path")
    report["parity"]["passed"] = not failures
    report["failures"] = failures
    if report_dir is not None:
        write_report(report, Path(report_dir))
    if failures:
        raise CheckFailed("; ".join(failures))
    return report


def verify_job(job: VerifyJob) -> dict:
    """`lrqat verify` as a function of its config object (see verify)."""
    if not job.eval.eval_data:
        raise UserError("--eval-data: expected at least one text file")
    return verify(job.intckpt, job.gguf, job.gptq, list(job.eval.eval_data), job.eval.seq_len, job.eval.windows,
                  job.eval.protocol, job.max_gap, job.report)


def _parity(report, runtime, got, ref, limit, weights_ok, failures, note) -> None:
    gap = (got - ref) / ref
    ok = weights_ok and abs(gap) <= limit
    report["parity"][runtime] = {"rel_gap": gap, "threshold": limit, "weights_ok": weights_ok, "passed": ok,
                                 "reference_ppl": ref, "runtime_ppl": got, "note": note}
    if not weights_ok:
        failures.append(f"{runtime}: exported weights differ from s·W_int")
    if abs(gap) > limit:
        failures.append(f"{runtime}: perplexity gap {100 * gap:+.3f} % exceeds ±{100 * limit:.2f} % "
                        f"({got:.4f} vs torch {ref:.4f})")


def markdown(report: dict) -> str:
    e = report["eval"]
    lines = [f"# Parity report: {report['intckpt']}", "",
             f"spec `{report['spec']['name']}`; {e['windows']} windows × {e['seq_len']} tokens, protocol "
             f"`{e['protocol']}`, data {e['data']}", "",
             "| runtime | perplexity | torch reference | rel. gap | threshold | weights | passed |",
             "|---|---|---|---|---|---|---|",
             f"| torch (fused s·W_int) | {report['ppl']['torch']:.4f} | — | — | — | — | — |"]
    for rt, p in report["parity"].items():
        if rt == "passed":
            continue
        w = report["weights"][rt]
        wdesc = "exact" if w["exact"] else f"max {w.get('max_step', w.get('max_abs')):.3g}"
        lines.append(f"| {rt} ({p['note']}) | {p['runtime_ppl']:.4f} | {p['reference_ppl']:.4f} | "
                     f"{100 * p['rel_gap']:+.3f} % | ±{100 * p['threshold']:.2f} % | {wdesc} | "
                     f"{'yes' if p['passed'] else '**no**'} |")
    g = report["weights"].get("gguf")
    if g is not None and "trained" in g:
        rounded = ", ".join(f"{k} {v}" for k, v in g["rounded_at_export"].items()) or "none"
        lines += ["", f"GGUF: trained layers {', '.join(f'{t} ×{n}' for t, n in g['trained'].items())}, packed "
                      f"from the integers; rounded at export (not trained): {rounded}"]
    lines += ["", f"**parity {'passed' if report['parity']['passed'] else 'FAILED'}**"]
    lines += [f"- {f}" for f in report.get("failures", [])]
    return "\n".join(lines) + "\n"


def write_report(report: dict, d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "parity.json", report)
    plot_report(report, [], d / "parity.png", VERIFY_LABELS)
    with atomic_file(d / "parity.md", "w") as f:
        f.write(markdown(report))
