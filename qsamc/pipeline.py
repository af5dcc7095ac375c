"""The pipelines behind the CLI commands, each one short linear function a newcomer reads top to bottom.

analysis (`qsamc space`, `qsamc bitops`, `qsamc ir`): build the supernet on the meta device (no
weights are needed to count) -> trace -> annotate structure and precision -> count BitOPs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qsamc.errors import ConfigError
from qsamc.ir import IR, trace
from qsamc.pass_manager import PassManager
from qsamc.passes import AnnotatePrecisionPass, AnnotateStructurePass, BitopsModel, BitopsReport, CountBitopsPass
from qsamc.passes.count_bitops import FloatMacs
from qsamc.space import SearchSpace, Subnet, default_space, load_subnet
from qsamc.supernet import Supernet


def build_ir(supernet: Supernet, subnet: Subnet | None = None, verify: bool | None = None) -> IR:
    """Trace a supernet at its maximum subnet and annotate it (structure; precision of `subnet`)."""
    space = supernet.space
    chosen = supernet.subnet
    supernet.set_subnet(space.uniform_bits(space.max_subnet(), 32, 32))
    try:
        ir = trace(supernet, space.model)
    finally:
        supernet.set_subnet(chosen)
    passes = [AnnotateStructurePass(space), AnnotatePrecisionPass(space, subnet)]
    return PassManager(passes, verify=verify)(ir).ir


def analysis_ir(space: SearchSpace, subnet: Subnet | None = None) -> IR:
    """The annotated IR of a model without its weights: the supernet is built on the meta device."""
    with torch.device("meta"):
        supernet = Supernet.build(space.model, space=space)
    return build_ir(supernet, subnet)


def count_bitops(space: SearchSpace, subnet: Subnet, float_macs: FloatMacs = "fp32") -> tuple[IR, BitopsReport]:
    """MACs and BitOPs of `subnet` with per-part and per-layer breakdowns."""
    ir = analysis_ir(space, subnet)
    CountBitopsPass(space, subnet, float_macs)(ir)
    cost = ir.graph.graph["cost"]
    report = BitopsReport(cost["macs"], cost["bitops"], cost["float_macs"], cost["float_bitops"],
                          cost["float_macs_convention"], cost["per_part"], cost["per_layer"])
    return ir, report



def describe_space(model: str, granularity: str = "layer") -> dict:
    """What `qsamc space` prints: operators and choices, subnet count, MACs and BitOPs range."""
    space = default_space(model, granularity)  # type: ignore[arg-type]
    ir = analysis_ir(space)
    costs = BitopsModel(ir, space)
    low, high = costs.cost(space.min_subnet()), costs.cost(space.max_subnet())
    r = space.resolutions
    return {
        "operators": {
            "resolution": f"[{r[0]}, {r[-1]}; {r[1] - r[0] if len(r) > 1 else 0}]",
            "depth (per stage)": "  ".join(str(list(c)) for c in space.depth_choices),
            "MLP ratio (per block)": str(list(space.mlp_ratios)),
            "weight bits": str(list(space.weight_bits)),
            "activation bits": str(list(space.act_bits)),
        },
        "log10_subnets": space.log10_count(),
        "quantized_layers": len(space.quant_layers),
        "macs": (low[0], high[0]),
        "bitops": (low[1], high[1]),
    }


def subnet_bitops(model: str, use_max: bool, use_min: bool, subnet_file: Path | None,
                  float_macs: FloatMacs) -> tuple[BitopsReport, Subnet]:
    """What `qsamc bitops` prints: the report of exactly one of --max, --min, --subnet."""
    if use_max + use_min + (subnet_file is not None) != 1:
        raise ConfigError("choose exactly one of --max, --min or --subnet FILE")
    space = default_space(model)
    if subnet_file is not None:
        subnet = space.validate(load_subnet(subnet_file))
    else:
        subnet = space.max_subnet() if use_max else space.min_subnet()
    return count_bitops(space, subnet, float_macs)[1], subnet


def write_ir(model: str, out: Path, subnet_file: Path | None = None) -> list[Path]:
    """What `qsamc ir` writes: `ir.json` and `ir.dot`, with bits and costs when a subnet is given."""
    space = default_space(model)
    if subnet_file is not None:
        subnet = space.validate(load_subnet(subnet_file))
        ir = count_bitops(space, subnet)[0]
    else:
        ir = analysis_ir(space)
    out.mkdir(parents=True, exist_ok=True)
    ir.save_json(out / "ir.json")
    (out / "ir.dot").write_text(ir.to_dot())
    return [out / "ir.json", out / "ir.dot"]
