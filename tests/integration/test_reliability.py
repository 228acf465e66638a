"""Reliability under real faults: a killed FHIR server, a killed receiver, a faulty network.

Every fault here happens for real: SEKMET (the FHIR server) is SIGKILLed, the receiver
(`clm-stratify serve`, a real process) is SIGKILLed, and the network faults come from
``tests/support/fault_proxy.py``, a loopback HTTP proxy that answers 500/503/429, resets TCP
connections, stalls past the client's read timeout, or forwards a write and then drops
its reply. No mocks.

What must hold after every scenario:

* every patient ends with exactly one current RiskAssessment (by its deterministic id,
  and by the ``_tag`` listing: no second one), whose version count equals its
  Provenance count (no write happened twice, none without its Provenance);
* what could not be done is reported (exit code 1 and the patients listed, or a dead
  letter in the receiver's inbox), never dropped in silence.

Run: ``python -m pytest tests/integration/test_reliability.py`` (the multi-seed sweep:
``python -m pytest -m slow tests/integration/test_reliability.py``).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from engine.ruleset import load_ruleset
from clm_stratify.cli import main
from engine.classify import Engine
from fhir_adapters.project import TAG_SYSTEM
from fhir_adapters.writeback.resources import assessment_id
from fhir_adapters.sources.bundle import read_bundle_file
from fhir_adapters.fhir.client import FhirClient, dumps
from fhir_adapters.features.mapping import map_features
from fhir_adapters.terminology import load_terminology
from fixtures import FIXTURES_DIR
from tests.support.fault_proxy import FaultProxy, is_transaction
from tests.support.fixture_data import candidates, tumour_observations
from tests.support.receiver_process import SECRET, Receiver, inbox_rows, patient_of

pytestmark = pytest.mark.integration
RULESET = (load_ruleset().id, load_ruleset().version)  # the default rule set, as written back
TAG = f"{TAG_SYSTEM}|clm-stratify"
HEADERS = {"X-CLM-Subscription-Secret": SECRET, "Content-Type": "application/fhir+json"}
FAST = ["--connect-timeout", "1", "--read-timeout", "1.5"]


def _no_bulk() -> list[str]:
    """``--no-bulk`` where `run` has it: population data by patient searches in chunks."""
    from clm_stratify.cli import build_parser
    try:
        build_parser().parse_args(["run", "--fhir-url", "http://127.0.0.1:1/fhir", "--all", "--no-bulk"])
    except SystemExit:
        return []
    return ["--no-bulk"]


SEARCH = _no_bulk()


# --------------------------------------------------------------------------- checks
def ra_versions(client: FhirClient, pids: set[str]) -> dict[str, int | None]:
    out = {}
    for pid in pids:
        ra = client.read("RiskAssessment", assessment_id(f"Patient/{pid}", RULESET[0]))
        out[pid] = int(ra["meta"]["versionId"]) if ra else None
    return out


def assert_exactly_one_current_ra(client: FhirClient, pids: set[str], *, version: int | None = 1) -> None:
    """One RA per patient by deterministic id and by the _tag listing; versions == Provenances."""
    versions = ra_versions(client, pids)
    assert all(v is not None for v in versions.values()), {p for p, v in versions.items() if v is None}
    listing = list(client.search("RiskAssessment", {"_tag": TAG, "_count": "1000"}))
    per_subject = Counter(r["subject"]["reference"] for r in listing)
    assert per_subject == Counter({f"Patient/{p}": 1 for p in pids}), \
        {s: n for s, n in per_subject.items() if n != 1 or s.split("/")[1] not in pids}
    provenances = Counter()
    for prov in client.search("Provenance", {"_tag": TAG, "_count": "1000"}):
        for t in prov.get("target", []):
            provenances[t["reference"].split("/_history/")[0].split("/fhir/")[-1]] += 1
    for pid, v in versions.items():
        rid = f"RiskAssessment/{assessment_id(f'Patient/{pid}', RULESET[0])}"
        assert provenances[rid] == v, (pid, v, provenances[rid])
        if version is not None:
            assert v == version, (pid, v)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def check_run_report(code: int, out: str, err: str, expected: set[str]) -> set[str]:
    """A `run --all --format json` answer hides nothing: every patient is listed once,
    failures have a reason, and the exit code says whether any failed. Returns the failed."""
    assert "Traceback" not in err
    if code == 3:  # the run could not start (the Condition search itself failed)
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
        return set(expected)
    report = json.loads(out)
    listed = Counter(p["patient"].split("/", 1)[1] for p in report["patients"])
    assert set(listed) >= expected and max(listed.values()) == 1, listed
    failed = {p["patient"].split("/", 1)[1] for p in report["patients"] if p["action"] == "failed"}
    assert all(p["error"] for p in report["patients"] if p["action"] == "failed")
    assert code == (1 if failed else 0), (code, failed)
    return failed


# --------------------------------------------------------------------------- FHIR server killed
def test_fhir_server_killed_during_run_all_then_second_run_finishes(make_server, capsys):
    """SEKMET is SIGKILLed right after the first chunk's write (50 patients) went through:
    the run exits 1 naming exactly the patients not written; after a restart (same
    port and database) a second run finishes them, and nobody gets a second RA."""
    prefixes = ("f", "g", "h")                 # 108 candidates: several chunks of the population
    server = make_server(prefixes)
    everyone = candidates(prefixes)
    killed = threading.Event()

    def kill_after_first_write(method: str, path: str, body: bytes, status: int) -> None:
        if method == "POST" and status == 200 and not killed.is_set() and is_transaction(body):
            killed.set()
            server.kill()

    with FaultProxy(server.root_url, after_forward=kill_after_first_write) as proxy:
        started = time.monotonic()
        code, out, err = run_cli(["run", "--fhir-url", proxy.base_url, "--all", *FAST, *SEARCH], capsys)
        took = time.monotonic() - started
    assert killed.is_set() and not server.running
    assert code == 1, (code, out, err)
    assert "Failed (not written; run again to retry):" in out and "Traceback" not in err
    named = set(re.findall(r"^  Patient/([\w.-]+): ", out, re.M))   # incl. patients with no recurrence
    assert named & everyone and not named >= everyone
    assert all("unavailable" in line for line in out.splitlines() if line.startswith("  Patient/"))

    server.start()                             # same port, same database
    with FhirClient(server.base_url) as client:
        written = {p for p, v in ra_versions(client, everyone).items() if v is not None}
        assert written and named & everyone == everyone - written   # reported == not done, exactly
        code, out, err = run_cli(["run", "--fhir-url", server.base_url, "--all", "--format", "json"], capsys)
        assert code == 0, err
        actions = {p["patient"].split("/", 1)[1]: p["action"] for p in json.loads(out)["patients"]}
        assert {actions[p] for p in named & everyone} == {"created"}
        assert {actions[p] for p in named - everyone} <= {"no-recurrence"}
        assert {actions[p] for p in written} == {"unchanged"}
        assert_exactly_one_current_ra(client, everyone)
    print(f"\nserver-kill: {len(everyone)} patients, {len(written)} written before the kill, "
          f"{len(named)} reported not done, first run {took:.1f} s; second run finished them")


# --------------------------------------------------------------------------- lost reply
def test_write_whose_reply_is_lost_is_not_duplicated(make_server, capsys):
    """The proxy forwards the RiskAssessment transaction (SEKMET stores it) and resets
    the connection instead of relaying the answer. The client must not blindly repeat
    the POST: --patient reports the unknown outcome (exit 1); the next run finds the
    stored assessment unchanged. With --all the per-patient fallback re-reads first."""
    server = make_server()
    lost = []

    def lose_first_write(method: str, path: str, body: bytes) -> str | None:
        if method == "POST" and is_transaction(body) and not lost:
            lost.append(path)
            return "lost-reply"
        return None

    pid = "f05-pat"
    with FaultProxy(server.root_url, script=lose_first_write) as proxy, FhirClient(server.base_url) as client:
        code, out, err = run_cli(["run", "--fhir-url", proxy.base_url, "--patient", pid, *FAST], capsys)
        assert lost and code == 1, (code, out, err)
        assert "outcome is unknown" in out and "Traceback" not in err
        assert ra_versions(client, {pid}) == {pid: 1}            # the write did happen
        code, out, err = run_cli(["run", "--fhir-url", proxy.base_url, "--patient", pid, *FAST,
                                  "--format", "json"], capsys)
        assert code == 0 and json.loads(out)["patients"][0]["action"] == "unchanged"

        lost.clear()                                             # now the whole population
        code, out, err = run_cli(["run", "--fhir-url", proxy.base_url, "--all", *FAST, "--format", "json"], capsys)
        assert lost and code == 0, (code, err)
        assert proxy.faults == Counter({"lost-reply": 2})
        assert_exactly_one_current_ra(client, candidates())


# --------------------------------------------------------------------------- random faults, run --all
def _run_until_done(proxy: FaultProxy, expected: set[str], capsys, max_runs: int = 8) -> list[tuple[int, int]]:
    history = []
    for _ in range(max_runs):
        code, out, err = run_cli(["run", "--fhir-url", proxy.base_url, "--all", *FAST, "--format", "json"], capsys)
        failed = check_run_report(code, out, err, expected)
        history.append((code, len(failed)))
        if code == 0:
            return history
    raise AssertionError(f"not done after {max_runs} runs: {history}, faults {proxy.faults}")


SHARES = {"500": 0.04, "503": 0.06, "429": 0.05, "reset": 0.06, "delay": 0.03, "lost-reply": 0.06}


@pytest.mark.parametrize("seed", [11])
def test_run_all_through_random_faults_completes_or_reports(make_server, capsys, seed):
    """500/503/429/reset/stall/lost-reply at random (seeded, at most 10): each run
    lists every patient (failures with their reason and exit 1) and re-running
    finishes the work with exactly one RA (one version, one Provenance) per patient."""
    server = make_server()
    with FaultProxy(server.root_url, seed=seed, shares=SHARES, max_faults=10, delay=2.0) as proxy, \
            FhirClient(server.base_url) as client:
        history = _run_until_done(proxy, candidates(), capsys)
        assert_exactly_one_current_ra(client, candidates())
    print(f"\nseed {seed}: runs (exit, failed) {history}; faults {dict(proxy.faults)} in {proxy.requests} requests")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_run_all_through_random_faults_many_seeds(make_server, capsys, seed):
    """The same with more seeds and more faults (two chunks of patients)."""
    server = make_server(("f", "g"))
    shares = {k: v * 1.5 for k, v in SHARES.items()}
    with FaultProxy(server.root_url, seed=seed, shares=shares, max_faults=30, delay=2.0) as proxy, \
            FhirClient(server.base_url) as client:
        history = _run_until_done(proxy, candidates(("f", "g")), capsys, max_runs=12)
        assert_exactly_one_current_ra(client, candidates(("f", "g")))
    print(f"\nseed {seed}: runs (exit, failed) {history}; faults {dict(proxy.faults)} in {proxy.requests} requests")


# --------------------------------------------------------------------------- the receiver
def post_notification(url: str, obs: dict, timeout: float = 5) -> int | None:
    """PUT a rest-hook notification; the accepted notification id, or None if refused/failed."""
    try:
        r = requests.put(f"{url}/notify/Observation/{obs['id']}", data=dumps(obs).encode(),
                         headers=HEADERS, timeout=timeout)
    except requests.RequestException:
        return None
    if r.status_code != 200:
        return None
    return int(re.search(r"accepted as notification (\d+)", r.text).group(1))


def test_receiver_sigkilled_while_notifications_arrive(make_server, tmp_path):
    """Two sender threads post rest-hook notifications; the receiver is SIGKILLed while
    they arrive and while its workers evaluate, then restarted on the same inbox. Every
    notification answered 2xx is resolved and counted in exactly one evaluation of its
    patient; no patient gets a second RA or a second version."""
    server = make_server()
    observations = tumour_observations()
    pids = sorted(observations)
    inbox = tmp_path / "inbox.sqlite"
    receiver = Receiver(server.base_url, inbox)
    accepted: dict[int, str] = {}
    refused = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def sender(offset: int) -> None:
        i = offset
        deadline = time.monotonic() + 40
        while not stop.is_set() and time.monotonic() < deadline:
            pid = pids[i % len(pids)]
            nid = post_notification(receiver.url, observations[pid], timeout=3)
            with lock:
                if nid is None:
                    refused[pid] += 1
                else:
                    accepted[nid] = pid
            i += 2
            time.sleep(0.01 if nid is not None else 0.05)

    receiver.start()
    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(2)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(accepted) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        before_kill = receiver.health()
        receiver.kill()                                   # SIGKILL, mid-stream
        at_kill = len(accepted)
        time.sleep(0.5)                                   # notifications arrive at a dead receiver
        receiver.start()                                  # same port, same inbox
        deadline = time.monotonic() + 20
        while len(accepted) < at_kill + 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(10)
        receiver.wait_idle(60)
    finally:
        stop.set()
        receiver.stop()

    notes, work = inbox_rows(inbox)
    stored = {nid: (state, patient_of(body)) for nid, state, body in notes}
    assert set(accepted) <= set(stored), "an accepted notification was lost"
    # stored but never acknowledged: at most the requests in flight at the kill
    assert len(set(stored) - set(accepted)) <= len(threads)
    assert {state for state, _ in stored.values()} == {"resolved"}
    assert all(accepted[nid] == stored[nid][1] for nid in accepted)
    assert {state for _, _, state, _ in work} == {"done"}
    # every stored notification counted in exactly one evaluation of its own patient
    per_patient_notes = Counter(p for _, p in stored.values())
    per_patient_counted = Counter()
    evaluations = Counter()
    for _, patient, _, n in work:
        per_patient_counted[patient] += n
        evaluations[patient] += 1
    assert per_patient_counted == per_patient_notes
    assert all(evaluations[p] <= per_patient_notes[p] for p in evaluations)
    with FhirClient(server.base_url) as client:
        assert_exactly_one_current_ra(client, set(per_patient_notes))
    print(f"\nreceiver-kill: accepted {len(accepted)} ({at_kill} before the SIGKILL; depth then "
          f"{before_kill['inbox_depth']}), refused while down {sum(refused.values())}, stored {len(stored)}, "
          f"evaluations {sum(evaluations.values())} for {len(evaluations)} patients, lost 0, duplicated 0")


def test_receiver_through_faults_retries_then_dead_letters_and_replays(make_server, tmp_path, capsys):
    """The receiver talks to SEKMET through the fault proxy. Phase 1: random faults
    (seeded, bounded): every notification ends evaluated or dead-lettered (listed by
    `clm-stratify inbox`), none silently dropped. Phase 2: the server answers 500 to
    everything: the items go to the dead letters; replayed once the faults stop, they
    are all evaluated; every patient has exactly one RA."""
    server = make_server()
    observations = dict(sorted(tumour_observations().items())[:16])
    pids = set(observations)
    inbox = tmp_path / "inbox.sqlite"
    shares = {"500": 0.08, "503": 0.08, "429": 0.06, "reset": 0.08, "delay": 0.03, "lost-reply": 0.08}
    with FaultProxy(server.root_url, seed=5, shares=shares, max_faults=14, delay=2.0) as proxy, \
            Receiver(proxy.base_url, inbox, None, *FAST, "--max-attempts", "3", "--coalesce", "0") as receiver, \
            FhirClient(server.base_url) as client:
        for pid in sorted(pids):
            assert post_notification(receiver.url, observations[pid]) is not None
        health = receiver.wait_idle(90)
        _, work = inbox_rows(inbox)
        states = {p: s for _, p, s, _ in work}
        assert set(states) == pids and set(states.values()) <= {"done", "dead"}
        dead = {p for p, s in states.items() if s == "dead"}
        assert health["dead_letters"] == len(dead)
        phase1 = (dict(proxy.faults), len(dead))

        # phase 2: everything fails -> dead letters, reported
        proxy.enabled = True
        proxy.max_faults = None
        proxy.shares = {"500": 1.0}
        some = sorted(pids)[:5]
        for pid in some:
            assert post_notification(receiver.url, observations[pid]) is not None
        receiver.wait_idle(60)
        assert main(["inbox", "--inbox", str(inbox)]) == 0
        listing = capsys.readouterr().out
        _, work = inbox_rows(inbox)
        dead_ids = {wid for wid, _, s, _ in work if s == "dead"}
        assert len(dead_ids) >= len(some) and receiver.health()["dead_letters"] == len(dead_ids)
        for wid in dead_ids:
            assert f"patient:{wid} " in listing
        assert "injected internal error" in listing

        proxy.enabled = False                         # the server is healthy again
        assert main(["inbox", "--inbox", str(inbox), "--replay-all"]) == 0
        receiver.wait_idle(60)
        _, work = inbox_rows(inbox)
        assert {s for _, _, s, _ in work} == {"done"}
        assert receiver.health()["dead_letters"] == 0
        ras = list(client.search("RiskAssessment", {"_tag": TAG, "_count": "1000"}))
        assert len(ras) == len(pids)
        assert_exactly_one_current_ra(client, pids)
    print(f"\nreceiver-faults: phase 1 faults {phase1[0]}, dead letters {phase1[1]}; "
          f"phase 2 dead letters {len(dead_ids)} replayed and evaluated")


# --------------------------------------------------------------------------- rule-set reload
def _rules_copy(path: Path, threshold, version: str) -> Path:
    import yaml

    from rules import DEFAULT_RULESET
    data = yaml.safe_load(DEFAULT_RULESET.read_text())
    data["factors"]["largest_ge_50mm"]["threshold"] = threshold
    data["version"] = version
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _wait_log(receiver: Receiver, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = receiver.log.read_text(errors="replace")
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the receiver log:\n{receiver.log.read_text()[-3000:]}")


def group_for(client: FhirClient, pid: str, version: str) -> str | None:
    """The group of the patient's one current assessment, when it was made by rule-set ``version``."""
    ra = client.read("RiskAssessment", assessment_id(f"Patient/{pid}", RULESET[0]))
    if not ra or ra["method"]["coding"][0]["version"] != version:
        return None
    return ra["prediction"][0]["qualitativeRisk"]["coding"][0]["code"]


def _group_after(receiver: Receiver, client: FhirClient, pid: str, version: str, timeout: float = 30) -> str | None:
    """``group_for`` once the receiver is idle, waiting (bounded) for the evaluation the
    notification asked for; on timeout the last answer, with the inbox shown by the caller."""
    receiver.wait_idle()
    deadline = time.monotonic() + timeout
    while (group := group_for(client, pid, version)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return group


def _inbox(receiver: Receiver) -> str:
    return f"{inbox_rows(receiver.inbox)} {receiver.health()} {receiver.log.read_text()[-1500:]}"


def test_serve_refuses_an_invalid_rule_set_at_start(make_server, tmp_path):
    import os
    import subprocess
    import sys

    from tests.support.receiver_process import free_port
    server = make_server()
    bad = _rules_copy(tmp_path / "bad.yaml", "fifty", "1.0.0")
    proc = subprocess.run([sys.executable, "-m", "clm_stratify", "serve", "--fhir-url", server.base_url,
                           "--port", str(free_port()), "--inbox", str(tmp_path / "i.sqlite"), "--rules", str(bad)],
                          env={**os.environ, "CLM_SUBSCRIPTION_SECRET": SECRET}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{bad}: factors.largest_ge_50mm.threshold: " in proc.stderr and "Traceback" not in proc.stderr


def test_sighup_reloads_a_valid_rule_set_and_keeps_the_old_one_when_invalid(make_server, tmp_path):
    """serve --rules FILE; SIGHUP after editing FILE: a valid edit (largest-tumour
    threshold 50 -> 40 mm, version 1.0.1) applies to the next evaluation; an invalid one
    is logged with the file and field path and the previous rule set keeps working."""
    import signal

    server = make_server()
    obs = tumour_observations()["f06-pat"]           # 49.9 mm: resectable at 50 mm, borderline at 40 mm
    rules = _rules_copy(tmp_path / "rules.yaml", 50, "1.0.0")
    with Receiver(server.base_url, tmp_path / "inbox.sqlite", None, "--rules", str(rules),
                  "--coalesce", "0") as receiver, FhirClient(server.base_url) as client:
        assert post_notification(receiver.url, obs) is not None
        assert _group_after(receiver, client, "f06-pat", "1.0.0") == "resectable", _inbox(receiver)

        _rules_copy(rules, 40, "1.0.1")
        receiver.proc.send_signal(signal.SIGHUP)
        _wait_log(receiver, "reloaded rule set clm-recurrence-resectability 1.0.1")
        assert post_notification(receiver.url, obs) is not None
        assert _group_after(receiver, client, "f06-pat", "1.0.1") == "borderline-resectable", _inbox(receiver)

        _rules_copy(rules, "forty", "1.0.2")
        receiver.proc.send_signal(signal.SIGHUP)
        log = _wait_log(receiver, "reload refused")
        assert f"{rules}: factors.largest_ge_50mm.threshold: " in log
        rules.write_text("id: [unclosed")
        receiver.proc.send_signal(signal.SIGHUP)
        _wait_log(receiver, "not valid YAML")
        assert post_notification(receiver.url, obs) is not None
        health = receiver.wait_idle()
        assert health["last_processed"]["result"].startswith("unchanged")   # 1.0.1 still in use
        assert group_for(client, "f06-pat", "1.0.2") is None
        assert receiver.proc.poll() is None
        assert "Traceback" not in receiver.log.read_text()


# --------------------------------------------------------------------------- bug found
def test_write_many_against_a_dead_server_fails_the_chunk_at_once():
    """A real closed port (connection refused): the whole chunk should cost one request's
    retries, not one per patient."""
    from fhir_adapters.fhir.local_server import free_port
    from fhir_adapters.writeback.strategy import StrategyChoice, UpdateAsCreate
    from fhir_adapters.writeback.writer import AssessmentWriter

    engine, terminology = Engine.default(), load_terminology()
    results = []
    for path in sorted(FIXTURES_DIR.glob("[0-9][0-9]-*.json"))[:10]:
        r = engine.classify(map_features(read_bundle_file(path), terminology))
        if r.facts["liver_recurrence"].state != "absent":
            results.append(r)
    with FhirClient(f"http://127.0.0.1:{free_port()}/fhir", retries=2, backoff=0.01) as dead:
        writer = AssessmentWriter(dead, StrategyChoice(UpdateAsCreate))
        written = writer.write_many(results)
        assert {w.action for w in written} == {"failed"}
        assert dead.round_trips <= 2 * (dead.retries + 1), dead.round_trips
