"""Run a ported model in the runtime it was ported to, every tensor named by module path.

A candidate model file is run on a golden file's input by the runtime its extension names (or
``runtime=``). Each runtime lives in its own module of this package, and every one keeps the
same contract: one entry point::

    observe(path: str, golden: Golden, *, precise: bool, options: dict[str, str], threads: int) -> Observed

that runs the model and returns what it saw (:class:`Observed`): the ops of its graph in one
vocabulary (:class:`refghost.runtimes.mapping.Op`, ONNX's op types), the value of every exposed
tensor in NCHW, the outputs as deployed, and the :class:`Precision` in effect. The adapter never
names a layer: :func:`run_model` hands what it saw to :func:`refghost.runtimes.mapping.match`,
the one place runtime tensors are matched to module paths, and returns a :class:`RuntimeRun`.

``precise=False`` runs the model as a user ships it (the runtime's defaults); ``precise=True``
asks for the runtime's most precise settings. ``options`` are runtime settings given by the
user (``--runtime-option KEY=VALUE``), applied last. The runtime packages are optional
(``pip install "refghost[runtimes]"``); a missing one is a :class:`RuntimeMissing` error naming
the package to install; a model a runtime refuses or fails on is a :class:`RuntimeFailed`
carrying the runtime's message; a graph that cannot be matched to the network is a
:class:`refghost.runtimes.mapping.MappingError`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..arch import output_shapes
from ..errors import CompareError

__all__ = ["EXTENSIONS", "RUNTIMES", "Observed", "Precision", "RuntimeFailed", "RuntimeMissing", "RuntimeRun",
           "format_parts", "input_shape", "layer_shapes", "nchw", "require", "run_model", "runtime_for",
           "to_golden_shape"]

#: Runtime name -> the module of this package that runs it.
RUNTIMES = {
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "mnn": "mnn",
    "ncnn": "ncnn",
    "litert": "litert",
}
#: Model file extension -> the runtime that runs it by default.
EXTENSIONS = {".onnx": "onnxruntime", ".xml": "openvino", ".mnn": "mnn", ".param": "ncnn", ".tflite": "litert"}


class RuntimeMissing(CompareError):
    """The runtime a candidate needs is not installed."""


class RuntimeFailed(CompareError):
    """The runtime refused the model or crashed on it (the message is the runtime's)."""


@dataclass(frozen=True)
class Precision:
    """The precision a runtime actually used, as far as it tells or its model file shows.

    The three formats are those of :class:`refghost.bounds.Policy` (one vocabulary, one of
    ``"float32"``, ``"float16"``, ``"bfloat16"`` each): ``arithmetic`` is the precision of the
    operations (products, sums), ``weights`` the precision the weights are stored in,
    ``activations`` the precision tensors are stored in between layers. ``detail`` says where
    each came from (a property read back, a flag, the model file), naming the runtime;
    ``remedy`` what gives float32 when ``--precise`` cannot (weights stored narrow in the file).
    """

    arithmetic: str = "float32"
    weights: str = "float32"
    activations: str = "float32"
    detail: str = ""
    remedy: str = ""

    def __post_init__(self):
        from ..bounds import UNIT_ROUNDOFF

        for name in ("arithmetic", "weights", "activations"):
            if getattr(self, name) not in UNIT_ROUNDOFF:
                raise ValueError(f"Precision.{name} must be one of {tuple(UNIT_ROUNDOFF)}, got {getattr(self, name)!r}")

    @property
    def is_float32(self) -> bool:
        return self.arithmetic == self.weights == self.activations == "float32"

    @property
    def policy(self) -> str:
        """The name of the precision policy that bounds a run at this precision: the one table,
        :data:`refghost.bounds.POLICIES`, looked up by :func:`refghost.bounds.policy_for`."""
        from ..bounds import policy_for

        return policy_for(self.arithmetic, self.weights, self.activations).name


@dataclass
class Observed:
    """What an adapter's ``observe`` returns: one run of a model as its runtime showed it.

    ``ops`` (topological order, ONNX's vocabulary) name the tensors of ``values``, each an array
    in NCHW (or (N, C) for a vector), the whole batch; ``outputs`` are the model's outputs as
    deployed, in the golden's output order, NCHW (None: the values of the layers the golden's
    outputs name, from this same run). ``matcher`` says how :func:`refghost.runtimes.mapping.match`
    matches the ops (one of its ``MATCHERS``), ``fused_activations`` whether the runtime fuses an
    activation into the conv before it, ``labels`` how the runtime names a tensor in reports
    (default: its key)."""

    ops: list
    values: dict[str, np.ndarray]
    outputs: list[np.ndarray] | None
    precision: Precision
    runtime: str  # a key of RUNTIMES
    version: str  # the runtime package's version
    options: dict[str, str]  # every setting the run used, as text
    exposed: int  # how many tensors the runtime exposed
    matcher: str = "names"
    fused_activations: bool = False
    labels: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class RuntimeRun:
    """What one run of a candidate model in its runtime gave."""

    tensors: dict[str, np.ndarray]  # module path or output name -> array in the golden's shape
    runtime: str  # a key of RUNTIMES
    version: str  # the runtime package's version
    options: dict[str, str]  # every setting the run used, as text
    precision: Precision
    mapping: dict[str, tuple[str, str]]  # runtime tensor name -> (module path, how it was matched)
    exposed: int  # how many tensors the runtime exposed
    notes: list[str] = field(default_factory=list)
    model: str = ""  # the model file that ran
    #: a whole detector's {part: [mapped, exposed (None: unknown)]} (refghost.runtimes.mapping.part_counts)
    parts: dict = field(default_factory=dict)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.model} ({self.runtime} {self.version}" + (f", {opts})" if opts else ")")

    def mapping_summary(self) -> str:
        """``"183 of 497 exposed tensors mapped to layers (183 by exporter scope names)"``."""
        hows: dict[str, int] = {}
        for _, how in self.mapping.values():
            kind = how.split(":")[0]  # "by structure: Convolution 12 (line 4)": counted as "by structure"
            hows[kind] = hows.get(kind, 0) + 1
        detail = ", ".join(f"{n} {how}" for how, n in hows.items())
        return (f"{len(self.mapping)} of {self.exposed} exposed tensors mapped to layers" + (f" ({detail})" if detail
                                                                                           else "")
                + (f"; {format_parts(self.parts)}" if self.parts else ""))

    def summary(self) -> dict:
        """The run as JSON-ready data (the ``runtime`` entry of a ``--json`` report)."""
        return {"runtime": self.runtime, "version": self.version, "model": self.model, "options": self.options,
                "precision": asdict(self.precision), "exposed": self.exposed, "mapped": len(self.mapping),
                "parts": self.parts,
                "mapping": {k: {"module": m, "how": h} for k, (m, h) in self.mapping.items()}, "notes": self.notes}


def require(module: str, package: str):
    """Import ``module`` or raise :class:`RuntimeMissing` naming the pip ``package`` to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeMissing(f"this candidate needs the Python package {package!r} ({exc}); install it with "
                             f"`pip install {package}` or `pip install \"refghost[runtimes]\"`") from None


def runtime_for(path: str, runtime: str | None = None) -> str:
    """The runtime that runs the model file ``path``: ``runtime`` when given, else by extension."""
    if runtime is not None:
        if runtime not in RUNTIMES:
            raise CompareError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        return runtime
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise CompareError(f"{path}: no runtime runs {ext or 'files without an extension'}; model files are "
                           + ", ".join(f"{e} ({r})" for e, r in EXTENSIONS.items()))
    return EXTENSIONS[ext]


def run_model(path: str, golden, *, runtime: str | None = None, precise: bool = False,
              options: dict[str, str] | None = None, threads: int = 1) -> RuntimeRun:
    """Run the model file ``path`` on ``golden``'s input in its runtime; its tensors matched to
    module paths by :func:`refghost.runtimes.mapping.match`."""
    from .mapping import match, part_counts

    path = os.fspath(path)
    name = runtime_for(path, runtime)
    module = importlib.import_module(f"{__name__}.{RUNTIMES[name]}")
    seen = module.observe(path, golden, precise=precise, options=dict(options or {}), threads=threads)
    tensors, mapping = match(seen, golden)
    return RuntimeRun(tensors, seen.runtime, seen.version, seen.options, seen.precision, mapping, seen.exposed,
                      list(seen.notes), model=path, parts=part_counts(seen, golden, mapping))


def format_parts(parts: dict) -> str:
    """``"backbone 146/146, fpn 73/73, head 41/41 mapped/exposed"`` (``"backbone 146,
    ... mapped"`` where the runtime names no modules)."""
    if all(exposed is not None for _, exposed in parts.values()):
        return ", ".join(f"{p} {m}/{e}" for p, (m, e) in parts.items()) + " mapped/exposed"
    return ", ".join(f"{p} {m}" for p, (m, _) in parts.items()) + " mapped"


def input_shape(path: str, runtime: str | None = None) -> tuple[int, ...] | None:
    """The NCHW input shape the model file ``path`` declares, where its runtime can read one that
    is fixed (an ncnn ``.param`` declares none); None otherwise."""
    module = importlib.import_module(f"{__name__}.{RUNTIMES[runtime_for(path, runtime)]}")
    reader = getattr(module, "input_shape", None)
    if reader is None:
        return None
    shape = reader(os.fspath(path))
    return tuple(int(d) for d in shape) if shape is not None and len(shape) == 4 and all(
        isinstance(d, int) and d > 0 for d in shape) else None


def nchw(array: np.ndarray, layout: str | None) -> np.ndarray:
    """``array`` moved from ``layout`` (``NCHW``, ``NHWC``) to NCHW (an array of another rank, or of
    an unknown layout ``None``, as it is)."""
    array = np.asarray(array)
    if layout == "NHWC" and array.ndim == 4:
        return np.moveaxis(array, -1, 1)
    return array


def to_golden_shape(array: np.ndarray, shape: tuple[int, ...], layout: str = "NCHW") -> np.ndarray:
    """``array`` as the golden's NCHW ``shape``: moved from ``layout`` (``NCHW``, ``NHWC``, ``CHW``,
    ``HWC``) and given back dropped axes of length 1 (a pooled ``(N, C)`` vector is ``(N, C, 1, 1)``).
    An array of another size is returned as it is (the comparison reports the shape mismatch)."""
    array = np.asarray(array)
    if layout in ("NHWC", "HWC") and array.ndim == len(layout):
        array = np.moveaxis(array, -1, -3)
    if array.shape != tuple(shape) and array.size == int(np.prod(shape)):
        array = array.reshape(shape)
    return array


def layer_shapes(golden) -> dict[str, tuple[int, ...]]:
    """The NCHW shape of every layer's output on ``golden``'s input."""
    n, _, h, w = golden.input.shape
    return output_shapes(golden.weights.graph, n, h, w)
