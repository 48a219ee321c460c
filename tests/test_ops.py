"""refghost.ops on small literal cases whose results a person can work out by hand.

Every value here is exact in binary floating point (small integers, halves, quarters), so each
assertion is an equality; where a result involves exp or erf it is compared with Python's math
module, which is what the op is defined with.
"""

import math
import warnings

import numpy as np
import pytest

from refghost import kernels, ops
from refghost.forward import execute
from refghost.testing import GhostModuleConfig

DTYPES = (np.float32, np.float64)


# --- convolution ----------------------------------------------------------------------------


def _two_channel_input(dtype):
    """(1, 2, 4, 4): channel 0 counts 0..15 row by row, channel 1 is all ones."""
    return np.stack([np.arange(16).reshape(4, 4), np.ones((4, 4))])[None].astype(dtype)


def _ones_and_twos(dtype):
    """(1, 2, 3, 3): 1 on every tap of channel 0, 2 on every tap of channel 1."""
    return np.stack([np.ones((3, 3)), 2 * np.ones((3, 3))])[None].astype(dtype)


@pytest.mark.parametrize("conv2d", [ops.conv2d, kernels.conv2d], ids=["plain", "kernels"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv3x3_on_a_two_channel_4x4_input(conv2d, dtype):
    """Each output: the 3x3 window sum of channel 0, plus 2 * (number of taps inside channel 1),
    plus the bias 0.5. Unpadded, the four windows of 0..15 sum to 45, 54, 81, 90 (+ 18 + 0.5)."""
    x, w, b = _two_channel_input(dtype), _ones_and_twos(dtype), np.array([0.5], dtype)
    np.testing.assert_array_equal(conv2d(x, w, b), [[[[63.5, 72.5], [99.5, 108.5]]]])
    # padding 1: the corner window sees 0, 1, 4, 5 (= 10) and 4 ones (2 * 4 = 8)
    same = conv2d(x, w, b, padding=1)
    assert same.shape == (1, 1, 4, 4)
    assert same[0, 0, 0, 0] == 10 + 8 + 0.5
    assert same[0, 0, 1, 1] == 63.5  # an inner window: as unpadded
    # stride 2, padding 1: the windows centred on (0, 0), (0, 2), (2, 0), (2, 2)
    np.testing.assert_array_equal(conv2d(x, w, b, stride=2, padding=1),
                                  [[[[18.5, (1 + 2 + 3 + 5 + 6 + 7) + 12 + 0.5],
                                     [(4 + 5 + 8 + 9 + 12 + 13) + 12 + 0.5, 108.5]]]])


@pytest.mark.parametrize("conv2d", [ops.conv2d, kernels.conv2d], ids=["plain", "kernels"])
def test_conv_is_cross_correlation_not_convolution(conv2d):
    """A single 1 at the top-left tap picks the top-left of each window (PyTorch's Conv2d); a true
    convolution (flipped kernel) would pick the bottom-right."""
    x = _two_channel_input(np.float64)[:, :1]
    w = np.zeros((1, 1, 3, 3))
    w[0, 0, 0, 0] = 1
    np.testing.assert_array_equal(conv2d(x, w), [[[[0, 1], [4, 5]]]])


@pytest.mark.parametrize("conv2d", [ops.conv2d, kernels.conv2d], ids=["plain", "kernels"])
def test_grouped_and_depthwise_conv_keep_their_channels_apart(conv2d):
    """groups=2 on the two-channel input with 3x3 ones: channel 0's windows of 0..15, channel 1's
    windows of ones (9 each). Output channel o reads input group o // (O / groups)."""
    x = _two_channel_input(np.float64)
    w = np.ones((2, 1, 3, 3))
    np.testing.assert_array_equal(conv2d(x, w, groups=2), [[[[45, 54], [81, 90]], [[9, 9], [9, 9]]]])
    w4 = np.stack([np.ones((1, 3, 3)), 2 * np.ones((1, 3, 3)), np.ones((1, 3, 3)), 3 * np.ones((1, 3, 3))])
    y = conv2d(x, w4, groups=2)  # two outputs per group
    np.testing.assert_array_equal(y[0, :, 0, 0], [45, 90, 9, 27])


@pytest.mark.parametrize("size, kernel, stride, padding, expected", [
    (4, 3, 1, 0, 2), (4, 3, 1, 1, 4), (4, 3, 2, 1, 2), (5, 3, 2, 1, 3), (7, 5, 2, 2, 4), (1, 3, 2, 1, 1),
    (320, 3, 2, 1, 160), (416, 3, 2, 1, 208), (13, 5, 3, 0, 3), (3, 1, 2, 0, 2)])
def test_conv_output_size(size, kernel, stride, padding, expected):
    """floor((size + 2p - k) / s) + 1, and the shape conv2d gives."""
    assert ops.conv_output_size(size, kernel, stride, padding) == expected
    y = ops.conv2d(np.zeros((1, 1, size, size)), np.zeros((1, 1, kernel, kernel)), stride=stride, padding=padding)
    assert y.shape == (1, 1, expected, expected)


def test_conv_rejects_a_kernel_larger_than_the_padded_input():
    with pytest.raises(ValueError):
        ops.conv2d(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3)))


# --- batch norm, linear, pooling --------------------------------------------------------------


def _bn_params(dtype):
    """Two channels chosen so that var + eps is 4 and 16 exactly: invstd 1/2 and 1/4."""
    weight, bias = np.array([2.0, 3.0], dtype), np.array([1.0, 0.0], dtype)
    mean = np.array([3.0, 4.0], dtype)
    var = np.array([4.0, 16.0], dtype) - dtype(ops.BN_EPS)
    assert ((var + dtype(ops.BN_EPS)) == [4, 16]).all()
    return weight, bias, mean, var


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_coefficients_in_pytorchs_order(dtype):
    """alpha = weight / sqrt(var + eps) = (2/2, 3/4); beta = bias - mean * alpha = (1 - 3, 0 - 3)."""
    alpha, beta = ops.batch_norm_coefficients(*_bn_params(dtype))
    np.testing.assert_array_equal(alpha, [1.0, 0.75])
    np.testing.assert_array_equal(beta, [-2.0, -3.0])
    assert alpha.dtype == beta.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_is_x_alpha_plus_beta(dtype):
    x = np.array([0.0, 4.0, 8.0], dtype).reshape(1, 1, 1, 3).repeat(2, axis=1)
    y = ops.batch_norm(x, *_bn_params(dtype))
    np.testing.assert_array_equal(y[0, :, 0], [[-2, 2, 6], [-3, 0, 3]])
    assert y.dtype == dtype


def test_batch_norm_rounds_as_pytorch_not_as_the_textbook():
    """In float32, ``x * alpha + beta`` (PyTorch's CPU order, two roundings of the coefficients
    first) and ``(x - mean) / sqrt(var + eps) * weight + bias`` differ in the last bits; ops
    gives the former, bit for bit."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    weight, bias, mean = (rng.standard_normal(4).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.1, 3, 4).astype(np.float32)
    invstd = np.float32(1) / np.sqrt(var + np.float32(ops.BN_EPS))
    alpha, beta = invstd * weight, bias - mean * (invstd * weight)
    pytorch = x * alpha[None, :, None, None] + beta[None, :, None, None]
    textbook = ((x - mean[None, :, None, None]) * invstd[None, :, None, None] * weight[None, :, None, None]
                + bias[None, :, None, None])
    y = ops.batch_norm(x, weight, bias, mean, var)
    np.testing.assert_array_equal(y, pytorch)
    assert not np.array_equal(y, textbook)


def test_fold_batch_norm():
    """W' = W * alpha per output channel, b' = b * alpha + beta (beta alone without a conv bias)."""
    w = np.ones((2, 1, 1, 1))
    folded_w, folded_b = ops.fold_batch_norm(w, np.array([4.0, 8.0]), *_bn_params(np.float64))
    np.testing.assert_array_equal(folded_w.reshape(2), [1.0, 0.75])
    np.testing.assert_array_equal(folded_b, [4 - 2, 6 - 3])
    np.testing.assert_array_equal(ops.fold_batch_norm(w, None, *_bn_params(np.float64))[1], [-2, -3])


def test_linear():
    """y = x W^T + b: rows of W pick x0, x1 and their sum."""
    x = np.array([[1.0, 2.0]])
    w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_array_equal(ops.linear(x, w, np.array([0.0, 0.0, 1.0])), [[1, 2, 4]])
    np.testing.assert_array_equal(ops.linear(x, w), [[1, 2, 3]])


def test_global_avg_pool():
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, -1.0], [5.0, 5.0]]]])
    np.testing.assert_array_equal(ops.global_avg_pool(x), [[[[2.5]], [[2.0]]]])


# --- activations at their knees -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, x, y", [
    ("Identity", [-2.5, 0.0, 7.0], [-2.5, 0.0, 7.0]),
    ("ReLU", [-1.0, 0.0, 0.5, 2.0], [0.0, 0.0, 0.5, 2.0]),
    ("ReLU6", [-1.0, 0.0, 3.0, 6.0, 7.0], [0.0, 0.0, 3.0, 6.0, 6.0]),
    ("LeakyReLU", [-2.0, 0.0, 2.0], [-2 * ops.LEAKY_RELU_SLOPE, 0.0, 2.0]),  # 0.1, NanoDet's
    ("HardSwish", [-4.0, -3.0, 0.0, 1.5, 3.0, 4.0], [0.0, 0.0, 0.0, 1.5 * 4.5 / 6, 3.0, 4.0]),
    ("ELU", [-np.inf, 0.0, 1.0], [-ops.ELU_ALPHA, 0.0, 1.0]),
    ("SELU", [0.0, 1.0], [0.0, ops.SELU_SCALE]),
    ("SiLU", [0.0, 1e4], [0.0, 1e4]),
    ("GELU", [0.0, 10.0, np.inf], [0.0, 10.0, np.inf]),
])
def test_activation_at_its_knees(name, x, y, dtype):
    x = np.array(x, dtype)
    out = ops.activation(name, x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, np.array(y, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_with_exp_and_erf_on_one_value(dtype):
    """At x = -1 and 1 (SELU also at -inf, its floor -scale * alpha), against math's expm1, exp and
    erf in float64; the op rounds each of its few steps in dtype, so it may be a few ulp off."""
    x = np.array([-1.0, 1.0], dtype)
    expm1, erf = math.expm1(-1.0), math.erf(1 / math.sqrt(2))
    for name, want in [("ELU", [ops.ELU_ALPHA * expm1, 1.0]),
                       ("SELU", [ops.SELU_SCALE * ops.SELU_ALPHA * expm1, ops.SELU_SCALE]),
                       ("GELU", [-0.5 * (1 - erf), 0.5 * (1 + erf)]),  # 1 * Phi(1) = 0.841...
                       ("SiLU", [-1 / (1 + math.e), 1 / (1 + math.exp(-1))])]:
        got = ops.activation(name, x).astype(np.float64)
        ulp = np.spacing(np.abs(np.array(want, dtype))).astype(np.float64)
        assert (np.abs(got - want) <= 4 * ulp).all(), (name, got, want)
    floor = ops.activation("SELU", np.array([-np.inf], dtype)).astype(np.float64)
    assert abs(floor[0] + ops.SELU_SCALE * ops.SELU_ALPHA) <= 4 * np.spacing(dtype(ops.SELU_SCALE * ops.SELU_ALPHA))


def test_prelu_uses_its_one_slope():
    x = np.array([-4.0, -1.0, 0.0, 4.0])
    np.testing.assert_array_equal(ops.activation("PReLU", x, np.array([0.25])), [-1.0, -0.25, 0.0, 4.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_sigmoid_gate(dtype):
    """relu6(x + 3) / 6: 0 up to -3, 1 from +3, 1/2 at 0; 1.5 gives 4.5 / 6 = 3/4."""
    x = np.array([-10.0, -4.0, -3.0, 0.0, 1.5, 3.0, 4.0, 10.0], dtype)
    np.testing.assert_array_equal(ops.hard_sigmoid(x), np.array([0, 0, 0, 0.5, 0.75, 1, 1, 1], dtype))


def test_silu_does_not_warn_and_keeps_its_values():
    """ops.silu: no overflow warning for large negative inputs, and the same values as its formula."""
    for dtype in (np.float32, np.float64):
        x = np.array([-1e4, -800.0, -100.0, -88.8, -5.0, 0.0, 3.0, 1e4], dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = ops.silu(x)
        with np.errstate(over="ignore"):
            expected = x / (dtype(1) + np.exp(-x))
        assert y.dtype == dtype and np.array_equal(y, expected)
        assert np.signbit(y[0]) and y[0] == 0  # x / inf: -0


# --- a ghost module: [primary, cheap] -----------------------------------------------------------


def test_ghost_module_concatenates_primary_then_cheap():
    """GhostModule(1 -> 2) on a 3x3 input of ones, BatchNorms the identity (var + eps = 1):
    primary 1x1 conv by 2 gives 2 everywhere; the cheap 3x3 depthwise conv of ones sums the 2s of
    each padded window: 8 in the corners (4 taps), 12 on the edges (6), 18 in the centre (9)."""
    config = GhostModuleConfig(1, 2, "ReLU")
    identity_bn = {"weight": np.ones(1), "bias": np.zeros(1), "running_mean": np.zeros(1),
                   "running_var": np.ones(1) - ops.BN_EPS}
    params = {"primary_conv.0.weight": np.full((1, 1, 1, 1), 2.0), "cheap_operation.0.weight": np.ones((1, 1, 3, 3))}
    for bn in ("primary_conv.1", "cheap_operation.1"):
        params.update({f"{bn}.{role}": v for role, v in identity_bn.items()})
    for impl in ("plain", "kernels"):
        y = execute(config.graph(), params, np.ones((1, 1, 3, 3)), impl=impl)["output"]
        np.testing.assert_array_equal(y, [[np.full((3, 3), 2.0), [[8, 12, 8], [12, 18, 12], [8, 12, 8]]]])
