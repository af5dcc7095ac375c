"""LSQ+ fake quantizers for the mixed-precision quantized supernet.

Where this sits: the quantizer-insertion pass puts one `QuantizerBank` per quantized operand (the weight
and the input activation of every quantized layer); supernet training switches each bank to the bit-width
the sampled subnet asks for and learns the step sizes (and activation offsets) by back-propagation; export
folds the trained weight quantizers into integer weights plus scales with `LsqWeightQuantizer.integer`.

Formulas (LSQ, Esser et al. 2020; LSQ+, Bhalgat et al. 2020; the paper's Sec. 3.3, Eqs. 3-5):

    v     = (x - beta) / s                       (beta = 0 for weights)
    x_hat = round(clamp(v, n, p)) * s + beta
    weights:      [n, p] = [-2**(b-1), 2**(b-1) - 1]  symmetric signed, learnable s only
    activations:  [n, p] = [0, 2**b - 1]              asymmetric unsigned, learnable s and beta

Gradients (straight-through estimator for round):

    dx_hat/dx    = 1 if n <= v <= p else 0
    dx_hat/ds    = round(v) - v inside,   n below,   p above
    dx_hat/dbeta = 0 inside,              1 outside
    the gradients of s and beta are multiplied by g = 1 / sqrt(N * max(Qp, 1)), where Qp = p and N is the
    number of elements sharing one s: the whole weight (layer-wise), one row (per-channel), or one
    sample's activation (x.numel() / x.shape[0]).

`round` is torch.round (half to even), the same rounding integer kernels use when they requantize.

Integer zero point (`zero_point="integer"`, what `qsamc train` builds since 2026-12-07): the grid uses
beta = s * round(beta / s), the nearest offset that puts 0 exactly on the grid (beta = -z s, z an integer
zero point, as integer inference requires; Jacob et al. 2018, Sec. 2.1), with a straight-through gradient to
beta. Zero padding then quantizes to exactly 0: SAM pads every image with zeros to a square (a quarter of a
256 x 192 frame), and a continuous LSQ+ offset moved all of it to the nearest grid value. "continuous" is
LSQ+'s own beta (the paper, and runs before it).
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from qsamc.supernet import fused

# Scales are divided by, and deployment formats require them positive. The forward pass uses
# max(s, _MIN_SCALE) but hands the gradient to the raw parameter unchanged, so an optimizer step that
# overshoots below zero is pulled back instead of being stuck where a clamp would block the gradient.
_MIN_SCALE = fused.MIN_SCALE

# The integer grids must fit int8 (weights) / uint8 (activations) containers at export.
_MAX_BITS = 8

FULL_PRECISION = 32

ZeroPoint = Literal["integer", "continuous"]
ZERO_POINTS = ("integer", "continuous")
WeightInit = Literal["lsq+", "mse"]
WEIGHT_INITS = ("lsq+", "mse")
# Clipping fractions of max|w| that the MSE weight initialisation tries (1.0 = no clipping).
MSE_CANDIDATES = tuple(round(0.2 + 0.02 * i, 2) for i in range(41))


def weight_range(bits: int) -> tuple[int, int]:
    """Symmetric signed grid (n, p) = (-2**(b-1), 2**(b-1) - 1); e.g. 2 -> (-2, 1), 8 -> (-128, 127)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def act_range(bits: int) -> tuple[int, int]:
    """Unsigned grid (n, p) = (0, 2**b - 1); e.g. 2 -> (0, 3), 8 -> (0, 255)."""
    return 0, 2**bits - 1


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"a quantizer needs 1..{_MAX_BITS} bits, got {bits} (32 bits means no quantizer)")


def _grid_coords(x: Tensor, s: Tensor, beta: Tensor | None) -> Tensor:
    """v = (x - beta) / max(s, eps), in the promoted dtype so half inputs round on a float32 grid."""
    s = s.clamp_min(_MIN_SCALE)
    return (x if beta is None else x - beta) / s


def _grid(x: Tensor, s: Tensor, beta: Tensor | None, n: int, p: int) -> Tensor:
    """The integer grid values round(clamp(v, n, p)), still in a float dtype."""
    return _grid_coords(x, s, beta).clamp(n, p).round()


class _LsqFunction(torch.autograd.Function):
    """x_hat = round(clamp(v, n, p)) * s + beta with the LSQ/LSQ+ gradients of the module docstring.

    Saves only the inputs (x, s, beta) and recomputes v and the clip mask in backward, so no full-size
    mask or intermediate stays alive between forward and backward. The math is `qsamc.supernet.fused`'s
    (one kernel each way where it is compiled), the same functions the quantized linear's explicit
    backward calls.
    """

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, beta: Tensor | None, n: int, p: int, g: float) -> Tensor:
        ctx.save_for_backward(x, s, beta)
        ctx.n, ctx.p, ctx.g = n, p, g
        out = fused.lsq_forward(x, s, beta, n, p)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, s, beta = ctx.saved_tensors
        grad_x, grad_s, grad_beta = fused.lsq_backward(grad, x, s, beta, ctx.n, ctx.p, ctx.g)
        return (grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None,
                grad_s.to(s.dtype) if ctx.needs_input_grad[1] else None,
                grad_beta.to(beta.dtype) if beta is not None and ctx.needs_input_grad[2] else None,
                None, None, None)


class _InitFlag(nn.Module):
    """The `initialized` buffer (checkpointed), mirrored in a Python flag so that a forward pass reads no
    tensor to know it: `bool(buffer)` is a device sync on a GPU, once per quantizer call."""

    def _init_flag(self) -> None:
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False

    def mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._ready = True

    @property
    def ready(self) -> bool:
        if not self._ready:  # first use after construction or a state-dict load
            self._ready = bool(self.initialized)
        return self._ready

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False  # the loaded buffer decides, at the next use


class LsqWeightQuantizer(_InitFlag):
    """Symmetric signed LSQ weight quantizer for ONE bit-width; learnable step size only.

    channels=None gives one layer-wise scale (the paper's default: per-channel scales cost extra memory
    in hardware); channels=N gives a per-output-channel scale of shape (N,). Elastic MLP widths keep the
    first k output rows, so a weight with k <= N rows uses scale[:k].
    """

    def __init__(self, bits: int, channels: int | None = None):
        super().__init__()
        _check_bits(bits)
        self.bits = bits
        self.channels = channels
        self.n, self.p = weight_range(bits)
        self.scale = nn.Parameter(torch.ones(()) if channels is None else torch.ones(channels))
        self._init_flag()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.channels}"

    @torch.no_grad()
    def initialize(self, w: Tensor, method: WeightInit = "lsq+") -> None:
        """Initial step size, per row when per-channel.

        `lsq+`: s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2**(b-1) (LSQ+; sigma is the population std, so
        a one-element row gives 0, not NaN). `mse`: the s of `MSE_CANDIDATES` fractions of max|w| / p that
        minimises ||w - w_hat||^2, as post-training quantizers calibrate weights: a pre-trained weight
        keeps its outliers at 8 bits (3 sigma clips them), low bit-widths clip where the error is least.
        Rows beyond w.shape[0] (a sliced first use) get the value computed over all of w, so every row
        starts sensible; the insertion pass should pass the full weight.
        """
        if method not in WEIGHT_INITS:
            raise ValueError(f"weight init must be one of {', '.join(WEIGHT_INITS)}, got {method!r}")
        scale_of = self._lsq_plus_scale if method == "lsq+" else self._mse_scale
        w = w.detach().float()
        if self.channels is None:
            self.scale.copy_(scale_of(w.reshape(1, -1))[0])
        else:
            self._check_rows(w)
            self.scale.copy_(scale_of(w.reshape(1, -1)).expand(self.channels))
            self.scale[: w.shape[0]] = scale_of(w.reshape(w.shape[0], -1))
        self.mark_initialized()

    def _lsq_plus_scale(self, rows: Tensor) -> Tensor:
        mu, sigma = rows.mean(dim=1), rows.std(dim=1, correction=0)
        return torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 2 ** (self.bits - 1)

    def _mse_scale(self, rows: Tensor) -> Tensor:
        top = rows.abs().amax(dim=1, keepdim=True).clamp_min(_MIN_SCALE) / max(self.p, 1)
        best_err = torch.full((rows.shape[0],), math.inf, device=rows.device)
        best = top[:, 0].clone()
        for fraction in MSE_CANDIDATES:
            s = top * fraction
            err = (_grid(rows, s, None, self.n, self.p) * s - rows).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s[:, 0], best)
        return best

    def _check_rows(self, w: Tensor) -> None:
        if w.shape[0] > self.channels:
            raise ValueError(f"weight has {w.shape[0]} output rows but the quantizer has {self.channels} scales")

    def step_for(self, w: Tensor) -> Tensor:
        """The scale broadcast against w: () layer-wise, (k, 1, ..., 1) per-channel; initialises it on w at
        first use."""
        if not self.ready:
            self.initialize(w)
        if self.channels is None:
            return self.scale
        self._check_rows(w)
        return self.scale[: w.shape[0]].reshape(-1, *[1] * (w.dim() - 1))

    def gradient_scale(self, shape: Sequence[int]) -> float:
        """LSQ's g = 1 / sqrt(N p) for a weight of `shape`: N the elements that share one step size (the
        weight, or one row)."""
        per_scale = math.prod(shape) // (shape[0] if self.channels is not None else 1)
        return 1.0 / math.sqrt(per_scale * max(self.p, 1))

    def forward(self, w: Tensor) -> Tensor:
        return _LsqFunction.apply(w, self.step_for(w), None, self.n, self.p, self.gradient_scale(w.shape))

    @torch.no_grad()
    def integer(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(int8 grid values, scale) with `q * scale == forward(w)` exactly (for float32 w).

        The scale is () layer-wise and (k, 1, ..., 1) per-channel, so `q * scale` broadcasts; exporters
        wanting ONNX's 1-D per-channel scale flatten it.
        """
        s = self.step_for(w).detach()
        return _grid(w, s, None, self.n, self.p).to(torch.int8), s.clamp_min(_MIN_SCALE)


def without_autocast(device_type: str):
    """Autocast switched off on `device_type` (a no-op context on devices autocast does not know)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class LsqActQuantizer(_InitFlag):
    """Asymmetric unsigned LSQ+ activation quantizer for ONE bit-width; learnable s and beta.

    x_hat = round(clamp((x - beta)/s, 0, 2**b - 1)) * s + beta. beta plays the role of the paper's
    zero-point (beta = -z s) and is learned as in LSQ+; the grid uses it as it is (`zero_point="continuous"`)
    or at the nearest integer zero point (`"integer"`: 0 exactly on the grid; see the module docstring).
    """

    def __init__(self, bits: int, zero_point: ZeroPoint = "continuous"):
        super().__init__()
        _check_bits(bits)
        if zero_point not in ZERO_POINTS:
            raise ValueError(f"zero_point must be one of {', '.join(ZERO_POINTS)}, got {zero_point!r}")
        self.bits, self.zero_point = bits, zero_point
        self.n, self.p = act_range(bits)
        self.scale = nn.Parameter(torch.ones(()))
        self.offset = nn.Parameter(torch.zeros(()))
        self._init_flag()
        # Running range over calibration batches; +-inf means nothing observed yet.
        self.register_buffer("observed_min", torch.tensor(math.inf))
        self.register_buffer("observed_max", torch.tensor(-math.inf))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, zero_point={self.zero_point}"

    def grid_offset(self) -> Tensor | None:
        """beta as the grid uses it: the learned offset, or with an integer zero point s * round(beta / s)
        (0 exactly on the grid) with a straight-through gradient to beta."""
        if self.offset is None or self.zero_point == "continuous":
            return self.offset
        scale = self.scale.detach().clamp_min(_MIN_SCALE)
        return self.offset + (scale * torch.round(self.offset.detach() / scale) - self.offset.detach())

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Calibration: widen the running min/max with this batch."""
        x = x.detach()
        self.observed_min.copy_(torch.minimum(self.observed_min, x.min().float()))
        self.observed_max.copy_(torch.maximum(self.observed_max, x.max().float()))

    @torch.no_grad()
    def initialize(self) -> None:
        """Min/max init s = (max - min) / (p - n), beta = min - n s (= min, since n = 0).

        A degenerate range (max == min, e.g. a constant input) would give s = 0; it is widened to 1 so s
        stays positive, and beta = min still reproduces the constant exactly.
        """
        lo, hi = self.observed_min, self.observed_max
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise RuntimeError("LsqActQuantizer.initialize() needs observe() on at least one finite batch first")
        span = hi - lo if hi > lo else torch.ones_like(hi)
        self.scale.copy_(span / (self.p - self.n))
        self.offset.copy_(lo - self.n * self.scale)
        self.mark_initialized()

    def _ensure_initialized(self, x: Tensor) -> None:
        # The batch is folded into the running range, so an earlier calibration is not thrown away.
        if not self.ready:
            self.observe(x)
            self.initialize()

    def gradient_scale(self, shape: Sequence[int]) -> float:
        """LSQ's g = 1 / sqrt(N p) for an input of `shape`: N the elements of one sample."""
        per_sample = math.prod(shape[1:]) if len(shape) > 0 else 1
        return 1.0 / math.sqrt(per_sample * max(self.p, 1))

    def forward(self, x: Tensor) -> Tensor:
        self._ensure_initialized(x)
        return _LsqFunction.apply(x, self.scale, self.grid_offset(), self.n, self.p, self.gradient_scale(x.shape))

    @torch.no_grad()
    def integer(self, x: Tensor) -> Tensor:
        """The uint grid values round(clamp((x - beta)/s, 0, p)) as a float tensor."""
        self._ensure_initialized(x)
        return _grid(x, self.scale, self.grid_offset(), self.n, self.p)


class QuantizerBank(nn.Module):
    """One quantizer per candidate bit-width of a layer (as QFA): switching bits switches parameters.

    Quantizers are keyed by str(bits). 32 bits means full precision: forward returns the input and no
    module (hence no parameter) exists for it, so `32 in bank` is False and `bank[32]` raises KeyError;
    `bank.bit_choices` still lists 32 when it is a choice.
    """

    def __init__(self, kind: Literal["weight", "act"], bit_choices: Sequence[int], channels: int | None = None,
                 zero_point: ZeroPoint = "continuous"):
        super().__init__()
        if kind not in ("weight", "act"):
            raise ValueError(f"kind must be 'weight' or 'act', got {kind!r}")
        if kind == "act" and channels is not None:
            raise ValueError("activation quantizers are per-tensor; channels applies to weights only")
        self.kind, self.zero_point = kind, zero_point
        self._bit_choices = tuple(dict.fromkeys(int(b) for b in bit_choices))
        if not self._bit_choices:
            raise ValueError("a QuantizerBank needs at least one bit-width")
        make = ((lambda b: LsqWeightQuantizer(b, channels)) if kind == "weight"
                else (lambda b: LsqActQuantizer(b, zero_point)))
        self.quantizers = nn.ModuleDict(
            {str(b): make(b) for b in self._bit_choices if b != FULL_PRECISION}
        )

    @property
    def bit_choices(self) -> tuple[int, ...]:
        return self._bit_choices

    def extra_repr(self) -> str:
        return f"kind={self.kind}, bit_choices={self._bit_choices}"

    def forward(self, x: Tensor, bits: int) -> Tensor:
        """The `bits` quantizer applied to x, in FP32 even under autocast (its steps are FP32 and a b-bit
        grid needs more mantissa than bf16's 8 bits to land exactly; the consumer's GEMM may then cast)."""
        if bits not in self._bit_choices:
            raise KeyError(f"{bits} bits is not a choice of this {self.kind} bank {self._bit_choices}")
        if bits == FULL_PRECISION:
            return x
        with without_autocast(x.device.type):
            return self.quantizers[str(bits)](x.float())

    def __getitem__(self, bits: int) -> LsqWeightQuantizer | LsqActQuantizer:
        if bits not in self:
            raise KeyError(f"no {self.kind} quantizer for {bits} bits (choices {self._bit_choices}; 32 has none)")
        return self.quantizers[str(bits)]

    def __contains__(self, bits: object) -> bool:
        return str(bits) in self.quantizers


class LsqSymmetricActQuantizer(LsqActQuantizer):
    """LSQ activation quantizer with zero-point 0 for ONE bit-width, on the signed grid
    [-2**(b-1), 2**(b-1) - 1]; learnable s only. Attention's operands take it: integer attention matmuls
    need zero-point 0 on both sides, which an LSQ+ offset would break (no norm precedes them to fold it
    into). q, k and v centre on zero; the softmax output lies in [0, 1] and so uses the grid's upper half
    (7 bits at 8), as TensorRT's INT8 fused attention quantizes it: one INT8 form for every target."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.n, self.p = weight_range(bits)
        self.register_parameter("offset", None)

    @torch.no_grad()
    def initialize(self) -> None:
        """s = max |x| / p: the observed range fills the grid."""
        lo, hi = self.observed_min, self.observed_max
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise RuntimeError("LsqSymmetricActQuantizer.initialize() needs observe() on at least one finite batch first")
        peak = torch.maximum(hi.abs(), lo.abs())
        self.scale.copy_(torch.where(peak > 0, peak, torch.ones_like(peak)) / self.p)
        self.mark_initialized()


ATTENTION_OPERANDS = ("q", "k", "v", "p")  # p: the softmax output


class AttentionQuantizers(nn.Module):
    """One quantizer per attention operand (scale * q, k^T, v and the softmax output p) per bit-width
    below 32 of a block's attention choices (one parameter set per bit-width, as the layers' banks)."""

    def __init__(self, bit_choices: Sequence[int]) -> None:
        super().__init__()
        self.bit_choices = tuple(b for b in dict.fromkeys(int(b) for b in bit_choices))
        self.sets = nn.ModuleDict({
            str(b): nn.ModuleDict({name: LsqSymmetricActQuantizer(b) for name in ATTENTION_OPERANDS})
            for b in self.bit_choices if b != FULL_PRECISION})
        self.observing = False  # calibration: float attention, every quantizer observes its operand

    def __contains__(self, bits: object) -> bool:
        return str(bits) in self.sets

    def quantizers(self, bits: int) -> nn.ModuleDict:
        return self.sets[str(bits)]

    def forward(self, name: str, x: Tensor, bits: int) -> Tensor:
        if bits == FULL_PRECISION:
            if self.observing:
                for quantizers in self.sets.values():
                    quantizers[name].observe(x)
            return x
        if str(bits) not in self.sets:
            raise KeyError(f"{bits} bits is not an attention choice here {self.bit_choices}")
        if x.dtype == torch.float32:  # no Cast in the exported graph: Q/DQ must sit right on the MatMul
            return self.sets[str(bits)][name](x)
        with without_autocast(x.device.type):
            return self.sets[str(bits)][name](x.float()).to(x.dtype)
