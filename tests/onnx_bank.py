"""A bank of ONNX exports of GhostNet, honest and deliberately broken, for the verifier's tests.

:func:`build_bank` builds a small NanoDet GhostNet with ``tests/torch_ghostnet.py`` (seeded weights,
eval mode), exports it with PyTorch's exporters and writes a set of ``.onnx`` files into a folder:

honest entries
    ``ts_folded``: TorchScript exporter (``dynamo=False``), opset 17, eval mode: every BatchNorm
    is folded into the conv before it (no BatchNormalization node left).
    ``ts_unfolded``: the same with ``training=TrainingMode.PRESERVE`` on the eval model: every BN
    stays a ``BatchNormalization`` node (``training_mode=0``).
    ``ts_nonames``: ``ts_folded`` with every node name set to ``""`` (tensor names kept).
    ``ts_anonymous``: ``ts_folded`` with node names removed and every tensor and initializer
    renamed ``t<i>`` / ``w<i>`` (graph input and outputs keep their names), as after a renaming
    optimizer: only the structure is left to map tensors to layers.
    ``dynamo``: the torch.export-based exporter (``dynamo=True``, opset 18, needs ``onnxscript``);
    its optimizer folds BN too. Skipped (listed in :attr:`Bank.skipped`) if it cannot run.
bug entries
    graph edits of ``ts_folded`` (``ts_unfolded`` for the BN epsilon), each in a different stage,
    each with the PyTorch module path of the first layer (forward order) that goes wrong.

Names of layers (``expected_first``) follow ``model.named_modules()``; the SE gate (a function in
PyTorch) is ``<block>.se.gate``; a GhostModule's concat is the GhostModule's own name
(``blocks.2.0.ghost1``), a bottleneck's residual add the bottleneck's name (``blocks.6.1``), the SE
product ``<block>.se``. These are also the node names of ``refghost.arch.build_graph``. A conv
whose BN was folded into it counts as the conv; :attr:`Entry.accept` lists the BN as the equally
right answer of a verifier that reports a folded Conv+BN pair by its last member.

:func:`ort_outputs` runs a model in ONNX Runtime (optionally every node output), and
:func:`tensor_producers` / :func:`module_path` map ONNX tensors back to nodes and module paths.

Naming schemes (asserted in ``tests/test_onnx_bank.py``):

* TorchScript: node names are the module scopes joined by ``/`` plus ``<OpType>[_k]``, e.g.
  ``/blocks.6/blocks.6.3/ghost1/primary_conv/primary_conv.0/Conv``; a scope component is either
  a plain attribute name (``ghost1``) or ``<parent component>.<child>`` (``blocks.6.3`` under
  ``blocks.6``, ``primary_conv.0`` under ``primary_conv``). NanoDet's forward calls
  ``self.blocks[i]`` directly, so there is no ``/blocks/`` component. Output tensors are
  ``<node name>_output_0``; folded conv weights are initializers ``onnx::Conv_<n>``; no
  ``metadata_props``.
* dynamo: node names are ``node_<Op>_<n>`` / ``node_<fx name>`` (``node_relu_1``, ``node_cat``,
  ``node_add_3``), tensors carry the FX names (``relu_1``, ``cat``, ``getitem_3``); every node has
  ``metadata_props`` with ``pkg.torch.onnx.name_scopes`` (a list of full module paths ending with
  the FX op name), ``pkg.torch.onnx.class_hierarchy``, ``namespace``, ``pkg.torch.onnx.fx_node``,
  ``pkg.torch.onnx.stack_trace``. A Conv with a folded BN keeps the **BN's** metadata (its
  name_scopes end in ``...primary_conv.1``, ``bn1``) plus ``pkg.onnxscript.rewriter.rule_name =
  FuseBatchNormIntoConv, ...``.

This module is a helper for tests, not a test file.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import logging
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from refghost.arch import DEFAULT_OUT_STAGES

try:
    import torch_ghostnet as tg
except ModuleNotFoundError:  # imported as tests.onnx_bank or from elsewhere
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_ghostnet as tg

__all__ = [
    "Bank",
    "Entry",
    "Producer",
    "build_bank",
    "module_path",
    "ort_outputs",
    "ort_session",
    "tensor_producers",
    "with_all_outputs",
]

#: Bump when the bank's content changes: invalidates cached folders.
BANK_VERSION = 1
TS_OPSET = 17
DYNAMO_OPSET = 18
INPUT_NAME = "input"
MANIFEST = "bank.json"


@dataclass(frozen=True)
class Entry:
    """One ONNX model of the bank.

    ``expected_first`` is the module path of the first layer (forward order) at which a correct
    verifier should say the outputs go wrong; None for honest entries. ``accept`` lists other
    names that are equally right (the BN folded into a broken conv). ``base`` is the entry the
    bug was edited into, ``onnx_nodes`` the names of the ONNX nodes that were edited.
    """

    name: str
    path: Path
    honest: bool
    expected_first: str | None
    description: str
    base: str | None = None
    accept: tuple[str, ...] = ()
    onnx_nodes: tuple[str, ...] = ()

    def blames(self, layer: str) -> bool:
        """True if ``layer`` is a right answer for this entry's first bad layer."""
        return not self.honest and (layer == self.expected_first or layer in self.accept)


@dataclass
class Bank:
    """The torch model, its state_dict, the fixed input and the ONNX entries."""

    folder: Path
    model: torch.nn.Module
    state_dict: dict[str, torch.Tensor]
    x: np.ndarray  # (1, 3, H, W) float32
    width: float
    activation: str
    out_stages: tuple[int, ...]
    output_names: tuple[str, ...]
    entries: list[Entry]
    skipped: dict[str, str] = field(default_factory=dict)  # entry name -> reason
    from_cache: bool = False
    seconds: float = 0.0

    def __getitem__(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"no entry {name!r}; have {[e.name for e in self.entries]}")

    def __contains__(self, name: str) -> bool:
        return any(e.name == name for e in self.entries)

    @property
    def honest(self) -> list[Entry]:
        return [e for e in self.entries if e.honest]

    @property
    def bugs(self) -> list[Entry]:
        return [e for e in self.entries if not e.honest]

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        return tg.state_dict_numpy(self.model)

    def torch_outputs(self) -> dict[str, np.ndarray]:
        """The float32 PyTorch outputs, keyed like the ONNX graph outputs (``blocks.4``, ...)."""
        with torch.no_grad():
            outs = self.model(torch.from_numpy(self.x))
        return {n: o.numpy().copy() for n, o in zip(self.output_names, outs)}

    def refghost_config(self):
        from refghost import Config

        return Config(arch="nanodet", width=self.width, activation=self.activation,
                      out_stages=self.out_stages)


# ------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------
def build_bank(folder, *, width: float = 0.5, activation: str = "ReLU", size=(64, 64), seed: int = 0,
               out_stages: Iterable[int] = DEFAULT_OUT_STAGES, dynamo: bool = True, refresh: bool = False) -> Bank:
    """Build (or reuse from ``folder``) the bank of ONNX models.

    ``size`` is (H, W) of the input ``x`` (standard normal, float32, seeded by ``seed``, which
    also seeds the weights through ``tg.randomize``). The files and a manifest ``bank.json``
    go into ``folder``; a later call with the same arguments (and the same torch/onnx versions)
    reuses them without exporting again unless ``refresh``. ``dynamo=False`` skips the slow
    (~3-6 s) dynamo export.
    """
    t0 = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out_stages = tuple(sorted(out_stages))
    h, w = (int(size[0]), int(size[1]))
    model = tg.randomize(tg.build("nanodet", width, activation, out_stages), seed)
    x = np.random.default_rng(seed).standard_normal((1, 3, h, w)).astype(np.float32)
    output_names = tuple(f"blocks.{s}" for s in out_stages)
    key = _cache_key(model, x, width=width, activation=activation, out_stages=out_stages, dynamo=dynamo)
    common = dict(folder=folder, model=model, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
                  x=x, width=width, activation=activation, out_stages=out_stages, output_names=output_names)

    manifest = folder / MANIFEST
    if not refresh and manifest.exists():
        try:
            data = json.loads(manifest.read_text())
            if data.get("key") == key:
                entries = [Entry(**{**e, "path": folder / e["path"], "accept": tuple(e["accept"]),
                                    "onnx_nodes": tuple(e["onnx_nodes"])}) for e in data["entries"]]
                if all(e.path.exists() for e in entries):
                    return Bank(entries=entries, skipped=data.get("skipped", {}), from_cache=True,
                                seconds=time.perf_counter() - t0, **common)
        except (ValueError, KeyError, TypeError):
            pass

    entries: list[Entry] = []
    skipped: dict[str, str] = {}
    xt = torch.from_numpy(x)

    def add(name, model_proto, **kw):
        path = folder / f"{name}.onnx"
        onnx.save(model_proto, path)
        entries.append(Entry(name=name, path=path, **kw))

    # ---- honest -------------------------------------------------------------------------
    folded = _export_torchscript(model, xt, output_names, folded=True)
    unfolded = _export_torchscript(model, xt, output_names, folded=False)
    add("ts_folded", folded, honest=True, expected_first=None,
        description=f"TorchScript exporter, opset {TS_OPSET}, eval mode: every BatchNorm folded into its conv")
    add("ts_unfolded", unfolded, honest=True, expected_first=None,
        description=f"TorchScript exporter, opset {TS_OPSET}, training=PRESERVE on the eval model: "
                    "BatchNormalization nodes kept (training_mode=0)")
    add("ts_nonames", _strip_node_names(folded), honest=True, expected_first=None, base="ts_folded",
        description="ts_folded with every node name set to '' (tensor names kept)")
    add("ts_anonymous", _anonymize(folded), honest=True, expected_first=None, base="ts_folded",
        description="ts_folded with node names removed and every tensor/initializer renamed t<i>/w<i> "
                    "(graph input/outputs keep their names): only the structure maps tensors to layers")
    if dynamo:
        try:
            add("dynamo", _export_dynamo(model, xt, output_names), honest=True, expected_first=None,
                description=f"dynamo (torch.export) exporter, opset {DYNAMO_OPSET}, onnxscript optimizer on: "
                            "BN folded (the fused Conv keeps the BN's metadata); nodes carry "
                            "pkg.torch.onnx.name_scopes")
        except Exception as exc:  # no onnxscript, no network-free export, ...
            skipped["dynamo"] = f"{type(exc).__name__}: {exc}"[:500]

    # ---- bugs ---------------------------------------------------------------------------
    _, acts = tg.capture(model, xt)
    for make in (_bug_hardsigmoid, _bug_bn_eps, _bug_concat_swap, _bug_no_residual, _bug_bgr_stem,
                 _bug_tf_padding, _bug_weight, _bug_activation):
        made = make(folded=folded, unfolded=unfolded, model=model, acts=acts, activation=activation)
        if made is None:
            continue
        name, proto, kw = made
        onnx.checker.check_model(proto)
        add(name, proto, honest=False, **kw)

    manifest.write_text(json.dumps({
        "key": key,
        "entries": [{**asdict(e), "path": e.path.name} for e in entries],
        "skipped": skipped,
    }, indent=1))
    return Bank(entries=entries, skipped=skipped, from_cache=False, seconds=time.perf_counter() - t0, **common)


def _cache_key(model, x, **params) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": BANK_VERSION, "torch": torch.__version__, "onnx": onnx.__version__,
                         **{k: repr(v) for k, v in params.items()}}, sort_keys=True).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    h.update(x.tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' deprecation warnings, logging and progress prints."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _export_torchscript(model, xt, output_names, *, folded: bool) -> onnx.ModelProto:
    buf = io.BytesIO()
    kw = {} if folded else {"training": torch.onnx.TrainingMode.PRESERVE}
    with _quiet():
        torch.onnx.export(model, (xt,), buf, dynamo=False, opset_version=TS_OPSET, input_names=[INPUT_NAME],
                          output_names=list(output_names), **kw)
    proto = onnx.load_from_string(buf.getvalue())
    n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    if folded and n_bn:
        raise RuntimeError(f"expected every BN folded, {n_bn} BatchNormalization nodes left")
    if not folded and not n_bn:
        raise RuntimeError("expected BatchNormalization nodes in the unfolded export")
    return proto


def _export_dynamo(model, xt, output_names) -> onnx.ModelProto:
    with _quiet():
        program = torch.onnx.export(model, (xt,), dynamo=True, opset_version=DYNAMO_OPSET,
                                    input_names=[INPUT_NAME], output_names=list(output_names), verbose=False)
    return program.model_proto


def _strip_node_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for n in out.graph.node:
        n.name = ""
    return out


def _anonymize(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = _strip_node_names(proto)
    g = out.graph
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    rename: dict[str, str] = {}
    for i, init in enumerate(g.initializer):
        rename[init.name] = f"w{i}"
        init.name = rename[init.name]
    k = 0
    for n in g.node:
        for j, o in enumerate(n.output):
            if o and o not in keep:
                rename[o] = f"t{k}"
                k += 1
                n.output[j] = rename[o]
        for j, i in enumerate(n.input):
            n.input[j] = rename.get(i, i)
        del n.metadata_props[:]
    for vi in g.value_info:
        vi.name = rename.get(vi.name, vi.name)
    return out


# ------------------------------------------------------------------------------------------
# Graph-editing helpers
# ------------------------------------------------------------------------------------------
def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _node(g: onnx.GraphProto, name: str) -> onnx.NodeProto:
    hits = [n for n in g.node if n.name == name]
    if len(hits) != 1:
        raise LookupError(f"{len(hits)} nodes named {name!r}")
    return hits[0]


def _scope_nodes(g, scope: str, op_type: str) -> list[onnx.NodeProto]:
    """Nodes directly in a TorchScript scope (``/blocks.4/blocks.4.0/se/``) of one op type."""
    return [n for n in g.node if n.op_type == op_type and n.name.startswith(scope)
            and "/" not in n.name[len(scope):]]


def _initializer(g, name: str) -> onnx.TensorProto:
    hits = [t for t in g.initializer if t.name == name]
    if len(hits) != 1:
        raise LookupError(f"{len(hits)} initializers named {name!r}")
    return hits[0]


def _set_attr(node, name, value):
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _prune(g: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (repeatedly), then unused initializers."""
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)


def _ts_scope(module: str) -> str:
    """TorchScript node-name prefix of a module path of NanoDet's GhostNet.

    ``blocks.6.3.ghost1.primary_conv.0`` -> ``/blocks.6/blocks.6.3/ghost1/primary_conv/primary_conv.0/``.
    """
    parts = module.split(".")
    if parts[0] != "blocks":
        comps = [parts[0]]
        rest = parts[1:]
    else:
        comps = [f"blocks.{parts[1]}", f"blocks.{parts[1]}.{parts[2]}"]
        rest = parts[3:]
    for p in rest:
        if p.isdigit():  # a Sequential child: "<parent component>.<index>"
            comps.append(f"{comps[-1]}.{p}")
        else:
            comps.append(p)
    return "/" + "/".join(comps) + "/"


def _folded_note(conv: str, bn: str) -> str:
    return (f" BN folded: the broken ONNX Conv computes {conv}+{bn}; a verifier that maps a folded "
            f"Conv+BN to the pair (or compares the Conv output with the BN's oracle value) should blame "
            f"{bn} - accepted.")


# ------------------------------------------------------------------------------------------
# The bugs. Each returns (name, model, Entry fields) or None when not applicable.
# ------------------------------------------------------------------------------------------
def _bug_hardsigmoid(*, folded, **_):
    block = "blocks.4.0"
    p = _copy(folded)
    g = p.graph
    scope = _ts_scope(block + ".se")
    add, = _scope_nodes(g, scope, "Add")
    clip, = _scope_nodes(g, scope, "Clip")
    div, = _scope_nodes(g, scope, "Div")
    mul, = _scope_nodes(g, scope, "Mul")
    producers = {o: n for n in g.node for o in n.output}
    gate_in = next(i for i in add.input if producers.get(i) is not None and producers[i].op_type != "Constant")
    hs = helper.make_node("HardSigmoid", [gate_in], [scope + "HardSigmoid_output_0"], name=scope + "HardSigmoid")
    assert mul.input[1] == div.output[0], "expected Mul(x, gate)"
    mul.input[1] = hs.output[0]
    g.node.insert(list(g.node).index(add), hs)
    _prune(g)
    return ("bug_hardsigmoid", p, dict(
        expected_first=f"{block}.se.gate", base="ts_folded", onnx_nodes=(hs.name,),
        description=f"{block}'s SE gate Add(3)->Clip(0,6)->Div(6) replaced by one ONNX HardSigmoid with its "
                    "defaults alpha=0.2, beta=0.5 (NanoDet needs 1/6, 0.5); first wrong: the gate"))


def _bug_bn_eps(*, unfolded, **_):
    bn_module = "blocks.5.0.bn_dw"
    p = _copy(unfolded)
    node = _node(p.graph, _ts_scope(bn_module) + "BatchNormalization")
    assert abs(_attr(node, "epsilon") - 1e-5) < 1e-9
    _set_attr(node, "epsilon", 1e-3)
    return ("bug_bn_eps", p, dict(
        expected_first=bn_module, base="ts_unfolded", onnx_nodes=(node.name,),
        description=f"BatchNormalization {bn_module} with epsilon 1e-3 (Keras) instead of 1e-5, in the "
                    "unfolded export (the BN node exists, so it is the layer to blame)"))


def _bug_concat_swap(*, folded, **_):
    module = "blocks.2.0.ghost1"
    p = _copy(folded)
    node = _node(p.graph, _ts_scope(module) + "Concat")
    ins = list(node.input)
    node.input[:] = ins[::-1]
    return ("bug_concat_swap", p, dict(
        expected_first=module, base="ts_folded", onnx_nodes=(node.name,),
        description=f"GhostModule {module}: Concat inputs reversed ([cheap, primary] instead of "
                    "[primary, cheap]); the concat (the GhostModule's output) is the first wrong tensor"))


def _bug_no_residual(*, folded, **_):
    block = "blocks.6.1"  # identity shortcut: 40 -> 40 channels, stride 1 at width 0.5
    p = _copy(folded)
    g = p.graph
    scope = _ts_scope(block)
    add = _node(g, scope + "Add")
    ghost2_out = _node(g, _ts_scope(block + ".ghost2") + "Concat").output[0]
    assert ghost2_out in add.input, "expected Add(ghost2, shortcut)"
    ident = helper.make_node("Identity", [ghost2_out], list(add.output), name=scope + "Identity")
    index = list(g.node).index(add)
    g.node.remove(add)
    g.node.insert(index, ident)
    return ("bug_no_residual", p, dict(
        expected_first=block, base="ts_folded", onnx_nodes=(ident.name,),
        description=f"{block} (identity shortcut): the residual Add replaced by Identity(ghost2 output), "
                    "keeping the Add's output tensor name; first wrong: the block's output"))


def _bug_bgr_stem(*, folded, **_):
    p = _copy(folded)
    g = p.graph
    conv = _node(g, "/conv_stem/Conv")
    init = _initializer(g, conv.input[1])
    w = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[:, ::-1]), init.name))
    return ("bug_bgr_stem", p, dict(
        expected_first="conv_stem", accept=("bn1",), base="ts_folded", onnx_nodes=(conv.name,),
        description="RGB/BGR swapped: conv_stem's weight has its input-channel axis reversed."
                    + _folded_note("conv_stem", "bn1")))


def _bug_tf_padding(*, folded, **_):
    module, bn = "blocks.7.0.conv_dw", "blocks.7.0.bn_dw"  # 5x5 depthwise, stride 2
    p = _copy(folded)
    g = p.graph
    conv = _node(g, _ts_scope(module) + "Conv")
    inferred = onnx.shape_inference.infer_shapes(p)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    n_h, n_w = shapes[conv.input[0]][2:]
    (k_h, k_w), (s_h, s_w) = _attr(conv, "kernel_shape"), _attr(conv, "strides")
    old = list(_attr(conv, "pads"))
    pads = []
    for n, k, s in ((n_h, k_h, s_h), (n_w, k_w, s_w)):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    new = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]  # [top, left, bottom, right]
    if new == old:
        raise RuntimeError(f"TF SAME padding equals PyTorch's for input {n_h}x{n_w}; choose another size")
    _set_attr(conv, "pads", new)
    return ("bug_tf_padding", p, dict(
        expected_first=module, accept=(bn,), base="ts_folded", onnx_nodes=(conv.name,),
        description=f"TF-style SAME padding in the stride-2 depthwise {module} ({k_h}x{k_w} on {n_h}x{n_w}): "
                    f"pads {new} instead of {old} (same output shape, shifted windows)."
                    + _folded_note(module, bn)))


def _bug_weight(*, folded, acts, **_):
    module, bn = "blocks.8.2.ghost2.primary_conv.0", "blocks.8.2.ghost2.primary_conv.1"  # 1x1, linear
    p = _copy(folded)
    g = p.graph
    conv = _node(g, _ts_scope(module) + "Conv")
    init = _initializer(g, conv.input[1])
    w = numpy_helper.to_array(init).copy()
    x_in = acts["blocks.8.2.ghost1"].numpy()[0]  # (C, H, W), the conv's input
    contribution = np.abs(w[:, :, 0, 0]) * np.abs(x_in).mean(axis=(1, 2))[None, :]
    o, i = np.unravel_index(int(np.argmax(contribution)), contribution.shape)
    w[o, i, 0, 0] *= np.float32(1.01)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return ("bug_weight_1pct", p, dict(
        expected_first=module, accept=(bn,), base="ts_folded", onnx_nodes=(conv.name,),
        description=f"one weight of the 1x1 conv {module} off by 1%: element [{o}, {i}, 0, 0] of the folded "
                    "weight times 1.01 (the element with the largest |w| * mean|input|)."
                    + _folded_note(module, bn)))


def _bug_activation(*, folded, model, acts, activation, **_):
    p = _copy(folded)
    g = p.graph
    if activation == "LeakyReLU":
        module = "blocks.3.0.ghost1.primary_conv.2"
        node = _node(g, _ts_scope(module) + "LeakyRelu")
        assert abs(_attr(node, "alpha") - 0.1) < 1e-6
        _set_attr(node, "alpha", 0.01)
        return ("bug_leaky_slope", p, dict(
            expected_first=module, base="ts_folded", onnx_nodes=(node.name,),
            description=f"LeakyReLU {module} with PyTorch's default slope 0.01 instead of NanoDet's 0.1"))
    if activation != "ReLU":
        return None
    # ReLU6 for ReLU: only visible where the activation's input exceeds 6. Prefer the stages the other
    # bugs leave alone (0, 1, 3, 9), take the ReLU whose input reaches furthest above 6.
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU) and ".se." not in n]
    preferred = ("blocks.0.", "blocks.1.", "blocks.3.", "blocks.9.", "act1")
    best = max(names, key=lambda n: (n.startswith(preferred) and float(acts[n].max()) > 6.5, float(acts[n].max())))
    peak = float(acts[best].max())
    if peak <= 6.0:
        return None  # nothing would change: ReLU6 == ReLU on this input
    node = _node(g, _ts_scope(best) + "Relu")
    lo = numpy_helper.from_array(np.array(0.0, np.float32), node.name + "/min")
    hi = numpy_helper.from_array(np.array(6.0, np.float32), node.name + "/max")
    g.initializer.extend([lo, hi])
    clip = helper.make_node("Clip", [node.input[0], lo.name, hi.name], list(node.output),
                            name=node.name[: -len("Relu")] + "Clip")
    index = list(g.node).index(node)
    g.node.remove(node)
    g.node.insert(index, clip)
    return ("bug_relu6", p, dict(
        expected_first=best, base="ts_folded", onnx_nodes=(clip.name,),
        description=f"ReLU6 (Clip 0..6) in place of the ReLU {best}, whose input reaches {peak:.2f} here"))


# ------------------------------------------------------------------------------------------
# Running and mapping
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Producer:
    """The node that produces a tensor: its name, op type, metadata, position and inputs."""

    node_name: str
    op_type: str
    metadata: dict[str, str]
    index: int  # position in graph.node (topological order)
    inputs: tuple[str, ...]


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model))


def tensor_producers(model) -> dict[str, Producer]:
    """``{tensor name: Producer}`` for every node output (Constant nodes included) in node order."""
    proto = _load(model)
    out: dict[str, Producer] = {}
    for idx, n in enumerate(proto.graph.node):
        meta = {p.key: p.value for p in n.metadata_props}
        for o in n.output:
            if o:
                out[o] = Producer(n.name, n.op_type, meta, idx, tuple(n.input))
    return out


def module_path(producer: Producer) -> str | None:
    """The PyTorch module path (scope) a node belongs to, from either exporter's naming.

    dynamo: the last module entry of ``pkg.torch.onnx.name_scopes`` (the list ends with the FX
    op name), so a fused Conv+BN gives the BN's path. TorchScript: the node name's scope
    components joined (``/blocks.6/blocks.6.3/ghost1/Concat`` -> ``blocks.6.3.ghost1``;
    ``/conv_stem/Conv`` -> ``conv_stem``). Returns ``""`` for a node at the root scope and None
    when neither is available (stripped names).
    """
    scopes = producer.metadata.get("pkg.torch.onnx.name_scopes")
    if scopes:
        names = ast.literal_eval(scopes)
        return names[-2] if len(names) >= 2 else ""
    name = producer.node_name
    if not name.startswith("/"):
        return None
    comps = name.strip("/").split("/")[:-1]
    path: list[str] = []
    prev = None
    for c in comps:
        if prev is not None and c.startswith(prev + "."):
            path.append(c[len(prev) + 1:])
        else:
            path.append(c)
        prev = c
    return ".".join(path)


def with_all_outputs(model, *, include_constants: bool = False) -> onnx.ModelProto:
    """A copy whose graph outputs are every node output (after the original outputs).

    Shapes/types come from ONNX shape inference where it knows them; the rest are added as
    value_info-less outputs (name only), which ONNX Runtime accepts.
    """
    proto = _copy(_load(model))
    g = proto.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        known = {vi.name: vi for vi in inferred.graph.value_info}
    except Exception:  # shape inference is best effort
        known = {}
    have = {o.name for o in g.output}
    for n in g.node:
        if n.op_type == "Constant" and not include_constants:
            continue
        for o in n.output:
            if o and o not in have:
                vi = onnx.ValueInfoProto()
                if o in known:
                    vi.CopyFrom(known[o])
                else:
                    vi.name = o
                g.output.append(vi)
                have.add(o)
    return proto


_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def ort_session(model, *, threads: int = 1, optimization: str = "all"):
    """An onnxruntime InferenceSession (CPUExecutionProvider) for a path or ModelProto."""
    import onnxruntime as ort

    if optimization not in _LEVELS:
        raise ValueError(f"optimization must be one of {sorted(_LEVELS)}, got {optimization!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    so.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])


def ort_outputs(path, x: np.ndarray, *, all_intermediates: bool = False, threads: int = 1,
                optimization: str = "all") -> dict[str, np.ndarray]:
    """Run a model on ``x`` in ONNX Runtime; ``{onnx tensor name: array}``.

    Without ``all_intermediates`` only the graph outputs, in graph order. With it, every
    non-Constant node output as well, in node (forward) order, the original outputs included
    where their nodes are. Note: a tensor that is a graph output cannot be fused away, so ORT
    computes the intermediates run without the fusions of the plain run (Conv+Relu, ...): run
    both if the fused result matters. Pair the names with :func:`tensor_producers`.
    """
    proto = _load(path)
    if all_intermediates:
        proto = with_all_outputs(proto)
    sess = ort_session(proto, threads=threads, optimization=optimization)
    names = [o.name for o in sess.get_outputs()]
    input_name = sess.get_inputs()[0].name
    values = sess.run(names, {input_name: np.ascontiguousarray(x, dtype=np.float32)})
    result = dict(zip(names, values))
    if not all_intermediates:
        return result
    order = [o for n in proto.graph.node for o in n.output if o in result]
    return {k: result[k] for k in order}
