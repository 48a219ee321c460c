"""Make ghostnet_w05_64.tflite with a real converter (litert-torch): run once, in a throwaway venv.

    python -m venv /tmp/venv_litert
    /tmp/venv_litert/bin/pip install torch==2.13.0 litert-torch==0.10.0
    /tmp/venv_litert/bin/python tests/data/make_litert_tflite.py

The network is the test suite's small one (tests/test_runtimes.py: NanoDet's GhostNet, width 0.5,
ReLU, out_stages (4, 6, 9), ``torch_ghostnet.randomize(seed=0)``) converted at 1x3x64x64.
litert-torch is not in the test extra (it brings jax, transformers and a 290 MB converter: see
README.md beside this file); the suite only runs the file.
"""

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for torch_ghostnet

import litert_torch  # noqa: E402
import torch_ghostnet as tg  # noqa: E402

WIDTH, SIZE, SEED = 0.5, 64, 0
OUT = HERE / "ghostnet_w05_64.tflite"


def main() -> None:
    model = tg.randomize(tg.build("nanodet", WIDTH, "ReLU", (4, 6, 9)), SEED).eval()
    x = torch.from_numpy(np.random.default_rng(SEED).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32))
    edge = litert_torch.convert(model, (x,))
    edge.export(str(OUT))
    with torch.no_grad():
        expected = model(x)
    for got, want in zip(edge(x), expected):  # the converted model agrees with torch
        assert np.abs(got - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max(), "conversion changed values"
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
