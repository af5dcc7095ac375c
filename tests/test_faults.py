"""The second round of faults: nothing lost, nothing written elsewhere, no traceback.

Each test reproduces one case a careless user hit (issue 25) and checks the one-sentence answer or the
data that must survive. Runs are real (`tiny_run`, a two-iteration vit_t training shared by the session);
full disks are real write refusals of the OS (a file-size limit in a child process: EFBIG through the
same write path a full disk takes).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qsamc.fileio as fileio
from qsamc.errors import CheckpointError, ConfigError, DataError
from qsamc.pipeline import export_subnet, run_search
from qsamc.search.evolution import EvolutionConfig
from qsamc.task.data import build_dataset
from qsamc.training.config import load_train_config, resolve_train_config
from qsamc.training.runs import load_supernet
from qsamc.training.train import train
from conftest import TINY_TRAIN, parse_flags

TINY_SEARCH = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=1)


def tiny(out: Path, **changes):
    return replace(load_train_config(None, parse_flags(TINY_TRAIN)), out=str(out), **changes)


def copy_run(tiny_run: Path, to: Path) -> Path:
    shutil.copytree(tiny_run, to, ignore=shutil.ignore_patterns(".lock"))
    return to


@pytest.fixture(scope="module")
def subnet_file(tiny_run, tmp_path_factory):
    _, _, spec = load_supernet(tiny_run)
    path = tmp_path_factory.mktemp("subnet") / "w8a8.json"
    spec.space.uniform_bits(spec.space.min_subnet(), 8, 8).save(path)
    return path


def child(code: str, cwd: Path, limit_bytes: int) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose files may not grow past `limit_bytes` (RLIMIT_FSIZE): every
    larger write fails with EFBIG, as a full disk fails with ENOSPC."""
    prelude = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))
        from qsamc.cli.main import main
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


# --- data lost or written to the wrong place ------------------------------------------------------

def test_a_copied_run_resumes_in_its_own_folder(tiny_run, tmp_path):
    original = copy_run(tiny_run, tmp_path / "runA")
    copied = copy_run(original, tmp_path / "runB")
    before = (original / "supernet.pt").read_bytes()
    config = resolve_train_config(None, {"out": str(copied)}, resume=True)
    assert config.out == str(copied)  # not the folder its config.json was written in
    (copied / "supernet.pt").unlink()
    train(config, resume=True, show_progress=False)
    assert (copied / "supernet.pt").is_file()
    assert (original / "supernet.pt").read_bytes() == before


def test_an_empty_out_is_refused_and_nothing_is_written(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("train", *TINY_TRAIN, "--quiet", "--out", "")
    assert code == 2 and err == "error: out must name the run folder; it is empty\n"
    assert list(tmp_path.iterdir()) == []


def test_a_second_search_into_a_folder_needs_overwrite_and_replaces_it_whole(tiny_run, tmp_path):
    out = tmp_path / "s1"
    run_search(tiny_run, "cpu", True, False, ["30G"], out, val_limit=2, config=TINY_SEARCH)
    first = sorted(p.name for p in out.iterdir())
    assert first == ["best-30G.json", "pareto.json", "pareto.png"]
    with pytest.raises(ConfigError, match=r"^--out .*s1 already holds results \(best-30G.json, pareto.json, pareto.png\); "
                                          r"replace them with --overwrite or choose another folder$"):
        run_search(tiny_run, "cpu", True, False, ["20G"], out, val_limit=2, config=TINY_SEARCH)
    assert sorted(p.name for p in out.iterdir()) == first
    _, written = run_search(tiny_run, "cpu", True, False, ["20G"], out, val_limit=2, config=TINY_SEARCH,
                            overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["best-20G.json", "pareto.json", "pareto.png"]
    assert sorted(p.name for p in written) == ["best-20G.json", "pareto.json", "pareto.png"]
    assert all(p.parent == out for p in written)
    assert [p.name for p in tmp_path.iterdir()] == ["s1"]  # no staging folder left beside it


def test_overwrite_never_deletes_files_that_are_not_the_commands(tiny_run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own")
    with pytest.raises(ConfigError, match=r"holds files that are not a search's \(notes.txt\); choose another folder$"):
        run_search(tiny_run, "cpu", True, False, ["30G"], out, val_limit=2, config=TINY_SEARCH, overwrite=True)
    assert (out / "notes.txt").read_text() == "the user's own"


def test_a_second_export_needs_overwrite_and_a_failed_one_keeps_the_old(tiny_run, subnet_file, tmp_path, monkeypatch):
    import qsamc.export.report as export_report

    out = tmp_path / "e1"
    export_subnet(tiny_run, subnet_file, "cpu", "onnx", out, samples=1)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(old) == ["encoder.onnx", "precision.png", "report.json"]
    with pytest.raises(ConfigError, match=r"already holds results .*replace them with --overwrite"):
        export_subnet(tiny_run, subnet_file, "cpu", "onnx", out, samples=1)

    def killed(*_args, **_kwargs):  # a kill after the new model was written
        raise KeyboardInterrupt

    monkeypatch.setattr(export_report, "plot_precision_map", killed)
    with pytest.raises(KeyboardInterrupt):
        export_subnet(tiny_run, subnet_file, "cpu", "onnx", out, samples=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert [p.name for p in tmp_path.iterdir()] == ["e1"]
    monkeypatch.undo()
    report = export_subnet(tiny_run, subnet_file, "cpu", "onnx", out, samples=1, overwrite=True)
    assert json.loads((out / "report.json").read_text())["files"] == report.files
    assert report.files["onnx"] == str(out / "encoder.onnx")


def test_a_kill_between_the_two_renames_is_undone_by_the_next_command(tmp_path, monkeypatch):
    """Where the OS cannot swap two folders at once, the old one is parked first; a kill right after leaves
    no folder at --out, and the next command puts the parked one back before it looks."""
    out = tmp_path / "e1"
    out.mkdir()
    (out / "report.json").write_text("old")
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def rename_then_die(src, dst):
        calls.append((src, dst))
        real_rename(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed after parking the old folder

    monkeypatch.setattr(fileio.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        with fileio.replace_folder(out) as staging:
            (staging / "report.json").write_text("new")
    monkeypatch.setattr(fileio.os, "rename", real_rename)
    assert not out.exists() and len(list(tmp_path.glob(".e1.old-*"))) == 1
    with pytest.raises(ConfigError, match="already holds results"):
        fileio.check_results_folder(out, False, "an export", lambda name: name == "report.json")
    assert (out / "report.json").read_text() == "old" and list(tmp_path.iterdir()) == [out]
    # ... and the fallback swap, uninterrupted, replaces the folder.
    with fileio.replace_folder(out) as staging:
        (staging / "report.json").write_text("new")
    assert (out / "report.json").read_text() == "new" and list(tmp_path.iterdir()) == [out]


# --- tracebacks that are now sentences ---------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "search", "export"])
def test_an_out_on_a_file_system_that_refuses_files_is_one_sentence(run_cli, tiny_run, subnet_file, command):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    args = {"train": ["train", *TINY_TRAIN, "--quiet"],
            "search": ["search", "--supernet", tiny_run, "--target", "cpu", "--bitops", "--budget", "30G"],
            "export": ["export", "--supernet", tiny_run, "--subnet", subnet_file, "--target", "cpu"]}[command]
    code, _, err = run_cli(*args, "--out", "/proc/x")
    assert code == 2 and err.startswith("error: --out /proc/x cannot be written: /proc refuses new files (")
    assert err.count("\n") == 1


def test_a_config_that_is_not_utf8_or_is_a_folder(run_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = run_cli("train", "--config", bad, "--out", tmp_path / "r")
    assert code == 2 and err == f"error: config file {bad} is not UTF-8 text (byte 0 cannot be decoded)\n"
    code, _, err = run_cli("train", "--config", tmp_path, "--out", tmp_path / "r")
    assert code == 2 and err == f"error: config file {tmp_path} is a folder; give the YAML, TOML or JSON file\n"


@pytest.mark.parametrize("content, message", [
    ([1, 2], "is not a qsamc supernet description"),
    ("edit", ": 'resolutions' must be a non-empty list of integers, got \"big\""),
    ("nospace", " lacks the field 'space'"),
    ("version", " was written by a newer qsamc (version 99); this one reads version 1: upgrade qsamc"),
    ("zero_point", " is malformed: 'zero_point' must be one of integer, continuous, got 'half'"),
])
def test_a_malformed_supernet_json_names_its_field(run_cli, tiny_run, subnet_file, tmp_path, content, message):
    run = copy_run(tiny_run, tmp_path / "run")
    data = json.loads((run / "supernet.json").read_text())
    if content == "edit":
        data["space"]["resolutions"] = "big"
    elif content == "nospace":
        del data["space"]
    elif content == "version":
        data["version"] = 99
    elif content == "zero_point":
        data["zero_point"] = "half"
    else:
        data = content
    (run / "supernet.json").write_text(json.dumps(data))
    for args in (["search", "--supernet", run, "--target", "cpu", "--bitops", "--budget", "30G", "--out", tmp_path / "s"],
                 ["export", "--supernet", run, "--subnet", subnet_file, "--target", "cpu", "--out", tmp_path / "e"]):
        code, _, err = run_cli(*args)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_threads_beyond_any_machine_are_refused(run_cli):
    code, _, err = run_cli("--threads", "99999999999", "space", "--model", "vit_t")
    assert code == 2 and err == "error: --threads must be at most 4096, got 99999999999\n"


def test_resuming_from_another_runs_checkpoint_names_the_misfit(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["model"] = {"encoder.blocks.0.weight": torch.zeros(3)}  # another model's weights
    state["iteration"] = 1
    torch.save(state, run / "checkpoints" / "last.pt")
    config = resolve_train_config(None, {"out": str(run)}, resume=True)
    with pytest.raises(CheckpointError, match=r"^checkpoint .*last.pt does not fit the run described by .*config.json: "
                                              r"key 'supernet\..*' is missing$"):
        train(config, resume=True, show_progress=False)


def test_a_full_disk_during_training_is_one_sentence(tmp_path):
    result = child(f"""
        sys.argv = ["qsamc", "train", {", ".join(map(repr, TINY_TRAIN))}, "--quiet", "--out", "run"]
        main()
    """, tmp_path, limit_bytes=200_000)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: could not write {Path('run') / 'checkpoints' / 'last.pt'}: File too large; "
                             "no last.pt was written\n")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "checkpoints", "config.json",
                                                                     "metrics.csv"]


def test_a_full_disk_during_a_reexport_keeps_the_old_export(tiny_run, subnet_file, tmp_path):
    out = tmp_path / "e1"
    out.mkdir()
    (out / "report.json").write_text('{"an": "earlier export"}')
    result = child(f"""
        sys.argv = ["qsamc", "export", "--supernet", {str(tiny_run)!r}, "--subnet", {str(subnet_file)!r},
                    "--target", "cpu", "--out", "e1", "--overwrite"]
        main()
    """, tmp_path, limit_bytes=100_000)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"error: could not write ")
    assert result.stderr.splitlines()[-1].endswith(": File too large; no encoder.onnx was written")
    assert [p.name for p in out.iterdir()] == ["report.json"]
    assert (out / "report.json").read_text() == '{"an": "earlier export"}'
    assert [p.name for p in tmp_path.iterdir()] == ["e1"]


# --- accepted or misreported, now refused with the reason ---------------------------------------------

def test_export_refuses_a_negative_val_limit(tiny_run, subnet_file, tmp_path):
    with pytest.raises(ConfigError, match=r"^--val-limit must be at least 1, got -3$"):
        export_subnet(tiny_run, subnet_file, "cpu", "onnx", tmp_path / "e", val_limit=-3)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args, message", [
    (["--num-workers", "-1"], "error: num_workers must be 0 or more, got -1\n"),
    (["--resume", "--overwrite"], "error: --resume continues the run in --out and --overwrite replaces it; choose one\n"),
])
def test_train_refuses_contradictions(run_cli, tmp_path, args, message):
    out = tmp_path / "run"
    if "--resume" in args:
        code, _, err = run_cli("train", *args, "--out", out)
        assert (code, err) == (2, f"error: cannot resume: {out / 'config.json'} does not exist (pass the run's --out or "
                                  "its --config)\n")
        train_config = tiny(out)
        with pytest.raises(ConfigError, match="^" + message[7:-1] + "$"):
            train(train_config, resume=True, overwrite=True, show_progress=False)
    else:
        code, _, err = run_cli("train", *TINY_TRAIN, *args, "--out", out)
        assert (code, err) == (2, message)
    assert not out.exists()


def test_a_data_root_that_is_a_file(tmp_path):
    (tmp_path / "camvid.zip").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"^dataset folder .*camvid.zip is a file; give the folder that holds the dataset\.$"):
        build_dataset("camvid", tmp_path / "camvid.zip", "train")


def test_resume_while_another_train_starts_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as held:  # another train holds the lock, config.json not written yet
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=r"^another qsamc train is writing to .*run; wait for it"):
            resolve_train_config(None, {"out": str(run)}, resume=True)


@pytest.mark.parametrize("failure", ["data root", "checkpoint"])
def test_a_training_that_fails_its_checks_leaves_no_folder(tmp_path, failure):
    out = tmp_path / "run"
    if failure == "data root":
        config, error = tiny(out, dataset="camvid", data_root=str(tmp_path / "nowhere")), DataError
    else:
        (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
        config, error = tiny(out, checkpoint=str(tmp_path / "bad.pth")), CheckpointError
    with pytest.raises(error):
        train(config, show_progress=False)
    assert not out.exists()


# --- CamVid's split files decide the split -------------------------------------------------------------

def _camvid(root: Path, names: list[str], masks_only: tuple[str, ...] = ()) -> Path:
    for folder in ("train", "trainannot"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / f"{name}.png")
    for name in (*names, *masks_only):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "trainannot" / f"{name}.png")
    return root


def test_camvid_reads_its_split_file(tmp_path):
    root = _camvid(tmp_path / "camvid", ["a", "b", "c"])
    (root / "train.txt").write_text("train/a.png trainannot/a.png\n/SegNet/CamVid/train/c.png /SegNet/CamVid/trainannot/c.png\n")
    data = build_dataset("camvid", root, "train")
    assert [image.name for image, _ in data.pairs] == ["a.png", "c.png"]


@pytest.mark.parametrize("listing, message", [
    ("train/a.png trainannot/a.png\ntrain/z.png trainannot/z.png\n", r"line 2 names train/z.png, which is not in "),
    ("garbage\n", r"line 1 is not an 'image mask' pair: 'garbage'\."),
    ("\n\n", r"lists no images\."),
])
def test_camvid_names_what_its_split_file_gets_wrong(tmp_path, listing, message):
    root = _camvid(tmp_path / "camvid", ["a", "b"])
    (root / "train.txt").write_text(listing)
    with pytest.raises(DataError, match=r"^split file .*train.txt " + message):
        build_dataset("camvid", root, "train")


def test_a_mask_without_its_image_is_named(tmp_path):
    root = _camvid(tmp_path / "camvid", ["a"], masks_only=("orphan",))
    with pytest.raises(DataError, match=r"^mask .*orphan.png has no image in .*train\.$"):
        build_dataset("camvid", root, "train")
