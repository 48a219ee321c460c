"""MNN (CPU backend): an ``.mnn`` model, run through MNN's Python module API.

``MNN.expr.load_as_dict`` lists the model's tensors under the names the converter kept (the ONNX
tensor names), each with the op that produces it; the model is loaded again with every one of
them as an output (``MNN.nn.load_module_from_file``), run on the golden's input, and each result
moved from MNN's packed ``NC4HW4`` layout to ``NCHW`` (``MNN.expr.convert``). MNN fuses a
Conv(+folded BN)+ReLU into one ``Convolution`` named after the ReLU's output, and the SE's
hard-sigmoid becomes ``ADD``, ``ReLU6``, ``MUL``: the ops (:func:`graph_ops`, in ONNX's
vocabulary) are matched by :mod:`refghost.runtimes.mapping`, by the exporter's scope names where
the converter kept them, else by structure.

Settings: ``precision`` = ``normal`` (MNN's default), ``high`` (``precise=True``) or ``low``;
``backend`` = ``CPU``; the thread count. ``options`` may set ``precision``, ``memory``, ``power``.
On x86 CPUs MNN's CPU backend has no float16 arithmetic (it prints ``fp16:0`` at import), so
every mode computes float32 there; on ARM with fp16 support, ``low`` computes float16.

Convert ONNX models with ``_tools.mnnconvert([...])`` (what the ``mnnconvert`` command calls),
not the ``mnnconvert`` command: its wrapper imports a logger that runs ``pip install -U
aliyun-log-python-sdk`` (which can downgrade ``protobuf`` below what ``onnx`` needs) and sends
usage logs.
"""

from __future__ import annotations

import contextlib
import os
import platform

import numpy as np

from .mapping import PLUMBING, Op, scope_of_name
from . import Observed, Precision, RuntimeFailed, require

#: MNN op type -> ONNX op type (the vocabulary of refghost.runtimes.mapping; plumbing there too:
#: ``ConvertTensor`` and ``Raster`` move memory, as a Transpose or Reshape does).
OPS = {
    "Input": "Input", "Const": "Constant", "ConvertTensor": "Transpose", "Raster": "Reshape", "Reshape": "Reshape",
    "Squeeze": "Squeeze", "Unsqueeze": "Unsqueeze", "Cast": "Cast",
    "Convolution": "Conv", "ConvolutionDepthwise": "Conv", "ADD": "Add", "MUL": "Mul", "DIV": "Div",
    "REALDIV": "Div", "Concat": "Concat", "ReLU": "Relu", "ReLU6": "Clip", "PReLU": "PRelu", "ELU": "Elu",
    "Selu": "Selu", "Sigmoid": "Sigmoid", "Pooling": "GlobalAveragePool", "Pooling3D": "GlobalAveragePool",
    "Reduction": "ReduceMean", "BatchNorm": "BatchNormalization", "InnerProduct": "Gemm", "MatMul": "MatMul",
    "Slice": "Slice", "StridedSlice": "Slice",
}
PRECISIONS = ("normal", "high", "low")
_BEFORE_OUTPUT = "__before_tr"  # MNN's name for a graph output's tensor before its layout conversion


@contextlib.contextmanager
def _quiet_stdout():
    """Silence C-level prints on file descriptor 1 (MNN prints its CPU features at import)."""
    try:
        fd = os.dup(1)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(fd, 1)
        os.close(fd)


def _import():
    with _quiet_stdout():
        require("MNN", "mnn")
        import MNN.expr
        import MNN.nn
    return MNN


def graph_ops(variables: dict, output_nodes: dict[str, str]) -> list[Op]:
    """The model's ops in topological order (producers before consumers, a depth-first walk from
    the outputs), in ONNX's vocabulary. A tensor of a graph output (``blocks.4``, or
    ``blocks.4__before_tr``) has the scope of the node ``output_nodes`` says produces it."""
    order: list[str] = []
    seen: set[str] = set()
    for root in variables:
        stack = [(root, False)]
        while stack:
            name, done = stack.pop()
            if done:
                order.append(name)
                continue
            if name in seen or name not in variables:
                continue
            seen.add(name)
            stack.append((name, True))
            for source in reversed([v.name for v in variables[name].inputs]):
                stack.append((source, False))
    ops = []
    for name in order:
        kind = variables[name].op_type
        base = name[: -len(_BEFORE_OUTPUT)] if name.endswith(_BEFORE_OUTPUT) else name
        scope = scope_of_name(name) or output_nodes.get(base)
        ops.append(Op(OPS.get(kind, kind), name, scope))
    return ops


def input_shape(path: str):
    """The model's input shape as its converter recorded it (NCHW)."""
    MNN = _import()
    try:
        with _quiet_stdout():
            variables = MNN.expr.load_as_dict(path)
    except Exception as exc:
        raise RuntimeFailed(f"{path}: MNN could not read it: {exc}") from None
    inputs = [v for v in variables.values() if v.op_type == "Input"]
    return list(inputs[0].shape) if len(inputs) == 1 else None


def observe(path: str, golden, *, precise: bool, options: dict[str, str], threads: int) -> Observed:
    MNN = _import()
    F, nn = MNN.expr, MNN.nn
    config = {"backend": "CPU", "precision": "high" if precise else "normal", "numThread": threads}
    for key, value in options.items():
        if key not in ("precision", "memory", "power", "backend"):
            raise RuntimeFailed(f"unknown MNN option {key!r}; MNN options are precision=normal|high|low, "
                                f"memory=normal|high|low, power=normal|high|low")
        config[key] = value
    if config["precision"] not in PRECISIONS:
        raise RuntimeFailed(f"MNN precision must be one of {PRECISIONS}, got {config['precision']!r}")
    if config["backend"] != "CPU":
        raise RuntimeFailed(f"refghost runs MNN on its CPU backend only, not {config['backend']!r}")
    try:
        with _quiet_stdout():
            variables = F.load_as_dict(path)
    except Exception as exc:
        raise RuntimeFailed(f"{path}: MNN could not read it: {exc}") from None
    if not variables:
        raise RuntimeFailed(f"{path}: MNN could not read it (no tensors; not an .mnn model?)")
    inputs = [name for name, v in variables.items() if v.op_type == "Input"]
    if len(inputs) != 1:
        raise RuntimeFailed(f"{path}: expected one input, found {inputs}")
    network = golden.weights.graph
    ops = graph_ops(variables, network.outputs)
    if not any(op.scope for op in ops if op.output.split(_BEFORE_OUTPUT)[0] not in network.outputs):
        ops = [Op(op.kind, op.output) for op in ops]  # no scope names but the outputs': by structure
    exposed = [op.output for op in ops if op.kind not in PLUMBING]
    outputs = [name for name in network.outputs if name in variables]
    if len(outputs) != len(network.outputs):
        raise RuntimeFailed(f"{path}: the model's outputs do not carry the golden's output names "
                            f"{list(network.outputs)}; export with output_names={list(network.outputs)}")
    x = np.ascontiguousarray(golden.input, dtype=np.float32)
    try:
        with _quiet_stdout():
            manager = nn.create_runtime_manager((config,))
            module = nn.load_module_from_file(path, inputs, outputs + exposed, runtime_manager=manager)
            results = module.forward([F.const(x, list(x.shape), F.NCHW)])
            arrays = [np.array(F.convert(v, F.NCHW).read()) if v.data_format != F.NCHW else np.array(v.read())
                      for v in results]
    except Exception as exc:
        raise RuntimeFailed(f"{path}: MNN could not run it on the golden input {list(x.shape)} with {config}: "
                            f"{exc}") from None
    deployed = arrays[: len(outputs)]
    values = dict(zip(exposed, arrays[len(outputs):]))
    fp16 = config["precision"] == "low" and platform.machine().lower() in ("aarch64", "arm64")
    arithmetic = "float16" if fp16 else "float32"
    precision = Precision(arithmetic=arithmetic, weights="float32", activations=arithmetic,
                          detail=f"MNN precision mode {config['precision']} on a {platform.machine()} CPU "
                                 f"({'fp16 arithmetic' if fp16 else 'MNN has no fp16 arithmetic here'}); weights not "
                                 f"read from the file: float32 unless converted with --fp16")
    used = {k: str(v) for k, v in config.items()}
    notes = [f"all outputs from one run with {len(exposed)} tensors as outputs"]
    return Observed(ops, values, deployed, precision, "mnn", MNN.version(), used, len(exposed), fused_activations=True,
                    notes=notes)
