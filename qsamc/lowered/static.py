"""The static subnet: one searched subnet of a supernet as a plain, fixed module (the first export stage).

`ExtractSubnetPass` builds a `StaticEncoder` from a supernet and a `Subnet`; the lowering passes then
rewrite its quantized layers into integer form and `qsamc.export.emit` writes it to ONNX. It keeps the supernet's
module paths (`blocks.5.attn.qkv`: the kept blocks sit in a `ModuleDict` keyed by their supernet index),
so the supernet's IR, pruned of the dropped blocks, still names real modules of the static model.
"""

from __future__ import annotations

import torch
from torch import nn


class StaticEncoder(nn.Module):
    """Patch embedding -> fixed positional embedding -> kept blocks -> neck, at one resolution."""

    def __init__(self, patch_embed: nn.Module, pos_embed: torch.Tensor, blocks: dict[int, nn.Module],
                 neck: nn.Module, resolution: int) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        # Interpolated once for the subnet's token grid; a buffer because nothing trains it any more.
        self.register_buffer("pos_embed", pos_embed.detach().clone())
        self.blocks = nn.ModuleDict({str(index): block for index, block in blocks.items()})
        self.neck = neck
        self.resolution = resolution

    @property
    def grid(self) -> int:
        """The token grid's side (that of the fixed positional embedding)."""
        return self.pos_embed.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks.values():
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


def replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the dotted `path` under `root` (how passes swap one layer for its lowered form)."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, module)
