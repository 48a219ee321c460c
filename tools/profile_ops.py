"""Time each op of the compiled engine alone: where a forward pass spends its time.

    python tools/profile_ops.py                      # shipped weights, 1x3x320x320 float32
    python tools/profile_ops.py --batch 8 --size 416 --dtype float64 --top 15

Every row of the engine's program (refghost/engine/program.py) is run by itself
``--repeat`` times on the plan's own buffers (after one full forward pass, so they hold real
activations), with Numba's threads and BLAS at one thread as in a real run; the best time of each
row is printed, then the sum per op kind and the time of the whole program, op by op (batches
too, although ``refghost.run`` runs batches of at least the thread count image by image). An op
timed alone finds its inputs and weights in cache, so the sum is lower than the whole program:
the difference is roughly what the passes between ops cost in memory traffic.

    python tools/profile_ops.py --detector nanodet-plus-m_320 [--size 320] [--batch 1] [--top 25]

profiles the interpreter instead, on a whole NanoDet detector (``weights/<name>.h5`` or
``--weights``), as ``refghost.run`` runs it (refghost.forward.execute impl "kernels", BLAS held at
one thread, Numba at its threads): every node of the graph is timed in place during whole forward
passes (``--repeat`` passes, the median per node), then the post-processing (decode + NMS). Nodes
are grouped by kind: convs split into 1x1 GEMM, kxk GEMM (im2col) and depthwise, the rest by op.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numba
import numpy as np

import refghost
from refghost import engine
from refghost.engine import program
from refghost.threads import single_threaded_blas

ROOT = Path(__file__).resolve().parent.parent
KINDS = {program.OP_GEMM: "gemm", program.OP_DW: "depthwise", program.OP_DW_BLOCKED: "depthwise-blocked",
         program.OP_SE: "squeeze-excite", program.OP_OUTPUT: "output copy", program.OP_STEM: "stem",
         program.OP_GHOST: "ghost (fused)"}


def best_time(plan, prog, consts, x, out, repeat):
    """Best wall time in seconds of running these rows on the plan's buffers (as the engine runs
    them: zeroing the work counters first, a few microseconds, is included)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        plan.execute(prog, consts, x, out)
        best = min(best, time.perf_counter() - t)
    return best


def node_kind(node) -> str:
    """The kind a node's time is counted under: its op, convs split by how kernels.conv2d runs them."""
    if node.op != "conv":
        return node.op
    a = node.attrs
    if a.get("groups", 1) != 1:
        return f"conv depthwise {a.get('kernel_size', '')}".rstrip()
    return "conv gemm"


def profile_detector(weights, x, repeat=10):
    """Time every node of ``weights.graph`` in place, as refghost.forward.execute runs it (impl
    "kernels", BLAS held at one thread), over ``repeat`` whole passes on ``x`` (N, 3, H, W), and
    the post-processing. Returns ``(rows, post_ms, whole_ms)``: rows ``(median ms, node, kind,
    output shape)`` in graph order, the median post-processing time, the median pass time."""
    from refghost.detector.graph import OUTPUT
    from refghost.detector.run import postprocess, prepare_batch
    from refghost.forward import evaluate

    graph, params = weights.graph, weights.params(x.dtype)
    last_use = {src: i for i, node in enumerate(graph.nodes) for src in node.inputs}
    per_node = [[] for _ in graph.nodes]
    shapes, kinds, passes = [None] * len(graph.nodes), [None] * len(graph.nodes), []
    for r in range(repeat + 1):  # pass 0 warms up (Numba kernels, BLAS buffers)
        values = {"input": x}
        start = time.perf_counter()
        with single_threaded_blas():
            for i, node in enumerate(graph.nodes):
                t = time.perf_counter()
                y = evaluate(node, [values[src] for src in node.inputs], params, impl="kernels")
                dt = time.perf_counter() - t
                if r:
                    per_node[i].append(dt)
                values[node.name] = y
                for src in node.inputs:
                    if last_use[src] == i and src != OUTPUT:
                        values.pop(src, None)
                if shapes[i] is None:
                    shapes[i] = y.shape
                    w = params.get(node.params.get("weight", ""), None)
                    kinds[i] = node_kind(node)
                    if node.op == "conv" and w is not None:
                        k = f"{w.shape[2]}x{w.shape[3]}"
                        kinds[i] = f"conv depthwise {k}" if node.attrs.get("groups", 1) != 1 else (
                            "conv gemm 1x1" if k == "1x1" else f"conv gemm {k} (im2col)")
        if r:
            passes.append(time.perf_counter() - start)
    batch = prepare_batch([x], weights, x.dtype)
    posts = []
    for r in range(max(3, repeat // 3) + 1):
        t = time.perf_counter()
        postprocess(values[OUTPUT], weights.config, batch)
        if r:
            posts.append(time.perf_counter() - t)
    rows = [(float(np.median(ts)) * 1e3, node.name, kinds[i], shapes[i]) for i, (node, ts) in
            enumerate(zip(graph.nodes, per_node))]
    return rows, float(np.median(posts)) * 1e3, float(np.median(passes)) * 1e3


def detector_main(args):
    from refghost.detector.spec import PRESETS

    if args.detector not in PRESETS:
        raise SystemExit(f"--detector {args.detector!r} is not a preset (one of {sorted(PRESETS)})")
    weights = refghost.load_weights(args.weights or ROOT / "weights" / f"{args.detector}.h5")
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(args.dtype)
    rows, post, whole = profile_detector(weights, x, args.repeat)
    total = sum(r[0] for r in rows)
    print(f"{args.detector}: {args.batch}x3x{args.size}x{args.size} {args.dtype}, interpreter (impl kernels), "
          f"numba {numba.get_num_threads()} threads, BLAS 1 thread; median of {args.repeat} passes")
    print(f"whole pass {whole:.1f} ms (sum of nodes {total:.1f} ms, {len(rows)} nodes); "
          f"post-processing (decode + NMS) {post:.1f} ms")
    per_kind = defaultdict(lambda: [0.0, 0])
    for t, _, kind, _ in rows:
        per_kind[kind][0] += t
        per_kind[kind][1] += 1
    print("| kind | nodes | ms | % of nodes |\n|---|---|---|---|")
    for kind, (t, n) in sorted(per_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"| {kind} | {n} | {t:.2f} | {100 * t / total:.1f} |")
    top = sorted(rows, key=lambda r: -r[0])[:args.top or 25]
    print("\n| node | kind | output shape | ms |\n|---|---|---|---|")
    for t, name, kind, shape in top:
        print(f"| {name} | {kind} | {'x'.join(map(str, shape))} | {t:.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="default ghostnet_nanodet_1.0x.h5, or weights/<detector>.h5")
    p.add_argument("--detector", help="profile the interpreter on this whole NanoDet detector (a preset name)")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--top", type=int, default=0, help="print only the N slowest rows (default: all)")
    args = p.parse_args(argv)
    if args.detector:
        return detector_main(args)
    args.weights = args.weights or str(ROOT / "weights" / "ghostnet_nanodet_1.0x.h5")

    weights = refghost.load_weights(args.weights)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(args.dtype)
    plan = engine.Plan(weights.graph, weights.tensors, x.dtype, x.shape)  # op by op, whatever the batch
    plan.run(x)
    out = np.empty(max(plan._out_size * args.batch, 1), dtype=x.dtype)  # _out_size is per image
    rows, whole = [], 0.0
    with single_threaded_blas():
        for seg in plan._segments:
            if seg[0] != "program":
                continue
            prog, consts = seg[1], seg[2]
            whole += best_time(plan, prog, consts, x, out, args.repeat)
            for i in range(len(prog)):
                rows.append((best_time(plan, prog[i:i + 1], consts[i:i + 1], x, out, args.repeat), len(rows),
                             KINDS[int(prog[i, program.KIND])]))
    print(f"{args.batch}x3x{args.size}x{args.size} {args.dtype}, {numba.get_num_threads()} threads, "
          f"best of {args.repeat}")
    shown = sorted(rows, reverse=True)[:args.top] if args.top else rows
    for t, i, kind in shown:
        print(f"  row {i:3d}  {kind:18s} {t * 1e6:9.1f} us")
    per_kind = defaultdict(float)
    for t, _, kind in rows:
        per_kind[kind] += t
    print("per kind: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])))
    print(f"sum of the rows alone {sum(per_kind.values()) * 1e3:.2f} ms; whole program {whole * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
