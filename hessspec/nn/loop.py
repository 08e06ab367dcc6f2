"""The one optimization loop: any loss, any parameter pytree, any optax optimizer.

:func:`optimize` runs ``num_steps`` updates ``params <- params + optimizer.update(grad)`` of
``loss_fn`` on a data set held on the device once, each step on the batch a schedule
names (:class:`~hessspec.nn.schedule.BatchOrder`: seeded mini-batches;
:class:`~hessspec.nn.schedule.FullBatch`: gradient descent). Everything else is a keyword:

- ``state=``: a non-differentiated state the loss updates (BatchNorm running averages);
- ``chunk=``: steps per compiled call (a ``lax.scan``; the whole chunk stays in jit);
- ``metric=`` / ``stop_when=``: a traced per-step function of the parameters, recorded
  after every update, and a traced criterion on it that stops the run at the first step
  where it holds (the parameters returned are those of that step exactly);
- ``observe=`` / ``observe_at=``: a host callback at chosen steps, BEFORE the update that
  follows, given an :class:`Observation` (the parameters, the state and the indices of the
  batch the next update uses); what it returns is recorded;
- ``on_save=`` / ``save_at=`` / ``resume_from=``: the :class:`TrainingState` to store at
  chosen steps, at the end and on an interrupt, and continuing exactly from it.

The mini-batch loss of every step streams to the host (:class:`LossCurve`) about four times
a second, at most every 512 steps: memory stays bounded however long the run, and the
device never runs far ahead of the host (an interrupt waits for a quarter of a second of
queued steps at most). A non-finite loss stops the run (:class:`TrainingDiverged`) naming
the first step where it appeared.

:func:`hessspec.nn.train.train` is this loop for a flax.nnx model.
"""

from __future__ import annotations

import bisect
import collections
import functools
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hessspec.nn.records import LossCurve, TrainingDiverged, TrainingState
from hessspec.nn.schedule import BatchOrder, FullBatch, schedule_from_state

__all__ = [
    "LossCurve",
    "Observation",
    "OptimizeResult",
    "TrainingDiverged",
    "TrainingState",
    "optimize",
]


class Observation(NamedTuple):
    """What an observer sees at step ``step``, before the update that follows.

    Attributes:
        step: updates applied so far (0: at the start).
        params: the parameters after ``step`` updates (device arrays; read, do not keep
            references across steps if memory matters).
        state: the loss's state (BatchNorm running averages) at that step, or None.
        opt_state: the optimizer state at that step.
        indices: ``(B,)`` int32 indices of the examples the next update uses (the one
            after ``step``; at the last step, the one a longer run would take), or None
            for a full-batch schedule (every example).
        last: what the observer returned at its previous observation (None at the first):
            e.g. the eigenvector to warm-start the next Lanczos run.
        status: ``status(text)`` shows a short text on the progress display.
    """

    step: int
    params: Any
    state: Any
    opt_state: Any
    indices: np.ndarray | None
    last: Any
    status: Callable[[str], None]


class OptimizeResult(NamedTuple):
    """What :func:`optimize` returns.

    Attributes:
        params, state, opt_state: after the last update (that of the stopping step when
            the run stopped early).
        step: updates applied (``num_steps``, or ``stopped_at``).
        losses: ``(step,)`` mini-batch loss of every update before it was applied (a
            resumed run includes the steps before the resume), float64.
        metrics: ``(step - start,)`` ``metric(params)`` after each update of this call
            (``start``: the step it started from; empty without ``metric``), float64.
        stopped_at: the first step at which ``stop_when`` held, or None.
        observations: ``(step, value)`` for every observation whose observer returned
            something other than None, in order.
        observed: the steps at which the observer ran (in this call).
        seconds: wall time of the updates alone (observers, saves and compilation
            excluded), over every session of a resumed run.
    """

    params: Any
    state: Any
    opt_state: Any
    step: int
    losses: np.ndarray
    metrics: np.ndarray
    stopped_at: int | None
    observations: tuple[tuple[int, Any], ...]
    observed: tuple[int, ...]
    seconds: float


# --------------------------------------------------------------------------------------
# The compiled chunk of steps
# --------------------------------------------------------------------------------------


class _Cursor(NamedTuple):
    """Where the run is: updates applied and the pytrees after them."""

    step: int
    params: Any
    state: Any
    opt_state: Any


def _program(steps: tuple, cursor: _Cursor, schedule, data):
    """:func:`_chunk_run` of ``steps = (loss_fn, optimizer, stateful, metric, stop_when,
    chunk)`` for this schedule, compiled ahead of time for the cursor's pytrees and
    ``data``."""
    run = _chunk_run(*steps, isinstance(schedule, FullBatch))
    first = _chunk_indices(schedule, cursor.step, 1, steps[-1])
    return _compiled(run, *cursor[1:], data, first, np.int32(1))


@functools.lru_cache(maxsize=32)
def _chunk_run(loss_fn, optimizer, stateful: bool, metric, stop_when, chunk: int, full: bool):
    """``run(params, state, opt_state, data, indices, num_active) -> ((params, state,
    opt_state), losses, metrics, stops)``: ``chunk`` steps in one ``lax.scan`` under jit,
    the first ``num_active`` of them applied (and none after the first that meets
    ``stop_when``), each step's batch gathered on the device from ``data`` by its row of
    ``indices`` ``(chunk, B)`` (``full``: the whole ``data``, ``indices`` None). Cached,
    so the same loss, optimizer and settings reuse the compiled program."""

    def gradient(params, state, batch):
        if stateful:
            (value, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, batch)
            return value, state, grads
        value, grads = jax.value_and_grad(loss_fn)(params, batch)
        return value, state, grads

    def update(pytrees, batch):
        params, state, opt_state = pytrees
        value, state, grads = gradient(params, state, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), state, opt_state), value

    def skip(pytrees, batch):
        value = jax.eval_shape(update, pytrees, batch)[1]
        return pytrees, jnp.zeros(value.shape, value.dtype)

    def step(data, pytrees, stopped, i, idx, num_active):
        """Step ``i`` of a chunk: ``(pytrees, stopped), (loss, metric, stop)``, the metric
        and the stop flag None when not asked for."""
        batch = data if full else jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
        if chunk == 1:  # nothing to skip
            active = jnp.asarray(True)
            pytrees, value = update(pytrees, batch)
        else:
            active = (i < num_active) & ~stopped
            pytrees, value = jax.lax.cond(active, update, skip, pytrees, batch)
        measured = None if metric is None else metric(pytrees[0])
        stop = None if stop_when is None else stop_when(measured) & active
        stopped = stopped if stop is None else stopped | stop
        return (pytrees, stopped), (value, measured, stop)

    @jax.jit
    def run(params, state, opt_state, data, indices, num_active):
        carry = ((params, state, opt_state), jnp.asarray(False))
        if chunk == 1:  # no loop: as fast as a plain jitted step
            idx = None if full else indices[0]
            (pytrees, _), outputs = step(data, *carry, 0, idx, num_active)
            return (pytrees, *jax.tree.map(lambda v: v[None], outputs))

        def body(carry, xs):
            return step(data, *carry, *xs, num_active)

        (pytrees, _), outputs = jax.lax.scan(body, carry, (jnp.arange(chunk), indices))
        return (pytrees, *outputs)

    return run


_COMPILED: collections.OrderedDict = collections.OrderedDict()


def _compiled(step_fn, *args):
    """``step_fn`` compiled ahead of time for arguments shaped like ``args`` (cached), so
    the compilation happens before the first step instead of inside it."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    signature = tuple(
        (np.shape(a), str(getattr(a, "dtype", None) or np.asarray(a).dtype)) for a in leaves
    )
    key = (step_fn, treedef, signature)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    compiled = step_fn.lower(*args).compile()
    _COMPILED[key] = compiled
    if len(_COMPILED) > 32:
        _COMPILED.popitem(last=False)
    return compiled


# --------------------------------------------------------------------------------------
# The host side: streaming, events, saving
# --------------------------------------------------------------------------------------

#: Streaming the loss: aim at this many seconds of steps between two host copies.
_FLUSH_SECONDS = 0.25
_MAX_PENDING = 512


class _Stream:
    """The host side of a run: the loss and metric curves, the divergence check, the
    training clock (updates only) and the progress display."""

    def __init__(self, curve: LossCurve, start: int, report, hint: str, *, with_metrics: bool):
        self.curve, self.metrics = curve, LossCurve() if with_metrics else None
        self.start, self.report, self.hint = start, report, hint
        self.flush_every = 4
        self.since_flush, self.steps_at_flush = time.perf_counter(), start

    def append(self, losses, metrics) -> None:
        self.curve.append(losses)
        if self.metrics is not None:
            self.metrics.append(metrics)

    def stop_clock(self) -> None:
        self.curve.seconds += time.perf_counter() - self.since_flush

    def start_clock(self, step: int) -> None:
        self.since_flush, self.steps_at_flush = time.perf_counter(), step

    def flush(self, step_now: int) -> None:
        """Bring the pending values to the host; raise :class:`TrainingDiverged` at the
        first non-finite loss (both curves then end at that step)."""
        values = self.curve.flush()
        if self.metrics is not None:
            self.metrics.flush()
        if values.size and not np.all(np.isfinite(values)):
            first = int(np.argmax(~np.isfinite(values)))
            bad_step = step_now - values.size + first + 1
            self.curve.truncate(bad_step)
            if self.metrics is not None:
                self.metrics.truncate(bad_step - self.start)
            raise TrainingDiverged(
                f"training diverged: the mini-batch loss at step {bad_step} is "
                f"{values[first]}; {self.hint}.",
                step=bad_step,
                value=float(values[first]),
            )
        self.report.advance(step_now - self.report.step, float(values[-1]) if values.size else None)

    def after_chunk(self, step_now: int) -> None:
        """Flush when enough steps are pending, adapting how many to about
        ``_FLUSH_SECONDS`` of steps."""
        if self.curve.pending < self.flush_every:
            return
        self.stop_clock()
        self.flush(step_now)
        done = time.perf_counter()
        per_step = (done - self.since_flush) / max(step_now - self.steps_at_flush, 1)
        self.flush_every = int(np.clip(_FLUSH_SECONDS / max(per_step, 1e-7), 1, _MAX_PENDING))
        self.since_flush, self.steps_at_flush = done, step_now

    def training_state(self, cursor: _Cursor, schedule) -> TrainingState:
        self.curve.truncate(cursor.step)
        losses = self.curve.losses()

        def host(tree):
            return jax.tree_util.tree_map(np.asarray, tree)

        return TrainingState(
            step=cursor.step,
            params=host(cursor.params),
            rest=host(cursor.state),
            opt_state=host(cursor.opt_state),
            data_order=schedule.state(cursor.step),
            losses=losses,
            seconds=self.curve.seconds,
        )


def _num_examples(data) -> int:
    """``N``, the common leading size of the leaves of ``data``."""
    sizes = {int(np.shape(leaf)[0]) for leaf in jax.tree.leaves(data) if np.ndim(leaf)}
    if len(sizes) != 1:
        raise ValueError(
            f"the data leaves must share one leading size (the examples), got sizes "
            f"{sorted(sizes) or 'none'}."
        )
    return sizes.pop()


def _resumed(resume_from: TrainingState, schedule, num_steps: int):
    """The schedule and cursor of a saved state, checked against this run."""
    saved = schedule_from_state(resume_from.data_order)
    if (saved.num_examples, saved.batch_size) != (schedule.num_examples, schedule.batch_size):
        raise ValueError(
            f"the saved training state is for {saved.num_examples} examples in batches "
            f"of {saved.batch_size}; this training has {schedule.num_examples} in batches "
            f"of {schedule.batch_size}."
        )
    start = int(resume_from.step)
    if not 0 <= start <= num_steps:
        raise ValueError(f"the saved training state is at step {start}, past {num_steps}.")

    def device(tree):
        return jax.tree_util.tree_map(jnp.asarray, tree)

    cursor = _Cursor(
        start, device(resume_from.params), device(resume_from.rest), device(resume_from.opt_state)
    )
    return saved, cursor


def _steps_in(steps: Iterable[int], num_steps: int, what: str) -> frozenset[int]:
    steps = frozenset(int(s) for s in steps)
    bad = sorted(s for s in steps if not 0 <= s <= num_steps)
    if bad:
        raise ValueError(f"{what} steps {bad} lie outside [0, {num_steps}].")
    return steps


def _chunk_indices(schedule, step: int, count: int, chunk: int) -> np.ndarray | None:
    """``(chunk, B)`` indices of the steps ``step .. step + count - 1``, the last row
    repeated to fill the chunk (those steps are not applied); None for a full batch."""
    if isinstance(schedule, FullBatch):
        return None
    if chunk == 1:
        return schedule.batch(step)[None]
    rows = [schedule.batch(s) for s in range(step, step + count)]
    return np.stack(rows + rows[-1:] * (chunk - count))


class _Run:
    """One call of :func:`optimize` on the host: the cursor (the one truth of where the run
    is, replaced in one assignment after each chunk, so an interrupt anywhere leaves a
    consistent state; the curve may hold a chunk more, cut at save time), the events
    (observations, saves) and what they recorded."""

    def __init__(self, cursor: _Cursor, schedule, stream: _Stream, *, num_steps, resumed, **hooks):
        self.cursor, self.schedule, self.stream = cursor, schedule, stream
        self.num_steps = num_steps
        self.observe, self.observe_at = hooks["observe"], hooks["observe_at"]
        self.on_save, self.save_at = hooks["on_save"], hooks["save_at"]
        self.events = sorted({*self.observe_at, *self.save_at, num_steps})
        self.saved_step = cursor.step if resumed else -1  # the resumed state is saved already
        self.stopped_at: int | None = None
        self.observations: list[tuple[int, Any]] = []
        self.observed: list[int] = []
        self.last = None

    def next_event(self, step: int) -> int:
        """The first observation or save step after ``step`` (at the latest the end)."""
        return self.events[bisect.bisect_right(self.events, step)]

    def at_event(self) -> None:
        """At an observation or save step, or the end: check the curve, save, observe."""
        step = self.cursor.step
        end = step >= self.num_steps or self.stopped_at is not None
        observing = step in self.observe_at
        if not (observing or step in self.save_at or end):
            return
        stream, report = self.stream, self.stream.report
        stream.stop_clock()
        stream.flush(step)  # the last loss is checked here too
        report.pause(f"analysing step {step}" if observing else "saving")
        if self.on_save is not None and (step in self.save_at or end) and step != self.saved_step:
            kind = "checkpoint" if step in self.save_at else "final"
            self.on_save(stream.training_state(self.cursor, self.schedule), kind)
            self.saved_step = step
        if observing:
            self._observe(step, report)
        report.resume()
        stream.start_clock(step)

    def _observe(self, step: int, report) -> None:
        c = self.cursor
        seen = Observation(
            step, c.params, c.state, c.opt_state, self.schedule.batch(step), self.last, report.pause
        )
        value = self.observe(seen)
        self.observed.append(step)
        if value is not None:
            self.observations.append((step, value))
            self.last = value

    def advance(self, program, data, chunk: int, stops: bool) -> None:
        """Run the next chunk of steps (up to the next event) and record its values."""
        step = self.cursor.step
        count = min(chunk, self.next_event(step) - step)
        indices = _chunk_indices(self.schedule, step, count, chunk)
        pytrees, losses, metrics, stop = program(*self.cursor[1:], data, indices, np.int32(count))
        done, stopped = count, False
        if stops:  # the run must know now whether to go on
            jax.block_until_ready(stop)  # a wait Ctrl-C can interrupt (device_get's cannot)
            hits = np.flatnonzero(np.asarray(jax.device_get(stop))[:count])
            done, stopped = (int(hits[0]) + 1, True) if hits.size else (count, False)
        if done < chunk:
            losses = losses[:done]
            metrics = None if metrics is None else metrics[:done]
        self.stream.append(losses, metrics)
        self.cursor = _Cursor(step + done, *pytrees)
        if stopped:
            self.stopped_at = self.cursor.step
        self.stream.after_chunk(self.cursor.step)

    def go(self, program, data, chunk: int, stops: bool) -> None:
        """Run to the end (or the stopping step), events included."""
        try:
            while True:
                self.at_event()
                if self.cursor.step >= self.num_steps or self.stopped_at is not None:
                    break
                self.advance(program, data, chunk, stops)
        except KeyboardInterrupt:
            self.interrupted()
            raise
        finally:
            self.stream.report.close()

    def result(self) -> OptimizeResult:
        c, stream = self.cursor, self.stream
        return OptimizeResult(
            params=c.params,
            state=c.state,
            opt_state=c.opt_state,
            step=c.step,
            losses=stream.curve.losses(),
            metrics=np.zeros(0) if stream.metrics is None else stream.metrics.losses(),
            stopped_at=self.stopped_at,
            observations=tuple(self.observations),
            observed=tuple(self.observed),
            seconds=stream.curve.seconds,
        )

    def interrupted(self) -> None:
        """Between two chunks, or while saving (during an observation the state of its
        step is saved already): keep the state reached, so no step is taken twice."""
        if self.on_save is not None and self.cursor.step != self.saved_step:
            self.stream.stop_clock()
            self.on_save(self.stream.training_state(self.cursor, self.schedule), "interrupt")


def _schedule_for(batches, data) -> BatchOrder | FullBatch:
    """The schedule over the examples of ``data`` (None: the full batch; then data without
    an example axis, e.g. ``{}`` for a loss that needs none, is one example)."""
    if batches is None and not any(np.ndim(leaf) for leaf in jax.tree.leaves(data)):
        return FullBatch(1)
    n = _num_examples(data)
    schedule = FullBatch(n) if batches is None else batches
    if schedule.num_examples != n:
        raise ValueError(
            f"the schedule is over {schedule.num_examples} examples; the data has {n}."
        )
    return schedule


def _start(params, optimizer, state, opt_state, resume_from, schedule, num_steps, curve):
    """The schedule and cursor a run starts from (``resume_from`` or the given pytrees),
    the curve reset to match."""
    if resume_from is not None:
        schedule, cursor = _resumed(resume_from, schedule, num_steps)
        curve.reset(np.asarray(resume_from.losses, np.float64)[: cursor.step], resume_from.seconds)
        return schedule, cursor
    params = jax.tree.map(jnp.asarray, params)
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    curve.reset()
    return schedule, _Cursor(0, params, state, opt_state)


def optimize(
    loss_fn: Callable[..., Any],
    params: Any,
    optimizer: optax.GradientTransformation,
    data: Any,
    *,
    num_steps: int,
    batches: BatchOrder | FullBatch | None = None,
    state: Any = None,
    opt_state: Any = None,
    resume_from: TrainingState | None = None,
    chunk: int = 1,
    metric: Callable[[Any], jax.Array] | None = None,
    stop_when: Callable[[jax.Array], jax.Array] | None = None,
    observe: Callable[[Observation], Any] | None = None,
    observe_at: Iterable[int] = (),
    save_at: Iterable[int] = (),
    on_save: Callable[[TrainingState, str], None] | None = None,
    curve: LossCurve | None = None,
    progress: Any = False,
    desc: str = "optimize",
    divergence_hint: str = "lower the learning rate",
) -> OptimizeResult:
    """Minimise ``loss_fn`` over ``params`` with ``optimizer`` for ``num_steps`` updates.

    Step ``t`` takes the batch :math:`b_t` the schedule names and applies
    ``updates, opt_state = optimizer.update(g_t, opt_state, w_t)``, :math:`w_{t+1} = w_t +
    \\text{updates}` with :math:`g_t = \\nabla_w L(w_t; b_t)`; its loss :math:`L(w_t; b_t)`
    is recorded. Gradient descent: ``optax.sgd(lr)``, ``batches=None``.

    Args:
        loss_fn: ``(params, batch) -> ()`` mean loss over ``batch`` (a pytree like ``data``
            with the batch's rows); with ``state``: ``(params, state, batch) -> ((), state)``.
        params: :math:`w_0`, any pytree of arrays. optimizer: any optax transformation.
        data: pytree of arrays with a common leading axis ``N`` (or none, ``{}``, for a full
            batch), moved to the device once.
        num_steps: updates to apply.
        batches: a :class:`~hessspec.nn.schedule.BatchOrder` over ``N`` (mini-batches) or
            None / :class:`~hessspec.nn.schedule.FullBatch` (every step all of ``data``).
        state: the non-differentiated state the loss carries (BatchNorm running averages).
        opt_state: start state of the optimizer (default ``optimizer.init(params)``; e.g.
            an ``optax.inject_hyperparams`` state: one compiled program for every lr).
        resume_from: continue from this :class:`TrainingState` (``on_save`` of an earlier
            call with the same loss, data, optimizer and schedule), taking exactly the steps
            an uninterrupted run would take, none twice.
        chunk: steps per compiled ``lax.scan`` call; chunks end at event steps. 1 (default)
            suits mini-batches; a full-batch run on small data wants hundreds.
        metric: traced ``metric(params) -> ()`` after every update (``result.metrics``).
        stop_when: traced ``stop_when(metric_value) -> bool``: stop after the first update
            that meets it, with that step's parameters (the rest of its chunk is skipped).
        observe: ``observe(Observation) -> value or None`` on the host at ``observe_at``
            steps (after ``s`` updates, before the next); values other than None are
            recorded and handed to the next observation as ``last``.
        observe_at: steps in ``[0, num_steps]`` (``range(0, T, k)``: every ``k``-th before
            the last); with ``resume_from``, those before the resumed step are skipped.
        save_at: steps in ``[0, num_steps]`` at which ``on_save`` gets the state, kind
            ``"checkpoint"``, before observing.
        on_save: ``(TrainingState, kind) -> None``; also at the end (``"final"``) and on a
            ``KeyboardInterrupt`` between chunks (``"interrupt"``, then re-raised); never
            for the state ``resume_from`` already is.
        curve: the :class:`LossCurve` to fill (the caller keeps it however the run ends).
        progress, desc: a :class:`~hessspec.nn.progress.Progress` or True/False/a style,
            and its label. divergence_hint: ends :class:`TrainingDiverged`'s message.

    Returns:
        :class:`OptimizeResult`.

    Raises:
        ValueError: an event step outside ``[0, num_steps]``, ``stop_when`` without
            ``metric``, a schedule or a ``resume_from`` state that does not fit the data.
        TrainingDiverged: a non-finite loss (the curve then ends at that step).
    """
    from hessspec.nn.progress import Progress

    if int(chunk) < 1 or (stop_when is not None and metric is None):
        raise ValueError(f"chunk={chunk} must be >= 1, and stop_when needs metric=.")
    data = jax.tree.map(jnp.asarray, data)
    curve = curve if curve is not None else LossCurve()
    schedule = _schedule_for(batches, data)
    schedule, cursor = _start(
        params, optimizer, state, opt_state, resume_from, schedule, num_steps, curve
    )
    program = None
    if cursor.step < num_steps:  # compiled now: the clock of the updates leaves it out
        steps = (loss_fn, optimizer, state is not None, metric, stop_when, chunk)
        program = _program(steps, cursor, schedule, data)
    report = Progress.of(progress).training(desc, num_steps, cursor.step)
    run = _Run(
        cursor,
        schedule,
        _Stream(curve, cursor.step, report, divergence_hint, with_metrics=metric is not None),
        num_steps=num_steps,
        observe=observe,
        observe_at=_steps_in(observe_at, num_steps, "observe_at") if observe else frozenset(),
        on_save=on_save,
        save_at=_steps_in(save_at, num_steps, "save_at") if on_save else frozenset(),
        resumed=resume_from is not None,
    )
    run.go(program, data, chunk, stop_when is not None)
    return run.result()
