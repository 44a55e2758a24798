"""File helpers: atomic writes, output and input checks, and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from .errors import FlatcliError, UsageError


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write a file so that readers see either the old file or the complete new one.

    ``write`` receives a temporary path in the same directory; on success it is fsynced
    and renamed over ``path``; on any failure it is removed and ``path`` is untouched.
    A file being replaced keeps its permission bits (and, where allowed, its owner); a
    symbolic link is followed, so the file it points to is replaced, not the link. A
    character device or FIFO (``/dev/null``, ``/dev/stdout``, a named pipe) is written
    directly, as a stream; any other non-regular target is refused.

    Raises:
        FlatcliError: The directory does not exist or is not writable, or the target is a
            directory, block device or socket.
    """
    target = Path(path)
    st = _stat_or_none(target)
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            return _write_stream(target, write)
        raise FlatcliError(f"cannot write {target}: {_kind(st.st_mode)}, not a regular file")
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FlatcliError(f"cannot write {target}: directory {directory} does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise FlatcliError(f"cannot write {target}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _copy_mode(st, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FlatcliError(f"cannot write {target}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()  # follows symbolic links
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise FlatcliError(f"cannot write {path}: {e.strerror or e}") from None


def _write_stream(target: Path, write: Callable[[Path], None]) -> Path:
    """A device or pipe has no old contents to protect: write it in place."""
    try:
        write(target)
    except OSError as e:
        raise FlatcliError(f"cannot write {target}: {e.strerror or e}") from None
    return target


def _copy_mode(old: os.stat_result | None, tmp: Path) -> None:
    """Give the new file the replaced file's permissions (a new file: 0666 less the umask)."""
    if old is None:
        os.chmod(tmp, 0o666 & ~_umask())
        return
    with contextlib.suppress(OSError):  # only root may give a file away; keep ours then
        os.chown(tmp, old.st_uid, old.st_gid)
    os.chmod(tmp, stat.S_IMODE(old.st_mode))


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def check_output(
    path: str | os.PathLike[str],
    *,
    suffixes: tuple[str, ...] | None = None,
    option: str = "--output",
) -> Path:
    """Check, before any computation, that ``path`` can be written by :func:`atomic_write`.

    Args:
        path: The output file.
        suffixes: Allowed file name suffixes (lower case, with the dot), or None for any.
            A character device or FIFO is accepted whatever its name.
        option: The option that named the file, for the message.

    Raises:
        UsageError: A wrong suffix.
        FlatcliError: A missing or read-only directory, or a target that is a directory,
            block device or socket.
    """
    target = Path(path)
    st = _stat_or_none(target)
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            return target
        raise FlatcliError(f"cannot write {option} {target}: {_kind(st.st_mode)}")
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise UsageError(
            f"{option} {target.name}: the file name must end in {' or '.join(suffixes)}"
        )
    directory = Path(os.path.realpath(target)).parent if target.is_symlink() else target.parent
    directory = directory if str(directory) else Path(".")
    if not directory.is_dir():
        raise FlatcliError(f"cannot write {option} {target}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise FlatcliError(f"cannot write {option} {target}: directory {directory} is not writable")
    return target


def check_regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (after symbolic links), else a one-line error.

    A FIFO or device would block or never end; a directory cannot be read as a file.
    """
    try:
        st = path.stat()
    except OSError:
        raise FlatcliError(f"{what} not found: {path}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FlatcliError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
    return path


MAX_EXPANSION = 10
"""Largest ratio of a zip archive's declared uncompressed size to its size on disk."""


def check_archive_size(path: Path) -> None:
    """Refuse a zip archive (``torch.save``'s format) that would expand far beyond its size.

    ``torch.save`` stores its members uncompressed, so a real file's members add up to
    about its own size. The sizes are read from the zip directory, before anything is
    decompressed.

    Raises:
        FlatcliError: The declared sizes exceed :data:`MAX_EXPANSION` times the file size
            plus 16 MiB (a "zip bomb").
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            declared = sum(max(info.file_size, 0) for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not readable as a zip: torch.load reports it
    size = path.stat().st_size
    if declared > MAX_EXPANSION * size + (16 << 20):
        raise FlatcliError(
            f"refusing {path.name}: its zip directory declares {_mib(declared)} of data in a "
            f"{_mib(size)} file (a decompression bomb?)"
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write a UTF-8 text file."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
