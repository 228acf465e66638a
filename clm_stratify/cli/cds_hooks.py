"""``clm-stratify cds-hooks``: the CDS Hooks service alone (``serve --cds-hooks`` mounts
the same routes next to ``/notify``); the CDS options both commands share."""

from __future__ import annotations

import argparse

from clm_stratify.cli import output
from clm_stratify.cli.common import UsageError, add_rules_options, load_rules
from fhir_adapters.project import EXIT_OK


def add_cds_options(p: argparse.ArgumentParser) -> None:
    """Who may call the service, which FHIR servers it may call, and its public URL."""
    g = p.add_argument_group("CDS Hooks")
    g.add_argument("--cds-client", action="append", default=[], metavar="ISS=JWKS_FILE",
                   help="a trusted CDS client: its JWT issuer and its JWK Set file (repeatable)")
    g.add_argument("--cds-no-auth", action="store_true",
                   help="sandbox mode: accept calls without a JWT (prints a warning; never with patient data)")
    g.add_argument("--cds-fhir-server", action="append", default=[], metavar="URL",
                   help="a FHIR server a request's fhirServer may name, besides --fhir-url (repeatable)")
    g.add_argument("--cds-public-url", metavar="URL",
                   help="the base URL CDS clients call, checked as the JWT aud (default http://HOST:PORT)")
    g.add_argument("--cds-max-body", type=int, default=5_000_000, metavar="BYTES")
    g.add_argument("--cds-cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser-based CDS client's origin allowed by CORS, e.g. https://sandbox.cds-hooks.org "
                        "(repeatable; default: none)")


def cds_config(args: argparse.Namespace):
    """The :class:`CdsConfig` of the arguments; :class:`UsageError` on a bad one."""
    from clm_stratify.service.cds_auth import JwtVerifier, load_jwks
    from clm_stratify.service.cds_hooks import CdsConfig

    if bool(args.cds_client) == bool(args.cds_no_auth):
        raise UsageError("the CDS Hooks service needs --cds-client ISS=JWKS_FILE (the EHR's JWT issuer and "
                         "public keys), or --cds-no-auth for a sandbox: one or the other")
    clients = {}
    for item in args.cds_client:
        iss, sep, path = item.partition("=")
        if not sep or not iss or not path:
            raise UsageError(f"--cds-client {item!r}: expected ISS=JWKS_FILE")
        try:
            clients[iss] = load_jwks(path)
        except ValueError as exc:
            raise UsageError(f"--cds-client {iss}: {exc}") from None
    if args.cds_no_auth:
        output.err("warning: --cds-no-auth: CDS Hooks calls are NOT authenticated; use only in a sandbox")
    servers = [u for u in [getattr(args, "fhir_url", None), *args.cds_fhir_server] if u]
    for url in servers:
        if not url.lower().startswith(("http://", "https://")):
            raise UsageError(f"--cds-fhir-server {url!r}: must start with http:// or https://")
    public = args.cds_public_url or f"http://{args.host}:{args.port}"
    if not public.lower().startswith(("http://", "https://")):
        raise UsageError(f"--cds-public-url {public!r}: must start with http:// or https://")
    if not 1024 <= args.cds_max_body <= 10**9:
        raise UsageError(f"--cds-max-body {args.cds_max_body}: must be between 1024 and 1000000000")
    for origin in args.cds_cors_origin:
        if origin == "*" or not origin.lower().startswith(("http://", "https://")) or origin.count("/") != 2:
            raise UsageError(f"--cds-cors-origin {origin!r}: an origin is scheme://host[:port], and never *")
    verify: bool | str = getattr(args, "ca_bundle", None) or not getattr(args, "insecure", False)
    return CdsConfig(public_url=public, verifier=JwtVerifier(clients) if clients else None,
                     fhir_servers=tuple(servers), max_body=args.cds_max_body, verify_tls=verify,
                     cors_origins=tuple(o.rstrip("/") for o in args.cds_cors_origin))


class RulesInForce:
    """The rule set a standalone service uses; the SIGHUP :class:`Reloader` swaps ``rules``."""

    def __init__(self, rules) -> None:
        self.rules = rules


def cmd_cds_hooks(args: argparse.Namespace) -> int:
    import logging
    import time

    from clm_stratify.service import http_guard

    from clm_stratify.service.cds_hooks import SERVICE_ID, create_cds_app
    from clm_stratify.service.reload import Reloader

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be between 1 and 65535")
    config = cds_config(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        output.err(f"warning: listening on {args.host}, not only on loopback")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), datefmt="%Y-%m-%dT%H:%M:%S",
                        format="%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s")
    from clm_stratify.service.privacy import install_log_redaction
    install_log_redaction()   # no patient reference in any log line, whoever logs it
    logging.Formatter.converter = time.gmtime
    holder = RulesInForce(load_rules(args))
    Reloader(holder, args.rules, args.terminology).install()   # SIGHUP: reload rules + terminology
    app = create_cds_app(config, lambda: holder.rules)
    output.err(f"clm-stratify CDS Hooks service on http://{args.host}:{args.port}/cds-services "
               f"(service {SERVICE_ID}); FHIR servers it may call: {', '.join(config.fhir_servers) or 'none'}")
    http_guard.serve(app, host=args.host, port=args.port)
    return EXIT_OK


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cds-hooks", help="a CDS Hooks 2.0 service: the group on a card in the EHR",
                              epilog="examples:\n"
                                     "  clm-stratify cds-hooks --port 8766 --fhir-url https://fhir.example.org/r4 \\\n"
                                     "      --cds-client https://ehr.example.org=ehr-jwks.json "
                                     "--cds-public-url https://cds.example.org\n"
                                     "  clm-stratify cds-hooks --port 8766 --fhir-url http://127.0.0.1:8090/fhir "
                                     "--cds-no-auth   # sandbox",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fhir-url", metavar="URL", help="the FHIR server requests may name as fhirServer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--ca-bundle", metavar="PEM", help="CA certificates to trust for the FHIR servers' TLS")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_cds_options(p)
    add_rules_options(p)
    p.set_defaults(func=cmd_cds_hooks)
