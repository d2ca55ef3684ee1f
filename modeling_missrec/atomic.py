"""Files and folders written so that a reader never sees half of them, and a killed writer loses nothing.

* :func:`write_atomically`: one file, through a temporary file in the same folder and `os.replace`
  (:func:`atomic_path` for a writer that needs the temporary file's name).
* :func:`replace_directory`: a whole folder, built beside its final name inside the same parent, swapped in.
* :func:`commit_files`: several files into a folder that holds other things too (the model files of an output
  folder that also holds checkpoints and logs). They are staged in a hidden folder *inside* the target (so no
  rename ever crosses a file system: the target may be a mount point, its parent read-only), a journal listing
  them is written atomically, then they are moved in. A kill before the journal leaves the previous files
  untouched; a kill after it is rolled forward by :func:`complete_interrupted_commit`, which every loader of a
  model folder calls first: a reader sees the previous set or the new one, never a mix.

Standard library only: the modeling file imports this module, so `save_pretrained` copies it for
`trust_remote_code` users.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

STAGING_DIR = ".staging"
JOURNAL_FILE = ".commit.json"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary file name in `path`'s folder for a writer that needs a name rather than content (a
    memory-mapped table, a library's own save); moved over `path` when the block ends, removed if it raises."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_atomically(
    path: str | os.PathLike, content: str | bytes | Iterable[str | bytes], fsync: bool = False
) -> None:
    """Write `content` (text as UTF-8, bytes, or text / byte chunks streamed one by one) to `path` through a
    temporary file in the same folder, then `os.replace` it over `path`: a reader, or a run killed mid-write,
    sees the old file or the new one, never half of one. `fsync` also flushes it to the disk before the rename.
    The project's one writer of whole files (the folder-level commits below build on it)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as out:
        chunks = [content] if isinstance(content, (str, bytes)) else content
        for chunk in chunks:
            out.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
        if fsync:
            out.flush()
            os.fsync(out.fileno())


def replace_directory(temporary: Path, final: Path) -> None:
    """Swap a fully written folder `temporary` (a sibling of `final`) into place; the previous one is removed
    only after the swap. A kill between the two renames leaves both complete folders under hidden names,
    which :func:`recover_directory` finds."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, final)


def recover_directory(final: Path, temporary: Path, complete_marker: str) -> Path | None:
    """The folder to read when `final` may be missing after a kill inside :func:`replace_directory`: `final`
    itself, else the newer `temporary` if it holds `complete_marker` (written last), else the previous one."""
    if final.exists():
        return final
    for candidate in (temporary, final.with_name(f".{final.name}.old")):
        if (candidate / complete_marker).exists():
            os.replace(candidate, final)
            return final
    return None


def staging_dir(folder: Path) -> Path:
    """A fresh, empty staging folder inside `folder` (a leftover of a killed writer is discarded)."""
    complete_interrupted_commit(folder)
    staging = Path(folder) / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit_files(folder: Path, staging: Path, extra: Mapping[str, str] | None = None) -> None:
    """Move every entry of `staging` (from :func:`staging_dir`) and the `extra` texts into `folder` as one set."""
    for name, text in (extra or {}).items():
        (staging / name).write_text(text, encoding="utf-8")
    names = sorted(path.name for path in staging.iterdir())
    write_atomically(Path(folder) / JOURNAL_FILE, json.dumps({"files": names}))
    complete_interrupted_commit(folder)


def complete_interrupted_commit(folder: str | os.PathLike) -> bool:
    """Finish the moves of a commit whose journal exists (a writer killed after staging everything). Returns
    whether there was one. Idempotent: a kill during the roll-forward is rolled forward again."""
    folder = Path(folder)
    journal = folder / JOURNAL_FILE
    if not journal.exists():
        return False
    staging = folder / STAGING_DIR
    try:
        names = json.loads(journal.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return True  # another process (a reader, another rank) finished it meanwhile
    for name in names:
        source, target, aside = staging / name, folder / name, folder / f".{name}.replaced"
        try:  # another process may be rolling the same journal forward: a vanished source is a done move
            if source.is_dir() and target.exists():
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(target, aside)
            os.replace(source, target)
        except FileNotFoundError:
            continue
    for name in names:
        shutil.rmtree(folder / f".{name}.replaced", ignore_errors=True)
    journal.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    return True


LOCK_FILE = ".lock"
_HELD_LOCKS: dict[str, int] = {}  # folder -> descriptor, for the life of this process


def hold_lock(folder: str | os.PathLike) -> None:
    """Take `folder`'s writer lock for the rest of this process (an advisory `flock` on `folder/.lock`, which
    the operating system releases when the process ends, killed or not). Another process holding it is an
    error naming its pid: two runs writing one output folder would clobber each other's checkpoints."""
    key = str(Path(folder).resolve())
    if key in _HELD_LOCKS:
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return
    path = Path(folder) / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 64).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise ValueError(
            f"{folder} is being written by another run (pid {holder}); wait for it to end, or give another --output_dir"
        ) from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    _HELD_LOCKS[key] = descriptor
