"""Meta-tests of refghost.testing.strategies: valid cases, eager argument validation, value-or-strategy
options, extremes that actually occur, and that refghost.testing does not need Hypothesis."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from refghost import ops
from refghost.arch import ARCHITECTURES, NUM_STAGES, Config, build_graph
from refghost.ops import conv_output_size
from refghost.testing import (ActivationCase, BatchNormCase, BatchNormParams, ConvBNCase, ConvCase, GhostBottleneckCase,
                              GhostBottleneckConfig, GhostModuleCase, GhostModuleConfig, LinearCase, PoolCase)
from refghost.testing import strategies as rst

# --- valid cases -----------------------------------------------------------------------------------


def check_conv(case: ConvCase, dtype=np.float32):
    assert isinstance(case, ConvCase)
    n, c, h, w = case.x.shape
    o, cg, kh, kw = case.w.shape
    assert min(n, c, h, w, o, cg, kh) >= 1 and kh == kw
    assert c % case.groups == 0 and o % case.groups == 0 and cg == c // case.groups
    assert case.stride >= 1 and 0 <= case.padding
    assert conv_output_size(h, kh, case.stride, case.padding) >= 1
    assert conv_output_size(w, kw, case.stride, case.padding) >= 1
    assert case.b is None or case.b.shape == (o,)
    for a in (case.x, case.w) + (() if case.b is None else (case.b,)):
        assert a.dtype == dtype and not np.isnan(a).any() and np.isfinite(a).all()
    # weights carry no subnormals (the bound's underflow allowance is for the input)
    nonzero = np.abs(case.w[case.w != 0])
    assert (nonzero >= np.finfo(dtype).tiny).all()
    assert ops.conv2d(case.x.astype(np.float64), case.w.astype(np.float64), None, stride=case.stride,
                      padding=case.padding, groups=case.groups).shape[:2] == (n, o)


def check_bn(bn: BatchNormParams, channels, dtype=np.float32):
    for a in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert a.shape == (channels,) and a.dtype == dtype and np.isfinite(a).all()
    assert (bn.running_var >= 0).all() and bn.eps > 0


@given(rst.conv_cases())
def test_conv_cases_are_consistent(case):
    check_conv(case)


@given(rst.conv_cases(depthwise=True, kernel_sizes=(3, 5)))
def test_depthwise_conv_cases(case):
    check_conv(case)
    c = case.x.shape[1]
    assert case.groups == c == case.w.shape[0] and case.w.shape[1] == 1 and case.depthwise
    assert case.w.shape[2] in (3, 5)


@given(rst.conv_cases(depthwise=False))
def test_not_depthwise_means_dense(case):
    check_conv(case)
    assert case.groups == 1


@given(rst.conv_cases(paddings="same", kernel_sizes=(1, 3, 5), strides=2))
def test_same_padding_and_fixed_stride(case):
    check_conv(case)
    assert case.padding == (case.w.shape[2] - 1) // 2 and case.stride == 2


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@given(data=st.data())
def test_dtype_option(dtype, data):
    check_conv(data.draw(rst.conv_cases(dtype=dtype)), dtype)
    case = data.draw(rst.batch_norm_cases(dtype=dtype))
    assert case.x.dtype == dtype
    check_bn(case.bn, case.x.shape[1], dtype)


@given(rst.conv_bn_cases(depthwise=True))
def test_conv_bn_cases(case):
    assert isinstance(case, ConvBNCase) and case.x is case.conv.x
    check_conv(case.conv)
    check_bn(case.bn, case.conv.w.shape[0])


@given(rst.batch_norm_cases())
def test_batch_norm_cases(case):
    assert isinstance(case, BatchNormCase) and case.x.ndim == 4
    check_bn(case.bn, case.x.shape[1])


@given(rst.activation_cases())
def test_activation_cases(case):
    assert isinstance(case, ActivationCase)
    assert case.name in ops.ACTIVATIONS or case.name == "hard_sigmoid"
    assert (case.weight is not None) == (case.name == "PReLU")
    if case.weight is not None:
        assert case.weight.shape == (1,) and case.weight.dtype == case.x.dtype


@given(rst.activation_names(exclude=("PReLU", "GELU")))
def test_activation_names(name):
    assert name in ops.ACTIVATIONS and name not in ("PReLU", "GELU")


@given(rst.global_avg_pool_cases(), rst.linear_cases())
def test_pool_and_linear_cases(pool, linear):
    assert isinstance(pool, PoolCase) and pool.x.ndim == 4
    assert isinstance(linear, LinearCase)
    n, i = linear.x.shape
    assert linear.w.shape[1] == i and (linear.b is None or linear.b.shape == (linear.w.shape[0],))


@settings(max_examples=max(3, settings.default.max_examples // 2))
@given(rst.ghost_module_cases(), rst.ghost_bottleneck_cases())
def test_block_cases_match_their_graphs(module, bottleneck):
    for case, cls in ((module, GhostModuleCase), (bottleneck, GhostBottleneckCase)):
        assert isinstance(case, cls)
        shapes = case.graph.param_shapes
        assert set(case.params) == set(shapes)
        assert all(case.params[k].shape == s and case.params[k].dtype == case.x.dtype for k, s in shapes.items())
        assert case.x.shape[1] == case.config.in_channels
    assert module.config.out_channels % 2 == 0


@given(rst.ghostnet_configs(arch=st.sampled_from(ARCHITECTURES)))
def test_ghostnet_configs_build(config):
    assert isinstance(config, Config)
    graph = build_graph(config)
    if config.arch == "nanodet":
        assert set(graph.outputs) == {f"blocks.{s}" for s in config.out_stages}
    else:
        assert graph.outputs == {"classifier": "classifier"} and config.num_classes >= 1


# --- extremes occur, and shrinking gives small cases ---------------------------------------------------

#: find the first example that satisfies a condition, deterministically, without shrinking it
_FIND = settings(database=None, max_examples=2000, derandomize=True, phases=[Phase.generate])


@pytest.mark.parametrize("what,condition", [
    ("the hard-sigmoid knee +3", lambda a: (a == 3).any()),
    ("the hard-sigmoid knee -3", lambda a: (a == -3).any()),
    ("a neighbour of a knee", lambda a: (a == np.nextafter(np.float32(3), np.float32(4))).any()),
    ("an exact negative zero", lambda a: (np.signbit(a) & (a == 0)).any()),
    ("+1e4", lambda a: (a == 1e4).any()),
    ("-1e4", lambda a: (a == -1e4).any()),
    ("a subnormal", lambda a: ((a != 0) & (np.abs(a) < np.finfo(np.float32).tiny)).any()),
])
@pytest.mark.parametrize("shape", [(2, 2), (2, 4, 8, 8)], ids=["small", "seeded"])
def test_extremes_occur(what, condition, shape):
    a = find(rst.input_arrays(shape), condition, settings=_FIND)
    assert a.shape == shape and condition(a), what


def test_tiny_variances_occur():
    bn = find(rst.batch_norm_params(4), lambda p: (p.running_var < 1e-5).any(), settings=_FIND)
    assert (bn.running_var < 1e-5).any()


def test_extremes_can_be_switched_off():
    big = find(rst.input_arrays((64,), extremes=False), lambda a: True, settings=_FIND)
    assert np.abs(big).max() < 100

    @given(rst.input_arrays((3, 5), extremes=False))
    def inner(a):
        assert (np.abs(a) < 100).all()
        assert not ((a != 0) & (np.abs(a) < np.finfo(np.float32).tiny)).any()

    inner()


def test_extreme_values_are_exact_in_their_dtype():
    for dtype in (np.float16, np.float32, np.float64):
        for v in rst.extreme_values(dtype):
            assert float(np.asarray(v, dtype=dtype)) == v or np.isnan(v)


def test_shrinking_gives_a_minimal_conv_case():
    case = find(rst.conv_cases(), lambda c: c.groups > 1 and c.w.shape[2] == 5,
                settings=settings(database=None, max_examples=2000))
    assert case.x.shape[0] == 1 and case.groups == 2 and case.x.shape[1] == 2 and case.w.shape[0] == 2
    assert case.stride == 1 and case.padding == 0 and case.b is None
    assert case.x.shape[2:] == (5, 5)  # the smallest input a 5x5 kernel without padding takes


# --- eager argument validation ----------------------------------------------------------------------


def e(func, **kwargs):
    return pytest.param(func, kwargs, id=f"{func.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")


BAD_ARGUMENTS = [
    e(rst.conv_cases, dilation=2),
    e(rst.conv_cases, dilation=(2, 2)),
    e(rst.conv_cases, dilation=st.just(1)),
    e(rst.conv_cases, kernel_sizes=0),
    e(rst.conv_cases, kernel_sizes=()),
    e(rst.conv_cases, kernel_sizes=(3, -1)),
    e(rst.conv_cases, kernel_sizes=3.0),
    e(rst.conv_cases, strides=0),
    e(rst.conv_cases, paddings=-1),
    e(rst.conv_cases, paddings="valid"),
    e(rst.conv_cases, groups=0),
    e(rst.conv_cases, groups=3, in_channels=4),
    e(rst.conv_cases, groups=2, out_channels=3),
    e(rst.conv_cases, depthwise=True, groups=2),
    e(rst.conv_cases, depthwise=1),
    e(rst.conv_cases, depthwise=True, in_channels=4, out_channels=6),
    e(rst.conv_cases, in_channels=0),
    e(rst.conv_cases, out_channels=True),
    e(rst.conv_cases, batch_size=0),
    e(rst.conv_cases, height=2, kernel_sizes=5, paddings=0),
    e(rst.conv_cases, width=3, kernel_sizes=(5, 7), paddings=0),
    e(rst.conv_cases, height="8"),
    e(rst.conv_cases, bias="yes"),
    e(rst.conv_cases, dtype=np.int32),
    e(rst.conv_cases, dtype="bfloat16"),
    e(rst.conv_cases, dtype="not a dtype"),
    e(rst.conv_cases, scale=0.0),
    e(rst.conv_cases, scale=float("inf")),
    e(rst.conv_cases, extremes=None),
    e(rst.conv_bn_cases, eps=0.0),
    e(rst.conv_bn_cases, eps=-1e-5),
    e(rst.conv_bn_cases, tiny_variances=1),
    e(rst.conv_bn_cases, dilation=2),
    e(rst.batch_norm_params, channels=0),
    e(rst.batch_norm_params, channels=4, eps="1e-5"),
    e(rst.batch_norm_cases, channels=-1),
    e(rst.batch_norm_cases, height=0),
    e(rst.activation_names, exclude="PReLU"),
    e(rst.activation_names, exclude=("Swish",)),
    e(rst.activation_names, exclude=tuple(ops.ACTIVATIONS)),
    e(rst.activation_cases, name="Swish"),
    e(rst.activation_cases, name="hardswish"),
    e(rst.activation_cases, shape=(2, 0)),
    e(rst.activation_cases, shape=[2, 3]),
    e(rst.global_avg_pool_cases, width=0),
    e(rst.linear_cases, in_features=0),
    e(rst.linear_cases, bias=0),
    e(rst.input_arrays, shape=()),
    e(rst.input_arrays, shape=(3,), dtype=np.complex64),
    e(rst.ghost_module_configs, out_channels=3),
    e(rst.ghost_module_configs, in_channels=0),
    e(rst.ghost_module_configs, activation="Swish"),
    e(rst.ghost_bottleneck_configs, mid_channels=5),
    e(rst.ghost_bottleneck_configs, kernel_size=4),
    e(rst.ghost_bottleneck_configs, stride=3),
    e(rst.ghost_bottleneck_configs, se=None.__class__),
    e(rst.ghost_bottleneck_configs, activation=None.__class__),
    e(rst.ghost_module_cases, config=GhostBottleneckConfig(4, 8, 8)),
    e(rst.ghost_bottleneck_cases, config=GhostModuleConfig(4, 8)),
    e(rst.ghost_module_cases, extremes="no"),
    e(rst.ghostnet_configs, arch="resnet"),
    e(rst.ghostnet_configs, width=0),
    e(rst.ghostnet_configs, width=-0.5),
    e(rst.ghostnet_configs, activation="Swish"),
    e(rst.ghostnet_configs, out_stages=()),
    e(rst.ghostnet_configs, out_stages=(3, NUM_STAGES)),
    e(rst.ghostnet_configs, arch="ghostnet", activation="SiLU"),
    e(rst.ghostnet_configs, arch="nanodet", num_classes=10),
]


@pytest.mark.parametrize("func,kwargs", BAD_ARGUMENTS)
def test_bad_arguments_fail_eagerly(func, kwargs):
    with pytest.raises(InvalidArgument):
        func(**kwargs)


@pytest.mark.parametrize("func,kwargs", [
    e(rst.conv_cases, kernel_sizes=st.just(0)),
    e(rst.conv_cases, groups=st.just(3), in_channels=4),
    e(rst.conv_cases, depthwise=st.just(True), groups=2),
    e(rst.conv_cases, dtype=st.just(np.int8)),
    e(rst.batch_norm_cases, channels=st.just(0)),
    e(rst.activation_cases, name=st.just("Swish")),
    e(rst.ghostnet_configs, width=st.just(-1.0)),
    e(rst.ghost_module_cases, config=st.just(GhostBottleneckConfig(4, 8, 8))),
])
def test_bad_drawn_values_fail_when_drawn(func, kwargs):
    strategy = func(**kwargs)  # a strategy's values are only known when drawn

    @settings(max_examples=5, database=None)
    @given(strategy)
    def inner(_):
        pass

    with pytest.raises(InvalidArgument):
        inner()


# --- every option takes a value or a strategy ------------------------------------------------------

_dt = lambda a: np.dtype(a.dtype).type  # noqa: E731

OPTIONS = [
    # (strategy function, option, a value, choices for st.sampled_from, read the option back or None)
    (rst.conv_cases, "batch_size", 2, [1, 3], lambda c: c.x.shape[0]),
    (rst.conv_cases, "in_channels", 6, [2, 4], lambda c: c.x.shape[1]),
    (rst.conv_cases, "out_channels", 6, [2, 4], lambda c: c.w.shape[0]),
    (rst.conv_cases, "groups", 2, [1, 2], lambda c: c.groups),
    (rst.conv_cases, "depthwise", True, [True], lambda c: c.depthwise),
    (rst.conv_cases, "kernel_sizes", 5, [1, 3], lambda c: c.w.shape[2]),
    (rst.conv_cases, "strides", 2, [1, 3], lambda c: c.stride),
    (rst.conv_cases, "paddings", 0, [0, 1], lambda c: c.padding if c.w.shape[2] > 1 else None),
    (rst.conv_cases, "height", 9, [7, 8], lambda c: c.x.shape[2]),
    (rst.conv_cases, "width", 9, [7, 8], lambda c: c.x.shape[3]),
    (rst.conv_cases, "bias", True, [False], lambda c: c.b is not None),
    (rst.conv_cases, "dtype", np.float64, [np.float16, np.float64], lambda c: _dt(c.x)),
    (rst.conv_cases, "scale", 0.5, [0.5, 8.0], lambda c: None),
    (rst.conv_cases, "extremes", False, [False], lambda c: False if np.abs(c.x).max() < 100 else None),
    (rst.batch_norm_cases, "channels", 5, [2, 3], lambda c: c.bn.weight.shape[0]),
    (rst.batch_norm_cases, "eps", 1e-3, [1e-3, 1e-4], lambda c: c.bn.eps),
    (rst.batch_norm_cases, "height", 3, [2, 4], lambda c: c.x.shape[2]),
    (rst.batch_norm_cases, "tiny_variances", False, [False],
     lambda c: False if (c.bn.running_var >= 2 ** -10).all() else None),
    (rst.conv_bn_cases, "eps", 1e-3, [1e-3, 1e-4], lambda c: c.bn.eps),
    (rst.conv_bn_cases, "kernel_sizes", 3, [1, 5], lambda c: c.conv.w.shape[2]),
    (rst.batch_norm_params, "channels", 3, [2, 4], lambda p: p.weight.shape[0]),
    (rst.activation_cases, "name", "GELU", ["ReLU", "hard_sigmoid"], lambda c: c.name),
    (rst.activation_cases, "shape", (2, 3), [(1,), (2, 2, 2)], lambda c: c.x.shape),
    (rst.activation_cases, "dtype", np.float16, [np.float16, np.float64], lambda c: _dt(c.x)),
    (rst.global_avg_pool_cases, "width", 7, [5, 9], lambda c: c.x.shape[3]),
    (rst.linear_cases, "in_features", 1280, [3, 5], lambda c: c.w.shape[1]),
    (rst.linear_cases, "out_features", 3, [2, 4], lambda c: c.w.shape[0]),
    (rst.linear_cases, "bias", True, [True], lambda c: c.b is not None),
    (rst.input_arrays, "dtype", np.float16, [np.float16, np.float64], _dt),
    (rst.input_arrays, "shape", (3, 4), [(2,), (1, 5)], lambda a: a.shape),
    (rst.ghost_module_configs, "in_channels", 3, [5, 7], lambda c: c.in_channels),
    (rst.ghost_module_configs, "out_channels", 6, [2, 4], lambda c: c.out_channels),
    (rst.ghost_module_configs, "activation", "SiLU", [None, "ELU"], lambda c: c.activation),
    (rst.ghost_bottleneck_configs, "kernel_size", 5, [3, 5], lambda c: c.kernel_size),
    (rst.ghost_bottleneck_configs, "stride", 2, [1, 2], lambda c: c.stride),
    (rst.ghost_bottleneck_configs, "se", True, [False], lambda c: c.se),
    (rst.ghost_bottleneck_configs, "mid_channels", 4, [2, 6], lambda c: c.mid_channels),
    (rst.ghost_module_cases, "config", GhostModuleConfig(3, 4, None),
     [GhostModuleConfig(1, 2), GhostModuleConfig(2, 6, "GELU")], lambda c: c.config),
    (rst.ghost_bottleneck_cases, "height", 5, [3, 4], lambda c: c.x.shape[2]),
    (rst.ghostnet_configs, "width", 0.5, [0.35, 1.3], lambda c: c.width),
    (rst.ghostnet_configs, "activation", "HardSwish", ["ELU", "GELU"], lambda c: c.activation),
    (rst.ghostnet_configs, "out_stages", (4, 6, 9), [(9,), (0, 1)], lambda c: c.out_stages),
]


def _norm(v):
    return np.dtype(v).type if isinstance(v, type) and issubclass(v, np.generic) else v


@pytest.mark.parametrize("func,option,value,choices,read", OPTIONS,
                         ids=[f"{f.__name__}-{o}" for f, o, *_ in OPTIONS])
def test_option_takes_a_value_or_a_strategy(func, option, value, choices, read):
    args = {"shape": (3, 4)} if func is rst.input_arrays and option != "shape" else {}

    @settings(max_examples=10, database=None)
    @given(func(**args, **{option: value}), func(**args, **{option: st.sampled_from(choices)}))
    def inner(from_value, from_strategy):
        got = read(from_value)
        assert got is None or got == _norm(value), (got, value)
        got = read(from_strategy)
        assert got is None or got in {_norm(c) for c in choices}, (got, choices)

    inner()


def test_refghost_testing_does_not_import_hypothesis():
    code = ("import sys, refghost.testing as t; "
            "assert 'hypothesis' not in sys.modules, sorted(m for m in sys.modules if 'hypothesis' in m); "
            "assert callable(t.assert_matches_reference)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_strategies_module_lists_its_public_names():
    for name in rst.__all__:
        assert hasattr(rst, name), name
    assert all(not n.startswith("_") for n in rst.__all__)
