"""ONNX Runtime (CPU execution provider): an ``.onnx`` model.

The model runs twice on the golden's input: as it is, for the outputs as deployed, and with
every node output exposed as a graph output, for the intermediates (exposing a tensor stops ORT
from fusing it away, so this run may round differently from the deployed one; each is honest on
its own and checked as such). The ONNX nodes are the ops (:func:`refghost.runtimes.mapping.onnx_ops`),
matched by :mod:`refghost.runtimes.mapping` (the exporter's scope names, else the structure).

ONNX Runtime's CPU provider computes float32 at every setting: ``precise=True`` changes nothing.
``options``: ``optimization`` = ``all`` (default, ``ORT_ENABLE_ALL``) or ``none``.
"""

from __future__ import annotations

import numpy as np

from .mapping import onnx_ops
from .onnx_package import import_onnx
from . import Observed, Precision, RuntimeFailed, require

OPTIMIZATIONS = ("all", "none")


def observe(path: str, golden, *, precise: bool, options: dict[str, str], threads: int) -> Observed:
    ort = require("onnxruntime", "onnxruntime")
    onnx = import_onnx()
    unknown = sorted(set(options) - {"optimization"})
    if unknown:
        raise RuntimeFailed(f"unknown ONNX Runtime option {unknown[0]!r}; the one option is optimization=all|none")
    optimization = options.get("optimization", "all")
    if optimization not in OPTIMIZATIONS:
        raise RuntimeFailed(f"optimization must be one of {OPTIMIZATIONS}, got {optimization!r}")
    try:
        model = onnx.load(path)
    except Exception as exc:  # onnx raises DecodeError and others for a bad file
        raise RuntimeFailed(f"{path}: not a readable ONNX model ({exc})") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise RuntimeFailed(f"{path}: expected one input, found {[i.name for i in inputs]}")
    check_input_shape(path, inputs[0], golden.input.shape)
    output_names = [o.name for o in graph.output]
    feed = {inputs[0].name: golden.input}
    deployed = _run(ort, path, model, feed, threads, optimization)
    existing = set(output_names)
    exposed = 0
    for node in graph.node:
        for name in node.output:
            if name and name not in existing:
                graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                existing.add(name)
                exposed += 1
    values = _run(ort, path, model, feed, threads, optimization)
    return Observed(onnx_ops(graph), values, [deployed[name] for name in output_names],
                    Precision(detail="ONNX Runtime's CPU provider computes in float32"), "onnxruntime",
                    ort.__version__, {"threads": str(threads), "optimization": optimization},
                    exposed + len(output_names))


def input_shape(path: str):
    """The model's input shape (None for a dynamic dimension)."""
    onnx = import_onnx()
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception as exc:
        raise RuntimeFailed(f"{path}: not a readable ONNX model ({exc})") from None
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]


def _run(ort, path, model, feed, threads, optimization) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed)))
    except Exception as exc:  # ORT raises its own exception types
        raise RuntimeFailed(f"{path}: ONNX Runtime could not run it on the golden input "
                            f"{tuple(next(iter(feed.values())).shape)}: {str(exc).splitlines()[0]}") from None


def check_input_shape(path, value_info, shape) -> None:
    """Refuse an ONNX input (ValueInfoProto) whose fixed dimensions differ from ``shape``."""
    dims = value_info.type.tensor_type.shape.dim
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(fixed) != len(shape) or any(f is not None and f != s for f, s in zip(fixed, shape)):
        raise RuntimeFailed(f"{path}: the model's input {value_info.name} has shape "
                            f"{[f if f is not None else '?' for f in fixed]}, the golden input is {list(shape)}; "
                            f"make a golden of that shape (refghost golden --seed N with a matching --input)")
