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
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

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

_SPLITS = ("train", "test", "all")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory dataset of ``N`` examples.

    Attributes:
        x: inputs, shape ``(N, H, W, C)`` for images (channels last) or ``(N, D)`` for
            vectors; floating dtype.
        y: targets, shape ``(N,)``: ``int32`` class indices in ``[0, num_classes)`` for
            classification, floating values for regression (``num_classes == 0``).
        num_classes: number of classes ``K``; 0 for regression.
        name: short description, e.g. ``"digits/train"``.
        info: free-form metadata (preprocessing statistics, teacher weights, source path).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        x = np.asarray(self.x)
        y = np.asarray(self.y)
        if x.ndim < 2:
            raise ValueError(
                f"Dataset {self.name!r}: x must have shape (N, D) or (N, H, W, C), "
                f"got shape {x.shape}."
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"Dataset {self.name!r}: y must have shape (N,) with N = {x.shape[0]} "
                f"(the leading axis of x), got shape {y.shape}."
            )
        num_classes = int(self.num_classes)
        if num_classes < 0:
            raise ValueError(f"Dataset {self.name!r}: num_classes must be >= 0, got {num_classes}.")
        if num_classes > 0:
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(
                    f"Dataset {self.name!r}: classification labels must be integers, "
                    f"got dtype {y.dtype}."
                )
            if y.size and (y.min() < 0 or y.max() >= num_classes):
                raise ValueError(
                    f"Dataset {self.name!r}: labels must lie in [0, {num_classes}), "
                    f"got range [{y.min()}, {y.max()}]."
                )
            y = y.astype(np.int32)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "num_classes", num_classes)
        object.__setattr__(self, "info", dict(self.info))

    @property
    def batch(self) -> dict[str, np.ndarray]:
        """The whole dataset as one batch ``{"x": x, "y": y}``."""
        return {"x": self.x, "y": self.y}

    @property
    def num_examples(self) -> int:
        """``N``, the number of examples."""
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, ``x.shape[1:]``: ``(H, W, C)`` or ``(D,)``."""
        return tuple(self.x.shape[1:])

    @property
    def is_classification(self) -> bool:
        """True when ``num_classes > 0``."""
        return self.num_classes > 0

    def __len__(self) -> int:
        return self.num_examples

    def take(self, indices, name: str | None = None) -> Dataset:
        """The examples at ``indices`` (an integer array or slice), as a new dataset."""
        if isinstance(indices, slice):
            x, y = self.x[indices], self.y[indices]
        else:
            idx = np.asarray(indices)
            x, y = self.x[idx], self.y[idx]
        return dataclasses.replace(self, x=x, y=y, name=name or self.name)

    def flatten(self) -> Dataset:
        """The same dataset with inputs reshaped to vectors ``(N, prod(input_shape))``."""
        return dataclasses.replace(self, x=self.x.reshape(self.num_examples, -1))

    def astype(self, dtype) -> Dataset:
        """The same dataset with inputs cast to ``dtype`` (targets keep their dtype unless
        they are regression targets, which are cast too)."""
        y = self.y if self.is_classification else self.y.astype(dtype)
        return dataclasses.replace(self, x=self.x.astype(dtype), y=y)


def _check_split(split: str, allowed=_SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}.")


def _check_float_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    return dtype


def default_data_dir() -> Path:
    """Root folder for on-disk datasets: ``$HESSSPEC_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("HESSSPEC_DATA", "data"))


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

    _check_split(split)
    dtype = _check_float_dtype(dtype)
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
    dtype = _check_float_dtype(dtype)
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
# CIFAR-10 (python pickle batches)
# --------------------------------------------------------------------------------------

_CIFAR_LAYOUT = (
    "Expected the CIFAR-10 'python version' (cifar-10-python.tar.gz, extracted): a folder "
    "with data_batch_1 ... data_batch_5 and test_batch, each a pickled dict with b'data' "
    "(uint8 array of shape (n, 3072), each row 1024 red, 1024 green, 1024 blue values of a "
    "32x32 image in row-major order) and b'labels' (n ints in 0..9). Pass that folder, or "
    "its parent holding cifar-10-batches-py/, as path= (or set $HESSSPEC_DATA to a folder "
    "containing cifar10/)."
)


def _cifar_dir(path) -> Path:
    root = Path(path).expanduser()
    candidates = [root, root / "cifar-10-batches-py"]
    for c in candidates:
        if (c / "data_batch_1").is_file() or (c / "test_batch").is_file():
            return c
    looked = ", ".join(str(c) for c in candidates)
    if not root.exists():
        raise FileNotFoundError(f"CIFAR-10 folder {root} does not exist. {_CIFAR_LAYOUT}")
    raise FileNotFoundError(
        f"No CIFAR-10 batch files (data_batch_1 or test_batch) found; looked in {looked}. "
        f"{_CIFAR_LAYOUT}"
    )


#: What a CIFAR-10 pickle batch may name: numpy's array reconstruction (the batches hold a
#: numpy array under b'data') and protocol 2's bytes encoding. Anything else is refused
#: before it is imported or called.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol 2 stores bytes (str -> bytes, nothing else)
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only (see :data:`_CIFAR_PICKLE_GLOBALS`)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which a CIFAR-10 batch never holds"
        )


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    if not file.is_file():
        raise FileNotFoundError(
            f"Missing CIFAR-10 file {file.name} in {file.parent}. {_CIFAR_LAYOUT}"
        )
    try:
        with open(file, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise ValueError(f"{file}: cannot be read ({e.strerror or e}).") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle fails in many ways
        # (UnpicklingError, EOFError, MemoryError, OverflowError, TypeError, ...)
        raise ValueError(
            f"{file}: not a readable CIFAR-10 pickle batch ({type(e).__name__}: {e}). "
            f"{_CIFAR_LAYOUT}"
        ) from None
    if not isinstance(d, dict):
        raise ValueError(f"{file}: expected a pickled dict, got {type(d).__name__}.")

    def get(key: str):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
        raise ValueError(f"{file}: the pickled dict has no {key!r} entry (keys: {list(d)}).")

    data, labels = get("data"), get("labels")
    try:
        data = np.asarray(data)
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError, MemoryError) as e:
        raise ValueError(
            f"{file}: 'data' and 'labels' must be a uint8 array and a list of ints "
            f"({type(e).__name__}: {e})."
        ) from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(
            f"{file}: 'data' must be a uint8 array of shape (n, 3072), "
            f"got {data.dtype} {data.shape}."
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{file}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{file}: labels must lie in 0..9, got [{labels.min()}, {labels.max()}].")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    return images, labels.astype(np.int32)


def _read_cifar_split(folder: Path, split: str):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_read_cifar_batch(folder / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_cifar10(
    path=None,
    split: str = "train",
    standardize: bool = False,
    flatten: bool = False,
    dtype=np.float32,
) -> Dataset:
    """CIFAR-10 from the standard python pickle batches (read only; nothing is downloaded).

    Pixels are scaled to :math:`[0, 1]` (``uint8 / 255``). With ``standardize=True`` each
    channel ``c`` is mapped to :math:`(x - \\mu_c)/\\sigma_c` using the mean and standard
    deviation of that channel over all pixels of the 50000 TRAIN images (so the train
    batches are read even for ``split="test"``).

    Only load files you trust: the format is Python pickle.

    Args:
        path: folder holding ``data_batch_1..5`` and ``test_batch``, or its parent holding
            ``cifar-10-batches-py/``. Default: ``default_data_dir() / "cifar10"``.
        split: ``"train"`` (50000 images), ``"test"`` (10000) or ``"all"`` (train then test).
        standardize: per-channel standardization with train statistics.
        flatten: return vectors ``(N, 3072)`` (HWC order) instead of ``(N, 32, 32, 3)``.
        dtype: floating dtype of ``x``.

    Returns:
        Dataset with ``x`` ``(N, 32, 32, 3)`` channels last, ``y`` int32 ``(N,)``,
        ``num_classes = 10``; ``info["mean"]``, ``info["std"]`` shape ``(3,)``.

    Raises:
        FileNotFoundError: the folder or a batch file is missing (the message says which,
            where it looked and the expected layout).
        ValueError: a batch file is not in the expected format.
    """
    _check_split(split)
    dtype = _check_float_dtype(dtype)
    folder = _cifar_dir(default_data_dir() / "cifar10" if path is None else path)
    if split == "all":
        tr, trl = _read_cifar_split(folder, "train")
        te, tel = _read_cifar_split(folder, "test")
        images, labels = np.concatenate([tr, te]), np.concatenate([trl, tel])
        train_images = tr
    else:
        images, labels = _read_cifar_split(folder, split)
        train_images = images if split == "train" else None
    x = images.astype(np.float64) / 255.0
    mean, std = np.zeros(3), np.ones(3)
    if standardize:
        if train_images is None:
            train_images = _read_cifar_split(folder, "train")[0]
        t = train_images.astype(np.float64) / 255.0
        mean = t.mean(axis=(0, 1, 2))
        std = t.std(axis=(0, 1, 2))
        std = np.where(std > 0, std, 1.0)
        x = (x - mean) / std
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return Dataset(
        x=x.astype(dtype),
        y=labels,
        num_classes=10,
        name=f"cifar10/{split}",
        info={"mean": mean, "std": std, "path": str(folder), "standardize": standardize},
    )


# --------------------------------------------------------------------------------------
# MNIST (IDX files)
# --------------------------------------------------------------------------------------

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_LAYOUT = (
    "Expected the MNIST IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally gzipped, '.gz'; the "
    "'-idx3-ubyte' may also be spelled '.idx3-ubyte') in one folder, or in its raw/ or "
    "MNIST/raw/ subfolder. IDX format: big-endian int32 magic 2051 (images) or 2049 "
    "(labels), then the dimensions as big-endian int32 (n, 28, 28 or n), then uint8 data. "
    "Pass that folder as path= (or set $HESSSPEC_DATA to a folder containing mnist/)."
)


def _mnist_file(root: Path, stem: str) -> Path:
    dirs = [root, root / "raw", root / "MNIST" / "raw"]
    dotted = stem.replace("-idx", ".idx")
    names = [stem, stem + ".gz", dotted, dotted + ".gz"]
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    looked = ", ".join(str(d) for d in dirs)
    if not root.exists():
        raise FileNotFoundError(f"MNIST folder {root} does not exist. {_MNIST_LAYOUT}")
    raise FileNotFoundError(
        f"Missing MNIST file {stem} (or {stem}.gz); looked in {looked}. {_MNIST_LAYOUT}"
    )


def _read_idx(file: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file with the given magic number and rank."""
    opener = gzip.open if file.name.endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # e.g. gzip.BadGzipFile
        raise ValueError(f"{file}: cannot read ({e}).") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{file}: {len(raw)} bytes, shorter than the {header}-byte IDX header "
            f"(magic {magic} and {ndim} dimensions)."
        )
    (got,) = struct.unpack(">i", raw[:4])
    if got != magic:
        raise ValueError(
            f"{file}: bad IDX magic number {got} (0x{got & 0xFFFFFFFF:08x}); expected {magic} "
            f"(unsigned bytes, {ndim} dimension(s)). Is it the right file, or still compressed?"
        )
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    if any(d < 0 for d in dims):
        raise ValueError(f"{file}: negative dimension in the IDX header {dims}.")
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise ValueError(
            f"{file}: the IDX header says shape {dims} ({size} bytes of data), but the file "
            f"holds {len(raw) - header} bytes after the header."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_mnist_split(root: Path, split: str):
    img_stem, lbl_stem = _MNIST_FILES[split]
    img_file, lbl_file = _mnist_file(root, img_stem), _mnist_file(root, lbl_stem)
    images = _read_idx(img_file, 2051, 3)
    labels = _read_idx(lbl_file, 2049, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_file} holds {images.shape[0]} images but {lbl_file} holds "
            f"{labels.shape[0]} labels."
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lbl_file}: labels must lie in 0..9, got max {labels.max()}.")
    return images[..., None], labels.astype(np.int32)


def load_mnist(
    path=None,
    split: str = "train",
    standardize: bool = False,
    flatten: bool = False,
    dtype=np.float32,
) -> Dataset:
    """MNIST from the standard IDX files (plain or gzipped; nothing is downloaded).

    The IDX header is parsed and validated: big-endian magic 2051 (unsigned-byte 3-d
    images) or 2049 (unsigned-byte 1-d labels), the dimensions, and the data length.
    Pixels are scaled to :math:`[0, 1]`; ``standardize=True`` maps them to
    :math:`(x - \\mu)/\\sigma` with the mean and standard deviation over all pixels of the
    TRAIN images.

    Args:
        path: folder with the four files (or their ``raw/`` / ``MNIST/raw/`` subfolder).
            Default: ``default_data_dir() / "mnist"``.
        split: ``"train"`` (60000), ``"test"`` (10000) or ``"all"`` (train then test).
        standardize: global standardization with train statistics.
        flatten: return ``(N, 784)`` instead of ``(N, 28, 28, 1)``.
        dtype: floating dtype of ``x``.

    Returns:
        Dataset with ``x`` ``(N, H, W, 1)`` (28x28 for MNIST), ``y`` int32 ``(N,)``,
        ``num_classes = 10``; ``info["mean"]``, ``info["std"]`` scalars.

    Raises:
        FileNotFoundError: the folder or a file is missing (the message says which, where
            it looked and the expected layout).
        ValueError: a file has a bad header or length (the message names the file).
    """
    _check_split(split)
    dtype = _check_float_dtype(dtype)
    root = Path(default_data_dir() / "mnist" if path is None else path).expanduser()
    if split == "all":
        tr, trl = _read_mnist_split(root, "train")
        te, tel = _read_mnist_split(root, "test")
        if tr.shape[1:] != te.shape[1:]:
            raise ValueError(f"MNIST train images {tr.shape[1:]} and test {te.shape[1:]} differ.")
        images, labels, train_images = np.concatenate([tr, te]), np.concatenate([trl, tel]), tr
    else:
        images, labels = _read_mnist_split(root, split)
        train_images = images if split == "train" else None
    x = images.astype(np.float64) / 255.0
    mean, std = 0.0, 1.0
    if standardize:
        if train_images is None:
            train_images = _read_mnist_split(root, "train")[0]
        t = train_images.astype(np.float64) / 255.0
        mean, std = float(t.mean()), float(t.std())
        std = std if std > 0 else 1.0
        x = (x - mean) / std
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return Dataset(
        x=x.astype(dtype),
        y=labels,
        num_classes=10,
        name=f"mnist/{split}",
        info={"mean": mean, "std": std, "path": str(root), "standardize": standardize},
    )


# --------------------------------------------------------------------------------------
# Helpers
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


def subsample(dataset: Dataset, n: int, seed: int = 0, stratify: bool = False) -> Dataset:
    """A fixed random subset of ``n`` examples, without replacement, in original order.

    Args:
        dataset: the dataset.
        n: subset size, ``1 <= n <= N``; ``n == N`` returns every example.
        seed: seed of the choice (deterministic).
        stratify: for classification, keep the class proportions (rounded so that the
            sizes sum to ``n``; ``sklearn.model_selection.train_test_split``). ``n`` must
            be at least the number of classes; when fewer than that many examples are left
            out, they are chosen at random instead.

    Raises:
        ValueError: ``n`` outside ``[1, N]``, or a stratified ``n`` below the number of
            classes.

    Returns:
        Dataset of ``n`` examples; ``info["indices"]`` holds their indices in ``dataset``.
    """
    total = dataset.num_examples
    if not 1 <= n <= total:
        raise ValueError(f"n must lie in [1, {total}], got {n}.")
    if n == total:
        idx = np.arange(total)
    elif stratify:
        if not dataset.is_classification:
            raise ValueError("stratify=True needs a classification dataset.")
        classes = int(np.unique(dataset.y).size)
        if n < classes:
            raise ValueError(
                f"a stratified subset of {n} examples cannot hold one example of each of the "
                f"{classes} classes; take at least {classes}."
            )
        if total - n < classes:  # sklearn needs a class-complete rest too: drop at random
            drop = np.random.default_rng(seed).choice(total, size=total - n, replace=False)
            idx = np.setdiff1d(np.arange(total), drop)
            sub = dataset.take(idx, name=f"{dataset.name}[{n}]")
            return dataclasses.replace(sub, info={**dataset.info, "indices": idx})
        from sklearn.model_selection import train_test_split

        idx, _ = train_test_split(
            np.arange(total), train_size=n, random_state=seed, stratify=dataset.y
        )
        idx = np.sort(idx)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    sub = dataset.take(idx, name=f"{dataset.name}[{n}]")
    return dataclasses.replace(sub, info={**dataset.info, "indices": idx})


def batches(
    dataset: Dataset, batch_size: int, seed: int | None = None, drop_remainder: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Iterate over one epoch in batches ``{"x": (B, ...), "y": (B,)}``.

    Args:
        dataset: the dataset.
        batch_size: examples per batch ``B``.
        seed: shuffle with this seed; ``None`` keeps the order.
        drop_remainder: drop the last, smaller batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    n = dataset.num_examples
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield {"x": dataset.x[idx], "y": dataset.y[idx]}
