"""Writing the result back: :mod:`~fhir_adapters.writeback.resources` builds the
RiskAssessment and Provenance (validated R4B models), :mod:`~fhir_adapters.writeback.strategy`
decides how this server finds and writes them, :mod:`~fhir_adapters.writeback.writer`
writes them (idempotent, one transaction)."""

__all__ = ["resources", "strategy", "writer"]
