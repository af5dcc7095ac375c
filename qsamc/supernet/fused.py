"""Fused training math: the elementwise work of a quantized layer as one kernel each way.

A quantized training step is launch-bound on a GPU: LSQ+ is a chain of elementwise kernels (divide,
clamp, round, multiply, add; five more and a mask in backward), twice per layer, plus the GELU before
lin2 and its backward. The functions here are that math written once as plain tensor functions, with
no autograd inside (the explicit backward of `qsamc.supernet.layers._RecomputingQuantLinear` calls
them), so `torch.compile(dynamic=True)` can turn each into one generated kernel (Triton on CUDA, C++ on
the CPU) for every shape and bit-width: bits and shapes are symbolic, a few guards tell apart layers with
and without a GELU or an offset.

    QSAMC_FUSE (or `qsamc --fuse`): auto (the default: compiled on CUDA, eager on the CPU), on, off

Eager on the CPU by default: compiling costs about 15 s the first time on a machine (Inductor's cache
keeps it for the next process), more than the vit_t quickstart's training gains from it. Where compiling
fails (no C++ compiler, no Triton) the eager function runs, once said. The eager and the compiled
function compute the same values to float rounding; `round` is half-to-even in both.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from qsamc.errors import ConfigError

ENV = "QSAMC_FUSE"
MODES = ("auto", "on", "off")
_RECOMPILE_LIMIT = 64
# Scales are divided by and must stay positive (`qsamc.supernet.quant._MIN_SCALE`).
MIN_SCALE = 1e-8


class Fusion:
    """The process-wide mode: `QSAMC_FUSE`, or `set_mode` (the CLI's `--fuse`)."""

    mode: str = os.environ.get(ENV, "auto")


def set_mode(mode: str | None) -> str:
    """Set the fusion mode (None: keep `QSAMC_FUSE` or auto); one sentence for an unknown one."""
    mode = mode or os.environ.get(ENV) or "auto"
    if mode not in MODES:
        raise ConfigError(f"fusion mode must be one of {', '.join(MODES)}, got '{mode}'")
    Fusion.mode = mode
    return mode


def compiles_on(device: torch.device) -> bool:
    if Fusion.mode not in MODES:
        raise ConfigError(f"{ENV} must be one of {', '.join(MODES)}, got '{Fusion.mode}'")
    return Fusion.mode == "on" or (Fusion.mode == "auto" and device.type == "cuda")


class fusable:
    """`fn`, run compiled (`torch.compile(fn, dynamic=True)`) where `compiles_on` the first tensor's device
    says so, eager otherwise or where compiling failed."""

    def __init__(self, fn: Callable) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.compiled: Callable | None = None
        self.broken = False

    def __call__(self, *args):
        if self.broken or not compiles_on(args[0].device):
            return self.fn(*args)
        if self.compiled is None:
            # One graph per structure a layer meets (GELU or not, which operands are quantized, how many
            # adapters, sliced or whole, autocast or not): more than torch's default of 8 per function.
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
            setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))
            self.compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as error:  # no compiler, no Triton: the eager function, which raises real errors
            self.broken = True
            warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(error).__name__}); "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
            return self.fn(*args)


# --- LSQ+ (formulas in qsamc.supernet.quant) -------------------------------------------------------------
def _coords(x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    x = x.float()
    return (x if beta is None else x - beta) / s.clamp_min(MIN_SCALE)


def _lsq(x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor | None, n: int, p: int) -> torch.Tensor:
    step = s.clamp_min(MIN_SCALE)
    out = ((x.float() if beta is None else x.float() - beta) / step).clamp_(n, p).round_().mul_(step)
    return out if beta is None else out.add_(beta)


def _lsq_grads(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor | None, n: int, p: int,
               g: float):
    """(dL/dx, dL/ds summed to s's shape, dL/dbeta or None), the LSQ+ straight-through gradients."""
    v = _coords(x, s, beta)
    clipped = v.clamp(n, p)
    inside = clipped == v
    grad = grad.float()
    grad_x = grad * inside
    ds = torch.where(inside, v.round() - clipped, clipped)
    grad_s = (grad * ds).sum_to_size(s.shape) * g
    grad_beta = None if beta is None else grad.masked_fill(inside, 0).sum() * g
    return grad_x, grad_s, grad_beta


@fusable
def lsq_forward(x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor | None, n: int, p: int) -> torch.Tensor:
    """round(clamp((x - beta) / s, n, p)) * s + beta in FP32 (beta None: 0); s broadcasts against x."""
    return _lsq(x, s, beta, n, p)


@fusable
def lsq_backward(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor | None, n: int, p: int,
                 g: float):
    """LSQ+'s gradients: dL/dx in FP32, dL/ds in s's shape, dL/dbeta (None without beta)."""
    return _lsq_grads(grad, x, s, beta, n, p, g)


# --- a quantized linear layer, forward and explicit backward (`qsamc.supernet.layers._RecomputingQuantLinear`) ---
def _merged(weight: torch.Tensor, lora: tuple[torch.Tensor, ...], scalings: tuple[float, ...], out_rows: int,
            in_cols: int) -> torch.Tensor:
    """W0 + sum_k c_k B_k A_k on the active slice, in FP32 (autocast off: the quantizer sees the weight as
    trained); lora is (A_1, B_1, A_2, B_2, ...)."""
    merged = weight[:out_rows, :in_cols] if (out_rows, in_cols) != tuple(weight.shape) else weight
    with torch.autocast(weight.device.type, enabled=False):
        for index, scaling in enumerate(scalings):
            a, b = lora[2 * index], lora[2 * index + 1]
            merged = torch.addmm(merged, b[:out_rows], a[:, :in_cols], alpha=scaling)
    return merged


def _weight_step(scale: torch.Tensor, rows: int) -> torch.Tensor:
    return scale if scale.dim() == 0 else scale[:rows].reshape(rows, 1)


def _quantized_operands(x, weight, w_scale, a_scale, a_offset, lora, scalings, out_rows, in_cols, wq, aq, gelu):
    """(Q(act(x)), W0 + delta, Q(W0 + delta)): what the layer multiplies, and the merged weight."""
    a = F.gelu(x) if gelu else x
    x_q = a if a_scale is None else _lsq(a, a_scale, a_offset, aq[0], aq[1])
    merged = _merged(weight, lora, scalings, out_rows, in_cols)
    w_q = merged if w_scale is None else _lsq(merged, _weight_step(w_scale, out_rows), None, wq[0], wq[1])
    return x_q, merged, w_q


def _pad(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The gradient of a leading slice (first rows / columns) in the whole parameter's shape."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    return F.pad(grad, [0, shape[1] - grad.shape[1], 0, shape[0] - grad.shape[0]] if grad.dim() == 2
                 else [0, shape[0] - grad.shape[0]])


@fusable
def quant_linear_forward(x, bias, weight, w_scale, a_scale, a_offset, lora, scalings, out_rows, in_cols, wq, aq,
                         gelu):
    """y = Q(act(x)) @ Q(W0 + delta)^T + b, the GEMM under the caller's autocast. wq / aq: (n, p) grids;
    a None scale means that operand is not quantized."""
    x_q, _, w_q = _quantized_operands(x, weight, w_scale, a_scale, a_offset, lora, scalings, out_rows, in_cols, wq,
                                      aq, gelu)
    return F.linear(x_q, w_q, bias)


@fusable
def quant_linear_backward(grad_y, x, weight, w_scale, a_scale, a_offset, lora, scalings, out_rows, in_cols, wq, aq,
                          gelu, autocast_dtype, needs):
    """The layer's gradients, recomputing its operands: (x, bias, weight, w_scale, a_scale, a_offset, *lora),
    each None where `needs` (the Function's needs_input_grad from x on, adapters that do not train False)
    says so. wq / aq: (n, p, g) of the weight and input quantizers.

        dL/dW_q = g_y^T x_q     dL/dx_q = g_y W_q     dL/dW = LSQ'(W) dL/dW_q
        dL/dB_k = c_k dL/dW A_k^T     dL/dA_k = c_k B_k^T dL/dW     dL/dx = act'(x) LSQ+'(act(x)) dL/dx_q
    """
    x_q, merged, w_q = _quantized_operands(x, weight, w_scale, a_scale, a_offset, lora, scalings, out_rows,
                                           in_cols, wq, aq, gelu)
    flat = grad_y.reshape(-1, grad_y.shape[-1])
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        grad_xq = (flat @ w_q).to(x_q.dtype).reshape(*x.shape[:-1], in_cols)
        grad_wq = (flat.t() @ x_q.reshape(-1, in_cols)).to(w_q.dtype)
    grads: list[torch.Tensor | None] = [None] * (6 + len(lora))
    if a_scale is None:
        grad_x = torch.ops.aten.gelu_backward(grad_xq.to(x.dtype), x) if gelu else grad_xq
    else:
        a = F.gelu(x) if gelu else x
        g_a = aq[2]
        grad_a, grad_s, grad_beta = _lsq_grads(grad_xq, a, a_scale, a_offset, aq[0], aq[1], g_a)
        grad_x = torch.ops.aten.gelu_backward(grad_a.to(x.dtype), x) if gelu else grad_a
        grads[4], grads[5] = grad_s if needs[4] else None, grad_beta if needs[5] else None
    grads[0] = grad_x.to(x.dtype) if needs[0] else None
    grads[1] = flat.float().sum(0) if needs[1] else None
    if w_scale is None:
        grad_w = grad_wq
    else:
        grad_w, grad_s, _ = _lsq_grads(grad_wq, merged, _weight_step(w_scale, out_rows), None, wq[0], wq[1], wq[2])
        grads[3] = (grad_s if w_scale.dim() == 0 else _pad(grad_s.reshape(-1), w_scale.shape)) if needs[3] else None
    grads[2] = _pad(grad_w, weight.shape) if needs[2] else None
    for index, scaling in enumerate(scalings):
        a, b = lora[2 * index], lora[2 * index + 1]
        if needs[6 + 2 * index]:
            grads[6 + 2 * index] = _pad((b[:out_rows].t() @ grad_w) * scaling, a.shape)
        if needs[7 + 2 * index]:
            grads[7 + 2 * index] = _pad((grad_w @ a[:, :in_cols].t()) * scaling, b.shape)
    return tuple(grads)
