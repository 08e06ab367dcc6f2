"""The run folder: one writer at a time, leftovers of killed runs removed, a new run swapped
in whole (and only over the files the previous run wrote), files with the umask's mode.
File-system only: no JAX, no training."""

import errno
import json
import os
import stat

import pytest

from hessspec.studies.common.runfolder import (
    COMMIT_JOURNAL,
    LOCK_NAME,
    PENDING_NAME,
    FolderBusyError,
    FolderLock,
    OutputFolderError,
    OutputWriteError,
    RunFolder,
    atomic_write_text,
    check_writable,
    is_disk_full,
    remove_stale_temporaries,
)


def _fake_run(folder, files, tag):
    """Write the files of a run (``files``: paths, folders ending in ``/``) holding ``tag``,
    and its results.json listing them."""
    for name in files:
        path = folder / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            (path / "state").write_text(tag)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(tag)
    listed = sorted({*files, "results.json"})
    (folder / "results.json").write_text(json.dumps({"tag": tag, "files": listed}))


def test_atomic_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
        os.umask(0o002)
        atomic_write_text(tmp_path / "b.txt", "x")
        assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_a_second_writer_is_refused_and_a_reader_shares(tmp_path):
    first = FolderLock(tmp_path, command="python -m hessspec.run --out x").acquire()
    with pytest.raises(FolderBusyError, match=r"being written by another hessspec run \(process"):
        FolderLock(tmp_path).acquire()
    with pytest.raises(FolderBusyError, match="another hessspec run"):
        RunFolder.open(tmp_path, overwrite=True)
    with pytest.raises(FolderBusyError):
        FolderLock(tmp_path, shared=True).acquire()  # no reading while it is written
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    readers = [FolderLock(tmp_path, shared=True).acquire() for _ in range(2)]
    with pytest.raises(FolderBusyError, match="being read"):
        FolderLock(tmp_path).acquire()
    for r in readers:
        r.release()
    with FolderLock(tmp_path):
        pass


def test_a_killed_runs_lock_file_does_not_block(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"pid": 1}')  # left by kill -9: no flock is held
    with RunFolder.open(tmp_path) as folder:  # the folder counts as empty
        assert folder.work_dir == tmp_path and not folder.replaces


def test_refusals(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    message = RunFolder.refusal(tmp_path)
    assert "already holds files" in message and "--overwrite" in message and "--resume" in message
    assert "no run to continue" in RunFolder.refusal(tmp_path, resume=True)
    assert "does not exist" in RunFolder.refusal(tmp_path / "nope", resume=True)
    assert "not a folder" in RunFolder.refusal(tmp_path / "notes.txt")
    with pytest.raises(OutputFolderError, match="already holds files"):
        RunFolder.open(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written


def test_check_writable(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "deeper")  # created later: its parent is writable
    assert not (tmp_path / "new").exists()
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OutputFolderError, match="cannot write to .*Permission denied"):
        check_writable(tmp_path)
    assert "cannot write to" in RunFolder.refusal(tmp_path / "out", overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):  # pragma: no cover - not run as root
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        assert "cannot write to" in RunFolder.refusal(tmp_path / "ro")
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_stale_temporaries_are_removed(tmp_path):
    _fake_run(tmp_path, ["spectra.npz", "figures/density.png", "checkpoints/10/mlp/"], "old")
    stale = [
        tmp_path / ".spectra.npz.k2j4_x9q.tmp",
        tmp_path / "figures" / ".density.png.abcdefgh.tmp",
        tmp_path / "checkpoints" / "20" / "mlp.orbax-checkpoint-tmp-1234",
    ]
    stale[0].write_bytes(b"half")
    stale[1].write_bytes(b"half")
    stale[2].mkdir(parents=True)
    keep = [tmp_path / ".my-hidden-notes.tmp", tmp_path / "figures" / "mine.png"]
    for k in keep:
        k.write_text("user")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(k.exists() for k in keep)
    assert (tmp_path / "checkpoints" / "10" / "mlp" / "state").exists()
    with RunFolder.open(tmp_path, resume=True) as folder:  # opening removes them too
        assert folder.resumed and folder.work_dir == tmp_path


def test_overwrite_swaps_in_only_the_run_files(tmp_path):
    """--overwrite: the new run goes to the pending folder; the previous run stays whole
    until the commit; the commit removes exactly the files the previous run listed, moves
    the new ones in and keeps the user's files."""
    old_files = ["spectra.npz", "report.md", "figures/density.png", "figures/extra.png",
                 "checkpoints/0/mlp/", "checkpoints/5/mlp/"]  # fmt: skip
    _fake_run(tmp_path, old_files, "old")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "figures" / "mine.png").write_text("mine")
    folder = RunFolder.open(tmp_path, overwrite=True)
    assert folder.replaces and folder.work_dir == tmp_path / PENDING_NAME
    new_files = ["spectra.npz", "report.md", "figures/density.png", "checkpoints/0/mlp/"]
    _fake_run(folder.work_dir, new_files, "new")
    assert json.loads((tmp_path / "results.json").read_text())["tag"] == "old"  # untouched
    folder.commit()
    folder.close()
    assert not (tmp_path / PENDING_NAME).exists()
    assert json.loads((tmp_path / "results.json").read_text())["tag"] == "new"
    for name in new_files:
        path = tmp_path / name
        assert (path / "state" if name.endswith("/") else path).read_text() == "new"
    assert not (tmp_path / "figures" / "extra.png").exists()
    assert not (tmp_path / "checkpoints" / "5").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "figures" / "mine.png").read_text() == "mine"


def test_a_swap_cut_short_is_finished_by_the_next_run(tmp_path):
    """kill -9 in the middle of a swap: the journal lets the next open finish it."""
    _fake_run(tmp_path, ["spectra.npz", "figures/old.png"], "old")
    pending = tmp_path / PENDING_NAME
    pending.mkdir()
    _fake_run(pending, ["spectra.npz", "figures/density.png"], "new")
    journal = {
        "old": json.loads((tmp_path / "results.json").read_text())["files"],
        "new": json.loads((pending / "results.json").read_text())["files"],
    }
    (pending / COMMIT_JOURNAL).write_text(json.dumps(journal))
    # the killed swap had already removed results.json and moved spectra.npz
    (tmp_path / "results.json").unlink()
    os.replace(pending / "spectra.npz", tmp_path / "spectra.npz")
    with RunFolder.open(tmp_path, resume=True) as folder:
        assert folder.work_dir == tmp_path
    assert json.loads((tmp_path / "results.json").read_text())["tag"] == "new"
    assert (tmp_path / "figures" / "density.png").read_text() == "new"
    assert not (tmp_path / "figures" / "old.png").exists() and not pending.exists()


def test_resume_prefers_the_pending_run_and_commit_needs_its_results(tmp_path):
    _fake_run(tmp_path, ["spectra.npz"], "old")
    pending = tmp_path / PENDING_NAME
    pending.mkdir()
    with RunFolder.open(tmp_path, resume=True) as folder:  # pending without results.json
        assert folder.work_dir == tmp_path
    _fake_run(pending, ["spectra.npz"], "interrupted new")
    with RunFolder.open(tmp_path, resume=True) as folder:
        assert folder.work_dir == pending and folder.replaces
        (pending / "results.json").unlink()
        with pytest.raises(OutputFolderError, match="left as it was"):
            folder.commit()
    assert json.loads((tmp_path / "results.json").read_text())["tag"] == "old"


def test_is_disk_full():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OutputWriteError(errno.EDQUOT, "quota"))
    wrapped = ValueError("tensorstore: ... No space left on device [OS error 28]")
    assert is_disk_full(wrapped)
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as e:
        assert is_disk_full(e)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
