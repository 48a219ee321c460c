"""The whole NanoDet detector as refghost data (refghost.detector) against an independent PyTorch
NanoDet (tests/torch_nanodet.py): state_dict keys and shapes, output shapes and prior counts,
and layer-by-layer values in float64 for the four compositions (ShuffleNetV2 or GhostNet
backbone, GhostPAN + NanoDetPlusHead or PAN + NanoDetHead), with both implementations, and
float32 runs within the derived bounds (refghost.bounds) of the float64 oracle.

Tolerance of the float64 parity (refghost vs PyTorch, both float64): every node within 1e-9 of
that node's largest magnitude. The two differ only in summation order (BLAS, einsum or Numba
against PyTorch's kernels) and in PyTorch's fused multiply-adds, a few units of 2^-53 per
operation; measured, the worst node is about 3e-15 of its magnitude, so 1e-9 leaves six orders
of magnitude while a wrong weight, tap or order of channels is off by O(1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

try:
    import torch_nanodet as tn
except ModuleNotFoundError:  # e.g. if tests/ becomes a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_nanodet as tn
from torch_ghostnet import se_gates

from refghost import arch, forward, ops
from refghost.bounds import error_bounds
from refghost.detector import ops as dops
from refghost.detector.graph import build_detector_graph, level_nodes, unread_state_dict_keys
from refghost.detector.spec import PRESETS, DetectorConfig, level_sizes, num_priors
from refghost.errors import RefghostError

#: Relative tolerance of float64 against float64 (module docstring).
REL_TOL_FLOAT64 = 1e-9

PLUS = PRESETS["nanodet-plus-m_320"]
LEGACY = PRESETS["nanodet-m"]
#: The four compositions of backbone, neck and head.
COMPOSITIONS = {name: PRESETS[name] for name in
                ("nanodet-plus-m_320", "ghostnet-ghostpan-plus", "nanodet-m", "ghostnet-pan-nanodet")}
#: Every preset and variants of the fields that change keys or shapes.
VARIANTS = {
    **PRESETS,
    "shufflenet-0.5x": dataclasses.replace(PLUS, backbone_width=0.5),
    "shufflenet-2.0x-128": dataclasses.replace(PLUS, backbone_width=2.0, neck_channels=128, head_feat_channels=128),
    "activations": dataclasses.replace(PLUS, backbone_activation="PReLU", neck_activation="HardSwish",
                                       head_activation="PReLU"),
    "3-classes": dataclasses.replace(PLUS, num_classes=3),
    "no-extra-level": dataclasses.replace(PLUS, num_extra_level=0, strides=(8, 16, 32)),
    "ghostnet-0.75": dataclasses.replace(PRESETS["ghostnet-ghostpan-plus"], backbone_width=0.75),
    "ghostpan-conv-res-expand": dataclasses.replace(PLUS, use_depthwise=False, use_res=True, expand=2,
                                                    neck_kernel_size=3, head_conv_type="Conv", stacked_convs=1),
    "legacy-unshared": dataclasses.replace(LEGACY, share_cls_reg=False, reg_max=10, head_conv_type="Conv"),
    "pan-activated-two-levels": dataclasses.replace(LEGACY, out_stages=(3, 4), neck_activation="ReLU",
                                                    strides=(16, 32)),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def state_dict_shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


# --- (1) keys and shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_param_shapes_are_nanodets_state_dict(name):
    config = VARIANTS[name]
    graph = build_detector_graph(config)
    unread = unread_state_dict_keys(config)
    assert graph.config is config
    assert not set(graph.param_shapes) & set(unread)
    assert {**graph.param_shapes, **unread} == state_dict_shapes(tn.build(config))


# --- (2) shapes and priors ------------------------------------------------------------------


@pytest.mark.parametrize("name, width, height", [("nanodet-plus-m_320", 320, 320), ("nanodet-plus-m_416", 416, 416),
                                                 ("ghostnet-ghostpan-plus", 320, 320), ("nanodet-m", 320, 192),
                                                 ("ghostnet-pan-nanodet", 192, 320)])
def test_output_shapes_match_torch(name, width, height):
    config = PRESETS[name]
    graph = build_detector_graph(config)
    shapes = arch.output_shapes(graph, 1, height, width)
    model = tn.build(config)
    raw, captured = tn.capture(model, torch.zeros(1, 3, height, width))
    for node in graph.nodes:
        if node.name in captured:
            assert shapes[node.name] == tuple(captured[node.name].shape), node.name
    uncaptured = {node.name for node in graph.nodes if node.name not in captured}
    assert uncaptured <= {"output"} | {node.name for node in graph.nodes if node.op == "hard_sigmoid"}
    priors = num_priors(config, width, height)
    assert shapes["head"] == shapes["output"] == tuple(raw.shape) == (1, priors, config.num_outputs)
    levels = level_sizes(config, width, height)
    assert [(1, config.neck_channels, lv.height, lv.width) for lv in levels] == \
        [tuple(captured[f"fpn.{i}"].shape) for i in range(len(levels))] == [shapes[n] for n in level_nodes(config)]


def test_prior_counts():
    assert [tuple(lv) for lv in level_sizes(PLUS, 320, 320)] == [(8, 40, 40), (16, 20, 20), (32, 10, 10), (64, 5, 5)]
    assert [(lv.height, lv.width) for lv in level_sizes(PLUS, 416, 416)] == [(52, 52), (26, 26), (13, 13), (7, 7)]
    assert num_priors(PLUS, 320, 320) == 2125
    assert num_priors(PRESETS["nanodet-plus-m_416"], 416, 416) == 3598
    assert num_priors(LEGACY, 320, 320) == 2100
    assert [(lv.height, lv.width) for lv in level_sizes(LEGACY, 320, 192)] == [(24, 40), (12, 20), (6, 10)]


@pytest.mark.parametrize("name", ["nanodet-plus-m_320", "nanodet-m"])
def test_sizes_the_neck_rejects_fail_in_torch_too(name):
    """A side of 32k-8 or less (here 312 = 39*8) gives odd stride-8 levels: NanoDet's neck fails."""
    config = PRESETS[name]
    with pytest.raises(RefghostError, match="height 312"):
        level_sizes(config, 320, 312)
    model = tn.build(config)
    with pytest.raises(RuntimeError), torch.no_grad():
        model(torch.zeros(1, 3, 312, 320))
    with torch.no_grad():  # 313 = 320 - 7: the ceil halvings give 40, 20, 10 as for 320
        assert model(torch.zeros(1, 3, 313, 320)).shape[1] == num_priors(config, 320, 313) == \
            num_priors(config, 320, 320)


@pytest.mark.parametrize("field, value, match", [
    ("backbone", "resnet", "backbone"),
    ("backbone_width", 0.75, "backbone_width"),
    ("backbone_activation", "Swish", "backbone_activation"),
    ("out_stages", (1, 2), "out_stages"),
    ("neck_channels", 95, "neck_channels"),
    ("num_extra_level", 2, "num_extra_level"),
    ("num_blocks", 2, "num_blocks"),
    ("share_cls_reg", False, "share_cls_reg"),
    ("head_conv_type", "SepConv", "head_conv_type"),
    ("strides", (8, 16, 32), "strides"),
    ("neck", "pan", "num_extra_level"),
])
def test_config_names_the_bad_field(field, value, match):
    with pytest.raises(RefghostError, match=f"DetectorConfig.{match}"):
        dataclasses.replace(PLUS, **{field: value})


def test_component_defaults_and_rules():
    assert DetectorConfig().out_stages == (2, 3, 4)
    assert DetectorConfig(backbone="ghostnet").out_stages == (4, 6, 9)
    with pytest.raises(RefghostError, match="head_kernel_size"):
        dataclasses.replace(LEGACY, head_kernel_size=5)


# --- (3) layer-by-layer parity in float64 ---------------------------------------------------

#: (width, height, batch) of the parity runs: NanoDet's 320, and a small non-square size with a batch of 2.
SIZES = [(320, 320, 1), (160, 96, 2)]


@functools.lru_cache(maxsize=None)
def torch_run(name: str, width: int, height: int, batch: int):
    """The float64 torch model's parameters, every captured tensor and the exported output."""
    torch.set_num_threads(1)  # again: a kernel run earlier in this test may have reset it
    model = tn.randomize(tn.build(COMPOSITIONS[name]), seed=1).double()
    x = np.random.default_rng(7).standard_normal((batch, 3, height, width))
    _, captured = tn.capture(model, x)
    with torch.no_grad():
        exported = model(torch.from_numpy(x), export=True).numpy()
    values = {k: v.numpy() for k, v in captured.items()}
    values.update(se_gates(values))
    values["output"] = exported
    params = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    return x, params, values


def assert_close(name, got, want, rel=REL_TOL_FLOAT64):
    assert got.dtype == np.float64 and got.shape == want.shape, (name, got.dtype, got.shape, want.shape)
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} * {scale:.3g}"


@pytest.mark.parametrize("impl", forward.IMPLS)
@pytest.mark.parametrize("width, height, batch", SIZES)
@pytest.mark.parametrize("name", COMPOSITIONS)
def test_float64_parity_layer_by_layer(name, width, height, batch, impl):
    x, params, want = torch_run(name, width, height, batch)
    graph = build_detector_graph(COMPOSITIONS[name])
    got = forward.execute(graph, params, x, intermediates=True, impl=impl)
    assert set(got) == {n.name for n in graph.nodes}
    assert set(got) <= set(want), sorted(set(got) - set(want))[:5]  # every node has a torch counterpart
    for node_name, value in got.items():
        assert_close(node_name, value, want[node_name])
    assert_close("head", got["head"], want["head"])  # the raw model.forward output
    for i, level in enumerate(level_nodes(COMPOSITIONS[name])):
        assert_close(f"fpn.{i}", got[level], want[f"fpn.{i}"])


@pytest.mark.parametrize("name", COMPOSITIONS)
def test_float32_within_the_derived_bounds(name):
    """float32 runs (both implementations) against the float64 oracle, within
    :func:`refghost.bounds.error_bounds` at every node (the weights and the input are float32
    values, so the oracle computes exactly the float32 network's function)."""
    model = tn.randomize(tn.build(COMPOSITIONS[name]), seed=2)
    params32 = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    x32 = np.random.default_rng(8).standard_normal((1, 3, 64, 96)).astype(np.float32)
    graph = build_detector_graph(COMPOSITIONS[name])
    values, bounds = error_bounds(graph, {k: v.astype(np.float64) for k, v in params32.items()},
                                  x32.astype(np.float64))
    assert set(values) == {node.name for node in graph.nodes}
    for impl in forward.IMPLS:
        got = forward.execute(graph, params32, x32, intermediates=True, impl=impl)
        for node_name, want in values.items():
            assert got[node_name].dtype == np.float32
            excess = np.abs(got[node_name].astype(np.float64) - want) - bounds[node_name]
            assert (excess <= 0).all(), f"{impl} {node_name}: beyond the bound by up to {excess.max():.3g}"


def test_folded_graph_computes_the_same():
    """``folded=True``: each conv+BN pair is one conv (refghost.ops.fold_batch_norm) named as the BN."""
    config = COMPOSITIONS["nanodet-plus-m_320"]
    _, params, _ = torch_run("nanodet-plus-m_320", *SIZES[1])
    x = np.random.default_rng(9).standard_normal((1, 3, 64, 96))
    graph = build_detector_graph(config)
    folded_graph = build_detector_graph(dataclasses.replace(config, folded=True))
    folded = dict(params)
    for conv, bn in zip(graph.nodes, graph.nodes[1:]):
        if conv.op == "conv" and bn.op == "batch_norm" and bn.inputs == (conv.name,):
            p = {role: params[key] for role, key in bn.params.items()}
            w, b = ops.fold_batch_norm(params[conv.params["weight"]], None, p["weight"], p["bias"],
                                       p["running_mean"], p["running_var"])
            folded[conv.params["weight"]], folded[conv.params["weight"][:-len("weight")] + "bias"] = w, b
    assert set(folded_graph.param_shapes) <= set(folded)
    assert all(folded[k].shape == s for k, s in folded_graph.param_shapes.items())
    got = forward.execute(folded_graph, folded, x, impl="kernels")["output"]
    want = forward.execute(graph, params, x, impl="kernels")["output"]
    assert_close("output", got, want)


# --- the ops against PyTorch ----------------------------------------------------------------


@pytest.mark.parametrize("scale", [2.0, 0.5])
@pytest.mark.parametrize("shape", [(1, 96, 5, 5), (2, 16, 10, 7), (1, 3, 9, 4), (1, 8, 40, 40)])
def test_upsample_bilinear_matches_torch(shape, scale):
    """Same sizes, taps and weights as F.interpolate(bilinear, align_corners=False); the values
    within the rounding of a 4-term weighted sum (PyTorch may fuse multiply-adds)."""
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal(shape).astype(dtype)
        y = dops.upsample_bilinear(x, scale)
        t = F.interpolate(torch.from_numpy(x), scale_factor=scale, mode="bilinear").numpy()
        assert y.dtype == dtype and y.shape == t.shape
        assert y.shape[2:] == (dops.upsample_output_size(shape[2], scale), dops.upsample_output_size(shape[3], scale))
        u = np.finfo(dtype).eps / 2
        assert np.all(np.abs(y - t) <= 8 * u * dops.upsample_bilinear(np.abs(x), scale))


def test_max_pool_channel_shuffle_sigmoid_match_torch():
    x = np.random.default_rng(4).standard_normal((2, 12, 11, 8))
    assert np.array_equal(dops.max_pool2d(x, 3, 2, 1), F.max_pool2d(torch.from_numpy(x), 3, 2, 1).numpy())
    shuffled = torch.from_numpy(x).view(2, 3, 4, 11, 8).transpose(1, 2).reshape(2, 12, 11, 8).numpy()
    assert np.array_equal(dops.channel_shuffle(x, 3), shuffled)
    s, t = dops.sigmoid(x), torch.sigmoid(torch.from_numpy(x)).numpy()
    assert np.all(np.abs(s - t) <= 4 * np.finfo(np.float64).eps * t)
    assert dops.sigmoid(np.array([-1000.0, 1000.0], np.float32)).tolist() == [0.0, 1.0]
    head = np.random.default_rng(5).standard_normal((1, 6, 3 + 8))
    out = dops.sigmoid_classes(head, 3)
    assert np.array_equal(out[..., 3:], head[..., 3:]) and np.array_equal(out[..., :3], dops.sigmoid(head[..., :3]))


def test_max_pool_pads_with_minus_infinity():
    x = -np.ones((1, 1, 2, 2), np.float32)
    assert dops.max_pool2d(x, 3, 2, 1).tolist() == [[[[-1.0]]]]
    assert math.isnan(dops.max_pool2d(np.full((1, 1, 2, 2), np.nan), 3, 2, 1)[0, 0, 0, 0])
