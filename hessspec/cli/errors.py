"""How the command line ends: one line on stderr and an exit status.

0 done, 1 failed during the run, 2 bad input, a busy or unusable output folder, or not
enough memory (nothing trained), 130 interrupted
(:data:`hessspec.studies.common.interrupts.EXIT_INTERRUPTED`).
"""

from __future__ import annotations

import sys

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "CLIError", "error", "fail"]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """A problem the CLI reports in one line; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.status = status


def error(message: str, who: str = "") -> int:
    """Print ``message`` as the CLI's error line (``who`` names the process in a
    multi-process run) and return exit status 2."""
    print(f"hessspec.run{who}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def fail(message: str, who: str = "") -> int:
    """Print a failure line and return exit status 1."""
    print(f"hessspec.run{who}: error: {message}", file=sys.stderr)
    return EXIT_FAILED
