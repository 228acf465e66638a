"""``clm-stratify inbox``: show the receiver's inbox and dead letters; replay them."""

from __future__ import annotations

import argparse

from clm_stratify.cli import output
from clm_stratify.cli.common import UsageError
from fhir_adapters.project import EXIT_OK


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
        output.out(f"replayed {inbox.replay(kind, item)} item(s); a running receiver picks them up")
        return EXIT_OK
    output.print_inbox(inbox)
    return EXIT_OK


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inbox", help="show the receiver's inbox and dead letters; replay them",
                              epilog="examples:\n  clm-stratify inbox --inbox clm-inbox.sqlite\n"
                                     "  clm-stratify inbox --inbox clm-inbox.sqlite --replay-all",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inbox", default="clm-inbox.sqlite", metavar="PATH")
    p.add_argument("--replay", metavar="KIND:ID", help="put one dead letter back in the queue")
    p.add_argument("--replay-all", action="store_true")
    p.set_defaults(func=cmd_inbox)
