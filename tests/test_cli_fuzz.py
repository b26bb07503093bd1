"""CLI fuzz (issue 15, hypothesis): any value of a numeric option is accepted inside its documented range or refused
where it is parsed (exit 2, one line naming the option and the value); any shape of output path — new, nested,
existing file or directory, under a file, a symlink (to a file, a directory, nothing, the input), the input itself,
inside or around it — ends in exit 0 with a whole output or exit 2 with one line and nothing written, never a
traceback, a leftover temp or lock, or a changed input."""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrqat_export.app.cli import build_parser, main

FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=300,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PATHS = settings(FUZZ, max_examples=80)  # each example runs a real export (60 combinations)

INF = math.inf
# option: (verb argv, integer?, low, high, low open, high open, extra allowed values) — the documented ranges
OPTIONS = {
    "--seq-len": (["train"], True, 2, INF, False, False, ()),
    "--max-train-windows": (["train"], True, 1, INF, False, False, ()),
    "--steps": (["train"], True, 1, INF, False, False, ()),
    "--rank": (["train"], True, 1, INF, False, False, ()),
    "--batch-size": (["train"], True, 1, INF, False, False, ()),
    "--ckpt-every": (["train"], True, 0, INF, False, False, ()),
    "--bits": (["ptq"], True, 2, 8, False, False, ()),
    "--group-size": (["ptq"], True, 2, INF, False, False, (-1,)),
    "--calib-windows": (["ptq"], True, 1, INF, False, False, ()),
    "--eval-seq-len": (["eval", "x"], True, 2, INF, False, False, ()),
    "--eval-windows": (["eval", "x"], True, 1, INF, False, False, ()),
    "--alpha": (["train"], False, 0, INF, True, False, ()),
    "--lr-ab": (["train"], False, 0, INF, False, False, ()),
    "--warmup": (["train"], False, 0, 1, False, True, ()),
    "--ce-weight": (["train"], False, 0, 1, False, False, ()),
    "--kd-temperature": (["train"], False, 0, INF, True, False, ()),
    "--max-gap-gguf": (["verify", "x"], False, 0, INF, False, False, ()),
}

values = st.one_of(st.integers(-10, 10), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from(["", " 3 ", "1e3", "0x10", "1_000", "nan", "-inf", "four", "½", "3.0", "--"]),
                   st.text(max_size=6)).map(lambda v: v if isinstance(v, str) else repr(v))


def _in_range(opt: str, text: str) -> bool:
    _, integer, lo, hi, lo_open, hi_open, also = OPTIONS[opt]
    try:
        v = int(text) if integer else float(text)
    except ValueError:
        return False
    if integer and v in also:
        return True
    return (math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))


@FUZZ
@given(st.sampled_from(sorted(OPTIONS)), values)
def test_an_option_value_is_accepted_in_its_range_or_refused_in_one_line(capsys, opt, text):
    verb = OPTIONS[opt][0]
    argv = [*verb, "--out", "o", f"{opt}={text}"] if verb[0] != "eval" else [*verb, f"{opt}={text}"]
    if verb[0] == "verify":
        argv = [*verb, f"{opt}={text}"]
    try:
        args, rc = build_parser().parse_args(argv), 0
    except SystemExit as e:
        args, rc = None, e.code
    err = capsys.readouterr().err
    if _in_range(opt, text):
        assert rc == 0, err
        dest = opt.lstrip("-").replace("-", "_")
        assert getattr(args, dest) == (int(text) if OPTIONS[opt][1] else float(text))
    else:
        assert rc == 2, (opt, text)
        assert err.count("\n") == 1 and err.startswith("lrqat") and f": error: argument {opt}" in err, err


# --- output-path shapes --------------------------------------------------------------------------------------------
SHAPES = ["new", "nested-new", "dot-segments", "existing-file", "existing-dir", "empty-dir", "under-a-file",
          "symlink-to-file", "symlink-to-dir", "dangling-symlink", "the-input", "inside-the-input",
          "around-the-input", "symlink-to-the-input", "in-a-symlinked-dir"]


def _out_path(box: Path, shape: str) -> Path:
    """Lay out `box` for one path shape and return the --out path to try."""
    (box / "f.txt").write_text("a file of the user's")
    (box / "d").mkdir()
    (box / "d" / "keep.txt").write_text("the user's directory")
    (box / "empty").mkdir()
    (box / "link-file").symlink_to(box / "f.txt")
    (box / "link-dir").symlink_to(box / "d", target_is_directory=True)
    (box / "link-none").symlink_to(box / "nowhere")
    (box / "link-ck").symlink_to(box / "ck", target_is_directory=True)
    return {"new": box / "out", "nested-new": box / "a" / "b" / "out", "dot-segments": box / "a" / ".." / "out",
            "existing-file": box / "f.txt", "existing-dir": box / "d", "empty-dir": box / "empty",
            "under-a-file": box / "f.txt" / "out", "symlink-to-file": box / "link-file",
            "symlink-to-dir": box / "link-dir", "dangling-symlink": box / "link-none", "the-input": box / "ck",
            "inside-the-input": box / "ck" / "out", "around-the-input": box,
            "symlink-to-the-input": box / "link-ck", "in-a-symlinked-dir": box / "link-dir" / "out"}[shape]


def _tree(root: Path) -> dict[str, str]:
    """Every entry under `root` (symlinks not followed): file hashes, link targets, directories."""
    out = {}
    for p in sorted(root.rglob("*")):
        k = str(p.relative_to(root))
        out[k] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                  else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@PATHS
@given(st.sampled_from(["gguf", "gptq"]), st.sampled_from(SHAPES), st.booleans())
def test_any_output_path_ends_whole_or_refused_in_one_line_and_never_costs_an_input(ck, capsys, fmt, shape,
                                                                                   overwrite):
    box = Path(tempfile.mkdtemp(prefix="cli-fuzz-"))
    try:
        shutil.copytree(ck, box / "ck")
        out = _out_path(box, shape)
        existed = os.path.lexists(out)
        before = _tree(box)
        capsys.readouterr()
        rc = main(["export", fmt, str(box / "ck"), "--out", str(out), *(["--overwrite"] if overwrite else [])])
        err = capsys.readouterr().err
        after = _tree(box)
        assert rc in (0, 2), (rc, err)
        assert {k: v for k, v in after.items() if k.startswith("ck/") or k == "ck"} == \
               {k: v for k, v in before.items() if k.startswith("ck/") or k == "ck"}  # the input, byte for byte
        assert not [k for k in after if k.endswith((".tmp", ".lrqat-lock")) or ".old-" in k], after
        if rc == 2:
            assert err.count("\n") == 1 and err.startswith("lrqat export: error: ") and "Traceback" not in err, err
            assert after == before  # nothing written
        else:
            assert overwrite or not existed, (shape, "replaced without --overwrite")
            assert not out.is_symlink()
            assert out.read_bytes()[:4] == b"GGUF" if fmt == "gguf" else (out / "config.json").is_file()
            untouched = {k: v for k, v in before.items()
                         if not (box / k).resolve().is_relative_to(out.resolve()) and (box / k) != out}
            assert {k: after.get(k) for k in untouched} == untouched  # nothing beside the output changed
    finally:
        shutil.rmtree(box, ignore_errors=True)
