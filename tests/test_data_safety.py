"""Never lose the user's data (issue 15): a resume never deletes a complete checkpoint (class 4) and two writers to
one output never both succeed (class 5). Each test checks the bytes of what must survive before and after."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lrqat_export.app.cli import main
from lrqat_export.train.state import CKPT_DIR, latest_checkpoint


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (or of `root` itself), by relative path."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --- class 4: a corrupted latest.json never costs a checkpoint ------------------------------------------------------
TRAIN = ["--seq-len", "32", "--max-train-windows", "4", "--rank", "2", "--preset", "q4_0", "--batch-size", "2",
         "--steps", "2", "--ckpt-every", "1"]


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory) -> Path:
    """A finished two-step training run: train_state/step-00000002 and latest.json naming it."""
    out = tmp_path_factory.mktemp("state") / "run"
    assert main(["train", "--model", str(tiny_llama), "--out", str(out), *TRAIN]) == 0
    return out


def _resume(tiny_llama, out: Path) -> int:
    return main(["train", "--model", str(tiny_llama), "--out", str(out), "--resume", *TRAIN])


def _saved_history(step_dir: Path) -> list:
    return json.loads((step_dir / "state.json").read_text())["history"]


LATEST_DAMAGE = {
    "garbage-bytes": lambda d: (d / "latest.json").write_bytes(b"\x00\xff{not json"),
    "truncated": lambda d: (d / "latest.json").write_text('{"step": 2, "dir": "step-'),
    "names-a-missing-dir": lambda d: (d / "latest.json").write_text('{"step": 9, "dir": "step-00000009"}'),
    "names-a-path-outside": lambda d: (d / "latest.json").write_text('{"step": 2, "dir": "../../.."}'),
    "wrong-type": lambda d: (d / "latest.json").write_text('["step-00000002"]'),
    "deleted": lambda d: (d / "latest.json").unlink(),
    "is-a-directory": lambda d: ((d / "latest.json").unlink(), (d / "latest.json").mkdir()),
}


@pytest.mark.parametrize("damage", list(LATEST_DAMAGE))
def test_a_damaged_latest_json_resumes_from_the_newest_complete_step_and_keeps_it(run, tiny_llama, tmp_path, damage):
    out = shutil.copytree(run, tmp_path / "run")
    step = out / CKPT_DIR / "step-00000002"
    LATEST_DAMAGE[damage](out / CKPT_DIR)
    before = digest(step)
    assert latest_checkpoint(out) == step
    assert _resume(tiny_llama, out) == 0
    assert digest(step) == before  # the checkpoint is untouched ...
    # ... and the run continued from it: a restart from step 0 would have re-timed every step (tokens_per_s)
    assert json.loads((out / "train_log.json").read_text())["history"] == _saved_history(step)


def test_the_newest_complete_step_wins_over_a_newer_incomplete_one(run, tmp_path):
    out = shutil.copytree(run, tmp_path / "run")
    d = out / CKPT_DIR
    shutil.copytree(d / "step-00000002", d / "step-00000001")
    shutil.copytree(d / "step-00000002", d / "step-00000003")
    (d / "step-00000003" / "optim.pt").unlink()  # newer but incomplete
    (d / "step-00000002" / "state.json").write_text("{")  # newer but unreadable
    (d / "latest.json").write_text("")
    assert latest_checkpoint(out) == d / "step-00000001"


@pytest.mark.parametrize("damage", ["optim-missing", "state-corrupt", "tensors-missing"])
def test_a_resume_with_no_complete_step_refuses_and_deletes_nothing(run, tiny_llama, tmp_path, capsys, damage):
    out = shutil.copytree(run, tmp_path / "run")
    step = out / CKPT_DIR / "step-00000002"
    (out / CKPT_DIR / "latest.json").write_text("garbage")
    {"optim-missing": lambda: (step / "optim.pt").unlink(),
     "state-corrupt": lambda: (step / "state.json").write_text('{"step": "two"'),
     "tensors-missing": lambda: (step / "trainable.safetensors").unlink()}[damage]()
    before = digest(out)
    assert _resume(tiny_llama, out) == 2
    err = capsys.readouterr().err
    assert "expected a complete step-N directory" in err and "step-00000002" in err, err
    assert "refusing to start over" in err and err.count("\n") == 1, err
    assert digest(out) == before


def test_a_resume_of_a_run_killed_before_its_first_checkpoint_still_starts_from_step_0(tmp_path):
    (tmp_path / CKPT_DIR / ".step-00000001.abc.tmp").mkdir(parents=True)  # a killed writer's temp dir
    assert latest_checkpoint(tmp_path) is None


# --- class 5: racing writers: the second one loses, atomically -------------------------------------------------------
@contextlib.contextmanager
def held(out: Path):
    """Another process holding the claim on `out` (core.fsio.claim_output) until the block ends; yields its pid."""
    code = ("import sys; from lrqat_export.core.fsio import claim_output; c = claim_output(sys.argv[1]); "
            "c.__enter__(); print('held', flush=True); sys.stdin.read(); c.__exit__(None, None, None)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def _writers(tiny_llama, ck, tmp):
    """Every verb that writes, each aimed at an output that already holds a good result (argv, out)."""
    return {
        "export-gguf": (["export", "gguf", str(ck), "--out", str(tmp / "m.gguf"), "--overwrite"], tmp / "m.gguf"),
        "export-gptq": (["export", "gptq", str(ck), "--out", str(tmp / "gptq"), "--overwrite"], tmp / "gptq"),
        "ptq": (["ptq", "--model", str(tiny_llama), "--out", str(tmp / "rtn"), "--overwrite"], tmp / "rtn"),
        "train": (["train", "--model", str(tiny_llama), "--out", str(tmp / "run"), "--overwrite", *TRAIN],
                  tmp / "run"),
        "train-resume": (["train", "--model", str(tiny_llama), "--out", str(tmp / "run"), "--resume", *TRAIN],
                         tmp / "run"),
        "run": (["run", "--model", str(tiny_llama), "--out", str(tmp / "job"), "--overwrite", "--steps", "1"],
                tmp / "job"),
        "verify-report": (["verify", str(ck), "--gguf", str(tmp / "m.gguf"), "--eval-data", "pydoc",
                           "--eval-seq-len", "32", "--eval-windows", "1", "--report", str(tmp / "report")],
                          tmp / "report"),
    }


@pytest.mark.parametrize("verb", ["export-gguf", "export-gptq", "ptq", "train", "train-resume", "run",
                                  "verify-report"])
def test_a_second_writer_is_refused_at_once_even_with_overwrite(tiny_llama, ck, run, tmp_path, capsys, verb):
    shutil.copytree(ck, tmp_path / "rtn")
    shutil.copytree(run, tmp_path / "run")
    assert main(["export", "gguf", str(ck), "--out", str(tmp_path / "m.gguf")]) == 0
    assert main(["export", "gptq", str(ck), "--out", str(tmp_path / "gptq")]) == 0
    (tmp_path / "job").mkdir(), (tmp_path / "job" / "report.json").write_text("{}")
    (tmp_path / "report").mkdir(), (tmp_path / "report" / "parity.json").write_text("{}")
    argv, out = _writers(tiny_llama, ck, tmp_path)[verb]
    before = digest(tmp_path)
    capsys.readouterr()
    with held(out) as pid:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"expected no other writer, got process {pid} writing it now" in err and err.count("\n") == 1, err
    assert digest(tmp_path) == before  # the first writer's output and every input: unchanged, nothing added


def test_two_concurrent_exports_one_wins_the_other_exits_2_and_the_file_is_whole(ck, tmp_path):
    alone = tmp_path / "alone.gguf"
    assert main(["export", "gguf", str(ck), "--out", str(alone)]) == 0
    out = tmp_path / "m.gguf"
    cmd = [sys.executable, "-m", "lrqat_export.cli", "export", "gguf", str(ck), "--out", str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [rc for rc, _ in results] == [0, 2], results
    assert "expected no other writer" in results[1][1] or "already exists" in results[1][1], results[1][1]
    assert out.read_bytes() == alone.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.gguf", "m.gguf"]  # no lock, no temp left


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_publish_without_overwrite_never_replaces_what_appeared_meanwhile(tmp_path, kind):
    """The last line of defence, for writers that do not claim: the rename itself refuses an existing name."""
    from lrqat_export.core.errors import UserError
    from lrqat_export.core.fsio import atomic_dir, atomic_file

    out = tmp_path / "out"
    with pytest.raises(UserError, match="expected it absent until published, got one another process wrote"):
        if kind == "file":
            with atomic_file(out, overwrite=False) as f:
                f.write(b"mine")
                out.write_bytes(b"theirs")  # another writer publishes first
        else:
            with atomic_dir(out) as d:
                (d / "f").write_bytes(b"mine")
                out.mkdir()  # an empty directory: a plain rename() would silently replace it
    if kind == "file":
        assert out.read_bytes() == b"theirs"
    else:
        assert out.is_dir() and not any(out.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp left


def test_a_lock_left_by_a_killed_writer_does_not_block_the_next_one(ck, tmp_path):
    out = tmp_path / "m.gguf"
    lock = tmp_path / ".m.gguf.lrqat-lock"
    lock.write_text("999999\n")  # kill -9 leaves the file, but the kernel has released its flock
    assert main(["export", "gguf", str(ck), "--out", str(out)]) == 0
    assert out.is_file() and not lock.exists()
