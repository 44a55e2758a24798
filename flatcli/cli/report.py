"""``flatcli report``: a saved result as one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .common import friendly, write_page
from .options import ColorByOpt, LogXOpt


@app.command()
@friendly
def report(
    result: Annotated[
        Path,
        typer.Argument(
            help="A result saved with --format json (measure, audit, correlate), or a page "
            "written by --report.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="The HTML page to write, atomically (default: RESULT.html)."
        ),
    ] = None,
    color_by: ColorByOpt = None,
    log_x: LogXOpt = False,
) -> None:
    """Render a saved result as one self-contained HTML page: tables, figures, manifest.

    The page is the one --report writes: figures inline, nothing loaded from the network,
    readable without JavaScript, printable.

    Examples:

        flatcli measure sample_models/digits_mlp.safetensors --format json -o result.json

        flatcli report result.json -o page.html
    """
    from ..html import load_result
    from ..io import check_distinct, check_output

    saved = load_result(result)
    output = output or result.with_suffix(".html")
    check_output(output)
    check_distinct([("--output", output)], [("the result", result)])
    write_page(output, saved, color_by=color_by, log_x=log_x)
