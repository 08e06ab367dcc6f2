"""Datasets: small real images bundled with scikit-learn, CIFAR-10 and MNIST from their
standard files, and synthetic Gaussian inputs for the LeCun input-statistics study.

Every loader returns a :class:`Dataset`: inputs ``x`` of shape ``(N, H, W, C)`` (images,
channels last) or ``(N, D)`` (vectors), labels ``y`` of shape ``(N,)`` (``int32`` class
indices, or floating regression targets), ``num_classes`` (0 for regression) and a name.
``dataset.batch`` is the dict ``{"x": x, "y": y}``, the batch format every loss in hessspec
takes: ``loss_fn(params, dataset.batch)``.

Arrays are numpy arrays (host memory): jax converts them on first use. Loaders take a
``dtype`` (``float32`` by default; pass ``numpy.float64`` for reference computations with
x64 enabled). Preprocessing statistics are always computed in float64 from the TRAINING
split only, so the train and test splits are transformed identically.

Only :func:`load_cifar10` and :func:`load_mnist` read files; nothing is downloaded.

This module holds the digits, the synthetic data and :func:`load_train_test`, and is the
one place to import every data name from; :class:`Dataset`, :func:`subsample` and
:func:`batches` live in :mod:`hessspec.nn.dataset`, the CIFAR-10 and MNIST file loaders in
:mod:`hessspec.nn.data_files`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hessspec.nn.data_files import load_cifar10, load_mnist
from hessspec.nn.dataset import (
    Dataset,
    batches,
    check_float_dtype,
    check_split,
    default_data_dir,
    subsample,
)

__all__ = [
    "Dataset",
    "batches",
    "default_data_dir",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_train_test",
    "subsample",
    "synthetic_gaussian",
]


# --------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int):
    """Deterministic stratified split: (train_idx, test_idx), each sorted."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}.")
    n = y.shape[0]
    if test_fraction == 0.0:
        return np.arange(n), np.arange(0)
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(n), test_size=test_fraction, random_state=seed, stratify=y
    )
    return np.sort(train_idx), np.sort(test_idx)


def load_digits(
    split: str = "train",
    test_fraction: float = 0.2,
    seed: int = 0,
    preprocessing: str = "unit",
    flatten: bool = False,
    dtype=np.float32,
) -> Dataset:
    """The scikit-learn handwritten digits: 1797 real 8x8 grey images, 10 classes.

    Bundled with scikit-learn (no download). Raw pixel values are integers in ``[0, 16]``.
    The train/test split is stratified by class and deterministic given ``seed``
    (``sklearn.model_selection.train_test_split``); both splits are sorted by original
    index.

    Preprocessing (statistics in float64 from the TRAIN split of the same
    ``test_fraction``/``seed``, whatever ``split`` is asked for, so that splits match):

    - ``"unit"``: :math:`x / 16 \\in [0, 1]`;
    - ``"center"``: :math:`x/16 - \\mu_p`, with :math:`\\mu_p` the per-pixel train mean;
    - ``"standardize"``: :math:`(x/16 - \\mu_p) / \\sigma_p` with the per-pixel train
      standard deviation :math:`\\sigma_p` (population, ``ddof=0``); pixels that are
      constant over the train split (:math:`\\sigma_p = 0`) are only centred;
    - ``"raw"``: the integers ``0..16`` as floats.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (all 1797 images in original order).
        test_fraction: fraction of each class held out for the test split, in ``[0, 1)``.
        seed: seed of the split.
        preprocessing: ``"unit"``, ``"center"``, ``"standardize"`` or ``"raw"``.
        flatten: return vectors ``(N, 64)`` instead of images ``(N, 8, 8, 1)``.
        dtype: floating dtype of ``x``.

    Returns:
        Dataset with ``x`` of shape ``(N, 8, 8, 1)`` (or ``(N, 64)``), ``y`` int32 ``(N,)``,
        ``num_classes = 10``; ``info`` holds ``"mean"`` and ``"std"`` (shape ``(8, 8, 1)``,
        the per-pixel statistics used; zeros/ones where not used) and the split indices
        ``"indices"`` into the original 1797 images.
    """
    from sklearn import datasets as skdatasets

    check_split(split)
    dtype = check_float_dtype(dtype)
    methods = ("unit", "center", "standardize", "raw")
    if preprocessing not in methods:
        raise ValueError(f"preprocessing must be one of {methods}, got {preprocessing!r}.")

    raw = skdatasets.load_digits()
    images = np.asarray(raw.images, dtype=np.float64)[..., None]  # (1797, 8, 8, 1)
    labels = np.asarray(raw.target, dtype=np.int32)
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    if split == "test" and test_idx.size == 0:
        raise ValueError("split='test' needs test_fraction > 0.")

    mean = np.zeros(images.shape[1:])
    std = np.ones(images.shape[1:])
    x = images if preprocessing == "raw" else images / 16.0
    if preprocessing in ("center", "standardize"):
        mean = x[train_idx].mean(axis=0)
        x = x - mean
        if preprocessing == "standardize":
            std = x[train_idx].std(axis=0)
            std = np.where(std > 0, std, 1.0)
            x = x / std

    idx = {"train": train_idx, "test": test_idx, "all": np.arange(labels.shape[0])}[split]
    x = x[idx]
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return Dataset(
        x=x.astype(dtype),
        y=labels[idx],
        num_classes=10,
        name=f"digits/{split}",
        info={"preprocessing": preprocessing, "mean": mean, "std": std, "indices": idx},
    )


# --------------------------------------------------------------------------------------
# Synthetic Gaussian inputs (LeCun, Kanter & Solla 1991)
# --------------------------------------------------------------------------------------


def synthetic_gaussian(
    num_samples: int,
    num_features: int,
    mean: float = 0.0,
    variance: float = 1.0,
    seed: int = 0,
    targets: str = "teacher",
    noise_std: float = 0.0,
    teacher: np.ndarray | None = None,
    dtype=np.float32,
) -> Dataset:
    """Regression data with i.i.d. Gaussian input components, for the LeCun input-bias study.

    Inputs :math:`x_{ij} \\sim \\mathcal N(m, v)` i.i.d. for ``i < p = num_samples``,
    ``j < N = num_features``. For a linear model with squared loss
    :math:`\\frac{1}{2p}\\sum_i (w^\\top x_i - y_i)^2` the Hessian is the input correlation
    matrix :math:`R = X^\\top X / p` whatever the targets are: one outlier near
    :math:`N m^2 + v` when :math:`m \\ne 0`, the rest Marchenko–Pastur with ratio
    :math:`N/p` (docs/design.md). Targets only matter for the loss value and the gradient:

    - ``targets="teacher"``: :math:`y = X w^* + \\epsilon`, teacher
      :math:`w^* \\sim \\mathcal N(0, I_N / N)` (drawn from ``seed`` unless given) and
      noise :math:`\\epsilon_i \\sim \\mathcal N(0, \\text{noise\\_std}^2)`;
    - ``targets="zeros"``: :math:`y = 0`.

    Args:
        num_samples: ``p``, number of examples.
        num_features: ``N``, input dimension.
        mean: ``m``, mean of every input component.
        variance: ``v > 0``, variance of every input component.
        seed: seed of a ``numpy.random.default_rng`` stream (teacher first, then inputs,
            then noise).
        targets: ``"teacher"`` or ``"zeros"``.
        noise_std: standard deviation of the label noise (teacher targets only).
        teacher: optional teacher ``(N,)``; overrides the random one (to share a teacher
            between a train and a test set).
        dtype: floating dtype of ``x`` and ``y``.

    Returns:
        Dataset with ``x`` ``(p, N)``, ``y`` ``(p,)`` float, ``num_classes = 0``;
        ``info`` holds ``"teacher"`` (``(N,)`` or None), ``"mean"``, ``"variance"``.
    """
    dtype = check_float_dtype(dtype)
    if num_samples < 1 or num_features < 1:
        raise ValueError(
            f"num_samples and num_features must be positive, got {num_samples}, {num_features}."
        )
    if variance <= 0:
        raise ValueError(f"variance must be positive, got {variance}.")
    if targets not in ("teacher", "zeros"):
        raise ValueError(f"targets must be 'teacher' or 'zeros', got {targets!r}.")
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0 / np.sqrt(num_features), size=num_features)
    if teacher is not None:
        w = np.asarray(teacher, dtype=np.float64)
        if w.shape != (num_features,):
            raise ValueError(f"teacher must have shape ({num_features},), got {w.shape}.")
    x = mean + np.sqrt(variance) * rng.standard_normal((num_samples, num_features))
    if targets == "teacher":
        y = x @ w + noise_std * rng.standard_normal(num_samples)
    else:
        y = np.zeros(num_samples)
        w = None
    return Dataset(
        x=x.astype(dtype),
        y=y.astype(dtype),
        num_classes=0,
        name=f"gaussian(m={mean:g},v={variance:g})",
        info={"teacher": w, "mean": mean, "variance": variance, "noise_std": noise_std},
    )


# --------------------------------------------------------------------------------------
# Train and test by name
# --------------------------------------------------------------------------------------


def load_train_test(name: str, path=None, **kwargs) -> tuple[Dataset, Dataset]:
    """``(train, test)`` for a named dataset.

    Args:
        name: ``"digits"``, ``"cifar10"``, ``"mnist"`` or ``"gaussian"``.
        path: data folder for ``"cifar10"``/``"mnist"`` (see their loaders).
        **kwargs: passed to the loader. For ``"gaussian"``: ``num_samples`` (train size,
            default 1000), ``num_test`` (default ``num_samples // 4``) and any argument of
            :func:`synthetic_gaussian`; train and test share the teacher and are
            independent draws.
    """
    name = name.lower()
    if name == "digits":
        if path is not None:
            raise ValueError("the digits are bundled with scikit-learn: pass no path.")
        return load_digits("train", **kwargs), load_digits("test", **kwargs)
    if name in ("cifar10", "cifar-10", "cifar"):
        return load_cifar10(path, "train", **kwargs), load_cifar10(path, "test", **kwargs)
    if name == "mnist":
        return load_mnist(path, "train", **kwargs), load_mnist(path, "test", **kwargs)
    if name == "gaussian":
        kw = dict(kwargs)
        n = int(kw.pop("num_samples", 1000))
        n_test = int(kw.pop("num_test", max(n // 4, 1)))
        seed = int(kw.pop("seed", 0))
        train = synthetic_gaussian(n, seed=seed, **kw)
        kw["teacher"] = train.info["teacher"] if kw.get("targets", "teacher") == "teacher" else None
        test = synthetic_gaussian(n_test, seed=seed + 1_000_003, **kw)
        return (
            dataclasses.replace(train, name=train.name + "/train"),
            dataclasses.replace(test, name=test.name + "/test"),
        )
    raise ValueError(
        f"unknown dataset {name!r}; choose one of 'digits', 'cifar10', 'mnist', 'gaussian'."
    )
