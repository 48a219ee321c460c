"""refghost.runtimes.mapping on what every real adapter observes: one vocabulary, NCHW values, one matcher.

One small GhostNet (width 0.5, 64x64) is exported and converted for every installed runtime
(tests/runtime_bank.py); each adapter's ``observe`` is called directly and its ops are matched by
:func:`refghost.runtimes.mapping.match`, the one place tensors are named by module path.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

import numpy as np
import pytest

import runtime_bank as rb
import torch_ghostnet as tg
from refghost import Config
from refghost.ops import fold_batch_norm
from refghost.runtimes import Observed, Precision
from refghost.runtimes.mapping import (BY_SCOPE, BY_STRUCTURE, VOCABULARY, MappingError, Op, folded_conv_weight,
                                       map_by_attributes, map_ops, match)
from refghost.verify.golden import make_golden
from refghost.weights import from_tensors

#: One model file per runtime (runtime, file key of the port, matcher it asks for).
ADAPTERS = [("onnxruntime", "onnx", "names"), ("openvino", "onnx", "names"), ("mnn", "mnn", "names"),
            ("ncnn", "ncnn_fp32", "attributes"), ("litert", "tflite", "dataflow")]


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    model = tg.randomize(tg.build("nanodet", 0.5, "ReLU", (4, 6, 9)), 0)
    weights = from_tensors(tg.state_dict_numpy(model), Config(arch="nanodet", width=0.5))
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    golden = make_golden(weights, x, intermediates=True)
    return golden, rb.build_port(weights, 64, tmp_path_factory.mktemp("mapping"))


@pytest.fixture(scope="module")
def observed(port):
    """``{runtime: Observed}``: each adapter's run at its most precise settings."""
    golden, files = port
    seen = {}
    for runtime, key, _ in ADAPTERS:
        if key in files.files and rb.available(runtime):
            module = importlib.import_module(f"refghost.runtimes.{runtime}")
            seen[runtime] = module.observe(str(files.files[key]), golden, precise=True, options={}, threads=1)
    return seen


def _seen(observed, runtime) -> Observed:
    if runtime not in observed:
        pytest.fail(f"{runtime} is pinned in the test extra but its model could not be made")
    return observed[runtime]


@pytest.mark.parametrize("runtime, key, matcher", ADAPTERS)
def test_every_adapter_gives_ops_in_one_vocabulary_and_values_in_nchw(port, observed, runtime, key, matcher):
    golden, _ = port
    seen = _seen(observed, runtime)
    assert isinstance(seen.precision, Precision) and seen.precision.is_float32  # precise settings, float32 weights
    assert seen.matcher == matcher and seen.runtime == runtime
    kinds = {op.kind for op in seen.ops} | {op.fused for op in seen.ops if op.fused}
    assert kinds <= VOCABULARY, sorted(kinds - VOCABULARY)
    tensors, mapping = match(seen, golden)
    reference = golden.tensors()
    for name in golden.outputs:  # the deployed outputs, NCHW as they came
        assert tensors[name].shape == reference[name].shape, name
    names = {label: t for t, label in (seen.labels or {}).items()}
    for tensor, (layer, _) in mapping.items():  # every matched value is NCHW already (a vector: (N, C))
        value = seen.values[names.get(tensor, tensor)]
        want = reference[layer].shape
        assert value.shape in (want, want[:2]), (tensor, layer, value.shape, want)
        assert np.array_equal(tensors[layer], value.reshape(want)), layer


def test_adapters_that_fuse_alike_map_the_same_layers(port, observed):
    """ncnn (attributes) and MNN (scope names) both fuse Conv+BN+ReLU: the same layers; ONNX
    Runtime and OpenVINO (scope names, unfused ReLU): the same layers."""
    golden, _ = port

    def layers(runtime):
        return sorted(layer for layer, _ in match(_seen(observed, runtime), golden)[1].values())

    assert layers("ncnn") == layers("mnn")
    assert layers("onnxruntime") == layers("openvino")
    assert len(layers("ncnn")) < len(layers("onnxruntime"))  # the fused activations have no tensor of their own


def test_scope_names_and_structure_agree_on_onnx_ops(port, observed):
    golden, _ = port
    ops = _seen(observed, "onnxruntime").ops
    by_names, how = map_ops(ops, golden.weights.graph)
    anonymous, how_anon = map_ops([Op(op.kind, op.output) for op in ops], golden.weights.graph)
    assert (how, how_anon) == (BY_SCOPE, BY_STRUCTURE)
    assert anonymous == by_names


def test_attribute_matching_names_the_op_that_does_not_fit(port, observed):
    golden, _ = port
    ops = list(_seen(observed, "ncnn").ops)
    mapping, hows = map_by_attributes(ops, golden.weights.graph)
    assert all(how.startswith("by structure: ") for how in hows.values())
    i = next(i for i, op in enumerate(ops) if op.kind == "Conv" and op.attrs["stride"] == (2, 2))
    ops[i] = dataclasses.replace(ops[i], attrs={**ops[i].attrs, "stride": (1, 1)})
    with pytest.raises(MappingError, match=rf"{re.escape(ops[i].label)} .* stride 1, \S+ has 2"):
        map_by_attributes(ops, golden.weights.graph)


def test_the_bn_fold_is_the_one_of_refghost_ops(port, observed):
    """The weight the data-flow matcher looks for is refghost.ops.fold_batch_norm's (BN_EPS), and it
    is what the TorchScript exporter wrote into the ONNX file's Conv (within float32 rounding)."""
    import onnx
    from onnx import numpy_helper

    golden, files = port
    network = golden.weights.graph
    params = golden.weights.params("float64")
    conv = next(n for n in network.nodes if n.op == "conv" and n.name.endswith("primary_conv.0"))
    bn = next(n for n in network.nodes if n.inputs == (conv.name,))
    expected, _ = fold_batch_norm(params[conv.params["weight"]], None,
                                  *(params[bn.params[k]] for k in ("weight", "bias", "running_mean", "running_var")))
    np.testing.assert_array_equal(folded_conv_weight(network, params, conv), expected)
    model = onnx.load(str(files.files["onnx"]))
    scope = "/" + "/".join(rb._torchscript_scope(conv.name)) + "/"
    node = next(n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith(scope))
    exported = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == node.input[1])
    # the exporter folds in float32: var + eps, its square root, gamma over it, W times it: a few
    # roundings of 2^-24 each (8 allows for a reciprocal square root that is not correctly rounded)
    np.testing.assert_allclose(exported, expected, rtol=8 * 2.0 ** -24, atol=0)


@pytest.mark.parametrize("key", ["onnx", "mnn", "ncnn_fp32", "tflite"])
def test_map_without_a_golden_for_every_format(port, key, tmp_path, capsys):
    """`refghost map MODEL --weights W.h5`: the network of the weights on a seeded input of the
    model's input shape (ncnn declares none: the weights' input size, here given as 64x64)."""
    from refghost.cli import main
    from refghost.weights import save_weights

    golden, files = port
    weights = tmp_path / "w.h5"
    pre = dataclasses.replace(golden.weights.preprocessing, input_size=(64, 64))  # what the port was made for
    save_weights(weights, dataclasses.replace(golden.weights, preprocessing=pre))
    assert main(["map", str(files.files[key]), "--weights", str(weights)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(str(files.files[key])) and " exposed tensors mapped to layers " in out[1]
    assert int(out[1].split()[0]) > 150 and len(out) == 2 + int(out[1].split()[0])


# --- whole-detector graphs (NanoDet's module paths; tests/test_compare_detector.py runs real exports) ---
def _detector_graph():
    from refghost.detector.graph import build_detector_graph
    from refghost.detector.spec import PRESETS

    return build_detector_graph(PRESETS["nanodet-plus-m_320"])


def test_a_shuffle_block_is_its_shuffled_tensor_and_its_halves_map_by_what_they_read():
    """A stride-1 ShuffleNetV2 block as TorchScript exports it: the chunk's split points computed
    from the input's shape (Shape, Gather, Div: never a layer), two Slices, the branch, a Concat,
    and the channel shuffle (Reshape, Transpose, Reshape): the block's value is the shuffled one."""
    b1, b2 = "backbone.stage2.1", "backbone.stage2.2"
    ops = [Op("Concat", "cat1", b1, ("x1", "y1")), Op("Constant", "k", b1), Op("Reshape", "r1", b1, ("cat1", "k")),
           Op("Transpose", "t1", b1, ("r1",)), Op("Reshape", "out1", b1, ("t1", "k")),
           Op("Shape", "s", b2, ("out1",)), Op("Gather", "g", b2, ("s",)), Op("Div", "d", b2, ("g",)),
           Op("Slice", "h0", b2, ("out1", "d")), Op("Slice", "h1", b2, ("out1", "d")),
           Op("LeakyRelu", "y2", f"{b2}.branch2.7", ("h1",)), Op("Concat", "cat2", b2, ("h0", "y2")),
           Op("Reshape", "r2", b2, ("cat2", "k")), Op("Transpose", "t2", b2, ("r2",)),
           Op("Reshape", "out2", b2, ("t2", "k"))]
    mapping, how = map_ops(ops, _detector_graph())
    assert how == BY_SCOPE
    assert mapping["t1"] == b1 and mapping["t2"] == b2  # not the Concat before the shuffle
    assert (mapping["h0"], mapping["h1"], mapping["cat2"]) == (f"{b2}.chunk.0", f"{b2}.chunk.1", f"{b2}.cat")
    assert "d" not in mapping and "g" not in mapping  # shape arithmetic is no layer


def test_a_module_called_twice_maps_each_call_and_the_export_form_head_is_the_output():
    act = "head.cls_convs.0.0.act"
    sigmoided = [Op("Slice", "c", "head", ("g",)), Op("Slice", "r", "head", ("g",)), Op("Sigmoid", "s", "head", ("c",)),
                 Op("Concat", "l", "head", ("s", "r")), Op("Reshape", "f", "head", ("l",)),
                 Op("Concat", "all", "head", ("f",)), Op("Transpose", "out", "head", ("all",))]
    ops = [Op("LeakyRelu", "a0", act, ("p",)), Op("LeakyRelu", "a1", f"{act}_1", ("q",)),
           Op("Add", "sum", "fpn", ("u", "v")), *sigmoided]
    mapping, _ = map_ops(ops, _detector_graph())
    assert (mapping["a0"], mapping["a1"]) == (f"{act}.0", f"{act}.1")
    assert "sum" not in mapping  # the neck's own ops are no call of the neck: fpn is not fpn.0
    assert mapping["out"] == "output"  # the head's module returns the sigmoided output: the raw head is not exposed
    raw = [op for op in ops if op.kind != "Sigmoid"]
    assert map_ops(raw, _detector_graph())[0]["out"] == "head"


def test_the_structure_matcher_names_a_detector_op_it_has_no_pattern_for():
    ops = [Op("Conv", "c"), Op("LeakyRelu", "a"), Op("MaxPool", "m"), Op("Conv", "c2")]
    with pytest.raises(MappingError, match=r"backbone\.maxpool is a max_pool"):
        map_ops(ops, _detector_graph())


def test_data_flow_matching_names_the_first_layer_no_op_computes():
    """A graph without names whose ops give their inputs is matched by data flow (conv attributes
    checked); where it stops fitting, the error names the layer."""
    conv = {"out_channels": 24, "kernel": (3, 3), "stride": (2, 2), "groups": 1}
    ops = [Op("Conv", "c", None, ("data",), attrs=conv), Op("LeakyRelu", "a", None, ("c",)),
           Op("AveragePool", "p", None, ("a",))]
    with pytest.raises(MappingError, match=r"computes layer backbone\.maxpool \(max_pool\)"):
        map_ops(ops, _detector_graph())
    wrong = [dataclasses.replace(ops[0], attrs={**conv, "stride": (1, 1)}), *ops[1:]]
    with pytest.raises(MappingError, match=r"computes layer backbone\.conv1\.0 \(conv\)"):
        map_ops(wrong, _detector_graph())
