"""A whole NanoDet detector from images to detections: prepare, network, decode, NMS, warp back.

:func:`run_detector` is what :func:`refghost.run` does with a detector's weights. Its result is a
dict of arrays, like a backbone's, so that ``--out`` and golden files store it as they are:

``output``
    (N, P, num_classes + 4*(reg_max+1)): the network's export-form output (class scores
    sigmoided, box bins raw), what NanoDet's ``tools/export_onnx.py`` gives.
``decode.scores``, ``decode.boxes``
    (N, P, C) and (N, P, 4): every prior's class scores and its box ``[x1, y1, x2, y2]`` in
    network-input pixels, before NMS (:func:`refghost.detector.decode.decode`); with
    ``intermediates`` only.
``detections.image``, ``detections.boxes``, ``detections.scores``, ``detections.labels``
    (K,), (K, 4), (K,), (K,): the detections kept by NanoDet's multiclass NMS, all images in
    one list, image by image in batch order (``detections.image`` is the row of the batch),
    boxes in original-image pixels (:func:`refghost.detector.decode.detect`).

With ``intermediates`` every layer's output is there too, by module path, in forward order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import ImageError, RefghostError
from ..forward import execute
from ..threads import single_threaded_blas
from .decode import (DEFAULT_IOU_THRESHOLD, DEFAULT_MAX_DETECTIONS, DEFAULT_SCORE_THRESHOLD, PRIOR_OFFSETS,
                     Detections, decode, detections_of_decoded)
from .graph import OUTPUT
from .spec import level_sizes

#: The keys of the kept detections in :func:`run_detector`'s result.
DETECTION_KEYS = ("detections.image", "detections.boxes", "detections.scores", "detections.labels")
#: The keys of the decoded priors (before NMS), with ``intermediates``.
DECODE_KEYS = ("decode.scores", "decode.boxes")


@dataclass(frozen=True)
class NmsSettings:
    """NanoDet's post-processing thresholds (defaults: its ``get_bboxes``; the C++ demos use
    score 0.4 and IoU 0.5)."""

    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    max_detections: int = DEFAULT_MAX_DETECTIONS


@dataclass(frozen=True)
class PreparedBatch:
    """The network input of a batch and how each image got there."""

    x: np.ndarray  # (N, 3, H, W) in the compute dtype
    matrices: np.ndarray  # (N, 3, 3) float64: original pixels -> network-input pixels
    original_sizes: tuple[tuple[int, int], ...]  # (width, height) of each original image


def prepare_batch(items: list, weights, dtype, warp_kernel: str | None = None, *, progress=None) -> PreparedBatch:
    """The network input of ``items`` (image paths, uint8 (H, W, 3) arrays in the weights'
    channel order, or float network inputs (N, 3, H, W) / (3, H, W) used as they are, with the
    identity matrix), each prepared as the weights' preprocessing says (stretch, or NanoDet's
    keep_ratio resize), stacked as NanoDet's ``stack_batch_img`` does: every input zero-padded
    at the bottom and right to the largest height and width of the batch."""
    from ..preprocess import DEFAULT_WARP_KERNEL, prepare_image_and_matrix, read_image
    from ..runner import _prepare_one

    pre = weights.preprocessing
    parts, matrices, sizes = [], [], []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)) or (isinstance(item, np.ndarray) and item.dtype == np.uint8):
            image = read_image(item, pre.channel_order) if isinstance(item, (str, os.PathLike)) else item
            part, matrix = prepare_image_and_matrix(
                image, mean=pre.mean, std=pre.std, channel_order=pre.channel_order, input_size=pre.input_size,
                warp_kernel=DEFAULT_WARP_KERNEL if warp_kernel is None else warp_kernel, keep_ratio=pre.keep_ratio)
            parts.append(part.astype(dtype))
            matrices.append(matrix)
            sizes.append((image.shape[1], image.shape[0]))  # (width, height) as read: EXIF orientation applied
        else:
            part = _prepare_one(item, weights, dtype)  # a float network input, checked
            parts.append(part)
            matrices += [np.eye(3)] * part.shape[0]
            sizes += [(part.shape[3], part.shape[2])] * part.shape[0]
        if progress is not None:
            progress(i + 1, len(items))
    height = max(p.shape[2] for p in parts)
    width = max(p.shape[3] for p in parts)
    if any(p.shape[2:] != (height, width) for p in parts) and any(
            isinstance(item, np.ndarray) and item.dtype.kind == "f" for item in items):
        raise ImageError(f"the batch's inputs have different sizes ({sorted({p.shape[2:] for p in parts})}); a float "
                         f"network input is used as it is, so give inputs of one size")
    x = np.zeros((sum(p.shape[0] for p in parts), 3, height, width), dtype=dtype)
    row = 0
    for p in parts:
        x[row:row + p.shape[0], :, :p.shape[2], :p.shape[3]] = p
        row += p.shape[0]
    return PreparedBatch(x, np.stack(matrices), tuple(sizes))


def head_settings(config) -> dict:
    """The decode settings of a detector config: what :func:`refghost.detector.decode.detect`
    needs besides the tensors."""
    return {"num_classes": config.num_classes, "reg_max": config.reg_max, "strides": config.strides,
            "prior_offset": PRIOR_OFFSETS[config.head]}


def postprocess(output: np.ndarray, config, batch: PreparedBatch, nms: NmsSettings = NmsSettings(), *,
                decoded: bool = False) -> dict[str, np.ndarray]:
    """The detections (and with ``decoded`` the decoded priors) of the export-form ``output``
    (N, P, C + 4*(reg_max+1)) of ``batch``, as :data:`DETECTION_KEYS` / :data:`DECODE_KEYS` arrays."""
    n, _, height, width = batch.x.shape
    levels = [(level.height, level.width) for level in level_sizes(config, width, height)]
    settings = head_settings(config)
    scores, boxes = decode(output, settings["num_classes"], settings["reg_max"], levels, settings["strides"],
                           settings["prior_offset"], (width, height))
    result = {"decode.scores": scores, "decode.boxes": boxes} if decoded else {}
    per_image = detections_of_decoded(scores, boxes, batch.matrices, batch.original_sizes, nms.score_threshold,
                                      nms.iou_threshold, nms.max_detections)
    result.update(flatten_detections(per_image, output.dtype))
    return result


def flatten_detections(per_image: list[Detections], dtype) -> dict[str, np.ndarray]:
    """Per-image detections as the four :data:`DETECTION_KEYS` arrays."""
    return {
        "detections.image": np.concatenate([np.full(len(d.scores), i, dtype=np.int64)
                                            for i, d in enumerate(per_image)]),
        "detections.boxes": np.concatenate([d.boxes.reshape(-1, 4) for d in per_image]).astype(dtype),
        "detections.scores": np.concatenate([d.scores for d in per_image]).astype(dtype),
        "detections.labels": np.concatenate([d.labels for d in per_image]).astype(np.int64),
    }


def run_detector(batch: PreparedBatch, weights, *, dtype, intermediates=False, impl="kernels",
                 nms: NmsSettings = NmsSettings()) -> dict[str, np.ndarray]:
    """The network on ``batch.x`` (the interpreter: the engine does not run detectors yet), then
    :func:`postprocess`. Returns the dict the module docstring describes."""
    if impl not in ("kernels", "plain"):
        raise RefghostError(f"a detector runs on the interpreter (impl 'kernels' or 'plain'), got {impl!r}")
    with single_threaded_blas():
        values = execute(weights.graph, weights.params(dtype), batch.x, intermediates=intermediates, impl=impl)
    values.update(postprocess(values[OUTPUT], weights.config, batch, nms, decoded=intermediates))
    return values
