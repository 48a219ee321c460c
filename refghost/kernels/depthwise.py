"""Depthwise 2-D convolution (channel multiplier 1) as a parallel Numba kernel.

Computes the same function as ``refghost.ops.conv2d(x, w, b, stride=s, padding=p, groups=C)``;
only the summation order differs (see :func:`depthwise_conv2d`).

How it is fast (research notes, performance.md section 4 and performance-feasibility.md section 6):

- Each thread owns a zero scratch buffer. A plane is copied into it with its zero padding already
  in place, so the convolution loops carry no bounds branches and no index can be negative.
- For stride ``s > 1`` the padded plane is stored as ``s*s`` polyphase sub-planes
  (``sub[r, q][u, v] = xpad[s*u + r, s*v + q]``), so every tap of a strided conv becomes a
  contiguous, unit-stride load, exactly as for stride 1 (which is the case ``s = 1``).
- All sub-planes share one row pitch ``P = Wo + (K-1)//s``. The conv runs as one flat loop over
  ``t = i*P + j`` per tap, ``acc[t] += w[a, e] * sub[t + da*P + de]``; the ``P - Wo`` junk columns
  per row are computed and dropped. The loop is a plain ``range(n)`` over array views, which LLVM
  vectorises even on 10x10 planes.
- Rows are processed in blocks of about ``_BLOCK`` elements so the accumulator stays in L1, and the
  block is copied out (plus bias) while hot.
- Parallel over the N*C planes with ``numba.prange`` over static chunks (tiny calls run serially);
  one plane is always done by one thread with the same code, so results do not depend on the thread
  count. No BLAS is called.
"""

from __future__ import annotations

import numba
import numpy as np

from ..ops import conv_output_size
from ._jit import jit, one_launch_at_a_time, parallel_jit

#: Accumulator block length (elements). 1024 float64 = 8 KiB, well inside L1 with the sources.
_BLOCK = 1024
#: Below this many multiply-adds a call runs serially: a parallel region costs microseconds to
#: launch (and much more when another process holds the other core). GhostNet's smallest
#: depthwise layer at 320x320 input (480x10x10, 3x3) has 432,000.
_PARALLEL_MIN_MACS = 1 << 16


@jit
def _copy_in_s1(xpl, scratch, p, pitch, v0, nv):
    """Stride 1: row hh of the plane goes to padded row hh + p, columns [v0, v0 + nv)."""
    for hh in range(xpl.shape[0]):
        xrow = xpl[hh]
        dst = scratch[(hh + p) * pitch + v0: (hh + p) * pitch + v0 + nv]
        for v in range(nv):
            dst[v] = xrow[v]


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
def _planes(x, w, b, has_bias, stride, padding, y, lo, hi):
    """y[pl] = depthwise conv of x[pl] with w[pl % C] (+ b[pl % C]) for planes lo <= pl < hi.

    x: (NC, H, W) C-contiguous, w: (C, K, K), b: (C,), y: (NC, Ho, Wo), all one float dtype.
    Serial; allocates its own zero scratch, so concurrent calls on disjoint planes are safe.
    """
    wd = x.shape[2]
    ho, wo = y.shape[1], y.shape[2]
    nch, k = w.shape[0], w.shape[1]
    s = stride
    p = padding
    rows, pitch, sub_len, rb, qv0, qnv, qcol0 = _geometry(k, s, p, wd, ho, wo)
    # Positions never written below stay zero: they are the padding, identical for every plane.
    scratch = np.zeros(s * s * sub_len, dtype=x.dtype)
    acc = np.empty(rb * pitch, dtype=x.dtype)
    s2_both = s == 2 and k >= 2 and qnv[0] > 0 and qnv[1] > 0
    v0_1 = qv0[0]
    nv_1 = qnv[0]
    for pl in range(lo, hi):
        c = pl % nch
        # --- copy in: sub[r, q][u, v] = x[s*u + r - p, s*v + q - p] where that is inside x
        if s == 1:
            _copy_in_s1(x[pl], scratch, p, pitch, v0_1, nv_1)
        elif s2_both:
            _copy_in_s2(x[pl], scratch, p, pitch, sub_len, rows, qv0, qnv, qcol0)
        else:
            _copy_in_any(x[pl], scratch, s, p, k, pitch, sub_len, rows, qv0, qnv, qcol0)
        # --- convolve, one block of output rows at a time: taps in row-major order
        for i0 in range(0, ho, rb):
            i1 = min(ho, i0 + rb)
            n = (i1 - i0 - 1) * pitch + wo  # the last row's junk columns are not needed
            for a in range(k):
                r = a % s
                da = a // s
                for e in range(k):
                    q = e % s
                    de = e // s
                    off = (r * s + q) * sub_len + (i0 + da) * pitch + de
                    src = scratch[off: off + n]
                    wv = w[c, a, e]
                    if a == 0 and e == 0:
                        for t in range(n):
                            acc[t] = wv * src[t]
                    else:
                        for t in range(n):
                            acc[t] += wv * src[t]
            # --- copy out, bias added last
            for i in range(i0, i1):
                row = acc[(i - i0) * pitch: (i - i0) * pitch + wo]
                out = y[pl, i]
                if has_bias:
                    bv = b[c]
                    for j in range(wo):
                        out[j] = row[j] + bv
                else:
                    for j in range(wo):
                        out[j] = row[j]


@parallel_jit
def _planes_parallel(x, w, b, has_bias, stride, padding, y, nchunks):
    """:func:`_planes` over all planes, split into ``nchunks`` contiguous chunks run by prange."""
    nplanes = x.shape[0]
    for chunk in numba.prange(nchunks):
        _planes(x, w, b, has_bias, stride, padding, y,
                chunk * nplanes // nchunks, (chunk + 1) * nplanes // nchunks)


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

    Summation order
    ---------------
    Each output element is computed by one thread, in x's dtype, with no FMA contraction:
    ``acc = w[c,0,0]*xp[..]``, then ``acc += w[c,0,a,e]*xp[s*i+a, s*j+e]`` over the remaining taps
    in row-major order ``(a, e) = (0,1), ..., (0,K-1), (1,0), ..., (K-1,K-1)``, padding taps
    included (they add ``w*0``), and the bias is added last: ``y = acc + b[c]``. So the result is
    bit-identical for any thread count, and differs from the plain op only by rounding order.

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
    xs = np.ascontiguousarray(x).reshape(n * c, h, wd)
    ws = np.ascontiguousarray(w).reshape(c, k, k)
    bs = np.zeros(c, x.dtype) if b is None else np.ascontiguousarray(b)
    y = np.empty((n, c, ho, wo), dtype=x.dtype)
    if y.size:
        ys = y.reshape(n * c, ho, wo)
        nchunks = min(n * c, numba.get_num_threads())
        if nchunks > 1 and y.size * k * k >= _PARALLEL_MIN_MACS:
            with one_launch_at_a_time():
                _planes_parallel(xs, ws, bs, b is not None, stride, padding, ys, nchunks)
        else:  # tiny problem or one thread: skip the parallel-region launch
            _planes(xs, ws, bs, b is not None, stride, padding, ys, 0, n * c)
    return y
