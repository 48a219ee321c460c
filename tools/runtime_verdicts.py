"""Verdicts of refghost compare on honest and broken ports in real runtimes, per runtime and setting.

    python tools/runtime_verdicts.py                                  # 160, 320, 416; seeds 0, 1; the sample image
    python tools/runtime_verdicts.py --sizes 320 --seeds 0 --runtimes openvino,ncnn

For each input size the shipped weights are exported to ONNX (and converted for MNN and ncnn, see
tests/runtime_bank.py), and a broken copy is made with one depthwise weight of
``blocks.6.2.ghost1.cheap_operation.0`` times 1.01. Every model file is run in its runtime at its
default and at its most precise settings on float64 goldens of seeded N(0, 1) inputs and of the
sample image, and compared under the policy of the precision the runtime reports (what
``refghost compare MODEL`` does). Prints, per runtime and setting: honest runs passed / tried,
the largest fraction of the accumulated and of the isolated bound an honest run used, broken
runs caught / localized (the first divergent layer is the bug's), and seconds per comparison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import runtime_bank as rb  # noqa: E402

import refghost  # noqa: E402
from refghost.verify.golden import make_golden  # noqa: E402
from refghost.preprocess import prepare_image  # noqa: E402

WEIGHTS = REPO / "weights" / "ghostnet_nanodet_1.0x.h5"
SAMPLE = REPO / "refghost" / "data" / "sample.png"


def inputs(weights, size: int, seeds, image: bool):
    """(label, (1, 3, size, size) float32 input) for each seed, and the sample image resized."""
    for seed in seeds:
        yield f"seed {seed}", np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    if image:
        p = weights.preprocessing
        yield "sample image", prepare_image(SAMPLE, mean=p.mean, std=p.std, channel_order=p.channel_order,
                                            input_size=[size, size])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="160,320,416")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--no-image", action="store_true", help="seeded inputs only")
    parser.add_argument("--runtimes", default=",".join(sorted({r for r, _, _ in rb.CANDIDATES})))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = [r for r in args.runtimes.split(",") if rb.available(r)]
    candidates = [c for c in rb.CANDIDATES if c[0] in wanted]
    weights = refghost.load_weights(WEIGHTS)
    rows = defaultdict(lambda: {"passed": 0, "tried": 0, "acc": 0.0, "iso": 0.0, "caught": 0, "localized": 0,
                                "bugs": 0, "seconds": [], "precision": set(), "failures": []})
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            honest = rb.build_port(weights, size, Path(tmp) / f"honest{size}", runtimes=wanted)
            broken = rb.build_port(weights, size, Path(tmp) / f"bug{size}", bug=True, runtimes=wanted)
            for n, (label, x) in enumerate(inputs(weights, size, seeds, not args.no_image)):
                golden = make_golden(weights, x, intermediates=True)
                for runtime, key, precise in candidates:
                    row = rows[(runtime, key, precise)]
                    start = time.perf_counter()
                    report, run = rb.judge(golden, honest, runtime, key, precise)
                    row["seconds"].append(time.perf_counter() - start)
                    row["precision"].add(run.precision.policy)
                    acc, iso = rb.worst_ratios(report)
                    row["tried"] += 1
                    row["passed"] += report.passed
                    row["acc"], row["iso"] = max(row["acc"], acc), max(row["iso"], iso)
                    if not report.passed:
                        row["failures"].append(f"{size} {label}: {report.first_divergent}")
                    if n == 0:
                        report, _ = rb.judge(golden, broken, runtime, key, precise)
                        row["bugs"] += 1
                        row["caught"] += not report.passed
                        row["localized"] += rb.blames_bug(report)
                    print(f"{size:4d} {label:<13} {runtime:<12} {key:<10} {'precise' if precise else 'default':<8} "
                          f"{run.precision.policy:<17} acc {acc:.3f} iso {iso:.3f}", flush=True)
    print(f"\n{'runtime':<12} {'model':<10} {'settings':<8} {'policy':<17} {'honest':>8} {'acc used':>9} "
          f"{'iso used':>9} {'bugs caught':>11} {'localized':>9} {'s/compare':>9}")
    for (runtime, key, precise), row in rows.items():
        print(f"{runtime:<12} {key:<10} {'precise' if precise else 'default':<8} {','.join(sorted(row['precision'])):<17} "
              f"{row['passed']:>3}/{row['tried']:<4} {row['acc']:9.3f} {row['iso']:9.3f} "
              f"{row['caught']:>5}/{row['bugs']:<5} {row['localized']:>4}/{row['bugs']:<4} "
              f"{np.median(row['seconds']):9.1f}")
        for f in row["failures"]:
            print(f"    false alarm: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
