"""Compare a backend's tensors with a golden file: pass/fail per tensor, and the first wrong layer.

For every golden tensor (in forward order) that the candidate also has:

* **accumulated** check: ``|candidate - oracle| <= bound`` elementwise, where ``bound`` is the
  probabilistic bound of an honest backend of the chosen precision policy
  (:data:`refghost.bounds.POLICIES`; it carries the rounding of every layer before this one). The
  golden file stores the float32 bounds; other policies' are computed from the golden's input
  and weights (not scaled: an error that crosses a ReLU's kink under float16 does not under
  float32);
* **isolated** check: the layer is recomputed in float64 from the candidate's *own* inputs to it
  (and, where the candidate lacks a tensor in between, from the nearest ones it has, over at most
  ``MAX_SEGMENT`` layers), and ``|candidate - recomputed| <= worst-case bound`` of that layer's
  own rounding (``refghost.bounds.segment_bound``). A runtime may fuse a layer with the ones
  before it (Conv+BN+ReLU, a conv with the hard-sigmoid as post-op) and still expose those
  layers' outputs, computed separately: the layer then also counts as honest when it is within
  the bound of the fused chain recomputed from that chain's inputs (up to ``FUSED_DEPTH``
  layers back). A layer that breaks every such check computes a different function from the
  reference: this is where a bug starts.

``first_divergent`` is the first tensor, in forward order, whose isolated check fails (or, when
no isolated check was possible, the first whose accumulated check fails); the other failures of
the isolated check are ranked by how far beyond their bounds they are. When the chosen policy
fails, the looser policies are tried in turn and the report says which one the errors fit
(``consistent with bfloat16 storage``). Tolerances come from ``refghost.bounds``;
``atol``/``rtol`` replace them with ``atol + rtol*|reference|`` when given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..bounds import BOUND_MODEL, DEFAULT_LAMBDA, POLICIES, as_policy, covers, error_bounds, segment_bound
from ..errors import CompareError
from ..runtimes import format_parts
from ..threads import single_threaded_blas
from .golden import Golden

#: Longest chain of layers recomputed for one isolated check (e.g. a fused Conv+BN+ReLU is 3).
MAX_SEGMENT = 6
#: How many computing layers before a layer a runtime may have fused with it (Conv+BN+act: 2).
FUSED_DEPTH = 2
#: Ops a runtime fuses into the kernel of the op they follow.
_FUSIBLE = {"conv", "batch_norm", "act", "hard_sigmoid", "linear"}
#: When at least this share of the tensors from the first one on fail, the weights or the
#: preprocessing probably differ, rather than one layer.
_EVERYTHING_DIFFERS = 0.9
#: A failure of at least this share of the isolated checks is widespread (a lower precision
#: rounds every layer more coarsely; a bug breaks one layer and its copies).
_WIDESPREAD = 0.2


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
    #: the tightest policy under which every check passes, when ``policy`` itself fails (or None)
    consistent_with: str | None = None
    #: every tensor whose isolated check failed, as (name, ratio), largest ratio first
    isolated_failures: list = field(default_factory=list)
    #: what ran the candidate (runtime, version, options, precision), when a runtime did
    runtime: dict = field(default_factory=dict)
    diagnosis: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        failed = sum(t.status != "ok" for t in self.tensors)
        return (f"Report({'PASS' if self.passed else 'FAIL'}, golden={self.golden!r}, candidate={self.candidate!r}, "
                f"policy={self.policy!r}, {len(self.tensors)} tensors, {failed} not ok, "
                f"first_divergent={self.first_divergent!r})")

    def to_json(self) -> dict:
        clean = json_number
        tensors = [{k: clean(v) for k, v in asdict(t).items()} for t in self.tensors]
        report = {"golden": self.golden, "candidate": self.candidate, "policy": self.policy,
                  "passed": self.passed, "first_divergent": self.first_divergent,
                  "consistent_with": self.consistent_with,
                  "isolated_failures": [[n, clean(r)] for n, r in self.isolated_failures],
                  "diagnosis": self.diagnosis, "notes": self.notes, "tensors": tensors}
        if self.runtime:
            report["runtime"] = self.runtime
        return report


def json_number(v):
    """``v`` as the JSON reports write it: NaN as null, infinities as ``"inf"``/``"-inf"``, any
    other value unchanged."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _ordered_ints(a: np.ndarray) -> np.ndarray:
    """Map floats to integers whose differences count the representable values between them."""
    nbits = 8 * a.dtype.itemsize
    i = a.view({16: np.int16, 32: np.int32, 64: np.int64}[nbits]).astype(np.int64)
    return np.where(i < 0, np.int64(-(1 << (nbits - 1))) - i, i)  # negatives: count down from -0


def _ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Representable values of a's dtype between a and b (as float64: it may exceed 2^63)."""
    return np.abs(_ordered_ints(a).astype(np.float64) - _ordered_ints(b).astype(np.float64))


def error_ratio(err: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """err / bound elementwise: 0 where both are 0, inf where only the bound is 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(err == 0, 0.0, err / bound)


def _metrics(cand: np.ndarray, ref: np.ndarray, cand_dtype) -> dict:
    """The policy-independent metrics of one tensor (the ratios to a bound are the judge's)."""
    diff = np.abs(cand - ref)
    abs_ref = np.abs(ref)
    rel = diff / np.where(abs_ref > 0, abs_ref, np.inf)
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


def _segments(golden: Golden, node: str, available: set) -> list[list[str]]:
    """The chains an honest runtime may have computed ``node`` with: from the available tensors,
    and with the computing layers just before it fused in (their exposed outputs ignored), up to
    ``FUSED_DEPTH`` layers back. The first is the plain isolated segment."""
    graph = golden.weights.graph
    available = set(available) - {node}
    chains, fused = [], []
    frontier = [node]
    for depth in range(FUSED_DEPTH + 1):
        segment = _segment(golden, node, available - set(fused))
        if segment is None:
            break
        if segment not in chains:
            chains.append(segment)
        # the producers of the frontier that a runtime would fuse into the frontier's kernel
        producers = [src for name in frontier for src in graph.node(name).inputs
                     if src != "input" and graph.node(src).op in _FUSIBLE and src not in fused]
        if not producers or graph.node(frontier[0]).op not in _FUSIBLE | {"add"}:
            break
        fused += producers
        frontier = producers
    return chains


@dataclass
class _Tensor:
    """One candidate tensor that can be judged: its result row, float64 values, error to the oracle."""

    result: TensorResult
    value: np.ndarray  # float64
    error: np.ndarray  # |candidate - oracle|
    segments: list  # isolated-check chains (empty: no isolated check possible)


def accumulated_bounds(golden: Golden, policy) -> dict[str, np.ndarray]:
    """The accumulated bound of every golden tensor under ``policy``: the stored ones when they were
    computed by this bound model for float32, else computed now (kept in ``golden.derived_bounds``)."""
    cache = golden.derived_bounds
    if policy.name in cache:
        return cache[policy.name]
    stored_ok = (policy.name == "float32" and golden.attrs.get("bound_model") == BOUND_MODEL
                 and float(golden.attrs.get("bound_lambda", DEFAULT_LAMBDA)) == DEFAULT_LAMBDA)
    if stored_ok:
        bounds = {name: b.astype(np.float64) for name, b in golden.bounds.items()}
    else:
        with single_threaded_blas():
            _, by_node = error_bounds(golden.weights.graph, golden.weights.params("float64"),
                                      golden.input.astype(np.float64), policy=policy, lam=DEFAULT_LAMBDA)
        bounds = {name: by_node[golden.node_of(name)] for name in golden.tensors()}
    cache[policy.name] = bounds
    return bounds


def _judge(golden: Golden, tensors: list[_Tensor], by_node: dict, policy, atol, rtol, values_cache=None) -> dict:
    """Accumulated and isolated ratios of every tensor under ``policy`` (or atol/rtol when given).

    ``values_cache``: the isolated chains' float64 values, kept across the policies of one
    comparison (:func:`refghost.bounds.segment_bound`).
    Returns ``{name: (accumulated_ratio, fraction_outside, worst_index, isolated_ratio, segment)}``."""
    explicit = atol is not None or rtol is not None
    atol, rtol = atol or 0.0, rtol or 0.0
    graph = golden.weights.graph
    params = golden.weights.params("float64")
    reference = golden.tensors()
    bounds = None if explicit else accumulated_bounds(golden, policy)
    out = {}
    with single_threaded_blas():
        for t in tensors:
            name = t.result.name
            bound = atol + rtol * np.abs(reference[name]) if explicit else bounds[name]
            ratio = error_ratio(t.error, bound)
            worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape) if ratio.size else ()
            iso, iso_segment = None, []
            for segment in t.segments:
                value, seg_bound = segment_bound(graph, segment, by_node, params, policy=policy, eta=policy.eta,
                                                 values_cache=values_cache)
                if explicit:
                    seg_bound = atol + rtol * np.abs(value)
                r = error_ratio(np.abs(t.value - value), seg_bound)
                if iso is None:
                    iso, iso_segment = r, segment
                else:  # honest if within the bound of any of the chains
                    better = float(np.max(np.minimum(iso, r), initial=0.0)) < float(np.max(iso, initial=0.0))
                    iso = np.minimum(iso, r)
                    if better:
                        iso_segment = segment
            out[name] = (float(np.max(ratio, initial=0.0)), float(np.mean(t.error > bound)) if t.error.size else 0.0,
                         [int(i) for i in worst], None if iso is None else float(np.max(iso, initial=0.0)), iso_segment)
    return out


def _verdict(judged: dict) -> bool:
    return all(acc <= 1.0 and (iso is None or iso <= 1.0) for acc, _, _, iso, _ in judged.values())


def compare(golden: Golden, candidate: dict[str, np.ndarray], *, policy: str = "float32",
            atol: float | None = None, rtol: float | None = None, candidate_name: str = "candidate",
            notes=(), diagnose: bool = True, runtime: dict | None = None, separate_outputs: bool = False) -> Report:
    """Compare ``candidate`` (``{module path or output name: array}``) with ``golden``.

    ``policy`` is a name of :data:`refghost.bounds.POLICIES`. With ``diagnose`` (the default), a
    failing comparison is judged again under each looser policy, and the report says which one
    the errors fit (:attr:`Report.consistent_with`). ``runtime`` describes what ran the
    candidate, for the report. ``separate_outputs``: the outputs come from another run than the
    intermediates (a runtime's deployed run), so an output is not recomputed from intermediates.
    """
    try:
        pol = as_policy(policy)
    except ValueError:
        raise CompareError(f"policy must be one of {tuple(POLICIES)}, got {policy!r}") from None
    explicit = atol is not None or rtol is not None
    reference = golden.tensors()
    common = [name for name in reference if name in candidate]
    if not common:
        raise CompareError(f"{candidate_name} has no tensor in common with the golden file (it has "
                           f"{_few(candidate)}; the golden has {_few(reference)}); name arrays by module path "
                           f"or use --map")
    # The candidate's tensors by graph node (an output name stands for its node), plus the input it was fed.
    by_node = {"input": golden.input}
    results, judged_tensors = [], []
    notes = list(notes)
    with single_threaded_blas():  # the norms of the metrics: OpenBLAS threads only contend here
        for name in common:
            _admit(name, reference[name], candidate[name], golden, by_node, results, judged_tensors, notes,
                   separate_outputs)
    own = {t.result.name for t in judged_tensors}
    for t in judged_tensors:
        node = golden.node_of(t.result.name)
        if (t.result.name != node and node in own) or (separate_outputs and t.result.name in golden.outputs):
            continue  # an output alias of a layer checked under its own name, or an output of another run
        t.segments = _segments(golden, node, set(by_node))

    values_cache = {}
    judged = _judge(golden, judged_tensors, by_node, pol, atol, rtol, values_cache)
    for t in judged_tensors:
        r = t.result
        r.accumulated_ratio, r.fraction_outside, r.worst_index, r.isolated_ratio, r.isolated_segment = judged[r.name]
        if r.accumulated_ratio > 1.0 or (r.isolated_ratio is not None and r.isolated_ratio > 1.0):
            r.status = "mismatch"
    isolated_failures = sorted(((r.name, r.isolated_ratio) for r in results
                                if r.isolated_ratio is not None and r.isolated_ratio > 1.0), key=lambda nr: -nr[1])
    first = None
    for r in results:
        if r.status in ("shape", "nan") or (r.isolated_ratio is not None and r.isolated_ratio > 1.0):
            first = r.name
            break
    if first is None:
        first = next((r.name for r in results if r.status != "ok"), None)
        if first is not None:
            notes.append("no layer failed its isolated check; first_divergent is the first tensor outside its "
                         "accumulated bound")
    if not any(r.isolated_ratio is not None for r in results):
        notes.append("no isolated check was possible (the candidate lacks the inputs of its tensors): "
                     "provide intermediates to localize a mismatch")
    passed = all(r.status == "ok" for r in results)
    report = Report(golden.path or "<golden>", candidate_name, pol.name, results, first, passed, notes,
                    isolated_failures=isolated_failures, runtime=dict(runtime or {}))
    if not passed and not explicit:
        failing = [t for t in judged_tensors if t.result.status != "ok"]
        _diagnose(report, golden, judged_tensors, failing, by_node, pol, diagnose, values_cache)
    return report


def _admit(name, ref, cand, golden, by_node, results, judged_tensors, notes, separate_outputs) -> None:
    """Check one candidate tensor's shape and values and record it for judging (and, unless it is an
    output of a separate run, as its node's value for the isolated checks of the layers after it)."""
    keep = not (separate_outputs and name != golden.node_of(name))
    cand = np.asarray(cand)
    if cand.shape != ref.shape and cand.size == ref.size and ref.shape[0] == 1 and cand.shape == ref.shape[1:]:
        cand = cand.reshape(ref.shape)
        notes.append(f"{name}: candidate has no batch axis; compared as {ref.shape}")
    if cand.shape != ref.shape:
        results.append(TensorResult(name, list(cand.shape), "shape",
                                    note=f"candidate shape {cand.shape}, golden {ref.shape}"))
        return
    if not np.isfinite(cand).all():
        bad = int(cand.size - np.isfinite(cand).sum())
        results.append(TensorResult(name, list(cand.shape), "nan", fraction_outside=bad / cand.size,
                                    note=f"{bad} NaN or Inf value(s)"))
        if keep:
            _keep(by_node, golden, name, cand.astype(np.float64))
        return
    cand64 = cand.astype(np.float64)
    if keep:
        _keep(by_node, golden, name, cand64)
    result = TensorResult(name, list(cand.shape), "ok", **_metrics(cand64, ref, cand.dtype))
    results.append(result)
    judged_tensors.append(_Tensor(result, cand64, np.abs(cand64 - ref), []))


def _diagnose(report: Report, golden: Golden, tensors: list[_Tensor], failing: list[_Tensor], by_node: dict, policy,
              looser: bool, values_cache: dict) -> None:
    """Say what the failure looks like: one kind of layer computing another function, another
    input, a looser honest precision, different weights or preprocessing, or one layer computing
    a different function (:mod:`.diagnosis`).

    The isolated checks come first: when they fail for one kind of layer only (every BatchNorm,
    every LeakyReLU), that kind computes another function, and neither a lower precision nor other
    weights is offered. A looser policy explains a failure only when the failure is widespread (at
    least ``_WIDESPREAD`` of the isolated checks fail, as when every layer is rounded more coarsely)
    or no layer fails its isolated check; a failure of a few layers that a looser policy hides is a
    difference smaller than that policy's rounding, not a sign of it.

    ``failing`` are the tensors that failed under ``policy``: a looser policy that
    :func:`refghost.bounds.covers` it has bounds at least as large elementwise, so the tensors that
    passed pass under it too, and only the failed ones are judged again (every tensor otherwise)."""
    from .diagnosis import input_finding, kind_finding

    results = report.tensors
    structural = any(r.status in ("shape", "nan") for r in results)
    checked = [r for r in results if r.isolated_ratio is not None]
    failures = report.isolated_failures
    graph = golden.weights.graph
    failed_nodes = [golden.node_of(n) for n, _ in failures]
    kind = kind_finding(graph, golden.weights.params("float64"), [golden.node_of(r.name) for r in checked],
                        failed_nodes, by_node)
    if kind is not None:
        report.diagnosis.append(kind.message())
        return
    if input_finding(graph, failed_nodes) and len(checked) > len(failures):
        report.diagnosis.append(
            f"only the layer{'s' if len(failures) > 1 else ''} reading the network input ({_few(failed_nodes)}) "
            f"fail{'' if len(failures) > 1 else 's'} the isolated check, and every later layer computes the right "
            f"function from its own input: the candidate was fed another input than the golden's (preprocessing: "
            f"channel order, mean/std, resize, layout), or its first layer has other weights")
        return
    widespread = not failures or len(failures) >= _WIDESPREAD * len(checked)
    if looser and not structural:
        names = list(POLICIES)
        for name in names[names.index(policy.name) + 1:]:
            again = failing if covers(name, policy) else tensors
            if not _verdict(_judge(golden, again, by_node, POLICIES[name], None, None, values_cache)):
                continue
            if widespread:
                report.consistent_with = name
                reported = report.runtime.get("policy")
                report.diagnosis.append(
                    f"the errors are those of an honest backend with {POLICIES[name].description}: every check "
                    f"passes under --policy {name}; no layer computes a different function at that precision"
                    + (f" (the runtime reports {reported}: check its precision settings)" if reported else ""))
            else:
                verb = "fails its" if len(failures) == 1 else "fail their"
                report.diagnosis.append(
                    f"only {len(failures)} of {len(checked)} layers {verb} isolated check: a localized "
                    f"difference, not a lower precision (--policy {name} would pass it only because its rounding "
                    f"is coarser than this difference)")
            break
    failing = [r for r in results if r.status != "ok"]
    if (report.consistent_with is None and failing and results[0].status != "ok"
            and len(failing) >= _EVERYTHING_DIFFERS * len(results)):
        report.diagnosis.append(
            f"every layer from the first ({results[0].name}) on differs: the candidate probably uses other weights "
            f"or another preprocessing (channel order, mean/std, resize) than the golden file; compare "
            f"`refghost info` of the golden with what the candidate was built from")
    if report.consistent_with is None and len(failures) > 1:
        ranked = ", ".join(f"{n} ({r:.3g}x)" for n, r in failures[:5])
        report.diagnosis.append(f"{len(failures)} layers compute a different function even from their own inputs; "
                                f"furthest beyond their bounds: {ranked}; the first in network order is "
                                f"{report.first_divergent}")


def _keep(by_node: dict, golden: Golden, name: str, value: np.ndarray) -> None:
    """Record a candidate tensor as its node's value; a tensor named by the node itself wins over an
    output alias (a backend may produce the two in different runs, e.g. ONNX Runtime's deployed
    run for the outputs and an all-tensors run for the intermediates)."""
    node = golden.node_of(name)
    if name == node or node not in by_node:
        by_node[node] = value


def _hows(mapping: dict) -> dict[str, int]:
    """How many tensors of a runtime's mapping were matched each way."""
    hows: dict[str, int] = {}
    for entry in mapping.values():
        how = entry["how"].split(":")[0]  # "by structure: Convolution 12 (line 4)" counts as "by structure"
        hows[how] = hows.get(how, 0) + 1
    return hows


def _few(names) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")


LEGEND = ("acc/bound: the largest |candidate - oracle| / (bound of an honest backend, carrying every earlier "
          "layer's rounding); iso/bound: the layer recomputed from the candidate's own inputs, its largest "
          "error / (worst-case rounding of that layer alone). Both pass at <= 1; '-' no check possible; "
          "'inf' a nonzero error where no honest error is possible (the bound is 0, e.g. a ReLU's zeros); an "
          "iso/bound of 1 on a passing layer is a result one full rounding away from the exact value, the most an "
          "honest rounding can be (residual adds, BN outputs)")


def format_report(report: Report, *, verbose: bool = False) -> str:
    """The human report: verdict and diagnosis first, then the failing tensors with the rows around
    them (every row with ``verbose``), then a legend."""
    lines = [f"golden    {report.golden}", f"candidate {report.candidate}"]
    if report.runtime:
        run = report.runtime
        p = run["precision"]
        lines.append(f"runtime   {run['runtime']} {run['version']}: precision in effect arithmetic {p['arithmetic']}, "
                     f"weights {p['weights']}, activations {p['activations']} ({p['detail']})")
        lines.append(f"mapping   {run['mapped']} of {run['exposed']} exposed tensors mapped to layers "
                     f"({', '.join(f'{n} {how}' for how, n in _hows(run['mapping']).items())})"
                     + (f"; {format_parts(run['parts'])}" if run.get("parts") else "")
                     + ("" if verbose else "; every match: --verbose or refghost map"))
        if verbose:
            width = max((len(k) for k in run["mapping"]), default=0)
            lines += [f"          {tensor:<{width}}  {entry['module']:<44} {entry['how']}"
                      for tensor, entry in run["mapping"].items()]
    lines.append(f"policy    {report.policy} ({POLICIES[report.policy].description})")
    lines += [f"note      {n}" for n in report.notes]
    n = len(report.tensors)
    if report.passed:
        worst_acc = max((t.accumulated_ratio for t in report.tensors), default=0.0)
        isos = [t.isolated_ratio for t in report.tensors if t.isolated_ratio is not None]
        iso = f"largest iso/bound {max(isos):.3g}" if isos else "no isolated check was possible"
        lines.append(f"PASS: all {n} compared tensors are within the bounds of an honest {report.policy} backend "
                     f"(largest acc/bound {worst_acc:.3g}, {iso})")
    else:
        bad = sum(t.status != "ok" for t in report.tensors)
        lines.append(f"FAIL: {bad} of {n} tensors out of bounds; first divergent layer: {report.first_divergent}")
        first = next(t for t in report.tensors if t.name == report.first_divergent)
        if first.isolated_ratio is not None and first.isolated_ratio > 1:
            lines.append(f"  {first.name} computes a different function from the reference even from its own "
                         f"inputs (error {first.isolated_ratio:.3g}x the largest honest rounding error); the layers "
                         f"after it inherit the difference.")
        elif first.status in ("shape", "nan"):
            lines.append(f"  {first.name}: {first.note}")
        else:
            earlier = report.tensors[:report.tensors.index(first)]
            if earlier and all(t.status == "ok" for t in earlier):
                lines.append(f"  {first.name} is further from the oracle than honest rounding explains "
                             f"({first.accumulated_ratio:.3g}x its bound) while every tensor before it passes: the "
                             f"difference arises in {first.name} or in what is computed between it and the last "
                             f"tensor before it (no isolated check was possible for it)")
            else:
                lines.append(f"  {first.name} is further from the oracle than honest rounding explains "
                             f"({first.accumulated_ratio:.3g}x its bound); provide the inputs of this layer to tell "
                             f"whether it or an earlier layer is at fault.")
    lines += [f"  {d}" for d in report.diagnosis]
    rows = _rows_to_show(report, verbose)
    if rows:
        lines.append(f"  {'layer':<42} {'shape':<18} {'max abs':>9} {'acc/bound':>9} {'iso/bound':>9} "
                     f"{'cosine':>9} {'SNR dB':>7}  status")
        previous = -1
        for i in rows:
            if i != previous + 1:
                lines.append(f"  ... ({_rows(i - previous - 1)} within bounds)")
            t = report.tensors[i]
            mark = ">" if t.name == report.first_divergent else " "
            iso = "-" if t.isolated_ratio is None else f"{t.isolated_ratio:9.3g}"
            lines.append(f"{mark} {t.name:<42} {str(tuple(t.shape)):<18} {t.max_abs:9.2e} {t.accumulated_ratio:9.3g} "
                         f"{iso:>9} {t.cosine:9.6f} {t.snr_db:7.1f}  {t.status}{'  ' + t.note if t.note else ''}")
            previous = i
        if previous != n - 1:
            lines.append(f"  ... ({_rows(n - 1 - previous)} within bounds)")
        lines.append(f"  ({LEGEND})")
    elif not verbose:
        lines.append("  (every row: --verbose; every metric: --json)")
    return "\n".join(lines)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _rows_to_show(report: Report, verbose: bool) -> list[int]:
    """Indices of the rows to print: every row with ``verbose``; else the failing rows, each with
    the row before and after it for context (none for a pass)."""
    n = len(report.tensors)
    if verbose:
        return list(range(n))
    show = set()
    for i, t in enumerate(report.tensors):
        if t.status != "ok":
            show.update(j for j in (i - 1, i, i + 1) if 0 <= j < n)
    return sorted(show)
