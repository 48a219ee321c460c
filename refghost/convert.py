"""Convert a PyTorch GhostNet checkpoint into a refghost weights file.

Sources understood (after unwrapping ``{"state_dict": ...}``):

* a plain state_dict of NanoDet's, Huawei's or timm's GhostNet;
* a NanoDet checkpoint: keys under ``model.``/``module.`` and ``backbone.``; when EMA weights
  (``avg_model.``) are present they replace the raw ones, as NanoDet's ``load_model_weight`` does;
  the FPN and head keys are left out;
* a Huawei/timm classifier: for ``--arch nanodet`` its ``conv_head``/``classifier`` keys are
  dropped; for ``--arch ghostnet`` they are kept and ``num_classes`` is read from them.

``.pth``/``.pt``/``.ckpt`` files are read by :mod:`refghost.checkpoint` (no PyTorch needed, nothing
in the file's pickle is run); an ``.npz`` of state_dict arrays needs nothing but NumPy.

An ``.onnx`` file (a GhostNet exported by PyTorch) is read by :mod:`refghost.onnx_import`: the
architecture, width, activation and out_stages come from the graph, and the weights file is
written with BatchNorm folded (``Config(folded=True)``). The graph wins: an option given
explicitly that contradicts it is an error.
"""

from __future__ import annotations

import os

import numpy as np

from . import __version__
from .arch import DEFAULT_OUT_STAGES, Config
from .checkpoint import load_state_dict
from . import safe_io
from .errors import WeightsError
from .weights import Preprocessing, Weights, default_preprocessing, file_sha256, from_tensors, save_weights

HEAD_PREFIXES = ("conv_head.", "classifier.")


def read_state_dict(path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint file as NumPy arrays, keyed as stored (see module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such checkpoint file")
    if path.endswith(".npz"):
        arrays, _ = safe_io.read_npz(path, WeightsError, max_bytes=lambda key: safe_io.MAX_ARRAY_BYTES)
        return arrays
    return load_state_dict(path)


def select_backbone(state_dict: dict, arch: str) -> dict:
    """The GhostNet keys of a checkpoint, named as NanoDet's/Huawei's module paths.

    EMA copies (``avg_model.``) win over raw weights; ``module.``, ``model.`` and ``backbone.``
    prefixes are stripped; with a ``backbone.`` prefix only those keys are kept; for
    ``arch="nanodet"`` the classifier head keys are dropped.
    """
    sd = dict(state_dict)
    if any(k.startswith("avg_model.") for k in sd):
        sd = {"model." + k[len("avg_model."):]: v for k, v in sd.items() if k.startswith("avg_model.")}
    stripped = {}
    for key, value in sd.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        stripped[key] = value
    if any(k.startswith("backbone.") for k in stripped):
        stripped = {k[len("backbone."):]: v for k, v in stripped.items() if k.startswith("backbone.")}
    if arch == "nanodet":
        stripped = {k: v for k, v in stripped.items() if not k.startswith(HEAD_PREFIXES)}
    return stripped


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
        weights = _check_onnx_options(src, _import_onnx(src, preprocessing), arch=arch, width=width,
                                      activation=activation, out_stages=out_stages)
        weights = _with_preprocessing(weights, channel_order, mean, std)
        save_weights(out, weights)
        return weights
    arch = DEFAULTS["arch"] if arch is None else arch
    width = DEFAULTS["width"] if width is None else width
    activation = DEFAULTS["activation"] if activation is None else activation
    out_stages = DEFAULTS["out_stages"] if out_stages is None else out_stages
    state_dict = select_backbone(read_state_dict(src), arch)
    num_classes = 0
    if arch == "ghostnet":
        if "classifier.weight" not in state_dict:
            raise WeightsError(f"{src}: arch 'ghostnet' needs the classifier head; key 'classifier.weight' "
                               f"is missing")
        num_classes = int(state_dict["classifier.weight"].shape[0])
    config = Config(arch=arch, width=width, activation=activation, out_stages=tuple(out_stages),
                    num_classes=num_classes)
    provenance = {"source_file": os.path.basename(os.fspath(src)), "source_sha256": file_sha256(src),
                  "converter": f"refghost {__version__} convert"}
    weights = from_tensors(state_dict, config, preprocessing or default_preprocessing(arch), provenance)
    weights = _with_preprocessing(weights, channel_order, mean, std)
    save_weights(out, weights)
    return weights


def _with_preprocessing(weights: Weights, channel_order, mean, std) -> Weights:
    """``weights`` with the given preprocessing fields replaced (see :func:`convert`)."""
    from dataclasses import replace

    from .errors import RefghostError

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


def _import_onnx(src, preprocessing):
    from .onnx_import import import_onnx

    return import_onnx(src, preprocessing=preprocessing)


def _check_onnx_options(src, weights: Weights, **options) -> Weights:
    """The imported weights, if every explicitly given option agrees with the graph (see :func:`convert`).

    An explicit width that gives the same channel counts as the graph's is the same network and is
    recorded as given.
    """
    from dataclasses import replace

    from .arch import build_graph, canonical_activation
    from .errors import RefghostError

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
