"""Cost models (qsamc/search/cost.py): budget parsing, BitOPs, the roofline estimate and the cheapest subnet."""

import pytest

from qsamc.search.cost import Budget, BitopsCost, RooflineLatency, cheapest, format_cost, parse_budget
from qsamc.errors import BudgetError, TargetError
from qsamc.passes import BitopsModel
from qsamc.ir.frontend import analysis_ir
from qsamc.supernet.space import default_space
from qsamc.targets import get_target


@pytest.fixture(scope="module")
def vit_t():
    space = default_space("vit_t")
    return space, analysis_ir(space)


@pytest.mark.parametrize("text, metric, limit", [
    ("150T", "bitops", 150e12), ("2.5P", "bitops", 2.5e15), ("3e14", "bitops", 3e14), ("40G", "bitops", 40e9),
    ("40ms", "latency", 0.040), ("12.5ms", "latency", 0.0125), ("900us", "latency", 900e-6), ("0.2s", "latency", 0.2),
])
def test_parse_budget(text, metric, limit):
    budget = parse_budget(text)
    assert budget.metric == metric
    assert budget.limit == pytest.approx(limit)


@pytest.mark.parametrize("text", ["", "abc", "-3T", "0ms", "40 parsecs", "12.5.1ms", "T150"])
def test_parse_budget_errors_are_one_sentence(text):
    with pytest.raises(BudgetError) as info:
        parse_budget(text)
    message = str(info.value)
    assert f"'{text}'" in message and "150T" in message and "40ms" in message and "\n" not in message


def test_format_cost_round_trips_through_parse():
    for budget in (Budget("bitops", 150e12), Budget("latency", 0.0125), Budget("bitops", 6.4e9)):
        assert parse_budget(str(budget)).limit == pytest.approx(budget.limit, rel=1e-3)
    assert format_cost("latency", 0.04) == "40ms"


def test_bitops_cost_is_the_foundation_model(vit_t):
    space, ir = vit_t
    cost, model = BitopsCost(ir, space), BitopsModel(ir, space)
    for subnet in (space.max_subnet(), space.min_subnet()):
        assert cost.cost(subnet) == model.cost(subnet)[1]


def test_cheapest_bitops_subnet_is_the_min_subnet(vit_t):
    space, ir = vit_t
    assert cheapest(space, BitopsCost(ir, space)) == space.min_subnet()


def test_cheapest_tries_every_pair_when_lower_bits_are_slower(vit_t):
    """A cost where 2-bit weights are dearer than 8-bit ones: the cheapest subnet must not take 2 bits."""
    space, _ = vit_t

    class Odd:
        name = "latency"

        def cost(self, subnet):
            return sum((10 if b.w == 2 else b.w) + b.a for b in subnet.bits) + subnet.resolution

    low = cheapest(space, Odd())
    assert low.resolution == min(space.resolutions)
    assert {(b.w, b.a) for b in low.bits} == {(3, 2)}


def test_roofline_is_an_estimate_that_orders_precisions(vit_t):
    space, ir = vit_t
    estimate = RooflineLatency(ir, space, get_target("a100"))
    assert "estimate" in estimate.description
    big = space.max_subnet()
    fp16, int8 = estimate.cost(space.uniform_bits(big, 32, 32)), estimate.cost(space.uniform_bits(big, 8, 8))
    assert 0 < int8 < fp16
    assert estimate.cost(space.min_subnet()) < int8


def test_roofline_on_a_target_without_peaks_is_one_sentence(vit_t):
    space, ir = vit_t
    with pytest.raises(TargetError, match=r"^target cpu has no datasheet peaks .* `qsamc profile --target cpu`"):
        RooflineLatency(ir, space, get_target("cpu"))
