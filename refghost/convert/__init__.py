"""Convert a PyTorch GhostNet checkpoint, state dict or ONNX export into a refghost weights file.

:func:`convert` is what ``refghost convert`` runs. The parts, one job each:

* :mod:`~refghost.convert.checkpoint`: the tensors of a ``.pth``/``.pt``/``.ckpt`` file, read
  without PyTorch and without running anything in the file's pickle;
* :mod:`~refghost.convert.state_dict`: a state dict (from a checkpoint or an ``.npz``) as
  weights: NanoDet's, Huawei's or timm's keys mapped to refghost's;
* :mod:`~refghost.convert.onnx_import`: an ``.onnx`` file (a GhostNet exported by PyTorch) as
  weights with BatchNorm folded (``Config(folded=True)``), built on
  :mod:`~refghost.convert.onnx_graph` (reading the graph and its initializers),
  :mod:`~refghost.convert.onnx_width` (the width multiplier),
  :mod:`~refghost.convert.onnx_patterns` (activation and gate patterns) and
  :mod:`~refghost.convert.onnx_walk` (the verifying walk).

For an ``.onnx`` file the architecture, width, activation and out_stages come from the graph.
The graph wins: an option given explicitly that contradicts it is an error.

A whole NanoDet detector (``arch="detector"``, or a NanoDet config file given, or a checkpoint
with ``fpn.``/``head.`` keys and no ``arch``) is read by :mod:`~refghost.convert.detector`, its
architecture, input size, keep_ratio, normalisation and class names from NanoDet's own YAML config
(:mod:`~refghost.convert.nanodet_config`) or, without one, inferred from the tensors' shapes.
:func:`convert_checkpoint` returns the weights with notes saying what was chosen, dropped or
assumed; :func:`convert` the weights alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .. import __version__
from ..arch import DEFAULT_OUT_STAGES, build_graph, canonical_activation
from ..errors import RefghostError, WeightsError
from ..weights import NANODET_PREPROCESSING, Preprocessing, Weights, file_sha256, from_tensors, save_weights
# (the readers of checkpoints and ONNX graphs are imported when a conversion runs: every refghost
# command's parser reads DEFAULTS, and `refghost run` should not pay for them)

#: The options' values when not given, for checkpoints (an ONNX graph says its own).
DEFAULTS = {"arch": "nanodet", "width": 1.0, "activation": "ReLU", "out_stages": DEFAULT_OUT_STAGES}


#: The preprocessing fields no checkpoint or ONNX graph records: assumed (the arch's defaults,
#: :func:`refghost.weights.default_preprocessing`) unless given to :func:`convert`.
ASSUMED_PREPROCESSING = ("channel_order", "mean", "std")


#: The ``arch`` of :func:`convert` for a whole detector (the weights file's ``arch`` attribute).
DETECTOR = "detector"
#: Top-level modules of a NanoDet detector besides its backbone: their keys make a checkpoint a
#: detector's.
DETECTOR_PARTS = ("fpn", "head")


@dataclass(frozen=True)
class Converted:
    """What :func:`convert_checkpoint` wrote, and one line per thing a user should know about it
    (which copy of the weights was used, what was dropped, what was assumed)."""

    weights: Weights
    notes: tuple[str, ...] = ()


def convert(src, out, **options) -> Weights:
    """:func:`convert_checkpoint`'s weights (same arguments)."""
    return convert_checkpoint(src, out, **options).weights


def convert_checkpoint(src, out, *, arch=None, width=None, activation=None, out_stages=None,
                       preprocessing: Preprocessing | None = None, channel_order=None, mean=None, std=None,
                       config_file=None) -> Converted:
    """Read checkpoint ``src``, validate it as GhostNet ``arch`` or a whole detector, write
    weights file ``out``.

    A detector: ``arch="detector"``, or ``config_file`` (NanoDet's YAML) given, or ``arch`` None
    and the checkpoint has ``fpn.``/``head.`` keys (:func:`convert_detector`), unless a GhostNet
    backbone's ``width``, ``activation`` or ``out_stages`` is given (then its backbone alone, the
    rest named in the notes).

    For a checkpoint, an option left as None takes its value in :data:`DEFAULTS`. For an
    ``.onnx`` file the options are read from the graph; one given (not None) must agree with it.
    ``channel_order`` ("BGR"/"RGB"), ``mean`` and ``std`` (3 values each, 0..255 units, in that
    channel order) replace the assumed defaults of :data:`ASSUMED_PREPROCESSING` (NanoDet's BGR
    statistics, or ImageNet's RGB ones for ``ghostnet``); a channel order given alone keeps the
    default statistics of each colour (reordered).
    """
    from .onnx_import import import_onnx
    from .state_dict import read_state_dict, split_backbone, weights_from_state_dict

    is_onnx = os.fspath(src).lower().endswith(".onnx")
    if config_file is not None or arch == DETECTOR:
        if is_onnx:
            raise WeightsError(f"{src}: a whole detector is read from a checkpoint; refghost imports the GhostNet "
                               f"backbone alone from ONNX")
        return convert_detector(src, out, config_file=config_file, channel_order=channel_order, mean=mean, std=std)
    if is_onnx:
        weights = _check_onnx_options(src, import_onnx(src, preprocessing=preprocessing), arch=arch, width=width,
                                      activation=activation, out_stages=out_stages)
        weights = _with_preprocessing(weights, channel_order, mean, std)
        save_weights(out, weights)
        return Converted(weights)
    state_dict = read_state_dict(src)  # read once: the checks below and the conversion share it
    left = split_backbone(state_dict, arch or DEFAULTS["arch"])[1]
    backbone_options = any(v is not None for v in (width, activation, out_stages))
    if arch is None and not backbone_options and any(part in left for part in DETECTOR_PARTS):
        return convert_detector(src, out, channel_order=channel_order, mean=mean, std=std, state_dict=state_dict)
    arch = DEFAULTS["arch"] if arch is None else arch
    width = DEFAULTS["width"] if width is None else width
    activation = DEFAULTS["activation"] if activation is None else activation
    out_stages = DEFAULTS["out_stages"] if out_stages is None else out_stages
    weights = weights_from_state_dict(src, arch=arch, width=width, activation=activation, out_stages=out_stages,
                                      preprocessing=preprocessing, state_dict=state_dict)
    weights = _with_preprocessing(weights, channel_order, mean, std)
    save_weights(out, weights)
    notes = ()
    if left:
        counted = ", ".join(f"{module}.* ({n} tensors)" for module, n in left.items())
        notes = (f"left out (--arch {arch} keeps the backbone alone): {counted}; convert without --arch to keep the "
                 f"whole detector",)
    return Converted(weights, notes)


def convert_detector(src, out, *, config_file=None, channel_order=None, mean=None, std=None,
                     state_dict: dict | None = None) -> Converted:
    """A NanoDet checkpoint as a whole detector's weights file (see the module docstring).

    With ``config_file``, the architecture, input size, keep_ratio, mean/std and class names are
    NanoDet's config's (``channel_order``/``mean``/``std`` given here override them); without
    one, the architecture is inferred from the shapes, the preprocessing is NanoDet's default
    (:data:`refghost.weights.NANODET_PREPROCESSING`: BGR, 320x320, stretch) and the notes say so.
    ``state_dict``: the checkpoint's tensors when the caller has read them already.
    """
    from .detector import detector_from_state_dict
    from .nanodet_config import read_nanodet_config
    from .state_dict import read_state_dict

    notes = []
    settings = read_nanodet_config(config_file) if config_file is not None else None
    tensors = read_state_dict(src) if state_dict is None else state_dict
    config = None if settings is None else settings.detector
    checkpoint = detector_from_state_dict(tensors, config, where=os.fspath(src))
    if settings is not None:
        pre = Preprocessing(tuple(settings.mean), tuple(settings.std), "BGR", tuple(settings.input_size),
                            settings.keep_ratio)
        class_names = tuple(settings.class_names)
        notes.append(f"architecture, input size, keep_ratio, mean/std and class names from {config_file}")
    else:
        pre, class_names = NANODET_PREPROCESSING, ()
        notes.append("architecture inferred from the tensors' shapes; input size 320x320, stretch (keep_ratio "
                     "False), NanoDet's mean/std and unnamed classes assumed: pass --config with the model's "
                     "NanoDet YAML to read them")
        notes += [f"assumed: {a}" for a in checkpoint.assumed]
    notes.append(f"weights: the checkpoint's {checkpoint.origin} copy")
    notes += [f"dropped {group}" for group in checkpoint.dropped]
    provenance = {"source_file": os.path.basename(os.fspath(src)), "source_sha256": file_sha256(src),
                  "converter": f"refghost {__version__} convert"}
    weights = from_tensors(checkpoint.tensors, checkpoint.config, pre, provenance, class_names=class_names)
    weights = _with_preprocessing(weights, channel_order, mean, std)
    save_weights(out, weights)
    return Converted(weights, tuple(notes))


def _with_preprocessing(weights: Weights, channel_order, mean, std) -> Weights:
    """``weights`` with the given preprocessing fields replaced (see :func:`convert`)."""
    if channel_order is None and mean is None and std is None:
        return weights
    pre = weights.preprocessing
    order = pre.channel_order if channel_order is None else channel_order
    step = -1 if order != pre.channel_order else 1  # the default statistics follow their colours
    try:
        new = replace(pre, channel_order=order,
                      mean=tuple(pre.mean[::step]) if mean is None else tuple(float(v) for v in mean),
                      std=tuple(pre.std[::step]) if std is None else tuple(float(v) for v in std))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"--mean/--std: 3 numbers each, got {mean!r}, {std!r} ({exc})") from None
    except RefghostError as exc:
        raise WeightsError(str(exc)) from None
    return Weights(weights.config, new, weights.tensors, weights.provenance, class_names=weights.class_names)


def _check_onnx_options(src, weights: Weights, **options) -> Weights:
    """The imported weights, if every explicitly given option agrees with the graph (see :func:`convert`).

    An explicit width that gives the same channel counts as the graph's is the same network and is
    recorded as given.
    """
    cfg = weights.config
    graph_says = {"arch": cfg.arch, "width": cfg.width, "activation": cfg.activation, "out_stages": cfg.out_stages}
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        try:
            if value is None:
                continue
            if name == "activation":
                value = canonical_activation(value)
            elif name == "out_stages":
                value = tuple(sorted({int(s) for s in value}))
            elif name == "width":
                value = float(value)
                same = replace(cfg, width=value)
                if build_graph(same).param_shapes == weights.graph.param_shapes:
                    weights = Weights(same, weights.preprocessing, weights.tensors, weights.provenance)
                    cfg = weights.config
                    continue
        except (RefghostError, TypeError, ValueError) as exc:
            raise WeightsError(f"{src}: {flag} {value!r}: {exc}") from None
        if value != graph_says[name]:
            shown = ",".join(map(str, value)) if name == "out_stages" else value
            said = ",".join(map(str, graph_says[name])) if name == "out_stages" else graph_says[name]
            raise WeightsError(f"{src}: {flag} {shown} contradicts the ONNX graph, which is {name.replace('_', ' ')} "
                               f"{said or '(none)'} ({cfg.arch}, width {cfg.width:g}, {cfg.activation}); the graph "
                               f"decides: drop the option or give the graph's value")
    return weights
