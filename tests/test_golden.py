"""Golden files: contents, provenance, round trip, and every way one can be unusable."""

import h5py
import numpy as np
import pytest
from conftest import random_weights

import refghost
from refghost.arch import Config
from refghost.cli import main
from refghost.verify.golden import GoldenError, make_golden, read_golden, write_golden

CONFIG = Config(width=0.5, activation="LeakyReLU")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden")
    weights = random_weights(CONFIG, seed=2)
    refghost.save_weights(folder / "w.h5", weights)
    weights = refghost.load_weights(folder / "w.h5")
    x = np.random.default_rng(0).standard_normal((2, 3, 48, 40)).astype(np.float32)
    path = folder / "g.h5"
    write_golden(path, make_golden(weights, x, intermediates=True, input_source="test", command="pytest"))
    return weights, x, path


def test_round_trip_and_oracle_values(setup):
    weights, x, path = setup
    golden = read_golden(path)
    assert golden.input.dtype == np.float32 and np.array_equal(golden.input, x)
    oracle = refghost.run(x, weights, dtype="float64", intermediates=True)
    assert list(golden.outputs) == ["blocks.4", "blocks.6", "blocks.9"]
    assert list(golden.intermediates) == [n.name for n in weights.graph.nodes]  # forward order
    for name, value in golden.tensors().items():
        assert value.dtype == np.float64
        assert np.array_equal(value, oracle[name]), name  # exactly refghost.run's float64 values
        assert golden.bounds[name].shape == value.shape and (golden.bounds[name] > 0).any()
    assert list(golden.tensors())[:3] == ["conv_stem", "bn1", "act1"]
    assert golden.attrs["weights_sha256"] == weights.sha256
    assert golden.attrs["command"] == "pytest" and golden.attrs["input_source"] == "test"
    for key in ("refghost_version", "numpy_version", "numba_version", "h5py_version"):
        assert golden.attrs[key]
    assert golden.weights.config == CONFIG


def test_bounds_scale_with_depth(setup):
    """Later layers carry the rounding of every earlier one: their bounds (relative to the
    values) grow through the network, and stay far below the values themselves."""
    golden = read_golden(setup[2])
    first, last = golden.tensors()["conv_stem"], golden.tensors()["blocks.9"]
    rel_first = (golden.bounds["conv_stem"].max() / np.abs(first).max())
    rel_last = (golden.bounds["blocks.9"].max() / np.abs(last).max())
    assert 0 < rel_first < rel_last < 1e-3


def test_outputs_only(setup, tmp_path):
    weights, x, _ = setup
    write_golden(tmp_path / "g.h5", make_golden(weights, x))
    golden = read_golden(tmp_path / "g.h5")
    assert golden.intermediates == {} and list(golden.tensors()) == ["blocks.4", "blocks.6", "blocks.9"]


def _copy(src, dst, edit):
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.attrs.__setitem__("format", "polygraphy"), "format is 'polygraphy'"),
    (lambda f: f.attrs.__setitem__("schema_version", 7), "schema version 7.*regenerate it with `refghost golden"),
    (lambda f: f.__delitem__("bounds"), "'bounds' is missing"),
    (lambda f: f["weights"].__delitem__("bn1.weight"), r"missing 1 key.*'bn1\.weight'"),
    (lambda f: f["bounds"].__delitem__("blocks.4"), "bound of 'blocks.4'"),
    (lambda f: f["intermediates"].create_dataset("blocks.99", data=np.zeros(1)), "'blocks.99' is not a layer"),
])
def test_unusable_golden(setup, tmp_path, edit, message):
    bad = _copy(setup[2], tmp_path / "bad.h5", edit)
    with pytest.raises(GoldenError, match=message):
        read_golden(bad)


def test_truncated_and_missing(setup, tmp_path):
    data = setup[2].read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(GoldenError, match="HDF5"):
        read_golden(tmp_path / "cut.h5")
    with pytest.raises(GoldenError, match="no such golden file"):
        read_golden(tmp_path / "none.h5")


def test_write_is_atomic(setup, tmp_path, monkeypatch):
    weights, x, _ = setup
    golden = make_golden(weights, x)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(h5py.Group, "create_group", fail)
    with pytest.raises(RuntimeError):
        write_golden(tmp_path / "g.h5", golden)
    assert list(tmp_path.iterdir()) == []


def test_cli_golden_sources(setup, tmp_path, capsys):
    _, x, _ = setup
    weights_path = str(setup[2].parent / "w.h5")
    np.save(tmp_path / "x.npy", x)
    assert main(["golden", "--weights", weights_path, "--input", str(tmp_path / "x.npy"), "--out",
                 str(tmp_path / "a.h5")]) == 0
    assert np.array_equal(read_golden(tmp_path / "a.h5").input, x)
    assert main(["golden", "--weights", weights_path, "--seed", "3", "--batch", "2", "--out",
                 str(tmp_path / "b.h5")]) == 0
    b = read_golden(tmp_path / "b.h5")
    assert b.input.shape == (2, 3, 320, 320) and "seed 3" in b.attrs["input_source"]
    assert "--seed 3" in b.attrs["command"]
    assert main(["golden", "--weights", weights_path, "--out", str(tmp_path / "c.h5")]) == 0  # sample image
    assert read_golden(tmp_path / "c.h5").input.shape == (1, 3, 320, 320)
    out = capsys.readouterr().out
    assert out.count("wrote") == 3


def test_cli_golden_bad_input(tmp_path, capsys):
    assert main(["golden", "--weights", str(tmp_path / "none.h5"), "--out", str(tmp_path / "g.h5")]) == 2
    assert "no such weights file" in capsys.readouterr().err
    assert not (tmp_path / "g.h5").exists()
