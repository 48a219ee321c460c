"""Run `refghost compare` over the ONNX bank and print what it caught: the numbers for issue 3.

    python tools/bank_report.py            # needs torch, onnx, onnxruntime, onnxscript

For each entry of tests/onnx_bank.py (ReLU and LeakyReLU banks; ONNX Runtime with all and with
no graph optimizations, 1 and 2 threads for the honest ones): the verdict, the first divergent
layer and whether it is the right one; for honest entries the largest fraction of its bound any
tensor used (accumulated and isolated).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from onnx_bank import build_bank  # noqa: E402

from refghost.verify.candidates import load_candidate  # noqa: E402
from refghost.verify.compare import compare  # noqa: E402
from refghost.verify.golden import make_golden  # noqa: E402
from refghost.weights import from_tensors  # noqa: E402


def main() -> int:
    caught = localized = bugs = false_alarms = honest_runs = 0
    worst_acc = worst_iso = 0.0
    print(f"{'bank':<10} {'entry':<18} {'ort':<7} {'verdict':<5} {'first divergent':<40} {'right?':<6} "
          f"{'acc max':>8} {'iso max':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for activation in ("ReLU", "LeakyReLU"):
            bank = build_bank(Path(tmp) / activation, activation=activation)
            golden = make_golden(from_tensors(bank.state_dict_numpy(), bank.refghost_config()), bank.x,
                                 intermediates=True)
            for entry in bank.entries:
                settings = [("all", 1), ("none", 1), ("all", 2)] if entry.honest else [("all", 1)]
                for optimization, threads in settings:
                    loaded = load_candidate(entry.path, golden, threads=threads, optimization=optimization)
                    report = compare(golden, loaded.tensors, candidate_name=loaded.description, notes=loaded.notes)
                    acc = max(t.accumulated_ratio for t in report.tensors)
                    iso = max((t.isolated_ratio or 0.0) for t in report.tensors)
                    if entry.honest:
                        honest_runs += 1
                        false_alarms += not report.passed
                        worst_acc, worst_iso = max(worst_acc, acc), max(worst_iso, iso)
                        right = ""
                    else:
                        bugs += 1
                        caught += not report.passed
                        localized += entry.blames(report.first_divergent or "")
                        right = "yes" if entry.blames(report.first_divergent or "") else "NO"
                    print(f"{activation:<10} {entry.name:<18} {optimization}/{threads:<4} "
                          f"{'PASS' if report.passed else 'FAIL':<5} {str(report.first_divergent):<40} {right:<6} "
                          f"{acc:8.3g} {iso:8.3g}")
    print(f"\nbugs: {bugs}, caught {caught}, localized {localized}; honest runs: {honest_runs}, "
          f"false alarms {false_alarms}; worst honest error / bound: accumulated {worst_acc:.3f}, "
          f"isolated {worst_iso:.4f}")
    return 0 if caught == localized == bugs and false_alarms == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
