"""`qsamc baseline`: what a user would pick instead of a supernet, from the same FP32 reference and data.

Where this sits: beside search and export. It starts from an FP32 reference run (`qsamc train
--schedule fp32`), the model a supernet is fine-tuned from, and produces the post-training quantized
peers that qsamc's searched subnets are compared against:

- `modelopt-ptq`: NVIDIA ModelOpt `mtq.quantize` with `INT8_DEFAULT_CFG` (W8A8: per-channel weights,
  per-tensor inputs, max calibration) and the same config at 4-bit weights (W4A8) or 4-bit weights and
  inputs (W4A4), on exactly the layers qsamc quantizes; the head stays W8A8 in all three. Plus W8A8 with
  `INT8_DEFAULT_CFG` untouched, which also quantizes every LayerNorm's input.
- `modelopt-autoquantize`: `mtq.auto_quantize` choosing W8A8, W4A8 or float per layer (gradient
  sensitivity) under an effective-bits budget: ModelOpt's nearest equivalent of a mixed-precision search.
- `modelopt-qat` (asked for by name: it trains): ModelOpt QAT as its guide gives it for integer formats,
  `modelopt-ptq` at each PTQ bit-width, then every weight fine-tuned through ModelOpt's fake quantizers
  (straight-through rounding, the calibrated ranges frozen; ModelOpt 0.47's learnt-scale LSQ is for NVFP4
  only) with distillation from the frozen reference: `QatSettings`.
- `ort-static`: ONNX Runtime `quantize_static` (QDQ, per-channel, S8S8, min-max calibration) of the FP32
  encoder ONNX, as a `cpu`-target user would quantize it (every MatMul and Conv, attention included).

Each result has its val mIoU, its MACs and BitOPs from qsamc's own BitOPs pass over the same layers at
the same bits (attention matmuls reported apart), and, for the ONNX one, ONNX Runtime CPU latency.
ModelOpt's torch quantization runs on CPU (fake quantization); it is the optional `qsamc[modelopt]`.
The libraries do the quantizing; qsamc only wires the reference, the data and the scoring around them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qsamc.ir.frontend import count_bitops
from qsamc.distributed import resolve_device
from qsamc.export.emit import export_static
from qsamc.export.ort import ort_latency, ort_session
from qsamc.export.verify import onnx_encoder_forward
from qsamc.fileio import atomic_write_json, check_results_folder, replace_folder
from qsamc.targets import get_target
from qsamc.task.losses import distillation_loss, segmentation_loss
from qsamc.training.config import TrainConfig
from qsamc.training.train import batch_indices
from qsamc.training.runs import SupernetSpec, load_supernet, read_head_state, reference_weights
from qsamc.training.splits import search_images, trained_images
from qsamc.task.data import Sample, build_dataset, make_batch
from qsamc.errors import CheckpointError, ConfigError, QsamcError
from qsamc.task.evaluate import Evaluation, ValidationSet, evaluate
from qsamc.task.head import HEAD_BITS, SegmentationHead
from qsamc.sam import build_encoder
from qsamc.supernet.space import LayerBits, Subnet

METHODS = ("modelopt-ptq", "modelopt-autoquantize", "ort-static")  # what `qsamc baseline` runs unless told
TRAINED = ("modelopt-qat",)  # run when asked for by name: they train
PTQ_BITS = ((8, 8), (4, 8), (4, 4))


@dataclass(frozen=True)
class QatSettings:
    """ModelOpt QAT's training: `iterations` AdamW steps of `batch_size` augmented images the reference
    trained on, at the reference's resolution; the learning rate starts at `lr` (ModelOpt's guide: about
    1e-5 for Adam, ~1% of the pre-training rate) and follows half a cosine to 1% of it. The loss is qsamc's
    distillation: per-pixel KL(reference || model) over labelled pixels + `label_weight` x cross-entropy."""

    iterations: int = 1200
    batch_size: int = 4
    lr: float = 1e-5
    label_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1:
            raise ConfigError(f"QAT needs at least 1 iteration and 1 image per batch, got {self.iterations} and "
                              f"{self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.label_weight) and self.label_weight >= 0):
            raise ConfigError(f"QAT's learning rate must be above 0 and its label weight 0 or more, got {self.lr} and "
                              f"{self.label_weight}")


@dataclass
class BaselineResult:
    """One quantized peer: what it is, its per-layer bits, cost and accuracy."""

    method: str
    label: str
    subnet: Subnet  # the largest architecture at the native resolution, with the bits the method chose
    evaluation: Evaluation
    macs: int
    bitops: int  # quantized layers at their bits, attention matmuls excluded (they are in float_macs)
    float_macs: int
    latency_ms: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "label": self.label, "subnet": self.subnet.to_json(),
                "evaluation": {f.name: getattr(self.evaluation, f.name) for f in fields(Evaluation)
                               if f.name != "image_confusions"},  # those are the benchmark's, kept apart
                "macs": self.macs, "bitops": self.bitops,
                "float_macs": self.float_macs, "latency_ms": self.latency_ms, "notes": self.notes}


class FloatSegmentationModel(nn.Module):
    """The FP32 reference as plain torch modules (segment-anything's encoder, an `nn.Conv2d` head), the
    form post-training quantizers take: they rewrite `nn.Linear` / `nn.Conv2d` themselves."""

    def __init__(self, encoder: nn.Module, head: SegmentationHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images), images.shape[-2:])


@dataclass
class Reference:
    """An FP32 reference run, loaded: the float model, its space (for BitOPs) and resolution."""

    model: FloatSegmentationModel
    spec: SupernetSpec
    run: Path

    @property
    def resolution(self) -> int:
        return self.spec.space.config.img_size

    def subnet(self, w: int, a: int) -> Subnet:
        """The reference's architecture with every quantized layer at (w, a) bits."""
        return self.spec.space.uniform_bits(self.spec.space.max_subnet(), w, a)


def load_reference(run: str | Path) -> Reference:
    """The FP32 reference written by `qsamc train --schedule fp32`, or one sentence saying why not."""
    run = Path(run)
    _, _, spec = load_supernet(run)  # checks the run folder, its description and its weights
    validation = run / "validation.json"
    schedule = json.loads(validation.read_text()).get("schedule") if validation.is_file() else None
    if schedule != "fp32":
        raise CheckpointError(f"{run} is not an FP32 reference run (train one with `qsamc train --schedule fp32`)")
    if spec.head != "light":
        raise ConfigError(f"{run} has a {spec.head} head; the post-training baselines quantize the light head's "
                          "reference (train it with --head light)")
    weights = reference_weights(run)
    encoder = build_encoder(spec.space.model, weights)
    head = SegmentationHead(encoder.neck[0].out_channels, spec.num_classes, quantized=False)
    head.load_float_state(read_head_state(weights), str(weights))
    return Reference(FloatSegmentationModel(encoder, head).eval(), spec, run)


def calibration_batches(dataset: str, data_root: Path | None, count: int, resolution: int,
                        reference_run: Path | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` training images (no augmentation) spread over the split, with their masks, preprocessed at
    `resolution` in batches of 8: what the quantizers calibrate on and AutoQuantize scores on. With
    `reference_run`, only the images that run trained on: never the ones it held out."""
    train = (build_dataset(dataset, data_root, "train") if reference_run is None
             else trained_images(reference_run, dataset, data_root))
    if count < 1:
        raise ConfigError(f"--calibration must be at least 1 image, got {count}")
    picks = np.linspace(0, len(train) - 1, min(count, len(train))).round().astype(int)
    samples: list[Sample] = [train[int(i)] for i in picks]
    return [make_batch(samples[i : i + 8], resolution) for i in range(0, len(samples), 8)]


def calibration_images(dataset: str, data_root: Path | None, count: int, resolution: int) -> list[torch.Tensor]:
    """The image batches of `calibration_batches`."""
    return [images for images, _ in calibration_batches(dataset, data_root, count, resolution)]


def parse_bits(text: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8), or one sentence saying what is expected."""
    match = re.fullmatch(r"[wW](\d+)[aA](\d+)", text.strip())
    if not match or not all(int(b) in (2, 3, 4, 8) for b in match.groups()):
        raise ConfigError(f"bits must look like W8A8 with 2, 3, 4 or 8 bits each, got '{text}'")
    return int(match[1]), int(match[2])


def _cost(reference: Reference, subnet: Subnet) -> tuple[int, int, int]:
    report = count_bitops(reference.spec.space, subnet, "exclude")[1]
    return report.macs, report.bitops, report.float_macs


# --- ModelOpt ---------------------------------------------------------------------------------------


def _modelopt():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise QsamcError(f"the ModelOpt baselines need nvidia-modelopt: pip install 'qsamc[modelopt]' ({exc})") from None
    return mtq


def modelopt_config(w_bits: int, a_bits: int, layer_norms: bool = False) -> dict[str, Any]:
    """ModelOpt's `INT8_DEFAULT_CFG`, with the encoder's weights / inputs at `w_bits` / `a_bits` and the
    head's at 8 bits (later entries of `quant_cfg` win). `INT8_DEFAULT_CFG` also quantizes the input of
    every LayerNorm (the residual stream); `layer_norms=False` keeps them float, so that exactly qsamc's
    quantized layers (patch embedding, qkv, proj, MLP, neck) are quantized, as qsamc's subnets are."""
    mtq = _modelopt()
    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    if (w_bits, a_bits) != (8, 8):
        config["quant_cfg"] = [
            *config["quant_cfg"],
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": w_bits, "axis": 0}},
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": a_bits, "axis": None}},
            {"quantizer_name": "*head*weight_quantizer", "cfg": {"num_bits": HEAD_BITS, "axis": 0}},
            {"quantizer_name": "*head*input_quantizer", "cfg": {"num_bits": HEAD_BITS, "axis": None}},
        ]
    if not layer_norms:
        config["quant_cfg"] = [*config["quant_cfg"], {"quantizer_name": "*", "parent_class": "nn.LayerNorm", "enable": False}]
    return config


def _modelopt_bits(model: nn.Module, reference: Reference) -> Subnet:
    """The (w, a) bits ModelOpt put on each of qsamc's quantized layers (32 where it left one float)."""
    modules = dict(model.encoder.named_modules())
    bits = []
    for layer in reference.spec.space.quant_layers:
        module = modules[layer]
        widths = []
        for name in ("weight_quantizer", "input_quantizer"):
            quantizer = getattr(module, name, None)
            enabled = quantizer is not None and quantizer.is_enabled
            widths.append(int(quantizer.num_bits) if enabled else 32)
        bits.append(LayerBits(layer, *widths))
    return Subnet(reference.spec.space.model, reference.resolution, reference.spec.space.max_subnet().depths,
                  reference.spec.space.max_subnet().mlp_ratios, tuple(bits))


def modelopt_ptq(reference: Reference, calibration: list[torch.Tensor], w_bits: int, a_bits: int,
                 layer_norms: bool = False) -> nn.Module:
    """`mtq.quantize` of a copy of the reference, max-calibrated on `calibration` (see `modelopt_config`)."""
    mtq = _modelopt()
    model = copy.deepcopy(reference.model)

    def forward_loop(m: nn.Module) -> None:
        for images in calibration:
            m(images)

    with torch.no_grad():
        return mtq.quantize(model, modelopt_config(w_bits, a_bits, layer_norms), forward_loop).eval()


def modelopt_autoquantize(reference: Reference, batches: list[tuple[torch.Tensor, torch.Tensor]],
                          effective_bits: float, ignore_index: int) -> nn.Module:
    """`mtq.auto_quantize` of a copy of the reference over W8A8 / W4A8 / float per layer under an
    effective-bits budget (weights), calibrated and scored on labelled training batches; the head and the
    LayerNorms stay float."""
    mtq = _modelopt()
    model = copy.deepcopy(reference.model)
    model, _ = mtq.auto_quantize(
        model, constraints={"effective_bits": effective_bits},
        quantization_formats=[modelopt_config(8, 8), modelopt_config(4, 8)],
        data_loader=batches, forward_step=lambda m, batch: m(batch[0]),
        loss_func=lambda output, batch: F.cross_entropy(output, batch[1], ignore_index=ignore_index),
        disabled_layers=["*head*", "*norm*"], num_calib_steps=len(batches), num_score_steps=len(batches))
    return model.eval()


def modelopt_qat(reference: Reference, calibration: list[torch.Tensor], w_bits: int, a_bits: int,
                 train_set, settings: QatSettings, ignore_index: int,
                 progress: Callable[[str], None] = lambda _: None, device: torch.device | str = "cpu") -> nn.Module:
    """ModelOpt QAT (see `QatSettings`): `modelopt_ptq` (on the CPU), then the weights trained on `device`
    through its fake quantizers with the quantizers' ranges (buffers, not parameters) as calibrated. The
    model comes back on the CPU; the reference is left there."""
    model = modelopt_ptq(reference, calibration, w_bits, a_bits).train().to(device)
    teacher = copy.deepcopy(reference.model).eval().requires_grad_(False).to(device)
    params = [p.requires_grad_(True) for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.iterations, eta_min=settings.lr / 100)
    order = TrainConfig(batch_size=settings.batch_size, seed=settings.seed)  # the trainer's seeded epochs
    resolution = reference.resolution
    for iteration in range(settings.iterations):
        epoch, indices = batch_indices(order, len(train_set), iteration, 0, 1)
        images, masks = (t.to(device) for t in make_batch([train_set.sample(i, epoch) for i in indices], resolution))
        logits = model.head(model.encoder(images), None)
        with torch.no_grad():
            target = teacher.head(teacher.encoder(images), None)
        loss = distillation_loss(logits, target, masks, ignore_index)
        if settings.label_weight:
            loss = loss + settings.label_weight * segmentation_loss(logits, masks, ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (iteration + 1) % max(settings.iterations // 4, 1) == 0:
            progress(f"ModelOpt QAT W{w_bits}A{a_bits}: iteration {iteration + 1}/{settings.iterations}, loss {loss.item():.4f}")
    return model.eval().to("cpu")


# --- ONNX Runtime -----------------------------------------------------------------------------------


def fp32_encoder_onnx(reference: Reference):
    """The reference encoder's FP32 ONNX model at batch 1 (how it is scored and timed), emitted by qsamc's own
    export path (all layers float)."""
    model, ir, spec = load_supernet(reference.run)
    example = torch.zeros(1, 3, reference.resolution, reference.resolution)
    plain = replace(get_target("cpu"), fuse_attention=False)  # standard ops, as a user's export
    return export_static(ir, spec.space, reference.subnet(32, 32), plain, example, dynamic_batch=False)[2]


def ort_static(reference: Reference, calibration: list[torch.Tensor], out: Path):
    """ONNX Runtime `quantize_static` (QDQ, per-channel, S8S8, min-max) of the FP32 encoder ONNX after ONNX
    Runtime's own pre-processing (`quant_pre_process`: its graph optimisations and shape inference, which its
    quantizer asks for; the static shapes fold the tracer's shape arithmetic, 2,800 -> 560 nodes at vit_t);
    returns the quantized model's path."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = fp32_encoder_onnx(reference)
    images = [image[None].numpy() for batch in calibration for image in batch]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({"image": image} for image in images)

        def get_next(self):
            return next(self.feeds, None)

    out.mkdir(parents=True, exist_ok=True)
    source, target = out / "encoder-fp32.onnx", out / "encoder-ort-static.onnx"
    onnx.save(fp32, source)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its per-tensor notes on LayerNorm weights
    try:
        with tempfile.TemporaryDirectory() as scratch:
            prepared = Path(scratch) / "encoder-fp32-prepared.onnx"
            # its symbolic shape inference is for dynamic axes (and stops short on this graph); these are
            # static, and ONNX's own shape inference runs
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(prepared, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    model = onnx.load(target)
    model.ir_version = min(model.ir_version, fp32.ir_version)  # onnxruntime 1.31 reads IR <= 13
    onnx.save(model, target)
    return target


def deployed_head(reference: Reference, calibration: list[torch.Tensor]) -> SegmentationHead:
    """The reference head at W8A8 (qsamc's head quantizers), activations calibrated on the FP32 features
    of the calibration images: the head every encoder-only ONNX model is scored through."""
    head = SegmentationHead(reference.model.encoder.neck[0].out_channels, reference.spec.num_classes)
    head.load_float_state(reference.model.head.state_dict(), str(reference.run))
    with torch.no_grad():
        head.calibrate_activations(torch.cat([reference.model.encoder(images) for images in calibration]))
    return head.eval()


# --- the command ------------------------------------------------------------------------------------


def run_baselines(reference_run: Path, dataset: str, data_root: Path | None, out: Path,
                  methods: tuple[str, ...] = METHODS, ptq_bits: tuple[tuple[int, int], ...] = PTQ_BITS,
                  effective_bits: tuple[float, ...] = (6.0,), calibration: int = 32, val_limit: int | None = None,
                  latency_runs: int = 10, progress: Callable[[str], None] = lambda _: None, device: str = "cpu",
                  overwrite: bool = False, split: str = "val", per_image: bool = False,
                  qat: QatSettings = QatSettings()) -> list[BaselineResult]:
    """What `qsamc baseline` does: load the FP32 reference -> each method -> score on `split` (val, or the
    reference's held-out training images: `holdout`) -> results.json. Calibration runs on the CPU; the PyTorch
    models are scored on `device` (ONNX Runtime's on the CPU). `per_image`: each result's evaluation keeps
    its images' confusion matrices (paired bootstrap intervals, `qsamc.task.intervals`). A folder holding
    earlier baselines is replaced (whole, in one step) only with `overwrite`."""
    unknown = [m for m in methods if m not in (*METHODS, *TRAINED)]
    if unknown:
        raise ConfigError(f"unknown baseline '{unknown[0]}'; known baselines are {', '.join((*METHODS, *TRAINED))}")
    check_results_folder(out, overwrite, "a baseline run",
                         lambda name: name in ("baselines.json", "encoder-fp32.onnx", "encoder-ort-static.onnx"))
    scoring = resolve_device(device)
    reference = load_reference(reference_run)
    if any(m.startswith("modelopt") for m in methods):
        _modelopt()  # a missing extra is one sentence before any work
    resolution = reference.resolution
    if split not in ("val", "holdout"):
        raise ConfigError(f"baselines are scored on val or holdout, got '{split}'")
    val = ValidationSet(search_images(reference_run, dataset, data_root, split, "semantic")[0], val_limit)
    batches = calibration_batches(dataset, data_root, calibration, resolution, reference_run)
    images = [batch for batch, _ in batches]
    results: list[BaselineResult] = []

    def scored(model: nn.Module) -> Evaluation:
        """`evaluate` on the scoring device; the model comes back to the CPU, where calibration runs."""
        try:
            return evaluate(model.to(scoring), val, resolution, scoring, per_image=per_image)
        finally:
            model.to("cpu")

    def add(method: str, label: str, subnet: Subnet, evaluation: Evaluation, **extra) -> None:
        macs, bitops, float_macs = _cost(reference, subnet)
        results.append(BaselineResult(method, label, subnet, evaluation, macs, bitops, float_macs, **extra))
        progress(f"{label}: mIoU {evaluation.miou:.4f}")

    add("fp32", "FP32 reference", reference.subnet(32, 32), scored(reference.model))
    if "modelopt-ptq" in methods:
        for w, a in ptq_bits:
            model = modelopt_ptq(reference, images, w, a)
            add("modelopt-ptq", f"ModelOpt PTQ W{w}A{a}", _modelopt_bits(model, reference),
                scored(model))
        if (8, 8) in ptq_bits:  # what `INT8_DEFAULT_CFG` gives untouched: LayerNorm inputs quantized too
            model = modelopt_ptq(reference, images, 8, 8, layer_norms=True)
            add("modelopt-ptq", "ModelOpt PTQ W8A8 (INT8_DEFAULT_CFG as is)", _modelopt_bits(model, reference),
                scored(model), notes={"layer_norm_inputs": "int8"})
    if "modelopt-qat" in methods:
        train_set = trained_images(reference_run, dataset, data_root, augment=True, seed=qat.seed)
        for w, a in ptq_bits:
            model = modelopt_qat(reference, images, w, a, train_set, qat, val.ignore_index, progress, scoring)
            add("modelopt-qat", f"ModelOpt QAT W{w}A{a}", _modelopt_bits(model, reference), scored(model),
                notes={"iterations": qat.iterations, "batch_size": qat.batch_size, "lr": qat.lr,
                       "label_weight": qat.label_weight})
    if "modelopt-autoquantize" in methods:
        for bits in effective_bits:
            model = modelopt_autoquantize(reference, batches, bits, val.ignore_index)
            add("modelopt-autoquantize", f"ModelOpt AutoQuantize {bits:g} bits", _modelopt_bits(model, reference),
                scored(model), notes={"effective_bits": bits, "head": "float"})
    with replace_folder(out) as staging:
        if "ort-static" in methods:
            path = ort_static(reference, images, staging)
            import onnx
            session = ort_session(onnx.load(path), spinning=True)
            head = deployed_head(reference, images)
            latency = ort_latency(session, images[0][:1], runs=latency_runs)
            add("ort-static", "ORT quantize_static W8A8", reference.subnet(8, 8),
                evaluate(onnx_encoder_forward(session, head), val, resolution, per_image=per_image),
                latency_ms=latency.best_ms,
                notes={"onnx": str(out / path.name), "latency": latency.to_json(),
                       "quantized": "every MatMul and Conv (attention too)"})
        atomic_write_json(staging / "baselines.json", {"reference": str(reference_run), "split": split,
                                                       "val_images": len(val.samples),
                                                       "results": [r.to_json() for r in results]})
    return results
