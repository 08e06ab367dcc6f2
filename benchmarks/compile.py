"""What a user meets first: compilation. First-call time, steady time, and what follow-ups compile.

For each model (the issue's 3-hidden-layer width-32 MLP, and the bundled digits CNN, each
without and with BatchNorm in train mode), in float64 on all 1797 digits, a fresh process
measures:

- first: ``hs.hessian_operator(...)`` plus the first ``hs.top_eigenpairs(op, 10)``, wall
  seconds, and the seconds of XLA compilation inside them;
- steady: the same ``top_eigenpairs(op, 10)`` again;
- the XLA compile seconds (and number of programs compiled) of each follow-up call: ``k=20``;
  ``which="smallest", k=3``; a new operator of the same loss at new parameters (the next
  checkpoint) and its top 10; its density (10 probes x 90 steps); its trace (Hutch++, 300
  matvecs); a density with 5 probes. Target: 0.5 s in all.
- first (warm cache): the first call again in a new process whose persistent compilation
  cache (:func:`hessspec.compilation_cache.enable_compilation_cache`, a temporary folder)
  the previous process filled.

Usage: python benchmarks/compile.py [--models mlp mlp-bn cnn cnn-bn] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

FOLLOW_UPS = (
    "k=20",
    "smallest k=3",
    "new params, top 10",
    "its density",
    "its trace",
    "density, 5 probes",
)


def _measure(model_name: str, cache_dir: str | None, first_only: bool) -> dict:
    """Runs in a fresh process: the measurements of one model."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from jax import monitoring

    compiles: list[float] = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    monitoring.register_event_duration_secs_listener(listener)
    import jax.numpy as jnp
    import numpy as np

    import hessspec as hs
    from hessspec.compilation_cache import enable_compilation_cache
    from hessspec.nn.data import load_digits
    from hessspec.nn.models import make_model
    from hessspec.nn.objective import make_objective

    if cache_dir:
        enable_compilation_cache(cache_dir)
    family, _, bn = model_name.partition("-")
    data = load_digits("all", dtype=np.float64)
    kwargs = {"hidden": (32, 32, 32)} if family == "mlp" else {}
    model = make_model(family, data.input_shape, 10, bool(bn), seed=0, dtype=jnp.float64, **kwargs)
    obj = make_objective(model, "cross_entropy", bn_mode="train" if bn else None)
    batch = data.batch

    def timed(fn):
        n0, t0 = len(compiles), time.perf_counter()
        fn()
        return time.perf_counter() - t0, sum(compiles[n0:]), len(compiles) - n0

    out: dict = {"model": model_name, "params": None}
    state: dict = {}

    def first():
        state["op"] = hs.hessian_operator(obj.loss_fn, obj.params, batch)
        hs.top_eigenpairs(state["op"], 10)

    out["first"] = timed(first)
    op = state["op"]
    if first_only:
        return out
    out["params"] = op.dim
    out["steady"] = timed(lambda: hs.top_eigenpairs(op, 10))
    new_params = jax.tree.map(lambda a: a * 1.01, obj.params)

    def new_operator():
        state["op2"] = hs.hessian_operator(obj.loss_fn, new_params, batch)
        hs.top_eigenpairs(state["op2"], 10)

    calls = (
        lambda: hs.top_eigenpairs(op, 20),
        lambda: hs.top_eigenpairs(op, 3, which="smallest"),
        new_operator,
        lambda: hs.spectral_density(state["op2"], 10, 90),
        lambda: hs.trace(state["op2"], 300),
        lambda: hs.spectral_density(state["op2"], 5, 90),
    )
    out["follow_ups"] = {name: timed(fn) for name, fn in zip(FOLLOW_UPS, calls, strict=True)}
    return out


def _run_child(model_name: str, cache_dir: str | None, first_only: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", model_name]
    if cache_dir:
        cmd += ["--cache", cache_dir]
    if first_only:
        cmd += ["--first-only"]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{model_name}: the measuring process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "mlp-bn", "cnn", "cnn-bn"])
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--first-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child, args.cache, args.first_only)))
        return
    print(f"load average {os.getloadavg()}", flush=True)
    header = (
        "| model | params | first call s (compile s) | steady s | "
        + " | ".join(FOLLOW_UPS)
        + " | follow-ups compile s | first call, warm cache s |"
    )
    print(header)
    print("|" + "---|" * (len(FOLLOW_UPS) + 6))
    results = []
    for name in args.models:
        cold = _run_child(name, None)
        with tempfile.TemporaryDirectory() as cache:
            _run_child(name, cache, first_only=True)  # fills the persistent cache
            warm = _run_child(name, cache, first_only=True)
        cold["first_warm_cache"] = warm["first"]
        results.append(cold)
        fu = cold["follow_ups"]
        cells = " | ".join(f"{fu[n][1]:.2f} ({fu[n][2]})" for n in FOLLOW_UPS)
        total = sum(fu[n][1] for n in FOLLOW_UPS)
        first_s, first_c, _ = cold["first"]
        print(
            f"| {name} | {cold['params']} | {first_s:.2f} ({first_c:.2f}) | "
            f"{cold['steady'][0]:.2f} | {cells} | {total:.2f} | {warm['first'][0]:.2f} |",
            flush=True,
        )
    print(f"load average {os.getloadavg()}")
    print("cells of the follow-ups: XLA compile seconds (programs compiled)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
