"""Hostile and corrupt files and arguments: each ends in one documented error, in bounded memory.

Hypothesis mutates every file kind refghost reads (byte-level and structural, from the shipped
weights and small goldens/candidates made here: ``refghost.testing.fuzz``); the explicit tests
are the cases of the hardening issue, one by one. ``tools/fuzz.py`` runs the same mutations for
as long as you like, each case in a worker process with a hang timeout.

No assertion here is a wall-clock time (a loaded machine is slow, not wrong): "refused before
reading the data" is asserted as "the data was never read" (a spy on every HDF5 dataset read),
"before any work" as "no file opened, no model run" (sentinels), and bounded memory by the peak
RSS of the whole file (``memory_bound``; a bomb or a huge declared shape that were read would
allocate gigabytes).
"""

import contextlib
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refghost.atomic import TEMP_MARKER, atomic_path
from refghost.convert.checkpoint import load_state_dict
from refghost.cli import DEFAULT_WEIGHTS, main
from refghost.verify.compare import CompareError
from refghost.convert.state_dict import read_state_dict
from refghost.errors import ImageError, RefghostError, WeightsError
from refghost.verify.golden import GoldenError, read_golden
from refghost.preprocess import MAX_IMAGE_PIXELS, read_image
from refghost.safe_io import MAX_CHUNKS
from refghost.testing import fuzz
from refghost.weights import load_weights
from test_checkpoint import p_dict, p_pickle, p_storage, p_tensor, write_zip

#: The peak RSS growth the whole file may cause.
RSS_GROWTH = 1.5 * 2 ** 30


def _rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fuzz.make_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def readers(seeds):
    return {kind: fuzz.reader(kind, seeds) for kind in fuzz.KINDS}


@pytest.fixture(scope="module", autouse=True)
def memory_bound():
    """No test of this file may grow the process's peak RSS by more than RSS_GROWTH."""
    before = _rss()
    yield
    assert _rss() - before < RSS_GROWTH, f"peak RSS grew by {(_rss() - before) / 2 ** 20:.0f} MiB"


def assert_documented(read, path, error=RefghostError, match=None):
    """``read(path)`` raises ``error`` (and nothing else)."""
    with pytest.raises(error, match=match):
        read(path)


@contextlib.contextmanager
def datasets_read():
    """The names of the HDF5 datasets whose data is read inside the block (every read of an
    ``h5py.Dataset``'s values goes through ``__getitem__`` or ``read_direct``)."""
    names = []
    getitem, read_direct = h5py.Dataset.__getitem__, h5py.Dataset.read_direct

    def spy_getitem(ds, *args, **kwargs):
        names.append(ds.name)
        return getitem(ds, *args, **kwargs)

    def spy_read_direct(ds, *args, **kwargs):
        names.append(ds.name)
        return read_direct(ds, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(h5py.Dataset, "__getitem__", spy_getitem)
        patch.setattr(h5py.Dataset, "read_direct", spy_read_direct)
        yield names


def assert_ok_or_documented(read, path):
    outcome, detail = fuzz.verdict(read, path)
    assert outcome != "other", detail


# --------------------------------------------------------------------------------------------
# Hypothesis: byte-level and structural mutations of every file kind
# --------------------------------------------------------------------------------------------
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
edits = st.lists(st.tuples(st.integers(0, 2 ** 16 - 1), st.integers(0, 255)), min_size=1, max_size=4)


@pytest.mark.parametrize("kind", fuzz.KINDS)
@FUZZ
@given(edits=edits, cut=st.none() | st.integers(0, 2 ** 24), seed=st.integers(0, 2 ** 32 - 1))
def test_byte_mutations(seeds, readers, tmp_path, kind, edits, cut, seed):
    data = bytearray(seeds[kind].read_bytes())
    for pos, value in edits:  # explicit edits where the metadata lives, then one random mutation
        data[pos % len(data)] = value
    if cut is not None:
        del data[cut % len(data):]
    data = fuzz.mutate_bytes(bytes(data), random.Random(seed), edits=1)
    case = tmp_path / seeds[kind].name
    case.write_bytes(data)
    assert_ok_or_documented(readers[kind], case)


@pytest.mark.parametrize("kind", ["weights", "golden", "candidate_h5"])
@FUZZ
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_structural_mutations(seeds, readers, tmp_path, kind, seed):
    case = tmp_path / seeds[kind].name
    fuzz.mutate_structure(seeds[kind], case, random.Random(seed))
    assert_ok_or_documented(readers[kind], case)


# --------------------------------------------------------------------------------------------
# The cases, one by one
# --------------------------------------------------------------------------------------------
def _edit(src, dst, edit):
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def test_every_bit_flip_of_the_weights_metadata(seeds, tmp_path):
    """Flips over the superblock and first object headers (the checksum errors of the issue)."""
    data = seeds["weights"].read_bytes()
    case = tmp_path / "w.h5"
    for pos in range(0, 4096, 101):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << (pos % 8)
        case.write_bytes(flipped)
        assert_ok_or_documented(load_weights, case)


LARGEST = "blocks.8.3.se.conv_reduce.weight"  # the largest tensor of the shipped weights (240, 960, 1, 1)


def _replace(name, **kwargs):
    def edit(f):
        shape, dtype = f[name].shape, f[name].dtype
        del f[name]
        f.create_dataset(name, shape=shape, dtype=dtype, **kwargs)
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.attrs.__setitem__("schema_version", "abc"), "'schema_version' must be an integer"),
    (lambda f: f.attrs.__setitem__("format", np.array(["refghost-weights"] * 2, dtype=h5py.string_dtype())),
     "'format' must be a string"),
    (lambda f: f.attrs.__setitem__("arch", np.bytes_(b"nano\xffdet")), "'arch' is not valid UTF-8"),
    (lambda f: f.attrs.__setitem__("input_size", np.array([10 ** 9, 10 ** 9])), "more than 1048576 pixels"),
    (lambda f: f.attrs.__setitem__("input_size", np.array([1e9, 1e9])), "'input_size' must be integers"),
    (lambda f: f.attrs.__setitem__("input_mean", np.array([np.nan, 1.0, 2.0])), "3 finite values"),
    (lambda f: f.attrs.__setitem__("input_std", np.array([1.0, np.inf, 2.0])), "3 finite values"),
    (lambda f: f.attrs.__setitem__("width", 1e308), "width is 1e\\+308"),
    (lambda f: f.attrs.__setitem__("out_stages", np.zeros((2, 2), dtype=np.int64)), "'out_stages' must be integers"),
    (_replace("conv_stem.weight", external=[("/etc/passwd", 0, h5py.h5f.UNLIMITED)]), "external file"),
    (lambda f: f.__setitem__("x", h5py.ExternalLink("/etc/passwd", "/")), "external link"),
    (lambda f: (f.__delitem__("conv_stem.weight"), f.__setitem__("conv_stem.weight", h5py.SoftLink("/conv_stem.weight"))),
     "soft link"),
    (lambda f: f.create_dataset("extra", shape=(1_500_000_000,), dtype="f4"), "unexpected key 'extra'"),
    (lambda f: f.create_dataset("extra", shape=(2 ** 40,), dtype="f4", chunks=(2 ** 20,)), "unexpected key"),
    (lambda f: fuzz._gzip_bomb(f, "bomb", 3 * 2 ** 28), "unexpected key 'bomb'"),
    (_replace("conv_stem.weight", chunks=(1, 1, 1, 1)), "never written"),  # 432 chunks are allowed
    (_replace(LARGEST, chunks=(1, 1, 1, 1)), f"chunks, more than {MAX_CHUNKS}"),
    (_replace("conv_stem.weight", maxshape=(None, 3, 3, 3), chunks=(2 ** 22, 3, 3, 3)), "larger than the dataset"),
    (lambda f: (f.__delitem__("conv_stem.weight"),
                f.create_dataset("conv_stem.weight", shape=(10 ** 7, 3, 3, 3), dtype="f4", chunks=(1, 1, 1, 1))),
     "has shape \\[10000000, 3, 3, 3\\], expected \\[16, 3, 3, 3\\]"),
    (_replace("conv_stem.weight"), "never written"),
    (_replace("conv_stem.weight", compression="gzip", chunks=(16, 3, 3, 3)), "never written"),
])
def test_hostile_weights(seeds, tmp_path, edit, message):
    case = _edit(seeds["weights"], tmp_path / "w.h5", edit)
    assert_documented(load_weights, case, WeightsError, message)


def test_virtual_dataset_refused(seeds, tmp_path):
    def edit(f):
        shape, dtype = f["conv_stem.weight"].shape, f["conv_stem.weight"].dtype
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(os.fspath(seeds["weights"]), "conv_stem.weight", shape=shape)
        del f["conv_stem.weight"]
        f.create_virtual_dataset("conv_stem.weight", layout)

    assert_documented(load_weights, _edit(seeds["weights"], tmp_path / "w.h5", edit), WeightsError, "virtual")


def _set_data(group, name, transform):
    def edit(f):
        ds = f[group][name] if group else f[name]
        ds[...] = transform(ds[()])
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda f: (f.__delitem__("outputs"), f.create_dataset("outputs", data=np.zeros(3))), "'outputs' is a dataset"),
    (lambda f: (f.__delitem__("bounds"), f.create_dataset("bounds", data=np.zeros(3))), "'bounds' is a dataset"),
    (lambda f: (f.__delitem__("intermediates"), f.create_dataset("intermediates", data=1.0)),
     "'intermediates' is a dataset"),
    (lambda f: (f.__delitem__("input"), f.create_group("input")), "'input' is a group"),
    (lambda f: (f["outputs"].__delitem__("blocks.9"), f["outputs"].create_group("blocks.9")), "is a group"),
    (_set_data("bounds", "blocks.4", lambda b: np.where(np.arange(b.size).reshape(b.shape) == 0, np.nan, b)),
     "NaN, infinite or negative"),
    (_set_data("bounds", "blocks.6", lambda b: -b), "NaN, infinite or negative"),
    (_set_data("bounds", "blocks.9", lambda b: b + np.inf), "NaN, infinite or negative"),
    (_set_data("", "input", lambda x: x * np.nan), "NaN or Inf"),
    (lambda f: (f.__delitem__("input"), f.create_dataset("input", shape=(1000, 3, 1000, 1000), dtype="f4")),
     "more than the 3145728"),
    (lambda f: (f.__delitem__("input"), f.create_dataset("input", data=np.zeros((1, 3, 2, 2), "f4"))), "has shape"),
    (lambda f: f.attrs.__setitem__("schema_version", np.array([1, 1])), "must be an integer"),
    (lambda f: f.attrs.__setitem__("command", np.bytes_(b"\xc3\x28")), "not valid UTF-8"),
    (lambda f: f["weights"].attrs.__setitem__("input_std", np.array([0.0, 1.0, 1.0])), "std > 0"),
    (lambda f: f["intermediates"].create_dataset("nonsense", data=np.zeros(2)), "not a layer"),
    (lambda f: f["bounds"].create_dataset("nonsense", data=np.zeros(2, "f4")), "belongs to no stored tensor"),
    (lambda f: f.__setitem__("extra", np.zeros(2)), "unexpected member 'extra' at the root"),
])
def test_hostile_golden(seeds, tmp_path, edit, message):
    assert_documented(read_golden, _edit(seeds["golden"], tmp_path / "g.h5", edit), GoldenError, message)


def test_candidate_h5_bombs_and_links(seeds, readers, tmp_path):
    read = readers["candidate_h5"]
    name = "outputs/blocks.9"

    def bomb(f):
        del f[name]
        fuzz._gzip_bomb(f, name, 3 * 2 ** 28)

    assert_documented(read, _edit(seeds["candidate_h5"], tmp_path / "a.h5", bomb), CompareError,
                      "decompression bomb")

    def ratio(f):  # a bomb that fits the size cap: refused by its compression ratio
        shape = f[name].shape
        del f[name]
        ds = f.create_dataset(name, shape=shape, dtype="f4", chunks=shape, compression="gzip")
        ds.id.write_direct_chunk((0,) * len(shape), zlib.compress(bytes(4 * int(np.prod(shape))), 9))

    case = _edit(seeds["candidate_h5"], tmp_path / "c.h5", ratio)
    assert_ok_or_documented(read, case)  # small: under EXPANSION_SLACK, read (zeros)
    assert_documented(read, _edit(seeds["candidate_h5"], tmp_path / "d.h5",
                                  lambda f: (f.__delitem__("outputs/blocks.6"),
                                            f.__setitem__("outputs/blocks.6", h5py.ExternalLink("/etc/passwd", "/")))),
                      CompareError, "link")
    # unneeded datasets are never read: a 1.5e9-element one is listed, and its data never touched
    case = _edit(seeds["candidate_h5"], tmp_path / "e.h5",
                 lambda f: f.create_dataset("dump/huge", shape=(1_500_000_000,), dtype="f4"))
    with datasets_read() as names:
        loaded = read(case)
    assert "/dump/huge" not in names and "/outputs/blocks.9" in names
    assert "dump.huge" not in loaded.tensors and any("dump.huge" in n for n in loaded.notes)


def _npz(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _npy_bytes(array):
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _npy_header(header: dict) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def test_hostile_npz(seeds, readers, tmp_path):
    read = readers["candidate_npz"]
    data = seeds["candidate_npz"].read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30, len(data) - 1):
        (tmp_path / "t.npz").write_bytes(data[:cut])
        assert_documented(read, tmp_path / "t.npz", CompareError)
    raw = _npy_bytes(np.zeros((1, 4), "f4"))
    header_len = struct.unpack("<H", raw[8:10])[0]
    unbalanced = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1, (".ljust(header_len - 1) + b"\n"
    members = {
        "tokenize": raw[:10] + unbalanced + raw[10 + header_len:],  # tokenize.TokenError inside NumPy
        "eof": raw[:9],  # EOFError inside NumPy
        "object": raw.replace(b"'<f4'", b"'|O' "),
        "negative": _npy_header({"descr": "<f4", "fortran_order": False, "shape": (1, -4)}),
        "huge": _npy_header({"descr": "<f4", "fortran_order": False, "shape": (2 ** 62,)}),
        "short": raw[:-3],
        "long": raw + b"\0" * 4,
    }
    for label, member in members.items():
        case = _npz(tmp_path / f"{label}.npz", {"blocks.9.npy": member})
        assert_documented(read, case, CompareError)
    # a deflate bomb in a state_dict .npz (nothing but the caps bounds it): refused by its ratio
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("conv_stem.weight.npy", "w") as member:
        member.write(_npy_header({"descr": "<f4", "fortran_order": False, "shape": (2 ** 26,)}))
        for _ in range(64):
            member.write(bytes(2 ** 22))
    assert bomb.stat().st_size < 2 ** 20
    assert_documented(read_state_dict, bomb, WeightsError, "decompression bomb")


def test_member_counts_checked_before_listing(seeds, readers, tmp_path):
    """A zip declaring 60,000 members, a golden with 100 attributes: refused from the count."""
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 60000, 60000, 46 * 60000, 4, 0)
    (tmp_path / "many.npz").write_bytes(b"PK\x03\x04" + eocd)
    assert_documented(readers["candidate_npz"], tmp_path / "many.npz", CompareError, "60000 archive members")
    many = _edit(seeds["golden"], tmp_path / "g.h5", lambda f: [f.attrs.__setitem__(f"a{i}", i) for i in range(100)])
    assert_documented(read_golden, many, GoldenError, r"1\d\d attributes, more than the 64")


def test_hostile_npy(seeds, readers, tmp_path):
    read = readers["candidate_npy"]
    raw = seeds["candidate_npy"].read_bytes()
    for label, data in {"cut": raw[:-4], "long": raw + b"\0" * 8, "header": raw[:20],
                        "huge": raw.replace(b"(1, ", b"(9999999, ", 1), "pickle": raw.replace(b"'<f4'", b"'|O'", 1)}.items():
        case = tmp_path / label / seeds["candidate_npy"].name
        case.parent.mkdir()
        case.write_bytes(data)
        assert_documented(read, case, CompareError)


@pytest.mark.parametrize("size, stride, message", [
    ((2, 1), (1, 2 ** 70), None),  # the stride of a size-1 dimension is never used: loads
    ((2, 2), (1, 2 ** 70), "reaches element"),
    ((0, 2 ** 40, 2 ** 40), (1, 1, 1), "more than 1099511627776"),
    ((2 ** 40, 0), (1, 1), None),
])
def test_checkpoint_strides_and_sizes(tmp_path, size, stride, message):
    pkl = p_pickle(p_dict([("w", p_tensor(p_storage("FloatStorage", "0", 4), 0, size, stride))]))
    path = write_zip(tmp_path / "c.pth", pkl, [("0", np.zeros(4, "<f4").tobytes())])
    if message is None:
        assert load_state_dict(path)["w"].shape == size
    else:
        assert_documented(load_state_dict, path, WeightsError, message)


def test_checkpoint_huge_offset(tmp_path):
    pkl = p_pickle(p_dict([("w", p_tensor(p_storage("FloatStorage", "0", 4), 2 ** 70, (1,), (1,)))]))
    path = write_zip(tmp_path / "c.pth", pkl, [("0", np.zeros(4, "<f4").tobytes())])
    assert_documented(load_state_dict, path, WeightsError, "reaches element")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_pixel_limit(tmp_path):
    """A 13000 x 13000 PNG header (a few hundred bytes here; 500 KB with its zlib data) is
    refused from its header, before any pixel is decoded."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    side = 13000
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    (tmp_path / "big.png").write_bytes(png)
    assert side * side > MAX_IMAGE_PIXELS
    assert_documented(read_image, tmp_path / "big.png", ImageError, "more than the")


def test_onnx_scope_metadata_of_any_type():
    import onnx

    from refghost.runtimes.mapping import _onnx_scope as _scope

    for value in ("5", "[1, 2]", "{'a': 1}", "[[]]", "[7, 'a']", "(" * 200 + ")" * 200, "\xff", "None"):
        node = onnx.helper.make_node("Relu", ["x"], ["y"], name="r")
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=value)
        assert _scope(node) is None
    node = onnx.helper.make_node("Relu", ["x"], ["y"], name="r")
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'blocks.6', 'relu']")
    assert _scope(node) == "blocks.6"


# --------------------------------------------------------------------------------------------
# Arguments: exit 2, one line, no traceback, before any work
# --------------------------------------------------------------------------------------------
#: The one refusal that needs a file first: --batch times the input size the weights record.
WORK_BEFORE_REFUSING = {"more than 1048576": [("h5py.File", os.fspath(DEFAULT_WEIGHTS))]}


def _record_work(monkeypatch) -> list:
    """A list that records the work started from here on: every HDF5 file opened (weights,
    goldens, candidates, outputs), every .npy/.npz read (refghost reads them with
    ``safe_io.read_npy``/``read_npz``) and every model run in a runtime."""
    from refghost import runtimes, safe_io

    work = []
    h5_open = h5py.File.__init__

    def opened(f, name, *args, **kwargs):
        if isinstance(name, (str, bytes, os.PathLike)):  # (not h5py re-wrapping an open file's id)
            work.append(("h5py.File", os.fsdecode(name)))
        return h5_open(f, name, *args, **kwargs)

    def recording(module, name):
        original = getattr(module, name)

        def call(path, *args, **kwargs):
            work.append((name, os.fspath(path)))
            return original(path, *args, **kwargs)

        monkeypatch.setattr(module, name, call)

    monkeypatch.setattr(h5py.File, "__init__", opened)
    for module, name in ((safe_io, "read_npy"), (safe_io, "read_npz"), (runtimes, "run_model")):
        recording(module, name)
    return work


@pytest.mark.parametrize("argv, message", [
    ("golden --seed -1 --out {tmp}/g.h5", "--seed must be >= 0"),
    ("golden --seed 0 --batch -1 --out {tmp}/g.h5", "--batch must be >= 1"),
    ("golden --seed 0 --batch 100000 --out {tmp}/g.h5", "more than 1048576"),
    ("golden --seed 0 --out {tmp}/missing/g.h5", "does not exist"),
    ("golden --seed 0 --out {tmp}", "is a directory"),
    ("golden --seed 0 --out /proc/version", "cannot write"),
    ("convert {tmp}/x.npz --width 1e308 --out {tmp}/w.h5", "--width must be"),
    ("convert {tmp}/x.npz --width nan --out {tmp}/w.h5", "--width must be"),
    ("convert {tmp}/x.npz --out {tmp}/missing/w.h5", "does not exist"),
    ("compare {golden} {golden} --atol nan", "--atol must be a finite number"),
    ("compare {golden} {golden} --atol -1", "--atol must be a finite number"),
    ("compare {golden} {golden} --rtol inf", "--rtol must be a finite number"),
    ("compare {golden} {golden} --threads 100000", "--threads must be in"),
    ("compare {golden} {golden} --threads 0", "--threads must be in"),
    ("compare {golden} {golden} --json {tmp}/missing/r.json", "does not exist"),
    ("run --out {tmp}/r.txt", "ending in .npz"),
    ("export {golden} --out {tmp}", "is a directory"),
    ("export {golden} --out {tmp}/w.txt", "ending in .npz or .pth or .pt"),
    ("dump {golden} {golden} --out {tmp}/d.txt", "dumps are written as .npz"),
    ("dump {golden} {golden} --out {tmp}/d.npz --threads 0", "--threads must be in"),
    ("map {golden} --threads -3", "--threads must be in"),
])
def test_bad_arguments_exit_2_in_one_line(seeds, tmp_path, capsys, monkeypatch, argv, message):
    args = argv.format(tmp=tmp_path, golden=seeds["golden"]).split()
    work = _record_work(monkeypatch)
    assert main(args) == 2
    err = capsys.readouterr().err
    # refused before any work: no file opened (but the weights' metadata where the check needs
    # their input size), no model run
    assert work == WORK_BEFORE_REFUSING.get(message, []), work
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not any(tmp_path.rglob("*.h5")) and not any(tmp_path.rglob(f"*{TEMP_MARKER}*"))


def test_cli_hostile_file_exits_2_without_traceback(seeds, tmp_path):
    case = _edit(seeds["weights"], tmp_path / "w.h5", _replace("conv_stem.weight", external=[("/etc/passwd", 0, 1728)]))
    proc = subprocess.run([sys.executable, "-m", "refghost", "info", os.fspath(case)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert proc.returncode == 2 and "external file" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


# --------------------------------------------------------------------------------------------
# Kills: a write killed mid-way leaves a temporary file that the next write removes
# --------------------------------------------------------------------------------------------
def test_killed_write_is_cleaned_by_the_next_one(tmp_path):
    out = tmp_path / "g.h5"
    script = textwrap.dedent(f"""
        import sys, time
        from refghost.atomic import atomic_path
        with atomic_path({os.fspath(out)!r}) as tmp:
            open(tmp, "wb").write(b"x" * 4096)
            print(tmp, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    tmp = proc.stdout.readline().strip()
    assert os.path.exists(tmp) and TEMP_MARKER in tmp and str(proc.pid) in tmp
    # while the writer lives, another write leaves its file alone
    with atomic_path(out) as mine:
        open(mine, "wb").write(b"first")
    assert os.path.exists(tmp)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert os.path.exists(tmp)
    # files that only look similar are never touched
    lookalikes = [tmp_path / ".g.h5.refghost-notapid-0123456789abcdef.tmp", tmp_path / ".other.h5.tmp",
                  tmp_path / f".g.h5.{TEMP_MARKER}-{proc.pid}-0123.tmp"]
    for path in lookalikes:
        path.write_bytes(b"keep")
    with atomic_path(out) as mine:
        open(mine, "wb").write(b"second")
    assert not os.path.exists(tmp) and out.read_bytes() == b"second"
    assert all(path.read_bytes() == b"keep" for path in lookalikes)


def test_fuzz_tool_prints_counts_per_reader():
    """tools/fuzz.py, briefly: every reader gets its cases, none another exception or a hang.

    ``--cases`` fixes the work (3 cases per reader, the same mutants for ``--seed 3``) instead of a
    run time: a run of a few seconds on a loaded machine used to leave a reader with no case at all
    (the spawned worker's imports alone can take that long). ``--timeout`` is a safety net for a
    real hang, not a speed requirement: 120 s for one case of a file of at most 11 MB."""
    tool = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "fuzz.py")
    proc = subprocess.run([sys.executable, tool, "--cases", "3", "--seed", "3", "--timeout", "120"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:] if line and not line[0].isspace()}
    assert set(rows) == set(fuzz.KINDS)
    for kind, row in rows.items():
        cases, byte, structural, documented, ok, other, hangs = map(int, row[1:8])
        assert cases == 3 == byte + structural == documented + ok and other == 0 and hangs == 0, row
