"""Differential privacy: the accountant (over ``dp-accounting``) and DP noise.

This layer sits below the models and strategies and never imports torch:
the accountant composes the exact mechanism each round ran
(:mod:`fedshield.privacy.accounting`), and :mod:`fedshield.privacy.noise`
draws Gaussian noise from a seeded generator or, with ``secure_rng``, from the
operating system's cryptographic randomness.
"""
