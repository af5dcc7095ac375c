"""The semantic-segmentation task head and the encoder+head model that training and search evaluate.

The head is light (paper Sec. 4.1 uses a fixed head; only the backbone is searched): a 3x3 conv, a
GELU, a 1x1 classifier, then bilinear upsampling to the input size. Its convs are quantized to W8A8
with min-max calibration, as in the paper, and never searched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qsamc.layers import QuantConv2d
from qsamc.quant import QuantizerBank, weight_range

HEAD_BITS = 8


class SegmentationHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.conv = QuantConv2d(in_channels, hidden, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.classifier = QuantConv2d(hidden, num_classes, kernel_size=1)
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
        quantizer.initialized.fill_(True)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.act(self.conv(features)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
    """Supernet encoder + task head: images at the subnet's resolution -> per-pixel class logits."""

    def __init__(self, supernet: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.supernet = supernet
        self.head = SegmentationHead(supernet.neck[0].out_channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.supernet(images), images.shape[-2:])
