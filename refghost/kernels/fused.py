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
* :func:`im2col`: the dense KxK stem convolution's column matrix.

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
            for i in range(i0, i1):
                a_row = acc[(i - i0) * pitch: (i - i0) * pitch + wo]
                o_row = out[i * wo: i * wo + wo]
                for j in range(wo):
                    o_row[j] = a_row[j] + bv
                if act != ACT_NONE:
                    _activate(o_row, wo, act, consts)
                if has_res:
                    rr = res[n, r_row0 + c, i * wo: i * wo + wo]
                    for j in range(wo):
                        o_row[j] = o_row[j] + rr[j]


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
        # --- copy in, transposed: padded pixel (r, col) of channel c0+l at ((r*s + col%s)*wq + col//s)*CB + l
        for l in range(cg):
            xin = src[n, s_row0 + c0 + l]
            for i in range(h):
                row = scratch[(i + p) * s * wq * CB:]
                xr = xin[i * wd: i * wd + wd]
                if s == 1:
                    for j in range(wd):
                        row[(j + p) * CB + l] = xr[j]
                else:
                    for q in range(s):  # the input columns j with (j + p) % s == q
                        j0 = (q - p) % s
                        cnt = (wd - j0 + s - 1) // s
                        base = (q * wq + (j0 + p) // s) * CB + l
                        for t in range(cnt):
                            row[base + t * CB] = xr[j0 + t * s]
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
            for t in range(ho * wo):
                out[t] = acc[t * CB + l] + bv
            if act != ACT_NONE:
                _activate(out, ho * wo, act, consts)
            if has_res:
                rr = res[n, r_row0 + c]
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
    for l in range(_LANES):
        lanes[l] = 0
    m = n - n % _LANES
    for t0 in range(0, m, _LANES):
        for l in range(_LANES):
            lanes[l] = lanes[l] + v[t0 + l]
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
def _se_image(x, n, nch, wr_t, br, we_t, be, consts, pooled, hidden, gate, lanes):
    """SE of image n, in place on rows ``[1, 1+nch)`` of x (N, R, P).

    ``pooled = mean``; ``hidden = relu(wr_t.T @ pooled + br)``; ``gate = relu6(we_t.T @ hidden + be + 3) / 6``
    (the sums run over the input index in order, the bias added last); ``x *= gate``.
    """
    p = x.shape[2]
    for c in range(nch):
        pooled[c] = _plane_mean(x[n, 1 + c], p, lanes)
    _se_gate(nch, wr_t, br, we_t, be, consts, pooled, hidden, gate)
    for c in range(nch):
        g = gate[c]
        row = x[n, 1 + c]
        for t in range(p):
            row[t] = row[t] * g


@parallel_jit
def squeeze_excite_channels(x, nch, wr_t, br, we_t, be, consts, nchunks):
    """:func:`squeeze_excite_serial` with the plane means and the scaling of each image split over
    ``nchunks`` channel chunks (batch 1 on several threads); the gate itself is serial. Every value
    is computed by the same code as in :func:`_se_image`, so the results are the same bits."""
    p = x.shape[2]
    pooled = np.empty(nch, x.dtype)
    hidden = np.empty(wr_t.shape[1], x.dtype)
    gate = np.empty(nch, x.dtype)
    for n in range(x.shape[0]):
        for chunk in numba.prange(nchunks):
            lanes = np.empty(_LANES, x.dtype)
            for c in range(chunk * nch // nchunks, (chunk + 1) * nch // nchunks):
                pooled[c] = _plane_mean(x[n, 1 + c], p, lanes)
        _se_gate(nch, wr_t, br, we_t, be, consts, pooled, hidden, gate)
        for chunk in numba.prange(nchunks):
            for c in range(chunk * nch // nchunks, (chunk + 1) * nch // nchunks):
                g = gate[c]
                row = x[n, 1 + c]
                for t in range(p):
                    row[t] = row[t] * g


@jit
def _se_gate(nch, wr_t, br, we_t, be, consts, pooled, hidden, gate):
    """gate = hard_sigmoid(we_t.T @ relu(wr_t.T @ pooled + br) + be), from the plane means."""
    zero, three, six = consts[0], consts[1], consts[2]
    nr = wr_t.shape[1]
    for j in range(nr):
        hidden[j] = zero
    for c in range(nch):
        pc = pooled[c]
        row = wr_t[c]
        for j in range(nr):
            hidden[j] = hidden[j] + row[j] * pc
    for j in range(nr):
        v = hidden[j] + br[j]
        hidden[j] = v if v > zero else zero
    for c in range(nch):
        gate[c] = zero
    for j in range(nr):
        hj = hidden[j]
        row = we_t[j]
        for c in range(nch):
            gate[c] = gate[c] + row[c] * hj
    for c in range(nch):
        v = gate[c] + be[c] + three
        v = v if v > zero else zero
        v = v if v < six else six
        gate[c] = v / six


@parallel_jit
def squeeze_excite(x, nch, wr_t, br, we_t, be, consts):
    """Squeeze-excite in place on every image of x (see :func:`_se_image`); prange over images."""
    for n in numba.prange(x.shape[0]):
        pooled = np.empty(nch, x.dtype)
        hidden = np.empty(wr_t.shape[1], x.dtype)
        gate = np.empty(nch, x.dtype)
        lanes = np.empty(_LANES, x.dtype)
        _se_image(x, n, nch, wr_t, br, we_t, be, consts, pooled, hidden, gate, lanes)


@jit
def squeeze_excite_serial(x, nch, wr_t, br, we_t, be, consts):
    """:func:`squeeze_excite` without a parallel region (batch 1)."""
    pooled = np.empty(nch, x.dtype)
    hidden = np.empty(wr_t.shape[1], x.dtype)
    gate = np.empty(nch, x.dtype)
    lanes = np.empty(_LANES, x.dtype)
    for n in range(x.shape[0]):
        _se_image(x, n, nch, wr_t, br, we_t, be, consts, pooled, hidden, gate, lanes)


# --- stem: im2col -----------------------------------------------------------------------------


@jit
def _im2col_rows(x, cols, k, s, p, ho, wo, lo, hi):
    """Rows ``lo <= r < hi`` of the column matrices, r = n*(C*K*K) + (c*K + a)*K + e:
    ``cols[n, 1 + (c*K + a)*K + e, i*Wo + j] = xpad[n, c, s*i + a, s*j + e]``."""
    nc, h, wd = x.shape[1], x.shape[2], x.shape[3]
    per_image = nc * k * k
    for r in range(lo, hi):
        n = r // per_image
        q = r % per_image
        c = q // (k * k)
        a = (q // k) % k
        e = q % k
        dst = cols[n, 1 + q]
        # output columns j whose input column s*j + e - p lies inside [0, W)
        j_lo = 0
        while j_lo < wo and s * j_lo + e - p < 0:
            j_lo += 1
        j_hi = wo
        while j_hi > j_lo and s * (j_hi - 1) + e - p >= wd:
            j_hi -= 1
        for i in range(ho):
            hh = s * i + a - p
            drow = dst[i * wo: i * wo + wo]
            if hh < 0 or hh >= h:
                for j in range(wo):
                    drow[j] = 0
                continue
            xr = x[n, c, hh]
            for j in range(j_lo):
                drow[j] = 0
            base = e - p
            for j in range(j_lo, j_hi):
                drow[j] = xr[s * j + base]
            for j in range(j_hi, wo):
                drow[j] = 0


@parallel_jit
def im2col(x, cols, k, s, p, ho, wo, nchunks):
    """Column matrices of a dense KxK conv of x (N, C, H, W) into rows ``[1, 1 + C*K*K)`` of cols."""
    total = x.shape[0] * x.shape[1] * k * k
    for chunk in numba.prange(nchunks):
        _im2col_rows(x, cols, k, s, p, ho, wo, chunk * total // nchunks, (chunk + 1) * total // nchunks)
