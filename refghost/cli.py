"""refghost command line: run GhostNet from a weights file, convert checkpoints.

    refghost run                                  # shipped weights on the shipped sample image
    refghost run photo.jpg --weights my.h5 --dtype float64 --out result.npz [--intermediates]
                 [--warp-kernel fixed_point|float32_fma|float32|ipp_float32_fma]
    refghost run a.jpg b.png DIR/ ...            # several images: one batch, each resized
    refghost convert SRC.pth|.ckpt|.npz|.onnx --out W.h5 --arch nanodet|ghostnet [--width W]
                     [--activation NAME] [--out-stages 4,6,9] [--channel-order --mean --std]
    refghost golden --weights W.h5 --out golden.h5 [--input x.npy | IMAGE | --seed N] [--intermediates]
                    [--warp-kernel KERNEL]
    refghost compare golden.h5 model.onnx|dump.npz|dump.h5|out.npy [--json report.json] [--map a=b]
    refghost compare golden.h5 model.xml|model.mnn|model.param|model.tflite [--runtime NAME] [--precise]
                     [--runtime-option KEY=VALUE] [--threads N]
    refghost compare ... --html report.html [--plots DIR]   # a page with charts (refghost[report])
    refghost compare --images DIR --weights W.h5 MODEL [--json r.json] [--html r.html] [--keep-failing DIR]
    refghost golden --images DIR --weights W.h5 --out GOLDDIR/ [--intermediates]
    refghost compare GOLDDIR/ MODEL           # a set: one task per image or golden (refghost[dataset]),
                     [--workers N | --scheduler tcp://HOST:8786]   # local processes or a Dask cluster
    refghost dump golden.h5 MODEL --out dump.npz  # the runtime's tensors on the golden input, by module path
    refghost map MODEL [--golden golden.h5 | --weights W.h5] [--json]  # runtime tensor -> module path, how matched
    refghost info W.h5|golden.h5 [--json]
    refghost export W.h5 --out state_dict.npz|state_dict.pth

Exit status: 0 success (compare: every tensor within tolerance), 1 compare found a mismatch,
2 bad input (the message says what is wrong; no output file is left). Over a set: 0 every image
passes, 1 any image fails, else 2 if any image could not be judged.
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
from .bounds import POLICIES
from .convert import DEFAULTS as CONVERT_DEFAULTS
from .errors import RefghostError

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = PACKAGE_DIR.parent / "weights" / "ghostnet_nanodet_1.0x.h5"
SAMPLE_IMAGE = PACKAGE_DIR / "data" / "sample.png"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refghost", description="Reference GhostNet (NanoDet backbone) "
                                     "in NumPy + Numba: run it, convert weights (.pth/.pt/.ckpt checkpoints "
                                     "without PyTorch, .npz state_dicts, .onnx models), write golden files and "
                                     "compare a port's outputs with them.")
    parser.add_argument("--version", action="version", version=f"refghost {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run GhostNet on an image (or several: one batch) and print a summary of its "
                                     "outputs; with a detector's weights, its detections")
    run.add_argument("image", nargs="*",
                     help="image files or folders of images (one batch, in the order given, a folder's "
                          "images by name; each resized to the weights' input size), or one .npy float "
                          "array (N,3,H,W)/(3,H,W) used as the network input as is (default: the shipped "
                          "sample image)")
    run.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                     help="refghost weights file (default: the shipped synthetic weights)")
    run.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                     help="float32 mimics a backend; float64 is the oracle")
    run.add_argument("--out", help="write the outputs to this .npz file, keyed by module path")
    run.add_argument("--intermediates", action="store_true", help="also keep every layer's output")
    run.add_argument("--impl", choices=("fast", "plain", "engine", "interpreter"), default="fast",
                     help="fast (default): the engine, or the interpreter when --intermediates is given; "
                          "engine: the compiled engine (BN folded, fused kernels), an error with "
                          "--intermediates; interpreter: layer by layer with BLAS/Numba ops, BN unfolded; "
                          "plain: layer by layer with the NumPy definitions of refghost/ops.py")
    _add_warp_kernel_option(run)
    from .detector.decode import DEFAULT_IOU_THRESHOLD, DEFAULT_MAX_DETECTIONS, DEFAULT_SCORE_THRESHOLD

    det = run.add_argument_group("detector weights only")
    det.add_argument("--json", help="write the detections to this JSON file: a list of {image, box, score, label, "
                                    "class}, box [x1, y1, x2, y2] in original-image pixels")
    det.add_argument("--draw", metavar="OUT.png", help="draw the detections on the image (one image file) and write it")
    det.add_argument("--score-threshold", type=float,
                     help=f"keep scores above this (default {DEFAULT_SCORE_THRESHOLD}, NanoDet's; its C++ demos use 0.4)")
    det.add_argument("--iou-threshold", type=float, help=f"NMS suppresses a box overlapping a kept one of its class "
                                                        f"by more than this IoU (default {DEFAULT_IOU_THRESHOLD}; "
                                                        f"the demos: 0.5)")
    det.add_argument("--max-detections", type=int, help=f"keep at most this many per image "
                                                       f"(default {DEFAULT_MAX_DETECTIONS})")

    conv = sub.add_parser("convert", help="convert a PyTorch checkpoint, .npz state_dict or ONNX model to a "
                                          "weights file")
    conv.add_argument("src", help=".pth/.pt/.ckpt checkpoint (read without PyTorch; no code in it is run), "
                                  ".npz of state_dict arrays, or .onnx model (architecture read from the graph)")
    conv.add_argument("--out", required=True, help="weights file to write (.h5)")
    conv.add_argument("--arch", choices=("nanodet", "ghostnet", "detector"),
                      help=f"nanodet: NanoDet's GhostNet backbone (of a whole detector's checkpoint too: its neck "
                           f"and head are left out, and named); ghostnet: the ImageNet classifier; detector: the "
                           f"whole NanoDet detector (backbone, neck, head). Default: detector for a checkpoint "
                           f"with fpn/head keys (unless --width/--activation/--out-stages are given), else "
                           f"{CONVERT_DEFAULTS['arch']} (.onnx: read from the graph, and "
                           f"checked if given)")
    conv.add_argument("--config", metavar="NANODET.yml",
                      help="NanoDet's own YAML config of the model (implies --arch detector): the architecture, "
                           "input size, keep_ratio, mean/std and class names are read from it (needs PyYAML: "
                           "pip install refghost[config])")
    conv.add_argument("--width", type=float,
                      help=f"width multiplier (default {CONVERT_DEFAULTS['width']}; .onnx: from the graph)")
    conv.add_argument("--activation",
                      help=f"NanoDet activation name (default {CONVERT_DEFAULTS['activation']}; .onnx: from the graph)")
    default_stages = ",".join(map(str, CONVERT_DEFAULTS["out_stages"]))
    conv.add_argument("--out-stages",
                      help=f"comma-separated stages 0..9 (default {default_stages}; .onnx: from the graph)")
    conv.add_argument("--channel-order", choices=("BGR", "RGB"),
                      help="channel order the network expects (no checkpoint or graph records it; default: "
                           "BGR for nanodet, as NanoDet's cv2.imread, RGB for ghostnet)")
    conv.add_argument("--mean", help="per-channel mean, 0..255, in the channel order: three comma-separated "
                                     "numbers (default: NanoDet's/ImageNet's statistics)")
    conv.add_argument("--std", help="per-channel std, 0..255, in the channel order (see --mean)")
    gold = sub.add_parser("golden", help="write a golden file: the float64 oracle's outputs and their bounds")
    gold.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                      help="refghost weights file (default: the shipped synthetic weights)")
    gold.add_argument("--out", required=True, help="golden file to write (.h5 or .hdf5); with --images, the folder "
                                                   "to write one golden per image to (NAME.h5 for NAME.png)")
    source = gold.add_mutually_exclusive_group()
    source.add_argument("--input", help="image file, or .npy float array (N,3,H,W)/(3,H,W) used as is "
                                        "(default: the shipped sample image)")
    source.add_argument("--seed", type=int, help="use a seeded N(0,1) input of the weights' input size")
    source.add_argument("--images", metavar="DIR", help="a folder of images: one golden file per image, written "
                                                        "by parallel workers (needs refghost[dataset])")
    gold.add_argument("--batch", type=int, default=1, help="batch size of the --seed input")
    gold.add_argument("--intermediates", action="store_true", help="also store every layer's output")
    _add_warp_kernel_option(gold)
    _set_arguments(gold)

    comp = sub.add_parser("compare", help="compare a backend's outputs with a golden file")
    comp.add_argument("golden", nargs="?", help="golden file written by `refghost golden`, or a folder of them "
                                                "(each judged by a worker); omitted with --images")
    comp.add_argument("candidate", nargs="?", help=".onnx (run with ONNX Runtime on the golden input), or "
                                                   ".npz/.h5/.npy arrays named by module path; a model file for a "
                                                   "folder or --images")
    comp.add_argument("--images", metavar="DIR", help="judge the model on every image of this folder: oracle, "
                                                      "candidate run and verdict per image, a per-layer summary "
                                                      "(needs refghost[dataset])")
    comp.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                      help="with --images: the weights file of the oracle (default: the shipped synthetic weights)")
    comp.add_argument("--keep-failing", metavar="DIR", help="with a folder or --images: write the golden, the "
                                                            "candidate's tensors and the report of each failing "
                                                            "image to this folder")
    comp.add_argument("--json", help="write the full report to this JSON file")
    comp.add_argument("--html", help="write the report as one self-contained HTML page with charts "
                                     "(needs refghost[report])")
    comp.add_argument("--plots", metavar="DIR", help="write the report's charts as PNG files in this folder "
                                                     "(needs refghost[report])")
    comp.add_argument("--map", action="append", default=[], metavar="CAND=MODULE",
                      help="rename a candidate array to a module path or output name (repeatable)")
    comp.add_argument("--policy", choices=("auto",) + tuple(POLICIES), default="auto",
                      help="how the backend rounds (default auto: the precision the runtime reports for a model "
                           "file, float32 for arrays): " + "; ".join(f"{p.name}: {p.description}"
                                                                     for p in POLICIES.values()))
    comp.add_argument("--verbose", action="store_true", help="print every compared tensor, not only the failing ones")
    comp.add_argument("--atol", type=float, help="override the derived bounds with atol + rtol*|reference|")
    comp.add_argument("--rtol", type=float, help="see --atol")
    comp.add_argument("--ort-optimization", choices=("all", "none"), default="all",
                      help="ONNX Runtime graph optimization level")
    _runtime_arguments(comp)
    _add_warp_kernel_option(comp)
    _set_arguments(comp)
    dump = sub.add_parser("dump", help="run a model file in its runtime on a golden input and write its "
                                       "tensors by module path (.npz)")
    dump.add_argument("golden", help="golden file written by `refghost golden` (its input is fed)")
    dump.add_argument("model", help="model file: .onnx .xml .mnn .param .tflite")
    dump.add_argument("--out", required=True, help=".npz to write (arrays named by module path or output name)")
    _runtime_arguments(dump)
    mapc = sub.add_parser("map", help="show which runtime tensor holds which layer, and how it was matched")
    mapc.add_argument("model", help="model file: .onnx .xml .mnn .param .tflite")
    mapc.add_argument("--golden", help="golden file giving the network and the input shape (default: the network "
                                       "of --weights on a seeded input of the model's input shape)")
    mapc.add_argument("--weights", help="weights file of the network the model was made from (default: an .onnx "
                                        "model's own weights, else the shipped weights)")
    mapc.add_argument("--json", action="store_true", help="print JSON instead of text")
    _runtime_arguments(mapc)
    info = sub.add_parser("info", help="describe and validate a weights or golden file")
    info.add_argument("file", help="weights file or golden file")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")

    export = sub.add_parser("export", help="write a weights file's tensors back as a state_dict")
    export.add_argument("weights", help="refghost weights file")
    export.add_argument("--out", required=True, help=".npz (NumPy) or .pth (needs torch) state_dict to write")
    return parser


def _runtime_arguments(parser) -> None:
    """The options of a run of a model file in its runtime (compare, dump, map)."""
    from .runtimes import RUNTIMES

    parser.add_argument("--runtime", choices=tuple(RUNTIMES),
                        help="runtime that runs the model file (default: by extension; .onnx: onnxruntime)")
    parser.add_argument("--precise", action="store_true",
                        help="the runtime's most precise settings instead of its defaults")
    parser.add_argument("--runtime-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a runtime setting (OpenVINO property, MNN precision, ncnn opt flag...), repeatable")
    parser.add_argument("--threads", type=int, default=1, help="threads of the runtime")


def _set_arguments(parser) -> None:
    """Where the tasks of a set (--images, a folder of goldens) run."""
    parser.add_argument("--workers", type=int, help="local worker processes (default: the cores)")
    parser.add_argument("--scheduler", metavar="tcp://HOST:8786",
                        help="run the tasks on this existing Dask distributed cluster instead")


def _runtime_options(args) -> dict[str, str]:
    options = {}
    for item in args.runtime_option:
        if "=" not in item:
            raise RefghostError(f"--runtime-option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    return options


def _add_warp_kernel_option(parser) -> None:
    from .preprocess import DEFAULT_WARP_KERNEL, WARP_KERNELS

    parser.add_argument("--warp-kernel", choices=WARP_KERNELS, default=DEFAULT_WARP_KERNEL,
                        help="which OpenCV's warpPerspective the image resize reproduces bit for bit: "
                             "fixed_point = OpenCV 4.x (NanoDet's; default), float32_fma = 5.0, "
                             "ipp_float32_fma = 5.1 x86-64 wheels, float32 = 5.x without FMA/IPP; "
                             "refghost.preprocess.kernel_for_opencv(cv2.__version__) names yours")


def _is_image(image) -> bool:
    """Whether the input is an image file (resized with the warp kernel), not a .npy array."""
    return isinstance(image, str)


def _load_input(image: str):
    """A .npy file is the network input as is; anything else is an image file path."""
    if image.endswith(".npy"):
        from .safe_io import read_npy
        from .weights import MAX_INPUT_PIXELS

        return read_npy(image, RefghostError, max_bytes=MAX_INPUT_PIXELS * 3 * 8)
    return image


def save_npz(path: str, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` atomically: a temporary file in the same folder, renamed."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _summary_line(name: str, a: np.ndarray) -> str:
    return (f"  {name:<40} {str(tuple(a.shape)):<20} {a.dtype!s:<8} min {a.min():+.4g}  max {a.max():+.4g}  "
            f"mean {a.mean():+.4g}")


#: Cold-compile times (empty NUMBA_CACHE_DIR) of what a run compiles, per dtype, measured on this
#: project's 2-vCPU machine, 2026-12-04: CPU time 31-43 s (engine) and 7 s (interpreter); wall time
#: 38 s and 9 s with a core free, 69-144 s and 20-22 s with other work on both cores.
COMPILE_TIMES = {"engine": "30-45 s with a free core, 1-2.5 min on a busy machine",
                 "interpreter": "about 10 s, 20 s on a busy machine"}


def _kernels_to_compile(intermediates: bool, impl: str, dtype: str) -> str | None:
    """Which compiled path this run needs and Numba's on-disk cache lacks for ``dtype`` ("engine",
    "interpreter"), or None: nothing to compile (or the cache state cannot be told). The engine
    (no intermediates) is one program, :func:`refghost.engine.run.run_program`; the fast
    interpreter compiles its depthwise convolution; "plain" compiles nothing. The interpreter's
    depthwise has four variants (serial or parallel, blocked or not), of which a run compiles only
    those its threads and shapes pick: the path counts as cached when any variant is, else a
    variant no run ever picks would announce a compile on every run."""
    from .kernels._jit import compiled_on_disk

    if impl == "plain":
        return None
    if not intermediates and impl in ("fast", "engine"):
        from .engine.run import run_program

        path, kernels = "engine", (run_program,)
    else:
        from .kernels import depthwise

        path, kernels = "interpreter", (depthwise.depthwise, depthwise.depthwise_parallel,
                                        depthwise.depthwise_blocked, depthwise.depthwise_blocked_parallel)
    return path if all(compiled_on_disk(k, dtype) is False for k in kernels) else None


def _announce_compile(path: str | None, dtype: str) -> None:
    if path is not None:
        print(f"compiling the {path}'s {dtype} kernels for this machine: {COMPILE_TIMES[path]}, this once (Numba "
              f"caches them)", file=sys.stderr, flush=True)


def _floats(values) -> str:
    """``[58.395, 57.12, 57.375]``: each value by the shortest repr of its float32 value, which is
    what normalisation uses (refghost.preprocess.normalize)."""
    return "[" + ", ".join(str(np.float32(v)) for v in values) + "]"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


#: From this many images on, `run` reports its progress reading them (stderr).
PROGRESS_FROM = 10


def _progress(label: str):
    """A ``progress(i, n)`` callback printing "label i/n" to stderr about every tenth item, and
    nothing for fewer than :data:`PROGRESS_FROM` items (see refghost.runner.prepare_input)."""
    def report(i, n):
        if n >= PROGRESS_FROM and (i == n or i % max(1, n // 10) == 0):
            print(f"  {label} {i}/{n}", file=sys.stderr, flush=True)
    return report


def _input_lines(items, weights) -> list[str]:
    """The ``input`` lines of `run`: each item, its size and what preparing it did."""
    from .runner import describe_image

    lines = []
    for i, item in enumerate(items):
        name = item if isinstance(item, str) else f"array {item.shape} {item.dtype}"
        size, notes = describe_image(item, weights.preprocessing.input_size)
        prefix = f"[{i}] " if len(items) > 1 else ""
        lines.append(f"{prefix}{name} ({size}; {'; '.join(notes)})")
    return lines


def cmd_run(args) -> int:
    from .runner import expand_images, run
    from .weights import is_detector, load_weights

    t0 = time.perf_counter()
    weights = load_weights(args.weights)
    given = [os.fspath(image) for image in (args.image or [str(SAMPLE_IMAGE)])]
    if len(given) > 1 and any(image.endswith(".npy") for image in given):
        raise RefghostError("a .npy input is the whole network input: give it alone, not with other images")
    items = expand_images(given)
    if len(items) == 1:
        items = [_load_input(items[0])]
    if is_detector(weights.config):
        return _run_detector(args, weights, items, t0)
    detector_only = [f"--{name.replace('_', '-')}" for name in DETECTOR_RUN_OPTIONS if getattr(args, name) is not None]
    if detector_only:
        raise RefghostError(f"{', '.join(detector_only)}: for a detector's weights; {args.weights} is a GhostNet "
                            f"backbone ({_plural(len(weights.graph.outputs), 'output')})")
    t1 = time.perf_counter()
    from .runner import prepare_input

    x = prepare_input(items if len(items) > 1 else items[0], weights, args.dtype, args.warp_kernel,
                      progress=_progress("read image"))
    t2 = time.perf_counter()
    compiles = _kernels_to_compile(args.intermediates, args.impl, args.dtype)
    _announce_compile(compiles, args.dtype)
    if len(items) >= PROGRESS_FROM:
        print(f"  running the network on {len(items)} images ...", file=sys.stderr, flush=True)
    out = run(x, weights, dtype=args.dtype, intermediates=args.intermediates, impl=args.impl)
    t3 = time.perf_counter()
    print(_weights_line(args.weights, weights))
    lines = _input_lines(items, weights)
    if len(items) > 1:
        print(f"input    {len(items)} images, one batch {tuple(x.shape)} in this order (row i of every output is "
              f"image [i]):")
        lines = [("         " + line) for line in lines]
        print("\n".join(lines))
    else:
        print(f"input    {lines[0]}")
    if any(not isinstance(item, np.ndarray) or item.dtype == np.uint8 for item in items):
        print(f"         resized with warp kernel {args.warp_kernel} (--warp-kernel)")
    outputs = weights.graph.outputs
    print(f"outputs  ({args.dtype}, {args.impl}; {_plural(len(outputs), 'output')}"
          f"{', ' + _plural(len(out) - len(outputs), 'intermediate') if args.intermediates else ''}; load "
          f"{1e3 * (t1 - t0):.0f} ms, preprocess {1e3 * (t2 - t1):.0f} ms, first forward {1e3 * (t3 - t2):.0f} ms "
          f"including {'compiling' if compiles else 'loading compiled'} kernels)")
    for name in outputs:
        print(_summary_line(name, out[name]))
    if args.intermediates:
        print(f"  ... and {_plural(len(out) - len(outputs), 'intermediate tensor')}")
    if args.out:
        save_npz(args.out, out)
        print(f"wrote    {args.out}")
    return 0


#: The options of `run` that only a detector has (argparse dests).
DETECTOR_RUN_OPTIONS = ("json", "draw", "score_threshold", "iou_threshold", "max_detections")


def _run_detector(args, weights, items: list, t0: float) -> int:
    """`run` with a whole detector's weights: the network, then its detections, printed and
    written (``--out``, ``--json``, ``--draw``)."""
    from .detector.draw import detection_records, draw_detections, write_json
    from .detector.run import NmsSettings, prepare_batch, run_detector

    if args.impl == "engine":
        raise RefghostError("--impl engine runs GhostNet backbones only; a detector runs on the interpreter")
    if args.draw and (len(items) != 1 or not isinstance(items[0], str)):
        raise RefghostError("--draw draws on one image file; give exactly one image")
    nms = NmsSettings(**{name: getattr(args, name) for name in ("score_threshold", "iou_threshold", "max_detections")
                         if getattr(args, name) is not None})
    t1 = time.perf_counter()
    batch = prepare_batch(items, weights, args.dtype, args.warp_kernel, progress=_progress("read image"))
    t2 = time.perf_counter()
    _announce_compile(_kernels_to_compile(True, "interpreter", args.dtype), args.dtype)
    out = run_detector(batch, weights, dtype=args.dtype, intermediates=args.intermediates,
                       impl="plain" if args.impl == "plain" else "kernels", nms=nms)
    t3 = time.perf_counter()
    print(_weights_line(args.weights, weights))
    lines = _input_lines(items, weights)
    print(f"input    {tuple(batch.x.shape)}{' (keep_ratio)' if weights.preprocessing.keep_ratio else ''}: "
          + ("\n         ".join([""] + lines) if len(lines) > 1 else lines[0]))
    records = detection_records(out, weights.class_names, weights.config.num_classes)
    print(f"network  output {tuple(out['output'].shape)} ({args.dtype}; load {1e3 * (t1 - t0):.0f} ms, preprocess "
          f"{1e3 * (t2 - t1):.0f} ms, network and post-processing {1e3 * (t3 - t2):.0f} ms)")
    print(f"detected {_plural(len(records), 'object')} (score > {nms.score_threshold:g}, NMS IoU "
          f"{nms.iou_threshold:g}, at most {nms.max_detections} per image; boxes [x1, y1, x2, y2] in image pixels):")
    for r in records:
        prefix = f"[{r['image']}] " if len(batch.original_sizes) > 1 else ""
        box = ", ".join(f"{v:7.1f}" for v in r["box"])
        print(f"  {prefix}{r['class']:<16} {r['score']:.3f}  [{box}]")
    for path, write in ((args.out, lambda p: save_npz(p, out)), (args.json, lambda p: write_json(p, records)),
                        (args.draw, lambda p: draw_detections(items[0], records, p))):
        if path:
            write(path)
            print(f"wrote    {path}")
    return 0


def cmd_convert(args) -> int:
    stages = None
    if args.out_stages is not None:
        try:
            stages = tuple(int(s) for s in args.out_stages.split(",") if s.strip())
        except ValueError:
            raise RefghostError(f"--out-stages must be comma-separated integers, got {args.out_stages!r}") from None
    stats = {}
    for name in ("mean", "std"):
        text = getattr(args, name)
        if text is not None:
            try:
                stats[name] = tuple(float(v) for v in text.split(","))
            except ValueError:
                raise RefghostError(f"--{name} must be three comma-separated numbers, got {text!r}") from None
    from .convert import convert_checkpoint
    from .weights import describe_config, is_detector

    if (args.config or args.arch == "detector") and any(
            v is not None for v in (args.width, args.activation, args.out_stages)):
        raise RefghostError("--width, --activation, --out-stages describe a GhostNet backbone; a detector's "
                            "architecture comes from --config or from the checkpoint's shapes")
    converted = convert_checkpoint(args.src, args.out, arch=args.arch, width=args.width, activation=args.activation,
                                   out_stages=stages, channel_order=args.channel_order, config_file=args.config,
                                   **stats)
    weights = converted.weights
    n_params = sum(a.size for a in weights.tensors.values())
    what = (describe_config(weights.config) if is_detector(weights.config)
            else f"{weights.config.arch}, width {weights.config.width:g}")
    print(f"wrote {args.out}: {what}, {len(weights.tensors)} tensors, {n_params:,} values")
    for note in converted.notes:
        print(f"  {note}")
    if is_detector(weights.config):
        pre = weights.preprocessing
        print(f"  preprocessing {pre.channel_order}, mean {_floats(pre.mean)}, std {_floats(pre.std)}, input size "
              f"{pre.input_size[0]}x{pre.input_size[1]}, keep_ratio {pre.keep_ratio}")
        return 0
    pre = weights.preprocessing
    given = {"channel_order": args.channel_order, **stats}
    assumed = [f"--{name.replace('_', '-')}" for name in ("channel_order", "mean", "std") if given.get(name) is None]
    print(f"  preprocessing {pre.channel_order}, mean {_floats(pre.mean)}, std {_floats(pre.std)}, input size "
          f"{pre.input_size[0]}x{pre.input_size[1]}")
    if assumed:
        print(f"  assumed, not read from {os.path.basename(args.src)}: {', '.join(a[2:] for a in assumed)} "
              f"({weights.config.arch}'s defaults); if the model was trained otherwise, convert again with "
              f"{' '.join(assumed)}")
    return 0


def _weights_line(path: str, weights) -> str:
    """``weights  PATH (arch, ...)`` and, for the shipped file, that it is the synthetic default."""
    from .weights import describe_config, is_detector

    cfg = weights.config
    what = describe_config(cfg) if is_detector(cfg) else f"{cfg.arch}, width {cfg.width:g}, {cfg.activation}"
    line = f"weights  {path} ({what}, sha256 {weights.sha256[:12]})"
    if os.path.abspath(path) == str(DEFAULT_WEIGHTS):
        line += "\n         the shipped synthetic weights: the default when --weights is not given"
    if "description" in weights.provenance:
        line += f"\n         {weights.provenance['description']}"
    return line


#: Command -> (the extensions its --out may have, what it writes); checked before any work.
OUT_FORMATS = {"run": ((".npz",), "outputs"), "dump": ((".npz",), "dumps"),
               "golden": ((".h5", ".hdf5"), "golden files"), "export": ((".npz", ".pth", ".pt"), "exported weights")}


def _check_out_format(path: str, extensions: tuple[str, ...], what: str) -> None:
    """Refuse an --out path with another extension (see :data:`OUT_FORMATS`)."""
    if not path.lower().endswith(extensions):
        raise RefghostError(f"--out {path}: {what} are written as {'/'.join(extensions)}; give a path ending in "
                            f"{' or '.join(extensions)}")


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def cmd_golden(args) -> int:
    from .verify.golden import golden_file_size, make_golden, write_golden
    from .runner import prepare_input
    from .weights import MAX_INPUT_PIXELS, is_detector, load_weights

    if args.images:
        return cmd_golden_set(args)
    weights = load_weights(args.weights)
    warp_kernel = None  # recorded only when the input is an image file
    batch = None  # a detector's input made from an image: how (refghost.detector.run.PreparedBatch)
    print(_weights_line(args.weights, weights))
    if args.seed is not None:
        w, h = weights.preprocessing.input_size
        if args.batch * w * h > MAX_INPUT_PIXELS:
            raise RefghostError(f"--batch {args.batch} of {w}x{h} inputs is {args.batch * w * h} pixels, more than "
                                f"{MAX_INPUT_PIXELS}")
        x = np.random.default_rng(args.seed).standard_normal((args.batch, 3, h, w)).astype(np.float32)
        source = f"seed {args.seed}: N(0, 1) of shape {x.shape}"
    else:
        image = args.input or str(SAMPLE_IMAGE)
        loaded = _load_input(image)
        if is_detector(weights.config):  # the matrix back to the image's pixels, for its detections
            from .detector.run import prepare_batch

            batch = prepare_batch([loaded], weights, np.float32, args.warp_kernel)
            x = batch.x
        else:
            x = prepare_input(loaded, weights, np.float32, args.warp_kernel)
        source = image
        if _is_image(loaded):
            warp_kernel = args.warp_kernel
    command = _command_line(args)
    n_tensors = len(weights.graph.outputs) + (len(weights.graph.nodes) if args.intermediates else 0)
    print(f"golden   {args.out}: the float64 oracle and bounds of {_plural(n_tensors, 'tensor')} for input "
          f"{tuple(x.shape)}, about {_megabytes(golden_file_size(weights, x.shape, args.intermediates))}",
          flush=True)
    _announce_compile(_kernels_to_compile(True, "interpreter", "float64"), "float64")
    t0 = time.perf_counter()
    print("  computing the oracle and its bounds, layer by layer ...", file=sys.stderr, flush=True)
    golden = make_golden(weights, x, intermediates=args.intermediates, input_source=source, command=command,
                         warp_kernel=warp_kernel, batch=batch)
    t1 = time.perf_counter()
    print(f"  computed in {t1 - t0:.1f} s; writing {args.out} ...", file=sys.stderr, flush=True)
    write_golden(args.out, golden)
    t2 = time.perf_counter()
    stored = _plural(len(golden.outputs), "output")
    if golden.intermediates:
        stored += ", " + _plural(len(golden.intermediates), "intermediate")
    print(f"wrote {args.out} ({_megabytes(os.path.getsize(args.out))} in {t2 - t1:.1f} s): input {x.shape} "
          f"({source}{f', warp kernel {warp_kernel}' if warp_kernel else ''}), {stored}")
    return 0


def _candidate(args, path: str):
    """The candidate model or dump of `compare` and the options it is run and judged with."""
    from .verify.judge import Candidate

    maps = {}
    for item in args.map:
        if "=" not in item:
            raise RefghostError(f"--map {item!r}: expected CANDIDATE_NAME=MODULE.PATH")
        key, value = item.split("=", 1)
        maps[key] = value
    return Candidate(path, runtime=args.runtime, precise=args.precise, options=_runtime_options(args),
                     threads=args.threads, optimization=args.ort_optimization, maps=maps, policy=args.policy,
                     atol=args.atol, rtol=args.rtol)


def cmd_compare(args) -> int:
    import json

    from .verify.compare import format_report
    from .verify.golden import read_golden
    from .verify.judge import judge

    if args.images or os.path.isdir(args.golden or ""):
        return cmd_compare_set(args)
    if args.candidate is None:
        raise RefghostError("give a golden file and a candidate (or --images DIR and a model file)")
    candidate = _candidate(args, args.candidate)
    golden = read_golden(args.golden)
    _announce_compile(_kernels_to_compile(True, "interpreter", "float64"), "float64")  # the isolated check
    judgement = judge(candidate, golden)
    report, tensors = judgement.report, judgement.tensors
    print(format_report(report, verbose=args.verbose))
    for stage in judgement.stages:
        print(f"stage     {stage.stage}: {stage.verdict.upper()}: {stage.message}")
    if judgement.stages and judgement.first_divergent != report.first_divergent:
        print(f"first divergent: {judgement.first_divergent}")
    if args.json:
        from dataclasses import asdict

        from .verify.compare import json_number

        document = report.to_json()
        if judgement.stages:
            document["stages"] = [{k: json_number(v) if isinstance(v, float) else v for k, v in asdict(s).items()}
                                  for s in judgement.stages]
            document["passed"], document["first_divergent"] = judgement.passed, judgement.first_divergent
        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump(document, f, indent=1, default=str)
    if args.html or args.plots:
        from .verify.report_html import write_html, write_plots
        if args.html:
            write_html(report, golden, tensors, args.html)
        if args.plots:
            write_plots(report, golden, tensors, args.plots)
    return 0 if judgement.passed else 1


def _run_set(args, job, items: list[str], what: str):
    """Run a set's tasks where --workers/--scheduler say, announcing it on stderr."""
    from .verify.dataset import default_workers, run_set

    where = f"the Dask cluster at {args.scheduler}" if args.scheduler else \
        f"{_plural(args.workers or default_workers(), 'local worker')}"
    print(f"  {what} {_plural(len(items), 'source')} on {where} ...", file=sys.stderr, flush=True)
    _announce_compile(_kernels_to_compile(True, "interpreter", "float64"), "float64")
    return run_set(job, items, workers=args.workers, scheduler=args.scheduler)


def cmd_compare_set(args) -> int:
    """`compare --images DIR MODEL` and `compare GOLDDIR/ MODEL`: one task per source."""
    import json

    from .verify.dataset import Job, format_report, sources, summarize

    model = args.golden if args.images else args.candidate
    if model is None or (args.images and args.candidate is not None):
        raise RefghostError("give one model file: `compare --images DIR MODEL` or `compare GOLDDIR/ MODEL`")
    if not os.path.isfile(model):
        raise RefghostError(f"{model}: no such model file")
    from .runtimes import runtime_for

    runtime_for(model, args.runtime)  # a model a runtime runs on each input, not arrays of one input
    candidate = _candidate(args, os.path.abspath(model))
    keep = os.path.abspath(args.keep_failing) if args.keep_failing else None
    if keep:
        os.makedirs(keep, exist_ok=True)
    if args.images:
        from .weights import load_weights

        folder, items = args.images, sources(args.images, "images")
        print(_weights_line(args.weights, load_weights(args.weights)))
        job = Job(weights=os.path.abspath(args.weights), warp_kernel=args.warp_kernel, candidate=candidate,
                  keep_failing=keep, command=_command_line(args))
    else:
        folder, items = args.golden, sources(args.golden, "goldens")
        job = Job(candidate=candidate, keep_failing=keep)
    results = _run_set(args, job, [os.path.abspath(item) for item in items], "judging")
    report = summarize(folder, model, results)
    print(format_report(report, verbose=args.verbose))
    if args.json:
        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump(report.to_json(), f, indent=1)
    if args.html:
        from .verify.report_html import write_dataset_html
        write_dataset_html(report, args.html)
    if args.plots:
        from .verify.report_html import write_dataset_plots
        write_dataset_plots(report, args.plots)
    return report.exit_status


def cmd_golden_set(args) -> int:
    """`golden --images DIR --out GOLDDIR/`: one golden file per image, NAME.h5 for NAME.png."""
    from .verify.dataset import Job, sources
    from .weights import load_weights

    items = sources(args.images, "images")
    print(_weights_line(args.weights, load_weights(args.weights)))
    os.makedirs(args.out, exist_ok=True)
    job = Job(weights=os.path.abspath(args.weights), warp_kernel=args.warp_kernel, golden_out=os.path.abspath(args.out),
              intermediates=args.intermediates, command=_command_line(args))
    results = _run_set(args, job, [os.path.abspath(item) for item in items], "writing the goldens of")
    failed = [r for r in results if r.status != "written"]
    print(f"wrote {len(results) - len(failed)} golden files to {args.out}"
          f"{' (with intermediates)' if args.intermediates else ''}")
    for r in failed:
        print(f"not written: {r.name} ({r.status}): {r.error}")
    return 2 if failed else 0


def _command_line(args) -> str:
    return "refghost " + " ".join(sys.argv[1:] if args.argv is None else args.argv)


def cmd_dump(args) -> int:
    from .verify.golden import read_golden
    from .runtimes import run_model

    if not os.path.isfile(args.model):
        raise RefghostError(f"{args.model}: no such model file")
    golden = read_golden(args.golden)
    run = run_model(args.model, golden, runtime=args.runtime, precise=args.precise,
                    options=_runtime_options(args), threads=args.threads)
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **run.tensors)
    p = run.precision
    print(f"wrote {args.out}: {len(run.tensors)} tensors from {run.describe()}; {run.mapping_summary()}; "
          f"precision arithmetic {p.arithmetic}, weights {p.weights}, activations {p.activations}")
    return 0


def cmd_map(args) -> int:
    import json

    from .runtimes import run_model

    if not os.path.isfile(args.model):
        raise RefghostError(f"{args.model}: no such model file")
    golden = _golden_for_map(args)
    try:
        run = run_model(args.model, golden, runtime=args.runtime, precise=args.precise,
                        options=_runtime_options(args), threads=args.threads)
    except RefghostError as exc:
        if args.golden or args.weights or args.model.lower().endswith(".onnx"):
            raise
        raise RefghostError(f"{exc} (the network was the shipped weights' {golden.weights.config.width}x; give "
                            f"--weights W.h5 of the network the model was made from)") from None
    if args.json:
        print(json.dumps(run.summary(), indent=1))
        return 0
    print(f"{run.describe()}")
    print(run.mapping_summary())
    width = max((len(k) for k in run.mapping), default=0)
    for tensor, (module, how) in run.mapping.items():
        print(f"  {tensor:<{width}}  {module:<44} {how}")
    return 0


def _golden_for_map(args):
    """The golden a map runs on: ``--golden``; else the network of ``--weights`` (an ``.onnx``
    model's own weights when not given, else the shipped weights) on a seeded input of the shape
    the model declares (or the weights' input size), outputs only."""
    from .runtimes import input_shape
    from .verify.golden import make_golden, read_golden
    from .weights import load_weights

    if args.golden:
        return read_golden(args.golden)
    onnx_weights = args.weights is None and args.model.lower().endswith(".onnx")
    if onnx_weights:
        from .convert.onnx_import import import_onnx

        weights = import_onnx(args.model)
    else:
        weights = load_weights(args.weights or str(DEFAULT_WEIGHTS))
    shape = input_shape(args.model, args.runtime)
    if shape is None:
        if onnx_weights:
            raise RefghostError(f"{args.model}: its input shape is not fixed; give --golden golden.h5")
        width, height = weights.preprocessing.input_size
        shape = (1, 3, height, width)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return make_golden(weights, x)


def cmd_info(args) -> int:
    import json

    from .info import describe, escaped

    if args.json:
        try:
            info = describe(args.file)
        except RefghostError as exc:  # tools get the verdict as JSON too
            print(json.dumps({"file": args.file, "valid": False, "error": str(exc)}, indent=1))
            return 2
        print(json.dumps(info, indent=1))
        return 0
    info = escaped(describe(args.file))  # text from the file, control characters escaped
    cfg = info["config"]
    print(f"{info['file']}: valid refghost {info['kind']} file")
    if "summary" in cfg:  # a whole detector
        print(f"  network       {cfg['summary']}")
    else:
        print(f"  network       {cfg['arch']}, width {cfg['width']:g}, activation {cfg['activation']}"
              f"{', out_stages ' + ','.join(map(str, cfg['out_stages'])) if cfg['out_stages'] else ''}"
              f"{', ' + str(cfg['num_classes']) + ' classes' if cfg['num_classes'] else ''}"
              f"{', BatchNorm folded' if cfg['folded'] else ''}")
    print(f"  parameters    {info['parameters']:,} ({info['tensors']} tensors, {info['values']:,} values)")
    pre = info["preprocessing"]
    print(f"  preprocessing {pre['channel_order']}, mean {_floats(pre['mean'])}, std {_floats(pre['std'])}, "
          f"input size {pre['input_size'][0]}x{pre['input_size'][1]}{', keep_ratio' if pre['keep_ratio'] else ''}")
    for key, value in info["provenance"].items():
        if value:
            print(f"  {key:<13} {value}")
    if info["kind"] == "golden":
        print(f"  input         {tuple(info['input_shape'])}; outputs {', '.join(info['outputs'])}; "
              f"{info['intermediates']} intermediates"
              f"{'; ' + _plural(info['detections'], 'detection') if 'detections' in info else ''}")
        for key in ("refghost_version", "weights_sha256", "input_source", "command"):
            print(f"  {key:<13} {info['attributes'].get(key, '')}")
    else:
        print(f"  sha256        {info['sha256']}")
    return 0


def cmd_export(args) -> int:
    from .weights import load_weights

    weights = load_weights(args.weights)
    if args.out.lower().endswith(".npz"):
        save_npz(args.out, weights.tensors)
    else:  # .pth or .pt (check_args)
        try:
            import torch
        except ImportError:
            raise RefghostError("writing .pth needs torch installed; write .npz instead") from None
        state_dict = {k: torch.from_numpy(np.array(v)) for k, v in weights.tensors.items()}
        with atomic_path(args.out) as tmp:
            torch.save(state_dict, tmp)
    print(f"wrote {args.out}: {len(weights.tensors)} tensors")
    return 0


# --- argument checks: all of them run before any command starts working ----------------------
def _at_least(name: str, value, low):
    if value is not None and value < low:
        raise RefghostError(f"{name} must be >= {low}, got {value}")


def _finite_non_negative(name: str, value):
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise RefghostError(f"{name} must be a finite number >= 0, got {value}")


def _check_folder(folder: str, what: str, probe: str) -> None:
    """Raise RefghostError unless files can be written in ``folder``, or it can be created there
    (it is made when the first file is written: a refused command leaves no empty folder)."""
    from .atomic import check_writable

    if os.path.isdir(folder):
        check_writable(os.path.join(folder, probe), what)
        return
    if os.path.exists(folder):
        raise RefghostError(f"{what} {folder}: exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise RefghostError(f"{what} {folder}: {parent} is not a folder")
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RefghostError(f"{what} {folder}: cannot create it in {parent} (not writable)")


def _check_detector_run_args(args) -> None:
    """`run`'s post-processing options in range, its --json/--draw writable (RefghostError)."""
    from .atomic import check_writable

    if args.score_threshold is not None and not 0 <= args.score_threshold < 1:
        raise RefghostError(f"--score-threshold must be in [0, 1) (scores are sigmoids), got {args.score_threshold}")
    if args.iou_threshold is not None and not 0 < args.iou_threshold <= 1:
        raise RefghostError(f"--iou-threshold must be in (0, 1], got {args.iou_threshold}")
    _at_least("--max-detections", args.max_detections, 1)
    for flag, path in (("--json", args.json), ("--draw", args.draw)):
        if path is not None:
            check_writable(path, flag)


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
    if command == "run":
        _check_detector_run_args(args)
    if command == "compare":
        _finite_non_negative("--atol", args.atol)
        _finite_non_negative("--rtol", args.rtol)
    if command in ("compare", "dump", "map"):  # the commands that run a runtime
        cpus = os.cpu_count() or 1
        if not 1 <= args.threads <= cpus:
            raise RefghostError(f"--threads must be in 1..{cpus} (this machine's CPUs), got {args.threads}")
    if command == "compare" and (args.html or args.plots):
        from .verify.report_html import require_matplotlib
        require_matplotlib()
        if args.html:
            check_writable(args.html, "--html")
        if args.plots:
            _check_folder(args.plots, "--plots", "ratios.png")
    if command in ("compare", "golden"):
        _at_least("--workers", args.workers, 1)
    if command == "compare" and args.keep_failing:
        _check_folder(args.keep_failing, "--keep-failing", "image.json")
    if command == "golden" and args.images:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise RefghostError(f"--out {args.out}: with --images, --out is the folder the goldens are written to")
        folder = args.out if os.path.isdir(args.out) else os.path.dirname(os.path.abspath(args.out))
        check_writable(os.path.join(folder, "golden.h5"), "--out")
        return
    output = args.json if command == "compare" else getattr(args, "out", None)
    if output is not None:
        check_writable(output, "--json" if command == "compare" else "--out")
    if command in OUT_FORMATS and args.out is not None:
        _check_out_format(args.out, *OUT_FORMATS[command])


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    commands = {"run": cmd_run, "convert": cmd_convert, "golden": cmd_golden, "compare": cmd_compare,
                "dump": cmd_dump, "map": cmd_map, "info": cmd_info, "export": cmd_export}
    try:
        check_args(args)
        return commands[args.command](args)
    except RefghostError as exc:
        print(f"refghost {args.command}: error: {exc}", file=sys.stderr)
        return 2
