"""Tests for qsamc.task.data: readers, SAM preprocessing, augmentation, metric and data errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qsamc.task.data import (
    DATASETS,
    IGNORE_INDEX,
    PIXEL_MEAN,
    PIXEL_STD,
    AugmentConfig,
    Sample,
    SyntheticConfig,
    augment,
    build_dataset,
    make_batch,
    make_loader,
    preprocess,
    preprocess_shape,
)
from qsamc.task.metric import SegmentationMetric
from qsamc.errors import ConfigError, DataError

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


def _save_rgb(path: Path, height: int, width: int, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)


def _save_mask(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


def _ade20k_tree(root: Path, split_folder: str = "training", count: int = 3) -> None:
    for i in range(count):
        _save_rgb(root / "images" / split_folder / f"ADE_{i}.jpg", 6, 8)
        labels = np.zeros((6, 8), dtype=np.uint8)
        labels[:, 2:4] = 1
        labels[:, 4:6] = 150
        labels[:, 6:] = i + 2
        _save_mask(root / "annotations" / split_folder / f"ADE_{i}.png", labels)


def _camvid_tree(root: Path, split: str = "train") -> None:
    _save_rgb(root / split / "a.png", 4, 5)
    _save_mask(root / f"{split}annot" / "a.png", np.arange(20).reshape(4, 5) % 12)


# --- metric ------------------------------------------------------------------------------------


def test_miou_hand_made_confusion() -> None:
    metric = SegmentationMetric(num_classes=4)
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    prediction = torch.tensor([[0, 1, 1, 1, 0, 3]])  # the 3 sits on an ignore pixel and is not counted
    metric.update(prediction, target)
    # class 0: tp 1, fp 1 (the 2), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 0 -> 0;
    # class 3 is absent from both and left out of the mean.
    iou = metric.per_class_iou()
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[3].item())
    assert metric.miou() == pytest.approx((1 / 3 + 2 / 3 + 0.0) / 3)
    assert metric.pixel_accuracy() == pytest.approx(3 / 5)


def test_miou_from_logits_accumulates_and_resets() -> None:
    metric = SegmentationMetric(num_classes=3)
    target = torch.tensor([[[0, 1], [2, 2]]])
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    metric.update(logits, target)
    metric.update(torch.tensor([[[0, 0], [0, 0]]]), torch.tensor([[[0, 255], [255, 255]]]))
    assert metric.miou() == 1.0
    assert metric.pixel_accuracy() == 1.0
    metric.update(torch.tensor([[1]]), torch.tensor([[2]]))  # one class-2 pixel predicted as class 1
    assert metric.per_class_iou().tolist() == pytest.approx([1.0, 0.5, 2 / 3])
    metric.reset()
    assert int(metric.confusion.sum()) == 0
    assert math.isnan(metric.miou())


# --- preprocessing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "w", "r"), [(360, 480, 1024), (480, 360, 512), (333, 500, 64), (7, 3, 10), (64, 64, 64)]
)
def test_preprocess_shape_matches_segment_anything(h: int, w: int, r: int) -> None:
    scale = r * 1.0 / max(h, w)  # ResizeLongestSide.get_preprocess_shape
    assert preprocess_shape(h, w, r) == (int(h * scale + 0.5), int(w * scale + 0.5))


def test_preprocess_non_square_shape_padding_and_normalisation() -> None:
    image = np.full((200, 300, 3), 200, dtype=np.uint8)
    mask = np.ones((200, 300), dtype=np.uint8)
    pixels, labels = preprocess(image, mask, resolution=64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert labels is not None and labels.shape == (64, 64) and labels.dtype == torch.int64
    newh = int(200 * 64 / 300 + 0.5)
    assert newh == 43
    expected = [(200 - m) / s for m, s in zip(PIXEL_MEAN, PIXEL_STD)]
    for c in range(3):
        assert torch.allclose(pixels[c, :newh, :], torch.tensor(expected[c]), atol=1e-5)
    assert torch.all(pixels[:, newh:, :] == 0)
    assert torch.all(labels[:newh] == 1) and torch.all(labels[newh:] == IGNORE_INDEX)


def test_preprocess_matches_pil_bilinear_and_nearest() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, size=(30, 50), dtype=np.uint8)
    pixels, labels = preprocess(image, mask, resolution=40)
    ref = np.asarray(Image.fromarray(image).resize((40, 24), Image.Resampling.BILINEAR)).astype(np.float32)
    ref = (ref - np.array(PIXEL_MEAN, dtype=np.float32)) / np.array(PIXEL_STD, dtype=np.float32)
    assert np.allclose(pixels[:, :24].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    ref_mask = np.asarray(Image.fromarray(mask).resize((40, 24), Image.Resampling.NEAREST))
    assert np.array_equal(labels[:24].numpy(), ref_mask)
    assert preprocess(image, None, resolution=40)[1] is None


def test_make_batch_uses_the_requested_resolution() -> None:
    dataset = build_dataset("synthetic", None, "train", synthetic=SyntheticConfig(count=3, size=32))
    samples = [dataset[i] for i in range(3)]
    for resolution in (16, 48):
        images, masks = make_batch(samples, resolution)
        assert images.shape == (3, 3, resolution, resolution) and masks.shape == (3, resolution, resolution)


# --- datasets ----------------------------------------------------------------------------------


@pytest.mark.skipif(not CAMVID.is_dir(), reason="shared CamVid copy not present")
def test_camvid_real_splits() -> None:
    for split in ("train", "val"):
        dataset = build_dataset("camvid", CAMVID, split)
        assert len(dataset) == len(list((CAMVID / split).glob("*.png")))
        assert dataset.num_classes == 11
    sample = dataset[0]
    assert sample.image.shape == (360, 480, 3) and sample.mask.shape == (360, 480)
    values = set(np.unique(sample.mask).tolist())
    assert values <= set(range(11)) | {IGNORE_INDEX}
    _, masks = make_batch([sample], 64)
    assert set(masks.unique().tolist()) <= set(range(11)) | {IGNORE_INDEX}


def test_camvid_maps_void_to_ignore(tmp_path: Path) -> None:
    _camvid_tree(tmp_path)
    sample = build_dataset("camvid", tmp_path, "train")[0]
    stored = np.arange(20).reshape(4, 5) % 12
    assert np.array_equal(sample.mask, np.where(stored == 11, IGNORE_INDEX, stored))


def test_ade20k_layout_and_label_shift(tmp_path: Path) -> None:
    _ade20k_tree(tmp_path, "validation")
    dataset = build_dataset("ade20k", tmp_path, "val")
    assert len(dataset) == 3 and dataset.num_classes == 150
    sample = dataset[1]
    assert sample.image.shape == (6, 8, 3) and sample.name == "ADE_1"
    assert np.all(sample.mask[:, :2] == IGNORE_INDEX)  # label 0 -> ignore
    assert np.all(sample.mask[:, 2:4] == 0)  # label 1 -> class 0
    assert np.all(sample.mask[:, 4:6] == 149)  # label 150 -> class 149
    assert np.all(sample.mask[:, 6:] == 2)  # label 3 -> class 2


def test_synthetic_deterministic_and_seeded() -> None:
    config = SyntheticConfig(count=4, size=48, num_classes=5)
    a = build_dataset("synthetic", None, "train", seed=3, synthetic=config)
    b = build_dataset("synthetic", None, "train", seed=3, synthetic=config)
    other = build_dataset("synthetic", None, "train", seed=4, synthetic=config)
    val = build_dataset("synthetic", None, "val", seed=3, synthetic=config)
    assert len(a) == 4 and a.num_classes == 5
    for i in range(4):
        ia, ma = make_batch([a[i]], 48)
        ib, mb = make_batch([b[i]], 48)
        assert torch.equal(ia, ib) and torch.equal(ma, mb)
        assert set(np.unique(a[i].mask).tolist()) <= set(range(5))
        assert a[i].image.dtype == np.uint8 and a[i].image.shape == (48, 48, 3)
    assert not np.array_equal(a[0].image, other[0].image)
    assert not np.array_equal(a[0].image, val[0].image)
    with pytest.raises(IndexError):
        a[4]


def test_synthetic_is_learnable_by_a_tiny_model() -> None:
    torch.manual_seed(0)
    config = SyntheticConfig(count=32, size=32, num_classes=4)
    train = build_dataset("synthetic", None, "train", seed=0, synthetic=config)
    val = build_dataset("synthetic", None, "val", seed=0, synthetic=config)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3, padding=1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images, masks = make_batch([train[i] for i in range(len(train))], 32)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(images), masks, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metric = SegmentationMetric(4)
    val_images, val_masks = make_batch([val[i] for i in range(len(val))], 32)
    with torch.no_grad():
        metric.update(model(val_images), val_masks)
    assert metric.miou() > 0.8


def test_augmentation_reproducible_and_effective(tmp_path: Path) -> None:
    config = SyntheticConfig(count=2, size=64)
    a = build_dataset("synthetic", None, "train", augment=True, seed=7, synthetic=config)
    b = build_dataset("synthetic", None, "train", augment=True, seed=7, synthetic=config)
    plain = build_dataset("synthetic", None, "train", seed=7, synthetic=config)
    assert np.array_equal(a[1].image, b[1].image) and np.array_equal(a[1].mask, b[1].mask)
    assert a[1].image.shape == (64, 64, 3)  # crop back to the image's own size
    epochs = []
    for epoch in range(3):
        a.set_epoch(epoch)
        epochs.append(a[1].image)
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])
    assert not np.array_equal(epochs[0], plain[1].image)


def test_augment_zoom_out_pads_with_ignore_and_flip_mirrors() -> None:
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    mask = np.arange(24, dtype=np.uint8).reshape(4, 6)
    sample = Sample(image, mask, "x")
    out = augment(sample, AugmentConfig(scale_range=(0.5, 0.5), hflip_prob=0.0), np.random.default_rng(0))
    assert out.mask.shape == (4, 6)
    assert np.all(out.mask[2:] == IGNORE_INDEX) and np.all(out.mask[:, 3:] == IGNORE_INDEX)
    assert tuple(out.image[3, 5]) == tuple(round(m) for m in PIXEL_MEAN)
    flipped = augment(sample, AugmentConfig(scale_range=(1.0, 1.0), hflip_prob=1.0), np.random.default_rng(0))
    assert np.array_equal(flipped.mask, mask[:, ::-1]) and np.array_equal(flipped.image, image[:, ::-1])


def test_loader_is_seeded_and_yields_sample_lists() -> None:
    dataset = build_dataset("synthetic", None, "train", synthetic=SyntheticConfig(count=6, size=16))
    names = [[s.name for s in batch] for batch in make_loader(dataset, 4, shuffle=True, seed=1)]
    again = [[s.name for s in batch] for batch in make_loader(dataset, 4, shuffle=True, seed=1)]
    assert names == again and [len(b) for b in names] == [4, 2]
    assert sorted(sum(names, [])) == sorted(dataset[i].name for i in range(6))


def test_registry_is_pluggable() -> None:
    assert set(DATASETS) >= {"synthetic", "ade20k", "camvid"}


# --- data errors -------------------------------------------------------------------------------


def test_unknown_format_lists_known_ones() -> None:
    with pytest.raises(DataError, match="ade20k, camvid, synthetic"):
        build_dataset("coco", None, "train")


def test_missing_root_and_split_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope"))):
        build_dataset("camvid", tmp_path / "nope", "train")
    with pytest.raises(DataError, match="needs a dataset folder"):
        build_dataset("ade20k", None, "train")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "images" / "training"))):
        build_dataset("ade20k", tmp_path, "train")


def test_empty_split(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'val'} contains no images")):
        build_dataset("camvid", tmp_path, "val")


def test_missing_mask(tmp_path: Path) -> None:
    _ade20k_tree(tmp_path)
    (tmp_path / "annotations" / "training" / "ADE_1.png").unlink()
    image = tmp_path / "images" / "training" / "ADE_1.jpg"
    with pytest.raises(DataError, match=re.escape(f"image {image} has no mask")):
        build_dataset("ade20k", tmp_path, "train")


def test_out_of_range_label(tmp_path: Path) -> None:
    _camvid_tree(tmp_path)
    mask_path = tmp_path / "trainannot" / "a.png"
    _save_mask(mask_path, np.full((4, 5), 17))
    dataset = build_dataset("camvid", tmp_path, "train")  # labels are checked when the sample is read
    expected = f"mask {mask_path} has label 17, outside CamVid's classes 0..10 and ignore label 11."
    with pytest.raises(DataError) as info:
        dataset[0]
    assert str(info.value) == expected


def test_ade20k_label_above_150(tmp_path: Path) -> None:
    _ade20k_tree(tmp_path, count=1)
    _save_mask(tmp_path / "annotations" / "training" / "ADE_0.png", np.full((6, 8), 151))
    expected = "has label 151, outside ADE20K's classes 1..150 and ignore label 0"
    with pytest.raises(DataError, match=re.escape(expected)):
        build_dataset("ade20k", tmp_path, "train")[0]


def test_corrupt_image(tmp_path: Path) -> None:
    _camvid_tree(tmp_path)
    (tmp_path / "train" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    image = tmp_path / "train" / "a.png"
    with pytest.raises(DataError, match=re.escape(f"image {image} is unreadable or corrupt")):
        build_dataset("camvid", tmp_path, "train")[0]


def test_mask_size_mismatch(tmp_path: Path) -> None:
    _camvid_tree(tmp_path)
    _save_mask(tmp_path / "trainannot" / "a.png", np.zeros((3, 3)))
    with pytest.raises(DataError, match=re.escape(f"mask {tmp_path / 'trainannot' / 'a.png'} is 3x3")):
        build_dataset("camvid", tmp_path, "train")[0]


def test_bad_configs_and_split() -> None:
    with pytest.raises(ConfigError):
        SyntheticConfig(num_classes=1)
    with pytest.raises(ConfigError):
        AugmentConfig(scale_range=(2.0, 0.5))
    with pytest.raises(DataError, match="unknown split 'test'"):
        build_dataset("synthetic", None, "test")
    with pytest.raises(DataError, match="takes no dataset folder"):
        build_dataset("synthetic", "/somewhere", "train")


def test_a_corrupt_validation_image_stops_training_before_the_first_iteration(tmp_path: Path) -> None:
    from qsamc.training.train import train
    from qsamc.training.config import load_train_config

    root = tmp_path / "camvid"
    _camvid_tree(root, "train")
    _camvid_tree(root, "val")
    (root / "val" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a PNG header, then nothing
    config = load_train_config(None, {"dataset": "camvid", "data_root": str(root), "out": str(tmp_path / "run"),
                                      "iterations": 2, "phase1_iterations": 1, "batch_size": 1})
    with pytest.raises(DataError, match=rf"^image {re.escape(str(root / 'val' / 'a.png'))} is unreadable or corrupt"):
        train(config, show_progress=False)
    assert not (tmp_path / "run" / "metrics.csv").exists()
