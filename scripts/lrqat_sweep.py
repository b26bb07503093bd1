"""Hyperparameter sweep of the CPU-sized LR-QAT run on SmolLM2 (300 steps x 2 x 256 tokens, WikiText-2 valid),
evaluated on WikiText-2 test (in domain) and on the held-out embedded corpus (out of domain). Prints one JSON line
per configuration.

    python scripts/lrqat_sweep.py SMOLLM2.gguf WIKITEXT_DIR DEVICE '[{"preset": "w4pc", "lr_ab": 1e-3, "alpha": 1}]'
"""
import copy, json, sys, time, torch
torch.backends.cuda.matmul.allow_tf32 = False
from lrqat_export import data as D
from lrqat_export.models import load_model
from lrqat_export.intckpt import ptq_rtn, fuse
from lrqat_export.prepare import prepare
from lrqat_export.quant import PRESETS
from lrqat_export.train import TrainConfig, train
from lrqat_export.evaluate import perplexity
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
    prepare(m, spec, c.get("rank", 32), c.get("alpha", 1.0), c.get("phi", "int8"))
    t = time.time()
    h = train(m, tr, TrainConfig(steps=c.get("steps", 300), batch_size=2, lr_ab=c.get("lr_ab", 1e-3),
              lr_scale=c.get("lr_scale", 1e-5)), progress=False)
    ck = fuse(m, {})
    fm = ck.to_torch_model().to(dev)
    p = perplexity(fm, ev)["ppl"]
    c["ood"] = round(perplexity(fm, ood)["ppl"], 3)
    gap = (rtn[c["preset"]] - p) / (rtn[c["preset"]] - res["fp"])
    print(json.dumps({**c, "ppl": round(p, 3), "rtn": round(rtn[c["preset"]], 3), "closed": round(gap, 3),
                      "loss_last": round(sum(x["loss"] for x in h[-20:]) / 20, 3), "s": round(time.time() - t, 1)}), flush=True)
