"""The verbs behind the CLI, as functions taking config objects (app.jobs): train, ptq, evaluate, export, inspect.
`lrqat run` is app.run, `lrqat verify` app.verify. Each returns what it made; the CLI prints it."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from converters.sniff import artifact_kind

from ..core import data as D
from ..core.errors import UserError
from ..core.fsio import check_apart, check_output_path, check_run_output, claim_output
from ..core.intckpt import is_intckpt, load_intckpt, write_intckpt
from ..core.models import load_model, load_tokenizer
from ..methods import registry
from ..methods.common import check_weights_fit
from ..runtimes.torch_eval import perplexity
from ..train import dist as Dist
from ..train.job import check_launch, check_teacher_with_init, train_method
from ..train.state import CKPT_DIR, latest_checkpoint
from .jobs import EvalJob, EvalOptions, ExportGGUFJob, ExportGPTQJob, PtqJob, TrainJob


def train(job: TrainJob) -> dict:
    """Train `job.method` and leave the fused IntCheckpoint in `job.out` (with out/train_state for --resume).
    Under torchrun every rank calls this; rank 0 writes the result. Returns the job's result on every rank
    ("main": whether this process is the one that reports)."""
    # Bad options and wrong launches fail here, on every rank, before any process group exists.
    dist = Dist.from_env(job.device, job.dist_backend)
    check_launch(job.method, dist)
    cfg = job.train.resolved(job.method, registry.check_recipe(job.recipe), job.spec)
    check_teacher_with_init(cfg, job.init is not None)
    Dist.check_batch(cfg.batch_size, cfg.grad_accum, 1 if dist is None else dist.world_size)
    with Dist.session(dist):
        res = _train(job, dist)
    res["main"] = dist is None or dist.is_main
    return res


def _train(job: TrainJob, dist) -> dict:
    out = Path(job.out)
    check_apart(out, {"--model": job.model, "--init": job.init, "--train-data": list(job.data.train_data)})
    # One process claims OUT for the whole job (a second `lrqat train` or `--resume` of it is refused at once);
    # under torchrun the ranks check OUT together and are not claimed (a refusal on one rank would hang the others).
    with claim_output(out) if dist is None else contextlib.nullcontext():
        return _train_claimed(job, out, dist)


def _train_claimed(job: TrainJob, out: Path, dist) -> dict:
    if not job.resume:
        check_run_output(out, job.overwrite, hint=" (or --resume)")
    elif latest_checkpoint(out) is None and out.is_dir() and not job.overwrite:
        other = sorted(p.name for p in out.iterdir() if p.name != CKPT_DIR)
        if other:  # --resume of a run killed before its first checkpoint is fine; of some other directory, not
            raise UserError(f"--resume {out}: expected a training run directory, found no checkpoint but other "
                            f"files {other[:5]}")
    registry.check_grid(job.method, job.spec)
    Dist.barrier(dist)  # every rank has checked OUT before any rank writes to it
    t0 = time.perf_counter()
    model, tok, src = load_model(job.model, job.trust_remote_code)
    model.to(job.device if dist is None else dist.device)
    init_ck = None
    if job.init is not None:
        init_ck = load_intckpt(job.init)
        if init_ck.spec != job.spec:
            raise UserError(f"--init {job.init}: checkpoint spec is {init_ck.spec.name}, expected {job.spec.name}")
        check_weights_fit(model, init_ck)  # train_method loads its codes after the float teacher's pre-pass
    d = job.data
    windows = D.text_windows(tok, list(d.train_data), d.seq_len, d.max_train_windows,
                             what=f"train data {', '.join(d.train_data)}")
    t_load = time.perf_counter()
    res = train_method(model, tok, src.to_dict(), windows, job.method, job.spec, job.options, job.train, out,
                       list(d.train_data), resume=job.resume, progress=job.progress, init=init_ck, dist=dist,
                       recipe=job.recipe, init_weights=init_ck is not None)
    res["timings"]["load_s"] = t_load - t0
    return res


def ptq(job: PtqJob) -> Path:
    """RTN (our range search) or GPTQ (GPTQModel on CPU, calibrated on `calib_data`) → IntCheckpoint in `out`."""
    m = registry.get(job.method, trains=False)
    registry.check_grid(job.method, job.spec)
    check_apart(job.out, {"--model": job.model, "--calib-data": list(job.calib_data or [])})
    with claim_output(job.out):  # a second writer of `out` is refused at once
        check_output_path(Path(job.out), job.overwrite)
        return _ptq(job, m)


def _ptq(job: PtqJob, m) -> Path:
    model, tok, src = load_model(job.model, job.trust_remote_code)
    calib = None
    if m.calibrated or job.range_method == "imatrix":
        calib_data = list(job.calib_data or [D.DEFAULT_CORPUS])
        calib = D.text_windows(tok, calib_data, job.calib_seq_len, job.calib_windows,
                               what=f"calibration data {', '.join(calib_data)}")
    ck = m.quantize(model, tok, job.spec, src.to_dict(), job.range_method, calib)
    return write_intckpt(job.out, ck, tok, overwrite=job.overwrite)


def eval_windows(tok, ev: EvalOptions) -> torch.Tensor:
    """The evaluation windows of `ev` (its eval_data is checked non-empty by the caller, before any loading)."""
    return D.text_windows(tok, list(ev.eval_data), ev.seq_len, ev.windows,
                          what=f"eval data {', '.join(ev.eval_data)}")


def load_for_eval(target: str, trust_remote_code: bool = False):
    """(torch model, tokenizer, kind) for an IntCheckpoint directory or a float model M."""
    if is_intckpt(target):
        return load_intckpt(target).to_torch_model(), load_tokenizer(target), "intckpt"
    model, tok, _ = load_model(target, trust_remote_code)
    return model, tok, "float"


def evaluate(job: EvalJob) -> dict:
    """Perplexity of the target in the runtime its kind calls for (converters.sniff): llama.cpp for a .gguf,
    transformers + GPTQModel for a GPTQ directory, torch for an IntCheckpoint or a float model."""
    if not job.eval.eval_data:
        raise UserError("--eval-data: expected at least one text file")
    kind = artifact_kind(job.target, job.runtime)
    if kind == "gguf":  # real llama.cpp
        from converters.gguf_meta import open_gguf

        from ..runtimes.llamacpp import gguf_tokenizer, perplexity_gguf

        open_gguf(job.target)  # header, tensor table and data bounds checked before llama.cpp sees the file
        tok = load_tokenizer(job.tokenizer) if job.tokenizer else gguf_tokenizer(job.target)
        w = eval_windows(tok, job.eval)
        r, runtime = perplexity_gguf(job.target, w, job.eval.protocol), "llama.cpp"
    elif kind == "gptq":  # transformers + GPTQModel
        from converters.gptq import validate_gptq

        from ..runtimes.gptq_loader import perplexity_gptq

        validate_gptq(job.target)  # bits, shapes and tensors against its config, before the loader sees it
        tok = load_tokenizer(job.tokenizer or job.target)
        w = eval_windows(tok, job.eval)
        r, runtime = perplexity_gptq(job.target, w, job.eval.protocol), "transformers+gptqmodel"
    else:
        model, tok, kind = load_for_eval(job.target, job.trust_remote_code)
        w = eval_windows(tok, job.eval)
        r, runtime = perplexity(model, w, job.eval.protocol, progress=True), "torch"
    return {"target": job.target, "runtime": runtime, "kind": kind, "ppl": r["ppl"], "tokens": r["tokens"],
            "windows": int(w.shape[0]), "seq_len": job.eval.seq_len, "protocol": job.eval.protocol}


def export_gguf(job: ExportGGUFJob) -> Path:
    from converters.gguf import export_gguf as write

    return write(job.intckpt, job.out, embed_type=job.embed_type, overwrite=job.overwrite)


def export_gptq(job: ExportGPTQJob) -> Path:
    from converters.gptq import export_gptq as write

    return write(job.intckpt, job.out, fmt=job.format, strict_vllm=job.strict_vllm, overwrite=job.overwrite,
                 max_shard_size=job.max_shard_size)

