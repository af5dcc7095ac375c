"""Explicit-backward training kernels (qsamc/supernet/layers.py, kernels.py) and their fused math
(qsamc/supernet/fused.py): the same values and gradients as autograd through the layers' plain forms, eager
and compiled by torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qsamc.errors import ConfigError
from qsamc.supernet import fused
from qsamc.supernet.kernels import FoldedAttention, relpos_attention, rel_pos_table
from qsamc.supernet.layers import QuantLinear
from qsamc.supernet.lora import Lora, LoraConfig
from qsamc.supernet.quant import QuantizerBank

BITS = (2, 3, 4, 8, 32)


@pytest.fixture
def fusion():
    """Set the fusion mode for one test, restored after it."""
    before = fused.Fusion.mode
    yield fused.set_mode
    fused.Fusion.mode = before


def _dyadic(shape, generator, denominator: int) -> torch.Tensor:
    """Small multiples of 1/denominator: sums of them are exact in FP32 in any order, so the merged weight
    W0 + sum c_k B_k A_k is the same bits however a kernel orders it, and so is its quantized grid."""
    return torch.randint(-6, 7, shape, generator=generator).float() / denominator


def _layer(w_bits: int, a_bits: int, lora: LoraConfig | None, channels: bool, sliced: bool) -> QuantLinear:
    generator = torch.Generator().manual_seed(w_bits * 100 + a_bits)
    layer = QuantLinear(24, 40)
    layer.weight_quantizer = QuantizerBank("weight", BITS, channels=40 if channels else None)
    layer.act_quantizer = QuantizerBank("act", BITS)
    with torch.no_grad():
        layer.weight.copy_(_dyadic(layer.weight.shape, generator, 64))
        layer.bias.copy_(torch.randn(40, generator=generator))
    if lora is not None:
        layer.lora = Lora(lora, 24, 40, BITS)
        with torch.no_grad():
            for adapter in layer.lora.adapters.values():
                adapter.A.copy_(_dyadic(adapter.A.shape, generator, 8))
                adapter.B.copy_(_dyadic(adapter.B.shape, generator, 8))
    layer.set_bits(w_bits, a_bits)
    if sliced:  # elastic widths: the first rows of lin1 or columns of lin2
        layer.active_out, layer.active_in = 32, 16
    with torch.no_grad():  # initialise the quantizers on the merged weight and a batch, then move them off it
        x = torch.randn(3, 5, layer.active_in, generator=generator)
        layer.eval()(x)
        for bank in (layer.weight_quantizer, layer.act_quantizer):
            for quantizer in bank.quantizers.values():
                quantizer.scale.mul_(0.9)
                if getattr(quantizer, "offset", None) is not None:
                    quantizer.offset.add_(0.05)
    return layer.train()


def _grads(layer: QuantLinear, x: torch.Tensor, gelu: bool, kernel: bool):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    activation = torch.nn.GELU() if gelu else None
    if kernel:
        y = layer(x, activation=activation)
    else:  # autograd through the layer's plain form (what evaluation and export compute)
        bias = layer.bias[: layer.active_out]
        y = F.linear(layer.quantize_input(activation(x) if gelu else x), layer.quantize_weight(layer.active_weight()),
                     bias)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device, y.dtype)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = b.abs().max()
    return float((a - b).abs().max() / peak) if peak > 0 else float(a.abs().max())


CASES = [  # (w_bits, a_bits, LoRA, per-channel weight scales, elastic slice, GELU)
    (4, 4, None, False, False, False),
    (4, 4, None, True, True, True),
    (8, 32, LoraConfig("regular", rank=4, alpha=8.0), True, False, True),
    (32, 4, LoraConfig("multiplex", rank=4, alpha=8.0, multiplex_modules=5), False, True, False),
    (2, 2, LoraConfig("multiplex", rank=4, alpha=8.0, multiplex_modules=5), True, True, True),
    (3, 8, LoraConfig("multiplex", rank=4, alpha=8.0, multiplex_modules=3, detach=True), False, False, True),
    (4, 8, LoraConfig("selective", rank=4, alpha=8.0), True, True, False),
    (32, 32, LoraConfig("multiplex", rank=4, alpha=8.0, multiplex_modules=5), False, True, True),
]


@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("w_bits, a_bits, lora, channels, sliced, gelu", CASES)
def test_quantized_linear_kernel_equals_autograd_through_the_plain_layer(w_bits, a_bits, lora, channels, sliced, gelu,
                                                                          mode, fusion):
    """Output, input gradient and every parameter's gradient (weight, bias, step sizes, offsets, each trained
    adapter; none for an adapter Alg. 2 detaches) as autograd gives them through Q(act(x)) @ Q(W0 + BA)^T + b."""
    fusion(mode)
    layer = _layer(w_bits, a_bits, lora, channels, sliced)
    x = torch.randn(3, 5, 24 if not sliced else 16, generator=torch.Generator().manual_seed(2))
    y_ref, gx_ref, grads_ref = _grads(layer, x, gelu, kernel=False)
    y_new, gx_new, grads_new = _grads(layer, x, gelu, kernel=True)
    assert grads_new.keys() == grads_ref.keys()
    assert _relative(y_new, y_ref) < 1e-5
    assert _relative(gx_new, gx_ref) < 1e-5
    for name, grad in grads_ref.items():
        assert grads_new[name].shape == grad.shape, name
        assert _relative(grads_new[name], grad) < 1e-4, name
    if lora is not None and lora.detach and w_bits < 8:
        assert not any(name.startswith("lora.adapters.b32.") for name in grads_new)  # Alg. 2: the base is frozen
    assert any("_quantizer" in name for name in grads_new) == (w_bits < 32 or a_bits < 32)


def assert_compiled_equals_eager_under_autocast(case: int, device: str, monkeypatch) -> None:
    """The fused functions compiled (mode on) against the same functions run eagerly, under bf16 autocast
    as training runs on a GPU: outputs and every gradient to bf16 rounding of the GEMMs."""
    w_bits, a_bits, lora, channels, sliced, gelu = CASES[case]
    x = torch.randn(3, 5, 16 if sliced else 24, generator=torch.Generator().manual_seed(2)).to(device)
    results = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(fused.Fusion, "mode", mode)
        layer = _layer(w_bits, a_bits, lora, channels, sliced).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            results[mode] = _grads(layer, x, gelu, kernel=True)
    (y_off, gx_off, grads_off), (y_on, gx_on, grads_on) = results["off"], results["on"]
    assert y_on.dtype == y_off.dtype == torch.bfloat16
    assert _relative(y_on.float(), y_off.float()) < 2e-2 and _relative(gx_on, gx_off) < 2e-2
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        assert _relative(grads_on[name], grad) < 5e-2, name


def test_compiled_kernels_equal_the_eager_ones_under_bf16_autocast(monkeypatch):
    assert_compiled_equals_eager_under_autocast(4, "cpu", monkeypatch)


@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("side, table", [(14, 27), (12, 31)])  # a table for this size, and one resized to it
def test_folded_attention_equals_the_reference_fold_forward_and_backward(side, table, mode, fusion):
    fusion(mode)
    generator = torch.Generator().manual_seed(side)
    q, k, v = (torch.randn(4, side * side, 16, generator=generator, requires_grad=True) for _ in range(3))
    rel_h, rel_w = (torch.randn(table, 16, generator=generator, requires_grad=True) for _ in range(2))
    grad = torch.randn(4, side * side, 16, generator=generator)
    leaves = (q, k, v, rel_h, rel_w)

    def run(kernel: bool):
        if kernel:
            out = FoldedAttention.apply(q, k, v, rel_pos_table(side, rel_h), rel_pos_table(side, rel_w), (side, side), 0.25)
        else:
            out = relpos_attention(q, k, v, rel_h, rel_w, (side, side), 0.25)
        return out.detach(), torch.autograd.grad(out, leaves, grad)

    out_ref, grads_ref = run(False)
    out_new, grads_new = run(True)
    assert _relative(out_new, out_ref) < 1e-5
    for name, new, ref in zip("q k v rel_h rel_w".split(), grads_new, grads_ref):
        assert _relative(new, ref) < 1e-5, name


def test_fusion_mode_is_checked_and_auto_compiles_on_cuda_only(fusion):
    with pytest.raises(ConfigError, match="fusion mode must be one of auto, on, off"):
        fusion("fast")
    fusion("auto")
    assert not fused.compiles_on(torch.device("cpu")) and fused.compiles_on(torch.device("cuda"))
    fusion("on")
    assert fused.compiles_on(torch.device("cpu"))
    fusion("off")
    assert not fused.compiles_on(torch.device("cuda"))


def test_a_fused_function_runs_eagerly_where_compiling_fails(fusion, monkeypatch):
    fusion("on")

    def broken(*args, **kwargs):
        def run(*call_args):
            raise RuntimeError("no compiler here")
        return run

    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    monkeypatch.setattr(torch, "compile", broken)
    function = fused.fusable(double)
    with pytest.warns(RuntimeWarning, match="torch.compile of double failed"):
        assert torch.equal(function(torch.ones(3)), torch.full((3,), 2.0))
    assert function.broken and torch.equal(function(torch.ones(2)), torch.full((2,), 2.0))


@pytest.mark.parametrize("length, size", [(27, 14), (127, 32), (63, 32), (27, 7)])
def test_rel_pos_table_equals_segment_anything_get_rel_pos_values_and_gradients(length, size):
    """The cached-index table: bit-exact against `get_rel_pos`, for a table of its size and one it resizes."""
    from qsamc.sam import get_rel_pos

    rel_pos = torch.randn(length, 16, generator=torch.Generator().manual_seed(length), requires_grad=True)
    ours, theirs = rel_pos_table(size, rel_pos), get_rel_pos(size, size, rel_pos)
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours, theirs)
    assert torch.equal(*(torch.autograd.grad(t, rel_pos, grad)[0] for t in (ours, theirs)))
