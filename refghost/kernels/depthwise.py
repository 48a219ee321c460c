"""The depthwise KxK convolution (channel multiplier 1): one Numba kernel for the interpreter's
fast path (:func:`depthwise_conv2d`, the same function as ``refghost.ops.conv2d(x, w, b,
stride=s, padding=p, groups=C)``) and for the engine's program (:mod:`refghost.engine`), which
also fuses bias, activation and residual into it.

Planes live in the engine's layout, a buffer ``(N, R, P)`` of planes of ``P = H*W`` pixels; a conv
reads planes ``s_row0 .. s_row0 + C`` of one buffer and writes planes ``d_row0 ..`` of another (or
the same) buffer. Two kernels compute the same function with the same sums in the same order:

* :func:`dw_planes`, plane by plane (each plane by one thread);
* :func:`dw_groups`, channel-blocked: :data:`CB` channels at a time, transposed so that one output
  row of the CB channels is one unit-stride loop (the small planes of the last stages, see
  :func:`blocked`).

How the plane kernel is fast:

- Each call owns a zero scratch buffer. A plane is copied into it with its zero padding already
  in place, so the convolution loops carry no bounds branches and no index can be negative.
- For stride ``s > 1`` the padded plane is stored as ``s*s`` polyphase sub-planes
  (``sub[r, q][u, v] = xpad[s*u + r, s*v + q]``), so every tap of a strided conv becomes a
  contiguous, unit-stride load, exactly as for stride 1 (which is the case ``s = 1``).
- All sub-planes share one row pitch ``P = Wo + (K-1)//s``. The conv runs as one flat loop over
  ``t = i*P + j`` per tap, ``acc[t] += w[a, e] * sub[t + da*P + de]``; the ``P - Wo`` junk columns
  per row are computed and dropped. The loop is a plain ``range(n)`` over array views, which LLVM
  vectorises even on 10x10 planes.
- Rows are processed in blocks of about ``_BLOCK`` elements so the accumulator stays in L1, and the
  block is copied out (plus bias, activation, residual) while hot.

Summation order (both kernels, compiled through :mod:`._jit`: no FMA contraction, every ``+`` and
``*`` an IEEE operation in the array dtype): ``acc = w[c,0,0]*xp[..]``, then ``acc = acc +
w[c,a,e]*xp[s*i+a, s*j+e]`` over the remaining taps in row-major order, padding taps included
(they add ``w*0``), then ``y = act(acc + b[c]) (+ residual)``. Each plane (or group) is computed by
one thread with the same code, so the result is bit-identical for any thread count.
"""

from __future__ import annotations

import numba
import numpy as np

from ..ops import conv_output_size
from ..threads import PARALLEL_MIN_WORK
from ._jit import jit, one_launch_at_a_time, parallel_jit
from .epilogue import ACT_NONE, ACT_RELU, activate, make_consts

#: Accumulator block length (elements). 1024 float64 = 8 KiB, well inside L1 with the sources.
_BLOCK = 1024
#: Channels per group of the channel-blocked kernel (the vector lanes).
CB = 16
#: Output planes of at most this many pixels use the channel-blocked kernel (stride 1: about
#: 1.1-1.5x faster than the plane kernel on 10x10 planes, slower from 20x20 on; stride 2: faster
#: on 10x10 outputs only; other strides never).
_BLOCKED_MAX_PIXELS = {1: 256, 2: 100}


def blocked(ho, wo, stride):
    """True when a depthwise conv with (Ho, Wo) outputs at ``stride`` runs channel-blocked."""
    return ho * wo <= _BLOCKED_MAX_PIXELS.get(stride, 0)


@jit
def _copy_in_s2(xpl, scratch, p, pitch, sub_len, rows, qv0, qnv, qcol0):
    """Stride 2 with both column phases used: one deinterleaving pass per input row.

    Both phases start at input column 0 or 1, so one loop with the literal stride 2 reads the
    row once (LLVM vectorises it as a deinterleave).
    """
    qa = 0 if qcol0[0] == 0 else 1  # the phase whose first column is input column 0
    qb = 1 - qa
    na = qnv[qa]
    nb = qnv[qb]
    m = min(na, nb)
    for hh in range(xpl.shape[0]):
        r = (hh + p) % 2
        u = (hh + p) // 2
        if u >= rows:
            continue
        xrow = xpl[hh]
        base = r * 2 * sub_len + u * pitch
        da = scratch[base + qa * sub_len + qv0[qa]: base + qa * sub_len + qv0[qa] + na]
        db = scratch[base + qb * sub_len + qv0[qb]: base + qb * sub_len + qv0[qb] + nb]
        for v in range(m):
            da[v] = xrow[2 * v]
            db[v] = xrow[2 * v + 1]
        for v in range(m, na):
            da[v] = xrow[2 * v]
        for v in range(m, nb):
            db[v] = xrow[2 * v + 1]


@jit
def _copy_in_any(xpl, scratch, s, p, k, pitch, sub_len, rows, qv0, qnv, qcol0):
    """Any stride: sub-plane (r, q), row u, columns [qv0[q], qv0[q] + qnv[q]) <- x row s*u + r - p.

    Phases r, q >= K are never read by a tap and are skipped.
    """
    h = xpl.shape[0]
    for r in range(min(s, k)):
        for u in range(rows):
            hh = s * u + r - p
            if hh < 0 or hh >= h:
                continue
            xrow = xpl[hh]
            for q in range(min(s, k)):
                base = (r * s + q) * sub_len + u * pitch + qv0[q]
                dst = scratch[base: base + qnv[q]]
                src = xrow[qcol0[q]:]
                for v in range(qnv[q]):
                    dst[v] = src[s * v]


@jit
def _geometry(k, stride, padding, wd, ho, wo):
    """Plane-independent layout of the scratch buffer (see the module docstring).

    Returns ``(rows, pitch, sub_len, rb, qv0, qnv, qcol0)``: sub-plane rows and common row pitch,
    the length of one sub-plane in the scratch buffer, output rows per accumulator block, and for
    each column phase q the sub-plane columns ``[qv0[q], qv0[q] + qnv[q])`` that hold input columns
    ``qcol0[q] + s*(v - qv0[q])``; every other scratch position is zero padding.
    """
    s = stride
    p = padding
    d = (k - 1) // s  # taps reach d rows/cols past the output extent in each sub-plane
    rows = ho + d
    pitch = wo + d
    sub_len = rows * pitch + d  # + d slack: the flat loop over-reads d junk elements at the end
    rb = max(1, _BLOCK // pitch)
    qv0 = np.zeros(s, np.int64)
    qnv = np.zeros(s, np.int64)
    qcol0 = np.zeros(s, np.int64)
    for q in range(s):
        v0 = max(0, -((q - p) // s))  # first v with s*v + q - p >= 0
        v1 = min(pitch, (wd - 1 + p - q) // s + 1)  # past the last v with s*v + q - p <= W - 1
        if v1 > v0:
            qv0[q] = v0
            qnv[q] = v1 - v0
            qcol0[q] = s * v0 + q - p
    return rows, pitch, sub_len, rb, qv0, qnv, qcol0



@jit
def taps3_s1(acc, r0, r1, r2, n, wk):
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
        taps3_s1(acc, scratch[base:], scratch[base + pitch:], scratch[base + 2 * pitch:], n, wk)
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
def copy_out(acc, pitch, out, wo, i0, i1, bv, act, consts, has_res, rres):
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
            activate(o_row, wo, act, consts)
            if has_res:
                rr = rres[i * wo: i * wo + wo]
                for j in range(wo):
                    o_row[j] = o_row[j] + rr[j]


@jit
def dw_planes(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p, act,
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
            copy_out(acc, pitch, out, wo, i0, i1, bv, act, consts, has_res, res[n, r_row0 + c])


@jit
def depthwise(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p, act,
              consts, has_res):
    """All N*nch planes serially (see :func:`dw_planes`). ``wgt`` (nch, K*K), ``bias`` (nch,)."""
    nplanes = src.shape[0] * nch
    dw_planes(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p, act,
               consts, has_res, 0, nplanes)


@parallel_jit
def depthwise_parallel(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p,
                       act, consts, has_res, nchunks):
    """:func:`depthwise` with the planes split into ``nchunks`` contiguous chunks over prange."""
    nplanes = src.shape[0] * nch
    for chunk in numba.prange(nchunks):
        dw_planes(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p, act,
                   consts, has_res, chunk * nplanes // nchunks, (chunk + 1) * nplanes // nchunks)




@jit
def dw_groups(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wrep, bias, k, s, p, act,
               consts, has_res, lo, hi):
    """Groups ``lo <= g < hi`` of a fused depthwise conv, channel-blocked (for small planes).

    Group g = n*ngroups + gi covers channels ``[gi*CB, min(nch, (gi+1)*CB))`` of image n. Their
    planes are transposed into a zero-padded scratch where one pixel of the CB channels is CB
    consecutive values, and the columns of each padded row are stored by phase (``col % s``, then
    ``col // s``), so for every tap one output row is one flat, unit-stride loop of ``Wo*CB``
    values at any stride. ``wrep`` (ngroups, K*K, Wo*CB) holds each tap's CB weights tiled Wo
    times (zero past ``nch``). No per-plane loops: this is what makes 10x10 and 20x20 planes fast.

    Same function and the same summation order as :func:`dw_planes`: taps in row-major order,
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
                activate(out, ho * wo, act, consts)
                if has_res:
                    for t in range(ho * wo):
                        out[t] = out[t] + rr[t]


def blocked_weights(w, wo):
    """(C, K*K) depthwise weights -> (ceil(C/CB), K*K, Wo*CB) for :func:`dw_groups`: each tap's
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
    """All groups of all images serially (see :func:`dw_groups`)."""
    total = src.shape[0] * ((nch + CB - 1) // CB)
    dw_groups(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt_cb, bias, k, s, p, act,
               consts, has_res, 0, total)


@parallel_jit
def depthwise_blocked_parallel(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt_cb, bias, k,
                               s, p, act, consts, has_res, nchunks):
    """:func:`depthwise_blocked` with the groups split into ``nchunks`` chunks over prange."""
    total = src.shape[0] * ((nch + CB - 1) // CB)
    for chunk in numba.prange(nchunks):
        dw_groups(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt_cb, bias, k, s, p, act,
                   consts, has_res, chunk * total // nchunks, (chunk + 1) * total // nchunks)


def depthwise_conv2d(x, w, b=None, *, stride=1, padding=0):
    """Depthwise conv, the same function as ``ops.conv2d(x, w, b, stride=, padding=, groups=C)``.

    Parameters
    ----------
    x : (N, C, H, W) float32 or float64 array (made C-contiguous if it is not)
    w : (C, 1, K, K) array of x's dtype (channel multiplier 1, square kernel)
    b : (C,) array of x's dtype, or None
    stride : int >= 1, padding : int >= 0 (zero padding), the same along H and W

    Returns
    -------
    (N, C, Ho, Wo) array of x's dtype, ``Ho = (H + 2*padding - K)//stride + 1`` (same for Wo).

    The sums are those of the module docstring (the bias added last; without a bias nothing is
    added), so the result is bit-identical for any thread count, and differs from the plain op
    only by rounding order. Planes run in parallel when there are at least
    :data:`refghost.threads.PARALLEL_MIN_WORK` multiply-adds.

    Raises
    ------
    ValueError on shapes the op does not support (channel multiplier != 1, non-square kernel,
    channel mismatch, stride < 1, padding < 0, padded input smaller than the kernel) or on dtypes
    other than matching float32/float64.
    """
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"depthwise_conv2d: need x (N, C, H, W) and w (C, 1, K, K), "
                         f"got x {x.shape}, w {w.shape}")
    n, c, h, wd = x.shape
    if w.shape[1] != 1 or w.shape[0] != c or w.shape[2] != w.shape[3]:
        raise ValueError(f"depthwise_conv2d: x has {c} channels, so w must be ({c}, 1, K, K) "
                         f"(channel multiplier 1, square kernel); got {w.shape}")
    k = w.shape[2]
    if (x.dtype not in (np.float32, np.float64) or w.dtype != x.dtype
            or (b is not None and b.dtype != x.dtype)):
        raise ValueError(f"depthwise_conv2d: x, w, b must share one dtype, float32 or float64; got "
                         f"x {x.dtype}, w {w.dtype}, b {None if b is None else b.dtype}")
    if b is not None and b.shape != (c,):
        raise ValueError(f"depthwise_conv2d: b must be ({c},), got {b.shape}")
    stride = int(stride)
    padding = int(padding)
    if stride < 1 or padding < 0 or k < 1:
        raise ValueError(f"depthwise_conv2d: need stride >= 1, padding >= 0, K >= 1; got "
                         f"stride={stride}, padding={padding}, K={k}")
    if h + 2 * padding < k or wd + 2 * padding < k:
        raise ValueError(f"depthwise_conv2d: padded input {h + 2 * padding}x{wd + 2 * padding} is "
                         f"smaller than the {k}x{k} kernel")
    ho = conv_output_size(h, k, stride, padding)
    wo = conv_output_size(wd, k, stride, padding)
    y = np.empty((n, c, ho, wo), dtype=x.dtype)
    if not y.size:
        return y
    src = np.ascontiguousarray(x).reshape(n, c, h * wd)
    dst = y.reshape(n, c, ho * wo)
    wk = np.ascontiguousarray(w).reshape(c, k * k)
    # no bias: -0.0, the identity of IEEE addition (v + -0.0 is v, signed zeros included)
    bias = np.full(c, -0.0, x.dtype) if b is None else np.ascontiguousarray(b)
    if blocked(ho, wo, stride):
        wk = blocked_weights(wk, wo)
        units, serial, parallel = n * wk.shape[0], depthwise_blocked, depthwise_blocked_parallel
    else:
        units, serial, parallel = n * c, depthwise, depthwise_parallel
    # (the residual argument is unused without has_res: dst stands in)
    args = (src, 0, dst, 0, dst, 0, -1, c, h, wd, ho, wo, wk, bias, k, stride, padding, ACT_NONE,
            make_consts(x.dtype), False)
    nchunks = min(units, numba.get_num_threads())
    if nchunks > 1 and y.size * k * k >= PARALLEL_MIN_WORK:
        with one_launch_at_a_time():
            parallel(*args, nchunks)
    else:  # a small problem or one thread: no parallel-region launch
        serial(*args)
    return y
