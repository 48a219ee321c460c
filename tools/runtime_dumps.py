"""Dump the tensors of honest runtime runs, for work on the bounds: one .npz per model and setting.

    python tools/runtime_dumps.py GOLDEN MODEL... [--out DIR] [--threads N] [--runtime NAME]

For each MODEL (``.onnx``, ``.xml``, ``.mnn``, ``.param``, ``.tflite``), runs it on the golden's
input at the runtime's defaults and at its precise settings (``refghost dump``), and writes
``DIR/<model stem>.<runtime>.<default|precise>.npz``, tensors by module path, with a
``.json`` beside it: the runtime, version, options and precision in effect, and the mapping.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from refghost.atomic import atomic_path
from refghost.errors import RefghostError
from refghost.golden import read_golden
from refghost.runtimes import run_model


def dump_runs(golden_path: str, models: list[str], out: str, *, threads: int = 1,
              runtime: str | None = None) -> list[str]:
    """Write the dumps of every model at both settings; returns the paths of the .npz files."""
    golden = read_golden(golden_path)
    written = []
    for model in models:
        stem = os.path.splitext(os.path.basename(model))[0]
        for setting, precise in (("default", False), ("precise", True)):
            run = run_model(model, golden, runtime=runtime, precise=precise, threads=threads)
            base = os.path.join(out, f"{stem}.{run.runtime}.{setting}")
            with atomic_path(base + ".npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, **run.tensors)
            with atomic_path(base + ".json") as tmp, open(tmp, "w") as f:
                json.dump({"golden": golden_path, "setting": setting, **run.summary()}, f, indent=1)
            written.append(base + ".npz")
            print(f"{base}.npz: {run.describe()}; {run.mapping_summary()}; precision {run.precision.arithmetic}")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("golden")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", default=".", help="folder for the dumps (default: here)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", help="run every model in this runtime (default: by extension)")
    args = parser.parse_args(argv)
    try:
        if not os.path.isdir(args.out):
            raise RefghostError(f"--out {args.out}: no such folder")
        dump_runs(args.golden, args.models, args.out, threads=args.threads, runtime=args.runtime)
    except RefghostError as exc:
        print(f"runtime_dumps: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
