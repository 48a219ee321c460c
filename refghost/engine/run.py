"""The program runner: a run of program rows (:mod:`.program`) in one compiled call and one
parallel region, and :func:`execute`, the one way to call it.

Every thread walks the whole program and takes the units of each op from an atomic counter
(:mod:`.counters`), so a thread that loses its core to another process holds up only the unit it
is on, not half of every op. Each op calls its kernel module's per-unit function (a GEMM tile of
:mod:`.pointwise`, a plane or channel group of :mod:`refghost.kernels.depthwise`, an image or chunk
of :mod:`.squeeze_excite`, a band of :mod:`.stem` or :mod:`.ghost`), and every unit of work is computed by one thread with the same
code, so the results are the same bits for any thread count and any interleaving.
"""

from __future__ import annotations

import numba
import numpy as np

from ..kernels._jit import jit, parallel_jit
from ..kernels.depthwise import dw_groups, dw_planes
from . import program as col
from .counters import PHASES, STRIDE, claim, finish, wait_done
from .ghost import ghost_chunk, ghost_rest
from .pointwise import gemm_task
from .program import OP_DW, OP_DW_BLOCKED, OP_GEMM, OP_GHOST, OP_OUTPUT, OP_SE, OP_STEM, buffer, view2, view3
from .squeeze_excite import se_op
from .stem import stem_band

#: ``images`` argument of :func:`run_program` for the op-by-op mode.
OP_BY_OP = np.zeros(5, np.int64)
#: Chunks per thread of the ops whose units are planes, groups or bands (handed out dynamically:
#: more chunks balance better, each chunk pays for its scratch).
_CHUNKS_PER_THREAD = 4


def execute(prog, consts, x, out, *, arena, params, ints, sync, shared, flags, images=OP_BY_OP):
    """Run program rows ``prog`` on input ``x`` with Numba's thread count (see :func:`run_program`
    for the arguments); zeroes the work counters ``sync`` and the row flags ``flags`` first. The
    caller holds BLAS at one thread (:func:`refghost.threads.single_threaded_blas`)."""
    sync[:] = 0
    flags[:] = 0
    run_program(prog, consts, arena, params, ints, x, out, numba.get_num_threads(), sync, shared, flags, images)


@parallel_jit
def run_program(prog, consts_all, arena, params, ints, x, out, nthreads, sync, shared, flags, images):
    """Run program rows ``prog`` (T, :data:`~.program.COLS`) in one parallel region, in one of two
    ways:

    * **op by op** (``images[0] == 0``): all N images of ``x`` through each op in turn, the units
      of every op shared by ``nthreads`` threads (:func:`_run_ops` on every thread);
    * **image by image** (``images[0] = W > 0``): W workers take whole images from a counter and
      run each through all the ops alone (``nthreads`` = 1 in :func:`_run_ops`), each with its own
      part of ``arena``, ``sync``, ``shared`` and ``flags``: ``images`` is (W, arena, sync, shared,
      flags) lengths per worker; ``sync`` holds the image counter in its first ``counters.STRIDE``
      elements, then the workers' parts. ``prog`` is then a plan for one image. The same units
      with the same code, so the same bits as op by op.

    ``params`` holds the parameter arrays and ``ints`` the GEMM tile lists at the offsets the rows
    name; ``consts_all[i]`` is row i's ``consts`` (:func:`refghost.kernels.epilogue.make_consts`);
    ``out`` (1-D) receives the output copies; ``x`` is the input (N, C, H, W). ``sync`` (int64,
    ``T * counters.PHASES * counters.STRIDE``) and ``flags`` (int8: the ghost ops' row flags) must
    be zero; ``shared`` (compute dtype) is scratch for the squeeze-excite of a batch smaller than
    the thread count (N * (C + reduced C) of its largest SE).
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


@jit
def _run_ops(prog, consts_all, arena, params, ints, x, out, nthreads, sync, shared, flags, img0, nbatch):
    """One thread's walk through the program (see :func:`run_program`) for images ``x`` (n, C, H, W),
    images ``img0 .. img0 + n`` of a batch of ``nbatch`` (where the outputs go in ``out``). For
    each op phase the thread claims units until none is left, then waits until all are done
    (:mod:`.counters`)."""
    nimg = x.shape[0]
    for i in range(prog.shape[0]):
        r = prog[i]
        kind = r[col.KIND]
        consts = consts_all[i]
        q = i * PHASES
        if kind == OP_GEMM:
            _gemm_op(r, arena, params, ints, nimg, consts, sync, q)
        elif kind == OP_DW or kind == OP_DW_BLOCKED:
            _dw_op(r, arena, params, nimg, nthreads, consts, sync, q)
        elif kind == OP_SE:
            se_op(r, arena, params, nimg, nthreads, consts, sync, q, shared)
        elif kind == OP_STEM:
            _stem_op(r, arena, params, x, nimg, nthreads, consts, sync, q)
        elif kind == OP_GHOST:
            _ghost_op(r, arena, params, ints, flags, nimg, nthreads, consts, sync, q)
        elif kind == OP_OUTPUT:
            _output_op(r, arena, out, nimg, img0, nbatch, sync, q)


@jit
def _gemm_op(r, arena, params, ints, nimg, consts, sync, q):
    """OP_GEMM: one unit per tile (:func:`~.pointwise.gemm_task`)."""
    xb = buffer(arena, r, col.GEMM_X_BUF, nimg)
    yb = view3(arena, r[col.GEMM_Y_OFFSET], nimg, r[col.GEMM_Y_ROWS], r[col.GEMM_X_BUF + col.BUF_PLANE])
    w = view2(params, r[col.GEMM_W], r[col.GEMM_M], r[col.GEMM_K])
    tasks = view2(ints, r[col.GEMM_TASKS], r[col.GEMM_NTASKS], np.int64(col.TASK_COLS))
    units = tasks.shape[0]
    u = claim(sync, q)
    while u < units:
        gemm_task(w, xb, yb, r[col.GEMM_Y_ROW0], tasks[u], r[col.GEMM_ACT], consts)
        finish(sync, q)
        u = claim(sync, q)
    wait_done(sync, q, units)


@jit
def _dw_op(r, arena, params, nimg, nthreads, consts, sync, q):
    """OP_DW / OP_DW_BLOCKED: units are chunks of planes (:func:`~refghost.kernels.depthwise.dw_planes`)
    or of channel groups (:func:`~refghost.kernels.depthwise.dw_groups`)."""
    src = buffer(arena, r, col.DW_SRC_BUF, nimg)
    dst = buffer(arena, r, col.DW_DST_BUF, nimg)
    res = buffer(arena, r, col.DW_RES_BUF, nimg)
    s_row0, d_row0, r_row0, pre_row0 = r[col.DW_SRC_ROW0], r[col.DW_DST_ROW0], r[col.DW_RES_ROW0], r[col.DW_PRE_ROW0]
    nch, h, wd, ho, wo = r[col.DW_NCH], r[col.DW_H], r[col.DW_W], r[col.DW_HO], r[col.DW_WO]
    bias = params[r[col.DW_BIAS]: r[col.DW_BIAS] + nch]
    k, s, p, act = r[col.DW_K], r[col.DW_STRIDE], r[col.DW_PADDING], r[col.DW_ACT]
    has_res = r[col.DW_HAS_RES] != 0
    planes = r[col.DW_UNITS]
    units = min(planes, _CHUNKS_PER_THREAD * nthreads) if r[col.DW_PARALLEL] != 0 else 1
    u = claim(sync, q)
    while u < units:
        lo, hi = u * planes // units, (u + 1) * planes // units
        if r[col.KIND] == OP_DW:
            wgt = view2(params, r[col.DW_WEIGHTS], r[col.DW_WEIGHTS_DIM0], r[col.DW_WEIGHTS_DIM1])
            dw_planes(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wgt, bias, k, s, p, act,
                      consts, has_res, lo, hi)
        else:
            wcb = view3(params, r[col.DW_WEIGHTS], r[col.DW_WEIGHTS_DIM0], r[col.DW_WEIGHTS_DIM1],
                        r[col.DW_WEIGHTS_DIM2])
            dw_groups(src, s_row0, dst, d_row0, res, r_row0, pre_row0, nch, h, wd, ho, wo, wcb, bias, k, s, p, act,
                      consts, has_res, lo, hi)
        finish(sync, q)
        u = claim(sync, q)
    wait_done(sync, q, units)


@jit
def _stem_op(r, arena, params, x, nimg, nthreads, consts, sync, q):
    """OP_STEM: units are chunks of bands of output rows (:func:`~.stem.stem_band`)."""
    yb = buffer(arena, r, col.STEM_Y_BUF, nimg)
    w = view2(params, r[col.STEM_W], r[col.STEM_M], r[col.STEM_KK])
    k, s, p = r[col.STEM_K], r[col.STEM_STRIDE], r[col.STEM_PADDING]
    ho, wo, act, band = r[col.STEM_HO], r[col.STEM_WO], r[col.STEM_ACT], r[col.STEM_BAND]
    nbands = (ho + band - 1) // band
    bands = nimg * nbands
    wq = (x.shape[3] + 2 * p + s - 1) // s
    units = min(bands, _CHUNKS_PER_THREAD * nthreads) if r[col.STEM_PARALLEL] != 0 else 1
    u = claim(sync, q)
    if u < units:
        tile = np.empty(r[col.STEM_KK] * band * wo, yb.dtype)
        ph = np.zeros(s * wq, yb.dtype)
    while u < units:
        for b in range(u * bands // units, (u + 1) * bands // units):
            i0 = (b % nbands) * band
            stem_band(x, b // nbands, w, yb, 1, k, s, p, ho, wo, i0, min(ho, i0 + band), act, consts, tile, ph)
        finish(sync, q)
        u = claim(sync, q)
    wait_done(sync, q, units)


@jit
def _ghost_op(r, arena, params, ints, flags, nimg, nthreads, consts, sync, q):
    """OP_GHOST: units are chunks of the primary conv's tiles, each with the depthwise rows it
    completes (:func:`~.ghost.ghost_chunk`); then one unit for the rows left (:func:`~.ghost.ghost_rest`)."""
    xb = buffer(arena, r, col.GEMM_X_BUF, nimg)
    yb = view3(arena, r[col.GEMM_Y_OFFSET], nimg, r[col.GEMM_Y_ROWS], r[col.GEMM_X_BUF + col.BUF_PLANE])
    m = r[col.GEMM_M]
    w = view2(params, r[col.GEMM_W], m, r[col.GEMM_K])
    tasks = view2(ints, r[col.GEMM_TASKS], r[col.GEMM_NTASKS], np.int64(col.TASK_COLS))
    wdw = view2(params, r[col.GHOST_DW_W], m, np.int64(9))
    bdw = params[r[col.GHOST_DW_BIAS]: r[col.GHOST_DW_BIAS] + m]
    h, wd, band = r[col.GHOST_H], r[col.GHOST_W], r[col.GHOST_BAND]
    row0, act2 = r[col.GEMM_Y_ROW0], r[col.GHOST_DW_ACT]
    done = flags[r[col.GHOST_FLAGS]: r[col.GHOST_FLAGS] + nimg * h]
    ntasks = tasks.shape[0]
    units = min(nthreads, ntasks) if r[col.GEMM_PARALLEL] != 0 else 1
    u = claim(sync, q)
    while u < units:
        ghost_chunk(w, xb, yb, row0, tasks, u * ntasks // units, (u + 1) * ntasks // units, r[col.GEMM_ACT], wdw,
                    bdw, act2, consts, h, wd, band, done)
        finish(sync, q)
        u = claim(sync, q)
    wait_done(sync, q, units)
    if claim(sync, q + 1) == 0:
        ghost_rest(yb, row0, m, h, wd, wdw, bdw, act2, consts, band, done)
        finish(sync, q + 1)
    wait_done(sync, q + 1, np.int64(1))


@jit
def _output_op(r, arena, out, nimg, img0, nbatch, sync, q):
    """OP_OUTPUT: one unit copies the tensor's channels of these images into ``out``."""
    if claim(sync, q) == 0:
        b = buffer(arena, r, col.OUT_BUF, nimg)
        c, p = r[col.OUT_NCH], r[col.OUT_BUF + col.BUF_PLANE]
        o = r[col.OUT_OFFSET] * nbatch + img0 * c * p
        for n in range(nimg):
            for ci in range(c):
                src = b[n, 1 + ci]
                dst = out[o + (n * c + ci) * p: o + (n * c + ci + 1) * p]
                for t in range(p):
                    dst[t] = src[t]
        finish(sync, q)
    wait_done(sync, q, np.int64(1))
