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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(ROOT / "weights" / "ghostnet_nanodet_1.0x.h5"))
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--top", type=int, default=0, help="print only the N slowest rows (default: all)")
    args = p.parse_args(argv)

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
