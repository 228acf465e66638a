"""A population's FHIR NDJSON (Bulk Data files), line by line: whose each line is, which
shared resources it needs, and whether the mapping can use it at all.

The same three answers are given twice, on purpose:

* :func:`read_line` in Python (the local path, and the lines the JVM cannot parse);
* :func:`spark_line_columns` as Spark SQL columns evaluated on the JVM, so that a
  cluster keys and filters every line *before* the shuffle without starting Python.

``tests/unit/test_ndjson_keys.py`` proves the two equal line by line (relative,
absolute, ``_history``, ``patient`` instead of ``subject``, no subject, wrong JSON
types, escapes, non-ASCII text). The rules are those of
:func:`fhir_adapters.fhir.reference.patient_of`: a line's **owner** is the Patient a
literal ``subject`` (or ``patient``) reference names, relative or absolute (on ``base``
when one is given); a Patient owns itself.

What is kept (everything else is dropped before grouping):

* only the resource types the mapping reads (:data:`MAPPED_TYPES`);
* an Observation or DiagnosticReport only when its text *may* carry one of the codes
  the mapping reads there (:func:`Prefilter.may_match`). The test is on the raw line and
  conservative: codes compare without dots, spaces or case (as the terminology does),
  and a line with a ``\\u`` escape or any non-ASCII character is always kept, so no line
  that could match is ever dropped. The exact matching happens later, in the mapping.

Shared resources are **joined by reference**, never copied to every patient: a
Medication or BodyStructure line is offered under its ``Type/id`` (:attr:`LineInfo.joined`)
to the patients whose lines reference it (:attr:`LineInfo.wants`: ``medicationReference``
and ``focus``). A kept line that has no owner and is not a Medication cannot be shown to
be anyone's (a subject by identifier or display only, a Group, none): it goes to every
record as *unattributable*, where it can cast doubt but never prove a fact, exactly as in
a Bulk ``$export`` run.

A line that is not a JSON object with a string ``resourceType``, or that holds U+FFFD
(invalid UTF-8, or text damaged by a lossy conversion upstream), is an error
(:class:`BadLine`): a population run never classifies from records it could not read whole.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

from fhir_adapters.fhir.reference import Reference, is_id, patient_of
from fhir_adapters.sources.record import MAPPED_TYPES
from fhir_adapters.terminology import CodeList, Terminology

#: Shared resources a patient's lines reference; joined to that patient by reference.
JOINED_TYPES = ("Medication", "BodyStructure")
#: Joined only (never broadcast when unowned): resources that are about no patient.
ONLY_JOINED = ("Medication",)
#: File names read from a directory (plain or gzip-compressed NDJSON).
NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")


_DECODER = json.JSONDecoder(parse_float=Decimal)


class BadLine(ValueError):
    """A line that cannot be read as a FHIR resource (named by file and line)."""


@dataclass(frozen=True)
class LineInfo:
    """What the population path needs to know of one NDJSON line."""

    resource_type: str
    owner: str | None            # Patient id that owns it
    joined: str | None           # ``Type/id`` under which other patients' lines may join it
    wants: tuple[str, ...]       # ``Type/id`` of joined-type resources it references
    kept: bool                   # a mapped type that may carry the codes the mapping reads

    @property
    def broadcast(self) -> bool:
        """Kept, owned by no patient, and not a resource that is about no patient."""
        return self.kept and self.owner is None and self.resource_type not in ONLY_JOINED


# ----------------------------------------------------------------------------- the prefilter
_ASCII_CODE = re.compile(r"[A-Za-z0-9\-_:/]+")


def _norm(code: str) -> str:
    """As :func:`fhir_adapters.terminology._norm`, for ASCII text."""
    return code.replace(".", "").replace(" ", "").upper()


@dataclass(frozen=True)
class Prefilter:
    """Per resource type, the normalised codes a line must contain to be kept (types
    not listed are kept whole). Built from the terminology."""

    codes: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, terminology: Terminology) -> "Prefilter":
        def normalised(*lists: CodeList) -> tuple[str, ...] | None:
            out = []
            for cl in lists:
                for c in cl.codes:
                    n = _norm(c.code if c.code is not None else c.prefix or "")
                    if not n or not _ASCII_CODE.fullmatch(n):
                        return None   # a code this test cannot look for: keep the whole type
                    out.append(n)
            return tuple(sorted(set(out)))

        t = terminology
        by_type = {
            "Observation": normalised(t.tumour_size_observation, t.longest_dimension,
                                      t.technical_resectability_observation),
            "DiagnosticReport": normalised(t.radiology_report_category),
        }
        return cls(tuple((rt, codes) for rt, codes in by_type.items() if codes is not None))

    def may_match(self, resource_type: str, line: str) -> bool:
        codes = dict(self.codes).get(resource_type)
        if codes is None:
            return True
        if "\\u" in line or not line.isascii():
            return True
        text = _norm(line)
        return any(c in text for c in codes)


# ----------------------------------------------------------------------------- Python
def parse_line(line: str) -> dict | None:
    """The resource on a line, None for a blank line; :class:`BadLine` otherwise."""
    if not line.strip():
        return None
    if "\ufffd" in line:
        raise BadLine("holds U+FFFD (invalid UTF-8, or text damaged by a lossy conversion upstream)")
    try:
        resource = _DECODER.decode(line)
    except (ValueError, RecursionError) as exc:
        raise BadLine(f"invalid JSON ({str(exc)[:120]})") from None
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise BadLine("not a FHIR resource (a JSON object with a string resourceType)")
    return resource


def info_of(resource: dict, line: str, prefilter: Prefilter, base: str | None = None) -> LineInfo:
    rtype = resource["resourceType"]
    owner = patient_of(resource, base)
    rid = resource.get("id")
    joined = f"{rtype}/{rid}" if rtype in JOINED_TYPES and isinstance(rid, str) and is_id(rid) else None
    return LineInfo(rtype, owner.id if owner else None, joined, wanted(resource),
                    rtype in MAPPED_TYPES and prefilter.may_match(rtype, line))


def read_line(line: str, prefilter: Prefilter, base: str | None = None) -> tuple[dict, LineInfo] | None:
    """(resource, info) of one line; None for a blank line; :class:`BadLine` otherwise."""
    resource = parse_line(line)
    if resource is None:
        return None
    return resource, info_of(resource, line, prefilter, base)


def wanted(resource: dict) -> tuple[str, ...]:
    """``Type/id`` of the joined-type resources a resource references, in order, once."""
    texts: list[Any] = []
    med = resource.get("medicationReference")
    if isinstance(med, dict):
        texts.append(med.get("reference"))
    focus = resource.get("focus")
    for f in focus if isinstance(focus, list) else []:
        if isinstance(f, dict):
            texts.append(f.get("reference"))
    out = []
    for text in texts:
        if isinstance(text, str):
            ref = Reference.parse(text)
            if ref.kind in ("relative", "absolute") and ref.resource_type in JOINED_TYPES:
                out.append(ref.local)
    return tuple(dict.fromkeys(out))


# ----------------------------------------------------------------------------- files
def ndjson_files(source: str | Path) -> list[Path]:
    """The NDJSON files of a file or a directory (``*.ndjson``, ``*.ndjson.gz``, sorted);
    ValueError naming the problem otherwise. A directory must hold nothing else: a file
    that would not be read (another suffix, hidden ``.x`` or ``_x`` as Spark hides them,
    a subdirectory) may hold a patient's data, so it is refused, never skipped."""
    path = Path(source)
    if path.is_file():
        if not _readable_name(path.name):
            raise ValueError(f"{source}: not an NDJSON file that is read (*.ndjson or *.ndjson.gz, not starting "
                             "with . or _)")
        return [path]
    if not path.exists():
        raise ValueError(f"{source}: no such file or directory")
    if not path.is_dir():
        raise ValueError(f"{source}: not a file or a directory")
    entries = sorted(path.iterdir())
    skipped = [p.name + ("/" if p.is_dir() else "") for p in entries if not (p.is_file() and _readable_name(p.name))]
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        raise ValueError(f"{source}: {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} would not be read: "
                         f"{shown} (a directory holds only *.ndjson / *.ndjson.gz files, none starting with . or _; "
                         "move the others out, or name the files one by one)")
    if not entries:
        raise ValueError(f"{source}: no NDJSON files in it (*.ndjson or *.ndjson.gz)")
    return entries


def _readable_name(name: str) -> bool:
    return name.endswith(NDJSON_SUFFIXES) and not name.startswith((".", "_"))


def lines_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a file, split on ``\\n`` only (as the Spark reader is told
    to), decoded as UTF-8; an undecodable line becomes text with U+FFFD (refused later)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rb") as raw:
            stream = io.BufferedReader(raw) if not isinstance(raw, io.BufferedReader) else raw
            for n, chunk in enumerate(_split_lf(stream), 1):
                yield n, chunk.decode("utf-8", errors="replace")
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot be read after line {n} ({type(exc).__name__}: {exc}); a cut or "
                         "damaged file is never classified in part") from None


def _split_lf(stream: io.BufferedReader) -> Iterator[bytes]:
    pending = b""
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        parts = (pending + block).split(b"\n")
        pending = parts.pop()
        yield from parts
    if pending:
        yield pending


# ----------------------------------------------------------------------------- Spark SQL
# The same rules as Java regular expressions: ``\z`` is the end of input (Java's ``$``
# also matches before a final line terminator, Python's ``\Z`` does not), and ``[^\n]``
# is Python's ``.`` (Java's ``.`` also stops at ``\r``, U+0085, U+2028, U+2029).
_J_ID = r"^[A-Za-z0-9\-.]{1,64}\z"
_J_LITERAL = (r"^(?:(https?://[^\n]+?)/)?([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})"
              r"(?:/_history/[A-Za-z0-9\-.]{1,64})?/?\z")


def spark_line_columns(F: Any, line: Any, prefilter: Prefilter, base: str | None = None) -> dict[str, Any]:
    """Spark columns computing :func:`read_line`'s answers on the JVM, from a string
    column ``line``: ``parsed`` (False: the JVM could not read it as a resource; Python
    decides, see :func:`read_line`), ``resource_type``, ``owner``, ``joined``, ``wants``
    (array) and ``kept``. ``F`` is ``pyspark.sql.functions`` (this module does not import
    Spark). Needs ``spark.sql.variant.allowDuplicateKeys`` (the last of a repeated key
    wins, as in Python)."""
    v = F.try_parse_json(line)

    def string_at(variant: Any, path: str) -> Any:
        """The value at ``path`` when it is a JSON string (else null)."""
        item = F.try_variant_get(variant, path, "variant")
        return F.when(F.schema_of_variant(item) == F.lit("STRING"), F.try_variant_get(variant, path, "string"))

    rtype = string_at(v, "$.resourceType")
    rid = string_at(v, "$.id")
    valid_id = F.coalesce(rid.rlike(_J_ID), F.lit(False))
    # The first subject element present (even as null): subject, else patient.
    subject = F.when(F.try_variant_get(v, "$.subject", "variant").isNotNull(),
                     F.try_variant_get(v, "$.subject", "variant")).otherwise(
        F.try_variant_get(v, "$.patient", "variant"))
    text = string_at(subject, "$.reference")
    literal = F.coalesce(text.rlike(_J_LITERAL), F.lit(False))
    ref_base = F.regexp_replace(F.regexp_extract(text, _J_LITERAL, 1), r"/+\z", "")
    on_base = F.lit(True) if base is None else (
        (ref_base == F.lit("")) | (ref_base == F.lit(base.rstrip("/"))))
    owner = (F.when(rtype == F.lit("Patient"), F.when(valid_id, rid))
             .when(literal & (F.regexp_extract(text, _J_LITERAL, 2) == F.lit("Patient")) & on_base,
                   F.regexp_extract(text, _J_LITERAL, 3)))
    joined = F.when(rtype.isin(*JOINED_TYPES) & valid_id, F.concat(rtype, F.lit("/"), rid))

    def wanted_ref(ref_text: Any) -> Any:
        ok = F.coalesce(ref_text.rlike(_J_LITERAL), F.lit(False)) & F.regexp_extract(
            ref_text, _J_LITERAL, 2).isin(*JOINED_TYPES)
        return F.when(ok, F.concat(F.regexp_extract(ref_text, _J_LITERAL, 2), F.lit("/"),
                                   F.regexp_extract(ref_text, _J_LITERAL, 3)))

    med = wanted_ref(string_at(F.try_variant_get(v, "$.medicationReference", "variant"), "$.reference"))
    focus = F.transform(F.coalesce(F.try_variant_get(v, "$.focus", "array<variant>"),
                                   F.array().cast("array<variant>")),
                        lambda f: wanted_ref(string_at(f, "$.reference")))
    wants = F.array_distinct(F.filter(F.concat(F.array(med), focus), lambda x: x.isNotNull()))
    kept = F.coalesce(rtype.isin(*MAPPED_TYPES), F.lit(False)) & _spark_may_match(F, line, rtype, prefilter)
    parsed = (v.isNotNull() & F.coalesce(F.schema_of_variant(v).startswith("OBJECT"), F.lit(False))
              & rtype.isNotNull() & ~line.contains("\ufffd"))
    return {"parsed": parsed, "resource_type": rtype, "owner": owner, "joined": joined, "wants": wants,
            "kept": kept}


def _spark_may_match(F: Any, line: Any, rtype: Any, prefilter: Prefilter) -> Any:
    """:meth:`Prefilter.may_match` as a Spark column."""
    normalised = F.upper(F.translate(line, ". ", ""))
    keep = F.lit(True)
    for resource_type, codes in prefilter.codes:
        hit = line.contains("\\u") | line.rlike(r"[^\x00-\x7F]")
        for c in codes:
            hit = hit | normalised.contains(c)
        keep = F.when(rtype == F.lit(resource_type), hit).otherwise(keep)
    return keep
