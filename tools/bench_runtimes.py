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

Whole detector (issues 22 and 26):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
        python tools/bench_runtimes.py --detector nanodet-plus-m_320 --size 320 --batches 1 8

times a whole NanoDet detector: the weights ``weights/<name>.h5`` (or ``--weights``; a preset of
refghost.detector.spec.PRESETS without a file is randomized by tests/torch_nanodet.py) loaded into
tests/torch_nanodet.py's independent PyTorch NanoDet, exported with NanoDet's export output
(``model(x, export=True)``; TorchScript exporter, opset 11, dynamic batch) into a temp folder and
run by ONNX Runtime (ORT_ENABLE_ALL), OpenVINO (f32 precision hint, static shape), MNN (precision
normal) and ncnn (pnnx fp16=0, fp16/bf16 off; ncnn has no batch, so batch N is N calls); beside
refghost's interpreter (``refghost.forward.execute`` impl "kernels", BLAS held at one thread as
``refghost.run`` holds it) timed as the network alone, its post-processing alone (decode + NMS,
refghost.detector.run.postprocess) and ``refghost.run`` whole. Ratios are medians over the median
of the fastest peer (runtime other than refghost) of the same rounds. A runtime whose model could
not be made is listed with the reason. Every table starts with the CPU model, its vector extensions
and the thread settings. Unset ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` for the bench command
only (as above): set to Haswell they hold OpenBLAS to its AVX2 kernels.
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


def _openvino(onnx_path, folder, threads, precision, shape=None):
    import openvino as ov

    core = ov.Core()
    xml = folder / "model.xml"
    if not xml.exists():
        ov.save_model(core.read_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    model = core.read_model(str(xml))
    if shape is not None:  # a static input shape (the detector mode)
        model.reshape(list(shape))
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


# --- the whole detector (--detector) -------------------------------------------------------------

#: The vector extensions named in the machine line (from /proc/cpuinfo's flags).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")


def machine_line(threads) -> str:
    """The CPU model, its vector extensions, the load and the thread settings, as one line."""
    import os

    import numba
    from threadpoolctl import threadpool_info

    model, flags = "?", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    extensions = " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "none of " + " ".join(VECTOR_FLAGS)
    blas = "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')}"
                     for i in threadpool_info() if i["user_api"] == "blas")
    env = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "NUMBA_", "MKL_"))}
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel launch yet
        layer = numba.config.THREADING_LAYER
    return (f"# cpu: {model} ({os.cpu_count()} cpus), {extensions}; load avg "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; threads: {threads} per runtime "
            f"(numba {numba.get_num_threads()}, {layer} layer; refghost BLAS held at 1: "
            f"{blas}); env {env}")


def detector_weights(name, path=None):
    """The weights of detector preset ``name``: ``path``, else ``weights/<name>.h5``, else the
    preset randomized by tests/torch_nanodet.py (seed 0)."""
    import refghost
    from refghost.detector.spec import PRESETS
    from refghost.errors import RefghostError

    if name not in PRESETS:
        raise RefghostError(f"--detector {name!r} is not a preset (one of {sorted(PRESETS)})")
    path = Path(path) if path else ROOT / "weights" / f"{name}.h5"
    if path.exists():
        weights = refghost.load_weights(path)
        if weights.config != PRESETS[name]:
            print(f"# note: {path.name} holds {weights.config}, not the preset {name}")
        return weights, path.name
    import torch_nanodet as tn
    from refghost.detector.graph import build_detector_graph
    from refghost.weights import NANODET_PREPROCESSING, from_tensors

    model = tn.randomize(tn.build(PRESETS[name]), seed=0)
    keys = build_detector_graph(PRESETS[name]).param_shapes
    tensors = {k: v.numpy() for k, v in model.state_dict().items() if k in keys}
    return from_tensors(tensors, PRESETS[name], NANODET_PREPROCESSING), f"{name} randomized (seed 0)"


def export_detector_onnx(weights, path, size, threads):
    """tests/torch_nanodet.py's NanoDet with ``weights``' tensors, exported with NanoDet's export
    output (``model(x, export=True)``, (N, P, C + 4*(reg_max+1))) to ``path``: TorchScript
    exporter, opset 11, input ``input`` with a dynamic batch, output ``output``."""
    import warnings

    import torch
    import torch_nanodet as tn

    torch.set_num_threads(threads)
    model = tn.build(weights.config)
    state = model.state_dict()
    absent = [k for k in state if k not in weights.tensors and not k.endswith("num_batches_tracked")
              and not k.endswith("distribution_project.project")]  # a constant buffer (0..reg_max)
    if absent:
        raise RuntimeError(f"the weights lack {len(absent)} tensors of the torch NanoDet, e.g. {absent[:3]}")
    model.load_state_dict({k: torch.from_numpy(np.array(weights.tensors[k])) if k in weights.tensors else v
                           for k, v in state.items()})
    model.eval()

    class Export(torch.nn.Module):
        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, x):
            return self.detector(x, export=True)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Export(model), torch.zeros(1, 3, size, size), str(path), dynamo=False, opset_version=11,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def _ncnn_batched(run):
    """ncnn has no batch dimension: batch N as N calls, outputs stacked."""
    return lambda x: [np.concatenate(parts) for parts in zip(*(run(x[i:i + 1]) for i in range(x.shape[0])))]


def _detector_peers(onnx_path, folder, threads, x_shape):
    """{name: run(x) -> [outputs]} of every peer whose model could be made, and {name: why not}."""
    peers, failed = {}, {}
    session = ort_session(onnx_path, threads)
    peers["onnxruntime f32"] = lambda x: session.run(None, {"input": x})
    makers = {
        "openvino f32 (precision hint f32)":
            lambda: _openvino(onnx_path, folder / "openvino", threads, "f32", x_shape)[0],
        "mnn f32 (precision normal)": lambda: _mnn(onnx_path, folder, threads, x_shape),
        "ncnn f32 (fp16 off, N calls)": lambda: _ncnn_batched(_ncnn(onnx_path, folder, threads, x_shape, True)),
    }
    for name, make in makers.items():
        t = time.perf_counter()
        try:
            peers[name] = make()
        except ImportError as exc:
            failed[name] = f"not installed ({exc})"
        except Exception as exc:  # a converter that fails on this graph: reported, not fatal
            text = str(exc).strip().splitlines()
            failed[name] = f"{type(exc).__name__}: {text[-1][:200] if text else ''}"
        else:
            print(f"# {name}: model made in {time.perf_counter() - t:.1f} s", flush=True)
    return peers, failed


def detector_main(args) -> int:
    """The detector mode: a table per batch size (see the module docstring)."""
    import numba

    import refghost
    from refghost.detector.graph import OUTPUT
    from refghost.detector.run import NmsSettings, postprocess, prepare_batch
    from refghost.forward import execute
    from refghost.threads import single_threaded_blas

    numba.set_num_threads(args.threads)
    weights, source = detector_weights(args.detector, args.weights)
    folder = Path(tempfile.mkdtemp(prefix="bench_detector_"))
    t = time.perf_counter()
    onnx_path = export_detector_onnx(weights, folder / "model.onnx", args.size, args.threads)
    print(f"# {args.detector} ({source}) at {args.size}x{args.size}; ONNX exported in "
          f"{time.perf_counter() - t:.1f} s to {folder}", flush=True)
    params = weights.params("float32")
    for batch in args.batches:
        x = np.random.default_rng(args.size + batch).standard_normal((batch, 3, args.size, args.size)).astype(
            np.float32)
        prepared = prepare_batch([x], weights, np.float32)

        def network(x=prepared.x):
            with single_threaded_blas():
                return execute(weights.graph, params, x, impl="kernels")[OUTPUT]

        def network_one_thread():  # Numba at one thread: no parallel launches (none to wait for under load)
            numba.set_num_threads(1)
            try:
                return network()
            finally:
                numba.set_num_threads(args.threads)

        reference = network()
        post = lambda out=reference, p=prepared: postprocess(out, weights.config, p)  # noqa: E731
        runners = {"refghost interpreter f32 (network)": network,
                   "refghost interpreter f32 (network, Numba 1 thread)": network_one_thread,
                   "refghost post-processing (decode + NMS)": post,
                   "refghost.run (whole)": lambda x=x: refghost.run(x, weights, dtype="float32")}
        (folder / f"batch{batch}" / "openvino").mkdir(parents=True)
        peers, failed = _detector_peers(onnx_path, folder / f"batch{batch}", args.threads, x.shape)
        check = {}
        for name, run in peers.items():
            runners[name] = lambda run=run, x=x: run(x)
            check[name] = run(x)
        for fn in runners.values():  # warm up
            fn()
        kept = len(post()["detections.scores"])
        candidates = int((reference[..., :weights.config.num_classes] > NmsSettings().score_threshold).sum())
        block = args.block if batch == 1 else max(1, args.block // 4)  # batch 8's NMS alone takes seconds
        times = time_interleaved(runners, args.rounds, block, args.pause)
        fastest = min((n for n in times if n in peers), key=lambda n: np.median(times[n]), default=None)
        base = float(np.median(times[fastest])) if fastest else float("nan")
        print(f"\n# {time.strftime('%Y-%m-%d %H:%M')}: {args.detector}, {args.size}x{args.size}, batch {batch}, "
              f"float32, {args.rounds} rounds x {block} runs; post-processing: {candidates} (prior, class) scores "
              f"over the score threshold, {kept} detections kept")
        print(machine_line(args.threads))
        if failed:
            print("# could not be made: " + "; ".join(f"{n}: {why}" for n, why in failed.items()))
        print(f"| runtime | median ms | min ms | ratio to {fastest} | max abs diff vs refghost network |")
        print("|---|---|---|---|---|")
        for name, t in times.items():
            diff = f"{max_abs_diff([reference], check[name]):.2e}" if name in check else "-"
            print(f"| {name} | {np.median(t):.2f} | {np.min(t):.2f} | {np.median(t) / base:.2f} | {diff} |",
                  flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--weights", default=None, help=f"default {DEFAULT_WEIGHTS.name}, or weights/<detector>.h5")
    parser.add_argument("--detector", help="time this whole NanoDet detector (a name of "
                                           "refghost.detector.spec.PRESETS) instead of the GhostNet backbone")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="detector mode: batch sizes")
    args = parser.parse_args(argv)
    if args.detector:
        return detector_main(args)
    args.weights = args.weights or str(DEFAULT_WEIGHTS)

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
    print(machine_line(args.threads))
    print("| runtime | median ms | min ms | ratio to refghost float32 | max abs diff vs refghost |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        diff = "-" if name not in check else f"{max_abs_diff(reference, check[name]):.2e}"
        print(f"| {name} | {np.median(t):.2f} | {np.min(t):.2f} | {np.median(t) / base:.2f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
