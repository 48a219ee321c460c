"""Shared fixtures: random but well-scaled weights for any config, written to temporary files."""

import contextlib
import os

import pytest
from hypothesis import HealthCheck, settings

from refghost.arch import Config, build_graph
from refghost.testing import random_params
from refghost.weights import from_tensors, save_weights


def random_tensors(config: Config, seed: int = 0) -> dict:
    """float32 tensors for every key of ``config`` (``refghost.testing.random_params``)."""
    return random_params(build_graph(config), seed=seed)


def random_weights(config: Config = Config(), seed: int = 0):
    return from_tensors(random_tensors(config, seed), config)


@contextlib.contextmanager
def numba_threads(n: int):
    """Numba's thread count set to ``n`` inside the block, and restored after it."""
    import numba

    saved = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(saved)


@pytest.fixture
def one_torch_thread():
    """PyTorch on one thread in a test (use it, or ``pytestmark = pytest.mark.usefixtures(...)``).
    Numba's OpenMP layer shares PyTorch's OpenMP runtime and sets it back to every core after each
    parallel kernel; on a loaded machine PyTorch's spinning threads then make small float64 runs
    up to 100 times slower. Call ``torch.set_num_threads(1)`` again after a refghost kernel ran."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """A valid NanoDet GhostNet 1.0x weights file with random weights."""
    path = tmp_path_factory.mktemp("weights") / "random_1.0x.h5"
    save_weights(path, random_weights())
    return path


# --- Hypothesis profiles (refghost.testing, property tests) -------------------------------------
# dev: quick local runs; ci: derandomized, fixed example counts, fits the CI budget; thorough:
# many examples, for before a release. Choose with HYPOTHESIS_PROFILE (default "ci" when the CI
# env var is set, else "dev"); pytest --hypothesis-profile=NAME overrides both. deadline=None:
# the first call of a Numba kernel compiles (or loads its cache).
settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
