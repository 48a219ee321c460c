"""Verification over a dataset: every image judged on its own, only a per-layer summary kept.

One task per image (or per golden file of a folder): preprocess the image as ``refghost run``
does, compute the float64 oracle with every intermediate and its bounds
(:func:`refghost.verify.golden.make_golden`), run the candidate model in its runtime
and judge it (:func:`refghost.verify.judge.judge`, as ``refghost compare`` does one candidate).
A golden with intermediates is 340 MB at 320x320, so a task returns only an
:class:`ImageResult` (every tensor's accumulated and isolated ratio to its bound, the verdict,
the first divergent layer); nothing is stored unless ``keep_failing`` names a folder, where the
golden, the candidate's tensors and the full report of each failing image are written.

The tasks run on Dask's ``distributed`` (the ``refghost[dataset]`` extra): on a
``LocalCluster`` of ``workers`` processes (spawned, one thread each), or on an existing cluster
given by its scheduler address. The local run is a cluster run so that both share one path: a
worker that dies is restarted by its nanny and its task rescheduled by the scheduler, up to
Dask's ``distributed.scheduler.allowed-failures`` times, then reported as lost
(``KilledWorker``); a task that was running on a worker that died is reported as retried (the
scheduler's ``remove-worker`` events name those tasks). A ``concurrent.futures`` process pool
would fail every image in flight when one worker dies, without saying which one killed it.

:func:`summarize` folds the results (in image-name order, whatever order they finished in) into
a :class:`DatasetReport`: the worst ratio of every layer over the images, which images fail where,
and the first divergent layer of each failing image.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import RefghostError
from .judge import Candidate, judge

__all__ = ["Candidate", "DatasetReport", "ImageResult", "Job", "LayerSummary", "STAGES", "format_report",
           "run_set", "run_task", "sources", "summarize"]

#: The stages of a task, timed (``ImageResult.seconds``).
STAGES = ("preprocess", "oracle", "candidate", "compare", "keep")


@dataclass(frozen=True)
class Job:
    """What every task of a set needs (sent to the workers with each task; small and picklable).

    ``weights``/``warp_kernel``: how an image becomes the network input (None for golden files);
    ``candidate``: what is judged (None: ``golden_out`` is written instead);
    ``golden_out``: the folder ``refghost golden --images`` writes one golden per image to,
    with every intermediate when ``intermediates``; ``keep_failing``: the folder for failing images."""

    weights: str | None = None
    warp_kernel: str | None = None
    candidate: Candidate | None = None
    golden_out: str | None = None
    intermediates: bool = True
    keep_failing: str | None = None
    command: str = ""


@dataclass
class ImageResult:
    """What one task gives back: the verdict on one source (an image or a golden file)."""

    source: str
    status: str  # "pass", "fail", "error" (the source or the candidate was unusable), "lost", "written"
    first_divergent: str | None = None
    consistent_with: str | None = None
    diagnosis: list = field(default_factory=list)
    error: str = ""
    #: every compared tensor in network order: [name, status, accumulated ratio, isolated ratio or None]
    layers: list = field(default_factory=list)
    kept: list = field(default_factory=list)  # files written for it (--keep-failing, golden --images)
    attempts: int = 1
    seconds: dict = field(default_factory=dict)  # stage -> seconds

    @property
    def name(self) -> str:
        return os.path.basename(self.source)


def stem(source: str) -> str:
    """The name a source's files are written under: ``photo.jpg`` -> ``photo``."""
    return os.path.splitext(os.path.basename(source))[0]


def sources(folder: str, kind: str) -> list[str]:
    """The sources of a set, sorted by name: the image files of ``folder`` (``kind="images"``) or its
    golden files (``kind="goldens"``, ``*.h5``/``*.hdf5``). Raises RefghostError if there is none,
    or (images) if two would be written under one name."""
    if not os.path.isdir(folder):
        raise RefghostError(f"{folder}: no such folder")
    if kind == "images":
        from ..runner import image_files

        found = image_files(folder)
        seen = {}
        for path in found:
            if stem(path) in seen:
                raise RefghostError(f"{seen[stem(path)]} and {path} would both be written as {stem(path)}.h5: "
                                    f"rename one")
            seen[stem(path)] = path
        return found
    found = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith((".h5", ".hdf5")))
    if not found:
        raise RefghostError(f"{folder}: no golden files (.h5) in this folder")
    return found


@functools.lru_cache(maxsize=2)
def _weights(path: str):
    """The weights file, read once per worker process."""
    from ..weights import load_weights

    return load_weights(path)


#: glibc malloc settings for a task's process (mallopt parameter -> value). Dask's nanny starts
#: workers with MALLOC_TRIM_THRESHOLD_=65536, which turns glibc's adaptive mmap threshold off: every
#: array over 128 KiB is then a fresh mmap, page-faulted in, and a 320x320 task took 4-5x as long
#: (10 s instead of 2 s to compare). A task sets the mmap threshold to the adaptive one's ceiling
#: and trims the heap only when more than 256 MiB are free.
_MALLOPT = {-3: 32 << 20, -1: 256 << 20}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


@functools.lru_cache(maxsize=1)
def _tune_malloc() -> None:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    for param, value in _MALLOPT.items():
        libc.mallopt(param, value)


def _golden_of(job: Job, source: str, seconds: dict):
    """The golden of one source: read from a golden file, or computed from an image."""
    from .golden import make_golden, read_golden

    if job.weights is None:
        t0 = time.perf_counter()
        golden = read_golden(source)
        seconds["oracle"] = time.perf_counter() - t0
        return golden
    from ..runner import prepare_input

    t0 = time.perf_counter()
    weights = _weights(job.weights)
    x = prepare_input(source, weights, np.float32, job.warp_kernel)
    t1 = time.perf_counter()
    golden = make_golden(weights, x, intermediates=job.intermediates, input_source=source, command=job.command,
                         warp_kernel=job.warp_kernel)
    seconds["preprocess"], seconds["oracle"] = t1 - t0, time.perf_counter() - t1
    return golden


def run_task(job: Job, source: str) -> ImageResult:
    """One source, end to end (runs in a worker). An unusable source or candidate is an ``error``
    result, not an exception: a failing image never stops the others."""
    import numba

    from .golden import write_golden

    _tune_malloc()
    numba.set_num_threads(min(job.candidate.threads if job.candidate else 1, numba.config.NUMBA_NUM_THREADS))
    seconds = {}
    try:
        golden = _golden_of(job, source, seconds)
        if job.candidate is None:
            t0 = time.perf_counter()
            path = os.path.join(job.golden_out, stem(source) + ".h5")
            write_golden(path, golden)
            seconds["keep"] = time.perf_counter() - t0
            return ImageResult(source, "written", kept=[path], seconds=seconds)
        judgement = judge(job.candidate, golden)
        seconds.update(judgement.seconds)
        report, tensors = judgement.report, judgement.tensors
    except RefghostError as exc:
        return ImageResult(source, "error", error=str(exc), seconds=seconds)
    result = ImageResult(source, "pass" if report.passed else "fail", report.first_divergent,
                         report.consistent_with, list(report.diagnosis), seconds=seconds,
                         layers=[[t.name, t.status, t.accumulated_ratio, t.isolated_ratio] for t in report.tensors])
    if not report.passed and job.keep_failing:
        t0 = time.perf_counter()
        result.kept = _keep(job, source, golden, report, tensors)
        seconds["keep"] = time.perf_counter() - t0
    return result


def _keep(job: Job, source: str, golden, report, tensors: dict) -> list[str]:
    """Write a failing image's golden (unless it came from a golden file), the candidate's tensors
    (.npz) and the full report (.json) to ``job.keep_failing``; returns the paths."""
    import json

    from ..atomic import atomic_path
    from .golden import write_golden

    base = os.path.join(job.keep_failing, stem(source))
    paths = []
    if job.weights is not None:
        write_golden(base + ".h5", golden)
        paths.append(base + ".h5")
    with atomic_path(base + ".candidate.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in tensors.items()})
    with atomic_path(base + ".json") as tmp, open(tmp, "w") as f:
        json.dump(report.to_json(), f, indent=1)
    return paths + [base + ".candidate.npz", base + ".json"]


# --- running the tasks ------------------------------------------------------------------------
def default_workers() -> int:
    """One local worker per core."""
    return os.cpu_count() or 1


def run_set(job: Job, items: list[str], *, workers: int | None = None, scheduler: str | None = None,
            progress: bool = True, cluster=None) -> list[ImageResult]:
    """Run :func:`run_task` on every source of ``items`` and return the results in ``items``' order.

    The tasks run on the Dask cluster at ``scheduler`` (``tcp://host:8786``), on ``cluster`` (a
    ``distributed`` cluster object), or on a ``LocalCluster`` of ``workers`` processes (default: the
    cores). ``progress``: a tqdm bar on stderr (sources done, failures so far, rate, time left)."""
    try:
        import distributed
        import tqdm  # noqa: F401 - the progress bar of _gather, checked before a cluster starts
    except ImportError:
        raise RefghostError('verifying a set needs Dask\'s distributed and tqdm: pip install "refghost[dataset]"') \
            from None
    local = None
    if scheduler is None and cluster is None:
        import logging

        import dask

        # one task at a time per worker: a worker that dies is then blamed on that task alone
        with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
            local = cluster = distributed.LocalCluster(n_workers=workers or default_workers(), threads_per_worker=1,
                                                       processes=True, dashboard_address=":0",
                                                       silence_logs=logging.ERROR)
    try:
        try:
            client = distributed.Client(scheduler or cluster, timeout=30)
        except (OSError, ValueError) as exc:  # ValueError: an address distributed cannot parse
            raise RefghostError(f"--scheduler {scheduler}: no Dask scheduler answers there ({exc})") from None
        with client:
            return _gather(client, job, items, progress)
    finally:
        if local is not None:
            local.close()


def _gather(client, job: Job, items: list[str], progress: bool) -> list[ImageResult]:
    from distributed import KilledWorker, as_completed
    from tqdm import tqdm

    deaths: dict[str, int] = {}  # task key -> workers that died running it

    def count(event):
        _, msg = event
        if isinstance(msg, dict) and msg.get("action") == "remove-worker" and not msg.get("expected"):
            for key in msg.get("processing-tasks", ()):
                deaths[key] = deaths.get(key, 0) + 1

    client.subscribe_topic("all", count)
    # one task group ("refghost-dataset") sent at once: larger than the cluster, it is queued on the
    # scheduler and handed to workers as they free up
    keys = [f"refghost-dataset-{i}" for i in range(len(items))]
    futures = dict(zip(client.map(run_task, [job] * len(items), items, key=keys, pure=False), items))
    results: dict[str, ImageResult] = {}
    bad = 0
    with tqdm(total=len(items), unit="image", disable=not progress, dynamic_ncols=True) as bar:
        for future in as_completed(futures):
            source = futures[future]
            try:
                result = future.result()
                result.attempts = 1 + deaths.get(future.key, 0)
            except KilledWorker as exc:
                result = ImageResult(source, "lost", attempts=exc.allowed_failures + 1,
                                     error=f"the worker running it died {exc.allowed_failures + 1} times ({exc})")
            except Exception as exc:  # a bug in the task: reported, never dropped
                result = ImageResult(source, "error", error=f"{type(exc).__name__}: {exc}")
            future.release()  # a result held on a worker that dies later would be recomputed
            results[source] = result
            bad += result.status in ("fail", "error", "lost")
            bar.set_postfix_str(f"{bad} failed or not judged", refresh=False)
            bar.update()
    client.unsubscribe_topic("all")
    return [results[item] for item in items]


# --- the summary ------------------------------------------------------------------------------
@dataclass
class LayerSummary:
    """One compared tensor over the set."""

    name: str
    worst_accumulated: float  # the largest accumulated ratio to the bound over the images
    worst_accumulated_image: str
    worst_isolated: float | None  # the largest isolated ratio (None: never checked)
    worst_isolated_image: str | None
    failing_images: list  # the images where this tensor is outside its bound
    first_divergent_in: list  # the failing images whose first divergent layer this is


@dataclass
class DatasetReport:
    """The outcome over a set of sources (``to_json()`` is the ``--json`` report)."""

    folder: str
    candidate: str
    images: list  # ImageResult, by name
    layers: list  # LayerSummary, network order

    @property
    def failing(self) -> list[ImageResult]:
        return [r for r in self.images if r.status == "fail"]

    @property
    def unjudged(self) -> list[ImageResult]:
        return [r for r in self.images if r.status in ("error", "lost")]

    @property
    def retried(self) -> list[ImageResult]:
        return [r for r in self.images if r.attempts > 1]

    @property
    def exit_status(self) -> int:
        """1 if any image fails, else 2 if any could not be judged, else 0."""
        return 1 if self.failing else (2 if self.unjudged else 0)

    @property
    def verdict(self) -> str:
        """The headline of the text and HTML reports, from :attr:`exit_status`."""
        return {0: "PASS", 1: "FAIL", 2: "NOT JUDGED"}[self.exit_status]

    def to_json(self) -> dict:
        from .compare import json_number as clean

        counts = {s: sum(r.status == s for r in self.images) for s in ("pass", "fail", "error", "lost", "written")}
        seconds = {s: sum(r.seconds.get(s, 0.0) for r in self.images) for s in STAGES}
        return {"folder": self.folder, "candidate": self.candidate, "passed": self.exit_status == 0,
                "counts": {k: v for k, v in counts.items() if v or k in ("pass", "fail")},
                "failing": [{"image": r.name, "first_divergent": r.first_divergent,
                             "consistent_with": r.consistent_with, "diagnosis": r.diagnosis, "kept": r.kept}
                            for r in self.failing],
                "not_judged": [{"image": r.name, "status": r.status, "error": r.error} for r in self.unjudged],
                "retried": [{"image": r.name, "attempts": r.attempts} for r in self.retried],
                "layers": [{k: clean(v) for k, v in asdict(layer).items()} for layer in self.layers],
                "images": [{"image": r.name, "source": r.source, "status": r.status,
                            "first_divergent": r.first_divergent, "attempts": r.attempts,
                            "worst_accumulated": clean(max((a for _, _, a, _ in r.layers), key=severity,
                                                           default=math.nan)),
                            "worst_isolated": clean(max((i for _, _, _, i in r.layers if i is not None),
                                                        default=math.nan))}
                           for r in self.images],
                "seconds": seconds}


def severity(ratio: float) -> tuple[bool, float]:
    """Sort key of an error/bound ratio, worst last: NaN (a tensor of the wrong shape, or NaN where
    the oracle is finite) is worse than any number."""
    return (math.isnan(ratio), ratio)


def summarize(folder: str, candidate: str, results: list[ImageResult]) -> DatasetReport:
    """Fold per-image results into a :class:`DatasetReport` (images sorted by name)."""
    results = sorted(results, key=lambda r: r.name)
    layers: dict[str, LayerSummary] = {}
    for r in results:
        for name, status, acc, iso in r.layers:
            layer = layers.get(name)
            if layer is None:
                layer = layers[name] = LayerSummary(name, -math.inf, r.name, None, None, [], [])
            if severity(acc) > severity(layer.worst_accumulated):
                layer.worst_accumulated, layer.worst_accumulated_image = acc, r.name
            if iso is not None and (layer.worst_isolated is None or iso > layer.worst_isolated):
                layer.worst_isolated, layer.worst_isolated_image = iso, r.name
            if status != "ok":
                layer.failing_images.append(r.name)
            if r.status == "fail" and name == r.first_divergent:
                layer.first_divergent_in.append(r.name)
    return DatasetReport(folder, candidate, results, list(layers.values()))


def _fmt_ratio(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def format_report(report: DatasetReport, *, verbose: bool = False) -> str:
    """The text report of a set: verdict, failing images and where each first diverges, the layers
    that fail somewhere (``verbose``: every layer), what could not be judged, retries."""
    n = len(report.images)
    failing, unjudged = report.failing, report.unjudged
    verdict = report.verdict
    lines = [f"{verdict}: {n - len(failing) - len(unjudged)} of {n} images pass, {len(failing)} fail, "
             f"{len(unjudged)} not judged ({report.folder}; candidate {report.candidate})"]
    if failing:
        width = max(len(r.name) for r in failing)
        lines.append("failing images, and the first divergent layer of each:")
        for r in failing:
            extra = f" (errors consistent with {r.consistent_with})" if r.consistent_with else ""
            lines.append(f"  {r.name:<{width}}  {r.first_divergent}{extra}")
    shown = [layer for layer in report.layers if verbose or layer.failing_images]
    if report.layers:
        worst = max(report.layers, key=lambda la: severity(la.worst_accumulated))
        lines.append(f"worst accumulated error / bound: {worst.worst_accumulated:.3g} ({worst.name}, on "
                     f"{worst.worst_accumulated_image})")
    if shown:
        width = max(len(layer.name) for layer in shown)
        lines.append(f"  {'layer':<{width}}  {'acc/bound':>9}  {'iso/bound':>9}  images outside the bound")
        for layer in shown:
            names = ", ".join(layer.failing_images[:5]) + (" ..." if len(layer.failing_images) > 5 else "")
            lines.append(f"  {layer.name:<{width}}  {_fmt_ratio(layer.worst_accumulated):>9}  "
                         f"{_fmt_ratio(layer.worst_isolated):>9}  {len(layer.failing_images)}: {names or '-'}")
    for r in unjudged:
        lines.append(f"not judged: {r.name} ({r.status}): {r.error}")
    for r in report.retried:
        lines.append(f"retried: {r.name} ran {r.attempts} times (a worker died while it was on it)")
    return "\n".join(lines)
