"""The main job's report for people: report.md (perplexities, parity, sizes, stage timings) and a PNG figure
(perplexity per model/runtime, and the training loss curve); `lrqat verify` draws its parity figure here too."""
from __future__ import annotations

from pathlib import Path

LABELS = {"fp": "FP", "rtn": "RTN", "lrqat_torch": "LR-QAT\n(torch)", "lrqat_gguf": "LR-QAT\n(llama.cpp)",
          "lrqat_gptq": "LR-QAT\n(GPTQ loader)"}
VERIFY_LABELS = {"torch": "torch\n(fused)", "torch_gguf_ref": "torch\n(GGUF embeddings)", "gguf": "llama.cpp",
                 "gptq": "GPTQ loader"}


def plot_report(report: dict, history: list[dict], out: str | Path, labels: dict[str, str] = LABELS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    keys = [k for k in labels if k in report["ppl"]]
    vals = [report["ppl"][k] for k in keys]
    bars = a.bar([labels[k] for k in keys], vals, color=["#777", "#c55", "#36a", "#3a6", "#a63"][: len(keys)])
    a.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=8)
    e = report.get("eval", {})
    a.set_title(f"perplexity ({report['spec']['name']}, {e.get('windows')}×{e.get('seq_len')} tokens)", fontsize=10)
    a.set_ylim(0, max(vals) * 1.12)
    a.set_ylabel("perplexity")
    if history:
        steps = [h["step"] for h in history]
        b.plot(steps, [h["loss"] for h in history], lw=0.8, color="#36a")
        b.set_xlabel("step")
        b.set_ylabel("training loss")
        b.set_title("LR-QAT training loss", fontsize=10)
    else:
        b.set_axis_off()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def moved_line(a: dict) -> str:
    """One line on what LR-QAT's adapters did: the integers they moved away from clip(round(Φ0))."""
    return (f"codes the adapters moved from the start: {a['codes_moved']:,} of {a['codes']:,} "
            f"({100 * a['fraction']:.4f} %)" + ("; the scales did all the training (as PEQA)" if not a["codes_moved"]
                                                else ""))


def report_markdown(r: dict) -> str:
    """Human-readable report.md: perplexities, parity, artefact sizes, stage timings."""
    start = r["train"]["lrqat"].get("range_method") or "lp"
    rtn = "RTN (same range search)" if start != "imatrix" else "RTN (lp range search; LR-QAT starts from imatrix)"
    names = {"fp": "FP (float32)", "rtn": rtn, "lrqat_torch": "LR-QAT, fused (torch)",
             "lrqat_gguf": "LR-QAT, GGUF in llama.cpp", "lrqat_gptq": "LR-QAT, GPTQ in transformers+GPTQModel"}
    e, t = r["eval"], r["train"]
    ood = r.get("ppl_ood") or {}
    lines = [f"# lrqat run: {r['model']}, spec {r['spec']['name']}", "",
             f"Training: {r['steps']} steps, {t['tokens']:,} tokens of {', '.join(t['data'])} "
             f"(rank {t['lrqat']['rank']}, alpha {t['lrqat']['alpha']}, phi {t['lrqat']['phi']}, objective "
             f"{t.get('objective', 'ce')}, recipe {t.get('recipe', 'default')}). "
             f"Evaluation: {e['windows']} windows x {e['seq_len']} tokens of {e['data']}, protocol {e['protocol']}.",
             "", "| model / runtime | perplexity |" + (" out of domain |" if ood else ""),
             "|---|---|" + ("---|" if ood else "")]
    for k, label in names.items():
        if k in r["ppl"]:
            lines.append(f"| {label} | {r['ppl'][k]:.4f} |" + (f" {ood[k]:.4f} |" if k in ood else (" — |" if ood else "")))
    if r.get("rtn_gap_closed") is not None:
        lines += ["", f"RTN→FP gap closed by LR-QAT: {100 * r['rtn_gap_closed']:.1f} %; trained vs fused "
                      f"IntCheckpoint logits: max |Δ| = {r['fuse_max_abs_logit_diff']}"]
    if r.get("adapters"):
        line = moved_line(r["adapters"])
        lines += ["", line[0].upper() + line[1:] + "."]
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
