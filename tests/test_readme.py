"""README's two set-up commands are what CI runs: the main job (stage 0 of .ci/run, with a short budget appended)
and the test suite (stage 1)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up: two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def ci_commands() -> list[str]:
    lines, cmd = [], ""
    for raw in (ROOT / ".ci" / "run").read_text().splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        cmd += line.rstrip("\\").strip() + " " if line else ""
        if line and not line.endswith("\\"):
            lines.append(cmd.strip())
            cmd = ""
    return lines


def test_readme_has_exactly_two_setup_commands():
    cmds = readme_setup_commands()
    assert len(cmds) == 2, cmds
    assert "lrqat run" in cmds[0] and cmds[1] == "bash scripts/test.sh"


def test_ci_runs_the_readme_main_job_then_the_readme_test_command():
    main_job, tests = readme_setup_commands()
    ci = ci_commands()
    runs = [c for c in ci if c.startswith(main_job)]
    assert runs, f"CI does not run the README's main-job command {main_job!r}; CI runs {ci}"
    extra = shlex.split(runs[0][len(main_job):].split("||", 1)[0])
    allowed = {"--steps", "--max-train-windows", "--eval-windows", "--eval-seq-len", "--seq-len"}
    options = [a for a in extra if a.startswith("--")]
    assert set(options) <= allowed, f"CI adds more than a shorter budget to the README command: {extra}"
    assert tests in ci, f"CI does not run the README's test command {tests!r}"
    assert ci.index(runs[0]) < ci.index(tests)
