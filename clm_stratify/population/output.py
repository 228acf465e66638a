"""A population run's ``OUT`` directory: its layout, its manifest, and reading it back.

    OUT/manifest.json            what ran (rule set, terminology, inputs, counts); written last
    OUT/classifications/part-*   one JSON result per patient
    OUT/features/part-*          the mapped features per patient (exact decimals)
    OUT/assessments/part-*       a collection Bundle (RiskAssessment + Provenance) per assessed patient
    OUT/failures/part-*          patients the core could not classify, with the error

The local path names its parts ``part-NNNNN.ndjson``; Spark names them its own way
(``part-NNNNN-<uuid>-c000.txt``): readers take every ``part-*`` file, in name order.
A directory whose manifest is missing or not ``complete`` is an interrupted run: it is
never read as a result.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

FORMAT = "clm-stratify-population/1"
MANIFEST = "manifest.json"


class InputError(ValueError):
    """Input a population run cannot use (named: file, line, what is wrong)."""


def part_name(index: int) -> str:
    return f"part-{index:05d}.ndjson"


@dataclass
class Summary:
    """What a population run did (the manifest's ``counts``, and the printed summary)."""

    engine: str = "local"
    inputs: list[str] = field(default_factory=list)
    lines_read: int | None = 0    # None: not counted (Spark)
    lines_kept: int = 0
    broadcast: int = 0
    groups: Counter = field(default_factory=Counter)   # group (or no-recurrence) -> patients
    outputs: Counter = field(default_factory=Counter)  # kind -> lines
    failed: dict[str, str] = field(default_factory=dict)   # patient -> failure line

    @property
    def patients(self) -> int:
        return sum(self.groups.values()) + len(self.failed)

    def add(self, counts: dict[str, dict]) -> None:
        """Counts of one chunk: ``{kind: {group or "": n}}`` (``_failed``: patient -> line)."""
        for kind, by in counts.items():
            if kind == "_failed":
                self.failed.update(by)
                continue
            self.outputs[kind] += sum(by.values())
            if kind == "classifications":
                self.groups.update(by)

    def counts(self) -> dict:
        return {"patients": self.patients, "groups": dict(sorted(self.groups.items())),
                "failed": len(self.failed), "outputs": dict(sorted(self.outputs.items())),
                "lines_read": self.lines_read, "lines_kept": self.lines_kept, "unattributed_lines": self.broadcast}


def prepare_out(out: Path) -> None:
    """``out`` must not exist, or be an empty directory (a run never mixes with another)."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()):
            raise InputError(f"--out {out}: not empty (a population run writes into a new or empty directory; "
                             "remove it or choose another)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create it ({exc.strerror})") from None


def manifest(summary: Summary, *, rules, occurrence: str, base: str | None, source: str) -> dict:
    rs, t = rules.engine.ruleset, rules.terminology
    return {
        "format": FORMAT,
        "complete": True,
        "created": occurrence,
        "engine": summary.engine,
        "source": source,
        "inputs": summary.inputs,
        "base": base,
        "ruleset": {"id": rs.id, "version": rs.version, "sha256": rs.sha256},
        "terminology": {"id": t.id, "version": t.version, "sha256": terminology_sha256(t)},
        "counts": summary.counts(),
    }


def terminology_sha256(terminology) -> str:
    import hashlib

    blob = json.dumps(terminology.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_manifest(out: Path, data: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


def read_manifest(out: Path) -> dict:
    """The manifest of a finished run; InputError naming what is wrong otherwise."""
    path = out / MANIFEST
    if not out.is_dir():
        raise InputError(f"{out}: not a directory (expected a population run's OUT)")
    if not path.is_file():
        raise InputError(f"{out}: no {MANIFEST}: not a population run's OUT, or the run did not finish")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path}: not a {FORMAT} manifest")
    if data.get("complete") is not True:
        raise InputError(f"{path}: the run did not finish (complete is not true); run it again")
    return data


def parts(out: Path, kind: str) -> list[Path]:
    """The part files of one kind, in name order."""
    directory = out / kind
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.startswith("part-"))


def read_lines(out: Path, kind: str) -> Iterator[tuple[Path, int, str]]:
    """(file, line number, text) of every non-blank line of one kind."""
    for path in parts(out, kind):
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    yield path, n, line.rstrip("\n")
