"""How much of the derived error bound an honest float32 backend uses, per op, over drawn cases.

    python tools/bound_usage.py                          # refghost's own float32, 200 cases per op
    python tools/bound_usage.py -n 1000 --backend torch  # PyTorch (CPU)
    python tools/bound_usage.py --backend onnxruntime --ops conv2d,conv_bn

For each op, draws N cases with refghost.testing.strategies (the same strategies as
tests/test_properties.py, derandomized, so a run is reproducible), computes the backend's float32
result, and records ``max over elements of |actual - reference| / bound`` for the case
(what refghost.testing.assert_matches_reference returns). Prints the quantiles of that fraction
over the cases, and the share of cases above 1%.

A bound that is never approached (max << 1%) would be vacuous: it could not tell a rounding error
from a wrong constant. A fraction above 1 would be a broken bound (or a dishonest backend).
The torch and onnxruntime backends reuse the single-op models of tests/test_properties.py.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from refghost.testing import assert_matches_reference  # noqa: E402

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def _backend(name):
    import test_properties as tp  # tests/test_properties.py: strategies and backends

    if name == "refghost":
        return tp.STRATEGIES, tp.refghost_result
    if name == "torch":
        return tp.STRATEGIES, tp.torch_result
    if name == "onnxruntime":
        return tp.STRATEGIES, tp.ort_result
    raise SystemExit(f"unknown backend {name!r}")


def measure(op, strategy, compute, n):
    fractions = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        with np.errstate(over="ignore", under="ignore"):
            fractions.append(assert_matches_reference(op, case, compute(op, case)))

    run()
    return np.array(fractions)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="cases per op (default 200)")
    parser.add_argument("--backend", default="refghost", choices=("refghost", "torch", "onnxruntime"))
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: all)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    strategies, compute = _backend(args.backend)
    ops = args.ops.split(",") if args.ops else list(strategies)
    head = " ".join(f"{'q' + format(q, '.2f').lstrip('0') if 0 < q < 1 else ('min' if q == 0 else 'max'):>9}"
                    for q in QUANTILES)
    print(f"backend {args.backend}, float32, {args.n} drawn cases per op; max |error|/bound per case\n")
    print(f"{'op':<18}{'cases':>6} {head} {'>1%':>6}")
    for op in ops:
        f = measure(op, strategies[op], compute, args.n)
        qs = " ".join(f"{v:9.2e}" for v in np.quantile(f, QUANTILES))
        print(f"{op:<18}{f.size:>6} {qs} {np.mean(f > 0.01):6.0%}")


if __name__ == "__main__":
    main()
