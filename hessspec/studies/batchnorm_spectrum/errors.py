"""How a BatchNorm spectrum run stops: refused before it starts (:class:`SetupError`),
interrupted (:class:`RunInterrupted`) or failed (:class:`RunFailed`). Each carries the one
line that says what happened and what to do; the command line prints it and picks the exit
status (2, 130, 1)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["RunFailed", "RunInterrupted", "SetupError", "failure_line", "translated_failures"]


class SetupError(RuntimeError):
    """The study cannot start: data missing or malformed, a model that does not fit it, an
    analysis that does not fit in memory, or another process of the job that refused.
    Nothing was trained or written."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by an interrupt (Ctrl-C, SIGTERM) after recording what it measured.

    Attributes:
        where: what was kept and how to continue, e.g. ``"what was measured is in
            out/; continue with --resume --out out"``.
    """

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where

    def __str__(self) -> str:
        return f"interrupted; {self.where}"


class RunFailed(RuntimeError):
    """A run that failed after it started, its failure recorded in results.json (status
    "failed"). ``str()`` is the one line for the user; ``__cause__`` the original error."""


def failure_line(error: BaseException, out_dir: Path, network: str | None) -> str:
    """The one line that says why a run failed and what to do.

    Args:
        error: what the run raised.
        out_dir: the folder the run wrote.
        network: the network whose training diverged, if known.
    """
    from hessspec.nn.train import TrainingDiverged
    from hessspec.studies.common.runfolder import OutputWriteError

    if isinstance(error, TrainingDiverged):
        who = f"training {network}" if network else "training"
        return (
            f"{who} diverged: the mini-batch loss became {error.value} at step {error.step}; "
            f"lower train.learning_rate (e.g. --set train.learning_rate=...) or the batch size "
            f"noise, and start again. What was measured before is in {out_dir}/ (status failed)."
        )
    if isinstance(error, OutputWriteError):
        return f"{error.strerror}. The folder keeps the last consistent state ({out_dir}/)."
    return (
        f"{type(error).__name__}: {error}. What was measured is in {out_dir}/ (status "
        "failed); run again with --debug for the traceback."
    )


@contextlib.contextmanager
def translated_failures(
    *,
    interrupted: str,
    failed: Callable[[Exception], str],
    passing: tuple[type[Exception], ...] = (),
) -> Iterator[None]:
    """Inside: a KeyboardInterrupt becomes :class:`RunInterrupted` (``interrupted`` says
    what was kept), an exception :class:`RunFailed` with the line ``failed(error)`` (the
    error its cause), except the types in ``passing``, which propagate as they are."""
    try:
        yield
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted) from None
    except passing:
        raise
    except Exception as e:
        raise RunFailed(failed(e)) from e
