"""Atomic writes: every file and directory the tool produces appears whole or not at all.

Missing parent directories of an output are created when it is written (and removed again if the write fails).
A file is written to a temporary sibling and renamed over the target; a directory is built as a temporary sibling
and renamed into place (the previous one, if overwriting, is swapped out atomically with renameat2 where Linux
offers it, and removed only after the new one is in place). A failed write (disk full included) removes the
temporary and leaves the previous file or directory as it was. Published files get the umask's permissions
(0666 & ~umask), whatever mode the library that wrote them chose.

Racing writers: a verb holds `claim_output(out)` (an flock'd lock file beside OUT) from its output checks to the
publish, so a second writer of the same output is refused at once; and a publish without overwrite never replaces
what appeared at OUT meanwhile (renameat2 RENAME_NOREPLACE, or link() for a file).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
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
    but is not a directory can never hold it. A ".." after a missing directory is refused: that directory would be
    created only to be climbed out of, and removed again, leaving the output unreachable by the path given."""
    parts = Path(path).absolute().parts
    for i, part in enumerate(parts):
        if part == ".." and not Path(*parts[:i]).exists():
            raise UserError(f"output {path}: expected '..' only after existing directories, got it after "
                            f"{Path(*parts[:i])}, which does not exist")
    for anc in Path(path).absolute().parents:
        if anc.exists():
            if not anc.is_dir():
                raise UserError(f"output {path}: expected {anc} to be a directory, got a file")
            return


def check_output_path(path: Path, overwrite: bool, is_file: bool | None = None) -> None:
    """Refuse to replace an existing output unless asked to (nothing is written either way). A symlink at `path`
    counts as existing, dangling or not. is_file: the output is a file (an existing directory there is refused even
    with overwrite) or a directory (None: either)."""
    path = Path(path)
    if os.path.lexists(path) and not overwrite:
        link = f" (a symlink to {os.readlink(path)}; --overwrite replaces the link, not its target)" \
            if path.is_symlink() else ""
        raise UserError(f"output {path}: already exists; pass --overwrite to replace it{link}")
    if is_file and path.is_dir():
        raise UserError(f"output {path}: expected a file path, got an existing directory")
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
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A temporary sibling path for writers that open files themselves (gguf-py, safetensors); it replaces
    `path` on success (without overwrite: only while `path` is still absent) and is removed on any failure."""
    path = Path(path)
    created = make_parents(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        publish(Path(tmp), path, overwrite)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        remove_dirs(created)
        _reraise_write_error(e, path)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", overwrite: bool = True) -> Iterator[Any]:
    """An open file object on a temporary sibling of `path`, flushed to disk and renamed over `path` on success."""
    with atomic_path(path, overwrite) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def umask_modes(root: Path) -> None:
    """Give every file under `root` the umask's permissions: writers such as safetensors create theirs 0600."""
    mode = 0o666 & ~_umask()
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory next to `path`; on success it replaces `path` (without overwrite: only while
    `path` is still absent)."""
    path = Path(path)
    check_output_path(path, overwrite)
    created = make_parents(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        umask_modes(tmp)
        publish(tmp, path, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_dirs(created)
        _reraise_write_error(e, path)
        raise


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished temporary `tmp` (file or directory) to `path`. With overwrite it replaces whatever is
    there (a directory through an atomic exchange); without, the rename itself refuses an existing `path`, so an
    output another process published meanwhile is never replaced (no check-then-rename window)."""
    if overwrite:
        if os.path.lexists(path) and (tmp.is_dir() or (path.is_dir() and not path.is_symlink())):
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
        return
    try:
        if not _rename2(tmp, path, _RENAME_NOREPLACE):
            _publish_noreplace_fallback(tmp, path)
    except FileExistsError:
        raise UserError(f"output {path}: expected it absent until published, got one another process wrote "
                        f"meanwhile; nothing was published (pass --overwrite to replace it)") from None


def _publish_noreplace_fallback(tmp: Path, path: Path) -> None:
    """Where renameat2 is missing: link() refuses an existing name atomically for a file; a directory keeps a short
    check-then-rename window (claim_output still keeps writers of this tool apart)."""
    if tmp.is_dir():
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists", str(path))
        os.rename(tmp, path)
        return
    os.link(tmp, path)
    os.unlink(tmp)


# --- claiming an output: one writer at a time ---------------------------------------------------------------------
_CLAIMED: set[Path] = set()  # outputs this process holds (a nested claim of the same output is a no-op)


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lrqat-lock"


def _take_lock(path: Path) -> int:
    """flock the lock file beside `path` without waiting; a held lock is a UserError naming its holder. The lock is
    released by the kernel when its holder dies (kill -9 included), so a stale lock never blocks a later writer."""
    lock = _lock_path(path)
    for _ in range(50):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"output {path}: expected no other writer, got process {holder} writing it now (lock "
                            f"{lock}); wait for it to finish or choose another output") from None
        try:  # the previous holder may have removed the file between our open and flock: lock the current one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise UserError(f"output {path}: could not take the lock {lock}; expected it stable, got it replaced 50 times")


@contextlib.contextmanager
def claim_output(path: str | os.PathLike) -> Iterator[Path]:
    """The exclusive right to write `path` while the block runs: a second process claiming the same output (any
    verb of this tool, with or without --overwrite) gets a UserError at once. Check the output's existence inside
    the block, so no other writer can publish between that check and this one's publish. Missing parent
    directories are created, and removed again when the block leaves them empty."""
    path = Path(path)
    key = path.resolve()
    if key in _CLAIMED:
        yield path
        return
    _check_parent(path)
    created = make_parents(path)
    fd = None
    try:
        fd = _take_lock(path)
        _CLAIMED.add(key)
        yield path
    finally:
        if fd is not None:
            _CLAIMED.discard(key)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_lock_path(path))
            os.close(fd)
        remove_dirs(created)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100


def _rename2(a: Path, b: Path, flags: int) -> bool:
    """renameat2(a, b, flags) (Linux ≥ 3.15, glibc ≥ 2.28). False where the system or file system cannot (the
    caller falls back); FileExistsError for RENAME_NOREPLACE onto an existing name."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(b))
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the system cannot."""
    return _rename2(a, b, _RENAME_EXCHANGE)


def _remove(p: Path) -> None:
    """Remove whatever `p` names (a directory tree, a file or a symlink, never a link's target)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def replace_dir(new: Path, path: Path) -> None:
    """Put directory `new` in the place of the existing `path` (a directory, or a file or symlink being replaced by
    a directory). With an atomic exchange there is no instant at which `path` is missing or partial: a kill leaves
    either the old or the new one there. The old one is removed whatever its type (no temp is left holding it)."""
    if _exchange(new, path):
        _remove(new)  # `new` now names the old one
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(new, path)
    _remove(old)


def missing_file(path: str | os.PathLike) -> str:
    """Why `path` is not a readable file, for a message: "not found" only when nothing is there."""
    return _missing(Path(path), "file")


def missing_dir(path: str | os.PathLike) -> str:
    """Why `path` is not a directory, for a message: "not found" only when nothing is there."""
    return _missing(Path(path), "directory")


def _missing(p: Path, want: str) -> str:
    if not os.path.lexists(p):
        return "not found"
    if not p.exists():
        return f"expected a {want}, got a dangling symlink to {os.readlink(p)}"
    return f"expected a {want}, got {'a directory' if p.is_dir() else 'a file' if p.is_file() else 'a special file'}"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: {missing_file(path)}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: expected valid JSON, got a parse error ({e})") from None
