"""AnnotateStructurePass: stage, block, elastic dimensions and static geometry of every IR node.

Runs right after `trace`. Everything the cost models need later is read here from the real modules, so
BitOPs, latency tables and export all use the same numbers.

Rules:
1. A node under `blocks.{i}` gets block i and the stage that contains i; patch embedding, neck, input,
   output and the positional-embedding add get stage and block None.
2. `elastic` lists the elastic dimensions that change the node: `tokens` (resolution) for every node
   that carries activations; `hidden` (MLP ratio) for `mlp.lin1`, `mlp.act` and `mlp.lin2`; `depth` for
   nodes of windowed blocks that some stage depth choice drops.
3. `linear` nodes record in/out features, whether their tokens are the image grid or padded windows
   (qkv and proj of windowed blocks run on windows), and the window size.
4. `conv` nodes record channels, kernel, stride and padding; `attention` nodes record heads, head
   dim, window size (0 for global attention) and whether decomposed rel-pos is added.
"""

from __future__ import annotations

from qsamc.ir.graph import IR
from qsamc.supernet.layers import QuantConv2d, QuantLinear
from qsamc.ir.pass_manager import Pass, PassResult
from qsamc.supernet.space import SearchSpace


class AnnotateStructurePass(Pass):
    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def call(self, ir: IR) -> PassResult:
        cfg = self.space.config
        stage_of = {b: s for s, blocks in enumerate(cfg.stages) for b in blocks}
        droppable = set()
        for choices, blocks in zip(self.space.depth_choices, cfg.stages):
            droppable.update(blocks[min(choices) - 1 : -1])
        for name, a in ir.nodes():
            parts = a["module"].split(".")
            block = int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 else None
            a["block"] = block
            a["stage"] = stage_of[block] if block is not None else None
            elastic = {"tokens"}
            if block is not None and len(parts) > 2 and parts[2] == "mlp":
                elastic.add("hidden")
            if block in droppable:
                elastic.add("depth")
            a["elastic"] = sorted(elastic)
            window = cfg.window_size if block is not None and block not in cfg.global_attn_indexes else 0
            if a["kind"] == "linear":
                module = ir.module_of(name)
                assert isinstance(module, QuantLinear)
                a["in_features"], a["out_features"] = module.in_features, module.out_features
                on_windows = window > 0 and parts[2] == "attn"
                a["token_layout"] = "windows" if on_windows else "grid"
                a["window"] = window if on_windows else 0
            elif a["kind"] == "conv":
                module = ir.module_of(name)
                assert isinstance(module, QuantConv2d)
                a["in_channels"], a["out_channels"] = module.in_channels, module.out_channels
                a["kernel"], a["stride"] = list(module.kernel_size), list(module.stride)
                a["padding"] = list(module.padding)
                # Rule 1 of CountBitopsPass relies on every encoder conv producing the token grid.
                max_grid = self.space.grid(max(self.space.resolutions))  # the trace runs the max subnet
                if a["shape"][-2:] != [max_grid, max_grid]:
                    raise RuntimeError(f"conv {name} outputs {a['shape']}, not the {max_grid}x{max_grid} token grid")
            elif a["kind"] == "attention":
                attention = ir.module_of(name)
                a["heads"] = attention.num_heads
                a["head_dim"] = attention.qkv.in_features // attention.num_heads
                a["window"] = window
                a["rel_pos"] = bool(attention.use_rel_pos)
        return PassResult(ir, modified=True)
