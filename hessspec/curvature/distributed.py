"""Multi-process (multi-host) set-up: one call before any other JAX work in each process.

After :func:`initialize`, ``jax.devices()`` lists the devices of every process, and
:func:`hessspec.hessian_operator` shards its batches over all of them by default: every
process builds the operator from the same data (each keeps only its own shards on its
devices) and every process gets the same eigenvalues. Every process must therefore run the
same computations in the same order; :func:`gather` lets them take decisions together
(e.g. refuse a run on every process when one of them lacks the memory).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

__all__ = ["check_arguments", "gather", "initialize", "is_main_process"]


def check_arguments(coordinator: str, num_processes: int, process_id: int) -> None:
    """Check the arguments of :func:`initialize` without starting anything.

    Raises:
        ValueError: a coordinator that is not ``host:port``, ``num_processes < 1``, or
            ``process_id`` outside ``[0, num_processes)``; the message names the fix.
    """
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"coordinator must be 'host:port' with a port in 1..65535 (e.g. "
            f"127.0.0.1:23456), got {coordinator!r}."
        )
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must be in [0, {num_processes}) for num_processes={num_processes}, "
            f"got {process_id}: ranks start at 0."
        )


def is_main_process() -> bool:
    """Whether this is process 0 (always true outside a multi-process job)."""
    return jax.process_index() == 0


def gather(values: Sequence[float]) -> np.ndarray:
    """Every process's ``values``, stacked: ``(num_processes, len(values))``, row ``i`` from
    process ``i``, the same array on every process.

    A collective: every process must call it at the same point (with as many values).
    Outside a multi-process job it returns ``values`` as one row without any JAX work.
    Values travel as float64 with x64 enabled, else float32 (about 7 significant digits,
    plenty for byte counts and flags).
    """
    dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    row = np.asarray(values, dtype=dtype).reshape(-1)
    if jax.process_count() == 1:
        return row[None, :]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(row, tiled=False)).reshape(
        jax.process_count(), row.size
    )


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a ``jax.distributed`` job.

    Args:
        coordinator: ``host:port`` of process 0 (e.g. ``127.0.0.1:23456`` for processes on one
            machine); every process passes the same address.
        num_processes: how many processes take part (>= 1).
        process_id: this process's rank, ``0 <= process_id < num_processes``.

    On CPU the cross-process collectives use gloo (selected here, before the backend starts).
    Example, two processes on one machine, each in its own shell::

        python -m hessspec.run --coordinator 127.0.0.1:23456 --num-processes 2 --process-id 0
        python -m hessspec.run --coordinator 127.0.0.1:23456 --num-processes 2 --process-id 1

    Raises:
        ValueError: a malformed coordinator address or an impossible rank
            (:func:`check_arguments`).
    """
    check_arguments(coordinator, num_processes, process_id)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # older or newer JAX without the option
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
