"""SIGINT and SIGTERM that act within a second, in every phase of a run.

Python runs a signal handler only between bytecodes of the main thread. While the main
thread waits in native code (an XLA compilation, a long compiled Lanczos loop, a blocking
device-to-host copy) a Ctrl-C would wait with it, for minutes on a big model.
:class:`InterruptGuard` therefore works on two levels:

1. its handlers turn SIGINT and SIGTERM into ``KeyboardInterrupt`` in the main thread, so
   the run unwinds normally and records what it measured (status "interrupted"). Inside a
   :meth:`~InterruptGuard.critical` section (a file being committed, a folder being swapped)
   the interrupt is held until the section ends, so no state is left half-changed;
2. a watchdog thread learns of every signal at once (``signal.set_wakeup_fd``, which the
   interpreter writes from its C-level handler). If the main thread has not reacted within
   ``grace_seconds`` it is stuck in native code: the watchdog then calls
   :attr:`~InterruptGuard.on_stuck` (the run writes its results.json, status "interrupted",
   from the state it already holds) and ends the process with exit status 130. A second
   signal while the run is finishing up does the same at once.

The watchdog never runs while the main thread holds :attr:`~InterruptGuard.lock` (the run
holds it while it changes its results), so the file it writes is always consistent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["EXIT_INTERRUPTED", "InterruptGuard"]

#: Exit status of an interrupted run (128 + SIGINT, as shells report Ctrl-C).
EXIT_INTERRUPTED = 130


def _swallows_exceptions(frame) -> bool:
    """Whether ``frame`` runs code whose exceptions Python ignores: a garbage-collector
    callback (JAX registers one) or a ``__del__`` method."""
    import gc

    if frame is None:
        return False
    code = frame.f_code
    if code.co_name == "__del__":
        return True
    return any(getattr(callback, "__code__", None) is code for callback in gc.callbacks)


class InterruptGuard:
    """Install with ``with InterruptGuard() as guard:`` in the main thread (elsewhere it
    does nothing and signals keep their handlers).

    Args:
        grace_seconds: how long the main thread may take to react to a signal before the
            watchdog finishes the run itself.
        finish_seconds: how long the main thread may take, after reacting, to write what it
            measured (a report, the training state) before the watchdog ends the process.
        message: printed to stderr when the watchdog ends the process (the exit status is
            :data:`EXIT_INTERRUPTED`).

    Attributes:
        lock: held by the main thread while it changes state that :attr:`on_stuck` writes.
        on_stuck: ``() -> str | None`` called from the watchdog thread (holding
            :attr:`lock`) before it ends the process; returns an extra line to print.
        finishing: set by the run once it handles the interrupt (writing its results):
            signals are then only counted, and a second one ends the process at once.
    """

    def __init__(
        self,
        *,
        grace_seconds: float = 0.5,
        finish_seconds: float = 60.0,
        message: str = "hessspec.run: interrupted",
    ):
        self.grace_seconds = float(grace_seconds)
        self.finish_seconds = float(finish_seconds)
        self.message = message
        self.lock = threading.RLock()
        self.on_stuck: Callable[[], str | None] | None = None
        self._finishing = False
        self._signals_at_finish = 0
        self.installed = False
        self.signals = 0  # seen by the Python-level handler (main thread)
        self._arrived = 0  # seen by the watchdog (C level)
        self._critical = 0
        self._held: int | None = None
        self._previous: dict[int, object] = {}
        self._previous_fd: int | None = None
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_signum = signal.SIGINT
        self._redelivery: threading.Timer | None = None
        self._previous_hook = sys.unraisablehook
        self._reacted = threading.Condition()

    # -- installation ----------------------------------------------------------------------

    def install(self) -> InterruptGuard:
        """Install the handlers and start the watchdog (main thread only; else a no-op)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._stopping = False
        self._pipe = (read_fd, write_fd)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="hessspec-interrupts", daemon=True)
        self._thread.start()
        self.installed = True
        return self

    def uninstall(self) -> None:
        """Put back the previous handlers and stop the watchdog."""
        if not self.installed:
            return
        signal.set_wakeup_fd(self._previous_fd if self._previous_fd is not None else -1)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        sys.unraisablehook = self._previous_hook
        self._cancel_redelivery()
        read_fd, write_fd = self._pipe
        self._stopping = True
        os.write(write_fd, b"\x00")  # wakes the watchdog, which then stops
        self._thread.join(timeout=5)
        os.close(read_fd)
        os.close(write_fd)
        self.installed = False

    def __enter__(self) -> InterruptGuard:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def finishing(self) -> bool:
        """Whether the run is writing its results after an interrupt or an error: set it
        then; every signal that arrives from now on ends the process at once."""
        return self._finishing

    @finishing.setter
    def finishing(self, value: bool) -> None:
        if value and not self._finishing:
            self._signals_at_finish = self.signals
        self._finishing = bool(value)

    # -- main thread -----------------------------------------------------------------------

    def _handle(self, signum, frame) -> None:
        with self._reacted:
            self.signals += 1
            self._reacted.notify_all()
        if self.finishing:
            return  # the watchdog ends the process if this is a second signal
        if self._critical:
            self._held = signum
            return
        self._last_signum = signum
        if _swallows_exceptions(frame):
            # a KeyboardInterrupt raised in a gc callback or a __del__ would be printed
            # and dropped: deliver the signal again once that code has returned
            self._deliver_again()
            return
        self._cancel_redelivery()  # this interrupt is the one a redelivery would raise
        raise KeyboardInterrupt

    def _deliver_again(self) -> None:
        """Send the last signal again in 50 ms, once: a redelivery already pending is not
        doubled, so one Ctrl-C never becomes two."""
        if self._redelivery is not None and self._redelivery.is_alive():
            return
        self._redelivery = threading.Timer(0.05, self._redeliver)
        self._redelivery.daemon = True
        self._redelivery.start()

    def _redeliver(self) -> None:
        if self.installed and not self._stopping:
            os.kill(os.getpid(), self._last_signum)

    def _cancel_redelivery(self) -> None:
        if self._redelivery is not None:
            self._redelivery.cancel()
            self._redelivery = None

    def _unraisable(self, info) -> None:
        """``sys.unraisablehook`` while installed: Python dropped an exception it could not
        raise (one in a weakref callback, a ``__del__``, a gc callback). If that was our
        interrupt, deliver the signal again instead of printing it."""
        if info.exc_type is KeyboardInterrupt and self.installed and not self.finishing:
            self._deliver_again()
            return
        self._previous_hook(info)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Hold SIGINT/SIGTERM until the block ends (then ``KeyboardInterrupt`` is raised),
        and keep the watchdog out (:attr:`lock`) while the block changes state."""
        with self.lock:
            self._critical += 1
            try:
                yield
            finally:
                self._critical -= 1
        if not self._critical and self._held is not None and not self.finishing:
            self._held = None
            raise KeyboardInterrupt

    # -- watchdog --------------------------------------------------------------------------

    def _watch(self) -> None:
        read_fd = self._pipe[0]
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if self._stopping or not data:
                return
            numbers = [b for b in data if b in (signal.SIGINT, signal.SIGTERM)]
            if not numbers:
                continue
            self._arrived += len(numbers)
            if self.finishing and self._arrived > self._signals_at_finish:
                self._end("another interrupt while finishing")
                return
            deadline = time.monotonic() + self.grace_seconds
            with self._reacted:
                while self.signals < self._arrived and time.monotonic() < deadline:
                    self._reacted.wait(max(0.0, deadline - time.monotonic()))
                reacted = self.signals >= self._arrived
            if not reacted:
                self._end("the main thread was busy in native code")
                return
            threading.Thread(target=self._bound_finish, daemon=True).start()

    def _bound_finish(self) -> None:
        """After the main thread reacted: end the process if finishing takes too long."""
        deadline = time.monotonic() + self.finish_seconds
        while time.monotonic() < deadline:
            if not self.installed:
                return
            time.sleep(0.1)
        if self.installed:
            self._end(f"finishing took more than {self.finish_seconds:g} s")

    def _end(self, why: str) -> None:
        """Write what the run holds (:attr:`on_stuck`, under :attr:`lock`) and exit 130."""
        extra = None
        if self.on_stuck is not None and self.lock.acquire(timeout=5.0):
            try:
                extra = self.on_stuck()
            except BaseException as e:  # noqa: BLE001 - report and exit anyway
                extra = f"could not record the interruption: {type(e).__name__}: {e}"
            finally:
                self.lock.release()
        try:
            sys.stderr.write(f"{self.message} ({why})" + (f"; {extra}" if extra else "") + "\n")
            sys.stderr.flush()
        finally:
            os._exit(EXIT_INTERRUPTED)
