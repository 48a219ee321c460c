"""Execute a GhostNet :class:`~refghost.arch.Graph` on an input, node by node.

Each node op maps to a function of :mod:`refghost.ops` (``impl="plain"``, the definitions) or
to its compiled form in :mod:`refghost.kernels` (``impl="kernels"``, the default: BLAS for dense
convolutions, Numba for depthwise convolutions and erf; the other ops are the plain ones). Both
compute every value in the requested dtype and differ only in summation order.

The float64 oracle is this default: :func:`refghost.bounds.error_bounds`, which computes the
golden files' values (:func:`refghost.verify.golden.make_golden`), calls :func:`evaluate` without
``impl``, so the oracle is computed in float64 with BLAS and Numba, not with ``ops.py``'s loops
(``tests/test_forward.py`` checks the two agree within the float64 bound).
"""

from __future__ import annotations

import numpy as np

from . import ops
from .arch import Graph, Node

#: ``impl`` values: "kernels" (refghost.kernels where it has the op), "plain" (refghost.ops only).
IMPLS = ("kernels", "plain")


def _plain_conv(x, w, b=None, *, stride, padding, groups):
    return ops.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)


def _kernels_conv(x, w, b=None, *, stride, padding, groups):
    from .kernels import conv2d

    return conv2d(x, w, b, stride=stride, padding=padding, groups=groups)


def _kernels_activation(name, x, weight=None):
    from .kernels import activation

    return activation(name, x, weight)


_CONV = {"plain": _plain_conv, "kernels": _kernels_conv}
_ACTIVATION = {"plain": ops.activation, "kernels": _kernels_activation}


def evaluate(node: Node, inputs: list[np.ndarray], params: dict[str, np.ndarray], *, impl="kernels"):
    """The output of one node, given the outputs of its input nodes and the parameter arrays.

    ``params`` maps state_dict keys to arrays already in the compute dtype.
    """
    p = {role: params[key] for role, key in node.params.items()}
    x = inputs[0]
    if node.op == "conv":
        return _CONV[impl](x, p["weight"], p.get("bias"), **node.attrs)
    if node.op == "batch_norm":
        return ops.batch_norm(x, p["weight"], p["bias"], p["running_mean"], p["running_var"],
                              eps=node.attrs.get("eps", ops.BN_EPS))
    if node.op == "act":
        return _ACTIVATION[impl](node.attrs["activation"], x, p.get("weight"))
    if node.op == "concat":
        return np.concatenate(inputs, axis=1)
    if node.op == "add":
        return inputs[0] + inputs[1]
    if node.op == "global_avg_pool":
        return ops.global_avg_pool(x)
    if node.op == "hard_sigmoid":
        return ops.hard_sigmoid(x)
    if node.op == "scale":
        return inputs[0] * inputs[1]  # (N, C, H, W) * (N, C, 1, 1)
    if node.op == "linear":
        return ops.linear(x.reshape(x.shape[0], -1), p["weight"], p.get("bias"))
    if node.op in _DETECTOR_OPS:
        return _evaluate_detector_op(node, inputs)
    raise ValueError(f"unknown op {node.op!r} in node {node.name}")


#: The ops the whole detector adds (refghost.detector.graph); all are plain NumPy in either impl.
_DETECTOR_OPS = ("max_pool", "channel_shuffle", "slice", "upsample", "flatten_levels", "sigmoid_classes")


def _evaluate_detector_op(node: Node, inputs: list[np.ndarray]):
    from .detector import ops as detector_ops

    x, a = inputs[0], node.attrs
    if node.op == "max_pool":
        return detector_ops.max_pool2d(x, a["kernel"], a["stride"], a["padding"])
    if node.op == "channel_shuffle":
        return detector_ops.channel_shuffle(x, a["groups"])
    if node.op == "slice":
        return np.ascontiguousarray(x[:, a["start"]:a["stop"]])  # NanoDet's chunk(2) along channels
    if node.op == "upsample":
        return detector_ops.upsample_bilinear(x, a["scale_factor"])
    if node.op == "flatten_levels":
        return detector_ops.flatten_levels(inputs)
    return detector_ops.sigmoid_classes(x, a["num_classes"])


def execute(graph: Graph, params: dict[str, np.ndarray], x: np.ndarray, *, intermediates=False,
            impl="kernels") -> dict[str, np.ndarray]:
    """Run the graph on ``x: (N, 3, H, W)`` (already in the compute dtype).

    Returns ``{name: array}`` in forward order: the graph's outputs (``blocks.4``, ... or
    ``classifier``), and with ``intermediates=True`` every node's output too, each stage output
    placed right after the node that produces it. Without intermediates, a tensor is dropped as
    soon as no later node reads it.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    last_use = {}
    for i, node in enumerate(graph.nodes):
        for src in node.inputs:
            last_use[src] = i
    produced_by = {}
    for out_name, node_name in graph.outputs.items():
        produced_by.setdefault(node_name, []).append(out_name)

    values = {"input": x}
    result = {}
    for i, node in enumerate(graph.nodes):
        y = evaluate(node, [values[src] for src in node.inputs], params, impl=impl)
        values[node.name] = y
        if intermediates:
            result[node.name] = y
        for out_name in produced_by.get(node.name, ()):
            result[out_name] = y
        if not intermediates:
            for src in node.inputs:
                if last_use[src] == i:
                    values.pop(src, None)
    return result
