"""Training with optax: batches, optimizers, checkpoints, determinism, BatchNorm state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hessspec.nn.data import load_digits, subsample
from hessspec.nn.models import make_model
from hessspec.nn.train import batch_indices, make_optimizer, train
from hessspec.studies.batchnorm_spectrum.analyzer import density_grid, resolve_settings
from hessspec.studies.batchnorm_spectrum.config import TrainConfig

CFG = TrainConfig(steps=12, batch_size=16, learning_rate=0.05, momentum=0.9)


@pytest.fixture(scope="module")
def digits():
    return subsample(load_digits("train"), 128, seed=0, stratify=True)


def _params(model):
    return np.concatenate(
        [np.ravel(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))]
    )


def test_batch_indices_are_seeded_epochs():
    idx = batch_indices(10, 3, 7, seed=1)
    assert idx.shape == (7, 3)
    # 3 full batches per epoch (the 10th example is skipped): no repeat within an epoch
    for epoch in (idx[0:3], idx[3:6]):
        assert len(set(epoch.ravel())) == 9
    np.testing.assert_array_equal(idx, batch_indices(10, 3, 7, seed=1))
    assert not np.array_equal(idx, batch_indices(10, 3, 7, seed=2))
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(4, 5, 1, seed=0)


def test_make_optimizer_updates():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.25])}

    def first_update(cfg):
        tx = make_optimizer(cfg)
        updates, _ = tx.update(grads, tx.init(params), params)
        return np.asarray(updates["w"])

    plain = TrainConfig(optimizer="sgd", learning_rate=0.1, momentum=0.0)
    np.testing.assert_allclose(first_update(plain), [-0.05, -0.025])
    decay = dataclasses.replace(plain, weight_decay=0.1)
    np.testing.assert_allclose(first_update(decay), [-0.1 * (0.5 + 0.1), -0.1 * (0.25 - 0.2)])
    adam = TrainConfig(optimizer="adam", learning_rate=0.01)
    np.testing.assert_allclose(first_update(adam), [-0.01, -0.01], rtol=1e-5)
    assert isinstance(
        make_optimizer(dataclasses.replace(adam, weight_decay=0.1)), optax.GradientTransformation
    )


@pytest.mark.parametrize("batchnorm", [False, True])
def test_checkpoints_see_the_state_of_their_step(digits, batchnorm):
    """The callback at step s sees exactly the model after s updates; training is seeded."""
    seen = {}

    def record(step, model, status):
        status(f"step {step}")
        seen[step] = (_params(model), jax.tree.leaves(nnx.state(model, nnx.BatchStat)))

    model = make_model("mlp", digits.input_shape, 10, batchnorm, seed=0, hidden=[8])
    start = _params(model)
    hist = train(model, digits.x, digits.y, CFG, checkpoints=[0, 5, 12], on_checkpoint=record,
                 seed=3, progress=False)  # fmt: skip
    assert hist.checkpoints == (0, 5, 12) and sorted(seen) == [0, 5, 12]
    np.testing.assert_array_equal(seen[0][0], start)
    np.testing.assert_array_equal(seen[12][0], _params(model))
    assert hist.losses.shape == (12,) and np.all(np.isfinite(hist.losses))

    short = make_model("mlp", digits.input_shape, 10, batchnorm, seed=0, hidden=[8])
    hist5 = train(short, digits.x, digits.y, dataclasses.replace(CFG, steps=5), seed=3,
                  progress=False)  # fmt: skip
    np.testing.assert_allclose(_params(short), seen[5][0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(hist5.losses, hist.losses[:5], rtol=1e-6)
    if batchnorm:  # running averages moved away from their initial (0, 1)
        stats0, stats12 = seen[0][1], seen[12][1]
        assert any(not np.allclose(a, b) for a, b in zip(stats0, stats12, strict=True))


def test_training_with_adam_lowers_the_loss(digits):
    model = make_model("mlp", digits.input_shape, 10, False, seed=0, hidden=[16])
    cfg = dataclasses.replace(CFG, steps=60)
    adam = dataclasses.replace(cfg, optimizer="adam", learning_rate=0.01)
    hist = train(model, digits.x, digits.y, adam, seed=0, progress=False)
    assert hist.losses[-10:].mean() < 0.6 * hist.losses[:10].mean()


def test_bad_checkpoints_and_divergence(digits):
    model = make_model("mlp", digits.input_shape, 10, False, seed=0, hidden=[4])
    with pytest.raises(ValueError, match="outside"):
        train(model, digits.x, digits.y, CFG, checkpoints=[13], progress=False)
    x = digits.x.copy()
    x[:] = np.nan  # a diverged run: the loss is not finite
    with pytest.raises(FloatingPointError, match="learning_rate"):
        train(model, x, digits.y, CFG, progress=False)


def test_resolve_settings_and_density_grid():
    from hessspec.studies.batchnorm_spectrum.config import AnalysisConfig

    s = resolve_settings(AnalysisConfig(), TrainConfig(batch_size=64), 10, 5000, 512, 1000)
    assert s.top_k == 20 and s.hvp_batch_size == 64 and s.minibatch_size == 64
    assert s.chunk_size is None
    s = resolve_settings(AnalysisConfig(chunk_size=200), TrainConfig(batch_size=64), 10, 5000,
                         512, 1000)  # fmt: skip
    assert s.chunk_size == 192  # a multiple of the batch size
    s = resolve_settings(AnalysisConfig(top_k=50, slq_steps=90), TrainConfig(), 10, 30, 20, 40)
    assert s.top_k == 29 and s.slq_steps == 30 and s.hvp_batch_size == 20
    grid = density_grid(-1.0, 2.0, 0.01)
    assert grid[0] <= -1.0 - 5 * 0.01 and grid[-1] >= 2.0 + 5 * 0.01
    assert np.diff(grid).max() <= 0.01 / 4


@pytest.mark.parametrize("mode", [None, "train", "population"])
def test_analyzer_reuses_programs_with_new_params_and_statistics(digits, mode):
    """The analyzer's operator at a later checkpoint (an ``apply`` equal to the first
    checkpoint's, so compiled programs are reused, with new parameters and BN statistics as
    operand leaves) is the Hessian of that
    checkpoint's objective over batches of 16 (40 examples: two full batches and a ragged
    one; in train mode each with its own statistics), and its gradient and metrics are
    that objective's."""
    from hessspec.curvature.operators import dataset_gradient, hessian_operator
    from hessspec.nn.objective import make_objective
    from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer
    from hessspec.studies.batchnorm_spectrum.config import AnalysisConfig

    # population mode: statistics that change between checkpoints (as in eval mode)
    model = make_model("mlp", digits.input_shape, 10, mode is not None, seed=0, hidden=[4])
    analysis = digits.take(slice(0, 40))
    settings = resolve_settings(AnalysisConfig(batch_size=16), CFG, 10, 400, 40, 128)
    pop = {"population_data": digits.x} if mode == "population" else {}
    first = make_objective(model, bn_mode=mode, **pop)
    az = CheckpointAnalyzer(first, analysis, digits, digits, 10, settings)
    op_first = az.operator(first)
    train(model, digits.x, digits.y, CFG, seed=0, progress=False)
    later = make_objective(model, bn_mode=mode, **pop)
    op = az.operator(later)
    assert op.apply == op_first.apply and hash(op.apply) == hash(op_first.apply)
    assert jax.tree.structure(op) == jax.tree.structure(op_first)
    ref = hessian_operator(later.loss_fn, later.params, analysis.batch, batch_size=16)
    v = jax.random.normal(jax.random.key(1), (op.dim,), op.dtype)
    np.testing.assert_allclose(op.matvec(v), ref.matvec(v), rtol=1e-5, atol=1e-6)
    loss, grad = az.full_gradient(later)
    g_ref = dataset_gradient(later.loss_fn, later.params, analysis.batch, batch_size=16)
    np.testing.assert_allclose(loss, float(g_ref.loss), rtol=1e-5)
    np.testing.assert_allclose(grad, np.asarray(g_ref.gradient), rtol=1e-4, atol=1e-6)
    test_loss, acc = az.evaluate(later, analysis)
    logits = np.concatenate(
        [later.logits_fn(later.params, analysis.x[i : i + 16]) for i in range(0, 40, 16)]
    )
    np.testing.assert_allclose(acc, np.mean(logits.argmax(-1) == analysis.y))
    assert np.isfinite(test_loss)


# --------------------------------------------------------------------------------------
# Streaming the loss, stopping and resuming
# --------------------------------------------------------------------------------------


def test_batch_order_resumes_anywhere():
    """BatchOrder gives batch_indices' batches; its state at any step restores the same
    sequence without replaying earlier epochs (and survives a JSON round trip)."""
    import json

    from hessspec.nn.train import BatchOrder

    ref = batch_indices(50, 8, 40, seed=3)  # 6 batches per epoch: several epochs
    order = BatchOrder(50, 8, seed=3)
    np.testing.assert_array_equal(np.stack([order.batch(s) for s in range(40)]), ref)
    for step in (0, 5, 6, 17, 36):
        state = json.loads(json.dumps(order.state(step)))
        again = BatchOrder.from_state(state)
        np.testing.assert_array_equal(np.stack([again.batch(s) for s in range(step, 40)]),
                                      ref[step:])  # fmt: skip
    np.testing.assert_array_equal(order.batch(3), ref[3])  # going back replays from the seed


def test_loss_curve_streams_to_the_host(digits):
    """The loss of every step reaches the host in chunks: never more than the cap pending
    on the device, the same values as computing them at once."""
    from hessspec.nn import loop as hloop
    from hessspec.nn.train import LossCurve

    pending = []
    real_append = LossCurve.append

    def spy(self, value):
        real_append(self, value)
        pending.append(self.pending)

    cfg = dataclasses.replace(CFG, steps=300)
    model = make_model("mlp", digits.input_shape, 10, False, seed=0, hidden=[4])
    curve = LossCurve()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(LossCurve, "append", spy)
        hist = train(model, digits.x, digits.y, cfg, seed=0, progress=False, curve=curve)
    assert len(pending) == 300 and max(pending) <= hloop._MAX_PENDING
    assert curve.num_flushed == 300 and curve.pending == 0
    np.testing.assert_array_equal(curve.host_losses(), hist.losses)
    assert hist.losses.shape == (300,) and np.all(np.isfinite(hist.losses))


@pytest.mark.parametrize("batchnorm", [False, True])
def test_interrupted_training_resumes_to_the_same_state(digits, batchnorm):
    """KeyboardInterrupt between two steps: on_save receives the state reached (kind
    "interrupt"), consistent with the loss curve; training resumed from it takes exactly the
    remaining steps and ends in the uninterrupted state (parameters, BN statistics, losses)."""
    from hessspec.nn.train import LossCurve, TrainingState

    cfg = dataclasses.replace(CFG, steps=30)
    ref_model = make_model("mlp", digits.input_shape, 10, batchnorm, seed=0, hidden=[8])
    ref = train(ref_model, digits.x, digits.y, cfg, checkpoints=[0, 20], seed=3, progress=False,
                on_checkpoint=lambda *a: None)  # fmt: skip

    saved: list[tuple[TrainingState, str]] = []
    calls = {"n": 0}
    real_append = LossCurve.append

    def interrupt_at_13(self, value):
        real_append(self, value)
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt

    model = make_model("mlp", digits.input_shape, 10, batchnorm, seed=0, hidden=[8])
    curve = LossCurve()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(LossCurve, "append", interrupt_at_13)
        with pytest.raises(KeyboardInterrupt):
            train(model, digits.x, digits.y, cfg, checkpoints=[0, 20], seed=3, progress=False,
                  on_checkpoint=lambda *a: None, curve=curve,
                  on_save=lambda state, kind: saved.append((state, kind)))  # fmt: skip
    assert [(s.step, k) for s, k in saved] == [(0, "checkpoint"), (12, "interrupt")]
    state = saved[-1][0]
    # the 13th loss was recorded but its update never assigned: the state is step 12
    assert state.losses.shape == (12,) and len(curve) == 12
    np.testing.assert_array_equal(state.losses, ref.losses[:12])

    fresh = make_model("mlp", digits.input_shape, 10, batchnorm, seed=99, hidden=[8])
    seen, later = [], []
    hist = train(fresh, digits.x, digits.y, cfg, checkpoints=[0, 20], seed=0, progress=False,
                 resume_from=state, on_checkpoint=lambda s, *a: seen.append(s),
                 on_save=lambda state, kind: later.append((state.step, kind)))  # fmt: skip
    assert seen == [20] and later == [(20, "checkpoint"), (30, "final")]
    np.testing.assert_array_equal(hist.losses, ref.losses)
    for a, b in zip(jax.tree.leaves(nnx.state(fresh)), jax.tree.leaves(nnx.state(ref_model)),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_divergence_names_the_first_non_finite_step(digits):
    from hessspec.nn.train import LossCurve, TrainingDiverged

    model = make_model("mlp", digits.input_shape, 10, False, seed=0, hidden=[4])
    cfg = dataclasses.replace(CFG, steps=40)
    order = batch_indices(digits.num_examples, cfg.batch_size, cfg.steps, seed=0)
    # a poisoned example first seen by step 6 (of 40): that step's loss is nan
    poisoned = next(i for i in order[5] if i not in order[:5])
    x = digits.x.copy()
    x[poisoned] = np.nan
    curve = LossCurve()
    with pytest.raises(TrainingDiverged) as e:
        train(model, x, digits.y, cfg, seed=0, progress=False, curve=curve)
    step = e.value.step
    assert step == 6
    losses = curve.losses()
    assert losses.shape == (step,) and not np.isfinite(losses[-1])
    assert np.all(np.isfinite(losses[:-1]))
    assert f"at step {step} is" in str(e.value) and "learning_rate" in str(e.value)


def test_progress_bar_counts_training_time_only():
    """The training bar's clock stops during an analysis (pause/resume), so its rate and
    time estimate are those of the training steps (issue 9: the step-0 analysis and the
    compilation made a 3-minute run show 2:41:47)."""
    import io
    import time

    from hessspec.nn.progress import Progress

    stream = io.StringIO()
    bar = Progress("bars", stream=stream).training("mlp", total=100)
    bar.advance(10)
    bar.pause("analysing step 10")
    time.sleep(0.4)
    bar.resume()
    bar.advance(10)
    elapsed = bar._bar.format_dict["elapsed"]
    bar.close()
    assert elapsed < 0.3, elapsed
    assert bar.seconds < 0.3


def test_log_lines_when_not_a_terminal():
    import io

    from hessspec.nn.progress import Progress

    stream = io.StringIO()
    progress = Progress("auto", stream=stream)  # a StringIO is no terminal: log lines
    assert progress.style == "lines"
    training = progress.training("mlp (1/2)", total=100)
    for _ in range(100):
        training.advance(1, loss=0.5)
    training.close()
    with progress.analysis("analysing mlp: step 100", 2) as shown:
        shown.stage("top eigenpairs")
        shown.stage("density")
    lines = stream.getvalue().splitlines()
    steps = [line for line in lines if "mlp (1/2): step" in line]
    assert len(steps) == 10 and "step 100/100 (100%), loss 0.5000" in steps[-1]
    assert lines[-2].endswith("analysing mlp: step 100: top eigenpairs")
    assert all(line.startswith("hessspec [") and " s]: " in line for line in lines)


def test_observers_alongside_checkpoints(digits):
    """train's observe/observe_at: the loop's observer at its steps, with the parameters
    and BN statistics the checkpoint callback sees at a common step (pure dicts), its
    values recorded and handed back; the checkpoint steps stay those of the callback."""
    import hessspec.nn
    from hessspec.nn import make_model as top_make_model

    # the package exports the model builders; hessspec.nn.train stays the module
    assert top_make_model is make_model and hessspec.nn.train.train is train
    at_checkpoint, seen = {}, []

    def record(step, model, status):
        rest = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
        at_checkpoint[step] = (_params(model), [np.asarray(v) for v in jax.tree.leaves(rest)])

    def observe(obs):
        seen.append((obs.step, obs.last, [np.asarray(v) for v in jax.tree.leaves(obs.state)]))
        return float(
            np.linalg.norm(np.concatenate([np.ravel(v) for v in jax.tree.leaves(obs.params)]))
        )

    model = make_model("mlp", digits.input_shape, 10, True, seed=0, hidden=[8])
    hist = train(model, digits.x, digits.y, CFG, checkpoints=[4, 12], on_checkpoint=record,
                 observe=observe, observe_at=range(0, 13, 4), seed=3, progress=False)  # fmt: skip
    assert hist.checkpoints == (4, 12) and [s for s, _ in hist.observations] == [0, 4, 8, 12]
    assert [last for _, last, _ in seen] == [None, *[v for _, v in hist.observations[:-1]]]
    for step, _, state in seen:
        if step in at_checkpoint:  # the same step's parameters and BN statistics
            norm = dict(hist.observations)[step]
            np.testing.assert_allclose(norm, np.linalg.norm(at_checkpoint[step][0]), rtol=1e-12)
            for a, b in zip(state, at_checkpoint[step][1], strict=True):
                np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(hist.observations[-1][1], np.linalg.norm(_params(model)), rtol=1e-12)
