"""Work counters: how the engine's threads claim units of work (atomic counters, a polite spin-wait).

:func:`refghost.engine.run.run_program` runs a whole program in *one* parallel region: every
thread walks the same list of ops, and the units of work of each op (GEMM tiles, chunks of
depthwise planes, stem bands, ...) are handed out by an atomic counter instead of being split
between the threads in advance. A thread that the operating system has descheduled (another
process on its core) then delays nobody: the others take its share, and when it wakes it finds
the finished ops' counters exhausted and catches up. With a static split, every op waited for the
slowest thread's half.

Determinism is untouched: each unit is computed by one thread with the same code, whatever thread
that is, so the results are the same bits for any thread count and any interleaving.

Counters live in one int64 array, ``sync``, zeroed by the caller before each run. Phase ``q``
(an op may have several phases, each ending when all its units are done) owns two counters,
``claimed`` and ``done``, each on its own 64-byte line (no false sharing):
``sync[q * STRIDE]`` and ``sync[q * STRIDE + STRIDE // 2]``.

Memory order: :func:`atomic_add` is sequentially consistent and :func:`atomic_load` acquires, so
the buffers a unit wrote before counting itself done are visible to a thread that has seen the
count complete (the C++ release/acquire rule, which LLVM's atomics follow).

The wait yields the CPU (``sched_yield``) once a short spin has not seen the count complete: on a
busy machine the thread it waits for may need this very core. ``sched_yield`` is called by a
symbol name registered with LLVM at import (as :mod:`refghost.kernels.blas` does for GEMM), so the compiled code
stays cacheable.
"""

from __future__ import annotations

import ctypes

import llvmlite.binding as llvm
from numba import types
from numba.extending import intrinsic

from ..kernels._jit import jit

#: int64 elements per phase: two counters, each on its own 64-byte cache line.
STRIDE = 16
#: Phases per op (the most an op has: the squeeze-excite of a small batch).
PHASES = 3
#: Polls of a counter before the waiting thread starts yielding the CPU between polls.
_SPINS = 200


def _register():
    """Register the C library's ``sched_yield`` with LLVM; False where there is none (Windows)."""
    try:
        address = ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value
    except (OSError, AttributeError, TypeError):
        return False
    llvm.add_symbol("refghost_sched_yield", address)
    return True


#: False when the platform has no ``sched_yield``: the engine then declines (the interpreter runs).
AVAILABLE = _register()
_sched_yield = types.ExternalFunction("refghost_sched_yield", types.int32())


def _element_pointer(context, builder, signature, args):
    ary = context.make_array(signature.args[0])(context, builder, args[0])
    index = context.cast(builder, args[1], signature.args[1], types.intp)
    return builder.gep(ary.data, [index])


def _int64_array(arr):
    return isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1


@intrinsic
def atomic_add(typingctx, arr, index, value):
    """``old = arr[index]; arr[index] += value; return old`` as one atomic (seq_cst) operation.

    arr: 1-D C-contiguous int64 array (no bounds check)."""
    if not (_int64_array(arr) and isinstance(index, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        delta = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", _element_pointer(context, builder, signature, args), delta, "seq_cst")

    return types.int64(arr, index, value), codegen


@intrinsic
def atomic_load(typingctx, arr, index):
    """``arr[index]`` read atomically with acquire order (arr: 1-D int64; no bounds check)."""
    if not (_int64_array(arr) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element_pointer(context, builder, signature, args), "acquire", 8)

    return types.int64(arr, index), codegen


@jit
def claim(sync, phase):
    """The next unit index of ``phase`` for this thread (>= the unit count when all are taken)."""
    return atomic_add(sync, phase * STRIDE, 1)


@jit
def finish(sync, phase):
    """Count one unit of ``phase`` done (after its results are written)."""
    atomic_add(sync, phase * STRIDE + STRIDE // 2, 1)


@jit
def wait_done(sync, phase, units):
    """Return once ``units`` units of ``phase`` are done (spin briefly, then yield between polls)."""
    polls = 0
    while atomic_load(sync, phase * STRIDE + STRIDE // 2) < units:
        polls += 1
        if polls > _SPINS:
            _sched_yield()
