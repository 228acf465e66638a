"""``clm-stratify interop``: can this FHIR server store tumour data, let the rules engine
read it back, and accept a RiskAssessment?

One run, five steps, each timed (the JSON report has the figures):

1. **capabilities**: the CapabilityStatement: FHIR version, and what the run relies on
   (search by patient and code, batch, transaction, update-as-create, conditional
   create / update, RiskAssessment search, delete). What is missing is a ``warn`` that
   names the fallback the project uses there (write strategy from
   :func:`fhir_adapters.writeback.strategy.choose`; batch or parallel searches).
2. **load**: the synthetic patients of ``fixtures/``, each resource tagged with the run
   (:data:`~clm_stratify.interop.probes.RUN_TAG_SYSTEM` | run id) and its id suffixed
   with the run id (references rewritten), so runs never collide on a shared sandbox; on
   a server that assigns ids, POSTed with ``urn:uuid`` fullUrls and known by the ids the
   server gave (:mod:`.load_step`).
3. **read-back**: every patient through :func:`fhir_adapters.sources.pull.fetch_patient`
   (the pipeline's own searches), compared with what a correct server must return;
   paging with ``_count=2``; then behaviour probes (unknown parameter with and without
   ``Prefer: handling=strict``, a stale ``If-Match``, a conditional create with two
   matches).
4. **write**: classify (:class:`~clm_stratify.pipeline.Stratifier`, as ``run --all``),
   compare with ``fixtures/expected.yaml``, write the RiskAssessments, read them back
   (valid R4B, group, status), write again (must be ``unchanged``; still one
   RiskAssessment and one Provenance per patient); do ``RiskAssessment?patient=`` and
   ``?identifier=`` find the assessment just written?
5. **cleanup**: delete everything the run created (unless ``keep``) and say what could
   not be deleted.

Quirks met on the way are named in the report (:data:`QUIRKS`), each only when the server
did it. No check passes on an empty or absent answer: a pass needs positive evidence
(the resource, the result, the status code). Exit code: 0 when no check failed, 1 when
one did, 3 when the CapabilityStatement cannot be read.

The package, one module per concern: :mod:`.checks` (check and report types, the text
table), :mod:`.run_state` (what a run holds, its bookkeeping), one module per step
(:mod:`.capabilities_step`, :mod:`.load_step`, :mod:`.readback_step` and
:mod:`.behaviour_probes`, :mod:`.write_step`, :mod:`.cleanup_step`) and :mod:`.run`
(the order of the steps, ``run_command``). The FHIR side is in
:mod:`clm_stratify.interop.probes`.
"""

from clm_stratify.interop.checks import (EXIT_FAILED, EXIT_OK, EXIT_SERVER, FAIL, PASS, QUIRKS, SKIP,
                                         SKIPPED_WITHOUT_ASSESSMENTS, SKIPPED_WITHOUT_DATA, STEPS, WARN, Check,
                                         InteropReport, Quirk, table)
from clm_stratify.interop.run import InteropRun, run_command
from clm_stratify.interop.run_state import FixturePatient

__all__ = [
    "PASS", "WARN", "FAIL", "SKIP", "STEPS", "EXIT_OK", "EXIT_FAILED", "EXIT_SERVER", "QUIRKS",
    "SKIPPED_WITHOUT_ASSESSMENTS", "SKIPPED_WITHOUT_DATA", "Check", "Quirk", "FixturePatient", "InteropReport",
    "InteropRun", "table", "run_command",
]
