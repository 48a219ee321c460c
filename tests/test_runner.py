"""``refghost.run``: the accepted forms of image and weights, dtypes, and bad input."""

import numpy as np
import pytest

import refghost
from refghost.cli import SAMPLE_IMAGE
from refghost.errors import ImageError, RefghostError, WeightsError
from refghost.preprocess import read_image


def test_path_or_loaded_weights_give_the_same_bits(weights_file):
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    a = refghost.run(x, weights_file)
    b = refghost.run(x, refghost.load_weights(weights_file))
    assert list(a) == ["blocks.4", "blocks.6", "blocks.9"]
    for name in a:
        assert a[name].dtype == np.float32 and np.array_equal(a[name], b[name])


def test_chw_input_gets_a_batch_axis(weights_file):
    x = np.random.default_rng(1).standard_normal((3, 40, 24))
    out = refghost.run(x, weights_file, dtype="float64")
    assert out["blocks.9"].shape == (1, 960, 2, 1) and out["blocks.9"].dtype == np.float64
    np.testing.assert_array_equal(out["blocks.9"], refghost.run(x[None], weights_file, dtype="float64")["blocks.9"])


def test_image_path_and_uint8_array_are_preprocessed_alike(weights_file):
    w = refghost.load_weights(weights_file)
    from_path = refghost.run(SAMPLE_IMAGE, w)
    from_array = refghost.run(read_image(SAMPLE_IMAGE, w.preprocessing.channel_order), w)
    assert from_path["blocks.4"].shape == (1, 40, 40, 40)  # resized to the recorded 320x320
    for name in from_path:
        assert np.array_equal(from_path[name], from_array[name])


@pytest.mark.parametrize("image, error, message", [
    (np.zeros((1, 4, 8, 8), np.float32), ImageError, r"\(N, 3, H, W\)"),
    (np.zeros((8, 8), np.float32), ImageError, r"\(N, 3, H, W\)"),
    (np.zeros((1, 3, 0, 8), np.float32), ImageError, r"\(N, 3, H, W\)"),
    (np.full((1, 3, 8, 8), np.inf, np.float32), ImageError, "192 NaN or Inf"),
    (np.zeros((1, 3, 8, 8), np.int32), ImageError, "dtype int32"),
    (np.zeros((8, 8, 4), np.uint8), ImageError, r"expected 3 channels .* found 4"),
    (np.zeros((3, 8, 8), np.uint8), ImageError, r"expected 3 channels .* found 8"),  # CHW, not HWC
    ([[0.0]], ImageError, "list"),
    ("/no/such/image.png", ImageError, "image.png"),
])
def test_bad_image(weights_file, image, error, message):
    with pytest.raises(error, match=message):
        refghost.run(image, weights_file)


def test_bad_arguments(weights_file):
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(RefghostError, match="dtype"):
        refghost.run(x, weights_file, dtype="float16")
    with pytest.raises(RefghostError, match="impl"):
        refghost.run(x, weights_file, impl="cuda")
    with pytest.raises(RefghostError, match="weights must be a path"):
        refghost.run(x, 42)
    with pytest.raises(WeightsError, match="no such weights file"):
        refghost.run(x, "/no/such/weights.h5")


def test_errors_share_one_base_type():
    assert issubclass(ImageError, RefghostError) and issubclass(WeightsError, RefghostError)
