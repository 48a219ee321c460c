"""refghost.bounds itself: its closed forms on hand cases, how the bound moves with depth, width,
unit roundoff and policy, and that it is sharp (not vacuous) yet broken by wrong constants."""

from itertools import product

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from conftest import random_weights
from refghost import bounds, ops
from refghost.arch import Config, Graph, Node
from refghost.bounds import FLOAT32_U, FLOAT64_U, POLICIES, UNIT_ROUNDOFF, error_bounds, gamma, node_bound
from refghost.testing import ActivationCase, BatchNormCase, BatchNormParams, assert_matches_reference
from refghost.testing import strategies as rst

#: u of the float64 oracle, which node_bound and segment_bound add to the backend's u.
ORACLE = FLOAT64_U


def _conv(name, src, c_in, c_out, k=1, *, bias=False):
    params = {"weight": f"{name}.weight", **({"bias": f"{name}.bias"} if bias else {})}
    return Node(name, "conv", (src,), params, {"stride": 1, "padding": k // 2, "groups": 1})


def _chain(nodes):
    return Graph(Config(), nodes, {"output": nodes[-1].name}, {})


def _identity_chain(depth, c):
    """``depth`` 1x1 convs whose weights are the C x C identity: values pass through exactly."""
    nodes = [_conv(f"c{i}", "input" if i == 0 else f"c{i - 1}", c, c) for i in range(depth)]
    return _chain(nodes), {f"c{i}.weight": np.eye(c)[:, :, None, None] for i in range(depth)}


# --- closed forms -------------------------------------------------------------------------------


def test_gamma():
    """gamma_n = n u / (1 - n u): 0 for no rounding, just above n u, increasing in n."""
    assert gamma(0, FLOAT32_U) == 0
    assert gamma(1, FLOAT32_U) == FLOAT32_U / (1 - FLOAT32_U)
    n = np.arange(1, 1000)
    g = gamma(n, FLOAT32_U)
    assert (g > n * FLOAT32_U).all() and (np.diff(g) > 0).all()


@pytest.mark.parametrize("c", [1, 2, 9, 64])
def test_one_conv_of_ones_by_hand(c):
    """A 1x1 conv of C ones with weights 1: the value is C, a sum of C products, and its bound is
    gamma_C at the backend's u plus the oracle's, times sum |w x| = C."""
    node = _conv("c", "input", c, 1)
    value, bound = node_bound(node, [np.ones((1, c, 2, 2))], {"c.weight": np.ones((1, c, 1, 1))})
    np.testing.assert_array_equal(value, np.full((1, 1, 2, 2), c))
    np.testing.assert_array_equal(bound, np.full((1, 1, 2, 2), gamma(c, FLOAT32_U + ORACLE) * c))


def test_exact_ops_have_zero_bound():
    """ReLU, ReLU6, Identity and a concat round nothing; on exact inputs their bound is 0."""
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3))
    for name in ("ReLU", "ReLU6", "Identity"):
        _, bound = node_bound(Node("a", "act", ("input",), attrs={"activation": name}), [x], {})
        assert not bound.any(), name
    _, bound = node_bound(Node("cat", "concat", ("input", "input")), [x, x], {})
    assert bound.shape == (1, 4, 3, 3) and not bound.any()


def test_zero_roundoff_gives_zero_bound():
    """With u = 0 nothing is rounded: the bound of every node of a whole network is 0, in both models."""
    weights = random_weights(Config(width=0.25), seed=1)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32))
    for model in bounds.MODELS:
        _, b = error_bounds(weights.graph, weights.params("float64"), x, u=0.0, model=model)
        assert not any(v.any() for v in b.values()), model


def test_zero_input_and_weights_give_zero_bound():
    node = _conv("c", "input", 3, 4, 3, bias=True)
    params = {"c.weight": np.zeros((4, 3, 3, 3)), "c.bias": np.zeros(4)}
    _, bound = node_bound(node, [np.zeros((1, 3, 5, 5))], params)
    assert not bound.any()


# --- how the bound moves ------------------------------------------------------------------------


def test_worst_case_bound_grows_linearly_with_depth():
    """Through k identity convs every layer adds its own rounding gamma_C |x| (C products, the zero
    ones included) and carries the rest: after layer k the worst-case bound is k * gamma_C * |x|
    to first order, increasing with depth."""
    depth, c = 6, 3
    graph, params = _identity_chain(depth, c)
    x = np.random.default_rng(2).standard_normal((1, c, 4, 4))
    _, b = error_bounds(graph, params, x, model="worst")
    for k in range(1, depth + 1):
        np.testing.assert_allclose(b[f"c{k - 1}"], k * gamma(c, FLOAT32_U) * np.abs(x), rtol=1e-6)
    assert all((b[f"c{k}"] > b[f"c{k - 1}"]).all() for k in range(1, depth))


def test_probabilistic_bound_grows_with_depth():
    graph, params = _identity_chain(6, 3)
    x = np.random.default_rng(2).standard_normal((1, 3, 4, 4))
    _, b = error_bounds(graph, params, x)
    assert all((b[f"c{k}"] > b[f"c{k - 1}"]).all() for k in range(1, 6))


def test_bound_grows_with_width():
    """More products per output (channels, or a wider kernel) on the same positive data: a larger
    bound, element by element."""
    plane = np.abs(np.random.default_rng(3).standard_normal((1, 1, 7, 7)))
    previous = None
    for c, k in [(1, 1), (2, 1), (2, 3), (8, 3), (8, 5), (32, 5)]:
        node = _conv("c", "input", c, 2, k, bias=True)
        x = plane.repeat(c, axis=1)
        params = {"c.weight": np.full((2, c, k, k), 0.5), "c.bias": np.ones(2)}
        _, bound = node_bound(node, [x], params)
        if previous is not None:
            assert (bound > previous).all(), (c, k)
        previous = bound


def test_float64_bound_far_below_float32():
    """Every bound is first order in u: float64's is 2^-29 of float32's, on a whole network."""
    weights = random_weights(Config(width=0.25), seed=4)
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32))
    p = weights.params("float64")
    _, b32 = error_bounds(weights.graph, p, x, u=FLOAT32_U)
    _, b64 = error_bounds(weights.graph, p, x, u=FLOAT64_U)
    ratio = FLOAT64_U / FLOAT32_U
    for name in b32:
        assert (b64[name] <= 1.001 * ratio * b32[name]).all(), name
        assert (b64[name] >= 0.999 * ratio * b32[name]).all(), name


# --- policies -----------------------------------------------------------------------------------


def test_as_policy():
    for name, policy in POLICIES.items():
        assert bounds.as_policy(name) is policy and bounds.as_policy(policy) is policy
        assert policy.u == UNIT_ROUNDOFF[policy.arithmetic]
    with pytest.raises(ValueError, match="policy must be one of"):
        bounds.as_policy("float8")
    f32 = POLICIES["float32"]
    assert f32.u_weights == f32.u_activations == f32.tiny_weights == f32.tiny_activations == 0
    # a whole ulp: converters may truncate (MNN's --fp16 does); tensors are converted to nearest
    assert POLICIES["float16-weights"].u_weights == 2.0 ** -10 and POLICIES["float16-weights"].u_activations == 0
    assert POLICIES["float16-storage"].u_activations == 2.0 ** -11
    assert POLICIES["bfloat16-storage"].u_weights == 2.0 ** -7  # a whole ulp: truncation
    assert POLICIES["float16"].u_activations == 0  # stored as computed


def _as_wide(p, q):
    """p rounds no more than q in each of arithmetic, weights and activations."""
    return all(UNIT_ROUNDOFF[getattr(p, f)] <= UNIT_ROUNDOFF[getattr(q, f)]
               for f in ("arithmetic", "weights", "activations"))


def test_policy_bounds_follow_the_formats():
    """A policy at least as wide as another in each of its three formats has a bound no larger,
    element by element; the "float32" policy is the default u = 2^-24 exactly."""
    rng = np.random.default_rng(5)
    node = _conv("c", "input", 4, 5, 3, bias=True)
    x = rng.standard_normal((1, 4, 6, 6))
    params = {"c.weight": rng.standard_normal((5, 4, 3, 3)), "c.bias": rng.standard_normal(5)}
    bound = {name: node_bound(node, [x], params, policy=name)[1] for name in POLICIES}
    np.testing.assert_array_equal(bound["float32"], node_bound(node, [x], params)[1])
    pairs = [(p, q) for p, q in product(POLICIES.values(), repeat=2) if p is not q and _as_wide(p, q)]
    assert len(pairs) >= 5
    for p, q in pairs:
        assert (bound[p.name] <= bound[q.name]).all(), (p.name, q.name)


def test_unknown_model_is_rejected():
    node = _conv("c", "input", 1, 1)
    with pytest.raises(ValueError, match="model must be one of"):
        node_bound(node, [np.ones((1, 1, 1, 1))], {"c.weight": np.ones((1, 1, 1, 1))}, model="average")


# --- sharp, and broken by wrong constants -------------------------------------------------------


#: Cases each accumulating op draws for the tightness test (derandomized: the same cases every run).
TIGHTNESS_CASES = 40

def _plain_conv(case):
    return ops.conv2d(case.x, case.w, case.b, stride=case.stride, padding=case.padding, groups=case.groups)


def _plain_batch_norm(x, bn):
    return ops.batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, eps=bn.eps)


#: The accumulating ops, each with its strategy and refghost's plain float32 evaluation of a case.
ACCUMULATING = {
    "conv2d": (rst.conv_cases(), _plain_conv),
    "batch_norm": (rst.batch_norm_cases(), lambda case: _plain_batch_norm(case.x, case.bn)),
    "conv_bn": (rst.conv_bn_cases(), lambda case: _plain_batch_norm(_plain_conv(case.conv), case.bn)),
    "linear": (rst.linear_cases(), lambda case: ops.linear(case.x, case.w, case.b)),
}


@pytest.mark.parametrize("op", ACCUMULATING)
def test_bounds_are_not_vacuous(op):
    """Over its own drawn float32 cases, the measured error of an accumulating op reaches >1% of
    the bound: the bound is a sharp instrument, not a blanket (tools/bound_usage.py for more)."""
    strategy, plain = ACCUMULATING[op]
    fractions = []

    @settings(max_examples=TIGHTNESS_CASES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def draw(case):
        fractions.append(assert_matches_reference(op, case, plain(case)))

    draw()
    assert len(fractions) == TIGHTNESS_CASES
    q = np.quantile(fractions, [0.5, 0.9, 1.0])
    print(f"{op:<12} {len(fractions)} cases   q50 {q[0]:.3g}   q90 {q[1]:.3g}   max {q[2]:.3g}")
    assert max(fractions) > 0.01, (op, sorted(fractions)[-5:])


def test_bound_rejects_wrong_constants():
    """Classic porting bugs: BN eps 1e-3 instead of 1e-5 (caught on the tiny-variance channel), and
    PyTorch's default LeakyReLU slope 0.01 instead of NanoDet's 0.1."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    bn = BatchNormParams(np.ones(2, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32),
                         np.array([1.0, 1e-6], np.float32))
    case = BatchNormCase(x, bn)
    wrong = ops.batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, eps=1e-3)
    with pytest.raises(AssertionError, match="elements outside the derived bound"):
        assert_matches_reference("batch_norm", case, wrong)
    act = ActivationCase(x, "LeakyReLU")
    with pytest.raises(AssertionError, match=r"16 of 32 elements|elements outside"):
        assert_matches_reference("LeakyReLU", act, ops.leaky_relu(x, 0.01))


# --- piecewise activations: the slope over the whole reach -------------------------------------

#: Where each function's slope jumps or peaks (bounds.SLOPES): the places an interval must cross.
KNEES = {"Identity": (0.0,), "ReLU": (0.0,), "ReLU6": (0.0, 6.0), "LeakyReLU": (0.0,), "PReLU": (0.0,),
         "ELU": (0.0,), "SELU": (0.0,), "HardSwish": (-3.0, 3.0), "SiLU": (-2.4, 2.4), "GELU": (-1.41, 1.41),
         "hard_sigmoid": (-3.0, 3.0)}
assert set(KNEES) == set(ops.ACTIVATIONS) | {"hard_sigmoid"}


def _act_node(name, src="input"):
    if name == "hard_sigmoid":
        return Node("f", "hard_sigmoid", (src,))
    return Node("f", "act", (src,), {"weight": "f.weight"} if name == "PReLU" else {}, {"activation": name})


def _f64(name, x, prelu_slope):
    """The function itself in float64."""
    if name == "hard_sigmoid":
        return ops.hard_sigmoid(x)
    return ops.activation(name, x, np.array([prelu_slope]) if name == "PReLU" else None)


def _carried_through(name, x, reach, model, prelu_slope):
    """The bound of f on x when its input is within ``reach`` (rigorous, or lam sigma) of x, with
    no rounding (u = 0): the input error alone, carried by error_bounds' rule for f."""
    graph = _chain([Node("a", "act", ("input",), attrs={"activation": "Identity"}), _act_node(name, "a")])
    seeded = reach if model == "worst" else (reach / bounds.DEFAULT_LAMBDA) ** 2

    def input_error(node, ins, p):
        return seeded if node.name == "a" else None

    params = {"f.weight": np.array([prelu_slope])}
    _, b = error_bounds(graph, params, x, u=0.0, model=model, extra=input_error)
    return b["f"]


_REACHES = st.one_of(st.just(0.0), st.floats(1e-6, 8.0))  # (the variance of a subnormal reach underflows)
_FRACTIONS = st.one_of(st.sampled_from([-1.0, 1.0]), st.floats(-1.0, 1.0))  # d / reach, the ends included


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(sorted(KNEES)), data=st.data(), prelu_slope=st.floats(-2.0, 2.0),
       points=st.lists(st.tuples(st.floats(-7.0, 7.0), _REACHES, _FRACTIONS), min_size=1, max_size=8))
@example(name="ReLU6", data=None, prelu_slope=0.0, points=[(-6.5, 7.0, 0.5006)])  # -0.5 -> 0.0006 across [0, 6]
@example(name="HardSwish", data=None, prelu_slope=0.0, points=[(0.01, 0.5, -1.0)])  # 3.01 -> 2.51, slope 1.5 at 3-
@example(name="SELU", data=None, prelu_slope=0.0, points=[(0.01, 1.0, -1.0)])  # slope scale*alpha at 0-
def test_activation_bound_holds_over_the_whole_reach(name, data, prelu_slope, points):
    """For every activation and the hard-sigmoid, x near a knee (or a peak of the slope), a reach
    that may span one or both knees, and any input error |d| <= reach: |f(x + d) - f(x)| in float64
    is within the bound carried by the node's rule (worst-case and probabilistic models)."""
    knee = KNEES[name][-1] if data is None else data.draw(st.sampled_from(KNEES[name]), label="knee")
    offsets, reach, fraction = (np.array(v).reshape(1, 1, 1, -1) for v in zip(*points))
    x = knee + offsets
    moved = x + fraction * reach
    change = np.abs(_f64(name, moved, prelu_slope) - _f64(name, x, prelu_slope))
    slack = 16 * FLOAT64_U * (np.abs(_f64(name, moved, prelu_slope)) + np.abs(_f64(name, x, prelu_slope)) + reach)
    for model in bounds.MODELS:
        bound = _carried_through(name, x, reach, model, prelu_slope)
        assert (change <= bound * (1 + 1e-12) + slack).all(), (model, x, moved, change, bound)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(sorted(set(bounds.SLOPES) | {"LeakyReLU"})),
       knee=st.sampled_from([-3.0, -1.41, 0.0, 2.4, 3.0, 6.0]), x_offset=st.floats(-4.0, 4.0),
       other_offset=st.floats(-8.0, 8.0))
def test_slope_sup_is_a_lipschitz_constant_of_the_interval(name, knee, x_offset, other_offset):
    """slope_sup(lo, hi) bounds |f(b) - f(a)| / |b - a| for any a, b in [lo, hi]: the change of f
    between x and any point within reach of it, knees and peaks of the slope in between."""
    functions = {**{n: (lambda t, n=n: ops.activation(n, t)) for n in ops.ACTIVATIONS if n != "PReLU"},
                 "HardSigmoid": ops.hard_sigmoid, "Sigmoid": lambda t: 1.0 / (1.0 + np.exp(-t))}
    f = functions[name]
    a, b = np.array([knee + x_offset]), np.array([knee + x_offset + other_offset])
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    lip = bounds.slope_sup(name, lo, hi)
    change = np.abs(f(b) - f(a))
    assert change <= lip * np.abs(b - a) * (1 + 1e-12) + 16 * FLOAT64_U * (np.abs(f(a)) + np.abs(f(b))), (lo, hi, lip)
    # and every chord of a grid over [lo, hi]: the supremum holds inside the interval, not only at its ends
    grid = np.linspace(lo[0], hi[0], 401)
    values = f(grid)
    steps = np.diff(grid)
    chords = np.abs(np.diff(values))[steps > 1e-6] / steps[steps > 1e-6]
    assert (chords <= lip[0] * (1 + 1e-6)).all(), (lo, hi, lip, chords.max())


def test_relu6_error_across_the_linear_part_regression():
    """Issue 24: an honest ReLU6 output of 0.00058 where the oracle is 0. The oracle's input is -0.5,
    and the input's error may reach 7 (a low-precision backend deep in the network): the interval
    [-7.5, 6.5] crosses the whole linear part while its ends and its centre sit in the flat parts,
    so a slope sampled at x and x -/+ reach is 0 everywhere and gave the bound 0."""
    x = np.full((1, 1, 1, 1), -0.5)
    candidate_input = np.float32(0.00058)  # within 7 of -0.5
    candidate = ops.relu6(np.array([candidate_input]))[0]
    for model in bounds.MODELS:
        bound = _carried_through("ReLU6", x, np.full(x.shape, 7.0), model, 0.0)
        assert ops.relu6(x)[0, 0, 0, 0] == 0 and candidate == np.float32(0.00058)
        assert abs(float(candidate) - 0.0) <= bound[0, 0, 0, 0], model
        np.testing.assert_allclose(bound, 7.0, rtol=1e-12)  # slope 1 over the whole reach


def test_slope_sup_rejects_bad_input():
    with pytest.raises(bounds.RefghostError, match="no slope known"):
        bounds.slope_sup("Swish", 0.0, 1.0)
    with pytest.raises(bounds.RefghostError, match="lo <= hi"):
        bounds.slope_sup("ReLU", 1.0, 0.0)
    with pytest.raises(bounds.RefghostError, match="PReLU needs"):
        bounds.slope_sup("PReLU", 0.0, 1.0)


@pytest.mark.parametrize("activation", ["LeakyReLU", "HardSwish", "ReLU6", "SiLU"])
def test_a_covering_policy_bounds_at_least_as_much(activation):
    """refghost.bounds.covers(a, b): every roundoff of a is at least b's, so every bound under a
    is at least the bound under b, accumulated and isolated: what lets the diagnosis re-judge only
    the tensors that failed under b (refghost.verify.compare._diagnose)."""
    from refghost.arch import Config, build_graph
    from refghost.bounds import POLICIES, covers, error_bounds, segment_bound
    from refghost.testing import random_params

    graph = build_graph(Config(width=0.25, activation=activation))
    params = {k: v.astype(np.float64) for k, v in random_params(graph, seed=5).items()}
    x = np.random.default_rng(5).standard_normal((1, 3, 48, 48))
    accumulated = {name: error_bounds(graph, params, x, policy=name)[1] for name in POLICIES}
    values = error_bounds(graph, params, x)[0]
    leaves = {"input": x, **values}
    pairs = [(a, b) for a in POLICIES for b in POLICIES if a != b and covers(a, b)]
    assert ("float16", "float32") in pairs and ("bfloat16-storage", "float16-weights") not in pairs
    for a, b in pairs:
        for node in graph.nodes:
            assert (accumulated[a][node.name] >= accumulated[b][node.name]).all(), (a, b, node.name)
        for node in graph.nodes[::7]:
            _, bound_a = segment_bound(graph, [node.name], leaves, params, policy=a, eta=POLICIES[a].eta)
            _, bound_b = segment_bound(graph, [node.name], leaves, params, policy=b, eta=POLICIES[b].eta)
            assert (bound_a >= bound_b).all(), (a, b, node.name)
