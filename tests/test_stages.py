"""The stages around a detector's network (refghost/verify/stages.py): an honest candidate's input,
decode and detections pass; each bug, built from the golden's own pixels or head output with
refghost's preprocessing and decode functions, fails and is named."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import refghost
from refghost import preprocess as pp
from refghost.cli import SAMPLE_IMAGE
from refghost.detector import decode as dd
from refghost.detector.run import NmsSettings, prepare_batch
from refghost.errors import CompareError
from refghost.verify import stages as st
from refghost.verify.golden import make_golden
from refghost.weights import load_weights

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "nanodet-plus-m_320.h5"


@pytest.fixture(scope="module")
def golden():
    weights = load_weights(SHIPPED)
    batch = prepare_batch([str(SAMPLE_IMAGE)], weights, np.float32)
    return make_golden(weights, batch.x, batch=batch)


@pytest.fixture(scope="module")
def honest(golden):
    """refghost's float32 run of the sample image: the network output and the detections."""
    return refghost.run(str(SAMPLE_IMAGE), golden.weights, dtype="float32")


def detections_of(result: dict) -> dict:
    return {key.split(".", 1)[1]: value for key, value in result.items() if key.startswith("detections.")}


def golden_pixels(golden) -> np.ndarray:
    """The uint8 levels the golden input was normalised from: ``x * std + mean``, rounded."""
    mean, std = st._stats(golden)
    pixels = golden.input.astype(np.float64) * std + mean
    assert np.abs(pixels - np.rint(pixels)).max() < 1e-3  # they are whole levels
    return np.rint(pixels).astype(np.float32)


def stats32(golden):
    pre = golden.weights.preprocessing
    return (np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1), np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1))


# --- input --------------------------------------------------------------------------------


def test_input_honest_refghost_and_other_float32_arithmetic(golden):
    assert st.judge_input(golden, golden.input).verdict == st.PASS
    mean, std = stats32(golden)
    pixels = golden_pixels(golden)
    for x in ((pixels - mean) / std, pixels * (np.float32(1) / std) + (-mean / std)):  # plain, mean/std folded
        assert not np.array_equal(x, golden.input)  # other roundings than NanoDet's ...
        result = st.judge_input(golden, x)
        assert (result.verdict, result.cause, result.outside) == (st.PASS, None, 0)  # ... within the bound
        assert 0 < result.ratio <= 1


def test_input_other_opencv_kernel_is_honest_but_noted(golden):
    img = pp.read_image(SAMPLE_IMAGE, "BGR")
    pre = golden.weights.preprocessing
    x = pp.prepare_image(img, mean=pre.mean, std=pre.std, channel_order="BGR", input_size=pre.input_size,
                         warp_kernel="ipp_float32_fma")
    result = st.judge_input(golden, x)
    assert (result.verdict, result.cause) == (st.PASS, "resize_kernel")
    assert result.off_by_one_level == result.outside > 0 and result.max_levels < 1.001
    # a golden input not made from an image is fed as it is: a level off is not another kernel
    seeded = replace(golden, input=np.random.default_rng(0).standard_normal(golden.input.shape).astype(np.float32))
    _, std = stats32(golden)
    result = st.judge_input(seeded, seeded.input + (np.arange(seeded.input.shape[3]) % 7 == 0) / std)
    assert result.verdict == st.FAIL and result.cause != "resize_kernel"


def test_input_cv2_pipeline_passes(golden):
    cv2 = pytest.importorskip("cv2")
    img = cv2.imread(str(SAMPLE_IMAGE))
    size = golden.weights.preprocessing.input_size
    warped = cv2.warpPerspective(img, golden.detector["preprocess.matrices"][0], size)
    mean, std = stats32(golden)
    x = ((warped.astype(np.float32) / 255 - mean[0].T / 255) / (std[0].T / 255)).transpose(2, 0, 1)[None]
    result = st.judge_input(golden, x)
    same_kernel = pp.kernel_for_opencv(cv2.__version__, ipp=cv2.ipp.useIPP()) == pp.DEFAULT_WARP_KERNEL
    assert (result.verdict, result.cause) == (st.PASS, None if same_kernel else "resize_kernel"), result.message


@pytest.mark.parametrize("cause", ["channels_swapped", "mean_std_missing_255", "mean_std_missing_1", "mean_std_twice",
                                   "mean_std_order", "hw_swapped"])
def test_input_bug_named(golden, cause):
    mean, std = stats32(golden)
    p = golden_pixels(golden)
    x = {"channels_swapped": lambda: (p[:, ::-1] - mean) / std,  # RGB image, BGR statistics
         "mean_std_missing_255": lambda: p,
         "mean_std_missing_1": lambda: p / np.float32(255),
         "mean_std_twice": lambda: (golden.input - mean) / std,
         "mean_std_order": lambda: (p - mean[:, ::-1]) / std[:, ::-1],
         "hw_swapped": lambda: golden.input.transpose(0, 1, 3, 2)}[cause]()
    result = st.judge_input(golden, np.ascontiguousarray(x))
    assert (result.verdict, result.cause) == (st.FAIL, cause), result.message
    assert st.CAUSES[cause] in result.message


def test_input_channels_swapped_with_statistics_too(golden):
    result = st.judge_input(golden, np.ascontiguousarray(golden.input[:, ::-1]))
    assert (result.verdict, result.cause) == (st.FAIL, "channels_swapped")


def test_input_resize_named_from_the_padding(golden):
    img = pp.read_image(SAMPLE_IMAGE, "BGR")
    pre = golden.weights.preprocessing
    w, h = pre.input_size
    r = min(w / img.shape[1], h / img.shape[0])
    centred = np.array([[r, 0, (w - r * img.shape[1]) / 2], [0, r, (h - r * img.shape[0]) / 2], [0, 0, 1]])
    letterbox = pp.normalize(pp.warp_image(img, centred, (w, h), warp_kernel="float32"), pre.mean, pre.std)[None]
    result = st.judge_input(golden, letterbox)
    assert (result.verdict, result.cause) == (st.FAIL, "letterbox") and result.pad[0] == result.pad[1] > 0
    keep, _ = pp.prepare_image_and_matrix(img, mean=pre.mean, std=pre.std, channel_order="BGR", input_size=(w, h),
                                          warp_kernel="float32", keep_ratio=True)
    result = st.judge_input(golden, keep)  # NanoDet's keep_ratio: padded at the bottom to a multiple of 32
    assert (result.verdict, result.cause) == (st.FAIL, "keep_ratio") and result.shape != result.golden_shape
    # a keep_ratio model's golden, fed a stretched input
    kept = replace(golden, input=keep, weights=replace(golden.weights, preprocessing=replace(pre, keep_ratio=True)))
    result = st.judge_input(kept, golden.input)
    assert (result.verdict, result.cause) == (st.FAIL, "stretch") and result.golden_pad[1] > 0


def test_input_other_interpolation_image_normalisation_shape(golden):
    img = pp.read_image(SAMPLE_IMAGE, "BGR")
    pre = golden.weights.preprocessing
    (w, h), (src_h, src_w) = pre.input_size, img.shape[:2]
    sx, sy = w / src_w, h / src_h
    # cv2.resize's sampling (pixel centres aligned: src = (dst + 1/2)/scale - 1/2) instead of warpPerspective's
    centred = np.array([[sx, 0, sx / 2 - 0.5], [0, sy, sy / 2 - 0.5], [0, 0, 1]])
    resized = pp.normalize(pp.warp_image(img, centred, (w, h), warp_kernel="float32"), pre.mean, pre.std)[None]
    result = st.judge_input(golden, resized)
    assert (result.verdict, result.cause) == (st.FAIL, "resize_interpolation"), result.message
    mirrored = np.ascontiguousarray(golden.input[..., ::-1])
    assert st.judge_input(golden, mirrored).cause == "other_image"
    mean, std = stats32(golden)
    shifted = (golden_pixels(golden) - (mean - 10)) / std  # a mean 10 levels lower
    result = st.judge_input(golden, shifted)
    assert (result.verdict, result.cause) == (st.FAIL, "normalisation")
    assert str(np.round(pre.mean[0] - 10, 3)) in result.message  # the fitted mean is reported
    result = st.judge_input(golden, np.concatenate([golden.input, golden.input]))
    assert (result.verdict, result.cause) == (st.FAIL, "shape")


def test_input_bad_argument(golden):
    with pytest.raises(CompareError, match="candidate input"):
        st.judge_input(golden, golden.input[0, 0])
    with pytest.raises(CompareError, match="channels last"):
        st.judge_input(golden, np.ascontiguousarray(golden.input.transpose(0, 2, 3, 1)))
    result = st.judge_input(golden, np.full_like(golden.input, np.nan))
    assert result.verdict == st.FAIL


# --- decode -------------------------------------------------------------------------------


def decode_with(golden, honest, **changes):
    """The float32 decode of the honest run's head output with some of the head's settings changed."""
    settings, levels, size = st._head(golden)
    args = dict(output=honest["output"], num_classes=settings["num_classes"], reg_max=settings["reg_max"],
                level_sizes=levels, strides=settings["strides"], prior_offset=settings["prior_offset"])
    args.update(changes)
    return dd.decode(**args, input_size=size)


def test_decode_honest_passes(golden, honest):
    scores, boxes = decode_with(golden, honest)
    result = st.judge_decode(golden, scores, boxes)
    assert (result.verdict, result.cause, result.reference) == (st.PASS, None, "golden")
    assert 0 < max(result.score_ratio, result.box_ratio) <= 1
    isolated = st.judge_decode(golden, scores, boxes, output=honest["output"])
    assert (isolated.verdict, isolated.reference) == (st.PASS, "candidate output")


def test_decode_bugs_named(golden, honest):
    settings, levels, size = st._head(golden)
    classes, reg_max, strides = settings["num_classes"], settings["reg_max"], settings["strides"]
    out = honest["output"]
    scores, boxes = decode_with(golden, honest)
    three = dd.head_level_sizes(size, strides[:-1])  # a 3-level decoder on the 4-level head
    priors = sum(h * w for h, w in three)
    centers, prior_strides = dd.center_priors(levels, strides, settings["prior_offset"], np.float32)
    sides = dd.softmax(out[..., classes:].reshape(*out.shape[:2], 4, reg_max + 1), axis=-2)
    over_sides = (sides * np.arange(reg_max + 1, dtype=np.float32)).sum(-1) * prior_strides[:, None]
    bugs = {
        "prior_offset": decode_with(golden, honest, prior_offset=0.5),
        "strides": decode_with(golden, honest, output=np.ascontiguousarray(out[:, :priors]), level_sizes=three,
                               strides=strides[:-1]),
        "sigmoid_missing": (np.log(scores) - np.log1p(-scores), boxes),
        "sigmoid_doubled": (1 / (1 + np.exp(-scores)), boxes),
        "integral_axis": (scores, dd.distance2bbox(centers, over_sides, size)),
        "class_count": decode_with(golden, honest, num_classes=classes + 4, reg_max=reg_max - 1),
        "reg_max": decode_with(golden, honest, output=np.ascontiguousarray(out[..., :classes + 4 * 5]), reg_max=4),
    }
    for cause, (s, b) in bugs.items():
        result = st.judge_decode(golden, s, b)
        assert (result.verdict, result.cause) == (st.FAIL, cause), result.message
    moved = st.judge_decode(golden, scores, boxes + np.float32(0.5))
    assert (moved.verdict, moved.cause) == (st.FAIL, "unknown") and moved.box_ratio > 1 and moved.score_ratio <= 1


# --- detections ---------------------------------------------------------------------------


def test_detections_honest_float32_pass(golden, honest):
    result = st.judge_detections(golden, detections_of(honest))
    assert (result.verdict, result.missing, result.extra) == (st.PASS, 0, 0)
    assert result.matched + result.unstable == len(golden.detector["detections.scores"]) > 0


def test_detections_rederived_equal_the_stored(golden):
    stored = {key: golden.detector[f"detections.{key}"] for key in ("image", "boxes", "scores", "labels")}
    result = st.judge_detections(golden, stored)
    assert (result.verdict, result.matched) == (st.PASS, len(stored["scores"]))


def test_detections_bugs_named(golden, honest):
    det = detections_of(honest)
    first = np.arange(len(det["scores"])) == 0

    def changed(key, value):
        return {**det, key: value}

    bugs = {
        "missing": ({k: v[~first] for k, v in det.items()}, (1, 0)),
        "extra": ({k: np.concatenate([v, v[:1]]) for k, v in det.items()}, (0, 1)),
        "box_moved": (changed("boxes", det["boxes"] + np.float32(3) * first[:, None]), (1, 1)),
        "score_moved": (changed("scores", det["scores"] - np.float32(0.01) * first), (1, 1)),
        "wrong_label": (changed("labels", det["labels"] + first), (1, 1)),
    }
    for cause, (candidate, (missing, extra)) in bugs.items():
        result = st.judge_detections(golden, candidate)
        assert (result.verdict, result.cause, result.missing, result.extra) == (st.FAIL, cause, missing, extra), \
            result.message


def score_bound(golden, score: float) -> float:
    """The bound of a golden score of image 0 (its prior and class found by the exact value)."""
    where = np.argwhere(golden.detector["decode.scores"][0] == score)[0]
    return float(golden.bounds["decode.scores"][0][tuple(where)])


def without_score(detections: dict, score: float, bound: float) -> dict:
    """``detections`` less the one whose score is within ``bound`` of ``score``."""
    keep = np.abs(detections["scores"] - score) > bound
    assert np.sum(~keep) == 1
    return {key: value[keep] for key, value in detections.items()}


def test_detection_near_the_score_threshold_is_unstable(golden, honest):
    """A golden made with a score threshold half a bound below a detection's score: an honest
    backend may keep that detection or not; both pass, and it is reported unstable."""
    k = 5
    score = float(golden.detector["detections.scores"][k])
    bound = score_bound(golden, score)
    threshold = score - bound / 2
    batch = prepare_batch([str(SAMPLE_IMAGE)], golden.weights, np.float32)
    near = make_golden(golden.weights, golden.input, batch=batch, nms=NmsSettings(score_threshold=threshold))
    assert near.attrs["score_threshold"] == threshold and score in near.detector["detections.scores"]
    candidate = detections_of(honest)
    with_it = {key: value[candidate["scores"] >= np.float32(threshold)] for key, value in candidate.items()}
    without = without_score(with_it, score, bound)
    for case in (with_it, without):
        result = st.judge_detections(near, case)
        assert (result.verdict, result.unstable, result.missing, result.extra) == (st.PASS, 1, 0, 0), result.message
    # under the golden's own threshold (far from the score) the same detection is stable, and its absence fails
    result = st.judge_detections(golden, without_score(candidate, score, bound))
    assert (result.verdict, result.cause, result.missing) == (st.FAIL, "missing", 1)


def detect_under(golden, honest, **thresholds) -> dict:
    """The honest float32 head output's detections under other thresholds, in original pixels."""
    settings, levels, size = st._head(golden)
    stage = golden.detector
    per_image = dd.detect(honest["output"], **settings, input_size=size, warp_matrix=stage["preprocess.matrices"],
                          original_size=[list(s) for s in stage["preprocess.original_sizes"]], **thresholds)
    return {"image": np.zeros(len(per_image[0].scores), np.int64), "boxes": per_image[0].boxes,
            "scores": per_image[0].scores, "labels": per_image[0].labels}


def test_demo_thresholds_rederived(golden, honest):
    """A user with NanoDet's C++ demo thresholds is judged under them, from the golden's decode."""
    for score_threshold, iou_threshold in ((0.4, 0.5), (0.1, 0.3)):
        candidate = detect_under(golden, honest, score_threshold=score_threshold, iou_threshold=iou_threshold)
        result = st.judge_detections(golden, candidate, score_threshold=score_threshold, iou_threshold=iou_threshold)
        assert (result.verdict, result.score_threshold, result.matched + result.unstable) == \
            (st.PASS, score_threshold, len(candidate["scores"]))
        assert st.judge_detections(golden, candidate).verdict == st.FAIL  # the golden's 0.05 keeps more


def test_detection_near_the_iou_threshold_is_unstable(golden, honest):
    """An NMS threshold at the IoU of the best detection and another box of its class: whether that
    box is suppressed is honest either way."""
    stage = golden.detector
    everything = dd.multiclass_nms(stage["decode.boxes"][0], stage["decode.scores"][0], 0.05, 1.0, -1)
    boxes, scores = stage["decode.boxes"][0], stage["decode.scores"][0]

    def kept(j, threshold):
        return everything.scores[j] in dd.multiclass_nms(boxes, scores, 0.05, threshold).scores

    pairs = []  # (IoU, j) of the best box of each class (never suppressed) and every other box of its class
    for label in np.unique(everything.labels):
        members = np.flatnonzero(everything.labels == label)
        pairs += [(st._iou(everything.boxes[members[0]], everything.boxes[j]), j) for j in members[1:]]
    # a box whose fate that IoU decides (NMS rounds the class-shifted boxes: 1e-9 apart)
    iou, j = next((iou, j) for iou, j in sorted(pairs, reverse=True) if kept(j, iou + 1e-9) and not kept(j, iou - 1e-9))
    assert 0.3 < iou < 0.9
    bound = score_bound(golden, everything.scores[j])
    # box j as the honest float32 decode gives it, in original pixels
    prior, label = np.argwhere(stage["decode.scores"][0] == everything.scores[j])[0]
    scores32, boxes32 = decode_with(golden, honest)
    width, height = stage["preprocess.original_sizes"][0]
    box_j = dd.warp_boxes(boxes32[0, prior][None], np.linalg.inv(stage["preprocess.matrices"][0]), width, height)
    for threshold in (iou - 1e-9, iou + 1e-9):  # just below: suppressed; just above: kept
        candidate = detect_under(golden, honest, iou_threshold=threshold)
        if np.any(np.abs(candidate["scores"] - everything.scores[j]) <= bound):
            candidate = without_score(candidate, everything.scores[j], bound)
        with_j = {"image": np.append(candidate["image"], 0), "boxes": np.concatenate([candidate["boxes"], box_j]),
                  "scores": np.append(candidate["scores"], scores32[0, prior, label]),
                  "labels": np.append(candidate["labels"], label)}
        for case, shown in ((candidate, kept(j, threshold)), (with_j, True)):
            result = st.judge_detections(golden, case, iou_threshold=threshold)
            assert (result.verdict, result.unstable) == (st.PASS, int(shown)), result.message
        # far from the NMS threshold, box j is not honest either way
        assert st.judge_detections(golden, with_j, iou_threshold=iou / 2).verdict == st.FAIL


def test_detections_tied_at_the_cut_are_unstable(golden):
    stage = golden.detector
    k = 7  # detections 7 and 8 tied: at most 8 kept
    scores = stage["decode.scores"].copy()
    second = np.argwhere(scores == stage["detections.scores"][k + 1])[0]
    scores[tuple(second)] = stage["detections.scores"][k] + 1e-9
    tied = replace(golden, detector={**stage, "decode.scores": scores})
    stored = {key: stage[f"detections.{key}"] for key in ("image", "boxes", "scores", "labels")}
    stored["scores"] = stored["scores"].copy()
    stored["scores"][k + 1] = scores[tuple(second)]
    for drop in (k, k + 1):
        candidate = {key: np.delete(value, [drop] + list(range(k + 2, len(value))), axis=0)
                     for key, value in stored.items()}
        result = st.judge_detections(tied, candidate, max_detections=k + 1)
        assert (result.verdict, result.unstable, result.matched) == (st.PASS, 2, k), result.message
    result = st.judge_detections(golden, {key: np.delete(value, [k + 1] + list(range(k + 2, len(value))), axis=0)
                                          for key, value in stored.items()}, max_detections=k + 1)
    assert result.verdict == st.PASS  # untied: detection 7 is surely in the top 8


def test_detections_bad_argument(golden):
    with pytest.raises(CompareError, match="'labels'"):
        st.judge_detections(golden, {"image": np.zeros(1), "boxes": np.zeros((1, 4)), "scores": np.zeros(1)})
    one = {"image": np.zeros(1), "boxes": np.zeros((1, 4)), "scores": np.zeros(1), "labels": np.zeros(1)}
    with pytest.raises(CompareError, match="image 3"):
        st.judge_detections(golden, {**one, "image": np.array([3])})
    with pytest.raises(CompareError, match="max_detections"):
        st.judge_detections(golden, one, max_detections=2.5)
    backbone = replace(golden, detector={})
    assert st.judge_decode(backbone, np.zeros((1, 1, 1)), np.zeros((1, 1, 4))).verdict == st.NOT_JUDGED
    assert st.judge_detections(backbone, one).verdict == st.NOT_JUDGED
