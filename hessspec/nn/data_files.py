"""CIFAR-10 and MNIST from their standard files (read only; nothing is downloaded).

Both loaders check what they read and say what is wrong in one line naming the file:
CIFAR-10 batches are unpickled with a restricted unpickler (plain data and numpy arrays
only) and checked for shapes, dtype and labels; MNIST IDX files are parsed with their
header (magic number, dimensions, data length) validated. Missing files are reported with
where the loader looked and the layout it expects.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hessspec.nn.dataset import Dataset, check_float_dtype, check_split, default_data_dir

__all__ = ["load_cifar10", "load_mnist"]


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
    check_split(split)
    dtype = check_float_dtype(dtype)
    folder = _cifar_dir(default_data_dir() / "cifar10" if path is None else path)
    return _image_split(
        lambda part: _read_cifar_split(folder, part),
        f"cifar10/{split}",
        split,
        folder,
        standardize=standardize,
        flatten=flatten,
        dtype=dtype,
        axes=(0, 1, 2),
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
    check_split(split)
    dtype = check_float_dtype(dtype)
    root = Path(default_data_dir() / "mnist" if path is None else path).expanduser()
    return _image_split(
        lambda part: _read_mnist_split(root, part),
        f"mnist/{split}",
        split,
        root,
        standardize=standardize,
        flatten=flatten,
        dtype=dtype,
        axes=None,
    )


def _image_split(
    read: Callable[[str], tuple[np.ndarray, np.ndarray]],
    name: str,
    split: str,
    path: Path,
    *,
    standardize: bool,
    flatten: bool,
    dtype,
    axes: tuple[int, ...] | None,
) -> Dataset:
    """The 10-class dataset ``name`` of the ``split`` of uint8 images: pixels
    ``/ 255`` in float64, standardized with the mean and standard deviation of the TRAIN
    images over ``axes`` (``(0, 1, 2)``: per channel, arrays; None: over everything, floats)
    when asked (``info["mean"], info["std"] = 0, 1`` otherwise, shaped alike), flattened to
    vectors when asked, cast to ``dtype``.

    Args:
        read: ``read(part) -> (images (n, H, W, C) uint8, labels (n,))`` for ``"train"``
            and ``"test"``.
        split: ``"train"``, ``"test"`` or ``"all"`` (train then test).
        path: the folder read (``info["path"]``).
    """
    if split == "all":
        tr, trl = read("train")
        te, tel = read("test")
        if tr.shape[1:] != te.shape[1:]:
            raise ValueError(f"the train images {tr.shape[1:]} and test {te.shape[1:]} differ.")
        images, labels, train_images = np.concatenate([tr, te]), np.concatenate([trl, tel]), tr
    else:
        images, labels = read(split)
        train_images = images if split == "train" else None
    x = images.astype(np.float64) / 255.0
    per_channel = axes is not None
    mean, std = (np.zeros(3), np.ones(3)) if per_channel else (0.0, 1.0)
    if standardize:
        t = (read("train")[0] if train_images is None else train_images) / 255.0
        mean, std = t.mean(axis=axes), t.std(axis=axes)
        std = np.where(std > 0, std, 1.0)
        if not per_channel:
            mean, std = float(mean), float(std)
        x = (x - mean) / std
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return Dataset(
        x=x.astype(dtype),
        y=labels,
        num_classes=10,
        name=name,
        info={"mean": mean, "std": std, "path": str(path), "standardize": standardize},
    )
