"""Map a runtime's tensors to the refghost layers they hold: the one place this is done.

Every runtime adapter (ONNX Runtime, OpenVINO, MNN, ncnn, LiteRT) describes the graph it ran as
a list of :class:`Op` in topological order, each spelled in ONNX's vocabulary
(:data:`VOCABULARY`: ``Conv``, ``Relu``, ``Concat``, ``GlobalAveragePool``, ``HardSigmoid``,
``Mul``, ...; plumbing in :data:`PLUMBING`), with the name of the tensor it produces and what the
runtime keeps of it: the PyTorch module path (``scope``) where the converter kept one, the data
tensors it reads, a conv's weights, its fused activation, its attributes. :func:`match` maps an
adapter's :class:`~refghost.runtimes.Observed` run to refghost graph nodes
(:class:`refghost.arch.Graph`) with the matcher the adapter asks for:

1. ``names`` (:func:`map_ops`), by **scope names**: the TorchScript exporter names nodes (and
   their output tensors) after the module path
   (``/blocks.6/blocks.6.3/ghost1/primary_conv/primary_conv.0/Conv``, ``..._output_0``); the
   dynamo exporter records it in node metadata ``pkg.torch.onnx.name_scopes``. A module's output
   is its last op's output; inside an SE, the hard-sigmoid's last op (``Div`` or ``HardSigmoid``)
   is ``<se>.gate``. Exporters fold BatchNorm into the Conv before it, so a Conv with no
   BatchNormalization of its own stands for the conv+BN pair and maps to the BN. Shape arithmetic
   (:func:`shape_tensors`) is never a module's output, and a module's trailing reshapes hold its
   value (a channel shuffle's is the Transpose between its reshapes); the k-th call of a module
   called more than once (scope ``<path>_<k>``) is layer ``<path>.<k>``; a NanoDet head whose
   scope sigmoids the class scores (the export form) returns the network's ``output``. The layers
   no module returns (a concatenation or sum in a ``forward``, a ``chunk``'s halves) are then
   matched by the tensors they read. A whole detector's graph on a GhostNet's network (or back)
   is matched with ``backbone.`` taken off (put on) its scopes. When names are missing
   (simplified or renamed graphs): by **structure**, aligning the ops in topological order with
   the refghost layers in forward order (:data:`PATTERNS`: the op sequences that may implement
   each layer), else, where the adapter gives each op's inputs, by data flow from the input
   (:func:`map_by_flow`: a whole detector);
2. ``dataflow`` (:func:`map_by_dataflow`), for runtimes that reorder and fuse ops and keep no
   names (LiteRT): each conv by its weights (BN folded in), every other layer by its inputs;
3. ``attributes`` (:func:`map_by_attributes`), for runtimes that keep the order and every op's
   attributes but no names (ncnn): structure, checked op by op (kind, activation, channels,
   kernel, stride, groups).

:func:`onnx_ops` reads the ops of an ONNX graph; :func:`map_onnx` maps it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field, replace

import numpy as np

from ..arch import Graph, SqueezeExcite
from ..errors import CompareError
from ..ops import BN_EPS, fold_batch_norm

__all__ = ["BY_ATTRIBUTES", "BY_FLOW", "BY_SCOPE", "BY_STRUCTURE", "BY_WEIGHTS", "CONSTANTS", "COPIES", "FlowOp",
           "MATCHERS", "MappingError", "Op", "PASS_THROUGH", "PATTERNS", "PLUMBING", "VOCABULARY", "activation_name",
           "collect", "folded_conv_weight", "map_by_attributes", "map_by_dataflow", "map_by_flow", "map_by_scope",
           "map_by_structure", "map_onnx", "map_ops", "match", "onnx_ops", "part_counts", "part_of", "scope_of_name",
           "shape_tensors"]

BY_SCOPE = "by exporter scope names"
BY_STRUCTURE = "by structure (the graph has no scope names)"
BY_FLOW = "by structure (data flow, attributes; the graph has no scope names)"

#: Ops that pass a tensor on unchanged in value: a copy, a change of layout or of type.
COPIES = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast", "Dropout"})
#: Ops that compute no tensor of the network: the graph's input, constants, shape arithmetic.
CONSTANTS = frozenset({"Input", "Constant", "Shape", "Gather", "ConstantOfShape", "Expand"})
#: Ops that never compute a layer's output: the one list every adapter's ops are filtered by.
#: (Identity is not among them when matching by scope: the last op of a module's scope is its
#: output, whatever it is.)
PLUMBING = (COPIES | CONSTANTS) - {"Identity"}
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


@dataclass(frozen=True, eq=False)
class Op:
    """One op of a runtime's graph, as every adapter describes it.

    ``kind`` is in ONNX's vocabulary (``Conv``, ``Relu``, ``Add``, ...; plumbing such as
    ``Identity``, ``Reshape``, ``Constant``, ``Input`` in :data:`PLUMBING`), ``output`` the
    runtime's name of the tensor it produces, ``scope`` the module path it came from (None when
    unknown). What a matcher may need besides, where the runtime tells it: ``inputs`` (the data
    tensors it reads, constants left out), ``weight`` (a Conv's or Gemm's weight in PyTorch's
    layout, OIHW or (out, in)), ``fused`` (an activation the op applies to its result, an ONNX
    kind), ``attrs`` (``out_channels``, ``kernel``, ``stride``, ``groups``; ``args`` of an
    activation or ``fused_args`` of a fused one: LeakyRelu's slope, Clip's min and max), and
    ``label``, how the runtime names the op in messages (``Convolution 12 (line 4)``).
    """

    kind: str
    output: str
    scope: str | None = None
    inputs: tuple[str, ...] = ()
    weight: np.ndarray | None = None
    fused: str | None = None
    attrs: dict = field(default_factory=dict)
    label: str | None = None

    def describe(self) -> str:
        return self.label or f"{self.kind} {self.output}"


#: The former name of :class:`Op` for the data-flow matcher (the same class).
FlowOp = Op


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
    """The ops of an ONNX GraphProto, in its (topological) node order, each with the tensors it
    reads (initializers and absent optional inputs left out). A node with several outputs (a
    ``Split``) is one op per output, in output order (``attrs["output_index"]``)."""
    constants = {i.name: tuple(i.dims) for i in graph.initializer}
    ops = []
    for node in graph.node:
        scope = _onnx_scope(node)
        inputs = tuple(t for t in node.input if t and t not in constants)
        outputs = [t for t in node.output if t] if node.op_type == "Split" else node.output[:1]
        attrs = {}
        if node.op_type == "Conv" and len(node.input) > 1 and len(constants.get(node.input[1], ())) == 4:
            values = {a.name: list(a.ints) if a.ints else a.i for a in node.attribute}
            dims = constants[node.input[1]]
            attrs = {"out_channels": dims[0], "kernel": dims[2:], "stride": tuple(values.get("strides", (1, 1))),
                     "groups": values.get("group", 1) or 1}
        for k, out in enumerate(outputs):
            ops.append(Op(node.op_type, out, scope, inputs, attrs={**attrs, "output_index": k} if len(outputs) > 1
                          else attrs))
    return ops


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
    rebased = _rebased(ops, layers)
    if rebased is not None:
        return map_by_scope(rebased, network), BY_SCOPE
    try:
        return map_by_structure(ops, network, fused_activations=fused_activations), BY_STRUCTURE
    except MappingError:
        if fused_activations or not any(op.inputs for op in ops):
            raise
        return map_by_flow(ops, network), BY_FLOW


def _rebased(ops: list[Op], layers) -> list[Op] | None:
    """The ops of a whole detector's graph matched to a GhostNet backbone's layers (``backbone.``
    taken off their scopes), or of a backbone's graph to a detector's (``backbone.`` put on); None
    if neither names a layer."""
    from ..detector.graph import BACKBONE

    prefix = BACKBONE + "."
    if any(layer.startswith(prefix) for layer in layers):
        rebase = {op.scope: prefix + op.scope for op in ops if op.scope is not None}
    else:
        rebase = {op.scope: op.scope[len(prefix):] for op in ops if op.scope and op.scope.startswith(prefix)}
    if not any(scope in layers for scope in rebase.values()):
        return None
    return [replace(op, scope=rebase.get(op.scope)) for op in ops]


def shape_tensors(ops: list[Op]) -> set[str]:
    """The tensors computed from shapes and constants only (``Shape``, ``Constant`` and the
    arithmetic on them: the ``Add``/``Div``/``Mul``/``Slice`` a TorchScript export computes a
    ``chunk``'s split points with); never a layer's value. An op whose inputs the adapter does not
    give counts as computing data."""
    shape: set[str] = set()
    for op in ops:
        if op.kind in ("Constant", "Shape", "ConstantOfShape") or (op.inputs and all(t in shape for t in op.inputs)):
            shape.add(op.output)
    return shape


def _by_scope(ops: list[Op]) -> dict[str, list[Op]]:
    """The data ops (shape arithmetic and constants left out, copies kept: a module may end with a
    ``Reshape``, as a channel shuffle does) of each scope, in order."""
    shape = shape_tensors(ops)
    by_scope: dict[str, list[Op]] = {}
    for op in ops:
        if op.kind not in CONSTANTS and op.scope is not None and op.output not in shape:
            by_scope.setdefault(op.scope, []).append(op)
    return by_scope


#: Copies that keep the order of the values (a Transpose does not: a channel shuffle is one).
_SAME_ORDER = COPIES - {"Transpose"}


def _module_output(scope_ops: list[Op]) -> Op:
    """The op whose tensor a module returns: the last of its scope (an ``Identity`` included), but
    for trailing copies that change no value: a reshape (the tensor before it holds the same values
    in the same order) and a lone ``Transpose`` (a runtime's change of layout, e.g. MNN's to NCHW at
    an output). A ``Transpose`` between reshapes is a channel shuffle (view, transpose, view): its
    tensor holds the module's value in the module's order."""
    for k in range(len(scope_ops) - 1, -1, -1):
        op = scope_ops[k]
        if op.kind == "Transpose":
            if k > 0 and scope_ops[k - 1].kind in _SAME_ORDER - {"Identity"}:
                return op
        elif op.kind == "Identity" or op.kind not in _SAME_ORDER:
            return op
    return scope_ops[-1]


def _layer_of_scope(scope: str, layers, scopes) -> str | None:
    """The network layer a module path names: itself, or for a module called more than once
    (TorchScript names the k-th call's scope ``<path>_<k>``, the first ``<path>``; ``scopes`` are
    all the graph's), ``<path>.<k>``."""
    if scope in layers:
        return scope
    head, _, last = scope.rpartition(".")
    base, sep, k = last.rpartition("_")
    if sep and k.isdigit() and base:
        call = f"{head}.{base}.{k}" if head else f"{base}.{k}"
        return call if call in layers else None
    return f"{scope}.0" if f"{scope}.0" in layers and f"{scope}_1" in scopes else None


def _export_output(layer, network: Graph, scope_ops: list[Op]):
    """The network's export-form output node if module ``layer`` (the raw head, ``flatten_levels``)
    returns it: its scope sigmoids the class scores, so its last tensor is the sigmoided output
    (``sigmoid_classes``), not the raw head."""
    if layer.op != "flatten_levels" or not any(op.kind == "Sigmoid" for op in scope_ops):
        return None
    return next((n for n in network.nodes if n.op == "sigmoid_classes" and n.inputs == (layer.name,)), None)


def _folded_bn(layer, network: Graph, has_ops) -> str | None:
    """The BatchNorm after conv ``layer`` if the runtime's graph has none of its own (it was folded)."""
    consumers = [n for n in network.nodes if layer.name in n.inputs]
    if len(consumers) == 1 and consumers[0].op == "batch_norm" and not has_ops(consumers[0].name):
        return consumers[0].name
    return None


def map_by_scope(ops: list[Op], network: Graph) -> dict[str, str]:
    """Map by the module paths recorded on the ops (see the module docstring), then the layers no
    module returns (a concatenation or sum written in a ``forward``, a ``chunk``'s halves) by the
    tensors they read (:func:`_map_by_inputs`)."""
    by_scope = _by_scope(ops)
    layers = {n.name: n for n in network.nodes}
    mapping = {}
    for scope, scope_ops in by_scope.items():
        name = _layer_of_scope(scope, layers, by_scope)
        if name is None:
            continue
        layer = layers[name]
        if layer.op == "conv":
            name = _folded_bn(layer, network, lambda n: n in by_scope) or name
        elif layer.op == "scale":  # the SE: its gate is computed inside the same scope
            gates = [op for op in scope_ops[:-1] if op.kind in _GATE_OPS]
            if gates:
                mapping[gates[-1].output] = SqueezeExcite(scope).gate
        exported = _export_output(layer, network, scope_ops)
        if exported is not None:
            name = exported.name
        # the head's flatten ends with its permute to (N, priors, C): its last op, whatever it is
        output = scope_ops[-1] if layer.op == "flatten_levels" else _module_output(scope_ops)
        mapping[output.output] = name
    return _map_by_inputs(ops, network, mapping)


#: The op kinds that may compute each refghost op a layer no module returns may be.
_BY_INPUTS = {
    "concat": {"Concat"}, "add": {"Add", "Sum"}, "slice": {"Slice", "Split"}, "upsample": {"Resize", "Upsample"},
    "act": {"Relu", "LeakyRelu", "Clip", "Elu", "Selu", "PRelu", "HardSwish", "Gelu", "Sigmoid"},
    "max_pool": {"MaxPool"}, "scale": {"Mul"}, "global_avg_pool": {"GlobalAveragePool", "ReduceMean"},
}

#: What :func:`map_by_flow` matches besides: the convs (by their attributes), the BatchNorms, the
#: channel shuffle (the Transpose between its reshapes).
_BY_FLOW = {**_BY_INPUTS, "conv": {"Conv"}, "batch_norm": {"BatchNormalization"}, "channel_shuffle": {"Transpose"},
            "hard_sigmoid": {"HardSigmoid"}}
#: Layers of the export form that no tensor of an exported graph holds but the output itself.
_EXPORT_TAIL = ("flatten_levels", "sigmoid_classes")


def map_by_flow(ops: list[Op], network: Graph) -> dict[str, str]:
    """Map a graph without scope names by its data flow: from the input, each layer in forward
    order to the first unmapped op of a kind that computes it reading the tensors of its inputs (a
    conv's kernel, stride, groups and output channels must fit; a Conv with no BatchNormalization
    after it where the network has one stands for both). Raises :class:`MappingError` naming the
    first layer no op computes (the export form's head, whose value is the output, excepted)."""
    mapping = _map_by_inputs(ops, network, {}, kinds=_BY_FLOW)
    mapped = set(mapping.values())
    folded = {n.inputs[0] for n in network.nodes if n.op == "batch_norm" and n.name in mapped}
    missing = [n for n in network.nodes if n.name not in mapped and n.name not in folded and n.op not in _EXPORT_TAIL]
    if missing:
        raise MappingError(f"cannot match the graph to the network by structure: no op reading the tensors of its "
                           f"inputs computes layer {missing[0].name} ({missing[0].op}); export with the module paths "
                           f"as node names (TorchScript's default) or dump the tensors to .npz")
    return mapping


def _map_by_inputs(ops: list[Op], network: Graph, mapping: dict[str, str], kinds=None) -> dict[str, str]:
    """``mapping`` completed with the layers it lacks whose inputs it holds: each is the first
    unmapped op of a kind that computes it (:data:`_BY_INPUTS`) reading exactly the tensors of its
    inputs, in order, through copies that keep the order of the values; else, for a sum or a
    concatenation, the first reading them in another order (a concatenation's order is then its
    bug, for the comparison to find).
    The two halves of a ``chunk`` read the same tensor: the first such op is the first half.
    ``kinds``: the op kinds of each refghost op (default :data:`_BY_INPUTS`)."""
    kinds = _BY_INPUTS if kinds is None else kinds
    if not any(op.inputs for op in ops):
        return mapping  # the adapter gives no data flow
    shape = shape_tensors(ops)
    producer = {op.output: op for op in ops}

    def origin(t: str) -> str:
        while t in producer and producer[t].kind in _SAME_ORDER and producer[t].inputs:
            t = producer[t].inputs[0]
        return t

    value = {layer: origin(t) for t, layer in mapping.items()}
    graph_inputs = [t for op in ops for t in op.inputs if t not in producer]
    if graph_inputs:
        value.setdefault("input", graph_inputs[0])
    readers: dict[str, set[str]] = {}
    for op in ops:
        for t in op.inputs:
            readers.setdefault(origin(t), set()).add(op.kind)
    consumers: dict[str, list] = {}
    for node in network.nodes:
        for src in node.inputs:
            consumers.setdefault(src, []).append(node)
    for node in network.nodes:
        if node.name in value or node.op not in kinds or not all(i in value for i in node.inputs):
            continue
        wanted = [value[i] for i in node.inputs]
        fits = [op for op in ops if op.kind in kinds[node.op] and op.output not in mapping and op.output not in shape
                and (node.op != "conv" or "out_channels" not in op.attrs or _attrs_fit(op, node, network) is None)]
        reads = {op.output: [origin(t) for t in op.inputs if t not in shape] for op in fits}
        found = next((op for op in fits if reads[op.output] == wanted), None)
        if found is None and node.op in ("add", "concat"):  # a concat in another order computes the layer wrongly
            found = next((op for op in fits if sorted(reads[op.output]) == sorted(wanted)), None)
        if found is None:
            continue
        name = node.name
        after = consumers.get(node.name, [])
        if node.op == "conv" and len(after) == 1 and after[0].op == "batch_norm" \
                and "BatchNormalization" not in readers.get(origin(found.output), ()):
            name = after[0].name  # BatchNorm folded into this Conv
            value[node.name] = origin(found.output)
        mapping[found.output] = name
        value[name] = origin(found.output)
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
        if layer.op not in PATTERNS:
            raise MappingError(f"cannot match the graph to the network by structure: layer {layer.name} is a "
                               f"{layer.op}, which the structure matcher has no op pattern for; export with the "
                               f"module paths as node names (TorchScript's default) or dump the tensors to .npz")
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
#: Ops the data flow is followed through: copies, and padding (part of the conv that reads it).
PASS_THROUGH = COPIES | {"Pad"}
_ACTIVATIONS = {"Relu", "LeakyRelu", "Clip", "Elu", "Selu", "PRelu", "HardSwish", "Gelu"}
_POOLS = {"GlobalAveragePool", "ReduceMean", "AveragePool"}
#: Largest max|w_runtime - w_network| / max|w_network| of a conv matched by its weights (a bug may
#: change a weight by a few percent; two different convs of a trained or random net differ by ~1).
WEIGHT_MATCH = 0.1


def folded_conv_weight(network: Graph, params: dict, conv) -> np.ndarray:
    """The weight of ``conv`` with the BatchNorm after it (if any) folded in: W * gamma / sqrt(var + eps)."""
    w = np.asarray(params[conv.params["weight"]], dtype=np.float64)
    consumers = [n for n in network.nodes if conv.name in n.inputs]
    if len(consumers) == 1 and consumers[0].op == "batch_norm":
        bn = consumers[0]
        w, _ = fold_batch_norm(w, None, *(np.asarray(params[bn.params[k]], np.float64)
                                          for k in ("weight", "bias", "running_mean", "running_var")),
                               eps=bn.attrs.get("eps", BN_EPS))
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


# ------------------------------------------------------------------------------------------
# By structure, checked op by op: for runtimes that fuse, number their tensors and keep the
# attributes of each op (ncnn)
# ------------------------------------------------------------------------------------------
BY_ATTRIBUTES = "by structure"
#: The refghost ops an op of each kind may compute first (a Gemm may be a 1x1 conv on a pooled vector).
_COMPUTES = {
    "Conv": {"conv"}, "Gemm": {"conv", "linear"}, "BatchNormalization": {"batch_norm"},
    "GlobalAveragePool": {"global_avg_pool"}, "ReduceMean": {"global_avg_pool"}, "HardSigmoid": {"hard_sigmoid"},
    "Concat": {"concat"}, "Add": {"add"}, "Sum": {"add"}, "Mul": {"scale"},
    **{kind: {"act"} for kind in ("Relu", "LeakyRelu", "Clip", "Elu", "Selu", "Gelu", "PRelu", "HardSwish", "Swish",
                                  "Sigmoid", "Mish")},
}

#: Every op type (ONNX's) an adapter's ops may have: what the matchers compute with, pass through or skip.
VOCABULARY = frozenset(PLUMBING | COPIES | set(_COMPUTES) | {k for ps in PATTERNS.values() for p in ps for k in p}
                       | {"Pad", "Sub", "Min", "Max", "AveragePool"})


def activation_name(kind: str, args=()) -> str:
    """The refghost activation (a key of :data:`refghost.ops.ACTIVATIONS`) an activation op of ONNX's
    vocabulary computes with ``args`` (LeakyRelu: the slope; Clip: min and max)."""
    args = list(args or ())
    if kind == "Relu":
        return "ReLU"
    if kind == "LeakyRelu":
        return "LeakyReLU" if args and args[0] != 0 else "ReLU"
    if kind == "Clip":
        return "ReLU6" if args[:2] == [0, 6] else f"Clip{args}"
    return {"Elu": "ELU", "Selu": "SELU", "Gelu": "GELU", "PRelu": "PReLU", "Swish": "SiLU"}.get(kind, kind)


def map_by_attributes(ops: list[Op], network: Graph) -> tuple[dict[str, str], dict[str, str]]:
    """Map by walking the ops (in topological order) alongside the network: each op is matched
    to the layer(s) that read what its inputs hold and fit its attributes (kind, activation,
    output channels, kernel, stride, groups); a fused op stands for the last layer it absorbed
    (Conv+BN+ReLU: the ReLU; Conv+BN: the BN). Copies (:data:`COPIES`) pass on what they read.

    Returns ``({tensor: layer}, {tensor: how})``. Raises :class:`MappingError` naming the op
    where the graphs do not align (never a guess), or when a layer has no op.
    """
    inputs = [op for op in ops if op.kind == "Input"]
    if len(inputs) != 1:
        raise MappingError(f"expected one Input in the runtime's graph, found {len(inputs)}")
    unknown = [op for op in ops if op.kind not in _COMPUTES and op.kind not in PLUMBING | COPIES]
    if unknown:
        raise MappingError(f"{unknown[0].describe()}: op {unknown[0].kind!r} is not part of a GhostNet refghost can "
                           f"map; name the tensors by module path (dump them to .npz)")
    consumers: dict[str, list] = {}
    for node in network.nodes:
        for src in node.inputs:
            consumers.setdefault(src, []).append(node)
    readers: dict[str, list[Op]] = {}
    for op in ops:
        for t in op.inputs:
            readers.setdefault(t, []).append(op)
    order = {node.name: i for i, node in enumerate(network.nodes)}
    holds: dict[str, str] = {inputs[0].output: "input"}  # tensor -> the layer whose value it holds
    matched: set[str] = set()
    mapping: dict[str, str] = {}
    hows: dict[str, str] = {}

    def fail(op: Op, why: str):
        return MappingError(f"cannot match the graph to the network by structure: {op.describe()} {why}; name "
                            f"the tensors by module path (dump them to .npz) instead")

    def read_by(t: str, kind: str) -> bool:  # whether an op of this kind reads t (through copies)
        return any(r.kind == kind or (r.kind in COPIES and read_by(r.output, kind)) for r in readers.get(t, []))

    for op in ops:
        if op.kind in CONSTANTS:
            continue
        srcs = [holds[t] for t in op.inputs]
        if op.kind in COPIES:
            if len(srcs) != 1:
                raise fail(op, f"copies {len(srcs)} inputs")
            holds[op.output] = srcs[0]
            continue
        wanted = _COMPUTES[op.kind]
        if len(srcs) == 1:
            candidates = [n for n in consumers.get(srcs[0], []) if n.op in wanted and n.name not in matched
                          and n.inputs == (srcs[0],)]
        else:
            candidates = [n for n in network.nodes if n.op in wanted and n.name not in matched
                          and _same_inputs(n, srcs)]
        candidates = [n for n in candidates if _attrs_fit(op, n, network) is None]
        if not candidates:
            reason = _why_not(op, srcs, consumers, wanted, network)
            raise fail(op, f"({'/'.join(sorted(wanted))} on {', '.join(srcs)}) matches no layer of the network: "
                           f"{reason}")
        first = min(candidates, key=lambda n: order[n.name])
        nodes = [first]
        how = op.describe()
        if first.op == "conv":
            bn = _only_consumer(first, consumers, "batch_norm")
            if bn is not None and not read_by(op.output, "BatchNormalization"):  # else BN is an op of its own
                nodes.append(bn)
            if op.fused is not None:
                fused = activation_name(op.fused, op.attrs.get("fused_args"))
                act = _only_consumer(nodes[-1], consumers, "act")
                if act is None:
                    raise fail(op, f"has a fused {fused}, the network has no activation after {nodes[-1].name}")
                if act.attrs["activation"] != fused:
                    raise fail(op, f"has a fused {fused}, {act.name} is {act.attrs['activation']}")
                nodes.append(act)
            if len(nodes) > 1:
                how += f": {'+'.join(n.op for n in nodes)} fused, stands for the last"
        elif first.op == "act" and first.attrs["activation"] != activation_name(op.kind, op.attrs.get("args")):
            raise fail(op, f"is {activation_name(op.kind, op.attrs.get('args'))}, {first.name} is "
                           f"{first.attrs['activation']}")
        if len(candidates) > 1:
            how += f" (first in forward order of {len(candidates)} alike: {', '.join(n.name for n in candidates)})"
        matched.update(n.name for n in nodes)
        holds[op.output] = nodes[-1].name
        mapping[op.output] = nodes[-1].name
        hows[op.output] = f"{BY_ATTRIBUTES}: {how}"
    missing = [n.name for n in network.nodes if n.name not in matched]
    if missing:
        raise MappingError(f"no op of the runtime's graph computes {len(missing)} layer(s) of the network (first "
                           f"{missing[0]}); the model is not this GhostNet")
    return mapping, hows


def _same_inputs(node, srcs: list[str]) -> bool:
    if node.op == "concat":
        return list(node.inputs) == srcs  # the channel order matters
    return sorted(node.inputs) == sorted(srcs)  # add and scale commute


def _only_consumer(node, consumers, op: str):
    readers = consumers.get(node.name, [])
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def _attrs_fit(op: Op, node, network: Graph) -> str | None:
    """Why ``op`` cannot compute ``node`` (channels, kernel, stride, groups), or None if it can."""
    if node.op not in ("conv", "linear"):
        return None
    shape = network.param_shapes[node.params["weight"]]
    out_chs = shape[0]
    if op.attrs.get("out_channels") != out_chs:
        return f"{op.attrs.get('out_channels')} output channels, {node.name} has {out_chs}"
    if op.kind == "Gemm":
        if node.op == "conv" and shape[2:] != (1, 1):
            return f"{op.describe()} cannot be the {shape[2]}x{shape[3]} conv {node.name}"
        return None
    kernel, stride, groups = op.attrs["kernel"], op.attrs["stride"], op.attrs["groups"]
    if tuple(kernel) != tuple(shape[2:]):
        return f"kernel {kernel[0]}x{kernel[1]}, {node.name} has {shape[2]}x{shape[3]}"
    if tuple(stride) != (node.attrs["stride"],) * 2:
        return f"stride {stride[0]}, {node.name} has {node.attrs['stride']}"
    if groups != node.attrs["groups"]:
        return f"{groups} groups, {node.name} has {node.attrs['groups']}"
    return None


def _why_not(op: Op, srcs, consumers, wanted, network) -> str:
    readers = [n for s in set(srcs) for n in consumers.get(s, [])]
    if not readers:
        return f"nothing in the network reads {srcs}"
    fits = [n for n in readers if n.op in wanted]
    if not fits:
        return f"the network's layers reading it are {', '.join(f'{n.name} ({n.op})' for n in readers)}"
    return "; ".join(f"{n.name}: {_attrs_fit(op, n, network) or 'already matched or other inputs'}" for n in fits)


# ------------------------------------------------------------------------------------------
# What every adapter returns, and the one place it is matched
# ------------------------------------------------------------------------------------------
#: How an adapter asks its ops to be matched: ``names`` (scope names, else the op sequence:
#: :func:`map_ops`), ``dataflow`` (conv weights and data flow: :func:`map_by_dataflow`),
#: ``attributes`` (structure checked op by op: :func:`map_by_attributes`).
MATCHERS = ("names", "dataflow", "attributes")


def match(observed, golden) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, str]]]:
    """``(tensors, mapping)`` of an adapter's :class:`~refghost.runtimes.Observed` run on
    ``golden``: its ops matched to the network's layers by ``observed.matcher``, and
    :func:`collect`'s tensors by module path and output name in the golden's shapes. The
    mapping's keys are the runtime's tensor names (``observed.labels`` where it gives them)."""
    network = golden.weights.graph
    if observed.matcher == "names":
        names, how = map_ops(observed.ops, network, fused_activations=observed.fused_activations)
        hows = {t: how for t in names}
    elif observed.matcher == "dataflow":
        names = map_by_dataflow(observed.ops, network, golden.weights.params("float64"))
        hows = {t: BY_WEIGHTS for t in names}
    elif observed.matcher == "attributes":
        names, hows = map_by_attributes(observed.ops, network)
    else:
        raise ValueError(f"matcher must be one of {MATCHERS}, got {observed.matcher!r}")
    outputs = observed.outputs
    by_layer = {layer: t for t, layer in names.items()}
    if outputs is None:  # the outputs are the tensors of the layers the golden's outputs name
        outputs = [observed.values[by_layer[node]] for node in network.outputs.values()]
    elif len(outputs) != len(network.outputs) and any(op.scope for op in observed.ops):
        outputs = _other_model(observed, golden, names, by_layer)
    tensors = collect(golden, outputs, observed.values, names)
    labels = observed.labels or {}
    return tensors, {labels.get(t, t): (layer, hows[t]) for t, layer in names.items()}


def _other_model(observed, golden, names: dict[str, str], by_layer: dict[str, str]) -> dict[str, np.ndarray]:
    """The golden's outputs a model with other outputs computes (a whole detector judged on a
    backbone's golden, a backbone on a detector's): the exposed tensors of the layers they name,
    judged as the model computes them; a note in ``observed.notes`` says what was not judged."""
    from ..detector.graph import PARTS

    network = golden.weights.graph
    found = {name: observed.values[by_layer[node]] for name, node in network.outputs.items()
             if node in by_layer and by_layer[node] in observed.values}
    missing = [name for name in network.outputs if name not in found]
    scopes = {op.scope.split(".", 1)[0] for op in observed.ops if op.scope}
    if not names:
        raise MappingError(f"the model has {len(observed.outputs)} outputs, the golden has {len(network.outputs)} "
                           f"({', '.join(network.outputs)}), and no layer of the model was matched to the golden's")
    if missing:  # a backbone's model on a detector's golden
        parts = [p for p in PARTS if not any(part_of(n.name) == p for n in network.nodes if n.name in by_layer)]
        observed.notes.append(f"the model computes only part of the golden's network: {', '.join(missing)} and "
                              f"the layers of {', '.join(parts) or 'its last layers'} were not judged (the model "
                              f"has none of them); judged: the {len(names)} layers it computes")
    else:  # a whole detector's model on a backbone's golden
        others = sorted(scopes & set(PARTS) - {PARTS[0]}) or sorted(scopes - {PARTS[0]})
        observed.notes.append(f"the model is larger than the golden's network: only the golden's layers were "
                              f"judged (its outputs {', '.join(found)} from the model's intermediates); "
                              f"{' and '.join(others) or 'the rest'} of the model were not judged")
    return found


def part_of(layer: str) -> str | None:
    """The part of a whole detector (:data:`refghost.detector.graph.PARTS`) a layer belongs to (the
    export-form output is the head's), or None for a layer of no part (a GhostNet's own)."""
    from ..detector.graph import HEAD, OUTPUT, PARTS

    first = layer.split(".", 1)[0]
    return HEAD if layer == OUTPUT else first if first in PARTS else None


def part_counts(observed, golden, mapping: dict[str, tuple[str, str]]) -> dict[str, list]:
    """``{part: [mapped, exposed]}`` of a whole detector's run (empty for a GhostNet): the tensors
    mapped to the part's layers, and the tensors of the part the runtime exposes that a layer may
    hold: every module output it names (the last data op of each scope, shape arithmetic left out)
    and every mapped tensor. ``exposed`` is None when the runtime names no scopes."""
    from ..detector.graph import PARTS

    layers = [n.name for n in golden.weights.graph.nodes]
    if not any(part_of(name) is not None for name in layers):
        return {}
    unlabel = {label: t for t, label in (observed.labels or {}).items()}
    by_tensor = {unlabel.get(k, k): layer for k, (layer, _) in mapping.items()}
    counts = {part: [0, None] for part in PARTS}
    for layer in by_tensor.values():
        if part_of(layer) in counts:
            counts[part_of(layer)][0] += 1
    scoped = _by_scope(observed.ops) if observed.matcher == "names" else {}
    if scoped:
        exposed = {t: part_of(layer) for t, layer in by_tensor.items()}
        layer_names = set(layers)
        for scope, scope_ops in scoped.items():  # a module that is a layer has its output mapped (map_by_scope)
            if _layer_of_scope(scope, layer_names, scoped) is None:
                exposed.setdefault(_module_output(scope_ops).output, part_of(scope))
        for part in PARTS:
            counts[part][1] = sum(p == part for p in exposed.values())
    return counts


def collect(golden, outputs, values: dict[str, np.ndarray], mapping: dict[str, str]) -> dict[str, np.ndarray]:
    """The tensors of a run, each in the golden's shape: every mapped runtime tensor of ``values``
    (NCHW) under its module path, in the order of ``mapping``, then the deployed ``outputs`` (a
    list in the model's output order, or a dict of some of the golden's outputs by name) under the
    golden's output names (an output's name that is also a layer's holds the deployed output)."""
    from . import layer_shapes, to_golden_shape

    names = list(golden.outputs)
    if isinstance(outputs, dict):  # those of the golden's outputs the model computes, by name
        names, outputs = list(outputs), list(outputs.values())
    elif len(outputs) != len(names):
        raise MappingError(f"the model has {len(outputs)} outputs, the golden has {len(names)} ({names})")
    shape_of = layer_shapes(golden)
    tensors = {}
    for runtime_name, layer in mapping.items():
        if runtime_name in values and layer not in tensors and layer not in golden.outputs:
            value = values[runtime_name]
            tensors[layer] = to_golden_shape(value, shape_of[layer]) if layer in shape_of else value
    for name, out in zip(names, outputs):
        tensors[name] = to_golden_shape(out, golden.outputs[name].shape)
    return tensors
