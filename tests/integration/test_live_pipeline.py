"""The live pipeline against a real SEKMET FHIR server process on 127.0.0.1."""

from __future__ import annotations

import json
from decimal import Decimal
import socket
import subprocess
import sys

import pytest
from engine.ruleset import load_ruleset
from fhir.resources.R4B.provenance import Provenance
from fhir.resources.R4B.riskassessment import RiskAssessment

from clm_stratify.cli import main
from clm_stratify.pipeline import Rules, Stratifier
from engine.classify import Engine
from fhir_adapters.project import GROUP_SYSTEM, TAG_SYSTEM
from fhir_adapters.writeback.resources import assessment_id
from fhir_adapters.sources.bundle import read_bundle_file
from fhir_adapters.fhir.client import FhirClient
from fhir_adapters.fhir.reference import PatientRef
from fhir_adapters.fhir.load import fixture_bundles, load_bundles
from fhir_adapters.fhir.local_server import LocalFhirServer
from fhir_adapters.features.mapping import map_features
from fhir_adapters.terminology import load_terminology
from fixtures import FIXTURES_DIR

pytestmark = pytest.mark.integration
RULESET = (load_ruleset().id, load_ruleset().version)  # the default rule set, as written back


def file_results() -> dict[str, object]:
    """The file-based classification of every fixture, by patient id."""
    engine, terminology = Engine.default(), load_terminology()
    out = {}
    for path in sorted(FIXTURES_DIR.glob("[0-9][0-9]-*.json")):
        r = engine.classify(map_features(read_bundle_file(path), terminology))
        out[r.patient.split("/", 1)[1]] = r
    return out


FILE_RESULTS = file_results()


def ra_of(client: FhirClient, pid: str) -> dict | None:
    return client.read("RiskAssessment", assessment_id(f"Patient/{pid}", RULESET[0]))


def all_ras(client: FhirClient) -> list[dict]:
    return list(client.search("RiskAssessment", {"_tag": f"{TAG_SYSTEM}|clm-stratify", "_count": "500"}))


def run_json(argv, capsys) -> tuple[int, dict]:
    code = main(argv + ["--format", "json"])
    out = capsys.readouterr()
    return code, json.loads(out.out) if out.out.strip() else {"stderr": out.err}


def test_dry_run_writes_nothing(server, client, capsys):
    code, out = run_json(["run", "--fhir-url", server.base_url, "--all", "--dry-run"], capsys)
    assert code == 0
    assert {p["action"] for p in out["patients"]} <= {"would-create", "no-recurrence"}
    assert all_ras(client) == []
    would = next(p for p in out["patients"] if p["action"] == "would-create")["would_write"]
    assert [r["resourceType"] for r in would] == ["RiskAssessment", "Provenance"]


def test_all_patients_match_file_classification_and_write_valid_r4(server, client, capsys):
    code, out = run_json(["run", "--fhir-url", server.base_url, "--all"], capsys)
    assert code == 0, out
    assert out["write_strategy"] == "update-as-create"
    assert any("not in the CapabilityStatement" in n for n in out["strategy_notes"])
    seen = {p["patient"].split("/", 1)[1]: p for p in out["patients"]}
    for pid, p in seen.items():
        assert p["classification"]["group"] == FILE_RESULTS[pid].group, pid
        assert p["classification"]["status"] == FILE_RESULTS[pid].status, pid
        # The run reports a group and status only for the patients it assesses.
        shown = (p["group"], p["status"])
        assert shown == ((FILE_RESULTS[pid].group, FILE_RESULTS[pid].status) if FILE_RESULTS[pid].assessed
                         else (None, None)), pid
    # Every fixture patient with a liver recurrence (present or unconfirmed) has one RA.
    expected = {pid for pid, r in FILE_RESULTS.items() if r.facts["liver_recurrence"].state != "absent"}
    ras = all_ras(client)
    assert sorted(r["subject"]["reference"] for r in ras) == sorted(f"Patient/{p}" for p in expected)
    for ra in ras:
        RiskAssessment.model_validate(ra)
        pid = ra["subject"]["reference"].split("/", 1)[1]
        risk = ra["prediction"][0]["qualitativeRisk"]["coding"][0]
        assert risk["system"] == GROUP_SYSTEM and risk["code"] == FILE_RESULTS[pid].group
        assert ra["status"] == FILE_RESULTS[pid].status
        for p in ra["prediction"]:
            if "probabilityDecimal" in p:
                assert 0 <= p["probabilityDecimal"] <= 1  # fractions, the documented convention
                assert p["whenRange"]["high"] == {"value": 5, "unit": "years", "system": "http://unitsofmeasure.org", "code": "a"}
        assert ra["method"]["coding"][0]["version"] == RULESET[1]
        provs = list(client.search("Provenance", {"target": f"RiskAssessment/{ra['id']}"}))
        assert len(provs) == 1
        Provenance.model_validate(provs[0])
        assert "clm-stratify" in provs[0]["agent"][0]["who"]["display"]
        assert any("sha256" in (e["what"].get("display") or "") for e in provs[0]["entity"])


def test_bulk_export_and_search_paths_agree(server, capsys):
    groups = {}
    for flag in ([], ["--no-bulk"]):
        code, out = run_json(["run", "--fhir-url", server.base_url, "--all", "--dry-run", *flag], capsys)
        assert code == 0
        groups[out["data_source"]] = {p["patient"]: (p["group"], p["status"]) for p in out["patients"]}
    assert set(groups) == {"bulk-export", "search"}
    assert groups["bulk-export"] == groups["search"]
    for patient, (group, status) in groups["search"].items():
        r = FILE_RESULTS[patient.split("/", 1)[1]]
        assert (group, status) == ((r.group, r.status) if r.assessed else (None, None)), patient


def test_one_patient_matches_file_classification(server, client, capsys):
    pid = "f12-pat"
    code, out = run_json(["run", "--fhir-url", server.base_url, "--patient", pid], capsys)
    assert code == 0
    [p] = out["patients"]
    assert p["group"] == FILE_RESULTS[pid].group == "borderline-resectable"
    assert p["classification"]["criteria"] == FILE_RESULTS[pid].criteria_values()
    # basis names the same resources as the file-based evidence (versioned on the server)
    ra = ra_of(client, pid)
    basis = {b["reference"].split("/_history/")[0] for b in ra["basis"]}
    assert basis == {r.split("/_history/")[0] for r in FILE_RESULTS[pid].evidence_refs()}


def test_second_run_adds_no_risk_assessment_and_no_version(server, client, capsys):
    main(["run", "--fhir-url", server.base_url, "--all"])
    before = {r["id"]: r["meta"]["versionId"] for r in all_ras(client)}
    provenances = len(list(client.search("Provenance", {"_tag": f"{TAG_SYSTEM}|clm-stratify", "_count": "500"})))
    capsys.readouterr()
    code, out = run_json(["run", "--fhir-url", server.base_url, "--all"], capsys)
    assert code == 0
    assert {p["action"] for p in out["patients"]} <= {"unchanged", "no-recurrence"}
    assert {r["id"]: r["meta"]["versionId"] for r in all_ras(client)} == before
    assert len(list(client.search("Provenance", {"_tag": f"{TAG_SYSTEM}|clm-stratify", "_count": "500"}))) == provenances


def test_changed_observation_updates_the_existing_assessment(server, client, capsys):
    pid = "f06-pat"  # 49.9 mm: resectable
    main(["run", "--fhir-url", server.base_url, "--patient", pid])
    first = ra_of(client, pid)
    assert first["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "resectable"
    obs = client.read("Observation", "f06-ct-les1")  # plain style: 33728-7 with valueQuantity 49.9 mm
    assert obs["valueQuantity"]["value"] == Decimal("49.9")
    obs["valueQuantity"].update(value=Decimal("5.1"), unit="cm", code="cm")
    client.update(obs)
    capsys.readouterr()
    code, out = run_json(["run", "--fhir-url", server.base_url, "--patient", pid], capsys)
    assert code == 0 and out["patients"][0]["action"] == "updated"
    second = ra_of(client, pid)
    assert second["id"] == first["id"]
    assert int(second["meta"]["versionId"]) == int(first["meta"]["versionId"]) + 1
    assert second["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "borderline-resectable"
    history = client.request("GET", f"RiskAssessment/{first['id']}/_history").json()
    assert len(history["entry"]) >= 2  # the server keeps the previous version
    assert len([r for r in all_ras(client) if r["subject"]["reference"] == f"Patient/{pid}"]) == 1


def test_unknown_patient_fails_with_exit_4(server, capsys):
    code = main(["run", "--fhir-url", server.base_url, "--patient", "no-such-patient"])
    out = capsys.readouterr()
    assert code == 4   # EXIT_NOT_FOUND (tests/integration/test_cli_truth.py has the rest)
    assert f"no patient Patient/no-such-patient on {server.base_url}" in out.err


def test_server_down_gives_a_clear_error_and_exit_3(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["run", "--fhir-url", f"http://127.0.0.1:{port}/fhir", "--all", "--connect-timeout", "0.5"])
    err = capsys.readouterr().err
    assert code == 3
    assert "unavailable" in err and f"127.0.0.1:{port}" in err and "Traceback" not in err


def test_stratifier_serialises_a_patient(server, client):
    """Concurrent evaluations of one patient leave one RiskAssessment."""
    from concurrent.futures import ThreadPoolExecutor
    s = Stratifier(client, Rules(Engine.default(), load_terminology()))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: s.patient(PatientRef("f03-pat")), range(8)))
    assert not [r for r in results if r.failed]
    assert len([r for r in all_ras(client) if r["subject"]["reference"] == "Patient/f03-pat"]) == 1


def test_demo_command_on_a_fresh_server():
    proc = subprocess.run([sys.executable, "-m", "clm_stratify", "demo"], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = sum(1 for r in FILE_RESULTS.values() if r.facts["liver_recurrence"].state != "absent")
    assert f"created {expected}" in proc.stdout
    assert "was stopped" in proc.stdout and "RiskAssessment?_tag=" not in proc.stdout   # no link to a stopped server


# --------------------------------------------------------------------------- SMART
@pytest.fixture(scope="module")
def smart(tmp_path_factory):
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from fhir_adapters.fhir.auth import SmartBackendServices

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    key_file = tmp_path_factory.mktemp("smart") / "clm.pem"
    key_file.write_bytes(pem)
    key_file.chmod(0o600)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid="clm-1", alg="RS384", use="sig")
    with LocalFhirServer(data_dir=tmp_path_factory.mktemp("smart-srv"),
                         smart_clients={"clm": {"keys": [jwk]}}, smart_scopes="system/*.*") as srv:
        auth = SmartBackendServices("clm", pem, base_url=srv.base_url, scope="system/*.*")
        with FhirClient(srv.base_url, auth) as c:
            load_bundles(c, fixture_bundles(FIXTURES_DIR)[:12])
        yield srv, key_file


def test_run_with_smart_backend_services(smart, capsys):
    srv, key_file = smart
    argv = ["run", "--fhir-url", srv.base_url, "--patient", "f05-pat", "--auth", "smart",
            "--smart-client-id", "clm", "--smart-key", str(key_file)]
    code, out = run_json(argv + ["--smart-scope", "system/*.read system/*.write"], capsys)
    assert code == 0, out
    assert out["patients"][0]["action"] == "created"
    assert out["patients"][0]["group"] == FILE_RESULTS["f05-pat"].group


def test_read_only_smart_scope_still_reads_without_batch(smart, capsys):
    """SEKMET refuses a batch of reads to a read-only token (403): the pull falls back."""
    srv, key_file = smart
    code, out = run_json(["run", "--fhir-url", srv.base_url, "--patient", "f09-pat", "--dry-run",
                          "--auth", "smart", "--smart-client-id", "clm", "--smart-key", str(key_file),
                          "--smart-scope", "system/*.read"], capsys)
    assert code == 0, out
    assert out["patients"][0]["group"] == FILE_RESULTS["f09-pat"].group
    assert out["patients"][0]["action"] == "would-create"


def test_without_credentials_the_server_refuses(smart, capsys):
    srv, _ = smart
    code = main(["run", "--fhir-url", srv.base_url, "--patient", "f05-pat"])
    out = capsys.readouterr()
    assert code in (1, 3)
    assert "401" in out.out + out.err and "Traceback" not in out.err
