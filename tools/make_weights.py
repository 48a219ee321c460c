"""Write refghost's shipped default weights: a synthetic (untrained) NanoDet GhostNet, and a
synthetic whole NanoDet-Plus-m detector.

    python tools/make_weights.py                      # -> weights/ghostnet_nanodet_1.0x.h5
    python tools/make_weights.py --width 0.5 --out /tmp/w.h5 --seed 3
    python tools/make_weights.py --detector nanodet-plus-m_320   # -> weights/nanodet-plus-m_320.h5

These are NOT trained weights. They exist so that refghost runs, and can be checked, with no
download. They are made to behave like a trained network numerically:

1. every tensor is drawn from ``np.random.default_rng(seed)`` in state_dict order: conv weights
   N(0, 1/fan_in) (so a conv roughly keeps the scale of its input), SE biases N(0, 0.5) so that
   the hard-sigmoid gates spread over (0, 1), BN gamma U(0.5, 1.5) and beta N(0, 0.2);
2. each BatchNorm's running mean and variance are then calibrated, in forward order, to the
   float64 statistics of that BN's input over a batch of calibration images (the shipped
   sample image, its mirror image and crops of it), exactly as a trained BN's running
   statistics estimate its input's statistics. Every BN output then has per-channel mean
   ``beta`` and standard deviation ``gamma``, so activations stay O(1) through all 10 stages.

A detector (``--detector PRESET``, a name of :data:`refghost.detector.spec.PRESETS`; square input
of the name's ``_320``/``_416`` suffix, else ``--size``) is made the same way, then one more step:

3. the class biases of the head's 1x1 convs (``head.gfl_cls.<level>.bias[:num_classes]``) are
   set to one common value that puts the sample image's :data:`DETECTOR_SCORES_PASSING`-th
   highest class score exactly :data:`DETECTOR_SCORE_MARGIN` (in logits) above NanoDet's score
   threshold 0.05: at least that many (prior, class) scores pass it, a handful of boxes survive
   NMS, and every post-processing stage has work to do. Class names are COCO's.

The output is a function of (seed, width, activation) (or (seed, preset)) only: run it twice and
the bytes match.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from refghost import __version__
from refghost.arch import Config, build_graph
from refghost.forward import evaluate
from refghost.threads import single_threaded_blas
from refghost.preprocess import prepare_image, read_image
from refghost.weights import NANODET_PREPROCESSING, Preprocessing, from_tensors, save_weights

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "refghost" / "data" / "sample.png"
DEFAULT_OUT = REPO / "weights" / "ghostnet_nanodet_1.0x.h5"
#: How many (prior, class) scores of the sample image at least pass the score threshold (step 3).
DETECTOR_SCORES_PASSING = 8
#: How far above the threshold's logit the DETECTOR_SCORES_PASSING-th class logit is put.
DETECTOR_SCORE_MARGIN = 0.25


def draw_tensors(graph, rng) -> dict[str, np.ndarray]:
    """Random float64 tensors for every key of ``graph`` (BN running stats placeholder 0/1)."""
    tensors = {}
    for key, shape in graph.param_shapes.items():
        node_name, role = key.rsplit(".", 1)
        op = graph.node(node_name).op
        if op in ("conv", "linear") and role == "weight":
            fan_in = int(np.prod(shape[1:]))
            tensors[key] = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        elif op in ("conv", "linear") and role == "bias":
            tensors[key] = rng.normal(0.0, 0.5, shape)
        elif op == "batch_norm" and role == "weight":
            tensors[key] = rng.uniform(0.5, 1.5, shape)
        elif op == "batch_norm" and role == "bias":
            tensors[key] = rng.normal(0.0, 0.2, shape)
        elif role == "running_mean":
            tensors[key] = np.zeros(shape)
        elif role == "running_var":
            tensors[key] = np.ones(shape)
        elif op == "act" and role == "weight":  # PReLU slope
            tensors[key] = rng.uniform(0.1, 0.4, shape)
        else:
            raise AssertionError(f"no init rule for {key}")
    return tensors


def calibration_batch(size: tuple[int, int]) -> np.ndarray:
    """(4, 3, h, w) float64: the sample image, its mirror image and two crops, preprocessed."""
    pre = NANODET_PREPROCESSING
    img = read_image(SAMPLE, pre.channel_order)  # (H, W, 3) uint8
    h, w = img.shape[:2]
    views = [img, img[:, ::-1], img[: h * 2 // 3, : w * 2 // 3], img[h // 3:, w // 3:]]
    batch = [prepare_image(np.ascontiguousarray(v), mean=pre.mean, std=pre.std, channel_order=pre.channel_order,
                           input_size=size) for v in views]
    return np.concatenate(batch).astype(np.float64)


def calibrate(graph, tensors: dict, x: np.ndarray) -> None:
    """Set every BN's running mean/var to its input's statistics, layer by layer (in place)."""
    values = {"input": x}
    for node in graph.nodes:
        inputs = [values[src] for src in node.inputs]
        if node.op == "batch_norm":
            tensors[node.params["running_mean"]] = inputs[0].mean(axis=(0, 2, 3))
            tensors[node.params["running_var"]] = inputs[0].var(axis=(0, 2, 3))
        values[node.name] = evaluate(node, inputs, tensors)


def make_weights(seed: int = 0, width: float = 1.0, activation: str = "ReLU"):
    config = Config(arch="nanodet", width=width, activation=activation)
    graph = build_graph(config)
    tensors = draw_tensors(graph, np.random.default_rng(seed))
    with single_threaded_blas():
        calibrate(graph, tensors, calibration_batch(NANODET_PREPROCESSING.input_size))
    provenance = {"source_file": "", "source_sha256": "",
                  "converter": f"refghost {__version__} tools/make_weights.py --seed {seed} --width {width:g} "
                               f"--activation {activation}",
                  "description": "SYNTHETIC, UNTRAINED weights: seeded random init, BatchNorm statistics "
                                 "calibrated on the sample image. Not for detection."}
    return from_tensors({k: v.astype(np.float32) for k, v in tensors.items()}, config,
                        NANODET_PREPROCESSING, provenance)


def detector_input_size(preset: str, size: int) -> tuple[int, int]:
    """The square input of a preset whose name ends in ``_<size>``, else ``size``."""
    tail = preset.rsplit("_", 1)[-1]
    side = int(tail) if tail.isdigit() else size
    return side, side


def set_class_bias(graph, tensors: dict, x: np.ndarray, config) -> None:
    """Step 3 of the module docstring, on the float64 sample image ``x`` (1, 3, H, W) (in place)."""
    from refghost.detector.decode import DEFAULT_SCORE_THRESHOLD
    from refghost.detector.graph import OUTPUT
    from refghost.forward import execute

    c = config.num_classes
    keys = [key for key in graph.param_shapes if key.startswith("head.gfl_cls.") and key.endswith(".bias")]
    for key in keys:
        tensors[key][:c] = 0.0
    with single_threaded_blas():
        out = execute(graph, tensors, x)[OUTPUT]  # class part sigmoided, bias 0
    logits = np.log(out[0, :, :c]) - np.log1p(-out[0, :, :c])
    kth = np.sort(logits, axis=None)[-DETECTOR_SCORES_PASSING]
    threshold_logit = np.log(DEFAULT_SCORE_THRESHOLD / (1 - DEFAULT_SCORE_THRESHOLD))
    for key in keys:
        tensors[key][:c] = threshold_logit + DETECTOR_SCORE_MARGIN - kth


def make_detector_weights(preset: str, seed: int = 0, size: int = 320):
    """Synthetic weights of the detector ``preset`` (the module docstring's steps 1-3)."""
    from refghost.detector.classes import COCO_CLASSES
    from refghost.detector.graph import build_detector_graph
    from refghost.detector.spec import PRESETS

    config = PRESETS[preset]
    graph = build_detector_graph(config)
    input_size = detector_input_size(preset, size)
    tensors = draw_tensors(graph, np.random.default_rng(seed))
    batch = calibration_batch(input_size)
    with single_threaded_blas():
        calibrate(graph, tensors, batch)
    set_class_bias(graph, tensors, batch[:1], config)
    pre = NANODET_PREPROCESSING
    provenance = {"source_file": "", "source_sha256": "",
                  "converter": f"refghost {__version__} tools/make_weights.py --detector {preset} --seed {seed}",
                  "description": "SYNTHETIC, UNTRAINED weights of a whole NanoDet detector: seeded random init, "
                                 "BatchNorm statistics and class biases calibrated on the sample image. Detects "
                                 "nothing real."}
    return from_tensors({k: v.astype(np.float32) for k, v in tensors.items()}, config,
                        Preprocessing(pre.mean, pre.std, pre.channel_order, input_size), provenance,
                        class_names=COCO_CLASSES if config.num_classes == len(COCO_CLASSES) else ())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--activation", default="ReLU")
    parser.add_argument("--detector", metavar="PRESET", help="a whole detector: a name of refghost.detector.spec.PRESETS")
    parser.add_argument("--size", type=int, default=320, help="the detector's input side when the name has none")
    args = parser.parse_args(argv)
    if args.detector:
        weights = make_detector_weights(args.detector, args.seed, args.size)
        out = REPO / "weights" / f"{args.detector}.h5" if args.out == DEFAULT_OUT else args.out
    else:
        weights, out = make_weights(args.seed, args.width, args.activation), args.out
    save_weights(out, weights)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
