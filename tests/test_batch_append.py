"""Batch append (issue #21): import and sync store a batch with one encoding per event, one executemany, and
the batch folded per row before its upserts; the stored bytes, receipt order and tables stay what they were."""

import json

import clare
from conftest import projection_digest

STORED = "SELECT uuid, hlc, machine_id, event_type, payload, created_at, hash FROM events ORDER BY rseq"


def _story(db):
    svc = clare.Services(db)
    svc.create_project("alpha", goal="ünïcode ✓ and \"quotes\"")
    for i in range(12):
        t = svc.create_task("alpha", f"task {i} — {'x' * i}", priority=i % 3, tags=["b", "a"])
        svc.edit_task(t.id, status="in_progress", title=f"task {i}, again")
        svc.post_update(f"note {i}\nline two", task_ref=t.id)


def _events_one_by_one(path, events):
    """The stored rows as the pre-batch code made them: canonical_json and event_hash, one INSERT per event."""
    rows = []
    for ev in events:
        text = clare.canonical_json(ev.payload)
        rows.append((ev.uuid, ev.hlc, ev.machine_id, ev.event_type, text, ev.created_at, clare.event_hash(ev, text)))
    return rows


def test_import_stores_the_same_bytes_in_the_same_order(db, cli, tmp_path):
    _story(db)
    log = tmp_path / "log.jsonl"
    assert cli("export", str(log)).code == 0
    source = [tuple(r) for r in db.conn.execute(STORED)]
    assert source == _events_one_by_one(db.path, clare.iter_events(db))  # what each event was stored as
    other = clare.open_db(str(tmp_path / "other.db"), machine_id="otherhost")
    try:
        result, bad = clare.Services(other).import_events(log.read_text().splitlines())
        assert bad == [] and len(result.inserted) == len(source)
        assert [tuple(r) for r in other.conn.execute(STORED)] == source  # byte for byte, in the same order
        assert [e.rseq for e in result.inserted] == list(range(1, len(source) + 1))
        assert projection_digest(other) == projection_digest(db)
        again, _ = clare.Services(other).import_events(log.read_text().splitlines())
        assert (again.inserted, again.n_duplicates, again.conflicts) == ([], len(source), [])
    finally:
        other.close()


def test_a_batch_with_copies_and_conflicts_reports_each_as_before(db):
    svc = clare.Services(db)
    p = svc.create_project("alpha")
    here = clare.list_events(db, limit=1)[0]
    fresh = [json.loads(json.dumps(clare.Event(clare.new_uuid(), f"{1_800_000_000_000 + i:013d}.000000.peer", "peer",
                                               "task.created", {"task_id": f"t{i}", "project_id": p.id,
                                                                "title": f"t{i}", "description": "", "priority": 2,
                                                                "status": "todo"},
                                               clare.iso_ms(1_800_000_000_000 + i)).to_json())) for i in range(3)]
    changed = {**fresh[1], "payload": {**fresh[1]["payload"], "title": "another"}}  # same uuid, other content
    batch = [fresh[0], here.to_json(), fresh[1], fresh[0], changed, fresh[2]]
    with clare.write_txn(db) as cur:
        result = clare.receive_events(db, cur, [clare.check_received(e) for e in batch], now_ms=clare.now_ms())
    assert [e.uuid for e in result.inserted] == [fresh[0]["uuid"], fresh[1]["uuid"], fresh[2]["uuid"]]
    rseqs = [e.rseq for e in result.inserted]
    assert here.rseq < rseqs[0] < rseqs[1] < rseqs[2] == clare.head_rseq(db.conn)  # receipt order is batch order
    assert [r[0] for r in db.conn.execute("SELECT rseq FROM events WHERE rseq > ?", (here.rseq,))] == rseqs
    assert result.n_duplicates == 2 and result.conflicts == [fresh[1]["uuid"]]
    assert [t.title for t in clare.list_tasks(db)] == ["t0", "t1", "t2"]
    stored = db.conn.execute("SELECT payload FROM events WHERE uuid = ?", (fresh[1]["uuid"],)).fetchone()[0]
    assert stored == clare.canonical_json(fresh[1]["payload"])  # the first copy stays


def test_a_batch_applied_at_once_gives_the_tables_of_one_by_one(db, tmp_path):
    _story(db)
    events = list(clare.iter_events(db))
    one_by_one = clare.open_db(str(tmp_path / "one.db"), machine_id="one")
    at_once = clare.open_db(str(tmp_path / "all.db"), machine_id="all")
    try:
        for ev in events:
            with clare.write_txn(one_by_one) as cur:
                clare.receive_events(one_by_one, cur, [ev], now_ms=clare.now_ms())
        with clare.write_txn(at_once) as cur:
            clare.receive_events(at_once, cur, events, now_ms=clare.now_ms())
        assert projection_digest(at_once) == projection_digest(one_by_one) == projection_digest(db)
    finally:
        one_by_one.close()
        at_once.close()
