"""The one place where Numba compile flags are set.

Every Numba kernel in :mod:`refghost.kernels` and :mod:`refghost.engine` is compiled through these wrappers, so that the
numerical contract is stated once:

- ``fastmath=False``: every ``+``, ``*`` is an honest IEEE-754 operation in the array dtype, in the
  order the source code writes it. No reassociation, no FMA contraction, no flush-to-zero, and NaN
  and Inf behave as in NumPy.
- ``error_model="numpy"``: division by zero gives Inf/NaN as in NumPy instead of raising, which also
  lets LLVM drop the per-division checks.
- ``nogil=True``: kernels release the GIL.
- ``cache=True``: compiled code is cached next to the sources (``__pycache__``), so only the first
  process pays the compile time.

Thread-pool note (docs/performance.md, "One thread pool"): Numba's ``omp`` workers and OpenBLAS's
pthreads both spin-wait, so two busy pools on the same cores slow each other down. Kernels
compiled with :func:`parallel_jit` call BLAS only through :mod:`refghost.kernels.blas`, with BLAS
held at one thread (:func:`refghost.threads.single_threaded_blas`); never NumPy ``@``/``dot``.
"""

from __future__ import annotations

import contextlib
import threading

import numba
import numpy as np

#: Options shared by every kernel. fastmath must stay off: results are plain IEEE float ops.
_OPTIONS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)

#: Options a caller may not override (the numerical contract).
_FIXED = frozenset(_OPTIONS) - {"cache", "nogil"}


def _merge(kwargs, **extra):
    bad = _FIXED & set(kwargs)
    if bad:
        raise TypeError(f"refghost.kernels._jit: {sorted(bad)} are fixed here and may not be "
                        f"overridden")
    return {**_OPTIONS, **extra, **kwargs}


def jit(func=None, **kwargs):
    """``numba.njit`` with refghost's flags; use as ``@jit`` or ``@jit(signature_or_options)``."""
    options = _merge(kwargs)
    if func is None:
        return numba.njit(**options)
    return numba.njit(**options)(func)


def parallel_jit(func=None, **kwargs):
    """Like :func:`jit` but with ``parallel=True`` so ``numba.prange`` loops run on Numba's pool."""
    options = _merge(kwargs, parallel=True)
    if func is None:
        return numba.njit(**options)
    return numba.njit(**options)(func)


def vectorize(signatures, **kwargs):
    """``numba.vectorize`` (serial CPU target) with refghost's numerical flags.

    ``signatures`` is a list of Numba signatures (eager compilation, so the ufunc has fixed loops).
    """
    options = _merge(kwargs)
    # Not vectorize options: ufunc inner loops run without the GIL anyway, and numba.vectorize has
    # no error_model (keep divisions out of vectorized kernels, or use jit).
    options.pop("nogil", None)
    options.pop("error_model", None)
    options.setdefault("target", "cpu")
    return numba.vectorize(signatures, **options)


#: Held around parallel launches when Numba's threading layer is "workqueue" (see below).
_WORKQUEUE_LOCK = threading.Lock()


def one_launch_at_a_time():
    """Context for a call of a :func:`parallel_jit` kernel: a process-wide lock when Numba's
    threading layer is "workqueue", which is not thread-safe (two parallel launches from two
    Python threads at once abort the process; Numba falls back to it without OpenMP or TBB), and
    nothing with "omp" or "tbb". Before the first parallel launch the layer is not chosen yet, so
    that launch is locked too."""
    try:
        layer = numba.threading_layer()
    except ValueError:
        return _WORKQUEUE_LOCK
    return _WORKQUEUE_LOCK if layer == "workqueue" else contextlib.nullcontext()


def compiled_on_disk(dispatcher, dtype=None):
    """Whether Numba's on-disk cache holds compiled code of ``dispatcher`` (a ``cache=True``
    kernel) for its current source, and with ``dtype`` given, for a signature with arrays of that
    dtype (a float64 call of a kernel cached for float32 compiles): True, False, or None when that
    cannot be told. A hint only (it reads Numba's cache index through Numba internals): False
    means that the next such call compiles."""
    try:
        index = dispatcher._cache._cache_file._load_index()  # {(signature, target, ...): file}
        if dtype is None:
            return bool(index)
        name = str(np.dtype(dtype))
        return any(str(getattr(arg, "dtype", "")) == name for key in index for arg in key[0])
    except Exception:  # another Numba version, no cache: cannot tell
        return None
