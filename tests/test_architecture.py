"""The layering of docs/ARCHITECTURE.md, read off the sources, and the method registry's one-value-per-default rule.

Layers, bottom to top; a module may import its own layer or a lower one, never a higher one:

    0 lrqat_export.core      grid, IntCheckpoint format, errors, atomic IO, data, model loading
    1 converters             GGUF / GPTQ writers and readers (the format layer)
    2 lrqat_export.methods   LR-QAT and the baselines, PTQ, the registry
    3 lrqat_export.train     loop, config, checkpoint state, FSDP2
    4 lrqat_export.runtimes  torch, llama.cpp, GPTQ loader
    5 lrqat_export.app       the verbs, the report, the CLI
    6 lrqat_export (root)    the package's __init__ and the `lrqat_export.cli` entry point

Every import counts, also the ones inside functions: a lazy import that points up is still an upward dependency.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lrqat_export", "converters")
LAYERS = [("lrqat_export.core", 0), ("converters", 1), ("lrqat_export.methods", 2), ("lrqat_export.train", 3),
          ("lrqat_export.runtimes", 4), ("lrqat_export.app", 5), ("lrqat_export", 6)]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for prefix, layer in LAYERS:  # most specific first
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"module {module} is in no layer; add it to docs/ARCHITECTURE.md and LAYERS")


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int, list[str]]]:
    """(imported project module, line, names) for every import statement of `module` (top level or not)."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [a.name for a in node.names]
            out.append((target, node.lineno, names))
            # `from pkg import submodule` depends on the submodule too
            out += [(f"{target}.{n}", node.lineno, []) for n in names if f"{target}.{n}" in known]
    return [(t, line, names) for t, line, names in out if t.split(".")[0] in PACKAGES]


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int, list[str]]]]:
    src = sources()
    return {m: imports_of(m, p, set(src)) for m, p in src.items()}


def upward_imports(graph) -> list[str]:
    return [f"{mod}:{line} (layer {layer_of(mod)}) imports {target} (layer {layer_of(target)})"
            for mod, imps in graph.items() for target, line, _ in imps if layer_of(target) > layer_of(mod)]


def find_cycles(graph) -> list[list[str]]:
    edges = {m: sorted({t for t, _, _ in imps if t in graph and t != m}) for m, imps in graph.items()}
    color: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        color[m] = 1
        stack.append(m)
        for t in edges[m]:
            if color.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in color:
                visit(t)
        stack.pop()
        color[m] = 2

    for m in sorted(edges):
        if m not in color:
            visit(m)
    return cycles


def test_every_module_sits_in_a_layer_and_imports_point_down(graph):
    bad = upward_imports(graph)
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_converters_use_only_the_core(graph):
    bad = [f"{m}:{line} imports {t}" for m, imps in graph.items() if m.startswith("converters")
           for t, line, _ in imps if t.startswith("lrqat_export") and not t.startswith("lrqat_export.core")]
    assert not bad, bad


def test_no_import_cycles(graph):
    """No cycle between modules (the whole graph, lazy imports included); with the layer rule above there is none
    between layers or packages either."""
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules(graph):
    """`from x import _name` reaches into another module's internals: every cross-module name is public."""
    scripts = {module_name(p): p for p in sorted((ROOT / "scripts").glob("*.py"))}
    imps = dict(graph)
    imps.update({m: imports_of(m, p, set(graph)) for m, p in scripts.items()})
    bad = [f"{m}:{line} imports {n} from {t}" for m, its in imps.items() for t, line, names in its
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_the_library_reads_no_path_outside_the_project():
    """Library code takes data locations from its callers (tests and benchmarks pass WikiText's in)."""
    bad = [f"{m}" for m, p in sources().items() if "shared" in p.read_text() and "wikitext" in p.read_text().lower()]
    assert not bad, bad


def test_the_detector_sees_a_violation(tmp_path):
    """The checks above are not vacuous: the same functions flag an upward import and a cycle."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from lrqat_export.app import cli\n    from converters import b\n")
    b.write_text("from . import a\n")
    known = {"lrqat_export.app.cli", "converters.a", "converters.b"}
    g = {"converters.a": imports_of("converters.a", a, known), "converters.b": imports_of("converters.b", b, known)}
    assert [x for x in upward_imports(g) if "lrqat_export.app.cli" in x]  # lazy, inside a function: still counted
    assert find_cycles(g) == [["converters.a", "converters.b", "converters.a"]]


# ---------------------------------------------------------------------------------------------------------------
# The registry: one spelling, one value for every default, whoever asks.


def _cli_job(argv):
    from lrqat_export.app import cli

    args = cli.build_parser().parse_args(argv)
    return cli.train_job(args) if argv[0] == "train" else cli.run_job(args)


@pytest.mark.parametrize("method", ["lrqat", "full-qat", "peqa", "qlora", "qalora", "lora-fp"])
def test_cli_python_api_and_benchmark_get_the_registrys_defaults(method):
    sys.path.insert(0, str(ROOT))
    from lrqat_export.app.jobs import TrainJob
    from lrqat_export.methods import registry
    from scripts.bench_quality import method_config

    cli_job = _cli_job(["train", "--out", "x", "--method", method])
    api_job = TrainJob(out="x", method=method)
    assert cli_job == api_job  # every CLI default is the Python API's default
    opts = registry.resolve_options(method, api_job.options)
    cfg = api_job.train.resolved(method)
    for key, value in (("alpha", opts.alpha), ("lr_ab", cfg.lr_ab), ("lr_scale", cfg.lr_scale),
                       ("lr_weight", opts.lr_weight)):
        assert value == registry.METHODS[method].defaults[key], (method, key)
    _, b_opts, b_cfg = method_config(method, api_job.train.steps, api_job.train.batch_size)
    assert (b_opts.alpha, b_opts.lr_weight, b_opts.rank, b_opts.phi, b_opts.range_method) == \
        (opts.alpha, opts.lr_weight, opts.rank, opts.phi, opts.range_method)
    assert (b_cfg.lr_ab, b_cfg.lr_scale, b_cfg.weight_decay) == (cfg.lr_ab, cfg.lr_scale, cfg.weight_decay)


def test_run_job_defaults_are_the_clis():
    from lrqat_export.app.jobs import RunJob

    assert _cli_job(["run", "--out", "x"]) == RunJob(out="x")


def test_user_values_override_the_registry_and_reach_the_job():
    job = _cli_job(["train", "--out", "x", "--method", "peqa", "--lr-scale", "3e-3", "--alpha", "2"])
    from lrqat_export.methods import registry

    assert job.train.resolved("peqa").lr_scale == 3e-3 and registry.resolve_options("peqa", job.options).alpha == 2


def test_every_method_is_complete_and_the_cli_offers_exactly_the_registry():
    from lrqat_export.app import cli
    from lrqat_export.methods import registry

    for m in registry.METHODS.values():
        assert set(m.defaults) == set(registry.HYPERPARAMETERS) or not m.trains, m.name
        if m.trains:
            assert m.prepare is not None and m.groups is not None, m.name
            assert (m.fuse is not None) == (m.output == "intckpt"), m.name
    sub = next(a for a in cli.build_parser()._actions if a.dest == "cmd").choices["train"]
    choices = next(a.choices for a in sub._actions if a.dest == "method")
    assert tuple(choices) == registry.names(trains=True)
    assert registry.names(trains=False) == ("rtn", "gptq")


def test_grid_dependent_defaults_reach_every_caller():
    """LR-QAT's default scale lr depends on the grid (grouped 4e-4, 2e-4 with groups of 32, per channel and K grids
    1e-4), PEQA's too on grouped grids; the registry, the TrainConfig, the benchmark and the paper recipe agree."""
    sys.path.insert(0, str(ROOT))
    from lrqat_export.core.quant import PRESETS
    from lrqat_export.methods import registry
    from lrqat_export.train.config import TrainConfig
    from scripts.bench_quality import method_config

    grouped, g32 = registry.GROUPED_LR_SCALE, registry.GROUP32_LR_SCALE
    want = {"q4_0": g32, "q4_1": g32, "w3g64": grouped, "w4g128": grouped, "w4pc": 1e-4, "w8pc": 1e-4,
            "q4_k": 1e-4, "q4_k_m": 1e-4}
    assert len({grouped, g32, 1e-4}) == 3 and registry.GROUPED_LR_AB != registry.METHODS["lrqat"].defaults["lr_ab"]
    for preset, lr in want.items():
        spec = PRESETS[preset]
        # the adapters: the gradient start with groups of 32, a faster A·B from the Kaiming start with larger ones
        assert registry.resolve_options("lrqat", spec=spec).ab_init == ("grad" if lr == g32 else "lora"), preset
        lr_ab = registry.GROUPED_LR_AB if lr == grouped else registry.METHODS["lrqat"].defaults["lr_ab"]
        assert registry.default("lrqat", "lr_ab", spec=spec) == lr_ab, preset
        assert TrainConfig().resolved("lrqat", spec=spec).lr_ab == lr_ab, preset
        assert method_config("lrqat", 60, 2, spec=spec)[2].lr_ab == lr_ab, preset
        assert TrainConfig().resolved("lrqat", "paper", spec).lr_ab == 1e-3, preset
        assert registry.default("lrqat", "lr_scale", spec=spec) == lr, preset
        assert TrainConfig().resolved("lrqat", spec=spec).lr_scale == lr, preset
        assert method_config("lrqat", 60, 2, spec=spec)[2].lr_scale == lr, preset
        assert TrainConfig().resolved("lrqat", "paper", spec).lr_scale == 1e-5, preset  # a recipe overrides the grid
        peqa = lr if lr != 1e-4 else registry.METHODS["peqa"].defaults["lr_scale"]  # LR-QAT's on grouped grids
        assert TrainConfig().resolved("peqa", spec=spec).lr_scale == peqa, preset
        assert method_config("peqa", 60, 2, spec=spec)[2].lr_scale == peqa, preset
        assert TrainConfig().resolved("peqa", "paper", spec).lr_scale == 1e-4, preset
    assert registry.resolve_options("lrqat", None, "paper", PRESETS["q4_0"]).ab_init == "lora"
    assert registry.resolve_options("peqa").ab_init is None
    # the start's range search: imatrix where the method starts from a checkpoint on a grouped grid
    for preset in ("q4_0", "w3g64", "w4g128", "w4pc", "w8pc", "q4_k", "q4_k_m"):
        spec = PRESETS[preset]
        want = "imatrix" if registry.grouped_grid(spec) else "lp"
        assert want == ("imatrix" if preset in ("q4_0", "w3g64", "w4g128") else "lp")
        assert registry.resolve_options("lrqat", spec=spec).range_method == want, preset
        assert method_config("lrqat", 60, 2, spec=spec)[1].range_method == want, preset
        assert registry.resolve_options("lrqat", None, "paper", spec).range_method == "lp", preset
    for method, want in (("peqa", "imatrix"), ("full-qat", "imatrix"), ("qlora", "lp"), ("qalora", "lp"),
                         ("lora-fp", "lp")):
        assert registry.resolve_options(method, spec=PRESETS["q4_0"]).range_method == want, method
        assert registry.resolve_options(method, spec=PRESETS["w4pc"]).range_method == "lp", method
        assert registry.METHODS[method].uses_init or want == "lp", method  # imatrix needs a start checkpoint
