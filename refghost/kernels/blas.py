"""Single-threaded BLAS GEMM callable from inside Numba kernels (so inside ``prange``).

The engine (:mod:`refghost.engine`) runs its 1x1 convolutions as GEMM tiles called from a Numba
parallel loop, with the BLAS library itself held at one thread: one thread pool in the process,
never two spinning against each other (docs/performance.md, "One thread pool").

How the call is made, and why it survives Numba's on-disk cache:

* NumPy's wheels bundle OpenBLAS (``scipy-openblas64``) and export its CBLAS interface with the
  ``scipy_`` prefix and ``64_`` suffix: ``scipy_cblas_sgemm64_`` / ``scipy_cblas_dgemm64_`` (64-bit
  integers). At import, this module finds that library next to NumPy, looks the two symbols up
  and registers their addresses with LLVM under names of our own (``refghost_cblas_sgemm`` /
  ``_dgemm``).
* Kernels call them as :class:`numba.types.ExternalFunction` by *name*. The compiled code holds
  a symbol reference, not an address, so ``cache=True`` works: the address is resolved when the
  cached code is linked in a new process (after this module registered it again). Calling a
  ctypes function object instead would bake the address in and disable caching.
* :data:`AVAILABLE` is False when no such library is found (a NumPy built against another BLAS):
  the engine then declines and :func:`refghost.run` uses the interpreter.

Numerics: each output element is one dot product computed by OpenBLAS's GEMM kernel in the
array dtype (float32 ``sgemm`` or float64 ``dgemm``), summed over k in the library's order. A
given call (same shapes, pitches and data) gives the same bits every time with the library at one
thread, whatever thread it runs on.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import jit

_SYMBOLS = {"refghost_cblas_sgemm": "scipy_cblas_sgemm64_", "refghost_cblas_dgemm": "scipy_cblas_dgemm64_"}
#: CBLAS enum values.
ROW_MAJOR = 101
NO_TRANS = 111


def _find_library():
    """Path of NumPy's bundled OpenBLAS exporting the 64-bit CBLAS symbols, or None."""
    site = os.path.dirname(os.path.dirname(np.__file__))
    for path in sorted(glob.glob(os.path.join(site, "numpy.libs", "libscipy_openblas64*"))
                       + glob.glob(os.path.join(site, "numpy", ".dylibs", "libscipy_openblas64*"))):
        try:
            lib = ctypes.CDLL(path)
            addresses = {ours: ctypes.cast(getattr(lib, theirs), ctypes.c_void_p).value
                         for ours, theirs in _SYMBOLS.items()}
        except (OSError, AttributeError):
            continue
        return path, addresses
    return None, None


def _register():
    path, addresses = _find_library()
    if path is None:
        return None
    import llvmlite.binding as llvm

    for name, address in addresses.items():
        llvm.add_symbol(name, address)
    return path


#: Path of the BLAS library the kernels call, or None when none was found.
LIBRARY = _register()
AVAILABLE = LIBRARY is not None


def _gemm_signature(real):
    i64 = types.int64
    return types.void(types.int32, types.int32, types.int32, i64, i64, i64, real, types.voidptr, i64,
                      types.voidptr, i64, real, types.voidptr, i64)


_sgemm = types.ExternalFunction("refghost_cblas_sgemm", _gemm_signature(types.float32))
_dgemm = types.ExternalFunction("refghost_cblas_dgemm", _gemm_signature(types.float64))


@intrinsic
def address(typingctx, arr, index):
    """``&arr.flat[index]`` as a ``void*`` (arr C-contiguous; no bounds check)."""
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None
    sig = types.voidptr(arr, index)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        return builder.bitcast(builder.gep(ary.data, [idx]), cgutils.voidptr_t)

    return sig, codegen


@jit
def gemm(m, n, k, a, a_off, lda, b, b_off, ldb, c, c_off, ldc):
    """Row-major ``C[m, n] = A[m, k] @ B[k, n]`` (beta 0) on flat offsets into C-contiguous arrays.

    ``A`` starts at ``a.flat[a_off]`` with row pitch ``lda`` (same for B, C). All three arrays
    share one dtype, float32 or float64. The BLAS library must be at one thread (the caller's
    job, see :mod:`refghost.engine`).
    """
    if a.itemsize == 4:
        _sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, k, np.float32(1.0), address(a, a_off), lda,
               address(b, b_off), ldb, np.float32(0.0), address(c, c_off), ldc)
    else:
        _dgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, k, 1.0, address(a, a_off), lda,
               address(b, b_off), ldb, 0.0, address(c, c_off), ldc)
