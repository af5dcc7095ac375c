"""The pipelines behind the CLI commands, each one short linear function a newcomer reads top to bottom.

analysis (`qsamc space`, `qsamc bitops`, `qsamc ir`): `qsamc.ir.frontend` builds the supernet on the meta
device (no weights are needed to count) -> trace -> annotate structure and precision -> count BitOPs.
search (`qsamc search`) and latency tables (`qsamc profile`): at the end of this file.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch

from qsamc.distributed import init_distributed, module_device, resolve_device
from qsamc.errors import BudgetError, ConfigError, TargetError
from qsamc.export import report as export_report
from qsamc.export.emit import export_static
from qsamc.export.ort import ort_latency, ort_session
from qsamc.export.promptable import DecoderReport, DecoderSpec, build_promptable, export_decoder
from qsamc.export.verify import (Fidelity, PartCheck, TaskCheck, check_export, check_parts, check_task,
                                 measure_fidelity, onnx_encoder_forward, verify_fidelity)
from qsamc.fileio import (atomic_write_bytes, atomic_write_json, check_output_file, check_output_folder,
                          check_results_folder, replace_folder)
from qsamc.ir.frontend import analysis_ir, count_bitops
from qsamc.ir.graph import IR
from qsamc.passes import BitopsModel, BitopsReport
from qsamc.passes.count_bitops import FloatMacs
from qsamc.search.cost import BitopsCost, Budget, CostModel, RooflineLatency, parse_budget
from qsamc.search.evolution import (TASK_OBJECTIVES, EvolutionConfig, SearchResult, SubnetFitness, default_ladder,
                                    search)
from qsamc.search.latency_table import LatencyTable, TableLatency, default_table_path
from qsamc.search.sensitivity import measure_sensitivity
from qsamc.search.pareto import is_search_file, write_search
from qsamc.supernet.space import SearchSpace, Subnet, default_space, load_subnet
from qsamc.targets import Target, get_target
from qsamc.task.data import build_dataset
from qsamc.task.evaluate import ReferencePredictions, ValidationSet, evaluate, evaluate_subnet
from qsamc.task.head import SegmentationModel
from qsamc.training.config import ATTENTION_MODES, load_train_config
from qsamc.training.runs import build_model, load_supernet
from qsamc.training.splits import run_config, search_images
from qsamc.training.train import Teacher, TrainResult, train

if TYPE_CHECKING:
    import onnxruntime as ort

    from qsamc.export.tensorrt_engine import BatchProfile
    from qsamc.profiling.profile import Validation
    from qsamc.profiling.timers import ProfileSettings


@dataclass(frozen=True)
class SpaceSummary:
    """What `qsamc space` prints: the operators and their choices, the subnet count, MACs and BitOPs range."""

    operators: dict[str, str]
    log10_subnets: float
    quantized_layers: int
    macs: tuple[int, int]
    bitops: tuple[int, int]


def describe_space(model: str, granularity: str = "layer", attention: str = "float") -> SpaceSummary:
    space = default_space(model, granularity, ATTENTION_MODES[attention])  # type: ignore[arg-type]
    ir = analysis_ir(space)
    costs = BitopsModel(ir, space)
    low, high = costs.cost(space.min_subnet()), costs.cost(space.max_subnet())
    r = space.resolutions
    operators = {
        "resolution": f"[{r[0]}, {r[-1]}; {r[1] - r[0] if len(r) > 1 else 0}]",
        "depth (per stage)": "  ".join(str(list(c)) for c in space.depth_choices),
        "MLP ratio (per block)": str(list(space.mlp_ratios)),
        "weight bits": str(list(space.weight_bits)),
        "activation bits": str(list(space.act_bits)),
        **({"attention bits (q, k, v, softmax)": str(list(space.attention_bits))} if space.quantized_attention else {}),
    }
    return SpaceSummary(operators, space.log10_count(), len(space.quant_layers), (low[0], high[0]), (low[1], high[1]))


def subnet_bitops(model: str, use_max: bool, use_min: bool, subnet_file: Path | None,
                  float_macs: FloatMacs) -> tuple[BitopsReport, Subnet]:
    """What `qsamc bitops` prints: the report of exactly one of --max, --min, --subnet."""
    if use_max + use_min + (subnet_file is not None) != 1:
        raise ConfigError("choose exactly one of --max, --min or --subnet FILE")
    if subnet_file is not None:
        subnet = load_subnet(subnet_file)
        space = subnet_space(model, subnet)
        subnet = space.validate(subnet)
    else:
        space = default_space(model)
        subnet = space.max_subnet() if use_max else space.min_subnet()
    return count_bitops(space, subnet, float_macs)[1], subnet


def subnet_space(model: str, subnet: Subnet) -> SearchSpace:
    """The default space of `model` that holds `subnet`: with attention precision when it sets attention bits."""
    return default_space(model, attention_bits=ATTENTION_MODES["searched" if subnet.attention else "float"])


IR_FILES = ("ir.json", "ir.dot")


def write_ir(model: str, out: Path, subnet_file: Path | None = None, overwrite: bool = False) -> list[Path]:
    """What `qsamc ir` writes: `ir.json` and `ir.dot` in `out` (beside whatever else it holds), with bits and
    costs when a subnet is given; an earlier dump is replaced only with `overwrite`."""
    check_output_folder(out)
    held = [name for name in IR_FILES if (out / name).exists()]
    if held and not overwrite:
        raise ConfigError(f"--out {out} already holds {' and '.join(held)}; replace them with --overwrite or choose "
                          "another folder")
    if subnet_file is not None:
        subnet = load_subnet(subnet_file)
        space = subnet_space(model, subnet)
        ir = count_bitops(space, space.validate(subnet))[0]
    else:
        ir = analysis_ir(default_space(model))
    paths = [out / name for name in IR_FILES]
    out.mkdir(parents=True, exist_ok=True)
    ir.save_json(paths[0])
    paths[1].write_text(ir.to_dot())
    return paths


# --- search (`qsamc search`) and latency tables (`qsamc profile`) ---------------------------------
# search: load the trained supernet -> target (restricted space) -> cost models -> budgets (or a default
# ladder) -> evolutionary search with validation loss as fitness -> best subnets, pareto.json, plot.


def latency_cost(ir: IR, space: SearchSpace, target: Target, table: Path | None, estimate: bool) -> CostModel:
    """The measured table for `target` (given, or at its default path), else the roofline estimate if asked."""
    path = table or default_table_path(target, space.model)
    if path.is_file():
        return TableLatency(LatencyTable.load(path), space, target, source=f"latency table {path}")
    if table is not None:
        raise ConfigError(f"latency table {table} does not exist")
    if estimate:
        return RooflineLatency(ir, space, target)
    hint = "" if target.peaks.memory_gbps is None else ", or pass --estimate for a roofline estimate from datasheet peaks"
    raise ConfigError(f"no latency table for {space.model} on {target.name} at {path}; build one with "
                      f"`qsamc profile --target {target.name} --model {space.model}`{hint}")


def run_search(run: Path, target_name: str, use_bitops: bool, use_latency: bool, budgets: list[str], out: Path,
               *, restrict: bool = False, estimate: bool = False, table: Path | None = None,
               dataset: str | None = None, data_root: Path | None = None, val_limit: int | None = 64,
               batch_size: int = 8, config: EvolutionConfig = EvolutionConfig(),
               on_generation=None, float_macs: FloatMacs = "fp32", split: str = "auto",
               overwrite: bool = False, device: str = "auto") -> tuple[SearchResult, list[Path]]:
    """What `qsamc search` does; returns the result and the files written (none on ranks > 0).
    `float_macs="exclude"` leaves the attention matmuls out of BitOPs (the paper's convention); `split`
    is the images that score the subnets (`auto`: the run's held-out training images where it has them, else
    val; `search_images`). `dataset`
    None: the one the run was trained on (its config.json; synthetic for a run without one). A folder that
    holds an earlier search is replaced (whole, in one step) only with `overwrite`. `device`: where the
    candidates are scored (`auto`: the GPU where torch sees one; one GPU per rank under torchrun)."""
    target = get_target(target_name)
    check_results_folder(out, overwrite, "a search", is_search_file)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if val_limit is not None and val_limit < 1:
        raise ConfigError(f"--val-limit must be at least 1, got {val_limit}")
    parsed = [parse_budget(b) for b in budgets]
    metrics = {"bitops": use_bitops, "latency": use_latency}
    if not any(metrics.values()):
        if not parsed:
            raise ConfigError("choose what to constrain: --bitops, --latency or both")
        metrics = {m: any(b.metric == m for b in parsed) for m in metrics}
    wrong = next((b for b in parsed if not metrics[b.metric]), None)
    if wrong is not None:
        raise BudgetError(f"the budget {wrong} is a {wrong.metric} budget; add --{wrong.metric} to search under it")
    rank, _ = init_distributed(device)
    scoring = resolve_device(device, rank)
    model, ir, spec = load_supernet(run)
    model.to(scoring)
    space = target.restrict_space(spec.space) if restrict else spec.space
    costs: list[CostModel] = []
    if metrics["bitops"]:
        costs.append(BitopsCost(ir, space, float_macs))
    if metrics["latency"]:
        costs.append(latency_cost(ir, space, target, table, estimate))
    parsed = parsed or default_ladder(space, costs[0])
    if dataset is None:
        dataset, data_root = training_dataset(run)
        dataset = dataset or "synthetic"
    config = replace(config, objective=search_objective(run, spec.task, config.objective))
    if config.objective not in TASK_OBJECTIVES[spec.task]:
        *others, last = TASK_OBJECTIVES[spec.task]
        raise ConfigError(f"{run} is {'an' if spec.task == 'instance' else 'a'} {spec.task}-segmentation run; its objectives are "
                          f"{', '.join(others)} or {last}, not {config.objective}")
    images, scored_on = search_images(run, dataset, data_root, split, spec.task)
    if images.num_classes != spec.num_classes:
        raise ConfigError(f"the supernet in {run} predicts {spec.num_classes} classes but the {dataset} data has "
                          f"{images.num_classes}: pass the dataset it was trained on (--dataset, --data-root)")
    data = ValidationSet(images, val_limit, batch_size)
    reference, against = fidelity_reference(run, model, spec, data) if config.objective == "fidelity" else (None, "")
    # Per-layer sensitivity seeds evolution where the light head's per-pixel loss gives its gradients.
    sensitivity = measure_sensitivity(model, space, data) if config.sensitivity_seed and spec.head == "light" else None
    result = search(space, costs, SubnetFitness(model, data, reference), parsed, config,
                    on_generation=on_generation if rank == 0 else None, sensitivity=sensitivity)
    result.scored_on, result.scored_against = scored_on, against
    written = []
    if rank == 0:
        with replace_folder(out) as staging:
            written = [out / p.name for p in write_search(result, space, target, costs, staging)]
    return result, written


def search_objective(run: Path, task: str, objective: str) -> str:
    """`objective`, with `auto` made concrete: fidelity for a semantic run distilled from an FP32 reference
    (where it picked the subnets that kept the most on held-out drives, docs/benchmarks.md), else the
    validation loss (the paper's proxy)."""
    if objective != "auto":
        return objective
    config = run_config(run)
    distilled = config is not None and config.distill == "reference"
    return "fidelity" if task == "semantic" and distilled else "loss"


def fidelity_reference(run: Path, model: SegmentationModel, spec, data: ValidationSet) -> tuple[ReferencePredictions, str]:
    """What `--objective fidelity` scores subnets against, predicted once on the search images at the space's
    largest resolution, and a line that says which: the FP32 reference the run distilled from (its
    `--checkpoint` run, read again), or, for a run without one or whose reference folder is gone, the
    supernet's own largest FP32 subnet."""
    config = run_config(run)
    checkpoint = Path(config.checkpoint) if config is not None and config.distill == "reference" else None
    device = module_device(model)
    if checkpoint is not None and (checkpoint / "supernet.pt").is_file():
        source, against = build_model(spec, checkpoint)[0].to(device), f"the FP32 reference {checkpoint}"
    else:
        gone = f" (its reference {checkpoint} is gone)" if checkpoint is not None else ""
        source, against = model, f"the supernet's largest FP32 subnet{gone}"
    teacher = Teacher(source, spec.space)
    resolution = spec.space.max_subnet().resolution
    return ReferencePredictions.predict(lambda images: teacher(images)[0], data, resolution, device), against


def profile_target(target_name: str, model: str, out: Path | None, settings: ProfileSettings,
                   calibration: int = 10, validate: int = 0, restrict: bool = False,
                   progress=None, attention: str = "float") -> tuple[LatencyTable, Path, list[Validation]]:
    """What `qsamc profile` does: build (and optionally validate) the latency table of a target (the
    profiler is imported here, so `qsamc search` never loads it); `attention="searched"` adds the INT8
    attention entries a supernet trained with `--attention searched` needs."""
    from qsamc.profiling.profile import build_table, validate_table  # deferred: start-up time, search never loads it

    target = get_target(target_name)
    path = out or default_table_path(target, model)
    check_output_file(path)
    space = default_space(model, attention_bits=ATTENTION_MODES[attention])
    space = target.restrict_space(space) if restrict else space
    table = build_table(space, target, settings, calibration, progress)
    table.save(path)
    checks = validate_table(table, space, target, validate, settings=settings) if validate else []
    return table, path, checks


def training_dataset(run: Path) -> tuple[str | None, Path | None]:
    """(dataset, data root) that `run` was trained on, from its config.json; (None, None) when the run
    has no config or its data folder is gone (the task-level export check is then not run)."""
    config = run / "config.json"
    if not config.is_file():
        return None, None
    try:
        data = json.loads(config.read_text())
        dataset, root = data["dataset"], data.get("data_root")
    except (json.JSONDecodeError, KeyError, TypeError):
        return None, None
    if root is not None and not Path(root).is_dir():
        return None, None
    return dataset, None if root is None else Path(root)


# The files an export writes; TensorRT's timing.cache is carried over to the next export and reused.
EXPORT_FILES = ("report.json", "encoder.onnx", "decoder.onnx", "precision.png", "encoder.plan", "timing.cache")


def export_subnet(run: Path, subnet_file: Path, target_name: str, fmt: str, out: Path, samples: int = 2,
                  promptable: bool = False, sam_checkpoint: Path | None = None, dataset: str | None = None,
                  data_root: Path | None = None, val_limit: int | None = 32, batch=None, overwrite: bool = False,
                  device: str = "auto"):
    """What `qsamc export` does: check every input -> extract the static subnet -> lower it to the
    target's integer formats -> emit ONNX -> verify (TensorRT lint; each lowered part alone in ONNX
    Runtime on the PyTorch subnet's own input to it; the whole model; with `dataset`, validation mIoU
    through the head within 0.2 points of the PyTorch subnet's; by default on the run's own validation
    data) -> write model, report and precision map
    -> build the TensorRT engine (`trt`). Nothing is written until all checks pass. Returns the
    `ExportReport`; `report.engine.error()` says why no engine was built.
    `promptable`: also SAM's prompt encoder + mask decoder as `decoder.onnx` (`qsamc.export.promptable`), with
    weights from the whole SAM checkpoint `sam_checkpoint` or freshly initialised, verified in ONNX Runtime
    on the encoder's own embeddings of the sample images (report["decoder"]).
    The encoder's batch axis is dynamic: the whole-model check runs batch 1 and batch 4; `batch` is the
    TensorRT engine's profile (`tensorrt_engine.BatchProfile`, default 1 / 1 / 8). A folder that holds an
    earlier export is replaced only with `overwrite`, and whole: the new export is built beside it and
    swapped in, so a kill at any moment leaves the old export or the new one. `device`: where the task
    check's PyTorch side runs (the encoder's ONNX Runtime side runs on the CPU, its head on `device`)."""
    job = _check_inputs(run, subnet_file, target_name, fmt, out, promptable, sam_checkpoint, dataset, data_root,
                        val_limit, batch, overwrite)
    emitted = _lower_and_emit(job, samples)
    verified = _verify(job, emitted, device)
    decoder = _export_decoder(job, emitted, verified) if promptable else None
    report, data = _report(job, emitted, verified, decoder)
    _write_folder(job, out, report, data, decoder)
    return report


@dataclass(frozen=True)
class _ExportJob:
    """An export's inputs, checked (`_check_inputs`)."""

    target: Target
    fmt: str
    batch: BatchProfile
    subnet: Subnet
    model: SegmentationModel
    ir: IR
    space: SearchSpace
    validation: ValidationSet | None  # the task-level check's data (semantic runs)
    decoder: tuple[DecoderSpec, torch.nn.Module, str] | None  # `promptable`: (spec, model, where its weights came from)


@dataclass(frozen=True)
class _Emitted:
    """The lowered static subnet, its fake-quantized reference and its ONNX model (`_lower_and_emit`), with the
    sample images they are checked on: `images` at batch 1, `batched` at batch 4."""

    images: list[torch.Tensor]
    batched: torch.Tensor
    static: IR
    reference: torch.nn.Module
    model_proto: onnx.ModelProto


@dataclass(frozen=True)
class _Verified:
    """What `_verify` checked, and the ONNX Runtime session that ran the model (it also times it)."""

    lint: list[str]
    session: ort.InferenceSession
    fidelity: Fidelity
    parts: list[PartCheck]
    task: TaskCheck | None


def _check_inputs(run: Path, subnet_file: Path, target_name: str, fmt: str, out: Path, promptable: bool,
                  sam_checkpoint: Path | None, dataset: str | None, data_root: Path | None, val_limit: int | None,
                  batch, overwrite: bool) -> _ExportJob:
    """Every input of an export, checked before any work: the options, the output folder, the subnet and the run,
    the validation data and (`promptable`) the SAM checkpoint, in the order their errors come."""
    from qsamc.export import tensorrt_engine  # deferred: start-up time, search never loads the TensorRT builder

    if sam_checkpoint is not None and not promptable:
        raise ConfigError("--sam-checkpoint is for the prompt encoder and mask decoder: add --promptable")
    batch = batch or tensorrt_engine.BatchProfile()
    target = get_target(target_name)
    if fmt not in target.formats:
        raise TargetError(f"target {target.name} has no '{fmt}' format; it exports {', '.join(target.formats)}")
    if val_limit is not None and val_limit < 1:
        raise ConfigError(f"--val-limit must be at least 1, got {val_limit}")
    check_results_folder(out, overwrite, "an export", lambda name: name in EXPORT_FILES)
    subnet = load_subnet(subnet_file)
    model, ir, spec = load_supernet(run)
    subnet = spec.space.validate(subnet)
    if dataset is None:  # the run's own validation data, where its config says what it was
        dataset, data_root = training_dataset(run)
    # The task-level check scores mIoU through the head; an instance run's export is verified on the encoder.
    validation = (ValidationSet(build_dataset(dataset, data_root, "val"), val_limit)
                  if dataset and spec.task == "semantic" else None)
    decoder = None
    if promptable:  # read the SAM checkpoint before the slow part: its errors come first
        decoder_spec = DecoderSpec.for_subnet(subnet.model, subnet.resolution)
        decoder = (decoder_spec, *build_promptable(decoder_spec, sam_checkpoint))
    return _ExportJob(target, fmt, batch, subnet, model, ir, spec.space, validation, decoder)


def _lower_and_emit(job: _ExportJob, samples: int) -> _Emitted:
    """The sample images (seeded), then extract the static subnet -> the target's lowering passes -> ONNX."""
    resolution = job.subnet.resolution
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, resolution, resolution, generator=generator) for _ in range(samples)]
    batched = torch.randn(4, 3, resolution, resolution, generator=generator)
    static, reference, model_proto = export_static(job.ir, job.space, job.subnet, job.target, images[0])
    return _Emitted(images, batched, static, reference, model_proto)


def _verify(job: _ExportJob, emitted: _Emitted, device: str) -> _Verified:
    """TensorRT lint -> the whole model in ONNX Runtime (batch 1 and 4) -> each lowered part alone -> the
    task metric (on `device`) -> one sentence if any of them fails."""
    target, subnet, images = job.target, job.subnet, emitted.images
    lint = target.lint(emitted.model_proto)
    session = ort_session(emitted.model_proto, spinning=True)  # it also times the model

    @functools.cache
    def scoring_session(exact: bool) -> ort.InferenceSession:
        """`session`, or (made once, where a check needs it) the graph as written, optimisations off."""
        return ort_session(emitted.model_proto, exact=True) if exact else session

    fidelity = verify_fidelity(lambda exact: measure_fidelity(
        scoring_session(exact), emitted.reference, [*images, emitted.batched], min(b.a for b in subnet.bits),
        target.deployment.float_type))
    parts = check_parts(emitted.reference, emitted.static.root, subnet, images[0], target)
    task = None
    if job.validation is not None:
        model, validation = job.model, job.validation
        scoring = resolve_device(device)
        model.to(scoring)

        def onnx_miou(exact: bool) -> float:
            return evaluate(onnx_encoder_forward(scoring_session(exact), model.head), validation, subnet.resolution,
                            scoring).miou

        task = check_task(evaluate_subnet(model, subnet, validation).miou, onnx_miou, len(validation.samples))
        model.to("cpu")
    check_export(lint, fidelity, target.lint_required, parts=parts, task=task)
    return _Verified(lint, session, fidelity, parts, task)


def _export_decoder(job: _ExportJob, emitted: _Emitted, verified: _Verified) -> tuple[onnx.ModelProto, DecoderReport]:
    """`promptable`: decoder.onnx, verified on the encoder's own embeddings of the sample images."""
    decoder_spec, decoder_model, decoder_weights = job.decoder
    embeddings = [torch.from_numpy(verified.session.run(None, {"image": x.numpy()})[0]) for x in emitted.images]
    return export_decoder(decoder_spec, decoder_model, decoder_weights, embeddings)


def _report(job: _ExportJob, emitted: _Emitted, verified: _Verified,
            decoder: tuple[onnx.ModelProto, DecoderReport] | None) -> tuple[export_report.ExportReport, bytes]:
    """The export report (its files are the write step's) and the serialized model."""
    static, model_proto = emitted.static, emitted.model_proto
    layers = export_report.layer_precisions(static, job.target.deployment)
    data = model_proto.SerializeToString()
    report = export_report.ExportReport(
        subnet=job.subnet, target=job.target.name, format=job.fmt,
        opset=next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")),
        ir_version=model_proto.ir_version, cost=static.cost, layers=layers, onnx_bytes=len(data),
        fp32_bytes=4 * sum(t.numel() for t in emitted.reference.state_dict().values() if t.is_floating_point()),
        latency=ort_latency(verified.session, emitted.images[0]), fidelity=verified.fidelity, lint=verified.lint,
        parts=verified.parts, task=verified.task, decoder=None if decoder is None else decoder[1])
    return report, data


def _write_folder(job: _ExportJob, out: Path, report: export_report.ExportReport, data: bytes,
                  decoder: tuple[onnx.ModelProto, DecoderReport] | None) -> None:
    """Model, decoder, precision map, engine (`trt`) and report.json, all or nothing: the files are written in a
    fresh folder beside `out` and swapped in whole at the end (TensorRT's timing.cache is carried over)."""
    target, subnet = job.target, job.subnet
    paths = {"onnx": out / "encoder.onnx", "report": out / "report.json", "precision_map": out / "precision.png"}
    with replace_folder(out, keep=("timing.cache",)) as staging:
        atomic_write_bytes(staging / paths["onnx"].name, data)
        if decoder is not None:
            paths["decoder"] = out / "decoder.onnx"
            atomic_write_bytes(staging / paths["decoder"].name, decoder[0].SerializeToString())
        export_report.plot_precision_map(report.layers, staging / paths["precision_map"].name,
                                         f"{subnet.model} @ {subnet.resolution}px on {target.name}")
        if job.fmt == target.engine_format:
            report.engine = target.build_engine(paths["onnx"], out, job.batch, subnet.resolution, staging=staging)
            if report.engine.path is not None:
                paths["engine"] = Path(report.engine.path)
        report.files = {k: str(v) for k, v in paths.items()}
        atomic_write_json(staging / paths["report"].name, report.to_json())


# The embedded default: a vit_t supernet trained from scratch on generated shapes, which only needs a
# higher learning rate and a few hundred iterations where fine-tuning real SAM weights takes 160k.
# A quarter of the 64 generated training images is held out: the 16 images search scores on.
QUICKSTART_TRAINING = {"iterations": 300, "phase1_iterations": 200, "lr": 1e-3, "lora_lr": 2e-3, "holdout": 0.25,
                       "checkpoint_every": 100, "val_limit": 32}
QUICKSTART_SEARCH = EvolutionConfig(population=16, top_k=4, mutations=8, crossovers=8, generations=3)


@dataclass(frozen=True)
class QuickstartResult:
    """What each stage of `qsamc quickstart` produced."""

    trained: TrainResult
    searched: SearchResult
    search_files: list[Path]
    chosen: Path  # the subnet exported: the best under the middle budget
    budget: Budget
    export: export_report.ExportReport


QUICKSTART_FOLDERS = ("supernet", "search", "export")


def quickstart(out: Path, show_progress: bool = True, on_generation=None, overwrite: bool = False) -> QuickstartResult:
    """What `qsamc quickstart` does: train -> search (BitOPs ladder, cpu target) -> export the best subnet
    of the middle budget to a verified Q/DQ ONNX model. An earlier quickstart in `out` is replaced only
    with `overwrite`."""
    check_results_folder(out, overwrite, "a quickstart", lambda name: name in QUICKSTART_FOLDERS)
    run = out / "supernet"
    trained = train(load_train_config(None, {"out": str(run), **QUICKSTART_TRAINING}), show_progress=show_progress,
                    overwrite=overwrite)
    searched, written = run_search(run, "cpu", True, False, [], out / "search", val_limit=16,
                                   config=QUICKSTART_SEARCH, on_generation=on_generation, overwrite=overwrite)
    middle = searched.results[len(searched.results) // 2]
    chosen = out / "search" / "quickstart-subnet.json"
    middle.best.subnet.save(chosen)
    report = export_subnet(run, chosen, "cpu", "onnx", out / "export", dataset="synthetic", val_limit=16,
                           overwrite=overwrite)
    return QuickstartResult(trained, searched, written, chosen, middle.budgets[0], report)
