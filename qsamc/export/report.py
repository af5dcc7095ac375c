"""The export report: what `qsamc export` writes next to the model (report.json, precision.png) and prints
(`ExportReport.layer_rows`, `ExportReport.summary_rows`).

BitOPs come from the static subnet's IR (`CountBitopsPass`), deployed precisions from the target's
deployment rules (`DeploymentFormat.deploy`), fidelity and latency from `qsamc.export.verify`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qsamc.errors import TargetError
from qsamc.export.ort import Latency
from qsamc.export.promptable import DecoderReport
from qsamc.export.verify import Fidelity, PartCheck, TaskCheck
from qsamc.fileio import save_figure
from qsamc.formats import DeploymentFormat
from qsamc.ir.graph import IR
from qsamc.passes.count_bitops import BitopsReport
from qsamc.supernet.space import Subnet
from qsamc.units import human

# The columns of `ExportReport.layer_rows()`.
LAYER_COLUMNS = ("layer", "searched", "weight", "activation", "compute")


@dataclass(frozen=True)
class LayerPrecision:
    """One quantized layer: the searched grid and the containers the target runs it in."""

    layer: str
    kind: str
    w_bits: int
    a_bits: int
    weight: str
    act: str
    compute: str


def layer_precisions(ir: IR, deployment: DeploymentFormat) -> list[LayerPrecision]:
    rows = []
    for name, a in ir.nodes():
        if a.get("quantizable"):
            w, x = ir.bits_of(name)[1:]
            d = deployment.deploy(w, x, a["kind"])
            rows.append(LayerPrecision(a["module"], a["kind"], w, x, d.weight, d.act, d.compute))
    return rows


def plot_precision_map(layers: list[LayerPrecision], path: Path, title: str) -> None:
    """Per-layer searched bits (cell text) coloured by the deployed container, weights over activations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    containers = ["int4", "int8", "fp8", "fp16", "fp32"]
    colours = ["#2c7bb6", "#abd9e9", "#ffffbf", "#fdae61", "#d7191c"]
    grid = [[containers.index(row.weight) for row in layers], [containers.index(row.act) for row in layers]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(layers)), 2.6))
    ax.imshow(grid, cmap=ListedColormap(colours), vmin=0, vmax=len(containers) - 1, aspect="auto")
    for x, row in enumerate(layers):
        for y, bits in enumerate((row.w_bits, row.a_bits)):
            ax.text(x, y, "F" if bits == 32 else str(bits), ha="center", va="center", fontsize=6)
    ax.set_yticks([0, 1], ["weight", "activation"])
    ax.set_xticks(range(len(layers)), [row.layer.replace("blocks.", "b") for row in layers], rotation=90, fontsize=5)
    ax.legend(handles=[Patch(color=c, label=n) for n, c in zip(containers, colours)], ncol=5, fontsize=6,
              loc="upper center", bbox_to_anchor=(0.5, -0.55))
    ax.set_title(title, fontsize=8)
    save_figure(fig, path, dpi=150, bbox_inches="tight")
    plt.close(fig)


@dataclass(frozen=True)
class EngineBuild:
    """`--format trt`: the engine built beside the ONNX, or why none was (`missing`), and the `trtexec`
    command that builds the same engine where TensorRT and a GPU exist."""

    trtexec: str
    batch: dict[str, int]
    missing: str | None
    path: str | None

    def error(self) -> TargetError | None:
        """The export's failure when no engine was built (the ONNX model and report are still written)."""
        return None if self.missing is None else TargetError(f"no TensorRT engine was built: {self.missing}")


@dataclass
class ExportReport:
    """Everything `qsamc export` checked and wrote; `report.json` is `to_json()`."""

    subnet: Subnet
    target: str
    format: str
    opset: int
    ir_version: int
    cost: BitopsReport
    layers: list[LayerPrecision]
    onnx_bytes: int
    fp32_bytes: int
    latency: Latency  # ONNX Runtime on this machine's CPU
    fidelity: Fidelity
    lint: list[str]
    parts: list[PartCheck] = field(default_factory=list)  # layer-by-layer checks (`verify.check_parts`)
    task: TaskCheck | None = None  # validation mIoU through the head, PyTorch vs ONNX Runtime
    files: dict[str, str] = field(default_factory=dict)
    engine: EngineBuild | None = None
    decoder: DecoderReport | None = None  # `--promptable`: decoder.onnx (qsamc.export.promptable)

    def worst_part(self) -> PartCheck:
        """The part closest to its mean tolerance."""
        return max(self.parts, key=lambda p: p.mean_rel / p.mean_rel_tolerance)

    def fused_deviations(self) -> list[str]:
        """What the checks that passed only with ONNX Runtime's kernels unfused (`kernels: exact`) measured
        with them fused, one phrase each; empty where the fused kernels passed every check."""
        phrases = []
        parts = [p for p in self.parts if p.kernels == "exact"]
        if parts:
            worst = max(parts, key=lambda p: p.fused_mean_rel)
            phrases.append(f"{len(parts)} parts (worst {worst.part}: max {worst.fused_max_rel:.2e}, mean "
                           f"{worst.fused_mean_rel:.2e})")
        if self.fidelity.kernels == "exact":
            phrases.append(f"the whole model max {self.fidelity.fused_max_rel:.2e}, mean "
                           f"{self.fidelity.fused_mean_rel:.2e}")
        if self.task is not None and self.task.kernels == "exact":
            phrases.append(f"validation mIoU {self.task.fused_onnx_miou:.4f}")
        return phrases

    def layer_rows(self) -> list[tuple[str, ...]]:
        """What `qsamc export` prints per quantized layer, one cell per `LAYER_COLUMNS`: the searched bits
        (F for float) and the containers the target runs it in."""
        def bits(b: int) -> str:
            return str(b) if b < 32 else "F"

        return [(row.layer, f"W{bits(row.w_bits)}A{bits(row.a_bits)}", row.weight, row.act, row.compute)
                for row in self.layers]

    def summary_rows(self) -> list[tuple[str, str]]:
        """What `qsamc export` prints of what it checked and wrote: (label, text) pairs."""
        fidelity, cost, task, worst = self.fidelity, self.cost, self.task, self.worst_part()
        rows = [
            ("BitOPs / MACs", f"{human(cost.bitops)} / {human(cost.macs)} (attention matmuls at 32x32 bits)"),
            ("model size", f"{human(self.onnx_bytes, 'B')} (FP32 {human(self.fp32_bytes, 'B')})"),
            ("ONNX Runtime latency", f"{self.latency.median_ms:.1f} ms ({self.latency.threads} threads, this machine)"),
            ("fidelity vs fake-quant", f"max {fidelity.max_rel:.2e}, mean {fidelity.mean_rel:.2e} of the output scale "
             f"(tolerance {fidelity.max_rel_tolerance:.1e} / {fidelity.mean_rel_tolerance:.1e})"),
            ("layer by layer", f"{len(self.parts)} parts verified alone; worst {worst.part}: max {worst.max_rel:.2e}, "
             f"mean {worst.mean_rel:.2e} (tolerance {worst.max_rel_tolerance:.1e} / {worst.mean_rel_tolerance:.1e})"),
        ]
        if task is None:
            rows.append(("validation mIoU", "not checked: the run's validation data is not at hand (pass --dataset)"))
        else:
            rows.append(("validation mIoU", f"PyTorch {task.pytorch_miou:.4f}, ONNX Runtime {task.onnx_miou:.4f} "
                         f"({task.val_images} images)"))
        deviating = self.fused_deviations()
        if deviating:
            rows.append(("this CPU's INT8 kernels", f"these checks passed only with ONNX Runtime's INT8 kernels "
                         f"unfused (the model as written; the figures above); fused, on this CPU: "
                         f"{'; '.join(deviating)}"))
            if self.target == "cpu":
                rows.append(("on a CPU without VNNI", "export with --target cpu-avx2: the same model in U8U8 Q/DQ, "
                             "whose INT8 kernels do not saturate there"))
        rows.append(("opset / IR version", f"{self.opset} / {self.ir_version}"))
        rows.append(("TensorRT lint", "clean" if not self.lint else f"{len(self.lint)} problems, e.g. {self.lint[0]}"))
        if self.decoder is not None:
            d = self.decoder
            rows.append(("decoder.onnx", f"embeddings {'x'.join(map(str, d.image_embeddings[1:]))}, max abs diff "
                         f"{d.fidelity.max_abs_diff:.2e} vs SamOnnxModel, weights {d.weights}"))
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "subnet": self.subnet.to_json(), "target": self.target, "format": self.format, "opset": self.opset,
            "ir_version": self.ir_version, "cost": self.cost.to_json(), "layers": [asdict(row) for row in self.layers],
            "sizes": {"onnx_bytes": self.onnx_bytes, "fp32_bytes": self.fp32_bytes},
            "latency": {"onnxruntime_cpu": self.latency.to_json()}, "fidelity": self.fidelity.to_json(),
            "lint": self.lint, "parts": [p.to_json() for p in self.parts],
            "task": None if self.task is None else self.task.to_json(), "files": self.files,
            "engine": {} if self.engine is None else asdict(self.engine),
            "decoder": {} if self.decoder is None else self.decoder.to_json(),
        }
