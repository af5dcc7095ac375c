"""Exact MACs and BitOPs (passes/count_bitops.py): against FlopCounterMode, by hand, and BitopsModel."""

import copy
import random
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qsamc.ir.graph import IR
from qsamc.passes import BitopsModel, CountBitopsPass
from qsamc.ir.frontend import analysis_ir
from qsamc.supernet.space import LayerBits, default_space
from qsamc.supernet.encoder import Supernet


def private(ir: IR) -> IR:
    return IR(copy.deepcopy(ir.graph), ir.model, ir.root)


def counted_macs(supernet: Supernet, subnet, device="cpu") -> int:
    """FLOPs / 2 of one forward pass of the realised subnet, as torch counts them."""
    space = supernet.space
    supernet.set_subnet(space.uniform_bits(subnet, 32, 32))
    x = torch.zeros(1, 3, subnet.resolution, subnet.resolution, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        supernet(x)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


def report_of(ir, space, subnet, float_macs="fp32"):
    CountBitopsPass(space, subnet, float_macs)(ir)
    return ir.cost.to_json()


def test_vit_t_random_subnets_match_flop_counter(vit_t_ir):
    space = default_space("vit_t")
    supernet = Supernet.build("vit_t")
    model = BitopsModel(vit_t_ir, space)
    rng = random.Random(2024)
    subnets = [space.sample(rng) for _ in range(5)]
    assert len({s.resolution for s in subnets}) > 1 and len({s.depths for s in subnets}) > 1
    for subnet in subnets:
        cost = report_of(vit_t_ir, space, subnet)
        assert cost["macs"] == counted_macs(supernet, subnet)
        assert model.cost(subnet) == (cost["macs"], cost["bitops"])


def test_vit_b_random_subnets_match_flop_counter(vit_b_ir):
    space = default_space("vit_b")
    ir = private(vit_b_ir)
    with torch.device("meta"):
        supernet = Supernet.build("vit_b")
    model = BitopsModel(ir, space)
    rng = random.Random(7)
    subnets = [space.sample(rng) for _ in range(5)]
    assert len({s.resolution for s in subnets}) > 1
    for subnet in subnets:
        cost = report_of(ir, space, subnet)
        assert cost["macs"] == counted_macs(supernet, subnet, device="meta")
        assert model.cost(subnet) == (cost["macs"], cost["bitops"])


def test_vit_l_max_subnet_at_1024():
    space = default_space("vit_l")
    ir = analysis_ir(space)
    cost = report_of(ir, space, space.max_subnet())
    assert cost["macs"] == 1_492_840_153_088  # 1492.84 GMAC
    with torch.device("meta"):
        supernet = Supernet.build("vit_l")
    assert counted_macs(supernet, space.max_subnet(), device="meta") == 1_492_840_153_088
    assert BitopsModel(ir, space).cost(space.max_subnet())[0] == 1_492_840_153_088
    # every layer at 32x32 bits: BitOPs = 1024 x MACs
    assert cost["bitops"] == 1024 * cost["macs"]


def test_bitops_model_equals_the_pass_across_granularities_and_conventions(vit_t_ir):
    for granularity in ("layer", "block", "stage", "model"):
        space = default_space("vit_t", granularity)
        for float_macs in ("fp32", "exclude"):
            model = BitopsModel(vit_t_ir, space, float_macs)
            rng = random.Random(granularity + float_macs)
            for _ in range(10):
                subnet = space.sample(rng)
                cost = report_of(vit_t_ir, space, subnet, float_macs)
                assert model.cost(subnet) == (cost["macs"], cost["bitops"])


def test_hand_computed_layers(vit_t_ir):
    space = default_space("vit_t")
    subnet = replace(space.max_subnet(), resolution=208, depths=(3, 2, 3, 3),
                     mlp_ratios=(3.5,) + (4.0,) * 11)
    bits = {"patch_embed.proj": (8, 4), "blocks.0.attn.qkv": (4, 8), "blocks.0.mlp.lin1": (2, 3),
            "blocks.0.mlp.lin2": (3, 2), "neck.2": (4, 4)}
    subnet = replace(subnet, bits=tuple(LayerBits(b.layer, *bits.get(b.layer, (32, 32))) for b in subnet.bits))
    cost = report_of(vit_t_ir, space, subnet)
    rows = {row["node"]: row for row in cost["per_layer"]}
    g = 13  # 208 / 16; windowed blocks pad 13 -> 16 (4 windows of 4 a side)
    expected_macs = {
        "patch_embed.proj": g * g * 64 * 3 * 16 * 16,
        "blocks.0.attn.qkv": 16 * 16 * 64 * 192,          # padded windows
        "blocks.0.mlp.lin1": g * g * 64 * 224,            # ratio 3.5: 224 hidden units
        "blocks.0.mlp.lin2": g * g * 224 * 64,
        # 16 windows x 2 heads x 32 dims x (2 n^2 + 2 n s), n = 16 tokens of a 4x4 window
        "blocks.0.attn.core": 16 * 2 * 32 * (2 * 16 ** 2 + 2 * 16 * 4),
        # global attention over all 169 tokens, rel-pos tables of side 13
        "blocks.2.attn.core": 2 * 32 * (2 * 169 ** 2 + 2 * 169 * 13),
        "neck.0": g * g * 32 * 64,
        "neck.2": g * g * 32 * 32 * 9,
    }
    assert expected_macs["blocks.0.attn.qkv"] == 3_145_728 and expected_macs["blocks.2.attn.core"] == 3_937_024
    for node, macs in expected_macs.items():
        assert rows[node]["macs"] == macs, node
        w, a = bits.get(node, (32, 32)) if rows[node]["kind"] != "attention" else (32, 32)
        assert rows[node]["bitops"] == macs * w * a, node
    assert rows["blocks.0.mlp.lin1"]["bitops"] == 2 * 3 * g * g * 64 * 224
    # block 4 (windowed, stage 1) is dropped: no MACs, no row
    assert not any(row["node"].startswith("blocks.4.") for row in cost["per_layer"])
    assert vit_t_ir.graph.nodes["blocks.4.mlp.lin1"]["present"] is False
    assert vit_t_ir.graph.nodes["blocks.4.mlp.lin1"]["macs"] == 0
    assert all(a["macs"] == 0 for _, a in vit_t_ir.nodes() if a["kind"] not in ("conv", "linear", "attention"))


def test_per_layer_bits_are_the_counted_subnets(vit_t_ir):
    # the IR carries no chosen bits (or another subnet's); the report must show the counted subnet's
    space = default_space("vit_t")
    subnet = space.sample(random.Random(4))
    cost = report_of(vit_t_ir, space, subnet)
    for row in cost["per_layer"]:
        if row["kind"] == "attention":
            assert row["bits"] is None
        else:
            w, a = subnet.bits_of(row["node"])[1:]
            assert row["bits"] == [w, a] and row["bitops"] == row["macs"] * w * a


def test_float_attention_line_and_exclude_convention(vit_t_ir):
    space = default_space("vit_t")
    subnet = space.uniform_bits(space.sample(random.Random(1)), 2, 2)
    fp32 = report_of(vit_t_ir, space, subnet, "fp32")
    attention = sum(a["macs"] for _, a in vit_t_ir.nodes("attention"))
    assert fp32["float_macs"] == attention > 0
    assert fp32["float_bitops"] == 1024 * attention
    assert fp32["float_macs_convention"] == "fp32"
    exclude = report_of(vit_t_ir, space, subnet, "exclude")
    assert all(a["bitops"] == 0 for _, a in vit_t_ir.nodes("attention"))
    assert (exclude["macs"], exclude["float_macs"], exclude["float_bitops"]) == (fp32["macs"], attention, 0)
    assert exclude["bitops"] == 4 * (fp32["macs"] - attention)
    assert fp32["bitops"] - exclude["bitops"] == 1024 * attention
    # the paper's W2A2 figure (< 1% of FP32 BitOPs) only holds when the float matmuls are left out
    full = 1024 * fp32["macs"]
    assert exclude["bitops"] < 0.01 * full < fp32["bitops"]
    with pytest.raises(ValueError, match=r"float_macs must be one of \('fp32', 'exclude'\), got 'fp16'"):
        CountBitopsPass(space, subnet, "fp16")


def test_per_part_and_per_layer_sum_to_totals(vit_t_ir):
    space = default_space("vit_t")
    rng = random.Random(3)
    for _ in range(5):
        cost = report_of(vit_t_ir, space, space.sample(rng))
        assert list(cost["per_part"]) == ["patch_embed", "stage 0", "stage 1", "stage 2", "stage 3", "neck"]
        assert sum(p["macs"] for p in cost["per_part"].values()) == cost["macs"]
        assert sum(p["bitops"] for p in cost["per_part"].values()) == cost["bitops"]
        assert sum(r["macs"] for r in cost["per_layer"]) == cost["macs"]
        assert sum(r["bitops"] for r in cost["per_layer"]) == cost["bitops"]
        assert sum(a["macs"] for _, a in vit_t_ir.nodes()) == cost["macs"]


def test_count_rejects_subnets_outside_the_space():
    space = default_space("vit_t")
    from qsamc.errors import SubnetError

    with pytest.raises(SubnetError, match=r"^resolution 100 is not one of"):
        CountBitopsPass(space, replace(space.max_subnet(), resolution=100))
