"""Other projects' output, kept out of the user's terminal unless they ask for it (`lrqat -v`).

By default the tool's own lines, its progress bars and its summary are all a user sees: third-party loggers
(transformers, torch, torchao, GPTQModel's LogBar) are raised to ERROR, transformers' progress bars and advisory
warnings are off, known deprecation warnings from other packages are ignored, and GPTQModel's import-time banner is
written to a log file (or dropped) instead of the terminal. `setup(verbose=True)` leaves everything as the libraries
set it. A log file given to `setup` receives every record at INFO and above, ours and theirs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Iterator

OURS = ("lrqat_export", "converters")
THIRD_PARTY = ("transformers", "torch", "torchao", "gptqmodel", "logbar", "accelerate", "optimum", "huggingface_hub",
               "safetensors", "urllib3", "filelock", "datasets", "tokenizers", "gguf", "llama_cpp", "numexpr")
# what `lrqat run` may write on stderr without -v: blank lines, our progress bars (tqdm, redrawn with \r) and our
# own error lines (tests/test_quiet.py, scripts/bench_first_run.py)
OURS_STDERR = re.compile(r"^\s*$|^(ppl \((torch|GPTQ loader|llama\.cpp)\)|LR-QAT|teacher pre-pass|lrqat \w+: )")
_state: dict = {"verbose": True, "log": None, "handlers": []}  # library use (no setup call): everything as is


class _OursOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OURS or record.levelno >= logging.ERROR


def foreign_stderr(text: str) -> list[str]:
    """The pieces of a captured stderr (split at newlines and at tqdm's carriage returns) that are not ours
    (OURS_STDERR): other projects' output that reached the terminal."""
    return [frag for line in text.split("\n") for frag in line.split("\r") if not OURS_STDERR.match(frag)]


def setup(verbose: bool = False, log_file: str | os.PathLike | None = None) -> None:
    """Configure logging and warnings for a command line run (see the module docstring)."""
    _state["verbose"] = verbose
    root = logging.getLogger()
    root.setLevel(logging.INFO if verbose or log_file else logging.WARNING)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        console.addFilter(_OursOnly())
    for h in _state["handlers"]:  # ours from an earlier setup in this process; other handlers (pytest's) stay
        root.removeHandler(h)
        h.close()
    root.addHandler(console)
    _state["handlers"], _state["log"] = [console], None
    if log_file is not None:
        add_log_file(log_file)
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|torchao|gptqmodel|"
                                                                     r"accelerate|optimum|logbar|gguf)(\.|$)")
    with contextlib.suppress(ImportError):
        import torch._logging

        torch._logging.set_logs(all=logging.ERROR)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def add_log_file(path: str | os.PathLike) -> logging.Handler:
    """Every record at INFO and above, ours and theirs, also goes to `path` (appended); captured_fds writes there
    too. Returns the handler (remove_log_file undoes it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(path, encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    h.setLevel(logging.INFO)
    logging.getLogger().addHandler(h)
    logging.getLogger().setLevel(logging.INFO)
    _state["handlers"].append(h)
    _state["log"] = str(path)
    return h


def remove_log_file(h: logging.Handler) -> None:
    logging.getLogger().removeHandler(h)
    h.close()
    if h in _state["handlers"]:
        _state["handlers"].remove(h)
    if _state["log"] == getattr(h, "baseFilename", None):
        _state["log"] = None


@contextlib.contextmanager
def log_file(path: str | os.PathLike) -> Iterator[None]:
    """add_log_file for the duration of a block."""
    h = add_log_file(path)
    try:
        yield
    finally:
        remove_log_file(h)


@contextlib.contextmanager
def captured_fds() -> Iterator[None]:
    """Route the process's stdout and stderr (file descriptors 1 and 2, so C code and direct prints too) to the log
    file, or nowhere, for the duration — unless verbose. For third-party code that prints at import or load."""
    if _state["verbose"]:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    target = open(_state["log"] or os.devnull, "ab")
    saved = os.dup(1), os.dup(2)
    try:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        target.close()


def import_gptqmodel():
    """`import gptqmodel` with its banner and import-time notices kept out of the terminal (captured_fds), then its
    LogBar logger held at ERROR unless verbose (it resets its own level when created)."""
    with captured_fds():
        import gptqmodel
    if not _state["verbose"]:
        logging.getLogger("logbar").setLevel(logging.ERROR)
    return gptqmodel
