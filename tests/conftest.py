"""Strict test set-up: float64 everywhere, fixed keys, warnings from hessspec are errors."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    """A fixed PRNG key: every test is reproducible."""
    return jax.random.key(0)


@pytest.fixture
def rng():
    """A fixed numpy generator."""
    return np.random.default_rng(0)
