"""The operations NanoDet's detector adds to GhostNet's, as plain NumPy that reads like the math.

Same rules as :mod:`refghost.ops`: activations are NCHW, ``x: (N, C, H, W)``; every op computes
in the dtype of its input and returns that dtype. Where PyTorch's CPU kernels fix an order of
float operations that shows in the result, the docstring says which order is followed.

``max_pool2d`` (ShuffleNetV2's stem), ``channel_shuffle`` (its blocks), ``upsample_bilinear``
(the necks), ``sigmoid``, and the head's output layout: ``flatten_levels`` and
``sigmoid_classes``.
"""

from __future__ import annotations

import math

import numpy as np

from ..ops import conv_output_size


def max_pool2d(x, kernel, stride, padding):
    """Max pooling (PyTorch ``MaxPool2d``, floor mode, no dilation).

    ``y[n, c, i, j] = max_{a, e < kernel} xp[n, c, s*i + a, s*j + e]`` where ``xp`` is ``x``
    padded by ``padding`` on every side with -inf (padding never wins). A NaN in a window makes
    the output NaN, as in PyTorch. An exact op: no rounding, so no order to follow.

    x: (N, C, H, W); returns (N, C, Ho, Wo) with ``Ho = floor((H + 2p - k)/s) + 1`` (same for Wo).
    """
    n, c, h, w = x.shape
    ho = conv_output_size(h, kernel, stride, padding)
    wo = conv_output_size(w, kernel, stride, padding)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=-np.inf)
    # the window's max as the max over its kernel*kernel strided shifts (12x faster than a
    # reduction over sliding windows; max is exact, so the order of the maxima does not matter)
    y = None
    for a in range(kernel):
        for e in range(kernel):
            shifted = xp[:, :, a:a + stride * (ho - 1) + 1:stride, e:e + stride * (wo - 1) + 1:stride]
            y = shifted.copy() if y is None else np.maximum(y, shifted)
    return y


def channel_shuffle(x, groups):
    """ShuffleNet's channel shuffle: output channel ``j*groups + g`` is input channel
    ``g*(C/groups) + j`` (view as (N, groups, C/groups, H, W), swap axes 1 and 2, flatten back).

    x: (N, C, H, W) with C divisible by ``groups``; returns (N, C, H, W), a copy.
    """
    n, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"channel_shuffle: {c} channels do not split into {groups} groups")
    return x.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)


def upsample_output_size(size: int, scale_factor: float) -> int:
    """Output length of :func:`upsample_bilinear` along one axis: ``floor(size * scale_factor)``
    (in double precision, as PyTorch computes it)."""
    return int(math.floor(float(size) * float(scale_factor)))


def _linear_taps(in_size, out_size, scale_factor, dtype):
    """Per output index along one axis: the two source indices and their weights.

    Source coordinate ``src = max((d + 1/2) / scale_factor - 1/2, 0)`` (half-pixel centres; the
    ratio is ``1/scale_factor``, not ``in_size/out_size``, because PyTorch's ``interpolate`` is
    given the scale factor and ``recompute_scale_factor`` is unset); ``i0 = min(floor(src),
    in_size - 1)``, ``i1 = i0 + 1`` clamped to ``in_size - 1``; ``l1 = clamp(src - i0, 0, 1)``,
    ``l0 = 1 - l1``. Computed in ``dtype``, as PyTorch computes them in the tensor's type.
    """
    t = dtype.type
    ratio = t(1.0 / scale_factor)
    src = np.maximum(ratio * (np.arange(out_size).astype(dtype) + t(0.5)) - t(0.5), t(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = np.clip(src - i0.astype(dtype), t(0), t(1))
    return i0, i1, t(1) - l1, l1


def upsample_bilinear(x, scale_factor):
    """Bilinear resize by ``scale_factor`` on H and W: PyTorch's ``F.interpolate(x,
    scale_factor=s, mode="bilinear", align_corners=False)`` (and ``nn.Upsample`` with the same).

    Output size ``floor(H*s) x floor(W*s)`` (:func:`upsample_output_size`). For output pixel
    ``(i, j)`` the source rows ``r0, r1`` with weights ``a0, a1`` and columns ``c0, c1`` with
    weights ``b0, b1`` are :func:`_linear_taps`' (half-pixel source coordinate ``(d + 1/2)/s - 1/2``
    clamped below at 0, the second tap clamped to the last row/column), and

    ``y = w00*x[r0, c0] + (w01*x[r0, c1] + (w10*x[r1, c0] + w11*x[r1, c1]))``, ``wkl = ak*bl``,

    summed from the last tap to the first: the order of PyTorch's vectorised CPU kernel (seen on
    PyTorch 2.13), which it picks when the output's H + W <= 128, as for every NanoDet level up
    to a 512 input. Elsewhere PyTorch differs: larger NCHW outputs go to a separable kernel that
    blends along W first, and channels beyond a multiple of the SIMD width are summed first tap
    to last. PyTorch's x86 builds also fuse the multiply-adds into FMAs, which NumPy cannot
    express: each product is rounded here. For s = 2 and s = 1/2 the coordinates and weights (0,
    1/4, 3/4, 1/2 and their products) are exact, so only those roundings differ.

    x: (N, C, H, W); scale_factor: a positive number; returns (N, C, floor(H*s), floor(W*s)).
    """
    if not (isinstance(scale_factor, (int, float)) and math.isfinite(scale_factor) and scale_factor > 0):
        raise ValueError(f"upsample_bilinear: scale_factor must be a positive number, got {scale_factor!r}")
    n, c, h, w = x.shape
    ho, wo = upsample_output_size(h, scale_factor), upsample_output_size(w, scale_factor)
    if ho < 1 or wo < 1:
        raise ValueError(f"upsample_bilinear: {h}x{w} scaled by {scale_factor} is empty")
    r0, r1, a0, a1 = _linear_taps(h, ho, scale_factor, x.dtype)
    c0, c1, b0, b1 = _linear_taps(w, wo, scale_factor, x.dtype)
    a0, a1 = a0[:, None], a1[:, None]  # (Ho, 1) against (Wo,)

    def tap(rows, cols):  # (N, C, Ho, Wo): x at (rows[i], cols[j])
        return x[:, :, rows[:, None], cols[None, :]]

    return (a0 * b0) * tap(r0, c0) + ((a0 * b1) * tap(r0, c1) + ((a1 * b0) * tap(r1, c0) + (a1 * b1) * tap(r1, c1)))


def sigmoid(x):
    """f(x) = 1 / (1 + exp(-x)), PyTorch's formula (a reciprocal of 1 + exp(-x)).

    The same form as :func:`refghost.ops.silu` (``x / (1 + exp(-x))``): for large negative x,
    exp(-x) overflows to +inf and f(x) = 1/inf = +0, the correctly rounded result, so the
    overflow is not warned about.
    """
    one = x.dtype.type(1)
    with np.errstate(over="ignore"):
        return one / (one + np.exp(-x))


def flatten_levels(levels):
    """The head's per-level maps as one list of priors: NanoDet's ``flatten(start_dim=2)`` of each
    level, ``cat(dim=2)`` in stride order, ``permute(0, 2, 1)``.

    levels: (N, C, Hi, Wi) arrays; returns (N, sum_i Hi*Wi, C), row ``offset_i + y*Wi + x`` being
    level i's pixel (y, x). Moves values only.
    """
    n, c = levels[0].shape[:2]
    return np.concatenate([level.reshape(n, c, -1) for level in levels], axis=2).transpose(0, 2, 1).copy()


def sigmoid_classes(x, num_classes):
    """NanoDet's exported output (``_forward_onnx``): :func:`sigmoid` on the first
    ``num_classes`` entries of the last axis (class scores), the rest (the box bins' logits)
    unchanged.

    x: (N, P, num_classes + 4*(reg_max + 1)); returns the same shape, a new array.
    """
    if not 0 < num_classes <= x.shape[-1]:
        raise ValueError(f"sigmoid_classes: num_classes {num_classes} does not fit a last axis of {x.shape[-1]}")
    return np.concatenate([sigmoid(x[..., :num_classes]), x[..., num_classes:]], axis=-1)
