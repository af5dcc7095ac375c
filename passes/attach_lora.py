"""AttachLoraPass: quantization-aware LoRA adapters on the adapted layers (phase 2 of progressive training).

Rules:
1. Every quantizable IR node whose module path ends with one of `config.modules` (the paper's placement:
   attn.qkv, mlp.lin1, mlp.lin2) gets a `Lora` of `config.variant`, sized to the layer's full weight.
2. Adapters are created on the layer's device with a generator seeded by `seed`, so a resumed run that
   re-attaches them starts from the same A.
3. A layer that already has an adapter is left alone (idempotent).
"""

from __future__ import annotations

import torch

from qsamc.ir.graph import IR
from qsamc.supernet.lora import Lora, LoraConfig
from qsamc.ir.pass_manager import Pass, PassResult


class AttachLoraPass(Pass):
    def __init__(self, config: LoraConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    def call(self, ir: IR) -> PassResult:
        space = ir.root.space
        bits = space.weight_bits if self.config.switch == "weight" else space.act_bits
        targets = [n for n in ir.quantizable() if ir.graph.nodes[n]["module"].endswith(self.config.modules)]
        modified = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for name in targets:
                layer = ir.module_of(name)
                if layer.lora is not None:
                    continue
                layer.lora = Lora(self.config, layer.in_features, layer.out_features, tuple(bits)).to(layer.weight.device)
                modified = True
        return PassResult(ir, modified)
