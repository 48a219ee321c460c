"""Run an ncnn GhostNet (``.param`` + ``.bin``, as pnnx writes them) on a golden input.

ncnn names its blobs by number (``in0``, ``1``..``274``, ``out0``..) and fuses what PyTorch keeps
apart (conv + BN + activation in one ``Convolution``), so no name says which module a blob is.
This module

1. reads the ``.param`` (a text file: ``7767517``, then ``layer_count blob_count``, then one layer
   a line: ``Type name n_bottoms n_tops bottoms... tops... id=value ...``; ids per layer type as in
   ncnn's ``docs/developer-guide/operators.md``) and checks it, a bad file being a
   :class:`~refghost.runtimes.RuntimeFailed` that names the file and line;
2. reads the storage type of every weight blob in the ``.bin`` (each weight array starts with a
   4-byte tag: ``0x01306B47`` float16, ``0x000D4B38`` int8, ``0`` or ``0x0002C056`` float32;
   biases and BatchNorm statistics are always raw float32);
3. describes every layer as an op of :mod:`refghost.runtimes.mapping`'s vocabulary
   (:func:`graph_ops`: ``Convolution`` is a ``Conv`` with its output channels, kernel, stride,
   groups and fused activation; ``Split`` a copy per output; ``BinaryOp`` add/mul an ``Add`` or
   ``Mul``; ``HardSigmoid``, ``Pooling``, ``Concat``, ``InnerProduct`` as ``Gemm``), which
   :func:`refghost.runtimes.mapping.map_by_attributes` matches to the network by structure, each
   match checked (op kind, activation, output channels, kernel, stride, groups): a graph that does
   not align is an error, never a guess;
4. runs the net with ncnn's Python API, image by image (ncnn has no batch axis), every blob kept
   (``opt.lightmode = False``) and extracted, each image's blob given its batch axis back.

Precision: by default ``net.opt`` is left as ncnn constructs it (as a user ships it: fp16 storage,
fp16 arithmetic, fp16 packing on); ``precise=True`` turns every reduced-precision flag off
(:data:`REDUCED_PRECISION_FLAGS`). The winograd and sgemm flags stay as they are: GhostNet has no
stride-1 dense 3x3 conv for winograd, and turning either off changed no bit of any blob (measured,
ncnn 1.0.20261020, x86); ``use_packing_layout`` changes the order of sums, not their precision.
What actually ran in reduced precision depends on the CPU as well as the flags (ncnn's x86 build
stores only InnerProduct weights in fp16, and only with F16C; ARM stores and computes in fp16 with
asimdhp): :func:`effective_precision` says which.
"""

from __future__ import annotations

import os
import platform
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from . import Observed, Precision, RuntimeFailed, require
from .mapping import Op

PARAM_MAGIC = 7767517
#: Param ids at or below this hold arrays: id -23300-k is array parameter k, written ``n,v1,...,vn``.
ARRAY_ID_BASE = -23300

#: 4-byte tags before each weight array in the ``.bin`` (ncnn src/modelbin.cpp).
TAG_FLOAT16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FLOAT32 = 0x0002C056

#: ``net.opt`` flags that store or compute in less than float32; ``precise=True`` sets them off.
REDUCED_PRECISION_FLAGS = ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage",
                           "use_bf16_packed")

# ncnn layer types that only copy or reshape -> their op in ONNX's vocabulary (each one of
# refghost.runtimes.mapping.COPIES: no module's output; Split writes one copy per output).
_COPY_KINDS = {"Split": "Identity", "Flatten": "Flatten", "Reshape": "Reshape", "Dropout": "Dropout",
               "Noop": "Identity"}
# Activation layers (their refghost activation is checked by refghost.runtimes.mapping).
_ACT_LAYERS = {"ReLU", "Clip", "ELU", "SELU", "GELU", "PReLU", "Swish", "HardSwish", "Sigmoid", "Mish"}
_CONV_LAYERS = {"Convolution", "ConvolutionDepthWise"}
_KNOWN = set(_COPY_KINDS) | _ACT_LAYERS | _CONV_LAYERS | {
    "Input", "InnerProduct", "BatchNorm", "Pooling", "HardSigmoid", "BinaryOp", "Eltwise", "Concat"}
# BinaryOp's op_type (param 0) for the two it may stand for.
_BINARY_ADD, _BINARY_MUL = 0, 2
_ELTWISE_SUM = 1


@dataclass
class Layer:
    """One line of a ``.param``: a layer, its input and output blob names and its params by id."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, object]  # id -> int, float, or list of numbers (array params)
    line: int  # 1-based line in the .param

    def get(self, key: int, default=0):
        return self.params.get(key, default)

    def describe(self) -> str:
        return f"{self.type} {self.name} (line {self.line})"


@dataclass
class ParamFile:
    """A parsed ``.param``: layers in file order, the blob count it declares."""

    path: str
    layers: list[Layer]
    blob_count: int
    producer: dict[str, Layer] = field(default_factory=dict)  # blob -> the layer that writes it


def _number(text: str):
    """An ncnn param value: int, or float when it has ``.``, ``e`` or ``E`` (as ncnn reads it)."""
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    return float(text)  # ValueError for anything else


def parse_param(path: str) -> ParamFile:
    """Read and check an ncnn ``.param`` text file. Raises :class:`RuntimeFailed` naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RuntimeFailed(f"{path}: not a readable ncnn .param text file ({exc})") from None

    def bad(lineno: int, why: str):
        return RuntimeFailed(f"{path}, line {lineno}: {why}")

    if not lines or lines[0].strip() != str(PARAM_MAGIC):
        raise bad(1, f"an ncnn .param starts with the magic number {PARAM_MAGIC}, found "
                     f"{lines[0].strip()[:40]!r}" if lines else "the file is empty")
    counts = lines[1].split() if len(lines) > 1 else []
    if len(counts) != 2 or not all(c.isdigit() for c in counts):
        raise bad(2, "expected 'layer_count blob_count'")
    layer_count, blob_count = int(counts[0]), int(counts[1])
    layers = []
    producer: dict[str, Layer] = {}
    for lineno, text in enumerate(lines[2:], start=3):
        fields = text.split()
        if not fields:
            continue
        if len(fields) < 4 or not fields[2].isdigit() or not fields[3].isdigit():
            raise bad(lineno, "expected 'Type name n_bottoms n_tops bottoms... tops... id=value ...'")
        n_bottoms, n_tops = int(fields[2]), int(fields[3])
        if len(fields) < 4 + n_bottoms + n_tops:
            raise bad(lineno, f"{fields[0]} {fields[1]} declares {n_bottoms} inputs and {n_tops} outputs, "
                              f"the line has {len(fields) - 4} names")
        bottoms = fields[4:4 + n_bottoms]
        tops = fields[4 + n_bottoms:4 + n_bottoms + n_tops]
        params: dict[int, object] = {}
        for item in fields[4 + n_bottoms + n_tops:]:
            key, sep, value = item.partition("=")
            try:
                pid = int(key)
                if not sep:
                    raise ValueError
                if pid <= ARRAY_ID_BASE:
                    count, *values = value.split(",")
                    values = [_number(v) for v in values]
                    if int(count) != len(values):
                        raise ValueError
                    params[ARRAY_ID_BASE - pid] = values
                else:
                    params[pid] = _number(value)
            except ValueError:
                raise bad(lineno, f"bad parameter {item!r} (expected id=number or id=count,v1,...)") from None
        layer = Layer(fields[0], fields[1], bottoms, tops, params, lineno)
        for blob in bottoms:
            if blob not in producer:
                raise bad(lineno, f"{layer.type} {layer.name} reads blob {blob!r} that no earlier layer writes")
        for blob in tops:
            if blob in producer:
                raise bad(lineno, f"blob {blob!r} is written twice ({producer[blob].name} and {layer.name})")
            producer[blob] = layer
        layers.append(layer)
    if len(layers) != layer_count:
        raise bad(2, f"declares {layer_count} layers, the file has {len(layers)}")
    if len(producer) != blob_count:
        raise bad(2, f"declares {blob_count} blobs, the layers write {len(producer)}")
    return ParamFile(path, layers, blob_count, producer)


# --- the .bin -------------------------------------------------------------------------------------

def _weight_arrays(layer: Layer) -> list[tuple[str, int]]:
    """The arrays ``layer`` loads from the ``.bin``, in order: (``"tagged"`` or ``"raw"``, count).

    ``tagged`` arrays (ncnn's ``mb.load(w, 0)``: weights) start with a storage tag; ``raw`` ones
    (``mb.load(w, 1)``: biases, BatchNorm statistics, PReLU slopes) are plain float32.
    """
    p = layer.params
    if layer.type in _CONV_LAYERS or layer.type == "InnerProduct":
        weight_size = p.get(6 if layer.type in _CONV_LAYERS else 2, 0)
        bias = p.get(5 if layer.type in _CONV_LAYERS else 1, 0)
        int8 = p.get(8, 0)
        dynamic = layer.type in _CONV_LAYERS and p.get(19, 0)
        if int8:
            raise RuntimeFailed(f"{layer.describe()} is int8-quantized (8={int8}); refghost compares float models")
        if dynamic:
            return []
        return [("tagged", weight_size)] + ([("raw", p.get(0, 0))] if bias else [])
    if layer.type == "BatchNorm":
        return [("raw", p.get(0, 0))] * 4
    if layer.type == "PReLU":
        return [("raw", p.get(0, 0))]
    return []


def weight_storage(param: ParamFile, bin_path: str) -> dict[str, int]:
    """``{storage type: number of weight arrays}`` over the ``.bin``, checking its size.

    Storage types are ``float32``, ``float16``, ``int8`` and ``quantized`` (a 256-entry table).
    """
    try:
        data = open(bin_path, "rb").read()
    except OSError as exc:
        raise RuntimeFailed(f"{bin_path}: cannot read the ncnn weights beside {param.path} ({exc})") from None
    offset = 0
    counts: dict[str, int] = {}

    def need(nbytes: int, layer: Layer):
        if offset + nbytes > len(data):
            raise RuntimeFailed(f"{bin_path}: ends at byte {len(data)} inside the weights of {layer.describe()} "
                               f"of {param.path}; the .bin does not belong to this .param")

    for layer in param.layers:
        for kind, count in _weight_arrays(layer):
            if kind == "raw":
                need(4 * count, layer)
                offset += 4 * count
                continue
            need(4, layer)
            tag, = struct.unpack_from("<I", data, offset)
            offset += 4
            if tag == TAG_FLOAT16:
                storage, nbytes = "float16", _align4(2 * count)
            elif tag == TAG_INT8:
                storage, nbytes = "int8", _align4(count)
            elif tag in (TAG_FLOAT32, 0):
                storage, nbytes = "float32", 4 * count
            else:  # any other non-zero tag: a 256-entry float table, then one index byte per weight
                storage, nbytes = "quantized", 256 * 4 + _align4(count)
            need(nbytes, layer)
            offset += nbytes
            counts[storage] = counts.get(storage, 0) + 1
    if offset != len(data):
        raise RuntimeFailed(f"{bin_path}: {len(data)} bytes, the layers of {param.path} read {offset}; "
                           f"the .bin does not belong to this .param")
    return counts


def _align4(n: int) -> int:
    return (n + 3) // 4 * 4


# --- the ops, in the vocabulary of refghost.runtimes.mapping -----------------------------------------

#: ncnn's fused activation (param 9 of a Convolution or InnerProduct) -> the activation op it applies.
_FUSED_KINDS = {1: "Relu", 2: "LeakyRelu", 3: "Clip", 4: "Sigmoid", 5: "Mish", 6: "HardSwish"}
#: ncnn activation layer -> ONNX op type.
_ACT_KINDS = {"ReLU": "Relu", "Clip": "Clip", "ELU": "Elu", "SELU": "Selu", "GELU": "Gelu", "PReLU": "PRelu",
              "Swish": "Swish", "HardSwish": "HardSwish", "Sigmoid": "Sigmoid", "Mish": "Mish"}


def _op_of(layer: Layer) -> Op:
    """One computing layer as an op (kind in ONNX's vocabulary, the attributes its match checks)."""
    t, p = layer.type, layer.params
    attrs: dict = {}
    fused = None
    if t in _CONV_LAYERS or t == "InnerProduct":
        kind = "Conv" if t in _CONV_LAYERS else "Gemm"
        attrs["out_channels"] = layer.get(0, 0)
        if t in _CONV_LAYERS:
            attrs["kernel"] = (layer.get(1, 0), layer.get(11, layer.get(1, 0)))
            attrs["stride"] = (layer.get(3, 1), layer.get(13, layer.get(3, 1)))
            attrs["groups"] = layer.get(7, 1) if t == "ConvolutionDepthWise" else 1
        if layer.get(9, 0):
            fused = _FUSED_KINDS.get(layer.get(9, 0), f"activation_type {layer.get(9, 0)}")
            attrs["fused_args"] = list(layer.get(10, []))
    elif t in _ACT_LAYERS:
        kind = _ACT_KINDS[t]
        if t == "ReLU":
            slope = layer.get(0, 0.0)
            kind, attrs["args"] = ("LeakyRelu", [slope]) if slope != 0 else ("Relu", [])
        elif t == "Clip":
            attrs["args"] = [layer.get(0, 0.0), layer.get(1, 0.0)]
    elif t == "BatchNorm":
        kind = "BatchNormalization"
    elif t == "Pooling":
        kind = "GlobalAveragePool" if layer.get(4, 0) == 1 and layer.get(0, 0) == 1 else "Pooling"
    elif t == "HardSigmoid":
        kind = "HardSigmoid"
    elif t == "Concat":
        kind = "Concat"
    elif t == "BinaryOp":
        op = layer.get(0, 0)
        kind = {_BINARY_ADD: "Add", _BINARY_MUL: "Mul"}.get(op, f"BinaryOp op_type {op}")
    elif t == "Eltwise":
        kind = "Add" if layer.get(0, 1) == _ELTWISE_SUM and not layer.get(1, []) else "Eltwise"
    else:
        raise AssertionError(t)
    return Op(kind, layer.tops[0], inputs=tuple(layer.bottoms), fused=fused, attrs=attrs, label=layer.describe())


def graph_ops(param: ParamFile) -> list[Op]:
    """The layers of a ``.param`` as ops, in file order (a topological order): ``Input`` and the
    copies (``Split``: one ``Identity`` per output) included. Raises :class:`RuntimeFailed` for a
    layer type no GhostNet has, or a computing layer with several outputs."""
    ops = []
    for layer in param.layers:
        if layer.type not in _KNOWN:
            raise RuntimeFailed(f"{param.path}: {layer.describe()}: layer type {layer.type!r} is not part of a "
                                f"GhostNet refghost can map; name the tensors by module path (dump them to .npz)")
        if layer.type == "Input":
            ops.append(Op("Input", layer.tops[0], label=layer.describe()))
        elif layer.type in _COPY_KINDS:
            ops += [Op(_COPY_KINDS[layer.type], top, inputs=tuple(layer.bottoms), label=layer.describe())
                    for top in layer.tops]
        elif len(layer.tops) != 1:
            raise RuntimeFailed(f"{param.path}: {layer.describe()} writes {len(layer.tops)} blobs, a layer of "
                                f"GhostNet writes one")
        else:
            ops.append(_op_of(layer))
    return ops


# --- precision --------------------------------------------------------------------------------------

def _cpu_flags() -> set[str] | None:
    """The x86 feature flags of this CPU (Linux /proc/cpuinfo), or None where unreadable.

    ncnn's Python module does not expose its x86 queries (cpu_support_x86_f16c, ...)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def effective_precision(opt: dict[str, bool], storage: dict[str, int], layer_types: set[str], ncnn) -> Precision:
    """What ran in reduced precision, from the opt flags, the ``.bin`` and the CPU.

    ncnn (src/net.cpp, src/layer/x86): on ARM, ``use_fp16_storage`` stores blobs and weights in
    fp16 where the CPU has fp16 storage (asimdhp, or vfpv4 on armv7) and ``use_fp16_arithmetic``
    computes in fp16 with asimdhp; on x86 blobs stay float32 and only InnerProduct converts its
    weights to fp16 (with F16C); ``use_bf16_storage`` stores blobs and weights in bf16 on both.
    """
    machine = platform.machine().lower()
    arm = machine.startswith(("arm", "aarch64"))
    x86 = machine in ("x86_64", "amd64", "i386", "i686")
    detail = []
    weights = activations = arithmetic = "float32"
    tagged = ", ".join(f"{n} {k}" for k, n in sorted(storage.items())) or "none"
    if storage.get("float16"):
        weights = "float16"
    detail.append(f"weights in the .bin: {tagged}")
    if opt["use_bf16_storage"]:
        weights = "bfloat16" if weights == "float32" else weights
        activations = "bfloat16"
        detail.append("use_bf16_storage: blobs and weights in bf16 where a layer supports it")
    if arm:
        fp16_storage = opt["use_fp16_storage"] and (ncnn.cpu_support_arm_asimdhp() or ncnn.cpu_support_arm_vfpv4())
        fp16_math = opt["use_fp16_arithmetic"] and ncnn.cpu_support_arm_asimdhp()
        if fp16_storage and not opt["use_bf16_storage"]:
            weights = activations = "float16"
            detail.append("use_fp16_storage on an ARM CPU with fp16 storage: blobs and weights in fp16")
        if fp16_math and fp16_storage:
            arithmetic = "float16"
            detail.append("use_fp16_arithmetic on an ARM CPU with asimdhp: arithmetic in fp16")
    elif x86:
        flags = _cpu_flags()
        f16c = flags is not None and "f16c" in flags
        if opt["use_fp16_storage"] and "InnerProduct" in layer_types and (f16c or flags is None):
            weights = "float16"
            detail.append("use_fp16_storage on an x86 CPU with F16C: InnerProduct weights converted to fp16 at load"
                          + (" (F16C assumed: /proc/cpuinfo unreadable)" if flags is None else ""))
        detail.append("x86: ncnn has no fp16 arithmetic and no fp16 blobs (use_fp16_arithmetic and fp16 packing "
                      "have no effect)")
    else:
        detail.append(f"{machine}: precision taken from the flags alone")
        if opt["use_fp16_storage"]:
            weights = activations = "float16"
        if opt["use_fp16_storage"] and opt["use_fp16_arithmetic"]:
            arithmetic = "float16"
    remedy = ("the .bin stores weights in float16 (pnnx's default), which --precise cannot undo; convert again "
              "with pnnx ... fp16=0" if storage.get("float16") else "")
    return Precision(arithmetic=arithmetic, weights=weights, activations=activations,
                     detail="ncnn: " + "; ".join(detail), remedy=remedy)


# --- options ----------------------------------------------------------------------------------------

def option_fields(ncnn) -> dict[str, type]:
    """``{name: bool or int}`` of every plain setting of ``ncnn.Option`` (allocators excluded)."""
    opt = ncnn.Option()
    fields = {}
    for name in dir(opt):
        if name.startswith("_"):
            continue
        value = getattr(opt, name)
        if isinstance(value, bool):
            fields[name] = bool
        elif isinstance(value, int):
            fields[name] = int
    return fields


def _parse_option(name: str, text: str, kind: type):
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "on", "yes"):
            return True
        if lowered in ("0", "false", "off", "no"):
            return False
        raise RuntimeFailed(f"ncnn option {name}={text!r}: expected 0/1 or true/false")
    try:
        return int(text)
    except ValueError:
        raise RuntimeFailed(f"ncnn option {name}={text!r}: expected an integer") from None


def settings(ncnn, *, precise: bool, options: dict[str, str], threads: int) -> dict[str, object]:
    """Every ``net.opt`` setting a run uses: ncnn's defaults, then ``precise``, threads, ``options``."""
    fields = option_fields(ncnn)
    default = ncnn.Option()
    values = {name: getattr(default, name) for name in fields}
    if precise:
        for name in REDUCED_PRECISION_FLAGS:
            if name in values:
                values[name] = False
    values["num_threads"] = int(threads)
    for name, text in options.items():
        if name not in fields:
            raise RuntimeFailed(f"unknown ncnn option {name!r}; ncnn.Option has {', '.join(sorted(fields))}")
        if name == "lightmode":
            raise RuntimeFailed("ncnn option lightmode cannot be set: refghost needs it off to extract every blob")
        values[name] = _parse_option(name, text, fields[name])
    values["lightmode"] = False  # keep every blob extractable (values are the same either way)
    return values


# --- running ----------------------------------------------------------------------------------------

def observe(path: str, golden, *, precise: bool, options: dict[str, str], threads: int) -> Observed:
    """Run the ncnn model ``path`` (``.param``; its ``.bin`` beside it) on ``golden``'s input."""
    ncnn = require("ncnn", "ncnn")
    bin_path = os.path.splitext(path)[0] + ".bin"
    param = parse_param(path)
    storage = weight_storage(param, bin_path)
    ops = graph_ops(param)
    values = settings(ncnn, precise=precise, options=options, threads=threads)
    computed = [layer for layer in param.layers if layer.type != "Input" and layer.type not in _COPY_KINDS]

    net = ncnn.Net()
    for name, value in values.items():
        setattr(net.opt, name, value)
    if net.load_param(path) != 0:
        raise RuntimeFailed(f"{path}: ncnn could not load the .param (load_param failed)")
    if net.load_model(bin_path) != 0:
        raise RuntimeFailed(f"{bin_path}: ncnn could not load the weights (load_model failed)")
    input_blob = next(layer.tops[0] for layer in param.layers if layer.type == "Input")
    per_image: dict[str, list[np.ndarray]] = {layer.tops[0]: [] for layer in computed}
    try:
        for image in golden.input:
            with net.create_extractor() as ex:
                if ex.input(input_blob, ncnn.Mat(np.ascontiguousarray(image)).clone()) != 0:
                    raise RuntimeFailed(f"{path}: ncnn refused the input blob {input_blob!r}")
                for layer in computed:
                    status, mat = ex.extract(layer.tops[0])
                    if status != 0:
                        raise RuntimeFailed(f"{path}: ncnn failed computing blob {layer.tops[0]!r} of "
                                            f"{layer.describe()} (error {status})")
                    per_image[layer.tops[0]].append(np.array(mat, dtype=np.float32)[None])  # CHW -> NCHW
    finally:
        net.clear()
    tensors = {blob: np.concatenate(arrays, axis=0) for blob, arrays in per_image.items()}
    notes = [f"{param.blob_count} ncnn blobs in all: {len(computed)} computed by layers, the rest the input and "
             f"Split copies; the outputs are the blobs of the golden's output layers, from the same run"]
    precision = effective_precision(values, storage, {layer.type for layer in param.layers}, ncnn)
    options_used = {name: str(int(v)) if isinstance(v, bool) else str(v) for name, v in sorted(values.items())}
    return Observed(ops, tensors, None, precision, "ncnn", getattr(ncnn, "__version__", "unknown"), options_used,
                    len(computed), matcher="attributes", fused_activations=True, notes=notes)
