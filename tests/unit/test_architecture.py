"""The layout the code promises (docs/architecture.md), checked on the source itself.

* No package imports a package above it. The layers, lowest first, are listed in
  :data:`LAYERS`; a module may import its own unit and any unit of a lower layer,
  nothing else of ours (every ``import`` statement counts, inside functions too).
* No module is longer than :data:`MAX_LINES` lines.
* The path of one notification to one RiskAssessment is listed in docs/architecture.md
  in at most six modules, and each of them exists.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "fhir_adapters", "clm_stratify")
MAX_LINES = 400

# Lowest first. A unit is a module or package prefix; the longest matching prefix wins.
LAYERS: list[tuple[str, ...]] = [
    ("engine", "fhir_adapters.project", "fixtures",           # pure engine, project constants, test data,
     "fhir_adapters"),                                         # (the fhir_adapters package root declares only)
    ("fhir_adapters.fhir",),                                   # HTTP + FHIR, no clinical knowledge
    ("fhir_adapters.terminology",),                            # what codes mean (rules/terminology.yaml)
    ("fhir_adapters.sources",),                                # server pull, Bulk export, Bundle file, the record
    ("fhir_adapters.features",),                               # record -> features, one module per fact
    ("fhir_adapters.writeback",),                              # RiskAssessment + Provenance, write strategies
    ("clm_stratify.pipeline",),                                # fetch -> map -> classify -> write
    ("clm_stratify.service", "clm_stratify.interop",           # receiver + worker; interoperability test;
     "clm_stratify.population"),                               # population runs (local, Spark), write-back
    ("clm_stratify.cli",),                                     # the commands
    ("clm_stratify",),                                         # the package root (__main__ runs the CLI)
]
OURS = ("engine", "fhir_adapters", "clm_stratify", "fixtures", "rules", "tests", "benchmarks")


def unit_of(module: str) -> tuple[str, int]:
    """(unit, layer index) of a dotted module name."""
    best: tuple[str, int] | None = None
    for index, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (best is None or len(unit) > len(best[0])):
                best = (unit, index)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
    return best


def modules() -> list[tuple[str, Path]]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # "from fhir_adapters import terminology" imports the module fhir_adapters.terminology
            found += [(node.lineno, f"{name}.{a.name}" if _is_module(f"{name}.{a.name}") else name)
                      for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in OURS]


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def upward_imports() -> list[str]:
    problems = []
    for module, path in modules():
        unit, layer = unit_of(module)
        for line, name in imports_of(module, path):
            if name.split(".")[0] in ("tests", "benchmarks"):
                problems.append(f"{_show(path)}:{line}: imports {name} (test or benchmark code)")
                continue
            if name.split(".")[0] == "rules":
                continue  # the YAML data package
            other, other_layer = unit_of(name)
            if other != unit and other_layer >= layer:
                problems.append(f"{_show(path)}:{line}: {unit} (layer {layer}) imports {name} "
                                f"({other}, layer {other_layer})")
    return problems


def test_no_package_imports_a_package_above_it():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a lower layer importing a higher one is reported."""
    module, path = next((m, p) for m, p in modules() if m == "fhir_adapters.fhir.codec")
    fake = tmp_path / "codec.py"
    fake.write_text(path.read_text() + "\nfrom clm_stratify.pipeline import Rules\nfrom fhir_adapters import sources\n")
    found = imports_of(module, fake)
    assert (len(fake.read_text().splitlines()) - 1, "clm_stratify.pipeline") in found
    assert any(name == "fhir_adapters.sources" for _, name in found)
    monkeypatch.setattr(sys.modules[__name__], "modules", lambda: [(module, fake)])
    problems = upward_imports()
    assert any("imports clm_stratify.pipeline" in p for p in problems)
    assert any("imports fhir_adapters.sources" in p for p in problems)


def test_engine_imports_nothing_outside_itself():
    for module, path in modules():
        if module.startswith("engine"):
            # (the rules/ package is the YAML data it reads)
            assert [n for _, n in imports_of(module, path) if n.split(".")[0] not in ("engine", "rules")] == [], module


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_no_module_is_longer_than_the_limit(module, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (limit {MAX_LINES}): split it by concern"


def test_the_notification_path_is_documented_in_at_most_six_modules():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc.split("## One notification to one RiskAssessment", 1)[1].split("\n## ", 1)[0]
    path = re.findall(r"^\d+\. `([a-z_.]+)`", section, re.M)
    assert 2 <= len(path) <= 6, path
    for module in path:
        assert _is_module(module), f"docs/architecture.md names {module}, which does not exist"
