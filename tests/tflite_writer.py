"""Write a GhostNet as a ``.tflite`` flatbuffer without TensorFlow, for testing refghost's LiteRT runs.

No TFLite converter installs within CI's limits here (onnx2tf needs tensorflow-cpu: 2.2 GB, about
6 minutes to install), so the tests make their LiteRT models with this writer, from refghost
weights, the way onnx2tf lays out the same network (measured on its output for a GhostNet
export): NHWC tensors; an explicit ``PAD`` before each conv with a kernel over 1 (PyTorch pads
both sides; TFLite's SAME pads one side at stride 2) and ``VALID`` convs; every BN folded into its
conv; ReLU as the conv's fused activation; each SE's hard-sigmoid ``relu6(x + 3) / 6`` as the
``+3`` in the second conv's bias with a fused ReLU6, then ``MUL`` by 1/6; the SE's mean ``MEAN``
over H, W keeping dims.

The flatbuffer fields written (TFLite schema, version 3): Model {version, operator_codes,
subgraphs, description, buffers}, OperatorCode {deprecated_builtin_code, version, builtin_code},
SubGraph {tensors, inputs, outputs, operators, name}, Tensor {shape, type, buffer, name},
Operator {opcode_index, inputs, outputs, builtin_options_type, builtin_options}.
"""

from __future__ import annotations

import flatbuffers
import numpy as np

from refghost.ops import conv_output_size
from refghost.runtimes.mapping import folded_conv_weight

# BuiltinOperator codes, BuiltinOptions union types, enum values (TFLite schema).
ADD, CONCATENATION, CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE, MUL, PAD, MEAN = 0, 2, 3, 4, 6, 18, 34, 40
OPTIONS = {CONV_2D: 1, DEPTHWISE_CONV_2D: 2, CONCATENATION: 10, ADD: 11, MUL: 21, PAD: 22, MEAN: 27}
FLOAT32, FLOAT16, INT32 = 0, 1, 2
SAME, VALID = 0, 1
NONE, RELU, RELU6 = 0, 1, 3


class _Graph:
    def __init__(self):
        self.tensors = []  # (name, shape, type, buffer)
        self.buffers = [b""]  # buffer 0: the empty one every activation tensor points at
        self.ops = []  # (code, inputs, outputs, options: dict)

    def tensor(self, name, shape, data: np.ndarray | None = None, dtype=FLOAT32) -> int:
        buffer = 0
        if data is not None:
            self.buffers.append(np.ascontiguousarray(data).tobytes())
            buffer = len(self.buffers) - 1
        self.tensors.append((name, [int(d) for d in shape], dtype, buffer))
        return len(self.tensors) - 1

    def op(self, code, inputs, out_name, out_shape, **options) -> int:
        out = self.tensor(out_name, out_shape)
        self.ops.append((code, list(inputs), [out], options))
        return out


def _bias(network, params, conv) -> np.ndarray:
    """The bias of ``conv`` with the BN after it folded in: (b - mean) * gamma / sqrt(var + eps) + beta."""
    out = params[conv.params["weight"]].shape[0]
    b = params[conv.params["bias"]] if "bias" in conv.params else np.zeros(out)
    consumers = [n for n in network.nodes if conv.name in n.inputs]
    if len(consumers) == 1 and consumers[0].op == "batch_norm":
        bn = consumers[0]
        scale = params[bn.params["weight"]] / np.sqrt(params[bn.params["running_var"]] + bn.attrs.get("eps", 1e-5))
        b = (b - params[bn.params["running_mean"]]) * scale + params[bn.params["bias"]]
    return b


def write_ghostnet_tflite(weights, path, input_shape, *, bug_layer: str | None = None,
                          float16_weights: bool = False) -> None:
    """Write ``weights`` (a refghost Weights, ReLU activation) as a float32 TFLite model for NCHW
    input shape ``input_shape``; ``bug_layer`` multiplies the largest-magnitude weight of that
    conv by 1.01. ``float16_weights`` stores the conv filters as float16, each read through a
    ``DEQUANTIZE`` op (as onnx2tf's ``*_float16.tflite``)."""
    network = weights.graph
    params = weights.params("float64")
    if network.config.activation != "ReLU":
        raise ValueError("the writer fuses ReLU only")
    n, c, h, w = input_shape
    g = _Graph()
    tensor_of = {"input": g.tensor("input", (n, h, w, c))}
    shape_of = {"input": (n, h, w, c)}
    consumers = {node.name: [m for m in network.nodes if node.name in m.inputs] for node in network.nodes}
    absorbed = {}  # a layer computed by the op of another (BN, activation, gate steps) -> that layer

    for node in network.nodes:
        if node.name in absorbed:
            tensor_of[node.name] = tensor_of[absorbed[node.name]]
            shape_of[node.name] = shape_of[absorbed[node.name]]
            continue
        src = node.inputs[0]
        x, (_, hi, wi, ci) = tensor_of[src], shape_of[src]
        if node.op == "conv":
            wt = folded_conv_weight(network, params, node)
            if node.name == bug_layer:
                wt = wt.copy()
                wt.flat[int(np.argmax(np.abs(wt)))] *= 1.01
            bias = _bias(network, params, node)
            o, _, k, _ = wt.shape
            stride, pad, groups = node.attrs["stride"], node.attrs["padding"], node.attrs["groups"]
            last, act = node.name, NONE
            nxt = consumers[last]
            if len(nxt) == 1 and nxt[0].op == "batch_norm":
                absorbed[nxt[0].name] = node.name
                last, nxt = nxt[0].name, consumers[nxt[0].name]
            if len(nxt) == 1 and nxt[0].op == "act":
                absorbed[nxt[0].name] = node.name
                act = RELU
            elif len(nxt) == 1 and nxt[0].op == "hard_sigmoid":  # relu6(x + 3) fused, / 6 next
                bias = bias + 3.0
                act = RELU6
            if pad:
                paddings = g.tensor(f"{node.name}/paddings", (4, 2),
                                    np.array([[0, 0], [pad, pad], [pad, pad], [0, 0]], np.int32), INT32)
                hi, wi = hi + 2 * pad, wi + 2 * pad
                x = g.op(PAD, [x, paddings], f"{node.name}/pad", (n, hi, wi, ci))
            ho, wo = conv_output_size(hi, k, stride, 0), conv_output_size(wi, k, stride, 0)
            b = g.tensor(f"{node.name}/bias", (o,), bias.astype(np.float32))
            filt = wt.transpose(0, 2, 3, 1) if groups == 1 else wt.transpose(1, 2, 3, 0)  # OHWI, 1HWO
            if float16_weights:
                half = g.tensor(f"{node.name}/filter_f16", filt.shape, filt.astype(np.float16), FLOAT16)
                f = g.op(DEQUANTIZE, [half], f"{node.name}/filter", filt.shape)
            else:
                f = g.tensor(f"{node.name}/filter", filt.shape, filt.astype(np.float32))
            if groups == 1:
                out = g.op(CONV_2D, [x, f, b], node.name, (n, ho, wo, o), padding=VALID, stride=stride, act=act)
            else:
                out = g.op(DEPTHWISE_CONV_2D, [x, f, b], node.name, (n, ho, wo, o), padding=VALID, stride=stride,
                           act=act)
            shape = (n, ho, wo, o)
        elif node.op == "hard_sigmoid":  # the conv before it did relu6(x + 3)
            sixth = g.tensor(f"{node.name}/sixth", (), np.array(1 / 6, np.float32))
            out, shape = g.op(MUL, [x, sixth], node.name, shape_of[src]), shape_of[src]
        elif node.op == "global_avg_pool":
            axes = g.tensor(f"{node.name}/axes", (2,), np.array([1, 2], np.int32), INT32)
            shape = (n, 1, 1, ci)
            out = g.op(MEAN, [x, axes], node.name, shape, keep_dims=True)
        elif node.op == "scale":
            out, shape = g.op(MUL, [tensor_of[i] for i in node.inputs], node.name, shape_of[src]), shape_of[src]
        elif node.op == "add":
            out, shape = g.op(ADD, [tensor_of[i] for i in node.inputs], node.name, shape_of[src]), shape_of[src]
        elif node.op == "concat":
            shape = (n, hi, wi, sum(shape_of[i][3] for i in node.inputs))
            out = g.op(CONCATENATION, [tensor_of[i] for i in node.inputs], node.name, shape, axis=3)
        else:
            raise ValueError(f"the writer has no rule for {node.op} ({node.name})")
        tensor_of[node.name], shape_of[node.name] = out, shape

    outputs = [tensor_of[node] for node in network.outputs.values()]
    with open(path, "wb") as fh:
        fh.write(_serialize(g, [tensor_of["input"]], outputs))


def _vector(b, values, prepend, size=4):
    b.StartVector(size, len(values), size)
    for v in reversed(values):
        prepend(v)
    return b.EndVector()


def _options(b, code, options) -> int:
    b.StartObject(7)
    if code in (CONV_2D, DEPTHWISE_CONV_2D):
        b.PrependInt8Slot(0, options["padding"], 0)
        b.PrependInt32Slot(1, options["stride"], 0)
        b.PrependInt32Slot(2, options["stride"], 0)
        if code == CONV_2D:
            b.PrependInt8Slot(3, options["act"], 0)
            b.PrependInt32Slot(4, 1, 1)
            b.PrependInt32Slot(5, 1, 1)
        else:
            b.PrependInt32Slot(3, 1, 0)  # depth_multiplier
            b.PrependInt8Slot(4, options["act"], 0)
            b.PrependInt32Slot(5, 1, 1)
            b.PrependInt32Slot(6, 1, 1)
    elif code == CONCATENATION:
        b.PrependInt32Slot(0, options["axis"], 0)
        b.PrependInt8Slot(1, NONE, 0)
    elif code in (ADD, MUL):
        b.PrependInt8Slot(0, NONE, 0)
    elif code == MEAN:
        b.PrependBoolSlot(0, options["keep_dims"], False)
    return b.EndObject()


def _serialize(g: _Graph, inputs, outputs) -> bytes:
    b = flatbuffers.Builder(1 << 20)
    buffers = []
    for data in g.buffers:
        vec = None
        if data:
            b.StartVector(1, len(data), 16)
            b.head = b.head - len(data)
            b.Bytes[b.head:b.head + len(data)] = data
            vec = b.EndVector()
        b.StartObject(1)
        if vec is not None:
            b.PrependUOffsetTRelativeSlot(0, vec, 0)
        buffers.append(b.EndObject())
    tensors = []
    for name, shape, dtype, buffer in g.tensors:
        s = b.CreateString(name)
        sh = _vector(b, shape, b.PrependInt32)
        b.StartObject(4)
        b.PrependUOffsetTRelativeSlot(0, sh, 0)
        b.PrependInt8Slot(1, dtype, 0)
        b.PrependUint32Slot(2, buffer, 0)
        b.PrependUOffsetTRelativeSlot(3, s, 0)
        tensors.append(b.EndObject())
    codes = sorted({code for code, *_ in g.ops})
    operators = []
    for code, ins, outs, options in g.ops:
        opts = _options(b, code, options) if code in OPTIONS else None
        iv = _vector(b, ins, b.PrependInt32)
        ov = _vector(b, outs, b.PrependInt32)
        b.StartObject(5)
        b.PrependUint32Slot(0, codes.index(code), 0)
        b.PrependUOffsetTRelativeSlot(1, iv, 0)
        b.PrependUOffsetTRelativeSlot(2, ov, 0)
        if opts is not None:
            b.PrependUint8Slot(3, OPTIONS[code], 0)
            b.PrependUOffsetTRelativeSlot(4, opts, 0)
        operators.append(b.EndObject())
    tensor_vec = _vector(b, tensors, b.PrependUOffsetTRelative)
    in_vec = _vector(b, inputs, b.PrependInt32)
    out_vec = _vector(b, outputs, b.PrependInt32)
    op_vec = _vector(b, operators, b.PrependUOffsetTRelative)
    name = b.CreateString("main")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tensor_vec, 0)
    b.PrependUOffsetTRelativeSlot(1, in_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, out_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, op_vec, 0)
    b.PrependUOffsetTRelativeSlot(4, name, 0)
    subgraph = b.EndObject()
    code_tables = []
    for code in codes:
        b.StartObject(4)
        b.PrependInt8Slot(0, min(code, 127), 0)
        b.PrependInt32Slot(2, 1, 1)
        b.PrependInt32Slot(3, code, 0)
        code_tables.append(b.EndObject())
    codes_vec = _vector(b, code_tables, b.PrependUOffsetTRelative)
    subgraphs = _vector(b, [subgraph], b.PrependUOffsetTRelative)
    buffers_vec = _vector(b, buffers, b.PrependUOffsetTRelative)
    description = b.CreateString("refghost tests/tflite_writer.py")
    b.StartObject(5)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, subgraphs, 0)
    b.PrependUOffsetTRelativeSlot(3, description, 0)
    b.PrependUOffsetTRelativeSlot(4, buffers_vec, 0)
    model = b.EndObject()
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())
