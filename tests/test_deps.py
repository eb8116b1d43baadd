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


# --- the CLI, as a process ---------------------------------------------------------------------------

def _add(run_clare, *argv) -> str:
    r = run_clare("task", "add", *argv, "--json")
    assert r.code == 0, r.err
    return r.json()["id"]


def test_after_next_and_task_show_through_the_cli(run_clare):
    assert run_clare("project", "new", "alpha").code == 0
    schema = _add(run_clare, "alpha", "design schema", "--prio", "1")
    api = _add(run_clare, "alpha", "write api", "--after", schema[:4])
    r = run_clare("task", "add", "alpha", "ship", "--prio", "0", "--after", api[:6], "--after", schema[:6])
    assert r.code == 0 and r.out.endswith(f"(P0), waits on {', '.join(sorted([api[:8], schema[:8]]))}\n"), r.out
    ship = run_clare("task", "list", "--json").json()[0]
    assert list(ship)[-1] == "after" and ship["after"] == sorted([api, schema])  # a new key, last

    r = run_clare("next")
    assert r.code == 0 and r.out.splitlines()[1].split() == [schema[:8], "P1", "todo", "alpha", "design", "schema"]
    assert len(r.out.splitlines()) == 2
    assert [t["id"] for t in run_clare("next", "--project", "alpha", "--json").json()] == [schema]

    shown = run_clare("task", "show", api[:8])
    assert f"waits on: {schema[:8]} (todo) design schema\n" in shown.out
    assert f"blocks:   {ship['id'][:8]} (todo) ship\n" in shown.out and "ready:    no\n" in shown.out
    as_json = run_clare("task", "show", api[:8], "--json").json()
    assert [t["id"] for t in as_json["waits_on"]] == [schema] and as_json["cycle"] == []
    assert as_json["is_ready"] is False

    refused = run_clare("task", "edit", schema[:8], "--after", ship["id"][:8])
    chain = " → ".join(x[:8] for x in (schema, ship["id"], schema))  # the shortest: ship waits on schema too
    assert refused.code == 1 and refused.err == (
        f"clare: error: task {schema[:8]} would wait on itself: {chain}; drop one wait first with: "
        f"clare task edit {ship['id'][:8]} --no-after {schema[:8]}\n")
    itself = run_clare("task", "edit", schema[:8], "--after", schema[:8])
    assert itself.code == 2 and itself.err == (f"clare: error: task {schema[:8]} may not wait on itself; "
                                               "give another task to --after\n")
    unknown = run_clare("task", "add", "alpha", "x", "--after", "abcdef")
    assert unknown.code == 1 and unknown.err == "clare: error: no task 'abcdef'; list them with: clare task list\n"
    assert len(run_clare("task", "list", "--json").json()) == 3  # the refused add left nothing

    assert run_clare("task", "done", schema[:8]).code == 0
    assert [t["id"] for t in run_clare("next", "--json").json()] == [api]
    r = run_clare("task", "edit", ship["id"][:8], "--no-after", api[:5])
    assert r.code == 0 and r.out.endswith(f", waits on {schema[:8]}\n")
    assert [t["id"] for t in run_clare("next", "--json").json()] == [ship["id"], api]
    assert run_clare("task", "edit", ship["id"][:8], "--no-after", api[:8]).code == 0  # nothing to drop: fine
    assert "waits -" in run_clare("log").out
    r = run_clare("undo")  # the dropped wait comes back
    assert r.code == 0 and f"waits -{api[:8]}" in r.out
    assert [t["id"] for t in run_clare("next", "--json").json()] == [api]
    empty = run_clare("next", "--project", "alpha")
    assert empty.code == 0
    help_text = run_clare("next", "--help").out
    assert "clare next --project alpha --json" in help_text
    assert "--after ID" in run_clare("task", "add", "--help").out
    assert "--no-after ID" in run_clare("task", "edit", "--help").out
