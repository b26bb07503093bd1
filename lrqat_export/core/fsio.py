"""Atomic writes: every file and directory the tool produces appears whole or not at all.

Missing parent directories of an output are created when it is written (and removed again if the write fails).
A file is written to a temporary sibling and renamed over the target; a directory is built as a temporary sibling
and renamed into place (the previous one, if overwriting, is swapped out atomically with renameat2 where Linux
offers it, and removed only after the new one is in place). A failed write (disk full included) removes the
temporary and leaves the previous file or directory as it was.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import CheckFailed, UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_parent(path: Path) -> None:
    """Missing parent directories are created when the output is written (make_parents); an ancestor that exists
    but is not a directory can never hold it."""
    for anc in Path(path).absolute().parents:
        if anc.exists():
            if not anc.is_dir():
                raise UserError(f"output {path}: expected {anc} to be a directory, got a file")
            return


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to (nothing is written either way)."""
    if path.exists() and not overwrite:
        raise UserError(f"output {path}: already exists; pass --overwrite to replace it")
    _check_parent(path)


def check_run_output(path: Path, overwrite: bool, hint: str = "") -> None:
    """A run directory (it gathers several artefacts) may exist only if empty, unless overwriting."""
    if path.exists() and not overwrite and any(path.iterdir()):
        raise UserError(f"output {path}: already exists and is not empty; pass --overwrite{hint}")
    _check_parent(path)


def check_apart(out: str | os.PathLike, inputs: dict[str, object]) -> None:
    """Refuse an output that is, contains, or lies inside any input (symlinks resolved), --overwrite or not: writing
    it would destroy the input. `inputs` maps what each input is ("--model") to its path, a list of paths or None;
    names that are not paths on disk (the embedded "pydoc", "smollm2-135m") are skipped."""
    o = Path(out).resolve()
    for what, value in inputs.items():
        for p in value if isinstance(value, (list, tuple)) else [value]:
            if p is None or not Path(str(p)).exists():
                continue
            i = Path(str(p)).resolve()
            how = "is" if o == i else "contains" if o in i.parents else "lies inside" if i in o.parents else None
            if how:
                raise UserError(f"output {out}: expected a path apart from every input, got one that {how} {what} "
                                f"{p}; writing it would destroy that input (refused with or without --overwrite)")


def make_parents(path: str | os.PathLike) -> list[Path]:
    """Create the missing parent directories of `path` (umask permissions); returns those created, deepest last,
    so a failed write can remove them again (remove_dirs)."""
    missing = [a for a in Path(path).absolute().parents if not a.exists()][::-1]
    for d in missing:
        d.mkdir(exist_ok=True)
    return missing


def remove_dirs(created: list[Path]) -> None:
    """Remove directories make_parents created, deepest first, where they are still empty."""
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


def write_error(e: BaseException, path: Path) -> OSError | None:
    """The OSError behind a failed write, whichever library reported it: safetensors ("... (os error 28)"), numpy's
    short write (no errno), torch's stream writer. None when `e` is not a write failure."""
    if isinstance(e, OSError) and e.errno is not None:
        return e
    if isinstance(e, (UserError, CheckFailed, KeyboardInterrupt)):
        return None
    msg = str(e)
    m = re.search(r"os error (\d+)", msg)
    if m:
        n = int(m.group(1))
        return OSError(n, os.strerror(n), str(path))
    if isinstance(e, OSError) or "file write failed" in msg:
        return OSError(errno.EIO, f"short write ({msg[:120]}); is the disk full?", str(path))
    return None


def _reraise_write_error(e: BaseException, path: Path) -> None:
    err = write_error(e, path)
    if err is not None and err is not e:
        raise err from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling path for writers that open files themselves (gguf-py, safetensors); it replaces
    `path` on success and is removed on any failure."""
    path = Path(path)
    created = make_parents(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        remove_dirs(created)
        _reraise_write_error(e, path)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """An open file object on a temporary sibling of `path`, flushed to disk and renamed over `path` on success."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory next to `path`; on success it replaces `path`."""
    path = Path(path)
    check_output_path(path, overwrite)
    created = make_parents(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        if path.exists():
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_dirs(created)
        _reraise_write_error(e, path)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) (Linux ≥ 3.15, glibc ≥ 2.28). False where the
    system or file system cannot (then the caller falls back to two renames)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, path: Path) -> None:
    """Put directory `new` in the place of the existing directory `path`. With an atomic exchange there is no
    instant at which `path` is missing or partial: a kill leaves either the old or the new directory there."""
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old directory
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


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
