"""Strict test set-up: float64 everywhere, fixed keys, warnings from hessspec are errors.

Compiled programs go to the persistent compilation cache in the user's cache folder
(``~/.cache/hessspec/jax``; ``HESSSPEC_COMPILATION_CACHE=off`` switches it off, a path moves
it), so a second run of the suite loads instead of compiling."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
# Test programs are tiny: XLA's LLVM optimization costs more compile time than it saves run
# time, and compilation dominates the suite on 2 cores. Level 0 for every program but the
# solver engine and its helpers, which pin their own levels (hessspec.linalg.krylov), so the
# solvers run here exactly as shipped. Subprocesses (CLI, workers, notebook kernels) inherit.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from hessspec.compilation_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()

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
