"""The first run says only what matters: a small `lrqat run` prints our stage lines on stdout and nothing on stderr
but our own progress bars; other projects' banners and logs go to OUT/run.log; `-v` shows everything."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lrqat_export.core.quiet import foreign_stderr

ROOT = Path(__file__).resolve().parent.parent


def _run(tiny_llama, out: Path, *pre: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "HF_HUB_DISABLE"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, "-m", "lrqat_export.cli", *pre, "run", "--model", str(tiny_llama), "--out", str(out),
            "--preset", "q4_0", "--steps", "2", "--seq-len", "32", "--max-train-windows", "8", "--eval-seq-len", "64",
            "--eval-windows", "1", "--rank", "4"]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_foreign_stderr_keeps_only_other_projects_lines():
    bars = "LR-QAT:  10%|█         | 1/10\rLR-QAT:  20%|██        | 2/10\r"
    assert foreign_stderr(bars + "\nteacher pre-pass: 100%\n\n") == []
    assert foreign_stderr(bars + "INFO  GPT-QModel banner\nlrqat run: expected x\n") == ["INFO  GPT-QModel banner"]


def test_a_small_run_prints_only_our_lines(tiny_llama, tmp_path):
    r = _run(tiny_llama, tmp_path / "runs" / "quiet")  # runs/ does not exist: made on the way
    assert r.returncode == 0, r.stderr[-2000:]
    foreign = foreign_stderr(r.stderr)
    assert not foreign, f"stderr lines that are not ours: {foreign[:10]}"
    assert all(line.startswith("[lrqat run] ") for line in r.stdout.splitlines()), r.stdout[:2000]
    log = (tmp_path / "runs" / "quiet" / "run.log").read_text()
    assert "GPT-QModel" in log  # GPTQModel's banner was captured, not lost


def test_verbose_shows_the_other_projects_output(tiny_llama, tmp_path):
    r = _run(tiny_llama, tmp_path / "loud", "-v")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "GPT-QModel" in r.stdout + r.stderr and "INFO" in r.stderr
