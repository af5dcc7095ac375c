"""The SAM supernet: segment-anything's `ImageEncoderViT` made elastic and quantizable.

`Supernet.from_encoder` transforms an encoder in place of rewriting it: the patch embedding, the blocks
and the neck are the encoder's own modules (same names, same weights), with their linears and convs
swapped for `QuantLinear` / `QuantConv2d`. `set_subnet` selects one subnet; the forward pass then
computes exactly that subnet: the interpolated positional embedding for its resolution, the kept
blocks of each stage, the first k MLP units of each block, and each layer's bits. Each block's attention
and MLP become their training-kernel forms (`qsamc.supernet.kernels`): the same function, with less
kept for backward when training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qsamc.supernet.kernels import SupernetAttention, SupernetMLP
from qsamc.supernet.layers import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear
from qsamc.sam import build_encoder
from qsamc.supernet.space import SearchSpace, Subnet, default_space


class Supernet(nn.Module):
    def __init__(self, encoder: nn.Module, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        self.patch_embed = encoder.patch_embed
        self.pos_embed = encoder.pos_embed
        self.blocks = encoder.blocks
        self.neck = encoder.neck
        self.patch_embed.proj = QuantConv2d.from_float(self.patch_embed.proj)
        for block in self.blocks:
            block.attn, block.mlp = SupernetAttention.from_sam(block.attn), SupernetMLP.from_sam(block.mlp)
            for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "lin1"), (block.mlp, "lin2")):
                setattr(parent, name, QuantLinear.from_float(getattr(parent, name)))
        for index in (0, 2):
            self.neck[index] = QuantConv2d.from_float(self.neck[index])
        # Recompute each block's activations in backward instead of storing them (trades time for memory).
        self.activation_checkpointing = False
        self.subnet: Subnet | None = None
        self.active_blocks: tuple[int, ...] = ()
        # Quantizers arrive with InsertQuantizersPass; until then the largest network runs in float,
        # whether or not 32 bits is a choice of the space.
        self.configure(space.uniform_bits(space.max_subnet(), 32, 32))

    @classmethod
    def build(cls, model: str, checkpoint: str | None = None, space: SearchSpace | None = None) -> Supernet:
        return cls(build_encoder(model, checkpoint), space or default_space(model))

    def quant_layers(self) -> dict[str, nn.Module]:
        """The quantized layers by module path, in the space's order."""
        modules = dict(self.named_modules())
        return {name: modules[name] for name in self.space.quant_layers}

    def set_subnet(self, subnet: Subnet) -> None:
        """Make the forward pass compute `subnet` (validated against the space first)."""
        self.configure(self.space.validate(subnet))

    def configure(self, subnet: Subnet) -> None:
        """Apply `subnet` without validating it: for full-precision runs outside the space's bits."""
        self.active_blocks = self.space.active_blocks(subnet.depths)
        for block, ratio in zip(self.blocks, subnet.mlp_ratios):
            hidden = self.space.hidden_units(ratio)
            block.mlp.lin1.active_out = hidden
            block.mlp.lin2.active_in = hidden
        layers = self.quant_layers()
        for bits in subnet.bits:
            layers[bits.layer].set_bits(bits.w, bits.a)
        for index, block in enumerate(self.blocks):
            bits = subnet.attention_of(index)
            if bits < 32 and bits not in (block.attn.attention_quantizers or ()):
                raise ValueError(f"block {index}'s attention has no {bits}-bit quantizers (InsertQuantizersPass adds them)")
            block.attn.attention_bits = bits
        self.subnet = subnet

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The absolute positional embedding, bilinearly interpolated to the token grid (Sec. 3.2)."""
        pos = self.pos_embed
        if tuple(pos.shape[1:3]) == grid:
            return pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=grid, mode="bilinear", align_corners=False)
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.subnet.resolution, self.subnet.resolution):
            raise ValueError(
                f"input is {tuple(x.shape[-2:])} but the active subnet runs at "
                f"{self.subnet.resolution}x{self.subnet.resolution}"
            )
        x = self.patch_embed(x)
        if self.training and torch.is_grad_enabled():
            # The patch embedding's output is a permuted (NHWC) view; the residual stream would keep that
            # layout through every add, and each LayerNorm would copy it first, forward and backward.
            x = x.contiguous()
        x = x + self.position_embedding((x.shape[1], x.shape[2]))
        for index in self.active_blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self.blocks[index], x, use_reentrant=False)
            else:
                x = self.blocks[index](x)
        return self.neck(x.permute(0, 3, 1, 2))


def quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized layer of `model` by module path (a supernet, or a static subnet after export)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
