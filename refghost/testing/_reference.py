"""The reference of one op on one case, its derived error bound, and the assertion built on them.

Everything goes through :mod:`refghost.bounds`, the verifier's own machinery: the op becomes one
:class:`~refghost.arch.Node` and :func:`~refghost.bounds.node_bound` (``model="worst"``) gives the
float64 value and the worst-case bound of that node's rounding at the policy's unit roundoff,
including the float64 oracle's own rounding and gradual underflow (``k * eta`` per output,
``eta`` = half the smallest subnormal of the policy's format; ``docs/testing.md`` derives both).

``conv_bn`` is a convolution followed by an eval-mode BatchNorm, computed unfolded or fused; its
bound is the larger of the two derivations (``refghost.bounds.segment_bound``'s conv+BN rule).
"""

from __future__ import annotations

import numpy as np

from .. import ops
from ..arch import Config, Graph, Node
from ..bounds import UNDERFLOW, UNIT_ROUNDOFF, error_bounds, node_bound, segment_bound
from ._cases import (ActivationCase, BatchNormCase, BatchNormParams, ConvBNCase, ConvCase, GhostBottleneckCase,
                     GhostModuleCase, LinearCase, PoolCase, iter_arrays, map_arrays)

__all__ = ["OPS", "PRECISIONS", "assert_matches_reference", "reference_and_bound", "round_case"]

#: The values ``policy=`` takes here: the precision a backend's arithmetic and storage round to, the
#: keys of :data:`refghost.bounds.UNIT_ROUNDOFF`. (Not :data:`refghost.bounds.POLICIES`, the
#: verdict policies of ``refghost compare``, which also say how weights and tensors are stored.)
PRECISIONS = tuple(UNIT_ROUNDOFF)

_ACTIVATION_OPS = tuple(ops.ACTIVATIONS) + ("hard_sigmoid",)
#: Every op name :func:`assert_matches_reference` knows, with the case type it takes.
OPS = {
    "conv2d": ConvCase,
    "batch_norm": BatchNormCase,
    "conv_bn": ConvBNCase,
    **{name: ActivationCase for name in _ACTIVATION_OPS},
    "activation": ActivationCase,  # the activation named by case.name
    "global_avg_pool": PoolCase,
    "linear": LinearCase,
    "ghost_module": GhostModuleCase,
    "ghost_bottleneck": GhostBottleneckCase,
}


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _unit_roundoff(policy):
    if policy not in UNIT_ROUNDOFF:
        raise ValueError(f"policy must be one of {PRECISIONS}, got {policy!r}")
    return UNIT_ROUNDOFF[policy]


# --- rounding to a policy's storage format -------------------------------------------------


def _round_bfloat16(a):
    """Round to the nearest bfloat16 (ties to even), returned as float32 holding those values."""
    f = np.asarray(a, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    out = rounded.view(np.float32)
    return np.where(np.isnan(f), f, out)


def _to_policy(a, policy):
    """``a`` rounded to the policy's format, in the narrowest NumPy dtype that holds it."""
    if policy == "float64":
        return np.asarray(a, dtype=np.float64)
    if policy == "float32":
        return np.asarray(a, dtype=np.float32)
    if policy == "float16":
        return np.asarray(a, dtype=np.float16)
    return _round_bfloat16(a)


def round_case(case, policy):
    """A copy of ``case`` with every array rounded to the storage format of ``policy``.

    ``"float32"``/``"float16"`` give arrays of that dtype; ``"bfloat16"`` (which NumPy lacks)
    gives float32 arrays holding bfloat16 values (round to nearest even). Hand the rounded case
    to both the backend and :func:`assert_matches_reference`.
    """
    _unit_roundoff(policy)
    return map_arrays(case, lambda a: _to_policy(a, policy))


def _check_representable(op, case, policy):
    """Inputs must be what the backend stores: exactly representable in the policy's format."""
    if policy == "float64":
        return
    for name, a in iter_arrays(case):
        a = np.asarray(a)
        if policy == "float32" and a.dtype.itemsize <= 4:
            continue
        if policy == "float16" and a.dtype == np.float16:
            continue
        r = _to_policy(a, policy).astype(np.float64)
        same = (r == a.astype(np.float64)) | np.isnan(a)
        if not same.all():
            bad = int(np.size(same) - np.count_nonzero(same))
            raise ValueError(
                f"{op}: {name} ({a.dtype}) has {bad} value(s) not representable in {policy}; a {policy} "
                f"backend would round them before computing, which the bound does not cover. Round the "
                f"case first: case = refghost.testing.round_case(case, {policy!r}) (or draw it with a "
                f"matching dtype) and give the rounded arrays to the backend.")


# --- per-op reference and bound -------------------------------------------------------------


def _conv_node(case: ConvCase, name="conv"):
    params = {"weight": f"{name}.weight"}
    if case.b is not None:
        params["bias"] = f"{name}.bias"
    node = Node(name, "conv", ("input",), params,
                {"stride": int(case.stride), "padding": int(case.padding), "groups": int(case.groups)})
    p = {f"{name}.weight": _f64(case.w)}
    if case.b is not None:
        p[f"{name}.bias"] = _f64(case.b)
    return node, p


def _bn_node(bn: BatchNormParams, name="bn", src="input"):
    roles = ("weight", "bias", "running_mean", "running_var")
    node = Node(name, "batch_norm", (src,), {r: f"{name}.{r}" for r in roles}, {"eps": float(bn.eps)})
    return node, {f"{name}.{r}": _f64(getattr(bn, r)) for r in roles}


def _conv_bn(case: ConvBNCase, u, eta):
    """Value and bound of BN(conv(x)), computed unfolded (conv, then BN) or fused (one conv with
    folded weights): the larger of the two derivations, ``refghost.bounds.segment_bound``'s rule
    for a conv+BN pair (derived in ``docs/testing.md``)."""
    conv_node, p = _conv_node(case.conv)
    bn_node, pb = _bn_node(case.bn, src=conv_node.name)
    p.update(pb)
    graph = Graph(Config(), [conv_node, bn_node], {"output": bn_node.name}, {})
    return segment_bound(graph, [conv_node.name, bn_node.name], {"input": case.conv.x}, p, u=u, eta=eta)


def _graph_case(case, u):
    graph = case.graph
    params = {k: _f64(v) for k, v in case.params.items()}
    values, bounds = error_bounds(graph, params, _f64(case.x), u=u, model="worst")
    return values["output"], bounds["output"]


def _resolve_op(op, case):
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    want = OPS[op]
    if not isinstance(case, want):
        raise TypeError(f"op {op!r} takes a {want.__name__}, got {type(case).__name__}")
    if want is ActivationCase:
        if op != "activation" and case.name != op:
            raise ValueError(f"op {op!r} but the case is for activation {case.name!r}")
        if case.name not in _ACTIVATION_OPS:
            raise ValueError(f"unknown activation {case.name!r}; expected one of {', '.join(_ACTIVATION_OPS)}")
        if case.name == "PReLU" and case.weight is None:
            raise ValueError("a PReLU case needs its slope: ActivationCase(x, 'PReLU', weight=array of shape (1,))")
        return case.name
    return op


def _single_node(op, case):
    """The op as one graph node: ``(node, params, input)``."""
    if op == "conv2d":
        node, p = _conv_node(case)
        return node, p, case.x
    if op == "batch_norm":
        node, p = _bn_node(case.bn)
        return node, p, case.x
    if op == "global_avg_pool":
        return Node("pool", "global_avg_pool", ("input",)), {}, case.x
    if op == "linear":
        # refghost.bounds' linear rule wants a bias; a zero bias adds nothing but one term to n.
        b = np.zeros(case.w.shape[0]) if case.b is None else case.b
        node = Node("fc", "linear", ("input",), {"weight": "fc.weight", "bias": "fc.bias"})
        return node, {"fc.weight": _f64(case.w), "fc.bias": _f64(b)}, case.x
    if op == "hard_sigmoid":
        return Node("gate", "hard_sigmoid", ("input",)), {}, case.x
    params, p = {}, {}
    if op == "PReLU":
        params, p = {"weight": "act.weight"}, {"act.weight": _f64(case.weight).reshape(1)}
    return Node("act", "act", ("input",), params, {"activation": op}), p, case.x


def reference_and_bound(op, case, *, policy="float32"):
    """The float64 reference of ``op`` on ``case`` and the elementwise bound an honest backend
    computing in ``policy`` stays within.

    Returns ``(reference, bound)``, float64 arrays of the output's shape. See
    :func:`assert_matches_reference` for ``op``, ``case`` and ``policy``.
    """
    u = _unit_roundoff(policy)
    name = _resolve_op(op, case)
    _check_representable(op, case, policy)
    eta = UNDERFLOW[policy]
    with np.errstate(over="ignore", under="ignore"):  # e.g. SiLU's exp(1e4) = inf, exactly as meant
        if name == "conv_bn":
            return _conv_bn(case, u, eta)
        if name in ("ghost_module", "ghost_bottleneck"):
            # error_bounds has no float64-oracle or underflow term: the oracle's own error is the
            # same bound at u64 (so a factor 1 + u64/u), and block inputs keep clear of subnormals.
            y, bound = _graph_case(case, u)
            return y, bound * (1.0 + UNIT_ROUNDOFF["float64"] / u)
        node, p, x = _single_node(name, case)
        return node_bound(node, [x], p, u=u, eta=eta)


def _as_float64(actual):
    if hasattr(actual, "detach") and hasattr(actual, "cpu"):  # a torch tensor (any dtype, any device)
        actual = actual.detach().cpu().double().numpy()
    return np.asarray(actual, dtype=np.float64)


def _index(flat, shape):
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def assert_matches_reference(op, case, actual, *, policy="float32"):
    """Check a backend's result of ``op`` on ``case`` against refghost's float64 reference,
    elementwise, within the error bound derived for ``policy`` by :mod:`refghost.bounds`.

    Parameters
    ----------
    op : str
        ``"conv2d"`` (:class:`ConvCase`), ``"batch_norm"`` (:class:`BatchNormCase`),
        ``"conv_bn"`` (:class:`ConvBNCase`: conv then BN, unfolded or fused), an activation name of
        :data:`refghost.ops.ACTIVATIONS` or ``"hard_sigmoid"`` (:class:`ActivationCase`; or
        ``"activation"`` for ``case.name``), ``"global_avg_pool"`` (:class:`PoolCase`),
        ``"linear"`` (:class:`LinearCase`), ``"ghost_module"``, ``"ghost_bottleneck"``.
    case : the inputs, exactly as the backend received them
    actual : array-like (NumPy, a torch tensor, anything ``np.asarray`` takes): the backend's output
    policy : ``"float32"`` (default), ``"float16"``, ``"bfloat16"`` or ``"float64"``: the precision
        the backend computes in. Its unit roundoff sets the bound. The case's arrays must already be
        representable in that format (else ValueError; see :func:`round_case`): rounding the inputs
        is the caller's business, because a backend that rounds them computes a different function.

    Returns
    -------
    float: the largest ``|actual - reference| / bound`` over the elements (<= 1 when it passes).

    Raises
    ------
    AssertionError naming the op, the case's parameters, how many elements broke the bound and the
    worst one (index, actual, reference, bound, error/bound). A shape mismatch or a NaN/Inf where
    the reference is finite also fails.
    """
    __tracebackhide__ = True
    reference, bound = reference_and_bound(op, case, policy=policy)
    got = _as_float64(actual)
    label = f"{op} [{case.describe()}], policy {policy}"
    if got.shape != reference.shape:
        raise AssertionError(f"{label}: actual has shape {got.shape}, the reference {reference.shape}")
    err = np.abs(got - reference)
    err = np.where(np.isnan(err), np.inf, err)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / bound)
    broken = ratio > 1.0
    worst = int(np.argmax(ratio)) if ratio.size else 0
    max_ratio = float(ratio.flat[worst]) if ratio.size else 0.0
    if broken.any():
        i = _index(worst, ratio.shape)
        raise AssertionError(
            f"{label}: {int(broken.sum())} of {ratio.size} elements outside the derived bound\n"
            f"  worst at index {i}: actual {got[i]:.9g}, reference {reference[i]:.9g}, "
            f"|error| {err[i]:.3g}, bound {bound[i]:.3g}, error/bound {ratio[i]:.3g}\n"
            f"  (worst-case rounding bound of one honest {policy} evaluation, refghost.bounds; "
            f"see docs/testing.md)")
    return max_ratio
