"""The execution engine: a GhostNet graph and its weights compiled into a plan of fused kernels.

:func:`refghost.run` uses it when no intermediates are asked for (``impl="fast"``); the node-by-node
interpreter (:mod:`refghost.forward`) stays the readable definition and the path for
``intermediates=True`` (folding removes the per-module tensors). Both compute in the requested
dtype; they differ only in rounding order, within the bounds of :mod:`refghost.bounds`
(``tests/test_engine.py``). The design and its measurements: ``docs/performance.md``.

The parts, in the order a plan is built and run:

* :mod:`.recognise`: the graph, block by block (:func:`refghost.arch.blocks`), as ops on tensors,
  **BN folded** into each conv's weights and bias in float64, then cast to the compute dtype.
* :mod:`.lower`: the ops as rows of an int64 program (:mod:`.program` names every column) over
  buffers **reused** by liveness (slots of one 64-byte-aligned arena :mod:`.plan` allocates), and one array of parameters.
  Every tensor of C channels lives in rows ``[1, 1+C)`` of a buffer whose row 0 is ones, so a 1x1
  conv is one GEMM with the bias included, and a ghost module's two halves are the two halves of
  one buffer (no concat).
* the kernels, by kind: :mod:`.pointwise` (1x1 convs as BLAS GEMM tiles,
  :mod:`refghost.kernels.blas`), :mod:`refghost.kernels.depthwise` (the one depthwise kernel,
  shared with the interpreter), :mod:`.squeeze_excite`, :mod:`.stem` (the dense KxK stem by bands
  of rows), :mod:`.ghost` (a ghost module's primary conv and its 3x3 depthwise as one op, band by
  band, on planes of at least 80x80), with **fused epilogues**
  (:mod:`refghost.kernels.epilogue`: ReLU / LeakyReLU / PReLU / ReLU6 on each tile while it is in
  cache; other activations run as a separate elementwise pass).
* :mod:`.run`: **one compiled call, one parallel region** per run of rows; every thread walks the
  whole program and takes the units of each op from the atomic counters of :mod:`.counters`.
* :mod:`.plan`: :class:`Plan` (op by op), :class:`ImagePlan` (**batches image by image**: with at
  least as many images as threads, each thread takes whole images through the one-image program on
  its own copy of the buffers), :func:`get_plan` (compiled once per (dtype, input shape), cached
  on the :class:`~refghost.weights.Weights` object).

**Threads.** GEMM tiles are called from inside Numba's threads with BLAS held at one thread
(:func:`refghost.threads.single_threaded_blas`); Numba's thread count is the only knob.
**Deterministic.** GEMM tiles and stem bands are a fixed function of the shapes; depthwise
planes, SE images and SE channels are each computed by one thread with the same code, whatever
thread takes them: the results are bit-identical for any thread count and from run to run.
:class:`EngineUnsupported` means "use the interpreter" (an unexpected graph, or no BLAS the
kernels can call).
"""

from .plan import MAX_CACHED_PLANS, ImagePlan, Plan, get_plan
from .recognise import EngineUnsupported

__all__ = ["MAX_CACHED_PLANS", "EngineUnsupported", "ImagePlan", "Plan", "get_plan"]
