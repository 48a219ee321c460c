"""refghost.isolate.call_isolated: a crash, a hang, a blow-up or an exception in the child is one
error in the parent, results come back bit for bit, and nothing is left behind on any path."""

import ctypes
import gc
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from refghost.errors import GoldenError, IsolationError
from refghost.isolate import call_isolated, now_doing

LIMITS = dict(who="Lib", doing="loading m.bin", timeout=20, memory=1 << 30)
MEMFD = "memfd:refghost-isolated"


def _children() -> set[int]:
    """This process's child processes, running or zombie."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids |= {int(p) for p in f.read().split()}
        except OSError:  # the thread ended meanwhile
            pass
    return pids


def _memory_files() -> list[str]:
    """This process's descriptors and mappings of call_isolated's memory files."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor
            pass
    with open("/proc/self/maps") as f:
        maps = [line for line in f if MEMFD in line]
    return [fd for fd in fds if MEMFD in fd] + maps


@pytest.fixture(autouse=True)
def nothing_left_behind():
    shm = sorted(os.listdir("/dev/shm"))
    children = _children()
    yield
    gc.collect()
    assert _children() == children, "a child process was left (running or unreaped)"
    assert _memory_files() == [], "a memory file is still open or mapped"
    assert sorted(os.listdir("/dev/shm")) == shm, "something was left in /dev/shm"


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_small_result_and_arguments():
    assert call_isolated(lambda a, b: {"sum": a + b, "names": [a, b]}, "x", "y", **LIMITS) == \
        {"sum": "xy", "names": ["x", "y"]}


@pytest.mark.parametrize("crash", [lambda: os.kill(os.getpid(), signal.SIGSEGV), lambda: ctypes.string_at(0)],
                         ids=["kill", "null-read"])
def test_a_segfault_is_one_error(crash):
    with pytest.raises(IsolationError, match=r"^Lib crashed \(SIGSEGV\) loading m\.bin$"):
        call_isolated(crash, **LIMITS)


def test_a_hang_is_killed_with_what_it_started(tmp_path):
    """Past the limit the child and its own children are killed (the group), within a second."""
    pid_file = tmp_path / "grandchild"

    def hang():
        sleeper = subprocess.Popen(["sleep", "60"])
        pid_file.write_text(str(sleeper.pid))
        time.sleep(60)

    start = time.monotonic()
    with pytest.raises(IsolationError, match=r"^Lib did not finish loading m\.bin within 2 s \(killed\)$"):
        call_isolated(hang, **{**LIMITS, "timeout": 2})
    assert 2 <= time.monotonic() - start < 3.5
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 2
    while _running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _running(grandchild), "the child's own child survived the timeout"


def test_memory_past_the_limit():
    with pytest.raises(IsolationError, match=r"^Lib ran out of memory loading m\.bin \(limit 256 MiB\)$"):
        call_isolated(lambda: np.ones(1 << 28), **{**LIMITS, "memory": 256 << 20})  # 2 GiB


def test_a_refghost_error_comes_back_as_itself():
    def refuse():
        raise GoldenError("g.h5: format is 'x', expected 'refghost-golden'")

    with pytest.raises(GoldenError) as caught:
        call_isolated(refuse, **LIMITS)
    assert type(caught.value) is GoldenError
    assert str(caught.value) == "g.h5: format is 'x', expected 'refghost-golden'"


def test_a_library_exception_is_one_error_with_its_traceback():
    def decode():
        return b"\xff".decode("utf-8")

    with pytest.raises(IsolationError, match=r"^Lib failed loading m\.bin: UnicodeDecodeError: 'utf-8'") as caught:
        call_isolated(decode, **LIMITS)
    assert "in decode" in caught.value.child_traceback


def test_an_exit_of_the_child_is_one_error():
    with pytest.raises(IsolationError, match=r"^Lib ended its process \(exit status 3\) loading m\.bin$"):
        call_isolated(lambda: os._exit(3), **LIMITS)


def test_big_arrays_come_back_bit_for_bit_through_shared_memory():
    """64 MB of arrays (NaN payloads, -0.0, subnormals included), nested in a dict and a tuple,
    come back identical, writable (read-only if they were), as views of the mapped memory file,
    which goes with them."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, size=(4, 1 << 22), dtype=np.uint32)  # every float32 bit pattern
    frozen = np.arange(5.0)
    frozen.flags.writeable = False
    sent = {"float32": bits.view(np.float32), "pair": (np.arange(1 << 20, dtype=np.float64), np.float64(-0.0)),
            "empty": np.zeros((0, 3), np.float32), "strided": np.arange(10.0)[::3], "frozen": frozen}
    back = call_isolated(lambda: sent, **LIMITS)
    assert np.array_equal(back["float32"].view(np.uint32), bits)
    assert back["float32"].dtype == np.float32 and back["float32"].shape == (4, 1 << 22)
    assert np.array_equal(back["pair"][0], sent["pair"][0]) and np.signbit(back["pair"][1])
    assert back["empty"].shape == (0, 3) and np.array_equal(back["strided"], [0.0, 3.0, 6.0, 9.0])
    assert any(MEMFD in m for m in _memory_files()), "the arrays are not views of the memory file"
    back["float32"][0, 0] = 1.0  # writable (copy on write, the child's bytes untouched)
    assert not back["frozen"].flags.writeable and np.array_equal(back["frozen"], frozen)
    del back


def test_the_parent_interrupted_kills_the_child():
    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        start = time.monotonic()
        with pytest.raises(Interrupted):
            call_isolated(time.sleep, 60, **LIMITS)
        assert time.monotonic() - start < 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="timeout"):
        call_isolated(print, **{**LIMITS, "timeout": 0})
    with pytest.raises(ValueError, match="memory"):
        call_isolated(print, **{**LIMITS, "memory": -1})


def test_the_error_names_what_the_child_was_doing():
    def load_then_run():
        now_doing("running m.bin")
        os.kill(os.getpid(), signal.SIGSEGV)

    with pytest.raises(IsolationError, match=r"^Lib crashed \(SIGSEGV\) running m\.bin$"):
        call_isolated(load_then_run, **LIMITS)
    now_doing("outside any call: nothing")
