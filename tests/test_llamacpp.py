"""Real llama.cpp (llama-cpp-python) on files written by converters/gguf.py.

Tolerances. Weights in the file are exactly s·W_int (test_gguf.py), so llama.cpp and the torch reference differ
only in arithmetic: on CPU llama.cpp quantizes activations to 8 bits (Q8_0 blocks of 32) before every Q4_0/Q8_0
dot product, converts activations to fp16 for the F16 embedding/output matmul, and keeps the KV cache in fp16.
On the tiny random models that moves logits by ~1.7 % of their standard deviation on average (max ~13 %); the
bound used is 5 % (mean) and 30 % (max). Writing the same file without the Q/K permutation moves them by ~40 %
(mean), so the bound separates a correct file from a wrong one by a wide margin.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")

import tiny  # noqa: E402
from converters import gguf as G  # noqa: E402
from lrqat_export.app.cli import main as cli_main  # noqa: E402
from lrqat_export.core import data as D  # noqa: E402
from lrqat_export.core.models import load_tokenizer  # noqa: E402
from lrqat_export.core.quant import PRESETS  # noqa: E402
from lrqat_export.runtimes.llamacpp import (generate_greedy, gguf_tokenizer, load_llama,  # noqa: E402
                                            perplexity_gguf, window_logits)
from lrqat_export.runtimes.torch_eval import perplexity  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf import make_ckpt  # noqa: E402

pytestmark = pytest.mark.llamacpp
MEAN_REL, MAX_REL = 0.05, 0.30


def corpus_ids(tok, n: int) -> list[int]:
    return tok(D.embedded_corpus()[400_000:430_000], add_special_tokens=False)["input_ids"][:n]


def logit_gaps(gguf_path: Path, ref_model, ids: list[int]) -> tuple[float, np.ndarray]:
    """(mean over everything, max per position) of the |llama.cpp − torch| logit difference, in units of the torch
    logits' std."""
    llm = load_llama(gguf_path, n_ctx=len(ids))
    try:
        got = window_logits(llm, ids)
    finally:
        llm.close()
    with torch.no_grad():
        want = ref_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    d = np.abs(got - want) / want.std()
    return float(d.mean()), d.max(-1)


def logit_gap(gguf_path: Path, ref_model, ids: list[int]) -> tuple[float, float]:
    """(mean, max) |llama.cpp − torch| logit difference over all positions, in units of the torch logits' std."""
    mean, per_position = logit_gaps(gguf_path, ref_model, ids)
    return mean, float(per_position.max())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("preset", ["q4_0", "w4pc", "q8_0", "q4_1"])
def test_llamacpp_logits_match_the_torch_reference(tiny_models, tmp_path, arch, preset):
    ck = make_ckpt(tiny_models[arch], tmp_path / "ck", PRESETS[preset])
    out = G.export_gguf(ck, tmp_path / "m.gguf")
    tok = load_tokenizer(ck)
    ids = corpus_ids(tok, 128)
    llm = load_llama(out, n_ctx=128)
    try:  # llama.cpp's tokenizer, built from the file's metadata, agrees with the HF tokenizer
        assert llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=False) == ids
    finally:
        llm.close()
    mean, worst = logit_gap(out, G.reference_model(ck, "f16"), ids)
    assert mean < MEAN_REL and worst < MAX_REL, (mean, worst)


def test_without_qk_permutation_llamacpp_is_far_off(tiny_models, tmp_path, monkeypatch):
    """Negative control: the same Llama file with Q/K rows left in HF order loads silently and is wrong."""
    ck = make_ckpt(tiny_models["llama"], tmp_path / "ck", PRESETS["q4_0"])
    ref = G.reference_model(ck, "f16")
    ids = corpus_ids(load_tokenizer(ck), 128)
    good = logit_gap(G.export_gguf(ck, tmp_path / "good.gguf"), ref, ids)
    monkeypatch.setitem(G.ARCHS, "LlamaForCausalLM", dataclasses.replace(G.ARCHS["LlamaForCausalLM"], permute_qk=False))
    bad = logit_gap(G.export_gguf(ck, tmp_path / "bad.gguf"), ref, ids)
    assert good[0] < MEAN_REL < 4 * MEAN_REL < bad[0], (good, bad)


@pytest.fixture(scope="module")
def q4_tiny(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("llamacpp")
    ck = make_ckpt(tiny_models["llama"], d / "ck", PRESETS["q4_0"])
    return ck, G.export_gguf(ck, d / "m.gguf")


@pytest.mark.parametrize("protocol", ["full", "second_half"])
def test_perplexity_gguf_scores_like_torch(q4_tiny, protocol):
    ck, out = q4_tiny
    tok = load_tokenizer(ck)
    w = torch.tensor(corpus_ids(tok, 3 * 128)).reshape(3, 128)
    r = perplexity_gguf(out, w, protocol)
    t = perplexity(G.reference_model(ck, "f16"), w, protocol)
    assert r["tokens"] == t["tokens"] == 3 * (127 if protocol == "full" else 63)
    assert len(r["per_window_nll"]) == 3
    assert abs(r["ppl"] / t["ppl"] - 1) < 0.01, (r["ppl"], t["ppl"])


def test_gguf_tokenizer_and_greedy_generation(q4_tiny):
    ck, out = q4_tiny
    text = D.embedded_corpus()[:2000]
    assert gguf_tokenizer(out)(text, add_special_tokens=False)["input_ids"] == \
        load_tokenizer(ck)(text, add_special_tokens=False)["input_ids"]
    a = generate_greedy(out, "The return value", max_new_tokens=8)
    assert isinstance(a, str) and a and a == generate_greedy(out, "The return value", max_new_tokens=8)


def test_cli_eval_runs_llamacpp_on_a_gguf(q4_tiny, capsys):
    _, out = q4_tiny
    assert cli_main(["eval", str(out), "--eval-data", "pydoc", "--eval-seq-len", "64", "--eval-windows", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["runtime"] == "llama.cpp" and res["tokens"] == 2 * 63 and res["ppl"] > 1


# --- the real model ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_rtn(tmp_path_factory) -> dict[str, Path]:
    """Min-max RTN IntCheckpoints of SmolLM2-135M (q4_0, q8_0). `lrqat ptq`'s Lp range search costs ~7 CPU-minutes
    here; parity does not depend on how the scales were chosen."""
    from lrqat_export.methods.rtn import ptq_rtn
    from lrqat_export.core.intckpt import write_intckpt
    from lrqat_export.core.models import load_model

    d = tmp_path_factory.mktemp("smollm2")
    model, tok, src = load_model("smollm2-135m")
    return {p: write_intckpt(d / p, ptq_rtn(model, PRESETS[p], src.to_dict(), "minmax"), tok) for p in ("q4_0", "q8_0")}


@pytest.mark.slow
def test_smollm2_q4_0_llamacpp_within_1_percent_of_torch(smollm2_rtn, tmp_path):
    """q4_0 SmolLM2-135M → GGUF, bit-exact; 8 windows × 512 tokens of WikiText-2 test (embedded pydoc corpus if
    absent), all 511 predictions per window scored: llama.cpp ppl within 1 % of the torch fused model (same F16
    embedding); greedy continuations of both runtimes start with the same tokens."""
    ck = smollm2_rtn["q4_0"]
    out = G.export_gguf(ck, tmp_path / "smollm2_q4_0.gguf")
    rep = G.verify_gguf(out, ck)
    assert rep["exact"] and rep["quantized"]["n"] == 210
    tok = load_tokenizer(ck)
    wiki = tiny.wikitext("test")
    w = D.text_windows(tok, [str(wiki) if wiki else "pydoc"], 512, 8)
    ref = G.reference_model(ck, "f16")
    ppl_cpp = perplexity_gguf(out, w, "full")["ppl"]
    ppl_torch = perplexity(ref, w, "full")["ppl"]
    gap = ppl_cpp / ppl_torch - 1
    print(f"\nSmolLM2 q4_0 (min-max RTN): torch {ppl_torch:.4f}  llama.cpp {ppl_cpp:.4f}  gap {100 * gap:+.3f} %")
    assert abs(gap) < 0.01
    prompt = "The capital of France is"
    cpp = generate_greedy(out, prompt, max_new_tokens=8)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        new = ref.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    print(f"greedy llama.cpp {cpp!r}  torch {tok.decode(new)!r}")
    assert tok(cpp, add_special_tokens=False)["input_ids"][:4] == new[:4].tolist()


@pytest.mark.slow
def test_smollm2_q8_0_is_exact_and_says_paris(smollm2_rtn, tmp_path):
    ck = smollm2_rtn["q8_0"]
    out = G.export_gguf(ck, tmp_path / "smollm2_q8_0.gguf")
    assert G.verify_gguf(out, ck)["exact"]
    text = generate_greedy(out, "The capital of France is", max_new_tokens=8)
    print(f"\ngreedy q8_0: The capital of France is{text!r}")
    assert "Paris" in text
