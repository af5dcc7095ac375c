"""Builders shared by the lowering and export tests: a calibrated vit_t supernet with merged-LoRA
weights that matter, and single quantized layers on power-of-two grids (exact float arithmetic)."""

from __future__ import annotations

from functools import lru_cache

import torch

from qsamc.training.runs import SupernetSpec, build_model
from qsamc.supernet.layers import QuantConv2d, QuantLinear
from qsamc.supernet.lora import LoraConfig
from qsamc.passes import CalibrateActivationsPass
from qsamc.supernet.quant import QuantizerBank
from qsamc.supernet.space import default_space

ACT_SCALE = 2.0**-3
WEIGHT_SCALE = 2.0**-6


@lru_cache(maxsize=None)
def calibrated_vit_t(per_channel: bool = True):
    """(model, ir, spec): multiplex LoRA with non-zero B (so merging is visible), calibrated on noise.
    Built once per test process (tracing takes seconds); tests must not change its parameters."""
    torch.manual_seed(0)
    spec = SupernetSpec(default_space("vit_t"), 4, LoraConfig(variant="multiplex"), per_channel)
    model, ir = build_model(spec)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    CalibrateActivationsPass(model.supernet, [torch.randn(2, 3, 256, 256, generator=generator)])(ir)
    return model.eval(), ir, spec


def dyadic_layer(w_bits: int, a_bits: int, conv: bool = False, offset_steps: float = -5,
                 zero_point: str = "continuous") -> QuantLinear | QuantConv2d:
    """A layer whose scales are powers of two and whose LSQ+ offset is a whole number of steps (or, with an
    integer zero point, rounds to one), so the fake-quantized and the lowered forward are computed without
    any float rounding."""
    torch.manual_seed(w_bits * 10 + a_bits)
    layer = QuantConv2d(16, 8, 3, padding=1) if conv else QuantLinear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.round(layer.weight / WEIGHT_SCALE) * WEIGHT_SCALE)
        layer.bias.copy_(torch.round(layer.bias * 64) / 64)
    layer.weight_quantizer = QuantizerBank("weight", (w_bits,))
    layer.act_quantizer = QuantizerBank("act", (a_bits,), zero_point=zero_point)
    with torch.no_grad():
        if w_bits <= 8:
            layer.weight_quantizer[w_bits].scale.fill_(WEIGHT_SCALE * 2 ** (8 - w_bits))
            layer.weight_quantizer[w_bits].initialized.fill_(True)
        if a_bits <= 8:
            act = layer.act_quantizer[a_bits]
            act.scale.fill_(ACT_SCALE * 2 ** (8 - a_bits) / 16)
            act.offset.fill_(offset_steps * float(act.scale))
            act.initialized.fill_(True)
    layer.set_bits(w_bits, a_bits)
    return layer.eval()


def dyadic_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Inputs on a 2^-8 grid within +-8: differences and divisions by the scales above stay exact."""
    generator = torch.Generator().manual_seed(seed)
    return torch.round(torch.randn(shape, generator=generator) * 2 * 256).clamp(-2047, 2047) / 256
