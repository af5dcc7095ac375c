"""Quantized, elastic replacements for the encoder's `nn.Linear` and `nn.Conv2d` layers.

They subclass the torch layers and share their parameters, so the supernet keeps segment-anything's
state-dict keys (`blocks.3.attn.qkv.weight`) and official checkpoints load unchanged. Each layer carries
its chosen (weight, activation) bits; its quantizer banks are inserted by `InsertQuantizersPass` and its
LoRA adapters by `AttachLoraPass`. Elastic MLP slicing keeps the first `active_out` rows / `active_in`
columns of the weight.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


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


class _RecomputingQuantLinear(torch.autograd.Function):
    """y = x_q @ W_q^T + b that saves only the layer input and leaf parameters for backward.

    The quantized input x_q, the merged weight W0 + delta and its quantized copy W_q are recomputed
    in backward (elementwise work and one rank-r matmul) instead of being stored: per layer that is
    two weight-sized tensors and one activation-sized tensor less at the training peak. With an
    `activation`, the input is that activation's input, and the activation is recomputed as well. Gradients of
    the recomputed parts come from autograd itself, so LSQ+, LoRA routing and STE stay in one place.
    """

    @staticmethod
    def forward(ctx, layer: QuantLinear, activation: nn.Module | None, x: torch.Tensor, bias: torch.Tensor | None,
                *params: torch.Tensor):
        with torch.no_grad():
            y = F.linear(layer.quantize_input(_activate(activation, x)), layer.quantize_weight(layer.active_weight()),
                         bias)
        # Backward recomputes under the forward's autocast state (autograd does not restore it).
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if _autocast_on(device) else None
        ctx.layer, ctx.activation, ctx.has_bias = layer, activation, bias is not None
        ctx.save_for_backward(x, *params)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, *params = ctx.saved_tensors
        layer = ctx.layer
        needs_x = ctx.needs_input_grad[2]
        autocast = (torch.autocast(ctx.autocast[0], dtype=ctx.autocast[1]) if ctx.autocast
                    else contextlib.nullcontext())
        with torch.enable_grad(), autocast:
            x_leaf = x.detach().requires_grad_(needs_x)
            x_q = layer.quantize_input(_activate(ctx.activation, x_leaf))
            w_q = layer.quantize_weight(layer.active_weight())
        with autocast:  # the two GEMMs in the forward's precision, their results in the operands' types
            flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
            grad_xq = (grad_y @ w_q.detach()).to(x_q.dtype)
            grad_w = (flat_grad.t() @ x_q.detach().reshape(-1, x_q.shape[-1])).to(w_q.dtype)
        # Back-propagate through whichever recomputed parts depend on something that wants a gradient.
        pairs = [(o, g) for o, g in ((w_q, grad_w), (x_q, grad_xq)) if o.requires_grad]
        wants = [need for need in ctx.needs_input_grad[4:]]
        inputs = ([x_leaf] if needs_x else []) + [p for p, need in zip(params, wants) if need]
        found = iter(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
                     if pairs and inputs else [None] * len(inputs))
        grad_x = next(found) if needs_x else None
        param_grads = [next(found) if need else None for need in wants]
        grad_bias = flat_grad.float().sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return (None, None, grad_x, grad_bias, *param_grads)


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
        bias = self.bias[: self.active_out] if self.bias is not None else None
        if self.training and torch.is_grad_enabled():
            params = [p for p in self.parameters() if p.requires_grad and p is not self.bias]
            return _RecomputingQuantLinear.apply(self, activation, x, bias, *params)
        return F.linear(self.quantize_input(_activate(activation, x)), self.quantize_weight(self.active_weight()), bias)


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
