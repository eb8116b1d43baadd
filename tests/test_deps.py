"""Dependencies (#16 part A): --after, cycles refused here and named when sync closes one, readiness,
`clare next`, the ready queue on pages; driven as a user would (real SQLite files, processes, HTTP)."""

import clare

T0 = 1_750_000_000_000


def _db(name="ash"):
    return clare.open_db(":memory:", machine_id=name)


# --- the ready queue: what is ready, in which order ------------------------------------------------

def test_ready_tasks_wait_for_every_dependency_and_come_by_priority_then_age(db, server):
    svc = clare.Services(db)
    alpha = svc.create_project("alpha")
    schema = svc.create_task("alpha", "schema", priority=3)
    api = svc.create_task("alpha", "api", priority=1, after=[schema.id[:6]])
    docs = svc.create_task("alpha", "docs", priority=1)
    svc.create_task("alpha", "lint", priority=3)
    ship = svc.create_task("alpha", "ship", priority=0, after=[api.id, docs.id])
    assert api.after == (schema.id,) and ship.after == tuple(sorted([api.id, docs.id]))
    assert [t.title for t in svc.ready_tasks()] == ["docs", "schema", "lint"]  # P1, then the older P3 first
    svc.edit_task(schema.id, status="done")
    assert [t.title for t in svc.ready_tasks("alpha")] == ["api", "docs", "lint"]
    svc.edit_task(api.id, status="done")
    svc.edit_task(docs.id, status="in_progress")
    assert [t.title for t in svc.ready_tasks(alpha.id[:6])] == ["lint"]  # ship waits on docs still
    svc.edit_task(docs.id, status="done")
    assert [t.title for t in svc.ready_tasks()] == ["ship", "lint"]

    got = server.request("GET", "/api/v1/ready?project=alpha")
    assert got.status == 200 and [t["title"] for t in got.json()] == ["ship", "lint"]
    assert got.json()[0]["after"] == sorted([api.id, docs.id])
    assert "/api/v1/ready" in server.request("GET", "/api/v1/openapi.json").json()["paths"]
    missing = server.request("GET", "/api/v1/ready?project=nope")
    assert missing.status == 404 and "clare project list" in missing.json()["error"]["message"]


def test_a_task_is_not_ready_when_assigned_removed_of_a_paused_project_or_not_todo(db):
    svc = clare.Services(db)
    svc.create_project("alpha")
    svc.create_project("beta")
    t = {n: svc.create_task("alpha", n) for n in ("bound", "grouped", "gone", "doing", "free")}
    paused = svc.create_task("beta", "paused")
    sid = "5e551011-0000-4000-8000-000000000001"
    from conftest import observe
    observe(db, [sid], now_ms=clare.now_ms())
    svc.assign_task(t["bound"].id, session_id=sid)
    svc.create_group("webs", cwd="/srv/web")
    svc.assign_task(t["grouped"].id, group_ref="webs")
    svc.remove_task(t["gone"].id)
    svc.edit_task(t["doing"].id, status="in_progress")
    svc.edit_project("beta", status="paused")
    assert [x.title for x in svc.ready_tasks()] == ["free"]
    svc.remove_group("webs")  # a binding to a removed group is no binding
    svc.edit_project("beta", status="active")
    assert [x.title for x in svc.ready_tasks()] == ["grouped", "free", "paused"]
    assert paused.id in {x.id for x in svc.ready_tasks("beta")}


def test_a_removed_dependency_no_longer_blocks_and_blocks_again_once_restored():
    db = _db()
    clare.create_project(db, "alpha", now_ms=T0)
    first = clare.create_task(db, "alpha", "first", now_ms=T0 + 1)
    then = clare.create_task(db, "alpha", "then", after=[first.id], now_ms=T0 + 2)
    assert [t.id for t in clare.list_ready_tasks(db)] == [first.id]
    clare.remove_task(db, first.id, now_ms=T0 + 3)
    assert [t.id for t in clare.list_ready_tasks(db)] == [then.id]
    clare.restore_task(db, first.id, now_ms=T0 + 4)
    assert [t.id for t in clare.list_ready_tasks(db)] == [first.id]


# --- the upgrade: schema 9 from the release database ----------------------------------------------

def test_the_release_database_upgrades_to_waits_and_applies_waits_an_older_clare_kept(tmp_path):
    import shutil

    from conftest import ROOT

    path = tmp_path / "clare.db"
    shutil.copyfile(ROOT / "tests" / "data" / "release-0.1.0.db", path)
    db = clare.open_db(str(path))
    try:
        assert db.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "9"
        tasks = {t.title: t for t in clare.list_tasks(db)}
        assert all(t.after == () for t in tasks.values())
        todo = next(t for t in tasks.values() if t.status == "todo")
        doing = next(t for t in tasks.values() if t.status == "in_progress")
        assert clare.list_ready_tasks(db) == []  # its project, beta, is paused
        clare.edit_project(db, "beta", status="active", now_ms=clare.now_ms())
        assert [t.id for t in clare.list_ready_tasks(db)] == [todo.id]
        clare.edit_task(db, todo.id, after=[doing.id], now_ms=clare.now_ms())
        assert clare.list_ready_tasks(db) == [] and clare.get_task(db, todo.id).after == (doing.id,)
        before = {t: db.conn.execute(f"SELECT * FROM {t}").fetchall() for t in ("tasks", "task_after")}
        clare.replay(db)
        assert {t: db.conn.execute(f"SELECT * FROM {t}").fetchall() for t in ("tasks", "task_after")} == before
    finally:
        db.close()
