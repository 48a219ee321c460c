"""The architecture table and graph: channel rounding, shapes, names, config validation."""

import math

import pytest

from refghost.arch import (FINAL_CONV, HEAD, SE_RATIO, STEM, Config, SqueezeExcite, backbone_activations, blocks,
                           build_graph, ghost_module_parts, make_divisible, output_shapes)
from refghost.errors import RefghostError


@pytest.mark.parametrize("v, expected", [
    (16, 16), (8, 8), (12, 12), (18, 20),  # 18 + 2 = 20 -> 20
    (17.9, 20),  # int(19.9) // 4 * 4 = 16 < 0.9 * 17.9 = 16.11, so + 4
    (2, 4),  # min_value = divisor
    (22.5, 24), (10.0, 12),  # 12 // 4 * 4 = 12
    (15.0, 16),  # int(17) // 4 * 4 = 16
    (13.0, 12),  # int(15) // 4 * 4 = 12 >= 0.9 * 13
    (6.0, 8),
    (72 * 0.25, 20), (120 * 0.25, 32), (480 * 0.25, 120), (672 * 0.25, 168), (960 * 0.25, 240),
])
def test_make_divisible(v, expected):
    assert make_divisible(v) == expected


def test_make_divisible_never_drops_more_than_ten_percent():
    for v in range(1, 2000):
        r = make_divisible(v / 3)
        assert r % 4 == 0 and r >= 0.9 * v / 3


# Stem, stage 0..8 outputs, stage 9 (ghostnet.md section 1.8).
WIDTH_TABLE = {
    0.5: (8, (8, 12, 12, 20, 20, 40, 56, 80, 80), 480),
    0.75: (12, (12, 20, 20, 32, 32, 60, 84, 120, 120), 720),
    1.0: (16, (16, 24, 24, 40, 40, 80, 112, 160, 160), 960),
    1.3: (20, (20, 32, 32, 52, 52, 104, 144, 208, 208), 1248),
    1.5: (24, (24, 36, 36, 60, 60, 120, 168, 240, 240), 1440),
}


@pytest.mark.parametrize("width", sorted(WIDTH_TABLE))
def test_stage_channels_and_strides(width):
    stem, stages, last = WIDTH_TABLE[width]
    graph = build_graph(Config(width=width, out_stages=tuple(range(10))))
    shapes = output_shapes(graph, 1, 320, 320)
    assert shapes["act1"] == (1, stem, 160, 160)
    sizes = (160, 80, 80, 40, 40, 20, 20, 10, 10, 10)
    for s, chs in enumerate(stages + (last,)):
        assert shapes[graph.outputs[f"blocks.{s}"]] == (1, chs, sizes[s], sizes[s]), s


@pytest.mark.parametrize("h, w", [(320, 320), (416, 416), (33, 47), (64, 64), (1, 1)])
def test_output_spatial_sizes(h, w):
    graph = build_graph(Config())
    shapes = output_shapes(graph, 2, h, w)
    for name, halvings in (("blocks.4", 3), ("blocks.6", 4), ("blocks.9", 5)):
        expected_h, expected_w = h, w
        for _ in range(halvings):  # each stride-2 layer (k, p = (k-1)/2): floor((n - 1)/2) + 1
            expected_h, expected_w = (expected_h - 1) // 2 + 1, (expected_w - 1) // 2 + 1
        assert shapes[graph.outputs[name]][2:] == (expected_h, expected_w), name


@pytest.mark.parametrize("width, trainable", [(0.5, 690_612), (0.75, 1_527_026), (1.0, 2_671_428),
                                              (1.3, 4_479_100)])
def test_parameter_counts(width, trainable):
    graph = build_graph(Config(width=width))
    counted = sum(math.prod(s) for k, s in graph.param_shapes.items()
                  if not k.endswith(("running_mean", "running_var")))
    assert counted == trainable
    assert len(graph.param_shapes) == 508 - 80  # the state_dict less num_batches_tracked


def test_classifier_parameter_count_and_keys():
    graph = build_graph(Config(arch="ghostnet", num_classes=1000))
    counted = sum(math.prod(s) for k, s in graph.param_shapes.items()
                  if not k.endswith(("running_mean", "running_var")))
    assert counted == 5_182_508
    assert graph.param_shapes["conv_head.weight"] == (1280, 960, 1, 1)
    assert graph.param_shapes["classifier.weight"] == (1000, 1280)
    assert list(graph.outputs) == ["classifier"]


def test_prelu_adds_34_keys():
    base = build_graph(Config()).param_shapes
    prelu = build_graph(Config(activation="PReLU")).param_shapes
    extra = [k for k in prelu if k not in base]
    assert len(extra) == 34 and all(prelu[k] == (1,) for k in extra)
    assert {"act1.weight", "blocks.9.0.act1.weight", "blocks.3.0.ghost1.primary_conv.2.weight",
            "blocks.3.0.ghost1.cheap_operation.2.weight"} <= set(extra)


def test_names_and_ops_of_one_block():
    graph = build_graph(Config())
    names = [n.name for n in graph.nodes if n.name.startswith("blocks.3.0")]
    assert names == [
        "blocks.3.0.ghost1.primary_conv.0", "blocks.3.0.ghost1.primary_conv.1", "blocks.3.0.ghost1.primary_conv.2",
        "blocks.3.0.ghost1.cheap_operation.0", "blocks.3.0.ghost1.cheap_operation.1",
        "blocks.3.0.ghost1.cheap_operation.2", "blocks.3.0.ghost1",
        "blocks.3.0.conv_dw", "blocks.3.0.bn_dw",
        "blocks.3.0.se.avg_pool", "blocks.3.0.se.conv_reduce", "blocks.3.0.se.act1", "blocks.3.0.se.conv_expand",
        "blocks.3.0.se.gate", "blocks.3.0.se",
        "blocks.3.0.ghost2.primary_conv.0", "blocks.3.0.ghost2.primary_conv.1",
        "blocks.3.0.ghost2.cheap_operation.0", "blocks.3.0.ghost2.cheap_operation.1", "blocks.3.0.ghost2",
        "blocks.3.0.shortcut.0", "blocks.3.0.shortcut.1", "blocks.3.0.shortcut.2", "blocks.3.0.shortcut.3",
        "blocks.3.0",
    ]
    assert graph.node("blocks.3.0.conv_dw").attrs == {"stride": 2, "padding": 2, "groups": 72}
    assert graph.node("blocks.3.0.shortcut.0").attrs == {"stride": 2, "padding": 2, "groups": 24}
    assert graph.node("blocks.3.0.ghost1.cheap_operation.0").attrs == {"stride": 1, "padding": 1, "groups": 36}
    assert graph.node("blocks.3.0").inputs == ("blocks.3.0.ghost2", "blocks.3.0.shortcut.3")
    assert graph.node("blocks.4.0").inputs == ("blocks.4.0.ghost2", "blocks.3.0")  # identity shortcut


@pytest.mark.parametrize("activation", ["LeakyReLU", "GELU", "PReLU"])
def test_activation_placement(activation):
    """The backbone activation sits exactly where NanoDet puts it; the SE keeps ReLU."""
    graph = build_graph(Config(activation=activation))
    acts = {n.name: n.attrs["activation"] for n in graph.nodes if n.op == "act"}
    backbone = {k for k, v in acts.items() if v == activation}
    assert len(backbone) == 1 + 2 * 16 + 1
    assert all(k == "act1" or k == "blocks.9.0.act1" or ".ghost1." in k for k in backbone)
    assert backbone_activations(Config(activation=activation)) == [k for k in acts if k in backbone]
    assert all(v == "ReLU" for k, v in acts.items() if ".se." in k)
    assert not any(".ghost2." in k for k in acts)


def test_out_stages_are_sorted_and_deduplicated():
    graph = build_graph(Config(out_stages=(9, 4, 4, 0)))
    assert list(graph.outputs) == ["blocks.0", "blocks.4", "blocks.9"]
    assert graph.outputs["blocks.9"] == "blocks.9.0.act1"


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "resnet"}, "unknown architecture"),
    ({"width": 0}, "width"),
    ({"width": float("nan")}, "width"),
    ({"activation": "Swish"}, "unknown activation"),
    ({"out_stages": (10,)}, "out_stages"),
    ({"out_stages": ()}, "out_stages"),
    ({"arch": "ghostnet", "num_classes": 0}, "num_classes"),
    ({"arch": "ghostnet", "num_classes": 10, "activation": "SiLU"}, "ReLU"),
    ({"num_classes": 10}, "num_classes"),
])
def test_config_rejects(kwargs, message):
    with pytest.raises(RefghostError, match=message):
        Config(**kwargs)


def test_hardswish_alias():
    assert Config(activation="Hardswish").activation == "HardSwish"


@pytest.mark.parametrize("width", [0.5, 1.0])
def test_block_records_name_exactly_the_parts_the_graph_has(width):
    """arch.blocks lists every GhostBottleneck in forward order, and the parts each record names
    (or leaves None) are the modules the graph has (or lacks) under that block."""
    config = Config(width=width)
    graph = build_graph(config)
    nodes = {n.name: n for n in graph.nodes}
    records = list(blocks(config))
    block_input = "act1"
    assert [b.name for b in records] == [n.name for n in graph.nodes if n.op == "add"]
    for b in records:
        for part, op in ((b.ghost1, "concat"), (b.ghost2, "concat"), (b.conv_dw, "conv"), (b.bn_dw, "batch_norm"),
                         (b.se, "scale"), (b.shortcut and f"{b.shortcut}.0", "conv")):
            if part is not None:
                assert nodes[part].op == op
        for present, part in ((b.conv_dw, "conv_dw"), (b.se, "se"), (b.shortcut, "shortcut.0")):
            assert (present is not None) == (f"{b.name}.{part}" in nodes)
        assert nodes[b.name].inputs == (b.ghost2, f"{b.shortcut}.3" if b.shortcut else block_input)
        assert graph.param_shapes[f"{b.ghost1}.primary_conv.0.weight"][1] == b.in_chs
        assert nodes[b.name].op == "add"
        block_input = b.name
        if b.se:
            reduce_ = graph.param_shapes[f"{b.se}.conv_reduce.weight"]
            assert reduce_ == (b.se_channels, b.mid_chs, 1, 1)
            assert b.se_channels == make_divisible(b.mid_chs * SE_RATIO)


@pytest.mark.parametrize("config", [Config(), Config(activation="PReLU"), Config(arch="ghostnet", num_classes=10)])
def test_name_records_name_every_node_with_its_op(config):
    """STEM, FINAL_CONV, ghost_module_parts, SqueezeExcite, Bottleneck.shortcut_parts and HEAD
    together name every node of the graph exactly once, in order, each with the op it is."""
    graph = build_graph(config)
    named = []  # (name, op)

    def conv_bn(parts):
        named.extend([(parts.conv, "conv"), (parts.bn, "batch_norm")] + ([(parts.act, "act")] if parts.act else []))

    conv_bn(STEM)
    for b in blocks(config):
        for module, activated in ((b.ghost1, True), (b.ghost2, False)):
            if module == b.ghost2 and b.se:
                se = SqueezeExcite(b.se)
                named.extend([(se.avg_pool, "global_avg_pool"), (se.conv_reduce, "conv"), (se.act, "act"),
                              (se.conv_expand, "conv"), (se.gate, "hard_sigmoid"), (b.se, "scale")])
            for parts in ghost_module_parts(module, activated):
                conv_bn(parts)
            named.append((module, "concat"))
            if module == b.ghost1 and b.conv_dw:
                named.extend([(b.conv_dw, "conv"), (b.bn_dw, "batch_norm")])
        for parts in b.shortcut_parts or ():
            conv_bn(parts)
        named.append((b.name, "add"))
    conv_bn(FINAL_CONV)
    if config.arch == "ghostnet":
        named += [(HEAD.pool, "global_avg_pool"), (HEAD.conv, "conv"), (HEAD.act, "act"), (HEAD.classifier, "linear")]
    assert named == [(n.name, n.op) for n in graph.nodes]

