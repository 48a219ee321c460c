"""Squeeze-excite in place: plane means, the two small 1x1 convs, hard-sigmoid, the scaling.

For one image at a time (:func:`se_image`), or, for a batch smaller than the thread count, in
three phases of chunks (of channels, reduced channels, channels) whose every value is the same sum
in the same order, so the same bits (:func:`se_op`, the program row that runs them).
"""

from __future__ import annotations

import numpy as np

from ..kernels._jit import jit
from . import program as col
from .counters import claim, finish, wait_done
from .program import buffer, view2

#: Lanes of the blocked sum used for plane means (see :func:`_plane_mean`).
_LANES = 16


@jit
def _plane_mean(v, n, lanes):
    """Mean of ``v[:n]``: 16 interleaved partial sums, combined pairwise, then one divide.

    Each lane sums n/16 terms, so the rounding error grows like sqrt(n/16) instead of sqrt(n) for
    one running sum (which on a 40x40 plane of positive values exceeds the error model of
    :mod:`refghost.bounds`). Divides by n as NumPy's ``mean`` does.
    """
    # the 16 lanes as scalars while streaming over the plane (an array of lanes would be stored and
    # reloaded on every step); the same additions in the same order as ``lanes[l] += v[t0 + l]``
    z = lanes.dtype.type(0)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z
    m = n - n % _LANES
    for t0 in range(0, m, _LANES):
        a0 = a0 + v[t0]
        a1 = a1 + v[t0 + 1]
        a2 = a2 + v[t0 + 2]
        a3 = a3 + v[t0 + 3]
        a4 = a4 + v[t0 + 4]
        a5 = a5 + v[t0 + 5]
        a6 = a6 + v[t0 + 6]
        a7 = a7 + v[t0 + 7]
        b0 = b0 + v[t0 + 8]
        b1 = b1 + v[t0 + 9]
        b2 = b2 + v[t0 + 10]
        b3 = b3 + v[t0 + 11]
        b4 = b4 + v[t0 + 12]
        b5 = b5 + v[t0 + 13]
        b6 = b6 + v[t0 + 14]
        b7 = b7 + v[t0 + 15]
    lanes[0], lanes[1], lanes[2], lanes[3] = a0, a1, a2, a3
    lanes[4], lanes[5], lanes[6], lanes[7] = a4, a5, a6, a7
    lanes[8], lanes[9], lanes[10], lanes[11] = b0, b1, b2, b3
    lanes[12], lanes[13], lanes[14], lanes[15] = b4, b5, b6, b7
    for t in range(m, n):
        lanes[t - m] = lanes[t - m] + v[t]
    width = _LANES // 2
    while width >= 1:
        for l in range(width):
            lanes[l] = lanes[l] + lanes[l + width]
        width //= 2
    lanes[1] = n  # the count, exactly, in the dtype
    return lanes[0] / lanes[1]


@jit
def se_image(x, n, nch, wr_t, br, we_t, be, consts, pooled, hidden, lanes):
    """SE of image n, in place on rows ``[1, 1+nch)`` of x (N, R, P).

    ``pooled = mean``; ``hidden = relu(wr_t.T @ pooled + br)``; ``gate = relu6(we_t.T @ hidden + be + 3) / 6``
    (the sums run over the input index in order, the bias added last); ``x *= gate``. The same
    helpers as the chunks of :func:`se_op` for a small batch, over all channels.
    """
    zero = np.int64(0)  # (a literal 0 would compile these helpers once more)
    se_means(x, n, zero, nch, pooled, lanes)
    se_hidden(pooled, wr_t, br, zero, wr_t.shape[1], hidden, consts)
    se_scale(x, n, hidden, we_t, be, zero, nch, consts)


@jit
def se_means(x, n, c0, c1, pooled, lanes):
    """``pooled[c] = mean of plane x[n, 1 + c]`` for ``c0 <= c < c1`` (the sum of :func:`_plane_mean`)."""
    for c in range(c0, c1):
        pooled[c] = _plane_mean(x[n, 1 + c], x.shape[2], lanes)


@jit
def _columns_dot(v, w_t, k0, k1, acc, zero):
    """``acc[k - k0] = sum_r w_t[r, k] * v[r]`` for ``k0 <= k < k1``: from ``zero``, summed over r in
    order, row by row of ``w_t`` (unit stride), in ``acc`` (local to the caller's thread)."""
    for k in range(k1 - k0):
        acc[k] = zero
    for r in range(w_t.shape[0]):
        vr = v[r]
        wrow = w_t[r, k0:k1]
        for k in range(k1 - k0):
            acc[k] = acc[k] + wrow[k] * vr


@jit
def se_hidden(pooled, wr_t, br, j0, j1, hidden, consts):
    """``hidden[j] = relu(sum_c wr_t[c, j] * pooled[c] + br[j])`` for ``j0 <= j < j1``, summed over
    c in order, in a local accumulator (no cache line shared between the
    threads that write other j)."""
    zero = consts[0]
    hpart = np.empty(j1 - j0, hidden.dtype)
    _columns_dot(pooled, wr_t, j0, j1, hpart, zero)
    for j in range(j0, j1):
        v = hpart[j - j0] + br[j]
        hidden[j] = v if v > zero else zero


@jit
def se_scale(x, n, hidden, we_t, be, c0, c1, consts):
    """Channels ``c0 <= c < c1`` of image n: the hard-sigmoid gate from ``hidden`` (summed over j in
    order) and the scaling of the plane in place."""
    zero, three, six = consts[0], consts[1], consts[2]
    gate = np.empty(c1 - c0, x.dtype)
    _columns_dot(hidden, we_t, c0, c1, gate, zero)
    for c in range(c0, c1):
        v = gate[c - c0] + be[c] + three
        v = v if v > zero else zero
        v = v if v < six else six
        g = v / six
        row = x[n, 1 + c]
        for t in range(x.shape[2]):
            row[t] = row[t] * g


@jit
def se_op(r, arena, params, nimg, nthreads, consts, sync, q, shared):
    """The squeeze-excite row ``r`` of a program (:mod:`.run`) (phases q, q+1, q+2). A batch of at least
    ``nthreads`` images: one unit per image (:func:`se_image`). A smaller batch, when parallel:
    the plane means, the first small conv and the second with the scaling as three phases of
    chunks (of channels, reduced channels, channels), through ``shared``; every value is the same
    sum in the same order as in :func:`se_image`. Otherwise one unit does it all."""
    xb = buffer(arena, r, col.SE_X_BUF, nimg)
    nch, nr = r[col.SE_NCH], r[col.SE_REDUCED]
    wr_t = view2(params, r[col.SE_WR_T], nch, nr)
    br = params[r[col.SE_BR]: r[col.SE_BR] + nr]
    we_t = view2(params, r[col.SE_WE_T], nr, nch)
    be = params[r[col.SE_BE]: r[col.SE_BE] + nch]
    if nimg >= nthreads or r[col.SE_PARALLEL] == 0:
        units = nimg if nimg >= nthreads else 1
        u = claim(sync, q)
        if u < units:
            pooled = np.empty(nch, xb.dtype)
            hidden = np.empty(nr, xb.dtype)
            lanes = np.empty(_LANES, xb.dtype)
        while u < units:
            for n in range(u * nimg // units, (u + 1) * nimg // units):
                se_image(xb, n, nch, wr_t, br, we_t, be, consts, pooled, hidden, lanes)
            finish(sync, q)
            u = claim(sync, q)
        wait_done(sync, q, units)
        return
    chunks, hchunks = min(nthreads, nch), min(nthreads, nr)
    pooled_all = shared[:nimg * nch]
    hidden_all = shared[nimg * nch: nimg * (nch + nr)]
    # the plane means, the first small conv by chunks of its outputs, the second with the scaling
    units = nimg * chunks
    u = claim(sync, q)
    if u < units:
        lanes = np.empty(_LANES, xb.dtype)
    while u < units:
        n, chunk = u // chunks, u % chunks
        se_means(xb, n, chunk * nch // chunks, (chunk + 1) * nch // chunks, pooled_all[n * nch:(n + 1) * nch],
                 lanes)
        finish(sync, q)
        u = claim(sync, q)
    wait_done(sync, q, units)
    units = nimg * hchunks
    u = claim(sync, q + 1)
    while u < units:
        n, chunk = u // hchunks, u % hchunks
        se_hidden(pooled_all[n * nch:(n + 1) * nch], wr_t, br, chunk * nr // hchunks, (chunk + 1) * nr // hchunks,
                  hidden_all[n * nr:(n + 1) * nr], consts)
        finish(sync, q + 1)
        u = claim(sync, q + 1)
    wait_done(sync, q + 1, units)
    units = nimg * chunks
    u = claim(sync, q + 2)
    while u < units:
        n, chunk = u // chunks, u % chunks
        se_scale(xb, n, hidden_all[n * nr:(n + 1) * nr], we_t, be, chunk * nch // chunks,
                 (chunk + 1) * nch // chunks, consts)
        finish(sync, q + 2)
        u = claim(sync, q + 2)
    wait_done(sync, q + 2, units)
