"""The live pipeline and write-back on two real FHIR servers: SEKMET (clients choose ids,
pages with next links) and Medplum's engine (assigns ids, never pages, splits token
values on ``|``). Issue 12: no duplicate assessments, no silent truncation.

Two server behaviours no real server here shows are made by a loopback proxy in front of
Medplum (tests/support/rewrite_proxy.py), and the tests say so: a server that ignores
``_offset``, and one whose identifier search never matches.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from clm_stratify.cli import main
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.fhir.load import fixture_bundles, load_bundles
from fhir_adapters.fhir.local_server import LocalFhirServer
from fhir_adapters.project import TAG, TAG_SYSTEM
from fixtures import FIXTURES_DIR
from tests.support.fixture_data import bundles
from tests.support.medplum_server import MedplumServer
from tests.support.rewrite_proxy import RewriteProxy

SERVERS = ("sekmet", "medplum")
TAGGED = {"_tag": f"{TAG_SYSTEM}|{TAG}", "_count": "1000"}


@pytest.fixture
def start_peer(tmp_path):
    """Start a server of a kind loaded with fixture copies; all stopped at the end."""
    started = []

    def start(kind: str, prefixes: tuple[str, ...] = ("f",)):
        srv = (LocalFhirServer(data_dir=tmp_path / f"sekmet{len(started)}") if kind == "sekmet"
               else MedplumServer(tmp_path / f"medplum{len(started)}"))
        started.append(srv)
        srv.start()
        with FhirClient(srv.base_url) as c:
            srv.loaded = load_bundles(c, bundles(prefixes) if prefixes != ("f",) else fixture_bundles(FIXTURES_DIR))
        return srv

    yield start
    for srv in started:
        srv.close()


def run_all(base_url: str, capsys, *extra: str) -> tuple[int, dict, str]:
    code = main(["run", "--fhir-url", base_url, "--all", "--format", "json", *extra])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip().startswith("{") else {}), out.err


def ours(client: FhirClient) -> tuple[list[dict], list[dict]]:
    """Every RiskAssessment and Provenance this project wrote on the server."""
    return list(client.search("RiskAssessment", TAGGED)), list(client.search("Provenance", TAGGED))


def groups_by_fixture(report: dict, loaded) -> dict[str, str]:
    """Patient group per fixture patient id (server ids mapped back through the loader): the
    classification's group (a patient the run does not assess has no group of its own)."""
    back = {v: k for k, v in loaded.ids.items()}
    return {back.get(p["patient"], p["patient"]): (p.get("classification") or {}).get("group")
            for p in report["patients"]}


@pytest.mark.parametrize("kind", SERVERS)
def test_run_all_twice_writes_one_assessment_per_patient_and_nothing_the_second_time(kind, start_peer, capsys):
    srv = start_peer(kind)
    code, first, err = run_all(srv.base_url, capsys)
    assert code == 0, err
    assert first["actions"] == {"created": 56, "no-recurrence": 4}, first["actions"]
    with FhirClient(srv.base_url) as c:
        ras, provs = ours(c)
        assert len(ras) == 56 and len({r["subject"]["reference"] for r in ras}) == 56
        assert len(provs) == 56
        versions = {r["id"]: r["meta"]["versionId"] for r in ras}
        code, second, err = run_all(srv.base_url, capsys)
        assert code == 0, err
        assert second["actions"] == {"unchanged": 56, "no-recurrence": 4}, second["actions"]
        ras2, provs2 = ours(c)
        assert {r["id"]: r["meta"]["versionId"] for r in ras2} == versions   # nothing written
        assert len(provs2) == 56
    expected = yaml.safe_load((FIXTURES_DIR / "expected.yaml").read_text())
    got = groups_by_fixture(first, srv.loaded)
    for name, want in expected.items():
        pid = f"Patient/f{name[:2]}-pat"
        if pid in got and want.get("group"):
            assert got[pid] == want["group"], (kind, name)


def _bumped_rules(tmp_path: Path) -> Path:
    from rules import DEFAULT_RULESET

    data = yaml.safe_load(DEFAULT_RULESET.read_text())
    major, minor, patch = data["version"].split(".")
    data["version"] = f"{major}.{minor}.{int(patch) + 1}"
    path = tmp_path / "bumped.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("kind", SERVERS)
def test_a_rule_set_version_bump_updates_the_one_current_assessment(kind, start_peer, capsys, tmp_path):
    srv = start_peer(kind)
    assert run_all(srv.base_url, capsys)[0] == 0
    bumped = _bumped_rules(tmp_path)
    new_version = yaml.safe_load(bumped.read_text())["version"]
    code, report, err = run_all(srv.base_url, capsys, "--rules", str(bumped))
    assert code == 0, err
    assert report["actions"] == {"updated": 56, "no-recurrence": 4}, report["actions"]
    with FhirClient(srv.base_url) as c:
        ras, provs = ours(c)
        per_patient = Counter(r["subject"]["reference"] for r in ras)
        assert len(per_patient) == 56 and set(per_patient.values()) == {1}
        assert {r["method"]["coding"][0]["version"] for r in ras} == {new_version}
        assert len(provs) == 112                                   # one per write
        history = c.request("GET", f"RiskAssessment/{ras[0]['id']}/_history")
        assert len(history.json().get("entry", [])) == 2           # the old assessment is kept as history
    assert run_all(srv.base_url, capsys, "--rules", str(bumped))[1]["actions"] == {"unchanged": 56,
                                                                                 "no-recurrence": 4}


def test_600_patients_on_a_server_that_never_pages_are_all_classified(start_peer, capsys):
    """Medplum answers every search in one page with Bundle.total and no next link; the
    cohort search (_count=500) is continued with _offset, so nobody is left out."""
    prefixes = tuple("fghjkmnpqr")
    srv = start_peer("medplum", prefixes)
    code, report, err = run_all(srv.base_url, capsys)
    assert code == 0, err
    assert report["total"] == 600 == sum(report["groups"].values()) + report["actions"]["no-recurrence"], report
    assert report["actions"] == {"created": 560, "no-recurrence": 40}, report["actions"]
    with FhirClient(srv.base_url) as c:
        assert len(ours(c)[0]) == 560


def _without_offset(method: str, pq: str) -> str:
    """A server that ignores _offset (the proxy drops it before Medplum sees it)."""
    path, _, query = pq.partition("?")
    kept = "&".join(p for p in query.split("&") if p and not p.startswith("_offset="))
    return f"{path}?{kept}" if kept else path


def test_a_population_cut_short_without_a_way_to_the_rest_fails_the_run_naming_it(start_peer, capsys):
    """Proxy: Medplum never pages; here it also ignores _offset (no real server on this
    machine does both). 610 patients, cohort search _count=500: the run must fail, say
    why, and write nothing rather than classify 500 of 600."""
    srv = start_peer("medplum", tuple("fghjkmnpqr"))
    with RewriteProxy(srv.base_url, request=_without_offset) as proxy:
        code, report, err = run_all(proxy.base_url, capsys)
    assert code == 3, err
    assert "no next link" in err and "ignored _offset" in err and "Condition" in err, err
    assert "Traceback" not in err
    with FhirClient(srv.base_url) as c:
        assert ours(c) == ([], [])


def _identifier_never_matches(method: str, pq: str, status: int, body: object) -> tuple[int, object]:
    """A server whose token search never matches our identifier (as Medplum did with a '|'
    inside the value): every RiskAssessment?identifier= search answers an empty Bundle."""
    if method == "GET" and pq.startswith("/fhir/R4/RiskAssessment?") and "identifier=" in pq:
        return 200, {"resourceType": "Bundle", "type": "searchset", "total": 0}
    return status, body


def test_a_server_that_cannot_find_what_was_written_stops_the_run_after_one(start_peer, capsys):
    """Proxy: identifier searches on RiskAssessment match nothing. The writer must notice
    after its first write, stop naming the server behaviour, and not write the rest."""
    srv = start_peer("medplum")
    with RewriteProxy(srv.base_url, reply=_identifier_never_matches) as proxy:
        code, _, err = run_all(proxy.base_url, capsys)
        assert code == 3, err
        assert "found nothing" in err and "&identifier=" in err and "duplicate" in err, err
        assert "Traceback" not in err
        with FhirClient(srv.base_url) as c:
            assert len(ours(c)[0]) == 1          # the one that revealed it, no more
        code, _, err = run_all(proxy.base_url, capsys)   # a re-run sees the hidden one and writes nothing
        assert code == 3, err
        assert "found by subject and tag" in err, err
    with FhirClient(srv.base_url) as c:
        assert len(ours(c)[0]) == 1


@pytest.mark.parametrize("kind", SERVERS)
def test_one_patient_with_more_results_than_a_page_is_read_whole(kind, start_peer, capsys):
    """501 tumour-size Observations for one patient (_count=500 per search): the newest
    study comes last, after 499 measurements entered in error. SEKMET pages with next links; Medplum answers one page with
    Bundle.total and no next link, so the search must go on with _offset. A record cut
    at 500 would miss the newest study (60 mm) and say resectable."""
    srv = start_peer(kind)
    pid = srv.loaded.ids["Patient/f01-pat"]
    template = next(e["resource"] for e in fixture_bundles(FIXTURES_DIR)[0]["entry"]
                    if e["resource"]["resourceType"] == "Observation" and "21889-1" in json.dumps(e["resource"]))

    def obs(day: str, mm: int, status: str = "final") -> dict:
        o = json.loads(json.dumps(template))
        o.pop("id", None)
        o["status"] = status
        o["subject"] = {"reference": pid}
        o["effectiveDateTime"] = day
        o["component"][0]["valueQuantity"]["value"] = mm
        return {"resource": o, "request": {"method": "POST", "url": "Observation"}}

    with FhirClient(srv.base_url) as c:
        # 499 withdrawn measurements (found by the search, ignored by the mapping), then the newest study
        c.transaction([obs("2023-05-20", 80, "entered-in-error") for _ in range(499)])
        c.transaction([obs("2023-07-01", 60)])
    code = main(["run", "--fhir-url", srv.base_url, "--patient", pid.split("/")[1], "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    [patient] = report["patients"]
    assert patient["group"] == "borderline-resectable", patient["classification"]["reason"]


@pytest.mark.parametrize("kind", SERVERS)
def test_assessments_of_an_earlier_release_are_taken_over_not_duplicated(kind, start_peer, capsys):
    """Releases before 0.2 wrote identifier ``Patient/<id>|<rule set>|<version>`` (and, where
    clients choose ids, an id hashed from it). After an upgrade each patient must still
    have exactly one current assessment: updated in place (server-assigned ids) or
    replaced by the new id in the same transaction (client ids)."""
    from engine.ruleset import load_ruleset
    from fhir_adapters.writeback.resources import legacy_id, legacy_key

    srv = start_peer(kind)
    assert run_all(srv.base_url, capsys, "--dry-run")[0] == 0
    rs = load_ruleset()
    with FhirClient(srv.base_url) as c:
        # What the earlier release left: one assessment per candidate, old identifier and id.
        patients = [p["patient"] for p in run_all(srv.base_url, capsys, "--dry-run")[1]["patients"]
                    if p["action"] == "would-create"]
        entries = []
        for pid in patients:
            ra = {"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": pid},
                  "meta": {"tag": [{"system": TAG_SYSTEM, "code": TAG}]},
                  "identifier": [{"system": "https://clm-stratify.org/fhir/NamingSystem/risk-assessment",
                                  "value": legacy_key(pid, rs.id, rs.version)}]}
            if kind == "sekmet":
                rid = legacy_id(pid, rs.id, rs.version)
                entries.append({"resource": {**ra, "id": rid}, "request": {"method": "PUT",
                                                                         "url": f"RiskAssessment/{rid}"}})
            else:
                entries.append({"resource": ra, "request": {"method": "POST", "url": "RiskAssessment"}})
        c.transaction(entries)
        assert len(ours(c)[0]) == len(patients) == 56
        code, report, err = run_all(srv.base_url, capsys)
        assert code == 0, err
        ras = ours(c)[0]
        assert Counter(r["subject"]["reference"] for r in ras) == Counter(patients)   # one each, no more
        assert all("|" not in r["identifier"][0]["value"] for r in ras)
        assert run_all(srv.base_url, capsys)[1]["actions"] == {"unchanged": 56, "no-recurrence": 4}


def test_next_links_that_never_end_stop_with_a_clear_error():
    """A scripted server (no real server here does this) whose every page repeats the same
    result with a new next link: the search stops after a few pages, naming why."""
    from itertools import count

    from fhir_adapters.fhir.client import FhirError
    from tests.support.http import LoopbackServer, send

    pages = count()

    def handle(h):
        n = next(pages)
        send(h, 200, {"resourceType": "Bundle", "type": "searchset",
                      "entry": [{"search": {"mode": "match"}, "resource": {"resourceType": "Observation", "id": "o1"}}],
                      "link": [{"relation": "next", "url": f"{srv.url}/fhir/Observation?page={n + 1}"}]})

    srv = LoopbackServer(handle)
    try:
        with FhirClient(f"{srv.url}/fhir") as c, pytest.raises(FhirError, match="nothing new"):
            list(c.search("Observation", {"patient": "p1"}))
        assert next(pages) < 10
    finally:
        srv.close()


@pytest.mark.parametrize("kind", SERVERS)
def test_a_server_error_while_checking_the_first_write_does_not_stop_writing(kind, start_peer, capsys):
    """Proxy: the lookup right after the first created assessment answers 500. That is
    no evidence the server cannot find it (found by the receiver's fault test, where it
    stopped all write-back for the life of the process): the run goes on, the next
    created assessment is checked instead, and no assessment is duplicated."""
    srv = start_peer(kind)
    state = {"posted": False, "failed": 0}

    def fail_the_check(method, pq, status, body):
        if method == "POST" and not state["posted"] and isinstance(body, dict) and body.get("type", "").endswith(
                "transaction-response"):
            state["posted"] = True
        elif method == "GET" and state["posted"] and not state["failed"] and "RiskAssessment" in pq:
            state["failed"] += 1
            return 500, {"resourceType": "OperationOutcome",
                         "issue": [{"severity": "error", "code": "exception", "diagnostics": "injected"}]}
        return status, body

    with RewriteProxy(srv.base_url, reply=fail_the_check) as proxy:
        code, report, err = run_all(proxy.base_url, capsys, "--no-bulk")
    assert state["failed"] == 1, proxy.requests
    assert code == 0, err
    assert "writing is stopped" not in err and "Traceback" not in err
    with FhirClient(srv.base_url) as c:
        ras, _ = ours(c)
    subjects = Counter(ra["subject"]["reference"] for ra in ras)
    assert len(ras) == report["actions"].get("created", 0) > 1
    assert max(subjects.values()) == 1
