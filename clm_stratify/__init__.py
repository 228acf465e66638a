"""clm-stratify: resectability of recurrent colorectal liver metastases from FHIR data."""

__version__ = "0.1.0"
