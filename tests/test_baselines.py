"""Baselines (methods/baselines.py, defined in methods/registry.py): each trains only its own parameters, and each
ends in an IntCheckpoint whose reload reproduces the trained model exactly (full-qat, peqa) or differs exactly by
the documented merge step (qlora: RTN of the merged weight; qalora: rounding of the float zero points)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lrqat_export.core.data import text_windows
from lrqat_export.core.errors import UserError
from lrqat_export.core.intckpt import load_intckpt, write_intckpt
from lrqat_export.core.models import load_tokenizer
from lrqat_export.core.quant import PRESETS, QuantSpec, rtn_quantize
from lrqat_export.methods.baselines import (fuse_baseline, merged_float_model, nf4_dequantize, nf4_levels,
                                            nf4_quantize, prepare_baseline)
from lrqat_export.methods.common import MethodOptions, trainable_parameters
from lrqat_export.methods import registry
from lrqat_export.methods.registry import METHODS, param_groups
from lrqat_export.train.config import TrainConfig
from lrqat_export.train.loop import make_optimizer, train

OPTS = MethodOptions(rank=4, alpha=4.0)

EXPECTED_TRAINABLE = {  # method: parameter-name suffixes that (and only that) must train
    "full-qat": {"weight", "scale"}, "peqa": {"scale"}, "qlora": {"lora_A", "lora_B"},
    "qalora": {"lora_A", "lora_B"}, "lora-fp": {"lora_A", "lora_B"},
}
CFG = {"full-qat": TrainConfig(steps=6, batch_size=2, objective="ce", lr_scale=1e-3),
       "peqa": TrainConfig(steps=6, batch_size=2, objective="ce", lr_scale=1e-2),
       "qlora": TrainConfig(steps=6, batch_size=2, objective="ce", lr_ab=1e-2),
       "qalora": TrainConfig(steps=6, batch_size=2, objective="ce", lr_ab=3e-2),
       "lora-fp": TrainConfig(steps=6, batch_size=2, objective="ce", lr_ab=1e-2)}


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _windows(path, n=16, t=32):
    return text_windows(load_tokenizer(path), ["pydoc"], t, n)


def _trained(path, method, spec=PRESETS["q4_0"], lr_weight=1e-2):
    torch.manual_seed(0)
    m = prepare_baseline(_model(path), method, spec, OPTS)
    train(m, _windows(path), CFG[method], progress=False, method=method,
          opts=MethodOptions(rank=4, alpha=4.0, lr_weight=lr_weight))
    return m


@pytest.mark.parametrize("method", sorted(EXPECTED_TRAINABLE))
def test_only_the_methods_parameters_get_gradients(tiny_llama, method):
    m = prepare_baseline(_model(tiny_llama), method, PRESETS["q4_0"], OPTS)
    with torch.no_grad():  # move B off zero so A gets a gradient too
        for n, p in m.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.01)
    ids = _windows(tiny_llama, 2)
    m(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable_parameters(m))
    assert {n.rsplit(".", 1)[1] for n in with_grad} == EXPECTED_TRAINABLE[method]
    assert all(".layers." in n for n in with_grad), "embeddings, norms and lm_head stay frozen"
    assert all(float(m.get_parameter(n).grad.abs().sum()) > 0 for n in with_grad)
    cfg = TrainConfig().resolved(method)
    opt, _ = make_optimizer(m, cfg, param_groups(method, cfg.hyper(MethodOptions(lr_weight=1e-2))))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(with_grad)


@pytest.mark.parametrize("method", ["full-qat", "peqa"])
def test_fused_checkpoint_reproduces_the_trained_model_exactly(tiny_llama, tmp_path, method):
    base_ck = _model(tiny_llama)
    m = _trained(tiny_llama, method)
    ck = METHODS[method].fuse(m, PRESETS["q4_0"], {}, OPTS, None)
    write_intckpt(tmp_path / "ck", ck, load_tokenizer(tiny_llama))
    fused = load_intckpt(tmp_path / "ck").to_torch_model()
    ids = _windows(tiny_llama, 4)
    m.eval()
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, fused(input_ids=ids).logits
    assert torch.equal(a, b), float((a - b).abs().max())
    # training moved the integers or the scales away from the RTN start
    name = "model.layers.0.mlp.down_proj"
    rc, rs, _ = rtn_quantize(base_ck.get_submodule(name).weight, PRESETS["q4_0"])
    q = load_intckpt(tmp_path / "ck").layers[name]
    assert not torch.equal(q.scales, rs) or not torch.equal(q.codes, rc)
    if method == "peqa":
        assert torch.equal(q.codes, rc), "PEQA must keep the RTN integers"


def test_qlora_checkpoint_is_rtn_of_the_merged_weight(tiny_llama):
    m = _trained(tiny_llama, "qlora")
    ref = copy.deepcopy(m)
    ck = METHODS["qlora"].fuse(m, PRESETS["q4_0"], {}, OPTS, None)
    merged = merged_float_model(ref)
    ids = _windows(tiny_llama, 2)
    m.eval()
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # merging the float adapter is exact up to fp32 rounding
    for name, q in ck.layers.items():
        codes, s, _ = rtn_quantize(merged.get_submodule(name).weight, PRESETS["q4_0"])
        assert torch.equal(q.codes, codes) and torch.equal(q.scales, s), name


def test_nf4_levels_and_roundtrip():
    lv = nf4_levels()
    assert lv.numel() == 16 and lv[0] == -1 and lv[-1] == 1 and (lv == 0).sum() == 1
    assert torch.all(lv[1:] > lv[:-1])
    # QLoRA's published NF4 table (bitsandbytes), first negative and first positive non-zero levels
    assert lv[1].item() == pytest.approx(-0.6961928, abs=1e-6) and lv[8].item() == pytest.approx(0.0795803, abs=1e-6)
    w = torch.randn(8, 128)
    packed, absmax = nf4_quantize(w)
    back = nf4_dequantize(packed, absmax, lv)
    assert packed.shape == (8, 64) and back.shape == w.shape
    blocks = w.reshape(-1, 64) / absmax[:, None]
    nearest = lv[(blocks[..., None] - lv).abs().argmin(-1)] * absmax[:, None]
    assert torch.equal(back, nearest.reshape(w.shape))


def test_qalora_merges_into_zero_points(tiny_llama, tmp_path):
    m = _trained(tiny_llama, "qalora", PRESETS["q4_0"])
    layers = [x for x in m.modules() if hasattr(x, "merged_zero")]
    assert max(float(x.merged_zero().abs().max()) for x in layers) > 0, "training moved the float zero points"
    with torch.no_grad():  # a few training steps move z' by a fraction of a step; enlarge the adapter so the
        for x in layers:   # rounding to integer zeros is exercised
            x.lora_B.mul_(200.0)
    ref = copy.deepcopy(m)
    ck = METHODS["qalora"].fuse(m, PRESETS["q4_0"], {}, OPTS, None)
    assert ck.spec == QuantSpec(4, 32, symmetric=False)
    merged = merged_float_model(ref)  # float zero points: the model that was trained
    ids = _windows(tiny_llama, 2)
    m.eval()
    with torch.no_grad():
        a, b = m(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    moved = 0
    for name, q in ck.layers.items():
        layer = m.get_submodule(name)
        z = layer.merged_zero()
        assert torch.equal(q.zeros, torch.round(z).clamp(-8, 7).to(torch.int8)), name
        assert torch.equal(q.codes, layer.codes), "QA-LoRA keeps the base integers"
        moved += int((q.zeros != 0).sum())
    assert moved > 0, "training should have moved some zero points by at least one step"
    write_intckpt(tmp_path / "ck", ck, load_tokenizer(tiny_llama))
    assert load_intckpt(tmp_path / "ck").spec == ck.spec


def test_lora_fp_has_no_integer_checkpoint(tiny_llama):
    m = prepare_baseline(_model(tiny_llama), "lora-fp", PRESETS["q4_0"], MethodOptions(rank=4, alpha=16.0))
    with pytest.raises(UserError, match="float control"):
        fuse_baseline(m, "lora-fp", PRESETS["q4_0"], {}, "lp", False)


def test_bad_method_and_double_prepare_are_refused(tiny_llama):
    with pytest.raises(UserError, match=r"expected one of .*'bogus'"):
        prepare_baseline(_model(tiny_llama), "bogus", PRESETS["q4_0"], OPTS)
    m = prepare_baseline(_model(tiny_llama), "peqa", PRESETS["q4_0"], OPTS)
    with pytest.raises(UserError, match="expected nn.Linear, got PEQALinear"):
        prepare_baseline(m, "peqa", PRESETS["q4_0"], OPTS)


def test_cli_train_method_writes_the_baselines_checkpoint(tiny_llama, tmp_path, capsys):
    from lrqat_export.app.cli import main

    common = ["--model", str(tiny_llama), "--preset", "q4_0", "--rank", "4", "--steps", "2", "--seq-len", "32",
              "--max-train-windows", "8"]
    assert main(["train", "--method", "peqa", "--out", str(tmp_path / "peqa"), *common]) == 0
    ck = load_intckpt(tmp_path / "peqa")
    assert ck.manifest["method"] == "peqa" and ck.manifest["exact"] is True
    # PEQA's default on q4_0: LR-QAT's grouped-grid scale lr (groups of 32)
    assert ck.manifest["training"]["config"]["lr_scale"] == registry.grouped_lr_scale(PRESETS["q4_0"]) == 2e-4
    assert main(["train", "--method", "lora-fp", "--out", str(tmp_path / "lora"), *common]) == 0
    assert (tmp_path / "lora" / "config.json").is_file() and not (tmp_path / "lora" / "lrqat_manifest.json").exists()
    assert main(["ptq", "--model", str(tiny_llama), "--method", "awq", "--out", str(tmp_path / "x")]) == 2
    assert "--method: expected one of ('rtn', 'gptq'), got 'awq'" in capsys.readouterr().err
    assert main(["train", "--method", "peqa", "--init", str(tmp_path / "peqa"), "--out", str(tmp_path / "y"),
                 *common[:2], "--preset", "w4pc", "--steps", "1"]) == 2
    assert "checkpoint spec is q4_0, expected w4pc" in capsys.readouterr().err


def test_cli_train_init_distills_from_the_float_model_not_from_the_init(tiny_llama, tmp_path):
    """`train --init CK` freezes CK's codes, but the distillation teacher is still the float model: started from
    its own RTN checkpoint, PEQA's first loss is the same number as when it finds that RTN itself (the same student,
    the same teacher). Were the teacher taken after CK's weights were loaded, it would be CK and the loss 0."""
    from lrqat_export.app.cli import main

    common = ["--model", str(tiny_llama), "--preset", "q4_0", "--steps", "1", "--seq-len", "32",
              "--max-train-windows", "8"]
    assert main(["ptq", *common[:4], "--out", str(tmp_path / "rtn")]) == 0
    assert main(["train", "--method", "peqa", "--range-method", "lp", "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["train", "--method", "peqa", "--init", str(tmp_path / "rtn"), "--out", str(tmp_path / "b"),
                 *common]) == 0
    loss = [load_intckpt(tmp_path / d).manifest["training"]["final_loss"] for d in "ab"]
    assert loss[0] > 0 and loss[1] == loss[0], loss  # before the fix: [2.1e-4, 0.0]


def test_cli_train_init_refuses_the_online_teacher(tiny_llama, tmp_path, capsys):
    """With --init the frozen Φ0 holds the init's codes, so `--kd-teacher online` (the model's own Φ0 as teacher)
    would distil from the init, not the float model: refused by name before anything is loaded or written. The
    cache teacher with --init, and the online teacher without --init, both run."""
    from lrqat_export.app.cli import EXIT_INPUT, main

    common = ["--model", str(tiny_llama), "--preset", "q4_0", "--steps", "1", "--seq-len", "32",
              "--max-train-windows", "8"]
    assert main(["ptq", *common[:4], "--out", str(tmp_path / "rtn")]) == 0
    capsys.readouterr()
    out = tmp_path / "online_init"
    assert main(["train", "--method", "lrqat", "--init", str(tmp_path / "rtn"), "--kd-teacher", "online",
                 "--out", str(out), *common]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "--kd-teacher online with --init" in err and "--kd-teacher cache" in err, err
    assert not out.exists()
    assert main(["train", "--method", "lrqat", "--init", str(tmp_path / "rtn"), "--out", str(tmp_path / "cache"),
                 *common]) == 0
    assert main(["train", "--method", "lrqat", "--kd-teacher", "online", "--out", str(tmp_path / "online"),
                 *common]) == 0
    # --objective ce has no teacher: --init with --kd-teacher online is then harmless and runs
    assert main(["train", "--method", "lrqat", "--init", str(tmp_path / "rtn"), "--kd-teacher", "online",
                 "--objective", "ce", "--out", str(tmp_path / "ce"), *common]) == 0
