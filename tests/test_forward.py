"""The graph interpreter: plain vs fast paths end to end, determinism, output bookkeeping."""

import numba
import numpy as np
import pytest
from conftest import numba_threads, random_weights

from refghost.arch import Config
from refghost.bounds import FLOAT64_U, error_bounds
from refghost.forward import execute
from refghost.threads import single_threaded_blas


@pytest.fixture(scope="module")
def gelu_weights():
    # GELU exercises the Numba erf; all 10 stages are outputs.
    return random_weights(Config(width=0.5, activation="GELU", out_stages=tuple(range(10))), seed=5)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(3).standard_normal((2, 3, 37, 45))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_plain_and_fast_paths_agree_within_the_accumulated_bound(gelu_weights, x, dtype):
    """Both paths are honest implementations in ``dtype``, so each is within the probabilistic
    bound of the exact result, and their difference within the sum of both bounds."""
    params = gelu_weights.params(dtype)
    xd = x.astype(dtype)
    with single_threaded_blas():
        fast = execute(gelu_weights.graph, params, xd, intermediates=True, impl="kernels")
        plain = execute(gelu_weights.graph, params, xd, intermediates=True, impl="plain")
    u = 2.0 ** -24 if dtype == "float32" else FLOAT64_U
    _, bounds = error_bounds(gelu_weights.graph, gelu_weights.params("float64"), xd.astype(np.float64), u=u)
    assert list(fast) == list(plain)
    for name, bound in bounds.items():
        assert fast[name].dtype == plain[name].dtype == np.dtype(dtype)
        assert (np.abs(fast[name] - plain[name]) <= 2 * bound).all(), name


def test_same_bits_whatever_the_thread_count(gelu_weights, x):
    params = gelu_weights.params("float32")
    xd = x.astype(np.float32)
    runs = []
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        with numba_threads(threads), single_threaded_blas():
            runs.append(execute(gelu_weights.graph, params, xd, intermediates=True))
    with single_threaded_blas():
        runs.append(execute(gelu_weights.graph, params, xd, intermediates=True))
    for other in runs[1:]:
        for name in runs[0]:
            assert np.array_equal(runs[0][name], other[name]), name


def test_outputs_only_unless_intermediates(gelu_weights, x):
    params = gelu_weights.params("float64")
    out = execute(gelu_weights.graph, params, x)
    assert list(out) == [f"blocks.{s}" for s in range(10)]
    full = execute(gelu_weights.graph, params, x, intermediates=True)
    names = list(full)
    # each stage output right after the node that produces it
    assert names[names.index("blocks.4.0") + 1] == "blocks.4"
    assert names[names.index("blocks.9.0.act1") + 1] == "blocks.9"
    assert len(names) == len(gelu_weights.graph.nodes) + 10
    for name in out:
        assert np.array_equal(out[name], full[name])


def test_unknown_impl(gelu_weights, x):
    with pytest.raises(ValueError, match="impl"):
        execute(gelu_weights.graph, gelu_weights.params("float64"), x, impl="gpu")
