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
    return p


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
    return p


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


CASES = {
    # train (prepare → train → fuse)
    "train/unsupported-architecture": (_train(model=lambda a, t: _bad_model(a, t / "m", "gpt2")),
                                       "model architecture GPT2LMHeadModel is not supported; supported: "),
    "train/unknown-preset": (_train("--preset", "q4_k"), "--preset: expected one of"),
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
    prepare(model, PRESETS["q4_0"], MethodOptions(rank=2, alpha=1.0))
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
