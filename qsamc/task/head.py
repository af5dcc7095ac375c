"""The task heads and the encoder+head model that training and search evaluate.

Heads are a choice (`--head`); neither is searched (paper Sec. 4.1: only the backbone is):
- `light` (the default): a 3x3 conv, a GELU, a 1x1 classifier, then bilinear upsampling to the input
  size. Its convs are quantized to W8A8: weights min-max, as in the paper; activation ranges initialised
  like the encoder's and then trained with LSQ+ beside them, where the paper keeps min-max ranges
  (`calibrate_activations` gives those; `benchmarks/head_ranges.py` measures the difference on CamVid).
- `mask2former`: the paper's task setup (`qsamc.task.mask2former`), float.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qsamc.errors import ConfigError
from qsamc.sam import check_state_dict, is_quantizer_state
from qsamc.supernet.layers import QuantConv2d
from qsamc.supernet.quant import QuantizerBank, weight_range
from qsamc.task.data import IGNORE_INDEX
from qsamc.task.losses import segmentation_loss
from qsamc.task.mask2former import Mask2FormerHead, Mask2FormerSpec

HEAD_BITS = 8
HEADS = ("light", "mask2former")


class SegmentationHead(nn.Module):
    """`quantized=False` builds the same head from plain `nn.Conv2d` (same state-dict keys), for the
    baselines that post-training quantizers (ModelOpt) rewrite themselves."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 128, quantized: bool = True) -> None:
        super().__init__()
        conv = QuantConv2d if quantized else nn.Conv2d
        self.conv = conv(in_channels, hidden, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.classifier = conv(hidden, num_classes, kernel_size=1)
        if not quantized:
            return
        for layer in (self.conv, self.classifier):
            layer.weight_quantizer = QuantizerBank("weight", (HEAD_BITS,))
            layer.act_quantizer = QuantizerBank("act", (HEAD_BITS,))
            layer.set_bits(HEAD_BITS, HEAD_BITS)
            self.calibrate_weight(layer)

    @staticmethod
    @torch.no_grad()
    def calibrate_weight(layer: QuantConv2d) -> None:
        """Min-max weight scale: the largest |w| maps to the top of the signed 8-bit grid."""
        quantizer = layer.weight_quantizer[HEAD_BITS]
        quantizer.scale.copy_(layer.weight.abs().max().clamp_min(1e-8) / weight_range(HEAD_BITS)[1])
        quantizer.mark_initialized()

    @torch.no_grad()
    def calibrate_activations(self, features: torch.Tensor) -> None:
        """Min-max activation ranges at HEAD_BITS over the head's inputs for encoder `features`, replacing any
        range observed or learned before (how a post-training quantizer calibrates the head). The classifier's
        input is computed through the conv as calibrated, as it will be deployed."""
        for layer in (self.conv, self.classifier):
            inputs = features if layer is self.conv else self.act(self.conv(features))
            quantizer = layer.act_quantizer[HEAD_BITS]
            quantizer.observed_min.fill_(math.inf)
            quantizer.observed_max.fill_(-math.inf)
            quantizer.observe(inputs)
            quantizer.initialize()

    def set_bits(self, bits: int) -> None:
        """HEAD_BITS (the deployed head, W8A8) or 32 (the FP32 reference's head)."""
        for layer in (self.conv, self.classifier):
            layer.set_bits(bits, bits)

    def has_activation_ranges(self) -> bool:
        """Whether both activation quantizers hold a range (calibrated, or initialised and trained at
        HEAD_BITS). A head trained at 32 bits (an FP32 reference run's) has none."""
        return all(bool(layer.act_quantizer[HEAD_BITS].initialized) for layer in (self.conv, self.classifier))

    def load_float_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a trained head's float weights (a reference run's) and re-calibrate the weight scales;
        the activation quantizers re-initialise from the first batch they see."""
        expected = {k: v for k, v in self.state_dict().items() if not is_quantizer_state(k)}
        check_state_dict(expected, state, source, f"a {self.classifier.out_channels}-class head")
        self.load_state_dict(state, strict=False)
        for layer in (self.conv, self.classifier):
            if isinstance(layer, QuantConv2d):
                self.calibrate_weight(layer)

    def forward(self, features: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        """Class logits upsampled to `size`, or at the token grid when `size` is None (training's
        losses upsample them chunk by chunk, `qsamc.task.losses`)."""
        logits = self.classifier(self.act(self.conv(features)))
        if size is None:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def loss(self, features: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Per-pixel cross-entropy of the token-grid logits, upsampled a few rows at a time."""
        return segmentation_loss(self(features, None).float(), masks, ignore_index)


def build_head(kind: str, in_channels: int, num_classes: int, mask2former: Mask2FormerSpec | None = None,
               task: str = "semantic") -> nn.Module:
    """A head for `task`: the light head is semantic only, Mask2Former does both."""
    if task == "instance" and kind != "mask2former":
        raise ConfigError(f"the instance task needs the mask2former head; the {kind} head predicts classes per pixel")
    if kind == "light":
        return SegmentationHead(in_channels, num_classes)
    if kind == "mask2former":
        return Mask2FormerHead(in_channels, num_classes, mask2former or Mask2FormerSpec(), task)
    raise ConfigError(f"unknown head '{kind}'; known heads are {', '.join(HEADS)}")


class SegmentationModel(nn.Module):
    """Supernet encoder + task head: images at the subnet's resolution -> per-pixel class logits
    (`upsample=False`: at the head's own grid)."""

    def __init__(self, supernet: nn.Module, num_classes: int, head: str = "light",
                 mask2former: Mask2FormerSpec | None = None, task: str = "semantic") -> None:
        super().__init__()
        self.supernet = supernet
        self.task = task
        self.head = build_head(head, supernet.neck[0].out_channels, num_classes, mask2former, task)

    def forward(self, images: torch.Tensor, upsample: bool = True, masks: torch.Tensor | None = None,
                ignore_index: int = IGNORE_INDEX, with_features: bool = False):
        """Logits; with `masks`, the head's training loss instead (computed in `forward`, so that
        DistributedDataParallel sees every parameter the loss reaches); `with_features`: (logits, the
        encoder's output features), for feature distillation."""
        features = self.supernet(images)
        if masks is not None:
            return self.head.loss(features, masks, ignore_index)
        logits = self.head(features, images.shape[-2:] if upsample else None)
        return (logits, features) if with_features else logits
