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

:func:`onnx_ops` reads the ops of an ONNX graph; :func:`map_onnx` maps it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from .arch import Graph
from .compare import CompareError

__all__ = ["BY_SCOPE", "BY_STRUCTURE", "Op", "PATTERNS", "PLUMBING", "MappingError", "map_by_scope",
           "map_by_structure", "map_onnx", "map_ops", "onnx_ops", "scope_of_name"]

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
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
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
                mapping[gates[-1].output] = f"{scope}.gate"
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
