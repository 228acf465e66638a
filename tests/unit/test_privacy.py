"""The log filter of `serve` and `cds-hooks` (clm_stratify.service.privacy): no patient
reference in a record's message or in its traceback, whoever logs it."""

from __future__ import annotations

import io
import logging

from clm_stratify.service.privacy import RedactingFilter


def _logged(emit) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("test_privacy")
    log.addHandler(handler)
    log.propagate = False
    try:
        emit(log)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_references_leave_messages_and_tracebacks():
    def emit(log):
        log.warning("GET /fhir/Observation?subject=Patient%%2F%s failed", "p-17")
        try:
            raise ValueError("no data for Patient/p-17")
        except ValueError:
            log.exception("a fault with %s", "Patient/p-17")

    text = _logged(emit)
    assert "p-17" not in text, text
    assert text.count("Patient/[redacted]") == 4   # message, message, source line and error in the traceback
    assert "Traceback (most recent call last):" in text and "\n" in text.split("Traceback")[1]   # lines kept
