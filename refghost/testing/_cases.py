"""Test cases: small frozen dataclasses holding an op's arrays and parameters.

These are what :mod:`refghost.testing.strategies` generates and what
:func:`refghost.testing.assert_matches_reference` checks a result against. They need only NumPy
(no Hypothesis), so a test may also build them by hand.

Layout is refghost's: activations NCHW, conv weights OIHW ``(O, C/groups, KH, KW)``, linear
weights ``(O, I)``, per-channel BatchNorm parameters ``(C,)``. Arrays are those the backend
under test is given, exactly (see :func:`refghost.testing.round_case` for float16/bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace

import numpy as np

from .. import ops
from ..arch import SE_RATIO, Bottleneck, Graph, Node, bottleneck_graph, ghost_module_graph

__all__ = [
    "ConvCase", "BatchNormParams", "BatchNormCase", "ConvBNCase", "ActivationCase", "PoolCase",
    "LinearCase", "GhostModuleConfig", "GhostModuleCase", "GhostBottleneckConfig",
    "GhostBottleneckCase", "fold_batch_norm", "random_params",
]

#: Arrays up to this many elements are printed in full in a case's repr (so a shrunk failing case
#: can be pasted back into a test); larger ones are summarised.
_REPR_FULL = 32


def _show(a) -> str:
    if a is None:
        return "None"
    a = np.asarray(a)
    if a.size <= _REPR_FULL:
        return np.array_repr(a, max_line_width=10_000).replace("\n", "")
    finite = a[np.isfinite(a)]
    rng = f", range [{finite.min():.4g}, {finite.max():.4g}]" if finite.size else ""
    return f"<{a.dtype} array {a.shape}{rng}>"


def _shape(a) -> str:
    return "None" if a is None else f"{tuple(np.shape(a))}"


class _Case:
    """repr that prints small arrays in full and large ones as a summary."""

    def __repr__(self):
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                parts.append(f"{f.name}={_show(v)}")
            elif isinstance(v, dict):
                parts.append(f"{f.name}={{{len(v)} arrays}}")
            else:
                parts.append(f"{f.name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, eq=False, repr=False)
class ConvCase(_Case):
    """A 2-D convolution (PyTorch ``Conv2d``, ONNX ``Conv``): ``y = conv2d(x, w, b)``.

    * ``x``: (N, C, H, W); ``w``: (O, C/groups, K, K); ``b``: (O,) or None
    * ``stride``, ``padding``: the same along H and W (zero padding on every side)
    * ``groups``: divides C and O; ``groups == C`` is depthwise

    Dilation is always 1: refghost's ops (and GhostNet) have none.
    """

    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None
    stride: int
    padding: int
    groups: int

    @property
    def depthwise(self) -> bool:
        return self.groups == self.x.shape[1] and self.w.shape[1] == 1

    def describe(self) -> str:
        return (f"x {_shape(self.x)} {self.x.dtype}, w {_shape(self.w)}, b {_shape(self.b)}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}"
                + (" (depthwise)" if self.depthwise and self.groups > 1 else ""))


@dataclass(frozen=True, eq=False, repr=False)
class BatchNormParams(_Case):
    """Eval-mode BatchNorm2d parameters, each (C,): ``y = (x - mean) / sqrt(var + eps) * weight + bias``."""

    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    eps: float = ops.BN_EPS

    def coefficients(self):
        """``(alpha, beta)`` in the parameters' dtype, in PyTorch's order
        (:func:`refghost.ops.batch_norm_coefficients`)."""
        return ops.batch_norm_coefficients(self.weight, self.bias, self.running_mean, self.running_var,
                                           eps=self.eps)

    def describe(self) -> str:
        return (f"C={self.weight.shape[0]}, eps={self.eps:g}, "
                f"min running_var={float(np.min(self.running_var)):.3g}")


@dataclass(frozen=True, eq=False, repr=False)
class BatchNormCase(_Case):
    """Eval-mode BatchNorm2d of ``x`` (N, C, H, W) with ``bn`` (:class:`BatchNormParams`)."""

    x: np.ndarray
    bn: BatchNormParams

    def describe(self) -> str:
        return f"x {_shape(self.x)} {self.x.dtype}, bn: {self.bn.describe()}"


@dataclass(frozen=True, eq=False, repr=False)
class ConvBNCase(_Case):
    """A convolution followed by an eval-mode BatchNorm over its O output channels.

    A backend may compute it unfolded (conv, then BN) or fused (:func:`fold_batch_norm`, one conv).
    """

    conv: ConvCase
    bn: BatchNormParams

    @property
    def x(self) -> np.ndarray:
        return self.conv.x

    def folded(self):
        """``(w', b')`` of the fused conv, computed in the case's dtype (:func:`fold_batch_norm`)."""
        return fold_batch_norm(self.conv.w, self.conv.b, self.bn)

    def describe(self) -> str:
        return f"{self.conv.describe()}; bn: {self.bn.describe()}"


@dataclass(frozen=True, eq=False, repr=False)
class ActivationCase(_Case):
    """An elementwise activation ``name`` (a key of :data:`refghost.ops.ACTIVATIONS`, or
    ``"hard_sigmoid"``) of ``x``; ``weight`` is PReLU's slope, shape (1,), else None."""

    x: np.ndarray
    name: str
    weight: np.ndarray | None = None

    def describe(self) -> str:
        w = "" if self.weight is None else f", slope={float(self.weight.reshape(())):.6g}"
        return f"{self.name}: x {_shape(self.x)} {self.x.dtype}{w}"


@dataclass(frozen=True, eq=False, repr=False)
class PoolCase(_Case):
    """Global average pooling of ``x`` (N, C, H, W) to (N, C, 1, 1)."""

    x: np.ndarray

    def describe(self) -> str:
        return f"x {_shape(self.x)} {self.x.dtype}"


@dataclass(frozen=True, eq=False, repr=False)
class LinearCase(_Case):
    """A fully connected layer (PyTorch ``Linear``, ONNX ``Gemm`` with transB=1):
    ``y = x @ w.T + b``, x (N, I), w (O, I), b (O,) or None."""

    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None

    def describe(self) -> str:
        return f"x {_shape(self.x)} {self.x.dtype}, w {_shape(self.w)}, b {_shape(self.b)}"


def random_params(graph: Graph, *, seed: int, dtype=np.float32) -> dict:
    """Random but well-scaled parameters for every key of ``graph`` (``np.random.default_rng(seed)``):
    conv weights N(0, 1/fan_in), BN gamma U(0.5, 1.5), beta and mean N(0, 0.1), var U(0.5, 1.5),
    biases N(0, 0.1), PReLU slopes U(0.1, 0.4). Activations stay O(1) through a few blocks."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in graph.param_shapes.items():
        if key.endswith("running_var") or (len(shape) == 1 and key.endswith(".weight") and shape != (1,)):
            value = rng.uniform(0.5, 1.5, shape)
        elif shape == (1,):
            value = rng.uniform(0.1, 0.4, shape)
        elif len(shape) == 1:
            value = rng.normal(0.0, 0.1, shape)
        else:
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)
        params[key] = value.astype(dtype)
    return params


def fold_batch_norm(w, b, bn: BatchNormParams):
    """Fold an eval-mode BatchNorm into the conv before it, in the arrays' dtype.

    ``alpha, beta = bn.coefficients()``; ``w' = w * alpha[o]``; ``b' = b * alpha + beta`` (``beta``
    alone when ``b`` is None). This is what ONNX Runtime's Conv+BN fusion and PyTorch's
    ``fuse_conv_bn_eval`` compute, up to the order of a few roundings.
    """
    return ops.fold_batch_norm(w, b, bn.weight, bn.bias, bn.running_mean, bn.running_var, eps=bn.eps)


# --- GhostNet blocks ----------------------------------------------------------------------


def _renamed(graph: Graph, prefix: str, output: str) -> Graph:
    """The graph with ``prefix.`` dropped from every node name and parameter key (so keys are a
    standalone PyTorch module's state_dict keys); the node named ``prefix`` becomes ``output``."""

    def name(s):
        if s == prefix:
            return output
        return s[len(prefix) + 1:] if s.startswith(prefix + ".") else s

    nodes = [Node(name(n.name), n.op, tuple(name(i) for i in n.inputs),
                  {role: name(key) for role, key in n.params.items()}, dict(n.attrs)) for n in graph.nodes]
    return Graph(graph.config, nodes, {output: output}, {name(k): v for k, v in graph.param_shapes.items()})


def _check_even(what, value):
    if not (isinstance(value, int) and value >= 2 and value % 2 == 0):
        raise ValueError(f"{what} must be an even int >= 2 (GhostModule concatenates two halves), got {value!r}")


@dataclass(frozen=True)
class GhostModuleConfig:
    """A GhostModule: 1x1 conv+BN(+act) to ``out/2`` channels, a 3x3 depthwise conv+BN(+act) of
    that, concatenated ``[primary, cheap]``. ``activation`` None is ghost2's (no activation)."""

    in_channels: int
    out_channels: int
    activation: str | None = "ReLU"

    def __post_init__(self):
        if not (isinstance(self.in_channels, int) and self.in_channels >= 1):
            raise ValueError(f"in_channels must be an int >= 1, got {self.in_channels!r}")
        _check_even("out_channels", self.out_channels)
        if self.activation is not None and self.activation not in ops.ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")

    def graph(self) -> Graph:
        """The module's nodes (``primary_conv.0`` ... ``cheap_operation.2``), output ``"output"``;
        parameter keys are those of a standalone PyTorch ``GhostModule``'s state_dict."""
        return _renamed(ghost_module_graph("m", self.in_channels, self.out_channels, self.activation), "m", "output")


@dataclass(frozen=True)
class GhostBottleneckConfig:
    """A GhostBottleneck: ghost1 (with activation) -> [depthwise ``kernel_size`` conv+BN if
    stride 2] -> [squeeze-excite if ``se``] -> ghost2 (no activation) + shortcut (identity when
    in == out and stride 1, else depthwise conv+BN, 1x1 conv+BN)."""

    in_channels: int
    mid_channels: int
    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    se: bool = False
    activation: str = "ReLU"

    def __post_init__(self):
        if not (isinstance(self.in_channels, int) and self.in_channels >= 1):
            raise ValueError(f"in_channels must be an int >= 1, got {self.in_channels!r}")
        _check_even("mid_channels", self.mid_channels)
        _check_even("out_channels", self.out_channels)
        if self.kernel_size not in (1, 3, 5, 7):
            raise ValueError(f"kernel_size must be 1, 3, 5 or 7, got {self.kernel_size!r}")
        if self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {self.stride!r}")
        if self.activation not in ops.ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")

    def graph(self) -> Graph:
        """The block's nodes (``ghost1.primary_conv.0`` ... ``shortcut.3``), output ``"output"``
        (the residual add); keys are those of a standalone PyTorch ``GhostBottleneck``."""
        block = Bottleneck("m", 0, self.in_channels, self.mid_channels, self.out_channels, self.kernel_size,
                           self.stride, SE_RATIO if self.se else 0.0)
        return _renamed(bottleneck_graph(block, self.activation), "m", "output")


@dataclass(frozen=True, eq=False, repr=False)
class GhostModuleCase(_Case):
    """A GhostModule (``config``) applied to ``x`` with ``params`` (state_dict key -> array)."""

    x: np.ndarray
    params: dict
    config: GhostModuleConfig

    @property
    def graph(self) -> Graph:
        return self.config.graph()

    def describe(self) -> str:
        return f"x {_shape(self.x)} {self.x.dtype}, {self.config}"


@dataclass(frozen=True, eq=False, repr=False)
class GhostBottleneckCase(_Case):
    """A GhostBottleneck (``config``) applied to ``x`` with ``params`` (state_dict key -> array)."""

    x: np.ndarray
    params: dict
    config: GhostBottleneckConfig

    @property
    def graph(self) -> Graph:
        return self.config.graph()

    def describe(self) -> str:
        return f"x {_shape(self.x)} {self.x.dtype}, {self.config}"


# --- generic array access ------------------------------------------------------------------


def map_arrays(case, fn):
    """A copy of ``case`` with ``fn`` applied to every array in it (nested cases and params dicts too)."""
    if isinstance(case, np.ndarray):
        return fn(case)
    if isinstance(case, dict):
        return {k: map_arrays(v, fn) for k, v in case.items()}
    if is_dataclass(case) and not isinstance(case, type):
        changes = {}
        for f in fields(case):
            v = getattr(case, f.name)
            if isinstance(v, (np.ndarray, dict)) or (is_dataclass(v) and isinstance(v, _Case)):
                changes[f.name] = map_arrays(v, fn)
        return replace(case, **changes)
    return case


def iter_arrays(case, prefix="case"):
    """``(dotted name, array)`` for every array in ``case``."""
    if isinstance(case, np.ndarray):
        yield prefix, case
    elif isinstance(case, dict):
        for k, v in case.items():
            yield from iter_arrays(v, f"{prefix}[{k!r}]")
    elif is_dataclass(case) and not isinstance(case, type):
        for f in fields(case):
            v = getattr(case, f.name)
            if isinstance(v, (np.ndarray, dict)) or isinstance(v, _Case):
                yield from iter_arrays(v, f"{prefix}.{f.name}")

