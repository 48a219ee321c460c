"""refghost.runtimes.ncnn with the real ncnn and pnnx: models converted here by pnnx (from
TorchScript and from ONNX, fp16 weights and fp16=0), every blob mapped to its module path by
structure, values, shapes and the precision reported checked, a written-in bug localized.

Verdicts of honest and broken ncnn ports at full size are asserted in tests/test_verdicts.py
(``python tools/runtime_verdicts.py`` prints the whole matrix)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import ncnn
import numpy as np
import onnx
import pytest
import torch
import torch_ghostnet as tg
from onnx import numpy_helper

from refghost import Config
from refghost.verify.compare import CompareError, compare
from refghost.verify.golden import make_golden
from refghost.runtimes import run_model
from refghost.runtimes import ncnn as rncnn
from refghost.weights import from_tensors

SMALL = dict(width=0.5, size=64)
#: The depthwise conv the bug test perturbs, and the blob (module path) that stands for it in ncnn:
#: its conv+BN+ReLU are one ConvolutionDepthWise whose output is the ReLU's.
BUG_CONV = "/blocks.4/blocks.4.0/ghost1/cheap_operation/cheap_operation.0/Conv"  # its ONNX node (BN folded in)
BUG_BLAME = "blocks.4.0.ghost1.cheap_operation.2"
BUG_WEIGHT = (4, 0, 1, 1)  # centre tap of channel 4: its input and output are mostly non-zero (ReLUs) here


# --- building models: PyTorch -> TorchScript / ONNX -> pnnx -> ncnn ------------------------------------

def pnnx_executable() -> str:
    """The ``pnnx`` command of the running Python's environment (pip package ``pnnx``)."""
    beside = Path(sys.executable).with_name("pnnx")
    found = str(beside) if beside.exists() else shutil.which("pnnx")
    if found is None:
        raise RuntimeError("the pnnx command is not installed: pip install pnnx")
    return found


def export(model, shape, folder: Path, stem: str = "model", *, onnx_too: bool = True) -> tuple[Path, Path | None]:
    """Write ``model`` as TorchScript (``torch.jit.trace``) and ONNX (TorchScript exporter, opset 17)."""
    folder.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(shape)
    pt, onnx_path = folder / f"{stem}.pt", folder / f"{stem}.onnx"
    with torch.no_grad():
        torch.jit.trace(model, x).save(str(pt))
        if not onnx_too:
            return pt, None
        torch.onnx.export(model, (x,), str(onnx_path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=[f"out{i}" for i in range(len(model(x)))])
    return pt, onnx_path


def convert(source: Path, shape, folder: Path, *, fp16: bool = True) -> Path:
    """``pnnx SOURCE inputshape=[N,C,H,W] [fp16=0]`` in its own folder; returns the ``.ncnn.param``."""
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / source.name
    shutil.copyfile(source, local)
    command = [pnnx_executable(), local.name, f"inputshape=[{','.join(map(str, shape))}]"]
    if not fp16:
        command.append("fp16=0")
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    param = folder / f"{local.stem}.ncnn.param"
    if done.returncode != 0 or not param.exists():
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return param


def make_case(folder: Path | None, *, width: float, size: int, activation: str = "ReLU", seed: int = 0,
              onnx_too: bool = True):
    """A seeded GhostNet, its golden (float64 oracle of every layer) and its TorchScript/ONNX files
    (none when ``folder`` is None)."""
    model = tg.randomize(tg.build("nanodet", width, activation, (4, 6, 9)), seed)
    weights = from_tensors(tg.state_dict_numpy(model), Config(arch="nanodet", width=width, activation=activation,
                                                              out_stages=(4, 6, 9)))
    x = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    golden = make_golden(weights, x, intermediates=True)
    if folder is None:
        return golden, None, None
    pt, onnx_path = export(model, (1, 3, size, size), folder, onnx_too=onnx_too)
    return golden, pt, onnx_path


def perturb_initializer(onnx_path: Path, out: Path, conv_node: str, index, factor: float = 1.01) -> Path:
    """Copy of an ONNX model with the weight at ``index`` of its Conv node ``conv_node`` scaled by ``factor``."""
    model = onnx.load(str(onnx_path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.name == conv_node)
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w[index] *= factor
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(out))
    return out


# --- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """Width 0.5, 64x64: its golden and four ncnn models (TorchScript/ONNX x fp16/fp32 weights)."""
    root = tmp_path_factory.mktemp("ncnn_small")
    golden, pt, onnx_path = make_case(root / "src", **SMALL)
    shape = golden.input.shape
    params = {f"{src}_{'fp16' if fp16 else 'fp32'}": convert(path, shape, root / f"{src}_{int(fp16)}", fp16=fp16)
              for src, path in (("ts", pt), ("onnx", onnx_path)) for fp16 in (True, False)}
    return golden, params, root, onnx_path


@pytest.fixture(scope="session")
def leaky(tmp_path_factory):
    """The small network with LeakyReLU(0.1): its golden and its ncnn model (fp16=0, from TorchScript)."""
    root = tmp_path_factory.mktemp("ncnn_leaky")
    golden, pt, _ = make_case(root / "src", activation="LeakyReLU", onnx_too=False, **SMALL)
    return golden, convert(pt, golden.input.shape, root / "ncnn", fp16=False)


def _run(param, golden, **kw):
    return run_model(str(param), golden, **kw)


def _mapped_modules(run):
    return [node for node, _ in run.mapping.values()]


# --- mapping ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["ts_fp16", "ts_fp32", "onnx_fp16", "onnx_fp32"])
def test_every_computed_blob_is_mapped_to_a_module(small, model):
    golden, params, _, _ = small
    param = rncnn.parse_param(str(params[model]))
    computing = [layer for layer in param.layers if layer.type not in ("Input", "Split")]
    run = _run(params[model], golden, precise=True, threads=2)
    print(f"{model}: mapped {len(run.mapping)} / exposed {run.exposed} ({param.blob_count} blobs)")
    assert run.exposed == len(computing) == len(run.mapping) > 150
    modules = _mapped_modules(run)
    assert len(set(modules)) == len(modules)  # one blob per module
    oracle = golden.tensors()
    for name in modules + list(golden.outputs):
        assert run.tensors[name].shape == oracle[name].shape, name
    # what each kind of layer was matched to
    by_type = {}
    for layer in computing:
        by_type.setdefault(layer.type, []).append(run.mapping[layer.tops[0]][0])
    assert by_type["Convolution"][0] == "act1"  # stem: conv_stem + bn1 + act1 fused
    assert all(n.endswith(".se.gate") for n in by_type["HardSigmoid"]) and len(by_type["HardSigmoid"]) == 7
    assert all(n.endswith(".se.avg_pool") for n in by_type["Pooling"])
    assert sorted(by_type["InnerProduct"]) == sorted(
        [n.name for n in golden.weights.graph.nodes if n.name.endswith((".se.act1", ".se.conv_expand"))])
    mul = [run.mapping[layer.tops[0]][0] for layer in computing if layer.type == "BinaryOp" and layer.get(0) == 2]
    assert mul and all(n.endswith(".se") for n in mul)
    adds = [n.name for n in golden.weights.graph.nodes if n.op == "add"]
    assert sorted(run.mapping[layer.tops[0]][0] for layer in computing
                  if layer.type == "BinaryOp" and layer.get(0) == 0) == sorted(adds)
    # pnnx's output blobs out0..2 hold the golden's outputs: no note says otherwise
    assert not any("holds" in note for note in run.notes), run.notes
    assert any("by structure" in how for _, how in run.mapping.values())


def test_torchscript_and_onnx_give_the_same_mapping(small):
    golden, params, _, _ = small
    a = _run(params["ts_fp32"], golden, precise=True)
    b = _run(params["onnx_fp32"], golden, precise=True)
    assert _mapped_modules(a) == _mapped_modules(b)


def test_values_close_to_the_oracle_at_float32_settings(small):
    golden, params, _, _ = small
    run = _run(params["ts_fp32"], golden, precise=True, threads=2)
    report = compare(golden, run.tensors)
    assert len(report.tensors) == len(run.mapping) + len(golden.outputs)
    worst = min(report.tensors, key=lambda t: t.cosine)
    assert worst.cosine > 0.999, (worst.name, worst.cosine)
    assert all(t.status in ("ok", "mismatch") for t in report.tensors)  # no shape or NaN


def test_extracting_every_blob_changes_no_output(small):
    """The outputs as a user's lightmode run gives them equal those of the run that keeps every blob."""
    golden, params, _, _ = small
    param = params["ts_fp16"]
    run = _run(param, golden, threads=2)
    with ncnn.Net() as net:
        net.opt.num_threads = 2
        assert net.load_param(str(param)) == 0 and net.load_model(str(param.with_suffix(".bin"))) == 0
        with net.create_extractor() as ex:
            ex.input("in0", ncnn.Mat(golden.input[0]).clone())
            for i, name in enumerate(golden.outputs):
                _, mat = ex.extract(f"out{i}")
                assert np.array_equal(np.array(mat)[None], run.tensors[name]), name


def test_batch_runs_image_by_image(small):
    golden, params, _, _ = small
    two = make_golden(golden.weights, np.concatenate([golden.input, -golden.input]), intermediates=True)
    both = _run(params["ts_fp32"], two, precise=True)
    one = _run(params["ts_fp32"], golden, precise=True)
    for name, value in one.tensors.items():
        assert both.tensors[name].shape[0] == 2
        assert np.array_equal(both.tensors[name][:1], value), name


def test_a_leaky_relu_network_maps_its_fused_activation(leaky):
    golden, param = leaky
    run = _run(param, golden, precise=True)
    assert run.exposed == len(run.mapping) > 150
    assert any(layer.get(9) == 2 for layer in rncnn.parse_param(str(param)).layers)  # fused LeakyReLU
    report = compare(golden, run.tensors)
    assert min(t.cosine for t in report.tensors) > 0.999


def test_an_unfused_activation_layer_maps_on_its_own(small, tmp_path):
    """The stem's ReLU taken out of its Convolution into a ReLU layer (a valid ncnn model, same
    weights): the Convolution now stands for bn1, the ReLU for act1, and the values are the same."""
    golden, params, _, _ = small

    def split_stem(lines):
        layers, blobs = map(int, lines[1].split())
        lines[1] = f"{layers + 1} {blobs + 1}"
        fields = lines[3].split()
        assert fields[0] == "Convolution" and "9=1" in fields and fields[5] == "1"
        fields[5] = "stem_conv"
        fields.remove("9=1")
        lines[3] = " ".join(fields)
        lines.insert(4, "ReLU stem_relu 1 1 stem_conv 1")

    param = _edit(params["ts_fp32"], tmp_path, split_stem)
    run = _run(param, golden, precise=True)
    assert run.mapping["stem_conv"][0] == "bn1" and run.mapping["1"][0] == "act1"
    reference = _run(params["ts_fp32"], golden, precise=True)
    assert run.exposed == len(run.mapping) == reference.exposed + 1
    assert np.array_equal(run.tensors["act1"], reference.tensors["act1"])
    assert np.array_equal(run.tensors["blocks.9"], reference.tensors["blocks.9"])


def test_the_imagenet_classifier_maps_its_head(tmp_path):
    """Huawei's classifier: global pool, conv_head (an InnerProduct with ReLU), Flatten, classifier."""
    model = tg.randomize(tg.build("ghostnet", 0.5, num_classes=10), 0)
    weights = from_tensors(tg.state_dict_numpy(model), Config(arch="ghostnet", width=0.5, num_classes=10))
    golden = make_golden(weights, np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32),
                         intermediates=True)
    pt, _ = export(model, golden.input.shape, tmp_path, onnx_too=False)
    run = _run(convert(pt, golden.input.shape, tmp_path / "ncnn", fp16=False), golden, precise=True)
    assert run.exposed == len(run.mapping) > 150
    assert [node for node, _ in list(run.mapping.values())[-3:]] == ["global_pool", "act2", "classifier"]
    assert run.tensors["classifier"].shape == golden.outputs["classifier"].shape == (1, 10)
    assert min(t.cosine for t in compare(golden, run.tensors).tensors) > 0.999


def test_a_model_of_another_network_does_not_align(small, leaky):
    """A ReLU golden against a LeakyReLU ncnn model, a 1.0x golden against a 0.5x model: refused,
    naming the layer that does not fit."""
    golden, _, _, _ = small
    _, param = leaky
    refused = r"cannot match .* by structure: Convolution \S+ \(line 4\) has a fused LeakyReLU, act1 is ReLU"
    with pytest.raises(CompareError, match=refused):
        _run(param, golden)
    wider, _, _ = make_case(None, width=1.0, size=64)
    with pytest.raises(CompareError, match="output channels"):
        _run(small[1]["ts_fp32"], wider)


# --- precision -------------------------------------------------------------------------------------------

def test_precision_reported_from_the_bin_and_the_flags(small):
    golden, params, _, _ = small
    assert rncnn.weight_storage(rncnn.parse_param(str(params["ts_fp16"])),
                                str(params["ts_fp16"].with_suffix(".bin"))) == {"float16": 94}
    assert rncnn.weight_storage(rncnn.parse_param(str(params["ts_fp32"])),
                                str(params["ts_fp32"].with_suffix(".bin"))) == {"float32": 94}
    fp16_bin = _run(params["ts_fp16"], golden, precise=True)
    assert fp16_bin.precision.weights == "float16" and "94 float16" in fp16_bin.precision.detail
    precise = _run(params["ts_fp32"], golden, precise=True)
    assert precise.precision.is_float32, precise.precision
    assert all(precise.options[f] == "0" for f in rncnn.REDUCED_PRECISION_FLAGS)
    default = _run(params["ts_fp32"], golden)
    assert default.options["use_fp16_storage"] == "1" and default.options["lightmode"] == "0"
    assert set(default.options) >= {"use_fp16_arithmetic", "use_fp16_packed", "use_bf16_storage", "num_threads",
                                    "use_winograd_convolution", "use_sgemm_convolution", "use_packing_layout"}
    # On this x86 CPU (F16C) ncnn's defaults store the InnerProduct weights (the SE's 1x1 convs) in fp16
    # and nothing else: the tensors before the first SE are the same bits as at precise settings, the
    # SE's differ.
    assert default.precision.weights == "float16" and "InnerProduct" in default.precision.detail
    assert default.precision.arithmetic == default.precision.activations == "float32"
    names = list(precise.tensors)
    first_se = next(i for i, n in enumerate(names) if ".se." in n)
    assert all(np.array_equal(default.tensors[n], precise.tensors[n]) for n in names[:first_se])
    assert not np.array_equal(default.tensors[names[first_se + 1]], precise.tensors[names[first_se + 1]])
    # the option overrides the default
    opted = _run(params["ts_fp32"], golden, options={"use_fp16_storage": "0"})
    assert opted.precision.is_float32 and opted.options["use_fp16_storage"] == "0"
    # bf16 storage, asked for: reported, and it is in effect (bf16 keeps 8 significant bits)
    bf16 = _run(params["ts_fp32"], golden, precise=True, options={"use_bf16_storage": "1"})
    assert bf16.precision.activations == bf16.precision.weights == "bfloat16"
    rel = max(float(np.abs(bf16.tensors[n] - precise.tensors[n]).max() / np.abs(precise.tensors[n]).max())
              for n in names)
    assert 2.0 ** -12 < rel < 0.1, rel


def test_runtime_options_are_validated(small):
    golden, params, _, _ = small
    with pytest.raises(CompareError, match="unknown ncnn option 'use_fp8'"):
        _run(params["ts_fp32"], golden, options={"use_fp8": "1"})
    with pytest.raises(CompareError, match="use_fp16_storage='maybe'"):
        _run(params["ts_fp32"], golden, options={"use_fp16_storage": "maybe"})
    with pytest.raises(CompareError, match="lightmode"):
        _run(params["ts_fp32"], golden, options={"lightmode": "1"})
    run = _run(params["ts_fp32"], golden, options={"num_threads": "1", "use_packing_layout": "false"}, threads=2)
    assert run.options["num_threads"] == "1" and run.options["use_packing_layout"] == "0"


# --- a bug written into the model --------------------------------------------------------------------------

def test_a_depthwise_weight_off_by_one_percent_is_blamed_on_its_module(small):
    golden, _, root, onnx_path = small
    buggy = perturb_initializer(onnx_path, root / "bug.onnx", BUG_CONV, BUG_WEIGHT)
    param = convert(buggy, golden.input.shape, root / "bug", fp16=False)
    report = compare(golden, _run(param, golden, precise=True).tensors)
    first = next(t for t in report.tensors if t.name == report.first_divergent)
    print(f"bug: first divergent {report.first_divergent}, isolated ratio {first.isolated_ratio}")
    assert report.first_divergent == BUG_BLAME
    assert first.isolated_ratio > 1
    before = [t for t in report.tensors[: report.tensors.index(first)]]
    assert before and all(t.isolated_ratio is None or t.isolated_ratio <= 1 for t in before)


# --- bad files -------------------------------------------------------------------------------------------

def _edit(param: Path, tmp_path: Path, edit) -> Path:
    lines = param.read_text().splitlines()
    edit(lines)
    out = tmp_path / "edited.param"
    out.write_text("\n".join(lines) + "\n")
    shutil.copyfile(param.with_suffix(".bin"), out.with_suffix(".bin"))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines.__setitem__(0, "7767518"), r"edited.param, line 1: .*magic number 7767517"),
    (lambda lines: lines.__setitem__(1, "12"), r"line 2: expected 'layer_count blob_count'"),
    (lambda lines: lines.__setitem__(3, lines[3].replace(" in0 ", " nowhere ")), r"line 4: .* reads blob 'nowhere'"),
    (lambda lines: lines.__setitem__(3, lines[3] + " 0=eight"), r"line 4: bad parameter '0=eight'"),
    (lambda lines: lines.__setitem__(4, "Split splitncnn_0 1"), r"line 5: expected 'Type name n_bottoms"),
    (lambda lines: lines.pop(), r"line 2: declares \d+ layers, the file has"),
])
def test_a_bad_param_file_names_its_line(small, tmp_path, edit, message):
    golden, params, _, _ = small
    with pytest.raises(CompareError, match=message):
        _run(_edit(params["ts_fp32"], tmp_path, edit), golden)


def test_a_bin_that_does_not_belong(small, leaky, tmp_path):
    golden, params, _, _ = small
    param = _edit(params["ts_fp32"], tmp_path, lambda lines: None)
    data = params["ts_fp32"].with_suffix(".bin").read_bytes()
    for wrong, message in [(data[:-100], r"ends at byte \d+ inside the weights of Convolution"),
                           (data + bytes(8), r"the layers of .* read \d+"),
                           (b"\x47\x6b\x30\x01" + data[4:], "does not belong")]:  # a float16 tag on float32 data
        param.with_suffix(".bin").write_bytes(wrong)
        with pytest.raises(CompareError, match=message):
            _run(param, golden)
    param.with_suffix(".bin").unlink()
    with pytest.raises(CompareError, match="cannot read the ncnn weights"):
        _run(param, golden)


# Full size (1.0x at 320x320 and 416x416), verdicts asserted: tests/test_verdicts.py.


def test_without_the_ncnn_package_the_error_names_it(small, monkeypatch):
    from refghost.runtimes import RuntimeMissing

    golden, params, _, _ = small
    monkeypatch.setitem(sys.modules, "ncnn", None)  # import ncnn now raises ImportError
    with pytest.raises(RuntimeMissing, match="pip install ncnn"):
        _run(params["ts_fp32"], golden)
