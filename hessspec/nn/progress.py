"""Progress of a run: tqdm bars on a terminal, log lines everywhere else.

:class:`Progress` has three styles:

- ``"bars"``: a tqdm bar per training that counts training steps only (its rate and time
  estimate leave out the analyses, which get their own bar below it, one tick per stage);
- ``"lines"``: for logs, batch jobs and ``--no-progress``: one line per training interval
  (every tenth of the steps, and at least every ``line_seconds``) with the step, the loss,
  the time per step and the time left, and one line per analysis stage, each with the time
  since the run started;
- ``"off"``: nothing (library calls that did not ask for progress).

``"auto"`` picks bars when the stream is a terminal and lines otherwise.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO

__all__ = ["AnalysisProgress", "Progress", "TrainingProgress", "format_seconds"]

STYLES = ("auto", "bars", "lines", "off")


def format_seconds(seconds: float) -> str:
    """``"12.3 s"`` below a minute, else ``"h:mm:ss"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """Where a run reports its progress.

    Args:
        style: ``"auto"``, ``"bars"``, ``"lines"`` or ``"off"`` (see the module docstring).
        stream: where to write (default: ``sys.stderr`` at the time of each write).
        line_seconds: in ``"lines"`` style, the longest time between two training lines.
        prefix: first word of every line.
    """

    def __init__(
        self,
        style: str = "auto",
        *,
        stream: TextIO | None = None,
        line_seconds: float = 60.0,
        prefix: str = "hessspec",
    ):
        if style not in STYLES:
            raise ValueError(f"progress style must be one of {STYLES}, got {style!r}.")
        self._stream = stream
        if style == "auto":
            isatty = getattr(self.stream, "isatty", None)
            style = "bars" if isatty is not None and isatty() else "lines"
        self.style = style
        self.line_seconds = float(line_seconds)
        self.prefix = prefix
        self.start = time.perf_counter()

    @classmethod
    def of(cls, progress: bool | str | Progress | None) -> Progress:
        """A :class:`Progress` from what a caller passed: an instance as is, True for
        ``"auto"``, False/None for ``"off"``, or a style name."""
        if isinstance(progress, Progress):
            return progress
        if progress is True:
            return cls("auto")
        if not progress:
            return cls("off")
        return cls(str(progress))

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def enabled(self) -> bool:
        return self.style != "off"

    def elapsed(self) -> float:
        """Seconds since this object was made (the run's start)."""
        return time.perf_counter() - self.start

    def line(self, text: str) -> None:
        """One log line ``"<prefix> [elapsed]: text"`` (in bars style printed above the
        bars; nothing when off)."""
        if not self.enabled:
            return
        message = f"{self.prefix} [{format_seconds(self.elapsed()):>8}]: {text}"
        if self.style == "bars":
            from tqdm.auto import tqdm

            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def training(self, desc: str, total: int, start_step: int = 0) -> TrainingProgress:
        """The progress of one training of ``total`` steps, starting at ``start_step``."""
        return TrainingProgress(self, desc, total, start_step)

    def analysis(self, desc: str, stages: int) -> AnalysisProgress:
        """The progress of one checkpoint's analysis in ``stages`` stages."""
        return AnalysisProgress(self, desc, stages)


class TrainingProgress:
    """Training steps only: :meth:`pause` / :meth:`resume` around every analysis keep the
    analyses (and the compilation before the first step) out of the rate and the time
    estimate. Use :meth:`Progress.training`."""

    def __init__(self, progress: Progress, desc: str, total: int, start_step: int):
        self.progress = progress
        self.desc = desc
        self.total = int(total)
        self.step = int(start_step)
        self.start_step = int(start_step)
        self.loss: float | None = None
        self.seconds = 0.0  # training time of this session, pauses excluded
        self._since = time.perf_counter()
        self._paused = False
        self._last_line = time.perf_counter()
        self._next_fraction = self._fraction_after(self.step)
        self._bar = None
        if progress.style == "bars":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=self.step,
                desc=desc,
                leave=True,
                dynamic_ncols=True,
                file=progress.stream,
                unit="step",
            )
        elif progress.style == "lines":
            if self.step:
                progress.line(f"{desc}: training resumes at step {self.step}/{self.total}")
            elif self.total:
                progress.line(f"{desc}: training {self.total} steps")

    def _fraction_after(self, step: int) -> int:
        """The next step at which a tenth of the training is complete."""
        tenth = max(1, self.total // 10)
        return (step // tenth + 1) * tenth

    def advance(self, steps: int = 1, loss: float | None = None) -> None:
        """``steps`` more training steps are done (``loss``: the latest known loss)."""
        self.step += steps
        if loss is not None:
            self.loss = loss
        if self._bar is not None:
            if loss is not None:
                self._bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            self._bar.update(steps)
        elif self.progress.style == "lines":
            now = time.perf_counter()
            due = self.step >= self._next_fraction or self.step == self.total
            if due or now - self._last_line >= self.progress.line_seconds:
                self._write_line(now)

    def _write_line(self, now: float) -> None:
        done = self.step - self.start_step
        seconds = self.seconds + (now - self._since if not self._paused else 0.0)
        rate = seconds / done if done else 0.0
        left = rate * (self.total - self.step)
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        pace = f", {rate * 1e3:.2f} ms/step" if done else ""
        eta = f", about {format_seconds(left)} of training left" if done and left > 0 else ""
        self.progress.line(
            f"{self.desc}: step {self.step}/{self.total} "
            f"({100 * self.step / max(self.total, 1):.0f}%){loss}{pace}{eta}"
        )
        self._last_line = now
        self._next_fraction = self._fraction_after(self.step)

    def pause(self, status: str = "") -> None:
        """Stop the training clock (an analysis or a compilation follows)."""
        if not self._paused:
            self.seconds += time.perf_counter() - self._since
            self._paused = True
        if self._bar is not None and status:
            self._bar.set_postfix_str(status)

    def resume(self) -> None:
        """Restart the training clock; the bar's rate ignores the pause."""
        if self._paused:
            self._since = time.perf_counter()
            self._paused = False
            if self._bar is not None:
                self._bar.unpause()

    def close(self) -> None:
        self.pause()
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class AnalysisProgress:
    """One checkpoint's analysis: a bar of its stages under the training bar, or one log
    line per stage. Use :meth:`Progress.analysis` as a context manager."""

    def __init__(self, progress: Progress, desc: str, stages: int):
        self.progress = progress
        self.desc = desc
        self.stages = int(stages)
        self.done = 0
        self._bar = None

    def __enter__(self) -> AnalysisProgress:
        if self.progress.style == "bars":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.stages,
                desc=self.desc,
                leave=False,
                dynamic_ncols=True,
                file=self.progress.stream,
                unit="stage",
            )
        return self

    def stage(self, name: str) -> None:
        """A stage begins (the previous one, if any, is done)."""
        if self._bar is not None:
            if self.done:
                self._bar.update(1)
            self._bar.set_postfix_str(name)
        elif self.progress.style == "lines":
            self.progress.line(f"{self.desc}: {name}")
        self.done += 1

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
