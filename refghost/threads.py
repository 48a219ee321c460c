"""Thread settings, in one place: the BLAS pool held at one thread, and when work goes parallel.

refghost's parallel work runs on Numba's threads (``numba.set_num_threads`` /
``NUMBA_NUM_THREADS``, the only knob left to the user). BLAS is held at one thread around every
forward pass (:func:`single_threaded_blas`): the engine calls GEMM tiles from inside Numba's
threads, where a multi-threaded BLAS would oversubscribe the cores, and the interpreter's dense
convolutions then give the same bits for any thread count.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

#: Below this much work a depthwise conv, a squeeze-excite or the stem runs serially (multiply-adds;
#: for a squeeze-excite, the pixels it averages and scales): a
#: parallel region costs microseconds to launch (and much more when another process holds the
#: other core). Each plane is computed by one thread whatever the split, so this changes speed,
#: never bits. GhostNet's smallest depthwise layer at 320x320 input (480x10x10, 3x3) has 432,000.
PARALLEL_MIN_WORK = 1 << 15

_controller = None
_controller_lock = threading.Lock()


def _blas_controller():
    """threadpoolctl's view of the BLAS libraries, built once (discovering them costs ~2 ms)."""
    global _controller
    with _controller_lock:
        if _controller is None:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController().select(user_api="blas")
        return _controller


@contextmanager
def single_threaded_blas():
    """Pin the BLAS pool to one thread for the duration (applying the limit costs ~10 us): results
    then do not depend on the thread count, and OpenBLAS's spinning threads do not fight Numba's
    for the cores."""
    with _blas_controller().limit(limits=1):
        yield
