"""Instance segmentation data and its metric: COCO-format datasets, the generated COCO-format shapes set,
and mask AP / AP50 / AP75 from pycocotools' `COCOeval` (pycocotools: `pip install "qsamc[instance]"`).

A COCO-format dataset folder holds `annotations/instances_<split>.json` and its images in `<split>/`
(COCO 2017's own names, `instances_val2017.json` with `val2017/`, are read too). Categories are mapped
to contiguous class indices 0..K-1 in the order of their ids. `write_synthetic_coco` writes the shapes
generator's images with one annotation per visible shape (RLE masks), so tests and benchmarks exercise
the same reader as real data.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qsamc.errors import DataError
from qsamc.fileio import atomic_write_json
from qsamc.task.data import SPLITS, SyntheticConfig, SyntheticDataset, load_image


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

    def evaluate(self, predictions: list[dict[str, Any]]) -> MaskAP:
        return mask_ap(self.coco, predictions)


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


def mask_ap(ground_truth, predictions: list[dict[str, Any]]) -> MaskAP:
    """`COCOeval` with `iouType="segm"` over every image of `ground_truth` (a pycocotools `COCO`)."""
    _, COCOeval, _ = _pycocotools()
    if not predictions:
        return MaskAP(0.0, 0.0, 0.0, 0)
    detections = _quiet(ground_truth.loadRes, predictions)
    evaluation = COCOeval(ground_truth, detections, iouType="segm")
    _quiet(evaluation.evaluate)
    _quiet(evaluation.accumulate)
    _quiet(evaluation.summarize)
    return MaskAP(*(float(s) for s in evaluation.stats[:3]), len(predictions))


def write_synthetic_coco(root: str | Path, split: str, config: SyntheticConfig = SyntheticConfig(),
                         seed: int = 0) -> Path:
    """The shapes generator's `split` as a COCO-format instance set under `root` (class k >= 1 of the
    semantic set is category id k; the background is no category). Returns the annotation file."""
    _, _, mask_utils = _pycocotools()
    root = Path(root)
    shapes = SyntheticDataset(config, split, None, seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(len(shapes)):
        image, instances, name = shapes.read_instances(index)
        file_name = f"{name}.png"
        Image.fromarray(image).save(root / split / file_name)
        images.append({"id": index + 1, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
        for label, visible in instances:
            rle = _rle(visible)
            area, bbox = float(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label,
                                "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0})
    categories = [{"id": k, "name": f"{SyntheticDataset.shape_kind(k)} {k}"} for k in range(1, config.num_classes)]
    path = root / "annotations" / f"instances_{split}.json"
    atomic_write_json(path, {"images": images, "annotations": annotations, "categories": categories})
    return path
