"""Memory a solver call will need, what the device has, and a refusal before starting.

The largest object of a Hessian spectrum run is the Krylov basis (``M x dim``, ``M =
basis_rows(num_steps)``, at least 128 rows; a thick restart briefly holds a second copy), then
the operator's data (parameters and the dataset), then the working set of one
Hessian-vector product (the solvers run one at a time).
:func:`estimate_memory` adds these up for one call of :func:`hessspec.top_eigenpairs`,
:func:`hessspec.spectral_density`, :func:`hessspec.linalg.trace` or
:func:`hessspec.lanczos_tridiag`; :func:`available_memory` says what the device has free;
:func:`check_fits` raises ``MemoryError`` before a run that cannot fit, naming the options
that lower the estimate. The three solvers call it at their start (``check_memory=``).

For a command-line tool, :func:`summarize` turns the estimates of the calls a run will make
into one line such as ``"this run needs about 3.2 GiB (peak in spectral_density: ...); about
20.5 GiB available"``.

Accuracy: the array components (basis, probes, operator data, solver work vectors) are the
exact sizes of the arrays the solvers allocate. The HVP working set is an approximation: a
liveness scan over the traced program of the matvec(s) run at once (every intermediate
alive from its definition to its last use). XLA fuses and reuses buffers, so the real peak
is usually lower; convolution scratch space is not seen.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, NamedTuple

import jax
import numpy as np

from hessspec.linalg.krylov import MIN_BASIS_ROWS, NUM_BASIS_BLOCKS, basis_rows
from hessspec.linalg.linop import LinearOperator, as_operator, device_of, matvec, solver_dtype
from hessspec.linalg.linop import basis_dtype as resolve_basis_dtype

__all__ = [
    "MemoryEstimate",
    "available_memory",
    "check_call",
    "check_fits",
    "estimate_memory",
    "format_bytes",
    "summarize",
]

GiB = 2**30


class MemoryEstimate(NamedTuple):
    """Bytes a solver call needs, by component.

    Attributes:
        basis: the Krylov basis, ``basis_rows(num_steps) x dim`` in the basis dtype.
        probes: the engine's work vectors (solver dtype) and the arrays returned on the
            host (eigenvectors, a tridiagonalization's basis).
        operator: the operator's data as stored (parameters and dataset; every device's copy).
        hvp: working set of the Hessian-vector products that run at once (approximate).
        workspace: the copy of the basis a thick restart holds (top_eigenpairs).
        total: the sum.
        solver: which call this is for (``"top_eigenpairs"``, ``"spectral_density"``,
            ``"trace"``, ``"lanczos_tridiag"``).
        hints: options that lower the estimate, largest saving first (for messages).
        devices: devices the operator's data lives on. The solvers' vectors are
            replicated on each: on CPU (where all devices share host RAM) the components
            are host totals (solver arrays times ``devices``, every data shard); on
            accelerators they are per device (data and HVP working set divided among them).
    """

    basis: int
    probes: int
    operator: int
    hvp: int
    workspace: int
    total: int
    solver: str
    hints: tuple[str, ...]
    devices: int = 1

    def summary(self) -> str:
        """``"2.1 GiB (basis 1.6 GiB, probes ..., operator ..., HVP ..., workspace ...)"``."""
        parts = ", ".join(
            f"{name} {format_bytes(getattr(self, field))}"
            for name, field in (
                ("basis", "basis"),
                ("probes", "probes"),
                ("operator", "operator"),
                ("HVP", "hvp"),
                ("workspace", "workspace"),
            )
        )
        return f"{format_bytes(self.total)} ({parts})"


def format_bytes(num: float) -> str:
    """Human-readable size: ``"512 B"``, ``"3.4 MiB"``, ``"1.25 GiB"``."""
    num = float(num)
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num) >= size:
            return f"{num / size:.3g} {unit}"
    return f"{int(num)} B"


# ---------------------------------------------------------------------------------------
# the operator's data and its HVP working set


def _leaf_bytes(leaf: Any) -> int:
    shards = getattr(leaf, "addressable_shards", None)
    if shards is not None:
        try:
            return int(sum(s.data.nbytes for s in shards))
        except Exception:  # noqa: BLE001 - deleted or abstract arrays: fall back to shape
            pass
    itemsize = np.dtype(getattr(leaf, "dtype", np.float64)).itemsize
    return int(np.prod(np.shape(leaf), dtype=np.int64)) * itemsize


def operator_bytes(op: LinearOperator) -> int:
    """Bytes of ``op.operand`` (parameters, data) as stored, summed over every device copy."""
    return int(sum(_leaf_bytes(leaf) for leaf in jax.tree_util.tree_leaves(op.operand)))


def _operand_devices(op: LinearOperator) -> tuple[int, str]:
    """(number of devices, platform) of the operator's data (1, "cpu" for host arrays)."""
    count, platform = 1, "cpu"
    for leaf in jax.tree_util.tree_leaves(op.operand):
        sharding = getattr(leaf, "sharding", None)
        devices = getattr(sharding, "device_set", None)
        if devices:
            count = max(count, len(devices))
            platform = next(iter(devices)).platform
    return count, platform


def _aval_bytes(v: Any) -> int:
    aval = getattr(v, "aval", None)
    shape = getattr(aval, "shape", None)
    dtype = getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:  # PRNG key types and the like
        itemsize = getattr(dtype, "itemsize", 4)
    return int(np.prod(shape, dtype=np.int64)) * int(itemsize)


def _sub_jaxprs(eqn) -> list:
    from jax.extend import core as jcore  # here: jax.extend loads pallas (20 ms of imports)

    subs = []
    for value in eqn.params.values():
        items = value if isinstance(value, list | tuple) else (value,)
        for item in items:
            if isinstance(item, jcore.ClosedJaxpr):
                subs.append(item.jaxpr)
            elif isinstance(item, jcore.Jaxpr):
                subs.append(item)
    return subs


def _peak_live_bytes(jaxpr) -> int:
    """Peak bytes of intermediates alive at once in ``jaxpr`` (inputs excluded), by a linear
    scan that frees each value after its last use; a sub-program (scan/while body, cond
    branch, pjit) adds its own peak while its equation runs."""
    from jax.extend import core as jcore

    eqns = jaxpr.eqns
    last_use: dict = {}
    for i, eqn in enumerate(eqns):
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                last_use[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            last_use[v] = len(eqns)
    owned: set = set()
    live = peak = 0
    for i, eqn in enumerate(eqns):
        inner = max((_peak_live_bytes(sub) for sub in _sub_jaxprs(eqn)), default=0)
        out = [v for v in eqn.outvars if not isinstance(v, jcore.DropVar)]
        out_bytes = sum(_aval_bytes(v) for v in out)
        peak = max(peak, live + inner + out_bytes)
        live += out_bytes
        owned.update(out)
        for v in out:
            if v not in last_use:  # never read
                live -= _aval_bytes(v)
                owned.discard(v)
        for v in {v for v in eqn.invars if isinstance(v, jcore.Var)}:
            if v in owned and last_use.get(v) == i:
                live -= _aval_bytes(v)
                owned.discard(v)
    return int(peak)


_HVP_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hvp_working_set(op: LinearOperator, batch: int = 1) -> int:
    """Approximate working set in bytes of ``batch`` matvecs of ``op`` run at once (vmapped).

    Traces (does not compile or run) ``op.apply`` and scans its program for the peak of live
    intermediates; cached per operator and batch, so repeated solver calls do not retrace.
    """
    batch = max(1, int(batch))
    # a plain callable is wrapped anew per solver call, with one stable apply: key on that
    owner = op.apply if not jax.tree_util.tree_leaves(op.operand) else op
    try:
        cache = _HVP_CACHE.setdefault(owner, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    cache = cache.setdefault((op.dim, np.dtype(op.dtype).str), {})
    if batch not in cache:
        operand = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), op.operand
        )
        if batch == 1:

            def fn(v, operand):  # the solvers' traced matvec: its trace is shared
                return matvec(op.apply, v, operand)

            vec = jax.ShapeDtypeStruct((op.dim,), op.dtype)
        else:
            fn = jax.vmap(op.apply, in_axes=(0, None))
            vec = jax.ShapeDtypeStruct((batch, op.dim), op.dtype)
        jaxpr = jax.make_jaxpr(fn)(vec, operand).jaxpr
        if batch == 1:  # one call of the jitted matvec: scan its body
            jaxpr = next(iter(_sub_jaxprs(jaxpr.eqns[0])), jaxpr)
        cache[batch] = _peak_live_bytes(jaxpr)
    return cache[batch]


# ---------------------------------------------------------------------------------------
# estimates


def estimate_memory(
    op_or_dim: LinearOperator | int | Any,
    *,
    num_steps: int | None = None,
    k: int | None = None,
    num_probes: int | None = None,
    probe_batch_size: int | None = None,
    basis_dtype: Any = None,
    num_matvecs: int | None = None,
    matvec_batch_size: int | None = None,
    method: str = "hutch++",
    op_dtype: Any = None,
    dim: int | None = None,
    basis_memory: str = "device",
) -> MemoryEstimate:
    """Bytes one solver call needs, by component (see :class:`MemoryEstimate`).

    Every solver runs :mod:`hessspec.linalg.krylov`'s engine on a basis of ``M = basis_rows(m)``
    rows (at least 128) and one matvec at a time. Which call is estimated follows from the
    arguments:

    - ``k`` given: :func:`hessspec.top_eigenpairs` (``num_steps`` its longest cycle,
      default as there); a thick restart briefly holds a second copy of the basis;
    - ``num_probes`` given: :func:`hessspec.spectral_density` (``num_steps`` per probe,
      default 90; the probes run one after another on one basis);
    - ``num_matvecs`` given: :func:`hessspec.linalg.trace` (``method``; Hutch++ stores its
      ``num_matvecs // 3`` sketch vectors in the basis);
    - otherwise: one :func:`hessspec.lanczos_tridiag` run of ``num_steps`` (default 90),
      whose basis is also returned as a host array.

    Args:
        op_or_dim: a :class:`~hessspec.linalg.linop.LinearOperator` (all components), a plain
            matvec callable with ``dim=``, or just the dimension (an int: operator data and
            HVP working set are then 0, the solver arrays exact).
        num_steps, k, num_probes, basis_dtype, num_matvecs, method: as in the solver.
        probe_batch_size, matvec_batch_size: accepted for compatibility (no effect).
        op_dtype: the operator's dtype when ``op_or_dim`` is an int (default: float32).
        dim: vector length for a plain callable.
        basis_memory: ``"device"`` or ``"host"`` as in the Lanczos solvers. With
            ``"host"`` on an accelerator, ``basis`` counts the one block of the basis (of
            :data:`hessspec.linalg.krylov.NUM_BASIS_BLOCKS`) streamed to the device at a time;
            on CPU host memory is the device's, so nothing changes.

    Returns:
        :class:`MemoryEstimate` in bytes.
    """
    del probe_batch_size, matvec_batch_size
    op, n, odt = _operator_and_dims(op_or_dim, dim, op_dtype)
    bdt = resolve_basis_dtype(odt, basis_dtype)
    # the engine's vectors: f, the current and previous Lanczos vectors, x, A x and a fresh
    # or probe vector (solver dtype), the matvec's input (operator dtype)
    vectors = n * (6 * solver_dtype(odt).itemsize + np.dtype(odt).itemsize)
    arrays = _solver_arrays(
        n,
        vectors,
        bdt.itemsize,
        k=k,
        num_steps=num_steps,
        num_probes=num_probes,
        num_matvecs=num_matvecs,
        method=method,
    )
    sizes = _Sizes(
        basis=arrays.rows * n * bdt.itemsize,
        probes=arrays.probes,
        operator=0 if op is None else operator_bytes(op),
        hvp=0 if op is None else hvp_working_set(op, 1),
        workspace=arrays.workspace,
    )
    hints = list(arrays.hints)
    if bdt.itemsize > 4:
        hints.append(((sizes.basis + sizes.workspace) // 2, 'basis_dtype="float32"'))
    ndev, platform = (1, "cpu") if op is None else _operand_devices(op)
    sizes = _on_devices(sizes, hints, ndev=ndev, platform=platform, basis_memory=basis_memory)
    return MemoryEstimate(
        **{field: int(value) for field, value in sizes._asdict().items()},
        total=int(sum(sizes)),
        solver=arrays.solver,
        hints=tuple(text for _, text in sorted(hints, key=lambda h: -h[0])),
        devices=int(ndev),
    )


class _SolverArrays(NamedTuple):
    """What one solver call allocates besides the operator (bytes, for ``dim = n``).

    Attributes:
        solver: the call's name.
        rows: basis rows ``M``.
        probes: the engine's work vectors and the arrays returned on the host.
        workspace: the copy of the basis a thick restart holds.
        hints: ``(saving, option)`` pairs that lower the estimate.
    """

    solver: str
    rows: int
    probes: int
    workspace: int
    hints: list[tuple[int, str]]


class _Sizes(NamedTuple):
    """Bytes by component, in the order of :class:`MemoryEstimate`'s first fields."""

    basis: int
    probes: int
    operator: int
    hvp: int
    workspace: int


def _operator_and_dims(op_or_dim, dim, op_dtype) -> tuple[LinearOperator | None, int, np.dtype]:
    """``(operator or None, n, operator dtype)`` of :func:`estimate_memory`'s first argument."""
    if isinstance(op_or_dim, int | np.integer) and not isinstance(op_or_dim, bool):
        return None, int(op_or_dim), np.dtype(np.float32 if op_dtype is None else op_dtype)
    op = as_operator(op_or_dim, dim)
    return op, op.dim, np.dtype(op.dtype)


def _solver_arrays(
    n: int, vectors: int, b_item: int, *, k, num_steps, num_probes, num_matvecs, method
) -> _SolverArrays:
    """The basis rows, work vectors, host results and restart copy of the call the
    arguments describe (see :func:`estimate_memory`), with the options that shrink them."""

    def fewer(rows: int, saving: int, option: str) -> list[tuple[int, str]]:
        return [(saving, option)] if rows > MIN_BASIS_ROWS else []

    if k is not None:
        k = int(k)
        m = min(n, basis_rows(max(2 * k + 20, 3 * k))) if num_steps is None else int(num_steps)
        rows = basis_rows(m)
        basis = rows * n * b_item
        hints = fewer(m, basis, f"fewer num_steps (now {m}; basis rows {rows})")
        # a restart's copy of the basis; the returned eigenvectors (float64, host)
        return _SolverArrays("top_eigenpairs", rows, vectors + k * n * 8, basis, hints)
    if num_matvecs is not None and num_probes is None:
        sketch = 0 if method == "hutchinson" else min(int(num_matvecs) // 3, n)
        rows = basis_rows(max(sketch, 1))
        hints = fewer(sketch, rows * n * b_item // 2, f"fewer num_matvecs (now {num_matvecs})")
        return _SolverArrays("trace", rows, vectors, 0, hints)
    m = 90 if num_steps is None else int(num_steps)
    rows = basis_rows(m)
    hints = fewer(m, rows * n * b_item // 2, f"fewer num_steps (now {m})")
    if num_probes is not None:  # the probes run one after another on one basis
        return _SolverArrays("spectral_density", rows, vectors, 0, hints)
    # lanczos_tridiag also returns its basis (float64, host)
    return _SolverArrays("lanczos_tridiag", rows, vectors + m * n * 8, 0, hints)


def _on_devices(
    sizes: _Sizes, hints: list, *, ndev: int, platform: str, basis_memory: str
) -> _Sizes:
    """The sizes where the arrays live (appending options that lower them to ``hints``): a
    host-memory basis streams one block to an accelerator at a time; every CPU device keeps
    its copy of the solver's vectors in host RAM, while accelerators split the data and the
    HVP's activations."""
    if platform != "cpu":
        if basis_memory == "host":
            sizes = sizes._replace(
                basis=sizes.basis // NUM_BASIS_BLOCKS,
                workspace=sizes.workspace // NUM_BASIS_BLOCKS,
            )
        else:
            saving = sizes.basis - sizes.basis // NUM_BASIS_BLOCKS
            hints.append((saving, 'basis_memory="host" (the basis in host memory)'))
    if sizes.hvp > 0:
        hints.append(
            (
                sizes.hvp // 2,
                "a smaller batch_size for the operator (hs.hessian_operator(..., "
                "batch_size=...): the HVP working set grows with it)",
            )
        )
    if ndev == 1:
        return sizes
    if platform == "cpu":
        return sizes._replace(
            basis=sizes.basis * ndev,
            probes=sizes.probes * ndev,
            workspace=sizes.workspace * ndev,
        )
    return sizes._replace(operator=sizes.operator // ndev, hvp=sizes.hvp // ndev)


def check_call(check_memory: bool | float, op: LinearOperator, **kwargs: Any) -> None:
    """The memory check a solver makes at its start: nothing when ``check_memory`` is False,
    else :func:`check_fits` of :func:`estimate_memory` ``(op, **kwargs)`` against the memory
    available (``True``) or the given number of bytes."""
    if check_memory is False:
        return
    check_fits(
        estimate_memory(op, **kwargs),
        available=None if check_memory is True else float(check_memory),
        device=device_of(op),
    )


# ---------------------------------------------------------------------------------------
# what is available


def _host_available() -> int:
    """Host RAM available: ``MemAvailable`` of /proc/meminfo (else ``os.sysconf``), capped
    by a cgroup memory limit when one is set."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        avail = cgroup if avail is None else min(avail, cgroup)
    if avail is None:
        raise RuntimeError(
            "available_memory: cannot read the free host memory (no /proc/meminfo, no "
            "os.sysconf); pass available= explicitly, or check_memory=False."
        )
    return int(avail)


def _cgroup_headroom() -> int | None:
    pairs = (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),  # cgroup v1
    )
    for limit_path, usage_path in pairs:
        try:
            with open(limit_path) as fh:
                text = fh.read().strip()
            if text == "max":
                return None
            limit = int(text)
            if limit >= 2**60:  # "no limit" sentinel
                return None
            with open(usage_path) as fh:
                usage = int(fh.read().strip())
            return max(0, limit - usage)
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: Any = None) -> int:
    """Free memory in bytes for arrays on ``device`` (default: ``jax.devices()[0]``).

    Accelerators: ``bytes_limit - bytes_in_use`` of ``device.memory_stats()`` where the
    backend reports them. CPU (or no statistics): host RAM available (``MemAvailable`` of
    /proc/meminfo, falling back to ``os.sysconf``), capped by a cgroup limit if any. All
    CPU devices (also forced ones) share that host memory.
    """
    device = jax.devices()[0] if device is None else device
    if getattr(device, "platform", "cpu") != "cpu":
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - backends without statistics
            stats = None
        if stats and "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return _host_available()


def check_fits(
    estimate: MemoryEstimate, available: float | None = None, device: Any = None
) -> MemoryEstimate:
    """Raise ``MemoryError`` if ``estimate.total`` exceeds the available memory.

    Args:
        estimate: from :func:`estimate_memory`.
        available: bytes available; None asks :func:`available_memory` of ``device``.
        device: the device the run uses (default: ``jax.devices()[0]``).

    Returns:
        ``estimate`` (when it fits).

    Raises:
        MemoryError: saying how much the run needs (by component), how much is available,
            and which options lower the estimate.
    """
    where = "given" if available is not None else _device_name(device)
    available = available_memory(device) if available is None else float(available)
    if estimate.total <= available:
        return estimate
    options = "; ".join(estimate.hints) if estimate.hints else "a smaller problem"
    raise MemoryError(
        f"{estimate.solver}: this run needs about {estimate.summary()}, but only "
        f"{format_bytes(available)} is available ({where}). Nothing was started. Lower the "
        f"memory with: {options}. Or pass check_memory=False to run anyway (the estimate "
        "of the HVP working set is approximate)."
    )


def _device_name(device: Any) -> str:
    device = jax.devices()[0] if device is None else device
    if getattr(device, "platform", "cpu") == "cpu":
        return "host RAM"
    return f"on {device}"


def summarize(
    estimates: MemoryEstimate | list[MemoryEstimate] | tuple[MemoryEstimate, ...],
    available: float | None = None,
    device: Any = None,
) -> str:
    """One line for a command-line tool, before a run starts.

    The solver calls of a run happen one after another, so the run needs the largest of
    their estimates.

    Args:
        estimates: one :class:`MemoryEstimate` or several (e.g. for top_eigenpairs,
            spectral_density and trace on the same operator).
        available: bytes available; None asks :func:`available_memory` of ``device``.
        device: the device (default ``jax.devices()[0]``).

    Returns:
        e.g. ``"this run needs about 3.1 GiB (peak in spectral_density: basis ..., ...);
        about 20.5 GiB available"``.
    """
    if isinstance(estimates, MemoryEstimate):
        estimates = [estimates]
    peak = max(estimates, key=lambda e: e.total)
    available = available_memory(device) if available is None else float(available)
    parts = peak.summary().split(" (", 1)
    detail = parts[1][:-1] if len(parts) == 2 else ""
    return (
        f"this run needs about {parts[0]} (peak in {peak.solver}: {detail}); about "
        f"{format_bytes(available)} available"
    )
