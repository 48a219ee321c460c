"""refghost.bounds itself: its closed forms on hand cases, how the bound moves with depth, width,
unit roundoff and policy, and that it is sharp (not vacuous) yet broken by wrong constants."""

from itertools import product

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings

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
    assert POLICIES["float16-weights"].u_weights == 2.0 ** -11 and POLICIES["float16-weights"].u_activations == 0
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
