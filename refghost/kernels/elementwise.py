"""Elementwise kernels: the error function as a compiled NumPy ufunc.

``ops._erf`` calls the C library's ``erf`` once per element through Python (``np.frompyfunc``),
which is slow; :func:`erf` calls the same double-precision function from compiled code.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import vectorize


@vectorize(["float64(float64)", "float32(float32)"])
def _erf_ufunc(x):
    # Always the float64 erf, rounded to the result type on return (round to nearest), exactly as
    # ops._erf does with astype; a float32 input is widened exactly, never sent to erff.
    return math.erf(np.float64(x))


def erf(x):
    """Error function, elementwise, for a float32 or float64 array of any shape; returns x's dtype.

    Agreement with :func:`refghost.ops._erf`: both evaluate ``erf`` in float64 and round the result
    to x's dtype, so they are bit-identical for both dtypes as long as Numba's ``math.erf`` and
    Python's ``math.erf`` reach the same libm routine (tests/test_kernels.py checks exact equality).
    NaN propagates; erf(+-inf) = +-1; erf(-0.0) = -0.0.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"erf: need a float32 or float64 array, got {x.dtype}")
    return np.asarray(_erf_ufunc(x), dtype=x.dtype)
