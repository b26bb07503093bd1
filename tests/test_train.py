"""Training loop: optimizer/schedule as specified, learning happens, exact resume (in process and after SIGKILL)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lrqat_export.core.data import text_windows
from lrqat_export.core.errors import UserError
from lrqat_export.core.models import load_tokenizer
from lrqat_export.methods.lrqat import prepare
from lrqat_export.methods.common import MethodOptions
from lrqat_export.methods.common import trainable_parameters
from lrqat_export.core.quant import PRESETS
from lrqat_export.train.state import CKPT_DIR, latest_checkpoint
from lrqat_export.train.config import TrainConfig
from lrqat_export.train.loop import batch_indices, lr_lambda, make_optimizer, train


def _prepared(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return prepare(model, PRESETS["q4_0"], MethodOptions(rank=4, alpha=4.0, phi="int8"))


def _windows(path, n=24, t=32):
    return text_windows(load_tokenizer(path), ["pydoc"], t, n)


def test_optimizer_groups_and_schedule_follow_the_paper(tiny_llama):
    model = _prepared(tiny_llama)
    cfg = TrainConfig(steps=100).resolved("lrqat", "paper")
    opt, _ = make_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["ab"]["initial_lr"] == 1e-3 and groups["scale"]["initial_lr"] == 1e-5  # lr itself is warmed up
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["weight_decay"] == 0.0
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10) == 1.0 and f(55) == pytest.approx(0.5)
    assert f(99) == pytest.approx(1 / 90)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_other_schedules_share_the_warmup_and_differ_after_it(schedule):
    lin, other = (lr_lambda(TrainConfig(steps=100, schedule=s)) for s in ("linear", schedule))
    assert [other(i) for i in range(10)] == [lin(i) for i in range(10)]  # the same 10-step warmup
    if schedule == "constant":
        assert {other(i) for i in range(9, 100)} == {1.0}
    else:  # half-way through the decay both are at 0.5; cosine stays higher before it, lower after it
        assert other(10) == 1.0 and other(55) == pytest.approx(0.5) and other(100) == 0.0
        assert other(30) > lin(30) and other(80) < lin(80) and other(99) > 0
        assert all(other(i) >= other(i + 1) for i in range(10, 100))
    with pytest.raises(UserError, match="--schedule: expected one of .*'step'"):
        TrainConfig(schedule="step")


def test_data_order_is_a_pure_function_of_seed_and_step():
    a = [batch_indices(s, 3, 10, seed=7).tolist() for s in range(8)]
    b = [batch_indices(s, 3, 10, seed=7).tolist() for s in range(8)]
    assert a == b
    first_epoch = sum(a[:3], []) + a[3][:1]
    assert sorted(first_epoch) == list(range(10))  # every window once per epoch
    assert a != [batch_indices(s, 3, 10, seed=8).tolist() for s in range(8)]


def test_training_lowers_the_loss(tiny_llama):
    model = _prepared(tiny_llama)
    w = _windows(tiny_llama)
    hist = train(model, w, TrainConfig(steps=30, batch_size=4, lr_ab=1e-2, lr_scale=1e-3, objective="ce"),
                 progress=False)
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < first - 0.05, (first, last)


def _final_state(model):
    return {n: p.detach().clone() for n, p in trainable_parameters(model).items()}


def test_interrupted_and_resumed_run_ends_with_identical_weights(tiny_llama, tmp_path):
    w = _windows(tiny_llama)
    cfg = TrainConfig(steps=8, batch_size=2, lr_ab=1e-2, lr_scale=1e-3, ckpt_every=3, objective="ce")
    full = _prepared(tiny_llama)
    train(full, w, cfg, tmp_path / "a", progress=False)
    part = _prepared(tiny_llama)
    train(part, w, cfg, tmp_path / "b", progress=False, stop_after=5)  # checkpoint at step 3 only
    assert json.loads((tmp_path / "b" / CKPT_DIR / "latest.json").read_text())["step"] == 3
    resumed = _prepared(tiny_llama)  # a fresh process would rebuild the model like this
    train(resumed, w, cfg, tmp_path / "b", resume=True, progress=False)
    a, b = _final_state(full), _final_state(resumed)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert any(a[n].abs().sum() > 0 for n in a if n.endswith("lora_A")), "A must have left its zero init"


def test_layer_checkpointing_recomputes_and_changes_no_number(tiny_llama, tmp_path):
    """--checkpoint-layers: every decoder layer runs its forward again in backward (counted inside the layer), and
    the losses and every trained tensor equal the run without it bit for bit; it may be switched on at --resume."""
    w = _windows(tiny_llama)
    cfg = TrainConfig(steps=6, batch_size=2, lr_ab=1e-2, lr_scale=1e-3, ckpt_every=3, objective="ce")
    runs = {}
    for name, c in (("plain", cfg), ("ckpt", dataclasses.replace(cfg, checkpoint_layers=True))):
        torch.manual_seed(0)  # B's random init, as train_and_fuse seeds it
        model = _prepared(tiny_llama)
        calls, mlp = [], model.model.layers[0].mlp  # inside the checkpoint (module hooks do not fire on recompute)
        mlp.forward = lambda x, _f=mlp.forward: calls.append(1) or _f(x)
        # the Kaiming start (q4_0's default start is data-aware: 4 more forwards, and their backward, at step 0)
        hist = train(model, w, c, tmp_path / name, progress=False, opts=MethodOptions(ab_init="lora"))
        runs[name] = (hist, _final_state(model), len(calls))
    (h0, s0, n0), (h1, s1, n1) = runs["plain"], runs["ckpt"]
    assert n0 == 6 and n1 == 12, (n0, n1)  # one forward per step, and one more in each backward
    assert [h["loss"] for h in h0] == [h["loss"] for h in h1]
    assert s0.keys() == s1.keys() and all(torch.equal(s0[n], s1[n]) for n in s0)
    torch.manual_seed(0)
    part = _prepared(tiny_llama)
    train(part, w, cfg, tmp_path / "switch", progress=False, stop_after=3, opts=MethodOptions(ab_init="lora"))
    resumed = _prepared(tiny_llama)
    train(resumed, w, dataclasses.replace(cfg, checkpoint_layers=True), tmp_path / "switch", resume=True,
          progress=False, opts=MethodOptions(ab_init="lora"))
    s2 = _final_state(resumed)
    assert all(torch.equal(s0[n], s2[n]) for n in s0)


def test_resume_with_different_options_is_refused(tiny_llama, tmp_path):
    w = _windows(tiny_llama)
    train(_prepared(tiny_llama), w, TrainConfig(steps=2, batch_size=2, objective="ce"), tmp_path, progress=False)
    with pytest.raises(UserError, match=r"training options differ .*'steps': \(2, 3\)"):
        train(_prepared(tiny_llama), w, TrainConfig(steps=3, batch_size=2, objective="ce"), tmp_path, resume=True,
              progress=False)


def _cli(args, **kw):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "lrqat_export.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


KILL_COMMON = ["train", "--preset", "q4_0", "--rank", "4", "--alpha", "4", "--steps", "16", "--seq-len", "32",
               "--max-train-windows", "24", "--ckpt-every", "1", "--lr-ab", "1e-2", "--lr-scale", "1e-3"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref"
    ref = _cli([*KILL_COMMON, "--model", str(tiny_llama), "--out", str(out)])
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_moment_then_resume_matches_uninterrupted_run(tiny_llama, uninterrupted, tmp_path, seed):
    """kill -9 at a random moment — seed 0 during start-up, before any checkpoint; the others once the
    checkpoint has reached a random step, plus a random delay that can land inside a checkpoint write — then
    `--resume` (killed twice for seed 2) and compare the final integers and A/B/s with an uninterrupted run."""
    rng = random.Random(seed)
    out = tmp_path / "run"
    argv = [*KILL_COMMON, "--model", str(tiny_llama), "--out", str(out)]
    state = out / CKPT_DIR / "latest.json"
    kills = []
    for attempt in range(2 if seed == 2 else 1):
        run = _cli([*argv, "--resume"] if attempt else argv)
        target = None if seed == 0 else rng.randint(1 + 6 * attempt, 5 + 6 * attempt)
        deadline = time.time() + (rng.uniform(0.5, 2.0) if target is None else 600)
        start = kills[-1] if kills else None  # the checkpoint an earlier attempt left (not this run's)
        first = None  # (time, step) when this run's first checkpoint was seen: paces the extra delay below
        while time.time() < deadline and run.poll() is None:
            try:
                step = json.loads(state.read_text())["step"]
                if step != start:
                    first = first or (time.time(), step)
                if target is not None and step >= target:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.01)
        # a random delay of up to ~2 steps, so the kill can land inside a checkpoint write but never after the
        # last step (on a fast machine a step of this tiny model takes ~20 ms)
        per_step = 0.15 if target is None or first is None or step <= first[1] else \
            (time.time() - first[0]) / (step - first[1])
        time.sleep(rng.uniform(0, min(0.15, 2 * per_step)))
        assert run.poll() is None, "the run finished before it could be killed"
        run.send_signal(signal.SIGKILL)
        run.wait()
        kills.append(json.loads(state.read_text())["step"] if state.exists() else 0)
        assert not (out / "lrqat_manifest.json").exists()
    res = _cli([*argv, "--resume"])
    assert res.wait(timeout=600) == 0, res.stderr.read().decode()
    if seed == 0:
        assert kills == [0], kills  # killed before its first checkpoint: --resume started from step 0
    a = load_file(str(uninterrupted / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, kills)
    ta = load_file(str(latest_checkpoint(uninterrupted) / "trainable.safetensors"))
    tb = load_file(str(latest_checkpoint(out) / "trainable.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta), kills
    assert not [p.name for p in (out / CKPT_DIR).iterdir() if p.name.startswith(".")]  # no temp dirs left over


def test_checkpoint_cleanup_removes_what_a_killed_writer_left(tmp_path):
    """kill -9 inside latest.json's write leaves its temp file (the fused step made that window frequent enough to
    show in the SIGKILL test): the next checkpoint removes it with the older steps and their temp dirs."""
    from lrqat_export.train.dcp import remove_older

    root = tmp_path / CKPT_DIR
    for name in ("step-00000002", "step-00000004", ".step-00000006.abc.tmp"):
        (root / name).mkdir(parents=True)
    (root / ".latest.json.k3j2x9.tmp").write_text('{"step"')
    (root / "latest.json").write_text('{"step": 4, "dir": "step-00000004"}')
    remove_older(root, "step-00000004")
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000004"]


def test_sampled_windows_continue_each_prompt_with_the_models_own_tokens(tiny_llama):
    """The sampler's key-value-cache decoding is the model's: at a near-zero temperature every sampled token is the
    argmax of the model's logits on the whole window so far (recomputed without a cache); a seed fixes the samples,
    another seed changes them, and prompts are kept."""
    from lrqat_export.core.data import sampled_windows

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = torch.randint(0, model.config.vocab_size, (5, 3), generator=torch.Generator().manual_seed(0))
    w = sampled_windows(model, prompts, 12, seed=0, batch_size=2, temperature=1e-4)
    assert w.shape == (5, 12) and torch.equal(w[:, :3], prompts)
    with torch.no_grad():
        logits = model(input_ids=w).logits[:, 2:-1].float()  # the prediction of each sampled token
    chosen = logits.gather(-1, w[:, 3:, None]).squeeze(-1)
    assert (chosen >= logits.max(-1).values - 1e-4).all()  # the argmax (up to float ties)
    a = sampled_windows(model, prompts, 12, seed=1, batch_size=2)
    assert torch.equal(a, sampled_windows(model, prompts, 12, seed=1, batch_size=5))  # batching changes nothing
    assert not torch.equal(a, sampled_windows(model, prompts, 12, seed=2, batch_size=2))
    assert model.training is False
    with pytest.raises(UserError, match="prompt length expected 1..2, got 3"):
        sampled_windows(model, prompts, 3)
