"""`qsamc export --format trt`: a serialized TensorRT engine built from the verified Q/DQ ONNX model.

TensorRT 10's recommended build for explicit quantization: a strongly typed network (precisions come
from the ONNX types and Q/DQ nodes, no precision flags), the ONNX parser, and a timing cache that later
builds reuse. The encoder's batch axis is dynamic: one optimization profile (`BatchProfile`: min / opt
/ max batch) at the exported resolution. Where TensorRT or a GPU is missing, `missing()` says which in
one sentence and `trtexec_command` gives the equivalent command to run on a machine that has both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qsamc.errors import ConfigError

from qsamc.fileio import atomic_write_bytes


def missing() -> str | None:
    """Why no engine can be built here, or None when TensorRT and a GPU are both present."""
    try:
        import tensorrt as trt
    except ImportError:
        return "TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU)"
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except (RuntimeError, TypeError):
        return "TensorRT found no usable NVIDIA GPU"
    return None


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine serves (TensorRT optimization profile): it is tuned for `opt`."""

    min: int = 1
    opt: int = 1
    max: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"the batch profile needs 1 <= min <= opt <= max, got min {self.min}, opt {self.opt}, "
                              f"max {self.max}")

    def shapes(self, resolution: int) -> dict[str, tuple[int, int, int, int]]:
        return {k: (getattr(self, k), 3, resolution, resolution) for k in ("min", "opt", "max")}


def trtexec_command(onnx_path: Path, engine_path: Path, cache_path: Path, batch: BatchProfile | None = None,
                    resolution: int | None = None, input_name: str = "image") -> str:
    shapes = ""
    if batch is not None and resolution is not None:
        shapes = "".join(f"--{k}Shapes={input_name}:{'x'.join(map(str, v))} " for k, v in batch.shapes(resolution).items())
    return (f"trtexec --onnx={onnx_path} --stronglyTyped {shapes}--saveEngine={engine_path} "
            f"--timingCacheFile={cache_path} --useCudaGraph --noDataTransfers --useSpinWait "
            f"--separateProfileRun --dumpProfile --profilingVerbosity=detailed")


def build_engine(onnx_path: Path, engine_path: Path, cache_path: Path, batch: BatchProfile | None = None,
                 resolution: int | None = None) -> None:
    """Parse, build (with `batch`'s optimization profile on every dynamic input) and serialize; the timing
    cache is read first and written back."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if dynamic:
        if batch is None or resolution is None:
            raise ValueError(f"{onnx_path} has a dynamic batch axis: give build_engine a batch profile and resolution")
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            shapes = batch.shapes(resolution)
            profile.set_shape(tensor.name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    atomic_write_bytes(engine_path, bytes(engine))
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
