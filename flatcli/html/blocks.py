"""The building blocks of a page: tables, cells, figures, paragraphs, and number formats.

Each block is a plain dict that templates/blocks.html.j2 renders; a numeric cell shows
the formatted number and keeps the exact value in ``data-value`` (for sorting, and for
tests that compare the page with the JSON).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RELATIVE_STDERR_FLAG = 0.1
"""A measure whose standard error exceeds this fraction of its value is flagged."""


def table(
    columns: Sequence[str | tuple[str, str]],
    rows: list[list[dict[str, Any]]],
    *,
    caption: str | None = None,
    id: str | None = None,  # noqa: A002 - the HTML attribute
    sortable: bool = True,
    layout: str = "stack",
) -> dict[str, Any]:
    """A table block; ``layout`` on a phone: ``stack`` (a card per row) or ``scroll``."""
    cols = [
        {"label": c, "cls": None, "title": None}
        if isinstance(c, str)
        else {"label": c[0], "cls": c[1], "title": None}
        for c in columns
    ]
    return {"kind": "table", "columns": cols, "rows": rows, "caption": caption, "id": id,
            "sortable": sortable and len(rows) > 1, "layout": layout}


def kv_table(items: Iterable[tuple[Any, Any]], what: str, caption: str | None = None) -> dict:
    return table(
        [what, "value"],
        [[text_cell(str(k), cls="name"), text_cell(plain(v), cls="mono")] for k, v in items],
        caption=caption,
        sortable=False,
        layout="kv",
    )


def cell(
    text: Any,
    *,
    value: Any = None,
    cls: str | None = None,
    title: str | None = None,
    flags: Sequence[str] = (),
    more: Sequence[tuple[str, str]] = (),
    sub: str | None = None,
    text_if_empty: str | None = None,
) -> dict[str, Any]:
    if (text is None or text == "") and not flags and text_if_empty is not None:
        text, cls = text_if_empty, "none"
    return {"text": text, "value": value, "cls": cls, "title": title, "flags": list(flags),
            "more": list(more), "sub": sub}


def paragraph(text: str, *, cls: str | None = None) -> dict[str, Any]:
    return {"kind": "p", "text": text, "cls": cls}


def text_cell(text: Any, *, cls: str | None = None, title: str | None = None) -> dict[str, Any]:
    return cell(None if text is None else str(text), cls=cls, title=title)


def num(x: float | None, *, fmt: Any = None) -> dict[str, Any]:
    """A numeric cell: the formatted number, with the exact value in ``data-value``."""
    from ..report import format_value

    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return cell("n/a", value="", cls="num none")
    return cell((fmt or format_value)(x), value=repr(float(x)), cls="num")


def int_cell(x: Any) -> dict[str, Any]:
    if missing(x):
        return cell("n/a", value="", cls="num none")
    return cell(str(int(x)), value=str(int(x)), cls="num")


def stderr_cell(est: Mapping[str, Any]) -> dict[str, Any]:
    """The standard error, ``exact``, or ``bound hit`` as the terminal shows it."""
    from ..report import bound_hit, stderr_text

    if bound_hit(est):
        return cell(stderr_text(est.get("stderr"), est), value="", cls="num none",
                    title="the search ended at its bound: the value is only a bound")
    if est.get("stderr") is None:
        return cell("exact", value="", cls="num none")
    return num(est["stderr"])


def corr_cell(row: Any, stat: str) -> dict[str, Any]:
    """A correlation and, on a second line, its confidence interval (or ``no CI`` when
    every bootstrap resample gave the same value)."""
    cell = num(nan_none(row.get(stat)), fmt=corr)
    lo, hi = nan_none(row.get(f"{stat}_lo")), nan_none(row.get(f"{stat}_hi"))
    degenerate = row.get("bootstrap_degenerate")
    if isinstance(degenerate, str) and stat in degenerate.split(","):
        cell["sub"] = "no CI"
        cell["title"] = "every bootstrap resample gave the same value: a degenerate bootstrap"
    elif lo is not None and hi is not None:
        cell["sub"] = f"[{corr(lo)}, {corr(hi)}]"
        cell["title"] = f"CI {lo!r} to {hi!r}"
    return cell


def invariant(flag: bool | None) -> dict[str, Any]:
    if flag is None:
        return cell("n/a", cls="none")
    return cell("yes" if flag else "no", cls="yes" if flag else "no")


def flags(est: Mapping[str, Any]) -> list[str]:
    """Degenerate or doubtful values, in words: what a reader should not take at face value."""
    flags = [str(w) for w in est.get("warnings") or []]
    value, stderr = est.get("value"), est.get("stderr")
    if value is None:
        flags.append("no finite value (NaN or infinite)")
    elif value == 0:
        flags.append("exactly 0")
    elif stderr is not None and abs(stderr) > RELATIVE_STDERR_FLAG * abs(value):
        flags.append(f"stderr is {abs(stderr / value):.0%} of the value")
    if est.get("converged") is False:
        flags.append("did not converge")
    if est.get("hit_sigma_max"):
        flags.append("σ′ hit the search bound")
    if est.get("dead_units"):
        handling = est.get("dead_unit_handling")
        flags.append(f"{est['dead_units']} dead unit(s)" + (f", {handling}" if handling else ""))
    return flags


def details(est: Mapping[str, Any]) -> list[tuple[str, str]]:
    keep = ("value", "stderr", "method", "warnings")
    return [(str(k), plain(v)) for k, v in est.items() if k not in keep]


def svg_figure(fig: Figure, *, alt: str, caption: str, wide: bool = False) -> dict[str, Any]:
    from ..plots import figure_bytes

    w, h = fig.get_size_inches()
    data = base64.b64encode(figure_bytes(fig, "svg")).decode("ascii")
    return {
        "kind": "figure",
        "src": f"data:image/svg+xml;base64,{data}",
        "alt": alt,
        "caption": caption,
        "width": round(w * 96),
        "height": round(h * 96),
        "wide": wide,
    }


def json_text(obj: Any) -> str:
    from ..report import to_json

    return to_json(obj).rstrip("\n")


def plain(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v, ensure_ascii=False)


def corr(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def sci(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def nan_none(x: Any) -> float | None:
    if missing(x):
        return None
    return float(x)


def missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def is_numeric(col: Any) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(col)) and not pd.api.types.is_bool_dtype(col)


def file_name(path: Any) -> str:
    return Path(str(path)).name if path else "result"


def layer_text(layer: Mapping[str, Any]) -> str:
    text = str(layer.get("name"))
    if layer.get("type"):
        text += f" ({layer['type']}"
        if layer.get("shape"):
            text += ", weight " + " × ".join(str(s) for s in layer["shape"])
        text += ")"
    return text


def data_text(data: Mapping[str, Any]) -> str:
    return f"{data.get('source')}, {data.get('split')} split, n = {data.get('n_samples')}"
