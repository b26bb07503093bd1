"""One method's whole training job on a loaded model: prepare → train → fuse → IntCheckpoint in `out`.

Every trained method goes through `train_method`; what differs between methods (layers, parameter groups, defaults,
fuse, float or integer output) comes from methods.registry. The app's verbs (`lrqat train`, `lrqat run`) load the
model and data and call this.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.fsio import write_json
from ..core.intckpt import IntCheckpoint, write_intckpt
from ..core.quant import QuantSpec
from ..methods import registry
from ..methods.baselines import merged_float_model
from ..methods.common import MethodOptions, load_weights_from
from ..methods.rtn import rtn_start
from . import dist as D
from . import fsdp
from . import objective
from .config import TrainConfig
from .loop import batch_indices, train
from .memory import available_bytes

log = logging.getLogger(__name__)

BASELINE_INFO = "lrqat_baseline.json"  # what the float control writes beside its Hugging Face files


def check_launch(method: str, dist: D.Dist | None) -> registry.Method:
    """The trained method `method`, refused under torchrun unless it trains distributed."""
    m = registry.get(method, trains=True)
    if dist is not None and not m.distributed:
        raise UserError(f"--method {method}: under torchrun only "
                        f"{', '.join(n for n, x in registry.METHODS.items() if x.distributed)} is supported; run the "
                        f"baselines in one process")
    return m


def imatrix_start(model, spec: QuantSpec, source: dict, windows: torch.Tensor, method: str,
                  uses_init: bool) -> IntCheckpoint:
    """--range-method imatrix in a training run: the RTN start whose scales were searched with the float model's
    input importance over the first IMATRIX_WINDOWS training windows (methods.rtn); every method that starts from
    an IntCheckpoint starts from it."""
    if not uses_init:
        raise UserError(f"--range-method imatrix: method {method} does not start from a range-searched "
                        f"checkpoint; use lp, mse or minmax")
    return rtn_start(model, spec, source, "imatrix", windows)


def train_method(model, tok, source: dict, windows: torch.Tensor, method: str, spec: QuantSpec,
                 opts: MethodOptions, cfg: TrainConfig, out: Path, train_data: list[str], resume: bool = False,
                 progress: bool = True, init: IntCheckpoint | None = None, dist: D.Dist | None = None,
                 recipe: str = registry.DEFAULT_RECIPE, init_weights: bool = False) -> dict:
    """prepare → train → fuse → IntCheckpoint written in `out` (beside out/train_state); the float control
    (output "float") writes its merged float model as a Hugging Face directory instead.

    init: an IntCheckpoint whose scales (and codes, for methods with uses_init) start the training instead of a new
    range search (e.g. the RTN baseline). dist: shard with FSDP2 after prepare, train on this rank's slice of each
    global batch, fuse and write on rank 0 (methods with `distributed` only). recipe: the named set of defaults
    (methods.registry) that fills unset options. With a distillation objective the float model's targets are taken
    before it is prepared (teacher_targets). init_weights: then put init's dequantized weights into the model
    (load_weights_from: the frozen start is exactly init's codes, `lrqat train --init`), after the teacher's
    pre-pass, so the teacher stays the float model."""
    m = check_launch(method, dist)
    registry.check_grid(method, spec)
    opts, cfg = registry.resolve_options(method, opts, recipe, spec), cfg.resolved(method, recipe, spec)
    check_teacher_with_init(cfg, init is not None and init_weights)
    out = Path(out)
    t0 = time.perf_counter()
    teacher = teacher_targets(model, windows, cfg, progress and (dist is None or dist.is_main), method)
    t_teacher = time.perf_counter()
    if init is not None and init_weights:
        load_weights_from(model, init)
    if init is None and opts.range_method == "imatrix":
        init = imatrix_start(model, spec, source, windows, method, m.uses_init)
    torch.manual_seed(cfg.seed)  # adapters' Kaiming init: the same run gives the same model in every process
    m.prepare(model, spec, opts, init if m.uses_init else None)
    counts = m.counts(model)
    if cfg.objective != "ce" and cfg.kd_teacher == "online":
        teacher = online_teacher(model, method, cfg)
    log.info("%s: trainable parameters %s", method, counts)
    if dist is not None:
        fsdp.shard(model, dist)
    t_prep = time.perf_counter()
    history = train(model, windows, cfg, out, resume=resume, progress=progress, dist=dist, method=method, opts=opts,
                    teacher=teacher, recipe=recipe, spec=spec)
    t_train = time.perf_counter()
    extra = {
        "training": {"config": dataclasses.asdict(cfg), "method": method, "recipe": recipe,
                     "lrqat": dataclasses.asdict(opts),
                     "teacher": None if teacher is None else {
                         "mode": cfg.kd_teacher, "topk": teacher.topk, "temperature": teacher.temperature,
                         **({"windows": len(teacher.ids), "mean_rest_mass": teacher.rest_mass}
                            if isinstance(teacher, objective.TeacherCache) else {})},
                     "groups": registry.param_groups(method, cfg.hyper(opts)), "seq_len": int(windows.shape[1]),
                     "train_data": train_data, "train_windows": int(windows.shape[0]),
                     **D.training_metadata(dist), "final_loss": history[-1]["loss"] if history else None},
        "parameters": counts,
    }
    moved = None  # LR-QAT: how many integers the adapters moved (the fused manifest's "adapters")
    if m.output == "float":
        _write_float_model(model, tok, out, extra)
    else:
        ckpt = (m.fuse(model, spec, source, opts, extra) if dist is None
                else fsdp.fuse_on_main(model, source, extra, dist, spec))
        if ckpt is not None:
            write_intckpt(out, ckpt, tok, in_place=True)
            moved = ckpt.manifest.get("adapters")
    D.barrier(dist)
    return {"intckpt": str(out.resolve()), "parameters": counts, "history": history, "adapters": moved,
            "timings": {"teacher_s": t_teacher - t0, "prepare_s": t_prep - t_teacher, "train_s": t_train - t_prep,
                        "fuse_s": time.perf_counter() - t_train}}


def teacher_targets(model, windows: torch.Tensor, cfg: TrainConfig, progress: bool = False, method: str = "lrqat",
                    ) -> objective.TeacherCache | None:
    """The float `model`'s top-k targets on every window the run will draw (none for the ce objective, or when
    the teacher is online: online_teacher after prepare). Call it before the model is prepared: the float model is
    the teacher. A cache that would not fit in half the available host memory is refused before the pre-pass."""
    if cfg.objective == "ce" or cfg.kd_teacher == "online":
        return None
    n = int(windows.shape[0])
    drawn = sorted({int(i) for s in range(cfg.steps) for i in batch_indices(s, cfg.batch_size, n, cfg.seed)})
    available = available_bytes()
    if available is not None:
        objective.check_cache_fits(objective.cache_bytes(len(drawn), int(windows.shape[1]), cfg.kd_topk), available,
                                   method)
    return objective.build_teacher_cache(model, windows, drawn, cfg.kd_topk, cfg.kd_temperature, cfg.bf16,
                                         progress)


def check_teacher_with_init(cfg: TrainConfig, init_weights: bool) -> None:
    """Refuse the online teacher when the frozen start is replaced by an --init checkpoint's weights: the online
    teacher is the prepared model's own Φ0, which then holds the init's codes, so the run would distil from the
    init model (KL 0 at the start) instead of the float one. cfg: resolved (its objective set)."""
    if init_weights and cfg.objective != "ce" and cfg.kd_teacher == "online":
        raise UserError("--kd-teacher online with --init: expected the float model as the teacher, but the online "
                        "teacher is the model's own frozen weights, which --init replaces by the init's codes; "
                        "use --kd-teacher cache (the float model's pre-pass runs before --init is loaded)")


def online_teacher(model, method: str, cfg: TrainConfig) -> objective.OnlineTeacher:
    """The prepared `model` as its own float teacher (--kd-teacher online): only methods whose frozen state keeps
    the float weights (registry teacher_mode: LR-QAT's Φ0 with its initial scales)."""
    mode = registry.get(method).teacher_mode
    if mode is None:
        able = [n for n, m in registry.METHODS.items() if m.teacher_mode is not None]
        raise UserError(f"--kd-teacher online: expected a method whose frozen weights hold the float model "
                        f"({', '.join(able)}), got {method}; use --kd-teacher cache")
    with mode(model):  # refuses here, before training, when Φ0 holds only the codes
        pass
    return objective.OnlineTeacher(model, mode, cfg.kd_topk, cfg.kd_temperature)


def _write_float_model(model, tok, out: Path, info: dict) -> None:
    """The float control's merged model as a Hugging Face directory in `out`, whole files only (as write_intckpt)."""
    merged_float_model(model)
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf.") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, out / f.name)
    write_json(out / BASELINE_INFO, info)
