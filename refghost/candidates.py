"""Read what a backend produced, as ``{module path or output name: array}``.

* ``.npz`` / ``.h5``: arrays named by module path (``blocks.3.0.se``) or output name
  (``blocks.4``); in an ``.h5`` file, dataset paths under ``outputs/`` or ``intermediates/`` (a
  golden file's layout) lose that prefix, and other ``/`` separators become ``.``;
* ``.npy``: one array, the network's only output unless ``--map`` names it;
* a model file (``.onnx``, ``.xml``, ``.mnn``, ``.param``, ``.tflite``): run on the golden input by
  its runtime (:func:`refghost.runtimes.run_model`; ``.onnx`` with ONNX Runtime unless
  ``runtime=`` says otherwise), every tensor it exposes mapped to a module path.

``maps`` renames candidate arrays (``{"cand_name": "module.path"}``), for dumps named otherwise
(ncnn blob names, TFLite tensor names, C variable names).
"""

from __future__ import annotations

import os

import numpy as np

from .compare import CompareError
from .golden import Golden


def load_candidate(path, golden: Golden, *, maps: dict | None = None, threads: int = 1,
                   optimization: str = "all", runtime: str | None = None, precise: bool = False,
                   options: dict | None = None, run: list | None = None) -> tuple[dict, str, list[str]]:
    """Return ``(tensors, description, notes)`` for the candidate file at ``path``.

    A model file runs in ``runtime`` (default: by extension) with ``precise`` and ``options``
    (see :func:`refghost.runtimes.run_model`; ``optimization`` is ONNX Runtime's); the
    :class:`~refghost.runtimes.RuntimeRun` is appended to ``run`` when a list is given.
    """
    from .runtimes import EXTENSIONS, run_model

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CompareError(f"{path}: no such candidate file")
    notes = []
    if runtime is not None or os.path.splitext(path)[1].lower() in EXTENSIONS:
        options = dict(options or {})
        if (runtime or "onnxruntime") == "onnxruntime" and path.lower().endswith(".onnx"):
            options.setdefault("optimization", optimization)
        result = run_model(path, golden, runtime=runtime, precise=precise, options=options, threads=threads)
        if run is not None:
            run.append(result)
        tensors, notes = result.tensors, list(result.notes)
        if result.runtime == "onnxruntime":  # the description refghost gave ONNX candidates before
            description = (f"{path} (ONNX Runtime {result.version}, {threads} thread(s), optimization "
                           f"{result.options['optimization']})")
        else:
            description = result.describe()
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
        raise CompareError(f"{path}: unknown candidate type; give a model file ("
                           + ", ".join(EXTENSIONS) + "), or arrays as .npz, .npy or .h5")
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
