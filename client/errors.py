"""The command line's error for bad input: exit 2 with the message (the engine's UserError,
which the server-side commands raise, carries the same ``exit_code``)."""

from __future__ import annotations


class CommandError(Exception):
    """Bad input on the command line (a missing file, a bad spec): exit 2 with the message."""

    exit_code = 2
