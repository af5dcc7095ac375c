"""Search on a real (tiny, calibrated, untrained) vit_t supernet, through the library and `qsamc search`."""

import json

import pytest
import torch

from qsamc.training.runs import load_supernet
from qsamc.search.cost import BitopsCost, Budget
from qsamc.task.data import SyntheticConfig, build_dataset
from qsamc.task.evaluate import ValidationSet, evaluate_subnet
from qsamc.search.evolution import EvolutionConfig, SubnetFitness, search
from qsamc.supernet.space import default_space, load_subnet

TINY_SEARCH = ["--population", "4", "--top-k", "2", "--mutations", "2", "--crossovers", "2", "--generations", "2",
               "--val-limit", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def run_folder(calibrated_run):
    """A calibrated, untrained vit_t supernet saved as a training run: the session's `calibrated_run` (shared:
    a test that writes into it works on a copy). This module's searches run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards; more threads only contend on shared CI machines
    torch.manual_seed(0)
    yield calibrated_run
    torch.set_num_threads(threads)


@pytest.fixture
def qsamc(run_cli):
    return run_cli


def test_real_fitness_is_the_validation_loss_and_cached(run_folder):
    model, ir, spec = load_supernet(run_folder)
    space = spec.space
    data = ValidationSet(build_dataset("synthetic", None, "val", synthetic=SyntheticConfig(count=2)), batch_size=2)
    fitness = SubnetFitness(model, data)
    config = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=2, seed=1)
    budget = Budget("bitops", 40e9)
    result = search(space, [BitopsCost(ir, space)], fitness, [budget], config)
    best = result.results[0].best
    assert best.costs["bitops"] <= budget.limit
    assert best.evaluation == evaluate_subnet(model, best.subnet, data)
    assert best.evaluation.loss == min(c.evaluation.loss for c in result.candidates if c.costs["bitops"] <= budget.limit)


def test_qsamc_search_writes_subnets_pareto_json_and_plot(run_folder, tmp_path, qsamc):
    out = tmp_path / "search"
    code, stdout, _ = qsamc("search", "--supernet", str(run_folder), "--target", "a100", "--bitops", "--restrict",
                            "--budget", "25G", "--budget", "60G", "--out", str(out), *TINY_SEARCH)
    assert code in (0, None), stdout
    space = default_space("vit_t")
    for name in ("best-25G.json", "best-60G.json"):
        subnet = load_subnet(out / name)
        space.validate(subnet)
        assert {b.a for b in subnet.bits} <= {8, 32}  # --restrict: what an A100 runs well
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["target"] == "a100" and pareto["evaluations"] == len(pareto["candidates"])
    first = pareto["candidates"][0]
    assert set(first) == {"subnet", "costs", "deployed", "loss", "miou", "pixel_accuracy"}
    assert all(" -> " in v for v in first["deployed"].values())
    assert (out / "pareto.png").stat().st_size > 1000
    assert "best-25G.json" in stdout


def test_qsamc_search_without_budget_uses_a_ladder(run_folder, tmp_path, qsamc):
    out = tmp_path / "ladder"
    code, stdout, _ = qsamc("search", "--supernet", str(run_folder), "--target", "cpu", "--bitops", "--out", str(out),
                            *TINY_SEARCH)
    assert code in (0, None), stdout
    assert len(json.loads((out / "pareto.json").read_text())["best"]) == 5


def test_qsamc_search_under_bitops_and_estimated_latency_together(run_folder, tmp_path, qsamc):
    out = tmp_path / "both"
    code, stdout, _ = qsamc("search", "--supernet", str(run_folder), "--target", "h100", "--restrict", "--bitops",
                            "--latency", "--estimate", "--budget", "40G", "--budget", "60G", "--budget", "0.05ms",
                            "--out", str(out), *TINY_SEARCH)
    assert code in (0, None), stdout
    pareto = json.loads((out / "pareto.json").read_text())
    assert [b["budgets"] for b in pareto["best"]] == [["40G", "0.05ms"], ["60G", "0.05ms"]]
    assert "estimate" in pareto["cost_models"]["latency"]
    for best in pareto["best"]:
        costs = pareto["candidates"][best["candidate"]]["costs"]
        assert costs["latency"] <= 0.05e-3 and costs["bitops"] <= float(best["budgets"][0][:-1]) * 1e9


@pytest.mark.parametrize("args, message", [
    (["--target", "tpu", "--bitops"], "error: unknown target 'tpu'; known targets are a100, cpu, cpu-avx2, h100, orin\n"),
    (["--target", "a100", "--bitops", "--budget", "lots"], "error: cannot read the budget 'lots'"),
    (["--target", "a100", "--bitops", "--budget", "1G"],
     "error: no vit_t subnet meets the bitops budget 1G: the cheapest achievable is "),
    (["--target", "a100", "--bitops", "--budget", "40ms"], "error: the budget 40ms is a latency budget; add --latency"),
    (["--target", "a100"], "error: choose what to constrain: --bitops, --latency or both\n"),
    (["--target", "cpu", "--latency", "--budget", "40ms"], "build one with `qsamc profile --target cpu --model vit_t`\n"),
    (["--target", "cpu", "--latency", "--estimate"], "error: target cpu has no datasheet peaks"),
])
def test_search_user_errors_are_one_sentence(run_folder, tmp_path, qsamc, monkeypatch, args, message):
    monkeypatch.setenv("QSAMC_LATENCY_DIR", str(tmp_path / "no-tables"))
    code, _, stderr = qsamc("search", "--supernet", str(run_folder), "--out", str(tmp_path / "o"), *args, *TINY_SEARCH)
    assert code == 2
    assert message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr


def test_search_on_a_folder_that_is_no_run(tmp_path, qsamc):
    code, _, stderr = qsamc("search", "--supernet", str(tmp_path), "--target", "a100", "--bitops")
    assert code == 2 and stderr == f"error: {tmp_path} is not a qsamc training run: supernet.json is missing\n"


def test_profile_tensorrt_without_tensorrt_is_one_sentence(qsamc, tmp_path):
    code, _, stderr = qsamc("profile", "--target", "a100", "--out", str(tmp_path / "t.json"))
    assert code == 2
    assert stderr == "error: the tensorrt latency backend cannot run here: TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)\n"


def test_profile_clock_needs_one_thread(qsamc, tmp_path):
    code, _, stderr = qsamc("profile", "--target", "cpu", "--threads", "2", "--out", str(tmp_path / "t.json"))
    assert code == 2 and "use --threads 1, or --clock wall" in stderr


@pytest.mark.parametrize("option, message", [("--batch-size", "error: --batch-size must be at least 1, got 0\n"),
                                             ("--val-limit", "error: --val-limit must be at least 1, got 0\n")])
def test_search_refuses_empty_evaluations_before_any_work(run_folder, tmp_path, qsamc, option, message):
    code, _, stderr = qsamc("search", "--supernet", str(run_folder), "--target", "cpu", "--bitops",
                            "--out", str(tmp_path / "o"), option, "0")
    assert code == 2 and stderr == message and not (tmp_path / "o").exists()


def test_search_defaults_to_the_runs_dataset_and_refuses_another_class_count(run_folder, tmp_path, qsamc):
    import shutil
    from pathlib import Path

    # This test writes the run's config.json: into a copy, so that the session's shared run stays as it is.
    run_folder = Path(shutil.copytree(run_folder, tmp_path / "run"))
    camvid = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
    code, _, stderr = qsamc("search", "--supernet", str(run_folder), "--target", "cpu", "--bitops", "--dataset",
                            "camvid", "--data-root", str(camvid), "--out", str(tmp_path / "o"), *TINY_SEARCH)
    assert code == 2 and stderr == (f"error: the supernet in {run_folder} predicts 4 classes but the camvid data has 11: "
                                    "pass the dataset it was trained on (--dataset, --data-root)\n")
    from qsamc.pipeline import training_dataset

    (run_folder / "config.json").write_text(json.dumps({"dataset": "camvid", "data_root": str(camvid)}))
    try:
        assert training_dataset(run_folder) == ("camvid", camvid)
        code, _, stderr = qsamc("search", "--supernet", str(run_folder), "--target", "cpu", "--bitops",
                                "--out", str(tmp_path / "o"), *TINY_SEARCH)
        assert code == 2 and "but the camvid data has 11" in stderr  # the run's own data, read from its folder
    finally:
        (run_folder / "config.json").unlink()
