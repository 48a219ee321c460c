"""``refghost.run``: one call from an image and a weights file to GhostNet's outputs, or a detector's
detections."""

from __future__ import annotations

import os

import numpy as np

from .errors import ImageError, RefghostError
from .forward import execute
from .threads import single_threaded_blas
from .weights import Weights, is_detector, load_weights

DTYPES = ("float32", "float64")
#: ``impl`` values of :func:`run`: "fast" (the fastest path: the engine, or the interpreter on
#: its compiled ops when intermediates are asked for or the engine declines), "plain" (the
#: interpreter on the plain definitions), "engine" (the engine or an error), "interpreter"
#: (the interpreter on its compiled ops, refghost.forward's impl "kernels").
RUN_IMPLS = ("fast", "plain", "engine", "interpreter")
#: File extensions (lower case) of the images :func:`image_files` takes from a folder.
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def as_weights(weights) -> Weights:
    """A :class:`Weights` as is, or a path loaded with :func:`load_weights`."""
    if isinstance(weights, Weights):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        return load_weights(weights)
    raise RefghostError(f"weights must be a path or what refghost.load_weights returns, got {type(weights).__name__}")


def image_files(folder) -> list[str]:
    """The image files (by :data:`IMAGE_EXTENSIONS`) directly in ``folder``, sorted by name."""
    folder = os.fspath(folder)
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise ImageError(f"{folder}: no image files in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


def expand_images(image) -> list:
    """The single images that ``image`` stands for, in batch order: the items of a list or tuple,
    a folder's :func:`image_files` (also inside a list), or ``[image]`` itself."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ImageError("an empty list of images")
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
            out.extend(image_files(item))
        else:
            out.append(item)
    return out


def prepare_input(image, weights: Weights, dtype, warp_kernel: str | None = None, *, progress=None) -> np.ndarray:
    """The network input (N, 3, H, W) in ``dtype`` for any accepted form of ``image``.

    * float array (N, 3, H, W) or (3, H, W): the network input as is (cast to ``dtype``);
    * uint8 array (H, W, 3) in the weights' recorded channel order, or an image file path:
      preprocessed as the weights file records (warp-resize to ``input_size`` with
      ``warp_kernel``, default :data:`refghost.preprocess.DEFAULT_WARP_KERNEL`, then mean/std);
    * a folder, or a list/tuple of any of these: each item prepared alone (images of any size,
      each resized to ``input_size``; a folder's images sorted by name) and stacked along the batch
      axis in that order. ``progress(i, n)`` (if given) is called after each of the n items.
    """
    items = expand_images(image)
    if len(items) > 1 or isinstance(image, (list, tuple)) or items[0] is not image:
        parts = []
        for i, item in enumerate(items):
            part = _prepare_one(item, weights, dtype, warp_kernel)
            if parts and part.shape[1:] != parts[0].shape[1:]:
                raise ImageError(f"image {i} ({_name(item)}) gives an input of shape {part.shape[1:]}, image 0 "
                                 f"({_name(items[0])}) {parts[0].shape[1:]}: a batch needs one shape (image files "
                                 f"are all resized to the weights' input size; float arrays are used as they are)")
            parts.append(part)
            if progress is not None:
                progress(i + 1, len(items))
        return np.ascontiguousarray(np.concatenate(parts))
    return _prepare_one(image, weights, dtype, warp_kernel)


#: What reading an image file of a Pillow mode does to it (preprocess.read_image), for the modes
#: that are not 8-bit RGB.
_MODE_NOTES = {
    "1": "1-bit image expanded to 3 channels",
    "L": "grayscale converted to 3 channels",
    "LA": "grayscale converted to 3 channels, alpha channel dropped (not composited)",
    "P": "palette image converted to 3 channels",
    "PA": "palette image converted to 3 channels, alpha channel dropped (not composited)",
    "RGBA": "alpha channel dropped (not composited)",
    "RGBa": "alpha channel dropped (not composited)",
    "CMYK": "CMYK converted to RGB",
    "YCbCr": "YCbCr converted to RGB",
    "LAB": "Lab converted to RGB",
    "HSV": "HSV converted to RGB",
}


def describe_image(image, input_size) -> tuple[str, list[str]]:
    """How preparing ``image`` (one item of :func:`prepare_input`) changes it: its size as
    ``"WxH"`` (``"N,3,H,W"`` for a float array) and notes such as ``"grayscale converted to 3
    channels"`` or ``"upscaled to 320x320"``. An image file is described from its header (Pillow
    opens it lazily): this reads no pixels and changes nothing."""
    dst_w, dst_h = input_size
    if isinstance(image, np.ndarray) and image.dtype.kind == "f":
        return "x".join(map(str, image.shape)), ["used as the network input as is (not resized)"]
    notes = []
    if isinstance(image, np.ndarray):
        h, w = image.shape[:2]
    else:
        from PIL import Image

        from .preprocess import _SIXTEEN_BIT_MODES

        with Image.open(image) as im:
            mode, (w, h) = im.mode, im.size
            orientation = im.getexif().get(0x0112, 1)
            n_frames = getattr(im, "n_frames", 1)
        if orientation in (5, 6, 7, 8):  # ImageOps.exif_transpose turns these by 90 degrees
            w, h = h, w
        if orientation not in (1, None):
            notes.append(f"EXIF orientation {orientation} applied")
        if mode in _SIXTEEN_BIT_MODES:
            notes.append("16-bit grayscale reduced to 8 bits (high byte) and converted to 3 channels")
        elif mode in _MODE_NOTES:
            notes.append(_MODE_NOTES[mode])
        if n_frames > 1:
            notes.append(f"first of {n_frames} frames")
    if (w, h) == (dst_w, dst_h):
        notes.append("already the input size: not resized")
    else:
        how = "upscaled" if w <= dst_w and h <= dst_h else "downscaled" if w >= dst_w and h >= dst_h else "resized"
        notes.append(f"{how} to {dst_w}x{dst_h}")
    return f"{w}x{h}", notes


def _name(item) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"array {getattr(item, 'shape', '')}"


def _prepare_one(image, weights: Weights, dtype, warp_kernel: str | None = None) -> np.ndarray:
    """:func:`prepare_input` of one image file, uint8 image array or float input array."""
    if isinstance(image, (str, os.PathLike)) or (isinstance(image, np.ndarray) and image.dtype == np.uint8):
        from .preprocess import DEFAULT_WARP_KERNEL, prepare_image

        pre = weights.preprocessing
        x = prepare_image(image, mean=pre.mean, std=pre.std, channel_order=pre.channel_order,
                          input_size=pre.input_size,
                          warp_kernel=DEFAULT_WARP_KERNEL if warp_kernel is None else warp_kernel)
    elif isinstance(image, np.ndarray) and image.dtype.kind == "f":
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
            raise ImageError(f"a float image must have shape (N, 3, H, W) or (3, H, W), got {image.shape}")
        if not np.isfinite(x).all():
            raise ImageError(f"the input has {int(x.size - np.isfinite(x).sum())} NaN or Inf value(s)")
    else:
        what = f"array of dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageError(f"image must be a float (N, 3, H, W) array, a uint8 (H, W, 3) array or a path; "
                         f"got {what}")
    return np.ascontiguousarray(x, dtype=dtype)


def run(image, weights, *, dtype="float32", intermediates=False, impl="fast",
        warp_kernel: str | None = None, score_threshold: float | None = None, iou_threshold: float | None = None,
        max_detections: int | None = None) -> dict[str, np.ndarray]:
    """Run GhostNet, or a whole NanoDet detector, on ``image`` with ``weights`` and return
    ``{module path: array}``.

    Parameters
    ----------
    image : float array (N, 3, H, W) or (3, H, W), uint8 array (H, W, 3), image file path, folder of
        images, or a list of any of these: see :func:`prepare_input`. Several images form one batch,
        in the order given (a folder's by file name): row ``i`` of every output is image ``i``.
    weights : path of a weights file, or what :func:`refghost.load_weights` returned
    dtype : "float32" (mimic a backend) or "float64" (the oracle); every value is computed and
        returned in this dtype.
    intermediates : also return every layer's output, keyed by PyTorch module path; everything is
        then computed by the interpreter (BN unfolded), so the outputs equal their layers'
        tensors and differ from the engine's (``intermediates=False``) within the rounding bound
    impl : "fast" (default: the fastest path, the compiled engine of :mod:`refghost.engine`, or
        the interpreter on its compiled ops, :mod:`refghost.kernels` (``forward`` impl "kernels"),
        when ``intermediates`` is set or the engine declines), "plain" (the interpreter on the
        definitions in :mod:`refghost.ops`), "engine" or "interpreter" (force one of the two
        compiled paths)
    warp_kernel : which OpenCV's ``warpPerspective`` the resize of a uint8 image or image file
        reproduces (:data:`refghost.preprocess.WARP_KERNELS`; default "fixed_point", OpenCV 4.x;
        :func:`refghost.preprocess.kernel_for_opencv` names the one of an OpenCV version)
    score_threshold, iou_threshold, max_detections : a detector's post-processing (default
        NanoDet's 0.05, 0.6, 100: :class:`refghost.detector.run.NmsSettings`); detectors only

    Returns
    -------
    dict in forward order: ``blocks.4``, ``blocks.6``, ``blocks.9`` (N, C, H/s, W/s) for the
    NanoDet backbone's out_stages, or ``classifier`` (N, num_classes) for the classifier; with
    ``intermediates=True`` also ``conv_stem``, ``bn1``, ``act1``, ..., ``blocks.3.0.se``, ...
    A detector gives ``output`` and its detections (:mod:`refghost.detector.run`).
    """
    if str(dtype) not in DTYPES:
        raise RefghostError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if impl not in RUN_IMPLS:
        raise RefghostError(f"impl must be one of {RUN_IMPLS}, got {impl!r}")
    if impl == "engine" and intermediates:
        raise RefghostError("impl='engine' folds BatchNorm into the convolutions, so it has no per-module "
                            "intermediates; use impl='fast' or 'interpreter'")
    w = as_weights(weights)
    nms = {k: v for k, v in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold),
                             ("max_detections", max_detections)) if v is not None}
    if is_detector(w.config):
        return _run_detector(image, w, dtype, intermediates, impl, warp_kernel, nms)
    if nms:
        raise RefghostError(f"{', '.join(nms)}: a detector's post-processing; these weights are a GhostNet backbone")
    x = prepare_input(image, w, dtype, warp_kernel)
    if impl in ("fast", "engine") and not intermediates:
        # The compiled plan (refghost.engine): cached in w.cache per dtype and input shape; it
        # holds BLAS at one thread while it runs. It declines graphs it cannot run, and "fast"
        # then interprets.
        from .engine import EngineUnsupported, get_plan

        try:
            plan = get_plan(w, dtype, x.shape)
        except EngineUnsupported as exc:
            if impl == "engine":
                raise RefghostError(f"the engine cannot run this network: {exc}") from None
        else:
            return plan.run(x)
    # Every tensor of one consistent computation, by the interpreter (BN unfolded, as PyTorch
    # computes it; the golden files hold its float64 values): the outputs then equal their
    # layers' tensors, and differ from the engine's only within the rounding bound.
    with single_threaded_blas():
        return execute(w.graph, w.params(dtype), x, intermediates=intermediates,
                       impl="plain" if impl == "plain" else "kernels")


def _run_detector(image, weights: Weights, dtype, intermediates, impl, warp_kernel, nms: dict):
    """:func:`run` of a whole detector (:func:`refghost.detector.run.run_detector`)."""
    from .detector.run import NmsSettings, prepare_batch, run_detector

    if impl == "engine":
        raise RefghostError("impl='engine' runs GhostNet backbones only; a detector runs on the interpreter "
                            "(impl 'fast', 'interpreter' or 'plain')")
    batch = prepare_batch(expand_images(image), weights, dtype, warp_kernel)
    return run_detector(batch, weights, dtype=dtype, intermediates=intermediates,
                        impl="plain" if impl == "plain" else "kernels", nms=NmsSettings(**nms))
