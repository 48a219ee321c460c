"""The diagnosis of a failed comparison agrees with the isolated checks (issue 24): a kind of
layer computing another function is named with the parameter that fits, never explained as a
lower precision or as other weights; another input is named as such."""

import copy

import numpy as np
import pytest
import torch_ghostnet as tg

from refghost.arch import Config
from refghost.forward import evaluate, execute
from refghost.verify.compare import compare
from refghost.verify.golden import make_golden
from refghost.weights import from_tensors

CONFIG = Config(width=0.5, activation="LeakyReLU", out_stages=(4, 6, 9))


@pytest.fixture(scope="module")
def env():
    model = tg.randomize(tg.build("nanodet", 0.5, "LeakyReLU"), seed=3)
    weights = from_tensors(tg.state_dict_numpy(model), CONFIG)
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    return dict(weights=weights, x=x, golden=make_golden(weights, x, intermediates=True))


def run_with(env, *, slope=None, eps=None, x=None):
    """float32 intermediates of the network computed with another LeakyReLU slope or BatchNorm
    epsilon (a stand-in for a port whose layers of one kind compute another function)."""
    weights = env["weights"]
    graph = copy.deepcopy(weights.graph)
    params = weights.params("float32")
    values = {"input": env["x"] if x is None else x}
    for node in graph.nodes:
        ins = [values[s] for s in node.inputs]
        if eps is not None and node.op == "batch_norm":
            node.attrs["eps"] = eps
        if slope is not None and node.op == "act" and node.attrs["activation"] == "LeakyReLU":
            values[node.name] = np.where(ins[0] > 0, ins[0], np.float32(slope) * ins[0])
        else:
            values[node.name] = evaluate(node, ins, params)
    del values["input"]
    return values


def test_batch_norm_epsilon_named_and_estimated(env):
    report = compare(env["golden"], run_with(env, eps=1e-3))
    assert not report.passed and report.consistent_with is None
    first = report.diagnosis[0]
    assert "every BatchNorm layers fail" in first or "BatchNorm layers fail" in first, report.diagnosis
    assert "the epsilon that fits is 0.001 " in first, first
    assert not any("other weights" in d or "honest backend" in d for d in report.diagnosis)


def test_leaky_relu_slope_named_and_estimated(env):
    report = compare(env["golden"], run_with(env, slope=0.01))
    assert not report.passed and report.consistent_with is None
    first = report.diagnosis[0]
    assert "LeakyReLU layers fail the isolated check" in first and "negative slope that fits is 0.01 " in first, first
    assert not any("other weights" in d for d in report.diagnosis)


def test_another_input_is_named_as_such(env):
    swapped = np.ascontiguousarray(env["x"][:, ::-1])  # BGR <-> RGB
    report = compare(env["golden"], run_with(env, x=swapped))
    assert not report.passed and report.consistent_with is None
    assert [n for n, _ in report.isolated_failures] == ["conv_stem"]
    assert any("fed another input" in d for d in report.diagnosis), report.diagnosis


def test_honest_and_one_layer_bugs_keep_their_diagnosis(env):
    assert compare(env["golden"], execute(env["weights"].graph, env["weights"].params("float32"), env["x"],
                                          intermediates=True)).passed
    params = dict(env["weights"].params("float32"))
    key = "blocks.6.0.ghost2.primary_conv.0.weight"
    params[key] = params[key].copy()
    params[key][3, 7, 0, 0] *= 1.01
    report = compare(env["golden"], execute(env["weights"].graph, params, env["x"], intermediates=True))
    assert report.first_divergent == "blocks.6.0.ghost2.primary_conv.0"
    assert not any("computes another function (not a lower precision" in d for d in report.diagnosis)
