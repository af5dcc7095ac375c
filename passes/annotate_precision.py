"""AnnotatePrecisionPass: which nodes are quantized, their candidate bits, and (given a subnet) their bits.

Rules:
1. `conv` and `linear` nodes are quantizable (the paper's patch embedding, qkv, proj, lin1, lin2 and
   neck convolutions); norms, softmax, GELU, attention matmuls and rel-pos stay float (bits None).
2. Candidate bits are the space's weight and activation choices.
3. With a subnet, the IR describes it (`IR.subnet`, the one source of each node's bits, `IR.bits_of`).
   The quantizable set must equal the space's quantized layers: the IR and the space must agree on one
   picture of the model.
"""

from __future__ import annotations

from qsamc.ir.graph import IR
from qsamc.ir.pass_manager import Pass, PassResult
from qsamc.supernet.space import SearchSpace, Subnet


class AnnotatePrecisionPass(Pass):
    def __init__(self, space: SearchSpace, subnet: Subnet | None = None) -> None:
        self.space = space
        self.subnet = space.validate(subnet) if subnet is not None else None

    def call(self, ir: IR) -> PassResult:
        candidates = {"w": list(self.space.weight_bits), "a": list(self.space.act_bits)}
        for _, a in ir.nodes():
            a["quantizable"] = a["kind"] in ("conv", "linear")
            a["candidate_bits"] = candidates if a["quantizable"] else None
        traced = sorted(ir.graph.nodes[n]["module"] for n in ir.quantizable())
        if traced != sorted(self.space.quant_layers):
            raise RuntimeError(
                f"the IR's quantizable layers {traced[:3]}... differ from the space's "
                f"{sorted(self.space.quant_layers)[:3]}..."
            )
        ir.subnet = self.subnet
        return PassResult(ir, modified=True)
