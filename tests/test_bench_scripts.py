"""The benchmark scripts' code paths on the tiny shape (subprocess per configuration, accounting, table, JSON)."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_memory_speed_child_runs_and_accounts_int8_below_float(tmp_path):
    from scripts.bench_memory_speed import main

    out = tmp_path / "m.json"
    assert main(["--shapes", "tiny", "--configs", "lrqat-int8", "lrqat-int4", "lora", "--warmup", "0",
                 "--steps", "1", "--json", str(out), "--plot", ""]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(r["ok"] and r["peak_step_bytes"] >= r["rss_setup_bytes"] > 0 for r in rows.values()), rows
    acc = {k: r["accounting"] for k, r in rows.items()}
    # int8 Φ0 is 1 byte per quantized weight, double-packed int4 half of that, LoRA's frozen base 4 bytes
    assert acc["lrqat-int4"]["frozen_bytes"] < acc["lrqat-int8"]["frozen_bytes"] < acc["lora"]["frozen_bytes"]
    assert all(a["grad_bytes"] == a["trainable_bytes"] and a["optimizer_bytes"] == 2 * a["trainable_bytes"]
               for a in acc.values())
