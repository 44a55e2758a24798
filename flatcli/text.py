"""Text from files, paths and metadata, made safe to show on a terminal.

A file name or a metadata value is chosen by whoever made the file. Shown as it is, a
newline could forge a line of output, an escape sequence could drive the terminal, and
``[/]`` would be read as rich markup (and raise). Every such string goes through
:func:`plain` (printed directly) or :func:`markup_safe` (inside rich markup).
"""

from __future__ import annotations

import sys
import unicodedata
from typing import Any, TextIO


def plain(text: Any) -> str:
    """``str(text)`` with control and format characters (newlines, ESC, bidi overrides)
    written as visible escapes such as ``\\n`` and ``\\x1b``."""
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")
        else c
        for c in str(text)
    )


def markup_safe(text: Any) -> str:
    """:func:`plain`, with rich markup escaped: shown literally by ``Console.print``."""
    from rich.markup import escape

    return escape(plain(text))


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A ``warnings.showwarning`` that prints one ``warning: …`` line on stderr."""
    del category, filename, lineno, line
    print(f"warning: {plain(message)}", file=file or sys.stderr, flush=True)
