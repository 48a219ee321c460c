"""An independent PyTorch implementation of NanoDet's post-processing, for cross-checking.

Written from NanoDet's sources (``nanodet/model/head/nanodet_plus_head.py`` ``get_bboxes`` and
``get_single_level_center_priors``, ``gfl_head.py`` ``Integral`` and
``get_single_level_center_point``, ``nanodet/util/box_transform.py`` ``distance2bbox``,
``nanodet/model/module/nms.py``) with torch operations as NanoDet uses them, and torchvision's
CPU ``nms`` kernel (``torchvision/csrc/ops/cpu/nms_kernel.cpp``) re-written with torch tensors,
since torchvision is not a dependency. The one deliberate difference: the NMS sorts with
``stable=True`` (torchvision's sort is unstable; see ``refghost.detector.decode.nms``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def level_sizes(input_height: int, input_width: int, strides):
    """(h, w) per level exactly as ``get_bboxes`` writes it (the width is a float there)."""
    return [(math.ceil(input_height / s), math.ceil(input_width) / s) for s in strides]


def priors(sizes, strides, offset: float, dtype) -> torch.Tensor:
    """(P, 4) rows (x, y, stride, stride), like ``get_single_level_center_priors`` (offset 0) and
    ``get_single_level_center_point`` (offset 0.5)."""
    levels = []
    for (h, w), stride in zip(sizes, strides):
        if offset:  # GFLHead.get_single_level_center_point
            x_range = (torch.arange(w, dtype=dtype) + offset) * stride
            y_range = (torch.arange(h, dtype=dtype) + offset) * stride
        else:  # NanoDetPlusHead.get_single_level_center_priors
            x_range = torch.arange(w, dtype=dtype) * stride
            y_range = torch.arange(h, dtype=dtype) * stride
        y, x = torch.meshgrid(y_range, x_range, indexing="ij")
        x, y = x.flatten(), y.flatten()
        s = x.new_full((x.shape[0],), stride)
        levels.append(torch.stack([x, y, s, s], dim=-1))
    return torch.cat(levels, dim=0)


def integral(reg: torch.Tensor, reg_max: int) -> torch.Tensor:
    shape = reg.size()
    x = F.softmax(reg.reshape(*shape[:-1], 4, reg_max + 1), dim=-1)
    project = torch.linspace(0, reg_max, reg_max + 1).type_as(x)
    return F.linear(x, project).reshape(*shape[:-1], 4)


def distance2bbox(points, distance, max_shape):
    x1 = (points[..., 0] - distance[..., 0]).clamp(min=0, max=max_shape[1])
    y1 = (points[..., 1] - distance[..., 1]).clamp(min=0, max=max_shape[0])
    x2 = (points[..., 0] + distance[..., 2]).clamp(min=0, max=max_shape[1])
    y2 = (points[..., 1] + distance[..., 3]).clamp(min=0, max=max_shape[0])
    return torch.stack([x1, y1, x2, y2], -1)


def decode(output: torch.Tensor, num_classes: int, reg_max: int, strides, offset: float, input_hw):
    """Export-form output (N, P, C + 4(R+1)) -> scores (N, P, C), boxes (N, P, 4)."""
    sizes = level_sizes(input_hw[0], input_hw[1], strides)
    center_priors = priors(sizes, strides, offset, output.dtype)
    scores = output[..., :num_classes]
    distances = integral(output[..., num_classes:], reg_max) * center_priors[..., 2, None]
    return scores, distance2bbox(center_priors[..., :2], distances, max_shape=input_hw)


def nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's CPU nms kernel; the IoU is compared in double, as C++ promotes it."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    x1, y1, x2, y2 = (dets[:, k].contiguous() for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = scores.sort(dim=0, descending=True, stable=True)[1]
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    zero = torch.zeros((), dtype=dets.dtype)
    keep = []
    for a in range(len(order)):
        i = int(order[a])
        if suppressed[i]:
            continue
        keep.append(i)
        # the inner loop over j of the C++ kernel, as one vector operation (each j is independent)
        later = order[a + 1:]
        w = torch.maximum(zero, torch.minimum(x2[i], x2[later]) - torch.maximum(x1[i], x1[later]))
        h = torch.maximum(zero, torch.minimum(y2[i], y2[later]) - torch.maximum(y1[i], y1[later]))
        inter = w * h
        ovr = inter / (areas[i] + areas[later] - inter)
        suppressed[later[ovr.double() > iou_threshold]] = True
    return torch.tensor(keep, dtype=torch.long)


def batched_nms(boxes, scores, idxs, iou_threshold: float, split_thr: int = 10000):
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    boxes_for_nms = boxes + offsets[:, None]
    if len(boxes_for_nms) < split_thr:
        return nms(boxes_for_nms, scores, iou_threshold)
    total_mask = scores.new_zeros(scores.size(), dtype=torch.bool)
    for label in torch.unique(idxs):
        mask = (idxs == label).nonzero(as_tuple=False).view(-1)
        total_mask[mask[nms(boxes_for_nms[mask], scores[mask], iou_threshold)]] = True
    keep = total_mask.nonzero(as_tuple=False).view(-1)
    return keep[scores[keep].sort(descending=True, stable=True)[1]]


def multiclass_nms(bboxes, scores, score_thr, iou_threshold, max_num, split_thr: int = 10000):
    """One image: boxes (P, 4), scores (P, C) -> kept boxes (K, 4), scores (K,), labels (K,)."""
    num_classes = scores.shape[1]
    expanded = bboxes[:, None].expand(scores.size(0), num_classes, 4)
    valid_mask = scores > score_thr
    boxes = torch.masked_select(expanded, torch.stack([valid_mask] * 4, -1)).view(-1, 4)
    kept_scores = torch.masked_select(scores, valid_mask)
    labels = valid_mask.nonzero(as_tuple=False)[:, 1]
    if boxes.numel() == 0:
        return boxes.new_zeros((0, 4)), scores.new_zeros((0,)), labels.new_zeros((0,))
    keep = batched_nms(boxes, kept_scores, labels, iou_threshold, split_thr)
    if max_num > 0:
        keep = keep[:max_num]
    return boxes[keep], kept_scores[keep], labels[keep]
