"""Compare a backend's tensors with a golden file: pass/fail per tensor, and the first wrong layer.

For every golden tensor (in forward order) that the candidate also has:

* **accumulated** check: ``|candidate - oracle| <= bound`` elementwise, where ``bound`` is the
  golden file's probabilistic bound for an honest backend of the chosen precision (it carries the
  rounding of every layer before this one);
* **isolated** check: the layer is recomputed in float64 from the candidate's *own* inputs to it
  (and, where the candidate lacks a tensor in between, from the nearest ones it has, over at most
  ``MAX_SEGMENT`` layers), and ``|candidate - recomputed| <= worst-case bound`` of that layer's
  own rounding (``refghost.bounds.segment_bound``). A layer that breaks it computes a different
  function from the reference: this is where a bug starts.

``first_divergent`` is the first tensor, in forward order, whose isolated check fails (or, when
no isolated check was possible, the first whose accumulated check fails). Tolerances come from
``refghost.bounds``; ``atol``/``rtol`` replace them with ``atol + rtol*|reference|`` when given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .bounds import FLOAT32_U, UNDERFLOW, UNIT_ROUNDOFF, segment_bound
from .errors import RefghostError
from .forward import single_threaded_blas
from .golden import Golden

#: Longest chain of layers recomputed for one isolated check (e.g. a fused Conv+BN+ReLU is 3).
MAX_SEGMENT = 6
POLICIES = ("float32", "float16", "bfloat16")


class CompareError(RefghostError):
    """Nothing comparable: no tensor in common, an unreadable candidate, a mismatched input."""


@dataclass
class TensorResult:
    """The verdict and metrics of one compared tensor."""

    name: str
    shape: list
    status: str  # "ok", "mismatch", "shape", "nan"
    max_abs: float = math.nan
    max_rel: float = math.nan
    mean_abs: float = math.nan
    cosine: float = math.nan
    snr_db: float = math.nan
    max_ulp: float = math.nan
    worst_index: list = field(default_factory=list)
    fraction_outside: float = math.nan
    accumulated_ratio: float = math.nan  # max |error| / bound over the tensor
    isolated_ratio: float | None = None  # max |error| / bound of the isolated check, None if not done
    isolated_segment: list = field(default_factory=list)  # the layers recomputed for it
    min_atol: float = math.nan  # smallest atol that passes with rtol = 0
    min_rtol: float = math.nan  # smallest rtol that passes with atol = 0
    note: str = ""


@dataclass
class Report:
    """The outcome of a comparison; ``to_json()`` gives the ``--json`` report."""

    golden: str
    candidate: str
    policy: str
    tensors: list[TensorResult]
    first_divergent: str | None
    passed: bool
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        failed = sum(t.status != "ok" for t in self.tensors)
        return (f"Report({'PASS' if self.passed else 'FAIL'}, golden={self.golden!r}, candidate={self.candidate!r}, "
                f"policy={self.policy!r}, {len(self.tensors)} tensors, {failed} not ok, "
                f"first_divergent={self.first_divergent!r})")

    def to_json(self) -> dict:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
            return v

        tensors = [{k: clean(v) for k, v in asdict(t).items()} for t in self.tensors]
        return {"golden": self.golden, "candidate": self.candidate, "policy": self.policy,
                "passed": self.passed, "first_divergent": self.first_divergent, "notes": self.notes,
                "tensors": tensors}


def _ordered_ints(a: np.ndarray) -> np.ndarray:
    """Map floats to integers whose differences count the representable values between them."""
    nbits = 8 * a.dtype.itemsize
    i = a.view({16: np.int16, 32: np.int32, 64: np.int64}[nbits]).astype(np.int64)
    return np.where(i < 0, np.int64(-(1 << (nbits - 1))) - i, i)  # negatives: count down from -0


def _ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Representable values of a's dtype between a and b (as float64: it may exceed 2^63)."""
    return np.abs(_ordered_ints(a).astype(np.float64) - _ordered_ints(b).astype(np.float64))


def _ratio(err: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """err / bound elementwise: 0 where both are 0, inf where only the bound is 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(err == 0, 0.0, err / bound)


def _metrics(cand: np.ndarray, ref: np.ndarray, bound: np.ndarray, cand_dtype) -> dict:
    diff = np.abs(cand - ref)
    ratio = _ratio(diff, bound)
    abs_ref = np.abs(ref)
    rel = diff / np.where(abs_ref > 0, abs_ref, np.inf)
    worst = np.unravel_index(int(np.argmax(ratio)), diff.shape) if diff.size else ()
    noise = float(np.sum((cand - ref) ** 2))
    signal = float(np.sum(ref ** 2))
    norms = float(np.linalg.norm(cand) * np.linalg.norm(ref))
    dtype = np.dtype(cand_dtype) if np.dtype(cand_dtype).kind == "f" else np.dtype(np.float64)
    ulp = _ulp_distance(cand.astype(dtype), ref.astype(dtype))
    return dict(
        max_abs=float(diff.max(initial=0.0)),
        max_rel=float(rel.max(initial=0.0)),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        cosine=float(np.sum(cand * ref) / norms) if norms > 0 else (1.0 if noise == 0 else 0.0),
        snr_db=float(10 * math.log10(signal / noise)) if noise > 0 else math.inf,
        max_ulp=float(ulp.max(initial=0)),
        worst_index=[int(i) for i in worst],
        fraction_outside=float(np.mean(diff > bound)) if diff.size else 0.0,
        accumulated_ratio=float(np.max(ratio, initial=0.0)),
        min_atol=float(diff.max(initial=0.0)),
        min_rtol=float(rel.max(initial=0.0)),
    )


def _segment(golden: Golden, node: str, available: set) -> list[str] | None:
    """Nodes to recompute, in forward order, so that ``node`` is computed from available tensors."""
    graph = golden.weights.graph
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    needed, stack = set(), [node]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if len(needed) > MAX_SEGMENT:
            return None
        for src in graph.node(name).inputs:
            if src not in available:
                stack.append(src)
    return sorted(needed, key=order.__getitem__)


def compare(golden: Golden, candidate: dict[str, np.ndarray], *, policy: str = "float32",
            atol: float | None = None, rtol: float | None = None, candidate_name: str = "candidate",
            notes=()) -> Report:
    """Compare ``candidate`` (``{module path or output name: array}``) with ``golden``."""
    if policy not in POLICIES:
        raise CompareError(f"policy must be one of {POLICIES}, got {policy!r}")
    explicit = atol is not None or rtol is not None
    atol, rtol = atol or 0.0, rtol or 0.0
    u = UNIT_ROUNDOFF[policy]
    scale = u / float(golden.attrs.get("bound_unit_roundoff", FLOAT32_U))
    reference = golden.tensors()
    common = [name for name in reference if name in candidate]
    if not common:
        raise CompareError(f"{candidate_name} has no tensor in common with the golden file (it has "
                           f"{_few(candidate)}; the golden has {_few(reference)}); name arrays by module path "
                           f"or use --map")
    graph = golden.weights.graph
    params = golden.weights.params("float64")
    # The candidate's tensors by graph node (an output name stands for its node), plus the input it was fed.
    by_node = {"input": golden.input}
    own = {}  # each compared tensor, float64
    results = []
    notes = list(notes)
    for name in common:
        ref = reference[name]
        cand = np.asarray(candidate[name])
        if cand.shape != ref.shape and cand.size == ref.size and ref.shape[0] == 1 and cand.shape == ref.shape[1:]:
            cand = cand.reshape(ref.shape)
            notes.append(f"{name}: candidate has no batch axis; compared as {ref.shape}")
        if cand.shape != ref.shape:
            results.append(TensorResult(name, list(cand.shape), "shape",
                                        note=f"candidate shape {cand.shape}, golden {ref.shape}"))
            continue
        if not np.isfinite(cand).all():
            bad = int(cand.size - np.isfinite(cand).sum())
            results.append(TensorResult(name, list(cand.shape), "nan", fraction_outside=bad / cand.size,
                                        note=f"{bad} NaN or Inf value(s)"))
            _keep(by_node, golden, name, cand.astype(np.float64))
            continue
        cand64 = own[name] = cand.astype(np.float64)
        _keep(by_node, golden, name, cand64)
        bound = atol + rtol * np.abs(ref) if explicit else golden.bounds[name].astype(np.float64) * scale
        result = TensorResult(name, list(cand.shape), "ok", **_metrics(cand64, ref, bound, cand.dtype))
        results.append(result)

    with single_threaded_blas():
        for result in results:
            if result.status != "ok":
                continue
            node = golden.node_of(result.name)
            if result.name != node and node in own:
                continue  # an output alias of a layer checked under its own name (maybe another run)
            segment = _segment(golden, node, set(by_node) - {node})
            if segment is None:
                continue
            value, bound = segment_bound(graph, segment, by_node, params, u=u, eta=UNDERFLOW[policy])
            if explicit:
                bound = atol + rtol * np.abs(value)
            err = np.abs(own[result.name] - value)
            result.isolated_ratio = float(np.max(_ratio(err, bound), initial=0.0))
            result.isolated_segment = segment

    first = None
    for result in results:
        failed_isolated = result.isolated_ratio is not None and result.isolated_ratio > 1.0
        if result.status == "ok" and (result.accumulated_ratio > 1.0 or failed_isolated):
            result.status = "mismatch"
        if first is None and (result.status in ("shape", "nan") or failed_isolated):
            first = result.name
    if first is None:
        first = next((r.name for r in results if r.status != "ok"), None)
        if first is not None:
            notes.append("no layer failed its isolated check; first_divergent is the first tensor outside its "
                         "accumulated bound")
    if not any(r.isolated_ratio is not None for r in results):
        notes.append("no isolated check was possible (the candidate lacks the inputs of its tensors): "
                     "provide intermediates to localize a mismatch")
    passed = all(r.status == "ok" for r in results)
    return Report(golden.path or "<golden>", candidate_name, policy, results, first, passed, notes)


def _keep(by_node: dict, golden: Golden, name: str, value: np.ndarray) -> None:
    """Record a candidate tensor as its node's value; a tensor named by the node itself wins over an
    output alias (a backend may produce the two in different runs, e.g. ONNX Runtime's deployed
    run for the outputs and an all-tensors run for the intermediates)."""
    node = golden.node_of(name)
    if name == node or node not in by_node:
        by_node[node] = value


def _few(names) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")


def format_report(report: Report) -> str:
    """The human table: one row per compared tensor in network order, the first divergent marked."""
    lines = [f"golden    {report.golden}", f"candidate {report.candidate}", f"policy    {report.policy}"]
    lines += [f"note      {n}" for n in report.notes]
    lines.append(f"  {'layer':<42} {'shape':<18} {'max abs':>9} {'acc/bound':>9} {'iso/bound':>9} "
                 f"{'cosine':>9} {'SNR dB':>7}  status")
    for t in report.tensors:
        mark = ">" if t.name == report.first_divergent else " "
        iso = "-" if t.isolated_ratio is None else f"{t.isolated_ratio:9.3g}"
        lines.append(f"{mark} {t.name:<42} {str(tuple(t.shape)):<18} {t.max_abs:9.2e} {t.accumulated_ratio:9.3g} "
                     f"{iso:>9} {t.cosine:9.6f} {t.snr_db:7.1f}  {t.status}{'  ' + t.note if t.note else ''}")
    if report.passed:
        lines.append(f"PASS: all {len(report.tensors)} compared tensors are within the bounds of an honest "
                     f"{report.policy} backend")
    else:
        bad = sum(t.status != "ok" for t in report.tensors)
        lines.append(f"FAIL: {bad} of {len(report.tensors)} tensors out of bounds; first divergent layer: "
                     f"{report.first_divergent}")
        first = next(t for t in report.tensors if t.name == report.first_divergent)
        if first.isolated_ratio is not None and first.isolated_ratio > 1:
            lines.append(f"  {first.name} computes a different function from the reference even from its own "
                         f"inputs (error {first.isolated_ratio:.3g}x the largest honest rounding error); the layers "
                         f"after it inherit the difference.")
        elif first.status in ("shape", "nan"):
            lines.append(f"  {first.name}: {first.note}")
        else:
            lines.append(f"  {first.name} is further from the oracle than honest rounding explains "
                         f"({first.accumulated_ratio:.3g}x its bound); provide the inputs of this layer to tell "
                         f"whether it or an earlier layer is at fault.")
    return "\n".join(lines)
