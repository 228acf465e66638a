"""``clm-stratify population`` (classify a whole population into an OUT directory, on this
machine or on Spark) and ``clm-stratify write-back`` (write OUT's assessments to a FHIR
server). See :mod:`clm_stratify.population`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clm_stratify.cli import output
from clm_stratify.cli.common import (UsageError, add_format_option, add_rules_options, add_server_options,
                                     load_rules, make_client)
from fhir_adapters.project import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_SERVER

SHOWN_FAILURES = 20


def cmd_population(args: argparse.Namespace) -> int:
    from clm_stratify.population import InputError, SparkJobFailed, restratify, run_population

    if bool(args.ndjson) == bool(args.from_features):
        raise UsageError("give --ndjson DIR_OR_URI (a FHIR NDJSON export) or --from-features OUT/features")
    if args.workers < 1 or args.workers > 256:
        raise UsageError(f"--workers must be 1 to 256, got {args.workers}")
    if args.from_features and (args.master or args.base or args.workers != 1):
        raise UsageError("--from-features runs on this machine in one process: --master, --base and --workers "
                         "apply to --ndjson")
    if args.master and args.workers != 1:
        raise UsageError("--workers is for the local path; with --master, Spark decides (e.g. local[4])")
    rules = load_rules(args)
    try:
        if args.from_features:
            summary = restratify(args.from_features, args.out, rules, progress=_progress(args))
        else:
            summary = run_population(args.ndjson, args.out, rules, master=args.master, workers=args.workers,
                                     base=args.base, progress=_progress(args))
    except InputError as exc:
        output.err(f"error: {exc}")
        return EXIT_BAD_INPUT
    except ValueError as exc:   # a source that is not there, not a file, not NDJSON, damaged
        output.err(f"error: {exc}")
        return EXIT_BAD_INPUT
    except SparkJobFailed as exc:
        output.err(f"error: {exc}")
        return EXIT_FAILED
    if args.format == "json":
        output.out(json.dumps({"out": args.out, "engine": summary.engine, **summary.counts(),
                               "failures": [json.loads(t) for t in list(summary.failed.values())[:1000]]}, indent=2))
    else:
        output.out(_population_text(summary, args.out))
    return EXIT_FAILED if summary.failed else EXIT_OK


def _progress(args: argparse.Namespace):
    if args.format == "json":
        return None
    return lambda n: output.err(f"  {n} patients classified")


def _population_text(summary, out: str) -> str:
    lines = [f"population ({summary.engine}): {summary.patients} patients -> {out}"]
    for group, n in sorted(summary.groups.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {group:24s} {n}")
    if summary.failed:
        lines.append(f"  {'failed':24s} {len(summary.failed)}  (see {out}/failures)")
        for text in list(summary.failed.values())[:SHOWN_FAILURES]:
            f = json.loads(text)
            lines.append(f"    {f['patient']}: {f['error'][:200]}")
    lines.append(f"assessments to write: {summary.outputs.get('assessments', 0)} "
                 f"(clm-stratify write-back --from {out} --fhir-url URL)")
    if summary.broadcast:
        lines.append(f"note: {summary.broadcast} resource(s) name no patient by a literal reference: each is in every "
                     "record as unattributable (it can cast doubt, never prove a fact)")
    return "\n".join(lines)


def cmd_write_back(args: argparse.Namespace) -> int:
    from clm_stratify.population import InputError
    from clm_stratify.population.writeback import WriteNotIdempotent, write_back
    from fhir_adapters.fhir.client import FhirError

    if not 1 <= args.max_writers <= 64:
        raise UsageError(f"--max-writers must be 1 to 64, got {args.max_writers}")
    make_client(args).close()   # the arguments are checked once, before any work

    def progress(s) -> None:
        if args.format != "json" and s.chunks % 10 == 0:
            output.err(f"  {sum(s.actions.values())} patients written or checked")

    try:
        summary = write_back(Path(args.source), lambda: make_client(args), max_writers=args.max_writers,
                             dry_run=args.dry_run, progress=progress)
    except InputError as exc:
        output.err(f"error: {exc}")
        return EXIT_BAD_INPUT
    except WriteNotIdempotent as exc:
        output.err(f"error: {exc}")
        return EXIT_SERVER
    except FhirError as exc:
        output.err(f"error: {exc}")
        return EXIT_SERVER
    if args.format == "json":
        output.out(json.dumps({"actions": dict(summary.actions), "failed": [
            {"patient": p, "error": e} for p, e in summary.failed], "skipped_chunks": summary.skipped_chunks,
            "dry_run": args.dry_run}, indent=2))
    else:
        head = "dry run, nothing written: " if args.dry_run else ""
        output.out(head + ", ".join(f"{a} {n}" for a, n in sorted(summary.actions.items())) or head + "nothing to write")
        if summary.skipped_chunks:
            output.out(f"{summary.skipped_chunks} chunk(s) already written by an earlier write-back (journal), skipped")
        for patient, error in summary.failed[:SHOWN_FAILURES]:
            output.out(f"  failed {patient}: {error[:300]}")
        if summary.failed:
            output.out(f"{len(summary.failed)} failed; run the same command again to retry them")
    return EXIT_FAILED if summary.failed else EXIT_OK


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "population", help="classify a whole population from FHIR NDJSON into an OUT directory (local or Spark)",
        description="Classify every patient of a FHIR Bulk Data NDJSON export (or re-classify the features of "
                    "an earlier run with another rule set) into OUT: classifications, features, assessments "
                    "(RiskAssessment + Provenance, written later by write-back), failures, manifest.json.",
        epilog="examples:\n  clm-stratify population --ndjson export/ --out out/\n"
               "  clm-stratify population --ndjson export/ --out out/ --workers 2\n"
               "  clm-stratify population --ndjson s3a://bucket/export/ --out s3a://bucket/out/ "
               "--master spark://host:7077\n"
               "  clm-stratify population --from-features out/features --rules new.yaml --out out-new/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (one of)")
    src.add_argument("--ndjson", action="append", metavar="DIR_OR_URI",
                     help="NDJSON file or directory (*.ndjson, *.ndjson.gz); repeat for several; a URI "
                          "(s3a://, hdfs://) with --master")
    src.add_argument("--from-features", metavar="DIR", help="OUT/features of an earlier run: classify again "
                                                             "without mapping (e.g. with a new --rules)")
    p.add_argument("--out", required=True, metavar="OUT", help="new or empty output directory (or URI with --master)")
    p.add_argument("--master", metavar="URL", help="run on Apache Spark: local[2], spark://host:7077, k8s://..., "
                                                   "sc://host (Spark Connect); default: this machine, no Spark")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes on this machine without --master (default 1)")
    p.add_argument("--base", metavar="URL", help="the FHIR base URL the export came from: absolute references on it "
                                                 "name its patients (default: none; absolute references are then "
                                                 "not evidence)")
    add_rules_options(p)
    add_format_option(p)
    p.set_defaults(func=cmd_population)

    w = subparsers.add_parser(
        "write-back", help="write a population run's RiskAssessments (+ Provenance) to a FHIR server",
        description="Write the assessments of a finished population run to a FHIR server: idempotent "
                    "(deterministic ids; unchanged ones are not written again), bounded (--max-writers), "
                    "resumable (a journal in OUT/write-back/).",
        epilog="example:\n  clm-stratify write-back --from out/ --fhir-url http://127.0.0.1:8090/fhir --max-writers 4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("--from", dest="source", required=True, metavar="OUT", help="a finished population run's OUT")
    w.add_argument("--fhir-url", required=True, metavar="URL", help="FHIR R4 base URL")
    w.add_argument("--max-writers", type=int, default=4, metavar="N",
                   help="chunks of 100 patients written at once (default 4)")
    w.add_argument("--dry-run", action="store_true", help="say what would be written; write nothing")
    add_server_options(w)
    add_format_option(w)
    w.set_defaults(func=cmd_write_back)
