"""`refghost compare` on whole NanoDet detectors exported to ONNX as NanoDet's ``tools/export_onnx.py``
exports them (TorchScript exporter, opset 11, input ``data``, one output ``output``: the head's
export form, class scores sigmoided), run in ONNX Runtime: honest exports pass with every part's
module outputs mapped, simplified (onnxsim) or not; bugs written into the ONNX graph are caught
and blamed on the layer where they start. The exports are made from the independent PyTorch
NanoDet (tests/torch_nanodet.py) loaded with the refghost weights' tensors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch_nanodet as tn
from onnx import numpy_helper

from refghost.detector.graph import PARTS, build_detector_graph
from refghost.detector.spec import PRESETS
from refghost.runtimes.mapping import BY_FLOW, scope_of_name
from refghost.verify.candidates import load_candidate
from refghost.verify.compare import compare, format_report
from refghost.verify.golden import make_golden
from refghost.verify.judge import Candidate, judge
from refghost.weights import from_tensors, load_weights

WEIGHTS = Path(__file__).parent.parent / "weights"
PLUS_M = WEIGHTS / "nanodet-plus-m_320.h5"


# --------------------------------------------------------------------------------------------
# the exports
# --------------------------------------------------------------------------------------------
def export_detector(weights, size: int, path: Path) -> Path:
    """NanoDet's export: the model itself (not a wrapper, so the scope names are NanoDet's module
    paths) in its export form, TorchScript exporter, opset 11, input "data", output "output"."""
    model = tn.build(weights.config)
    state = model.state_dict()
    for key, value in weights.tensors.items():
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32))
    model.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, 3, size, size), True), str(path), opset_version=11,
                          input_names=["data"], output_names=["output"], dynamo=False)
    return path


def random_weights(preset: str, seed: int = 0):
    """A preset's detector with torch_nanodet's deterministic random weights."""
    config = PRESETS[preset]
    keys = build_detector_graph(config).param_shapes
    model = tn.randomize(tn.build(config), seed)
    return from_tensors({k: v.detach().numpy() for k, v in model.state_dict().items() if k in keys}, config)


def made(folder: Path, weights, size: int, name: str, seed: int = 0):
    """``(golden with intermediates, exported model path)`` for ``weights`` at ``size``."""
    x = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    return make_golden(weights, x, intermediates=True), export_detector(weights, size, folder / f"{name}.onnx")


@pytest.fixture(scope="module")
def plus320(tmp_path_factory):
    return made(tmp_path_factory.mktemp("plus320"), load_weights(PLUS_M), 320, "plus320")


def _judge(golden, path, **settings):
    return judge(Candidate(str(path), **settings), golden)


def assert_honest_pass(golden, path, **settings):
    j = _judge(golden, path, **settings)
    bad = [(t.name, t.accumulated_ratio, t.isolated_ratio) for t in j.report.tensors if t.status != "ok"]
    assert j.passed, bad[:3]
    parts = j.run.parts
    assert list(parts) == list(PARTS)
    for part, (mapped, exposed) in parts.items():  # every module output of every part is mapped
        assert mapped == exposed and mapped > 0, (part, mapped, exposed)
    layers = {n.name for n in golden.weights.graph.nodes}
    compared = {t.name for t in j.report.tensors}
    assert "output" in compared and "head" not in compared  # the export form's head returns the output
    for part in PARTS:  # the parts' last layers are compared under their own names
        assert any(name.startswith(part + ".") for name in compared), part
    assert compared <= layers
    line = next(l for l in format_report(j.report).splitlines() if l.startswith("mapping"))
    assert ", ".join(f"{p} {m}/{e}" for p, (m, e) in parts.items()) in line
    return j


# --------------------------------------------------------------------------------------------
# honest exports
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimization, threads", [("all", 1), ("none", 1), ("all", 2)])
def test_honest_plus_m_export_passes_with_every_part_mapped(plus320, optimization, threads):
    golden, path = plus320
    j = assert_honest_pass(golden, path, optimization=optimization, threads=threads)
    by_name = {t.name: t for t in j.report.tensors}
    # a ShuffleNetV2 stride-1 block's output (after the channel shuffle) and its parts, by scope and by data flow
    for name in ("backbone.stage4.2", "backbone.stage4.2.chunk.0", "backbone.stage4.2.chunk.1",
                 "backbone.stage4.2.cat", "fpn.upsample.0", "fpn.top_down_blocks.0.input", "fpn.3",
                 "head.cls_convs.0.0.act.0", "head.cls_convs.0.0.act.1"):
        assert by_name[name].status == "ok" and by_name[name].isolated_ratio is not None, name
    assert j.run.parts == {"backbone": [150, 150], "fpn": [73, 73], "head": [37, 37]}


def test_simplified_export_passes(plus320, tmp_path):
    """NanoDet's export_onnx.py runs onnxsim on the export: shape arithmetic folded into constants."""
    import onnxsim  # pinned in the test extra
    golden, path = plus320
    model, ok = onnxsim.simplify(onnx.load(str(path)))
    assert ok
    assert not any(n.op_type in ("Shape", "Gather") for n in model.graph.node)  # it did simplify
    onnx.save(model, str(tmp_path / "sim.onnx"))
    assert_honest_pass(golden, tmp_path / "sim.onnx")


@pytest.mark.slow
def test_honest_plus_m_416_passes(tmp_path):
    assert_honest_pass(*made(tmp_path, load_weights(PLUS_M), 416, "plus416"))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ghostnet-ghostpan-plus", "nanodet-m"])
def test_honest_other_compositions_pass(preset, tmp_path):
    assert_honest_pass(*made(tmp_path, random_weights(preset), 320, preset))


# --------------------------------------------------------------------------------------------
# bugs written into the exported graph
# --------------------------------------------------------------------------------------------
def _node(model, op_type: str, scope: str, k: int = 0):
    nodes = [n for n in model.graph.node if n.op_type == op_type and scope_of_name(n.name) == scope]
    if not nodes and scope == "fpn" and op_type == "Concat":  # no names: the first Concat reading a Resize
        resized = {n.output[0] for n in model.graph.node if n.op_type == "Resize"}
        nodes = [n for n in model.graph.node if n.op_type == "Concat" and set(n.input) & resized]
    return nodes[k]


def _set(node, name: str, value: str) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.s = value.encode()
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def upsample_nearest(model):
    _set(_node(model, "Resize", "fpn.upsample"), "mode", "nearest")


def upsample_align_corners(model):
    _set(_node(model, "Resize", "fpn.upsample"), "coordinate_transformation_mode", "align_corners")


def ghostpan_concat_swapped(model):
    node = _node(model, "Concat", "fpn")  # the first: cat(upsampled top level, lateral level 1)
    node.input[0], node.input[1] = node.input[1], node.input[0]


def head_channels_permuted(model):
    """Two class channels of gfl_cls.0 swapped (weight rows and biases)."""
    conv = _node(model, "Conv", "head.gfl_cls.0")
    for init in model.graph.initializer:
        if init.name in conv.input[1:]:
            array = numpy_helper.to_array(init).copy()
            array[[0, 1]] = array[[1, 0]]
            init.CopyFrom(numpy_helper.from_array(array, init.name))


def sigmoid_removed(model):
    """The class part's Sigmoid dropped from every level: the raw logits exported."""
    sigmoids = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    assert sigmoids
    for node in sigmoids:
        for other in model.graph.node:
            for i, name in enumerate(other.input):
                if name == node.output[0]:
                    other.input[i] = node.input[0]
        model.graph.node.remove(node)


def _blame(golden, path):
    """judge's own path but for the diagnosis (the re-judging under looser policies: slow, and not
    what blames a layer): the failing report."""
    loaded = load_candidate(str(path), golden)
    report = compare(golden, loaded.tensors, candidate_name=loaded.description, runtime=loaded.run.summary(),
                     separate_outputs=True, diagnose=False)
    assert not report.passed
    return report


BUGS = {upsample_nearest: "fpn.upsample.0", upsample_align_corners: "fpn.upsample.0",
        ghostpan_concat_swapped: "fpn.top_down_blocks.0.input", head_channels_permuted: "head.gfl_cls.0",
        sigmoid_removed: "output"}


@pytest.mark.parametrize("bug", list(BUGS), ids=lambda b: b.__name__)
def test_bug_is_caught_and_blamed_on_its_layer(plus320, tmp_path, bug):
    golden, path = plus320
    model = onnx.load(str(path))
    bug(model)
    onnx.save(model, str(tmp_path / "bug.onnx"))
    report = _blame(golden, tmp_path / "bug.onnx")
    assert report.first_divergent == BUGS[bug], (report.first_divergent, report.isolated_failures[:3])
    first = next(t for t in report.tensors if t.name == BUGS[bug])
    assert first.status == "mismatch"
    assert all(t.status == "ok" for t in report.tensors[:report.tensors.index(first)])  # nothing before it is blamed


# --------------------------------------------------------------------------------------------
# a graph without scope names: matched by its data flow
# --------------------------------------------------------------------------------------------
def anonymous(model):
    """Every node renamed ``n<k>`` (and every tensor ``t<k>``, the graph's input and output kept):
    no module path left anywhere."""
    names = {}
    for k, node in enumerate(model.graph.node):
        node.name = f"n{k}"
        for i, out in enumerate(node.output):
            if out not in ("output",):
                names[out] = f"t{k}_{i}"
                node.output[i] = names[out]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = names.get(name, name)


def test_graph_without_scope_names_is_matched_by_data_flow(plus320, tmp_path):
    golden, path = plus320
    model = onnx.load(str(path))
    anonymous(model)
    onnx.save(model, str(tmp_path / "anonymous.onnx"))
    j = _judge(golden, tmp_path / "anonymous.onnx")
    assert j.passed
    assert {m["how"] for m in j.run.summary()["mapping"].values()} == {BY_FLOW}
    assert {p: m for p, (m, _) in j.run.parts.items()} == {"backbone": 150, "fpn": 73, "head": 36}  # no head scope
    ghostpan_concat_swapped(model)  # the node names are gone: the first Concat reading the upsampled level
    onnx.save(model, str(tmp_path / "anonymous_bug.onnx"))
    report = _blame(golden, tmp_path / "anonymous_bug.onnx")
    assert report.first_divergent == "fpn.top_down_blocks.0.input"


# --------------------------------------------------------------------------------------------
# a golden of another network than the model's: a backbone's golden on a whole detector, and back
# --------------------------------------------------------------------------------------------
GHOST_SIZE = 128  # small: the point is what is judged, not the size


@pytest.fixture(scope="module")
def ghost_detector(tmp_path_factory):
    """GhostNet+GhostPAN+Plus head with the GhostNet weights file's backbone (random neck and head):
    ``(backbone weights, detector weights, x, whole-detector ONNX, backbone-only ONNX)``."""
    folder = tmp_path_factory.mktemp("ghost")
    backbone = load_weights(WEIGHTS / "ghostnet_nanodet_1.0x.h5")
    tensors = dict(random_weights("ghostnet-ghostpan-plus").tensors)
    tensors.update({f"backbone.{k}": v for k, v in backbone.tensors.items()})
    detector = from_tensors(tensors, PRESETS["ghostnet-ghostpan-plus"])
    whole = export_detector(detector, GHOST_SIZE, folder / "detector.onnx")
    model = tn.build(detector.config)
    model.load_state_dict({**model.state_dict(), **{k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.backbone, (torch.zeros(1, 3, GHOST_SIZE, GHOST_SIZE),), str(folder / "backbone.onnx"),
                          opset_version=11, input_names=["data"], dynamo=False)
    x = np.random.default_rng(1).standard_normal((1, 3, GHOST_SIZE, GHOST_SIZE)).astype(np.float32)
    return backbone, detector, x, whole, folder / "backbone.onnx"


def test_backbone_golden_on_a_whole_detector_judges_the_backbone(ghost_detector):
    backbone, _, x, whole, _ = ghost_detector
    golden = make_golden(backbone, x, intermediates=True)
    j = _judge(golden, whole)
    assert j.passed
    compared = {t.name for t in j.report.tensors}
    assert set(golden.outputs) <= compared and "blocks.6.3.ghost2" in compared  # the backbone's layers, by its names
    assert j.run.parts == {}  # the golden's network is no detector: no parts
    note = next(n for n in j.report.notes if "not judged" in n)
    assert "fpn and head of the model were not judged" in note


def test_detector_golden_on_a_backbone_model_judges_what_exists(ghost_detector):
    _, detector, x, _, backbone_only = ghost_detector
    golden = make_golden(detector, x, intermediates=True)
    j = _judge(golden, backbone_only)
    assert j.passed
    assert j.run.parts["backbone"][0] == j.run.parts["backbone"][1] > 0
    assert j.run.parts["fpn"][0] == j.run.parts["head"][0] == 0
    assert all(t.name.startswith("backbone.") for t in j.report.tensors)
    note = next(n for n in j.report.notes if "not judged" in n)
    assert "output and the layers of fpn, head were not judged" in note
