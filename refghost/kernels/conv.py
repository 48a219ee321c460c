"""Dense convolution through BLAS: im2col, then one matrix product per image.

Same function as :func:`refghost.ops.conv2d` with ``groups=1``; only the summation order of each
output differs (OpenBLAS's GEMM kernel instead of ``np.einsum``'s loop). Every output is still
one dot product of ``C*KH*KW`` terms computed by one thread, so with the BLAS pool pinned to one
thread (:func:`refghost.threads.single_threaded_blas`, held by :func:`refghost.run`) the result
does not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..ops import conv_output_size


def conv2d_gemm(x, w, b=None, *, stride=1, padding=0):
    """Dense conv2d as ``y[n] = W (O, C*KH*KW) @ cols[n] (C*KH*KW, Ho*Wo)``.

    x: (N, C, H, W); w: (O, C, KH, KW); b: (O,) or None; returns (N, O, Ho, Wo) in x's dtype.
    A 1x1 stride-1 conv needs no im2col: ``cols[n]`` is ``x[n]`` viewed as (C, H*W).
    """
    n, c, h, wd = x.shape
    o, cw, kh, kw = w.shape
    if cw != c:
        raise ValueError(f"conv2d_gemm: x has {c} channels, w is {w.shape}")
    ho = conv_output_size(h, kh, stride, padding)
    wo = conv_output_size(wd, kw, stride, padding)
    if kh == kw == 1 and stride == 1 and padding == 0:
        cols = x.reshape(n, c, h * wd)  # (N, C, H*W)
    else:
        xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride][:, :, :ho, :wo]
        # (N, C, Ho, Wo, KH, KW) -> (N, C, KH, KW, Ho, Wo) -> (N, C*KH*KW, Ho*Wo)
        cols = np.ascontiguousarray(win.transpose(0, 1, 4, 5, 2, 3)).reshape(n, c * kh * kw, ho * wo)
    y = np.matmul(w.reshape(o, c * kh * kw), cols)  # (N, O, Ho*Wo)
    if b is not None:
        y += b[None, :, None]
    return y.reshape(n, o, ho, wo)
