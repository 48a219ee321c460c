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


# --- several images -------------------------------------------------------------------------------

@pytest.fixture
def odd_images(tmp_path):
    """A folder of images of different sizes and modes (gray 1x1, RGBA, 16-bit gray, palette)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (1, 1), 200).save(folder / "a_gray.png")
    Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA").save(folder / "b_rgba.png")
    Image.fromarray(rng.integers(0, 65536, (33, 45), dtype=np.uint16)).save(folder / "c_16bit.png")
    Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)).convert("P").save(folder / "d_palette.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_a_folder_or_a_list_is_one_batch_in_order_each_resized(weights_file, odd_images):
    w = refghost.load_weights(weights_file)
    files = sorted(str(p) for p in odd_images.glob("*.png"))
    alone = [refghost.run(f, w) for f in files]
    for batch in (refghost.run(odd_images, w), refghost.run(files, w), refghost.run([str(odd_images)], w),
                  refghost.run(files[:2] + [read_image(files[2], "BGR"), files[3]], w)):
        assert batch["blocks.9"].shape == (4, 960, 10, 10)
        for i, one in enumerate(alone):  # row i is image i, the bits of running it alone
            for name in one:
                assert np.array_equal(batch[name][i:i + 1], one[name]), (i, name)


def test_prepare_input_reports_progress_and_refuses_mixed_shapes(weights_file, odd_images):
    from refghost.runner import prepare_input

    w = refghost.load_weights(weights_file)
    calls = []
    x = prepare_input(odd_images, w, np.float32, progress=lambda i, n: calls.append((i, n)))
    assert x.shape == (4, 3, 320, 320) and calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(ImageError, match=r"image 1 .* one shape"):
        prepare_input([np.zeros((3, 8, 8), np.float32), np.zeros((3, 9, 8), np.float32)], w, np.float32)
    with pytest.raises(ImageError, match="empty list"):
        prepare_input([], w, np.float32)
    with pytest.raises(ImageError, match="no image files"):
        prepare_input(odd_images / "..", w, np.float32)  # tmp_path: a folder without images


def test_describe_image_says_what_reading_and_resizing_do(odd_images):
    from refghost.runner import describe_image

    said = {p.name: describe_image(str(p), (320, 320)) for p in odd_images.glob("*.png")}
    assert said["a_gray.png"] == ("1x1", ["grayscale converted to 3 channels", "upscaled to 320x320"])
    assert said["b_rgba.png"] == ("70x50", ["alpha channel dropped (not composited)", "upscaled to 320x320"])
    assert said["c_16bit.png"][1][0].startswith("16-bit grayscale reduced to 8 bits")
    assert said["d_palette.png"] == ("500x400", ["palette image converted to 3 channels", "downscaled to 320x320"])
    assert describe_image(np.zeros((320, 320, 3), np.uint8), (320, 320)) == (
        "320x320", ["already the input size: not resized"])
    assert describe_image(np.zeros((10, 400, 3), np.uint8), (320, 320))[1] == ["resized to 320x320"]
    assert describe_image(np.zeros((2, 3, 8, 8), np.float32), (320, 320))[1] == [
        "used as the network input as is (not resized)"]
