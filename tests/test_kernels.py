"""The fast kernels in refghost.kernels against the plain ops in refghost.ops."""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from conftest import numba_threads

from refghost import ops
from refghost.kernels.depthwise import depthwise_conv2d
from refghost.kernels.elementwise import erf

DTYPES = (np.float32, np.float64)
UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}


def _gamma(m, u):
    """gamma_m = m*u / (1 - m*u), Higham's bound for m successive roundings."""
    return m * u / (1 - m * u)


def depthwise_tolerance(x, w, b, *, stride, padding):
    """Elementwise bound on |fast - plain| for a depthwise conv, derived from the summation error.

    Derivation. Each output is s = sum_{t=1..K*K} w_t*x_t (+ b). Both the fast kernel and the plain
    op form every product once (one rounding) and add the terms in some order (at most K*K - 1
    roundings on any term's path, plus one more for the bias). Whatever the order, recursive
    summation gives |computed - s| <= gamma_m * S with m = K*K (+1 with bias), u the unit roundoff
    of the dtype (2**-24 float32, 2**-53 float64) and S = sum |w_t*x_t| (+ |b|) (Higham, Accuracy
    and Stability of Numerical Algorithms, 2nd ed., eq. 3.4 and section 4.2; pairwise or blocked
    orders have smaller bounds). By the triangle inequality |fast - plain| <= 2 * gamma_m * S.

    S is computed as the plain conv of |x|, |w|, |b| in float64. Its terms are non-negative, so the
    computed S_hat >= S * (1 - gamma_m(2**-53)); dividing by that factor keeps the bound rigorous
    for float64 inputs too (for float32 it changes nothing visible). No underflow is assumed: the
    test data here are O(1).
    """
    k = w.shape[2]
    m = k * k + (b is not None)
    u = UNIT_ROUNDOFF[x.dtype]
    s_hat = ops.conv2d(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64),
                       None if b is None else np.abs(b).astype(np.float64),
                       stride=stride, padding=padding, groups=x.shape[1])
    return 2 * _gamma(m, u) * s_hat / (1 - _gamma(m, 2.0**-53))


def _random_case(rng, n, c, h, wd, k, dtype, bias):
    x = rng.standard_normal((n, c, h, wd)).astype(dtype)
    w = rng.standard_normal((c, 1, k, k)).astype(dtype)
    b = rng.standard_normal(c).astype(dtype) if bias else None
    return x, w, b


def check_depthwise(x, w, b, *, stride, padding):
    """Fast vs plain: same shape and dtype, within the derived bound, exactly equal when K == 1."""
    c, k = x.shape[1], w.shape[2]
    if x.shape[2] + 2 * padding < k or x.shape[3] + 2 * padding < k:
        with pytest.raises(ValueError):
            ops.conv2d(x, w, b, stride=stride, padding=padding, groups=c)
        with pytest.raises(ValueError):
            depthwise_conv2d(x, w, b, stride=stride, padding=padding)
        return
    plain = ops.conv2d(x, w, b, stride=stride, padding=padding, groups=c)
    fast = depthwise_conv2d(x, w, b, stride=stride, padding=padding)
    assert fast.shape == plain.shape
    assert fast.dtype == x.dtype == plain.dtype
    if k == 1:
        # A single product (then + bias): one rounding each, in the same order in both.
        np.testing.assert_array_equal(fast, plain)
    else:
        tol = depthwise_tolerance(x, w, b, stride=stride, padding=padding)
        err = np.abs(fast.astype(np.float64) - plain.astype(np.float64))
        assert np.all(err <= tol), f"max excess {np.max(err - tol)}"


# --- depthwise: parameter grid --------------------------------------------------------------

SIZES = [(1, 1), (2, 3), (5, 5), (7, 13), (23, 17), (11, 1), (4, 19)]


#: (K, stride, padding): K in {1, 3, 5}, stride in {1, 2, 3}, padding in {0, K//2, K//2 + 1}.
GRID = [(k, s, p) for k, s in itertools.product((1, 3, 5), (1, 2, 3))
        for p in sorted({0, k // 2, k // 2 + 1})]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("k,stride,pad", GRID)
def test_depthwise_grid(k, stride, pad, bias, dtype):
    rng = np.random.default_rng(1000 * k + 100 * stride + 10 * pad + bias)
    for n, c in [(1, 1), (2, 5)]:
        for h, wd in SIZES:
            x, w, b = _random_case(rng, n, c, h, wd, k, dtype, bias)
            check_depthwise(x, w, b, stride=stride, padding=pad)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_depthwise_ghostnet_like(k, stride, dtype):
    """Bigger planes and channel counts (several accumulator blocks per plane, many chunks)."""
    rng = np.random.default_rng(k * 10 + stride)
    x, w, b = _random_case(rng, 2, 6, 47, 33, k, dtype, True)
    check_depthwise(x, w, b, stride=stride, padding=k // 2)


# --- depthwise: hypothesis ------------------------------------------------------------------

@settings(deadline=None, max_examples=60)
@given(n=st.integers(1, 2), c=st.integers(1, 8), h=st.integers(1, 23), wd=st.integers(1, 23),
       k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2, 3]), pad_kind=st.integers(0, 2),
       bias=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_depthwise_hypothesis(n, c, h, wd, k, stride, pad_kind, bias, dtype, seed):
    pad = (0, k // 2, k // 2 + 1)[pad_kind]
    x, w, b = _random_case(np.random.default_rng(seed), n, c, h, wd, k, dtype, bias)
    check_depthwise(x, w, b, stride=stride, padding=pad)


# --- depthwise: exact, hand-checkable cases -------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("k,stride,pad",
                         [(3, 1, 1), (3, 2, 1), (5, 1, 2), (5, 2, 2), (5, 3, 3), (3, 2, 0)])
def test_depthwise_impulse(k, stride, pad, dtype):
    """One-hot input, weights 2**(a*K + e): each output is 0 or names the one tap that saw the 1.

    y[i, j] = w[a, e] exactly when s*i + a - p == h0 and s*j + e - p == w0, so a wrong row, column,
    stride or padding offset shows up as a wrong power of two (or a missing/extra one).
    """
    h, wd = 9, 8
    ho = (h + 2 * pad - k) // stride + 1
    wo = (wd + 2 * pad - k) // stride + 1
    positions = [(hh, ww) for hh in range(h) for ww in range(wd)]
    c = len(positions)  # one channel per impulse position
    x = np.zeros((1, c, h, wd), dtype)
    for ch, (hh, ww) in enumerate(positions):
        x[0, ch, hh, ww] = 1
    tap = (2.0 ** np.arange(k * k)).reshape(k, k)
    w = np.broadcast_to(tap, (c, 1, k, k)).astype(dtype)
    expected = np.zeros((1, c, ho, wo), dtype)
    for ch, (hh, ww) in enumerate(positions):
        for i in range(ho):
            for j in range(wo):
                a, e = hh + pad - stride * i, ww + pad - stride * j
                if 0 <= a < k and 0 <= e < k:
                    expected[0, ch, i, j] = tap[a, e]
    fast = depthwise_conv2d(x, w, stride=stride, padding=pad)
    np.testing.assert_array_equal(fast, expected)
    np.testing.assert_array_equal(ops.conv2d(x, w, stride=stride, padding=pad, groups=c), expected)


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (5, 2, 2), (5, 3, 1), (1, 2, 1)])
def test_depthwise_one_hot_weights(k, stride, pad):
    """One-hot weights at (a, e) on a ramp input: y[i, j] = xpad[s*i + a, s*j + e], exactly."""
    h, wd = 11, 7
    ramp = np.arange(1, h * wd + 1, dtype=np.float64).reshape(h, wd)
    taps = [(a, e) for a in range(k) for e in range(k)]
    c = len(taps)
    x = np.broadcast_to(ramp, (1, c, h, wd)).copy()
    w = np.zeros((c, 1, k, k))
    for ch, (a, e) in enumerate(taps):
        w[ch, 0, a, e] = 1
    b = np.arange(c, dtype=np.float64) * 1000  # exact: integers well below 2**53
    xp = np.pad(ramp, pad)
    ho = (h + 2 * pad - k) // stride + 1
    wo = (wd + 2 * pad - k) // stride + 1
    rows = slice(None, stride * (ho - 1) + 1, stride)
    cols = slice(None, stride * (wo - 1) + 1, stride)
    expected = np.stack([xp[a:, e:][rows, cols] + 1000 * ch
                         for ch, (a, e) in enumerate(taps)])[None]
    np.testing.assert_array_equal(depthwise_conv2d(x, w, b, stride=stride, padding=pad), expected)


def test_depthwise_non_contiguous_input():
    rng = np.random.default_rng(7)
    base = rng.standard_normal((3, 2, 20, 30)).astype(np.float32)
    x = base.transpose(1, 0, 2, 3)[:, :, ::2, 1::2]  # (2, 3, 10, 15), no unit stride anywhere
    w = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)
    w_nc = np.asfortranarray(w)
    b = rng.standard_normal(6).astype(np.float32)[::2]
    fast = depthwise_conv2d(x, w_nc, b, stride=2, padding=1)
    ref = depthwise_conv2d(np.ascontiguousarray(x), w, np.ascontiguousarray(b), stride=2, padding=1)
    np.testing.assert_array_equal(fast, ref)
    check_depthwise(x, w_nc, b, stride=2, padding=1)


def test_depthwise_nan_inf_propagate():
    x = np.ones((1, 2, 6, 6))
    x[0, 0, 2, 3] = np.nan
    x[0, 1, 4, 4] = np.inf
    w = np.ones((2, 1, 3, 3))
    fast = depthwise_conv2d(x, w, stride=1, padding=1)
    plain = ops.conv2d(x, w, stride=1, padding=1, groups=2)
    np.testing.assert_array_equal(fast, plain)  # NaN == NaN here; inf sums are exact


def test_depthwise_rejects_bad_arguments():
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError):  # channel multiplier 2
        depthwise_conv2d(x, np.zeros((8, 1, 3, 3), np.float32))
    with pytest.raises(ValueError):  # not depthwise (C/groups != 1)
        depthwise_conv2d(x, np.zeros((4, 2, 3, 3), np.float32))
    with pytest.raises(ValueError):  # non-square kernel
        depthwise_conv2d(x, np.zeros((4, 1, 3, 5), np.float32))
    with pytest.raises(ValueError):  # dtype mismatch
        depthwise_conv2d(x, np.zeros((4, 1, 3, 3), np.float64))
    with pytest.raises(ValueError):
        depthwise_conv2d(x, np.zeros((4, 1, 3, 3), np.float32), stride=0)
    with pytest.raises(ValueError):
        depthwise_conv2d(x, np.zeros((4, 1, 3, 3), np.float32), padding=-1)
    with pytest.raises(ValueError):  # kernel larger than the padded input
        depthwise_conv2d(x[:, :, :2, :2], np.zeros((4, 1, 5, 5), np.float32))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs a Numba pool of 2 threads")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2)])
def test_depthwise_deterministic_across_thread_counts(k, stride, dtype):
    rng = np.random.default_rng(11)
    x, w, b = _random_case(rng, 2, 7, 40, 37, k, dtype, True)
    with numba_threads(1):
        one = depthwise_conv2d(x, w, b, stride=stride, padding=k // 2)
    with numba_threads(2):
        two = depthwise_conv2d(x, w, b, stride=stride, padding=k // 2)
    assert one.tobytes() == two.tobytes()


# --- erf ----------------------------------------------------------------------------------

def _erf_inputs(dtype):
    finfo = np.finfo(dtype)
    special = [0.0, -0.0, finfo.smallest_subnormal, -finfo.smallest_subnormal,
               finfo.tiny, -finfo.tiny,
               1e-30, -1e-30, 1e-8, -1e-8, 0.5, -0.5, 1.0, -1.0, 2.0, 3.0, -3.0, 5.9, 6.0, -6.0,
               10.0, 30.0, -30.0, 1e30, -1e30, finfo.max, -finfo.max, np.inf, -np.inf, np.nan]
    rng = np.random.default_rng(3)
    spread = np.concatenate([rng.uniform(-7, 7, 20000), rng.standard_normal(5000) * 1e-3,
                             np.linspace(-6, 6, 4001)])
    return np.concatenate([np.array(special, dtype), spread.astype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_erf_matches_plain_exactly(dtype):
    """Both evaluate libm erf in float64 and round to dtype: bit-identical, NaN included."""
    x = _erf_inputs(dtype)
    fast = erf(x)
    plain = ops._erf(x)
    assert fast.dtype == plain.dtype == dtype
    uint = np.uint32 if dtype == np.float32 else np.uint64
    # Bitwise: also checks the sign of -0.0 and the NaN bits.
    np.testing.assert_array_equal(fast.view(uint), plain.view(uint))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_erf_shapes_and_special_values(dtype):
    x = _erf_inputs(dtype)[:24].reshape(2, 3, 4)
    out = erf(x.transpose(2, 0, 1))  # non-contiguous, 3-D
    assert out.shape == (4, 2, 3) and out.dtype == dtype
    np.testing.assert_array_equal(out, ops._erf(np.ascontiguousarray(x.transpose(2, 0, 1))))
    special = erf(np.array([np.nan, np.inf, -np.inf, -0.0], dtype))
    assert np.isnan(special[0]) and special[1] == 1 and special[2] == -1
    assert special[3] == 0 and np.signbit(special[3])
    assert erf(np.zeros((0, 3), dtype)).shape == (0, 3)


def test_erf_rejects_non_float():
    with pytest.raises(ValueError):
        erf(np.arange(3))
