"""The memory preflight of a BatchNorm spectrum study: before training, what its analysis
will need against what there is, and the config changes that lower the need.

:func:`memory_preflight` builds, for every network and every distinct analysed graph, the
Hessian operator the analysis will use (from the untrained network, which has the shapes of
every checkpoint) and asks :func:`hessspec.linalg.memory.estimate_memory` what each solver
call needs; nothing is compiled or run. The run needs the largest of these (the calls run
one after another); :class:`MemoryPreflight` says whether it fits and, if not, why and what
to change.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from hessspec.studies.batchnorm_spectrum.config import Config
from hessspec.studies.batchnorm_spectrum.setup import Network, StudySetup, analysis_settings

if TYPE_CHECKING:
    from hessspec.linalg.memory import MemoryEstimate
    from hessspec.studies.batchnorm_spectrum.settings import StudySettings

__all__ = ["MemoryPreflight", "memory_options", "memory_preflight"]


@dataclasses.dataclass(frozen=True)
class MemoryPreflight:
    """What the analysis of a study will need, against what there is, before training.

    Attributes:
        estimates: ``(label, estimate)`` of every solver call kind of every analysed graph
            (label e.g. ``"mlp-bn, BN train mode"``), from
            :meth:`hessspec.studies.batchnorm_spectrum.analyzer.CheckpointAnalyzer.memory_estimates`.
        label: the network/mode of the largest estimate.
        peak: the largest estimate (the solver calls run one after another, so the run
            needs the largest of them).
        needed: bytes needed: ``peak.total`` (in a multi-process run the largest over the
            processes).
        available: bytes available: ``analysis.memory_limit_gib`` when set, else the free
            memory of this process's first device (host RAM on CPU; in a multi-process run
            the smallest over the processes).
        source: where ``available`` comes from (``"host RAM"``, ``"free on cuda:0"``,
            ``"analysis.memory_limit_gib = 0.5"``).
        options: config changes that lower ``needed``, largest saving first.
    """

    estimates: list[tuple[str, MemoryEstimate]]
    label: str
    peak: MemoryEstimate
    needed: int
    available: int
    source: str
    options: tuple[str, ...]

    @property
    def fits(self) -> bool:
        """Whether the largest solver call fits in the available memory."""
        return self.needed <= self.available

    def line(self) -> str:
        """One line for the terminal: need (by component), largest call, availability."""
        from hessspec.linalg.memory import summarize

        text = summarize([self.peak], available=self.available)
        return f"hessspec: memory ({self.label}): {text} ({self.source})"

    def refusal(self) -> str:
        """The error message of a run that does not fit: what it needs, what is available,
        and the config options that lower the need."""
        from hessspec.linalg.memory import format_bytes

        options = "; ".join(self.options) if self.options else "a smaller model or data"
        if self.source.startswith("analysis.memory_limit_gib"):
            more = "or raise the budget with --memory-limit GIB (0: all available memory)"
        else:
            more = "or run where more memory is free"
        return (
            f"not enough memory for the analysis: {self.peak.solver} on {self.label} needs "
            f"about {format_bytes(self.needed)} ({self.peak.summary().split(' (', 1)[1]}, "
            f"but only {format_bytes(self.available)} is available ({self.source}). Nothing "
            f"was trained. Lower the need with: {options}; {more}."
        )


def memory_options(
    peak: MemoryEstimate,
    settings: StudySettings,
    config: Config,
    analysis_size: int,
    num_params: int,
) -> list[str]:
    """Config changes (as ``--set`` options) that lower ``peak``, largest saving first.

    Savings are rough: the basis halves with float32, and shrinks with the number of steps
    above the smallest basis (128 rows); the HVP working set shrinks with the chunk size;
    the operator's data with the analysis set.
    """
    import jax

    from hessspec.linalg.krylov import MIN_BASIS_ROWS, basis_rows
    from hessspec.linalg.linop import basis_dtype as resolve_basis_dtype

    s = settings
    options: list[tuple[int, str]] = []
    basis_bytes = int(peak.basis)
    if basis_bytes and resolve_basis_dtype(config.model.dtype, s.basis_dtype).itemsize > 4:
        options.append(
            (basis_bytes // 2, "--set analysis.basis_dtype=float32 (halves the Krylov bases)")
        )
    if basis_bytes and s.basis_memory == "device" and jax.default_backend() != "cpu":
        options.append(
            (
                basis_bytes * 7 // 8,
                "--set analysis.basis_memory=host (the Krylov bases in host memory)",
            )
        )
    # the basis has basis_rows(m) >= 128 rows: fewer steps help only above that
    if peak.solver == "top_eigenpairs":
        m = s.lanczos_steps or min(num_params, basis_rows(max(2 * s.top_k + 20, 3 * s.top_k)))
        if m > MIN_BASIS_ROWS:
            options.append(
                (
                    basis_bytes // 2,
                    f"fewer Lanczos steps, --set analysis.lanczos_steps=N with {s.top_k} < N <= "
                    f"{MIN_BASIS_ROWS} (the basis has at least {MIN_BASIS_ROWS} rows)",
                )
            )
    elif peak.solver == "spectral_density" and s.slq_steps > MIN_BASIS_ROWS:
        options.append(
            (
                basis_bytes // 2,
                f"fewer SLQ steps, --set analysis.slq_steps=N with N <= {MIN_BASIS_ROWS}",
            )
        )
    elif peak.solver == "trace" and s.trace_matvecs // 3 > MIN_BASIS_ROWS:
        options.append(
            (
                basis_bytes // 2,
                "fewer trace matvecs, --set analysis.trace_matvecs=N with N <= "
                f"{3 * MIN_BASIS_ROWS} (Hutch++ keeps N/3 vectors)",
            )
        )
    chunk = s.chunk_size or analysis_size
    if peak.hvp and chunk > s.hvp_batch_size:
        options.append(
            (
                int(peak.hvp) // 2,
                f"--set analysis.chunk_size=N with N < {chunk} (examples per Hessian-vector "
                "product; the HVP working set grows with it)",
            )
        )
    if peak.operator:
        options.append(
            (
                int(peak.operator) // 2,
                f"--set analysis.size=N with N < {analysis_size} (fewer analysis examples)",
            )
        )
    return [text for saving, text in sorted(options, key=lambda o: -o[0]) if saving > 0]


#: Label suffix of each analysed graph in memory messages, by the BN mode that builds it.
_GRAPH_LABELS = {None: "", "train": ", BN train mode", "eval": ", BN eval/population mode"}


def memory_preflight(setup: StudySetup, *, multi_process: bool = False) -> MemoryPreflight:
    """Estimate the memory of the analysis before training and compare it with what is
    available.

    For every network and every distinct analysed graph (no BN; BN train mode; BN eval and
    population mode, which share one), the Hessian operator over the analysis set (chunks
    of ``analysis.chunk_size``) is built from the untrained network, which has the shapes
    of every checkpoint, and
    :meth:`~hessspec.studies.batchnorm_spectrum.analyzer.CheckpointAnalyzer.memory_estimates`
    gives the estimates of ``top_eigenpairs``, ``spectral_density`` and ``trace`` with the
    config's sizes and ``analysis.basis_dtype``. Nothing is compiled or run.

    Args:
        setup: from :func:`prepare_study` (call after enabling x64, as the run will: the
            solver dtype depends on it).
        multi_process: take the largest need and the smallest availability over all
            processes (a collective: every process must call this), so that they all
            decide alike.

    Returns:
        :class:`MemoryPreflight`; ``fits`` says whether the run may start.
    """
    import jax

    from hessspec.curvature import distributed
    from hessspec.linalg.memory import available_memory
    from hessspec.nn.objective import make_objective
    from hessspec.studies.batchnorm_spectrum.analyzer import CheckpointAnalyzer

    config = setup.config
    tr, te, an = setup.train_set, setup.test_set, setup.analysis_set
    settings = analysis_settings(setup)
    estimates: list[tuple[str, MemoryEstimate]] = []
    network_of: dict[str, Network] = {}
    for net in setup.networks:
        graphs = {"train" if m == "train" else ("eval" if m else None) for m in net.modes}
        for mode in sorted(graphs, key=str):
            obj = make_objective(net.model, config.model.loss, bn_mode=mode)
            analyzer = CheckpointAnalyzer(obj, an, tr, te, tr.num_classes, settings[net.name])
            label = net.name + _GRAPH_LABELS[mode]
            network_of[label] = net
            estimates.extend((label, e) for e in analyzer.memory_estimates(obj))
    label, peak = max(estimates, key=lambda item: item[1].total)
    limit = config.analysis.memory_limit_gib
    if limit:
        available = int(limit * 2**30)
        source = f"analysis.memory_limit_gib = {limit:g}"
    else:
        device = jax.local_devices()[0]
        available = available_memory(device)
        source = "host RAM" if device.platform == "cpu" else f"free on {device}"
    needed = int(peak.total)
    if multi_process:
        rows = distributed.gather([needed, available])
        needed = int(rows[:, 0].max())
        if not limit:
            available = int(rows[:, 1].min())
            source += f", the least of {rows.shape[0]} processes"
    net = network_of[label]
    options = memory_options(peak, settings[net.name], config, an.num_examples, net.num_params)
    return MemoryPreflight(
        estimates=estimates,
        label=label,
        peak=peak,
        needed=needed,
        available=int(available),
        source=source,
        options=tuple(options),
    )
