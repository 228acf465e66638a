"""The FHIR client against a real SEKMET server: capabilities, CRUD, paging, batch,
transaction, conditional writes, exact decimals (the scripted-server tests of the same
client are in tests/unit/test_client.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest

from fhir_adapters.fhir.client import FhirClient, FhirConflict, FhirError
from fhir_adapters.fhir.local_server import LocalFhirServer


def _obs(subject: str, value: Decimal | float = Decimal("12.5")) -> dict:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "21889-1"}]},
            "subject": {"reference": f"Patient/{subject}"},
            "valueQuantity": {"value": value, "unit": "mm", "system": "http://unitsofmeasure.org", "code": "mm"}}


def _ra(rid: str, subject: str, p: Decimal = Decimal("0.05")) -> dict:
    return {"resourceType": "RiskAssessment", "id": rid, "status": "final",
            "subject": {"reference": f"Patient/{subject}"}, "prediction": [{"probabilityDecimal": p}]}


def _uid() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def fhir(fhir_server: LocalFhirServer) -> Iterator[FhirClient]:
    with FhirClient(fhir_server.base_url, retries=1, backoff=0.05) as client:
        yield client


@pytest.mark.integration
def test_capabilities_are_cached(fhir: FhirClient) -> None:
    cs = fhir.capabilities()
    assert cs.statement["resourceType"] == "CapabilityStatement" and cs.fhir_version == "4.0.1"
    assert fhir.capabilities() is cs and fhir.round_trips == 1
    fhir.capabilities(refresh=True)
    assert fhir.round_trips == 2


@pytest.mark.integration
def test_create_read_update_delete(fhir: FhirClient) -> None:
    status, created = fhir.create({"resourceType": "Patient", "active": True})
    assert status == 201 and created is not None and created["meta"]["versionId"] == "1"
    pid = created["id"]
    assert fhir.read("Patient", pid)["active"] is True  # type: ignore[index]
    status, updated = fhir.update({"resourceType": "Patient", "id": pid, "active": False})
    assert status == 200 and updated["meta"]["versionId"] == "2"  # type: ignore[index]
    rid = f"clm-{_uid()}"
    assert fhir.update(_ra(rid, pid))[0] == 201
    assert fhir.delete("Patient", pid) == 200
    assert fhir.read("Patient", pid) is None  # 410 Gone
    assert fhir.read("Patient", f"never-{_uid()}") is None  # 404
    status, existing = fhir.create(_ra("ignored", pid), if_none_exist=f"_id={rid}")
    assert status == 200 and existing["id"] == rid  # type: ignore[index]


@pytest.mark.integration
def test_search_follows_next_links_verbatim(fhir: FhirClient) -> None:
    subject = _uid()
    ids = {fhir.create(_obs(subject))[1]["id"] for _ in range(5)}  # type: ignore[index]
    sent: list[str] = []
    fhir.session.hooks["response"].append(lambda r, *a, **k: sent.append(r.url))
    pages = list(fhir.search_pages("Observation", [("patient", subject), ("_count", "2")]))
    assert [len(p.get("entry", [])) for p in pages] == [2, 2, 1]
    nexts = [link["url"] for p in pages for link in p["link"] if link["relation"] == "next"]
    assert sent[1:] == nexts  # followed exactly as given
    found = [r["id"] for r in fhir.search("Observation", {"patient": subject, "_count": "2"})]
    assert sorted(found) == sorted(ids) and len(found) == 5
    assert fhir.last_search_warnings == []


@pytest.mark.integration
def test_search_warnings_and_strict_handling(fhir: FhirClient) -> None:
    fhir.update(_ra(f"clm-{_uid()}", "x"))
    results = list(fhir.search("RiskAssessment", {"patient": "x"}))
    assert results and all(r["resourceType"] == "RiskAssessment" for r in results)
    assert any("Unknown search parameter 'patient'" in w for w in fhir.last_search_warnings)
    with pytest.raises(FhirError) as ei:
        list(fhir.search("RiskAssessment", {"patient": "x"}, strict=True))
    assert ei.value.status == 400 and "patient" in ei.value.outcome


@pytest.mark.integration
def test_batch_of_searches_and_follow_pages(fhir: FhirClient) -> None:
    subject = _uid()
    for _ in range(3):
        fhir.create(_obs(subject))
    before = fhir.round_trips
    out = fhir.batch([{"request": {"method": "GET", "url": f"Observation?patient={subject}&_count=2"}},
                      {"request": {"method": "GET", "url": f"Condition?patient={subject}"}}])
    assert fhir.round_trips == before + 1
    assert [e["response"]["status"] for e in out] == ["200 OK", "200 OK"]
    assert out[1]["resource"].get("entry", []) == []
    pages = list(fhir.follow_pages(out[0]["resource"]))
    assert len(pages) == 2 and sum(len(p["entry"]) for p in pages) == 3


@pytest.mark.integration
def test_transaction_put_and_provenance(fhir: FhirClient) -> None:
    rid = f"clm-{_uid()}"
    prov = {"resourceType": "Provenance", "target": [{"reference": f"RiskAssessment/{rid}"}],
            "recorded": "2026-01-02T03:04:05Z", "agent": [{"who": {"display": "clm-stratify"}}]}
    out = fhir.transaction([
        {"resource": _ra(rid, "p1"), "request": {"method": "PUT", "url": f"RiskAssessment/{rid}"}},
        {"resource": prov, "request": {"method": "POST", "url": "Provenance"}}])
    assert [e["response"]["status"].split()[0] for e in out] == ["201", "201"]
    assert [p["target"][0]["reference"] for p in fhir.search("Provenance", {"target": f"RiskAssessment/{rid}"})] \
        == [f"RiskAssessment/{rid}"]
    rid2 = f"clm-{_uid()}"
    bad = dict(prov, agent=None)
    del bad["agent"]
    with pytest.raises(FhirError, match="rolled back") as ei:
        fhir.transaction([
            {"resource": _ra(rid2, "p1"), "request": {"method": "PUT", "url": f"RiskAssessment/{rid2}"}},
            {"resource": bad, "request": {"method": "POST", "url": "Provenance"}}])
    assert ei.value.status == 400 and "agent" in ei.value.outcome
    assert fhir.read("RiskAssessment", rid2) is None  # nothing stored
    with pytest.raises(FhirConflict):
        fhir.transaction([{"resource": _ra(rid, "p1"),
                           "request": {"method": "PUT", "url": f"RiskAssessment/{rid}", "ifMatch": 'W/"9"'}}])


@pytest.mark.integration
def test_if_match_mismatch_is_a_conflict(fhir: FhirClient) -> None:
    rid = f"clm-{_uid()}"
    fhir.update(_ra(rid, "p1"))
    assert fhir.update(_ra(rid, "p1"), if_match='W/"1"')[0] == 200
    with pytest.raises(FhirConflict) as ei:
        fhir.update(_ra(rid, "p1"), if_match='W/"1"')
    assert ei.value.status == 412 and ei.value.outcome


@pytest.mark.integration
def test_decimals_are_stored_exactly(fhir: FhirClient) -> None:
    _, obs = fhir.create(_obs(_uid(), Decimal("49.9")))
    rid = f"clm-{_uid()}"
    fhir.update(_ra(rid, "p1", Decimal("0.05")))
    assert str(fhir.read("Observation", obs["id"])["valueQuantity"]["value"]) == "49.9"  # type: ignore[index]
    assert str(fhir.read("RiskAssessment", rid)["prediction"][0]["probabilityDecimal"]) == "0.05"  # type: ignore[index]
    _, obs2 = fhir.create(_obs(_uid(), 0.05))  # a float is written with repr: 0.05, not 0.05000000000000000277
    assert fhir.read("Observation", obs2["id"])["valueQuantity"]["value"] == Decimal("0.05")  # type: ignore[index]
