"""The measuring scripts of tools/ still run against the engine they measure (small, fast cases:
what is checked is that they work and report every runtime, not the numbers)."""

import importlib.util
import re
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_ops_times_every_row_and_the_whole_program(capsys):
    _load("profile_ops").main(["--size", "64", "--batch", "2", "--repeat", "2"])
    text = capsys.readouterr().out
    rows = re.findall(r"row +\d+ +(\S.*?) +[\d.]+ us", text)
    assert len(rows) > 50 and {"stem", "gemm", "depthwise", "squeeze-excite", "output copy"} <= set(rows)
    assert re.search(r"sum of the rows alone [\d.]+ ms; whole program [\d.]+ ms", text)


def test_bench_compares_refghost_with_onnx_runtime_in_one_process(capsys, tmp_path):
    _load("bench").main(["--sizes", "64", "--batches", "1", "2", "--dtypes", "float32", "float64", "--rounds", "1",
                         "--block", "1", "--pause", "0", "--no-torch", "--no-onnx-reference", "--no-memory",
                         "--no-startup"])
    text = capsys.readouterr().out
    lines = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| 64 |")]
    seen = {(int(c[1]), c[2].strip(), c[3].strip()) for c in lines}
    assert seen == {(b, d, r) for b in (1, 2) for d, r in [("float32", "onnxruntime"), ("float32", "refghost"),
                                                            ("float64", "refghost")]}
    for cells in lines:  # refghost's outputs against ORT's: within the float32 scale of these outputs
        assert float(cells[8]) < 1e-2
