"""Special files refused before any open, companion files kept inside the model's folder, HDF5
hangs ended by a time limit (`refghost info`, safe_io.probe_hdf5), text from files escaped."""

import os
import socket
import struct

import h5py
import numpy as np
import pytest

from refghost import info
from refghost.cli import main
from refghost.errors import CompareError, GoldenError, RefghostError
from refghost.isolate import call_isolated
from refghost.safe_io import check_regular_file, open_hdf5, printable, probe_hdf5, read_npy, read_npz
from refghost.testing import fuzz


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return fuzz.make_seeds(tmp_path_factory.mktemp("seeds"))["golden"]


def _hanging_hdf5(path):
    """An HDF5 file on which reading a string attribute never returns: the free-space object of
    its global heap declares 0 bytes (the mutation of the issue's golden-info-hang.h5), and
    HDF5 loops on it without advancing."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "refghost-golden"
    data = bytearray(path.read_bytes())
    at = data.find(b"GCOL") + 16  # the collection's first object
    while True:
        index, _, _, size = struct.unpack_from("<HHIQ", data, at)
        if index == 0:  # the free space
            struct.pack_into("<Q", data, at + 8, 0)
            break
        at += 16 + -(-size // 8) * 8
    path.write_bytes(bytes(data))
    return path


# ------------------------------------------------------------------------------------------------
# special files and companions
# ------------------------------------------------------------------------------------------------
def test_special_files_are_refused_by_name(tmp_path):
    fifo = tmp_path / "model.bin"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        for path, kind in ((fifo, "a named pipe (FIFO)"), (tmp_path, "a folder"), ("/dev/null", "a character device"),
                           (tmp_path / "sock", "a socket")):
            with pytest.raises(CompareError, match=rf"^{path}: is {kind.replace('(', '[(]').replace(')', '[)]')}, "
                                                   r"not a model weights \(\.bin\); refused before opening it$"):
                check_regular_file(path, "model weights (.bin)", CompareError)
    finally:
        sock.close()
    with pytest.raises(RefghostError, match=r"missing\.bin: no such weights file$"):
        check_regular_file(tmp_path / "missing.bin", "weights file")
    (tmp_path / "dangling.bin").symlink_to(tmp_path / "nowhere")
    with pytest.raises(RefghostError, match=r"no such weights file \(a symbolic link to a missing file\)"):
        check_regular_file(tmp_path / "dangling.bin", "weights file")


def test_a_companion_outside_the_models_folder_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("not the model's")
    (model / "model.bin").symlink_to(outside)
    with pytest.raises(RefghostError, match=rf"^{model}/model.bin: ncnn weights \(\.bin\) is a symbolic link to "
                                            rf"{outside} \({outside}\), outside the model's folder {model}; "):
        check_regular_file(model / "model.bin", "ncnn weights (.bin)", folder=model)
    with pytest.raises(RefghostError, match=r"resolves to .*secret\.txt, outside the model's folder"):
        check_regular_file(model / ".." / "secret.txt", "external data", folder=model)
    (model / "weights.data").write_bytes(b"\0")
    (model / "alias.bin").symlink_to("weights.data")  # inside the folder: followed
    check_regular_file(model / "alias.bin", "ncnn weights (.bin)", folder=model)
    check_regular_file(outside, "main file")  # the main file may be anywhere


def test_the_readers_refuse_a_fifo_without_opening_it(tmp_path):
    """Each reader on a FIFO ends at once (run in a child with a limit: an open would block)."""
    fifo = tmp_path / "x"
    os.mkfifo(fifo)

    def read_all():
        messages = []
        for read in (lambda: open_hdf5(str(fifo), GoldenError, "golden").__enter__(),
                     lambda: read_npy(str(fifo), CompareError, max_bytes=1 << 20),
                     lambda: read_npz(str(fifo), CompareError, max_bytes=lambda key: 1 << 20)):
            try:
                read()
            except RefghostError as exc:
                messages.append(str(exc))
        return messages

    assert call_isolated(read_all, who="readers", doing="on a FIFO", timeout=10, memory=None) == [
        f"{fifo}: is a named pipe (FIFO), not a {what}; refused before opening it"
        for what in ("golden file", ".npy file", ".npz file")]


# ------------------------------------------------------------------------------------------------
# HDF5 hangs
# ------------------------------------------------------------------------------------------------
def test_info_on_a_file_hdf5_hangs_on_ends_with_one_message(tmp_path, monkeypatch, capsys):
    path = _hanging_hdf5(tmp_path / "hang.h5")
    monkeypatch.setattr(info, "READ_TIMEOUT", 2.0)
    assert main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"refghost info: error: HDF5 did not finish reading {path} within 2 s (killed)\n"


def test_probe_hdf5(tmp_path, golden):
    probe_hdf5(golden, GoldenError, "golden")  # a valid golden passes
    path = _hanging_hdf5(tmp_path / "hang.h5")
    with pytest.raises(GoldenError, match=rf"^HDF5 did not finish reading {path} within 1 s \(killed\)$"):
        probe_hdf5(path, GoldenError, "golden", timeout=1)
    os.mkfifo(tmp_path / "fifo.h5")
    with pytest.raises(GoldenError, match="is a named pipe"):
        probe_hdf5(tmp_path / "fifo.h5", GoldenError, "golden")


# ------------------------------------------------------------------------------------------------
# text from files
# ------------------------------------------------------------------------------------------------
def test_printable():
    assert printable("blocks.9 -> ÿ détecteur") == "blocks.9 -> ÿ détecteur"
    assert printable("\x1b[2J\tok\n") == "\\x1b[2J\\x09ok\\x0a"
    assert printable(b"\x1b[2J\xc3\x28") == "\\x1b[2J\\xc3("
    assert printable("zero\u200bwidth \U000e0001") == "zero\\u200bwidth \\U000e0001"


def _with_command(src, dst, command):
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        f.attrs["command"] = command
    return dst


def test_info_prints_text_from_the_file_escaped(golden, tmp_path, capsys):
    path = _with_command(golden, tmp_path / "g.h5", "refghost golden \x1b[2J\x1b]0;pwned\x07 --out g.h5")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "  command       refghost golden \\x1b[2J\\x1b]0;pwned\\x07 --out g.h5\n" in out


def test_info_on_text_that_is_not_utf8_shows_it_escaped(golden, tmp_path, capsys):
    path = _with_command(golden, tmp_path / "g.h5", np.bytes_(b"\x1b[2J\xc3\x28"))
    assert main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"refghost info: error: {path}: attribute 'command' is not valid UTF-8: \\x1b[2J\\xc3(\n"
