"""converters/gguf.py: exact block packing, names, metadata, refusals, atomic writes (no llama.cpp needed)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from converters import gguf as G
from lrqat_export.app.cli import main as cli_main
from lrqat_export.core.errors import UserError
from lrqat_export.core.intckpt import load_intckpt, write_intckpt
from lrqat_export.methods.rtn import ptq_rtn
from lrqat_export.core.models import load_tokenizer
from lrqat_export.core.quant import PRESETS, QuantSpec

EXACT_SPECS = {  # every grid the converter supports, with the type it must produce
    "q4_0": (PRESETS["q4_0"], QT.Q4_0),
    "w4pc": (PRESETS["w4pc"], QT.Q4_0),
    "w4g64": (PRESETS["w4g64"], QT.Q4_0),
    "q8_0": (PRESETS["q8_0"], QT.Q8_0),
    "w8pc": (PRESETS["w8pc"], QT.Q8_0),
    "w5g32": (QuantSpec(5, 32, True), QT.Q5_0),
}
ASYM_SPECS = {"q4_1": (PRESETS["q4_1"], QT.Q4_1), "w5g64a": (QuantSpec(5, 64, False), QT.Q5_1)}


_LOADED: dict[Path, tuple] = {}  # tiny model dir → (model, tokenizer), loaded once per test session


def make_ckpt(model_dir: Path, out: Path, spec: QuantSpec, random_codes: bool = False, seed: int = 0,
              source_gguf: str | None = None) -> Path:
    """RTN (min-max) IntCheckpoint of a tiny model; random_codes replaces every code (and zero) by uniform draws
    over the whole grid, so the extreme codes (−2^(b−1), 2^(b−1)−1) are certainly packed."""
    from transformers import AutoModelForCausalLM

    if model_dir not in _LOADED:
        _LOADED[model_dir] = (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                              load_tokenizer(model_dir))
    model, tok = _LOADED[model_dir]
    src = {"name": model_dir.name, "kind": "hf", "path": str(model_dir), "gguf_path": source_gguf}
    ck = ptq_rtn(model, spec, src, range_method="minmax")
    if random_codes:
        g = torch.Generator().manual_seed(seed)
        for q in ck.layers.values():
            q.codes = torch.randint(spec.qmin, spec.qmax + 1, q.codes.shape, generator=g, dtype=torch.int8)
            if q.zeros is not None:
                q.zeros = torch.randint(spec.qmin, spec.qmax + 1, q.zeros.shape, generator=g, dtype=torch.int8)
    return write_intckpt(out, ck, tok)


@pytest.fixture(scope="module")
def q4_llama(tiny_models, tmp_path_factory) -> Path:
    return make_ckpt(tiny_models["llama"], tmp_path_factory.mktemp("ck") / "llama_q4_0", PRESETS["q4_0"])


@pytest.fixture(scope="module")
def q4_llama_gguf(q4_llama, tmp_path_factory) -> Path:
    return G.export_gguf(q4_llama, tmp_path_factory.mktemp("gguf") / "llama_q4_0.gguf")


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


# --- exactness --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("name", sorted(EXACT_SPECS))
@pytest.mark.parametrize("random_codes", [False, True], ids=["rtn", "random"])
def test_symmetric_grid_dequantizes_to_s_wint_exactly(tiny_models, tmp_path, arch, name, random_codes):
    spec, qtype = EXACT_SPECS[name]
    ck = make_ckpt(tiny_models[arch], tmp_path / "ck", spec, random_codes)
    out = G.export_gguf(ck, tmp_path / "m.gguf")
    rep = G.verify_gguf(out, ck)  # gguf.quants.dequantize of every tensor, inverse Q/K permutation, vs s·(c − z)
    assert rep["exact"], {k: v for k, v in rep["tensors"].items() if not v["exact"]}
    assert rep["quantized"]["n_diff"] == 0 and rep["quantized"]["max_abs"] == 0.0
    assert {v["type"] for v in rep["tensors"].values() if "max_step" in v} == {qtype.name}
    # independent of verify_gguf: one permuted tensor by hand
    _, tensors = fields(out)
    t = tensors["blk.1.attn_k.weight"]
    got = gguf.quants.dequantize(t.data, t.tensor_type)
    want = load_intckpt(ck).dequantized("model.layers.1.self_attn.k_proj").numpy()
    cfg = load_intckpt(ck).config
    if arch != "qwen2":
        want = G.permute_rows(want, cfg.num_key_value_heads)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", sorted(ASYM_SPECS))
@pytest.mark.parametrize("random_codes", [False, True], ids=["rtn", "random"])
def test_asymmetric_grid_is_exact_where_the_offset_is_fp16_and_within_bound_elsewhere(tiny_models, tmp_path, name,
                                                                                       random_codes):
    """Q4_1/Q5_1 store m = fp16(−s·(z + 2^(b−1))): exact where that product is fp16-representable, else off by the
    fp16 rounding of m, at most 2^−11·|s·(z + 2^(b−1))| (normal range) — the documented bound."""
    spec, qtype = ASYM_SPECS[name]
    ck_dir = make_ckpt(tiny_models["llama"], tmp_path / "ck", spec, random_codes)
    out = G.export_gguf(ck_dir, tmp_path / "m.gguf")
    ck = load_intckpt(ck_dir)
    _, tensors = fields(out)
    n_exact_groups = n_groups = 0
    for name_, q in ck.layers.items():
        gg = G.tensor_name_map(ck)[f"{name_}.weight"]
        t = tensors[gg]
        assert t.tensor_type == qtype
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        stem = gg.split(".")[-2]
        if stem in G.QK_PERMUTE:
            got = G.unpermute_rows(got, getattr(ck.config, G.QK_PERMUTE[stem]))
        err = np.abs(got - ck.dequantized(name_).numpy()).reshape(*q.scales.shape, -1).max(-1)  # (out, G)
        offset = q.scales.double().numpy() * (q.zeros.double().numpy() + 2 ** (spec.bits - 1))  # exact
        representable = offset.astype(np.float16).astype(np.float64) == offset
        assert (err[representable] == 0).all()
        assert (err <= np.maximum(2.0**-11 * offset, 2.0**-25)).all()
        n_exact_groups += int(representable.sum())
        n_groups += representable.size
    rep = G.verify_gguf(out, ck)
    assert rep["quantized"]["max_step"] <= 2 ** (spec.bits - 1) * 2.0**-10
    assert rep["quantized"]["exact"] == (n_exact_groups == n_groups)


def test_pack_blocks_matches_the_gguf_reference_quantizer_on_its_own_grid():
    """Values already on a Q4_0/Q8_0 grid whose block max hits the negative end (Q4_0) / ±127 (Q8_0): gguf's own
    quantizer reproduces them, and its bytes equal ours byte for byte."""
    rng = np.random.default_rng(0)
    c4 = rng.integers(-8, 8, (8, 64), dtype=np.int8)
    c4[:, ::32] = -8  # gguf's Q4_0: d = max/−8 with max the signed value of largest magnitude → d = s
    c8 = rng.integers(-127, 128, (8, 64), dtype=np.int8)
    c8[:, ::32] = 127
    s = np.full((8, 2), 0.0123, dtype=np.float16)
    for c, qt in ((c4, QT.Q4_0), (c8, QT.Q8_0)):
        ours = G.pack_blocks(c, s, None, qt)
        ref = gguf.quants.quantize(c.astype(np.float32) * s.astype(np.float32).repeat(32, 1), qt)
        np.testing.assert_array_equal(ours, ref)


def test_permutation_is_the_documented_row_map_and_inverts():
    n_head, hd = 3, 8
    x = np.arange(n_head * hd * 2).reshape(n_head * hd, 2)
    p = G.permute_rows(x, n_head)
    for h in range(n_head):
        for i in range(hd // 2):
            for j in range(2):  # new row 2i+j of a head = old row j·hd/2 + i
                np.testing.assert_array_equal(p[h * hd + 2 * i + j], x[h * hd + j * hd // 2 + i])
    np.testing.assert_array_equal(G.unpermute_rows(p, n_head), x)


# --- file contents ----------------------------------------------------------------------------------------------


def test_reader_opens_file_with_names_types_and_metadata(q4_llama, q4_llama_gguf):
    kv, tensors = fields(q4_llama_gguf)
    ck = load_intckpt(q4_llama)
    cfg = ck.config
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert kv["general.quantized_by"].startswith("lrqat-export ") and kv["lrqat.spec"] == "q4_0"
    assert json.loads(kv["lrqat.spec_json"])["group_size"] == 32
    assert kv["general.quantization_version"] == 2
    assert kv["llama.attention.head_count_kv"] == cfg.num_key_value_heads
    assert kv["llama.rope.dimension_count"] == cfg.hidden_size // cfg.num_attention_heads
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert len(kv["tokenizer.ggml.tokens"]) == cfg.vocab_size and kv["tokenizer.ggml.merges"]
    tok = load_tokenizer(q4_llama)
    assert kv["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    types = kv["tokenizer.ggml.token_type"]
    assert types[tok.eos_token_id] == int(gguf.TokenType.CONTROL) and types[100] == int(gguf.TokenType.NORMAL)
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type == QT.F16
    assert all(t.tensor_type == QT.F32 for n, t in tensors.items() if n.endswith("norm.weight"))
    assert len(tensors) == 2 + 9 * cfg.num_hidden_layers


def test_untied_output_and_qwen2_biases(tiny_models, tmp_path):
    ck = make_ckpt(tiny_models["mistral"], tmp_path / "mistral", PRESETS["q4_0"])
    _, t = fields(G.export_gguf(ck, tmp_path / "mistral.gguf"))
    assert t["output.weight"].tensor_type == QT.F16
    ck = make_ckpt(tiny_models["qwen2"], tmp_path / "qwen2", PRESETS["q4_0"])
    kv, t = fields(G.export_gguf(ck, tmp_path / "qwen2.gguf"))
    assert kv["general.architecture"] == "qwen2"
    assert {f"blk.0.attn_{x}.bias" for x in "qkv"} <= set(t) and t["blk.0.attn_q.bias"].tensor_type == QT.F32


@pytest.mark.parametrize("embed_type", ["q8_0", "f32"])
def test_embed_types_and_parity_reference_uses_the_same_embedding(q4_llama, tmp_path, embed_type):
    out = G.export_gguf(q4_llama, tmp_path / "m.gguf", embed_type=embed_type)
    rep = G.verify_gguf(out, q4_llama)
    assert rep["exact"] and rep["tensors"]["token_embd.weight"]["type"] == embed_type.upper()
    _, t = fields(out)
    e = t["token_embd.weight"]
    ref = G.reference_model(q4_llama, embed_type)
    np.testing.assert_array_equal(ref.get_input_embeddings().weight.detach().numpy(),
                                  gguf.quants.dequantize(e.data, e.tensor_type))
    assert ref.get_output_embeddings().weight.data_ptr() == ref.get_input_embeddings().weight.data_ptr()  # still tied


def test_tokenizer_copied_from_source_gguf(tiny_models, q4_llama_gguf, tmp_path):
    ck = make_ckpt(tiny_models["llama"], tmp_path / "ck", PRESETS["q8_0"], source_gguf=str(q4_llama_gguf))
    kv, _ = fields(G.export_gguf(ck, tmp_path / "m.gguf"))
    src, _ = fields(q4_llama_gguf)
    tok_keys = {k for k in src if k.startswith("tokenizer.")}
    assert tok_keys and {k: kv[k] for k in tok_keys} == {k: src[k] for k in tok_keys}


def test_unknown_pre_tokenizer_is_refused():
    from converters.gguf_meta import pre_tokenizer_name

    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    with pytest.raises(UserError, match="pre-tokenizer .*Whitespace.* no known llama.cpp name"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


# --- refusals and atomicity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,msg", [
    (PRESETS["w3g64"], r"spec w3g64 \(3-bit symmetric\) has no GGUF type .* Q4_0 \(4-bit symmetric\)"),
    (QuantSpec(2, 32, False), r"spec w2g32a \(2-bit asymmetric\) .* Q4_1 \(4-bit asymmetric\)"),
    (QuantSpec(8, 32, False), r"spec w8g32a \(8-bit asymmetric\) has no GGUF type"),
    (QuantSpec(4, 16, True), r"spec w4g16 \(group_size 16\) cannot be written exactly.* multiple of 32"),
])
def test_unrepresentable_spec_is_refused_naming_spec_and_working_types(tiny_models, tmp_path, spec, msg):
    ck = make_ckpt(tiny_models["llama"], tmp_path / "ck", spec)
    with pytest.raises(UserError, match=msg):
        G.export_gguf(ck, tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".m.gguf*")) == []
    assert cli_main(["export", "gguf", str(ck), "--out", str(tmp_path / "m.gguf")]) == 2


@pytest.mark.parametrize("spec,qtype", [(PRESETS["w3g64"], "Q4_0"), (QuantSpec(2, 32, False), "Q4_1"),
                                        (QuantSpec(6, -1, True), "Q8_0")])
def test_widen_writes_a_narrow_grid_into_the_wider_type(tiny_models, tmp_path, spec, qtype):
    ck = make_ckpt(tiny_models["llama"], tmp_path / "ck", spec, random_codes=True)
    rep = G.verify_gguf(G.export_gguf(ck, tmp_path / "m.gguf", widen=True), ck)
    assert {v["type"] for v in rep["tensors"].values() if "max_step" in v} == {qtype}
    if spec.symmetric:
        assert rep["exact"]
    else:  # m = fp16(−s·(z + 8)): same bound as native Q4_1
        assert rep["quantized"]["max_step"] <= 8 * 2.0**-10


def test_out_of_range_codes_are_refused_not_wrapped():
    s = np.ones((1, 1), np.float16)
    with pytest.raises(ValueError, match=r"Q4_0: codes must lie in \[-8, 7\], got \[0, 8\]"):
        G.pack_blocks(np.eye(1, 32, dtype=np.int8) * 8, s, None, QT.Q4_0)
    G.pack_blocks(np.full((1, 32), -128, np.int8), s, None, QT.Q8_0)  # the whole int8 range is valid Q8_0


def test_existing_output_needs_overwrite_and_failed_write_leaves_nothing(q4_llama, q4_llama_gguf, tmp_path,
                                                                         monkeypatch):
    before = q4_llama_gguf.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        G.export_gguf(q4_llama, q4_llama_gguf)
    assert q4_llama_gguf.read_bytes() == before
    out = tmp_path / "m.gguf"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        G.export_gguf(q4_llama, out)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_and_inspect(q4_llama, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli_main(["export", "gguf", str(q4_llama), "--out", str(out), "--embed-type", "q8_0"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert cli_main(["export", "gguf", str(q4_llama), "--out", str(out)]) == 2  # exists, no --overwrite
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "blk.0.attn_q.weight" in text and "Q4_0" in text and "Q8_0" in text and "lrqat.spec" in text
