"""Training kernels of the supernet's blocks: the same functions as segment-anything's, with less kept for backward.

Each module computes exactly what the SAM module it replaces computes (same parameters, same state-dict
keys) and, in eval mode or without gradients, runs SAM's own code: that is what the IR traces, what
BitOPs count and what export emits. Only training (train mode with gradients on) takes the kernels.

`SupernetMLP`: lin2 receives lin1's output and applies the GELU itself (`QuantLinear(x, activation)`),
so backward keeps the GELU's input once instead of its input and output.

`SupernetAttention`: one function, two implementations:
- the reference (segment-anything's `Attention.forward`): scores = scale q k^T + rel_h + rel_w, softmax,
  @v. The IR traces it, BitOPs count it, `FlopCounterMode` checks it, and export emits it (eval mode).
- the training kernel (train mode with gradients on): the decomposed rel-pos term is folded into the
  q.k product, so the whole core is one mask-free `scaled_dot_product_attention` (the flash kernel on
  CPU and CUDA), recomputed in backward. No N x N map is ever stored for backward: per block only the
  qkv output and the rel-pos tables are kept, where the reference stores the softmax output (12 heads x
  1024^2 floats for a global block at 512 px), its input scores and the rel-pos einsums' inputs.

Quantized attention (a space with `attention_bits`, beyond the paper): at t < 32 bits a block computes
segment-anything's attention with LSQ quantizers (zero-point 0) on scale * q, k, v and the softmax output
(`AttentionQuantizers`), so q@k and attn@v are integer matmuls once lowered. The decomposed rel-pos terms
stay float: they are computed from the float q and added to the dequantized q@k scores, as a bias would be.
Putting them on q's grid (the fold below) would quantize a position bias whose range differs from q.k's
by orders of magnitude; as float they cost the rel-pos einsums and one add, both small next to the matmuls.
In training the core (qkv output to the heads' output) is recomputed in backward, as the float kernel's
is: the attention map exists during forward and recomputation, and backward keeps only the qkv output.

The fold: rel_h[n, i] (n a query, i a key row) and rel_w[n, j] are dot products of q with rel-pos rows,
and a key at (i, j) selects column i of rel_h and column j of rel_w. So with
q' = [scale q, rel_h, rel_w] and k' = [k, onehot(row), onehot(col)], q' . k' is exactly the reference's
score. A float mask would be the obvious route, but a mask that needs a gradient sends SDPA to its math
kernel, which stores the map. v is zero-padded to q's width: the flash kernel needs one head width.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qsamc.supernet.fused import fusable
from qsamc.sam import Attention, MLPBlock, add_decomposed_rel_pos, get_rel_pos

# Flash kernels want head widths in multiples of 8.
_WIDTH_MULTIPLE = 8
# Attention maps smaller than this (floats, over the batch, windows and heads) train through the reference:
# there the extra ops and the recompute cost more time (9% of the vit_t quickstart's training) than the
# few MB of map are worth. A windowed vit_b block at 512 px has 9 x 12 x 196^2 = 4.1 M; vit_t's are < 0.5 M.
FOLD_FROM_ELEMENTS = 2**21


def relpos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed rel-pos terms rel_h (.., h) and rel_w (.., w) for q of shape (sequences, h*w, dim)
    or token-major (batch, h*w, heads, dim), in q's layout with the last axis replaced."""
    h, w = size
    n, tokens, *heads, dim = q.shape
    table_h, table_w = get_rel_pos(h, h, rel_pos_h), get_rel_pos(w, w, rel_pos_w)
    # Token-major (the export's layout): broadcast MatMuls on the tables, which ONNX Runtime runs 1.7-8x faster
    # than its Einsum; their Transposes are of constants, folded. Training's layout keeps torch's einsum.
    if heads:
        rel_h = (q.reshape(n, h, w * heads[0], dim) @ table_h.transpose(1, 2)).reshape(n, tokens, *heads, h)
        rel_w = (q.reshape(n, h, w, *heads, dim) @ table_w.transpose(1, 2)).reshape(n, tokens, *heads, w)
        return rel_h, rel_w
    grid = q.reshape(n, h, w, dim)
    return (torch.einsum("bhwc,hkc->bhwk", grid, table_h).reshape(n, tokens, h),
            torch.einsum("bhwc,wkc->bhwk", grid, table_w).reshape(n, tokens, w))


def fold_relpos(q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                size: tuple[int, int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold (module docstring): q' = [scale q, rel_h, rel_w] and k' = [k, onehot(row), onehot(col)] for
    q, k of shape (sequences, h*w, dim) or (batch, h*w, heads, dim), so that q' . k' is the reference's
    score. Their width is zero-padded to a multiple of 8 inside the one Concat (a separate Pad would copy
    again)."""
    h, w = size
    n, tokens, *heads, dim = q.shape
    rel_h, rel_w = relpos_terms(q, rel_pos_h, rel_pos_w, size)
    index = torch.arange(tokens, device=q.device)
    selectors = torch.cat([F.one_hot(index // w, h), F.one_hot(index % w, w)], dim=-1).to(k.dtype)
    selectors = selectors.reshape(1, tokens, *(1 for _ in heads), h + w).expand(n, tokens, *heads, h + w)
    zeros = q.new_zeros(n, tokens, *heads, -(dim + h + w) % _WIDTH_MULTIPLE)
    if rel_h.dtype != q.dtype:  # autocast; no Cast in an exported float graph
        rel_h, rel_w = rel_h.to(q.dtype), rel_w.to(q.dtype)
    q_fold = torch.cat([q * scale, rel_h, rel_w, zeros], dim=-1)
    k_fold = torch.cat([k, selectors, zeros], dim=-1)
    return q_fold, k_fold


def relpos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor | None,
                     rel_pos_w: torch.Tensor | None, size: tuple[int, int], scale: float) -> torch.Tensor:
    """softmax(scale q k^T + rel_h + rel_w) v for q, k, v of shape (batch x heads, h*w, head_dim), as one
    mask-free attention call (the fold above). Without rel-pos tables it is plain scaled attention."""
    if rel_pos_h is None:
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=scale)[:, 0]
    dim = q.shape[-1]
    q_fold, k_fold = fold_relpos(q, k, rel_pos_h, rel_pos_w, size, scale)
    v_fold = F.pad(v, (0, q_fold.shape[-1] - dim))
    out = F.scaled_dot_product_attention(q_fold[:, None], k_fold[:, None], v_fold[:, None], scale=1.0)
    return out[:, 0, :, :dim]


@functools.lru_cache(maxsize=32)
def _relative_index(size: int, device: torch.device) -> torch.Tensor:
    """(size, size) rows of the rel-pos table each query-key pair reads: q - k + size - 1."""
    coords = torch.arange(size, device=device)
    return coords[:, None] - coords[None, :] + (size - 1)


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """segment-anything's `get_rel_pos(size, size, rel_pos)` (its linear resize where the table is for
    another size), the index a cached constant: the same values and gradients, fewer ops per block."""
    span = 2 * size - 1
    if rel_pos.shape[0] != span:  # as segment-anything resizes it
        rel_pos = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=span, mode="linear")
        rel_pos = rel_pos.reshape(-1, span).permute(1, 0)
    return rel_pos[_relative_index(size, rel_pos.device)]


@functools.lru_cache(maxsize=32)
def _selectors(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[onehot(row), onehot(col)] per token, (1, h*w, h + w): the fold's key columns (a constant per grid)."""
    index = torch.arange(h * w, device=device)
    return torch.cat([F.one_hot(index // w, h), F.one_hot(index % w, w)], dim=-1).to(dtype)[None]


@fusable
def _fold(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor,
          selectors: torch.Tensor, scale: float, h: int, w: int):
    """(q', k', v') of the fold for (sequences, h*w, dim) operands and the rel-pos tables (`get_rel_pos`)."""
    n, tokens, dim = q.shape
    grid = q.reshape(n, h, w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid, table_h).reshape(n, tokens, h).to(q.dtype)
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid, table_w).reshape(n, tokens, w).to(q.dtype)
    zeros = q.new_zeros(n, tokens, -(dim + h + w) % _WIDTH_MULTIPLE)
    q_fold = torch.cat([q * scale, rel_h, rel_w, zeros], dim=-1)
    k_fold = torch.cat([k, selectors.expand(n, tokens, h + w), zeros], dim=-1)
    return q_fold, k_fold, F.pad(v, (0, q_fold.shape[-1] - dim))


@fusable
def _fold_backward(grad_qf: torch.Tensor, grad_kf: torch.Tensor, grad_vf: torch.Tensor, q: torch.Tensor,
                   table_h: torch.Tensor, table_w: torch.Tensor, scale: float, h: int, w: int):
    """(dL/dq, dL/dk, dL/dv, dL/dtable_h, dL/dtable_w) from the folded operands' gradients:

        rel_h[n, (y, x), i] = q[n, (y, x)] . table_h[y, i]   =>   dq += g_relh table_h[y],  dtable_h[y] = sum g_relh^T q
    """
    n, tokens, dim = q.shape
    grid = q.reshape(n, h, w, dim)
    grad_h = grad_qf[..., dim : dim + h].reshape(n, h, w, h).to(table_h.dtype)
    grad_w = grad_qf[..., dim + h : dim + h + w].reshape(n, h, w, w).to(table_w.dtype)
    grad_q = (grad_qf[..., :dim] * scale
              + torch.einsum("bhwk,hkc->bhwc", grad_h, table_h).reshape(n, tokens, dim)
              + torch.einsum("bhwk,wkc->bhwc", grad_w, table_w).reshape(n, tokens, dim))
    grad_table_h = torch.einsum("bhwk,bhwc->hkc", grad_h, grid.to(table_h.dtype)).to(table_h.dtype)
    grad_table_w = torch.einsum("bhwk,bhwc->wkc", grad_w, grid.to(table_w.dtype)).to(table_w.dtype)
    return (grad_q.to(q.dtype), grad_kf[..., :dim].to(q.dtype), grad_vf[..., :dim].to(q.dtype), grad_table_h,
            grad_table_w)


class FoldedAttention(torch.autograd.Function):
    """`relpos_attention` for training, with an explicit backward: saves q, k, v and the rel-pos tables,
    recomputes the fold and the flash attention in backward (its gradient from autograd: one kernel), and
    takes the fold's own gradient by hand (`_fold_backward`), so a block's attention core is a few dozen
    ops each way, and the fold's work one kernel each way where `qsamc.supernet.fused` compiles it."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table_h: torch.Tensor,
                table_w: torch.Tensor, size: tuple[int, int], scale: float) -> torch.Tensor:
        ctx.size, ctx.scale = size, scale
        device = q.device.type
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(q, k, v, table_h, table_w)
        selectors = _selectors(*size, k.dtype, k.device)
        q_fold, k_fold, v_fold = _fold(q, k, v, table_h, table_w, selectors, scale, *size)
        out = F.scaled_dot_product_attention(q_fold[:, None], k_fold[:, None], v_fold[:, None], scale=1.0)
        return out[:, 0, :, : q.shape[-1]]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, table_h, table_w = ctx.saved_tensors
        device = q.device.type
        autocast = (torch.autocast(device, dtype=ctx.autocast) if ctx.autocast is not None
                    else contextlib.nullcontext())
        with autocast:
            folded = _fold(q, k, v, table_h, table_w, _selectors(*ctx.size, k.dtype, k.device), ctx.scale, *ctx.size)
            with torch.enable_grad():
                leaves = [t.requires_grad_() for t in folded]  # made without grad: leaves already
                out = F.scaled_dot_product_attention(*(t[:, None] for t in leaves), scale=1.0)[:, 0]
        grad = F.pad(grad.to(out.dtype), (0, out.shape[-1] - grad.shape[-1]))
        grad_qf, grad_kf, grad_vf = torch.autograd.grad(out, leaves, grad)
        with autocast:
            grads = _fold_backward(grad_qf, grad_kf, grad_vf, q, table_h, table_w, ctx.scale, *ctx.size)
        return (*grads, None, None)


class FusedAttention(torch.autograd.Function):
    """softmax(q k^T) v per head for (batch, tokens, heads x width) operands, the scale folded into q: in
    ONNX one `com.microsoft.MultiHeadAttention` (scale 1), which ONNX Runtime's CPU provider runs fused and
    which splits and joins the heads itself (no layout Transposes around it); q and k may be wider per head
    than v (the rel-pos fold)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        b, tokens = q.shape[:2]
        q, k, v = (t.reshape(b, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
        return ((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v).transpose(1, 2).reshape(b, tokens, -1)

    @staticmethod
    def symbolic(g, q, k, v, heads):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads, scale_f=1.0)
        out.setType(v.type())  # self-attention: the output has v's shape and type
        return out


class TrainingKernel:
    """Whether a module takes its training kernel now. `TrainingKernel.enabled = False` trains through
    segment-anything's code instead (what `benchmarks/train_memory.py` compares against)."""

    enabled = True

    @classmethod
    def from_sam(cls, module: nn.Module):
        """`module` (segment-anything's) as this training kernel: its parameters, submodules and attributes
        adopted, not copied, so state-dict keys and checkpoints are unchanged."""
        new = cls.__new__(cls)
        new.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()})
        return new

    def uses_kernel(self) -> bool:
        return self.training and TrainingKernel.enabled and torch.is_grad_enabled()


class SupernetAttention(TrainingKernel, Attention):
    """segment-anything's `Attention` (same parameters and state-dict keys) with the training kernel, and
    quantized attention where the space has it (`attention_quantizers`, `attention_bits`)."""

    @classmethod
    def from_sam(cls, module: nn.Module):
        new = super().from_sam(module)
        new.attention_bits = 32
        new.fused = False  # FuseFloatAttentionPass: float attention as one fused op (the cpu target)
        new.register_module("attention_quantizers", None)  # InsertQuantizersPass adds them
        # A plain int, so the exported Reshapes carry it and ONNX shape inference sees the head size.
        new.head_dim = module.qkv.in_features // module.num_heads
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantizers = self.attention_quantizers
        if quantizers is not None and (self.attention_bits < 32 or quantizers.observing):
            return self.quantized_forward(x)
        if self.fused and self.attention_bits == 32 and not self.uses_kernel():
            return self.fused_forward(x)
        if not self.uses_kernel():
            return super().forward(x)
        b, h, w, _ = x.shape
        if b * self.num_heads * (h * w) ** 2 < FOLD_FROM_ELEMENTS:
            return super().forward(x)
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        if self.use_rel_pos:
            tables = rel_pos_table(h, self.rel_pos_h), rel_pos_table(w, self.rel_pos_w)
            out = FoldedAttention.apply(q, k, v, *tables, (h, w), self.scale)
        else:
            out = checkpoint(relpos_attention, q, k, v, None, None, (h, w), self.scale, use_reentrant=False)
        return self.proj(out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float attention as one fused attention op on the folded q', k' (module docstring): exported as
        ONNX Runtime's `MultiHeadAttention` (`FusedAttention`), which leaves out the broadcast rel-pos adds,
        the separate softmax and the head-layout Transposes (q, k, v and the output stay token-major); the
        same function as segment-anything's to float rounding."""
        b, h, w, _ = x.shape
        tokens = h * w
        q, k, v = self.qkv(x).reshape(b, tokens, 3, self.num_heads, self.head_dim).unbind(2)
        if self.use_rel_pos:
            q, k = fold_relpos(q, k, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
        else:
            q = q * self.scale
        width = self.num_heads * q.shape[-1]
        out = FusedAttention.apply(q.reshape(b, tokens, width), k.reshape(b, tokens, width),
                                   v.reshape(b, tokens, self.num_heads * self.head_dim), self.num_heads)
        return self.proj(out.reshape(b, h, w, self.num_heads * self.head_dim))

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """segment-anything's attention with scale * q, k, v and the softmax output quantized at
        `attention_bits` (observed only, while calibrating at 32); rel-pos terms float (module docstring).
        Training recomputes the core in backward, so no attention map is kept for it."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x)
        if self.uses_kernel():
            out = checkpoint(self.quantized_core, qkv, (h, w), use_reentrant=False)
        else:
            out = self.quantized_core(qkv, (h, w))
        return self.proj(out)

    def quantized_core(self, qkv: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """From the qkv output to the heads' joined output (batch, h, w, dim), quantized attention."""
        (h, w), b = size, qkv.shape[0]
        bits, quantize = self.attention_bits, self.attention_quantizers
        n, tokens, head_dim = b * self.num_heads, h * w, self.head_dim
        qkv = qkv.reshape(b, tokens, 3, self.num_heads, head_dim)
        q, v = (qkv[:, :, i].permute(0, 2, 1, 3).reshape(n, tokens, head_dim) for i in (0, 2))
        # k^T straight from the qkv output (one layout change, as q's and v's), so that its DQ feeds the
        # MatMul: an integer MatMul has no transposed-input form for the exporter's k.transpose to fuse into.
        k_t = qkv[:, :, 1].permute(0, 2, 3, 1).reshape(n, head_dim, tokens)
        attn = quantize("q", q * self.scale, bits) @ quantize("k", k_t, bits)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        out = quantize("p", attn.softmax(dim=-1), bits) @ quantize("v", v, bits)
        return out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)


class SupernetMLP(TrainingKernel, MLPBlock):
    """segment-anything's `MLPBlock` whose GELU is recomputed in lin2's backward when training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel():
            return super().forward(x)
        return self.lin2(self.lin1(x), activation=self.act)
