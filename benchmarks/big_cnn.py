"""A ~1e6-parameter CNN on all 1797 digits: top-20 eigenpairs and a 10 x 90 SLQ density.

The model is :class:`common.WideHeadCNN` with two dense hidden layers of width 930
(999,910 parameters): the bundled CNN's convolutional trunk (16 and 32 channels) and a wide
dense head (see common.py for why the parameters sit in the head). Float32 model, x64 on:
HVPs in float32, the tridiagonals in float64.

Settings (the defaults below; each is a flag):

- operator over all 1797 digits in one batch (``--batch-size``: on 2 CPU cores one batch is
  the fastest; a batch size only bounds the HVP working set), then
  :func:`hessspec.linalg.linop.linearize` (the loss's forward/backward pass at the parameters done
  once: ~100 MiB kept, each HVP ~20% cheaper; ``--no-linearize`` to compare);
- ``basis_dtype="float32"`` for both solvers: half the basis memory and half the
  reorthogonalization traffic (the basis is the only O(steps x 1e6) object);
- top-20 with the default basis size (128 rows) and tolerance (1e-3 |lambda| per pair for
  float32 HVPs);
- SLQ 10 probes x 90 steps, one probe after another on one basis.

Prints the memory estimate first (what a CLI prints before a run), then a markdown table
of wall times. Usage: python benchmarks/big_cnn.py [--batch-size N] [--no-linearize]
[--basis-dtype float64] [--skip-slq]
"""

import argparse
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import build_model, peak_rss_bytes  # noqa: E402

import hessspec as hs  # noqa: E402
from hessspec.linalg import memory  # noqa: E402
from hessspec.linalg.linop import linearize  # noqa: E402
from hessspec.nn.objective import make_objective  # noqa: E402


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=930)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--no-linearize", action="store_true")
    parser.add_argument("--basis-dtype", default="float32")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--skip-slq", action="store_true")
    parser.add_argument("--skip-top", action="store_true")
    return parser.parse_args()


def _print_memory_estimate(op, args, basis_dtype) -> None:
    """What a CLI prints before a run: the peak of the solver calls' memory estimates."""
    estimates = []
    if not args.skip_top:
        estimates.append(memory.estimate_memory(op, k=args.k, basis_dtype=basis_dtype))
    if not args.skip_slq:
        estimates.append(
            memory.estimate_memory(
                op, num_steps=args.steps, num_probes=args.probes, basis_dtype=basis_dtype
            )
        )
    if estimates:
        print(memory.summarize(estimates), flush=True)


def _hvp_seconds(op, note) -> float:
    """Time the first HVP (compile + run) and the median of 3 more; returns the median."""
    v = jax.random.normal(jax.random.key(0), (op.dim,), jnp.float32)
    t = time.perf_counter()
    op.matvec(v).block_until_ready()
    note("first HVP (compile + run)", time.perf_counter() - t)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        op.matvec(v).block_until_ready()
        times.append(time.perf_counter() - t)
    t_hvp = float(np.median(times))
    note("one HVP (median of 3)", t_hvp)
    return t_hvp


def _solve(op, args, basis_dtype, t_hvp: float, note) -> None:
    """The top-k eigenpairs and the SLQ density, timed (unless skipped)."""
    if not args.skip_top:
        t = time.perf_counter()
        eig = hs.top_eigenpairs(op, args.k, basis_dtype=basis_dtype)
        dt = time.perf_counter() - t
        rel = np.max(eig.residuals / np.max(np.abs(eig.values)))
        note(
            f"top-{args.k} eigenpairs",
            dt,
            f"{eig.num_matvecs} matvecs, {int(np.sum(eig.converged))}/{args.k} converged, "
            f"max residual/lambda_1 {rel:.1e}, lambda_1 {eig.values[0]:.4g}, "
            f"lambda_{args.k} {eig.values[-1]:.4g}",
        )
    if not args.skip_slq:
        t = time.perf_counter()
        sd = hs.spectral_density(
            op, num_probes=args.probes, num_steps=args.steps, basis_dtype=basis_dtype
        )
        dt = time.perf_counter() - t
        note(
            f"SLQ density {args.probes} x {args.steps}",
            dt,
            f"{args.probes * args.steps} matvecs, nodes in [{sd.lambda_min:.3g}, "
            f"{sd.lambda_max:.3g}], {dt / (args.probes * args.steps) / t_hvp:.2f} x HVP "
            "per step",
        )


def main():
    args = _arguments()
    basis_dtype = None if args.basis_dtype in ("none", "None") else args.basis_dtype
    t_all = time.perf_counter()
    print(
        f"devices: {jax.devices()}  (jax {jax.__version__}); load average {os.getloadavg()}",
        flush=True,
    )
    data = hs.load_digits("all", dtype=np.float32)
    batch = {"x": jnp.asarray(data.x), "y": jnp.asarray(data.y)}
    model = build_model("cnn", args.width)
    obj = make_objective(model, "cross_entropy")
    op = hs.hessian_operator(obj.loss_fn, obj.params, batch, batch_size=args.batch_size)
    rows = []

    def note(name, sec, text=""):
        rows.append((name, sec, text))
        print(f"  {name}: {sec:.1f} s {text}", flush=True)

    if not args.no_linearize:
        t = time.perf_counter()
        op = linearize(op)
        jax.block_until_ready(op.operand)
        note("linearize (loss forward/backward once)", time.perf_counter() - t)
    print(
        f"model: WideHeadCNN hidden=({args.width}, {args.width}), {op.dim} parameters, "
        f"{len(data.x)} digits, batch_size={args.batch_size}, linearized="
        f"{not args.no_linearize}, basis_dtype={basis_dtype}"
    )
    _print_memory_estimate(op, args, basis_dtype)
    _solve(op, args, basis_dtype, _hvp_seconds(op, note), note)
    total = time.perf_counter() - t_all
    rows.append(("total wall time (incl. data, model, compiles)", total, ""))
    print()
    print("| stage | seconds | notes |")
    print("|---|---|---|")
    for name, sec, text in rows:
        print(f"| {name} | {sec:.1f} | {text} |")
    print(f"\npeak RSS {peak_rss_bytes() / 2**30:.2f} GiB; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
