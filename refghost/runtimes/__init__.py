"""Run a ported model in the runtime it was ported to, every tensor named by module path.

A candidate model file is run on a golden file's input by the runtime its extension names (or
``runtime=``), and every tensor the runtime exposes is put back in the golden's NCHW shape and
mapped to the refghost layer it holds. Each runtime lives in its own module of this package with
one entry point::

    run(path: str, golden: Golden, *, precise: bool, options: dict[str, str], threads: int) -> RuntimeRun

``precise=False`` runs the model as a user ships it (the runtime's defaults); ``precise=True``
asks for the runtime's most precise settings. ``options`` are runtime settings given by the
user (``--runtime-option KEY=VALUE``), applied last. The runtime packages are optional
(``pip install "refghost[runtimes]"``); a missing one is a :class:`RuntimeMissing` error naming
the package to install; a runtime that refuses the model or fails on it is a
:class:`RuntimeFailed` carrying the runtime's message. Adapters build the tensors of a run with
:func:`collect` (outputs as deployed, mapped intermediates in the golden's shapes) and map them
with :mod:`refghost.runtimes.mapping`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from ..arch import output_shapes
from ..errors import CompareError

__all__ = ["EXTENSIONS", "RUNTIMES", "Precision", "RuntimeFailed", "RuntimeMissing", "RuntimeRun", "collect",
           "layer_shapes", "require", "run_model", "runtime_for", "to_golden_shape"]

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

    Each field is one of ``"float32"``, ``"float16"``, ``"bfloat16"``: ``arithmetic`` is the
    precision of the operations (products, sums), ``weights`` the precision the weights are
    stored in, ``activations`` the precision tensors are stored in between layers.
    ``detail`` says where each came from (a property read back, a flag, the model file).
    """

    arithmetic: str = "float32"
    weights: str = "float32"
    activations: str = "float32"
    detail: str = ""

    @property
    def is_float32(self) -> bool:
        return self.arithmetic == self.weights == self.activations == "float32"

    @property
    def policy(self) -> str:
        """The precision policy (:data:`refghost.bounds.POLICIES`) that bounds a run at this precision.

        Narrow arithmetic gives that format's arithmetic policy: a runtime does not say whether it
        accumulates in float32, so the looser model is taken. Otherwise the storage formats give
        the storage policies; a bfloat16 weight with float32 tensors is bounded as bfloat16 storage.
        """
        if self.arithmetic != "float32":
            return self.arithmetic
        if self.activations != "float32":
            return f"{self.activations}-storage"
        if self.weights == "float16":
            return "float16-weights"
        if self.weights == "bfloat16":
            return "bfloat16-storage"
        return "float32"


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

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.model} ({self.runtime} {self.version}" + (f", {opts})" if opts else ")")

    def mapping_summary(self) -> str:
        """``"183 of 497 exposed tensors mapped to layers (183 by exporter scope names)"``."""
        hows: dict[str, int] = {}
        for _, how in self.mapping.values():
            hows[how] = hows.get(how, 0) + 1
        detail = ", ".join(f"{n} {how}" for how, n in hows.items())
        return f"{len(self.mapping)} of {self.exposed} exposed tensors mapped to layers" + (f" ({detail})" if detail
                                                                                          else "")

    def summary(self) -> dict:
        """The run as JSON-ready data (the ``runtime`` entry of a ``--json`` report)."""
        return {"runtime": self.runtime, "version": self.version, "model": self.model, "options": self.options,
                "precision": asdict(self.precision), "exposed": self.exposed, "mapped": len(self.mapping),
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
    """Run the model file ``path`` on ``golden``'s input in its runtime."""
    name = runtime_for(path, runtime)
    module = importlib.import_module(f"{__name__}.{RUNTIMES[name]}")
    return module.run(path, golden, precise=precise, options=dict(options or {}), threads=threads)


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


def collect(golden, outputs: list[np.ndarray], values: dict[str, np.ndarray], mapping: dict[str, str], how: str,
            layout: str = "NCHW") -> tuple[dict[str, np.ndarray], dict[str, tuple[str, str]]]:
    """``(tensors, mapping)`` of a run: the deployed ``outputs`` (in the model's output order) under
    the golden's output names, and every mapped runtime tensor of ``values`` under its module path,
    each in the golden's shape. ``mapping`` comes back as ``{runtime name: (module path, how)}``."""
    names = list(golden.outputs)
    if len(outputs) != len(names):
        raise CompareError(f"the model has {len(outputs)} outputs, the golden has {len(names)} ({names})")
    shape_of = layer_shapes(golden)
    tensors = {name: to_golden_shape(out, golden.outputs[name].shape, layout) for name, out in zip(names, outputs)}
    for runtime_name, layer in mapping.items():
        if runtime_name in values and layer not in tensors:
            value = values[runtime_name]
            tensors[layer] = to_golden_shape(value, shape_of[layer], layout) if layer in shape_of else value
    return tensors, {k: (v, how) for k, v in mapping.items()}
