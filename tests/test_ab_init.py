"""LR-QAT's data-aware start of B (methods.lrqat.data_aware_init): the RTN start is kept exactly, B spans the
directions asked for, and the training loop applies it once, at step 0 only."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lrqat_export.core.errors import UserError
from lrqat_export.core.quant import PRESETS
from lrqat_export.methods.lrqat import LRQATLinear, data_aware_init, lrqat_layers
from lrqat_export.methods import registry


class _Net(nn.Module):
    """One LRQATLinear fed by an embedding: model(input_ids=...) as the init calls it."""

    def __init__(self, emb: torch.Tensor, layer: LRQATLinear):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(emb)
        self.proj = layer

    def forward(self, input_ids):
        return self.proj(self.emb(input_ids))


def _net(basis: torch.Tensor, rank: int = 4, seed: int = 0) -> _Net:
    """Inputs confined to the row space of `basis` (k × in), plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    k, d = basis.shape
    emb = torch.randn(50, k, generator=g) @ basis * 3 + 1e-3 * torch.randn(50, d, generator=g)
    lin = nn.Linear(d, 24, bias=False)
    return _Net(emb, LRQATLinear.from_linear(lin, PRESETS["w4pc"], rank=rank, alpha=8.0))


def _batches(n=3):
    """n steps of one micro-batch of 2 windows each, as data_aware_init takes them."""
    g = torch.Generator().manual_seed(1)
    return [[(torch.randint(0, 50, (2, 16), generator=g), torch.arange(2))] for _ in range(n)]


def _subspace_overlap(b: torch.Tensor, basis: torch.Tensor) -> float:
    """Fraction of B's row energy inside the row space of `basis` (1 = entirely)."""
    q = torch.linalg.qr(basis.T)[0]  # (in, k) orthonormal
    return float((b @ q).norm() ** 2 / b.norm() ** 2)


@pytest.mark.parametrize("mode", ["act", "grad"])
def test_init_keeps_the_rtn_start_and_points_b_at_the_inputs(mode):
    torch.manual_seed(0)
    basis = torch.randn(4, 64)
    net = _net(basis)
    codes = net.proj.fused_codes().clone()
    kaiming_norm = float(net.proj.lora_B.detach().norm(dim=1).mean())
    assert _subspace_overlap(net.proj.lora_B.detach(), basis) < 0.3  # random rows: about 4/64 of the energy

    def loss_fn(mb, idx):
        return net(input_ids=mb).pow(2).mean()

    info = data_aware_init(net, _batches(), mode, loss_fn)
    b = net.proj.lora_B.detach()
    assert info == {"layers": 1, "windows": 6}
    assert torch.equal(net.proj.fused_codes(), codes)  # A is still 0: the RTN start, exactly
    assert torch.count_nonzero(net.proj.lora_A) == 0
    assert _subspace_overlap(b, basis) > 0.99  # the inputs' (and so the gradient's) row space
    assert torch.allclose(b @ b.T, torch.eye(4) / 3, atol=1e-5)  # orthogonal rows of norm 1/√3
    assert abs(kaiming_norm - 1 / math.sqrt(3)) < 0.05  # the Kaiming start's row norm, which the init keeps
    assert all(p.grad is None for p in net.parameters())  # the grad pass leaves no gradient behind


def test_init_refuses_unknown_mode_and_grad_without_loss():
    net = _net(torch.randn(4, 64))
    with pytest.raises(UserError, match=r"ab_init: expected one of \('lora', 'act', 'grad'\), got 'svd'"):
        data_aware_init(net, _batches(), "svd")
    with pytest.raises(UserError, match="ab_init grad: expected the training loss"):
        data_aware_init(net, _batches(), "grad")
    before = net.proj.lora_B.detach().clone()
    assert data_aware_init(net, _batches(), "lora") == {"layers": 0}
    assert torch.equal(net.proj.lora_B, before)


def test_training_applies_the_init_once_and_resume_does_not_redo_it(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from lrqat_export.core.data import text_windows
    from lrqat_export.core.models import load_tokenizer
    from lrqat_export.methods.common import MethodOptions
    from lrqat_export.methods.lrqat import prepare
    from lrqat_export.train.config import TrainConfig
    from lrqat_export.train.job import teacher_targets
    from lrqat_export.train.loop import train

    windows = text_windows(load_tokenizer(tiny_llama), ["pydoc"], 32, 16)
    cfg = TrainConfig(steps=4, batch_size=2, ckpt_every=2).resolved("lrqat")
    opts = MethodOptions(rank=4, alpha=4.0, ab_init="grad", phi="int8")
    finals = []
    for stop in (None, 2):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        teacher = teacher_targets(model, windows, cfg)
        prepare(model, PRESETS["q4_0"], opts)
        out = tmp_path / f"run{stop}"
        train(model, windows, cfg, out=out, progress=False, opts=opts, teacher=teacher, stop_after=stop)
        if stop is not None:  # resume in a fresh model: B comes from the checkpoint, not from a second init
            model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
            prepare(model, PRESETS["q4_0"], opts)
            train(model, windows, cfg, out=out, resume=True, progress=False, opts=opts, teacher=teacher)
        finals.append({n: m.fused_codes() for n, m in lrqat_layers(model).items()})
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


def test_cli_ab_init_reaches_the_checkpoint(tiny_llama, tmp_path):
    from lrqat_export.app.cli import main
    from lrqat_export.core.intckpt import load_intckpt

    argv = ["train", "--model", str(tiny_llama), "--preset", "q4_0", "--rank", "4", "--steps", "2", "--seq-len", "32",
            "--max-train-windows", "8", "--ab-init", "act", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    assert load_intckpt(tmp_path / "a").manifest["training"]["lrqat"]["ab_init"] == "act"
    assert main(argv[:-3] + ["--ab-init", "svd", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("extra, ab_init, lr_scale, lr_ab", [
    # the default recipe on a grouped grid with groups of 32: the gradient start
    (["--preset", "q4_0"], "grad", registry.GROUP32_LR_SCALE, 3e-3),
    (["--preset", "w3g64"], "lora", registry.GROUPED_LR_SCALE, registry.GROUPED_LR_AB),  # larger groups: faster A·B
    (["--preset", "w4pc"], "lora", 1e-4, 3e-3),  # per channel: the Kaiming start
    (["--preset", "q4_0", "--recipe", "paper"], "lora", 1e-5, 1e-3),  # the paper's Kaiming start and lrs
    (["--preset", "w3g64", "--recipe", "paper"], "lora", 1e-5, 1e-3),
    # the user's values win
    (["--preset", "q4_0", "--ab-init", "lora", "--lr-scale", "2e-4"], "lora", 2e-4, 3e-3),
    (["--preset", "w3g64", "--ab-init", "grad", "--lr-ab", "1e-3"], "grad", registry.GROUPED_LR_SCALE, 1e-3),
])
def test_the_default_recipe_depends_on_the_grid_and_reaches_the_checkpoint(tiny_llama, tmp_path, extra, ab_init,
                                                                          lr_scale, lr_ab):
    from lrqat_export.app.cli import main
    from lrqat_export.core.intckpt import load_intckpt

    argv = ["train", "--model", str(tiny_llama), "--rank", "4", "--steps", "2", "--seq-len", "32",
            "--max-train-windows", "8", "--out", str(tmp_path / "a"), *extra]
    assert main(argv) == 0
    training = load_intckpt(tmp_path / "a").manifest["training"]
    assert training["lrqat"]["ab_init"] == ab_init
    assert training["config"]["lr_scale"] == lr_scale
    assert training["config"]["lr_ab"] == lr_ab


def test_direct_train_call_takes_the_grid_defaults_of_the_prepared_model(tiny_llama, monkeypatch):
    """loop.train called directly with an unresolved config (no spec): the grid of the model's quantized layers
    picks the defaults, as `lrqat train` does (grouped q4_0: scale lr 2e-4; per channel: 1e-4)."""
    from transformers import AutoModelForCausalLM

    from lrqat_export.core.data import text_windows
    from lrqat_export.core.models import load_tokenizer
    from lrqat_export.methods.common import MethodOptions
    from lrqat_export.methods.lrqat import prepare
    from lrqat_export.train import loop
    from lrqat_export.train.config import TrainConfig

    windows = text_windows(load_tokenizer(tiny_llama), ["pydoc"], 32, 8)
    seen = {}
    real = loop.make_optimizer

    def spy(model, cfg, groups=None):
        seen.update({g[0]: g[2] for g in groups})
        return real(model, cfg, groups)

    monkeypatch.setattr(loop, "make_optimizer", spy)
    for preset, lr_scale in (("q4_0", registry.GROUP32_LR_SCALE), ("w3g64", registry.GROUPED_LR_SCALE),
                             ("w4pc", 1e-4)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        prepare(model, PRESETS[preset], MethodOptions(rank=4, alpha=4.0, ab_init="lora", phi="int8"))
        assert loop.model_spec(model) == PRESETS[preset]
        loop.train(model, windows, TrainConfig(steps=1, objective="ce"), progress=False)
        assert seen["scale"] == lr_scale, preset
