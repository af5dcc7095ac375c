"""Instance segmentation data and its metric: COCO-format datasets, the generated COCO-format shapes set,
and mask AP / AP50 / AP75 from pycocotools' `COCOeval` (pycocotools: `pip install "qsamc[instance]"`).

A COCO-format dataset folder holds `annotations/instances_<split>.json` and its images in `<split>/`
(COCO 2017's own names, `instances_val2017.json` with `val2017/`, are read too). Categories are mapped
to contiguous class indices 0..K-1 in the order of their ids. `write_synthetic_coco` writes the shapes
generator's images with one annotation per visible shape (RLE masks), so tests and benchmarks exercise
the same reader as real data.

For training (`--task instance`) an image's instances travel as one int32 map of instance codes,
`(class + 1) * CODE_BASE + k` for its k-th instance (Cityscapes' instance-id convention), 0 where no
instance is and `IGNORE_INDEX` in padding, so SAM's resize, the augmentation's scale, crop and flip and the
batching are the semantic task's own (nearest-neighbour on the map). Where COCO's instances overlap, the
later annotation owns the pixel (one owner per pixel, as Mask2Former's panoptic-style targets). Mask AP is
scored against the dataset's own annotations, not against the map.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qsamc.errors import DataError
from qsamc.fileio import atomic_write_json
from qsamc.task.data import (SPLITS, TASK_DATASETS, AugmentConfig, DatasetRequest, Sample, SegmentationDataset,
                             SyntheticConfig, SyntheticDataset, load_image)

CODE_BASE = 1000  # instance code = (class + 1) * CODE_BASE + k, k = 1..CODE_BASE - 1


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise DataError('instance segmentation needs pycocotools: pip install "qsamc[instance]"') from None
    return COCO, COCOeval, mask_utils


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary mask as COCO's run-length encoding, JSON-ready."""
    _, _, mask_utils = _pycocotools()
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {**rle, "counts": rle["counts"].decode()}


def _quiet(call, *args):
    """pycocotools prints its progress; a command prints its own."""
    with contextlib.redirect_stdout(io.StringIO()):
        return call(*args)


@dataclass(frozen=True)
class InstanceSample:
    image: np.ndarray  # uint8 [H, W, 3]
    masks: np.ndarray  # bool [N, H, W], one per instance
    labels: np.ndarray  # int64 [N], class indices 0..K-1
    image_id: int


class CocoInstances:
    """One split of a COCO-format instance dataset."""

    def __init__(self, root: str | Path, split: str) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset folder {root} does not exist.")
        names = [split, f"{split}2017"]
        found = next(((n, root / "annotations" / f"instances_{n}.json") for n in names
                      if (root / "annotations" / f"instances_{n}.json").is_file()), None)
        if found is None:
            raise DataError(f"{root} has no annotations/instances_{split}.json (nor instances_{split}2017.json).")
        name, annotations = found
        COCO, _, _ = _pycocotools()
        try:
            self.coco = _quiet(COCO, str(annotations))
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as exc:
            raise DataError(f"{annotations} is not a COCO instance annotation file ({type(exc).__name__}: {exc}).") from None
        self.images = root / name
        self.category_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        self._class_of = {c: i for i, c in enumerate(self.category_ids)}
        self.image_ids = sorted(self.coco.getImgIds())

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def read(self, index: int) -> InstanceSample:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = load_image(self.images / info["file_name"])
        if image.shape[:2] != (info["height"], info["width"]):
            raise DataError(f"image {info['file_name']} is {image.shape[1]}x{image.shape[0]}, its annotation says "
                            f"{info['width']}x{info['height']}.")
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        masks = np.zeros((len(annotations), *image.shape[:2]), bool)
        for i, annotation in enumerate(annotations):
            masks[i] = self.coco.annToMask(annotation).astype(bool)
        labels = np.array([self._class_of[a["category_id"]] for a in annotations], np.int64)
        return InstanceSample(image, masks, labels, image_id)

    def check_files(self) -> None:
        """Every image file is there, readable, and of its annotated size (headers only)."""
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            path = self.images / info["file_name"]
            try:
                with Image.open(path) as img:
                    size = img.size
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"image {path} is missing, unreadable or corrupt ({exc}).") from None
            if size != (info["width"], info["height"]):
                raise DataError(f"image {path} is {size[0]}x{size[1]}, its annotation says "
                                f"{info['width']}x{info['height']}.")

    def evaluate(self, predictions: list[dict[str, Any]], image_ids: list[int] | None = None) -> MaskAP:
        return mask_ap(self.coco, predictions, image_ids)


@dataclass(frozen=True)
class MaskAP:
    """COCO mask AP (IoU 0.50:0.95), AP50 and AP75; -1 where COCOeval has nothing to score."""

    ap: float
    ap50: float
    ap75: float
    predictions: int


def instance_predictions(image_id: int, masks: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                         category_ids: list[int]) -> list[dict[str, Any]]:
    """One image's predicted instances (bool masks [N, H, W], class indices, scores) in COCO's results
    format, masks RLE-encoded."""
    return [{"image_id": int(image_id), "category_id": int(category_ids[int(label)]), "segmentation": _rle(mask),
             "score": float(score)} for mask, label, score in zip(masks, labels, scores)]


def mask_ap(ground_truth, predictions: list[dict[str, Any]], image_ids: list[int] | None = None) -> MaskAP:
    """`COCOeval` with `iouType="segm"` over the images `image_ids` of `ground_truth` (a pycocotools
    `COCO`; default every image)."""
    _, COCOeval, _ = _pycocotools()
    if not predictions:
        return MaskAP(0.0, 0.0, 0.0, 0)
    detections = _quiet(ground_truth.loadRes, predictions)
    evaluation = COCOeval(ground_truth, detections, iouType="segm")
    if image_ids is not None:
        evaluation.params.imgIds = sorted(image_ids)
    _quiet(evaluation.evaluate)
    _quiet(evaluation.accumulate)
    _quiet(evaluation.summarize)
    return MaskAP(*(float(s) for s in evaluation.stats[:3]), len(predictions))


def synthetic_coco(config: SyntheticConfig, split: str, seed: int = 0,
                   images_to: Path | None = None) -> dict[str, Any]:
    """The shapes generator's `split` as a COCO instance dataset dict (class k >= 1 of the semantic set is
    category id k; the background is no category; image ids are index + 1), its images saved as PNGs
    under `images_to` when given."""
    _, _, mask_utils = _pycocotools()
    shapes = SyntheticDataset(config, split, None, seed)
    images, annotations = [], []
    for index in range(len(shapes)):
        image, instances, name = shapes.read_instances(index)
        file_name = f"{name}.png"
        if images_to is not None:
            Image.fromarray(image).save(images_to / file_name)
        images.append({"id": index + 1, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
        for label, visible in instances:
            rle = _rle(visible)
            area, bbox = float(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label,
                                "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0})
    categories = [{"id": k, "name": f"{SyntheticDataset.shape_kind(k)} {k}"} for k in range(1, config.num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_synthetic_coco(root: str | Path, split: str, config: SyntheticConfig = SyntheticConfig(),
                         seed: int = 0) -> Path:
    """The shapes generator's `split` as a COCO-format instance set under `root`. Returns the annotation file."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    atomic_write_json(path, synthetic_coco(config, split, seed, images_to=root / split))
    return path


class SyntheticInstances:
    """The shapes generator's split as instances, in memory (no files): what `--dataset synthetic
    --task instance` trains and scores on. Same interface as `CocoInstances`."""

    def __init__(self, config: SyntheticConfig, split: str, seed: int) -> None:
        self.shapes = SyntheticDataset(config, split, None, seed)
        self.config, self.split, self.seed = config, split, seed
        self.category_ids = list(range(1, config.num_classes))
        self.class_names = [f"{SyntheticDataset.shape_kind(k)} {k}" for k in self.category_ids]
        self.image_ids = list(range(1, config.count + 1))
        self._coco = None

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def coco(self):
        """The ground truth as a pycocotools `COCO`, built on first use."""
        if self._coco is None:
            COCO, _, _ = _pycocotools()
            self._coco = _quiet(COCO)
            self._coco.dataset = synthetic_coco(self.config, self.split, self.seed)
            _quiet(self._coco.createIndex)
        return self._coco

    def read(self, index: int) -> InstanceSample:
        image, instances, _ = self.shapes.read_instances(index)
        masks = np.stack([m for _, m in instances]) if instances else np.zeros((0, *image.shape[:2]), bool)
        return InstanceSample(image, masks, np.array([k - 1 for k, _ in instances], np.int64), index + 1)

    def check_files(self) -> None:
        """Generated data has no files."""

    def evaluate(self, predictions: list[dict[str, Any]], image_ids: list[int] | None = None) -> MaskAP:
        return mask_ap(self.coco, predictions, image_ids)


def encode_instances(masks: np.ndarray, labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Instances (bool masks [N, H, W], class indices [N]) as one int32 map of instance codes
    (module docstring); a later instance owns the pixels it shares with an earlier one."""
    if len(masks) >= CODE_BASE:
        raise DataError(f"an image holds {len(masks)} instances; at most {CODE_BASE - 1} are supported.")
    codes = np.zeros(shape, np.int32)
    for k, (mask, label) in enumerate(zip(masks, labels), start=1):
        codes[mask] = (int(label) + 1) * CODE_BASE + k
    return codes


class InstanceDataset(SegmentationDataset):
    """An instance source (`CocoInstances`, `SyntheticInstances`) as training samples: each `Sample`'s
    mask is the image's map of instance codes, augmented like a semantic mask."""

    task = "instance"

    def __init__(self, source: CocoInstances | SyntheticInstances, name: str, augmentation: AugmentConfig | None,
                 seed: int) -> None:
        super().__init__(augmentation, seed)
        self.source, self.name = source, name
        self.num_classes, self.category_ids = source.num_classes, source.category_ids

    def __len__(self) -> int:
        return len(self.source)

    def check_files(self) -> None:
        self.source.check_files()

    def image_id(self, index: int) -> int:
        return self.source.image_ids[index]

    def read(self, index: int) -> Sample:
        sample = self.source.read(index)
        codes = encode_instances(sample.masks, sample.labels, sample.image.shape[:2])
        return Sample(sample.image, codes, str(sample.image_id))

    def evaluate(self, predictions: list[dict[str, Any]], image_ids: list[int]) -> MaskAP:
        """Mask AP of `predictions` over the images `image_ids` (those that were predicted)."""
        return self.source.evaluate(predictions, image_ids)


def instance_targets(codes: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image of a batch of instance-code maps [B, H, W]: the binary masks [N, H, W] (float) and
    classes [N] of the instances still visible at this resolution."""
    mask_labels, class_labels = [], []
    for image in codes:
        present = [int(c) for c in image.unique() if int(c) >= CODE_BASE]
        mask_labels.append(torch.stack([(image == c).float() for c in present]) if present
                           else image.new_zeros((0, *image.shape), dtype=torch.float32))
        class_labels.append(torch.tensor([c // CODE_BASE - 1 for c in present], dtype=torch.long, device=image.device))
    return mask_labels, class_labels


def _synthetic_instances(request: DatasetRequest) -> InstanceDataset:
    if request.root is not None:
        raise DataError(f"the synthetic format is generated and takes no dataset folder, got {request.root}.")
    source = SyntheticInstances(request.synthetic, request.split, request.seed)
    return InstanceDataset(source, "synthetic", request.augmentation, request.seed)


def _coco(request: DatasetRequest) -> InstanceDataset:
    if request.root is None:
        raise DataError("the coco format needs a dataset folder; none was given.")
    return InstanceDataset(CocoInstances(request.root, request.split), "coco", request.augmentation, request.seed)


# The instance task's formats (`build_dataset(..., task="instance")`), registered with the semantic task's
# in `qsamc.task.data`; users can add their own.
INSTANCE_DATASETS = TASK_DATASETS["instance"]
INSTANCE_DATASETS.update({"synthetic": _synthetic_instances, "coco": _coco})
