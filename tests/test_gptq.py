"""GPTQ converter: packing properties, writer, config, v1 zero pitfall, sharding, vLLM refusal, real loaders.

Exactness claims are compared exactly (np.array_equal / == 0.0); loader tolerances are stated where used.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from converters import gptq as G
from lrqat_export.core.errors import UserError
from lrqat_export.core.intckpt import load_intckpt, write_intckpt
from lrqat_export.methods.rtn import ptq_rtn
from lrqat_export.core.quant import PRESETS, QuantSpec, dequantize

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

GROUPS = (32, 64, 128, -1)


# --- packing: properties --------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from(G.BITS), rows=st.integers(1, 9), n32=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_roundtrip_exact(bits, rows, n32, seed):
    q = np.random.default_rng(seed).integers(0, 1 << bits, (rows, 32 * n32))
    w = G.pack_codes(q, bits)
    assert w.dtype == np.int32 and w.shape == (rows, n32 * bits)  # 32 codes fill exactly b words
    assert np.array_equal(G.unpack_codes(w, bits), q)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(G.BITS), sym=st.booleans(), group=st.sampled_from(GROUPS),
       fmt=st.sampled_from(G.FORMATS), out32=st.integers(1, 4), in_mult=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_pack_layer_dequantizes_to_s_w_int(bits, sym, group, fmt, out32, in_mult, seed):
    """Every bits/sym/group/format combination and random shapes: GPTQ dequant == s·(c − z) bit for bit."""
    rng = np.random.default_rng(seed)
    out_f, in_f = 32 * out32, (group if group != -1 else 32) * in_mult * (4 if group == 32 else 1)
    spec = QuantSpec(bits=bits, group_size=group, symmetric=sym)
    n_g = spec.n_groups(in_f)
    codes = rng.integers(spec.qmin, spec.qmax + 1, (out_f, in_f)).astype(np.int8)
    scales = rng.uniform(1e-4, 0.5, (out_f, n_g)).astype(np.float16)
    zeros = None
    if not sym:  # v1 cannot store unsigned zero 0 (tested separately), so draw from [qmin+1, qmax] there
        zeros = rng.integers(spec.qmin + (fmt == "gptq"), spec.qmax + 1, (out_f, n_g)).astype(np.int8)
    lay = G.pack_layer(codes, scales, zeros, bits, group, fmt)
    assert lay.qweight.shape == (in_f * bits // 32, out_f) and lay.qzeros.shape == (n_g, out_f * bits // 32)
    assert lay.scales.shape == (n_g, out_f) and lay.g_idx.shape == (in_f,)
    ref = dequantize(torch.from_numpy(codes), torch.from_numpy(scales),
                     None if zeros is None else torch.from_numpy(zeros), spec).numpy()
    assert np.array_equal(G.dequantize_layer(lay, bits, fmt), ref)


# --- packing: known answers (formats.md B1, env-gptq.md §4) ---------------------------------------------------
def test_known_words_4bit_and_sym_zero():
    q = np.zeros((1, 32), np.int64)
    q[0, 0], q[0, 7] = 0xA, 0x3
    assert G.pack_codes(q, 4)[0, 0] == 0x3000000A
    lay = G.pack_layer(np.zeros((32, 32), np.int8), np.ones((32, 1), np.float16), None, 4, -1, "gptq")
    assert (lay.qzeros == 0x77777777).all()  # v1: stored zero − 1 = 7 in every nibble (2004318071)
    lay2 = G.pack_layer(np.zeros((32, 32), np.int8), np.ones((32, 1), np.float16), None, 4, -1, "gptq_v2")
    assert (lay2.qzeros.view(np.uint32) == 0x88888888).all()
    lay8 = G.pack_layer(np.zeros((32, 32), np.int8), np.ones((32, 1), np.float16), None, 8, -1, "gptq")
    assert (lay8.qzeros.view(np.uint32) == 0x7F7F7F7F).all()
    lay2b = G.pack_layer(np.zeros((32, 32), np.int8), np.ones((32, 1), np.float16), None, 2, -1, "gptq")
    assert (lay2b.qzeros.view(np.uint32) == 0x55555555).all()


def test_3bit_codes_straddle_word_boundaries():
    """AutoGPTQ/GPTQModel 3-bit layout: 10 | 1 | 10 | 1 | 10 — code 10 sits at bits 30..32, code 21 at 63..65."""
    q = np.zeros((1, 32), np.int64)
    q[0, 10] = 0b111
    w = G.pack_codes(q, 3).view(np.uint32)[0]
    assert (int(w[0]), int(w[1]), int(w[2])) == (0b11 << 30, 0b1, 0)
    q[0, 10], q[0, 21] = 0, 0b111
    w = G.pack_codes(q, 3).view(np.uint32)[0]
    assert (int(w[0]), int(w[1]), int(w[2])) == (0, 1 << 31, 0b11)
    q[0, 21], q[0, 11], q[0, 31] = 0, 0b101, 0b110
    w = G.pack_codes(q, 3).view(np.uint32)[0]
    assert (int(w[1]), int(w[2])) == (0b101 << 1, 0b110 << 29)


@pytest.mark.parametrize("bits", G.BITS)
def test_out_of_range_codes_are_refused_not_wrapped(bits):
    q = np.zeros((1, 32), np.int64)
    q[0, 3] = 1 << bits  # would wrap to 0 and carry into the neighbour
    with pytest.raises(UserError, match=f"{bits}-bit codes expected in"):
        G.pack_codes(q, bits)
    q[0, 3] = -1  # sign bits would spill over every following field
    with pytest.raises(UserError):
        G.pack_codes(q, bits)
    with pytest.raises(UserError, match="divisible by 32"):
        G.pack_layer(np.zeros((32, 48), np.int8), np.ones((32, 1), np.float16), None, bits, -1, "gptq")


def test_v1_asym_zero0_pitfall():
    """Asym unsigned zero 0 in v1 would be stored as −1: its field reads 0xF and GPTQModel's v1→v2 (+0x11111111)
    carries into the neighbouring field. The writer refuses it for "gptq" and stores it exactly in "gptq_v2"."""
    # the pitfall itself: the naive v1 word for zeros (0, 8, 8, ...) after a reader's +0x11111111
    naive = np.uint32(0x8888888F)  # field 0 = (0 − 1) & 0xF
    read = G.unpack_codes((naive + np.uint32(0x11111111)).reshape(1, 1).view(np.int32), 4)[0]
    assert read[0] == 0 and read[1] == 0xA  # zero 0 came back as 0 only by overflow, and its neighbour became 10
    codes = np.zeros((32, 32), np.int8)
    codes[0, :4] = (-8, 7, 0, 3)
    zeros = np.zeros((32, 1), np.int8)
    zeros[5, 0] = -8  # unsigned zero 0 (group entirely ≥ 0)
    scales = np.full((32, 1), 0.125, np.float16)
    with pytest.raises(UserError, match="zero point 0 .*gptq_v2"):
        G.pack_layer(codes, scales, zeros, 4, -1, "gptq", name="L")
    lay = G.pack_layer(codes, scales, zeros, 4, -1, "gptq_v2")
    ref = dequantize(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zeros),
                     QuantSpec(4, -1, False)).numpy()
    assert np.array_equal(G.dequantize_layer(lay, 4, "gptq_v2"), ref)
    zeros[5, 0] = -7  # zero 1 is fine in v1 (stored 0)
    assert np.array_equal(G.dequantize_layer(G.pack_layer(codes, scales, zeros, 4, -1, "gptq"), 4, "gptq"),
                          dequantize(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zeros),
                                     QuantSpec(4, -1, False)).numpy())


# --- writer ---------------------------------------------------------------------------------------------------
def _intckpt(root: Path, model_dir: Path, spec: QuantSpec, zero0: bool = False) -> Path:
    from lrqat_export.core.models import load_model

    model, tok, src = load_model(str(model_dir))
    ck = ptq_rtn(model, spec, src.to_dict(), "minmax")
    if zero0:  # force one unsigned zero 0 (a group the grid sees as entirely ≥ 0)
        name = next(iter(ck.layers))
        ck.layers[name].zeros[0, 0] = spec.qmin
    return write_intckpt(root / f"ick-{spec.name}{'-z0' if zero0 else ''}", ck, tok)


@pytest.fixture(scope="module")
def ick_q4(tiny_llama, tmp_path_factory) -> Path:
    return _intckpt(tmp_path_factory.mktemp("gptq"), tiny_llama, QuantSpec(4, 32, True))


def test_export_writes_both_configs_and_reads_back_exact(ick_q4, tmp_path):
    out = G.export_gptq(ick_q4, tmp_path / "g")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    for k, v in {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False,
                 "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32"}.items():
        assert qc[k] == v, k
    assert qc["meta"]["quantizer"] == [f"lrqat-export:{__import__('lrqat_export').__version__}"]
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        qw = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
        gi = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
    assert qw.dtype == torch.int32 and tuple(qw.shape) == (64 * 4 // 32, 64)
    assert torch.equal(gi, torch.arange(128, dtype=torch.int32) // 32)
    assert "model.layers.0.self_attn.q_proj.weight" not in keys and "model.embed_tokens.weight" in keys
    rep = G.compare_with_intckpt(out, ick_q4)
    assert rep["exact"] and rep["max_abs_diff"] == 0.0 and rep["layers"] == 14
    assert "vLLM          accepts" in G.inspect_gptq(out)


def test_export_refuses_existing_output_and_bad_options(ick_q4, tmp_path):
    (tmp_path / "g").mkdir()
    with pytest.raises(UserError, match="already exists"):
        G.export_gptq(ick_q4, tmp_path / "g")
    with pytest.raises(UserError, match="--format"):
        G.export_gptq(ick_q4, tmp_path / "h", fmt="gptq_v3")
    with pytest.raises(UserError, match="--max-shard-size"):
        G.export_gptq(ick_q4, tmp_path / "h", max_shard_size="lots")
    assert not (tmp_path / "h").exists()


def test_asym_v1_zero0_export_refused_v2_exact(tiny_llama, tmp_path):
    ick = _intckpt(tmp_path, tiny_llama, QuantSpec(4, 32, False), zero0=True)
    with pytest.raises(UserError, match="cannot be stored in GPTQ v1"):
        G.export_gptq(ick, tmp_path / "v1")
    assert not (tmp_path / "v1").exists() and not list(tmp_path.glob(".v1.*"))
    out = G.export_gptq(ick, tmp_path / "v2", fmt="gptq_v2")
    assert G.compare_with_intckpt(out, ick)["exact"]


def test_sharding_with_index_above_limit(ick_q4, tmp_path):
    out = G.export_gptq(ick_q4, tmp_path / "g", max_shard_size="40KB")
    idx = json.loads((out / G.INDEX_FILE).read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 2 and not (out / G.SINGLE_FILE).exists()
    assert all((out / s).stat().st_size <= 40_000 + 2_000 for s in shards[:-1])  # + safetensors header
    for layer in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"):  # a module is never split
        assert len({idx["weight_map"][f"{layer}.{k}"] for k in G.LAYER_TENSORS}) == 1
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in G.load_tensors(out).values())
    assert G.compare_with_intckpt(out, ick_q4)["exact"]
    assert G.parse_size("4GB") == 4 * 10**9 and G.parse_size("2GiB") == 2 * 2**30


def test_strict_vllm_refusal_and_warning(tiny_llama, tmp_path, caplog):
    ick = _intckpt(tmp_path, tiny_llama, QuantSpec(3, 64, True))
    with pytest.raises(UserError, match=r"vLLM would reject.*3-bit.*--strict-vllm"):
        G.export_gptq(ick, tmp_path / "s", strict_vllm=True)
    assert not (tmp_path / "s").exists()
    with caplog.at_level(logging.WARNING, logger="converters.gptq"):
        out = G.export_gptq(ick, tmp_path / "w")
    assert "vLLM would reject" in caplog.text and G.compare_with_intckpt(out, ick)["exact"]
    assert "vLLM          rejects: 3-bit" in G.inspect_gptq(out)
    assert G.vllm_problems(4, 32, True, {"x": (64, 576)}) == []
    assert any("8-bit" in p for p in G.vllm_problems(8, 32, True, {}))
    assert any("asymmetric" in p for p in G.vllm_problems(4, 32, False, {}))
    assert any("not divisible" in p for p in G.vllm_problems(4, 128, True, {"x": (64, 576)}))


def test_cli_export_and_inspect(ick_q4, tmp_path, capsys):
    from lrqat_export.app.cli import main

    assert main(["export", "gptq", str(ick_q4), "--out", str(tmp_path / "g"), "--format", "gptq_v2"]) == 0
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    assert main(["inspect", str(tmp_path / "g")]) == 0
    assert "format gptq_v2" in capsys.readouterr().out
    assert main(["export", "gptq", str(ick_q4), "--out", str(tmp_path / "g")]) == 2  # exists, no --overwrite


# --- real loader: transformers + GPTQModel ------------------------------------------------------------------------
def loader_tolerance(kinds: set[str]) -> float:
    """Max |Δlogits| as a fraction of the largest |logit|: GPTQModel's TorchLinear dequantizes exactly and runs the
    matmul in the model dtype (1 %); the aten int4 kernels (TorchAtenLinear / TorchFusedLinear) cast activations and
    scales to bf16 (8 mantissa bits): measured 0.8–1.2 % on the tiny models, bound 3 %."""
    return 0.03 if kinds & {"TorchAtenLinear", "TorchFusedLinear"} else 0.01


LOADER_CASES = [  # (spec, format): every width, sym/asym, v1/v2, per channel and grouped
    (QuantSpec(4, 32, True), "gptq"),
    (QuantSpec(3, 64, True), "gptq"),
    (QuantSpec(2, 64, False), "gptq"),
    (QuantSpec(8, -1, True), "gptq"),
    (QuantSpec(4, 128, False), "gptq_v2"),
]


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory) -> Path:
    """A tiny Llama whose every input width (128, 256) takes group 128."""
    return tiny.make_model(tmp_path_factory.mktemp("t128") / "llama", "llama", tie=False, seed=3, hidden=128,
                           heads=4, kv_heads=2, intermediate=256)


@pytest.mark.gptq_loader
@pytest.mark.parametrize("spec,fmt", LOADER_CASES, ids=[f"{s.name}-{f}" for s, f in LOADER_CASES])
def test_transformers_gptqmodel_load_matches_fused_torch(spec, fmt, tiny128, tmp_path, record_property):
    """Logits through transformers + GPTQModel (the default path: TorchAtenLinear for 4-bit, TorchLinear otherwise)
    vs the float32 fused torch model. Tolerance (loader_tolerance): |Δ| ≤ 1 % of the largest |logit| for TorchLinear,
    3 % for the aten int4 kernel (it runs bf16 activations and bf16 scales); argmax equal ≥ 95 %."""
    pytest.importorskip("gptqmodel")
    from lrqat_export.runtimes.gptq_loader import gptq_logits, load_gptq

    os.environ.update(GPTQMODEL_CPU_WORKERS="2", GPTQMODEL_DISABLE_PACK_EXT="1", HF_HUB_OFFLINE="1")
    ick = _intckpt(tmp_path, tiny128, spec)
    out = G.export_gptq(ick, tmp_path / "g", fmt=fmt)
    ref = load_intckpt(ick).to_torch_model()
    ids = torch.randint(3, 380, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rl = ref(input_ids=ids).logits
    model = load_gptq(out)
    kinds = {type(m).__name__ for m in model.modules() if hasattr(m, "qweight")}
    assert kinds and kinds <= {"TorchLinear", "TorchAtenLinear", "TorchFusedLinear"}, kinds
    gl = gptq_logits(model, ids)
    diff = float((gl - rl).abs().max())
    record_property("max_abs_diff", diff)
    print(f"\n[gptq loader] {spec.name} {fmt} {sorted(kinds)}: max |Δlogits| {diff:.3e} (ref max |logit| "
          f"{rl.abs().max():.3f})")
    assert diff <= loader_tolerance(kinds) * float(rl.abs().max())
    assert (gl.argmax(-1) == rl.argmax(-1)).float().mean() >= 0.95
    if spec.bits == 4 and fmt == "gptq":  # sensitivity: the same file declared v2 (zero off by one) is far off
        for f in ("config.json", "quantize_config.json"):
            d = json.loads((out / f).read_text())
            qc = d.get("quantization_config", d)
            qc["format"] = qc["checkpoint_format"] = "gptq_v2"
            (out / f).write_text(json.dumps(d))
        wrong = float((gptq_logits(out, ids) - rl).abs().max())
        print(f"[gptq loader] same file misread as gptq_v2: max |Δlogits| {wrong:.3e}")
        assert wrong > 20 * diff


@pytest.fixture(scope="module")
def tiny576(tmp_path_factory) -> Path:
    """SmolLM2's layer shapes (hidden 576, 9 heads / 3 kv heads, ffn 1536), one layer, a small vocabulary: the
    widths that made the loaders' default int4 kernel crash on per-channel files (group 576)."""
    return tiny.make_model(tmp_path_factory.mktemp("t576") / "llama", "llama", tie=True, seed=4, hidden=576,
                           layers=1, heads=9, kv_heads=3, intermediate=1536)


EXPORTED_GRIDS = ["q4_0", "q4_1", "w4pc", "w4g64", "w3g64", "q8_0", "w8pc", "w2g64a", "w4g128", "w3g128"]


@pytest.mark.gptq_loader
@pytest.mark.parametrize("preset", EXPORTED_GRIDS)
def test_every_exported_grid_runs_through_the_users_default_load(preset, tiny576, tiny128, tmp_path):
    """`AutoModelForCausalLM.from_pretrained(dir, device_map="cpu")`, no backend or dtype — exactly what a user types —
    loads and runs every GPTQ grid the tool exports, with logits close to the fused torch model's. SmolLM2's widths
    where the grid tiles them (g128 grids do not tile 576: those on 128/256-wide layers)."""
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM

    from lrqat_export.core import quiet

    os.environ.update(GPTQMODEL_CPU_WORKERS="2", HF_HUB_OFFLINE="1")
    spec = PRESETS[preset]
    src = tiny576 if spec.group_size in (-1, 32, 64) else tiny128
    ick = _intckpt(tmp_path, src, spec)
    out = G.export_gptq(ick, tmp_path / "g", fmt="gptq" if spec.symmetric else "gptq_v2")
    ref = load_intckpt(ick).to_torch_model()
    ids = torch.randint(3, 380, (1, 32), generator=torch.Generator().manual_seed(0))
    quiet.import_gptqmodel()
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")  # the user's line, verbatim
    with torch.no_grad():
        rl, gl = ref(input_ids=ids).logits, model(input_ids=ids).logits.float()
    diff = float((gl - rl).abs().max())
    kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    print(f"\n[default load] {preset} ({src.parent.name}): {kinds} {model.dtype}, max |Δlogits| {diff:.3e}")
    bound = loader_tolerance(set(kinds)) * float(rl.abs().max())
    assert diff <= bound
    # the greedy token may only change where the reference's top-2 margin is within the error actually measured
    top2 = rl.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * diff
    assert clear.sum() >= clear.numel() // 2 and torch.equal(gl.argmax(-1)[clear], rl.argmax(-1)[clear])


# --- SmolLM2-135M perplexity parity ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.gptq_loader
def test_smollm2_ppl_gptq_within_0p2_percent_of_torch(tmp_path):
    """RTN q4_0 IntCheckpoint of SmolLM2-135M → GPTQ; perplexity through transformers + GPTQModel (fp16) within
    0.2 % of the float32 fused torch model on the same 8 windows of 512 tokens (WikiText-2 test, else pydoc)."""
    pytest.importorskip("gptqmodel")
    import subprocess

    import tiny
    from lrqat_export.core.data import text_windows
    from lrqat_export.core.models import load_tokenizer
    from lrqat_export.runtimes.gptq_loader import perplexity_gptq
    from lrqat_export.runtimes.torch_eval import perplexity

    ick = tmp_path / "ick"
    lrqat = Path(sys.executable).parent / "lrqat"
    subprocess.run([str(lrqat), "ptq", "--model", "smollm2-135m", "--preset", "q4_0", "--range-method", "minmax",
                    "--out", str(ick)], check=True)  # min-max: fast on CPU; parity does not depend on the scales
    out = G.export_gptq(ick, tmp_path / "gptq")
    wt = tiny.wikitext("test")
    windows = text_windows(load_tokenizer(out), [str(wt) if wt else "pydoc"], 512, 8)
    assert tuple(windows.shape) == (8, 512)
    ref = perplexity(load_intckpt(ick).to_torch_model(), windows)
    got = perplexity_gptq(out, windows, progress=False)
    gap = (got["ppl"] - ref["ppl"]) / ref["ppl"]
    print(f"\n[smollm2 q4_0] data {'wikitext-2 test' if wt else 'pydoc'}: torch fused ppl {ref['ppl']:.4f}, "
          f"GPTQ (transformers+gptqmodel) ppl {got['ppl']:.4f}, gap {100 * gap:+.4f} %")
    assert got["tokens"] == ref["tokens"] == 8 * 511
    assert math.isfinite(got["ppl"]) and abs(gap) <= 0.002
