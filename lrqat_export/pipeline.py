"""The verbs behind the CLI, as functions: train (prepare → train → fuse → IntCheckpoint), ptq, evaluate."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from . import data as D
from . import distributed
from .errors import UserError
from .fsio import check_output_path, check_run_output
from .intckpt import fuse, is_intckpt, load_intckpt, ptq_rtn, write_intckpt
from .models import load_model, load_tokenizer
from .prepare import frozen_weight_bytes, parameter_counts, prepare
from .quant import QuantSpec
from .train import CKPT_DIR, TrainConfig, latest_checkpoint, train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LRQATOptions:
    rank: int = 32  # paper
    alpha: float = 1.0  # paper: α = 1, so α/r = 1/32
    phi: str = "int8"  # frozen-weight storage: int8 fixed point Q(b).(8-b) (paper default)
    range_method: str = "lp"  # scale init: Lp-norm (p = 4) grid search (paper)
    checkpointing: bool = True


def train_windows_for(tok, train_data: list[str], seq_len: int, max_windows: int | None) -> torch.Tensor:
    return D.text_windows(tok, train_data, seq_len, max_windows, what=f"train data {', '.join(train_data)}")


def run_train(
    model_name: str, train_data: list[str], out: str | Path, spec: QuantSpec, opts: LRQATOptions,
    cfg: TrainConfig, seq_len: int = 256, max_train_windows: int | None = None, resume: bool = False,
    overwrite: bool = False, progress: bool = True, device: str = "cpu", dist: distributed.Dist | None = None,
    trust_remote_code: bool = False, method: str = "lrqat", init: str | None = None,
    lr_weight: float | None = None,
) -> dict:
    """Train LR-QAT (or a baseline, `method`) and leave the fused IntCheckpoint in `out` (with out/train_state for
    --resume). init: an IntCheckpoint directory (e.g. GPTQ) whose codes and scales start the training.
    dist: this rank under torchrun (distributed.session); every rank calls run_train, rank 0 writes the result."""
    from .baselines import METHODS

    if method not in METHODS:
        raise UserError(f"--method: expected one of {METHODS}, got {method!r}")
    if dist is not None and method != "lrqat":
        raise UserError(f"--method {method}: under torchrun only lrqat is supported; run the baselines in one process")
    out = Path(out)
    distributed.check_batch(cfg.batch_size, cfg.grad_accum, 1 if dist is None else dist.world_size)
    if not resume:
        check_run_output(out, overwrite, hint=" (or --resume)")
    elif latest_checkpoint(out) is None and out.is_dir() and not overwrite:
        other = sorted(p.name for p in out.iterdir() if p.name != CKPT_DIR)
        if other:  # --resume of a run killed before its first checkpoint is fine; of some other directory, not
            raise UserError(f"--resume {out}: expected a training run directory, found no checkpoint but other "
                            f"files {other[:5]}")
    distributed.barrier(dist)  # every rank has checked OUT before any rank writes to it
    t0 = time.perf_counter()
    model, tok, src = load_model(model_name, trust_remote_code)
    model.to(device if dist is None else dist.device)
    init_ck = None
    if init is not None:
        from .gptq_ptq import load_weights_from

        init_ck = load_intckpt(init)
        if init_ck.spec != spec:
            raise UserError(f"--init {init}: checkpoint spec is {init_ck.spec.name}, expected {spec.name}")
        load_weights_from(model, init_ck)  # the frozen start is exactly the init checkpoint's codes
    windows = train_windows_for(tok, train_data, seq_len, max_train_windows)
    t_load = time.perf_counter()
    if method == "lrqat":
        res = train_and_fuse(model, tok, src.to_dict(), windows, spec, opts, cfg, out, train_data, resume=resume,
                             progress=progress, init=init_ck, dist=dist)
    else:
        res = train_and_fuse_baseline(model, tok, src.to_dict(), windows, method, spec, opts, cfg, out, train_data,
                                      resume=resume, progress=progress, init=init_ck, lr_weight=lr_weight)
    res["timings"]["load_s"] = t_load - t0
    return res


def train_and_fuse(model, tok, source: dict, windows: torch.Tensor, spec: QuantSpec, opts: LRQATOptions,
                   cfg: TrainConfig, out: Path, train_data: list[str], resume: bool = False, progress: bool = True,
                   init=None, dist: distributed.Dist | None = None) -> dict:
    """prepare → train → fuse → IntCheckpoint written in `out` (beside out/train_state). `init`: an IntCheckpoint
    whose scales start the training (e.g. the RTN baseline) instead of a new range search. `dist`: shard with FSDP2
    after prepare, train on this rank's slice of each global batch, fuse and write on rank 0."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)  # B's Kaiming init: the same run gives the same model in every process
    prepare(model, spec, opts.rank, opts.alpha, opts.phi, opts.range_method, opts.checkpointing, init=init)
    counts = parameter_counts(model)
    log.info("trainable parameters: %d of %d (%.2f %%); frozen weights %d bytes", counts["trainable"],
             counts["total"], 100 * counts["trainable"] / counts["total"], frozen_weight_bytes(model))
    if dist is not None:
        distributed.shard(model, dist)
    t_prep = time.perf_counter()
    history = train(model, windows, cfg, out, resume=resume, progress=progress, dist=dist)
    t_train = time.perf_counter()
    extra = {
        "training": {"config": dataclasses.asdict(cfg), "lrqat": dataclasses.asdict(opts),
                     "seq_len": int(windows.shape[1]), "train_data": train_data,
                     "train_windows": int(windows.shape[0]), **distributed.training_metadata(dist),
                     "final_loss": history[-1]["loss"] if history else None},
        "parameters": counts,
    }
    ckpt = fuse(model, source, extra=extra) if dist is None else distributed.fuse_on_main(model, source, extra, dist)
    if ckpt is not None:
        write_intckpt(out, ckpt, tok, in_place=True)
    distributed.barrier(dist)
    return {"intckpt": str(out.resolve()), "parameters": counts, "history": history,
            "timings": {"prepare_s": t_prep - t0, "train_s": t_train - t_prep, "fuse_s": time.perf_counter() - t_train}}


PTQ_METHODS = ("rtn", "gptq")


def run_ptq(model_name: str, out: str | Path, spec: QuantSpec, method: str = "rtn", range_method: str = "lp",
            overwrite: bool = False, calib_data: list[str] | None = None, calib_windows: int = 64,
            calib_seq_len: int = 256, trust_remote_code: bool = False) -> Path:
    """RTN (our range search) or GPTQ (GPTQModel on CPU, calibrated on `calib_data`) → IntCheckpoint in `out`."""
    if method not in PTQ_METHODS:
        raise UserError(f"--method: expected one of {PTQ_METHODS}, got {method!r}")
    check_output_path(Path(out), overwrite)
    model, tok, src = load_model(model_name, trust_remote_code)
    if method == "rtn":
        return write_intckpt(out, ptq_rtn(model, spec, src.to_dict(), range_method), tok, overwrite=overwrite)
    from .gptq_ptq import ptq_gptq

    calib = D.text_windows(tok, calib_data or ["pydoc"], calib_seq_len, calib_windows,
                           what=f"calibration data {', '.join(calib_data or ['pydoc'])}")
    return write_intckpt(out, ptq_gptq(model, tok, spec, src.to_dict(), calib), tok, overwrite=overwrite)


def train_and_fuse_baseline(model, tok, source: dict, windows: torch.Tensor, method: str, spec: QuantSpec,
                            opts: LRQATOptions, cfg: TrainConfig, out: Path, train_data: list[str],
                            resume: bool = False, progress: bool = True, init=None,
                            lr_weight: float | None = None) -> dict:
    """A baseline (baselines.py) through the same loop: prepare → train → IntCheckpoint in `out` (lora-fp, the float
    control: the merged float model as a HF directory)."""
    from .baselines import FULL_QAT_LR_W, fuse_baseline, merged_float_model, param_groups, prepare_baseline
    from .prepare import trainable_parameters

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    prepare_baseline(model, method, spec, opts.rank, opts.alpha, opts.checkpointing, init=init,
                     range_method=opts.range_method)
    n_train = sum(p.numel() for p in trainable_parameters(model).values())
    t_prep = time.perf_counter()
    groups = param_groups(method, cfg, FULL_QAT_LR_W if lr_weight is None else lr_weight)
    history = train(model, windows, cfg, out, resume=resume, progress=progress, groups=groups, desc=method)
    t_train = time.perf_counter()
    info = {"training": {"config": dataclasses.asdict(cfg), "method": method, "lrqat": dataclasses.asdict(opts),
                         "groups": groups, "seq_len": int(windows.shape[1]), "train_data": train_data,
                         "train_windows": int(windows.shape[0]),
                         "final_loss": history[-1]["loss"] if history else None},
            "parameters": {"trainable": n_train}}
    if method == "lora-fp":
        import os
        import tempfile

        from .fsio import write_json

        merged_float_model(model)
        with tempfile.TemporaryDirectory(dir=out, prefix=".hf.") as tmp:  # whole files only, as write_intckpt does
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for f in Path(tmp).iterdir():
                os.replace(f, out / f.name)
        write_json(out / "lrqat_baseline.json", info)
    else:
        write_intckpt(out, fuse_baseline(model, method, spec, source, opts.range_method, info), tok, in_place=True)
    return {"intckpt": str(out.resolve()), "parameters": {"trainable": n_train}, "history": history,
            "timings": {"prepare_s": t_prep - t0, "train_s": t_train - t_prep, "fuse_s": time.perf_counter() - t_train}}


def load_for_eval(target: str, trust_remote_code: bool = False):
    """(torch model, tokenizer, kind) for an IntCheckpoint directory or a float model M."""
    if is_intckpt(target):
        ck = load_intckpt(target)
        return ck.to_torch_model(), load_tokenizer(target), "intckpt"
    model, tok, _ = load_model(target, trust_remote_code)
    return model, tok, "float"


def eval_windows(tok, eval_data: list[str], seq_len: int, max_windows: int | None) -> torch.Tensor:
    return D.text_windows(tok, eval_data, seq_len, max_windows, what=f"eval data {', '.join(eval_data)}")


def target_kind(target: str, runtime: str = "auto") -> str:
    """'gguf' (run by llama.cpp), 'gptq' (GPTQ directory), 'intckpt' or 'float' (torch)."""
    p = Path(target)
    if runtime == "torch":
        return "intckpt" if is_intckpt(p) else "float"
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir() and (p / "quantize_config.json").is_file():
        return "gptq"
    return "intckpt" if is_intckpt(p) else "float"
