"""refghost.bounds for the detector: the error rules of the ops NanoDet adds to GhostNet
(refghost.detector.ops, dispatched by refghost.forward.evaluate) and the decode's bounds
(integral_bounds, decode_bounds), each checked against float32-versus-float64 computations:

* own rounding: the op (or the decode) computed in float32, by refghost and by PyTorch, lies
  within the isolated bound (node_bound, inputs exact) of the float64 op;
* carried error: the float64 op on an input moved by any |d| <= b lies within the bound the rule
  carries from b (carried_bound with u = 0), in both models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refghost import bounds
from refghost.arch import Node
from refghost.bounds import FLOAT32_U, carried_bound, decode_bounds, integral_bounds, node_bound
from refghost.detector import decode as dd
from refghost.errors import RefghostError
from refghost.forward import evaluate

#: Single-input ops and the attrs NanoDet's graphs use (refghost.detector.graph).
SINGLE = {
    "max_pool": {"kernel": 3, "stride": 2, "padding": 1},
    "channel_shuffle": {"groups": 2},
    "slice": {"start": 1, "stop": 3},
    "upsample_x2": {"scale_factor": 2},
    "upsample_half": {"scale_factor": 0.5},
    "sigmoid_classes": {"num_classes": 3},
}


def _node(op):
    return Node("n", "upsample" if op.startswith("upsample") else op, ("input",), attrs=SINGLE[op])


def _torch(op, x):
    """PyTorch's float32 result of ``op`` (an honest backend), for the ops it has."""
    t = torch.from_numpy(x)
    with torch.no_grad():
        if op == "max_pool":
            return F.max_pool2d(t, 3, 2, 1).numpy()
        if op.startswith("upsample"):
            return F.interpolate(t, scale_factor=SINGLE[op]["scale_factor"], mode="bilinear",
                                 align_corners=False).numpy()
        if op == "sigmoid_classes":
            return torch.cat([torch.sigmoid(t[..., :3]), t[..., 3:]], dim=-1).numpy()
    return None


def _arrays(op, data, scale):
    """An input of the op's shape (N, C, H, W), or (N, P, C + rest) for sigmoid_classes."""
    shape = (1, 5, 7) if op == "sigmoid_classes" else (1, 4, data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)))
    if op == "upsample_half":
        shape = shape[:2] + (max(2, shape[2]), max(2, shape[3]))
    seed = data.draw(st.integers(0, 2 ** 32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(np.float32), rng


@settings(deadline=None, suppress_health_check=list(HealthCheck))
@given(op=st.sampled_from(sorted(SINGLE)), scale=st.sampled_from([1e-3, 1.0, 30.0]), data=st.data())
def test_own_rounding_within_isolated_bound(op, scale, data):
    """refghost's float32 op and PyTorch's on the same float32 input: within the isolated bound of
    the float64 op (the re-layouts and max-pool exactly)."""
    x, _ = _arrays(op, data, scale)
    node = _node(op)
    value, bound = node_bound(node, [x], {})
    for got in (evaluate(node, [x], {}), _torch(op, x)):
        if got is None:
            continue
        assert got.dtype == np.float32 and got.shape == value.shape
        assert (np.abs(got.astype(np.float64) - value) <= bound).all(), op
    if op in ("max_pool", "channel_shuffle", "slice"):
        assert not bound.any()  # exact


@settings(deadline=None, suppress_health_check=list(HealthCheck))
@given(op=st.sampled_from(sorted(SINGLE)), scale=st.sampled_from([0.1, 1.0, 30.0]),
       error=st.sampled_from([1e-6, 1e-2, 1.0, 5.0]), data=st.data())
def test_carried_error_within_bound(op, scale, error, data):
    """An input within b of x (any |d| <= b, the extremes +-b included): the float64 op moves by
    no more than the bound its rule carries from b, in both models (the probabilistic one taking
    b as lam standard deviations)."""
    x, rng = _arrays(op, data, scale)
    x = x.astype(np.float64)
    b = error * rng.uniform(0, 1, x.shape)
    d = b * rng.choice([-1.0, 1.0, 0.5, -0.3], x.shape)
    node = _node(op)
    change = np.abs(evaluate(node, [x + d], {}) - evaluate(node, [x], {}))
    for model in bounds.MODELS:
        _, bound = carried_bound(node, [x], [b], {}, u=0.0, model=model)
        assert (change <= bound * (1 + 1e-12) + 1e-15 * (1 + np.abs(x).max())).all(), (op, model)


def test_flatten_levels_carries_each_level_unchanged():
    rng = np.random.default_rng(0)
    levels = [rng.standard_normal((2, 3, h, w)) for h, w in [(4, 4), (2, 2), (1, 1)]]
    errs = [rng.uniform(0, 1e-3, a.shape) for a in levels]
    node = Node("head", "flatten_levels", ("a", "b", "c"))
    for model in bounds.MODELS:
        value, bound = carried_bound(node, levels, errs, {}, u=FLOAT32_U, model=model)
        assert value.shape == (2, 21, 3)
        np.testing.assert_allclose(bound, evaluate(node, errs, {}), rtol=1e-12)
    assert not node_bound(node, levels, {})[1].any()


def test_upsample_by_another_factor_has_no_rule():
    node = Node("n", "upsample", ("input",), attrs={"scale_factor": 1.5})
    with pytest.raises(ValueError, match="no error rule for upsample by 1.5"):
        node_bound(node, [np.ones((1, 1, 4, 4))], {})


def test_max_pool_bound_is_the_window_max():
    """The hand case: one large error in a window bounds that window's output, and only it."""
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    b = np.zeros_like(x)
    b[0, 0, 0, 0] = 0.5
    node = _node("max_pool")
    _, bound = carried_bound(node, [x], [b], {}, u=0.0)
    np.testing.assert_array_equal(bound, [[[[0.5, 0.0], [0.0, 0.0]]]])


# --- the decode -----------------------------------------------------------------------------------


def _logits(rng, shape, spread):
    return rng.standard_normal(shape) * spread


@settings(deadline=None, suppress_health_check=list(HealthCheck))
@given(reg_max=st.sampled_from([0, 1, 7, 16]), spread=st.sampled_from([0.1, 2.0, 10.0]),
       error=st.sampled_from([1e-7, 1e-3, 0.3, 3.0, 50.0]), seed=st.integers(0, 2 ** 32 - 1))
def test_integral_carried_error_within_bound(reg_max, spread, error, seed):
    """Logits moved by any |d_k| <= b_k (mostly the extremes): the float64 integral moves by no more
    than integral_bounds' carried bound (u = 0, no underflow), from tiny errors to ones that flip the argmax."""
    rng = np.random.default_rng(seed)
    z = _logits(rng, (6, 4 * (reg_max + 1)), spread)
    b = error * rng.uniform(0, 1, z.shape)
    for _ in range(4):
        d = b * rng.choice([-1.0, 1.0, 0.7], z.shape)
        moved = dd.integral(z + d, reg_max)
        value, bound = integral_bounds(z, b, reg_max, u=0.0, tiny=0.0)
        np.testing.assert_allclose(value, dd.integral(z, reg_max), rtol=1e-12, atol=1e-12)
        assert (np.abs(moved - value) <= bound * (1 + 1e-9) + 1e-12).all()
        assert (bound <= reg_max).all()


def _torch_integral(z, reg_max):
    """NanoDet's Integral in PyTorch float32: softmax over the bins, then F.linear with 0..reg_max."""
    t = torch.from_numpy(z).reshape(*z.shape[:-1], 4, reg_max + 1)
    with torch.no_grad():
        p = F.softmax(t, dim=-1)
        return F.linear(p, torch.linspace(0, reg_max, reg_max + 1, dtype=torch.float32)).numpy()


@settings(deadline=None, suppress_health_check=list(HealthCheck))
@given(reg_max=st.sampled_from([1, 7, 16]), spread=st.sampled_from([0.1, 2.0, 10.0, 40.0]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_integral_own_rounding_within_bound(reg_max, spread, seed):
    """refghost's and PyTorch's float32 integral of float32 logits: within the own-rounding bound of
    the float64 integral (exact logits)."""
    z = _logits(np.random.default_rng(seed), (64, 4 * (reg_max + 1)), spread).astype(np.float32)
    value, bound = integral_bounds(z, 0.0, reg_max)
    for got in (dd.integral(z, reg_max), _torch_integral(z, reg_max)):
        assert (np.abs(got.astype(np.float64) - value) <= bound).all()


STRIDES = (8, 16, 32, 64)


@settings(deadline=None, suppress_health_check=list(HealthCheck))
@given(side=st.sampled_from([32, 40, 64]), offset=st.sampled_from(sorted(dd.PRIOR_OFFSETS.values())),
       error=st.sampled_from([0.0, 1e-5, 0.05]), seed=st.integers(0, 2 ** 32 - 1))
def test_decode_within_bound(side, offset, error, seed):
    """A head output within its bound of the oracle's (the float32 output of a backend), decoded
    in float32: scores, distances and clamped boxes within decode_bounds of the oracle's decode."""
    num_classes, reg_max = 3, 7
    sizes = dd.head_level_sizes((side, side), STRIDES)
    priors = sum(h * w for h, w in sizes)
    rng = np.random.default_rng(seed)
    out = _logits(rng, (2, priors, num_classes + 4 * (reg_max + 1)), 3.0)
    out[..., :num_classes] = 1.0 / (1.0 + np.exp(-out[..., :num_classes]))
    b = error * rng.uniform(0, 1, out.shape)
    candidate = (out + b * rng.choice([-1.0, 1.0], out.shape)).astype(np.float32)
    # rounding out + d to float32 (and to float64 before) is an error of its own: within 2u |out + d|
    b = b + 2 * FLOAT32_U * (np.abs(out) + b)
    got_scores, got_boxes = dd.decode(candidate, num_classes, reg_max, sizes, STRIDES, offset, (side, side))
    ref = decode_bounds(out, b, num_classes, reg_max, sizes, STRIDES, offset, (side, side))
    want_scores, want_boxes = dd.decode(out, num_classes, reg_max, sizes, STRIDES, offset, (side, side))
    np.testing.assert_array_equal(ref.boxes, want_boxes)
    np.testing.assert_array_equal(ref.scores, want_scores)
    assert (np.abs(got_scores - ref.scores) <= ref.score_bound).all()
    assert (np.abs(got_boxes - ref.boxes) <= ref.box_bound).all()
    got_distances = dd.integral(candidate[..., num_classes:], reg_max) * dd.center_priors(
        sizes, STRIDES, offset, dtype=np.float32)[1][:, None]
    assert (np.abs(got_distances - ref.distances) <= ref.distance_bound).all()


def test_decode_bound_is_not_vacuous():
    """On exact float32 logits the own-rounding bound of the boxes is used by more than 1% (and the
    float32 decode differs somewhere): a sharp bound, not a blanket."""
    rng = np.random.default_rng(1)
    sizes = dd.head_level_sizes((64, 64), STRIDES)
    priors = sum(h * w for h, w in sizes)
    out = _logits(rng, (1, priors, 3 + 32), 3.0).astype(np.float32)
    ref = decode_bounds(out, 0.0, 3, 7, sizes, STRIDES, 0.0, (64, 64))
    _, boxes = dd.decode(out, 3, 7, sizes, STRIDES, 0.0, (64, 64))
    used = np.abs(boxes - ref.boxes) / np.where(ref.box_bound > 0, ref.box_bound, np.inf)
    assert 0.01 < used.max() <= 1.0


def test_decode_bounds_reject_bad_input():
    sizes = dd.head_level_sizes((32, 32), STRIDES)
    out = np.zeros((1, 21, 3 + 32))
    with pytest.raises(RefghostError, match="num_classes"):
        decode_bounds(out, 0.0, 4, 7, sizes, STRIDES, 0.0, (32, 32))
    with pytest.raises(RefghostError, match="priors"):
        decode_bounds(out, 0.0, 3, 7, sizes[:2], STRIDES[:2], 0.0, (32, 32))
    with pytest.raises(RefghostError, match="output_bound must be >= 0"):
        decode_bounds(out, -1.0, 3, 7, sizes, STRIDES, 0.0, (32, 32))
    with pytest.raises(RefghostError, match="reg_max"):
        integral_bounds(np.zeros((1, 8)), 0.0, -1)
    with pytest.raises(RefghostError, match="4\\*\\(reg_max\\+1\\)"):
        integral_bounds(np.zeros((1, 9)), 0.0, 1)
