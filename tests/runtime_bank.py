"""Honest and broken ports of GhostNet in real runtimes, for the verdict tests and tools/runtime_verdicts.py.

A :class:`Port` is one network (weights) exported to ONNX at one input size, with its model files
for every runtime installed here: ONNX Runtime and OpenVINO run the ``.onnx`` (OpenVINO also an
``.xml`` IR), MNN an ``.mnn`` from MNN's converter, ncnn a ``.ncnn.param`` from pnnx (weights
stored in float16 as pnnx writes by default, and in float32 with ``fp16=0``), LiteRT a
``.tflite`` written by ``tests/tflite_writer.py`` in onnx2tf's layout (no TFLite converter
installs here within CI's means; ReLU networks only). The broken variant has one depthwise weight
of :data:`BUG_MODULE` times 1.01 in the ONNX file before conversion (in the ``.tflite`` as it is
written), so every runtime carries the same bug.

:func:`judge` runs a model file in its runtime on a golden's input and judges it through
:func:`refghost.verify.judge.judge`, the path of ``refghost compare MODEL``.

This module is a helper for tests and tools, not a test file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_ghostnet as tg  # noqa: E402

#: The module whose depthwise weight the broken ports change, and the layers that may be blamed
#: for it (the conv, or the BN folded into it).
BUG_MODULE = "blocks.6.2.ghost1.cheap_operation"
BUG_LAYERS = (f"{BUG_MODULE}.0", f"{BUG_MODULE}.1", f"{BUG_MODULE}.2")

#: Every candidate kind: (runtime, model file key, precise settings?).
CANDIDATES = (
    ("onnxruntime", "onnx", False),
    ("openvino", "onnx", False),
    ("openvino", "onnx", True),
    ("mnn", "mnn", False),
    ("mnn", "mnn", True),
    ("ncnn", "ncnn_fp16", False),
    ("ncnn", "ncnn_fp16", True),
    ("ncnn", "ncnn_fp32", True),
    ("litert", "tflite", False),
)
_RUNTIME_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "mnn": "MNN", "ncnn": "ncnn",
                     "litert": "ai_edge_litert"}


def available(runtime: str) -> bool:
    """Whether the runtime's Python package (and, for ncnn, pnnx) is installed."""
    import importlib.util

    if importlib.util.find_spec(_RUNTIME_PACKAGES[runtime]) is None:
        return False
    return runtime != "ncnn" or _pnnx() is not None


def _pnnx() -> str | None:
    beside = Path(sys.executable).with_name("pnnx")
    return str(beside) if beside.exists() else shutil.which("pnnx")


def torch_model(weights):
    """The PyTorch GhostNet of a refghost weights file (NanoDet backbone), eval mode."""
    import torch

    cfg = weights.config
    model = tg.build("nanodet", cfg.width, cfg.activation, tuple(cfg.out_stages))
    state = {k: torch.from_numpy(np.array(v)) for k, v in weights.tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return model.eval()


def export_onnx(weights, size: int, path: Path) -> Path:
    """TorchScript exporter, opset 17, input ``input`` of shape (1, 3, size, size), BN folded."""
    import torch

    model = torch_model(weights)
    outputs = list(weights.graph.outputs)  # MNN maps its outputs by these names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=outputs)
    return path


def with_bug(onnx_path: Path, out: Path, module: str = BUG_MODULE, factor: float = 1.01) -> Path:
    """A copy of the ONNX file with the largest weight of ``module.0``'s conv times ``factor``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    scope = "/" + "/".join(_torchscript_scope(f"{module}.0"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith(scope + "/"))
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    index = np.unravel_index(int(np.argmax(np.abs(w))), w.shape)
    w[index] *= np.float32(factor)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(out))
    return out


def _torchscript_scope(module: str) -> list[str]:
    """The TorchScript exporter's scope components of a module path:
    ``blocks.6.2.ghost1.cheap_operation.0`` -> ``blocks.6 / blocks.6.2 / ghost1 / cheap_operation /
    cheap_operation.0`` (NanoDet indexes ``self.blocks[i]`` directly, so ``blocks`` has no component
    of its own; a Sequential inside a module does)."""
    parts = module.split(".")
    out = [f"blocks.{parts[1]}", f"blocks.{parts[1]}.{parts[2]}"] if parts[0] == "blocks" else [parts[0]]
    rest = parts[3:] if parts[0] == "blocks" else parts[1:]
    for part in rest:
        if part.isdigit():
            out.append(f"{out[-1]}.{part}")
        else:
            out.append(part)
    return out


def to_mnn(onnx_path: Path, out: Path) -> Path:
    """MNN's converter through the extension function its ``mnnconvert`` wrapper calls (the wrapper
    pip-installs a logging SDK that downgrades protobuf), in a child process."""
    done = subprocess.run([sys.executable, "-c", "import sys, _tools; _tools.mnnconvert(sys.argv)", "-f", "ONNX",
                           "--modelFile", str(onnx_path), "--MNNModel", str(out), "--bizCode", "refghost"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"MNN's converter failed on {onnx_path}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return out


def to_ncnn(onnx_path: Path, folder: Path, size: int, *, fp16: bool) -> Path:
    """``pnnx model.onnx inputshape=[1,3,size,size] [fp16=0]`` in ``folder``; the ``.ncnn.param``."""
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / onnx_path.name
    shutil.copyfile(onnx_path, local)
    command = [_pnnx(), local.name, f"inputshape=[1,3,{size},{size}]"] + ([] if fp16 else ["fp16=0"])
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    param = folder / f"{local.stem}.ncnn.param"
    if done.returncode != 0 or not param.exists():
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return param


@dataclass
class Port:
    """One network at one input size, as model files of every installed runtime."""

    size: int
    files: dict[str, Path]  # "onnx", "mnn", "ncnn_fp16", "ncnn_fp32", "tflite"


def build_port(weights, size: int, folder: Path, *, bug: bool = False, runtimes=None) -> Port:
    """Export ``weights`` at ``size`` (with the bug when asked) and convert it for ``runtimes``
    (default: every installed one)."""
    folder.mkdir(parents=True, exist_ok=True)
    runtimes = set(runtimes or [r for r, _, _ in CANDIDATES if available(r)])
    onnx_path = export_onnx(weights, size, folder / "model.onnx")
    if bug:
        onnx_path = with_bug(onnx_path, folder / "bug.onnx")
    files = {"onnx": onnx_path}
    if "mnn" in runtimes:
        files["mnn"] = to_mnn(onnx_path, folder / f"{onnx_path.stem}.mnn")
    if "ncnn" in runtimes:
        files["ncnn_fp16"] = to_ncnn(onnx_path, folder / "ncnn_fp16", size, fp16=True)
        files["ncnn_fp32"] = to_ncnn(onnx_path, folder / "ncnn_fp32", size, fp16=False)
    if "litert" in runtimes and weights.config.activation == "ReLU":
        from tflite_writer import write_ghostnet_tflite

        files["tflite"] = folder / "model.tflite"
        write_ghostnet_tflite(weights, files["tflite"], (1, 3, size, size),
                              bug_layer=f"{BUG_MODULE}.0" if bug else None)
    return Port(size, files)


def judge(golden, port: Port, runtime: str, key: str, precise: bool, *, threads: int = 1):
    """Run one model file of ``port`` in ``runtime`` on ``golden``'s input and judge it as
    ``refghost compare MODEL`` does (:func:`refghost.verify.judge.judge`, policy ``auto``: the
    precision the runtime reports). Returns ``(report, run)``."""
    from refghost.verify.judge import Candidate, judge as judge_candidate

    judgement = judge_candidate(Candidate(str(port.files[key]), runtime=runtime, precise=precise, threads=threads),
                                golden)
    return judgement.report, judgement.run


def blames_bug(report) -> bool:
    """Whether the report's first divergent layer is the bug's (the conv or its folded BN)."""
    return report.first_divergent in BUG_LAYERS


def worst_ratios(report) -> tuple[float, float]:
    """The largest accumulated and isolated ratio to the bound over every tensor of a report."""
    acc = max((t.accumulated_ratio for t in report.tensors if t.status in ("ok", "mismatch")), default=0.0)
    iso = max((t.isolated_ratio for t in report.tensors if t.isolated_ratio is not None), default=0.0)
    return acc, iso
