"""`refghost compare` on dumps (.npz/.npy/.h5): verdicts, localisation, metrics, exit codes.

ONNX candidates (honest exports and graph-edited bugs) are in tests/test_compare_onnx.py.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch_ghostnet as tg

import refghost
from refghost.arch import Config
from refghost.cli import main
from refghost.verify.compare import CompareError, compare, format_report
from refghost.forward import evaluate, execute
from refghost.verify.golden import make_golden, read_golden, write_golden
from refghost.weights import from_tensors

CONFIG = Config(width=0.5, activation="LeakyReLU", out_stages=(4, 6, 9))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    model = tg.randomize(tg.build("nanodet", 0.5, "LeakyReLU"), seed=3)
    weights = from_tensors(tg.state_dict_numpy(model), CONFIG)
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    write_golden(folder / "g.h5", make_golden(weights, x, intermediates=True))
    return dict(folder=folder, model=model, weights=weights, x=x, golden=read_golden(folder / "g.h5"))


def _run_variant(env, *, edit_params=None, edit_graph=None):
    """refghost float32 on a modified network: a stand-in for a buggy backend."""
    weights = env["weights"]
    graph = copy.deepcopy(weights.graph)
    params = dict(weights.params("float32"))
    if edit_params:
        edit_params(params)
    if edit_graph:
        edit_graph(graph)
    return execute(graph, params, env["x"], intermediates=True)


def test_honest_refghost_float32_passes(env):
    report = compare(env["golden"], refghost.run(env["x"], env["weights"], intermediates=True))
    assert report.passed and report.first_divergent is None
    assert len(report.tensors) == len(env["golden"].tensors())
    checked = [t for t in report.tensors if t.isolated_ratio is not None]
    assert len(checked) == len(env["golden"].intermediates)  # every layer; outputs are aliases of layers
    assert all(t.isolated_ratio <= 1 for t in checked)
    assert max(t.accumulated_ratio for t in report.tensors) > 0.01  # the bound is not vacuous


def test_honest_pytorch_float32_passes(env):
    _, layers = tg.capture(env["model"], env["x"])
    report = compare(env["golden"], {k: v.numpy() for k, v in layers.items()})
    assert report.passed, [t.name for t in report.tensors if t.status != "ok"]
    se = next(t for t in report.tensors if t.name == "blocks.3.0.se")
    assert se.isolated_segment == ["blocks.3.0.se.gate", "blocks.3.0.se"]  # the gate has no hook


def test_outputs_only_cannot_localize(env):
    out = refghost.run(env["x"], env["weights"])
    report = compare(env["golden"], out)
    assert report.passed and [t.name for t in report.tensors] == ["blocks.4", "blocks.6", "blocks.9"]
    assert any("no isolated check" in n for n in report.notes)
    text = format_report(report)
    assert "no isolated check was possible)" in text and "iso/bound 0" not in text


def _scale_one_weight(key, index, factor):
    def edit(params):
        w = params[key].copy()
        w[index] *= np.float32(factor)
        params[key] = w
    return edit


@pytest.mark.parametrize("variant, expected", [
    (dict(edit_params=_scale_one_weight("blocks.6.0.ghost2.primary_conv.0.weight", (3, 7, 0, 0), 1.01)),
     "blocks.6.0.ghost2.primary_conv.0"),
    (dict(edit_graph=lambda g: g.node("blocks.2.0.ghost1.primary_conv.1").attrs.__setitem__("eps", 1e-3)),
     "blocks.2.0.ghost1.primary_conv.1"),
    (dict(edit_graph=lambda g: g.node("blocks.4.0.ghost1.cheap_operation.2").attrs.__setitem__("activation", "ReLU")),
     "blocks.4.0.ghost1.cheap_operation.2"),
    (dict(edit_params=_scale_one_weight("conv_stem.weight", (0, 0, 1, 1), 1.001)), "conv_stem"),
])
def test_bug_is_caught_and_localized(env, variant, expected):
    report = compare(env["golden"], _run_variant(env, **variant))
    assert not report.passed
    assert report.first_divergent == expected
    first = next(t for t in report.tensors if t.name == expected)
    assert first.isolated_ratio > 1 and first.status == "mismatch"
    before = [t for t in report.tensors[: report.tensors.index(first)]]
    assert all(t.status == "ok" for t in before)


def test_nan_and_shape_mismatch(env):
    out = refghost.run(env["x"], env["weights"], intermediates=True)
    out["blocks.5.0.ghost1"] = out["blocks.5.0.ghost1"].copy()
    out["blocks.5.0.ghost1"][0, 0, 0, 0] = np.nan
    report = compare(env["golden"], out)
    assert not report.passed and report.first_divergent == "blocks.5.0.ghost1"
    assert next(t for t in report.tensors if t.name == "blocks.5.0.ghost1").status == "nan"
    out = refghost.run(env["x"], env["weights"])
    out["blocks.6"] = out["blocks.6"][:, :10]
    report = compare(env["golden"], out)
    assert not report.passed and report.first_divergent == "blocks.6"
    assert "candidate shape" in report.tensors[1].note


def test_missing_batch_axis_is_accepted(env):
    out = refghost.run(env["x"], env["weights"])
    report = compare(env["golden"], {"blocks.9": out["blocks.9"][0]})
    assert report.passed and any("no batch axis" in n for n in report.notes)


def test_nothing_in_common(env):
    with pytest.raises(CompareError, match="no tensor in common"):
        compare(env["golden"], {"output": np.zeros(3)})


def test_policies_scale_the_bound(env):
    """A backend that stores every tensor in float16 (computing each layer in float32 from the
    stored float16 inputs, as ncnn and MNN do) is a mismatch for a float32 backend's bounds and
    honest for a float16 one's."""
    weights = env["weights"]
    params = weights.params("float32")
    stored = {"input": env["x"].astype(np.float16)}
    for node in weights.graph.nodes:
        ins = [stored[s].astype(np.float32) for s in node.inputs]
        stored[node.name] = evaluate(node, ins, params).astype(np.float16)
    del stored["input"]
    as_float32 = compare(env["golden"], stored)
    assert not as_float32.passed
    # the diagnosis names the tightest policy these errors fit: float16 storage, float32 arithmetic
    assert as_float32.consistent_with == "float16-storage", as_float32.diagnosis
    assert any("stored in float16" in d for d in as_float32.diagnosis)
    for policy in ("float16-storage", "float16"):
        report = compare(env["golden"], stored, policy=policy)
        assert report.passed, [(t.name, t.accumulated_ratio, t.isolated_ratio) for t in report.tensors
                               if t.status != "ok"]


def test_diagnosis_of_one_wrong_weight_and_of_other_weights(env):
    """One weight 1% off is a localized difference, never explained away as a lower precision;
    a candidate computed with other weights differs from the first layer on, and the report says
    that the weights or the preprocessing probably differ."""
    bug = _run_variant(env, edit_params=_scale_one_weight("blocks.6.0.ghost2.primary_conv.0.weight", (3, 7, 0, 0),
                                                          1.01))
    report = compare(env["golden"], bug)
    assert not report.passed and report.consistent_with is None
    assert report.isolated_failures[0][0] == report.first_divergent == "blocks.6.0.ghost2.primary_conv.0"
    assert not any("other weights" in d for d in report.diagnosis)

    other = tg.randomize(tg.build("nanodet", 0.5, "LeakyReLU"), seed=4)
    other_weights = from_tensors(tg.state_dict_numpy(other), CONFIG)
    report = compare(env["golden"], refghost.run(env["x"], other_weights, intermediates=True))
    assert not report.passed and report.consistent_with is None
    assert any("other weights or another preprocessing" in d for d in report.diagnosis), report.diagnosis


def test_explicit_tolerances(env):
    out = refghost.run(env["x"], env["weights"])
    report = compare(env["golden"], out, atol=0.0, rtol=0.0)
    assert not report.passed  # float32 is not float64
    worst = max(t.min_atol for t in report.tensors)
    assert compare(env["golden"], out, atol=worst * 1.01).passed


def test_metrics(env):
    out = refghost.run(env["x"], env["weights"])
    t = compare(env["golden"], out).tensors[2]
    assert 0 < t.max_abs < 1e-4 and t.cosine > 0.999999 and t.snr_db > 100 and t.max_ulp >= 1
    assert t.min_rtol == t.max_rel and len(t.worst_index) == 4 and t.fraction_outside == 0


def test_cli_exit_codes_and_json(env, tmp_path, capsys):
    golden = str(env["folder"] / "g.h5")
    np.savez(tmp_path / "good.npz", **refghost.run(env["x"], env["weights"], intermediates=True))
    assert main(["compare", golden, str(tmp_path / "good.npz"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "conv_stem" not in out  # a pass is one line, every row with --verbose
    assert main(["compare", golden, str(tmp_path / "good.npz"), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "conv_stem" in out and "acc/bound: the largest" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True and report["first_divergent"] is None
    assert {"max_abs", "max_rel", "mean_abs", "cosine", "snr_db", "max_ulp", "fraction_outside", "worst_index",
            "min_atol", "min_rtol", "accumulated_ratio", "isolated_ratio"} <= set(report["tensors"][0])

    bad = _run_variant(env, edit_params=_scale_one_weight("blocks.7.0.conv_dw.weight", (5, 0, 2, 2), 1.01))
    np.savez(tmp_path / "bad.npz", **bad)
    assert main(["compare", golden, str(tmp_path / "bad.npz"), "--json", str(tmp_path / "b.json")]) == 1
    out = capsys.readouterr().out
    assert "> blocks.7.0.conv_dw " in out and "FAIL" in out
    assert json.loads((tmp_path / "b.json").read_text())["first_divergent"] == "blocks.7.0.conv_dw"

    np.save(tmp_path / "s9.npy", refghost.run(env["x"], env["weights"])["blocks.9"])
    assert main(["compare", golden, str(tmp_path / "s9.npy")]) == 2  # which output is it?
    assert "--map s9=" in capsys.readouterr().err
    assert main(["compare", golden, str(tmp_path / "s9.npy"), "--map", "s9=blocks.9"]) == 0
    assert main(["compare", golden, golden]) == 0  # a golden file is an (exact) candidate
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["{golden}", "{tmp}/none.npz"], "no such candidate file"),
    (["{tmp}/none.h5", "{tmp}/none.npz"], "no such golden file"),
    (["{golden}", "{tmp}/other.npz"], "no tensor in common"),
    (["{golden}", "{tmp}/other.npz", "--map", "zzz=blocks.9"], "--map names 'zzz'"),
    (["{golden}", "{tmp}/x.txt"], "unknown candidate type"),
    (["{golden}", "{tmp}/other.npz", "--map", "nonsense"], "expected CANDIDATE_NAME=MODULE.PATH"),
])
def test_cli_unusable_input_exits_2(env, tmp_path, capsys, args, message):
    np.savez(tmp_path / "other.npz", output=np.zeros(3))
    (tmp_path / "x.txt").write_text("x")
    argv = ["compare"] + [a.format(golden=env["folder"] / "g.h5", tmp=tmp_path) for a in args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_pytorch_classifier_outputs(tmp_path):
    model = tg.randomize(tg.build("ghostnet", 0.5, num_classes=5), seed=1)
    weights = from_tensors(tg.state_dict_numpy(model), Config(arch="ghostnet", width=0.5, num_classes=5))
    x = np.random.default_rng(2).standard_normal((2, 3, 40, 40)).astype(np.float32)
    golden = make_golden(weights, x)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    assert compare(golden, {"classifier": logits}).passed
    logits[1, 3] += 1e-3
    report = compare(golden, {"classifier": logits})
    assert not report.passed and report.first_divergent == "classifier"


def test_ulp_distance_counts_representable_values():
    from refghost.verify.compare import _ulp_distance

    a = np.array([1.0, -1.0, 0.0, -0.0, 1e-45, 3.0e38], np.float32)
    assert _ulp_distance(a, np.nextafter(a, np.float32(np.inf))).tolist() == [1.0] * 6
    assert _ulp_distance(np.float32([-0.0]), np.float32([0.0])).tolist() == [0.0]
    assert _ulp_distance(np.float32([-1e-45]), np.float32([1e-45])).tolist() == [2.0]  # -min, (+-0), +min
    assert _ulp_distance(np.float64([-1.0]), np.float64([1.0]))[0] == 2 * 0x3FF0000000000000
