"""refghost.convert.checkpoint: PyTorch checkpoints read without torch, identical to torch.load, safely."""

import argparse
import collections
import os
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch_ghostnet as tg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refghost.convert.checkpoint import load_state_dict
from refghost.errors import WeightsError

LEGACY = {"_use_new_zipfile_serialization": False}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def torch_tensors(obj):
    """What refghost should return for a torch.load result: unwrap, keep tensors, as NumPy."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return {k: v.detach().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def assert_identical(got, expected):
    assert list(got) == list(expected)
    for key in expected:
        a, b = got[key], expected[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert a.flags.c_contiguous, key
        assert a.tobytes() == np.ascontiguousarray(b).tobytes(), key  # bit-identical, NaN-safe


def assert_same_as_torch(path, weights_only=True):
    """(weights_only=False only for files the test itself wrote from trusted objects.)"""
    assert_identical(load_state_dict(path), torch_tensors(torch.load(path, weights_only=weights_only)))


@pytest.fixture(scope="module")
def ghostnet_sd():
    return tg.randomize(tg.build("nanodet", 0.5, "ReLU"), seed=1).state_dict()


# A tiny pickle assembler for hand-made hostile files (protocol 2 opcodes).
def p_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def p_int(n):
    if -(2 ** 31) <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def p_tuple(*items):
    return b"(" + b"".join(items) + b"t"


def p_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def p_call(func, *args):
    return func + p_tuple(*args) + b"R"


def p_dict(items):
    return b"}(" + b"".join(p_str(k) + v for k, v in items) + b"u"


def p_storage(stype, key, numel):
    return p_tuple(p_str("storage"), p_global("torch", stype), p_str(key), p_str("cpu"), p_int(numel)) + b"Q"


def p_tensor(storage, offset, size, stride):
    hooks = p_global("collections", "OrderedDict") + b")R"
    return p_call(p_global("torch._utils", "_rebuild_tensor_v2"), storage, p_int(offset),
                  p_tuple(*map(p_int, size)), p_tuple(*map(p_int, stride)), b"\x89", hooks)


def p_pickle(body):
    return b"\x80\x02" + body + b"."


def write_zip(path, pkl, records=(), folder="archive", byteorder="little", compress=False):
    """A torch.save-style zip: <folder>/data.pkl, <folder>/byteorder, <folder>/data/<key>..."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are written on purpose in one test
        with zipfile.ZipFile(path, "w", method) as zf:
            zf.writestr(f"{folder}/data.pkl", pkl)
            zf.writestr(f"{folder}/byteorder", byteorder)
            for key, data in records:
                zf.writestr(f"{folder}/data/{key}", data)
            zf.writestr(f"{folder}/version", "3\n")
    return path


def floats(*values):
    return np.asarray(values, dtype="<f4").tobytes()


# --------------------------------------------------------------------------------------------
# same results as torch.load
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, LEGACY, {"pickle_protocol": 5}], ids=["zip", "legacy", "protocol5"])
def test_plain_ghostnet_state_dict(tmp_path, ghostnet_sd, options):
    path = tmp_path / "sd.pth"
    torch.save(ghostnet_sd, path, **options)
    got = load_state_dict(path)
    assert len(got) == len(ghostnet_sd) and got["blocks.0.0.ghost1.primary_conv.0.weight"].dtype == np.float32
    assert_same_as_torch(path, weights_only="pickle_protocol" not in options)  # torch's can't read protocol 5


class Config(dict):
    """A yacs-like config: a dict subclass with attributes (pickled by NEWOBJ, SETITEMS, BUILD)."""


class Milestones(list):
    """A list subclass (pickled with APPENDS)."""


class Evil:
    """Creates a marker file when unpickled by a trusting loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_lightning_checkpoint_with_ema_optimizer_and_foreign_objects(tmp_path, ghostnet_sd, legacy):
    model = tg.randomize(tg.build("nanodet", 0.5, "ReLU"), seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.5)
    optimizer.step()  # real AdamW state: step, exp_avg, exp_avg_sq tensors
    multistep = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[240, 260], gamma=0.1)
    state = {f"model.backbone.{k}": v for k, v in ghostnet_sd.items()}
    state.update({f"avg_model.backbone.{k}": v for k, v in model.state_dict().items()})
    cfg = Config(model={"arch": "NanoDetPlus"}, milestones=Milestones([1, 2]))
    cfg.save_dir = "workspace"
    marker = tmp_path / "ran"
    checkpoint = {
        "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.9.5",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'mAP'}": {"best_model_score": torch.tensor(0.25),
                                                            "best_model_path": "model_best.ckpt"}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [multistep.state_dict()],
        "hparams_name": "cfg",
        "hyper_parameters": {"cfg": cfg, "args": argparse.Namespace(seed=7), "tags": {"a", "b"},
                             "counts": collections.Counter("aab"), "blob": b"\x00\x01", "c": 1 + 2j},
    }
    options = LEGACY if legacy else {}
    torch.save(checkpoint, tmp_path / "trusted.ckpt", **options)
    assert_same_as_torch(tmp_path / "trusted.ckpt", weights_only=False)  # written here from trusted objects

    checkpoint["hyper_parameters"]["evil"] = Evil(marker)
    torch.save(checkpoint, tmp_path / "model_best.ckpt", **options)
    got = load_state_dict(tmp_path / "model_best.ckpt")
    assert not marker.exists()
    assert list(got)[0].startswith("model.backbone.") and list(got)[-1].startswith("avg_model.backbone.")
    assert_identical(got, torch_tensors(checkpoint))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_views_dtypes_scalars_and_parameters(tmp_path, legacy):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tagged = torch.linspace(0, 1, 5)
    tagged.note = "an attribute: pickled through _rebuild_from_type_v2"
    sd = collections.OrderedDict([
        ("slice", base[2:5, 1::3]),            # non-zero offset, non-contiguous strides
        ("transposed", base.t()),
        ("row", base[3]),
        ("element", base[1, 2]),              # 0-d view
        ("again", base[2:5, 1::3]),           # same view of the same storage
        ("float64", torch.randn(3, 4, dtype=torch.float64)[:, 1:]),
        ("num_batches_tracked", torch.tensor(7)),
        ("int32", torch.tensor([1, -2, 3], dtype=torch.int32)),
        ("uint8", torch.tensor([0, 255], dtype=torch.uint8)),
        ("bool", torch.tensor([True, False])),
        ("empty", torch.zeros(0, 3)),
        ("parameter", torch.nn.Parameter(torch.randn(2, 2))),
        ("tagged", tagged),
        ("not_a_tensor", 3.5),
    ])
    path = tmp_path / "views.pt"
    torch.save(sd, path, **(LEGACY if legacy else {}))
    got = load_state_dict(path)
    assert "not_a_tensor" not in got and got["num_batches_tracked"].dtype == np.int64
    assert got["num_batches_tracked"].shape == () and got["element"].shape == ()
    assert_same_as_torch(path)


def test_nan_and_inf_load_unchanged(tmp_path):
    w = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    torch.save({"w": w, "d": w.double()}, tmp_path / "nan.pth")
    assert_same_as_torch(tmp_path / "nan.pth")


def test_crc_free_big_endian_and_renamed_folder(tmp_path):
    """Records without CRCs (set_crc32_options(False)), a big-endian writer, any folder name."""
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.randn(4, 3)}, tmp_path / "nocrc.pth")
    finally:
        torch.serialization.set_crc32_options(True)
    assert_same_as_torch(tmp_path / "nocrc.pth")

    values = np.array([1.5, -2.25, 3e-3], dtype=">f8")
    pkl = p_pickle(p_dict([("w", p_tensor(p_storage("DoubleStorage", "0", 3), 0, (3,), (1,)))]))
    got = load_state_dict(write_zip(tmp_path / "be.pth", pkl, [("0", values.tobytes())], folder="weird name",
                                    byteorder="big"))
    assert got["w"].dtype == np.float64 and got["w"].dtype.isnative
    np.testing.assert_array_equal(got["w"], values)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_views_match_torch(tmp_path, data):
    shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    t = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape)
    index = tuple(slice(data.draw(st.integers(0, n - 1)), None, data.draw(st.integers(1, 3))) for n in shape)
    view = t[index]
    if view.dim() > 1 and data.draw(st.booleans()):
        view = view.transpose(0, -1)
    torch.save({"v": view, "t": t}, tmp_path / "v.pth")
    assert_same_as_torch(tmp_path / "v.pth")


def test_needs_no_torch(tmp_path, ghostnet_sd):
    torch.save({"state_dict": {f"model.{k}": v for k, v in ghostnet_sd.items()}}, tmp_path / "m.ckpt")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from refghost.convert.checkpoint import load_state_dict\n"
            f"print(len(load_state_dict({str(tmp_path / 'm.ckpt')!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(ghostnet_sd)


# --------------------------------------------------------------------------------------------
# hostile and broken input
# --------------------------------------------------------------------------------------------
def test_os_system_is_never_called(tmp_path):
    marker = tmp_path / "ran"
    call = p_call(p_global("os", "system"), p_str(f"touch {marker}"))
    path = write_zip(tmp_path / "evil.pth", p_pickle(p_dict([("w", call)])))
    with pytest.raises(WeightsError, match=r"evil\.pth: refuses global os\.system: key 'w'"):
        load_state_dict(path)
    # the object itself, and getattr(__import__('os'), 'system')(...) chains
    chain = p_call(p_call(p_global("builtins", "getattr"),
                          p_call(p_global("builtins", "__import__"), p_str("os")), p_str("system")),
                   p_str(f"touch {marker}"))
    with pytest.raises(WeightsError, match=r"refuses global os\.system: the checkpoint is not a state_dict"):
        load_state_dict(write_zip(tmp_path / "evil2.pth", p_pickle(call)))
    with pytest.raises(WeightsError, match=r"refuses global builtins\.getattr: key 'w'"):
        load_state_dict(write_zip(tmp_path / "evil3.pth", p_pickle(p_dict([("w", chain)]))))
    assert not marker.exists()


def test_evil_object_in_a_legacy_file(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": Evil(marker)}, tmp_path / "evil.pth", **LEGACY)
    with pytest.raises(WeightsError, match=r"refuses global posix\.system: key 'x'"):
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_stand_ins_outside_the_state_dict_are_inert(tmp_path):
    """Refused globals elsewhere in the checkpoint are recorded, never called: the state_dict loads."""
    marker = tmp_path / "ran"
    evil = p_call(p_global("os", "system"), p_str(f"touch {marker}"))
    newobj = p_global("omegaconf", "DictConfig") + p_tuple() + b"\x81" + p_dict([("x", evil)]) + b"b"
    sd = p_dict([("w", p_tensor(p_storage("FloatStorage", "0", 2), 0, (2,), (1,)))])
    pkl = p_pickle(p_dict([("state_dict", sd), ("hyper_parameters", newobj), ("evil", evil)]))
    got = load_state_dict(write_zip(tmp_path / "m.ckpt", pkl, [("0", floats(1, 2))]))
    np.testing.assert_array_equal(got["w"], [1, 2])
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.6, 0.9, 0.99])
def test_truncated_zip(tmp_path, ghostnet_sd, keep):
    torch.save(ghostnet_sd, tmp_path / "sd.pth")
    raw = (tmp_path / "sd.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[:max(4, int(len(raw) * keep))])
    with pytest.raises(WeightsError, match=r"cut\.pth: (truncated or corrupt zip|not a PyTorch checkpoint)"):
        load_state_dict(tmp_path / "cut.pth")


def test_truncated_legacy_file(tmp_path, ghostnet_sd):
    torch.save(ghostnet_sd, tmp_path / "sd.pth", **LEGACY)
    raw = (tmp_path / "sd.pth").read_bytes()
    for keep in (0.5, 0.999):
        (tmp_path / "cut.pth").write_bytes(raw[:int(len(raw) * keep)])
        with pytest.raises(WeightsError, match="truncated legacy checkpoint|corrupt pickle"):
            load_state_dict(tmp_path / "cut.pth")


@pytest.mark.parametrize("offset, size, stride, message", [
    (0, (4,), (1,), r"key 'w': shape \[4\] with strides \[1\] at offset 0 reaches element 3, but its storage "
                    r"holds 3 elements"),
    (3, (1,), (1,), "reaches element 3"),
    (0, (2, 2), (1, 2), "reaches element 3"),
    (0, (2 ** 40, 2 ** 40), (1, 2 ** 40), "reaches element"),
    (0, (2 ** 31, 2 ** 31), (0, 0), r"has 4611686018427387904 elements but its storage holds 3; refusing"),
])
def test_tensor_past_its_storage_or_too_large(tmp_path, offset, size, stride, message):
    pkl = p_pickle(p_dict([("w", p_tensor(p_storage("FloatStorage", "0", 3), offset, size, stride))]))
    with pytest.raises(WeightsError, match=message):
        load_state_dict(write_zip(tmp_path / "t.pth", pkl, [("0", floats(1, 2, 3))]))


def test_storage_record_size_disagrees(tmp_path):
    pkl = p_pickle(p_dict([("w", p_tensor(p_storage("FloatStorage", "0", 2 ** 40), 0, (3,), (1,)))]))
    with pytest.raises(WeightsError, match=r"storage record 'archive/data/0' holds 12 bytes but the pickle "
                                           r"declares 1099511627776 x torch.float32"):
        load_state_dict(write_zip(tmp_path / "t.pth", pkl, [("0", floats(1, 2, 3))]))
    with pytest.raises(WeightsError, match=r"storage record 'archive/data/0' is missing"):
        load_state_dict(write_zip(tmp_path / "t2.pth", pkl))


def test_overlapping_views_cannot_multiply_memory(tmp_path):
    storage = p_storage("FloatStorage", "0", 1000)
    items = [(f"v{i}", p_tensor(storage, i, (1000 - i,), (1,))) for i in range(5)]
    with pytest.raises(WeightsError, match="more than twice the 4000 bytes"):
        load_state_dict(write_zip(tmp_path / "t.pth", p_pickle(p_dict(items)), [("0", bytes(4000))]))


def test_duplicate_zip_entries(tmp_path):
    pkl = p_pickle(p_dict([("w", p_tensor(p_storage("FloatStorage", "0", 1), 0, (1,), (1,)))]))
    path = write_zip(tmp_path / "dup.pth", pkl, [("0", floats(1)), ("0", floats(666))])
    with pytest.raises(WeightsError, match=r"holds 'archive/data/0' more than once"):
        load_state_dict(path)


@pytest.mark.parametrize("stype", ["QInt8Storage", "EvilStorage", "UntypedStorage"])
def test_unknown_storage_type(tmp_path, stype):
    pkl = p_pickle(p_dict([("w", p_tensor(p_storage(stype, "0", 1), 0, (1,), (1,)))]))
    with pytest.raises(WeightsError, match=rf"unknown storage type torch\.{stype}"):
        load_state_dict(write_zip(tmp_path / "t.pth", pkl, [("0", b"\x00")]))


def test_half_precision_refused_only_where_returned(tmp_path):
    torch.save({"w": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf.pth")
    with pytest.raises(WeightsError, match=r"key 'w' is torch\.bfloat16; refghost reads float32/float64"):
        load_state_dict(tmp_path / "bf.pth")
    torch.save({"state_dict": {"w": torch.ones(2)}, "scaler": torch.ones(2, dtype=torch.float16)},
               tmp_path / "amp.ckpt")
    assert_same_as_torch(tmp_path / "amp.ckpt")


def test_compressed_records_refused(tmp_path):
    pkl = p_pickle(p_dict([("w", p_tensor(p_storage("FloatStorage", "0", 1), 0, (1,), (1,)))]))
    with pytest.raises(WeightsError, match="is compressed"):
        load_state_dict(write_zip(tmp_path / "z.pth", pkl, [("0", floats(1))], compress=True))


@pytest.mark.parametrize("content, message", [
    (b"", "not a PyTorch checkpoint"),
    (b"not a checkpoint", "not a PyTorch checkpoint"),
    (b"\x80\x02K\x07.", "not a PyTorch checkpoint .* no magic number"),
    (os.urandom(64), "not a PyTorch checkpoint"),
    (b"\x80\x05\x96" + struct.pack("<Q", 2 ** 60) + b"xx", "not a PyTorch checkpoint .* cut short"),
])
def test_not_a_checkpoint(tmp_path, content, message):
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        load_state_dict(tmp_path / "x.pth")


def test_pickle_lengths_and_memo_indices_cannot_allocate(tmp_path):
    """Declared lengths and memo indices in the pickle are never allocated up front."""
    huge_memo = b"]r\xff\xff\xff\xff"  # LONG_BINPUT 2**32 - 1 (CPython's C unpickler sizes its memo by it)
    with pytest.raises(WeightsError, match="found list"):
        load_state_dict(write_zip(tmp_path / "memo.pth", p_pickle(huge_memo)))
    huge_bytes = b"\x8e" + struct.pack("<Q", 2 ** 62) + b"abc"  # BINBYTES8
    with pytest.raises(WeightsError, match="corrupt pickle"):
        load_state_dict(write_zip(tmp_path / "bytes.pth", p_pickle(huge_bytes)))


def test_pickle_cannot_tamper_with_the_loader(tmp_path):
    """BUILD (set state) on refghost's own functions or tensor records is refused."""
    func = p_global("torch._utils", "_rebuild_tensor_v2")
    with pytest.raises(WeightsError, match="sets the state of a function"):
        load_state_dict(write_zip(tmp_path / "f.pth", p_pickle(func + p_dict([("x", p_int(1))]) + b"b")))
    tensor = p_tensor(p_storage("FloatStorage", "0", 3), 0, (3,), (1,))
    negative_offset = tensor + p_tuple(b"N", p_dict([("offset", p_int(-3))])) + b"b"
    with pytest.raises(WeightsError, match="sets the state of a _Tensor"):
        load_state_dict(write_zip(tmp_path / "t.pth", p_pickle(p_dict([("w", negative_offset)])),
                                  [("0", floats(1, 2, 3))]))


def test_whole_pickled_model_is_refused(tmp_path):
    torch.save(tg.build("nanodet", 0.5, "ReLU"), tmp_path / "model.pth")
    with pytest.raises(WeightsError, match=r"refuses global torch_ghostnet\.NanoDetGhostNet: the checkpoint is "
                                           r"not a state_dict .* save model\.state_dict\(\) instead"):
        load_state_dict(tmp_path / "model.pth")


def test_broken_archives(tmp_path):
    with zipfile.ZipFile(tmp_path / "nopkl.pth", "w") as zf:
        zf.writestr("archive/other.txt", "hello")
    with pytest.raises(WeightsError, match=r"no <folder>/data\.pkl"):
        load_state_dict(tmp_path / "nopkl.pth")
    with pytest.raises(WeightsError, match="corrupt pickle"):
        load_state_dict(write_zip(tmp_path / "garbage.pth", b"\x80\x02}q\x00(X\xff\xff\xff\xff"))
    with pytest.raises(WeightsError, match=r"unknown byte order 'middle'"):
        load_state_dict(write_zip(tmp_path / "bo.pth", p_pickle(p_dict([])), byteorder="middle"))
    with pytest.raises(WeightsError, match="expected a state_dict .* found list"):
        load_state_dict(write_zip(tmp_path / "list.pth", p_pickle(b"]")))
    with pytest.raises(WeightsError, match="no such file|cannot open"):
        load_state_dict(tmp_path / "missing.pth")
