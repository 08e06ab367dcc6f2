"""Checkpoints on disk: a network's training state at a step, written with orbax-checkpoint.

A run folder keeps one orbax checkpoint per network and saved step::

    <run>/checkpoints/<step>/<network>/      e.g. checkpoints/250/mlp-bn/
        state/   params, rest (BatchNorm running averages and other non-parameter state),
                 opt_state (the optax state), loss_curve (the mini-batch loss of steps 1..step)
        meta/    JSON: format, step, network, batchnorm, kind, the run's whole config,
                 input_shape, num_classes, data_order (the batch order's position),
                 train_seconds, hessspec_version

``kind`` is ``"checkpoint"`` for an analysis step (saved before its analysis), ``"final"``
for the last step when it is not an analysis step, and ``"interrupt"`` for the step an
interrupted training had reached (a resume point; removed once a later state of the
network is saved). orbax writes each checkpoint into a temporary folder and renames it when
complete, so a checkpoint folder either holds a whole state or does not exist.

:func:`load_checkpoint` reads one back (``hs.load_checkpoint``), with the config that
rebuilds its model (:meth:`Checkpoint.model`). Parameters trained elsewhere are read by
:mod:`hessspec.studies.common.params_file`.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flax import nnx

    from hessspec.nn.train import TrainingState
    from hessspec.studies.batchnorm_spectrum.config import Config

__all__ = [
    "CHECKPOINTS_DIR",
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "build_model",
    "checkpoint_path",
    "is_prng_key",
    "load_checkpoint",
    "orbax_checkpointer",
    "quiet_orbax_logs",
    "read_meta",
    "restore_state",
    "save_checkpoint",
    "saved_checkpoints",
    "to_numpy",
]

FORMAT = "hessspec-checkpoint-1"
CHECKPOINTS_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint or parameter file that cannot be read or does not fit the model; the
    message names the file and what is wrong."""


def build_model(
    config: Config, *, input_shape: tuple[int, ...], num_classes: int, batchnorm: bool
) -> nnx.Module:
    """The network a study config describes (``model.*``, ``seed``), for inputs of
    ``input_shape`` (one example) and ``num_classes`` outputs, with or without BatchNorm.

    Raises:
        ValueError: a model that cannot take these inputs (see
            :func:`hessspec.nn.models.make_model`).
    """
    from hessspec.nn.models import make_model

    m = config.model
    if m.name == "mlp":
        kwargs = {"hidden": m.hidden, "activation": m.activation, "bn_momentum": m.bn_momentum}
    elif m.name == "cnn":
        kwargs = {"channels": m.channels, "bn_momentum": m.bn_momentum}
    elif m.name == "resnet":
        kwargs = {
            "widths": m.widths,
            "blocks_per_stage": m.blocks_per_stage,
            "bn_momentum": m.bn_momentum,
        }
    else:
        kwargs = {}
    return make_model(
        m.name,
        tuple(input_shape),
        num_classes,
        batchnorm,
        seed=config.seed,
        dtype=np.dtype(m.dtype),
        **kwargs,
    )


def checkpoint_path(run_dir: str | Path, step: int, network: str) -> Path:
    """``<run_dir>/checkpoints/<step>/<network>``."""
    return Path(run_dir) / CHECKPOINTS_DIR / str(int(step)) / network


# -- pytrees as numpy -----------------------------------------------------------------------


def is_prng_key(leaf: Any) -> bool:
    """Whether ``leaf`` is an array of typed PRNG keys."""
    import jax

    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def to_numpy(tree: Any) -> Any:
    """Every leaf as a numpy array (typed PRNG keys as their raw key data)."""
    import jax

    def one(leaf):
        if is_prng_key(leaf):
            return np.asarray(jax.random.key_data(leaf))
        return np.asarray(leaf)

    return jax.tree_util.tree_map(one, tree)


def _like(restored: Any, template: Any) -> Any:
    """``restored`` (numpy) with the key leaves of ``template`` wrapped back into keys."""
    import jax

    def one(value, like):
        if is_prng_key(like):
            return jax.random.wrap_key_data(np.asarray(value), impl=jax.random.key_impl(like))
        return np.asarray(value)

    return jax.tree_util.tree_map(one, restored, template)


def orbax_checkpointer():
    """The orbax checkpointer of hessspec checkpoints (``state`` and ``meta`` items)."""
    import orbax.checkpoint as ocp

    # process 0 alone writes (a multi-process run trains the same replicated state everywhere)
    options = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(), multiprocessing_options=options)


def quiet_orbax_logs() -> None:
    """Only warnings and errors from orbax and absl."""
    import logging

    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)


# -- saving -----------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    state: TrainingState,
    *,
    network: str,
    batchnorm: bool,
    kind: str,
    config: Config,
    input_shape: tuple[int, ...],
    num_classes: int,
) -> Path:
    """Write ``state`` as an orbax checkpoint at ``path`` (replacing one already there).

    Args:
        path: the checkpoint folder (:func:`checkpoint_path`).
        state: from :func:`hessspec.nn.train.train`'s ``on_save``.
        network: the network's name (``"mlp"``, ``"mlp-bn"``).
        batchnorm: whether it has BatchNorm layers.
        kind: ``"checkpoint"``, ``"final"`` or ``"interrupt"``.
        config: the run's config (stored: it rebuilds the model).
        input_shape: shape of one input of the model.
        num_classes: number of classes (outputs).

    Returns:
        ``path``.

    Raises:
        hessspec.studies.common.runfolder.OutputWriteError: the write failed (a full disk
            says so); no folder is left at ``path``.
    """
    import orbax.checkpoint as ocp

    import hessspec
    from hessspec.studies.batchnorm_spectrum.config import config_to_dict
    from hessspec.studies.common.runfolder import OutputWriteError, _write_error

    quiet_orbax_logs()
    path = Path(path).absolute()
    tree = {
        "params": to_numpy(state.params),
        "rest": to_numpy(state.rest),
        "opt_state": to_numpy(state.opt_state),
    }
    if state.step:  # orbax refuses empty arrays: no curve at step 0
        tree["loss_curve"] = np.asarray(state.losses, dtype=np.float64)
    meta = {
        "format": FORMAT,
        "step": int(state.step),
        "network": network,
        "batchnorm": bool(batchnorm),
        "kind": kind,
        "config": config_to_dict(config),
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
        "data_order": state.data_order,
        "train_seconds": float(state.seconds),
        "hessspec_version": hessspec.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    try:
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        orbax_checkpointer().save(
            path,
            ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
        )
    except KeyboardInterrupt:
        shutil.rmtree(path, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(path, ignore_errors=True)
        raise _write_error(path, e) from e
    if not path.is_dir():  # pragma: no cover - orbax reported success but wrote nothing
        raise OutputWriteError(5, f"could not write the checkpoint {path}")
    return path


# -- reading ----------------------------------------------------------------------------------


def read_meta(path: Path) -> dict[str, Any] | None:
    """The ``meta`` item of a hessspec checkpoint folder, or None if it is not one."""
    import json

    for name in ("meta/metadata", "meta"):
        file = path / name
        if file.is_file():
            try:
                meta = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None
    return None


def saved_checkpoints(run_dir: str | Path) -> dict[str, dict[int, dict[str, Any]]]:
    """The complete checkpoints of a run folder: ``{network: {step: meta}}`` (orbax's
    unfinished temporary folders are not listed)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found: dict[str, dict[int, dict[str, Any]]] = {}
    if not root.is_dir():
        return found
    for step_dir in root.iterdir():
        if not step_dir.is_dir() or not step_dir.name.isdigit():
            continue
        for net_dir in step_dir.iterdir():
            meta = read_meta(net_dir) if net_dir.is_dir() else None
            if meta is not None and meta.get("step") == int(step_dir.name):
                found.setdefault(net_dir.name, {})[int(step_dir.name)] = meta
    return found


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A network's saved training state (:func:`load_checkpoint`).

    Attributes:
        path: the checkpoint folder.
        step: updates applied (0: at initialization).
        network: the network's name in its run (``"mlp"``, ``"mlp-bn"``).
        batchnorm: whether it has BatchNorm layers.
        kind: ``"checkpoint"`` (an analysis step), ``"final"`` or ``"interrupt"``.
        params: the ``nnx.Param`` state, a pure dict of numpy arrays (``nnx.to_pure_dict``).
        batch_stats: the other model state (BatchNorm running averages), a pure dict.
        opt_state: the optax state (the structure of
            ``make_optimizer(config.train).init(params)``).
        data_order: the batch order's position (:meth:`hessspec.nn.train.BatchOrder.state`).
        loss_curve: ``(step,)`` mini-batch loss of every step so far.
        train_seconds: training wall time up to this step.
        config: the run's :class:`~hessspec.studies.batchnorm_spectrum.config.Config`.
        input_shape: shape of one input.
        num_classes: number of classes (model outputs).
    """

    path: Path
    step: int
    network: str
    batchnorm: bool
    kind: str
    params: Any
    batch_stats: Any
    opt_state: Any
    data_order: dict[str, Any]
    loss_curve: np.ndarray
    train_seconds: float
    config: Config
    input_shape: tuple[int, ...]
    num_classes: int

    def model(self) -> nnx.Module:
        """The network (flax.nnx) holding this checkpoint's parameters and statistics."""
        from flax import nnx

        model = build_model(
            self.config,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            batchnorm=self.batchnorm,
        )
        nnx.update(model, self.params)
        nnx.update(model, self.batch_stats)
        return model

    def training_state(self) -> TrainingState:
        """The state :func:`hessspec.nn.train.train` resumes from (``resume_from=``)."""
        from hessspec.nn.train import TrainingState

        return TrainingState(
            step=self.step,
            params=self.params,
            rest=self.batch_stats,
            opt_state=self.opt_state,
            data_order=self.data_order,
            losses=self.loss_curve,
            seconds=self.train_seconds,
        )


def _resolve(path: Path, network: str | None, step: int | None) -> Path:
    """The checkpoint folder meant by a run folder, a step folder or a checkpoint folder."""
    if read_meta(path) is not None:
        return path
    if (path / CHECKPOINTS_DIR).is_dir() or (path / "results.json").is_file():
        found = saved_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path} holds no saved checkpoints (no {CHECKPOINTS_DIR}/).")
        if network is None:
            if len(found) > 1:
                raise CheckpointError(
                    f"{path} holds checkpoints of several networks ({', '.join(sorted(found))});"
                    " choose one with network=."
                )
            network = next(iter(found))
        if network not in found:
            raise CheckpointError(
                f"{path} holds no checkpoint of {network!r}; it has {', '.join(sorted(found))}."
            )
        steps = found[network]
        chosen = max(steps) if step is None else int(step)
        if chosen not in steps:
            raise CheckpointError(
                f"{path} holds no checkpoint of {network!r} at step {chosen}; saved steps: "
                f"{sorted(steps)}."
            )
        return checkpoint_path(path, chosen, network)
    if path.is_dir() and path.name.isdigit():
        nets = sorted(p.name for p in path.iterdir() if read_meta(p) is not None)
        if network is None and len(nets) == 1:
            network = nets[0]
        if network is None or network not in nets:
            raise CheckpointError(
                f"{path} holds checkpoints of {', '.join(nets) or 'no network'}; choose one "
                "with network=."
            )
        return path / network
    raise CheckpointError(
        f"{path} is not a hessspec checkpoint (no meta/ with format {FORMAT!r}), step folder or "
        "run folder."
    )


def restore_state(path: str | Path, template: Any) -> Any:
    """The ``state`` item of the checkpoint at ``path``, in the structure of ``template``
    (a pytree shaped like what was saved: ``params``, ``rest``, ``opt_state`` and, after
    step 0, ``loss_curve``); numpy leaves, PRNG keys where ``template`` has keys.

    Raises:
        CheckpointError: the state cannot be read or does not have that structure.
    """
    import orbax.checkpoint as ocp

    quiet_orbax_logs()
    try:
        restored = orbax_checkpointer().restore(
            Path(path).absolute(),
            ocp.args.Composite(state=ocp.args.StandardRestore(to_numpy(template))),
        )["state"]
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the saved state: {e}") from None
    return _like(restored, template)


def load_checkpoint(
    path: str | Path, *, network: str | None = None, step: int | None = None
) -> Checkpoint:
    """A saved training state with the config that rebuilds its model.

    Args:
        path: a checkpoint folder (``<run>/checkpoints/<step>/<network>``), a step folder
            (``<run>/checkpoints/<step>``) or a run folder.
        network: which network, when the folder holds several (``"mlp"``, ``"mlp-bn"``).
        step: which step, for a run folder (default: the latest saved).

    Returns:
        :class:`Checkpoint` (numpy arrays; :meth:`Checkpoint.model` builds the network).

    Raises:
        CheckpointError: no such checkpoint, or one that cannot be read; the message says
            what the folder holds.
    """
    from flax import nnx

    from hessspec.nn.train import make_optimizer
    from hessspec.studies.batchnorm_spectrum.config import ConfigError, config_from_dict

    quiet_orbax_logs()
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    path = _resolve(path, network, step)
    meta = read_meta(path)
    try:
        config = config_from_dict(meta["config"])
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{path}: its stored config is not valid: {e}") from None
    shape = tuple(int(s) for s in meta["input_shape"])
    model = build_model(
        config, input_shape=shape, num_classes=meta["num_classes"], batchnorm=meta["batchnorm"]
    )
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    template = {
        "params": params,
        "rest": rest,
        "opt_state": make_optimizer(config.train).init(params),
    }
    if int(meta["step"]):
        template["loss_curve"] = np.zeros(int(meta["step"]))
    restored = restore_state(path, template)
    return Checkpoint(
        path=path,
        step=int(meta["step"]),
        network=str(meta["network"]),
        batchnorm=bool(meta["batchnorm"]),
        kind=str(meta.get("kind", "checkpoint")),
        params=restored["params"],
        batch_stats=restored["rest"],
        opt_state=restored["opt_state"],
        data_order=meta["data_order"],
        loss_curve=np.asarray(restored.get("loss_curve", np.zeros(0)), dtype=np.float64),
        train_seconds=float(meta.get("train_seconds", 0.0)),
        config=config,
        input_shape=shape,
        num_classes=int(meta["num_classes"]),
    )
