"""PNG figure of a `lrqat run` report: perplexity per model/runtime, and the training loss curve."""
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
