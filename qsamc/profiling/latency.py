"""Measured latency tables: `qsamc profile` builds them, search's latency constraint reads them.

A table holds one entry per fused part of the encoder, timed on the target's backend as the Q/DQ ONNX
that export emits for that part (`qsamc.export.parts`), each the median of repeated runs after warm-up:
  patch_embed | resolution | conv kernel          patch embedding + positional embedding
  attention   | grid | window | qkv, proj kernels  norm1, window partition, qkv, attention, proj, residual
  mlp         | grid | hidden | lin1, lin2 kernels norm2, lin1, GELU, lin2, residual
  neck        | grid | neck.0, neck.2 kernels
A kernel is a layer's deployed containers (`Deployment.kernel`, e.g. 'int8xint8'), so every (w, a) pair
that deploys alike shares an entry. Splitting a block into its attention and MLP halves keeps the table
linear in the kernels per half (4 x 4 per half on the CPU instead of 4^4 per block); the cut is a
residual add, which no backend fuses across. Each timed run also pays the runtime's fixed cost of one
call; entries store the time net of that cost (`overhead`, timed on an empty graph).

Whole subnets are the ground truth: cut from a supernet and exported by export's own stages
(`ExtractSubnetPass`, the lowering passes, `qsamc.export.emit.emit_onnx`), then timed the same way. Each part
is cut from such a lowered subnet (one whose layers take the part's kernels) and emitted by the same
`emit_onnx`, one thread (~50 ms per part; vit_t's ~830 parts in under a minute). A part timed alone runs from warm
caches; inside a whole model its weights come from further away, so whole models run ~10-20% slower
than the sum of their parts on the CPU (measured). `profile` therefore times a few whole calibration
subnets and stores one `context_scale` (the median of measured / summed); a subnet's predicted latency
is overhead + context_scale * the sum of its entries. `--validate` measures other random subnets.

Backends: `onnxruntime` (CPU execution provider: fixed intra-op threads, ORT_ENABLE_ALL, sequential)
and `tensorrt` (per-part engines through the TensorRT Python API; needs TensorRT and an NVIDIA GPU).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qsamc.export import tensorrt_engine
from qsamc.training.runs import SupernetSpec, build_model
from qsamc.export.emit import emit_onnx
from qsamc.errors import ConfigError, TargetError
from qsamc.ir.graph import IR
from qsamc.passes import CalibrateActivationsPass
from qsamc.export.parts import lowered_subnet, one_torch_thread, part_onnx
from qsamc.supernet.space import LayerBits, SearchSpace, Subnet, default_space
from qsamc.targets import Target

TABLE_FORMAT = "qsamc.latency_table"
TABLE_VERSION = 1
CALIBRATION_SEED = "qsamc-latency-calibration"  # a stream of its own: validation never reuses these subnets


CLOCKS = ("cpu", "wall")


@dataclass(frozen=True)
class ProfileSettings:
    """How each entry is timed.

    `clock="cpu"` times the CPU time of the calling thread, which other processes on a shared machine
    cannot inflate (a 10 ms run preempted once reads 20 ms of wall time, a 0.2 ms one rarely is: wall
    clocks on a busy machine bias whole models against their parts). It needs one intra-op thread, for
    ONNX Runtime then runs every kernel on the calling thread. `clock="wall"` is for quiet machines and
    any thread count.
    """

    threads: int = 1
    warmup: int = 10
    repeats: int = 30
    clock: str = "cpu"

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ConfigError(f"the profiling clock must be one of {', '.join(CLOCKS)}, got '{self.clock}'")
        if self.clock == "cpu" and self.threads != 1:
            raise ConfigError("the cpu clock times one thread; use --threads 1, or --clock wall on a quiet machine")
        if min(self.threads, self.repeats) < 1 or self.warmup < 0:
            raise ConfigError("threads and repeats must be positive and warm-up runs not negative")


class Timer(Protocol):
    name: str

    def time(self, model: onnx.ModelProto, example: np.ndarray) -> float: ...

    def overhead(self) -> float: ...

    def libraries(self) -> dict[str, str]: ...


class OnnxRuntimeTimer:
    """Median time of `session.run` on ONNX Runtime's CPU execution provider, in a session configured
    as export's (`qsamc.export.verify.ort_session`: all optimizations, MatMulNBits accuracy level 1)."""

    name = "onnxruntime"

    def __init__(self, settings: ProfileSettings) -> None:
        import onnxruntime

        self.ort, self.settings = onnxruntime, settings

    def session(self, model: onnx.ModelProto):
        ort = self.ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def time(self, model: onnx.ModelProto, example: np.ndarray) -> float:
        session = self.session(model)
        feed = {session.get_inputs()[0].name: example}
        clock = time.thread_time if self.settings.clock == "cpu" else time.perf_counter
        for _ in range(self.settings.warmup):
            session.run(None, feed)
        times = []
        for _ in range(self.settings.repeats):
            start = clock()
            session.run(None, feed)
            times.append(clock() - start)
        return statistics.median(times)

    def overhead(self) -> float:
        return self.time(_identity_model(), np.zeros((1, 1), np.float32))

    def libraries(self) -> dict[str, str]:
        return {"onnxruntime": self.ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__}


class TensorRTTimer:
    """Median GPU time of per-part TensorRT engines, built from the same Q/DQ ONNX by export's own
    builder (`qsamc.export.tensorrt_engine`: strongly typed, one timing cache shared by all parts).
    Timed with CUDA events around `execute_async_v3`."""

    name = "tensorrt"

    def __init__(self, settings: ProfileSettings) -> None:
        reason = tensorrt_engine.missing()
        if reason is not None or not torch.cuda.is_available():
            raise TargetError(f"the tensorrt latency backend cannot run here: {reason or 'torch sees no CUDA GPU'}")
        import tensorrt

        self.trt, self.settings = tensorrt, settings
        self.folder = Path(tempfile.mkdtemp(prefix="qsamc-trt-"))
        self.runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.ERROR))

    def time(self, model: onnx.ModelProto, example: np.ndarray) -> float:
        onnx_path, engine_path = self.folder / "part.onnx", self.folder / "part.engine"
        onnx.save(model, onnx_path)
        tensorrt_engine.build_engine(onnx_path, engine_path, self.folder / "timing.cache")
        engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        context = engine.create_execution_context()
        tensors = []  # kept alive while the context holds their addresses
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT:
                tensor = torch.from_numpy(example).cuda()
            else:
                tensor = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda")
            tensors.append(tensor)
            context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.Stream()
        times = []
        for i in range(self.settings.warmup + self.settings.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            if i >= self.settings.warmup:
                times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def overhead(self) -> float:
        return self.time(_identity_model(), np.zeros((1, 1), np.float32))

    def libraries(self) -> dict[str, str]:
        return {"tensorrt": self.trt.__version__, "onnx": onnx.__version__, "torch": torch.__version__}


BACKENDS: dict[str, Callable[[ProfileSettings], Timer]] = {"onnxruntime": OnnxRuntimeTimer, "tensorrt": TensorRTTimer}


def _identity_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    return model


# --- keys: which entries a subnet sums --------------------------------------------------------------


def _key(*parts: Any) -> str:
    return "|".join(str(p) for p in parts)


class PartKeys:
    """The table keys of a subnet's fused parts, from the target's deployment of each layer's bits."""

    def __init__(self, space: SearchSpace, target: Target) -> None:
        self.space, self.target = space, target
        cfg = space.config
        self.window = {b: (0 if b in cfg.global_attn_indexes else cfg.window_size) for b in range(cfg.depth)}

    def kernel(self, subnet: Subnet, layer: str) -> str:
        kind = "linear" if layer.startswith("blocks.") else "conv"
        bits = subnet.bits_of(layer)
        return self.target.deployment.deploy(bits.w, bits.a, kind).kernel

    def keys(self, subnet: Subnet) -> list[str]:
        space, k = self.space, lambda layer: self.kernel(subnet, layer)
        grid = subnet.resolution // space.config.patch_size
        keys = [_key("patch_embed", subnet.resolution, k("patch_embed.proj"))]
        for b in space.active_blocks(subnet.depths):
            hidden = space.hidden_units(subnet.mlp_ratios[b])
            keys.append(_key("attention", grid, self.window[b], k(f"blocks.{b}.attn.qkv"), k(f"blocks.{b}.attn.proj")))
            keys.append(_key("mlp", grid, hidden, k(f"blocks.{b}.mlp.lin1"), k(f"blocks.{b}.mlp.lin2")))
        keys.append(_key("neck", grid, k("neck.0"), k("neck.2")))
        return keys

    def representatives(self, kind: str) -> dict[str, tuple[int, int]]:
        """One (w, a) pair per distinct kernel that the space's bits produce on the target."""
        out: dict[str, tuple[int, int]] = {}
        for w, a in itertools.product(self.space.weight_bits, self.space.act_bits):
            out.setdefault(self.target.deployment.deploy(w, a, kind).kernel, (w, a))  # type: ignore[arg-type]
        return out


# --- the table --------------------------------------------------------------------------------------


@dataclass
class LatencyTable:
    target: str
    backend: str
    model: str
    space: dict[str, Any]
    overhead: float
    entries: dict[str, float]
    context_scale: float = 1.0
    libraries: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    date: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "target": self.target, "backend": self.backend,
                "model": self.model, "date": self.date, "libraries": self.libraries, "machine": self.machine,
                "settings": self.settings, "space": self.space, "overhead_s": self.overhead,
                "context_scale": self.context_scale, "entries_s": self.entries}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != TABLE_FORMAT or data.get("version") != TABLE_VERSION:
                raise ConfigError(f"{path} is not a version-{TABLE_VERSION} qsamc latency table")
            return cls(data["target"], data["backend"], data["model"], data["space"], float(data["overhead_s"]),
                       {k: float(v) for k, v in data["entries_s"].items()}, float(data["context_scale"]),
                       data.get("libraries", {}),
                       data.get("machine", {}), data.get("settings", {}), data.get("date", ""))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"cannot read the latency table {path}: {exc}") from None


def default_table_path(target: Target, model: str) -> Path:
    root = Path(os.environ.get("QSAMC_LATENCY_DIR", Path.home() / ".cache" / "qsamc" / "latency"))
    return root / f"{target.name}-{target.latency_backend}-{model}.json"


class TableLatency:
    """Search's latency cost model: overhead + the table entries of a subnet's fused parts (seconds)."""

    name = "latency"
    description = "latency (measured table)"

    def __init__(self, table: LatencyTable, space: SearchSpace, target: Target, source: str = "the latency table") -> None:
        if (table.target, table.model) != (target.name, space.model):
            raise ConfigError(f"{source} was measured for {table.model} on {table.target}, not {space.model} on {target.name}")
        self.table, self.keys = table, PartKeys(space, target)
        missing = next((k for k in self.keys.keys(space.max_subnet()) + self.keys.keys(space.min_subnet())
                        if k not in table.entries), None)
        if missing is not None:
            raise ConfigError(f"{source} has no entry '{missing}' for this search space; rebuild it with "
                              f"`qsamc profile --target {target.name} --model {space.model}`")
        self.source = source

    def cost(self, subnet: Subnet) -> float:
        return self.table.overhead + self.table.context_scale * self.parts(subnet)

    def parts(self, subnet: Subnet) -> float:
        """The sum of the subnet's part entries, before the context scale."""
        entries = self.table.entries
        try:
            return sum(entries[k] for k in self.keys.keys(subnet))
        except KeyError as missing:
            raise ConfigError(f"{self.source} has no entry {missing} for this search space; rebuild it with "
                              f"`qsamc profile --target {self.keys.target.name} --model {subnet.model}`") from None


def _machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "gpu": gpu, "platform": platform.platform()}


@dataclass(frozen=True)
class PartJob:
    key: str
    subnet: Subnet  # a subnet whose layers take the part's kernels
    part: str
    block: int | None = None


def _part_jobs(space: SearchSpace, target: Target, supernet: IR) -> list[PartJob]:
    """One job per entry of the table, grouped by subnet so that each subnet is lowered once.

    For each resolution, MLP ratio and pair of linear kernels (k1, k2), a shallowest subnet of the
    reference supernet at that MLP ratio with every qkv and lin1 on k1 and every proj and lin2 on k2 (its patch
    embedding and neck layers cycling through the conv kernels and their pairs) yields the MLP entry,
    and at the first ratio the attention entries and the patch and neck entries it covers.
    """
    keys = PartKeys(space, target)
    linear, conv = keys.representatives("linear"), keys.representatives("conv")
    conv_pairs = list(itertools.product(conv, repeat=2))
    cfg, full = space.config, supernet.root.space
    windowed = next(b for b in range(cfg.depth) if b not in cfg.global_attn_indexes)
    first = ("attn.qkv", "mlp.lin1")  # the first layer of each half; the second takes the other kernel
    jobs = []
    for resolution in space.resolutions:
        grid = resolution // cfg.patch_size
        for index, ratio in enumerate(space.mlp_ratios):
            pairs = list(itertools.product(linear, repeat=2))
            for n in range(max(len(pairs), len(conv_pairs) if index == 0 else 0)):
                k1, k2 = pairs[n % len(pairs)]
                c1, c2 = conv_pairs[n % len(conv_pairs)]
                c = list(conv)[n % len(conv)]
                layer_bits = {"patch_embed.proj": conv[c], "neck.0": conv[c1], "neck.2": conv[c2]}

                def bits(layer: str) -> tuple[int, int]:
                    return layer_bits.get(layer) or linear[k1 if layer.endswith(first) else k2]

                base = full.min_subnet()  # fewest blocks to lower; it keeps a windowed and a global one
                subnet = replace(base, resolution=resolution, mlp_ratios=(ratio,) * cfg.depth,
                                 bits=tuple(LayerBits(b.layer, *bits(b.layer)) for b in base.bits))
                if n < len(pairs):
                    jobs.append(PartJob(_key("mlp", grid, space.hidden_units(ratio), k1, k2), subnet, "mlp", windowed))
                if index:
                    continue  # the other parts do not depend on the MLP ratio
                if n < len(pairs):
                    jobs += [PartJob(_key("attention", grid, keys.window[b], k1, k2), subnet, "attention", b)
                             for b in (windowed, cfg.global_attn_indexes[0])]
                if n < len(conv):
                    jobs.append(PartJob(_key("patch_embed", resolution, c), subnet, "patch_embed"))
                if n < len(conv_pairs):
                    jobs.append(PartJob(_key("neck", grid, c1, c2), subnet, "neck"))
    return jobs


def build_table(space: SearchSpace, target: Target, settings: ProfileSettings = ProfileSettings(),
                calibration: int = 10, progress: Callable[[int, int], None] | None = None) -> LatencyTable:
    """Time every fused part the space can produce on `target`, then fit the context scale on
    `calibration` random whole subnets of the reference supernet."""
    timer = BACKENDS[target.latency_backend](settings)
    supernet = reference_supernet(space)
    jobs = _part_jobs(space, target, supernet)
    overhead = timer.overhead()
    entries = {}
    lowered = functools.lru_cache(maxsize=1)(lambda subnet: lowered_subnet(supernet, subnet, target.deployment))
    for done, job in enumerate(jobs):
        model, example = part_onnx(lowered(job.subnet), job.part, job.block, target.deployment)
        entries[job.key] = max(timer.time(model, example.numpy()) - overhead, 0.0)
        if progress is not None:
            progress(done + 1, len(jobs) + calibration)
    table = LatencyTable(
        target.name, timer.name, space.model, space.to_json(), overhead, entries, 1.0, timer.libraries(),
        _machine(settings.threads), {"threads": settings.threads, "warmup": settings.warmup,
                                     "repeats": settings.repeats, "clock": settings.clock, "statistic": "median"},
        datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if calibration:
        cost, rng = TableLatency(table, space, target), random.Random(CALIBRATION_SEED)
        ratios = []
        for i in range(calibration):
            subnet = space.sample(rng)
            measured = measure_subnet(supernet, target, subnet, timer)
            ratios.append((measured - overhead) / cost.parts(subnet))
            if progress is not None:
                progress(len(jobs) + i + 1, len(jobs) + calibration)
        table.context_scale = statistics.median(ratios)
    return table


@dataclass(frozen=True)
class Validation:
    subnet: Subnet
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured


def reference_supernet(space: SearchSpace) -> IR:
    """A supernet with every quantizer, calibrated on random images: whole subnets are cut from it and
    exported exactly as `qsamc export` does (values do not change latency, the graph does). It is the
    model's whole default space, since a supernet is traced at its native resolution and starts at its
    float maximum; the subnets of a narrowed space are subnets of it. Built once per process."""
    return _reference_supernet(space.model)


@functools.lru_cache(maxsize=1)
def _reference_supernet(model: str) -> IR:
    torch.manual_seed(0)
    full = default_space(model, "layer")  # per-layer bits: the table's subnets mix kernels within a block
    with one_torch_thread():
        supernet, ir = build_model(SupernetSpec(full, num_classes=2, lora=None))
        resolution = max(full.resolutions)
        CalibrateActivationsPass(supernet, [torch.randn(2, 3, resolution, resolution)])(ir)
    return ir


def measure_subnet(supernet_ir: IR, target: Target, subnet: Subnet, timer: Timer) -> float:
    """The measured latency of a whole subnet, exported by export's own stages (extract, lower, emit)."""
    static = lowered_subnet(supernet_ir, subnet, target.deployment)
    example = torch.randn(1, 3, subnet.resolution, subnet.resolution)
    with one_torch_thread():
        model = emit_onnx(static, example, target.deployment)
    return timer.time(model, example.numpy())


def validate_table(table: LatencyTable, space: SearchSpace, target: Target, count: int, seed: int = 0,
                   settings: ProfileSettings = ProfileSettings()) -> list[Validation]:
    """Predicted vs measured latency of `count` random whole subnets of the reference supernet."""
    cost = TableLatency(table, space, target)
    timer = BACKENDS[target.latency_backend](settings)
    rng = random.Random(seed)
    supernet = reference_supernet(space)
    out = []
    for _ in range(count):
        subnet = space.sample(rng)
        out.append(Validation(subnet, cost.cost(subnet), measure_subnet(supernet, target, subnet, timer)))
    return out

