"""Shared fixtures: seeded random weights, the vit_t space and IR, and a tiny encoder at 1024 input."""

from __future__ import annotations

import copy
import os
import random
import shutil
import sys
import tempfile

import pytest
import torch

from qsamc import sam
from qsamc.ir.graph import IR
from qsamc.ir.frontend import build_ir
from qsamc.supernet.space import default_space
from qsamc.supernet.encoder import Supernet

# Same structure as the vit_* configs at the native 1024 input (64x64 tokens, window 14, so windowed
# blocks pad 64 -> 70), but 32 wide and 4 deep: two stages of (windowed, global).
TINY_1024 = sam.EncoderConfig(
    "vit_tiny1024", embed_dim=32, depth=4, num_heads=2, global_attn_indexes=(1, 3),
    img_size=1024, window_size=14, out_chans=16,
)


def pytest_configure(config):
    """One trace cache for the session (`qsamc.ir.trace_cache`), shared with the CLI processes the tests start,
    and empty at its start: a test never reads a graph traced by other code than the code under test.

    Under pytest-xdist (`-n 2`, the README's test command) each worker, and every qsamc process it starts,
    runs one torch thread: two workers of two spinning threads each on 2 cores would slow each other down
    many times over (`qsamc.threads`), where two of one thread each run the suite in about half the time."""
    config.trace_cache = tempfile.mkdtemp(prefix="qsamc-test-traces-")
    os.environ["QSAMC_CACHE_DIR"] = config.trace_cache
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["QSAMC_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "trace_cache", ""), ignore_errors=True)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (pos_embed and rel-pos tables included, which SAM initialises to 0)
    seeded, non-zero random values, so that no part of the forward pass can hide behind a zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
            if p.dim() == 1 and name.endswith("weight"):  # norm gains around 1
                p.add_(1.0)
    return module


def encoder_and_supernet(model: str, seed: int = 0):
    """(untouched copy of a random encoder, supernet transformed from the encoder)."""
    encoder = randomize_(sam.build_encoder(model), seed)
    reference = copy.deepcopy(encoder)
    return reference.eval(), Supernet(encoder, default_space(model)).eval()


@pytest.fixture
def tiny1024(monkeypatch):
    monkeypatch.setitem(sam.MODEL_ZOO, TINY_1024.name, TINY_1024)
    return TINY_1024.name


@pytest.fixture(scope="session")
def vit_t_space():
    return default_space("vit_t")


@pytest.fixture(scope="session")
def vit_t_ir_session():
    return build_ir(Supernet.build("vit_t"), verify=True)


@pytest.fixture
def vit_t_ir(vit_t_ir_session):
    """A private copy of the annotated vit_t IR (bound to its supernet): tests may mutate it."""
    return IR(copy.deepcopy(vit_t_ir_session.graph), vit_t_ir_session.model, vit_t_ir_session.root)


@pytest.fixture(scope="session")
def vit_b_ir():
    """The annotated IR of vit_b, traced on the meta device (no weights). Do not mutate."""
    from qsamc.ir.frontend import analysis_ir

    return analysis_ir(default_space("vit_b"))


# The smallest real training: vit_t, one iteration of each progressive phase, batch 1, on the generated shapes.
TINY_TRAIN = ["--model", "vit_t", "--iterations", "2", "--phase1-iterations", "1", "--batch-size", "1",
              "--val-limit", "2", "--calibration-batches", "1"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished `TINY_TRAIN` run folder, shared by the whole session: copy it before changing it."""
    from dataclasses import replace

    from qsamc.training.config import load_train_config
    from qsamc.training.train import train

    run = tmp_path_factory.mktemp("tiny") / "run"
    train(replace(load_train_config(None, parse_flags(TINY_TRAIN)), out=str(run), checkpoint_every=1),
          show_progress=False)
    return run


@pytest.fixture(scope="session")
def fp32_reference_run(tmp_path_factory):
    """A finished `REFERENCE_TRAIN` run (`qsamc train --schedule fp32`), shared by the whole session (the
    reference and baseline tests): copy it before changing it."""
    from qsamc.training.config import load_train_config
    from qsamc.training.train import train

    run = tmp_path_factory.mktemp("reference")
    train(load_train_config(None, {**parse_flags(REFERENCE_TRAIN), "out": str(run)}), show_progress=False)
    return run


@pytest.fixture(scope="session")
def calibrated_run(tmp_path_factory):
    """`lowering_helpers.calibrated_vit_t()` (calibrated, untrained, multiplex LoRA, 4 classes) saved as a run
    folder, with two W8A8 subnets: w8a8.json (an architecture sampled with Random(7)) and w8a8-min.json (the
    smallest, the fastest to export). Shared by the whole session: copy it before writing into it."""
    from lowering_helpers import calibrated_vit_t

    from qsamc.training.runs import save_supernet

    model, _, spec = calibrated_vit_t()  # seeds itself; built once per test process
    run = tmp_path_factory.mktemp("calibrated")
    save_supernet(run, spec, model)
    space = spec.space
    space.uniform_bits(space.sample(random.Random(7)), 8, 8).save(run / "w8a8.json")
    space.uniform_bits(space.min_subnet(), 8, 8).save(run / "w8a8-min.json")
    return run


def parse_flags(args: list[str]) -> dict[str, str]:
    """`--lora-rank 16 --per-channel` -> {"lora_rank": "16", "per_channel": "true"}: the option lists the CLI
    tests pass to `qsamc train`, as the config overrides `load_train_config` takes."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        name, _, inline = args[i][2:].partition("=")
        key = name.replace("-", "_")
        if inline:
            out[key], i = inline, i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[key], i = args[i + 1], i + 2
        else:
            out[key], i = "true", i + 1
    return out


def tiny_train(**changes: str) -> list[str]:
    """`TINY_TRAIN` with some options changed or added, each once: tiny_train(iterations="3", schedule="fp32")."""
    values = {**parse_flags(TINY_TRAIN), **changes}
    return [part for key, value in values.items() for part in (f"--{key.replace('_', '-')}", value)]


# The FP32 reference's training: three iterations at the native resolution, a checkpoint after the last.
REFERENCE_TRAIN = tiny_train(iterations="3", phase1_iterations="2", checkpoint_every="3", schedule="fp32", lr="1e-3")


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run `qsamc ARGS` in process through the console-script entry point; (exit code, stdout, stderr)."""
    from rich.console import Console

    from qsamc.cli import main as cli

    monkeypatch.setattr(cli, "console", Console(width=160))  # no wrapping in captured tables

    def invoke(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["qsamc", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            cli.main()
        out, err = capsys.readouterr()
        return info.value.code, out, err

    return invoke
