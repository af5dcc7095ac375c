"""Training kernels (qsamc/supernet/kernels.py) and chunked losses (qsamc/task/losses.py): the same functions as
segment-anything's code and upsample-then-loss, with less kept for backward."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_
from qsamc.task import losses
from qsamc.supernet import kernels as training_kernels
from qsamc.training.runs import SupernetSpec, build_model
from qsamc.supernet.lora import LoraConfig
from qsamc.task.losses import distillation_loss, segmentation_loss
from qsamc.sam import Attention
from qsamc.supernet.space import default_space
from qsamc.supernet.kernels import SupernetAttention, TrainingKernel, relpos_attention


@pytest.fixture(autouse=True)
def fold_every_attention(monkeypatch):
    """Take the attention kernel at any size (by default small maps train through the reference)."""
    monkeypatch.setattr(training_kernels, "FOLD_FROM_ELEMENTS", 0)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest deviation of `a` from `b` relative to `b`'s peak (0 when both are all zeros)."""
    a, b = a.detach(), b.detach()
    peak = b.abs().max()
    return float((a - b).abs().max() / peak) if peak > 0 else float(a.abs().max())


@pytest.mark.parametrize("side, heads, dim", [(14, 4, 128), (16, 2, 64), (7, 1, 24)])
def test_attention_kernel_equals_segment_anything_forward_and_backward(side, heads, dim):
    reference = randomize_(Attention(dim, heads, use_rel_pos=True, input_size=(side, side)), seed=side)
    kernel = SupernetAttention.from_sam(copy.deepcopy(reference)).train()
    x = torch.randn(2, side, side, dim, generator=torch.Generator().manual_seed(1))
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = reference(x_ref), kernel(x_new)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_new.backward(grad)
    assert _relative(out_new, out_ref) < 1e-5
    assert _relative(x_new.grad, x_ref.grad) < 1e-5
    kernel_params = dict(kernel.named_parameters())
    for name, param in reference.named_parameters():
        assert _relative(kernel_params[name].grad, param.grad) < 1e-5, name
    # Eval mode (and no-grad) runs segment-anything's own code: what the IR traces and export emits.
    kernel.eval()
    assert torch.equal(kernel(x), reference(x))


def test_attention_kernel_runs_the_flash_kernel_and_keeps_no_token_by_token_map():
    side, heads, dim = 24, 2, 32
    tokens = side * side
    attention = randomize_(Attention(dim, heads, use_rel_pos=True, input_size=(side, side)))
    kernel = SupernetAttention.from_sam(copy.deepcopy(attention)).train()
    x = torch.randn(1, side, side, dim, requires_grad=True)

    def largest_saved(module) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            module(x)
        return max(sizes)

    assert largest_saved(attention) >= heads * tokens * tokens  # the reference keeps the softmax output
    assert largest_saved(kernel) < tokens * tokens
    with torch.profiler.profile() as profile:
        kernel(x).sum().backward()
    ops = {event.key for event in profile.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_small_attention_maps_train_through_the_reference(monkeypatch):
    monkeypatch.setattr(training_kernels, "FOLD_FROM_ELEMENTS", 2 * 2 * 49**2 + 1)
    reference = randomize_(Attention(16, 2, use_rel_pos=True, input_size=(7, 7)))
    kernel = SupernetAttention.from_sam(copy.deepcopy(reference)).train()
    x = torch.randn(2, 7, 7, 16)
    with torch.profiler.profile() as profile:
        out = kernel(x)
    assert torch.equal(out, reference(x))
    assert "aten::scaled_dot_product_attention" not in {event.key for event in profile.key_averages()}


def test_attention_kernel_without_rel_pos_is_plain_scaled_attention():
    q, k, v = (torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = torch.softmax(q @ k.transpose(1, 2) * 0.5, dim=-1) @ v
    assert _relative(relpos_attention(q, k, v, None, None, (2, 5), 0.5), expected) < 1e-6


def _quantized_model(lora: LoraConfig | None, bits: int):
    space = default_space("vit_t")
    torch.manual_seed(0)  # the weights are torch's default init: fixed, whichever tests ran before
    model, _ = build_model(SupernetSpec(space, num_classes=5, lora=lora))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # SAM initialises these to zero; anything else keeps torch's default init
        for name, param in model.supernet.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.train()
    subnet = replace(space.uniform_bits(space.max_subnet(), bits, bits), resolution=min(space.resolutions))
    model.supernet.set_subnet(subnet)
    model.head.set_bits(bits if bits == 32 else 8)
    return model, subnet.resolution


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("lora", [None, LoraConfig(variant="multiplex", multiplex_modules=3)])
def test_a_training_step_with_the_kernels_equals_one_through_segment_anything_code(lora, bits, monkeypatch):
    """The whole supernet with its quantizers and LoRA: same loss, same gradients. In float every gradient
    matches to float rounding; at W8A8 a rounding difference of 1e-7 can move a value across a grid
    boundary (one step), so there the whole weight gradient matches in norm to 3% and each weight's to 10%
    (on a Xeon with AVX512, one thread: 1.6% and at most 5.1%, rel_pos_w of block 8, whose gradient is
    small next to one step's; a wrong gradient term is off by its whole size). The step sizes' gradients
    are made of rounding residuals and are only checked in float."""
    model, resolution = _quantized_model(lora, bits)
    images = torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    masks = torch.randint(0, 5, (2, resolution, resolution), generator=torch.Generator().manual_seed(1))
    masks[:, :3] = 255

    def step(kernels: bool) -> tuple[float, dict[str, torch.Tensor]]:
        monkeypatch.setattr(TrainingKernel, "enabled", kernels)
        model.zero_grad(set_to_none=True)
        if kernels:
            loss = segmentation_loss(model(images, upsample=False), masks, 255)
        else:
            loss = F.cross_entropy(model(images), masks, ignore_index=255)
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = step(False)
    loss_new, grads_new = step(True)
    assert loss_new == pytest.approx(loss_ref, rel=1e-6 if bits == 32 else 1e-4)
    assert grads_new.keys() == grads_ref.keys() and len(grads_ref) > 50
    weights = [name for name in grads_ref if "_quantizer." not in name]  # LSQ+ step sizes: rounding residuals
    for name, grad in grads_ref.items():
        if bits == 32:
            assert _relative(grads_new[name], grad) < 1e-4, name
        elif name in weights:
            assert float((grads_new[name] - grad).norm()) <= 0.1 * float(grad.norm()), name
    if bits != 32:
        new, ref = (torch.cat([g[name].flatten() for name in weights]) for g in (grads_new, grads_ref))
        assert float((new - ref).norm()) <= 0.03 * float(ref.norm())


@pytest.mark.parametrize("batch, classes, grid, size", [(1, 150, 8, 128), (2, 5, 7, 112), (1, 3, 6, 6)])
def test_chunked_loss_equals_upsample_then_cross_entropy(batch, classes, grid, size, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 4096)  # many chunks, a few rows each
    generator = torch.Generator().manual_seed(size)
    logits = torch.randn(batch, classes, grid, grid, dtype=torch.float64, generator=generator, requires_grad=True)
    masks = torch.randint(0, classes, (batch, size, size), generator=generator)
    masks[:, : size // 3, : size // 2] = 255
    upsampled = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(upsampled, masks, ignore_index=255)
    (grad_expected,) = torch.autograd.grad(expected, logits)
    loss = segmentation_loss(logits, masks, 255)
    (grad,) = torch.autograd.grad(loss, logits)
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)
    assert _relative(grad, grad_expected) < 1e-12


def test_chunked_distillation_equals_upsample_then_kl(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 2048)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 5, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 6, 5, 5, dtype=torch.float64, generator=generator)
    masks = torch.randint(0, 6, (2, 80, 80), generator=generator)
    masks[0, 40:] = 255
    up = lambda t: F.interpolate(t, size=(80, 80), mode="bilinear", align_corners=False)  # noqa: E731
    target = F.log_softmax(up(teacher), dim=1)
    kl = (target.exp() * (target - F.log_softmax(up(student), dim=1))).sum(dim=1)
    valid = masks != 255
    expected = (kl * valid).sum() / valid.sum()
    loss = distillation_loss(student, teacher, masks, 255)
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)
    assert _relative(torch.autograd.grad(loss, student)[0], torch.autograd.grad(expected, student)[0]) < 1e-12


def test_a_batch_without_labelled_pixels_has_zero_loss():
    logits = torch.randn(1, 4, 4, 4, requires_grad=True)
    masks = torch.full((1, 64, 64), 255)
    loss = segmentation_loss(logits, masks, 255)
    assert float(loss) == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
