"""The engine's one error root: the user's errors, apart from everything else.

A :class:`UserError` means the model, the data or the spec the user gave cannot be used as
given, and its message says what is wrong and how to fix it. It is the same error however
often it is retried, so a job fails at once with ``invalid_input``; the gateway answers it
with its ``status`` (a 4xx) and ``type``, the command line exits with ``exit_code`` (2).
Every other exception is the engine's or the platform's own (a corrupt stored unit output, a
broken invariant, a lost database): a job retries it up to its attempt limit, then fails
with ``internal_error``.

UserError subclasses ValueError, so that validation code written against ValueError still
catches it; the converse no longer holds: a bare ValueError is an internal error.
"""

from __future__ import annotations


class UserError(ValueError):
    """The user's model, data or spec is unusable as given; the message says how to fix it."""

    status = 400  # what the gateway answers
    type = "invalid_input"  # the error's type in the gateway's JSON
    exit_code = 2  # what the command line exits with

    @property
    def detail(self) -> str:
        return str(self)


class InvalidParameter(UserError):
    """An attack's or a defense's parameter is out of its range (the message names it)."""

    status = 422
    type = "invalid_spec"


class InvalidSpecError(UserError):
    """The evaluation spec does not fit the registries, the model or the dataset."""

    status = 422
    type = "invalid_spec"


class TooLargeError(UserError):
    """An upload or a request over a size limit."""

    status = 413
    type = "too_large"


def quoted(text: str, limit: int = 200) -> str:
    """A name from the user's file, quoted and shortened for a message."""
    return repr(text[:limit] + "..." if len(text) > limit else text)


def first_lines(exc: BaseException | str, limit: int = 400) -> str:
    """A library's exception message (or a part of it) on one line, shortened for a message."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return (text[:limit] + "...") if len(text) > limit else text or type(exc).__name__
