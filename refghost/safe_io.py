"""Guarded reading of untrusted files: HDF5 (weights, goldens, candidates), ``.npy`` and ``.npz``.

Every file refghost reads may be corrupt or hostile. The helpers here turn every exception the
libraries raise (h5py, zipfile, NumPy's ``.npy`` header parser) into the caller's documented
error type (a :class:`~refghost.errors.RefghostError` subclass) with a message naming the file,
the object and the problem, and they check what a file *declares* before reading anything:

* names, link kinds, object kinds, dtypes and shapes are inspected from the metadata
  (``h5py.Dataset.shape``/``.dtype``, an ``.npy`` header) before any data is read;
* only hard links are followed: external links and soft links are refused, as are datasets
  stored in external files (``Dataset.external``) and virtual datasets: a file never makes
  refghost read outside it;
* a dataset's declared size must be backed by the bytes the file stores for it: an uncompressed
  dataset must store all of its bytes (a never-written dataset, which HDF5 would fill in memory,
  is refused), a compressed one may expand at most :data:`MAX_EXPANSION` times, with only the
  filters in :data:`ALLOWED_FILTERS`, in at most :data:`MAX_CHUNKS` chunks; ``.npz`` members
  obey the same expansion limit;
* callers pass the shape or the size cap each tensor may have (what the network needs), so a
  declared size is checked against it before allocating;
* a file must be a regular file before anything opens it (:func:`check_regular_file`: a FIFO
  would block the open, a device never ends), and a model's companion file (``.bin``, external
  data) must resolve inside the model's folder;
* HDF5's C library can still hang or crash on a corrupt file where no check can see it (a cycle
  in a mutated heap or B-tree): :func:`probe_hdf5` reads every object's metadata and attributes
  in a child process with a time limit (:mod:`refghost.isolate`) before the file is read here;
* text taken from a file is shown through :func:`printable` (control characters and bytes that
  are not UTF-8 escaped), never printed raw.

The caps are documented in ``docs/weights-format.md`` ("What is refused").
"""

from __future__ import annotations

import math
import os
import stat
import zipfile
from contextlib import contextmanager

import numpy as np

from .errors import RefghostError

#: A compressed dataset or ``.npz`` member may declare at most this many times the bytes it
#: stores. Real float tensors compress by less than 4x (even ReLU outputs, half zeros); a
#: gzip bomb of zeros expands about 1000x.
MAX_EXPANSION = 64
#: Compressed data smaller than this is never refused for its ratio (small constant tensors,
#: BatchNorm statistics of ones, compress far better than 64x and are harmless).
EXPANSION_SLACK = 1 << 20
#: HDF5 filters a dataset may use: deflate (gzip), shuffle, fletcher32, LZF. Any other filter
#: would need a plugin library; refghost never loads one for a file.
ALLOWED_FILTERS = {1: "gzip", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
#: Chunks per dataset: h5py's automatic chunking gives a few hundred for the largest tensor; a
#: file declaring one-element chunks makes HDF5 spend minutes on its index.
MAX_CHUNKS = 1 << 16
#: Bytes of one attribute (the longest refghost writes, a command line or a description, is a
#: few hundred).
MAX_ATTR_BYTES = 1 << 16
#: Attributes on one object.
MAX_ATTRS = 64
#: Members of one HDF5 group or ``.npz`` archive (a GhostNet with every layer has about 1,000).
MAX_MEMBERS = 20_000
#: Nesting depth of groups in an ``.h5`` candidate.
MAX_DEPTH = 8
#: Bytes of one array whose size nothing else bounds (a state_dict tensor in an ``.npz``): 2 GiB,
#: eight times GhostNet's largest tensor at width 8 in float64.
MAX_ARRAY_BYTES = 1 << 31
#: dtype kinds of tensors: float, signed, unsigned, bool (never object, string, void, complex).
NUMERIC_KINDS = "fiub"
#: Bytes of a refused attribute shown (escaped) in the message.
SHOWN_BYTES = 80
#: Wall time :func:`probe_hdf5` gives HDF5 to read a file's metadata and attributes. The probe
#: takes 0.25 s on a 300 MB golden with intermediates (1,289 objects; it reads no tensor); a
#: minute leaves room for a machine busy with other work and still ends a hang.
PROBE_TIMEOUT = 60.0
#: Address space :func:`probe_hdf5` may add: metadata and attributes are capped far below
#: (:data:`MAX_ATTR_BYTES` per attribute), HDF5's caches take tens of MB.
PROBE_MEMORY = 1 << 30


def _fail(error, where, what, exc=None):
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return error(f"{where}: {what}{detail}")


def guarded(error, where, what, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with any library exception raised as ``error`` naming ``where``.

    RefghostErrors pass through, and so does MemoryError: the checks before every read exist so
    that no file can cause one, and a fuzzer must see it if one does.
    """
    try:
        return fn(*args, **kwargs)
    except (RefghostError, MemoryError):  # a MemoryError means a cap is missing: never hide it
        raise
    except Exception as exc:  # noqa: BLE001 - h5py/zipfile/numpy raise many types on bad input
        raise _fail(error, where, what, exc) from None


# ------------------------------------------------------------------------------------------------
# Files, and text from them
# ------------------------------------------------------------------------------------------------
#: What each kind of special file is called in a refusal.
_SPECIAL_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISSOCK, "a socket"))


def check_regular_file(path, what: str, error: type = RefghostError, *, folder=None) -> None:
    """Raise ``error`` unless ``path`` is a regular file (symbolic links followed), before anything
    opens it: a missing file, a folder, a FIFO (whose open blocks until a writer comes), a device
    or a socket is refused with a message naming ``path`` and ``what`` it should be (``"golden
    file"``, ``"ncnn weights (.bin)"``).

    ``folder``: ``path`` is a companion file of a model in ``folder`` (its ``.bin``, its external
    data), so it must also resolve inside ``folder``: a symbolic link to anywhere else (``.bin ->
    /etc/passwd``) is refused with a message naming the link and where it points.
    """
    path = os.fspath(path)
    if folder is not None:
        real, home = os.path.realpath(path), os.path.realpath(folder)
        if os.path.commonpath([real, home]) != home:
            if os.path.islink(path):
                raise error(f"{path}: {what} is a symbolic link to {os.readlink(path)} ({real}), outside the "
                            f"model's folder {folder}; refghost reads no file outside it")
            raise error(f"{path}: {what} resolves to {real}, outside the model's folder {folder}; refghost reads "
                        f"no file outside it")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such {what}" + (" (a symbolic link to a missing file)" if os.path.islink(path)
                                                  else "")) from None
    except OSError as exc:
        raise error(f"{path}: cannot read this {what} ({exc.strerror})") from None
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "not a regular file")
    raise error(f"{path}: is {kind}, not a {what}; refused before opening it")


def printable(text) -> str:
    """``text`` (a str, or bytes decoded as UTF-8) safe to print on a terminal: every character
    that is not printable (control characters such as ESC, newlines and tabs, lone surrogates)
    and every byte that is not valid UTF-8 is shown as its escape (``\\x1b``, ``\\xc3``,
    ``\\u200b``); everything else, non-ASCII letters included, is kept."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", "surrogateescape")
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte surrogateescape kept from invalid UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# HDF5
# ------------------------------------------------------------------------------------------------
@contextmanager
def open_hdf5(path: str, error: type, kind: str):
    """Open ``path`` read-only as HDF5; a missing, non-HDF5 or corrupt file, or a special one
    (:func:`check_regular_file`), raises ``error``."""
    import h5py

    check_regular_file(path, f"{kind} file", error)
    f = guarded(error, path, "not a readable HDF5 file", h5py.File, path, "r")
    try:
        yield f
    finally:
        try:
            f.close()
        except Exception:  # noqa: BLE001 - closing a corrupt file may complain; nothing to keep
            pass


def probe_hdf5(path, error: type, kind: str, *, timeout: float = PROBE_TIMEOUT) -> None:
    """Read every object's metadata and every attribute of the HDF5 file ``path`` in a child
    process (:func:`refghost.isolate.call_isolated`), so that a file on which HDF5 crashes, hangs
    or allocates without end raises ``error`` (``"HDF5 did not finish reading PATH within 60 s
    (killed)"``) before this process reads it. Call it before :func:`open_hdf5` on a file from a
    user; it reads no tensor data: 0.25 s on a 294 MB golden with intermediates (1,289 objects;
    h5py's cost per object, 0.2 s, and the child's 10 ms), where reading the golden takes 0.5 s.

    The probe walks hard links only (to :data:`MAX_DEPTH` levels, :data:`MAX_MEMBERS` objects),
    opens each attribute of at most :data:`MAX_ATTR_BYTES` and reads it, and each dataset's dtype,
    shape, layout, filters and stored size. What the library *raises* on the way is left to the
    file's reader, which reports it in its own terms: the probe ends only what cannot be caught.
    """
    from .errors import IsolationError
    from .isolate import call_isolated

    path = os.fspath(path)
    check_regular_file(path, f"{kind} file", error)
    try:
        call_isolated(_probe, path, who="HDF5", doing=f"reading {path}", timeout=timeout, memory=PROBE_MEMORY)
    except IsolationError as exc:
        raise error(str(exc)) from None


def _probe(path: str) -> None:
    """The child's part of :func:`probe_hdf5` (library exceptions ignored)."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception:  # noqa: BLE001 - the reader reports an unreadable file
        return
    with f:
        pending, seen = [(f, 0)], 0
        while pending and seen < MAX_MEMBERS:
            obj, depth = pending.pop()
            seen += 1
            _probe_attributes(obj)
            if isinstance(obj, h5py.Dataset):
                for read in (lambda: obj.dtype, lambda: obj.shape, lambda: obj.chunks, lambda: obj.external,
                             lambda: obj.is_virtual, lambda: obj.id.get_create_plist().get_nfilters(),
                             obj.id.get_storage_size):
                    _quietly(read)
            elif isinstance(obj, h5py.Group) and depth < MAX_DEPTH:
                for name in _quietly(lambda: list(obj.keys())[:MAX_MEMBERS]) or ():
                    link = _quietly(lambda: obj.get(name, getlink=True))
                    if isinstance(link, h5py.HardLink):
                        child = _quietly(lambda: obj[name])
                        if child is not None:
                            pending.append((child, depth + 1))


def _probe_attributes(obj) -> None:
    import h5py

    names = _quietly(lambda: list(obj.attrs.keys())[:MAX_ATTRS]) or ()
    for name in names:
        aid = _quietly(lambda: h5py.h5a.open(obj.id, name.encode("utf-8", "surrogateescape")))
        if aid is None:
            continue
        dtype, shape = _quietly(lambda: aid.dtype), _quietly(lambda: aid.shape)
        if dtype is not None and shape is not None and math.prod(shape) * dtype.itemsize <= MAX_ATTR_BYTES:
            _quietly(lambda: obj.attrs[name])


def _quietly(read):
    """``read()``, or None if it raises."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - the probe is after crashes and hangs, not exceptions
        return None


def members(group, where: str, error: type, *, max_members: int = MAX_MEMBERS) -> list[tuple[str, object]]:
    """``[(name, Group or Dataset)]`` of ``group``, in its order; only hard links, capped count.

    Soft and external links, named datatypes and unreadable entries raise ``error``.
    """
    import h5py

    count = guarded(error, where, "cannot list the group", len, group)
    if count > max_members:
        raise error(f"{where}: holds {count} members, more than the {max_members} refghost reads")
    names = guarded(error, where, "cannot list the group", lambda: list(group.keys()))
    out = []
    for name in names:
        link = guarded(error, where, f"cannot read link {name!r}", group.get, name, getlink=True)
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)) or not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise error(f"{where}: {name!r} is {kind}; refghost follows only hard links (a file never "
                        f"makes it read another object or file)")
        obj = guarded(error, where, f"cannot open {name!r}", group.__getitem__, name)
        if not isinstance(obj, (h5py.Group, h5py.Dataset)):
            raise error(f"{where}: {name!r} is a {type(obj).__name__}, not a group or a dataset")
        out.append((name, obj))
    return out


def dataset_info(ds, where: str, error: type, *, kinds: str = NUMERIC_KINDS, dtypes=None,
                 shape: tuple | None = None, max_elements: int | None = None,
                 needed_by: str = "") -> tuple[tuple, np.dtype]:
    """Check dataset ``ds`` from its metadata only; return its ``(shape, dtype)``.

    ``dtypes`` (a collection of np.dtype) or ``kinds`` restricts the dtype; ``shape`` is the exact
    shape it must have, else ``max_elements`` caps its size. Refuses external storage, virtual
    datasets, unknown filters, too many chunks, and declared bytes the file does not store.
    ``needed_by`` names what needs ``shape`` in the message.
    """
    dtype = guarded(error, where, "unreadable dtype", lambda: ds.dtype)
    found_shape = guarded(error, where, "unreadable shape", lambda: ds.shape)
    if found_shape is None:
        raise error(f"{where}: dataset has no dataspace (an empty HDF5 dataset), expected an array")
    if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
        raise error(f"{where} has dtype {dtype}, expected a plain numeric array"
                    + (f" ({', '.join(str(d) for d in dtypes)})" if dtypes else ""))
    if dtypes is not None and dtype not in dtypes:
        raise error(f"{where} has dtype {dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    elements = math.prod(found_shape)
    if shape is not None and tuple(found_shape) != tuple(shape):
        raise error(f"{where} has shape {list(found_shape)}, expected {list(shape)}"
                    + (f" for {needed_by}" if needed_by else ""))
    if max_elements is not None and elements > max_elements:
        raise error(f"{where}: declares shape {list(found_shape)} ({elements} elements), more than the "
                    f"{max_elements} it may have here")
    check_storage(ds, where, error, elements * dtype.itemsize)
    return tuple(found_shape), dtype


def check_storage(ds, where: str, error: type, nbytes: int) -> None:
    """Refuse a dataset whose bytes live outside the file or are not backed by what it stores."""
    external = guarded(error, where, "unreadable storage layout", lambda: ds.external)
    if external:
        raise error(f"{where}: stored in external file(s) {[e[0] for e in external][:3]}; refghost reads "
                    f"only data inside the file")
    if guarded(error, where, "unreadable storage layout", lambda: ds.is_virtual):
        raise error(f"{where}: a virtual dataset (data mapped from other datasets or files); refused")
    plist = guarded(error, where, "unreadable creation properties", ds.id.get_create_plist)
    nfilters = guarded(error, where, "unreadable filter pipeline", plist.get_nfilters)
    filters = []
    for i in range(nfilters):
        code = guarded(error, where, "unreadable filter pipeline", plist.get_filter, i)[0]
        if code not in ALLOWED_FILTERS:
            raise error(f"{where}: uses HDF5 filter {code}; refghost reads only "
                        f"{', '.join(ALLOWED_FILTERS.values())}")
        filters.append(code)
    chunks = guarded(error, where, "unreadable chunk layout", lambda: ds.chunks)
    shape = guarded(error, where, "unreadable shape", lambda: ds.shape)
    if chunks is not None:
        count = math.prod(-(-n // max(c, 1)) for n, c in zip(shape, chunks))
        if count > MAX_CHUNKS:
            raise error(f"{where}: shape {list(shape)} in chunks of {list(chunks)} is {count} chunks, more than "
                        f"{MAX_CHUNKS}")
        chunk_bytes = math.prod(chunks) * ds.dtype.itemsize
        if chunk_bytes > max(nbytes, EXPANSION_SLACK):  # HDF5 allocates a whole chunk to read one
            raise error(f"{where}: chunks of {list(chunks)} ({chunk_bytes} bytes) are larger than the dataset "
                        f"({nbytes} bytes)")
    if nbytes == 0:
        return
    stored = guarded(error, where, "unreadable storage size", ds.id.get_storage_size)
    compressing = any(code in (1, 32000) for code in filters)
    if (not compressing and stored < nbytes) or stored == 0:
        raise error(f"{where}: declares {nbytes} bytes but the file stores {stored} for it (never written, "
                    f"or cut short); refused")
    if compressing and nbytes > EXPANSION_SLACK and nbytes > MAX_EXPANSION * stored:
        raise error(f"{where}: {stored} compressed bytes declare {nbytes} bytes (more than {MAX_EXPANSION}x); "
                    f"refused as a decompression bomb")


def read_dataset(ds, where: str, error: type) -> np.ndarray:
    """The data of a dataset already checked with :func:`dataset_info`, as a read-only array."""
    array = guarded(error, where, "HDF5 read error", lambda: np.asarray(ds[()]))
    array.flags.writeable = False
    return array


def attribute(obj, name: str, where: str, error: type, kind: str, *, length: int | None = None,
              default=None, missing: str = "", noun: str = "attribute"):
    """Root/group attribute ``name`` of ``obj`` checked as ``kind`` before and after reading.

    kinds: ``"str"`` (a UTF-8 string), ``"int"`` (an integer scalar), ``"float"`` (a real scalar),
    ``"ints"``/``"floats"`` (a 1-D array, of ``length`` values if given). A missing attribute
    returns ``default`` if given, else raises ``error`` (with ``missing`` as the explanation).
    """
    import h5py

    exists = guarded(error, where, f"cannot read attribute {name!r}", lambda: name in obj.attrs)
    if not exists:
        if default is not None:
            return default
        raise error(f"{where}: {noun} {name!r} is missing" + (f" ({missing})" if missing else ""))
    aid = guarded(error, where, f"cannot read attribute {name!r}",
                  lambda: h5py.h5a.open(obj.id, name.encode("utf-8", "surrogateescape")))
    dtype = guarded(error, where, f"unreadable attribute {name!r}", lambda: aid.dtype)
    shape = guarded(error, where, f"unreadable attribute {name!r}", lambda: aid.shape)
    # (a variable-length string's bytes live in the file's heap, which the file's size bounds)
    if shape is not None and math.prod(shape) * dtype.itemsize > MAX_ATTR_BYTES:
        raise error(f"{where}: attribute {name!r} is larger than {MAX_ATTR_BYTES} bytes")
    if shape is None:
        raise error(f"{where}: attribute {name!r} is empty")
    is_str = h5py.check_string_dtype(dtype) is not None or dtype.kind == "S"
    if kind == "str":
        if not is_str or len(shape) != 0:
            raise error(f"{where}: attribute {name!r} must be a string, found {_describe(dtype, shape)}")
    elif kind in ("int", "ints"):
        if dtype.kind not in "iu" or len(shape) != (0 if kind == "int" else 1):
            raise error(f"{where}: attribute {name!r} must be {'an integer' if kind == 'int' else 'integers'}, "
                        f"found {_describe(dtype, shape)}")
    elif kind in ("float", "floats"):
        if dtype.kind not in "iuf" or len(shape) != (0 if kind == "float" else 1):
            raise error(f"{where}: attribute {name!r} must be {'a number' if kind == 'float' else 'numbers'}, "
                        f"found {_describe(dtype, shape)}")
    elif kind == "any":
        if is_str and len(shape) != 0:
            raise error(f"{where}: attribute {name!r} is an array of strings; refghost writes single strings")
        if not is_str and (dtype.kind not in "iufb" or dtype.fields is not None or dtype.subdtype is not None):
            raise error(f"{where}: attribute {name!r} has dtype {dtype}; refghost writes strings and numbers")
    else:
        raise ValueError(kind)
    if length is not None and len(shape) == 1 and shape[0] != length:
        raise error(f"{where}: attribute {name!r} must hold {length} values, found {shape[0]}")
    value = guarded(error, where, f"unreadable attribute {name!r} (not valid UTF-8?)", lambda: obj.attrs[name])
    if is_str:
        return _decode(value, name, where, error)
    if kind == "any":
        return value
    value = np.asarray(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "ints":
        return tuple(int(v) for v in value)
    if kind == "floats":
        return tuple(float(v) for v in value)
    return value


def _decode(raw, name, where, error):
    if isinstance(raw, np.ndarray) and raw.ndim == 0:
        raw = raw[()]
    if isinstance(raw, str):
        return raw
    try:
        data = bytes(raw)
    except (TypeError, ValueError):
        raise error(f"{where}: attribute {name!r} is not a string") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        shown = printable(data[:SHOWN_BYTES]) + ("..." if len(data) > SHOWN_BYTES else "")
        raise error(f"{where}: attribute {name!r} is not valid UTF-8: {shown}") from None


def _describe(dtype, shape) -> str:
    import h5py

    what = "string" if (h5py.check_string_dtype(dtype) is not None or dtype.kind == "S") else str(dtype)
    return f"{what} of shape {list(shape) if shape is not None else None}"


def all_attributes(obj, where: str, error: type) -> dict:
    """Every attribute of ``obj`` (strings decoded, numbers as NumPy values), each checked first."""
    count = guarded(error, where, "cannot list attributes", lambda: len(obj.attrs))
    if count > MAX_ATTRS:
        raise error(f"{where}: {count} attributes, more than the {MAX_ATTRS} refghost reads")
    names = guarded(error, where, "cannot list attributes", lambda: list(obj.attrs.keys()))
    return {name: attribute(obj, name, where, error, "any") for name in names}


# ------------------------------------------------------------------------------------------------
# .npy and .npz
# ------------------------------------------------------------------------------------------------
def _npy_header(stream, where, error):
    """``(shape, fortran_order, dtype)`` from an ``.npy`` stream positioned at its start."""
    fmt = np.lib.format

    def parse():
        version = fmt.read_magic(stream)
        if version == (1, 0):
            return fmt.read_array_header_1_0(stream)
        if version == (2, 0):
            return fmt.read_array_header_2_0(stream)
        raise ValueError(f"unsupported .npy format version {version}")

    shape, fortran, dtype = guarded(error, where, "not a readable .npy array (bad header)", parse)
    if not isinstance(shape, tuple) or any(type(n) is not int or n < 0 for n in shape):
        raise error(f"{where}: bad .npy header (shape {shape!r})")
    return shape, bool(fortran), dtype


def _check_npy_dtype(dtype, shape, where, error, kinds, max_bytes):
    if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
        raise error(f"{where}: dtype {dtype}; refghost reads plain numeric arrays (no objects, no pickles)")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise error(f"{where}: declares shape {list(shape)} x {dtype} = {nbytes} bytes, more than the "
                    f"{max_bytes} it may have here")
    return nbytes


def _read_exactly(stream, nbytes, where, error, shape, fortran, dtype):
    flat = np.empty(nbytes // max(dtype.itemsize, 1), dtype=dtype)
    view = memoryview(flat).cast("B") if nbytes else memoryview(b"")
    got = 0
    while got < nbytes:
        n = guarded(error, where, "read error", stream.readinto, view[got:])
        if not n:
            raise error(f"{where}: cut short: {got} of {nbytes} data bytes")
        got += n
    return flat.reshape(shape, order="F" if fortran else "C")


def read_npy(path: str, error: type, *, max_bytes: int, kinds: str = NUMERIC_KINDS) -> np.ndarray:
    """One ``.npy`` array, header checked (dtype, shape, ``max_bytes``, file size) before reading."""
    check_regular_file(path, ".npy file", error)
    f = guarded(error, path, "cannot open", open, path, "rb")
    with f:
        size = guarded(error, path, "cannot stat", lambda: os.fstat(f.fileno()).st_size)
        shape, fortran, dtype = _npy_header(f, path, error)
        nbytes = _check_npy_dtype(dtype, shape, path, error, kinds, max_bytes)
        left = size - f.tell()
        if left != nbytes:
            raise error(f"{path}: header declares {nbytes} data bytes, the file holds {left}")
        return _read_exactly(f, nbytes, path, error, shape, fortran, dtype)


def _zip_entry_count(path) -> int:
    """The member count a zip's end-of-directory record declares (0 if it has none), read
    before zipfile builds one object per member."""
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)  # the standard library's own locator of that record
    return 0 if end is None else int(end[zipfile._ECD_ENTRIES_TOTAL])


def read_npz(path: str, error: type, *, max_bytes, kinds: str = NUMERIC_KINDS) -> tuple[dict, list]:
    """The arrays of an ``.npz`` archive, each checked before it is decompressed.

    ``max_bytes(key)`` gives the byte cap of array ``key``, or None to skip it unread. Returns
    ``(arrays, skipped_keys)``. Members must be ``.npy`` files, stored or deflated, unencrypted,
    declaring no more than :data:`MAX_EXPANSION` times their compressed size.
    """
    check_regular_file(path, ".npz file", error)
    declared = guarded(error, path, "not a readable .npz (zip) archive", _zip_entry_count, path)
    if declared > MAX_MEMBERS:
        raise error(f"{path}: {declared} archive members, more than the {MAX_MEMBERS} refghost reads")
    zf = guarded(error, path, "not a readable .npz (zip) archive", zipfile.ZipFile, path)
    with zf:
        infos = guarded(error, path, "not a readable .npz (zip) archive", zf.infolist)
        if len(infos) > MAX_MEMBERS:
            raise error(f"{path}: {len(infos)} archive members, more than the {MAX_MEMBERS} refghost reads")
        arrays, skipped, seen = {}, [], set()
        for info in infos:
            name = info.filename
            where = f"{path}:{name}"
            key = name[:-4] if name.endswith(".npy") else name
            if key in seen:
                raise error(f"{path}: array {key!r} is stored twice; refusing an ambiguous archive")
            seen.add(key)
            cap = max_bytes(key)
            if cap is None:
                skipped.append(key)
                continue
            if not name.endswith(".npy"):
                raise error(f"{where}: not an .npy member; an .npz holds only .npy arrays")
            if info.flag_bits & 0x1:
                raise error(f"{where}: encrypted archive member")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise error(f"{where}: compression method {info.compress_type}; .npz members are stored or "
                            f"deflated")
            if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > EXPANSION_SLACK \
                    and info.file_size > MAX_EXPANSION * info.compress_size:
                raise error(f"{where}: {info.compress_size} compressed bytes declare {info.file_size} bytes "
                            f"(more than {MAX_EXPANSION}x); refused as a decompression bomb")
            if info.file_size > cap + 4096:
                raise error(f"{where}: declares {info.file_size} bytes, more than the {cap} this array may have")
            stream = guarded(error, where, "cannot open archive member", zf.open, info)
            with stream:
                shape, fortran, dtype = _npy_header(stream, where, error)
                nbytes = _check_npy_dtype(dtype, shape, where, error, kinds, cap)
                header = guarded(error, where, "read error", stream.tell)
                if header + nbytes != info.file_size:
                    raise error(f"{where}: header declares {nbytes} data bytes, the member holds "
                                f"{info.file_size - header}")
                array = _read_exactly(stream, nbytes, where, error, shape, fortran, dtype)
                # reading to the end makes zipfile check the member's CRC
                if guarded(error, where, "corrupt archive member", stream.read, 1):
                    raise error(f"{where}: trailing bytes after the array")
            arrays[key] = array
        return arrays, skipped
