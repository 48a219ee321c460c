"""Fast activation epilogues: ReLU, LeakyReLU / PReLU and ReLU6 applied in place on a row, by code.

Run on each output while it is in cache, by the depthwise kernel (:mod:`.depthwise`) and the
engine's GEMM tiles, stem bands and ghost rows (:mod:`refghost.engine`).

Activation codes: :data:`ACT_NONE`, :data:`ACT_RELU`, :data:`ACT_LEAKY` (``x if x > 0 else
slope*x``: LeakyReLU and PReLU), :data:`ACT_RELU6`. ``consts`` is a small array in the compute
dtype, ``[0, 3, 6, slope]`` (:func:`make_consts`), so every constant is already of the array's
type inside the kernels.
"""

from __future__ import annotations

import numpy as np

from ._jit import jit

ACT_NONE = 0
ACT_RELU = 1
ACT_LEAKY = 2
ACT_RELU6 = 3


def make_consts(dtype, slope=0.0):
    """The ``consts`` array of a kernel call: ``[0, 3, 6, slope]`` in ``dtype``."""
    return np.array([0.0, 3.0, 6.0, slope], dtype=dtype)


@jit
def activate(row, n, act, consts):
    """In place on ``row[:n]``: the fast activation ``act`` (see the module docstring)."""
    zero = consts[0]
    if act == ACT_RELU:
        for j in range(n):
            v = row[j]
            row[j] = v if v > zero else zero
    elif act == ACT_LEAKY:
        slope = consts[3]
        for j in range(n):
            v = row[j]
            row[j] = v if v > zero else v * slope
    elif act == ACT_RELU6:
        six = consts[2]
        for j in range(n):
            v = row[j]
            v = v if v > zero else zero
            row[j] = v if v < six else six

