"""One self-contained HTML page per result: ``measure``, ``audit``, ``correlate``, ``finetune``.

The page is rendered from the same result dict the command writes with ``--format json``
(:func:`render_html`), so ``flatcli report results.json`` and a command's ``--report``
give the same page. It is a single file that loads nothing: figures are matplotlib SVGs
(PNG for the fine-tuning curves) inlined as ``data:`` URIs with alt text, the CSS and the
few lines of JavaScript that sort the tables are inlined, and a Content-Security-Policy
forbids any other load. The page reads without JavaScript and prints cleanly. The result's
JSON is embedded too, so the page can be rendered again (:func:`load_result` reads it).

Everything taken from the result (file names, checkpoint metadata, measure names) is
escaped by Jinja2's autoescaping: a result is treated as untrusted input.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FlatcliError
from ..io import atomic_write_text
from . import blocks as b
from . import pages

if TYPE_CHECKING:
    from ..finetune import FinetuneResult

SCHEMAS = {
    "flatcli.measure/1": "measure",
    "flatcli.audit/1": "audit",
    "flatcli.correlate/1": "correlate",
    "flatcli.finetune/1": "finetune",
}
"""Result schemas a page can be rendered from, and the command that writes each."""

FINETUNE_SCHEMA = "flatcli.finetune/1"
MAX_RESULT_BYTES = 256 << 20
"""Largest result file or page :func:`load_result` reads (a page inlines its figures)."""
RESULT_ELEMENT_ID = "flatcli-result"
"""``id`` of the ``<script type="application/json">`` element holding the result."""


def render_html(
    result: Mapping[str, Any], *, color_by: str | None = None, log_x: bool = False
) -> str:
    """The page of one result, as an HTML string.

    Args:
        result: A result dict as written by ``--format json`` (``schema`` one of
            :data:`SCHEMAS`), or by :func:`finetune_result`.
        color_by: For ``correlate``: the column (a hyperparameter, with or without its
            ``hp_`` prefix) that colors the scatter points. Default: the first varied
            hyperparameter.
        log_x: For ``correlate``: logarithmic measure axes in the scatter grids.

    Returns:
        The complete page.

    Raises:
        FlatcliError: The result has no known schema or lacks what its page needs.
    """
    kind = _kind(result)
    # Render what the JSON holds (NaN as null, numpy numbers as plain ones): a page from
    # --report and one from its saved JSON are then the same, byte for byte.
    from ..report import to_json

    result = json.loads(to_json(result))
    try:
        if kind == "measure":
            page = pages.measure_page(result)
        elif kind == "audit":
            page = pages.audit_page(result)
        elif kind == "correlate":
            page = pages.correlate_page(result, color_by=color_by, log_x=log_x)
        else:
            page = pages.finetune_page(result)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FlatcliError(
            f"the {kind} result is incomplete or malformed ({type(e).__name__}: {e})"
        ) from None
    return _render(result, kind, page)


def write_html(
    path: str | Path,
    result: Mapping[str, Any],
    *,
    color_by: str | None = None,
    log_x: bool = False,
) -> Path:
    """Render :func:`render_html` and write it atomically to ``path``."""
    return atomic_write_text(path, render_html(result, color_by=color_by, log_x=log_x))


def load_result(path: str | Path) -> dict[str, Any]:
    """A saved result: a ``--format json`` file, or a page written by flatcli.

    Raises:
        FlatcliError: The file is missing, unreadable, not JSON (nor a flatcli page), or
            has no known schema.
    """
    from ..io import read_regular
    from ..untrusted import parse_json

    path = Path(path)
    data = read_regular(path, "result file", max_bytes=MAX_RESULT_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FlatcliError(f"cannot read {path}: not UTF-8 text") from None
    if text.lstrip()[:1] == "<":
        text = _embedded_json(text)
        if text is None:
            raise FlatcliError(f"{path} is an HTML file without an embedded flatcli result")
    result = parse_json(text, str(path), max_bytes=MAX_RESULT_BYTES)
    if not isinstance(result, dict):
        raise FlatcliError(f"{path} does not hold a flatcli result (a JSON object)")
    _kind(result, source=str(path))
    return result


def finetune_result(result: FinetuneResult, *, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON shape (:meth:`FinetuneResult.to_dict`, schema ``flatcli.finetune/1``) of a
    fine-tuning run with ``manifest`` as its run manifest, for its page.

    Args:
        result: What :func:`flatcli.finetune.finetune` returned.
        manifest: The run manifest (:func:`flatcli.runtime.manifest`).
    """
    from dataclasses import replace

    return replace(result, manifest=dict(manifest)).to_dict()


def command_line(argv: Sequence[str] | str | None) -> str | None:
    """The shell command line of a recorded ``argv`` (None when not recorded)."""
    if argv is None:
        return None
    if isinstance(argv, str):
        return argv
    return shlex.join(str(a) for a in argv)


def _render(result: Mapping[str, Any], kind: str, page: Mapping[str, Any]) -> str:
    from markupsafe import Markup

    from .. import __version__

    env = _environment()
    script = env.loader.get_source(env, "report.js")[0]  # type: ignore[union-attr]
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    manifest = result.get("manifest") or {}
    return env.get_template("page.html.j2").render(
        kind=kind,
        schema=result.get("schema"),
        version=__version__,
        command=command_line(manifest.get("argv")),
        manifest_blocks=_manifest_blocks(result),
        result_json=Markup(_script_json(result)),
        script=Markup(script),
        script_hash=f"sha256-{digest}",
        **page,
    )


def _environment():  # noqa: ANN202 - a jinja2.Environment, imported lazily
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("flatcli.html", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["wbr"] = _wbr
    return env


def _wbr(text: Any) -> Any:
    """Escape ``text`` and allow line breaks after underscores (long measure names)."""
    from markupsafe import Markup, escape

    return Markup("_<wbr>").join(escape(str(text)).split("_"))


def _manifest_blocks(r: Mapping[str, Any]) -> list[dict[str, Any]]:
    # argv is the command line above; the JSON at the end has it as recorded.
    manifest = {k: v for k, v in (r.get("manifest") or {}).items() if k != "argv"}
    blocks: list[dict[str, Any]] = [
        b.kv_table(manifest.items(), "manifest", caption="Versions, device, dtype and seed.")
    ]
    sums = _checksums(r)
    if sums:
        blocks.append(
            b.table(
                ["file", "role", "sha256"],
                [
                    [b.text_cell(f, cls="name"), b.text_cell(role), b.text_cell(s, cls="mono")]
                    for f, role, s in sums
                ],
                caption="Checksums of every file the result depends on.",
                id="checksums",
                sortable=False,
            )
        )
    for key in ("config", "hparams", "audit"):
        if isinstance(r.get(key), Mapping) and r[key]:
            blocks.append(b.kv_table(r[key].items(), "option", caption=f"Options ({key})."))
    blocks.append({"kind": "details", "summary": "The whole manifest as JSON",
                   "blocks": [{"kind": "pre", "text": b.json_text(r.get("manifest") or {})}]})
    return blocks


def _checksums(r: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    ck = r.get("checkpoint")
    if isinstance(ck, Mapping):
        if ck.get("sha256"):
            out.append((str(ck.get("path")), "checkpoint", str(ck["sha256"])))
        if ck.get("parent_sha256"):
            out.append(("(the starting checkpoint)", "input", str(ck["parent_sha256"])))
        if ck.get("output_sha256"):
            out.append((str(ck.get("output")), "output", str(ck["output_sha256"])))
    for row in r.get("checkpoints") or []:
        if isinstance(row, Mapping) and row.get("sha256"):
            out.append((str(row.get("path") or row.get("checkpoint")), "checkpoint",
                        str(row["sha256"])))
    return out


def _kind(result: Mapping[str, Any], *, source: str = "the result") -> str:
    schema = result.get("schema") if isinstance(result, Mapping) else None
    if schema not in SCHEMAS:
        known = ", ".join(SCHEMAS)
        raise FlatcliError(
            f"{source} has schema {schema!r}; a page can be rendered from: {known}"
        )
    return SCHEMAS[schema]


def _script_json(result: Mapping[str, Any]) -> str:
    """The result as JSON that is safe inside a ``<script>`` element."""
    from ..report import to_json

    text = to_json(result)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


class _ResultFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.found: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script" and ("id", RESULT_ELEMENT_ID) in attrs and self.found is None:
            self.inside, self.found = True, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.inside = False

    def handle_data(self, data: str) -> None:
        if self.inside and self.found is not None:
            self.found.append(data)


def _embedded_json(text: str) -> str | None:
    finder = _ResultFinder()
    finder.feed(text)
    finder.close()
    return None if finder.found is None else "".join(finder.found)
