"""``clm-stratify serve``: receive Subscription notifications and re-classify patients."""

from __future__ import annotations

import argparse

from clm_stratify.cli import output
from clm_stratify.cli.cds_hooks import add_cds_options, cds_config
from clm_stratify.cli.common import (UsageError, add_rules_options, add_server_options,
                                     load_rules, make_client, subscription_secret)
from fhir_adapters.project import EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import os
    import time

    from clm_stratify.service import http_guard

    from clm_stratify.pipeline import Stratifier
    from clm_stratify.service.health import Health
    from clm_stratify.service.inbox import Inbox, InboxError
    from clm_stratify.service.metrics import Metrics
    from clm_stratify.service.receiver import ReceiverConfig, create_app
    from clm_stratify.service.worker import Worker

    _check_numbers(args)
    secret = subscription_secret(args)
    cds = cds_config(args) if args.cds_hooks else None
    hmac_secret = os.environ.get(args.hmac_secret_env) if args.hmac_secret_env else None
    if args.hmac_secret_env and not hmac_secret:
        raise UsageError(f"--hmac-secret-env {args.hmac_secret_env}: the variable is not set")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        output.err(f"warning: listening on {args.host}, not only on loopback")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), datefmt="%Y-%m-%dT%H:%M:%S",
                        format="%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s")
    from clm_stratify.service.privacy import install_log_redaction
    install_log_redaction()   # no patient reference in any log line, whoever logs it
    logging.Formatter.converter = time.gmtime   # log times in UTC, like every other time we print
    rules = load_rules(args)
    client = make_client(args)
    try:
        inbox = Inbox(args.inbox, max_attempts=args.max_attempts, max_bytes=int(args.inbox_max_mb * 1024 * 1024),
                      serve=True)
        inbox.claim()
    except InboxError as exc:
        raise UsageError(str(exc)) from None
    health = Health(inbox, lambda: client.ping(timeout=min(3.0, args.health_interval)),
                    probe_every=args.health_interval)
    unreachable = health.check_fhir(force=True)["error"]
    if unreachable:
        output.err(f"warning: the FHIR server cannot be reached ({unreachable}); notifications are stored "
                   f"and evaluated once it can, and /healthz says degraded until then")
    metrics = Metrics(inbox, health)
    stratifier = Stratifier(client, rules)
    from clm_stratify.service.reload import Reloader
    Reloader(stratifier, args.rules, args.terminology).install()   # SIGHUP: reload rules + terminology
    worker = Worker(inbox, stratifier, evaluators=args.workers, coalesce=args.coalesce, health=health,
                    metrics=metrics, keep=args.keep_days * 86400)
    app = create_app(inbox, ReceiverConfig(secret=secret, hmac_secret=hmac_secret, hmac_header=args.hmac_header,
                                           max_body=args.max_body), health, metrics)
    if cds is not None:   # CDS Hooks on the same port; the rule set in force is read per call
        from clm_stratify.service.cds_hooks import mount
        mount(app, cds, lambda: stratifier.rules)
        output.err(f"CDS Hooks service on http://{args.host}:{args.port}/cds-services")
    output.err(f"clm-stratify receiver on http://{args.host}:{args.port}/notify (inbox {args.inbox}); "
               f"FHIR server {client.base_url}")
    worker.start()
    try:
        http_guard.serve(app, host=args.host, port=args.port)
    finally:
        worker.stop()
        client.close()
    return EXIT_OK


def _check_numbers(args: argparse.Namespace) -> None:
    """Options that would make a receiver that accepts and never works, or dead-letters
    everything: refused with exit 2."""
    import math

    checks = (("--port", args.port, 1, 65535), ("--workers", args.workers, 1, 64),
              ("--max-attempts", args.max_attempts, 1, 1000), ("--max-body", args.max_body, 1024, 10**9),
              ("--coalesce", args.coalesce, 0, 3600), ("--inbox-max-mb", args.inbox_max_mb, 1, 10**7),
              ("--keep-days", args.keep_days, 0.01, 36500), ("--health-interval", args.health_interval, 0.1, 3600))
    for option, value, low, high in checks:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
            raise UsageError(f"{option} {value}: must be between {low} and {high}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="receive Subscription notifications and re-classify patients",
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
    p.add_argument("--inbox-max-mb", type=float, default=1024, metavar="MB",
                   help="the inbox file may not grow past this; beyond it notifications get 503 (default 1024)")
    p.add_argument("--keep-days", type=float, default=7, metavar="DAYS",
                   help="finished notifications and evaluations stay in the inbox this long (default 7)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log level (default info: one line per evaluation, no patient identifiers)")
    p.add_argument("--health-interval", type=float, default=10.0, metavar="S",
                   help="probe the FHIR server for /healthz at most this often (default 10 s)")
    p.add_argument("--cds-hooks", action="store_true",
                   help="also serve the CDS Hooks service at /cds-services (see clm-stratify cds-hooks)")
    add_cds_options(p)
    add_server_options(p)
    add_rules_options(p)
    p.set_defaults(func=cmd_serve)
