"""The Typer application and its root callback; commands register themselves on import."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup


class _FlagHelp:
    """``--help`` is a flag: no ``<bool>`` type next to it in the help (as for our flags)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option


class _Command(_FlagHelp, TyperCommand):
    pass


class _Group(_FlagHelp, TyperGroup):
    pass


class _App(typer.Typer):
    """A Typer app whose commands are :class:`_Command` unless they name another class."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(
    cls=_Group,
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
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the version and exit.",
            metavar="",
        ),
    ] = False,
) -> None:
    """How flat is a trained PyTorch model's minimum?"""



def main() -> None:
    """Console-script entry point."""
    app()
