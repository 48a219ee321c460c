"""Real runtimes as candidates (refghost.runtimes): OpenVINO, MNN, LiteRT and ONNX Runtime run models
this file converts itself (torch -> ONNX -> OpenVINO IR / MNN; refghost weights -> .tflite with
tests/tflite_writer.py), and a .tflite made once by a real converter (litert-torch, whose 1.4 GB of
dependencies stay out of the test extra: tests/data/README.md), on golden inputs, every exposed
tensor mapped to a module path.

Small models (width 0.5, 64x64) check mapping coverage, layouts, values, the precision reported,
errors and a bug written into the weights; one honest run per runtime at 320x320 (width 1.0), at
the runtime's defaults and its precise settings, records its verdict (printed, not asserted: the
bounds for these runtimes are another issue's) and asserts the values are close.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch_ghostnet as tg
from onnx import numpy_helper
from onnx_bank import _anonymize, _export_torchscript
from tflite_writer import write_ghostnet_tflite

from refghost import Config
from refghost.cli import main
from refghost.verify.compare import compare
from refghost.verify.golden import make_golden, read_golden, write_golden
from refghost.runtimes import RuntimeMissing, run_model
from refghost.weights import from_tensors

import ai_edge_litert.interpreter  # noqa: F401  (the runtimes are in the test extra: a missing one fails loudly)
import MNN  # noqa: F401
import openvino as ov

OUTPUTS = ("blocks.4", "blocks.6", "blocks.9")
#: The depthwise conv whose weight the bug model changes (in a ghost2 module: no activation after
#: it to hide the change), and the layers that may stand for it (the conv, its folded BN).
BUG_MODULE = "blocks.6.1.ghost2.cheap_operation"
BUG_LAYERS = {f"{BUG_MODULE}.0", f"{BUG_MODULE}.1"}


def _cpu_has_bf16() -> bool:
    flags = open("/proc/cpuinfo").read()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _mnnconvert(onnx_path, mnn_path) -> None:
    """MNN's converter without its ``mnnconvert`` wrapper (which pip-installs a logging SDK and
    downgrades protobuf): the extension function the wrapper calls, in a child process."""
    done = subprocess.run([sys.executable, "-c", "import sys, _tools; _tools.mnnconvert(sys.argv)", "-f", "ONNX",
                           "--modelFile", str(onnx_path), "--MNNModel", str(mnn_path), "--bizCode", "refghost"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and mnn_path.exists(), done.stdout[-2000:] + done.stderr[-2000:]


def _openvino_ir(onnx_path, xml_path, *, compress_to_fp16: bool) -> None:
    model = ov.Core().read_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)


def _bug_model(proto: onnx.ModelProto) -> onnx.ModelProto:
    """One weight of the depthwise conv BUG_MODULE.0 times 1.01 (its largest-magnitude element)."""
    bug = onnx.ModelProto()
    bug.CopyFrom(proto)
    conv = next(n for n in bug.graph.node if n.op_type == "Conv" and n.name.startswith(
        "/" + "/".join(["blocks.6", "blocks.6.1", "ghost2", "cheap_operation", "cheap_operation.0"])))
    init = next(i for i in bug.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    index = np.unravel_index(int(np.argmax(np.abs(w))), w.shape)
    w[index] *= np.float32(1.01)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return bug


class Models:
    """One network's golden and its model files in every runtime's format."""

    def __init__(self, folder, *, width: float, size: int, seed: int = 0, bug: bool = False):
        self.folder = folder
        model = tg.randomize(tg.build("nanodet", width, "ReLU", (4, 6, 9)), seed)
        x = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
        weights = from_tensors(tg.state_dict_numpy(model), Config(arch="nanodet", width=width, activation="ReLU"))
        self.golden_path = folder / "golden.h5"
        write_golden(self.golden_path, make_golden(weights, x, intermediates=True))
        self.golden = read_golden(self.golden_path)
        proto = _export_torchscript(model, torch.from_numpy(x), OUTPUTS, folded=True)
        self.onnx = folder / "model.onnx"
        onnx.save(proto, self.onnx)
        variants = {"model": proto}
        if bug:
            variants["anonymous"] = _anonymize(proto)
            variants["bug"] = _bug_model(proto)
        for name, p in variants.items():
            onnx.save(p, folder / f"{name}.onnx")
            _openvino_ir(folder / f"{name}.onnx", folder / f"{name}.xml", compress_to_fp16=False)
            _mnnconvert(folder / f"{name}.onnx", folder / f"{name}.mnn")
        if bug:
            _openvino_ir(self.onnx, folder / "model_fp16.xml", compress_to_fp16=True)
        write_ghostnet_tflite(self.golden.weights, folder / "model.tflite", x.shape)
        if bug:
            write_ghostnet_tflite(self.golden.weights, folder / "bug.tflite", x.shape, bug_layer=f"{BUG_MODULE}.0")
            write_ghostnet_tflite(self.golden.weights, folder / "model_fp16.tflite", x.shape, float16_weights=True)


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("rt_small"), width=0.5, size=64, bug=True)


def _expected_layers(golden, *, fused_activations: bool, se_conv_fused: bool = False) -> set[str]:
    """The layers whose output a runtime exposes: every node but a conv whose BN was folded into it
    (and, where activations are fused, a conv or BN followed by its activation)."""
    graph = golden.weights.graph
    skip = set()
    for node in graph.nodes:
        consumers = [n for n in graph.nodes if node.name in n.inputs]
        if len(consumers) != 1:
            continue
        if node.op == "conv" and consumers[0].op == "batch_norm":
            skip.add(node.name)
        if fused_activations and node.op in ("conv", "batch_norm") and consumers[0].op == "act":
            skip.add(node.name)
        if se_conv_fused and node.op == "conv" and consumers[0].op == "hard_sigmoid":
            skip.add(node.name)  # LiteRT: it computes relu6(conv + 3), the gate's first steps
    return {n.name for n in graph.nodes} - skip


def _check_run(run, golden, *, fused_activations: bool, min_cosine: float):
    """Coverage, shapes and closeness of a run; returns its comparison report."""
    litert = run.runtime == "litert"
    expected = _expected_layers(golden, fused_activations=fused_activations, se_conv_fused=litert)
    mapped = {module for module, _ in run.mapping.values()}
    assert mapped == expected, (sorted(expected - mapped)[:5], sorted(mapped - expected)[:5])
    assert len(run.mapping) == len(expected) <= run.exposed
    if run.runtime != "onnxruntime":  # (ORT exposes every node output, constants and shapes too)
        # the exposed tensors that hold no layer: the two steps of each SE's hard-sigmoid before its
        # last op ((x + 3) and its clip; the division is the gate)
        n_se = sum(n.op == "scale" for n in golden.weights.graph.nodes)
        # (LiteRT: one per SE, its second conv computing relu6(x + 3))
        assert run.exposed - len(run.mapping) == (1 if litert else 2) * n_se, (run.exposed, len(run.mapping), n_se)
    reference = golden.tensors()
    for name, value in run.tensors.items():
        assert value.shape == reference[name].shape, name
    report = compare(golden, run.tensors, policy="float32")
    assert len(report.tensors) == len(expected) + len(OUTPUTS)
    worst = min(report.tensors, key=lambda t: t.cosine)
    assert worst.cosine > min_cosine, (worst.name, worst.cosine)
    return report


# ------------------------------------------------------------------------------------------
# OpenVINO
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["model.xml", "model.onnx"])
def test_openvino_maps_every_layer_and_matches(small, model):
    for precise in (False, True):
        run = run_model(str(small.folder / model), small.golden, runtime="openvino" if model.endswith(".onnx")
                        else None, precise=precise, threads=2)
        assert run.runtime == "openvino" and run.version == ov.__version__.split("-")[0]
        _check_run(run, small.golden, fused_activations=False, min_cosine=0.99999 if precise else 0.999)
        assert {how for _, how in run.mapping.values()} == {"by exporter scope names"}
        bf16 = _cpu_has_bf16() and not precise
        # bf16 inference precision: bf16 weights and tensors, float32 accumulation
        assert run.precision.arithmetic == "float32", run.precision
        assert run.precision.activations == run.precision.weights == ("bfloat16" if bf16 else "float32")
        assert run.precision.policy == ("bfloat16-storage" if bf16 else "float32")
        assert run.options["INFERENCE_PRECISION_HINT"] == ("bf16" if bf16 else "f32")
        if precise:
            assert run.options["EXECUTION_MODE_HINT"] == "ACCURACY"
        print(f"openvino {model} precise={precise}: {run.mapping_summary()}; {run.precision}")


def test_openvino_structure_fallback_and_fp16_weights(small):
    by_names = run_model(str(small.folder / "model.xml"), small.golden, precise=True)
    anonymous = run_model(str(small.folder / "anonymous.xml"), small.golden, precise=True)
    assert {how for _, how in anonymous.mapping.values()} == {"by structure (the graph has no scope names)"}
    assert sorted(anonymous.tensors) == sorted(by_names.tensors)
    for name, value in by_names.tensors.items():
        np.testing.assert_array_equal(anonymous.tensors[name], value, err_msg=name)
    compressed = run_model(str(small.folder / "model_fp16.xml"), small.golden, precise=True)
    assert compressed.precision.weights == "float16" and compressed.precision.arithmetic == "float32"


def test_openvino_options_are_applied_and_reported(small):
    run = run_model(str(small.folder / "model.xml"), small.golden,
                    options={"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": "1"})
    assert run.precision.arithmetic == "float32" and run.options["NUM_STREAMS"] == "1"


# ------------------------------------------------------------------------------------------
# MNN
# ------------------------------------------------------------------------------------------
def test_mnn_maps_every_layer_and_matches(small):
    for precise in (False, True):
        run = run_model(str(small.folder / "model.mnn"), small.golden, precise=precise, threads=2)
        assert run.runtime == "mnn" and run.options["precision"] == ("high" if precise else "normal")
        assert run.options["backend"] == "CPU" and run.options["numThread"] == "2"
        _check_run(run, small.golden, fused_activations=True, min_cosine=0.99999)
        assert run.precision.is_float32  # x86: MNN has no fp16 arithmetic at any precision mode
        print(f"mnn precise={precise}: {run.mapping_summary()}; {run.precision}")
    low = run_model(str(small.folder / "model.mnn"), small.golden, options={"precision": "low"})
    assert low.options["precision"] == "low"


def test_mnn_structure_fallback_gives_the_same_tensors(small):
    by_names = run_model(str(small.folder / "model.mnn"), small.golden)
    anonymous = run_model(str(small.folder / "anonymous.mnn"), small.golden)
    assert {how for _, how in anonymous.mapping.values()} == {"by structure (the graph has no scope names)"}
    assert sorted(anonymous.tensors) == sorted(by_names.tensors)
    for name, value in by_names.tensors.items():
        np.testing.assert_array_equal(anonymous.tensors[name], value, err_msg=name)


# ------------------------------------------------------------------------------------------
# LiteRT
# ------------------------------------------------------------------------------------------
def test_litert_maps_every_layer_and_matches(small):
    for precise in (False, True):
        run = run_model(str(small.folder / "model.tflite"), small.golden, precise=precise, threads=2)
        assert run.runtime == "litert" and run.options["num_threads"] == "2"
        assert run.options["delegate"] == ("none" if precise else "default (XNNPACK)")
        _check_run(run, small.golden, fused_activations=True, min_cosine=0.99999)
        assert {how for _, how in run.mapping.values()} == {"by conv weights and data flow"}
        assert run.precision.is_float32
        print(f"litert precise={precise}: {run.mapping_summary()}; {run.precision}")
    half = run_model(str(small.folder / "model_fp16.tflite"), small.golden)
    assert half.precision.weights == "float16" and half.precision.arithmetic == "float32", half.precision
    assert {m for m, _ in half.mapping.values()} == {m for m, _ in run.mapping.values()}


#: A real converter's output, made once by litert-torch (tests/data/README.md says how): the network
#: and input of ``small`` (width 0.5, ReLU, seed 0, 1x3x64x64).
LITERT_TORCH_MODEL = Path(__file__).resolve().parent / "data" / "ghostnet_w05_64.tflite"


def test_litert_on_a_real_converters_output(tmp_path, capsys):
    """litert-torch's .tflite, not this suite's writer: NCHW input and outputs around NHWC ops
    (TRANSPOSEs at both ends), its own op order, padding as PAD ops, BN folded, ReLU and the SE's
    ``+3``/ReLU6 fused into convs. Every layer maps, and `refghost compare` passes it, as deployed
    and --precise."""
    model = tg.randomize(tg.build("nanodet", 0.5, "ReLU", (4, 6, 9)), 0)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    weights = from_tensors(tg.state_dict_numpy(model), Config(arch="nanodet", width=0.5, activation="ReLU"))
    golden_path = tmp_path / "golden.h5"
    write_golden(golden_path, make_golden(weights, x, intermediates=True))
    golden = read_golden(golden_path)
    for precise in (False, True):
        run = run_model(str(LITERT_TORCH_MODEL), golden, precise=precise)
        assert {how for _, how in run.mapping.values()} == {"by conv weights and data flow"}
        _check_run(run, golden, fused_activations=True, min_cosine=0.99999)
        out = tmp_path / f"report_{precise}.json"
        code = main(["compare", str(golden_path), str(LITERT_TORCH_MODEL), "--json", str(out)]
                    + (["--precise"] if precise else []))
        assert code == 0, capsys.readouterr().out[-3000:]
        report = json.loads(out.read_text())
        assert report["passed"] and report["runtime"]["runtime"] == "litert"


# ------------------------------------------------------------------------------------------
# A bug in the weights shows at its module, in every runtime
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".onnx", ".xml", ".mnn", ".tflite"])
def test_a_weight_bug_differs_first_at_its_module(small, ext):
    honest = run_model(str(small.folder / f"model{ext}"), small.golden, precise=True)
    bug = run_model(str(small.folder / f"bug{ext}"), small.golden, precise=True)
    order = [name for name in small.golden.tensors() if name in honest.tensors and name not in OUTPUTS]
    first = next(name for name in order if not np.array_equal(honest.tensors[name], bug.tensors[name]))
    assert first in BUG_LAYERS, first
    # and checked against the golden from its own inputs, that layer is far off where the honest one is not
    ratio = {which: next(t.isolated_ratio for t in compare(small.golden, r.tensors).tensors if t.name == first)
             for which, r in (("honest", honest), ("bug", bug))}
    assert ratio["bug"] > 10 * max(ratio["honest"], 1.0), ratio


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, package, ext", [("openvino", "openvino", ".xml"), ("MNN", "mnn", ".mnn"),
                                                  ("ai_edge_litert", "ai-edge-litert", ".tflite")])
def test_missing_runtime_package_is_named(small, module, package, ext):
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from refghost.cli import main\n"
            f"sys.exit(main(['compare', {str(small.golden_path)!r}, {str(small.folder / ('model' + ext))!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"pip install {package}" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(RuntimeMissing):
        from refghost.runtimes import require
        require("refghost_no_such_runtime", "no-such-runtime")


@pytest.mark.parametrize("ext, runtime", [(".xml", "OpenVINO"), (".mnn", "MNN"), (".tflite", "LiteRT")])
def test_a_model_the_runtime_refuses_exits_2_with_its_message(small, tmp_path, capsys, ext, runtime):
    bad = tmp_path / f"bad{ext}"
    bad.write_bytes(b"\x00\x01 not a model")
    assert main(["compare", str(small.golden_path), str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{runtime} could not" in err and "Traceback" not in err


def test_unknown_option_and_map_without_golden(small, capsys):
    assert main(["compare", str(small.golden_path), str(small.folder / "model.mnn"),
                 "--runtime-option", "colour=blue"]) == 2
    assert "unknown MNN option 'colour'" in capsys.readouterr().err
    assert main(["map", str(small.folder / "model.xml")]) == 0  # no golden: the shipped network, by scope names
    assert "by exporter scope names" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# The commands
# ------------------------------------------------------------------------------------------
def test_compare_report_says_runtime_precision_and_mapping(small, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["compare", str(small.golden_path), str(small.folder / "model.xml"), "--precise", "--threads", "2",
                 "--json", str(out)])
    # --precise: f32 inference precision and ACCURACY mode on any CPU, an honest float32 run: it passes
    assert code == 0
    text = capsys.readouterr().out
    assert "runtime   openvino" in text and "precision in effect arithmetic float32" in text
    assert "exposed tensors mapped to layers" in text
    runtime = json.loads(out.read_text())["runtime"]
    assert runtime["runtime"] == "openvino" and runtime["options"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert runtime["precision"]["arithmetic"] == "float32"
    assert runtime["mapped"] == len(runtime["mapping"]) and runtime["exposed"] >= runtime["mapped"]


def test_dump_then_compare_the_dump(small, tmp_path, capsys):
    dump = tmp_path / "mnn.npz"
    assert main(["dump", str(small.golden_path), str(small.folder / "model.mnn"), "--out", str(dump)]) == 0
    run = run_model(str(small.folder / "model.mnn"), small.golden)
    with np.load(dump) as data:
        assert sorted(data.files) == sorted(run.tensors)
        for name in data.files:
            np.testing.assert_array_equal(data[name], run.tensors[name])
    capsys.readouterr()
    # MNN computes in float32 on x86 at its default precision, so the dump, judged as float32
    # arrays, passes
    assert main(["compare", str(small.golden_path), str(dump)]) == 0
    assert main(["dump", str(small.golden_path), str(small.folder / "model.mnn"), "--out", str(tmp_path / "x.npy")]) == 2
    assert not (tmp_path / "x.npy").exists()


def test_map_lists_tensor_module_and_how(small, capsys):
    assert main(["map", str(small.folder / "model.xml"), "--golden", str(small.golden_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    entry = summary["mapping"]["/blocks.6/blocks.6.1/ghost2/cheap_operation/cheap_operation.0/Conv_output_0"]
    assert entry == {"module": f"{BUG_MODULE}.1", "how": "by exporter scope names"}
    assert main(["map", str(small.onnx)]) == 0  # an .onnx model gives its own network and input shape
    assert "by exporter scope names" in capsys.readouterr().out


def test_onnxruntime_behind_the_interface_gives_the_old_tensors(small):
    from refghost.verify.candidates import load_candidate

    run = run_model(str(small.onnx), small.golden, threads=1)
    loaded = load_candidate(small.onnx, small.golden)
    tensors, description = loaded.tensors, loaded.description
    assert loaded.run.runtime == run.runtime == "onnxruntime" and description.startswith(f"{small.onnx} (ONNX Runtime ")
    assert sorted(tensors) == sorted(run.tensors)
    for name in tensors:
        np.testing.assert_array_equal(tensors[name], run.tensors[name])


# Honest runs at 320x320 and 416x416, with their verdicts asserted: tests/test_verdicts.py.


# ------------------------------------------------------------------------------------------
# A protobuf that onnx cannot use (what MNN's mnnconvert wrapper installs) is named, not a traceback
# ------------------------------------------------------------------------------------------
def _old_protobuf(target, version: str = "5.29.5"):
    """A copy of the installed protobuf's Python code in ``target`` that says it is ``version``
    (its runtime version constants and its distribution metadata), as a wrapper's downgrade leaves
    it: onnx's generated code, built for protobuf 6, refuses it when imported. Nothing is installed."""
    import shutil
    from importlib import metadata

    import google.protobuf

    major, minor, patch = version.split(".")
    source = os.path.dirname(google.protobuf.__file__)
    copy = target / "google" / "protobuf"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    installed = metadata.version("protobuf")
    runtime = copy / "runtime_version.py"
    text = runtime.read_text()
    for name, value in (("MAJOR", major), ("MINOR", minor), ("PATCH", patch)):
        text, n = re.subn(rf"^OSS_{name} = \d+$", f"OSS_{name} = {value}", text, flags=re.M)
        assert n == 1, f"protobuf {installed}'s runtime_version.py has no OSS_{name}"
    runtime.write_text(text)
    init = copy / "__init__.py"
    init.write_text(init.read_text().replace(f"__version__ = '{installed}'", f"__version__ = '{version}'"))
    info = target / f"protobuf-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: protobuf\nVersion: {version}\n")
    return target


def test_an_old_protobuf_is_explained(small, tmp_path):
    """protobuf 5.29 (the version MNN's converter wrapper pulled in here) shadows the installed one
    in a child process: refghost's ONNX paths say which packages clash and how to fix it."""
    target = _old_protobuf(tmp_path / "old_protobuf")
    code = (f"import sys; sys.path.insert(0, {str(target)!r})\n"
            f"from refghost.cli import main\n"
            f"sys.exit(main(['compare', {str(small.golden_path)!r}, {str(small.onnx)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot be imported with the installed 'protobuf' (5.29.5)" in done.stderr, done.stderr[-2000:]
    assert "VersionError" in done.stderr  # protobuf's own refusal, not an error of the copy
    assert 'pip install "protobuf>=' in done.stderr and "Traceback" not in done.stderr
