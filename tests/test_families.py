"""The families people quantize now, end to end on tiny random models built with transformers' own config classes
(tests/tiny.py FAMILIES):

* Llama 3.x — llama3 rope scaling (GGUF rope_freqs), tied embeddings, the llama-bpe pre-tokenizer;
* Qwen3 — per-head q_norm/k_norm, no biases, head_dim · heads ≠ hidden, NEOX rope (no Q/K permutation);
* Gemma 3 (text) — norms stored as w and applied as 1 + w, embeddings scaled by √hidden, five sliding-window layers
  (window 16) and one global layer with their two rope bases, query_pre_attn_scalar, GELU-tanh, one KV head;
* Phi-3 / Phi-4-mini — fused qkv_proj and gate_up_proj (one quantized layer each), partial rotary factor,
  LongRoPE factors and attention factor, untied lm_head.

Per family: LR-QAT for a few steps → fuse → GGUF and GPTQ exports → `verify` at its default thresholds (every
exported weight equal to s·W_int; llama.cpp's and the GPTQ loader's perplexity within 1 % of the torch model's);
the greedy tokens of llama.cpp and of the fused torch model agree; and negative controls: the same GGUF written
without the family's own transformation loads in llama.cpp and is far off (test_llamacpp.py's logit bound).
"""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import gguf
import pytest
import torch

pytest.importorskip("llama_cpp")

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402
from test_llamacpp import MEAN_REL, corpus_ids, logit_gap  # noqa: E402

from converters import gguf as G  # noqa: E402
from converters import gguf_meta as M  # noqa: E402
from lrqat_export.app.cli import main  # noqa: E402
from lrqat_export.app.jobs import DEFAULT_MAX_GAP  # noqa: E402
from lrqat_export.app.verify import verify  # noqa: E402
from lrqat_export.core import data as D  # noqa: E402
from lrqat_export.core.intckpt import load_intckpt  # noqa: E402
from lrqat_export.core.models import QUANTIZED_PROJECTIONS, load_tokenizer, quantized_layer_names  # noqa: E402
from lrqat_export.methods.common import MethodOptions  # noqa: E402
from lrqat_export.methods.lrqat import LRQATLinear, prepare  # noqa: E402
from lrqat_export.core.quant import PRESETS  # noqa: E402
from lrqat_export.runtimes.llamacpp import greedy_ids, load_llama, window_logits  # noqa: E402

pytestmark = pytest.mark.llamacpp

TIED = {"llama3": True, "qwen3": True, "gemma3": True, "phi3": False}  # as the real models: Phi-3 unties
SEQ, STEPS = 64, 4
# GGUF tensors each family must have in block 0 (names from gguf-py; shapes in torch order)
BLOCK0 = {
    "llama3": {"attn_q": (64, 64), "attn_k": (32, 64), "ffn_gate": (128, 64)},
    "qwen3": {"attn_q": (128, 64), "attn_k": (64, 64), "attn_q_norm": (32,), "attn_k_norm": (32,),
              "attn_output": (64, 128)},
    "gemma3": {"attn_q": (128, 64), "attn_k": (32, 64), "attn_q_norm": (32,), "post_attention_norm": (64,),
               "ffn_norm": (64,), "post_ffw_norm": (64,)},
    "phi3": {"attn_qkv": (128, 64), "ffn_up": (256, 64), "ffn_down": (64, 128)},  # q+k+v rows; gate then up
}
EXTRA = {"llama3": {"rope_freqs.weight": (8,)}, "qwen3": {}, "gemma3": {},
         "phi3": {"rope_factors_long.weight": (6,), "rope_factors_short.weight": (6,), "output.weight": (384, 64)}}


@pytest.fixture(scope="module", params=sorted(TIED))
def fam(request, tmp_path_factory) -> dict:
    """One family: its tiny model, LR-QAT trained for STEPS steps and fused (`lrqat train`), exported to GGUF and
    GPTQ (`lrqat export`), and evaluation windows."""
    name = request.param
    d = tmp_path_factory.mktemp(name)
    model = tiny.make_model(d / "model", name, tie=TIED[name])
    args = ["--model", str(model), "--preset", "q4_0", "--rank", "4", "--steps", str(STEPS), "--seq-len", str(SEQ),
            "--max-train-windows", "8"]
    assert main(["train", "--method", "lrqat", "--out", str(d / "ck"), *args]) == 0
    assert main(["export", "gguf", str(d / "ck"), "--out", str(d / "m.gguf")]) == 0
    assert main(["export", "gptq", str(d / "ck"), "--out", str(d / "gptq")]) == 0
    tok = load_tokenizer(d / "ck")
    return {"name": name, "model": model, "ck": d / "ck", "gguf": d / "m.gguf", "gptq": d / "gptq", "tok": tok,
            "windows": D.text_windows(tok, ["pydoc"], SEQ, 4)}


def test_prepare_quantizes_every_projection_once_and_keeps_norms_float(fam):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fam["model"], dtype=torch.float32)
    arch = type(model).__name__
    model = prepare(model, PRESETS["q4_0"], MethodOptions(rank=4, alpha=1.0, phi="int8"))
    swapped = {n for n, m in model.named_modules() if isinstance(m, LRQATLinear)}
    assert swapped == set(quantized_layer_names(model))
    assert len(swapped) == len(QUANTIZED_PROJECTIONS[arch]) * model.config.num_hidden_layers
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.startswith("model.layers"))
    norms = [n for n, p in model.named_parameters() if "norm" in n]
    assert norms and not any(p.requires_grad for n, p in model.named_parameters() if "norm" in n)
    if arch == "Phi3ForCausalLM":  # the fused projections are one quantized layer each
        assert {n.rsplit(".", 1)[-1] for n in swapped} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_lrqat_trains_fuses_and_both_exports_pass_verify(fam, capsys):
    ck = load_intckpt(fam["ck"])
    assert ck.manifest["method"] == "lrqat" and ck.manifest["training"]["config"]["steps"] == STEPS
    rep = verify(fam["ck"], fam["gguf"], fam["gptq"], windows=fam["windows"])  # raises CheckFailed on a failure
    assert rep["parity"]["passed"] and rep["weights"]["gguf"]["exact"] and rep["weights"]["gptq"]["exact"]
    for rt in ("gguf", "gptq"):
        assert abs(rep["parity"][rt]["rel_gap"]) <= DEFAULT_MAX_GAP[rt]
    p = rep["ppl"]
    with capsys.disabled():
        print(f"\n{fam['name']}: torch {p['torch']:.4f}  torch(F16 emb) {p['torch_gguf_ref']:.4f}  llama.cpp "
              f"{p['gguf']:.4f} ({100 * rep['parity']['gguf']['rel_gap']:+.3f} %)  GPTQ {p['gptq']:.4f} "
              f"({100 * rep['parity']['gptq']['rel_gap']:+.3f} %)")


def test_every_baseline_quantizes_the_family_and_exports_exactly(fam, tmp_path):
    """The baselines (one training step each; RTN; GPTQ by GPTQModel, whose import is checked element-wise against
    its own dequantization and which quantizes Phi-3's gate_up_proj as gate_proj + up_proj) give IntCheckpoints
    of every projection, and their GGUF files hold s·W_int exactly."""
    common = ["--model", str(fam["model"]), "--preset", "q4_0", "--out"]
    runs = {m: ["train", "--method", m, "--rank", "4", "--steps", "1", "--seq-len", str(SEQ), "--max-train-windows",
                "4"] for m in ("full-qat", "peqa", "qlora", "qalora")}
    runs |= {m: ["ptq", "--method", m, "--calib-windows", "4", "--calib-seq-len", str(SEQ)] for m in ("rtn", "gptq")}
    for method, args in runs.items():
        assert main([*args, *common, str(tmp_path / method)]) == 0, method
        ck = load_intckpt(tmp_path / method)
        assert ck.manifest["method"] == method and list(ck.layers) == ck.manifest["quantized_layers"]
        assert len(ck.layers) == len(QUANTIZED_PROJECTIONS[ck.architecture]) * ck.config.num_hidden_layers
        rep = G.verify_gguf(G.export_gguf(tmp_path / method, tmp_path / f"{method}.gguf"), ck)
        assert rep["exact"], (method, {k: v for k, v in rep["tensors"].items() if not v["exact"]})


def test_gguf_holds_the_familys_tensors_under_gguf_py_names(fam):
    r = gguf.GGUFReader(fam["gguf"])
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in r.tensors}
    want = {f"blk.0.{k}.weight": v for k, v in BLOCK0[fam["name"]].items()} | EXTRA[fam["name"]]
    assert {k: shapes.get(k) for k in want} == want
    assert ("output.weight" in shapes) == (not TIED[fam["name"]])  # a tied lm_head is not a separate tensor
    arch = r.fields["general.architecture"].contents()
    assert arch == {"llama3": "llama", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}[fam["name"]]
    if fam["name"] == "gemma3":
        assert r.fields["gemma3.attention.sliding_window"].contents() == 16
        norm = load_intckpt(fam["ck"]).float_tensors["model.layers.0.self_attn.q_norm.weight"]
        t = r.get_tensor(next(i for i, t in enumerate(r.tensors) if t.name == "blk.0.attn_q_norm.weight"))
        assert torch.equal(torch.from_numpy(t.data.copy()), norm + 1)  # stored as 1 + w, in float32
    if fam["name"] == "phi3":
        assert r.fields["phi3.rope.dimension_count"].contents() == 12  # 0.75 of head_dim 16
        assert r.fields["phi3.rope.scaling.original_context_length"].contents() == 512


def test_llamacpp_and_the_fused_torch_model_agree_on_greedy_tokens(fam, capsys):
    """12 greedy tokens after a short prompt. The runtimes' logits differ by ~1 % of their spread (Q8 activations
    in llama.cpp), so a step whose torch top-2 margin is under TIE of the logits' std is a near-tie either may
    break: the sequences must agree up to the first near-tie (and at least half way), and under teacher forcing
    (llama.cpp fed torch's tokens) llama.cpp's argmax must be torch's at every step that is not a near-tie."""
    tok, n, tie = fam["tok"], 12, 0.02
    prompt = tok("The return value of the function is", add_special_tokens=False)["input_ids"]
    ref = G.reference_model(fam["ck"], "f16")
    ids, want, margin = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = ref(input_ids=torch.tensor([ids])).logits[0, -1]
            top = logits.topk(2).values
            margin.append(float((top[0] - top[1]) / logits.std()))
            want.append(int(logits.argmax()))
            ids.append(want[-1])
    llm = load_llama(fam["gguf"], n_ctx=128)
    try:
        got = greedy_ids(llm, prompt, n)
        forced = window_logits(llm, ids[:-1])[len(prompt) - 1:].argmax(-1).tolist()  # predictions of want[0..n-1]
    finally:
        llm.close()
    first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), n))
    with capsys.disabled():
        print(f"\n{fam['name']} greedy: llama.cpp {got}\n{'':>{len(fam['name'])}}         torch     {want}"
              f"  (agree on {first_diff}/{n}; top-2 margins/std {[round(m, 3) for m in margin]})")
    assert first_diff == n or (margin[first_diff] < tie and first_diff >= n // 2), (first_diff, margin)
    assert all(f == w for f, w, m in zip(forced, want, margin) if m >= tie), (forced, want, margin)


REFUSED = {  # family → (config.json change, the refusal's words): what llama.cpp would compute differently
    "llama3": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                 "rope_theta": 500000.0}},
               "rope scaling 'yarn' is not supported for the llama architecture by this converter; expected one of "
               "['default', 'llama3']"),
    "qwen3": ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
              "rope scaling 'linear' is not supported for the qwen3 architecture"),
    "gemma3": ({"query_pre_attn_scalar": 256},
               "Gemma 3 query_pre_attn_scalar expected 32 (what llama.cpp's gemma3 architecture computes), got 256"),
}


def test_a_config_llamacpp_would_run_differently_is_refused(fam, tmp_path):
    import json
    import shutil

    from lrqat_export.core.errors import UserError

    if fam["name"] not in REFUSED:  # Phi3Config refuses other rope types and wrong factor lengths itself
        pytest.skip("transformers validates Phi-3's rope configuration before the converter sees it")
    change, words = REFUSED[fam["name"]]
    ck = shutil.copytree(fam["ck"], tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    (ck / "config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(UserError, match="GGUF export: " + re.escape(words)):
        G.export_gguf(ck, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# --- negative controls: each family's own transformation is what makes llama.cpp agree -----------------------


def _without_rope_tables(monkeypatch, name):
    monkeypatch.setattr(M, "rope_tensors", lambda cfg: {})


def _with_arch(**change):
    def patch(monkeypatch, name):
        arch = {"qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[name]
        monkeypatch.setitem(G.ARCHS, arch, dataclasses.replace(G.ARCHS[arch], **change))
    return patch


def _without_sliding_window(monkeypatch, name):
    monkeypatch.setattr(gguf.GGUFWriter, "add_sliding_window", lambda self, value: None)


CONTROLS = {  # family → [(what is left out, how)]
    "llama3": [("rope_freqs", _without_rope_tables)],
    "qwen3": [("NEOX order (Llama's Q/K permutation applied)", _with_arch(permute_qk=True))],
    "gemma3": [("1 + w norms (stored as w)", _with_arch(norm_shift=0.0)),
               ("the sliding window", _without_sliding_window)],
    "phi3": [("LongRoPE factors", _without_rope_tables)],
}


def test_without_the_familys_transformation_llamacpp_is_far_off(fam, tmp_path, monkeypatch):
    ref = G.reference_model(fam["ck"], "f16")
    ids = corpus_ids(fam["tok"], 128)  # longer than Gemma 3's window of 16
    good = logit_gap(fam["gguf"], ref, ids)
    assert good[0] < MEAN_REL, good
    for i, (what, breaks) in enumerate(CONTROLS[fam["name"]]):
        with monkeypatch.context() as mp:
            breaks(mp, fam["name"])
            bad = logit_gap(G.export_gguf(fam["ck"], tmp_path / f"bad{i}.gguf"), ref, ids)
        assert bad[0] > 2 * MEAN_REL, (f"without {what}", good, bad)  # the bound correct files pass, twice over
