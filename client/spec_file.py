"""Reading an evaluation spec file (YAML or JSON) into the contract's EvaluationSpec."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from client.errors import CommandError
from schemas.evaluation import EvaluationSpec


def load_spec(path: str) -> EvaluationSpec:
    file = Path(path)
    if not file.is_file():
        raise CommandError(f"{path}: no such spec file")
    try:
        raw = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. a date out of range, or an integer of
        # more digits than Python converts (4,300), whose message advises a setting of Python's
        reason = str(exc).partition("; use sys.set_int_max_str_digits")[0]
        raise CommandError(f"{path}: not valid YAML or JSON ({reason})") from None
    if not isinstance(raw, dict):
        raise CommandError(f"{path}: the spec must be a mapping (input, samples, attacks, gates)")
    try:
        return EvaluationSpec.model_validate(raw)
    except ValidationError as exc:
        raise CommandError("invalid spec: " + format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error["loc"]) or "spec"
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}")
    return "; ".join(parts)


