"""The training-time IR passes (insert quantizers, calibrate activations, attach LoRA) and the W8A8 head."""

import copy
import random
from dataclasses import replace

import pytest
import torch

from conftest import randomize_
from qsamc.task.head import HEAD_BITS, SegmentationHead
from qsamc.ir.graph import IR
from qsamc.supernet.layers import QUANT_LAYER_TYPES
from qsamc.supernet.lora import Lora, LoraConfig
from qsamc.passes import AttachLoraPass, CalibrateActivationsPass, InsertQuantizersPass
from qsamc.ir.frontend import build_ir
from qsamc.supernet.quant import QuantizerBank
from qsamc.supernet.encoder import Supernet


@pytest.fixture(scope="module")
def pristine():
    """One traced vit_t supernet with random weights; tests work on deep copies of it."""
    supernet = Supernet.build("vit_t")
    randomize_(supernet, seed=3)
    return build_ir(supernet, verify=True)


@pytest.fixture
def ir(pristine):
    """A private supernet + IR (the passes mutate the supernet's layers)."""
    return IR(copy.deepcopy(pristine.graph), pristine.model, copy.deepcopy(pristine.root))


def lsq_plus_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ+ weight init by hand: max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1), population sigma."""
    mu, sigma = w.mean(), w.std(correction=0)
    return torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 2 ** (bits - 1)


# --- InsertQuantizersPass ------------------------------------------------------------------------------

def test_insert_quantizers_on_exactly_the_quantizable_layers(ir):
    space = ir.root.space
    quantizable = {ir.graph.nodes[n]["module"] for n in ir.quantizable()}
    assert len(quantizable) == 51 and quantizable == set(space.quant_layers)
    result = InsertQuantizersPass(space)(ir)
    assert result.modified and result.ir is ir
    with_banks = {name for name, m in ir.root.named_modules()
                  if isinstance(m, QUANT_LAYER_TYPES) and m.weight_quantizer is not None}
    assert with_banks == quantizable
    for name in quantizable:
        layer = ir.root.get_submodule(name)
        assert isinstance(layer.weight_quantizer, QuantizerBank) and layer.weight_quantizer.kind == "weight"
        assert isinstance(layer.act_quantizer, QuantizerBank) and layer.act_quantizer.kind == "act"
        assert layer.weight_quantizer.bit_choices == space.weight_bits
        assert layer.act_quantizer.bit_choices == space.act_bits
        assert sorted(layer.weight_quantizer.quantizers) == ["2", "3", "4", "8"]  # 32 has no quantizer
    # Every bit-width of the space can now be set on every layer.
    ir.root.set_subnet(space.min_subnet())
    ir.root.set_subnet(space.uniform_bits(space.max_subnet(), 8, 8))


def test_weight_scales_start_from_the_lsq_plus_formula_on_the_full_weight(ir):
    space = ir.root.space
    # Elastic slicing active (float bits: no quantizer exists yet): the init must still use the full weight.
    ir.root.set_subnet(space.uniform_bits(space.min_subnet(), 32, 32))
    InsertQuantizersPass(space)(ir)
    for name in ("patch_embed.proj", "blocks.0.attn.qkv", "blocks.5.mlp.lin1", "blocks.11.mlp.lin2", "neck.2"):
        layer = ir.root.get_submodule(name)
        for bits in (2, 3, 4, 8):
            quantizer = layer.weight_quantizer[bits]
            assert quantizer.scale.shape == ()
            assert bool(quantizer.initialized)
            assert torch.allclose(quantizer.scale, lsq_plus_scale(layer.weight.detach(), bits), rtol=1e-6), (name, bits)
    lin1 = ir.root.get_submodule("blocks.5.mlp.lin1")
    assert lin1.active_out < lin1.out_features
    assert not torch.allclose(lsq_plus_scale(lin1.active_weight().detach(), 4), lin1.weight_quantizer[4].scale)


def test_per_channel_weight_scales(ir):
    InsertQuantizersPass(ir.root.space, per_channel=True)(ir)
    for name in ("blocks.1.attn.qkv", "blocks.1.mlp.lin1", "blocks.1.mlp.lin2", "neck.0"):
        layer = ir.root.get_submodule(name)
        rows = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        for bits in (2, 8):
            scale = layer.weight_quantizer[bits].scale
            assert scale.shape == (layer.weight.shape[0],)
            expected = torch.stack([lsq_plus_scale(row, bits) for row in rows])
            assert torch.allclose(scale, expected, rtol=1e-6), (name, bits)


def test_insert_quantizers_is_idempotent(ir):
    space = ir.root.space
    InsertQuantizersPass(space)(ir)
    banks = {n: (ir.module_of(n).weight_quantizer, ir.module_of(n).act_quantizer) for n in ir.quantizable()}
    state = copy.deepcopy(ir.root.state_dict())
    result = InsertQuantizersPass(space)(ir)
    assert result.modified is False
    assert all(ir.module_of(n).weight_quantizer is w and ir.module_of(n).act_quantizer is a for n, (w, a) in banks.items())
    after = ir.root.state_dict()
    assert list(after) == list(state) and all(torch.equal(v, after[k]) for k, v in state.items())


# --- CalibrateActivationsPass --------------------------------------------------------------------------

def test_calibration_initialises_activations_from_observed_min_max(ir):
    space = ir.root.space
    InsertQuantizersPass(space)(ir)
    subnet = replace(space.max_subnet(), resolution=128)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(1, 3, 128, 128, generator=generator) for _ in range(2)]
    # Record what two layers see at full precision, with our own hook.
    seen: dict[str, list[torch.Tensor]] = {"blocks.3.mlp.lin2": [], "patch_embed.proj": []}
    hooks = [ir.root.get_submodule(name).register_forward_pre_hook(
        lambda _m, inputs, name=name: seen[name].append(inputs[0].detach().clone())) for name in seen]
    ir.root.set_subnet(space.min_subnet())
    before = ir.root.subnet
    try:
        result = CalibrateActivationsPass(ir.root, batches, subnet)(ir)
    finally:
        for hook in hooks:
            hook.remove()
    assert result.modified
    assert ir.root.subnet == before  # the caller's subnet is restored
    for name, inputs in seen.items():
        assert len(inputs) == 2
        lo = min(x.min() for x in inputs)
        hi = max(x.max() for x in inputs)
        bank = ir.root.get_submodule(name).act_quantizer
        for bits in (2, 3, 4, 8):
            quantizer = bank[bits]
            assert bool(quantizer.initialized)
            assert quantizer.observed_min == lo and quantizer.observed_max == hi
            assert torch.allclose(quantizer.scale, (hi - lo) / (2**bits - 1), rtol=1e-6), (name, bits)
            assert quantizer.offset == lo, (name, bits)
    # Every quantized layer ran in the max subnet, so every activation quantizer is initialised.
    assert all(bool(ir.module_of(n).act_quantizer[b].initialized) for n in ir.quantizable() for b in (2, 3, 4, 8))


def test_calibration_runs_at_full_precision(ir):
    """Observed inputs must be float (32-bit) activations, not already-quantized ones."""
    space = ir.root.space
    InsertQuantizersPass(space)(ir)
    subnet = replace(space.max_subnet(), resolution=128)
    batch = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    inputs = []
    lin2 = ir.root.get_submodule("blocks.0.mlp.lin2")
    hook = lin2.register_forward_pre_hook(lambda _m, args: inputs.append((lin2.w_bits, lin2.a_bits)))
    ir.root.set_subnet(space.min_subnet())
    CalibrateActivationsPass(ir.root, [batch], subnet)(ir)
    hook.remove()
    assert inputs == [(32, 32)]
    assert (lin2.w_bits, lin2.a_bits) == (2, 2)  # min subnet restored


# --- AttachLoraPass ------------------------------------------------------------------------------------

def adapted(ir: IR) -> dict[str, Lora]:
    return {name: m.lora for name, m in ir.root.named_modules()
            if isinstance(m, QUANT_LAYER_TYPES) and m.lora is not None}


def test_attach_lora_on_the_papers_layers(ir):
    InsertQuantizersPass(ir.root.space)(ir)
    rng_before = torch.get_rng_state()
    result = AttachLoraPass(LoraConfig("multiplex", rank=4), seed=5)(ir)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global stream is left alone
    assert result.modified
    loras = adapted(ir)
    expected = {f"blocks.{i}.{m}" for i in range(12) for m in ("attn.qkv", "mlp.lin1", "mlp.lin2")}
    assert set(loras) == expected
    for name, lora in loras.items():
        layer = ir.root.get_submodule(name)
        assert list(lora.adapters) == ["b2", "b3", "b4", "b8", "b32"]
        for adapter in lora.adapters.values():
            assert adapter.A.shape == (4, layer.in_features) and adapter.B.shape == (layer.out_features, 4)
            assert torch.count_nonzero(adapter.B) == 0
    assert AttachLoraPass(LoraConfig("multiplex", rank=4), seed=5)(ir).modified is False
    assert all(adapted(ir)[n] is lora for n, lora in loras.items())


def test_attach_lora_modules_are_configurable(ir):
    InsertQuantizersPass(ir.root.space)(ir)
    AttachLoraPass(LoraConfig("regular", modules=("attn.proj",)))(ir)
    assert set(adapted(ir)) == {f"blocks.{i}.attn.proj" for i in range(12)}


def test_attach_lora_is_deterministic_for_a_seed(pristine):
    def attach(seed: int) -> dict[str, torch.Tensor]:
        ir = IR(copy.deepcopy(pristine.graph), pristine.model, copy.deepcopy(pristine.root))
        InsertQuantizersPass(ir.root.space)(ir)
        torch.manual_seed(seed * 100 + 17)  # the global stream must not matter
        AttachLoraPass(LoraConfig("selective", rank=2), seed=seed)(ir)
        return {k: v for k, v in ir.root.state_dict().items() if ".lora." in k}

    first, again, other = attach(1), attach(1), attach(2)
    assert first and list(first) == list(again) == list(other)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if k.endswith(".A"))


def test_attached_lora_keeps_the_supernet_output(ir):
    space = ir.root.space
    InsertQuantizersPass(space)(ir)
    subnet = replace(space.sample(random.Random(4)), resolution=128)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    ir.root.set_subnet(subnet)
    with torch.no_grad():
        before = ir.root(x)
        AttachLoraPass(LoraConfig("multiplex"))(ir)
        after = ir.root(x)
    assert torch.equal(before, after)


# --- the W8A8 task head --------------------------------------------------------------------------------

def test_head_is_w8a8_with_min_max_weight_scale():
    torch.manual_seed(0)
    head = SegmentationHead(32, 5, hidden=16)
    for layer in (head.conv, head.classifier):
        assert (layer.w_bits, layer.a_bits) == (HEAD_BITS, HEAD_BITS) == (8, 8)
        assert layer.weight_quantizer.bit_choices == (8,) and layer.act_quantizer.bit_choices == (8,)
        quantizer = layer.weight_quantizer[8]
        assert quantizer.scale == layer.weight.detach().abs().max() / 127
        # Min-max: the largest |w| sits on the grid's end, nothing is clipped.
        q, s = quantizer.integer(layer.weight.detach())
        assert q.abs().max() == 127 and q.min() >= -127
    features = torch.randn(2, 32, 8, 8)
    logits = head(features, (32, 32))
    assert logits.shape == (2, 5, 32, 32)
