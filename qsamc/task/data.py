"""Segmentation data: dataset readers, SAM preprocessing and augmentation (the metric is `qsamc.task.metric`).

This module feeds `qsamc train` (the supernet fine-tuning loop) and the search's validation-loss
fitness. It knows three dataset formats (ADE20K and CamVid folder layouts, plus an in-memory
synthetic set used when the user gives no data path) and registers them in `DATASETS`, where
users can plug in their own.

The supernet samples a new input resolution every training step, so a dataset does not fix the
resolution. A dataset yields raw `Sample`s (uint8 RGB image and uint8 label mask, already
label-mapped and, for training, augmented) and `make_batch` applies SAM's preprocessing at the
resolution chosen for that step:

    train = build_dataset("camvid", root, "train", augment=True, seed=0)
    loader = make_loader(train, batch_size=4, shuffle=True, seed=0)
    for epoch in range(epochs):
        train.set_epoch(epoch)              # fresh, still reproducible, augmentations per epoch
        for samples in loader:              # a list of Sample
            images, masks = make_batch(samples, resolution=sampled_resolution)

`preprocess` is the same transform for one image at inference time.
"""

from __future__ import annotations

import abc
import colorsys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from qsamc.errors import ConfigError, DataError

IGNORE_INDEX = 255
SPLITS = ("train", "val")
TASKS = ("semantic", "instance")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# segment-anything's Sam.pixel_mean / pixel_std, on 0..255 RGB.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# Raw-image padding colour that normalises to ~0, so augmentation padding looks like SAM's padding.
_PAD_RGB = tuple(round(m) for m in PIXEL_MEAN)


@dataclass(frozen=True)
class Sample:
    """One raw example: `image` uint8 [H, W, 3] RGB, `mask` [H, W]: uint8 class ids or IGNORE_INDEX (semantic
    task), or int32 instance codes (instance task, `qsamc.task.instances`)."""

    image: np.ndarray
    mask: np.ndarray
    name: str


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: random scale, then a random crop, then a horizontal flip.

    `crop_size` None crops back to the image's own size, which keeps each dataset's aspect ratio
    (the longest-side resize in preprocessing then sees the shape it sees at validation).
    """

    scale_range: tuple[float, float] = (0.5, 2.0)
    crop_size: int | None = None
    hflip_prob: float = 0.5

    def __post_init__(self) -> None:
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ConfigError(f"augmentation scale_range {self.scale_range} must satisfy 0 < low <= high.")
        if self.crop_size is not None and self.crop_size < 1:
            raise ConfigError(f"augmentation crop_size {self.crop_size} must be a positive number of pixels.")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ConfigError(f"augmentation hflip_prob {self.hflip_prob} must lie in 0..1.")


@dataclass(frozen=True)
class SyntheticConfig:
    """The generated dataset: `count` images of `size` x `size`, class 0 background plus shape classes."""

    count: int = 64
    size: int = 128
    num_classes: int = 4

    def __post_init__(self) -> None:
        if self.count < 1 or self.size < 16:
            raise ConfigError(f"synthetic count {self.count} and size {self.size} must be >= 1 and >= 16.")
        if not 2 <= self.num_classes <= 12:
            raise ConfigError(f"synthetic data supports 2..12 classes, got {self.num_classes}.")


# --- SAM preprocessing -------------------------------------------------------------------------


def preprocess_shape(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The (height, width) of an image whose longest side is resized to `resolution`.

    Same arithmetic as segment-anything's `ResizeLongestSide.get_preprocess_shape`.
    """
    scale = resolution / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _resize(array: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    # PIL bilinear is what ResizeLongestSide.apply_image runs (torchvision's PIL path), so the
    # fine-tuned encoder sees exactly the pixels the stock SAM predictor feeds it.
    return np.asarray(Image.fromarray(array).resize((width, height), resample))


def preprocess(
    image: np.ndarray, mask: np.ndarray | None, resolution: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SAM's ResizeLongestSide + Sam.preprocess on a uint8 [H, W, 3] RGB image and optional uint8 mask.

    Returns a float32 [3, R, R] image (normalised, zero-padded bottom/right) and an int64 [R, R]
    mask (nearest-resized, padded with `ignore_index`), or None when no mask is given.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preprocess expects a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    newh, neww = preprocess_shape(image.shape[0], image.shape[1], resolution)
    pixels = torch.from_numpy(_resize(image, newh, neww, Image.Resampling.BILINEAR).copy())
    pixels = pixels.permute(2, 0, 1).float()
    pixels = (pixels - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)
    padded = torch.zeros(3, resolution, resolution)
    padded[:, :newh, :neww] = pixels
    if mask is None:
        return padded, None
    labels = torch.full((resolution, resolution), ignore_index, dtype=torch.int64)
    resized = _resize(mask, newh, neww, Image.Resampling.NEAREST)
    labels[:newh, :neww] = torch.from_numpy(resized.astype(np.int64))
    return padded, labels


def make_batch(samples: Sequence[Sample], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocess raw samples at this step's resolution: images [B, 3, R, R], masks [B, R, R]."""
    pairs = [preprocess(s.image, s.mask, resolution) for s in samples]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def augment(sample: Sample, config: AugmentConfig, rng: np.random.Generator) -> Sample:
    """Random scale, pad to the crop size (SAM-mean colour / ignore), random crop, horizontal flip."""
    height, width = sample.mask.shape
    crop_h, crop_w = (config.crop_size, config.crop_size) if config.crop_size else (height, width)
    scale = rng.uniform(*config.scale_range)
    newh, neww = max(1, round(height * scale)), max(1, round(width * scale))
    image = _resize(sample.image, newh, neww, Image.Resampling.BILINEAR)
    mask = _resize(sample.mask, newh, neww, Image.Resampling.NEAREST)
    padh, padw = max(0, crop_h - newh), max(0, crop_w - neww)
    if padh or padw:
        image = np.pad(image, ((0, padh), (0, padw), (0, 0)))
        image[newh:, :] = _PAD_RGB
        image[:, neww:] = _PAD_RGB
        mask = np.pad(mask, ((0, padh), (0, padw)), constant_values=IGNORE_INDEX)
    top = int(rng.integers(0, mask.shape[0] - crop_h + 1))
    left = int(rng.integers(0, mask.shape[1] - crop_w + 1))
    image = image[top : top + crop_h, left : left + crop_w]
    mask = mask[top : top + crop_h, left : left + crop_w]
    if rng.random() < config.hflip_prob:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return Sample(np.ascontiguousarray(image), np.ascontiguousarray(mask), sample.name)


# --- datasets ----------------------------------------------------------------------------------


class SegmentationDataset(Dataset[Sample], abc.ABC):
    """A dataset of raw `Sample`s, augmented when built with an `AugmentConfig`.

    Augmentation randomness is drawn from (seed, epoch, index), so it does not depend on worker
    count or iteration order; call `set_epoch` to get new augmentations each epoch.
    """

    name: str
    num_classes: int
    ignore_index: int = IGNORE_INDEX
    task = "semantic"  # or "instance": masks are instance codes (`qsamc.task.instances`)

    def __init__(self, augmentation: AugmentConfig | None, seed: int) -> None:
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, index: int) -> Sample:
        """The sample at `index` before augmentation."""

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index, self.epoch)

    def image_name(self, index: int) -> str:
        """The name of the image at `index`, its file name without the suffix (what `qsamc train
        --holdout-match` matches)."""
        return self.read(index).name

    def check_files(self) -> None:
        """Cheap checks of every file before a long run reads them (headers and sizes, not pixels):
        DataError naming the first bad one. Generated data has no files."""

    def sample(self, index: int, epoch: int) -> Sample:
        """The sample at `index` as augmented in `epoch`: a pure function of (seed, epoch, index)."""
        sample = self.read(index)
        if self.augmentation is None:
            return sample
        return augment(sample, self.augmentation, np.random.default_rng([self.seed, epoch, index]))


def load_image(path: Path) -> np.ndarray:
    """An image file as uint8 [H, W, 3] RGB; DataError when it cannot be decoded."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image {path} is unreadable or corrupt ({exc}).") from None


@dataclass(frozen=True)
class LabelScheme:
    """How a dataset's stored label values map to training class ids 0..n-1 and IGNORE_INDEX."""

    dataset: str
    class_labels: range
    ignore_label: int

    def table(self) -> np.ndarray:
        # -1 marks stored values that are neither a class nor the ignore label.
        lut = np.full(256, -1, dtype=np.int16)
        lut[list(self.class_labels)] = np.arange(len(self.class_labels))
        lut[self.ignore_label] = IGNORE_INDEX
        return lut

    def describe(self) -> str:
        first, last = self.class_labels[0], self.class_labels[-1]
        return f"{self.dataset}'s classes {first}..{last} and ignore label {self.ignore_label}"


class FolderDataset(SegmentationDataset):
    """Images in one folder, label PNGs with the same stem in another (ADE20K, CamVid)."""

    def __init__(
        self,
        image_dir: Path,
        mask_dir: Path,
        labels: LabelScheme,
        augmentation: AugmentConfig | None,
        seed: int,
        pairs: list[tuple[Path, Path]] | None = None,
    ) -> None:
        """`pairs`: the split's (image, mask) files as its split file lists them; None: every image in
        `image_dir` with the mask of the same stem in `mask_dir`, and no mask without its image."""
        super().__init__(augmentation, seed)
        self.name = labels.dataset
        self.labels = labels
        self.num_classes = len(labels.class_labels)
        self._lut = labels.table()
        if pairs is not None:
            self.pairs = pairs
            return
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise DataError(f"{labels.dataset} split folder {folder} does not exist.")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{labels.dataset} split folder {image_dir} contains no images.")
        self.pairs = []
        for image in images:
            mask = mask_dir / f"{image.stem}.png"
            if not mask.is_file():
                raise DataError(f"image {image} has no mask; expected {mask}.")
            self.pairs.append((image, mask))
        stems = {image.stem for image in images}
        orphan = next((m for m in sorted(mask_dir.glob("*.png")) if m.stem not in stems), None)
        if orphan is not None:
            raise DataError(f"mask {orphan} has no image in {image_dir}.")

    def __len__(self) -> int:
        return len(self.pairs)

    def image_name(self, index: int) -> str:
        return self.pairs[index][0].stem  # a sample's name, without reading its pixels

    def check_files(self) -> None:
        for image_path, mask_path in self.pairs:
            sizes = []
            for path, what in ((image_path, "image"), (mask_path, "mask")):
                try:
                    with Image.open(path) as img:
                        sizes.append(img.size)
                except (OSError, ValueError, Image.DecompressionBombError) as exc:
                    raise DataError(f"{what} {path} is unreadable or corrupt ({exc}).") from None
            if sizes[0] != sizes[1]:
                raise DataError(f"mask {mask_path} is {sizes[1][0]}x{sizes[1][1]} but its image is "
                                f"{sizes[0][0]}x{sizes[0][1]}.")

    def read(self, index: int) -> Sample:
        image_path, mask_path = self.pairs[index]
        image = load_image(image_path)
        mask = self._read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}."
            )
        return Sample(image, mask, image_path.stem)

    def _read_mask(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                stored = np.asarray(img).astype(np.int64)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"mask {path} is unreadable or corrupt ({exc}).") from None
        if stored.ndim != 2:
            raise DataError(f"mask {path} has {stored.shape[2]} channels; expected single-channel labels.")
        mapped = self._lut[np.clip(stored, 0, 255)]
        bad = stored[(mapped < 0) | (stored < 0) | (stored > 255)]
        if bad.size:
            raise DataError(f"mask {path} has label {int(bad.min())}, outside {self.labels.describe()}.")
        return mapped.astype(np.uint8)


class SyntheticDataset(SegmentationDataset):
    """Generated shapes on a textured grey background, deterministic in (seed, split, index).

    Class 0 is the background; class k >= 1 is one shape kind (rectangle, ellipse, triangle, cycling)
    in its own saturated colour, so a tiny model separates the classes within a few hundred steps.
    """

    _SHAPES = ("rectangle", "ellipse", "triangle")

    def __init__(
        self, config: SyntheticConfig, split: str, augmentation: AugmentConfig | None, seed: int
    ) -> None:
        super().__init__(augmentation, seed)
        self.name = "synthetic"
        self.config = config
        self.num_classes = config.num_classes
        self._split_code = SPLITS.index(split)
        hues = np.linspace(0.0, 1.0, config.num_classes - 1, endpoint=False)
        self._palette = np.array([colorsys.hsv_to_rgb(h, 0.9, 0.95) for h in hues]) * 255.0

    def __len__(self) -> int:
        return self.config.count

    @classmethod
    def shape_kind(cls, label: int) -> str:
        """The shape class `label` (>= 1) draws."""
        return cls._SHAPES[(label - 1) % len(cls._SHAPES)]

    def read(self, index: int) -> Sample:
        image, mask, _, name = self._generate(index)
        return Sample(image, mask, name)

    def read_instances(self, index: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]], str]:
        """(image, [(class, visible pixels)] per shape, name): the shapes in drawing order, each shape's
        pixels that no later shape covers (a shape covered whole is left out)."""
        image, _, instances, name = self._generate(index)
        return image, instances, name

    def _generate(self, index: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]], str]:
        """(image, class mask, visible shapes, name) of one generated sample."""
        if not 0 <= index < self.config.count:
            raise IndexError(f"synthetic index {index} out of range 0..{self.config.count - 1}")
        # A salt keeps this stream apart from the augmentation stream [seed, epoch, index].
        rng = np.random.default_rng([self.seed, 0x5EED, self._split_code, index])
        size = self.config.size
        shapes = []
        for _ in range(int(rng.integers(1, 5))):
            label = int(rng.integers(1, self.num_classes))
            extent = rng.uniform(0.15, 0.45, size=2) * size
            x0, y0 = rng.uniform(0, size - extent)
            box = (x0, y0, x0 + extent[0], y0 + extent[1])
            shape_img = Image.new("1", (size, size), 0)
            draw = ImageDraw.Draw(shape_img)
            kind = self.shape_kind(label)
            if kind == "rectangle":
                draw.rectangle(box, fill=1)
            elif kind == "ellipse":
                draw.ellipse(box, fill=1)
            else:
                apex = ((box[0] + box[2]) / 2, box[1])
                draw.polygon([(box[0], box[3]), (box[2], box[3]), apex], fill=1)
            shapes.append((label, np.asarray(shape_img, dtype=bool)))
        covered = np.zeros((size, size), bool)
        instances = []
        for label, shape in reversed(shapes):
            visible = shape & ~covered
            covered |= shape
            if visible.any():
                instances.append((label, visible))
        instances.reverse()
        mask = np.zeros((size, size), np.uint8)
        for label, visible in instances:
            mask[visible] = label
        # Smooth grey gradient with a faint tint plus pixel noise: texture without class colours.
        coarse = rng.uniform(40, 215, size=(4, 4, 1)) + rng.uniform(-15, 15, size=(4, 4, 3))
        background = _resize(coarse.clip(0, 255).astype(np.uint8), size, size, Image.Resampling.BILINEAR)
        colours = np.where(mask[..., None] > 0, self._palette[np.maximum(mask, 1) - 1], background)
        image = (colours + rng.normal(0, 12, size=colours.shape)).clip(0, 255).astype(np.uint8)
        return image, mask, instances, f"synthetic-{SPLITS[self._split_code]}-{index}"


# --- registry and loader -----------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetRequest:
    """Everything a dataset factory may use; folder formats ignore `synthetic`."""

    root: Path | None
    split: str
    augmentation: AugmentConfig | None
    seed: int
    synthetic: SyntheticConfig


DatasetFactory = Callable[[DatasetRequest], SegmentationDataset]


def _require_root(request: DatasetRequest, dataset: str) -> Path:
    if request.root is None:
        raise DataError(f"the {dataset} format needs a dataset folder; none was given.")
    if request.root.exists() and not request.root.is_dir():
        raise DataError(f"dataset folder {request.root} is a file; give the folder that holds the dataset.")
    if not request.root.is_dir():
        raise DataError(f"dataset folder {request.root} does not exist.")
    return request.root


def _ade20k(request: DatasetRequest) -> SegmentationDataset:
    root = _require_root(request, "ADE20K")
    folder = {"train": "training", "val": "validation"}[request.split]
    labels = LabelScheme("ADE20K", range(1, 151), ignore_label=0)
    return FolderDataset(
        root / "images" / folder, root / "annotations" / folder, labels, request.augmentation, request.seed
    )


def read_split_file(path: Path, root: Path) -> list[tuple[Path, Path]]:
    """The (image, mask) pairs a split file lists, one `image mask` pair per line (SegNet's CamVid
    `train.txt`): relative to `root`, or absolute paths from another machine, found by their last two
    parts (`train/0001TP_006690.png`) under `root`. Each listed file must exist."""
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"split file {path} cannot be read ({exc}).") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"split file {path} line {number} is not an 'image mask' pair: {line.strip()[:80]!r}.")
        found = []
        for part in parts:
            listed = Path(part)
            candidate = root / listed if not listed.is_absolute() else listed
            if not candidate.is_file() and listed.is_absolute():
                candidate = root / Path(*listed.parts[-2:])
            if not candidate.is_file():
                raise DataError(f"split file {path} line {number} names {part}, which is not in {root}.")
            found.append(candidate)
        pairs.append((found[0], found[1]))
    if not pairs:
        raise DataError(f"split file {path} lists no images.")
    return pairs


def _camvid(request: DatasetRequest) -> SegmentationDataset:
    """CamVid as SegNet ships it: `<split>/` images, `<split>annot/` masks, and `<split>.txt` listing the
    split's pairs; where the split file exists it decides the split."""
    root = _require_root(request, "CamVid")
    labels = LabelScheme("CamVid", range(0, 11), ignore_label=11)
    split = request.split
    listed = root / f"{split}.txt"
    pairs = read_split_file(listed, root) if listed.is_file() else None
    return FolderDataset(root / split, root / f"{split}annot", labels, request.augmentation, request.seed, pairs)


def _synthetic(request: DatasetRequest) -> SegmentationDataset:
    if request.root is not None:
        raise DataError(f"the synthetic format is generated and takes no dataset folder, got {request.root}.")
    return SyntheticDataset(request.synthetic, request.split, request.augmentation, request.seed)


DATASETS: dict[str, DatasetFactory] = {"synthetic": _synthetic, "ade20k": _ade20k, "camvid": _camvid}
# Each task's formats: the semantic task's above; the instance task's are registered by `qsamc.task.instances`
# (pycocotools) when it is imported, which importing anything of `qsamc.task` does (`qsamc/task/__init__.py`).
TASK_DATASETS: dict[str, dict[str, DatasetFactory]] = {"semantic": DATASETS, "instance": {}}


def build_dataset(
    format: str,
    root: str | Path | None,
    split: str,
    *,
    augment: bool = False,
    seed: int = 0,
    augmentation: AugmentConfig | None = None,
    synthetic: SyntheticConfig | None = None,
    task: str = "semantic",
) -> SegmentationDataset:
    """A registered dataset's split for `task`; `augment` applies `augmentation` (default AugmentConfig()).
    The instance task's formats (`coco`, `synthetic`) live in `qsamc.task.instances` (pycocotools)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
    registry = TASK_DATASETS[task]
    if format not in registry:
        raise DataError(f"the {task} task has no dataset format {format!r}; its formats are {', '.join(sorted(registry))}.")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    request = DatasetRequest(
        root=Path(root) if root is not None else None,
        split=split,
        augmentation=(augmentation or AugmentConfig()) if augment else None,
        seed=seed,
        synthetic=synthetic or SyntheticConfig(),
    )
    return registry[format](request)


def make_loader(
    dataset: SegmentationDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader[list[Sample]]:
    """A DataLoader yielding lists of raw Samples (pass each to `make_batch`), shuffled from `seed`."""
    # Workers stay non-persistent: each epoch's iterator re-copies the dataset, so set_epoch reaches them.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=list,
        generator=torch.Generator().manual_seed(seed),
    )
