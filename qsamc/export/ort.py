"""ONNX Runtime sessions and timing, one of each for every stage that runs a model: export's checks
and its latency figure, the latency tables' timer, the baselines and the benchmarks."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import onnx
import onnxruntime as ort

from qsamc.threads import current as current_threads
from qsamc.units import CLOCKS


def ort_session(model: onnx.ModelProto, threads: int | None = None, profile: bool = False,
                exact: bool = False, spinning: bool = False) -> ort.InferenceSession:
    """A CPU session with the command's thread count (`qsamc.threads`) unless `threads` is given.
    Waiting threads sleep rather than spin, except with `spinning` (sessions that time a model: a
    deployment spins). INT4 MatMulNBits computes with float activations (accuracy level 1): its default
    (4) quantizes them to INT8 on the fly, which the subnet never did. `exact`: graph optimisations
    off, so no fused integer kernel runs and the graph is evaluated as written (what the part check
    falls back to, to tell a lowering defect from a CPU's kernels)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or current_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if exact
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.enable_profiling = profile
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_runs(run: Callable[[], object], warmup: int, repeats: int, clock: str = "wall") -> list[float]:
    """Seconds of each of `repeats` calls of `run`, after `warmup` untimed calls, on `clock` (`wall`, or
    `cpu`: the calling thread's CPU time, which other processes cannot inflate)."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = now()
        run()
        times.append(now() - start)
    return times


@dataclass(frozen=True)
class Latency:
    """Wall time of one inference on this machine, in milliseconds."""

    median_ms: float
    best_ms: float
    threads: int
    runs: int

    def to_json(self) -> dict:
        return asdict(self)


def ort_latency(session: ort.InferenceSession, example, runs: int = 10) -> Latency:
    """Median and best wall time of one inference (after one warm-up run)."""
    feed = {session.get_inputs()[0].name: example.numpy()}
    times = [t * 1e3 for t in time_runs(lambda: session.run(None, feed), warmup=1, repeats=runs)]
    return Latency(statistics.median(times), min(times), session.get_session_options().intra_op_num_threads, runs)
