"""refghost command line: run GhostNet from a weights file, convert checkpoints.

    refghost run                                  # shipped weights on the shipped sample image
    refghost run photo.jpg --weights my.h5 --dtype float64 --out result.npz [--intermediates]
    refghost convert SRC --out W.h5 --arch nanodet|ghostnet [--width W] [--activation NAME]
                     [--out-stages 4,6,9]
    refghost golden --weights W.h5 --out golden.h5 [--input x.npy | IMAGE | --seed N] [--intermediates]
    refghost compare golden.h5 model.onnx|dump.npz|dump.h5|out.npy [--json report.json] [--map a=b]
    refghost info W.h5|golden.h5 [--json]
    refghost export W.h5 --out state_dict.npz|state_dict.pth

Exit status: 0 success (compare: every tensor within tolerance), 1 compare found a mismatch,
2 bad input (the message says what is wrong; no output file is left).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_path
from .errors import RefghostError

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = PACKAGE_DIR.parent / "weights" / "ghostnet_nanodet_1.0x.h5"
SAMPLE_IMAGE = PACKAGE_DIR / "data" / "sample.png"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refghost", description="Reference GhostNet (NanoDet backbone) "
                                     "in NumPy + Numba: run it, convert weights.")
    parser.add_argument("--version", action="version", version=f"refghost {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run GhostNet on an image and print a summary of its outputs")
    run.add_argument("image", nargs="?", default=str(SAMPLE_IMAGE),
                     help="image file, or .npy float array (N,3,H,W)/(3,H,W) used as the network input "
                          "as is (default: the shipped sample image)")
    run.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                     help="refghost weights file (default: the shipped synthetic weights)")
    run.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                     help="float32 mimics a backend; float64 is the oracle")
    run.add_argument("--out", help="write the outputs to this .npz file, keyed by module path")
    run.add_argument("--intermediates", action="store_true", help="also keep every layer's output")
    run.add_argument("--impl", choices=("fast", "plain", "engine", "interpreter"), default="fast",
                     help="fast: the compiled engine (BN folded, fused kernels), or the interpreter with "
                          "BLAS/Numba ops when --intermediates is given; plain: the NumPy definitions")

    conv = sub.add_parser("convert", help="convert a PyTorch checkpoint (or .npz state_dict) to a weights file")
    conv.add_argument("src", help=".pth/.pt/.ckpt checkpoint (needs torch) or .npz of state_dict arrays")
    conv.add_argument("--out", required=True, help="weights file to write (.h5)")
    conv.add_argument("--arch", choices=("nanodet", "ghostnet"),
                      help="default nanodet (for .onnx: read from the graph, and checked if given)")
    conv.add_argument("--width", type=float, help="width multiplier (default 1.0; .onnx: from the graph)")
    conv.add_argument("--activation", help="NanoDet activation name (default ReLU; .onnx: from the graph)")
    conv.add_argument("--out-stages", help="comma-separated stages 0..9 (default 4,6,9; .onnx: from the graph)")
    gold = sub.add_parser("golden", help="write a golden file: the float64 oracle's outputs and their bounds")
    gold.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="refghost weights file")
    gold.add_argument("--out", required=True, help="golden file to write (.h5)")
    source = gold.add_mutually_exclusive_group()
    source.add_argument("--input", help="image file, or .npy float array (N,3,H,W)/(3,H,W) used as is "
                                        "(default: the shipped sample image)")
    source.add_argument("--seed", type=int, help="use a seeded N(0,1) input of the weights' input size")
    gold.add_argument("--batch", type=int, default=1, help="batch size of the --seed input")
    gold.add_argument("--intermediates", action="store_true", help="also store every layer's output")

    comp = sub.add_parser("compare", help="compare a backend's outputs with a golden file")
    comp.add_argument("golden", help="golden file written by `refghost golden`")
    comp.add_argument("candidate", help=".onnx (run with ONNX Runtime on the golden input), or .npz/.h5/.npy "
                                        "arrays named by module path")
    comp.add_argument("--json", help="write the full report to this JSON file")
    comp.add_argument("--map", action="append", default=[], metavar="CAND=MODULE",
                      help="rename a candidate array to a module path or output name (repeatable)")
    comp.add_argument("--policy", choices=("float32", "float16", "bfloat16"), default="float32",
                      help="precision of the backend's arithmetic (scales the derived bounds)")
    comp.add_argument("--atol", type=float, help="override the derived bounds with atol + rtol*|reference|")
    comp.add_argument("--rtol", type=float, help="see --atol")
    comp.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    comp.add_argument("--ort-optimization", choices=("all", "none"), default="all",
                      help="ONNX Runtime graph optimization level")
    info = sub.add_parser("info", help="describe and validate a weights or golden file")
    info.add_argument("file", help="weights file or golden file")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")

    export = sub.add_parser("export", help="write a weights file's tensors back as a state_dict")
    export.add_argument("weights", help="refghost weights file")
    export.add_argument("--out", required=True, help=".npz (NumPy) or .pth (needs torch) state_dict to write")
    return parser


def _load_input(image: str):
    """A .npy file is the network input as is; anything else is an image file path."""
    if image.endswith(".npy"):
        from .safe_io import read_npy
        from .weights import MAX_INPUT_PIXELS

        return read_npy(image, RefghostError, max_bytes=MAX_INPUT_PIXELS * 3 * 8)
    return image


def save_npz(path: str, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` atomically: a temporary file in the same folder, renamed."""
    if not path.endswith(".npz"):
        raise RefghostError(f"--out {path}: outputs are written as .npz; give a path ending in .npz")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RefghostError(f"--out {path}: folder {folder} does not exist")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _summary_line(name: str, a: np.ndarray) -> str:
    return (f"  {name:<40} {str(tuple(a.shape)):<20} {a.dtype!s:<8} min {a.min():+.4g}  max {a.max():+.4g}  "
            f"mean {a.mean():+.4g}")


def _engine_compiles(args) -> bool:
    """Whether this run will compile the engine's program (no intermediates, engine path, Numba's
    on-disk cache without it): the one wait of about half a minute worth announcing."""
    if args.intermediates or args.impl not in ("fast", "engine"):
        return False
    from .kernels import fused
    from .kernels._jit import compiled_on_disk

    return compiled_on_disk(fused.run_program) is False


def cmd_run(args) -> int:
    from .runner import run
    from .weights import load_weights

    t0 = time.perf_counter()
    weights = load_weights(args.weights)
    image = _load_input(args.image)
    t1 = time.perf_counter()
    compiles = _engine_compiles(args)
    if compiles:
        print("compiling the kernels for this machine: about half a minute, the first time only "
              "(Numba caches them)", file=sys.stderr, flush=True)
    out = run(image, weights, dtype=args.dtype, intermediates=args.intermediates, impl=args.impl)
    t2 = time.perf_counter()
    cfg = weights.config
    print(f"weights  {args.weights} ({cfg.arch}, width {cfg.width:g}, {cfg.activation}, sha256 "
          f"{weights.sha256[:12]})")
    if "description" in weights.provenance:
        print(f"         {weights.provenance['description']}")
    print(f"input    {args.image}")
    outputs = weights.graph.outputs
    print(f"outputs  ({args.dtype}, {args.impl}; {len(out)} tensors; load {1e3 * (t1 - t0):.0f} ms, first forward "
          f"{1e3 * (t2 - t1):.0f} ms including {'compiling' if compiles else 'loading compiled'} kernels)")
    for name in outputs:
        print(_summary_line(name, out[name]))
    if args.intermediates:
        print(f"  ... and {len(out) - len(outputs)} intermediate tensors")
    if args.out:
        save_npz(args.out, out)
        print(f"wrote    {args.out}")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    stages = None
    if args.out_stages is not None:
        try:
            stages = tuple(int(s) for s in args.out_stages.split(",") if s.strip())
        except ValueError:
            raise RefghostError(f"--out-stages must be comma-separated integers, got {args.out_stages!r}") from None
    weights = convert(args.src, args.out, arch=args.arch, width=args.width, activation=args.activation,
                      out_stages=stages)
    n_params = sum(a.size for a in weights.tensors.values())
    print(f"wrote {args.out}: {weights.config.arch}, width {weights.config.width:g}, "
          f"{len(weights.tensors)} tensors, {n_params:,} values")
    return 0


def cmd_golden(args) -> int:
    from .golden import make_golden, write_golden
    from .runner import prepare_input
    from .weights import MAX_INPUT_PIXELS, load_weights

    weights = load_weights(args.weights)
    if args.seed is not None:
        w, h = weights.preprocessing.input_size
        if args.batch * w * h > MAX_INPUT_PIXELS:
            raise RefghostError(f"--batch {args.batch} of {w}x{h} inputs is {args.batch * w * h} pixels, more than "
                                f"{MAX_INPUT_PIXELS}")
        x = np.random.default_rng(args.seed).standard_normal((args.batch, 3, h, w)).astype(np.float32)
        source = f"seed {args.seed}: N(0, 1) of shape {x.shape}"
    else:
        image = args.input or str(SAMPLE_IMAGE)
        x = prepare_input(_load_input(image), weights, np.float32)
        source = image
    command = "refghost " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    golden = make_golden(weights, x, intermediates=args.intermediates, input_source=source, command=command)
    write_golden(args.out, golden)
    print(f"wrote {args.out}: input {x.shape} ({source}), {len(golden.outputs)} outputs"
          f"{f', {len(golden.intermediates)} intermediates' if golden.intermediates else ''}")
    return 0


def cmd_compare(args) -> int:
    import json

    from .candidates import load_candidate
    from .compare import compare, format_report
    from .golden import read_golden

    maps = {}
    for item in args.map:
        if "=" not in item:
            raise RefghostError(f"--map {item!r}: expected CANDIDATE_NAME=MODULE.PATH")
        key, value = item.split("=", 1)
        maps[key] = value
    golden = read_golden(args.golden)
    tensors, description, notes = load_candidate(args.candidate, golden, maps=maps, threads=args.threads,
                                                 optimization=args.ort_optimization)
    report = compare(golden, tensors, policy=args.policy, atol=args.atol, rtol=args.rtol,
                     candidate_name=description, notes=notes)
    print(format_report(report))
    if args.json:
        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump(report.to_json(), f, indent=1)
    return 0 if report.passed else 1


def describe(path: str) -> dict:
    """What a weights or golden file holds, validated (raises RefghostError if it is unusable)."""
    from .safe_io import attribute, open_hdf5

    with open_hdf5(path, RefghostError, "weights or golden") as f:
        fmt = attribute(f, "format", path, RefghostError, "str", default="")
    if fmt == "refghost-golden":
        from .golden import read_golden

        golden = read_golden(path)
        weights, extra = golden.weights, {
            "kind": "golden", "input_shape": list(golden.input.shape), "outputs": list(golden.outputs),
            "intermediates": len(golden.intermediates),
            "attributes": {k: (v.item() if hasattr(v, "item") else v) for k, v in golden.attrs.items()}}
    else:
        from .weights import load_weights

        weights = load_weights(path)
        extra = {"kind": "weights", "sha256": weights.sha256}
    cfg, pre = weights.config, weights.preprocessing
    trainable = sum(a.size for k, a in weights.tensors.items() if not k.endswith(("running_mean", "running_var")))
    return {"file": path, "valid": True, **extra,
            "config": {"arch": cfg.arch, "width": cfg.width, "activation": cfg.activation,
                       "out_stages": list(cfg.out_stages), "num_classes": cfg.num_classes, "folded": cfg.folded},
            "preprocessing": {"mean": list(pre.mean), "std": list(pre.std), "channel_order": pre.channel_order,
                              "input_size": list(pre.input_size)},
            "provenance": dict(weights.provenance), "tensors": len(weights.tensors),
            "parameters": int(trainable), "values": int(sum(a.size for a in weights.tensors.values()))}


def cmd_info(args) -> int:
    import json

    if args.json:
        try:
            info = describe(args.file)
        except RefghostError as exc:  # tools get the verdict as JSON too
            print(json.dumps({"file": args.file, "valid": False, "error": str(exc)}, indent=1))
            return 2
        print(json.dumps(info, indent=1))
        return 0
    info = describe(args.file)
    cfg = info["config"]
    print(f"{info['file']}: valid refghost {info['kind']} file")
    print(f"  network       {cfg['arch']}, width {cfg['width']:g}, activation {cfg['activation']}"
          f"{', out_stages ' + ','.join(map(str, cfg['out_stages'])) if cfg['out_stages'] else ''}"
          f"{', ' + str(cfg['num_classes']) + ' classes' if cfg['num_classes'] else ''}"
          f"{', BatchNorm folded' if cfg['folded'] else ''}")
    print(f"  parameters    {info['parameters']:,} ({info['tensors']} tensors, {info['values']:,} values)")
    pre = info["preprocessing"]
    print(f"  preprocessing {pre['channel_order']}, mean {pre['mean']}, std {pre['std']}, "
          f"input size {pre['input_size'][0]}x{pre['input_size'][1]}")
    for key, value in info["provenance"].items():
        if value:
            print(f"  {key:<13} {value}")
    if info["kind"] == "golden":
        print(f"  input         {tuple(info['input_shape'])}; outputs {', '.join(info['outputs'])}; "
              f"{info['intermediates']} intermediates")
        for key in ("refghost_version", "weights_sha256", "input_source", "command"):
            print(f"  {key:<13} {info['attributes'].get(key, '')}")
    else:
        print(f"  sha256        {info['sha256']}")
    return 0


def cmd_export(args) -> int:
    from .weights import load_weights

    weights = load_weights(args.weights)
    if args.out.endswith(".npz"):
        save_npz(args.out, weights.tensors)
    elif args.out.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError:
            raise RefghostError("writing .pth needs torch installed; write .npz instead") from None
        state_dict = {k: torch.from_numpy(np.array(v)) for k, v in weights.tensors.items()}
        with atomic_path(args.out) as tmp:
            torch.save(state_dict, tmp)
    else:
        raise RefghostError(f"--out {args.out}: give a .npz or .pth path")
    print(f"wrote {args.out}: {len(weights.tensors)} tensors")
    return 0


# --- argument checks: all of them run before any command starts working ----------------------
def _at_least(name: str, value, low):
    if value is not None and value < low:
        raise RefghostError(f"{name} must be >= {low}, got {value}")


def _finite_non_negative(name: str, value):
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise RefghostError(f"{name} must be a finite number >= 0, got {value}")


def check_args(args) -> None:
    """Refuse out-of-range numbers and unwritable output paths before any work (RefghostError)."""
    from .atomic import check_writable
    from .weights import MAX_INPUT_PIXELS, MAX_WIDTH

    command = args.command
    if command == "golden":
        _at_least("--seed", args.seed, 0)
        _at_least("--batch", args.batch, 1)
        if args.batch > MAX_INPUT_PIXELS:
            raise RefghostError(f"--batch {args.batch}: at most {MAX_INPUT_PIXELS} input pixels in all")
    if command == "convert" and args.width is not None and not (math.isfinite(args.width)
                                                               and 0 < args.width <= MAX_WIDTH):
        raise RefghostError(f"--width must be a multiplier in (0, {MAX_WIDTH:g}], got {args.width}")
    if command == "compare":
        _finite_non_negative("--atol", args.atol)
        _finite_non_negative("--rtol", args.rtol)
        cpus = os.cpu_count() or 1
        if not 1 <= args.threads <= cpus:
            raise RefghostError(f"--threads must be in 1..{cpus} (this machine's CPUs), got {args.threads}")
    if command == "run" and args.out is not None and not args.out.endswith(".npz"):
        raise RefghostError(f"--out {args.out}: outputs are written as .npz; give a path ending in .npz")
    output = args.json if command == "compare" else getattr(args, "out", None)
    if output is not None:
        check_writable(output, "--json" if command == "compare" else "--out")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    commands = {"run": cmd_run, "convert": cmd_convert, "golden": cmd_golden, "compare": cmd_compare,
                "info": cmd_info, "export": cmd_export}
    try:
        check_args(args)
        return commands[args.command](args)
    except RefghostError as exc:
        print(f"refghost {args.command}: error: {exc}", file=sys.stderr)
        return 2
