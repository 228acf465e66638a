"""Everything that speaks FHIR or HTTP, in subpackages that follow the data (lowest first):

* :mod:`fhir_adapters.fhir`: the FHIR layer, no clinical knowledge (HTTP client, JSON
  codec, auth, references and the patient type, server capabilities, FHIR dates);
* :mod:`fhir_adapters.terminology`: what codes mean (``rules/terminology.yaml``);
* :mod:`fhir_adapters.sources`: where a patient's record comes from (server pull, Bulk
  export, a Bundle file) and the record itself;
* :mod:`fhir_adapters.features`: record -> features, one module per fact;
* :mod:`fhir_adapters.writeback`: the RiskAssessment and Provenance, and how to write them.

:mod:`fhir_adapters.project` holds the project's constants, below everything.
"""

__all__ = ["project", "fhir", "terminology", "sources", "features", "writeback"]
