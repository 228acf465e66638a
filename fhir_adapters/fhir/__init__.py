"""The FHIR layer: HTTP and FHIR R4 JSON, no clinical knowledge.

Start with :class:`fhir_adapters.fhir.client.FhirClient` (interactions) over
:class:`~fhir_adapters.fhir.transport.Transport` (the one place that sends);
:mod:`~fhir_adapters.fhir.reference` answers "which patient?" with one type,
:class:`~fhir_adapters.fhir.reference.PatientRef`;
:mod:`~fhir_adapters.fhir.capabilities` parses a CapabilityStatement once.
"""

__all__ = ["client", "transport", "codec", "errors", "auth", "reference", "capabilities", "timeline", "load",
           "local_server"]
