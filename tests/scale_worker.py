"""Worker for tests/test_scale.py: top eigenvalues of a fixed problem, printed as JSON.

Usage: python scale_worker.py [--coordinator HOST:PORT --num-processes N --process-id I]
Device count comes from XLA_FLAGS=--xla_force_host_platform_device_count=D.
"""

import argparse
import json

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hessspec as hs  # noqa: E402

BATCH_SIZES = (8,)  # 38 = 4*8 + 6: full batches split over 2 or 4 devices, a ragged last one


def problem():
    """An MLP with a BatchNorm-like (non-separable) loss; 38 examples: ragged batches."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((38, 6))
    y = rng.integers(0, 3, size=38)
    params = {"w1": rng.standard_normal((6, 8)) / 2.5, "w2": rng.standard_normal((8, 3)) / 3}

    def loss_fn(p, b):
        h = b["x"] @ p["w1"]
        h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
        logp = jax.nn.log_softmax(jnp.tanh(h) @ p["w2"])
        return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], axis=1))

    return loss_fn, params, {"x": x, "y": y}


def compute():
    """Top/bottom eigenvalues and one HVP on whatever devices JAX has, as plain lists."""
    loss_fn, params, data = problem()
    out = {"num_devices": jax.device_count(), "process": jax.process_index()}
    for batch_size in BATCH_SIZES:
        op = hs.hessian_operator(loss_fn, params, data, batch_size=batch_size)
        specs = [
            str(getattr(leaf.sharding, "spec", "single device"))
            for leaf in jax.tree_util.tree_leaves(op.operand[3])  # the batches
        ]
        eig = hs.top_eigenpairs(op, k=3, key=jax.random.key(1))
        low = hs.top_eigenpairs(op, k=1, which="smallest", key=jax.random.key(1))
        out[str(batch_size)] = {
            "top": np.asarray(eig.values).tolist(),
            "bottom": np.asarray(low.values).tolist(),
            "hv": np.asarray(op.matvec(jnp.linspace(-1, 1, op.dim))).tolist(),
            "specs": specs,
        }
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()
    if args.coordinator:
        hs.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    print("RESULT " + json.dumps(compute()))


if __name__ == "__main__":
    main()
