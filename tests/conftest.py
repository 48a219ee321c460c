"""Shared fixtures: random but well-scaled weights for any config, written to temporary files."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from refghost.arch import Config, build_graph
from refghost.weights import from_tensors, save_weights


def random_tensors(config: Config, seed: int = 0) -> dict:
    """float32 tensors for every key of ``config``: conv weights N(0, 1/fan_in), BN gamma
    U(0.5, 1.5), beta/mean N(0, 0.1), var U(0.5, 1.5), biases N(0, 0.1), PReLU slopes U(0.1, 0.4)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, shape in build_graph(config).param_shapes.items():
        if key.endswith("running_var") or (len(shape) == 1 and key.endswith(".weight") and shape != (1,)):
            value = rng.uniform(0.5, 1.5, shape)
        elif shape == (1,):
            value = rng.uniform(0.1, 0.4, shape)
        elif len(shape) == 1:
            value = rng.normal(0.0, 0.1, shape)
        else:
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)
        tensors[key] = value.astype(np.float32)
    return tensors


def random_weights(config: Config = Config(), seed: int = 0):
    return from_tensors(random_tensors(config, seed), config)


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
