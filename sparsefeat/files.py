"""Writing files safely: one atomic-write helper, one writer lock, one check of an output path.

Every output of sparsefeat (stores, results files, checkpoints, figures, reports) goes through
`atomic_path`: the content is written to a hidden temporary file in the same folder, flushed to disk
and renamed over the target only when complete, so a reader never sees half a file and a crash never
destroys the previous one. Errors of the file system (a full disk, a read-only folder, a path that is
a folder) become one-line `OutputError`s that name the file and say what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from .errors import SparsefeatError


class OutputError(SparsefeatError):
    """An output cannot be written: it exists, is an input, is a folder, or the disk refuses it."""


def temporary_path(path: Path) -> Path:
    """The hidden sibling that `atomic_path` writes to (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def describe_os_error(path: str | os.PathLike, e: OSError, *, resumable: bool = False) -> str:
    """One line for an OSError met while writing `path` (no traceback, no errno soup)."""
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        advice = "; free space and run again with --resume" if resumable else "; free space and run again"
        return f"{path}: no space left on the device{advice}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: permission denied (is the folder read-only?)"
    if code == errno.EISDIR:
        return f"{path}: is a folder, not a file"
    if code == errno.ENOTDIR:
        return f"{path}: a part of this path is a file, not a folder"
    if code == errno.ENAMETOOLONG:
        return f"{path}: file name too long"
    text = (e.strerror or str(e) or type(e).__name__).splitlines()[0]
    return f"{path}: cannot write ({text})"


def is_disk_full(e: BaseException) -> bool:
    """True for the errors a full disk raises, including HDF5's, which often hide the errno."""
    if isinstance(e, OSError) and getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return "no space left" in text or "disk quota" in text


def check_free_space(path: str | os.PathLike, nbytes: int, *, resumable: bool = False) -> None:
    """Refuse to start a write of about `nbytes` into `path`'s folder when the disk lacks the room.
    Cheap (one statvfs); writers call it before each block so a full disk stops them with a line, not a
    signal from inside HDF5."""
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder if folder.exists() else Path.cwd()).free
    except OSError:
        return  # cannot tell: the write itself will report
    if free < nbytes:
        advice = "; free space and run again with --resume" if resumable else "; free space and run again"
        raise OutputError(f"{path}: no space left on the device (need about {human_bytes(nbytes)}, "
                          f"{human_bytes(free)} free){advice}")


def human_bytes(n: float) -> str:
    """A byte count for people: 512 B, 3.2 MB, 1.5 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(path: str | os.PathLike, *, force: bool = False, inputs: Iterable[str | os.PathLike] = (),
                 allow_existing: bool = False) -> Path:
    """Check an output file path before any work starts; returns it as a Path.

    Refused, each with one line: a path that is not valid text, an existing folder, one of the inputs
    (even with `force`: overwriting the input would destroy it), an existing file without `force`
    (unless `allow_existing`, e.g. when resuming), a folder that cannot be created or written.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(f"{text.encode('utf-8', 'replace').decode()}: the path is not valid UTF-8 text") from None
    if not text:
        raise OutputError("the output path is empty")
    path = Path(text)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file path")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise OutputError(f"{path}: is also an input of this command; writing it would destroy the input")
    if path.exists() and not force and not allow_existing:
        raise OutputError(f"{path}: already exists; pass --force to overwrite it")
    check_folder_writable(path.parent)
    return path


def check_folder_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and make sure files can be created in it (one line otherwise)."""
    folder = Path(folder) if os.fspath(folder) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(describe_os_error(folder, e)) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: permission denied (is the folder read-only?)")
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = True, resumable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is flushed and renamed to `path`.

    On any error the temporary file is removed and `path` is left as it was. OS errors (full disk,
    read-only folder) are re-raised as one-line `OutputError`s. `force=False` refuses an existing path.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file path")
    if path.exists() and not force:
        raise OutputError(f"{path}: already exists; pass --force to overwrite it")
    check_folder_writable(path.parent)
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(describe_os_error(path, e, resumable=resumable)) from None
    except OutputError:
        raise  # already one line naming its own file (e.g. a nested atomic_path): keep it
    except Exception as e:
        if is_disk_full(e):
            raise OutputError(describe_os_error(path, OSError(errno.ENOSPC, "no space"), resumable=resumable)) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str, *, force: bool = True) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = True) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


class WriterLock:
    """An exclusive advisory lock (`<file>.lock`, flock) held while a writer owns `target`, so a
    second writer (a `--resume` or `--force` started while the first still runs) fails at once
    instead of writing under the live one. Released on `release()` or when the process dies."""

    def __init__(self, target: str | os.PathLike, what: str = "file"):
        import fcntl
        target = Path(target)
        self.path = Path(str(target) + ".lock")
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(describe_os_error(self.path, e)) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise OutputError(f"{target}: another process is writing this {what} right now") from None

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False
