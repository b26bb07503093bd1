"""Hyperparameter sweep of the CPU-sized LR-QAT run on SmolLM2 (300 steps x 2 x 256 tokens, WikiText-2 valid),
evaluated on WikiText-2 test (in domain) and on the held-out embedded corpus (out of domain). Prints one JSON line
per configuration.

    python scripts/lrqat_sweep.py SMOLLM2.gguf WIKITEXT_DIR DEVICE '[{"preset": "w4pc", "lr_ab": 1e-3, "alpha": 1}]'
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
    opts = registry.resolve_options("lrqat", MethodOptions(**{k: c[k] for k in ("rank", "alpha", "phi") if k in c}))
    prepare(m, spec, opts)
    t = time.time()
    h = train(m, tr, TrainConfig(steps=c.get("steps", 300), batch_size=2, lr_ab=c.get("lr_ab"),
              lr_scale=c.get("lr_scale"), objective="ce"), progress=False)
    ck = fuse(m, {})
    fm = ck.to_torch_model().to(dev)
    p = perplexity(fm, ev)["ppl"]
    c["ood"] = round(perplexity(fm, ood)["ppl"], 3)
    gap = (rtn[c["preset"]] - p) / (rtn[c["preset"]] - res["fp"])
    print(json.dumps({**c, "ppl": round(p, 3), "rtn": round(rtn[c["preset"]], 3), "closed": round(gap, 3),
                      "loss_last": round(sum(x["loss"] for x in h[-20:]) / 20, 3), "s": round(time.time() - t, 1)}), flush=True)
