"""The one optimization loop (hessspec.nn.loop.optimize): iterates against closed forms and
plain NumPy loops, the stop criterion, observers, and the stability threshold."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hessspec.nn.loop import optimize
from hessspec.nn.schedule import BatchOrder, batch_indices
from hessspec.nn.train import TrainConfig, stability_threshold

N, D = 24, 5


@pytest.fixture(scope="module")
def problem():
    """Least squares 1/(2B) ||X w + b - y||^2 on a batch, float64."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    y = x @ rng.normal(size=D) + 0.3 + 0.1 * rng.normal(size=N)
    start = {"w": rng.normal(size=D), "b": np.asarray(1.5)}
    return x, y, start


def _loss(params, batch):
    r = batch["x"] @ params["w"] + params["b"] - batch["y"]
    return 0.5 * jnp.mean(r**2)


def _numpy_gd(x, y, start, lr, steps, batches=None):
    """Plain NumPy (mini-batch) gradient descent: the iterates ``w_0 .. w_T`` and the loss
    of every step at its batch, before its update."""
    w, b = start["w"].copy(), float(start["b"])
    iterates, losses = [(w.copy(), b)], []
    for t in range(steps):
        idx = np.arange(N) if batches is None else batches[t]
        r = x[idx] @ w + b - y[idx]
        losses.append(0.5 * np.mean(r**2))
        w, b = w - lr * x[idx].T @ r / idx.size, b - lr * np.mean(r)
        iterates.append((w.copy(), b))
    return iterates, np.asarray(losses)


@pytest.mark.parametrize("chunk", [1, 7])
def test_full_batch_gradient_descent_is_the_closed_form_iteration(problem, chunk):
    """optax.sgd on the full batch through the loop: w_{t+1} = w_t - lr grad L(w_t) (the
    NumPy iteration, 1e-12), the loss of every step, the metric after every update; an
    observation step in the middle of a chunk changes nothing."""
    x, y, start = problem
    lr, steps = 0.05, 40
    ref, ref_losses = _numpy_gd(x, y, start, lr, steps)
    result = optimize(
        _loss,
        start,
        optax.sgd(lr),
        {"x": x, "y": y},
        num_steps=steps,
        chunk=chunk,
        metric=lambda p: jnp.linalg.norm(p["w"]),
        observe=lambda seen: None,
        observe_at=[10],
    )
    assert result.step == steps and result.stopped_at is None and result.observed == (10,)
    np.testing.assert_allclose(result.params["w"], ref[-1][0], rtol=1e-12)
    np.testing.assert_allclose(result.params["b"], ref[-1][1], rtol=1e-12)
    np.testing.assert_allclose(result.losses, ref_losses, rtol=1e-12)
    norms = [np.linalg.norm(w) for w, _ in ref[1:]]
    np.testing.assert_allclose(result.metrics, norms, rtol=1e-12)


@pytest.mark.parametrize("chunk", [1, 16])
def test_stop_criterion_stops_at_the_first_crossing(problem, chunk):
    """Stopping on the error ratio ||w_t - w*|| / ||w_0 - w*|| <= tol: at the first step of
    the NumPy iteration where it holds, with the parameters of that step (not those of the
    end of its chunk), and the ratio curve up to it."""
    x, y, start = problem
    lr, tol = 0.05, 0.2
    w_star = np.linalg.lstsq(np.c_[x, np.ones(N)], y, rcond=None)[0]

    def flat(w, b):
        return np.r_[w, b]

    ref, _ = _numpy_gd(x, y, start, lr, 400)
    e0 = np.linalg.norm(flat(*ref[0]) - w_star)
    ratios = np.array([np.linalg.norm(flat(*it) - w_star) / e0 for it in ref])
    first = int(np.argmax(ratios <= tol))
    assert 0 < first < 400 and first % 16 not in (0, 15)  # the stop lies inside a chunk

    def ratio(p):
        return jnp.linalg.norm(jnp.r_[p["w"], p["b"]] - w_star) / e0

    kw = {"metric": ratio, "stop_when": lambda r: r <= tol, "chunk": chunk}
    result = optimize(_loss, start, optax.sgd(lr), {"x": x, "y": y}, num_steps=400, **kw)
    assert result.stopped_at == first and result.step == first
    np.testing.assert_allclose(result.metrics, ratios[1 : first + 1], rtol=1e-12)
    np.testing.assert_allclose(result.params["w"], ref[first][0], rtol=1e-12)
    assert result.losses.shape == (first,)
    # not reached within the budget: all steps, no stop
    short = optimize(_loss, start, optax.sgd(lr), {"x": x, "y": y}, num_steps=first - 1, **kw)
    assert short.stopped_at is None and short.step == first - 1
    np.testing.assert_allclose(short.metrics, ratios[1:first], rtol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4])
def test_observers_see_their_step_and_the_next_updates_batch(problem, chunk):
    """Mini-batches (BatchOrder) with a state the loss updates: the observer runs at its
    steps, before the update, with the parameters and state of that step and the indices
    of the batch the next update uses; what it returns is recorded and handed back."""
    x, y, start = problem
    lr, steps, batch = 0.1, 20, 5
    order = batch_indices(N, batch, steps + 1, seed=3)
    ref, ref_losses = _numpy_gd(x, y, start, lr, steps, batches=order)

    def counting_loss(params, state, batch):
        return _loss(params, batch), {"updates": state["updates"] + 1}

    seen = []

    def observe(obs):
        seen.append(obs)
        return obs.step * 10

    result = optimize(
        counting_loss,
        start,
        optax.sgd(lr),
        {"x": x, "y": y},
        num_steps=steps,
        batches=BatchOrder(N, batch, seed=3),
        state={"updates": jnp.asarray(0)},
        chunk=chunk,
        observe=observe,
        observe_at=[*range(0, steps, 6), steps],
    )
    assert result.observed == (0, 6, 12, 18, 20)
    assert result.observations == tuple((s, 10 * s) for s in result.observed)
    assert [obs.last for obs in seen] == [None, 0, 60, 120, 180]
    for obs in seen:
        np.testing.assert_array_equal(obs.indices, order[obs.step])
        np.testing.assert_allclose(obs.params["w"], ref[obs.step][0], rtol=1e-12)
        assert int(obs.state["updates"]) == obs.step
    np.testing.assert_allclose(result.losses, ref_losses, rtol=1e-12)
    assert int(result.state["updates"]) == steps


def _quadratic(lam_max: float):
    """A with eigenvalues lam_max * (1, 0.7, 0.4, 0.2, 0.05), its eigenvectors, and a start."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    lam = lam_max * np.array([1.0, 0.7, 0.4, 0.2, 0.05])
    return (q * lam) @ q.T, q, lam, rng.normal(size=5)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("side", [0.99, 1.01])
def test_stability_threshold_on_a_quadratic(momentum, side):
    """On 0.5 w^T A w, optax.sgd through the loop follows the closed-form linear recursion
    of each eigencomponent, (c, v) <- [[1 - lr lam, -lr b], [lam, b]] (c, v), and converges
    iff lambda_max < stability_threshold = (2 + 2 b) / lr: with lambda_max 1 % below it the
    top component shrinks, 1 % above it grows."""
    lr, steps = 0.1, 300
    threshold = stability_threshold(TrainConfig(learning_rate=lr, momentum=momentum))
    assert threshold == pytest.approx((2 + 2 * momentum) / lr, rel=1e-15)
    a, q, lam, w0 = _quadratic(side * threshold)

    def loss(w, batch):  # the data play no part
        return 0.5 * w @ jnp.asarray(a) @ w

    tx = optax.sgd(lr, momentum=momentum or None)
    result = optimize(loss, jnp.asarray(w0), tx, {"unused": np.zeros(1)}, num_steps=steps)
    c0 = q.T @ w0
    expected = []
    for c, lam_i in zip(c0, lam, strict=True):
        m = np.array([[1 - lr * lam_i, -lr * momentum], [lam_i, momentum]])
        expected.append((np.linalg.matrix_power(m, steps) @ np.array([c, 0.0]))[0])
    got = q.T @ np.asarray(result.params)
    # rounding of the largest component reaches the others: tolerance relative to it
    scale = max(np.abs(c0).max(), np.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12 * scale)
    m_top = np.array([[1 - lr * lam[0], -lr * momentum], [lam[0], momentum]])
    radius = np.abs(np.linalg.eigvals(m_top)).max()
    growth = abs(got[0] / c0[0])
    if side < 1:
        assert radius < 1 and growth < 1e-2
    else:
        assert radius > 1 and growth > 1e2


def test_stability_threshold_is_undefined_for_adam_and_nesterov():
    with pytest.raises(ValueError, match="undefined for adam"):
        stability_threshold(TrainConfig(optimizer="adam"))
    with pytest.raises(ValueError, match="undefined here for Nesterov"):
        stability_threshold(TrainConfig(nesterov=True))


def test_bad_options_name_the_problem(problem):
    x, y, start = problem
    data = {"x": x, "y": y}
    with pytest.raises(ValueError, match="stop_when needs metric"):
        optimize(_loss, start, optax.sgd(0.1), data, num_steps=3, stop_when=lambda r: r < 1)
    with pytest.raises(ValueError, match=r"observe_at steps \[4\] lie outside \[0, 3\]"):
        optimize(_loss, start, optax.sgd(0.1), data, num_steps=3, observe=print, observe_at=[4])
    with pytest.raises(ValueError, match="schedule is over 10 examples; the data has 24"):
        optimize(_loss, start, optax.sgd(0.1), data, num_steps=3, batches=BatchOrder(10, 2, 0))


def test_full_batch_run_interrupted_and_resumed_takes_the_same_steps(problem):
    """Saves at their steps; a KeyboardInterrupt in an observer saves the state reached;
    resuming from it (chunks of 5 across the resumed step) ends where the uninterrupted run
    ends, with the same losses, and saves only what is new."""
    x, y, start = problem
    data, tx = {"x": x, "y": y}, optax.sgd(0.05, momentum=0.5)
    ref = optimize(_loss, start, tx, data, num_steps=20, chunk=5)

    def interrupt(obs):
        raise KeyboardInterrupt

    saved = []
    with pytest.raises(KeyboardInterrupt):
        optimize(_loss, start, tx, data, num_steps=20, chunk=5, save_at=[7],
                 on_save=lambda s, kind: saved.append((s, kind)), observe=interrupt,
                 observe_at=[12])  # fmt: skip
    assert [(s.step, kind) for s, kind in saved] == [(7, "checkpoint"), (12, "interrupt")]
    state = saved[-1][0]
    assert state.data_order == {"full_batch": True, "num_examples": N}
    np.testing.assert_array_equal(state.losses, ref.losses[:12])
    later = []
    resumed = optimize(_loss, None, tx, data, num_steps=20, chunk=5, resume_from=state,
                       save_at=[7], on_save=lambda s, k: later.append((s.step, k)))  # fmt: skip
    assert later == [(20, "final")] and resumed.step == 20
    np.testing.assert_array_equal(resumed.losses, ref.losses)
    for a, b in zip(resumed.params.values(), ref.params.values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14)
