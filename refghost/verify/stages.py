"""The stages around a detector's network, judged: its input, its decode, its detections.

Each judge is a pure function of a :class:`~refghost.verify.golden.Golden` (a detector's) and the
candidate's arrays, and returns a frozen record: a verdict (:data:`PASS`, :data:`FAIL`,
:data:`NOT_JUDGED`), the figures behind it, the likely cause (a key of :data:`CAUSES`, several
joined by ``+``) and a one-line message. The rules are in ``docs/tolerances.md`` ("Stages around
the network"):

* :func:`judge_input`: the candidate's network input (N, 3, H, W) against the golden's ``/input``,
  within the rounding of two float32 normalisations (:func:`normalisation_bound`); one pixel level
  more on some values is another OpenCV's resize kernel (passes, noted). Otherwise the cause is
  named by rebuilding the golden's pixels (``x * std + mean``) and testing each bug on them:
  channels swapped, mean/std missing (0..255 or 0..1), applied twice or in the other channel
  order, H/W swapped, and from the padding: letterbox, keep_ratio or stretch.
* :func:`judge_decode`: the decoded priors against ``decode.scores`` / ``decode.boxes`` within
  their stored bounds; a failure is named by re-decoding the head output under each bug with
  :mod:`refghost.detector.decode` (prior offset, strides, sigmoid missing or doubled, the
  integral over the wrong axis, another reg_max or class count).
* :func:`judge_detections`: after NMS, under the thresholds the candidate used. A detection whose
  score lies within its bound of the score threshold, whose suppression hangs on an IoU whose
  interval contains the NMS threshold or on an order of scores within their bounds (or on such a
  detection), or that is tied at the ``max_detections`` cut, is *unstable*: honest either way,
  reported, never failed. Every other golden detection must be there (same image and label, box
  and score within their bounds), and nothing else may be.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bounds import FLOAT32_U, decode_bounds
from ..detector import decode as dd
from ..errors import CompareError
from .golden import Golden

__all__ = [
    "CAUSES", "FAIL", "MATCH_SHARE", "NOT_JUDGED", "PASS", "DecodeResult", "DetectionsResult", "InputResult",
    "judge_decode", "judge_detections", "judge_input", "judge_stages", "normalisation_bound", "STAGE_KEYS",
]

PASS, FAIL, NOT_JUDGED = "pass", "fail", "not judged"

#: Every cause a stage can name: id -> what it means (one home for the wording).
CAUSES = {
    # input
    "resize_kernel": "another OpenCV's resize kernel (values one pixel level apart: honest)",
    "resize_interpolation": "another resize interpolation (pixels differ by a few levels where the image has edges: "
                            "cv2.resize instead of warpPerspective, or another OpenCV; make the golden with the "
                            "--warp-kernel of your OpenCV, refghost.preprocess.kernel_for_opencv)",
    "channels_swapped": "channels swapped (the image in RGB order where the model wants BGR, or the reverse)",
    "mean_std_order": "mean/std in the other channel order",
    "mean_std_missing_255": "mean/std not applied (raw pixels 0..255)",
    "mean_std_missing_1": "mean/std not applied (pixels scaled to 0..1 only)",
    "mean_std_twice": "mean/std applied twice",
    "normalisation": "another mean/std",
    "hw_swapped": "height and width swapped (the input is transposed)",
    "letterbox": "letterbox resize (aspect kept, padded on both sides) where the model uses another",
    "keep_ratio": "keep_ratio resize (aspect kept, padded at the bottom/right) where the model stretches",
    "stretch": "stretch resize (no padding) where the model keeps the aspect ratio",
    "other_image": "another image (most pixels differ)",
    "shape": "another shape",
    # decode
    "prior_offset": "prior centres offset by another fraction of a stride",
    "strides": "another set of strides",
    "sigmoid_missing": "the sigmoid missing (the scores are logits)",
    "sigmoid_doubled": "the sigmoid applied twice",
    "integral_axis": "the box integral over the wrong axis",
    "reg_max": "another reg_max",
    "class_count": "another class count (the split between class scores and box bins moved)",
    # detections
    "missing": "a detection missing",
    "extra": "a detection that should not be there",
    "box_moved": "a box moved beyond its bound",
    "score_moved": "a score moved beyond its bound",
    "wrong_label": "a detection with the wrong label",
    # any stage
    "unknown": "no tested cause matches",
}

U = FLOAT32_U
#: Share of values that must fit a hypothesis for it to be named as the likely cause (a candidate
#: may carry a second, smaller difference, e.g. another resize kernel, on top of the bug).
MATCH_SHARE = 0.99


def _cause_text(cause: str | None) -> str:
    return "; ".join(CAUSES[c] for c in cause.split("+")) if cause else ""


def _float(x, name: str, ndim: int) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
        found = f"dtype {x.dtype}" if isinstance(x, np.ndarray) else f"type {type(x).__name__}"
        raise CompareError(f"{name} must be a numeric numpy array, got {found}")
    if x.ndim != ndim:
        raise CompareError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return x.astype(np.float64)


#: The message of a stage a backbone's golden cannot judge.
_BACKBONE = "not judged: the golden is a backbone's (it holds no decode or detections)"


def _ratios(err: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """|err| / bound elementwise: 0 where the error is 0, infinite where it is NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(err == 0, 0.0, err / bound)
    return np.where(np.isnan(r), np.inf, r)


def _ratio(err: np.ndarray, bound: np.ndarray) -> float:
    """max |err| / bound (NaN errors count as infinite)."""
    return float(_ratios(err, bound).max()) if err.size else 0.0


# ============================================================================================
# Input
# ============================================================================================


@dataclass(frozen=True)
class InputResult:
    """The verdict on a candidate's network input.

    ratio : max |candidate - golden| / normalisation bound (inf for another shape)
    outside : values beyond the normalisation bound
    off_by_one_level : of those, values within one pixel level (another resize kernel)
    max_levels : largest difference in pixel levels (``|candidate - golden| * std``)
    shape, golden_shape : the two input shapes
    pad, golden_pad : (top, bottom, left, right) rows/columns of constant padding of image 0
    """

    verdict: str
    cause: str | None
    message: str
    ratio: float
    outside: int
    off_by_one_level: int
    max_levels: float
    shape: tuple
    golden_shape: tuple
    pad: tuple
    golden_pad: tuple
    stage: str = "input"


def normalisation_bound(pixels: np.ndarray, scale: np.ndarray, offset: np.ndarray, value: np.ndarray) -> np.ndarray:
    """How far two honest float32 evaluations of ``value = scale * pixels + offset`` may be apart.

    With ``a = 1/s``, ``b = -m/s`` (``m``, ``s``: mean and std in 0..255 units), first order in
    ``u``: NanoDet computes ``(p/255 - m32/255) / (s32/255)``: ``m`` to float32 and ``/255``
    ``2u|m|/s``, ``p/255`` ``u|p|/s``, the subtract ``u|x|``, ``s`` to float32, ``/255`` and the
    divide ``3u|x|``; a backend with mean/std folded computes ``p * (1/s) + (-m/s)``:
    ``u(2|p| + 2|m|)/s + u|x|``; ``(p - m)/s`` and ``(p - m) * (1/s)`` at most ``u(|p| + |m|)/s
    + 4u|x|``. Each pipeline is within ``u(2|a p| + 2|b|) + 4u|x|`` of the exact value, so the
    golden and the candidate are within ``u(4(|a p| + |b|) + 8|x|)`` of each other: about 12 ulp
    of ``|x|`` for NanoDet's statistics. Arrays broadcast over (N, 3, H, W).
    """
    return U * (4.0 * (np.abs(scale * pixels) + np.abs(offset)) + 8.0 * np.abs(value))


def _stats(golden: Golden) -> tuple[np.ndarray, np.ndarray]:
    pre = golden.weights.preprocessing
    return (np.asarray(pre.mean, dtype=np.float64).reshape(1, 3, 1, 1),
            np.asarray(pre.std, dtype=np.float64).reshape(1, 3, 1, 1))


def _pad_extent(x: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): how many border rows/columns of ``x`` (3, H, W) hold one value
    per channel (constant padding), counted from each edge."""
    def rows(a):  # a: (3, R, L) -> leading constant rows
        flat = np.ptp(a, axis=2) <= 1e-6 * (1 + np.abs(a).max(axis=2))  # (3, R)
        const = flat.all(axis=0)
        if not const[0]:
            return 0
        value = a[:, 0, 0]
        same = const & np.all(np.abs(a[:, :, 0] - value[:, None]) <= 1e-6 * (1 + np.abs(value[:, None])), axis=0)
        return int(np.argmin(same)) if not same.all() else a.shape[1]

    return rows(x), rows(x[:, ::-1]), rows(x.transpose(0, 2, 1)), rows(x.transpose(0, 2, 1)[:, ::-1])


def _input_hypotheses(golden: Golden, pixels: np.ndarray, pad_mask: np.ndarray):
    """Every tested bug as (cause, tensor, tolerance): the golden's pixels through the wrong
    channel order, normalisation and geometry. Tolerance: the normalisation bound plus one pixel
    level (another resize kernel on top of the bug)."""
    mean, std = _stats(golden)
    norms = {
        "": (1 / std, -mean / std),
        "mean_std_order": (1 / std[:, ::-1], -mean[:, ::-1] / std[:, ::-1]),
        "mean_std_missing_255": (np.ones_like(std), np.zeros_like(mean)),
        "mean_std_missing_1": (np.full_like(std, 1 / 255), np.zeros_like(mean)),
        "mean_std_twice": (1 / std ** 2, -mean / std ** 2 - mean / std),
    }
    for swap in (False, True):
        p = pixels[:, ::-1] if swap else pixels
        for norm, (a, b) in norms.items():
            if swap and norm == "mean_std_order":
                norm = ""  # image and statistics both reversed: the channels alone are swapped
            value = np.where(pad_mask, 0.0, a * p + b)
            tolerance = normalisation_bound(p, a, b, value) + np.abs(a)
            for transpose in (False, True):
                cause = "+".join(c for c in ("channels_swapped" if swap else "", norm,
                                             "hw_swapped" if transpose else "") if c)
                if not cause:
                    continue
                if transpose:
                    yield cause, value.transpose(0, 1, 3, 2), tolerance.transpose(0, 1, 3, 2)
                else:
                    yield cause, value, tolerance


def judge_input(golden: Golden, candidate_input) -> InputResult:
    """The candidate pipeline's network input against the golden's ``/input``.

    candidate_input : (N, 3, H, W) or (3, H, W), any float dtype, as the candidate fed its network.

    Pass: every value within :func:`normalisation_bound` of the golden's; pass with cause
    ``resize_kernel``: some values one pixel level (``1/std``) further, no more. Fail otherwise,
    with the cause whose reconstruction from the golden's pixels fits :data:`MATCH_SHARE` of the
    values (or, for another shape or padding, the resize the padding shows).
    """
    if isinstance(candidate_input, np.ndarray) and candidate_input.ndim == 3:
        candidate_input = candidate_input[None]
    x = _float(candidate_input, "candidate input", 4)
    if x.shape[1] != 3:
        hint = " (channels last? NanoDet's input is NCHW: transpose it with x.transpose(0, 3, 1, 2))" \
            if x.shape[3] == 3 else ""
        raise CompareError(f"candidate input must be (N, 3, H, W), got shape {x.shape}{hint}")
    g = golden.input.astype(np.float64)
    mean, std = _stats(golden)
    pixels = g * std + mean
    pad_mask = np.broadcast_to((golden.input == 0).all(axis=1, keepdims=True), g.shape)
    pad, golden_pad = _pad_extent(x[0]), _pad_extent(g[0])
    common = dict(shape=tuple(x.shape), golden_shape=tuple(g.shape), pad=pad, golden_pad=golden_pad)

    def result(verdict, cause, message, ratio=np.inf, outside=-1, off_by_one=0, levels=np.nan):
        return InputResult(verdict, cause, message, float(ratio), int(outside), int(off_by_one), float(levels),
                           **common)

    if not np.all(np.isfinite(x)):
        return result(FAIL, "unknown", f"input: {int(np.sum(~np.isfinite(x)))} values are NaN or infinite")
    if x.shape == g.shape:
        err = np.abs(x - g)
        bound = normalisation_bound(pixels, 1 / std, -mean / std, g)
        level = np.broadcast_to(1 / std, g.shape)
        outside = err > bound
        off_by_one = outside & (err <= bound + level)
        ratio = _ratio(err, bound)
        levels = float((err * std).max())
        figures = dict(ratio=ratio, outside=outside.sum(), off_by_one=off_by_one.sum(), levels=levels)
        if not outside.any():
            return result(PASS, None, f"input: equal to the golden's within the float32 rounding of the "
                                      f"normalisation (max {ratio:.2f} of its bound)", **figures)
        from_image = np.mean(np.abs(pixels - np.rint(pixels))[~pad_mask] < 1e-2) >= MATCH_SHARE
        if from_image and not (outside & ~off_by_one).any():
            share = off_by_one.mean()
            return result(PASS, "resize_kernel", f"input: {share:.1%} of the values are one pixel level from the "
                                                 f"golden's: {CAUSES['resize_kernel']}", **figures)
    else:
        figures = {}
    cause, found = _name_input_cause(golden, x, g, pixels, pad_mask, pad, golden_pad)
    detail = _input_detail(x, g, pad, golden_pad)
    return result(FAIL, cause, f"input differs from the golden's{detail}: likely {_cause_text(cause)}{found}",
                  **figures)


def _name_input_cause(golden, x, g, pixels, pad_mask, pad, golden_pad) -> tuple[str, str]:
    """The likely cause of a failed input, and what was found (for another mean/std: the fitted
    ones). Tested in order: the bugs rebuilt from the golden's pixels, the padding, the shape, then
    the pixels themselves."""
    if x.shape[0] != g.shape[0]:
        return "shape", ""
    for cause, value, tolerance in _input_hypotheses(golden, pixels, pad_mask):
        if value.shape == x.shape and np.mean(np.abs(x - value) <= tolerance) >= MATCH_SHARE:
            return cause, ""
    if pad != golden_pad:
        top, bottom, left, right = pad
        if (top and bottom) or (left and right) or ((bottom or right) and (top or left)):
            return "letterbox", ""
        if bottom or right:
            return "keep_ratio", ""
        if any(golden_pad):
            return "stretch", ""
    if x.shape[2:] == g.shape[:1:-1] and x.shape[2] != x.shape[3]:
        return "hw_swapped", ""
    if x.shape != g.shape:
        return "shape", ""
    mean, std = _stats(golden)
    levels = np.abs(x - g) * std
    candidate_pixels = x * std + mean
    whole = np.mean(np.abs(candidate_pixels - np.rint(candidate_pixels)) < 1e-2) >= MATCH_SHARE
    if whole and np.median(levels) <= 0.5:  # whole levels, most of them equal: the resize's arithmetic
        return "resize_interpolation", ""
    fitted = _fit_normalisation(x, pixels, pad_mask)
    if fitted is not None:
        fitted_std, fitted_mean = 1 / fitted[:, 0], -fitted[:, 1] / fitted[:, 0]
        pre = golden.weights.preprocessing
        return "normalisation", (f" (fitted mean {np.round(fitted_mean, 3).tolist()}, std "
                                 f"{np.round(fitted_std, 3).tolist()}; the model's {list(pre.mean)}, {list(pre.std)})")
    return ("other_image" if whole else "unknown"), ""


def _fit_normalisation(x, pixels, pad_mask) -> np.ndarray | None:
    """Per-channel (scale, offset), (3, 2), with ``x ~ scale * pixels + offset`` (least squares)
    when they fit :data:`MATCH_SHARE` of the values within a pixel level (``|scale|``), else None."""
    keep = ~pad_mask[:, 0]
    fits = []
    for c in range(3):
        p, v = pixels[:, c][keep], x[:, c][keep]
        if p.size < 2 or np.ptp(p) == 0:
            return None
        a, b = np.polyfit(p, v, 1)
        if a == 0 or np.mean(np.abs(a * p + b - v) <= abs(a)) < MATCH_SHARE:
            return None
        fits.append((a, b))
    return np.array(fits)


def _input_detail(x, g, pad, golden_pad) -> str:
    parts = []
    if x.shape != g.shape:
        parts.append(f"shape {tuple(x.shape)}, golden {tuple(g.shape)}")
    if pad != golden_pad:
        parts.append(f"padding (top, bottom, left, right) {pad}, golden {golden_pad}")
    return f" ({'; '.join(parts)})" if parts else ""


# ============================================================================================
# Decode
# ============================================================================================


@dataclass(frozen=True)
class DecodeResult:
    """The verdict on a candidate's decoded priors.

    score_ratio, box_ratio : max |candidate - reference| / bound over the scores, the boxes
    scores_outside, boxes_outside : values beyond their bounds
    worst : (image, prior) of the largest ratio
    reference : "golden" (the golden's decode, bounds of an honest float32 network and decode) or
        "candidate output" (the candidate's own head output re-decoded in float64, bounds of the
        decode's own rounding: the decode judged in isolation)
    """

    verdict: str
    cause: str | None
    message: str
    score_ratio: float
    box_ratio: float
    scores_outside: int
    boxes_outside: int
    worst: tuple
    reference: str
    stage: str = "decode"


def _head(golden: Golden):
    from ..detector.run import head_settings
    from ..detector.spec import level_sizes

    config = golden.weights.config
    _, _, height, width = golden.input.shape
    levels = [(level.height, level.width) for level in level_sizes(config, width, height)]
    return head_settings(config), levels, (width, height)


def _decode_hypotheses(golden: Golden, output: np.ndarray, output_bound: np.ndarray, reference, priors: int,
                       n_classes: int):
    """Every tested decode bug as (cause, detail, scores, score_tol, boxes, box_tol), each made
    from the head ``output`` with :mod:`refghost.detector.decode`; those that change the number of
    priors or classes only when the candidate has ``priors`` priors and ``n_classes`` classes."""
    settings, levels, size = _head(golden)
    classes, reg_max, strides, offset = (settings[k] for k in ("num_classes", "reg_max", "strides", "prior_offset"))
    scores, score_bound, boxes, box_bound = reference

    def bounded(cause, detail, n_classes, n_reg, level_sizes, level_strides, prior_offset, out=output,
                out_bound=output_bound):
        d = decode_bounds(out, out_bound, n_classes, n_reg, level_sizes, level_strides, prior_offset, size)
        return cause, detail, d.scores, d.score_bound, d.boxes, d.box_bound

    for other in sorted({offset + 0.5, offset - 0.5, *dd.PRIOR_OFFSETS.values()} - {offset}):
        yield bounded("prior_offset", f"prior offset {other:g} instead of {offset:g}", classes, reg_max, levels,
                      strides, other)
    alternatives = {tuple(strides[:-1]), tuple(2 * s for s in strides), tuple(s // 2 for s in strides if s > 1),
                    tuple(strides) + (2 * strides[-1],)}
    for alt in sorted(alternatives - {tuple(strides)}):
        if not alt:
            continue
        alt_levels = dd.head_level_sizes(size, alt)  # the levels a decoder with these strides builds
        alt_priors = sum(h * w for h, w in alt_levels)
        if alt_priors == priors <= output.shape[1]:
            yield bounded("strides", f"strides {alt} instead of {tuple(strides)}", classes, reg_max, alt_levels,
                          alt, offset, output[:, :priors], output_bound[:, :priors])
        if len(alt) == len(strides):  # the network's levels, another stride per level
            yield bounded("strides", f"strides {alt} instead of {tuple(strides)}", classes, reg_max, levels, alt,
                          offset)
    s = np.clip(scores, 1e-300, 1 - 1e-16)
    lo, hi = np.clip(s - score_bound, 1e-300, 1), np.clip(s + score_bound, 0, 1 - 1e-16)
    slope = 1 / np.minimum(lo * (1 - lo), hi * (1 - hi))
    logits = np.log(s) - np.log1p(-s)
    yield ("sigmoid_missing", "the class scores are logits", logits,
           2 * score_bound * slope + 16 * U * (1 + np.abs(logits)), boxes, box_bound)
    doubled = 1 / (1 + np.exp(-scores))
    yield "sigmoid_doubled", "sigmoid of the probabilities", doubled, score_bound / 4 + 16 * U, boxes, box_bound
    # the integral over the wrong axis
    centers, prior_strides = dd.center_priors(levels, strides, offset, dtype=np.float64)
    reg = output[..., classes:]
    bins = reg_max + 1
    tol = 4 * box_bound + 1e-6 * np.abs(boxes)
    sides = dd.softmax(reg.reshape(*reg.shape[:-1], 4, bins), axis=-2)
    over_sides = np.tensordot(sides, np.arange(bins, dtype=np.float64), axes=([-1], [0]))
    yield ("integral_axis", "softmax over the four sides", scores, score_bound,
           dd.distance2bbox(centers, over_sides * prior_strides[:, None], size), tol)
    interleaved = reg.reshape(*reg.shape[:-1], bins, 4).swapaxes(-1, -2).reshape(reg.shape)
    yield ("integral_axis", "the bins read side-interleaved", scores, score_bound,
           dd.distance2bbox(centers, dd.integral(interleaved, reg_max) * prior_strides[:, None], size), tol)
    channels = output.shape[2]
    for other_reg in range(0, (channels - 1) // 4):
        other_classes = channels - 4 * (other_reg + 1)
        if other_reg != reg_max and other_classes == n_classes:
            yield bounded("class_count", f"{other_classes} classes and reg_max {other_reg} instead of {classes} and "
                                         f"{reg_max}", other_classes, other_reg, levels, strides, offset)
    for other_reg in range(reg_max):  # fewer bins read, the classes right
        narrow = output[..., :classes + 4 * (other_reg + 1)]
        yield bounded("reg_max", f"reg_max {other_reg} instead of {reg_max}", classes, other_reg, levels, strides,
                      offset, narrow, output_bound[..., :narrow.shape[2]])


def judge_decode(golden: Golden, scores, boxes, *, output=None) -> DecodeResult:
    """The candidate's decoded priors against the golden's.

    scores : (N, P, C) the class score of every prior; boxes : (N, P, 4) its box (x1, y1, x2, y2)
        in network-input pixels, before NMS (what :func:`refghost.detector.decode.decode` gives)
    output : optional (N, P, C + 4*(reg_max+1)), the candidate's own head output; given, the
        decode is judged in isolation: against the float64 decode of that output, within the
        decode's own rounding (``decode_bounds`` with a zero output bound). Without it, against
        the golden's ``decode.*`` within their stored bounds (an honest float32 network and decode).

    A failure is named by the hypothesis of :func:`_decode_hypotheses` that fits
    :data:`MATCH_SHARE` of the scores and of the boxes within its own bound.
    """
    if not golden.detector:
        return DecodeResult(NOT_JUDGED, None, f"decode: {_BACKBONE}", np.nan, np.nan, -1, -1, (), "golden")
    scores = _float(scores, "decoded scores", 3)
    boxes = _float(boxes, "decoded boxes", 3)
    settings, levels, size = _head(golden)
    if output is None:
        head_output = golden.outputs["output"]
        head_bound = golden.bounds["output"].astype(np.float64)
        reference = (golden.detector["decode.scores"], golden.bounds["decode.scores"].astype(np.float64),
                     golden.detector["decode.boxes"], golden.bounds["decode.boxes"].astype(np.float64))
        source = "golden"
    else:
        head_output = _float(output, "candidate output", 3)
        if head_output.shape != golden.outputs["output"].shape:
            raise CompareError(f"candidate output has shape {head_output.shape}, the golden's "
                               f"{golden.outputs['output'].shape}")
        head_bound = np.zeros_like(head_output)
        d = decode_bounds(head_output, head_bound, settings["num_classes"], settings["reg_max"], levels,
                          settings["strides"], settings["prior_offset"], size)
        reference = (d.scores, d.score_bound, d.boxes, d.box_bound)
        source = "candidate output"
    ref_scores, score_bound, ref_boxes, box_bound = reference

    def result(verdict, cause, message, score_ratio=np.inf, box_ratio=np.inf, so=-1, bo=-1, worst=()):
        return DecodeResult(verdict, cause, message, float(score_ratio), float(box_ratio), int(so), int(bo),
                            tuple(int(v) for v in worst), source)

    if scores.shape == ref_scores.shape and boxes.shape == ref_boxes.shape:
        score_err, box_err = np.abs(scores - ref_scores), np.abs(boxes - ref_boxes)
        score_out = ~(score_err <= score_bound)
        box_out = ~(box_err <= box_bound)
        sr, br = _ratio(score_err, score_bound), _ratio(box_err, box_bound)
        per_prior = np.maximum(_ratios(score_err, score_bound).max(axis=2), _ratios(box_err, box_bound).max(axis=2))
        worst = np.unravel_index(int(np.argmax(per_prior)), per_prior.shape)
        figures = (sr, br, score_out.sum(), box_out.sum(), worst)
        if not score_out.any() and not box_out.any():
            return result(PASS, None, f"decode: scores and boxes within their bounds (max {sr:.2f} and {br:.2f} of "
                                      f"them)", *figures)
    else:
        figures = ()
    for cause, detail, h_scores, h_score_tol, h_boxes, h_box_tol in _decode_hypotheses(
            golden, head_output, head_bound, reference, scores.shape[1], scores.shape[2]):
        if h_scores.shape != scores.shape or h_boxes.shape != boxes.shape:
            continue
        if (np.mean(np.abs(scores - h_scores) <= h_score_tol) >= MATCH_SHARE
                and np.mean(np.abs(boxes - h_boxes) <= h_box_tol) >= MATCH_SHARE):
            return result(FAIL, cause, f"decode differs from the {source}'s: likely {CAUSES[cause]} ({detail})",
                          *figures)
    if not figures:
        return result(FAIL, "shape", f"decode: scores {scores.shape} and boxes {boxes.shape}, the golden's "
                                     f"{ref_scores.shape} and {ref_boxes.shape}; {CAUSES['unknown']}")
    part = " and ".join(p for p, r in (("scores", figures[0]), ("boxes", figures[1])) if r > 1)
    return result(FAIL, "unknown", f"decode: {part} beyond their bounds (max {max(figures[:2]):.3g}x, worst image "
                                   f"{figures[4][0]} prior {figures[4][1]}); {CAUSES['unknown']}", *figures)


# ============================================================================================
# Detections
# ============================================================================================


@dataclass(frozen=True)
class DetectionsResult:
    """The verdict on a candidate's detections (after NMS, in original-image pixels).

    matched : stable golden detections the candidate has, box and score within bound
    unstable : detections honest either way (near the score threshold, the NMS threshold, a tie
        of scores, or the max_detections cut) that the golden or the candidate kept
    missing : stable golden detections the candidate lacks (including moved or relabelled ones)
    extra : candidate detections matching nothing (including moved or relabelled ones)
    issues : one line per missing or extra detection, with its cause
    score_threshold, iou_threshold, max_detections : the thresholds judged under
    """

    verdict: str
    cause: str | None
    message: str
    matched: int
    unstable: int
    missing: int
    extra: int
    issues: tuple
    score_threshold: float
    iou_threshold: float
    max_detections: int
    stage: str = "detections"


def _iou_interval(a, ea, b, eb):
    """Smallest and largest IoU of boxes within ``ea``/``eb`` (per coordinate) of ``a``/``b``,
    broadcast: (..., 4) each. Conservative: the intersection and the areas are bounded apart."""
    def inter(p, q):
        w = np.maximum(np.minimum(p[..., 2], q[..., 2]) - np.maximum(p[..., 0], q[..., 0]), 0)
        h = np.maximum(np.minimum(p[..., 3], q[..., 3]) - np.maximum(p[..., 1], q[..., 1]), 0)
        return w * h

    def area(p):
        return np.maximum(p[..., 2] - p[..., 0], 0) * np.maximum(p[..., 3] - p[..., 1], 0)

    grow = np.array([-1.0, -1.0, 1.0, 1.0])
    a_hi, b_hi = a + grow * ea, b + grow * eb
    a_lo, b_lo = a - grow * ea, b - grow * eb
    inter_lo, inter_hi = inter(a_lo, b_lo), inter(a_hi, b_hi)
    union_hi = area(a_hi) + area(b_hi) - inter_lo
    union_lo = np.maximum(np.maximum(area(a_lo) + area(b_lo) - inter_hi, area(a_lo)), area(b_lo))
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.where(union_hi > 0, inter_lo / union_hi, 0.0)
        hi = np.where(union_lo > 0, np.minimum(inter_hi / union_lo, 1.0), 1.0)
    return lo * (1 - 8 * U), hi * (1 + 8 * U)  # the IoU's own rounding (four operations, twice)


def _image_fates(scores, score_bound, boxes, box_bound, thresholds):
    """The golden's NMS on one image, and which of its (prior, class) pairs are unstable.

    Returns (items, kept, unstable): ``items`` (prior, label) of every pair that may pass the
    score threshold, ``kept`` the items the golden keeps (before the cut) in its order,
    ``unstable`` a boolean per item.
    """
    score_threshold, iou_threshold, _ = thresholds
    margin = score_bound + U * abs(score_threshold)  # the candidate compares with float32(threshold)
    prior, label = np.nonzero(scores + margin > score_threshold)
    s, b = scores[prior, label], margin[prior, label]
    box, ebox = boxes[prior], box_bound[prior]
    # the candidate's NMS shifts boxes by label * (max coordinate + 1), in its own precision
    shift = label * (boxes.max() + 1)
    ebox = ebox + 2 * U * (np.abs(box) + shift[:, None])
    unstable = np.abs(s - score_threshold) <= b
    det = dd.multiclass_nms(boxes, scores, score_threshold, iou_threshold, -1)
    lookup = {(int(lb), float(sc), tuple(bx)): i for i, (lb, sc, bx) in enumerate(zip(label, s, map(tuple, box)))}
    kept = np.array([lookup[(int(lb), float(sc), tuple(bx))] for lb, sc, bx in
                     zip(det.labels, det.scores, map(tuple, det.boxes))], dtype=np.int64)
    is_kept = np.zeros(len(prior), dtype=bool)
    is_kept[kept] = True
    # who may suppress whom: i possibly before j, and their IoU possibly above the threshold;
    # robust: i surely before j and their IoU surely above it
    incoming = [[] for _ in range(len(prior))]  # j -> [(i, robust)]
    for c in np.unique(label):
        idx = np.flatnonzero(label == c)
        if idx.size < 2:
            continue
        lo, hi = _iou_interval(box[idx, None], ebox[idx, None], box[None, idx], ebox[None, idx])
        may = (s[idx, None] + b[idx, None] >= s[None, idx] - b[None, idx]) & (hi > iou_threshold)
        surely = (s[idx, None] - b[idx, None] > s[None, idx] + b[None, idx]) & (lo > iou_threshold)
        np.fill_diagonal(may, False)
        for i, j in zip(*np.nonzero(may)):
            incoming[idx[j]].append((idx[i], bool(surely[i, j])))
    # j is unstable when it is not surely suppressed (by a stable kept pair, robustly) and a kept pair
    # may or may not suppress it, or an unstable one may; the set only grows: iterate to the fixpoint
    changed = True
    while changed:
        changed = False
        for j in np.flatnonzero(~unstable):
            edges = incoming[j]
            if any(robust and is_kept[i] and not unstable[i] for i, robust in edges):
                continue
            if any(unstable[i] or (is_kept[i] and not robust) for i, robust in edges):
                unstable[j] = changed = True
    return (prior, label, s, b), kept, unstable


def _cut(kept, unstable, s, b, max_detections):
    """Which kept items are surely in the top ``max_detections``, tied at the cut (unstable), or
    surely out. Returns (present, tied) boolean arrays over ``kept``."""
    present = np.ones(len(kept), dtype=bool)
    tied = np.zeros(len(kept), dtype=bool)
    if max_detections <= 0 or len(kept) <= 0:
        return present, tied
    ks, kb, ku = s[kept], b[kept], unstable[kept]
    loose = np.flatnonzero(unstable)  # every unstable pair may be kept
    for n in range(len(kept)):
        floor, ceiling = ks[n] - kb[n], ks[n] + kb[n]
        stable_others = ~ku & (np.arange(len(kept)) != n)
        may = np.sum(stable_others & (ks + kb >= floor)) + np.sum(s[loose] + b[loose] >= floor) - (1 if ku[n] else 0)
        surely = np.sum(stable_others & (ks - kb > ceiling))
        if may <= max_detections - 1:
            continue
        if surely >= max_detections:
            present[n] = False
        else:
            tied[n] = True
    return present, tied


def _detection_arrays(detections: dict):
    def get(key):
        for k in (key, f"detections.{key}"):
            if k in detections:
                return np.asarray(detections[k])
        raise CompareError(f"detections need {key!r} (or 'detections.{key}'), got keys {sorted(detections)}")

    boxes = get("boxes").astype(np.float64).reshape(-1, 4)
    scores = get("scores").astype(np.float64).reshape(-1)
    labels = get("labels").astype(np.int64).reshape(-1)
    image = get("image").astype(np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(labels) == len(image):
        raise CompareError(f"detections: {len(image)} images, {len(boxes)} boxes, {len(scores)} scores and "
                           f"{len(labels)} labels; they must be equal in number")
    return image, boxes, scores, labels


def _original_bound(box_bound: np.ndarray, boxes_o: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """A box bound in network-input pixels mapped to original pixels through ``inv(matrix)``
    (an affine scale + translation: each side's bound divided by the scale along it), plus the
    rounding of the candidate's own float32 warp and clip (``4u|x|``)."""
    linear = np.abs(np.linalg.inv(matrix)[:2, :2])
    bx, by = np.maximum(box_bound[:, 0], box_bound[:, 2]), np.maximum(box_bound[:, 1], box_bound[:, 3])
    ox, oy = linear[0, 0] * bx + linear[0, 1] * by, linear[1, 0] * bx + linear[1, 1] * by
    return np.stack([ox, oy, ox, oy], axis=1) + 4 * U * np.abs(boxes_o)


def _iou(a, b) -> float:
    """The IoU of two boxes (x1, y1, x2, y2)."""
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def judge_detections(golden: Golden, detections: dict, *, score_threshold: float | None = None,
                     iou_threshold: float | None = None, max_detections: int | None = None) -> DetectionsResult:
    """The candidate's detections against the golden's, under the thresholds the candidate used.

    detections : ``image`` (K,) row of the batch, ``boxes`` (K, 4) (x1, y1, x2, y2) in original
        image pixels, ``scores`` (K,), ``labels`` (K,) (or the ``detections.*`` keys of
        :func:`refghost.run`)
    score_threshold, iou_threshold, max_detections : the candidate's post-processing (default the
        golden's root attributes; NanoDet's C++ demos use 0.4 and 0.5). The golden's detections
        are re-derived under them from its ``decode.*`` (:func:`refghost.detector.decode.multiclass_nms`,
        then :func:`~refghost.detector.decode.warp_boxes` through ``inv(M)``).
    """
    if not golden.detector:
        return DetectionsResult(NOT_JUDGED, None, f"detections: {_BACKBONE}", 0, 0, 0, 0, (), np.nan, np.nan, 0)
    given = {"score_threshold": score_threshold, "iou_threshold": iou_threshold, "max_detections": max_detections}
    for name, value in given.items():
        kind = int if name == "max_detections" else float
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not np.isfinite(value) or (kind is int and value != int(value))):
            raise CompareError(f"{name} must be a finite {'integer' if kind is int else 'number'}, got {value!r}")
    thresholds = tuple(kind(golden.attrs[name] if value is None else value)
                       for (name, value), kind in zip(given.items(), (float, float, int)))
    c_image, c_boxes, c_scores, c_labels = _detection_arrays(detections)
    stage = golden.detector
    scores_all, boxes_all = stage["decode.scores"], stage["decode.boxes"]
    score_bounds = golden.bounds["decode.scores"].astype(np.float64)
    box_bounds = golden.bounds["decode.boxes"].astype(np.float64)
    n_images = scores_all.shape[0]
    if c_image.size and (c_image.min() < 0 or c_image.max() >= n_images):
        raise CompareError(f"detections name image {int(c_image.max())}; the golden has {n_images}")
    matched = unstable_count = 0
    issues = []
    causes = []
    for n in range(n_images):
        (prior, label, s, b), kept, unstable = _image_fates(scores_all[n], score_bounds[n], boxes_all[n],
                                                            box_bounds[n], thresholds)
        present, tied = _cut(kept, unstable, s, b, thresholds[2])
        unstable[kept[tied]] = True
        matrix = stage["preprocess.matrices"][n]
        width, height = (int(v) for v in stage["preprocess.original_sizes"][n])
        box_o = dd.warp_boxes(boxes_all[n][prior], np.linalg.inv(matrix), width, height)
        bound_o = _original_bound(box_bounds[n][prior], box_o, matrix)
        mine = np.flatnonzero(c_image == n)
        free = np.ones(len(mine), dtype=bool)

        def fits(i, j):
            return (c_labels[j] == label[i] and abs(c_scores[j] - s[i]) <= b[i]
                    and np.all(np.abs(c_boxes[j] - box_o[i]) <= bound_o[i]))

        def take(i):
            for position, j in enumerate(mine):
                if free[position] and fits(i, j):
                    free[position] = False
                    return True
            return False

        stable_kept = [i for i, p in zip(kept, present) if p and not unstable[i]]
        missing = [i for i in stable_kept if not take(i)]
        matched += len(stable_kept) - len(missing)
        kept_unstable = {int(i) for i, p in zip(kept, present | tied) if p and unstable[i]}
        for i in np.flatnonzero(unstable):  # honest either way: claim what matches, count what shows
            if take(i) or i in kept_unstable:
                unstable_count += 1
        extras = [mine[p] for p in np.flatnonzero(free)]
        for i in missing:
            cause, partner = "missing", None
            for j in extras:
                same_box = np.all(np.abs(c_boxes[j] - box_o[i]) <= bound_o[i])
                if c_labels[j] == label[i] and same_box:
                    cause, partner = "score_moved", j
                elif c_labels[j] == label[i] and _iou(c_boxes[j], box_o[i]) >= 0.5:
                    cause, partner = "box_moved", j
                elif c_labels[j] != label[i] and same_box and abs(c_scores[j] - s[i]) <= b[i]:
                    cause, partner = "wrong_label", j
                if partner is not None:
                    break
            text = (f"image {n}: golden label {int(label[i])} score {s[i]:.4f} box "
                    f"{np.array2string(box_o[i], precision=2)}")
            if partner is not None:
                extras.remove(partner)
                text += (f" -> candidate label {int(c_labels[partner])} score {c_scores[partner]:.4f} box "
                         f"{np.array2string(c_boxes[partner], precision=2)}")
            issues.append(f"{cause}: {text}")
            causes.append(cause)
        for j in extras:
            issues.append(f"extra: image {n}: candidate label {int(c_labels[j])} score {c_scores[j]:.4f} box "
                          f"{np.array2string(c_boxes[j], precision=2)}")
            causes.append("extra")
    n_missing = sum(c != "extra" for c in causes)
    n_extra = sum(c != "missing" for c in causes)
    settings = f"score > {thresholds[0]:g}, IoU > {thresholds[1]:g}, at most {thresholds[2]}"
    counts = f"{matched} matched, {unstable_count} unstable (honest either way), {n_missing} missing, {n_extra} extra"
    if not causes:
        verdict, cause, message = PASS, None, f"detections ({settings}): {counts}"
    else:
        cause = max(dict.fromkeys(causes), key=causes.count)
        verdict = FAIL
        message = f"detections ({settings}): {counts}; likely {CAUSES[cause]}: {issues[causes.index(cause)]}"
    return DetectionsResult(verdict, cause, message, matched, unstable_count, n_missing, n_extra, tuple(issues),
                            *thresholds)


#: The candidate arrays each stage reads (a dump's keys, as ``refghost run --out`` writes them).
STAGE_KEYS = {
    "input": ("input",),
    "decode": ("decode.scores", "decode.boxes"),
    "detections": ("detections.image", "detections.boxes", "detections.scores", "detections.labels"),
}


def judge_stages(golden: Golden, tensors: dict) -> list:
    """The records of every stage whose arrays the candidate has (:data:`STAGE_KEYS`), in the
    order input, decode, detections; the decode judged on its own too when the candidate's
    ``output`` is there. A backbone golden judges the input only."""
    results = []
    if "input" in tensors:
        results.append(judge_input(golden, tensors["input"]))
    if not golden.detector:
        return results
    if all(k in tensors for k in STAGE_KEYS["decode"]):
        results.append(judge_decode(golden, tensors["decode.scores"], tensors["decode.boxes"],
                                    output=tensors.get("output")))
    if all(k in tensors for k in STAGE_KEYS["detections"]):
        results.append(judge_detections(golden, {k: tensors[k] for k in STAGE_KEYS["detections"]}))
    return results
