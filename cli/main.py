"""The `qsamc` command line: parse, call one library function, print. No logic lives here."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from qsamc.errors import QsamcError
from qsamc.sam import MODEL_ZOO
from qsamc.train_config import describe_fields

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="qsamc: compile SAM image encoders into mixed-precision quantized subnets.")
console = Console()


class Granularity(str, Enum):
    layer = "layer"
    block = "block"
    stage = "stage"
    model = "model"


class FloatMacs(str, Enum):
    fp32 = "fp32"
    exclude = "exclude"


MODEL_HELP = f"Encoder config: {', '.join(MODEL_ZOO)}."


def human(value: float, unit: str = "") -> str:
    """1.49e12 -> '1.49 T' (SI prefixes, as BitOPs and MACs are usually quoted)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".strip()


@app.command()
def space(model: str = typer.Option("vit_l", help=MODEL_HELP),
          granularity: Granularity = typer.Option(Granularity.layer, help="Bits tied per layer, block, stage or model.")):
    """Show the search space: operators, choices, number of subnets and BitOPs range."""
    from qsamc.pipeline import describe_space

    info = describe_space(model, granularity.value)
    table = Table(title=f"search space of {model} (bits per {granularity.value})")
    table.add_column("operator")
    table.add_column("choices")
    for operator, choices in info["operators"].items():
        table.add_row(operator, choices)
    console.print(table)
    console.print(f"subnets: 10^{info['log10_subnets']:.1f}   quantized layers: {info['quantized_layers']}")
    console.print(f"MACs:   {human(info['macs'][0])} .. {human(info['macs'][1])}")
    console.print(f"BitOPs: {human(info['bitops'][0])} .. {human(info['bitops'][1])} "
                  f"(attention matmuls at 32x32 bits)")


@app.command()
def bitops(model: str = typer.Option("vit_l", help=MODEL_HELP),
           max_: bool = typer.Option(False, "--max", help="The largest subnet."),
           min_: bool = typer.Option(False, "--min", help="The smallest subnet."),
           subnet: Optional[Path] = typer.Option(None, help="A subnet JSON file."),
           float_macs: FloatMacs = typer.Option(FloatMacs.fp32, help="Count attention matmuls at 32x32 bits, or exclude them from BitOPs."),
           per_layer: bool = typer.Option(False, help="Also print one line per layer."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")):
    """MACs and BitOPs of one subnet, per stage and (optionally) per layer."""
    from qsamc.pipeline import subnet_bitops

    report, chosen = subnet_bitops(model, max_, min_, subnet, float_macs.value)
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
       subnet: Optional[Path] = typer.Option(None, help="Annotate bits and costs of this subnet.")):
    """Write the annotated graph IR as JSON and Graphviz DOT."""
    from qsamc.pipeline import write_ir

    paths = write_ir(model, out, subnet)
    for path in paths:
        console.print(f"wrote {path}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog="Every config field is also a flag (defaults shown):\n\n" + describe_fields().replace("\n", "\n\n"))
def train(ctx: typer.Context,
          config: Optional[Path] = typer.Option(None, "--config", help="YAML or TOML run config."),
          resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
          quiet: bool = typer.Option(False, help="No progress bar.")):
    """Fine-tune a SAM encoder once into a mixed-precision quantized supernet."""
    from qsamc.train import train as run_training
    from qsamc.train_config import resolve_train_config

    result = run_training(resolve_train_config(config, ctx.args, resume), resume=resume, show_progress=not quiet)
    console.print(f"supernet written to {result.run}/supernet.pt ({result.iterations} iterations)")
    for name, ev in (("max subnet", result.max_subnet), ("min subnet", result.min_subnet)):
        console.print(f"{name}: validation mIoU {ev.miou:.4f}, loss {ev.loss:.4f}, pixel accuracy {ev.pixel_accuracy:.4f}")


def main() -> None:
    try:
        app()
    except QsamcError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
