"""Reload the rule set and terminology of a running receiver on SIGHUP.

``clm-stratify serve`` installs a :class:`Reloader` for the files it was started with
(``--rules`` / ``--terminology``, or the project defaults). On ``SIGHUP`` both files
are read and checked again, off the signal handler, in a thread of their own:

* valid: a new :class:`clm_stratify.pipeline.Rules` pair (the engine with its load-time
  coverage check, and the terminology) replaces the :class:`~clm_stratify.pipeline.Stratifier`'s
  in one assignment; the next evaluations use both, never one without the other. Logged at INFO with the rule-set id, version and sha256.
* invalid (a field error, unparseable YAML, a missing file, an inconsistent rule set):
  logged at ERROR with every problem and its field path; the old ones keep serving.

An evaluation already running finishes with the rule set it started with.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from clm_stratify.pipeline import Rules, Stratifier

log = logging.getLogger("clm_stratify.service.reload")


class Reloader:
    def __init__(self, stratifier: Stratifier, rules: str | None, terminology: str | None) -> None:
        self.stratifier = stratifier
        self.rules = rules
        self.terminology = terminology
        self._lock = threading.Lock()
        self.reloads = 0
        self.failures = 0

    def reload(self) -> bool:
        """Load and check both files; swap them in if valid. True when swapped."""
        from engine.classify import RulesetInconsistentError
        from engine.yamlfile import DeclarativeFileError

        with self._lock:
            try:
                rules = Rules.load(self.rules, self.terminology)   # None: the project's files, re-read
            except (DeclarativeFileError, RulesetInconsistentError, OSError, ValueError, RecursionError) as exc:
                self.failures += 1
                problems = str(exc).replace("\n", "; ")
                log.error("reload refused, the previous rule set and terminology stay in use: %s", problems)
                return False
            self.stratifier.rules = rules   # one assignment: evaluations that start after it use both
            self.reloads += 1
            engine, terminology = rules.engine, rules.terminology
            log.info("reloaded rule set %s %s (sha256 %s) and terminology %s %s", engine.ref.id,
                     engine.ref.version, engine.ref.sha256[:12], terminology.id, terminology.version)
            return True

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Checking a rule set fires 729 combinations through durable-rules: not in the
        # signal handler (it would stall the HTTP event loop of the main thread).
        threading.Thread(target=self.reload, name="reload", daemon=True).start()

    def install(self) -> None:
        """Reload on SIGHUP (POSIX only; a no-op elsewhere)."""
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_signal)
