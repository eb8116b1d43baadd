"""The event store: append-only, validated, idempotent, safe under concurrent writers."""

import json
import sqlite3
import subprocess
import sys

import pytest

import clare
from conftest import CLARE_PY


def _event(**over):
    ev = {"uuid": "0f8fad5b-d9cb-469f-a165-70867728950e", "hlc": "1700000000000.000000.beta",
          "machine_id": "beta", "event_type": "task.updated", "payload": {"task_id": "ab"},
          "created_at": "2023-11-14T22:13:20.000Z"}
    return {**ev, **over}


def test_events_can_be_neither_updated_nor_deleted(db):
    with clare.write_txn(db) as cur:
        clare.make_event(db, cur, "test.made", {"x": 1}, now_ms=1)
    for sql in ("UPDATE events SET payload = '{}'", "DELETE FROM events"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.conn.execute(sql)
    assert clare.count_events(db) == 1


@pytest.mark.parametrize("change, reason", [
    ({"uuid": "nope"}, "not a lowercase uuid"),
    ({"hlc": "17.0.beta"}, "bad HLC"),
    ({"machine_id": "gamma"}, "does not end with its machine_id"),
    ({"event_type": "Task"}, "noun.verb"),
    ({"payload": [1]}, "payload must be a JSON object"),
    ({"payload": {"t": "x" * 70_000}}, "over 65536 bytes"),
    ({"created_at": 5}, "created_at must be a string"),
])
def test_malformed_events_are_refused_with_a_reason(change, reason):
    with pytest.raises(clare.ClareError, match=reason):
        clare.check_event(_event(**change))


def test_an_event_without_fields_names_what_is_missing():
    with pytest.raises(clare.ClareError, match="lacks hlc, payload"):
        clare.check_event({k: v for k, v in _event().items() if k not in ("hlc", "payload")})


def test_receiving_is_idempotent_and_reports_same_uuid_conflicts(db):
    ev = clare.check_event(_event())
    with clare.write_txn(db) as cur:
        first = clare.receive_events(db, cur, [ev], now_ms=1_700_000_000_000)
        again = clare.receive_events(db, cur, [ev], now_ms=1_700_000_000_000)
        other = clare.receive_events(db, cur, [clare.check_event(_event(payload={"task_id": "cd"}))],
                                     now_ms=1_700_000_000_000)
    assert (len(first.inserted), len(again.inserted), again.n_duplicates) == (1, 0, 1)
    assert other.conflicts == [ev.uuid]
    assert clare.get_events_by_uuid(db, [ev.uuid])[0].payload == {"task_id": "ab"}


def test_unknown_event_types_are_stored_and_ignored_by_projections(db):
    with clare.write_txn(db) as cur:
        clare.receive_events(db, cur, [clare.check_event(_event(event_type="widget.frobbed"))], now_ms=1)
    assert clare.count_events(db) == 1
    assert clare.describe_event(clare.list_events(db)[0]) == "widget.frobbed (not known to this version)"


def test_a_newer_schema_is_refused_with_a_clear_message(home, run_clare):
    path = home / "clare.db"
    clare.open_db(str(path)).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    r = run_clare("task", "list")
    assert r.code == 1
    assert r.err.strip().startswith("clare: error: this database has schema version 99")
    assert "upgrade clare.py" in r.err and "Traceback" not in r.err


def test_database_is_in_wal_mode_with_a_busy_timeout(db):
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == clare.BUSY_TIMEOUT_MS


WRITER = """
import sys, clare
db = clare.open_db(sys.argv[1])
for i in range(int(sys.argv[2])):
    clare.create_task(db, "alpha", f"task {sys.argv[3]}-{i}", now_ms=clare.now_ms())
"""


def test_two_processes_writing_at_once_never_see_a_locked_database(db, tmp_path):
    clare.create_project(db, "alpha", now_ms=clare.now_ms())
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {"PYTHONPATH": str(CLARE_PY.parent)}
    procs = [subprocess.Popen([sys.executable, str(script), db.path, "150", tag], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in "ab"]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert not any("locked" in err for _, err in results)
    assert len(clare.list_tasks(db)) == 300
    hlcs = [r[0] for r in db.conn.execute("SELECT hlc FROM events")]
    assert len(set(hlcs)) == len(hlcs), "two writers issued the same HLC"


def test_export_then_import_into_a_fresh_home_gives_the_same_state(cli, home, tmp_path, monkeypatch):
    cli("project", "new", "alpha")
    cli("task", "add", "alpha", "one", "--prio", "1")
    out = tmp_path / "log.jsonl"
    assert cli("export", out).code == 0
    assert all(json.loads(line)["uuid"] for line in out.read_text().splitlines())
    monkeypatch.setenv("CLARE_HOME", str(tmp_path / "other"))
    first = cli("import", out)
    second = cli("import", out)
    assert first.code == 0 and "imported 2 events" in first.out
    assert second.code == 0 and "imported 0 events (2 already here" in second.out
    assert [t["title"] for t in cli("task", "list", "--json").json()] == ["one"]


def test_import_keeps_good_lines_and_names_the_bad_ones(cli, tmp_path):
    cli("project", "new", "alpha")
    good = cli("export").out.splitlines()
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(["{not json", good[0], json.dumps({"uuid": "x"})]) + "\n")
    cli("--home", tmp_path / "fresh", "init")
    r = cli("--home", tmp_path / "fresh", "import", f)
    assert r.code == 1
    assert "line 1:" in r.err and "line 3: event lacks" in r.err
    assert "imported 1 events" in r.out


@pytest.mark.parametrize("payload, reason", [
    ({"title": "x"}, "task.created payload lacks task_id"),
    ({"task_id": "ab", "project_id": "cd", "title": "x", "description": "", "priority": "9", "status": "todo"},
     "bad priority"),
    ({"task_id": "ab", "project_id": "cd", "title": "x", "description": "", "priority": 1, "status": 7},
     "bad status"),
    ({"task_id": ["ab"], "project_id": "cd", "title": "x", "description": "", "priority": 1, "status": "todo"},
     "bad task_id"),
])
def test_a_known_event_type_with_a_malformed_payload_is_refused(payload, reason):
    with pytest.raises(clare.ClareError, match=reason):
        clare.check_received(_event(event_type="task.created", payload=payload))


@pytest.mark.parametrize("binding", [{}, {"session_id": None, "group_id": None},
                                     {"session_id": "5e55", "group_id": "96a1"}], ids=["neither", "nulls", "both"])
def test_an_assignment_naming_neither_or_both_a_session_and_a_group_is_stored_and_ignored(cli, tmp_path, binding):
    import uuid
    cli("project", "new", "alpha")
    task = cli("--json", "task", "add", "alpha", "one").json()["id"]
    bad = _event(uuid=str(uuid.uuid4()), hlc="9999999999999.000000.beta", event_type="task.assigned",
                 payload={"task_id": task, **binding})
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(bad) + "\n")
    r = cli("import", f)  # a newer Clare may bind tasks to something else: it passes the door, stays unapplied
    assert r.code == 0 and "imported 1 events" in r.out, r.err
    assert clare.not_understood(clare.check_received(bad)).endswith("it must name exactly one of session_id and "
                                                                  "group_id")
    [t] = cli("--json", "task", "list").json()
    assert (t["session_id"], t["group_id"]) == (None, None)
