"""The work counters of the engine (refghost/engine/counters.py).

What the engine relies on: every unit index of a phase is claimed by exactly one thread, however
many threads race for it, and a thread that waited for the phase sees every unit's writes.
"""

import numba
import numpy as np

from refghost.engine import counters as work


@numba.njit(parallel=True)
def _race(nthreads, units, phases, owner, value):
    """Every thread claims units of ``phases`` phases in turn; unit u of phase q writes its claimer
    into owner[q, u] and q + u into value[q, u]; after each phase, every thread checks that all of
    that phase's values are there (visibility) and counts what it found wrong."""
    wrong = np.zeros(nthreads, np.int64)
    counters = np.zeros(phases * work.STRIDE, np.int64)
    for t in numba.prange(nthreads):
        for q in range(phases):
            u = work.claim(counters, q)
            while u < units:
                owner[q, u] = t
                value[q, u] = q + u
                work.finish(counters, q)
                u = work.claim(counters, q)
            work.wait_done(counters, q, units)
            for v in range(units):
                if value[q, v] != q + v:
                    wrong[t] += 1
    return wrong, counters


def test_each_unit_is_claimed_once_and_seen_by_every_thread_after_the_wait():
    threads = max(2, numba.config.NUMBA_NUM_THREADS)
    phases, units = 300, 257
    owner = np.full((phases, units), -1, np.int64)
    value = np.full((phases, units), -1, np.int64)
    wrong, counters = _race(threads, units, phases, owner, value)
    assert (owner >= 0).all()  # every unit done (by exactly one thread: claims return distinct indices)
    np.testing.assert_array_equal(value, np.add.outer(np.arange(phases), np.arange(units)))
    assert wrong.sum() == 0
    done = counters[work.STRIDE // 2::work.STRIDE]
    claimed = counters[::work.STRIDE]
    np.testing.assert_array_equal(done, units)
    # every worker's last claim of a phase finds nothing left: one claim past the units each
    np.testing.assert_array_equal(claimed, units + threads)


@numba.njit
def _add_and_load(counters, index, delta):
    old = work.atomic_add(counters, index, delta)
    return old, work.atomic_load(counters, index)


def test_atomic_add_returns_the_old_value_and_load_sees_the_new_one():
    counters = np.zeros(4, np.int64)
    counters[2] = 40
    assert _add_and_load(counters, 2, 2) == (40, 42)
    assert _add_and_load(counters, 2, -50) == (42, -8)
    np.testing.assert_array_equal(counters, [0, 0, -8, 0])
