"""Hostile-file fuzzing of refghost's readers: seed files, mutations, and one verdict per case.

Shared by ``tests/test_fuzz.py`` (Hypothesis, bounded for CI) and ``tools/fuzz.py`` (a long
random-mutation loop with hang and memory accounting). A reader passes a case when it returns
or raises a :class:`~refghost.errors.RefghostError`; anything else is a bug.

Readers (``READERS``): ``weights`` (:func:`refghost.weights.load_weights`), ``golden``
(:func:`refghost.verify.golden.read_golden`), ``candidate_npz``/``candidate_h5``/``candidate_npy``
(:func:`refghost.verify.candidates.load_candidate` against the seed golden), ``checkpoint``
(:func:`refghost.convert.checkpoint.load_state_dict`) and ``state_dict_npz``
(:func:`refghost.convert.state_dict.read_state_dict`).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np

from ..errors import RefghostError

SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "ghostnet_nanodet_1.0x.h5"
#: The seed golden: a narrow NanoDet GhostNet on a small seeded input, with its first
#: intermediates (every group and kind of dataset; read in a tenth of a second).
SEED_WIDTH = 0.25
SEED_INPUT = (1, 3, 32, 32)
SEED_INTERMEDIATES = 8

KINDS = ("weights", "golden", "candidate_npz", "candidate_h5", "candidate_npy", "checkpoint", "state_dict_npz")
SUFFIX = {"weights": ".h5", "golden": ".h5", "candidate_npz": ".npz", "candidate_h5": ".h5",
          "candidate_npy": ".npy", "checkpoint": ".pth", "state_dict_npz": ".npz"}


def make_seeds(folder) -> dict[str, Path]:
    """Write one valid seed file per kind into ``folder``; returns ``{kind: path}``."""
    from ..arch import Config
    from ..verify.golden import make_golden, write_golden
    from ..weights import from_tensors, save_weights
    from . import random_params
    from ..arch import build_graph

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = {"weights": folder / "weights.h5"}
    shutil.copyfile(SHIPPED_WEIGHTS, seeds["weights"])
    config = Config(width=SEED_WIDTH)
    weights = from_tensors(random_params(build_graph(config), seed=0), config)
    save_weights(folder / "small_weights.h5", weights)
    x = np.random.default_rng(0).standard_normal(SEED_INPUT).astype(np.float32)
    golden = make_golden(weights, x, intermediates=True, input_source="fuzz seed")
    # every group and kind of tensor, but few of them: the first layers' intermediates only
    # (and the output layers, so that every output is in golden.tensors())
    ends = set(weights.graph.outputs.values())
    kept = [k for i, k in enumerate(golden.intermediates) if i < SEED_INTERMEDIATES or k in ends]
    golden.intermediates = {k: golden.intermediates[k] for k in kept}
    golden.bounds = {k: v for k, v in golden.bounds.items() if k in kept or k in golden.outputs}
    seeds["golden"] = folder / "golden.h5"
    write_golden(seeds["golden"], golden)
    tensors = golden.tensors()
    seeds["candidate_npz"] = folder / "candidate.npz"
    np.savez_compressed(seeds["candidate_npz"], **{k: v.astype(np.float32) for k, v in tensors.items()})
    seeds["candidate_h5"] = folder / "candidate.h5"
    import h5py

    with h5py.File(seeds["candidate_h5"], "w") as f:
        for name in golden.outputs:
            f.create_dataset(f"outputs/{name}", data=golden.outputs[name].astype(np.float32))
        for i, (name, value) in enumerate(golden.intermediates.items()):
            f.create_dataset(f"intermediates/{name}", data=value.astype(np.float32),
                             compression="gzip" if i % 2 else None)
    seeds["candidate_npy"] = folder / "blocks.9.npy"
    last = list(golden.outputs)[-1]
    np.save(seeds["candidate_npy"], golden.outputs[last].astype(np.float32))
    seeds["state_dict_npz"] = folder / "state_dict.npz"
    np.savez(seeds["state_dict_npz"], **dict(list(weights.tensors.items())[:40]))
    seeds["checkpoint"] = folder / "checkpoint.pth"
    _write_checkpoint(seeds["checkpoint"], dict(list(weights.tensors.items())[:12]))
    return seeds


def _write_checkpoint(path, tensors: dict) -> None:
    """A torch.save-format zip checkpoint of ``tensors``, written without PyTorch (protocol 2)."""
    import struct
    import zipfile

    def p_str(s):
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def p_int(n):
        return b"J" + struct.pack("<i", n)

    def p_tuple(items):
        return b"(" + b"".join(items) + b"t"

    items, records = [], []
    for i, (key, value) in enumerate(tensors.items()):
        value = np.ascontiguousarray(value, dtype="<f4")
        storage = p_tuple([p_str("storage"), b"ctorch\nFloatStorage\n", p_str(str(i)), p_str("cpu"),
                           p_int(value.size)]) + b"Q"
        strides = [int(s // 4) for s in value.strides]
        hooks = b"ccollections\nOrderedDict\n)R"
        tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n" + p_tuple(
            [storage, p_int(0), p_tuple([p_int(n) for n in value.shape]), p_tuple([p_int(s) for s in strides]),
             b"\x89", hooks]) + b"R")
        items.append(p_str(key) + tensor)
        records.append((str(i), value.tobytes()))
    pkl = b"\x80\x02" + b"ccollections\nOrderedDict\n)R(" + b"".join(items) + b"u."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in records:
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")


def reader(kind: str, seeds: dict):
    """``read(path)`` for ``kind``: calls the refghost reader and returns nothing."""
    if kind == "weights":
        from ..weights import load_weights

        return load_weights
    if kind == "golden":
        from ..verify.golden import read_golden

        return read_golden
    if kind.startswith("candidate_"):
        from ..verify.candidates import load_candidate
        from ..verify.golden import read_golden

        golden = read_golden(seeds["golden"])
        maps = {"blocks.9": "blocks.9"} if kind == "candidate_npy" else None  # the .npy seed's name
        return lambda path: load_candidate(path, golden, maps=maps)
    if kind == "checkpoint":
        from ..convert.checkpoint import load_state_dict

        return load_state_dict
    if kind == "state_dict_npz":
        from ..convert.state_dict import read_state_dict

        return read_state_dict
    raise ValueError(kind)


def verdict(read, path) -> tuple[str, str]:
    """``("ok" | "documented" | "other", detail)`` of one reader call."""
    try:
        read(path)
    except RefghostError as exc:
        return "documented", str(exc)
    except Exception as exc:  # noqa: BLE001 - this is what the fuzzer counts
        return "other", f"{type(exc).__name__}: {exc}"
    return "ok", ""


# ------------------------------------------------------------------------------------------------
# mutations
# ------------------------------------------------------------------------------------------------
_INTERESTING = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)


def mutate_bytes(data: bytes, rng: random.Random, edits: int | None = None) -> bytes:
    """A byte-level mutant: bit flips, interesting bytes, 8-byte integers, cuts and copies.

    Positions favour the first 64 KiB and the last 4 KiB (where HDF5 superblocks, object
    headers and zip directories live) but can be anywhere.
    """
    buf = bytearray(data)
    for _ in range(edits if edits is not None else rng.choice((1, 1, 1, 2, 3, 8))):
        if not buf:
            break
        roll = rng.random()
        if roll < 0.45:
            pos = rng.randrange(min(len(buf), 65536))
        elif roll < 0.6:
            pos = max(0, len(buf) - 1 - rng.randrange(min(len(buf), 4096)))
        else:
            pos = rng.randrange(len(buf))
        op = rng.randrange(6)
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.choice(_INTERESTING)
        elif op == 2:
            value = rng.choice((0, 1, 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 40, 2 ** 63 - 1, 2 ** 64 - 1,
                                rng.getrandbits(64)))
            buf[pos:pos + 8] = value.to_bytes(8, "little")[: len(buf) - pos]
        elif op == 3:
            del buf[rng.randrange(len(buf)):]
        elif op == 4:
            n = rng.randrange(1, 64)
            src = rng.randrange(len(buf))
            buf[pos:pos + n] = buf[src:src + n]
        else:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(buf)


def _h5_objects(f):
    import h5py

    out = []
    f.visititems(lambda name, obj: out.append((name, obj)) if isinstance(obj, (h5py.Dataset, h5py.Group)) else None)
    return out


def _random_attr_value(rng: random.Random):
    import h5py

    choices = [
        lambda: "abc", lambda: np.bytes_(b"\xff\xfe\x80"), lambda: np.array(["a", "b"], dtype=h5py.string_dtype()),
        lambda: np.float64("nan"), lambda: np.float64("inf"), lambda: -1, lambda: 2 ** 62,
        lambda: np.array([1e9, 1e9]), lambda: np.array([10 ** 9, 10 ** 9]), lambda: np.array([np.nan, 1.0, 2.0]),
        lambda: np.array([1.0, np.inf, 0.0]), lambda: np.zeros((3, 3)), lambda: np.array([], dtype=np.int64),
        lambda: np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]), lambda: 0, lambda: 1.5, lambda: True,
        lambda: np.zeros(20000), lambda: "x" * rng.randrange(1, 200_000),
        lambda: np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
    ]
    return rng.choice(choices)()


def mutate_structure(src, dst, rng: random.Random) -> str:
    """Copy HDF5 file ``src`` to ``dst`` and apply one structural edit; returns its description.

    Edits: attributes of the wrong type or value, datasets turned into groups and back, wrong
    dtypes and shapes, extra never-written, huge, chunked or compressed datasets, soft and
    external links, external storage, deleted objects.
    """
    import h5py

    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        try:
            return _edit_structure(f, src, rng)
        except Exception as exc:  # noqa: BLE001 - h5py refused the edit (e.g. an attribute too large)
            return f"edit failed half-way ({type(exc).__name__})"


def _edit_structure(f, src, rng: random.Random) -> str:
    import h5py

    objects = _h5_objects(f)
    groups = [f] + [o for _, o in objects if isinstance(o, h5py.Group)]
    datasets = [(n, o) for n, o in objects if isinstance(o, h5py.Dataset)]
    group = rng.choice(groups)
    edit = rng.randrange(13)
    if edit == 0:  # an attribute of the wrong type/value
        target = rng.choice(groups)
        names = list(target.attrs) or ["format"]
        name = rng.choice(names + ["format", "schema_version", "input_size", "input_mean"])
        value = _random_attr_value(rng)
        target.attrs[name] = value
        return f"attr {target.name}:{name} = {type(value).__name__}"
    if edit == 1 and datasets:  # dataset -> group
        name, _ = rng.choice(datasets)
        del f[name]
        f.create_group(name)
        return f"dataset {name} -> group"
    if edit == 2 and len(groups) > 1:  # group -> dataset
        target = rng.choice(groups[1:])
        name = target.name
        del f[name]
        f.create_dataset(name, data=np.zeros(3))
        return f"group {name} -> dataset"
    if edit == 3 and datasets:  # wrong dtype
        name, ds = rng.choice(datasets)
        data = ds[()]
        del f[name]
        dtype = rng.choice(["f2", "i4", "u1", "c8", ">f4", "f8", "f4", "S4"])
        f.create_dataset(name, data=np.zeros(data.shape, dtype=dtype))
        return f"dataset {name} dtype {dtype}"
    if edit == 4 and datasets:  # wrong shape
        name, ds = rng.choice(datasets)
        del f[name]
        shape = tuple(rng.randrange(0, 5) for _ in range(rng.randrange(0, 5)))
        f.create_dataset(name, data=np.ones(shape, dtype="f4"))
        return f"dataset {name} shape {shape}"
    if edit == 5:  # extra never-written dataset, huge
        n = rng.choice((1_500_000_000, 2 ** 40, 10 ** 7))
        kwargs = {"chunks": (min(n, 2 ** 20),)} if n > 2 ** 31 else {}
        group.create_dataset(f"extra{rng.randrange(10)}", shape=(n,), dtype="f4", **kwargs)
        return f"extra unwritten {n} elements in {group.name}"
    if edit == 6 and datasets:  # same name, huge never-written with tiny chunks
        name, ds = rng.choice(datasets)
        shape = ds.shape
        del f[name]
        big = (10 ** 7,) + tuple(shape[1:]) if shape else (10 ** 7,)
        f.create_dataset(name, shape=big, dtype=ds.dtype if ds.dtype.kind == "f" else "f4",
                         chunks=(1,) * len(big))
        return f"dataset {name} -> {big} in one-element chunks"
    if edit == 7 and datasets:  # soft link replacing an object
        name, _ = rng.choice(datasets)
        other, _ = rng.choice(datasets)
        del f[name]
        f[name] = h5py.SoftLink(rng.choice(["/" + other, "/nowhere", "/" + name]))
        return f"soft link {name}"
    if edit == 8 and datasets:  # external link
        name, _ = rng.choice(datasets)
        del f[name]
        f[name] = h5py.ExternalLink(rng.choice([os.fspath(src), "/etc/passwd", "missing.h5"]), "/" + name)
        return f"external link {name}"
    if edit == 9 and datasets:  # external storage
        name, ds = rng.choice(datasets)
        shape, dtype = ds.shape, ds.dtype
        del f[name]
        f.create_dataset(name, shape=shape, dtype=dtype, external=[("/etc/passwd", 0, h5py.h5f.UNLIMITED)])
        return f"external storage {name}"
    if edit == 10:  # gzip bomb: compressed chunks of zeros written directly
        name = rng.choice([n for n, _ in datasets] + ["bomb"]) if datasets else "bomb"
        if name in f:
            del f[name]
        _gzip_bomb(f, name, rng.choice((2 ** 24, 2 ** 28)))
        return f"gzip bomb {name}"
    if edit == 11 and objects:  # delete something
        name, _ = rng.choice(objects)
        del f[name]
        return f"deleted {name}"
    if edit == 12 and datasets:  # NaN/inf/negative values
        name, ds = rng.choice(datasets)
        if ds.dtype.kind == "f" and ds.size:
            data = ds[()]
            data.flat[rng.randrange(data.size)] = rng.choice((np.nan, np.inf, -np.inf, -1.0))
            ds[...] = data
            return f"bad value in {name}"
    return "no edit"


def _gzip_bomb(f, name, elements: int):
    """A float32 dataset of ``elements`` zeros, gzip-compressed, chunks written pre-compressed."""
    import zlib

    chunk = min(elements, 1 << 20)
    ds = f.create_dataset(name, shape=(elements,), dtype="f4", chunks=(chunk,), compression="gzip")
    packed = zlib.compress(bytes(4 * chunk), 9)
    for start in range(0, elements, chunk):
        ds.id.write_direct_chunk((start,), packed)
    return ds
