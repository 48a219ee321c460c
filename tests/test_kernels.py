"""The fast kernels of refghost.kernels against the plain ops of refghost.ops, from one table.

:data:`KERNELS` names every fast kernel of the interpreter's fast path with its plain op, the op
name under which :func:`refghost.testing.assert_matches_reference` judges it (the bound of
:mod:`refghost.bounds`: ``node_bound`` of one node, float64 oracle and underflow included), the
cases it is checked on (a fixed grid and a Hypothesis strategy) and when it must give exactly the
plain op's values. :func:`check` applies one row to one case: no tolerance is written here.

Both the fast kernel and the plain op are judged against the same oracle and bound. The oracle is
float64 through :func:`refghost.forward.evaluate`, whose default is the fast path itself; the
plain op, judged by the same oracle, keeps the check independent of it: a kernel wrong in both
dtypes moves the oracle, and then the plain op breaks the bound.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from conftest import numba_threads

from refghost import kernels, ops
from refghost.kernels.conv import conv2d_gemm
from refghost.kernels.depthwise import depthwise_conv2d
from refghost.kernels.elementwise import erf
from refghost.testing import ActivationCase, ConvCase, assert_matches_reference
from refghost.testing import strategies as rst

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Kernel:
    """One fast kernel and how it is judged.

    ``fast(case)`` and ``plain(case)`` compute the op on a case of refghost.testing; ``op`` is its
    name in :data:`refghost.testing.OPS` (None: judged by ``exact`` alone); ``grid()`` gives the
    fixed cases, ``cases`` draws more; ``exact(case)`` says when fast must give exactly the plain op's values;
    ``wrong(case)`` is the case with one weight (or input) flipped, for showing a wrong kernel fails.
    """

    fast: Callable
    plain: Callable
    op: str | None
    grid: Callable[[], list]
    cases: st.SearchStrategy
    exact: Callable[[object], bool]
    wrong: Callable


# --- the cases ----------------------------------------------------------------------------------


def _conv(impl):
    return lambda c: impl(c.x, c.w, c.b, stride=c.stride, padding=c.padding, groups=c.groups)


def _conv_case(rng, x_shape, o, k, dtype, *, stride, padding, groups, bias):
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((o, x_shape[1] // groups, k, k)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    return ConvCase(x, w, b, stride, padding, groups)


#: Input sides (H, W) of the depthwise grid, from smaller than the kernel to several blocks.
SIZES = [(1, 1), (2, 3), (5, 5), (7, 13), (23, 17), (11, 1), (4, 19)]
#: (K, stride, padding): K in {1, 3, 5}, stride in {1, 2, 3}, padding in {0, K//2, K//2 + 1}.
GRID = [(k, s, p) for k, s in itertools.product((1, 3, 5), (1, 2, 3)) for p in sorted({0, k // 2, k // 2 + 1})]


def _depthwise_grid():
    """Every (K, stride, padding) of GRID on every size, 1 and 5 channels, bias or not; and bigger
    planes with GhostNet's geometry (several accumulator blocks per plane, many chunks)."""
    cases = []
    for dtype, bias, (k, s, p) in itertools.product(DTYPES, (False, True), GRID):
        rng = np.random.default_rng(1000 * k + 100 * s + 10 * p + bias)
        for (n, c), (h, wd) in itertools.product([(1, 1), (2, 5)], SIZES):
            cases.append(_conv_case(rng, (n, c, h, wd), c, k, dtype, stride=s, padding=p, groups=c, bias=bias))
    for dtype, (k, s) in itertools.product(DTYPES, [(3, 1), (3, 2), (5, 1), (5, 2)]):
        rng = np.random.default_rng(k * 10 + s)
        cases.append(_conv_case(rng, (2, 6, 47, 33), 6, k, dtype, stride=s, padding=k // 2, groups=6, bias=True))
    return cases


def _dense_grid():
    """Dense convs: the 1x1 stride-1 product without im2col, the stem's 3x3/2, 5x5, odd sides."""
    cases = []
    for dtype, (c, o, k, s, p), bias in itertools.product(
            DTYPES, [(8, 16, 1, 1, 0), (3, 16, 3, 2, 1), (4, 5, 5, 1, 2), (2, 3, 3, 3, 0), (5, 7, 1, 2, 0)],
            (False, True)):
        rng = np.random.default_rng(100 * c + 10 * k + s)
        for h, wd in [(9, 9), (6, 13), (17, 4)]:
            cases.append(_conv_case(rng, (2, c, h, wd), o, k, dtype, stride=s, padding=p, groups=1, bias=bias))
    return cases


def _any_conv_grid():
    """What kernels.conv2d dispatches: dense (BLAS), depthwise (Numba), grouped and a channel
    multiplier (the plain op)."""
    cases = []
    for dtype, (c, o, g) in itertools.product(DTYPES, [(4, 6, 1), (6, 6, 6), (6, 9, 3), (3, 6, 3)]):
        rng = np.random.default_rng(10 * c + g)
        for k, s in [(1, 1), (3, 1), (3, 2), (5, 2)]:
            cases.append(_conv_case(rng, (1, c, 11, 8), o, k, dtype, stride=s, padding=k // 2, groups=g, bias=True))
    return cases


def _gelu_grid():
    """GELU's knee and tails: a fine ramp over [-6, 6], tiny and large magnitudes, both zeros."""
    rng = np.random.default_rng(3)
    x = np.concatenate([np.linspace(-6, 6, 4001), rng.uniform(-7, 7, 20000), rng.standard_normal(5000) * 1e-3,
                        [0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 30.0, -30.0, 1e4, -1e4]])
    return [ActivationCase(x.astype(dt), "GELU") for dt in DTYPES]


def _flip_weight(case):
    """The case with its largest weight negated: a kernel that reads it so is wrong."""
    w = case.w.copy()
    i = np.unravel_index(np.argmax(np.abs(w)), w.shape)
    w[i] = -w[i]
    return replace(case, w=w)


def _flip_input(case):
    """The case with its largest input negated (GELU and erf are not even: the output changes)."""
    x = case.x.copy()
    i = np.unravel_index(np.argmax(np.abs(x)), x.shape)
    x[i] = -x[i]
    return replace(case, x=x)


def _depthwise_exact(case):
    # A single product (then + bias): one rounding each, in the same order in both.
    return case.w.shape[2] == 1


def _conv2d_exact(case):
    """kernels.conv2d gives the plain op's values where it calls the plain op (grouped convs, a
    channel multiplier) and where the depthwise kernel does (K == 1); dense convs go to BLAS."""
    if case.groups == 1:
        return False
    return _depthwise_exact(case) if case.groups == case.x.shape[1] == case.w.shape[0] else True


_FLOATS = st.sampled_from(DTYPES)

KERNELS = {
    "conv2d": Kernel(_conv(kernels.conv2d), _conv(ops.conv2d), "conv2d", _any_conv_grid,
                     rst.conv_cases(dtype=_FLOATS), _conv2d_exact, _flip_weight),
    "conv2d_gemm": Kernel(lambda c: conv2d_gemm(c.x, c.w, c.b, stride=c.stride, padding=c.padding),
                          _conv(ops.conv2d), "conv2d", _dense_grid,
                          rst.conv_cases(depthwise=False, strides=(1, 2, 3), dtype=_FLOATS),
                          lambda case: False, _flip_weight),
    "depthwise_conv2d": Kernel(lambda c: depthwise_conv2d(c.x, c.w, c.b, stride=c.stride, padding=c.padding),
                               _conv(ops.conv2d), "conv2d", _depthwise_grid,
                               rst.conv_cases(depthwise=True, in_channels=st.integers(1, 8),
                                              kernel_sizes=(1, 3, 5), strides=(1, 2, 3), paddings=(0, 1, 2, 3),
                                              height=st.integers(1, 23), width=st.integers(1, 23),
                                              dtype=_FLOATS),
                               _depthwise_exact, _flip_weight),
    # Both evaluate libm's erf in float64 and round to the dtype: bit-identical.
    "erf": Kernel(lambda c: erf(c.x), lambda c: ops._erf(c.x), None, _gelu_grid,
                  rst.activation_cases(name="GELU", dtype=_FLOATS), lambda case: True, _flip_input),
    "GELU": Kernel(lambda c: kernels.activation("GELU", c.x), lambda c: ops.gelu(c.x), "GELU", _gelu_grid,
                   rst.activation_cases(name="GELU", dtype=_FLOATS), lambda case: True, _flip_input),
}


# --- the check ----------------------------------------------------------------------------------


def check(kernel: Kernel, case):
    """The kernel against its plain op on one case: the same errors, shape and dtype; the same values
    where ``kernel.exact``; both within the bound of refghost.bounds around the float64 oracle."""
    try:
        plain = kernel.plain(case)
    except ValueError:  # e.g. a kernel larger than the padded input
        with pytest.raises(ValueError):
            kernel.fast(case)
        return
    fast = kernel.fast(case)
    assert fast.shape == plain.shape
    assert fast.dtype == plain.dtype == case.x.dtype
    if kernel.exact(case):
        np.testing.assert_array_equal(fast, plain)  # NaN equals NaN; -0.0 equals 0.0
    if kernel.op is not None:
        policy = case.x.dtype.name
        assert_matches_reference(kernel.op, case, fast, policy=policy)
        assert_matches_reference(kernel.op, case, plain, policy=policy)


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_on_its_grid(name):
    kernel = KERNELS[name]
    for case in kernel.grid():
        check(kernel, case)


@pytest.mark.parametrize("name", KERNELS)
@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_kernel_on_drawn_cases(name, data):
    kernel = KERNELS[name]
    check(kernel, data.draw(kernel.cases, label="case"))


@pytest.mark.parametrize("name", KERNELS)
def test_a_wrong_kernel_fails_the_check(name):
    """The same kernel reading one weight (or input) with its sign flipped breaks ``check`` on the
    largest grid case, in both dtypes: the table can tell a wrong kernel."""
    kernel = KERNELS[name]
    wrong = replace(kernel, fast=lambda case: kernel.fast(kernel.wrong(case)))
    for dtype in DTYPES:
        case = max((c for c in kernel.grid() if c.x.dtype == dtype and _computable(kernel, c)), key=lambda c: c.x.size)
        with pytest.raises(AssertionError):
            check(wrong, case)


def _computable(kernel, case):
    try:
        return kernel.plain(case).size > 0
    except ValueError:
        return False


# --- depthwise: exact, hand-checkable cases -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride,pad",
                         [(3, 1, 1), (3, 2, 1), (5, 1, 2), (5, 2, 2), (5, 3, 3), (3, 2, 0)])
def test_depthwise_impulse(k, stride, pad, dtype):
    """One-hot input, weights 2**(a*K + e): each output is 0 or names the one tap that saw the 1.

    y[i, j] = w[a, e] exactly when s*i + a - p == h0 and s*j + e - p == w0, so a wrong row, column,
    stride or padding offset shows up as a wrong power of two (or a missing/extra one).
    """
    h, wd = 9, 8
    ho, wo = ops.conv_output_size(h, k, stride, pad), ops.conv_output_size(wd, k, stride, pad)
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
    ho, wo = ops.conv_output_size(h, k, stride, pad), ops.conv_output_size(wd, k, stride, pad)
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
    check(KERNELS["depthwise_conv2d"], ConvCase(x, w_nc, b, 2, 1, 3))


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
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2)])
def test_depthwise_deterministic_across_thread_counts(k, stride, dtype):
    case = _conv_case(np.random.default_rng(11), (2, 7, 40, 37), 7, k, dtype, stride=stride, padding=k // 2,
                      groups=7, bias=True)
    run = KERNELS["depthwise_conv2d"].fast
    with numba_threads(1):
        one = run(case)
    with numba_threads(2):
        two = run(case)
    assert one.tobytes() == two.tobytes()


# --- erf: special values ------------------------------------------------------------------------


def _erf_specials(dtype):
    finfo = np.finfo(dtype)
    return np.array([0.0, -0.0, finfo.smallest_subnormal, -finfo.smallest_subnormal, finfo.tiny, -finfo.tiny,
                     1e-30, -1e-30, 1e-8, -1e-8, 0.5, -0.5, 1.0, -1.0, 2.0, 3.0, -3.0, 5.9, 6.0, -6.0,
                     10.0, 30.0, -30.0, 1e30, -1e30, finfo.max, -finfo.max, np.inf, -np.inf, np.nan], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_erf_matches_plain_bit_for_bit(dtype):
    """On subnormals, the largest finite values, infinities and NaN, and on the table's grid:
    the same bits, the sign of -0.0 and the NaN payload included."""
    specials = ActivationCase(_erf_specials(dtype), "GELU")
    check(KERNELS["erf"], specials)
    uint = f"u{dtype.itemsize}"
    for case in [specials, *(c for c in KERNELS["erf"].grid() if c.x.dtype == dtype)]:
        np.testing.assert_array_equal(erf(case.x).view(uint), ops._erf(case.x).view(uint))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_erf_shapes_and_special_values(dtype):
    x = _erf_specials(dtype)[:24].reshape(2, 3, 4)
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_leaky_relu_fast_form_keeps_every_bit(dtype):
    """kernels.activation's LeakyReLU, max(x, 0.1x), against ops' where(x > 0, x, 0.1x): the same
    bits for signed zeros, subnormals, infinities, the largest values and random ones; NaN where
    the input is NaN."""
    info = np.finfo(dtype)
    special = np.array([0.0, -0.0, np.inf, -np.inf, info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 4,
                        info.max, -info.max, 1.0, -1.0, np.nan], dtype=dtype)
    x = np.concatenate([special, np.random.default_rng(7).standard_normal(4099).astype(dtype) * 30])
    fast, plain = kernels.activation("LeakyReLU", x), ops.leaky_relu(x)
    assert fast.dtype == plain.dtype == np.dtype(dtype)
    nan = np.isnan(x)
    np.testing.assert_array_equal(np.isnan(fast), nan)
    bits = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}[np.dtype(dtype)]
    np.testing.assert_array_equal(fast[~nan].view(bits), plain[~nan].view(bits))
