"""Load a YAML file into a pydantic model, with errors that name the file and field.

Both declarative files of the project (the rule set and the terminology) go through
here, so a site that edits either gets the same kind of message::

    rules/resectability.yaml: factors.tumour_count_ge_4.threshold: Input should be a valid number

"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class DeclarativeFileError(ValueError):
    """A rule or terminology file that cannot be used; the message lists every problem."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


def _location(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def describe_validation_error(err: ValidationError) -> list[str]:
    """One line per pydantic error: ``field.path: message``."""
    problems = []
    for e in err.errors():
        # Drop pydantic's internal union/tagged-union markers from the path.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        problems.append(f"{_location(loc)}: {e['msg']}")
    return problems


def load_model(path: Path | str, model: type[M]) -> M:
    """Read ``path`` as YAML and validate it as ``model``.

    Raises DeclarativeFileError naming the file and every bad field.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeclarativeFileError(p, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeclarativeFileError(p, [f"cannot be read: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise DeclarativeFileError(p, ["nested too deeply to be a rule or terminology file"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise DeclarativeFileError(p, [f"{where}not valid YAML: {problem}"]) from None
    if not isinstance(data, dict):
        raise DeclarativeFileError(p, ["(top level): expected a mapping of fields, found "
                                       f"{type(data).__name__}"])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DeclarativeFileError(p, describe_validation_error(exc)) from None
