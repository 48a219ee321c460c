"""Image preprocessing: turn an image into the network input the way NanoDet's val pipeline does.

NanoDet's PyTorch inference pipeline (``demo/demo.py`` -> ``Pipeline(cfg.data.val.pipeline,
keep_ratio=False)``) does, for an input size ``(w, h)``:

1. ``cv2.imread(path)``: BGR uint8 (H, W, 3), EXIF orientation applied.
2. ``cv2.warpPerspective(img, M, dsize=(w, h))`` with ``M = diag(w/W, h/H, 1)`` and default
   flags (INTER_LINEAR, BORDER_CONSTANT with value 0). This is *not* ``cv2.resize``:
   destination pixel ``x`` samples the source at ``x*W/w`` (no half-pixel centring), and pixels
   whose 2x2 bilinear neighbourhood leaves the image are mixed with the black border.
3. ``_normalize``: ``(img.astype(float32)/255 - float32(mean)/255) / (float32(std)/255)``, with
   mean/std in BGR order, then HWC -> CHW, then a batch axis.

This module reproduces those steps with NumPy and Pillow only (refghost never imports OpenCV).

NanoDet's keep_ratio path (legacy v0.x and custom-dataset configs, ``keep_ratio: True``) is
:func:`prepare_image_and_matrix` with ``keep_ratio=True``: ``ShapeTransform`` resizes to
:func:`minimum_dst_shape` (the aspect-preserving size, truncated) with the matrix of
:func:`resize_matrix` (scale ``r`` plus a translation that is a sub-pixel offset, rounding noise
of a few 1e-14, or 0), :func:`warp_image` warps with it, and ``stack_batch_img`` zero-pads the
normalised tensor at the bottom and right to multiples of 32 (:func:`pad_to_multiple`). The
matrix maps original pixels to network-input pixels; its inverse brings detections back
(:func:`refghost.detector.decode.warp_boxes`).

Bit-exactness of :func:`warp_resize`
------------------------------------
``cv2.warpPerspective`` for 8-bit 1/3/4-channel images with INTER_LINEAR changed twice: OpenCV
5.0 replaced 4.x's fixed-point kernel by a float32 one, and OpenCV 5.1 hands the call to Intel IPP
on the builds that have it (the x86-64 pip wheels): ``hal/ipp/include/ipp_hal_imgproc.hpp``
enables ``cv_hal_warpPerspective = ipp_hal_warpPerspective`` (in 5.0 it was commented out, "Does
not pass tests in 5.x branch"), and ``ipp_hal_warpPerspective`` (``hal/ipp/src/warp_ipp.cpp``)
calls ``ipp::iwiWarpPerspective`` for 8U INTER_LINEAR unless the source is 1 pixel wide or high
or the border is BORDER_TRANSPARENT. :func:`warp_resize` implements the four variants, and
:func:`kernel_for_opencv` names the one for an OpenCV version. Measured against the pip wheels of
opencv-python-headless on x86-64 (AMD EPYC, AVX-512) by ``python tools/opencv_kernels.py table
DIR ...``; "exact" is max abs difference 0 on the three images of the cells and on 27 more cases
(1-pixel images, odd and non-integer ratios, 1/64 ties such as 7 -> 320, wide tiles)::

    OpenCV                        bit-exact kernel   the others: max diff / fraction of values that differ
                                                     on sample.png 320x320; sample.png 416x416;
                                                     random 640x480 -> 320x320
    4.10, 4.11, 4.12, 4.13, 4.14  fixed_point        float32_fma, float32, ipp_float32_fma:
                                                     1 / 7.8 %; 4 / 2.36 %; 1 / 12.5 %
    5.0; 5.0 and 5.1 with         float32_fma        fixed_point: 1 / 7.8 %; 4 / 2.36 %; 1 / 12.5 %
      cv2.ipp.setUseIPP(False)                       float32: 0; 0; 0 (differs on other cases)
                                                     ipp_float32_fma: 0; 1 / 0.041 %; 0
    5.0 and 5.1 with              float32            fixed_point: 1 / 7.8 %; 4 / 2.36 %; 1 / 12.5 %
      cv2.setUseOptimized(False)                     float32_fma: 0; 0; 0 (differs on other cases)
                                                     ipp_float32_fma: 0; 1 / 0.041 %; 0
    5.1                           ipp_float32_fma    fixed_point: 1 / 7.8 %; 4 / 2.36 %; 1 / 12.5 %
                                                     float32_fma, float32: 0; 1 / 0.041 %; 0

``"fixed_point"`` (the default)
    OpenCV 4.x, the one NanoDet was developed and trained with.
    The inverse matrix is computed in double (``cv::invert``'s 3x3 formula, so ``M^-1[2, 2]`` is
    not always exactly 1), the source coordinate is quantised to 1/32 pixel
    (``X = rint((M^-1[0,0]*x_block + M^-1[0,0]*x_in_block) * (32 / M^-1[2,2]))`` in double,
    where ``x_block`` is the first column of OpenCV's destination tile, ``min(1024 // min(16, h),
    w)`` columns wide; the split sum changes the rounding of exact 1/64 ties), and the remap uses 15-bit
    fixed-point bilinear weights. For a diagonal ``M`` every weight of OpenCV's table is
    ``32*(32-fy or fy)*(32-fx or fx)``, except fraction (0, 0) whose table entry is
    (32767, 0, 0, 1) and still returns the top-left pixel exactly, so the result is
    ``(sum_of(wy*wx*pixel) + 512) >> 10`` with integer weights ``wx, wy`` in 0..32.
    Untested: ARM builds of OpenCV 4.x may compute that sum with a fused multiply-add, which
    could move a coordinate lying exactly on a 1/64 tie by 1/32 pixel; that is not reproduced.
``"float32_fma"``
    OpenCV 5.0, and 5.x without IPP (``cv2.ipp.setUseIPP(False)``, builds without IPP such as
    the AArch64 wheels: expected, untested), on CPUs where its SIMD dispatch uses FMA (x86-64
    with AVX2/FMA3, AArch64). Coordinates are float32 (``fl(x*m0)/m8`` with the inverse matrix
    rounded to float32), the fraction is ``sx - floor(sx)``, and the interpolation is
    ``v0 = fma(fx, p01-p00, p00)``, ``v1 = fma(fx, p11-p10, p10)``, ``v = fma(fy, v1-v0, v0)`` in
    float32, rounded half-to-even. NumPy has no FMA, so the fused operations are emulated exactly
    (double product, TwoSum, and a correction of double rounding at float32 ties).
``"float32"``
    OpenCV 5.x without FMA (``cv2.setUseOptimized(False)``, which also switches IPP off, or a CPU
    without AVX2): the same as ``"float32_fma"`` with separately rounded multiply and add.
``"ipp_float32_fma"``
    OpenCV 5.1 with IPP (the x86-64 wheels' default). IPP is closed source; this is its
    arithmetic as measured on real outputs (pairs of pixel values over all 65536 combinations,
    tie-heavy ratios). The coordinate ``s = x*m0/m8`` is computed in double from OpenCV's
    inverse matrix and rounded to float32, ``i = floor(fl32(s))``. Inside the image (the 2x2
    neighbourhood in the source; a coordinate exactly on the last row/column counts as inside)
    the fraction is ``fl32(s) - i`` in float32; in the border band it is ``fl32(s - i)`` from the
    double coordinate. The interpolation is vertical first: ``v0 = fma(fy, p10-p00, p00)``,
    ``v1 = fma(fy, p11-p01, p01)``, ``v = fma(fx, v1-v0, v0)``, rounded half-to-even. Sources 1
    pixel wide or high go to OpenCV's own kernel (``"float32_fma"``), as OpenCV 5.1 does.
    Not reproduced: on upscales where a source coordinate is a whole number along one axis at
    or past the last source row or column (``tools/opencv_kernels.py whole_coordinate_pixels``;
    possible only when the upscale ratio makes such coordinates whole, e.g. a destination size
    that is a multiple of the source size), IPP chooses between its inner and border code by a
    rule not found; there a few values differ by 1 (``python tools/opencv_kernels.py edges DIR``:
    84 of 675 such random images, 146 values in all, max difference 1, none elsewhere).
    Downscales (both destination sides smaller than the source's) never meet it; a side equal to
    the source's can (its last row/column lands on the last source pixel), though none of 25
    random images of 480x320, 640x320, 333x320, 320x480 -> 320x320, 500x416 -> 416x416 differed.
    Untested: other CPUs (IPP picks its code by CPU; measured on AVX-512).

Translated matrices (keep_ratio, :func:`warp_image`): ``"ipp_float32_fma"``, ``"float32_fma"``
and ``"float32"`` are bit-exact against OpenCV 5.1 (x86-64 wheel; IPP on, IPP off, optimisations
off) on 600 random keep_ratio resizes except the upscale family above (whole source coordinates
on the last row/column); see :func:`_float32_translated_coords` and
:func:`_ipp_translated_coords` for what a translation changes. ``"fixed_point"`` raises for a
translated matrix: OpenCV 4.x's arithmetic for it was not checked against a real OpenCV 4.x.

OpenCV 5's ``ALGO_HINT_APPROX`` kernels (not the pip wheels' default, which is
``ALGO_HINT_ACCURATE``) are not reproduced. Pick the kernel that matches the OpenCV you compare
against: ``kernel_for_opencv(cv2.__version__, fma=..., ipp=cv2.ipp.useIPP())``.

Reading images
--------------
:func:`read_image` uses Pillow and mirrors ``cv2.imread(path, IMREAD_COLOR)``: EXIF
orientation is applied, grayscale/palette/1-bit images are expanded to 3 channels, an alpha
channel is dropped (not composited), and 16-bit images keep their high byte (``v >> 8``, which is
what ``cv2.imread`` gives for 16-bit PNGs). PNG, BMP and other lossless formats give identical
pixels to OpenCV; JPEG decoders (Pillow's libjpeg vs OpenCV's) can differ in rare pixels, and
CMYK JPEGs are converted with Pillow's simple CMYK -> RGB formula.
"""

from __future__ import annotations

import numbers
import os
import re
import warnings
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from refghost.errors import ImageError, RefghostError

__all__ = [
    "DEFAULT_WARP_KERNEL",
    "IMAGENET_PREPROCESSING",
    "NANODET_PREPROCESSING",
    "PAD_DIVISOR",
    "WARP_KERNELS",
    "kernel_for_opencv",
    "minimum_dst_shape",
    "normalize",
    "pad_to_multiple",
    "prepare_image",
    "prepare_image_and_matrix",
    "read_image",
    "resize_matrix",
    "warp_image",
    "warp_resize",
]

#: NanoDet-Plus val pipeline (COCO configs): BGR, keep_ratio False, warpPerspective resize.
#: mean/std are the ImageNet RGB statistics in BGR order, in 0..255 units.
NANODET_PREPROCESSING: dict[str, Any] = {
    "mean": [103.53, 116.28, 123.675],
    "std": [57.375, 57.12, 58.395],
    "channel_order": "BGR",
    "input_size": [320, 320],
    "resize": "warp_perspective",
}

#: ImageNet classification preprocessing for the Huawei/timm GhostNet weights: RGB, mean/std of
#: 0.485/0.456/0.406 and 0.229/0.224/0.225 scaled to 0..255.
#: Huawei's evaluation resizes the short side to 256 and then centre-crops 224x224; refghost
#: deliberately uses the single warpPerspective resize to 224x224 instead, so that both weight
#: sets go through the same, exactly reproducible, resize.
IMAGENET_PREPROCESSING: dict[str, Any] = {
    "mean": [0.485 * 255, 0.456 * 255, 0.406 * 255],
    "std": [0.229 * 255, 0.224 * 255, 0.225 * 255],
    "channel_order": "RGB",
    "input_size": [224, 224],
    "resize": "warp_perspective",
}

#: Interpolation kernels of :func:`warp_resize` (which OpenCV each reproduces: the module
#: docstring and :func:`kernel_for_opencv`).
WARP_KERNELS = ("fixed_point", "float32_fma", "float32", "ipp_float32_fma")
#: OpenCV 4.x behaviour, the one NanoDet was developed and trained with.
DEFAULT_WARP_KERNEL = "fixed_point"

#: Largest image :func:`read_image` decodes, in pixels (width x height, from the header before
#: decoding): 2^26 = 67 M pixels, 8192 x 8192; decoding one takes about 1 GB at peak. Larger
#: files (a 13000 x 13000 PNG can be 500 KB) are refused before any pixel is decoded.
MAX_IMAGE_PIXELS = 1 << 26

_CHANNEL_ORDERS = ("BGR", "RGB")
_RESIZE_METHODS = ("warp_perspective",)
# OpenCV's remap stores integer source coordinates as int16; keep every side within that range.
_MAX_SIDE = 32767
_INTER_BITS = 5
_INTER_TAB_SIZE = 1 << _INTER_BITS  # 32 sub-pixel positions per pixel
_BLOCK_SZ = 32  # OpenCV's WarpPerspectiveInvoker tile: bh0 = min(16, H), bw0 = min(1024 // bh0, W)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# OpenCV 5's warp kernel handles 2 x 8 float32 lanes per SIMD step (AVX2 dispatch, x86-64 wheels).
_FLOAT32_SIMD_COLUMNS = 16
# IPP counts a source column this many destination pixels before 0 as inside (measured; rows: 0).
_IPP_EDGE_TOLERANCE_X = 1e-13
_IPP_EDGE_TOLERANCE_Y = 0.0

#: NanoDet's ``stack_batch_img(divisible=32)`` (``demo/demo.py``): the batch is zero-padded at the
#: bottom and right to multiples of this.
PAD_DIVISOR = 32


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _describe(obj: Any) -> str:
    if isinstance(obj, np.ndarray):
        return f"numpy array with shape {obj.shape} and dtype {obj.dtype}"
    return f"object of type {type(obj).__name__}"


def _check_image(img: Any, what: str = "image") -> np.ndarray:
    """Return ``img`` if it is a uint8 (H, W, 3) array with H, W >= 1, else raise ImageError."""
    if not isinstance(img, np.ndarray):
        raise ImageError(f"{what}: expected a uint8 numpy array of shape (H, W, 3), got {_describe(img)}")
    if img.dtype != np.uint8:
        raise ImageError(
            f"{what}: expected dtype uint8, found dtype {img.dtype} (shape {img.shape}); "
            "convert 8-bit pixel data with .astype(np.uint8) only if it is already in 0..255"
        )
    if img.ndim != 3:
        raise ImageError(
            f"{what}: expected 3 dimensions (H, W, 3), found ndim {img.ndim} with shape {img.shape}"
        )
    if img.shape[2] != 3:
        raise ImageError(
            f"{what}: expected 3 channels in the last axis (H, W, 3), found {img.shape[2]} channels "
            f"(shape {img.shape})"
        )
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ImageError(f"{what}: expected H >= 1 and W >= 1, found zero-size image with shape {img.shape}")
    if img.shape[0] > _MAX_SIDE or img.shape[1] > _MAX_SIDE:
        raise ImageError(f"{what}: sides must be at most {_MAX_SIDE} pixels, found shape {img.shape}")
    return img


def _check_channel_order(channel_order: Any) -> str:
    if not isinstance(channel_order, str) or channel_order.upper() not in _CHANNEL_ORDERS:
        raise RefghostError(f"channel_order must be 'BGR' or 'RGB', got {channel_order!r}")
    return channel_order.upper()


def _check_size(size: Any, name: str) -> tuple[int, int]:
    """Validate a (w, h) pair of positive ints (numpy ints allowed, bools and floats not)."""
    try:
        items = list(size)
    except TypeError:
        items = None
    if (
        items is None
        or len(items) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items)
        or not all(1 <= int(v) <= _MAX_SIDE for v in items)
    ):
        raise RefghostError(f"{name} must be two integers (w, h) in 1..{_MAX_SIDE}, got {size!r}")
    return int(items[0]), int(items[1])


def _check_stats(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise RefghostError(f"{name} must be 3 numbers (one per channel), got {values!r}") from None
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise RefghostError(f"{name} must be 3 finite numbers (one per channel), got {values!r}")
    if name == "std" and np.any(arr == 0):
        raise RefghostError(f"std must be non-zero for every channel, got {values!r}")
    return arr


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _pil_to_rgb(im: Image.Image, path: str) -> np.ndarray:
    """Pillow image -> uint8 (H, W, 3) RGB, following cv2.imread(IMREAD_COLOR) conventions."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(im)
        if gray.size and (gray.min() < 0 or gray.max() > 65535):
            raise ImageError(
                f"cannot read image {path!r}: {mode!r} pixels outside the 16-bit range "
                f"(found {gray.min()}..{gray.max()})"
            )
        gray8 = (gray.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray8[:, :, None], 3, axis=2)
    if mode == "F":
        raise ImageError(
            f"cannot read image {path!r}: floating-point images (Pillow mode 'F') are not supported"
        )
    if mode != "RGB":
        im = im.convert("RGB")  # L, 1, P (palette), LA, PA, RGBA (alpha dropped), CMYK, YCbCr, ...
    return np.array(im, dtype=np.uint8)


def read_image(path: str | os.PathLike, channel_order: str = "BGR") -> np.ndarray:
    """Read an image file into a uint8 (H, W, 3) array, like ``cv2.imread(path)``.

    Parameters
    ----------
    path : str or os.PathLike
        Image file (any format Pillow reads: PNG, JPEG, BMP, TIFF, WebP, ...).
    channel_order : {"BGR", "RGB"}
        "BGR" gives the channel order of ``cv2.imread``; "RGB" the natural order.

    Returns
    -------
    img : (H, W, 3) uint8, C-contiguous
        EXIF orientation is applied (as ``cv2.imread`` does). Grayscale, 1-bit and palette
        images are expanded to 3 channels; an alpha channel is **dropped**, not composited over
        a background (also as ``cv2.imread(IMREAD_COLOR)`` does); 16-bit images keep the high
        byte of each sample. Multi-frame files give their first frame.

    Raises
    ------
    ImageError
        The file is missing, is a directory, cannot be opened, is not an image Pillow
        recognises, is truncated/corrupt, or has an unsupported pixel mode. The message names
        the path and the reason.
    """
    order = _check_channel_order(channel_order)
    try:
        p = os.fspath(path)
    except TypeError:
        raise ImageError(f"image path must be a str or os.PathLike, got {_describe(path)}") from None
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not os.path.exists(p):
        raise ImageError(f"cannot read image {p!r}: file does not exist")
    if os.path.isdir(p):
        raise ImageError(f"cannot read image {p!r}: it is a directory, not a file")
    try:
        with Image.open(p) as im:
            w, h = im.size  # known from the header; nothing is decoded yet
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError(f"cannot read image {p!r}: {w}x{h} is {w * h} pixels, more than the "
                                 f"{MAX_IMAGE_PIXELS} refghost decodes")
            im = ImageOps.exif_transpose(im)
            rgb = _pil_to_rgb(im, p)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            f"cannot read image {p!r}: not an image file (Pillow cannot identify its format)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"cannot read image {p!r}: refused as a possible decompression bomb ({exc})"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"cannot read image {p!r}: {type(exc).__name__}: {exc}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageError(f"cannot read image {p!r}: decoded to an unusable shape {rgb.shape}")
    if order == "BGR":
        return np.ascontiguousarray(rgb[:, :, ::-1])
    return np.ascontiguousarray(rgb)


# --------------------------------------------------------------------------------------------
# Resize (cv2.warpPerspective with a diagonal matrix)
# --------------------------------------------------------------------------------------------


def _inverse_diagonal(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[float, float, float]:
    """Entries (0,0), (1,1), (2,2) of inv(diag(dst_w/src_w, dst_h/src_h, 1)), as cv::invert computes them.

    cv::invert (DECOMP_LU) on a 3x3 double matrix uses the adjugate divided by the determinant:
    ``d = 1/det``, ``inv[0,0] = (a11*a22 - a12*a21)*d`` and so on. For a diagonal matrix
    ``diag(a, b, 1)`` that is ``b*d``, ``a*d`` and ``(a*b)*d`` with ``d = 1/(a*b)``, which in
    floating point is not always ``1/a``, ``1/b`` and ``1``. The off-diagonal entries are zero.
    """
    a = dst_w / src_w
    b = dst_h / src_h
    d = 1.0 / (a * b)
    return b * d, a * d, (a * b) * d


class _Inverse(NamedTuple):
    """The entries of ``cv::invert(M)`` a scale + translation warp uses: ``x_src = (m0*x + m2)/m8``,
    ``y_src = (m4*y + m5)/m8`` (the other entries are zero)."""

    m0: float
    m2: float
    m4: float
    m5: float
    m8: float


def _inverse_scale_translate(matrix: np.ndarray) -> _Inverse:
    """cv::invert's 3x3 adjugate formula for ``M = [[a, 0, tx], [0, b, ty], [0, 0, 1]]``, in double.

    ``det = a*b`` (the other terms of the cofactor expansion are exact zeros), ``d = 1/det``,
    ``inv[0,0] = b*d``, ``inv[0,2] = (0*ty - tx*b)*d``, ``inv[1,1] = a*d``,
    ``inv[1,2] = (tx*0 - a*ty)*d``, ``inv[2,2] = (a*b)*d``; for ``tx = ty = 0`` these are the
    entries of :func:`_inverse_diagonal`.
    """
    a, tx, b, ty = float(matrix[0, 0]), float(matrix[0, 2]), float(matrix[1, 1]), float(matrix[1, 2])
    d = 1.0 / (a * b)
    return _Inverse(b * d, (0.0 * ty - tx * b) * d, a * d, (tx * 0.0 - a * ty) * d, (a * b) * d)


def _float32_translated_coords(
    inverse: _Inverse, dst_w: int, dst_h: int, fused: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates (float32) of OpenCV 5's own warpPerspective kernel for a translated matrix.

    OpenCV 5 (``imgproc/src/warp_kernels.simd.hpp``) rounds the inverse matrix to float32. Per
    row it forms ``M_y = y*m4 + m5`` in float32 (separate multiply and add), and along the row
    ``x_src = fma(m0, x, m2)``, both divided by ``m8``. The fused ``fma`` happens in its SIMD body,
    which covers ``floor(dst_w / 16) * 16`` columns (two AVX2 vectors of 8 floats per step, the
    x86-64 wheels' dispatch); the remaining columns go through its scalar code
    ``x*m0 + y*m1 + m2`` with separate roundings, as does everything without FMA
    (``fused=False``). Measured against OpenCV 5.1 with IPP off (FMA) and with optimisations off.
    """
    m0, m2, m4, m5, m8 = (np.float32(v) for v in inverse)
    x = np.arange(dst_w, dtype=np.float32)
    sx = x * m0 + m2
    if fused:
        body = dst_w // _FLOAT32_SIMD_COLUMNS * _FLOAT32_SIMD_COLUMNS
        sx[:body] = _fma32(x[:body], np.full(body, m0), np.full(body, m2))
    sy = np.arange(dst_h, dtype=np.float32) * m4 + m5
    return sx / m8, sy / m8


def _ipp_translated_coords(n_dst: int, n_src: int, m: float, t: float, m8: float, edge_tolerance: float):
    """:func:`_ipp_coords` for a translated matrix: ``s = (i*m + t)/m8`` in double.

    Measured difference from the untranslated case: a source *column* a hair left of 0
    (NanoDet's keep_ratio matrices give offsets of a few 1e-14 from rounding) still counts as
    inside the image when it lies less than ``edge_tolerance = 1e-13`` destination pixels before
    source column 0 (:data:`_IPP_EDGE_TOLERANCE_X`; the threshold measured on three images lies
    within 2.5e-4 of 1e-13); its fraction then rounds to 1 and the first column is read. Rows
    have no such tolerance (:data:`_IPP_EDGE_TOLERANCE_Y` = 0): measured on 400 random up- and
    downscales with offsets of 1e-16 .. 6e-14 on one axis.
    """
    s64 = (np.arange(n_dst, dtype=np.float64) * m + t) / m8
    s32 = s64.astype(np.float32)
    index = np.floor(s32).astype(np.int64)
    frac_inner = s32 - index.astype(np.float32)
    frac_border = (s64 - index).astype(np.float32)
    starts_inside = (index >= 0) | (s64 >= -edge_tolerance * m / m8)
    inside = starts_inside & ((index + 1 < n_src) | ((index == n_src - 1) & (frac_inner == 0)))
    return index, frac_inner, frac_border, inside


def _border_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map source indices to rows/cols of a 1-pixel zero-padded array; out-of-range -> 0 (zero)."""
    return np.where((idx >= 0) & (idx < n), idx + 1, 0)


def _neighbours(img: np.ndarray, ix: np.ndarray, iy: np.ndarray):
    """The four float32 source pixels ``(p00, p01, p10, p11)`` of every destination pixel, each
    (dst_h, dst_w, 3), for integer source coordinates ``ix`` (dst_w,) and ``iy`` (dst_h,), with the
    constant-0 border outside the image."""
    src_h, src_w = img.shape[:2]
    pad = np.zeros((src_h + 2, src_w + 2, 3), dtype=np.float32)
    pad[1:-1, 1:-1] = img
    cx0, cx1 = _border_index(ix, src_w), _border_index(ix + 1, src_w)
    rows0 = pad[_border_index(iy, src_h)]
    rows1 = pad[_border_index(iy + 1, src_h)]
    return rows0[:, cx0], rows0[:, cx1], rows1[:, cx0], rows1[:, cx1]


def _fixed_point_coords(n_dst: int, m: float, w: float, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer source position and 1/32 fraction for destination indices 0..n_dst-1 (OpenCV 4.x).

    OpenCV processes the destination in tiles; within a tile starting at column ``xb`` it computes
    ``X0 = m*xb`` once and then ``(X0 + m*x1) * (32/w)`` in double for ``x1 = 0..bw-1`` and
    rounds half-to-even. ``block`` is the tile width (use ``n_dst`` for rows, which are not tiled
    this way).
    """
    x = np.arange(n_dst, dtype=np.int64)
    xb = (x // block) * block
    x1 = x - xb
    scale = float(_INTER_TAB_SIZE) / w
    f = (m * xb.astype(np.float64) + m * x1.astype(np.float64)) * scale
    q = np.rint(np.clip(f, -(2.0**31), 2.0**31 - 1)).astype(np.int64)
    return q >> _INTER_BITS, q & (_INTER_TAB_SIZE - 1)


def _warp_fixed_point(img: np.ndarray, dst_w: int, dst_h: int, inverse: _Inverse | None = None) -> np.ndarray:
    src_h, src_w = img.shape[:2]
    if inverse is None:
        m0, m4, m8 = _inverse_diagonal(src_w, src_h, dst_w, dst_h)
    else:
        if inverse.m2 != 0 or inverse.m5 != 0:
            raise RefghostError(
                "warp_kernel 'fixed_point' (OpenCV 4.x) is reproduced for scale-only matrices; this "
                f"keep_ratio matrix also translates (inverse offsets {inverse.m2!r}, {inverse.m5!r}), and "
                "OpenCV 4.x's arithmetic for a translation was not checked against a real OpenCV 4.x; "
                "use an OpenCV 5 kernel (float32_fma, float32, ipp_float32_fma) or keep_ratio=False"
            )
        m0, m4, m8 = inverse.m0, inverse.m4, inverse.m8
    bh0 = min(_BLOCK_SZ // 2, dst_h)
    bw0 = min(_BLOCK_SZ * _BLOCK_SZ // bh0, dst_w)
    ix, fx = _fixed_point_coords(dst_w, m0, m8, bw0)
    iy, fy = _fixed_point_coords(dst_h, m4, m8, dst_h)

    pad = np.zeros((src_h + 2, src_w + 2, 3), dtype=np.int32)
    pad[1:-1, 1:-1] = img
    cx0, cx1 = _border_index(ix, src_w), _border_index(ix + 1, src_w)
    ry0, ry1 = _border_index(iy, src_h), _border_index(iy + 1, src_h)
    wx1 = fx.astype(np.int32)[None, :, None]
    wx0 = _INTER_TAB_SIZE - wx1
    wy1 = fy.astype(np.int32)[:, None, None]
    wy0 = _INTER_TAB_SIZE - wy1

    # The 2-D weights are products of 1-D weights, so the exact integer sum is separable.
    rows0 = pad[ry0]
    rows1 = pad[ry1]
    h0 = rows0[:, cx0] * wx0 + rows0[:, cx1] * wx1
    h1 = rows1[:, cx0] * wx0 + rows1[:, cx1] * wx1
    acc = h0 * wy0 + h1 * wy1  # <= 1024 * 255
    return ((acc + 512) >> 10).astype(np.uint8)


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 ``a*b + c`` (one rounding), for float32 inputs.

    The product of two float32 values is exact in float64. The float64 sum may be inexact; its
    error is recovered with TwoSum, and the only case where rounding the float64 sum to float32
    differs from rounding the exact sum (the float64 sum lying exactly on a float32 tie) is fixed
    by pushing the result towards the side of the error.
    """
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bv = s - p
    err = (p - (s - bv)) + (c64 - bv)
    r = s.astype(np.float32)
    if not np.any(err):
        return r
    r64 = r.astype(np.float64)
    toward = np.nextafter(r, np.where(s > r64, np.float32(np.inf), np.float32(-np.inf)))
    t64 = toward.astype(np.float64)
    tie = (s == (r64 + t64) * 0.5) & (err != 0)
    go = tie & ((err > 0) == (t64 > r64))
    return np.where(go, toward, r)


def _warp_float32(
    img: np.ndarray, dst_w: int, dst_h: int, fused: bool, inverse: _Inverse | None = None
) -> np.ndarray:
    src_h, src_w = img.shape[:2]
    if inverse is None or (inverse.m2 == 0 and inverse.m5 == 0):
        if inverse is None:
            m0, m4, m8 = (np.float32(v) for v in _inverse_diagonal(src_w, src_h, dst_w, dst_h))
        else:
            m0, m4, m8 = np.float32(inverse.m0), np.float32(inverse.m4), np.float32(inverse.m8)
        sx = (np.arange(dst_w, dtype=np.float32) * m0) / m8
        sy = (np.arange(dst_h, dtype=np.float32) * m4) / m8
    else:
        sx, sy = _float32_translated_coords(inverse, dst_w, dst_h, fused)
    ix = np.floor(sx).astype(np.int64)
    iy = np.floor(sy).astype(np.int64)
    fx = (sx - ix.astype(np.float32))[None, :, None]
    fy = (sy - iy.astype(np.float32))[:, None, None]

    p00, p01, p10, p11 = _neighbours(img, ix, iy)
    fx = np.broadcast_to(fx, p00.shape)
    fy = np.broadcast_to(fy, p00.shape)
    if fused:
        v0 = _fma32(fx, p01 - p00, p00)
        v1 = _fma32(fx, p11 - p10, p10)
        v = _fma32(fy, v1 - v0, v0)
    else:
        v0 = p00 + fx * (p01 - p00)
        v1 = p10 + fx * (p11 - p10)
        v = v0 + fy * (v1 - v0)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def _ipp_coords(n_dst: int, n_src: int, m: float, m8: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source position of destination indices 0..n_dst-1 as IPP's warpPerspective computes it.

    The coordinate ``s = i*m/m8`` is computed in double and rounded to float32; its integer part
    is ``floor`` of that float32 value. Returns ``(index, frac_inner, frac_border, inside)``:
    ``frac_inner = fl32(s) - index`` in float32 (IPP's inner-region code), ``frac_border =
    fl32(s_double - index)`` (its border code, which keeps the double fraction), and ``inside``
    whether the 2-tap neighbourhood lies in the source (a coordinate exactly on the last
    pixel, fraction 0, counts as inside).
    """
    s64 = np.arange(n_dst, dtype=np.float64) * m / m8
    s32 = s64.astype(np.float32)
    index = np.floor(s32).astype(np.int64)
    frac_inner = s32 - index.astype(np.float32)
    frac_border = (s64 - index).astype(np.float32)
    inside = (index >= 0) & ((index + 1 < n_src) | ((index == n_src - 1) & (frac_inner == 0)))
    return index, frac_inner, frac_border, inside


def _warp_ipp(img: np.ndarray, dst_w: int, dst_h: int, inverse: _Inverse | None = None) -> np.ndarray:
    src_h, src_w = img.shape[:2]
    if src_w <= 1 or src_h <= 1:
        # OpenCV's IPP wrapper (hal/ipp/src/warp_ipp.cpp) declines such images; OpenCV's own
        # float32 kernel then runs.
        return _warp_float32(img, dst_w, dst_h, fused=True, inverse=inverse)
    if inverse is None or (inverse.m2 == 0 and inverse.m5 == 0):
        if inverse is None:
            m0, m4, m8 = _inverse_diagonal(src_w, src_h, dst_w, dst_h)
        else:
            m0, m4, m8 = inverse.m0, inverse.m4, inverse.m8
        ix, fx_in, fx_out, x_inside = _ipp_coords(dst_w, src_w, m0, m8)
        iy, fy_in, fy_out, y_inside = _ipp_coords(dst_h, src_h, m4, m8)
    else:
        ix, fx_in, fx_out, x_inside = _ipp_translated_coords(
            dst_w, src_w, inverse.m0, inverse.m2, inverse.m8, _IPP_EDGE_TOLERANCE_X)
        iy, fy_in, fy_out, y_inside = _ipp_translated_coords(
            dst_h, src_h, inverse.m4, inverse.m5, inverse.m8, _IPP_EDGE_TOLERANCE_Y)
    inner = y_inside[:, None] & x_inside[None, :]
    fx = np.where(inner, fx_in[None, :], fx_out[None, :])[:, :, None]
    fy = np.where(inner, fy_in[:, None], fy_out[:, None])[:, :, None]

    p00, p01, p10, p11 = _neighbours(img, ix, iy)
    fx = np.broadcast_to(fx, p00.shape)
    fy = np.broadcast_to(fy, p00.shape)
    # vertical first, then horizontal, each a fused multiply-add
    v0 = _fma32(fy, p10 - p00, p00)
    v1 = _fma32(fy, p11 - p01, p01)
    v = _fma32(fx, v1 - v0, v0)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def _check_kernel(kernel: Any, name: str) -> str:
    if not isinstance(kernel, str) or kernel not in WARP_KERNELS:
        raise RefghostError(f"{name} must be one of {', '.join(WARP_KERNELS)}; got {kernel!r}")
    return kernel


def warp_resize(
    img: np.ndarray,
    size: Sequence[int],
    *,
    warp_kernel: str = DEFAULT_WARP_KERNEL,
    kernel: str | None = None,
) -> np.ndarray:
    """Resize like NanoDet: ``cv2.warpPerspective(img, diag(dst_w/W, dst_h/H, 1), (dst_w, dst_h))``.

    Default flags are reproduced: INTER_LINEAR, BORDER_CONSTANT with value 0. Destination pixel
    (x, y) samples the source at (x*W/dst_w, y*H/dst_h), without the half-pixel offset of
    ``cv2.resize``; on the right/bottom edge of an upscale the bilinear neighbourhood leaves the
    image and mixes with black.

    Parameters
    ----------
    img : (H, W, 3) uint8
        Source image, any channel order (channels are independent).
    size : (dst_w, dst_h)
        Output width and height, integers in 1..32767.
    warp_kernel : one of :data:`WARP_KERNELS`
        Which OpenCV implementation to reproduce bit for bit: "fixed_point" is OpenCV 4.x (the
        default); "float32_fma" is OpenCV 5.0 (and 5.x without IPP) on FMA-capable CPUs;
        "float32" is OpenCV 5.x without FMA; "ipp_float32_fma" is OpenCV 5.1's x86-64 wheels
        (Intel IPP). :func:`kernel_for_opencv` picks it from a version string; see the module
        docstring.
    kernel : deprecated spelling of ``warp_kernel`` (emits a DeprecationWarning)

    Returns
    -------
    out : (dst_h, dst_w, 3) uint8
        The warped image. When ``size`` equals (W, H) this is an exact copy of ``img``.

    Raises
    ------
    ImageError
        ``img`` is not a uint8 (H, W, 3) array with H, W >= 1.
    RefghostError
        ``size`` is not two integers in 1..32767, or the kernel is unknown.
    """
    if kernel is not None:
        warnings.warn("warp_resize(kernel=) is deprecated; use warp_kernel=", DeprecationWarning, stacklevel=2)
        warp_kernel = kernel
    img = _check_image(img)
    dst_w, dst_h = _check_size(size, "size")
    warp_kernel = _check_kernel(warp_kernel, "warp_kernel")
    if warp_kernel == "fixed_point":
        return _warp_fixed_point(img, dst_w, dst_h)
    if warp_kernel == "ipp_float32_fma":
        return _warp_ipp(img, dst_w, dst_h)
    return _warp_float32(img, dst_w, dst_h, fused=(warp_kernel == "float32_fma"))


def minimum_dst_shape(src_w: int, src_h: int, dst_w: int, dst_h: int, divisible: int = 0) -> tuple[int, int]:
    """NanoDet's ``get_minimum_dst_shape``: the aspect-preserving size that fits ``(dst_w, dst_h)``.

    ``ratio = dst_h/src_h`` if ``src_w/src_h < dst_w/dst_h`` else ``dst_w/src_w``; the size is
    ``(int(ratio*src_w), int(ratio*src_h))`` (truncated), then, when ``divisible > 0``, each side
    is rounded up to a multiple of ``divisible`` (at least ``divisible``). NanoDet's validation
    pipeline passes ``divisible=0`` (no config sets it); the batch is padded afterwards
    (:data:`PAD_DIVISOR`).

    Returns
    -------
    (w, h) : ints

    Raises
    ------
    RefghostError
        A size is not a positive integer, ``divisible`` is negative, or a side truncates to 0
        (an image far more elongated than the input, on which NanoDet's warp fails).
    """
    src_w, src_h = _check_size((src_w, src_h), "source size")
    dst_w, dst_h = _check_size((dst_w, dst_h), "destination size")
    if not isinstance(divisible, numbers.Integral) or isinstance(divisible, bool) or divisible < 0:
        raise RefghostError(f"divisible must be an integer >= 0, got {divisible!r}")
    ratio = dst_h / src_h if src_w / src_h < dst_w / dst_h else dst_w / src_w
    w, h = int(ratio * src_w), int(ratio * src_h)
    if divisible > 0:
        w = max(divisible, (w + divisible - 1) // divisible * divisible)
        h = max(divisible, (h + divisible - 1) // divisible * divisible)
    if w < 1 or h < 1:
        raise RefghostError(
            f"keep_ratio resize of a {src_w}x{src_h} image into {dst_w}x{dst_h} gives an empty side ({w}x{h})"
        )
    return w, h


def resize_matrix(src_w: int, src_h: int, dst_w: int, dst_h: int, keep_ratio: bool) -> np.ndarray:
    """The 3x3 matrix ``M`` NanoDet's validation pipeline warps with (``meta["warp_matrix"]``).

    ``ShapeTransform`` builds ``M = ResizeM @ T @ F @ Sh @ R @ Str @ Scl @ P @ C``; at validation
    every factor but ``C`` (centre: translate by ``(-W/2, -H/2)``) and ``T`` (translate by
    ``(0.5*W, 0.5*H)``) is the identity, and ``T @ C`` is exactly the identity, so ``M`` is
    ``get_resize_matrix((W, H), (dst_w, dst_h), keep_ratio)``:

    * ``keep_ratio=False``: ``diag(dst_w/W, dst_h/H, 1)`` (a stretch);
    * ``keep_ratio=True``: ``T(0.5*dst) @ diag(r, r, 1) @ C(-0.5*src)`` with
      ``r = dst_h/H`` if ``W/H < dst_w/dst_h`` else ``dst_w/W``, i.e. scale ``r`` and
      translation ``(r*(-W/2) + 0.5*dst_w, r*(-H/2) + 0.5*dst_h)`` in that order of rounding.
      Pass the size from :func:`minimum_dst_shape`, as ``ShapeTransform`` does: the ratio is
      recomputed from it, so the translation is a sub-pixel offset, or rounding noise of a few
      1e-14, or 0.

    Returns
    -------
    M : (3, 3) float64, mapping original-image pixels to network-input pixels (invert it for
        :func:`refghost.detector.decode.warp_boxes`)
    """
    src_w, src_h = _check_size((src_w, src_h), "source size")
    dst_w, dst_h = _check_size((dst_w, dst_h), "destination size")
    matrix = np.eye(3)
    if keep_ratio:
        ratio = dst_h / src_h if src_w / src_h < dst_w / dst_h else dst_w / src_w
        matrix[0, 0] = matrix[1, 1] = ratio
        matrix[0, 2] = ratio * (-src_w / 2) + 0.5 * dst_w
        matrix[1, 2] = ratio * (-src_h / 2) + 0.5 * dst_h
    else:
        matrix[0, 0] = dst_w / src_w
        matrix[1, 1] = dst_h / src_h
    return matrix


def warp_image(
    img: np.ndarray, matrix: np.ndarray, size: Sequence[int], *, warp_kernel: str = DEFAULT_WARP_KERNEL
) -> np.ndarray:
    """``cv2.warpPerspective(img, matrix, size)`` for a scale + translation ``matrix``.

    The generalisation of :func:`warp_resize` to NanoDet's keep_ratio matrices
    (:func:`resize_matrix`): ``matrix = [[a, 0, tx], [0, b, ty], [0, 0, 1]]`` with ``a, b > 0``.
    OpenCV inverts it (:func:`_inverse_scale_translate`) and samples the source at
    ``((x*m0 + m2)/m8, (y*m4 + m5)/m8)``. Bit-exact, measured against OpenCV 5.1 (x86-64 wheel)
    on random images for:

    * ``"ipp_float32_fma"``: as in :func:`warp_resize`, the coordinate computed in double; one
      more rule for translated matrices (:func:`_ipp_translated_coords`);
    * ``"float32_fma"`` and ``"float32"``: the coordinate computed in float32 as OpenCV 5's own
      kernel does (:func:`_float32_translated_coords`);
    * ``"fixed_point"`` (OpenCV 4.x): only without translation (``tx = ty = 0``); a translated
      matrix raises, since that arithmetic could not be checked against an OpenCV 4.x here.

    With ``tx = ty = 0`` every kernel computes exactly what :func:`warp_resize` computes for the
    same inverse entries.

    Returns
    -------
    out : (size[1], size[0], 3) uint8

    Raises
    ------
    ImageError
        ``img`` is not a uint8 (H, W, 3) array.
    RefghostError
        ``matrix`` is not a finite scale + translation with positive scales; bad size or kernel;
        ``"fixed_point"`` with a translation.
    """
    img = _check_image(img)
    dst_w, dst_h = _check_size(size, "size")
    warp_kernel = _check_kernel(warp_kernel, "warp_kernel")
    m = np.asarray(matrix, dtype=np.float64)
    if (
        m.shape != (3, 3)
        or not np.all(np.isfinite(m))
        or m[0, 1] != 0 or m[1, 0] != 0 or m[2, 0] != 0 or m[2, 1] != 0 or m[2, 2] != 1
        or not (m[0, 0] > 0 and m[1, 1] > 0)
    ):
        raise RefghostError(
            "matrix must be a 3x3 scale + translation [[a, 0, tx], [0, b, ty], [0, 0, 1]] with a, b > 0, "
            f"got {np.asarray(matrix).tolist() if np.size(matrix) <= 16 else np.shape(matrix)}"
        )
    inverse = _inverse_scale_translate(m)
    if warp_kernel == "fixed_point":
        return _warp_fixed_point(img, dst_w, dst_h, inverse)
    if warp_kernel == "ipp_float32_fma":
        return _warp_ipp(img, dst_w, dst_h, inverse)
    return _warp_float32(img, dst_w, dst_h, fused=(warp_kernel == "float32_fma"), inverse=inverse)


def pad_to_multiple(batch: np.ndarray, divisor: int = PAD_DIVISOR) -> np.ndarray:
    """NanoDet's ``stack_batch_img``: zero-pad (N, C, H, W) at the bottom and right so that H and
    W are multiples of ``divisor``. The pad value is 0 in the *normalised* tensor (NanoDet pads
    after normalisation), not a black pixel."""
    if not isinstance(divisor, numbers.Integral) or isinstance(divisor, bool) or divisor < 1:
        raise RefghostError(f"divisor must be an integer >= 1, got {divisor!r}")
    if not isinstance(batch, np.ndarray) or batch.ndim != 4:
        raise RefghostError(f"batch must be an (N, C, H, W) array, got {_describe(batch)}")
    h, w = batch.shape[2:]
    pad_h, pad_w = -h % divisor, -w % divisor
    if pad_h == 0 and pad_w == 0:
        return batch
    return np.pad(batch, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))


def kernel_for_opencv(version: str, *, fma: bool = True, ipp: bool = True) -> str:
    """The :data:`WARP_KERNELS` entry that reproduces ``cv2.warpPerspective`` of OpenCV ``version``.

    Parameters
    ----------
    version : str
        ``cv2.__version__`` (e.g. "4.14.0", "5.1.0") or a pip version ("5.1.0.95"); anything
        after the numbers ("-dev", "+cuda") is ignored.
    fma : bool
        Whether OpenCV's SIMD dispatch uses fused multiply-add: True on x86-64 with AVX2/FMA3 and
        on AArch64; False with ``cv2.setUseOptimized(False)`` or on a CPU without AVX2.
    ipp : bool
        Whether the build calls Intel IPP (the x86-64 pip wheels do, unless
        ``cv2.ipp.setUseIPP(False)``); OpenCV 5.1 routes this warp to IPP.

    Returns
    -------
    "fixed_point" for 4.x, "float32_fma"/"float32" for 5.0 (and for 5.1+ without IPP),
    "ipp_float32_fma" for 5.1+ with IPP. Versions after 5.1 are assumed to behave as 5.1 (checked
    up to 5.1.0).

    Raises
    ------
    RefghostError
        ``version`` does not start with MAJOR.MINOR, or MAJOR is below 4 (not reproduced).
    """
    match = re.match(r"\s*(\d+)\.(\d+)", version) if isinstance(version, str) else None
    if match is None:
        raise RefghostError(f"OpenCV version must look like '4.14.0' or '5.1.0', got {version!r}")
    major, minor = int(match.group(1)), int(match.group(2))
    if major < 4:
        raise RefghostError(f"OpenCV {version}: only OpenCV 4.x and 5.x warps are reproduced")
    if major == 4:
        return "fixed_point"
    if (major, minor) >= (5, 1) and ipp:
        return "ipp_float32_fma"
    return "float32_fma" if fma else "float32"


# --------------------------------------------------------------------------------------------
# Normalisation and the full pipeline
# --------------------------------------------------------------------------------------------


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """NanoDet's ``_normalize`` followed by HWC -> CHW, exactly in float32.

    Computes ``x = img.astype(float32) / 255``, ``m = float32(mean) / 255``,
    ``s = float32(std) / 255`` and ``(x - m) / s``, every operation rounded to float32 in that
    order, so the result is bit-identical to NanoDet's ``color_aug_and_norm`` at val time.

    Parameters
    ----------
    img : (H, W, 3) uint8
    mean, std : 3 numbers each
        Per-channel statistics in 0..255 units, in the channel order of ``img`` (NanoDet: BGR
        mean [103.53, 116.28, 123.675], std [57.375, 57.12, 58.395]).

    Returns
    -------
    x : (3, H, W) float32, C-contiguous
    """
    img = _check_image(img)
    mean_arr = _check_stats(mean, "mean")
    std_arr = _check_stats(std, "std")
    x = img.astype(np.float32) / np.float32(255)
    m = mean_arr.astype(np.float32).reshape(1, 1, 3) / np.float32(255)
    s = std_arr.astype(np.float32).reshape(1, 1, 3) / np.float32(255)
    out = (x - m) / s
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def prepare_image(
    image: str | os.PathLike | np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    channel_order: str,
    input_size: Sequence[int],
    resize: str = "warp_perspective",
    warp_kernel: str = DEFAULT_WARP_KERNEL,
    keep_ratio: bool = False,
) -> np.ndarray:
    """Image file or array -> network input batch, as NanoDet's val pipeline builds it.

    ``prepare_image(path, **NANODET_PREPROCESSING)`` reproduces NanoDet; the ``resize`` key of
    the preset dictionaries is accepted for that reason. The batch of
    :func:`prepare_image_and_matrix`, which also returns the warp matrix (needed to bring
    detections back to the image).

    Parameters
    ----------
    image : str, os.PathLike or (H, W, 3) uint8 array
        A path is read with :func:`read_image` in ``channel_order``. An array is taken to be in
        ``channel_order`` already.
    mean, std : 3 numbers each
        Per-channel statistics in 0..255 units, in ``channel_order``.
    channel_order : {"BGR", "RGB"}
        Channel order the network expects (NanoDet: BGR).
    input_size : (w, h)
        Network input width and height (with keep_ratio, the box the image is fitted into).
    resize : {"warp_perspective"}
        The only supported resize, NanoDet's ``warpPerspective``.
    warp_kernel : one of :data:`WARP_KERNELS`
        Which OpenCV implementation of the warp to reproduce; see :func:`warp_resize` and
        :func:`kernel_for_opencv`.
    keep_ratio : bool
        False (NanoDet-Plus configs): stretch to ``input_size``. True (legacy and custom
        configs): fit the aspect-preserving size, then zero-pad to multiples of 32; see
        :func:`prepare_image_and_matrix`.

    Returns
    -------
    batch : (1, 3, h, w) float32, C-contiguous (keep_ratio: h, w are the padded sides)

    Raises
    ------
    ImageError
        The file cannot be read, or the array is not uint8 with shape (H, W, 3), H, W >= 1;
        the message names what was found.
    RefghostError
        Bad mean/std/channel_order/input_size/resize/warp_kernel; keep_ratio with
        ``"fixed_point"`` when the matrix translates (:func:`warp_image`).
    """
    return prepare_image_and_matrix(
        image, mean=mean, std=std, channel_order=channel_order, input_size=input_size, resize=resize,
        warp_kernel=warp_kernel, keep_ratio=keep_ratio,
    )[0]


def prepare_image_and_matrix(
    image: str | os.PathLike | np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    channel_order: str,
    input_size: Sequence[int],
    resize: str = "warp_perspective",
    warp_kernel: str = DEFAULT_WARP_KERNEL,
    keep_ratio: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`prepare_image` plus NanoDet's ``warp_matrix`` (original pixels -> input pixels).

    keep_ratio=False: ``M = diag(w/W, h/H, 1)``, the image is stretched to ``input_size`` with
    :func:`warp_resize` and normalised; no padding (NanoDet's input sizes are multiples of 32,
    where ``stack_batch_img`` pads nothing).

    keep_ratio=True, NanoDet's ``ShapeTransform`` then ``stack_batch_img(divisible=32)``
    (``demo/demo.py``): the size becomes ``minimum_dst_shape(W, H, w, h)`` (aspect kept,
    truncated, ``divisible=0`` as in every NanoDet config), ``M = resize_matrix(W, H, size,
    keep_ratio=True)``, the image is warped with :func:`warp_image`, normalised, and the tensor
    is zero-padded at the bottom and right to multiples of :data:`PAD_DIVISOR`
    (:func:`pad_to_multiple`; the padding is 0 after normalisation). The padded size is the
    network input size (``decode``'s ``input_size``).

    Returns
    -------
    batch : (1, 3, h, w) float32, C-contiguous
    matrix : (3, 3) float64, ``M``
    """
    order = _check_channel_order(channel_order)
    dst_w, dst_h = _check_size(input_size, "input_size")
    if resize not in _RESIZE_METHODS:
        raise RefghostError(f"resize must be one of {', '.join(_RESIZE_METHODS)}; got {resize!r}")
    warp_kernel = _check_kernel(warp_kernel, "warp_kernel")
    if not isinstance(keep_ratio, (bool, np.bool_)):
        raise RefghostError(f"keep_ratio must be True or False, got {keep_ratio!r}")
    mean_arr = _check_stats(mean, "mean")
    std_arr = _check_stats(std, "std")

    if isinstance(image, (str, os.PathLike)):
        img = read_image(image, order)
    else:
        img = _check_image(image)
    src_h, src_w = img.shape[:2]
    if not keep_ratio:
        matrix = resize_matrix(src_w, src_h, dst_w, dst_h, keep_ratio=False)
        if img.shape[:2] != (dst_h, dst_w):
            # With equal sizes the identity warp is exact for every kernel, so skipping it is safe.
            img = warp_resize(img, (dst_w, dst_h), warp_kernel=warp_kernel)
        return normalize(img, mean_arr, std_arr)[None], matrix
    fit_w, fit_h = minimum_dst_shape(src_w, src_h, dst_w, dst_h)
    matrix = resize_matrix(src_w, src_h, fit_w, fit_h, keep_ratio=True)
    if not np.array_equal(matrix, np.eye(3)):
        img = warp_image(img, matrix, (fit_w, fit_h), warp_kernel=warp_kernel)
    batch = pad_to_multiple(normalize(img, mean_arr, std_arr)[None], PAD_DIVISOR)
    return np.ascontiguousarray(batch), matrix
