"""``clm-stratify demo``: start a local FHIR server, load synthetic patients, run --all."""

from __future__ import annotations

import argparse

from clm_stratify.cli import output
from clm_stratify.cli.common import add_format_option, add_rules_options
from clm_stratify.cli.run import run_live
from fhir_adapters.project import EXIT_SERVER, TAG, TAG_SYSTEM


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
        output.err("Starting the embedded FHIR server (SEKMET) on 127.0.0.1 ...")
        server.start()
    except SekmetStartError as exc:
        output.err(f"error: the embedded FHIR server did not start: {exc}")
        return EXIT_SERVER
    try:
        with FhirClient(server.base_url) as client:
            n = load_bundles(client, fixture_bundles(FIXTURES_DIR)).count
            output.err(f"Loaded {n} resources of {len(fixture_bundles(FIXTURES_DIR))} synthetic patients "
                       f"into {server.base_url}")
            args.fhir_url, args.patient, args.dry_run, args.no_bulk = server.base_url, None, False, False
            client.round_trips = 0  # count the run, not the loading
            code = run_live(args, client)
        output.out(f"\nLook at the written RiskAssessments: {server.base_url}/RiskAssessment?_tag="
                   f"{TAG_SYSTEM}|{TAG}")
        output.out(f"and their Provenance: {server.base_url}/Provenance?_tag="
                   f"{TAG_SYSTEM}|{TAG}")
        if args.keep_running:
            output.out(f"The FHIR server keeps running at {server.base_url} (pid {server.pid}, data in {data_dir}); "
                       f"stop it with: kill {server.pid}")
        return code
    finally:
        if not args.keep_running:
            server.stop()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="start a local FHIR server, load synthetic patients, run --all",
                              epilog="examples:\n  clm-stratify demo\n  clm-stratify demo --keep-running",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep-running", action="store_true", help="leave the server up and print its URL")
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--data-dir", metavar="DIR", help="where the server keeps its database (default: a temp dir)")
    add_rules_options(p)
    add_format_option(p)
    p.set_defaults(func=cmd_demo, auth="none")
