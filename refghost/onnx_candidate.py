"""Run an ONNX GhostNet in ONNX Runtime on a golden input, every tensor named by module path.

Every node output is exposed as a graph output (ORT then cannot fuse it away), and mapped to
the refghost graph node it corresponds to:

1. by **scope names**: the TorchScript exporter names nodes after the module path
   (``/blocks.6/blocks.6.3/ghost1/primary_conv/primary_conv.0/Conv``); the dynamo exporter
   records it in node metadata ``pkg.torch.onnx.name_scopes``
   (``['', 'blocks.6', ..., 'blocks.6.3.ghost1.primary_conv.1', 'conv']``). A module's output is
   its last node's output; inside an SE, the hard-sigmoid's last node (``Div`` or
   ``HardSigmoid``) is ``<se>.gate``. Both exporters fold BatchNorm into the Conv before it, so
   a Conv with no BatchNormalization of its own stands for the conv+BN pair and maps to the BN.
2. when names are missing (simplified or renamed graphs): by **structure**, aligning the ONNX
   ops in topological order with the refghost layers in forward order; the report says so.

The graph outputs map, in order, to the golden's outputs.
"""

from __future__ import annotations

import ast

import numpy as np

from .compare import CompareError
from .arch import Graph
from .golden import Golden

# ONNX ops that never compute a layer's output. (Identity is not among them when matching by scope:
# the last node of a module's scope is its output, whatever it is.)
_PLUMBING = {"Constant", "Shape", "Gather", "Unsqueeze", "Cast", "ConstantOfShape", "Reshape", "Flatten",
             "Squeeze", "Dropout"}
_GATE_OPS = {"Div", "HardSigmoid", "Mul"}


def run_onnx(path, golden: Golden, *, threads: int = 1, optimization: str = "all"):
    """Return ``(tensors, description, notes)``: the model's tensors by refghost name."""
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(path)
    except Exception as exc:  # onnx raises DecodeError and others for a bad file
        raise CompareError(f"{path}: not a readable ONNX model ({exc})") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise CompareError(f"{path}: expected one input, found {[i.name for i in inputs]}")
    _check_input_shape(path, inputs[0], golden.input.shape)
    output_names = [o.name for o in graph.output]
    feed = {inputs[0].name: golden.input}
    # The outputs as deployed: the model as it is, with the requested optimizations.
    deployed = _run(path, model, feed, threads, optimization)
    # Every tensor: exposing a tensor stops ORT from fusing it away, so this run may round
    # differently from the deployed one; each is honest on its own and checked as such.
    existing = set(output_names)
    for node in graph.node:
        for name in node.output:
            if name and name not in existing:
                graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                existing.add(name)
    values = _run(path, model, feed, threads, optimization)

    notes = []
    graph_outputs = list(golden.outputs)
    if len(output_names) != len(graph_outputs):
        raise CompareError(f"{path}: {len(output_names)} graph outputs, the golden has {len(graph_outputs)} "
                           f"({graph_outputs})")
    tensors = {name: deployed[onnx_name] for name, onnx_name in zip(graph_outputs, output_names)}
    mapping, how = map_tensors(graph, golden.weights.graph)
    notes.append(f"{len(mapping)} ONNX tensors mapped to layers {how}")
    for onnx_name, layer in mapping.items():
        tensors.setdefault(layer, values[onnx_name])
    description = f"{path} (ONNX Runtime {ort.__version__}, {threads} thread(s), optimization {optimization})"
    return tensors, description, notes


def _run(path, model, feed, threads, optimization) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed)))
    except Exception as exc:  # ORT raises its own exception types
        raise CompareError(f"{path}: ONNX Runtime could not run it on the golden input "
                           f"{tuple(next(iter(feed.values())).shape)}: {str(exc).splitlines()[0]}") from None


def _check_input_shape(path, value_info, shape):
    dims = value_info.type.tensor_type.shape.dim
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(fixed) != len(shape) or any(f is not None and f != s for f, s in zip(fixed, shape)):
        raise CompareError(f"{path}: the model's input {value_info.name} has shape "
                           f"{[f if f is not None else '?' for f in fixed]}, the golden input is {list(shape)}; "
                           f"make a golden of that shape (refghost golden --seed N with a matching --input)")


def _scope(node) -> str | None:
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
    if not node.name.startswith("/"):
        return None
    path = ""
    last = ""
    for segment in node.name.split("/")[1:-1]:  # TorchScript: /blocks.6/blocks.6.3/ghost1/.../Conv
        if last and segment.startswith(last + "."):
            path = path[: len(path) - len(last)] + segment
        else:
            path = f"{path}.{segment}" if path else segment
        last = segment
    return path or None


def map_tensors(graph, network: Graph) -> tuple[dict[str, str], str]:
    """``{onnx tensor name: refghost node name}`` for the ONNX nodes that produce layer outputs of
    ``network``, and how they were matched. ``graph`` is an ONNX GraphProto."""
    layers = {n.name: n for n in network.nodes}
    by_scope: dict[str, list] = {}
    for node in graph.node:
        if node.op_type in _PLUMBING:
            continue
        scope = _scope(node)
        if scope is not None:
            by_scope.setdefault(scope, []).append(node)
    if any(scope in layers for scope in by_scope):
        return _map_by_scope(by_scope, network), "by exporter scope names"
    return _map_by_structure(graph, network), "by structure (the graph has no scope names)"


def _folded_bn(layer, network: Graph, has_nodes) -> str | None:
    """The BatchNorm after conv ``layer`` if the ONNX graph has none of its own (it was folded)."""
    nodes = network.nodes
    consumers = [n for n in nodes if layer.name in n.inputs]
    if len(consumers) == 1 and consumers[0].op == "batch_norm" and not has_nodes(consumers[0].name):
        return consumers[0].name
    return None


def _map_by_scope(by_scope, network: Graph) -> dict[str, str]:
    layers = {n.name: n for n in network.nodes}
    mapping = {}
    for scope, onnx_nodes in by_scope.items():
        layer = layers.get(scope)
        if layer is None:
            continue
        name = scope
        if layer.op == "conv":
            name = _folded_bn(layer, network, lambda n: n in by_scope) or scope
        elif layer.op == "scale":  # the SE: its gate is computed inside the same scope
            gates = [n for n in onnx_nodes[:-1] if n.op_type in _GATE_OPS]
            if gates:
                mapping[gates[-1].output[0]] = f"{scope}.gate"
        mapping[onnx_nodes[-1].output[0]] = name
    return mapping


# Structure matching: each refghost op and the ONNX op sequences that may implement it.
_PATTERNS = {
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


def _map_by_structure(graph, network: Graph) -> dict[str, str]:
    ops = [n for n in graph.node if n.op_type not in _PLUMBING and n.op_type != "Identity"]
    layers = network.nodes
    mapping = {}
    i = 0
    k = 0
    while k < len(layers):
        layer = layers[k]
        for pattern in _PATTERNS[layer.op]:
            if tuple(n.op_type for n in ops[i:i + len(pattern)]) == pattern:
                break
        else:
            found = ops[i].op_type if i < len(ops) else "the end of the graph"
            raise CompareError(f"cannot match the ONNX graph to the network by structure: layer {layer.name} "
                               f"({layer.op}) meets ONNX op {found}; name intermediate tensors by module path "
                               f"(e.g. dump them to .npz) instead")
        i += len(pattern)
        name = layer.name
        nxt = layers[k + 1] if k + 1 < len(layers) else None
        if layer.op == "conv" and nxt is not None and nxt.op == "batch_norm" and nxt.inputs == (layer.name,) \
                and (i >= len(ops) or ops[i].op_type != "BatchNormalization"):
            name = nxt.name  # BatchNorm folded into this Conv
            k += 1
        mapping[ops[i - 1].output[0]] = name
        k += 1
    return mapping
