"""Training losses on the head's low-resolution logits, upsampled to the masks a few rows at a time.

The task loss is the mean per-pixel cross-entropy of the logits bilinearly upsampled to the input size
(the head's `F.interpolate`, align_corners=False). Upsampling 150 classes to 512 x 512 first would
materialise 150 x 512^2 floats, then the same again for the log-softmax autograd keeps, and twice more
for their gradients. Here bilinear upsampling is written as its two 1-D interpolation matrices
(rows x in-rows, in-columns x columns), and each chunk of output rows is upsampled, scored and summed on
its own and recomputed in backward: autograd keeps the low-resolution logits and a scalar per chunk.
The value equals upsample-then-loss to float rounding (tested).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Floats of upsampled logits per chunk (32 MB in FP32; with the log-softmax and their gradients about
# 130 MB at the peak): small next to the encoder's activations on a CPU, and few chunks (5 for 150 classes at
# 512 px), each of which costs some hundred ops.
CHUNK_ELEMENTS = 2**23
# On a GPU, memory is plentiful and every chunk costs launches and a device sync (its band of input
# rows): 512 MB per chunk scores a vit_l batch of two at 1024 px with 150 classes in 3 chunks, not 150.
CUDA_CHUNK_ELEMENTS = 2**27


def chunk_elements(device: torch.device) -> int:
    return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS

PixelLoss = Callable[..., torch.Tensor]  # (upsampled logits..., masks) -> per-pixel loss, 0 where ignored


def interpolation_matrix(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D linear interpolation, align_corners=False: the factor of
    bilinear upsampling along one axis."""
    eye = torch.eye(size_in, device=device)[None]
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].t().contiguous()


def _upsample_rows(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return rows @ (logits @ cols.t())


def _chunk_sum(pixel_loss: PixelLoss, rows: torch.Tensor, cols: torch.Tensor, first: int, masks: torch.Tensor,
               *logits: torch.Tensor) -> torch.Tensor:
    band = rows.shape[1]
    return pixel_loss(*(_upsample_rows(x[:, :, first : first + band], rows, cols) for x in logits), masks).sum()


def mean_over_pixels(pixel_loss: PixelLoss, logits: tuple[torch.Tensor, ...], masks: torch.Tensor,
                     ignore_index: int) -> torch.Tensor:
    """Mean of `pixel_loss` over the labelled pixels of `masks`, on `logits` (each [B, C, h, w])
    bilinearly upsampled to the masks' size, one chunk of rows at a time."""
    # One copy of the small logits where they are channels-last (the neck of a training supernet): a
    # band of them would otherwise reach the CPU's batched matmul as one small GEMM per image and class.
    logits = tuple(x.contiguous() for x in logits)
    batch, classes, height, width = logits[0].shape
    out_h, out_w = masks.shape[-2:]
    rows = interpolation_matrix(height, out_h, masks.device).to(logits[0].dtype)
    cols = interpolation_matrix(width, out_w, masks.device).to(logits[0].dtype)
    chunk = max(1, chunk_elements(masks.device) // (batch * classes * out_w))
    total = logits[0].new_zeros(())
    for start in range(0, out_h, chunk):
        weights = rows[start : start + chunk]
        used = weights.abs().sum(0).nonzero()  # the input rows these output rows read: a narrow band
        first, last = int(used[0]), int(used[-1]) + 1
        part = masks[:, start : start + chunk]
        if any(x.requires_grad for x in logits) and torch.is_grad_enabled():
            total = total + checkpoint(_chunk_sum, pixel_loss, weights[:, first:last], cols, first, part, *logits,
                                       use_reentrant=False)
        else:
            total = total + _chunk_sum(pixel_loss, weights[:, first:last], cols, first, part, *logits)
    return total / (masks != ignore_index).sum().clamp_min(1)


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels of `logits` upsampled to `masks` (the task loss)."""
    def cross_entropy(up: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(up, part, ignore_index=ignore_index, reduction="none")
    return mean_over_pixels(cross_entropy, (logits,), masks, ignore_index)


def pixel_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the class distributions at each pixel of logits [B, C, H, W] -> [B, H, W]."""
    target = F.log_softmax(teacher, dim=1)
    return (target.exp() * (target - F.log_softmax(student, dim=1))).sum(dim=1)


def distillation_loss(logits: torch.Tensor, reference: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean per-pixel KL(reference || subnet) of the class distributions, over labelled pixels
    (inplace distillation, as BigNAS / OFA, here from the frozen FP32 reference)."""
    def kl(student: torch.Tensor, teacher: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return pixel_kl(student, teacher) * (part != ignore_index)
    return mean_over_pixels(kl, (logits, reference), masks, ignore_index)


def feature_distillation_loss(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The mean squared difference of the encoder's output features to the reference's, relative to the
    reference features' mean square: 1 for a student that outputs zeros, whatever the features' scale."""
    return (features - reference).square().mean() / reference.square().mean().clamp_min(1e-12)
