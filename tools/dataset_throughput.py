"""Throughput of verification over a dataset (``refghost compare --images``), end to end, and where
the time of one image goes.

    python tools/dataset_throughput.py                       # 320x320, 8 images, 2 local workers
    python tools/dataset_throughput.py --images 16 --workers 2 --size 320 [--model m.onnx]

Writes ``--images`` copies of the shipped sample image (each shifted and rescaled in brightness,
so no two inputs are equal) to a temporary folder, exports the shipped weights to ONNX at
``--size`` (tests/runtime_bank.export_onnx; needs torch) unless ``--model`` is given, then:

1. runs the set on a LocalCluster of ``--workers`` processes, as the CLI does
   (:func:`refghost.verify.dataset.run_set`), and prints images per second per core, wall clock
   from submitting the first task to the last result (the cluster's start-up is printed apart);
2. prints the mean time per image of every stage the tasks timed (preprocess, float64 oracle
   with intermediates and bounds, the candidate's two ONNX Runtime runs, the comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _images(folder: Path, n: int) -> None:
    from PIL import Image

    from refghost.cli import SAMPLE_IMAGE

    base = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"), dtype=np.float64)
    for i in range(n):
        gain = 0.6 + 0.8 * i / max(n - 1, 1)
        shifted = np.roll(base, 7 * i, axis=1) * gain
        Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)).save(folder / f"image_{i:03d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--model", help="an ONNX export of the weights at --size (default: exported now)")
    args = parser.parse_args()

    import distributed

    from refghost.cli import DEFAULT_WEIGHTS
    from refghost.verify.dataset import STAGES, Candidate, Job, run_set, sources, summarize
    from refghost.weights import from_tensors, load_weights, save_weights

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shipped = load_weights(str(DEFAULT_WEIGHTS))
        weights = from_tensors(shipped.tensors, shipped.config,
                               dataclasses.replace(shipped.preprocessing, input_size=(args.size, args.size)))
        save_weights(tmp / "w.h5", weights)
        model = args.model
        if model is None:
            from runtime_bank import export_onnx

            model = str(export_onnx(weights, args.size, tmp / "model.onnx"))
        (tmp / "images").mkdir()
        _images(tmp / "images", args.images)
        items = sources(str(tmp / "images"), "images")
        job = Job(weights=str(tmp / "w.h5"), warp_kernel="fixed_point", candidate=Candidate(model))
        t0 = time.perf_counter()
        with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster:
            t1 = time.perf_counter()
            run_set(job, items[:args.workers], cluster=cluster, progress=False)  # each worker loads its imports
            t2 = time.perf_counter()
            results = run_set(job, items, cluster=cluster, progress=False)
            t3 = time.perf_counter()
        report = summarize(str(tmp / "images"), model, results)
    n = len(results)
    print(f"{n} images at {args.size}x{args.size}, {args.workers} workers (one thread each), candidate ONNX Runtime; "
          f"cluster start {t1 - t0:.1f} s, first task per worker (imports, weights) {t2 - t1:.1f} s")
    print(f"end to end: {t3 - t2:.1f} s, {n / (t3 - t2):.2f} images/s, {n / (t3 - t2) / args.workers:.2f} images/s "
          f"per core = {(t3 - t2) * args.workers / n:.2f} s per image per core; verdicts "
          f"{ {s: sum(r.status == s for r in results) for s in ('pass', 'fail', 'error', 'lost')} }")
    total = sum(sum(r.seconds.values()) for r in results) / n
    print(f"time of one image in its task (mean over {n}): {total:.2f} s")
    for stage in STAGES:
        mean = sum(r.seconds.get(stage, 0.0) for r in results) / n
        if mean:
            print(f"  {stage:<11} {mean:6.2f} s  {100 * mean / total:4.0f} %")
    print(f"  (outside the tasks: {(t3 - t2) * args.workers / n - total:.2f} s per image per core of scheduling, "
          f"result transfer and idle workers at the end)")
    assert report.exit_status == 0, report.exit_status


if __name__ == "__main__":
    main()
