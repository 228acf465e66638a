"""Declarative clinical content: the rule set and the terminology (YAML files here)."""

from pathlib import Path

RULES_DIR = Path(__file__).resolve().parent
DEFAULT_RULESET = RULES_DIR / "resectability.yaml"
DEFAULT_TERMINOLOGY = RULES_DIR / "terminology.yaml"
