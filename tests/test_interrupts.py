"""SIGINT/SIGTERM handling: KeyboardInterrupt in the main thread, held inside critical
sections, and the watchdog that finishes the run when the main thread is stuck in native
code (real signals sent to this process; ``os._exit`` replaced so the test survives)."""

import gc
import hashlib
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from hessspec.studies.common import interrupts
from hessspec.studies.common.interrupts import EXIT_INTERRUPTED, InterruptGuard


def _signal_later(signum, delay):
    timer = threading.Timer(delay, os.kill, (os.getpid(), signum))
    timer.start()
    return timer


@pytest.fixture
def no_gc():
    # an interrupt unwinding through jax code can otherwise be reported a second time by
    # jax's gc callback as an "unraisable" exception under pytest-xdist
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_interrupt_python_code_and_handlers_come_back(signum, no_gc):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with InterruptGuard() as guard:
        _signal_later(signum, 0.05)
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            while time.perf_counter() - t0 < 10:
                sum(range(1000))
        assert time.perf_counter() - t0 < 5 and guard.signals == 1
    assert {s: signal.getsignal(s) for s in before} == before


def test_critical_sections_hold_the_interrupt(no_gc):
    with InterruptGuard() as guard:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with guard.critical():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(10000):  # the handler has run by now, without raising
                    pass
                done.append(guard.signals)
        assert done == [1]


def test_watchdog_finishes_when_the_main_thread_is_stuck(monkeypatch, no_gc):
    """A signal while the main thread is in native code that neither returns nor checks for
    signals (here a long key derivation in OpenSSL, which releases the GIL like XLA does;
    JAX's own waits do check for signals): after the grace period the watchdog runs
    ``on_stuck`` (holding the lock) and ends the process with status 130, long before the
    native call returns."""
    t0 = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", b"x", b"salt", 100_000)
    per_iteration = (time.perf_counter() - t0) / 100_000
    iterations = int(1.5 / per_iteration)  # about 1.5 s, more under load

    events = {}
    monkeypatch.setattr(interrupts.os, "_exit", lambda status: events.setdefault("exit", status))
    with InterruptGuard(grace_seconds=0.3) as guard:

        def on_stuck():
            events["stuck"] = time.perf_counter()
            events["locked"] = guard.lock._is_owned()
            return "recorded"

        guard.on_stuck = on_stuck
        timer = _signal_later(signal.SIGTERM, 0.2)
        start = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):  # raised once the native call returns
            hashlib.pbkdf2_hmac("sha256", b"x", b"salt", iterations)
            time.sleep(2.0)
        returned = time.perf_counter()
        timer.join()
    assert events["exit"] == EXIT_INTERRUPTED and events["locked"]
    assert events["stuck"] - start < 0.2 + 0.3 + 0.5  # signal + grace (+ scheduling slack)
    assert events["stuck"] < returned


def test_jax_waits_are_interruptible(no_gc):
    """Waiting for a long compiled computation checks for signals: the interrupt comes
    at once, not when the computation ends (so the watchdog is rarely needed)."""

    @jax.jit
    def busy(x, n):
        return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ y) * 0.5, x)

    x = jnp.eye(256) * 0.1
    busy(x, 2).block_until_ready()
    t0 = time.perf_counter()
    busy(x, 20).block_until_ready()
    iterations = int(2.0 / max((time.perf_counter() - t0) / 20, 1e-5))
    with InterruptGuard():
        _signal_later(signal.SIGINT, 0.2)
        start = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            busy(x, iterations).block_until_ready()
        assert time.perf_counter() - start < 1.5


def test_a_second_signal_while_finishing_ends_at_once(monkeypatch, no_gc):
    events = []
    monkeypatch.setattr(interrupts.os, "_exit", events.append)
    with InterruptGuard(grace_seconds=5.0) as guard:
        _signal_later(signal.SIGINT, 0.01)
        with pytest.raises(KeyboardInterrupt):
            time.sleep(2)
        guard.finishing = True  # the run now writes its results
        os.kill(os.getpid(), signal.SIGINT)  # counted, not raised
        deadline = time.perf_counter() + 3
        while not events and time.perf_counter() < deadline:
            time.sleep(0.01)
    assert events == [EXIT_INTERRUPTED]


def test_an_interrupt_in_a_gc_callback_is_not_lost(no_gc):
    """Python ignores exceptions raised in garbage-collector callbacks (JAX registers one):
    a signal handled there is delivered again, so the interrupt still arrives."""
    entered = []

    def callback(phase, info):
        if phase == "start" and not entered:
            entered.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # handled inside this callback
            for _ in range(1000):
                pass

    gc.callbacks.append(callback)
    try:
        with InterruptGuard():
            with pytest.raises(KeyboardInterrupt):
                gc.collect()
                deadline = time.monotonic() + 20  # generous: the suite runs on loaded cores
                while time.monotonic() < deadline:  # the signal comes again once the
                    time.sleep(0.01)  # callback has returned
    finally:
        gc.callbacks.remove(callback)
    assert entered == [1]


def test_an_interrupt_in_a_weakref_callback_is_not_lost(no_gc):
    """The same for any code whose exceptions Python drops (here a weakref callback): the
    dropped KeyboardInterrupt is noticed (sys.unraisablehook) and the signal delivered
    again."""
    import weakref

    class Thing:
        pass

    def callback(ref):
        os.kill(os.getpid(), signal.SIGINT)  # handled inside this callback
        for _ in range(1000):
            pass

    thing = Thing()
    ref = weakref.ref(thing, callback)
    with InterruptGuard():
        with pytest.raises(KeyboardInterrupt):
            del thing  # runs the callback
            deadline = time.monotonic() + 20  # generous: the suite runs on loaded cores
            while time.monotonic() < deadline:  # the signal comes again once the
                time.sleep(0.01)  # callback has returned
    assert ref() is None


def test_a_redelivery_is_sent_once(no_gc):
    """Two drops of the same interrupt (say a gc callback and then the unraisable hook)
    ask for a redelivery twice: the signal comes again once, so one Ctrl-C stays one
    KeyboardInterrupt and nothing arrives after the guard is gone."""
    with InterruptGuard() as guard:
        guard._deliver_again()
        guard._deliver_again()
        with pytest.raises(KeyboardInterrupt):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.01)
        second = False
        try:
            time.sleep(0.3)  # a second redelivery would raise KeyboardInterrupt here
        except KeyboardInterrupt:
            second = True
    assert not second and guard.signals == 1
