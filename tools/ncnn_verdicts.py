"""Print refghost's verdicts on honest ncnn runs of GhostNet, as a porter would convert and run it.

A seeded GhostNet (tests/torch_ghostnet.py) is exported to TorchScript, converted by pnnx with its
default (fp16 weights) and with ``fp16=0``, and run by ``refghost.runtimes.ncnn`` at ncnn's defaults
and at ``--precise`` settings. For each run: blobs mapped/exposed, the precision in effect, the
verdict under each policy, the largest accumulated and isolated ratios (error / bound) and where,
and the time of the ncnn run and of the comparison::

    python tools/ncnn_verdicts.py --width 1.0 --size 320 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_runtime_ncnn import convert, make_case  # noqa: E402

from refghost.compare import compare  # noqa: E402
from refghost.runtimes import run_model  # noqa: E402


def _worst(report, field):
    values = [(getattr(t, field) or 0.0, t.name) for t in report.tensors]
    return max(values) if values else (float("nan"), "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--activation", default="ReLU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=["float32", "float16"])
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        golden, pt, _ = make_case(root / "src", width=args.width, size=args.size, activation=args.activation,
                                  seed=args.seed, onnx_too=False)
        params = {fp16: convert(pt, golden.input.shape, root / f"fp16_{int(fp16)}", fp16=fp16)
                  for fp16 in (True, False)}
        print(f"GhostNet {args.width}x {args.activation}, input {args.size}x{args.size}, seed {args.seed}, "
              f"{args.threads} thread(s)\n")
        print("| pnnx | settings | mapped/exposed | precision (arith/weights/act) | "
              + " | ".join(f"passed {p}" for p in args.policies)
              + " | first divergent (float32) | max accumulated ratio | max isolated ratio | run s | compare s |")
        print("|---" * (9 + len(args.policies)) + "|")
        for fp16 in (True, False):
            for precise in (False, True):
                t0 = time.perf_counter()
                run = run_model(str(params[fp16]), golden, precise=precise, threads=args.threads)
                t1 = time.perf_counter()
                reports = {p: compare(golden, run.tensors, policy=p, candidate_name=run.describe())
                           for p in args.policies}
                t2 = time.perf_counter()
                main_report = reports[args.policies[0]]
                acc, acc_at = _worst(main_report, "accumulated_ratio")
                iso, iso_at = _worst(main_report, "isolated_ratio")
                p = run.precision
                print(f"| {'default (fp16)' if fp16 else 'fp16=0'} | {'precise' if precise else 'defaults'} | "
                      f"{len(run.mapping)}/{run.exposed} | {p.arithmetic}/{p.weights}/{p.activations} | "
                      + " | ".join(str(r.passed) for r in reports.values())
                      + f" | {main_report.first_divergent} | {acc:.3g} ({acc_at}) | {iso:.3g} ({iso_at}) | "
                        f"{t1 - t0:.2f} | {(t2 - t1) / len(reports):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
