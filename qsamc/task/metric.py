"""The semantic-segmentation metric: confusion-matrix mIoU and pixel accuracy."""

from __future__ import annotations

import torch

from qsamc.task.data import IGNORE_INDEX


class SegmentationMetric:
    """Confusion-matrix mIoU and pixel accuracy; pixels labelled `ignore_index` are not counted."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, per_image: bool = False) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [target, prediction]
        # per_image: also keep each image's own confusion matrix, in order (for paired bootstrap intervals).
        self.per_image = per_image
        self.image_confusions: list[torch.Tensor] = []

    def reset(self) -> None:
        self.confusion.zero_()
        self.image_confusions.clear()

    def images(self) -> torch.Tensor:
        """The per-image confusion matrices [N, C, C] of the images added so far (per_image=True)."""
        if not self.per_image:
            raise RuntimeError("this metric keeps no per-image confusions: build it with per_image=True")
        empty = torch.zeros(0, self.num_classes, self.num_classes, dtype=torch.int64)
        return torch.stack(self.image_confusions) if self.image_confusions else empty

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: `prediction` is logits [B, C, H, W] or labels [B, H, W]; `target` is [B, H, W]."""
        if prediction.dim() == target.dim() + 1:
            prediction = prediction.detach().argmax(dim=1)  # on the model's device: only labels travel
        prediction, target = prediction.detach().cpu(), target.detach().cpu()
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} != target {tuple(target.shape)}")
        keep = target != self.ignore_index
        if self.per_image:  # the image each kept pixel belongs to
            image = torch.arange(target.shape[0]).view(-1, *[1] * (target.dim() - 1)).expand_as(target)[keep]
        target, prediction = target[keep].long(), prediction[keep].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"target labels must lie in 0..{self.num_classes - 1} or be {self.ignore_index}")
        cells = self.num_classes**2
        if self.per_image:  # one bincount over (image, target, prediction) cells
            per_image = torch.bincount(image * cells + target * self.num_classes + prediction,
                                       minlength=len(keep) * cells).view(len(keep), self.num_classes, self.num_classes)
            self.image_confusions.extend(per_image.unbind(0))
            self.confusion += per_image.sum(0)
            return
        counts = torch.bincount(target * self.num_classes + prediction, minlength=cells)
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
