"""``clm-stratify demo``: start a local FHIR server, load synthetic patients, run --all.

The demo cleans up after itself: unless ``--keep-running``, the server is stopped and
the temporary directory of its database removed when the demo ends, whether it ends
normally, on an error, on Ctrl-C or on SIGTERM (a ``--data-dir`` of the user's is never
removed). Links to the server are printed only when it keeps running.
"""

from __future__ import annotations

import argparse
import shlex

from clm_stratify.cli import output
from clm_stratify.cli.common import add_format_option, add_rules_options
from clm_stratify.cli.run import add_list_option, run_live
from fhir_adapters.project import EXIT_SERVER, TAG, TAG_SYSTEM


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil
    import signal
    import tempfile
    import threading
    from pathlib import Path

    from fhir_adapters.fhir.client import FhirClient
    from fhir_adapters.fhir.load import fixture_bundles, load_bundles
    from fhir_adapters.fhir.local_server import LocalFhirServer, SekmetStartError
    from fixtures import FIXTURES_DIR

    # Messages go to standard error in JSON mode: standard output is the one JSON document.
    say = output.err if args.format == "json" else output.out
    temp_dir = None if args.data_dir else Path(tempfile.mkdtemp(prefix="clm-demo-"))
    data_dir = Path(args.data_dir) if args.data_dir else temp_dir
    server = LocalFhirServer(data_dir=data_dir, port=args.port, die_with_parent=not args.keep_running)
    keep = False   # the server (and its data) outlive the demo: set once it is up and the run is done

    def terminated(signum, frame):   # SIGTERM: clean up as on Ctrl-C
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()   # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, terminated) if in_main else None
    try:
        output.err("Starting the embedded FHIR server (SEKMET) on 127.0.0.1 ...")
        try:
            server.start()
        except SekmetStartError as exc:
            output.err(f"error: the embedded FHIR server did not start: {exc}")
            return EXIT_SERVER
        with FhirClient(server.base_url) as client:
            n = load_bundles(client, fixture_bundles(FIXTURES_DIR)).count
            output.err(f"Loaded {n} resources of {len(fixture_bundles(FIXTURES_DIR))} synthetic patients "
                       f"into {server.base_url}")
            args.fhir_url, args.patient, args.dry_run, args.no_bulk = server.base_url, None, False, False
            client.round_trips = 0  # count the run, not the loading
            code = run_live(args, client)
        keep = args.keep_running
        if keep:
            say(f"\nLook at the written RiskAssessments: {server.base_url}/RiskAssessment?_tag={TAG_SYSTEM}|{TAG}")
            say(f"and their Provenance: {server.base_url}/Provenance?_tag={TAG_SYSTEM}|{TAG}")
            say(f"The FHIR server keeps running at {server.base_url} (pid {server.pid}, data in {data_dir}); "
                f"stop it with: kill {server.pid}"
                + ("" if args.data_dir else f" && rm -r {shlex.quote(str(data_dir))}"))
        else:
            kept = "its temporary data removed" if temp_dir else f"its data kept in {data_dir}"
            say(f"\nThe FHIR server was stopped ({kept}); to look at the written RiskAssessments, run: "
                "clm-stratify demo --keep-running")
        return code
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        if not keep:
            server.stop()
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="start a local FHIR server, load synthetic patients, run --all",
                              epilog="examples:\n  clm-stratify demo\n  clm-stratify demo --list\n"
                                     "  clm-stratify demo --keep-running",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep-running", action="store_true",
                   help="leave the server up (with its data) and print its URL and links to the results")
    p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where the server keeps its database; never removed (default: a temp dir, removed at the end "
                        "unless --keep-running)")
    add_list_option(p)
    add_rules_options(p)
    add_format_option(p)
    p.set_defaults(func=cmd_demo, auth="none")
