"""clm-stratify: resectability of recurrent colorectal liver metastases from FHIR data."""

from fhir_adapters.project import VERSION as __version__

__all__ = ["__version__"]
