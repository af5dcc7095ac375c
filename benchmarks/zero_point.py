"""Why W4A4 failed on the dusk drive: the image input's continuous LSQ+ offset moved SAM's zero padding off 0.

For one fold of `benchmarks/real_data.py` whose supernet trained with continuous offsets (`--zero-point
continuous`, every run before 2026-12-07), scores the same trained supernet at W4A4, without retraining,
with its activation quantizers read at an integer zero point (beta -> s * round(beta / s), what `qsamc train
--zero-point integer` trains with): the image input's alone (the patch embedding's quantizer), then every
one; beside W4A4 with the image input at 8 bits. On the fold's reported split and its search split, each in
mIoU points with its paired bootstrap 95% interval against W4A4 as trained. Writes zero_point.json under the
fold.

    python benchmarks/zero_point.py --fold runs/real_data/0001TP
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qsamc.fileio import atomic_write_json
from qsamc.search.cost import set_group_bits
from qsamc.supernet.quant import LsqActQuantizer
from qsamc.task.evaluate import ValidationSet, evaluate_subnet
from qsamc.task.intervals import paired_bootstrap
from qsamc.training.runs import load_supernet
from qsamc.training.splits import run_config, search_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import fold_splits

IMAGE_INPUT = "patch_embed.proj"


def set_zero_point(quantizers: list[LsqActQuantizer], zero_point: str) -> None:
    for quantizer in quantizers:
        quantizer.zero_point = zero_point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=Path, required=True, help="A fold folder of benchmarks/real_data.py.")
    args = parser.parse_args()
    run = args.fold / "supernet"
    model, _, spec = load_supernet(run)
    acts = [m for m in model.supernet.modules() if isinstance(m, LsqActQuantizer) and m.offset is not None]
    if {m.zero_point for m in acts} != {"continuous"}:
        sys.exit(f"error: {run} trained with integer zero points; this compares continuous ones read as integer")
    image_bank = model.supernet.get_submodule(IMAGE_INPUT).act_quantizer
    image = list(image_bank.quantizers.values())
    largest = spec.space.max_subnet()
    w4a4 = spec.space.uniform_bits(largest, 4, 4)
    config = run_config(run)
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    for split in fold_splits(args.fold.name):
        images, line = search_images(run, config.dataset, Path(config.data_root), split, "semantic")
        data = ValidationSet(images)

        def score(subnet, zero_point_of: list[LsqActQuantizer]):
            set_zero_point(acts, "continuous")
            set_zero_point(zero_point_of, "integer")
            return evaluate_subnet(model, subnet, data, per_image=True)

        variants = {"W4A4 as trained": score(w4a4, []),
                    "W4A4, image input at an integer zero point": score(w4a4, image),
                    "W4A4, every input at an integer zero point": score(w4a4, acts),
                    "W4A4, image input A8": score(set_group_bits(w4a4, {IMAGE_INPUT}, (4, 8)), [])}
        base = variants["W4A4 as trained"].image_confusions
        print(f"{split}: {line}")
        for label, evaluation in variants.items():
            interval = paired_bootstrap(evaluation.image_confusions, base)
            rows.setdefault(label, {})[split] = {"miou": evaluation.miou, **interval.to_json()}
            print(f"  {label:45s} mIoU {100 * evaluation.miou:6.2f}  vs as trained {interval.describe()}", flush=True)
    scale, beta = float(image_bank[4].scale.detach()), float(image_bank[4].offset.detach())
    offset = {"scale": scale, "offset": beta, "zero_at_grid_coordinate": -beta / scale}
    print(f"image input, 4 bits: s {scale:.4f}, beta {beta:.4f}: 0 sits {-beta / scale:.3f} steps above beta; "
          f"{time.perf_counter() - started:.0f} s")
    atomic_write_json(args.fold / "zero_point.json", {"fold": args.fold.name, "image_input_quantizer": offset,
                                                      "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
