"""The `qsamc` command line: parse, call one library function, print. No logic lives here.

The pipeline, the baselines and the export report are imported by the commands that run them: they load
ONNX and ONNX Runtime (2 s on a 2-core CPU), which `qsamc train` and a refused command never need."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Iterable, Optional

import typer
from rich.console import Console
from rich.table import Table

from qsamc.distributed import DEVICES
from qsamc.errors import QsamcError
from qsamc.formats import EXPORT_FORMATS
from qsamc.passes.count_bitops import FLOAT_MAC_CONVENTIONS
from qsamc.sam import MODEL_ZOO
from qsamc.search.cost import format_cost
from qsamc.search.evolution import OBJECTIVES, EvolutionConfig
from qsamc.supernet.space import GRANULARITIES
from qsamc.task.holdout import SEARCH_SPLITS
from qsamc.supernet.fused import ENV as fuse_env, MODES as FUSE_MODES, set_mode as set_fusion
from qsamc.threads import ENV as threads_env, apply_threads
from qsamc.training.config import ATTENTION_MODES, CHOICES, HELP, TrainConfig, resolve_train_config
from qsamc.training.train import train as run_training
from qsamc.units import CLOCKS, human

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="qsamc: compile SAM image encoders into mixed-precision quantized subnets.")
console = Console()


def choice(name: str, values: Iterable[str]) -> type[Enum]:
    """An option's allowed values, taken from the library's own tuple (typer lists them in --help)."""
    return Enum(name, {v: v for v in values}, type=str)


Granularity = choice("Granularity", GRANULARITIES)
FloatMacs = choice("FloatMacs", FLOAT_MAC_CONVENTIONS)
Split = choice("Split", SEARCH_SPLITS)
BaselineSplit = choice("BaselineSplit", ("val", "holdout"))
Objective = choice("Objective", OBJECTIVES)
Attention = choice("Attention", tuple(ATTENTION_MODES))
Clock = choice("Clock", CLOCKS)
Device = choice("Device", DEVICES)
DEVICE_HELP = "auto (a GPU where torch sees one), cpu or cuda."
ExportFormat = choice("ExportFormat", EXPORT_FORMATS)
Fuse = choice("Fuse", FUSE_MODES)


MODEL_HELP = f"Encoder config: {', '.join(MODEL_ZOO)}."
# Commands that do enough work to say how many threads they run (first line of their output).
_WORKING_COMMANDS = {"train", "search", "profile", "export", "baseline", "quickstart"}


@app.callback()
def options(ctx: typer.Context,
            threads: Optional[int] = typer.Option(
                None, "--threads",
                help=f"Threads for torch and ONNX Runtime (or {threads_env}=N; default: the cores no other "
                     "process is busy on when the command starts)."),
            fuse: Optional[Fuse] = typer.Option(
                None, "--fuse",
                help=f"Training kernels compiled by torch.compile (or {fuse_env}=...): auto (on CUDA only), on, off.")):
    """qsamc: compile SAM image encoders into mixed-precision quantized subnets."""
    set_fusion(fuse.value if fuse else None)
    choice = apply_threads(threads)
    if ctx.invoked_subcommand in _WORKING_COMMANDS:
        console.print(choice.describe(), highlight=False)


@app.command()
def space(model: str = typer.Option("vit_l", help=MODEL_HELP),
          granularity: Granularity = typer.Option(Granularity.layer, help="Bits tied per layer, block, stage or model."),
          attention: Attention = typer.Option(Attention.float, help="searched: with attention precision (--attention "
                                              "searched of qsamc train).")):
    """Show the search space: operators, choices, number of subnets and BitOPs range."""
    from qsamc import pipeline  # deferred: start-up time (the module's docstring says why)
    info = pipeline.describe_space(model, granularity.value, attention.value)
    table = Table(title=f"search space of {model} (bits per {granularity.value})")
    table.add_column("operator")
    table.add_column("choices")
    for operator, choices in info.operators.items():
        table.add_row(operator, choices)
    console.print(table)
    console.print(f"subnets: 10^{info.log10_subnets:.1f}   quantized layers: {info.quantized_layers}")
    console.print(f"MACs:   {human(info.macs[0])} .. {human(info.macs[1])}")
    console.print(f"BitOPs: {human(info.bitops[0])} .. {human(info.bitops[1])} (float attention matmuls at 32x32 bits)")


@app.command()
def bitops(model: str = typer.Option("vit_l", help=MODEL_HELP),
           max_: bool = typer.Option(False, "--max", help="The largest subnet."),
           min_: bool = typer.Option(False, "--min", help="The smallest subnet."),
           subnet: Optional[Path] = typer.Option(None, help="A subnet JSON file."),
           float_macs: FloatMacs = typer.Option(FloatMacs.fp32, help="Count attention matmuls at 32x32 bits, or exclude them from BitOPs."),
           per_layer: bool = typer.Option(False, help="Also print one line per layer."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")):
    """MACs and BitOPs of one subnet, per stage and (optionally) per layer."""
    from qsamc import pipeline  # deferred: start-up time (the module's docstring says why)
    report, chosen = pipeline.subnet_bitops(model, max_, min_, subnet, float_macs.value)
    if as_json:
        print(json.dumps({"subnet": chosen.to_json(), **report.to_json()}, indent=1))
        return
    table = Table(title=f"{model} at {chosen.resolution}px, depths {list(chosen.depths)}")
    for column in ("part", "MACs", "BitOPs"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part, row in report.per_part.items():
        table.add_row(part, human(row["macs"]), human(row["bitops"]))
    table.add_row("of which attention matmuls (float)", human(report.float_macs), human(report.float_bitops),
                  style="italic")
    table.add_row("total", human(report.macs), human(report.bitops), style="bold")
    console.print(table)
    if per_layer:
        layers = Table(title="per layer")
        for column in ("node", "kind", "bits", "MACs", "BitOPs"):
            layers.add_column(column)
        for row in report.per_layer:
            bits = "W{}A{}".format(*row["bits"]) if row["bits"] else "float"
            layers.add_row(row["node"], row["kind"], bits, human(row["macs"]), human(row["bitops"]))
        console.print(layers)
    console.print(f"float MACs convention: {report.convention}")


@app.command()
def ir(model: str = typer.Option("vit_b", help=MODEL_HELP),
       out: Path = typer.Option(Path("ir"), help="Output folder for ir.json and ir.dot."),
       subnet: Optional[Path] = typer.Option(None, help="Annotate bits and costs of this subnet."),
       overwrite: bool = typer.Option(False, help="Replace the earlier dump in --out.")):
    """Write the annotated graph IR as JSON and Graphviz DOT."""
    from qsamc import pipeline  # deferred: start-up time (the module's docstring says why)
    paths = pipeline.write_ir(model, out, subnet, overwrite)
    for path in paths:
        console.print(f"wrote {path}")


def train(config: Optional[Path], resume: bool, overwrite: bool, quiet: bool, **fields) -> None:
    """Fine-tune a SAM encoder once into a mixed-precision quantized supernet. Ctrl-C stops at the next
    iteration with a checkpoint saved (`--resume` continues it)."""
    options = {k: v.value if isinstance(v, Enum) else v for k, v in fields.items() if v is not None}
    result = run_training(resolve_train_config(config, options, resume), resume=resume, show_progress=not quiet,
                          overwrite=overwrite)
    console.print(f"supernet written to {result.run}/supernet.pt ({result.iterations} iterations)")
    for name, ev in (("max subnet" if result.min_subnet else "FP32 model", result.max_subnet), ("min subnet", result.min_subnet)):
        if ev is not None:
            console.print(f"{name}: {ev.describe()}")


def _config_options() -> list[inspect.Parameter]:
    """One option per `TrainConfig` field: its type, allowed values, help and default (None: not given,
    so a config file's value stands)."""
    defaults, hints, panel = TrainConfig(), typing.get_type_hints(TrainConfig), "Training config (also a YAML/TOML file's fields)"
    params = []
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if isinstance(hint, types.UnionType) else hint
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name in CHOICES:
            kind = choice("".join(w.title() for w in f.name.split("_")), CHOICES[f.name])
        elif typing.get_origin(base) is tuple:
            kind, default = str, ",".join(default)
        else:
            kind = base
        option = typer.Option(None, f"{flag}/--no-{flag[2:]}" if base is bool else flag, help=HELP[f.name],
                              show_default=False if default is None else str(default), rich_help_panel=panel)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[kind]))
    return params


def _train_command():
    own = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", help="YAML or TOML run config; options override it.")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, help="Continue the run in --out from its last checkpoint.")),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, help="Replace the run already in --out (its checkpoints and results).")),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, help="No progress bar.")),
    ]
    params = own + _config_options()

    def command(**kwargs) -> None:
        train(kwargs.pop("config"), kwargs.pop("resume"), kwargs.pop("overwrite"), kwargs.pop("quiet"), **kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = train.__doc__
    return command


app.command("train")(_train_command())


@app.command()
def search(supernet: Path = typer.Option(..., help="A training run folder (supernet.json + supernet.pt)."),
           target: str = typer.Option(..., help="Hardware target: a100, h100, orin, cpu (x86 with VNNI), cpu-avx2 (x86 without VNNI)."),
           bitops: bool = typer.Option(False, "--bitops", help="Constrain BitOPs."),
           latency: bool = typer.Option(False, "--latency", help="Constrain latency on the target (measured table)."),
           budget: Optional[list[str]] = typer.Option(None, help="A budget, e.g. 150T or 40ms; repeat for a Pareto front. "
                                                      "Default: a ladder between the smallest and largest subnet."),
           out: Path = typer.Option(Path("search"), help="Output folder."),
           restrict: bool = typer.Option(False, help="Search only the bit-widths the target deploys well."),
           estimate: bool = typer.Option(False, help="Without a latency table, use a roofline estimate from datasheet peaks."),
           latency_table: Optional[Path] = typer.Option(None, help="Latency table (default: where `qsamc profile` writes it)."),
           dataset: Optional[str] = typer.Option(None, help="Validation dataset format: synthetic, ade20k, camvid. "
                                                 "Default: the one the supernet was trained on (its config.json)."),
           data_root: Optional[Path] = typer.Option(None, help="Dataset folder (not for synthetic)."),
           val_limit: int = typer.Option(64, help="Validation images per evaluation."),
           batch_size: int = typer.Option(8, help="Validation batch size."),
           population: int = typer.Option(50), top_k: int = typer.Option(10), mutations: int = typer.Option(25),
           crossovers: int = typer.Option(25), mutation_prob: float = typer.Option(0.2),
           generations: int = typer.Option(5), objective: Objective = typer.Option(Objective.auto, help="Fitness: validation loss (the paper), mIoU (semantic runs), mask AP (instance runs), or fidelity (semantic runs): the per-pixel KL from the FP32 reference's predictions over the labelled pixels. auto: fidelity for a semantic run distilled from an FP32 reference, else loss."),
           seed: int = typer.Option(0),
           sensitivity_seed: bool = typer.Option(True, help="Also start evolution from the subnet per-layer sensitivity "
                                                 "(AutoQuantize's gradient scores on the search images) and a budgeted "
                                                 "solve pick."),
           uniform_guard: bool = typer.Option(False, help="Keep the best uniform-precision subnet under a budget unless "
                                              "the best mix beats it on the search images' mIoU beyond a paired "
                                              "bootstrap 95% interval (semantic runs)."),
           float_macs: FloatMacs = typer.Option(FloatMacs.fp32, help="Count attention matmuls in BitOPs at 32x32 bits, "
                                                "or exclude them (the paper's convention)."),
           split: Split = typer.Option(Split.auto, help="The images that score subnets: auto is the run's held-out "
                                    "training images (never trained on) where it has them, else val."),
           overwrite: bool = typer.Option(False, help="Replace the earlier search in --out (whole, in one step)."),
           device: Device = typer.Option(Device.auto, help="Where candidates are scored: " + DEVICE_HELP)):
    """Evolutionary search for the best subnet under BitOPs and/or latency budgets on a target."""
    from qsamc import pipeline  # deferred: start-up time (the module's docstring says why)
    from rich.progress import BarColumn, Progress, TextColumn

    config = EvolutionConfig(population, top_k, mutations, crossovers, mutation_prob, generations, objective.value, seed,
                             sensitivity_seed=sensitivity_seed, uniform_guard=uniform_guard)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} generations"),
                  TextColumn("best {task.fields[best]}"), console=console) as progress:
        tasks: dict[int, int] = {}

        def on_generation(index: int, generation: int, best: float) -> None:
            if index not in tasks:
                tasks[index] = progress.add_task(f"budget set {index + 1}", total=generations, best="-")
            progress.update(tasks[index], completed=generation + 1, best=f"{best:.4f}")

        result, written = pipeline.run_search(supernet, target, bitops, latency, budget or [], out, restrict=restrict,
                                              estimate=estimate, table=latency_table, dataset=dataset,
                                              data_root=data_root, val_limit=val_limit, batch_size=batch_size,
                                              config=config, on_generation=on_generation,
                                              float_macs=float_macs.value, split=split.value, overwrite=overwrite,
                                              device=device.value)
    if not written:
        return
    against = f" against {result.scored_against}" if result.scored_against else ""
    console.print(f"objective {result.objective}{against}, scored on {result.scored_on}")
    table = Table(title=f"best subnets on {target} ({result.evaluations} subnets evaluated)")
    names = {"loss": "loss", "miou": "mIoU", "pixel_accuracy": "pixel accuracy", "ap": "mask AP", "ap50": "AP50",
             "ap75": "AP75", "fidelity": "KL from reference"}
    metrics = [names[m] for m in result.results[0].best.evaluation.metrics()]
    for column in ("budget", *result.results[0].best.costs, *metrics):
        table.add_column(column)
    for r in result.results:
        costs = [format_cost(m, v) for m, v in r.best.costs.items()]  # type: ignore[arg-type]
        values = [f"{v:.4f}" for v in r.best.evaluation.metrics().values()]
        table.add_row(", ".join(map(str, r.budgets)), *costs, *values)
    console.print(table)
    for path in written:
        console.print(f"wrote {path}")


@app.command()
def profile(target: str = typer.Option(..., help="Hardware target whose latency backend runs the table."),
            model: str = typer.Option("vit_t", help=MODEL_HELP),
            out: Optional[Path] = typer.Option(None, help="Table path (default: where `qsamc search` looks)."),
            restrict: bool = typer.Option(False, help="Only the bit-widths the target deploys well."),
            threads: int = typer.Option(1, help="ONNX Runtime intra-op threads."),
            clock: Clock = typer.Option(Clock.cpu, help="cpu: the timing thread's CPU time (robust on shared machines, "
                                        "one thread); wall: wall time (quiet machines)."),
            warmup: int = typer.Option(10), repeats: int = typer.Option(30, help="Timed runs per entry (median)."),
            calibration: int = typer.Option(10, help="Whole subnets timed to fit the context scale."),
            validate: int = typer.Option(0, help="Also measure N random whole subnets against the table."),
            attention: Attention = typer.Option(Attention.float, help="searched: also time INT8 attention, for "
                                                "supernets trained with --attention searched.")):
    """Build the measured latency table of a target: one entry per fused part of the encoder."""
    import statistics

    from rich.progress import Progress

    from qsamc import pipeline  # deferred: start-up time (the module's docstring says why)
    from qsamc.profiling.timers import ProfileSettings  # deferred: start-up time, only `qsamc profile` loads it

    settings = ProfileSettings(threads, warmup, repeats, clock.value)
    with Progress(console=console) as progress:
        task = progress.add_task(f"timing {model} parts on {target}", total=None)
        table, path, checks = pipeline.profile_target(target, model, out, settings, calibration, validate, restrict,
                                                      lambda done, total: progress.update(task, completed=done,
                                                                                          total=total),
                                                      attention=attention.value)
    console.print(f"wrote {path}: {len(table.entries)} entries, context scale {table.context_scale:.3f} "
                  f"({table.backend}, {table.machine.get('cpu')}, {settings.threads} thread(s), {settings.clock} clock)")
    if checks:
        rows = Table(title=f"predicted vs measured latency of {len(checks)} random {model} subnets")
        for column in ("resolution", "depths", "predicted", "measured", "error"):
            rows.add_column(column, justify="right")
        for c in checks:
            rows.add_row(str(c.subnet.resolution), str(list(c.subnet.depths)), f"{c.predicted * 1e3:.3f} ms",
                         f"{c.measured * 1e3:.3f} ms", f"{c.error:+.1%}")
        console.print(rows)
        errors = [abs(c.error) for c in checks]
        console.print(f"median absolute error {statistics.median(errors):.1%}, max {max(errors):.1%}")


@app.command()
def export(supernet: Path = typer.Option(..., help="A training run folder (supernet.json + supernet.pt)."),
           subnet: Path = typer.Option(..., help="The subnet JSON to export (e.g. from `qsamc search`)."),
           target: str = typer.Option(..., help="Hardware target: its deployment rules pick the containers."),
           format: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="onnx (Q/DQ model) or trt (TensorRT engine)."),
           out: Path = typer.Option(Path("export"), help="Output folder for encoder.onnx, report.json, precision.png."),
           promptable: bool = typer.Option(False, "--promptable", help="Also write SAM's prompt encoder + mask decoder "
                                           "as decoder.onnx (segment-anything's ONNX export), verified in ONNX Runtime."),
           sam_checkpoint: Optional[Path] = typer.Option(None, "--sam-checkpoint", help="A whole SAM checkpoint "
                                                         "(sam_vit_*.pth) for the decoder's weights; freshly initialised without."),
           dataset: Optional[str] = typer.Option(None, help="Validation data for the task-level check (mIoU through the head, "
                                                 "ONNX Runtime vs PyTorch, within 0.2 points): synthetic, ade20k, "
                                                 "camvid. Default: the run's own, where its folder still exists."),
           data_root: Optional[Path] = typer.Option(None, help="Dataset folder (not for synthetic)."),
           val_limit: int = typer.Option(32, help="Validation images for the task-level check."),
           min_batch: int = typer.Option(1, help="TensorRT optimization profile: smallest batch the engine serves."),
           opt_batch: int = typer.Option(1, help="TensorRT optimization profile: the batch the engine is tuned for."),
           max_batch: int = typer.Option(8, help="TensorRT optimization profile: largest batch the engine serves."),
           overwrite: bool = typer.Option(False, help="Replace the earlier export in --out (whole, in one step)."),
           device: Device = typer.Option(Device.auto, help="Where the task check's PyTorch side runs: " + DEVICE_HELP)):
    """Lower one subnet to the target's integer formats, emit and verify ONNX with a dynamic batch axis
    (and a TensorRT engine with that batch profile)."""
    from qsamc import pipeline  # deferred: start-up time (the module's docstring says why)
    from qsamc.export.report import LAYER_COLUMNS
    from qsamc.export.tensorrt_engine import BatchProfile  # deferred: start-up time, only export loads it

    batch = BatchProfile(min_batch, opt_batch, max_batch)
    report = pipeline.export_subnet(supernet, subnet, target, format.value, out, promptable=promptable,
                                    sam_checkpoint=sam_checkpoint, dataset=dataset, data_root=data_root,
                                    val_limit=val_limit, batch=batch, overwrite=overwrite, device=device.value)
    layers = Table(title=f"deployed precision on {report.target}")
    for column in LAYER_COLUMNS:
        layers.add_column(column)
    for row in report.layer_rows():
        layers.add_row(*row)
    console.print(layers)
    summary = Table(title="export report", show_header=False)
    for label, text in report.summary_rows():
        summary.add_row(label, text)
    console.print(summary)
    for name, path in report.files.items():
        console.print(f"wrote {name}: {path}", soft_wrap=True)
    error = report.engine.error() if report.engine is not None else None
    if error is not None:
        console.print(f"build the engine where TensorRT and a GPU exist:\n  {report.engine.trtexec}", soft_wrap=True)
        raise error


@app.command()
def baseline(reference: Path = typer.Option(..., help="An FP32 reference run (`qsamc train --schedule fp32`)."),
             dataset: str = typer.Option("synthetic", help="Dataset format: synthetic, ade20k, camvid."),
             data_root: Optional[Path] = typer.Option(None, help="Dataset folder (not for synthetic)."),
             out: Path = typer.Option(Path("baselines"), help="Output folder for baselines.json and the ONNX models."),
             method: Optional[list[str]] = typer.Option(None, help="modelopt-ptq, modelopt-autoquantize, ort-static, "
                                                        "modelopt-qat (trains); repeat for several (default: all but "
                                                        "modelopt-qat)."),
             bits: Optional[list[str]] = typer.Option(None, help="ModelOpt PTQ bits, e.g. W8A8; repeat (default W8A8, W4A8, W4A4)."),
             effective_bits: Optional[list[float]] = typer.Option(None, help="AutoQuantize budgets in effective weight bits; "
                                                                   "repeat (default 6)."),
             calibration: int = typer.Option(32, help="Training images for calibration (and AutoQuantize's scores)."),
             val_limit: Optional[int] = typer.Option(None, help="Validation images (default: all)."),
             overwrite: bool = typer.Option(False, help="Replace the earlier baselines in --out (whole, in one step)."),
             split: BaselineSplit = typer.Option(BaselineSplit.val, help="The images that score the peers: val, or "
                                                 "holdout (the reference's held-out training images)."),
             qat_iterations: int = typer.Option(1200, help="ModelOpt QAT: training iterations (as many as the "
                                                "supernet's, for a like-for-like peer)."),
             qat_lr: float = typer.Option(1e-5, help="ModelOpt QAT: starting learning rate (half a cosine to 1% of it)."),
             device: Device = typer.Option(Device.auto, help="Where the PyTorch peers are scored: " + DEVICE_HELP)):
    """Post-training quantized peers of an FP32 reference (ModelOpt PTQ / AutoQuantize, ONNX Runtime
    quantize_static), scored like qsamc's subnets: val mIoU, BitOPs, ONNX Runtime CPU latency."""
    from qsamc.baselines import METHODS, PTQ_BITS, QatSettings, parse_bits, run_baselines  # deferred: start-up time
    results = run_baselines(reference, dataset, data_root, out, tuple(method or METHODS),
                            tuple(parse_bits(b) for b in bits) if bits else PTQ_BITS,
                            tuple(effective_bits or (6.0,)), calibration, val_limit,
                            progress=lambda line: console.print(line), device=device.value, overwrite=overwrite,
                            split=split.value, qat=QatSettings(iterations=qat_iterations, lr=qat_lr))
    fp32 = results[0]
    table = Table(title=f"baselines of {reference} (BitOPs: attention matmuls excluded)")
    for column in ("method", "BitOPs", "% of FP32", "CPU latency", "val mIoU"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in results:
        latency = "-" if r.latency_ms is None else f"{r.latency_ms:.2f} ms"
        table.add_row(r.label, human(r.bitops), f"{100 * r.bitops / fp32.bitops:.2f}%", latency, f"{r.evaluation.miou:.4f}")
    console.print(table)
    console.print(f"wrote {out / 'baselines.json'}")


@app.command()
def quickstart(out: Path = typer.Option(Path("runs/quickstart"), help="Output folder for the three stages."),
               quiet: bool = typer.Option(False, help="No progress bars."),
               overwrite: bool = typer.Option(False, help="Replace the earlier quickstart in --out.")):
    """train -> search -> export on the embedded default (vit_t on generated shapes), in a few minutes."""
    from qsamc import pipeline  # deferred: start-up time (the module's docstring says why)
    console.rule("1/3 qsamc train: vit_t supernet on generated shapes")

    def on_generation(index: int, generation: int, best: float) -> None:
        if not quiet:
            console.print(f"search, budget set {index + 1}: generation {generation + 1} done, best loss {best:.4f}")

    result = pipeline.quickstart(out, show_progress=not quiet, on_generation=on_generation, overwrite=overwrite)
    trained, searched, report = result.trained, result.searched, result.export
    for name, ev in (("max subnet", trained.max_subnet), ("min subnet", trained.min_subnet)):
        console.print(f"{name}: validation mIoU {ev.miou:.4f}, loss {ev.loss:.4f}")
    console.rule("2/3 qsamc search --target cpu --bitops (default budget ladder)")
    for r in searched.results:
        console.print(f"budget {', '.join(map(str, r.budgets))}: loss {r.best.evaluation.loss:.4f}, "
                      f"mIoU {r.best.evaluation.miou:.4f}")
    console.rule(f"3/3 qsamc export --target cpu --format onnx (the subnet found under {result.budget})")
    fidelity = report.fidelity
    console.print(f"BitOPs {human(report.cost.bitops)}, ONNX Runtime {report.latency.median_ms:.2f} ms, "
                  f"fidelity max {fidelity.max_rel:.2e} / mean {fidelity.mean_rel:.2e} of the output scale, "
                  f"{len(report.parts)} parts verified alone: verified")
    console.print(f"validation mIoU: PyTorch {report.task.pytorch_miou:.4f}, ONNX Runtime {report.task.onnx_miou:.4f}")
    for path in (*result.search_files, *report.files.values()):
        console.print(f"wrote {path}")


def main() -> None:
    """The console script: every user error, ours or a malformed command line, is one sentence and a
    non-zero exit."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    except typer.TyperException as usage:  # an unknown option, a missing or malformed value; no command
        if not sys.argv[1:]:  # `qsamc` alone: its help
            print(usage.format_message())
            sys.exit(0)
        print(f"error: {usage.format_message()}", file=sys.stderr)
        sys.exit(usage.exit_code)
    except QsamcError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
