"""The ``subscription`` step of ``clm-stratify interop``: does the server notify a rest-hook
Subscription?

A small threaded HTTP receiver starts inside the run (default ``127.0.0.1``, an ephemeral
port; it only records what arrives). A criteria rest-hook Subscription for the run's own
tagged ``Patient`` resources (``Patient?_tag=<run tag>``, payload ``application/fhir+json``,
a per-run secret header) points at it. After a bounded wait for the server to activate it
(or for a handshake), one tagged probe ``Patient`` is created and the run waits, bounded
again, for a notification.

* ``pass``: a notification for that resource arrived: its body or path names it, or an
  empty-body POST arrived after it was created (positive evidence only);
* ``warn``: the server accepted the Subscription, nothing for the resource arrived in time
  (a server on another machine cannot reach a loopback receiver: ``--subscription-host``,
  ``--subscription-url``);
* ``fail``: the server refused the Subscription (its OperationOutcome text is shown), or
  the receiver or the probe resource could not be set up.

The Subscription and the probe resource are always deleted (also after a failure), and
the receiver is always stopped.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from clm_stratify.interop import probes
from clm_stratify.interop.checks import FAIL, PASS, WARN
from clm_stratify.interop.run_state import RunState
from fhir_adapters.fhir.client import FhirError

CHECK_ID, TITLE = "subscription.rest-hook", "rest-hook Subscription notifies"
SECRET_HEADER = "X-CLM-Interop-Secret"
MAX_RECORDED = 50                 # requests the receiver keeps
MAX_BODY = 1_000_000              # bytes of one request body it reads
_NAMES_OTHER = re.compile(r"/[A-Z][A-Za-z]+/[^/?]+/?(\?.*)?$")    # .../Type/id: a PUT-style path


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address (a server on another machine cannot reach it)?

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SubscriptionOptions:
    """Where the run's receiver listens, the URL the server is given, and how long to wait
    (seconds) for activation, then again for the notification. ``url`` may contain
    ``{port}`` (the port the receiver got)."""

    host: str = "127.0.0.1"
    port: int = 0
    url: str | None = None
    wait: float = 5.0


@dataclass(frozen=True)
class Arrival:
    """One request the receiver got."""

    at: float                      # time.monotonic()
    method: str
    path: str
    secret_ok: bool
    body: bytes


class NotificationReceiver:
    """A threaded HTTP server on ``host:port`` that answers 200 to everything and records
    the requests (at most :data:`MAX_RECORDED`). :meth:`close` stops it (bounded)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, secret: str = "") -> None:
        self.arrivals: list[Arrival] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def _record(self) -> None:
                try:
                    length = min(int(self.headers.get("Content-Length") or 0), MAX_BODY)
                except ValueError:
                    length = 0
                body = self.rfile.read(length) if length > 0 else b""
                ok = bool(secret) and secrets.compare_digest(self.headers.get(SECRET_HEADER, ""), secret)
                receiver._add(Arrival(time.monotonic(), self.command, self.path, ok, body))
                reply = b'{"resourceType":"OperationOutcome","issue":[{"severity":"information",' \
                        b'"code":"informational","diagnostics":"received"}]}'
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_POST = do_PUT = do_GET = do_PATCH = _record

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request: object, client_address: object) -> None:
                pass                    # a peer that hangs up is not our problem

        self._httpd = Server((host, port), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="interop-subscription-receiver", daemon=True)
        self._thread.start()

    def _add(self, arrival: Arrival) -> None:
        with self._cond:
            if len(self.arrivals) < MAX_RECORDED:
                self.arrivals.append(arrival)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float) -> Any:
        """The first true ``predicate(arrivals)`` within ``timeout`` seconds, else its last value."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                found = predicate(list(self.arrivals))
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                self._cond.wait(min(left, 0.2))

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
            self._thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def names_resource(body: bytes, rtype: str, rid: str) -> bool:
    """Does a notification body name ``rtype/rid`` (the resource itself, a Bundle entry, a
    backport ``focus`` reference, anywhere)?

    >>> names_resource(b'{"resourceType": "Patient", "id": "p1"}', "Patient", "p1")
    True
    >>> names_resource(b'{"entry": [{"fullUrl": "http://h/fhir/Patient/p1/_history/2"}]}', "Patient", "p1")
    True
    >>> names_resource(b'{"resourceType": "Patient", "id": "p2"}', "Patient", "p1")
    False
    """
    try:
        doc = json.loads(body) if body.strip() else None
    except (ValueError, RecursionError):
        return False
    ref = f"{rtype}/{rid}"
    todo = [doc]
    for _ in range(100_000):               # bounded walk of the JSON tree
        if not todo:
            return False
        node = todo.pop()
        if isinstance(node, dict):
            if node.get("resourceType") == rtype and node.get("id") == rid:
                return True
            todo += node.values()
        elif isinstance(node, list):
            todo += node
        elif isinstance(node, str) and (node == ref or node.endswith("/" + ref) or f"/{ref}/_history/" in node
                                        or node.startswith(ref + "/_history/")):
            return True
    return False


def evidence(arrivals: list[Arrival], rtype: str, rid: str, since: float) -> Arrival | None:
    """The first request that proves a notification for ``rtype/rid``: its path or body
    names it, or it is an empty-body POST that arrived after ``since`` (monotonic) and
    whose path names no other resource."""
    for a in arrivals:
        if a.path.rstrip("/").endswith(f"/{rtype}/{rid}") or names_resource(a.body, rtype, rid):
            return a
        if a.method == "POST" and not a.body.strip() and a.at >= since and not _NAMES_OTHER.search(a.path):
            return a
    return None


class SubscriptionStep(RunState):
    """The ``subscription.rest-hook`` check (see the module docstring)."""

    def __init__(self, *args: Any, subscription: SubscriptionOptions | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.subscription_options = subscription or SubscriptionOptions()

    def subscription_check(self) -> None:
        opts = self.subscription_options
        secret = secrets.token_hex(16)
        started = time.monotonic()
        try:
            receiver = NotificationReceiver(opts.host, opts.port, secret)
        except OSError as exc:
            self.check(CHECK_ID, TITLE, FAIL, f"could not start the notification receiver on "
                       f"{opts.host}:{opts.port}: {exc.strerror or exc}")
            return
        sub_id = probe_ref = None
        left: list[str] = []
        checks_before = len(self.report.checks)
        try:
            host = f"[{opts.host}]" if ":" in opts.host else opts.host
            url = (opts.url or f"http://{host}:{{port}}/notify").replace("{port}", str(receiver.port))
            criteria = f"Patient?_tag={probes.tag_token(self.tag)}"
            end = (datetime.now(timezone.utc) + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            sub = {"resourceType": "Subscription", "meta": {"tag": [{"system": self.tag[0], "code": self.tag[1]}]},
                   "status": "requested", "end": end, "criteria": criteria,
                   "reason": f"clm-stratify interop run {self.run_id}: does the server notify?",
                   "channel": {"type": "rest-hook", "endpoint": url, "payload": "application/fhir+json",
                               "header": [f"{SECRET_HEADER}: {secret}"]}}
            where = f"criteria {criteria}, endpoint {url}"
            try:
                _, created = self.client.create(sub)
                sub_id = (created or {}).get("id") or self._find_subscription()
            except FhirError as exc:
                sub_id = self._find_subscription()        # an unknown outcome may still have created it
                self.check(CHECK_ID, TITLE, FAIL, (f"the server refused to create a rest-hook Subscription (HTTP "
                           f"{exc.status}; {where})" if exc.status else f"creating the Subscription got no answer "
                           f"({exc}; {where})"), exc.outcome or str(exc), time.monotonic() - started)
                return
            status = self._sub_status(sub_id, opts.wait, receiver)
            before_create = time.monotonic()
            try:
                _, probe = self.client.create(probes.probe_patient(self.tag, f"{self.run_id}-subscription"))
            except FhirError as exc:
                self.check(CHECK_ID, TITLE, FAIL, f"Subscription accepted (status {status[0]}), but the probe "
                           f"Patient could not be created (HTTP {exc.status})", exc.outcome or str(exc),
                           time.monotonic() - started)
                return
            if not (probe or {}).get("id"):
                self.check(CHECK_ID, TITLE, FAIL, "the create of the probe Patient returned no id: nothing "
                           "to watch for", seconds=time.monotonic() - started)
                return
            probe_ref = probes.ref_of(probe)
            found = receiver.wait_for(lambda a: evidence(a, "Patient", probe["id"], before_create), opts.wait)
            status = self._sub_status(sub_id, 0, receiver) if sub_id else ("unknown (not found after the create)", "")
            self._record(found, status, probe_ref, before_create, receiver, where, started)
        finally:
            for ref in (sub_id and f"Subscription/{sub_id}", probe_ref):
                if ref:
                    left += self._delete(ref)
            receiver.close()
            if left and len(self.report.checks) > checks_before:
                self.report.checks[-1].detail += f"; could not delete {', '.join(left)} (left to the clean-up)"

    def _sub_status(self, sub_id: str | None, wait: float, receiver: NotificationReceiver) -> tuple[str, str]:
        """(status, error) of the Subscription, once it left ``requested`` or something
        arrived (a handshake), or ``wait`` seconds passed."""
        deadline = time.monotonic() + max(0.0, wait)
        current: dict = {}
        while sub_id:
            try:
                current = self.client.read("Subscription", sub_id) or {}
            except FhirError as exc:
                return f"unreadable (HTTP {exc.status})", exc.outcome
            if current.get("status") != "requested" or receiver.arrivals or time.monotonic() >= deadline:
                break
            receiver.wait_for(bool, min(0.2, max(0.0, deadline - time.monotonic())))
        return str(current.get("status") or "?"), str(current.get("error") or "")

    def _record(self, found: Arrival | None, status: tuple[str, str], probe_ref: str, before_create: float,
                receiver: NotificationReceiver, where: str, started: float) -> None:
        opts = self.subscription_options
        seconds = time.monotonic() - started
        state = f"status {status[0]}" + (f" ({status[1]})" if status[1] else "")
        if found is not None:
            how = "an empty-body POST after the create" if not found.body.strip() and not \
                found.path.rstrip("/").endswith(probe_ref) else f"{found.method} {found.path.split('?')[0]}"
            self.check(CHECK_ID, TITLE, PASS,
                       f"notification for {probe_ref} arrived {max(0.0, found.at - before_create):.2f} s after the "
                       f"create ({how}; secret header {'sent' if found.secret_ok else 'NOT sent'}); Subscription "
                       f"{state}; {where}", seconds=seconds)
            return
        others = receiver.arrivals
        seen = (f"{len(others)} other request(s) arrived ({', '.join(a.method for a in others[:5])}), none for "
                f"{probe_ref}") if others else "nothing arrived"
        remote = (f"; the receiver listens on {opts.host}: a server on another machine cannot reach a loopback "
                  "receiver (use --subscription-host and --subscription-url)") if is_loopback(opts.host) else \
            f"; the receiver listens on {opts.host}"
        self.check(CHECK_ID, TITLE, WARN,
                   f"accepted, {state}, no notification within {opts.wait:g} s after creating {probe_ref} "
                   f"({seen}; {where}){remote}", status[1], seconds)

    def _find_subscription(self) -> str | None:
        """The id of the run's Subscription found by its tag (checked on each), when the
        create reply did not say it."""
        found = probes.tagged(self.client, "Subscription", self.tag, max_pages=2)
        return found[0].split("/", 1)[1] if found else None

    def _delete(self, ref: str) -> list[str]:
        """Delete ``ref``; on failure it is left to the clean-up step (and named)."""
        rtype, rid = ref.split("/", 1)
        try:
            self.client.delete(rtype, rid)
            return []
        except FhirError as exc:
            self.created.append(ref)
            return [f"{ref} ({exc.outcome or exc})"]
