"""Property-based tests of refghost's ops, over cases drawn by refghost.testing.strategies.

1. Differential: every op computed by PyTorch and by ONNX Runtime (single-node models, and the
   fused Conv+BN that ORT's optimizer makes) lies within the derived bound of refghost's float64
   reference (refghost.testing.assert_matches_reference, i.e. refghost.bounds).
2. Metamorphic, no other framework: grouped conv = concatenation of per-group convs; depthwise =
   grouped with groups = C; conv is linear in its input and in its weights; BN folded into the
   conv agrees with conv then BN; hard-sigmoid is exactly 0 / 1 beyond -3 / +3; a bottleneck with
   zero ghost2 returns its shortcut; a GhostModule's output is [primary, cheap]; refghost's own
   float32 (plain ops and fast kernels) within the bound of float64.

That the bound is not vacuous, and breaks on wrong constants, is tested in tests/test_bounds.py.

The number of examples per property comes from the Hypothesis profile (tests/conftest.py):
heavier properties run a fraction of it (see ``_examples``).
"""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torch_ghostnet as tg
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from refghost import kernels, ops
from refghost.arch import Node
from refghost.bounds import UNIT_ROUNDOFF, error_bounds
from refghost.forward import execute
from refghost.testing import (BatchNormParams, ConvBNCase, ConvCase, GhostModuleConfig,
                              assert_matches_reference, fold_batch_norm, reference_and_bound, round_case)
from refghost.testing import strategies as rst

ACTIVATION_OPS = tuple(ops.ACTIVATIONS) + ("hard_sigmoid",)
LAYER_OPS = ("conv2d", "batch_norm", "conv_bn", "global_avg_pool", "linear")
BLOCK_OPS = ("ghost_module", "ghost_bottleneck")

#: op -> strategy of its cases (float32, extremes included for single ops)
STRATEGIES = {
    "conv2d": rst.conv_cases(),
    "batch_norm": rst.batch_norm_cases(),
    "conv_bn": rst.conv_bn_cases(),
    "global_avg_pool": rst.global_avg_pool_cases(),
    "linear": rst.linear_cases(),
    "ghost_module": rst.ghost_module_cases(),
    "ghost_bottleneck": rst.ghost_bottleneck_cases(),
    **{name: rst.activation_cases(name=name) for name in ACTIVATION_OPS},
}



def _examples(divisor=1):
    """A fraction of the profile's max_examples (at least 3), for the heavier properties."""
    return settings(max_examples=max(3, settings.default.max_examples // divisor))


# --- PyTorch ------------------------------------------------------------------------------------


def _t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


TORCH_ACTIVATIONS = {
    "ReLU": F.relu,
    "LeakyReLU": lambda x: F.leaky_relu(x, ops.LEAKY_RELU_SLOPE),
    "ReLU6": F.relu6,
    "SELU": F.selu,
    "ELU": F.elu,
    "GELU": F.gelu,
    "SiLU": F.silu,
    "HardSwish": F.hardswish,
    "Identity": lambda x: x,
    "hard_sigmoid": tg.hard_sigmoid,
}


def _torch_block(case):
    c = case.config
    act = None if c.activation == "Identity" else c.activation  # tests/torch_ghostnet spells it None
    if isinstance(c, GhostModuleConfig):
        module = tg.GhostModule(c.in_channels, c.out_channels, activation=act)
    else:
        module = tg.GhostBottleneck(c.in_channels, c.mid_channels, c.out_channels, c.kernel_size, c.stride,
                                    activation=act, se_ratio=0.25 if c.se else 0.0)
    missing, unexpected = module.load_state_dict({k: _t(v) for k, v in case.params.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return module.eval()


def torch_result(op, case, *, fused=False):
    """PyTorch's output of ``op`` on ``case`` (eval mode, no grad), as a NumPy array."""
    with torch.no_grad():
        if op == "conv2d":
            y = F.conv2d(_t(case.x), _t(case.w), _t(case.b), stride=case.stride, padding=case.padding,
                         groups=case.groups)
        elif op == "batch_norm":
            bn = case.bn
            y = F.batch_norm(_t(case.x), _t(bn.running_mean), _t(bn.running_var), _t(bn.weight), _t(bn.bias),
                             training=False, eps=bn.eps)
        elif op == "conv_bn":
            c, bn = case.conv, case.bn
            if fused:  # PyTorch's own folding (torch.nn.utils.fusion), then one conv
                w, b = torch.nn.utils.fusion.fuse_conv_bn_weights(
                    _t(c.w), _t(c.b), _t(bn.running_mean), _t(bn.running_var), bn.eps, _t(bn.weight), _t(bn.bias))
                y = F.conv2d(_t(c.x), w, b, stride=c.stride, padding=c.padding, groups=c.groups)
            else:
                z = F.conv2d(_t(c.x), _t(c.w), _t(c.b), stride=c.stride, padding=c.padding, groups=c.groups)
                y = F.batch_norm(z, _t(bn.running_mean), _t(bn.running_var), _t(bn.weight), _t(bn.bias),
                                 training=False, eps=bn.eps)
        elif op == "global_avg_pool":
            y = F.adaptive_avg_pool2d(_t(case.x), 1)
        elif op == "linear":
            y = F.linear(_t(case.x), _t(case.w), _t(case.b))
        elif op == "PReLU":
            y = F.prelu(_t(case.x), _t(case.weight))
        elif op in TORCH_ACTIVATIONS:
            y = TORCH_ACTIVATIONS[op](_t(case.x).clone())
        elif op in BLOCK_OPS:
            y = _torch_block(case)(_t(case.x).clone())
        else:
            raise AssertionError(op)
    return y.numpy()


# --- ONNX Runtime -------------------------------------------------------------------------------

OPSET = 24  # Gelu (20) and Swish (24) are standard ops from these opsets

#: refghost activation name -> (ONNX op type, attributes, extra initializer inputs)
ONNX_ACTIVATIONS = {
    "ReLU": ("Relu", {}, ()),
    "LeakyReLU": ("LeakyRelu", {"alpha": ops.LEAKY_RELU_SLOPE}, ()),
    "ReLU6": ("Clip", {}, (np.float32(0.0), np.float32(6.0))),
    "SELU": ("Selu", {"alpha": ops.SELU_ALPHA, "gamma": ops.SELU_SCALE}, ()),
    "ELU": ("Elu", {"alpha": ops.ELU_ALPHA}, ()),
    "GELU": ("Gelu", {}, ()),
    "SiLU": ("Swish", {}, ()),
    "HardSwish": ("HardSwish", {}, ()),
    "Identity": ("Identity", {}, ()),
}


class _OnnxGraph:
    """Translates refghost Nodes (refghost.arch) into ONNX nodes, one op each."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def add(self, node: Node, params):
        p = {role: params[key] for role, key in node.params.items()}
        ins, out = list(node.inputs), node.name
        if node.op == "conv":
            w = p["weight"]
            ins += [self.init(f"{out}.W", w)] + ([self.init(f"{out}.B", p["bias"])] if "bias" in p else [])
            pad = node.attrs["padding"]
            self.nodes.append(helper.make_node("Conv", ins, [out], kernel_shape=list(w.shape[2:]),
                                               strides=[node.attrs["stride"]] * 2, pads=[pad] * 4,
                                               group=node.attrs["groups"]))
        elif node.op == "batch_norm":
            ins += [self.init(f"{out}.{r}", p[r]) for r in ("weight", "bias", "running_mean", "running_var")]
            self.nodes.append(helper.make_node("BatchNormalization", ins, [out],
                                               epsilon=node.attrs.get("eps", ops.BN_EPS)))
        elif node.op == "act" and node.attrs["activation"] == "PReLU":
            ins.append(self.init(f"{out}.slope", p["weight"]))
            self.nodes.append(helper.make_node("PRelu", ins, [out]))
        elif node.op == "act":
            op_type, attrs, extra = ONNX_ACTIVATIONS[node.attrs["activation"]]
            ins += [self.init(f"{out}.{i}", v) for i, v in enumerate(extra)]
            self.nodes.append(helper.make_node(op_type, ins, [out], **attrs))
        elif node.op == "hard_sigmoid":  # relu6(x+3)/6 == max(0, min(1, x/6 + 1/2))
            self.nodes.append(helper.make_node("HardSigmoid", ins, [out], alpha=1.0 / 6.0, beta=0.5))
        elif node.op == "concat":
            self.nodes.append(helper.make_node("Concat", ins, [out], axis=1))
        elif node.op in ("add", "scale"):
            self.nodes.append(helper.make_node("Add" if node.op == "add" else "Mul", ins, [out]))
        elif node.op == "global_avg_pool":
            self.nodes.append(helper.make_node("GlobalAveragePool", ins, [out]))
        elif node.op == "linear":
            ins += [self.init(f"{out}.W", p["weight"]), self.init(f"{out}.B", p["bias"])]
            self.nodes.append(helper.make_node("Gemm", ins, [out], transB=1))
        else:
            raise AssertionError(node.op)

    def model(self, x, output):
        graph = helper.make_graph(
            self.nodes, "refghost_case", [helper.make_tensor_value_info("input", TensorProto.FLOAT, x.shape)],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        return model


def _single_op_nodes(op, case):
    """refghost Nodes and params for one op (the conv_bn pair: Conv then BatchNormalization)."""
    def conv(c, name="conv"):
        params = {"weight": f"{name}.w"} | ({"bias": f"{name}.b"} if c.b is not None else {})
        vals = {f"{name}.w": c.w} | ({f"{name}.b": c.b} if c.b is not None else {})
        return Node(name, "conv", ("input",), params, {"stride": c.stride, "padding": c.padding,
                                                         "groups": c.groups}), vals

    def bn(b, src, name="bn"):
        roles = ("weight", "bias", "running_mean", "running_var")
        return (Node(name, "batch_norm", (src,), {r: f"{name}.{r}" for r in roles}, {"eps": b.eps}),
                {f"{name}.{r}": getattr(b, r) for r in roles})

    if op == "conv2d":
        n, p = conv(case)
        return [n], p
    if op == "batch_norm":
        n, p = bn(case.bn, "input")
        return [n], p
    if op == "conv_bn":
        n1, p1 = conv(case.conv)
        n2, p2 = bn(case.bn, n1.name)
        return [n1, n2], p1 | p2
    if op == "global_avg_pool":
        return [Node("pool", "global_avg_pool", ("input",))], {}
    if op == "linear":
        b = np.zeros(case.w.shape[0], case.w.dtype) if case.b is None else case.b
        return [Node("fc", "linear", ("input",), {"weight": "w", "bias": "b"})], {"w": case.w, "b": b}
    if op == "hard_sigmoid":
        return [Node("gate", "hard_sigmoid", ("input",))], {}
    if op == "PReLU":
        return [Node("act", "act", ("input",), {"weight": "slope"}, {"activation": op})], {"slope": case.weight}
    return [Node("act", "act", ("input",), {}, {"activation": op})], {}


def _session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnx_model(op, case):
    if op in BLOCK_OPS:
        graph, params = case.graph, case.params
        nodes, output = graph.nodes, "output"
    else:
        nodes, params = _single_op_nodes(op, case)
        output = nodes[-1].name
    g = _OnnxGraph()
    for node in nodes:
        g.add(node, params)
    return g.model(case.x, output)


def ort_result(op, case):
    """ONNX Runtime's output (CPU, default graph optimizations: Conv+BN is fused)."""
    return _session(onnx_model(op, case)).run(None, {"input": np.ascontiguousarray(case.x)})[0]


# --- refghost's own float32 -----------------------------------------------------------------------


def refghost_result(op, case, *, fast=False):
    """refghost's plain ops (or fast kernels) in the case's dtype."""
    with np.errstate(over="ignore", under="ignore"):  # SiLU's exp(1e4) = inf is meant
        return _refghost_result(op, case, fast)


def _refghost_result(op, case, fast):
    conv = kernels.conv2d if fast else ops.conv2d
    act = kernels.activation if fast else ops.activation
    if op == "conv2d":
        return conv(case.x, case.w, case.b, stride=case.stride, padding=case.padding, groups=case.groups)
    if op == "batch_norm":
        bn = case.bn
        return ops.batch_norm(case.x, bn.weight, bn.bias, bn.running_mean, bn.running_var, eps=bn.eps)
    if op == "conv_bn":
        c, bn = case.conv, case.bn
        z = conv(c.x, c.w, c.b, stride=c.stride, padding=c.padding, groups=c.groups)
        return ops.batch_norm(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, eps=bn.eps)
    if op == "global_avg_pool":
        return ops.global_avg_pool(case.x)
    if op == "linear":
        return ops.linear(case.x, case.w, case.b)
    if op == "hard_sigmoid":
        return ops.hard_sigmoid(case.x)
    if op in ops.ACTIVATIONS:
        return act(op, case.x, case.weight)
    if op in BLOCK_OPS:
        return execute(case.graph, case.params, case.x, impl="kernels" if fast else "plain")["output"]
    raise AssertionError(op)


# === 1. differential: PyTorch and ONNX Runtime ========================================================

ALL_OPS = LAYER_OPS + ACTIVATION_OPS + BLOCK_OPS


@pytest.mark.parametrize("op", ALL_OPS)
@given(data=st.data())
def test_pytorch_within_bound(op, data):
    case = data.draw(STRATEGIES[op], label="case")
    assert_matches_reference(op, case, torch_result(op, case))


@given(case=rst.conv_bn_cases())
def test_pytorch_fused_conv_bn_within_bound(case):
    assert_matches_reference("conv_bn", case, torch_result("conv_bn", case, fused=True))


@pytest.mark.parametrize("op", ALL_OPS)
@given(data=st.data())
def test_onnxruntime_within_bound(op, data):
    case = data.draw(STRATEGIES[op], label="case")
    assert_matches_reference(op, case, ort_result(op, case))


def test_onnxruntime_fuses_conv_bn(tmp_path):
    """The conv_bn ORT test above checks ORT's *fused* conv: its optimizer folds the BN away."""
    case = ConvBNCase(*_fixed_conv_bn())
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(onnx_model("conv_bn", case).SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    ops_after = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert "BatchNormalization" not in ops_after and ops_after.count("Conv") + ops_after.count("FusedConv") == 1


def _fixed_conv_bn():
    rng = np.random.default_rng(0)
    conv = ConvCase(rng.standard_normal((1, 4, 6, 6)).astype(np.float32),
                    rng.standard_normal((4, 1, 3, 3)).astype(np.float32), None, 1, 1, 4)
    bn = BatchNormParams(*(rng.uniform(0.5, 1.5, 4).astype(np.float32) for _ in range(4)))
    return conv, bn


@_examples(2)
@given(case=rst.conv_cases(extremes=False))
def test_pytorch_bfloat16_conv_within_bfloat16_bound(case):
    """Policy bfloat16: the case is rounded to bfloat16 first (the caller's business)."""
    case = round_case(case, "bfloat16")
    with torch.no_grad():
        y = F.conv2d(_t(case.x).bfloat16(), _t(case.w).bfloat16(), None if case.b is None else _t(case.b).bfloat16(),
                     stride=case.stride, padding=case.padding, groups=case.groups)
    assert_matches_reference("conv2d", case, y, policy="bfloat16")


# === 2. metamorphic properties ============================================================================


@given(case=rst.conv_cases(depthwise=False, groups=st.integers(1, 4)))
def test_grouped_conv_is_the_concatenation_of_per_group_convs(case):
    g, x, w, b = case.groups, case.x, case.w, case.b
    cg, og = x.shape[1] // g, w.shape[0] // g
    parts = [ops.conv2d(x[:, i * cg:(i + 1) * cg], w[i * og:(i + 1) * og],
                        None if b is None else b[i * og:(i + 1) * og], stride=case.stride, padding=case.padding)
             for i in range(g)]
    assert_matches_reference("conv2d", case, np.concatenate(parts, axis=1))


@given(case=rst.conv_cases(depthwise=True))
def test_depthwise_is_grouped_conv_with_groups_equal_channels(case):
    c = case.x.shape[1]
    assert case.groups == c
    fast = kernels.conv2d(case.x, case.w, case.b, stride=case.stride, padding=case.padding, groups=c)  # Numba
    assert_matches_reference("conv2d", case, fast)
    assert_matches_reference("conv2d", case, ops.conv2d(case.x, case.w, case.b, stride=case.stride,
                                                        padding=case.padding, groups=c))


def _sum_bound(op_case_a, op_case_b, ya, yb):
    """Bound on |fl(ya + yb) - (exact_a + exact_b)|: both bounds plus the float32 add."""
    (_, ba), (_, bb) = reference_and_bound("conv2d", op_case_a), reference_and_bound("conv2d", op_case_b)
    return ba + bb + UNIT_ROUNDOFF["float32"] * np.abs(ya.astype(np.float64) + yb)


@given(case=rst.conv_cases(), data=st.data())
def test_conv_is_linear_in_its_input(case, data):
    x2 = data.draw(rst.input_arrays(case.x.shape), label="x2")
    other = ConvCase(x2, case.w, None, case.stride, case.padding, case.groups)
    y1 = ops.conv2d(case.x, case.w, case.b, stride=case.stride, padding=case.padding, groups=case.groups)
    y2 = ops.conv2d(x2, case.w, None, stride=case.stride, padding=case.padding, groups=case.groups)
    exact = ops.conv2d(case.x.astype(np.float64) + x2, case.w.astype(np.float64),
                       None if case.b is None else case.b.astype(np.float64),
                       stride=case.stride, padding=case.padding, groups=case.groups)  # x1 + x2 exact in float64
    bound = _sum_bound(case, other, y1, y2)
    assert (np.abs((y1 + y2).astype(np.float64) - exact) <= bound * (1 + 2.0 ** -20)).all()


@given(case=rst.conv_cases(extremes=False), data=st.data())
def test_conv_is_linear_in_its_weights(case, data):
    w2 = data.draw(rst.input_arrays(case.w.shape, scale=float(np.sqrt(1.0 / np.prod(case.w.shape[1:]))),
                                    extremes=False), label="w2")
    other = ConvCase(case.x, w2, None, case.stride, case.padding, case.groups)
    y1 = ops.conv2d(case.x, case.w, case.b, stride=case.stride, padding=case.padding, groups=case.groups)
    y2 = ops.conv2d(case.x, w2, None, stride=case.stride, padding=case.padding, groups=case.groups)
    exact = ops.conv2d(case.x.astype(np.float64), case.w.astype(np.float64) + w2,
                       None if case.b is None else case.b.astype(np.float64),
                       stride=case.stride, padding=case.padding, groups=case.groups)
    bound = _sum_bound(case, other, y1, y2)
    assert (np.abs((y1 + y2).astype(np.float64) - exact) <= bound * (1 + 2.0 ** -20)).all()


@given(case=rst.conv_bn_cases())
def test_batch_norm_folded_into_conv_agrees_with_conv_then_batch_norm(case):
    c = case.conv
    wf, bf = fold_batch_norm(c.w, c.b, case.bn)  # float32 folding, as a backend does it
    fused = ops.conv2d(c.x, wf, bf, stride=c.stride, padding=c.padding, groups=c.groups)
    assert_matches_reference("conv_bn", case, fused)
    unfused = refghost_result("conv_bn", case)
    assert_matches_reference("conv_bn", case, unfused)
    # and both lie within twice the bound of each other
    _, bound = reference_and_bound("conv_bn", case)
    assert (np.abs(fused.astype(np.float64) - unfused) <= 2 * bound).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@given(data=st.data())
def test_hard_sigmoid_saturates_exactly_beyond_the_knees(dtype, data):
    case = data.draw(rst.activation_cases(name="hard_sigmoid", dtype=dtype, scale=4.0), label="case")
    x, y = case.x, ops.hard_sigmoid(case.x)
    assert y.dtype == x.dtype
    assert (y[x <= -3] == 0).all() and (y[x >= 3] == 1).all()
    inside = (x > -3) & (x < 3)
    assert ((y[inside] > 0) & (y[inside] <= 1)).all()
    # the knees themselves, and their neighbours on the outside
    t = np.dtype(dtype).type
    knees = np.array([-3, 3, np.nextafter(t(-3), t(-4)), np.nextafter(t(3), t(4))], dtype=dtype)
    assert ops.hard_sigmoid(knees).tolist() == [0, 1, 0, 1]


def _zero_ghost2(params):
    """ghost2's convs and BN scale/shift/mean set to zero (variance kept): ghost2 outputs exact zeros."""
    out = dict(params)
    for key, value in params.items():
        if key.startswith("ghost2.") and not key.endswith("running_var"):
            out[key] = np.zeros_like(value)
    return out


@_examples(2)
@given(case=rst.ghost_bottleneck_cases(extremes=True))
def test_bottleneck_with_zero_ghost2_returns_its_shortcut(case):
    params = _zero_ghost2(case.params)
    with np.errstate(over="ignore"):  # SiLU of -1e4
        values = execute(case.graph, params, case.x, intermediates=True)
    c = case.config
    shortcut = case.x if c.in_channels == c.out_channels and c.stride == 1 else values["shortcut.3"]
    assert not values["ghost2"].any()
    np.testing.assert_array_equal(values["output"], shortcut)


@_examples(2)
@given(case=rst.ghost_module_cases())
def test_ghost_module_output_is_primary_then_cheap(case):
    x, p, c = case.x.astype(np.float64), {k: v.astype(np.float64) for k, v in case.params.items()}, case.config
    half = c.out_channels // 2

    def conv_bn_act(t, conv, bn, act, **kw):
        y = ops.conv2d(t, p[f"{conv}.weight"], **kw)
        y = ops.batch_norm(y, p[f"{bn}.weight"], p[f"{bn}.bias"], p[f"{bn}.running_mean"], p[f"{bn}.running_var"])
        return y if act is None else ops.activation(c.activation, y, p.get(f"{act}.weight"))

    act = None if c.activation is None else "primary_conv.2"
    primary = conv_bn_act(x, "primary_conv.0", "primary_conv.1", act)
    cheap = conv_bn_act(primary, "cheap_operation.0", "cheap_operation.1", act and "cheap_operation.2",
                        padding=1, groups=half)
    out = execute(case.graph, p, x, impl="plain")["output"]
    assert out.shape[1] == c.out_channels
    np.testing.assert_array_equal(out[:, :half], primary)
    np.testing.assert_array_equal(out[:, half:], cheap)


@pytest.mark.parametrize("op", ALL_OPS)
@given(data=st.data())
def test_refghost_float32_within_bound_of_float64(op, data):
    case = data.draw(STRATEGIES[op], label="case")
    assert_matches_reference(op, case, refghost_result(op, case))


@pytest.mark.parametrize("op", ["conv2d", "conv_bn", "GELU", "ghost_module"])
@given(data=st.data())
def test_fast_kernels_within_bound_of_float64(op, data):
    case = data.draw(STRATEGIES[op], label="case")
    assert_matches_reference(op, case, refghost_result(op, case, fast=True))


@pytest.mark.parametrize("op", ["conv2d", "linear", "global_avg_pool"])
@given(data=st.data())
def test_refghost_float16_within_float16_bound(op, data):
    """float16 inputs (no extremes: +-1e4 would overflow float16 sums), float16 arithmetic."""
    strategy = {"conv2d": rst.conv_cases, "linear": rst.linear_cases,
                "global_avg_pool": rst.global_avg_pool_cases}[op](dtype=np.float16, extremes=False)
    case = data.draw(strategy, label="case")
    assert_matches_reference(op, case, refghost_result(op, case), policy="float16")


@_examples(5)
@given(config=rst.ghostnet_configs(width=st.sampled_from([0.25, 0.5]), out_stages=(3, 9)),
       seed=st.integers(0, 2 ** 16), side=st.integers(16, 40))
def test_whole_network_float32_within_accumulated_bound(config, seed, side):
    """refghost.run in float32 lies within the probabilistic bound of the float64 oracle."""
    from conftest import random_weights

    import refghost

    weights = random_weights(config, seed)
    x = np.random.default_rng(seed).standard_normal((1, 3, side, side)).astype(np.float32)
    with np.errstate(over="ignore"):
        got = refghost.run(x, weights)
    values, bounds = error_bounds(weights.graph, weights.params("float64"), x.astype(np.float64))
    for name, node in weights.graph.outputs.items():
        assert (np.abs(got[name] - values[node]) <= bounds[node]).all(), name
