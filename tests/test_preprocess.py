"""Tests for refghost.preprocess against OpenCV (which CI installs; it is a test-only dependency).

OpenCV 4.x, 5.0 and 5.1 use different warpPerspective kernels for 8-bit images, so the tests
compare against the installed cv2 with the kernel :func:`kernel_for_opencv` names for it
(``INSTALLED_KERNEL``; also with OpenCV's optimisations and its IPP calls switched off), and every
kernel against hashes of real OpenCV 4.14, 5.0 and 5.1 outputs (``tests/opencv_warp_hashes.json``,
written by ``tools/opencv_kernels.py``), so no second OpenCV is needed at test time. The
fixed-point (4.x) kernel is also checked against ``cv2.remap`` with fixed-point maps (the same
code in 4.x and 5.x) and against hashes of real OpenCV 4.10/4.11/4.12 output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import warnings
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from refghost import preprocess
from refghost.errors import ImageError, RefghostError
from refghost.preprocess import (
    DEFAULT_WARP_KERNEL,
    IMAGENET_PREPROCESSING,
    NANODET_PREPROCESSING,
    WARP_KERNELS,
    kernel_for_opencv,
    normalize,
    prepare_image,
    read_image,
    warp_resize,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "refghost" / "data" / "sample.png"


def _cv2_feature(name: str) -> bool:
    ids = {cv2.getHardwareFeatureName(i): i for i in range(300) if cv2.getHardwareFeatureName(i)}
    return name in ids and bool(cv2.checkHardwareSupport(ids[name]))


def _cv2_uses_fma() -> bool:
    """Whether the installed cv2's SIMD dispatch computes with fused multiply-add."""
    if not cv2.useOptimized():
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return _cv2_feature("AVX2") and _cv2_feature("FMA3")


def _installed_kernel() -> str:
    """The warp_resize kernel that reproduces the installed cv2.warpPerspective as configured now."""
    return kernel_for_opencv(cv2.__version__, fma=_cv2_uses_fma(), ipp=cv2.ipp.useIPP())


INSTALLED_KERNEL = _installed_kernel()


def _load_tool(name: str):
    tool_path = REPO / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, tool_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OPENCV_KERNELS_TOOL = _load_tool("opencv_kernels")
_pattern = OPENCV_KERNELS_TOOL.pattern_image


def _cv2_warp(img: np.ndarray, dst_w: int, dst_h: int) -> np.ndarray:
    """NanoDet's ShapeTransform with keep_ratio False."""
    h, w = img.shape[:2]
    m = np.diag([dst_w / w, dst_h / h, 1.0])
    return cv2.warpPerspective(img, m, dsize=(dst_w, dst_h))


def _nanodet_normalize(img_u8: np.ndarray, mean, std) -> np.ndarray:
    """Straight float32 transcription of NanoDet's color_aug_and_norm + _normalize, then CHW."""
    img = img_u8.astype(np.float32) / 255
    mean = np.array(mean, dtype=np.float32).reshape(1, 1, 3) / 255
    std = np.array(std, dtype=np.float32).reshape(1, 1, 3) / 255
    img = (img - mean) / std
    return img.transpose(2, 0, 1)


def _random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


# --------------------------------------------------------------------------------------------
# warp_resize vs OpenCV
# --------------------------------------------------------------------------------------------

# (src_w, src_h, dst_w, dst_h): upscales, downscales, non-integer ratios, 1-pixel images, odd
# sizes, wide tiles (> 64 columns, OpenCV 4 tiles the destination), and ratios whose source
# coordinates fall exactly on 1/64 ties (odd src to 128/192/320/640).
WARP_CASES = [
    (1, 1, 1, 1),
    (1, 1, 5, 3),
    (5, 3, 1, 1),
    (1, 7, 9, 1),
    (2, 2, 3, 3),
    (3, 3, 2, 2),
    (4, 3, 8, 6),
    (8, 6, 4, 3),
    (7, 5, 320, 320),
    (13, 11, 128, 192),
    (17, 9, 640, 33),
    (31, 29, 37, 41),
    (97, 61, 50, 70),
    (100, 75, 416, 416),
    (321, 17, 640, 48),
    (333, 250, 320, 320),
    (640, 480, 320, 320),
    (480, 640, 416, 416),
    (1280, 720, 320, 320),
    (250, 251, 249, 252),
    (320, 320, 640, 640),
    (5, 640, 416, 7),
    (1000, 3, 97, 5),
]


@pytest.mark.parametrize("sw,sh,dw,dh", WARP_CASES, ids=[f"{a}x{b}->{c}x{d}" for a, b, c, d in WARP_CASES])
def test_warp_matches_installed_opencv(sw, sh, dw, dh):
    img = _random_image(sh, sw, seed=sw * 7 + sh * 13 + dw * 17 + dh)
    ref = _cv2_warp(img, dw, dh)
    out = warp_resize(img, (dw, dh), warp_kernel=INSTALLED_KERNEL)
    assert out.shape == (dh, dw, 3) and out.dtype == np.uint8
    assert np.array_equal(out, ref), (
        f"cv2 {cv2.__version__} with kernel {INSTALLED_KERNEL!r}: max abs diff {_max_diff(out, ref)}"
    )


@pytest.mark.parametrize("size", [(320, 320), (416, 416), (224, 224)])
def test_warp_sample_matches_installed_opencv(size):
    img = cv2.imread(str(SAMPLE))
    ref = _cv2_warp(img, *size)
    out = warp_resize(img, size, warp_kernel=INSTALLED_KERNEL)
    assert np.array_equal(out, ref), f"max abs diff {_max_diff(out, ref)}"


@pytest.mark.parametrize("switch", ["setUseOptimized", "setUseIPP"])
def test_warp_matches_opencv_with_optimizations_or_ipp_off(switch):
    """cv2.setUseOptimized(False): OpenCV 5 runs its non-FMA baseline code without IPP (kernel
    float32); cv2.ipp.setUseIPP(False): OpenCV 5.1 runs its own SIMD kernel (float32_fma)."""
    was_optimized, was_ipp = cv2.useOptimized(), cv2.ipp.useIPP()
    (cv2.setUseOptimized if switch == "setUseOptimized" else cv2.ipp.setUseIPP)(False)
    try:
        kernel = _installed_kernel()
        assert kernel == kernel_for_opencv(cv2.__version__, fma=switch != "setUseOptimized" and _cv2_uses_fma(),
                                           ipp=False)
        for sw, sh, dw, dh in [(7, 5, 320, 320), (333, 250, 320, 320), (17, 9, 640, 33), (31, 29, 37, 41)]:
            img = _random_image(sh, sw, seed=sw + dw)
            ref = _cv2_warp(img, dw, dh)
            out = warp_resize(img, (dw, dh), warp_kernel=kernel)
            assert np.array_equal(out, ref), f"{(sw, sh, dw, dh)} {kernel}: max abs diff {_max_diff(out, ref)}"
    finally:
        cv2.setUseOptimized(was_optimized)
        cv2.ipp.setUseIPP(was_ipp)


def test_ipp_kernel_differs_only_where_coordinates_are_whole_numbers_at_the_border():
    """The one family of inputs where ipp_float32_fma is not bit-exact to OpenCV 5.1 (upscales
    whose source coordinate is a whole number along one axis, at or past the last source row or
    column: IPP's choice of its inner or border code there was not reproduced). With any other
    installed OpenCV the installed kernel must be exact on these inputs too."""
    tool = OPENCV_KERNELS_TOOL
    differing = 0
    for case in [(7, 4, 320, 4), (7, 400, 320, 400), (63, 5, 1000, 15), (5, 7, 320, 320), (11, 7, 55, 320),
                 (38, 7, 190, 320), (10, 8, 25, 20)]:
        for seed in range(3):
            img = tool.random_image(case[1], case[0], seed)
            ref = _cv2_warp(img, case[2], case[3])
            out = warp_resize(img, case[2:], warp_kernel=INSTALLED_KERNEL)
            diff = np.abs(out.astype(np.int16) - ref)
            if INSTALLED_KERNEL != "ipp_float32_fma":
                assert not diff.any(), f"{case}: {INSTALLED_KERNEL} max abs diff {diff.max()}"
                continue
            assert diff.max() <= 1, case
            assert not ((diff > 0).any(axis=2) & ~tool.whole_coordinate_pixels(*case)).any(), case
            differing += int((diff > 0).sum())
    if INSTALLED_KERNEL == "ipp_float32_fma":
        assert differing > 0  # the residual is real: if OpenCV changes, this test tells


@pytest.mark.parametrize(
    "sw,sh,dw,dh", [(7, 5, 320, 192), (97, 61, 50, 70), (1, 1, 4, 4), (333, 250, 320, 320)]
)
def test_fixed_point_interpolation_matches_cv2_remap(sw, sh, dw, dh):
    """The fixed-point bilinear step equals cv2.remap with int16 maps + 1/32 fraction table.

    That remap path is OpenCV's old fixed-point code in every version, so this checks the
    interpolation and the border handling of the OpenCV 4 kernel even when OpenCV 5 is installed.
    """
    img = _random_image(sh, sw, seed=dw * dh)
    m0, m4, m8 = preprocess._inverse_diagonal(sw, sh, dw, dh)
    bh0 = min(16, dh)
    ix, fx = preprocess._fixed_point_coords(dw, m0, m8, min(1024 // bh0, dw))
    iy, fy = preprocess._fixed_point_coords(dh, m4, m8, dh)
    map_xy = np.stack(np.broadcast_arrays(ix[None, :], iy[:, None]), axis=-1).astype(np.int16)
    map_frac = (fy[:, None] * 32 + fx[None, :]).astype(np.uint16)
    ref = cv2.remap(img, map_xy, map_frac, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out = warp_resize(img, (dw, dh), warp_kernel="fixed_point")
    assert np.array_equal(out, ref), f"max abs diff {_max_diff(out, ref)}"


# sha256[:20] of cv2.warpPerspective output, computed with opencv-python-headless 4.10.0, 4.11.0
# and 4.12.0 (all three agree) on x86-64.
OPENCV4_GOLDEN = {
    (1, 1, 3, 2): "786f414f1bfe2e9d558c",
    (3, 2, 1, 1): "0b49bba7db8be638624a",
    (7, 9, 320, 192): "acaa7bb91e8c6a53bbf0",
    (321, 17, 640, 48): "ecfe64dfaba4d640d927",
    (13, 11, 128, 384): "48bd63364339cb5db52c",
    (64, 48, 320, 320): "505cfde9d8662c423a6b",
    (100, 75, 416, 416): "c50163dec4ded4ae31c4",
    (333, 250, 320, 320): "8d15bcad7963e9ae05e5",
    (640, 480, 320, 320): "0464c18d704b2ca6fc21",
    (17, 101, 1280, 96): "f29dc02781c3968935e9",
    (250, 251, 249, 252): "05a3f7dbbeecc156919f",
    (5, 640, 416, 7): "a742e54ba02d0b60ee30",
    ("sample", 320, 320): "cef5ee55f7cd17a0edad",
    ("sample", 416, 416): "99374d54217d2c89dac5",
    ("sample", 224, 224): "90f579916a7718829239",
}


@pytest.mark.parametrize("case", list(OPENCV4_GOLDEN), ids=[str(c) for c in OPENCV4_GOLDEN])
def test_fixed_point_matches_opencv4_golden(case):
    if case[0] == "sample":
        img = read_image(SAMPLE, "BGR")
        dw, dh = case[1], case[2]
    else:
        sw, sh, dw, dh = case
        img = _pattern(sh, sw)
    out = warp_resize(img, (dw, dh), warp_kernel="fixed_point")
    assert hashlib.sha256(out.tobytes()).hexdigest()[:20] == OPENCV4_GOLDEN[case]


OPENCV_HASHES = json.loads((REPO / "tests" / "opencv_warp_hashes.json").read_text())
_RECORDED = [(entry, key) for entry in OPENCV_HASHES["opencv"] for key in entry["hashes"]]


def _recorded_input(key: str):
    """The input image and destination size that a key of opencv_warp_hashes.json names."""
    src, dst = key.split("->")
    dw, dh = (int(v) for v in dst.split("x"))
    if src == "sample":
        return read_image(SAMPLE, "BGR"), (dw, dh)
    sw, sh = (int(v) for v in src.split("x"))
    return _pattern(sh, sw), (dw, dh)


def test_recorded_opencv_outputs_cover_every_kernel():
    entries = OPENCV_HASHES["opencv"]
    kernels = {kernel_for_opencv(e["version"], fma=e["use_optimized"], ipp=e["use_ipp"]) for e in entries}
    assert kernels == set(WARP_KERNELS)
    assert {e["version"] for e in entries} >= {"4.14.0", "5.0.0", "5.1.0"}


@pytest.mark.parametrize("entry,key", _RECORDED, ids=[f"{e['version']}-{e['config']}-{k}" for e, k in _RECORDED])
def test_kernel_for_opencv_reproduces_recorded_opencv_output(entry, key):
    """Each kernel against real cv2.warpPerspective output of the OpenCV it stands for."""
    kernel = kernel_for_opencv(entry["version"], fma=entry["use_optimized"], ipp=entry["use_ipp"])
    img, size = _recorded_input(key)
    out = warp_resize(img, size, warp_kernel=kernel)
    assert hashlib.sha256(out.tobytes()).hexdigest()[:20] == entry["hashes"][key], kernel


@pytest.mark.parametrize(
    "version,fma,ipp,kernel",
    [
        ("4.10.0", True, True, "fixed_point"),
        ("4.14.0.94", False, True, "fixed_point"),
        ("5.0.0", True, True, "float32_fma"),
        ("5.0.0.93", False, True, "float32"),
        ("5.1.0", True, True, "ipp_float32_fma"),
        ("5.1.0.95", True, False, "float32_fma"),
        ("5.1.0-dev", False, False, "float32"),
        ("5.2.0", True, True, "ipp_float32_fma"),
    ],
)
def test_kernel_for_opencv(version, fma, ipp, kernel):
    assert kernel_for_opencv(version, fma=fma, ipp=ipp) == kernel


@pytest.mark.parametrize("bad", ["", "five", "3.4.16", None, 5.1])
def test_kernel_for_opencv_rejects_bad_versions(bad):
    with pytest.raises(RefghostError, match="OpenCV"):
        kernel_for_opencv(bad)


def test_kernel_keyword_is_a_deprecated_alias_of_warp_kernel():
    img = _random_image(9, 11, seed=4)
    with pytest.warns(DeprecationWarning, match="warp_kernel"):
        old = warp_resize(img, (20, 14), kernel="float32")
    assert np.array_equal(old, warp_resize(img, (20, 14), warp_kernel="float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warp_resize(img, (20, 14), warp_kernel="float32")


def test_default_kernel_is_opencv4_fixed_point():
    assert DEFAULT_WARP_KERNEL == "fixed_point"
    img = _random_image(9, 11, seed=3)
    assert np.array_equal(warp_resize(img, (20, 14)), warp_resize(img, (20, 14), warp_kernel="fixed_point"))


@pytest.mark.parametrize("kernel", WARP_KERNELS)
@pytest.mark.parametrize("h,w", [(1, 1), (5, 7), (360, 480)])
def test_same_size_warp_is_identity(kernel, h, w):
    img = _random_image(h, w, seed=h + w)
    assert np.array_equal(warp_resize(img, (w, h), warp_kernel=kernel), img)
    assert np.array_equal(_cv2_warp(img, w, h), img)


def _exact_fma32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """Reference: a*b+c rounded once to float32 (nearest, ties to even), via exact fractions."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    guess = np.float32(float(exact))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.uint32)) & 1))


def test_fma_emulation_is_correctly_rounded():
    f = np.float32
    # a*b = 2**-24 + 2**-60 exactly; 1 + a*b rounds in float64 to 1 + 2**-24, a float32 tie that
    # ties-to-even would round down, but the exact value is above it.
    a = f((1.0 + 2.0**-12) * 2.0**-24)
    b = f(1.0 - 2.0**-12 + 2.0**-24)
    assert Fraction(float(a)) * Fraction(float(b)) == Fraction(2) ** -24 + Fraction(2) ** -60
    got = preprocess._fma32(np.array([a, -a]), np.array([b, b]), np.array([f(1.0), f(-1.0)]))
    assert got[0] == f(1.0 + 2.0**-23) and got[1] == f(-(1.0 + 2.0**-23))
    # random operands shaped like the interpolation: fraction * pixel difference + pixel value
    rng = np.random.default_rng(0)
    fr = rng.random(300).astype(f)
    diff = rng.integers(-255, 256, 300).astype(f) + rng.random(300).astype(f)
    base = rng.integers(0, 256, 300).astype(f) + rng.random(300).astype(f) * f(2.0**-10)
    got = preprocess._fma32(fr, diff, base)
    for i in range(300):
        assert got[i] == _exact_fma32(fr[i], diff[i], base[i]), i


# --------------------------------------------------------------------------------------------
# normalize / prepare_image
# --------------------------------------------------------------------------------------------


def test_normalize_equals_nanodet_float32():
    img = _random_image(37, 53, seed=5)
    mean, std = NANODET_PREPROCESSING["mean"], NANODET_PREPROCESSING["std"]
    out = normalize(img, mean, std)
    ref = _nanodet_normalize(img, mean, std)
    assert out.dtype == np.float32 and out.shape == (3, 37, 53) and out.flags.c_contiguous
    assert np.array_equal(out, ref)
    # every uint8 value in every channel
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    assert np.array_equal(normalize(ramp, mean, std), _nanodet_normalize(ramp, mean, std))


@pytest.mark.parametrize("size", [(320, 320), (416, 416), (320, 416)])
def test_prepare_image_path_equals_opencv_pipeline(size):
    bgr = cv2.imread(str(SAMPLE))
    p = dict(NANODET_PREPROCESSING, input_size=list(size))
    ref = _nanodet_normalize(_cv2_warp(bgr, *size), p["mean"], p["std"])[None]
    out = prepare_image(SAMPLE, warp_kernel=INSTALLED_KERNEL, **p)
    assert out.dtype == np.float32 and out.shape == (1, 3, size[1], size[0]) and out.flags.c_contiguous
    assert np.array_equal(out, ref)
    # str path and array input give the same result
    assert np.array_equal(prepare_image(str(SAMPLE), warp_kernel=INSTALLED_KERNEL, **p), ref)
    assert np.array_equal(prepare_image(bgr, warp_kernel=INSTALLED_KERNEL, **p), ref)


def test_prepare_image_imagenet_preset_equals_opencv_pipeline():
    rgb = cv2.cvtColor(cv2.imread(str(SAMPLE)), cv2.COLOR_BGR2RGB)
    p = IMAGENET_PREPROCESSING
    ref = _nanodet_normalize(_cv2_warp(rgb, 224, 224), p["mean"], p["std"])[None]
    assert np.array_equal(prepare_image(SAMPLE, warp_kernel=INSTALLED_KERNEL, **p), ref)


def test_prepare_image_default_kernel_and_same_size_skip():
    out = prepare_image(SAMPLE, **NANODET_PREPROCESSING)
    bgr = read_image(SAMPLE)
    warped = warp_resize(bgr, (320, 320), warp_kernel="fixed_point")
    ref = _nanodet_normalize(warped, *_stats(NANODET_PREPROCESSING))
    assert np.array_equal(out, ref[None])
    # input already at input_size: no resize at all
    same = prepare_image(bgr, **dict(NANODET_PREPROCESSING, input_size=[480, 360]))
    assert np.array_equal(same, _nanodet_normalize(bgr, *_stats(NANODET_PREPROCESSING))[None])


def _stats(p):
    return p["mean"], p["std"]


def test_presets():
    assert NANODET_PREPROCESSING == {
        "mean": [103.53, 116.28, 123.675],
        "std": [57.375, 57.12, 58.395],
        "channel_order": "BGR",
        "input_size": [320, 320],
        "resize": "warp_perspective",
    }
    assert IMAGENET_PREPROCESSING["channel_order"] == "RGB"
    assert IMAGENET_PREPROCESSING["input_size"] == [224, 224]
    assert IMAGENET_PREPROCESSING["resize"] == "warp_perspective"
    assert np.allclose(IMAGENET_PREPROCESSING["mean"], [123.675, 116.28, 103.53])
    assert np.allclose(IMAGENET_PREPROCESSING["std"], [58.395, 57.12, 57.375])
    # NanoDet's BGR statistics are the ImageNet RGB ones reversed
    assert np.allclose(NANODET_PREPROCESSING["mean"], IMAGENET_PREPROCESSING["mean"][::-1])
    assert np.allclose(NANODET_PREPROCESSING["std"], IMAGENET_PREPROCESSING["std"][::-1])


# --------------------------------------------------------------------------------------------
# read_image
# --------------------------------------------------------------------------------------------


def test_read_image_bgr_rgb_and_cv2_imread():
    bgr = read_image(SAMPLE)
    rgb = read_image(str(SAMPLE), channel_order="RGB")
    assert bgr.dtype == np.uint8 and bgr.shape == (360, 480, 3) and bgr.flags.c_contiguous
    assert rgb.flags.c_contiguous
    assert np.array_equal(bgr, cv2.imread(str(SAMPLE)))
    assert np.array_equal(rgb, bgr[:, :, ::-1])
    assert np.array_equal(rgb, np.asarray(Image.open(SAMPLE).convert("RGB")))


def test_read_image_modes_match_cv2_imread(tmp_path):
    rng = np.random.default_rng(9)
    px = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    files = {
        "gray.png": Image.fromarray(px[:, :, 0].copy()),
        "bilevel.png": Image.fromarray(px[:, :, 0] > 127),
        "rgba.png": Image.fromarray(px, "RGBA"),
        "la.png": Image.fromarray(px[:, :, :2].copy(), "LA"),
        "palette.png": Image.fromarray(px[:, :, :3].copy()).convert(
            "P", palette=Image.Palette.ADAPTIVE, colors=8
        ),
        "bmp.bmp": Image.fromarray(px[:, :, :3].copy()),
    }
    for name, im in files.items():
        path = tmp_path / name
        im.save(path)
        got = read_image(path)
        assert np.array_equal(got, cv2.imread(str(path))), name
    # 16-bit: OpenCV keeps the high byte
    g16 = rng.integers(0, 65536, (5, 4), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    c16 = rng.integers(0, 65536, (5, 4, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), c16)
    for name in ("g16.png", "c16.png"):
        assert np.array_equal(read_image(tmp_path / name), cv2.imread(str(tmp_path / name))), name


def test_read_image_applies_exif_orientation_like_cv2(tmp_path):
    im = Image.fromarray(_random_image(4, 6, seed=1))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.png"
    im.save(path, exif=exif.tobytes())
    got = read_image(path)
    assert got.shape == (6, 4, 3)
    assert np.array_equal(got, cv2.imread(str(path)))


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match=r"nope\.png.*does not exist"):
        read_image(missing)
    with pytest.raises(ImageError, match=r"nope\.png.*does not exist"):
        prepare_image(missing, **NANODET_PREPROCESSING)


def test_not_an_image(tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not a PNG\n")
    with pytest.raises(ImageError, match=r"notes\.png.*not an image"):
        read_image(bogus)
    with pytest.raises(ImageError, match=r"notes\.png.*not an image"):
        prepare_image(str(bogus), **NANODET_PREPROCESSING)


def test_directory_and_truncated_file(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)
    data = SAMPLE.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png"):
        read_image(cut)


@pytest.mark.parametrize(
    "bad,pattern",
    [
        (np.zeros((8, 8, 3), np.float32), r"dtype uint8, found dtype float32"),
        (np.zeros((8, 8, 3), np.uint16), r"dtype uint8, found dtype uint16"),
        (np.zeros((8, 8), np.uint8), r"ndim 2 .*\(8, 8\)"),
        (np.zeros((1, 8, 8, 3), np.uint8), r"ndim 4"),
        (np.zeros((8, 8, 4), np.uint8), r"found 4 channels"),
        (np.zeros((8, 8, 1), np.uint8), r"found 1 channels"),
        (np.zeros((0, 8, 3), np.uint8), r"zero-size.*\(0, 8, 3\)"),
        (np.zeros((8, 0, 3), np.uint8), r"zero-size.*\(8, 0, 3\)"),
        ([[1, 2, 3]], r"got object of type list"),
        (42, r"got object of type int"),
    ],
    ids=["float32", "uint16", "ndim2", "ndim4", "4ch", "1ch", "zero-h", "zero-w", "list", "int"],
)
def test_bad_arrays_raise_image_error(bad, pattern):
    with pytest.raises(ImageError, match=pattern):
        prepare_image(bad, **NANODET_PREPROCESSING)
    if isinstance(bad, np.ndarray):
        with pytest.raises(ImageError, match=pattern):
            warp_resize(bad, (4, 4))
        with pytest.raises(ImageError, match=pattern):
            normalize(bad, NANODET_PREPROCESSING["mean"], NANODET_PREPROCESSING["std"])


@pytest.mark.parametrize(
    "override,pattern",
    [
        ({"channel_order": "BRG"}, "channel_order"),
        ({"input_size": [0, 320]}, "input_size"),
        ({"input_size": [320.0, 320]}, "input_size"),
        ({"input_size": [320]}, "input_size"),
        ({"mean": [1.0, 2.0]}, "mean"),
        ({"std": [1.0, 0.0, 1.0]}, "std"),
        ({"resize": "bilinear"}, "resize"),
        ({"warp_kernel": "cv6"}, "warp_kernel"),
    ],
)
def test_bad_parameters_raise_refghost_error(override, pattern):
    img = _random_image(4, 4, seed=0)
    with pytest.raises(RefghostError, match=pattern) as info:
        prepare_image(img, **dict(NANODET_PREPROCESSING, **override))
    assert not isinstance(info.value, ImageError)


def test_bad_warp_arguments():
    img = _random_image(4, 4, seed=0)
    with pytest.raises(RefghostError, match="size"):
        warp_resize(img, (0, 4))
    with pytest.raises(RefghostError, match="warp_kernel"):
        warp_resize(img, (4, 4), warp_kernel="nearest")
    with pytest.raises(RefghostError, match="channel_order"):
        read_image(SAMPLE, channel_order="YUV")


# --------------------------------------------------------------------------------------------
# sample image and its generator
# --------------------------------------------------------------------------------------------


def test_sample_image_is_reproducible(tmp_path):
    assert SAMPLE.stat().st_size < 300_000
    with Image.open(SAMPLE) as im:
        assert im.mode == "RGB" and im.size == (480, 360)
        committed = np.asarray(im)
    tool = _load_tool("make_sample_image")
    pixels = tool.make_sample_image()
    assert np.array_equal(pixels, committed), "sample.png differs from tools/make_sample_image.py output"
    # Two runs of the writer give byte-identical files.
    a = tool.write_sample_image(tmp_path / "a.png")
    b = tool.write_sample_image(tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()
