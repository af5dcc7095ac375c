"""On a CUDA GPU: train -> search -> export end to end, the training kernels against segment-anything's
attention at vit_b / vit_l shapes in FP32 and bf16, and a run trained on the GPU searched on the CPU.

Skipped where torch sees no CUDA GPU (this project's CI has none). Sized for one device call of under
5 minutes: `python -m pytest -q tests/test_gpu.py`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import TINY_TRAIN, parse_flags, randomize_
from qsamc.sam import Attention
from qsamc.supernet import kernels as training_kernels
from qsamc.supernet.kernels import SupernetAttention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    peak = b.abs().max()
    return float((a - b).abs().max() / peak) if peak > 0 else float(a.abs().max())


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """A tiny supernet trained on the GPU (bf16 autocast: `precision auto` on CUDA)."""
    from qsamc.training.config import load_train_config
    from qsamc.training.train import train

    run = tmp_path_factory.mktemp("gpu") / "run"
    config = replace(load_train_config(None, parse_flags(TINY_TRAIN)), out=str(run), device="cuda", iterations=4,
                     phase1_iterations=2, checkpoint_every=2)
    result = train(config, show_progress=False)
    return run, result


def test_train_on_cuda_writes_a_run_that_search_and_export_read(gpu_run, tmp_path):
    from qsamc.pipeline import export_subnet, run_search
    from qsamc.search.evolution import EvolutionConfig

    run, result = gpu_run
    assert (run / "supernet.json").is_file() and (run / "validation.json").is_file()
    assert math.isfinite(result.max_subnet.loss) and math.isfinite(result.min_subnet.miou)
    config = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=2)
    searched, written = run_search(run, "cpu", True, False, ["30G"], tmp_path / "search", val_limit=4, config=config,
                                   device="cuda")
    assert written and math.isfinite(searched.results[0].best.evaluation.loss)
    report = export_subnet(run, tmp_path / "search" / "best-30G.json", "cpu", "onnx", tmp_path / "export",
                           samples=1, dataset="synthetic", val_limit=4, device="cuda")
    assert report.task is not None and report.task.ok and all(p.ok for p in report.parts)


def test_a_gpu_run_loads_and_searches_on_the_cpu(gpu_run, tmp_path):
    """Trained on the GPU, searched on a machine without one: the same candidates score the same (to float
    reduction order), and the supernet's tensors load onto the CPU."""
    from qsamc.pipeline import run_search
    from qsamc.search.evolution import EvolutionConfig
    from qsamc.training.runs import load_supernet

    run, _ = gpu_run
    model, _, _ = load_supernet(run)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    config = EvolutionConfig(population=4, top_k=2, mutations=2, crossovers=2, generations=1)
    on_cpu, _ = run_search(run, "cpu", True, False, ["30G"], tmp_path / "cpu", val_limit=4, config=config, device="cpu")
    on_gpu, _ = run_search(run, "cpu", True, False, ["30G"], tmp_path / "gpu", val_limit=4, config=config, device="cuda")
    cpu_best, gpu_best = on_cpu.results[0].best, on_gpu.results[0].best
    assert cpu_best.subnet == gpu_best.subnet
    assert abs(cpu_best.evaluation.loss - gpu_best.evaluation.loss) < 1e-3 * max(1.0, abs(cpu_best.evaluation.loss))
    saved = json.loads((tmp_path / "cpu" / "pareto.json").read_text())
    assert saved["best"][0]["subnet_file"] == "best-30G.json"


@pytest.mark.parametrize("model", ["vit_b", "vit_l"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [True, False])
def test_training_kernel_equals_segment_anything_on_cuda(monkeypatch, model, dtype, window):
    """One attention of `model` at 1024 px (windowed: 14x14 tokens; global: 64x64), forward and every
    gradient: FP32 to 1e-5 of the peak, bf16 autocast to bf16 rounding (3%)."""
    from qsamc.sam import get_config

    monkeypatch.setattr(training_kernels, "FOLD_FROM_ELEMENTS", 0)
    config = get_config(model)
    side = 14 if window else 64
    dim, heads = config.embed_dim, config.num_heads
    reference = randomize_(Attention(dim, heads, use_rel_pos=True, input_size=(side, side)), seed=side).cuda()
    kernel = SupernetAttention.from_sam(copy.deepcopy(reference)).train()
    x = torch.randn(1 if not window else 4, side, side, dim, generator=torch.Generator().manual_seed(1)).cuda()
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out_ref, out_new = reference(x_ref), kernel(x_new)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_new.backward(grad)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert _relative(out_new, out_ref) < tolerance
    assert _relative(x_new.grad, x_ref.grad) < tolerance
    kernel_params = dict(kernel.named_parameters())
    for name, param in reference.named_parameters():
        assert _relative(kernel_params[name].grad, param.grad) < tolerance, name


def test_distilled_l2sp_training_modelopt_qat_and_sensitivity_run_on_cuda(fp32_reference_run, tmp_path):
    """The recipe's distillation terms and weight anchor, ModelOpt QAT and the sensitivity scores on the GPU."""
    pytest.importorskip("modelopt.torch.quantization")
    from qsamc.baselines import QatSettings, run_baselines
    from qsamc.search.sensitivity import FLOAT, measure_sensitivity
    from qsamc.task.data import build_dataset
    from qsamc.task.evaluate import ValidationSet
    from qsamc.training.config import load_train_config
    from qsamc.training.runs import load_supernet
    from qsamc.training.train import train

    run = tmp_path / "distilled"
    config = replace(load_train_config(None, parse_flags(TINY_TRAIN)), out=str(run), device="cuda",
                     checkpoint=str(fp32_reference_run), distill="reference", label_weight=0.0, feature_weight=1.0,
                     l2sp=10.0)
    train(config, show_progress=False)
    model, _, spec = load_supernet(run)
    model.to("cuda")
    sensitivity = measure_sensitivity(model, spec.space, ValidationSet(build_dataset("synthetic", None, "val"), 2))
    assert all(scores[FLOAT] == 0 and scores[(2, 2)] > 0 for scores in sensitivity.scores.values())
    found = run_baselines(fp32_reference_run, "synthetic", None, tmp_path / "peers", methods=("modelopt-qat",),
                          ptq_bits=((4, 4),), calibration=2, val_limit=2, device="cuda",
                          qat=QatSettings(iterations=2, batch_size=1))
    assert [r.label for r in found] == ["FP32 reference", "ModelOpt QAT W4A4"]


@pytest.mark.parametrize("case", [0, 4, 5])
def test_compiled_training_kernels_equal_the_eager_ones_on_cuda(case, monkeypatch):
    """`qsamc.supernet.fused` compiled into Triton kernels (what auto does on CUDA) against the eager
    functions, under bf16 autocast."""
    from test_fused import assert_compiled_equals_eager_under_autocast

    assert_compiled_equals_eager_under_autocast(case, "cuda", monkeypatch)
