"""Plans: a graph and its weights compiled, for one dtype and input shape, into program rows over
preallocated buffers (:class:`Plan`), or a batch run image by image through the plan for one image
(:class:`ImagePlan`); :func:`get_plan` builds them once and caches them on the weights.
"""

from __future__ import annotations

import threading

import numpy as np

from ..arch import Graph
from ..kernels import blas
from ..kernels._jit import one_launch_at_a_time
from ..threads import single_threaded_blas
from . import counters
from .lower import CACHE_LINE, Lowering, aligned, assign_slots
from .recognise import EngineUnsupported, Recogniser
from .run import execute

#: Plans kept per Weights object (each holds its buffers).
MAX_CACHED_PLANS = 4


class Plan:
    """A compiled forward pass for one dtype and one input shape. Call :meth:`run`.

    The ops are lowered to rows of an int64 program (:mod:`.program`) over one arena of activation
    buffers and one array of parameters; runs of consecutive rows execute in one compiled call
    (:func:`.run.execute`). Only the ops without a compiled form (activations without a fused
    epilogue, the classifier head) run from Python, between such runs.
    """

    def __init__(self, graph: Graph, tensors, dtype, shape):
        if not blas.AVAILABLE:
            raise EngineUnsupported("no BLAS library with the 64-bit CBLAS symbols next to NumPy")
        if not counters.AVAILABLE:
            raise EngineUnsupported("no sched_yield in the C library")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise EngineUnsupported(f"dtype {dtype}")
        n, c, h, w = shape
        if c != 3:
            raise EngineUnsupported("input channels")
        self.shape = tuple(shape)
        recogniser = Recogniser(graph, tensors)
        recogniser.build(h, w)
        slots = assign_slots(recogniser.ops)
        # one arena of activation buffers (each slot 64-byte aligned), row 0 of each set to ones
        offsets, total = [], 0
        for p, rows in slots:
            offsets.append(total)
            total += aligned(n * rows * p)
        self.arena = _aligned_empty(total, self.dtype)
        self.buffers = []
        for (p, rows), off in zip(slots, offsets):
            buf = self.arena[off: off + n * rows * p].reshape(n, rows, p)
            buf[:, 0, :] = 1
            self.buffers.append(buf)
        self._lock = threading.Lock()
        self._result = {}  # the classifier's logits of the current run
        lowering = Lowering(self.dtype, self.buffers, offsets, self._result)
        items = [item for op in recogniser.ops for item in lowering.lower(op)]
        self.params = lowering.params()
        self.ints = lowering.ints()
        self._outputs = lowering.outputs  # (name, offset per image, (n, c, h, w)): see program.OP_OUTPUT
        self._out_size = lowering.out_size  # per image
        self.shared = np.empty(max(lowering.shared_size, 1), dtype=self.dtype)
        self.flags = np.zeros(max(lowering.flags_size, 1), dtype=np.int8)
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
        # the work counters of the largest program (zeroed before each call)
        longest = max((len(seg[1]) for seg in self._segments if seg[0] == "program"), default=0)
        self.sync = np.zeros(max(longest, 1) * counters.PHASES * counters.STRIDE, dtype=np.int64)

    def execute(self, prog, consts, x, out):
        """Program rows ``prog`` (with their ``consts``) on this plan's buffers, op by op."""
        execute(prog, consts, x, out, arena=self.arena, params=self.params, ints=self.ints, sync=self.sync,
                shared=self.shared, flags=self.flags)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs ``{name: array}`` (fresh arrays) for input x of the plan's shape and dtype."""
        _check_input(self, x)
        x = np.ascontiguousarray(x)
        out = np.empty(max(self._out_size * self.shape[0], 1), dtype=self.dtype)
        with self._lock, single_threaded_blas(), one_launch_at_a_time():
            self._result.clear()
            for seg in self._segments:
                if seg[0] == "program":
                    self.execute(seg[1], seg[2], x, out)
                else:
                    seg[1]()
            result = dict(self._result)
            self._result.clear()
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
        one = self.single
        a_len = aligned(one.arena.size)
        s_len = aligned(one.sync.size)
        self.arena = _aligned_empty(workers * a_len, self.dtype)
        for w in range(workers):
            self.arena[w * a_len: w * a_len + one.arena.size] = one.arena
        self.sync = np.zeros(counters.STRIDE + workers * s_len, np.int64)
        self.shared = np.empty(workers * one.shared.size, self.dtype)
        self.flags = np.zeros(workers * one.flags.size, np.int8)
        self.layout = np.array([workers, a_len, s_len, one.shared.size, one.flags.size], np.int64)
        self._workers = workers

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs ``{name: array}`` (fresh arrays) for input x of the plan's shape and dtype."""
        import numba

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
        with self._lock, single_threaded_blas(), one_launch_at_a_time():
            if self._workers != nthreads:
                self._buffers(nthreads)
            execute(one._segments[0][1], one._segments[0][2], x, out, arena=self.arena, params=one.params,
                    ints=one.ints, sync=self.sync, shared=self.shared, flags=self.flags, images=self.layout)
        return _output_views(out, one._outputs, n)


def _aligned_empty(size, dtype, alignment=CACHE_LINE):
    """A 1-D array of ``size`` elements whose data starts on an ``alignment``-byte boundary (tiles
    that split rows at multiples of :data:`~.lower.ALIGN_ELEMENTS` columns then never share a
    cache line)."""
    dtype = np.dtype(dtype)
    raw = np.empty(size * dtype.itemsize + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start: start + size * dtype.itemsize].view(dtype)


def get_plan(weights, dtype, shape) -> Plan:
    """The plan for ``weights`` at (dtype, input shape), compiled once and cached in ``weights.cache``
    (the last :data:`MAX_CACHED_PLANS`).

    Raises :class:`EngineUnsupported` (also cached) when the engine cannot run this graph.
    """
    key = (np.dtype(dtype).name, tuple(shape))
    cache = weights.cache.plans
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


