"""Measure refghost against PyTorch, and how much of the derived error bounds they use.

    python tools/measure_errors.py            # needs torch; uses tests/torch_ghostnet.py

For each configuration (the ones tests/test_reference.py checks, at a larger input), prints:
* f64 rel: max |refghost f64 - torch f64| / max |torch f64| over the outputs;
* f32 abs: max |refghost f32 - torch f32| over the outputs, and the same relative to max |out|;
* isolated: largest fraction of its worst-case per-layer bound that torch's float32 layers use;
* accumulated: largest fraction of the probabilistic (8 sigma) bound used, by torch and refghost,
  over every layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
import torch_ghostnet as tg  # noqa: E402

import refghost  # noqa: E402
from refghost.arch import Config  # noqa: E402
from refghost.bounds import error_bounds  # noqa: E402
from refghost.weights import from_tensors  # noqa: E402

CONFIGS = [
    ("nanodet", 1.0, "ReLU", (4, 6, 9)),
    ("nanodet", 0.5, "LeakyReLU", (4, 6, 9)),
    ("nanodet", 0.75, "GELU", (4, 6, 9)),
    ("nanodet", 1.3, "HardSwish", (4, 6, 9)),
    ("nanodet", 1.0, "ReLU6", (4, 6, 9)),
    ("nanodet", 1.0, "SELU", (4, 6, 9)),
    ("nanodet", 1.0, "ELU", (4, 6, 9)),
    ("nanodet", 1.0, "PReLU", (4, 6, 9)),
    ("nanodet", 1.0, "SiLU", (4, 6, 9)),
    ("ghostnet", 1.0, "ReLU", ()),
]


def _fraction(err: np.ndarray, bound: np.ndarray) -> float:
    return float((err / np.maximum(bound, np.finfo(np.float64).tiny)).max())


def measure(arch, width, activation, stages, size=128, seed=7):
    num_classes = 1000 if arch == "ghostnet" else 0
    model = tg.randomize(tg.build(arch, width, activation, stages, num_classes=1000), seed=seed)
    config = Config(arch=arch, width=width, activation=activation, out_stages=stages or (4, 6, 9),
                    num_classes=num_classes)
    weights = from_tensors(tg.state_dict_numpy(model), config)
    x = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    torch_out, layers = tg.capture(model, x)
    layers = {k: v.numpy() for k, v in layers.items()}
    layers.update(tg.se_gates(layers))  # the SE gate is a function in PyTorch: no hook sees it
    names = list(weights.graph.outputs)
    torch_out = [torch_out] if isinstance(torch_out, torch.Tensor) else list(torch_out)
    ours32 = refghost.run(x, weights, intermediates=True)
    ours64 = refghost.run(x, weights, dtype="float64")
    with torch.no_grad():
        t64 = model.double()(torch.from_numpy(x.astype(np.float64)))
    t64 = [t64] if isinstance(t64, torch.Tensor) else list(t64)
    f64_rel = max(np.abs(ours64[n] - t.numpy()).max() / np.abs(t.numpy()).max() for n, t in zip(names, t64))
    f32_abs = max(np.abs(ours32[n] - t.numpy()).max() for n, t in zip(names, torch_out))
    f32_rel = max(np.abs(ours32[n] - t.numpy()).max() / np.abs(t.numpy()).max() for n, t in zip(names, torch_out))
    x64 = x.astype(np.float64)
    params = weights.params("float64")
    values, iso = error_bounds(weights.graph, params, x64, model="worst", isolated_from=layers)
    isolated = max(_fraction(np.abs(layers[k] - values[k]), iso[k]) for k in iso)
    values, acc = error_bounds(weights.graph, params, x64)
    acc_torch = max(_fraction(np.abs(layers[k] - values[k]), acc[k]) for k in acc)
    acc_ours = max(_fraction(np.abs(ours32[k] - values[k]), acc[k]) for k in acc)
    return f64_rel, f32_abs, f32_rel, isolated, acc_torch, acc_ours


def main() -> int:
    print(f"{'config':<32} {'f64 rel':>9} {'f32 abs':>9} {'f32 rel':>9} {'isolated':>9} "
          f"{'acc torch':>9} {'acc ours':>9}")
    for arch, width, act, stages in CONFIGS:
        row = measure(arch, width, act, stages)
        label = f"{arch} {width:g} {act}"
        print(f"{label:<32} " + " ".join(f"{v:9.2e}" if i < 3 else f"{v:9.3f}" for i, v in enumerate(row)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
