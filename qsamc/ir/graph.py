"""The graph IR: the supernet traced into a networkx DiGraph, one node per meaningful operation.

`trace(supernet)` runs `torch.export` (non-strict) on the supernet at its maximum subnet and groups the
ATen nodes by the module that produced them: one IR node per quantizable layer (`conv`, `linear`), per
attention core (`attention`: the q@k, rel-pos, softmax and @v of one `Attention`), per norm (`norm`),
per activation (`act`) and per group of elementwise or layout operations (`elementwise`: window
partition, residual adds, positional-embedding interpolation). Every node keeps the module path it acts
on, so passes can reach the real module (`ir.module_of(node)`).

Node attributes, by the pass that adds them:
- trace:                      kind, module, ops (ATen op names), shape (traced output shape)
- AnnotateStructurePass:      stage, block, elastic (subset of tokens/hidden/depth), and per kind the
                              static geometry the cost formulas need (features, channels, heads, window)
- AnnotatePrecisionPass:      quantizable, candidate_bits {"w": [...], "a": [...]}, bits [w, a] | None
- CountBitopsPass:            macs, bitops (and the graph attribute "cost")
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import networkx as nx
import torch
from torch import nn

from qsamc.ir import trace_cache
from qsamc.ir.bitops import BitopsReport
from qsamc.supernet.layers import QuantConv2d, QuantLinear
from qsamc import sam
from qsamc.sam import Attention, LayerNorm2d
from qsamc.supernet.space import LayerBits, Subnet

KINDS = ("input", "output", "conv", "linear", "attention", "norm", "act", "elementwise")
IR_FORMAT = "qsamc.ir"
IR_VERSION = 1

_ANCHORS: tuple[tuple[type, str], ...] = (
    (QuantConv2d, "conv"),
    (QuantLinear, "linear"),
    (nn.LayerNorm, "norm"),
    (LayerNorm2d, "norm"),
    (nn.GELU, "act"),
)
# ATen ops that only carry metadata; they do not become part of any node.
_IGNORED_OPS = {"_assert_tensor_metadata"}


class IRVerificationError(RuntimeError):
    """The IR broke an invariant: an internal error, with the pass that broke it."""


@dataclass
class IR:
    """A traced supernet: `graph` plus the model name and (when bound) the traced module.

    `subnet` is the one subnet the IR describes, when it describes one (`AnnotatePrecisionPass` with a
    subnet, `ExtractSubnetPass`): the single source of its bits and token grid. `cost` is what
    `CountBitopsPass` counted."""

    graph: nx.DiGraph
    model: str
    root: nn.Module | None = field(default=None, repr=False)
    subnet: Subnet | None = None
    cost: BitopsReport | None = None

    @property
    def token_grid(self) -> int:
        if self.subnet is None:
            raise RuntimeError("this IR describes no subnet, so it has no token grid")
        return self.subnet.grid

    def bits_of(self, node: str) -> LayerBits | None:
        """The subnet's bits of a quantizable node; None for float nodes or an IR without a subnet."""
        attrs = self.graph.nodes[node]
        if not attrs.get("quantizable") or self.subnet is None:
            return None
        return self.subnet.bits_of(attrs["module"])

    def nodes(self, kind: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name, attributes) in topological order, optionally of one kind."""
        for name in nx.topological_sort(self.graph):
            attrs = self.graph.nodes[name]
            if kind is None or attrs["kind"] == kind:
                yield name, attrs

    def modules(self, kind: str) -> Iterator[tuple[str, dict[str, Any], nn.Module]]:
        """(name, attributes, module) of every node of one kind, in topological order."""
        for name, attrs in self.nodes(kind):
            yield name, attrs, self.module_of(name)

    def quantizable(self) -> list[str]:
        return [n for n, a in self.nodes() if a.get("quantizable")]

    def module_of(self, node: str) -> nn.Module:
        if self.root is None:
            raise RuntimeError("this IR is not bound to a module (it was read from JSON)")
        return self.root.get_submodule(self.graph.nodes[node]["module"])

    def to_json(self) -> dict[str, Any]:
        data = nx.node_link_data(self.graph, edges="edges")
        return {"format": IR_FORMAT, "version": IR_VERSION, "model": self.model, "graph": data,
                "subnet": None if self.subnet is None else self.subnet.to_json(),
                "cost": None if self.cost is None else self.cost.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IR:
        subnet = None if data.get("subnet") is None else Subnet.from_json(data["subnet"])
        cost = None if data.get("cost") is None else BitopsReport.from_json(data["cost"])
        return cls(nx.node_link_graph(data["graph"], edges="edges"), data["model"], subnet=subnet, cost=cost)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, default=_jsonable) + "\n")

    def to_dot(self) -> str:
        """Graphviz DOT, one box per node, coloured by kind, labelled with module, bits and MACs."""
        colours = {"conv": "lightblue", "linear": "lightblue", "attention": "khaki", "norm": "lightgrey",
                   "act": "palegreen", "elementwise": "white", "input": "pink", "output": "pink"}
        lines = ["digraph qsamc {", "  rankdir=TB;", '  node [shape=box, style=filled, fontname="monospace"];']
        for name, attrs in self.nodes():
            label = [name, attrs["kind"]]
            bits = self.bits_of(name)
            if bits is not None:
                label.append(f"W{bits.w}A{bits.a}")
            if "macs" in attrs:
                label.append(f"{attrs['macs'] / 1e6:.2f} MMAC")
            text = "\\n".join(label)
            lines.append(f'  "{name}" [label="{text}", fillcolor={colours[attrs["kind"]]}];')
        lines += [f'  "{u}" -> "{v}";' for u, v in self.graph.edges]
        lines.append("}")
        return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _anchor(stack: list[tuple[str, type]]) -> tuple[str, str] | None:
    """The innermost module of the stack that is an IR node of its own, with its kind."""
    for path, cls in reversed(stack):
        for anchor_cls, kind in _ANCHORS:
            if isinstance(cls, type) and issubclass(cls, anchor_cls):
                return path, kind
    for path, cls in reversed(stack):
        if isinstance(cls, type) and issubclass(cls, Attention):
            return path, "attention"
    return None


def _module_stack(node: torch.fx.Node, types_by_path: dict[str, type]) -> list[tuple[str, type]]:
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, types_by_path.get(path, object)) for path, _ in stack.values()]


# Traced graphs by the structure they were traced from (`_structure_key`): torch.export takes seconds, and
# one command builds the same supernet more than once (an export builds the trained model and a fresh one).
# Across commands they are kept on disk (`trace_cache`).
_TRACED: dict[tuple, trace_cache.TraceData] = {}


def _structure_key(supernet: nn.Module, model: str) -> tuple:
    """Everything the traced graph depends on: the encoder's configuration, the search space, the traced
    resolution, every module's path and class, every parameter's and buffer's path and shape, the device
    type. Weights and buffer values do not change the graph."""
    return (model, repr(sam.MODEL_ZOO.get(model)), json.dumps(supernet.space.to_json(), sort_keys=True),
            supernet.subnet.resolution, supernet.pos_embed.device.type,
            tuple((name, type(m).__qualname__) for name, m in supernet.named_modules()),
            tuple((name, tuple(t.shape)) for name, t in supernet.state_dict(keep_vars=True).items()))


def trace(supernet: nn.Module, model: str) -> IR:
    """Trace `supernet` at its current subnet (normally the maximum) into an IR. A supernet of the same
    structure as one traced before (in this process, or by an earlier command through `trace_cache`) gets a
    copy of that graph, bound to it."""
    key = _structure_key(supernet, model)
    if key not in _TRACED:
        data = trace_cache.load(key)
        if data is None:
            data = _trace_graph(supernet)
            trace_cache.store(key, data)
        _TRACED[key] = data
    ir = IR(_graph_of(_TRACED[key]), model, supernet)
    verify_ir(ir, after="trace")
    return ir


def _graph_of(data: trace_cache.TraceData) -> nx.DiGraph:
    """The DiGraph of traced nodes and edges, built in their order (so successors and predecessors keep it)."""
    nodes, edges = data
    graph = nx.DiGraph()
    for name, attrs in nodes:
        graph.add_node(name, **copy.deepcopy(attrs))
    graph.add_edges_from(edges)
    return graph


def _trace_graph(supernet: nn.Module) -> trace_cache.TraceData:
    """torch.export of `supernet` at its current subnet, grouped into IR nodes: (nodes, edges) as plain data."""
    resolution = supernet.subnet.resolution
    example = torch.zeros(1, 3, resolution, resolution, device=supernet.pos_embed.device)
    program = torch.export.export(supernet, (example,), strict=False)
    types_by_path = {name: type(m) for name, m in supernet.named_modules()}
    graph = program.graph

    group: dict[torch.fx.Node, str] = {}
    attrs: dict[str, dict[str, Any]] = {}
    # Elementwise nodes merge with an elementwise producer in the same module, except two-input
    # arithmetic (residual and positional adds): those are nodes of their own, which keeps the
    # grouped graph acyclic (a block's first residual add feeds both norm2 and the second add).
    counters: dict[tuple[str, str], int] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in program.graph_signature.user_inputs:
                group[node] = "input"
                attrs["input"] = {"kind": "input", "module": "", "ops": [], "shape": list(example.shape)}
            continue
        if node.op == "output":
            continue
        op = getattr(node.target, "_opname", getattr(node.target, "__name__", str(node.target)))
        if op in _IGNORED_OPS:
            continue
        stack = _module_stack(node, types_by_path)
        anchor = _anchor(stack)
        if anchor is not None:
            path, kind = anchor
            name = f"{path}.core" if kind == "attention" else path
        else:
            kind, path = "elementwise", stack[-1][0] if stack else ""
            producers = [p for p in node.all_input_nodes if p in group and attrs[group[p]]["kind"] == "elementwise"
                         and attrs[group[p]]["module"] == path]
            tensor_inputs = [p for p in node.all_input_nodes if p in group or p.op != "placeholder"]
            if producers and not (op in ("add", "sub", "mul") and len(tensor_inputs) == 2):
                name = group[producers[0]]
            else:
                index = counters.get((path, op), 0)
                counters[path, op] = index + 1
                name = f"{path + '.' if path else ''}{op}{'' if index == 0 else f'_{index}'}"
        group[node] = name
        entry = attrs.setdefault(name, {"kind": kind, "module": path, "ops": [], "shape": None})
        entry["ops"].append(op)
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            entry["shape"] = list(value.shape)

    out_node = next(n for n in graph.nodes if n.op == "output")
    attrs["output"] = {"kind": "output", "module": "", "ops": [], "shape": None}
    edges: dict[tuple[str, str], None] = {}  # in the order they are met, once each
    for node, name in group.items():
        for producer in node.all_input_nodes:
            if producer in group and group[producer] != name:
                edges[group[producer], name] = None
    for result in out_node.all_input_nodes:
        edges[group[result], "output"] = None
        attrs["output"]["shape"] = attrs[group[result]]["shape"]
    return list(attrs.items()), list(edges)


def layers_ir(module: nn.Module, example: torch.Tensor) -> IR:
    """The IR of any module's quantized layers, for lowering a module that is not a whole supernet (one
    layer, a block): an input node, one quantizable node per `QuantLinear` / `QuantConv2d` (its module
    path, and a conv's `input_hw` from a forward pass of `example`), the output. No norm feeds a node,
    so `FoldOffsetIntoNormPass` leaves every activation shift explicit (exact with any padding)."""
    layers = {p: m for p, m in module.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    input_hw: dict[str, list[int]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, p=p: input_hw.__setitem__(p, list(args[0].shape[-2:])))
             for p, m in layers.items() if isinstance(m, QuantConv2d)]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    g = nx.DiGraph()
    g.add_node("input", kind="input", module="", ops=[], shape=list(example.shape), quantizable=False)
    g.add_node("output", kind="output", module="", ops=[], shape=None, quantizable=False)
    for path, layer in layers.items():
        kind = "conv" if isinstance(layer, QuantConv2d) else "linear"
        g.add_node(path, kind=kind, module=path, ops=[], shape=None, quantizable=True,
                   **({"input_hw": input_hw[path]} if kind == "conv" else {}))
        g.add_edge("input", path)
        g.add_edge(path, "output")
    return IR(g, "", module)


_GEOMETRY = {
    "linear": ("in_features", "out_features", "token_layout", "window"),
    "conv": ("in_channels", "out_channels", "kernel", "stride", "padding"),
    "attention": ("heads", "head_dim", "window", "rel_pos"),
}


def verify_ir(ir: IR, after: str = "") -> None:
    """Check the IR's invariants; raise IRVerificationError naming the pass that ran last."""

    def fail(message: str) -> None:
        raise IRVerificationError(f"IR invalid{' after ' + after if after else ''}: {message}")

    g = ir.graph
    if not nx.is_directed_acyclic_graph(g):
        fail(f"graph has a cycle: {nx.find_cycle(g)}")
    for kind in ("input", "output"):
        count = sum(1 for _, a in g.nodes(data=True) if a.get("kind") == kind)
        if count != 1:
            fail(f"expected one {kind} node, found {count}")
    structured = any("stage" in a for _, a in g.nodes(data=True))
    precise = any("quantizable" in a for _, a in g.nodes(data=True))
    for name, a in g.nodes(data=True):
        if a.get("kind") not in KINDS:
            fail(f"node {name} has unknown kind {a.get('kind')!r}")
        if not isinstance(a.get("module"), str):
            fail(f"node {name} has no module path")
        if ir.root is not None:
            try:
                ir.root.get_submodule(a["module"])
            except AttributeError:
                fail(f"node {name} names module '{a['module']}', which the model does not have")
        if a["kind"] not in ("input", "output") and g.in_degree(name) == 0 and a["kind"] != "elementwise":
            fail(f"node {name} has no producer")
        if structured:
            for key in ("stage", "block", "elastic", *_GEOMETRY.get(a["kind"], ())):
                if key not in a:
                    fail(f"node {name} lacks the structure annotation '{key}'")
        if precise:
            if a.get("quantizable") != (a["kind"] in ("conv", "linear")):
                fail(f"node {name} of kind {a['kind']} has quantizable={a.get('quantizable')}")
            cands, bits = a.get("candidate_bits"), ir.bits_of(name)
            if cands is not None and bits is not None and (bits.w not in cands["w"] or bits.a not in cands["a"]):
                fail(f"node {name} has bits W{bits.w}A{bits.a} outside its candidates {cands}")
        if "macs" in a and (not isinstance(a["macs"], int) or a["macs"] < 0):
            fail(f"node {name} has invalid macs {a['macs']!r}")
