"""Calls that cannot take refghost down: :func:`call_isolated` runs a function in a child process.

A C library given an untrusted file (HDF5 on a corrupt golden, a runtime loading a mutated model)
can crash the process (SIGSEGV), loop forever, or allocate until the machine swaps. Run in a
child, each of these becomes one :class:`~refghost.errors.IsolationError` in the parent::

    MNN crashed (SIGSEGV) loading model.mnn
    HDF5 did not finish reading golden.h5 within 60 s (killed)
    ncnn ran out of memory running model.param (limit 8 GiB)

and the child's own :class:`~refghost.errors.RefghostError` is raised again in the parent, with
its type and message.

How
---
* **fork**, by :func:`os.fork` directly (Linux). The child starts at once as a copy-on-write image
  of the parent: the function may be a closure, its arguments (a 300 MB golden input) are not
  copied or pickled, and the libraries already imported stay imported (no second import of
  OpenVINO, no Numba recompile). ``multiprocessing``'s "fork" context would do the same fork but
  add its own pipes, its result queue (pickled) and its resource tracker (which warns about
  shared-memory segments it thinks leaked); "spawn"/"forkserver" would re-import refghost and
  the runtime in a fresh interpreter (seconds) and pickle every argument. The cost of fork: only
  the calling thread exists in the child, so a lock another thread held at the fork stays held
  there (a call that needs it hangs, and ends as a timeout, never as a hang of refghost), and a
  GNU OpenMP thread pool the parent started cannot be used in the child: Numba's "omp" layer
  ends a child that launches a parallel kernel (SIGTERM, "fork() called from a process already
  using GNU OpenMP"), and ncnn run with 2 threads in a child hangs when ncnn (or PyTorch, which
  ships the same libgomp) ran multi-threaded in the parent first. So run refghost's own kernels
  in the parent, and a runtime only ever in children (Numba's pool in the parent does not
  touch ncnn's libgomp: measured).
* **limits**: the wall time is measured by the parent, which kills the child's whole process
  group (SIGKILL) when it passes; the memory limit is ``RLIMIT_AS`` set in the child to the
  address space it inherited plus ``memory`` bytes, so an allocation past it fails (a Python or
  NumPy ``MemoryError``, a C++ ``std::bad_alloc``) instead of growing the machine's memory.
* **results**: the child pickles its result with protocol 5, NumPy arrays out of band, into an
  anonymous memory file (:func:`os.memfd_create`): every array's bytes are written once into it,
  the parent maps the file (copy-on-write, :data:`mmap.ACCESS_COPY`) and the unpickled arrays are
  views of that mapping, writable and never copied again. Small results take the same path (a few
  hundred bytes).
* **what it was doing**: a call that goes through stages names the one it is in with
  :func:`now_doing` (``"running model.mnn"`` after ``"loading model.mnn"``), written to a small
  page shared with the parent, which the messages then name.
* **nothing left behind**: the memory file has no name (it is freed with its last descriptor and
  mapping); the child is in its own process group, which the parent kills and reaps on every
  path (result, error, timeout, and the parent's own KeyboardInterrupt or exception); a child
  whose parent dies is killed by the kernel (``PR_SET_PDEATHSIG``).

Overhead (measured on this project's 2-vCPU machine, 2026-12-08, another agent's work on the
other core, 5 runs each): a call that returns nothing costs 5-12 ms (the fork of a 400 MB
process and the wait). Returning 300 MB of float32 arrays (8 of 37.5 MB, a golden's worth)
costs 0.19-0.33 s more than returning them in process (the child's copy into the memory file),
plus 0.02-0.06 s when they are first read (the mapping's page faults): a quarter of what
pickling and unpickling the same arrays costs (1.07 s, before any pipe). The arrays come back
bit for bit. A runtime adapter's whole ``observe`` (GhostNet 0.5x at 64x64, every tensor
exposed, 1-2 MB of them, the runtime already imported) takes 0.05-0.1 s longer isolated: ONNX
Runtime, MNN, ncnn, LiteRT and OpenVINO alike.
"""

from __future__ import annotations

import ctypes
import faulthandler
import mmap
import os
import pickle
import resource
import select
import signal
import struct
import sys
import time
import traceback

from .errors import IsolationError, RefghostError

#: Byte alignment of each array in the result file (a cache line; NumPy needs at most 16).
ALIGNMENT = 64
#: Exit status of a child that could not even write its outcome (a pickling failure of the
#: failure itself); any other status than 0 is the function's own (``os._exit``, a C ``exit``).
_UNWRITABLE = 70
_TRAILER = struct.Struct("<QQ")  # (offset, length) of the header, in the file's last 16 bytes
_PR_SET_PDEATHSIG = 1
#: Bytes of the page a child says what it is doing in (:func:`now_doing`): 2 of length, the text.
_DOING_BYTES = 512
#: That page, in a child of :func:`call_isolated` (None elsewhere).
_doing_page = None


def call_isolated(fn, *args, who: str, doing: str, timeout: float, memory: int | None):
    """``fn(*args)`` run in a forked child with a wall-time and a memory limit; its result.

    ``who`` names the library (``"MNN"``, ``"HDF5"``), ``doing`` what it was doing (``"loading
    model.mnn"``); both go into the messages. ``timeout``: seconds of wall time; ``memory``: bytes
    of address space the call may add to what this process holds at the call (None: no limit).
    Keyword arguments of ``fn``: pass a :func:`functools.partial` or a lambda (nothing about
    ``fn`` is pickled).

    The result (any picklable object; NumPy arrays in it are handed back through shared memory,
    not pickled) is returned. Raises :class:`~refghost.errors.IsolationError` when the child
    crashed (a signal), did not finish in time (it is killed), ran out of memory, exited by
    itself, or raised an exception that is not a ``RefghostError`` (its traceback is the error's
    ``child_traceback``); a ``RefghostError`` raised by ``fn`` is raised again as is.
    """
    if not (timeout > 0 and timeout < float("inf")):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    if memory is not None and memory <= 0:
        raise ValueError(f"memory must be a positive number of bytes or None, got {memory}")
    for stream in (sys.stdout, sys.stderr):  # else the child inherits, and prints again, what is buffered
        _flush(stream)
    page = mmap.mmap(-1, _DOING_BYTES)  # anonymous and shared with the child
    fd = os.memfd_create("refghost-isolated", os.MFD_CLOEXEC)
    pid = None
    reaped = False
    try:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child(fd, page, parent, fn, args, memory)  # never returns
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first
        except OSError:
            pass
        ended = _wait(pid, timeout)
        _kill_group(pid)  # the child past its time, or what it left running (its group outlives it)
        status = os.waitpid(pid, 0)[1]
        reaped = True
        if not ended:
            raise IsolationError(f"{who} did not finish {_doing(page, doing)} within {timeout:g} s (killed)")
        return _outcome(fd, status, who, _doing(page, doing), memory)
    finally:
        if pid is not None and not reaped:  # the parent was interrupted or failed while waiting
            _kill_group(pid)
            os.waitpid(pid, 0)
        os.close(fd)
        page.close()


def now_doing(text: str) -> None:
    """Inside a call of :func:`call_isolated`: what the call does from now on (``"running
    model.mnn"`` after ``"loading model.mnn"``), named by an error instead of the caller's
    ``doing``. Outside one, nothing. (A few bytes written to a page shared with the parent.)"""
    if _doing_page is None:
        return
    data = text.encode("utf-8", "replace")[:_DOING_BYTES - 2]
    _doing_page[2:2 + len(data)] = data
    _doing_page[:2] = len(data).to_bytes(2, "little")


def _doing(page, default: str) -> str:
    n = int.from_bytes(page[:2], "little")
    return page[2:2 + n].decode("utf-8", "replace") if 0 < n <= _DOING_BYTES - 2 else default


# ------------------------------------------------------------------------------------------------
# the child
# ------------------------------------------------------------------------------------------------
def _child(fd: int, page, parent: int, fn, args, memory) -> None:
    """Run ``fn(*args)``, write its outcome to ``fd``, and leave with ``os._exit`` (never return
    into the parent's code, run no atexit handler, flush nothing of the parent's files)."""
    global _doing_page
    code = _UNWRITABLE
    try:
        _doing_page = page
        os.setpgid(0, 0)
        _die_with(parent)
        faulthandler.disable()  # the parent reports a crash, in one line
        if memory is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = _address_space() + memory
            resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard),
                                                    hard))
        try:
            outcome = ("value", fn(*args))
        except MemoryError:
            outcome = ("memory", None)
        except BaseException as exc:  # noqa: BLE001 - every way fn can end is handed to the parent
            outcome = ("raised", _portable(exc))
        try:
            _write(fd, outcome)
        except Exception as exc:  # noqa: BLE001 - an unpicklable result
            _write(fd, ("unpicklable", f"{type(exc).__name__}: {exc}"))
        code = 0
    except BaseException:  # noqa: BLE001 - the exit status says it
        pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        os._exit(code)


def _die_with(parent: int) -> None:
    """Ask the kernel to kill this process when the thread that forked it ends."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent ended before the request was made
        os._exit(_UNWRITABLE)


def _address_space() -> int:
    """Bytes of address space this process maps now (``VmSize``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * mmap.PAGESIZE


def _portable(exc: BaseException) -> tuple:
    """What the parent needs of an exception: the object itself if it survives pickling, else its
    type name and message; and the traceback's text."""
    text = "".join(traceback.format_exception(exc))
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - an exception class that does not pickle
        blob = None
    return blob, type(exc).__name__, str(exc), isinstance(exc, RefghostError), text


def _write(fd: int, outcome) -> None:
    """``outcome`` pickled into the empty file ``fd``: out-of-band buffers at aligned offsets,
    then the header (the in-band pickle and the buffers' spans), then the trailer."""
    buffers = []
    payload = pickle.dumps(outcome, protocol=5, buffer_callback=buffers.append)
    spans, offset = [], 0
    for buffer in buffers:
        raw = buffer.raw()
        _pwrite_all(fd, raw, offset)
        spans.append((offset, raw.nbytes))
        offset += -(-raw.nbytes // ALIGNMENT) * ALIGNMENT
    header = pickle.dumps((payload, spans), protocol=5)
    _pwrite_all(fd, header, offset)
    _pwrite_all(fd, _TRAILER.pack(offset, len(header)), offset + len(header))


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _flush(stream) -> None:
    try:
        stream.flush()
    except Exception:  # noqa: BLE001 - a closed or broken stream: nothing to flush
        pass


# ------------------------------------------------------------------------------------------------
# the parent
# ------------------------------------------------------------------------------------------------
def _wait(pid: int, timeout: float) -> bool:
    """Whether the child ended within ``timeout`` seconds. It is left unreaped, so that its
    process id, and the id of its group, cannot be reused before the group is killed."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # a kernel older than 5.3: poll
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.01)
        return False
    try:
        while not select.select([pidfd], [], [], max(deadline - time.monotonic(), 0))[0]:
            if time.monotonic() >= deadline:
                return False
    finally:
        os.close(pidfd)
    return True


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:  # no such group left
        pass


def _outcome(fd: int, status: int, who: str, doing: str, memory):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGKILL:
            raise IsolationError(f"{who} was killed (SIGKILL, by another process or the system's out-of-memory "
                                 f"killer) {doing}")
        raise IsolationError(f"{who} crashed ({_signal_name(sig)}) {doing}")
    code = os.waitstatus_to_exitcode(status)
    size = os.fstat(fd).st_size
    if code != 0 or size < _TRAILER.size:
        raise IsolationError(f"{who} ended its process (exit status {code}) {doing}"
                             + ("" if code else ", with no result"))
    kind, value = _read(fd, size)
    if kind == "value":
        return value
    if kind == "memory":
        limit = f" (limit {format_bytes(memory)})" if memory is not None else ""
        raise IsolationError(f"{who} ran out of memory {doing}{limit}")
    if kind == "unpicklable":
        raise IsolationError(f"{who} {doing}: its result cannot be handed back from the child process ({value})")
    blob, name, message, is_refghost, text = value
    exc = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:  # noqa: BLE001 - rebuilt from its name and message below
            exc = None
    if is_refghost:
        if not isinstance(exc, RefghostError):
            exc = RefghostError(message)
        raise exc.with_traceback(None)
    if isinstance(exc, MemoryError):
        raise IsolationError(f"{who} ran out of memory {doing}")
    error = IsolationError(f"{who} failed {doing}: {name}: {message}")
    error.child_traceback = text
    raise error


def _read(fd: int, size: int):
    offset, length = _TRAILER.unpack(os.pread(fd, _TRAILER.size, size - _TRAILER.size))
    payload, spans = pickle.loads(os.pread(fd, length, offset))
    if not spans:
        return pickle.loads(payload)
    mapping = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))  # lives as long as an array uses it
    return pickle.loads(payload, buffers=[mapping[start:start + n] for start, n in spans])


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def format_bytes(n: int) -> str:
    """``8 GiB``, ``1.5 GiB``, ``64 MiB``, ``512 KiB``, ``100 bytes``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} bytes"
