"""The wheel a user installs holds the whole library: every module of every subpackage and the native kernel's C
source (methods/fused_native.c, compiled on first use). An editable install (scripts/install.sh) reads the tree
and would not notice a package list that leaves subpackages out."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module_and_the_native_source(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("lrqat_export", "converters"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("lrqat_export-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {p.relative_to(ROOT).as_posix() for pkg in ("lrqat_export", "converters")
            for p in (ROOT / pkg).rglob("*.py")} | {"lrqat_export/methods/fused_native.c"}
    assert not want - names, f"missing from the wheel: {sorted(want - names)}"
