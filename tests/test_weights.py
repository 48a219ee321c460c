"""The weights file: round trip, determinism, and every way a file can be bad."""

import h5py
import numpy as np
import pytest
from conftest import random_tensors, random_weights

from refghost.arch import Config
from refghost.errors import WeightsError
from refghost.weights import FORMAT, from_tensors, load_weights, save_weights


def test_round_trip(weights_file):
    w = load_weights(weights_file)
    original = random_weights()
    assert w.config == original.config and w.preprocessing == original.preprocessing
    assert list(w.tensors) == list(original.tensors)
    for key, value in original.tensors.items():
        assert w.tensors[key].dtype == np.float32
        np.testing.assert_array_equal(w.tensors[key], value)
    assert len(w.sha256) == 64


def test_same_weights_same_bytes(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    save_weights(a, random_weights(seed=3))
    save_weights(b, random_weights(seed=3))
    assert a.read_bytes() == b.read_bytes()


def test_params_in_float64_are_exact_copies(weights_file):
    w = load_weights(weights_file)
    p = w.params("float64")
    assert all(v.dtype == np.float64 for v in p.values())
    np.testing.assert_array_equal(p["conv_stem.weight"], w.tensors["conv_stem.weight"].astype(np.float64))
    assert w.params("float64") is p  # cached


def test_num_batches_tracked_is_ignored():
    tensors = random_tensors(Config())
    tensors["bn1.num_batches_tracked"] = np.array(7, dtype=np.int64)
    assert "bn1.num_batches_tracked" not in from_tensors(tensors, Config()).tensors


def _rewrite(src, dst, edit):
    """Copy weights file ``src`` to ``dst`` with ``edit(f)`` applied to the open copy."""
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _set(key, value):
    def edit(f):
        del f[key]
        f[key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.__delitem__("blocks.3.0.se.conv_reduce.bias"), r"missing 1 key.*'blocks\.3\.0\.se\.conv_reduce\.bias' with shape \[20\]"),
    (lambda f: f.create_dataset("blocks.3.0.extra.weight", data=np.zeros(3, np.float32)), r"unexpected key.*'blocks\.3\.0\.extra\.weight' with shape \[3\]"),
    (_set("blocks.6.3.ghost2.primary_conv.0.weight", np.zeros((56, 480, 3, 3), np.float32)), r"'blocks\.6\.3\.ghost2\.primary_conv\.0\.weight' has shape \[56, 480, 3, 3\], expected \[56, 480, 1, 1\]"),
    (_set("bn1.weight", np.full(16, np.nan, np.float32)), r"'bn1\.weight' has 16 NaN or Inf"),
    (_set("bn1.bias", np.array([np.inf] + [0.0] * 15, np.float32)), r"'bn1\.bias' has 1 NaN or Inf"),
    (_set("bn1.running_var", -np.ones(16, np.float32)), "negative variances"),
    (_set("bn1.weight", np.ones(16, np.int32)), r"'bn1\.weight' has dtype int32"),
    (lambda f: f.attrs.__setitem__("format", "keras"), "format is 'keras'"),
    (lambda f: f.attrs.__setitem__("schema_version", 2), "schema version 2"),
    (lambda f: f.attrs.__delitem__("arch"), "root attribute 'arch' is missing"),
    (lambda f: f.attrs.__setitem__("width", 0.5), r"'conv_stem\.weight' has shape \[16, 3, 3, 3\], expected \[8, 3, 3, 3\] for nanodet width 0\.5"),
    (lambda f: f.attrs.__setitem__("activation", "Mish"), "unknown activation 'Mish'"),
    (lambda f: f.attrs.__setitem__("out_stages", [4, 12]), "out_stages"),
    (lambda f: f.attrs.__setitem__("channel_order", "RGBA"), "channel_order"),
    (lambda f: f.create_group("blocks"), "is a group"),
])
def test_bad_file_is_refused_by_name(weights_file, tmp_path, edit, message):
    bad = _rewrite(weights_file, tmp_path / "bad.h5", edit)
    with pytest.raises(WeightsError, match=message):
        load_weights(bad)


def test_prelu_weights_without_prelu_keys(weights_file, tmp_path):
    bad = _rewrite(weights_file, tmp_path / "prelu.h5", lambda f: f.attrs.__setitem__("activation", "PReLU"))
    with pytest.raises(WeightsError, match=r"missing 34 key.*'act1\.weight' with shape \[1\]"):
        load_weights(bad)


def test_truncated_file(weights_file, tmp_path):
    data = weights_file.read_bytes()
    for cut in (100, len(data) // 2, len(data) - 1000):
        bad = tmp_path / f"cut{cut}.h5"
        bad.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="HDF5"):
            load_weights(bad)


def test_not_hdf5_and_missing(tmp_path):
    text = tmp_path / "w.h5"
    text.write_text("hello")
    with pytest.raises(WeightsError, match="not a readable HDF5 file"):
        load_weights(text)
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(tmp_path / "nope.h5")


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves neither the target nor a temporary file behind."""
    target = tmp_path / "w.h5"
    weights = random_weights()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_weights(target, weights)
    assert list(tmp_path.iterdir()) == []


def test_format_name_constant():
    assert FORMAT == "refghost-weights"
