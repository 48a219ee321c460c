"""Golden files: the float64 oracle's outputs of every layer, with what checking them needs.

Format (HDF5, schema v1, documented in ``docs/golden-format.md``):

``/input``
    (N, 3, H, W) float32: the input every backend must be fed.
``/outputs/<name>``
    float64 oracle outputs (``blocks.4``, ... or ``classifier``), in forward order.
``/intermediates/<name>``
    float64 output of every layer, by PyTorch module path, in forward order (optional).
``/bounds/<name>``
    for each tensor above, the probabilistic accumulated error bound (float32 arithmetic,
    ``u = 2^-24``, 8 sigma; ``refghost.bounds``): how far an honest float32 backend may be from it.
    Other precision policies' bounds are computed by ``refghost compare`` from the input and weights.
``/weights``
    the weights, as in a weights file (so a golden file is self-contained: recomputing one
    layer from a candidate's input, the isolated check, needs them).
``/detector/<name>`` (a whole detector's golden only)
    the stages after the network, from the float64 oracle's ``output``: ``decode.scores``
    (N, P, C) and ``decode.boxes`` (N, P, 4) float64, every prior before NMS, in network-input
    pixels, with their bounds in ``/bounds`` (:func:`refghost.bounds.decode_bounds`);
    ``detections.image`` (K,) int64, ``detections.boxes`` (K, 4) and ``detections.scores`` (K,)
    float64, ``detections.labels`` (K,) int64: what NanoDet's NMS keeps, boxes in original-image
    pixels; ``preprocess.matrices`` (N, 3, 3) float64 (original pixels -> network-input pixels)
    and ``preprocess.original_sizes`` (N, 2) int64 (width, height). The thresholds are the root
    attributes ``score_threshold``, ``iou_threshold``, ``max_detections``.
root attributes
    ``format = "refghost-golden"``, ``schema_version``, ``refghost_version``, ``weights_sha256``,
    ``input_source``, ``bound_unit_roundoff``, ``bound_lambda``, ``bound_model`` (the version of the
    error rules, ``refghost.bounds.BOUND_MODEL``), ``numpy_version``,
    ``numba_version``, ``h5py_version``, ``command``; ``warp_kernel`` (the
    ``refghost.preprocess`` kernel, i.e. which OpenCV's resize the input reproduces) when the
    input was made from an image.

Written atomically: a crash leaves no file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from ..atomic import atomic_path
from ..bounds import BOUND_MODEL, DEFAULT_LAMBDA, FLOAT32_U, error_bounds
from ..errors import GoldenError, WeightsError
from ..threads import single_threaded_blas
from .. import safe_io
from ..arch import output_shapes
from ..weights import MAX_INPUT_PIXELS, Weights, is_detector, open_hdf5, read_weights_group, write_weights_group

FORMAT = "refghost-golden"
SCHEMA_VERSION = 1


@dataclass
class Golden:
    """A golden file in memory: input, oracle tensors in forward order, their bounds, weights."""

    weights: Weights
    input: np.ndarray  # (N, 3, H, W) float32
    outputs: dict[str, np.ndarray]  # output name -> float64
    intermediates: dict[str, np.ndarray]  # node name -> float64, forward order (may be empty)
    bounds: dict[str, np.ndarray]  # every name above -> float32 bound for u = 2^-24
    attrs: dict = field(default_factory=dict)
    path: str | None = None
    #: policy name -> every tensor's accumulated bound under it (:func:`.compare.accumulated_bounds`)
    derived_bounds: dict = field(default_factory=dict, repr=False, compare=False)
    #: a detector's stages after the network (:data:`DETECTOR_STAGES`; empty for a backbone)
    detector: dict[str, np.ndarray] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"Golden(path={self.path!r}, input {self.input.shape} {self.input.dtype}, outputs "
                f"{list(self.outputs)}, {len(self.intermediates)} intermediates, weights {self.weights.config!r})")

    def tensors(self) -> dict[str, np.ndarray]:
        """Every stored oracle tensor, in forward order (each output right after its node)."""
        if not self.intermediates:
            return dict(self.outputs)
        produced_by = {node: name for name, node in self.weights.graph.outputs.items()}
        merged = {}
        for name, value in self.intermediates.items():
            merged[name] = value
            if name in produced_by:
                merged[produced_by[name]] = self.outputs[produced_by[name]]
        return merged

    def node_of(self, name: str) -> str:
        """The graph node a stored tensor name belongs to (an output name maps to its node)."""
        return self.weights.graph.outputs.get(name, name)


#: A detector golden's ``/detector`` datasets: name -> (dtype, shape as a function of (N, P, C, K)).
DETECTOR_STAGES = {
    "decode.scores": (np.float64, lambda n, p, c, k: (n, p, c)),
    "decode.boxes": (np.float64, lambda n, p, c, k: (n, p, 4)),
    "detections.image": (np.int64, lambda n, p, c, k: (k,)),
    "detections.boxes": (np.float64, lambda n, p, c, k: (k, 4)),
    "detections.scores": (np.float64, lambda n, p, c, k: (k,)),
    "detections.labels": (np.int64, lambda n, p, c, k: (k,)),
    "preprocess.matrices": (np.float64, lambda n, p, c, k: (n, 3, 3)),
    "preprocess.original_sizes": (np.int64, lambda n, p, c, k: (n, 2)),
}
#: The stages of DETECTOR_STAGES that carry a bound (in ``/bounds``).
BOUNDED_STAGES = ("decode.scores", "decode.boxes")
#: A detector golden's root attributes: its post-processing thresholds.
NMS_ATTRS = ("score_threshold", "iou_threshold", "max_detections")


def make_golden(weights: Weights, x: np.ndarray, *, intermediates: bool = False, input_source: str = "",
                command: str = "", warp_kernel: str | None = None, batch=None, nms=None) -> Golden:
    """Compute the float64 oracle and its bounds for input ``x`` (N, 3, H, W) float32.

    ``warp_kernel``: the resize kernel that made ``x`` from an image, recorded as a root attribute.
    A detector's golden also holds its decode and detections (:data:`DETECTOR_STAGES`): ``batch``
    is the :class:`refghost.detector.run.PreparedBatch` that made ``x`` (default: ``x`` itself,
    identity matrices), ``nms`` the :class:`refghost.detector.run.NmsSettings` (default NanoDet's).
    """
    import h5py
    import numba

    x = np.ascontiguousarray(x, dtype=np.float32)
    with single_threaded_blas():  # the values of refghost.run(x, weights, dtype="float64", impl="interpreter")
        values, node_bounds = error_bounds(weights.graph, weights.params("float64"), x.astype(np.float64),
                                           u=FLOAT32_U, lam=DEFAULT_LAMBDA)
    outputs = {name: values[node] for name, node in weights.graph.outputs.items()}
    layers = dict(values) if intermediates else {}
    bounds = {name: node_bounds[weights.graph.outputs[name]].astype(np.float32) for name in outputs}
    bounds.update({name: node_bounds[name].astype(np.float32) for name in layers})
    attrs = {
        "refghost_version": __version__,
        "weights_sha256": weights.sha256 or "",
        "input_source": input_source,
        "bound_unit_roundoff": FLOAT32_U,
        "bound_lambda": DEFAULT_LAMBDA,
        "bound_model": BOUND_MODEL,
        "numpy_version": np.__version__,
        "numba_version": numba.__version__,
        "h5py_version": h5py.__version__,
        "command": command,
    }
    if warp_kernel is not None:
        attrs["warp_kernel"] = warp_kernel
    stages = {}
    if is_detector(weights.config):
        stages, stage_bounds, thresholds = _detector_stages(weights, x, outputs, bounds, batch, nms)
        bounds.update(stage_bounds)
        attrs.update(thresholds)
    return Golden(weights, x, outputs, layers, bounds, attrs, detector=stages)


def _detector_stages(weights: Weights, x: np.ndarray, outputs: dict, bounds: dict, batch, nms):
    """A detector's oracle stages after the network (:data:`DETECTOR_STAGES`), the bounds of the
    decoded priors, and the thresholds as root attributes."""
    from dataclasses import asdict

    from ..bounds import decode_bounds
    from ..detector.graph import OUTPUT
    from ..detector.run import NmsSettings, PreparedBatch, head_settings, postprocess
    from ..detector.spec import level_sizes

    config = weights.config
    n, _, height, width = x.shape
    if batch is None:
        batch = PreparedBatch(x, np.stack([np.eye(3)] * n), ((width, height),) * n)
    nms = nms or NmsSettings()
    output = outputs[OUTPUT]
    levels = [(level.height, level.width) for level in level_sizes(config, width, height)]
    settings = head_settings(config)
    decoded = decode_bounds(output, bounds[OUTPUT].astype(np.float64), settings["num_classes"], settings["reg_max"],
                            levels, settings["strides"], settings["prior_offset"], (width, height))
    kept = postprocess(output, config, batch, nms)
    stages = {"decode.scores": decoded.scores, "decode.boxes": decoded.boxes,
              **{k: v.astype(DETECTOR_STAGES[k][0]) for k, v in kept.items()},
              "preprocess.matrices": np.asarray(batch.matrices, dtype=np.float64),
              "preprocess.original_sizes": np.asarray(batch.original_sizes, dtype=np.int64).reshape(n, 2)}
    stage_bounds = {"decode.scores": decoded.score_bound.astype(np.float32),
                    "decode.boxes": decoded.box_bound.astype(np.float32)}
    return stages, stage_bounds, asdict(nms)


def write_golden(path, golden: Golden) -> None:
    """Write ``golden`` to ``path`` atomically (see the module docstring for the layout)."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        f.attrs["format"] = FORMAT
        f.attrs["schema_version"] = SCHEMA_VERSION
        for key, value in golden.attrs.items():
            f.attrs[key] = value
        f.create_dataset("input", data=golden.input, track_times=False)
        for group_name, tensors in (("outputs", golden.outputs), ("intermediates", golden.intermediates),
                                    ("bounds", golden.bounds)):
            group = f.create_group(group_name, track_order=True)
            for name, value in tensors.items():
                group.create_dataset(name, data=value, track_times=False)
        write_weights_group(f.create_group("weights", track_order=True), golden.weights)
        if golden.detector:
            group = f.create_group("detector", track_order=True)
            for name, value in golden.detector.items():
                group.create_dataset(name, data=value, track_times=False)


#: Bytes of HDF5 metadata per dataset of a golden file (measured: 400-420 with h5py 3.16).
HDF5_DATASET_OVERHEAD = 410


def golden_file_size(weights: Weights, shape: tuple[int, ...], intermediates: bool) -> int:
    """The bytes of the golden file :func:`write_golden` writes for ``weights`` on an input of NCHW
    ``shape`` (within about 0.1 %): the float32 input, float64 oracle and float32 bound of every
    stored tensor, the weights, and HDF5's metadata. ``refghost golden`` says it before computing."""
    from ..arch import output_shapes

    graph = weights.graph
    shapes = output_shapes(graph, *shape[:1], *shape[2:])
    stored = [shapes[node] for node in graph.outputs.values()]
    if intermediates:
        stored += [shapes[node.name] for node in graph.nodes]
    if is_detector(weights.config):  # the decoded priors with their bounds (the detections are small)
        n, priors, _ = shapes[graph.outputs["output"]]
        stored += [(n, priors, weights.config.num_classes), (n, priors, 4)]
    tensors = sum(int(np.prod(s)) for s in stored) * (8 + 4)
    datasets = 1 + 2 * len(stored) + len(weights.tensors)
    return (4 * int(np.prod(shape)) + tensors + sum(a.nbytes for a in weights.tensors.values())
            + HDF5_DATASET_OVERHEAD * datasets)


#: The members of a golden file's root (schema v1): name -> "group" or "dataset"; a detector's
#: golden has a ``detector`` group too (:data:`DETECTOR_STAGES`).
ROOT_MEMBERS = {"input": "dataset", "outputs": "group", "intermediates": "group", "bounds": "group",
                "weights": "group"}


def read_golden(path) -> Golden:
    """Read and check a golden file. Raises :class:`GoldenError` naming the problem.

    Every name, kind, dtype and shape is checked against the stored weights' network before any
    tensor is read (the input's declared size against :data:`refghost.weights.MAX_INPUT_PIXELS`,
    each tensor's against the shape the network gives it), then the bounds are checked to be
    finite and non-negative and the input finite.
    """
    import h5py

    path = os.fspath(path)
    hint = "regenerate it with `refghost golden --weights W.h5 --out GOLDEN.h5 ...`"
    err = GoldenError
    with open_hdf5(path, GoldenError, "golden") as f:
        fmt = safe_io.attribute(f, "format", path, err, "str")
        if fmt != FORMAT:
            raise GoldenError(f"{path}: format is {fmt!r}, expected {FORMAT!r}")
        version = safe_io.attribute(f, "schema_version", path, err, "int")
        if version != SCHEMA_VERSION:
            raise GoldenError(f"{path}: golden schema version {version}, this refghost reads version "
                              f"{SCHEMA_VERSION}; {hint}")
        root = dict(safe_io.members(f, path, err, max_members=len(ROOT_MEMBERS) + 1))
        for name, kind in ROOT_MEMBERS.items():
            if name not in root:
                raise GoldenError(f"{path}: {name!r} is missing; {hint}")
            found = "group" if isinstance(root[name], h5py.Group) else "dataset"
            if found != kind:
                raise GoldenError(f"{path}: {name!r} is a {found}, expected a {kind}; {hint}")
        attrs = safe_io.all_attributes(f, path, err)
        try:
            weights = read_weights_group(root["weights"], f"{path}:/weights")
        except WeightsError as exc:
            raise GoldenError(str(exc)) from None
        graph = weights.graph
        unknown = sorted(set(root) - set(ROOT_MEMBERS) - ({"detector"} if is_detector(weights.config) else set()))
        if unknown:
            raise GoldenError(f"{path}: unexpected member {unknown[0]!r} at the root; {hint}")
        if is_detector(weights.config) and "detector" not in root:
            raise GoldenError(f"{path}: 'detector' is missing (a detector's golden holds its decode and detections); "
                              f"{hint}")
        x_shape, _ = safe_io.dataset_info(root["input"], f"{path}:/input", err, dtypes=(np.dtype(np.float32),),
                                          max_elements=3 * MAX_INPUT_PIXELS)
        if len(x_shape) != 4 or x_shape[1] != 3 or min(x_shape) < 1:
            raise GoldenError(f"{path}: input has shape {list(x_shape)}, expected float32 (N, 3, H, W)")
        n, _, h, w = x_shape
        if n * h * w > MAX_INPUT_PIXELS:
            raise GoldenError(f"{path}: input {list(x_shape)} has {n * h * w} pixels, more than {MAX_INPUT_PIXELS}")
        shapes = output_shapes(graph, n, h, w)
        if min(min(s) for s in shapes.values()) < 1:
            raise GoldenError(f"{path}: input {list(x_shape)} is too small for this network")
        outputs = safe_io.members(root["outputs"], f"{path}:/outputs", err, max_members=len(graph.outputs))
        if [k for k, _ in outputs] != list(graph.outputs):
            raise GoldenError(f"{path}: outputs {[k for k, _ in outputs]} do not match the weights' "
                              f"{list(graph.outputs)}; {hint}")
        layers = safe_io.members(root["intermediates"], f"{path}:/intermediates", err, max_members=2 * len(shapes))
        shape_of = {name: shapes[node] for name, node in graph.outputs.items()}
        for name, _ in layers:
            if name not in shapes or name == "input":
                raise GoldenError(f"{path}: intermediate {name!r} is not a layer of this network; {hint}")
            shape_of[name] = shapes[name]
        float64 = (np.dtype(np.float64),)
        for group, items in (("outputs", outputs), ("intermediates", layers)):
            for name, ds in items:
                if not isinstance(ds, h5py.Dataset):
                    raise GoldenError(f"{path}:/{group}/{name} is a group, expected a dataset; {hint}")
                safe_io.dataset_info(ds, f"{path}:/{group}/{name}", err, dtypes=float64, shape=shape_of[name])
        stage_items = []
        if "detector" in root:
            stage_items = _detector_stage_items(root["detector"], f"{path}:/detector", weights, n, h, w)
            shape_of.update({name: shape for name, (_, shape) in stage_items if name in BOUNDED_STAGES})
        bounds = dict(safe_io.members(root["bounds"], f"{path}:/bounds", err, max_members=2 * len(shape_of)))
        for name in shape_of:
            if name not in bounds:
                raise GoldenError(f"{path}: bound of {name!r} is missing or has the wrong shape; {hint}")
        for name, ds in bounds.items():
            if name not in shape_of:
                raise GoldenError(f"{path}: bound {name!r} belongs to no stored tensor; {hint}")
            if not isinstance(ds, h5py.Dataset):
                raise GoldenError(f"{path}:/bounds/{name} is a group, expected a dataset; {hint}")
            safe_io.dataset_info(ds, f"{path}:/bounds/{name}", err, dtypes=(np.dtype(np.float32),),
                                 shape=shape_of[name])

        def read(group, name, ds):
            return safe_io.read_dataset(ds, f"{path}:/{group}/{name}", err)

        x = safe_io.read_dataset(root["input"], f"{path}:/input", err)
        out_values = {k: read("outputs", k, v) for k, v in outputs}
        layer_values = {k: read("intermediates", k, v) for k, v in layers}
        bound_values = {k: read("bounds", k, bounds[k]) for k in shape_of}
        stages = {k: read("detector", k, ds) for k, (ds, _) in stage_items}
    if not np.isfinite(x).all():
        raise GoldenError(f"{path}: the input holds NaN or Inf values; {hint}")
    for name, bound in bound_values.items():
        if not (np.isfinite(bound).all() and (bound >= 0).all()):
            raise GoldenError(f"{path}: bound of {name!r} holds NaN, infinite or negative values; a bound is a "
                              f"finite distance >= 0; {hint}")
    golden = Golden(weights, x, out_values, layer_values, bound_values, attrs, path=path, detector=stages)
    _check_consistent(golden, path, hint)
    return golden


def _detector_stage_items(group, where: str, weights: Weights, n: int, h: int, w: int) -> list:
    """``[(name, (dataset, shape))]`` of a detector golden's ``/detector`` group, every member of
    :data:`DETECTOR_STAGES` checked (name, dtype, shape) before anything is read."""
    from ..detector.spec import num_priors

    err = GoldenError
    config = weights.config
    p, c = num_priors(config, w, h), config.num_classes
    items = dict(safe_io.members(group, where, err, max_members=len(DETECTOR_STAGES)))
    if list(items) != list(DETECTOR_STAGES):
        raise GoldenError(f"{where}: holds {list(items)}, expected {list(DETECTOR_STAGES)}")
    k = None
    checked = []
    for name, (dtype, shape_of) in DETECTOR_STAGES.items():
        expected = None if name.startswith("detections.") else shape_of(n, p, c, 0)
        shape, _ = safe_io.dataset_info(items[name], f"{where}/{name}", err, dtypes=(np.dtype(dtype),), shape=expected,
                                        max_elements=4 * n * p * c)
        if name.startswith("detections."):
            k = shape[0] if k is None else k
            if shape != shape_of(n, p, c, k):
                raise GoldenError(f"{where}/{name} has shape {list(shape)}, expected {list(shape_of(n, p, c, k))}")
        checked.append((name, (items[name], shape)))
    return checked


def _check_consistent(golden: Golden, path: str, hint: str) -> None:
    graph = golden.weights.graph
    x = golden.input
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != np.float32:
        raise GoldenError(f"{path}: input has shape {x.shape} and dtype {x.dtype}, expected float32 (N, 3, H, W)")
    if list(golden.outputs) != list(graph.outputs):
        raise GoldenError(f"{path}: outputs {list(golden.outputs)} do not match the weights' "
                          f"{list(graph.outputs)}; {hint}")
    known = {n.name for n in graph.nodes}
    for name in golden.intermediates:
        if name not in known:
            raise GoldenError(f"{path}: intermediate {name!r} is not a layer of this network; {hint}")
    for name, value in golden.tensors().items():
        bound = golden.bounds.get(name)
        if bound is None or bound.shape != value.shape:
            raise GoldenError(f"{path}: bound of {name!r} is missing or has the wrong shape; {hint}")
