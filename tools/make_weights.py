"""Write refghost's shipped default weights: a synthetic (untrained) NanoDet GhostNet.

    python tools/make_weights.py                      # -> weights/ghostnet_nanodet_1.0x.h5
    python tools/make_weights.py --width 0.5 --out /tmp/w.h5 --seed 3

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

The output is a function of (seed, width, activation) only: run it twice and the bytes match.
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
from refghost.weights import NANODET_PREPROCESSING, from_tensors, save_weights

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "refghost" / "data" / "sample.png"
DEFAULT_OUT = REPO / "weights" / "ghostnet_nanodet_1.0x.h5"


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--activation", default="ReLU")
    args = parser.parse_args(argv)
    weights = make_weights(args.seed, args.width, args.activation)
    save_weights(args.out, weights)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
