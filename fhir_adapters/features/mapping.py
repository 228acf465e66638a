"""FHIR R4 resources of one patient -> tumour features (docs: clinical-basis.md).

Each feature is a :class:`engine.features.Fact` decided by its own module, under the
rules of evidence stated in :mod:`fhir_adapters.features.evidence`. This module only
orchestrates: it calls the facts in the order their boundaries need (the reference
resection first, the recurrence and its imaging next, the judgements placed against
them last), collecting the warnings of all of them in one
:class:`~fhir_adapters.features.evidence.MappingContext`.

======================================  ==============================================
fact                                    module
======================================  ==============================================
what is not evidence (warnings)         :mod:`~fhir_adapters.features.evidence`
prior liver resection, liver recurrence :mod:`~fhir_adapters.features.recurrence`
studies of the recurrence               :mod:`~fhir_adapters.features.studies`
                                        (one measurement: :mod:`~fhir_adapters.features.measurements`)
tumour count, largest diameter          :mod:`~fhir_adapters.features.lesions`
imaging measurements current            :mod:`~fhir_adapters.features.currency`
extrahepatic disease                    :mod:`~fhir_adapters.features.extrahepatic`
technical resectability                 :mod:`~fhir_adapters.features.technical`
adjuvant chemotherapy                   :mod:`~fhir_adapters.features.chemotherapy`
======================================  ==============================================
"""

from __future__ import annotations

from engine.features import Features
from fhir_adapters.features.chemotherapy import adjuvant_chemotherapy
from fhir_adapters.features.currency import imaging_currency
from fhir_adapters.features.evidence import MappingContext, name_what_is_not_evidence
from fhir_adapters.features.extrahepatic import extrahepatic_disease
from fhir_adapters.features.lesions import lesions
from fhir_adapters.features.recurrence import liver_recurrence, prior_liver_resection, reference_resection
from fhir_adapters.features.studies import Study, studies_of_recurrence
from fhir_adapters.features.technical import technical_resectability
from fhir_adapters.fhir.timeline import When
from fhir_adapters.sources.record import PatientRecord
from fhir_adapters.terminology import Terminology


class FeatureMapper:
    """Maps one :class:`PatientRecord` to :class:`Features` with one terminology."""

    def __init__(self, terminology: Terminology):
        self.terminology = terminology

    def map(self, record: PatientRecord) -> Features:
        ctx = MappingContext(record, self.terminology)
        name_what_is_not_evidence(ctx)
        resection = reference_resection(ctx)
        liver, onset = liver_recurrence(ctx, resection)
        imaging = studies_of_recurrence(ctx, liver.value is True, resection, onset)
        count, size = lesions(ctx, imaging)
        current, latest_imaging = imaging_currency(ctx, imaging)
        extrahepatic = extrahepatic_disease(ctx)
        technical = technical_resectability(ctx, resection, onset, latest_imaging)
        adjuvant = adjuvant_chemotherapy(ctx, resection, recurrence_found(onset, imaging.studies))
        return Features(
            patient=record.patient_ref, liver_recurrence=liver, tumour_count=count,
            largest_diameter_mm=size, extrahepatic_disease=extrahepatic,
            technical_resectability=technical, adjuvant_chemotherapy=adjuvant,
            prior_liver_resection=prior_liver_resection(resection), imaging_measurements=current,
            warnings=tuple(dict.fromkeys(ctx.warnings)),
        )


def recurrence_found(onset: When | None, studies: list[Study]) -> When | None:
    """When the recurrence was found: the earlier of its Condition's onset and its first
    study (the end of the adjuvant window)."""
    return min((w for w in (onset, studies[0].when if studies else None) if w is not None),
               key=When.sort_key, default=None)


def map_features(record: PatientRecord, terminology: Terminology) -> Features:
    """Convenience wrapper: ``FeatureMapper(terminology).map(record)``."""
    return FeatureMapper(terminology).map(record)
