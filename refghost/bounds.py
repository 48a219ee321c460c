"""How far may an honest low-precision run of a GhostNet graph be from the exact result?

:func:`error_bounds` walks a graph once in float64 and carries, for every element of every
tensor, a first-order worst-case bound on ``|computed - exact|`` for *any* implementation that
rounds each operation to unit roundoff ``u`` (float32: 2^-24), sums dot products in any order,
and computes BatchNorm unfolded in PyTorch's order. The derivation (``docs/tolerances.md``) is
Higham's, *Accuracy and Stability of Numerical Algorithms* (2nd ed.), ch. 3:

* a dot product of ``n`` terms (plus bias) in any order: ``|err| <= gamma_n * sum |w_i x_i|``,
  ``gamma_n = n u / (1 - n u)``; the error already in the inputs is carried by ``|W| * err_x``;
* BatchNorm ``y = x*alpha + beta``: alpha and beta each carry a few roundings (sqrt, add,
  divide, multiply): ``|err| <= |alpha| err_x + 7u (|alpha x| + |bias| + |mean alpha|)``;
* activations: Lipschitz constant ``L`` times the input error (in the probabilistic model the
  Lipschitz constant of the interval the error can reach, :func:`slope_sup`), plus their own
  rounding (``ACTIVATION_ERROR``; exp/erf assumed within 4 ulp, the usual float32 libm accuracy);
* hard-sigmoid: slope 1/6 times the input error, plus the add and the divide;
* residual add, SE scaling: one rounding plus the propagated errors of both operands;
* global average pool over ``m`` values: ``gamma_m`` on the sum, plus the divide;
* the detector's ops: exact re-layouts (channel shuffle, slice, the head's flatten) and
  max-pool carry their inputs' errors (the window's largest); a bilinear resize by 2 or 1/2
  ``sum w_k e_k`` plus ``gamma_4`` on its 4-term sum; a sigmoid its slope over the interval plus
  ``u (10|y| + 4)``.

:func:`decode_bounds` carries a bound on the head's output through NanoDet's decode (softmax over
the bins, the integral, the stride, the clamped boxes).

Terms of second order in ``u`` are dropped. The bounds are rigorous in that model and
pessimistic in practice: an honest float32 backend typically uses a small fraction of them
(``docs/tolerances.md`` gives measured fractions).

:func:`folding_bound` is the other question a converted model asks: how far the exact output of
a graph whose weights an exporter folded with BatchNorm in float32 may move by that folding's
roundings (:data:`FOLD_ROUNDINGS` per folded weight and bias).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from . import ops
from .arch import Graph
from .errors import RefghostError
from .forward import evaluate

FLOAT32_U = 2.0 ** -24
FLOAT64_U = 2.0 ** -53
#: Unit roundoff of the arithmetic of each precision policy.
UNIT_ROUNDOFF = {"float64": FLOAT64_U, "float32": FLOAT32_U, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
#: Half the smallest subnormal of each precision: a rounding in the subnormal range is off by up
#: to this much in absolute terms, not by u relatively (Higham, ch. 2.1). It matters mostly for
#: float16, whose subnormals start at 6.1e-5.
UNDERFLOW = {"float64": 2.0 ** -1075, "float32": 2.0 ** -150, "float16": 2.0 ** -25, "bfloat16": 2.0 ** -134}
#: Relative error of storing a float32 value in each format: half an ulp (round to nearest), but
#: a whole ulp for bfloat16, whose conversions are often done by dropping the low 16 bits of a
#: float32 (truncation); measured: OpenVINO's bf16 depthwise convs used 0.94 of the round-to-nearest
#: bound at 416x416.
STORAGE_ROUNDOFF = {"float64": FLOAT64_U, "float32": FLOAT32_U, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -7}
#: Relative error of a weight a converter stored in each format: a whole ulp for float16 too, as
#: converters may truncate where runtimes' tensor conversions (F16C, NEON) round to nearest.
#: Measured: MNN's ``--fp16`` rounds every float16 weight toward zero (relative errors up to 0.999
#: ulp, 1.998 x 2^-11); a depthwise conv's 9 terms can all err the same way (issue 24: MNN ports
#: failed the half-ulp bound by 1.1-1.2x there).
WEIGHT_ROUNDOFF = {**STORAGE_ROUNDOFF, "float16": 2.0 ** -10}
#: The smallest normal number of each format: converters that store weights or tensors in a narrow
#: format may flush what is below it to zero (pnnx's float16 weights do), an absolute error of up
#: to this much (Higham, ch. 2.1, with flush-to-zero instead of gradual underflow).
SMALLEST_NORMAL = {"float64": 2.0 ** -1022, "float32": 2.0 ** -126, "float16": 2.0 ** -14, "bfloat16": 2.0 ** -126}


@dataclass(frozen=True)
class Policy:
    """How an honest backend rounds: the arithmetic, the stored weights, the stored tensors.

    ``arithmetic`` is the format every operation (product, partial sum, activation) is rounded
    to; ``weights`` the format the weights and biases are stored in (rounded once, then used
    exactly: pnnx's fp16 ``.bin`` with float32 arithmetic); ``activations`` the format every
    tensor is stored in between layers (rounded once more after each layer: ncnn's fp16 storage,
    OpenVINO's bf16 inference precision with float32 accumulation). Each is a key of
    :data:`UNIT_ROUNDOFF`.
    """

    name: str
    arithmetic: str
    weights: str
    activations: str
    description: str

    @property
    def u(self) -> float:
        """Unit roundoff of the arithmetic."""
        return UNIT_ROUNDOFF[self.arithmetic]

    @property
    def u_weights(self) -> float:
        """Relative error of a stored weight beyond float32's (0 when weights are float32)."""
        return 0.0 if self.weights == "float32" else WEIGHT_ROUNDOFF[self.weights]

    @property
    def u_activations(self) -> float:
        """Relative error of storing a tensor beyond the arithmetic's own rounding (0 when equal)."""
        narrower = UNIT_ROUNDOFF[self.activations] > UNIT_ROUNDOFF[self.arithmetic]
        return STORAGE_ROUNDOFF[self.activations] if narrower else 0.0

    @property
    def tiny_weights(self) -> float:
        """Absolute error of a stored weight flushed to zero (0 when weights are float32)."""
        return 0.0 if self.weights == "float32" else SMALLEST_NORMAL[self.weights]

    @property
    def tiny_activations(self) -> float:
        """Absolute error of a stored tensor value flushed to zero (0 when stored as computed)."""
        return SMALLEST_NORMAL[self.activations] if self.u_activations else 0.0

    @property
    def eta(self) -> float:
        """Underflow allowance: half the smallest subnormal of the narrowest format in play."""
        return max(UNDERFLOW[f] for f in (self.arithmetic, self.weights, self.activations))


#: The precision policies ``refghost compare --policy`` knows, in the order the diagnosis tries
#: them (:mod:`refghost.verify.compare` names the first looser one under which every check passes):
#: storage-only roundings before rounded arithmetic. This is not a total order of the bounds: bfloat16
#: storage rounds at 2^-8 but accumulates in float32, float16 arithmetic rounds every step at 2^-11,
#: so on a long sum either bound may be the larger.
#: Every one is an honest way to run a float32 model; the names say what is rounded to what.
POLICIES = {p.name: p for p in (
    Policy("float32", "float32", "float32", "float32", "float32 arithmetic and storage"),
    Policy("float16-weights", "float32", "float16", "float32", "weights stored in float16, float32 arithmetic"),
    Policy("float16-storage", "float32", "float16", "float16",
           "weights and tensors stored in float16, float32 arithmetic"),
    Policy("bfloat16-storage", "float32", "bfloat16", "bfloat16",
           "weights and tensors stored in bfloat16, float32 accumulation"),
    Policy("float16", "float16", "float16", "float16", "float16 arithmetic and storage"),
    Policy("bfloat16", "bfloat16", "bfloat16", "bfloat16", "bfloat16 arithmetic and storage"),
)}


def as_policy(policy) -> Policy:
    """The :class:`Policy` named ``policy`` (or ``policy`` itself)."""
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {tuple(POLICIES)}, got {policy!r}")
    return POLICIES[policy]


def policy_for(arithmetic: str, weights: str, activations: str) -> Policy:
    """The policy of :data:`POLICIES` that bounds a backend with this arithmetic and these stored
    formats (``"float32"``, ``"float16"``, ``"bfloat16"``): the one with the same three, else the
    looser one that covers them. Narrow arithmetic gives that format's arithmetic policy (a
    runtime does not say whether it accumulates in float32, so the looser model is taken); narrow
    tensors with float32 arithmetic give that format's storage policy; bfloat16 weights with
    float32 tensors are bounded as bfloat16 storage."""
    for policy in POLICIES.values():
        if (policy.arithmetic, policy.weights, policy.activations) == (arithmetic, weights, activations):
            return policy
    if arithmetic != "float32":
        return as_policy(arithmetic)
    if activations != "float32":
        return as_policy(f"{activations}-storage")
    return as_policy(f"{weights}-storage")


class _Roundoff(NamedTuple):
    """What the error rules need of a policy: ``u`` of the arithmetic, ``uw`` of the stored
    weights and ``us`` of the stored tensors (0 where as wide as float32 / the arithmetic), and
    ``tw``, ``ts`` the absolute errors of a stored weight or tensor value flushed to zero."""

    u: float
    uw: float = 0.0
    us: float = 0.0
    tw: float = 0.0
    ts: float = 0.0


def _roundoff(policy, u: float, oracle_u: float = 0.0) -> _Roundoff:
    """``policy`` (a name or a Policy) when given, else float arithmetic at ``u``; the arithmetic's
    roundoff raised by ``oracle_u`` (the float64 reference's own rounding, same rules)."""
    if policy is None:
        return _Roundoff(u + oracle_u)
    pol = as_policy(policy)
    return _Roundoff(pol.u + oracle_u, pol.u_weights, pol.u_activations, pol.tiny_weights, pol.tiny_activations)


def covers(looser, policy) -> bool:
    """Whether every roundoff of ``looser`` (arithmetic, stored weights and tensors, their flush
    thresholds, the underflow allowance) is at least the same one of ``policy``: then every bound
    under ``looser`` is at least the bound under ``policy``, elementwise, since each error rule
    grows with each of them (``tests/test_bounds.py`` checks it on networks)."""
    a, b = as_policy(looser), as_policy(policy)
    return all(x >= y for x, y in zip((*_roundoff(a, 0.0), a.eta), (*_roundoff(b, 0.0), b.eta)))


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _gelu_slope(x):
    from math import pi, sqrt

    return 0.5 * (1.0 + ops._erf(x / sqrt(2.0))) + x * np.exp(-0.5 * x * x) / sqrt(2.0 * pi)


#: Per activation: (derivative f'(x), Lipschitz constant L, c_x, c_y, c_abs), where the
#: activation's own rounding is ``u*(c_x*|x| + c_y*|y| + c_abs)``. ReLU, ReLU6, identity are
#: exact. LeakyReLU is one multiply by the float32-rounded 0.1 (relative error 1.5e-8 = 0.25u, so
#: c_y = 2); PReLU one multiply by a stored slope. exp/erf are taken to be within 4 ulp (the
#: usual float32 libm accuracy) with up to 4 more roundings of the arithmetic around them,
#: relative to |x| and |y|; ELU and SELU compute alpha*(exp(x) - 1) for x < 0, whose rounding is
#: absolute (<= 6 alpha*scale u). The slopes of LeakyReLU and PReLU are filled in per node.
ACTIVATION_ERROR = {
    "Identity": (lambda x: np.ones_like(x), 1.0, 0.0, 0.0, 0.0),
    "ReLU": (lambda x: (x > 0).astype(x.dtype), 1.0, 0.0, 0.0, 0.0),
    "ReLU6": (lambda x: ((x > 0) & (x < 6)).astype(x.dtype), 1.0, 0.0, 0.0, 0.0),
    "LeakyReLU": (None, None, 0.0, 2.0, 0.0),
    "PReLU": (None, None, 0.0, 1.0, 0.0),
    "ELU": (lambda x: np.where(x > 0, 1.0, ops.ELU_ALPHA * np.exp(np.minimum(x, 0))), 1.0,
            0.0, 8.0, 6.0 * ops.ELU_ALPHA),
    "SELU": (lambda x: ops.SELU_SCALE * np.where(x > 0, 1.0, ops.SELU_ALPHA * np.exp(np.minimum(x, 0))),
             ops.SELU_SCALE * ops.SELU_ALPHA, 0.0, 8.0, 6.0 * ops.SELU_SCALE * ops.SELU_ALPHA),
    "SiLU": (lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))), 1.1, 8.0, 8.0, 0.0),  # max 1.0998
    "GELU": (_gelu_slope, 1.13, 8.0, 8.0, 0.0),  # max slope 1.1289
    "HardSwish": (lambda x: np.where(x < -3, 0.0, np.where(x > 3, 1.0, (2.0 * x + 3.0) / 6.0)), 1.5,
                  8.0, 8.0, 0.0),  # (2x+3)/6 on [-3, 3]
}


def _silu_slope(x):
    return _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x)))


def _bisect(g, lo: float, hi: float) -> float:
    """The root of ``g`` in ``[lo, hi]`` (``g(lo)``, ``g(hi)`` of opposite signs), to the last bit."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if (g(mid) > 0) == (g(lo) > 0) else (lo, mid)
    return lo


#: SiLU's slope is largest at c = 2.3994 (where f'' = 0, i.e. c tanh(c/2) = 2): 1.0998; and, as
#: f'(x) + f'(-x) = 1, most negative at -c: -0.0998. GELU's (f'' = phi(x)(2 - x^2)) at +-sqrt(2):
#: 1.1289 and -0.1289.
_SILU_PEAK = _bisect(lambda t: t * np.tanh(0.5 * t) - 2.0, 2.0, 3.0)
_GELU_PEAK = float(np.sqrt(2.0))


def _symmetric_peaks(slope, c: float):
    """The points +-c with |f'| there, for a slope with f'(x) + f'(-x) = 1 (SiLU, GELU)."""
    top = float(slope(np.array([c]))[0])
    return (-c, abs(1.0 - top)), (c, top)


#: Slopes of the functions whose error :func:`slope_sup` bounds over an interval: every activation
#: (LeakyReLU and PReLU for a negative slope given per node), ``"HardSigmoid"`` (the SE gate
#: relu6(x + 3)/6) and ``"Sigmoid"``. Per function: (f', points), ``points`` the places where
#: |f'| has a local supremum that the ends of an interval need not show, with that supremum:
#: every knee with the larger of its one-sided slopes, and every interior maximum of |f'|.
#: Between two consecutive points |f'| has no interior maximum (it is monotone, or falls to a
#: zero of f' and rises again), so its supremum over [a, b] is the largest of |f'(a)|, |f'(b)|
#: and the values of the points inside [a, b] (docs/tolerances.md).
SLOPES = {
    "Identity": (ACTIVATION_ERROR["Identity"][0], ()),
    "ReLU": (ACTIVATION_ERROR["ReLU"][0], ((0.0, 1.0),)),
    "ReLU6": (ACTIVATION_ERROR["ReLU6"][0], ((0.0, 1.0), (6.0, 1.0))),
    "ELU": (ACTIVATION_ERROR["ELU"][0], ((0.0, max(1.0, ops.ELU_ALPHA)),)),  # alpha e^x below 0, 1 above
    "SELU": (ACTIVATION_ERROR["SELU"][0], ((0.0, ops.SELU_SCALE * max(1.0, ops.SELU_ALPHA)),)),
    "SiLU": (_silu_slope, _symmetric_peaks(_silu_slope, _SILU_PEAK)),
    "GELU": (_gelu_slope, _symmetric_peaks(_gelu_slope, _GELU_PEAK)),
    "HardSwish": (ACTIVATION_ERROR["HardSwish"][0], ((-3.0, 0.5), (3.0, 1.5))),  # (2x+3)/6 on [-3, 3]
    "HardSigmoid": (lambda x: ((x > -3) & (x < 3)) / 6.0, ((-3.0, 1.0 / 6.0), (3.0, 1.0 / 6.0))),
    "Sigmoid": (lambda x: _sigmoid(x) * _sigmoid(-x), ((0.0, 0.25),)),  # sigma(1 - sigma), largest at 0
}


def slope_sup(name: str, lo, hi, negative_slope: float | None = None):
    """The supremum of ``|f'|`` over ``[lo, hi]`` (one-sided slopes at knees included), elementwise:
    the Lipschitz constant of ``f`` on that interval, so ``|f(x + d) - f(x)| <= slope_sup(name,
    x - r, x + r) * |d|`` for every ``|d| <= r``.

    ``name``: a key of :data:`SLOPES`, or ``"LeakyReLU"`` / ``"PReLU"`` with their
    ``negative_slope`` (LeakyReLU's default :data:`refghost.ops.LEAKY_RELU_SLOPE`). ``lo <= hi``:
    float64 arrays (or numbers) of one shape. Exact, not sampled: a knee or a peak of the slope
    inside the interval counts even when both ends sit where ``f`` is flat.
    """
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if name in ("LeakyReLU", "PReLU"):
        if negative_slope is None:
            if name == "PReLU":
                raise RefghostError("slope_sup: PReLU needs its negative_slope (the node's learnt weight)")
            negative_slope = ops.LEAKY_RELU_SLOPE
        a = abs(float(negative_slope))

        def slope(t):
            return np.where(t > 0, 1.0, a)

        points = ((0.0, max(1.0, a)),)
    elif name in SLOPES:
        slope, points = SLOPES[name]
    else:
        raise RefghostError(f"slope_sup: no slope known for {name!r}; known: {sorted(SLOPES) + ['LeakyReLU', 'PReLU']}")
    if lo.shape != hi.shape or np.any(lo > hi):
        raise RefghostError(f"slope_sup: need lo <= hi of one shape, got shapes {lo.shape} and {hi.shape}")
    sup = np.maximum(np.abs(slope(lo)), np.abs(slope(hi)))
    for point, peak in points:
        sup = np.where((lo <= point) & (point <= hi), np.maximum(sup, peak), sup)
    return sup


def gamma(n, u):
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term sum."""
    n = np.asarray(n, dtype=np.float64)
    return n * u / (1.0 - n * u)


MODELS = ("worst", "probabilistic")
#: Version of the error rules. A golden file records the version its stored bounds were computed
#: with; ``refghost compare`` recomputes the bounds of a golden from another version.
#: 2: errors correlated across the positions of a channel in the global pool and its partial sums
#: of one sign, storage formats of weights and tensors (rounded, or flushed to zero below the
#: smallest normal), every form of the hard-sigmoid.
#: 3: an activation's slope is its supremum over the whole interval an input error can reach
#: (knees and peaks of the slope inside it, not samples at its ends); float16 weights within a
#: whole ulp (converters may truncate); the detector's ops.
BOUND_MODEL = 3
#: Default lambda of the probabilistic model: a bound of lambda standard deviations fails with
#: probability about exp(-lambda^2/2) per element (1e-14 at lambda = 8).
DEFAULT_LAMBDA = 8.0


def error_bounds(graph: Graph, params: dict[str, np.ndarray], x: np.ndarray, *, u: float = FLOAT32_U,
                 model: str = "probabilistic", lam: float = DEFAULT_LAMBDA, isolated_from=None, extra=None,
                 policy=None):
    """Oracle values and elementwise error bounds of every node.

    Parameters
    ----------
    graph : the network
    params : state_dict arrays in float64 (the values the backend also uses, upcast exactly)
    x : (N, 3, H, W) float64, the input (exactly representable in the backend's precision)
    u : unit roundoff of the backend's arithmetic (float32 2^-24, float16 2^-11, bfloat16 2^-8),
        every tensor and weight stored as wide; ignored when ``policy`` is given
    policy : optional :class:`Policy` or name in :data:`POLICIES`: the arithmetic and the storage
        formats of weights and tensors (overrides ``u``)
    model : ``"worst"``: rigorous for any summation order, but compounding through depth makes it
        vacuous after a few layers, so use it for one layer at a time (``isolated_from``).
        ``"probabilistic"``: rounding errors as zero-mean, ``|delta| <= u``, independent from one
        rounding to the next *except* that the errors of the positions of one channel may be
        correlated in any way (a rounded weight or BN coefficient gives every position the same
        relative error): variances propagate through sums over channels, standard deviations
        (Minkowski) through sums over positions (spatial kernels, the global pool); the bound is
        ``lam`` standard deviations.
    isolated_from : optional ``{node name: array}`` of a candidate's own tensors. When given,
        every node is evaluated on the candidate's inputs to that node (not the oracle's), and
        its bound covers that node's own rounding only: the isolated check.
    extra : optional ``extra(node, inputs, params) -> array or None``: an error a node introduces
        besides its rounding (e.g. weights that were themselves rounded), as a bound (``"worst"``)
        or a variance (``"probabilistic"``); it is carried through later nodes like the rest.

    Returns
    -------
    (values, bounds): two dicts ``{node name: array}`` (float64) in forward order. ``bounds[name]``
    bounds ``|backend - values[name]|`` elementwise.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    worst = model == "worst"
    r = _roundoff(policy, u)
    values = {"input": x}
    state = {"input": np.zeros_like(x)}  # worst: error bound; probabilistic: error variance
    bounds = {}
    for node in graph.nodes:
        if isolated_from is not None:
            ins = [x if s == "input" else np.asarray(isolated_from[s], dtype=np.float64) for s in node.inputs]
            values[node.name], bounds[node.name] = node_bound(node, ins, params, u=u, model=model, lam=lam,
                                                              policy=policy)
            continue
        ins = [values[s] for s in node.inputs]
        y = evaluate(node, ins, params)
        p = {role: params[key] for role, key in node.params.items()}
        values[node.name] = y
        state[node.name] = _node_error(node, ins, [state[s] for s in node.inputs], y, p, r, worst, lam)
        added = extra(node, ins, p) if extra is not None else None
        if added is not None:
            state[node.name] = state[node.name] + added
        bounds[node.name] = state[node.name] if worst else lam * np.sqrt(state[node.name])
    del values["input"]
    return values, bounds


def node_bound(node, inputs, params, *, u: float = FLOAT32_U, model: str = "worst", lam: float = DEFAULT_LAMBDA,
               eta: float = 0.0, policy=None):
    """The float64 value of one node and the bound on its own rounding, its inputs taken as exact.

    ``inputs`` are the node's input arrays (converted to float64 here), ``params`` maps the
    node's state_dict keys to float64 arrays. Returns ``(value, bound)``, both float64 arrays of
    the output's shape: an honest implementation with unit roundoff ``u`` (or the formats of
    ``policy``) computes this node from these inputs within ``bound`` of ``value``, elementwise.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    r = _roundoff(policy, u, FLOAT64_U)  # the float64 reference value is itself rounded: same rules, u = 2^-53
    ins = [np.asarray(a, dtype=np.float64) for a in inputs]
    y = evaluate(node, ins, params)
    p = {role: params[key] for role, key in node.params.items()}
    # An exposed tensor may be the unrounded one while the node reads it rounded to the storage format.
    read = [r.us * np.abs(a) if model == "worst" else (r.us * a) ** 2 for a in ins]
    state = _node_error(node, ins, read, y, p, r, model == "worst", lam)
    if model == "worst":
        return y, state + _roundings(node, p) * eta
    return y, lam * np.sqrt(state + _roundings(node, p) * eta * eta)


def carried_bound(node, inputs, input_bounds, params, *, u: float = FLOAT32_U, model: str = "worst",
                  lam: float = DEFAULT_LAMBDA, policy=None):
    """One step of :func:`error_bounds`: the float64 value of ``node`` on ``inputs`` and the bound
    on how far an honest backend's output may be from it when each input is itself within
    ``input_bounds`` (same shapes) of ``inputs``: the inputs' errors carried through the node, plus
    its own rounding at ``u`` (or the formats of ``policy``).

    ``model="worst"``: the bounds are rigorous bounds; ``"probabilistic"``: they are ``lam``
    standard deviations (the variances ``(bound/lam)^2`` are propagated). Returns ``(value, bound)``.
    """
    if model not in MODELS:
        raise RefghostError(f"model must be one of {MODELS}, got {model!r}")
    if len(inputs) != len(input_bounds) or len(inputs) != len(node.inputs):
        raise RefghostError(f"node {node.name} takes {len(node.inputs)} inputs, got {len(inputs)} values and "
                            f"{len(input_bounds)} bounds")
    worst = model == "worst"
    ins = [np.asarray(a, dtype=np.float64) for a in inputs]
    bnds = [np.broadcast_to(np.asarray(b, dtype=np.float64), a.shape) for a, b in zip(ins, input_bounds)]
    if any(np.any(b < 0) for b in bnds):
        raise RefghostError(f"input bounds of node {node.name} must be >= 0")
    y = evaluate(node, ins, params)
    p = {role: params[key] for role, key in node.params.items()}
    errs = bnds if worst else [(b / lam) ** 2 for b in bnds]
    state = _node_error(node, ins, errs, y, p, _roundoff(policy, u), worst, lam)
    return y, state if worst else lam * np.sqrt(state)


def _roundings(node, p) -> int:
    """A count k of roundings per output element of ``node``, for the underflow term ``k*eta``:
    a dot product's products and partial sums (``2n + 1``), BN's few operations (8), an
    activation's exp/erf (within 4 ulp = 8 eta, times a slope up to 1.76) and arithmetic (24);
    one more for storing the output."""
    if node.op == "conv":
        return 2 * (p["weight"][0].size + ("bias" in p)) + 2
    if node.op == "linear":
        return 2 * (p["weight"].shape[1] + 1) + 2
    return 1 + {"concat": 0, "add": 1, "scale": 1, "hard_sigmoid": 3, "global_avg_pool": 2, "batch_norm": 8,
                "act": 24, "channel_shuffle": 0, "slice": 0, "flatten_levels": 0, "max_pool": 0, "upsample": 8,
                "sigmoid": 24, "sigmoid_classes": 24}[node.op]


#: Relative rounding of the hard-sigmoid gate, per term: an honest backend may compute
#: ``relu6(x + 3) / 6`` (add, divide), ``x * fl(1/6) + 0.5`` (the constant's rounding, multiply,
#: add; or one FMA), ``(x + 3) * fl(1/6)`` (add, constant, multiply), or ONNX's
#: ``HardSigmoid(alpha=fl(1/6), beta=0.5)``; the clip is exact. Every form is within
#: ``u * (HARD_SIGMOID_SLOPE_ROUNDINGS * (|x| + 3) / 6 + |y|)``: two roundings on the affine part
#: (``x * fl(1/6)`` then the add, or ``x + 3`` then ``fl(1/6)``), one on the result.
HARD_SIGMOID_SLOPE_ROUNDINGS = 2


def _node_error(node, ins, errs, y, p, r: _Roundoff, worst, lam):
    """One node's error state from its inputs' (bound if ``worst``, else variance)."""
    x, e = ins[0], errs[0]
    op = node.op
    u, uw, us, tw, ts = r
    # the output rounded to the storage format (relative us, or flushed to zero below ts)
    stored = us * np.abs(y) + ts if worst else (us * y) ** 2 + ts * ts
    if op == "conv":
        key = node.params["weight"]
        coeff = np.abs(p["weight"]) if worst else p["weight"] ** 2
        weight_only = replace(node, params={"weight": key})
        n = coeff[0].size  # C/groups * KH * KW products per output

        def apply(t):  # the same conv with |W| (worst) or W^2 (variance), no bias
            return evaluate(weight_only, [t], {key: coeff})

        magnitude = apply(np.abs(x) + e if worst else x ** 2)
        if "bias" in p:
            magnitude += (np.abs(p["bias"]) if worst else p["bias"] ** 2)[None, :, None, None]
            n += 1
        carried = apply(e) if e.any() else 0.0
        flushed = 0.0  # stored weights flushed to zero: tw * sum|x| (worst) or tw^2 * sum x^2 (variance)
        if tw:
            flushed = tw * evaluate(weight_only, [np.abs(x) + e if worst else x ** 2], {key: np.ones_like(coeff)})
            flushed = flushed if worst else tw * flushed
        if worst:
            return carried + (gamma(n, u) + uw) * magnitude + flushed + stored
        return carried + (n * u * u + uw * uw) * magnitude + flushed + stored
    if op == "linear":
        flat_x, flat_e = x.reshape(x.shape[0], -1), e.reshape(e.shape[0], -1)
        w, b = p["weight"], p["bias"]
        n = w.shape[1] + 1
        if worst:
            return (flat_e @ np.abs(w).T + (gamma(n, u) + uw) * ((np.abs(flat_x) + flat_e) @ np.abs(w).T + np.abs(b))
                    + stored)
        return flat_e @ (w ** 2).T + (n * u * u + uw * uw) * (flat_x ** 2 @ (w ** 2).T + b ** 2) + stored
    if op == "batch_norm":
        alpha, _ = ops.batch_norm_coefficients(p["weight"], p["bias"], p["running_mean"], p["running_var"],
                                               eps=node.attrs.get("eps", ops.BN_EPS))
        a = np.abs(alpha)[None, :, None, None]
        const = (np.abs(p["bias"]) + np.abs(p["running_mean"] * alpha))[None, :, None, None]
        # 7 roundings of the arithmetic, and alpha and beta stored once (folded or not)
        if worst:
            return a * e + (7 * u + uw) * (a * (np.abs(x) + e) + const) + stored
        return a * a * e + (7 * u * u + uw * uw) * (a * np.abs(x) + const) ** 2 + stored
    if op == "act":
        name = node.attrs["activation"]
        _, lip, c_x, c_y, c_abs = ACTIVATION_ERROR[name]
        slope = None
        if name in ("LeakyReLU", "PReLU"):
            slope = ops.LEAKY_RELU_SLOPE if name == "LeakyReLU" else float(p["weight"].reshape(()))
            lip = max(1.0, abs(slope))
        c_w = 1.0 if name == "PReLU" else 0.0  # PReLU's slope is a stored weight
        own = u * (c_x * np.abs(x) + c_y * np.abs(y) + c_abs) + c_w * uw * np.abs(y)
        if worst:
            return lip * e + own + stored
        # The input is within reach = lam*sigma of x: the output moves by at most the largest slope
        # over [x - reach, x + reach] (knees and peaks of the slope inside included) times reach.
        reach = lam * np.sqrt(e)
        local = slope_sup(name, x - reach, x + reach, slope)
        return local * local * e + own ** 2 + stored
    if op == "concat":
        return np.concatenate(errs, axis=1)
    if op == "add":
        if worst:
            return errs[0] + errs[1] + u * (np.abs(y) + errs[0] + errs[1]) + stored
        return errs[0] + errs[1] + (u * y) ** 2 + stored
    if op == "global_avg_pool":
        m = x.shape[2] * x.shape[3]
        if worst:
            return ops.global_avg_pool(e) + (gamma(m, u) + u) * ops.global_avg_pool(np.abs(x) + e) + stored
        # The positions' errors may be correlated: the std of the mean is at most the mean of the stds.
        # Own rounding: the partial sums of terms of one sign grow like k*mean and their roundings
        # need not cancel (similar terms round alike), so the sum's own error is taken at its worst
        # case, (gamma_m + u) mean|x| with the divide, as lam standard deviations.
        own = (gamma(m, u) + u) * ops.global_avg_pool(np.abs(x)) / lam
        return ops.global_avg_pool(np.sqrt(e)) ** 2 + own ** 2 + stored
    if op == "hard_sigmoid":
        own = u * (HARD_SIGMOID_SLOPE_ROUNDINGS * (np.abs(x) + 3) / 6 + np.abs(y))
        if worst:
            return e / 6 + own + stored
        # The gate lies in [0, 1] whatever its input: its error never exceeds 1 (bound at most 1).
        return np.minimum(e / 36 + own ** 2 + stored, 1.0 / (lam * lam))
    if op == "scale":
        g, e_g = ins[1], errs[1]
        if worst:
            return np.abs(g) * e + (np.abs(x) + e) * e_g + u * np.abs(y) + stored
        return g * g * e + x * x * e_g + e * e_g + (u * y) ** 2 + stored  # e*e_g: both errors at once
    if op in ("channel_shuffle", "slice", "flatten_levels"):
        # Exact re-layouts: each output is one input element, moved with its error and not rounded.
        return evaluate(node, errs, {})
    if op == "max_pool":
        # |max(a) - max(b)| <= max |a_i - b_i|: the largest error (or variance) over the window.
        # No rounding: the output is one of the inputs, already stored.
        return evaluate(node, [e], {})
    if op == "upsample":
        return _upsample_error(node, x, e, r, worst, lam) + stored
    if op in ("sigmoid", "sigmoid_classes"):
        k = x.shape[-1] if op == "sigmoid" else node.attrs["num_classes"]
        xs, es, ys = x[..., :k], e[..., :k], y[..., :k]
        reach = es if worst else lam * np.sqrt(es)
        local = slope_sup("Sigmoid", xs - reach, xs + reach)
        own = u * (SIGMOID_ERROR[0] * np.abs(ys) + SIGMOID_ERROR[1])
        if worst:
            scores = local * es + own + us * np.abs(ys) + ts
        else:
            scores = local * local * es + own ** 2 + (us * ys) ** 2 + ts * ts
        return np.concatenate([scores, e[..., k:]], axis=-1)  # the box logits: copied, exact
    raise ValueError(f"no error rule for op {op!r} (node {node.name})")


#: Relative rounding of a sigmoid ``1/(1 + exp(-x))`` as ``(c_y, c_abs)``: the error is within
#: ``u (c_y |y| + c_abs)``. PyTorch's form: exp within 4 ulp (8u) scaled by ``t/(1+t) = 1 - y <= 1``
#: in the reciprocal, the add and the reciprocal: ``(8(1 - y) + 2) u |y| <= 10 u |y|``. Other
#: backends evaluate a rational approximation around 0.5 (ONNX Runtime's MLAS, input clamped to
#: [-18, 18]) or ``0.5 tanh(x/2) + 0.5``, whose error is absolute, a few ulp of 0.5: measured, ONNX
#: Runtime 1.32 up to 2.76u absolute (1,428u relative where y ~ 1e-3); ``c_abs = 4`` covers it
#: (ORT used 0.56 of the bound), and ``exp(-x)`` overflowing to 1/inf = 0 where y < 3e-39.
SIGMOID_ERROR = (10.0, 4.0)


def _upsample_error(node, x, e, r: _Roundoff, worst, lam):
    """Bilinear resize (align_corners False): each output is ``sum_k w_k x_k`` over at most 4 taps
    with ``w_k >= 0``, ``sum w_k = 1``. For a power-of-two scale factor the source coordinates
    ``(d + 1/2)/s - 1/2`` and the weights (products of 0, 1/4, 1/2, 3/4, 1 for s = 2 and 1/2) are
    exact in float32 (and in any format of 8 bits or more for the weights), so the float result
    differs by the 4-term sum only: ``gamma_4 sum w_k |x_k|`` in any order (FMA or separable
    row-then-column blends included). Carried: ``sum w_k e_k`` (worst); the standard deviation of a
    convex combination of errors correlated in any way is at most ``sum w_k sigma_k`` (Minkowski,
    as the global pool), and the own rounding is taken at its worst case as ``lam`` sigma."""
    s = float(node.attrs["scale_factor"])
    k = np.log2(s) if s > 0 else np.nan
    if not (np.isfinite(k) and k == round(k) and abs(k) <= 3):
        raise ValueError(f"no error rule for upsample by {s:g} (node {node.name}): the bound assumes a power-of-two "
                         f"scale factor from 1/8 to 8, whose coordinates and weights are exact")
    u = r.u

    def blend(t):  # sum_k w_k t_k, the same taps (w_k >= 0): the op itself on a non-negative array
        return evaluate(node, [t], {})

    own = gamma(4, u) * blend(np.abs(x))
    if worst:
        return blend(e) + own
    return blend(np.sqrt(e)) ** 2 + (own / lam) ** 2


def segment_bound(graph: Graph, names: list[str], leaves: dict, params: dict, *, u: float = FLOAT32_U,
                  eta: float = 0.0, policy=None, values_cache: dict | None = None):
    """Value and worst-case bound of the last node of a short chain of nodes, from exact leaves.

    ``names`` are node names in forward order; every input of a node in the chain is either an
    earlier node of the chain or a key of ``leaves`` (the candidate's own tensors, or
    ``"input"``), taken as exact. Each node adds its own rounding and carries its inputs' errors
    (the worst-case rules of :func:`error_bounds`, at ``u`` or the formats of ``policy``). A
    BatchNorm whose conv is in the chain may have been folded into that conv by the backend (ONNX
    exporters do), so its bound is the larger of "conv then BN" and "one conv with weights
    W*alpha, bias beta, themselves rounded once": an honest backend computes one or the other.

    ``values_cache``: a dict kept by the caller across calls with the same ``leaves`` and
    ``params`` (e.g. one chain judged under several policies): the chain's float64 values, which
    do not depend on the policy, are computed once (keyed by the chain up to each node).
    """
    r = _roundoff(policy, u, FLOAT64_U)  # the float64 reference value is itself rounded: same rules, u = 2^-53
    values, errors = {}, {}
    for i, name in enumerate(names):
        node = graph.node(name)
        ins = [values[s] if s in values else np.asarray(leaves[s], dtype=np.float64) for s in node.inputs]
        # A leaf may be the unrounded tensor while the chain reads it rounded to the storage format.
        errs = [errors[s] if s in errors else r.us * np.abs(a) for s, a in zip(node.inputs, ins)]
        key = tuple(names[:i + 1])
        if values_cache is not None and key in values_cache:
            y = values_cache[key]
        else:
            y = evaluate(node, ins, params)
            if values_cache is not None:
                values_cache[key] = y
        p = {role: params[key] for role, key in node.params.items()}
        err = _node_error(node, ins, errs, y, p, r, True, DEFAULT_LAMBDA) + _roundings(node, p) * eta
        src = node.inputs[0]
        if node.op == "batch_norm" and src in values and graph.node(src).op == "conv":
            conv = graph.node(src)
            first = conv.inputs[0]
            conv_in = values[first] if first in values else np.asarray(leaves[first], dtype=np.float64)
            conv_p = {role: params[key] for role, key in conv.params.items()}
            conv_in_err = errors[first] if first in errors else r.us * np.abs(conv_in)
            folded = _folded_conv_bn_error(conv, conv_p, node, p, conv_in, conv_in_err, values[src], y, r)
            err = np.maximum(err, folded + (_roundings(conv, conv_p) + 1) * eta)
        values[name], errors[name] = y, err
    return values[names[-1]], errors[names[-1]]


def _folded_conv_bn_error(conv, conv_p, bn, bn_p, x, e, z, y, r: _Roundoff):
    """Worst-case error of BN(conv(x)) computed as ONE conv with folded float-``u`` weights.

    Per output element, with ``z = conv(x) + b`` (float64), ``alpha, beta`` the BN coefficients,
    ``n`` products, ``A = |alpha| (|W| * (|x| + e))`` and ``C = |alpha b| + |alpha mean| + |bias|``:
    the backend computes ``alpha^ = alpha (1 + theta)`` with ``|theta| <= 4u`` (add eps, sqrt,
    divide, multiply by gamma), ``W'_i = fl(W_i alpha^)`` (one more ``u`` each, and ``uw`` when
    stored narrower, and up to ``tw`` if flushed to zero), ``b' = fl(alpha^ (b - mean) + bias)``
    (``<= (7u + uw) C``), then a conv of ``m = n + 1`` terms (``gamma_m (A + |b'|) <= gamma_m (A + C)``),
    then the output is stored (``us |y| + ts``). Total, plus the carried input error:
    ``|alpha| (|W| * e) + gamma_m (A + C) + (u + uw) A + 4u (|alpha z| + |alpha b|) + (7u + uw) C
    + tw (1 * (|x| + e) + 1) + us |y| + ts``.
    """
    u, uw, us, tw, ts = r
    alpha, _ = ops.batch_norm_coefficients(bn_p["weight"], bn_p["bias"], bn_p["running_mean"], bn_p["running_var"],
                                           eps=bn.attrs.get("eps", ops.BN_EPS))
    a = np.abs(alpha)[None, :, None, None]
    key = conv.params["weight"]
    weight_only = replace(conv, params={"weight": key})
    w_abs = {key: np.abs(conv_p["weight"])}
    carried = a * evaluate(weight_only, [e], w_abs) if np.any(e) else 0.0
    big_a = a * evaluate(weight_only, [np.abs(x) + e], w_abs)
    b = conv_p.get("bias", np.zeros_like(alpha))
    ab = np.abs(alpha * b)[None, :, None, None]
    c = ab + (np.abs(alpha * bn_p["running_mean"]) + np.abs(bn_p["bias"]))[None, :, None, None]
    m = conv_p["weight"][0].size + 1
    flushed = tw * evaluate(weight_only, [np.abs(x) + e], {key: np.ones_like(conv_p["weight"])}) + tw if tw else 0.0
    return (carried + gamma(m, u) * (big_a + c) + (u + uw) * big_a + 4 * u * (a * np.abs(z) + ab)
            + (7 * u + uw) * c + flushed + us * np.abs(y) + ts)


# --------------------------------------------------------------------------------------------
# An exporter's BatchNorm folding, propagated
# --------------------------------------------------------------------------------------------
# An exporter folds in float32, ``W' = W * alpha`` and ``b' = beta - mean * alpha`` (``beta`` the
# BN's bias) with ``alpha = gamma / sqrt(var + eps)``: alpha carries up to 2.5 roundings (add,
# sqrt, divide), ``W'`` one more, ``b'`` one more on ``mean * alpha`` and one for the subtraction:
# ``|W' - W alpha| <= 3.5 u |W alpha|`` and ``|b' - (beta - mean alpha)| <= 3.5 u (|beta| + |mean
# alpha|)`` to first order (u = 2^-24; PyTorch 2.13's exporters measure <= 3). FOLD_ROUNDINGS = 4
# covers both; folding_bound carries it to every layer. A BN folded by refghost's ONNX import (in
# float64, refghost.convert.onnx_walk) is rounded once: <= 1 u.

#: Roundings in units of u that an exporter's float32 BatchNorm folding puts on each folded weight
#: and bias (derived above); measured on PyTorch 2.x exports: <= 3.
FOLD_ROUNDINGS = 4


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


# --------------------------------------------------------------------------------------------
# The detector's decode: head output -> distances, boxes, scores
# --------------------------------------------------------------------------------------------


class DecodeBounds(NamedTuple):
    """Oracle values of :func:`refghost.detector.decode.decode` (float64) and elementwise bounds.

    scores, score_bound : (N, P, C) the class probabilities (the head output's first C entries)
    distances, distance_bound : (N, P, 4) the side distances in pixels (integral times stride)
    boxes, box_bound : (N, P, 4) the clamped boxes (x1, y1, x2, y2)
    """

    scores: np.ndarray
    score_bound: np.ndarray
    distances: np.ndarray
    distance_bound: np.ndarray
    boxes: np.ndarray
    box_bound: np.ndarray


def integral_bounds(reg_logits, logit_bound, reg_max: int, *, u: float = FLOAT32_U,
                    tiny: float = SMALLEST_NORMAL["float32"]):
    """GFL's integral ``D = sum_k k softmax(z)_k`` (in bins, before the stride) of each side, and a
    bound on how far a backend's ``D`` may be from it when each logit is within ``logit_bound``
    of ``z`` and the softmax and the sum are computed at unit roundoff ``u``, values below ``tiny``
    (the format's smallest normal) possibly flushed to zero.

    reg_logits, logit_bound : (..., 4*(reg_max+1)) the oracle's logits (float64) and a bound per
    logit; returns ``(D, bound)``, both (..., 4). The derivation is in docs/tolerances.md:

    * carried: with ``d`` the logits' error (``|d_k| <= b_k``, ``B = max_k b_k``), along the path
      ``z + t d`` the softmax moves by ``dp/dt = p (d - <p, d>)``, so ``||p' - p||_1 <= min(2B,
      2 e^{2B} sum_k p_k b_k)`` (each ``p_k`` grows by at most ``e^{2B}`` on the way); as
      ``sum_k (p'_k - p_k) = 0``, ``|D' - D| = |sum_k (k - R/2)(p'_k - p_k)| <= (R/2) ||p' - p||_1``,
      and never more than ``R``;
    * own rounding: ``z_k - max z`` (``u |s_k|``), exp within 4 ulp (8u), so each ``e_k`` is off by
      ``theta_k = u |s_k| + 8u`` relatively; their sum by ``gamma_R + sum_j p_j theta_j``; the
      divide (or a reciprocal and a multiply) ``2u``: ``p_k`` within ``rel_k = theta_k + sum_j p_j
      theta_j + gamma_R + 2u``; the sum of ``R + 1`` products ``k p_k`` in any order adds
      ``gamma_{R+1} D``: ``sum_k k p_k rel_k + gamma_{R+1} D``. First order in u (products of u
      and the logits' error dropped, as everywhere in this module);
    * underflow: an ``e_k`` (the sum is >= 1), a ``p_k`` and a product ``k p_k`` below ``tiny`` may
      be flushed to zero (float32 ``exp(-104)`` is): ``(R + 1)^2 tiny`` in all.
    """
    from .detector.decode import integral, softmax

    reg_max = _nonnegative_int(reg_max, "reg_max")
    bins = reg_max + 1
    z = np.asarray(reg_logits, dtype=np.float64)
    if z.ndim == 0 or z.shape[-1] != 4 * bins:
        raise RefghostError(f"regression logits need 4*(reg_max+1) = {4 * bins} entries in the last axis, "
                            f"got shape {z.shape}")
    b = _bound_like(logit_bound, z, "logit_bound")
    value = integral(z, reg_max)  # the oracle's, bit for bit
    z, b = z.reshape(*z.shape[:-1], 4, bins), b.reshape(*z.shape[:-1], 4, bins)
    p = softmax(z, axis=-1)
    k = np.arange(bins, dtype=np.float64)
    big_b = b.max(axis=-1)
    weighted = np.sum(p * b, axis=-1)
    with np.errstate(over="ignore", invalid="ignore"):
        grown = np.where(weighted > 0, 2.0 * np.exp(2.0 * big_b) * weighted, 0.0)
    carried = np.minimum(reg_max, 0.5 * reg_max * np.minimum(2.0 * big_b, grown))
    theta = u * np.abs(z - z.max(axis=-1, keepdims=True)) + 8.0 * u
    rel = theta + np.sum(p * theta, axis=-1, keepdims=True) + gamma(reg_max, u) + 2.0 * u
    own = (p * rel) @ k + gamma(bins, u) * value + bins * bins * tiny
    return value, carried + own


def decode_bounds(output, output_bound, num_classes: int, reg_max: int, level_sizes, strides, prior_offset: float,
                  input_size, *, u: float = FLOAT32_U, tiny: float = SMALLEST_NORMAL["float32"]) -> DecodeBounds:
    """The oracle's scores, distances and boxes from the head output (as
    :func:`refghost.detector.decode.decode`), with bounds on how far a backend's may be when each
    output element is within ``output_bound`` of ``output`` (e.g. the bound :func:`error_bounds`
    gives the graph's output) and the decode is computed at unit roundoff ``u`` (values below
    ``tiny`` possibly flushed to zero).

    output, output_bound : (N, P, num_classes + 4*(reg_max+1)), the oracle's output (float64) and a
    bound per element; the other arguments as :func:`refghost.detector.decode.decode`'s.

    * scores: the output's class part itself, so its bound;
    * distances ``D * stride``: :func:`integral_bounds` times the stride, plus the multiply's ``u``
      (0 for a power-of-two stride, kept for any);
    * boxes ``clamp(c -/+ d, 0, W or H)``: the prior centre ``(j + offset) * stride`` is exact in
      float32 (a small multiple of 1/2), the add or subtract adds ``u |c -/+ d|``, and a clamp is
      1-Lipschitz: ``distance_bound + u |c -/+ d|``.
    """
    from .detector import decode as detector_decode

    num_classes = _nonnegative_int(num_classes, "num_classes")
    reg_max = _nonnegative_int(reg_max, "reg_max")
    out = np.asarray(output, dtype=np.float64)
    channels = num_classes + 4 * (reg_max + 1)
    if out.ndim != 3 or out.shape[2] != channels or num_classes < 1:
        raise RefghostError(f"output must be (N, P, num_classes + 4*(reg_max+1) = {channels}) with num_classes >= 1, "
                            f"got shape {out.shape}")
    bound = _bound_like(output_bound, out, "output_bound")
    centers, prior_strides = detector_decode.center_priors(level_sizes, strides, prior_offset, dtype=np.float64)
    if centers.shape[0] != out.shape[1]:
        raise RefghostError(f"output has {out.shape[1]} priors, the levels {[tuple(s) for s in level_sizes]} with "
                            f"strides {tuple(strides)} have {centers.shape[0]}")
    bins, bins_bound = integral_bounds(out[..., num_classes:], bound[..., num_classes:], reg_max, u=u, tiny=tiny)
    stride = prior_strides[:, None]
    distances = bins * stride
    distance_bound = bins_bound * stride + u * distances
    boxes = detector_decode.distance2bbox(centers, distances, input_size)
    x, y = centers[:, 0], centers[:, 1]
    unclamped = np.stack([x - distances[..., 0], y - distances[..., 1], x + distances[..., 2],
                          y + distances[..., 3]], axis=-1)
    box_bound = distance_bound + u * np.abs(unclamped)
    return DecodeBounds(out[..., :num_classes], bound[..., :num_classes], distances, distance_bound, boxes, box_bound)


def _nonnegative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise RefghostError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _bound_like(bound, value: np.ndarray, name: str) -> np.ndarray:
    """``bound`` as a float64 array of ``value``'s shape (broadcast), checked to be >= 0."""
    try:
        b = np.broadcast_to(np.asarray(bound, dtype=np.float64), value.shape)
    except (TypeError, ValueError):
        raise RefghostError(f"{name} must be a number or an array of shape {value.shape}") from None
    if not np.all(b >= 0):
        raise RefghostError(f"{name} must be >= 0 everywhere (and not NaN)")
    return b
