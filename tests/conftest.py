from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Tiny tied-embedding Llama (GQA: 4 heads, 2 kv heads) with a byte-level BPE tokenizer."""
    return tiny.make_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", tie=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny model per supported architecture (Qwen2 has q/k/v biases; Mistral untied)."""
    root = tmp_path_factory.mktemp("archs")
    return {"llama": tiny.make_model(root / "llama", "llama", tie=True),
            "mistral": tiny.make_model(root / "mistral", "mistral", tie=False, seed=1),
            "qwen2": tiny.make_model(root / "qwen2", "qwen2", tie=True, seed=2)}


@pytest.fixture(scope="session")
def ck(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama as a q4_0 RTN IntCheckpoint (`lrqat ptq`): an input that tests must leave byte for byte as
    it is (they hash it), so one copy serves the whole session."""
    from lrqat_export.app.cli import main

    out = tmp_path_factory.mktemp("ck") / "ck"
    assert main(["ptq", "--model", str(tiny_llama), "--preset", "q4_0", "--range-method", "minmax",
                 "--out", str(out)]) == 0
    return out
