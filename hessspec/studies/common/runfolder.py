"""The run folder: atomic files, one writer at a time, and a new run swapped in whole.

A study writes its output folder (``--out``) through :class:`RunFolder`:

- **Atomic files** (:func:`atomic_write_bytes`): every file goes to a temporary file in its
  destination folder (``.<name>.<random>.tmp``), is flushed and fsynced, and replaces the
  old one with ``os.replace``: a reader, a crash or a full disk never leaves half a file.
  Files get the mode the umask gives (``0o666 & ~umask``), not ``mkstemp``'s 0600.
  A failed write raises :class:`OutputWriteError` naming the file and the cause (a full
  disk says so), and leaves the previous file in place.
- **One writer** (:class:`FolderLock`): an ``flock`` on ``<folder>/.hessspec.lock``; a
  second run into the same folder is refused (:class:`FolderBusyError`) instead of mixing
  its files with the first one's. The kernel releases the lock when its process dies, so a
  killed run never leaves a folder locked.
- **Leftovers** (:func:`remove_stale_temporaries`): temporary files and orbax's temporary
  checkpoint folders that a killed run (``kill -9``, power loss) left behind are removed
  when the next run opens the folder.
- **Replacing a previous run** (``--overwrite``): the new run is written beside the old one,
  in ``<folder>/.hessspec-pending/``, and swapped in only when it ends well
  (:meth:`RunFolder.commit`): the files the previous run wrote (those its results.json lists
  under ``"files"``) are removed, the new ones moved in, results.json last. Anything else
  in the folder (a user's notes, their own figures) is never touched. The swap is recorded
  in a journal first, so a swap cut short by ``kill -9`` is finished by the next run that
  opens the folder. A new run that fails or is interrupted leaves the previous run as it
  was; ``--resume`` continues the pending one.

results.json is the index of a run folder: it is written last and lists under ``"files"``
every file (and every checkpoint folder, with a trailing ``/``) the run wrote.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "COMMIT_JOURNAL",
    "LOCK_NAME",
    "PENDING_NAME",
    "FolderBusyError",
    "FolderLock",
    "OutputFolderError",
    "OutputWriteError",
    "RunFolder",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "file_mode",
    "is_disk_full",
    "listed_files",
    "remove_listed_files",
    "remove_stale_temporaries",
]

LOCK_NAME = ".hessspec.lock"
PENDING_NAME = ".hessspec-pending"
COMMIT_JOURNAL = ".hessspec-commit.json"
RESULTS_NAME = "results.json"

#: Names :func:`atomic_write_bytes` gives its temporary files (``tempfile.mkstemp`` adds 8
#: characters from ``[a-z0-9_]``).
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
#: orbax writes a checkpoint to ``<name>.orbax-checkpoint-tmp-<n>`` and renames it when done.
_ORBAX_TEMPORARY = re.compile(r".+\.orbax-checkpoint-tmp(-.*)?")
#: Folders of a run folder that hold files a study writes (temporaries are looked for there).
_OUTPUT_SUBFOLDERS = ("figures", "checkpoints")


class OutputFolderError(RuntimeError):
    """The output folder cannot take this run (holds files, is not a folder, is not
    writable, holds no run to resume). The message says what to do instead."""


class FolderBusyError(OutputFolderError):
    """Another hessspec process is writing (or reading) the folder."""


class OutputWriteError(OSError):
    """Writing a file of the run folder failed (full disk, permissions, I/O error); the
    previous version of the file, if any, is still in place."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) is "no space left on device" / "quota
    exceeded", also when a library reports it only in its message (orbax, tensorstore)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error).lower()
        if "no space left" in text or "disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _write_error(path: Path, error: BaseException) -> OutputWriteError:
    """An :class:`OutputWriteError` for a failed write of ``path`` that says what to do."""
    if is_disk_full(error):
        return OutputWriteError(
            errno.ENOSPC,
            f"no space left on the device while writing {path}; free some space (or choose "
            "another --out) and continue with --resume",
        )
    code = getattr(error, "errno", None) or errno.EIO
    reason = getattr(error, "strerror", None) or str(error)
    return OutputWriteError(code, f"could not write {path}: {reason}")


def _current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by
    setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~_current_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync,
    the umask's file mode, then ``os.replace``. A crash, an interrupt or a full disk leaves
    either the old file or the new one, never a mix, and no temporary file.

    Raises:
        OutputWriteError: the write failed (the old file, if any, is unchanged); the
            message names the file and, for a full disk, says so.
        TypeError: ``data`` is not bytes-like.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove what killed runs left in a run folder: this module's temporary files
    (``.<name>.<8 chars>.tmp``) in the folder, its ``figures/`` and ``checkpoints/`` trees,
    and orbax's unfinished checkpoint folders (``*.orbax-checkpoint-tmp-*``) under
    ``checkpoints/``. Call it only while holding the folder's lock.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    places = [folder] + [folder / s for s in _OUTPUT_SUBFOLDERS]
    for place in places:
        if not place.is_dir():
            continue
        walker = os.walk(place) if place.name == "checkpoints" else [(str(place), [], None)]
        for root, dirs, _ in walker:
            root = Path(root)
            for entry in list(root.iterdir()):
                if entry.is_file() and _TEMPORARY.fullmatch(entry.name):
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
                elif entry.is_dir() and _ORBAX_TEMPORARY.fullmatch(entry.name):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
                    if entry.name in dirs:
                        dirs.remove(entry.name)
    return removed


def check_writable(folder: str | Path) -> None:
    """Check that files can be created in ``folder`` (or, when it does not exist yet, in its
    nearest existing parent) by creating and removing a temporary file.

    Raises:
        OutputFolderError: not writable (read-only folder or file system, no permission),
            or a parent is not a folder; the message names the folder and the fix.
    """
    folder = Path(folder)
    probe_in = folder
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if probe_in.exists() and not probe_in.is_dir():
        raise OutputFolderError(
            f"output path {str(probe_in)!r} exists and is not a folder; choose another --out."
        )
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_in, prefix=".hessspec-write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        what = "" if probe_in == folder else f" (to create {folder})"
        raise OutputFolderError(
            f"cannot write to {probe_in}{what}: {e.strerror or e}; choose another --out or "
            "make the folder writable. Nothing was run."
        ) from None


def listed_files(folder: str | Path) -> list[str] | None:
    """The ``"files"`` list of ``folder/results.json`` (paths relative to the folder;
    checkpoint folders end with ``/``), or None when there is no readable results.json or
    it lists none."""
    try:
        with open(Path(folder) / RESULTS_NAME, encoding="utf-8") as f:
            files = json.load(f).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(files, list) or not all(isinstance(p, str) for p in files):
        return None
    return [p for p in files if _safe_relative(p)]


def _safe_relative(name: str) -> bool:
    """A relative path that stays inside its folder (no absolute path, no ``..``)."""
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_empty_parents(path: Path, stop: Path) -> None:
    """Remove the empty folders from ``path``'s parent up to (not including) ``stop``."""
    parent = path.parent
    while parent != stop and stop in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


class FolderLock:
    """An ``flock`` on ``<folder>/.hessspec.lock``: exclusive for a run writing the folder,
    shared for a run reading it (``analyze``). Never waits: a lock held by another process
    raises :class:`FolderBusyError`.

    The holder of the exclusive lock writes its process id and command into the file (the
    refusal message of a second run names them) and removes the file on release.

    Args:
        folder: the folder (must exist when :meth:`acquire` is called).
        shared: take a shared (reader) lock instead of an exclusive one.
        command: the command line recorded for other runs to see.
    """

    def __init__(self, folder: str | Path, *, shared: bool = False, command: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.shared = bool(shared)
        self.command = command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f" (process {info['pid']}, started {info['started']}: {info['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def acquire(self) -> FolderLock:
        """Take the lock.

        Raises:
            FolderBusyError: another process holds it.
            OutputFolderError: the lock file cannot be created (a writer only; a reader of
                a read-only folder goes on without a lock).
        """
        if self._fd is not None:
            return self
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        for _ in range(10):  # the file may be removed between open and flock: retry
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            except OSError as e:
                if self.shared and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                    return self  # nobody can write a folder we cannot: no lock needed
                raise OutputFolderError(
                    f"cannot create the lock file {self.path}: {e.strerror}; choose another "
                    "--out or make the folder writable."
                ) from None
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                if self.shared or holder:
                    what = f"being written by another hessspec run{holder}"
                else:
                    what = "being read by another hessspec process (analyze)"
                raise FolderBusyError(
                    f"{self.folder} is {what}; wait for it to finish, or choose another folder."
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                if not self.shared:
                    info = {
                        "pid": os.getpid(),
                        "started": datetime.datetime.now().isoformat(timespec="seconds"),
                        "command": self.command,
                    }
                    os.ftruncate(fd, 0)
                    os.write(fd, json.dumps(info).encode())
                return self
            os.close(fd)
        raise FolderBusyError(f"could not lock {self.folder}: its lock file keeps changing.")

    def release(self) -> None:
        """Release the lock (an exclusive holder removes the lock file first)."""
        if self._fd is None:
            return
        if not self.shared:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _entries(folder: Path) -> list[Path]:
    """What a folder holds, leaving out a lock file (a killed run's is harmless)."""
    return [p for p in folder.iterdir() if p.name != LOCK_NAME]


class RunFolder:
    """The output folder of one run, locked for its whole life (see the module docstring).

    Use :meth:`open`; write into :attr:`work_dir`; call :meth:`commit` when the run ended
    well (it swaps a pending run in) and :meth:`close` in every case.

    Attributes:
        out_dir: the folder the user named.
        work_dir: where this run writes: ``out_dir`` itself, or
            ``out_dir/.hessspec-pending`` when it replaces a previous run there.
        replaces: whether ``work_dir`` is the pending folder (then :meth:`commit` swaps).
        resumed: whether the run continues one found in the folder (``mode="resume"``).
        removed_temporaries: leftovers of killed runs removed when the folder was opened.
    """

    def __init__(self, out_dir: Path, work_dir: Path, lock: FolderLock, *, resumed: bool):
        self.out_dir = out_dir
        self.work_dir = work_dir
        self.lock = lock
        self.resumed = resumed
        self.removed_temporaries: list[Path] = []

    @property
    def replaces(self) -> bool:
        return self.work_dir != self.out_dir

    @property
    def pending(self) -> Path:
        return self.out_dir / PENDING_NAME

    @staticmethod
    def refusal(
        out_dir: str | Path, *, overwrite: bool = False, resume: bool = False
    ) -> str | None:
        """Why a run could not use ``out_dir``, checked without writing anything (the same
        checks :meth:`open` makes under the lock), or None when it can. For an early,
        cheap refusal before any work."""
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            return f"output path {str(out_dir)!r} exists and is not a folder; choose another --out."
        if resume:
            if not out_dir.is_dir():
                return f"--resume: {out_dir} does not exist; there is no run to continue there."
            if (
                not (out_dir / PENDING_NAME / RESULTS_NAME).is_file()
                and not (out_dir / RESULTS_NAME).is_file()
            ):
                return (
                    f"--resume: {out_dir} holds no run to continue (no results.json); start "
                    "a new run without --resume."
                )
        elif not overwrite and out_dir.is_dir():
            leftovers = [
                p for p in _entries(out_dir) if not (p.is_file() and _TEMPORARY.fullmatch(p.name))
            ]
            if leftovers:
                return (
                    f"output folder {str(out_dir)!r} already holds files; pass --overwrite to "
                    "replace a previous run's output there (the new run is written beside it "
                    "and swapped in only when it succeeds; other files are kept), --resume to "
                    "continue an interrupted run, or choose another folder with --out."
                )
        try:
            check_writable(out_dir)
        except OutputFolderError as e:
            return str(e)
        return None

    @classmethod
    def open(
        cls,
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        resume: bool = False,
        command: str = "",
    ) -> RunFolder:
        """Lock ``out_dir`` and choose where this run writes.

        - a new run (neither flag): ``out_dir`` must be missing or empty (it is created);
        - ``overwrite``: an empty folder is used as is; one holding files gets the new run
          in ``.hessspec-pending/`` (an older pending run there is discarded);
        - ``resume``: continues the pending run if there is one, else the run in
          ``out_dir``.

        In every case a swap cut short earlier is finished first and stale temporaries are
        removed.

        Raises:
            FolderBusyError: another run holds the folder.
            OutputFolderError: the folder cannot take this run (see :meth:`refusal`).
        """
        out_dir = Path(out_dir)
        message = cls.refusal(out_dir, overwrite=overwrite, resume=resume)
        if message:
            raise OutputFolderError(message)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputFolderError(f"cannot create {out_dir}: {e.strerror or e}.") from None
        lock = FolderLock(out_dir, command=command).acquire()
        try:
            folder = cls._choose(out_dir, lock, overwrite=overwrite, resume=resume)
        except BaseException:
            lock.release()
            raise
        return folder

    @classmethod
    def _choose(cls, out_dir: Path, lock: FolderLock, *, overwrite: bool, resume: bool):
        pending = out_dir / PENDING_NAME
        if (pending / COMMIT_JOURNAL).is_file():
            _finish_commit(out_dir, pending)
        removed = remove_stale_temporaries(out_dir)
        if pending.is_dir():
            removed += remove_stale_temporaries(pending)
        # checked again under the lock: another run may have written meanwhile
        message = cls.refusal(out_dir, overwrite=overwrite, resume=resume)
        if message:
            raise OutputFolderError(message)
        if resume:
            if (pending / RESULTS_NAME).is_file():
                work, resumed = pending, True
            else:
                work, resumed = out_dir, True
        else:
            resumed = False
            if pending.exists():
                shutil.rmtree(pending)  # an earlier unfinished --overwrite run: ours to drop
            work = pending if _entries(out_dir) else out_dir
            work.mkdir(exist_ok=True)
        folder = cls(out_dir, work, lock, resumed=resumed)
        folder.removed_temporaries = removed
        return folder

    def commit(self) -> None:
        """Make this run the folder's run. Without a pending folder there is nothing to do;
        otherwise the previous run's files are removed and this run's (those its
        results.json lists) moved in, results.json last, under a journal so that a swap cut
        short is finished by the next :meth:`open`.

        Raises:
            OutputFolderError: the pending run has no results.json listing its files
                (nothing is changed).
        """
        if not self.replaces:
            return
        new = listed_files(self.work_dir)
        if not new or RESULTS_NAME not in new:
            raise OutputFolderError(
                f"{self.work_dir} holds no complete results.json; the previous run in "
                f"{self.out_dir} is left as it was."
            )
        old = listed_files(self.out_dir) or []
        journal = {"old": old, "new": new}
        atomic_write_text(self.work_dir / COMMIT_JOURNAL, json.dumps(journal))
        _finish_commit(self.out_dir, self.work_dir)
        self.work_dir = self.out_dir

    def close(self) -> None:
        """Release the lock (the pending folder of an unfinished run stays for --resume)."""
        self.lock.release()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove_listed_files(folder: str | Path, names: list[str], keep: set[str] = frozenset()):
    """Remove the files (and ``/``-ended folders) ``names`` lists from ``folder``, but those
    in ``keep``, and the folders they leave empty; results.json first (the folder stops
    claiming a run before its files go)."""
    folder = Path(folder)
    names = [n for n in names if _safe_relative(n)]
    ordered = sorted(names, key=lambda n: n.rstrip("/") != RESULTS_NAME)
    for name in ordered:
        stripped = name.rstrip("/")
        if stripped in keep:
            continue
        target = folder / stripped
        if target.exists() or target.is_symlink():
            _remove(target)
            _remove_empty_parents(target, folder)


def _finish_commit(out_dir: Path, pending: Path) -> None:
    """Carry out (or finish) the swap that ``pending/.hessspec-commit.json`` describes;
    every step may already have been done by an earlier attempt."""
    journal = json.loads((pending / COMMIT_JOURNAL).read_text(encoding="utf-8"))
    old = [p for p in journal.get("old", []) if _safe_relative(p)]
    new = [p for p in journal.get("new", []) if _safe_relative(p)]
    results = out_dir / RESULTS_NAME
    if (pending / RESULTS_NAME).exists():
        results.unlink(missing_ok=True)  # the folder stops claiming the previous run first
    new_set = {p.rstrip("/") for p in new}
    remove_listed_files(out_dir, old, keep=new_set | {RESULTS_NAME})
    for name in sorted(new, key=lambda p: p.rstrip("/") == RESULTS_NAME):
        stripped = name.rstrip("/")
        source, target = pending / stripped, out_dir / stripped
        if not source.exists():
            continue  # moved by an earlier attempt
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and (target.is_dir() or source.is_dir()):
            _remove(target)
        os.replace(source, target)
    shutil.rmtree(pending, ignore_errors=True)
