"""A ghost module's primary 1x1 conv and its 3x3 stride-1 depthwise as one op, by bands of rows.

The GEMM tiles of the primary conv (:mod:`.pointwise`) and, after each, the depthwise rows whose
three input rows are complete, read back from cache straight from the buffer
(:func:`_ghost_rows`); the same bits as the GEMM and depthwise kernels run one after the other.
"""

from __future__ import annotations

import numpy as np

from ..kernels._jit import jit
from ..kernels.depthwise import copy_out, taps3_s1
from ..kernels.epilogue import activate
from .pointwise import gemm_task


@jit
def _dw3_edges(o_row, r0, r1, r2, wd, wk, bv, zero):
    """Columns 0 and ``wd-1`` (``wd >= 2``) of one output row of a 3x3 stride-1 padding-1
    depthwise conv plus bias, the padding taps as explicit zeros (see :func:`_ghost_rows`)."""
    o_row[0] = (wk[0] * zero + wk[1] * r0[0] + wk[2] * r0[1] + wk[3] * zero + wk[4] * r1[0] + wk[5] * r1[1]
                + wk[6] * zero + wk[7] * r2[0] + wk[8] * r2[1]) + bv
    e = wd - 1
    o_row[e] = (wk[0] * r0[e - 1] + wk[1] * r0[e] + wk[2] * zero + wk[3] * r1[e - 1] + wk[4] * r1[e]
                + wk[5] * zero + wk[6] * r2[e - 1] + wk[7] * r2[e] + wk[8] * zero) + bv


@jit
def _ghost_rows(yb, n, row0, init, h, wd, i0, i1, wdw, bdw, act, consts, zrow, scratch, acc):
    """Cheap half of a ghost module for output rows ``i0 <= i < i1`` of image n: the 3x3 stride-1
    padding-1 depthwise conv of rows ``[row0, row0+init)`` of ``yb`` into rows
    ``[row0+init, row0+2*init)``, then bias and activation.

    Rows with both neighbours inside the image are one flat loop straight over the buffer (no
    copy-in): column j of every row from input pixels ``t-wd-1 .. t+wd+1``; the two edge columns
    of each row (where the flat loop wraps around) are then recomputed with explicit zeros
    (:func:`_dw3_edges`). The first and last image rows go through the zero-padded ``scratch``
    (pitch ``wd+2``, side columns always zero) as in :func:`refghost.kernels.depthwise.dw_planes`.
    Every output is the same expression on the same values as :func:`taps3_s1` + :func:`copy_out`,
    so the same bits.
    ``zrow``: ``wd`` zeros; ``scratch``: ``3*(wd+2)`` zeros; ``acc``: ``wd+2``."""
    zero = consts[0]
    pitch = wd + 2
    a = max(i0, 1) if wd >= 3 else i1
    b = min(i1, h - 1) if wd >= 3 else i1
    for c in range(init):
        xin = yb[n, row0 + c]
        out = yb[n, row0 + init + c]
        wk = wdw[c]
        bv = bdw[c]
        if b > a:
            w0, w1, w2, w3, w4, w5, w6, w7, w8 = wk[0], wk[1], wk[2], wk[3], wk[4], wk[5], wk[6], wk[7], wk[8]
            base = (a - 1) * wd
            v0 = xin[base:]
            v1 = xin[base + wd:]
            v2 = xin[base + 2 * wd:]
            o1 = out[a * wd + 1:]  # output pixel t+1 of the run from input pixels t .. t+2 of each row
            for t in range((b - a) * wd - 2):
                o1[t] = (w0 * v0[t] + w1 * v0[t + 1] + w2 * v0[t + 2] + w3 * v1[t] + w4 * v1[t + 1]
                         + w5 * v1[t + 2] + w6 * v2[t] + w7 * v2[t + 1] + w8 * v2[t + 2]) + bv
            for i in range(a, b):
                _dw3_edges(out[i * wd: (i + 1) * wd], xin[(i - 1) * wd:], xin[i * wd:], xin[(i + 1) * wd:], wd, wk,
                           bv, zero)
            activate(out[a * wd: b * wd], (b - a) * wd, act, consts)
        for i in range(i0, i1):
            if a <= i < b:
                continue
            # one row through the padded scratch: input rows i-1, i, i+1 (zero outside the image)
            for r in range(3):
                ii = i - 1 + r
                d = scratch[r * pitch + 1: r * pitch + 1 + wd]
                src = xin[ii * wd: ii * wd + wd] if 0 <= ii < h else zrow
                for j in range(wd):
                    d[j] = src[j]
            taps3_s1(acc, scratch, scratch[pitch:], scratch[2 * pitch:], wd, wk)
            copy_out(acc, pitch, out, wd, i, i + 1, bv, act, consts, np.bool_(False), out)


@jit
def ghost_chunk(w, xb, yb, row0, tasks, t0, t1, act1, wdw, bdw, act2, consts, h, wd, band, done):
    """GEMM tiles ``t0 <= t < t1`` (column tiles over full images' rows, in pixel order) of a
    ghost module's primary conv, each followed by the depthwise rows whose three input rows are
    now complete *within this chunk* (so they are read back from cache); ``done[n*h + i] = 1``
    marks them. The rows left (at chunk edges) are done by :func:`ghost_rest`, one unit in the op's
    second phase, once every chunk is done."""
    init = w.shape[0]
    zrow = np.zeros(wd, yb.dtype)
    scratch = np.zeros(3 * (wd + 2), yb.dtype)
    acc = np.empty(wd + 2, yb.dtype)
    cur = -1
    start = 0
    nxt = 0
    for t in range(t0, t1):
        task = tasks[t]
        gemm_task(w, xb, yb, row0, task, act1, consts)
        n, j0, j1 = task[0], task[3], task[4]
        if n != cur:
            cur = n
            start = j0
            nxt = 0
            while nxt < h and max(nxt - 1, 0) * wd < start:
                nxt += 1
        # rows i with rows max(i-1, 0) .. min(i+1, h-1) inside [start, j1)
        last = nxt
        while last < h and (min(last + 1, h - 1) + 1) * wd <= j1:
            last += 1
        if last - nxt < band and t + 1 < t1 and tasks[t + 1][0] == n:
            continue  # wait for a full band (more rows per call, the same values)
        i = nxt
        while i < last:
            i1 = min(last, i + band)
            _ghost_rows(yb, n, row0, init, h, wd, i, i1, wdw, bdw, act2, consts, zrow, scratch, acc)
            for r in range(i, i1):
                done[n * h + r] = 1
            i = i1
        nxt = last


@jit
def ghost_rest(yb, row0, init, h, wd, wdw, bdw, act2, consts, band, done):
    """The depthwise rows :func:`ghost_chunk` left (``done == 0``), in runs of consecutive rows."""
    zrow = np.zeros(wd, yb.dtype)
    scratch = np.zeros(3 * (wd + 2), yb.dtype)
    acc = np.empty(wd + 2, yb.dtype)
    nimg = done.shape[0] // h
    for n in range(nimg):
        i = 0
        while i < h:
            if done[n * h + i] != 0:
                i += 1
                continue
            i1 = i + 1
            while i1 < h and i1 < i + band and done[n * h + i1] == 0:
                i1 += 1
            _ghost_rows(yb, n, row0, init, h, wd, i, i1, wdw, bdw, act2, consts, zrow, scratch, acc)
            i = i1

