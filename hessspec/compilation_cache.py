"""JAX's persistent compilation cache, switched on explicitly.

Every solver program is compiled by XLA the first time a process meets it (a second or more
for a network's Hessian-vector product inside a Lanczos loop). JAX can keep compiled programs
on disk so that the next process loads them instead. Importing hessspec never touches JAX's
configuration; the CLI and the test suite call :func:`enable_compilation_cache`, and so can a
notebook.

The cache lives in ``$XDG_CACHE_HOME/hessspec/jax`` (``~/.cache/hessspec/jax`` by default).
The environment variable ``HESSSPEC_COMPILATION_CACHE`` overrides it: a folder to use
instead, or ``0`` / ``off`` / ``false`` / ``no`` (or an empty value) to switch the cache off.
The CLI's ``--no-compilation-cache`` does the same for one run.

The cache is trusted code: a program loaded from it runs as compiled. Keep it in a folder
only you can write to (JAX's own warning). It is not size-bounded (JAX's eviction needs every
entry written with it on, and rescans the folder at every write); delete the folder to reclaim
the space. Several processes may share it (test workers, the processes of a multi-host run):
JAX writes each program once, and a program read while another process writes it is compiled
again, with a warning.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["ENV_VAR", "cache_dir_from_env", "default_cache_dir", "enable_compilation_cache"]

ENV_VAR = "HESSSPEC_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no", "")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hessspec/jax``, or ``~/.cache/hessspec/jax`` without XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hessspec" / "jax"


def cache_dir_from_env() -> Path | None:
    """The folder the environment asks for: :data:`ENV_VAR` if set (None when it says off),
    else :func:`default_cache_dir`."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return default_cache_dir()
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def enable_compilation_cache(
    path: str | os.PathLike | None = None,
    *,
    min_compile_seconds: float = 0.0,
) -> Path | None:
    """Switch on JAX's persistent compilation cache for this process.

    Args:
        path: the cache folder; None: :func:`cache_dir_from_env` (the environment variable
            ``HESSSPEC_COMPILATION_CACHE``, else ``~/.cache/hessspec/jax``). Created if
            missing.
        min_compile_seconds: programs that compiled faster than this are not stored (JAX's
            default of 1 s would skip most of ours; 0 stores every program).

    Returns:
        The folder in use, or None when the environment variable switched the cache off (an
        explicit ``path`` always switches it on).

    Raises:
        ValueError: ``path`` exists and is not a folder, or cannot be created.
    """
    folder = Path(path).expanduser() if path is not None else cache_dir_from_env()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(
            f"compilation cache: {folder} exists and is not a folder; pass another path or "
            f"set {ENV_VAR}=off."
        ) from None
    except OSError as err:
        raise ValueError(
            f"compilation cache: cannot create {folder} ({err.strerror}); pass another path "
            f"or set {ENV_VAR}=off."
        ) from None
    folder = folder.resolve()
    if jax.config.jax_compilation_cache_dir != str(folder):
        from jax.experimental.compilation_cache import compilation_cache

        jax.config.update("jax_compilation_cache_dir", str(folder))
        compilation_cache.reset_cache()  # a cache opened at another folder is closed
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
