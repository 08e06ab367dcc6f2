"""The output folder of a study run that is not the BatchNorm spectrum study (input bias,
Santurkar): every file written atomically, never over a file the run does not own, and a
previous run replaced whole.

:class:`StudyOutput` is a thin use of :mod:`hessspec.studies.common.runfolder`:

- every file goes through :func:`~hessspec.studies.common.runfolder.atomic_write_bytes`
  (a temporary file in the destination folder, fsync, ``os.replace``): an interrupt, a
  crash or a full disk never leaves half a file;
- :meth:`StudyOutput.claim` names the files of the run before any work; one that exists
  already raises FileExistsError (a study never writes over a file it did not create),
  unless ``overwrite`` says that the folder holds a previous run of the study to replace;
- a run that replaces a previous one is written beside it, into ``.hessspec-pending/``,
  and swapped in by :meth:`StudyOutput.commit` under the journal of
  :meth:`RunFolder.commit <hessspec.studies.common.runfolder.RunFolder.commit>`: the
  previous run's files (those its results.json lists) are removed, the new ones moved in,
  results.json last; a run interrupted before that leaves the previous run as it was, and
  any other file of the folder is never touched.

The folder lock (:class:`~hessspec.studies.common.runfolder.FolderLock`) is the caller's:
the CLI holds it for the whole run.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hessspec.studies.common.jsonio import dumps
from hessspec.studies.common.runfolder import (
    COMMIT_JOURNAL,
    PENDING_NAME,
    FolderLock,
    RunFolder,
    _finish_commit,  # no public name yet for finishing a swap cut short
    atomic_write_bytes,
)

__all__ = ["StudyOutput"]


class StudyOutput:
    """Writes one study run's files into ``out_dir`` (see the module docstring).

    Args:
        out_dir: the output folder (created if missing).
        overwrite: the files named in :meth:`claim` may be replaced (a previous run of the
            study); the new run is then swapped in whole by :meth:`commit`.

    Attributes:
        work_dir: where the files go: ``out_dir``, or ``out_dir/.hessspec-pending`` while a
            previous run is being replaced.
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.work_dir = self.out_dir
        self.overwrite = bool(overwrite)
        self._replaceable: set[str] = set()
        self._written: set[str] = set()

    def claim(self, names: Iterable[str]) -> None:
        """Reserve the run's files (paths relative to ``out_dir``).

        Raises:
            FileExistsError: one of them exists and ``overwrite`` is off; the message names
                them.
        """
        names = list(names)
        taken = [n for n in names if (self.out_dir / n).exists()]
        if taken and not self.overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds {taken}: a study never overwrites files it did "
                "not create; choose a fresh output folder (or pass --overwrite to replace a "
                "previous run of this study there)."
            )
        if self.overwrite:
            self._replaceable.update(names)
        pending = self.out_dir / PENDING_NAME
        if (pending / COMMIT_JOURNAL).is_file():
            _finish_commit(self.out_dir, pending)  # a swap cut short: finish it first
        if taken:
            shutil.rmtree(pending, ignore_errors=True)  # an unfinished replacement: drop it
            pending.mkdir(parents=True)
            self.work_dir = pending

    def _write(self, name: str, data: bytes) -> Path:
        target = self.out_dir / name
        ours = name in self._written or name in self._replaceable
        if target.exists() and not ours:
            raise FileExistsError(f"{target} exists and was not written by this run.")
        path = self.work_dir / name
        atomic_write_bytes(path, data)
        self._written.add(name)
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Write UTF-8 ``text`` to ``name``; returns the path written."""
        return self._write(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as strict JSON (:func:`hessspec.studies.common.jsonio.dumps`)."""
        return self.write_text(name, dumps(obj))

    def save_figure(self, name: str, fig) -> Path:
        """Write a matplotlib figure as PNG (120 dpi) to ``name``."""
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        return self._write(name, buffer.getvalue())

    def commit(self) -> None:
        """Swap a replacing run in (nothing to do for a run written in place); call it after
        results.json, which lists the run's files, is written."""
        if self.work_dir == self.out_dir:
            return
        RunFolder(self.out_dir, self.work_dir, FolderLock(self.out_dir), resumed=False).commit()
        self.work_dir = self.out_dir
