"""One ``clm-stratify interop`` run: the steps in order, and what the command does
(print the table, write the JSON report, return the exit code)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from clm_stratify.interop.behaviour_probes import BehaviourProbes
from clm_stratify.interop.capabilities_step import CapabilitiesStep
from clm_stratify.interop.checks import SKIPPED_WITHOUT_DATA, STEPS, InteropReport, table
from clm_stratify.interop.cleanup_step import CleanupStep
from clm_stratify.interop.load_step import LoadStep
from clm_stratify.interop.readback_step import ReadBackStep
from clm_stratify.interop.subscription_step import SubscriptionOptions, SubscriptionStep
from clm_stratify.interop.write_step import WriteStep
from clm_stratify.interop import probes
from clm_stratify.pipeline import Rules
from fhir_adapters.fhir.client import FhirClient


class InteropRun(CapabilitiesStep, LoadStep, ReadBackStep, BehaviourProbes, WriteStep, SubscriptionStep,
                 CleanupStep):
    """One interop run against one server (see :mod:`clm_stratify.interop`)."""

    def run(self) -> InteropReport:
        started = time.monotonic()
        self.report.info = {"started_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                            "tag": {"system": self.tag[0], "code": self.tag[1]},
                            "fixtures": len(self.fixture_names), "kept": self.keep, "fallbacks": []}
        recorder = probes.ReplyRecorder(self.client)
        try:
            with self.step("capabilities"):
                if not self.capabilities():
                    self.report.capabilities_read = False
                    return self.report
            try:
                with self.step("load"):
                    self.load()
                if self.patients:
                    with self.step("read-back"):
                        self.read_back()
                        self.paging()
                        self.behaviour_probes()
                    with self.step("write"):
                        self.classify_and_write()
                else:
                    self.skip(SKIPPED_WITHOUT_DATA, "no patient could be loaded")
                with self.step("subscription"):
                    self.subscription_check()
            finally:
                with self.step("cleanup"):
                    self.cleanup()
        finally:
            recorder.close()
            self._step = "read-back"
            self.media_types(recorder)
            self.report.checks.sort(key=lambda c: STEPS.index(c.step))
            self.report.info["duration_seconds"] = round(time.monotonic() - started, 3)
            self.report.info["round_trips"] = self.client.round_trips
        return self.report


def run_command(client: FhirClient, rules: Rules, *, report_path: str | None = None,
                keep: bool = False, out=None, subscription: SubscriptionOptions | None = None) -> int:
    """What ``clm-stratify interop`` does: run, print the table, write the JSON report."""
    import sys

    out = out or sys.stdout
    report = InteropRun(client, rules, keep=keep, subscription=subscription).run()
    print(table(report), file=out)
    if report_path:
        Path(report_path).write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False, default=str) + "\n")
        print(f"Report: {report_path}", file=out)
    return report.exit_code
