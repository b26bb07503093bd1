"""`lrqat` command line (contract in DESIGN.md). Exit status: 0 ok, 1 a check failed, 2 bad input."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import sys

from .errors import CheckFailed, UserError

EXIT_OK, EXIT_CHECK, EXIT_INPUT = 0, 1, 2
# A full disk, a file-size or quota limit, a read-only or forbidden target: the environment refuses the write.
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization grid")
    g.add_argument("--preset", help="named grid: q4_0, q8_0, q4_1, w4pc, w4g64, w3g64, w4g128, w3g128, ... "
                                    "(default w4pc); --bits/--group-size/--asym override it")
    g.add_argument("--bits", type=int, help="code width, 2..8")
    g.add_argument("--group-size", type=int, help="input features per scale; -1 = per output channel")
    g.add_argument("--asym", action="store_true", help="asymmetric grid with integer zero points")
    g.add_argument("--range-method", default="lp", choices=["lp", "mse", "minmax"],
                   help="scale initialisation by range search (default lp: Lp-norm p=4 grid search, as the paper)")


def _add_data_args(p: argparse.ArgumentParser, train: bool, eval_: bool, eval_windows: int = 8) -> None:
    g = p.add_argument_group("data")
    if train:
        g.add_argument("--train-data", nargs="+", default=["pydoc"],
                       help="UTF-8 text files to train on; 'pydoc' = the embedded corpus (Python's help text)")
        g.add_argument("--seq-len", type=int, default=256, help="training window length in tokens (default 256)")
        g.add_argument("--max-train-windows", type=int, help="use at most this many training windows")
    if eval_:
        g.add_argument("--eval-data", nargs="+", help="UTF-8 text files to evaluate on ('pydoc' = embedded corpus)")
        g.add_argument("--eval-seq-len", type=int, default=512, help="evaluation window length (default 512)")
        g.add_argument("--eval-windows", type=int, default=eval_windows,
                       help=f"number of evaluation windows (default {eval_windows})")
        g.add_argument("--protocol", default="full", choices=["full", "second_half"],
                       help="score all next-token predictions, or only the second half (llama-perplexity's way)")


def _add_train_args(p: argparse.ArgumentParser, steps: int) -> None:
    g = p.add_argument_group("LR-QAT")
    g.add_argument("--rank", type=int, default=32, help="adapter rank r (default 32, the paper's)")
    g.add_argument("--alpha", type=float, help="adapter scale numerator α; A·B is scaled by α/r (default 1 for "
                                               "lrqat, the paper's; 16 for the float-LoRA baselines, QLoRA's)")
    g.add_argument("--phi", default="int8", choices=["int8", "int4", "bf16", "fp32"],
                   help="storage of the frozen Φ0: int8 fixed point (default), int4 double-packed, bf16, fp32")
    g.add_argument("--no-checkpointing", action="store_true", help="keep weight-sized intermediates for backward")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=2,
                   help="windows per optimizer step, over all ranks under torchrun (the global batch; default 2)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    g.add_argument("--lr-ab", type=float, help="learning rate of A and B (default 1e-3 for lrqat; 2e-4 for the "
                                               "float-LoRA baselines qlora/qalora/lora-fp, QLoRA's)")
    g.add_argument("--lr-scale", type=float, help="learning rate of the scales (default 1e-5; 1e-4 for peqa; "
                                                  "0 = frozen)")
    g.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps (default 0.1)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for the model's matmuls")
    g.add_argument("--checkpoint-layers", action="store_true",
                   help="recompute each decoder layer's activations in backward: much less activation memory, "
                        "about one more forward of time, the same numbers (may change on --resume)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="torch device for training and evaluation (cpu, cuda, cuda:1)")
    g.add_argument("--ckpt-every", type=int, default=50, help="steps between resumable checkpoints (0 = end only)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    g.add_argument("--dist-backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="under torchrun: process-group backend (auto: nccl with --device cuda, else gloo)")


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model directory's own Python code (config auto_map) to run; off by default")


def _spec(args):
    from .quant import spec_from_args

    return spec_from_args(args.preset, args.bits, args.group_size, args.asym)


# Per-method defaults where the user gives none (baselines.py documents the sources).
METHOD_DEFAULTS = {  # method: (alpha, lr_ab, lr_scale)
    "lrqat": (1.0, 1e-3, 1e-5), "full-qat": (1.0, 1e-3, 1e-5), "peqa": (1.0, 1e-3, 1e-4),
    "qlora": (16.0, 2e-4, 1e-5), "qalora": (16.0, 2e-4, 1e-5), "lora-fp": (16.0, 2e-4, 1e-5),
}


def _method_default(args, i: int, name: str):
    v = getattr(args, name, None)
    return METHOD_DEFAULTS.get(getattr(args, "method", "lrqat"), METHOD_DEFAULTS["lrqat"])[i] if v is None else v


def _train_cfg(args):
    from .train import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr_ab=_method_default(args, 1, "lr_ab"), lr_scale=_method_default(args, 2, "lr_scale"),
                       warmup_fraction=args.warmup, bf16=args.bf16, seed=args.seed, ckpt_every=args.ckpt_every,
                       checkpoint_layers=args.checkpoint_layers)


def _opts(args):
    from .pipeline import LRQATOptions

    return LRQATOptions(rank=args.rank, alpha=_method_default(args, 0, "alpha"), phi=args.phi,
                        range_method=args.range_method, checkpointing=not args.no_checkpointing)


def cmd_train(args) -> int:
    from .distributed import check_batch, from_env, session
    from .pipeline import run_train

    # Bad options and wrong launches fail here, on every rank, before any process group exists.
    spec, opts, cfg = _spec(args), _opts(args), _train_cfg(args)
    dist = from_env(args.device, args.dist_backend)
    check_batch(cfg.batch_size, cfg.grad_accum, 1 if dist is None else dist.world_size)
    with session(dist):
        res = run_train(args.model, args.train_data, args.out, spec, opts, cfg, args.seq_len,
                        args.max_train_windows, args.resume, args.overwrite, device=args.device, dist=dist,
                        trust_remote_code=args.trust_remote_code, method=args.method, init=args.init,
                        lr_weight=args.lr_weight)
    if dist is not None and not dist.is_main:
        return EXIT_OK
    c = res["parameters"]
    if "total" in c:
        print(f"trainable parameters: {c['trainable']:,} of {c['total']:,} ({100 * c['trainable'] / c['total']:.2f} %)")
    else:
        print(f"trainable parameters: {c['trainable']:,}")
    print(f"IntCheckpoint: {res['intckpt']}")
    return EXIT_OK


def cmd_ptq(args) -> int:
    from .pipeline import run_ptq

    out = run_ptq(args.model, args.out, _spec(args), args.method, args.range_method, args.overwrite,
                  args.calib_data, args.calib_windows, args.calib_seq_len, args.trust_remote_code)
    print(f"IntCheckpoint: {out}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from .evaluate import perplexity
    from .models import load_tokenizer
    from .pipeline import eval_windows, load_for_eval, target_kind

    if not args.eval_data:
        raise UserError("--eval-data: expected at least one text file")
    kind = target_kind(args.target, args.runtime)
    if kind == "gguf":  # real llama.cpp
        from .llamacpp import gguf_tokenizer, perplexity_gguf

        tok = load_tokenizer(args.tokenizer) if args.tokenizer else gguf_tokenizer(args.target)
        w = eval_windows(tok, args.eval_data, args.eval_seq_len, args.eval_windows)
        r, runtime = perplexity_gguf(args.target, w, args.protocol), "llama.cpp"
    elif kind == "gptq":  # transformers + GPTQModel
        from .gptq_loader import perplexity_gptq

        tok = load_tokenizer(args.tokenizer or args.target)
        w = eval_windows(tok, args.eval_data, args.eval_seq_len, args.eval_windows)
        r, runtime = perplexity_gptq(args.target, w, args.protocol), "transformers+gptqmodel"
    else:
        model, tok, kind = load_for_eval(args.target, args.trust_remote_code)
        w = eval_windows(tok, args.eval_data, args.eval_seq_len, args.eval_windows)
        r, runtime = perplexity(model, w, args.protocol, progress=True), "torch"
    print(json.dumps({"target": args.target, "runtime": runtime, "kind": kind, "ppl": r["ppl"], "tokens": r["tokens"],
                      "windows": int(w.shape[0]), "seq_len": args.eval_seq_len, "protocol": args.protocol}))
    return EXIT_OK


def cmd_export_gguf(args) -> int:
    from converters.gguf import export_gguf

    print(f"GGUF: {export_gguf(args.intckpt, args.out, embed_type=args.embed_type, overwrite=args.overwrite)}")
    return EXIT_OK


def cmd_export_gptq(args) -> int:
    from converters.gptq import export_gptq

    print(f"GPTQ: {export_gptq(args.intckpt, args.out, fmt=args.format, strict_vllm=args.strict_vllm, overwrite=args.overwrite, max_shard_size=args.max_shard_size)}")
    return EXIT_OK


def cmd_verify(args) -> int:
    from .verify import markdown, verify

    if not args.eval_data:
        raise UserError("--eval-data: expected at least one text file")
    gaps = {k: v for k, v in (("gguf", args.max_gap_gguf), ("gptq", args.max_gap_gptq)) if v is not None}
    report = verify(args.intckpt, args.gguf, args.gptq, args.eval_data, args.eval_seq_len, args.eval_windows,
                    args.protocol, gaps, args.report)
    print(markdown(report))
    return EXIT_OK


def cmd_inspect(args) -> int:
    from .inspect import inspect_path

    print(inspect_path(args.target))
    return EXIT_OK


def cmd_run(args) -> int:
    from .run import run_pipeline

    report = run_pipeline(args)
    return EXIT_OK if report.get("parity", {}).get("passed", True) else EXIT_CHECK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lrqat", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="LR-QAT: prepare, train, fuse → IntCheckpoint in OUT")
    p.add_argument("--model", default="smollm2-135m", help="HF model dir, .gguf file, or smollm2-135m (default)")
    p.add_argument("--out", required=True, help="output directory (IntCheckpoint + resumable train state)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--method", default="lrqat", choices=["lrqat", "full-qat", "peqa", "qlora", "qalora", "lora-fp"],
                   help="lrqat (default); baselines on the same loop: full-qat (LSQ: all weights + scales), peqa "
                        "(scales only), qlora (NF4 base + LoRA, merged then RTN), qalora (group-pooled LoRA merged "
                        "into zero points), lora-fp (float LoRA control: writes a float HF model)")
    p.add_argument("--init", help="IntCheckpoint (e.g. from `lrqat ptq --method gptq`) whose codes and scales start "
                                  "the training (lrqat: Φ0 = its codes exactly)")
    p.add_argument("--lr-weight", type=float, help="full-qat: learning rate of the weights (default 5e-5, the paper's)")
    _add_spec_args(p), _add_data_args(p, True, False), _add_train_args(p, steps=300), _add_trust_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ptq", help="post-training quantization baseline → IntCheckpoint")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="rtn", help="rtn (round to nearest after range search) or gptq (GPTQModel "
                                                   "on CPU, symmetric grids; calibrated on --calib-data)")
    p.add_argument("--calib-data", nargs="+", help="gptq: calibration text files (default: the embedded corpus)")
    p.add_argument("--calib-windows", type=int, default=64, help="gptq: calibration windows (default 64)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="gptq: calibration window length (default 256)")
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
    e = esub.add_parser("gguf", help="llama.cpp GGUF (Q4_0 / Q4_1 / Q8_0 blocks written from the integers)")
    e.add_argument("intckpt")
    e.add_argument("--out", required=True, help="output .gguf file")
    e.add_argument("--embed-type", default="f16", choices=["f16", "q8_0", "f32"],
                   help="type of token embeddings / output (default f16)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export_gguf)
    e = esub.add_parser("gptq", help="GPTQ safetensors checkpoint (transformers, GPTQModel, AutoGPTQ, vLLM)")
    e.add_argument("intckpt")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2"],
                   help="gptq = AutoGPTQ v1 (stored zero - 1, default); gptq_v2 = true zeros (GPTQModel)")
    e.add_argument("--strict-vllm", action="store_true", help="fail (exit 2) when vLLM would reject the checkpoint")
    e.add_argument("--max-shard-size", default="4GB", help="shard safetensors above this size (default 4GB)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export_gptq)

    p = sub.add_parser("verify", help="parity of exports with the IntCheckpoint: weights and perplexity per runtime")
    p.add_argument("intckpt")
    p.add_argument("--gguf", help="GGUF file exported from INTCKPT (run by llama.cpp)")
    p.add_argument("--gptq", help="GPTQ directory exported from INTCKPT (loaded by transformers + GPTQModel)")
    p.add_argument("--report", help="directory for parity.json and parity.md")
    p.add_argument("--max-gap-gguf", type=float, help="max |relative ppl gap| for llama.cpp (default 0.01)")
    p.add_argument("--max-gap-gptq", type=float, help="max |relative ppl gap| for the GPTQ loader (default 0.002)")
    _add_data_args(p, False, True)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="types, shapes and metadata of an IntCheckpoint, a .gguf file or a GPTQ dir")
    p.add_argument("target")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="the whole pipeline on one model: FP and RTN baselines, LR-QAT, fuse, evaluate")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    # Defaults sized for ~15 min on 2 CPU cores (the GPTQ loader's fp16 matmuls dominate evaluation on CPU).
    _add_spec_args(p), _add_data_args(p, True, True, eval_windows=4), _add_train_args(p, steps=100)
    _add_trust_arg(p)
    p.add_argument("--ood-data", nargs="+", help="out-of-domain text evaluated beside --eval-data (default: the "
                                                 "held-out tail of the embedded corpus when training on other text)")
    p.set_defaults(func=cmd_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd != "train":
            from .distributed import launched_by_torchrun

            if launched_by_torchrun():
                raise UserError(f"lrqat {args.cmd}: expected a single process, got a torchrun launch (RANK/"
                                f"WORLD_SIZE set); only `lrqat train` runs distributed")
        return args.func(args)
    except UserError as e:
        print(f"lrqat {args.cmd}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except CheckFailed as e:
        print(f"lrqat {args.cmd}: check failed: {e}", file=sys.stderr)
        return EXIT_CHECK
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"lrqat {args.cmd}: error: could not write {e.filename or 'the output'}: {e.strerror} "
              f"(errno {errno.errorcode.get(e.errno, e.errno)}); nothing was published and earlier outputs are "
              f"unchanged", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
