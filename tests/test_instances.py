"""Instance segmentation data and mask AP (qsamc/task/instances.py): COCO-format files read back through
pycocotools, the generated shapes set, COCOeval on hand-made predictions, the instance task's training
samples (instance codes) and its evaluation (`evaluate_instances`) with exact expectations."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qsamc.errors import DataError
from qsamc.task.data import IGNORE_INDEX, SyntheticConfig, build_dataset, make_batch
from qsamc.task.evaluate import ValidationSet
from qsamc.task.instances import (CODE_BASE, CocoInstances, _rle, encode_instances, instance_predictions,
                                  instance_targets, mask_ap, write_synthetic_coco)

CONFIG = SyntheticConfig(count=6, size=64, num_classes=4)


@pytest.fixture(scope="module")
def shapes_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_synthetic_coco(root, "val", CONFIG, seed=3)
    return root


def test_the_generated_set_reads_back_as_the_shapes_it_drew(shapes_coco):
    """Each instance is a shape's visible pixels: together they paint exactly the semantic set's mask."""
    data = CocoInstances(shapes_coco, "val")
    semantic = build_dataset("synthetic", None, "val", seed=3, synthetic=CONFIG)
    assert (len(data), data.num_classes) == (6, 3)
    assert data.class_names == ["rectangle 1", "ellipse 2", "triangle 3"]
    for index in range(len(data)):
        sample, expected = data.read(index), semantic.read(index)
        np.testing.assert_array_equal(sample.image, expected.image)
        painted = np.zeros(expected.mask.shape, np.uint8)
        for mask, label in zip(sample.masks, sample.labels):
            assert mask.any() and not painted[mask].any()  # visible pixels only: instances never overlap
            painted[mask] = label + 1  # class index k-1 is the semantic set's class k
        np.testing.assert_array_equal(painted, expected.mask)


def test_a_perfect_prediction_scores_ap_1_and_a_wrong_class_scores_0(shapes_coco):
    data = CocoInstances(shapes_coco, "val")
    perfect, wrong = [], []
    for index in range(len(data)):
        sample = data.read(index)
        scores = np.linspace(0.9, 0.5, len(sample.labels))
        perfect += instance_predictions(sample.image_id, sample.masks, sample.labels, scores, data.category_ids)
        other = (sample.labels + 1) % data.num_classes  # every mask right, every class wrong
        wrong += instance_predictions(sample.image_id, sample.masks, other, scores, data.category_ids)
    scored = data.evaluate(perfect)  # COCOeval averages 101 interpolated precisions: 1.0 to float rounding
    assert (scored.ap, scored.ap50, scored.ap75) == pytest.approx((1.0, 1.0, 1.0), abs=1e-12)
    assert scored.predictions == len(perfect) > len(data)
    scored = data.evaluate(wrong)
    assert (scored.ap, scored.ap50, scored.ap75) == (0.0, 0.0, 0.0)
    assert data.evaluate([]).predictions == 0


def test_a_half_overlapping_mask_counts_at_iou_050_and_not_at_075(tmp_path):
    """One 10x10 object and one prediction covering half of it plus nothing else: IoU exactly 0.5."""
    (tmp_path / "val").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "val" / "a.png")
    truth = np.zeros((20, 20), bool)
    truth[5:15, 5:15] = True
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(truth.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.png", "height": 20, "width": 20}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "segmentation": rle, "area": 100.0,
                         "bbox": [5, 5, 10, 10], "iscrowd": 0}],
        "categories": [{"id": 5, "name": "square"}]}))
    data = CocoInstances(tmp_path, "val")
    assert data.read(0).labels.tolist() == [0] and data.read(0).masks.sum() == 100
    half = truth.copy()
    half[10:15] = False  # 50 of the 100 pixels, none outside: IoU 0.5
    scored = mask_ap(data.coco, instance_predictions(7, half[None], np.array([0]), np.array([0.9]), data.category_ids))
    # IoU 0.5 counts at thresholds 0.50 only: AP50 1, AP75 0, AP (mean over 0.50:0.05:0.95) 1/10.
    assert (scored.ap50, scored.ap75, scored.ap) == pytest.approx((1.0, 0.0, 0.1), abs=1e-12)


@pytest.mark.parametrize("case, message", [
    ("no folder", r"^dataset folder .*missing does not exist\.$"),
    ("no annotations", r"^.* has no annotations/instances_val\.json \(nor instances_val2017\.json\)\.$"),
    ("not coco", r"^.*instances_val\.json is not a COCO instance annotation file \(KeyError: "),
])
def test_bad_instance_folders_are_one_sentence(tmp_path, case, message):
    root = tmp_path / ("missing" if case == "no folder" else "data")
    if case != "no folder":
        (root / "annotations").mkdir(parents=True)
    if case == "not coco":
        (root / "annotations" / "instances_val.json").write_text('{"images": [{"id": 1}], "annotations": [{"id": 1}]}')
    with pytest.raises(DataError, match=message):
        CocoInstances(root, "val")


def test_coco_2017_names_are_read_too(shapes_coco, tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(
        (shapes_coco / "annotations" / "instances_val.json").read_text())
    (shapes_coco / "val").rename(tmp_path / "val2017")
    try:
        assert len(CocoInstances(tmp_path, "val")) == 6
    finally:
        (tmp_path / "val2017").rename(shapes_coco / "val")


# --- the instance task's training samples: instance codes through SAM's preprocessing ---------------------

def test_instance_codes_round_trip_to_the_instances():
    masks = np.zeros((3, 4, 5), bool)
    masks[0, :2], masks[1, :, :2], masks[2, 3, 4] = True, True, True
    codes = encode_instances(masks, np.array([2, 0, 2]), (4, 5))
    # code (class + 1) * 1000 + k for the k-th instance; the later instance owns the shared pixels
    assert codes.dtype == np.int32 and codes[0].tolist() == [1002, 1002, 3001, 3001, 3001]
    assert codes[3].tolist() == [1002, 1002, 0, 0, 3003]
    mask_labels, class_labels = instance_targets(torch.from_numpy(np.stack([codes, np.full((4, 5), 255)])).long())
    assert class_labels[0].tolist() == [0, 2, 2] and class_labels[1].tolist() == []
    assert mask_labels[0].sum((1, 2)).tolist() == [8, 6, 1] and mask_labels[1].shape == (0, 4, 5)
    with pytest.raises(DataError, match=r"^an image holds 1000 instances; at most 999 are supported\.$"):
        encode_instances(np.zeros((1000, 2, 2), bool), np.zeros(1000, np.int64), (2, 2))


def test_generated_and_written_instance_sets_give_the_same_samples(shapes_coco):
    generated = build_dataset("synthetic", None, "val", seed=3, synthetic=CONFIG, task="instance")
    written = build_dataset("coco", shapes_coco, "val", task="instance")
    assert (generated.num_classes, written.num_classes, generated.task) == (3, 3, "instance")
    for index in range(len(written)):
        a, b = generated.read(index), written.read(index)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        instance = CocoInstances(shapes_coco, "val").read(index)
        codes = np.unique(b.mask[b.mask > 0])  # one code per instance, its class in the thousands
        assert sorted((codes // CODE_BASE - 1).tolist()) == sorted(instance.labels.tolist())


def test_augmentation_and_batching_keep_instance_codes(shapes_coco):
    data = build_dataset("coco", shapes_coco, "val", task="instance", augment=True, seed=1)
    raw = data.read(2)
    for epoch in range(3):
        augmented = data.sample(2, epoch).mask
        assert set(np.unique(augmented)) <= set(np.unique(raw.mask)) | {IGNORE_INDEX}
    _, masks = make_batch([data.sample(2, 0)], 48)
    assert set(masks.unique().tolist()) <= set(np.unique(raw.mask).tolist()) | {IGNORE_INDEX}


@pytest.mark.parametrize("format, root, message", [
    ("ade20k", None, r"^the instance task has no dataset format 'ade20k'; its formats are coco, synthetic\.$"),
    ("coco", None, r"^the coco format needs a dataset folder; none was given\.$"),
])
def test_instance_formats_are_checked(format, root, message):
    with pytest.raises(DataError, match=message):
        build_dataset(format, root, "val", task="instance")
    with pytest.raises(DataError, match=r"^unknown task 'panoptic'; use one of semantic, instance\.$"):
        build_dataset("synthetic", None, "val", task="panoptic")


class OracleHead(torch.nn.Module):
    """Predicts each batch's ground-truth instances exactly (logits +-10 at the input resolution), with a
    class shift: how `evaluate_instances` is checked end to end with exact AP (0 shift: 1.0; else 0)."""

    def __init__(self, data: ValidationSet, resolution: int, shift: int) -> None:
        super().__init__()
        self.batches = iter(data.batches(resolution))
        self.num_classes, self.shift = data.num_classes, shift

    def loss(self, features, masks, ignore_index):
        return torch.zeros(())

    def detect(self, features, top_k):
        _, codes = next(self.batches)
        found = []
        for image in codes:
            masks, labels = instance_targets(image[None])
            logits = masks[0] * 20 - 10
            found.append((torch.linspace(0.9, 0.5, len(logits)), (labels[0] + self.shift) % self.num_classes, logits))
        return found


def test_instance_evaluation_crops_the_padding_and_resizes_to_the_image(tmp_path):
    """Images 40x30 (landscape: SAM pads the bottom) at resolution 40 and 80: the oracle's masks come back
    at 30x40 and score AP 1.0; every class wrong scores 0."""
    from qsamc.task.evaluate import evaluate_instances

    (tmp_path / "val").mkdir()
    images, annotations = [], []
    for i in range(3):
        Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(tmp_path / "val" / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png", "height": 30, "width": 40})
        for j in range(2):
            truth = np.zeros((30, 40), bool)
            truth[4 + 10 * j : 12 + 10 * j, 4 + 8 * i : 20 + 8 * i] = True
            rle = _rle(truth)
            annotations.append({"id": len(annotations) + 1, "image_id": 10 + i, "category_id": 1 + j + i % 2,
                                "segmentation": rle, "area": float(truth.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0})
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": k, "name": str(k)} for k in (1, 2, 3)]}))
    data = ValidationSet(build_dataset("coco", tmp_path, "val", task="instance"), batch_size=2)
    for resolution in (40, 80):
        right = evaluate_instances(lambda x: x, OracleHead(data, resolution, 0), data, resolution)
        assert (right.ap, right.ap50, right.ap75) == pytest.approx((1.0, 1.0, 1.0), abs=1e-12)
        assert right.loss == 0.0 and np.isnan(right.miou)
        wrong = evaluate_instances(lambda x: x, OracleHead(data, resolution, 1), data, resolution)
        assert (wrong.ap, wrong.ap50, wrong.ap75) == (0.0, 0.0, 0.0)
