"""Import a GhostNet exported to ONNX by PyTorch as a refghost weights file (BatchNorm folded).

:func:`import_onnx` reads the graph and its initializers and returns :class:`~refghost.weights.Weights`
with ``Config(folded=True)``: every conv+BN pair is one conv with a bias, keyed
``<conv module>.weight`` / ``.bias`` and named after the BN it replaces, as both PyTorch exporters
(TorchScript, ``dynamo=True``) write it. What it does, in order:

1. **Architecture.** One image input ``(N, 3, H, W)``; a ``Gemm`` or ``MatMul`` means Huawei's/timm's
   ImageNet classifier (``ghostnet``, ``num_classes`` from its weight), otherwise NanoDet's backbone
   (``nanodet``). The number of Conv nodes must be GhostNet's (94 for the backbone, 95 with the head).
2. **Width.** From the conv weight shapes alone (:mod:`refghost.convert.onnx_width`).
3. **Layers.** :func:`refghost.runtimes.mapping.map_onnx` maps ONNX tensors to refghost layers by
   the exporters' scope names (TorchScript node names, dynamo's ``pkg.torch.onnx.name_scopes``) or,
   when names are gone, by aligning op order. The mapping is then *verified*, layer by layer in
   forward order, against the data flow (:mod:`refghost.convert.onnx_walk`).
4. **Activation.** The op pattern between each backbone conv and its activation's output
   (``act1``, both convs of every ``ghost1``, ``blocks.9.0.act1``) is classified
   (:mod:`refghost.convert.onnx_patterns`). The activation most sites use is the network's; a
   site that differs is refused by name.
5. **Out stages.** The graph outputs must be stage outputs (the last block of a stage, or
   ``blocks.9.0.act1``); their stages are ``out_stages``.
6. **Weights.** Read by the walk; a ``BatchNormalization`` kept by the export is folded in float64
   and rounded once.

Whatever would make the imported weights describe a different network from the one the graph
computes is refused with a :class:`~refghost.errors.WeightsError` naming the ONNX node and the
problem (the list is in :mod:`refghost.convert.onnx_walk`).

Not detectable from the graph alone: wrong *values* (a weight off by 1%, RGB/BGR-swapped stem
weights). The import is faithful to the file, so such a model imports fine; comparing a golden
file of the original weights with the imported ones (``refghost golden`` + ``refghost compare``)
finds the layer. How far an exporter's own float32 folding may move the outputs is
:func:`refghost.bounds.folding_bound`.

Matching by structure (a graph without scope names) aligns op order, so there a missing op shows
up as a misalignment at the next layer, named as such.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..arch import DEFAULT_OUT_STAGES, Config, build_graph
from ..errors import RefghostError, WeightsError
from ..weights import Preprocessing, Weights, default_preprocessing, file_sha256, from_tensors
from .onnx_graph import OnnxGraph, attribute, load_onnx_graph
from .onnx_walk import Walker
from .onnx_width import conv_weight_shapes, ghostnet_config, recognise_width


@dataclass
class OnnxImport:
    """What :func:`read_onnx` found: the config, the folded tensors, and how."""

    config: Config
    tensors: dict[str, np.ndarray]  # folded state_dict keys of ``build_graph(config)``
    input_shape: tuple  # of the graph input, None for a dimension that is not fixed
    matched: str  # how ONNX tensors were mapped to layers
    bn_folded_here: int  # BatchNormalization nodes folded by refghost (0: the exporter folded them all)
    producer: str  # the ONNX file's producer name and version


def _image_input(g: OnnxGraph) -> tuple[str, tuple]:
    inputs = [i for i in g.graph.input if i.name not in g.initializers]
    if len(inputs) != 1:
        raise WeightsError(f"{g.path}: not recognised as a GhostNet: expected one image input, found "
                           f"{len(inputs)} ({', '.join(i.name for i in inputs) or 'none'})")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    if len(shape) != 4 or shape[1] not in (3, None):
        raise WeightsError(f"{g.path}: not recognised as a GhostNet: input {inputs[0].name!r} has shape "
                           f"{['?' if d is None else d for d in shape]}, expected (N, 3, H, W)")
    return inputs[0].name, shape


def read_onnx(path) -> OnnxImport:
    """Recognise and check a GhostNet ONNX file; see the module docstring. Raises WeightsError."""
    path = os.fspath(path)
    try:
        return _read_onnx(path)
    except RefghostError:
        raise
    except Exception as exc:  # a graph this importer did not foresee: still bad input, with a message
        raise WeightsError(f"{path}: cannot import this ONNX graph ({type(exc).__name__}: {exc})") from exc


def _read_onnx(path: str) -> OnnxImport:
    g = load_onnx_graph(path)
    input_name, input_shape = _image_input(g)
    convs = [n for n in g.nodes if n.op_type == "Conv"]
    shapes = []
    for n in convs:
        w = g.const(n.input[1]) if len(n.input) > 1 else None
        if w is None or w.ndim != 4:
            raise WeightsError(f"{path}: Conv node {g.label(n)} has no constant 4-D weight (its weight "
                               f"{n.input[1] if len(n.input) > 1 else '?'!r} is computed or a graph input)")
        shapes.append(w.shape)
    linears = [n for n in g.nodes if n.op_type in ("Gemm", "MatMul")]
    arch, num_classes = "nanodet", 0
    if linears:
        arch = "ghostnet"
        num_classes = _num_classes(g, linears[-1])
    n_expected = len(conv_weight_shapes(build_graph(ghostnet_config(arch, 1.0, "ReLU", max(num_classes, 1)))))
    if len(convs) != n_expected:
        what = "ImageNet classifier (Gemm/MatMul found)" if arch == "ghostnet" else "NanoDet backbone"
        hint = ("; a whole detector (backbone, FPN and head) is more than a backbone: export the backbone alone"
                if len(convs) > n_expected else "")
        raise WeightsError(f"{path}: not recognised as a GhostNet {what}: it has {len(convs)} Conv node(s), "
                           f"GhostNet's has {n_expected}{hint}")
    width = recognise_width(shapes, arch, num_classes, path)

    # Map ONNX tensors to layers with the unfolded graph: its names cover both a Conv named after
    # its conv module (TorchScript) and one named after the BN folded into it (dynamo).
    from ..runtimes.mapping import map_by_structure, map_onnx, onnx_ops

    unfolded = build_graph(ghostnet_config(arch, width, "ReLU", num_classes, folded=False))
    folded_names = [n.name for n in build_graph(ghostnet_config(arch, width, "ReLU", num_classes)).nodes]
    try:
        mapping, how = map_onnx(g.graph, unfolded)
        if how.startswith("by exporter") and not set(folded_names) <= set(mapping.values()):
            try:
                alt = map_by_structure(onnx_ops(g.graph), unfolded)
                if set(folded_names) <= set(alt.values()):
                    mapping, how = alt, "by structure (scope names incomplete)"
            except RefghostError:
                pass
    except RefghostError as exc:  # by structure: the op sequence is not GhostNet's
        reason = str(exc).split("; name intermediate")[0]
        raise WeightsError(f"{path}: not recognised as a GhostNet: {reason}") from None
    tensor_of = {"input": input_name}
    for onnx_name, layer in mapping.items():
        tensor_of.setdefault(layer, g.resolve(onnx_name))
    missing = [n for n in folded_names if n not in tensor_of]
    if missing:
        raise WeightsError(f"{path}: layer {missing[0]} of GhostNet {arch} width {width:g} has no ONNX tensor "
                           f"(matched {how}; {len(missing)} layer(s) missing)")

    walker = Walker(g, unfolded, tensor_of)
    activation = walker.majority_activation() if arch == "nanodet" else "ReLU"
    out_stages = walker.out_stages() if arch == "nanodet" else ()
    config = ghostnet_config(arch, width, activation, num_classes, out_stages or DEFAULT_OUT_STAGES)
    tensors = walker.walk(build_graph(config))
    if walker.problems:
        first = walker.problems[0]
        more = ""
        if len(walker.problems) > 1:
            more = (f" ({len(walker.problems) - 1} more problem(s), next: "
                    + "; ".join(walker.problems[1:3]) + ")")
        raise WeightsError(f"{path}: the graph does not compute GhostNet {arch} width {width:g} "
                           f"({activation}): {first}{more}")
    producer = " ".join(p for p in (g.model.producer_name, g.model.producer_version) if p) or "unknown producer"
    return OnnxImport(config, tensors, input_shape, how, walker.bn_folded, producer)


def _num_classes(g: OnnxGraph, node) -> int:
    w = g.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.ndim != 2:
        raise WeightsError(f"{g.path}: {node.op_type} node {g.label(node)} has no constant 2-D weight")
    if node.op_type == "Gemm" and attribute(node, "transB", 0):
        return int(w.shape[0])
    return int(w.shape[1])


def import_onnx(path, *, preprocessing: Preprocessing | None = None) -> Weights:
    """Read a GhostNet exported to ONNX as folded :class:`Weights` (see the module docstring).

    ``preprocessing`` defaults to NanoDet's (nanodet) or ImageNet's (ghostnet) mean, std and
    channel order, with the input size of the graph's input when it is fixed.
    """
    path = os.fspath(path)
    found = read_onnx(path)
    cfg = found.config
    if preprocessing is None:
        base = default_preprocessing(cfg.arch)
        _, _, h, w = found.input_shape
        size = (int(w), int(h)) if isinstance(h, int) and isinstance(w, int) and h > 1 and w > 1 else base.input_size
        preprocessing = Preprocessing(base.mean, base.std, base.channel_order, size)
    folding = (f"{found.bn_folded_here} BatchNormalization node(s) folded by refghost in float64"
               if found.bn_folded_here else "BatchNorm folded by the exporter")
    provenance = {
        "source_file": os.path.basename(path),
        "source_sha256": file_sha256(path),
        "converter": f"refghost {__version__} convert (onnx)",
        "description": (f"imported from ONNX ({found.producer}); GhostNet {cfg.arch} width {cfg.width:g} "
                        f"{cfg.activation}; layers matched {found.matched}; {folding}"),
    }
    try:
        return from_tensors(found.tensors, cfg, preprocessing, provenance)
    except RefghostError as exc:  # shapes were checked layer by layer; this is a safety net
        raise WeightsError(f"{path}: {exc}") from None
