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

import math
import os
from dataclasses import dataclass, field

from .. import safe_io
from .compare import CompareError, _few
from .golden import Golden


@dataclass
class LoadedCandidate:
    """What a candidate file gave: its tensors, what it is, notes, and the runtime's run."""

    tensors: dict  # module path or output name -> array
    description: str  # the file, and for a model file the runtime, its version and settings
    notes: list = field(default_factory=list)
    run: object | None = None  # refghost.runtimes.RuntimeRun for a model file, None for arrays


def load_candidate(path, golden: Golden, *, maps: dict | None = None, threads: int = 1,
                   optimization: str = "all", runtime: str | None = None, precise: bool = False,
                   options: dict | None = None) -> LoadedCandidate:
    """The candidate file at ``path``: arrays read from it, or a model file run on ``golden``'s input
    in ``runtime`` (default: by extension) with ``precise`` and ``options`` (see
    :func:`refghost.runtimes.run_model`; ``optimization`` is ONNX Runtime's).
    """
    from ..runtimes import EXTENSIONS, run_model

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CompareError(f"{path}: no such candidate file")
    notes = []
    result = None
    if runtime is not None or os.path.splitext(path)[1].lower() in EXTENSIONS:
        options = dict(options or {})
        if (runtime or "onnxruntime") == "onnxruntime" and path.lower().endswith(".onnx"):
            options.setdefault("optimization", optimization)
        result = run_model(path, golden, runtime=runtime, precise=precise, options=options, threads=threads)
        tensors, notes = result.tensors, list(result.notes)
        if result.runtime == "onnxruntime":  # the description refghost gave ONNX candidates before
            description = (f"{path} (ONNX Runtime {result.version}, {threads} thread(s), optimization "
                           f"{result.options['optimization']})")
        else:
            description = result.describe()
    elif path.endswith(".npz"):
        tensors, skipped = safe_io.read_npz(path, CompareError, max_bytes=_byte_cap(golden, maps))
        notes += _skipped_note(path, tensors, skipped, golden, maps)
        description = f"{path} ({len(tensors)} arrays)"
    elif path.endswith(".npy"):
        outputs = list(golden.outputs)
        name = os.path.splitext(os.path.basename(path))[0]
        cap = _byte_cap(golden, maps)
        array = safe_io.read_npy(path, CompareError, max_bytes=cap(name) or cap(outputs[0]))
        if maps and name in maps:
            tensors = {name: array}
        elif len(outputs) == 1:
            tensors = {outputs[0]: array}
        else:
            raise CompareError(f"{path}: one array but the golden has outputs {outputs}; "
                               f"say which with --map {name}=<output or module path>")
        description = f"{path}"
    elif path.endswith((".h5", ".hdf5")):
        tensors, skipped = _read_h5(path, _byte_cap(golden, maps))
        notes += _skipped_note(path, tensors, skipped, golden, maps)
        description = f"{path} ({len(tensors)} arrays)"
    else:
        raise CompareError(f"{path}: unknown candidate type; give a model file ("
                           + ", ".join(EXTENSIONS) + "), or arrays as .npz, .npy or .h5")
    if maps:
        unknown = [k for k in maps if k not in tensors]
        if unknown:
            raise CompareError(f"--map names {unknown[0]!r}, which {path} does not contain")
        tensors = {maps.get(k, k): v for k, v in tensors.items()}
    return LoadedCandidate(tensors, description, notes, result)


#: A candidate array may declare at most this many times the bytes of the golden tensor it is
#: compared with in float64 (room for a transposed or batch-less layout; a larger one can only be
#: a wrong or hostile file, and is refused before it is read).
CANDIDATE_SIZE_FACTOR = 4


def _byte_cap(golden: Golden, maps: dict | None):
    """``cap(candidate_key)``: the bytes a candidate array may declare, or None if unneeded."""
    sizes = {name: value.size for name, value in golden.tensors().items()}
    # the stages around the network (refghost.verify.stages): the input, a detector's decode and
    # detections (at most max_detections per image; the stored ones may be fewer)
    sizes["input"] = golden.input.size
    sizes.update({name: value.size for name, value in golden.detector.items() if name.startswith("decode.")})
    if golden.detector:
        per_image = 4 * int(golden.attrs.get("max_detections", 100)) * golden.input.shape[0]
        sizes.update({name: per_image for name in golden.detector if name.startswith("detections.")})
    largest = max(sizes.values())
    maps = maps or {}

    def cap(key):
        target = maps.get(key, key)
        if target in sizes:
            return CANDIDATE_SIZE_FACTOR * 8 * sizes[target]
        if key in maps:  # renamed to something the golden lacks: read, so the report can say so
            return CANDIDATE_SIZE_FACTOR * 8 * largest
        return None

    return cap


def _skipped_note(path, tensors: dict, skipped: list, golden: Golden, maps: dict | None) -> list[str]:
    """No array the golden knows: say what the file holds. Else a note on the arrays left unread."""
    if not tensors and not maps:  # (with --map, the check of its names says what is missing)
        names = list(golden.tensors())
        raise CompareError(f"{path} has no tensor in common with the golden file (it has "
                           f"{_few(skipped) or 'nothing'}; the golden has {_few(names)}); name arrays by module path "
                           f"or use --map")
    if skipped:
        return [f"{len(skipped)} candidate array(s) not in the golden file left unread ({_few(skipped)})"]
    return []


def _read_h5(path, cap) -> tuple[dict, list]:
    """Float datasets of an ``.h5`` candidate named as the module docstring says; ``cap(name)``
    bounds each one's declared bytes (None: not needed, left unread). Groups are walked through
    hard links only, :data:`refghost.safe_io.MAX_DEPTH` deep, :data:`~refghost.safe_io.MAX_MEMBERS`
    objects in all; every dataset's metadata is checked before it is read."""
    import h5py

    err = CompareError
    found, skipped, budget = {}, [], [safe_io.MAX_MEMBERS]

    def walk(group, prefix, depth):
        if depth > safe_io.MAX_DEPTH:
            raise CompareError(f"{path}: groups nested deeper than {safe_io.MAX_DEPTH}")
        for name, obj in safe_io.members(group, f"{path}:/{prefix}", err, max_members=budget[0]):
            budget[0] -= 1
            if budget[0] < 0:
                raise CompareError(f"{path}: more than {safe_io.MAX_MEMBERS} objects")
            full = prefix + name
            if isinstance(obj, h5py.Group):
                walk(obj, full + "/", depth + 1)
                continue
            dtype = safe_io.guarded(err, f"{path}:/{full}", "unreadable dtype", lambda: obj.dtype)
            if dtype.kind != "f":
                continue
            for strip in ("outputs/", "intermediates/"):
                if full.startswith(strip):
                    key = full[len(strip):]
                    break
            else:
                key = full.replace("/", ".")
            limit = cap(key)
            if limit is None:
                skipped.append(key)
                continue
            where = f"{path}:/{full}"
            shape, dtype = safe_io.dataset_info(obj, where, err, kinds="f")
            if math.prod(shape) * dtype.itemsize > limit:
                raise CompareError(f"{where}: declares shape {list(shape)} x {dtype}, more than the {limit} bytes "
                                   f"an array compared with {key!r} may have")
            found[key] = (where, obj)

    with safe_io.open_hdf5(path, CompareError, "candidate") as f:
        walk(f, "", 0)
        tensors = {key: safe_io.read_dataset(obj, where, err) for key, (where, obj) in found.items()}
    return tensors, skipped
