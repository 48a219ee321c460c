"""ONNX Runtime (CPU execution provider): an ``.onnx`` model.

The model runs twice on the golden's input: as it is, for the outputs as deployed, and with
every node output exposed as a graph output, for the intermediates (exposing a tensor stops ORT
from fusing it away, so this run may round differently from the deployed one; each is honest on
its own and checked as such). ONNX tensors are mapped to module paths by
:func:`refghost.runtimes.mapping.map_onnx` (the exporter's scope names, else the structure).

ONNX Runtime's CPU provider computes float32 at every setting: ``precise=True`` changes nothing.
``options``: ``optimization`` = ``all`` (default, ``ORT_ENABLE_ALL``) or ``none``.
"""

from __future__ import annotations

import numpy as np

from .mapping import map_onnx
from .onnx_package import import_onnx
from . import Precision, RuntimeFailed, RuntimeRun, collect, require

OPTIMIZATIONS = ("all", "none")


def run(path: str, golden, *, precise: bool, options: dict[str, str], threads: int) -> RuntimeRun:
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
    mapping, how = map_onnx(graph, golden.weights.graph)
    tensors, mapping = collect(golden, [deployed[name] for name in output_names], values, mapping, how)
    notes = [f"{len(mapping)} ONNX tensors mapped to layers {how}"]
    return RuntimeRun(tensors, "onnxruntime", ort.__version__,
                      {"threads": str(threads), "optimization": optimization},
                      Precision(detail="ONNX Runtime's CPU provider computes in float32"), mapping,
                      exposed + len(output_names), notes, model=path)


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
