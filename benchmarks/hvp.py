"""Cost of a Hessian-vector product and of a Lanczos step, relative to a gradient.

For the bundled MLP and CNN on digits (all 1437 training images in one batch), with and
without BatchNorm (train mode), in float32 and float64, prints:

- hvp/grad: seconds per HVP (forward-over-reverse, ``op.matvec``) / seconds per gradient
  (``jax.grad`` of the same mean loss, jitted). Target <= 2.5; the floor is about 1.7.
- lanczos/(90 hvp): seconds for 90 Lanczos steps with full reorthogonalization (one SLQ
  probe, ``hs.spectral_density(op, 1, 90)``: the solvers' compiled engine, one loop) /
  (90 x seconds per HVP). Target <= 1.2.
  In brackets: over 90 HVPs run back to back in one compiled loop (no Python dispatch
  between them: the floor a step cannot beat), the stricter measure. Then the same with
  ``basis_dtype="float32"``.

Timings are medians over repeats after a warm-up call (compilation excluded). On a shared
machine they are noisy: repeat, and compare runs taken at the same load.

Usage: python benchmarks/hvp.py [--repeats 7] [--steps 90]
"""

import argparse
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)  # float64 rows; float32 rows use mixed precision

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hessspec as hs  # noqa: E402
from hessspec.nn.data import load_digits  # noqa: E402
from hessspec.nn.models import make_model  # noqa: E402
from hessspec.nn.objective import make_objective  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import in_loop_hvp_seconds, median_seconds  # noqa: E402


def measure(name, batchnorm, dtype, repeats, steps):
    train = load_digits("train", dtype=np.float64 if dtype == jnp.float64 else np.float32)
    model = make_model(name, train.input_shape, train.num_classes, batchnorm, seed=0, dtype=dtype)
    obj = make_objective(model, "cross_entropy", bn_mode="train" if batchnorm else None)
    batch = {"x": jnp.asarray(train.x), "y": jnp.asarray(train.y)}
    op = hs.hessian_operator(obj.loss_fn, obj.params, batch)
    grad = jax.jit(jax.grad(obj.loss_fn))
    v = jax.random.normal(jax.random.key(0), (op.dim,), dtype)
    t_grad = median_seconds(lambda: jax.block_until_ready(grad(obj.params, batch)), repeats)
    t_hvp = median_seconds(lambda: op.matvec(v).block_until_ready(), repeats)
    t_loop = in_loop_hvp_seconds(op, steps, max(1, repeats // 3))
    t_lanczos = {}
    for bdt in (None, "float32"):
        t_lanczos[bdt] = median_seconds(
            lambda bdt=bdt: jax.block_until_ready(
                hs.spectral_density(op, 1, steps, basis_dtype=bdt, check_memory=False).nodes
            ),
            max(1, repeats // 2),
        )
    return op.dim, t_grad, t_hvp, t_loop, t_lanczos


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=90)
    args = parser.parse_args()
    print(f"devices: {jax.devices()}  (jax {jax.__version__}); load average {os.getloadavg()}")
    m = args.steps
    header = (
        f"| model | BN | dtype | params | grad ms | HVP ms | hvp/grad | HVP in loop ms | "
        f"lanczos {m} s | lanczos/({m} hvp) | lanczos/({m} hvp), f32 basis |"
    )
    print(header)
    print("|" + "---|" * 11)
    for name in ("mlp", "cnn"):
        for batchnorm in (False, True):
            for dtype in (jnp.float32, jnp.float64):
                dim, tg, th, tloop, tl = measure(name, batchnorm, dtype, args.repeats, m)
                t64, t32 = tl[None], tl["float32"]
                print(
                    f"| {name} | {'train' if batchnorm else 'no'} | {jnp.dtype(dtype).name} | "
                    f"{dim} | {1e3 * tg:.2f} | {1e3 * th:.2f} | {th / tg:.2f} | "
                    f"{1e3 * tloop:.2f} | {t64:.3f} | {t64 / (m * th):.2f} "
                    f"({t64 / (m * tloop):.2f}) | {t32 / (m * th):.2f} ({t32 / (m * tloop):.2f}) |",
                    flush=True,
                )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
