"""Benchmark refghost against ONNX Runtime (and PyTorch eager, onnx.reference) side by side.

    python tools/bench.py                      # quick: 320x320, batch 1 and 8, float32 and float64
    python tools/bench.py --sizes 320 416 --batches 1 8 --dtypes float32 float64 --rounds 10
    python tools/bench.py --no-memory --no-startup --no-onnx-reference

One process builds every runtime on the same weights (the shipped file unless ``--weights``):
refghost (``refghost.run``: the compiled engine), ONNX Runtime on the model exported from the
independent PyTorch GhostNet of ``tests/torch_ghostnet.py`` loaded with the same tensors
(TorchScript exporter, opset 17, dynamic batch; 2 intra-op threads, 1 inter-op, sequential,
ORT_ENABLE_ALL), and PyTorch eager (2 threads). They run interleaved on one input: each round
visits every runtime (rotated, alternately reversed), sleeps briefly so spinning thread pools go
idle, then times a block of runs. Ratios are refghost's median over ONNX Runtime's median from the
same rounds, so load on the machine moves both. onnx.reference runs once (it is slow).

Peak memory is the max RSS (VmHWM) of a separate child process per runtime (imports, model,
``--mem-runs`` runs), and its increase over the RSS right after the imports. The RSS at the child's
end is split into anonymous memory (heap, arrays, interpreter state: private to the process) and
file-backed pages (mostly clean code pages of the shared libraries: shared between processes, never
written to swap), and the resident part of ``libllvmlite.so`` (LLVM, loaded by Numba) is shown
alone. A "Numba floor" child (numpy, numba, one small refghost kernel loaded from the warm Numba
cache; no weights, no model) gives the fixed cost of Numba/LLVM that any Numba program pays.
Start-up times ``refghost run``
(the CLI, shipped weights and sample image) as a fresh process, first with an empty Numba cache
(cold) then again (warm), and a fresh ONNX Runtime process (import, session, one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
DEFAULT_WEIGHTS = ROOT / "weights" / "ghostnet_nanodet_1.0x.h5"


def _proc_status():
    """Fields of /proc/self/status given in kB, in MiB (VmRSS, VmHWM, RssAnon, RssFile, ...).

    VmHWM is this process's peak RSS (ru_maxrss would carry the parent's peak across fork+exec).
    """
    with open("/proc/self/status") as f:
        fields = [line.split() for line in f]
    return {f[0].rstrip(":"): int(f[1]) / 1024 for f in fields if len(f) == 3 and f[2] == "kB"}


def _mapped_rss_mib(suffix):
    """Resident MiB of the mappings whose file path ends in ``suffix`` (/proc/self/smaps)."""
    kib, path = 0, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            if not line.split(None, 1)[0].endswith(":"):  # a mapping: address perms offset dev inode [path]
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) > 5 else ""
            elif line.startswith("Rss:") and path.endswith(suffix):
                kib += int(line.split()[1])
    return kib / 1024


def export_onnx(weights, path, size):
    """Export tests/torch_ghostnet.py's model with ``weights`` to ``path`` (dynamic batch)."""
    import torch
    import torch_ghostnet as tg

    cfg = weights.config
    model = tg.build(cfg.arch, cfg.width, cfg.activation, cfg.out_stages, num_classes=cfg.num_classes or 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.tensors.items()},
                              strict=False)
        model.eval()
        torch.onnx.export(model, torch.zeros(1, 3, size, size), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return model


def ort_session(path, threads=2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# --- child processes: memory --------------------------------------------------------------------


def child_memory(args):
    """Runs in a fresh process: one runtime, ``--mem-runs`` runs; prints JSON (MiB)."""
    if args.child == "numba-floor":  # numpy, numba (imported by the kernel's module), one cached kernel; no model
        from refghost.kernels.depthwise import _geometry

        base = _proc_status()["VmRSS"]
        run = lambda: _geometry(3, 2, 1, 8, 4, 4)  # noqa: E731
    else:
        x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(args.dtype)
        if args.child == "refghost":
            import refghost

            weights = refghost.load_weights(args.weights)
            base = _proc_status()["VmRSS"]
            run = lambda: refghost.run(x, weights, dtype=args.dtype)  # noqa: E731
        else:
            import onnxruntime  # noqa: F401

            base = _proc_status()["VmRSS"]
            sess = ort_session(args.onnx)
            run = lambda: sess.run(None, {"input": x})  # noqa: E731
    for _ in range(args.mem_runs):
        run()
    st = _proc_status()
    print(json.dumps({"max_rss": st["VmHWM"], "after_imports": base, "rss_anon": st["RssAnon"],
                      "rss_file": st["RssFile"], "llvm": _mapped_rss_mib("libllvmlite.so")}))


def _memory_child(args, who, *options):
    cmd = [sys.executable, __file__, "--child", who, "--mem-runs", str(args.mem_runs), *options]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        print(done.stderr, file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(args, onnx_path, size, batch, dtype):
    options = ["--size", str(size), "--batch", str(batch), "--dtype", dtype, "--weights", str(args.weights),
               "--onnx", str(onnx_path)]
    runtimes = ("refghost", "onnxruntime") if dtype == "float32" else ("refghost",)
    out = {who: _memory_child(args, who, *options) for who in runtimes}
    return {who: m for who, m in out.items() if m is not None}


def measure_numba_floor(args):
    """The Numba floor child, twice (the first may still fill the Numba cache); the second result."""
    _memory_child(args, "numba-floor")
    return _memory_child(args, "numba-floor")


def measure_startup(args, onnx_path):
    """Wall time of fresh ``refghost run`` processes (cold and warm Numba cache) and of ORT."""
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold", "warm", "warm2"):
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "refghost", "run"], env=env, capture_output=True, text=True,
                                  cwd=ROOT)
            res[label] = time.perf_counter() - t
            if done.returncode:
                print(done.stderr, file=sys.stderr)
    code = ("import numpy as np, sys; sys.path.insert(0, %r); import bench; "
            "s = bench.ort_session(%r); s.run(None, {'input': np.zeros((1, 3, 320, 320), np.float32)})"
            % (str(Path(__file__).parent), str(onnx_path)))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], capture_output=True)
    res["onnxruntime"] = time.perf_counter() - t
    res["warm"] = min(res["warm"], res.pop("warm2"))
    return res


# --- the interleaved timing ---------------------------------------------------------------------


def time_interleaved(runners, rounds, block, pause):
    times = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order.reverse()
        for name in order:
            time.sleep(pause)
            fn = runners[name]
            for _ in range(block):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: np.array(v) * 1e3 for name, v in times.items()}


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--sizes", type=int, nargs="+", default=[320])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    p.add_argument("--block", type=int, default=0, help="runs per block (default: 5 at batch 1, 2 at batch 8)")
    p.add_argument("--pause", type=float, default=0.1, help="seconds of sleep before each block")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    p.add_argument("--interpreter", action="store_true", help="also time refghost's node-by-node interpreter")
    p.add_argument("--no-onnx-reference", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-startup", action="store_true")
    p.add_argument("--mem-runs", type=int, default=3)
    p.add_argument("--json", help="also write the results as JSON here")
    # child mode (internal)
    p.add_argument("--child", choices=["refghost", "onnxruntime", "numba-floor"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=320, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_memory(args)

    import numba
    import onnxruntime as ort

    import refghost
    from refghost.kernels import blas

    weights = refghost.load_weights(args.weights)
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        torch = None
    from threadpoolctl import threadpool_info

    blas_info = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} ({i['num_threads']} thr)"
                 for i in threadpool_info() if i["user_api"] == "blas"]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"# refghost bench — {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {cpu}, {os.cpu_count()} cpus; load avg {os.getloadavg()[0]:.2f} at start")
    print(f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__} "
          f"({numba.config.THREADING_LAYER} layer, {numba.get_num_threads()} threads), onnxruntime {ort.__version__}"
          + (f", torch {torch.__version__}" if torch else ""))
    print(f"BLAS: {'; '.join(blas_info)}; engine GEMM via {blas.LIBRARY}")
    env = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "NUMBA_", "MKL_"))}
    print(f"env: {env}")
    print(f"command: python tools/bench.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print()

    results = []
    tmp = tempfile.TemporaryDirectory()
    header = ("| size | batch | dtype | runtime | median ms | min ms | max ms | ratio to ORT | max abs diff vs ORT |\n"
              "|---|---|---|---|---|---|---|---|---|")
    lines = []
    for size in args.sizes:
        onnx_path = Path(tmp.name) / f"ghostnet_{size}.onnx"
        model = export_onnx(weights, onnx_path, size)
        sess = ort_session(onnx_path)
        for batch in args.batches:
            x32 = np.random.default_rng(size + batch).standard_normal((batch, 3, size, size)).astype(np.float32)
            ort_out = sess.run(None, {"input": x32})
            runners = {"onnxruntime float32": lambda x=x32: sess.run(None, {"input": x})}
            outs = {"onnxruntime float32": ort_out}
            for dtype in args.dtypes:
                xd = x32.astype(dtype)
                runners[f"refghost {dtype}"] = lambda x=xd, d=dtype: refghost.run(x, weights, dtype=d)
                if args.interpreter:
                    runners[f"refghost-interpreter {dtype}"] = (
                        lambda x=xd, d=dtype: refghost.run(x, weights, dtype=d, impl="interpreter"))
            if torch is not None and not args.no_torch:
                xt = torch.from_numpy(x32)

                def torch_run(xt=xt):
                    with torch.inference_mode():
                        return model(xt)
                runners["torch-eager float32"] = torch_run
            for name, fn in runners.items():  # warm up (compiles the plan, Numba kernels), check outputs
                for _ in range(2):
                    out = fn()
                if name.startswith("refghost"):
                    outs[name] = list(out.values())
                elif name.startswith("torch"):
                    outs[name] = [t.numpy() for t in (out if isinstance(out, (tuple, list)) else [out])]
            block = args.block or (5 if batch == 1 else 2)
            times = time_interleaved(runners, args.rounds, block, args.pause)
            ort_med = np.median(times["onnxruntime float32"])
            for name, t in times.items():
                diff = max_abs_diff(outs[name], ort_out) if name in outs else float("nan")
                row = dict(size=size, batch=batch, runtime=name, median=float(np.median(t)), min=float(t.min()),
                           max=float(t.max()), ratio=float(np.median(t) / ort_med), diff=diff, n=len(t))
                results.append(row)
                lines.append(f"| {size} | {batch} | {name.split()[1]} | {name.split()[0]} | "
                             f"{row['median']:.2f} | {row['min']:.2f} | {row['max']:.2f} | {row['ratio']:.2f} | "
                             f"{diff:.2e} |")
            if len(lines) == len(times):
                print(header)
            print("\n".join(lines[-len(times):]), flush=True)
        if not args.no_onnx_reference and size == args.sizes[0]:
            from onnx.reference import ReferenceEvaluator

            ref = ReferenceEvaluator(str(onnx_path))
            x1 = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
            t = time.perf_counter()
            ref_out = ref.run(None, {"input": x1})
            dt = (time.perf_counter() - t) * 1e3
            ort1 = sess.run(None, {"input": x1})
            print(f"\nonnx.reference ({size}x{size}, batch 1, float32, one run): {dt:.0f} ms, "
                  f"max abs diff vs ORT {max_abs_diff(ref_out, ort1):.2e}")
            results.append(dict(size=size, batch=1, runtime="onnx.reference float32", median=dt))
        if not args.no_memory:
            print(f"\nPeak memory, separate process per runtime ({size}x{size}, {args.mem_runs} runs): "
                  "max RSS MiB (increase over the RSS after imports);\n"
                  "  then each one's RSS at the end: anonymous, file-backed (of which libllvmlite.so)")
            for batch in args.batches:
                for dtype in args.dtypes:
                    mem = measure_memory(args, onnx_path, size, batch, dtype)
                    text = ", ".join(f"{who} {m['max_rss']:.0f} (+{m['max_rss'] - m['after_imports']:.0f})"
                                     for who, m in mem.items())
                    print(f"  batch {batch} {dtype}: {text}")
                    for who, m in mem.items():
                        print(f"    {who}: anon {m['rss_anon']:.0f}, file {m['rss_file']:.0f} "
                              f"(libllvmlite.so {m['llvm']:.0f})")
                    results.append(dict(size=size, batch=batch, dtype=dtype, memory=mem))
            if size == args.sizes[0] and (floor := measure_numba_floor(args)):
                print(f"  Numba floor (numpy + numba + one cached kernel, no model): peak RSS {floor['max_rss']:.0f} "
                      f"MiB (anon {floor['rss_anon']:.0f}, file {floor['rss_file']:.0f}, "
                      f"libllvmlite.so {floor['llvm']:.0f})")
                results.append(dict(numba_floor=floor))
        if not args.no_startup and size == args.sizes[0]:
            st = measure_startup(args, onnx_path)
            print(f"\nStart-up, process start to exit: `refghost run` cold Numba cache {st['cold']:.2f} s, "
                  f"warm {st['warm']:.2f} s; ONNX Runtime (import, session, 1 run) {st['onnxruntime']:.2f} s")
            results.append(dict(startup=st))
        print(f"\nload avg {os.getloadavg()[0]:.2f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
