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
from ..weights import MAX_INPUT_PIXELS, Weights, open_hdf5, read_weights_group, write_weights_group

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


def make_golden(weights: Weights, x: np.ndarray, *, intermediates: bool = False, input_source: str = "",
                command: str = "", warp_kernel: str | None = None) -> Golden:
    """Compute the float64 oracle and its bounds for input ``x`` (N, 3, H, W) float32.

    ``warp_kernel``: the resize kernel that made ``x`` from an image, recorded as a root attribute.
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
    return Golden(weights, x, outputs, layers, bounds, attrs)


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


#: The members of a golden file's root (schema v1): name -> "group" or "dataset".
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
    tensors = sum(int(np.prod(s)) for s in stored) * (8 + 4)
    datasets = 1 + 2 * len(stored) + len(weights.tensors)
    return (4 * int(np.prod(shape)) + tensors + sum(a.nbytes for a in weights.tensors.values())
            + HDF5_DATASET_OVERHEAD * datasets)


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
        root = dict(safe_io.members(f, path, err, max_members=len(ROOT_MEMBERS)))
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
    if not np.isfinite(x).all():
        raise GoldenError(f"{path}: the input holds NaN or Inf values; {hint}")
    for name, bound in bound_values.items():
        if not (np.isfinite(bound).all() and (bound >= 0).all()):
            raise GoldenError(f"{path}: bound of {name!r} holds NaN, infinite or negative values; a bound is a "
                              f"finite distance >= 0; {hint}")
    golden = Golden(weights, x, out_values, layer_values, bound_values, attrs, path=path)
    _check_consistent(golden, path, hint)
    return golden


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
