"""Atomic writes: every file and directory the tool produces appears whole or not at all.

A file is written to a temporary sibling and renamed over the target; a directory is built as a temporary sibling
and renamed into place (the previous one, if overwriting, is removed only after the new one is complete).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to (nothing is written either way)."""
    if path.exists() and not overwrite:
        raise UserError(f"output {path}: already exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise UserError(f"output {path}: parent directory {path.parent} does not exist")


def check_run_output(path: Path, overwrite: bool, hint: str = "") -> None:
    """A run directory (it gathers several artefacts) may exist only if empty, unless overwriting."""
    if path.exists() and not overwrite and any(path.iterdir()):
        raise UserError(f"output {path}: already exists and is not empty; pass --overwrite{hint}")
    if not path.parent.exists():
        raise UserError(f"output {path}: parent directory {path.parent} does not exist")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; published files get the usual mode
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory next to `path`; on success it replaces `path`."""
    path = Path(path)
    check_output_path(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: expected valid JSON, got a parse error ({e})") from None
