"""Pointwise (1x1) convolution as BLAS GEMM tiles, with the fast activation on each tile.

A 1x1 conv reads rows ``[0, K)`` of a buffer (N, R, P) in the engine's layout, row 0 ones, with
weights ``[b | W]`` (M, K) (the bias as column 0), so one GEMM gives conv + bias with no epilogue
pass. Its work is a fixed list of (image, row range, column range) tiles
(:func:`refghost.engine.lower.gemm_tasks`): the list depends on the shapes only, never on the
thread count, so the same BLAS calls happen whatever the number of threads.
"""

from __future__ import annotations

from ..kernels._jit import jit
from ..kernels.blas import gemm
from ..kernels.epilogue import ACT_NONE, activate


@jit
def gemm_task(w, x, y, y_row0, task, act, consts):
    """One tile: ``y[n, y_row0+m0 : y_row0+m1, j0:j1] = w[m0:m1] @ x[n, 0:K, j0:j1]``, then act."""
    n, m0, m1, j0, j1 = task[0], task[1], task[2], task[3], task[4]
    k = w.shape[1]
    p = x.shape[2]
    x_off = n * x.shape[1] * p + j0
    y_off = (n * y.shape[1] + y_row0 + m0) * p + j0
    gemm(m1 - m0, j1 - j0, k, w, m0 * k, k, x, x_off, p, y, y_off, p)
    if act != ACT_NONE:
        for i in range(m1 - m0):
            row = y[n, y_row0 + m0 + i, j0:j1]
            activate(row, j1 - j0, act, consts)
