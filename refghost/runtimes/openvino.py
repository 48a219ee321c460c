"""OpenVINO (CPU plugin): an ``.xml`` IR (its ``.bin`` beside it) or an ``.onnx`` model.

The model is compiled twice on the golden's input: as it is, for the outputs as deployed, and
with every named port of the model added as an output, for the intermediates (a port that is an
output cannot be fused away, so the plugin's fusions, e.g. the SE's hard-sigmoid as a post-op of
the conv before it, do not happen in that run; each run is honest on its own).

OpenVINO's ONNX frontend keeps the ONNX tensor names on ports and the ONNX node names as friendly
names: the ops (:func:`graph_ops`, in ONNX's vocabulary, with the scope names where the exporter
wrote them) are matched by :mod:`refghost.runtimes.mapping`, by scope names, else by structure.
A bias is a separate ``Add`` after a ``Convolution``: the pair is one ``Conv``.

Precision: the CPU plugin's default ``INFERENCE_PRECISION_HINT`` is ``bf16`` on CPUs with bf16
instructions (AVX512_BF16, AMX) and ``f32`` otherwise; the value in effect is read back from the
compiled model; the CPU plugin's bf16 kernels take bf16 inputs and weights and accumulate in
float32, reported as bfloat16 weights and tensors with float32 arithmetic (policy
``bfloat16-storage``). ``precise=True`` sets ``INFERENCE_PRECISION_HINT=f32`` and
``EXECUTION_MODE_HINT=ACCURACY``. Weights stored as ``f16`` constants (``openvino.save_model``
compresses them by default) are reported as float16 weights. ``options`` are OpenVINO
properties (``KEY=VALUE``), applied last.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .mapping import Op, scope_of_name
from . import Observed, Precision, RuntimeFailed, require

#: OpenVINO op type -> ONNX op type (the vocabulary of refghost.runtimes.mapping; plumbing there too).
OPS = {
    "Convert": "Cast", "Reshape": "Reshape", "Squeeze": "Squeeze", "Unsqueeze": "Unsqueeze", "ShapeOf": "Shape",
    "Gather": "Gather", "Broadcast": "Expand",
    "Convolution": "Conv", "GroupConvolution": "Conv", "BatchNormInference": "BatchNormalization",
    "Relu": "Relu", "PRelu": "PRelu", "Elu": "Elu", "Selu": "Selu", "Gelu": "Gelu", "HSwish": "HardSwish",
    "Sigmoid": "Sigmoid", "Erf": "Erf", "Clamp": "Clip", "Minimum": "Clip", "HSigmoid": "HardSigmoid", "HardSigmoid": "HardSigmoid",
    "Add": "Add", "Multiply": "Mul", "Divide": "Div", "Concat": "Concat", "Slice": "Slice",
    "StridedSlice": "Slice", "ReduceMean": "ReduceMean", "AvgPool": "GlobalAveragePool", "MatMul": "MatMul",
}
_CONSTANT_LIKE = {"Constant", "Reshape", "Convert", "Unsqueeze"}
#: Precision names of OpenVINO's element types.
_PRECISIONS = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
PRECISE = {"INFERENCE_PRECISION_HINT": "f32", "EXECUTION_MODE_HINT": "ACCURACY"}


def _is_conv_bias(op) -> bool:
    """An ``Add`` of a constant to a (Group)Convolution's output: the conv's bias."""
    if op.get_type_name() != "Add":
        return False
    kinds = [i.get_source_output().get_node().get_type_name() for i in op.inputs()]
    convs = [k for k in kinds if k in ("Convolution", "GroupConvolution")]
    return len(kinds) == 2 and len(convs) == 1 and (set(kinds) - set(convs)) <= _CONSTANT_LIKE


def graph_ops(model, output_nodes: dict[str, str]) -> tuple[list[Op], list]:
    """``(ops, ports)``: the model's ops in topological order in ONNX's vocabulary (each named by its
    output port's first tensor name), and the ports that hold them. A port named after a graph
    output (``blocks.4``) has the scope of the node ``output_nodes`` says produces it."""
    ops, ports = [], []
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Parameter", "Result", "Constant") or op.get_output_size() != 1:
            continue
        port = op.output(0)
        names = sorted(port.get_names())
        if not names:  # a conv without its bias Add, a shape computation: never a layer's output
            continue
        onnx_kind = "Conv" if _is_conv_bias(op) else OPS.get(kind, kind)
        scope = (scope_of_name(op.get_friendly_name()) or scope_of_name(names[0])
                 or next((output_nodes[n] for n in names if n in output_nodes), None))
        ops.append(Op(onnx_kind, names[0], scope))
        ports.append(port)
    return ops, ports


def _fold_constants(model) -> None:
    """Fold the ONNX frontend's shape computations into constants (a conv's bias becomes one Add of
    a constant), as ``openvino.convert_model`` and the plugin do; the function computed is the same.
    (``convert_model`` itself is not used: it forks a telemetry process.)"""
    try:
        from openvino.passes import ConstantFolding, Manager
    except ImportError:  # OpenVINO before 2024.2
        from openvino.runtime.passes import ConstantFolding, Manager
    manager = Manager()
    manager.register_pass(ConstantFolding())
    manager.run_passes(model)


def _weights_precision(model) -> tuple[str, str]:
    types = {str(op.get_output_element_type(0).get_type_name()) for op in model.get_ordered_ops()
             if op.get_type_name() == "Constant" and op.get_output_partial_shape(0).rank.get_length() >= 2}
    for name in ("f16", "bf16"):
        if name in types:
            return _PRECISIONS[name], f"weights stored as {name} constants in the model"
    return "float32", "weights stored as f32 constants"


def observe(path: str, golden, *, precise: bool, options: dict[str, str], threads: int) -> Observed:
    ov = require("openvino", "openvino")
    config = {"INFERENCE_NUM_THREADS": str(threads)}
    if precise:
        config.update(PRECISE)
    config.update(options)
    core = ov.Core()
    try:
        model = core.read_model(path)
    except Exception as exc:  # OpenVINO raises RuntimeError with its own text
        raise RuntimeFailed(f"{path}: OpenVINO could not read it: {_first_line(exc)}") from None
    if len(model.inputs) != 1:
        raise RuntimeFailed(f"{path}: expected one input, found {len(model.inputs)}")
    x = golden.input.astype(np.float32)
    try:
        model.reshape({model.inputs[0]: ov.PartialShape(list(x.shape))})
    except Exception as exc:
        raise RuntimeFailed(f"{path}: the model does not take the golden input {list(x.shape)}: "
                            f"{_first_line(exc)}") from None

    weights, weights_detail = _weights_precision(model)  # before folding turns f16 -> f32 Converts into f32
    _fold_constants(model)

    def infer(m):
        try:
            compiled = core.compile_model(m, "CPU", config)
            result = compiled.create_infer_request().infer({0: x})
        except Exception as exc:
            raise RuntimeFailed(f"{path}: OpenVINO could not run it on the golden input {list(x.shape)} "
                                f"with {config}: {_first_line(exc)}") from None
        by_name = {name: np.array(result[o]) for o in compiled.outputs for name in o.get_names()}
        return compiled, [np.array(result[o]) for o in compiled.outputs], by_name

    compiled, deployed, _ = infer(model)
    ops, ports = graph_ops(model, golden.weights.graph.outputs)
    if not any(op.scope for op in ops if op.output not in golden.weights.graph.outputs):
        ops = [Op(op.kind, op.output) for op in ops]  # no scope names but the outputs': by structure
    model.add_outputs(ports)
    _, _, values = infer(model)

    used = {k: _text(compiled.get_property(k)) for k in ("INFERENCE_PRECISION_HINT", "EXECUTION_MODE_HINT",
                                                        "INFERENCE_NUM_THREADS", "NUM_STREAMS")}
    hint = used["INFERENCE_PRECISION_HINT"]
    stored = _PRECISIONS.get(hint, hint)
    if stored == "bfloat16":  # the CPU plugin's bf16 kernels (AVX512-BF16 dot products, AMX) accumulate in f32
        precision = Precision(arithmetic="float32", weights="bfloat16", activations="bfloat16",
                              detail=f"OpenVINO: INFERENCE_PRECISION_HINT={hint} read back from the compiled model: "
                                     f"weights and tensors in bf16, float32 accumulation; {weights_detail}")
    else:
        precision = Precision(arithmetic=stored, weights=weights if stored == "float32" else stored,
                              activations=stored,
                              detail=f"OpenVINO: INFERENCE_PRECISION_HINT={hint} read back from the compiled model; "
                                     f"{weights_detail}")
    if weights != "float32":  # in the file: no setting of the plugin widens them again
        precision = replace(precision, remedy=f"the IR stores its weights as {weights} constants, which --precise "
                                              f"cannot undo; save it again with float32 weights: "
                                              f"openvino.save_model(model, 'model.xml', compress_to_fp16=False) "
                                              f"(or ovc model.onnx --compress_to_fp16=False)")
    options_used = {**{k: str(v) for k, v in config.items()}, **used}
    notes = [f"intermediates from a second compilation with {len(ports)} ports as outputs (no fusion across them)"]
    notes.append(f"OpenVINO build {ov.__version__}")
    values = {op.output: values[op.output] for op in ops if op.output in values}
    return Observed(ops, values, deployed, precision, "openvino", ov.__version__.split("-")[0], options_used,
                    len(ports), notes=notes)


def input_shape(path: str):
    """The model's input shape (None for a dynamic one)."""
    ov = require("openvino", "openvino")
    try:
        model = ov.Core().read_model(path)
    except Exception as exc:
        raise RuntimeFailed(f"{path}: OpenVINO could not read it: {_first_line(exc)}") from None
    shape = model.inputs[0].get_partial_shape() if len(model.inputs) == 1 else None
    return None if shape is None or shape.is_dynamic else list(shape.to_shape())


def _text(value) -> str:
    """An OpenVINO property value as the text one would set it with (``bf16``, ``ACCURACY``, ``2``)."""
    if hasattr(value, "get_type_name"):
        return value.get_type_name()
    return getattr(value, "name", None) or str(value)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
