"""`lrqat train` under real torchrun (2 CPU processes, gloo, FSDP2, DCP checkpoints) against one plain process.

Claims, each compared with torch.equal on every tensor of the fused IntCheckpoint (codes, fp16 scales, floats):
* 2 ranks == one process taking the same global batch as 2 micro-batches (--grad-accum 2), bit for bit;
* against one process with the whole global batch in one micro-batch the GEMMs sum in another order: ≥ 99.9 %
  identical codes required, the measured fraction and max |Δscale| are printed;
* a 2-rank run killed with SIGKILL after a checkpoint, resumed on 1 rank (torchrun) or by a plain process, ends
  with the same integers as the uninterrupted one-process run; so does a killed plain process resumed on 2 ranks;
* wrong launches exit 2 with a message naming what was expected and what was found, writing nothing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrqat_export.app.cli import main
from lrqat_export.methods import registry
from lrqat_export.train.state import CKPT_DIR

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # The same thread count in every process (torchrun sets 1 for its workers): CPU kernels split work by thread.
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _common(model: Path, steps: int = STEPS) -> list[str]:
    return ["train", "--model", str(model), "--preset", "q4_0", "--rank", "4", "--alpha", "4", "--steps", str(steps),
            "--seq-len", "32", "--max-train-windows", "24", "--batch-size", "4", "--ckpt-every", "1",
            "--lr-ab", "1e-2", "--lr-scale", "1e-3",
            "--ab-init", "lora"]  # the Kaiming start here; the data-aware one has its own test below


def _launch(args: list[str], nproc: int | None) -> subprocess.Popen:
    """nproc None: one plain process; else torchrun with nproc local ranks (c10d rendezvous on a free port)."""
    pre = [] if nproc is None else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                                    "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]
    return subprocess.Popen([sys.executable, *pre, "-m", "lrqat_export.cli", *args], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run(args: list[str], nproc: int | None) -> subprocess.CompletedProcess:
    p = _launch(args, nproc)
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def _assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def single_accum2(tiny_llama, tmp_path_factory) -> Path:
    """The reference: one plain process, global batch 4 as 2 micro-batches of 2 (the 2-rank per-rank slice)."""
    out = tmp_path_factory.mktemp("ref") / "single_accum2"
    r = _run([*_common(tiny_llama), "--grad-accum", "2", "--out", str(out)], None)
    assert r.returncode == 0, r.stderr
    return out


def test_two_ranks_equal_one_process_with_the_same_global_batch(tiny_llama, single_accum2, tmp_path):
    out = tmp_path / "two_ranks"
    r = _run([*_common(tiny_llama), "--out", str(out)], nproc=2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("IntCheckpoint:") == 1  # rank 0 reports, rank 1 stays quiet
    _assert_bit_identical(out, single_accum2)

    manifest = json.loads((out / "lrqat_manifest.json").read_text())
    ref_manifest = json.loads((single_accum2 / "lrqat_manifest.json").read_text())
    assert manifest.keys() == ref_manifest.keys() and manifest["training"]["world_size"] == 2
    assert ref_manifest["training"]["world_size"] == 1
    step_dir = out / CKPT_DIR / f"step-{STEPS:08d}"
    assert {p.name for p in step_dir.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", ".metadata", "state.json"}

    log = json.loads((out / "train_log.json").read_text())
    mem = log["memory_per_rank"]
    per_weight = {"int8": 1, "bf16": 2, "fp32": 4}[registry.default("lrqat", "phi")]  # the default Φ0 storage
    phi0_total = per_weight * sum(t.numel() for k, t in _tensors(out).items() if k.endswith(".codes"))
    assert [m["phi0_bytes"] for m in mem] == [phi0_total // 2] * 2  # Φ0 is sharded, not replicated

    # Against one micro-batch of 4: another GEMM summation order, the last bits of A, B, s may differ.
    one = tmp_path / "single_accum1"
    r = _run([*_common(tiny_llama), "--out", str(one)], None)
    assert r.returncode == 0, r.stderr
    ta, tb = _tensors(out), _tensors(one)
    codes = [k for k in ta if k.endswith(".codes")]
    same = sum(int((ta[k] == tb[k]).sum()) for k in codes)
    total = sum(ta[k].numel() for k in codes)
    dscale = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta if k.endswith(".scales"))
    print(f"2 ranks vs 1 process (1 micro-batch): identical codes {same}/{total} = {same / total:.6f}, "
          f"max |dscale| {dscale:.3g}")
    assert same / total >= 0.999 and dscale <= 1e-3


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively, from /proc (torchrun starts each rank in a session of its own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for c in kids:
            found += [c, *_descendants(c)]
    return found


def _wait_for_step(run: subprocess.Popen, out: Path, step: int) -> None:
    latest = out / CKPT_DIR / "latest.json"
    deadline = time.time() + 600
    while time.time() < deadline and run.poll() is None:
        try:
            if json.loads(latest.read_text())["step"] >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)


@pytest.mark.parametrize("resume_nproc", [1, None], ids=["torchrun-1-rank", "plain-process"])
def test_sigkill_two_ranks_then_resume_on_another_world_size_matches(tiny_llama, single_accum2, tmp_path,
                                                                     resume_nproc):
    """SIGKILL the whole 2-rank job (both ranks and torchrun) once a checkpoint has reached step 3, resume with
    1 rank (--grad-accum 2 keeps the global batch 4), compare with the uninterrupted one-process run."""
    out = tmp_path / "run"
    run = _launch([*_common(tiny_llama), "--out", str(out)], nproc=2)
    _wait_for_step(run, out, 3)
    assert run.poll() is None, "the run finished before it could be killed: " + run.stderr.read().decode()
    ranks = _descendants(run.pid)
    assert len(ranks) >= 2, ranks
    for pid in [*ranks, run.pid]:  # the whole job at once: both ranks, then torchrun's agent
        os.kill(pid, signal.SIGKILL)
    run.communicate()
    killed_at = json.loads((out / CKPT_DIR / "latest.json").read_text())["step"]
    assert 3 <= killed_at < STEPS and not (out / "lrqat_manifest.json").exists()
    state = json.loads((out / CKPT_DIR / f"step-{killed_at:08d}" / "state.json").read_text())
    assert state["format"] == "dcp" and state["world_size"] == 2

    r = _run([*_common(tiny_llama), "--grad-accum", "2", "--out", str(out), "--resume"], resume_nproc)
    assert r.returncode == 0, r.stderr
    _assert_bit_identical(out, single_accum2)
    hist = json.loads((out / "train_log.json").read_text())["history"]
    assert [h["step"] for h in hist] == list(range(1, STEPS + 1))


def test_one_process_checkpoint_resumes_on_two_ranks(tiny_llama, single_accum2, tmp_path):
    """The other way: SIGKILL a plain process (safetensors checkpoint) after step 3, resume it with 2 ranks."""
    out = tmp_path / "run"
    run = _launch([*_common(tiny_llama), "--grad-accum", "2", "--out", str(out)], None)
    _wait_for_step(run, out, 3)
    assert run.poll() is None, "the run finished before it could be killed: " + run.stderr.read().decode()
    run.kill()
    run.communicate()
    killed_at = json.loads((out / CKPT_DIR / "latest.json").read_text())["step"]
    assert 3 <= killed_at < STEPS
    assert (out / CKPT_DIR / f"step-{killed_at:08d}" / "trainable.safetensors").is_file()

    r = _run([*_common(tiny_llama), "--out", str(out), "--resume"], nproc=2)
    assert r.returncode == 0, r.stderr
    _assert_bit_identical(out, single_accum2)


def _torchrun_env(monkeypatch, world: int = 2, **extra: str) -> None:
    for k, v in {"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                 "MASTER_PORT": "29555", **extra}.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("setup, argv, needle", [
    (dict(partial=True), [], "got RANK but not WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
    (dict(), ["--batch-size", "3"], "--batch-size 3 (global): expected a multiple of world_size × grad_accum "
                                    "= 2 × 1 = 2"),
    (dict(), ["--batch-size", "4", "--grad-accum", "4"],
     "expected a multiple of world_size × grad_accum = 2 × 4 = 8"),
    (dict(), ["--dist-backend", "nccl"], "--dist-backend nccl: expected --device cuda"),
    (dict(), ["--device", "cuda"], "--device cuda: expected CUDA GPUs, got none"),
    (dict(plain=True), ["--dist-backend", "gloo"], "--dist-backend gloo: expected a launch by torchrun"),
])
def test_wrong_launch_exits_2_naming_expected_and_actual(tiny_llama, tmp_path, capsys, monkeypatch, setup, argv,
                                                         needle):
    if torch.cuda.is_available() and "--device" in argv:
        pytest.skip("this machine has CUDA")
    if setup.get("partial"):
        monkeypatch.setenv("RANK", "0")
        for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k, raising=False)
    elif setup.get("plain"):
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(k, raising=False)
    else:
        _torchrun_env(monkeypatch)
    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_llama), "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not out.exists()


def test_other_verbs_refuse_a_torchrun_launch(tiny_llama, tmp_path, capsys, monkeypatch):
    _torchrun_env(monkeypatch)
    assert main(["ptq", "--model", str(tiny_llama), "--out", str(tmp_path / "o")]) == 2
    assert "lrqat ptq: expected a single process, got a torchrun launch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("ab_init", [None, "act"], ids=["default-grad", "act"])
def test_the_data_aware_start_under_torchrun_equals_one_process_bit_for_bit(tiny_llama, tmp_path, ab_init):
    """q4_0's default start of B is the loss gradient's row space (`None`: --ab-init unset). Under torchrun each
    rank sketches its slice of the first steps' windows and the ranks' terms are summed in one process's order:
    2 ranks equal one process with --grad-accum 2, bit for bit, and both record the data-aware start."""
    args = [a for a in _common(tiny_llama, steps=4) if a not in ("--ab-init", "lora")]
    args += [] if ab_init is None else ["--ab-init", ab_init]
    two, one = tmp_path / "two_ranks", tmp_path / "one_process"
    r = _run([*args, "--out", str(two)], nproc=2)
    assert r.returncode == 0, r.stderr
    r = _run([*args, "--grad-accum", "2", "--out", str(one)], None)
    assert r.returncode == 0, r.stderr
    _assert_bit_identical(two, one)
    for out in (two, one):
        manifest = json.loads((out / "lrqat_manifest.json").read_text())
        assert manifest["training"]["lrqat"]["ab_init"] == (ab_init or "grad")
    # and the start moved the training: the Kaiming start gives other integers or scales
    r = _run([*args, "--ab-init", "lora", "--grad-accum", "2", "--out", str(tmp_path / "kaiming")], None)
    assert r.returncode == 0, r.stderr
    ta, tk = _tensors(one), _tensors(tmp_path / "kaiming")
    assert any(not torch.equal(ta[k], tk[k]) for k in ta)
