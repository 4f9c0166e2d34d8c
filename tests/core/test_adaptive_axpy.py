from __future__ import annotations

import time

import numpy as np
from numpy.testing import assert_allclose

from fedshield.core.aggregate import _AdaptiveAxpy


class FakeLib:
    def __init__(self) -> None:
        self.threads = 2

    def get_num_threads(self) -> int:
        return self.threads

    def set_num_threads(self, n: int) -> None:
        self.threads = n


def make(slow_when_threaded: bool):
    lib = FakeLib()
    modes: list[int] = []

    def saxpy(x, y, a):
        modes.append(lib.threads)
        if (lib.threads > 1) == slow_when_threaded:
            time.sleep(0.002)  # the slow mode
        y += np.float32(a) * x
        return y

    return _AdaptiveAxpy(saxpy, [lib]), lib, modes


def test_adaptive_axpy_settles_on_the_faster_mode_and_restores_threads():
    for slow_threaded in (True, False):
        axpy, lib, modes = make(slow_threaded)
        x = np.ones(100_000, np.float32)
        y = np.zeros_like(x)
        for _ in range(40):
            y = axpy(x, y, 0.5)
        assert_allclose(y, 20.0)
        assert lib.threads == 2  # restored after every single-threaded call
        fast = 1 if slow_threaded else 2
        assert modes[-20:].count(fast) >= 17  # mostly the fast mode, some probes


def test_adaptive_axpy_leaves_small_vectors_to_the_blas():
    axpy, _lib, modes = make(True)
    x = np.ones(1000, np.float32)
    axpy(x, np.zeros_like(x), 1.0)
    assert modes == [2]
