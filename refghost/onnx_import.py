"""Import a GhostNet exported to ONNX by PyTorch as a refghost weights file (BatchNorm folded).

:func:`import_onnx` reads the graph and its initializers and returns :class:`~refghost.weights.Weights`
with ``Config(folded=True)``: every conv+BN pair is one conv with a bias, keyed
``<conv module>.weight`` / ``.bias`` and named after the BN it replaces, as both PyTorch exporters
(TorchScript, ``dynamo=True``) write it. What it does, in order:

1. **Architecture.** One image input ``(N, 3, H, W)``; a ``Gemm`` or ``MatMul`` means Huawei's/timm's
   ImageNet classifier (``ghostnet``, ``num_classes`` from its weight), otherwise NanoDet's backbone
   (``nanodet``). The number of Conv nodes must be GhostNet's (94 for the backbone, 95 with the head).
2. **Width.** The stem conv's output channels bound the width multiplier to an interval; every
   width at which some channel count of the stage table changes its rounding is a breakpoint, and
   one width per interval between breakpoints is tried: the widths whose folded
   ``build_graph(...).param_shapes`` have exactly the graph's conv weight shapes are the answer.
   None (or two different shape sets) is refused. Widths that give the same shapes describe the
   same network; the simplest one is recorded (a common multiplier such as 0.5 or 1.0 if it is
   one of them, else the shortest decimal).
3. **Layers.** :func:`refghost.runtimes.mapping.map_onnx` maps ONNX tensors to refghost layers by
   the exporters' scope names (TorchScript node names, dynamo's ``pkg.torch.onnx.name_scopes``) or,
   when names are gone, by aligning op order. The mapping is then *verified*, layer by layer in
   forward order, against the data flow: each layer's ONNX producer must be the right op reading
   exactly the ONNX tensors of the layer's inputs (``Identity`` nodes are looked through).
4. **Activation.** The op pattern between each backbone conv and its activation's output
   (``act1``, both convs of every ``ghost1``, ``blocks.9.0.act1``) is classified: ``Relu``;
   ``LeakyRelu`` (alpha 0.1); ``Clip(0, 6)`` (ReLU6); ``Elu`` (alpha 1); ``Selu`` or
   ``Elu(1.6733) * 1.0507``; ``PRelu`` (one slope, stored as ``<act>.weight`` of shape (1,));
   ``HardSwish`` or ``x * HardSigmoid(1/6, 1/2)``; ``Gelu`` (exact) or the ``Erf`` pattern;
   ``Sigmoid`` + ``Mul`` (SiLU). The activation most sites use is the network's; a site that
   differs is refused by name.
5. **Out stages.** The graph outputs must be stage outputs (the last block of a stage, or
   ``blocks.9.0.act1``); their stages are ``out_stages``.
6. **Weights.** Conv inputs 1 and 2 (a missing bias is zeros). A ``BatchNormalization`` kept by the
   export (``training=PRESERVE``) is folded here, in float64 with
   :func:`refghost.ops.fold_batch_norm`, then rounded once to float32.

Semantic lint: whatever would make the imported weights describe a different network from the
one the graph computes is refused with a :class:`~refghost.errors.WeightsError` naming the ONNX
node and the problem: a ``HardSigmoid`` gate with alpha != 1/6 or beta != 1/2 (ONNX's defaults are
0.2 and 0.5), a hard-sigmoid pattern with other constants, ``LeakyRelu`` alpha != 0.1, an
activation that differs from the rest of the network, ``BatchNormalization`` epsilon != 1e-5 (or
in training mode), a ``Conv`` whose kernel, strides, pads, dilations or groups are not GhostNet's,
a ``Concat`` that is not ``[primary, cheap]`` along channels, a residual ``Add`` that is missing or
adds the wrong tensors, a pooling that does not average over H and W, a ``Gemm`` with
alpha/beta != 1 or a transposed input.

Not detectable from the graph alone: wrong *values* (a weight off by 1%, RGB/BGR-swapped stem
weights). The import is faithful to the file, so such a model imports fine; comparing a golden
file of the original weights with the imported ones (``refghost golden`` + ``refghost compare``)
finds the layer.

The folding's own rounding: an exporter folds in float32, ``W' = W * alpha`` and
``b' = beta - mean * alpha`` (``beta`` the BN's bias) with ``alpha = gamma / sqrt(var + eps)``:
alpha carries up to 2.5 roundings (add, sqrt, divide), ``W'`` one more, ``b'`` one more on
``mean * alpha`` and one for the subtraction: ``|W' - W alpha| <= 3.5 u |W alpha|`` and
``|b' - (beta - mean alpha)| <= 3.5 u (|beta| + |mean alpha|)`` to first order (u = 2^-24; PyTorch
2.13's exporters measure <= 3). :data:`FOLD_ROUNDINGS` = 4 covers both; :func:`folding_bound`
carries it to every layer. A BN folded here (in float64) is rounded once: <= 1 u.

Matching by structure (a graph without scope names) aligns op order, so there a missing op shows
up as a misalignment at the next layer, named as such.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from . import __version__, ops
from .arch import DEFAULT_OUT_STAGES, STAGES, Config, Graph, build_graph, make_divisible
from .bounds import DEFAULT_LAMBDA, FLOAT32_U, FLOAT64_U, error_bounds
from .errors import RefghostError, WeightsError
from .forward import evaluate
from .weights import Preprocessing, Weights, default_preprocessing, file_sha256, from_tensors

#: Roundings in units of u that an exporter's float32 BatchNorm folding puts on each folded weight
#: and bias (see the module docstring); measured on PyTorch 2.x exports: <= 3.
FOLD_ROUNDINGS = 4
#: Multipliers tried first when several widths give the same network (NanoDet, Huawei, timm).
COMMON_WIDTHS = (1.0, 0.5, 1.5, 1.3, 0.75, 2.0, 0.25, 1.25, 1.75)
#: Every channel count of the stage table that the width multiplier scales.
_BASE_CHANNELS = tuple(sorted({16} | {b.mid for s in STAGES for b in s} | {b.out for s in STAGES for b in s}))
#: Activation names of the patterns, for messages.
_DESCRIBE = {"ReLU6": "ReLU6 (Clip 0..6)", "LeakyReLU": "LeakyReLU(0.1)"}
#: float32 tolerance when comparing constants read from the graph with the expected ones.
_RTOL = 1e-6


# --------------------------------------------------------------------------------------------
# The ONNX graph, indexed
# --------------------------------------------------------------------------------------------
class _Onnx:
    """An ONNX graph with its producers, consumers and constants at hand."""

    def __init__(self, model, path: str):
        self.path = path
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.nodes = list(self.graph.node)
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self._consts: dict[str, np.ndarray | None] = {}

    def label(self, node) -> str:
        """How messages name an ONNX node: its name, or its position and op type."""
        return repr(node.name) if node.name else f"#{self.index[id(node)]} ({node.op_type}, unnamed)"

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant node, through Identity), or None."""
        if not name:
            return None
        if name in self._consts:
            return self._consts[name]
        from onnx import numpy_helper

        value = None
        if name in self.initializers:
            value = numpy_helper.to_array(self.initializers[name])
        else:
            node = self.producer.get(name)
            if node is not None and node.op_type == "Constant":
                value = _constant_value(node)
            elif node is not None and node.op_type == "Identity":
                value = self.const(node.input[0])
        self._consts[name] = value
        return value

    def resolve(self, name: str) -> str:
        """The tensor an Identity chain forwards (``name`` itself if its producer is no Identity)."""
        seen = 0
        while name in self.producer and self.producer[name].op_type == "Identity" and seen < 1000:
            name = self.producer[name].input[0]
            seen += 1
        return name

    def identities(self, name: str) -> list:
        """The Identity nodes between ``name`` and :meth:`resolve` of it."""
        found = []
        while name in self.producer and self.producer[name].op_type == "Identity" and len(found) < 1000:
            found.append(self.producer[name])
            name = self.producer[name].input[0]
        return found

    def source(self, name: str):
        """The node producing ``resolve(name)``, or None for a graph input or a constant."""
        return self.producer.get(self.resolve(name))


def _constant_value(node) -> np.ndarray | None:
    from onnx import helper, numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            v = helper.get_attribute_value(a)
            return np.asarray(v, dtype=np.float32 if "float" in a.name else np.int64)
    return None


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _close(value, expected) -> bool:
    return value is not None and abs(float(value) - expected) <= _RTOL * max(1.0, abs(expected))


def _scalar(array) -> float | None:
    """A constant holding one value (any shape), as a float; else None."""
    if array is None or np.size(array) != 1:
        return None
    return float(np.asarray(array).reshape(()))


# --------------------------------------------------------------------------------------------
# Recognising arch and width
# --------------------------------------------------------------------------------------------
def _conv_shape_key(width: float) -> tuple[int, ...]:
    return tuple(make_divisible(c * width) for c in _BASE_CHANNELS)


def _width_breakpoints(lo: float, hi: float) -> list[float]:
    """Widths in [lo, hi] at which some scaled channel count changes its rounding."""
    points = {lo, hi}
    for c in _BASE_CHANNELS:
        # int(c*w + 2) // 4 steps where c*w + 2 = 4m; the 10% rule bumps r where c*w = r / 0.9
        for m in range(max(1, math.floor((c * lo + 2) / 4)), math.ceil((c * hi + 2) / 4) + 1):
            for w in ((4 * m - 2) / c, 4 * m / (0.9 * c)):
                if lo <= w <= hi:
                    points.add(w)
    return sorted(points)


def conv_weight_shapes(graph: Graph) -> list[tuple[int, ...]]:
    """The conv weight shapes of a refghost graph, sorted (the width's fingerprint)."""
    return sorted(s for s in graph.param_shapes.values() if len(s) == 4)


def recognise_width(shapes, arch: str = "nanodet", num_classes: int = 0, where: str = "<onnx>") -> float:
    """The width multiplier whose GhostNet has exactly these conv weight shapes (any order).

    The stem's output channels bound the width to an interval; one width per interval between
    rounding breakpoints of the stage table's channel counts is tried (see the module docstring).
    Raises WeightsError when none matches, or when two different shape sets would.
    """
    shapes = sorted(tuple(int(d) for d in s) for s in shapes)
    stems = [s for s in shapes if s[1:] == (3, 3, 3)]
    if not stems:
        raise WeightsError(f"{where}: not recognised as a GhostNet: no 3x3 conv on 3 input channels (the stem)")
    stem = max(s[0] for s in stems)
    # make_divisible(16 w) == stem: 16 w rounds to stem (16 w in [stem - 2, stem + 2)) or to stem - 4
    # and is bumped by the 10% rule (16 w > (stem - 4) / 0.9); unless the rule bumps it further.
    lo = 1e-3 if stem == 4 else min(stem - 2, (stem - 4) / 0.9) / 16
    hi = max(stem + 2, stem / 0.9) / 16
    points = _width_breakpoints(lo, hi)
    trials = set(points) | {(a + b) / 2 for a, b in zip(points, points[1:])}
    trials |= {w for w in COMMON_WIDTHS if lo <= w <= hi}
    groups: dict[tuple, list[float]] = {}
    for w in sorted(trials):
        if make_divisible(16 * w) == stem:
            groups.setdefault(_conv_shape_key(w), []).append(w)
    matches, nearest = [], None
    for key, widths in groups.items():
        expected = conv_weight_shapes(build_graph(_config(arch, widths[0], "ReLU", num_classes)))
        if expected == shapes:
            matches.append((key, widths))
        elif len(expected) == len(shapes):
            diff = sum(a != b for a, b in zip(expected, shapes))
            if nearest is None or diff < nearest[0]:
                nearest = (diff, widths[0], expected)
    if not matches:
        hint = ""
        if nearest is not None:
            _, w, expected = nearest
            first = next((a, b) for a, b in zip(expected, shapes) if a != b)
            hint = (f"; the closest, width {_simplest(groups[_conv_shape_key(w)]):g}, differs in "
                    f"{nearest[0]} conv weight shape(s), e.g. it has {list(first[0])} where the graph has "
                    f"{list(first[1])}")
        raise WeightsError(f"{where}: the conv weight shapes match no GhostNet width ({arch}, stem of {stem} "
                           f"channels: width between {lo:.3g} and {hi:.3g} tried){hint}")
    if len(matches) > 1:
        raise WeightsError(f"{where}: the conv weight shapes match {len(matches)} different GhostNet widths "
                           f"({', '.join(f'{_simplest(w):g}' for _, w in matches)}): ambiguous")
    key, widths = matches[0]
    return _simplest(widths)


def _simplest(widths: list[float]) -> float:
    """The simplest multiplier giving the same channel counts as ``widths`` (which all do)."""
    key = _conv_shape_key(widths[0])
    for w in COMMON_WIDTHS:
        if _conv_shape_key(w) == key:
            return w
    for digits in range(1, 7):
        for w in widths:
            r = round(w, digits)
            if r > 0 and _conv_shape_key(r) == key:
                return r
    return widths[0]


def _config(arch, width, activation, num_classes, out_stages=DEFAULT_OUT_STAGES, folded=True) -> Config:
    if arch == "ghostnet":
        return Config(arch="ghostnet", width=width, activation="ReLU", num_classes=num_classes, folded=folded)
    return Config(arch="nanodet", width=width, activation=activation, out_stages=out_stages, folded=folded)


# --------------------------------------------------------------------------------------------
# Op patterns: activations and the hard-sigmoid gate
# --------------------------------------------------------------------------------------------
@dataclass
class _Pattern:
    """The ONNX nodes (in graph order) computing one element-wise function of one tensor."""

    nodes: list
    ops: tuple[str, ...]


def _subgraph(onnx: _Onnx, t_in: str, t_out: str, limit: int = 8) -> _Pattern | str:
    """The nodes between tensors ``t_in`` and ``t_out`` (both resolved): every non-constant input
    of each must be ``t_in`` or an output of another; returns a message if not."""
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


def _clip_bounds(onnx: _Onnx, node) -> tuple[float | None, float | None]:
    if onnx.opset and onnx.opset < 11:
        return _attr(node, "min"), _attr(node, "max")
    lo = _scalar(onnx.const(node.input[1])) if len(node.input) > 1 and node.input[1] else None
    hi = _scalar(onnx.const(node.input[2])) if len(node.input) > 2 and node.input[2] else None
    return lo, hi


def _reads(onnx: _Onnx, node, tensor: str) -> bool:
    """Whether ``node`` has ``tensor`` (resolved) among its inputs."""
    return tensor in [onnx.resolve(i) for i in node.input]


def _other_const(onnx: _Onnx, node) -> float | None:
    """The single constant operand of a binary node."""
    values = [_scalar(onnx.const(i)) for i in node.input]
    values = [v for v in values if v is not None]
    return values[0] if len(values) == 1 else None


def classify_activation(onnx: _Onnx, t_in: str, t_out: str) -> tuple[str, np.ndarray | None, list] | str:
    """``(activation name, PReLU slope or None, ONNX nodes)`` of the pattern from ``t_in`` to
    ``t_out``, or a message saying what is wrong with it."""
    if t_in == t_out:
        return "has no activation (the conv output is used as is)"
    pat = _subgraph(onnx, t_in, t_out)
    if isinstance(pat, str):
        return pat
    n, ops_ = pat.nodes, pat.ops
    first = n[0]
    where = f"ONNX node {onnx.label(n[-1])}"
    if ops_ == ("Relu",):
        return "ReLU", None, n
    if ops_ == ("LeakyRelu",):
        alpha = _attr(first, "alpha", 0.01)
        if not _close(alpha, ops.LEAKY_RELU_SLOPE):
            return (f"{where} is LeakyRelu with alpha {alpha:.6g}; NanoDet's LeakyReLU has slope "
                    f"{ops.LEAKY_RELU_SLOPE} (PyTorch's default 0.01 is a different network)")
        return "LeakyReLU", None, n
    if ops_ == ("Clip",):
        lo, hi = _clip_bounds(onnx, first)
        if _close(lo, 0.0) and _close(hi, 6.0):
            return "ReLU6", None, n
        if _close(lo, 0.0) and (hi is None or hi > 3e38):
            return "ReLU", None, n
        return f"{where} is Clip({lo}, {hi}): not an activation GhostNet uses (ReLU6 is Clip(0, 6))"
    if ops_ == ("Elu",):
        alpha = _attr(first, "alpha", 1.0)
        if not _close(alpha, ops.ELU_ALPHA):
            return f"{where} is Elu with alpha {alpha:.6g}; PyTorch's ELU has alpha {ops.ELU_ALPHA}"
        return "ELU", None, n
    if ops_ in (("Selu",), ("Elu", "Mul")):  # TorchScript's Selu; dynamo's scale * Elu(alpha)
        if ops_ == ("Selu",):  # ONNX's defaults are SELU's constants
            alpha, scale = _attr(first, "alpha", ops.SELU_ALPHA), _attr(first, "gamma", ops.SELU_SCALE)
        else:
            alpha, scale = _attr(first, "alpha", 1.0), _other_const(onnx, n[1])
        if not (_close(alpha, ops.SELU_ALPHA) and _close(scale, ops.SELU_SCALE)):
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
        alpha, beta = _attr(first, "alpha", 0.2), _attr(first, "beta", 0.5)
        if _close(alpha, 1 / 6) and _close(beta, 0.5) and _reads(onnx, n[1], t_in):
            return "HardSwish", None, n
        return f"{where}: x * HardSigmoid(alpha={alpha:.6g}, beta={beta:.6g}) is not HardSwish (needs 1/6, 1/2)"
    if ops_ == ("Sigmoid", "Mul"):
        if _reads(onnx, n[1], t_in) and _reads(onnx, n[1], first.output[0]):
            return "SiLU", None, n
        return f"{where}: Sigmoid then Mul, but not x * sigmoid(x)"
    if ops_ == ("Gelu",):
        if _attr(first, "approximate", "none") != "none":
            return f"{where}: Gelu with approximate={_attr(first, 'approximate')!r}; PyTorch's GELU is exact"
        return "GELU", None, n
    if sorted(ops_) in (["Add", "Div", "Erf", "Mul", "Mul"], ["Add", "Erf", "Mul", "Mul", "Mul"]):
        return _gelu_erf(onnx, pat, t_in, where)
    return f"{where}: the ops {list(ops_)} are not an activation refghost knows"


def _gelu_erf(onnx: _Onnx, pat: _Pattern, t_in: str, where: str):
    """x * 0.5 * (1 + erf(x / sqrt(2))) in either exporter's order of the multiplications."""
    erf = next(n for n in pat.nodes if n.op_type == "Erf")
    scale = onnx.producer.get(onnx.resolve(erf.input[0]))
    ok = scale is not None and _reads(onnx, scale, t_in)
    c = _other_const(onnx, scale) if ok else None
    ok = ok and ((scale.op_type == "Div" and _close(c, math.sqrt(2))) or
                 (scale.op_type == "Mul" and _close(c, 1 / math.sqrt(2))))
    add = next(n for n in pat.nodes if n.op_type == "Add")
    ok = ok and _close(_other_const(onnx, add), 1.0)
    muls = [n for n in pat.nodes if n.op_type == "Mul" and n is not scale]
    halves = [m for m in muls if _close(_other_const(onnx, m), 0.5)]
    ok = ok and len(halves) == 1 and any(_reads(onnx, m, t_in) for m in muls)
    if not ok:
        return f"{where}: an Erf pattern that is not x/2 * (1 + erf(x/sqrt(2))) (exact GELU)"
    return "GELU", None, pat.nodes


def classify_gate(onnx: _Onnx, t_in: str, t_out: str) -> list | str:
    """The ONNX nodes of a hard-sigmoid ``relu6(x + 3) / 6`` from ``t_in`` to ``t_out``, or a message."""
    if t_in == t_out:
        return "has no gate function (the SE multiplies by conv_expand's output itself)"
    pat = _subgraph(onnx, t_in, t_out)
    if isinstance(pat, str):
        return pat
    n, ops_ = pat.nodes, pat.ops
    where = f"ONNX node {onnx.label(n[-1])}"
    if ops_ == ("HardSigmoid",):
        alpha, beta = _attr(n[0], "alpha", 0.2), _attr(n[0], "beta", 0.5)
        if _close(alpha, 1 / 6) and _close(beta, 0.5):
            return n
        return (f"{where} is HardSigmoid with alpha={alpha:.6g}, beta={beta:.6g}; NanoDet's hard_sigmoid is "
                f"relu6(x + 3) / 6, i.e. alpha=1/6, beta=0.5 (ONNX's defaults 0.2, 0.5 are a different function)")
    if len(ops_) == 3 and ops_[0] == "Add" and ops_[1] == "Clip" and ops_[2] in ("Div", "Mul"):
        add, clip, last = n
        lo, hi = _clip_bounds(onnx, clip)
        c = _other_const(onnx, last)
        scale_ok = _close(c, 6.0) if last.op_type == "Div" else _close(c, 1 / 6)
        if _close(_other_const(onnx, add), 3.0) and _close(lo, 0.0) and _close(hi, 6.0) and scale_ok:
            return n
        return (f"{where}: the gate computes {last.op_type}(Clip(x + {_other_const(onnx, add)}, {lo}, {hi}), {c}); "
                f"NanoDet's hard_sigmoid is relu6(x + 3) / 6")
    return f"{where}: the ops {list(ops_)} are not NanoDet's hard_sigmoid relu6(x + 3) / 6"


# --------------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------------
@dataclass
class OnnxImport:
    """What :func:`read_onnx` found: the config, the folded tensors, and how."""

    config: Config
    tensors: dict[str, np.ndarray]  # folded state_dict keys of ``build_graph(config)``
    input_shape: tuple  # of the graph input, None for a dimension that is not fixed
    matched: str  # how ONNX tensors were mapped to layers
    bn_folded_here: int  # BatchNormalization nodes folded by refghost (0: the exporter folded them all)
    producer: str  # the ONNX file's producer name and version


def _load(path: str):
    from .runtimes.onnx_package import import_onnx

    onnx = import_onnx()

    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path)
    except Exception as exc:  # DecodeError and friends
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: not a readable ONNX model ({reason})") from None
    return _Onnx(model, path)


def _image_input(g: _Onnx) -> tuple[str, tuple]:
    inputs = [i for i in g.graph.input if i.name not in g.initializers]
    if len(inputs) != 1:
        raise WeightsError(f"{g.path}: not recognised as a GhostNet: expected one image input, found "
                           f"{len(inputs)} ({', '.join(i.name for i in inputs) or 'none'})")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    if len(shape) != 4 or shape[1] not in (3, None):
        raise WeightsError(f"{g.path}: not recognised as a GhostNet: input {inputs[0].name!r} has shape "
                           f"{['?' if d is None else d for d in shape]}, expected (N, 3, H, W)")
    return inputs[0].name, shape


def read_onnx(path) -> OnnxImport:
    """Recognise and check a GhostNet ONNX file; see the module docstring. Raises WeightsError."""
    path = os.fspath(path)
    try:
        return _read_onnx(path)
    except RefghostError:
        raise
    except Exception as exc:  # a graph this importer did not foresee: still bad input, with a message
        raise WeightsError(f"{path}: cannot import this ONNX graph ({type(exc).__name__}: {exc})") from exc


def _read_onnx(path: str) -> OnnxImport:
    g = _load(path)
    input_name, input_shape = _image_input(g)
    convs = [n for n in g.nodes if n.op_type == "Conv"]
    shapes = []
    for n in convs:
        w = g.const(n.input[1]) if len(n.input) > 1 else None
        if w is None or w.ndim != 4:
            raise WeightsError(f"{path}: Conv node {g.label(n)} has no constant 4-D weight (its weight "
                               f"{n.input[1] if len(n.input) > 1 else '?'!r} is computed or a graph input)")
        shapes.append(w.shape)
    linears = [n for n in g.nodes if n.op_type in ("Gemm", "MatMul")]
    arch, num_classes = "nanodet", 0
    if linears:
        arch = "ghostnet"
        num_classes = _num_classes(g, linears[-1])
    n_expected = len(conv_weight_shapes(build_graph(_config(arch, 1.0, "ReLU", max(num_classes, 1)))))
    if len(convs) != n_expected:
        what = "ImageNet classifier (Gemm/MatMul found)" if arch == "ghostnet" else "NanoDet backbone"
        hint = ("; a whole detector (backbone, FPN and head) is more than a backbone: export the backbone alone"
                if len(convs) > n_expected else "")
        raise WeightsError(f"{path}: not recognised as a GhostNet {what}: it has {len(convs)} Conv node(s), "
                           f"GhostNet's has {n_expected}{hint}")
    width = recognise_width(shapes, arch, num_classes, path)

    # Map ONNX tensors to layers with the unfolded graph: its names cover both a Conv named after
    # its conv module (TorchScript) and one named after the BN folded into it (dynamo).
    from .runtimes.mapping import map_by_structure, map_onnx, onnx_ops

    unfolded = build_graph(_config(arch, width, "ReLU", num_classes, folded=False))
    folded_names = [n.name for n in build_graph(_config(arch, width, "ReLU", num_classes)).nodes]
    try:
        mapping, how = map_onnx(g.graph, unfolded)
        if how.startswith("by exporter") and not set(folded_names) <= set(mapping.values()):
            try:
                alt = map_by_structure(onnx_ops(g.graph), unfolded)
                if set(folded_names) <= set(alt.values()):
                    mapping, how = alt, "by structure (scope names incomplete)"
            except RefghostError:
                pass
    except RefghostError as exc:  # by structure: the op sequence is not GhostNet's
        reason = str(exc).split("; name intermediate")[0]
        raise WeightsError(f"{path}: not recognised as a GhostNet: {reason}") from None
    tensor_of = {"input": input_name}
    for onnx_name, layer in mapping.items():
        tensor_of.setdefault(layer, g.resolve(onnx_name))
    missing = [n for n in folded_names if n not in tensor_of]
    if missing:
        raise WeightsError(f"{path}: layer {missing[0]} of GhostNet {arch} width {width:g} has no ONNX tensor "
                           f"(matched {how}; {len(missing)} layer(s) missing)")

    walker = _Walker(g, unfolded, tensor_of)
    activation = walker.majority_activation() if arch == "nanodet" else "ReLU"
    out_stages = walker.out_stages() if arch == "nanodet" else ()
    config = _config(arch, width, activation, num_classes, out_stages or DEFAULT_OUT_STAGES)
    tensors = walker.walk(build_graph(config))
    if walker.problems:
        first = walker.problems[0]
        more = ""
        if len(walker.problems) > 1:
            more = (f" ({len(walker.problems) - 1} more problem(s), next: "
                    + "; ".join(walker.problems[1:3]) + ")")
        raise WeightsError(f"{path}: the graph does not compute GhostNet {arch} width {width:g} "
                           f"({activation}): {first}{more}")
    producer = " ".join(p for p in (g.model.producer_name, g.model.producer_version) if p) or "unknown producer"
    return OnnxImport(config, tensors, input_shape, how, walker.bn_folded, producer)


def _num_classes(g: _Onnx, node) -> int:
    w = g.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.ndim != 2:
        raise WeightsError(f"{g.path}: {node.op_type} node {g.label(node)} has no constant 2-D weight")
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return int(w.shape[0])
    return int(w.shape[1])


def import_onnx(path, *, preprocessing: Preprocessing | None = None) -> Weights:
    """Read a GhostNet exported to ONNX as folded :class:`Weights` (see the module docstring).

    ``preprocessing`` defaults to NanoDet's (nanodet) or ImageNet's (ghostnet) mean, std and
    channel order, with the input size of the graph's input when it is fixed.
    """
    path = os.fspath(path)
    found = read_onnx(path)
    cfg = found.config
    if preprocessing is None:
        base = default_preprocessing(cfg.arch)
        _, _, h, w = found.input_shape
        size = (int(w), int(h)) if isinstance(h, int) and isinstance(w, int) and h > 1 and w > 1 else base.input_size
        preprocessing = Preprocessing(base.mean, base.std, base.channel_order, size)
    folding = (f"{found.bn_folded_here} BatchNormalization node(s) folded by refghost in float64"
               if found.bn_folded_here else "BatchNorm folded by the exporter")
    provenance = {
        "source_file": os.path.basename(path),
        "source_sha256": file_sha256(path),
        "converter": f"refghost {__version__} convert (onnx)",
        "description": (f"imported from ONNX ({found.producer}); GhostNet {cfg.arch} width {cfg.width:g} "
                        f"{cfg.activation}; layers matched {found.matched}; {folding}"),
    }
    try:
        return from_tensors(found.tensors, cfg, preprocessing, provenance)
    except RefghostError as exc:  # shapes were checked layer by layer; this is a safety net
        raise WeightsError(f"{path}: {exc}") from None


class _Walker:
    """Checks every layer of a folded refghost graph against the ONNX data flow, and reads weights."""

    def __init__(self, g: _Onnx, unfolded: Graph, tensor_of: dict[str, str]):
        self.g = g
        self.tensor_of = tensor_of
        self.bn_names = {n.name for n in unfolded.nodes if n.op == "batch_norm"}
        self.problems: list[str] = []
        self.bn_folded = 0
        self.acts: dict[str, tuple] = {}  # backbone act node -> classify_activation result
        self.unfolded = unfolded

    # -- helpers --------------------------------------------------------------------------
    def t(self, layer: str) -> str:
        return self.tensor_of[layer]

    def problem(self, layer: str, message: str) -> None:
        self.problems.append(f"layer {layer}: {message}")

    def backbone_acts(self) -> list[str]:
        return [n.name for n in self.unfolded.nodes if n.op == "act" and ".se." not in n.name and n.name != "act2"]

    def classify(self, layer: str):
        if layer not in self.acts:
            node = self.unfolded.node(layer)
            self.acts[layer] = classify_activation(self.g, self.t(node.inputs[0]), self.t(layer))
        return self.acts[layer]

    def majority_activation(self) -> str:
        votes = Counter()
        for layer in self.backbone_acts():
            found = self.classify(layer)
            if not isinstance(found, str):
                votes[found[0]] += 1
        if not votes:
            layer = self.backbone_acts()[0]
            raise WeightsError(f"{self.g.path}: layer {layer}: {self.classify(layer)}")
        (best, n), *rest = votes.most_common()
        if rest and rest[0][1] == n:
            raise WeightsError(f"{self.g.path}: as many activation sites use {best} as {rest[0][0]} ({n} each); "
                               f"GhostNet uses one activation")
        return best

    def out_stages(self) -> tuple[int, ...]:
        stage_of = {}
        for name in ("blocks.9.0.act1",):
            stage_of[self.t(name)] = 9
        for s, rows in enumerate(STAGES):
            stage_of.setdefault(self.t(f"blocks.{s}.{len(rows) - 1}"), s)
        stages = []
        for out in self.g.graph.output:
            t = self.g.resolve(out.name)
            if t not in stage_of:
                layer = next((k for k, v in self.tensor_of.items() if v == t), None)
                what = f"layer {layer}" if layer else "no GhostNet layer"
                raise WeightsError(f"{self.g.path}: graph output {out.name!r} is {what}, not a stage output "
                                   f"(the last block of a stage 0..8, or blocks.9.0.act1)")
            stages.append(stage_of[t])
        if len(set(stages)) != len(stages):
            raise WeightsError(f"{self.g.path}: graph outputs repeat a stage ({stages})")
        return tuple(sorted(stages))

    # -- the walk ---------------------------------------------------------------------------
    def walk(self, graph: Graph) -> dict[str, np.ndarray]:
        tensors = {}
        for node in graph.nodes:
            check = getattr(self, f"_check_{node.op}")
            try:
                check(node, graph, tensors)
            except _Skip:
                pass
        return tensors

    def _check_conv(self, node, graph, tensors):
        g = self.g
        t_out = self.t(node.name)
        t_in = self.t(node.inputs[0])
        p = g.producer.get(t_out)
        bn = None
        if p is not None and p.op_type == "BatchNormalization" and node.name in self.bn_names:
            bn = p
            p = g.source(bn.input[0])
        if p is None or p.op_type != "Conv":
            got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
            self.problem(node.name, f"expected a Conv{' (+BatchNormalization)' if node.name in self.bn_names else ''}, "
                                    f"the ONNX tensor {t_out!r} comes from {got}")
            raise _Skip
        label = f"Conv {g.label(p)}"
        if g.resolve(p.input[0]) != t_in:
            self.problem(node.name, f"{label} reads {g.resolve(p.input[0])!r}, not the output of "
                                    f"{node.inputs[0]} ({t_in!r})")
        w = g.const(p.input[1])
        expected = graph.param_shapes[node.params["weight"]]
        if tuple(w.shape) != expected:
            self.problem(node.name, f"{label} has weight shape {list(w.shape)}, expected {list(expected)}")
            raise _Skip
        k, s, pad, groups = expected[2], node.attrs["stride"], node.attrs["padding"], node.attrs["groups"]
        auto_pad = _attr(p, "auto_pad", "NOTSET")
        got = {"kernel_shape": list(_attr(p, "kernel_shape", [k, k])), "strides": list(_attr(p, "strides", [1, 1])),
               "pads": list(_attr(p, "pads", [0, 0, 0, 0])), "dilations": list(_attr(p, "dilations", [1, 1])),
               "group": _attr(p, "group", 1)}
        want = {"kernel_shape": [k, k], "strides": [s, s], "pads": [pad] * 4, "dilations": [1, 1], "group": groups}
        if auto_pad not in ("NOTSET", ""):
            self.problem(node.name, f"{label} has auto_pad={auto_pad}; GhostNet pads explicitly by {pad} on every side")
        for attr, value in want.items():
            if got[attr] != value:
                why = " (TF-style SAME padding shifts the windows)" if attr == "pads" else ""
                self.problem(node.name, f"{label} has {attr} {got[attr]}, GhostNet's is {value}{why}")
        b = g.const(p.input[2]) if len(p.input) > 2 and p.input[2] else None
        if len(p.input) > 2 and p.input[2] and b is None:
            self.problem(node.name, f"{label}: its bias is not a constant of the graph")
            raise _Skip
        dtype = np.float64 if w.dtype == np.float64 else np.float32  # float16 weights widen exactly
        if bn is not None:  # folded in float64, rounded once to the graph's precision
            w, b = self._fold(node.name, bn, w, b)
        elif b is None:
            b = np.zeros(expected[0], dtype)
        if tuple(np.shape(b)) != (expected[0],):
            self.problem(node.name, f"{label} has bias shape {list(np.shape(b))}, expected [{expected[0]}]")
            raise _Skip
        tensors[node.params["weight"]] = np.asarray(w, dtype=dtype)
        tensors[node.params["bias"]] = np.asarray(b, dtype=dtype)

    def _fold(self, layer, bn, w, b):
        g = self.g
        label = f"BatchNormalization {g.label(bn)}"
        eps = _attr(bn, "epsilon", 1e-5)
        if not _close(eps, ops.BN_EPS):
            self.problem(layer, f"{label} has epsilon {eps:.6g}; PyTorch's BatchNorm2d (GhostNet's) uses "
                                f"{ops.BN_EPS:g}")
        if _attr(bn, "training_mode", 0) or len([o for o in bn.output if o]) > 1:
            self.problem(layer, f"{label} is in training mode (batch statistics); export in eval mode")
        values = [g.const(i) for i in bn.input[1:5]]
        if len(values) != 4 or any(v is None for v in values):
            self.problem(layer, f"{label}: scale, bias, mean and variance must be constants of the graph")
            raise _Skip
        gamma, beta, mean, var = (np.asarray(v, dtype=np.float64) for v in values)
        if (var < 0).any():
            self.problem(layer, f"{label} has negative variances")
            raise _Skip
        self.bn_folded += 1
        return ops.fold_batch_norm(np.asarray(w, np.float64), None if b is None else np.asarray(b, np.float64),
                                   gamma, beta, mean, var)

    def _check_act(self, node, graph, tensors):
        name = node.attrs["activation"]
        found = self.classify(node.name) if node.name in self.acts else classify_activation(
            self.g, self.t(node.inputs[0]), self.t(node.name))
        if isinstance(found, str):
            self.problem(node.name, found)
            raise _Skip
        got, slope, onnx_nodes = found
        if got != name:
            first = self.g.label(onnx_nodes[-1])
            context = "SE activations are always ReLU" if ".se." in node.name or node.name == "act2" else \
                f"the rest of the network uses {_DESCRIBE.get(name, name)}"
            self.problem(node.name, f"ONNX node {first} computes {_DESCRIBE.get(got, got)}; {context}")
            raise _Skip
        if name == "PReLU":
            tensors[node.params["weight"]] = slope

    def _check_concat(self, node, graph, tensors):
        g = self.g
        t_out = self.t(node.name)
        p = g.producer.get(t_out)
        if p is not None and p.op_type == "Slice":  # Huawei's out[:, :oup], a no-op here
            if not self._noop_slice(p):
                self.problem(node.name, f"Slice {g.label(p)} drops channels of the concat (GhostNet's "
                                        f"[:, :oup] keeps them all)")
            p = g.source(p.input[0])
        want = [self.t(i) for i in node.inputs]
        if p is None or p.op_type != "Concat":
            got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
            self.problem(node.name, f"expected the GhostModule's Concat([primary_conv, cheap_operation]), found {got}")
            raise _Skip
        axis = _attr(p, "axis", None)
        ins = [g.resolve(i) for i in p.input]
        if axis not in (1, -3):
            self.problem(node.name, f"Concat {g.label(p)} joins along axis {axis}, not channels (axis 1)")
        if ins != want:
            if ins == want[::-1]:
                self.problem(node.name, f"Concat {g.label(p)} takes [cheap_operation, primary_conv]; the GhostModule "
                                        f"concatenates [primary_conv, cheap_operation] (channel order)")
            else:
                self.problem(node.name, f"Concat {g.label(p)} takes {ins}, expected the outputs of "
                                        f"{list(node.inputs)} {want}")

    def _noop_slice(self, p) -> bool:
        g = self.g
        starts, ends = g.const(p.input[1]), g.const(p.input[2])
        axes = g.const(p.input[3]) if len(p.input) > 3 and p.input[3] else None
        steps = g.const(p.input[4]) if len(p.input) > 4 and p.input[4] else None
        if starts is None or ends is None:
            return False
        starts, ends = np.atleast_1d(starts), np.atleast_1d(ends)
        axes = np.arange(len(starts)) if axes is None else np.atleast_1d(axes)
        steps = np.ones_like(starts) if steps is None else np.atleast_1d(steps)
        for a, s, e, st in zip(axes, starts, ends, steps):
            if st != 1 or s != 0:
                return False
            if a in (1, -3) and e < self._concat_channels(p):  # keeps fewer channels than the concat has
                return False
        return True

    def _concat_channels(self, p) -> int:
        concat = self.g.source(p.input[0])
        total = 0
        for t in concat.input if concat is not None else ():
            prod = self.g.source(t)
            while prod is not None and prod.op_type != "Conv":
                prod = self.g.source(prod.input[0])
            if prod is None:
                return 1 << 62
            total += self.g.const(prod.input[1]).shape[0]
        return total

    def _check_add(self, node, graph, tensors):
        g = self.g
        t_out = self.tensor_of[node.name]
        p = g.producer.get(t_out)
        want = sorted(self.t(i) for i in node.inputs)
        if p is None or p.op_type not in ("Add", "Sum"):
            passed = [x for x in node.inputs if self.t(x) == t_out]
            if passed:
                via = self._identity_label(node.name)
                self.problem(node.name, f"the residual Add is missing: the block's output is {passed[0]}'s output "
                                        f"passed on{via} without adding the shortcut")
            else:
                got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
                self.problem(node.name, f"expected the residual Add, found {got}")
            raise _Skip
        ins = sorted(g.resolve(i) for i in p.input)
        if ins != want:
            self.problem(node.name, f"{p.op_type} {g.label(p)} adds {ins}, expected the outputs of "
                                    f"{list(node.inputs)} {want} (ghost2 and the shortcut)")

    def _identity_label(self, layer: str) -> str:
        """' by Identity node X' when the mapped ONNX tensor of ``layer`` came through Identity nodes."""
        for onnx_name in self._raw_tensors(layer):
            hops = self.g.identities(onnx_name)
            if hops:
                return " by " + ", ".join(f"Identity node {self.g.label(h)}" for h in hops)
        return ""

    def _raw_tensors(self, layer: str) -> list[str]:
        return [t for t, p in self.g.producer.items() if self.g.resolve(t) == self.t(layer) and t != self.t(layer)]

    def _check_global_avg_pool(self, node, graph, tensors):
        g = self.g
        p = g.producer.get(self.t(node.name))
        t_in = self.t(node.inputs[0])
        ok = p is not None and g.resolve(p.input[0]) == t_in
        if ok and p.op_type == "ReduceMean":
            axes = g.const(p.input[1]) if len(p.input) > 1 and p.input[1] else _attr(p, "axes")
            axes = sorted(int(a) % 4 for a in np.atleast_1d(axes)) if axes is not None else None
            ok = axes == [2, 3] and _attr(p, "keepdims", 1) == 1
        elif ok:
            ok = p.op_type == "GlobalAveragePool"
        if not ok:
            got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
            self.problem(node.name, f"expected the mean over H and W of {node.inputs[0]} (GlobalAveragePool or "
                                    f"ReduceMean(axes=[2, 3], keepdims=1)), found {got}")

    def _check_hard_sigmoid(self, node, graph, tensors):
        found = classify_gate(self.g, self.t(node.inputs[0]), self.t(node.name))
        if isinstance(found, str):
            self.problem(node.name, found)

    def _check_scale(self, node, graph, tensors):
        g = self.g
        p = g.producer.get(self.t(node.name))
        want = sorted(self.t(i) for i in node.inputs)
        if p is None or p.op_type != "Mul" or sorted(g.resolve(i) for i in p.input) != want:
            got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
            self.problem(node.name, f"expected the SE's Mul(x, gate) of {list(node.inputs)}, found {got}")

    def _check_linear(self, node, graph, tensors):
        g = self.g
        t_in = self.t(node.inputs[0])
        p = g.producer.get(self.t(node.name))
        if p is not None and p.op_type == "Add":  # MatMul + Add
            sources = [g.source(i) for i in p.input]
            mm = next((n for n in sources if n is not None and n.op_type == "MatMul"), None)
            bias = next((g.const(i) for i in p.input if g.const(i) is not None), None)
            if mm is None or bias is None:
                self.problem(node.name, f"expected Gemm or MatMul + Add, found Add {g.label(p)}")
                raise _Skip
            w = g.const(mm.input[1])
            if w is None:
                self.problem(node.name, f"MatMul {g.label(mm)}: its weight is not a constant")
                raise _Skip
            w, first = w.T, mm
        elif p is not None and p.op_type == "Gemm":
            w, bias, first = g.const(p.input[1]), (g.const(p.input[2]) if len(p.input) > 2 and p.input[2] else None), p
            if w is None:
                self.problem(node.name, f"Gemm {g.label(p)}: its weight is not a constant")
                raise _Skip
            alpha, beta = _attr(p, "alpha", 1.0), _attr(p, "beta", 1.0)
            if not (_close(alpha, 1.0) and (bias is None or _close(beta, 1.0))) or _attr(p, "transA", 0):
                self.problem(node.name, f"Gemm {g.label(p)} has alpha={alpha}, beta={beta}, "
                                        f"transA={_attr(p, 'transA', 0)}; a Linear layer is alpha=beta=1, transA=0")
            if not _attr(p, "transB", 0):
                w = w.T
        else:
            got = "a graph input" if p is None else f"{p.op_type} node {g.label(p)}"
            self.problem(node.name, f"expected the classifier (Gemm, or MatMul + Add), found {got}")
            raise _Skip
        # the input: act2's output through Flatten/Reshape/Squeeze only
        src = g.resolve(first.input[0])
        while src != t_in and src in g.producer and g.producer[src].op_type in ("Flatten", "Reshape", "Squeeze"):
            src = g.resolve(g.producer[src].input[0])
        if src != t_in:
            self.problem(node.name, f"{first.op_type} {g.label(first)} does not read the flattened output of "
                                    f"{node.inputs[0]}")
        expected = graph.param_shapes[node.params["weight"]]
        if bias is None:
            bias = np.zeros(expected[0], w.dtype)
        bias = np.asarray(bias).reshape(-1)
        if tuple(w.shape) != expected or bias.shape != (expected[0],):
            self.problem(node.name, f"classifier weight {list(w.shape)} / bias {list(bias.shape)}, expected "
                                    f"{list(expected)} / [{expected[0]}]")
            raise _Skip
        dtype = np.float64 if w.dtype == np.float64 else np.float32
        tensors[node.params["weight"]] = np.ascontiguousarray(w, dtype=dtype)
        tensors[node.params["bias"]] = np.asarray(bias, dtype=dtype)


class _Skip(Exception):
    """A layer that cannot be checked further (its problem is recorded)."""


# --------------------------------------------------------------------------------------------
# The folding's rounding, propagated
# --------------------------------------------------------------------------------------------
def folded_convs(graph: Graph) -> list[str]:
    """The conv nodes of a folded graph that stand for a conv+BN pair (named after the BN)."""
    return [n.name for n in graph.nodes
            if n.op == "conv" and n.params["weight"] != f"{n.name}.weight"]


def folding_bound(graph: Graph, params: dict[str, np.ndarray], x: np.ndarray, *, k: float = FOLD_ROUNDINGS,
                  u: float = FLOAT32_U, model: str = "probabilistic", lam: float = DEFAULT_LAMBDA,
                  bias_magnitude: dict[str, np.ndarray] | None = None):
    """How far the *exact* output of a folded graph may move when its folded weights were rounded.

    Each conv that replaced a conv+BN pair has ``|W' - W alpha| <= k u |W'|`` and
    ``|b' - b| <= k u m`` with ``m = bias_magnitude[<bias key>]`` (``|beta| + |mean alpha|``, the
    magnitudes the exporter's subtraction saw; default ``|b'|``). That perturbs the conv's output
    by ``k u (|W'| * |x| + m)`` at most (``model="worst"``), or by ``lam`` standard deviations of
    independent per-weight errors (``"probabilistic"``: variance ``(k u)^2 (W'^2 * x^2 + m^2)``),
    and every later layer carries it by the rules of :func:`refghost.bounds.error_bounds`, with no
    rounding of its own (both networks are evaluated exactly, in float64, which adds
    ``2^-53``-sized terms only, covered by adding ``8 * 2^-53`` to ``k u``).

    Returns ``(values, bounds)``: ``{node: array}`` of the float64 values and the elementwise
    bounds, in forward order.
    """
    worst = model == "worst"
    ku = k * u + 8 * FLOAT64_U
    seeded = set(folded_convs(graph))

    def rounded_weights(node, ins, p):
        if node.name not in seeded:
            return None
        m = np.abs(p["bias"]) if bias_magnitude is None else np.abs(bias_magnitude[node.params["bias"]])
        key, bias_key = node.params["weight"], node.params["bias"]
        if worst:
            return ku * evaluate(node, [np.abs(ins[0])], {key: np.abs(p["weight"]), bias_key: m})
        return ku * ku * evaluate(node, [ins[0] ** 2], {key: p["weight"] ** 2, bias_key: m ** 2})

    # u = 0: both networks are evaluated exactly; only the rounded weights move the output.
    return error_bounds(graph, params, np.asarray(x, dtype=np.float64), u=0.0, model=model, lam=lam,
                        extra=rounded_weights)
