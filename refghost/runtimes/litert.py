"""LiteRT (TFLite): a ``.tflite`` model, run with ``ai_edge_litert.interpreter.Interpreter``.

Two runs on the golden's input (NCHW, moved to the model's NHWC): as deployed (the default
delegate, XNNPACK on CPU) for the outputs, and with the builtin kernels and no delegate,
``experimental_preserve_all_tensors=True``, for every intermediate (a delegate keeps the tensors of
the ops it takes over to itself). ``precise=True`` runs the outputs on the builtin kernels too.

Converters (onnx2tf, ai-edge-torch) keep no module paths (tensor names are TF op chains such as
``model/tf.nn.relu_3/Relu;model/tf.math.add_6/Add;...``), reorder ops, and fuse: a conv carries
its folded BN and its ReLU as a fused activation, an SE's second conv absorbs the ``+3`` and ReLU6
of the hard-sigmoid. The ops (in ONNX's vocabulary, each with the tensors it reads, a conv's
weights, and its fused activation read from the model's flatbuffer) are matched by
:mod:`refghost.runtimes.mapping` by data flow (each conv by its weights, BN folded in, every other
layer by the tensors it reads). NHWC results are put back in NCHW.

Precision: float32 arithmetic (the builtin kernels and XNNPACK's float32 path); weights stored as
float16 (``*_float16.tflite``: ``DEQUANTIZE`` ops in front of the convs) are reported.
``options``: ``num_threads`` is ``threads``; no other option.
"""

from __future__ import annotations

import numpy as np

from .mapping import PLUMBING, Op
from . import Observed, Precision, RuntimeFailed, nchw, require

#: TFLite builtin op -> ONNX op type (refghost.runtimes.mapping's vocabulary).
OPS = {
    "CONV_2D": "Conv", "DEPTHWISE_CONV_2D": "Conv", "FULLY_CONNECTED": "Gemm", "ADD": "Add", "MUL": "Mul",
    "DIV": "Div", "SUB": "Sub", "CONCATENATION": "Concat", "MEAN": "ReduceMean", "AVERAGE_POOL_2D": "AveragePool",
    "RELU": "Relu", "RELU6": "Clip", "LEAKY_RELU": "LeakyRelu", "PRELU": "PRelu", "ELU": "Elu",
    "HARD_SWISH": "HardSwish", "LOGISTIC": "Sigmoid", "GELU": "Gelu", "MINIMUM": "Min", "MAXIMUM": "Max",
    "PAD": "Pad", "RESHAPE": "Reshape", "TRANSPOSE": "Transpose", "SQUEEZE": "Squeeze", "DEQUANTIZE": "Dequantize",
    "STRIDED_SLICE": "Slice", "SLICE": "Slice",
}
#: TFLite ActivationFunctionType -> the activation it fuses (None: none).
_FUSED = {0: None, 1: "Relu", 2: "Clip", 3: "Clip", 4: "Tanh", 5: "SignBit"}
#: Vtable slot of ``fused_activation_function`` in each op's options table (TFLite schema).
_FUSED_SLOT = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 4, "ADD": 0, "MUL": 0, "SUB": 0, "DIV": 0,
               "FULLY_CONNECTED": 0, "CONCATENATION": 1, "AVERAGE_POOL_2D": 5}


def _fused_activations(path: str) -> list[int]:
    """Each operator's ``fused_activation_function`` (0 when it has none), read from the model's
    flatbuffer (Model.subgraphs[0].operators[i].builtin_options)."""
    import flatbuffers

    buf = bytearray(open(path, "rb").read())

    def table(pos):
        return flatbuffers.table.Table(buf, pos)

    def field(tab, slot):
        return tab.Offset(4 + 2 * slot)

    def vector(tab, slot):
        off = field(tab, slot)
        if not off:
            return []
        start, n = tab.Vector(off), tab.VectorLen(off)
        return [tab.Indirect(start + 4 * i) for i in range(n)]

    model = table(flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))
    codes = []
    for pos in vector(model, 1):  # operator_codes: deprecated_builtin_code (0, int8), builtin_code (3, int32)
        code = table(pos)
        off3, off0 = field(code, 3), field(code, 0)
        new = code.Get(flatbuffers.number_types.Int32Flags, code.Pos + off3) if off3 else 0
        old = code.Get(flatbuffers.number_types.Int8Flags, code.Pos + off0) if off0 else 0
        codes.append(max(new, old))
    subgraph = table(vector(model, 2)[0])
    fused = []
    for pos in vector(subgraph, 3):  # operators
        op = table(pos)
        off = field(op, 0)
        index = op.Get(flatbuffers.number_types.Uint32Flags, op.Pos + off) if off else 0
        name = _BUILTIN_NAMES.get(codes[index])
        options = field(op, 4)
        value = 0
        if name in _FUSED_SLOT and options:
            opts = table(op.Indirect(op.Pos + options))
            slot = field(opts, _FUSED_SLOT[name])
            value = opts.Get(flatbuffers.number_types.Int8Flags, opts.Pos + slot) if slot else 0
        fused.append(value)
    return fused


#: TFLite BuiltinOperator codes of the ops whose options carry a fused activation.
_BUILTIN_NAMES = {0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D",
                  9: "FULLY_CONNECTED", 18: "MUL", 41: "SUB", 42: "DIV"}


def _interpreter(lite, path, threads, *, delegates: bool, preserve: bool):
    kwargs = {"num_threads": threads}
    if not delegates:
        kwargs["experimental_op_resolver_type"] = lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if preserve:
        kwargs["experimental_preserve_all_tensors"] = True
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # preserve_all_tensors "is intended for debugging"
            interpreter = lite.Interpreter(model_path=path, **kwargs)
        interpreter.allocate_tensors()
    except Exception as exc:
        raise RuntimeFailed(f"{path}: LiteRT could not load it: {str(exc).splitlines()[0]}") from None
    return interpreter


def _feed(interpreter, path, x):
    details = interpreter.get_input_details()
    if len(details) != 1:
        raise RuntimeFailed(f"{path}: expected one input, found {len(details)}")
    shape = tuple(int(d) for d in details[0]["shape"])
    n, c, h, w = x.shape
    if shape == (n, h, w, c):
        layout, value = "NHWC", np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    elif shape == (n, c, h, w):
        layout, value = "NCHW", x
    else:
        raise RuntimeFailed(f"{path}: the model's input has shape {list(shape)}, the golden input is {list(x.shape)} "
                            f"(NCHW; NHWC {[n, h, w, c]} also fits)")
    try:
        interpreter.set_tensor(details[0]["index"], value)
        interpreter.invoke()
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RuntimeFailed(f"{path}: LiteRT could not run it on the golden input: {first}") from None
    return layout


def observe(path: str, golden, *, precise: bool, options: dict[str, str], threads: int) -> Observed:
    lite = require("ai_edge_litert.interpreter", "ai-edge-litert")
    require("flatbuffers", "flatbuffers")
    if options:
        raise RuntimeFailed(f"unknown LiteRT option {next(iter(options))!r}; LiteRT takes --threads only")
    x = np.ascontiguousarray(golden.input, dtype=np.float32)
    deployed_run = _interpreter(lite, path, threads, delegates=not precise, preserve=False)
    layout = _feed(deployed_run, path, x)
    outputs = _outputs_in_golden_order(deployed_run, golden, layout)

    every = _interpreter(lite, path, threads, delegates=False, preserve=True)
    _feed(every, path, x)
    try:
        fused = _fused_activations(path)
    except Exception as exc:  # a flatbuffer this reader does not understand
        raise RuntimeFailed(f"{path}: cannot read the operators of the model's flatbuffer ({exc})") from None
    details = {t["index"]: t for t in every.get_tensor_details()}
    ops_details = every._get_ops_details()
    produced = {o for op in ops_details for o in op["outputs"]}
    graph_input = {d["index"] for d in every.get_input_details()}
    ops, fp16_weights = [], False
    dequantized = {}  # a DEQUANTIZE op's output -> its float16/int8 input
    layouts = {i: layout for i in graph_input}  # tensor -> the layout its 4-D value is in
    for op, act in zip(ops_details, fused):
        name = op["op_name"]
        if name == "DEQUANTIZE":
            dequantized[op["outputs"][0]] = op["inputs"][0]
            fp16_weights |= details[op["inputs"][0]]["dtype"] == np.float16
            continue
        layouts[op["outputs"][0]] = _layout_after(name, op["inputs"], layouts, every)
        kind = OPS.get(name, name)
        data = tuple(str(i) for i in op["inputs"] if i >= 0 and (i in graph_input or (i in produced
                                                                                  and i not in dequantized)))
        weight = None
        if kind in ("Conv", "Gemm"):
            filt = op["inputs"][1]
            w = every.get_tensor(dequantized.get(filt, filt)).astype(np.float64)
            weight = {"CONV_2D": lambda a: a.transpose(0, 3, 1, 2),  # OHWI -> OIHW
                      "DEPTHWISE_CONV_2D": lambda a: a.transpose(3, 0, 1, 2),  # 1HWO -> O1HW
                      "FULLY_CONNECTED": lambda a: a}[name](w)
        ops.append(Op(kind, str(op["outputs"][0]), inputs=data, weight=weight, fused=_FUSED.get(act)))
    values = {op.output: nchw(every.get_tensor(int(op.output)), layouts[int(op.output)]) for op in ops}
    labels = {op.output: f"{op.output}:{details[int(op.output)]['name']}" for op in ops}
    n_exposed = sum(1 for op in ops if op.kind not in PLUMBING and op.kind != "Pad")
    kernels = "builtin kernels" if precise else "the default delegate (XNNPACK)"
    precision = Precision(arithmetic="float32", weights="float16" if fp16_weights else "float32",
                          activations="float32",
                          detail=f"LiteRT: outputs on {kernels}, intermediates on the builtin kernels, float32; "
                                 f"weights " + ("stored as float16 (DEQUANTIZE ops)" if fp16_weights
                                                else "stored as float32"),
                          remedy="the .tflite stores its weights as float16, which --precise cannot undo; convert the "
                                 "model again without float16 quantization" if fp16_weights else "")
    version = getattr(__import__("ai_edge_litert"), "__version__", None) or _package_version()
    used = {"num_threads": str(threads), "delegate": "none" if precise else "default (XNNPACK)"}
    notes = [f"intermediates from a second run without delegates ({len(ops)} ops; tensors named index:name)"]
    return Observed(ops, values, [nchw(out, layout) for out in outputs], precision, "litert", version, used, n_exposed,
                    matcher="dataflow", fused_activations=True, labels=labels, notes=notes)


def input_shape(path: str):
    """The model's input shape, NCHW (a 4-D input is taken as NHWC, onnx2tf's and LiteRT's layout)."""
    lite = require("ai_edge_litert.interpreter", "ai-edge-litert")
    details = _interpreter(lite, path, 1, delegates=False, preserve=False).get_input_details()
    if len(details) != 1 or len(details[0]["shape"]) != 4:
        return None
    n, h, w, c = (int(d) for d in details[0]["shape"])
    return [n, c, h, w]


#: TFLite ops that compute on NHWC tensors whatever the model's input is (TFLite's kernels).
_NHWC_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "MAX_POOL_2D"}
#: TRANSPOSE permutations between the two layouts: (layout before, perm) -> layout after.
_TRANSPOSES = {("NHWC", (0, 3, 1, 2)): "NCHW", ("NCHW", (0, 2, 3, 1)): "NHWC"}


def _layout_after(name: str, inputs, layouts: dict, interpreter) -> str | None:
    """The layout of an op's 4-D output: NHWC for TFLite's convs and pools, the permuted one after a
    TRANSPOSE, else that of its first data input (elementwise ops, concatenation, padding, a mean
    that keeps its dims). None where unknown (the value is then passed on as it is). A converter
    may run parts of the graph in NCHW (litert-torch puts TRANSPOSEs around its convs)."""
    if name in _NHWC_OPS:
        return "NHWC"
    known = [layouts[i] for i in inputs if i in layouts]
    before = known[0] if known else None
    if name == "TRANSPOSE":
        perm = tuple(int(p) for p in interpreter.get_tensor(inputs[1]))
        return before if perm == (0, 1, 2, 3) else _TRANSPOSES.get((before, perm))
    return before


def _outputs_in_golden_order(interpreter, golden, layout) -> list[np.ndarray]:
    """The outputs, ordered as the golden's (a converter may reorder them): by shape, which
    differs between GhostNet's stages."""
    arrays = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
    ordered = []
    for name, ref in golden.outputs.items():
        n, c, h, w = ref.shape
        want = (n, h, w, c) if layout == "NHWC" else (n, c, h, w)
        match = [a for a in arrays if a.shape == want]
        if len(match) != 1:
            raise RuntimeFailed(f"the model's outputs {[a.shape for a in arrays]} do not include one of shape "
                                f"{list(want)} for the golden's output {name}")
        ordered.append(match[0])
    return ordered


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return "unknown"
