"""Forms of one attention core in ONNX Runtime CPU: what each costs, as emitted or fused.

    python benchmarks/attention_core.py [--threads 2] [--runs 15]

vit_b's two shapes at 512 px: a windowed block (9 windows x 12 heads of 14 x 14 tokens) and a global
block (12 heads of 32 x 32 tokens), head size 64, with SAM's decomposed rel-pos terms. Each form takes q,
k, v and computes softmax(scale q k^T + rel_h + rel_w) v:
- reference: segment-anything's ops, as `qsamc export` emits float attention;
- fold: the rel-pos terms folded into q.k (q' = [scale q, rel_h, rel_w], k' = [k, one-hot row, one-hot
  column]; `qsamc.supernet.kernels`), then plain MatMul / Softmax / MatMul;
- INT8: scale q, k^T, v and the softmax output through INT8 Q/DQ (zero-point 0), rel-pos added in float,
  as `qsamc export` emits quantized attention;
- INT8 fold: the fold with q' and k' each on one INT8 grid;
- MultiHeadAttention: ONNX Runtime's fused contrib op on the folded q', k' (the fold itself computed
  outside the timed graph): one head per (window, head) sequence, and token-major with the heads split
  by the op (`num_heads` 12; operands (windows, tokens, heads x width)), as the cpu target emits it.
The fold is `qsamc.supernet.kernels.fold_relpos` (width padded to a multiple of 8). A second table times
the rel-pos terms alone on token-major q: segment-anything's Einsum against the broadcast MatMuls on the
(constant) tables that the cpu target's fold emits.
Q/DQ scales are fixed (not calibrated): the timing does not depend on them, and the error column shows
only that the forms compute the same function (exact forms) or a quantized one. Best of `runs`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from qsamc.export.ort import ort_session
from qsamc.sam import get_rel_pos
from qsamc.supernet.kernels import fold_relpos, relpos_terms

HEADS, DIM = 12, 64
SCALE = DIM**-0.5


def rel_terms(q, h, w, rel_h, rel_w):
    n, tokens, dim = q.shape
    grid = q.reshape(n, h, w, dim)
    a = torch.einsum("bhwc,hkc->bhwk", grid, get_rel_pos(h, h, rel_h))
    b = torch.einsum("bhwc,wkc->bhwk", grid, get_rel_pos(w, w, rel_w))
    return a, b


class RelPosTables(torch.nn.Module):
    """An h x w block's rel-pos tables (fixed random values) and the form to compute with them."""

    def __init__(self, h: int, w: int, form: str) -> None:
        super().__init__()
        self.h, self.w, self.form = h, w, form
        generator = torch.Generator().manual_seed(0)
        self.rel_h = torch.nn.Parameter(torch.randn(2 * h - 1, DIM, generator=generator) * 0.1)
        self.rel_w = torch.nn.Parameter(torch.randn(2 * w - 1, DIM, generator=generator) * 0.1)


class RelPosTerms(RelPosTables):
    """rel_h and rel_w for token-major q (windows, tokens, heads, DIM): segment-anything's Einsum, or the
    cpu target's fold (`relpos_terms`)."""

    def forward(self, q):
        b, tokens, heads, _ = q.shape
        h, w = self.h, self.w
        if self.form == "matmul":
            return relpos_terms(q, self.rel_h, self.rel_w, (h, w))
        grid = q.reshape(b, h, w, heads, DIM)
        return (torch.einsum("bhwnc,hkc->bhwnk", grid, get_rel_pos(h, h, self.rel_h)).reshape(b, tokens, heads, h),
                torch.einsum("bhwnc,wkc->bhwnk", grid, get_rel_pos(w, w, self.rel_w)).reshape(b, tokens, heads, w))


class QDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        return torch.round(torch.clamp(x / scale, -128, 127)) * scale

    @staticmethod
    def symbolic(g, x, scale):
        s = g.op("Constant", value_t=torch.tensor(scale))
        z = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class Core(RelPosTables):
    """One attention core in the named form."""

    def forward(self, q, k, v):
        h, w = self.h, self.w
        n, tokens, _ = q.shape
        if self.form.endswith("fold"):
            qf, kf = fold_relpos(q, k, self.rel_h, self.rel_w, (h, w), SCALE)
            v = F.pad(v, (0, qf.shape[-1] - DIM))
            if self.form == "int8 fold":
                qf, kf = QDQ.apply(qf, 0.02), QDQ.apply(kf, 1 / 127)
            p = (qf @ kf.transpose(-2, -1)).softmax(-1)
            out = (QDQ.apply(p, 1 / 127) @ QDQ.apply(v, 0.03)) if self.form == "int8 fold" else p @ v
            return out[..., :DIM]
        int8 = self.form == "int8"
        scores = (QDQ.apply(q * SCALE, 0.02) @ QDQ.apply(k.transpose(-2, -1), 0.03)) if int8 else (q * SCALE) @ k.transpose(-2, -1)
        a, b = rel_terms(q, h, w, self.rel_h, self.rel_w)
        scores = (scores.view(n, h, w, h, w) + a[:, :, :, :, None] + b[:, :, :, None, :]).view(n, tokens, tokens)
        p = scores.softmax(-1)
        return QDQ.apply(p, 1 / 127) @ QDQ.apply(v, 0.03) if int8 else p @ v


def exported(module: torch.nn.Module, inputs, folder: Path, names=("q", "k", "v")) -> onnx.ModelProto:
    path = folder / "core.onnx"
    torch.onnx.export(module, inputs, path, opset_version=17, dynamo=False, input_names=list(names))
    model = onnx.load(path)
    model.ir_version = 10
    return model


def mha(n: int, tokens: int, width: int, heads: int) -> onnx.ModelProto:
    """com.microsoft MultiHeadAttention on (n, tokens, heads x width) q', k' and (n, tokens, heads x DIM)
    v, scale 1 (folded in q')."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, tokens, heads * (width if name != "v" else DIM)])
              for name in ("q", "k", "v")]
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=heads, scale=1.0)
    graph = helper.make_graph([node], "mha", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def timed(session: ort.InferenceSession, feed: dict, runs: int) -> tuple[float, np.ndarray]:
    out = session.run(None, feed)[0]
    best = min(_once(session, feed) for _ in range(runs))
    return best, out


def _once(session, feed) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    print(f"ONNX Runtime {ort.__version__}, {args.threads} threads, best of {args.runs}\n")
    print("| form | windowed block (ms) | error | global block (ms) | error |")
    print("|---|---:|---:|---:|---:|")
    rows: dict[str, list[str]] = {}
    for n, h, w in ((9 * HEADS, 14, 14), (HEADS, 32, 32)):
        tokens = h * w
        generator = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(n, tokens, DIM, generator=generator) for _ in range(3))
        reference = Core(h, w, "reference").eval()
        with torch.no_grad():
            expected = reference(q, k, v).numpy()
        feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
        span = float(np.abs(expected).max())
        with tempfile.TemporaryDirectory() as folder:
            for form in ("reference", "fold", "int8", "int8 fold"):
                model = exported(Core(h, w, form).eval(), (q, k, v), Path(folder))
                ms, out = timed(ort_session(model, args.threads, spinning=True), feed, args.runs)
                rows.setdefault(form, []).extend([f"{ms:.2f}", f"{np.abs(out - expected).max() / span:.1e}"])
        with torch.no_grad():
            qf, kf = fold_relpos(q, k, reference.rel_h, reference.rel_w, (h, w), SCALE)
        windows, width = n // HEADS, qf.shape[-1]

        def token_major(t: torch.Tensor) -> np.ndarray:  # (windows x heads, tokens, c) -> (windows, tokens, heads x c)
            return t.reshape(windows, HEADS, tokens, -1).transpose(1, 2).reshape(windows, tokens, -1).numpy()

        for label, heads, layout in (("MultiHeadAttention, one head per sequence", 1, lambda t: t.numpy()),
                                     ("MultiHeadAttention, token-major, 12 heads (as exported)", HEADS, token_major)):
            session = ort_session(mha(n // heads, tokens, width, heads), args.threads, spinning=True)
            ms, out = timed(session, {"q": layout(qf), "k": layout(kf), "v": layout(v)}, args.runs)
            out = out if heads == 1 else out.reshape(windows, tokens, HEADS, DIM).transpose(0, 2, 1, 3).reshape(n, tokens, DIM)
            rows.setdefault(label, []).extend([f"{ms:.2f}", f"{np.abs(out - expected).max() / span:.1e}"])
    for form, cells in rows.items():
        print(f"| {form} | {' | '.join(cells)} |")
    print("\n| rel-pos terms (token-major q) | windowed block (ms) | global block (ms) |")
    print("|---|---:|---:|")
    terms: dict[str, list[str]] = {}
    for windows, h in ((9, 14), (1, 32)):
        q = torch.randn(windows, h * h, HEADS, DIM, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = [t.numpy() for t in RelPosTerms(h, h, "einsum")(q)]
        with tempfile.TemporaryDirectory() as folder:
            for form, label in (("einsum", "Einsum (segment-anything's)"), ("matmul", "broadcast MatMul on the constant tables (the cpu target's fold)")):
                model = exported(RelPosTerms(h, h, form).eval(), (q,), Path(folder), names=("q",))
                session = ort_session(model, args.threads, spinning=True)
                ms, _ = timed(session, {"q": q.numpy()}, args.runs)
                outs = session.run(None, {"q": q.numpy()})
                assert all(np.allclose(o, e, atol=1e-4) for o, e in zip(outs, expected)), form
                terms.setdefault(label, []).append(f"{ms:.2f}")
    for label, cells in terms.items():
        print(f"| {label} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
