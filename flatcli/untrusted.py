"""Reading what other people made, within limits: JSON, ``.npz`` archives, unpickled tensors.

Each reader checks sizes before it allocates and turns every failure into one
:class:`~flatcli.errors.FlatcliError` line:

* :func:`parse_json` and :func:`read_json`: at most :data:`MAX_JSON_BYTES` and
  :data:`MAX_JSON_DEPTH` levels of nesting (deeper JSON would exhaust Python's recursion
  limit), checked before parsing.
* :func:`check_npz`: a ``.npz`` archive's declared member sizes and ``.npy`` header shapes,
  before any array is decompressed.
* :func:`check_tensors`: what ``torch.load(weights_only=True)`` built. Its allowed globals
  still let a file alias one small storage into a huge tensor (zero strides), use sparse
  layouts, or share one container many times over so that a walk explodes.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any

from .errors import FlatcliError
from .io import BadInput, _mib, read_regular

MAX_JSON_BYTES = 64 << 20
"""Largest JSON file flatcli reads (a result, a ``config.json``, a shard index)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of lists and objects in any JSON flatcli reads."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON text (strings skipped), without parsing."""
    import numpy as np

    brackets = re.sub(r"[^\[\]{}]", "", _STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def parse_json(
    text: str | bytes,
    what: str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    error: type[FlatcliError] = FlatcliError,
) -> Any:
    """Parse JSON that came from a file or a user, within size and depth limits.

    Args:
        text: The JSON text (bytes must be UTF-8).
        what: What it is, starting the message (``"--arch-kwargs"``, ``"config.json"``).
        max_bytes: Largest accepted text.
        max_depth: Deepest accepted nesting.
        error: The exception type raised instead of :class:`~flatcli.io.BadInput` (e.g.
            :class:`~flatcli.errors.UsageError`).

    Raises:
        BadInput: ``"{what} is …"``: too large, too deep, not UTF-8 or not JSON.
    """

    def refuse(reason: str, detail: str = "") -> FlatcliError:
        message = f"{what} is {detail or reason}"
        return error(message) if error is not FlatcliError else BadInput(message, reason)

    if len(text) > max_bytes:
        raise refuse(f"{_mib(len(text))}, more than the {_mib(max_bytes)} allowed")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise refuse("not UTF-8", "not UTF-8 text") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise refuse(f"nested {depth} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{e.msg} at line {e.lineno} column {e.colno}"
        raise refuse("not JSON", f"not valid JSON: {where}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of 5000 digits
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise refuse("not usable JSON", f"not usable JSON: {first}") from None


def read_json(
    path: str | os.PathLike[str],
    what: str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    follow_links: bool = True,
) -> Any:
    """Read a JSON file: a regular file (:func:`flatcli.io.read_regular`), then
    :func:`parse_json`. Every problem is one line starting ``{what} {path}``."""
    data = read_regular(path, what, max_bytes=max_bytes, follow_links=follow_links)
    return parse_json(data, f"{what} {path}", max_bytes=max_bytes, max_depth=max_depth)


# --------------------------------------------------------------------------- .npz


MAX_NPZ_EXPANSION = 100
"""Largest ratio of a ``.npz`` archive's declared array bytes to its size on disk (plus
16 MiB). Compressed real data (images, padded token ids) stays far below it; a file of
zeros compressed a thousandfold is a decompression bomb."""


def check_npz(path: Path, *, available: int | None = None) -> None:
    """Refuse a ``.npz`` whose arrays would not fit, from its zip directory and ``.npy``
    headers alone (no array is decompressed).

    Every member must be a ``.npy`` array whose header shape and dtype account for the
    member's declared size. Their total must stay within :data:`MAX_NPZ_EXPANSION` times
    the file size plus 16 MiB, and within the available memory.

    Args:
        path: The archive.
        available: Bytes of memory the arrays may take (default: the free RAM).

    Raises:
        FlatcliError: A decompression bomb, a member that is not an array, or a header
            that disagrees with its declared size.
    """
    import numpy as np

    from .measures.budget import available_memory

    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            total = _npz_declared(path, z, infos, np)
    except FlatcliError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise FlatcliError(
            f"cannot read data file {path}: {(str(e).strip().splitlines() or ['?'])[0]}"
        ) from None
    size = path.stat().st_size
    if total > MAX_NPZ_EXPANSION * size + (16 << 20):
        raise FlatcliError(
            f"refusing {path.name}: its arrays declare {_mib(total)} in a {_mib(size)} file "
            "(a decompression bomb?); if the data is genuine, save it with np.savez "
            "(uncompressed)"
        )
    limit = available if available is not None else available_memory("cpu")
    if total > limit:
        raise FlatcliError(
            f"refusing {path.name}: its arrays take {_mib(total)}, more than the "
            f"{_mib(limit)} of memory available"
        )


def _npz_declared(path: Path, z: zipfile.ZipFile, infos: list, np: Any) -> int:
    """The array bytes the members declare, each checked against its ``.npy`` header."""
    from numpy.lib import format as npy

    total = 0
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise FlatcliError(f"{path.name}: member {info.filename[:40]!r} is not a .npy array")
        with z.open(info) as f:
            version = npy.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = npy.read_array_header_2_0(f)
            else:
                raise FlatcliError(
                    f"{path.name}: member {info.filename[:40]!r} has npy format {version}"
                )
            header = f.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        if dtype.hasobject or nbytes + header != info.file_size:
            raise FlatcliError(
                f"{path.name}: member {info.filename[:40]!r} declares {info.file_size} bytes "
                f"but its header says {tuple(shape)} {dtype}"
            )
        total += nbytes
    return total


# --------------------------------------------------------------------------- unpickled tensors


MAX_OBJECTS = 1_000_000
"""Most containers and tensors one loaded file may hold."""


def check_tensors(obj: Any, what: str) -> None:
    """Check what ``torch.load(weights_only=True)`` returned, before anything uses it.

    Every container is visited once (a file that shares one list many times over, or
    refers to itself, costs no more than its size). Every tensor must be dense (strided)
    and hold no more elements than its storage: zero or overlapping strides would let a
    small file stand for a huge tensor, allocated the moment it is copied.

    Raises:
        FlatcliError: Naming the first offending tensor.
    """
    import torch

    seen: set[int] = set()
    todo = [("", obj)]
    while todo:
        name, item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if len(seen) > MAX_OBJECTS:
            raise FlatcliError(f"{what} holds more than {MAX_OBJECTS:,} objects")
        if isinstance(item, torch.Tensor):
            _check_tensor(item, name or "a tensor", what)
        elif isinstance(item, dict):
            todo += [(f"{name}.{k}" if name else str(k), v) for k, v in item.items()]
        elif isinstance(item, (list, tuple, set)):
            todo += [(f"{name}[{i}]", v) for i, v in enumerate(item)]


def _check_tensor(t: Any, name: str, what: str) -> None:
    import torch

    shown = name if len(name) <= 60 else name[:60] + "…"
    if t.layout != torch.strided:
        raise FlatcliError(
            f"{what}: {shown} is a {str(t.layout).removeprefix('torch.')} tensor; "
            "save it dense (tensor.to_dense())"
        )
    if t.numel() == 0:
        return
    # The highest element the view can reach must lie inside its storage, and a view of
    # more elements than the storage holds repeats them (zero or overlapping strides).
    reach = t.storage_offset() + sum(
        (n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True)
    )
    held = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    if reach >= held or t.numel() > held:
        raise FlatcliError(
            f"{what}: {shown} claims {t.numel():,} values but its storage holds {held:,} "
            "(a crafted file?)"
        )
