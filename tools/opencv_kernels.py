"""Which warp_resize kernel reproduces which OpenCV, measured against real OpenCV wheels.

OpenCV wheels cannot share one process (each is ``import cv2``), so every wheel is measured in a
child process; the wheels are unpacked once into folders of their own::

    pip install --no-deps --target /tmp/cv_5.1.0.95 opencv-python-headless==5.1.0.95

Commands
--------
``table DIR [DIR ...]``
    For every wheel (and, for 5.x, with ``cv2.setUseOptimized(False)`` and with
    ``cv2.ipp.setUseIPP(False)``), which kernel is bit-exact on every case of :data:`CASES`
    and on the three reference images (``refghost/data/sample.png`` resized to 320x320 and
    416x416, and a seeded random 640x480 image resized to 320x320), and how far every other
    kernel is on those three images (max abs difference in 8-bit levels, fraction of values that
    differ). Prints a Markdown table; configurations with identical results share a row.
``edges DIR``
    The one input family where ``ipp_float32_fma`` is not bit-exact to OpenCV 5.1: upscales
    whose exact source coordinate is a whole number along one axis for pixels at or past the
    last source row or column (:func:`whole_coordinate_pixels`), where IPP's choice between its
    inner and border code was not reproduced. Sweeps such sizes on random images, reports how
    many differ and by how much, and counts differences outside those pixels (expected: 0).
``hashes DIR [DIR ...] [--write PATH]``
    sha256[:20] of ``cv2.warpPerspective`` on :data:`CASES` (deterministic :func:`pattern_image`
    inputs) and on the sample image, for every configuration of every wheel, as JSON: the
    test-suite checks each kernel against these real-OpenCV outputs without that OpenCV
    installed (``tests/opencv_warp_hashes.json``).

    python tools/opencv_kernels.py table /tmp/cv_4.10.0.84 /tmp/cv_4.14.0.94 /tmp/cv_5.1.0.95
    python tools/opencv_kernels.py hashes /tmp/cv_4.14.0.94 /tmp/cv_5.0.0.93 /tmp/cv_5.1.0.95 \\
        --write tests/opencv_warp_hashes.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "refghost" / "data" / "sample.png"

# (src_w, src_h, dst_w, dst_h): upscales, downscales, non-integer ratios, 1-pixel images, odd
# sizes, wide destination tiles, coordinates on exact 1/64 ties, NanoDet's photo sizes.
CASES = [
    (1, 1, 3, 2), (3, 2, 1, 1), (1, 7, 9, 1), (2, 2, 3, 3), (3, 3, 2, 2), (8, 6, 4, 3),
    (7, 5, 320, 320), (7, 9, 320, 192), (13, 11, 128, 192), (13, 11, 128, 384), (17, 9, 640, 33),
    (31, 29, 37, 41), (64, 48, 320, 320), (97, 61, 50, 70), (100, 75, 416, 416), (321, 17, 640, 48),
    (333, 250, 320, 320), (640, 480, 320, 320), (480, 640, 416, 416), (1280, 720, 320, 320),
    (17, 101, 1280, 96), (250, 251, 249, 252), (5, 640, 416, 7), (1000, 3, 97, 5),
]
SAMPLE_SIZES = [(320, 320), (416, 416), (224, 224)]
RANDOM_SEED = 0  # the 640x480 random image of the table


def pattern_image(h: int, w: int) -> np.ndarray:
    """Deterministic pseudo-random uint8 (h, w, 3) image from integer arithmetic (no RNG streams)."""
    i, j, c = np.indices((h, w, 3), dtype=np.uint64)
    v = i * np.uint64(7919) + j * np.uint64(104729) + c * np.uint64(31337) + np.uint64(h * 131 + w * 137)
    v = (v * np.uint64(2654435761)) % np.uint64(2**32)
    return ((v >> np.uint64(13)) & np.uint64(255)).astype(np.uint8)


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:20]


def case_key(case) -> str:
    return "x".join(str(v) for v in case[:2]) + "->" + "x".join(str(v) for v in case[2:])


def reference_images() -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """The table's three images: name -> (source image, destination size)."""
    from refghost.preprocess import read_image

    sample = read_image(SAMPLE, "BGR")
    return {
        "sample.png 320x320": (sample, (320, 320)),
        "sample.png 416x416": (sample, (416, 416)),
        "random 640x480 -> 320x320": (random_image(480, 640, RANDOM_SEED), (320, 320)),
    }


# ---------------------------------------------------------------------------------------------
# child process: one wheel
# ---------------------------------------------------------------------------------------------


def _configurations(cv2):
    """(name, setter) pairs of the configurations measured for this wheel."""
    def default():
        cv2.setUseOptimized(True)
        cv2.ipp.setUseIPP(True)

    configs = [("default", default)]
    if int(cv2.__version__.split(".")[0]) >= 5:
        def no_opt():
            cv2.setUseOptimized(False)

        def no_ipp():
            cv2.setUseOptimized(True)
            cv2.ipp.setUseIPP(False)

        configs += [("setUseOptimized(False)", no_opt), ("setUseIPP(False)", no_ipp)]
    return configs


def _warp(cv2, img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.warpPerspective(img, np.diag([size[0] / w, size[1] / h, 1.0]), dsize=size)


def measure_child(opencv_dir: str) -> dict:
    """Run inside the child: measure every configuration of the wheel in ``opencv_dir``."""
    sys.path.insert(0, opencv_dir)
    import cv2

    from refghost.preprocess import WARP_KERNELS, read_image, warp_resize

    sample = read_image(SAMPLE, "BGR")
    images = reference_images()
    result = {"version": cv2.__version__, "dir": os.path.abspath(opencv_dir), "configs": []}
    for name, setter in _configurations(cv2):
        setter()
        entry = {"name": name, "use_optimized": bool(cv2.useOptimized()), "use_ipp": bool(cv2.ipp.useIPP()),
                 "hashes": {}, "exact_on_cases": {}, "images": {}}
        outputs = {}
        for case in CASES:
            out = _warp(cv2, pattern_image(case[1], case[0]), case[2:])
            outputs[case_key(case)] = (pattern_image(case[1], case[0]), case[2:], out)
            entry["hashes"][case_key(case)] = digest(out)
        for size in SAMPLE_SIZES:
            out = _warp(cv2, sample, size)
            outputs[f"sample->{size[0]}x{size[1]}"] = (sample, size, out)
            entry["hashes"][f"sample->{size[0]}x{size[1]}"] = digest(out)
        for kernel in WARP_KERNELS:
            entry["exact_on_cases"][kernel] = all(
                np.array_equal(warp_resize(src, size, warp_kernel=kernel), ref) for src, size, ref in outputs.values())
        for label, (src, size) in images.items():
            ref = _warp(cv2, src, size).astype(np.int16)
            row = {}
            for kernel in WARP_KERNELS:
                diff = np.abs(warp_resize(src, size, warp_kernel=kernel).astype(np.int16) - ref)
                row[kernel] = [int(diff.max()), float((diff > 0).mean())]
            entry["images"][label] = row
        result["configs"].append(entry)
    return result


#: (src_w, src_h, dst_w, dst_h) of the edges sweep: upscales whose source coordinates are whole
#: numbers on some destination rows or columns (a row or column landing exactly on the last
#: source row or column, or on any source pixel next to the bottom/right border band)
EDGE_CASES = ([(7, h, 320, h) for h in range(2, 70)] + [(7, h, 320, 2 * h) for h in range(2, 40)]
              + [(w, 7, w * k, 320) for w in range(2, 40) for k in (1, 2, 5) if w * k <= 640]
              + [(10, 8, 25, 20), (8, 10, 20, 25), (6, 4, 15, 10), (64, 48, 320, 240), (160, 120, 320, 320)])


def whole_coordinate_pixels(src_w: int, src_h: int, dst_w: int, dst_h: int) -> np.ndarray:
    """(dst_h, dst_w) mask of the only pixels where ipp_float32_fma may differ from OpenCV 5.1:
    the exact source coordinate is a whole number along one axis, and the pixel lies at or past
    the last source row or column (y*H/dst_h >= H-1 or x*W/dst_w >= W-1)."""
    x = np.arange(dst_w)
    y = np.arange(dst_h)
    x_whole = (x * src_w) % dst_w == 0
    y_whole = (y * src_h) % dst_h == 0
    x_edge = x * src_w >= (src_w - 1) * dst_w
    y_edge = y * src_h >= (src_h - 1) * dst_h
    return ((x_whole[None, :] | y_whole[:, None]) & (x_edge[None, :] | y_edge[:, None]))


def edges_child(opencv_dir: str, seeds: int = 3) -> dict:
    sys.path.insert(0, opencv_dir)
    import cv2

    from refghost.preprocess import kernel_for_opencv, warp_resize

    kernel = kernel_for_opencv(cv2.__version__, ipp=cv2.ipp.useIPP())
    n_images = n_differ = n_values = n_off_line = 0
    worst = 0
    for case in EDGE_CASES:
        allowed = whole_coordinate_pixels(*case)
        for seed in range(seeds):
            img = random_image(case[1], case[0], seed)
            ref = _warp(cv2, img, case[2:]).astype(np.int16)
            diff = np.abs(warp_resize(img, case[2:], warp_kernel=kernel).astype(np.int16) - ref)
            n_images += 1
            if diff.any():
                n_differ += 1
                n_values += int((diff > 0).sum())
                worst = max(worst, int(diff.max()))
                n_off_line += int(((diff > 0).any(axis=2) & ~allowed).sum())
    return {"version": cv2.__version__, "kernel": kernel, "images": n_images, "images_differing": n_differ,
            "values_differing": n_values, "max_diff": worst, "differing_pixels_elsewhere": n_off_line}


def measure(opencv_dir: str, child: str = "_child") -> dict:
    """Measure the wheel in ``opencv_dir`` in a fresh process (one cv2 per process)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, child, opencv_dir], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"measuring {opencv_dir} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------


def _fmt(cell) -> str:
    max_diff, frac = cell
    return "0" if max_diff == 0 else f"{max_diff} / {100 * frac:.3g} %"


def table(results: list[dict]) -> str:
    from refghost.preprocess import WARP_KERNELS

    labels = list(reference_images())
    rows: dict[str, list[str]] = {}
    for res in results:
        for cfg in res["configs"]:
            exact = [k for k in WARP_KERNELS if cfg["exact_on_cases"][k] and
                     all(cfg["images"][lab][k][0] == 0 for lab in labels)]
            cells = [", ".join(exact) or "none"]
            for kernel in WARP_KERNELS:
                if kernel in exact:
                    cells.append("exact")
                else:
                    cell = "; ".join(_fmt(cfg["images"][lab][kernel]) for lab in labels)
                    if all(cfg["images"][lab][kernel][0] == 0 for lab in labels):
                        cell += " (differs on other cases)"
                    cells.append(cell)
            key = " | ".join(cells)
            name = res["version"] + ("" if cfg["name"] == "default" else f" {cfg['name']}")
            rows.setdefault(key, []).append(name)
    head = ["OpenCV", "bit-exact kernel"] + [f"`{k}`" for k in WARP_KERNELS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, names in rows.items():
        lines.append(f"| {', '.join(names)} | {key} |")
    lines.append("")
    lines.append("Cells: max abs difference / fraction of values that differ, on " + "; ".join(labels)
                 + f". Exact means max difference 0 on all of these and on {len(CASES) + len(SAMPLE_SIZES)} "
                 "further cases (tools/opencv_kernels.py CASES).")
    return "\n".join(lines)


def hashes(results: list[dict]) -> dict:
    out = {"generated_by": "python tools/opencv_kernels.py hashes DIR ... --write tests/opencv_warp_hashes.json",
           "inputs": "WxH->wxh: pattern_image(H, W) warped to (w, h); sample->wxh: refghost/data/sample.png (BGR)",
           "opencv": []}
    for res in results:
        for cfg in res["configs"]:
            out["opencv"].append({"version": res["version"], "config": cfg["name"],
                                  "use_optimized": cfg["use_optimized"], "use_ipp": cfg["use_ipp"],
                                  "hashes": cfg["hashes"]})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="Markdown table: which kernel reproduces which OpenCV, and how far the others are")
    t.add_argument("dirs", nargs="+", help="folders holding an unpacked opencv-python-headless wheel")
    h = sub.add_parser("hashes", help="hashes of real OpenCV outputs, as JSON")
    h.add_argument("dirs", nargs="+")
    h.add_argument("--write", help="write the JSON to this file instead of printing it")
    e = sub.add_parser("edges", help="the integer-upscale rows/columns where ipp_float32_fma is not exact")
    e.add_argument("dir")
    for name in ("_child", "_edges"):
        sub.add_parser(name).add_argument("dir")
    args = parser.parse_args(argv)
    if args.command in ("_child", "_edges"):
        print(json.dumps((measure_child if args.command == "_child" else edges_child)(args.dir)))
        return 0
    if args.command == "edges":
        r = measure(args.dir, "_edges")
        print(f"OpenCV {r['version']}, kernel {r['kernel']}: {r['images_differing']} of {r['images']} "
              f"integer-upscale images differ, {r['values_differing']} values in all, max difference "
              f"{r['max_diff']}; differing pixels outside whole_coordinate_pixels(): "
              f"{r['differing_pixels_elsewhere']}")
        return 0
    results = [measure(d) for d in args.dirs]
    if args.command == "table":
        print(table(results))
    else:
        text = json.dumps(hashes(results), indent=1) + "\n"
        if args.write:
            Path(args.write).write_text(text)
            print(f"wrote {args.write}")
        else:
            print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
