"""Which kind of declarative file is this? A terminology given where a rule set is
expected (``rules validate rules/terminology.yaml``), or the reverse, is named as such
in one line instead of with every field it lacks.

    >>> str(WrongKindOfFileError("rules/terminology.yaml", "is a terminology file, not a rule set"))
    'rules/terminology.yaml is a terminology file, not a rule set'
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import yaml

from engine.yamlfile import DeclarativeFileError


class WrongKindOfFileError(DeclarativeFileError):
    """A declarative file of the other kind: a terminology given as a rule set, or the
    reverse. One line (``rules/terminology.yaml is a terminology file, ...``)."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(path, [problem])
        self.args = (f"{self.path} {problem}",)

    def __str__(self) -> str:
        return self.args[0]


def top_level(path: Path | str) -> dict:
    """The top-level mapping of a YAML file, or {} when it cannot be read as one (the
    loader has already reported why)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def looks_like_ruleset(data: Mapping) -> bool:
    """A rule set has factors and group rules at the top level.

    >>> looks_like_ruleset({"id": "x", "factors": {}, "groups": []}), looks_like_ruleset({"id": "x"})
    (True, False)
    """
    return "factors" in data and "groups" in data


def looks_like_terminology(data: Mapping) -> bool:
    """A terminology file is a mapping of code lists (``{description, codes: [...]}``) and
    no rule set. Recognised by its shape: the engine does not know its code lists.

    >>> looks_like_terminology({"id": "t", "liver_site": {"description": "d", "codes": [{"system": "s", "code": "c"}]}})
    True
    >>> looks_like_terminology({"id": "x", "factors": {}, "groups": []})
    False
    """
    return not looks_like_ruleset(data) and any(
        isinstance(v, dict) and isinstance(v.get("codes"), list) for v in data.values())
