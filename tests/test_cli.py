"""The `lrqat` command line on a tiny model: each verb works, bad input exits 2 with a clear message and no output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrqat_export.app.cli import main
from lrqat_export.core.intckpt import load_intckpt


def test_ptq_inspect_and_eval(tiny_llama, tmp_path, capsys):
    out = tmp_path / "rtn"
    assert main(["ptq", "--model", str(tiny_llama), "--preset", "q4_1", "--out", str(out)]) == 0
    assert load_intckpt(out).manifest["method"] == "rtn"
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "q4_1: bits 4, group_size 32, asymmetric" in text and "model.layers.1.mlp.down_proj" in text
    assert main(["eval", str(out), "--eval-data", "pydoc", "--eval-seq-len", "64", "--eval-windows", "2"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["runtime"] == "torch" and r["kind"] == "intckpt" and r["tokens"] == 2 * 63 and r["ppl"] > 1


def test_run_main_job_end_to_end(tiny_llama, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--model", str(tiny_llama), "--out", str(out), "--preset", "q4_0", "--steps", "3",
               "--seq-len", "32", "--max-train-windows", "16", "--eval-seq-len", "64", "--eval-windows", "2",
               "--rank", "4"])
    rep = json.loads((out / "report.json").read_text())
    assert rc == (0 if rep["parity"]["passed"] else 1)  # exit status follows the parity verdict
    assert set(rep["ppl"]) >= {"fp", "rtn", "lrqat_torch"}
    assert rep["fuse_max_abs_logit_diff"] == 0.0
    assert {"lrqat_gguf", "lrqat_gptq"} <= set(rep["ppl"])  # real llama.cpp and transformers + GPTQModel
    for rt in ("gguf", "gptq"):
        assert isinstance(rep["parity"][rt]["rel_gap"], float) and rep["parity"][rt]["weights_ok"] is True
        assert Path(rep["artifacts"][rt]).exists()
    assert isinstance(rep["parity"]["passed"], bool)
    assert (out / "parity" / "parity.md").is_file()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| LR-QAT, GGUF in llama.cpp |" in md and "| gptq |" in md
    ck = load_intckpt(rep["artifacts"]["intckpt"])
    manifest = ck.manifest
    assert manifest["method"] == "lrqat"
    moved = rep["adapters"]  # what the adapters did, as the fused manifest counts it
    assert moved == manifest["adapters"] and 0 <= moved["codes_moved"] <= moved["codes"]
    assert moved["codes"] == sum(q.codes.numel() for q in ck.layers.values())
    assert f"{moved['codes_moved']:,} of {moved['codes']:,}" in md
    assert main(["inspect", rep["artifacts"]["intckpt"]]) == 0
    assert f"adapters      codes the adapters moved from the start: {moved['codes_moved']:,} of" in capsys.readouterr().out
    assert load_intckpt(rep["artifacts"]["rtn_intckpt"]).manifest["method"] == "rtn"


@pytest.mark.parametrize("argv, needle", [
    (["train", "--preset", "q4_k_xl"], "--preset: expected one of"),
    (["train", "--preset", "q4_k"], "in_features 64 is not a multiple of 256, the super-block of q4_k"),
    (["train", "--method", "peqa", "--preset", "q4_k_m"], "GGUF K grids and per-layer plans are trained by lrqat, rtn"),
    (["ptq", "--method", "gptq", "--preset", "q6_k"], "GGUF K grids and per-layer plans are trained by lrqat, rtn"),
    (["train", "--group-size", "48"], "in_features 64 is not divisible by group_size 48"),
    (["train", "--bits", "9"], "bits: expected an integer in 2..8, got 9"),
    (["train", "--train-data", "/nonexistent.txt"], "data file /nonexistent.txt: not found"),
    (["train", "--seq-len", "100000000"], "expected at least one window of 100000000 tokens"),
    (["train", "--phi", "int4", "--preset", "q8_0"], "needs bits <= 4, got bits 8"),
    (["ptq", "--method", "awq"], "--method: expected one of ('rtn', 'gptq'), got 'awq'"),
])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tiny_llama, tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    rc = main([argv[0], "--model", str(tiny_llama), "--out", str(out), *argv[1:]])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not out.exists() or not any(p.name.endswith(("manifest.json", ".safetensors")) for p in out.rglob("*"))


def test_empty_data_file_and_existing_output_are_refused(tiny_llama, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["train", "--model", str(tiny_llama), "--out", str(tmp_path / "o"), "--train-data", str(empty)]) == 2
    assert "expected text, got an empty file" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert main(["ptq", "--model", str(tiny_llama), "--out", str(taken)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_missing_parent_directories_of_an_output_are_created(tiny_llama, tmp_path, capsys):
    """`--out runs/x` on a fresh clone works (runs/ does not exist yet); an ancestor that is a file is refused."""
    deep = tmp_path / "runs" / "a" / "rtn"
    assert main(["ptq", "--model", str(tiny_llama), "--preset", "q4_0", "--range-method", "minmax",
                 "--out", str(deep)]) == 0
    assert load_intckpt(deep).manifest["method"] == "rtn"
    gguf = tmp_path / "exports" / "x" / "m.gguf"
    assert main(["export", "gguf", str(deep), "--out", str(gguf)]) == 0 and gguf.is_file()
    (tmp_path / "file").write_text("x")
    assert main(["export", "gptq", str(deep), "--out", str(tmp_path / "file" / "sub" / "gptq")]) == 2
    err = capsys.readouterr().err
    assert "expected" in err and "to be a directory, got a file" in err, err


def test_a_failed_write_removes_the_parents_it_created(tmp_path):
    from lrqat_export.core.fsio import atomic_dir, atomic_file

    target = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target):
            raise RuntimeError("interrupted")
    assert not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "new2" / "f.json", "w") as f:
            f.write("{")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "new2").exists()


def test_imatrix_range_search_in_ptq_and_as_a_training_start(tiny_llama, tmp_path, capsys):
    """--range-method imatrix: `ptq` calibrates RTN's scale search on its calibration windows; `train` starts from
    the RTN found on the first training windows (PEQA keeps the start's codes, so they must be that RTN's)."""
    import torch

    common = ["--model", str(tiny_llama), "--preset", "q4_0"]
    windows = ["--calib-data", "pydoc", "--calib-windows", "8", "--calib-seq-len", "32"]
    assert main(["ptq", *common, "--range-method", "imatrix", *windows, "--out", str(tmp_path / "imx")]) == 0
    assert main(["ptq", *common, "--out", str(tmp_path / "lp")]) == 0
    imx, lp = load_intckpt(tmp_path / "imx"), load_intckpt(tmp_path / "lp")
    assert imx.manifest["range_method"] == "imatrix" and lp.manifest["range_method"] == "lp"
    assert any(not torch.equal(imx.layers[n].codes, q.codes) for n, q in lp.layers.items())
    train = ["train", *common, "--method", "peqa", "--steps", "1", "--train-data", "pydoc", "--seq-len", "32",
             "--max-train-windows", "8"]
    assert main([*train, "--range-method", "imatrix", "--out", str(tmp_path / "peqa")]) == 0
    peqa = load_intckpt(tmp_path / "peqa")
    assert all(torch.equal(peqa.layers[n].codes, q.codes) for n, q in imx.layers.items())
    assert main([*train, "--method", "qlora", "--range-method", "imatrix", "--out", str(tmp_path / "q")]) == 2
    assert "--range-method imatrix: method qlora does not start from a range-searched" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
