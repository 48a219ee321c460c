"""Tests of tests/onnx_bank.py: honest ONNX exports of GhostNet agree with refghost's float64
oracle within the derived float32 bound; each planted bug is detectable, first at the layer its
entry names; the two exporters' naming schemes are what onnx_bank documents.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

try:
    import onnx_bank as ob
    import torch_ghostnet as tg
except ModuleNotFoundError:  # e.g. if tests/ becomes a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import onnx_bank as ob
    import torch_ghostnet as tg

from refghost.bounds import error_bounds
from refghost.weights import from_tensors

HONEST = ("ts_folded", "ts_unfolded", "ts_nonames", "ts_anonymous", "dynamo")
BUGS = ("bug_hardsigmoid", "bug_bn_eps", "bug_concat_swap", "bug_no_residual", "bug_bgr_stem",
        "bug_tf_padding", "bug_weight_1pct", "bug_relu6")
#: Entries whose tensors can be mapped to layers by name (all but the anonymous ones).
NAMED = tuple(n for n in HONEST + BUGS if n not in ("ts_nonames", "ts_anonymous"))


class Oracle:
    """refghost's float64 values and probabilistic float32 bounds for a bank's model and input."""

    def __init__(self, bank: ob.Bank):
        self.weights = from_tensors(tg.state_dict_numpy(bank.model), bank.refghost_config())
        self.graph = self.weights.graph
        self.values, self.bounds = error_bounds(self.graph, self.weights.params("float64"),
                                                bank.x.astype(np.float64))
        self.order = [n.name for n in self.graph.nodes]
        self.consumers: dict[str, list] = {}
        for n in self.graph.nodes:
            for i in n.inputs:
                self.consumers.setdefault(i, []).append(n)

    def excess(self, node: str, array) -> float:
        """max(|array - value| - bound); > 0 means outside the bound somewhere."""
        a = np.asarray(array, dtype=np.float64)
        assert a.shape == self.values[node].shape, (node, a.shape, self.values[node].shape)
        return float((np.abs(a - self.values[node]) - self.bounds[node]).max())

    def output_excess(self, outputs: dict) -> dict[str, float]:
        return {name: self.excess(node, outputs[name]) for name, node in self.graph.outputs.items()}


def refghost_names(model, graph) -> dict[str, str]:
    """``{onnx tensor: refghost node}`` for an export of either exporter (names not stripped).

    Module path from :func:`onnx_bank.module_path`; a Conv whose BN was folded into it is the
    BN's node (that is the oracle value it must match); in an SE scope the Div / HardSigmoid is
    the gate and the Mul the SE output; other ops in the SE scope (Add, Clip) have no node.
    """
    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    nodes = {n.name: n for n in graph.nodes}
    bn_after = {n.inputs[0]: n.name for n in graph.nodes if n.op == "batch_norm"}
    readers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    out = {}
    for tensor, p in ob.tensor_producers(proto).items():
        m = ob.module_path(p)
        if m is None or p.op_type == "Constant":
            continue
        if m.endswith(".se") and m in nodes:
            name = {"Mul": m, "Div": m + ".gate", "HardSigmoid": m + ".gate"}.get(p.op_type)
        elif m in nodes:
            name = m
            if p.op_type == "Conv" and m in bn_after and "BatchNormalization" not in readers.get(tensor, []):
                name = bn_after[m]  # folded
        else:
            name = None
        if name is not None:
            out[tensor] = name
    return out


def first_bad(oracle: Oracle, entry, x, *, optimization="all"):
    """Run ``entry`` on ``x`` with every intermediate; return (the first refghost node outside
    the bound in forward order, or None; ``{node: array}`` of the nodes observed)."""
    values = ob.ort_outputs(entry.path, x, all_intermediates=True, optimization=optimization)
    seen = {}
    for tensor, node in refghost_names(entry.path, oracle.graph).items():
        seen[node] = values[tensor]
    for node in oracle.order:
        if node in seen and oracle.excess(node, seen[node]) > 0:
            return node, seen
    return None, seen


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_bank")
    b = ob.build_bank(folder)
    return b


@pytest.fixture(scope="module")
def oracle(bank):
    return Oracle(bank)


@pytest.fixture(scope="module")
def final_outputs(bank):
    return {e.name: ob.ort_outputs(e.path, bank.x) for e in bank.entries}


def _have(bank, name):
    if name not in bank:
        pytest.skip(f"{name} not built: {bank.skipped.get(name, 'not applicable')}")
    return bank[name]


# ------------------------------------------------------------------------------------------
# The bank itself
# ------------------------------------------------------------------------------------------
def test_bank_contents(bank, oracle):
    names = [e.name for e in bank.entries]
    assert set(names) == set(HONEST + BUGS) - set(bank.skipped), (names, bank.skipped)
    assert bank.skipped == {}, "the dynamo exporter should work here (onnxscript installed)"
    assert bank.x.dtype == np.float32 and bank.x.shape == (1, 3, 64, 64)
    assert set(bank.state_dict) == set(bank.model.state_dict())
    modules = dict(bank.model.named_modules())
    stages = []
    for e in bank.entries:
        assert e.path.exists() and e.description
        onnx.checker.check_model(str(e.path))
        if e.honest:
            assert e.expected_first is None and not e.accept
            continue
        gate = e.expected_first.endswith(".se.gate")
        assert gate or e.expected_first in modules, e.expected_first
        for name in (e.expected_first,) + e.accept:  # every blamed layer is a refghost node
            assert name in oracle.order, name
        stages.append(e.expected_first.split(".")[1] if e.expected_first.startswith("blocks.") else "stem")
    assert len(set(stages)) == len(stages), stages  # one bug per stage
    expected = {"bug_hardsigmoid": "blocks.4.0.se.gate", "bug_bn_eps": "blocks.5.0.bn_dw",
                "bug_concat_swap": "blocks.2.0.ghost1", "bug_no_residual": "blocks.6.1",
                "bug_bgr_stem": "conv_stem", "bug_tf_padding": "blocks.7.0.conv_dw",
                "bug_weight_1pct": "blocks.8.2.ghost2.primary_conv.0"}
    assert {k: bank[k].expected_first for k in expected} == expected
    assert bank["bug_bgr_stem"].accept == ("bn1",)
    assert bank["bug_relu6"].expected_first == "blocks.1.0.ghost1.primary_conv.2"  # input max 7.9 here


def test_cache_reuses_files(bank, monkeypatch):
    """A second build of the same bank reads the manifest: no exporter runs, no file is rewritten."""
    def no_export(*args, **kwargs):
        raise AssertionError("exported again instead of reusing the cached files")

    monkeypatch.setattr(ob, "_export_torchscript", no_export)
    monkeypatch.setattr(ob, "_export_dynamo", no_export)
    written = {e.path: e.path.stat().st_mtime_ns for e in bank.entries}
    again = ob.build_bank(bank.folder)
    assert again.from_cache
    assert {e.path: e.path.stat().st_mtime_ns for e in again.entries} == written
    assert again.entries == bank.entries
    np.testing.assert_array_equal(again.x, bank.x)


# ------------------------------------------------------------------------------------------
# Honest entries agree with torch and with the oracle within the derived bound
# ------------------------------------------------------------------------------------------
def test_torch_within_bound(bank, oracle):
    excess = oracle.output_excess(bank.torch_outputs())
    assert all(v <= 0 for v in excess.values()), excess


@pytest.mark.parametrize("name", HONEST)
def test_honest_within_bound(bank, oracle, final_outputs, name):
    entry = _have(bank, name)
    out = final_outputs[name]
    assert list(out) == list(bank.output_names)
    excess = oracle.output_excess(out)
    assert all(v <= 0 for v in excess.values()), excess
    torch_out = bank.torch_outputs()
    for k in bank.output_names:  # closely equal to torch's float32 outputs, too
        bound = 2 * oracle.bounds[oracle.graph.outputs[k]]
        assert np.all(np.abs(out[k] - torch_out[k]) <= bound), k
    assert entry.honest


@pytest.mark.parametrize("optimization", ["all", "none"])
def test_honest_intermediates_within_bound(bank, oracle, optimization):
    for name in ("ts_folded", "ts_unfolded", "dynamo"):
        bad, seen = first_bad(oracle, _have(bank, name), bank.x, optimization=optimization)
        assert bad is None, (name, bad)
        # nearly every refghost node is observable; SE/conv internals folded away are not
        missing = set(oracle.order) - set(seen)
        if name == "ts_unfolded":
            assert missing == set(), missing
        else:
            assert all(oracle.graph.node(m).op == "conv" for m in missing), missing


# ------------------------------------------------------------------------------------------
# Bugs: detectable end to end, and first at the layer the entry names
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUGS)
def test_bug_detectable(bank, oracle, final_outputs, name):
    entry = bank[name]
    excess = oracle.output_excess(final_outputs[name])
    if max(excess.values()) <= 0:  # only visible inside: must show at its layer
        bad, _ = first_bad(oracle, entry, bank.x)
        assert bad is not None and entry.blames(bad), (bad, entry.expected_first)
    # outputs upstream of the bug are untouched
    first_stage = 0 if not entry.expected_first.startswith("blocks.") else int(entry.expected_first.split(".")[1])
    for out_name, v in excess.items():
        assert (v > 0) == (int(out_name.split(".")[1]) >= first_stage), (out_name, v)


@pytest.mark.parametrize("name", BUGS)
def test_bug_first_layer(bank, oracle, name):
    entry = bank[name]
    bad, seen = first_bad(oracle, entry, bank.x)
    assert bad is not None and entry.blames(bad), (bad, entry.expected_first, entry.accept)
    # every observed layer before it in forward order is within the bound
    for node in oracle.order[: oracle.order.index(bad)]:
        if node in seen:
            assert oracle.excess(node, seen[node]) <= 0, node


def test_bug_edits(bank):
    def nodes(e):
        return {n.name: n for n in onnx.load(str(e.path)).graph.node}

    hs = nodes(bank["bug_hardsigmoid"])["/blocks.4/blocks.4.0/se/HardSigmoid"]
    assert hs.op_type == "HardSigmoid" and not hs.attribute  # ONNX defaults alpha 0.2, beta 0.5
    assert not any(n.startswith("/blocks.4/blocks.4.0/se/") and n.rsplit("/", 1)[1] in ("Add", "Clip", "Div")
                   for n in nodes(bank["bug_hardsigmoid"]))
    bn = nodes(bank["bug_bn_eps"])["/blocks.5/blocks.5.0/bn_dw/BatchNormalization"]
    assert np.isclose(onnx.helper.get_attribute_value(next(a for a in bn.attribute if a.name == "epsilon")), 1e-3)
    pad = nodes(bank["bug_tf_padding"])["/blocks.7/blocks.7.0/conv_dw/Conv"]
    assert list(next(a for a in pad.attribute if a.name == "pads").ints) == [1, 1, 2, 2]
    assert nodes(bank["bug_no_residual"])["/blocks.6/blocks.6.1/Identity"].op_type == "Identity"
    assert nodes(bank["bug_relu6"])["/blocks.1/blocks.1.0/ghost1/primary_conv/primary_conv.2/Clip"].op_type == "Clip"


def test_leaky_relu_slope_bug(tmp_path):
    b = ob.build_bank(tmp_path, activation="LeakyReLU", size=(32, 32), seed=1, dynamo=False)
    assert "bug_leaky_slope" in b and "bug_relu6" not in b
    entry = b["bug_leaky_slope"]
    assert entry.expected_first == "blocks.3.0.ghost1.primary_conv.2"
    o = Oracle(b)
    assert max(o.output_excess(ob.ort_outputs(entry.path, b.x)).values()) > 0
    assert max(o.output_excess(ob.ort_outputs(b["ts_folded"].path, b.x)).values()) <= 0
    bad, _ = first_bad(o, entry, b.x)
    assert bad == entry.expected_first


# ------------------------------------------------------------------------------------------
# Naming schemes of the two exporters, and the tensor -> node mapping
# ------------------------------------------------------------------------------------------
def test_torchscript_naming(bank):
    folded = onnx.load(str(bank["ts_folded"].path)).graph
    names = {n.name: n for n in folded.node}
    for name, op in [
        ("/conv_stem/Conv", "Conv"),
        ("/act1/Relu", "Relu"),
        ("/blocks.6/blocks.6.3/ghost1/primary_conv/primary_conv.0/Conv", "Conv"),
        ("/blocks.6/blocks.6.3/ghost1/cheap_operation/cheap_operation.2/Relu", "Relu"),
        ("/blocks.6/blocks.6.3/ghost1/Concat", "Concat"),
        ("/blocks.1/blocks.1.0/conv_dw/Conv", "Conv"),
        ("/blocks.1/blocks.1.0/shortcut/shortcut.2/Conv", "Conv"),
        ("/blocks.3/blocks.3.0/se/avg_pool/GlobalAveragePool", "GlobalAveragePool"),
        ("/blocks.3/blocks.3.0/se/conv_reduce/Conv", "Conv"),
        ("/blocks.3/blocks.3.0/se/Add", "Add"),  # hard_sigmoid: Add(3) -> Clip(0, 6) -> Div(6) -> Mul
        ("/blocks.3/blocks.3.0/se/Clip", "Clip"),
        ("/blocks.3/blocks.3.0/se/Div", "Div"),
        ("/blocks.3/blocks.3.0/se/Mul", "Mul"),
        ("/blocks.0/blocks.0.0/Add", "Add"),
        ("/blocks.9/blocks.9.0/conv/Conv", "Conv"),
    ]:
        assert names[name].op_type == op, name
        assert not names[name].metadata_props
    assert names["/conv_stem/Conv"].output[0] == "/conv_stem/Conv_output_0"
    # the last node of each output stage writes the graph output under its given name
    assert names["/blocks.4/blocks.4.0/Add"].output[0] == "blocks.4"
    assert names["/blocks.9/blocks.9.0/act1/Relu"].output[0] == "blocks.9"
    # NanoDet calls self.blocks[i], so the container itself is no scope
    assert not any(n.startswith("/blocks/") for n in names)
    # BN folded: no BatchNormalization, one Conv per Conv2d, folded weights named onnx::Conv_<n>
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in bank.model.modules())
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in bank.model.modules())
    assert sum(n.op_type == "Conv" for n in folded.node) == n_conv
    assert not any(n.op_type == "BatchNormalization" for n in folded.node)
    assert re.fullmatch(r"onnx::Conv_\d+", names["/conv_stem/Conv"].input[1])
    unfolded = onnx.load(str(bank["ts_unfolded"].path)).graph
    bns = [n for n in unfolded.node if n.op_type == "BatchNormalization"]
    assert len(bns) == n_bn
    bn = next(n for n in bns if n.name == "/blocks.1/blocks.1.0/bn_dw/BatchNormalization")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
    assert attrs["training_mode"] == 0 and np.isclose(attrs["epsilon"], 1e-5)
    assert list(bn.input[1:]) == [f"blocks.1.0.bn_dw.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
    # module_path inverts the scheme for every node
    modules = dict(bank.model.named_modules())
    for p in ob.tensor_producers(bank["ts_unfolded"].path).values():
        m = ob.module_path(p)
        assert m in modules, (p.node_name, m)
    stripped = onnx.load(str(bank["ts_nonames"].path)).graph
    assert all(n.name == "" for n in stripped.node)
    anon = onnx.load(str(bank["ts_anonymous"].path)).graph
    assert all(re.fullmatch(r"t\d+|w\d+|input|blocks\.\d", t) for n in anon.node for t in list(n.input) + list(n.output))


def test_dynamo_naming(bank):
    entry = _have(bank, "dynamo")
    g = onnx.load(str(entry.path)).graph
    assert [i.name for i in g.input] == ["input"] and [o.name for o in g.output] == list(bank.output_names)
    assert not any(n.op_type == "BatchNormalization" for n in g.node)
    assert all(re.fullmatch(r"node_\w+", n.name) for n in g.node)
    meta = {n.name: {p.key: p.value for p in n.metadata_props} for n in g.node}
    assert all("pkg.torch.onnx.name_scopes" in m for m in meta.values())
    stem = g.node[0]
    m = meta[stem.name]
    assert stem.op_type == "Conv" and stem.input[0] == "input"
    # the fused Conv carries the BN's scope, not the conv's
    assert ast.literal_eval(m["pkg.torch.onnx.name_scopes"])[:2] == ["", "bn1"]
    assert "FuseBatchNormIntoConv" in m["pkg.onnxscript.rewriter.rule_name"]
    assert "torch.nn.modules.batchnorm.BatchNorm2d" in m["pkg.torch.onnx.class_hierarchy"]
    cats = [n for n in g.node if n.op_type == "Concat"
            and ast.literal_eval(meta[n.name]["pkg.torch.onnx.name_scopes"])[-2] == "blocks.6.3.ghost1"]
    assert len(cats) == 1
    scopes = ast.literal_eval(meta[cats[0].name]["pkg.torch.onnx.name_scopes"])
    assert scopes[:4] == ["", "blocks.6", "blocks.6.3", "blocks.6.3.ghost1"] and scopes[-1].startswith("cat")
    # the SE average pool is a ReduceMean here (GlobalAveragePool in TorchScript)
    assert sum(n.op_type == "ReduceMean" for n in g.node) == sum(n.op_type == "GlobalAveragePool" for n in
                                                                 onnx.load(str(bank["ts_folded"].path)).graph.node)
    producers = ob.tensor_producers(entry.path)
    assert ob.module_path(producers[stem.output[0]]) == "bn1"
    assert ob.module_path(producers[cats[0].output[0]]) == "blocks.6.3.ghost1"


def test_ort_outputs_intermediates(bank, final_outputs, oracle):
    entry = bank["ts_folded"]
    everything = ob.ort_outputs(entry.path, bank.x, all_intermediates=True, threads=2)
    proto = onnx.load(str(entry.path))
    non_const = [o for n in proto.graph.node if n.op_type != "Constant" for o in n.output]
    assert list(everything) == non_const  # forward order, every node output
    for k in bank.output_names:
        # Exposing every intermediate changes which fusions ORT makes, and so its summation order
        # on some CPUs (AVX2: 774 of 1920 values differed by up to 9.5e-7): two honest float32
        # runs, each within the oracle's accumulated bound, so within twice it of each other.
        node = oracle.graph.outputs[k]
        assert (np.abs(everything[k] - final_outputs["ts_folded"][k]) <= 2 * oracle.bounds[node]).all(), k
    producers = ob.tensor_producers(entry.path)
    p = producers["/blocks.3/blocks.3.0/se/Div_output_0"]
    assert (p.node_name, p.op_type) == ("/blocks.3/blocks.3.0/se/Div", "Div")
    assert ob.module_path(p) == "blocks.3.0.se"
    with_outputs = ob.with_all_outputs(proto)
    assert len(with_outputs.graph.output) == len(non_const)
    unopt = ob.ort_outputs(entry.path, bank.x, optimization="none")
    for k in bank.output_names:
        # Two honest float32 runs (ORT unoptimized and optimized): each within the accumulated
        # bound of the oracle, so within twice that bound of each other.
        node = oracle.graph.outputs[k]
        assert (np.abs(unopt[k] - final_outputs["ts_folded"][k]) <= 2 * oracle.bounds[node]).all(), k
