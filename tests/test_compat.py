"""Compatibility: the release database opens, migrates and replays; events from a newer Clare are
stored and relayed by this one, and left out of its projections (through real `clare serve` processes)."""

import json
import shutil

import pytest

import clare
from conftest import ROOT, projection_digest
from test_sync import Clare

DATA = ROOT / "tests" / "data"


def _event_set(events) -> set[tuple]:
    return {(e["uuid"], e["hlc"], e["machine_id"], e["event_type"], clare.canonical_json(e["payload"]),
             e["created_at"]) for e in events}


def _release_lines() -> list[dict]:
    return [json.loads(line) for line in (DATA / "release-0.1.0.jsonl").read_text().splitlines()]


# --- the release database: every later upgrade test starts from it ---------------------------------

def test_the_release_database_opens_migrates_and_replays_to_the_same_state(tmp_path):
    path = tmp_path / "clare.db"
    shutil.copyfile(DATA / "release-0.1.0.db", path)
    db = clare.open_db(str(path))  # migrates it to this version's schema
    try:
        assert db.machine_id == "release-0-1-0"
        stored = _event_set(e.to_json() for e in clare.iter_events(db))
        assert stored == _event_set(_release_lines())
        before = projection_digest(db)
        assert clare.replay(db) == len(stored) == 21
        assert projection_digest(db) == before  # the tables 0.1.0 wrote are the ones this version derives
        assert {p.name for p in clare.list_projects(db)} == {"alpha", "beta"}
        assert sorted(t.status for t in clare.list_tasks(db)) == ["done", "in_progress", "todo"]
    finally:
        db.close()


def test_the_release_log_imports_into_a_new_database_with_the_same_tables(tmp_path, run_clare):
    ran = run_clare("--home", tmp_path / "fresh", "import", DATA / "release-0.1.0.jsonl")
    assert ran.code == 0, ran.err
    shutil.copyfile(DATA / "release-0.1.0.db", tmp_path / "copy.db")
    fresh, copy = clare.open_db(str(tmp_path / "fresh" / "clare.db")), clare.open_db(str(tmp_path / "copy.db"))
    try:
        assert projection_digest(fresh) == projection_digest(copy)
    finally:
        fresh.close()
        copy.close()


# --- events from a newer Clare ---------------------------------------------------------------------

TASK_ID = "6a792d71b1e040a5a73823c2a039cb2e"  # "write the parser" in the release log, in progress
PROJECT_ID = "9788d74f72974a4da6c862b42c10c759"  # alpha
SESSION_ID = "f764e834-e6e9-4521-80e4-37089ed05fa8"


def _future(n: int, event_type: str, payload: dict) -> dict:
    """An event stamped by a newer Clare on host 'tomorrow', after everything in the release log."""
    # Just after the release log's last event, not years ahead: a peer holds back (defers) an event
    # stamped beyond its now + MAX_OFFSET (#19), and this test is about unknown types, not clocks.
    return {"uuid": f"f0000000-0000-4000-8000-{n:012d}", "hlc": f"{1_796_281_600_000 + n:013d}.000000.tomorrow",
            "machine_id": "tomorrow", "event_type": event_type, "payload": payload,
            "created_at": "2026-12-03T06:26:40.000Z"}


FUTURE = [
    _future(1, "approval.requested", {"task_id": TASK_ID, "question": "ship it?"}),  # a new type
    _future(2, "task.updated", {"task_id": TASK_ID, "status": "in_review"}),  # a new value of a known field
    _future(3, "session.changed", {"session_id": SESSION_ID, "host": "release-0-1-0", "state": "compacting"}),
    _future(4, "task.created", {"task_id": "f" * 32, "project_id": PROJECT_ID, "title": "urgent",
                                "description": "", "priority": 7, "status": "todo"}),
    _future(5, "update.posted", {"update_id": "e" * 32, "task_id": TASK_ID, "session_id": None,
                                 "source": "voice", "text": "said aloud"}),
    _future(6, "task.assigned", {"task_id": TASK_ID, "agent_id": "a1"}),  # a new kind of assignee
]
NEW_FIELD = _future(7, "task.updated", {"task_id": TASK_ID, "title": "write the parser v2", "estimate_h": 3})


@pytest.mark.parametrize("event", FUTURE, ids=[e["event_type"] + "-" + e["uuid"][-1] for e in FUTURE])
def test_an_event_of_a_newer_clare_passes_the_door_and_is_left_out_of_the_projections(event, tmp_path):
    shutil.copyfile(DATA / "release-0.1.0.db", tmp_path / "clare.db")
    db = clare.open_db(str(tmp_path / "clare.db"))
    try:
        before = projection_digest(db)
        ev = clare.check_received(event)  # the door: form only
        assert clare.not_understood(ev)
        with clare.write_txn(db) as cur:
            assert len(clare.receive_events(db, cur, [ev], now_ms=clare.now_ms()).inserted) == 1
        after = projection_digest(db)
        assert {t: rows for t, rows in after.items() if t != "event_refs"} == \
               {t: rows for t, rows in before.items() if t != "event_refs"}
        clare.replay(db)
        assert projection_digest(db) == after
    finally:
        db.close()


def test_a_new_field_of_a_known_event_is_stored_whole_and_its_known_fields_applied(tmp_path):
    shutil.copyfile(DATA / "release-0.1.0.db", tmp_path / "clare.db")
    db = clare.open_db(str(tmp_path / "clare.db"))
    try:
        with clare.write_txn(db) as cur:
            clare.receive_events(db, cur, [clare.check_received(NEW_FIELD)], now_ms=clare.now_ms())
        assert clare.get_task(db, TASK_ID).title == "write the parser v2"
        [stored] = [e for e in clare.iter_events(db) if e.uuid == NEW_FIELD["uuid"]]
        assert stored.payload["estimate_h"] == 3
    finally:
        db.close()


@pytest.fixture
def hosts(tmp_path, home):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("CLARE_TOKEN", "CLARE_HOME", "CLARE_URL")}
    made: list[Clare] = []

    def make(name: str) -> Clare:
        made.append(Clare(tmp_path, name, env))
        env[f"{name.upper()}_TOKEN"] = made[-1].token
        return made[-1]
    yield make
    for host in made:
        host.stop()


def test_events_of_a_newer_clare_are_stored_and_relayed_through_a_real_server(hosts, tmp_path):
    a, b, c = hosts("a"), hosts("b"), hosts("c")
    lines = tmp_path / "future.jsonl"
    lines.write_text("".join(json.dumps(e) + "\n" for e in [*_release_lines(), *FUTURE, NEW_FIELD]))
    ran = a.cli("import", str(lines))
    assert ran.code == 0 and f"imported {21 + len(FUTURE) + 1} events" in ran.out, ran.err
    b.serve("--no-sync")
    a.add_peer(b, token_env="B_TOKEN")
    c.add_peer(b, token_env="B_TOKEN")
    for host in (a, c):  # a pushes to the server b, which relays to c
        ran = host.cli("sync")
        assert ran.code == 0 and "rejected" not in ran.out + ran.err, ran.out + ran.err
    exported = [json.loads(x) for x in c.cli("export").out.splitlines()]
    assert _event_set(exported) == _event_set([*_release_lines(), *FUTURE, NEW_FIELD])

    for host in (a, c):  # the projections know the old values and the new field's known part
        task = host.cli("--json", "task", "show", TASK_ID[:8])
        assert task.code == 0, task.err
        t = task.json()
        assert (t["title"], t["status"], t["session_id"]) == ("write the parser v2", "in_progress", SESSION_ID)
        tasks = host.cli("--json", "task", "list").json()
        assert "f" * 32 not in {x["id"] for x in tasks}
        assert "said aloud" not in [u["text"] for u in t["updates"]]  # the history lists it: it is stored
    for path in ("/", "/projects", f"/tasks/{TASK_ID}", "/sessions", "/api/v1/status"):
        import urllib.request

        req = urllib.request.Request(b.url + path, headers={"Authorization": f"Bearer {b.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, path
