"""Round-to-nearest PTQ: the baseline every method starts from (same range search), as an IntCheckpoint."""
from __future__ import annotations

from torch import nn

from ..core.intckpt import IntCheckpoint, QuantLayer, build_intckpt
from ..core.models import quantized_layer_names
from ..core.quant import QuantSpec, rtn_quantize
from .common import check_linears, frozen_bias


def ptq_rtn(model: nn.Module, spec: QuantSpec, source: dict, range_method: str = "lp") -> IntCheckpoint:
    """Round-to-nearest PTQ baseline with the same range search as LR-QAT's start, as an IntCheckpoint."""
    names = quantized_layer_names(model)
    check_linears(model, names, spec)
    layers = {}
    for name in names:
        lin = model.get_submodule(name)
        codes, scales, zeros = rtn_quantize(lin.weight.detach().float(), spec, range_method)
        layers[name] = QuantLayer(codes, scales, zeros, frozen_bias(lin))
    return build_intckpt(spec, model.config, layers, model.state_dict(), source, "rtn",
                         {"range_method": range_method})
