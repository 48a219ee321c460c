"""Fused kernels of the execution engine (:mod:`refghost.engine`).

Activation layout: a tensor of C channels with planes of P = H*W pixels lives in rows
``[1, 1 + C)`` of a buffer ``(N, R, P)`` whose row 0 is a constant plane of ones. A 1x1
convolution reads rows ``[0, C+1)`` with weights ``[b | W]`` (the bias as column 0), so one GEMM
gives conv + bias with no epilogue pass. The two halves of a ghost module are rows
``[1, 1+C/2)`` and ``[1+C/2, 1+C)`` of one buffer: no concatenation.

Kernels (all compiled through :mod:`._jit`: fastmath off, every ``+``/``*`` an IEEE operation in
the array dtype in the order written):

* :func:`gemm_tasks` / :func:`gemm_tasks_parallel`: 1x1 convolution as BLAS GEMM tiles, a fixed
  list of (image, row range, column range) tasks, optionally followed by a fast activation on
  the tile while it is in cache. The task list depends on the shapes only, never on the thread
  count, so the same BLAS calls happen whatever the number of threads.
* :func:`depthwise` / :func:`depthwise_parallel`: depthwise KxK conv, stride s, with bias,
  activation and residual fused into the copy-out, and (ghost2) the residual of the primary half
  added in the copy-in pass that reads it anyway. Each plane is computed by one thread with the
  same code, so results do not depend on the thread count.
* :func:`squeeze_excite`: plane means, the two small 1x1 convs, hard-sigmoid and the in-place
  scaling, for one image at a time.
* :func:`_ghost_chunk` / :func:`_ghost_rest`: a ghost module's primary 1x1 conv (the same GEMM
  tiles) and its 3x3 stride-1 depthwise on the rows completed so far, read straight from the
  buffer (:func:`_ghost_rows`); the same bits as the GEMM and depthwise kernels.
* :func:`_stem_band`: the dense KxK stem convolution, im2col + GEMM on bands of output rows.
* :func:`run_program`: a run of the engine's ops in one compiled call and one parallel region,
  the units of work of each op handed out to the threads by atomic counters (:mod:`.sync`).

Activation codes (fast epilogues): :data:`ACT_NONE`, :data:`ACT_RELU`, :data:`ACT_LEAKY`
(``x if x > 0 else slope*x``: LeakyReLU and PReLU), :data:`ACT_RELU6`. ``consts`` is a small array
in the compute dtype: ``[0, 3, 6, slope]``.
"""

from __future__ import annotations

import numba
import numpy as np

from .blas import gemm
from ._jit import jit, parallel_jit
from .depthwise import _copy_in_any, _copy_in_s2, _geometry
from .sync import STRIDE, claim, finish, wait_done

ACT_NONE = 0
ACT_RELU = 1
ACT_LEAKY = 2
ACT_RELU6 = 3
#: Lanes of the blocked sum used for plane means (see :func:`_plane_mean`).
_LANES = 16


def make_consts(dtype, slope=0.0):
    """The ``consts`` array of a kernel call: ``[0, 3, 6, slope]`` in ``dtype``."""
    return np.array([0.0, 3.0, 6.0, slope], dtype=dtype)


@jit
def _activate(row, n, act, consts):
    """In place on ``row[:n]``: the fast activation ``act`` (see the module docstring)."""
    zero = consts[0]
    if act == ACT_RELU:
        for j in range(n):
            v = row[j]
            row[j] = v if v > zero else zero
    elif act == ACT_LEAKY:
        slope = consts[3]
        for j in range(n):
            v = row[j]
            row[j] = v if v > zero else v * slope
    elif act == ACT_RELU6:
        six = consts[2]
        for j in range(n):
            v = row[j]
            v = v if v > zero else zero
            row[j] = v if v < six else six


# --- 1x1 convolution: GEMM tiles -------------------------------------------------------------


@jit
def _gemm_task(w, x, y, y_row0, task, act, consts):
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
            _activate(row, j1 - j0, act, consts)


@jit
def gemm_tasks(w, x, y, y_row0, tasks, act, consts):
    """All tiles of ``tasks`` (T, 5) = (image, m0, m1, j0, j1), serially.

    w: (M, K) weights with the bias in column 0; x: (N, Rx, P) buffer whose rows ``[0, K)`` are
    the input (row 0 ones); y: (N, Ry, P), output rows ``[y_row0, y_row0 + M)``.
    """
    for t in range(tasks.shape[0]):
        _gemm_task(w, x, y, y_row0, tasks[t], act, consts)


@parallel_jit
def gemm_tasks_parallel(w, x, y, y_row0, tasks, act, consts):
    """:func:`gemm_tasks` with the tiles spread over Numba's threads (BLAS at one thread)."""
    for t in numba.prange(tasks.shape[0]):
        _gemm_task(w, x, y, y_row0, tasks[t], act, consts)


# --- depthwise convolution --------------------------------------------------------------------


@jit
def _taps3_s1(acc, r0, r1, r2, n, wk):
    """All 9 taps of a 3x3 stride-1 conv in one pass, row-major tap order, one view per row."""
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = wk[0], wk[1], wk[2], wk[3], wk[4], wk[5], wk[6], wk[7], wk[8]
    for t in range(n):
        acc[t] = (w0 * r0[t] + w1 * r0[t + 1] + w2 * r0[t + 2] + w3 * r1[t] + w4 * r1[t + 1]
                  + w5 * r1[t + 2] + w6 * r2[t] + w7 * r2[t + 1] + w8 * r2[t + 2])


@jit
def _row3_s2(acc, ve, vo, n, w0, w1, w2, first):
    """One kernel row of a 3x3 stride-2 conv: taps from the even (ve) and odd (vo) sub-planes."""
    if first:
        for t in range(n):
            acc[t] = w0 * ve[t] + w1 * vo[t] + w2 * ve[t + 1]
    else:
        for t in range(n):
            acc[t] = acc[t] + w0 * ve[t] + w1 * vo[t] + w2 * ve[t + 1]


@jit
def _row5_s2(acc, ve, vo, n, w0, w1, w2, w3, w4, first):
    """One kernel row of a 5x5 stride-2 conv."""
    if first:
        for t in range(n):
            acc[t] = w0 * ve[t] + w1 * vo[t] + w2 * ve[t + 1] + w3 * vo[t + 1] + w4 * ve[t + 2]
    else:
        for t in range(n):
            acc[t] = acc[t] + w0 * ve[t] + w1 * vo[t] + w2 * ve[t + 1] + w3 * vo[t + 1] + w4 * ve[t + 2]


@jit
def _row5_s1(acc, v, n, w0, w1, w2, w3, w4, first):
    """One kernel row of a 5x5 stride-1 conv."""
    if first:
        for t in range(n):
            acc[t] = w0 * v[t] + w1 * v[t + 1] + w2 * v[t + 2] + w3 * v[t + 3] + w4 * v[t + 4]
    else:
        for t in range(n):
            acc[t] = acc[t] + w0 * v[t] + w1 * v[t + 1] + w2 * v[t + 2] + w3 * v[t + 3] + w4 * v[t + 4]


@jit
def _tap(acc, v, n, wv, first):
    """One tap of any other kernel: ``acc (=|+=) wv * v``."""
    if first:
        for t in range(n):
            acc[t] = wv * v[t]
    else:
        for t in range(n):
            acc[t] = acc[t] + wv * v[t]


@jit
def _convolve_block(acc, scratch, wk, k, s, pitch, sub_len, i0, n):
    """acc[t] = sum of the K*K taps for output rows from i0, flat over the padded pitch.

    Taps are summed in row-major order ``(0,0), (0,1), ..., (K-1,K-1)``, left to right, so every
    variant below computes the same sum in the same order.
    """
    if k == 3 and s == 1:
        base = i0 * pitch
        _taps3_s1(acc, scratch[base:], scratch[base + pitch:], scratch[base + 2 * pitch:], n, wk)
    elif s == 2 and (k == 3 or k == 5):
        for a in range(k):
            r = a % 2
            base = (i0 + a // 2) * pitch
            ve = scratch[(2 * r) * sub_len + base:]
            vo = scratch[(2 * r + 1) * sub_len + base:]
            if k == 3:
                _row3_s2(acc, ve, vo, n, wk[3 * a], wk[3 * a + 1], wk[3 * a + 2], a == 0)
            else:
                _row5_s2(acc, ve, vo, n, wk[5 * a], wk[5 * a + 1], wk[5 * a + 2], wk[5 * a + 3], wk[5 * a + 4],
                         a == 0)
    elif k == 5 and s == 1:
        for a in range(5):
            v = scratch[(i0 + a) * pitch:]
            _row5_s1(acc, v, n, wk[5 * a], wk[5 * a + 1], wk[5 * a + 2], wk[5 * a + 3], wk[5 * a + 4], a == 0)
    else:
        for a in range(k):
            r = a % s
            da = a // s
            for e in range(k):
                q = e % s
                off = (r * s + q) * sub_len + (i0 + da) * pitch + e // s
                _tap(acc, scratch[off:], n, wk[a * k + e], a == 0 and e == 0)


@jit
def _copy_out(acc, pitch, out, wo, i0, i1, bv, act, consts, has_res, rres):
    """Output rows ``i0 <= i < i1`` of a plane from its accumulator rows (pitch ``pitch``):
    ``out = act(acc + bv) (+ rres)``, one pass per row for the common cases (the same operations
    in the same order as the three passes of the general case, so the same bits)."""
    zero = consts[0]
    if act == ACT_NONE and has_res:
        for i in range(i0, i1):
            a_row = acc[(i - i0) * pitch: (i - i0) * pitch + wo]
            o_row = out[i * wo: i * wo + wo]
            rr = rres[i * wo: i * wo + wo]
            for j in range(wo):
                o_row[j] = (a_row[j] + bv) + rr[j]
    elif act == ACT_NONE:
        for i in range(i0, i1):
            a_row = acc[(i - i0) * pitch: (i - i0) * pitch + wo]
            o_row = out[i * wo: i * wo + wo]
            for j in range(wo):
                o_row[j] = a_row[j] + bv
    elif act == ACT_RELU and not has_res:
        for i in range(i0, i1):
            a_row = acc[(i - i0) * pitch: (i - i0) * pitch + wo]
            o_row = out[i * wo: i * wo + wo]
            for j in range(wo):
                v = a_row[j] + bv
                o_row[j] = v if v > zero else zero
    else:
        for i in range(i0, i1):
            a_row = acc[(i - i0) * pitch: (i - i0) * pitch + wo]
            o_row = out[i * wo: i * wo + wo]
            for j in range(wo):
                o_row[j] = a_row[j] + bv
            _activate(o_row, wo, act, consts)
            if has_res:
                rr = rres[i * wo: i * wo + wo]
                for j in range(wo):
                    o_row[j] = o_row[j] + rr[j]


@jit
def _dw_planes(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p, act,
               consts, has_res, lo, hi):
    """Planes ``lo <= pl < hi`` (pl = n*nch + c) of a fused depthwise conv.

    ``dst[n, d_row0+c] = act(conv(src[n, s_row0+c]) + bias[c]) (+ res[n, r_row0+c] if has_res)``;
    with ``pre_row0 >= 0`` (stride 1 only) the source plane itself is updated after it is read:
    ``src[n, s_row0+c] += res[n, pre_row0+c]`` (the ghost2 residual of the primary half).
    """
    rows, pitch, sub_len, rb, qv0, qnv, qcol0 = _geometry(k, s, p, wd, ho, wo)
    scratch = np.zeros(s * s * sub_len, dtype=dst.dtype)
    acc = np.empty(rb * pitch, dtype=dst.dtype)
    s2_both = s == 2 and k >= 2 and qnv[0] > 0 and qnv[1] > 0
    for pl in range(lo, hi):
        n = pl // nch
        c = pl % nch
        xin = src[n, s_row0 + c]
        # --- copy in (zero padding stays zero: the same positions are written for every plane)
        if s == 1:
            for i in range(h):
                d = scratch[(i + p) * pitch + p: (i + p) * pitch + p + wd]
                xr = xin[i * wd: i * wd + wd]
                for j in range(wd):
                    d[j] = xr[j]
                if pre_row0 >= 0:
                    rr = res[n, pre_row0 + c, i * wd: i * wd + wd]
                    for j in range(wd):
                        xr[j] = xr[j] + rr[j]
        elif s2_both:
            _copy_in_s2(xin.reshape((h, wd)), scratch, p, pitch, sub_len, rows, qv0, qnv, qcol0)
        else:
            _copy_in_any(xin.reshape((h, wd)), scratch, s, p, k, pitch, sub_len, rows, qv0, qnv, qcol0)
        wk = wgt[c]
        bv = bias[c]
        out = dst[n, d_row0 + c]
        for i0 in range(0, ho, rb):
            i1 = min(ho, i0 + rb)
            nn = (i1 - i0 - 1) * pitch + wo
            _convolve_block(acc, scratch, wk, k, s, pitch, sub_len, i0, nn)
            # --- copy out: bias, activation, residual
            _copy_out(acc, pitch, out, wo, i0, i1, bv, act, consts, has_res, res[n, r_row0 + c])


@jit
def depthwise(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p, act,
              consts, has_res):
    """All N*nch planes serially (see :func:`_dw_planes`). ``wgt`` (nch, K*K), ``bias`` (nch,)."""
    nplanes = src.shape[0] * nch
    _dw_planes(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p, act,
               consts, has_res, 0, nplanes)


@parallel_jit
def depthwise_parallel(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p,
                       act, consts, has_res, nchunks):
    """:func:`depthwise` with the planes split into ``nchunks`` contiguous chunks over prange."""
    nplanes = src.shape[0] * nch
    for chunk in numba.prange(nchunks):
        _dw_planes(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p, act,
                   consts, has_res, chunk * nplanes // nchunks, (chunk + 1) * nplanes // nchunks)


#: Channels per group of the channel-blocked depthwise kernel (the vector lanes).
CB = 16


@jit
def _dw_groups(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wrep, bias, k, s, p, act,
               consts, has_res, lo, hi):
    """Groups ``lo <= g < hi`` of a fused depthwise conv, channel-blocked (for small planes).

    Group g = n*ngroups + gi covers channels ``[gi*CB, min(nch, (gi+1)*CB))`` of image n. Their
    planes are transposed into a zero-padded scratch where one pixel of the CB channels is CB
    consecutive values, and the columns of each padded row are stored by phase (``col % s``, then
    ``col // s``), so for every tap one output row is one flat, unit-stride loop of ``Wo*CB``
    values at any stride. ``wrep`` (ngroups, K*K, Wo*CB) holds each tap's CB weights tiled Wo
    times (zero past ``nch``). No per-plane loops: this is what makes 10x10 and 20x20 planes fast.

    Same function and the same summation order as :func:`_dw_planes`: taps in row-major order,
    the first assigned, then ``acc = acc + w*x``; bias, activation, residual in the copy-out.
    """
    hp = h + 2 * p
    wp = wd + 2 * p
    wq = (wp + s - 1) // s
    ngroups = (nch + CB - 1) // CB
    nrow = wo * CB
    scratch = np.zeros(hp * s * wq * CB, dtype=dst.dtype)
    acc = np.empty(ho * nrow, dtype=dst.dtype)
    for g in range(lo, hi):
        n = g // ngroups
        gi = g % ngroups
        c0 = gi * CB
        cg = min(CB, nch - c0)
        # --- copy in, transposed: padded pixel (r, col) of channel c0+l at ((r*s + col%s)*wq + col//s)*CB + l;
        # one pixel's CB channels at a time, so the scratch is written in unit stride
        for i in range(h):
            row = scratch[(i + p) * s * wq * CB:]
            for q in range(s):  # the input columns j with (j + p) % s == q
                j0 = (q - p) % s
                cnt = (wd - j0 + s - 1) // s
                base = (q * wq + (j0 + p) // s) * CB
                for t in range(cnt):
                    d = row[base + t * CB: base + t * CB + CB]
                    col = i * wd + j0 + t * s
                    for l in range(cg):
                        d[l] = src[n, s_row0 + c0 + l, col]
        for l in range(cg):
            xin = src[n, s_row0 + c0 + l]
            if pre_row0 >= 0:
                rr = res[n, pre_row0 + c0 + l]
                for t in range(h * wd):
                    xin[t] = xin[t] + rr[t]
        # --- convolve: per output row and tap, one flat loop over Wo*CB
        wg = wrep[gi]
        for i in range(ho):
            arow = acc[i * nrow: i * nrow + nrow]
            for a in range(k):
                r = s * i + a
                for e in range(k):
                    off = ((r * s + e % s) * wq + e // s) * CB
                    xrow = scratch[off: off + nrow]
                    wr = wg[a * k + e]
                    if a == 0 and e == 0:
                        for t in range(nrow):
                            arow[t] = wr[t] * xrow[t]
                    else:
                        for t in range(nrow):
                            arow[t] = arow[t] + wr[t] * xrow[t]
        # --- copy out, transposed back: bias, activation, residual
        for l in range(cg):
            c = c0 + l
            bv = bias[c]
            out = dst[n, d_row0 + c]
            rr = res[n, r_row0 + c]
            zero = consts[0]
            if act == ACT_NONE and has_res:
                for t in range(ho * wo):
                    out[t] = (acc[t * CB + l] + bv) + rr[t]
            elif act == ACT_NONE:
                for t in range(ho * wo):
                    out[t] = acc[t * CB + l] + bv
            elif act == ACT_RELU and not has_res:
                for t in range(ho * wo):
                    v = acc[t * CB + l] + bv
                    out[t] = v if v > zero else zero
            else:
                for t in range(ho * wo):
                    out[t] = acc[t * CB + l] + bv
                _activate(out, ho * wo, act, consts)
                if has_res:
                    for t in range(ho * wo):
                        out[t] = out[t] + rr[t]


def blocked_weights(w, wo):
    """(C, K*K) depthwise weights -> (ceil(C/CB), K*K, Wo*CB) for :func:`_dw_groups`: each tap's
    CB weights tiled Wo times, zero in the lanes past C."""
    c, kk = w.shape
    groups = -(-c // CB)
    out = np.zeros((groups * CB, kk), w.dtype)
    out[:c] = w
    per_group = out.reshape(groups, CB, kk).transpose(0, 2, 1)  # (groups, K*K, CB)
    return np.ascontiguousarray(np.tile(per_group, (1, 1, wo)))


@jit
def depthwise_blocked(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt_cb, bias, k, s, p,
                      act, consts, has_res):
    """All groups of all images serially (see :func:`_dw_groups`)."""
    total = src.shape[0] * ((nch + CB - 1) // CB)
    _dw_groups(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt_cb, bias, k, s, p, act,
               consts, has_res, 0, total)


@parallel_jit
def depthwise_blocked_parallel(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt_cb, bias, k,
                               s, p, act, consts, has_res, nchunks):
    """:func:`depthwise_blocked` with the groups split into ``nchunks`` chunks over prange."""
    total = src.shape[0] * ((nch + CB - 1) // CB)
    for chunk in numba.prange(nchunks):
        _dw_groups(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt_cb, bias, k, s, p, act,
                   consts, has_res, chunk * total // nchunks, (chunk + 1) * total // nchunks)


# --- squeeze-excite ---------------------------------------------------------------------------


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
def _se_image(x, n, nch, wr_t, br, we_t, be, consts, pooled, hidden, lanes):
    """SE of image n, in place on rows ``[1, 1+nch)`` of x (N, R, P).

    ``pooled = mean``; ``hidden = relu(wr_t.T @ pooled + br)``; ``gate = relu6(we_t.T @ hidden + be + 3) / 6``
    (the sums run over the input index in order, the bias added last); ``x *= gate``. The same
    helpers as the chunks of :func:`squeeze_excite_channels`, over all channels.
    """
    zero = np.int64(0)  # (a literal 0 would compile these helpers once more)
    _se_means(x, n, zero, nch, pooled, lanes)
    _se_hidden(pooled, wr_t, br, zero, wr_t.shape[1], hidden, consts)
    _se_scale(x, n, hidden, we_t, be, zero, nch, consts)


@jit
def _se_means(x, n, c0, c1, pooled, lanes):
    """``pooled[c] = mean of plane x[n, 1 + c]`` for ``c0 <= c < c1`` (the sum of :func:`_plane_mean`)."""
    for c in range(c0, c1):
        pooled[c] = _plane_mean(x[n, 1 + c], x.shape[2], lanes)


@jit
def _se_hidden(pooled, wr_t, br, j0, j1, hidden, consts):
    """``hidden[j] = relu(sum_c wr_t[c, j] * pooled[c] + br[j])`` for ``j0 <= j < j1``, summed over
    c in order, in a local accumulator (no cache line shared between the
    threads that write other j)."""
    zero = consts[0]
    hpart = np.empty(j1 - j0, hidden.dtype)
    for j in range(j1 - j0):
        hpart[j] = zero
    for c in range(wr_t.shape[0]):
        pc = pooled[c]
        wrow = wr_t[c, j0:j1]
        for j in range(j1 - j0):
            hpart[j] = hpart[j] + wrow[j] * pc
    for j in range(j0, j1):
        v = hpart[j - j0] + br[j]
        hidden[j] = v if v > zero else zero


@jit
def _se_scale(x, n, hidden, we_t, be, c0, c1, consts):
    """Channels ``c0 <= c < c1`` of image n: the hard-sigmoid gate from ``hidden`` (summed over j in
    order) and the scaling of the plane in place."""
    zero, three, six = consts[0], consts[1], consts[2]
    gate = np.empty(c1 - c0, x.dtype)
    for c in range(c1 - c0):
        gate[c] = zero
    for j in range(we_t.shape[0]):
        hj = hidden[j]
        wrow = we_t[j, c0:c1]
        for c in range(c1 - c0):
            gate[c] = gate[c] + wrow[c] * hj
    for c in range(c0, c1):
        v = gate[c - c0] + be[c] + three
        v = v if v > zero else zero
        v = v if v < six else six
        g = v / six
        row = x[n, 1 + c]
        for t in range(x.shape[2]):
            row[t] = row[t] * g


@parallel_jit
def squeeze_excite_channels(x, nch, wr_t, br, we_t, be, consts, nchunks):
    """:func:`squeeze_excite_serial` for a batch below the thread count: the plane means, the two
    small convs (the first split over its outputs, the second over channels, with the scaling)
    are each split into at most ``nchunks`` chunks. Every value is the same sum in the same order
    as in :func:`_se_image`, so the results are the same bits. (The same helpers as the SE of
    :func:`run_program` for a batch smaller than the thread count.)"""
    nr = wr_t.shape[1]
    chunks = min(nchunks, nch)
    hchunks = min(nchunks, nr)
    pooled = np.empty(nch, x.dtype)
    hidden = np.empty(nr, x.dtype)
    for n in range(x.shape[0]):
        for chunk in numba.prange(chunks):
            lanes = np.empty(_LANES, x.dtype)
            _se_means(x, n, chunk * nch // chunks, (chunk + 1) * nch // chunks, pooled, lanes)
        for chunk in numba.prange(hchunks):
            _se_hidden(pooled, wr_t, br, chunk * nr // hchunks, (chunk + 1) * nr // hchunks, hidden, consts)
        for chunk in numba.prange(chunks):
            _se_scale(x, n, hidden, we_t, be, chunk * nch // chunks, (chunk + 1) * nch // chunks, consts)


@parallel_jit
def squeeze_excite(x, nch, wr_t, br, we_t, be, consts):
    """Squeeze-excite in place on every image of x (see :func:`_se_image`); prange over images."""
    for n in numba.prange(x.shape[0]):
        pooled = np.empty(nch, x.dtype)
        hidden = np.empty(wr_t.shape[1], x.dtype)
        lanes = np.empty(_LANES, x.dtype)
        _se_image(x, n, nch, wr_t, br, we_t, be, consts, pooled, hidden, lanes)


@jit
def squeeze_excite_serial(x, nch, wr_t, br, we_t, be, consts):
    """:func:`squeeze_excite` without a parallel region (batch 1)."""
    pooled = np.empty(nch, x.dtype)
    hidden = np.empty(wr_t.shape[1], x.dtype)
    lanes = np.empty(_LANES, x.dtype)
    for n in range(x.shape[0]):
        _se_image(x, n, nch, wr_t, br, we_t, be, consts, pooled, hidden, lanes)


# --- stem: dense KxK conv as im2col + GEMM, band by band ------------------------------------


@jit
def _stem_band(x, n, w, y, y_row0, k, s, p, ho, wo, i0, i1, act, consts, tile, ph):
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
            _activate(y[n, y_row0 + r, i0 * wo: i1 * wo], npx, act, consts)


# --- ghost module: primary 1x1 conv and its 3x3 depthwise, by bands of rows ------------------


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
    (pitch ``wd+2``, side columns always zero) as in :func:`_dw_planes`. Every output is the same
    expression on the same values as :func:`_taps3_s1` + :func:`_copy_out`, so the same bits.
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
            _activate(out[a * wd: b * wd], (b - a) * wd, act, consts)
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
            _taps3_s1(acc, scratch, scratch[pitch:], scratch[2 * pitch:], wd, wk)
            _copy_out(acc, pitch, out, wd, i, i + 1, bv, act, consts, np.bool_(False), out)


@jit
def _ghost_chunk(w, xb, yb, row0, tasks, t0, t1, act1, wdw, bdw, act2, consts, h, wd, band, done):
    """GEMM tiles ``t0 <= t < t1`` (column tiles over full images' rows, in pixel order) of a
    ghost module's primary conv, each followed by the depthwise rows whose three input rows are
    now complete *within this chunk* (so they are read back from cache); ``done[n*h + i] = 1``
    marks them. The rows left (at chunk edges) are done after the parallel region."""
    init = w.shape[0]
    zrow = np.zeros(wd, yb.dtype)
    scratch = np.zeros(3 * (wd + 2), yb.dtype)
    acc = np.empty(wd + 2, yb.dtype)
    cur = -1
    start = 0
    nxt = 0
    for t in range(t0, t1):
        task = tasks[t]
        _gemm_task(w, xb, yb, row0, task, act1, consts)
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
def _ghost_rest(yb, row0, init, h, wd, wdw, bdw, act2, consts, band, done):
    """The depthwise rows :func:`_ghost_chunk` left (``done == 0``), in runs of consecutive rows."""
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


# --- the whole plan in one call -----------------------------------------------------------------

#: Op codes of a program row (see :func:`run_program`).
OP_GEMM = 2
OP_DW = 3
OP_DW_BLOCKED = 4
OP_SE = 5
OP_OUTPUT = 6
OP_STEM = 7
OP_GHOST = 8
#: Columns of a program row.
PROGRAM_COLS = 32


@jit
def _view3(arena, off, n, r, p):
    return arena[off: off + n * r * p].reshape((n, r, p))


@jit
def _view2(arena, off, r, c):
    return arena[off: off + r * c].reshape((r, c))


@parallel_jit
def run_program(prog, consts_all, arena, params, ints, x, out, nthreads, sync, shared, flags, images):
    """Run a run of engine ops, one row of ``prog`` (T, :data:`PROGRAM_COLS`) int64 each, in one
    parallel region, in one of two ways:

    * **op by op** (``images[0] == 0``): all N images of ``x`` through each op in turn, the units
      of every op shared by ``nthreads`` threads (:func:`_run_ops` on every thread; see :mod:`.sync`);
    * **image by image** (``images[0] = W > 0``): W workers take whole images from a counter and
      run each through all the ops alone (``nthreads`` = 1 in :func:`_run_ops`), each with its own
      part of ``arena``, ``sync``, ``shared`` and ``flags``: ``images`` is (W, arena, sync, shared,
      flags) lengths per worker; ``sync`` holds the image counter in its first ``sync.STRIDE``
      elements, then the workers' parts. ``prog`` is then a plan for one image. The same units
      with the same code, so the same bits as op by op.

    Every tensor buffer is a view into ``arena`` and every parameter array a view into ``params``
    (both 1-D, the compute dtype) at a fixed offset; GEMM task lists are views into ``ints``;
    ``consts_all[i]`` is op i's ``consts``; ``out`` (1-D) receives the output copies; ``x`` is the
    input (N, C, H, W). ``sync`` (int64, ``T * PHASES * sync.STRIDE``) and ``flags`` (int8: the
    ghost ops' row flags) must be zero; ``shared`` (compute dtype) is scratch for the squeeze-excite
    of a batch smaller than the thread count (N * (C + reduced C) of its largest SE).
    A buffer is given as (offset, rows R, plane size P): the view (N, R, P). Row layout (built by
    :class:`refghost.engine.Plan`):

    * OP_GEMM: x buffer 1-3, y offset 4, y rows 5, w offset 6, M 7, K 8, y_row0 9, task offset 10,
      tasks 11 (each a unit), act 12, more than one task 13.
    * OP_DW / OP_DW_BLOCKED: src buffer 1-3, dst 4-6, res 7-9, s_row0 10, d_row0 11, r_row0 12,
      pre_row0 13, nch 14, H 15, W 16, Ho 17, Wo 18, weights offset and shape 19-21 (30: third
      dimension of the blocked weights), bias offset 22, K 23, stride 24, padding 25, act 26,
      has_res 27, parallel 28, units (planes or groups) 29.
    * OP_SE: x buffer 1-3, nch 4, reduced channels 5, offsets of wr_t 6, br 7, we_t 8, be 9,
      parallel 10.
    * OP_STEM: y buffer 1-3, w offset 4, M 5, 1+C*K*K 6, K 7, stride 8, padding 9, Ho 10, Wo 11,
      act 12, band rows 13, parallel 14.
    * OP_OUTPUT: buffer 1-3, channels 4, offset per image in ``out`` 5: output k of image n is
      ``out[N * offset + n * size : ...]`` (each output's N images contiguous).
    * OP_GHOST: columns 1-13 as OP_GEMM (the primary conv; its tasks are column tiles in pixel
      order), depthwise weights offset 14 (init, 9), bias offset 15, act 16, H 17, W 18, band
      rows 19 (see :func:`_ghost_chunk`), offset of its N*H row flags in ``flags`` 20.

    Each op calls the same per-tile / per-plane / per-group code as the single-op kernels above,
    and every unit of work is computed by one thread with the same code, so the results are the
    same bits as running the ops one by one through those kernels (the stem has no single-op
    kernel: :func:`_stem_band`), for any thread count and any interleaving.
    """
    workers = nthreads if images[0] == 0 else images[0]
    # (np.int64: a literal or unsigned argument would compile the big callees once more)
    for worker in numba.prange(workers):
        if images[0] == 0:
            _run_ops(prog, consts_all, arena, params, ints, x, out, nthreads, sync, shared, flags, np.int64(0),
                     np.int64(x.shape[0]))
        else:
            _run_images(prog, consts_all, arena, params, ints, x, out, sync, shared, flags, images, np.int64(worker))


@jit
def _run_images(prog, consts_all, arena, params, ints, x, out, sync, shared, flags, images, worker):
    """Worker ``worker`` of the image-by-image mode of :func:`run_program`: takes images from the
    counter in ``sync[0]`` and runs each alone through :func:`_run_ops` on its own buffers."""
    a_len, s_len, sh_len, f_len = images[1], images[2], images[3], images[4]
    my_arena = arena[worker * a_len: (worker + 1) * a_len]
    my_sync = sync[STRIDE + worker * s_len: STRIDE + (worker + 1) * s_len]
    my_shared = shared[worker * sh_len: (worker + 1) * sh_len]
    my_flags = flags[worker * f_len: (worker + 1) * f_len]
    n = claim(sync, np.int64(0))
    while n < x.shape[0]:
        my_sync[:] = 0
        my_flags[:] = 0
        _run_ops(prog, consts_all, my_arena, params, ints, x[n:n + 1], out, np.int64(1), my_sync, my_shared, my_flags,
                 n, np.int64(x.shape[0]))
        n = claim(sync, np.int64(0))


#: Phases per op in ``sync`` (the most an op has: the squeeze-excite of a small batch).
PHASES = 3
#: Chunks per thread of the ops whose units are planes, groups or bands (handed out dynamically:
#: more chunks balance better, each chunk pays for its scratch).
_CHUNKS_PER_THREAD = 4


@jit
def _run_ops(prog, consts_all, arena, params, ints, x, out, nthreads, sync, shared, flags, img0, nbatch):
    """One thread's walk through the program (see :func:`run_program`) for images ``x`` (n, C, H, W),
    images ``img0 .. img0 + n`` of a batch of ``nbatch`` (where the outputs go in ``out``). For
    each op phase the thread claims units until none is left, then waits until all are done
    (:mod:`.sync`)."""
    nimg = x.shape[0]
    for i in range(prog.shape[0]):
        r = prog[i]
        kind = r[0]
        consts = consts_all[i]
        q = i * PHASES
        if kind == OP_GEMM:
            xb = _view3(arena, r[1], nimg, r[2], r[3])
            yb = _view3(arena, r[4], nimg, r[5], r[3])
            w = _view2(params, r[6], r[7], r[8])
            tasks = _view2(ints, r[10], r[11], np.int64(5))
            units = tasks.shape[0]
            u = claim(sync, q)
            while u < units:
                _gemm_task(w, xb, yb, r[9], tasks[u], r[12], consts)
                finish(sync, q)
                u = claim(sync, q)
            wait_done(sync, q, units)
        elif kind == OP_DW or kind == OP_DW_BLOCKED:
            src = _view3(arena, r[1], nimg, r[2], r[3])
            dst = _view3(arena, r[4], nimg, r[5], r[6])
            res = _view3(arena, r[7], nimg, r[8], r[9])
            s_row0, d_row0, r_row0, pre_row0 = r[10], r[11], r[12], r[13]
            nch, h, wd, ho, wo = r[14], r[15], r[16], r[17], r[18]
            bias = params[r[22]: r[22] + nch]
            k, s, p, act, has_res = r[23], r[24], r[25], r[26], r[27] != 0
            planes = r[29]
            units = min(planes, _CHUNKS_PER_THREAD * nthreads) if r[28] != 0 else 1
            u = claim(sync, q)
            while u < units:
                lo, hi = u * planes // units, (u + 1) * planes // units
                if kind == OP_DW:
                    wgt = _view2(params, r[19], r[20], r[21])
                    _dw_planes(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s,
                               p, act, consts, has_res, lo, hi)
                else:
                    wcb = _view3(params, r[19], r[20], r[21], r[30])
                    _dw_groups(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wcb, bias, k, s,
                               p, act, consts, has_res, lo, hi)
                finish(sync, q)
                u = claim(sync, q)
            wait_done(sync, q, units)
        elif kind == OP_SE:
            _se_op(r, arena, params, nimg, nthreads, consts, sync, q, shared)
        elif kind == OP_STEM:
            yb = _view3(arena, r[1], nimg, r[2], r[3])
            w = _view2(params, r[4], r[5], r[6])
            k, s, p, ho, wo, act, band = r[7], r[8], r[9], r[10], r[11], r[12], r[13]
            nbands = (ho + band - 1) // band
            bands = nimg * nbands
            wq = (x.shape[3] + 2 * p + s - 1) // s
            units = min(bands, _CHUNKS_PER_THREAD * nthreads) if r[14] != 0 else 1
            u = claim(sync, q)
            if u < units:
                tile = np.empty(r[6] * band * wo, yb.dtype)
                ph = np.zeros(s * wq, yb.dtype)
            while u < units:
                for b in range(u * bands // units, (u + 1) * bands // units):
                    i0 = (b % nbands) * band
                    _stem_band(x, b // nbands, w, yb, 1, k, s, p, ho, wo, i0, min(ho, i0 + band), act, consts,
                               tile, ph)
                finish(sync, q)
                u = claim(sync, q)
            wait_done(sync, q, units)
        elif kind == OP_GHOST:
            xb = _view3(arena, r[1], nimg, r[2], r[3])
            yb = _view3(arena, r[4], nimg, r[5], r[3])
            w = _view2(params, r[6], r[7], r[8])
            tasks = _view2(ints, r[10], r[11], np.int64(5))
            m = r[7]
            wdw = _view2(params, r[14], m, np.int64(9))
            bdw = params[r[15]: r[15] + m]
            h, wd, band = r[17], r[18], r[19]
            done = flags[r[20]: r[20] + nimg * h]
            ntasks = tasks.shape[0]
            units = min(nthreads, ntasks) if r[13] != 0 else 1
            u = claim(sync, q)
            while u < units:
                _ghost_chunk(w, xb, yb, r[9], tasks, u * ntasks // units, (u + 1) * ntasks // units, r[12], wdw,
                             bdw, r[16], consts, h, wd, band, done)
                finish(sync, q)
                u = claim(sync, q)
            wait_done(sync, q, units)
            if claim(sync, q + 1) == 0:
                _ghost_rest(yb, r[9], m, h, wd, wdw, bdw, r[16], consts, band, done)
                finish(sync, q + 1)
            wait_done(sync, q + 1, np.int64(1))
        elif kind == OP_OUTPUT:
            if claim(sync, q) == 0:
                b = _view3(arena, r[1], nimg, r[2], r[3])
                c, p, o = r[4], r[3], r[5] * nbatch + img0 * r[4] * r[3]
                for n in range(nimg):
                    for ci in range(c):
                        src = b[n, 1 + ci]
                        dst = out[o + (n * c + ci) * p: o + (n * c + ci + 1) * p]
                        for t in range(p):
                            dst[t] = src[t]
                finish(sync, q)
            wait_done(sync, q, np.int64(1))


@jit
def _se_op(r, arena, params, nimg, nthreads, consts, sync, q, shared):
    """The squeeze-excite row ``r`` of :func:`_run_ops` (phases q, q+1, q+2). A batch of at least
    ``nthreads`` images: one unit per image (:func:`_se_image`). A smaller batch, when parallel:
    the plane means, the first small conv and the second with the scaling as three phases of
    chunks (of channels, reduced channels, channels), through ``shared``; every value is the same
    sum in the same order as in :func:`_se_image`. Otherwise one unit does it all."""
    xb = _view3(arena, r[1], nimg, r[2], r[3])
    nch, nr = r[4], r[5]
    wr_t = _view2(params, r[6], nch, nr)
    br = params[r[7]: r[7] + nr]
    we_t = _view2(params, r[8], nr, nch)
    be = params[r[9]: r[9] + nch]
    if nimg >= nthreads or r[10] == 0:
        units = nimg if nimg >= nthreads else 1
        u = claim(sync, q)
        if u < units:
            pooled = np.empty(nch, xb.dtype)
            hidden = np.empty(nr, xb.dtype)
            lanes = np.empty(_LANES, xb.dtype)
        while u < units:
            for n in range(u * nimg // units, (u + 1) * nimg // units):
                _se_image(xb, n, nch, wr_t, br, we_t, be, consts, pooled, hidden, lanes)
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
        _se_means(xb, n, chunk * nch // chunks, (chunk + 1) * nch // chunks, pooled_all[n * nch:(n + 1) * nch],
                  lanes)
        finish(sync, q)
        u = claim(sync, q)
    wait_done(sync, q, units)
    units = nimg * hchunks
    u = claim(sync, q + 1)
    while u < units:
        n, chunk = u // hchunks, u % hchunks
        _se_hidden(pooled_all[n * nch:(n + 1) * nch], wr_t, br, chunk * nr // hchunks, (chunk + 1) * nr // hchunks,
                   hidden_all[n * nr:(n + 1) * nr], consts)
        finish(sync, q + 1)
        u = claim(sync, q + 1)
    wait_done(sync, q + 1, units)
    units = nimg * chunks
    u = claim(sync, q + 2)
    while u < units:
        n, chunk = u // chunks, u % chunks
        _se_scale(xb, n, hidden_all[n * nr:(n + 1) * nr], we_t, be, chunk * nch // chunks,
                  (chunk + 1) * nch // chunks, consts)
        finish(sync, q + 2)
        u = claim(sync, q + 2)
    wait_done(sync, q + 2, units)
