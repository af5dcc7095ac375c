"""The semantic-segmentation metric: confusion-matrix mIoU and pixel accuracy."""

from __future__ import annotations

import torch

from qsamc.task.data import IGNORE_INDEX


class SegmentationMetric:
    """Confusion-matrix mIoU and pixel accuracy; pixels labelled `ignore_index` are not counted."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [target, prediction]

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: `prediction` is logits [B, C, H, W] or labels [B, H, W]; `target` is [B, H, W]."""
        if prediction.dim() == target.dim() + 1:
            prediction = prediction.detach().argmax(dim=1)  # on the model's device: only labels travel
        prediction, target = prediction.detach().cpu(), target.detach().cpu()
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} != target {tuple(target.shape)}")
        keep = target != self.ignore_index
        target, prediction = target[keep].long(), prediction[keep].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"target labels must lie in 0..{self.num_classes - 1} or be {self.ignore_index}")
        counts = torch.bincount(target * self.num_classes + prediction, minlength=self.num_classes**2)
        self.confusion += counts.view(self.num_classes, self.num_classes)

    def per_class_iou(self) -> torch.Tensor:
        """IoU per class (float64 [C]); NaN for a class absent from both targets and predictions."""
        confusion = self.confusion.double()
        intersection = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - intersection
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.nan)

    def miou(self) -> float:
        """Mean IoU over classes present in targets or predictions; NaN before any counted pixel."""
        iou = self.per_class_iou()
        present = ~iou.isnan()
        return float(iou[present].mean()) if present.any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = int(self.confusion.sum())
        return int(self.confusion.diag().sum()) / total if total else float("nan")
