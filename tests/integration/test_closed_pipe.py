"""Every command exits cleanly when its reader goes away (``clm-stratify ... | head -1``).

Each command runs as a real process (``python -m clm_stratify``, and the ``clm-stratify``
script once) with its standard output on a pipe the test closes at once (or after one
line). Its standard error goes to a file: no "Traceback", no "BrokenPipeError", no
"Exception ignored" there. The exit code is the documented one (clm_stratify/cli/__init__.py):
141 when the command did its work but its output was cut short, the command's own code when
it failed (1, 2, 3), its own code too when only standard error was closed. The work is
never cut short: ``run --all`` writes every RiskAssessment, ``interop`` its report,
``subscribe`` its Subscriptions, ``inbox --replay-all`` its replays, and ``serve`` keeps
serving notifications.

Both buffering modes are covered: the default (a pipe is block-buffered, the closed pipe is
found when the output is flushed at the end) and ``PYTHONUNBUFFERED=1`` (found at the first
write). Servers on 127.0.0.1 only; every wait is bounded; every process is ended.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_adapters.fhir.client import FhirClient, dumps
from fhir_adapters.project import TAG_SYSTEM
from fixtures import FIXTURES_DIR
from tests.support.http import LoopbackServer, operation_outcome, read_body, send
from tests.support.receiver_process import SECRET, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "clm_stratify"]
BUNDLE = str(FIXTURES_DIR / "05-borderline-size-50mm-exact.json")
CLOSED_PIPE = 141
TIMEOUT = 180


def env_of(unbuffered: bool = False, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


def _wait(proc: subprocess.Popen, timeout: float = TIMEOUT) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def closed_stdout(argv: list[str], tmp_path: Path, *, lines: int = 0, first_bytes: int = 0,
                  env: dict | None = None, cmd: list[str] = CLI,
                  stderr_too: bool = False) -> tuple[int, str, list[bytes]]:
    """Run the command with standard output on a pipe that is closed after reading ``lines``
    lines or ``first_bytes`` bytes (neither: at once, before the command can write anything);
    standard error in a file, or on the same pipe (``stderr_too``: ``2>&1 | head``).
    (exit code, standard error, what was read)."""
    err_file = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with err_file.open("wb") as err:
        proc = subprocess.Popen(cmd + argv, cwd=ROOT, env=env or env_of(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT if stderr_too else err)
        read = [proc.stdout.readline() for _ in range(lines)]
        if first_bytes:
            read.append(os.read(proc.stdout.fileno(), first_bytes))
        proc.stdout.close()     # the reader goes away
        code = _wait(proc)
    return code, err_file.read_text(errors="replace"), read


def assert_clean(stderr: str) -> None:
    for bad in ("Traceback", "BrokenPipeError", "Exception ignored", "Broken pipe"):
        assert bad not in stderr, stderr[-3000:]


def full_run(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """The command with both streams read to the end."""
    return subprocess.run(CLI + argv, cwd=ROOT, env=env or env_of(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)


# --------------------------------------------------------------------------- no server
@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("argv", [
    ["classify", "--bundle", BUNDLE],
    ["classify", "--bundle", BUNDLE, "--format", "json"],
    ["rules", "validate"],
    ["rules", "validate", "--terminology", str(ROOT / "rules" / "terminology.yaml")],
    ["--help"],
    ["--version"],
    ["run", "--help"],
], ids=["classify", "classify-json", "rules-validate", "rules-validate-terminology", "help", "version", "run-help"])
def test_file_commands_exit_141_without_a_traceback(argv, unbuffered, tmp_path):
    code, err, _ = closed_stdout(argv, tmp_path, env=env_of(unbuffered))
    assert_clean(err)
    assert err == ""
    assert code == CLOSED_PIPE


def test_the_installed_script_too(tmp_path):
    script = Path(sys.executable).with_name("clm-stratify")
    if not script.exists():
        script = shutil.which("clm-stratify")
    if not script:
        pytest.skip("the clm-stratify script is not installed")
    code, err, _ = closed_stdout(["classify", "--bundle", BUNDLE], tmp_path, cmd=[str(script)])
    assert_clean(err)
    assert code == CLOSED_PIPE


@pytest.mark.parametrize("argv", [["classify", "--bundle", "/nonexistent/bundle.json"],
                                  ["run", "--fhir-url", "ftp://x", "--all"],
                                  ["no-such-command"]], ids=["bad-file", "bad-url", "bad-command"])
def test_a_failed_command_keeps_its_own_exit_code(argv, tmp_path):
    code, err, _ = closed_stdout(argv, tmp_path)
    assert_clean(err)
    assert code == 2 and "error: " in err


def test_closed_stderr_pipe_keeps_the_result_and_the_exit_code(tmp_path):
    """Standard error read by nobody: the messages are dropped, standard output is complete,
    the exit code is the command's own."""
    want = full_run(["classify", "--bundle", BUNDLE]).stdout
    for argv, expected_code in ((["classify", "--bundle", BUNDLE], 0),
                                (["classify", "--bundle", "/nonexistent/bundle.json"], 2),
                                (["classify", "--bundle", BUNDLE, "--insecure-no-such-option"], 2)):
        out_file = tmp_path / "stdout.txt"
        with out_file.open("wb") as out:
            proc = subprocess.Popen(CLI + argv, cwd=ROOT, env=env_of(unbuffered=True), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.PIPE)
            proc.stderr.close()
            code = _wait(proc)
        assert code == expected_code, out_file.read_text()
        assert out_file.read_text() == (want if expected_code == 0 else "")


@pytest.mark.parametrize("redirect", ["2>&-", ">&-", ">&- 2>&-"])
def test_streams_closed_before_the_start(redirect, tmp_path):
    """``2>&-`` / ``>&-``: the stream is sent away like ``>/dev/null``; an error message does
    not leak onto standard output, and the exit code is the command's own."""
    python = " ".join(CLI)
    for bundle, expected_code in ((BUNDLE, 0), ("/nonexistent/bundle.json", 2)):
        proc = subprocess.run(f"exec {python} classify --bundle {bundle} {redirect}", shell=True, cwd=ROOT,
                              env=env_of(), capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == expected_code, (proc.stdout, proc.stderr)
        if redirect.startswith(">&-"):
            assert proc.stdout == ""
        if "2>&-" in redirect:
            assert proc.stderr == "" and "error" not in proc.stdout and "Traceback" not in proc.stdout
        assert_clean(proc.stderr)


# --------------------------------------------------------------------------- inbox
def _inbox_with_a_dead_letter(path: Path) -> None:
    from clm_stratify.service.inbox import Inbox

    inbox = Inbox(path, max_attempts=1)
    nid = inbox.accept(json.dumps({"resourceType": "Bundle", "type": "history", "entry": []}))
    inbox.notification_failed(nid, "synthetic failure for the test")
    inbox.close()


def test_inbox_and_replay(tmp_path):
    from clm_stratify.service.inbox import Inbox

    path = tmp_path / "inbox.sqlite"
    _inbox_with_a_dead_letter(path)
    listing = full_run(["inbox", "--inbox", str(path)])
    assert listing.returncode == 0 and "dead letters" in listing.stdout, listing

    code, err, _ = closed_stdout(["inbox", "--inbox", str(path)], tmp_path)
    assert_clean(err)
    assert code == CLOSED_PIPE

    code, err, _ = closed_stdout(["inbox", "--inbox", str(path), "--replay-all"], tmp_path)
    assert_clean(err)
    assert code == CLOSED_PIPE
    inbox = Inbox(path)
    try:
        assert inbox.dead_letters() == []          # replayed, though nobody read the answer
    finally:
        inbox.close()


# --------------------------------------------------------------------------- a SEKMET server
def assessments(base_url: str) -> list[dict]:
    with FhirClient(base_url) as c:
        return list(c.search("RiskAssessment", {"_tag": f"{TAG_SYSTEM}|clm-stratify", "_count": "500"}))


def assert_nothing_left_to_write(base_url: str) -> None:
    """A run read to the end after the cut-short one: every assessment is there already."""
    proc = full_run(["run", "--fhir-url", base_url, "--all", "--format", "json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    actions = [p["action"] for p in json.loads(proc.stdout)["patients"]]
    assert set(actions) <= {"unchanged", "no-recurrence"}, actions
    written = assessments(base_url)
    assert len(written) == actions.count("unchanged") > 10


def test_run_all_writes_every_assessment_when_stdout_is_closed_at_once(server, tmp_path):
    assert assessments(server.base_url) == []
    code, err, _ = closed_stdout(["run", "--fhir-url", server.base_url, "--all"], tmp_path)
    assert_clean(err)
    assert code == CLOSED_PIPE
    assert_nothing_left_to_write(server.base_url)


def test_run_all_json_cut_short_with_stderr_on_the_same_pipe(make_server, tmp_path):
    """``run --all --format json 2>&1 | head -c 20`` (the JSON, about 300 kB, is larger than
    a pipe holds: the command is writing when the reader goes away)."""
    srv = make_server()
    code, _, read = closed_stdout(["run", "--fhir-url", srv.base_url, "--all", "--format", "json"], tmp_path,
                                  first_bytes=20, stderr_too=True)
    assert read[0].startswith(b'{"fhir_url":')
    assert code == CLOSED_PIPE
    assert_nothing_left_to_write(srv.base_url)


def test_run_one_patient(server, tmp_path):
    code, err, _ = closed_stdout(["run", "--fhir-url", server.base_url, "--patient", "f12-pat", "--dry-run"],
                                 tmp_path)
    assert_clean(err)
    assert code == CLOSED_PIPE


def test_run_against_no_server_keeps_exit_code_3(tmp_path):
    code, err, _ = closed_stdout(["run", "--fhir-url", f"http://127.0.0.1:{free_port()}/fhir", "--all",
                                  "--connect-timeout", "1"], tmp_path)
    assert_clean(err)
    assert code == 3 and "error: FHIR server unavailable" in err


def test_interop_writes_its_report(fhir_server, tmp_path):
    report = tmp_path / "report.json"
    code, err, _ = closed_stdout(["interop", "--fhir-url", fhir_server.base_url, "--report", str(report)], tmp_path)
    assert_clean(err)
    written = json.loads(report.read_text())       # the run went to the end: report, cleanup
    assert written["counts"]["fail"] == 0 and written["counts"]["pass"] > 10, written["counts"]
    assert [s["step"] for s in written["steps"]][-1] == "cleanup"
    assert code == CLOSED_PIPE


def _ok(h) -> None:
    read_body(h)
    send(h, 200, operation_outcome("informational", "received"))


def test_subscribe_and_remove(server, tmp_path):
    env = env_of(CLM_SUBSCRIPTION_SECRET=SECRET)
    with LoopbackServer(_ok, methods=("POST", "PUT")) as endpoint_server:
        endpoint = f"{endpoint_server.url}/notify"

        def ours() -> list[dict]:
            with FhirClient(server.base_url) as c:
                return [s for s in c.search("Subscription", {"_count": "1000"})
                        if s["channel"]["endpoint"] == endpoint]

        try:
            code, err, _ = closed_stdout(["subscribe", "--fhir-url", server.base_url, "--endpoint", endpoint,
                                          "--wait", "5"], tmp_path, env=env)
            assert_clean(err)
            assert code == CLOSED_PIPE, err
            created = ours()
            assert created and {s["status"] for s in created} == {"active"}
            again = full_run(["subscribe", "--fhir-url", server.base_url, "--endpoint", endpoint, "--wait", "5"],
                             env=env)          # read to the end: nothing left to create
            assert again.returncode == 0, again.stderr
            assert again.stdout.count("[unchanged") == len(created) == len(ours())

            code, err, _ = closed_stdout(["subscribe", "--fhir-url", server.base_url, "--endpoint", endpoint,
                                          "--remove"], tmp_path, env=env)
            assert_clean(err)
            assert code == CLOSED_PIPE
            assert ours() == []
        finally:
            with FhirClient(server.base_url) as c:
                for s in ours():
                    c.delete("Subscription", s["id"])


def test_demo(tmp_path):
    code, err, _ = closed_stdout(["demo"], tmp_path)
    assert_clean(err)
    assert "Loaded " in err
    assert code == CLOSED_PIPE


def test_demo_with_stderr_on_the_same_pipe_read_one_line(tmp_path):
    """``clm-stratify demo 2>&1 | head -1``: the first line is the server's start, the rest goes nowhere."""
    code, _, read = closed_stdout(["demo"], tmp_path, lines=1, stderr_too=True)
    assert read[0].startswith(b"Starting the embedded FHIR server")
    assert code == CLOSED_PIPE


# --------------------------------------------------------------------------- serve
def _serve(fhir_url: str, tmp_path: Path, name: str, *, stdout, stderr) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(CLI + ["serve", "--fhir-url", fhir_url, "--port", str(port), "--inbox",
                                   str(tmp_path / f"{name}.sqlite"), "--coalesce", "0"],
                            cwd=ROOT, env=env_of(CLM_SUBSCRIPTION_SECRET=SECRET), stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc, url
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    return proc, url


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def _notify_and_wait(url: str, obs: dict) -> None:
    r = requests.put(f"{url}/notify/Observation/{obs['id']}", data=dumps(obs).encode(), timeout=10,
                     headers={"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if requests.get(f"{url}/healthz", timeout=5).json()["inbox_depth"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the receiver did not process the notification in 30 s")


@pytest.mark.parametrize("closed", ["stderr", "both"])
def test_serve_keeps_serving_with_a_closed_pipe(closed, make_server, tmp_path):
    """serve writes to standard error only (its start line, its log): with the reader of
    standard error (and of standard output) gone after the start, it re-classifies the
    notified patient, and stops as it does when both are read (SIGTERM)."""
    from fhir_adapters.writeback.resources import assessment_id
    from engine.ruleset import load_ruleset
    from tests.support.fixture_data import tumour_observations

    srv = make_server()
    obs = tumour_observations()["f06-pat"]
    with (tmp_path / "ref.log").open("wb") as log:
        ref, _ = _serve(srv.base_url, tmp_path, "ref", stdout=log, stderr=subprocess.STDOUT)
        assert ref.poll() is None, (tmp_path / "ref.log").read_text()
        expected_code = _stop(ref)

    out_file = tmp_path / "serve.log"
    with out_file.open("wb") as log:
        proc, url = _serve(srv.base_url, tmp_path, "closed",
                           stdout=subprocess.PIPE if closed in ("stdout", "both") else log,
                           stderr=subprocess.PIPE if closed in ("stderr", "both") else log)
        try:
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            assert proc.poll() is None, out_file.read_text()
            _notify_and_wait(url, obs)
            with FhirClient(srv.base_url) as c:
                assert c.read("RiskAssessment", assessment_id("Patient/f06-pat", load_ruleset().id)) is not None
            assert proc.poll() is None
        finally:
            code = _stop(proc)
    assert code == expected_code
    assert_clean(out_file.read_text(errors="replace"))


def test_serve_started_with_a_closed_stderr_pipe(make_server, tmp_path):
    """The reader of standard error gone before serve writes its start line."""
    srv = make_server()
    port = free_port()
    r, w = os.pipe()
    os.close(r)                                   # nobody will ever read standard error
    out_file = tmp_path / "serve.log"
    with out_file.open("wb") as log:
        proc = subprocess.Popen(CLI + ["serve", "--fhir-url", srv.base_url, "--port", str(port), "--inbox",
                                       str(tmp_path / "i.sqlite")], cwd=ROOT,
                                env=env_of(CLM_SUBSCRIPTION_SECRET=SECRET), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=w)
    os.close(w)
    try:
        deadline, healthy = time.monotonic() + 30, False
        while time.monotonic() < deadline and proc.poll() is None and not healthy:
            try:
                healthy = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
            except requests.RequestException:
                time.sleep(0.1)
        assert healthy, f"serve exited {proc.poll()}: {out_file.read_text()}"
    finally:
        _stop(proc)
    assert_clean(out_file.read_text(errors="replace"))
