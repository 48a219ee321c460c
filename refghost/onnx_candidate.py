"""ONNX candidates, the entry points kept from before the runtime adapters.

:func:`run_onnx` runs an ``.onnx`` model in ONNX Runtime (:mod:`refghost.runtimes.onnxruntime`)
and returns ``(tensors, description, notes)``; :func:`map_tensors` maps an ONNX graph's tensors to
refghost layers (:func:`refghost.mapping.map_onnx`: scope names, else structure).
"""

from __future__ import annotations

from .arch import Graph
from .golden import Golden
from .mapping import map_onnx


def run_onnx(path, golden: Golden, *, threads: int = 1, optimization: str = "all"):
    """Return ``(tensors, description, notes)``: the model's tensors by refghost name
    (:mod:`refghost.runtimes.onnxruntime`)."""
    from .runtimes.onnxruntime import run

    result = run(path, golden, precise=False, options={"optimization": optimization}, threads=threads)
    description = (f"{path} (ONNX Runtime {result.version}, {threads} thread(s), optimization "
                   f"{result.options['optimization']})")
    return result.tensors, description, result.notes


def map_tensors(graph, network: Graph) -> tuple[dict[str, str], str]:
    """``{onnx tensor name: refghost node name}`` for an ONNX GraphProto, and how they were matched
    (:func:`refghost.mapping.map_onnx`)."""
    return map_onnx(graph, network)
