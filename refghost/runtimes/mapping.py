"""Map a runtime's tensors to the refghost layers they hold: by scope names, else by structure.

Every runtime adapter (ONNX Runtime, OpenVINO, MNN, ncnn, LiteRT) describes the graph it ran as
a list of :class:`Op` in topological order, each op spelled in ONNX's vocabulary (``Conv``,
``Relu``, ``Concat``, ``GlobalAveragePool``, ``HardSigmoid``, ``Mul``, ...), with the name of the
tensor it produces and, where the converter kept one, the PyTorch module path (``scope``) it came
from. :func:`map_ops` then maps tensors to refghost graph nodes (:class:`refghost.arch.Graph`):

1. by **scope names**: the TorchScript exporter names nodes (and their output tensors) after the
   module path (``/blocks.6/blocks.6.3/ghost1/primary_conv/primary_conv.0/Conv``,
   ``..._output_0``); the dynamo exporter records it in node metadata
   ``pkg.torch.onnx.name_scopes``. A module's output is its last op's output; inside an SE, the
   hard-sigmoid's last op (``Div`` or ``HardSigmoid``) is ``<se>.gate``. Exporters fold BatchNorm
   into the Conv before it, so a Conv with no BatchNormalization of its own stands for the
   conv+BN pair and maps to the BN.
2. when names are missing (simplified or renamed graphs, runtimes that number their tensors): by
   **structure**, aligning the ops in topological order with the refghost layers in forward
   order (:data:`PATTERNS`: the op sequences that may implement each layer).

:func:`onnx_ops` reads the ops of an ONNX graph; :func:`map_onnx` maps it. For runtimes that
reorder and fuse ops and keep no names (LiteRT, ncnn), :func:`map_by_dataflow` maps a graph of
:class:`FlowOp` by each conv's weights and every other layer's inputs.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np

from ..arch import Graph, SqueezeExcite
from ..errors import CompareError

__all__ = ["BY_SCOPE", "BY_STRUCTURE", "BY_WEIGHTS", "FlowOp", "Op", "PATTERNS", "PLUMBING", "MappingError",
           "folded_conv_weight", "map_by_dataflow", "map_by_scope", "map_by_structure", "map_onnx", "map_ops",
           "onnx_ops", "scope_of_name"]

BY_SCOPE = "by exporter scope names"
BY_STRUCTURE = "by structure (the graph has no scope names)"

#: Ops that never compute a layer's output. (Identity is not among them when matching by scope:
#: the last op of a module's scope is its output, whatever it is.)
PLUMBING = frozenset({"Constant", "Shape", "Gather", "Unsqueeze", "Cast", "ConstantOfShape", "Reshape", "Flatten",
                      "Squeeze", "Dropout"})
_GATE_OPS = {"Div", "HardSigmoid", "Mul"}

#: Each refghost op and the op sequences (ONNX vocabulary) that may implement it.
PATTERNS = {
    "conv": [("Conv",)],
    "batch_norm": [("BatchNormalization",)],
    "concat": [("Concat", "Slice"), ("Concat",)],
    "add": [("Add",), ("Sum",)],
    "global_avg_pool": [("GlobalAveragePool",), ("ReduceMean",)],
    "hard_sigmoid": [("HardSigmoid",), ("Add", "Clip", "Div"), ("Add", "Clip", "Mul"), ("Add", "Relu6", "Div")],
    "scale": [("Mul",)],
    "linear": [("Gemm",), ("MatMul", "Add")],
    "act": [("Relu",), ("LeakyRelu",), ("Clip",), ("Elu",), ("Selu",), ("PRelu",), ("HardSwish",), ("Gelu",),
            ("Sigmoid", "Mul"), ("Div", "Erf", "Add", "Mul", "Mul"), ("Mul", "Erf", "Add", "Mul", "Mul")],
}


class MappingError(CompareError):
    """A runtime's graph that cannot be aligned with GhostNet's layers."""


@dataclass(frozen=True)
class Op:
    """One op of a runtime's graph: ``kind`` in ONNX's vocabulary, the tensor it produces, the
    module path it came from (None when unknown)."""

    kind: str
    output: str
    scope: str | None = None


def scope_of_name(name: str) -> str | None:
    """The module path in a TorchScript-style name (``/blocks.6/blocks.6.3/ghost1/.../Conv`` or its
    tensor ``..._output_0``), or None. The last segment (the op) is not part of the path."""
    if not name.startswith("/"):
        return None
    path = ""
    last = ""
    for segment in name.split("/")[1:-1]:
        if last and segment.startswith(last + "."):
            path = path[: len(path) - len(last)] + segment
        else:
            path = f"{path}.{segment}" if path else segment
        last = segment
    return path or None


def _onnx_scope(node) -> str | None:
    """The PyTorch module path an exporter recorded for an ONNX node, or None."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:  # a hostile value may be anything: not a literal, nested too deep, not a list
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
            if not isinstance(scopes, (list, tuple)) or len(scopes) < 2 or not isinstance(scopes[-2], str):
                return None
            return scopes[-2] or None
    return scope_of_name(node.name)


def onnx_ops(graph) -> list[Op]:
    """The ops of an ONNX GraphProto, in its (topological) node order."""
    return [Op(node.op_type, node.output[0], _onnx_scope(node)) for node in graph.node]


def map_onnx(graph, network: Graph) -> tuple[dict[str, str], str]:
    """``{onnx tensor name: refghost node name}`` for an ONNX GraphProto, and how it was matched."""
    return map_ops(onnx_ops(graph), network)


def map_ops(ops: list[Op], network: Graph, *, fused_activations: bool = False) -> tuple[dict[str, str], str]:
    """``{tensor name: refghost node name}`` for the ops that produce layer outputs of ``network``,
    and how they were matched (:data:`BY_SCOPE` or :data:`BY_STRUCTURE`). ``fused_activations``:
    see :func:`map_by_structure`."""
    layers = {n.name for n in network.nodes}
    by_scope = _by_scope(ops)
    if any(scope in layers for scope in by_scope):
        return map_by_scope(ops, network), BY_SCOPE
    return map_by_structure(ops, network, fused_activations=fused_activations), BY_STRUCTURE


def _by_scope(ops: list[Op]) -> dict[str, list[Op]]:
    by_scope: dict[str, list[Op]] = {}
    for op in ops:
        if op.kind not in PLUMBING and op.scope is not None:
            by_scope.setdefault(op.scope, []).append(op)
    return by_scope


def _folded_bn(layer, network: Graph, has_ops) -> str | None:
    """The BatchNorm after conv ``layer`` if the runtime's graph has none of its own (it was folded)."""
    consumers = [n for n in network.nodes if layer.name in n.inputs]
    if len(consumers) == 1 and consumers[0].op == "batch_norm" and not has_ops(consumers[0].name):
        return consumers[0].name
    return None


def map_by_scope(ops: list[Op], network: Graph) -> dict[str, str]:
    """Map by the module paths recorded on the ops (see the module docstring)."""
    by_scope = _by_scope(ops)
    layers = {n.name: n for n in network.nodes}
    mapping = {}
    for scope, scope_ops in by_scope.items():
        layer = layers.get(scope)
        if layer is None:
            continue
        name = scope
        if layer.op == "conv":
            name = _folded_bn(layer, network, lambda n: n in by_scope) or scope
        elif layer.op == "scale":  # the SE: its gate is computed inside the same scope
            gates = [op for op in scope_ops[:-1] if op.kind in _GATE_OPS]
            if gates:
                mapping[gates[-1].output] = SqueezeExcite(scope).gate
        mapping[scope_ops[-1].output] = name
    return mapping


def _starts(ops: list[Op], i: int, patterns) -> bool:
    """Whether one of ``patterns`` begins at ``ops[i]``."""
    return any(tuple(op.kind for op in ops[i:i + len(p)]) == p for p in patterns)


def map_by_structure(ops: list[Op], network: Graph, *, fused_activations: bool = False) -> dict[str, str]:
    """Map by aligning the ops (plumbing and Identity dropped) with the layers in forward order.

    A Conv not followed by a BatchNormalization where the network has one stands for both (the BN
    was folded into it) and maps to the BN. With ``fused_activations`` (runtimes that fuse an
    activation into the conv before it, such as MNN and ncnn), a Conv not followed by an
    activation op where the network has one stands for the activation too, and maps to it.
    Raises :class:`MappingError` where the sequences part.
    """
    ops = [op for op in ops if op.kind not in PLUMBING and op.kind != "Identity"]
    layers = network.nodes
    mapping = {}
    i = 0
    k = 0
    while k < len(layers):
        layer = layers[k]
        for pattern in PATTERNS[layer.op]:
            if tuple(op.kind for op in ops[i:i + len(pattern)]) == pattern:
                break
        else:
            found = ops[i].kind if i < len(ops) else "the end of the graph"
            raise MappingError(f"cannot match the graph to the network by structure: layer {layer.name} "
                               f"({layer.op}) meets op {found}; name intermediate tensors by module path "
                               f"(e.g. dump them to .npz) instead")
        i += len(pattern)
        name = layer.name
        nxt = layers[k + 1] if k + 1 < len(layers) else None
        if layer.op == "conv" and nxt is not None and nxt.op == "batch_norm" and nxt.inputs == (layer.name,) \
                and (i >= len(ops) or ops[i].kind != "BatchNormalization"):
            name = nxt.name  # BatchNorm folded into this Conv
            k += 1
            nxt = layers[k + 1] if k + 1 < len(layers) else None
        if fused_activations and layer.op == "conv" and nxt is not None and nxt.op == "act" \
                and nxt.inputs == (name,) and not _starts(ops, i, PATTERNS["act"]):
            name = nxt.name  # the activation fused into this Conv
            k += 1
        mapping[ops[i - 1].output] = name
        k += 1
    return mapping


# ------------------------------------------------------------------------------------------
# By data flow and weights: for runtimes that reorder ops and fuse them (LiteRT, ncnn)
# ------------------------------------------------------------------------------------------
BY_WEIGHTS = "by conv weights and data flow"
#: Ops that pass a tensor on unchanged in value (padding is part of the conv that reads it).
PASS_THROUGH = frozenset({"Pad", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast", "Flatten"})
_ACTIVATIONS = {"Relu", "LeakyRelu", "Clip", "Elu", "Selu", "PRelu", "HardSwish", "Gelu"}
_POOLS = {"GlobalAveragePool", "ReduceMean", "AveragePool"}
#: Largest max|w_runtime - w_network| / max|w_network| of a conv matched by its weights (a bug may
#: change a weight by a few percent; two different convs of a trained or random net differ by ~1).
WEIGHT_MATCH = 0.1


@dataclass(frozen=True)
class FlowOp:
    """One op of a runtime's graph for :func:`map_by_dataflow`: ``kind`` in ONNX's vocabulary, the
    tensor it produces, the data tensors it reads (constants left out), and for a Conv or Gemm its
    weight in PyTorch's layout (OIHW, or (out, in))."""

    kind: str
    output: str
    inputs: tuple[str, ...]
    weight: np.ndarray | None = None
    fused: str | None = None  # an activation the op applies to its result (Relu, Clip for ReLU6), if any


def folded_conv_weight(network: Graph, params: dict, conv) -> np.ndarray:
    """The weight of ``conv`` with the BatchNorm after it (if any) folded in: W * gamma / sqrt(var + eps)."""
    w = np.asarray(params[conv.params["weight"]], dtype=np.float64)
    consumers = [n for n in network.nodes if conv.name in n.inputs]
    if len(consumers) == 1 and consumers[0].op == "batch_norm":
        bn = consumers[0]
        scale = params[bn.params["weight"]] / np.sqrt(params[bn.params["running_var"]] + bn.attrs.get("eps", 1e-5))
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    return w


def map_by_dataflow(ops: list[FlowOp], network: Graph, params: dict) -> dict[str, str]:
    """Map by the graph itself: each conv (and linear) op to the layer with its weights (BN folded
    in), then every other layer to the op that reads the tensors of its inputs (concat, add,
    pooling, scaling), whatever order the runtime keeps its ops in. A layer the runtime fused into
    the op before it (BN and activation into a conv; an SE's hard-sigmoid steps into its second
    conv) has no tensor of its own: the fused op's tensor maps to the last layer it computes.
    ``params`` are the network's parameters (float64). Raises :class:`MappingError` when a layer
    has no op."""
    producer = {op.output: op for op in ops}
    root: dict[str, str] = {}

    def resolve(t: str) -> str:
        seen = t
        while seen in producer and producer[seen].kind in PASS_THROUGH and producer[seen].inputs:
            seen = producer[seen].inputs[0]
        return seen

    for op in ops:
        root[op.output] = resolve(op.output)
    consumers: dict[str, list[FlowOp]] = {}
    for op in ops:
        if op.kind in PASS_THROUGH:
            continue
        for t in op.inputs:
            consumers.setdefault(resolve(t), []).append(op)

    # convs and linears by weights
    weighted = [op for op in ops if op.weight is not None]
    taken: set[str] = set()
    conv_op: dict[str, FlowOp] = {}
    for node in network.nodes:
        if node.op not in ("conv", "linear"):
            continue
        w = folded_conv_weight(network, params, node)
        best, best_d = None, np.inf
        for op in weighted:
            if op.output in taken or np.shape(op.weight) != w.shape:
                continue
            d = float(np.max(np.abs(np.asarray(op.weight, np.float64) - w)) / max(float(np.max(np.abs(w))), 1e-30))
            if d < best_d:
                best, best_d = op, d
        if best is None or best_d > WEIGHT_MATCH:
            raise MappingError(f"no op of the runtime's graph has the weights of layer {node.name} "
                               f"{tuple(w.shape)} (closest differs by {best_d:.3g} of its largest weight)")
        taken.add(best.output)
        conv_op[node.name] = best

    value: dict[str, str] = {"input": None}  # layer -> the runtime tensor (a root) holding its output
    mapping: dict[str, str] = {}

    def find(node, kinds, inputs) -> str:
        wanted = [value[i] for i in inputs]
        for op in consumers.get(wanted[0], []):
            if op.kind in kinds and [resolve(t) for t in op.inputs][: len(wanted)] == wanted:
                return op.output
            if op.kind in kinds and sorted(resolve(t) for t in op.inputs) == sorted(wanted):
                return op.output
        raise MappingError(f"no {'/'.join(sorted(kinds))} op reads the tensors of the inputs of layer {node.name} "
                           f"({', '.join(node.inputs)})")

    for node in network.nodes:
        src = value.get(node.inputs[0]) if node.inputs else None
        if node.op in ("conv", "linear"):
            t = conv_op[node.name].output
        elif node.op == "batch_norm":
            bns = [op for op in consumers.get(src, []) if op.kind == "BatchNormalization"]
            t = bns[0].output if bns else src  # folded into the conv before it
        elif node.op == "act":
            acts = [op for op in consumers.get(src, []) if op.kind in _ACTIVATIONS]
            t = acts[0].output if acts else src  # fused into the op before it
            if not acts and (src not in producer or producer[src].fused is None):
                value[node.name] = src  # the runtime computes no activation here: no tensor holds it
                continue
        elif node.op == "hard_sigmoid":
            t = _gate(node, network, value, consumers, resolve)
        elif node.op == "concat":
            t = find(node, {"Concat"}, node.inputs)
        elif node.op == "add":
            t = find(node, {"Add", "Sum"}, node.inputs)
        elif node.op == "scale":
            t = find(node, {"Mul"}, node.inputs)
        elif node.op == "global_avg_pool":
            t = find(node, _POOLS, node.inputs)
        else:
            raise MappingError(f"layer {node.name}: op {node.op} has no data-flow rule")
        t = resolve(t)
        value[node.name] = t
        if node.op in ("conv", "batch_norm") and t in producer and producer[t].fused is not None:
            # the op applies an activation after this layer: its tensor holds the activation layer
            # that follows (mapped there), or no layer (an SE's conv with its hard-sigmoid's ReLU6)
            continue
        mapping[t] = node.name  # a later layer computed by the same op takes its tensor
    return mapping


def _gate(node, network: Graph, value, consumers, resolve) -> str:
    """The tensor of an SE's gate: the input the SE's scaling Mul reads besides the SE's input,
    found from the gate's own input by following single-input elementwise ops."""
    scale = next(n for n in network.nodes if node.name in n.inputs and n.op == "scale")
    x = value[next(i for i in scale.inputs if i != node.name)]
    t = value[node.inputs[0]]
    for _ in range(8):
        for op in consumers.get(t, []):
            if op.kind == "Mul" and sorted(resolve(i) for i in op.inputs) == sorted([x, t]):
                return t
        steps = [op for op in consumers.get(t, []) if len(op.inputs) == 1]
        if len(steps) != 1:
            break
        t = resolve(steps[0].output)
    raise MappingError(f"layer {node.name}: no Mul of the SE's input by a tensor computed from {node.inputs[0]}")
