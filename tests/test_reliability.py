"""Bad input across train / ptq (quantize + fuse) / export / verify / eval: each case exits 2 with one clear message
naming the thing, the expected and the actual value, and leaves nothing behind. Plus: disk full during export
(the previous file survives), a model asking for custom code (never executed), and a non-finite loss (training stops,
the last good checkpoint stays)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lrqat_export.app.cli import main

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in drop])
    return dst


def _tamper_safetensors(path: Path, fn) -> None:
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path), metadata={"format": "pt"})


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def art(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Good artefacts to break: a tiny model, RTN IntCheckpoints (q4_0, w3g64, 5-bit, group 16), its GGUF and GPTQ."""
    root = tmp_path_factory.mktemp("reliability")
    a = {"model": tiny_llama, "root": root}
    for name, spec in {"q4_0": ["--preset", "q4_0"], "w3g64": ["--preset", "w3g64"],
                       "b5": ["--bits", "5", "--group-size", "32"], "g16": ["--bits", "4", "--group-size", "16"]}.items():
        assert main(["ptq", "--model", str(tiny_llama), "--out", str(root / name), *spec]) == 0
        a[name] = root / name
    assert main(["export", "gguf", str(a["q4_0"]), "--out", str(root / "m.gguf")]) == 0
    assert main(["export", "gptq", str(a["q4_0"]), "--out", str(root / "gptq")]) == 0
    a["gguf"], a["gptq"] = root / "m.gguf", root / "gptq"
    import tiny

    other = tiny.make_model(root / "other", "llama", tie=True, hidden=32, intermediate=64, seed=3)
    assert main(["ptq", "--model", str(other), "--out", str(root / "other_ck"), "--preset", "q4_0"]) == 0
    assert main(["export", "gguf", str(root / "other_ck"), "--out", str(root / "other.gguf")]) == 0
    a["other_gguf"] = root / "other.gguf"
    text = root / "short.txt"
    text.write_text("def f(): return 1\n")
    a["short"] = text
    (root / "empty.txt").write_text("")
    a["empty"] = root / "empty.txt"
    return a


def _bad_model(a, d: Path, kind: str) -> Path:
    m = a["model"]
    if kind == "nan":
        p = _copy(m, d)
        _tamper_safetensors(p / "model.safetensors",
                            lambda t: t["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")))
    elif kind == "no_tokenizer":
        p = _copy(m, d, drop=TOKENIZER_FILES)
    elif kind == "truncated":
        p = _copy(m, d)
        _truncate(p / "model.safetensors")
    elif kind == "pickle":
        p = _copy(m, d, drop=("model.safetensors",))
        torch.save(load_file(str(m / "model.safetensors")), p / "pytorch_model.bin")
    elif kind == "gpt2":
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        tok = AutoTokenizer.from_pretrained(m)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=512,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(d)
        tok.save_pretrained(d)
        p = d
    elif kind in MODEL_TENSOR_DAMAGE:
        p = _copy(m, d)
        _tamper_safetensors(p / "model.safetensors", MODEL_TENSOR_DAMAGE[kind])
    elif kind in CONFIG_DAMAGE:
        p = _copy(m, d)
        _edit_config(p, CONFIG_DAMAGE[kind])
    return p


def _edit_config(d: Path, changes: dict) -> None:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


Q = "model.layers.0.self_attn.q_proj"
# Tensors of a float model's model.safetensors that disagree with its config.json (issue 15, class 2).
MODEL_TENSOR_DAMAGE = {
    "missing_projection": lambda t: t.pop(f"{Q}.weight"),
    "missing_norm": lambda t: t.pop("model.norm.weight"),
    "unexpected_tensor": lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(4, 4)),
    "projection_shape": lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(3, 3)),
}
CONFIG_DAMAGE = {  # config.json disagreeing with the tensors
    "untied_without_lm_head": {"tie_word_embeddings": False},
    "vocab_vs_config": {"vocab_size": 512},
    "layers_vs_config": {"num_hidden_layers": 3},
}


def _bad_intckpt(a, d: Path, kind: str) -> Path:
    p = _copy(a["q4_0"], d)
    man = p / "lrqat_manifest.json"
    if kind == "manifest_json":
        man.write_text('{"format": "lrqat-intckpt", "format_version": 1, "spec": {')
    elif kind == "manifest_version":
        m = json.loads(man.read_text())
        man.write_text(json.dumps({**m, "format_version": 99}))
    elif kind == "truncated":
        _truncate(p / "model.safetensors", 0.7)
    elif kind == "codes_range":
        _tamper_safetensors(p / "model.safetensors",
                            lambda t: t["model.layers.0.self_attn.q_proj.codes"].__setitem__((0, 0), 100))
    elif kind == "no_tokenizer":
        for f in TOKENIZER_FILES:
            (p / f).unlink(missing_ok=True)
    elif kind in INTCKPT_TENSOR_DAMAGE:
        _tamper_safetensors(p / "model.safetensors", INTCKPT_TENSOR_DAMAGE[kind])
    elif kind in INTCKPT_CONFIG_DAMAGE:
        _edit_config(p, INTCKPT_CONFIG_DAMAGE[kind])
    return p


def _cut_rows(t, name: str, rows: int) -> None:
    t[name] = t[name][:rows].contiguous()


# IntCheckpoint tensors that disagree with its own config.json, or with themselves (issue 15, classes 3 and 7).
INTCKPT_TENSOR_DAMAGE = {
    "codes_fewer_rows": lambda t: (_cut_rows(t, f"{Q}.codes", 32), _cut_rows(t, f"{Q}.scales", 32)),
    "float_wrong_shape": lambda t: _cut_rows(t, "model.norm.weight", 60),
    "float_missing": lambda t: t.pop("model.layers.0.input_layernorm.weight"),
    "float_extra": lambda t: t.__setitem__("model.extra.weight", torch.zeros(4)),
    "embed_fewer_rows": lambda t: _cut_rows(t, "model.embed_tokens.weight", 100),
    "bias_nan": lambda t: t.__setitem__(f"{Q}.bias", torch.full((64,), float("nan"))),
    "bias_unexpected": lambda t: t.__setitem__(f"{Q}.bias", torch.zeros(64)),
    "scale_inf": lambda t: t[f"{Q}.scales"].__setitem__((0, 0), float("inf")),
    "scale_zero": lambda t: t[f"{Q}.scales"].__setitem__((1, 0), 0.0),
}
INTCKPT_CONFIG_DAMAGE = {
    "config_intermediate": {"intermediate_size": 256},
    "config_vocab": {"vocab_size": 512},
}


# Each case: (verb path, builder(a, tmp) -> (argv, out), expected message fragment). `out` must not appear.
def _train(*extra, model=None):
    def build(a, tmp):
        out = tmp / "out"
        return ["train", "--model", str(model(a, tmp) if model else a["model"]), "--out", str(out), "--steps", "1",
                "--seq-len", "32", "--max-train-windows", "4", *extra], out
    return build


def _with_data(flag, key, *extra):
    def build(a, tmp):
        out = tmp / "out"
        return ["train", "--model", str(a["model"]), "--out", str(out), flag, str(a[key]), *extra], out
    return build


def _ptq(*extra, model=None):
    def build(a, tmp):
        out = tmp / "out"
        return ["ptq", "--model", str(model(a, tmp) if model else a["model"]), "--out", str(out), *extra], out
    return build


def _export(fmt, src, *extra):
    def build(a, tmp):
        out = tmp / ("out.gguf" if fmt == "gguf" else "gptq_out")
        ck = _bad_intckpt(a, tmp / "ck", src) if src not in a else a[src]
        return ["export", fmt, str(ck), "--out", str(out), *extra], out
    return build


def _verify(kind):
    def build(a, tmp):
        rep = tmp / "report"
        args = ["verify", str(a["q4_0"]), "--report", str(rep), "--eval-data", "pydoc", "--eval-seq-len", "32",
                "--eval-windows", "1"]
        if kind == "gguf_truncated":
            g = tmp / "t.gguf"
            g.write_bytes(a["gguf"].read_bytes()[: a["gguf"].stat().st_size // 2])
            args += ["--gguf", str(g)]
        elif kind == "gguf_random":
            g = tmp / "r.gguf"
            g.write_bytes(os.urandom(4096))
            args += ["--gguf", str(g)]
        elif kind == "gguf_missing":
            args += ["--gguf", str(tmp / "nope.gguf")]
        elif kind == "gptq_corrupt":
            d = _copy(a["gptq"], tmp / "g")
            _truncate(d / "model.safetensors", 0.3)
            args += ["--gptq", str(d)]
        elif kind == "gptq_no_config":
            d = _copy(a["gptq"], tmp / "g")
            cfg = json.loads((d / "config.json").read_text())
            cfg.pop("quantization_config")
            (d / "config.json").write_text(json.dumps(cfg))
            args += ["--gptq", str(d)]
        elif kind == "no_export":
            pass
        elif kind == "empty_data":
            args[args.index("pydoc")] = str(a["empty"])
            args += ["--gguf", str(a["gguf"])]
        return args, rep
    return build


def _eval(kind):
    def build(a, tmp):
        if kind == "missing_target":
            return ["eval", str(tmp / "nothing"), "--eval-data", "pydoc"], tmp / "never"
        return ["eval", str(a["q4_0"]), "--eval-data", str(a["short"]), "--eval-seq-len", "512"], tmp / "never"
    return build


def _cmd(*argv, out: str = "never"):
    """A case from an argv template: "{ck}", "{model}", "{gguf}", "{gptq}", "{tmp}" are filled in."""
    def build(a, tmp):
        keys = {k: str(v) for k, v in a.items()} | {"tmp": str(tmp)}
        return [x.format(**keys) for x in argv], tmp / out
    return build


def _made(maker, kind: str, *argv, out: str = "never"):
    """A case whose input is a damaged copy made by `maker` (_bad_model, _bad_intckpt, ...) as "{bad}"."""
    def build(a, tmp):
        bad = str(maker(a, tmp / "bad", kind))
        keys = {k: str(v) for k, v in a.items()} | {"tmp": str(tmp), "bad": bad}
        return [x.format(**keys) for x in argv], tmp / out
    return build


def _gptq_bits_lie(a, d: Path, kind: str) -> Path:
    p = _copy(a["gptq"], d)
    for f in ("config.json", "quantize_config.json"):
        cfg = json.loads((p / f).read_text())
        (cfg.get("quantization_config") or cfg)["bits"] = 8
        (p / f).write_text(json.dumps(cfg))
    return p


def _truncated_gguf(a, d: Path, kind: str) -> Path:
    d.mkdir()
    (d / "t.gguf").write_bytes(a["gguf"].read_bytes()[: a["gguf"].stat().st_size // 3])
    return d / "t.gguf"


EVAL1 = ("--eval-data", "pydoc", "--eval-seq-len", "32", "--eval-windows", "1")
PTQ = ("ptq", "--model", "{bad}", "--out", "{tmp}/out")
MISSING_Q = "1 missing ['model.layers.0.self_attn.q_proj.weight'] and 0 unexpected"

CASES = {
    # class 2: a model missing a tensor (or holding one too many, or of the wrong shape) is refused, never trained
    # from freshly initialised weights
    "ptq/model-missing-projection": (_made(_bad_model, "missing_projection", *PTQ, out="out"), MISSING_Q),
    "train/model-missing-projection": (_made(_bad_model, "missing_projection", "train", "--model", "{bad}", "--out",
                                             "{tmp}/out", "--steps", "1", out="out"), MISSING_Q),
    "eval/model-missing-projection": (_made(_bad_model, "missing_projection", "eval", "{bad}", *EVAL1), MISSING_Q),
    "ptq/model-missing-norm": (_made(_bad_model, "missing_norm", *PTQ, out="out"),
                               "1 missing ['model.norm.weight']"),
    "ptq/model-unexpected-tensor": (_made(_bad_model, "unexpected_tensor", *PTQ, out="out"),
                                    "0 missing [] and 1 unexpected ['model.layers.0.self_attn.extra.weight']"),
    "ptq/model-projection-shape": (_made(_bad_model, "projection_shape", *PTQ, out="out"),
                                   "tensor model.layers.1.mlp.up_proj.weight in"),
    "ptq/model-untied-without-lm-head": (_made(_bad_model, "untied_without_lm_head", *PTQ, out="out"),
                                         "1 missing ['lm_head.weight']"),
    "eval/model-vocab-vs-config": (_made(_bad_model, "vocab_vs_config", "eval", "{bad}", *EVAL1),
                                   "tensor model.embed_tokens.weight in"),
    "ptq/model-layers-vs-config": (_made(_bad_model, "layers_vs_config", *PTQ, out="out"),
                                   "missing ['model.layers.2.input_layernorm.weight'"),
    # class 3: an IntCheckpoint disagreeing with its own config.json is refused at load, by every reader
    "gguf/codes-fewer-rows": (_export("gguf", "codes_fewer_rows"),
                              f"layer {Q} codes expected shape (64, 64) from config.json, got (32, 64)"),
    "gptq/codes-fewer-rows": (_export("gptq", "codes_fewer_rows"),
                              f"layer {Q} codes expected shape (64, 64) from config.json, got (32, 64)"),
    "gguf/float-wrong-shape": (_export("gguf", "float_wrong_shape"),
                               "tensor model.norm.weight expected shape (64,) from config.json, got (60,)"),
    "gptq/float-missing": (_export("gptq", "float_missing"),
                           "1 missing ['model.layers.0.input_layernorm.weight'] and 0 unexpected"),
    "gguf/float-extra": (_export("gguf", "float_extra"), "0 missing [] and 1 unexpected ['model.extra.weight']"),
    "gguf/embed-fewer-rows": (_export("gguf", "embed_fewer_rows"), "tensor model.embed_tokens.weight expected "
                                                                   "shape (384, 64) from config.json, got (100, 64)"),
    "gptq/config-intermediate": (_export("gptq", "config_intermediate"),
                                 "mlp.gate_proj codes expected shape (256, 64) from config.json, got (128, 64)"),
    "eval/intckpt-config-vocab": (_made(_bad_intckpt, "config_vocab", "eval", "{bad}", *EVAL1),
                                  "tensor model.embed_tokens.weight expected shape (512, 64) from config.json"),
    "verify/intckpt-codes-fewer-rows": (_made(_bad_intckpt, "codes_fewer_rows", "verify", "{bad}", "--gguf",
                                              "{gguf}", *EVAL1), "codes expected shape (64, 64) from config.json"),
    "gguf/bias-unexpected": (_export("gguf", "bias_unexpected"), f"layer {Q} bias expected absent from config.json"),
    # class 7: messages say what is wrong (NaN, Inf, a directory) on one line
    "gguf/bias-nan": (_export("gguf", "bias_nan"), "bias expected finite values, got 64 NaN and 0 Inf of 64"),
    "gguf/scale-inf": (_export("gguf", "scale_inf"), "scales expected finite values, got 0 NaN and 1 Inf of"),
    "gptq/scale-zero": (_export("gptq", "scale_zero"), "scales expected > 0, got 1 values <= 0 (min 0.0)"),
    "gguf/intckpt-is-a-file": (_cmd("export", "gguf", "{short}", "--out", "{tmp}/o.gguf", out="o.gguf"),
                               "expected a directory, got a file"),
    "train/data-is-a-directory": (_cmd("train", "--model", "{model}", "--out", "{tmp}/out", "--train-data", "{root}",
                                       out="out"), "expected a file, got a directory"),
    "verify/gguf-is-a-directory": (_cmd("verify", "{q4_0}", "--gguf", "{gptq}", *EVAL1),
                                   "expected a file, got a directory"),
    "verify/gptq-is-a-file": (_cmd("verify", "{q4_0}", "--gptq", "{gguf}", *EVAL1),
                              "expected a directory, got a file"),
    # class 6: bad options are refused where they are parsed, bad outputs before any work, bad artefacts by their
    # validator, never by a traceback
    "train/seq-len-0": (_cmd("train", "--model", "{model}", "--out", "{tmp}/out", "--seq-len", "0", out="out"),
                        "argument --seq-len: expected an integer >= 2, got 0"),
    "train/rank-0": (_cmd("train", "--out", "{tmp}/out", "--rank", "0", out="out"),
                     "argument --rank: expected an integer >= 1, got 0"),
    "train/warmup-1.5": (_cmd("train", "--out", "{tmp}/out", "--warmup", "1.5", out="out"),
                         "argument --warmup: expected a finite number in [0, 1), got 1.5"),
    "train/lr-nan": (_cmd("train", "--out", "{tmp}/out", "--lr-ab", "nan", out="out"),
                     "argument --lr-ab: expected a finite number in [0, ∞), got nan"),
    "train/bits-not-a-number": (_cmd("train", "--out", "{tmp}/out", "--bits", "four", out="out"),
                                "argument --bits: expected an integer, got 'four'"),
    "ptq/group-size-0": (_cmd("ptq", "--out", "{tmp}/out", "--group-size", "0", out="out"),
                         "argument --group-size: expected an integer >= 2 or -1, got 0"),
    "eval/eval-seq-len-1": (_cmd("eval", "{q4_0}", "--eval-data", "pydoc", "--eval-seq-len", "1"),
                            "argument --eval-seq-len: expected an integer >= 2, got 1"),
    "eval/eval-windows-0": (_cmd("eval", "{q4_0}", "--eval-data", "pydoc", "--eval-windows", "0"),
                            "argument --eval-windows: expected an integer >= 1, got 0"),
    "verify/max-gap-negative": (_cmd("verify", "{q4_0}", "--gguf", "{gguf}", "--max-gap-gguf", "-1", *EVAL1),
                                "argument --max-gap-gguf: expected a finite number in [0, ∞), got -1"),
    "gguf/out-existing-directory": (_cmd("export", "gguf", "{q4_0}", "--out", "{tmp}", "--overwrite"),
                                    "expected a file path, got an existing directory"),
    "gguf/out-under-a-file": (_cmd("export", "gguf", "{q4_0}", "--out", "{short}/m.gguf"),
                              "to be a directory, got a file"),
    "gptq/out-under-a-file": (_cmd("export", "gptq", "{q4_0}", "--out", "{short}/sub/g"),
                              "to be a directory, got a file"),
    "ptq/out-under-a-file": (_cmd("ptq", "--model", "{model}", "--out", "{short}/ck"), "to be a directory, got a file"),
    "verify/report-is-a-file": (_cmd("verify", "{q4_0}", "--gguf", "{gguf}", "--report", "{short}", *EVAL1),
                                "expected a directory (or a new path), got an existing file"),
    "eval/gptq-config-lies-about-bits": (_made(_gptq_bits_lie, "", "eval", "{bad}", *EVAL1),
                                         "expected 8-bit GPTQ tensors"),
    "verify/gptq-config-lies-about-bits": (_made(_gptq_bits_lie, "", "verify", "{q4_0}", "--gptq", "{bad}", *EVAL1),
                                           "expected 8-bit GPTQ tensors"),
    "verify/another-models-gguf": (_cmd("verify", "{q4_0}", "--gguf", "{other_gguf}", *EVAL1),
                                   "expected shape (64, 64) as model.layers.0.self_attn.q_proj.weight"),
    "eval/truncated-gguf": (_made(_truncated_gguf, "", "eval", "{bad}", *EVAL1), "truncated or corrupted"),
    "eval/truncated-gguf-runtime-torch": (_made(_truncated_gguf, "", "eval", "{bad}", "--runtime", "torch", *EVAL1),
                                          "expected a complete GGUF file that transformers can load"),
    # train (prepare → train → fuse)
    "train/unsupported-architecture": (_train(model=lambda a, t: _bad_model(a, t / "m", "gpt2")),
                                       "model architecture GPT2LMHeadModel is not supported; supported: "),
    "train/unknown-preset": (_train("--preset", "q4_k_xl"), "--preset: expected one of"),
    "train/group-not-dividing": (_train("--group-size", "48"), "in_features 64 is not divisible by group_size 48"),
    "train/bits-out-of-range": (_train("--bits", "9"), "bits: expected an integer in 2..8, got 9"),
    "train/phi-int4-with-8-bit": (_train("--phi", "int4", "--preset", "q8_0"), "needs bits <= 4, got bits 8"),
    "train/batch-vs-accum": (_train("--batch-size", "3", "--grad-accum", "2"),
                             "batch_size 3: expected a multiple of grad_accum 2"),
    "train/nan-in-weights": (_train(model=lambda a, t: _bad_model(a, t / "m", "nan")),
                             "tensor model.layers.0.mlp.up_proj.weight expected finite values, got 1 NaN/Inf"),
    "train/missing-tokenizer": (_train(model=lambda a, t: _bad_model(a, t / "m", "no_tokenizer")),
                                "could not load its tokenizer"),
    "train/truncated-weights": (_train(model=lambda a, t: _bad_model(a, t / "m", "truncated")),
                                "could not load its weights"),
    "train/pickle-weights": (_train(model=lambda a, t: _bad_model(a, t / "m", "pickle")),
                             "pickle-based weights are refused"),
    "train/missing-data": (_train("--train-data", "/nonexistent/corpus.txt"), "data file /nonexistent/corpus.txt: not found"),
    "train/empty-data": (_with_data("--train-data", "empty"), "expected text, got an empty file"),
    "train/data-shorter-than-window": (_with_data("--train-data", "short", "--seq-len", "256"),
                                       "expected at least one window of 256 tokens, got"),
    # ptq (quantize + fuse into an IntCheckpoint)
    "ptq/unknown-method": (_ptq("--method", "awq"), "--method: expected one of ('rtn', 'gptq'), got 'awq'"),
    "ptq/group-not-dividing": (_ptq("--group-size", "48"), "in_features 64 is not divisible by group_size 48"),
    "ptq/missing-model": (_ptq(model=lambda a, t: t / "no-such-model"), "no such file or directory"),
    # export gguf
    "gguf/grid-not-exportable": (_export("gguf", "w3g64"), "GGUF export: spec w3g64"),
    "gguf/manifest-not-json": (_export("gguf", "manifest_json"), "expected valid JSON, got a parse error"),
    "gguf/manifest-version": (_export("gguf", "manifest_version"), "expected format_version 1, got 99"),
    "gguf/truncated-tensors": (_export("gguf", "truncated"), "unreadable or corrupted safetensors"),
    "gguf/codes-out-of-range": (_export("gguf", "codes_range"), "codes expected in [-8, 7], got [-8, 100]"),
    "gguf/missing-tokenizer": (_export("gguf", "no_tokenizer"), "tokenizer"),
    "gguf/bad-embed-type": (_export("gguf", "q4_0", "--embed-type", "q2_k"), "invalid choice: 'q2_k'"),
    # export gptq
    "gptq/bits-not-storable": (_export("gptq", "b5"), "GPTQ stores bits (2, 3, 4, 8), got 5"),
    "gptq/strict-vllm": (_export("gptq", "g16", "--strict-vllm"), "vLLM would reject this checkpoint"),
    "gptq/shard-size": (_export("gptq", "q4_0", "--max-shard-size", "lots"), "lots"),
    "gptq/manifest-version": (_export("gptq", "manifest_version"), "expected format_version 1, got 99"),
    # verify
    "verify/gguf-truncated": (_verify("gguf_truncated"), "truncated"),
    "verify/gguf-random-bytes": (_verify("gguf_random"), "expected a GGUF file (magic b'GGUF'"),
    "verify/gguf-missing": (_verify("gguf_missing"), "not found"),
    "verify/gptq-corrupt": (_verify("gptq_corrupt"), "unreadable or corrupted safetensors"),
    "verify/gptq-no-quant-config": (_verify("gptq_no_config"), "expected quantization_config with quant_method"),
    "verify/no-export-given": (_verify("no_export"), "expected at least one export"),
    "verify/empty-eval-data": (_verify("empty_data"), "expected text, got an empty file"),
    # eval
    "eval/missing-target": (_eval("missing_target"), "no such file or directory"),
    "eval/data-shorter-than-window": (_eval("short"), "expected at least one window of 512 tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(art, tmp_path, capsys, case):
    build, needle = CASES[case]
    argv, out = build(art, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse rejects bad choices itself, with status 2
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert needle in err, err
    ours = [ln for ln in err.splitlines() if ln.startswith("lrqat ")]
    assert len(ours) == 1 and "Traceback" not in err, err  # one message, no traceback
    assert not out.exists(), f"{out} was written"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, f"new files: {sorted(set(after) - set(before))}"


def test_the_table_covers_every_stage_with_at_least_20_cases():
    stages = {c.split("/")[0] for c in CASES}
    assert len(CASES) >= 20 and {"train", "ptq", "gguf", "gptq", "verify"} <= stages


def test_resume_with_different_options_is_refused_and_leaves_the_run_as_it_was(art, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--model", str(art["model"]), "--out", str(out), "--seq-len", "32", "--max-train-windows", "4",
              "--rank", "2", "--preset", "q4_0"]
    assert main([*common, "--steps", "2"]) == 0
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*common, "--steps", "3", "--resume"]) == 2
    assert "training options differ from the checkpoint's (saved, now): {'steps': (2, 3)}" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_resume_into_a_directory_that_is_not_a_run_is_refused(art, tmp_path, capsys):
    out = _copy(art["q4_0"], tmp_path / "ck")
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["train", "--model", str(art["model"]), "--out", str(out), "--resume", "--steps", "1"]) == 2
    assert "expected a training run directory, found no checkpoint but other files" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_custom_code_is_refused_and_never_executed(art, tmp_path, capsys):
    """A model whose config.json names its own Python code: refused without --trust-remote-code, and the code
    (which would drop a marker file) never runs."""
    m = _copy(art["model"], tmp_path / "custom")
    marker = tmp_path / "EXECUTED"
    (m / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (m / "config.json").write_text(json.dumps(cfg))
    for argv in (["train", "--model", str(m), "--out", str(tmp_path / "o")],
                 ["ptq", "--model", str(m), "--out", str(tmp_path / "o")],
                 ["eval", str(m), "--eval-data", "pydoc"]):
        assert main(argv) == 2
        assert "asks for custom Python code" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "o").exists()


def _limited(max_bytes: int):
    def pre():  # a file-size limit: the kernel fails writes past it with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return pre


@pytest.mark.parametrize("fmt", ["gguf", "gptq"])
def test_disk_full_during_export_fails_cleanly_and_keeps_the_previous_export(art, tmp_path, fmt):
    src = art["gguf"] if fmt == "gguf" else art["gptq"]
    out = tmp_path / src.name
    (shutil.copy2 if fmt == "gguf" else shutil.copytree)(src, out)
    files = [out] if fmt == "gguf" else sorted(out.iterdir())
    snapshot = {p: p.read_bytes() for p in files}
    biggest = max(p.stat().st_size for p in files)
    proc = subprocess.run([sys.executable, "-m", "lrqat_export.cli", "export", fmt, str(art["q4_0"]), "--out", str(out),
                           "--overwrite"], capture_output=True, text=True, preexec_fn=_limited(biggest // 3),
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "error: could not write" in proc.stderr and "nothing was published" in proc.stderr, proc.stderr
    assert "File too large" in proc.stderr or "short write" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in files} == snapshot  # the previous export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp file left behind


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(art, tmp_path):
    from lrqat_export.core.data import text_windows
    from lrqat_export.core.errors import UserError
    from lrqat_export.core.models import load_model
    from lrqat_export.methods.lrqat import prepare
    from lrqat_export.methods.common import MethodOptions
    from lrqat_export.methods.common import trainable_parameters
    from lrqat_export.core.quant import PRESETS
    from lrqat_export.train.state import CKPT_DIR, latest_checkpoint
    from lrqat_export.train.config import TrainConfig
    from lrqat_export.train.loop import train

    model, tok, _ = load_model(str(art["model"]))
    windows = text_windows(tok, ["pydoc"], 32, 8, "train data")
    torch.manual_seed(0)
    prepare(model, PRESETS["q4_0"], MethodOptions(rank=2, alpha=1.0, phi="int8"))
    cfg = TrainConfig(steps=6, batch_size=2, ckpt_every=2, objective="ce")
    train(model, windows, cfg, tmp_path, progress=False, stop_after=4)
    good = latest_checkpoint(tmp_path)
    saved = load_file(str(good / "trainable.safetensors"))
    state = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    norm = model.model.norm.weight
    with torch.no_grad():
        norm[0] = float("inf")  # a fault: the next forward produces a non-finite loss
    with pytest.raises(UserError, match=r"expected a finite loss and gradient, got loss (nan|inf) at step 5; stopped "
                                        r"without updating, the last good checkpoint is kept"):
        train(model, windows, cfg, tmp_path, resume=True, progress=False)
    assert latest_checkpoint(tmp_path) == good
    assert json.loads((tmp_path / CKPT_DIR / "latest.json").read_text())["step"] == 4
    after = load_file(str(good / "trainable.safetensors"))
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    # resume restored step 4's tensors, and the failed step changed none of them
    assert all(torch.equal(p.detach(), saved[n]) for n, p in trainable_parameters(model).items())
    assert state.keys() == saved.keys()


def test_directory_overwrite_is_an_atomic_exchange(tmp_path):
    """On Linux the old and new directory trade places in one renameat2(RENAME_EXCHANGE): no instant without one."""
    from lrqat_export.core.fsio import atomic_dir

    out = tmp_path / "d"
    out.mkdir()
    (out / "f").write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["d"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").touch()
    from lrqat_export.core.fsio import _exchange

    assert _exchange(a, b) and (b / "x").exists() and not (a / "x").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_during_an_export_overwrite_leaves_the_old_or_the_new_export_whole(art, tmp_path, seed):
    import random
    import time

    def snap(d: Path) -> dict:
        return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    out = tmp_path / "gptq"
    assert main(["export", "gptq", str(art["w3g64"]), "--out", str(out)]) == 0
    old = snap(out)
    assert main(["export", "gptq", str(art["q4_0"]), "--out", str(tmp_path / "new")]) == 0
    new = snap(tmp_path / "new")
    proc = subprocess.Popen([sys.executable, "-m", "lrqat_export.cli", "export", "gptq", str(art["q4_0"]), "--out",
                             str(out), "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(2.0, 8.0))
    proc.kill()
    proc.wait()
    assert snap(out) in (old, new)


# --- issue 15, classes 6 and 7: outputs, modes, the CLI-wide guard ----------------------------------------------------
def test_published_files_follow_the_umask_not_the_writers_0600(art, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["ptq", "--model", str(art["model"]), "--out", str(tmp_path / "rtn")]) == 0
        assert main(["export", "gptq", str(art["q4_0"]), "--out", str(tmp_path / "gptq")]) == 0
        assert main(["train", "--model", str(art["model"]), "--out", str(tmp_path / "run"), "--steps", "1",
                     "--seq-len", "32", "--max-train-windows", "2", "--batch-size", "2"]) == 0
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and len(files) > 10
    assert {p.relative_to(tmp_path): oct(p.stat().st_mode & 0o777) for p in files
            if p.stat().st_mode & 0o777 != 0o644} == {}


def test_a_directory_export_over_an_existing_file_leaves_no_temp_holding_it(art, tmp_path):
    out = tmp_path / "out"
    out.write_text("an old file")
    assert main(["export", "gptq", str(art["q4_0"]), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("target", ["file", "dangling"])
def test_a_symlink_at_out_is_an_existing_output_and_its_target_is_never_written(art, tmp_path, capsys, target):
    real = tmp_path / "real.gguf"
    if target == "file":
        real.write_bytes(b"the user's own file")
    link = tmp_path / "m.gguf"
    link.symlink_to(real)
    assert main(["export", "gguf", str(art["q4_0"]), "--out", str(link)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite to replace it (a symlink to" in err and err.count("\n") == 1, err
    assert link.is_symlink() and (not real.exists() if target == "dangling" else real.read_bytes() ==
                                  b"the user's own file")
    assert main(["export", "gguf", str(art["q4_0"]), "--out", str(link), "--overwrite"]) == 0
    assert not link.is_symlink() and link.read_bytes()[:4] == b"GGUF"  # the link is replaced, not its target
    assert not real.exists() if target == "dangling" else real.read_bytes() == b"the user's own file"


def test_verify_checks_its_report_path_before_evaluating_anything(art, tmp_path, capsys, monkeypatch):
    from lrqat_export.app import verify as V

    monkeypatch.setattr(V, "load_intckpt", lambda *a: pytest.fail("the IntCheckpoint was read before --report"))
    report = tmp_path / "report.txt"
    report.write_text("keep me")
    assert main(["verify", str(art["q4_0"]), "--gguf", str(art["gguf"]), "--eval-data", "pydoc",
                 "--report", str(report)]) == 2
    assert "expected a directory (or a new path), got an existing file" in capsys.readouterr().err
    assert report.read_text() == "keep me"


def test_a_truncated_gguf_model_leaves_no_cache_directory(art, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LRQAT_CACHE", str(cache))
    g = tmp_path / "t.gguf"
    g.write_bytes(art["gguf"].read_bytes()[: art["gguf"].stat().st_size // 3])
    assert main(["ptq", "--model", str(g), "--out", str(tmp_path / "out")]) == 2
    assert "expected a complete GGUF file that transformers can load" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


@pytest.mark.parametrize("exc, status, needle", [
    (KeyboardInterrupt(), 130, "lrqat ptq: interrupted: stopped by Ctrl-C; nothing partial was published"),
    (TypeError("a bug\nover two lines"), 1, "lrqat ptq: internal error: TypeError: a bug over two lines; this is a "
                                            "bug in lrqat, not in your input: rerun with -v"),
    (FileNotFoundError(2, "No such file or directory", "/x/y"), 2, "lrqat ptq: error: /x/y: expected a usable file"),
])
def test_the_cli_guard_prints_one_line_per_failure(art, tmp_path, capsys, monkeypatch, exc, status, needle):
    from lrqat_export.app import verbs

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(verbs, "load_model", boom)
    assert main(["ptq", "--model", str(art["model"]), "--out", str(tmp_path / "out")]) == status
    err = capsys.readouterr().err
    assert err.startswith(needle) and err.count("\n") == 1 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # claim, lock and parents all gone


def test_a_real_bug_keeps_its_traceback_under_verbose(art, tmp_path, monkeypatch):
    from lrqat_export.app import verbs

    monkeypatch.setattr(verbs, "load_model", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["-v", "ptq", "--model", str(art["model"]), "--out", str(tmp_path / "out")])


def test_ctrl_c_during_training_exits_130_with_one_line_and_nothing_partial(art, tmp_path):
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lrqat_export.cli", "train", "--model", str(art["model"]), "--out",
                             str(out), "--steps", "400", "--seq-len", "32", "--max-train-windows", "4",
                             "--batch-size", "2", "--objective", "ce"], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                            # a suite started in the background (`pytest &`) runs with SIGINT ignored, and the child
                            # would inherit that (Python then installs no KeyboardInterrupt): give it a terminal's
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (out / "train_state" / "latest.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # the first checkpoint (step 50) is written: the run is deep in training
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert err.count("lrqat train: ") == 1 and "lrqat train: interrupted: stopped by Ctrl-C" in err, err  # after \r
    assert "Traceback" not in err
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", "-lock")) or ".old-" in p.name]
    assert leftovers == [] and not (out / "lrqat_manifest.json").exists()  # no half-published IntCheckpoint
