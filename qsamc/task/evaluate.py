"""Subnet evaluation: validation loss (the paper's search proxy, Eq. 2) and the task metric of one subnet:
mIoU (semantic task) or COCO mask AP (instance task); and, against a reference's predictions, fidelity: the
mean per-pixel KL(reference || subnet) over the labelled pixels (their classes unused).

Used by the trainer's validation and by search's fitness. Batches are prepared once per resolution
(`ValidationSet`) so that evaluating many subnets costs only their forward passes; no gradients.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qsamc.distributed import module_device

from qsamc.task.data import SegmentationDataset, make_batch, preprocess_shape
from qsamc.task.instances import instance_predictions
from qsamc.task.losses import pixel_kl
from qsamc.task.mask2former import mask_scores
from qsamc.task.metric import SegmentationMetric
from qsamc.supernet.space import Subnet


@dataclass(frozen=True)
class Evaluation:
    """Validation loss and the task's metrics: mIoU and pixel accuracy (semantic), mask AP, AP50 and
    AP75 (instance); a metric the task does not have is NaN."""

    loss: float
    miou: float
    pixel_accuracy: float
    ap: float = math.nan
    ap50: float = math.nan
    ap75: float = math.nan
    # Mean per-pixel KL(reference || this model) of the class distributions, where `evaluate` was given a
    # `ReferencePredictions` (lower is better: 0 predicts exactly what the reference does).
    fidelity: float = math.nan
    # evaluate(per_image=True): each image's confusion matrix [N, C, C], for paired bootstrap intervals.
    image_confusions: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def metrics(self) -> dict[str, float]:
        """Loss and the task's own metrics (JSON-ready: no NaN for the other task's)."""
        names = ("loss", "ap", "ap50", "ap75") if not math.isnan(self.ap) else ("loss", "miou", "pixel_accuracy")
        return {name: getattr(self, name) for name in names} | ({} if math.isnan(self.fidelity) else {"fidelity": self.fidelity})

    def describe(self) -> str:
        if not math.isnan(self.ap):
            return f"mask AP {self.ap:.4f} (AP50 {self.ap50:.4f}, AP75 {self.ap75:.4f}), loss {self.loss:.4f}"
        return f"validation mIoU {self.miou:.4f}, loss {self.loss:.4f}, pixel accuracy {self.pixel_accuracy:.4f}"


class ValidationSet:
    """A fixed list of validation samples, preprocessed lazily once per resolution and batch size."""

    def __init__(self, dataset: SegmentationDataset, limit: int | None = None, batch_size: int = 8) -> None:
        count = len(dataset) if limit is None else min(limit, len(dataset))
        self.dataset = dataset
        self.samples = [dataset[i] for i in range(count)]
        self.num_classes, self.ignore_index, self.task = dataset.num_classes, dataset.ignore_index, dataset.task
        self.batch_size = batch_size
        self._cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def batches(self, resolution: int, device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batches at `resolution`, on `device` (kept there: a search scores many subnets on them)."""
        key = (resolution, str(torch.device(device)))
        if key not in self._cache:
            step = self.batch_size
            self._cache[key] = [
                tuple(t.to(device) for t in make_batch(self.samples[i : i + step], resolution))
                for i in range(0, len(self.samples), step)
            ]
        return self._cache[key]


@dataclass(frozen=True)
class ReferencePredictions:
    """What fidelity measures a model against: a reference's class logits at its head's grid for every batch
    of a `ValidationSet`, predicted once at the reference's own resolution."""

    logits: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def predict(cls, forward: Callable[[torch.Tensor], torch.Tensor], data: ValidationSet, resolution: int,
                device: torch.device | str = "cpu") -> ReferencePredictions:
        """`forward` maps images at `resolution` to logits at the head's grid (`upsample=False`)."""
        return cls([forward(images).float() for images, _ in data.batches(resolution, device)])


def _kl_sum(logits: torch.Tensor, reference: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed per-pixel KL(reference || logits) over the labelled pixels of `masks`, the reference's grid
    upsampled to the logits' size, one image at a time (two images' upsampled logits are the peak)."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for student, teacher, mask in zip(logits, reference, masks):
        teacher = F.interpolate(teacher[None], size=student.shape[-2:], mode="bilinear", align_corners=False)
        total += pixel_kl(student[None], teacher)[0][mask != ignore_index].sum().double()
    return total


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], data: ValidationSet, resolution: int,
             device: torch.device | str = "cpu", per_image: bool = False,
             reference: ReferencePredictions | None = None) -> Evaluation:
    """Mean per-pixel cross-entropy (ignore label excluded), mIoU and pixel accuracy of any model that
    maps images at `resolution` to logits: a subnet, a baseline, an ONNX Runtime session plus head. The
    batches go to `device`, the model's. `per_image`: also each image's confusion matrix. `reference`:
    also fidelity, the mean per-pixel KL from the reference's prediction (made at its own resolution,
    upsampled to this one) over the same pixels."""
    metric = SegmentationMetric(data.num_classes, data.ignore_index, per_image=per_image)
    total, pixels = torch.zeros((), dtype=torch.float64, device=device), 0
    kl = torch.zeros((), dtype=torch.float64, device=device)
    for index, (images, masks) in enumerate(data.batches(resolution, device)):
        logits = forward(images).float()
        total += F.cross_entropy(logits, masks, ignore_index=data.ignore_index, reduction="sum").double()
        pixels += int((masks != data.ignore_index).sum())
        metric.update(logits, masks)
        if reference is not None:
            kl += _kl_sum(logits, reference.logits[index].to(logits.device), masks, data.ignore_index)
    return Evaluation(float(total) / max(pixels, 1), metric.miou(), metric.pixel_accuracy(),
                      fidelity=math.nan if reference is None else float(kl) / max(pixels, 1),
                      image_confusions=metric.images() if per_image else None)


@torch.no_grad()
def evaluate_instances(encoder: Callable[[torch.Tensor], torch.Tensor], head: torch.nn.Module, data: ValidationSet,
                       resolution: int, top_k: int = 100) -> Evaluation:
    """Validation loss (the head's set loss, its point sampling seeded so that the proxy is a function of
    the subnet) and COCO mask AP of `encoder` (images -> features) + a Mask2Former `head`: each image's top-k
    instances, their mask logits upsampled to the padded input, cropped to the image and resized to its
    original size, binarised at 0 and scored by class probability x mask score."""
    total, predictions, image_ids = 0.0, [], []
    device = module_device(head)
    for start, (images, masks) in zip(range(0, len(data.samples), data.batch_size), data.batches(resolution, device)):
        features = encoder(images)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            total += head.loss(features, masks, data.ignore_index).item() * len(images)
        for offset, (scores, labels, logits) in enumerate(head.detect(features, top_k)):
            index = start + offset
            height, width = data.samples[index].image.shape[:2]
            newh, neww = preprocess_shape(height, width, resolution)
            logits = F.interpolate(logits[None].float(), size=(resolution, resolution), mode="bilinear",
                                   align_corners=False)[..., :newh, :neww]
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0]
            scores = scores * mask_scores(logits)
            keep = (logits > 0).flatten(1).any(1)
            image_ids.append(data.dataset.image_id(index))
            predictions += instance_predictions(image_ids[-1], (logits[keep] > 0).cpu().numpy(),
                                                labels[keep].cpu().numpy(), scores[keep].cpu().numpy(),
                                                data.dataset.category_ids)
    scored = data.dataset.evaluate(predictions, image_ids)
    return Evaluation(total / max(len(data.samples), 1), math.nan, math.nan, scored.ap, scored.ap50, scored.ap75)


@torch.no_grad()
def evaluate_subnet(model: torch.nn.Module, subnet: Subnet, data: ValidationSet, per_image: bool = False,
                    reference: ReferencePredictions | None = None) -> Evaluation:
    """`evaluate` (semantic; `per_image`: with each image's confusion matrix; `reference`: with fidelity) or
    `evaluate_instances` (instance task) of the supernet + head computing `subnet`, on the device the model is on."""
    was_training = model.training
    model.eval()
    model.supernet.set_subnet(subnet)
    try:
        if data.task == "instance":
            return evaluate_instances(model.supernet, model.head, data, subnet.resolution)
        return evaluate(model, data, subnet.resolution, module_device(model), per_image=per_image, reference=reference)
    finally:
        model.train(was_training)
