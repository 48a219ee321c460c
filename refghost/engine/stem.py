"""The stem: the dense KxK convolution as im2col + GEMM, band by band of output rows (no full
im2col buffer: each band's column matrix stays in cache)."""

from __future__ import annotations

import numpy as np

from ..kernels._jit import jit
from ..kernels.blas import gemm
from ..kernels.epilogue import ACT_NONE, activate


@jit
def stem_band(x, n, w, y, y_row0, k, s, p, ho, wo, i0, i1, act, consts, tile, ph):
    """Output rows ``i0 <= i < i1`` of image n of a dense KxK conv (the stem) as im2col + GEMM on
    a band: the band's column matrix is built in ``tile`` (rows ``[0, 1 + C*K*K)``, row 0 ones,
    ``(i1 - i0)*Wo`` columns, small enough to stay in cache), then one GEMM with ``w = [b | W]``
    writes ``y[n, y_row0:y_row0+M, i0*Wo:i1*Wo]``, then the fast activation on it.

    ``ph`` (``s * ceil((W + 2p)/s)``, zero) holds one zero-padded input row split into its column
    phases, so every (a, e) segment of the column matrix is one contiguous copy.
    """
    nc, h, wd = x.shape[1], x.shape[2], x.shape[3]
    wq = (wd + 2 * p + s - 1) // s
    npx = (i1 - i0) * wo
    for t in range(npx):
        tile[t] = 1
    for c in range(nc):
        for a in range(k):
            for i in range(i0, i1):
                hh = s * i + a - p
                col0 = (i - i0) * wo
                if hh < 0 or hh >= h:
                    for e in range(k):
                        dst = tile[(1 + (c * k + a) * k + e) * npx + col0:]
                        for j in range(wo):
                            dst[j] = 0
                    continue
                xr = x[n, c, hh]
                for q in range(s):
                    j0 = (q - p) % s
                    cnt = (wd - j0 + s - 1) // s if j0 < wd else 0
                    d = ph[q * wq + (j0 + p) // s:]
                    for t in range(cnt):
                        d[t] = xr[j0 + t * s]
                for e in range(k):
                    src = ph[(e % s) * wq + e // s:]
                    dst = tile[(1 + (c * k + a) * k + e) * npx + col0:]
                    for j in range(wo):
                        dst[j] = src[j]
    m, kk = w.shape[0], w.shape[1]
    pp = y.shape[2]
    y_off = (n * y.shape[1] + y_row0) * pp + i0 * wo
    gemm(m, npx, kk, w, np.int64(0), kk, tile, np.int64(0), npx, y, y_off, pp)
    if act != ACT_NONE:
        for r in range(m):
            activate(y[n, y_row0 + r, i0 * wo: i1 * wo], npx, act, consts)

