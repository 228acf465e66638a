"""Step 2 of ``clm-stratify interop``: load the synthetic patients of ``fixtures/``, tagged
with the run and with run-suffixed ids, one transaction per patient.

How depends on the server (:func:`fhir_adapters.fhir.load.load_method`): ``PUT [type]/[id]``
when it lets clients choose ids, else ``POST`` with ``urn:uuid`` fullUrls (the server
assigns the ids; they are read from each entry's ``response.location``). Either way the
run keeps the resources as the server holds them (server ids, references rewritten), so
the later steps ask for the patients by their ids on the server and clean-up deletes them
by those ids (and by the run tag, which every resource carries)."""

from __future__ import annotations

import yaml

from clm_stratify.interop.checks import FAIL, PASS, short_list
from clm_stratify.interop.run_state import FixturePatient, RunState
from clm_stratify.interop import probes
from fhir_adapters.fhir.client import FhirError
from fhir_adapters.fhir.load import PUT_BY_ID, Loaded, load_bundle, load_method
from fhir_adapters.fhir.reference import PatientRef
from clm_stratify.interop.probes import ref_of


def _status_ok(response: dict) -> bool:
    """A transaction-response entry says 200 or 201."""
    status = str((response.get("response") or {}).get("status") or "") if isinstance(response, dict) else ""
    return status[:3] in ("200", "201")


class LoadStep(RunState):
    """The ``load.fixtures`` check."""

    def load(self) -> None:
        expected = yaml.safe_load((self.fixtures_dir / "expected.yaml").read_text())
        failures: list[str] = []
        outcome = ""
        types = {e["resource"]["resourceType"] for b in self._bundles() for e in b.get("entry", [])}
        method = load_method(self.client.capabilities(), types)
        self.report.info["load_method"] = method
        with self.timed() as t:
            for name, bundle in zip(self.fixture_names, self._bundles()):
                scoped, ids = probes.run_scoped_bundle(bundle, self.run_id)
                loaded = Loaded(method=method)
                try:
                    responses = load_bundle(self.client, scoped, loaded, self.tag)
                except FhirError as exc:
                    failures.append(f"{name}: {exc}")
                    outcome = outcome or exc.outcome
                    continue   # what a server without rollback kept carries the run tag: clean-up sweeps it
                stored = [probes.as_stored(e["resource"], loaded.ids) for e in scoped["entry"]]
                self.loaded += stored
                refused = [f"{ref_of(r)}: {(x.get('response') or {}).get('status') if isinstance(x, dict) else x}"
                           for r, x in zip(stored, responses) if not _status_ok(x)]
                if refused:
                    failures.append(f"{name}: entries not 200/201: {short_list(refused, 2)}")
                    continue
                [(sent, patient)] = [(e["resource"], r) for e, r in zip(scoped["entry"], stored)
                                     if r["resourceType"] == "Patient"]
                original = next(k for k, v in ids.items() if v == ref_of(sent)).split("/", 1)[1]
                want = expected.get(name) or {}
                self.patients.append(FixturePatient(name, original, PatientRef(patient["id"]), want.get("group", "?"),
                                                    want.get("status", "?"), stored))
        n = sum(len(p.resources) for p in self.patients)
        if method == PUT_BY_ID:
            how = f"PUT by id (client-assigned ids ending in -{self.run_id})"
        else:
            how = ("POST with urn:uuid fullUrls (the server assigns ids: it does not declare updateCreate; "
                   "ids read from response.location)")
        detail = (f"{n} resources of {len(self.patients)} patients, one transaction per patient, {how}; "
                  f"meta.tag {probes.tag_token(self.tag)}")
        if failures or not self.patients:
            self.check("load.fixtures", "load tagged synthetic patients", FAIL,
                       f"{len(failures)} of {len(self.fixture_names)} failed: {short_list(failures, 3)}; {detail}"
                       if failures else f"no fixture patient to load; {detail}", outcome, t[0])
        else:
            self.check("load.fixtures", "load tagged synthetic patients", PASS, detail, seconds=t[0])
