"""The one place where Numba compile flags are set.

Every Numba kernel in :mod:`refghost.kernels` and :mod:`refghost.engine` is compiled through these wrappers, so that the
numerical contract is stated once:

- ``fastmath=False``: every ``+``, ``*`` is an honest IEEE-754 operation in the array dtype, in the
  order the source code writes it. No reassociation, no FMA contraction, no flush-to-zero, and NaN
  and Inf behave as in NumPy.
- ``error_model="numpy"``: division by zero gives Inf/NaN as in NumPy instead of raising, which also
  lets LLVM drop the per-division checks.
- ``nogil=True``: kernels release the GIL.
- ``cache=True``: compiled code is cached on disk, so only the first process pays the compile time,
  in one folder per version of the kernels' sources (:data:`CACHE_DIR`). Numba checks only the
  file that defines a kernel, not the kernels it calls in other files nor the constants it reads
  from them: after an edit of ``engine/squeeze_excite.py`` alone, the cached ``run_program`` would
  still run the old squeeze-excite. A folder named by a digest of every source a kernel can
  depend on (:data:`KERNEL_SOURCES`) cannot hold such stale code.

Thread-pool note (docs/performance.md, "One thread pool"): Numba's ``omp`` workers and OpenBLAS's
pthreads both spin-wait, so two busy pools on the same cores slow each other down. Kernels
compiled with :func:`parallel_jit` call BLAS only through :mod:`refghost.kernels.blas`, with BLAS
held at one thread (:func:`refghost.threads.single_threaded_blas`); never NumPy ``@``/``dot``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from pathlib import Path

import numba
import numpy as np

#: Options shared by every kernel. fastmath must stay off: results are plain IEEE float ops.
_OPTIONS = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)

#: Options a caller may not override (the numerical contract).
_FIXED = frozenset(_OPTIONS) - {"cache", "nogil"}


#: What compiled kernels can depend on, relative to the ``refghost`` package: every module of these
#: packages (kernels call each other across modules) and these modules (constants kernels read).
KERNEL_SOURCES = ("kernels", "engine", "threads.py", "ops.py")
#: Cache folders of other source versions kept beside the current one (the most recently used).
KEPT_OLD_CACHES = 3
_CACHE_PREFIX = "refghost-numba-"


def sources_digest(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """A digest of the :data:`KERNEL_SOURCES` files under ``root`` (their paths and bytes)."""
    digest = hashlib.sha256()
    for part in KERNEL_SOURCES:
        path = root / part
        for file in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _cache_dir() -> str:
    """The cache folder of this version of the sources: under ``NUMBA_CACHE_DIR`` if the user set
    it, else in the package's ``__pycache__``; marked as just used, and all but the
    :data:`KEPT_OLD_CACHES` most recently used folders of other versions removed (a process still
    running an old version recompiles what it needs, as Numba recreates a missing folder)."""
    base = Path(numba.config.CACHE_DIR or Path(__file__).resolve().parents[1] / "__pycache__")
    current = base / f"{_CACHE_PREFIX}{sources_digest()}"
    try:
        current.mkdir(parents=True, exist_ok=True)
        os.utime(current)
        others = sorted((p for p in base.glob(f"{_CACHE_PREFIX}*") if p != current),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[KEPT_OLD_CACHES:]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:  # not writable: Numba falls back to its own locations
        pass
    return str(current)


#: Where refghost's kernels are cached (see the module docstring).
CACHE_DIR = _cache_dir()


@contextlib.contextmanager
def _caching_in(folder: str):
    """Numba's cache folder set to ``folder`` while refghost's kernels are declared (Numba picks a
    kernel's cache location then); other code's Numba functions keep theirs."""
    saved = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = folder
    try:
        yield
    finally:
        numba.config.CACHE_DIR = saved


def _merge(kwargs, **extra):
    bad = _FIXED & set(kwargs)
    if bad:
        raise TypeError(f"refghost.kernels._jit: {sorted(bad)} are fixed here and may not be "
                        f"overridden")
    return {**_OPTIONS, **extra, **kwargs}


def _njit(func, options):
    """``numba.njit(**options)`` applied to ``func``, or the decorator if ``func`` is None."""
    def declare(f):
        with _caching_in(CACHE_DIR):
            return numba.njit(**options)(f)
    return declare if func is None else declare(func)


def jit(func=None, **kwargs):
    """``numba.njit`` with refghost's flags; use as ``@jit`` or ``@jit(**options)``."""
    return _njit(func, _merge(kwargs))


def parallel_jit(func=None, **kwargs):
    """Like :func:`jit` but with ``parallel=True`` so ``numba.prange`` loops run on Numba's pool."""
    return _njit(func, _merge(kwargs, parallel=True))


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
    decorator = numba.vectorize(signatures, **options)

    def declare(f):
        with _caching_in(CACHE_DIR):
            return decorator(f)
    return declare


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
