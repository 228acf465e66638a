"""What several commands share: their option groups, the usage error, the rule set and
terminology they load, and the FHIR client (with its authentication) they build."""

from __future__ import annotations

import argparse
import os

from clm_stratify.cli import output


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- option groups
def add_rules_options(p: argparse.ArgumentParser) -> None:
    """``--rules`` and ``--terminology``: the YAML files a command classifies with."""
    p.add_argument("--rules", metavar="PATH", help="rule set YAML (default: rules/resectability.yaml)")
    p.add_argument("--terminology", metavar="PATH",
                   help="terminology YAML (default: rules/terminology.yaml)")


def add_format_option(p: argparse.ArgumentParser) -> None:
    """``--format text|json``."""
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="text for people; json: one JSON document on standard output, messages on standard error")


def add_server_options(p: argparse.ArgumentParser) -> None:
    """How to reach the FHIR server: authentication, TLS and timeouts (``--fhir-url`` is the command's)."""
    p.add_argument("--auth", choices=("none", "bearer", "smart"), default="none",
                   help="none (default), bearer (token from --token-env), or SMART Backend Services")
    p.add_argument("--token-env", default="CLM_FHIR_TOKEN", metavar="VAR",
                   help="environment variable holding the bearer token (default CLM_FHIR_TOKEN)")
    p.add_argument("--smart-client-id", metavar="ID", help="--auth smart: the client id registered with the server")
    p.add_argument("--smart-key", metavar="PEM", help="private key (PEM) registered with the server")
    p.add_argument("--smart-token-url", metavar="URL",
                   help="token endpoint (default: from .well-known/smart-configuration)")
    p.add_argument("--smart-scope", default="system/*.read system/RiskAssessment.write system/Provenance.write",
                   metavar="SCOPES", help="--auth smart: the scopes asked for")
    p.add_argument("--smart-alg", default="RS384", choices=("RS384", "ES384", "RS256", "ES256"),
                   help="--auth smart: how the JWT assertion is signed")
    p.add_argument("--ca-bundle", metavar="PEM", help="CA certificates to trust for TLS")
    p.add_argument("--insecure", action="store_true",
                   help="turn TLS certificate verification off (prints a warning; test servers only)")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for a connection to the server")
    p.add_argument("--read-timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for an answer once connected")


# --------------------------------------------------------------------------- rule set and terminology
def load_rules(args: argparse.Namespace):
    """The :class:`~clm_stratify.pipeline.Rules` pair: the rule engine (``--rules`` or the
    default rule set) and the terminology (``--terminology`` or the default one)."""
    from clm_stratify.pipeline import Rules
    from engine.classify import Engine
    from fhir_adapters.terminology import load_terminology

    engine = Engine.from_file(args.rules) if args.rules else Engine.default()
    return Rules(engine, load_terminology(args.terminology))


def patient_ref(text: str, fhir_url: str):
    """``--patient``: a logical id, ``Patient/<id>``, or a full URL on ``fhir_url`` as a
    :class:`PatientRef`. A full URL of another server names another patient: refused."""
    from fhir_adapters.fhir.reference import PatientRef, Reference, normalise_base

    ref = Reference.parse(text)
    if ref.kind == "absolute" and ref.base != normalise_base(fhir_url):
        raise UsageError(f"--patient: {text} is on another server than --fhir-url {fhir_url}; "
                         "give the patient's id on this server")
    try:
        return PatientRef.parse(text)
    except ValueError as exc:
        raise UsageError(f"--patient: {exc}") from None


# --------------------------------------------------------------------------- FHIR client
def make_auth(args: argparse.Namespace):
    """The client's authentication from ``--auth`` and its options (None for ``--auth none``)."""
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
    """A FHIR client for ``--fhir-url`` with the authentication, TLS and timeouts of the arguments."""
    from fhir_adapters.fhir.client import FhirClient

    if not args.fhir_url.startswith(("http://", "https://")):
        raise UsageError(f"--fhir-url must start with http:// or https://, got {args.fhir_url!r}")
    verify: bool | str = True
    if args.ca_bundle:
        verify = args.ca_bundle
    if args.insecure:
        output.err("warning: TLS certificate verification is OFF (--insecure): use only against a test server")
        verify = False
    return FhirClient(args.fhir_url, make_auth(args), verify=verify,
                      timeout=(args.connect_timeout, args.read_timeout))


def subscription_secret(args: argparse.Namespace) -> str:
    """The subscription secret from the environment variable ``--secret-env`` (16 characters or more)."""
    secret = os.environ.get(args.secret_env, "")
    if len(secret) < 16 or not secret.isprintable() or len(secret.strip()) != len(secret) or " " in secret:
        raise UsageError(f"set the subscription secret (16 characters or more, no spaces) in the environment variable "
                         f"{args.secret_env}; every Subscription sends it and the receiver checks it")
    return secret
