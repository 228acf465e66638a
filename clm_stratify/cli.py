"""Command-line interface: ``clm-stratify`` (or ``python -m clm_stratify``).

Exit codes: 0 success, 1 a patient or a run failed, 2 bad input (file, rule set,
arguments), 3 the FHIR server could not be used.
"""

from __future__ import annotations

import argparse
import json
import sys

from clm_stratify import __version__

EXAMPLES = """\
examples:
  clm-stratify demo
  clm-stratify run --fhir-url http://127.0.0.1:8090/fhir --all
  clm-stratify run --fhir-url https://fhir.example.org/r4 --patient 123 --dry-run --format json
  clm-stratify run --fhir-url URL --all --auth smart --smart-client-id clm --smart-key key.pem
  CLM_SUBSCRIPTION_SECRET=... clm-stratify serve --fhir-url http://127.0.0.1:8090/fhir --port 8765
  CLM_SUBSCRIPTION_SECRET=... clm-stratify subscribe --fhir-url http://127.0.0.1:8090/fhir --endpoint http://127.0.0.1:8765/notify
  clm-stratify inbox --inbox clm-inbox.sqlite
  clm-stratify classify --bundle fixtures/05-borderline-size-50mm-exact.json
  clm-stratify classify --bundle patient.json --format json
  clm-stratify rules validate rules/resectability.yaml
  clm-stratify rules validate --terminology rules/terminology.yaml
"""

from fhir_adapters.project import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_SERVER, TAG, TAG_SYSTEM  # noqa: E402


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def _load_engine_and_terminology(args: argparse.Namespace):
    from engine.classify import Engine
    from fhir_adapters.terminology import load_terminology

    engine = Engine.from_file(args.rules) if args.rules else Engine.default()
    return engine, load_terminology(args.terminology)


def cmd_classify(args: argparse.Namespace) -> int:
    from clm_stratify.report import text_report
    from fhir_adapters.sources.bundle import read_bundle_file
    from fhir_adapters.features.mapping import map_features

    engine, terminology = _load_engine_and_terminology(args)
    record = read_bundle_file(args.bundle, args.patient)
    result = engine.classify(map_features(record, terminology))
    if args.format == "json":
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        print(text_report(result))
    return EXIT_OK


# --------------------------------------------------------------------------- live server
def _auth(args: argparse.Namespace):
    import os

    from fhir_adapters.fhir.auth import BearerToken, SmartBackendServices, load_private_key

    if args.auth == "none":
        return None
    if args.auth == "bearer":
        token = os.environ.get(args.token_env)
        if not token:
            raise UsageError(f"--auth bearer reads the token from the environment variable {args.token_env}, "
                             "which is not set")
        return BearerToken(token)
    if not args.smart_client_id or not args.smart_key:
        raise UsageError("--auth smart needs --smart-client-id and --smart-key (a PEM private key file)")
    try:
        key = load_private_key(args.smart_key)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return SmartBackendServices(args.smart_client_id, key, token_url=args.smart_token_url,
                                base_url=args.fhir_url, scope=args.smart_scope, algorithm=args.smart_alg)


def make_client(args: argparse.Namespace):
    from fhir_adapters.fhir.client import FhirClient

    if not args.fhir_url.startswith(("http://", "https://")):
        raise UsageError(f"--fhir-url must start with http:// or https://, got {args.fhir_url!r}")
    verify: bool | str = True
    if args.ca_bundle:
        verify = args.ca_bundle
    if args.insecure:
        print("warning: TLS certificate verification is OFF (--insecure): use only against a test server",
              file=sys.stderr)
        verify = False
    return FhirClient(args.fhir_url, _auth(args), verify=verify, timeout=(args.connect_timeout, args.read_timeout))


def _progress(done: int, total: int) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * done / total) if total else width
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} patients", end="", file=sys.stderr)
    if done >= total:
        print(file=sys.stderr)


def summary_table(summary) -> str:
    from engine.ruleset import GROUP_IDS

    lines = [f"{'group':<24}{'patients':>9}"]
    for g in GROUP_IDS:
        lines.append(f"{g:<24}{summary.groups.get(g, 0):>9}")
    lines.append(f"{'total classified':<24}{sum(summary.groups.values()):>9}")
    acts = summary.actions
    lines.append("RiskAssessments: " + ", ".join(f"{k} {acts[k]}" for k in
                 ("created", "updated", "unchanged", "would-create", "would-update", "no-recurrence", "failed")
                 if acts.get(k)))
    if summary.failures:
        lines.append("Failed (not written; run again to retry):")
        lines += [f"  Patient/{o.patient_id}: {o.error}" for o in summary.failures]
    return "\n".join(lines)


def _outcome_json(o) -> dict:
    return {"patient": f"Patient/{o.patient_id}", "action": o.action, "group": o.group, "status": o.status,
            "risk_assessment": o.risk_assessment, "error": o.error,
            "classification": o.classification.to_json() if o.classification else None,
            **({"would_write": o.written} if o.action.startswith("would-") else {})}


def run_live(args: argparse.Namespace, client) -> int:
    from clm_stratify.pipeline import RunSummary, Stratifier
    from clm_stratify.report import text_report

    engine, terminology = _load_engine_and_terminology(args)
    stratifier = Stratifier(client, engine, terminology, dry_run=args.dry_run)
    if args.patient:
        summary = RunSummary([stratifier.patient(args.patient)])
    else:
        summary = stratifier.population(progress=_progress, bulk=False if args.no_bulk else None)
    if args.format == "json":
        from fhir_adapters.fhir.client import dumps
        print(dumps({"fhir_url": client.base_url, "data_source": stratifier.last_source or "patient-search",
                     "write_strategy": stratifier.writer.strategy.name,
                     "strategy_notes": list(stratifier.writer.choice.notes),
                     "patients": [_outcome_json(o) for o in summary.outcomes],
                     "groups": dict(summary.groups), "actions": dict(summary.actions)}))
    else:
        if args.patient:
            o = summary.outcomes[0]
            if o.classification:
                print(text_report(o.classification))
            if o.action.startswith("would-"):
                from fhir_adapters.fhir.client import dumps
                print(f"\n--dry-run: would write ({o.action}):")
                for resource in o.written:
                    print(dumps(resource))
        print(summary_table(summary))
        if stratifier.last_source:
            print(f"Data read by: {stratifier.last_source} ({client.round_trips} HTTP round trips)")
        print(f"Write strategy: {stratifier.writer.strategy.name}"
              + "".join(f"\n  note: {n}" for n in stratifier.writer.choice.notes))
    return EXIT_FAILED if summary.failures else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from fhir_adapters.fhir.client import FhirError, FhirServerUnavailable

    with make_client(args) as client:
        try:
            return run_live(args, client)
        except FhirServerUnavailable as exc:
            print(f"error: FHIR server unavailable: {exc}", file=sys.stderr)
            return EXIT_SERVER
        except FhirError as exc:
            print(f"error: {exc}" + (f" ({exc.outcome})" if exc.outcome and exc.outcome not in str(exc) else ""),
                  file=sys.stderr)
            return EXIT_SERVER


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from fhir_adapters.fhir.client import FhirClient
    from fhir_adapters.fhir.load import fixture_bundles, load_bundles
    from fhir_adapters.fhir.local_server import LocalFhirServer, SekmetStartError
    from fixtures import FIXTURES_DIR

    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="clm-demo-"))
    server = LocalFhirServer(data_dir=data_dir, port=args.port, die_with_parent=not args.keep_running)
    try:
        print("Starting the embedded FHIR server (SEKMET) on 127.0.0.1 ...", file=sys.stderr)
        server.start()
    except SekmetStartError as exc:
        print(f"error: the embedded FHIR server did not start: {exc}", file=sys.stderr)
        return EXIT_SERVER
    try:
        with FhirClient(server.base_url) as client:
            n = load_bundles(client, fixture_bundles(FIXTURES_DIR))
            print(f"Loaded {n} resources of {len(fixture_bundles(FIXTURES_DIR))} synthetic patients "
                  f"into {server.base_url}", file=sys.stderr)
            args.fhir_url, args.patient, args.dry_run, args.no_bulk = server.base_url, None, False, False
            client.round_trips = 0  # count the run, not the loading
            code = run_live(args, client)
        print(f"\nLook at the written RiskAssessments: {server.base_url}/RiskAssessment?_tag="
              f"{TAG_SYSTEM}|{TAG}")
        print(f"and their Provenance: {server.base_url}/Provenance?_tag="
              f"{TAG_SYSTEM}|{TAG}")
        if args.keep_running:
            print(f"The FHIR server keeps running at {server.base_url} (pid {server.pid}, data in {data_dir}); "
                  f"stop it with: kill {server.pid}")
        return code
    finally:
        if not args.keep_running:
            server.stop()


# --------------------------------------------------------------------------- subscriptions
def _secret(args: argparse.Namespace) -> str:
    import os

    secret = os.environ.get(args.secret_env, "")
    if len(secret) < 16:
        raise UsageError(f"set the subscription secret (16 characters or more) in the environment variable "
                         f"{args.secret_env}; every Subscription sends it and the receiver checks it")
    return secret


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import os

    import uvicorn

    from clm_stratify.service.inbox import Inbox
    from clm_stratify.pipeline import Stratifier
    from clm_stratify.service.receiver import ReceiverConfig, create_app
    from clm_stratify.service.worker import Worker

    secret = _secret(args)
    hmac_secret = os.environ.get(args.hmac_secret_env) if args.hmac_secret_env else None
    if args.hmac_secret_env and not hmac_secret:
        raise UsageError(f"--hmac-secret-env {args.hmac_secret_env}: the variable is not set")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}, not only on loopback", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine, terminology = _load_engine_and_terminology(args)
    client = make_client(args)
    inbox = Inbox(args.inbox, max_attempts=args.max_attempts)
    try:
        inbox.claim()
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    stratifier = Stratifier(client, engine, terminology)
    from clm_stratify.service.reload import Reloader
    Reloader(stratifier, args.rules, args.terminology).install()   # SIGHUP: reload rules + terminology
    worker = Worker(inbox, stratifier, evaluators=args.workers, coalesce=args.coalesce)
    app = create_app(inbox, ReceiverConfig(secret=secret, hmac_secret=hmac_secret, hmac_header=args.hmac_header,
                                           max_body=args.max_body))
    print(f"clm-stratify receiver on http://{args.host}:{args.port}/notify (inbox {args.inbox}); "
          f"FHIR server {client.base_url}", file=sys.stderr)
    worker.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        worker.stop()
        client.close()
    return EXIT_OK


def cmd_subscribe(args: argparse.Namespace) -> int:
    from clm_stratify.service.receiver import SECRET_HEADER
    from clm_stratify.service import subscriptions as subs
    from fhir_adapters.fhir.client import FhirError

    with make_client(args) as client:
        try:
            if args.remove:
                removed = subs.remove(client)
                print(f"removed {len(removed)} Subscription(s)" + (f": {', '.join(removed)}" if removed else ""))
                return EXIT_OK
            if not args.endpoint:
                raise UsageError("--endpoint URL is required (the receiver's /notify URL), unless --remove")
            secret = _secret(args)
            _, terminology = _load_engine_and_terminology(args)
            if args.style == "criteria":
                wanted = subs.criteria_subscriptions(terminology, args.endpoint, SECRET_HEADER, secret,
                                                     payload=args.payload != "none")
            else:
                if not args.topic:
                    raise UsageError("--style backport needs at least one --topic URL=ResourceType")
                topics = []
                for t in args.topic:
                    url, _, rtype = t.rpartition("=")
                    if not url or not rtype:
                        raise UsageError(f"--topic {t!r}: expected URL=ResourceType")
                    topics.append((url, rtype))
                wanted = subs.backport_subscriptions(terminology, args.endpoint, SECRET_HEADER, secret, topics,
                                                     content=args.payload_content, heartbeat=args.heartbeat)
            statuses = subs.create(client, wanted)
        except FhirError as exc:
            print(f"error: {exc}" + (f" ({exc.outcome})" if exc.outcome else ""), file=sys.stderr)
            return EXIT_SERVER
    for st in statuses:
        print(f"Subscription/{st.id}: {st.status}  {st.criteria}" + (f"  error: {st.error}" if st.error else ""))
    return EXIT_OK if all(st.status == "active" for st in statuses) else EXIT_FAILED


def cmd_inbox(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clm_stratify.service.inbox import Inbox

    if not Path(args.inbox).exists():
        raise UsageError(f"{args.inbox}: no inbox there")
    inbox = Inbox(args.inbox)
    if args.replay is not None or args.replay_all:
        kind, item = (None, None)
        if args.replay is not None:
            kind, _, num = args.replay.partition(":")
            if kind not in ("patient", "notification") or not num.isdigit():
                raise UsageError("--replay takes patient:ID or notification:ID (see the list)")
            item = int(num)
        print(f"replayed {inbox.replay(kind, item)} item(s); a running receiver picks them up")
        return EXIT_OK
    depth = inbox.depth()
    print("inbox " + ", ".join(f"{k} {v}" for k, v in sorted(depth.items())) if depth else "inbox empty")
    dead = inbox.dead_letters()
    if dead:
        print("dead letters (replay with --replay KIND:ID or --replay-all):")
        for d in dead:
            who = f" {d['patient']}" if d["patient"] else ""
            print(f"  {d['kind']}:{d['id']}{who} after {d['attempts']} attempts: {d['error']}")
    return EXIT_OK


def cmd_interop(args: argparse.Namespace) -> int:
    """Test a FHIR server end to end (the clm_stratify.interop package); exit 1 when a check failed."""
    from clm_stratify.interop import run_command

    engine, terminology = _load_engine_and_terminology(args)
    with make_client(args) as client:
        return run_command(client, engine, terminology, report_path=args.report, keep=args.keep)


def cmd_rules_validate(args: argparse.Namespace) -> int:
    from engine.classify import Engine
    from engine.ruleset import load_ruleset
    from fhir_adapters.terminology import load_terminology

    checked = []
    if args.path or not args.terminology:
        rs = load_ruleset(args.path)
        n = Engine(rs).check_coverage()
        checked.append(f"{args.path or 'default rule set'}: {rs.id} {rs.version} is valid "
                       f"({len(rs.groups)} group rules, {len(rs.recommendations)} recommendations; "
                       f"exactly one group for each of {n} combinations of facts)")
    if args.terminology:
        t = load_terminology(args.terminology)
        checked.append(f"{args.terminology}: terminology {t.id} {t.version} is valid")
    print("\n".join(checked))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clm-stratify",
        description="Resectability of recurrent colorectal liver metastases (Kobayashi et al., "
                    "Ann Surg Oncol 2024) from FHIR R4 data, fired by a declarative rule set.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"clm-stratify {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def rules_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rules", metavar="PATH", help="rule set YAML (default: rules/resectability.yaml)")
        p.add_argument("--terminology", metavar="PATH",
                       help="terminology YAML (default: rules/terminology.yaml)")

    p = sub.add_parser("classify", help="classify one patient from a FHIR Bundle file",
                       epilog="example:\n  clm-stratify classify --bundle patient.json --format json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, metavar="FILE",
                   help="FHIR R4 Bundle (collection, searchset or transaction) of one patient")
    p.add_argument("--patient", metavar="ID",
                   help="the patient to classify when the Bundle holds several patients' resources "
                        "(default: the Bundle's only Patient); other patients' resources are ignored and named")
    rules_options(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_classify)

    def server_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--auth", choices=("none", "bearer", "smart"), default="none",
                       help="none (default), bearer (token from --token-env), or SMART Backend Services")
        p.add_argument("--token-env", default="CLM_FHIR_TOKEN", metavar="VAR",
                       help="environment variable holding the bearer token (default CLM_FHIR_TOKEN)")
        p.add_argument("--smart-client-id", metavar="ID")
        p.add_argument("--smart-key", metavar="PEM", help="private key (PEM) registered with the server")
        p.add_argument("--smart-token-url", metavar="URL",
                       help="token endpoint (default: from .well-known/smart-configuration)")
        p.add_argument("--smart-scope", default="system/*.read system/RiskAssessment.write system/Provenance.write")
        p.add_argument("--smart-alg", default="RS384", choices=("RS384", "ES384", "RS256", "ES256"))
        p.add_argument("--ca-bundle", metavar="PEM", help="CA certificates to trust for TLS")
        p.add_argument("--insecure", action="store_true",
                       help="turn TLS certificate verification off (prints a warning; test servers only)")
        p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S")
        p.add_argument("--read-timeout", type=float, default=60.0, metavar="S")

    p = sub.add_parser("run", help="classify patients on a FHIR server and write RiskAssessments back",
                       epilog="examples:\n  clm-stratify run --fhir-url http://127.0.0.1:8090/fhir --all\n"
                              "  clm-stratify run --fhir-url URL --patient 123 --dry-run",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fhir-url", required=True, metavar="URL", help="FHIR R4 base URL")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", metavar="ID", help="one patient (logical id)")
    who.add_argument("--all", action="store_true",
                     help="every patient with a liver-metastasis Condition")
    p.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    p.add_argument("--no-bulk", action="store_true",
                   help="--all: search in chunks of patients even when the server offers $export")
    server_options(p)
    rules_options(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="start a local FHIR server, load synthetic patients, run --all",
                       epilog="examples:\n  clm-stratify demo\n  clm-stratify demo --keep-running",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep-running", action="store_true", help="leave the server up and print its URL")
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--data-dir", metavar="DIR", help="where the server keeps its database (default: a temp dir)")
    rules_options(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_demo, auth="none")

    p = sub.add_parser("serve", help="receive Subscription notifications and re-classify patients",
                       epilog="example:\n  CLM_SUBSCRIPTION_SECRET=$(openssl rand -hex 24) \\\n"
                              "    clm-stratify serve --fhir-url http://127.0.0.1:8090/fhir --port 8765",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fhir-url", required=True, metavar="URL")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--inbox", default="clm-inbox.sqlite", metavar="PATH", help="SQLite inbox file")
    p.add_argument("--secret-env", default="CLM_SUBSCRIPTION_SECRET", metavar="VAR",
                   help="environment variable with the subscription secret (required)")
    p.add_argument("--hmac-secret-env", metavar="VAR", help="also require an HMAC-SHA256 body signature")
    p.add_argument("--hmac-header", default="X-Signature")
    p.add_argument("--max-body", type=int, default=1_000_000, metavar="BYTES")
    p.add_argument("--workers", type=int, default=2, help="patients evaluated in parallel")
    p.add_argument("--coalesce", type=float, default=0.15, metavar="S",
                   help="wait this long to merge notifications for one patient")
    p.add_argument("--max-attempts", type=int, default=6, help="tries before an item is dead-lettered")
    server_options(p)
    rules_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("subscribe", help="create (or --remove) this tool's Subscriptions on a FHIR server",
                       epilog="examples:\n  clm-stratify subscribe --fhir-url URL --endpoint http://127.0.0.1:8765/notify\n"
                              "  clm-stratify subscribe --fhir-url URL --endpoint E --style backport \\\n"
                              "    --topic http://example.org/SubscriptionTopic/tumor-size=Observation\n"
                              "  clm-stratify subscribe --fhir-url URL --remove",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fhir-url", required=True, metavar="URL")
    p.add_argument("--endpoint", metavar="URL", help="the receiver's /notify URL")
    p.add_argument("--style", choices=("criteria", "backport"), default="criteria")
    p.add_argument("--payload", choices=("resource", "none"), default="resource",
                   help="criteria style: send the resource, or an empty notification")
    p.add_argument("--topic", action="append", metavar="URL=TYPE",
                   help="backport style: a SubscriptionTopic canonical URL and its resource type (repeat)")
    p.add_argument("--payload-content", choices=("full-resource", "id-only", "empty"), default="full-resource")
    p.add_argument("--heartbeat", type=int, metavar="S", help="backport heartbeat period")
    p.add_argument("--secret-env", default="CLM_SUBSCRIPTION_SECRET", metavar="VAR")
    p.add_argument("--remove", action="store_true", help="delete the Subscriptions this tool created")
    server_options(p)
    rules_options(p)
    p.set_defaults(func=cmd_subscribe)

    p = sub.add_parser("inbox", help="show the receiver's inbox and dead letters; replay them",
                       epilog="examples:\n  clm-stratify inbox --inbox clm-inbox.sqlite\n"
                              "  clm-stratify inbox --inbox clm-inbox.sqlite --replay-all",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inbox", default="clm-inbox.sqlite", metavar="PATH")
    p.add_argument("--replay", metavar="KIND:ID", help="put one dead letter back in the queue")
    p.add_argument("--replay-all", action="store_true")
    p.set_defaults(func=cmd_inbox)

    p = sub.add_parser("interop", help="test a FHIR server: store, read back, classify, write, clean up",
                       epilog="examples:\n  clm-stratify interop --fhir-url http://127.0.0.1:8090/fhir --report r.json\n"
                              "  clm-stratify interop --fhir-url URL --auth bearer --keep",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fhir-url", required=True, metavar="URL", help="FHIR R4 base URL")
    p.add_argument("--report", metavar="PATH", help="write the JSON report (checks, quirks, timings) here")
    p.add_argument("--keep", action="store_true", help="leave the run's tagged test data and assessments")
    server_options(p)
    rules_options(p)
    p.set_defaults(func=cmd_interop)

    p = sub.add_parser("rules", help="check rule set and terminology files")
    rules_sub = p.add_subparsers(dest="rules_command", metavar="ACTION")
    v = rules_sub.add_parser("validate", help="validate a rule set (and/or a terminology) file",
                             epilog="examples:\n  clm-stratify rules validate rules/resectability.yaml\n"
                                    "  clm-stratify rules validate --terminology my-site-terms.yaml",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("path", nargs="?", help="rule set YAML (default: the project's rule set)")
    v.add_argument("--terminology", metavar="PATH", help="also validate this terminology file")
    v.set_defaults(func=cmd_rules_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.classify import RulesetInconsistentError
    from engine.yamlfile import DeclarativeFileError
    from fhir_adapters.sources.bundle import BundleError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except (BundleError, DeclarativeFileError, RulesetInconsistentError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
