"""The refghost weights file (HDF5, schema v1): write it, read it, check it strictly.

The schema is documented in ``docs/weights-format.md``. In short: one dataset per PyTorch
state_dict key, at the root, named exactly as the key (BatchNorm unfolded: ``weight``, ``bias``,
``running_mean``, ``running_var``); float32 or float64; root attributes for the format, the
architecture and its config, the preprocessing and the provenance.

Two kinds of network: a GhostNet (``arch`` "nanodet" or "ghostnet", :class:`refghost.arch.Config`)
and a whole NanoDet detector (``arch`` "detector", :class:`refghost.detector.spec.DetectorConfig`
stored as JSON in the root attribute ``detector``). Loading is strict, by name and shape, against
the graph of the recorded config (:func:`network_graph`): a missing, unexpected or mis-shaped
key, a non-float or non-finite tensor, a wrong format name or schema version is a
:class:`~refghost.errors.WeightsError` naming the problem.
``num_batches_tracked`` keys (BatchNorm's training counter) are accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import preprocess, safe_io
from .arch import NUM_STAGES, Config, Graph, build_graph
from .atomic import atomic_path
from .errors import RefghostError, WeightsError
from .safe_io import open_hdf5  # noqa: F401 - the guarded HDF5 open, re-exported for golden/cli

FORMAT = "refghost-weights"
SCHEMA_VERSION = 1
#: BatchNorm's step counter: in PyTorch's state_dict, never read in eval mode.
IGNORED_SUFFIX = ".num_batches_tracked"
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: The ``arch`` of a whole NanoDet detector (backbone, neck, head): its architecture is the JSON
#: attribute ``detector`` instead of a GhostNet's ``width``, ``activation``, ``out_stages`` and
#: ``num_classes``.
DETECTOR_ARCH = "detector"
#: Root attributes every weights file must have: name -> what it holds.
REQUIRED_ATTRS = {
    "format": f'"{FORMAT}"',
    "schema_version": f"integer {SCHEMA_VERSION}",
    "arch": f'"nanodet", "ghostnet" or "{DETECTOR_ARCH}"',
    "width": "width multiplier, float",
    "activation": "activation name (NanoDet spelling)",
    "out_stages": "int array, subset of 0..9 (nanodet); empty for ghostnet",
    "num_classes": "int, 0 for nanodet",
    "input_mean": "3 floats, per channel in input channel order, 0..255 scale",
    "input_std": "3 floats, as input_mean",
    "channel_order": '"BGR" or "RGB"',
    "input_size": "2 ints, [width, height]",
    "detector": f"JSON object of DetectorConfig's fields (arch {DETECTOR_ARCH!r} only)",
}
#: Optional root attributes with their default: ``folded`` = 1 when BatchNorm is folded into the
#: convolutions (``<conv>.weight`` + ``<conv>.bias``, no BN keys), as in weights imported from ONNX
#: (GhostNet only: a detector's ``folded`` is a field of its config); ``keep_ratio`` = 1 when the
#: image is resized keeping its aspect ratio (NanoDet's ``keep_ratio: True``); ``class_names``, a
#: JSON list of strings, one per class of a detector (empty: unnamed).
OPTIONAL_ATTRS = {"folded": 0, "keep_ratio": 0, "class_names": "[]"}
#: Largest width multiplier read or converted: GhostNet is published at 0.5 to 2.0; 8 already
#: means 64x the parameters of 1.0x (about 250 M), and the cap keeps declared shapes finite.
MAX_WIDTH = 8.0
#: Largest network input, in pixels per batch (N * H * W): ``input_size`` of a weights file, a
#: golden file's input, ``refghost golden --batch``. A golden with every intermediate takes
#: about 3.3 KB per input pixel (340 MB at 1x3x320x320), so 2^20 pixels (ten 320x320 inputs,
#: or one 1024x1024) is about 3.5 GB: the most a verification input needs, well inside memory.
MAX_INPUT_PIXELS = 1 << 20
#: Root attributes that record where the weights came from (optional, free text).
PROVENANCE_ATTRS = ("source_file", "source_sha256", "converter", "description")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network input: channel order, mean/std (0..255), size (w, h), and
    whether the resize keeps the aspect ratio (NanoDet's ``keep_ratio``; default: a stretch)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str
    input_size: tuple[int, int]
    keep_ratio: bool = False

    def __post_init__(self):
        if self.channel_order not in ("BGR", "RGB"):
            raise RefghostError(f"channel_order must be 'BGR' or 'RGB', got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(math.isfinite(m) for m in self.mean) \
                or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise RefghostError(f"input_mean/input_std need 3 finite values, std > 0: got {self.mean}, {self.std}")
        if len(self.input_size) != 2 or not all(int(v) >= 1 for v in self.input_size):
            raise RefghostError(f"input_size must be [width, height] >= 1, got {self.input_size}")
        if math.prod(int(v) for v in self.input_size) > MAX_INPUT_PIXELS:
            raise RefghostError(f"input_size {list(self.input_size)} has more than {MAX_INPUT_PIXELS} pixels")

    @classmethod
    def from_preset(cls, preset: dict) -> "Preprocessing":
        """From one of :mod:`refghost.preprocess`'s preset dictionaries."""
        return cls(tuple(preset["mean"]), tuple(preset["std"]), preset["channel_order"], tuple(preset["input_size"]))


#: NanoDet's val pipeline: BGR, ImageNet statistics in BGR order, 320x320.
NANODET_PREPROCESSING = Preprocessing.from_preset(preprocess.NANODET_PREPROCESSING)
#: Huawei's ImageNet classifier: RGB, ImageNet statistics, 224x224.
IMAGENET_PREPROCESSING = Preprocessing.from_preset(preprocess.IMAGENET_PREPROCESSING)


def default_preprocessing(arch: str) -> Preprocessing:
    return IMAGENET_PREPROCESSING if arch == "ghostnet" else NANODET_PREPROCESSING


def is_detector(config) -> bool:
    """True for a whole NanoDet detector's config, False for a GhostNet's."""
    from .detector.spec import DetectorConfig

    return isinstance(config, DetectorConfig)


def network_graph(config) -> Graph:
    """The layer graph of a GhostNet :class:`~refghost.arch.Config` or a detector's
    :class:`~refghost.detector.spec.DetectorConfig`."""
    if is_detector(config):
        from .detector.graph import build_detector_graph

        return build_detector_graph(config)
    return build_graph(config)


def config_arch(config) -> str:
    """The ``arch`` root attribute of a config: "nanodet", "ghostnet" or "detector"."""
    return DETECTOR_ARCH if is_detector(config) else config.arch


def describe_config(config) -> str:
    """One line naming the network, e.g. ``nanodet width 1 activation ReLU`` or
    ``detector shufflenetv2 1.0x + ghost_pan 96 + nanodet_plus head, 80 classes``."""
    if is_detector(config):
        return (f"{DETECTOR_ARCH} {config.backbone} {config.backbone_width:g}x + {config.neck} {config.neck_channels}"
                f" + {config.head} head, {config.num_classes} classes{' (BN folded)' if config.folded else ''}")
    return (f"{config.arch} width {config.width:g} activation {config.activation}"
            f"{' (BN folded)' if config.folded else ''}")


def detector_config_json(config) -> str:
    """A detector's config as the JSON object stored in the ``detector`` attribute."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def detector_config_from_json(text: str):
    """The :class:`~refghost.detector.spec.DetectorConfig` a ``detector`` attribute describes.
    Raises RefghostError naming a malformed document, an unknown field or a bad value."""
    from .detector.spec import DetectorConfig

    try:
        fields = json.loads(text)
    except ValueError as exc:
        raise RefghostError(f"attribute 'detector' is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise RefghostError(f"attribute 'detector' must be a JSON object, got {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(DetectorConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise RefghostError(f"attribute 'detector' has unknown field(s) {unknown}; known: {sorted(known)}")
    for name, value in fields.items():  # JSON arrays are lists; the config's sequences are tuples
        if isinstance(value, list):
            fields[name] = tuple(value)
    return DetectorConfig(**fields)


def class_names_from_json(text: str, num_classes: int) -> tuple[str, ...]:
    """The ``class_names`` attribute: a JSON list of ``num_classes`` strings, or empty."""
    try:
        names = json.loads(text)
    except ValueError as exc:
        raise RefghostError(f"attribute 'class_names' is not JSON: {exc}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RefghostError("attribute 'class_names' must be a JSON list of strings")
    if names and len(names) != num_classes:
        raise RefghostError(f"attribute 'class_names' names {len(names)} classes, the network has {num_classes}")
    return tuple(names)


@dataclass
class DerivedCache:
    """What is computed from a :class:`Weights` object once and kept with it."""

    #: compute dtype -> the tensors in that dtype (:meth:`Weights.params`)
    params: dict[np.dtype, dict[str, np.ndarray]] = field(default_factory=dict)
    #: (dtype name, input shape) -> the engine's plan, or the ``EngineUnsupported`` saying why it
    #: cannot run (:func:`refghost.engine.get_plan`), least recently used first
    plans: OrderedDict[tuple[str, tuple[int, ...]], object] = field(default_factory=OrderedDict)


@dataclass(frozen=True)
class Weights:
    """A validated weights file: config, graph, preprocessing, provenance and the tensors.

    ``tensors`` maps state_dict keys (exactly ``graph.param_shapes``) to read-only arrays in
    the file's dtype. Build one with :func:`load_weights` or :func:`from_tensors`.
    """

    config: Config  # or a detector's DetectorConfig
    preprocessing: Preprocessing
    tensors: dict[str, np.ndarray]
    provenance: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None
    #: a detector's class names, one per class, or empty (unnamed classes)
    class_names: tuple[str, ...] = ()
    graph: Graph = field(init=False, repr=False, compare=False)
    cache: DerivedCache = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "graph", network_graph(self.config))
        object.__setattr__(self, "cache", DerivedCache())
        if self.class_names and len(self.class_names) != getattr(self.config, "num_classes", -1):
            raise WeightsError(f"{len(self.class_names)} class names for a network of "
                               f"{getattr(self.config, 'num_classes', 0)} classes")
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
        cache = self.cache.params
        if dtype not in cache:
            cache[dtype] = {k: v.astype(dtype) for k, v in self.tensors.items()}
        return cache[dtype]


def from_tensors(tensors: dict, config: Config, preprocessing: Preprocessing | None = None,
                 provenance: dict | None = None, class_names=()) -> Weights:
    """Validate a state_dict-like mapping (``num_batches_tracked`` dropped) as :class:`Weights`
    (``config``: a GhostNet's :class:`~refghost.arch.Config` or a detector's ``DetectorConfig``)."""
    kept = {}
    for key, value in tensors.items():
        if key.endswith(IGNORED_SUFFIX):
            continue
        array = np.array(value)  # a private copy
        array.flags.writeable = False
        kept[key] = array
    return Weights(config, preprocessing or default_preprocessing(config_arch(config)), kept,
                   dict(provenance or {}), class_names=tuple(class_names))


def _check_tensors(tensors: dict, graph: Graph, where: str) -> None:
    expected = graph.param_shapes
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    what = describe_config(graph.config)
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


def load_weights(path) -> Weights:
    """Read and validate a refghost weights file (see the module docstring). Raises WeightsError."""
    path = os.fspath(path)
    with open_hdf5(path, WeightsError, "weights") as f:
        weights = read_weights_group(f, path)
    object.__setattr__(weights, "sha256", file_sha256(path))
    return weights


def read_weights_group(group, where: str) -> Weights:
    """Validate and read the weights stored in an HDF5 group (a file's root, or a golden file's
    ``/weights``); ``where`` names it in error messages.

    Everything is checked before any tensor is read: the root attributes (types, then values),
    every member's name, link kind, dtype, shape and storage against what the recorded config
    needs (:mod:`refghost.safe_io`); then exactly the needed tensors are read.
    """
    import h5py

    err = WeightsError

    def attr(name, kind, **kw):
        return safe_io.attribute(group, name, where, err, kind, missing=REQUIRED_ATTRS.get(name, ""),
                                 noun="root attribute", **kw)

    fmt = attr("format", "str")
    if fmt != FORMAT:
        raise WeightsError(f"{where}: format is {fmt!r}, expected {FORMAT!r}")
    version = attr("schema_version", "int")
    if version != SCHEMA_VERSION:
        raise WeightsError(f"{where}: schema version {version}, this refghost reads version {SCHEMA_VERSION}")
    arch = attr("arch", "str")
    mean, std = attr("input_mean", "floats", length=3), attr("input_std", "floats", length=3)
    order, size = attr("channel_order", "str"), attr("input_size", "ints", length=2)
    keep_ratio = attr("keep_ratio", "int", default=OPTIONAL_ATTRS["keep_ratio"])
    if keep_ratio not in (0, 1):
        raise WeightsError(f"{where}: attribute 'keep_ratio' is {keep_ratio}, expected 0 or 1")
    try:
        if arch == DETECTOR_ARCH:
            config = detector_config_from_json(attr("detector", "str"))
            if config.backbone == "ghostnet" and not 0 < config.backbone_width <= MAX_WIDTH:
                raise RefghostError(f"backbone_width is {config.backbone_width!r}, expected (0, {MAX_WIDTH:g}]")
            class_names = class_names_from_json(attr("class_names", "str", default=OPTIONAL_ATTRS["class_names"]),
                                                config.num_classes)
        else:
            config, class_names = _ghostnet_config(attr, where), ()
        pre = Preprocessing(mean, std, order, size, bool(keep_ratio))
        graph = network_graph(config)
    except RefghostError as exc:
        raise WeightsError(f"{where}: bad root attributes: {exc}") from None
    provenance = {k: attr(k, "str") for k in PROVENANCE_ATTRS
                  if safe_io.guarded(err, where, "cannot read attributes", lambda: k in group.attrs)}
    expected = graph.param_shapes
    what = describe_config(config)
    # at most one num_batches_tracked counter per BatchNorm (two per key set is generous)
    listed = safe_io.members(group, where, err, max_members=2 * len(expected) + 8)
    found = {}
    for key, obj in listed:
        if not isinstance(obj, h5py.Dataset):
            raise WeightsError(f"{where}: {key!r} is a group; schema v1 keeps every tensor at the root")
        if key.endswith(IGNORED_SUFFIX):
            continue
        if key not in expected:
            shape = safe_io.guarded(err, where, f"unreadable shape of {key!r}", lambda: obj.shape)
            raise WeightsError(f"{where}: unexpected key {key!r} with shape {list(shape or ())} for {what}")
        safe_io.dataset_info(obj, f"{where}: key {key!r}", err, dtypes=FLOAT_DTYPES, shape=expected[key],
                             needed_by=what)
        found[key] = obj
    missing = [k for k in expected if k not in found]
    if missing:
        raise WeightsError(f"{where}: missing {len(missing)} key(s) that {what} needs, first "
                           f"{missing[0]!r} with shape {list(expected[missing[0]])}" + _more(missing))
    tensors = {key: safe_io.read_dataset(found[key], f"{where}: key {key!r}", err) for key in expected}
    return Weights(config, pre, tensors, provenance, path=where, class_names=class_names)


def _ghostnet_config(attr, where: str) -> Config:
    """The GhostNet config of a weights file's root attributes (``arch``, ``width``, ``activation``,
    ``out_stages``, ``num_classes``, ``folded``)."""
    arch, width, activation = attr("arch", "str"), attr("width", "float"), attr("activation", "str")
    out_stages, num_classes = attr("out_stages", "ints"), attr("num_classes", "int")
    folded = attr("folded", "int", default=OPTIONAL_ATTRS["folded"])
    if not (math.isfinite(width) and 0 < width <= MAX_WIDTH):
        raise WeightsError(f"{where}: width is {width!r}, expected a multiplier in (0, {MAX_WIDTH:g}]")
    if folded not in (0, 1):
        raise WeightsError(f"{where}: attribute 'folded' is {folded}, expected 0 or 1")
    if len(out_stages) > NUM_STAGES:
        raise WeightsError(f"{where}: out_stages has {len(out_stages)} entries, at most {NUM_STAGES}")
    return Config(arch=arch, width=width, activation=activation, out_stages=out_stages,
                  num_classes=num_classes, folded=bool(folded))


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
    group.attrs["arch"] = config_arch(cfg)
    if is_detector(cfg):
        group.attrs["detector"] = detector_config_json(cfg)
        if weights.class_names:
            group.attrs["class_names"] = json.dumps(list(weights.class_names))
    else:
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
    if pre.keep_ratio:
        group.attrs["keep_ratio"] = 1
    for key in PROVENANCE_ATTRS:
        if key in weights.provenance:
            group.attrs[key] = str(weights.provenance[key])
    for key in weights.graph.param_shapes:
        group.create_dataset(key, data=weights.tensors[key], track_times=False)
