"""Subnet evaluation: validation loss (the paper's search proxy, Eq. 2) and mIoU of one subnet.

Used by the trainer's validation and by search's fitness. Batches are prepared once per resolution
(`ValidationSet`) so that evaluating many subnets costs only their forward passes; no gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qsamc.task.data import SegmentationDataset, make_batch
from qsamc.task.metric import SegmentationMetric
from qsamc.supernet.space import Subnet


@dataclass(frozen=True)
class Evaluation:
    loss: float
    miou: float
    pixel_accuracy: float


class ValidationSet:
    """A fixed list of validation samples, preprocessed lazily once per resolution and batch size."""

    def __init__(self, dataset: SegmentationDataset, limit: int | None = None, batch_size: int = 8) -> None:
        count = len(dataset) if limit is None else min(limit, len(dataset))
        self.samples = [dataset[i] for i in range(count)]
        self.num_classes, self.ignore_index = dataset.num_classes, dataset.ignore_index
        self.batch_size = batch_size
        self._cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def batches(self, resolution: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if resolution not in self._cache:
            step = self.batch_size
            self._cache[resolution] = [
                make_batch(self.samples[i : i + step], resolution) for i in range(0, len(self.samples), step)
            ]
        return self._cache[resolution]


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], data: ValidationSet, resolution: int) -> Evaluation:
    """Mean per-pixel cross-entropy (ignore label excluded), mIoU and pixel accuracy of any model that
    maps images at `resolution` to logits: a subnet, a baseline, an ONNX Runtime session plus head."""
    metric = SegmentationMetric(data.num_classes, data.ignore_index)
    total, pixels = 0.0, 0
    for images, masks in data.batches(resolution):
        logits = forward(images).float()
        total += F.cross_entropy(logits, masks, ignore_index=data.ignore_index, reduction="sum").item()
        pixels += int((masks != data.ignore_index).sum())
        metric.update(logits, masks)
    return Evaluation(total / max(pixels, 1), metric.miou(), metric.pixel_accuracy())


@torch.no_grad()
def evaluate_subnet(model: torch.nn.Module, subnet: Subnet, data: ValidationSet) -> Evaluation:
    """`evaluate` of the supernet + head computing `subnet`."""
    was_training = model.training
    model.eval()
    model.supernet.set_subnet(subnet)
    try:
        return evaluate(model, data, subnet.resolution)
    finally:
        model.train(was_training)
