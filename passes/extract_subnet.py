"""ExtractSubnetPass: a supernet and a `Subnet` -> the static subnet (a `StaticEncoder`) and its IR.

The first export stage. The result computes exactly what the supernet computes with `set_subnet(subnet)`
(fake-quantized, tested to float tolerance) but holds nothing elastic any more.

Rules:
1. Blocks dropped by the subnet's depths are removed, from the model and from the IR (each removed
   node's producers are wired to its consumers, so the IR stays connected and acyclic).
2. MLP weights, biases and LoRA are sliced to the subnet's hidden width (`active_weight`).
3. LoRA is merged: W = W0 + delta(bits), the very call the trainer's forward makes for this layer's bits
   (multiplex: base module + the module bound to the bit-width); the adapters are then dropped.
4. Each quantizer bank keeps only the chosen bit-width's quantizer (its trained s, and beta).
5. The positional embedding is interpolated once to the subnet's token grid; the rel-pos tables of
   global-attention blocks are resized once to that grid the way `get_rel_pos` resizes them per call.
6. The IR is bound to the static model (module paths unchanged: kept blocks are keyed by their
   supernet index) and describes the subnet (`IR.subnet`: its bits and token grid); conv nodes get
   their static `input_hw` (the image for the patch embedding, the token grid for the neck).
"""

from __future__ import annotations

import copy

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

from qsamc.ir.graph import IR
from qsamc.supernet.layers import QuantConv2d, QuantLinear
from qsamc.ir.pass_manager import Pass, PassResult
from qsamc.supernet.quant import QuantizerBank
from qsamc.supernet.space import Subnet
from qsamc.lowered.static import StaticEncoder, replace_module
from qsamc.supernet.encoder import Supernet, quant_modules


def _single_bits_bank(bank: QuantizerBank | None, bits: int, device: torch.device) -> QuantizerBank | None:
    """A bank holding only the quantizer of `bits` (rule 4), with its trained parameters."""
    if bank is None:
        return None
    channels = bank[bits].channels if bits in bank and bank.kind == "weight" else None
    single = QuantizerBank(bank.kind, (bits,), channels, bank.zero_point).to(device)
    if bits in bank:
        single[bits].load_state_dict(bank[bits].state_dict())
    return single


@torch.no_grad()
def freeze_layer(layer: QuantLinear | QuantConv2d) -> QuantLinear | QuantConv2d:
    """The layer at its current bits and width as a fixed layer: sliced, LoRA merged (rules 2-4)."""
    weight = layer.merged_weight(layer.active_weight()).detach().clone()
    if isinstance(layer, QuantLinear):
        bias = None if layer.bias is None else layer.bias[: weight.shape[0]].detach().clone()
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
        frozen = QuantLinear.from_float(plain)
    else:
        frozen = QuantConv2d.from_float(copy.deepcopy(layer))
        bias = None if layer.bias is None else layer.bias.detach().clone()
    frozen.weight = nn.Parameter(weight)
    frozen.bias = None if bias is None else nn.Parameter(bias)
    frozen.weight_quantizer = _single_bits_bank(layer.weight_quantizer, layer.w_bits, weight.device)
    frozen.act_quantizer = _single_bits_bank(layer.act_quantizer, layer.a_bits, weight.device)
    frozen.set_bits(layer.w_bits, layer.a_bits)
    return frozen


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose quantized layers are replaced by their frozen form."""
    layers = quant_modules(module)
    memo = {id(layer): None for layer in layers.values()}  # do not copy what is replaced anyway
    clone = copy.deepcopy(module, memo)
    for path, layer in layers.items():
        replace_module(clone, path, freeze_layer(layer))
    return clone


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """segment_anything.image_encoder.get_rel_pos's linear resize of a rel-pos table (rule 5)."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)


def _prune_graph(graph: nx.DiGraph, dropped: set[str]) -> nx.DiGraph:
    """Remove `dropped` nodes, wiring each one's producers to its consumers (rule 1)."""
    graph = copy.deepcopy(graph)
    for node in [n for n in nx.topological_sort(graph) if n in dropped]:
        graph.add_edges_from((p, s) for p in graph.predecessors(node) for s in graph.successors(node))
        graph.remove_node(node)
    return graph


class ExtractSubnetPass(Pass):
    in_place = False

    def __init__(self, subnet: Subnet) -> None:
        self.subnet = subnet

    @torch.no_grad()
    def call(self, ir: IR) -> PassResult:
        supernet: Supernet = ir.root
        space, subnet = supernet.space, supernet.space.validate(self.subnet)
        previous = supernet.subnet
        supernet.set_subnet(subnet)
        try:
            grid = subnet.grid
            blocks = {}
            for index in space.active_blocks(subnet.depths):
                block = _frozen_copy(supernet.blocks[index])
                if block.window_size == 0 and block.attn.use_rel_pos:
                    for name in ("rel_pos_h", "rel_pos_w"):
                        table = getattr(block.attn, name)
                        setattr(block.attn, name, nn.Parameter(_resize_rel_pos(table, 2 * grid - 1)))
                blocks[index] = block
            static = StaticEncoder(_frozen_copy(supernet.patch_embed), supernet.position_embedding((grid, grid)),
                                   blocks, _frozen_copy(supernet.neck), subnet.resolution).eval()
        finally:
            supernet.configure(previous)  # restore as it was (float when fresh, outside a narrow space)

        active = set(blocks)
        dropped = {n for n, a in ir.graph.nodes(data=True) if a.get("block") is not None and a["block"] not in active}
        graph = _prune_graph(ir.graph, dropped)
        for _, a in graph.nodes(data=True):
            if a["kind"] == "conv":  # the patch embedding reads the image, the neck the token grid
                a["input_hw"] = [subnet.resolution] * 2 if a["module"] == "patch_embed.proj" else [grid, grid]
        return PassResult(IR(graph, ir.model, static, subnet=subnet), modified=True)
