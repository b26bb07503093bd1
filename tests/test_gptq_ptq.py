"""GPTQ baseline: real GPTQModel quantizes a tiny model on CPU; its integers imported as an IntCheckpoint reproduce
GPTQModel's own dequantization element-wise, export back to GPTQ word for word, and start GPTQ-initialised LR-QAT
exactly at the GPTQ model. Slow (GPTQModel import + quantize ≈ 20–40 s on 2 cores)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lrqat_export.core.data import text_windows
from lrqat_export.core.intckpt import write_intckpt
from lrqat_export.core.models import load_tokenizer
from lrqat_export.methods.lrqat import prepare
from lrqat_export.methods.common import MethodOptions
from lrqat_export.core.quant import PRESETS

gptqmodel = pytest.importorskip("gptqmodel", reason="GPTQModel is an optional dependency")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gptq_run(tiny_llama, tmp_path_factory):
    from lrqat_export.methods.gptq_ptq import ptq_gptq

    d = tmp_path_factory.mktemp("gptq")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = load_tokenizer(tiny_llama)
    calib = text_windows(tok, ["pydoc"], 64, 8)
    ck = ptq_gptq(model, tok, PRESETS["q4_0"], {}, calib, keep_dir=d / "gptqmodel_out")
    return model, tok, ck, d


def test_gptq_import_matches_gptqmodel_dequantization_exactly(gptq_run):
    _, _, ck, _ = gptq_run
    res = ck.manifest["gptq"]["import_check"]
    assert res["exact"] and res["max_abs_diff"] == 0.0 and res["layers"] == len(ck.layers) == 14


def test_gptq_integers_export_back_word_for_word(gptq_run):
    from converters.gptq import export_gptq, read_gptq

    _, tok, ck, d = gptq_run
    write_intckpt(d / "ck", ck, tok)
    export_gptq(d / "ck", d / "ours", fmt="gptq")
    _, theirs, _ = read_gptq(d / "gptqmodel_out")
    _, ours, _ = read_gptq(d / "ours")
    for name in ck.layers:
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            assert np.array_equal(getattr(ours[name], k), getattr(theirs[name], k)), (name, k)


def test_gptq_differs_from_rtn_and_gptq_init_lrqat_starts_at_gptq(gptq_run):
    from lrqat_export.methods.common import load_weights_from
    from lrqat_export.methods.rtn import ptq_rtn

    model, _, ck, _ = gptq_run
    rtn = ptq_rtn(model, PRESETS["q4_0"], {})
    assert any(not torch.equal(ck.layers[n].codes, rtn.layers[n].codes) for n in ck.layers)
    m = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32)
    load_weights_from(m, ck)
    prepare(m, PRESETS["q4_0"], MethodOptions(rank=4, alpha=4.0, phi="int8"), init=ck)
    for name, q in ck.layers.items():
        layer = m.get_submodule(name)
        assert torch.equal(layer.fused_codes(), q.codes), name
        assert torch.equal(layer.fused_scales(), q.scales), name
