"""Quantization-aware LoRA (qsamc.supernet.lora, paper Alg. 1 and 2, Fig. 2, Tab. 5) on layers built in the test."""

import math

import pytest
import torch
import torch.nn.functional as F

from qsamc.supernet.layers import QuantLinear
from qsamc.supernet.lora import MULTIPLEX_GROUPS, Lora, LoraConfig, LowRank
from qsamc.supernet.quant import QuantizerBank, weight_range

BITS = (2, 3, 4, 8, 32)
IN, OUT, RANK, ALPHA = 12, 10, 4, 6.0


def quant_linear(seed: int = 0, w_bits: int = 4, a_bits: int = 32, config: LoraConfig | None = None,
                 in_features: int = IN, out_features: int = OUT) -> QuantLinear:
    """A QuantLinear with seeded weights, LSQ+-initialised weight banks, an optional LoRA and the bits set."""
    torch.manual_seed(seed)
    layer = QuantLinear(in_features, out_features)
    layer.weight_quantizer = QuantizerBank("weight", BITS)
    for bits in BITS[:-1]:
        layer.weight_quantizer[bits].initialize(layer.weight)
    layer.act_quantizer = QuantizerBank("act", BITS)
    if config is not None:
        layer.lora = Lora(config, in_features, out_features, BITS)
    layer.set_bits(w_bits, a_bits)
    return layer


def randomize_b_(lora: Lora, seed: int = 1) -> None:
    """Non-zero B in every adapter (fresh adapters have B = 0, which hides A's gradient and the delta)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora.adapters.values():
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator) * 0.05)


def hand_quantize(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """round(clamp(w / s, n, p)) * s with the STE written out: d/dw = 1 inside the grid, d/ds = LSQ without g."""
    n, p = weight_range(bits)
    v = (w / s).clamp(n, p)
    return (v + (v.round() - v).detach()) * s


def x_batch(rows: int = 5, features: int = IN, seed: int = 3) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))


# --- initialisation and the low-rank delta ------------------------------------------------------------

def test_low_rank_init_is_gaussian_a_and_zero_b():
    torch.manual_seed(7)
    adapter = LowRank(256, 64, 16, ALPHA)
    torch.manual_seed(7)
    expected_a = torch.randn(16, 256) / math.sqrt(256)
    assert torch.equal(adapter.A, expected_a)
    assert adapter.A.std().item() == pytest.approx(1 / 16, rel=0.05)  # N(0, 1/in)
    assert abs(adapter.A.mean().item()) < 0.01
    assert adapter.B.shape == (64, 16) and torch.count_nonzero(adapter.B) == 0
    assert torch.count_nonzero(adapter.delta(torch.Size((64, 256)))) == 0
    assert adapter.scaling == ALPHA / 16


def test_delta_is_alpha_over_r_times_b_a():
    adapter = LowRank(IN, OUT, RANK, ALPHA)
    with torch.no_grad():
        adapter.B.copy_(torch.randn(OUT, RANK))
    assert torch.equal(adapter.delta(torch.Size((OUT, IN))), (adapter.B @ adapter.A) * (ALPHA / RANK))
    assert torch.allclose(adapter.delta(torch.Size((OUT, IN))), ALPHA / RANK * adapter.B @ adapter.A, atol=1e-6)


@pytest.mark.parametrize("variant", ["regular", "selective", "multiplex"])
def test_freshly_attached_lora_changes_nothing(variant):
    x = x_batch()
    plain = quant_linear(seed=0, w_bits=3, a_bits=4)
    adapted = quant_linear(seed=0, w_bits=3, a_bits=4, config=LoraConfig(variant, RANK, ALPHA))
    for layer in (plain, adapted):  # same calibrated activation quantizers
        layer.act_quantizer[4].observe(x)
        layer.act_quantizer[4].initialize()
    assert torch.equal(adapted.weight, plain.weight)
    for w, a in ((3, 4), (2, 32), (8, 4), (32, 32)):
        plain.set_bits(w, a)
        adapted.set_bits(w, a)
        assert torch.equal(adapted(x), plain(x)), (w, a)


def test_elastic_slicing_slices_b_rows_for_lin1_and_a_columns_for_lin2():
    config = LoraConfig("regular", RANK, ALPHA)
    # lin1: the first k output units -> the first k rows of B.
    lin1 = quant_linear(seed=0, w_bits=4, config=config)
    randomize_b_(lin1.lora)
    adapter = lin1.lora.adapters["b2_3_4_8_32"]
    full = adapter.delta(torch.Size((OUT, IN)))
    lin1.active_out = 6
    assert torch.equal(lin1.lora.delta(torch.Size((6, IN)), 4, 32), (adapter.B[:6] @ adapter.A) * adapter.scaling)
    assert torch.allclose(lin1.lora.delta(torch.Size((6, IN)), 4, 32), full[:6], atol=1e-7)
    assert lin1(x_batch()).shape == (5, 6)
    lin1(x_batch()).square().sum().backward()
    assert torch.count_nonzero(adapter.B.grad[6:]) == 0 and torch.count_nonzero(adapter.B.grad[:6]) > 0
    assert torch.count_nonzero(adapter.A.grad) > 0
    # lin2: the first k input units -> the first k columns of A.
    lin2 = quant_linear(seed=1, w_bits=4, config=config)
    randomize_b_(lin2.lora)
    adapter = lin2.lora.adapters["b2_3_4_8_32"]
    full = adapter.delta(torch.Size((OUT, IN)))
    lin2.active_in = 7
    assert torch.equal(lin2.lora.delta(torch.Size((OUT, 7)), 4, 32), (adapter.B @ adapter.A[:, :7]) * adapter.scaling)
    assert torch.allclose(lin2.lora.delta(torch.Size((OUT, 7)), 4, 32), full[:, :7], atol=1e-7)
    lin2(x_batch(features=7)).square().sum().backward()
    assert torch.count_nonzero(adapter.A.grad[:, 7:]) == 0 and torch.count_nonzero(adapter.A.grad[:, :7]) > 0
    assert torch.count_nonzero(adapter.B.grad) > 0


# --- the quantization-aware form (Alg. 1): y = x quantize(W0 + BA) --------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_effective_weight_is_exactly_quantize_of_merged_weight(bits):
    layer = quant_linear(seed=2, w_bits=bits, config=LoraConfig("regular", RANK, ALPHA))
    randomize_b_(layer.lora)
    adapter = layer.lora.adapters["b2_3_4_8_32"]
    merged = layer.weight + (adapter.B @ adapter.A) * (ALPHA / RANK)
    s = layer.weight_quantizer[bits].scale
    n, p = weight_range(bits)
    expected = (merged / s).clamp(n, p).round() * s
    effective = layer.quantize_weight(layer.active_weight())
    assert torch.equal(effective, expected)
    assert torch.equal(effective, layer.weight_quantizer[bits](merged))
    # The weight is on the grid: exactly what export merges and stores as integers times the scale.
    assert torch.equal((effective / s).round() * s, effective)
    assert not torch.equal(expected, (layer.weight / s).clamp(n, p).round() * s)  # the delta mattered
    x = x_batch()
    assert torch.equal(layer(x), F.linear(x, expected, layer.bias))
    # Alg. 1's two-term form, y = x W~ + x BA with W~ = quantize(W0 + BA) - BA, is the same forward.
    ba = (adapter.B @ adapter.A) * (ALPHA / RANK)
    assert torch.allclose(layer(x), F.linear(x, expected - ba, layer.bias) + x @ ba.T, atol=1e-5)


def test_gradients_reach_a_b_and_scale_through_the_ste():
    bits = 3
    layer = quant_linear(seed=4, w_bits=bits, config=LoraConfig("regular", RANK, ALPHA))
    randomize_b_(layer.lora)
    adapter = layer.lora.adapters["b2_3_4_8_32"]
    quantizer = layer.weight_quantizer[bits]
    with torch.no_grad():
        quantizer.scale.mul_(0.6)  # a step size that clips the largest weights too
    x, target = x_batch(), torch.randn(5, OUT, generator=torch.Generator().manual_seed(9))
    F.mse_loss(layer(x), target).backward()
    for grad in (adapter.A.grad, adapter.B.grad, quantizer.scale.grad, layer.weight.grad):
        assert grad is not None and torch.count_nonzero(grad) > 0

    # Reference: the same formula written by hand, differentiated by autograd.
    a = adapter.A.detach().clone().requires_grad_()
    b = adapter.B.detach().clone().requires_grad_()
    s = quantizer.scale.detach().clone().requires_grad_()
    merged = layer.weight.detach() + (b @ a) * (ALPHA / RANK)
    v = merged / s
    n, p = weight_range(bits)
    assert ((v < n) | (v > p)).any() and ((v > n) & (v < p)).any()  # both STE branches are exercised
    F.mse_loss(F.linear(x, hand_quantize(merged, s, bits), layer.bias.detach()), target).backward()
    assert torch.allclose(adapter.B.grad, b.grad, rtol=1e-5, atol=1e-8)
    assert torch.allclose(adapter.A.grad, a.grad, rtol=1e-5, atol=1e-8)
    g = 1 / math.sqrt(merged.numel() * p)  # LSQ gradient scale, layer-wise
    assert torch.allclose(quantizer.scale.grad, s.grad * g, rtol=1e-5)


# --- the three architectures (Fig. 2, Tab. 5) ----------------------------------------------------------

def grads_after_step(config: LoraConfig, w_bits: int, a_bits: int = 32) -> dict[str, torch.Tensor | None]:
    """B's gradient of each adapter after one backward pass at (w_bits, a_bits)."""
    layer = quant_linear(seed=5, w_bits=w_bits, a_bits=a_bits, config=config)
    randomize_b_(layer.lora)
    layer(x_batch()).square().sum().backward()
    return {key: adapter.B.grad for key, adapter in layer.lora.adapters.items()}


def test_regular_has_one_adapter_for_every_bit_width():
    lora = Lora(LoraConfig("regular", RANK, ALPHA), IN, OUT, BITS)
    assert list(lora.adapters) == ["b2_3_4_8_32"] and lora.base is None
    assert {lora.group_of(b) for b in BITS} == {"b2_3_4_8_32"}
    for bits in BITS:
        grads = grads_after_step(LoraConfig("regular", RANK, ALPHA), bits)
        assert torch.count_nonzero(grads["b2_3_4_8_32"]) > 0


@pytest.mark.parametrize("bits", BITS)
def test_selective_trains_only_the_selected_adapter(bits):
    config = LoraConfig("selective", RANK, ALPHA)
    lora = Lora(config, IN, OUT, BITS)
    assert list(lora.adapters) == ["b2", "b3", "b4", "b8", "b32"] and lora.base is None
    layer = quant_linear(seed=5, w_bits=bits, config=config)
    randomize_b_(layer.lora)
    selected = layer.lora.adapters[f"b{bits}"]
    assert torch.equal(layer.lora.delta(torch.Size((OUT, IN)), bits, 32), selected.delta(torch.Size((OUT, IN))))
    layer(x_batch()).square().sum().backward()
    for key, adapter in layer.lora.adapters.items():
        if key == f"b{bits}":
            assert torch.count_nonzero(adapter.A.grad) > 0 and torch.count_nonzero(adapter.B.grad) > 0
        else:
            assert adapter.A.grad is None and adapter.B.grad is None, key


def test_selective_adapters_are_initialised_separately():
    lora = Lora(LoraConfig("selective", RANK, ALPHA), IN, OUT, BITS)
    a = [adapter.A for adapter in lora.adapters.values()]
    assert all(not torch.equal(a[0], other) for other in a[1:])


@pytest.mark.parametrize("modules,groups", [
    (3, [[2], [3], [4, 8, 32]]),
    (4, [[2], [3], [4], [8, 32]]),
    (5, [[2], [3], [4], [8], [32]]),
])
def test_multiplex_groups_are_table_5(modules, groups):
    assert [list(g) for g in MULTIPLEX_GROUPS[modules]] == groups
    lora = Lora(LoraConfig("multiplex", RANK, ALPHA, multiplex_modules=modules), IN, OUT, BITS)
    assert [list(g) for g in lora.groups] == groups
    assert list(lora.adapters) == ["b" + "_".join(map(str, g)) for g in groups]
    assert lora.base == "b" + "_".join(map(str, groups[-1]))  # the group holding 32
    for group in groups:
        for bits in group:
            assert lora.group_of(bits) == "b" + "_".join(map(str, group))


@pytest.mark.parametrize("modules", [3, 4, 5])
@pytest.mark.parametrize("detach", [False, True])
def test_multiplex_routing_and_gradients(modules, detach):
    config = LoraConfig("multiplex", RANK, ALPHA, multiplex_modules=modules, detach=detach)
    base_group = MULTIPLEX_GROUPS[modules][-1]
    shape = torch.Size((OUT, IN))
    for bits in BITS:
        layer = quant_linear(seed=5, w_bits=bits, config=config)
        randomize_b_(layer.lora)
        adapters, base = layer.lora.adapters, layer.lora.adapters[layer.lora.base]
        delta = layer.lora.delta(shape, bits, 32)
        layer(x_batch()).square().sum().backward()
        if bits in base_group:
            # The base alone; no other module is touched.
            assert torch.equal(delta, base.delta(shape))
            assert torch.count_nonzero(base.B.grad) > 0 and torch.count_nonzero(base.A.grad) > 0
            assert all(a.B.grad is None and a.A.grad is None for k, a in adapters.items() if k != layer.lora.base)
            continue
        low = adapters[f"b{bits}"]
        assert torch.equal(delta, base.delta(shape) + low.delta(shape))
        assert torch.count_nonzero(low.B.grad) > 0 and torch.count_nonzero(low.A.grad) > 0
        if detach:  # Alg. 2: a low bit-width trains only its own module
            for grad in (base.A.grad, base.B.grad):
                assert grad is None or torch.count_nonzero(grad) == 0
        else:
            assert torch.count_nonzero(base.B.grad) > 0 and torch.count_nonzero(base.A.grad) > 0
        others = [a for k, a in adapters.items() if k not in (layer.lora.base, f"b{bits}")]
        assert all(a.B.grad is None and a.A.grad is None for a in others)


def test_multiplex_detach_changes_gradients_not_the_forward():
    x = x_batch()
    outputs = []
    for detach in (False, True):
        layer = quant_linear(seed=5, w_bits=2, config=LoraConfig("multiplex", RANK, ALPHA, detach=detach))
        randomize_b_(layer.lora)
        outputs.append(layer(x))
    assert torch.equal(*outputs)


def test_switch_by_weight_bits_or_activation_bits():
    for variant, expect_w, expect_a in (("selective", "b2", "b8"), ("multiplex", "b2", "b8")):
        by_weight = quant_linear(seed=5, w_bits=2, a_bits=8, config=LoraConfig(variant, RANK, ALPHA, switch="weight"))
        by_act = quant_linear(seed=5, w_bits=2, a_bits=8, config=LoraConfig(variant, RANK, ALPHA, switch="act"))
        for layer, selected in ((by_weight, expect_w), (by_act, expect_a)):
            randomize_b_(layer.lora)
            x = x_batch()
            layer.act_quantizer[8].observe(x)
            layer.act_quantizer[8].initialize()
            layer(x).square().sum().backward()
            trained = {k for k, a in layer.lora.adapters.items() if a.B.grad is not None}
            if variant == "selective":
                assert trained == {selected}, (variant, layer.lora.config.switch)
            else:
                # multiplex-5: w=2 selects the 2-bit module plus the base; a=8 selects the 8-bit module plus the base.
                assert trained == {selected, "b32"}, (variant, layer.lora.config.switch)
        w = by_weight.lora.delta(torch.Size((OUT, IN)), 2, 8)
        a = by_act.lora.delta(torch.Size((OUT, IN)), 2, 8)
        assert not torch.equal(w, a)


def test_lora_config_rejects_bad_values():
    with pytest.raises(ValueError, match="variant"):
        LoraConfig("double")
    with pytest.raises(ValueError, match="3, 4 or 5"):
        LoraConfig(multiplex_modules=6)
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="switch"):
        LoraConfig(switch="both")
    lora = Lora(LoraConfig("selective", RANK, ALPHA), IN, OUT, (4, 8))
    with pytest.raises(KeyError, match="no LoRA module for 2 bits"):
        lora.group_of(2)


@pytest.mark.parametrize("config", [
    None,
    LoraConfig("regular", RANK, ALPHA),
    LoraConfig("selective", RANK, ALPHA),
    LoraConfig("multiplex", RANK, ALPHA, multiplex_modules=3),
    LoraConfig("multiplex", RANK, ALPHA, detach=True, switch="act"),
], ids=["none", "regular", "selective", "multiplex3", "multiplex-detach-act"])
@pytest.mark.parametrize("w_bits,a_bits", [(32, 32), (32, 4), (4, 32), (2, 8)])
def test_training_forward_gives_the_same_gradients_as_plain_autograd(config, w_bits, a_bits):
    """The training-mode forward (which may recompute quantized copies in backward) against the eval-mode
    forward differentiated by autograd, with W0 frozen as in LoRA training (phase 2) and trainable as in phase 1."""
    x = x_batch()
    for freeze in (True, False):
        grads = []
        for training in (True, False):
            layer = quant_linear(seed=6, w_bits=w_bits, a_bits=a_bits, config=config)
            if config is not None:
                randomize_b_(layer.lora)
            layer.act_quantizer[4].observe(x)
            layer.act_quantizer[4].initialize()
            layer.act_quantizer[8].observe(x)
            layer.act_quantizer[8].initialize()
            layer.weight.requires_grad_(not freeze)
            layer.bias.requires_grad_(not freeze)
            layer.active_out = 7  # elastic width too
            layer.train(training)
            inputs = x.clone().requires_grad_()
            out = layer(inputs)
            assert out.shape == (5, 7)
            (out * torch.linspace(-1, 1, 7)).sum().backward()
            grads.append({"x": inputs.grad, **{n: p.grad for n, p in layer.named_parameters()}})
        recomputed, reference = grads
        assert recomputed.keys() == reference.keys()
        for name, grad in reference.items():
            if grad is None or torch.count_nonzero(grad) == 0:
                assert recomputed[name] is None or torch.count_nonzero(recomputed[name]) == 0, name
            else:
                assert torch.allclose(recomputed[name], grad, rtol=1e-5, atol=1e-7), name
