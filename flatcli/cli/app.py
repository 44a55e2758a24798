"""The Typer application and its root callback; commands register themselves on import."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="flatcli",
    help="How flat is a trained PyTorch model's minimum? Relative flatness (Petzka et al. 2021),"
    " the classic alternatives, their correlation with generalization, and FAM fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"flatcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """How flat is a trained PyTorch model's minimum?"""



def main() -> None:
    """Console-script entry point."""
    app()
