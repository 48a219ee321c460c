"""Checks that tests/torch_ghostnet.py (the PyTorch cross-check model) matches GhostNet as NanoDet
and Huawei publish it (the sources cited in tests/torch_ghostnet.py; docs/architecture.md): key
names/shapes/order (the table APPENDIX_A below), parameter totals, channel/width tables,
activations, forward semantics and the helper functions randomize / capture / state_dict_numpy.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import torch_ghostnet as tg
except ModuleNotFoundError:  # e.g. if tests/ becomes a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch_ghostnet as tg


# ------------------------------------------------------------------------------------------
# Spec tables, transcribed
# ------------------------------------------------------------------------------------------

# Every conv/BN module at width 1.0 in state_dict order (NanoDet's registration order).
# "name AxBxCxD" is a Conv2d weight shape (suffix "+b": also a bias [A]); "name C" is a BN(C).
APPENDIX_A = """
conv_stem 16x3x3x3
bn1 16
blocks.0.0.ghost1.primary_conv.0 8x16x1x1
blocks.0.0.ghost1.primary_conv.1 8
blocks.0.0.ghost1.cheap_operation.0 8x1x3x3
blocks.0.0.ghost1.cheap_operation.1 8
blocks.0.0.ghost2.primary_conv.0 8x16x1x1
blocks.0.0.ghost2.primary_conv.1 8
blocks.0.0.ghost2.cheap_operation.0 8x1x3x3
blocks.0.0.ghost2.cheap_operation.1 8
blocks.1.0.ghost1.primary_conv.0 24x16x1x1
blocks.1.0.ghost1.primary_conv.1 24
blocks.1.0.ghost1.cheap_operation.0 24x1x3x3
blocks.1.0.ghost1.cheap_operation.1 24
blocks.1.0.conv_dw 48x1x3x3
blocks.1.0.bn_dw 48
blocks.1.0.ghost2.primary_conv.0 12x48x1x1
blocks.1.0.ghost2.primary_conv.1 12
blocks.1.0.ghost2.cheap_operation.0 12x1x3x3
blocks.1.0.ghost2.cheap_operation.1 12
blocks.1.0.shortcut.0 16x1x3x3
blocks.1.0.shortcut.1 16
blocks.1.0.shortcut.2 24x16x1x1
blocks.1.0.shortcut.3 24
blocks.2.0.ghost1.primary_conv.0 36x24x1x1
blocks.2.0.ghost1.primary_conv.1 36
blocks.2.0.ghost1.cheap_operation.0 36x1x3x3
blocks.2.0.ghost1.cheap_operation.1 36
blocks.2.0.ghost2.primary_conv.0 12x72x1x1
blocks.2.0.ghost2.primary_conv.1 12
blocks.2.0.ghost2.cheap_operation.0 12x1x3x3
blocks.2.0.ghost2.cheap_operation.1 12
blocks.3.0.ghost1.primary_conv.0 36x24x1x1
blocks.3.0.ghost1.primary_conv.1 36
blocks.3.0.ghost1.cheap_operation.0 36x1x3x3
blocks.3.0.ghost1.cheap_operation.1 36
blocks.3.0.conv_dw 72x1x5x5
blocks.3.0.bn_dw 72
blocks.3.0.se.conv_reduce 20x72x1x1+b
blocks.3.0.se.conv_expand 72x20x1x1+b
blocks.3.0.ghost2.primary_conv.0 20x72x1x1
blocks.3.0.ghost2.primary_conv.1 20
blocks.3.0.ghost2.cheap_operation.0 20x1x3x3
blocks.3.0.ghost2.cheap_operation.1 20
blocks.3.0.shortcut.0 24x1x5x5
blocks.3.0.shortcut.1 24
blocks.3.0.shortcut.2 40x24x1x1
blocks.3.0.shortcut.3 40
blocks.4.0.ghost1.primary_conv.0 60x40x1x1
blocks.4.0.ghost1.primary_conv.1 60
blocks.4.0.ghost1.cheap_operation.0 60x1x3x3
blocks.4.0.ghost1.cheap_operation.1 60
blocks.4.0.se.conv_reduce 32x120x1x1+b
blocks.4.0.se.conv_expand 120x32x1x1+b
blocks.4.0.ghost2.primary_conv.0 20x120x1x1
blocks.4.0.ghost2.primary_conv.1 20
blocks.4.0.ghost2.cheap_operation.0 20x1x3x3
blocks.4.0.ghost2.cheap_operation.1 20
blocks.5.0.ghost1.primary_conv.0 120x40x1x1
blocks.5.0.ghost1.primary_conv.1 120
blocks.5.0.ghost1.cheap_operation.0 120x1x3x3
blocks.5.0.ghost1.cheap_operation.1 120
blocks.5.0.conv_dw 240x1x3x3
blocks.5.0.bn_dw 240
blocks.5.0.ghost2.primary_conv.0 40x240x1x1
blocks.5.0.ghost2.primary_conv.1 40
blocks.5.0.ghost2.cheap_operation.0 40x1x3x3
blocks.5.0.ghost2.cheap_operation.1 40
blocks.5.0.shortcut.0 40x1x3x3
blocks.5.0.shortcut.1 40
blocks.5.0.shortcut.2 80x40x1x1
blocks.5.0.shortcut.3 80
blocks.6.0.ghost1.primary_conv.0 100x80x1x1
blocks.6.0.ghost1.primary_conv.1 100
blocks.6.0.ghost1.cheap_operation.0 100x1x3x3
blocks.6.0.ghost1.cheap_operation.1 100
blocks.6.0.ghost2.primary_conv.0 40x200x1x1
blocks.6.0.ghost2.primary_conv.1 40
blocks.6.0.ghost2.cheap_operation.0 40x1x3x3
blocks.6.0.ghost2.cheap_operation.1 40
blocks.6.1.ghost1.primary_conv.0 92x80x1x1
blocks.6.1.ghost1.primary_conv.1 92
blocks.6.1.ghost1.cheap_operation.0 92x1x3x3
blocks.6.1.ghost1.cheap_operation.1 92
blocks.6.1.ghost2.primary_conv.0 40x184x1x1
blocks.6.1.ghost2.primary_conv.1 40
blocks.6.1.ghost2.cheap_operation.0 40x1x3x3
blocks.6.1.ghost2.cheap_operation.1 40
blocks.6.2.ghost1.primary_conv.0 92x80x1x1
blocks.6.2.ghost1.primary_conv.1 92
blocks.6.2.ghost1.cheap_operation.0 92x1x3x3
blocks.6.2.ghost1.cheap_operation.1 92
blocks.6.2.ghost2.primary_conv.0 40x184x1x1
blocks.6.2.ghost2.primary_conv.1 40
blocks.6.2.ghost2.cheap_operation.0 40x1x3x3
blocks.6.2.ghost2.cheap_operation.1 40
blocks.6.3.ghost1.primary_conv.0 240x80x1x1
blocks.6.3.ghost1.primary_conv.1 240
blocks.6.3.ghost1.cheap_operation.0 240x1x3x3
blocks.6.3.ghost1.cheap_operation.1 240
blocks.6.3.se.conv_reduce 120x480x1x1+b
blocks.6.3.se.conv_expand 480x120x1x1+b
blocks.6.3.ghost2.primary_conv.0 56x480x1x1
blocks.6.3.ghost2.primary_conv.1 56
blocks.6.3.ghost2.cheap_operation.0 56x1x3x3
blocks.6.3.ghost2.cheap_operation.1 56
blocks.6.3.shortcut.0 80x1x3x3
blocks.6.3.shortcut.1 80
blocks.6.3.shortcut.2 112x80x1x1
blocks.6.3.shortcut.3 112
blocks.6.4.ghost1.primary_conv.0 336x112x1x1
blocks.6.4.ghost1.primary_conv.1 336
blocks.6.4.ghost1.cheap_operation.0 336x1x3x3
blocks.6.4.ghost1.cheap_operation.1 336
blocks.6.4.se.conv_reduce 168x672x1x1+b
blocks.6.4.se.conv_expand 672x168x1x1+b
blocks.6.4.ghost2.primary_conv.0 56x672x1x1
blocks.6.4.ghost2.primary_conv.1 56
blocks.6.4.ghost2.cheap_operation.0 56x1x3x3
blocks.6.4.ghost2.cheap_operation.1 56
blocks.7.0.ghost1.primary_conv.0 336x112x1x1
blocks.7.0.ghost1.primary_conv.1 336
blocks.7.0.ghost1.cheap_operation.0 336x1x3x3
blocks.7.0.ghost1.cheap_operation.1 336
blocks.7.0.conv_dw 672x1x5x5
blocks.7.0.bn_dw 672
blocks.7.0.se.conv_reduce 168x672x1x1+b
blocks.7.0.se.conv_expand 672x168x1x1+b
blocks.7.0.ghost2.primary_conv.0 80x672x1x1
blocks.7.0.ghost2.primary_conv.1 80
blocks.7.0.ghost2.cheap_operation.0 80x1x3x3
blocks.7.0.ghost2.cheap_operation.1 80
blocks.7.0.shortcut.0 112x1x5x5
blocks.7.0.shortcut.1 112
blocks.7.0.shortcut.2 160x112x1x1
blocks.7.0.shortcut.3 160
blocks.8.0.ghost1.primary_conv.0 480x160x1x1
blocks.8.0.ghost1.primary_conv.1 480
blocks.8.0.ghost1.cheap_operation.0 480x1x3x3
blocks.8.0.ghost1.cheap_operation.1 480
blocks.8.0.ghost2.primary_conv.0 80x960x1x1
blocks.8.0.ghost2.primary_conv.1 80
blocks.8.0.ghost2.cheap_operation.0 80x1x3x3
blocks.8.0.ghost2.cheap_operation.1 80
blocks.8.1.ghost1.primary_conv.0 480x160x1x1
blocks.8.1.ghost1.primary_conv.1 480
blocks.8.1.ghost1.cheap_operation.0 480x1x3x3
blocks.8.1.ghost1.cheap_operation.1 480
blocks.8.1.se.conv_reduce 240x960x1x1+b
blocks.8.1.se.conv_expand 960x240x1x1+b
blocks.8.1.ghost2.primary_conv.0 80x960x1x1
blocks.8.1.ghost2.primary_conv.1 80
blocks.8.1.ghost2.cheap_operation.0 80x1x3x3
blocks.8.1.ghost2.cheap_operation.1 80
blocks.8.2.ghost1.primary_conv.0 480x160x1x1
blocks.8.2.ghost1.primary_conv.1 480
blocks.8.2.ghost1.cheap_operation.0 480x1x3x3
blocks.8.2.ghost1.cheap_operation.1 480
blocks.8.2.ghost2.primary_conv.0 80x960x1x1
blocks.8.2.ghost2.primary_conv.1 80
blocks.8.2.ghost2.cheap_operation.0 80x1x3x3
blocks.8.2.ghost2.cheap_operation.1 80
blocks.8.3.ghost1.primary_conv.0 480x160x1x1
blocks.8.3.ghost1.primary_conv.1 480
blocks.8.3.ghost1.cheap_operation.0 480x1x3x3
blocks.8.3.ghost1.cheap_operation.1 480
blocks.8.3.se.conv_reduce 240x960x1x1+b
blocks.8.3.se.conv_expand 960x240x1x1+b
blocks.8.3.ghost2.primary_conv.0 80x960x1x1
blocks.8.3.ghost2.primary_conv.1 80
blocks.8.3.ghost2.cheap_operation.0 80x1x3x3
blocks.8.3.ghost2.cheap_operation.1 80
blocks.9.0.conv 960x160x1x1
blocks.9.0.bn1 960
"""

# Section 1.8 width table: width | stem | stage 0..8 outputs | stage 9 | mid channels per block.
WIDTH_TABLE = """
0.5  | 8  | 8,12,12,20,20,40,56,80,80          | 480  | 8,24,36,36,60,120,100,92,92,240,336,336,480x4
0.75 | 12 | 12,20,20,32,32,60,84,120,120       | 720  | 12,36,56,56,92,180,152,140,140,360,504,504,720x4
1.0  | 16 | 16,24,24,40,40,80,112,160,160      | 960  | 16,48,72,72,120,240,200,184,184,480,672,672,960x4
1.3  | 20 | 20,32,32,52,52,104,144,208,208     | 1248 | 20,64,92,92,156,312,260,240,240,624,872,872,1248x4
1.5  | 24 | 24,36,36,60,60,120,168,240,240     | 1440 | 24,72,108,108,180,360,300,276,276,720,1008,1008,1440x4
"""

# Section 2.3: trainable parameters per block at width 1.0 ("stem" = conv_stem + bn1).
BLOCK_PARAMS = """
stem 464
blocks.0.0 464
blocks.1.0 2564
blocks.2.0 2352
blocks.3.0 9636
blocks.4.0 13672
blocks.5.0 22920
blocks.6.0 17820
blocks.6.1 16436
blocks.6.2 16436
blocks.6.3 175792
blocks.6.4 306992
blocks.7.0 362840
blocks.8.0 160880
blocks.8.1 622880
blocks.8.2 160880
blocks.8.3 622880
blocks.9.0 155520
"""

# Section 1.4: SE reduced channels at width 1.0 (mid -> rd).
SE_TABLE = {72: 20, 120: 32, 480: 120, 672: 168, 960: 240}

BLOCK_NAMES = [
    "blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.4.0", "blocks.5.0",
    "blocks.6.0", "blocks.6.1", "blocks.6.2", "blocks.6.3", "blocks.6.4", "blocks.7.0",
    "blocks.8.0", "blocks.8.1", "blocks.8.2", "blocks.8.3",
]
ACT_NAMES = ["ReLU", "LeakyReLU", "ReLU6", "SELU", "ELU", "GELU", "PReLU", "SiLU", "HardSwish", "Hardswish"]
ACT_TYPES = {
    "ReLU": nn.ReLU, "LeakyReLU": nn.LeakyReLU, "ReLU6": nn.ReLU6, "SELU": nn.SELU, "ELU": nn.ELU,
    "GELU": nn.GELU, "PReLU": nn.PReLU, "SiLU": nn.SiLU, "HardSwish": nn.Hardswish, "Hardswish": nn.Hardswish,
}
# Section 0.3 / 2.2: the 34 places where the backbone activation is applied.
ACT_POSITIONS = (
    ["act1"]
    + [f"{b}.ghost1.{br}.2" for b in BLOCK_NAMES for br in ("primary_conv", "cheap_operation")]
    + ["blocks.9.0.act1"]
)
HEAD_KEYS = {
    "conv_head.weight": (1280, 960, 1, 1), "conv_head.bias": (1280,),
    "classifier.weight": (1000, 1280), "classifier.bias": (1000,),
}


def parse_appendix_a() -> list[tuple[str, tuple[int, ...]]]:
    keys: list[tuple[str, tuple[int, ...]]] = []
    for line in APPENDIX_A.strip().splitlines():
        name, shape = line.split()
        if "x" in shape:
            bias = shape.endswith("+b")
            dims = tuple(int(d) for d in shape.removesuffix("+b").split("x"))
            keys.append((f"{name}.weight", dims))
            if bias:
                keys.append((f"{name}.bias", (dims[0],)))
        else:
            c = int(shape)
            keys += [(f"{name}.{p}", (c,)) for p in ("weight", "bias", "running_mean", "running_var")]
            keys.append((f"{name}.num_batches_tracked", ()))
    return keys


def parse_width_table() -> dict[float, dict]:
    rows = {}
    for line in WIDTH_TABLE.strip().splitlines():
        w, stem, outs, s9, mids = (c.strip() for c in line.split("|"))
        mid_list: list[int] = []
        for item in mids.split(","):
            if "x" in item:
                v, n = item.split("x")
                mid_list += [int(v)] * int(n)
            else:
                mid_list.append(int(item))
        rows[float(w)] = {
            "stem": int(stem), "outs": [int(v) for v in outs.split(",")] + [int(s9)], "mids": mid_list,
        }
    return rows


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def spatial(size: int, n_stride2: int) -> int:
    # every strided layer: k, stride 2, padding (k-1)//2  ->  floor((H-1)/2)+1
    for _ in range(n_stride2):
        size = (size - 1) // 2 + 1
    return size


# Number of stride-2 layers up to and including each stage (stem counts as one).
STRIDE2_UPTO = [1, 2, 2, 3, 3, 4, 4, 5, 5, 5]


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(123))


# ------------------------------------------------------------------------------------------
# State dict / parameter counts
# ------------------------------------------------------------------------------------------

def test_state_dict_totals_width_1():
    m = tg.build()
    sd = m.state_dict()
    assert len(sd) == 508
    assert n_params(m) == 2_671_428
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(convs) == 94 and sum(c.bias is not None for c in convs) == 14 and len(bns) == 80
    float_buffers = sum(v.numel() for k, v in sd.items() if k.endswith(("running_mean", "running_var")))
    assert float_buffers == 21_968
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 80


@pytest.mark.parametrize("width,expected", [(0.5, 690_612), (0.75, 1_527_026), (1.0, 2_671_428), (1.3, 4_479_100)])
def test_param_counts_by_width(width, expected):
    assert n_params(tg.build(width=width)) == expected


def test_out_stages_do_not_change_state_dict():
    a = tg.build(out_stages=(4, 6, 9)).state_dict()
    b = tg.build(out_stages=(0, 1, 2, 3)).state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


def test_appendix_a_every_key_shape_and_order():
    expected = parse_appendix_a()
    assert len(expected) == 508
    sd = tg.build().state_dict()
    assert [k for k, _ in expected] == list(sd)  # identical names in identical (state_dict) order
    for key, shape in expected:
        assert tuple(sd[key].shape) == shape, key


def test_per_block_param_table():
    m = tg.build()
    mods = dict(m.named_modules())
    total = 0
    for line in BLOCK_PARAMS.strip().splitlines():
        name, count = line.split()
        if name == "stem":
            got = n_params(m.conv_stem) + n_params(m.bn1)
        else:
            got = n_params(mods[name])
        assert got == int(count), name
        total += got
    assert total == 2_671_428


def test_prelu_adds_34_keys():
    relu_sd = tg.build().state_dict()
    m = tg.build(activation="PReLU")
    sd = m.state_dict()
    extra = [k for k in sd if k not in relu_sd]
    assert len(sd) == 508 + 34 and len(extra) == 34
    assert set(extra) == {f"{p}.weight" for p in ACT_POSITIONS}
    assert all(tuple(sd[k].shape) == (1,) for k in extra)
    assert n_params(m) == 2_671_428 + 34
    # loading ReLU (Huawei-layout) weights with strict=False leaves exactly the PReLU weights missing
    res = m.load_state_dict(relu_sd, strict=False)
    assert set(res.missing_keys) == set(extra) and not res.unexpected_keys
    assert all(float(sd[k]) == pytest.approx(0.25) for k in extra)  # nn.PReLU() default init


# ------------------------------------------------------------------------------------------
# Channel / width / shape tables
# ------------------------------------------------------------------------------------------

def test_make_divisible():
    assert [tg.make_divisible(16 * w, 4) for w in (0.5, 0.75, 1.0, 1.3, 1.5)] == [8, 12, 16, 20, 24]
    assert tg.make_divisible(72 * 0.25, 4) == 20  # 18 -> int(20)//4*4 = 20
    assert tg.make_divisible(3, 4) == 4  # min_value = divisor
    assert tg.make_divisible(184 * 0.75, 4) == 140  # 138 -> 140
    assert tg.make_divisible(11, 8) == 16  # 8 < 0.9*11 -> +8


@pytest.mark.parametrize("width", [0.5, 0.75, 1.0, 1.3, 1.5])
def test_width_table_channels(width, x64):
    row = parse_width_table()[width]
    m = tg.build(width=width, out_stages=range(10))
    assert m.conv_stem.out_channels == row["stem"]
    blocks = [m.blocks[s][i] for s in range(9) for i in range(len(m.blocks[s]))]
    assert len(blocks) == 16
    mids = [2 * b.ghost1.primary_conv[0].out_channels for b in blocks]
    assert mids == row["mids"]
    assert m.blocks[9][0].conv.out_channels == row["outs"][9]
    # NanoDet's own backbone test: all 10 stages on a 64x64 input (widths 1.0/0.75 confirmed there);
    # the computed-only widths run on 32x32 to keep the suite fast
    size = 64 if width in (1.0, 0.75) else 32
    with torch.no_grad():
        outs = m(x64[:1, :, :size, :size])
    assert len(outs) == 10
    for i, o in enumerate(outs):
        s = spatial(size, STRIDE2_UPTO[i])
        assert tuple(o.shape) == (1, row["outs"][i], s, s), i


@pytest.mark.parametrize("size,expected", [
    (320, [(1, 40, 40, 40), (1, 112, 20, 20), (1, 960, 10, 10)]),
    (416, [(1, 40, 52, 52), (1, 112, 26, 26), (1, 960, 13, 13)]),
])
def test_default_output_shapes(size, expected):
    m = tg.build()
    with torch.no_grad():
        outs = m(torch.zeros(1, 3, size, size))
    assert isinstance(outs, tuple)
    assert [tuple(o.shape) for o in outs] == expected


@pytest.mark.parametrize("size,sides", [(320, [160, 80, 40, 20, 10]), (416, [208, 104, 52, 26, 13])])
def test_spatial_sizes(size, sides):
    assert [spatial(size, n) for n in range(1, 6)] == sides


def test_se_reduced_channels():
    m = tg.build()
    seen = {}
    for name, mod in m.named_modules():
        if isinstance(mod, tg.SqueezeExcite):
            mid = mod.conv_reduce.in_channels
            seen[mid] = mod.conv_reduce.out_channels
            assert mod.conv_expand.in_channels == seen[mid] and mod.conv_expand.out_channels == mid
    assert seen == SE_TABLE
    assert {mid: tg.make_divisible(mid * 0.25, 4) for mid in SE_TABLE} == SE_TABLE
    se_blocks = [n.removesuffix(".se") for n, mod in m.named_modules() if isinstance(mod, tg.SqueezeExcite)]
    assert se_blocks == ["blocks.3.0", "blocks.4.0", "blocks.6.3", "blocks.6.4", "blocks.7.0", "blocks.8.1", "blocks.8.3"]


def test_block_structure():
    m = tg.build()
    mods = dict(m.named_modules())
    stride2 = {"blocks.1.0", "blocks.3.0", "blocks.5.0", "blocks.7.0"}
    conv_sc = stride2 | {"blocks.6.3"}
    for b in BLOCK_NAMES:
        blk = mods[b]
        assert hasattr(blk, "conv_dw") == (b in stride2), b
        assert len(blk.shortcut) == (4 if b in conv_sc else 0), b
        # the cheap operation is always a 3x3 depthwise conv, whatever the block's k
        for g in (blk.ghost1, blk.ghost2):
            cheap = g.cheap_operation[0]
            assert cheap.kernel_size == (3, 3) and cheap.groups == cheap.in_channels
        # ghost2 is linear: empty Sequential in both branches
        for br in (blk.ghost2.primary_conv[2], blk.ghost2.cheap_operation[2]):
            assert type(br) is nn.Sequential and len(br) == 0
        if b in stride2:
            k = blk.conv_dw.kernel_size[0]
            assert blk.conv_dw.padding == ((k - 1) // 2,) * 2 and blk.conv_dw.stride == (2, 2)
            assert blk.shortcut[0].kernel_size == (k, k)  # the shortcut dw uses the block's k
    # registration order inside a stride-2 SE block
    assert [n for n, _ in mods["blocks.3.0"].named_children()] == ["ghost1", "conv_dw", "bn_dw", "se", "ghost2", "shortcut"]
    assert [n for n, _ in m.named_children()] == ["conv_stem", "bn1", "act1", "blocks"]
    assert [n for n, _ in mods["blocks.3.0.se"].named_children()] == ["avg_pool", "conv_reduce", "act1", "conv_expand"]
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        assert bn.eps == 1e-5 and bn.momentum == 0.1 and bn.affine and bn.track_running_stats


# ------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ACT_NAMES)
def test_activation_placement(act, x64):
    m = tg.build(activation=act)
    mods = dict(m.named_modules())
    for pos in ACT_POSITIONS:
        assert type(mods[pos]) is ACT_TYPES[act], pos
    # the SE always uses ReLU internally
    for name, mod in mods.items():
        if isinstance(mod, tg.SqueezeExcite):
            assert type(mod.act1) is nn.ReLU, name
    # no other activation modules anywhere (nothing after bn_dw, the residual add or ghost2)
    act_classes = tuple(set(ACT_TYPES.values()))
    found = {n for n, mod in mods.items() if isinstance(mod, act_classes) and not n.endswith("se.act1")}
    assert found == set(ACT_POSITIONS)
    if act == "LeakyReLU":
        assert all(mods[p].negative_slope == 0.1 for p in ACT_POSITIONS)
    if act == "GELU":
        assert mods["act1"].approximate == "none"
    if act == "ELU":
        assert mods["act1"].alpha == 1.0
    with torch.no_grad():
        outs = m(x64[:1, :, :32, :32])
    assert all(torch.isfinite(o).all() for o in outs)


def test_leaky_relu_slope_is_0_1_numerically():
    m = tg.randomize(tg.build(activation="LeakyReLU").double(), 3)
    _, inter = tg.capture(m, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    bn = inter["bn1"]
    assert (bn < 0).any()
    torch.testing.assert_close(inter["act1"], torch.where(bn > 0, bn, 0.1 * bn), rtol=0, atol=0)


def test_unknown_activation_and_bad_out_stages():
    with pytest.raises(ValueError):
        tg.build(activation="Swish")
    with pytest.raises(AssertionError):
        tg.build(out_stages=(11, 12))
    with pytest.raises(ValueError):
        tg.build(arch="timm")


def test_build_is_eval_mode():
    for arch in ("nanodet", "ghostnet"):
        m = tg.build(arch)
        assert not any(mod.training for mod in m.modules())


def test_out_stages_returned_in_ascending_order(x64):
    ref = tg.randomize(tg.build(out_stages=(4, 6, 9)), 5)
    shuffled = tg.randomize(tg.build(out_stages=(9, 4, 6)), 5)
    with torch.no_grad():
        a, b = ref(x64), shuffled(x64)
    assert [o.shape[1] for o in b] == [40, 112, 960]
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    single = tg.build(out_stages=[6])
    with torch.no_grad():
        (o,) = single(x64)
    assert o.shape == (2, 112, 4, 4)


# ------------------------------------------------------------------------------------------
# Huawei "ghostnet" classifier
# ------------------------------------------------------------------------------------------

def test_ghostnet_arch_keys_and_params():
    h = tg.build("ghostnet")
    sd = h.state_dict()
    assert len(sd) == 512 and n_params(h) == 5_182_508
    backbone = list(tg.build().state_dict())
    assert list(sd)[:508] == backbone
    assert {k: tuple(v.shape) for k, v in list(sd.items())[508:]} == HEAD_KEYS
    assert [n for n, _ in h.named_children()] == [
        "conv_stem", "bn1", "act1", "blocks", "global_pool", "conv_head", "act2", "classifier"]
    assert n_params(h) - n_params(tg.build()) == 1_230_080 + 1_281_000


def test_ghostnet_arch_width_and_classes(x64):
    h = tg.build("ghostnet", width=0.5, num_classes=10)
    assert h.conv_head.in_channels == 480 and h.conv_head.out_channels == 1280  # 1280 does not scale
    assert h.classifier.in_features == 1280 and h.classifier.out_features == 10
    with torch.no_grad():
        assert h(x64).shape == (2, 10)


def test_ghostnet_arch_ignores_activation_and_slices():
    h = tg.build("ghostnet", activation="LeakyReLU")
    acts = [mod for mod in h.modules() if isinstance(mod, tuple(set(ACT_TYPES.values())))]
    assert acts and all(type(a) is nn.ReLU for a in acts)
    assert all(g.slice_output for g in h.modules() if isinstance(g, tg.GhostModule))
    assert not any(g.slice_output for g in tg.build().modules() if isinstance(g, tg.GhostModule))


def test_ghostnet_backbone_equals_nanodet_relu_and_head(x64):
    nano = tg.randomize(tg.build(out_stages=range(10)).double(), 11)
    h = tg.randomize(tg.build("ghostnet").double(), 12)
    res = h.load_state_dict(nano.state_dict(), strict=False)
    assert set(res.missing_keys) == set(HEAD_KEYS) and not res.unexpected_keys
    x = x64.double()
    with torch.no_grad():
        nano_outs = nano(x)
    logits, inter = tg.capture(h, x)
    for i in range(10):
        assert torch.equal(inter[f"blocks.{i}"], nano_outs[i]), i  # the slice is a no-op here
    feat = nano_outs[9].mean((2, 3))
    hid = F.relu(feat @ h.conv_head.weight[:, :, 0, 0].T + h.conv_head.bias)
    torch.testing.assert_close(logits, hid @ h.classifier.weight.T + h.classifier.bias)
    assert logits.shape == (2, 1000)
    with torch.no_grad():
        assert torch.equal(h(x), logits)  # dropout is a no-op in eval mode


def test_ghost_module_slice_only_in_huawei_variant():
    x = torch.randn(1, 8, 5, 5)
    nano = tg.GhostModule(8, 5).eval()
    hua = tg.GhostModule(8, 5, slice_output=True).eval()
    hua.load_state_dict(nano.state_dict())
    with torch.no_grad():
        a, b = nano(x), hua(x)
    assert a.shape[1] == 6 and b.shape[1] == 5  # 2*ceil(5/2) vs oup
    assert torch.equal(a[:, :5], b)
    assert tuple(nano.cheap_operation[0].weight.shape) == (3, 1, 3, 3)


# ------------------------------------------------------------------------------------------
# Forward semantics, checked through capture() (float64)
# ------------------------------------------------------------------------------------------

def _bn(x, bn):
    invstd = 1.0 / torch.sqrt(bn.running_var + bn.eps)  # PyTorch's eval-mode BatchNorm2d, as alpha and beta
    alpha = invstd * bn.weight
    beta = bn.bias - bn.running_mean * alpha
    return x * alpha[None, :, None, None] + beta[None, :, None, None]


@pytest.fixture(scope="module")
def traced():
    m = tg.randomize(tg.build(activation="LeakyReLU", out_stages=range(10)).double(), 7)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    out, inter = tg.capture(m, x)
    return m, x, out, inter


def test_stem_semantics(traced):
    m, x, _, inter = traced
    # float64, sums of n <= 1441 terms in different orders: off by at most n * 2^-53 < 2e-13 of the
    # sum of |terms| (all O(1) here), so 1e-12 admits any order and nothing else.
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # noqa: E731
    with torch.no_grad():
        close(inter["conv_stem"], F.conv2d(x, m.conv_stem.weight, stride=2, padding=1))
        close(inter["bn1"], _bn(inter["conv_stem"], m.bn1))
        c9 = F.conv2d(inter["blocks.8"], m.blocks[9][0].conv.weight)
        close(inter["blocks.9.0"], F.leaky_relu(_bn(c9, m.blocks[9][0].bn1), 0.1))


@pytest.mark.parametrize("block", BLOCK_NAMES)
def test_block_semantics(traced, block):
    m, _, _, inter = traced
    mods = dict(m.named_modules())
    blk = mods[block]
    # float64, sums of n <= 1441 terms in different orders: off by at most n * 2^-53 < 2e-13 of the
    # sum of |terms| (all O(1) here), so 1e-12 admits any order and nothing else.
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # noqa: E731
    names = list(inter)
    prev = names[names.index(f"{block}.ghost1.primary_conv.0") - 1]  # output of the previous module
    x_in = inter[prev]
    with torch.no_grad():
        for g in ("ghost1", "ghost2"):
            p, c = inter[f"{block}.{g}.primary_conv"], inter[f"{block}.{g}.cheap_operation"]
            close(inter[f"{block}.{g}"], torch.cat([p, c], 1))  # no slice, primary first
            prim = inter[f"{block}.{g}.primary_conv.1"]
            w = mods[f"{block}.{g}.cheap_operation.0"].weight
            # depthwise 3x3 on the primary output (after its activation, if any)
            close(inter[f"{block}.{g}.cheap_operation.0"], F.conv2d(p, w, padding=1, groups=p.shape[1]))
            if g == "ghost2":
                assert torch.equal(p, prim)  # linear: empty Sequential
        y = inter[f"{block}.ghost1"]
        if hasattr(blk, "conv_dw"):
            y = inter[f"{block}.bn_dw"]
            assert (y < 0).any()  # no activation after bn_dw
        if blk.se is not None:
            close(inter[f"{block}.se.avg_pool"], y.mean((2, 3), keepdim=True))
            gate = F.relu6(inter[f"{block}.se.conv_expand"] + 3.0) / 6.0
            close(inter[f"{block}.se"], y * gate)
            r = inter[f"{block}.se.conv_reduce"]
            assert torch.equal(inter[f"{block}.se.act1"], F.relu(r))  # ReLU, even with LeakyReLU backbone
            y = inter[f"{block}.se"]
        close(inter[f"{block}.ghost2.primary_conv.0"], F.conv2d(y, mods[f"{block}.ghost2.primary_conv.0"].weight))
        sc = inter[f"{block}.shortcut"]
        if len(blk.shortcut) == 0:
            assert torch.equal(sc, x_in)
        close(inter[block], inter[f"{block}.ghost2"] + sc)  # x += shortcut(residual), no act after
        assert (inter[block] < 0).any()


# ------------------------------------------------------------------------------------------
# capture()
# ------------------------------------------------------------------------------------------

def test_capture_names_and_order(x64):
    m = tg.randomize(tg.build(), 0)
    out, inter = tg.capture(m, x64)
    names = list(inter)
    # every called submodule fires, root excluded; NanoDet's forward indexes blocks[i] itself, so the
    # outer `blocks` container is never called (Huawei's classifier calls self.blocks(x) and has it)
    assert set(names) == {n for n, _ in m.named_modules() if n} - {"blocks"}
    for required in ("blocks.3.0.se.conv_reduce", "blocks.3.0.ghost1.primary_conv.1",
                     "blocks.3.0.se.avg_pool", "blocks.0.0.shortcut", "blocks.9.0.act1", "act1"):
        assert required in inter
    assert names[:3] == ["conv_stem", "bn1", "act1"] and names[-1] == "blocks.9"
    idx = {n: i for i, n in enumerate(names)}
    for n in names:  # children fire before their parent
        if "." in n and n.rsplit(".", 1)[0] in idx:
            assert idx[n.rsplit(".", 1)[0]] > idx[n], n
    seq = ["blocks.3.0.ghost1.primary_conv.0", "blocks.3.0.ghost1.primary_conv.1", "blocks.3.0.ghost1.primary_conv.2",
           "blocks.3.0.ghost1.cheap_operation.0", "blocks.3.0.ghost1", "blocks.3.0.conv_dw", "blocks.3.0.bn_dw",
           "blocks.3.0.se.avg_pool", "blocks.3.0.se.conv_reduce", "blocks.3.0.se.act1", "blocks.3.0.se.conv_expand",
           "blocks.3.0.se", "blocks.3.0.ghost2", "blocks.3.0.shortcut.0", "blocks.3.0.shortcut", "blocks.3.0"]
    assert [idx[s] for s in seq] == sorted(idx[s] for s in seq)
    assert inter["blocks.3.0.se.conv_reduce"].shape == (2, 20, 1, 1)
    assert inter["blocks.3.0.ghost1.primary_conv.1"].shape == (2, 36, 16, 16)
    with torch.no_grad():
        again = m(x64)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert torch.equal(out[2], inter["blocks.9"])
    _, inter_h = tg.capture(tg.build("ghostnet"), x64)
    assert list(inter_h)[-5:] == ["blocks", "global_pool", "conv_head", "act2", "classifier"]
    assert not any(mod._forward_hooks for mod in m.modules())  # hooks removed
    # numpy input is converted to the model's dtype
    out_np, _ = tg.capture(m.double(), x64.double().numpy())
    assert out_np[0].dtype == torch.float64


def test_capture_clone_is_needed(x64):
    m = tg.randomize(tg.build(), 0)
    naive = {}
    handles = [mod.register_forward_hook(lambda mod, i, o, n=n: naive.__setitem__(n, o))
               for n, mod in m.named_modules() if n]
    with torch.no_grad():
        m(x64)
    for h in handles:
        h.remove()
    _, inter = tg.capture(m, x64)
    # in-place ReLU overwrote the BN output that the naive hook kept a reference to
    assert naive["bn1"].min() >= 0 and naive["bn1"] is naive["act1"]
    assert inter["bn1"].min() < 0
    torch.testing.assert_close(inter["act1"], F.relu(inter["bn1"]))
    # `x += shortcut(residual)` overwrote ghost2's output after its hook ran
    blk = "blocks.2.0"
    assert torch.equal(naive[f"{blk}.ghost2"], naive[blk])
    assert not torch.equal(inter[f"{blk}.ghost2"], inter[blk])
    torch.testing.assert_close(inter[blk], inter[f"{blk}.ghost2"] + inter[f"{blk}.shortcut"])


# ------------------------------------------------------------------------------------------
# randomize() / state_dict_numpy()
# ------------------------------------------------------------------------------------------

def test_randomize_deterministic_and_dtype_independent():
    a = tg.state_dict_numpy(tg.randomize(tg.build(activation="PReLU"), 42))
    b = tg.state_dict_numpy(tg.randomize(tg.build(activation="PReLU"), 42))
    c = tg.state_dict_numpy(tg.randomize(tg.build(activation="PReLU"), 43))
    d = tg.state_dict_numpy(tg.randomize(tg.build(activation="PReLU").double(), 42))
    e = tg.state_dict_numpy(tg.randomize(tg.build(activation="PReLU"), 42).double())
    for k in a:
        assert np.array_equal(a[k], b[k]), k
        assert np.array_equal(d[k], e[k]), k
        if a[k].dtype.kind == "f":
            assert d[k].dtype == np.float64 and np.array_equal(d[k].astype(np.float32), a[k]), k
    assert not np.array_equal(a["conv_stem.weight"], c["conv_stem.weight"])


def test_randomize_distributions():
    m = tg.randomize(tg.build(activation="PReLU"), 1)
    sd = tg.state_dict_numpy(m)
    for name, mod in m.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            for key, lo, hi in (("weight", 0.5, 1.5), ("running_var", 0.5, 1.5)):
                v = sd[f"{name}.{key}"]
                assert v.min() >= lo and v.max() <= hi
            assert sd[f"{name}.num_batches_tracked"] == 0
        if isinstance(mod, nn.PReLU):
            assert 0.1 <= float(sd[f"{name}.weight"][0]) <= 0.4
    allbn = lambda key: np.concatenate([sd[k] for k in sd if k.endswith(key)])  # noqa: E731
    assert abs(allbn(".bn1.bias").std() - 0.1) < 0.02 and abs(allbn("running_mean").std() - 0.1) < 0.01
    big = sd["blocks.8.0.ghost1.primary_conv.0.weight"]  # 480x160, fan_in 160
    assert abs(big.std() * math.sqrt(160) - 1.0) < 0.02 and abs(big.mean()) < 0.01
    dw = sd["blocks.7.0.conv_dw.weight"]  # depthwise 5x5, fan_in 25
    assert abs(dw.std() * 5 - 1.0) < 0.05
    proj = sd["blocks.8.0.ghost2.primary_conv.0.weight"]  # 80x960, residual-branch gain
    assert abs(proj.std() * math.sqrt(960) / tg.RESIDUAL_BRANCH_GAIN - 1.0) < 0.02
    se_b = np.concatenate([sd[k] for k in sd if k.endswith("se.conv_reduce.bias")])
    assert abs(se_b.std() - 0.1) < 0.02


@pytest.mark.parametrize("act", ["ReLU", "LeakyReLU", "SELU", "PReLU"])
def test_randomized_activations_stay_order_one(act):
    m = tg.randomize(tg.build(activation=act, out_stages=range(10)), 0)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = m(x)
    rms = [float(o.pow(2).mean().sqrt()) for o in outs]
    assert all(0.2 < r < 5.0 for r in rms), rms
    h = tg.randomize(tg.build("ghostnet"), 0)
    with torch.no_grad():
        logits = h(x)
    assert 0.05 < float(logits.std()) < 5.0


def test_state_dict_numpy():
    m = tg.randomize(tg.build(), 9)
    sd = tg.state_dict_numpy(m)
    tsd = m.state_dict()
    assert list(sd) == list(tsd)
    for k, v in sd.items():
        assert isinstance(v, np.ndarray)
        if k.endswith("num_batches_tracked"):
            assert v.dtype == np.int64 and v.shape == () and int(v) == 0
        else:
            assert v.dtype == np.float32 and np.array_equal(v, tsd[k].numpy())
    sd["conv_stem.weight"][...] = 0  # a copy, not a view of the parameter
    assert m.conv_stem.weight.abs().sum() > 0
    sd64 = tg.state_dict_numpy(m.double())
    assert sd64["bn1.running_var"].dtype == np.float64 and sd64["bn1.num_batches_tracked"].dtype == np.int64


def test_se_gates_are_the_hard_sigmoid_of_conv_expand():
    model = tg.randomize(tg.build("nanodet", 0.5, "ReLU"), seed=3)
    _, layers = tg.capture(model, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    gates = tg.se_gates(layers)
    assert sorted(gates) == sorted(k[: -len("conv_expand")] + "gate" for k in layers if k.endswith("se.conv_expand"))
    for name, gate in gates.items():
        block = name[: -len(".se.gate")]
        assert torch.equal(torch.from_numpy(gate) * layers[f"{block}.bn_dw" if f"{block}.bn_dw" in layers
                                                           else f"{block}.ghost1"], layers[f"{block}.se"])
