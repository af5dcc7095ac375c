"""The promptable half of SAM: segment-anything's prompt encoder + mask decoder as `decoder.onnx`.

`qsamc export --promptable` writes this next to the quantized `encoder.onnx`, so the two files split SAM
the way segment-anything's own `scripts/export_onnx_model.py` does: the encoder runs once per image, the
decoder once per click. The decoder is exported exactly as that script exports it: `SamOnnxModel`
(prompt encoder, mask decoder, mask post-processing), opset 17, a dynamic number of points, inputs
`image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size` and outputs
`masks, iou_predictions, low_res_masks` (multimask: `return_single_mask=False`, the script's default),
with the repository's post-release fix of the mask un-padding (see `_sam_onnx_model_class`).
The IR version is the lowest opset 17 needs (8), which the installed ONNX Runtime reads; onnx writes its
own newest (14) otherwise.

What the decoder is built for:
- its embedding width is the encoder's `out_chans` (256 for vit_b/l/h: exactly SAM's decoder, which
  `sam_vit_*.pth` loads into; other widths scale the decoder's MLP and IoU head with it, so vit_t's
  32-channel decoder has no published weights and is freshly initialised);
- its embedding grid is the subnet's: `resolution // patch_size` a side (64x64 for SAM at 1024, 16x16 for
  vit_t at 256, 32x32 for a vit_b subnet searched down to 512). The prompt encoder's weights do not
  depend on the grid (its positional encoding is a function of normalised coordinates), so a SAM
  checkpoint loads at every resolution; the dense positional encoding is evaluated on the smaller grid.
- its input frame is the subnet's resolution: the client resizes the longest image side to
  `resolution` (not 1024), gives point coordinates in that frame, and passes `mask_input` at 4x the
  grid (256x256 for SAM at 1024, 64x64 for vit_t at 256).

Weights: the `prompt_encoder.*` and `mask_decoder.*` keys of a whole SAM checkpoint (`--sam-checkpoint`),
or, without one, segment-anything's own initialisation under seed 0 (the report says which).
"""

from __future__ import annotations

import importlib
import io
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from qsamc import sam as sam_zoo
from qsamc.errors import ConfigError
from qsamc.export.emit import finish_model
from qsamc.export.ort import ort_session
from qsamc.export.verify import ExportError

DECODER_OPSET = 17  # segment-anything's scripts/export_onnx_model.py default
INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
OUTPUT_NAMES = ("masks", "iou_predictions", "low_res_masks")
DYNAMIC_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
# Both sides compute in FP32; what differs is kernel order. Relative to the largest |output|.
DECODER_TOLERANCE = 1e-4


def _sam_onnx_model_class() -> type:
    """`segment_anything.utils.onnx.SamOnnxModel`, imported through the bare package object that
    `qsamc.sam` registers (no torchvision: `utils/__init__` is empty and `utils.amg` needs numpy and
    torch only), with segment-anything's own later fix of its mask post-processing.

    The PyPI release (1.0) crops the padding with `int(prepadded_size[0])`, which the tracer bakes in as
    a constant: the exported decoder then only un-pads images of the dummy input's aspect ratio
    (facebookresearch/segment-anything issues #56 and #130). The repository fixed it after the release
    (pull request #58) by slicing with the int64 tensor; `verify_decoder` checks two other aspect ratios.
    """
    base = importlib.import_module("segment_anything.utils.onnx").SamOnnxModel

    class SamOnnxModel(base):
        def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
            masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
            prepadded_size = self.resize_longest_image_size(orig_im_size, self.img_size).to(torch.int64)
            masks = masks[..., : prepadded_size[0], : prepadded_size[1]]
            orig_im_size = orig_im_size.to(torch.int64)
            h, w = orig_im_size[0], orig_im_size[1]
            return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)

    return SamOnnxModel


class _EncoderStub(nn.Module):
    """Stands in for `Sam.image_encoder`: `SamOnnxModel` reads only its `img_size`; the real encoder is
    the quantized `encoder.onnx`."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size


@dataclass(frozen=True)
class DecoderSpec:
    """The shape of the prompt encoder + mask decoder that reads one subnet's image embeddings."""

    model: str
    resolution: int
    embed_dim: int
    grid: int

    @classmethod
    def for_subnet(cls, model: str, resolution: int) -> DecoderSpec:
        config = sam_zoo.get_config(model)
        if resolution % config.patch_size:
            raise ConfigError(f"resolution {resolution} is not a multiple of the patch size {config.patch_size}")
        dim = config.out_chans
        if dim % 16:
            raise ConfigError(f"model {model} has {dim} output channels; SAM's mask decoder needs a multiple of 16")
        return cls(model, resolution, dim, resolution // config.patch_size)

    @property
    def is_sam(self) -> bool:
        """Exactly segment-anything's decoder (the one `sam_vit_*.pth` holds)."""
        return self.embed_dim == 256

    def build(self) -> nn.Module:
        """A `Sam` holding a freshly initialised prompt encoder and mask decoder (and an encoder stub), built
        as segment-anything's `build_sam._build_sam` builds them."""
        modeling = sam_zoo.sam_modeling
        dim = self.embed_dim
        return modeling.Sam(
            image_encoder=_EncoderStub(self.resolution),
            prompt_encoder=modeling.PromptEncoder(
                embed_dim=dim, image_embedding_size=(self.grid, self.grid),
                input_image_size=(self.resolution, self.resolution), mask_in_chans=16),
            mask_decoder=modeling.MaskDecoder(
                num_multimask_outputs=3,
                transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=8 * dim, num_heads=8),
                transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        ).eval()


def build_promptable(spec: DecoderSpec, checkpoint: str | Path | None = None) -> tuple[nn.Module, str]:
    """(the `Sam` prompt encoder + mask decoder for `spec`, where its weights came from)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.build()
    if checkpoint is None:
        return model, "freshly initialised (segment-anything's initialisation, seed 0; no --sam-checkpoint)"
    state = sam_zoo.read_prompt_state_dict(checkpoint)
    sam_zoo.check_state_dict(model, state, str(checkpoint), f"the {spec.embed_dim}-channel SAM mask decoder")
    model.load_state_dict(state)
    return model, f"checkpoint {checkpoint}"


def onnx_model(model: nn.Module) -> nn.Module:
    """segment-anything's `SamOnnxModel` around `model`, with the export script's defaults."""
    return _sam_onnx_model_class()(model, return_single_mask=False, use_stability_score=False,
                                   return_extra_metrics=False).eval()


def dummy_inputs(spec: DecoderSpec) -> dict[str, torch.Tensor]:
    """The export script's dummy inputs (5 points), at this spec's grid and frame."""
    generator = torch.Generator().manual_seed(0)
    return {
        "image_embeddings": torch.randn(1, spec.embed_dim, spec.grid, spec.grid, generator=generator),
        "point_coords": torch.randint(0, spec.resolution, (1, 5, 2), generator=generator).float(),
        "point_labels": torch.randint(0, 4, (1, 5), generator=generator).float(),
        "mask_input": torch.randn(1, 1, 4 * spec.grid, 4 * spec.grid, generator=generator),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }


def emit_decoder(model: nn.Module, spec: DecoderSpec) -> onnx.ModelProto:
    """`decoder.onnx` as segment-anything's export script writes it, at the IR version ORT reads."""
    wrapper = onnx_model(model)
    inputs = dummy_inputs(spec)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the script silences TracerWarning and UserWarning the same way
        wrapper(**inputs)
        torch.onnx.export(wrapper, tuple(inputs.values()), buffer, dynamo=False, export_params=True,
                          opset_version=DECODER_OPSET, do_constant_folding=True, input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=DYNAMIC_AXES)
    return finish_model(onnx.load_from_string(buffer.getvalue()))


def sample_prompts(spec: DecoderSpec, embeddings: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
    """Prompts as SAM's predictor sends them, for each embedding: one click plus the padding point
    (label -1), no mask; and two clicks plus a box (labels 2, 3) with a previous mask, at another image
    size. Two point counts exercise the dynamic axis."""
    generator = torch.Generator().manual_seed(1)
    r = spec.resolution
    prompts = []
    for i, embedding in enumerate(embeddings):
        e = embedding.detach().float().numpy()
        prompts.append({
            "image_embeddings": e,
            "point_coords": np.array([[[0.4 * r, 0.55 * r], [0.0, 0.0]]], np.float32),
            "point_labels": np.array([[1, -1]], np.float32),
            "mask_input": np.zeros((1, 1, 4 * spec.grid, 4 * spec.grid), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([120, 160] if i % 2 == 0 else [150, 100], np.float32),
        })
        prompts.append({
            "image_embeddings": e,
            "point_coords": np.array([[[0.3 * r, 0.3 * r], [0.6 * r, 0.5 * r], [0.1 * r, 0.2 * r],
                                       [0.8 * r, 0.7 * r]]], np.float32),
            "point_labels": np.array([[1, 0, 2, 3]], np.float32),
            "mask_input": torch.randn(1, 1, 4 * spec.grid, 4 * spec.grid, generator=generator).numpy(),
            "has_mask_input": np.ones(1, np.float32),
            "orig_im_size": np.array([100, 150] if i % 2 == 0 else [160, 120], np.float32),
        })
    return prompts


@dataclass(frozen=True)
class DecoderFidelity:
    """`decoder.onnx` in ONNX Runtime against segment-anything's `SamOnnxModel` on the same prompts."""

    max_abs_diff: float
    output_scale: float
    max_rel: float
    prompts: int
    output_shapes: list[list[list[int]]]
    tolerance_rel: float = DECODER_TOLERANCE

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance_rel


@dataclass(frozen=True)
class DecoderReport:
    """What `qsamc export --promptable` says of `decoder.onnx` (the export report's `decoder` entry)."""

    weights: str  # where the prompt encoder and mask decoder weights came from
    sam_decoder: bool
    image_embeddings: list[int]
    input_image_size: int
    mask_input: list[int]
    opset: int
    ir_version: int
    onnx_bytes: int
    fidelity: DecoderFidelity

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "fidelity"}
        return {**data, "inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES),
                **dataclasses.asdict(self.fidelity), "ok": self.fidelity.ok}


def verify_decoder(proto: onnx.ModelProto, model: nn.Module, prompts: list[dict[str, np.ndarray]]) -> DecoderFidelity:
    """Run `decoder.onnx` in a real ONNX Runtime session on `prompts` and compare every output with the
    PyTorch `SamOnnxModel`: max absolute difference, and the same relative to the outputs' scale."""
    session = ort_session(proto)
    wrapper = onnx_model(model)
    max_abs, scale, shapes = 0.0, 0.0, []
    for prompt in prompts:
        got = session.run(list(OUTPUT_NAMES), prompt)
        with torch.no_grad():
            expected = wrapper(**{k: torch.from_numpy(v) for k, v in prompt.items()})
        for name, g, e in zip(OUTPUT_NAMES, got, expected):
            e = e.numpy()
            if g.shape != e.shape:
                raise ExportError(f"decoder.onnx output '{name}' has shape {g.shape} where SamOnnxModel gives {e.shape}")
            max_abs = max(max_abs, float(np.abs(g - e).max()))
            scale = max(scale, float(np.abs(e).max()))
        shapes.append([list(g.shape) for g in got])
    return DecoderFidelity(max_abs, scale, max_abs / max(scale, 1e-12), len(prompts), shapes)


def export_decoder(spec: DecoderSpec, model: nn.Module, weights: str,
                   embeddings: list[torch.Tensor] | None = None) -> tuple[onnx.ModelProto, DecoderReport]:
    """Emit and verify `decoder.onnx`; (model, its report). `embeddings` are the encoder's outputs on the
    sample images (the verification then feeds the decoder what it will see); random ones without.
    Raises `ExportError` when ONNX Runtime and PyTorch disagree beyond the tolerance."""
    proto = emit_decoder(model, spec)
    if embeddings is None:
        generator = torch.Generator().manual_seed(2)
        embeddings = [torch.randn(1, spec.embed_dim, spec.grid, spec.grid, generator=generator) for _ in range(2)]
    fidelity = verify_decoder(proto, model, sample_prompts(spec, embeddings))
    if not fidelity.ok:
        raise ExportError(f"decoder.onnx disagrees with segment-anything's SamOnnxModel: max abs difference "
                          f"{fidelity.max_abs_diff:.2e} is {fidelity.max_rel:.1e} of the output scale "
                          f"(tolerance {DECODER_TOLERANCE:.0e})")
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return proto, DecoderReport(weights, spec.is_sam, [1, spec.embed_dim, spec.grid, spec.grid], spec.resolution,
                                [1, 1, 4 * spec.grid, 4 * spec.grid], opset, proto.ir_version, proto.ByteSize(), fidelity)
