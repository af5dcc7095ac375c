"""Hardware targets (targets/): dispatch, unknown names, deployment rules and restricted spaces."""

import itertools

import pytest

from qsamc.errors import TargetError
from qsamc.profiling.timers import ProfileSettings
from qsamc.supernet.space import default_space
from qsamc.targets import get_target, known_targets


def test_known_targets():
    assert set(known_targets()) >= {"a100", "h100", "orin", "cpu", "cpu-avx2"}


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError) as info:
        get_target("tpu")
    assert str(info.value) == f"unknown target 'tpu'; known targets are {', '.join(known_targets())}"


@pytest.mark.parametrize("name", ["a100", "h100", "orin", "cpu", "cpu-avx2"])
def test_every_searched_pair_deploys_in_a_real_container(name):
    target = get_target(name)
    fmt = target.deployment
    for w, a in itertools.product((2, 3, 4, 8, 32), repeat=2):
        for kind in ("linear", "conv"):
            d = fmt.deploy(w, a, kind)
            assert d.weight in ("int4", "int8", fmt.float_type) and d.act in ("int8", fmt.float_type)
            assert d.weight != "int4" or kind == "linear"  # INT4 is weight-only GEMMs
            if w <= 8 and a <= 8:
                assert d.kernel == "int8xint8"  # 2/3-bit grids ride in INT8 containers


@pytest.mark.parametrize("name", ["a100", "h100", "orin"])
def test_gpu_targets_restrict_activations_to_8_bits_or_float(name):
    space = get_target(name).restrict_space(default_space("vit_t"))
    assert space.act_bits == (8, 32) and space.weight_bits == (4, 8, 32)


def test_cpu_keeps_the_whole_space():
    space = default_space("vit_t")
    assert get_target("cpu").restrict_space(space) == space == get_target("cpu-avx2").restrict_space(space)


def test_gpu_peaks_come_from_the_datasheets():
    assert get_target("a100").peaks.int8_tops == 624
    assert get_target("h100").peaks.fp8_tflops == 1979
    assert get_target("orin").peaks.memory_gbps == 204.8
    assert get_target("cpu").peaks.memory_gbps is None


def test_each_target_owns_its_lowering_emission_and_latency_backend():
    """The phases that differ between runtimes are asked of the target, never decided by its name."""
    from qsamc.passes import (FoldOffsetIntoNormPass, FoldWeightQuantizersPass, LowerActivationOffsetsPass,
                              LowerAttentionQuantizersPass, QuantizeBiasPass, FuseFloatAttentionPass)

    common = [FoldWeightQuantizersPass, LowerActivationOffsetsPass, FoldOffsetIntoNormPass, LowerAttentionQuantizersPass]
    cpu = get_target("cpu")
    # ORT fuses INT32 biases, and runs float attention as its fused MultiHeadAttention
    assert [type(p) for p in cpu.lowering_passes()] == [*common, QuantizeBiasPass, FuseFloatAttentionPass]
    assert (cpu.onnx_opset(int4=False), cpu.onnx_opset(int4=True)) == (17, 21)
    assert (cpu.engine_format, cpu.lint_required, cpu.latency_backend) == (None, False, "onnxruntime")
    for name in ("a100", "h100", "orin"):
        gpu = get_target(name)
        assert [type(p) for p in gpu.lowering_passes()] == common  # TensorRT fuses float biases itself
        assert (gpu.onnx_opset(int4=False), gpu.onnx_opset(int4=True)) == (19, 21)  # FP16 Q/DQ scales
        assert (gpu.engine_format, gpu.lint_required, gpu.latency_backend) == ("trt", True, "tensorrt")
        fp32 = gpu.with_float_type("fp32")
        assert fp32.deployment.float_type == "fp32" and fp32.onnx_opset(int4=False) == 17
        assert fp32.name == gpu.name and gpu.deployment.float_type == "fp16"
    assert type(cpu.timer(ProfileSettings())).__name__ == "OnnxRuntimeTimer"
    # cpu-avx2: cpu's lowering and runtime; only its emitted INT8 is written as UINT8 (tests/test_export.py)
    avx2 = get_target("cpu-avx2")
    assert [type(p) for p in avx2.lowering_passes()] == [type(p) for p in cpu.lowering_passes()]
    assert avx2.deployment == cpu.deployment
    assert (avx2.unsigned_int8, cpu.unsigned_int8, avx2.latency_backend) == (True, False, "onnxruntime")
    with pytest.raises(TargetError, match=r"^target cpu builds no engine; it exports onnx$"):
        cpu.build_engine(None, None, None, 256)


def test_the_tensorrt_timer_says_what_is_missing_here():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(TargetError, match=r"^the tensorrt latency backend cannot run here: TensorRT is not installed"):
        get_target("a100").timer(ProfileSettings())
