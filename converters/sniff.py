"""What kind of artefact a path is, decided in one place for every verb (eval, inspect, verify)."""
from __future__ import annotations

from pathlib import Path

from lrqat_export.core.intckpt import is_intckpt

from .gptq import QUANTIZE_CONFIG

KINDS = ("gguf", "gptq", "intckpt", "float")


def artifact_kind(target: str | Path, runtime: str = "auto") -> str:
    """'gguf' (a .gguf file, run by llama.cpp), 'gptq' (a directory with quantize_config.json), 'intckpt' (a
    directory with an IntCheckpoint manifest) or 'float' (anything else: a float model for torch).
    runtime "torch": a .gguf or GPTQ path is read as a float model, so only 'intckpt' or 'float' come back."""
    p = Path(target)
    if runtime == "torch":
        return "intckpt" if is_intckpt(p) else "float"
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir() and (p / QUANTIZE_CONFIG).is_file():
        return "gptq"
    return "intckpt" if is_intckpt(p) else "float"
