"""Importing a GhostNet exported to ONNX (``refghost convert model.onnx``): recognition of the
architecture and its config, the semantic lint on the bank's planted bugs, and the folding's own
rounding, measured and bounded.

The imported (BN-folded) weights and the original (unfolded) ones differ only by the exporter's
float32 folding: each folded weight and bias is off by at most ``FOLD_ROUNDINGS`` (4) units of
roundoff (checked here per weight), and ``refghost.bounds.folding_bound`` carries that to every
output; the float64 runs of the two weight sets must agree within it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

try:
    import onnx_bank as ob
    import torch_ghostnet as tg
except ModuleNotFoundError:  # e.g. if tests/ becomes a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import onnx_bank as ob
    import torch_ghostnet as tg

import refghost
from refghost import ops
from refghost.arch import DEFAULT_OUT_STAGES, Config, build_graph
from refghost.bounds import FLOAT32_U, FOLD_ROUNDINGS, folded_convs, folding_bound
from refghost.ops import fold_batch_norm
from refghost.cli import main
from refghost.verify.compare import compare
from refghost.convert import convert
from refghost.errors import WeightsError
from refghost.verify.golden import read_golden
from refghost.convert.onnx_import import import_onnx
from refghost.convert.onnx_width import conv_weight_shapes, recognise_width
from refghost.weights import NANODET_PREPROCESSING, from_tensors, load_weights, save_weights

#: The banks built (once each): LeakyReLU at width 0.5 and ReLU at width 1.0 with other out_stages
#: with the TorchScript exporter only, then ReLU at width 0.5 with both exporters. (A dynamo export
#: takes 5-10 s, and TorchScript exports after one run about 3x slower: the dynamo bank is built last.)
BANKS = {
    "leaky": dict(width=0.5, activation="LeakyReLU", dynamo=False),
    "wide": dict(width=1.0, activation="ReLU", out_stages=(2, 5, 9), dynamo=False),
    "relu": dict(width=0.5, activation="ReLU"),
}
HONEST = ("ts_folded", "ts_unfolded", "ts_nonames", "ts_anonymous", "dynamo")
#: Bug entries the importer refuses: the words its message must contain (besides the layer and the ONNX node).
REFUSED = {
    "bug_hardsigmoid": "alpha=0.2",
    "bug_bn_eps": "epsilon 0.001",
    "bug_concat_swap": "[cheap_operation, primary_conv]",
    "bug_no_residual": "residual Add is missing",
    "bug_tf_padding": "pads [1, 1, 2, 2]",
    "bug_relu6": "ReLU6",
    "bug_leaky_slope": "alpha 0.01",
}
#: Wrong values, not a wrong graph: imported as they are; a golden comparison finds the layer.
VALUES_ONLY = ("bug_bgr_stem", "bug_weight_1pct")


@dataclass
class Built:
    """A bank with its original weights, their float64 outputs and (lazily) their golden file."""

    bank: ob.Bank
    folder: Path
    original: refghost.Weights
    reference: dict
    _golden: object = field(default=None, repr=False)

    def golden(self):
        """``refghost golden`` of the original (unfolded) weights on the bank's input, with intermediates."""
        if self._golden is None:
            save_weights(self.folder / "original.h5", self.original)
            np.save(self.folder / "x.npy", self.bank.x)
            assert main(["golden", "--weights", str(self.folder / "original.h5"), "--out",
                         str(self.folder / "golden.h5"), "--input", str(self.folder / "x.npy"),
                         "--intermediates"]) == 0
            self._golden = read_golden(self.folder / "golden.h5")
        return self._golden


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Export on one thread: on a busy small machine PyTorch's OpenMP pool is up to 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Models this file exports itself (TorchScript): (arch, width, activation, out_stages, num_classes).
EXPORTS = {
    "PReLU": ("nanodet", 0.25, "PReLU", (3, 5, 9), 0),
    "SiLU": ("nanodet", 0.25, "SiLU", (3, 5, 9), 0),
    "classifier": ("ghostnet", 0.5, "ReLU", (), 10),  # Huawei's GhostModule slices: a Slice after each Concat
}


@dataclass
class Exported:
    path: Path
    model: object
    x: np.ndarray
    config: Config  # the original (unfolded) config


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    """Every bank of BANKS and every model of EXPORTS, exported before anything runs refghost:
    PyTorch exports slow down several times once refghost's parallel kernels have run (their
    worker threads compete for the cores)."""
    import torch

    banks, exports = {}, {}
    folder = tmp_path_factory.mktemp("exports")
    for seed, (name, (arch, width, activation, stages, classes)) in enumerate(EXPORTS.items()):
        model = tg.randomize(tg.build(arch, width, activation, out_stages=stages or DEFAULT_OUT_STAGES,
                                      num_classes=classes or 1000), seed).eval()
        x = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)
        with ob._quiet():
            torch.onnx.export(model, (torch.from_numpy(x),), str(folder / f"{name}.onnx"), dynamo=False,
                              opset_version=ob.TS_OPSET, input_names=["input"])
        config = Config(arch=arch, width=width, activation=activation, out_stages=stages or DEFAULT_OUT_STAGES,
                        num_classes=classes)
        exports[name] = Exported(folder / f"{name}.onnx", model, x, config)
    for name, options in BANKS.items():  # the dynamo export last: TorchScript exports slow down after one
        folder = tmp_path_factory.mktemp(f"bank_{name}")
        banks[name] = (folder, ob.build_bank(folder, **options))
    return banks, exports


@pytest.fixture(scope="module")
def banks(torch_models):
    built, _ = torch_models
    cache = {}

    def get(name) -> Built:
        if name not in cache:
            folder, bank = built[name]
            original = from_tensors(bank.state_dict_numpy(), bank.refghost_config())
            cache[name] = Built(bank, folder, original, refghost.run(bank.x, original, dtype="float64"))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exports(torch_models):
    return torch_models[1]


def _entry(built: Built, name: str):
    if name not in built.bank:
        pytest.skip(f"{name} not built: {built.bank.skipped.get(name, 'not applicable')}")
    return built.bank[name]


def _ratio(diff, bound) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.max(np.where(diff == 0, 0.0, diff / bound)))


def _bias_magnitudes(original: refghost.Weights, folded_graph) -> dict:
    """|beta| + |mean * alpha| of every BN folded into a conv: what the exporter's subtraction saw."""
    sd = original.params("float64")
    out = {}
    for name in folded_convs(folded_graph):
        node = folded_graph.node(name)
        alpha, _ = ops.batch_norm_coefficients(*(sd[f"{name}.{r}"] for r in ("weight", "bias", "running_mean",
                                                                              "running_var")))
        out[node.params["bias"]] = np.abs(sd[f"{name}.bias"]) + np.abs(sd[f"{name}.running_mean"] * alpha)
    return out


def _folding_rounding(original: refghost.Weights, imported: refghost.Weights) -> tuple[float, float]:
    """Largest |W' - W alpha| / (u |W alpha|) and |b' - beta'| / (u (|beta| + |mean alpha|)) over all folded convs."""
    sd = original.params("float64")
    graph = imported.graph
    mags = _bias_magnitudes(original, graph)
    worst_w = worst_b = 0.0
    for name in folded_convs(graph):
        node = graph.node(name)
        bn = [sd[f"{name}.{r}"] for r in ("weight", "bias", "running_mean", "running_var")]
        w, b = fold_batch_norm(sd[node.params["weight"]], None, *bn)
        got_w = imported.tensors[node.params["weight"]].astype(np.float64)
        got_b = imported.tensors[node.params["bias"]].astype(np.float64)
        worst_w = max(worst_w, _ratio(np.abs(got_w - w), FLOAT32_U * np.abs(w)))
        worst_b = max(worst_b, _ratio(np.abs(got_b - b), FLOAT32_U * mags[node.params["bias"]]))
    return worst_w, worst_b


# ------------------------------------------------------------------------------------------
# Models exported here: other activations, the ImageNet classifier
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(EXPORTS))
def test_other_activations_and_the_imagenet_classifier(exports, name):
    e = exports[name]
    w = import_onnx(e.path)
    assert w.config == replace(e.config, folded=True)
    assert w.preprocessing.channel_order == ("RGB" if e.config.arch == "ghostnet" else "BGR")
    original = from_tensors(tg.state_dict_numpy(e.model), e.config)
    for key in ("act1.weight", "classifier.weight"):  # read as stored: PReLU's slope, the Linear
        if key in original.tensors:
            np.testing.assert_array_equal(w.tensors[key], original.tensors[key])
    rw, rb = _folding_rounding(original, w)
    assert rw <= FOLD_ROUNDINGS and rb <= FOLD_ROUNDINGS, (rw, rb)
    _, bound = folding_bound(w.graph, w.params("float64"), e.x.astype(np.float64),
                             bias_magnitude=_bias_magnitudes(original, w.graph))
    out, ref = refghost.run(e.x, w, dtype="float64"), refghost.run(e.x, original, dtype="float64")
    for name, node in w.graph.outputs.items():
        assert _ratio(np.abs(out[name] - ref[name]), bound[node]) <= 1.0, name


# ------------------------------------------------------------------------------------------
# Honest exports
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bank, entry", [(b, e) for b in BANKS for e in HONEST
                                         if e != "dynamo" or BANKS[b].get("dynamo", True)])
def test_honest_export_imports_within_the_folding_bound(banks, bank, entry):
    built = banks(bank)
    e = _entry(built, entry)
    w = import_onnx(e.path)
    b = built.bank
    assert w.config == Config(arch="nanodet", width=b.width, activation=b.activation, out_stages=b.out_stages,
                              folded=True)
    assert w.preprocessing.mean == NANODET_PREPROCESSING.mean and w.preprocessing.channel_order == "BGR"
    assert w.preprocessing.input_size == (b.x.shape[3], b.x.shape[2])  # the graph's fixed input size
    assert w.provenance["converter"] == f"refghost {refghost.__version__} convert (onnx)"
    assert w.provenance["source_file"] == e.path.name and len(w.provenance["source_sha256"]) == 64
    assert ("folded by refghost" in w.provenance["description"]) == (entry == "ts_unfolded")
    assert ("by structure" in w.provenance["description"]) == (entry in ("ts_nonames", "ts_anonymous"))

    # The premise: every folded weight and bias within FOLD_ROUNDINGS roundings of the exact fold.
    rw, rb = _folding_rounding(built.original, w)
    assert rw <= FOLD_ROUNDINGS and rb <= FOLD_ROUNDINGS, (rw, rb)
    # Its consequence: the float64 outputs of the two weight sets agree within folding_bound.
    x = b.x.astype(np.float64)
    out = refghost.run(b.x, w, dtype="float64")
    _, bound = folding_bound(w.graph, w.params("float64"), x, bias_magnitude=_bias_magnitudes(built.original, w.graph))
    for name, node in w.graph.outputs.items():
        diff = np.abs(out[name] - built.reference[name])
        scale = np.abs(built.reference[name]).max()
        assert _ratio(diff, bound[node]) <= 1.0, (name, _ratio(diff, bound[node]))
        # A regression guard on top of the bound: measured 1e-7..2e-7 of the scale (2.4-3u); 1e-6 is
        # about 16u, the size of a few roundings per folded weight carried through the network.
        assert diff.max() <= 1e-6 * scale, (name, diff.max(), scale)


@pytest.mark.parametrize("bank, entry", [("relu", "ts_folded"), ("relu", "ts_unfolded"), ("relu", "dynamo"),
                                         ("leaky", "ts_folded"), ("leaky", "ts_anonymous")])
def test_imported_float32_run_passes_against_the_golden_of_the_original(banks, bank, entry):
    built = banks(bank)
    w = import_onnx(_entry(built, entry).path)
    candidate = refghost.run(built.bank.x, w, dtype="float32", intermediates=True)
    report = compare(built.golden(), candidate)
    assert report.passed, [(t.name, t.accumulated_ratio, t.isolated_ratio) for t in report.tensors if t.status != "ok"]
    # The folded graph's nodes are named after the BN nodes: they line up with the unfolded names.
    compared = {t.name for t in report.tensors}
    assert {"bn1", "blocks.4.0.ghost1.primary_conv.1", "blocks.7.0.bn_dw", "blocks.9.0.bn1"} <= compared
    assert "conv_stem" not in compared and len(compared) > 200


# ------------------------------------------------------------------------------------------
# Bugs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bank, entry", [(b, e) for b in ("relu", "leaky") for e in REFUSED
                                         if (b, e) not in (("relu", "bug_leaky_slope"), ("leaky", "bug_relu6"))])
def test_bug_refused_naming_layer_and_node(banks, bank, entry):
    e = _entry(banks(bank), entry)
    with pytest.raises(WeightsError) as info:
        import_onnx(e.path)
    message = str(info.value)
    layer = message.split("layer ", 1)[1].split(":", 1)[0]
    assert e.blames(layer), (layer, e.expected_first, message)
    assert all(node in message for node in e.onnx_nodes), (e.onnx_nodes, message)
    assert REFUSED[entry] in message, message


@pytest.mark.parametrize("entry", VALUES_ONLY)
def test_wrong_values_import_and_the_golden_comparison_finds_them(banks, entry):
    built = banks("relu")
    e = _entry(built, entry)
    w = import_onnx(e.path)  # the graph is GhostNet: statically undetectable
    report = compare(built.golden(), refghost.run(built.bank.x, w, dtype="float32", intermediates=True))
    assert not report.passed and e.blames(report.first_divergent), report.first_divergent


# ------------------------------------------------------------------------------------------
# Activations: every pattern of both exporters, by editing the ReLUs of an honest export
# ------------------------------------------------------------------------------------------
def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _pattern(kind):
    """A function (x, y, prefix) -> (nodes, initializers) computing activation ``kind`` from x into y."""

    def make(x, y, p):
        one = lambda op, ins, out, **kw: helper.make_node(op, ins, [out], name=p + op + out[-1:], **kw)  # noqa: E731
        if kind in ("Relu", "HardSwish", "Sigmoid"):
            return [one(kind, [x], y)], []
        if kind.startswith("LeakyRelu"):
            return [one("LeakyRelu", [x], y, alpha=float(kind.split(":")[1]))], []
        if kind.startswith("Clip"):
            lo, hi = kind.split(":")[1:]
            return [one("Clip", [x, p + "lo", p + "hi"], y)], [_const(p + "lo", float(lo)), _const(p + "hi", float(hi))]
        if kind == "Elu":
            return [one("Elu", [x], y, alpha=1.0)], []
        if kind == "Selu":
            return [one("Selu", [x], y)], []
        if kind == "EluMul":  # the dynamo exporter's SELU
            return [one("Elu", [x], p + "e", alpha=ops.SELU_ALPHA), one("Mul", [p + "e", p + "s"], y)], \
                [_const(p + "s", ops.SELU_SCALE)]
        if kind.startswith("PRelu"):
            n = int(kind.split(":")[1])
            return [one("PRelu", [x, p + "slope"], y)], [_const(p + "slope", np.full((n, 1, 1), 0.25))]
        if kind.startswith("HardSigmoidMul"):
            alpha = float(kind.split(":")[1])
            return [one("HardSigmoid", [x], p + "h", alpha=alpha, beta=0.5), one("Mul", [x, p + "h"], y)], []
        if kind.startswith("Gelu"):
            return [one("Gelu", [x], y, approximate=kind.split(":")[1])], []
        if kind == "Erf":  # TorchScript's order: x * (1 + erf(x / sqrt 2)) * 0.5
            return [one("Div", [x, p + "r2"], p + "d"), one("Erf", [p + "d"], p + "e"),
                    one("Add", [p + "e", p + "1"], p + "a"), one("Mul", [x, p + "a"], p + "m"),
                    one("Mul", [p + "m", p + "h"], y)], \
                [_const(p + "r2", np.sqrt(2.0)), _const(p + "1", 1.0), _const(p + "h", 0.5)]
        if kind == "SigmoidMul":
            return [one("Sigmoid", [x], p + "s"), one("Mul", [x, p + "s"], y)], []
        raise ValueError(kind)

    return make


def _replace_backbone_relus(source: Path, target: Path, make) -> Path:
    proto = onnx.load(str(source))
    g = proto.graph
    for relu in [n for n in g.node if n.op_type == "Relu" and "/se/" not in n.name]:
        nodes, inits = make(relu.input[0], relu.output[0], relu.name[: -len("Relu")])
        index = list(g.node).index(relu)
        g.node.remove(relu)
        for k, n in enumerate(nodes):
            g.node.insert(index + k, n)
        g.initializer.extend(inits)
    onnx.save(proto, str(target))
    return target


@pytest.fixture(scope="module")
def relu_export(banks):
    """The ReLU bank's ts_folded file and its import."""
    path = banks("relu").bank["ts_folded"].path
    return path, import_onnx(path)


@pytest.mark.parametrize("kind, expected", [
    ("LeakyRelu:0.1", "LeakyReLU"), ("Clip:0:6", "ReLU6"), ("Elu", "ELU"), ("Selu", "SELU"), ("EluMul", "SELU"),
    ("PRelu:1", "PReLU"), ("HardSwish", "HardSwish"), ("HardSigmoidMul:0.16666667", "HardSwish"),
    ("Gelu:none", "GELU"), ("Erf", "GELU"), ("SigmoidMul", "SiLU"),
])
def test_activation_patterns_recognised(relu_export, tmp_path, kind, expected):
    source, relu = relu_export
    w = import_onnx(_replace_backbone_relus(source, tmp_path / "edited.onnx", _pattern(kind)))
    assert w.config.activation == expected and w.config.width == 0.5
    for key, value in relu.tensors.items():  # same conv weights, read through the new patterns
        np.testing.assert_array_equal(w.tensors[key], value)
    if expected == "PReLU":
        slopes = {k: v for k, v in w.tensors.items()
                  if k.endswith(("act1.weight", "primary_conv.2.weight", "cheap_operation.2.weight"))}
        assert len(slopes) == len(w.tensors) - len(relu.tensors) == 2 + 2 * 16 and all(
            v.shape == (1,) and v[0] == np.float32(0.25) for v in slopes.values())


@pytest.mark.parametrize("kind, message", [
    ("LeakyRelu:0.2", "LeakyRelu with alpha 0.2; NanoDet's LeakyReLU has slope 0.1"),
    ("Clip:0:4", r"is Clip\(0.0, 4.0\): not an activation GhostNet uses"), ("PRelu:4", "PRelu with 4 slopes"),
    ("HardSigmoidMul:0.2", r"HardSigmoid\(alpha=0.2, beta=0.5\) is not HardSwish"),
    ("Gelu:tanh", "approximate='tanh'"), ("Sigmoid", r"the ops \['Sigmoid'\] are not an activation"),
])
def test_activation_patterns_refused(relu_export, tmp_path, kind, message):
    source, _ = relu_export
    with pytest.raises(WeightsError, match="layer act1: ONNX node '/act1/.*" + message):
        import_onnx(_replace_backbone_relus(source, tmp_path / "edited.onnx", _pattern(kind)))


# ------------------------------------------------------------------------------------------
# Width recognition
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", (0.25, 0.28, 0.5, 0.75, 1.0, 1.3, 1.5, 2.0, 0.123))
def test_width_from_conv_shapes(width):
    shapes = conv_weight_shapes(build_graph(Config(width=width, folded=True)))
    found = recognise_width(shapes)
    assert conv_weight_shapes(build_graph(Config(width=found, folded=True))) == shapes
    if width != 0.123:  # 0.123 and 0.12 give the same channels: the shorter decimal is recorded
        assert found == width


def test_width_refused_when_no_width_matches():
    shapes = conv_weight_shapes(build_graph(Config(width=0.5, folded=True)))
    shapes[-1] = (shapes[-1][0] + 4,) + shapes[-1][1:]
    with pytest.raises(WeightsError, match="match no GhostNet width.*stem of 8 channels"):
        recognise_width(shapes)


# ------------------------------------------------------------------------------------------
# convert() and the CLI
# ------------------------------------------------------------------------------------------
def test_cli_convert_then_golden_compares_with_the_original(banks, tmp_path, capsys):
    built = banks("relu")
    out = tmp_path / "w.h5"
    assert main(["convert", str(_entry(built, "dynamo").path), "--out", str(out)]) == 0
    assert "width 0.5" in capsys.readouterr().out
    w = load_weights(out)
    assert w.config == Config(width=0.5, activation="ReLU", folded=True)
    assert w.provenance["converter"].endswith("convert (onnx)")
    np.save(tmp_path / "x.npy", built.bank.x)
    assert main(["golden", "--weights", str(out), "--out", str(tmp_path / "g.h5"), "--input",
                 str(tmp_path / "x.npy"), "--intermediates"]) == 0
    imported = read_golden(tmp_path / "g.h5")
    report = compare(built.golden(), imported.tensors())  # float64 oracle of the folded file as candidate
    assert report.passed and len(report.tensors) > 200


def test_cli_refuses_a_non_ghostnet_onnx(tmp_path, capsys):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("Relu", ["c"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    onnx.save(helper.make_model(graph), str(tmp_path / "tiny.onnx"))
    assert main(["convert", str(tmp_path / "tiny.onnx"), "--out", str(tmp_path / "w.h5")]) == 2
    err = capsys.readouterr().err
    assert "tiny.onnx: not recognised as a GhostNet NanoDet backbone: it has 1 Conv node(s), GhostNet's has 94" in err
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01garbage" * 10)
    assert main(["convert", str(tmp_path / "junk.onnx"), "--out", str(tmp_path / "w.h5")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx", "tiny.onnx"]  # nothing written


def test_explicit_options_must_agree_with_the_graph(banks, tmp_path, capsys):
    path = banks("leaky").bank["ts_folded"].path
    out = tmp_path / "w.h5"
    for option, value in (("width", 0.75), ("width", 1.0), ("activation", "ReLU6"), ("activation", "ReLU"),
                          ("out_stages", (4, 6)), ("arch", "ghostnet")):  # explicit defaults are checked too
        with pytest.raises(WeightsError, match=f"--{option.replace('_', '-')} .* contradicts the ONNX graph"):
            convert(path, out, **{option: value})
    assert not out.exists()
    w = convert(path, out, width=0.5, activation="LeakyReLU", out_stages=(9, 4, 6), arch="nanodet")
    assert w.config == Config(width=0.5, activation="LeakyReLU", folded=True) and load_weights(out).config == w.config
    assert main(["convert", str(path), "--out", str(out), "--width", "0.75"]) == 2
    assert "--width 0.75 contradicts the ONNX graph, which is width 0.5" in capsys.readouterr().err
