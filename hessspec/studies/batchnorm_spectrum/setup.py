"""Everything a BatchNorm spectrum study needs before training, checked: the data splits,
the fixed analysis set, and the networks (one per entry of ``model.batchnorm``).

:func:`prepare_study` raises :class:`~hessspec.studies.batchnorm_spectrum.errors.SetupError`
with one line naming the config key for every problem it can see before training (missing
data folder, sizes the data cannot provide, a loss the targets do not allow, a model that
does not fit the inputs or the classes).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from hessspec.studies.batchnorm_spectrum.config import Config, checkpoint_steps
from hessspec.studies.batchnorm_spectrum.errors import SetupError

if TYPE_CHECKING:
    from hessspec.studies.batchnorm_spectrum.settings import StudySettings

__all__ = [
    "Network",
    "SetupError",
    "StudySetup",
    "analysis_settings",
    "enable_x64",
    "prepare_study",
    "run_name",
]


@dataclasses.dataclass
class Network:
    """One network to train, and the runs (BatchNorm modes) it is analysed in.

    Attributes:
        name: base name (``"mlp"`` or ``"mlp-bn"``).
        model: the flax.nnx model (trained in place).
        batchnorm: whether it has BatchNorm layers.
        modes: the BN modes analysed (``[None]`` without BN).
        num_params: number of trainable scalars.
    """

    name: str
    model: Any
    batchnorm: bool
    modes: list[str | None]
    num_params: int


@dataclasses.dataclass
class StudySetup:
    """Everything a study needs, checked before training: the data splits, the fixed
    analysis set, the networks and the analysis steps."""

    config: Config
    train_set: Any
    test_set: Any
    analysis_set: Any
    networks: list[Network]
    checkpoints: list[int]


def run_name(network: Network, mode: str | None) -> str:
    """The name of the run of ``network`` in BN ``mode`` (``"mlp"``, ``"mlp-bn-train"``)."""
    return network.name if mode is None else f"{network.name}-{mode}"


def enable_x64(config: Config) -> None:
    """Turn on ``jax_enable_x64`` when ``config.x64`` asks for it (the study's own setting:
    Lanczos in float64, the model in ``model.dtype``). Call before :func:`prepare_study`."""
    if config.x64:
        import jax

        jax.config.update("jax_enable_x64", True)


def _load_data(config: Config):
    """``(train_set, test_set)`` of ``config.data``, subsets drawn."""
    import numpy as np

    from hessspec.nn import data as hdata

    d = config.data
    dtype = np.dtype(config.model.dtype)
    if d.name == "digits":
        kwargs = {
            "test_fraction": d.test_fraction,
            "seed": d.split_seed,
            "preprocessing": d.preprocessing,
        }
        path = None
    else:
        kwargs = {"standardize": d.standardize}
        path = d.path or None
    try:
        train_set, test_set = hdata.load_train_test(d.name, path, dtype=dtype, **kwargs)
    except FileNotFoundError as e:
        raise SetupError(
            f"data: {e} Set the folder with --set data.path=FOLDER (config key data.path)."
        ) from None
    except (ValueError, OSError) as e:
        raise SetupError(f"data: {e}") from None
    if d.train_size:
        train_set = _subset(train_set, d.train_size, "data.train_size", "training", config)
    if d.test_size:
        test_set = _subset(test_set, d.test_size, "data.test_size", "test", config)
    return train_set, test_set


def _subset(dataset, size: int, key: str, what: str, config: Config):
    """A stratified subset of ``size`` examples, or a SetupError naming ``key``."""
    from hessspec.nn import data as hdata

    if size > dataset.num_examples:
        raise SetupError(
            f"{key}={size} exceeds the {dataset.num_examples} {what} examples of "
            f"{config.data.name}."
        )
    classes = dataset.num_classes if dataset.is_classification else 0
    if classes and size < classes:
        raise SetupError(
            f"{key}={size} is smaller than the {classes} classes of {config.data.name}: a "
            f"stratified subset needs one example of each class; set {key} to at least "
            f"{classes} (or 0 for all {dataset.num_examples})."
        )
    try:
        return hdata.subsample(dataset, size, seed=config.seed, stratify=dataset.is_classification)
    except ValueError as e:
        raise SetupError(f"{key}={size}: {e}") from None


def _analysis_set(config: Config, train_set):
    """The fixed analysis set (a subset of the training set), after checking the sizes of
    ``config.train`` and ``config.analysis`` against the training set."""
    n = train_set.num_examples
    t, a = config.train, config.analysis
    if config.model.loss == "cross_entropy" and not train_set.is_classification:
        raise SetupError(
            f"model.loss='cross_entropy' needs class labels; {train_set.name} has none."
        )
    if t.batch_size > n:
        raise SetupError(f"train.batch_size={t.batch_size} exceeds the {n} training examples.")
    if a.size > n:
        raise SetupError(f"analysis.size={a.size} exceeds the {n} training examples.")
    mb = a.minibatch_size or t.batch_size
    if a.size and a.size < n:
        analysis_set = _subset(train_set, a.size, "analysis.size", "training", config)
    else:
        analysis_set = train_set
    if mb > n:
        raise SetupError(f"analysis.minibatch_size={mb} exceeds the {n} training examples.")
    _check_top_k(config, train_set.num_classes)
    return analysis_set


def _check_top_k(config: Config, num_classes: int) -> None:
    """The headline ratio ``lambda_1 / lambda_{K+1}`` needs the top ``K + 1`` eigenvalues."""
    k = max(int(num_classes), 1)
    top_k = config.analysis.top_k
    if top_k and top_k < k + 1:
        raise SetupError(
            f"analysis.top_k={top_k} is below K + 1 = {k + 1} (K = {k} classes of "
            f"{config.data.name}): the headline ratio λ1/λ(K+1) needs the top K + 1 "
            f"eigenvalues; set analysis.top_k to at least {k + 1}, or 0 for 2K = {2 * k}."
        )


def _network(config: Config, train_set, *, batchnorm: bool) -> Network:
    """The network of ``config`` with or without BN, checked to map the training inputs
    to one output per class."""
    import jax
    import numpy as np

    from hessspec.nn.models import count_params
    from hessspec.nn.objective import make_objective
    from hessspec.studies.common.checkpoint import build_model

    num_classes = train_set.num_classes
    probe = np.asarray(train_set.x[:2])
    input_shape = config.model.input_shape or train_set.input_shape
    try:
        model = build_model(
            config, input_shape=input_shape, num_classes=num_classes, batchnorm=batchnorm
        )
        obj = make_objective(model, config.model.loss, bn_mode="eval" if batchnorm else None)
        out = jax.eval_shape(obj.logits_fn, obj.params, probe)
    except (ValueError, TypeError) as e:
        built = (
            f" (built for inputs of shape {tuple(input_shape)})" if config.model.input_shape else ""
        )
        raise SetupError(
            f"the {config.model.name!r} model{built} does not fit the {config.data.name} "
            f"inputs of shape {train_set.input_shape}: {e}"
        ) from None
    if tuple(out.shape) != (probe.shape[0], max(num_classes, 1)):
        raise SetupError(
            f"the {config.model.name!r} model maps {config.data.name} inputs of shape "
            f"{train_set.input_shape} to outputs of shape {tuple(out.shape[1:])}, but the "
            f"data has {num_classes} classes."
        )
    modes: list[str | None] = list(config.analysis.bn_modes) if batchnorm else [None]
    name = config.model.name + ("-bn" if batchnorm else "")
    return Network(name, model, batchnorm, modes, count_params(model))


def prepare_study(config: Config) -> StudySetup:
    """Load the data, draw the analysis set, build the networks and check that they fit.

    Call it after enabling x64 when ``config.x64`` (the solver dtype depends on it).

    Raises:
        SetupError: missing data folder or files, sizes the data cannot provide, a loss
            the targets do not allow, a model that cannot take the inputs or whose output
            width is not the number of classes.
    """
    train_set, test_set = _load_data(config)
    analysis_set = _analysis_set(config, train_set)
    networks = [_network(config, train_set, batchnorm=bn) for bn in config.model.batchnorm]
    return StudySetup(
        config=config,
        train_set=train_set,
        test_set=test_set,
        analysis_set=analysis_set,
        networks=networks,
        checkpoints=checkpoint_steps(config.train),
    )


def analysis_settings(setup: StudySetup) -> dict[str, StudySettings]:
    """The resolved analysis settings
    (:class:`hessspec.studies.batchnorm_spectrum.settings.StudySettings`) of every
    network of ``setup``, by network name."""
    from hessspec.studies.batchnorm_spectrum.settings import resolve_settings

    config, tr, an = setup.config, setup.train_set, setup.analysis_set
    return {
        net.name: resolve_settings(
            config.analysis,
            config.train,
            tr.num_classes,
            net.num_params,
            an.num_examples,
            tr.num_examples,
        )
        for net in setup.networks
    }
