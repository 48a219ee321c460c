"""Fast paths for the ops of :mod:`refghost.ops`, with the same names and signatures.

* dense convolutions (``groups=1``): im2col + BLAS GEMM (:mod:`.conv`);
* depthwise convolutions (``groups == C == O``): a Numba kernel (:mod:`.depthwise`);
* GELU's erf: a Numba ufunc (:mod:`.elementwise`);
* anything else falls back to the plain op.

Each is tested against the plain op in ``tests/test_kernels.py``. The compiled engine
(:mod:`refghost.engine`) shares :mod:`.depthwise` (its depthwise convolution, with bias,
activation and residual fused), :mod:`.epilogue` (the fast activations run on each tile) and
:mod:`.blas` (OpenBLAS's GEMM called from inside Numba); :mod:`._jit` sets the compile flags of
every kernel.
"""

from __future__ import annotations

import numpy as np

from .. import ops
from .conv import conv2d_gemm


def conv2d(x, w, b=None, *, stride=1, padding=0, groups=1):
    """Fast :func:`refghost.ops.conv2d`: x (N, C, H, W), w (O, C/groups, KH, KW) -> (N, O, Ho, Wo)."""
    c = x.shape[1]
    if groups == 1:
        return conv2d_gemm(x, w, b, stride=stride, padding=padding)
    if groups == c == w.shape[0] and w.shape[1] == 1:
        from .depthwise import depthwise_conv2d

        return depthwise_conv2d(x, w, b, stride=stride, padding=padding)
    return ops.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)


def activation(name, x, weight=None):
    """Fast :func:`refghost.ops.activation`: GELU's erf runs in Numba; LeakyReLU is
    ``max(x, slope*x)``, the same bits as ops' ``where(x > 0, x, slope*x)`` for a slope in [0, 1]
    (signed zeros, infinities and NaN included) and 25x faster than ``where`` on inputs of mixed
    sign; the rest as in ops."""
    if name == "GELU":
        from .elementwise import erf

        return ops.gelu(x, erf=erf)
    if name == "LeakyReLU" and 0 <= ops.LEAKY_RELU_SLOPE <= 1:
        return np.maximum(x, x * x.dtype.type(ops.LEAKY_RELU_SLOPE))
    return ops.activation(name, x, weight)
