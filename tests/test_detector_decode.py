"""NanoDet's post-processing (refghost.detector.decode) against an independent PyTorch version.

``torch_nanodet_post.py`` re-writes NanoDet's ``get_bboxes`` / ``multiclass_nms`` and
torchvision's NMS kernel with torch operations. Random export-form outputs are built so that
dozens of (prior, class) pairs pass the score threshold in clusters of neighbouring priors, whose
boxes overlap: NMS really suppresses.

Tolerance of the decoded boxes (:func:`_box_tolerance`). A coordinate is ``c +- s*d`` with
``d = sum_k k*p_k``, ``p = softmax`` over R+1 bins, ``s`` the stride, ``c`` the prior centre.
With unit roundoff u of the dtype: each ``p_k`` is off by at most about (R+4)u relative (exp,
a sum of R+1 terms, a division), so ``d <= R`` is off by at most (R+4)u*R from the
probabilities and (R+1)u*R from its own sum of R+1 products; the stride product adds u*s*R and
the final ``c +- s*d`` and clamp u*max(W, H)+... Altogether ``|error| <= u*(s_max*R*(2R+8) +
2*max(W, H))``, the bound asserted for refghost (float32 or float64) against torch in float64.
Kept sets are compared exactly: either both sides receive the same boxes (then NMS is the same
arithmetic in the same dtype and must give the same bits), or the test data is checked to hold
no IoU within 1e-4 of the threshold, far above the decoding error, so no decision can flip.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_nanodet_post as tnp
from refghost.detector import decode as dec
from refghost.detector import spec
from refghost.errors import RefghostError

# (dtype, num_classes, reg_max, strides, prior offset, input (W, H))
CASES = [
    (np.float32, 80, 7, (8, 16, 32, 64), 0.0, (320, 320)),
    (np.float64, 80, 7, (8, 16, 32, 64), 0.0, (416, 416)),
    (np.float32, 3, 10, (8, 16, 32), 0.5, (416, 320)),
    (np.float64, 3, 7, (8, 16, 32), 0.5, (320, 416)),
    (np.float32, 80, 10, (8, 16, 32), 0.5, (416, 416)),
    (np.float32, 3, 7, (8, 16, 32, 64), 0.0, (352, 224)),
]
CASE_IDS = [f"{np.dtype(c[0]).name}-C{c[1]}-R{c[2]}-s{len(c[3])}-o{c[4]}-{c[5][0]}x{c[5][1]}" for c in CASES]


def _export_output(rng, batch, num_classes, reg_max, strides, input_size, dtype):
    """A random export-form output: background scores below 0.05, and clusters of neighbouring
    priors (5x5 cells of the finest and of the third level) scoring 0.06..0.95 in one or two
    classes; regression logits N(0, 2)."""
    sizes = dec.head_level_sizes(input_size, strides)
    priors = sum(h * w for h, w in sizes)
    out = np.empty((batch, priors, num_classes + 4 * (reg_max + 1)))
    out[..., :num_classes] = rng.uniform(0.0, 0.045, (batch, priors, num_classes))
    out[..., num_classes:] = rng.normal(0.0, 2.0, (batch, priors, 4 * (reg_max + 1)))
    starts = np.cumsum([0] + [h * w for h, w in sizes])
    for n in range(batch):
        for level, clusters in ((0, 3), (2, 1)):
            h, w = sizes[level]
            for _ in range(clusters):
                i0, j0 = rng.integers(0, max(h - 5, 1)), rng.integers(0, max(w - 5, 1))
                classes = rng.choice(num_classes, size=min(2, num_classes), replace=False)
                for i in range(i0, min(i0 + 5, h)):
                    for j in range(j0, min(j0 + 5, w)):
                        out[n, starts[level] + i * w + j, classes] = rng.uniform(0.06, 0.95, len(classes))
    return out.astype(dtype)


def _box_tolerance(dtype, reg_max, strides, input_size) -> float:
    u = np.finfo(dtype).eps / 2
    return u * (max(strides) * reg_max * (2 * reg_max + 8) + 2 * max(input_size))


def _torch_decode(output: np.ndarray, num_classes, reg_max, strides, offset, input_size):
    w, h = input_size
    scores, boxes = tnp.decode(torch.from_numpy(output), num_classes, reg_max, strides, offset, (h, w))
    return scores.numpy(), boxes.numpy()


def _min_iou_margin(boxes: np.ndarray, scores: np.ndarray, threshold: float, score_threshold: float) -> float:
    """Smallest |IoU - threshold| over pairs of candidates of the same class (float64)."""
    prior, label = np.nonzero(scores > score_threshold)
    b = boxes[prior].astype(np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iw = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (area[:, None] + area[None, :] - inter)
    same = (label[:, None] == label[None, :]) & ~np.eye(len(label), dtype=bool) & np.isfinite(iou)
    return float(np.min(np.abs(iou[same] - threshold))) if same.any() else np.inf


# --------------------------------------------------------------------------------------------
# Small hand-computed cases
# --------------------------------------------------------------------------------------------


def test_softmax_hand_values_and_no_overflow():
    np.testing.assert_allclose(dec.softmax(np.array([0.0, np.log(3.0)])), [0.25, 0.75], rtol=1e-15)
    big = dec.softmax(np.array([[1000.0, 1000.0, 999.0]], dtype=np.float32))  # exp(1000) overflows
    q = np.exp(-1.0)
    np.testing.assert_allclose(big, [[1 / (2 + q), 1 / (2 + q), q / (2 + q)]], rtol=1e-6)
    assert big.dtype == np.float32
    column = dec.softmax(np.array([[1.0], [2.0]]), axis=0).ravel()
    np.testing.assert_allclose(column, [1 / (1 + np.e), np.e / (1 + np.e)])


def test_integral_hand_values_in_side_order():
    reg_max = 3
    low = -1e4
    logits = np.full((4, reg_max + 1), low)
    logits[0, 2] = 0.0  # left: all mass on bin 2
    logits[1] = 0.0  # top: uniform over 0..3 -> 1.5
    logits[2, [1, 3]] = 0.0  # right: half on 1, half on 3 -> 2
    logits[3, 0] = 5.0  # bottom: all mass on bin 0
    d = dec.integral(logits.reshape(1, -1), reg_max)
    np.testing.assert_allclose(d, [[2.0, 1.5, 2.0, 0.0]], rtol=1e-15, atol=1e-15)
    with pytest.raises(RefghostError, match="4\\*\\(reg_max\\+1\\)"):
        dec.integral(np.zeros((1, 15)), reg_max)


def test_center_priors_hand_values_both_offsets():
    centers, strides = dec.center_priors([(2, 3), (1, 2)], (8, 16), 0.0)
    np.testing.assert_array_equal(centers[:, 0], [0, 8, 16, 0, 8, 16, 0, 16])
    np.testing.assert_array_equal(centers[:, 1], [0, 0, 0, 8, 8, 8, 0, 0])
    np.testing.assert_array_equal(strides, [8] * 6 + [16] * 2)
    centers, _ = dec.center_priors([(2, 3), (1, 2)], (8, 16), dec.PRIOR_OFFSETS["nanodet"])
    np.testing.assert_array_equal(centers[:, 0], [4, 12, 20, 4, 12, 20, 8, 24])
    np.testing.assert_array_equal(centers[:, 1], [4, 4, 4, 12, 12, 12, 8, 8])
    assert set(dec.PRIOR_OFFSETS) == set(spec.HEADS)
    assert dec.PRIOR_OFFSETS["nanodet_plus"] == 0.0


def test_head_level_sizes_match_nanodet_counts():
    assert dec.head_level_sizes((416, 416), (8, 16, 32, 64)) == ((52, 52), (26, 26), (13, 13), (7, 7))
    assert sum(h * w for h, w in dec.head_level_sizes((416, 416), (8, 16, 32, 64))) == 3598
    assert sum(h * w for h, w in dec.head_level_sizes((320, 320), (8, 16, 32, 64))) == 2125
    assert dec.head_level_sizes((352, 224), (8, 64)) == ((28, 44), (4, 6))
    for size in [(416, 320), (352, 224)]:
        ref = tnp.level_sizes(size[1], size[0], (8, 16, 32, 64))
        assert [(h, len(torch.arange(w))) for h, w in ref] == list(dec.head_level_sizes(size, (8, 16, 32, 64)))


def test_distance2bbox_clamps_to_input():
    boxes = dec.distance2bbox(np.array([[10.0, 10.0]]), np.array([[20.0, 5.0, 400.0, 3.0]]), (320, 240))
    np.testing.assert_array_equal(boxes, [[0.0, 5.0, 320.0, 13.0]])
    points = np.array([[300.0, 230.0]], np.float32)
    boxes = dec.distance2bbox(points, np.array([[1.0, 2.0, 30.0, 30.0]], np.float32), (320, 240))
    np.testing.assert_array_equal(boxes, [[299.0, 228.0, 320.0, 240.0]])
    assert boxes.dtype == np.float32


# --------------------------------------------------------------------------------------------
# Against the PyTorch implementation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_matches_torch(case):
    dtype, num_classes, reg_max, strides, offset, input_size = case
    rng = np.random.default_rng(sum(input_size) + num_classes + reg_max)
    output = _export_output(rng, 2, num_classes, reg_max, strides, input_size, dtype)
    sizes = dec.head_level_sizes(input_size, strides)
    scores, boxes = dec.decode(output, num_classes, reg_max, sizes, strides, offset, input_size)
    assert scores.dtype == boxes.dtype == dtype and boxes.shape == output.shape[:2] + (4,)
    np.testing.assert_array_equal(scores, output[..., :num_classes])
    _, oracle = _torch_decode(output.astype(np.float64), num_classes, reg_max, strides, offset, input_size)
    tol = _box_tolerance(dtype, reg_max, strides, input_size)
    err = np.max(np.abs(boxes.astype(np.float64) - oracle))
    assert err <= tol, f"max box error {err} above the bound {tol}"
    # the bound is not vacuous: the boxes spread over the input and the priors' offsets matter
    assert np.ptp(oracle[..., 0]) > input_size[0] / 2
    other_offset = 0.5 - offset
    _, shifted = dec.decode(output, num_classes, reg_max, sizes, strides, other_offset, input_size)
    assert np.max(np.abs(shifted - boxes)) >= 3.5


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_multiclass_nms_matches_torch_exactly(case):
    dtype, num_classes, reg_max, strides, offset, input_size = case
    rng = np.random.default_rng(7 * sum(input_size) + num_classes)
    output = _export_output(rng, 1, num_classes, reg_max, strides, input_size, dtype)
    sizes = dec.head_level_sizes(input_size, strides)
    scores, boxes = dec.decode(output, num_classes, reg_max, sizes, strides, offset, input_size)
    candidates = int(np.sum(scores[0] > dtype(dec.DEFAULT_SCORE_THRESHOLD)))
    for max_det in (dec.DEFAULT_MAX_DETECTIONS, 7, 0):
        got = dec.multiclass_nms(boxes[0], scores[0], max_detections=max_det)
        ref_boxes, ref_scores, ref_labels = tnp.multiclass_nms(
            torch.from_numpy(boxes[0]), torch.from_numpy(scores[0]), dec.DEFAULT_SCORE_THRESHOLD,
            dec.DEFAULT_IOU_THRESHOLD, max_det)
        np.testing.assert_array_equal(got.labels, ref_labels.numpy())
        np.testing.assert_array_equal(got.scores, ref_scores.numpy())
        np.testing.assert_array_equal(got.boxes, ref_boxes.numpy())
        assert got.boxes.dtype == got.scores.dtype == dtype and got.labels.dtype == np.int64
        if max_det == 0:
            kept = len(got.labels)
            assert candidates >= 30 and kept <= candidates - 10, (candidates, kept)  # NMS suppresses
            assert np.all(np.diff(got.scores) <= 0)
        if max_det == 7:
            assert len(got.labels) == 7
    full = dec.multiclass_nms(boxes[0], scores[0], max_detections=0)
    # the split path (one NMS per class, then a sort) gives the same detections, as in torch
    split = dec.multiclass_nms(boxes[0], scores[0], max_detections=0, split_threshold=1)
    ref_split = tnp.multiclass_nms(torch.from_numpy(boxes[0]), torch.from_numpy(scores[0]), 0.05, 0.6, 0, split_thr=1)
    for a, b, c in zip(split, full, ref_split):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c.numpy())


@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_decode_and_nms_end_to_end_match_torch(case):
    """Each side decodes on its own; the kept detections agree (labels and scores exactly, boxes
    within the decoding bound), since no IoU of the data lies near the threshold."""
    dtype, num_classes, reg_max, strides, offset, input_size = case
    rng = np.random.default_rng(11 * sum(input_size) + reg_max)
    output = _export_output(rng, 1, num_classes, reg_max, strides, input_size, dtype)
    sizes = dec.head_level_sizes(input_size, strides)
    scores, boxes = dec.decode(output, num_classes, reg_max, sizes, strides, offset, input_size)
    t_scores, t_boxes = _torch_decode(output, num_classes, reg_max, strides, offset, input_size)
    assert _min_iou_margin(t_boxes[0], t_scores[0], 0.6, 0.05) > 1e-4
    got = dec.multiclass_nms(boxes[0], scores[0])
    ref = tnp.multiclass_nms(torch.from_numpy(t_boxes[0]), torch.from_numpy(t_scores[0]), 0.05, 0.6, 100)
    np.testing.assert_array_equal(got.labels, ref[2].numpy())
    np.testing.assert_array_equal(got.scores, ref[1].numpy())
    tol = 2 * _box_tolerance(dtype, reg_max, strides, input_size)
    assert np.max(np.abs(got.boxes.astype(np.float64) - ref[0].numpy())) <= tol


# --------------------------------------------------------------------------------------------
# NMS details
# --------------------------------------------------------------------------------------------


def _one_class(boxes, scores, dtype):
    return np.asarray(boxes, dtype), np.asarray(scores, dtype)[:, None]


def test_nms_many_equal_scores_keep_lowest_index():
    """40 mutually overlapping boxes scoring 0.5 or 0.7: the first 0.7 survives. An unstable
    sort (more elements than an insertion-sort cut-off, two distinct keys) would reorder ties."""
    rng = np.random.default_rng(8)
    boxes = (np.array([[100.0, 100.0, 150.0, 150.0]]) + rng.uniform(-1, 1, (40, 4))).astype(np.float32)
    for seed in range(100):
        scores = np.random.default_rng(seed).choice(np.float32([0.5, 0.7]), (40, 1))
        got = dec.multiclass_nms(boxes, scores)
        first = int(np.flatnonzero(scores[:, 0] == np.float32(0.7))[0])
        np.testing.assert_array_equal(got.boxes, boxes[[first]])
        ref = tnp.multiclass_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.05, 0.6, 100)
        np.testing.assert_array_equal(got.boxes, ref[0].numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nms_equal_scores_keep_lowest_index(dtype):
    boxes, scores = _one_class([[1, 0, 11, 10], [0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]],
                               [0.5, 0.5, 0.5, 0.5], dtype)
    got = dec.multiclass_nms(boxes, scores)
    np.testing.assert_array_equal(got.boxes, boxes[[0, 3]])  # IoU(0, 1) = 90/110 > 0.6
    ref = tnp.multiclass_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.05, 0.6, 100)
    np.testing.assert_array_equal(got.boxes, ref[0].numpy())


def test_nms_threshold_compared_in_double_like_torchvision():
    """IoU 3/5: in float32 it rounds to 0.6000000238 > 0.6 (suppressed); in float64 it equals
    0.6 (kept). torchvision compares the scalar_t IoU with the double threshold."""
    for dtype, kept in ((np.float32, 1), (np.float64, 2)):
        boxes, scores = _one_class([[0, 0, 4, 1], [1, 0, 5, 1]], [0.9, 0.8], dtype)
        got = dec.multiclass_nms(boxes, scores)
        ref = tnp.multiclass_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.05, 0.6, 100)
        assert len(got.labels) == len(ref[2]) == kept, dtype


def test_nms_classes_never_suppress_each_other_and_zero_area_boxes_survive():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5]], np.float32)
    scores = np.array([[0.9, 0.8], [0.7, 0.0], [0.6, 0.0], [0.5, 0.0]], np.float32)
    got = dec.multiclass_nms(boxes, scores)
    # box 0 in both classes; box 1 suppressed by box 0 (class 0); zero-area boxes: IoU 0/0 = NaN
    np.testing.assert_array_equal(got.labels, [0, 1, 0, 0])
    np.testing.assert_array_equal(got.scores, np.float32([0.9, 0.8, 0.6, 0.5]))
    ref = tnp.multiclass_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.05, 0.6, 100)
    np.testing.assert_array_equal(got.labels, ref[2].numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_score_threshold_is_strict_and_empty_results(dtype):
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype)
    scores = np.array([[dtype(0.05), 0.01], [0.0, dtype(0.05)]], dtype)
    got = dec.multiclass_nms(boxes, scores)
    assert got.boxes.shape == (0, 4) and got.scores.shape == (0,) and got.labels.shape == (0,)
    assert got.boxes.dtype == dtype and got.labels.dtype == np.int64
    ref = tnp.multiclass_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.05, 0.6, 100)
    assert len(ref[2]) == 0
    scores[1, 1] = np.nextafter(dtype(0.05), dtype(1))
    assert len(dec.multiclass_nms(boxes, scores).labels) == 1
    output = np.zeros((2, 5, 3 + 4 * 8), dtype)
    dets = dec.detect(output, num_classes=3, reg_max=7, strides=(8, 16), prior_offset=0.0, input_size=(16, 16),
                      level_sizes=[(2, 2), (1, 1)], warp_matrix=np.eye(3), original_size=(16, 16))
    assert len(dets) == 2 and all(d.boxes.shape == (0, 4) and d.labels.shape == (0,) for d in dets)


def test_max_detections_truncates_best_first():
    rng = np.random.default_rng(3)
    corners = np.stack(np.meshgrid(np.arange(8) * 20.0, np.arange(5) * 20.0), -1).reshape(-1, 2)
    boxes = np.concatenate([corners, corners + 15], axis=1).astype(np.float32)  # 40 disjoint boxes
    scores = rng.uniform(0.1, 1.0, (40, 2)).astype(np.float32)
    full = dec.multiclass_nms(boxes, scores, max_detections=-1)
    assert len(full.labels) == 80
    top = dec.multiclass_nms(boxes, scores, max_detections=dec.DEFAULT_MAX_DETECTIONS)
    assert len(top.labels) == 80
    five = dec.multiclass_nms(boxes, scores, max_detections=5)
    np.testing.assert_array_equal(five.scores, np.sort(scores.ravel())[::-1][:5])
    for a, b in zip(five, full):
        np.testing.assert_array_equal(a, b[:5])


# --------------------------------------------------------------------------------------------
# Back to the original image
# --------------------------------------------------------------------------------------------


def test_warp_boxes_hand_values_and_round_trip():
    m = np.array([[0.5, 0.0, 10.0], [0.0, 0.25, 4.0], [0.0, 0.0, 1.0]])
    boxes = np.array([[0.0, 16.0, 100.0, 80.0], [400.0, 0.0, 700.0, 900.0]], np.float32)
    fwd = dec.warp_boxes(boxes, m, 320, 200)
    np.testing.assert_array_equal(fwd, np.float32([[10, 8, 60, 24], [210, 4, 320, 200]]))
    assert fwd.dtype == np.float32
    inside = np.array([[10.0, 20.0, 200.0, 150.0], [0.0, 0.0, 640.0, 480.0]])
    back = dec.warp_boxes(dec.warp_boxes(inside, m, 10_000, 10_000), np.linalg.inv(m), 640, 480)
    np.testing.assert_allclose(back, inside, rtol=0, atol=1e-12)
    empty = dec.warp_boxes(np.zeros((0, 4), np.float32), m, 10, 10)
    assert empty.shape == (0, 4)


def test_detect_chains_decode_nms_and_inverse_warp():
    num_classes, reg_max, strides, input_size = 3, 7, (8, 16, 32), (320, 256)
    rng = np.random.default_rng(5)
    output = _export_output(rng, 2, num_classes, reg_max, strides, input_size, np.float32)
    matrices = np.stack([np.diag([0.5, 0.5, 1.0]), np.array([[0.4, 0, 8.0], [0, 0.4, 0.0], [0, 0, 1]])])
    sizes = [(640, 512), (780, 640)]
    dets = dec.detect(output, num_classes=num_classes, reg_max=reg_max, strides=strides, prior_offset=0.0,
                      input_size=input_size, warp_matrix=matrices, original_size=sizes)
    scores, boxes = dec.decode(output, num_classes, reg_max, dec.head_level_sizes(input_size, strides), strides,
                               0.0, input_size)
    for n in range(2):
        plain = dec.multiclass_nms(boxes[n], scores[n])
        assert len(plain.labels) > 5
        np.testing.assert_array_equal(dets[n].labels, plain.labels)
        np.testing.assert_array_equal(dets[n].scores, plain.scores)
        expected = dec.warp_boxes(plain.boxes, np.linalg.inv(matrices[n]), *sizes[n])
        np.testing.assert_array_equal(dets[n].boxes, expected)
    # network-input boxes scaled by 2 for the first image (within float32 of the input box)
    np.testing.assert_allclose(dets[0].boxes, dec.multiclass_nms(boxes[0], scores[0]).boxes * 2, rtol=1e-6)


def test_bad_inputs_raise_refghost_error():
    output = np.zeros((1, 5, 3 + 32), np.float32)
    with pytest.raises(RefghostError, match="channels"):
        dec.decode(output, 4, 7, [(2, 2), (1, 1)], (8, 16), 0.0, (16, 16))
    with pytest.raises(RefghostError, match="priors"):
        dec.decode(output, 3, 7, [(2, 2)], (8,), 0.0, (16, 16))
    with pytest.raises(RefghostError, match="float32 or float64"):
        dec.decode(output.astype(np.float16), 3, 7, [(2, 2), (1, 1)], (8, 16), 0.0, (16, 16))
    with pytest.raises(RefghostError, match="warp_matrix"):
        dec.detect(output, num_classes=3, reg_max=7, strides=(8, 16), prior_offset=0.0, input_size=(16, 16),
                   level_sizes=[(2, 2), (1, 1)], warp_matrix=np.eye(2), original_size=(16, 16))
    with pytest.raises(RefghostError, match="different numbers"):
        dec.multiclass_nms(np.zeros((3, 4)), np.zeros((2, 1)))


# --------------------------------------------------------------------------------------------
# keep_ratio preprocessing (NanoDet's ShapeTransform + stack_batch_img) against OpenCV
# --------------------------------------------------------------------------------------------

import cv2  # noqa: E402  (the test environment has OpenCV; refghost itself never imports it)

from refghost import preprocess  # noqa: E402
from test_preprocess import _cv2_uses_fma  # noqa: E402

# (src_w, src_h, input (w, h)): sub-pixel translations on x or y, translations of a few 1e-14
# from rounding (both signs, both axes), none, down- and upscales.
KEEP_RATIO_CASES = [
    (333, 250, (320, 320)), (250, 333, (320, 320)), (905, 675, (320, 320)), (640, 427, (416, 416)),
    (97, 61, (320, 320)), (100, 276, (320, 320)), (100, 144, (320, 320)), (149, 111, (320, 320)),
    (170, 166, (416, 416)), (640, 480, (320, 320)), (61, 97, (416, 320)), (107, 155, (320, 320)),
    (107, 276, (320, 320)), (143, 188, (320, 320)), (308, 253, (320, 320)), (308, 151, (320, 320)),
]
# cv2 switches -> which OpenCV code runs (see tests/test_preprocess.py)
CV2_SETTINGS = ("default", "ipp_off", "optimizations_off")


def _nanodet_minimum_dst_shape(src_w, src_h, dst_w, dst_h, divisible=0):
    """get_minimum_dst_shape, transcribed from nanodet/data/transform/warp.py."""
    ratio = dst_h / src_h if src_w / src_h < dst_w / dst_h else dst_w / src_w
    dst_w, dst_h = int(ratio * src_w), int(ratio * src_h)
    if divisible and divisible > 0:
        dst_w = max(divisible, int((dst_w + divisible - 1) // divisible * divisible))
        dst_h = max(divisible, int((dst_h + divisible - 1) // divisible * divisible))
    return dst_w, dst_h


def _nanodet_val_matrix(width, height, dst_shape, keep_ratio):
    """ShapeTransform.__call__ at validation: every random factor is the identity, translate 0."""
    c = np.eye(3)
    c[0, 2], c[1, 2] = -width / 2, -height / 2
    t = np.eye(3)
    t[0, 2], t[1, 2] = 0.5 * width, 0.5 * height
    m = t @ c
    if keep_ratio:
        dst_shape = _nanodet_minimum_dst_shape(width, height, *dst_shape)
    r_w, r_h = width, height
    d_w, d_h = dst_shape
    rs = np.eye(3)
    if keep_ratio:
        c2 = np.eye(3)
        c2[0, 2], c2[1, 2] = -r_w / 2, -r_h / 2
        ratio = d_h / r_h if r_w / r_h < d_w / d_h else d_w / r_w
        rs[0, 0] *= ratio
        rs[1, 1] *= ratio
        t2 = np.eye(3)
        t2[0, 2], t2[1, 2] = 0.5 * d_w, 0.5 * d_h
        resize = t2 @ rs @ c2
    else:
        rs[0, 0] *= d_w / r_w
        rs[1, 1] *= d_h / r_h
        resize = rs
    return resize @ m, dst_shape


def _set_cv2(setting):
    cv2.setUseOptimized(True)
    cv2.ipp.setUseIPP(True)
    if setting == "ipp_off":
        cv2.ipp.setUseIPP(False)
    elif setting == "optimizations_off":
        cv2.setUseOptimized(False)
    return preprocess.kernel_for_opencv(cv2.__version__, fma=_cv2_uses_fma(), ipp=cv2.ipp.useIPP())


@pytest.fixture
def restore_cv2():
    was_optimized, was_ipp = cv2.useOptimized(), cv2.ipp.useIPP()
    yield
    cv2.setUseOptimized(was_optimized)
    cv2.ipp.setUseIPP(was_ipp)


def test_minimum_dst_shape_matches_nanodet():
    assert preprocess.minimum_dst_shape(333, 250, 320, 320) == (320, 240)
    assert preprocess.minimum_dst_shape(640, 427, 416, 416) == (416, 277)
    assert preprocess.minimum_dst_shape(640, 427, 416, 416, divisible=32) == (416, 288)
    rng = np.random.default_rng(0)
    for _ in range(300):
        sw, sh, dw, dh = (int(v) for v in rng.integers(1, 2000, 4))
        divisible = int(rng.choice([0, 0, 32, 7]))
        expected = _nanodet_minimum_dst_shape(sw, sh, dw, dh, divisible)
        if min(expected) < 1:
            with pytest.raises(RefghostError, match="empty side"):
                preprocess.minimum_dst_shape(sw, sh, dw, dh, divisible)
        else:
            assert preprocess.minimum_dst_shape(sw, sh, dw, dh, divisible) == expected


@pytest.mark.parametrize("keep_ratio", [True, False])
def test_resize_matrix_matches_nanodet_shape_transform(keep_ratio):
    """Against NanoDet's matrix product; each entry has one non-trivial rounding whatever order
    the product is summed in, so the tolerance only covers a fused multiply-add in BLAS."""
    for sw, sh, size in KEEP_RATIO_CASES:
        expected, dst = _nanodet_val_matrix(sw, sh, size, keep_ratio)
        fit = preprocess.minimum_dst_shape(sw, sh, *size) if keep_ratio else size
        assert tuple(fit) == tuple(dst)
        got = preprocess.resize_matrix(sw, sh, *fit, keep_ratio=keep_ratio)
        np.testing.assert_allclose(got, expected, rtol=1e-15, atol=1e-13)
        assert got[0, 1] == got[1, 0] == got[2, 0] == got[2, 1] == 0 and got[2, 2] == 1
    m = preprocess.resize_matrix(333, 250, 320, 240, keep_ratio=True)
    np.testing.assert_allclose(m, [[0.96, 0, 0.16], [0, 0.96, 0], [0, 0, 1]], atol=1e-12)


@pytest.mark.parametrize("setting", CV2_SETTINGS)
def test_keep_ratio_warp_matches_installed_opencv(setting, restore_cv2):
    kernel = _set_cv2(setting)
    rng = np.random.default_rng(1)
    translated = 0
    for sw, sh, size in KEEP_RATIO_CASES:
        img = rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8)
        fit = preprocess.minimum_dst_shape(sw, sh, *size)
        m = preprocess.resize_matrix(sw, sh, *fit, keep_ratio=True)
        ref = cv2.warpPerspective(img, m, dsize=fit)
        if kernel == "fixed_point" and (m[0, 2] != 0 or m[1, 2] != 0):
            with pytest.raises(RefghostError, match="fixed_point"):
                preprocess.warp_image(img, m, fit, warp_kernel=kernel)
            continue
        translated += m[0, 2] != 0 or m[1, 2] != 0
        out = preprocess.warp_image(img, m, fit, warp_kernel=kernel)
        diff = int(np.abs(out.astype(int) - ref).max())
        assert diff == 0, f"{sw}x{sh} -> {fit} (M={m.tolist()}), kernel {kernel}: max abs diff {diff}"
    assert kernel == "fixed_point" or translated >= 8


def test_prepare_image_keep_ratio_equals_opencv_pipeline(restore_cv2):
    kernel = _set_cv2("default")
    p = preprocess.NANODET_PREPROCESSING
    rng = np.random.default_rng(2)
    for sw, sh, size in [(333, 250, (320, 320)), (100, 276, (416, 416)), (149, 111, (320, 320))]:
        img = rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8)
        expected_m, fit = _nanodet_val_matrix(sw, sh, size, keep_ratio=True)
        warped = cv2.warpPerspective(img, expected_m, dsize=tuple(fit))
        x = warped.astype(np.float32) / 255
        x = (x - np.float32(p["mean"]) / 255) / (np.float32(p["std"]) / 255)
        x = x.transpose(2, 0, 1)[None]
        padded = np.zeros((1, 3, -(-fit[1] // 32) * 32, -(-fit[0] // 32) * 32), np.float32)
        padded[:, :, : fit[1], : fit[0]] = x  # stack_batch_img pads the normalised tensor with 0
        if kernel == "fixed_point" and (expected_m[0, 2] != 0 or expected_m[1, 2] != 0):
            continue  # covered by test_keep_ratio_warp_matches_installed_opencv
        batch, m = preprocess.prepare_image_and_matrix(
            img, mean=p["mean"], std=p["std"], channel_order="BGR", input_size=size, keep_ratio=True,
            warp_kernel=kernel)
        assert batch.shape == padded.shape and batch.dtype == np.float32 and batch.flags.c_contiguous
        np.testing.assert_array_equal(batch, padded)
        np.testing.assert_allclose(m, expected_m, rtol=1e-15, atol=1e-13)
        only = preprocess.prepare_image(img, mean=p["mean"], std=p["std"], channel_order="BGR", input_size=size,
                                        keep_ratio=True, warp_kernel=kernel)
        np.testing.assert_array_equal(only, batch)


def test_stretch_path_returns_diagonal_matrix_and_unchanged_batch():
    p = preprocess.NANODET_PREPROCESSING
    img = np.random.default_rng(3).integers(0, 256, (250, 333, 3), dtype=np.uint8)
    batch, m = preprocess.prepare_image_and_matrix(img, mean=p["mean"], std=p["std"], channel_order="BGR",
                                                   input_size=(320, 320))
    np.testing.assert_array_equal(m, np.diag([320 / 333, 320 / 250, 1.0]))
    np.testing.assert_array_equal(batch, preprocess.prepare_image(img, **p))
    assert batch.shape == (1, 3, 320, 320)


def test_fixed_point_keep_ratio_without_translation_equals_warp_resize_and_rejects_translation():
    img = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    m = preprocess.resize_matrix(640, 480, 320, 240, keep_ratio=True)
    assert m[0, 2] == m[1, 2] == 0
    for kernel in preprocess.WARP_KERNELS:
        np.testing.assert_array_equal(preprocess.warp_image(img, m, (320, 240), warp_kernel=kernel),
                                      preprocess.warp_resize(img, (320, 240), warp_kernel=kernel))
    m = preprocess.resize_matrix(333, 250, 320, 240, keep_ratio=True)
    with pytest.raises(RefghostError, match="fixed_point"):
        preprocess.warp_image(img[:250, :333], m, (320, 240), warp_kernel="fixed_point")
    with pytest.raises(RefghostError, match="scale \\+ translation"):
        preprocess.warp_image(img, np.array([[1.0, 0.1, 0], [0, 1, 0], [0, 0, 1]]), (10, 10))


def test_pad_to_multiple_pads_bottom_right_with_zeros():
    x = np.arange(2 * 3 * 5 * 33, dtype=np.float32).reshape(2, 3, 5, 33) + 1
    padded = preprocess.pad_to_multiple(x, 32)
    assert padded.shape == (2, 3, 32, 64)
    np.testing.assert_array_equal(padded[:, :, :5, :33], x)
    assert not padded[:, :, 5:].any() and not padded[:, :, :, 33:].any()
    assert preprocess.pad_to_multiple(padded, 32) is padded


def test_detections_round_trip_through_the_keep_ratio_matrix():
    """Boxes in the original image -> network input (M) -> back (inv(M), what detect does)."""
    fit = preprocess.minimum_dst_shape(333, 250, 320, 320)
    m = preprocess.resize_matrix(333, 250, *fit, keep_ratio=True)
    boxes = np.array([[0.0, 0.0, 333.0, 250.0], [10.5, 20.25, 100.0, 200.0], [300.0, 1.0, 332.0, 3.0]])
    forward = dec.warp_boxes(boxes, m, 320, 256)
    np.testing.assert_allclose(forward[1], [10.5 * 0.96 + 0.16, 20.25 * 0.96, 100 * 0.96 + 0.16, 200 * 0.96],
                               rtol=1e-14)
    back = dec.warp_boxes(forward, np.linalg.inv(m), 333, 250)
    np.testing.assert_allclose(back, boxes, rtol=0, atol=1e-12)
    # one confident prior at (8, 8) (stride 16, legacy offset) whose box is (0, 0, 16, 16)
    output = np.zeros((1, 1, 3 + 4 * 8))
    output[0, 0, 1] = 0.9
    output[0, 0, 3:] = np.where(np.arange(32) % 8 == 1, 60.0, 0.0)  # every side: bin 1, i.e. 16 px
    det = dec.detect(output, num_classes=3, reg_max=7, strides=(16,), prior_offset=0.5, input_size=(320, 256),
                     level_sizes=[(1, 1)], warp_matrix=m, original_size=(333, 250))[0]
    np.testing.assert_array_equal(det.labels, [1])
    np.testing.assert_allclose(det.boxes, [[0.0, 0.0, (24 - 0.16) / 0.96, 24 / 0.96]], rtol=1e-12)
