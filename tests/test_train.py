"""Training with optax: batches, optimizers, checkpoints, determinism, BatchNorm state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hessspec.config import TrainConfig
from hessspec.data import load_digits, subsample
from hessspec.models import make_model
from hessspec.study import density_grid, resolve_settings
from hessspec.train import batch_indices, make_optimizer, train

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
    from hessspec.config import AnalysisConfig

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
    from hessspec.config import AnalysisConfig
    from hessspec.objective import make_objective
    from hessspec.operators import dataset_gradient, hessian_operator
    from hessspec.study import CheckpointAnalyzer

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
