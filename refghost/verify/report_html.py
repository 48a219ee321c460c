"""A comparison report to look at: one self-contained HTML page, or the same charts as PNG files.

The page reads top to bottom like the text report: the verdict and the diagnosis, a chart of every
compared layer's error as a fraction of its bound (network order, log scale, the bound at 1), for
each failing layer where in its feature map the error sits (per channel, and spatially in the
worst channel), then the full metric table. Figures are drawn by matplotlib (the optional extra
``refghost[report]``) and embedded as inline SVG: the page fetches nothing and opens offline.
The page of a set (:func:`render_dataset_html`) has the same order: the verdict, the failing images
and where each first diverges, every layer's worst ratio over the images, the per-layer table.
"""

from __future__ import annotations

import html
import io
import math
import os
import re

import numpy as np

from ..atomic import atomic_path
from ..bounds import POLICIES
from .compare import LEGEND, Report, accumulated_bounds, error_ratio
from ..errors import RefghostError

#: At most this many failing layers get their own pictures (the first divergent first).
MAX_LAYER_FIGURES = 8


def require_matplotlib():
    """Import matplotlib with a file-only backend, or raise RefghostError naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise RefghostError('--html/--plots need matplotlib: pip install "refghost[report]"') from None
    matplotlib.use("Agg", force=True)
    matplotlib.rcParams["svg.hashsalt"] = "refghost"  # the same ids in every run: the same page
    import matplotlib.pyplot as plt
    return plt


def _failing_layers(report: Report) -> list[str]:
    """The failing tensors to draw: the first divergent, then the others that fail their isolated
    check (where a bug computes; largest ratio first), then those that only inherit an error (the
    accumulated check), in network order."""
    bad = [t.name for t in report.tensors if t.status == "mismatch"]
    own = [name for name, _ in report.isolated_failures if name in bad]
    first = [report.first_divergent] if report.first_divergent in bad else []
    ordered = first + [n for n in own if n not in first] + [n for n in bad if n not in first and n not in own]
    return ordered[:MAX_LAYER_FIGURES]


#: Where the ratio charts draw an exact result (ratio 0) and an off-scale one (inf: an error where
#: the bound is 0; a failed tensor: wrong shape or NaN) on their log axis.
_FLOOR, _TOP = 1e-6, 1e6
_Y_LABEL = f"max error / bound\n(exact: {_FLOOR:g}, off the scale: {_TOP:g})"


def _plotted(ratios, *, failed_at_top: bool = False) -> np.ndarray:
    """Ratios as drawn on a log axis: 0 at :data:`_FLOOR`, inf at :data:`_TOP`, None (not
    checked) missing; NaN (a failed tensor, for accumulated ratios) at the top if
    ``failed_at_top``, else missing."""
    v = np.array([np.nan if r is None else r for r in ratios], dtype=np.float64)
    failed = np.array([r is not None and math.isnan(r) for r in ratios], dtype=bool)
    return np.where(np.isinf(v) | (failed & failed_at_top), _TOP, np.maximum(v, _FLOOR))  # NaN stays NaN


def stage_starts(names: list[str]) -> dict[int, str]:
    """``{index: stage}`` of the first tensor of each stage in network order: the stem's layers
    (``conv_stem``, ``bn1``, ...) under ``stem``, ``blocks.N.*`` under ``blocks.N``, others (the
    head, an output) under their first component."""
    starts: dict[int, str] = {}
    last = None
    for i, name in enumerate(names):
        parts = name.split(".")
        stage = ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 1 else (
            "stem" if parts[0] in ("conv_stem", "bn1", "act1") else parts[0])
        if stage != last:
            starts[i] = stage
            last = stage
    return starts


def _ratios_figure(plt, names, accumulated, isolated, labels, title, marked):
    """The chart both reports draw: per tensor in network order (log y), the accumulated ratio
    (a line) and the isolated one (crosses), the exact floor and the bound at 1; ``marked``:
    {index: annotation} for the tensors to point at (first divergent layers)."""
    x = np.arange(len(names))
    acc = _plotted(accumulated, failed_at_top=True)
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.semilogy(x, acc, ".-", lw=0.8, ms=3, label=labels[0])
    ax.semilogy(x, _plotted(isolated), "x", ms=4, label=labels[1])
    ax.axhline(_FLOOR, color="grey", lw=0.5)
    ax.axhline(1.0, color="crimson", lw=1, ls="--", label="bound (pass at <= 1)")
    for i, text in marked.items():
        ax.axvline(i, color="black", lw=1, ls=":")
        ax.semilogy([i], [acc[i]], "o", mfc="none", mec="crimson", ms=9)
        ax.annotate(text, (i, 1.0), xytext=(5, 10), textcoords="offset points", fontsize=8)
    starts = stage_starts(names)
    ax.set_xticks(list(starts), list(starts.values()), rotation=60, ha="right", fontsize=7)
    ax.set_xlabel(f"compared tensor, in network order ({len(names)} in all; a tick at the first of each stage)")
    ax.set_ylabel(_Y_LABEL)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def _ratio_chart(plt, report: Report):
    """Every compared tensor's acc/bound and iso/bound in network order, the first divergent marked."""
    names = [t.name for t in report.tensors]
    marked = ({names.index(report.first_divergent): f"first divergent: {report.first_divergent}"}
              if report.first_divergent in names else {})
    return _ratios_figure(plt, names, [t.accumulated_ratio for t in report.tensors],
                          [t.isolated_ratio for t in report.tensors],
                          ("accumulated: |candidate - oracle| / bound",
                           "isolated: layer from the candidate's own inputs / bound"),
                          "Error of every layer as a fraction of an honest backend's bound", marked)


def _layer_figure(plt, name: str, error_ratio: np.ndarray):
    """Where the error of one tensor sits: max |error|/bound per channel, and the map of the worst
    channel. ``error_ratio``: (N, C, H, W), (N, C) or any shape (flattened to channels)."""
    r = np.asarray(error_ratio, dtype=np.float64)
    r = np.where(np.isinf(r), np.nan, r)  # a nonzero error where the bound is 0: drawn as missing
    finite_max = np.nanmax(r) if np.isfinite(r).any() else 1.0
    r = np.nan_to_num(r, nan=finite_max)
    if r.ndim == 4:
        per_channel = r.max(axis=(0, 2, 3))
    elif r.ndim >= 2:
        per_channel = r.reshape(r.shape[0], r.shape[1], -1).max(axis=(0, 2))
    else:
        per_channel = r.reshape(1, -1).max(axis=0)
    worst = int(np.argmax(per_channel))
    spatial = r.ndim == 4 and r.shape[2] * r.shape[3] > 1
    fig, axes = plt.subplots(1, 2 if spatial else 1, figsize=(11, 3.2), squeeze=False)
    ax = axes[0, 0]
    from matplotlib.ticker import MaxNLocator

    floor = 1e-3  # a channel without error drawn at the bottom of the log axis
    ax.bar(np.arange(per_channel.size), np.maximum(per_channel, floor), width=1.0, color="steelblue")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.axhline(1.0, color="crimson", lw=1, ls="--", label="bound")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("channel")
    ax.set_ylabel("max |error| / bound")
    ax.set_title(f"{name}: per channel", fontsize=9)
    if spatial:
        ax = axes[0, 1]
        image = ax.imshow(r[:, worst].max(axis=0), cmap="magma", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="|error| / bound")
        ax.set_title(f"channel {worst}: |error| / bound over the feature map", fontsize=9)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _figures(report: Report, golden, candidate_tensors: dict):
    """[(file stem, caption, figure)] of the report: the ratio chart, then one per failing layer."""
    plt = require_matplotlib()
    figures = [("ratios", "every layer's error / bound", _ratio_chart(plt, report))]
    failing = _failing_layers(report)
    if failing:
        bounds = accumulated_bounds(golden, POLICIES[report.policy])
        reference = golden.tensors()
        for name in failing:
            if name not in candidate_tensors or name not in bounds:
                continue
            cand = np.asarray(candidate_tensors[name], dtype=np.float64)
            if cand.shape != reference[name].shape:
                continue
            ratio = error_ratio(np.abs(cand - reference[name]), bounds[name])
            stem = "layer-" + name.replace("/", "_")
            figures.append((stem, f"where the error of {name} sits", _layer_figure(plt, name, ratio)))
    return plt, figures


def write_plots(report: Report, golden, candidate_tensors: dict, folder) -> list[str]:
    """Write the report's charts as PNG files in ``folder`` (``ratios.png``, ``layer-NAME.png``);
    returns their paths."""
    os.makedirs(folder, exist_ok=True)
    plt, figures = _figures(report, golden, candidate_tensors)
    paths = []
    for stem, _, fig in figures:
        path = os.path.join(folder, stem + ".png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _svg(plt, fig) -> str:
    """The figure as an inline <svg> element: no XML prolog, DOCTYPE, metadata or namespace
    declarations (all name URLs; the HTML parser puts inline SVG in its namespace by itself)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.3g}")
    return html.escape(str(v))


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
.pass{color:#fff;background:#2a7a2a;padding:.2em .6em}.fail{color:#fff;background:#b22222;padding:.2em .6em}
.not-judged{color:#000;background:#e0a800;padding:.2em .6em}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.bad{background:#fde2e2}tr.first{background:#f8b4b4}
.legend{font-size:12px;color:#555}svg{max-width:100%;height:auto}"""


def render_html(report: Report, golden, candidate_tensors: dict) -> str:
    """The report as one self-contained HTML page (str)."""
    plt, figures = _figures(report, golden, candidate_tensors)
    e = html.escape
    verdict = "PASS" if report.passed else "FAIL"
    bad = sum(t.status != "ok" for t in report.tensors)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>refghost compare: {verdict}</title><style>{_STYLE}</style></head><body>",
             f"<h1 id='verdict'><span class='{verdict.lower()}'>{verdict}</span> "
             f"{len(report.tensors) - bad} of {len(report.tensors)} tensors within bounds</h1><ul>"]
    if not report.passed:
        parts.append(f"<li><b>first divergent layer:</b> <code>{e(str(report.first_divergent))}</code></li>")
    if report.runtime:
        run, p = report.runtime, report.runtime["precision"]
        parts.append(f"<li><b>runtime:</b> {e(str(run['runtime']))} {e(str(run['version']))}; precision in effect: "
                     f"arithmetic {e(str(p['arithmetic']))}, weights {e(str(p['weights']))}, activations "
                     f"{e(str(p['activations']))} ({e(str(p['detail']))})</li>")
    parts.append(f"<li><b>policy judged under:</b> {e(report.policy)} ({e(POLICIES[report.policy].description)})</li>")
    if report.consistent_with:
        parts.append(f"<li><b>the errors are consistent with:</b> {e(report.consistent_with)}</li>")
    parts += [f"<li>{e(d)}</li>" for d in report.diagnosis]
    parts += [f"<li class='legend'>note: {e(n)}</li>" for n in report.notes]
    parts.append(f"</ul><p>golden <code>{e(report.golden)}</code>, candidate <code>{e(report.candidate)}</code></p>")
    parts.append(f"<p class='legend'>{e(LEGEND)}</p>")
    for i, (_, caption, fig) in enumerate(figures):
        if i == 1:
            parts.append("<h2>Where the error sits in the failing layers</h2>")
        parts.append(f"<figure>{_svg(plt, fig)}<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("<h2>Every compared tensor</h2><table><tr><th>layer</th><th>shape</th><th>status</th>"
                 "<th>acc/bound</th><th>iso/bound</th><th>max abs</th><th>max rel</th><th>cosine</th>"
                 "<th>SNR dB</th><th>worst index</th><th>outside</th></tr>")
    for t in report.tensors:
        cls = "first" if t.name == report.first_divergent else ("bad" if t.status != "ok" else "")
        parts.append(f"<tr class='{cls}'><td>{e(t.name)}</td><td>{e(str(tuple(t.shape)))}</td><td>{e(t.status)}</td>"
                     + "".join(f"<td>{_fmt(v)}</td>" for v in (t.accumulated_ratio, t.isolated_ratio, t.max_abs,
                                                                t.max_rel))
                     + f"<td>{t.cosine:.6f}</td><td>{_fmt(t.snr_db)}</td>"
                     + f"<td>{e(str(t.worst_index))}</td><td>{_fmt(t.fraction_outside)}</td></tr>")
    parts.append("</table></body></html>\n")
    return "".join(parts)


def write_html(report: Report, golden, candidate_tensors: dict, path) -> None:
    """Write :func:`render_html` to ``path`` atomically."""
    text = render_html(report, golden, candidate_tensors)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


# --- a set of images (refghost.verify.dataset) ----------------------------------------------
def _dataset_chart(plt, report):
    """Every layer's worst accumulated and isolated ratio over the images, in network order, with
    the first divergent layers of the failing images marked."""
    layers = report.layers
    marked = {i: f"first divergent on {len(layer.first_divergent_in)} image(s): {layer.name}"
              for i, layer in enumerate(layers) if layer.first_divergent_in}
    return _ratios_figure(plt, [layer.name for layer in layers], [layer.worst_accumulated for layer in layers],
                          [layer.worst_isolated for layer in layers],
                          ("worst accumulated over the images / bound", "worst isolated over the images / bound"),
                          f"Worst error of every layer over {len(report.images)} images, as a fraction of its bound",
                          marked)


def write_dataset_plots(report, folder) -> list[str]:
    """Write the set's chart as ``layers.png`` in ``folder``; returns ``[its path]``."""
    os.makedirs(folder, exist_ok=True)
    plt = require_matplotlib()
    fig = _dataset_chart(plt, report)
    path = os.path.join(folder, "layers.png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return [path]


def render_dataset_html(report) -> str:
    """The report over a set as one self-contained HTML page (str): the verdict, the failing images
    and where each first diverges, the per-layer worst-ratio chart, what was not judged or retried,
    and the per-layer table."""
    plt = require_matplotlib()
    e = html.escape
    n, failing, unjudged = len(report.images), report.failing, report.unjudged
    verdict = report.verdict
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>refghost compare over {n} images: {verdict}</title><style>{_STYLE}</style></head><body>",
             f"<h1 id='verdict'><span class='{verdict.lower().replace(' ', '-')}'>{verdict}</span> "
             f"{n - len(failing) - len(unjudged)} "
             f"of {n} images pass, {len(failing)} fail, {len(unjudged)} not judged</h1>",
             f"<p>images <code>{e(report.folder)}</code>, candidate <code>{e(report.candidate)}</code></p>"]
    if failing:
        parts.append("<h2>Failing images, and where each first diverges</h2><table><tr><th>image</th>"
                     "<th>first divergent layer</th><th>errors consistent with</th><th>diagnosis</th></tr>")
        parts += [f"<tr class='bad'><td>{e(r.name)}</td><td>{e(str(r.first_divergent))}</td>"
                  f"<td>{e(r.consistent_with or '-')}</td><td>{e('; '.join(r.diagnosis))}</td></tr>" for r in failing]
        parts.append("</table>")
    if unjudged:
        parts.append("<h2>Not judged</h2><ul>")
        parts += [f"<li>{e(r.name)} ({e(r.status)}): {e(r.error)}</li>" for r in unjudged]
        parts.append("</ul>")
    if report.retried:
        parts.append("<p>retried (a worker died): " + ", ".join(f"{e(r.name)} ({r.attempts} runs)"
                                                             for r in report.retried) + "</p>")
    parts.append(f"<p class='legend'>{e(LEGEND)}</p>")
    if report.layers:
        parts.append(f"<figure>{_svg(plt, _dataset_chart(plt, report))}<figcaption>every layer's worst error / bound "
                     f"over the images</figcaption></figure>")
    parts.append("<h2>Every compared tensor over the images</h2><table><tr><th>layer</th><th>worst acc/bound</th>"
                 "<th>on</th><th>worst iso/bound</th><th>on</th><th>images outside the bound</th></tr>")
    for layer in report.layers:
        cls = "first" if layer.first_divergent_in else ("bad" if layer.failing_images else "")
        parts.append(f"<tr class='{cls}'><td>{e(layer.name)}</td><td>{_fmt(layer.worst_accumulated)}</td>"
                     f"<td>{e(layer.worst_accumulated_image)}</td><td>{_fmt(layer.worst_isolated)}</td>"
                     f"<td>{e(layer.worst_isolated_image or '-')}</td>"
                     f"<td>{_images(layer.failing_images)}</td></tr>")
    parts.append("</table></body></html>\n")
    return "".join(parts)


def _images(names: list) -> str:
    """A table cell of image names: ``2: a.png, b.png``, or ``-`` for none."""
    return f"{len(names)}: {html.escape(', '.join(names))}" if names else "-"


def write_dataset_html(report, path) -> None:
    """Write :func:`render_dataset_html` to ``path`` atomically."""
    text = render_dataset_html(report)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
