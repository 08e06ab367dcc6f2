"""ResNet-18 on CIFAR-shaped synthetic images: HVP/gradient ratio, top-k eigenpairs, SLQ.

The model is :class:`hessspec.nn.models.ResNet` in its CIFAR ResNet-18 shape (3x3 stem, four
stages of two basic blocks with 64, 128, 256 and 512 channels, global average pooling;
11.2M parameters), without and with BatchNorm (train mode: each batch of ``--batch-size``
normalised with its own statistics). The data are ``--n`` standard-normal 32x32x3 images with
random labels (no download; the cost of a Hessian-vector product does not depend on the
pixels). Float32 model with x64 on: HVPs in float32, the tridiagonal in float64, the Krylov
basis in ``--basis-dtype`` (float32 by default: 128 rows x 11.2M = 5.3 GiB).

Printed per network, as a markdown table: seconds per gradient and per HVP over the whole
data set (steady state, after compilation), their ratio (target <= 2.5; forward-over-reverse's
floor is about 1.7), the first HVP's compile-and-run seconds, top-``k`` eigenpairs (seconds,
matvecs, converged pairs, lambda_1), a ``--probes`` x ``--steps`` SLQ density (seconds,
seconds per step / seconds per HVP), the memory estimate and the measured peak (device
memory statistics on an accelerator, resident set size on CPU).

On a GPU: ``python benchmarks/resnet18.py --n 50000``. CPU smoke test (a minute or two):
``python benchmarks/resnet18.py --n 16 --batch-size 8 --k 2 --steps 6 --probes 1``.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hessspec as hs  # noqa: E402
from hessspec.linalg import memory  # noqa: E402
from hessspec.nn.models import ResNet  # noqa: E402
from hessspec.nn.objective import make_objective  # noqa: E402


def _peak_bytes() -> tuple[int, str]:
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device peak"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS"


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(batchnorm: bool, args) -> dict:
    from flax import nnx

    rng = np.random.default_rng(0)
    data = {
        "x": rng.standard_normal((args.n, 32, 32, 3)).astype(np.float32),
        "y": rng.integers(0, 10, args.n).astype(np.int32),
    }
    model = ResNet((32, 32, 3), (64, 128, 256, 512), 2, 10, batchnorm=batchnorm, rngs=nnx.Rngs(0))
    obj = make_objective(model, "cross_entropy", bn_mode="train" if batchnorm else None)
    op = hs.hessian_operator(obj.loss_fn, obj.params, data, batch_size=args.batch_size)
    row = {"network": f"ResNet-18, {'BN train mode' if batchnorm else 'no BN'}"}
    row["params"] = op.dim

    def gradient():
        out = hs.dataset_gradient(obj.loss_fn, obj.params, data, batch_size=args.batch_size)
        out.gradient.block_until_ready()

    gradient()  # compile
    row["grad_s"] = _median_seconds(gradient, args.repeats)
    v = jnp.asarray(rng.standard_normal(op.dim), jnp.float32)
    t = time.perf_counter()
    op.matvec(v).block_until_ready()
    row["first_hvp_s"] = time.perf_counter() - t
    row["hvp_s"] = _median_seconds(lambda: op.matvec(v).block_until_ready(), args.repeats)
    estimates = [
        memory.estimate_memory(op, k=args.k, basis_dtype=args.basis_dtype),
        memory.estimate_memory(
            op, num_probes=args.probes, num_steps=args.steps, basis_dtype=args.basis_dtype
        ),
    ]
    row["estimate_bytes"] = max(e.total for e in estimates)
    t = time.perf_counter()
    eig = hs.top_eigenpairs(op, args.k, basis_dtype=args.basis_dtype, check_memory=False)
    row["top_s"] = time.perf_counter() - t
    row["top"] = (eig.num_matvecs, int(eig.converged.sum()), float(eig.values[0]))
    t = time.perf_counter()
    sd = hs.spectral_density(
        op, args.probes, args.steps, basis_dtype=args.basis_dtype, check_memory=False
    )
    row["slq_s"] = time.perf_counter() - t
    row["slq_per_step"] = row["slq_s"] / (args.probes * args.steps) / row["hvp_s"]
    row["slq_range"] = (sd.lambda_min, sd.lambda_max)
    row["peak_bytes"], row["peak_kind"] = _peak_bytes()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="images")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--basis-dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bn", choices=["both", "no", "train"], default="both")
    args = parser.parse_args()
    print(f"devices: {jax.devices()} (jax {jax.__version__}); n={args.n}, "
          f"batch_size={args.batch_size}, basis_dtype={args.basis_dtype}", flush=True)  # fmt: skip
    print(
        "| network | params | grad s | HVP s | hvp/grad | first HVP s (compile) | "
        f"top-{args.k} s (matvecs, converged, lambda_1) | SLQ {args.probes}x{args.steps} s "
        "(per step / HVP) | estimate GiB | measured GiB |"
    )
    print("|" + "---|" * 10)
    settings = {"both": (False, True), "no": (False,), "train": (True,)}[args.bn]
    for batchnorm in settings:
        r = measure(batchnorm, args)
        matvecs, converged, lam1 = r["top"]
        print(
            f"| {r['network']} | {r['params']:,} | {r['grad_s']:.3f} | {r['hvp_s']:.3f} | "
            f"{r['hvp_s'] / r['grad_s']:.2f} | {r['first_hvp_s']:.1f} | {r['top_s']:.1f} "
            f"({matvecs}, {converged}/{args.k}, {lam1:.4g}) | {r['slq_s']:.1f} "
            f"({r['slq_per_step']:.2f}) | {r['estimate_bytes'] / 2**30:.2f} | "
            f"{r['peak_bytes'] / 2**30:.2f} ({r['peak_kind']}) |",
            flush=True,
        )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
