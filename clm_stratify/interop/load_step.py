"""Step 2 of ``clm-stratify interop``: load the synthetic patients of ``fixtures/``, tagged
with the run and with run-suffixed ids, one transaction per patient."""

from __future__ import annotations

import yaml

from clm_stratify.interop.checks import FAIL, PASS, short_list
from clm_stratify.interop.run_state import FixturePatient, RunState
from clm_stratify.interop import probes
from fhir_adapters.fhir.client import FhirError
from fhir_adapters.fhir.reference import PatientRef
from clm_stratify.interop.probes import ref_of
from fhir_adapters.fhir.load import as_transaction_entries


class LoadStep(RunState):
    """The ``load.fixtures`` check."""

    def load(self) -> None:
        expected = yaml.safe_load((self.fixtures_dir / "expected.yaml").read_text())
        failures: list[str] = []
        outcome = ""
        with self.timed() as t:
            for name, bundle in zip(self.fixture_names, self._bundles()):
                scoped, ids = probes.run_scoped_bundle(bundle, self.run_id)
                resources = [e["resource"] for e in scoped["entry"]]
                self.loaded += resources
                try:
                    self.client.transaction(as_transaction_entries(scoped, self.tag))
                except FhirError as exc:
                    failures.append(f"{name}: {exc}")
                    outcome = outcome or exc.outcome
                    continue
                [patient] = [r for r in resources if r["resourceType"] == "Patient"]
                original = next(k for k, v in ids.items() if v == ref_of(patient)).split("/", 1)[1]
                want = expected.get(name) or {}
                self.patients.append(FixturePatient(name, original, PatientRef(patient["id"]), want.get("group", "?"),
                                                    want.get("status", "?"), resources))
        n = sum(len(p.resources) for p in self.patients)
        detail = (f"{n} resources of {len(self.patients)} patients, one transaction per patient (PUT by id); "
                  f"ids end in -{self.run_id}, meta.tag {probes.tag_token(self.tag)}")
        if failures:
            self.check("load.fixtures", "load tagged synthetic patients", FAIL,
                       f"{len(failures)} of {len(self.fixture_names)} failed: {short_list(failures, 3)}; {detail}",
                       outcome, t[0])
        else:
            self.check("load.fixtures", "load tagged synthetic patients", PASS, detail, seconds=t[0])
