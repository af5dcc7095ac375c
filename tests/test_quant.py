"""Tests for the LSQ+ fake quantizers: exact forward values, exact gradients, init, export, banks."""

import math

import pytest
import torch

from qsamc.supernet.quant import LsqActQuantizer, LsqWeightQuantizer, QuantizerBank, act_range, weight_range


def weight_q(bits, scale, channels=None):
    q = LsqWeightQuantizer(bits, channels)
    with torch.no_grad():
        q.scale.copy_(torch.as_tensor(scale))
    q.initialized.fill_(True)
    return q


def act_q(bits, scale, offset):
    q = LsqActQuantizer(bits)
    with torch.no_grad():
        q.scale.fill_(scale)
        q.offset.fill_(offset)
    q.initialized.fill_(True)
    return q


def test_ranges():
    assert [weight_range(b) for b in (2, 3, 4, 8)] == [(-2, 1), (-4, 3), (-8, 7), (-128, 127)]
    assert [act_range(b) for b in (2, 3, 4, 8)] == [(0, 3), (0, 7), (0, 15), (0, 255)]


# (bits, s, w, expected): v = w / s, clipped at both ends of weight_range(bits), rounded, times s.
WEIGHT_CASES = [
    (2, 0.5, [-2.0, -0.9, -0.2, 0.2, 0.4, 0.6, 3.0], [-1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 0.5]),
    (3, 0.25, [-2.0, -0.3, 0.05, 0.3, 0.7, 0.9], [-1.0, -0.25, 0.0, 0.25, 0.75, 0.75]),
    (4, 0.125, [-5.0, -0.3, 0.1, 0.6, 0.9, 1.0], [-1.0, -0.25, 0.125, 0.625, 0.875, 0.875]),
    (8, 1 / 64, [-3.0, -1.0, 0.1, 1.99, 2.5], [-2.0, -1.0, 0.09375, 1.984375, 1.984375]),
]

# (bits, s, beta, x, expected): v = (x - beta) / s clipped to [0, 2**b - 1], rounded, times s, plus beta.
ACT_CASES = [
    (2, 0.5, -0.25, [-1.0, -0.2, 0.3, 0.9, 2.0], [-0.25, -0.25, 0.25, 0.75, 1.25]),
    (3, 0.25, 0.5, [0.0, 0.6, 1.1, 2.4, 5.0], [0.5, 0.5, 1.0, 2.25, 2.25]),
    (4, 0.125, -1.0, [-2.0, -0.9, 0.3, 0.85, 3.0], [-1.0, -0.875, 0.25, 0.875, 0.875]),
    (8, 1 / 32, -4.0, [-5.0, -3.99, 0.01, 3.96, 10.0], [-4.0, -4.0, 0.0, 3.96875, 3.96875]),
]


@pytest.mark.parametrize("bits,s,w,expected", WEIGHT_CASES)
def test_weight_forward_exact(bits, s, w, expected):
    out = weight_q(bits, s)(torch.tensor(w))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor(expected))


@pytest.mark.parametrize("bits,s,beta,x,expected", ACT_CASES)
def test_act_forward_exact(bits, s, beta, x, expected):
    out = act_q(bits, s, beta)(torch.tensor([x]))
    assert torch.equal(out, torch.tensor([expected]))


def test_weight_gradients_by_hand():
    # v = [-4, -1.8, -0.4, 0.4, 0.8, 1.2, 6] on [-2, 1]: below, 4 inside, 2 above.
    q = weight_q(2, 0.5)
    w = torch.tensor([-2.0, -0.9, -0.2, 0.2, 0.4, 0.6, 3.0], requires_grad=True)
    upstream = torch.arange(1.0, 8.0)
    q(w).backward(upstream)
    assert torch.equal(w.grad, upstream * torch.tensor([0.0, 1, 1, 1, 1, 0, 0]))
    # ds terms: -Qn=-2 below; round(v)-v = -0.2, 0.4, -0.4, 0.2 inside; Qp=1 above. g = 1/sqrt(7 * 1).
    ds = -2 * 1 - 0.2 * 2 + 0.4 * 3 - 0.4 * 4 + 0.2 * 5 + 1 * 6 + 1 * 7
    assert q.scale.grad.item() == pytest.approx(ds / math.sqrt(7), rel=1e-6)


def test_act_gradients_by_hand_use_one_sample_for_g():
    # v = [-1.5, 0.1, 1.1, 2.3, 4.5] on [0, 3]: below, 3 inside, above. Two identical samples.
    q = act_q(2, 0.5, -0.25)
    x = torch.tensor([[-1.0, -0.2, 0.3, 0.9, 2.0]] * 2, requires_grad=True)
    upstream = torch.arange(1.0, 6.0).expand(2, 5)
    q(x).backward(upstream)
    assert torch.equal(x.grad, upstream * torch.tensor([0.0, 1, 1, 1, 0]))
    g = 1 / math.sqrt(5 * 3)  # N = 5 elements of one sample, not 10; Qp = 3
    ds = 0 * 1 - 0.1 * 2 - 0.1 * 3 - 0.3 * 4 + 3 * 5  # n=0 below, round(v)-v inside, p=3 above
    assert q.scale.grad.item() == pytest.approx(2 * ds * g, rel=1e-6)
    assert q.offset.grad.item() == pytest.approx(2 * (1 + 5) * g, rel=1e-6)  # 1 outside, 0 inside


def _grad_scale(t, g):
    return (t - t * g).detach() + t * g


def _round_ste(t):
    return (t.round() - t).detach() + t


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gradients_match_detach_trick_reference(bits):
    # An independent LSQ+ written with the grad_scale / round_pass detach tricks (LSQ paper, Fig. 2 code).
    torch.manual_seed(bits)
    x = (torch.randn(3, 7, 5) * 2).requires_grad_()
    upstream = torch.randn(3, 7, 5)
    q = act_q(bits, 0.7 / 2**bits * 4, -0.5)
    q(x).backward(upstream)

    n, p = act_range(bits)
    g = 1 / math.sqrt(35 * p)
    xr = x.detach().clone().requires_grad_()
    s = torch.tensor(q.scale.item(), requires_grad=True)
    beta = torch.tensor(q.offset.item(), requires_grad=True)
    s_, b_ = _grad_scale(s, g), _grad_scale(beta, g)
    (_round_ste(((xr - b_) / s_).clamp(n, p)) * s_ + b_).backward(upstream)
    # The reference's x-gradient passes through * s / s, so it differs from upstream * mask by an ulp.
    assert torch.equal(x.grad == 0, xr.grad == 0) and torch.allclose(x.grad, xr.grad, rtol=1e-6, atol=0)
    assert q.scale.grad.item() == pytest.approx(s.grad.item(), rel=1e-4)
    assert q.offset.grad.item() == pytest.approx(beta.grad.item(), rel=1e-4)

    wq = weight_q(bits, [0.3, 0.05, 0.8], channels=3)
    w = torch.randn(2, 6, requires_grad=True)  # elastic: 2 of 3 rows
    w_upstream = torch.randn(2, 6)
    wq(w).backward(w_upstream)
    n, p = weight_range(bits)
    wr = w.detach().clone().requires_grad_()
    s = torch.tensor([[0.3], [0.05]], requires_grad=True)
    s_ = _grad_scale(s, 1 / math.sqrt(6 * max(p, 1)))
    (_round_ste((wr / s_).clamp(n, p)) * s_).backward(w_upstream)
    assert torch.equal(w.grad == 0, wr.grad == 0) and torch.allclose(w.grad, wr.grad, rtol=1e-6, atol=0)
    assert wq.scale.grad.tolist() == pytest.approx(s.grad.flatten().tolist() + [0.0], rel=1e-4)


def test_masks_match_finite_differences_of_smooth_surrogate():
    # Without rounding, x_hat = clamp(v, n, p) s + beta is piecewise linear: its finite-difference slopes
    # in x and beta are exactly the STE/clip masks, and in s it is n/p outside and 0 inside.
    q = act_q(3, 0.25, 0.5)
    x = torch.tensor([[0.0, 0.6, 1.1, 2.4, 5.0]], dtype=torch.float64, requires_grad=True)
    q(x).sum().backward()
    n, p, h = 0, 7, 1e-6

    def smooth(x, s, beta):
        return ((x - beta) / s).clamp(n, p) * s + beta

    xd = x.detach()
    fd_x = (smooth(xd + h, 0.25, 0.5) - smooth(xd - h, 0.25, 0.5)) / (2 * h)
    fd_s = (smooth(xd, 0.25 + h, 0.5) - smooth(xd, 0.25 - h, 0.5)) / (2 * h)
    fd_b = (smooth(xd, 0.25, 0.5 + h) - smooth(xd, 0.25, 0.5 - h)) / (2 * h)
    assert torch.allclose(x.grad, fd_x, atol=1e-6)
    v = (xd - 0.5) / 0.25
    inside = (v >= n) & (v <= p)
    g = 1 / math.sqrt(5 * p)
    expected_s = (fd_s + inside * (v.round() - v)).sum() * g
    assert q.scale.grad.item() == pytest.approx(expected_s.item(), rel=1e-6)
    assert q.offset.grad.item() == pytest.approx(fd_b.sum().item() * g, rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_integer_reproduces_forward(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    wq = LsqWeightQuantizer(bits)
    ints, scale = wq.integer(w)
    assert ints.dtype == torch.int8
    lo, hi = weight_range(bits)
    assert lo <= ints.min().item() and ints.max().item() <= hi
    assert torch.equal(ints * scale, wq(w))

    x = torch.randn(2, 10) * 3
    aq = act_q(bits, 4.0 / 2**bits, -1.0)
    grid = aq.integer(x)
    lo, hi = act_range(bits)
    assert torch.equal(grid, grid.round()) and lo <= grid.min().item() and grid.max().item() <= hi
    assert grid.min().item() == lo and grid.max().item() == hi  # both ends clip
    assert torch.equal(grid * aq.scale + aq.offset, aq(x))


def test_weight_init_lsq_plus():
    q = LsqWeightQuantizer(4)
    q(torch.tensor([[-0.5, 1.5], [-0.5, 1.5]]))  # lazy init on first use: mu = 0.5, sigma = 1
    assert bool(q.initialized)
    assert q.scale.item() == 3.5 / 8  # max(|0.5 - 3|, |0.5 + 3|) / 2**3


def test_per_channel_init_shape_and_slicing():
    q = LsqWeightQuantizer(2, channels=3)
    assert q.scale.shape == (3,)
    rows = torch.tensor([[-1.0, 1.0, -1.0, 1.0], [0.0, 2.0, 0.0, 2.0]])  # per row: (mu, sigma) = (0, 1), (1, 1)
    q.initialize(rows)
    whole_sigma = math.sqrt(1.25)  # the unseen third row gets the value of all of w (mu = 0.5)
    assert q.scale.tolist() == pytest.approx([3 / 2, 4 / 2, (0.5 + 3 * whole_sigma) / 2])
    with pytest.raises(ValueError):
        q(torch.zeros(4, 4))


def test_per_channel_forward_and_grad_use_first_k_rows():
    q = weight_q(2, [0.5, 0.25, 1.0], channels=3)
    w = torch.tensor([[0.3, -2.0], [0.3, 0.1]])  # v row 0 = [0.6, -4], row 1 = [1.2, 0.4]
    out = q(w)
    assert torch.equal(out, torch.tensor([[0.5, -1.0], [0.25, 0.0]]))
    out.sum().backward()
    g = 1 / math.sqrt(2 * 1)  # N = elements per row
    assert q.scale.grad.tolist() == pytest.approx([(0.4 - 2) * g, (1 - 0.4) * g, 0.0])
    ints, scale = q.integer(w)
    assert scale.shape == (2, 1) and torch.equal(ints * scale, out.detach())


def test_act_init_from_observed_min_max():
    q = LsqActQuantizer(4)
    with pytest.raises(RuntimeError):
        q.initialize()
    for batch in ([[-1.0, 0.5]], [[2.0, 3.0]], [[0.0, 1.0]]):
        q.observe(torch.tensor(batch))
    q.initialize()
    assert q.scale.item() == pytest.approx(4 / 15) and q.offset.item() == -1.0

    constant = LsqActQuantizer(4)  # max == min: s stays positive and the constant is exact
    x = torch.full((2, 3), 2.0)
    assert torch.equal(constant(x), x)
    assert constant.scale.item() == pytest.approx(1 / 15) and constant.offset.item() == 2.0


def test_integer_zero_point_keeps_zero_on_the_grid():
    """SAM's normalised image spans -2.1179..2.64 and is zero-padded: LSQ+'s continuous offset moves the padding
    to the nearest grid value, an integer zero point keeps it 0; the gradients are LSQ+'s."""
    x = torch.tensor([[-2.1179, 0.0, 2.64]])
    continuous, integer = LsqActQuantizer(4), LsqActQuantizer(4, "integer")
    for q in (continuous, integer):
        q.observe(x)
        q.initialize()
    s = (2.64 + 2.1179) / 15
    assert continuous.scale.item() == pytest.approx(s) and integer.offset.item() == pytest.approx(-2.1179)
    assert continuous(x)[0, 1].item() == pytest.approx(7 * s - 2.1179, abs=1e-6)  # round(6.68) = 7 steps above beta
    assert integer.grid_offset().item() == pytest.approx(-7 * s, abs=1e-6)  # round(-6.68) = -7: z = 7
    assert integer(x)[0, 1].item() == 0.0
    assert torch.equal(integer.integer(x), torch.tensor([[0.0, 7.0, 15.0]]))  # the top now clips: 15.32 steps up
    clipped = torch.tensor([[-5.0, 10.0]])  # below and above the grid: LSQ+'s dbeta = 1, ds = n = 0 and p = 15
    for q in (continuous, integer):
        q(clipped).sum().backward()
    assert torch.equal(integer.offset.grad, continuous.offset.grad) and integer.offset.grad.item() > 0
    assert torch.equal(integer.scale.grad, continuous.scale.grad)
    with pytest.raises(ValueError, match="zero_point must be one of integer, continuous, got 'half'"):
        LsqActQuantizer(4, "half")


def test_act_lazy_init_from_batch():
    q = LsqActQuantizer(2)
    x = torch.tensor([[-3.0, -1.0, 3.0]])
    assert torch.equal(q(x), x)  # s = 6 / 3 = 2, beta = -3: v = 0, 1, 3 lie on the grid
    assert bool(q.initialized) and q.scale.item() == 2.0 and q.offset.item() == -3.0


def test_scale_kept_positive_and_recovers():
    q = weight_q(4, -0.1)
    w = torch.tensor([0.3, -0.3])
    out = q(w)
    assert torch.all(out.abs() > 0) and torch.all(out.abs() < 1e-6)
    out.sum().backward()
    assert q.scale.grad.item() != 0.0  # straight through the clamp: the raw parameter can move back


def test_saves_only_inputs_for_backward():
    full = []

    def pack(t):
        if t.numel() > 1:
            full.append(t.shape)
        return t

    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        act_q(4, 0.1, 0.0)(x)
    assert full == [(4, 8)]


def test_half_precision_keeps_dtype():
    x = torch.randn(2, 8).bfloat16()
    assert act_q(8, 0.05, -3.0)(x).dtype == torch.bfloat16
    assert LsqWeightQuantizer(8)(x).dtype == torch.bfloat16


def test_bad_bits_rejected():
    for bits in (0, 16, 32):
        with pytest.raises(ValueError):
            LsqWeightQuantizer(bits)
        with pytest.raises(ValueError):
            LsqActQuantizer(bits)


def test_bank_32_is_identity_without_parameters():
    bank = QuantizerBank("act", [32])
    x = torch.randn(2, 3)
    assert bank(x, 32) is x
    assert list(bank.parameters()) == [] and 32 not in bank
    with pytest.raises(KeyError):
        bank[32]
    with pytest.raises(KeyError):
        bank(x, 4)


@pytest.mark.parametrize("kind", ["weight", "act"])
def test_bank_switching_bits_switches_parameters(kind):
    bank = QuantizerBank(kind, [2, 4, 8, 32])
    assert bank.bit_choices == (2, 4, 8, 32)
    assert sorted(bank.quantizers) == ["2", "4", "8"] and 4 in bank and 3 not in bank
    assert bank[4].bits == 4 and bank[4] is not bank[8]
    x = torch.randn(3, 5)
    assert torch.equal(bank(x, 4), bank[4](x))
    bank(x, 4).sum().backward()
    assert bank[4].scale.grad is not None
    assert bank[2].scale.grad is None and bank[8].scale.grad is None
    assert bool(bank[4].initialized) and not bool(bank[2].initialized)


def test_bank_per_channel_and_state_dict_round_trip():
    bank = QuantizerBank("weight", [3, 8], channels=6)
    assert bank[3].scale.shape == (6,)
    w = torch.randn(6, 4)
    out = bank(w, 3)
    fresh = QuantizerBank("weight", [3, 8], channels=6)
    fresh.load_state_dict(bank.state_dict())
    assert bool(fresh[3].initialized) and torch.equal(fresh(w, 3), out)
    with pytest.raises(ValueError):
        QuantizerBank("act", [8], channels=6)
