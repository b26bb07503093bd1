"""Round-to-nearest PTQ: the baseline every method starts from (same range search), as an IntCheckpoint."""
from __future__ import annotations

import torch
from torch import nn

from ..core.intckpt import IntCheckpoint, QuantLayer, build_intckpt
from ..core.models import quantized_layer_names
from ..core.quant import QuantSpec, init_k, quantize_codes_k, rtn_quantize
from .common import frozen_bias, layer_specs


def rtn_layer(lin: nn.Linear, spec: QuantSpec, range_method: str = "lp") -> QuantLayer:
    """One projection rounded to nearest on its grid after the range search (K grids: init_k)."""
    w = lin.weight.detach().float()
    if spec.is_k:
        d, sc, dmin, m = init_k(w, spec, range_method)
        codes = quantize_codes_k(w, d, sc, dmin, m, spec)
        return QuantLayer(codes, d.to(torch.float16), None, frozen_bias(lin), sc.to(torch.int8),
                          None if dmin is None else dmin.to(torch.float16), None if m is None else m.to(torch.int8))
    codes, scales, zeros = rtn_quantize(w, spec, range_method)
    return QuantLayer(codes, scales, zeros, frozen_bias(lin))


def ptq_rtn(model: nn.Module, spec: QuantSpec, source: dict, range_method: str = "lp") -> IntCheckpoint:
    """Round-to-nearest PTQ baseline with the same range search as LR-QAT's start, as an IntCheckpoint; a plan
    (q4_k_m, q4_k_s) rounds each layer on its own grid."""
    names = quantized_layer_names(model)
    specs = layer_specs(model, names, spec)
    layers = {name: rtn_layer(model.get_submodule(name), specs[name], range_method) for name in names}
    return build_intckpt(spec, model.config, layers, model.state_dict(), source, "rtn",
                         {"range_method": range_method})
