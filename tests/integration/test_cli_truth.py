"""A CLI that tells the truth (issue 15, part 4), against real SEKMET processes on
127.0.0.1: a listing with the reason of every indeterminate, counts that add up (and a
progress total equal to them), a dry-run banner, pure JSON on standard output, a demo
that cleans up after itself, and 'no such patient' as its own error and exit code."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clm_stratify.cli import main
from clm_stratify.pipeline import Rules, Stratifier
from fhir_adapters.project import EXIT_NOT_FOUND

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def table_rows(text: str) -> dict[str, int]:
    """The rows of the summary table (``name   n``) from a run's text output."""
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("group ") and line.endswith("patients")))
    rows = {}
    for line in lines[start + 1:]:
        if not re.match(r"^[a-z][a-z -]*\s+\d+$", line):
            break
        name, n = line.rsplit(None, 1)
        rows[name.strip()] = int(n)
    return rows


# --------------------------------------------------------------------------- listing, counts, dry run
def test_run_all_list_dry_run_lists_every_patient_and_counts_add_up(server, capsys):
    code, out, err = run(["run", "--fhir-url", server.base_url, "--all", "--list", "--dry-run"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    banner = f"DRY RUN: nothing was written to {server.base_url}"
    assert lines[0] == banner and lines[-1] == banner           # at the start and at the end
    assert "DRY RUN: nothing will be written" in err
    listed = [line for line in lines if line.startswith("Patient/")]
    rows = table_rows(out)
    assert rows["total"] == len(listed) == 60                   # 61 fixtures, one without a metastasis Condition
    assert sum(v for k, v in rows.items() if k != "total") == rows["total"]
    cols = [line.split(None, 4) for line in listed]           # patient, group, status, action, why
    assert rows["no-recurrence"] == sum(c[3] == "no-recurrence" for c in cols) == 4
    assert rows["indeterminate"] == sum(c[3] == "would-create" and c[1] == "indeterminate" for c in cols)
    for c in cols:
        assert c[3] in ("would-create", "no-recurrence"), c
        if c[3] == "would-create" and c[1] == "indeterminate":
            assert c[4].startswith("unknown: "), c             # every indeterminate says what is missing
        if c[3] == "no-recurrence":
            assert "No liver recurrence" in c[4], c
            assert c[1] == c[2] == "-", c                         # no assessment, no group (adversary)
    assert "RiskAssessments: would-create 56" in out


def test_run_all_json_is_one_document_with_every_patient_and_the_same_counts(server, capsys):
    code, out, err = run(["run", "--fhir-url", server.base_url, "--all", "--dry-run", "--format", "json"], capsys)
    assert code == 0, err
    doc = json.loads(out)                                        # stdout is exactly one JSON document
    assert doc["dry_run"] is True and "DRY RUN" in err and "DRY RUN" not in out
    assert doc["total"] == len(doc["patients"]) == 60
    actions = doc["actions"]
    assert sum(doc["groups"].values()) + actions.get("no-recurrence", 0) + actions.get("failed", 0) == doc["total"]
    for p in doc["patients"]:
        assert {"patient", "group", "status", "action", "reason", "missing", "error"} <= set(p)
        if p["action"] == "no-recurrence":                       # no assessment, no group (adversary)
            assert p["group"] is None and p["status"] is None and p["classification"]["assessed"] is False
        if p["group"] == "indeterminate" and p["action"] != "no-recurrence":
            assert p["reason"] and p["missing"] and all(m["fact"] and m["text"] for m in p["missing"]), p["patient"]
            assert p["missing"] == [{k: m[k] for k in ("fact", "text", "detail")}
                                    for m in p["classification"]["missing"]]


@pytest.mark.parametrize("bulk", [True, False])
def test_progress_total_is_the_number_of_patients_reported(server, client, bulk):
    """Found in issue 15: demo showed 37/37 and then 36: the bulk path counted every
    exported patient, the cohort is those with a metastasis Condition."""
    calls = []
    summary = Stratifier(client, Rules.load(), dry_run=True).population(progress=lambda d, t: calls.append((d, t)),
                                                                        bulk=bulk)
    assert calls and {t for _, t in calls} == {summary.total}
    assert calls[-1] == (summary.total, summary.total) == (60, 60)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# --------------------------------------------------------------------------- no such patient
def test_no_such_patient_is_its_own_error_and_exit_code(server, capsys):
    code, out, err = run(["run", "--fhir-url", server.base_url, "--patient", "does-not-exist"], capsys)
    assert code == EXIT_NOT_FOUND == 4
    assert err.strip().splitlines()[-1] == f"error: no patient Patient/does-not-exist on {server.base_url}"
    assert "run again" not in out + err and "Traceback" not in err and out == ""
    code, out, err = run(["run", "--fhir-url", server.base_url, "--patient", "does-not-exist", "--format", "json"],
                         capsys)
    assert code == 4
    [p] = json.loads(out)["patients"]
    assert p["action"] == "not-found" and p["error"] == f"no patient Patient/does-not-exist on {server.base_url}"


def test_a_patient_without_data_is_no_recurrence_not_an_error(server, client, capsys):
    client.update({"resourceType": "Patient", "id": "truth-lonely", "gender": "female"})
    code, out, err = run(["run", "--fhir-url", server.base_url, "--patient", "truth-lonely", "--format", "json"],
                         capsys)
    assert code == 0, err
    [p] = json.loads(out)["patients"]
    assert p["action"] == "no-recurrence" and p["error"] is None


def test_a_deleted_patient_is_done_in_the_receiver_not_retried(server, client, tmp_path):
    """The receiver's worker: a patient the server no longer has is done at once with the
    result 'not-found' (a retry or a dead-letter replay cannot help), never silently lost."""
    from clm_stratify.service.inbox import Inbox
    from clm_stratify.service.notifications import parse_notification
    from clm_stratify.service.worker import Worker

    client.update({"resourceType": "Patient", "id": "truth-gone"})
    client.request("DELETE", "Patient/truth-gone")
    assert client.read("Patient", "truth-gone") is None
    box = Inbox(tmp_path / "inbox.sqlite", backoff=0.0, max_attempts=3)
    box.accept(parse_notification({"resourceType": "Patient", "id": "truth-gone"}, path="Patient/truth-gone")
               .model_dump_json())
    worker = Worker(box, Stratifier(client, Rules.load()), coalesce=0)
    for _ in range(5):   # bounded
        worker.resolve_one()
        worker.process_one()
    with sqlite3.connect(tmp_path / "inbox.sqlite") as db:
        rows = db.execute("SELECT state, result, attempts FROM work").fetchall()
    assert rows == [("done", "not-found", 1)]
    assert box.dead_letters() == [] and box.retrying() == []
    box.close()


# --------------------------------------------------------------------------- population: pure JSON
def test_population_json_is_one_document(tmp_path, capsys):
    from fixtures.population import BASE, write_ndjson

    write_ndjson(tmp_path / "in", 20, seed=3)
    code, out, err = run(["population", "--ndjson", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                          "--base", BASE, "--format", "json"], capsys)
    assert code == 0, err
    assert json.loads(out)["patients"] == 20


# --------------------------------------------------------------------------- demo
def demo_env(tmp: Path) -> dict[str, str]:
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}


def port_closed(url: str) -> bool:
    host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) != 0


def test_demo_cleans_up_and_prints_no_dead_links(tmp_path):
    tmp = tmp_path / "tmp"
    proc = subprocess.run([sys.executable, "-m", "clm_stratify", "demo"], capture_output=True, text=True,
                          timeout=180, env=demo_env(tmp), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp.iterdir()) == []                            # the temp data dir is gone
    assert "http://127.0.0.1" not in proc.stdout                 # no link to a stopped server
    assert "was stopped" in proc.stdout and "--keep-running" in proc.stdout
    rows = table_rows(proc.stdout)
    assert rows["total"] == 60 and rows["no-recurrence"] == 4
    assert port_closed(re.search(r"into (http://\S+)", proc.stderr).group(1))


def test_demo_json_is_one_document_and_cleans_up(tmp_path):
    tmp = tmp_path / "tmp"
    proc = subprocess.run([sys.executable, "-m", "clm_stratify", "demo", "--format", "json"], capture_output=True,
                          text=True, timeout=180, env=demo_env(tmp), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["total"] == len(doc["patients"]) == 60 and doc["dry_run"] is False
    assert "was stopped" in proc.stderr
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_demo_cleans_up(tmp_path, sig):
    tmp = tmp_path / "tmp"
    proc = subprocess.Popen([sys.executable, "-m", "clm_stratify", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=demo_env(tmp), cwd=tmp_path)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:   # bounded: until the server is up and loaded
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"into (http://\S+)", line)
            url = m.group(1) if m else None
        assert url, "the demo did not load its data"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 130
    assert list(tmp.iterdir()) == []
    assert port_closed(url)
