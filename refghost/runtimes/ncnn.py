"""Run an ncnn GhostNet (``.param`` + ``.bin``, as pnnx writes them) on a golden input.

ncnn names its blobs by number (``in0``, ``1``..``274``, ``out0``..) and fuses what PyTorch keeps
apart (conv + BN + activation in one ``Convolution``), so no name says which module a blob is.
This module

1. reads the ``.param`` (a text file: ``7767517``, then ``layer_count blob_count``, then one layer
   a line: ``Type name n_bottoms n_tops bottoms... tops... id=value ...``; ids per layer type as in
   ncnn's ``docs/developer-guide/operators.md``) and checks it, a bad file being a
   :class:`~refghost.errors.CompareError` that names the file and line;
2. reads the storage type of every weight blob in the ``.bin`` (each weight array starts with a
   4-byte tag: ``0x01306B47`` float16, ``0x000D4B38`` int8, ``0`` or ``0x0002C056`` float32;
   biases and BatchNorm statistics are always raw float32);
3. maps every computed blob to a module path **by structure**: the ncnn layers are walked in file
   order (a topological order) alongside the refghost graph, each layer matched to the refghost
   node(s) that read what its inputs hold; a fused layer stands for the last module it absorbed
   (conv+BN+ReLU: the ReLU's path; conv+BN: the BN's), ``Split`` is plumbing, ``HardSigmoid`` is
   ``<se>.gate``, ``BinaryOp`` mul the SE's scale, ``BinaryOp``/``Eltwise`` add the residual add.
   Each match is checked (op kind, activation, output channels, kernel, stride, groups); a graph
   that does not align is an error, never a guess;
4. runs the net with ncnn's Python API, image by image (ncnn has no batch axis), every blob kept
   (``opt.lightmode = False``) and extracted, and puts each back in the golden's NCHW shape (CHW
   maps to (1, C, H, W), the 1-D vectors after global pooling to (1, C, 1, 1)).

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

from . import Precision, RuntimeRun, require
from ..arch import Graph, Node, output_shapes
from ..errors import CompareError

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

# ncnn layer types that only copy or reshape: they compute no module's output.
_PLUMBING = {"Split", "Flatten", "Reshape", "Dropout", "Noop"}
# Activation layers and what refghost activation each is; values are checked in _activation_of.
_ACT_LAYERS = {"ReLU", "Clip", "ELU", "SELU", "GELU", "PReLU", "Swish", "HardSwish", "Sigmoid", "Mish"}
_CONV_LAYERS = {"Convolution", "ConvolutionDepthWise"}
_KNOWN = _PLUMBING | _ACT_LAYERS | _CONV_LAYERS | {
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
    """Read and check an ncnn ``.param`` text file. Raises :class:`CompareError` naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CompareError(f"{path}: not a readable ncnn .param text file ({exc})") from None

    def bad(lineno: int, why: str):
        return CompareError(f"{path}, line {lineno}: {why}")

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
            raise CompareError(f"{layer.describe()} is int8-quantized (8={int8}); refghost compares float models")
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
        raise CompareError(f"{bin_path}: cannot read the ncnn weights beside {param.path} ({exc})") from None
    offset = 0
    counts: dict[str, int] = {}

    def need(nbytes: int, layer: Layer):
        if offset + nbytes > len(data):
            raise CompareError(f"{bin_path}: ends at byte {len(data)} inside the weights of {layer.describe()} "
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
        raise CompareError(f"{bin_path}: {len(data)} bytes, the layers of {param.path} read {offset}; "
                           f"the .bin does not belong to this .param")
    return counts


def _align4(n: int) -> int:
    return (n + 3) // 4 * 4


# --- mapping blobs to module paths by structure -----------------------------------------------------

def _activation_of(layer: Layer) -> str | None:
    """The refghost activation a fused activation (param 9) or an activation layer computes."""
    if layer.type in _CONV_LAYERS or layer.type == "InnerProduct":
        kind = layer.get(9, 0)
        args = layer.get(10, [])
        if kind == 0:
            return None
        if kind == 1:
            return "ReLU"
        if kind == 2:
            return "LeakyReLU" if args and args[0] != 0 else "ReLU"
        if kind == 3:
            return "ReLU6" if args == [0, 6] else f"Clip{args}"
        return {4: "Sigmoid", 5: "Mish", 6: "HardSwish"}.get(kind, f"activation_type {kind}")
    if layer.type == "ReLU":
        return "LeakyReLU" if layer.get(0, 0.0) != 0 else "ReLU"
    if layer.type == "Clip":
        return "ReLU6" if (layer.get(0, 0.0), layer.get(1, 0.0)) == (0, 6) else "Clip"
    return {"Swish": "SiLU"}.get(layer.type, layer.type)


def _layer_ops(layer: Layer) -> tuple[str, str | None]:
    """(refghost op kind the layer computes first, its fused activation or None)."""
    t = layer.type
    if t in _CONV_LAYERS:
        return "conv", _activation_of(layer)
    if t == "InnerProduct":
        return "conv_or_linear", _activation_of(layer)
    if t in _ACT_LAYERS:
        return "act", None
    if t == "BatchNorm":
        return "batch_norm", None
    if t == "Pooling":
        return ("global_avg_pool" if layer.get(4, 0) == 1 and layer.get(0, 0) == 1 else "pooling"), None
    if t == "HardSigmoid":
        return "hard_sigmoid", None
    if t == "Concat":
        return "concat", None
    if t == "BinaryOp":
        op = layer.get(0, 0)
        return {_BINARY_ADD: "add", _BINARY_MUL: "scale"}.get(op, f"BinaryOp op_type {op}"), None
    if t == "Eltwise":
        return ("add" if layer.get(0, 1) == _ELTWISE_SUM and not layer.get(1, []) else "Eltwise"), None
    raise AssertionError(t)


@dataclass
class Match:
    """One ncnn layer matched to the refghost nodes it computes (the last one is its output)."""

    layer: Layer
    nodes: list[Node]
    how: str


def map_layers(param: ParamFile, network: Graph) -> tuple[dict[str, Match], dict[str, str]]:
    """Match every computing ncnn layer to refghost nodes by structure.

    Returns ``({output blob: Match}, {blob: refghost node name})`` where the second also covers
    the Split copies and the input. Raises :class:`CompareError` where the graphs do not align.
    """
    inputs = [layer for layer in param.layers if layer.type == "Input"]
    if len(inputs) != 1:
        raise CompareError(f"{param.path}: expected one Input layer, found {len(inputs)}")
    unknown = [layer for layer in param.layers if layer.type not in _KNOWN]
    if unknown:
        raise CompareError(f"{param.path}: {unknown[0].describe()}: layer type {unknown[0].type!r} is not part of "
                           f"a GhostNet refghost can map; name the tensors by module path (dump them to .npz)")
    consumers: dict[str, list[Node]] = {}
    for node in network.nodes:
        for src in node.inputs:
            consumers.setdefault(src, []).append(node)
    order = {node.name: i for i, node in enumerate(network.nodes)}
    holds: dict[str, str] = {inputs[0].tops[0]: "input"}  # blob -> refghost node whose value it holds
    matched: set[str] = set()
    matches: dict[str, Match] = {}

    def fail(layer: Layer, why: str):
        return CompareError(f"cannot match {param.path} to the network by structure: {layer.describe()} {why}; "
                            f"name the tensors by module path (dump them to .npz) instead")

    for layer in param.layers:
        if layer.type == "Input":
            continue
        srcs = [holds[b] for b in layer.bottoms]
        if layer.type in _PLUMBING:
            if len(srcs) != 1:
                raise fail(layer, f"copies {len(srcs)} inputs")
            for top in layer.tops:
                holds[top] = srcs[0]
            continue
        if len(layer.tops) != 1:
            raise fail(layer, f"writes {len(layer.tops)} blobs, a layer of GhostNet writes one")
        first_op, fused_act = _layer_ops(layer)
        wanted = {"conv", "linear"} if first_op == "conv_or_linear" else {first_op}
        if len(srcs) == 1:
            candidates = [n for n in consumers.get(srcs[0], []) if n.op in wanted and n.name not in matched
                          and n.inputs == (srcs[0],)]
        else:
            candidates = [n for n in network.nodes if n.op in wanted and n.name not in matched
                          and _same_inputs(n, srcs)]
        candidates = [n for n in candidates if _attrs_fit(layer, n, network) is None]
        if not candidates:
            reason = _why_not(layer, srcs, consumers, wanted, network)
            raise fail(layer, f"({first_op} on {', '.join(srcs)}) matches no layer of the network: {reason}")
        first = min(candidates, key=lambda n: order[n.name])
        nodes = [first]
        how = f"{layer.type} {layer.name}"
        if first.op == "conv":
            bn = _only_consumer(nodes[-1], consumers, "batch_norm")
            if bn is not None and not _read_by(param, layer.tops[0], "BatchNorm"):  # else BN is a layer of its own
                nodes.append(bn)
            if fused_act is not None:
                act = _only_consumer(nodes[-1], consumers, "act")
                if act is None:
                    raise fail(layer, f"has a fused {fused_act}, the network has no activation after "
                                      f"{nodes[-1].name}")
                if act.attrs["activation"] != fused_act:
                    raise fail(layer, f"has a fused {fused_act}, {act.name} is {act.attrs['activation']}")
                nodes.append(act)
            if len(nodes) > 1:
                how += f": {'+'.join(n.op for n in nodes)} fused, stands for the last"
        elif first.op == "act" and first.attrs["activation"] != _activation_of(layer):
            raise fail(layer, f"is {_activation_of(layer)}, {first.name} is {first.attrs['activation']}")
        if len(candidates) > 1:
            how += f" (first in forward order of {len(candidates)} alike: {', '.join(n.name for n in candidates)})"
        for n in nodes:
            matched.add(n.name)
        holds[layer.tops[0]] = nodes[-1].name
        matches[layer.tops[0]] = Match(layer, nodes, how)
    missing = [n.name for n in network.nodes if n.name not in matched]
    if missing:
        raise CompareError(f"{param.path}: no ncnn layer computes {len(missing)} layer(s) of the network "
                           f"(first {missing[0]}); the model is not this GhostNet")
    return matches, holds


def _read_by(param: ParamFile, blob: str, layer_type: str) -> bool:
    """Whether a layer of ``layer_type`` reads ``blob`` (directly or through Split copies)."""
    for layer in param.layers:
        if blob in layer.bottoms:
            if layer.type == layer_type:
                return True
            if layer.type == "Split" and any(_read_by(param, top, layer_type) for top in layer.tops):
                return True
    return False


def _same_inputs(node: Node, srcs: list[str]) -> bool:
    if node.op == "concat":
        return list(node.inputs) == srcs  # the channel order matters
    return sorted(node.inputs) == sorted(srcs)  # add and scale commute


def _only_consumer(node: Node, consumers, op: str) -> Node | None:
    readers = consumers.get(node.name, [])
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def _attrs_fit(layer: Layer, node: Node, network: Graph) -> str | None:
    """Why ``layer`` cannot compute ``node`` (channels, kernel, stride, groups), or None if it can."""
    if node.op not in ("conv", "linear"):
        return None
    shape = network.param_shapes[node.params["weight"]]
    out_chs = shape[0]
    if layer.get(0, 0) != out_chs:
        return f"{layer.get(0, 0)} output channels, {node.name} has {out_chs}"
    if layer.type == "InnerProduct":
        if node.op == "conv" and shape[2:] != (1, 1):
            return f"InnerProduct cannot be the {shape[2]}x{shape[3]} conv {node.name}"
        return None
    kernel = (layer.get(1, 0), layer.get(11, layer.get(1, 0)))
    stride = (layer.get(3, 1), layer.get(13, layer.get(3, 1)))
    groups = layer.get(7, 1) if layer.type == "ConvolutionDepthWise" else 1
    if kernel != tuple(shape[2:]):
        return f"kernel {kernel[0]}x{kernel[1]}, {node.name} has {shape[2]}x{shape[3]}"
    if stride != (node.attrs["stride"],) * 2:
        return f"stride {stride[0]}, {node.name} has {node.attrs['stride']}"
    if groups != node.attrs["groups"]:
        return f"{groups} groups, {node.name} has {node.attrs['groups']}"
    return None


def _why_not(layer, srcs, consumers, wanted, network) -> str:
    readers = [n for s in set(srcs) for n in consumers.get(s, [])]
    if not readers:
        return f"nothing in the network reads {srcs}"
    fits = [n for n in readers if n.op in wanted]
    if not fits:
        return f"the network's layers reading it are {', '.join(f'{n.name} ({n.op})' for n in readers)}"
    return "; ".join(f"{n.name}: {_attrs_fit(layer, n, network) or 'already matched or other inputs'}" for n in fits)


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
    return Precision(arithmetic=arithmetic, weights=weights, activations=activations, detail="; ".join(detail))


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
        raise CompareError(f"ncnn option {name}={text!r}: expected 0/1 or true/false")
    try:
        return int(text)
    except ValueError:
        raise CompareError(f"ncnn option {name}={text!r}: expected an integer") from None


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
            raise CompareError(f"unknown ncnn option {name!r}; ncnn.Option has {', '.join(sorted(fields))}")
        if name == "lightmode":
            raise CompareError("ncnn option lightmode cannot be set: refghost needs it off to extract every blob")
        values[name] = _parse_option(name, text, fields[name])
    values["lightmode"] = False  # keep every blob extractable (values are the same either way)
    return values


# --- running ----------------------------------------------------------------------------------------

def _to_golden_shape(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One image's blob (C,H,W) or (C,) as the golden's per-image shape (1, C, H, W) or (1, C)."""
    if array.size == int(np.prod(shape[1:])):
        return array.reshape((1,) + tuple(shape[1:]))
    return array.reshape((1,) + array.shape)  # a wrong size: compare() reports the shape mismatch


def run(path: str, golden, *, precise: bool, options: dict[str, str], threads: int) -> RuntimeRun:
    """Run the ncnn model ``path`` (``.param``; its ``.bin`` beside it) on ``golden``'s input."""
    ncnn = require("ncnn", "ncnn")
    path = os.fspath(path)
    bin_path = os.path.splitext(path)[0] + ".bin"
    param = parse_param(path)
    storage = weight_storage(param, bin_path)
    network = golden.weights.graph
    matches, holds = map_layers(param, network)
    values = settings(ncnn, precise=precise, options=options, threads=threads)

    net = ncnn.Net()
    for name, value in values.items():
        setattr(net.opt, name, value)
    if net.load_param(path) != 0:
        raise CompareError(f"{path}: ncnn could not load the .param (load_param failed)")
    if net.load_model(bin_path) != 0:
        raise CompareError(f"{bin_path}: ncnn could not load the weights (load_model failed)")
    input_blob = next(layer.tops[0] for layer in param.layers if layer.type == "Input")
    x = golden.input
    shapes = output_shapes(network, *x.shape[:1], *x.shape[2:])
    per_image: dict[str, list[np.ndarray]] = {blob: [] for blob in matches}
    try:
        for image in x:
            with net.create_extractor() as ex:
                if ex.input(input_blob, ncnn.Mat(np.ascontiguousarray(image)).clone()) != 0:
                    raise CompareError(f"{path}: ncnn refused the input blob {input_blob!r}")
                for blob, match in matches.items():
                    status, mat = ex.extract(blob)
                    if status != 0:
                        raise CompareError(f"{path}: ncnn failed computing blob {blob!r} of "
                                           f"{match.layer.describe()} (error {status})")
                    per_image[blob].append(_to_golden_shape(np.array(mat, dtype=np.float32),
                                                            shapes[match.nodes[-1].name]))
    finally:
        net.clear()
    tensors: dict[str, np.ndarray] = {}
    mapping = {}
    for blob, match in matches.items():
        node = match.nodes[-1].name
        tensors[node] = np.concatenate(per_image[blob], axis=0)
        mapping[blob] = (node, f"by structure: {match.how}")
    notes = []
    by_node = {node: blob for blob, (node, _) in mapping.items()}
    for i, (name, node) in enumerate(network.outputs.items()):
        tensors[name] = tensors[node]
        out_blob = f"out{i}"
        if out_blob in holds and holds[out_blob] != node:
            notes.append(f"ncnn blob {out_blob} holds {holds[out_blob]}, the golden's output {i} is {name} ({node}); "
                         f"compared by module path")
        notes.append(f"output {name}: ncnn blob {by_node[node]} ({node})")
    exposed = len(matches)
    notes.insert(0, f"{len(mapping)} of {exposed} computed ncnn blobs mapped to layers by structure "
                    f"({param.blob_count} blobs in all, the rest the input and Split copies)")
    precision = effective_precision(values, storage, {layer.type for layer in param.layers}, ncnn)
    options_used = {name: str(int(v)) if isinstance(v, bool) else str(v) for name, v in sorted(values.items())}
    return RuntimeRun(tensors=tensors, runtime="ncnn", version=getattr(ncnn, "__version__", "unknown"),
                      options=options_used, precision=precision, mapping=mapping, exposed=exposed, notes=notes)
