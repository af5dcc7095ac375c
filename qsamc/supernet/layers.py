"""Quantized, elastic replacements for the encoder's `nn.Linear` and `nn.Conv2d` layers.

They subclass the torch layers and share their parameters, so the supernet keeps segment-anything's
state-dict keys (`blocks.3.attn.qkv.weight`) and official checkpoints load unchanged. Each layer carries
its chosen (weight, activation) bits; its quantizer banks are inserted by `InsertQuantizersPass` and its
LoRA adapters by `AttachLoraPass`. Elastic MLP slicing keeps the first `active_out` rows / `active_in`
columns of the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qsamc.supernet import fused


class QuantMixin:
    """Precision state and the fake-quantized forward shared by `QuantLinear` and `QuantConv2d`."""

    w_bits: int
    a_bits: int
    weight_quantizer: nn.Module | None
    act_quantizer: nn.Module | None
    lora: nn.Module | None

    def _init_quant(self) -> None:
        self.w_bits = 32
        self.a_bits = 32
        self.weight_quantizer = None  # QuantizerBank, keyed by bits
        self.act_quantizer = None
        self.lora = None  # a LoRA adapter whose delta(W-slice shape) is added before quantization

    def set_bits(self, w: int, a: int) -> None:
        for bits, bank, what in ((w, self.weight_quantizer, "weight"), (a, self.act_quantizer, "activation")):
            if bits != 32 and (bank is None or bits not in bank):
                raise RuntimeError(
                    f"{type(self).__name__} has no {bits}-bit {what} quantizer; run InsertQuantizersPass "
                    "with a space that contains this bit-width first"
                )
        self.w_bits, self.a_bits = w, a

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits == 32:
            return x
        return self.act_quantizer(x, self.a_bits)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W0 + BA for the active slice, before quantization (paper Alg. 1: quantize the merged weight)."""
        if self.lora is None:
            return weight
        return weight + self.lora.delta(weight.shape, self.w_bits, self.a_bits)

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        weight = self.merged_weight(weight)
        if self.w_bits == 32:
            return weight
        return self.weight_quantizer(weight, self.w_bits)


def _autocast_on(device_type: str) -> bool:
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def _activate(activation: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if activation is None else activation(x)


def _is_exact_gelu(activation: nn.Module | None) -> bool:
    return isinstance(activation, nn.GELU) and activation.approximate == "none"


@dataclass(frozen=True)
class _LinearSpec:
    """What one training call of a quantized linear computes, beside its tensors (`fused.quant_linear_*`)."""

    scalings: tuple[float, ...]  # c_k of each selected adapter (`Lora.terms`), A_k and B_k among the inputs
    trains: tuple[bool, ...]  # whether each adapter trains (Alg. 2's detach)
    out_rows: int
    in_cols: int
    wq: tuple[int, int, float]  # (n, p, g) of the weight quantizer, unused at 32 bits
    aq: tuple[int, int, float]  # (n, p, g) of the input quantizer
    gelu: bool  # act = lin2's GELU, recomputed


class _RecomputingQuantLinear(torch.autograd.Function):
    """y = Q(act(x)) @ Q(W0 + delta)^T + b with an explicit backward that saves only the layer input and
    the leaf parameters.

    The quantized input, the merged weight W0 + delta (LoRA) and its quantized copy are recomputed in
    backward instead of being stored: per layer two weight-sized tensors and one activation-sized tensor
    less at the training peak. act is lin2's GELU (recomputed too) or nothing. Backward is written out
    (`qsamc.supernet.fused.quant_linear_backward`: the two GEMMs, LSQ+'s straight-through gradients, the
    GELU's derivative, each trained adapter's rank-r products), not a replayed autograd graph, and where
    it is compiled the elementwise work is one kernel each way.

    Inputs: the spec, x, the active bias slice, the weight, the active weight and input quantizers' scales
    (and offset; None at 32 bits), then each selected adapter's A and B.
    """

    @staticmethod
    def forward(ctx, spec: _LinearSpec, x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
                w_scale: torch.Tensor | None, a_scale: torch.Tensor | None, a_offset: torch.Tensor | None,
                *lora: torch.Tensor):
        ctx.spec = spec
        device = x.device.type
        # Backward recomputes under the forward's autocast state (autograd does not restore it).
        ctx.autocast = torch.get_autocast_dtype(device) if _autocast_on(device) else None
        ctx.save_for_backward(x, weight, w_scale, a_scale, a_offset, *lora)
        return fused.quant_linear_forward(x, bias, weight, w_scale, a_scale, a_offset, lora, spec.scalings,
                                          spec.out_rows, spec.in_cols, spec.wq[:2], spec.aq[:2], spec.gelu)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, w_scale, a_scale, a_offset, *lora = ctx.saved_tensors
        spec, needs = ctx.spec, list(ctx.needs_input_grad[1:])
        for index, trains in enumerate(spec.trains):
            needs[6 + 2 * index] &= trains
            needs[7 + 2 * index] &= trains
        grads = fused.quant_linear_backward(grad_y, x, weight, w_scale, a_scale, a_offset, tuple(lora),
                                            spec.scalings, spec.out_rows, spec.in_cols, spec.wq, spec.aq, spec.gelu,
                                            ctx.autocast, tuple(needs))
        return (None, *grads)


class QuantLinear(QuantMixin, nn.Linear):
    """`nn.Linear` with elastic width (first rows/columns) and fake-quantized weight and input."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_quant()
        self.active_in = in_features
        self.active_out = out_features

    @classmethod
    def from_float(cls, layer: nn.Linear) -> QuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight, new.bias = layer.weight, layer.bias
        new._init_quant()
        new.active_in, new.active_out = layer.in_features, layer.out_features
        return new

    def active_weight(self) -> torch.Tensor:
        w = self.weight
        if self.active_out != self.out_features or self.active_in != self.in_features:
            w = w[: self.active_out, : self.active_in]
        return w

    def forward(self, x: torch.Tensor, activation: nn.Module | None = None) -> torch.Tensor:
        """y = Q(activation(x)) @ Q(W)^T + b. Passing the preceding activation (the MLP's GELU) instead of
        applying it first lets training keep only its input for backward, not its output too."""
        bias = self.bias
        if bias is not None and self.active_out != self.out_features:
            bias = bias[: self.active_out]
        if not (self.training and torch.is_grad_enabled()):
            return F.linear(self.quantize_input(_activate(activation, x)), self.quantize_weight(self.active_weight()),
                            bias)
        gelu = _is_exact_gelu(activation)
        if activation is not None and not gelu:
            x = activation(x)
        w_scale = a_scale = a_offset = None
        wq = aq = (0, 0, 0.0)
        if self.w_bits != 32:
            quantizer = self.weight_quantizer[self.w_bits]
            if not quantizer.ready:  # first use: initialise the scale on the weight, as the quantizer would
                with torch.no_grad():
                    quantizer.step_for(self.merged_weight(self.active_weight()))
            w_scale = quantizer.scale
            wq = (quantizer.n, quantizer.p, quantizer.gradient_scale((self.active_out, self.active_in)))
        if self.a_bits != 32:
            quantizer = self.act_quantizer[self.a_bits]
            if not quantizer.ready:  # first use: calibrate on this batch, as the quantizer's own forward would
                with torch.no_grad():
                    quantizer._ensure_initialized(F.gelu(x) if gelu else x)
            a_scale, a_offset = quantizer.scale, quantizer.grid_offset()
            aq = (quantizer.n, quantizer.p, quantizer.gradient_scale(x.shape))
        terms = [] if self.lora is None else self.lora.terms(self.w_bits, self.a_bits)
        spec = _LinearSpec(tuple(adapter.scaling for adapter, _ in terms), tuple(trains for _, trains in terms),
                           self.active_out, self.active_in, wq, aq, gelu)
        lora = [t for adapter, _ in terms for t in (adapter.A, adapter.B)]
        return _RecomputingQuantLinear.apply(spec, x, bias, self.weight, w_scale, a_scale, a_offset, *lora)


class QuantConv2d(QuantMixin, nn.Conv2d):
    """`nn.Conv2d` with fake-quantized weight and input (patch embedding, neck, task head; not elastic)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant()

    @classmethod
    def from_float(cls, layer: nn.Conv2d) -> QuantConv2d:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "groups", "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(new, attr, getattr(layer, attr))
        new.weight, new.bias = layer.weight, layer.bias
        new._init_quant()
        return new

    def active_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantize_weight(self.weight), self.bias)


QUANT_LAYER_TYPES = (QuantLinear, QuantConv2d)
