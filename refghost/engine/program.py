"""The program format: what each column of a program row holds, named once for writer and reader.

A program is an int64 array (T, :data:`COLS`), one row per op, written by :mod:`.lower` and run by
:mod:`.run`. Column :data:`KIND` holds the op code; the other columns are named below, per op
(a name ending in ``_BUF`` is three columns: arena offset, rows R, plane size P of a buffer
``(N, R, P)``; see :data:`BUF_ROWS`, :data:`BUF_PLANE`). Rows are built with :func:`row`, which
takes ``{column: value}`` with these names; the kernels read ``r[NAME]``.

Every tensor buffer is a view into the plan's arena and every parameter array a view into its
parameter array (both 1-D, the compute dtype) at an offset (:func:`view3`, :func:`view2`); the GEMM
tiles of a row are a view into the plan's int64 array ``ints``.
"""

from __future__ import annotations

import numpy as np

from ..kernels._jit import jit

#: Op codes (column KIND).
OP_GEMM = 2
OP_DW = 3
OP_DW_BLOCKED = 4
OP_SE = 5
OP_OUTPUT = 6
OP_STEM = 7
OP_GHOST = 8
#: Columns of a program row.
COLS = 32
#: Columns of a GEMM tile in ``ints``: (image, m0, m1, j0, j1), output rows [m0, m1) x pixels [j0, j1).
TASK_COLS = 5
KIND = 0
#: Offsets within a buffer's three columns (the first is the arena offset).
BUF_ROWS = 1
BUF_PLANE = 2

# OP_GEMM (a 1x1 conv as GEMM tiles) and the primary conv of OP_GHOST
GEMM_X_BUF = 1
GEMM_Y_OFFSET = 4  # y has x's plane size
GEMM_Y_ROWS = 5
GEMM_W = 6  # offset of w (M, K): the bias in column 0
GEMM_M = 7
GEMM_K = 8
GEMM_Y_ROW0 = 9
GEMM_TASKS = 10  # offset in ints of the (T, TASK_COLS) tiles, each a unit of work
GEMM_NTASKS = 11
GEMM_ACT = 12
GEMM_PARALLEL = 13  # more than one tile
# OP_GHOST: the GEMM columns, then its 3x3 stride-1 depthwise (the tiles are column tiles in
# pixel order)
GHOST_DW_W = 14  # offset of the (init, 9) weights
GHOST_DW_BIAS = 15
GHOST_DW_ACT = 16
GHOST_H = 17
GHOST_W = 18
GHOST_BAND = 19  # depthwise rows per band
GHOST_FLAGS = 20  # offset in flags of the op's N*H row flags
# OP_DW and OP_DW_BLOCKED
DW_SRC_BUF = 1
DW_DST_BUF = 4
DW_RES_BUF = 7
DW_SRC_ROW0 = 10
DW_DST_ROW0 = 11
DW_RES_ROW0 = 12
DW_PRE_ROW0 = 13  # -1: no residual added to the source
DW_NCH = 14
DW_H = 15
DW_W = 16
DW_HO = 17
DW_WO = 18
DW_WEIGHTS = 19  # offset, then the first two dimensions (20, 21) of the weights
DW_WEIGHTS_DIM0 = 20
DW_WEIGHTS_DIM1 = 21
DW_BIAS = 22
DW_K = 23
DW_STRIDE = 24
DW_PADDING = 25
DW_ACT = 26
DW_HAS_RES = 27
DW_PARALLEL = 28
DW_UNITS = 29  # planes (OP_DW) or channel groups (OP_DW_BLOCKED)
DW_WEIGHTS_DIM2 = 30  # the third dimension of the blocked weights
# OP_SE (squeeze-excite in place)
SE_X_BUF = 1
SE_NCH = 4
SE_REDUCED = 5
SE_WR_T = 6  # offsets of the transposed reduce weights, its bias, the transposed expand weights, its bias
SE_BR = 7
SE_WE_T = 8
SE_BE = 9
SE_PARALLEL = 10
# OP_STEM (the dense KxK stem conv, by bands of output rows)
STEM_Y_BUF = 1
STEM_W = 4  # offset of w (M, 1 + C*K*K)
STEM_M = 5
STEM_KK = 6  # 1 + C*K*K
STEM_K = 7
STEM_STRIDE = 8
STEM_PADDING = 9
STEM_HO = 10
STEM_WO = 11
STEM_ACT = 12
STEM_BAND = 13
STEM_PARALLEL = 14
# OP_OUTPUT (a copy of a tensor into ``out``: output k of image n is ``out[N * offset + n * size
# : ...]``, each output's N images contiguous)
OUT_BUF = 1
OUT_NCH = 4
OUT_OFFSET = 5  # per image


def row(kind, columns):
    """A program row: op code ``kind`` and ``{column: value}``; a tuple value (a buffer's
    offset, rows, plane size) fills consecutive columns."""
    r = np.zeros(COLS, np.int64)
    r[KIND] = kind
    written = {KIND}
    for col, value in columns.items():
        values = value if isinstance(value, tuple) else (value,)
        span = set(range(col, col + len(values)))
        if span & written or col + len(values) > COLS:
            raise AssertionError(f"program row: column {col} written twice or past the row")
        written |= span
        r[col: col + len(values)] = values
    return r


@jit
def view3(arena, off, n, r, p):
    """The (n, r, p) view of ``arena`` at ``off``."""
    return arena[off: off + n * r * p].reshape((n, r, p))


@jit
def view2(arena, off, r, c):
    """The (r, c) view of ``arena`` at ``off``."""
    return arena[off: off + r * c].reshape((r, c))


@jit
def buffer(arena, r, col, n):
    """The buffer (n, R, P) named by the three columns from ``col`` of row ``r``."""
    return view3(arena, r[col], n, r[col + BUF_ROWS], r[col + BUF_PLANE])
