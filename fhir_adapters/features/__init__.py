"""Record -> features, one module per fact, the rules of evidence in
:mod:`fhir_adapters.features.evidence`; :func:`map_features` is the entry point."""

from fhir_adapters.features.mapping import map_features

__all__ = ["map_features"]
