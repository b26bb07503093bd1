"""QuantSpec validation, presets, range search and the exactness of s·(c − z) in float32."""
from __future__ import annotations

import pytest
import torch

from lrqat_export.core.errors import UserError
from lrqat_export.core.quant import PRESETS, QuantSpec, dequantize, fp16_round, init_scales, quantize_codes, rtn_quantize, spec_from_args


@pytest.mark.parametrize("kwargs, needle", [
    ({"bits": 1}, "bits: expected an integer in 2..8, got 1"),
    ({"bits": 9}, "got 9"),
    ({"group_size": 0}, "group_size: expected -1 (per channel) or an integer >= 2, got 0"),
    ({"group_size": -2}, "got -2"),
    ({"symmetric": 1}, "symmetric: expected a bool"),
])
def test_spec_rejects_invalid_values_with_expected_and_actual(kwargs, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        QuantSpec(**kwargs)


def test_presets_name_their_targets():
    assert PRESETS["q4_0"] == QuantSpec(4, 32, True)
    assert PRESETS["q8_0"] == QuantSpec(8, 32, True)
    assert PRESETS["q4_1"] == QuantSpec(4, 32, False)
    assert PRESETS["w4pc"] == QuantSpec(4, -1, True)
    assert {"w4g64", "w3g64", "w4g128", "w3g128"} <= set(PRESETS)
    assert PRESETS["w3g64"].name == "w3g64" and QuantSpec(5, 16, False).name == "w5g16a"


def test_spec_from_args_overrides_preset():
    assert spec_from_args("q4_0", 3, None, False) == QuantSpec(3, 32, True)
    assert spec_from_args(None, None, None, False) == PRESETS["w4pc"]
    assert spec_from_args(None, None, 64, True) == QuantSpec(4, 64, False)
    with pytest.raises(UserError, match="--preset: expected one of"):
        spec_from_args("q4_k_xl", None, None, False)
    with pytest.raises(UserError, match="a K grid or plan fixes bits"):
        spec_from_args("q4_k_m", 3, None, False)
    assert spec_from_args("q4_k_m", None, None, False) == PRESETS["q4_k_m"]


def test_group_that_does_not_divide_input_is_refused_with_numbers():
    with pytest.raises(UserError, match="in_features 576 is not divisible by group_size 128"):
        PRESETS["w4g128"].check_layer("model.layers.0.mlp.up_proj", 576)
    PRESETS["w4g64"].check_layer("x", 576)  # 64 divides 576


def test_fp16_round_gives_representable_positive_values():
    x = torch.tensor([1e-9, 0.1, 3.14159, 1e6])
    y = fp16_round(x)
    assert torch.equal(y, y.half().float())
    assert (y > 0).all() and y[-1] == 65504.0


@pytest.mark.parametrize("name", ["q4_0", "w4pc", "q4_1", "w3g64", "q8_0", "w2g64a"])
def test_dequantize_is_exact_in_float32(name):
    """s·(c − z) with fp16 s and |c − z| < 2^9 is exact in float32: compare with float64 math."""
    spec = PRESETS[name]
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    codes, s, z = rtn_quantize(w, spec)
    got = dequantize(codes, s, z, spec)
    c = codes.double().reshape(48, spec.n_groups(128), -1)
    if z is not None:
        c = c - z.double().unsqueeze(-1)
    ref = (c * s.double().unsqueeze(-1)).reshape(48, 128)
    assert torch.equal(got.double(), ref)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax


@pytest.mark.parametrize("name", ["w4pc", "q4_0", "q4_1", "w3g64"])
def test_range_search_beats_minmax_on_its_own_objective(name):
    spec = PRESETS[name]
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.02
    w[0, 0] = 0.5  # an outlier: min-max wastes the grid on it
    errs = {}
    for method in ("minmax", "mse", "lp"):
        s, z = init_scales(w, spec, method)
        assert torch.equal(s, s.half().float()), "scales must be fp16-representable"
        err = dequantize(quantize_codes(w, s, z, spec), s, z, spec) - w
        errs[method] = (err.pow(2).sum().item(), err.abs().pow(4).sum().item())
    assert errs["mse"][0] <= errs["minmax"][0]
    assert errs["lp"][1] <= errs["minmax"][1]


def test_asymmetric_zero_points_are_integers_in_range_and_range_holds_zero():
    spec = PRESETS["q4_1"]
    w = torch.rand(8, 64) * 0.1 + 0.02  # all positive: asymmetric grid should use its full range
    s, z = init_scales(w, spec, "minmax")
    assert torch.equal(z, z.round()) and z.min() >= spec.qmin and z.max() <= spec.qmax
    codes = quantize_codes(w, s, z, spec)
    assert int(codes.max()) == spec.qmax  # the max of each group maps to the top code
    assert dequantize(torch.full_like(codes, 0), s, z, spec).abs().max() < s.max() * 16


@pytest.mark.parametrize("name", ["w4pc", "q4_0", "q4_1", "w3g64"])
def test_imatrix_search_picks_the_candidate_with_the_least_weighted_error(name):
    """imatrix chooses, per group, the scale with the least importance-weighted squared error; lp's and minmax's
    choices are candidates of the same search, so neither may beat it on that objective, group by group."""
    from lrqat_export.core.quant import grouped, imatrix_weights

    spec = PRESETS[name]
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g) * 0.02
    w[1, 5] = 0.3
    imp = torch.rand(128, generator=g).pow(4) * 10  # a few input features dominate, as in real activations
    weight = imatrix_weights(grouped(w, spec), imp)

    def werr(s, z):
        e = grouped(dequantize(quantize_codes(w, s, z, spec), s, z, spec) - w, spec)
        return (e.square() * weight).sum(-1)

    s_imx, z_imx = init_scales(w, spec, "imatrix", importance=imp)
    assert torch.equal(s_imx, s_imx.half().float())
    best = werr(s_imx, z_imx)
    for other in ("lp", "minmax"):
        assert (best <= werr(*init_scales(w, spec, other))).all()
    assert not torch.equal(s_imx, init_scales(w, spec, "lp")[0])  # the importance changed some choice


def test_imatrix_weights_follow_the_importance_and_the_weight():
    from lrqat_export.core.quant import imatrix_weights

    wg = torch.tensor([[[0.0, 3.0, 4.0, 0.0]]])
    got = imatrix_weights(wg, torch.tensor([1.0, 2.0, 1.0, 0.0]))
    sig2 = 25.0 / 4
    want = torch.tensor([sig2 ** 0.5, 2 * (sig2 + 9) ** 0.5, (sig2 + 16) ** 0.5, 0.0])
    assert torch.allclose(got.flatten(), want)


def test_imatrix_search_refuses_a_missing_or_misshapen_importance():
    from lrqat_export.core.quant import init_k

    w = torch.randn(8, 64)
    with pytest.raises(UserError, match="imatrix.*importance is required"):
        init_scales(w, PRESETS["q4_0"], "imatrix")
    with pytest.raises(UserError, match=r"importance shape expected \(64,\), got \(32,\)"):
        init_scales(w, PRESETS["q4_0"], "imatrix", importance=torch.ones(32))
    with pytest.raises(UserError, match="used only by imatrix"):
        init_scales(w, PRESETS["q4_0"], "lp", importance=torch.ones(64))
    with pytest.raises(UserError, match="imatrix.*importance is required"):
        init_k(torch.randn(8, 256), PRESETS["q4_k"], "imatrix")
    with pytest.raises(UserError, match=r"importance shape expected \(256,\), got \(64,\)"):
        init_k(torch.randn(8, 256), PRESETS["q4_k"], "imatrix", importance=torch.ones(64))
    with pytest.raises(UserError, match="used only by imatrix"):
        init_k(torch.randn(8, 256), PRESETS["q4_k"], "lp", importance=torch.ones(256))


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k"])
def test_imatrix_k_search_lowers_the_weighted_error_of_the_k_grid(name):
    """On K grids the imatrix search (sub-block candidates and the ±1 integer pass judged by the importance-weighted
    squared error) gives stored values of the K format (fp16 super-block scales, integer sub-block values in range)
    whose weighted error, summed over the layer, is below lp's and minmax's, and differs from lp's choice."""
    from lrqat_export.core.quant import dequantize_k, grouped, imatrix_weights, init_k, quantize_codes_k

    spec = PRESETS[name]
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 512, generator=g) * 0.02
    w[3, 17] = 0.25
    imp = torch.rand(512, generator=g).pow(4) * 10
    weight = imatrix_weights(grouped(w, spec), imp)

    def werr(d, sc, dmin, m):
        codes = quantize_codes_k(w, d, sc, dmin, m, spec)
        return float((grouped(dequantize_k(codes, d, sc, dmin, m, spec) - w, spec).square() * weight).sum())

    imx = init_k(w, spec, "imatrix", importance=imp)
    d, sc, dmin, m = imx
    assert torch.equal(d, d.half().float()) and torch.equal(sc, sc.round())
    lo, hi = spec.sub_range
    assert sc.min() >= lo and sc.max() <= hi
    if m is not None:
        assert torch.equal(dmin, dmin.half().float()) and torch.equal(m, m.round()) and m.min() >= 0
    err = {k: werr(*init_k(w, spec, k)) for k in ("lp", "minmax")}
    assert werr(*imx) < min(err.values()), (werr(*imx), err)
    assert not torch.equal(sc, init_k(w, spec, "lp")[1])
