"""The fused parts of a static subnet that latency tables time, as the ONNX that `qsamc export` emits.

A part is a small torch module made of a lowered static subnet's real layers, cut where the latency
table cuts the encoder: the patch embedding with the positional embedding (`PatchPart`), a block's
attention half (`AttentionPart`: norm1, window partition, qkv, attention with rel-pos, proj, residual),
a block's MLP half (`MlpPart`: norm2, lin1, GELU, lin2, residual), and the neck (`NeckPart`).
`lowered_subnet` extracts and lowers a subnet with export's own passes, `part_onnx` cuts one part and
emits it with export's own `qsamc.export.emit.emit_onnx`: there is no second copy of the Q/DQ rules, so a
table entry times exactly the nodes (and ONNX Runtime fusions) that the part has in an exported encoder.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn

from qsamc.export.emit import emit_onnx
from qsamc.lowered.static import StaticEncoder
from qsamc.ir.graph import IR
from qsamc.ir.pass_manager import PassManager
from qsamc.passes import ExtractSubnetPass
from qsamc.sam import sam_modeling
from qsamc.supernet.space import Subnet

if TYPE_CHECKING:
    from qsamc.targets.base import Target

_window_partition = sam_modeling.image_encoder.window_partition
_window_unpartition = sam_modeling.image_encoder.window_unpartition


class AttentionPart(nn.Module):
    """The first half of segment-anything's `Block.forward`: x + attn(norm1(x)), windowed or global."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.window_size = block.norm1, block.attn, block.window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut, x = x, self.norm1(x)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, pad_hw = _window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = _window_unpartition(x, self.window_size, pad_hw, (height, width))
        return shortcut + x


class MlpPart(nn.Module):
    """The second half of `Block.forward`: x + mlp(norm2(x))."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm2, self.mlp = block.norm2, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))


class PatchPart(nn.Module):
    def __init__(self, patch_embed: nn.Module, pos_embed: torch.Tensor) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.register_buffer("pos_embed", pos_embed.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x) + self.pos_embed


class NeckPart(nn.Module):
    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.neck = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(x.permute(0, 3, 1, 2))


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread: the tiny forward passes of an export gain nothing from more, and on a
    machine shared with other jobs torch's spinning worker threads make them 100x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- parts of a lowered subnet, emitted by export's emitter ------------------------------------


def lowered_subnet(supernet: IR, subnet: Subnet, target: Target) -> StaticEncoder:
    """The static subnet as `qsamc export` lowers it (`qsamc.pipeline.export_subnet`): extracted, weight
    quantizers folded, activation offsets lowered and folded into norms, INT32 biases where fused."""
    with one_torch_thread():
        ir = ExtractSubnetPass(subnet)(supernet).ir
        PassManager(target.lowering_passes())(ir)
    return ir.root


def cut_part(static: StaticEncoder, part: str, block: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    """One fused part of `static` ('patch_embed', 'attention', 'mlp', 'neck'; `block` for the halves)
    with an example input of its shape."""
    grid = static.grid
    tokens = torch.randn(1, grid, grid, static.pos_embed.shape[-1])
    if part == "patch_embed":
        return PatchPart(static.patch_embed, static.pos_embed), torch.randn(1, 3, static.resolution, static.resolution)
    if part == "neck":
        return NeckPart(static.neck), tokens
    return (AttentionPart if part == "attention" else MlpPart)(static.blocks[str(block)]), tokens


def part_onnx(static: StaticEncoder, part: str, block: int | None,
              target: Target) -> tuple[onnx.ModelProto, torch.Tensor]:
    """The part's ONNX exactly as export emits it inside the whole encoder, and its example input."""
    module, example = cut_part(static, part, block)
    with one_torch_thread():
        return emit_onnx(module, example, target), example
