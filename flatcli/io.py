"""File helpers: atomic writes, output and input checks, and checksums."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import FlatcliError, UsageError


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], None], *, stream: bool = True
) -> Path:
    """Write a file so that readers see either the old file or the complete new one.

    ``write`` receives a temporary path in the same directory; on success it is fsynced
    and renamed over ``path``; on any failure it is removed and ``path`` is untouched.
    A file being replaced keeps its permission bits (and, where allowed, its owner).

    A symbolic link is replaced, never followed: the file it points to is left alone, even
    when the link was planted while the result was being computed. The system's own links
    (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``) are the exception: they, and a
    character device or FIFO named directly, are written in place, as a stream. A FIFO is
    written only once a process reads it (within :data:`FIFO_WAIT_S`; it never hangs).
    Any other non-regular target is refused.

    Args:
        path: The file.
        write: Writes the content to the path it is given.
        stream: False for files flatcli alone reads back (cache entries): anything but a
            directory is then replaced by name, nothing is written in place.

    Raises:
        FlatcliError: The directory does not exist or is not writable, or the target is a
            directory, block device or socket.
    """
    target = Path(path)
    how, st = _plan(target, stream=stream)
    if how.startswith("refuse"):
        raise FlatcliError(f"cannot write {target}: {how.removeprefix('refuse: ')}")
    if how == "stream":
        return _write_stream(target, write)
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
        _copy_mode(st if st is not None and stat.S_ISREG(st.st_mode) else None, tmp)
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


def _plan(target: Path, *, stream: bool = True) -> tuple[str, os.stat_result | None]:
    """How :func:`atomic_write` writes ``target``: ``("replace", lstat)`` or
    ``("stream", stat)``; a target it must not write is ``("refuse: why", ...)``."""
    st = _lstat_or_none(target)
    if st is None or stat.S_ISREG(st.st_mode):
        return "replace", st
    if stat.S_ISDIR(st.st_mode):
        return "refuse: a directory, not a regular file", st
    if not stream:
        return "replace", st
    if stat.S_ISLNK(st.st_mode):
        if not _system_link(target):
            return "replace", st  # a link is replaced, never written through
        st = _stat_or_none(target)
        if st is None:
            return "refuse: a link that points to nothing", None
        if stat.S_ISREG(st.st_mode):
            return "stream", st
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "stream", st
    return f"refuse: {_kind(st.st_mode)}, not a regular file", st


def _system_link(path: Path) -> bool:
    """A link only the system makes: in ``/dev`` (``/dev/stdout``) or a process's fd table."""
    parent = os.path.realpath(path.parent if str(path.parent) else ".")
    return parent == "/dev" or re.fullmatch(r"/proc/\d+(/task/\d+)?/fd", parent) is not None


def is_stream(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`atomic_write` writes ``path`` in place (a device, a FIFO, stdout):
    such an output gets no sidecar files, which would land beside it (in ``/dev``)."""
    try:
        return _plan(Path(path))[0] == "stream"
    except FlatcliError:  # unreadable: not a stream (writing it reports why)
        return False


def _lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise FlatcliError(f"cannot write {path}: {e.strerror or e}") from None


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()  # follows symbolic links
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise FlatcliError(f"cannot write {path}: {e.strerror or e}") from None


FIFO_WAIT_S = 5.0
"""How long a FIFO output waits for a process to read it."""


def _write_stream(target: Path, write: Callable[[Path], None]) -> Path:
    """A device or pipe has no old contents to protect: write it in place. A FIFO needs
    a reader within :data:`FIFO_WAIT_S` (polled without blocking), so a FIFO planted at
    an output's name cannot hang a run."""
    probe = None
    try:
        if stat.S_ISFIFO(target.stat().st_mode):
            probe = _fifo_reader(target)
        write(target)
    except OSError as e:
        raise FlatcliError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        if probe is not None:
            os.close(probe)
    return target


def _fifo_reader(fifo: Path) -> int:
    """A write end of ``fifo``, once a reader has opened it (else a one-line error)."""
    deadline = time.monotonic() + FIFO_WAIT_S
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        if time.monotonic() > deadline:
            raise FlatcliError(f"cannot write {fifo}: a FIFO that no process is reading")
        time.sleep(0.05)


def _copy_mode(old: os.stat_result | None, tmp: Path) -> None:
    """Give the new file the replaced file's permissions (a new file: 0666 less the umask)."""
    if old is None:
        os.chmod(tmp, 0o666 & ~_umask())
        return
    with contextlib.suppress(OSError):  # only root may give a file away; keep ours then
        os.chown(tmp, old.st_uid, old.st_gid)
    os.chmod(tmp, stat.S_IMODE(old.st_mode))


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


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
    how, _ = _plan(target)
    if how.startswith("refuse"):
        raise FlatcliError(f"cannot write {option} {target}: {how.removeprefix('refuse: ')}")
    if how == "stream":
        return target
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise UsageError(
            f"{option} {target.name}: the file name must end in {' or '.join(suffixes)}"
        )
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FlatcliError(f"cannot write {option} {target}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise FlatcliError(f"cannot write {option} {target}: directory {directory} is not writable")
    return target


def check_distinct(
    outputs: Sequence[tuple[str, str | os.PathLike[str] | None]],
    inputs: Sequence[tuple[str, str | os.PathLike[str] | None]] = (),
) -> None:
    """Refuse an output that is one of the run's inputs, or another of its outputs.

    Two names are the same file when :func:`os.path.samefile` says so (hard and symbolic
    links included), or, for files not yet written, when they resolve to the same path.
    Streams (``/dev/null``, a FIFO) may repeat: writing them destroys nothing.

    Args:
        outputs: ``(option, path)`` of every file the run writes (None: not written).
        inputs: ``(what, path)`` of every file it reads.

    Raises:
        UsageError: Naming the two options.
    """
    seen: list[tuple[str, Path]] = []
    for option, out in outputs:
        if out is None or is_stream(out):
            continue
        out = Path(out)
        for what, source in inputs:
            if source is not None and _same_file(out, Path(source)):
                raise UsageError(
                    f"{option} {out} is {what}: writing it would destroy the input; "
                    "name another file"
                )
        for other_option, other in seen:
            if _same_file(out, other):
                raise UsageError(f"{option} {out} and {other_option} {other} are the same file")
        seen.append((option, out))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


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


def read_regular(
    path: str | os.PathLike[str], what: str, *, max_bytes: int, follow_links: bool = True
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, else a one-line error.

    Nothing that is not a regular file is opened (a FIFO would block, a device never
    end); the size is checked on the open file before anything is read, so a huge or
    sparse file costs nothing. With ``follow_links=False`` a symbolic link is refused too.

    Raises:
        FlatcliError: ``"{what} not found: …"``, or ``"{what} {path} is …"`` saying why.
    """
    path = Path(path)
    try:
        st = path.stat() if follow_links else path.lstat()
    except OSError:
        raise BadInput(f"{what} not found: {path}", "not found") from None

    def refuse(reason: str) -> BadInput:
        return BadInput(f"{what} {path} is {reason}", reason)

    if not stat.S_ISREG(st.st_mode):
        raise refuse(f"{_kind(st.st_mode)}, not a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO swapped in: no blocking
    flags |= 0 if follow_links else os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise refuse(f"unreadable ({e.strerror})" if e.strerror else "unreadable") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"{_kind(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise refuse(f"{_mib(st.st_size)}, more than the {_mib(max_bytes)} allowed")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise refuse(f"more than the {_mib(max_bytes)} allowed")
    return data


class BadInput(FlatcliError):
    """A file or text that cannot be read as what it should be.

    Attributes:
        reason: The short reason (``"a FIFO, not a regular file"``, ``"not JSON"``), for
            messages that name the file themselves.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def file_in_folder(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` when it is a regular file inside ``folder``, else a one-line error.

    ``name`` must be a plain file name, and the path it resolves to (after symbolic links)
    must lie inside the folder. The one exception is the Hugging Face hub cache, whose
    ``snapshots/REV/`` files are links into the same repository's ``blobs/`` folder.
    """
    shown = repr(name if len(name) <= 40 else name[:40] + "…")
    plain = name not in ("", ".", "..") and "/" not in name and "\\" not in name
    if not plain or "\0" in name:
        raise FlatcliError(f"{folder.name}: {what} {shown} is not a file name in the folder")
    path = folder / name
    real = Path(os.path.realpath(path))
    root = Path(os.path.realpath(folder))
    roots = [root]
    if root.parent.name == "snapshots":  # the hub cache: <repo>/snapshots/<rev> -> <repo>/blobs
        roots.append(root.parent.parent / "blobs")
    if not any(real.is_relative_to(r) for r in roots):
        raise FlatcliError(f"{folder.name}: {what} {shown} points outside the folder")
    return check_regular_file(path, what)


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


def atomic_write_text(path: str | os.PathLike[str], text: str, *, stream: bool = True) -> Path:
    """Atomically write a UTF-8 text file (see :func:`atomic_write`)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), stream=stream)


def sidecar(path: str | os.PathLike[str], suffix: str) -> Path | None:
    """The file ``STEM<suffix>`` written beside an output, or None when the output is a
    stream (``/dev/null``, a FIFO): its sidecars would land beside it, in ``/dev``."""
    path = Path(path)
    return None if is_stream(path) else path.with_name(f"{path.stem}{suffix}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
