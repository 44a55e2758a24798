"""What every command needs: one-line errors, progress, option checks, loading, output."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer

from ..errors import FlatcliError, FlatcliWarning, ParameterError, UsageError
from ..text import markup_safe, plain, show_warning

F = TypeVar("F", bound=Callable[..., Any])


def stderr():  # noqa: ANN202 - rich Console, imported lazily
    from rich.console import Console

    return Console(stderr=True)


def friendly(fn: F) -> F:
    """Turn user errors into one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import warnings

        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
        finished = False
        try:
            with warnings.catch_warnings(), termination_signals():
                warnings.simplefilter("default", FlatcliWarning)  # each message once
                warnings.showwarning = show_warning
                result = fn(*args, **kwargs)
            finished = True
            return result
        except Terminated as e:
            stderr().print(f"{_rank_prefix()}terminated by {e.name}", highlight=False)
            raise typer.Exit(128 + e.signum) from None
        except FlatcliError as e:
            where, text = _rank_prefix(), _with_flag(e)
            stderr().print(
                f"[bold red]{where}error:[/] {markup_safe(text)}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            stderr().print("interrupted", highlight=False)
            raise typer.Exit(130) from None
        except typer.Exit as e:
            finished = e.exit_code == 0  # every rank ends the same way: wait for the others
            raise
        except Exception as e:  # noqa: BLE001 - last resort: one line, traceback on request
            if os.environ.get("FLATCLI_DEBUG"):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            stderr().print(
                f"[bold red]{_rank_prefix()}internal error:[/] {type(e).__name__}: "
                f"{markup_safe(first)} "
                "(set FLATCLI_DEBUG=1 for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        finally:
            if "flatcli.distributed" in sys.modules:
                sys.modules["flatcli.distributed"].shutdown(barrier=finished)

    return wrapper  # type: ignore[return-value]


def _with_flag(error: FlatcliError) -> str:
    """The error's line; a :class:`ParameterError` names the option's flag, not the
    library's parameter (``--probes must be …`` for ``probes must be …``)."""
    if not isinstance(error, ParameterError):
        return str(error)
    import click

    name = error.parameter
    ctx = click.get_current_context(silent=True)
    flags = {p.name: p.opts[0] for p in ctx.command.params} if ctx is not None else {}

    def flag(match: re.Match[str]) -> str:
        word = match.group(0)
        return flags.get(word, "--" + word.replace("_", "-"))

    # other parameters the sentence names (alpha_high) have an underscore in their name
    detail = re.sub(r"\b[a-z]+(?:_[a-z0-9]+)+\b", flag, error.detail)
    return f"{flags.get(name, '--' + name.replace('_', '-'))} {detail}"


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds the command as Ctrl-C does (worker processes stopped and
    joined, temporary files removed), then exits with 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextmanager
def termination_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` while a command runs.

    Their default action ends the process on the spot: its ``--jobs`` workers would run
    on as orphans and a file being written would stay half-written. Only the first signal
    raises; a second one, while the command unwinds, is ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = ("SIGTERM", "SIGHUP")
    # an ignored signal stays ignored (nohup), and a handler someone else set stays theirs
    wanted = [
        getattr(signal, n)
        for n in names
        if hasattr(signal, n) and signal.getsignal(getattr(signal, n)) is signal.SIG_DFL
    ]

    def raise_terminated(signum: int, _frame: Any) -> None:
        for s in wanted:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {s: signal.signal(s, raise_terminated) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _rank_prefix() -> str:
    """``rank R: `` under torchrun (which rank failed), else nothing."""
    if "flatcli.distributed" not in sys.modules:
        return ""
    dist = sys.modules["flatcli.distributed"]
    return f"rank {dist.rank()}: " if dist.active() else ""


def start_distributed(device: str, backend: str) -> str:
    """Join the torchrun process group when launched by torchrun; return the device to use."""
    from .. import distributed

    return distributed.init(device, backend)


@contextmanager
def quiet(total: int | None = None) -> Iterator[Status]:
    """A :class:`Status` that shows nothing (ranks other than 0 under torchrun)."""

    class Silent(Status):
        def __call__(self, msg: str) -> None:
            pass

    yield Silent()


class Status:
    """What a long computation is doing, on stderr.

    In a terminal: a rich progress bar over ``total`` steps (or a spinner without one)
    whose description is the latest message. Otherwise (a log file, a pipe): a plain
    ``flatcli: message`` line when the kind of work changes (the text before the first
    colon) or every :attr:`LOG_EVERY` seconds, so logs stay short.
    """

    LOG_EVERY = 10.0

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self.progress, self.task = progress, task
        self.last_kind: str | None = None
        self.last_time = 0.0

    def __call__(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=markup_safe(msg))
            return
        import time

        kind, now = msg.split(":", 1)[0], time.monotonic()
        if kind != self.last_kind or now - self.last_time >= self.LOG_EVERY:
            print(f"flatcli: {plain(msg)}", file=sys.stderr)
            self.last_kind, self.last_time = kind, now

    def advance(self, *_: Any) -> None:
        """One step done."""
        if self.progress is not None:
            self.progress.advance(self.task)


@contextmanager
def progress(total: int | None = None) -> Iterator[Status]:
    """A :class:`Status` for the duration of a computation of ``total`` steps."""
    console = stderr()
    if not console.is_terminal:
        yield Status()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield Status(progress, progress.add_task("working", total=total))


def options_from(ctx: typer.Context):  # noqa: ANN202 - a registry.MeasureOptions
    """The measures' options from the command's own parsed parameters of the same names
    (a command without, e.g., ``--time-budget`` gets that option's default), checked
    before anything is loaded."""
    from ..commands import OPTION_NAMES, measure_options

    return measure_options(**{k: v for k, v in ctx.params.items() if k in OPTION_NAMES})


LOADING = ("arch", "trust_code", "data", "split", "target", "max_samples", "batch_size")
LOADING += ("device", "dtype", "loss")
"""The command parameters that go, unchanged, to :func:`flatcli.prepare.prepare`."""


def loading_from(ctx: typer.Context, **overrides: Any) -> dict[str, Any]:
    """The loading keywords of the library calls from the command's parsed parameters
    (``--arch-kwargs`` parsed as JSON), with ``overrides``."""
    from ..prepare import parse_json_object

    params = ctx.params
    out = {k: params[k] for k in LOADING if k in params}
    out["arch_kwargs"] = parse_json_object(params.get("arch_kwargs"), "--arch-kwargs")
    return {**out, **overrides}


def check_format(fmt: str) -> str:
    from ..report import FORMATS

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def check_outputs(
    output: Path | None,
    *sidecars: str,
    report: Path | None = None,
    inputs: list[tuple[str, Path | None]] | None = None,
    others: list[tuple[str, Path | None]] | None = None,
) -> None:
    """Check ``output``, the files written beside it (``STEM<sidecar>``, none beside a
    stream) and ``report`` before computing, and that none of them (nor ``others``, checked
    by their command) is an input or another of them (:func:`flatcli.io.check_distinct`)."""
    from ..io import check_distinct, check_output, sidecar

    named: list[tuple[str, Path | None]] = [("--report", report), *(others or [])]
    if output is not None:
        check_output(output)
        named.insert(0, ("--output", output))
        for suffix in sidecars:
            side = sidecar(output, suffix)
            if side is not None:
                check_output(side)
                named.append((f"--output's {suffix} file", side))
    check_report_path(report)
    check_distinct(named, inputs or [])


def input_files(
    checkpoints: list[Path], data: str | None = None, *named: tuple[str, Path | None]
) -> list[tuple[str, Path | None]]:
    """The files a run reads, for :func:`check_outputs`: each checkpoint (every file of a
    Hugging Face folder), the data (``--data``, else the file a checkpoint's metadata
    names), and ``named`` ``(what, path)`` pairs such as ``--init``."""
    from ..checkpoints import read_metadata
    from ..data import BUNDLED, metadata_data
    from ..hf import config_path

    found: list[tuple[str, Path | None]] = list(named)
    if data is not None and data not in BUNDLED:
        found.append(("the --data file", Path(data).expanduser()))
    for checkpoint in map(Path, checkpoints):
        config = config_path(checkpoint)
        if config is not None:
            folder = config.parent
            found += [(f"a file of {folder.name}", f) for f in folder.iterdir() if f.is_file()]
        else:
            found.append(("the checkpoint", checkpoint))
        named_data = read_metadata(checkpoint).get("data") if data is None else None
        if named_data and named_data not in BUNDLED:
            with contextlib.suppress(FlatcliError):  # loading it reports why
                own = config.parent if config is not None else checkpoint
                found.append(("the checkpoint's data", Path(metadata_data(named_data, own))))
    return found


def emit(result: Any, fmt: str, output: Path | None, report: Path | None = None) -> None:
    """Write ``result`` (anything with ``to_dict``, ``to_frame`` and ``render``, see
    :class:`flatcli.results.Result`) as ``fmt``: the HTML page ``report``, then ``output``
    (JSON, or CSV with its ``STEM.manifest.json`` and further sidecars), then stdout."""
    from ..report import to_json, write_beside, write_csv_output, write_output

    write_page(report, result.to_dict(), **result.page_options())
    if fmt == "json":
        text = to_json(result.to_dict())
        if output is not None:
            write_output(output, text)
        sys.stdout.write(text)
        return
    if output is not None:
        if fmt == "csv" or result.table_output == "csv":
            write_csv_output(output, result.to_csv(), result.provenance())
            for suffix, text in result.sidecars().items():
                write_beside(output, suffix, text)
        else:
            write_output(output, to_json(result.to_dict()))
    if fmt == "csv":
        sys.stdout.write(result.stdout_csv())
    else:
        result.render()



def command_argv(ctx: typer.Context) -> list[str]:
    """The command line of this run: ``flatcli COMMAND`` and what the user gave.

    Rebuilt from the parsed parameters (so it works however flatcli was started): the
    arguments, then each option whose value came from the command line or the
    environment, by its first name. Defaults are left out; the manifest holds them.
    """
    given = ("COMMANDLINE", "ENVIRONMENT")
    arguments: list[str] = []
    options: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if source is None or source.name not in given:
            continue
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            values = value if isinstance(value, (list, tuple)) else [value]
            arguments += [str(v) for v in values]
        elif getattr(param, "is_flag", False):
            if value:
                options.append(param.opts[0])
            elif param.secondary_opts:
                options.append(param.secondary_opts[0])
        elif value is not None:
            options += [param.opts[0], str(value)]
    return ["flatcli", str(ctx.info_name), *arguments, *options]


def check_report_path(report: Path | None) -> None:
    """Fail before any work when ``--report`` cannot be written (see :func:`check_output`)."""
    from ..io import check_output

    if report is not None:
        check_output(report, option="--report")


def write_page(report: Path | None, result: dict, **options: Any) -> None:
    """Write ``result`` as an HTML page to ``report`` (when given) and say so on stderr."""
    if report is None:
        return
    from ..html import write_html

    write_html(report, result, **options)
    stderr().print(f"wrote {markup_safe(report)}", highlight=False)
