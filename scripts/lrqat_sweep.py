"""Hyperparameter sweep of the CPU-sized LR-QAT run on SmolLM2 (300 steps x 2 x 256 tokens, WikiText-2 valid),
evaluated on WikiText-2 test (in domain) and on the held-out embedded corpus (out of domain). Prints one JSON line
per configuration.

    python scripts/lrqat_sweep.py SMOLLM2.gguf WIKITEXT_DIR DEVICE '[{"preset": "w4pc", "lr_ab": 1e-3, "alpha": 1}]'

This is the sweep behind docs/results.md's H100 table (2026-11-22): cross-entropy and the paper's settings, so a
configuration's unset keys take the "paper" recipe (α 1, lr A/B 1e-3, lr s 1e-5, Φ0 int8) unless it names
"recipe" and "objective" itself. The default recipe's sweeps (distillation, grid-dependent defaults) are
`scripts/bench_quality.py --hp ... --tag ...` (BENCHMARKS.md).
"""
import copy, json, sys, time, torch
torch.backends.cuda.matmul.allow_tf32 = False
from lrqat_export.core import data as D
from lrqat_export.core.models import load_model
from lrqat_export.methods import registry
from lrqat_export.methods.common import MethodOptions
from lrqat_export.methods.lrqat import fuse, prepare
from lrqat_export.methods.rtn import ptq_rtn
from lrqat_export.core.quant import PRESETS
from lrqat_export.train.config import TrainConfig
from lrqat_export.train.loop import train
from lrqat_export.runtimes.torch_eval import perplexity
gguf, W, dev, configs = sys.argv[1], sys.argv[2].rstrip("/") + "/", sys.argv[3], json.loads(sys.argv[4])
base, tok, src = load_model(gguf)
tr = D.windows(D.tokenize(tok, open(W + "valid.txt").read()), 256, None, "train")
ev = D.windows(D.tokenize(tok, open(W + "test.txt").read(), 9 * 512), 512, 8, "eval")
ood = D.windows(D.tokenize(tok, D.split_corpus(D.embedded_corpus())[1], 9 * 512), 512, 8, "ood")
base.to(dev)
res = {"fp": perplexity(base, ev)["ppl"], "fp_ood": perplexity(base, ood)["ppl"]}
print("fp", res, flush=True)
rtn = {}
for c in configs:
    spec = PRESETS[c["preset"]]
    if c["preset"] not in rtn:
        rm = ptq_rtn(base, spec, {}).to_torch_model().to(dev)
        rtn[c["preset"]] = perplexity(rm, ev)["ppl"]
        print("rtn", c["preset"], rtn[c["preset"]], "ood", perplexity(rm, ood)["ppl"], flush=True)
    m = copy.deepcopy(base)
    recipe, objective = c.get("recipe", "paper"), c.get("objective", "ce")
    if objective != "ce":
        sys.exit(f"lrqat_sweep: objective {objective!r}: this script trains without a teacher; expected 'ce' "
                 f"(distillation sweeps: scripts/bench_quality.py --hp)")
    opts = registry.resolve_options("lrqat", MethodOptions(**{k: c[k] for k in ("rank", "alpha", "phi")
                                                               if k in c}), recipe, spec)
    cfg = TrainConfig(steps=c.get("steps", 300), batch_size=2, lr_ab=c.get("lr_ab"), lr_scale=c.get("lr_scale"),
                      objective=objective).resolved("lrqat", recipe, spec)
    torch.manual_seed(cfg.seed)
    prepare(m, spec, opts)
    t = time.time()
    h = train(m, tr, cfg, progress=False, opts=opts, recipe=recipe, spec=spec)
    ck = fuse(m, {}, spec=spec)
    fm = ck.to_torch_model().to(dev)
    p = perplexity(fm, ev)["ppl"]
    c["ood"] = round(perplexity(fm, ood)["ppl"], 3)
    gap = (rtn[c["preset"]] - p) / (rtn[c["preset"]] - res["fp"])
    print(json.dumps({**c, "ppl": round(p, 3), "rtn": round(rtn[c["preset"]], 3), "closed": round(gap, 3),
                      "loss_last": round(sum(x["loss"] for x in h[-20:]) / 20, 3), "s": round(time.time() - t, 1)}), flush=True)
