"""Which images of a run's dataset a command scores on: the run's held-out training images (never trained
on; what `qsamc search` and the real-data benchmark's peers score on by default), its val split or train."""

from __future__ import annotations

from pathlib import Path

from qsamc.errors import ConfigError, QsamcError
from qsamc.task.data import SegmentationDataset, build_dataset
from qsamc.task.holdout import SEARCH_SPLITS, split_holdout
from qsamc.training.config import TrainConfig, load_train_config


def run_config(run: Path) -> TrainConfig | None:
    """The config a run was trained with (its config.json), or None for a run folder without a readable one."""
    try:
        return load_train_config(run / "config.json") if (run / "config.json").is_file() else None
    except QsamcError:
        return None


def search_images(run: Path, dataset: str, data_root: Path | None, split: str, task: str) -> tuple[SegmentationDataset, str]:
    """The images that score search's candidates, and a line that says which: the run's held-out training
    images (`holdout`; what `auto` picks where the run has them and `dataset` is its own), or a split."""
    if split not in SEARCH_SPLITS:
        raise ConfigError(f"unknown split '{split}'; use one of {', '.join(SEARCH_SPLITS)}")
    config = run_config(run)
    own = config is not None and _trained_on(config, dataset, data_root)
    holds_out = own and (config.holdout > 0 or config.holdout_match != "")
    if split == "auto":
        split = "holdout" if holds_out else "val"
        if not holds_out:
            why = ("it was trained on another dataset" if config is not None and not own else
                   "it holds out no training images (trained before held-out splits, or with --holdout 0)")
            return build_dataset(dataset, data_root, "val", task=task), f"val (the run's held-out images are not usable: {why})"
    if split == "holdout":
        if not holds_out:
            raise ConfigError(f"{run} holds out no training images of {dataset}; search it with --split val or train")
        _, held = holdout_split(config, build_dataset(dataset, data_root, "train", task=task))
        which = f" matching '{config.holdout_match}'" if config.holdout_match else ""
        return held, f"holdout ({len(held)} training images{which} the supernet never trained on)"
    return build_dataset(dataset, data_root, split, task=task), split


def trained_images(run: Path, dataset: str, data_root: Path | None, task: str = "semantic", augment: bool = False,
                   seed: int = 0) -> SegmentationDataset:
    """The training images of `dataset` that `run` trained on: its train split less the images it held out
    (all of train for a run on another dataset, or one without held-out images); `augment`: with the
    trainer's augmentation, seeded by `seed`."""
    train = build_dataset(dataset, data_root, "train", task=task, augment=augment, seed=seed)
    config = run_config(run)
    if config is None or not _trained_on(config, dataset, data_root):
        return train
    return holdout_split(config, train)[0]


def holdout_split(config: TrainConfig, train: SegmentationDataset) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """(the images a run with `config` trains on, the images it holds out or None) of its training split."""
    return split_holdout(train, config.holdout, config.holdout_seed, config.holdout_match, config.holdout_block)


def _trained_on(config: TrainConfig, dataset: str, data_root: Path | None) -> bool:
    return (dataset, data_root) == (config.dataset, None if config.data_root is None else Path(config.data_root))
