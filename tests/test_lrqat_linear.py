"""LRQATLinear: RTN start, tie handling, storage size, gradients, checkpointing, fused codes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrqat_export.core.errors import UserError
from lrqat_export.methods.lrqat import LRQATLinear, codes_moved, pack_int4, phi_down, phi_up, unpack_int4
from lrqat_export.core.quant import PRESETS, QuantSpec, dequantize, rtn_quantize

CASES = [(s, phi) for s in ("q4_0", "w4pc", "q4_1", "w3g64", "q8_0", "w2g64a") for phi in ("int8", "int4", "bf16", "fp32")
         if not (phi == "int4" and PRESETS[s].bits > 4)]


@pytest.mark.parametrize("spec_name, phi", CASES)
def test_ab_zero_forward_equals_rtn_fake_quant_exactly(spec_name, phi):
    spec = PRESETS[spec_name]
    for seed in range(5):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(128, 96, bias=seed % 2 == 0)
        lin.weight.data *= 1 + 3 * torch.rand(96, 1)  # rows of different ranges
        layer = LRQATLinear.from_linear(lin, spec, rank=8, phi=phi, alpha=1.0)
        codes, s, z = rtn_quantize(lin.weight, spec)
        w_rtn = dequantize(codes, s, z, spec)
        x = torch.randn(4, 7, 128)
        assert torch.equal(layer.fused_codes(), codes)
        assert torch.equal(layer.start_codes(), codes)  # Φ0 alone rounds to RTN's codes
        assert torch.equal(layer.weight(), w_rtn)
        assert torch.equal(layer(x), F.linear(x, w_rtn, lin.bias))


@pytest.mark.parametrize("phi, values", [
    ("int8", [2.47, 2.53, -3.47, -3.53, 1.49, 1.51, 0.47, 0.53]),  # Q4.4: multiples of 1/16
    ("bf16", [2.497, 2.503, -3.497, -3.503, 4.49, 4.51, 6.49, 6.51]),  # bf16: 8 significant bits
])
def test_fixed_point_ties_resolve_toward_the_rtn_code(phi, values):
    """x = 2.47 (code units) stores as 2.5 in Q4.4, and so does 2.53: round-half-even sends both to 2, but their
    RTN codes are 2 and 3. Both must come back as their own RTN codes (DESIGN.md trap 1)."""
    spec = QuantSpec(4, -1, True)
    x = torch.tensor([values])
    y = phi_up(phi_down(x, spec, phi), spec, phi)
    assert torch.equal(torch.round(y), torch.round(x))
    naive = torch.round(x * 16) / 16 if phi == "int8" else x.bfloat16().float()
    assert not torch.equal(torch.round(naive), torch.round(x)), "the test values must contain real ties"


def test_int4_double_packing_round_trips_and_halves_storage():
    v = torch.randint(-8, 8, (5, 34), dtype=torch.int8)
    p = pack_int4(v)
    assert p.dtype == torch.uint8 and p.shape == (5, 17)
    assert torch.equal(unpack_int4(p), v)


@pytest.mark.parametrize("phi, bytes_per_weight", [("int8", 1.0), ("int4", 0.5), ("bf16", 2.0), ("fp32", 4.0)])
def test_frozen_storage_really_is_one_or_half_a_byte_per_weight(phi, bytes_per_weight):
    layer = LRQATLinear.from_linear(torch.nn.Linear(256, 64), PRESETS["q4_0"], rank=4, phi=phi, alpha=1.0)
    assert layer.phi0.numel() * layer.phi0.element_size() == 256 * 64 * bytes_per_weight
    assert not any(t.dtype == torch.float32 and t.numel() >= 256 * 64 for t in layer.buffers() if t is not None) \
        or phi == "fp32"


def test_gradients_reach_a_b_and_scale_only():
    torch.manual_seed(0)
    layer = LRQATLinear.from_linear(torch.nn.Linear(64, 32, bias=True), PRESETS["q4_0"], rank=4, alpha=1.0)
    with torch.no_grad():
        layer.lora_A.normal_(0, 1.0)  # A = 0 at init gives B a zero gradient; move off it
    layer(torch.randn(3, 64)).pow(2).sum().backward()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "scale"}
    for n in trainable:
        g = dict(layer.named_parameters())[n].grad
        assert g is not None and g.abs().sum() > 0, n
    assert all(not b.requires_grad for b in layer.buffers())


def test_checkpointing_changes_memory_not_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    grads = []
    for ckpt in (True, False):
        torch.manual_seed(1)  # same Kaiming draw of B for both layers
        layer = LRQATLinear.from_linear(lin, PRESETS["q4_1"], rank=4, checkpointing=ckpt, alpha=1.0)
        with torch.no_grad():
            layer.lora_A.copy_(torch.linspace(-3, 3, 48 * 4).reshape(48, 4))
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
        layer(x).square().mean().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_fused_codes_are_the_codes_the_forward_used():
    torch.manual_seed(0)
    spec = PRESETS["w3g64"]
    layer = LRQATLinear.from_linear(torch.nn.Linear(128, 64), spec, rank=8, alpha=8.0)
    with torch.no_grad():
        layer.lora_A.normal_(0, 2.0)
        layer.scale.mul_(1.0 + 0.01 * torch.randn_like(layer.scale))
    fused = dequantize(layer.fused_codes(), layer.fused_scales(), layer.zero, spec)
    assert torch.equal(layer.weight().detach(), fused)
    assert not torch.equal(layer.fused_codes(), rtn_quantize(torch.nn.Linear(128, 64).weight, spec)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not change the codes
        assert torch.equal(layer.weight().detach(), fused)


def test_bad_layer_options_are_refused():
    with pytest.raises(UserError, match="phi int4 .* needs bits <= 4, got bits 8"):
        LRQATLinear.from_linear(torch.nn.Linear(64, 8), PRESETS["q8_0"], phi="int4", alpha=1.0, rank=32)
    with pytest.raises(UserError, match="phi: expected one of"):
        LRQATLinear.from_linear(torch.nn.Linear(64, 8), PRESETS["q4_0"], phi="int2", alpha=1.0, rank=32)
    lin = torch.nn.Linear(64, 8)
    lin.weight.data[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN/Inf"):
        LRQATLinear.from_linear(lin, PRESETS["q4_0"], alpha=1.0, rank=32)


def test_codes_moved_counts_the_integers_the_adapters_changed_from_rtn():
    spec = PRESETS["q4_0"]
    torch.manual_seed(0)
    lins = {f"l{i}": torch.nn.Linear(64, 32) for i in range(2)}
    lr = {n: LRQATLinear.from_linear(lin, spec, rank=4, phi="bf16", alpha=4.0) for n, lin in lins.items()}
    start = codes_moved((m.fused_layer().codes, m.start_codes()) for m in lr.values())
    assert start == {"codes_moved": 0, "codes": 2 * 32 * 64, "fraction": 0.0}  # A = 0: RTN's codes
    with torch.no_grad():
        lr["l1"].lora_A.normal_(0, 1.0)
    layers = {n: m.fused_layer() for n, m in lr.items()}
    rtn = {n: rtn_quantize(lin.weight, spec)[0] for n, lin in lins.items()}
    want = sum(int((layers[n].codes != rtn[n]).sum()) for n in lins)
    got = codes_moved((layers[n].codes, lr[n].start_codes()) for n in lins)
    assert got["codes_moved"] == want > 0 and got["fraction"] == want / (2 * 32 * 64)
