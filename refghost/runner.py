"""``refghost.run``: one call from an image and a weights file to GhostNet's outputs."""

from __future__ import annotations

import os

import numpy as np

from .errors import ImageError, RefghostError
from .forward import execute, single_threaded_blas
from .weights import Weights, load_weights

DTYPES = ("float32", "float64")
#: ``impl`` values of :func:`run`: "fast" (the fastest correct path: the engine, or the fast
#: interpreter when intermediates are asked for or the engine declines), "plain" (the
#: interpreter on the plain definitions), "engine" (the engine or an error), "interpreter"
#: (the interpreter with its fast ops).
RUN_IMPLS = ("fast", "plain", "engine", "interpreter")


def as_weights(weights) -> Weights:
    """A :class:`Weights` as is, or a path loaded with :func:`load_weights`."""
    if isinstance(weights, Weights):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        return load_weights(weights)
    raise RefghostError(f"weights must be a path or what refghost.load_weights returns, got {type(weights).__name__}")


def prepare_input(image, weights: Weights, dtype, warp_kernel: str | None = None) -> np.ndarray:
    """The network input (N, 3, H, W) in ``dtype`` for any accepted form of ``image``.

    * float array (N, 3, H, W) or (3, H, W): the network input as is (cast to ``dtype``);
    * uint8 array (H, W, 3) in the weights' recorded channel order, or an image file path:
      preprocessed as the weights file records (warp-resize to ``input_size`` with
      ``warp_kernel``, default :data:`refghost.preprocess.DEFAULT_WARP_KERNEL`, then mean/std).
    """
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
        warp_kernel: str | None = None) -> dict[str, np.ndarray]:
    """Run GhostNet on ``image`` with ``weights`` and return ``{module path: array}``.

    Parameters
    ----------
    image : float array (N, 3, H, W) or (3, H, W), uint8 array (H, W, 3), or image file path
        See :func:`prepare_input`.
    weights : path of a weights file, or what :func:`refghost.load_weights` returned
    dtype : "float32" (mimic a backend) or "float64" (the oracle); every value is computed and
        returned in this dtype.
    intermediates : also return every layer's output, keyed by PyTorch module path; everything is
        then computed by the interpreter (BN unfolded), so the outputs equal their layers'
        tensors and differ from the engine's (``intermediates=False``) within the rounding bound
    impl : "fast" (default: the compiled engine of :mod:`refghost.engine`, or the interpreter's
        BLAS + Numba ops when ``intermediates`` is set), "plain" (the definitions in
        :mod:`refghost.ops`), "engine" or "interpreter" (force one of the two fast paths)
    warp_kernel : which OpenCV's ``warpPerspective`` the resize of a uint8 image or image file
        reproduces (:data:`refghost.preprocess.WARP_KERNELS`; default "fixed_point", OpenCV 4.x;
        :func:`refghost.preprocess.kernel_for_opencv` names the one of an OpenCV version)

    Returns
    -------
    dict in forward order: ``blocks.4``, ``blocks.6``, ``blocks.9`` (N, C, H/s, W/s) for the
    NanoDet backbone's out_stages, or ``classifier`` (N, num_classes) for the classifier; with
    ``intermediates=True`` also ``conv_stem``, ``bn1``, ``act1``, ..., ``blocks.3.0.se``, ...
    """
    if str(dtype) not in DTYPES:
        raise RefghostError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if impl not in RUN_IMPLS:
        raise RefghostError(f"impl must be one of {RUN_IMPLS}, got {impl!r}")
    if impl == "engine" and intermediates:
        raise RefghostError("impl='engine' folds BatchNorm into the convolutions, so it has no per-module "
                            "intermediates; use impl='fast' or 'interpreter'")
    w = as_weights(weights)
    x = prepare_input(image, w, dtype, warp_kernel)
    if impl in ("fast", "engine") and not intermediates:
        # The compiled plan (refghost.engine): cached on w per dtype and input shape; it owns
        # the thread settings. It declines graphs it cannot run, and "fast" then interprets.
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
                       impl="plain" if impl == "plain" else "fast")
