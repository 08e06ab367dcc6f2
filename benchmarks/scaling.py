"""Scaling of HVP, gradient and Lanczos cost with parameter count and with device count.

Every measurement runs in a fresh subprocess (so peak memory is that run's own, and the
forced device count can differ), on digits (the 1437 training images), float32 models with
x64 on (float32 HVPs, float64 tridiagonals). Model families: see common.py (``mlp``: MLP
with two hidden layers of width h; ``cnn``: the bundled CNN's trunk plus two dense hidden
layers of width h).

Columns:

- grad ms, HVP ms: median wall time of one jitted gradient / one ``op.matvec`` call;
  hvp/grad their ratio (forward-over-reverse's floor is about 1.7-2).
- HVP in loop ms: seconds per HVP when they run back to back inside one compiled loop:
  the floor for a Lanczos step (no Python dispatch between products).
- lanczos/(m hvp): ``m`` Lanczos steps (one SLQ probe, full reorthogonalization)
  over ``m`` standalone HVPs; in brackets over ``m`` in-loop HVPs (the stricter measure).
  Reported for the default float64 basis and for ``basis_dtype="float32"``.
- peak RSS: ``ru_maxrss`` of the subprocess (includes the JAX runtime, ~0.4 GiB);
  estimate: :func:`hessspec.linalg.memory.estimate_memory` of the Lanczos run.

Usage (run from the repository root; each part well under 10 minutes on 2 cores)::

    python benchmarks/scaling.py params --families mlp cnn --sizes 1e4 3e4 1e5 3e5 1e6
    python benchmarks/scaling.py devices --families mlp cnn --size 1e5 --devices 1 2 4

``--out FILE`` appends the raw results as JSON lines; ``--steps`` sets ``m`` (default 90).
Timings on a shared machine are noisy: medians of repeats, taken between other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args) -> dict:
    """Measure one configuration in this (fresh) process; returns a dict."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, HERE)
    from common import build_model, in_loop_hvp_seconds, median_seconds, peak_rss_bytes

    import hessspec as hs
    from hessspec.curvature.conv_layout import canonical_convolutions
    from hessspec.linalg import memory
    from hessspec.nn.objective import make_objective

    t0 = time.perf_counter()
    data = hs.load_digits("train", dtype=np.float32)
    batch = {"x": jnp.asarray(data.x), "y": jnp.asarray(data.y)}
    model = build_model(args.family, args.width)
    obj = make_objective(model, "cross_entropy")
    op = hs.hessian_operator(obj.loss_fn, obj.params, batch, batch_size=args.batch_size)
    steps = args.steps
    big = op.dim >= 300_000
    reps = 3 if big else 7

    # the gradient over the same (sharded) batches as the operator, weighted as there
    flat_params, (full, rem) = op.operand
    n_total = len(data.x)

    def total_loss(p):
        params = op.unravel(p)
        parts = []
        if full is not None:
            count, size = jax.tree_util.tree_leaves(full)[0].shape[:2]
            if count == 1:  # one batch: no loop, as in the operator
                first = jax.tree_util.tree_map(lambda a: a[0], full)
                parts.append(size * obj.loss_fn(params, first))
            else:
                parts.append(size * jax.lax.map(lambda b: obj.loss_fn(params, b), full).sum())
        if rem is not None:
            size = jax.tree_util.tree_leaves(rem)[0].shape[0]
            parts.append(size * obj.loss_fn(params, rem))
        return sum(parts) / n_total

    # canonical convolution layout as in the operator (hessspec.curvature.conv_layout): lax.map is a
    # loop, where XLA:CPU would otherwise run the gradient's convolutions slowly
    grad = jax.jit(canonical_convolutions(jax.grad(total_loss)))
    t_grad = median_seconds(lambda: grad(flat_params).block_until_ready(), reps)
    v = jax.random.normal(jax.random.key(0), (op.dim,), jnp.float32)
    t_hvp = median_seconds(lambda: op.matvec(v).block_until_ready(), reps)
    t_loop = in_loop_hvp_seconds(op, 30 if big else steps, 1 if big else 3)
    out = {
        "family": args.family,
        "width": args.width,
        "params": op.dim,
        "devices": jax.device_count(),
        "batch_size": args.batch_size,
        "steps": steps,
        "grad_s": t_grad,
        "hvp_s": t_hvp,
        "hvp_loop_s": t_loop,
    }
    for name, bdt in (("lanczos64_s", None), ("lanczos32_s", "float32")):

        def run(bdt=bdt):
            res = hs.spectral_density(op, 1, steps, basis_dtype=bdt, check_memory=False)
            return res.nodes

        out[name] = median_seconds(run, 1 if big else 3)
    out["estimate_bytes"] = memory.estimate_memory(op, num_steps=steps).total
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["wall_s"] = time.perf_counter() - t0
    out["load"] = os.getloadavg()[0]
    return out


def spawn(family, width, devices, steps, batch_size) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "worker",
        "--family",
        family,
        "--width",
        str(width),
        "--steps",
        str(steps),
    ]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({family}, {width}, {devices}):\n{proc.stderr}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _gib(b):
    return f"{b / 2**30:.2f}"


def table_params(rows) -> str:
    m = rows[0]["steps"] if rows else 90
    lines = [
        f"| model | params | grad ms | HVP ms | hvp/grad | HVP in loop ms | "
        f"lanczos/({m} hvp) f64 basis | lanczos/({m} hvp) f32 basis | peak RSS GiB | "
        "estimate GiB |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        s, loop = r["hvp_s"], r["hvp_loop_s"]
        ratios = []
        for key in ("lanczos64_s", "lanczos32_s"):
            t = r[key]
            ratios.append(f"{t / (m * s):.2f} ({t / (m * loop):.2f})")
        lines.append(
            f"| {r['family']} h={r['width']} | {r['params']:,} | {1e3 * r['grad_s']:.1f} | "
            f"{1e3 * s:.1f} | {s / r['grad_s']:.2f} | {1e3 * loop:.1f} | {ratios[0]} | "
            f"{ratios[1]} | {_gib(r['peak_rss_bytes'])} | {_gib(r['estimate_bytes'])} |"
        )
    return "\n".join(lines)


def table_devices(rows) -> str:
    m = rows[0]["steps"] if rows else 90
    lines = [
        f"| model | params | devices | HVP ms | HVP in loop ms | lanczos {m} s "
        f"(f64 basis) | lanczos {m} s (f32 basis) | peak RSS GiB |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} h={r['width']} | {r['params']:,} | {r['devices']} | "
            f"{1e3 * r['hvp_s']:.1f} | {1e3 * r['hvp_loop_s']:.1f} | "
            f"{r['lanczos64_s']:.2f} | {r['lanczos32_s']:.2f} | {_gib(r['peak_rss_bytes'])} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--family", required=True)
    w.add_argument("--width", type=int, required=True)
    w.add_argument("--steps", type=int, default=90)
    w.add_argument("--batch-size", type=int, default=None)
    p = sub.add_parser("params")
    p.add_argument("--families", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--sizes", nargs="+", type=float, default=[1e4, 3e4, 1e5, 3e5, 1e6])
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--out", default=None)
    d = sub.add_parser("devices")
    d.add_argument("--families", nargs="+", default=["mlp", "cnn"])
    d.add_argument("--size", type=float, default=1e5)
    d.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4])
    d.add_argument("--steps", type=int, default=90)
    d.add_argument(
        "--batch-size",
        type=int,
        default=1436,
        help="1436 = 4 x 359: one batch that 1, 2 and 4 devices split evenly (+1 ragged)",
    )
    d.add_argument("--out", default=None)
    t = sub.add_parser("table", help="print the tables of a --out JSON-lines file")
    t.add_argument("file")
    args = parser.parse_args()

    if args.mode == "worker":
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.mode == "table":
        with open(args.file) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        single = [r for r in rows if r.get("kind") == "params"]
        multi = [r for r in rows if r.get("kind") == "devices"]
        if single:
            print(table_params(single))
        if multi:
            print()
            print(table_devices(multi))
        return

    sys.path.insert(0, HERE)
    import jax
    from common import width_for_params

    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    rows = []
    if args.mode == "params":
        configs = [
            (fam, width_for_params(fam, int(size)), 1, None)
            for fam in args.families
            for size in args.sizes
        ]
    else:
        configs = [
            (fam, width_for_params(fam, int(args.size)), n, args.batch_size)
            for fam in args.families
            for n in args.devices
        ]
    for fam, width, n, bs in configs:
        row = spawn(fam, width, n, args.steps, bs)
        row["kind"] = args.mode
        rows.append(row)
        print(
            f"  {fam} h={width} devices={n}: {row['params']:,} params, "
            f"{row['wall_s']:.0f} s, load {row['load']:.1f}",
            flush=True,
        )
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    print()
    print(table_params(rows) if args.mode == "params" else table_devices(rows))


if __name__ == "__main__":
    main()
