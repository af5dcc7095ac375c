"""`qsamc export --format trt`: a serialized TensorRT engine built from the verified Q/DQ ONNX model.

TensorRT 10's recommended build for explicit quantization: a strongly typed network (precisions come
from the ONNX types and Q/DQ nodes, no precision flags), the ONNX parser, and a timing cache that later
builds reuse. Where TensorRT or a GPU is missing, `missing()` says which in one sentence and
`trtexec_command` gives the equivalent command to run on a machine that has both.
"""

from __future__ import annotations

from pathlib import Path

from qsamc.checkpoint import atomic_write_bytes


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


def trtexec_command(onnx_path: Path, engine_path: Path, cache_path: Path) -> str:
    return (f"trtexec --onnx={onnx_path} --stronglyTyped --saveEngine={engine_path} "
            f"--timingCacheFile={cache_path} --useCudaGraph --noDataTransfers --useSpinWait "
            f"--separateProfileRun --dumpProfile --profilingVerbosity=detailed")


def build_engine(onnx_path: Path, engine_path: Path, cache_path: Path) -> None:
    """Parse, build and serialize; the timing cache is read first and written back."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    atomic_write_bytes(engine_path, bytes(engine))
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
