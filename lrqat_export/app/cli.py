"""`lrqat` command line (contract in docs/ARCHITECTURE.md). Exit status: 0 ok, 1 a check failed, 2 bad input.

The only module that parses arguments: each verb's options become a config object (app.jobs) and the verb runs
as a function of it (app.verbs, app.run, app.verify). Every default shown here is read from those objects or from
methods.registry, never written twice."""
from __future__ import annotations

import argparse
import errno
import json
import math
import sys

from converters.gguf import EMBED_CHOICES

from ..core import quiet
from ..core.errors import CheckFailed, UserError
from ..core.models import DEFAULT_MODEL
from ..core.quant import DEFAULT_PRESET, PRESETS, RANGE_METHODS, spec_from_args
from ..methods import registry
from ..methods.common import AB_INITS, PHI_CHOICES, MethodOptions
from ..train.config import INIT_STEPS, SCHEDULES, TrainConfig
from ..train import objective
from ..train.objective import KD_LAYER_TARGETS, KD_TEACHERS, OBJECTIVES
from . import jobs as J

EXIT_OK, EXIT_CHECK, EXIT_INPUT = 0, 1, 2
# A full disk, a file-size or quota limit, a read-only or forbidden target: the environment refuses the write.
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
OPTS, TRAIN, DATA, EVAL = MethodOptions(), TrainConfig(), J.DataOptions(), J.EvalOptions()
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `lrqat VERB: error: argument --x: expected ..., got ...` (no usage block)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        # argparse (before 3.12) drops a value of "--" given as --opt=-- and keeps the default without a word
        for a in sys.argv[1:] if args is None else args:
            if isinstance(a, str) and a.startswith("--") and a.endswith("=--"):
                self.error(f"argument {a[:-3]}: expected a value, got '--'")
        return super().parse_known_args(args, namespace)


def int_in(lo: int, hi: int | None = None, also: tuple[int, ...] = ()):
    """argparse type: an integer in lo..hi (or >= lo), or one of `also`; the error names the range and the value."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v not in also and (v < lo or (hi is not None and v > hi)):
            rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"expected an integer {rng}{''.join(f' or {a}' for a in also)}, "
                                             f"got {v}")
        return v
    return parse


def float_in(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite number in the interval [lo, hi] (ends open where asked; no hi: unbounded)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = v > lo if lo_open else v >= lo
        high_ok = hi is None or (v < hi if hi_open else v <= hi)
        if not (math.isfinite(v) and low_ok and high_ok):
            rng = f"{'(' if lo_open else '['}{lo:g}, {'∞)' if hi is None else f'{hi:g}' + (')' if hi_open else ']')}"
            raise argparse.ArgumentTypeError(f"expected a finite number in {rng}, got {v:g}")
        return v
    return parse


POSITIVE, WINDOW = int_in(1), int_in(2)  # counts; window lengths (a window predicts its tokens from the previous)
RATE = float_in(0.0)  # learning rates: 0 freezes


def _method_defaults(key: str) -> str:
    """'1 for lrqat; 16 for qlora, qalora, lora-fp' — a per-method default as the registry holds it."""
    by_value: dict = {}
    for name in registry.names(trains=True):
        v = registry.default(name, key)
        if v is not None:
            by_value.setdefault(v, []).append(name)
    return "; ".join(f"{v:g} for {', '.join(ns)}" if isinstance(v, float) else f"{v} for {', '.join(ns)}"
                     for v, ns in by_value.items())


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization grid")
    g.add_argument("--preset", help=f"named grid: q4_0, q8_0, q4_1, w4pc, w4g64, w3g64, w4g128, w3g128, ...; GGUF "
                                    f"K grids q4_k, q5_k, q6_k; llama.cpp's per-layer plans q4_k_m, q4_k_s "
                                    f"(default {DEFAULT_PRESET}); --bits/--group-size/--asym override a single-level "
                                    f"grid")
    g.add_argument("--bits", type=int_in(2, 8), help="code width, 2..8")
    g.add_argument("--group-size", type=int_in(2, also=(-1,)), help="input features per scale; -1 = per output channel")
    g.add_argument("--asym", action="store_true", help="asymmetric grid with integer zero points")
    g.add_argument("--range-method", default=OPTS.range_method, choices=list(RANGE_METHODS),
                   help="the start's scale search: lp (Lp-norm p=4 grid search, the paper's), mse, minmax, or imatrix "
                        "(squared error weighted by the float model's input importance, llama.cpp's imatrix, over "
                        "the first 32 training windows or ptq's calibration windows; not on K grids). Default: "
                        "imatrix for lrqat, peqa and full-qat on grouped grids (q4_0, w3g64, ...), lp otherwise "
                        "(per channel, K grids, --recipe paper, other methods, ptq)")


def _add_data_args(p: argparse.ArgumentParser, train: bool, eval_: bool, ev: J.EvalOptions = EVAL) -> None:
    g = p.add_argument_group("data")
    if train:
        g.add_argument("--train-data", nargs="+", default=list(DATA.train_data),
                       help="UTF-8 text files to train on; 'pydoc' = the embedded corpus (Python's help text)")
        g.add_argument("--seq-len", type=WINDOW, default=DATA.seq_len,
                       help=f"training window length in tokens (default {DATA.seq_len})")
        g.add_argument("--max-train-windows", type=POSITIVE, help="use at most this many training windows")
    if eval_:
        g.add_argument("--eval-data", nargs="+", help="UTF-8 text files to evaluate on ('pydoc' = embedded corpus)")
        g.add_argument("--eval-seq-len", type=WINDOW, default=ev.seq_len,
                       help=f"evaluation window length (default {ev.seq_len})")
        g.add_argument("--eval-windows", type=POSITIVE, default=ev.windows,
                       help=f"number of evaluation windows (default {ev.windows})")
        g.add_argument("--protocol", default=ev.protocol, choices=["full", "second_half"],
                       help="score all next-token predictions, or only the second half (llama-perplexity's way)")


def _add_train_args(p: argparse.ArgumentParser, steps: int, opts: MethodOptions = OPTS) -> None:
    g = p.add_argument_group("LR-QAT")
    g.add_argument("--rank", type=POSITIVE, default=OPTS.rank,
                   help=f"adapter rank r (default {OPTS.rank}, the paper's)")
    g.add_argument("--alpha", type=float_in(0.0, lo_open=True),
                   help=f"adapter scale numerator α; A·B is scaled by α/r (default {_method_defaults('alpha')})")
    g.add_argument("--phi", choices=list(PHI_CHOICES),
                   help=f"storage of the frozen Φ0: bf16, int8 fixed point Q(b).(8-b) (half the memory; the paper's), "
                        f"int4 double-packed, fp32 (default {_method_defaults('phi')})")
    g.add_argument("--ab-init", choices=list(AB_INITS),
                   help=f"start of B (A starts at 0 either way, so training starts at RTN): lora = Kaiming; act = the "
                        f"top-r principal directions of each layer's inputs; grad = the row space of the loss "
                        f"gradient, both from the first {INIT_STEPS} steps' windows (default "
                        f"{registry.default('lrqat', 'ab_init')}, "
                        f"{registry.default('lrqat', 'ab_init', spec=PRESETS['q4_0'])} on grouped one-level grids "
                        f"with groups of 32; "
                        f"{registry.default('lrqat', 'ab_init', recipe='paper')} in --recipe paper)")
    g.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=opts.checkpointing,
                   help=f"recompute each layer's fake-quantized weight in backward instead of keeping weight-sized "
                        f"intermediates: less memory, slower, the same numbers (default "
                        f"{'on' if opts.checkpointing else 'off'})")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=opts.fused,
                   help=f"LR-QAT: build each fake-quantized weight in one compiled pass with a low-rank backward "
                        f"(torch.compile; the same weights bit for bit, no weight-sized tensor kept for backward); "
                        f"--no-fused runs the eager chain (default {'on' if opts.fused else 'off'})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=POSITIVE, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=POSITIVE, default=TRAIN.batch_size,
                   help=f"windows per optimizer step, over all ranks under torchrun (the global batch; default "
                        f"{TRAIN.batch_size})")
    g.add_argument("--grad-accum", type=POSITIVE, default=TRAIN.grad_accum, help="micro-batches per step")
    g.add_argument("--lr-ab", type=RATE, help=f"learning rate of A and B (default {_method_defaults('lr_ab')}; "
                                               f"lrqat on grouped grids with groups over 32 "
                                               f"{registry.default('lrqat', 'lr_ab', spec=PRESETS['w3g64']):g})")
    g.add_argument("--lr-scale", type=RATE, help=f"learning rate of the scales (default "
                                                  f"{_method_defaults('lr_scale')}; lrqat and peqa on grouped grids "
                                                  f"{registry.default('lrqat', 'lr_scale', spec=PRESETS['q4_0']):g} "
                                                  f"with groups of 32, "
                                                  f"{registry.default('lrqat', 'lr_scale', spec=PRESETS['w3g64']):g} "
                                                  f"with larger groups; 0 = frozen)")
    g.add_argument("--recipe", default=registry.DEFAULT_RECIPE, choices=list(registry.RECIPES),
                   help="named set of per-method defaults for every option left unset: default (the tool's, tuned "
                        "for short budgets) or paper (each method's paper's settings, cross-entropy)")
    g.add_argument("--objective", choices=list(OBJECTIVES),
                   help=f"training loss: ce (next-token cross-entropy), kl (distillation from the float model: "
                        f"τ²·KL(teacher ‖ student) on its top-k tokens + the rest of its mass) or mix "
                        f"(default {_method_defaults('objective')})")
    g.add_argument("--kd-temperature", type=float_in(0.0, lo_open=True), default=TRAIN.kd_temperature,
                   help=f"distillation temperature τ (default {TRAIN.kd_temperature})")
    g.add_argument("--kd-topk", type=POSITIVE, default=TRAIN.kd_topk,
                   help=f"teacher tokens kept per position (default {TRAIN.kd_topk})")
    g.add_argument("--kd-teacher", choices=list(KD_TEACHERS), default=TRAIN.kd_teacher,
                   help=f"where the distillation targets come from: cache = one no-grad pre-pass of the float model, "
                        f"kept in host memory ({objective.cache_bytes(1, 2, TRAIN.kd_topk)} bytes a token at top-"
                        f"{TRAIN.kd_topk}); online = LR-QAT's model computes them at every step from its frozen Φ0 and "
                        f"initial scales (no cache; one more forward a step; needs a Φ0 finer than the codes) "
                        f"(default {TRAIN.kd_teacher})")
    g.add_argument("--kd-layer", type=float_in(0.0), default=TRAIN.kd_layer,
                   help=f"weight of each quantized layer's output error against its float weight on the same input "
                        f"(‖y − x·W0ᵀ‖²/‖x·W0ᵀ‖², averaged over layers), added to the loss; LR-QAT with a Φ0 finer "
                        f"than the codes (default {TRAIN.kd_layer}: off)")
    g.add_argument("--kd-layer-target", choices=list(KD_LAYER_TARGETS), default=TRAIN.kd_layer_target,
                   help="--kd-layer's target for a layer: input = its float weight on the layer's own input; float = "
                        "the float model's output of that layer (one more no-grad forward a step) "
                        f"(default {TRAIN.kd_layer_target})")
    g.add_argument("--ce-weight", type=float_in(0.0, 1.0), default=TRAIN.ce_weight,
                   help=f"mix: weight of cross-entropy, 1 − it on the KL (default {TRAIN.ce_weight})")
    g.add_argument("--warmup", type=float_in(0.0, 1.0, hi_open=True), default=TRAIN.warmup_fraction,
                   help=f"warmup fraction of the steps (default {TRAIN.warmup_fraction})")
    g.add_argument("--schedule", choices=list(SCHEDULES), default=TRAIN.schedule,
                   help=f"learning rate after the warmup: linear or cosine decay to zero, or constant "
                        f"(default {TRAIN.schedule}, the paper's)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for the model's matmuls")
    g.add_argument("--checkpoint-layers", action="store_true",
                   help="recompute each decoder layer's activations in backward: much less activation memory, "
                        "about one more forward of time, the same numbers (may change on --resume)")
    g.add_argument("--seed", type=int_in(0), default=TRAIN.seed)
    g.add_argument("--device", default="cpu", help="torch device for training and evaluation (cpu, cuda, cuda:1)")
    g.add_argument("--ckpt-every", type=int_in(0), default=TRAIN.ckpt_every,
                   help="steps between resumable checkpoints (0 = end only)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    g.add_argument("--dist-backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="under torchrun: process-group backend (auto: nccl with --device cuda, else gloo)")


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model directory's own Python code (config auto_map) to run; off by default")


def _spec(args):
    return spec_from_args(args.preset, args.bits, args.group_size, args.asym)


def _options(args) -> MethodOptions:
    return MethodOptions(rank=args.rank, alpha=args.alpha, phi=args.phi, range_method=args.range_method,
                         checkpointing=args.checkpointing, fused=args.fused,
                         lr_weight=getattr(args, "lr_weight", None),
                         ab_init=getattr(args, "ab_init", None))


def _train_cfg(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr_ab=args.lr_ab,
                       lr_scale=args.lr_scale, warmup_fraction=args.warmup, schedule=args.schedule, bf16=args.bf16,
                       seed=args.seed, ckpt_every=args.ckpt_every, checkpoint_layers=args.checkpoint_layers,
                       objective=args.objective, kd_temperature=args.kd_temperature, kd_topk=args.kd_topk,
                       kd_teacher=args.kd_teacher, ce_weight=args.ce_weight, kd_layer=args.kd_layer,
                       kd_layer_target=args.kd_layer_target)


def _data(args) -> J.DataOptions:
    return J.DataOptions(tuple(args.train_data), args.seq_len, args.max_train_windows)


def _eval(args) -> J.EvalOptions:
    return J.EvalOptions(None if not args.eval_data else tuple(args.eval_data), args.eval_seq_len, args.eval_windows,
                         args.protocol)


def train_job(args) -> J.TrainJob:
    return J.TrainJob(out=args.out, model=args.model, method=args.method, spec=_spec(args), options=_options(args),
                      train=_train_cfg(args), data=_data(args), init=args.init, recipe=args.recipe,
                      resume=args.resume,
                      overwrite=args.overwrite, device=args.device, dist_backend=args.dist_backend,
                      trust_remote_code=args.trust_remote_code)


def run_job(args) -> J.RunJob:
    return J.RunJob(out=args.out, model=args.model, spec=_spec(args), options=_options(args), train=_train_cfg(args),
                    data=_data(args), eval=_eval(args), ood_data=None if not args.ood_data else tuple(args.ood_data),
                    recipe=args.recipe, resume=args.resume, overwrite=args.overwrite, device=args.device,
                    trust_remote_code=args.trust_remote_code)


def cmd_train(args) -> int:
    from .verbs import train

    res = train(train_job(args))
    if not res["main"]:
        return EXIT_OK
    c = res["parameters"]
    if "total" in c:
        print(f"trainable parameters: {c['trainable']:,} of {c['total']:,} ({100 * c['trainable'] / c['total']:.2f} %)")
    else:
        print(f"trainable parameters: {c['trainable']:,}")
    if res.get("adapters"):
        from .report import moved_line

        print(moved_line(res["adapters"]))
    print(f"IntCheckpoint: {res['intckpt']}")
    return EXIT_OK


def cmd_ptq(args) -> int:
    from .verbs import ptq

    out = ptq(J.PtqJob(out=args.out, model=args.model, method=args.method, spec=_spec(args),
                       range_method=args.range_method or J.PtqJob.range_method,
                       calib_data=args.calib_data and tuple(args.calib_data),
                       calib_windows=args.calib_windows, calib_seq_len=args.calib_seq_len, overwrite=args.overwrite,
                       trust_remote_code=args.trust_remote_code))
    print(f"IntCheckpoint: {out}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from .verbs import evaluate

    print(json.dumps(evaluate(J.EvalJob(args.target, _eval(args), args.runtime, args.tokenizer,
                                        args.trust_remote_code))))
    return EXIT_OK


def cmd_export_gguf(args) -> int:
    from .verbs import export_gguf

    print(f"GGUF: {export_gguf(J.ExportGGUFJob(args.intckpt, args.out, args.embed_type, args.overwrite))}")
    return EXIT_OK


def cmd_export_gptq(args) -> int:
    from .verbs import export_gptq

    out = export_gptq(J.ExportGPTQJob(args.intckpt, args.out, args.format, args.strict_vllm, args.max_shard_size,
                                      args.overwrite))
    print(f"GPTQ: {out}")
    return EXIT_OK


def cmd_verify(args) -> int:
    from .verify import markdown, verify_job

    gaps = {k: v for k, v in (("gguf", args.max_gap_gguf), ("gptq", args.max_gap_gptq)) if v is not None}
    report = verify_job(J.VerifyJob(args.intckpt, args.gguf, args.gptq, _eval(args), args.report, gaps))
    print(markdown(report))
    return EXIT_OK


def cmd_inspect(args) -> int:
    from .inspect import inspect_path

    print(inspect_path(args.target))
    return EXIT_OK


def cmd_run(args) -> int:
    from .run import run

    report = run(run_job(args))
    return EXIT_OK if report.get("parity", {}).get("passed", True) else EXIT_CHECK


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="lrqat", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="show everything: INFO logs, and other projects' banners, logs, warnings and progress bars")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="LR-QAT: prepare, train, fuse → IntCheckpoint in OUT")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"HF model dir, .gguf file, or {DEFAULT_MODEL} (default)")
    p.add_argument("--out", required=True, help="output directory (IntCheckpoint + resumable train state)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--method", default="lrqat", choices=list(registry.names(trains=True)),
                   help="; ".join(f"{m.name}: {m.summary}" for m in registry.METHODS.values() if m.trains))
    p.add_argument("--init", help="IntCheckpoint (e.g. from `lrqat ptq --method gptq`) whose codes and scales start "
                                  "the training (lrqat: Φ0 = its codes exactly)")
    p.add_argument("--lr-weight", type=RATE, help=f"full-qat: learning rate of the weights (default "
                                                   f"{_method_defaults('lr_weight')}, the paper's)")
    _add_spec_args(p), _add_data_args(p, True, False), _add_train_args(p, steps=TRAIN.steps), _add_trust_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ptq", help="post-training quantization baseline → IntCheckpoint")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", required=True)
    p.add_argument("--method", default=J.PtqJob.method,
                   help="; ".join(f"{m.name}: {m.summary}" for m in registry.METHODS.values() if not m.trains))
    p.add_argument("--calib-data", nargs="+", help="gptq, and rtn with --range-method imatrix: calibration text "
                                                   "files (default: the embedded corpus)")
    p.add_argument("--calib-windows", type=POSITIVE, default=J.PtqJob.calib_windows,
                   help=f"calibration windows (default {J.PtqJob.calib_windows})")
    p.add_argument("--calib-seq-len", type=WINDOW, default=J.PtqJob.calib_seq_len,
                   help=f"calibration window length (default {J.PtqJob.calib_seq_len})")
    p.add_argument("--overwrite", action="store_true")
    _add_spec_args(p), _add_trust_arg(p)
    p.set_defaults(func=cmd_ptq)

    p = sub.add_parser("eval", help="perplexity: IntCheckpoint / float model (torch), .gguf (llama.cpp), GPTQ dir")
    p.add_argument("target", help="IntCheckpoint dir, HF model dir, .gguf file, GPTQ dir or smollm2-135m")
    p.add_argument("--runtime", choices=["auto", "torch"], default="auto",
                   help="auto: by type (.gguf → llama.cpp, GPTQ dir → GPTQ loader); torch: load .gguf as a float model")
    p.add_argument("--tokenizer", help="tokenizer directory for the eval text (default: the target's own)")
    _add_data_args(p, False, True), _add_trust_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write an IntCheckpoint into a deployment format")
    esub = p.add_subparsers(dest="format_name", required=True)
    e = esub.add_parser("gguf", help="llama.cpp GGUF (Q4_0 … Q8_0, Q4_K/Q5_K/Q6_K and the Q4_K_M / Q4_K_S plans, "
                                     "blocks written from the integers)")
    e.add_argument("intckpt")
    e.add_argument("--out", required=True, help="output .gguf file")
    e.add_argument("--embed-type", default=J.ExportGGUFJob.embed_type, choices=list(EMBED_CHOICES),
                   help="type of token embeddings / output (default auto: on a K grid or plan llama.cpp's choice, "
                        "Q6_K or Q8_0 for the output; otherwise f16)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export_gguf)
    e = esub.add_parser("gptq", help="GPTQ safetensors checkpoint (transformers, GPTQModel, AutoGPTQ, vLLM)")
    e.add_argument("intckpt")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--format", default=J.ExportGPTQJob.format, choices=["gptq", "gptq_v2"],
                   help="gptq = AutoGPTQ v1 (stored zero - 1, default); gptq_v2 = true zeros (GPTQModel)")
    e.add_argument("--strict-vllm", action="store_true", help="fail (exit 2) when vLLM would reject the checkpoint")
    e.add_argument("--max-shard-size", default=J.ExportGPTQJob.max_shard_size,
                   help=f"shard safetensors above this size (default {J.ExportGPTQJob.max_shard_size})")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export_gptq)

    p = sub.add_parser("verify", help="parity of exports with the IntCheckpoint: weights and perplexity per runtime")
    p.add_argument("intckpt")
    p.add_argument("--gguf", help="GGUF file exported from INTCKPT (run by llama.cpp)")
    p.add_argument("--gptq", help="GPTQ directory exported from INTCKPT (loaded by transformers + GPTQModel)")
    p.add_argument("--report", help="directory for parity.json and parity.md")
    p.add_argument("--max-gap-gguf", type=float_in(0.0),
                   help=f"max |relative ppl gap| for llama.cpp (default {J.DEFAULT_MAX_GAP['gguf']})")
    p.add_argument("--max-gap-gptq", type=float_in(0.0),
                   help=f"max |relative ppl gap| for the GPTQ loader (default {J.DEFAULT_MAX_GAP['gptq']})")
    _add_data_args(p, False, True)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="types, shapes and metadata of an IntCheckpoint, a .gguf file or a GPTQ dir")
    p.add_argument("target")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="the whole pipeline on one model: FP and RTN baselines, LR-QAT, fuse, evaluate")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    # Defaults sized for minutes on 2 CPU cores (app.jobs.RunJob).
    _add_spec_args(p), _add_data_args(p, True, True, J.RunJob.eval), _add_train_args(p, steps=J.RunJob.train.steps, opts=J.RunJob.options)
    _add_trust_arg(p)
    p.add_argument("--ood-data", nargs="+", help="out-of-domain text evaluated beside --eval-data (default: the "
                                                 "held-out tail of the embedded corpus when training on other text)")
    p.set_defaults(func=cmd_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad option: Parser.error has printed its one line (2)
        return e.code if isinstance(e.code, int) else EXIT_INPUT
    quiet.setup(verbose=args.verbose)
    try:
        if args.cmd != "train":
            from ..train.dist import launched_by_torchrun

            if launched_by_torchrun():
                raise UserError(f"lrqat {args.cmd}: expected a single process, got a torchrun launch (RANK/"
                                f"WORLD_SIZE set); only `lrqat train` runs distributed")
        return args.func(args)
    except UserError as e:
        return _fail(args, "error", e, EXIT_INPUT)
    except CheckFailed as e:
        return _fail(args, "check failed", e, EXIT_CHECK)
    except KeyboardInterrupt:  # the atomic writers have removed their temporaries on the way up
        return _fail(args, "interrupted", "stopped by Ctrl-C; nothing partial was published and earlier outputs "
                                          "are unchanged", EXIT_INTERRUPTED)
    except OSError as e:
        return _fail(args, "error", _os_message(e), EXIT_INPUT)
    except Exception as e:  # a bug, not bad input: exit 1 with one line, the traceback under -v
        if args.verbose:
            raise
        return _fail(args, "internal error", f"{type(e).__name__}: {e}; this is a bug in lrqat, not in your "
                                             f"input: rerun with -v for the traceback and report it", EXIT_CHECK)


def _os_message(e: OSError) -> str:
    """A refused write (full disk, quota, read-only, forbidden) or another file-system error, named by path."""
    code = errno.errorcode.get(e.errno, e.errno)
    if e.errno in WRITE_ERRNOS:
        return (f"could not write {e.filename or 'the output'}: {e.strerror} (errno {code}); nothing was published "
                f"and earlier outputs are unchanged")
    return f"{e.filename or 'a path'}: expected a usable file or directory, got {e.strerror or e} (errno {code})"


def _fail(args, kind: str, message, status: int) -> int:
    """One line on stderr: `lrqat VERB: KIND: MESSAGE` (messages of other projects may span lines)."""
    print(f"lrqat {args.cmd}: {kind}: {' '.join(str(message).split())}", file=sys.stderr)
    return status
