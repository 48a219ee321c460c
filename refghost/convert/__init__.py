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
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..arch import DEFAULT_OUT_STAGES, build_graph, canonical_activation
from ..errors import RefghostError, WeightsError
from ..weights import Preprocessing, Weights, save_weights
from .onnx_import import import_onnx
from .state_dict import weights_from_state_dict

#: The options' values when not given, for checkpoints (an ONNX graph says its own).
DEFAULTS = {"arch": "nanodet", "width": 1.0, "activation": "ReLU", "out_stages": DEFAULT_OUT_STAGES}


#: The preprocessing fields no checkpoint or ONNX graph records: assumed (the arch's defaults,
#: :func:`refghost.weights.default_preprocessing`) unless given to :func:`convert`.
ASSUMED_PREPROCESSING = ("channel_order", "mean", "std")


def convert(src, out, *, arch=None, width=None, activation=None, out_stages=None,
            preprocessing: Preprocessing | None = None, channel_order=None, mean=None, std=None) -> Weights:
    """Read checkpoint ``src``, validate it as GhostNet ``arch``, write weights file ``out``.

    For a checkpoint, an option left as None takes its value in :data:`DEFAULTS`. For an
    ``.onnx`` file the options are read from the graph; one given (not None) must agree with it.
    ``channel_order`` ("BGR"/"RGB"), ``mean`` and ``std`` (3 values each, 0..255 units, in that
    channel order) replace the assumed defaults of :data:`ASSUMED_PREPROCESSING` (NanoDet's BGR
    statistics, or ImageNet's RGB ones for ``ghostnet``); a channel order given alone keeps the
    default statistics of each colour (reordered).
    """
    if os.fspath(src).lower().endswith(".onnx"):
        weights = _check_onnx_options(src, import_onnx(src, preprocessing=preprocessing), arch=arch, width=width,
                                      activation=activation, out_stages=out_stages)
        weights = _with_preprocessing(weights, channel_order, mean, std)
        save_weights(out, weights)
        return weights
    arch = DEFAULTS["arch"] if arch is None else arch
    width = DEFAULTS["width"] if width is None else width
    activation = DEFAULTS["activation"] if activation is None else activation
    out_stages = DEFAULTS["out_stages"] if out_stages is None else out_stages
    weights = weights_from_state_dict(src, arch=arch, width=width, activation=activation, out_stages=out_stages,
                                      preprocessing=preprocessing)
    weights = _with_preprocessing(weights, channel_order, mean, std)
    save_weights(out, weights)
    return weights


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
    return Weights(weights.config, new, weights.tensors, weights.provenance)


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
