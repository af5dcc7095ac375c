"""Where the `cpu` export's deviation from the PyTorch subnet comes from: rounding flips or a defect.

For each subnet (uniform W8A8 and uniform W2A2 of the largest architecture, and one random mixed subnet)
the same lowered encoder is run three ways in ONNX Runtime and compared with the fake-quantized PyTorch
subnet, on the whole model and part by part (each part fed the reference's own input):

- shipped:     the `cpu` lowering (INT32 biases fused into QGemm), all ONNX Runtime optimizations;
- float bias:  the same without `QuantizeBiasPass` (the TensorRT targets' lowering);
- unfused:     the shipped model with ONNX Runtime's graph optimizations off (no integer kernels: every
               Q/DQ pair computed in float, as PyTorch does).

If the part-by-part error is within one grid step with flips rare, and the unfused run is exact,
the whole-model deviation is rounding flips (an integer kernel sums exactly where PyTorch sums in float)
amplified by the stack of low-bit grids, not a lowering defect.

    python benchmarks/cpu_deviation.py [--run RUN] [--images 2]
"""

from __future__ import annotations

import argparse
import copy
import random

import torch

from qsamc.training.runs import load_supernet
from qsamc.export.emit import emit_onnx
from qsamc.ir.pass_manager import PassManager
from qsamc.passes import ExtractSubnetPass, QuantizeBiasPass
from qsamc.targets import get_target
from qsamc.export.ort import ort_session
from qsamc.export.verify import check_parts, measure_fidelity
from search_quality import calibrated_supernet  # the same calibrated, untrained vit_t


CPU = get_target("cpu")


def lowered(ir, subnet, int32_bias: bool):
    """The cpu target's lowering, with or without its last pass (INT32 biases)."""
    static = ExtractSubnetPass(subnet)(ir).ir
    reference = copy.deepcopy(static.root)
    passes = [p for p in CPU.lowering_passes() if int32_bias or not isinstance(p, QuantizeBiasPass)]
    PassManager(passes)(static)
    return reference, static.root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="A training run folder (default: a calibrated untrained vit_t).")
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, ir, spec = load_supernet(args.run) if args.run else calibrated_supernet()
    space = spec.space
    largest = space.max_subnet()
    subnets = {"W8A8": space.uniform_bits(largest, 8, 8), "W2A2": space.uniform_bits(largest, 2, 2),
               "mixed (random)": space.sample(random.Random(3))}
    generator = torch.Generator().manual_seed(0)
    print("| subnet | run | INT32-bias Gemms | whole model max / mean (of output scale) | worst part mean / its tolerance |")
    print("|---|---|---:|---:|---:|")
    for name, subnet in subnets.items():
        images = [torch.randn(1, 3, subnet.resolution, subnet.resolution, generator=generator) for _ in range(args.images)]
        min_bits = min(b.a for b in subnet.bits)
        for label, int32_bias, fused in (("shipped", True, True), ("float bias", False, True), ("unfused", True, False)):
            reference, static = lowered(ir, subnet, int32_bias)
            model_proto = emit_onnx(static, images[0], CPU, "image", "image_embeddings")
            session = ort_session(model_proto, exact=not fused)
            fidelity = measure_fidelity(session, reference, images, min_bits)
            parts = check_parts(reference, static, subnet, images[0], CPU) if fused else []
            gemms = sum(n.op_type == "Gemm" for n in model_proto.graph.node)
            worst = max(parts, key=lambda p: p.mean_rel / p.mean_rel_tolerance) if parts else None
            part = "-" if worst is None else f"{worst.part}: {worst.mean_rel:.1e} / {worst.mean_rel_tolerance:.1e}"
            print(f"| {name} | {label} | {gemms} | {fidelity.max_rel:.2e} / {fidelity.mean_rel:.2e} | {part} |", flush=True)


if __name__ == "__main__":
    main()
