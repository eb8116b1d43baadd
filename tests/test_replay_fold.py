"""Replay (issue #21): folded per row in memory, secondary indexes dropped and made again, event_refs kept;
the tables come out identical to the ones events applied one by one made."""

import pytest

import clare
from conftest import projection_digest


def _story(db, n_tasks=30):
    """Make a log as users and a fleet do: projects, tasks moved, tagged, assigned, noted on, removed."""
    svc = clare.Services(db)
    now = clare.now_ms()
    sid = "7c1e9b00-0000-4000-8000-000000000001"
    with clare.write_txn(db) as cur:
        clare.record(db, cur, "session.appeared", {"session_id": sid, "host": db.machine_id, "cwd": "/srv/app",
                                                   "state": "working"}, now_ms=now)
    for p in ("alpha", "beta"):
        svc.create_project(p, goal="ship it")
    for i in range(n_tasks):
        t = svc.create_task(("alpha", "beta")[i % 2], f"task {i}", priority=i % 4, tags=["x"] if i % 3 else [])
        svc.edit_task(t.id, status="in_progress", tags=["y"], untags=["x"])
        if i % 2:
            svc.assign_task(t.id, session_id=sid)
        svc.post_update(f"note {i}", task_ref=t.id)
        svc.edit_task(t.id, title=f"task {i}, second try", priority=(i + 1) % 4)
        if i % 5 == 0:
            svc.remove_task(t.id)
    svc.edit_project("beta", status="paused")


def _state(db):
    """Every projection table, sorted, and each rowid table's ids in rowid order; the indexes and their SQL."""
    rowid_order = {}
    for table in clare.PROJECTION_TABLES:
        if table != "event_refs":  # WITHOUT ROWID: its order is its key
            rowid_order[table] = [r[0] for r in db.conn.execute(f"SELECT id FROM {table} ORDER BY rowid")]
    indexes = sorted(tuple(r) for r in db.conn.execute(
        "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name"))
    return projection_digest(db), rowid_order, indexes


@pytest.mark.parametrize("max_folded", [clare.MAX_FOLDED_ROWS, 3])
def test_replay_leaves_every_projection_table_identical(db, monkeypatch, max_folded):
    monkeypatch.setattr(clare, "MAX_FOLDED_ROWS", max_folded)  # 3: the fold writes its rows many times over
    _story(db)
    before = _state(db)
    assert sum(len(rows) for rows in before[0].values()) > 100 and before[2]
    n_events = clare.count_events(db)
    assert clare.replay(db) == n_events
    assert _state(db) == before
    assert clare._replay(db, with_refs=True) == n_events  # as an upgrade runs it: the refs made anew, the same
    assert _state(db) == before


def test_a_folded_field_keeps_the_newest_version_whatever_the_order(db):
    """Two edits of one field arrive newest first: the fold, like the upsert, keeps the newer one."""
    svc = clare.Services(db)
    svc.create_project("alpha")
    t = svc.create_task("alpha", "first")
    newer = svc.edit_task(t.id, title="newer")
    older_hlc = clare.parse_hlc(clare.list_events(db, limit=1)[0].hlc)
    late = clare.Event(clare.new_uuid(), str(clare.Hlc(older_hlc.wall_ms - 1, 0, "elsewhere")), "elsewhere",
                       "task.updated", {"task_id": t.id, "title": "older"}, clare.iso_ms(older_hlc.wall_ms - 1))
    with clare.write_txn(db) as cur:  # stored after the newer one: receipt order is not time order
        clare.receive_events(db, cur, [late], now_ms=clare.now_ms())
    assert clare.get_task(db, t.id).title == newer.title == "newer"
    before = _state(db)
    clare.replay(db)
    assert clare.get_task(db, t.id).title == "newer" and _state(db) == before


def test_a_replay_keeps_the_history_refs_it_does_not_rebuild(db):
    _story(db, n_tasks=4)
    refs = db.conn.execute("SELECT count(*) FROM event_refs").fetchone()[0]
    assert refs > 0
    clare.replay(db)
    assert db.conn.execute("SELECT count(*) FROM event_refs").fetchone()[0] == refs
    task = clare.list_tasks(db)[0]
    assert clare.list_history(db, [task.id])  # the task's history page still has its events
