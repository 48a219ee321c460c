"""The refghost weights file (HDF5, schema v1): write it, read it, check it strictly.

The schema is documented in ``docs/weights-format.md``. In short: one dataset per PyTorch
state_dict key, at the root, named exactly as the key (BatchNorm unfolded: ``weight``, ``bias``,
``running_mean``, ``running_var``); float32 or float64; root attributes for the format, the
architecture and its config, the preprocessing and the provenance.

Loading is strict, by name and shape, against :func:`refghost.arch.build_graph` of the recorded
config: a missing, unexpected or mis-shaped key, a non-float or non-finite tensor, a wrong
format name or schema version is a :class:`~refghost.errors.WeightsError` naming the problem.
``num_batches_tracked`` keys (BatchNorm's training counter) are accepted and ignored.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import preprocess
from .arch import Config, Graph, build_graph
from .atomic import atomic_path
from .errors import RefghostError, WeightsError

FORMAT = "refghost-weights"
SCHEMA_VERSION = 1
#: BatchNorm's step counter: in PyTorch's state_dict, never read in eval mode.
IGNORED_SUFFIX = ".num_batches_tracked"
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: Root attributes every weights file must have: name -> what it holds.
REQUIRED_ATTRS = {
    "format": f'"{FORMAT}"',
    "schema_version": f"integer {SCHEMA_VERSION}",
    "arch": '"nanodet" or "ghostnet"',
    "width": "width multiplier, float",
    "activation": "activation name (NanoDet spelling)",
    "out_stages": "int array, subset of 0..9 (nanodet); empty for ghostnet",
    "num_classes": "int, 0 for nanodet",
    "input_mean": "3 floats, per channel in input channel order, 0..255 scale",
    "input_std": "3 floats, as input_mean",
    "channel_order": '"BGR" or "RGB"',
    "input_size": "2 ints, [width, height]",
}
#: Optional root attributes with their default: ``folded`` = 1 when BatchNorm is folded into the
#: convolutions (``<conv>.weight`` + ``<conv>.bias``, no BN keys), as in weights imported from ONNX.
OPTIONAL_ATTRS = {"folded": 0}
#: Root attributes that record where the weights came from (optional, free text).
PROVENANCE_ATTRS = ("source_file", "source_sha256", "converter", "description")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network input: channel order, mean/std (0..255), size (w, h)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str
    input_size: tuple[int, int]

    def __post_init__(self):
        if self.channel_order not in ("BGR", "RGB"):
            raise RefghostError(f"channel_order must be 'BGR' or 'RGB', got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise RefghostError(f"input_mean/input_std need 3 values, std > 0: got {self.mean}, {self.std}")
        if len(self.input_size) != 2 or not all(int(v) >= 1 for v in self.input_size):
            raise RefghostError(f"input_size must be [width, height] >= 1, got {self.input_size}")

    @classmethod
    def from_preset(cls, preset: dict) -> "Preprocessing":
        """From one of :mod:`refghost.preprocess`'s preset dictionaries."""
        return cls(tuple(preset["mean"]), tuple(preset["std"]), preset["channel_order"], tuple(preset["input_size"]))


#: NanoDet's val pipeline: BGR, ImageNet statistics in BGR order, 320x320.
NANODET_PREPROCESSING = Preprocessing.from_preset(preprocess.NANODET_PREPROCESSING)
#: Huawei's ImageNet classifier: RGB, ImageNet statistics, 224x224.
IMAGENET_PREPROCESSING = Preprocessing.from_preset(preprocess.IMAGENET_PREPROCESSING)


def default_preprocessing(arch: str) -> Preprocessing:
    return NANODET_PREPROCESSING if arch == "nanodet" else IMAGENET_PREPROCESSING


@dataclass(frozen=True)
class Weights:
    """A validated weights file: config, graph, preprocessing, provenance and the tensors.

    ``tensors`` maps state_dict keys (exactly ``graph.param_shapes``) to read-only arrays in
    the file's dtype. Build one with :func:`load_weights` or :func:`from_tensors`.
    """

    config: Config
    preprocessing: Preprocessing
    tensors: dict[str, np.ndarray]
    provenance: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None
    graph: Graph = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "graph", build_graph(self.config))
        _check_tensors(self.tensors, self.graph, self.path or self.provenance.get("source_file", "<in memory>"))

    def __repr__(self) -> str:
        # short: the default dataclass repr prints every tensor (over a million characters)
        dtypes = sorted({str(a.dtype) for a in self.tensors.values()})
        values = sum(a.size for a in self.tensors.values())
        sha = f", sha256={self.sha256[:12]!r}..." if self.sha256 else ""
        return (f"Weights({self.config!r}, {self.preprocessing!r}, tensors=<{len(self.tensors)} arrays, {values:,} "
                f"{'/'.join(dtypes)} values>, path={self.path!r}{sha})")

    def params(self, dtype) -> dict[str, np.ndarray]:
        """The tensors converted to ``dtype`` (float32 or float64), cached per dtype."""
        dtype = np.dtype(dtype)
        cache = self.__dict__.setdefault("_params", {})
        if dtype not in cache:
            cache[dtype] = {k: v.astype(dtype) for k, v in self.tensors.items()}
        return cache[dtype]


def from_tensors(tensors: dict, config: Config, preprocessing: Preprocessing | None = None,
                 provenance: dict | None = None) -> Weights:
    """Validate a state_dict-like mapping (``num_batches_tracked`` dropped) as :class:`Weights`."""
    kept = {}
    for key, value in tensors.items():
        if key.endswith(IGNORED_SUFFIX):
            continue
        array = np.array(value)  # a private copy
        array.flags.writeable = False
        kept[key] = array
    return Weights(config, preprocessing or default_preprocessing(config.arch), kept, dict(provenance or {}))


def _check_tensors(tensors: dict, graph: Graph, where: str) -> None:
    expected = graph.param_shapes
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    cfg = graph.config
    what = f"{cfg.arch} width {cfg.width:g} activation {cfg.activation}{' (BN folded)' if cfg.folded else ''}"
    if missing:
        raise WeightsError(f"{where}: missing {len(missing)} key(s) that {what} needs, first "
                           f"{missing[0]!r} with shape {list(expected[missing[0]])}" + _more(missing))
    if unexpected:
        raise WeightsError(f"{where}: {len(unexpected)} unexpected key(s) for {what}, first "
                           f"{unexpected[0]!r} with shape {list(np.shape(tensors[unexpected[0]]))}"
                           + _more(unexpected))
    for key, shape in expected.items():
        array = tensors[key]
        if tuple(array.shape) != shape:
            raise WeightsError(f"{where}: key {key!r} has shape {list(array.shape)}, expected {list(shape)} "
                               f"for {what}")
        if array.dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{where}: key {key!r} has dtype {array.dtype}, expected float32 or float64")
        if not np.isfinite(array).all():
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise WeightsError(f"{where}: key {key!r} has {bad} NaN or Inf value(s)")
    for key in graph.param_shapes:
        if key.endswith("running_var") and (tensors[key] < 0).any():
            raise WeightsError(f"{where}: key {key!r} has negative variances")


def _more(keys: list) -> str:
    return f" (all: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''})" if len(keys) > 1 else ""


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _attr(attrs, name, where):
    if name not in attrs:
        raise WeightsError(f"{where}: root attribute {name!r} is missing ({REQUIRED_ATTRS[name]})")
    value = attrs[name]
    return value.decode() if isinstance(value, bytes) else value


@contextmanager
def open_hdf5(path: str, error: type, kind: str):
    """Open ``path`` read-only; a missing, non-HDF5 or corrupt file raises ``error`` saying so."""
    import h5py

    if not os.path.isfile(path):
        raise error(f"{path}: no such {kind} file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise error(f"{path}: not a readable HDF5 file ({exc})") from None
    try:
        with f:
            yield f
    except OSError as exc:  # truncated or corrupt data blocks surface while reading
        raise error(f"{path}: HDF5 read error ({exc})") from None


def load_weights(path) -> Weights:
    """Read and validate a refghost weights file (see the module docstring). Raises WeightsError."""
    path = os.fspath(path)
    with open_hdf5(path, WeightsError, "weights") as f:
        weights = read_weights_group(f, path)
    object.__setattr__(weights, "sha256", file_sha256(path))
    return weights


def read_weights_group(group, where: str) -> Weights:
    """Validate and read the weights stored in an HDF5 group (a file's root, or a golden file's
    ``/weights``); ``where`` names it in error messages."""
    import h5py

    attrs = group.attrs
    fmt = _attr(attrs, "format", where)
    if fmt != FORMAT:
        raise WeightsError(f"{where}: format is {fmt!r}, expected {FORMAT!r}")
    version = int(_attr(attrs, "schema_version", where))
    if version != SCHEMA_VERSION:
        raise WeightsError(f"{where}: schema version {version}, this refghost reads version {SCHEMA_VERSION}")
    try:
        config = Config(arch=str(_attr(attrs, "arch", where)), width=float(_attr(attrs, "width", where)),
                        activation=str(_attr(attrs, "activation", where)),
                        out_stages=tuple(int(s) for s in np.atleast_1d(_attr(attrs, "out_stages", where))),
                        num_classes=int(_attr(attrs, "num_classes", where)),
                        folded=bool(int(attrs.get("folded", OPTIONAL_ATTRS["folded"]))))
        pre = Preprocessing(tuple(float(v) for v in _attr(attrs, "input_mean", where)),
                            tuple(float(v) for v in _attr(attrs, "input_std", where)),
                            str(_attr(attrs, "channel_order", where)),
                            tuple(int(v) for v in _attr(attrs, "input_size", where)))
    except WeightsError:
        raise
    except (RefghostError, TypeError, ValueError) as exc:
        raise WeightsError(f"{where}: bad root attributes: {exc}") from None
    provenance = {k: str(_attr(attrs, k, where)) for k in PROVENANCE_ATTRS if k in attrs}
    tensors = {}
    for key, obj in group.items():
        if not isinstance(obj, h5py.Dataset):
            raise WeightsError(f"{where}: {key!r} is a group; schema v1 keeps every tensor at the root")
        if key.endswith(IGNORED_SUFFIX):
            continue
        if obj.dtype.kind != "f":
            raise WeightsError(f"{where}: key {key!r} has dtype {obj.dtype}, expected float32 or float64")
        array = np.asarray(obj[()])
        array.flags.writeable = False
        tensors[key] = array
    return Weights(config, pre, tensors, provenance, path=where)


def save_weights(path, weights: Weights) -> None:
    """Write ``weights`` as a schema-v1 file, atomically (a temporary file renamed into place).

    Datasets are written in state_dict order, uncompressed, without timestamps, so the same
    weights give the same bytes.
    """
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        write_weights_group(f, weights)


def write_weights_group(group, weights: Weights) -> None:
    """Store ``weights`` in an HDF5 group: the schema-v1 attributes and one dataset per key."""
    cfg, pre = weights.config, weights.preprocessing
    group.attrs["format"] = FORMAT
    group.attrs["schema_version"] = SCHEMA_VERSION
    group.attrs["arch"] = cfg.arch
    group.attrs["width"] = cfg.width
    group.attrs["activation"] = cfg.activation
    group.attrs["out_stages"] = np.array(cfg.out_stages, dtype=np.int64)
    group.attrs["num_classes"] = cfg.num_classes
    if cfg.folded:
        group.attrs["folded"] = 1
    group.attrs["input_mean"] = np.array(pre.mean, dtype=np.float64)
    group.attrs["input_std"] = np.array(pre.std, dtype=np.float64)
    group.attrs["channel_order"] = pre.channel_order
    group.attrs["input_size"] = np.array(pre.input_size, dtype=np.int64)
    for key in PROVENANCE_ATTRS:
        if key in weights.provenance:
            group.attrs[key] = str(weights.provenance[key])
    for key in weights.graph.param_shapes:
        group.create_dataset(key, data=weights.tensors[key], track_times=False)
