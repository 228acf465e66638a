"""``clm-stratify interop``: test a FHIR server: store, read back, classify, write, clean up."""

from __future__ import annotations

import argparse

from clm_stratify.cli.common import (UsageError, add_rules_options, add_server_options, load_rules,
                                     make_client)


def cmd_interop(args: argparse.Namespace) -> int:
    """Test a FHIR server end to end (the clm_stratify.interop package); exit 1 when a check failed."""
    from clm_stratify.interop import run_command
    from clm_stratify.interop.subscription_step import SubscriptionOptions

    if not 0 <= args.subscription_wait <= 120:
        raise UsageError(f"--subscription-wait {args.subscription_wait:g}: give 0 to 120 seconds")
    if not 0 <= args.subscription_port <= 65535:
        raise UsageError(f"--subscription-port {args.subscription_port}: give 0 (any free port) to 65535")
    if args.subscription_url and not args.subscription_url.startswith(("http://", "https://")):
        raise UsageError(f"--subscription-url must start with http:// or https://, got {args.subscription_url!r}")
    if args.subscription_host in ("0.0.0.0", "::") and not args.subscription_url:
        raise UsageError(f"--subscription-host {args.subscription_host} listens on every interface: give "
                         "--subscription-url, the URL the FHIR server can reach the receiver at")
    subscription = SubscriptionOptions(args.subscription_host, args.subscription_port, args.subscription_url,
                                       args.subscription_wait)
    rules = load_rules(args)
    with make_client(args) as client:
        return run_command(client, rules, report_path=args.report, keep=args.keep, subscription=subscription)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "interop", help="test a FHIR server: store, read back, classify, write, clean up",
        epilog="examples:\n  clm-stratify interop --fhir-url http://127.0.0.1:8090/fhir --report r.json\n"
               "  clm-stratify interop --fhir-url URL --auth bearer --keep",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fhir-url", required=True, metavar="URL", help="FHIR R4 base URL")
    p.add_argument("--report", metavar="PATH", help="write the JSON report (checks, quirks, timings) here")
    p.add_argument("--keep", action="store_true", help="leave the run's tagged test data and assessments")
    p.add_argument("--subscription-host", default="127.0.0.1", metavar="HOST",
                   help="where the run's notification receiver listens (default 127.0.0.1: only a server on "
                        "this machine can reach it)")
    p.add_argument("--subscription-port", type=int, default=0, metavar="N", help="its port (default: any free one)")
    p.add_argument("--subscription-url", metavar="URL",
                   help="the receiver's URL as the FHIR server must call it ({port} is replaced by its port; "
                        "default http://HOST:PORT/notify)")
    p.add_argument("--subscription-wait", type=float, default=5.0, metavar="S",
                   help="seconds to wait for the Subscription's activation, then again for the notification "
                        "(default 5)")
    add_server_options(p)
    add_rules_options(p)
    p.set_defaults(func=cmd_interop)
