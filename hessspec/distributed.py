"""Multi-process (multi-host) set-up: one call before any other JAX work in each process.

After :func:`initialize`, ``jax.devices()`` lists the devices of every process, and
:func:`hessspec.hessian_operator` shards its batches over all of them by default: every
process builds the operator from the same data (each keeps only its own shards on its
devices) and every process gets the same eigenvalues.
"""

from __future__ import annotations

import jax

__all__ = ["initialize"]


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
        ValueError: a malformed coordinator address or an impossible rank.
    """
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(
            f"coordinator must be 'host:port' (e.g. 127.0.0.1:23456), got {coordinator!r}."
        )
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must be in [0, {num_processes}), got {process_id}: ranks start at 0."
        )
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # older or newer JAX without the option
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
