"""Project constants, at the bottom of the import graph: every package may import this
module and it imports nothing of ours.

* :data:`VERSION`: the release (also ``clm_stratify.__version__``, the ``User-Agent``
  of the HTTP client and the Provenance agent).
* The systems (URLs) of the codes, identifiers and tags this project writes to FHIR
  servers. They name *our* artefacts; clinical codes live in ``rules/``.
* The exit codes of every command.
"""

from __future__ import annotations

VERSION = "0.1.0"

PROJECT = "https://clm-stratify.org/fhir"
GROUP_SYSTEM = f"{PROJECT}/CodeSystem/resectability-group"
RULESET_SYSTEM = f"{PROJECT}/CodeSystem/ruleset"
ASSESSMENT_SYSTEM = f"{PROJECT}/CodeSystem/assessment"
IDENTIFIER_SYSTEM = f"{PROJECT}/NamingSystem/risk-assessment"
RULESET_HASH_SYSTEM = f"{PROJECT}/NamingSystem/ruleset-sha256"
TAG_SYSTEM = f"{PROJECT}/CodeSystem/tag"
RUN_TAG_SYSTEM = f"{PROJECT}/CodeSystem/interop-run"
PROBE_IDENTIFIER_SYSTEM = f"{PROJECT}/NamingSystem/interop-probe"
# The tag (TAG_SYSTEM|TAG) on every RiskAssessment and Provenance this project writes.
TAG = "clm-stratify"

# Exit codes of every command (README, "Exit codes").
EXIT_OK = 0          # success
EXIT_FAILED = 1      # a patient, a run or an interop check failed
EXIT_BAD_INPUT = 2   # bad input: a file, a rule set, arguments
EXIT_SERVER = 3      # the FHIR server could not be used
EXIT_NOT_FOUND = 4   # run --patient: the server has no such patient (404/410 and no data naming it)
EXIT_CLOSED_PIPE = 141   # the work was done but the reader closed standard output early (128 + SIGPIPE)
