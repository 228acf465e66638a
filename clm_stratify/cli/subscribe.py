"""``clm-stratify subscribe``: create (or ``--remove``) this tool's Subscriptions on a FHIR server."""

from __future__ import annotations

import argparse

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


def cmd_subscribe(args: argparse.Namespace) -> int:
    from clm_stratify.service.receiver import SECRET_HEADER
    from clm_stratify.service import subscriptions as subs
    from fhir_adapters.fhir.client import FhirError

    with make_client(args) as client:
        try:
            if args.remove:
                removed = subs.remove(client)
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
            statuses = subs.create(client, wanted)
        except FhirError as exc:
            output.err(f"error: {exc}" + (f" ({exc.outcome})" if exc.outcome else ""))
            return EXIT_SERVER
    output.print_subscriptions(statuses)
    return EXIT_OK if all(st.status == "active" for st in statuses) else EXIT_FAILED


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "subscribe", help="create (or --remove) this tool's Subscriptions on a FHIR server",
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
    add_server_options(p)
    add_rules_options(p)
    p.set_defaults(func=cmd_subscribe)
