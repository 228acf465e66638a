"""Regenerate docs/interop.md: ``clm-stratify interop`` against SEKMET and Medplum's engine,
both started here on 127.0.0.1, and the table of checks x servers with the quirks met.

    PYTHONPATH=. .venv/bin/python -m tests.support.interop_both
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fhir_adapters.fhir.local_server import LocalFhirServer
from tests.support.medplum_server import MedplumServer

DOC = Path(__file__).resolve().parents[2] / "docs" / "interop.md"
INTRO = """# Interoperability: two real FHIR servers

`clm-stratify interop` run against the two FHIR servers the tests start on 127.0.0.1:
**SEKMET** 0.1.1 (PyPI; clients choose ids, pages with `next` links) and **Medplum's FHIR
engine** 5.2.13 (`@medplum/fhir-router` + `MemoryRepository` behind the thin front in
`tests/support/medplum/`; assigns ids, never pages, splits token values on every `|`,
stores Subscriptions without firing them). Regenerate with
`PYTHONPATH=. .venv/bin/python -m tests.support.interop_both`; the integration tests
(`tests/integration/test_interop.py`, `test_two_servers.py`, `test_interop_subscription.py`)
assert these outcomes.
"""


def run(name: str, srv, out: Path) -> dict:
    with srv:
        report = out / f"{name}.json"
        subprocess.run([sys.executable, "-m", "clm_stratify", "interop", "--fhir-url", srv.base_url,
                        "--report", str(report)], capture_output=True, text=True, timeout=1200)
        return json.loads(report.read_text())


def _summary(value, key: str) -> str:
    if key == "server" and isinstance(value, dict):
        return f"{value.get('software')} (FHIR {value.get('fhir_version')})"
    if key == "write_strategy" and isinstance(value, dict):
        return str(value.get("strategy"))
    if isinstance(value, dict):
        return ", ".join(f"{k} {n}" for k, n in value.items())
    return str(value)


def cell(check: dict | None) -> str:
    return check["status"].upper() if check else "-"


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="interop-both-"))
    reports = {"SEKMET": run("sekmet", LocalFhirServer(data_dir=out / "sekmet"), out),
               "Medplum": run("medplum", MedplumServer(out / "medplum"), out)}
    lines = [INTRO, "## Summary", "", "| | " + " | ".join(reports) + " |", "|---|" + "---|" * len(reports)]
    for label, key in (("server", "server"), ("write strategy", "write_strategy"), ("load", "load_method"),
                       ("searches", "search_mode"), ("result", "result"), ("checks", "counts"),
                       ("seconds", "duration_seconds"), ("round trips", "round_trips")):
        values = [_summary(r.get(key), key).replace("|", "\\|") for r in reports.values()]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    ids = list(dict.fromkeys(c["id"] for r in reports.values() for c in r["checks"]))
    lines += ["", "## Checks", "", "| step | check | " + " | ".join(reports) + " |",
              "|---|---|" + "---|" * len(reports)]
    for cid in ids:
        checks = [next((c for c in r["checks"] if c["id"] == cid), None) for r in reports.values()]
        first = next(c for c in checks if c)
        lines.append(f"| {first['step']} | {first['title']} (`{cid}`) | " + " | ".join(map(cell, checks)) + " |")
    lines += ["", "## Details (not PASS)", ""]
    for name, r in reports.items():
        for c in r["checks"]:
            if c["status"] != "pass":
                lines.append(f"- **{name}**, `{c['id']}` ({c['status'].upper()}): {c['detail'][:600]}")
    lines += ["", "## Quirks met", ""]
    for name, r in reports.items():
        lines.append(f"### {name}\n")
        for q in r.get("quirks") or []:
            lines.append(f"- `{q['id']}`: {q['detail'][:400]}  \n  handled: {q['handling'][:400]}")
        if not r.get("quirks"):
            lines.append("- none")
        lines.append("")
    DOC.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
