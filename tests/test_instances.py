"""Instance segmentation data and mask AP (qsamc/task/instances.py): COCO-format files read back through
pycocotools, the generated shapes set, and COCOeval on hand-made predictions."""

import json

import numpy as np
import pytest
from PIL import Image

from qsamc.errors import DataError
from qsamc.task.data import SyntheticConfig, build_dataset
from qsamc.task.instances import CocoInstances, instance_predictions, mask_ap, write_synthetic_coco

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
