"""Lowering: the recognised ops (:mod:`.recognise`) as program rows (:mod:`.program`) over one
arena of buffers and one array of parameters.

* **Layout.** Every tensor of C channels, H x W, lives in rows ``[1, 1+C)`` of a buffer
  ``(N, R, H*W)`` whose row 0 is ones, so a 1x1 conv with weights ``[b | W]`` is one GEMM with the
  bias included (:mod:`.pointwise`). A ghost module's primary and cheap halves are the two halves
  of one buffer: no concat.
* **Buffers reused.** Buffers are assigned by liveness to slots of equal plane size
  (:func:`assign_slots`); row 0 of a slot is ones for every tensor placed in it, so it is written
  once.
* **Fixed tiles.** GEMM tiles (:func:`gemm_tasks`) and stem bands are a function of the shapes
  only, never of the thread count.
"""

from __future__ import annotations

import numpy as np

from .. import ops
from ..kernels import activation
from ..kernels.depthwise import blocked, blocked_weights
from ..kernels.epilogue import make_consts
from ..threads import PARALLEL_MIN_WORK
from . import program as col
from .recognise import Op

#: 1x1 convs on planes of at least this many pixels run as column tiles of this width.
_GEMM_TILE_MIN_PLANE = 4096
_GEMM_TILE_COLUMNS = 512
#: Output rows per depthwise band of the fused ghost op (:mod:`.ghost`).
_GHOST_BAND_ROWS = 16


#: Bytes of a cache line: the arena starts on one (:func:`refghost.engine.plan`'s allocation).
CACHE_LINE = 64
#: Buffers and tiles start at multiples of this many elements: one cache line in float32.
ALIGN_ELEMENTS = CACHE_LINE // 4


def aligned(size):
    """``size`` rounded up to a multiple of :data:`ALIGN_ELEMENTS`."""
    return -(-size // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


def assign_slots(ops):
    """Liveness-based buffer slots: tensors with equal plane size share slots when not both alive.

    Returns the list of slots as [plane size P, rows R]; sets ``tensor.slot``.
    """
    last_use = {}
    for i, op in enumerate(ops):
        for t in op.reads + op.writes:
            last_use[id(t)] = i
    slots = []  # [p, rows]
    free = []
    for i, op in enumerate(ops):
        for t in op.writes:
            if t.slot >= 0:
                continue
            need = t.c + 1
            same = [s for s in free if slots[s][0] == t.p]
            fitting = [s for s in same if slots[s][1] >= need]
            if fitting:
                s = min(fitting, key=lambda s: slots[s][1])
            elif same:
                s = max(same, key=lambda s: slots[s][1])
                slots[s][1] = need
            else:
                s = len(slots)
                slots.append([t.p, need])
                free.append(s)
            free.remove(s)
            t.slot = s
        done = {id(t): t for t in op.reads + op.writes if last_use[id(t)] == i}
        free.extend(t.slot for t in done.values())
    return slots


def gemm_tasks(n, m, k, p):
    """The fixed tiling of a 1x1 conv (n images, M outputs, K inputs, P pixels): (T, program.TASK_COLS) int64.

    A function of the shapes only (never of the thread count), so every run makes the same BLAS
    calls. A conv of fewer than 2^17 multiply-adds is one tile. Above that, planes of at least
    4096 pixels are cut into tiles of 512 columns (the tile stays in
    cache for the activation pass; 1.3-1.5x faster than 4 tiles at 80x80 and 160x160); other
    large planes are split by columns (multiples of :data:`ALIGN_ELEMENTS`), and so are planes of 64 columns per
    part or more when there are at least twice as many inputs as outputs (each tile then packs
    only its own columns of the large input; splitting by rows would pack all of it per tile).
    Other small planes are split by output rows (multiples of 8).
    """
    macs = m * k * p
    parts = 1 if macs < (1 << 17) else (2 if macs < (1 << 21) else 4)
    tasks = []
    for img in range(n):
        if parts > 1 and p >= _GEMM_TILE_MIN_PLANE:
            edges = list(range(0, p, _GEMM_TILE_COLUMNS)) + [p]
            tasks += [(img, 0, m, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
        elif parts > 1 and (p >= 256 * parts or (2 * m <= k and p >= 64 * parts)):
            edges = [min(p, aligned(p * i // parts)) for i in range(parts)] + [p]
            tasks += [(img, 0, m, edges[i], edges[i + 1]) for i in range(parts) if edges[i] < edges[i + 1]]
        elif parts > 1 and m >= 8 * parts:
            edges = [min(m, ((m * i // parts) + 7) // 8 * 8) for i in range(parts)] + [m]
            tasks += [(img, edges[i], edges[i + 1], 0, p) for i in range(parts) if edges[i] < edges[i + 1]]
        else:
            tasks.append((img, 0, m, 0, p))
    return np.array(tasks, dtype=np.int64).reshape(-1, col.TASK_COLS)


class Lowering:
    """Lowers ops to program rows over ``buffers`` (slot -> (N, R, P) view at ``buffer_offsets`` in
    the arena), collecting their parameter arrays; the classifier head, which runs from Python,
    writes its logits into ``result``.

    After the ops are lowered: :meth:`params` and :meth:`ints` (the packed arrays the rows point
    into), ``outputs`` (name, offset per image, (n, c, h, w)), ``out_size`` (per image),
    ``shared_size`` (scratch of the squeeze-excite of a small batch) and ``flags_size`` (row flags
    of the fused ghost ops).
    """

    def __init__(self, dtype, buffers, buffer_offsets, result):
        self.dtype = np.dtype(dtype)
        self.buffers = buffers
        self.buffer_offsets = buffer_offsets
        self.result = result
        self._params, self._params_size = [], 0
        self._ints, self._ints_size = [], 0
        self.outputs = []
        self.out_size = 0
        self.shared_size = 0
        self.flags_size = 0

    def params(self):
        return _pack(self._params, self._params_size, self.dtype)

    def ints(self):
        return _pack(self._ints, self._ints_size, np.int64)

    def _param(self, a):
        """Offset of array ``a`` (cast to the compute dtype) in the parameter array."""
        a = np.ascontiguousarray(a, dtype=self.dtype)
        off = self._params_size
        self._params.append((off, a))
        self._params_size += aligned(a.size)
        return off

    def _int_param(self, a):
        a = np.ascontiguousarray(a, dtype=np.int64)
        off = self._ints_size
        self._ints.append((off, a))
        self._ints_size += a.size
        return off

    def _buf(self, t):
        """(offset, rows, plane size) of tensor ``t``'s buffer in the arena."""
        return self.buffer_offsets[t.slot], self.buffers[t.slot].shape[1], t.p

    def _cast(self, a):
        return np.ascontiguousarray(a, dtype=self.dtype)

    def _row(self, kind, columns, slope=0.0):
        return ("row", col.row(kind, columns), make_consts(self.dtype, slope))

    def lower(self, op):
        """The op as a list of ("row", program row, consts) and ("python", step) items."""
        a = op.args
        if op.kind == "stem":
            y_t = op.writes[0]
            y = self.buffers[y_t.slot]
            w = self._cast(a["w"])
            m, kk = w.shape
            # bands of output rows whose column matrix (kk x band*Wo) stays within about 32 KiB (L1;
            # measured at 320x320: 1-2 rows per band beat 9 and 20)
            band = max(1, min(y_t.h, (32 * 1024 // (w.itemsize * kk)) // max(1, y_t.w)))
            work = y.shape[0] * m * kk * y_t.p
            return [self._row(col.OP_STEM, {
                col.STEM_Y_BUF: self._buf(y_t), col.STEM_W: self._param(w), col.STEM_M: m, col.STEM_KK: kk,
                col.STEM_K: a["k"], col.STEM_STRIDE: a["s"], col.STEM_PADDING: a["p"], col.STEM_HO: y_t.h,
                col.STEM_WO: y_t.w, col.STEM_ACT: a["code"], col.STEM_BAND: band,
                col.STEM_PARALLEL: work >= PARALLEL_MIN_WORK}, a["slope"])] + self._generic(a, y, 1, m)
        if op.kind == "gemm":
            x_t, y_t = op.reads[0], op.writes[0]
            x, y = self.buffers[x_t.slot], self.buffers[y_t.slot]
            w = self._cast(a["w"])
            m, k = w.shape
            tasks = gemm_tasks(x.shape[0], m, k, x_t.p)
            row0 = 1 + a["row0"]
            return [self._row(col.OP_GEMM, self._gemm_columns(x_t, y_t, w, row0, tasks, a["code"]),
                              a["slope"])] + self._generic(a, y, row0, m)
        if op.kind == "ghost":
            x_t, y_t = op.reads[0], op.writes[0]
            w = self._cast(a["w"])
            m, k = w.shape
            tasks = gemm_tasks(self.buffers[x_t.slot].shape[0], m, k, x_t.p)
            order = np.lexsort((tasks[:, 3], tasks[:, 0]))
            if not ((tasks[:, 1] == 0).all() and (tasks[:, 2] == m).all() and (order == np.arange(len(tasks))).all()):
                # not column tiles in pixel order: the two ops of the unfused path
                gemm = Op("gemm", op.reads, op.writes, dict(w=a["w"], row0=0, **a["act_p"]))
                dw = Op("dw", op.writes, op.writes, dict(
                    src=y_t, s_row0=0, dst=y_t, d_row0=m, nch=m, w=a["wdw"], b=a["bdw"], k=3, s=1, p=1, res=None,
                    res_row0=0, pre_row0=-1, **a["act_c"]))
                return self.lower(gemm) + self.lower(dw)
            nimg = self.buffers[y_t.slot].shape[0]
            columns = self._gemm_columns(x_t, y_t, w, 1, tasks, a["act1"])
            columns.update({
                col.GHOST_DW_W: self._param(a["wdw"]), col.GHOST_DW_BIAS: self._param(a["bdw"]),
                col.GHOST_DW_ACT: a["act2"], col.GHOST_H: y_t.h, col.GHOST_W: y_t.w,
                col.GHOST_BAND: min(_GHOST_BAND_ROWS, y_t.h), col.GHOST_FLAGS: self.flags_size})
            self.flags_size += nimg * y_t.h
            return [self._row(col.OP_GHOST, columns, a["slope"])]
        if op.kind == "dw":
            return self._lower_depthwise(a)
        if op.kind == "se":
            x_t = a["x"]
            nch = x_t.c
            nimg = self.buffers[x_t.slot].shape[0]
            wr_t = a["wr_t"]
            self.shared_size = max(self.shared_size, nimg * (nch + wr_t.shape[1]))
            return [self._row(col.OP_SE, {
                col.SE_X_BUF: self._buf(x_t), col.SE_NCH: nch, col.SE_REDUCED: wr_t.shape[1],
                col.SE_WR_T: self._param(wr_t), col.SE_BR: self._param(a["br"]), col.SE_WE_T: self._param(a["we_t"]),
                col.SE_BE: self._param(a["be"]), col.SE_PARALLEL: nimg * nch * x_t.p >= PARALLEL_MIN_WORK})]
        if op.kind == "output":
            t = a["x"]
            nimg = self.buffers[t.slot].shape[0]
            off = self.out_size
            self.outputs.append((a["name"], off, (nimg, t.c, t.h, t.w)))
            self.out_size += aligned(t.c * t.p)
            return [self._row(col.OP_OUTPUT, {col.OUT_BUF: self._buf(t), col.OUT_NCH: t.c, col.OUT_OFFSET: off})]
        if op.kind == "classifier":
            return [("python", self._classifier_step(a))]
        raise AssertionError(op.kind)

    def _gemm_columns(self, x_t, y_t, w, row0, tasks, act):
        """The columns of a 1x1 conv of x_t into rows from ``row0`` of y_t (OP_GEMM, OP_GHOST)."""
        m, k = w.shape
        y_off, y_rows, _ = self._buf(y_t)
        return {col.GEMM_X_BUF: self._buf(x_t), col.GEMM_Y_OFFSET: y_off, col.GEMM_Y_ROWS: y_rows,
                col.GEMM_W: self._param(w), col.GEMM_M: m, col.GEMM_K: k, col.GEMM_Y_ROW0: row0,
                col.GEMM_TASKS: self._int_param(tasks), col.GEMM_NTASKS: tasks.shape[0], col.GEMM_ACT: act,
                col.GEMM_PARALLEL: tasks.shape[0] > 1}

    def _lower_depthwise(self, a):
        src_t, dst_t, res_t = a["src"], a["dst"], a["res"]
        dst = self.buffers[dst_t.slot]
        has_res = res_t is not None
        w = self._cast(a["w"])
        nch, k, s, p = a["nch"], a["k"], a["s"], a["p"]
        d_row0 = 1 + a["d_row0"]
        ho, wo = dst_t.h, dst_t.w
        nimg = dst.shape[0]
        columns = {
            col.DW_SRC_BUF: self._buf(src_t), col.DW_DST_BUF: self._buf(dst_t),
            col.DW_RES_BUF: self._buf(res_t) if has_res else self._buf(dst_t), col.DW_SRC_ROW0: 1 + a["s_row0"],
            col.DW_DST_ROW0: d_row0, col.DW_RES_ROW0: 1 + a["res_row0"] if has_res else 0,
            col.DW_PRE_ROW0: 1 + a["pre_row0"] if a["pre_row0"] >= 0 else -1, col.DW_NCH: nch, col.DW_H: src_t.h,
            col.DW_W: src_t.w, col.DW_HO: ho, col.DW_WO: wo, col.DW_BIAS: self._param(a["b"]),
            col.DW_K: k, col.DW_STRIDE: s, col.DW_PADDING: p, col.DW_ACT: a["code"], col.DW_HAS_RES: has_res,
            col.DW_PARALLEL: nimg * nch * ho * wo * k * k >= PARALLEL_MIN_WORK}
        if blocked(ho, wo, s):
            wcb = blocked_weights(w, wo)
            kind = col.OP_DW_BLOCKED
            columns[col.DW_WEIGHTS_DIM2] = wcb.shape[2]
            columns[col.DW_UNITS] = nimg * wcb.shape[0]
        else:
            wcb = w
            kind = col.OP_DW
            columns[col.DW_UNITS] = nimg * nch
        columns.update({col.DW_WEIGHTS: self._param(wcb), col.DW_WEIGHTS_DIM0: wcb.shape[0],
                        col.DW_WEIGHTS_DIM1: wcb.shape[1]})
        return [self._row(kind, columns, a["slope"])] + self._generic(a, dst, d_row0, nch)

    def _classifier_step(self, a):
        """The classifier head (pooling, conv_head, ReLU, linear) as a Python step."""
        t = a["x"]
        buf = self.buffers[t.slot]
        wh_t, bh = self._cast(a["wh"].T), self._cast(a["bh"])
        wc_t, bc = self._cast(a["wc"].T), self._cast(a["bc"])
        name = a["name"]
        result = self.result

        def step():
            pooled = buf[:, 1:1 + t.c, :].mean(axis=2)
            hidden = ops.relu(np.matmul(pooled, wh_t) + bh)
            result[name] = np.matmul(hidden, wc_t) + bc
        return step

    def _generic(self, a, buf, row0, nch):
        """The slower elementwise pass for activations without a fused epilogue ([] or one step)."""
        if a.get("generic") is None:
            return []
        name = a["generic"]
        weight = None if a["weight"] is None else self._cast(a["weight"])
        view = buf[:, row0:row0 + nch, :]

        def apply():
            view[...] = activation(name, view, weight)
        return [("python", apply)]


def _pack(chunks, size, dtype):
    out = np.zeros(max(size, 1), dtype=dtype)
    for off, a in chunks:
        out[off: off + a.size] = a.ravel()
    return out
