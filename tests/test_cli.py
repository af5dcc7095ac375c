"""The `qsamc` command line (cli/main.py): space, bitops and ir, and one-sentence user errors."""

import copy
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from qsamc.ir.graph import IR
from qsamc.passes import BitopsModel, CountBitopsPass
from qsamc.units import human
from qsamc.ir.frontend import analysis_ir
from qsamc.supernet.space import default_space


@pytest.fixture
def run(run_cli):
    return run_cli


@pytest.fixture(scope="module")
def vit_t_model():
    space = default_space("vit_t")
    ir = analysis_ir(space)
    return space, BitopsModel(ir, space), ir


def test_space(run, vit_t_model):
    space, model, _ = vit_t_model
    code, out, err = run("space", "--model", "vit_t")
    assert (code, err) == (0, "")
    assert "search space of vit_t (bits per layer)" in out
    assert "│ resolution            │ [128, 256; 16]" in out
    assert "[2, 3]  [2, 3]  [2, 3]  [2, 3]" in out and "[3.0, 3.5, 4.0]" in out and "[2, 3, 4, 8, 32]" in out
    assert f"subnets: 10^{space.log10_count():.1f}   quantized layers: 51" in out
    (low_macs, low_bitops), (high_macs, high_bitops) = model.cost(space.min_subnet()), model.cost(space.max_subnet())
    assert f"MACs:   {human(low_macs)} .. {human(high_macs)}" in out
    assert f"BitOPs: {human(low_bitops)} .. {human(high_bitops)} (float attention matmuls at 32x32 bits)" in out


def test_space_granularity(run):
    code, out, _ = run("space", "--model", "vit_t", "--granularity", "model")
    assert code == 0
    assert "bits per model" in out
    assert f"subnets: 10^{default_space('vit_t', 'model').log10_count():.1f}" in out


def test_human():
    assert human(1_492_840_153_088) == "1.49 T"
    assert human(27_850_000, "MAC") == "27.85 MMAC"
    assert human(12) == "12"
    assert human(2_500, "B") == "2.50 KB"


def test_bitops_max_json(run, vit_t_model):
    space, model, _ = vit_t_model
    code, out, err = run("bitops", "--model", "vit_t", "--max", "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["subnet"] == space.max_subnet().to_json()
    assert (data["macs"], data["bitops"]) == model.cost(space.max_subnet())
    assert data["float_macs_convention"] == "fp32"
    assert sum(p["macs"] for p in data["per_part"].values()) == data["macs"]
    assert len(data["per_layer"]) == 51 + 12


def test_bitops_min_table(run, vit_t_model):
    space, _, ir = vit_t_model
    ir = IR(copy.deepcopy(ir.graph), ir.model, ir.root)
    CountBitopsPass(space, space.min_subnet())(ir)
    report = ir.cost.to_json()
    code, out, err = run("bitops", "--model", "vit_t", "--min", "--per-layer")
    assert (code, err) == (0, "")
    assert "vit_t at 128px, depths [2, 2, 2, 2]" in out
    for part, row in report["per_part"].items():
        line = next(line for line in out.splitlines() if line.startswith(f"│ {part} "))
        assert human(row["macs"]) in line and human(row["bitops"]) in line
    total = next(line for line in out.splitlines() if "│ total" in line)
    assert human(report["macs"]) in total and human(report["bitops"]) in total
    assert "of which attention matmuls (float)" in out
    assert "blocks.0.attn.qkv" in out and "W2A2" in out and "float" in out
    assert "blocks.1.attn.qkv" not in out  # dropped at depth 2
    assert out.rstrip().endswith("float MACs convention: fp32")


def test_bitops_subnet_file(run, tmp_path, vit_t_model):
    space, _, ir = vit_t_model
    subnet = space.sample(random.Random(12))
    subnet.save(tmp_path / "subnet.json")
    code, out, err = run("bitops", "--model", "vit_t", "--subnet", str(tmp_path / "subnet.json"),
                         "--json", "--float-macs", "exclude")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["subnet"] == subnet.to_json()
    assert (data["float_macs_convention"], data["float_bitops"]) == ("exclude", 0)
    assert (data["macs"], data["bitops"]) == BitopsModel(ir, space, "exclude").cost(subnet)


def test_ir_writes_json_and_dot(run, tmp_path):
    code, out, err = run("ir", "--model", "vit_t", "--out", str(tmp_path / "ir"))
    assert (code, err) == (0, "")
    assert f"wrote {tmp_path / 'ir' / 'ir.json'}" in out and f"wrote {tmp_path / 'ir' / 'ir.dot'}" in out
    ir = IR.from_json(json.loads((tmp_path / "ir" / "ir.json").read_text()))
    assert ir.model == "vit_t" and len(ir.quantizable()) == 51
    dot = (tmp_path / "ir" / "ir.dot").read_text()
    assert all(f'"{name}" [label=' in dot for name in ir.graph)


def test_ir_with_subnet_has_bits_and_costs(run, tmp_path):
    space = default_space("vit_t")
    space.min_subnet().save(tmp_path / "min.json")
    code, _, err = run("ir", "--model", "vit_t", "--out", str(tmp_path), "--subnet", str(tmp_path / "min.json"))
    assert (code, err) == (0, "")
    ir = IR.from_json(json.loads((tmp_path / "ir.json").read_text()))
    assert ir.subnet == space.min_subnet() and ir.bits_of("blocks.0.attn.qkv")[1:] == (2, 2)
    assert ir.cost.macs == sum(a["macs"] for _, a in ir.nodes()) > 0
    assert "W2A2" in (tmp_path / "ir.dot").read_text()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("unknown model", "error: unknown model 'vit_x'; known models are vit_b, vit_h, vit_l, vit_t"),
    ("unknown model in space", "error: unknown model 'vit_x'; known models are vit_b, vit_h, vit_l, vit_t"),
    ("unknown model in ir", "error: unknown model 'vit_x'; known models are vit_b, vit_h, vit_l, vit_t"),
    ("malformed subnet file", "error: subnet file {tmp}/bad.json is not valid JSON: "),
    ("subnet field of the wrong type", "error: subnet file {tmp}/typed.json: 'depths' must be a list of integers"),
    ("out-of-space subnet", "error: resolution 100 is not one of [128, 144, 160, 176, 192, 208, 224, 240, 256]"),
    ("subnet of another model", "error: subnet is for model 'vit_b', not 'vit_t'"),
    ("missing subnet file", "error: subnet file {tmp}/absent.json does not exist"),
    ("none of max/min/subnet", "error: choose exactly one of --max, --min or --subnet FILE"),
    ("both max and min", "error: choose exactly one of --max, --min or --subnet FILE"),
])
def test_user_errors_are_one_sentence(run, tmp_path, case, message):
    good = default_space("vit_t").max_subnet().to_json()
    args = {
        "unknown model": ["bitops", "--model", "vit_x", "--max"],
        "unknown model in space": ["space", "--model", "vit_x"],
        "unknown model in ir": ["ir", "--model", "vit_x", "--out", str(tmp_path)],
        "malformed subnet file": ["bitops", "--model", "vit_t", "--subnet", write(tmp_path / "bad.json", "{")],
        "subnet field of the wrong type": ["bitops", "--model", "vit_t", "--subnet",
                                           write(tmp_path / "typed.json", json.dumps({**good, "depths": "3333"}))],
        "out-of-space subnet": ["bitops", "--model", "vit_t", "--subnet",
                                write(tmp_path / "far.json", json.dumps({**good, "resolution": 100}))],
        "subnet of another model": ["ir", "--model", "vit_t", "--out", str(tmp_path), "--subnet",
                                    write(tmp_path / "b.json", json.dumps({**good, "model": "vit_b"}))],
        "missing subnet file": ["bitops", "--model", "vit_t", "--subnet", str(tmp_path / "absent.json")],
        "none of max/min/subnet": ["bitops", "--model", "vit_t"],
        "both max and min": ["bitops", "--model", "vit_t", "--max", "--min"],
    }[case]
    code, out, err = run(*args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert err.strip().startswith(message.format(tmp=tmp_path))
    assert "Traceback" not in out + err


def test_bad_option_value_is_a_usage_error_without_traceback(run):
    code, out, err = run("space", "--model", "vit_t", "--granularity", "head")
    assert code == 2
    assert "Invalid value for '--granularity'" in err and "Traceback" not in out + err


def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "qsamc"
    assert script.exists(), "the qsamc console script is not installed"
    result = subprocess.run([str(script), "bitops", "--model", "vit_x", "--min"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "error: unknown model 'vit_x'; known models are vit_b, vit_h, vit_l, vit_t\n"


def test_search_reads_latency_tables_without_importing_the_profiler():
    """Imports run downhill: the command line alone (what `qsamc train` and a refused command load) holds no
    ONNX, ONNX Runtime, matplotlib or ModelOpt; search's pipeline holds the table and its cost model, never the
    profiler, its timers or the TensorRT builder (`qsamc profile` imports those when it runs)."""
    code = ("import sys, qsamc.cli.main; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'matplotlib', 'modelopt') if m in sys.modules)); "
            "import qsamc.pipeline, qsamc.search.latency_table; "
            "print(sorted(m for m in sys.modules if m.startswith(('qsamc.profiling', 'qsamc.export.tensorrt'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, "[]\n[]\n")


@pytest.mark.parametrize("command", ["search", "profile", "export", "ir", "quickstart", "train"])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(run_cli, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("earlier work")
    out = blocker / "inside"  # a folder under a file: cannot be made
    args = {"search": ["search", "--supernet", tmp_path / "missing-run", "--target", "cpu", "--bitops"],
            "profile": ["profile", "--target", "cpu"],
            "export": ["export", "--supernet", tmp_path / "missing-run", "--subnet", tmp_path / "s.json", "--target", "cpu"],
            "ir": ["ir", "--model", "vit_t"], "quickstart": ["quickstart"], "train": ["train", "--quiet"]}[command]
    code, _, stderr = run_cli(*args, "--out", out / "t.json" if command == "profile" else out)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert f"{blocker} is a file" in stderr
    assert blocker.read_text() == "earlier work"


def test_train_options_are_the_config_fields_with_types_choices_and_help(run, monkeypatch):
    from qsamc.training.config import HELP, TrainConfig

    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run("train", "--help")
    assert (code, err) == (0, "")
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in out
    assert "<progressive|lora|full|fp32>" in out and "<regular|selective|multiplex>" in out and "<int>" in out
    assert HELP["lora_lr"] in out and "--per-channel" in out and "--no-per-channel" in out
    code, _, err = run("train", "--schedule", "sometimes", "--out", "never")
    assert code == 2 and err.startswith("error: Invalid value for '--schedule': ") and "'sometimes' is not one of" in err
    code, _, err = run("train", "--iterations", "ten", "--out", "never")
    assert code == 2 and err.startswith("error: Invalid value for '--iterations': ") and err.count("\n") == 1
    assert not Path("never").exists()
