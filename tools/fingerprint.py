"""Hashes of refghost's outputs, to show a restructuring kept every bit.

    python tools/fingerprint.py --out before.json            # on the old tree
    python tools/fingerprint.py --out after.json --against before.json   # exit 1 on any difference

Each case runs :func:`refghost.run` on the shipped weights with seeded inputs (``--seed``) and
hashes every returned array (dtype, shape and bytes, SHA-256): float32 and float64; batch 1 and 8;
320 and 416; the engine and the interpreter; the interpreter's intermediates at 320 (batch 1);
and the sample image through the preprocessing. Nothing here judges closeness: a case either has
the same bits or it does not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import refghost  # noqa: E402

WEIGHTS = ROOT / "weights" / "ghostnet_nanodet_1.0x.h5"
SAMPLE = ROOT / "refghost" / "data" / "sample.png"


def digest(outputs: dict) -> dict[str, str]:
    """``{name: sha256 of dtype, shape and bytes}`` for every returned array."""
    hashes = {}
    for name, array in outputs.items():
        a = np.ascontiguousarray(array)
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        hashes[name] = h.hexdigest()
    return hashes


def cases(seed: int):
    """Yield ``(case name, image, run keywords)``."""
    rng = np.random.default_rng(seed)
    for size in (320, 416):
        for batch in (1, 8):
            x = rng.standard_normal((batch, 3, size, size))
            for dtype in ("float32", "float64"):
                for impl in ("engine", "interpreter"):
                    yield f"{impl}-{dtype}-b{batch}-{size}", x, dict(dtype=dtype, impl=impl)
    x = rng.standard_normal((1, 3, 320, 320))
    for dtype in ("float32", "float64"):
        yield f"intermediates-{dtype}-b1-320", x, dict(dtype=dtype, intermediates=True)
    yield "sample-image-float32-engine", str(SAMPLE), dict(dtype="float32", impl="engine")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="write the hashes here (JSON)")
    parser.add_argument("--against", help="hashes of an earlier tree: exit 1 if any differs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    weights = refghost.load_weights(WEIGHTS)
    result = {}
    for name, image, kwargs in cases(args.seed):
        result[name] = digest(refghost.run(image, weights, **kwargs))
        print(f"{name}: {len(result[name])} arrays", file=sys.stderr)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    if args.against is None:
        return 0
    before = json.loads(Path(args.against).read_text())
    differing = [f"{case}/{name}" for case in sorted(set(before) | set(result))
                 for name in sorted(set(before.get(case, {})) | set(result.get(case, {})))
                 if before.get(case, {}).get(name) != result.get(case, {}).get(name)]
    total = sum(len(v) for v in result.values())
    if differing:
        print(f"{len(differing)} of {total} arrays differ: " + ", ".join(differing[:20]))
        return 1
    print(f"all {total} arrays bit-identical in {len(result)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
