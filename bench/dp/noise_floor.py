"""Why a secure DP-SGD step stays near 1.8x a plain one: four draws a coordinate.

Times, in one process, one step's noise for the digits MLP (4,810
parameters): numpy's seeded ``standard_normal`` (one draw a coordinate, what
a seeded DP step uses) against :class:`fedshield.privacy.noise.SecureGaussian`
(four keystream draws a coordinate, summed and halved: the floating-point
defence), and the keystream alone. Four draws cannot cost less than about
four of numpy's own draws, whatever the random source.

Usage::

    .venv/bin/python bench/dp/noise_floor.py
"""

from __future__ import annotations

import timeit

import numpy as np

from fedshield.privacy.noise import SecureGaussian, SecureRandom

SIZE = 4810


def main() -> None:
    secure, source = SecureGaussian(), SecureRandom()
    seeded = np.random.default_rng(0)
    cases = {
        "numpy seeded, 1 draw a coordinate": lambda: seeded.standard_normal(SIZE),
        "numpy seeded, 4 draws a coordinate": lambda: seeded.standard_normal(4 * SIZE),
        "SecureGaussian (4 keystream draws)": lambda: secure.sample(SIZE, 1.0),
        "keystream words only (4 a coordinate)": lambda: source.words(4 * SIZE),
    }
    base = None
    for name, draw in cases.items():
        seconds = min(timeit.repeat(draw, number=300, repeat=7)) / 300
        base = base or seconds
        print(f"{name:40s} {seconds * 1e6:7.1f} us  ({seconds / base:.2f}x)")


if __name__ == "__main__":
    main()
