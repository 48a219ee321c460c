"""Time refghost beside the runtimes ports ship to: ONNX Runtime, OpenVINO (its bf16 default and f32),
MNN, ncnn (its defaults and fp16 off) and LiteRT, on the same weights, interleaved in one process.

    python tools/bench_runtimes.py [--size 320] [--threads 2] [--rounds 10] [--block 5] [--weights W.h5]

The model is the shipped weights (unless ``--weights``) exported from tests/torch_ghostnet.py to
ONNX (tools/bench.py's export), converted to an OpenVINO IR (f32 weights), to MNN (MNN's converter
function, not the ``mnnconvert`` wrapper), to ncnn (pnnx ``fp16=0``, tests/runtime_bank.py) and written
as ``.tflite`` by tests/tflite_writer.py.
Each runtime runs its deployed model (no intermediates exposed), batch 1, ``--threads`` threads;
rounds visit every runtime in rotated, alternately reversed order (tools/bench.py's
``time_interleaved``). Ratios are each median over refghost float32's median from the same rounds.
A missing runtime package is left out, and said so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

from bench import DEFAULT_WEIGHTS, export_onnx, max_abs_diff, ort_session, time_interleaved  # noqa: E402


def _openvino(onnx_path, folder, threads, precision):
    import openvino as ov

    core = ov.Core()
    xml = folder / "model.xml"
    if not xml.exists():
        ov.save_model(core.read_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    model = core.read_model(str(xml))
    config = {"INFERENCE_NUM_THREADS": str(threads)}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    label = getattr(hint, "get_type_name", lambda: str(hint))()
    return (lambda x: [np.array(v) for v in request.infer({0: x}).values()]), label


def _mnn(onnx_path, folder, threads, x_shape):
    from refghost.runtimes.mnn import _import

    path = folder / "model.mnn"
    subprocess.run([sys.executable, "-c", "import sys, _tools; _tools.mnnconvert(sys.argv)", "-f", "ONNX",
                    "--modelFile", str(onnx_path), "--MNNModel", str(path), "--bizCode", "refghost"],
                   check=True, capture_output=True)
    MNN = _import()
    F, nn = MNN.expr, MNN.nn
    manager = nn.create_runtime_manager(({"backend": "CPU", "precision": "normal", "numThread": threads},))
    names = [n for n, v in F.load_as_dict(str(path)).items() if v.op_type == "Input"]
    import onnx

    outputs = [o.name for o in onnx.load(str(onnx_path)).graph.output]
    module = nn.load_module_from_file(str(path), names, outputs, runtime_manager=manager)

    def run(x):
        results = module.forward([F.const(x, list(x.shape), F.NCHW)])
        return [np.array(F.convert(v, F.NCHW).read()) for v in results]
    return run


def _ncnn(onnx_path, folder, threads, x_shape, precise):
    import ncnn
    from runtime_bank import to_ncnn

    param = folder / "ncnn" / "model.ncnn.param"
    if not param.exists():
        to_ncnn(onnx_path, folder / "ncnn", x_shape[2], fp16=False)
    net = ncnn.Net()
    net.opt.num_threads = threads
    if precise:  # refghost.runtimes.ncnn's --precise: no fp16/bf16 storage, arithmetic or packing
        for flag in ("use_fp16_storage", "use_fp16_arithmetic", "use_fp16_packed", "use_bf16_storage"):
            setattr(net.opt, flag, False)
    net.load_param(str(param))
    net.load_model(str(param.with_suffix(".bin")))
    outputs = sorted((n for n in net.output_names()), key=lambda n: int(n[3:]) if n[3:].isdigit() else n)

    def run(x):
        extractor = net.create_extractor()
        extractor.input(net.input_names()[0], ncnn.Mat(np.ascontiguousarray(x[0])))
        return [np.array(extractor.extract(name)[1])[None] for name in outputs]
    return run


def _litert(weights, folder, threads, x_shape):
    from ai_edge_litert.interpreter import Interpreter
    from tflite_writer import write_ghostnet_tflite

    path = folder / "model.tflite"
    write_ghostnet_tflite(weights, path, x_shape)
    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    outputs = [d["index"] for d in interpreter.get_output_details()]

    def run(x):
        interpreter.set_tensor(index, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        interpreter.invoke()
        return [interpreter.get_tensor(i).transpose(0, 3, 1, 2) for i in outputs]
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    args = parser.parse_args(argv)

    import numba

    import refghost

    numba.set_num_threads(args.threads)
    weights = refghost.load_weights(args.weights)
    x = np.random.default_rng(args.size).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    folder = Path(tempfile.mkdtemp(prefix="bench_runtimes_"))
    onnx_path = folder / "model.onnx"
    export_onnx(weights, onnx_path, args.size)
    reference = refghost.run(x, weights, dtype="float32")
    reference = [np.asarray(v) for v in (reference.values() if isinstance(reference, dict) else reference)]
    runners = {"refghost float32": lambda: refghost.run(x, weights, dtype="float32")}
    check = {}
    session = ort_session(onnx_path, args.threads)
    runners["onnxruntime float32"] = lambda: session.run(None, {"input": x})
    check["onnxruntime float32"] = session.run(None, {"input": x})
    missing = []
    try:
        for precision in (None, "f32"):
            run, label = _openvino(onnx_path, folder, args.threads, precision)
            name = f"openvino {label}" + (" (default)" if precision is None else "")
            runners[name] = lambda run=run: run(x)
            check[name] = run(x)
    except ImportError:
        missing.append("openvino")
    try:
        run = _mnn(onnx_path, folder, args.threads, x.shape)
        runners["mnn float32 (precision normal)"] = lambda: run(x)
        check["mnn float32 (precision normal)"] = run(x)
    except ImportError:
        missing.append("mnn")
    try:
        for precise in (False, True):
            run = _ncnn(onnx_path, folder, args.threads, x.shape, precise)
            name = "ncnn fp16 off" if precise else "ncnn (its defaults)"
            runners[name] = lambda run=run: run(x)
            check[name] = run(x)
    except ImportError:
        missing.append("ncnn")
    try:
        run = _litert(weights, folder, args.threads, x.shape)
        runners["litert float32 (XNNPACK)"] = lambda: run(x)
        check["litert float32 (XNNPACK)"] = run(x)
    except ImportError:
        missing.append("ai-edge-litert")
    for fn in runners.values():  # warm up
        fn()
    times = time_interleaved(runners, args.rounds, args.block, args.pause)
    base = float(np.median(times["refghost float32"]))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}: {args.size}x{args.size}, batch 1, {args.threads} threads, "
          f"{args.rounds} rounds x {args.block} runs" + (f"; not installed: {', '.join(missing)}" if missing else ""))
    print("| runtime | median ms | min ms | ratio to refghost float32 | max abs diff vs refghost |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        diff = "-" if name not in check else f"{max_abs_diff(reference, check[name]):.2e}"
        print(f"| {name} | {np.median(t):.2f} | {np.min(t):.2f} | {np.median(t) / base:.2f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
