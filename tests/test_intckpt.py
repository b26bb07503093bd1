"""IntCheckpoint: fuse → write → load reproduces the trained model exactly; readers refuse damaged input."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrqat_export.core.errors import UserError
from lrqat_export.core.intckpt import MANIFEST, TENSORS, load_intckpt, write_intckpt
from lrqat_export.methods.lrqat import fuse
from lrqat_export.methods.rtn import ptq_rtn
from lrqat_export.methods.lrqat import prepare
from lrqat_export.methods.common import MethodOptions
from lrqat_export.core.quant import PRESETS
from lrqat_export.train.config import TrainConfig
from lrqat_export.train.loop import train


def _trained(path, preset, steps=6, lr_ab=1e-1):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prepare(model, PRESETS[preset], MethodOptions(rank=4, alpha=16.0, phi="int8"))
    data = torch.randint(0, model.config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    train(model, data, TrainConfig(steps=steps, batch_size=2, lr_ab=lr_ab, lr_scale=1e-3, objective="ce"), progress=False)
    return model


@pytest.mark.parametrize("arch, preset", [("llama", "q4_0"), ("llama", "w4pc"), ("qwen2", "q4_1"),
                                          ("mistral", "w3g64"), ("llama", "q8_0")])
def test_fused_checkpoint_reproduces_trained_logits_exactly(tiny_models, tmp_path, arch, preset):
    model = _trained(tiny_models[arch], preset)
    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    out = write_intckpt(tmp_path / "ck", fuse(model, {"name": arch}), tok)
    ck = load_intckpt(out)
    assert ck.spec == PRESETS[preset] and ck.manifest["method"] == "lrqat"
    fused = ck.to_torch_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = model(input_ids=ids).logits, fused(input_ids=ids).logits
    assert (a - b).abs().max().item() == 0.0
    rtn = ptq_rtn(AutoModelForCausalLM.from_pretrained(tiny_models[arch]), PRESETS[preset], {})
    changed = sum(int((ck.layers[n].codes != rtn.layers[n].codes).sum()) for n in ck.layers)
    assert changed > 0, "training must have moved some integer codes off the RTN start"


def test_checkpoint_contents_and_dtypes(tiny_llama, tmp_path):
    from safetensors import safe_open

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    out = write_intckpt(tmp_path / "ck", ptq_rtn(model, PRESETS["q4_1"], {"name": "t"}),
                        AutoTokenizer.from_pretrained(tiny_llama))
    names = {p.name for p in out.iterdir()}
    assert {MANIFEST, TENSORS, "config.json", "tokenizer.json"} <= names
    with safe_open(str(out / TENSORS), "pt") as f:
        keys = set(f.keys())
        q = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{q}.codes").dtype == torch.int8
        assert f.get_tensor(f"{q}.scales").dtype == torch.float16
        assert f.get_tensor(f"{q}.zeros").dtype == torch.int8
        assert f.get_tensor(f"{q}.scales").shape == (64, 2)  # 64 inputs / group 32
    assert "lm_head.weight" not in keys  # tied
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert not any(k.endswith(".weight") and ".layers." in k and "norm" not in k for k in keys)
    m = json.loads((out / MANIFEST).read_text())
    assert m["format_version"] == 1 and m["spec"]["bits"] == 4 and len(m["quantized_layers"]) == 14


@pytest.fixture()
def rtn_ckpt(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    return write_intckpt(tmp_path / "ck", ptq_rtn(model, PRESETS["q4_0"], {}), AutoTokenizer.from_pretrained(tiny_llama))


def test_version_mismatch_is_refused(rtn_ckpt):
    m = json.loads((rtn_ckpt / MANIFEST).read_text())
    m["format_version"] = 99
    (rtn_ckpt / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UserError, match="expected format_version 1, got 99"):
        load_intckpt(rtn_ckpt)


def test_truncated_tensors_are_refused(rtn_ckpt):
    data = (rtn_ckpt / TENSORS).read_bytes()
    (rtn_ckpt / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="unreadable or corrupted safetensors"):
        load_intckpt(rtn_ckpt)


def test_garbage_manifest_is_refused(rtn_ckpt):
    (rtn_ckpt / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="expected valid JSON"):
        load_intckpt(rtn_ckpt)


def test_out_of_range_codes_are_refused(rtn_ckpt):
    from safetensors.torch import load_file, save_file

    t = load_file(str(rtn_ckpt / TENSORS))
    t["model.layers.1.mlp.down_proj.codes"][0, 0] = 9  # 4-bit codes live in [-8, 7]
    save_file(t, str(rtn_ckpt / TENSORS))
    with pytest.raises(UserError, match=r"codes expected in \[-8, 7\], got \[-8, 9\]"):
        load_intckpt(rtn_ckpt)


def test_existing_output_is_refused_and_untouched(rtn_ckpt, tiny_llama):
    before = (rtn_ckpt / TENSORS).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        write_intckpt(rtn_ckpt, ptq_rtn(model, PRESETS["w4pc"], {}), None)
    assert (rtn_ckpt / TENSORS).read_bytes() == before
