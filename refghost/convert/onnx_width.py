"""The width multiplier of a GhostNet, from its conv weight shapes alone.

The stem conv's output channels bound the width multiplier to an interval; every width at which
some channel count of the stage table changes its rounding (:func:`refghost.arch.make_divisible`)
is a breakpoint, and one width per interval between breakpoints is tried: the widths whose folded
``build_graph(...).param_shapes`` have exactly the graph's conv weight shapes are the answer.
None (or two different shape sets) is refused. Widths that give the same shapes describe the
same network; the simplest one is recorded (a common multiplier such as 0.5 or 1.0 if it is one
of them, else the shortest decimal).
"""

from __future__ import annotations

import math

from ..arch import (CHANNEL_DIVISOR, DEFAULT_OUT_STAGES, MIN_ROUNDED_FRACTION, STAGES, STEM_CHANNELS, Config, Graph,
                    build_graph, make_divisible)
from ..errors import WeightsError

#: Multipliers tried first when several widths give the same network (NanoDet, Huawei, timm).
COMMON_WIDTHS = (1.0, 0.5, 1.5, 1.3, 0.75, 2.0, 0.25, 1.25, 1.75)
#: Every channel count of the stage table that the width multiplier scales.
_BASE_CHANNELS = tuple(sorted({STEM_CHANNELS} | {b.mid for s in STAGES for b in s}
                              | {b.out for s in STAGES for b in s}))


def _conv_shape_key(width: float) -> tuple[int, ...]:
    return tuple(make_divisible(c * width) for c in _BASE_CHANNELS)


def _width_breakpoints(lo: float, hi: float) -> list[float]:
    """Widths in [lo, hi] at which some scaled channel count changes its rounding."""
    d, f = CHANNEL_DIVISOR, MIN_ROUNDED_FRACTION
    points = {lo, hi}
    for c in _BASE_CHANNELS:
        # int(c*w + d/2) // d steps where c*w + d/2 = d*m; the 10% rule bumps d*m where c*w = d*m / f
        for m in range(max(1, math.floor((c * lo + d / 2) / d)), math.ceil((c * hi + d / 2) / d) + 1):
            for w in ((d * m - d / 2) / c, d * m / (f * c)):
                if lo <= w <= hi:
                    points.add(w)
    return sorted(points)


def conv_weight_shapes(graph: Graph) -> list[tuple[int, ...]]:
    """The conv weight shapes of a refghost graph, sorted (the width's fingerprint)."""
    return sorted(s for s in graph.param_shapes.values() if len(s) == 4)


def recognise_width(shapes, arch: str = "nanodet", num_classes: int = 0, where: str = "<onnx>") -> float:
    """The width multiplier whose GhostNet has exactly these conv weight shapes (any order).

    The stem's output channels bound the width to an interval; one width per interval between
    rounding breakpoints of the stage table's channel counts is tried (see the module docstring).
    Raises WeightsError when none matches, or when two different shape sets would.
    """
    shapes = sorted(tuple(int(d) for d in s) for s in shapes)
    stems = [s for s in shapes if s[1:] == (3, 3, 3)]
    if not stems:
        raise WeightsError(f"{where}: not recognised as a GhostNet: no 3x3 conv on 3 input channels (the stem)")
    stem = max(s[0] for s in stems)
    # make_divisible(c w) == stem (c: STEM_CHANNELS, d: CHANNEL_DIVISOR, f: MIN_ROUNDED_FRACTION):
    # c w rounds to stem (c w in [stem - d/2, stem + d/2)) or to stem - d and is bumped by the 10%
    # rule (c w > (stem - d) / f); unless the rule bumps it further.
    c, d, f = STEM_CHANNELS, CHANNEL_DIVISOR, MIN_ROUNDED_FRACTION
    lo = 1e-3 if stem == d else min(stem - d / 2, (stem - d) / f) / c
    hi = max(stem + d / 2, stem / f) / c
    points = _width_breakpoints(lo, hi)
    trials = set(points) | {(a + b) / 2 for a, b in zip(points, points[1:])}
    trials |= {w for w in COMMON_WIDTHS if lo <= w <= hi}
    groups: dict[tuple, list[float]] = {}
    for w in sorted(trials):
        if make_divisible(c * w) == stem:
            groups.setdefault(_conv_shape_key(w), []).append(w)
    matches, nearest = [], None
    for key, widths in groups.items():
        expected = conv_weight_shapes(build_graph(ghostnet_config(arch, widths[0], "ReLU", num_classes)))
        if expected == shapes:
            matches.append((key, widths))
        elif len(expected) == len(shapes):
            diff = sum(a != b for a, b in zip(expected, shapes))
            if nearest is None or diff < nearest[0]:
                nearest = (diff, widths[0], expected)
    if not matches:
        hint = ""
        if nearest is not None:
            _, w, expected = nearest
            first = next((a, b) for a, b in zip(expected, shapes) if a != b)
            hint = (f"; the closest, width {_simplest(groups[_conv_shape_key(w)]):g}, differs in "
                    f"{nearest[0]} conv weight shape(s), e.g. it has {list(first[0])} where the graph has "
                    f"{list(first[1])}")
        raise WeightsError(f"{where}: the conv weight shapes match no GhostNet width ({arch}, stem of {stem} "
                           f"channels: width between {lo:.3g} and {hi:.3g} tried){hint}")
    if len(matches) > 1:
        raise WeightsError(f"{where}: the conv weight shapes match {len(matches)} different GhostNet widths "
                           f"({', '.join(f'{_simplest(w):g}' for _, w in matches)}): ambiguous")
    key, widths = matches[0]
    return _simplest(widths)


def _simplest(widths: list[float]) -> float:
    """The simplest multiplier giving the same channel counts as ``widths`` (which all do)."""
    key = _conv_shape_key(widths[0])
    for w in COMMON_WIDTHS:
        if _conv_shape_key(w) == key:
            return w
    for digits in range(1, 7):
        for w in widths:
            r = round(w, digits)
            if r > 0 and _conv_shape_key(r) == key:
                return r
    return widths[0]


def ghostnet_config(arch, width, activation, num_classes, out_stages=DEFAULT_OUT_STAGES, folded=True) -> Config:
    """The Config of a GhostNet read from ONNX: ``ghostnet`` (ReLU, a classifier) or ``nanodet``."""
    if arch == "ghostnet":
        return Config(arch="ghostnet", width=width, activation="ReLU", num_classes=num_classes, folded=folded)
    return Config(arch="nanodet", width=width, activation=activation, out_stages=out_stages, folded=folded)
