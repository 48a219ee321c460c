"""Read what a backend produced, as ``{module path or output name: array}``.

* ``.npz`` / ``.h5``: arrays named by module path (``blocks.3.0.se``) or output name
  (``blocks.4``); in an ``.h5`` file, dataset paths under ``outputs/`` or ``intermediates/`` (a
  golden file's layout) lose that prefix, and other ``/`` separators become ``.``;
* ``.npy``: one array, the network's only output unless ``--map`` names it;
* ``.onnx``: run with ONNX Runtime on the golden input (:mod:`refghost.onnx_candidate`).

``maps`` renames candidate arrays (``{"cand_name": "module.path"}``), for dumps named otherwise
(ncnn blob names, TFLite tensor names, C variable names).
"""

from __future__ import annotations

import os

import numpy as np

from .compare import CompareError
from .golden import Golden


def load_candidate(path, golden: Golden, *, maps: dict | None = None, threads: int = 1,
                   optimization: str = "all") -> tuple[dict, str, list[str]]:
    """Return ``(tensors, description, notes)`` for the candidate file at ``path``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CompareError(f"{path}: no such candidate file")
    notes = []
    if path.endswith(".onnx"):
        from .onnx_candidate import run_onnx

        tensors, description, notes = run_onnx(path, golden, threads=threads, optimization=optimization)
    elif path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                tensors = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise CompareError(f"{path}: not a readable .npz file ({exc})") from None
        description = f"{path} ({len(tensors)} arrays)"
    elif path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CompareError(f"{path}: not a readable .npy file ({exc})") from None
        outputs = list(golden.outputs)
        name = os.path.splitext(os.path.basename(path))[0]
        if maps and name in maps:
            tensors = {name: array}
        elif len(outputs) == 1:
            tensors = {outputs[0]: array}
        else:
            raise CompareError(f"{path}: one array but the golden has outputs {outputs}; "
                               f"say which with --map {name}=<output or module path>")
        description = f"{path}"
    elif path.endswith((".h5", ".hdf5")):
        tensors = _read_h5(path)
        description = f"{path} ({len(tensors)} arrays)"
    else:
        raise CompareError(f"{path}: unknown candidate type; give .onnx, .npz, .npy or .h5")
    if maps:
        unknown = [k for k in maps if k not in tensors]
        if unknown:
            raise CompareError(f"--map names {unknown[0]!r}, which {path} does not contain")
        tensors = {maps.get(k, k): v for k, v in tensors.items()}
    return tensors, description, notes


def _read_h5(path) -> dict:
    import h5py

    tensors = {}
    try:
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
                    for prefix in ("outputs/", "intermediates/"):
                        if name.startswith(prefix):
                            name = name[len(prefix):]
                            break
                    else:
                        name = name.replace("/", ".")
                    tensors[name] = obj[()]
            f.visititems(visit)
    except OSError as exc:
        raise CompareError(f"{path}: not a readable HDF5 file ({exc})") from None
    return tensors
