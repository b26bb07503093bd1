"""The benchmark scripts' code paths on the tiny shape (subprocess per configuration, accounting, table, JSON)."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_memory_speed_child_runs_and_accounts_int8_below_float(tmp_path):
    from scripts.bench_memory_speed import main

    out = tmp_path / "m.json"
    assert main(["--shapes", "tiny", "--configs", "lrqat-bf16", "lrqat-int8", "lrqat-int4", "lora", "--warmup", "0",
                 "--steps", "1", "--json", str(out), "--plot", ""]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(r["ok"] and r["peak_step_bytes"] >= r["rss_setup_bytes"] > 0 for r in rows.values()), rows
    assert all(len(r["minor_faults"]) == 1 and r["minor_faults"][0] >= 0 for r in rows.values())
    acc = {k: r["accounting"] for k, r in rows.items()}
    # bf16 Φ0 is 2 bytes per quantized weight, int8 1 byte, double-packed int4 half of that, LoRA's frozen base 4
    assert (acc["lrqat-int4"]["frozen_bytes"] < acc["lrqat-int8"]["frozen_bytes"] < acc["lrqat-bf16"]["frozen_bytes"]
            < acc["lora"]["frozen_bytes"])
    assert all(a["grad_bytes"] == a["trainable_bytes"] and a["optimizer_bytes"] == 2 * a["trainable_bytes"]
               for a in acc.values())
    # LR-QAT's share of codes moved off RTN's and held by the clamp; none for LoRA
    assert all(0 <= acc[k]["moved_fraction"] <= 1 and 0 <= acc[k]["clipped_fraction"] <= 1
               for k in ("lrqat-bf16", "lrqat-int8", "lrqat-int4"))
    assert acc["lora"]["moved_fraction"] is None


def test_memory_speed_rounds_merge_every_timed_step():
    """--rounds: each config's step_s is the median over all its rounds' timed steps, round_step_s each round's
    median, the peak the largest; one failed round fails the row."""
    from scripts.bench_memory_speed import merge_rounds

    def run(config, rnd, times, peak, ok=True):
        return {"shape": "s", "config": config, "round": rnd, "ok": ok, "step_times": times,
                "step_s": sorted(times)[len(times) // 2], "minor_faults": [1] * len(times), "peak_step_bytes": peak,
                "loadavg_1m": 1.0 + rnd}

    rows = {r["config"]: r for r in merge_rounds([
        run("a", 0, [1.0, 5.0, 2.0], 10), run("b", 0, [3.0], 7), run("a", 1, [4.0, 0.5, 0.7], 12),
        run("b", 1, [3.0], 7, ok=False)])}
    a = rows["a"]
    assert a["step_times"] == [1.0, 5.0, 2.0, 4.0, 0.5, 0.7] and a["step_s"] == 1.5
    assert a["round_step_s"] == [2.0, 0.7] and a["peak_step_bytes"] == 12 and a["loadavg_1m"] == 2.0
    assert len(a["minor_faults"]) == 6 and not rows["b"]["ok"]


def test_memory_speed_kl_objective_records_the_teacher_prepass(tmp_path):
    """--objective kl: the step trains on the float model's top-k targets, computed by a pre-pass before prepare
    whose peak, time and cache size are reported (top-64 ids int32 + log-probs fp32 + one fp32 rest per token)."""
    from scripts.bench_memory_speed import main

    out = tmp_path / "kl.json"
    assert main(["--shapes", "tiny", "--configs", "lrqat-int8", "--warmup", "0", "--steps", "1", "--seq", "64",
                 "--objective", "kl", "--json", str(out), "--plot", ""]) == 0
    r = json.loads(out.read_text())["rows"][0]
    pp = r["prepass"]
    assert r["ok"] and r["objective"] == "kl" and r["loss"] >= 0
    assert pp["cache_bytes_per_token"] * 64 == pp["cache_bytes"] and pp["cache_bytes"] == 63 * (64 * 8 + 4)
    assert pp["peak_bytes"] >= pp["rss_before_bytes"] > 0 and 0 <= pp["rest_mass"] < 1


def test_memory_speed_bf16_base_halves_frozen_float_weights(tmp_path):
    """--base-dtype bf16 stores the frozen float weights (embeddings, norms, lm_head, LoRA's base) in bf16 and the
    step runs under bf16 autocast; trainable tensors stay fp32."""
    from scripts.bench_memory_speed import main

    acc = {}
    for base in ("fp32", "bf16"):
        out = tmp_path / f"{base}.json"
        assert main(["--shapes", "tiny", "--configs", "lora", "lrqat-int8", "--warmup", "0", "--steps", "1",
                     "--bf16", "--base-dtype", base, "--profile", "5", "--json", str(out), "--plot", ""]) == 0
        rows = json.loads(out.read_text())["rows"]
        assert all(r["ok"] and r["bf16"] and r["base_dtype"] == base for r in rows), rows
        for r in rows:  # --profile: the 5 costliest ops of one more step, costliest first
            ms = [op["self_ms"] for op in r["profile"]]
            assert len(ms) == 5 and ms == sorted(ms, reverse=True) and all(op["calls"] > 0 for op in r["profile"])
        acc[base] = {r["config"]: r["accounting"] for r in rows}
    # LoRA: every frozen tensor but the rotary tables (fp32 buffers, not weights) is a float weight → half;
    # LR-QAT: Φ0 stays int8, only the floats halve
    from transformers import LlamaConfig, LlamaForCausalLM

    from scripts.bench_memory_speed import SHAPES

    rot = LlamaForCausalLM(LlamaConfig(**SHAPES["tiny"])).model.rotary_emb
    rot_bytes = sum(b.numel() * b.element_size() for b in rot.buffers())
    assert rot_bytes > 0
    assert 2 * (acc["bf16"]["lora"]["frozen_bytes"] - rot_bytes) == acc["fp32"]["lora"]["frozen_bytes"] - rot_bytes
    assert acc["fp32"]["lrqat-int8"]["frozen_bytes"] / 2 < acc["bf16"]["lrqat-int8"]["frozen_bytes"] \
        < acc["fp32"]["lrqat-int8"]["frozen_bytes"]
    assert acc["bf16"]["lora"]["trainable_bytes"] == acc["fp32"]["lora"]["trainable_bytes"]


def test_gpu_summary_keeps_the_best_row_per_setting(tmp_path):
    from scripts.bench_gpu_summary import PRE_FIX, load_rows, table

    def row(config, batch, ok=True, alloc=10, reserved=11, clean=None, **kw):
        r = {"shape": "llama2-7b", "device": "cuda", "config": config, "batch": batch, "seq": 1024,
             "base_dtype": "fp32", "ok": ok, "step_s": 1.0, **kw}
        if ok:
            r.update(peak_step_bytes=alloc * 2**30, cuda_peak_reserved_bytes=reserved * 2**30)
        if clean:
            r["cuda_reserved_setup_freed"] = True
        return r

    first = tmp_path / sorted(PRE_FIX)[0]
    first.write_text(json.dumps({"rows": [row("qlora", 4, ok=False, error="RuntimeError"),
                                          row("lrqat-int8", 1, alloc=15, reserved=27)]}))
    later = tmp_path / "memory_speed_z.json"
    later.write_text(json.dumps({"rows": [row("qlora", 4, alloc=38, reserved=41, clean=True),
                                          row("lrqat-int8", 2, alloc=22.3, reserved=23.9, clean=True),
                                          row("lrqat-int8", 1, alloc=99, reserved=99, ok=False, error="x"),
                                          {**row("lora", 1), "device": "cpu"}]}))
    rows = load_rows([first, later], "llama2-7b")
    got = {(r["config"], r["batch"]): r for r in rows}
    assert set(got) == {("qlora", 4), ("lrqat-int8", 1), ("lrqat-int8", 2)}  # CPU rows are not GPU rows
    assert got[("qlora", 4)]["ok"] and got[("lrqat-int8", 1)]["ok"]  # a success beats a failure, either order
    assert not got[("lrqat-int8", 1)]["reserved_clean"] and got[("lrqat-int8", 2)]["reserved_clean"]
    t = table(rows)
    # pre-fix reserved is not shown and not used; 23.9 GiB reserved is over 24e9 bytes (22.35 GiB)
    assert "| lrqat-int8 | fp32 | 1 × 1024 | 15.00 | (counts setup) | yes |" in t
    assert "| lrqat-int8 | fp32 | 2 × 1024 | 22.30 | 23.90 | no |" in t


def test_quality_cell_counts_the_codes_and_scales_training_moved(tiny_llama):
    """bench_quality's `_moved_from`: the share of codes that differ from RTN's, and the median relative change of
    the scales, counted over every layer."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from lrqat_export.core.quant import PRESETS
    from lrqat_export.methods.rtn import ptq_rtn
    from scripts.bench_quality import _moved_from

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    rtn = ptq_rtn(model, PRESETS["q4_0"], {"name": "tiny", "kind": "hf", "path": str(tiny_llama)})
    same = _moved_from(rtn, rtn)
    assert same == {"codes_changed_fraction": 0.0, "scale_rel_change_median": 0.0}
    moved = copy.deepcopy(rtn)
    total = sum(q.codes.numel() for q in moved.layers.values())
    for q in moved.layers.values():
        q.codes[0, :3] = torch.where(q.codes[0, :3] == 7, 6, q.codes[0, :3] + 1).to(q.codes.dtype)
        q.scales.mul_(2)  # every scale doubled: |Δs|/s = 1 exactly in fp16
    got = _moved_from(rtn, moved)
    assert got["codes_changed_fraction"] == 3 * len(moved.layers) / total
    assert got["scale_rel_change_median"] == 1.0


def test_ab_product_bench_writes_a_row_per_shape(tmp_path):
    from scripts.bench_ab_product import SHAPES, main

    out = tmp_path / "ab.json"
    assert main(["--repeats", "2", "--rank", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["out"], r["in"]) for r in res["rows"]] == [tuple(s) for s in SHAPES["smollm2-135m"]]
    assert all(r["rank"] == 4 and r["ab_s"] > 0 and r["write_s"] > 0 and r["ab_gflops"] > 0 for r in res["rows"])
    assert res["gemm_gflops"] > 0 and res["threads"] >= 1


def test_reference_grid_counts_exactly_affine_16_level_blocks():
    import torch

    from scripts.bench_reference_grid import affine16_blocks

    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 16, (6, 4, 32), generator=g).float()
    k[..., 0], k[..., 1] = 0, 15  # a Q4_1 block holds its own min and max
    m, d = torch.randn(6, 4, 1, generator=g), torch.rand(6, 4, 1, generator=g) + 0.01
    w = (m + d * k).reshape(6, 128)  # float32 m + d·k: what a Q4_1 block decodes to
    assert affine16_blocks(w) == (24, 24)
    w[0, 5] += 0.3 * float(d[0, 0])  # one weight off its level: its block is no longer on a grid
    w[3] = torch.randn(128, generator=g)
    assert affine16_blocks(w) == (24 - 1 - 4, 24)


def test_dither_moves_every_weight_inside_its_blocks_rounding_bin(tiny_llama):
    """bench_quality --dither 1: each projection weight of a model on Q4_1 blocks moves by at most half its block's
    level spacing, no block is left on a 16-level grid, the other weights are untouched, and the same seed gives the
    same model."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from lrqat_export.core.models import quantized_layer_names
    from scripts.bench_quality import dithered
    from scripts.bench_reference_grid import affine16_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    names = quantized_layer_names(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every projection on Q4_1 blocks: m + d·k with its own min and max
        for n in names:
            w = model.get_submodule(n).weight.view(-1, 32)
            k = torch.randint(0, 16, w.shape, generator=g).float()
            k[:, 0], k[:, 1] = 0, 15
            w.copy_(torch.randn(w.shape[0], 1, generator=g) + (torch.rand(w.shape[0], 1, generator=g) + 0.01) * k)
    before = copy.deepcopy(model)
    assert all(affine16_blocks(model.get_submodule(n).weight)[0] > 0 for n in names)
    dithered(model, 1.0)
    for n in names:
        w0, w = before.get_submodule(n).weight.view(-1, 32), model.get_submodule(n).weight.view(-1, 32)
        d = (w0.max(1, keepdim=True).values - w0.min(1, keepdim=True).values) / 15
        assert ((w - w0).abs() <= d / 2 + 1e-6).all(), n
        assert affine16_blocks(w)[0] == 0, n
    assert torch.equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)
    again = copy.deepcopy(before)
    dithered(again, 1.0)
    assert all(torch.equal(model.get_submodule(n).weight, again.get_submodule(n).weight) for n in names)


@pytest.mark.parametrize("route", ["native", "compiled"])
def test_fused_layer_bench_times_every_part_and_restores_the_functions(tmp_path, monkeypatch, route):
    from lrqat_export.methods import fused, fused_native
    from scripts.bench_fused_layer import PARTS, main

    monkeypatch.setattr(fused_native, "_STATE", {})  # main() picks the route: restored after the test
    monkeypatch.delenv(fused_native.ENV_OFF, raising=False)

    def owner(n):
        return vars(fused_native) if n.startswith("fused_native.") else \
            fused.FusedLRQATLinear.__dict__ if "." in n else vars(fused)

    before = {n: owner(n)[n.split(".")[-1]] for n, _, _ in PARTS}
    out = tmp_path / "layer.json"
    assert main(["--shapes", "64x64", "32x64", "--rank", "4", "--warmup", "2", "--steps", "3", "--route", route,
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["shape"] for r in rows] == ["64x64", "32x64"]
    for r in rows:
        assert r["fused_step_s"] > 0 and r["lora_step_s"] > 0 and r["clipped_fraction"] > 0
        ran = {n for n, _, rt in PARTS if rt in ("both", route)}  # clipped entries: the correction ran
        assert all(r["parts_s"][n] > 0 for n in ran), r["parts_s"]
        assert all(r["parts_s"][n] == 0 for n, _, _ in PARTS if n not in ran), r["parts_s"]  # the other route's
        f = r["floor"]  # the unavoidable work: A·B and each pass timed, the floor their sum less the calls' cost
        assert all(f[k] > 0 for k in ("ab_s", "forward_pass_s", "backward_pass_s", "forward_call_s",
                                      "cold_forward_pass_s", "cold_backward_pass_s", "cold_ab_s"))
        assert f["ab_s"] <= f["floor_s"] <= f["ab_s"] + f["forward_pass_s"] + f["backward_pass_s"]
    assert json.loads(out.read_text())["layer"] is None  # not SmolLM2's four shapes: no per-layer sum
    after = {n: owner(n)[n.split(".")[-1]] for n, _, _ in PARTS}
    assert after == before


def test_kquant_bench_carries_every_option_bench_qualitys_cells_read():
    """bench_kquant runs bench_quality's cells (run_cell, data_windows): its arguments hold every option of
    bench_quality at that script's default (a new option there once broke it with an AttributeError), and its
    JSON records only its own."""
    from scripts import bench_kquant, bench_quality

    args, own = bench_kquant.options(["--steps", "3", "--plan", "q4_k_s"])
    assert set(vars(bench_quality.parser().parse_args([]))) <= set(vars(args))
    assert {"plan", "steps", "work", "range_method"} <= own and not {"presets", "train_text"} & own
    assert (args.steps, args.plan, args.range_method, args.train_text, args.dither) == (3, "q4_k_s", None,
                                                                                         "wikitext", 0.0)
    # its own --range-method reaches the cells (RTN's search and LR-QAT's start read args.range_method)
    assert bench_kquant.options(["--range-method", "imatrix"])[0].range_method == "imatrix"
