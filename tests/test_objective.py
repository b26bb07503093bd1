"""Training objectives (train/objective.py): cross-entropy unchanged, distillation from the float model on its top-k
targets, mixes; every method trains under each; resume stays exact and the fuse stays exact."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lrqat_export.app.cli import main
from lrqat_export.core.data import text_windows
from lrqat_export.core.errors import UserError
from lrqat_export.core.intckpt import load_intckpt
from lrqat_export.core.models import load_tokenizer
from lrqat_export.core.quant import PRESETS
from lrqat_export.methods import registry
from lrqat_export.methods.common import MethodOptions
from lrqat_export.train import objective as O
from lrqat_export.train.config import TrainConfig
from lrqat_export.train.job import teacher_targets
from lrqat_export.train.loop import train


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _windows(path, n=12, t=32):
    return text_windows(load_tokenizer(path), ["pydoc"], t, n)


def test_topk_kl_with_the_whole_vocabulary_is_the_exact_kl():
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(2, 7, 50, generator=g) * 3, torch.randn(2, 7, 50, generator=g) * 3
    for tau in (1.0, 2.0):
        ids, logp, rest = O.topk_targets(t_logits, 50, tau)
        got = O.kl_topk(s_logits, ids.long(), logp, rest, tau)
        p_log = F.log_softmax(t_logits / tau, -1)
        want = (p_log.exp() * (p_log - F.log_softmax(s_logits / tau, -1))).sum(-1).mean() * tau**2
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)
        # a coarsening never exceeds the full KL, and is zero when the student is the teacher
        ids, logp, rest = O.topk_targets(t_logits, 5, tau)
        assert 0 <= float(O.kl_topk(s_logits, ids.long(), logp, rest, tau)) <= float(want) + 1e-6
        assert abs(float(O.kl_topk(t_logits, ids.long(), logp, rest, tau))) < 1e-5


def test_log1mexp_value_and_gradient_are_finite_and_right_near_zero():
    """log(1 − exp(x)), the student's rest mass in the top-k KL: finite and accurate in value and gradient for x
    from −50 up to within 1e-8 of 0. There exp(x) rounds to 1 in float32, and the unused branch log1p(−exp(x))
    once turned torch.where's zero gradient into 0/0 = NaN (a τ 0.5 run stopped on a NaN gradient at step 37)."""
    x64 = torch.tensor([-50.0, -3.0, -0.7, -0.69, -0.1, -1e-4, -1e-6, -3e-8, -1e-8, -1e-10], dtype=torch.float64)
    x = x64.float().requires_grad_()
    y = O._log1mexp(x)
    y.sum().backward()
    want = torch.log(-torch.expm1(x64))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.allclose(y.double(), want, rtol=1e-5)
    assert torch.allclose(x.grad.double(), torch.exp(x64) / torch.expm1(x64), rtol=1e-4)


def test_ce_objective_is_the_models_own_loss_bit_for_bit(tiny_llama):
    m, w = _model(tiny_llama), _windows(tiny_llama, 2)
    assert torch.equal(O.loss(m, w, "ce"), m(input_ids=w, labels=w).loss)


def test_distillation_needs_the_teacher_and_validates_its_options(tiny_llama):
    m = _model(tiny_llama)
    registry.get("lrqat").prepare(m, PRESETS["q4_0"], MethodOptions(rank=4, alpha=4.0, phi="int8"))
    with pytest.raises(UserError, match="expected the teacher's targets"):
        train(m, _windows(tiny_llama), TrainConfig(steps=1, objective="kl"), progress=False)
    for bad, needle in (({"objective": "mse"}, "--objective: expected one of"), ({"kd_temperature": 0}, "> 0"),
                        ({"kd_topk": 0}, ">= 1"), ({"ce_weight": 1.5}, "[0, 1]")):
        with pytest.raises(UserError, match=needle):
            TrainConfig(**bad)


@pytest.mark.parametrize("method", ["lrqat", "peqa", "full-qat", "qlora", "qalora", "lora-fp"])
def test_every_method_trains_toward_the_float_model_under_kl(tiny_llama, method):
    """Distillation reduces the student's KL to its own float start, for every quantized method (the float control
    starts at the teacher: KL 0), and an exact method's IntCheckpoint still reproduces the trained logits bit for
    bit. The tiny model's tied embeddings are scaled ×20 so that its distribution is peaked enough for quantization
    to move it (a random tiny model's is near uniform)."""
    base, w = _model(tiny_llama), _windows(tiny_llama)
    with torch.no_grad():
        base.model.embed_tokens.weight.mul_(20.0)
    cfg = TrainConfig(steps=8, batch_size=2, objective="kl", lr_ab=1e-3, lr_scale=1e-4).resolved(method)
    teacher = teacher_targets(base, w, cfg)
    assert teacher.rest_mass < 0.01 and len(teacher.ids) <= 8 * 2
    m = registry.get(method)
    opts = registry.resolve_options(method, MethodOptions(rank=4, alpha=8.0, phi="int8"))
    torch.manual_seed(0)
    model = m.prepare(copy.deepcopy(base), PRESETS["q4_0"], opts, None)
    drawn = torch.tensor(sorted(teacher.ids))

    def kl_now():
        with torch.no_grad():
            return float(O.loss(model, w[drawn], "kl", teacher, drawn))

    before = kl_now()
    hist = train(model, w, cfg, progress=False, method=method, opts=opts, teacher=teacher)
    assert len(hist) == 8 and all(h["loss"] > -1e-6 for h in hist)  # a KL, up to rounding at 0
    if m.output == "float":
        assert before == 0.0 and kl_now() < 1e-3
    else:
        assert kl_now() < 0.95 * before, (method, before, kl_now())
    if m.exact and m.output == "intckpt":
        fused = m.fuse(model, PRESETS["q4_0"], {}, opts, None).to_torch_model()
        with torch.no_grad():
            assert torch.equal(model(input_ids=w[:1]).logits, fused(input_ids=w[:1]).logits)


def test_cli_mix_run_records_its_objective_and_teacher(tiny_llama, tmp_path):
    argv = ["train", "--model", str(tiny_llama), "--preset", "q4_0", "--rank", "4", "--steps", "4", "--seq-len", "32",
            "--max-train-windows", "12", "--objective", "mix", "--kd-topk", "16", "--kd-temperature", "2",
            "--phi", "bf16", "--kd-layer", "0.5", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    t = load_intckpt(tmp_path / "a").manifest["training"]
    assert t["config"]["objective"] == "mix" and t["teacher"]["topk"] == 16 and t["teacher"]["temperature"] == 2.0
    assert t["config"]["kd_layer"] == 0.5
    assert t["recipe"] == "default" and 0 <= t["teacher"]["mean_rest_mass"] < 1


def test_interrupted_kl_run_resumes_to_the_same_bits(tiny_llama, tmp_path):
    """The teacher cache is rebuilt on resume (a deterministic pre-pass), so an interrupted distillation run ends
    with exactly the trainable tensors of an uninterrupted one."""
    base, w = _model(tiny_llama), _windows(tiny_llama)
    cfg = TrainConfig(steps=6, batch_size=2, objective="kl", kd_topk=8, lr_ab=2e-2, lr_scale=2e-3, ckpt_every=3)
    opts = MethodOptions(rank=4, alpha=8.0, phi="int8")

    def run(out, **kw):
        teacher = teacher_targets(base, w, cfg.resolved("lrqat"))
        torch.manual_seed(0)
        m = registry.get("lrqat").prepare(copy.deepcopy(base), PRESETS["q4_0"], opts, None)
        train(m, w, cfg, out, progress=False, opts=opts, teacher=teacher, **kw)
        return m

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", stop_after=3)
    resumed = run(tmp_path / "cut", resume=True)
    a, b = dict(whole.named_parameters()), dict(resumed.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = load_file(str(tmp_path / "cut" / "train_state" / "step-00000006" / "trainable.safetensors"))
    assert all(torch.equal(saved[k], a[k].detach()) for k in saved)


@pytest.mark.parametrize("phi, tol", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_lrqat_model_as_its_own_teacher_is_the_float_model(tiny_llama, phi, tol):
    """as_teacher: every LRQATLinear computes with s0·(Φ0 − z), the float weight to Φ0's resolution (fp32: up to
    float rounding; bf16: 8 significant bits); outside it the model is the quantized one again, bit for bit."""
    from lrqat_export.methods.lrqat import as_teacher

    base, w = _model(tiny_llama), _windows(tiny_llama, 2)
    with torch.no_grad():
        want = base(input_ids=w).logits
    for preset in ("q4_0", "w4pc", "q4_1"):  # symmetric and asymmetric grids
        m = registry.get("lrqat").prepare(copy.deepcopy(base), PRESETS[preset], MethodOptions(rank=4, alpha=8.0,
                                                                                              phi=phi))
        with torch.no_grad():
            quant = m(input_ids=w).logits
            with as_teacher(m):
                got = m(input_ids=w).logits
            again = m(input_ids=w).logits
        assert (got - want).abs().max() < tol * want.abs().max(), (preset, float((got - want).abs().max()))
        assert (quant - want).abs().max() > 10 * (got - want).abs().max()  # the quantized model is much further
        assert torch.equal(again, quant)


def test_online_teacher_is_refused_where_it_cannot_be_the_float_model(tiny_llama):
    from lrqat_export.train.job import online_teacher

    cfg = TrainConfig(objective="kl", kd_teacher="online")
    m = registry.get("lrqat").prepare(_model(tiny_llama), PRESETS["q4_0"], MethodOptions(rank=4, alpha=8.0,
                                                                                         phi="int4"))
    with pytest.raises(UserError, match=r"--kd-teacher online: Φ0 must hold more than the codes.*phi int4 at 4 "
                                        r"bits.*--phi bf16"):
        online_teacher(m, "lrqat", cfg)
    p = registry.get("peqa").prepare(_model(tiny_llama), PRESETS["q4_0"],
                                     registry.resolve_options("peqa", MethodOptions()), None)
    with pytest.raises(UserError, match=r"--kd-teacher online: expected a method .*\(lrqat\), got peqa"):
        online_teacher(p, "peqa", cfg)
    with pytest.raises(UserError, match=r"--kd-teacher: expected one of \('cache', 'online'\), got 'disk'"):
        TrainConfig(kd_teacher="disk")


def test_online_teacher_trains_like_the_cached_one(tiny_llama, tmp_path):
    """Same run, targets from the pre-pass cache or computed online from Φ0 (fp32: the same float weights up to
    rounding): the losses agree to float noise, and the CLI records which teacher was used."""
    from lrqat_export.train.job import online_teacher

    base, w = _model(tiny_llama), _windows(tiny_llama)
    with torch.no_grad():
        base.model.embed_tokens.weight.mul_(20.0)
    losses = {}
    for mode in ("cache", "online"):
        cfg = TrainConfig(steps=4, batch_size=2, objective="kl", kd_teacher=mode).resolved("lrqat")
        opts = registry.resolve_options("lrqat", MethodOptions(rank=4, alpha=8.0, phi="fp32"))
        teacher = teacher_targets(base, w, cfg)
        torch.manual_seed(0)
        m = registry.get("lrqat").prepare(copy.deepcopy(base), PRESETS["q4_0"], opts, None)
        if mode == "online":
            assert teacher is None
            teacher = online_teacher(m, "lrqat", cfg)
        losses[mode] = [h["loss"] for h in train(m, w, cfg, progress=False, opts=opts, teacher=teacher)]
    assert losses["cache"][0] > 1e-3, losses
    assert all(abs(a - b) < 1e-3 * a for a, b in zip(losses["cache"], losses["online"])), losses
    argv = ["train", "--model", str(tiny_llama), "--preset", "q4_0", "--rank", "4", "--steps", "2", "--seq-len", "32",
            "--max-train-windows", "8", "--kd-teacher", "online", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    t = load_intckpt(tmp_path / "o").manifest["training"]
    assert t["teacher"] == {"mode": "online", "topk": 64, "temperature": 1.0}
    assert main(argv[:-1] + [str(tmp_path / "p"), "--phi", "int4"]) == 2  # refused before training
    assert not (tmp_path / "p").exists()


def test_a_cache_too_large_for_memory_is_refused_before_the_prepass(tiny_llama):
    w = _windows(tiny_llama)
    cache = teacher_targets(_model(tiny_llama), w, TrainConfig(steps=6, batch_size=2, objective="kl", kd_topk=16))
    held = sum(t.numel() * t.element_size() for d in (cache.ids, cache.logp, cache.log_rest) for t in d.values())
    assert held == O.cache_bytes(len(cache.ids), w.shape[1], 16)
    O.check_cache_fits(held, 2 * held, "lrqat")  # exactly half the available memory: accepted
    with pytest.raises(UserError, match=r"teacher cache: expected at most half the available memory .* use "
                                        r"--kd-teacher online"):
        O.check_cache_fits(held + 1, 2 * held, "lrqat")
    with pytest.raises(UserError, match=r"use a smaller --kd-topk"):
        O.check_cache_fits(held + 1, 2 * held, "peqa")


def test_layer_terms_are_each_layers_error_against_its_float_weight(tiny_llama):
    """--kd-layer: one term per quantized layer and forward, ‖y − x·W0ᵀ‖² / ‖x·W0ᵀ‖² on the layer's own input x,
    with W0 = s0·(Φ0 − z); the loss adds their mean times the weight. No-grad and teacher forwards add none; a Φ0
    of codes only, a method without float weights and a negative weight are refused."""
    from lrqat_export.methods.lrqat import as_teacher, lrqat_layers

    w = _windows(tiny_llama, 2)
    m = registry.get("lrqat").prepare(_model(tiny_llama), PRESETS["q4_0"], MethodOptions(rank=4, alpha=8.0,
                                                                                          phi="bf16"))
    layers = lrqat_layers(m)
    seen = {}
    hooks = [lay.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0], out)))
             for n, lay in layers.items()]
    with O.layer_terms(m) as terms:
        m(input_ids=w)
    for h in hooks:
        h.remove()
    assert len(terms) == len(layers) == len(seen)
    want = []
    for n, lay in layers.items():
        x, y = seen[n]
        ref = F.linear(x, lay.teacher_weight())
        want.append(((y - ref) ** 2).mean() / (ref ** 2).mean())
    got = torch.stack(terms)
    assert torch.allclose(got, torch.stack(want), rtol=1e-5) and bool((got > 0).all())
    # target "float": the float model's own output of each layer (its inputs are the float model's too)
    floats = {}
    hooks = [lay.register_forward_hook(lambda mod, inp, out, n=n: floats.__setitem__(n, out))
             for n, lay in layers.items()]
    with torch.no_grad(), as_teacher(m):
        m(input_ids=w)
    for h in hooks:
        h.remove()
    with O.layer_terms(m, w) as terms_f:
        m(input_ids=w)
    want_f = [((seen[n][1] - floats[n]) ** 2).mean() / (floats[n] ** 2).mean() for n in layers]
    assert torch.allclose(torch.stack(terms_f), torch.stack(want_f), rtol=1e-5)
    assert not torch.allclose(torch.stack(terms_f), got, rtol=1e-2)  # the inputs differ after the first layer
    torch.manual_seed(0)
    base = float(O.loss(m, w, "ce"))
    assert float(O.loss(m, w, "ce", layer_weight=2.0)) == pytest.approx(base + 2.0 * float(got.mean()), rel=1e-5)
    with O.layer_terms(m) as terms:
        with torch.no_grad():
            m(input_ids=w)
        with as_teacher(m):
            m(input_ids=w)
    assert terms == []
    coarse = registry.get("lrqat").prepare(_model(tiny_llama), PRESETS["q4_0"], MethodOptions(rank=4, alpha=8.0,
                                                                                               phi="int4"))
    with pytest.raises(UserError, match=r"--kd-layer: expected quantized layers that keep the float weights.*"
                                        r"LRQATLinear with a Φ0 of codes only"):
        O.loss(coarse, w, "ce", layer_weight=1.0)
    p = registry.get("peqa").prepare(_model(tiny_llama), PRESETS["q4_0"],
                                     registry.resolve_options("peqa", MethodOptions()), None)
    with pytest.raises(UserError, match=r"--kd-layer: .*got none"):
        O.loss(p, w, "ce", layer_weight=1.0)
    with pytest.raises(UserError, match=r"--kd-layer: expected >= 0, got -1"):
        TrainConfig(kd_layer=-1.0)
    with pytest.raises(UserError, match=r"--kd-layer-target: expected one of \('input', 'float'\), got 'x'"):
        TrainConfig(kd_layer_target="x")
