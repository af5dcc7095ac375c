"""The held-out part of the training split (qsamc/task/holdout.py): never trained on, scored by search."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import TINY_TRAIN, parse_flags
from qsamc.errors import ConfigError, DataError
from qsamc.task.data import SyntheticConfig, build_dataset
from qsamc.task.holdout import holdout_indices, split_holdout
from qsamc.training.config import TrainConfig, load_train_config


def test_holdout_indices_are_a_seeded_fraction():
    held = holdout_indices(64, 0.1, seed=0)
    assert len(held) == 6 and held == sorted(set(held)) and all(0 <= i < 64 for i in held)
    assert holdout_indices(64, 0.1, seed=0) == held  # a pure function of its arguments
    assert holdout_indices(64, 0.1, seed=1) != held
    assert holdout_indices(64, 0.0, seed=0) == []
    assert len(holdout_indices(5, 0.01, seed=0)) == 1  # at least one image when asked for any
    with pytest.raises(DataError, match=r"^holding out 0.5 of 1 training images leaves none to train on; lower --holdout$"):
        holdout_indices(1, 0.5, seed=0)


def test_holdout_in_runs_takes_whole_runs_of_consecutive_images():
    # Runs of 4 positions of `order`, 10 images: two whole runs and the first 2 of a third.
    order = list(range(40))[::-1]
    held = holdout_indices(40, 0.25, seed=0, block=4, order=order)
    assert len(held) == 10 and held == sorted(set(held))
    positions = sorted(order.index(i) for i in held)
    runs = {}
    for p in positions:
        runs.setdefault(p // 4, []).append(p)
    assert sorted(len(r) for r in runs.values()) == [2, 4, 4]
    assert all(r == list(range(k * 4, k * 4 + len(r))) for k, r in runs.items())
    assert holdout_indices(40, 0.25, seed=0, block=4, order=order) == held
    assert holdout_indices(40, 0.25, seed=1, block=4, order=order) != held
    # Runs of 1 are single images, drawn as before runs existed (version 1-5 runs hold out what they did).
    assert holdout_indices(64, 0.1, seed=0, block=1) == [3, 17, 21, 44, 46, 47]


def test_split_holdout_partitions_the_training_images():
    train = build_dataset("synthetic", None, "train", augment=True, seed=3, synthetic=SyntheticConfig(count=20))
    kept, held = split_holdout(train, 0.25, seed=0)
    assert len(kept) == 15 and len(held) == 5
    assert sorted(kept.indices + held.indices) == list(range(20))
    names = {kept[i].name for i in range(len(kept))} | {held.sample(i, 0).name for i in range(len(held))}
    assert len(names) == 20
    # The same image, augmented the same way, in the view as in the split it comes from.
    first = held.indices[0]
    assert (held.sample(0, 2).image == train.sample(first, 2).image).all()
    assert split_holdout(train, 0.0, seed=0) == (train, None)


def test_config_holds_out_a_tenth_by_default_and_old_runs_none(tmp_path):
    assert (TrainConfig().holdout, TrainConfig().holdout_seed, TrainConfig().holdout_block) == (0.1, 0, 10)
    with pytest.raises(ConfigError, match=r"^holdout_block must be 1 or more, got 0$"):
        load_train_config(None, {"holdout_block": "0"})
    with pytest.raises(ConfigError, match=r"^holdout must be a fraction from 0 to 0.5 of the training images, got 0.9$"):
        load_train_config(None, {"holdout": "0.9"})
    old = {**TrainConfig().to_json(), "version": 1}
    del old["holdout"], old["holdout_seed"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_train_config(tmp_path / "config.json").holdout == 0.0  # it trained on every image
    single = {**TrainConfig().to_json(), "version": 5}
    del single["holdout_block"]
    (tmp_path / "config.json").write_text(json.dumps(single))
    assert load_train_config(tmp_path / "config.json").holdout_block == 1  # it drew single images


# --- training never sees them, search scores on them -------------------------------------------------

def test_training_never_reads_a_held_out_image(tmp_path, monkeypatch):
    import qsamc.training.train as T
    from qsamc.task.data import build_dataset as build

    trained = []
    original = T.make_batch

    def spy(samples, resolution):
        trained.extend(s.name for s in samples)
        return original(samples, resolution)

    monkeypatch.setattr(T, "make_batch", spy)
    config = replace(load_train_config(None, parse_flags(TINY_TRAIN)), out=str(tmp_path / "run"), holdout=0.25,
                     iterations=8, phase1_iterations=4, batch_size=4)
    T.train(config, show_progress=False)
    held = split_holdout(build("synthetic", None, "train"), 0.25, 0, block=10)[1]
    held_names = {held[i].name for i in range(len(held))}
    assert len(held_names) == 16 and len(trained) >= 8 * 4
    assert not held_names & set(trained)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["holdout"] == 0.25


def test_search_scores_on_the_held_out_images_by_default(tiny_run, tmp_path):
    from qsamc.pipeline import run_search, search_images
    from qsamc.search.evolution import EvolutionConfig

    images, scored_on = search_images(tiny_run, "synthetic", None, "auto", "semantic")
    assert scored_on == "holdout (6 training images the supernet never trained on)" and len(images) == 6
    assert {images[i].name for i in range(6)} <= {f"synthetic-train-{i}" for i in range(64)}
    config = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=1)
    result, _ = run_search(tiny_run, "cpu", True, False, ["30G"], tmp_path / "s", val_limit=2, config=config)
    assert result.scored_on == scored_on
    assert json.loads((tmp_path / "s" / "pareto.json").read_text())["scored_on"] == scored_on


def test_a_run_from_before_held_out_splits_searches_on_val_and_says_so(tiny_run, tmp_path):
    import shutil

    from qsamc.pipeline import search_images

    run = tmp_path / "old"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".lock"))
    saved = json.loads((run / "config.json").read_text())
    del saved["holdout"], saved["holdout_seed"]
    saved["version"] = 1
    (run / "config.json").write_text(json.dumps(saved))
    images, scored_on = search_images(run, "synthetic", None, "auto", "semantic")
    assert scored_on == ("val (the run's held-out images are not usable: it holds out no training images (trained "
                         "before held-out splits, or with --holdout 0))")
    assert images[0].name.startswith("synthetic-val-")
    with pytest.raises(ConfigError, match=r"holds out no training images of synthetic; search it with --split val or train$"):
        search_images(run, "synthetic", None, "holdout", "semantic")


def test_a_supernet_holds_out_what_its_reference_held_out(tmp_path):
    from qsamc.training.config import check_reference_holdout

    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "config.json").write_text(json.dumps(TrainConfig(schedule="fp32", holdout=0.2).to_json()))
    check_reference_holdout(TrainConfig(checkpoint=str(reference), holdout=0.2))
    with pytest.raises(ConfigError, match=r"^the reference .*reference held out 0.2 of the training images \(seed 0, runs of "
                                          r"10\) and this run would hold out 0.1 \(seed 0, runs of 10\): search would score "
                                          r"on images the reference trained on; pass --holdout 0.2 --holdout-seed 0 "
                                          r"--holdout-block 10$"):
        check_reference_holdout(TrainConfig(checkpoint=str(reference)))
    with pytest.raises(ConfigError, match=r"runs of 10\) and this run would hold out 0.2 \(seed 0, runs of 1\): .* "
                                          r"--holdout-block 10$"):
        check_reference_holdout(TrainConfig(checkpoint=str(reference), holdout=0.2, holdout_block=1))


# --- whole drives held out by name ----------------------------------------------------------------------

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


@pytest.mark.skipif(not CAMVID.is_dir(), reason="shared CamVid copy not present")
def test_a_drive_of_camvid_is_held_out_whole_by_its_file_names():
    train = build_dataset("camvid", CAMVID, "train")
    kept, held = split_holdout(train, 0.1, 0, match="0006R0_*")
    assert (len(kept), len(held)) == (266, 101)  # the drive's 101 frames, and the fraction is not used
    assert all(held.image_name(i).startswith("0006R0_") for i in range(len(held)))
    assert not any(kept.image_name(i).startswith("0006R0_") for i in range(len(kept)))
    assert held.image_name(0) == held.read(0).name
    with pytest.raises(DataError, match=r"^no training image of CamVid matches --holdout-match 'Seq05VD_\*' \(names "
                                        r"look like 0001TP_006690\)$"):
        split_holdout(train, 0.1, 0, match="Seq05VD_*")
    with pytest.raises(DataError, match=r"^every training image of CamVid matches --holdout-match '0\*': none would "
                                        r"be left to train on$"):
        split_holdout(train, 0.1, 0, match="0*")


def test_a_run_holding_out_by_name_is_searched_on_those_images_and_its_supernet_must_match(tiny_run, tmp_path):
    import shutil

    from qsamc.pipeline import search_images
    from qsamc.training.config import check_reference_holdout

    run = tmp_path / "by-name"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(".lock"))
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "holdout_match": "synthetic-train-1*"}))
    images, scored_on = search_images(run, "synthetic", None, "auto", "semantic")
    names = {images.image_name(i) for i in range(len(images))}
    assert names == {"synthetic-train-1", *(f"synthetic-train-1{i}" for i in range(10))}
    assert scored_on == "holdout (11 training images matching 'synthetic-train-1*' the supernet never trained on)"

    check_reference_holdout(TrainConfig(checkpoint=str(run), holdout_match="synthetic-train-1*"))
    with pytest.raises(ConfigError, match=r"^the reference .* held out the training images matching 'synthetic-train-1\*' "
                                          r"and this run would hold out those matching '\(a seeded fraction\)': search "
                                          r"would score on images the reference trained on; pass --holdout-match "
                                          r"'synthetic-train-1\*'$"):
        check_reference_holdout(TrainConfig(checkpoint=str(run)))


def test_a_version_2_config_holds_out_a_seeded_fraction(tmp_path):
    written = {**TrainConfig(holdout=0.2).to_json(), "version": 2}
    del written["holdout_match"]
    (tmp_path / "config.json").write_text(json.dumps(written))
    loaded = load_train_config(tmp_path / "config.json")
    assert (loaded.holdout, loaded.holdout_match) == (0.2, "")


@pytest.mark.skipif(not CAMVID.is_dir(), reason="shared CamVid copy not present")
def test_camvid_holds_out_runs_of_ten_consecutive_frames_by_default():
    from qsamc.task.holdout import name_order

    train = build_dataset("camvid", CAMVID, "train")
    config = TrainConfig()
    kept, held = split_holdout(train, config.holdout, config.holdout_seed, block=config.holdout_block)
    assert (len(kept), len(held)) == (330, 37)
    names = [train.image_name(i) for i in name_order(train)]
    positions = sorted(names.index(held.image_name(i)) for i in range(len(held)))
    runs = {}
    for p in positions:
        runs.setdefault(p // 10, []).append(p)
    # three runs of 10 frames in time order and 7 of a fourth; each run is one drive's frames
    assert sorted(len(r) for r in runs.values()) == [7, 10, 10, 10]
    assert all(len({names[p][:6] for p in r}) == 1 for r in runs.values() if len(r) == 10)
