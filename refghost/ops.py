"""The operations of GhostNet, written out as plain NumPy that reads like the math.

Layout: activations are NCHW, ``x: (N, C, H, W)``; convolution weights are OIHW,
``w: (O, C/groups, KH, KW)``. Every op computes in the dtype of its input (float32 to mimic a
backend, float64 for the oracle) and returns that dtype; nothing is widened behind your back.

These are the definitions. The fast paths in :mod:`refghost.kernels` (BLAS, Numba) compute the
same functions in another summation order and are tested against these.

Numerics follow PyTorch's CPU kernels where the order of float operations is observable:
batch norm (``alpha = w/sqrt(var+eps)``, ``beta = b - mean*alpha``, ``y = x*alpha + beta``),
hard-sigmoid (``min(max(x+3, 0), 6) / 6``, a division) and hard-swish (``x*relu6(x+3) / 6``).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: LeakyReLU slope used by NanoDet's ``act_layers`` (not PyTorch's default of 0.01).
LEAKY_RELU_SLOPE = 0.1
#: ELU alpha (PyTorch default).
ELU_ALPHA = 1.0
#: SELU constants, as in PyTorch (Klambauer et al. 2017).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
#: BatchNorm2d epsilon: PyTorch's default, never overridden in GhostNet.
BN_EPS = 1e-5


# --- convolution --------------------------------------------------------------------------


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis: ``floor((size + 2p - k) / s) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def conv2d(x, w, b=None, *, stride=1, padding=0, groups=1):
    """2-D cross-correlation (PyTorch ``Conv2d``) with zero padding and groups.

    ``y[n, o, i, j] = b[o] + sum_{c, a, e} w[o, c, a, e] * xp[n, g*Cg + c, s*i + a, s*j + e]``
    where ``g = o // (O/groups)`` is the group of output channel ``o``, ``Cg = C/groups`` and
    ``xp`` is ``x`` zero-padded by ``padding`` on every side. ``groups=1`` is a dense conv;
    ``groups=C`` is depthwise.

    Parameters
    ----------
    x : (N, C, H, W) array
    w : (O, C/groups, KH, KW) array, same dtype as ``x``
    b : (O,) array or None
    stride, padding : int, the same along H and W
    groups : int dividing both C and O

    Returns
    -------
    (N, O, Ho, Wo) array, ``Ho = floor((H + 2*padding - KH)/stride) + 1`` (same for Wo).

    Notes
    -----
    The sum runs in the input dtype, in ``np.einsum``'s own loop (no BLAS).
    """
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"conv2d: x has {c} channels, w is {w.shape}, groups={groups}: "
                         f"need C == w.shape[1]*groups and O divisible by groups")
    ho = conv_output_size(h, kh, stride, padding)
    wo = conv_output_size(wd, kw, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride][:, :, :ho, :wo]
    windows = windows.reshape(n, groups, cg, ho, wo, kh, kw)  # (N, G, Cg, Ho, Wo, KH, KW)
    wg = w.reshape(groups, o // groups, cg, kh, kw)  # (G, O/G, Cg, KH, KW)
    y = np.einsum("ngchwab,gocab->ngohw", windows, wg)  # (N, G, O/G, Ho, Wo)
    y = y.reshape(n, o, ho, wo)
    if b is not None:
        y = y + b[None, :, None, None]
    return y


def linear(x, w, b=None):
    """Fully connected layer (PyTorch ``Linear``): ``y[n, o] = b[o] + sum_i w[o, i] * x[n, i]``.

    x: (N, I), w: (O, I), b: (O,) or None; returns (N, O).
    """
    y = np.einsum("ni,oi->no", x, w)
    if b is not None:
        y = y + b
    return y


# --- normalisation and pooling ----------------------------------------------------------


def batch_norm_coefficients(weight, bias, running_mean, running_var, *, eps=BN_EPS):
    """Per-channel scale and shift of an eval-mode BatchNorm, in PyTorch's order.

    ``invstd = 1/sqrt(var + eps)``, ``alpha = invstd * weight``, ``beta = bias - mean * alpha``,
    each rounded in the dtype of the parameters. All inputs (C,); returns ``(alpha, beta)``.
    """
    dtype = running_var.dtype
    invstd = dtype.type(1) / np.sqrt(running_var + dtype.type(eps))
    alpha = invstd * weight
    beta = bias - running_mean * alpha
    return alpha, beta


def batch_norm(x, weight, bias, running_mean, running_var, *, eps=BN_EPS):
    """Eval-mode BatchNorm2d: ``y = x * alpha[c] + beta[c]`` (see :func:`batch_norm_coefficients`).

    x: (N, C, H, W); parameters (C,) in the dtype of ``x``; returns (N, C, H, W).
    """
    alpha, beta = batch_norm_coefficients(weight, bias, running_mean, running_var, eps=eps)
    return x * alpha[None, :, None, None] + beta[None, :, None, None]


def fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, *, eps=BN_EPS):
    """A conv's weight and bias with the eval-mode BatchNorm after it folded in, in their dtype.

    ``W' = W * alpha[o]``, ``b' = b * alpha + beta`` (``beta`` alone when ``bias`` is None), with
    :func:`batch_norm_coefficients`' alpha and beta: what ONNX exporters and ONNX Runtime's
    Conv+BN fusion compute. weight: (O, C/groups, KH, KW); the other arrays (O,).
    """
    alpha, beta = batch_norm_coefficients(bn_weight, bn_bias, running_mean, running_var, eps=eps)
    return weight * alpha[:, None, None, None], beta if bias is None else bias * alpha + beta


def global_avg_pool(x):
    """Mean over H and W, kept as 1x1: x (N, C, H, W) -> (N, C, 1, 1)."""
    return x.mean(axis=(2, 3), keepdims=True)


# --- activations --------------------------------------------------------------------------


def _const(x, value):
    """``value`` as a scalar of x's dtype, so float32 stays float32."""
    return x.dtype.type(value)


def identity(x):
    """f(x) = x."""
    return x


def relu(x):
    """f(x) = max(x, 0)."""
    return np.maximum(x, _const(x, 0))


def relu6(x):
    """f(x) = min(max(x, 0), 6)."""
    return np.minimum(np.maximum(x, _const(x, 0)), _const(x, 6))


def leaky_relu(x, slope=LEAKY_RELU_SLOPE):
    """f(x) = x if x > 0 else slope*x; NanoDet's slope is 0.1."""
    return np.where(x > 0, x, x * _const(x, slope))


def prelu(x, weight):
    """f(x) = x if x > 0 else a*x, with one learnt ``a`` (weight of shape (1,)) for all channels."""
    return np.where(x > 0, x, x * weight.astype(x.dtype).reshape(()))


def elu(x, alpha=ELU_ALPHA):
    """f(x) = x if x > 0 else alpha*(exp(x) - 1)."""
    return np.where(x > 0, x, _const(x, alpha) * np.expm1(np.minimum(x, _const(x, 0))))


def selu(x):
    """f(x) = scale * (x if x > 0 else alpha*(exp(x) - 1)), PyTorch's alpha and scale."""
    return _const(x, SELU_SCALE) * elu(x, SELU_ALPHA)


def _erf(x):
    """Error function, elementwise, through the C library's ``erf`` (in float64, then rounded)."""
    return np.frompyfunc(math.erf, 1, 1)(x.astype(np.float64)).astype(x.dtype)


def gelu(x, erf=None):
    """Exact (erf) GELU: f(x) = x/2 * (1 + erf(x/sqrt(2))).

    ``erf`` is the elementwise error function to use (default: :func:`_erf`, the C library's);
    the fast path passes its Numba one.
    """
    erf = _erf if erf is None else erf
    return x * _const(x, 0.5) * (_const(x, 1) + erf(x * _const(x, math.sqrt(0.5))))


def silu(x):
    """f(x) = x * sigmoid(x) = x / (1 + exp(-x)).

    For large negative x, exp(-x) overflows to +inf and f(x) = x / inf = -0, the correctly rounded
    result: the overflow is expected, so it is not warned about.
    """
    with np.errstate(over="ignore"):
        return x / (_const(x, 1) + np.exp(-x))


def hard_sigmoid(x):
    """NanoDet's gate: relu6(x + 3) / 6, i.e. 0 below -3, 1 above +3, slope 1/6 between.

    A division by 6 (as PyTorch computes it), not ONNX HardSigmoid's default slope of 0.2.
    """
    return relu6(x + _const(x, 3)) / _const(x, 6)


def hard_swish(x):
    """f(x) = x * relu6(x + 3) / 6, multiplied then divided as in PyTorch."""
    return x * relu6(x + _const(x, 3)) / _const(x, 6)


#: Activation names accepted in weights files and on the command line (NanoDet's ``act_layers``
#: spelling), mapped to their functions. ``PReLU`` also takes a weight; see :func:`activation`.
ACTIVATIONS = {
    "ReLU": relu,
    "LeakyReLU": leaky_relu,
    "ReLU6": relu6,
    "SELU": selu,
    "ELU": elu,
    "GELU": gelu,
    "PReLU": prelu,
    "SiLU": silu,
    "HardSwish": hard_swish,
    "Identity": identity,
}


def activation(name, x, weight=None):
    """Apply the activation called ``name`` (a key of :data:`ACTIVATIONS`) to x.

    ``weight`` is PReLU's learnt slope, shape (1,); other activations take none.
    """
    if name == "PReLU":
        return prelu(x, weight)
    return ACTIVATIONS[name](x)
