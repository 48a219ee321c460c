"""Files written through refghost.atomic get the mode the umask gives (goldens are meant to be shared)."""

import os
import stat

import numpy as np
import pytest

from refghost.atomic import atomic_path
from refghost.cli import save_npz
from refghost.weights import save_weights


@pytest.fixture
def umask():
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask):
        os.umask(mask)
    yield set_mask
    os.umask(saved)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mask, mode):
    from conftest import random_weights

    umask(mask)
    with atomic_path(tmp_path / "plain.txt") as tmp, open(tmp, "w") as f:
        f.write("x")
    save_npz(str(tmp_path / "a.npz"), {"a": np.zeros(2)})
    save_weights(tmp_path / "w.h5", random_weights())
    for name in ("plain.txt", "a.npz", "w.h5"):
        assert _mode(tmp_path / name) == mode, (name, oct(_mode(tmp_path / name)))
    assert os.umask(mask) == mask  # reading the umask left it as it was


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "x.bin") as tmp:
        open(tmp, "wb").write(b"half")
        raise RuntimeError
    assert os.listdir(tmp_path) == []
