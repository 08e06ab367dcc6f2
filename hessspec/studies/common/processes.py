"""Several processes running one study together: which one this is, and decisions they take
together.

In a multi-process run (``--coordinator HOST:PORT --num-processes N --process-id I``) every
process trains the same networks and runs the same analyses in the same order; process 0
alone writes the output folder. A decision that could differ between processes (the output
folder check, the memory preflight, a setup error) must be taken by all of them alike, or
some would wait forever in a collective the others never reach: :func:`agree`.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ONE_PROCESS", "ProcessRole", "agree"]


class ProcessRole(NamedTuple):
    """This process's place in a run: ``index`` of ``count`` processes (0 of 1 alone)."""

    index: int = 0
    count: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the output (process 0)."""
        return self.index == 0

    @property
    def multi(self) -> bool:
        """Whether the run has more than one process."""
        return self.count > 1

    @property
    def label(self) -> str:
        """``" (process I of N)"`` in a multi-process run (for messages), else ``""``."""
        return f" (process {self.index} of {self.count})" if self.multi else ""


#: The role of a process that runs alone.
ONE_PROCESS = ProcessRole()


def agree(message: str | None, *, multi_process: bool) -> str | None:
    """A refusal decided by all processes together.

    Each process passes its own message (None: no objection). In a multi-process run every
    process learns whether any objected (a collective,
    :func:`hessspec.curvature.distributed.gather`: all must call it at the same point) and
    all return a message if one did: their own, or one naming the processes that refused.
    With one process ``message`` is returned as is (no JAX work).
    """
    if not multi_process:
        return message
    from hessspec.curvature import distributed

    flags = distributed.gather([1.0 if message else 0.0])[:, 0]
    if message:
        return message
    refused = [str(i) for i, flag in enumerate(flags) if flag]
    if refused:
        return (
            f"process {', '.join(refused)} refused to start (its message says why); nothing "
            "was run."
        )
    return None
