"""The command line, through ``main(argv)``: what it prints, writes and returns."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_ghostnet as tg

from refghost.cli import DEFAULT_WEIGHTS, SAMPLE_IMAGE, main


def test_run_with_no_arguments_uses_shipped_weights_and_image(capsys):
    assert DEFAULT_WEIGHTS.is_file() and SAMPLE_IMAGE.is_file()
    assert main(["run"]) == 0
    out = capsys.readouterr().out
    assert "ghostnet_nanodet_1.0x.h5" in out and "sample.png" in out and "SYNTHETIC" in out
    for line in ("blocks.4 ", "(1, 40, 40, 40)", "blocks.6 ", "(1, 112, 20, 20)", "blocks.9 ", "(1, 960, 10, 10)"):
        assert line in out


@pytest.mark.parametrize("on_disk", [True, False, None])
@pytest.mark.parametrize("argv, announced", [
    ([], "the engine's float32 kernels"),
    (["--dtype", "float64"], "the engine's float64 kernels"),
    (["--intermediates"], "the interpreter's float32 kernels"),
    (["--intermediates", "--dtype", "float64"], "the interpreter's float64 kernels"),
])
def test_run_says_when_it_compiles_the_kernels(monkeypatch, capsys, on_disk, argv, announced):
    """A run whose kernels are not in Numba's on-disk cache for its dtype announces the wait on
    stderr before it starts, naming what it compiles, and says "compiling" in its timing line
    (the cache state is faked here: compiling for real takes a minute;
    test_compiled_on_disk_tells_a_cached_kernel_from_a_new_one reads a real cache)."""
    from refghost.kernels import _jit

    asked = []
    monkeypatch.setattr(_jit, "compiled_on_disk", lambda dispatcher, dtype=None: asked.append(dtype) or on_disk)
    assert main(["run", *argv]) == 0
    captured = capsys.readouterr()
    assert set(asked) == {"float64" if "float64" in argv else "float32"}
    assert (f"compiling {announced} for this machine" in captured.err) is (on_disk is False), captured.err
    assert ("including compiling kernels" in captured.out) is (on_disk is False)
    assert ("including loading compiled kernels" in captured.out) is (on_disk is not False)


def test_plain_run_announces_no_compile(monkeypatch, capsys):
    from refghost.kernels import _jit

    monkeypatch.setattr(_jit, "compiled_on_disk", lambda dispatcher, dtype=None: False)
    assert main(["run", "--impl", "plain"]) == 0
    captured = capsys.readouterr()
    assert "compiling" not in captured.err and "including loading compiled kernels" in captured.out


def test_compiled_on_disk_tells_a_cached_kernel_from_a_new_one(tmp_path, monkeypatch):
    import importlib

    from refghost.kernels._jit import compiled_on_disk

    (tmp_path / "fresh_kernel_module.py").write_text(
        "import numba\n\n@numba.njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("fresh_kernel_module")
    assert compiled_on_disk(module.twice) is False
    assert module.twice(21) == 42
    assert compiled_on_disk(module.twice) is True
    assert compiled_on_disk(len) is None
    # by dtype: a kernel cached for float32 arrays compiles again for float64 ones
    assert compiled_on_disk(module.twice, "float32") is False
    assert module.twice(np.ones(2, np.float32))[0] == 2
    assert compiled_on_disk(module.twice, "float32") is True and compiled_on_disk(module.twice, "float64") is False


def test_run_npy_float64_intermediates_to_npz(tmp_path, weights_file, capsys):
    x = np.random.default_rng(0).standard_normal((2, 3, 33, 47)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out_file = tmp_path / "r.npz"
    assert main(["run", str(tmp_path / "x.npy"), "--weights", str(weights_file), "--dtype", "float64",
                 "--intermediates", "--out", str(out_file)]) == 0
    assert "intermediate tensors" in capsys.readouterr().out
    with np.load(out_file) as saved:
        names = list(saved.files)
        assert names[:3] == ["conv_stem", "bn1", "act1"]
        assert {"blocks.4", "blocks.6", "blocks.9", "blocks.3.0.se.gate"} <= set(names)
        assert saved["blocks.9"].shape == (2, 960, 2, 2) and saved["blocks.9"].dtype == np.float64
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_python_dash_m(weights_file, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 16, 16), np.float32))
    done = subprocess.run([sys.executable, "-m", "refghost", "run", str(tmp_path / "x.npy"), "--weights",
                           str(weights_file)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "blocks.9" in done.stdout


@pytest.mark.parametrize("argv_tail, message", [
    (["--weights", "{tmp}/missing.h5"], "no such weights file"),
    (["{tmp}/missing.png"], "missing.png"),
    (["{tmp}/nan.npy"], "NaN"),
    (["{tmp}/gray.npy"], r"\(N, 3, H, W\)"),
    (["--out", "{tmp}/r.txt"], "ending in .npz"),
    (["--out", "{tmp}/no/such/dir/r.npz"], "does not exist"),
])
def test_run_bad_input_exits_2_without_output(tmp_path, weights_file, capsys, argv_tail, message):
    x = np.zeros((1, 3, 8, 8), np.float32)
    x[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    np.save(tmp_path / "gray.npy", np.zeros((1, 1, 8, 8), np.float32))
    argv = ["run", "--weights", str(weights_file)] + [a.format(tmp=tmp_path) for a in argv_tail]
    before = set(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("refghost run: error:")
    import re

    assert re.search(message, err), err
    assert set(tmp_path.rglob("*")) == before


def test_convert_then_run(tmp_path, capsys):
    model = tg.randomize(tg.build("nanodet", 0.75, "SiLU", (2, 9)), seed=4)
    torch.save({"state_dict": {f"model.backbone.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "m.ckpt")
    argv = ["convert", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "w.h5"), "--width", "0.75",
            "--activation", "SiLU", "--out-stages", "9,2"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    np.save(tmp_path / "x.npy", np.ones((1, 3, 32, 32), np.float32))
    assert main(["run", str(tmp_path / "x.npy"), "--weights", str(tmp_path / "w.h5")]) == 0
    out = capsys.readouterr().out
    assert "blocks.2 " in out and "blocks.9 " in out and "blocks.4 " not in out


def test_convert_bad_exits_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "none.pth"), "--out", str(tmp_path / "w.h5")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "none.pth"), "--out", str(tmp_path / "w.h5"),
                 "--out-stages", "4,x"]) == 2
    assert "--out-stages" in capsys.readouterr().err
    assert not (tmp_path / "w.h5").exists()


def test_info_weights_and_golden(weights_file, tmp_path, capsys):
    import json

    assert main(["info", str(weights_file)]) == 0
    out = capsys.readouterr().out
    assert "valid refghost weights file" in out and "2,671,428" in out and "BGR" in out
    assert main(["golden", "--weights", str(weights_file), "--seed", "0", "--out", str(tmp_path / "g.h5")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "g.h5"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "golden" and info["valid"] and info["input_shape"] == [1, 3, 320, 320]
    assert info["config"]["arch"] == "nanodet" and info["parameters"] == 2_671_428
    (tmp_path / "bad.h5").write_text("no")
    assert main(["info", str(tmp_path / "bad.h5"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["valid"] is False
    assert main(["info", str(tmp_path / "bad.h5")]) == 2
    assert "not a readable HDF5 file" in capsys.readouterr().err


def test_export_round_trips_through_torch_and_convert(weights_file, tmp_path, capsys):
    import refghost

    assert main(["export", str(weights_file), "--out", str(tmp_path / "sd.pth")]) == 0
    model = tg.build("nanodet", 1.0, "ReLU")
    model.load_state_dict(torch.load(tmp_path / "sd.pth"), strict=True)  # BN counters are optional
    assert main(["convert", str(tmp_path / "sd.pth"), "--out", str(tmp_path / "w.h5")]) == 0
    assert main(["export", str(tmp_path / "w.h5"), "--out", str(tmp_path / "sd.npz")]) == 0
    original = refghost.load_weights(weights_file)
    with np.load(tmp_path / "sd.npz") as back:
        assert sorted(back.files) == sorted(original.tensors)
        for key, value in original.tensors.items():
            assert np.array_equal(back[key], value)
            assert np.array_equal(model.state_dict()[key].numpy(), value)
    assert main(["export", str(weights_file), "--out", str(tmp_path / "sd.txt")]) == 2
    capsys.readouterr()
