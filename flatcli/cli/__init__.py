"""The ``flatcli`` command line: parse, call the library, render. Nothing else lives here.

Errors a user causes are :class:`~flatcli.errors.FlatcliError`; every command turns them
into one line on stderr and exit code 1 (runtime) or 2 (usage). Data goes to stdout,
progress and logs to stderr.

One module per command (each registers itself on :data:`app`); the shared option types
are in :mod:`.options`, the shared helpers in :mod:`.common` and the terminal rendering
in :mod:`.render`.
"""

from importlib import import_module

from .app import app, main

#: The command modules; importing one registers its commands, and --help lists them in order.
COMMANDS = (
    "inspect", "measure", "audit", "correlate", "robustness", "bound", "finetune", "report"
)
for _name in COMMANDS:
    import_module(f"{__name__}.{_name}")

__all__ = ["app", "main"]
