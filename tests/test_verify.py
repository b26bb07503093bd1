"""`lrqat verify` on a tiny model: real llama.cpp and real transformers + GPTQModel; a corrupted export fails."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrqat_export.app.cli import main
from lrqat_export.methods.rtn import ptq_rtn
from lrqat_export.core.intckpt import write_intckpt
from lrqat_export.core.quant import PRESETS

pytestmark = [pytest.mark.llamacpp, pytest.mark.gptq_loader]
EVAL = ["--eval-data", "pydoc", "--eval-seq-len", "64", "--eval-windows", "2"]


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    ck = write_intckpt(d / "ck", ptq_rtn(AutoModelForCausalLM.from_pretrained(tiny_llama), PRESETS["q4_0"], {}),
                       AutoTokenizer.from_pretrained(tiny_llama))
    assert main(["export", "gguf", str(ck), "--out", str(d / "m.gguf")]) == 0
    assert main(["export", "gptq", str(ck), "--out", str(d / "gptq")]) == 0
    return d


def test_verify_passes_and_reports_every_runtime(exported, capsys):
    d = exported
    rc = main(["verify", str(d / "ck"), "--gguf", str(d / "m.gguf"), "--gptq", str(d / "gptq"),
               "--report", str(d / "rep"), "--max-gap-gguf", "0.05", "--max-gap-gptq", "0.02", *EVAL])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((d / "rep" / "parity.json").read_text())
    assert rep["parity"]["passed"] is True
    assert rep["weights"]["gguf"]["exact"] and rep["weights"]["gptq"]["exact"]
    assert {"torch", "torch_gguf_ref", "gguf", "gptq"} <= set(rep["ppl"])
    for rt in ("gguf", "gptq"):
        p = rep["parity"][rt]
        assert p["rel_gap"] == pytest.approx((p["runtime_ppl"] - p["reference_ppl"]) / p["reference_ppl"])
    assert "| gguf" in (d / "rep" / "parity.md").read_text()
    assert (d / "rep" / "parity.png").read_bytes()[:4] == b"\x89PNG"


def test_one_flipped_scale_makes_verify_fail_naming_the_runtime(exported, tmp_path, capsys):
    import shutil

    bad = tmp_path / "gptq"
    shutil.copytree(exported / "gptq", bad)
    f = next(bad.glob("*.safetensors"))
    t = load_file(str(f))
    key = "model.layers.0.mlp.down_proj.scales"
    t[key][0, 0] = -t[key][0, 0]  # one flipped scale
    save_file(t, str(f), metadata={"format": "pt"})
    rc = main(["verify", str(exported / "ck"), "--gptq", str(bad), *EVAL])
    err = capsys.readouterr().err
    assert rc == 1
    assert "check failed: gptq: exported weights differ from s·W_int" in err


def test_verify_without_exports_is_bad_input(exported, capsys):
    assert main(["verify", str(exported / "ck"), *EVAL]) == 2
    assert "expected at least one export" in capsys.readouterr().err
