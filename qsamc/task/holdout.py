"""The held-out part of a training split: images `qsamc train` never trains on and `qsamc search` scores on.

Search ranks subnets by a score (validation loss, mIoU or mask AP); scored on images the supernet trained
on, it prefers subnets that fit those images, and scored on the validation split it tunes the choice to
the images the results are reported on. OFA and BigNAS hold out part of the training set for the search
instead, and so does qsamc: `qsamc train --holdout 0.1` keeps a seeded 10% of the training images out of
training (recorded in the run's config.json), and `qsamc search` scores on exactly those by default.

The chosen images are a pure function of (number of training images, fraction, seed): an FP32
reference and the supernet trained from it with the same settings hold out the same images, so the
weights search starts from never saw them either. Frames of a video a second apart are near copies: a
random tenth of them measures fit to the frames beside them (a subnet that fits the training drives looks
best), so `--holdout-block 10` (the default) holds out runs of 10 consecutive images in file-name order,
each far from most training frames; `--holdout-block 1` draws single images (runs before version 6).
`--holdout-match '0006R0_*'` holds out the images whose file names match a glob instead: a whole drive,
camera or site, which measures generalisation where a random tenth of frames from the same drives does
not (leave-one-drive-out, `benchmarks/real_data.py`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch

from qsamc.errors import DataError
from qsamc.task.data import SegmentationDataset, Sample

# `qsamc search --split`: auto (the held-out images where the run has them, else val), or one of them
SEARCH_SPLITS = ("auto", "holdout", "train", "val")


def holdout_indices(size: int, fraction: float, seed: int, block: int = 1,
                    order: Sequence[int] | None = None) -> list[int]:
    """The sorted indices of a `fraction` of `size` images (at least one when `fraction` > 0), drawn by a
    permutation seeded with `seed`: single images for `block` 1, else runs of `block` consecutive positions of
    `order` (the images' file-name order; their own order where None), a seeded permutation of the runs taken
    until the fraction is met (the last run taken may be cut short)."""
    if fraction <= 0:
        return []
    count = max(1, round(size * fraction))
    if count >= size:
        raise DataError(f"holding out {fraction:g} of {size} training images leaves none to train on; "
                        "lower --holdout")
    generator = torch.Generator().manual_seed(seed)
    if block == 1:
        return sorted(torch.randperm(size, generator=generator).tolist()[:count])
    order = list(range(size)) if order is None else list(order)
    runs = [order[start:start + block] for start in range(0, size, block)]
    drawn = [index for run in torch.randperm(len(runs), generator=generator).tolist() for index in runs[run]]
    return sorted(drawn[:count])


class SplitView(SegmentationDataset):
    """The images `indices` of `base`, in that order: the held-out part of a training split, or the rest.
    Augmentation stays keyed by the base index, so an image is augmented the same in a view as in its split."""

    def __init__(self, base: SegmentationDataset, indices: Sequence[int], part: str) -> None:
        super().__init__(base.augmentation, base.seed)
        self.base, self.indices, self.part = base, list(indices), part
        self.name, self.num_classes, self.ignore_index = base.name, base.num_classes, base.ignore_index
        self.task = base.task

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, index: int) -> Sample:
        return self.base.read(self.indices[index])

    def image_name(self, index: int) -> str:
        return self.base.image_name(self.indices[index])

    def sample(self, index: int, epoch: int) -> Sample:
        return self.base.sample(self.indices[index], epoch)

    def check_files(self) -> None:
        self.base.check_files()

    # The instance task's evaluation reads image ids and COCO categories through the dataset.
    @property
    def category_ids(self):
        return self.base.category_ids

    def image_id(self, index: int) -> int:
        return self.base.image_id(self.indices[index])

    def evaluate(self, predictions, image_ids):
        return self.base.evaluate(predictions, image_ids)


def matching_indices(train: SegmentationDataset, pattern: str) -> list[int]:
    """The indices of the training images whose file names match the glob `pattern` (`0006R0_*`: one CamVid
    drive), or one sentence saying why they cannot be held out: none match, or nothing would be left."""
    held = [i for i in range(len(train)) if fnmatch.fnmatchcase(train.image_name(i), pattern)]
    if not held:
        example = train.image_name(0) if len(train) else "none"
        raise DataError(f"no training image of {train.name} matches --holdout-match '{pattern}' (names look like "
                        f"{example})")
    if len(held) == len(train):
        raise DataError(f"every training image of {train.name} matches --holdout-match '{pattern}': none would "
                        "be left to train on")
    return held


def name_order(train: SegmentationDataset) -> list[int]:
    """The indices of `train` sorted by file name (a drive's frames in time order, for CamVid)."""
    return sorted(range(len(train)), key=train.image_name)


def split_holdout(train: SegmentationDataset, fraction: float, seed: int, match: str = "",
                  block: int = 1) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """(the images to train on, the held-out images or None) of a training split: the images whose names
    match `match` where it is given (a drive, a camera, a site held out whole), else a seeded `fraction` in runs
    of `block` images consecutive by file name."""
    if match:
        held = matching_indices(train, match)
    else:
        held = holdout_indices(len(train), fraction, seed, block, name_order(train) if block > 1 else None)
    if not held:
        return train, None
    kept = sorted(set(range(len(train))) - set(held))
    return SplitView(train, kept, "train"), SplitView(train, held, "holdout")
