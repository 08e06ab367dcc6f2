"""Parameters trained elsewhere: :func:`load_params` reads a parameter pytree (``.npz`` or
an orbax folder) into a model built from a config, for
``python -m hessspec.run analyze --params FILE --config CFG``; :func:`save_params` writes
that ``.npz`` format.

The ``.npz`` holds one array per state leaf of the model, named by its path
(``"head/kernel"``, ``"linears/0/kernel"``, ``"norms/0/scale"``; BatchNorm running averages
``"norms/0/mean"``, ``"norms/0/var"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hessspec.studies.common.checkpoint import (
    CheckpointError,
    is_prng_key,
    orbax_checkpointer,
    quiet_orbax_logs,
    read_meta,
    to_numpy,
)

if TYPE_CHECKING:
    from flax import nnx

__all__ = ["load_params", "save_params"]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a/b/0/c": leaf}``."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): tree}


def save_params(path: str | Path, model: nnx.Module) -> Path:
    """Write a model's parameters and other state (BatchNorm running averages) as ``.npz``,
    one array per leaf named by its path (``"head/kernel"``, ``"norms/0/mean"``): the
    format :func:`load_params` (and ``analyze --params``) reads.

    Returns:
        The path written (``.npz`` added when missing).
    """
    import io

    from flax import nnx

    from hessspec.studies.common.runfolder import atomic_write_bytes

    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays = _flatten(to_numpy(nnx.to_pure_dict(nnx.state(model))))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _read_params_file(path: Path) -> dict[str, np.ndarray]:
    """``{"a/b": array}`` from an ``.npz`` file or an orbax folder (a hessspec checkpoint:
    its params and rest; else the pytree saved there)."""
    if path.is_dir():
        import orbax.checkpoint as ocp

        quiet_orbax_logs()
        if read_meta(path) is not None:
            try:
                state = orbax_checkpointer().restore(path)["state"]
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read the checkpoint: {e}") from None
            flat = _flatten({"": state["params"]})
            flat.update(_flatten({"": state["rest"]}))
            return {k.lstrip("/"): np.asarray(v) for k, v in flat.items()}
        errors = []
        for handler in (ocp.StandardCheckpointHandler, ocp.PyTreeCheckpointHandler):
            try:
                tree = ocp.Checkpointer(handler()).restore(path)
                break
            except Exception as e:  # noqa: BLE001 - try the next format
                errors.append(f"{type(e).__name__}: {e}")
        else:
            raise CheckpointError(
                f"{path}: not an orbax checkpoint of a parameter pytree ({errors[-1]})."
            )
        if not isinstance(tree, Mapping):
            raise CheckpointError(f"{path}: expected a nested dict of arrays, got {type(tree)}.")
        return {k: np.asarray(v) for k, v in _flatten(tree).items()}
    if path.suffix != ".npz":
        raise CheckpointError(
            f"{path}: a parameter file must be an .npz file or an orbax checkpoint folder."
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({e}).") from None


def load_params(path: str | Path, model: nnx.Module, *, need_statistics: bool = False) -> bool:
    """Load a parameter pytree trained elsewhere into ``model`` (in place).

    The file is an ``.npz`` whose array names are the paths of the model's state leaves
    (``"head/kernel"``, ``"linears/0/kernel"``, ``"norms/0/scale"``; BatchNorm running
    averages ``"norms/0/mean"``, ``"norms/0/var"`` are optional), as :func:`save_params`
    writes it, or an orbax folder holding such a nested dict (or a hessspec checkpoint).
    Names may carry a ``params/`` prefix and the statistics a ``rest/`` or
    ``batch_stats/`` prefix. Every parameter of the model must be present with its shape;
    values are cast to the model's dtype.

    Args:
        path: the file or folder.
        model: the network built from the config
            (:func:`hessspec.studies.common.checkpoint.build_model`).
        need_statistics: refuse a file without BatchNorm running averages (an eval-mode
            analysis needs them).

    Returns:
        Whether the file held the BatchNorm running averages (else the model keeps its
        initial ones).

    Raises:
        CheckpointError: unreadable file, missing or unknown names, wrong shapes; the
            message names them.
    """
    from flax import nnx

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"parameter file {path} does not exist.")
    stored = _read_params_file(path)
    for prefix in ("params/", "rest/", "batch_stats/"):
        stored = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in stored.items()}
    params = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    others = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))
    others = {k: v for k, v in others.items() if not is_prng_key(v)}
    missing = sorted(set(params) - set(stored))
    if missing:
        shown = ", ".join(missing[:4]) + (
            f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        )
        raise CheckpointError(
            f"{path} lacks parameters of the model: {shown} (it holds "
            f"{', '.join(sorted(stored)[:6]) or 'nothing'}). Build the model the file was "
            "trained with (model.* in --config), or name the arrays by their paths."
        )
    unknown = sorted(set(stored) - set(params) - set(others))
    if unknown:
        raise CheckpointError(
            f"{path} holds arrays the model does not have: {', '.join(unknown[:4])}; check "
            "model.* in --config."
        )
    with_stats = bool(others) and all(k in stored for k in others)
    if need_statistics and others and not with_stats:
        raise CheckpointError(
            f"{path} holds no BatchNorm running averages ({', '.join(sorted(others)[:2])}, ...),"
            " which eval mode needs; analyse in train or population mode "
            "(--set analysis.bn_modes=train,population)."
        )
    for name, like in [*params.items(), *(others.items() if with_stats else [])]:
        value = np.asarray(stored[name])
        if value.shape != tuple(np.shape(like)):
            raise CheckpointError(
                f"{path}: {name!r} has shape {value.shape}; the model needs {np.shape(like)}."
            )
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"{path}: {name!r} holds non-finite values.")

    def rebuild(template):
        flat = _flatten(template)
        values = {k: np.asarray(stored[k], dtype=np.asarray(v).dtype) for k, v in flat.items()}

        def fill(tree, prefix=""):
            if isinstance(tree, Mapping):
                return {k: fill(v, f"{prefix}{k}/") for k, v in tree.items()}
            return values[prefix.rstrip("/")]

        return fill(template)

    nnx.update(model, rebuild(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    if with_stats:
        state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        nnx.update(model, rebuild(_select(state, others)))
    return with_stats


def _select(tree: Any, keep: Mapping[str, Any], prefix: str = "") -> Any:
    """The sub-dict of ``tree`` whose flattened leaf paths are in ``keep``."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            sub = _select(v, keep, name + "/")
            if sub:
                out[k] = sub
        elif name in keep:
            out[k] = v
    return out
