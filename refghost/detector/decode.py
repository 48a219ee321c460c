"""NanoDet's post-processing: from the exported head output to boxes in the original image.

The network's output is NanoDet's ONNX export form (``_forward_onnx`` of both heads)::

    output : (N, P, C + 4*(R+1))   C classes, R = reg_max, P priors

``output[..., :C]`` are class probabilities (the export applies the sigmoid), ``output[..., C:]``
the raw GFL logits of the box sides, four groups of R+1 bins in the order left, top, right,
bottom. Priors run level by level (stride 8 first) and row-major within a level.

The chain, as ``NanoDetPlusHead.get_bboxes`` / ``GFLHead.get_bboxes`` and
``nanodet/model/module/nms.py`` compute it, for each image of the batch:

1. prior centres ``c = (i + offset) * stride`` (:func:`center_priors`; ``offset`` 0 for
   NanoDet-Plus, 0.5 for the legacy GFL head: :data:`PRIOR_OFFSETS`);
2. side distances ``d = sum_k k * softmax(logits)_k * stride`` (:func:`integral`);
3. ``box = (cx - l, cy - t, cx + r, cy + b)`` clamped to the network input (:func:`distance2bbox`);
4. class-aware NMS (:func:`multiclass_nms`): strict score threshold, boxes shifted per class,
   torchvision's greedy NMS, at most ``max_detections`` kept;
5. boxes mapped back through the inverse preprocessing matrix and clipped to the original image
   (:func:`warp_boxes`).

Everything is NumPy in the dtype of ``output`` (float32 to mimic a backend, float64 as the
oracle); every operation of steps 1-4 is an IEEE-rounded operation in that dtype in the order
NanoDet writes it, except where a docstring says otherwise (softmax's exp and the integral's sum
of R+1 products, whose rounding in PyTorch depends on its vectorised kernels).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import numpy as np

from ..errors import RefghostError

__all__ = [
    "DEFAULT_IOU_THRESHOLD",
    "DEFAULT_MAX_DETECTIONS",
    "DEFAULT_SCORE_THRESHOLD",
    "NMS_SPLIT_THRESHOLD",
    "PRIOR_OFFSETS",
    "Detections",
    "center_priors",
    "decode",
    "detect",
    "detections_of_decoded",
    "distance2bbox",
    "head_level_sizes",
    "integral",
    "multiclass_nms",
    "nms",
    "softmax",
    "warp_boxes",
]

#: Offset of a prior centre within its cell, in strides, per head (the names of
#: :data:`refghost.detector.spec.HEADS`). NanoDet-Plus (``get_single_level_center_priors``):
#: ``x = arange(w) * stride``; the legacy head (``GFLHead.get_single_level_center_point``):
#: ``x = (arange(w) + 0.5) * stride``. A port using the wrong one shifts every box by half a
#: stride (nanodet#456 is this bug in the ncnn demo).
PRIOR_OFFSETS = {"nanodet_plus": 0.0, "nanodet": 0.5}

#: NanoDet's evaluation settings (``get_bboxes`` of both heads): a candidate is a (prior, class)
#: pair whose score is strictly greater than 0.05; NMS suppresses at IoU strictly greater than
#: 0.6; at most 100 detections per image. NanoDet's C++ demos (ncnn, OpenVINO, MNN, libtorch:
#: ``detect(img, 0.4, 0.5)``) use score 0.4 and IoU 0.5 instead, and their own per-class NMS.
DEFAULT_SCORE_THRESHOLD = 0.05
DEFAULT_IOU_THRESHOLD = 0.6
DEFAULT_MAX_DETECTIONS = 100
#: ``batched_nms``'s ``split_thr``: with this many candidates or more, NMS runs class by class
#: and the kept candidates are re-sorted by score (the result is the same as one NMS over the
#: class-shifted boxes, which never overlap across classes).
NMS_SPLIT_THRESHOLD = 10000


class Detections(NamedTuple):
    """Detections of one image, best score first.

    boxes : (K, 4) (x1, y1, x2, y2) in pixels of the image the boxes refer to
    scores : (K,) class probability of each box
    labels : (K,) int64 class index in 0..C-1
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _float_array(x, name: str, ndim: int | None = None, last: int | None = None) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        found = f"dtype {x.dtype}" if isinstance(x, np.ndarray) else f"type {type(x).__name__}"
        raise RefghostError(f"{name} must be a float32 or float64 numpy array, got {found}")
    if ndim is not None and x.ndim != ndim:
        raise RefghostError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if last is not None and (x.ndim == 0 or x.shape[-1] != last):
        raise RefghostError(f"{name} must have {last} entries in its last axis, got shape {x.shape}")
    return x


def _int(value, name: str, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise RefghostError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _size(size, name: str) -> tuple[int, int]:
    try:
        w, h = size
    except (TypeError, ValueError):
        raise RefghostError(f"{name} must be (width, height), got {size!r}") from None
    return _int(w, f"{name} width", 1), _int(h, f"{name} height", 1)


def _threshold(value, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise RefghostError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``exp(x - max) / sum(exp(x - max))`` along ``axis``, in the dtype of ``x``.

    The maximum is subtracted first, as PyTorch's CPU softmax does, so no exp overflows. PyTorch
    then multiplies by the reciprocal of the sum in its vectorised kernel; this divides, which
    differs from it by at most one rounding per value.
    """
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def head_level_sizes(input_size: Sequence[int], strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The (h, w) of each level that NanoDet's ``get_bboxes`` builds priors for.

    ``h = ceil(H / stride)``, ``w = ceil(W / stride)`` for the network input ``(W, H)``. (Upstream
    writes ``math.ceil(input_width) / stride``, a float; ``arange`` of it has the same
    ``ceil(W / stride)`` entries.) These equal the feature maps of GhostPAN's extra level (a 5x5
    stride-2 conv with padding 2 halves rounding up) and of inputs divisible by the strides.
    """
    width, height = _size(input_size, "input_size")
    return tuple((-(-height // s), -(-width // s)) for s in (_int(s, "stride", 1) for s in strides))


def center_priors(
    level_sizes: Sequence[Sequence[int]],
    strides: Sequence[int],
    offset: float,
    dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Prior centres of all levels, level by level, row-major within a level.

    Parameters
    ----------
    level_sizes : L pairs (h, w)
    strides : L integers
    offset : 0.0 (NanoDet-Plus) or 0.5 (legacy head); see :data:`PRIOR_OFFSETS`
    dtype : float32 or float64

    Returns
    -------
    centers : (P, 2) ``((j + offset) * stride, (i + offset) * stride)`` = (x, y) of cell (i, j),
        ``P = sum(h * w)``
    prior_strides : (P,) the stride of each prior's level, in ``dtype``
    """
    if len(level_sizes) != len(strides):
        raise RefghostError(f"got {len(level_sizes)} level sizes for {len(strides)} strides")
    dtype = np.dtype(dtype)
    offset_value = dtype.type(_threshold(offset, "offset"))
    centers, prior_strides = [], []
    for size, stride in zip(level_sizes, strides):
        h, w = (_int(v, "level size", 1) for v in size)
        s = dtype.type(_int(stride, "stride", 1))
        x = (np.arange(w, dtype=dtype) + offset_value) * s
        y = (np.arange(h, dtype=dtype) + offset_value) * s
        yy, xx = np.meshgrid(y, x, indexing="ij")
        centers.append(np.stack([xx.ravel(), yy.ravel()], axis=-1))
        prior_strides.append(np.full(h * w, s, dtype=dtype))
    return np.concatenate(centers), np.concatenate(prior_strides)


def integral(reg_logits: np.ndarray, reg_max: int) -> np.ndarray:
    """GFL's ``Integral``: expected bin of each side's distribution, in strides.

    Parameters
    ----------
    reg_logits : (..., 4*(reg_max+1)) raw logits, sides left, top, right, bottom, each
        ``reg_max+1`` consecutive bins
    reg_max : int >= 0

    Returns
    -------
    distances : (..., 4) ``sum_k k * softmax(logits_side)_k``, in the dtype of ``reg_logits``;
        not yet multiplied by the stride. The products are summed in bin order 0..reg_max
        (NanoDet's ``F.linear`` with ``linspace(0, reg_max, reg_max+1)`` leaves the order to BLAS).
    """
    reg_max = _int(reg_max, "reg_max", 0)
    bins = reg_max + 1
    if reg_logits.shape[-1] != 4 * bins:
        raise RefghostError(
            f"regression logits need 4*(reg_max+1) = {4 * bins} entries in the last axis, "
            f"got shape {reg_logits.shape}"
        )
    probabilities = softmax(reg_logits.reshape(*reg_logits.shape[:-1], 4, bins), axis=-1)
    project = np.arange(bins, dtype=reg_logits.dtype)
    distances = probabilities[..., 0] * project[0]
    for k in range(1, bins):
        distances = distances + probabilities[..., k] * project[k]
    return distances


def distance2bbox(points: np.ndarray, distances: np.ndarray, max_shape: Sequence[int]) -> np.ndarray:
    """Boxes from a point and its distances to the four sides, clamped to the network input.

    Parameters
    ----------
    points : (..., 2) (x, y)
    distances : (..., 4) (left, top, right, bottom), in pixels
    max_shape : (W, H) of the network input: x is clamped to [0, W], y to [0, H]

    Returns
    -------
    boxes : (..., 4) ``(x - l, y - t, x + r, y + b)`` clamped
    """
    width, height = _size(max_shape, "max_shape")
    dtype = distances.dtype
    x, y = points[..., 0], points[..., 1]
    x1 = np.clip(x - distances[..., 0], 0, dtype.type(width))
    y1 = np.clip(y - distances[..., 1], 0, dtype.type(height))
    x2 = np.clip(x + distances[..., 2], 0, dtype.type(width))
    y2 = np.clip(y + distances[..., 3], 0, dtype.type(height))
    return np.stack([x1, y1, x2, y2], axis=-1)


def decode(
    output: np.ndarray,
    num_classes: int,
    reg_max: int,
    level_sizes: Sequence[Sequence[int]],
    strides: Sequence[int],
    prior_offset: float,
    input_size: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and boxes of every prior from the exported head output.

    Parameters
    ----------
    output : (N, P, num_classes + 4*(reg_max+1)) float32 or float64, the export form (class
        part already sigmoided, regression part raw logits)
    num_classes, reg_max : ints
    level_sizes : L pairs (h, w), ``sum(h*w) == P`` (:func:`head_level_sizes` gives NanoDet's)
    strides : L ints, e.g. (8, 16, 32, 64)
    prior_offset : :data:`PRIOR_OFFSETS` of the head
    input_size : (W, H) of the network input, for clamping

    Returns
    -------
    scores : (N, P, num_classes) the class part of ``output``, unchanged
    boxes : (N, P, 4) (x1, y1, x2, y2) in network-input pixels, in the dtype of ``output``
    """
    output = _float_array(output, "output", ndim=3)
    num_classes = _int(num_classes, "num_classes", 1)
    reg_max = _int(reg_max, "reg_max", 0)
    channels = num_classes + 4 * (reg_max + 1)
    if output.shape[2] != channels:
        raise RefghostError(
            f"output has {output.shape[2]} channels per prior, expected num_classes + 4*(reg_max+1) "
            f"= {num_classes} + 4*{reg_max + 1} = {channels}"
        )
    centers, prior_strides = center_priors(level_sizes, strides, prior_offset, dtype=output.dtype)
    if centers.shape[0] != output.shape[1]:
        raise RefghostError(
            f"output has {output.shape[1]} priors, the levels {[tuple(s) for s in level_sizes]} "
            f"with strides {tuple(strides)} have {centers.shape[0]}"
        )
    scores = output[..., :num_classes]
    distances = integral(output[..., num_classes:], reg_max) * prior_strides[:, None]
    boxes = distance2bbox(centers, distances, input_size)
    return scores, boxes


# --------------------------------------------------------------------------------------------
# Non-maximum suppression
# --------------------------------------------------------------------------------------------


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision's ``nms`` (``torchvision/csrc/ops/cpu/nms_kernel.cpp``), in the boxes' dtype.

    Candidates are visited by descending score; a visited candidate that is not suppressed is
    kept and suppresses every later candidate ``j`` with ``IoU > iou_threshold`` (strict), where
    ``area = (x2 - x1) * (y2 - y1)``, ``inter = max(0, min(x2) - max(x1)) * max(0, min(y2) -
    max(y1))`` and ``IoU = inter / ((area_i + area_j) - inter)``, each operation rounded to the
    dtype, and the comparison made in double against the double threshold (as C++ promotes it;
    float32 0.6 is above double 0.6). A 0/0 IoU is NaN and suppresses nothing.

    Ties: equal scores are visited lowest index first. torchvision asks PyTorch for an unstable
    sort, whose order among equal scores is unspecified (stable up to 16 elements in PyTorch
    2.13 on CPU, not beyond), so overlapping boxes with exactly equal scores may keep another
    one there.

    Parameters
    ----------
    boxes : (K, 4) (x1, y1, x2, y2)
    scores : (K,)
    iou_threshold : float

    Returns
    -------
    keep : (M,) int64 indices into ``boxes``, by descending score
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(scores), dtype=bool)
    keep = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[position + 1:]
        rest = rest[~suppressed[rest]]
        if rest.size == 0:
            continue
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / ((areas[i] + areas[rest]) - inter)
        suppressed[rest[iou.astype(np.float64) > iou_threshold]] = True
    return np.asarray(keep, dtype=np.int64)


def multiclass_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
    *,
    split_threshold: int = NMS_SPLIT_THRESHOLD,
) -> Detections:
    """NanoDet's ``multiclass_nms`` + ``batched_nms`` for one image.

    1. Candidates are the (prior, class) pairs with ``score > score_threshold`` (strict, the
       threshold rounded to the scores' dtype as torch does), in prior-major, class-minor order
       (``masked_select`` of the (P, C) mask).
    2. Each candidate's box is shifted by ``label * (max + 1)``, ``max`` the largest coordinate
       of all candidate boxes, computed in the boxes' dtype (``offsets = labels * (max + 1)``,
       then ``boxes + offsets``), so that boxes of different classes never overlap.
    3. With fewer than ``split_threshold`` candidates, one :func:`nms` over the shifted boxes;
       otherwise :func:`nms` class by class (ascending label) on the shifted boxes, then the
       union of the kept candidates in index order, sorted by descending score (lower index
       first on ties).
    4. The first ``max_detections`` (all when ``max_detections <= 0``).

    Parameters
    ----------
    boxes : (P, 4) (x1, y1, x2, y2)
    scores : (P, C) class probabilities
    score_threshold, iou_threshold : floats (NanoDet: 0.05 and 0.6; its C++ demos 0.4 and 0.5)
    max_detections : int (NanoDet: 100)
    split_threshold : int, ``batched_nms``'s ``split_thr``

    Returns
    -------
    Detections with unshifted boxes (K, 4), scores (K,) and labels (K,), best first
    """
    boxes = _float_array(boxes, "boxes", ndim=2, last=4)
    scores = _float_array(scores, "scores", ndim=2)
    if scores.shape[0] != boxes.shape[0]:
        raise RefghostError(f"boxes {boxes.shape} and scores {scores.shape} have different numbers of priors")
    score_threshold = _threshold(score_threshold, "score_threshold")
    iou_threshold = _threshold(iou_threshold, "iou_threshold")
    if not isinstance(max_detections, numbers.Integral) or isinstance(max_detections, bool):
        raise RefghostError(f"max_detections must be an integer, got {max_detections!r}")
    split_threshold = _int(split_threshold, "split_threshold", 0)

    # torch compares a float32 tensor with a Python float in float32: the threshold is rounded to
    # the scores' dtype first (float32(0.05) is not above 0.05 there).
    prior_index, labels = np.nonzero(scores > scores.dtype.type(score_threshold))
    candidate_boxes = boxes[prior_index]
    candidate_scores = scores[prior_index, labels]
    if prior_index.size == 0:
        return Detections(np.zeros((0, 4), boxes.dtype), np.zeros(0, scores.dtype), np.zeros(0, np.int64))

    max_coordinate = candidate_boxes.max()
    offsets = labels.astype(boxes.dtype) * (max_coordinate + boxes.dtype.type(1))
    shifted = candidate_boxes + offsets[:, None]
    if prior_index.size < split_threshold:
        keep = nms(shifted, candidate_scores, iou_threshold)
    else:
        kept = np.zeros(prior_index.size, dtype=bool)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            kept[members[nms(shifted[members], candidate_scores[members], iou_threshold)]] = True
        keep = np.flatnonzero(kept)
        keep = keep[np.argsort(-candidate_scores[keep], kind="stable")]
    if max_detections > 0:
        keep = keep[:max_detections]
    return Detections(candidate_boxes[keep], candidate_scores[keep], labels[keep].astype(np.int64))


# --------------------------------------------------------------------------------------------
# Back to the original image
# --------------------------------------------------------------------------------------------


def warp_boxes(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """NanoDet's ``warp_boxes``: map boxes through a 3x3 perspective matrix and clip.

    The four corners of each box are mapped (``[x, y, 1] @ matrix.T``, divided by the third
    coordinate) in float64, the axis-aligned box around them is taken, x is clipped to
    [0, width] and y to [0, height]. To bring detections back to the original image pass
    ``inv(M)`` of the preprocessing matrix (:func:`detect` does).

    Parameters
    ----------
    boxes : (K, 4) (x1, y1, x2, y2)
    matrix : (3, 3)
    width, height : clip limits (the original image's size)

    Returns
    -------
    boxes : (K, 4) in the dtype of ``boxes`` (NanoDet returns float32; the arithmetic is float64)
    """
    boxes = _float_array(boxes, "boxes", ndim=2, last=4)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise RefghostError(f"matrix must be 3x3, got shape {matrix.shape}")
    width = _int(width, "width", 0)
    height = _int(height, "height", 0)
    if boxes.shape[0] == 0:
        return boxes.copy()
    corners = boxes.astype(np.float64)[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 2)
    xy1 = np.concatenate([corners, np.ones((corners.shape[0], 1))], axis=1) @ matrix.T
    xy = (xy1[:, :2] / xy1[:, 2:3]).reshape(-1, 8)
    x, y = xy[:, 0::2], xy[:, 1::2]
    out = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out.astype(boxes.dtype)


def detect(
    output: np.ndarray,
    *,
    num_classes: int,
    reg_max: int,
    strides: Sequence[int],
    prior_offset: float,
    input_size: Sequence[int],
    warp_matrix: np.ndarray,
    original_size: Sequence[int] | Sequence[Sequence[int]],
    level_sizes: Sequence[Sequence[int]] | None = None,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
) -> list[Detections]:
    """Exported head output -> detections in original-image pixels, per image of the batch.

    :func:`decode`, then :func:`multiclass_nms`, then :func:`warp_boxes` with ``inv(M)``
    (``np.linalg.inv``, as NanoDet's ``post_process``) clipped to the original image.

    Parameters
    ----------
    output : (N, P, num_classes + 4*(reg_max+1)) export form
    num_classes, reg_max, strides, prior_offset : the head (see :func:`decode`)
    input_size : (W, H) of the network input (after padding: the tensor's size)
    warp_matrix : (3, 3) for every image, or (N, 3, 3): the preprocessing matrix M that maps
        original pixels to network-input pixels (:func:`refghost.preprocess.resize_matrix`)
    original_size : (width, height) for every image, or N such pairs
    level_sizes : L pairs (h, w); default :func:`head_level_sizes` of ``input_size``
    score_threshold, iou_threshold, max_detections : see :func:`multiclass_nms`

    Returns
    -------
    detections : N :class:`Detections`, boxes in original-image pixels
    """
    output = _float_array(output, "output", ndim=3)
    batch = output.shape[0]
    if level_sizes is None:
        level_sizes = head_level_sizes(input_size, strides)
    matrices = np.asarray(warp_matrix, dtype=np.float64)
    if matrices.shape == (3, 3):
        matrices = np.broadcast_to(matrices, (batch, 3, 3))
    if matrices.shape != (batch, 3, 3):
        raise RefghostError(f"warp_matrix must be (3, 3) or ({batch}, 3, 3), got shape {matrices.shape}")
    sizes = np.asarray(original_size, dtype=object)
    if sizes.shape == (2,):
        sizes = [original_size] * batch
    elif sizes.shape == (batch, 2):
        sizes = list(original_size)
    else:
        raise RefghostError(f"original_size must be (width, height) or {batch} such pairs, got {original_size!r}")

    scores, boxes = decode(output, num_classes, reg_max, level_sizes, strides, prior_offset, input_size)
    return detections_of_decoded(scores, boxes, matrices, sizes, score_threshold, iou_threshold, max_detections)


def detections_of_decoded(scores: np.ndarray, boxes: np.ndarray, matrices: np.ndarray, sizes,
                          score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                          iou_threshold: float = DEFAULT_IOU_THRESHOLD,
                          max_detections: int = DEFAULT_MAX_DETECTIONS) -> list[Detections]:
    """The second half of :func:`detect`: per image, :func:`multiclass_nms` of the decoded
    ``scores (N, P, C)`` and ``boxes (N, P, 4)``, then :func:`warp_boxes` with the inverse of its
    ``matrices[n]`` (N, 3, 3) clipped to ``sizes[n]`` = (width, height)."""
    results = []
    for n in range(scores.shape[0]):
        det = multiclass_nms(boxes[n], scores[n], score_threshold, iou_threshold, max_detections)
        width, height = _size(sizes[n], "original_size")
        try:
            inverse = np.linalg.inv(matrices[n])
        except np.linalg.LinAlgError:
            raise RefghostError(f"warp_matrix of image {n} is singular: {matrices[n].tolist()}") from None
        results.append(Detections(warp_boxes(det.boxes, inverse, width, height), det.scores, det.labels))
    return results
