"""Ctrl-C while ``python -m hessspec.run`` is still loading: one line, exit status 130.

``python -m hessspec.run`` imports the package (JAX, flax, ...) for a second or two before
the command line's own interrupt handling
(:class:`hessspec.studies.common.interrupts.InterruptGuard`) starts. Imported first by
``hessspec/__init__.py``, this module makes SIGINT and SIGTERM in that window print one
line and end the process (nothing has been written yet) instead of printing a traceback of
the imports. It does so only when the process was started as
``python -m hessspec...``: importing hessspec elsewhere (a notebook, a test, a script)
leaves the signal handlers alone.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["started_as_command"]


def started_as_command() -> bool:
    """Whether this process is ``python -m hessspec[.something]`` still locating its main
    module (``sys.argv[0]`` is ``"-m"`` until then)."""
    if sys.argv[:1] != ["-m"]:
        return False
    orig = list(getattr(sys, "orig_argv", []))
    if "-m" not in orig or orig.index("-m") + 1 >= len(orig):
        return False
    target = orig[orig.index("-m") + 1]
    return target == "hessspec" or target.startswith("hessspec.")


def _interrupted(signum, frame) -> None:
    os.write(2, b"hessspec.run: interrupted while starting; nothing was written\n")
    os._exit(130)


if started_as_command():
    for _signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(_signum) in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(_signum, _interrupted)
