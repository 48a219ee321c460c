"""A PyTorch GhostNet state dict as refghost weights: reading the file, mapping the keys.

Sources understood (after unwrapping ``{"state_dict": ...}``):

* a plain state_dict of NanoDet's, Huawei's or timm's GhostNet;
* a NanoDet checkpoint: keys under ``model.``/``module.`` and ``backbone.``; when EMA weights
  (``avg_model.``) are present they replace the raw ones, as NanoDet's ``load_model_weight`` does;
  the FPN and head keys are left out;
* a Huawei/timm classifier: for ``arch="nanodet"`` its ``conv_head``/``classifier`` keys are
  dropped; for ``arch="ghostnet"`` they are kept and ``num_classes`` is read from them.

``.pth``/``.pt``/``.ckpt`` files are read by :mod:`refghost.convert.checkpoint` (no PyTorch
needed, nothing in the file's pickle is run); an ``.npz`` of state_dict arrays needs nothing but
NumPy.
"""

from __future__ import annotations

import os

import numpy as np

from .. import __version__, safe_io
from ..arch import Config
from ..errors import WeightsError
from ..weights import Preprocessing, Weights, default_preprocessing, file_sha256, from_tensors
from .checkpoint import load_state_dict

#: Key prefixes of the ImageNet classifier head (Huawei's and timm's), dropped for a backbone.
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
    return split_backbone(state_dict, arch)[0]


def split_backbone(state_dict: dict, arch: str) -> tuple[dict, dict[str, int]]:
    """``(backbone, left)``: :func:`select_backbone`'s keys, and the keys of a whole NanoDet
    checkpoint it left out, counted per top-level module (``{"fpn": 143, "head": 40, "aux_fpn":
    ...}``; BatchNorm ``num_batches_tracked`` counters not counted), so that a caller can name
    them. ``left`` is empty for a checkpoint that holds a backbone alone."""
    sd = dict(state_dict)
    if any(k.startswith("avg_model.") for k in sd):
        sd = {"model." + k[len("avg_model."):]: v for k, v in sd.items() if k.startswith("avg_model.")}
    stripped = {}
    for key, value in sd.items():
        for prefix in ("module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        stripped[key] = value
    left: dict[str, int] = {}
    if any(k.startswith("backbone.") for k in stripped):
        for key in stripped:
            if not key.startswith("backbone.") and not key.endswith(".num_batches_tracked"):
                module = key.split(".", 1)[0]
                left[module] = left.get(module, 0) + 1
        stripped = {k[len("backbone."):]: v for k, v in stripped.items() if k.startswith("backbone.")}
    if arch == "nanodet":
        stripped = {k: v for k, v in stripped.items() if not k.startswith(HEAD_PREFIXES)}
    return stripped, left


def weights_from_state_dict(src, *, arch: str, width: float, activation: str, out_stages,
                            preprocessing: Preprocessing | None = None, state_dict: dict | None = None) -> Weights:
    """The GhostNet ``arch`` weights of checkpoint or ``.npz`` file ``src``, validated.

    ``preprocessing`` defaults to the arch's (:func:`refghost.weights.default_preprocessing`);
    ``state_dict``: the file's tensors when the caller has read them already (:func:`read_state_dict`).
    Raises WeightsError.
    """
    state_dict = select_backbone(read_state_dict(src) if state_dict is None else state_dict, arch)
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
    return weights
