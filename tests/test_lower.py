"""The export's lowering passes, each against the unlowered model."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lowering_helpers import calibrated_vit_t, dyadic_input, dyadic_layer
from qsamc.formats import ONNXRUNTIME_CPU, TENSORRT
from qsamc.ir.graph import IR, verify_ir
from qsamc.supernet.lora import Lora
from qsamc.lowered.layers import IntConv2d, IntLinear, SymmetricActQuantizer
from qsamc.ir.pass_manager import PassManager
from qsamc.passes import (CountBitopsPass, ExtractSubnetPass, FoldOffsetIntoNormPass, FoldWeightQuantizersPass,
                          LowerActivationOffsetsPass)
from qsamc.passes.fold_weight_quantizers import fold_weight_quantizer
from qsamc.passes.lower_activation_offsets import lower_activation_offset
from qsamc.passes.quantize_bias import quantize_bias
from qsamc.supernet.encoder import quant_modules
from qsamc.supernet.space import LayerBits


@pytest.fixture(scope="module")
def vit_t():
    return calibrated_vit_t()


def _image(subnet, seed=0):
    return torch.randn(1, 3, subnet.resolution, subnet.resolution, generator=torch.Generator().manual_seed(seed))


def _subnet(space, seed, resolution=None, bits=None):
    subnet = space.sample(random.Random(seed))
    if resolution:
        subnet = replace(subnet, resolution=resolution)
    return space.uniform_bits(subnet, *bits) if bits else subnet


@pytest.mark.parametrize("seed", [0, 3])
def test_extract_subnet_computes_the_supernet_at_that_subnet(vit_t, seed):
    model, ir, spec = vit_t
    subnet = _subnet(spec.space, seed)
    static = ExtractSubnetPass(subnet)(ir).ir
    supernet = model.supernet
    supernet.set_subnet(subnet)
    x = _image(subnet)
    with torch.no_grad():
        torch.testing.assert_close(static.root(x), supernet(x), rtol=0, atol=1e-6)
    verify_ir(static, after="ExtractSubnetPass")
    active = set(spec.space.active_blocks(subnet.depths))
    assert [int(k) for k in static.root.blocks] == sorted(active)
    assert all(a["block"] is None or a["block"] in active for _, a in static.nodes())
    assert not any(isinstance(m, Lora) for m in static.root.modules())
    index = min(active)
    hidden = spec.space.hidden_units(subnet.mlp_ratios[index])
    assert static.root.blocks[str(index)].mlp.lin1.weight.shape[0] == hidden
    assert static.root.pos_embed.shape[1] == subnet.resolution // 16
    # BitOPs from the pruned static IR are the full supernet IR's for that subnet.
    full = IR(copy.deepcopy(ir.graph), ir.model, ir.root)
    for graph in (static, full):
        CountBitopsPass(spec.space, subnet)(graph)
    assert static.cost.bitops == full.cost.bitops > 0


def test_extract_merges_the_multiplex_lora_bound_to_the_bits(vit_t):
    model, ir, spec = vit_t
    subnet = _subnet(spec.space, 1)
    layer_name = "blocks.2.mlp.lin1"
    bits = [LayerBits(b.layer, 2, 8) if b.layer == layer_name else b for b in subnet.bits]
    subnet = replace(subnet, bits=tuple(bits))
    static = ExtractSubnetPass(subnet)(ir).ir
    layer = model.supernet.get_submodule(layer_name)
    hidden = spec.space.hidden_units(subnet.mlp_ratios[2])
    w0 = layer.weight[:hidden]
    base, low = layer.lora.adapters["b32"], layer.lora.adapters["b2"]
    expected = w0 + base.delta(w0.shape) + low.delta(w0.shape)
    torch.testing.assert_close(static.root.get_submodule(layer_name).weight, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("deployment", [ONNXRUNTIME_CPU, TENSORRT], ids=lambda d: d.name)
def test_fold_weight_quantizers_keeps_the_function(vit_t, deployment):
    _, ir, spec = vit_t
    subnet = _subnet(spec.space, 2)
    static = ExtractSubnetPass(subnet)(ir).ir
    reference = copy.deepcopy(static.root)
    PassManager([FoldWeightQuantizersPass(deployment)], verify=True)(static)
    x = _image(subnet)
    with torch.no_grad():
        torch.testing.assert_close(static.root(x), reference(x), rtol=0, atol=1e-5)
    for name in static.quantizable():
        layer, bits = static.module_of(name), static.bits_of(name)[1:]
        assert isinstance(layer, (IntLinear, IntConv2d))
        assert (layer.weight.dtype == torch.int8) == (layer.deployment.weight in ("int8", "int4"))
        assert (layer.weight_scale is not None) == (layer.deployment.weight in ("int8", "int4")) or bits[0] == 32


def test_fold_weight_quantizers_int4_is_blocked_with_the_trained_scale():
    layer = dyadic_layer(4, 32)
    lowered = fold_weight_quantizer(layer, ONNXRUNTIME_CPU)
    assert lowered.deployment.weight == "int4" and lowered.block == 64
    assert lowered.weight.shape == (64, 48) and lowered.weight_scale.shape == (1, 48)
    x = dyadic_input((2, 7, 64))
    with torch.no_grad():
        assert torch.equal(lowered(x), layer(x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lower_activation_offset_is_exact(bits):
    layer = dyadic_layer(bits, bits)
    lowered = fold_weight_quantizer(layer, TENSORRT)
    assert lower_activation_offset(lowered)
    assert isinstance(lowered.act, SymmetricActQuantizer)
    assert (lowered.act.lo, lowered.act.hi) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    x = dyadic_input((3, 5, 64))
    with torch.no_grad():
        assert torch.equal(lowered(x), layer(x))
    assert not lower_activation_offset(lowered)  # rule 4: already symmetric


@pytest.mark.parametrize("conv", [False, True])
def test_lower_activation_offset_takes_the_integer_zero_point(conv):
    """The learned offset is 5.25 steps below zero; the grid, and so the lowered bias, use 5."""
    layer = dyadic_layer(4, 4, conv=conv, offset_steps=-5.25, zero_point="integer")
    act = layer.act_quantizer[4]
    assert float(act.grid_offset().detach()) == -5 * float(act.scale.detach()) != float(act.offset.detach())
    x = dyadic_input((1, 16, 6, 6) if conv else (3, 5, 64))
    lowered = fold_weight_quantizer(layer, TENSORRT)
    assert lower_activation_offset(lowered, (6, 6) if conv else None)
    with torch.no_grad():
        assert torch.equal(lowered(x), layer(x))
        assert torch.equal(act(torch.zeros(3)), torch.zeros(3))  # 0 on the grid


def test_lower_activation_offset_corrects_the_zero_padded_border_exactly():
    layer = dyadic_layer(8, 4, conv=True)
    x = dyadic_input((1, 16, 6, 6))
    lowered = fold_weight_quantizer(layer, TENSORRT)
    lower_activation_offset(lowered, (6, 6))
    assert lowered.bias.shape == (8, 6, 6)
    with torch.no_grad():
        expected = layer(x)
        assert torch.equal(lowered(x), expected)
        # A per-channel bias (the interior value everywhere) is wrong exactly on the border.
        interior = lowered.bias[:, 3, 3]
        naive = F.conv2d(lowered.act(x), lowered.dequantized_weight(), interior, padding=1)
        wrong = (naive - expected).abs().amax(dim=(0, 1)) > 1e-6
    border = torch.ones(6, 6, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert torch.equal(wrong, border)


def test_lower_activation_offsets_layer_by_layer(vit_t):
    """On the whole subnet, fed the unlowered layer's own input, each lowered layer agrees up to float
    rounding: (x - m)/s and (x - beta)/s - c may round apart on a grid boundary, one step of one input."""
    _, ir, spec = vit_t
    subnet = _subnet(spec.space, 6)
    static = ExtractSubnetPass(subnet)(ir).ir
    reference = copy.deepcopy(static.root)
    PassManager([FoldWeightQuantizersPass(TENSORRT), LowerActivationOffsetsPass()], verify=True)(static)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, p=p: inputs.__setitem__(p, args[0]))
             for p, m in quant_modules(reference).items()]
    with torch.no_grad():
        reference(_image(subnet))
        for hook in hooks:
            hook.remove()
        for path, layer in quant_modules(reference).items():
            lowered = static.root.get_submodule(path)
            diff = (lowered(inputs[path]) - layer(inputs[path])).abs()
            if layer.a_bits == 32:
                assert float(diff.max()) < 1e-4, path
                continue
            weight = lowered.dequantized_weight().abs()
            one_step = lowered.act.scale * float(weight.sum(0 if isinstance(lowered, IntLinear) else (1, 2, 3)).max())
            assert float(diff.max()) <= one_step + 1e-4, path
            assert float((diff > 1e-4).float().mean()) < 0.02, path


@pytest.mark.parametrize("resolution", [256, 176], ids=["tiled", "padded"])
def test_fold_offset_into_norm(vit_t, resolution):
    """256 px: 16x16 tokens, windows of 4 tile; 176 px: 11x11 tokens, windowed blocks pad (rule 2)."""
    _, ir, spec = vit_t
    subnet = _subnet(spec.space, 4, resolution=resolution, bits=(8, 8))
    static = ExtractSubnetPass(subnet)(ir).ir
    PassManager([FoldWeightQuantizersPass(TENSORRT), LowerActivationOffsetsPass()], verify=True)(static)
    x = _image(subnet)
    shifts = {name: static.module_of(name).act.shift for name in static.quantizable()}
    with torch.no_grad():
        before = static.root(x)
        FoldOffsetIntoNormPass()(static)
        torch.testing.assert_close(static.root(x), before, rtol=0, atol=1e-4)
    moved = 0
    for name in static.quantizable():
        layer, a = static.graph.nodes[name]["module"], static.graph.nodes[name]
        padded = a.get("token_layout") == "windows" and resolution == 176
        folded = (layer.endswith(("attn.qkv", "mlp.lin1")) or layer == "neck.2") and not padded
        # a folded shift is 0; any other keeps its own (an integer zero point at mid-grid is a shift of 0)
        assert static.module_of(name).act.shift == (0 if folded else shifts[name]), layer
        moved += folded and shifts[name] != 0
    assert moved >= 4


def test_quantize_bias_rounds_to_the_accumulator_grid_at_8x8_only():
    layer8, layer4 = (fold_weight_quantizer(dyadic_layer(b, 8), ONNXRUNTIME_CPU) for b in (8, 4))
    for layer in (layer8, layer4):
        lower_activation_offset(layer)
    x = dyadic_input((2, 5, 64))
    with torch.no_grad():
        before = layer8(x)
        assert quantize_bias(layer8) and not quantize_bias(layer4)
        step = layer8.act.scale * float(layer8.weight_scale)
        assert layer8.bias.dtype == torch.int32
        assert float((layer8(x) - before).abs().max()) <= step / 2 + 1e-6
