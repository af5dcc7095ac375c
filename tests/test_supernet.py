"""The elastic, quantizable supernet (qsamc.supernet.encoder): it computes exactly the subnet that is set."""

import copy
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import encoder_and_supernet
from qsamc.errors import SubnetError
from qsamc.supernet.layers import QuantConv2d, QuantLinear
from qsamc.sam import build_encoder, sam_modeling
from qsamc.supernet.space import default_space
from qsamc.supernet.encoder import Supernet

window_partition = sam_modeling.image_encoder.window_partition
window_unpartition = sam_modeling.image_encoder.window_unpartition


def image(resolution: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def encoder_forward(encoder: nn.Module, x: torch.Tensor, blocks=None, pos_embed=None) -> torch.Tensor:
    """segment-anything's ImageEncoderViT.forward, with the kept blocks and pos_embed made explicit."""
    x = encoder.patch_embed(x)
    x = x + (encoder.pos_embed if pos_embed is None else pos_embed)
    for index in range(len(encoder.blocks)) if blocks is None else blocks:
        x = encoder.blocks[index](x)
    return encoder.neck(x.permute(0, 3, 1, 2))


@pytest.fixture
def vit_t():
    return encoder_and_supernet("vit_t")


def test_transform_keeps_names_and_weights(vit_t):
    reference, supernet = vit_t
    assert list(supernet.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(supernet.state_dict()[key], value), key
    modules = dict(supernet.named_modules())
    assert isinstance(modules["patch_embed.proj"], QuantConv2d)
    assert isinstance(modules["neck.0"], QuantConv2d) and isinstance(modules["neck.2"], QuantConv2d)
    assert all(isinstance(m, QuantLinear) == (name.split(".", 2)[-1] in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2"))
               for name, m in modules.items() if isinstance(m, nn.Linear))
    assert list(supernet.quant_layers()) == list(supernet.space.quant_layers)


def test_max_subnet_equals_segment_anything_encoder(vit_t):
    reference, supernet = vit_t
    space = supernet.space
    supernet.set_subnet(space.uniform_bits(space.max_subnet(), 32, 32))
    assert reference.pos_embed.abs().min() > 0 and reference.blocks[2].attn.rel_pos_h.abs().min() > 0
    x = image(256)
    with torch.no_grad():
        expected = reference(x)
        got = supernet(x)
    assert got.shape == (1, 32, 16, 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_max_subnet_equals_encoder_at_1024(tiny1024):
    reference, supernet = encoder_and_supernet(tiny1024, seed=3)
    # 1024 / 16 = 64 tokens a side; windowed blocks pad to 70 (5 windows of 14)
    assert [b.window_size for b in reference.blocks] == [14, 0, 14, 0]
    assert supernet.subnet == supernet.space.max_subnet() and supernet.subnet.resolution == 1024
    x = image(1024)
    with torch.no_grad():
        expected = reference(x)
        got = supernet(x)
    assert got.shape == (1, 16, 64, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_checkpoint_of_the_encoder_loads_into_the_supernet(tmp_path, vit_t):
    reference, _ = vit_t
    torch.save({f"image_encoder.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "sam.pth")
    supernet = Supernet.build("vit_t", str(tmp_path / "sam.pth"))
    x = image(256)
    with torch.no_grad():
        torch.testing.assert_close(supernet(x), reference(x), rtol=0, atol=1e-5)


def test_elastic_depth_drops_the_windowed_blocks_before_the_global_block(vit_t):
    reference, supernet = vit_t
    space = supernet.space
    subnet = replace(space.max_subnet(), depths=(2, 3, 2, 3))
    supernet.set_subnet(subnet)
    assert supernet.active_blocks == (0, 2, 3, 4, 5, 6, 8, 9, 10, 11)
    calls = [0] * 12
    for index, block in enumerate(supernet.blocks):
        block.register_forward_hook(lambda *args, i=index: calls.__setitem__(i, calls[i] + 1))
    x = image(256)
    with torch.no_grad():
        got = supernet(x)
        expected = encoder_forward(reference, x, blocks=(0, 2, 3, 4, 5, 6, 8, 9, 10, 11))
    assert calls == [1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, reference(x), atol=1e-3)


def test_elastic_mlp_keeps_the_first_hidden_units_of_one_block(vit_t):
    reference, supernet = vit_t
    space = supernet.space
    supernet.set_subnet(replace(space.max_subnet(), mlp_ratios=(3.0,) * 12))
    block, original = supernet.blocks[3], reference.blocks[3]
    assert (block.mlp.lin1.active_out, block.mlp.lin2.active_in) == (192, 192)
    y = torch.randn(1, 16, 16, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        # Block.forward of segment-anything, with the MLP written out on the first 192 of 256 units
        h, pad = window_partition(original.norm1(y), 4)
        h = window_unpartition(original.attn(h), 4, pad, (16, 16))
        x = y + h
        lin1, lin2 = original.mlp.lin1, original.mlp.lin2
        z = F.linear(original.norm2(x), lin1.weight[:192], lin1.bias[:192])
        z = F.linear(F.gelu(z), lin2.weight[:, :192], lin2.bias)
        expected = x + z
        torch.testing.assert_close(block(y), expected, rtol=0, atol=1e-5)
        # units 192.. are not used: changing them changes nothing
        lin1_weight = block.mlp.lin1.weight
        lin1_weight[192:] += 1.0
        block.mlp.lin2.weight[:, 192:] -= 1.0
        torch.testing.assert_close(block(y), expected, rtol=0, atol=1e-5)
        supernet.set_subnet(space.max_subnet())
        assert not torch.allclose(block(y), expected, atol=1e-3)


def test_elastic_mlp_equals_a_physically_sliced_encoder(vit_t):
    reference, supernet = vit_t
    space = supernet.space
    ratios = tuple(random.Random(0).choice(space.mlp_ratios) for _ in range(12))
    supernet.set_subnet(replace(space.max_subnet(), mlp_ratios=ratios))
    sliced = copy.deepcopy(reference)
    for block, ratio in zip(sliced.blocks, ratios):
        k = int(64 * ratio)
        lin1, lin2 = nn.Linear(64, k), nn.Linear(k, 64)
        with torch.no_grad():
            lin1.weight.copy_(block.mlp.lin1.weight[:k])
            lin1.bias.copy_(block.mlp.lin1.bias[:k])
            lin2.weight.copy_(block.mlp.lin2.weight[:, :k])
            lin2.bias.copy_(block.mlp.lin2.bias)
        block.mlp.lin1, block.mlp.lin2 = lin1, lin2
    x = image(256)
    with torch.no_grad():
        torch.testing.assert_close(supernet(x), sliced(x), rtol=0, atol=1e-5)


def test_position_embedding_is_bilinearly_interpolated(vit_t):
    _, supernet = vit_t
    assert supernet.position_embedding((16, 16)) is supernet.pos_embed
    for grid in (8, 11, 12, 15):
        expected = F.interpolate(supernet.pos_embed.permute(0, 3, 1, 2), size=(grid, grid), mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1)
        assert torch.equal(supernet.position_embedding((grid, grid)), expected)
    # independent of F.interpolate: bilinear interpolation reproduces a function linear in the token
    # coordinates; the 16-grid centre of token i sits at (i + 0.5) * 16 / g - 0.5 of the new grid g
    rows = torch.arange(16.0).view(1, 16, 1, 1)
    cols = torch.arange(16.0).view(1, 1, 16, 1)
    with torch.no_grad():
        supernet.pos_embed.copy_((2.0 * rows + 3.0 * cols + 1.0).expand(1, 16, 16, 64))
    for grid in (8, 10, 12, 14):
        coord = (torch.arange(grid) + 0.5) * 16 / grid - 0.5
        expected = 2.0 * coord.view(grid, 1) + 3.0 * coord.view(1, grid) + 1.0
        got = supernet.position_embedding((grid, grid))
        assert got.shape == (1, grid, grid, 64)
        torch.testing.assert_close(got[0, :, :, 7], expected, rtol=1e-6, atol=1e-5)


def test_every_resolution_of_the_space_runs_and_matches_the_encoder(vit_t):
    reference, supernet = vit_t
    space = supernet.space
    for resolution in space.resolutions:
        supernet.set_subnet(replace(space.max_subnet(), resolution=resolution))
        grid = resolution // 16
        x = image(resolution)
        with torch.no_grad():
            got = supernet(x)
            # segment-anything itself at this resolution: its global blocks interpolate rel-pos tables
            expected = encoder_forward(reference, x, pos_embed=supernet.position_embedding((grid, grid)))
        assert got.shape == (1, 32, grid, grid)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_wrong_input_resolution(vit_t):
    _, supernet = vit_t
    supernet.set_subnet(replace(supernet.space.max_subnet(), resolution=192))
    with pytest.raises(ValueError, match=r"^input is \(256, 256\) but the active subnet runs at 192x192$"):
        supernet(image(256))


def test_set_subnet_validates(vit_t):
    _, supernet = vit_t
    before = supernet.subnet
    with pytest.raises(SubnetError, match=r"^depths\[0\] = 1"):
        supernet.set_subnet(replace(before, depths=(1, 3, 3, 3)))
    assert supernet.subnet is before and len(supernet.active_blocks) == 12


def test_supernet_builds_on_the_meta_device():
    with torch.device("meta"):
        supernet = Supernet.build("vit_l")
        encoder = build_encoder("vit_l")
    assert supernet.pos_embed.is_meta
    assert supernet.space == default_space("vit_l") and supernet.subnet == supernet.space.max_subnet()
    assert {k: v.shape for k, v in supernet.state_dict().items()} == {k: v.shape for k, v in encoder.state_dict().items()}
