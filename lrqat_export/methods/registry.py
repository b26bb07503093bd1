"""Every method the tool offers, each defined once: what it trains, its defaults, how it is prepared, which
parameters the optimizer takes and at what learning rate, how it becomes an IntCheckpoint, and whether that
checkpoint is exactly the model that was trained.

The CLI (`lrqat train --method`, `lrqat ptq --method`), the Python API (app.jobs) and the benchmarks read their
choices and defaults from here, so a method's default has one spelling and one value (tests/test_architecture.py
compares them). Adding a method means adding its layer module and one entry below.

Recipe "default" (every method distills from the float model: objective kl; `--recipe paper` gives each method
its paper's values and cross-entropy):

    method     trains                    defaults (alpha, lr_ab, lr_scale, lr_weight)   output         exact export
    lrqat      A, B, s (inside ⌊·⌉)      16, 3e-3, 1e-4, Φ0 bf16                        IntCheckpoint  yes
                                         (grouped grids: the imatrix start; groups of 32:
                                          lr_scale 2e-4, ab_init grad; larger groups:
                                          lr_ab 6e-3, lr_scale 4e-4; peqa takes the same
                                          scale lr and start, full-qat the start)
                                         (paper: 1, 1e-3, 1e-5, Φ0 int8)
    full-qat   W, s (LSQ)                lr_scale 1e-5, lr_weight 5e-5 (the paper's)    IntCheckpoint  yes
    peqa       s                         lr_scale 3e-4 (grouped: LR-QAT's lr_scale;      IntCheckpoint  yes
                                         paper recipe: 1e-4)
    qlora      A, B on an NF4 base       16, 2e-4 (QLoRA's)                             merged → RTN   no
    qalora     A, B on pooled inputs     16, 2e-4                                       zeros rounded  no
    lora-fp    A, B on the float model   16, 2e-4 (the float control)                   float model    —
    rtn        — (PTQ)                   range search                                   IntCheckpoint  yes
    gptq       — (PTQ, GPTQModel)        calibration windows                            IntCheckpoint  yes
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..core.errors import UserError
from . import baselines, gptq_ptq, lrqat, rtn
from .common import MethodOptions, trainable_parameters

# One optimizer parameter group: (name, parameter-name suffixes it takes, lr, weight decay).
ParamGroup = tuple[str, tuple[str, ...], float, float]

FULL_QAT_WD_W = 0.1  # the paper: weight decay 0.1 on the full-model weights
GROUPED_LR_SCALE = 4e-4  # LR-QAT's and PEQA's scale lr on grouped one-level grids (the default recipe) ...
GROUP32_LR_SCALE = 2e-4  # ... and on those with groups of 32 (q4_0, q4_1, q5_0, q8_0): BENCHMARKS.md, run IMXS2
GROUPED_LR_AB = 6e-3  # LR-QAT's A·B lr on grouped grids with groups larger than 32 (w3g64): BENCHMARKS.md, W3A6L
# the per-method defaults
HYPERPARAMETERS = ("alpha", "lr_ab", "lr_scale", "lr_weight", "objective", "phi", "ab_init", "range_method")
# A recipe is a named set of per-method defaults. "default" is `Method.defaults`, then `Method.grid_defaults(spec)`
# where a default depends on the grid; every other recipe overrides some of them (`Method.recipes[name]`).
# "paper": each method's own paper's settings, trained on cross-entropy.
RECIPES = ("default", "paper")
DEFAULT_RECIPE = "default"


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line: --help and docs
    trains: bool  # False: post-training quantization (no training loop)
    output: str  # "intckpt" | "float" (the float control writes a Hugging Face directory)
    exact: bool  # its IntCheckpoint reproduces the trained (or quantized) model's logits bit for bit
    defaults: Mapping[str, float | str | None] = field(default_factory=dict)  # HYPERPARAMETERS, "default" recipe
    recipes: Mapping[str, Mapping[str, float | str | None]] = field(default_factory=dict)  # recipe → overrides
    # the "default" recipe's values that depend on the grid: (QuantSpec) -> overrides of `defaults`
    grid_defaults: Callable[[Any], Mapping[str, float | str | None]] | None = None
    distributed: bool = False  # trains under torchrun (FSDP2)
    uses_init: bool = False  # an --init IntCheckpoint's codes and scales start the training
    prepare: Callable[..., Any] | None = None  # (model, spec, opts, init) -> model
    groups: Callable[[Mapping[str, float]], list[ParamGroup]] | None = None  # resolved hyperparameters -> groups
    fuse: Callable[..., Any] | None = None  # (model, spec, source, opts, extra) -> IntCheckpoint
    # PTQ methods: (model, tok, spec, source, range_method, calib windows | None) -> IntCheckpoint
    quantize: Callable[..., Any] | None = None
    calibrated: bool = False  # quantize needs calibration windows (--calib-data)
    k_grids: bool = False  # trains / quantizes on GGUF K grids and per-layer plans (q4_k, q4_k_m, ...)
    # before the first step: (model, opts, steps, loss_fn, gather | None) -> dict, a data-aware start (LR-QAT's
    # ab_init); steps: this rank's micro-batches of each first step; gather: every rank's terms in rank order
    data_init: Callable[..., Any] | None = None
    # (model) -> context manager in which the prepared model computes as its float source (--kd-teacher online)
    teacher_mode: Callable[..., Any] | None = None
    counts: Callable[[Any], dict] = lambda model: {  # noqa: E731 - what `lrqat train` reports as trainable
        "trainable": sum(p.numel() for p in trainable_parameters(model).values())}


def _fuse_baseline(name: str):
    def fuse(model, spec, source, opts, extra):
        return baselines.fuse_baseline(model, name, spec, source, opts.builder_range, METHODS[name].exact, extra)

    return fuse


def _ab(h) -> list[ParamGroup]:
    return [("ab", ("lora_A", "lora_B"), h["lr_ab"], h["weight_decay"])]


def grouped_grid(spec) -> bool:
    """A single-level grid with a scale per group of input features (q4_0, w3g64, ...): not per channel, not K."""
    return spec.group_size != -1 and not spec.super_block


def grouped_lr_scale(spec) -> float:
    """The default recipe's scale lr of LR-QAT and PEQA on a grouped grid: 2e-4 with groups of 32 (q4_0: over three
    seeds from the imatrix start, 61.5 % of the out-of-domain gap against 3e-4's 59.6 %, LR-QAT below PEQA on each),
    4e-4 with larger groups (w3g64 over three seeds from the imatrix start: LR-QAT 30.07 / 14.948 in / out of domain
    against 3e-4's 30.54 / 14.981 and 2e-4's 31.11 / 15.130; measured at groups of 64 only)."""
    return GROUP32_LR_SCALE if spec.group_size == 32 else GROUPED_LR_SCALE


def _grouped_scales(spec) -> dict:
    """LR-QAT's and PEQA's default on a grouped grid: the scale lr (`grouped_lr_scale`) and the imatrix start."""
    return {"lr_scale": grouped_lr_scale(spec), **_IMATRIX_START} if grouped_grid(spec) else {}


def _lrqat_grid(spec) -> dict:
    """LR-QAT's default on a grouped grid: the grouped scales and start (`_grouped_scales`); with groups of 32, B
    starts in the loss gradient's row space (runs GE, GS2, GP); with larger groups A·B learns at `GROUPED_LR_AB` from
    the Kaiming start (w3g64 over five seeds: 30.01 / 14.887 in / out of domain against 30.28 / 14.980 with lr 3e-3
    and the gradient start, lower in domain on each seed; BENCHMARKS.md, "A·B at w3g64")."""
    if not grouped_grid(spec):
        return {}
    adapters = {"ab_init": "grad"} if spec.group_size == 32 else {"lr_ab": GROUPED_LR_AB, "ab_init": "lora"}
    return {**_grouped_scales(spec), **adapters}


# the default recipe's start on grouped grids, for every method that starts from a checkpoint (one start for all)
_IMATRIX_START = {"range_method": "imatrix"}


def _start_on(spec) -> dict:
    return dict(_IMATRIX_START) if grouped_grid(spec) else {}


# QLoRA's α and lr
_LORA = {"alpha": 16.0, "lr_ab": 2e-4, "lr_scale": 1e-5, "lr_weight": None, "objective": "kl", "phi": None,
         "ab_init": None, "range_method": "lp"}
_LORA_PAPER = {"paper": {"alpha": 16.0, "lr_ab": 2e-4, "objective": "ce"}}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lrqat", "LR-QAT: low-rank A·B inside the rounding of frozen int8 Φ0, learned fp16 scales",
           trains=True, output="intckpt", exact=True, distributed=True, uses_init=True,
           # distillation; α 16 and lr 3e-3 let A·B cross the rounding dead zone of Φ0 within a short budget
           # (BENCHMARKS.md, "The default recipe: a sweep"); the paper's values stay as recipe "paper"
           # Φ0 in bf16 (2 bytes a weight) by default: the paper's int8 Q4.4 keeps every weight at least 1/16 of a
           # step from a rounding boundary, a dead zone A·B must cross before any code moves (the sweep: 58.9 % →
           # 61.7 % of the w4pc out-of-domain gap); --phi int8 halves the frozen weights' memory
           # grouped one-level grids (q4_0, w3g64, ...): their many scales learn faster; with groups of 32 B starts
           # in the row space of the first steps' loss gradient (BENCHMARKS.md, the sweep: runs GE, GS2, GP), with
           # larger groups A·B learns faster from the Kaiming start (`_lrqat_grid`)
           # on grouped grids the start is RTN with llama.cpp's imatrix-weighted scale search on the float model's
           # inputs (BENCHMARKS.md, "The imatrix start": w3g64 18.38 → 15.00 out of domain); per channel it cost in
           # domain and on K plans it left trained LR-QAT level (Q4_K_M 8.955 → 8.930 out of domain, 24.43 → 24.47
           # in), so both keep the weight-only Lp search
           defaults={"alpha": 16.0, "lr_ab": 3e-3, "lr_scale": 1e-4, "lr_weight": None, "objective": "kl",
                     "phi": "bf16", "ab_init": "lora", "range_method": "lp"},
           grid_defaults=_lrqat_grid,
           recipes={"paper": {"alpha": 1.0, "lr_ab": 1e-3, "lr_scale": 1e-5, "objective": "ce", "phi": "int8",
                              "ab_init": "lora"}},
           prepare=lrqat.prepare,
           groups=lambda h: [("ab", ("lora_A", "lora_B"), h["lr_ab"], h["weight_decay"]),
                             ("scale", (".scale", ".kmin"), h["lr_scale"], h["weight_decay"])],
           fuse=lambda model, spec, source, opts, extra: lrqat.fuse(model, source, extra, spec), k_grids=True,
           counts=lrqat.parameter_counts,
           data_init=lambda model, opts, steps, loss_fn, gather: lrqat.data_aware_init(model, steps, opts.ab_init,
                                                                                       loss_fn, gather=gather),
           teacher_mode=lrqat.as_teacher),
    Method("full-qat", "full-model QAT (LSQ): all weights and scales trained", trains=True, output="intckpt",
           exact=True, uses_init=True,
           defaults={"alpha": 1.0, "lr_ab": 1e-3, "lr_scale": 1e-5, "lr_weight": 5e-5, "objective": "kl",
                     "phi": None, "ab_init": None, "range_method": "lp"},
           grid_defaults=_start_on, recipes={"paper": {"lr_scale": 1e-5, "lr_weight": 5e-5, "objective": "ce"}},
           prepare=baselines.prepare_full_qat, fuse=_fuse_baseline("full-qat"),
           groups=lambda h: [("weight", (".weight",), h["lr_weight"], FULL_QAT_WD_W),
                             ("scale", (".scale",), h["lr_scale"], 0.0)]),
    Method("peqa", "PEQA: frozen RTN codes, scales trained", trains=True, output="intckpt", exact=True,
           uses_init=True,
           defaults={"alpha": 1.0, "lr_ab": 1e-3, "lr_scale": 3e-4, "lr_weight": None, "objective": "kl",
                     "phi": None, "ab_init": None, "range_method": "lp"},
           grid_defaults=_grouped_scales,  # LR-QAT's start and scale lr on grouped grids: LR-QAT is PEQA plus adapters
           recipes={"paper": {"lr_scale": 1e-4, "objective": "ce"}},  # 1e-4: our earlier choice (no paper value)
           prepare=baselines.prepare_peqa, fuse=_fuse_baseline("peqa"),
           groups=lambda h: [("scale", (".scale",), h["lr_scale"], 0.0)]),
    Method("qlora", "QLoRA: NF4 base + float LoRA, merged then RTN", trains=True, output="intckpt", exact=False,
           defaults=_LORA, recipes=_LORA_PAPER, prepare=baselines.prepare_qlora, fuse=_fuse_baseline("qlora"), groups=_ab),
    Method("qalora", "QA-LoRA: group-pooled LoRA merged into the zero points", trains=True, output="intckpt",
           exact=False, uses_init=True, defaults=_LORA, recipes=_LORA_PAPER, prepare=baselines.prepare_qalora,
           fuse=_fuse_baseline("qalora"), groups=_ab),
    Method("lora-fp", "float LoRA control: writes a float Hugging Face model", trains=True, output="float",
           exact=False, defaults=_LORA, recipes=_LORA_PAPER, prepare=baselines.prepare_lora_fp, groups=_ab),
    Method("rtn", "round to nearest after the range search", trains=False, output="intckpt", exact=True, k_grids=True,
           quantize=lambda model, tok, spec, source, range_method, calib: rtn.ptq_rtn(model, spec, source,
                                                                                       range_method, calib)),
    Method("gptq", "GPTQ by GPTQModel on CPU, symmetric grids, calibrated on --calib-data", trains=False,
           output="intckpt", exact=True, calibrated=True,
           quantize=lambda model, tok, spec, source, range_method, calib: gptq_ptq.ptq_gptq(model, tok, spec, source,
                                                                                             calib)),
)}


def names(trains: bool | None = None) -> tuple[str, ...]:
    """Method names, all or only the trained (True) / post-training (False) ones, in the table's order."""
    return tuple(n for n, m in METHODS.items() if trains is None or m.trains == trains)


def get(name: str, trains: bool | None = None) -> Method:
    """The method `name`; `trains` restricts the choice (UserError naming the valid names otherwise)."""
    choices = names(trains)
    if name not in choices:
        raise UserError(f"--method: expected one of {choices}, got {name!r}")
    return METHODS[name]


def check_grid(name: str, spec) -> None:
    """Refuse a K grid or per-layer plan for a method that does not train or quantize on one."""
    if spec.super_block and not get(name).k_grids:
        raise UserError(f"--method {name} with --preset {spec.name}: GGUF K grids and per-layer plans are trained by "
                        f"{', '.join(n for n, m in METHODS.items() if m.k_grids)} only; expected one of those, or a "
                        f"single-level preset (q4_0, w4pc, ...) for {name}")


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise UserError(f"--recipe: expected one of {RECIPES}, got {recipe!r}")
    return recipe


def defaults(name: str, recipe: str = DEFAULT_RECIPE, spec=None) -> dict:
    """Every per-method default of method `name` in `recipe`; with the grid `spec`, the "default" recipe's
    grid-dependent values too (`Method.grid_defaults`; without it, the values that hold for per-channel grids)."""
    m = get(name)
    grid = (m.grid_defaults(spec) if recipe == DEFAULT_RECIPE and spec is not None and m.grid_defaults is not None
            else {})
    return {**m.defaults, **grid, **m.recipes.get(check_recipe(recipe), {})}


def resolve_options(name: str, opts: MethodOptions | None = None, recipe: str = DEFAULT_RECIPE,
                    spec=None) -> MethodOptions:
    """`opts` with every unset (None) per-method field filled with the method's default in `recipe` (on `spec`)."""
    d, opts = defaults(name, recipe, spec), opts or MethodOptions()
    fill = {k: d.get(k) for k in ("alpha", "lr_weight", "phi", "ab_init", "range_method") if getattr(opts, k) is None}
    return dataclasses.replace(opts, **fill)


def default(name: str, key: str, recipe: str = DEFAULT_RECIPE, spec=None) -> float | str | None:
    """One default of one method in one recipe, on grid `spec` if given (`key` in HYPERPARAMETERS)."""
    if key not in HYPERPARAMETERS:
        raise KeyError(f"{key!r} is not a per-method hyperparameter; expected one of {HYPERPARAMETERS}")
    return defaults(name, recipe, spec).get(key)


def param_groups(name: str, hyper: Mapping[str, float]) -> list[ParamGroup]:
    """The optimizer groups of method `name` at the resolved hyperparameters `hyper` (lr_ab, lr_scale, lr_weight,
    weight_decay)."""
    m = get(name, trains=True)
    return m.groups(hyper)
