"""Recognising the element-wise op patterns of an ONNX graph: activations and the hard-sigmoid gate.

Between two tensors (a conv's output and its activation's, or the SE's ``conv_expand`` output and
its gate's) the nodes computing one element-wise function are collected and classified:

* :func:`classify_activation`: ``Relu``; ``LeakyRelu`` (alpha 0.1); ``Clip(0, 6)`` (ReLU6);
  ``Elu`` (alpha 1); ``Selu`` or ``Elu(1.6733) * 1.0507``; ``PRelu`` (one slope, returned for
  ``<act>.weight`` of shape (1,)); ``HardSwish`` or ``x * HardSigmoid(1/6, 1/2)``; ``Gelu``
  (exact) or the ``Erf`` pattern; ``Sigmoid`` + ``Mul`` (SiLU);
* :func:`classify_gate`: NanoDet's ``relu6(x + 3) / 6``, as ``HardSigmoid(1/6, 1/2)`` (ONNX's
  defaults 0.2 and 0.5 are a different function) or ``Add``, ``Clip``, ``Div``/``Mul``.

Each returns what it found, or a message naming the ONNX node and what is wrong with its
constants or ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import ops
from .onnx_graph import OnnxGraph, attribute, is_close, scalar

#: Activation names of the patterns, for messages.
ACTIVATION_LABELS = {"ReLU6": "ReLU6 (Clip 0..6)", "LeakyReLU": "LeakyReLU(0.1)"}


@dataclass
class _Pattern:
    """The ONNX nodes (in graph order) computing one element-wise function of one tensor."""

    nodes: list
    ops: tuple[str, ...]


def _subgraph(onnx: OnnxGraph, t_in: str, t_out: str, same: str, limit: int = 8) -> _Pattern | str:
    """The nodes between tensors ``t_in`` and ``t_out`` (both resolved): every non-constant input
    of each must be ``t_in`` or an output of another; returns a message if not (``same`` when
    ``t_out`` is ``t_in``: no function at all)."""
    if t_in == t_out:
        return same
    nodes, stack, seen, reached = [], [t_out], set(), False
    while stack:
        t = onnx.resolve(stack.pop())
        if t == t_in:
            reached = True
            continue
        if t in seen or onnx.const(t) is not None:
            continue
        seen.add(t)
        node = onnx.producer.get(t)
        if node is None:
            return f"reads tensor {t!r}, not the output of the layer before it"
        nodes.append(node)
        if len(nodes) > limit:
            return "is not an element-wise function of the layer before it"
        stack.extend(i for i in node.input if i)
    if not reached:
        return "does not read the output of the layer before it"
    nodes = sorted({id(n): n for n in nodes}.values(), key=lambda n: onnx.index[id(n)])
    return _Pattern(nodes, tuple(n.op_type for n in nodes))


def _clip_bounds(onnx: OnnxGraph, node) -> tuple[float | None, float | None]:
    if onnx.opset and onnx.opset < 11:
        return attribute(node, "min"), attribute(node, "max")
    lo = scalar(onnx.const(node.input[1])) if len(node.input) > 1 and node.input[1] else None
    hi = scalar(onnx.const(node.input[2])) if len(node.input) > 2 and node.input[2] else None
    return lo, hi


def _reads(onnx: OnnxGraph, node, tensor: str) -> bool:
    """Whether ``node`` has ``tensor`` (resolved) among its inputs."""
    return tensor in [onnx.resolve(i) for i in node.input]


def _other_const(onnx: OnnxGraph, node) -> float | None:
    """The single constant operand of a binary node."""
    values = [scalar(onnx.const(i)) for i in node.input]
    values = [v for v in values if v is not None]
    return values[0] if len(values) == 1 else None


def classify_activation(onnx: OnnxGraph, t_in: str, t_out: str) -> tuple[str, np.ndarray | None, list] | str:
    """``(activation name, PReLU slope or None, ONNX nodes)`` of the pattern from ``t_in`` to
    ``t_out``, or a message saying what is wrong with it."""
    pat = _subgraph(onnx, t_in, t_out, "has no activation (the conv output is used as is)")
    if isinstance(pat, str):
        return pat
    n, ops_ = pat.nodes, pat.ops
    first = n[0]
    where = f"ONNX node {onnx.label(n[-1])}"
    if ops_ == ("Relu",):
        return "ReLU", None, n
    if ops_ == ("LeakyRelu",):
        alpha = attribute(first, "alpha", 0.01)
        if not is_close(alpha, ops.LEAKY_RELU_SLOPE):
            return (f"{where} is LeakyRelu with alpha {alpha:.6g}; NanoDet's LeakyReLU has slope "
                    f"{ops.LEAKY_RELU_SLOPE} (PyTorch's default 0.01 is a different network)")
        return "LeakyReLU", None, n
    if ops_ == ("Clip",):
        lo, hi = _clip_bounds(onnx, first)
        if is_close(lo, 0.0) and is_close(hi, 6.0):
            return "ReLU6", None, n
        if is_close(lo, 0.0) and (hi is None or hi > 3e38):
            return "ReLU", None, n
        return f"{where} is Clip({lo}, {hi}): not an activation GhostNet uses (ReLU6 is Clip(0, 6))"
    if ops_ == ("Elu",):
        alpha = attribute(first, "alpha", 1.0)
        if not is_close(alpha, ops.ELU_ALPHA):
            return f"{where} is Elu with alpha {alpha:.6g}; PyTorch's ELU has alpha {ops.ELU_ALPHA}"
        return "ELU", None, n
    if ops_ in (("Selu",), ("Elu", "Mul")):  # TorchScript's Selu; dynamo's scale * Elu(alpha)
        if ops_ == ("Selu",):  # ONNX's defaults are SELU's constants
            alpha, scale = attribute(first, "alpha", ops.SELU_ALPHA), attribute(first, "gamma", ops.SELU_SCALE)
        else:
            alpha, scale = attribute(first, "alpha", 1.0), _other_const(onnx, n[1])
        if not (is_close(alpha, ops.SELU_ALPHA) and is_close(scale, ops.SELU_SCALE)):
            return (f"{where}: SELU with alpha {alpha}, scale {scale}; PyTorch's SELU has {ops.SELU_ALPHA:.8g}, "
                    f"{ops.SELU_SCALE:.8g}")
        return "SELU", None, n
    if ops_ == ("PRelu",):
        slope = onnx.const(first.input[1])
        if slope is None:
            return f"{where}: the PRelu slope is not a constant of the graph"
        if slope.size != 1:
            return (f"{where}: PRelu with {slope.size} slopes; NanoDet's PReLU has one learnt slope "
                    f"(nn.PReLU())")
        return "PReLU", np.asarray(slope, dtype=np.float32).reshape(1), n
    if ops_ == ("HardSwish",):
        return "HardSwish", None, n
    if ops_ == ("HardSigmoid", "Mul"):
        alpha, beta = attribute(first, "alpha", 0.2), attribute(first, "beta", 0.5)
        if is_close(alpha, 1 / 6) and is_close(beta, 0.5) and _reads(onnx, n[1], t_in):
            return "HardSwish", None, n
        return f"{where}: x * HardSigmoid(alpha={alpha:.6g}, beta={beta:.6g}) is not HardSwish (needs 1/6, 1/2)"
    if ops_ == ("Sigmoid", "Mul"):
        if _reads(onnx, n[1], t_in) and _reads(onnx, n[1], first.output[0]):
            return "SiLU", None, n
        return f"{where}: Sigmoid then Mul, but not x * sigmoid(x)"
    if ops_ == ("Gelu",):
        if attribute(first, "approximate", "none") != "none":
            return f"{where}: Gelu with approximate={attribute(first, 'approximate')!r}; PyTorch's GELU is exact"
        return "GELU", None, n
    if sorted(ops_) in (["Add", "Div", "Erf", "Mul", "Mul"], ["Add", "Erf", "Mul", "Mul", "Mul"]):
        return _gelu_erf(onnx, pat, t_in, where)
    return f"{where}: the ops {list(ops_)} are not an activation refghost knows"


def _gelu_erf(onnx: OnnxGraph, pat: _Pattern, t_in: str, where: str):
    """x * 0.5 * (1 + erf(x / sqrt(2))) in either exporter's order of the multiplications."""
    erf = next(n for n in pat.nodes if n.op_type == "Erf")
    scale = onnx.producer.get(onnx.resolve(erf.input[0]))
    ok = scale is not None and _reads(onnx, scale, t_in)
    c = _other_const(onnx, scale) if ok else None
    ok = ok and ((scale.op_type == "Div" and is_close(c, math.sqrt(2))) or
                 (scale.op_type == "Mul" and is_close(c, 1 / math.sqrt(2))))
    add = next(n for n in pat.nodes if n.op_type == "Add")
    ok = ok and is_close(_other_const(onnx, add), 1.0)
    muls = [n for n in pat.nodes if n.op_type == "Mul" and n is not scale]
    halves = [m for m in muls if is_close(_other_const(onnx, m), 0.5)]
    ok = ok and len(halves) == 1 and any(_reads(onnx, m, t_in) for m in muls)
    if not ok:
        return f"{where}: an Erf pattern that is not x/2 * (1 + erf(x/sqrt(2))) (exact GELU)"
    return "GELU", None, pat.nodes


def classify_gate(onnx: OnnxGraph, t_in: str, t_out: str) -> list | str:
    """The ONNX nodes of a hard-sigmoid ``relu6(x + 3) / 6`` from ``t_in`` to ``t_out``, or a message."""
    pat = _subgraph(onnx, t_in, t_out, "has no gate function (the SE multiplies by conv_expand's output itself)")
    if isinstance(pat, str):
        return pat
    n, ops_ = pat.nodes, pat.ops
    where = f"ONNX node {onnx.label(n[-1])}"
    if ops_ == ("HardSigmoid",):
        alpha, beta = attribute(n[0], "alpha", 0.2), attribute(n[0], "beta", 0.5)
        if is_close(alpha, 1 / 6) and is_close(beta, 0.5):
            return n
        return (f"{where} is HardSigmoid with alpha={alpha:.6g}, beta={beta:.6g}; NanoDet's hard_sigmoid is "
                f"relu6(x + 3) / 6, i.e. alpha=1/6, beta=0.5 (ONNX's defaults 0.2, 0.5 are a different function)")
    if len(ops_) == 3 and ops_[0] == "Add" and ops_[1] == "Clip" and ops_[2] in ("Div", "Mul"):
        add, clip, last = n
        lo, hi = _clip_bounds(onnx, clip)
        c = _other_const(onnx, last)
        scale_ok = is_close(c, 6.0) if last.op_type == "Div" else is_close(c, 1 / 6)
        if is_close(_other_const(onnx, add), 3.0) and is_close(lo, 0.0) and is_close(hi, 6.0) and scale_ok:
            return n
        return (f"{where}: the gate computes {last.op_type}(Clip(x + {_other_const(onnx, add)}, {lo}, {hi}), {c}); "
                f"NanoDet's hard_sigmoid is relu6(x + 3) / 6")
    return f"{where}: the ops {list(ops_)} are not NanoDet's hard_sigmoid relu6(x + 3) / 6"
