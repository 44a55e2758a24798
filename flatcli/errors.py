"""The one exception type for errors a user causes (bad files, names, data)."""

from __future__ import annotations


class FlatcliError(Exception):
    """An error caused by the user's input, shown by the CLI as one line.

    Args:
        message: One line saying what is wrong and, where possible, what to do.
        exit_code: 1 for a runtime error (bad file, bad data), 2 for a usage error
            (bad option combination, unknown name).
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(FlatcliError):
    """A bad option or name: exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


class ParameterError(UsageError):
    """A bad value of one named parameter of a library call.

    The message starts with the parameter's name (``probes must be at least 1, got 0``);
    the CLI writes the option's flag in its place (``--probes must be at least 1, got 0``).

    Args:
        parameter: The parameter's name, as the function or record spells it.
        message: The rest of the sentence (``must be at least 1, got 0``).
    """

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter} {message}")
        self.parameter = parameter
        self.detail = message


class FlatcliWarning(UserWarning):
    """Something flatcli changed or skipped on the user's behalf (a cast, a recomputed cache
    entry): the CLI shows each as one ``warning:`` line on stderr."""


def warn(message: str) -> None:
    """Issue a :class:`FlatcliWarning` (one line)."""
    import warnings

    warnings.warn(message, FlatcliWarning, stacklevel=3)
