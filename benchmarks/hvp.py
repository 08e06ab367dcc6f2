"""Cost of a Hessian-vector product and of a Lanczos step, relative to a gradient.

For the bundled MLP and CNN on digits (all 1437 training images in one batch), with and
without BatchNorm (train mode), in float32 and float64, prints:

- hvp/grad: seconds per HVP (forward-over-reverse, ``op.matvec``) / seconds per gradient
  (``jax.grad`` of the same mean loss, jitted). Target <= 2.5; the floor is about 1.7.
- lanczos/(90 hvp): seconds for 90 Lanczos steps with full reorthogonalization
  (``hs.lanczos_tridiag``, one compiled loop) / (90 x seconds per HVP). Target <= 1.2.

Timings are medians over repeats after a warm-up call (compilation excluded).

Usage: python benchmarks/hvp.py [--repeats 7] [--steps 90]
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)  # float64 rows; float32 rows use mixed precision

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hessspec as hs  # noqa: E402
from hessspec.data import load_digits  # noqa: E402
from hessspec.models import make_model  # noqa: E402
from hessspec.objective import make_objective  # noqa: E402


def median_seconds(fn, repeats):
    """Median wall time of ``fn()`` (which must block until its result is ready)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(name, batchnorm, dtype, repeats, steps):
    train = load_digits("train", dtype=np.float64 if dtype == jnp.float64 else np.float32)
    model = make_model(name, train.input_shape, train.num_classes, batchnorm, seed=0, dtype=dtype)
    obj = make_objective(model, "cross_entropy", bn_mode="train" if batchnorm else None)
    batch = {"x": jnp.asarray(train.x), "y": jnp.asarray(train.y)}
    op = hs.hessian_operator(obj.loss_fn, obj.params, batch)
    grad = jax.jit(jax.grad(obj.loss_fn))
    v = jax.random.normal(jax.random.key(0), (op.dim,), dtype)
    v0 = jax.random.normal(jax.random.key(1), (op.dim,))
    t_grad = median_seconds(lambda: jax.block_until_ready(grad(obj.params, batch)), repeats)
    t_hvp = median_seconds(lambda: op.matvec(v).block_until_ready(), repeats)
    t_lanczos = median_seconds(
        lambda: jax.block_until_ready(
            hs.lanczos_tridiag(op.apply, op.operand, v0, steps, op.dtype).alphas
        ),
        max(1, repeats // 3),
    )
    return op.dim, t_grad, t_hvp, t_lanczos


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=90)
    args = parser.parse_args()
    print(f"devices: {jax.devices()}  (jax {jax.__version__})")
    header = (
        f"| model | BN | dtype | params | grad ms | HVP ms | hvp/grad | "
        f"lanczos {args.steps} s | lanczos/({args.steps} hvp) |"
    )
    print(header)
    print("|" + "---|" * 9)
    for name in ("mlp", "cnn"):
        for batchnorm in (False, True):
            for dtype in (jnp.float32, jnp.float64):
                dim, tg, th, tl = measure(name, batchnorm, dtype, args.repeats, args.steps)
                print(
                    f"| {name} | {'train' if batchnorm else 'no'} | {jnp.dtype(dtype).name} | "
                    f"{dim} | {1e3 * tg:.2f} | {1e3 * th:.2f} | {th / tg:.2f} | {tl:.3f} | "
                    f"{tl / (args.steps * th):.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
