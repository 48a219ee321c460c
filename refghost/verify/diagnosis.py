"""What a failed comparison's isolated checks say about its cause, beyond "this layer differs".

The isolated check recomputes a layer from the candidate's own input to it (:mod:`.compare`), so
its failures point at the layers that compute another function, whatever happened before them.
Their pattern names the cause:

* **one kind of layer** (every BatchNorm, every LeakyReLU, ...) fails while the other layers pass
  theirs: that kind of layer computes another function in the candidate, e.g. another BatchNorm
  epsilon or another LeakyReLU slope; :func:`kind_finding` says which kind and, for those two,
  estimates the parameter that fits the candidate's own inputs and outputs;
* **only the layers that read the network input** fail: every later layer computes the right
  function from its own input, so the candidate was fed another input (preprocessing);
* failures of **several kinds** from the first layer on: other weights (or a lower precision,
  which :func:`refghost.verify.compare.compare` tests separately, and only then).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arch import Node
from ..ops import BN_EPS, LEAKY_RELU_SLOPE

#: At least this share of one kind's isolated checks failing (and at least two of them) makes
#: the kind, not a layer, the finding.
KIND_SHARE = 0.5
#: Elements whose input is farther than this (relative to the tensor's largest input magnitude)
#: from the kink or the mean are used to fit a parameter: near them the ratio is rounding noise.
FIT_MARGIN = 1e-3


def kind_of(node: Node) -> str:
    """The kind a layer belongs to for the diagnosis: its op, an activation by its name."""
    if node.op == "act":
        return node.attrs["activation"]
    return {"batch_norm": "BatchNorm", "conv": "convolution"}.get(node.op, node.op)


@dataclass(frozen=True)
class KindFinding:
    """One kind of layer fails its isolated checks: which, how many of how many, and the
    parameter that fits (name, value, the value refghost uses) where one could be estimated."""

    kind: str
    failed: int
    checked: int
    parameter: tuple[str, float, float] | None = None

    def message(self) -> str:
        text = (f"{'every' if self.failed == self.checked else f'{self.failed} of {self.checked}'} {self.kind} "
                f"layer{'s' if self.checked > 1 else ''} fail{'' if self.checked > 1 else 's'} the isolated check on "
                f"their own input while the other layers pass theirs: the candidate's {self.kind} computes another "
                f"function (not a lower precision, which would round every kind of layer more coarsely)")
        if self.parameter is not None:
            name, value, ours = self.parameter
            text += f"; the {name} that fits is {value:.4g} (refghost, as NanoDet: {ours:g})"
        return text


def kind_finding(graph, params: dict, checked: list[str], failed: list[str], by_node: dict) -> KindFinding | None:
    """The :class:`KindFinding` when the failed isolated checks (node names) are all of one kind
    and at least :data:`KIND_SHARE` of that kind's checked layers (and two of them), else None.
    ``params``: the state_dict arrays in float64; ``by_node``: the candidate's tensors by node
    (float64), for fitting the parameter."""
    nodes = {n.name: n for n in graph.nodes}
    failed_kinds = {kind_of(nodes[name]) for name in failed if name in nodes}
    if len(failed_kinds) != 1:
        return None
    kind = failed_kinds.pop()
    of_kind = [name for name in checked if name in nodes and kind_of(nodes[name]) == kind]
    failing = [name for name in failed if name in nodes]
    if len(failing) < 2 or len(failing) < KIND_SHARE * len(of_kind):
        return None
    fits = {"BatchNorm": _fit_batch_norm_eps, "LeakyReLU": _fit_leaky_slope}
    parameter = None
    if kind in fits:
        values = [v for v in (fits[kind](nodes[name], by_node, params) for name in failing) if v is not None]
        if values:
            name, ours = {"BatchNorm": ("epsilon", BN_EPS), "LeakyReLU": ("negative slope", LEAKY_RELU_SLOPE)}[kind]
            parameter = (name, float(np.median(values)), ours)
    return KindFinding(kind, len(failing), len(of_kind), parameter)


def input_finding(graph, failed: list[str]) -> bool:
    """True when exactly the layers that read the network input fail their isolated checks."""
    readers = {n.name for n in graph.nodes if "input" in n.inputs}
    return bool(failed) and set(failed) <= readers


def _fit_batch_norm_eps(node: Node, by_node: dict, params: dict) -> float | None:
    """The epsilon that makes BatchNorm map the candidate's input to its output:
    ``y = (x - mean) * gamma / sqrt(var + eps) + beta`` solved for ``eps`` per element, the median
    over elements far from the mean (None when the input or output is not exposed)."""
    x, y = by_node.get(node.inputs[0]), by_node.get(node.name)
    if x is None or y is None or "running_var" not in node.params:
        return None
    shape = (1, -1, 1, 1)
    gamma, beta, mean, var = (params[node.params[r]].reshape(shape)
                              for r in ("weight", "bias", "running_mean", "running_var"))
    centred = x - mean
    slope = np.divide(y - beta, centred, out=np.zeros_like(centred), where=centred != 0)
    usable = (np.abs(centred) > FIT_MARGIN * np.abs(centred).max()) & (slope != 0)
    if not usable.any():
        return None
    eps = (np.broadcast_to(gamma, x.shape)[usable] / slope[usable]) ** 2 - np.broadcast_to(var, x.shape)[usable]
    return float(np.median(eps))


def _fit_leaky_slope(node: Node, by_node: dict, params: dict) -> float | None:
    """The negative slope that maps the candidate's negative inputs to its outputs (``y / x``,
    the median over inputs below the kink by more than :data:`FIT_MARGIN`)."""
    x, y = by_node.get(node.inputs[0]), by_node.get(node.name)
    if x is None or y is None:
        return None
    usable = x < -FIT_MARGIN * np.abs(x).max()
    if not usable.any():
        return None
    return float(np.median(y[usable] / x[usable]))

