"""Hardware targets (targets/): dispatch, unknown names, deployment rules and restricted spaces."""

import itertools

import pytest

from qsamc.errors import TargetError
from qsamc.supernet.space import default_space
from qsamc.targets import get_target, known_targets


def test_known_targets():
    assert set(known_targets()) >= {"a100", "h100", "orin", "cpu"}


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError) as info:
        get_target("tpu")
    assert str(info.value) == f"unknown target 'tpu'; known targets are {', '.join(known_targets())}"


@pytest.mark.parametrize("name", ["a100", "h100", "orin", "cpu"])
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
    assert get_target("cpu").restrict_space(space) == space


def test_gpu_peaks_come_from_the_datasheets():
    assert get_target("a100").peaks.int8_tops == 624
    assert get_target("h100").peaks.fp8_tflops == 1979
    assert get_target("orin").peaks.memory_gbps == 204.8
    assert get_target("cpu").peaks.memory_gbps is None
