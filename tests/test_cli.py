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


@pytest.mark.parametrize("cached, announced", [(set(), "interpreter"), ({"depthwise_parallel"}, None),
                                               ({"depthwise_parallel", "depthwise_blocked_parallel"}, None)])
def test_the_interpreter_announces_a_compile_only_when_nothing_of_it_is_cached(monkeypatch, cached, announced):
    """After a first compare with two threads, only the parallel depthwise variants are in the
    cache (measured with an empty NUMBA_CACHE_DIR): the next compare compiles nothing and must
    not announce a compile."""
    from refghost.cli import _kernels_to_compile
    from refghost.kernels import _jit

    monkeypatch.setattr(_jit, "compiled_on_disk", lambda dispatcher, dtype=None: dispatcher.__name__ in cached)
    assert _kernels_to_compile(True, "interpreter", "float64") == announced


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


@pytest.mark.parametrize("kernel", ["fixed_point", "ipp_float32_fma"])
def test_run_warp_kernel_is_used_and_named(tmp_path, weights_file, capsys, kernel):
    from refghost import load_weights, run
    from refghost.preprocess import prepare_image

    out_file = tmp_path / "r.npz"
    argv = ["run", str(SAMPLE_IMAGE), "--weights", str(weights_file), "--out", str(out_file)]
    assert main(argv + ([] if kernel == "fixed_point" else ["--warp-kernel", kernel])) == 0
    assert f"resized with warp kernel {kernel}" in capsys.readouterr().out
    weights = load_weights(weights_file)
    pre = weights.preprocessing
    x = prepare_image(SAMPLE_IMAGE, mean=pre.mean, std=pre.std, channel_order=pre.channel_order,
                      input_size=pre.input_size, warp_kernel=kernel)
    expected = run(x, weights)
    with np.load(out_file) as saved:
        for name, value in expected.items():
            assert np.array_equal(saved[name], value), name


def test_run_npy_input_names_no_warp_kernel(tmp_path, weights_file, capsys):
    np.save(tmp_path / "x.npy", np.zeros((3, 16, 16), np.float32))
    assert main(["run", str(tmp_path / "x.npy"), "--weights", str(weights_file)]) == 0
    assert "warp kernel" not in capsys.readouterr().out


def test_golden_records_the_warp_kernel_of_an_image_input(tmp_path, weights_file, capsys):
    import h5py

    from refghost.verify.golden import read_golden
    from refghost.preprocess import WARP_KERNELS

    base = ["golden", "--weights", str(weights_file)]
    inputs = {}
    for kernel in ("fixed_point", "float32_fma"):
        path = tmp_path / f"{kernel}.h5"
        assert main(base + ["--out", str(path), "--warp-kernel", kernel]) == 0
        assert f"sample.png, warp kernel {kernel})" in capsys.readouterr().out
        with h5py.File(path, "r") as f:
            assert f.attrs["warp_kernel"] == kernel and f.attrs["warp_kernel"] in WARP_KERNELS
        inputs[kernel] = read_golden(path).input
    assert not np.array_equal(inputs["fixed_point"], inputs["float32_fma"])  # the kernels differ on sample.png
    assert main(base + ["--out", str(tmp_path / "seed.h5"), "--seed", "0"]) == 0
    assert "warp kernel" not in capsys.readouterr().out
    with h5py.File(tmp_path / "seed.h5", "r") as f:
        assert "warp_kernel" not in f.attrs


def test_warp_kernel_option_rejects_unknown_kernels(tmp_path, weights_file, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--weights", str(weights_file), "--warp-kernel", "cv6"])
    assert info.value.code == 2
    assert "--warp-kernel" in capsys.readouterr().err


# --- several images, odd images, help, golden size, convert's assumptions ----------------------------

def _images(folder, n_gray=1):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i in range(n_gray):
        Image.new("L", (1, 1), 10 * i).save(folder / f"g{i:02d}.png")
    Image.new("RGBA", (30, 20), (1, 2, 3, 4)).save(folder / "rgba.png")
    return folder


def test_run_several_images_says_what_it_did_to_each_and_writes_one_batch(tmp_path, weights_file, capsys):
    folder = _images(tmp_path / "imgs")
    out_file = tmp_path / "r.npz"
    assert main(["run", str(folder), str(SAMPLE_IMAGE), "--weights", str(weights_file), "--out", str(out_file)]) == 0
    captured = capsys.readouterr()
    assert "3 images, one batch (3, 3, 320, 320)" in captured.out
    assert "[0] " + str(folder / "g00.png") + " (1x1; grayscale converted to 3 channels; upscaled to 320x320)" \
        in captured.out
    assert "[1] " + str(folder / "rgba.png") + " (30x20; alpha channel dropped (not composited); upscaled to " \
        "320x320)" in captured.out
    assert "[2] " + str(SAMPLE_IMAGE) + " (480x360; downscaled to 320x320)" in captured.out
    assert "3 outputs;" in captured.out and "tensors" not in captured.out
    assert "read image" not in captured.err  # no progress for a few images
    with np.load(out_file) as saved:
        assert list(saved.files) == ["blocks.4", "blocks.6", "blocks.9"] and saved["blocks.9"].shape[0] == 3


def test_run_many_images_reports_progress_on_stderr(tmp_path, weights_file, capsys):
    folder = _images(tmp_path / "imgs", n_gray=11)
    assert main(["run", str(folder), "--weights", str(weights_file)]) == 0
    err = capsys.readouterr().err
    assert "read image 1/12" in err and "read image 12/12" in err and "running the network on 12 images" in err


@pytest.mark.parametrize("argv_tail, message", [
    (["{tmp}/empty"], "no image files"),
    (["{tmp}/x.npy", "{tmp}/empty"], "give it alone"),
])
def test_run_bad_image_lists_exit_2(tmp_path, weights_file, capsys, argv_tail, message):
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    assert main(["run", "--weights", str(weights_file)] + [a.format(tmp=tmp_path) for a in argv_tail]) == 2
    assert message in capsys.readouterr().err


def test_help_texts_agree_with_the_readme(capsys):
    for argv in (["--help"], ["convert", "--help"], ["run", "--help"], ["golden", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert "needs torch)" not in text.split("export")[0]  # only exporting to .pth needs torch
    assert text.count(".onnx") >= 3 and "without PyTorch" in text
    for choice in ("fast (default):", "engine:", "interpreter:", "plain:"):
        assert choice in text
    assert "default: the shipped synthetic weights" in text


def test_golden_names_the_weights_checks_out_and_says_the_size_first(tmp_path, capsys):
    assert main(["golden", "--out", str(tmp_path / "g.txt")]) == 2
    assert "give a path ending in .h5" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    out_file = tmp_path / "g.h5"
    assert main(["golden", "--seed", "0", "--batch", "2", "--out", str(out_file)]) == 0
    captured = capsys.readouterr()
    assert "the shipped synthetic weights: the default when --weights is not given" in captured.out
    import re

    said = float(re.search(r"3 tensors for input \(2, 3, 320, 320\), about ([0-9.]+) MB", captured.out).group(1))
    assert abs(said * 1e6 - out_file.stat().st_size) < 0.002 * out_file.stat().st_size
    assert captured.out.index("about") < captured.out.index("wrote")
    assert "computing the oracle" in captured.err and "writing" in captured.err


def test_info_prints_the_statistics_as_float32_gives_them(capsys):
    assert main(["info", str(DEFAULT_WEIGHTS)]) == 0
    assert "mean [103.53, 116.28, 123.675], std [57.375, 57.12, 58.395]" in capsys.readouterr().out


def test_convert_says_what_it_assumed_and_takes_the_preprocessing(tmp_path, weights_file, capsys):
    from refghost.weights import load_weights

    np.savez(tmp_path / "sd.npz", **load_weights(weights_file).tensors)
    assert main(["convert", str(tmp_path / "sd.npz"), "--out", str(tmp_path / "a.h5")]) == 0
    out = capsys.readouterr().out
    assert "preprocessing BGR, mean [103.53, 116.28, 123.675]" in out
    assert "assumed, not read from sd.npz: channel-order, mean, std" in out and "--channel-order --mean --std" in out
    assert main(["convert", str(tmp_path / "sd.npz"), "--out", str(tmp_path / "b.h5"), "--channel-order", "RGB"]) == 0
    out = capsys.readouterr().out
    assert "assumed, not read from sd.npz: mean, std" in out
    pre = load_weights(tmp_path / "b.h5").preprocessing  # the same statistics per colour, reordered
    assert pre.channel_order == "RGB" and pre.mean == (123.675, 116.28, 103.53) and pre.std == (58.395, 57.12, 57.375)
    assert main(["convert", str(tmp_path / "sd.npz"), "--out", str(tmp_path / "c.h5"), "--channel-order", "RGB",
                 "--mean", "1,2,3", "--std", "4,5,6"]) == 0
    assert "assumed" not in capsys.readouterr().out
    pre = load_weights(tmp_path / "c.h5").preprocessing
    assert pre.mean == (1, 2, 3) and pre.std == (4, 5, 6)
    assert main(["convert", str(tmp_path / "sd.npz"), "--out", str(tmp_path / "d.h5"), "--std", "1,0,1"]) == 2
    assert main(["convert", str(tmp_path / "sd.npz"), "--out", str(tmp_path / "d.h5"), "--mean", "1,x,1"]) == 2
    assert not (tmp_path / "d.h5").exists()


def test_convert_onnx_says_its_preprocessing_was_assumed(tmp_path, capsys):
    import onnx_bank as ob

    from refghost.weights import load_weights

    model = tg.randomize(tg.build("nanodet", 0.5, "ReLU", (4, 6, 9)), seed=1).eval()
    with ob._quiet():
        torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(tmp_path / "m.onnx"), dynamo=False,
                          opset_version=ob.TS_OPSET, input_names=["input"])
    assert main(["convert", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "a.h5")]) == 0
    out = capsys.readouterr().out
    assert "preprocessing BGR, mean [103.53, 116.28, 123.675], std [57.375, 57.12, 58.395], input size 64x64" in out
    assert "assumed, not read from m.onnx: channel-order, mean, std" in out
    assert main(["convert", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b.h5"), "--channel-order", "RGB",
                 "--mean", "0,0,0", "--std", "255,255,255"]) == 0
    assert "assumed" not in capsys.readouterr().out
    pre = load_weights(tmp_path / "b.h5").preprocessing
    assert (pre.channel_order, pre.mean, pre.std, pre.input_size) == ("RGB", (0, 0, 0), (255, 255, 255), (64, 64))


def test_golden_and_compare_announce_the_float64_interpreter_compile(tmp_path, weights_file, monkeypatch, capsys):
    from refghost.kernels import _jit

    asked = []
    monkeypatch.setattr(_jit, "compiled_on_disk", lambda dispatcher, dtype=None: asked.append(dtype) or False)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["golden", "--weights", str(weights_file), "--input", str(tmp_path / "x.npy"), "--out",
                 str(tmp_path / "g.h5")]) == 0
    assert "compiling the interpreter's float64 kernels" in capsys.readouterr().err
    from refghost.verify.golden import read_golden

    np.savez(tmp_path / "c.npz", **read_golden(tmp_path / "g.h5").outputs)
    assert main(["compare", str(tmp_path / "g.h5"), str(tmp_path / "c.npz")]) == 0
    assert "compiling the interpreter's float64 kernels" in capsys.readouterr().err
    assert set(asked) == {"float64"}
