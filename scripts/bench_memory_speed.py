"""Benchmark: peak memory and step time of one training step, LR-QAT vs full-model QAT vs PEQA vs QLoRA vs LoRA, on
the same model shape, batch and sequence — one configuration per fresh subprocess.

    PYTHONPATH=. nice -n 10 .venv/bin/python -m scripts.bench_memory_speed            # SmolLM2 + 1.1B shape, CPU
    PYTHONPATH=. .venv/bin/python -m scripts.bench_memory_speed --full                 # longer seq, more steps
    python -m scripts.bench_memory_speed --device cuda --shapes llama2-7b --batch 4 --seq 1024 --bf16
                                                  # the paper's 24 GB claim: its per-GPU batch 4 × 1024, bf16, GPU

Configurations (all: same AdamW/clipping as `lrqat train`, weights random-init from the shape's HF config, scales
from a min-max range search — the range method does not change memory):
    lrqat-bf16     LR-QAT, Φ0 bf16, r=32, fused quantizer (the tool's default: methods/fused.py)
    lrqat-bf16-eager  the same with the eager, checkpointed quantizer chain (`lrqat train --no-fused`)
    lrqat-bf16-compiled  the fused quantizer without its native CPU kernel (methods/fused_native.py): the
                   torch.compile'd passes and torch's sparse correction (LRQAT_FUSED_NATIVE=0)
    lrqat-int8     LR-QAT, Φ0 int8 fixed point (Q4.4), r=32, fused quantizer (the paper's Φ0)
    lrqat-int8-eager  the same, eager and checkpointed
    lrqat-int4     LR-QAT, Φ0 double-packed (two nibbles a byte), fused quantizer
    full-qat       LSQ full-model QAT: all weights + scales trained, fp32 weights and AdamW state
    full-qat-ckpt  the same with the per-layer quantizer+matmul checkpointed
    peqa           scales only (frozen int8 codes), checkpointed
    qlora          NF4 base (blocks of 64) + float LoRA r=32
    lora           float (fp32) base + float LoRA r=32 (no quantization)
Per configuration the child process reports:
    peak_step_bytes  CPU: the process's peak resident set (VmHWM) during warm-up + timed steps, with the peak
                     reset (/proc/self/clear_refs = 5) after model setup, so setup (e.g. the float model LR-QAT is
                     prepared from) does not count; CUDA: torch.cuda.max_memory_allocated over the same steps.
    accounting       bytes of trainable parameters, frozen weights/buffers, gradients and AdamW state (torch-side).
                     (and torch.cuda.max_memory_reserved: what the caching allocator held from the card).
    step_s           median wall time of the timed steps (forward, backward, clip, AdamW).
    clipped_fraction LR-QAT: the share of codes the clamp holds after the timed steps (in `accounting`).
    moved_fraction   LR-QAT: the share of codes A·B moved off RTN's by then (in `accounting`); with the clipped
                     ones, the events the fused forward records so that its backward needs no A·B.
    minor_faults     page faults of each timed step (getrusage): memory the allocator handed back to the OS and
                     mapped in again, a cost the CPU step pays on every weight-sized temporary it re-allocates.
    compile_s        fused LR-QAT: seconds torch.compile spent on the first call of each kernel (in the warm-up
                     step, so not in step_s; also see warmup_s).
--bf16 runs the step under bf16 autocast, as `lrqat train --bf16` does (the paper trains in bf16); the quantizer
and A, B, s stay fp32 either way. On CUDA the model is built and prepared on the GPU (fast; HF's random init of a
7B model on a CPU takes minutes), so the setup holds the float model there; `lrqat train` prepares on the CPU and
moves only the prepared model, so the card holds the float weights at no point. The step peak does not depend on
where the setup ran. --base-dtype bf16 stores the frozen float weights (embeddings, norms, lm_head, LoRA's float
base) in bf16, as the paper's bf16 model does, so the residual stream and norm activations are bf16 too.
Guard: the child runs under RLIMIT_AS (default: MemAvailable − 2 GiB) so a configuration that does not fit reports
"OOM at N GiB" instead of taking the shared machine down. After setup, malloc_trim(0) hands freed memory (the float
weights a quantized layer replaced) back to the OS before the peak is reset. The 1-min load average is recorded
with each timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # name: LlamaConfig kwargs (random init; no download)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=384, tie_word_embeddings=True),
    # SmolLM2's 30 layers (210 projections) at a width where the arithmetic is negligible: what a step costs in
    # per-call overhead (Python, op dispatch, compiled-call guards) alone
    "smollm2-narrow": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=384, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # SmolLM2's depth and FFN width at hidden 512, so that every projection tiles into the 256-weight super-blocks
    # of the K grids (SmolLM2's 576 does not: there llama.cpp's Q4_K_M plan falls back to other types)
    "smollm2-k256": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}
CONFIGS = ("lrqat-bf16", "lrqat-bf16-eager", "lrqat-bf16-compiled", "lrqat-int8", "lrqat-int8-eager", "lrqat-int4",
           "full-qat", "full-qat-ckpt", "peqa", "qlora", "lora")
GiB = 2**30


# --------------------------------------------------------------------------------------------------- child side
def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return -1


def _build(shape: str, config: str, preset: str, rank: int, device: str, base_dtype: str = "fp32",
           teacher_windows=None, range_method: str = "minmax"):
    """(model, optimizer, teacher cache | None, pre-pass record | None). teacher_windows: the token windows the
    steps will use; when given, the float model's top-k targets are computed on them before it is prepared (the
    kl objective's pre-pass), with that pass's own peak resident set recorded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lrqat_export.core.quant import PRESETS
    from lrqat_export.methods import registry
    from lrqat_export.methods.common import MethodOptions
    from lrqat_export.train.config import TrainConfig
    from lrqat_export.train.loop import make_optimizer

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)  # HF's own random init
    method = "lrqat" if config.startswith("lrqat") else {"full-qat": "full-qat", "full-qat-ckpt": "full-qat",
                                                         "peqa": "peqa", "qlora": "qlora", "lora": "lora-fp"}[config]
    # every method at its registry defaults; minmax scales unless --range-method (setup time, and the entries
    # that clip: none under minmax, some under lp, whose backward the fused quantizer corrects one by one), full
    # QAT without checkpointing
    spec = PRESETS[preset]
    if config.endswith("-compiled"):  # the fused path with its compiled passes only
        from lrqat_export.methods import fused_native

        fused_native.reset(enabled=False)
    opts = registry.resolve_options(method, MethodOptions(
        rank=rank, phi=config.split("-")[1] if method == "lrqat" else None, range_method=range_method,
        checkpointing=config != "full-qat", fused=not config.endswith("-eager")), spec=spec)
    tc = TrainConfig(steps=1000).resolved(method, spec=spec)
    teacher, prepass = None, None
    if teacher_windows is not None:
        from lrqat_export.train.objective import build_teacher_cache

        model.to(teacher_windows.device)
        rss0 = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        t0 = time.perf_counter()
        teacher = build_teacher_cache(model, teacher_windows, list(range(teacher_windows.shape[0])), tc.kd_topk,
                                      tc.kd_temperature)
        cache = sum(t.numel() * t.element_size() for d in (teacher.ids, teacher.logp, teacher.log_rest)
                    for t in d.values())
        prepass = {"prepass_s": time.perf_counter() - t0, "rss_before_bytes": rss0,
                   "peak_bytes": _status_bytes("VmHWM"), "cache_bytes": cache,
                   "cache_bytes_per_token": cache / teacher_windows.numel(), "topk": tc.kd_topk,
                   "rest_mass": teacher.rest_mass}
        if device.startswith("cuda"):
            prepass["peak_bytes"] = torch.cuda.max_memory_allocated()
    registry.get(method).prepare(model, spec, opts, None)
    model.to(device)
    opt, _ = make_optimizer(model, tc, registry.param_groups(method, tc.hyper(opts)))
    if base_dtype != "fp32":  # frozen float weights (embeddings, norms, lm_head, LoRA's float base) in bf16
        trainable = {id(p) for g in opt.param_groups for p in g["params"]}
        for mod in model.modules():
            for key, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                if key in ("weight", "bias") and t.is_floating_point() and id(t) not in trainable:
                    t.data = t.data.to(torch.bfloat16)
    return model, opt, teacher, prepass


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def child(a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"]) if a.get("threads") else None
    kl = a.get("objective", "ce") in ("kl", "kl-online")
    online = a.get("objective") == "kl-online"
    vocab = SHAPES[a["shape"]].get("vocab_size", 32000)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (a["batch"], a["seq"]), generator=gen).to(a["device"])
    t0 = time.perf_counter()
    model, opt, teacher, prepass = _build(a["shape"], a["config"], a["preset"], a["rank"], a["device"],
                                          a.get("base_dtype", "fp32"), ids if kl and not online else None,
                                          a.get("range_method", "minmax"))
    if online:  # LR-QAT as its own teacher (--kd-teacher online): no pre-pass, one more no-grad forward a step
        from lrqat_export.methods.lrqat import as_teacher
        from lrqat_export.train.objective import OnlineTeacher

        teacher = OnlineTeacher(model, as_teacher, 64, 1.0)
    setup_s = time.perf_counter() - t0
    params = [p for g in opt.param_groups for p in g["params"]]
    trainable = {id(p) for p in params}
    acc = {"trainable_bytes": _tensor_bytes(params),
           "frozen_bytes": _tensor_bytes([p for p in model.parameters() if id(p) not in trainable])
           + _tensor_bytes(list(model.buffers())),
           "trainable_params": sum(p.numel() for p in params)}
    cuda = a["device"].startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the setup's freed blocks (the float weights) must not count as reserved
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed setup memory (e.g. the float weights) back to the OS
    rss_setup = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on is the step's
    model.train()
    if a.get("checkpoint_layers"):
        from lrqat_export.train.loop import enable_layer_checkpointing

        enable_layer_checkpointing(model)
    dev_type = a["device"].split(":")[0]
    from lrqat_export.train import objective

    rows = torch.arange(a["batch"])

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=a.get("bf16", False)):
            loss = (objective.loss(model, ids, "kl", teacher, rows) if kl
                    else model(input_ids=ids, labels=ids).loss)
        loss.backward()
        if "grad_bytes" not in acc:
            acc["grad_bytes"] = _tensor_bytes([p.grad for p in params])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return loss

    times, warm, faults = [], [], []
    for i in range(a["warmup"] + a["steps"]):
        t, f = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = step()
        (times if i >= a["warmup"] else warm).append(time.perf_counter() - t)
        if i >= a["warmup"]:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    acc["optimizer_bytes"] = _tensor_bytes([v for s in opt.state.values() for v in s.values()
                                            if torch.is_tensor(v) and v.dim() > 0])
    from lrqat_export.methods import fused, fused_native
    from lrqat_export.methods.lrqat import LRQATLinear, codes_moved

    # LR-QAT after the timed steps: codes the clamp holds (the sparse backward's work) and codes A·B moved off RTN's
    # (with the clipped ones, the events the fused forward records for its backward)
    lr = [m for m in model.modules() if isinstance(m, LRQATLinear) and not m.spec.is_k]
    clipped, weights = 0, 0
    with torch.no_grad():
        for m in lr:
            z = m.rounded_codes()
            clipped += int(((z < m.spec.qmin) | (z > m.spec.qmax)).sum())
            weights += z.numel()
        moved = codes_moved((m.fused_codes(), m.start_codes()) for m in lr)
    acc["clipped_fraction"] = clipped / weights if weights else None
    acc["moved_fraction"] = moved["fraction"] if weights else None
    res = {"ok": True, "setup_s": setup_s, "step_s": statistics.median(times), "step_times": times,
           "minor_faults": faults,  # page faults of each timed step: fresh memory the allocator mapped in
           "warmup_s": warm, "compile_s": sum(fused.COMPILE_SECONDS.values()), "compiled": dict(fused.COMPILE_SECONDS),
           "fused_off": fused.off_reasons(),
           "native": fused_native.lib() is not None and a["config"].startswith("lrqat"),
           "native_off": fused_native.why_off(),
           "rss_setup_bytes": rss_setup, "peak_step_bytes": _status_bytes("VmHWM"), "accounting": acc,
           "loss": float(loss), "loadavg_1m": os.getloadavg()[0], "objective": a.get("objective", "ce"),
           "prepass": prepass}
    if cuda:
        res.update(peak_step_bytes=torch.cuda.max_memory_allocated(), cuda_setup_alloc_bytes=base_alloc,
                   cuda_peak_reserved_bytes=torch.cuda.max_memory_reserved(), cuda_reserved_setup_freed=True,
                   cuda_device=torch.cuda.get_device_name(), torch_version=torch.__version__)
    if a.get("profile_top"):  # one more step under the profiler, after the peaks and timings above were read
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts) as prof:
            step()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        ops = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[: a["profile_top"]]
        res["profile"] = [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in ops]
        res["profile_total_ms"] = sum(getattr(e, key) for e in prof.key_averages()) / 1e3
    return res


# -------------------------------------------------------------------------------------------------- parent side
def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * GiB


def run_one(a: dict, limit_bytes: int, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MALLOC_ARENA_MAX": "2", "TOKENIZERS_PARALLELISM": "false"}

    def limit():  # in the child, before exec: address-space cap (CPU runs only; CUDA maps huge virtual ranges)
        if a["device"] == "cpu":
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "scripts.bench_memory_speed", "--child", json.dumps(a)],
                           cwd=ROOT, env=env, preexec_fn=limit, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "wall_s": wall}
    err = (p.stderr.strip().splitlines() or ["?"])[-1]
    oom = p.returncode in (-9, 137) or any(k in p.stderr for k in ("MemoryError", "can't allocate memory",
                                                                    "std::bad_alloc", "out of memory"))
    where = "on the GPU" if a["device"].startswith("cuda") else f"at {limit_bytes / GiB:.1f} GiB"
    return {"ok": False, "oom": oom, "returncode": p.returncode, "wall_s": wall,
            "error": f"OOM {where}" if oom else err[-300:]}


def merge_rounds(runs: list[dict]) -> list[dict]:
    """One row per (shape, config) from the runs of every round: step_s is the median of all their timed steps,
    round_step_s each round's median, the peaks the largest; a failed run makes the row failed. With --rounds the
    configurations alternate (A B A B …), so a slow spell of the machine falls on all of them, not on one."""
    rows: dict[tuple, dict] = {}
    for r in runs:
        key = (r["shape"], r["config"])
        if key not in rows or not r.get("ok"):
            rows[key] = {**r, "round_step_s": [r["step_s"]] if r.get("ok") else []}
            continue
        m = rows[key]
        if not m.get("ok"):
            continue
        m["step_times"] = m["step_times"] + r["step_times"]
        m["minor_faults"] = m.get("minor_faults", []) + r.get("minor_faults", [])
        m["round_step_s"].append(r["step_s"])
        m["step_s"] = statistics.median(m["step_times"])
        m["peak_step_bytes"] = max(m["peak_step_bytes"], r["peak_step_bytes"])
        m["loadavg_1m"] = max(m["loadavg_1m"], r["loadavg_1m"])
    return list(rows.values())


def fmt_gib(b) -> str:
    return "—" if b is None else f"{b / GiB:.2f}"


def table(rows: list[dict], shape: str) -> str:
    sel = [r for r in rows if r["shape"] == shape]
    ref = {r["config"]: r for r in sel if r.get("ok")}
    fq, lo = ref.get("full-qat"), ref.get("lora")
    out = ["| config | trainable params | frozen weights GiB | grads + AdamW GiB | peak step GiB | step s | "
           "time ÷ full QAT | time ÷ LoRA | load 1m |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sel:
        if not r.get("ok"):
            out.append(f"| {r['config']} | | | | **{r.get('error')}** | | | | |")
            continue
        acc = r["accounting"]
        ratio_fq = f"{r['step_s'] / fq['step_s']:.2f}" if fq else "—"
        ratio_lo = f"{r['step_s'] / lo['step_s']:.2f}" if lo else "—"
        peak = fmt_gib(r["peak_step_bytes"])
        if "cuda_peak_reserved_bytes" in r:  # allocated (reserved by the caching allocator)
            peak += f" ({fmt_gib(r['cuda_peak_reserved_bytes'])})"
        out.append(f"| {r['config']} | {acc['trainable_params'] / 1e6:.1f} M | {fmt_gib(acc['frozen_bytes'])} | "
                   f"{fmt_gib(acc['grad_bytes'] + acc['optimizer_bytes'])} | {peak} | "
                   f"{r['step_s']:.2f} | {ratio_fq} | {ratio_lo} | {r['loadavg_1m']:.1f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 7), squeeze=False)
    for j, sh in enumerate(shapes):
        sel = [r for r in rows if r["shape"] == sh]
        names = [r["config"] for r in sel]
        mem = [r["peak_step_bytes"] / GiB if r.get("ok") else 0 for r in sel]
        st = [r["step_s"] if r.get("ok") else 0 for r in sel]
        ax = axes[0][j]
        bars = ax.bar(names, mem, color=["C0" if n.startswith("lrqat") else "C7" for n in names])
        for b, r in zip(bars, sel):
            if not r.get("ok"):
                ax.text(b.get_x() + b.get_width() / 2, 0.1, "OOM" if r.get("oom") else "fail", ha="center",
                        rotation=90, color="red")
        ax.set_title(f"{sh}: peak memory of a training step")
        ax.set_ylabel("GiB")
        ax.tick_params(axis="x", rotation=45)
        ax = axes[1][j]
        ax.bar(names, st, color=["C0" if n.startswith("lrqat") else "C7" for n in names])
        ax.set_title(f"{sh}: step time (median)")
        ax.set_ylabel("s")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    # --- workload
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "tinyllama-1.1b"], choices=list(SHAPES))
    ap.add_argument("--shape", choices=list(SHAPES), help="one shape (same as --shapes SHAPE)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--preset", default="w4pc", help="quantization grid (default w4pc, the paper's W4 per channel)")
    ap.add_argument("--rank", type=int, default=32, help="adapter rank for LR-QAT / LoRA / QLoRA (default 32)")
    ap.add_argument("--batch", type=int, default=1, help="windows per step (default 1)")
    ap.add_argument("--seq", type=int, help="tokens per window (default 128; --full 512)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--steps", type=int, help="timed steps, median reported (default 2; --full 5)")
    ap.add_argument("--full", action="store_true", help="seq 512 and 5 timed steps")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (peak = torch.cuda.max_memory_allocated)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the step, as `lrqat train --bf16`")
    ap.add_argument("--base-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="frozen float weights (embeddings, norms, lm_head, LoRA's float base): fp32 as `lrqat "
                         "train` keeps them (default), or bf16 as the paper's --use-bf16 model")
    ap.add_argument("--checkpoint-layers", action="store_true",
                    help="recompute each decoder layer in backward, as `lrqat train --checkpoint-layers`")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one more step and report its N costliest ops (self time)")
    ap.add_argument("--range-method", default="minmax", choices=["minmax", "lp"],
                    help="initial scales: minmax (default; fast set-up, no code clips at the start) or lp, `lrqat "
                         "train`'s default (some codes clip, and the fused backward corrects those one by one)")
    ap.add_argument("--threads", type=int, help="torch threads in the child (default torch's)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the list of configurations this many times, alternating (A B A B …); each config's "
                         "step_s is the median over all its rounds' timed steps (default 1)")
    ap.add_argument("--objective", default="ce", choices=["ce", "kl", "kl-online"],
                    help="training loss of the step: ce, or kl to the float model's top-k targets (the default "
                         "recipe's); kl also records the teacher pre-pass (peak, seconds, cache bytes per token); "
                         "kl-online: LR-QAT configs only, the model as its own teacher (--kd-teacher online)")
    # --- guard
    ap.add_argument("--mem-limit-gib", type=float, help="child address-space cap (default MemAvailable − 2 GiB)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration (default 1800)")
    # --- output
    ap.add_argument("--json", default=str(ROOT / "docs/bench/memory_speed.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs/bench/memory_speed.png"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    shapes = [args.shape] if args.shape else args.shapes
    seq = args.seq or (512 if args.full else 128)
    steps = args.steps or (5 if args.full else 2)
    limit = int(args.mem_limit_gib * GiB) if args.mem_limit_gib else max(GiB, mem_available() - 2 * GiB)
    from lrqat_export.core.fsio import write_json

    meta = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
                        "child_mem_limit_gib": round(limit / GiB, 1)},
            "args": vars(args), "seq": seq, "steps": steps}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    runs, rows = [], []  # runs: one per (round, shape, config); rows: one per (shape, config), rounds merged
    for rnd, shape, config in ((k, s, c) for k in range(args.rounds) for s in shapes for c in args.configs):
        a = {"shape": shape, "config": config, "preset": args.preset, "rank": args.rank, "batch": args.batch,
             "seq": seq, "warmup": args.warmup, "steps": steps, "device": args.device, "threads": args.threads,
             "bf16": args.bf16, "base_dtype": args.base_dtype, "profile_top": args.profile,
             "checkpoint_layers": args.checkpoint_layers, "objective": args.objective,
             "range_method": args.range_method}
        r = {**a, **run_one(a, limit, args.timeout), "round": rnd}
        runs.append(r)
        rows = merge_rounds(runs)
        msg = (f"peak {fmt_gib(r['peak_step_bytes'])} GiB, step {r['step_s']:.2f} s"
               + (f", compile {r['compile_s']:.1f} s" if r.get("compile_s") else "")
               + (f", FUSED OFF: {r['fused_off']}" if r.get("fused_off") else "") if r.get("ok")
               else r.get("error"))
        print(f"  {shape:<15} {config:<14} {msg}" + (f"  (round {rnd + 1})" if args.rounds > 1 else ""),
              flush=True)
        if r.get("prepass"):
            pp = r["prepass"]
            print(f"      teacher pre-pass: peak {fmt_gib(pp['peak_bytes'])} GiB, {pp['prepass_s']:.1f} s, cache "
                  f"{pp['cache_bytes_per_token']:.0f} B/token (top-{pp['topk']})", flush=True)
        for op in r.get("profile", []):  # the child's list (the count went as profile_top)
            print(f"      {op['self_ms']:9.2f} ms {op['calls']:6d}×  {op['op'][:90]}", flush=True)
        # after every run: a stopped benchmark keeps what it measured
        write_json(args.json, {**meta, "rows": rows, **({"runs": runs} if args.rounds > 1 else {})})
    for shape in shapes:
        print(f"\n### {shape} (batch {args.batch} × seq {seq}, preset {args.preset}, device {args.device}"
              f"{', bf16 autocast' if args.bf16 else ''}{', bf16 frozen base' if args.base_dtype == 'bf16' else ''}"
              f"{', layers checkpointed' if args.checkpoint_layers else ''}, objective {args.objective})\n")
        print(table(rows, shape))
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"\nplot: {args.plot}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
