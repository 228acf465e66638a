"""The HTTP server's guards (clm_stratify.service.http_guard) on a real uvicorn server on
loopback, with both of uvicorn's HTTP parsers (httptools and h11): a client that opens
connections and sends a request slowly (or nothing) is disconnected after the request
deadline; well-behaved keep-alive clients, slow app handlers and bodies that arrive in
time are not; beyond the connection cap, requests get 503 at once."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import requests
import uvicorn

from clm_stratify.service.http_guard import guarded_protocol

TIMEOUT = 1.0


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            app.disconnects += 1
            return
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(2 * TIMEOUT)
    app.completed.append(body)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok:" + body})


def _protocols():
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    return {"h11": H11Protocol, "httptools": HttpToolsProtocol}


@pytest.fixture(params=["h11", "httptools"])
def server(request):
    app.disconnects, app.completed = 0, []
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", access_log=False, lifespan="off",
                            http=guarded_protocol(_protocols()[request.param], request_timeout=TIMEOUT),
                            limit_concurrency=20, timeout_keep_alive=30)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield port
    srv.should_exit = True
    thread.join(10)


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), None if still open after ``seconds``."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - start
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - start
    except socket.timeout:
        return None


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_partial_headers_and_silent_connections_are_closed_after_the_deadline(server):
    with _connect(server) as partial, _connect(server) as silent:
        partial.sendall(b"POST /notify HTTP/1.1\r\nHost: x\r\n")
        for sock in (partial, silent):
            waited = _closed_within(sock, 4 * TIMEOUT)
            assert waited is not None, "a connection with an unfinished request was kept open"
    assert app.completed == []


def test_a_body_trickling_past_the_deadline_is_cut_and_never_reaches_the_app_whole(server):
    with _connect(server) as sock:
        sock.sendall(b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        sock.sendall(b"1")
        assert _closed_within(sock, 4 * TIMEOUT) is not None
    assert app.completed == []
    deadline = time.monotonic() + 5
    while app.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.disconnects == 1


def test_keep_alive_clients_slow_handlers_and_bodies_in_time_are_not_cut(server):
    url = f"http://127.0.0.1:{server}"
    with requests.Session() as session:   # one connection, used for longer than the deadline
        for i in range(4):
            assert session.post(f"{url}/x", data=f"b{i}".encode(), timeout=5).text == f"ok:b{i}"
            time.sleep(TIMEOUT * 0.6)
        assert session.post(f"{url}/slow", data=b"s", timeout=10).text == "ok:s"   # the app takes 2x the deadline
    with _connect(server) as sock:                  # a body sent in pieces, complete within the deadline
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        time.sleep(TIMEOUT * 0.5)
        sock.sendall(b"cd")
        sock.settimeout(5)
        assert b"ok:abcd" in sock.recv(4096)


def test_a_slow_second_request_on_a_kept_alive_connection_is_cut(server):
    with _connect(server) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert b"ok:" in sock.recv(4096)
        time.sleep(TIMEOUT * 0.6)                   # within the first request's timer
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n")   # ... and never finished
        assert _closed_within(sock, 4 * TIMEOUT) is not None


def test_beyond_the_connection_cap_requests_get_503_at_once(server):
    idle = [_connect(server) for _ in range(25)]   # the cap is 20
    try:
        time.sleep(0.2)
        r = requests.get(f"http://127.0.0.1:{server}/x", timeout=5)
        assert r.status_code == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5 * TIMEOUT    # once they are gone, requests are served again
    while time.monotonic() < deadline:
        if requests.get(f"http://127.0.0.1:{server}/x", timeout=5).status_code == 200:
            break
        time.sleep(0.1)
    else:
        pytest.fail("requests still refused after the idle connections closed")


def test_the_receiver_cut_mid_body_stores_nothing_and_logs_one_line(tmp_path, caplog):
    """The real receiver app behind the guard: a notification whose body stops arriving is
    cut at the deadline; nothing is stored, and the log has one warning, no traceback."""
    from clm_stratify.service.inbox import Inbox
    from clm_stratify.service.receiver import ReceiverConfig, create_app

    secret = "s" * 32
    box = Inbox(tmp_path / "inbox.sqlite")
    config = uvicorn.Config(create_app(box, ReceiverConfig(secret=secret)), host="127.0.0.1", port=0,
                            log_level="error", lifespan="off", http=guarded_protocol(request_timeout=TIMEOUT))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = srv.servers[0].sockets[0].getsockname()[1]
        with caplog.at_level("WARNING"), _connect(port) as sock:
            sock.sendall(b"POST /notify HTTP/1.1\r\nHost: x\r\nX-CLM-Subscription-Secret: " + secret.encode() +
                         b"\r\nContent-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n{")
            assert _closed_within(sock, 4 * TIMEOUT) is not None
            deadline = time.monotonic() + 5
            while "disconnected before" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "disconnected before its notification had arrived whole" in caplog.text
        assert "Traceback" not in caplog.text and "Exception in ASGI" not in caplog.text
        assert box.depth().get("notifications_new", 0) == 0
    finally:
        srv.should_exit = True
        thread.join(10)
        box.close()
