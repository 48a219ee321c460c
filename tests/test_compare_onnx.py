"""`refghost compare` on the ONNX bank (tests/onnx_bank.py): every honest export passes, every
graph-edited bug is caught (exit 1) and blamed on the layer where it starts."""

import json

import numpy as np
import onnx
import pytest
from onnx_bank import build_bank

from refghost.verify.candidates import load_candidate
from refghost.cli import main
from refghost.verify.compare import compare
from refghost.verify.golden import make_golden, read_golden, write_golden
from refghost.weights import from_tensors


@pytest.fixture(scope="module", params=["ReLU", "LeakyReLU"])
def bank(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"bank_{request.param}")
    bank = build_bank(folder, activation=request.param)
    weights = from_tensors(bank.state_dict_numpy(), bank.refghost_config())
    write_golden(folder / "golden.h5", make_golden(weights, bank.x, intermediates=True))
    return bank, folder / "golden.h5"


def _compare(golden_path, path, **kw):
    golden = read_golden(golden_path)
    loaded = load_candidate(path, golden, **kw)
    return compare(golden, loaded.tensors, candidate_name=loaded.description, notes=loaded.notes,
                   runtime=loaded.run.summary() if loaded.run else None)


@pytest.mark.parametrize("optimization, threads", [("all", 1), ("none", 1), ("all", 2)])
def test_honest_exports_pass(bank, optimization, threads):
    bank, golden = bank
    assert len(bank.honest) >= 4
    for entry in bank.honest:
        report = _compare(golden, entry.path, optimization=optimization, threads=threads)
        bad = [(t.name, t.accumulated_ratio, t.isolated_ratio) for t in report.tensors if t.status != "ok"]
        assert report.passed, (entry.name, bad[:3])
        assert len(report.tensors) > 150, entry.name  # the intermediates were mapped and compared
        mapped = "by structure" if entry.name in ("ts_nonames", "ts_anonymous") else "by exporter scope names"
        hows = {m["how"] for m in report.runtime["mapping"].values()}
        assert len(hows) == 1 and hows.pop().startswith(mapped), entry.name


def test_pytorch_outputs_pass(bank, tmp_path):
    bank, golden = bank
    np.savez(tmp_path / "torch.npz", **bank.torch_outputs())
    assert main(["compare", str(golden), str(tmp_path / "torch.npz")]) == 0


def test_every_bug_is_caught_and_localized(bank, tmp_path):
    bank, golden = bank
    assert len(bank.bugs) >= 7
    for entry in bank.bugs:
        out = tmp_path / f"{entry.name}.json"
        assert main(["compare", str(golden), str(entry.path), "--json", str(out)]) == 1, entry.name
        report = json.loads(out.read_text())
        assert entry.blames(report["first_divergent"]), (entry.name, report["first_divergent"],
                                                          entry.expected_first)
        first = next(t for t in report["tensors"] if t["name"] == report["first_divergent"])
        assert first["isolated_ratio"] is not None and float(first["isolated_ratio"]) > 1, entry.name  # "inf" in JSON


def test_input_shape_that_does_not_fit(bank, tmp_path, capsys):
    bank, golden = bank
    model = onnx.load(bank["ts_folded"].path)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 96
    onnx.save(model, tmp_path / "wrong.onnx")
    assert main(["compare", str(golden), str(tmp_path / "wrong.onnx")]) == 2
    assert "the golden input is [1, 3, 64, 64]" in capsys.readouterr().err


def test_not_an_onnx_file(bank, tmp_path, capsys):
    _, golden = bank
    (tmp_path / "bad.onnx").write_bytes(b"\x00\x01garbage")
    assert main(["compare", str(golden), str(tmp_path / "bad.onnx")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
