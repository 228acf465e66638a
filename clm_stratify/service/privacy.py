"""What the receiver may say about a patient where anyone may read it: nothing.

``/healthz`` needs no credentials, and logs travel (aggregators, tickets). Both name
the work item or notification id instead of the patient, and never repeat what the FHIR
server said in an error: a server's diagnostics can hold anything (``Resource
Patient/17 (Eriksen, Liv, MRN-0005) is not known``). The full text of a failure is kept
where an operator looks on purpose: the inbox (``clm-stratify inbox``) and DEBUG logs.

* :func:`redact` replaces patient references (``Patient/<id>``, also URL-encoded as a
  search parameter) and the patient's bare id;
* :func:`public_error` is a failure as it may be shown: for a FHIR error with an HTTP
  status, the request and the status only;
* :class:`RedactingFilter` applies :func:`redact` to every log record of the process
  (the FHIR layer's own warnings name request paths).
"""

from __future__ import annotations

import logging
import re

from fhir_adapters.fhir.errors import FhirError

_PATIENT_REF = re.compile(r"Patient(?:/|%2F)[A-Za-z0-9\-.%]+", re.IGNORECASE)
DIAGNOSTICS_HIDDEN = "(the server's diagnostics: `clm-stratify inbox`, or --log-level debug)"


def redact(text: str, patient: str | None = None) -> str:
    """``text`` for a log line or /healthz: patient references (and the patient's bare id)
    replaced, on one line.

    >>> redact("GET /fhir/Patient/p-17: no such patient (p-17)", "p-17")
    'GET /fhir/Patient/[redacted]: no such patient ([redacted])'
    >>> redact("GET /fhir/Observation?subject=patient%2Fp-17&x=1")
    'GET /fhir/Observation?subject=Patient/[redacted]&x=1'
    """
    text = _PATIENT_REF.sub("Patient/[redacted]", re.sub(r"\s*\n\s*", " | ", text.strip()))
    if patient:
        bare = patient.split("/", 1)[-1]
        text = re.sub(rf"(?<![A-Za-z0-9\-.]){re.escape(bare)}(?![A-Za-z0-9\-.])", "[redacted]", text)
    return text


def public_error(error: str, cause: BaseException | None = None, patient: str | None = None) -> str:
    """A failure as /healthz and non-DEBUG logs may show it.

    A FHIR error that carries a server's answer (an HTTP status and an OperationOutcome
    or body) is reduced to the request and the status; anything else is ``error``
    redacted.

    >>> e = FhirError("GET http://h/fhir/Patient/p1 -> HTTP 400: Patient/p1 (Eriksen, Liv) unknown",
    ...               status=400, url="http://h/fhir/Patient/p1", outcome="Patient/p1 (Eriksen, Liv) unknown",
    ...               method="GET")
    >>> public_error(str(e), e, "p1")  # doctest: +ELLIPSIS
    "GET http://h/fhir/Patient/[redacted] -> HTTP 400 (the server's diagnostics: ..."
    """
    if isinstance(cause, FhirError) and cause.status is not None:
        kind = "" if type(cause) is FhirError else f"{type(cause).__name__}: "
        text = f"{kind}{cause.method or 'request'} {cause.url} -> HTTP {cause.status}"
        if cause.outcome:
            text += f" {DIAGNOSTICS_HIDDEN}"
        return redact(text, patient)
    return redact(error, patient)


class RedactingFilter(logging.Filter):
    """Patient references out of every record (installed on the log handlers of `serve`
    and `cds-hooks`). The message is formatted here, once, then redacted; so is a
    traceback (its lines kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:   # a bad format string: leave it to the handler to report
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _PATIENT_REF.sub("Patient/[redacted]", record.exc_text)
        return True


def install_log_redaction() -> None:
    """Add :class:`RedactingFilter` to every handler of the root logger."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
