"""Round-to-nearest PTQ as an IntCheckpoint: the baseline, and the start of every method that starts from a
checkpoint (weight-only range search, or the imatrix search on calibration windows)."""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import UserError
from ..core.intckpt import IntCheckpoint, QuantLayer, build_intckpt
from ..core.models import quantized_layer_names
from ..core.quant import QuantSpec, init_k, quantize_codes_k, rtn_quantize
from .common import frozen_bias, layer_specs


IMATRIX_WINDOWS = 32  # training windows the imatrix range search of a training run calibrates on (its first ones)


def activation_importance(model: nn.Module, windows: torch.Tensor, batch: int = 4,
                          names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The 'imatrix' range search's importance: for each quantized projection, the mean squared input per input
    feature, float32 (in,), over every token of `windows` (n, seq) token ids run through the float model in
    batches of `batch` (no gradients; the model is not changed). llama.cpp's importance matrix, in process."""
    if not len(windows):
        raise UserError("range method imatrix: the importance needs calibration windows; got none")
    names = quantized_layer_names(model) if names is None else names
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = x.square().sum(0) + sums[name] if name in sums else x.square().sum(0)
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device  # the windows stay where they are (CPU); each batch goes to the model
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch):
                model(input_ids=windows[i:i + batch].to(device))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / windows.numel() for n in names}


def rtn_layer(lin: nn.Linear, spec: QuantSpec, range_method: str = "lp",
              importance: torch.Tensor | None = None) -> QuantLayer:
    """One projection rounded to nearest on its grid after the range search (K grids: init_k)."""
    w = lin.weight.detach().float()
    if spec.is_k:
        d, sc, dmin, m = init_k(w, spec, range_method, importance=importance)
        codes = quantize_codes_k(w, d, sc, dmin, m, spec)
        return QuantLayer(codes, d.to(torch.float16), None, frozen_bias(lin), sc.to(torch.int8),
                          None if dmin is None else dmin.to(torch.float16), None if m is None else m.to(torch.int8))
    codes, scales, zeros = rtn_quantize(w, spec, range_method, importance)
    return QuantLayer(codes, scales, zeros, frozen_bias(lin))


def ptq_rtn(model: nn.Module, spec: QuantSpec, source: dict, range_method: str = "lp",
            calib: torch.Tensor | None = None) -> IntCheckpoint:
    """Round-to-nearest PTQ baseline with the same range search as LR-QAT's start, as an IntCheckpoint; a plan
    (q4_k_m, q4_k_s) rounds each layer on its own grid. range_method 'imatrix' weighs each layer's error by its
    inputs' importance over the calibration windows `calib` (n, seq) (`activation_importance`)."""
    names = quantized_layer_names(model)
    specs = layer_specs(model, names, spec)
    if range_method == "imatrix" and calib is None:
        raise UserError("range method imatrix: needs calibration windows (--calib-data, or the training text)")
    imp = activation_importance(model, calib, names=names) if range_method == "imatrix" else {}
    layers = {name: rtn_layer(model.get_submodule(name), specs[name], range_method, imp.get(name))
              for name in names}
    return build_intckpt(spec, model.config, layers, model.state_dict(), source, "rtn",
                         {"range_method": range_method})


def rtn_start(model: nn.Module, spec: QuantSpec, source: dict, range_method: str,
              windows: torch.Tensor) -> IntCheckpoint:
    """A training run's RTN start with `range_method`: imatrix calibrates on its first IMATRIX_WINDOWS training
    `windows` (train_method, scripts/bench_quality.py), the other searches need no data."""
    return ptq_rtn(model, spec, source, range_method,
                   windows[:IMATRIX_WINDOWS] if range_method == "imatrix" else None)
