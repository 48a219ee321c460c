"""Read the tensors of a PyTorch checkpoint (``.pth``/``.pt``/``.ckpt``) without PyTorch, safely.

:func:`load_state_dict` returns ``{key: numpy array}`` for the tensors of a checkpoint, in the
order they are stored, with the same values, shapes and dtypes ``torch.load(...)[key].numpy()``
gives. It unwraps ``{"state_dict": {...}}`` (Lightning/NanoDet checkpoints) and keeps only tensor
entries; keys are returned as stored (:func:`refghost.convert.state_dict.select_backbone` strips
prefixes).

Formats
-------
* The zip format ``torch.save`` writes since PyTorch 1.6: ``<dir>/data.pkl`` (the pickled
  object), ``<dir>/data/<key>`` (one raw record per storage), ``<dir>/byteorder`` (``little`` or
  ``big``; absent means little) and bookkeeping records; ``<dir>`` is whatever the writer chose.
  Records must be stored uncompressed, as ``torch.save`` writes them: a compressed record means
  the archive was repacked, and is refused (re-save it, or repack with ``zip -0``). Records
  written with ``torch.serialization.set_crc32_options(False)`` (CRC 0) are accepted.
* The legacy format (``torch.save(..., _use_new_zipfile_serialization=False)``, the default
  before 1.6): magic-number, protocol and sys-info pickles, the pickled object, the list of
  storage keys, then each storage as a little-endian int64 element count and its raw bytes.
  The older tar format (PyTorch < 0.1.10) and TorchScript archives (``torch.jit.save``) are not
  read.

Tensors: storage offset, shape and strides are honoured (the result is a contiguous copy;
tensors that are the same view of the same storage share one array, as they share memory after
``torch.load``). dtypes come from the storage type: float32/float64, int8/16/32/64, uint8, bool,
complex64/128. float16 and bfloat16 tensors are refused with a message naming the key, because
refghost reads float32/float64 weights; so are tensors with PyTorch's negative/conjugate bit.
NaN/Inf values load as they are (refghost's weights validation refuses them later).

Safety model
------------
A checkpoint is a pickle, and plain ``pickle.load`` runs whatever callables the file names. This
module unpickles with the pure-Python ``pickle._Unpickler`` (its memo is a dict, so hostile memo
indices cannot force huge allocations; declared byte lengths are read before anything is
allocated for them; BUILD may only set the state of a stand-in, so a pickle cannot alter
refghost's own functions or tensor records) and a ``find_class`` that admits exactly:

* ``torch._utils._rebuild_tensor``, ``_rebuild_tensor_v2``, ``_rebuild_parameter``,
  ``_rebuild_parameter_with_state`` and ``torch._tensor._rebuild_from_type_v2``, replaced by
  refghost functions that check their arguments and record a lazy tensor (no data is read yet);
* the storage types ``torch.FloatStorage``, ``DoubleStorage``, ``HalfStorage``,
  ``BFloat16Storage``, ``LongStorage``, ``IntStorage``, ``ShortStorage``, ``CharStorage``,
  ``ByteStorage``, ``BoolStorage``, ``ComplexFloatStorage``, ``ComplexDoubleStorage`` (also
  under ``torch.cuda``), as inert markers that only carry a dtype;
* ``collections.OrderedDict``, called without arguments (how every OrderedDict is pickled; its
  pickled attributes, such as a state_dict's ``_metadata``, are dropped).

Every other global (``os.system``, ``builtins.eval``, a Lightning ``AttributeDict``, a yacs or
omegaconf config, ``collections.Counter``...) becomes a **stand-in**: a fresh class, created by
this module, that records the global's name and whatever the pickle passes to it (constructor
arguments, state, items) and does nothing else. The real global is never imported, looked up or
called, and no code of the checkpoint's choosing runs. The stand-in exists so that a Lightning
checkpoint still yields its ``state_dict`` when its ``hyper_parameters``, callbacks, optimizer or
scheduler states (``MultiStepLR`` keeps its milestones in a ``Counter``) hold objects refghost
cannot and need not build. A stand-in only matters if it ends up where refghost looks:

* a value of the returned state_dict, or the checkpoint itself, that is a stand-in raises
  :class:`WeightsError` "``<file>: refuses global os.system: ...``" (a few globals that are
  plainly not tensors, such as ``builtins.set`` or ``torch.device``, are skipped like other
  non-tensor entries instead);
* anything else holding stand-ins (optimizer state, hyper-parameters) is discarded.

Hostile or broken input raises :class:`WeightsError` naming the file and the problem: not a zip
nor a legacy checkpoint, a truncated or corrupt archive, duplicate archive entries, an unknown
storage type, a storage whose record size disagrees with its declared element count, a tensor
whose offset/shape/strides reach past its storage, a tensor with more elements than its storage
(refused before allocating, so a declared shape cannot exhaust memory), overlapping views whose
copies would exceed twice the file's tensor data. Nothing is allocated for tensor data beyond
what the file itself holds (records are uncompressed and their sizes are checked against the
file size before reading), and only the returned tensors' storages are read.

What a NanoDet checkpoint needs: NanoDet's Lightning ``.ckpt`` holds ``epoch``, ``global_step``,
``pytorch-lightning_version``, ``state_dict`` (``model.*`` and, with EMA, ``avg_model.*``
tensors), ``optimizer_states`` (SGD/AdamW state: tensors, floats, tuples), ``lr_schedulers``
(``collections.Counter`` for MultiStepLR), ``loops``/``callbacks`` (plain dicts, tensors) and,
if present, ``hyper_parameters``. Only the tensors and OrderedDicts of ``state_dict`` are
needed; everything else may be stand-ins, so such checkpoints load.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict

import numpy as np

from ..errors import WeightsError

__all__ = ["load_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_NDIM = 32
#: Records of a zip checkpoint (NanoDet's, with EMA weights and optimizer state, has about 2,500).
MAX_RECORDS = 100_000
#: Largest product of an empty tensor's dimensions, zero dimensions counted as 1: one of shape
#: (0, 2**40, 2**40) holds nothing, but NumPy cannot even describe it. (A non-empty tensor
#: is bounded by its storage, itself bounded by the file.)
MAX_EXTENT = 1 << 40

# storage class name -> (torch dtype name, numpy dtype with explicit byte order or None, itemsize)
_STORAGES = {
    "FloatStorage": ("torch.float32", "<f4", 4),
    "DoubleStorage": ("torch.float64", "<f8", 8),
    "HalfStorage": ("torch.float16", "<f2", 2),
    "BFloat16Storage": ("torch.bfloat16", None, 2),
    "LongStorage": ("torch.int64", "<i8", 8),
    "IntStorage": ("torch.int32", "<i4", 4),
    "ShortStorage": ("torch.int16", "<i2", 2),
    "CharStorage": ("torch.int8", "i1", 1),
    "ByteStorage": ("torch.uint8", "u1", 1),
    "BoolStorage": ("torch.bool", "u1", 1),
    "ComplexFloatStorage": ("torch.complex64", "<c8", 8),
    "ComplexDoubleStorage": ("torch.complex128", "<c16", 16),
}
_REFUSED_DTYPES = ("torch.float16", "torch.bfloat16")

# Globals that are plainly not tensors: as state_dict values they are skipped, not refused.
_NOT_TENSORS = frozenset({
    "builtins.set", "builtins.frozenset", "builtins.complex", "builtins.bytearray",
    "builtins.slice", "builtins.range", "_codecs.encode", "collections.Counter",
    "collections.defaultdict", "collections.deque", "torch.Size", "torch.device",
})


class _Bad(Exception):
    """A problem with the file; :func:`load_state_dict` prefixes the path."""


# --------------------------------------------------------------------------------------------
# Objects the restricted unpickler builds
# --------------------------------------------------------------------------------------------
class _StorageType:
    """Inert marker for ``torch.<X>Storage``: carries a dtype, cannot be called."""

    __slots__ = ("name", "torch_dtype", "np_dtype", "itemsize")

    def __init__(self, name):
        self.name = name
        self.torch_dtype, self.np_dtype, self.itemsize = _STORAGES[name]

    def __repr__(self):
        return f"torch.{self.name}"


_STORAGE_TYPES = {name: _StorageType(name) for name in _STORAGES}


class _Storage:
    """A storage named by the pickle: ``numel`` elements starting ``base`` elements into root."""

    __slots__ = ("key", "stype", "numel", "root", "base")

    def __init__(self, key, stype, numel, root=None, base=0):
        self.key, self.stype, self.numel = key, stype, numel
        self.root = self if root is None else root
        self.base = base


class _Tensor:
    """A tensor the pickle asked for; its data is read only if it is returned."""

    __slots__ = ("storage", "offset", "size", "stride", "flags")

    def __init__(self, storage, offset, size, stride, flags=()):
        self.storage, self.offset, self.size, self.stride, self.flags = storage, offset, size, stride, flags


class _StandIn:
    """Base of the stand-ins for refused globals: records what the pickle does, runs nothing.

    Each refused global gets its own subclass (so pickle's NEWOBJ, which needs a class, works);
    instances are what calling, NEWOBJ-ing or calling an instance of it produces.
    """

    __slots__ = ("args", "state", "items")
    refused_global = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.state, self.items = (args, kwargs), None, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return type(self)(*args, **kwargs)

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def add(self, value):
        self.items.append(value)

    def __repr__(self):
        return f"<{self.refused_global} stand-in>"


def _global_name(obj):
    """The refused global behind a stand-in class or instance, else None."""
    if isinstance(obj, _StandIn) or (isinstance(obj, type) and issubclass(obj, _StandIn)):
        return obj.refused_global
    return None


def _int(value, what):
    if type(value) is not int:
        raise _Bad(f"a tensor in the pickle has a non-integer {what} ({type(value).__name__})")
    if value < 0:
        raise _Bad(f"a tensor in the pickle has a negative {what} ({value})")
    return value


def _int_tuple(value, what):
    if type(value) not in (tuple, list):
        raise _Bad(f"a tensor in the pickle has a {what} that is not a tuple ({type(value).__name__})")
    if len(value) > MAX_NDIM:
        raise _Bad(f"a tensor in the pickle has {len(value)} dimensions (at most {MAX_NDIM} are read)")
    return tuple(_int(v, what) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, flags=()):
    if not isinstance(storage, _Storage):
        raise _Bad(f"a tensor in the pickle is built from {type(storage).__name__}, not a storage")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _Bad(f"a tensor in the pickle has size {list(size)} but strides {list(stride)}")
    return _Tensor(storage, _int(storage_offset, "storage offset"), size, stride, flags)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    flags = ()
    if isinstance(metadata, dict):
        flags = tuple(sorted(str(k) for k, v in metadata.items() if v is True))
    elif metadata is not None:
        raise _Bad(f"a tensor in the pickle has metadata of type {type(metadata).__name__}")
    return _rebuild_tensor(storage, storage_offset, size, stride, flags)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, _Tensor):
        raise _Bad(f"a Parameter in the pickle wraps {type(data).__name__}, not a tensor")
    return data


_TENSOR_TYPES = ("torch.Tensor", "torch.nn.parameter.Parameter")
_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS or type(args) is not tuple:
        raise _Bad("a tensor in the pickle is rebuilt by an unexpected function")
    tensor = func(*args)
    if _global_name(new_type) in _TENSOR_TYPES:
        return tensor
    if isinstance(new_type, type) and issubclass(new_type, _StandIn):
        return new_type(tensor)  # a tensor subclass refghost does not know: stays a stand-in
    raise _Bad("a tensor in the pickle has an unexpected type")


def _ordered_dict(*args, **kwargs):
    if args or kwargs:  # OrderedDict is always pickled as OrderedDict() followed by SETITEMS
        raise _Bad("the pickle builds an OrderedDict with constructor arguments")
    return OrderedDict()


_ALLOWED = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
}


class _Bounded:
    """A file view whose reads never ask for more than the bytes left before ``end``, so a
    length declared inside a pickle cannot make the reader allocate beyond the file."""

    def __init__(self, f, end):
        self.f, self.end = f, end

    def _left(self):
        return max(0, self.end - self.f.tell())

    def read(self, n=-1):
        left = self._left()
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit=-1):
        left = self._left()
        return self.f.readline(left if limit is None or limit < 0 else min(limit, left))


def _load_bytearray8(self):
    # pickle's own BYTEARRAY8 allocates the declared length before reading; read first instead
    (n,) = struct.unpack("<Q", self.read(8))
    data = self.read(n)
    if len(data) != n:
        raise _Bad("corrupt pickle (a bytearray is cut short)")
    self.append(bytearray(data))


def _load_build(self):
    # pickle's own BUILD sets attributes on whatever object the stack holds; here only stand-ins
    # take state (so refghost's tensor records, storage markers and functions cannot be altered)
    # and an OrderedDict's state (a state_dict's ``_metadata``) is dropped.
    state = self.stack.pop()
    inst = self.stack[-1]
    if isinstance(inst, _StandIn):
        inst.__setstate__(state)
    elif type(inst) is not OrderedDict:
        raise _Bad(f"the pickle sets the state of a {type(inst).__name__}")


class _Unpickler(pickle._Unpickler):
    """Pure-Python unpickler whose globals are the allow-list above or inert stand-ins."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    dispatch[pickle.BUILD[0]] = _load_build

    def __init__(self, file, storage_hook):
        super().__init__(file, encoding="utf-8")
        self._storage_hook = storage_hook
        self._stand_ins = {}

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as pickle does
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "torch.tensor":  # pre-1.8 name of torch._tensor
            module = "torch._tensor"
        full = f"{module}.{name}"
        if full in _ALLOWED:
            return _ALLOWED[full]
        if module in ("torch", "torch.cuda") and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if full not in self._stand_ins:
            self._stand_ins[full] = type("StandIn", (_StandIn,), {"__slots__": (), "refused_global": full})
        return self._stand_ins[full]

    def persistent_load(self, pid):
        if type(pid) is not tuple or not pid:
            raise _Bad(f"the pickle has an unexpected persistent id ({type(pid).__name__})")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        return self._storage_hook(typename, pid[1:])


def _unpickle(data, storage_hook):
    """Run the restricted unpickler on bytes or a file; errors become _Bad."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        return _Unpickler(stream, storage_hook).load()
    except _Bad:
        raise
    except RecursionError:
        raise _Bad("the pickle is nested too deeply") from None
    except Exception as exc:  # a corrupt pickle raises many types; nothing real was called
        raise _Bad(f"corrupt pickle ({type(exc).__name__}: {exc})") from None


def _no_storages(typename, data):
    raise _Bad(f"unexpected persistent id {typename!r} in a legacy checkpoint's header or storage key list")


# --------------------------------------------------------------------------------------------
# Storage registry shared by both formats
# --------------------------------------------------------------------------------------------
class _Storages:
    def __init__(self, legacy):
        self.legacy = legacy
        self.roots = {}  # key -> root _Storage, in first-seen order
        self.views = {}  # legacy view key -> _Storage

    def __call__(self, typename, data):
        if typename == "module" and self.legacy:  # legacy whole-module saves name the class
            return data[0] if data else None
        if typename != "storage":
            raise _Bad(f"unknown persistent id type {typename!r} in the pickle")
        if len(data) != (5 if self.legacy else 4):
            raise _Bad(f"malformed storage reference in the pickle ({len(data)} fields)")
        stype, key, _location, numel = data[:4]
        if not isinstance(stype, _StorageType):
            name = _global_name(stype)
            raise _Bad(f"unknown storage type {name or type(stype).__name__}" +
                       (" (refghost reads torch.<Float|Double|Half|BFloat16|Long|Int|Short|Char|Byte|"
                        "Bool|ComplexFloat|ComplexDouble>Storage)" if name else ""))
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if type(key) is not str:
            raise _Bad(f"a storage key in the pickle is {type(key).__name__}, not a string")
        if type(numel) is not int or numel < 0:
            raise _Bad(f"storage {key!r} declares {numel!r} elements")
        root = self.roots.get(key)
        if root is None:
            root = self.roots[key] = _Storage(key, stype, numel)
        elif root.stype is not stype or root.numel != numel:
            raise _Bad(f"storage {key!r} is declared twice, as {root.numel} x {root.stype.torch_dtype} "
                       f"and as {numel} x {stype.torch_dtype}")
        view = data[4] if self.legacy else None
        if view is None:
            return root
        if type(view) is not tuple or len(view) != 3:
            raise _Bad(f"malformed storage view of {key!r} in the pickle")
        view_key, base, view_numel = view
        if type(base) is not int or type(view_numel) is not int or base < 0 or view_numel < 0 \
                or base + view_numel > numel:
            raise _Bad(f"storage view {view_key!r} ({view_numel!r} elements at {base!r}) exceeds "
                       f"storage {key!r} ({numel} elements)")
        existing = self.views.get(view_key)
        if existing is None:
            existing = self.views[view_key] = _Storage(view_key, stype, view_numel, root, base)
        elif existing.root is not root or existing.base != base or existing.numel != view_numel:
            raise _Bad(f"storage view {view_key!r} is declared twice differently")
        return existing


# --------------------------------------------------------------------------------------------
# The two container formats
# --------------------------------------------------------------------------------------------
class _ZipSource:
    """A torch.save zip archive: pickle and storages as stored records of one folder."""

    def __init__(self, f, file_size):
        self.f, self.file_size = f, file_size
        try:
            end = zipfile._EndRecData(f)  # the member count, before zipfile makes one object per member
            declared = 0 if end is None else int(end[zipfile._ECD_ENTRIES_TOTAL])
        except Exception as exc:  # noqa: BLE001 - a damaged end record
            raise _Bad(f"truncated or corrupt zip archive ({exc})") from None
        if declared > MAX_RECORDS:
            raise _Bad(f"the zip archive declares {declared} records, more than the {MAX_RECORDS} refghost reads")
        f.seek(0)
        try:
            zf = zipfile.ZipFile(f)
            infos = zf.infolist()
        except Exception as exc:  # zipfile raises several types for a damaged archive
            raise _Bad(f"truncated or corrupt zip archive ({exc})") from None
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise _Bad(f"the zip archive holds {dup!r} more than once; refusing an ambiguous checkpoint")
        self.infos = {i.filename: i for i in infos}
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            found = "no" if not pickles else f"{len(pickles)}"
            raise _Bad(f"not a PyTorch checkpoint: the zip archive has {found} <folder>/data.pkl record(s)")
        self.prefix = pickles[0][: -len("data.pkl")]
        self.torchscript = self.prefix + "constants.pkl" in self.infos
        order = self.infos.get(self.prefix + "byteorder")
        byteorder = "little" if order is None else self.read(order).decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise _Bad(f"unknown byte order {byteorder!r} in the zip archive")
        self.byteorder = byteorder

    def read(self, info):
        """The bytes of a stored record, read after checking it lies inside the file."""
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Bad(f"record {info.filename!r} is compressed (method {info.compress_type}); torch.save "
                       f"stores records uncompressed: re-save the checkpoint or repack it with 'zip -0'")
        if info.flag_bits & 0x1:
            raise _Bad(f"record {info.filename!r} is encrypted")
        f = self.f
        if info.header_offset + 30 + info.file_size > self.file_size:
            raise _Bad(f"truncated zip archive: record {info.filename!r} ends past the end of the file")
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise _Bad(f"corrupt zip archive: bad local header for {info.filename!r}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        raw_name = f.read(name_len)
        name = raw_name.decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
        if name != info.orig_filename:
            raise _Bad(f"corrupt zip archive: local header of {info.filename!r} names {name!r}")
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self.file_size:
            raise _Bad(f"truncated zip archive: record {info.filename!r} ends past the end of the file")
        f.seek(start)
        data = f.read(info.file_size)
        if len(data) != info.file_size:
            raise _Bad(f"truncated zip archive: record {info.filename!r} is cut short")
        if info.CRC and zlib.crc32(data) != info.CRC:  # CRC 0: written with crc32 checks disabled
            raise _Bad(f"corrupt zip archive: CRC mismatch in record {info.filename!r}")
        return data

    def load(self, storages):
        return _unpickle(self.read(self.infos[self.prefix + "data.pkl"]), storages)

    def storage_bytes(self, root):
        name = f"{self.prefix}data/{root.key}"
        info = self.infos.get(name)
        if info is None:
            raise _Bad(f"storage record {name!r} is missing from the zip archive")
        nbytes = root.numel * root.stype.itemsize
        if info.file_size != nbytes:
            raise _Bad(f"storage record {name!r} holds {info.file_size} bytes but the pickle declares "
                       f"{root.numel} x {root.stype.torch_dtype} = {nbytes} bytes")
        return self.read(info)


class _LegacySource:
    """The pre-1.6 torch.save stream: header pickles, object pickle, keys, raw storages."""

    def __init__(self, f, file_size):
        self.f, self.file_size, self.byteorder = f, file_size, "little"
        self.stream = _Bounded(f, file_size)
        self.torchscript = False
        try:
            magic = _unpickle(self.stream, _no_storages)
        except _Bad as exc:
            raise _Bad(f"not a PyTorch checkpoint (neither a torch.save zip archive nor the legacy "
                       f"format: {exc})") from None
        if type(magic) is not int or magic != LEGACY_MAGIC:
            raise _Bad("not a PyTorch checkpoint (neither a torch.save zip archive nor the legacy format: "
                       "no magic number)")
        protocol = _unpickle(self.stream, _no_storages)
        if protocol != LEGACY_PROTOCOL:
            raise _Bad(f"unsupported legacy checkpoint protocol {protocol!r}")
        _unpickle(self.stream, _no_storages)  # sys info; storages are always written little-endian
        self.offsets = None

    def load(self, storages):
        obj = _unpickle(self.stream, storages)
        keys = _unpickle(self.stream, _no_storages)
        if type(keys) is not list or any(type(k) is not str for k in keys):
            raise _Bad("corrupt legacy checkpoint: the storage key list is not a list of strings")
        if len(set(keys)) != len(keys):
            raise _Bad("corrupt legacy checkpoint: a storage key is listed twice")
        offsets = {}
        pos = self.f.tell()
        for key in keys:
            root = storages.roots.get(key)
            if root is None:
                raise _Bad(f"corrupt legacy checkpoint: storage {key!r} is listed but never used")
            self.f.seek(pos)
            header = self.f.read(8)
            if len(header) != 8:
                raise _Bad(f"truncated legacy checkpoint: storage {key!r} is missing")
            numel = int.from_bytes(header, "little", signed=True)
            if numel != root.numel:
                raise _Bad(f"corrupt legacy checkpoint: storage {key!r} holds {numel} elements, the pickle "
                           f"declares {root.numel}")
            offsets[key] = pos + 8
            pos += 8 + numel * root.stype.itemsize
            if pos > self.file_size:
                raise _Bad(f"truncated legacy checkpoint: storage {key!r} ends past the end of the file")
        self.offsets = offsets
        return obj

    def storage_bytes(self, root):
        start = self.offsets.get(root.key)
        if start is None:
            raise _Bad(f"corrupt legacy checkpoint: storage {root.key!r} has no data")
        nbytes = root.numel * root.stype.itemsize
        self.f.seek(start)
        data = self.f.read(nbytes)
        if len(data) != nbytes:
            raise _Bad(f"truncated legacy checkpoint: storage {root.key!r} is cut short")
        return data


# --------------------------------------------------------------------------------------------
# From the unpickled object to arrays
# --------------------------------------------------------------------------------------------
def _check_tensor(key, t):
    """Refuse a returned tensor refghost cannot read; return its byte size. Allocates nothing."""
    st = t.storage
    if not (0 <= st.base and st.base + st.numel <= st.root.numel and t.offset >= 0
            and all(n >= 0 for n in t.size) and all(s >= 0 for s in t.stride)):
        raise _Bad(f"key {key!r}: inconsistent tensor record")  # unreachable: checked when built
    dtype = st.stype.torch_dtype
    if dtype in _REFUSED_DTYPES:
        raise _Bad(f"key {key!r} is {dtype}; refghost reads float32/float64 weights")
    if t.flags:
        raise _Bad(f"key {key!r} has PyTorch's {'/'.join(t.flags)} bit set; resolve it before saving")
    count = 1
    for n in t.size:
        count *= n
    extent = 1
    for n in t.size:
        extent *= max(n, 1)
    if not count and extent > MAX_EXTENT:  # (a non-empty tensor is bounded by its storage below)
        raise _Bad(f"key {key!r}: empty shape {list(t.size)} spans {extent} elements (zero dimensions aside), "
                   f"more than {MAX_EXTENT}; refusing it")
    if count:
        needed = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) + 1
        if needed > st.numel:
            raise _Bad(f"key {key!r}: shape {list(t.size)} with strides {list(t.stride)} at offset {t.offset} "
                       f"reaches element {needed - 1}, but its storage holds {st.numel} elements")
        if count > st.numel:
            raise _Bad(f"key {key!r}: shape {list(t.size)} has {count} elements but its storage holds "
                       f"{st.numel}; refusing to expand it")
    return count * st.stype.itemsize


def _to_array(t, data, byteorder):
    st = t.storage
    dtype = np.dtype(st.stype.np_dtype)
    if byteorder == "big":
        dtype = dtype.newbyteorder(">")
    item = dtype.itemsize
    flat = np.frombuffer(data, dtype=dtype)[st.base: st.base + st.numel]
    if flat.size != st.numel:
        raise _Bad(f"storage {st.key!r} holds {flat.size} elements, not {st.numel}")
    if all(n for n in t.size):
        # a dimension of size 1 is never stepped along: its stride (any integer in PyTorch) is unused
        strides = tuple(s * item if n > 1 else 0 for n, s in zip(t.size, t.stride))
        view = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.size, strides=strides, writeable=False)
    else:
        view = np.empty(t.size, dtype=dtype)
    out = np.array(view, dtype=dtype.newbyteorder("="), order="C", copy=True)
    if st.stype.name == "BoolStorage":
        out = out != 0
    return out


def _refusal(key, name):
    return _Bad(f"refuses global {name}: key {key!r} is an object the pickle builds by calling {name}; "
                f"refghost never calls a checkpoint's globals and reads only tensors from a state_dict")


def _extract(obj, source):
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        name = _global_name(obj)
        if name is not None:
            hint = "a TorchScript archive" if source.torchscript else "a whole pickled object"
            raise _Bad(f"refuses global {name}: the checkpoint is not a state_dict but an object the pickle "
                       f"builds by calling {name} ({hint}: save model.state_dict() instead)")
        found = "a tensor" if isinstance(obj, _Tensor) else type(obj).__name__
        raise _Bad(f"expected a state_dict (a dict of tensors), found {found}")
    tensors = {}
    for key, value in obj.items():
        if isinstance(value, _Tensor):
            if type(key) is not str:
                raise _Bad(f"a tensor is stored under a key of type {type(key).__name__}, not a string")
            tensors[key] = value
            continue
        name = _global_name(value)
        if name is not None and name not in _NOT_TENSORS:
            raise _refusal(key, name)

    sizes = {key: _check_tensor(key, t) for key, t in tensors.items()}
    views, roots, total = {}, {}, 0
    for key, t in tensors.items():
        view = (id(t.storage.root), t.storage.base + t.offset, t.size, t.stride)
        if view not in views:
            views[view] = None
            total += sizes[key]
            roots[id(t.storage.root)] = t.storage.root
    data_bytes = sum(r.numel * r.stype.itemsize for r in roots.values())
    if total > 2 * data_bytes:
        raise _Bad(f"the state_dict's tensors would take {total} bytes, more than twice the {data_bytes} "
                   f"bytes of tensor data they view (overlapping views); refusing to allocate")

    cache, out = {}, {}
    for key, t in tensors.items():
        view = (id(t.storage.root), t.storage.base + t.offset, t.size, t.stride)
        if views[view] is None:
            root = t.storage.root
            if id(root) not in cache:
                cache[id(root)] = source.storage_bytes(root)
            views[view] = _to_array(t, cache[id(root)], source.byteorder)
        out[key] = views[view]
    return out


def load_state_dict(path) -> dict[str, np.ndarray]:
    """The tensors of PyTorch checkpoint ``path`` as NumPy arrays, keyed and ordered as stored.

    ``{"state_dict": ...}`` is unwrapped; non-tensor entries are left out. Needs no PyTorch and
    runs nothing from the file (see the module docstring). Raises :class:`WeightsError`.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise WeightsError(f"{path}: cannot open checkpoint ({exc.strerror or exc})") from None
    try:
        with f:
            file_size = os.fstat(f.fileno()).st_size
            is_zip = f.read(4) == b"PK\x03\x04"
            f.seek(0)
            source = _ZipSource(f, file_size) if is_zip else _LegacySource(f, file_size)
            storages = _Storages(legacy=not is_zip)
            obj = source.load(storages)
            return _extract(obj, source)
    except _Bad as exc:
        raise WeightsError(f"{path}: {exc}") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read checkpoint ({exc})") from None
