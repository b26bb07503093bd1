"""Never lose the user's data (issue 15): a resume never deletes a complete checkpoint (class 4) and two writers to
one output never both succeed (class 5). Each test checks the bytes of what must survive before and after."""
from __future__ import annotations

import hashlib
import json
import shutil
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
