"""An output that is, contains, or lies inside an input is refused before anything is written (exit 2), with or
without --overwrite, and the input's bytes are unchanged afterwards (issue 15, class 1)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lrqat_export.app.cli import main


def _digest(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("case", ["gptq-is-input", "gguf-inside-input", "gptq-contains-input", "gptq-symlink",
                                  "verify-report-inside-input"])
def test_exports_never_overwrite_their_intckpt(ck, tmp_path, capsys, case):
    before = _digest(ck)
    link = tmp_path / "link"
    link.symlink_to(ck, target_is_directory=True)
    argv = {"gptq-is-input": ["export", "gptq", str(ck), "--out", str(ck), "--overwrite"],
            "gguf-inside-input": ["export", "gguf", str(ck), "--out", str(ck / "model.gguf"), "--overwrite"],
            "gptq-contains-input": ["export", "gptq", str(ck), "--out", str(ck.parent), "--overwrite"],
            "gptq-symlink": ["export", "gptq", str(ck), "--out", str(link), "--overwrite"],
            "verify-report-inside-input": ["verify", str(ck), "--gguf", str(ck / "missing.gguf"), "--eval-data", "pydoc",
                                           "--report", str(ck / "parity")]}[case]
    if case == "verify-report-inside-input":  # a real export to verify, written apart
        assert main(["export", "gguf", str(ck), "--out", str(tmp_path / "m.gguf")]) == 0
        argv[3] = str(tmp_path / "m.gguf")
        capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "expected a path apart from every input" in err and err.count("\n") == 1, err
    assert _digest(ck) == before


@pytest.mark.parametrize("verb", ["ptq", "train", "run"])
def test_a_model_is_never_overwritten_by_its_own_output(tiny_llama, tmp_path, capsys, verb):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    before = _digest(model)
    for out in (model, model / "sub", model.parent):
        assert main([verb, "--model", str(model), "--out", str(out), "--overwrite"]) == 2
        assert "expected a path apart from every input" in capsys.readouterr().err
    assert _digest(model) == before
