"""The execution engine: a GhostNet graph and its weights compiled into a plan of fused kernels.

:func:`refghost.run` uses it when no intermediates are asked for (``impl="fast"``); the node-by-node
interpreter (:mod:`refghost.forward`) stays the readable definition and the path for
``intermediates=True`` (folding removes the per-module tensors). Both compute in the requested
dtype; they differ only in rounding order, within the bounds of :mod:`refghost.bounds`
(``tests/test_engine.py``).

What the plan does (research: /work/shared/research/performance-feasibility.md):

* **BN folded** into each conv's weights and bias, in float64, then cast to the compute dtype.
* **Layout.** Every tensor of C channels, H x W, lives in rows ``[1, 1+C)`` of a preallocated
  buffer ``(N, R, H*W)`` whose row 0 is ones, so a 1x1 conv with weights ``[b | W]`` is one GEMM
  with the bias included (:mod:`refghost.kernels.fused`). A ghost module's primary and cheap halves
  are the two halves of one buffer: no concat.
* **Buffers reused.** Buffers are assigned by liveness to slots of equal plane size; row 0 of a
  slot is ones for every tensor placed in it, so it is written once.
* **Fused epilogues.** ReLU / LeakyReLU / PReLU / ReLU6 run on each GEMM tile while it is in cache;
  the depthwise kernel adds bias, activation and the residual in its copy-out, and adds the
  residual to the primary half in its copy-in (ghost2). Other activations (SELU, ELU, GELU, SiLU,
  HardSwish) run as a separate elementwise pass with the interpreter's fast activation.
* **One thread pool.** GEMM tiles are called from inside Numba's ``prange``
  (:mod:`refghost.kernels.blas`) with the BLAS library held at one thread by
  :func:`blas_single_threaded`, the one place that touches thread settings. Numba's thread count
  (``numba.set_num_threads`` / ``NUMBA_NUM_THREADS``) is the only knob.
* **Deterministic.** GEMM tiles and stem bands are a fixed function of the shapes; depthwise
  planes, SE images and SE channels are each computed by one thread with the same code, whatever
  thread takes them. The results are bit-identical for any thread count and from run to run.
* **One compiled call, one parallel region.** The ops are lowered to rows of an int64 program over
  one 64-byte-aligned arena of buffers and one array of parameters, and run by
  :func:`refghost.kernels.fused.run_program` (no Python between ops; only activations without a
  fused epilogue and the classifier head run from Python, between runs of rows). Every thread
  walks the whole program and takes the units of each op from an atomic counter
  (:mod:`refghost.kernels.sync`), so a thread that loses its core to another process holds up
  only the unit it is on, not half of every op.
* **Batches image by image.** With at least as many images as threads, each thread takes whole
  images through the one-image program on its own copy of the buffers (:class:`ImagePlan`): an
  image's activations stay near its core, and the buffers are the threads' images', not the
  batch's. The same units, so the same bits as op by op.
* **Ghost modules fused** (planes of at least 80x80, no residual): the primary conv's GEMM tiles
  and the 3x3 depthwise of the completed rows run as one op, band by band (the same bits).
* **Stem.** The dense KxK stem conv builds its column matrix band by band in a cache-sized
  scratch and calls one GEMM per band (no full im2col buffer).

:func:`get_plan` compiles once per (dtype, input shape) and caches the plan on the
:class:`~refghost.weights.Weights` object. :class:`EngineUnsupported` means "use the
interpreter" (an unexpected graph, or no BLAS the kernels can call).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import ops
from .arch import NUM_STAGES, Graph
from .forward import single_threaded_blas

#: Activations with a fused epilogue, by code (see refghost.kernels.fused).
_FAST_ACTS = {"Identity": 0, "ReLU": 1, "LeakyReLU": 2, "PReLU": 2, "ReLU6": 3}
#: 1x1 convs on planes of at least this many pixels run as column tiles of this width.
_GEMM_TILE_MIN_PLANE = 4096
_GEMM_TILE_COLUMNS = 512
#: Plans kept per Weights object (each holds its buffers).
MAX_CACHED_PLANS = 4
#: Below this many multiply-adds a depthwise layer, an SE or the stem runs serially.
_PARALLEL_MIN_WORK = 1 << 15
#: Depthwise layers with at most this many output pixels per plane use the channel-blocked
#: kernel (stride 1: about 1.1-1.5x faster than the per-plane kernel on 10x10 planes, slower from
#: 20x20 on; stride 2: faster on 10x10 outputs only, see _BLOCKED_MAX_PIXELS_S2).
_BLOCKED_MAX_PIXELS = 256
_BLOCKED_MAX_PIXELS_S2 = 100
#: Ghost modules (without residual) on planes of at least this many pixels run the primary 1x1
#: conv and its 3x3 depthwise as one op, by bands of rows (fused.OP_GHOST): the depthwise reads
#: the primary half back from cache, straight from the buffer (no padded copy, no accumulator
#: pass); the same bits as the two ops. 10-20% faster on the 160x160 and 80x80 ghost1 modules.
_GHOST_FUSE_MIN_PLANE = 6400
#: Output rows per depthwise band of that op.
_GHOST_BAND_ROWS = 16


class EngineUnsupported(Exception):
    """The engine cannot run this graph (the interpreter can)."""


# --- thread settings ------------------------------------------------------------------------

#: Held around every run: the engine's GEMM tiles run on Numba's threads, and a multi-threaded
#: BLAS inside them would oversubscribe the cores (one place owns this: refghost.forward).
blas_single_threaded = single_threaded_blas


# --- plan building ----------------------------------------------------------------------------


@dataclass
class _Tensor:
    name: str
    c: int
    h: int
    w: int
    slot: int = -1

    @property
    def p(self):
        return self.h * self.w


@dataclass
class _Op:
    kind: str
    reads: tuple
    writes: tuple
    args: dict = field(default_factory=dict)


def _f64(tensors, key):
    return np.asarray(tensors[key], dtype=np.float64)


class _Builder:
    """Walks the graph by module path and emits ops on tensors (no buffers yet)."""

    def __init__(self, graph: Graph, tensors, dtype, n):
        self.graph = graph
        self.tensors = tensors
        self.dtype = np.dtype(dtype)
        self.n = n
        self.nodes = {node.name: node for node in graph.nodes}
        self.used = set()
        self.ops: list[_Op] = []
        self.count = 0

    def node(self, name, op=None):
        node = self.nodes.get(name)
        if node is None or (op is not None and node.op != op):
            raise EngineUnsupported(f"expected node {name!r} ({op})")
        self.used.add(name)
        return node

    def has(self, name):
        return name in self.nodes

    def new(self, c, h, w, name=""):
        self.count += 1
        return _Tensor(name or f"t{self.count}", c, h, w)

    def emit(self, kind, reads, writes, **args):
        self.ops.append(_Op(kind, tuple(reads), tuple(writes), args))

    # --- parameters
    def folded(self, conv_name, bn_name):
        """(W, b) in float64 of conv ``conv_name`` with BatchNorm ``bn_name`` folded in."""
        conv = self.node(conv_name, "conv")
        bn = self.node(bn_name, "batch_norm")
        if bn.inputs != (conv_name,):
            raise EngineUnsupported(f"{bn_name} does not follow {conv_name}")
        t = self.tensors
        w = _f64(t, conv.params["weight"])
        b = _f64(t, conv.params["bias"]) if "bias" in conv.params else np.zeros(w.shape[0])
        bn_params = (_f64(t, bn.params[r]) for r in ("weight", "bias", "running_mean", "running_var"))
        return (*ops.fold_batch_norm(w, b, *bn_params, eps=bn.attrs.get("eps", ops.BN_EPS)), conv.attrs)

    def activation(self, name):
        """(code, slope, generic name or None, generic weight) of activation node ``name``."""
        node = self.node(name, "act")
        act = node.attrs["activation"]
        weight = None
        if act == "PReLU":
            weight = _f64(self.tensors, node.params["weight"])
        if act in _FAST_ACTS:
            slope = ops.LEAKY_RELU_SLOPE if act == "LeakyReLU" else (float(weight.reshape(())) if act == "PReLU"
                                                                     else 0.0)
            return dict(code=_FAST_ACTS[act], slope=slope, generic=None, weight=None)
        return dict(code=0, slope=0.0, generic=act, weight=weight)

    # --- ops
    def conv1x1(self, x: _Tensor, w, b, out: _Tensor, row0=0, act=None):
        o, c = w.shape[0], w.shape[1]
        if w.shape[2:] != (1, 1) or c != x.c:
            raise EngineUnsupported("conv1x1 shape")
        wb = np.concatenate([b[:, None], w.reshape(o, c)], axis=1)
        act = act or dict(code=0, slope=0.0, generic=None, weight=None)
        self.emit("gemm", [x], [out], w=wb, row0=row0, **act)

    def depthwise(self, src, s_row0, dst, d_row0, w, b, attrs, act=None, res=None, res_row0=0, pre_row0=-1):
        c, _, k, k2 = w.shape
        if k != k2 or attrs["groups"] != c:
            raise EngineUnsupported("depthwise shape")
        act = act or dict(code=0, slope=0.0, generic=None, weight=None)
        reads = [src] + ([res] if res is not None else [])
        self.emit("dw", reads, [dst], src=src, s_row0=s_row0, dst=dst, d_row0=d_row0, nch=c, w=w.reshape(c, k * k),
                  b=b, k=k, s=attrs["stride"], p=attrs["padding"], res=res, res_row0=res_row0, pre_row0=pre_row0,
                  **act)

    def ghost(self, name, x: _Tensor, residual=None):
        """A GhostModule (with the block's residual fused when ``residual`` is given)."""
        p = f"{name}.primary_conv"
        wp, bp, attrs = self.folded(f"{p}.0", f"{p}.1")
        if attrs["stride"] != 1 or attrs["groups"] != 1 or attrs["padding"] != 0:
            raise EngineUnsupported(f"{p}.0 is not a 1x1 conv")
        init = wp.shape[0]
        act_p = self.activation(f"{p}.2") if self.has(f"{p}.2") else None
        c = f"{name}.cheap_operation"
        wc, bc, cattrs = self.folded(f"{c}.0", f"{c}.1")
        if wc.shape[0] != init or cattrs["stride"] != 1:
            raise EngineUnsupported(f"{c}.0 shape")
        act_c = self.activation(f"{c}.2") if self.has(f"{c}.2") else None
        concat = self.node(name, "concat")
        if len(concat.inputs) != 2:
            raise EngineUnsupported(f"{name} concat")
        g = self.new(2 * init, x.h, x.w, name)
        no_act = dict(code=0, slope=0.0, generic=None, weight=None)
        ap, ac = act_p or no_act, act_c or no_act
        if (residual is None and x.p >= _GHOST_FUSE_MIN_PLANE and wc.shape[2:] == (3, 3)
                and cattrs["groups"] == init and cattrs["padding"] == 1 and ap["generic"] is None
                and ac["generic"] is None and (ap["code"] != 2 or ac["code"] != 2 or ap["slope"] == ac["slope"])):
            slope = ap["slope"] if ap["code"] == 2 else ac["slope"]
            wb = np.concatenate([bp[:, None], wp.reshape(init, x.c)], axis=1)
            self.emit("ghost", [x], [g], w=wb, wdw=wc.reshape(init, 9), bdw=bc, act1=ap["code"], act2=ac["code"],
                      slope=slope, act_p=ap, act_c=ac)
            return g
        self.conv1x1(x, wp, bp, g, 0, act_p)
        if residual is None:
            self.depthwise(g, 0, g, init, wc, bc, cattrs, act_c)
        else:
            if act_p is not None or act_c is not None or residual.c != 2 * init:
                raise EngineUnsupported(f"{name}: residual with activation or channel mismatch")
            self.depthwise(g, 0, g, init, wc, bc, cattrs, None, residual, init, 0)
        return g

    def squeeze_excite(self, name, x: _Tensor):
        self.node(f"{name}.avg_pool", "global_avg_pool")
        reduce_ = self.node(f"{name}.conv_reduce", "conv")
        act = self.node(f"{name}.act1", "act")
        expand = self.node(f"{name}.conv_expand", "conv")
        self.node(f"{name}.gate", "hard_sigmoid")
        self.node(name, "scale")
        if act.attrs["activation"] != "ReLU":
            raise EngineUnsupported(f"{name}: SE activation {act.attrs['activation']}")
        t = self.tensors
        wr = _f64(t, reduce_.params["weight"])
        we = _f64(t, expand.params["weight"])
        r = wr.shape[0]
        if wr.shape != (r, x.c, 1, 1) or we.shape != (x.c, r, 1, 1):
            raise EngineUnsupported(f"{name}: SE shapes")
        self.emit("se", [x], [x], x=x, wr_t=wr.reshape(r, x.c).T, br=_f64(t, reduce_.params["bias"]),
                  we_t=we.reshape(x.c, r).T, be=_f64(t, expand.params["bias"]))

    def bottleneck(self, name, x: _Tensor):
        add = self.node(name, "add")
        g1 = self.ghost(f"{name}.ghost1", x)
        y = g1
        if self.has(f"{name}.conv_dw"):
            w, b, attrs = self.folded(f"{name}.conv_dw", f"{name}.bn_dw")
            s = attrs["stride"]
            k = w.shape[2]
            ho = ops.conv_output_size(y.h, k, s, attrs["padding"])
            wo = ops.conv_output_size(y.w, k, s, attrs["padding"])
            d = self.new(y.c, ho, wo, f"{name}.bn_dw")
            self.depthwise(y, 0, d, 0, w, b, attrs)
            y = d
        if self.has(f"{name}.se"):
            self.squeeze_excite(f"{name}.se", y)
        if self.has(f"{name}.shortcut.0"):
            s = f"{name}.shortcut"
            w, b, attrs = self.folded(f"{s}.0", f"{s}.1")
            k, st, pad = w.shape[2], attrs["stride"], attrs["padding"]
            sd = self.new(x.c, ops.conv_output_size(x.h, k, st, pad), ops.conv_output_size(x.w, k, st, pad), f"{s}.1")
            self.depthwise(x, 0, sd, 0, w, b, attrs)
            w2, b2, attrs2 = self.folded(f"{s}.2", f"{s}.3")
            if attrs2["stride"] != 1 or attrs2["groups"] != 1:
                raise EngineUnsupported(f"{s}.2 is not a 1x1 conv")
            residual = self.new(w2.shape[0], sd.h, sd.w, f"{s}.3")
            self.conv1x1(sd, w2, b2, residual)
        else:
            residual = x
        if add.inputs != (f"{name}.ghost2", residual.name):
            raise EngineUnsupported(f"{name}: unexpected add inputs {add.inputs}")
        if (residual.h, residual.w) != (y.h, y.w):
            raise EngineUnsupported(f"{name}: residual shape")
        g2 = self.ghost(f"{name}.ghost2", y, residual)
        g2.name = name
        return g2

    def build(self, h, w):
        graph = self.graph
        # stem: dense KxK conv as im2col + GEMM
        ws, bs, attrs = self.folded("conv_stem", "bn1")
        if attrs["groups"] != 1:
            raise EngineUnsupported("stem")
        k, s, p = ws.shape[2], attrs["stride"], attrs["padding"]
        ho, wo = ops.conv_output_size(h, k, s, p), ops.conv_output_size(w, k, s, p)
        if ho < 1 or wo < 1:
            raise EngineUnsupported("input smaller than the stem kernel")
        x = self.new(ws.shape[0], ho, wo, "act1")
        wsb = np.concatenate([bs[:, None], ws.reshape(ws.shape[0], -1)], axis=1)
        act = self.activation("act1")
        self.emit("stem", [], [x], w=wsb, k=k, s=s, p=p, **act)
        produced = {"act1": x}
        blocks = [node.name for node in graph.nodes if node.op == "add"]
        for name in blocks:
            x = self.bottleneck(name, x)
            produced[name] = x
        last = f"blocks.{NUM_STAGES - 1}.0"
        wl, bl, attrs = self.folded(f"{last}.conv", f"{last}.bn1")
        if attrs["stride"] != 1 or wl.shape[2:] != (1, 1):
            raise EngineUnsupported("final conv")
        y = self.new(wl.shape[0], x.h, x.w, f"{last}.act1")
        self.conv1x1(x, wl, bl, y, 0, self.activation(f"{last}.act1"))
        produced[f"{last}.act1"] = y
        outputs = {}
        for out_name, node_name in graph.outputs.items():
            if node_name in produced:
                outputs[out_name] = produced[node_name]
            elif node_name != "classifier":
                raise EngineUnsupported(f"output {out_name} from {node_name}")
        if "classifier" in graph.outputs.values():
            self.node("global_pool", "global_avg_pool")
            head = self.node("conv_head", "conv")
            act2 = self.node("act2", "act")
            cls = self.node("classifier", "linear")
            if act2.attrs["activation"] != "ReLU":
                raise EngineUnsupported("act2")
            t = self.tensors
            wh = _f64(t, head.params["weight"])
            self.emit("classifier", [y], [], x=y, wh=wh.reshape(wh.shape[0], -1), bh=_f64(t, head.params["bias"]),
                      wc=_f64(t, cls.params["weight"]), bc=_f64(t, cls.params["bias"]),
                      name=[k for k, v in graph.outputs.items() if v == "classifier"][0])
        for out_name, tensor in outputs.items():
            self.emit("output", [tensor], [], x=tensor, name=out_name)
        unused = set(self.nodes) - self.used
        if unused:
            raise EngineUnsupported(f"nodes the engine does not handle: {sorted(unused)[:3]}")
        # outputs must be copied right after their producer (their buffer may be reused later)
        self._move_outputs_to_producers()

    def _move_outputs_to_producers(self):
        outs = [op for op in self.ops if op.kind == "output"]
        body = [op for op in self.ops if op.kind != "output"]
        for out in outs:
            t = out.args["x"]
            last_write = max(i for i, op in enumerate(body) if any(w is t for w in op.writes))
            body.insert(last_write + 1, out)
        self.ops = body


def _assign_slots(ops):
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
    """The fixed tiling of a 1x1 conv (n images, M outputs, K inputs, P pixels): (T, 5) int64.

    A function of the shapes only (never of the thread count), so every run makes the same BLAS
    calls. Planes of at least 4096 pixels are cut into tiles of 512 columns (the tile stays in
    cache for the activation pass; 1.3-1.5x faster than 4 tiles at 80x80 and 160x160); other
    large planes are split by columns (multiples of 16), and so are planes of 64 columns per
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
            edges = [min(p, ((p * i // parts) + 15) // 16 * 16) for i in range(parts)] + [p]
            tasks += [(img, 0, m, edges[i], edges[i + 1]) for i in range(parts) if edges[i] < edges[i + 1]]
        elif parts > 1 and m >= 8 * parts:
            edges = [min(m, ((m * i // parts) + 7) // 8 * 8) for i in range(parts)] + [m]
            tasks += [(img, edges[i], edges[i + 1], 0, p) for i in range(parts) if edges[i] < edges[i + 1]]
        else:
            tasks.append((img, 0, m, 0, p))
    return np.array(tasks, dtype=np.int64).reshape(-1, 5)


class Plan:
    """A compiled forward pass for one dtype and one input shape. Call :meth:`run`.

    The ops are lowered to rows of an int64 program (:func:`refghost.kernels.fused.run_program`)
    over one arena of activation buffers and one array of parameters; runs of consecutive rows
    execute in one compiled call. Only the ops without a compiled form (activations without a
    fused epilogue, the classifier head) run from Python, between such runs.
    """

    def __init__(self, graph: Graph, tensors, dtype, shape):
        from .kernels import blas, fused, sync

        if not blas.AVAILABLE:
            raise EngineUnsupported("no BLAS library with the 64-bit CBLAS symbols next to NumPy")
        if not sync.AVAILABLE:
            raise EngineUnsupported("no sched_yield in the C library")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise EngineUnsupported(f"dtype {dtype}")
        n, c, h, w = shape
        if c != 3:
            raise EngineUnsupported("input channels")
        self.shape = tuple(shape)
        builder = _Builder(graph, tensors, dtype, n)
        builder.build(h, w)
        self.slots_spec = _assign_slots(builder.ops)
        # one arena of activation buffers (each slot 64-byte aligned), row 0 of each set to ones
        offsets, total = [], 0
        for p, rows in self.slots_spec:
            offsets.append(total)
            total += _aligned(n * rows * p)
        self.arena = _aligned_empty(total, self.dtype)
        self.buffer_offsets = offsets
        self.buffers = []
        for (p, rows), off in zip(self.slots_spec, offsets):
            buf = self.arena[off: off + n * rows * p].reshape(n, rows, p)
            buf[:, 0, :] = 1
            self.buffers.append(buf)
        self.nbytes = self.arena.nbytes
        self._lock = threading.Lock()
        self._params, self._params_size = [], 0
        self._ints, self._ints_size = [], 0
        self._outputs = []  # (name, offset per image, (n, c, h, w)): see fused.OP_OUTPUT
        self._out_size = 0  # per image
        self._shared_size = 0  # scratch of the squeeze-excite of a small batch (fused._se_op)
        self._flags_size = 0  # row flags of the fused ghost ops
        items = []
        for op in builder.ops:
            items.extend(self._lower(op))
        self.params = self._pack(self._params, self._params_size, self.dtype)
        self.ints = self._pack(self._ints, self._ints_size, np.int64)
        del self._params, self._ints
        self.shared = np.empty(max(self._shared_size, 1), dtype=self.dtype)
        self.flags = np.zeros(max(self._flags_size, 1), dtype=np.int8)
        # consecutive program rows form one segment (one compiled call)
        self._segments = []
        rows, consts = [], []
        for item in items:
            if item[0] == "row":
                rows.append(item[1])
                consts.append(item[2])
                continue
            if rows:
                self._segments.append(("program", np.array(rows, np.int64), np.array(consts, self.dtype)))
                rows, consts = [], []
            self._segments.append(("python", item[1]))
        if rows:
            self._segments.append(("program", np.array(rows, np.int64), np.array(consts, self.dtype)))
        # the work counters of the largest program (fused.run_program; zeroed before each call)
        longest = max((len(seg[1]) for seg in self._segments if seg[0] == "program"), default=0)
        self.sync = np.zeros(max(longest, 1) * fused.PHASES * sync.STRIDE, dtype=np.int64)

    @staticmethod
    def _pack(chunks, size, dtype):
        out = np.zeros(max(size, 1), dtype=dtype)
        for off, a in chunks:
            out[off: off + a.size] = a.ravel()
        return out

    def _param(self, a):
        """Offset of array ``a`` (cast to the compute dtype) in the parameter array."""
        a = np.ascontiguousarray(a, dtype=self.dtype)
        off = self._params_size
        self._params.append((off, a))
        self._params_size += _aligned(a.size)
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

    def _lower(self, op):
        """The op as a list of ("row", program row, consts) and ("python", step) items."""
        from .kernels import fused

        a = op.args
        dt = self.dtype
        row = np.zeros(fused.PROGRAM_COLS, np.int64)
        if op.kind == "stem":
            y_t = op.writes[0]
            y = self.buffers[y_t.slot]
            w = self._cast(a["w"])
            m, kk = w.shape
            # bands of output rows whose column matrix (kk x band*Wo) stays within about 32 KiB (L1;
            # measured at 320x320: 1-2 rows per band beat 9 and 20)
            band = max(1, min(y_t.h, (32 * 1024 // (w.itemsize * kk)) // max(1, y_t.w)))
            work = y.shape[0] * m * kk * y_t.p
            row[:15] = (fused.OP_STEM, *self._buf(y_t), self._param(w), m, kk, a["k"], a["s"], a["p"], y_t.h, y_t.w,
                        a["code"], band, work >= _PARALLEL_MIN_WORK)
            return [("row", row, fused.make_consts(dt, a["slope"]))] + self._generic(a, y, 1, m)
        if op.kind == "gemm":
            x_t, y_t = op.reads[0], op.writes[0]
            x, y = self.buffers[x_t.slot], self.buffers[y_t.slot]
            w = self._cast(a["w"])
            m, k = w.shape
            tasks = gemm_tasks(x.shape[0], m, k, x_t.p)
            row0 = 1 + a["row0"]
            xo, xr, xp = self._buf(x_t)
            yo, yr, _ = self._buf(y_t)
            row[:14] = (fused.OP_GEMM, xo, xr, xp, yo, yr, self._param(w), m, k, row0, self._int_param(tasks),
                        tasks.shape[0], a["code"], tasks.shape[0] > 1)
            return [("row", row, fused.make_consts(dt, a["slope"]))] + self._generic(a, y, row0, m)
        if op.kind == "ghost":
            x_t, y_t = op.reads[0], op.writes[0]
            w = self._cast(a["w"])
            m, k = w.shape
            tasks = gemm_tasks(self.buffers[x_t.slot].shape[0], m, k, x_t.p)
            order = np.lexsort((tasks[:, 3], tasks[:, 0]))
            if not ((tasks[:, 1] == 0).all() and (tasks[:, 2] == m).all() and (order == np.arange(len(tasks))).all()):
                # not column tiles in pixel order: the two ops of the unfused path
                gemm = _Op("gemm", op.reads, op.writes, dict(w=a["w"], row0=0, **a["act_p"]))
                dw = _Op("dw", op.writes, op.writes, dict(
                    src=y_t, s_row0=0, dst=y_t, d_row0=m, nch=m, w=a["wdw"], b=a["bdw"], k=3, s=1, p=1, res=None,
                    res_row0=0, pre_row0=-1, **a["act_c"]))
                return self._lower(gemm) + self._lower(dw)
            xo, xr, xp = self._buf(x_t)
            yo, yr, _ = self._buf(y_t)
            nimg = self.buffers[y_t.slot].shape[0]
            row[:21] = (fused.OP_GHOST, xo, xr, xp, yo, yr, self._param(w), m, k, 1, self._int_param(tasks),
                        tasks.shape[0], a["act1"], tasks.shape[0] > 1, self._param(self._cast(a["wdw"])),
                        self._param(self._cast(a["bdw"])), a["act2"], y_t.h, y_t.w, min(_GHOST_BAND_ROWS, y_t.h),
                        self._flags_size)
            self._flags_size += nimg * y_t.h
            return [("row", row, fused.make_consts(dt, a["slope"]))]
        if op.kind == "dw":
            src_t, dst_t, res_t = a["src"], a["dst"], a["res"]
            dst = self.buffers[dst_t.slot]
            has_res = res_t is not None
            w, b = self._cast(a["w"]), self._cast(a["b"])
            nch, k, s, p = a["nch"], a["k"], a["s"], a["p"]
            d_row0 = 1 + a["d_row0"]
            h, wd, ho, wo = src_t.h, src_t.w, dst_t.h, dst_t.w
            nimg = dst.shape[0]
            work = nimg * nch * ho * wo * k * k
            row[1:4] = self._buf(src_t)
            row[4:7] = self._buf(dst_t)
            row[7:10] = self._buf(res_t) if has_res else self._buf(dst_t)
            row[10:19] = (1 + a["s_row0"], d_row0, 1 + a["res_row0"] if has_res else 0,
                          1 + a["pre_row0"] if a["pre_row0"] >= 0 else -1, nch, h, wd, ho, wo)
            row[22:29] = (self._param(b), k, s, p, a["code"], has_res, work >= _PARALLEL_MIN_WORK)
            if ho * wo <= (_BLOCKED_MAX_PIXELS if s == 1 else _BLOCKED_MAX_PIXELS_S2 if s == 2 else 0):
                wcb = fused.blocked_weights(w, wo)
                row[0] = fused.OP_DW_BLOCKED
                row[19:22] = (self._param(wcb), wcb.shape[0], wcb.shape[1])
                row[29] = nimg * wcb.shape[0]
                row[30] = wcb.shape[2]
            else:
                row[0] = fused.OP_DW
                row[19:22] = (self._param(w), w.shape[0], w.shape[1])
                row[29] = nimg * nch
            return [("row", row, fused.make_consts(dt, a["slope"]))] + self._generic(a, dst, d_row0, nch)
        if op.kind == "se":
            x_t = a["x"]
            nch = x_t.c
            nimg = self.buffers[x_t.slot].shape[0]
            wr_t = a["wr_t"]
            self._shared_size = max(self._shared_size, nimg * (nch + wr_t.shape[1]))
            row[:11] = (fused.OP_SE, *self._buf(x_t), nch, wr_t.shape[1], self._param(wr_t), self._param(a["br"]),
                        self._param(a["we_t"]), self._param(a["be"]), nimg * nch * x_t.p >= _PARALLEL_MIN_WORK)
            return [("row", row, fused.make_consts(dt))]
        if op.kind == "output":
            t = a["x"]
            nimg = self.buffers[t.slot].shape[0]
            off = self._out_size
            self._outputs.append((a["name"], off, (nimg, t.c, t.h, t.w)))
            self._out_size += _aligned(t.c * t.p)
            row[:6] = (fused.OP_OUTPUT, *self._buf(t), t.c, off)
            return [("row", row, fused.make_consts(dt))]
        if op.kind == "classifier":
            t = a["x"]
            buf = self.buffers[t.slot]
            wh_t, bh = self._cast(a["wh"].T), self._cast(a["bh"])
            wc_t, bc = self._cast(a["wc"].T), self._cast(a["bc"])
            name = a["name"]

            def step():
                pooled = buf[:, 1:1 + t.c, :].mean(axis=2)
                hidden = ops.relu(np.matmul(pooled, wh_t) + bh)
                self._result[name] = np.matmul(hidden, wc_t) + bc
            return [("python", step)]
        raise AssertionError(op.kind)

    def _generic(self, a, buf, row0, nch):
        """The slower elementwise pass for activations without a fused epilogue ([] or one step)."""
        if a.get("generic") is None:
            return []
        from .kernels import activation

        name = a["generic"]
        weight = None if a["weight"] is None else self._cast(a["weight"])
        view = buf[:, row0:row0 + nch, :]

        def apply():
            view[...] = activation(name, view, weight)
        return [("python", apply)]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs ``{name: array}`` (fresh arrays) for input x of the plan's shape and dtype."""
        import numba

        from .kernels import fused
        from .kernels._jit import one_launch_at_a_time

        _check_input(self, x)
        x = np.ascontiguousarray(x)
        nthreads = numba.get_num_threads()
        out = np.empty(max(self._out_size * self.shape[0], 1), dtype=self.dtype)
        with self._lock, blas_single_threaded(), one_launch_at_a_time():
            self._result = {}
            for seg in self._segments:
                if seg[0] == "program":
                    self.sync[:] = 0
                    self.flags[:] = 0
                    fused.run_program(seg[1], seg[2], self.arena, self.params, self.ints, x, out, nthreads,
                                      self.sync, self.shared, self.flags, _OP_BY_OP)
                else:
                    seg[1]()
            result, self._result = self._result, None
        # the outputs in the order they are produced (as views of this run's fresh ``out``), then
        # the classifier's logits
        outputs = _output_views(out, self._outputs, self.shape[0])
        outputs.update(result)
        return outputs

    @property
    def runs_images_alone(self):
        """True when the plan is one compiled program for one image (no Python steps between its
        rows): :class:`ImagePlan` can run a batch through it image by image."""
        return self.shape[0] == 1 and [seg[0] for seg in self._segments] == ["program"]


def _check_input(plan, x):
    if x.shape != plan.shape or x.dtype != plan.dtype:
        raise ValueError(f"plan is for {plan.shape} {plan.dtype}, got {x.shape} {x.dtype}")


#: ``images`` argument of fused.run_program for the op-by-op mode.
_OP_BY_OP = np.zeros(5, np.int64)


def _output_views(out, outputs, n):
    """``{name: (n, c, h, w) view of out}``: output k of every image in one contiguous block."""
    return {name: out[n * off: n * off + int(np.prod(shape[1:])) * n].reshape((n,) + tuple(shape[1:]))
            for name, off, shape in outputs}


class ImagePlan:
    """A batch of N images run image by image: each thread takes whole images and runs them, one
    at a time and on its own buffers, through the program of the plan for one image (``single``).

    Used for N of at least the thread count, where it beats running each op on all N images
    (``python tools/bench.py``, batch 8: 2 threads each keep one image's activations, about
    15 MiB, close to their cores instead of streaming all eight images' through memory at every
    op, and the activation memory is the thread count's images' instead of N's). Each image goes
    through the same units of work with the same code as in the plan for N images, so the
    outputs are the same bits (``tests/test_engine.py``). With fewer images than threads it runs
    the plan for N images op by op (built on first use).
    """

    def __init__(self, single: Plan, shape, layer_major):
        self.single = single
        self.shape = tuple(shape)
        self.dtype = single.dtype
        self._layer_major = layer_major  # () -> Plan for the whole batch
        self._batch_plan = None
        self._workers = 0
        self._lock = threading.Lock()

    def _buffers(self, workers):
        """Per-worker copies of the single plan's arena (ones rows set) and scratch; the layout."""
        from .kernels.sync import STRIDE

        one = self.single
        a_len = _aligned(one.arena.size)
        s_len = _aligned(one.sync.size)
        self.arena = _aligned_empty(workers * a_len, self.dtype)
        for w in range(workers):
            self.arena[w * a_len: w * a_len + one.arena.size] = one.arena
        self.sync = np.zeros(STRIDE + workers * s_len, np.int64)
        self.shared = np.empty(workers * one.shared.size, self.dtype)
        self.flags = np.zeros(workers * one.flags.size, np.int8)
        self.layout = np.array([workers, a_len, s_len, one.shared.size, one.flags.size], np.int64)
        self._workers = workers

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs ``{name: array}`` (fresh arrays) for input x of the plan's shape and dtype."""
        import numba

        from .kernels import fused
        from .kernels._jit import one_launch_at_a_time

        _check_input(self, x)
        n = self.shape[0]
        nthreads = numba.get_num_threads()
        if n < nthreads:
            with self._lock:
                if self._batch_plan is None:
                    self._batch_plan = self._layer_major()
            return self._batch_plan.run(x)
        x = np.ascontiguousarray(x)
        one = self.single
        out = np.empty(max(one._out_size * n, 1), dtype=self.dtype)
        with self._lock, blas_single_threaded(), one_launch_at_a_time():
            if self._workers != nthreads:
                self._buffers(nthreads)
            self.sync[:] = 0
            fused.run_program(one._segments[0][1], one._segments[0][2], self.arena, one.params, one.ints, x, out,
                              nthreads, self.sync, self.shared, self.flags, self.layout)
        return _output_views(out, one._outputs, n)


def _aligned_empty(size, dtype, alignment=64):
    """A 1-D array of ``size`` elements whose data starts on an ``alignment``-byte boundary (tiles
    that split rows at multiples of 16 columns then never share a cache line)."""
    dtype = np.dtype(dtype)
    raw = np.empty(size * dtype.itemsize + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start: start + size * dtype.itemsize].view(dtype)


def _aligned(size):
    """``size`` rounded up to a multiple of 16 elements (64 bytes for float32)."""
    return (size + 15) // 16 * 16


def get_plan(weights, dtype, shape) -> Plan:
    """The plan for ``weights`` at (dtype, input shape), compiled once and cached on ``weights``.

    Raises :class:`EngineUnsupported` (also cached) when the engine cannot run this graph.
    """
    key = (np.dtype(dtype).name, tuple(shape))
    cache = weights.__dict__.setdefault("_engine_plans", OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        plan = cache[key]
    else:
        try:
            plan = _new_plan(weights, dtype, tuple(shape))
        except EngineUnsupported as exc:
            plan = exc
        cache[key] = plan
        while len(cache) > MAX_CACHED_PLANS:
            cache.popitem(last=False)
    if isinstance(plan, EngineUnsupported):
        raise plan
    return plan


def _new_plan(weights, dtype, shape):
    """An :class:`ImagePlan` for a batch whose one-image plan allows it, else a :class:`Plan`."""
    if shape[0] > 1:
        single = get_plan(weights, dtype, (1,) + shape[1:])
        if single.runs_images_alone:
            return ImagePlan(single, shape, lambda: Plan(weights.graph, weights.tensors, dtype, shape))
    return Plan(weights.graph, weights.tensors, dtype, shape)


def run(weights, x: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's outputs for input x (N, 3, H, W) in x's dtype, through the cached plan."""
    return get_plan(weights, x.dtype, x.shape).run(x)
