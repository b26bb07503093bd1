"""The verbs' inputs as config objects: the Python API (app.verbs, app.run) takes these; the CLI builds them from
its options and reads its defaults from them, and from methods.registry for the per-method values, so both get
the same value for every default.

    from lrqat_export.app import jobs, verbs
    verbs.train(jobs.TrainJob(out="ck", model="smollm2-135m", spec=PRESETS["q4_0"], train=TrainConfig(steps=300)))
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..core.models import DEFAULT_MODEL
from ..core.quant import DEFAULT_PRESET, PRESETS, QuantSpec
from ..methods.common import MethodOptions
from ..methods.registry import DEFAULT_RECIPE
from ..train.config import TrainConfig

# Relative perplexity gap each runtime's own arithmetic may add (the weights themselves are checked exactly):
# llama.cpp quantizes activations to 8 bits in its CPU dot products; the GPTQ loader's default CPU kernel for 4-bit
# (aten int4 matmul) casts activations *and the scales* to bf16 (8 mantissa bits), so every row's weights move by up
# to 2^-9 relative: measured on SmolLM2 w4pc +0.07 % and −0.52 % (2-step models, 2 windows) and +0.23 % (the
# 100-step main job, 4 windows), where fp16 TorchLinear gave ±0.02 %. Both runtimes get the same ±1 %.
DEFAULT_MAX_GAP = {"gguf": 0.01, "gptq": 0.01}

RUN_STEPS = 100  # `lrqat run`'s budget: sized for minutes on 2 CPU cores (`lrqat train` defaults to TrainConfig's)
RUN_EVAL_WINDOWS = 4  # `lrqat run`'s evaluation windows (each is scored in torch, llama.cpp and the GPTQ loader)


@dataclass(frozen=True)
class DataOptions:
    """Training text → windows."""

    train_data: tuple[str, ...] = ("pydoc",)  # text files; "pydoc" = the embedded corpus
    seq_len: int = 256  # training window length in tokens
    max_train_windows: int | None = None


@dataclass(frozen=True)
class EvalOptions:
    """Evaluation text → windows, and how they are scored."""

    eval_data: tuple[str, ...] | None = None  # text files; "pydoc" = the embedded corpus
    seq_len: int = 512
    windows: int = 8
    protocol: str = "full"  # "full" or "second_half" (llama-perplexity's)


@dataclass(frozen=True)
class TrainJob:
    """`lrqat train`: a method (methods.registry) trained and fused into an IntCheckpoint in `out`."""

    out: str
    model: str = DEFAULT_MODEL
    method: str = "lrqat"
    spec: QuantSpec = PRESETS[DEFAULT_PRESET]
    options: MethodOptions = MethodOptions()
    train: TrainConfig = TrainConfig()
    data: DataOptions = DataOptions()
    init: str | None = None  # an IntCheckpoint whose codes and scales start the training
    recipe: str = DEFAULT_RECIPE  # the named set of per-method defaults that fills unset options
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    dist_backend: str = "auto"  # under torchrun: auto, gloo or nccl
    trust_remote_code: bool = False
    progress: bool = True


@dataclass(frozen=True)
class PtqJob:
    """`lrqat ptq`: a post-training quantization baseline (rtn or gptq) as an IntCheckpoint in `out`."""

    out: str
    model: str = DEFAULT_MODEL
    method: str = "rtn"
    spec: QuantSpec = PRESETS[DEFAULT_PRESET]
    range_method: str = "lp"  # the RTN baseline's: weight-only (imatrix: calibrated on calib_data)
    calib_data: tuple[str, ...] | None = None  # gptq, imatrix rtn: calibration text (default: the embedded corpus)
    calib_windows: int = 64
    calib_seq_len: int = 256
    overwrite: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class EvalJob:
    """`lrqat eval`: perplexity of an IntCheckpoint / float model (torch), a .gguf (llama.cpp) or a GPTQ dir."""

    target: str
    eval: EvalOptions = EvalOptions()
    runtime: str = "auto"  # "torch": read a .gguf as a float model
    tokenizer: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ExportGGUFJob:
    intckpt: str
    out: str
    # token embeddings / output: auto (a K plan: llama.cpp's choice, Q6_K/Q8_0; else f16), f16, q8_0, f32, q6_k, ...
    embed_type: str = "auto"
    overwrite: bool = False


@dataclass(frozen=True)
class ExportGPTQJob:
    intckpt: str
    out: str
    format: str = "gptq"  # gptq (AutoGPTQ v1) or gptq_v2
    strict_vllm: bool = False
    max_shard_size: str = "4GB"
    overwrite: bool = False


@dataclass(frozen=True)
class VerifyJob:
    """`lrqat verify`: weights read back and perplexity parity of the exports of `intckpt`."""

    intckpt: str
    gguf: str | None = None
    gptq: str | None = None
    eval: EvalOptions = EvalOptions()
    report: str | None = None  # directory for parity.json / parity.md
    max_gap: dict[str, float] = field(default_factory=dict)  # runtime → max |relative ppl gap| (default: DEFAULT_MAX_GAP)


@dataclass(frozen=True)
class RunJob:
    """`lrqat run`: FP and RTN baselines, LR-QAT, fuse, export GGUF + GPTQ, verify, one report in `out`."""

    out: str
    model: str = DEFAULT_MODEL
    spec: QuantSpec = PRESETS[DEFAULT_PRESET]
    # A 135M model on a CPU has memory to spare: keeping the weight-sized intermediates makes a step 1.7× faster than
    # recomputing them (same numbers); `lrqat train` keeps the memory-saving default for large models.
    options: MethodOptions = MethodOptions(checkpointing=False)
    train: TrainConfig = TrainConfig(steps=RUN_STEPS)
    data: DataOptions = DataOptions()
    eval: EvalOptions = EvalOptions(windows=RUN_EVAL_WINDOWS)
    ood_data: tuple[str, ...] | None = None  # out-of-domain text (default: the embedded corpus' tail)
    recipe: str = DEFAULT_RECIPE
    resume: bool = False
    overwrite: bool = False
    device: str = "cpu"
    trust_remote_code: bool = False


def replace(obj, **changes):
    """dataclasses.replace, ignoring None values (an option the user did not give keeps its default)."""
    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if v is not None})
