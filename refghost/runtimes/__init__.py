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
the package to install.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

import numpy as np

from ..compare import CompareError

__all__ = ["EXTENSIONS", "RUNTIMES", "Precision", "RuntimeMissing", "RuntimeRun", "require", "run_model",
           "runtime_for"]

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

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.runtime} {self.version}" + (f" ({opts})" if opts else "")


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
