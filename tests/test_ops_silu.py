"""ops.silu: no overflow warning for large negative inputs, and the same values as its formula."""

import warnings

import numpy as np

from refghost import ops


def test_silu_does_not_warn_and_keeps_its_values():
    for dtype in (np.float32, np.float64):
        x = np.array([-1e4, -800.0, -100.0, -88.8, -5.0, 0.0, 3.0, 1e4], dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = ops.silu(x)
        with np.errstate(over="ignore"):
            expected = x / (dtype(1) + np.exp(-x))
        assert y.dtype == dtype and np.array_equal(y, expected)
        assert np.signbit(y[0]) and y[0] == 0  # x / inf: -0
