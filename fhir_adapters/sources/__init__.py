"""Where one patient's record comes from, and the record itself.

* :mod:`~fhir_adapters.sources.pull`: searches on a server (one batch round trip per
  patient, or per chunk of patients);
* :mod:`~fhir_adapters.sources.bulk`: Bulk Data ``$export`` spooled to SQLite by patient;
* :mod:`~fhir_adapters.sources.bundle`: a Bundle file;
* :mod:`~fhir_adapters.sources.record`: :class:`~fhir_adapters.sources.record.PatientRecord`,
  which sorts every resource into evidence, unattributable, unreadable or foreign.
"""

__all__ = ["pull", "bulk", "bundle", "record"]
