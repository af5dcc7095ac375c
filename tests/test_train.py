"""`qsamc train` (qsamc.training.train, qsamc.training.config): schedules, freezing, sampling, resume, divergence, DDP.

The runs are tiny (vit_t, batch 1, a handful of iterations on the embedded synthetic dataset). Spies wrap
the trainer's own functions (they call the originals and only record), so what is checked is what the
trainer really did: which parameters each optimizer step held, which got gradients and which changed.
"""

import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import qsamc.task.head as heads
import qsamc.training.runs as runs
import qsamc.training.train as T
from qsamc.training.runs import load_supernet
from qsamc.errors import CheckpointError, ConfigError, QsamcError
from qsamc.supernet.space import default_space
from qsamc.training.train import TrainingDiverged, batch_indices, sample_subnets, train
from conftest import parse_flags, tiny_train
from qsamc.training.config import TrainConfig, default_phase1_resolution, load_train_config, resolve_train_config

# The reference run: 3 iterations of phase 1, then 3 with LoRA; its checkpoints land at 3 (the boundary) and 6.
FLAGS = tiny_train(iterations="6", phase1_iterations="3", checkpoint_every="3")


def tiny_config(out: Path, **changes) -> TrainConfig:
    return replace(load_train_config(None, parse_flags(FLAGS)), out=str(out), **changes)


def is_encoder_weight(name: str) -> bool:
    """A pre-trained encoder parameter: what progressive phase 2 freezes."""
    return name.startswith("supernet.") and ".lora." not in name and "quantizer." not in name


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qsamc.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


class TrainSpy:
    """Records each optimizer step (phase, parameters held, with gradient, changed), the sampled subnets,
    every checkpoint written (its bytes) and the trained model."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[dict] = []
        self.subnets: dict[int, list] = {}
        self.checkpoints: dict[int, bytes] = {}
        self.model = None
        original_optimizer, original_save, original_sample = T._optimizer, T.atomic_torch_save, T.sample_subnets

        def optimizer(config, model, lora_phase, steps):
            opt, scheduler = original_optimizer(config, model, lora_phase, steps)
            self.model = model
            names = {id(p): n for n, p in model.named_parameters()}
            held = {names[id(p)] for group in opt.param_groups for p in group["params"]}
            pending: dict = {}

            def pre(_opt, _args, _kwargs):
                params = dict(model.named_parameters())
                pending.update(lora_phase=lora_phase, lr=opt.defaults["lr"], held=held, names=set(params),
                               grads={n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0},
                               before={n: p.detach().clone() for n, p in params.items()})

            def post(_opt, _args, _kwargs):
                params = dict(model.named_parameters())
                before = pending.pop("before")
                self.steps.append({**pending, "changed": {n for n, v in before.items() if not torch.equal(v, params[n])}})
                pending.clear()

            opt.register_step_pre_hook(pre)
            opt.register_step_post_hook(post)
            return opt, scheduler

        def save(obj, path):
            original_save(obj, path)
            self.checkpoints[obj["iteration"]] = Path(path).read_bytes()

        def sample(config, space, iteration):
            subnets = original_sample(config, space, iteration)
            self.subnets[iteration] = subnets
            return subnets

        monkeypatch.setattr(T, "_optimizer", optimizer)
        monkeypatch.setattr(T, "atomic_torch_save", save)
        monkeypatch.setattr(T, "sample_subnets", sample)


def spied_run(config: TrainConfig, resume: bool = False) -> TrainSpy:
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = TrainSpy(monkeypatch)
        spy.threads = torch.get_num_threads()  # a CLI run that must match it bit for bit takes the same count
        train(config, resume=resume, show_progress=False)
    return spy


@pytest.fixture(scope="module")
def progressive_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("progressive")
    return run, spied_run(tiny_config(run))


# --- progressive training freezes what it should -------------------------------------------------------

def test_phase_1_trains_every_encoder_weight_without_lora(progressive_run):
    _, spy = progressive_run
    space = default_space("vit_t")
    phase1 = spy.steps[:3]
    assert [s["lora_phase"] for s in spy.steps] == [False] * 3 + [True] * 3
    for iteration, step in enumerate(phase1):
        assert not any(".lora." in n for n in step["names"])  # no LoRA exists yet
        assert step["held"] == step["names"]  # the optimizer holds every parameter
        assert step["lr"] == 1e-4
        # Exactly the encoder weights the sampled subnet ran got a gradient, and an update.
        (subnet,) = spy.subnets[iteration]
        active = space.active_blocks(subnet.depths)
        ran = {n for n in step["names"] if is_encoder_weight(n)
               and (not n.startswith("supernet.blocks.") or int(n.split(".")[2]) in active)}
        assert len(active) < 12 and len(ran) > 100
        assert {n for n in step["grads"] if is_encoder_weight(n)} == ran
        assert {n for n in step["changed"] if is_encoder_weight(n)} == ran
        assert {"supernet.pos_embed", "supernet.patch_embed.proj.weight", "supernet.neck.0.weight"} <= ran
        assert any(n.startswith("head.") for n in step["changed"])


def test_phase_2_freezes_the_pretrained_weights_and_trains_lora_quantizers_head(progressive_run):
    run, spy = progressive_run
    for step in spy.steps[3:]:
        assert step["lr"] == 1e-3  # lora_lr
        lora = {n for n in step["names"] if ".lora." in n}
        assert len(lora) == 36 * 5 * 2  # qkv, lin1, lin2 of 12 blocks; 5 multiplex modules; A and B
        assert step["held"] == {n for n in step["names"] if not is_encoder_weight(n)}
        assert not any(is_encoder_weight(n) for n in step["grads"] | step["changed"])
        assert any(".lora." in n for n in step["changed"])
        assert any("quantizer." in n for n in step["changed"])
        assert any(n.startswith("head.") for n in step["changed"])

    boundary = load_state_bytes(spy.checkpoints[3])
    assert boundary["iteration"] == 3
    final = load_state(run / "supernet.pt")
    assert not any(".lora." in k for k in boundary["model"]) and any(".lora." in k for k in final)
    encoder = [k for k in boundary["model"] if is_encoder_weight(k) and k in dict(spy.model.named_parameters())]
    assert len(encoder) > 100
    for key in encoder:  # bit-identical to the values at the boundary
        assert torch.equal(boundary["model"][key], final[key]), key
    changed = {k for k in boundary["model"] if not torch.equal(boundary["model"][k], final[k])}
    assert any(k.endswith(".scale") for k in changed) and any(k.endswith(".offset") for k in changed)
    assert any(k.startswith("head.") for k in changed)
    trained_b = [k for k in final if ".lora." in k and k.endswith(".B") and torch.count_nonzero(final[k]) > 0]
    assert trained_b


def test_run_folder_contents(progressive_run):
    run, spy = progressive_run
    assert sorted(spy.checkpoints) == [3, 6]
    rows = metric_rows(run)
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [int(r["phase"]) for r in rows] == [1, 1, 1, 2, 2, 2]
    assert all(int(r["resolution"]) <= 192 for r in rows[:3])
    saved = json.loads((run / "config.json").read_text())
    assert saved == tiny_config(run).resolved().to_json()  # as it ran: the recipe's automatic choices made
    assert (saved["distill"], saved["l2sp"]) == ("none", 0.0)  # no checkpoint: nothing to distil from or anchor to
    spec = json.loads((run / "supernet.json").read_text())
    assert spec["lora"]["variant"] == "multiplex" and spec["num_classes"] > 1
    validation = json.loads((run / "validation.json").read_text())
    assert 0 <= validation["max_subnet"]["miou"] <= 1 and validation["val_images"] == 2


def test_saved_supernet_loads_back_to_the_same_outputs(progressive_run):
    run, spy = progressive_run
    model, ir, spec = load_supernet(run)
    assert spec.lora == tiny_config(run).lora
    assert len(ir.quantizable()) == 51
    space = spec.space
    subnet = replace(space.sample(random.Random(11)), resolution=128)
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    trained = spy.model.eval()
    outputs = []
    with torch.no_grad():
        for candidate in (trained, model):
            candidate.supernet.set_subnet(subnet)
            outputs.append(candidate(images))
    assert torch.equal(*outputs)


def test_run_folder_without_supernet_json_is_a_checkpoint_error(tmp_path):
    (tmp_path / "supernet.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="supernet.json is missing"):
        load_supernet(tmp_path)
    (tmp_path / "supernet.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed"):
        load_supernet(tmp_path)


# --- the other schedules -------------------------------------------------------------------------------

def test_full_schedule_never_attaches_lora(tmp_path):
    config = tiny_config(tmp_path, schedule="full", iterations=2, checkpoint_every=1)
    assert config.lora is None and config.lora_from() is None
    spy = spied_run(config)
    assert len(spy.steps) == 2
    for step in spy.steps:
        assert not step["lora_phase"] and step["lr"] == config.lr
        assert not any(".lora." in n for n in step["names"])
        assert step["held"] == step["names"]
        assert any(is_encoder_weight(n) for n in step["changed"])
    for data in spy.checkpoints.values():
        assert not any(".lora." in k for k in load_state_bytes(data)["model"])
    assert not any(".lora." in k for k in load_state(tmp_path / "supernet.pt"))
    assert json.loads((tmp_path / "supernet.json").read_text())["lora"] is None


def test_lora_schedule_attaches_lora_from_iteration_0(tmp_path):
    config = tiny_config(tmp_path, schedule="lora", lora_variant="selective", iterations=2, checkpoint_every=1)
    spy = spied_run(config)
    assert len(spy.steps) == 2
    for step in spy.steps:
        assert step["lora_phase"] and step["lr"] == config.lora_lr
        assert len({n for n in step["names"] if ".lora." in n}) == 36 * 5 * 2
        assert not any(is_encoder_weight(n) for n in step["held"] | step["grads"] | step["changed"])
        assert any(".lora." in n for n in step["changed"])
    first = load_state_bytes(spy.checkpoints[1])["model"]
    assert any(".lora." in k for k in first)


# --- sampling ------------------------------------------------------------------------------------------

def test_phase_1_resolution_cap_and_full_range_in_phase_2(tmp_path):
    space = default_space("vit_t")
    config = tiny_config(tmp_path, iterations=600, phase1_iterations=300)
    assert default_phase1_resolution(config) == 192  # 3/4 of vit_t's 256 input
    phase1 = {sample_subnets(config, space, i)[0].resolution for i in range(300)}
    phase2 = {sample_subnets(config, space, i)[0].resolution for i in range(300, 600)}
    assert phase1 == {128, 144, 160, 176, 192}
    assert phase2 == set(space.resolutions) == set(range(128, 257, 16))
    capped = replace(config, phase1_max_resolution=160)
    assert {sample_subnets(capped, space, i)[0].resolution for i in range(300)} == {128, 144, 160}
    # The paper's 768 cap for the vit_* encoders at their 1024 input.
    assert default_phase1_resolution(TrainConfig(model="vit_b")) == 768
    vit_b = default_space("vit_b")
    assert max(sample_subnets(TrainConfig(model="vit_b"), vit_b, i)[0].resolution for i in range(100)) == 768
    for schedule in ("lora", "full"):
        other = replace(config, schedule=schedule)
        assert {sample_subnets(other, space, i)[0].resolution for i in range(300)} == set(space.resolutions)


def test_sandwich_rule_samples_max_min_and_one_random(tmp_path):
    space = default_space("vit_t")
    config = tiny_config(tmp_path, sampling="sandwich", iterations=100, phase1_iterations=50)
    randoms = []
    for iteration in (0, 10, 49, 50, 70, 99):
        subnets = sample_subnets(config, space, iteration)
        assert len(subnets) == 3
        top = space.max_subnet() if iteration >= 50 else replace(space.max_subnet(), resolution=192)
        assert subnets[0] == top and subnets[1] == space.min_subnet()
        space.validate(subnets[2])
        randoms.append(subnets[2])
    assert len(set(randoms)) == len(randoms)
    # The random member is the uniform sample of the same (seed, iteration).
    uniform = replace(config, sampling="uniform")
    assert sample_subnets(config, space, 70)[2] == sample_subnets(uniform, space, 70)[0]


def test_sampling_is_a_function_of_seed_and_iteration(tmp_path):
    space = default_space("vit_t")
    config = tiny_config(tmp_path, iterations=100, phase1_iterations=50)
    forward = [sample_subnets(config, space, i) for i in range(100)]
    backward = [sample_subnets(config, space, i) for i in reversed(range(100))][::-1]
    assert forward == backward
    assert len({s[0] for s in forward}) == 100
    other_seed = [sample_subnets(replace(config, seed=1), space, i) for i in range(100)]
    assert sum(a != b for a, b in zip(forward, other_seed)) == 100


def test_batch_indices_split_one_global_batch_across_ranks(tmp_path):
    config = tiny_config(tmp_path, batch_size=2)
    for iteration in range(6):
        epoch, single = batch_indices(replace(config, batch_size=4), 40, iteration, 0, 1)
        ranks = [batch_indices(config, 40, iteration, rank, 2) for rank in (0, 1)]
        assert all(e == epoch for e, _ in ranks)
        assert ranks[0][1] + ranks[1][1] == single and not set(ranks[0][1]) & set(ranks[1][1])
    assert batch_indices(config, 40, 3, 0, 1) == batch_indices(config, 40, 3, 0, 1)


# --- resume, divergence ----------------------------------------------------------------------------------

def test_resume_after_sigkill_ends_with_the_same_weights(progressive_run, tmp_path):
    reference, spy = progressive_run
    threads = ("--threads", str(spy.threads))  # sums in another thread count round differently
    run = tmp_path / "killed"
    checkpoint = run / "checkpoints" / "last.pt"
    process = subprocess.Popen([sys.executable, "-m", "qsamc.cli.main", *threads, "train", *FLAGS, "--quiet",
                                "--out", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not checkpoint.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    killed_at = load_state(checkpoint)["iteration"]
    assert killed_at < 6
    assert not (run / "supernet.pt").exists()

    resumed = cli(*threads, "train", "--out", str(run), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(load_state(run / "supernet.pt"), load_state(reference / "supernet.pt"))
    assert [r["loss"] for r in metric_rows(run)] == [r["loss"] for r in metric_rows(reference)]
    assert [r["iteration"] for r in metric_rows(run)] == [str(i) for i in range(1, 7)]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(progressive_run, tmp_path, monkeypatch):
    reference, _ = progressive_run
    config = tiny_config(tmp_path, checkpoint_every=1)
    calls = []
    original = heads.segmentation_loss  # the loss the light head's training loss calls

    def poisoned(logits, masks, ignore_index):
        calls.append(1)
        loss = original(logits, masks, ignore_index)
        return loss * float("nan") if len(calls) >= 5 else loss

    with pytest.MonkeyPatch.context() as patch:
        spy = TrainSpy(patch)
        patch.setattr(heads, "segmentation_loss", poisoned)
        with pytest.raises(TrainingDiverged) as error:
            train(config, show_progress=False)
    assert isinstance(error.value, QsamcError)
    message = str(error.value)
    assert "nan" in message and "iteration 5" in message and "\n" not in message
    assert str(tmp_path / "checkpoints" / "last.pt") in message
    assert sorted(spy.checkpoints) == [1, 2, 3, 4] and len(spy.steps) == 4
    last = tmp_path / "checkpoints" / "last.pt"
    assert last.read_bytes() == spy.checkpoints[4]
    assert load_state(last)["iteration"] == 4
    assert not (tmp_path / "supernet.pt").exists()
    # The kept checkpoint is good: resuming from it finishes exactly like the run that never diverged.
    train(config, resume=True, show_progress=False)
    assert_same_state(load_state(tmp_path / "supernet.pt"), load_state(reference / "supernet.pt"))


def test_inf_loss_is_divergence_too(tmp_path, monkeypatch):
    monkeypatch.setattr(heads, "segmentation_loss", lambda logits, masks, ignore: logits.sum() * float("inf"))
    with pytest.raises(TrainingDiverged, match="iteration 1;"):
        train(tiny_config(tmp_path, iterations=2, phase1_iterations=1), show_progress=False)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


# --- DDP on gloo -----------------------------------------------------------------------------------------

DDP_PROBE = textwrap.dedent("""
    # Runs `qsamc train` under torchrun and records, per rank, the subnets sampled and the batch indices of
    # each iteration, and the parameters the rank ends training with.
    import json, os, sys
    import torch
    import qsamc.training.train as T

    rank, out = int(os.environ["RANK"]), sys.argv[1]
    record = {"world": int(os.environ["WORLD_SIZE"]), "subnets": {}, "indices": {}}
    original_sample, original_indices, original_evaluate = T.sample_subnets, T.batch_indices, T.evaluate_subnet

    def sample(config, space, iteration):
        subnets = original_sample(config, space, iteration)
        record["subnets"][iteration] = [s.to_json() for s in subnets]
        return subnets

    def indices(config, size, iteration, rank_, world):
        result = original_indices(config, size, iteration, rank_, world)
        record["indices"][iteration] = [rank_, world, result[1]]
        return result

    def evaluate(model, subnet, data):
        if "saved" not in record:
            torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
            record["saved"] = True
        return original_evaluate(model, subnet, data)

    T.sample_subnets, T.batch_indices, T.evaluate_subnet = sample, indices, evaluate
    from qsamc.cli.main import main
    sys.argv = ["qsamc", *sys.argv[2:]]
    try:
        main()
    finally:
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump(record, handle)
""")


def test_ddp_on_gloo_samples_the_same_subnets_and_keeps_ranks_in_sync(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE)
    run = tmp_path / "run"
    flags = ["--iterations", "3", "--phase1-iterations", "1", "--checkpoint-every", "2", "--batch-size", "1",
             "--val-limit", "2", "--calibration-batches", "1", "--quiet", "--out", str(run)]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(probe), str(tmp_path), "train", *flags],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2]
    assert sorted(records[0]["subnets"], key=int) == ["0", "1", "2"]
    assert records[0]["subnets"] == records[1]["subnets"]  # every rank trains the same subnet each step
    for iteration in ("0", "1", "2"):
        (r0, w0, i0), (r1, w1, i1) = records[0]["indices"][iteration], records[1]["indices"][iteration]
        assert (r0, w0, r1, w1) == (0, 2, 1, 2)
        assert i0 != i1  # each rank trained on its own share of the batch...
    states = [load_state(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert any(".lora." in k for k in states[0])  # the run crossed the progressive boundary
    assert_same_state(*states)  # ...yet the averaged gradients kept them identical
    assert_same_state(states[0], load_state(run / "supernet.pt"))
    assert [int(r["iteration"]) for r in metric_rows(run)] == [1, 2, 3]
    assert load_state(run / "checkpoints" / "last.pt")["iteration"] == 3


# --- config files, flags and the CLI -----------------------------------------------------------------------

def test_yaml_and_toml_configs_load_and_flags_override_them(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("iterations: 12\nphase1_iterations: 4\nlora_variant: selective\n"
                         "lora_modules: [attn.qkv, mlp.lin1]\nper_channel: true\nlr: 0.0005\n")
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('iterations = 12\nphase1-iterations = 4\nlora_variant = "selective"\n'
                         'lora_modules = ["attn.qkv", "mlp.lin1"]\nper_channel = true\nlr = 0.0005\n')
    for path in (yaml_file, toml_file):
        config = load_train_config(path)
        assert (config.iterations, config.phase1_iterations, config.lora_variant) == (12, 4, "selective")
        assert config.lora_modules == ("attn.qkv", "mlp.lin1") and config.per_channel is True and config.lr == 5e-4
        assert config.lora.modules == ("attn.qkv", "mlp.lin1") and config.lora.variant == "selective"
        flagged = load_train_config(path, parse_flags(["--iterations", "20", "--lora-variant=regular", "--seed", "3"]))
        assert (flagged.iterations, flagged.lora_variant, flagged.seed, flagged.phase1_iterations) == (20, "regular", 3, 4)
        resolved = resolve_train_config(path, {"out": str(tmp_path / "x"), "lora_detach": True}, resume=False)
        assert resolved.out == str(tmp_path / "x") and resolved.lora_detach is True and resolved.iterations == 12


@pytest.mark.parametrize("text,match", [
    ("iterations: 5\nbogus_field: 1\n", "unknown config field 'bogus_field'"),
    ("iterations: ten\n", "config field 'iterations' expects int, got 'ten'"),
    ("batch_size: 2.5\n", "config field 'batch_size' expects int"),
    ("schedule: sometimes\n", "schedule must be one of progressive, lora, full, fp32, got 'sometimes'"),
    ("lora_variant: double\n", "lora_variant must be one of"),
    ("iterations: 10\nphase1_iterations: 10\n", "0 < phase1_iterations < iterations"),
    ("model: vit_zz\n", "unknown model 'vit_zz'"),
    ("- a list\n", "must hold a mapping"),
    ("iterations: [1\n", "is not valid yaml"),
])
def test_bad_configs_are_one_sentence(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as error:
        load_train_config(path)
    assert "\n" not in str(error.value)


def test_missing_files_and_foreign_configs_are_one_sentence(tmp_path):
    (tmp_path / "other.json").write_text('{"format": "qsamc.train_config", "version": 9, "iterations": 3}')
    with pytest.raises(ConfigError, match=r"^config file .*other.json is not a qsamc training config of version 1, 2, 3, 4, 5, 6 or 7$"):
        load_train_config(tmp_path / "other.json")
    saved = tmp_path / "config.json"  # what a run writes is read back whole
    saved.write_text(json.dumps(TrainConfig(iterations=7, phase1_iterations=3, lora_modules=("attn.qkv",)).to_json()))
    assert load_train_config(saved) == TrainConfig(iterations=7, phase1_iterations=3, lora_modules=("attn.qkv",))
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("iterations = = 3\n")
    with pytest.raises(ConfigError, match="not valid toml"):
        load_train_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="cannot resume: .*config.json does not exist") as error:
        resolve_train_config(None, {"out": str(tmp_path / "never")}, resume=True)
    assert "\n" not in str(error.value)


def test_cli_train_bad_flag_exits_2_without_traceback():
    result = cli("train", "--bogus", "1", timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: No such option: --bogus") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_resume_without_a_run_is_one_sentence(tmp_path, monkeypatch, capsys):
    from qsamc.cli import main as cli_main

    monkeypatch.setattr(sys, "argv", ["qsamc", "train", "--out", str(tmp_path / "none"), "--resume", "--quiet"])
    with pytest.raises(SystemExit) as exit_:
        cli_main.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume:") and err.count("\n") == 1 and "Traceback" not in err


def test_step_sizes_learn_at_a_rate_relative_to_their_size_and_without_weight_decay():
    """Adam moves a parameter by about its learning rate per step: an 8-bit weight step size (~1e-4)
    needs a learning rate ~1e-4 times smaller than the weights', a 2-bit one a larger one."""
    from qsamc.training.runs import SupernetSpec, build_model
    from qsamc.supernet.quant import LsqActQuantizer, LsqWeightQuantizer

    model, _ = build_model(SupernetSpec(default_space("vit_t"), 4, None))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = T.param_groups(model, params, 1e-3, 0.01)
    held = [id(p) for g in groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in params)  # each trainable parameter exactly once
    assert groups[0]["weight_decay"] == 0.01 and all(g["weight_decay"] == 0.0 for g in groups[1:])
    scales = {(type(m).__name__, m.bits): m for m in model.modules() if isinstance(m, (LsqWeightQuantizer, LsqActQuantizer))}
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    for (kind, bits), module in scales.items():
        same = [m.scale for m in model.modules() if type(m).__name__ == kind and getattr(m, "bits", None) == bits]
        mean = float(torch.cat([s.detach().reshape(-1) for s in same]).abs().mean())
        assert by_param[id(module.scale)] == pytest.approx(1e-3 * mean)
    w8 = next(m for (k, b), m in scales.items() if k == "LsqWeightQuantizer" and b == 8)
    w2 = next(m for (k, b), m in scales.items() if k == "LsqWeightQuantizer" and b == 2)
    assert by_param[id(w8.scale)] < by_param[id(w2.scale)] / 16


# --- devices and precision: the CUDA code paths, exercised on the CPU through the same code ----------


def test_training_device_resolves_the_device_and_the_autocast_type(tmp_path):
    cpu = tiny_config(tmp_path, device="cpu")
    assert T.training_device(cpu) == (torch.device("cpu"), None)
    assert T.training_device(replace(cpu, precision="bf16")) == (torch.device("cpu"), torch.bfloat16)
    if not torch.cuda.is_available():
        assert T.training_device(tiny_config(tmp_path)) == (torch.device("cpu"), None)  # auto: fp32 on the CPU
        with pytest.raises(ConfigError, match="^device cuda was asked for, but torch sees no CUDA GPU here$"):
            T.training_device(tiny_config(tmp_path, device="cuda"))
    with pytest.raises(ConfigError, match="^precision must be one of auto, fp32, bf16, got 'fp16'$"):
        tiny_config(tmp_path, precision="fp16")


def test_quantizers_stay_fp32_under_bf16_autocast_and_the_recomputing_backward_runs_in_it(monkeypatch):
    """Under autocast the layer's GEMM runs in bf16, but its input and weight are quantized in FP32 (an
    8-bit grid needs more than bf16's 8-bit mantissa), and backward recomputes under the same autocast."""
    from lowering_helpers import dyadic_input, dyadic_layer
    from qsamc.supernet import fused

    layer = dyadic_layer(8, 8).train()
    x = dyadic_input((2, 5, 64)).requires_grad_(True)
    seen = []
    quantize = fused._lsq
    monkeypatch.setattr(fused.Fusion, "mode", "off")  # the eager functions, whose calls can be watched
    monkeypatch.setattr(fused, "_lsq", lambda v, *args: seen.append((v.dtype, quantize(v, *args).dtype)) or quantize(v, *args))
    quantizer = layer.act_quantizer[8]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert len(seen) == 2  # the input and the weight
    y.float().sum().backward()
    assert len(seen) == 4 and set(seen) == {(torch.float32, torch.float32)}  # and their recompute in backward
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert quantizer.scale.grad.dtype == torch.float32 and quantizer.scale.dtype == torch.float32
    # the same gradients as an FP32 step, to bf16 precision of the GEMMs
    reference = dyadic_layer(8, 8).train()
    x32 = x.detach().clone().requires_grad_(True)
    reference(x32).sum().backward()
    torch.testing.assert_close(x.grad, x32.grad, rtol=2e-2, atol=2e-2 * float(x32.grad.abs().max()))


def test_bf16_training_runs_end_to_end_on_the_cpu(tmp_path):
    result = train(tiny_config(tmp_path, iterations=2, phase1_iterations=1, checkpoint_every=2, device="cpu",
                               precision="bf16"), show_progress=False)
    losses = [float(row["loss"]) for row in metric_rows(tmp_path)]
    assert len(losses) == 2 and all(map(lambda v: v == v and v < 10, losses))
    model, _, _ = load_supernet(tmp_path)
    assert {p.dtype for n, p in model.named_parameters() if "quantizer" in n} == {torch.float32}
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == "bf16"
    assert 0 <= result.max_subnet.miou <= 1


# --- run folders: never clobbered, one writer, Ctrl-C saves ------------------------------------------


def test_a_fresh_train_into_a_run_folder_refuses_and_overwrite_replaces_it(progressive_run, tmp_path):
    reference, _ = progressive_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    refused = cli("train", *FLAGS, "--quiet", "--out", str(run))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr == (f"error: {run} already holds a training run (config.json, supernet.json, supernet.pt, "
                              "validation.json, metrics.csv, checkpoints); continue it with --resume or replace it "
                              "with --overwrite\n")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    replaced = cli("train", *FLAGS, "--iterations", "2", "--phase1-iterations", "1", "--checkpoint-every", "2",
                   "--quiet", "--out", str(run), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert [r["iteration"] for r in metric_rows(run)] == ["1", "2"]  # the new run only, not mixed with the old
    (tmp_path / "file").write_text("x")
    assert cli("train", "--quiet", "--out", str(tmp_path / "file")).stderr == \
        f"error: --out {tmp_path / 'file'} is a file; give a folder for the run\n"


def test_one_writer_per_run_folder_and_a_dead_writer_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    with runs.run_lock(run):
        with pytest.raises(ConfigError, match=f"^another qsamc train is writing to {run}; wait for it"):
            with runs.run_lock(run):
                pass
        other = cli("train", *FLAGS, "--quiet", "--out", str(run))  # another process, same folder
        assert other.returncode == 2 and other.stderr.startswith(f"error: another qsamc train is writing to {run}")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, qsamc.training.runs as runs
        from pathlib import Path
        with runs.run_lock(Path({str(run)!r})):
            print("locked", flush=True); time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    holder.stdout.close()
    with runs.run_lock(run):  # the OS released the killed process's lock
        pass


# Iterations of the run the signal tests stop: enough that the signal, sent once the first iteration is logged,
# lands well before the end, and few enough that the resumed run finishes quickly.
STOP_RUN = 8


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint_at_the_iteration_boundary_and_resume_finishes(tmp_path, signum):
    run = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, "-m", "qsamc.cli.main", "train", *FLAGS, "--checkpoint-every", "100",
                                "--iterations", str(STOP_RUN), "--quiet", "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not (run / "metrics.csv").exists() or len(metric_rows(run)) < 1:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no iteration finished"
            time.sleep(0.02)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=240)
    finally:
        process.kill()
    stopped_at = load_state(run / "checkpoints" / "last.pt")["iteration"]
    assert process.returncode == 130 and 1 <= stopped_at < STOP_RUN
    assert stderr == (f"error: {signal.Signals(signum).name} stopped training after iteration {stopped_at} of {STOP_RUN}; its "
                      f"checkpoint is saved in {run / 'checkpoints' / 'last.pt'}: continue with qsamc train --resume "
                      f"--out {run}\n")
    assert len(metric_rows(run)) == stopped_at
    resumed = cli("train", "--out", str(run), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["iteration"] for r in metric_rows(run)] == [str(i) for i in range(1, STOP_RUN + 1)]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--seed", "-1", "seed must be 0 or more, got -1"),
    ("--lr", "nan", "lr must be a finite number above 0, got nan"),
    ("--val-limit", "0", "val_limit must be at least 1, got 0"),
    ("--lora-modules", "nonexistent.mod", "lora_modules must name some of attn.qkv, attn.proj, mlp.lin1, mlp.lin2, "
                                          "got nonexistent.mod"),
])
def test_unchecked_values_are_refused_before_anything_is_written(tmp_path, flag, value, message):
    result = cli("train", "--quiet", "--out", str(tmp_path / "run"), flag, value)
    assert result.returncode == 2 and result.stderr == f"error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_resume_takes_the_saved_config_and_refuses_other_flags(progressive_run, tmp_path):
    reference, _ = progressive_run
    with pytest.raises(ConfigError, match=r"^--resume continues the run with its saved config; it takes --out \(or "
                                          r"--config\) only, not --lr \(start a new run for other settings\)$"):
        resolve_train_config(None, {"out": str(reference), "lr": 0.5}, resume=True)
    assert resolve_train_config(None, {"out": str(reference)}, resume=True).iterations == 6


def test_resume_from_a_plain_state_dict_is_one_sentence(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"weight": torch.zeros(2)}, run / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=r"^cannot resume: .*last.pt is not a qsamc training checkpoint \(it needs "
                                              r"iteration, model, optimizer, scheduler\)$"):
        runs.load_checkpoint(run)


@pytest.mark.parametrize("rest_lr", [None, 1e-4])
def test_the_lora_phase_trains_the_adapters_at_lora_lr_and_the_rest_at_lora_rest_lr(rest_lr):
    from qsamc.training.runs import SupernetSpec, build_model
    from qsamc.supernet.lora import LowRank
    from qsamc.supernet.quant import LsqActQuantizer, LsqWeightQuantizer

    config = TrainConfig(lora_lr=1e-3, lora_rest_lr=rest_lr, weight_decay=0.01)
    model, _ = build_model(SupernetSpec(default_space("vit_t"), 4, config.lora))
    optimizer, _ = T._optimizer(config, model, True, 10)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    rest = 1e-3 if rest_lr is None else rest_lr
    adapters = [p for m in model.modules() if isinstance(m, LowRank) for p in m.parameters()]
    head = [p for n, p in model.head.named_parameters() if not T.is_quantizer_state(n)]  # its own weights
    assert adapters and head
    assert all(by_param[id(p)] == (1e-3, 0.01) for p in adapters)
    assert all(by_param[id(p)] == (rest, 0.01) for p in head)
    for kind in (LsqWeightQuantizer, LsqActQuantizer):
        same = [m for m in model.modules() if isinstance(m, kind) and m.bits == 4]
        mean = float(torch.cat([m.scale.detach().reshape(-1) for m in same]).abs().mean())
        assert by_param[id(same[0].scale)] == (pytest.approx(rest * mean), 0.0)
    offsets = [m.offset for m in model.modules() if isinstance(m, LsqActQuantizer)]
    assert all(by_param[id(p)] == (rest, 0.0) for p in offsets)
    # The pre-trained weights are frozen in the LoRA phase: in no group.
    assert not any(id(p) in by_param for n, p in model.named_parameters() if n.endswith("attn.qkv.weight"))
    # Without a rate of their own, the adapters share the head's group, as before the option.
    assert (len(optimizer.param_groups) == len(T.param_groups(model, [p for p in model.parameters() if p.requires_grad],
                                                               1e-3, 0.01))) == (rest_lr is None)


def test_lora_rest_lr_must_be_a_positive_number():
    with pytest.raises(ConfigError, match=r"^lora_rest_lr must be a finite number above 0, got 0.0$"):
        load_train_config(None, {"lora_rest_lr": "0"})
