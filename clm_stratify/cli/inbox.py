"""``clm-stratify inbox``: show the receiver's inbox, retrying items and dead letters; replay or drop them."""

from __future__ import annotations

import argparse

from clm_stratify.cli import output
from clm_stratify.cli.common import UsageError
from fhir_adapters.project import EXIT_OK


MAX_ID = 2**63 - 1   # an SQLite INTEGER: a larger id names no row (and cannot be bound)


def cmd_inbox(args: argparse.Namespace) -> int:
    from clm_stratify.service.inbox import Inbox, InboxError

    actions = (("--replay", args.replay), ("--replay-all", args.replay_all), ("--drop", args.drop),
               ("--drop-all", args.drop_all))
    given = [option for option, value in actions if value not in (None, False)]
    if len(given) > 1:
        raise UsageError(f"{given[0]} and {given[1]} cannot be combined: give one action at a time")
    for option, value in (("--replay", args.replay), ("--drop", args.drop)):
        _which(option, value)   # checked before the inbox is opened
    try:
        inbox = Inbox(args.inbox, create=False)
    except InboxError as exc:
        raise UsageError(str(exc)) from None
    for option, one, every, verb, act in (
            ("--replay", args.replay, args.replay_all, "replayed", inbox.replay),
            ("--drop", args.drop, args.drop_all, "dropped", inbox.drop)):
        if one is None and not every:
            continue
        kind, item = _which(option, one)
        n = act(kind, item)
        if one is not None and n == 0:
            raise UsageError(f"{option} {one}: no such dead letter (see the list: clm-stratify inbox)")
        output.out(f"{verb} {n} item(s)" + ("; a running receiver picks them up" if verb == "replayed" else ""))
        return EXIT_OK
    output.print_inbox(inbox)
    return EXIT_OK


def _which(option: str, value: str | None) -> tuple[str | None, int | None]:
    if value is None:
        return None, None
    kind, _, num = value.partition(":")
    # ASCII digits only: str.isdigit() and int() also take other scripts' digits ("٣" is 3)
    if kind not in ("patient", "notification") or not (num.isascii() and num.isdigit()):
        raise UsageError(f"{option} takes patient:ID or notification:ID (see the list), not {value!r}")
    if len(num) > 19 or int(num) > MAX_ID:
        raise UsageError(f"{option} {value}: no item has an id that large (ids are below 2^63)")
    return kind, int(num)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inbox", help="show the receiver's inbox and dead letters; replay or drop them",
                              epilog="examples:\n  clm-stratify inbox --inbox clm-inbox.sqlite\n"
                                     "  clm-stratify inbox --inbox clm-inbox.sqlite --replay-all",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inbox", default="clm-inbox.sqlite", metavar="PATH")
    p.add_argument("--replay", metavar="KIND:ID", help="put one dead letter back in the queue")
    p.add_argument("--replay-all", action="store_true")
    p.add_argument("--drop", metavar="KIND:ID", help="give up one dead letter for good (kept in the file, marked)")
    p.add_argument("--drop-all", action="store_true")
    p.set_defaults(func=cmd_inbox)
