"""``clm-stratify subscribe``: create or update (or ``--remove``) this tool's Subscriptions on a
FHIR server. Idempotent: run again with the same arguments, nothing changes (each
Subscription is reported ``unchanged``); a changed secret or payload updates them in place
(see :func:`clm_stratify.service.subscriptions.sync`)."""

from __future__ import annotations

import argparse
from collections import Counter

from clm_stratify.cli import output
from clm_stratify.cli.common import (UsageError, add_rules_options, add_server_options,
                                     load_rules, make_client, subscription_secret)
from fhir_adapters.project import EXIT_FAILED, EXIT_OK, EXIT_SERVER


def _topics(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The ``--topic URL=ResourceType`` pairs of the backport style."""
    if not args.topic:
        raise UsageError("--style backport needs at least one --topic URL=ResourceType")
    topics = []
    for t in args.topic:
        url, _, rtype = t.rpartition("=")
        if not url or not rtype:
            raise UsageError(f"--topic {t!r}: expected URL=ResourceType")
        topics.append((url, rtype))
    return topics


def _report(states) -> None:
    """One line per Subscription: its status, what was done to it, its criteria."""
    for st in states:
        what = st.action + (f" ({st.note})" if st.note else "")
        output.out(f"Subscription/{st.id}: {st.status}  {st.criteria}  [{what}]"
                   + (f"  error: {st.error}" if st.error else ""))
    counts = Counter(st.action for st in states)
    output.out(", ".join(f"{a} {counts[a]}" for a in ("created", "updated", "unchanged", "removed") if counts[a]))


def cmd_subscribe(args: argparse.Namespace) -> int:
    from clm_stratify.service.receiver import SECRET_HEADER
    from clm_stratify.service import subscriptions as subs
    from fhir_adapters.fhir.client import FhirError

    if args.wait < 0 or args.wait > 600:
        raise UsageError(f"--wait {args.wait}: give 0 to 600 seconds")
    with make_client(args) as client:
        try:
            if args.remove:
                removed = subs.remove(client, args.endpoint)
                output.out(f"removed {len(removed)} Subscription(s)" + (f": {', '.join(removed)}" if removed else ""))
                return EXIT_OK
            if not args.endpoint:
                raise UsageError("--endpoint URL is required (the receiver's /notify URL), unless --remove")
            secret = subscription_secret(args)
            terminology = load_rules(args).terminology   # the rule set is checked too
            if args.style == "criteria":
                wanted = subs.criteria_subscriptions(terminology, args.endpoint, SECRET_HEADER, secret,
                                                     payload=args.payload != "none")
            else:
                wanted = subs.backport_subscriptions(terminology, args.endpoint, SECRET_HEADER, secret, _topics(args),
                                                     content=args.payload_content, heartbeat=args.heartbeat)
            states = subs.sync(client, wanted, wait=args.wait)
        except FhirError as exc:
            output.err(f"error: {exc}" + (f" ({exc.outcome})" if exc.outcome else ""))
            return EXIT_SERVER
    _report(states)
    inactive = [st for st in states if st.action != "removed" and st.status != "active"]
    if inactive:
        output.err(f"{len(inactive)} Subscription(s) not active after {args.wait:g} s (status "
                   f"{', '.join(sorted({st.status for st in inactive}))}): the server has not activated them; "
                   "it may do so later, or never notify")
    return EXIT_FAILED if inactive else EXIT_OK


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "subscribe", help="create or update (or --remove) this tool's Subscriptions on a FHIR server",
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
    p.add_argument("--wait", type=float, default=5.0, metavar="S",
                   help="seconds to wait for the server to activate the Subscriptions (default 5)")
    p.add_argument("--remove", action="store_true",
                   help="delete the Subscriptions this tool created (only those for --endpoint, when given)")
    add_server_options(p)
    add_rules_options(p)
    p.set_defaults(func=cmd_subscribe)
