"""The search space and the Subnet value (qsamc.supernet.space): defaults, JSON, validation, sampling, counting."""

import json
import random
from dataclasses import replace

import pytest

from qsamc.errors import SubnetError
from qsamc.supernet.space import LayerBits, SearchSpace, Subnet, default_space, load_subnet


def with_bits(subnet: Subnet, changes: dict[str, tuple[int, int]]) -> Subnet:
    return replace(subnet, bits=tuple(LayerBits(b.layer, *changes.get(b.layer, (b.w, b.a))) for b in subnet.bits))


def block_layers(*blocks: int) -> list[str]:
    return [f"blocks.{i}.{n}" for i in blocks for n in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")]


# --- the default spaces -----------------------------------------------------------------------------

def test_default_space_of_vit_l_is_the_papers():
    space = default_space("vit_l")
    assert space.resolutions == tuple(range(512, 1025, 64))
    assert space.depth_choices == ((4, 5, 6),) * 4
    assert space.mlp_ratios == (3.0, 3.5, 4.0)
    assert space.weight_bits == space.act_bits == (2, 3, 4, 8, 32)
    assert space.granularity == "layer"
    assert len(space.quant_layers) == 4 * 24 + 3


@pytest.mark.parametrize("model, resolutions, depths", [
    ("vit_b", tuple(range(512, 1025, 64)), (2, 3)),
    ("vit_h", tuple(range(512, 1025, 64)), (6, 7, 8)),
    ("vit_t", tuple(range(128, 257, 16)), (2, 3)),
])
def test_default_space_scales(model, resolutions, depths):
    space = default_space(model)
    assert space.resolutions == resolutions
    assert space.depth_choices == (depths,) * 4


def test_quant_layers_order(vit_t_space):
    layers = vit_t_space.quant_layers
    assert layers[:5] == ("patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj",
                          "blocks.0.mlp.lin1", "blocks.0.mlp.lin2")
    assert layers[-2:] == ("neck.0", "neck.2")
    assert len(layers) == len(set(layers)) == 51


def test_active_blocks_keep_first_windowed_blocks_and_the_global_block():
    space = default_space("vit_l")
    assert space.active_blocks((4, 5, 6, 6)) == (0, 1, 2, 5, 6, 7, 8, 9, 11, *range(12, 24))
    assert space.active_blocks((6, 6, 6, 4)) == (*range(18), 18, 19, 20, 23)
    assert default_space("vit_t").active_blocks((2, 2, 2, 2)) == (0, 2, 3, 5, 6, 8, 9, 11)


def test_hidden_units(vit_t_space):
    assert [vit_t_space.hidden_units(r) for r in (3.0, 3.5, 4.0)] == [192, 224, 256]
    assert [default_space("vit_l").hidden_units(r) for r in (3.0, 3.5, 4.0)] == [3072, 3584, 4096]


def test_min_and_max_subnets(vit_t_space):
    top, low = vit_t_space.max_subnet(), vit_t_space.min_subnet()
    assert (top.resolution, top.depths, set(top.mlp_ratios)) == (256, (3, 3, 3, 3), {4.0})
    assert {(b.w, b.a) for b in top.bits} == {(32, 32)}
    assert (low.resolution, low.depths, set(low.mlp_ratios)) == (128, (2, 2, 2, 2), {3.0})
    assert {(b.w, b.a) for b in low.bits} == {(2, 2)}
    narrow = vit_t_space.restrict(weight_bits=(4, 8), act_bits=(8, 32))
    assert {(b.w, b.a) for b in narrow.max_subnet().bits} == {(8, 32)}
    assert {(b.w, b.a) for b in narrow.min_subnet().bits} == {(4, 8)}
    assert vit_t_space.validate(top) is top and vit_t_space.validate(low) is low


def test_space_rejects_bad_choices():
    with pytest.raises(SubnetError, match=r"^search space for vit_t: resolutions must be multiples of 16 up to 256, got \[250\]$"):
        SearchSpace("vit_t", (250,), ((2, 3),) * 4)
    with pytest.raises(SubnetError, match=r"depth choices of stage 1 must lie in 1\.\.3, got \[4\]"):
        SearchSpace("vit_t", (256,), ((3,), (4,), (3,), (3,)))
    with pytest.raises(SubnetError, match=r"depth_choices needs one list per stage \(4\), got 3"):
        SearchSpace("vit_t", (256,), ((3,),) * 3)
    with pytest.raises(SubnetError, match=r"weight_bits must be drawn from \[2, 3, 4, 8, 32\], got \[16\]"):
        default_space("vit_t").restrict(weight_bits=(16,))
    with pytest.raises(SubnetError, match=r"MLP ratios must lie in \(0, 4\.0\], got \[4\.5\]"):
        default_space("vit_t").restrict(mlp_ratios=(4.5,))
    with pytest.raises(SubnetError, match=r"granularity must be one of layer, block, stage, model, got 'head'"):
        default_space("vit_t", "head")


def test_space_json_round_trip():
    space = default_space("vit_l", "stage").restrict(act_bits=(8, 32), resolutions=(512, 1024))
    again = SearchSpace.from_json(json.loads(json.dumps(space.to_json())))
    assert again == space
    assert again.config == space.config


# --- the Subnet value -------------------------------------------------------------------------------

def test_subnet_json_round_trip(vit_t_space, tmp_path):
    subnet = vit_t_space.sample(random.Random(3))
    assert Subnet.from_json(json.loads(json.dumps(subnet.to_json()))) == subnet
    data = subnet.to_json()
    assert data["format"] == "qsamc.subnet" and data["version"] == 1
    assert list(data["bits"]) == list(vit_t_space.quant_layers)
    path = tmp_path / "subnet.json"
    subnet.save(path)
    loaded = load_subnet(path)
    assert loaded == subnet and hash(loaded) == hash(subnet)
    assert loaded.bits_of("blocks.7.mlp.lin2") == subnet.bits[1 + 7 * 4 + 3]


def test_validation_names_the_field(vit_t_space):
    s = vit_t_space.max_subnet()
    cases = [
        (replace(s, model="vit_b"), r"^subnet is for model 'vit_b', not 'vit_t'$"),
        (replace(s, resolution=200), r"^resolution 200 is not one of \[128, 144, .*, 256\]$"),
        (replace(s, depths=(3, 3, 1, 3)), r"^depths\[2\] = 1 is not one of the choices \[2, 3\] for stage 2$"),
        (replace(s, depths=(3, 3, 3)), r"^depths has 3 entries; vit_t has 4 stages$"),
        (replace(s, mlp_ratios=s.mlp_ratios[:5] + (2.0,) + s.mlp_ratios[6:]),
         r"^mlp_ratios\[5\] = 2\.0 is not one of \[3\.0, 3\.5, 4\.0\]$"),
        (replace(s, mlp_ratios=s.mlp_ratios[:11]), r"^mlp_ratios has 11 entries; vit_t has 12 blocks$"),
        (with_bits(s, {"blocks.3.mlp.lin1": (5, 8)}),
         r"^bits\.blocks\.3\.mlp\.lin1 weight bits 5 is not one of \[2, 3, 4, 8, 32\]$"),
        (with_bits(s, {"neck.2": (8, 6)}), r"^bits\.neck\.2 activation bits 6 is not one of \[2, 3, 4, 8, 32\]$"),
        (replace(s, bits=s.bits[:-1]), r"^bits lacks layer 'neck\.2'$"),
        (replace(s, bits=s.bits + (LayerBits("neck.4", 8, 8),)), r"^bits names unknown layer 'neck\.4'$"),
        (replace(s, bits=s.bits[1:2] + s.bits[:1] + s.bits[2:]), r"^bits lists its layers out of order or twice$"),
    ]
    for subnet, message in cases:
        with pytest.raises(SubnetError, match=message):
            vit_t_space.validate(subnet)


def test_tied_bits_per_block():
    space = default_space("vit_t", "block")
    s = space.max_subnet()
    with pytest.raises(SubnetError, match=r"^bits\.blocks\.4\.mlp\.lin2 = \[8, 8\] differs from "
                                          r"bits\.blocks\.4\.attn\.qkv = \[32, 32\], but bits are tied per block$"):
        space.validate(with_bits(s, {"blocks.4.mlp.lin2": (8, 8)}))
    space.validate(with_bits(s, {layer: (8, 8) for layer in block_layers(4)}))
    space.validate(with_bits(s, {"patch_embed.proj": (2, 4)}))  # its own unit
    with pytest.raises(SubnetError, match=r"^bits\.neck\.2 = \[4, 4\] differs from bits\.neck\.0"):
        space.validate(with_bits(s, {"neck.2": (4, 4)}))


def test_tied_bits_per_stage():
    space = default_space("vit_t", "stage")
    s = space.max_subnet()
    with pytest.raises(SubnetError, match=r"^bits\.blocks\.4\.attn\.qkv = \[8, 8\] differs from "
                                          r"bits\.blocks\.3\.attn\.qkv = \[32, 32\], but bits are tied per stage$"):
        space.validate(with_bits(s, {layer: (8, 8) for layer in block_layers(4)}))
    space.validate(with_bits(s, {layer: (8, 8) for layer in block_layers(3, 4, 5)}))


def test_tied_bits_per_model():
    space = default_space("vit_t", "model")
    s = space.max_subnet()
    everything_but_patch_embed = {layer: (4, 8) for layer in space.quant_layers[1:]}
    with pytest.raises(SubnetError, match=r"^bits\.blocks\.0\.attn\.qkv = \[4, 8\] differs from "
                                          r"bits\.patch_embed\.proj = \[32, 32\], but bits are tied per model$"):
        space.validate(with_bits(s, everything_but_patch_embed))
    space.validate(space.uniform_bits(s, 4, 8))


@pytest.mark.parametrize("data, message", [
    ([1, 2], r"^subnet must be a JSON object, not list$"),
    ({"format": "qsamc.ir"}, r"^subnet is a 'qsamc\.ir' file, not a qsamc subnet$"),
    ({"version": 2}, r"^subnet has version 2; this qsamc reads 1$"),
    ({"model": "vit_t"}, r"^subnet lacks the field 'resolution'$"),
    ({"resolution": "256"}, r"^subnet: 'resolution' must be an integer$"),
    ({"resolution": True}, r"^subnet: 'resolution' must be an integer$"),
    ({"model": 3}, r"^subnet: 'model' must be a string$"),
    ({"depths": [3, 3.0, 3, 3]}, r"^subnet: 'depths' must be a list of integers$"),
    ({"mlp_ratios": ["4.0"] * 12}, r"^subnet: 'mlp_ratios' must be a list of numbers$"),
    ({"bits": [[8, 8]]}, r"^subnet: 'bits' must map layer names to \[weight_bits, activation_bits\]$"),
    ({"bits": {"neck.0": [8, 8, 8]}}, r"^subnet: 'bits\.neck\.0' must be \[weight_bits, activation_bits\]$"),
    ({"bits": {"neck.0": [8, "8"]}}, r"^subnet: 'bits\.neck\.0' must be a list of integers$"),
])
def test_malformed_subnet_json(vit_t_space, data, message):
    full = vit_t_space.max_subnet().to_json()
    if isinstance(data, dict):
        full.update(data)
        if data == {"model": "vit_t"}:
            del full["resolution"]
    else:
        full = data
    with pytest.raises(SubnetError, match=message):
        Subnet.from_json(full)


def test_mlp_ratios_accept_integers(vit_t_space):
    data = vit_t_space.max_subnet().to_json()
    data["mlp_ratios"] = [4] * 12
    assert vit_t_space.validate(Subnet.from_json(data)) == vit_t_space.max_subnet()


def test_load_subnet_errors(tmp_path):
    with pytest.raises(SubnetError, match=r"^subnet file .*absent\.json does not exist$"):
        load_subnet(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "vit_t",')
    with pytest.raises(SubnetError, match=r"^subnet file .*bad\.json is not valid JSON: "):
        load_subnet(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SubnetError, match=r"is not valid JSON"):
        load_subnet(binary)
    listing = tmp_path / "list.json"
    listing.write_text("[]")
    with pytest.raises(SubnetError, match=r"^subnet file .*list\.json must be a JSON object, not list$"):
        load_subnet(listing)
    missing = tmp_path / "missing.json"
    missing.write_text('{"model": "vit_t", "resolution": 256, "depths": [3, 3, 3, 3], "mlp_ratios": []}')
    with pytest.raises(SubnetError, match=r"^subnet file .*missing\.json lacks the field 'bits'$"):
        load_subnet(missing)


# --- sampling ---------------------------------------------------------------------------------------

def test_sampling_is_seeded(vit_t_space):
    first = [vit_t_space.sample(random.Random(7)) for _ in range(2)]
    assert first[0] == first[1]
    rng_a, rng_b = random.Random(11), random.Random(11)
    assert [vit_t_space.sample(rng_a) for _ in range(5)] == [vit_t_space.sample(rng_b) for _ in range(5)]
    others = [vit_t_space.sample(random.Random(seed)) for seed in range(5)]
    assert len(set(others)) == 5


def test_sampling_covers_the_space(vit_t_space):
    rng = random.Random(0)
    samples = [vit_t_space.sample(rng) for _ in range(300)]
    for s in samples:
        vit_t_space.validate(s)
    assert {s.resolution for s in samples} == set(vit_t_space.resolutions)
    assert {d for s in samples for d in s.depths} == {2, 3}
    assert {r for s in samples for r in s.mlp_ratios} == {3.0, 3.5, 4.0}
    assert {b.w for s in samples for b in s.bits} == {b.a for s in samples for b in s.bits} == {2, 3, 4, 8, 32}


@pytest.mark.parametrize("granularity, groups", [("layer", 51), ("block", 14), ("stage", 6), ("model", 1)])
def test_sampling_respects_granularity(granularity, groups):
    space = default_space("vit_t", granularity)
    assert len(space.bit_groups()) == groups
    rng = random.Random(5)
    distinct_in_a_group = 0
    for _ in range(20):
        subnet = space.validate(space.sample(rng))  # validate checks the ties
        for layers in space.bit_groups().values():
            assert len({subnet.bits_of(layer)[1:] for layer in layers}) == 1
        distinct_in_a_group += len({b[1:] for b in subnet.bits}) > 1
    # per layer, block and stage the bits differ across groups; per model they never do
    assert (distinct_in_a_group > 0) == (granularity != "model")


# --- counting and canonical form -------------------------------------------------------------------

def test_count_small_spaces_by_hand(vit_t_space):
    one = dict(resolutions=(256,), mlp_ratios=(4.0,), weight_bits=(8, 32), act_bits=(8,))
    # model granularity: 2^4 depth combinations x 2 bit choices
    assert vit_t_space.restrict(granularity="model", **one).count() == 2 ** 4 * 2
    # two MLP ratios: every active block chooses, a stage of depth d has d active blocks
    two = {**one, "mlp_ratios": (3.0, 4.0)}
    assert vit_t_space.restrict(granularity="model", **two).count() == (2 ** 2 + 2 ** 3) ** 4 * 2
    assert vit_t_space.restrict(granularity="model", **{**two, "resolutions": (128, 256)}).count() == 12 ** 4 * 4
    # layer granularity, only stage 0 elastic: depth 3 -> 51 layers choose; depth 2 -> block 1 is dropped
    stage0 = {**one, "depth_choices": ((2, 3), (3,), (3,), (3,))}
    assert vit_t_space.restrict(granularity="layer", **stage0).count() == 2 ** 51 + 2 ** 47
    # block: 14 groups (patch_embed, 12 blocks, neck), 13 live when block 1 is dropped
    assert vit_t_space.restrict(granularity="block", **stage0).count() == 2 ** 14 + 2 ** 13
    # stage: the global block keeps every stage group live
    assert vit_t_space.restrict(granularity="stage", **stage0).count() == 2 * 2 ** 6


def test_count_of_the_default_space(vit_t_space):
    # per layer, per stage of depth d: 3^d ratios x 25^(4d) bits; plus patch_embed and neck (25^3)
    per_stage = sum(3 ** d * 25 ** (4 * d) for d in (2, 3))
    assert vit_t_space.count() == 9 * per_stage ** 4 * 25 ** 3
    assert vit_t_space.log10_count() == pytest.approx(77.9746, abs=1e-4)


def test_canonical_merges_subnets_that_differ_only_in_dropped_blocks(vit_t_space):
    base = replace(vit_t_space.sample(random.Random(2)), depths=(2, 3, 3, 2))  # blocks 1 and 10 dropped
    ratios = list(base.mlp_ratios)
    ratios[1], ratios[10] = 3.0, 3.5
    other = with_bits(replace(base, mlp_ratios=tuple(ratios)), {"blocks.1.mlp.lin1": (2, 3), "blocks.10.attn.qkv": (3, 2)})
    assert other != base
    assert vit_t_space.canonical(other) == vit_t_space.canonical(base)
    canonical = vit_t_space.canonical(base)
    assert canonical.mlp_ratios[1] == canonical.mlp_ratios[10] == 4.0
    assert canonical.bits_of("blocks.1.mlp.lin1")[1:] == (32, 32)
    assert vit_t_space.canonical(canonical) == canonical
    # a difference in a live block survives
    live = with_bits(base, {"blocks.0.mlp.lin1": (2, 3) if base.bits_of("blocks.0.mlp.lin1")[1:] != (2, 3) else (3, 2)})
    assert vit_t_space.canonical(live) != canonical


@pytest.mark.parametrize("granularity", ["layer", "block", "stage", "model"])
def test_canonical_stays_in_the_space(granularity):
    space = default_space("vit_t", granularity).restrict(weight_bits=(4, 8), act_bits=(4, 8))
    rng = random.Random(9)
    for _ in range(20):
        subnet = replace(space.sample(rng), depths=(2, 2, 2, 2))
        canonical = space.validate(space.canonical(subnet))
        assert canonical.depths == subnet.depths
        for block in space.active_blocks(subnet.depths):
            assert canonical.mlp_ratios[block] == subnet.mlp_ratios[block]
