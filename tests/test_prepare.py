"""prepare(, MethodOptions(alpha=1.0)): which modules are swapped, what is frozen, RTN equivalence on whole models, refusals."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lrqat_export.core.errors import UserError
from lrqat_export.methods.rtn import ptq_rtn
from lrqat_export.methods.lrqat import LRQATLinear
from lrqat_export.core.models import QUANTIZED_PROJECTIONS, quantized_layer_names
from lrqat_export.methods.lrqat import parameter_counts, prepare
from lrqat_export.methods.common import MethodOptions
from lrqat_export.methods.common import trainable_parameters
from lrqat_export.core.quant import PRESETS, QuantSpec


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_prepare_swaps_every_projection_and_freezes_the_rest(tiny_models, arch):
    model = prepare(_load(tiny_models[arch]), PRESETS["q4_0"], MethodOptions(rank=4, alpha=1.0, phi="int8"))
    layers = {n for n, m in model.named_modules() if isinstance(m, LRQATLinear)}
    assert layers == set(quantized_layer_names(model))
    assert len(layers) == len(QUANTIZED_PROJECTIONS[type(model).__name__]) * model.config.num_hidden_layers
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.startswith("model.layers"))
    names = set(trainable_parameters(model))
    assert names and all(n.rsplit(".", 1)[-1] in {"lora_A", "lora_B", "scale"} for n in names)
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if "norm" in n)
    if arch == "qwen2":  # q/k/v biases survive as frozen buffers
        assert model.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("preset", ["q4_0", "w4pc", "q4_1"])
def test_prepared_model_at_ab_zero_equals_the_rtn_model_exactly(tiny_models, arch, preset):
    base = _load(tiny_models[arch])
    rtn = ptq_rtn(base, PRESETS[preset], {"name": "tiny"}).to_torch_model()
    prepared = prepare(base, PRESETS[preset], MethodOptions(rank=4, alpha=1.0, phi="int8"))
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(prepared(input_ids=ids).logits, rtn(input_ids=ids).logits)


def test_trainable_fraction_is_reported(tiny_llama):
    model = prepare(_load(tiny_llama), PRESETS["w4pc"], MethodOptions(rank=4, alpha=1.0, phi="int8"))
    c = parameter_counts(model)
    lr = [m for m in model.modules() if isinstance(m, LRQATLinear)]
    expected = sum(m.rank * (m.in_features + m.out_features) + m.scale.numel() for m in lr)
    assert c["trainable"] == expected
    assert 0 < c["trainable"] < c["total"]


def test_group_size_that_does_not_divide_is_refused_and_the_model_is_untouched(tiny_llama):
    model = _load(tiny_llama)  # hidden 64, intermediate 128
    with pytest.raises(UserError, match=r"in_features 64 is not divisible by group_size 48"):
        prepare(model, QuantSpec(4, 48, True), MethodOptions(alpha=1.0, phi="int8"))
    assert not any(isinstance(m, LRQATLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match="GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, "
                                        "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                                        "Gemma3ForCausalLM, Phi3ForCausalLM$"):
        prepare(model, PRESETS["q4_0"], MethodOptions(alpha=1.0, phi="int8"))


def test_activation_importance_is_each_projections_mean_squared_input(tiny_llama):
    from lrqat_export.methods.rtn import activation_importance

    model = _load(tiny_llama)
    ids = torch.randint(0, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    imp = activation_importance(model, ids, batch=2)
    assert set(imp) == set(quantized_layer_names(model))
    with torch.no_grad():  # layer 0's attention input, computed by hand: the normed embeddings
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    want = x.float().square().reshape(-1, x.shape[-1]).mean(0)
    attn = "model.layers.0.self_attn."
    assert torch.allclose(imp[attn + "q_proj"], want, rtol=1e-5, atol=0)
    assert torch.equal(imp[attn + "q_proj"], imp[attn + "k_proj"])
    assert torch.equal(imp[attn + "k_proj"], imp[attn + "v_proj"])
    assert imp["model.layers.0.mlp.down_proj"].shape == (model.config.intermediate_size,)


@pytest.mark.parametrize("preset", ["q4_0", "w4pc"])
def test_imatrix_rtn_differs_from_lp_and_starts_lrqat_exactly(tiny_llama, preset):
    """ptq_rtn with the imatrix search changes scales (and so codes) against lp, and an LR-QAT model started from
    it (init, as `lrqat run` and train_method do) is, at A·B = 0, that RTN model exactly."""
    base = _load(tiny_llama)
    ids = torch.randint(0, base.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    spec = PRESETS[preset]
    imx = ptq_rtn(base, spec, {"name": "tiny"}, "imatrix", ids)
    lp = ptq_rtn(base, spec, {"name": "tiny"}, "lp")
    assert any(not torch.equal(imx.layers[n].scales, lp.layers[n].scales) for n in lp.layers)
    assert imx.manifest["range_method"] == "imatrix"
    prepared = prepare(base, spec, MethodOptions(rank=4, alpha=1.0, phi="bf16"), imx)
    probe = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(prepared(input_ids=probe).logits, imx.to_torch_model()(input_ids=probe).logits)


def test_imatrix_rtn_without_calibration_windows_is_refused(tiny_llama):
    with pytest.raises(UserError, match="imatrix: needs calibration windows"):
        ptq_rtn(_load(tiny_llama), PRESETS["q4_0"], {"name": "tiny"}, "imatrix")
