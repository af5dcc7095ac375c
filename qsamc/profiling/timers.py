"""Latency backends: how a target times one ONNX model (`Target.timer`), median of repeated runs.

`OnnxRuntimeTimer` (CPU targets): a session configured as export's (`qsamc.export.ort.ort_session`),
fixed intra-op threads, spinning as a deployment does. `TensorRTTimer` (TensorRT targets): per-part
engines built by export's own builder, timed with CUDA events; it needs TensorRT and an NVIDIA GPU.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qsamc.errors import ConfigError, TargetError
from qsamc.export import tensorrt_engine
from qsamc.export.emit import finish_model
from qsamc.export.ort import ort_session, time_runs
from qsamc.units import CLOCKS


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
    as export's (`qsamc.export.ort.ort_session`: all optimizations, MatMulNBits accuracy level 1)."""

    name = "onnxruntime"

    def __init__(self, settings: ProfileSettings) -> None:
        import onnxruntime

        self.ort, self.settings = onnxruntime, settings

    def time(self, model: onnx.ModelProto, example: np.ndarray) -> float:
        session = ort_session(model, self.settings.threads, spinning=True)
        feed = {session.get_inputs()[0].name: example}
        s = self.settings
        return statistics.median(time_runs(lambda: session.run(None, feed), s.warmup, s.repeats, s.clock))

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


def _identity_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "overhead", [x], [y])
    return finish_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


