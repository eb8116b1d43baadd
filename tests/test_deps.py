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
        version = db.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert int(version) == clare.SCHEMA_VERSION >= 9
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
    assert "\nready: 1 (see them with: clare next --project alpha)\n" in run_clare("project", "show", "alpha").out
    assert run_clare("project", "show", "alpha", "--json").json()["ready"] == [schema]

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


# --- a cycle closed by two hosts apart, through real `clare serve` processes -------------------------

def test_two_hosts_apart_close_a_cycle_through_sync_and_its_tasks_are_never_ready(tmp_path, home):
    import os

    from test_sync import Clare

    env = {k: v for k, v in os.environ.items() if k not in ("CLARE_TOKEN", "CLARE_HOME", "CLARE_URL")}
    a, b = Clare(tmp_path, "ash", env), Clare(tmp_path, "birch", env)
    env["BIRCH_TOKEN"] = b.token
    try:
        b.serve("--no-sync")
        a.add_peer(b, token_env="BIRCH_TOKEN")
        assert a.cli("project", "new", "alpha").code == 0
        x = a.cli("task", "add", "alpha", "lexer", "--json").json()["id"]
        y = a.cli("task", "add", "alpha", "parser", "--json").json()["id"]
        assert a.cli("sync").code == 0
        # apart: each host adds one wait; neither closes a cycle on its own log
        assert a.cli("task", "edit", x[:8], "--after", y[:8]).code == 0
        assert b.cli("task", "edit", y[:8], "--after", x[:8]).code == 0
        assert a.cli("sync").code == 0
        for host in (a, b):
            assert host.cli("next", "--json").json() == [], host.name
            shown = host.cli("task", "show", x[:8])
            assert f"cycle:    {x[:8]} → {y[:8]} → {x[:8]}: never ready" in shown.out, host.name
            assert host.cli("task", "show", y[:8], "--json").json()["cycle"] == [y, x, y]
            first, then = sorted([x, y])
            project = host.cli("project", "show", "alpha")
            assert f"ready: 0\ncycle: {first[:8]} → {then[:8]} → {first[:8]}: never ready; drop one wait with: " \
                   f"clare task edit {first[:8]} --no-after {then[:8]}\n" in project.out, host.name
            assert host.cli("project", "show", "alpha", "--json").json()["cycles"] == [[first, then, first]]
        import urllib.request
        req = urllib.request.Request(f"{b.url}/projects/alpha", headers={"Authorization": f"Bearer {b.token}"})
        html = urllib.request.urlopen(req, timeout=10).read().decode()
        assert "never ready" in html and f"{x[:8]}" in html
        # a wait dropped on one host frees the other task everywhere once synced
        assert b.cli("task", "edit", y[:8], "--no-after", x[:8]).code == 0
        assert a.cli("sync").code == 0
        for host in (a, b):
            assert [t["id"] for t in host.cli("next", "--json").json()] == [y], host.name
    finally:
        b.stop()


# --- the API and the remote client: one declaration, the same answers --------------------------------

def test_waits_over_the_api_and_the_remote_client_answer_what_the_services_do(serve, db):
    server = serve()
    remote, local = clare.RemoteServices(server.url, token=server.token), clare.Services(db)
    remote.create_project("alpha")
    first = remote.create_task("alpha", "first")
    made = server.request("POST", "/api/v1/tasks", json_body={"project": "alpha", "title": "then",
                                                              "after": [first.id[:6]]})
    assert made.status == 201 and made.json()["after"] == [first.id]
    then = made.json()["id"]
    for name, args in (("ready_tasks", ()), ("ready_tasks", ("alpha",)), ("get_task_waits", (then,)),
                       ("get_task_waits", (first.id,)), ("get_queue", ("alpha",))):
        assert getattr(remote, name)(*args) == getattr(local, name)(*args), name
    waits = server.request("GET", f"/api/v1/tasks/{first.id[:8]}/waits").json()
    assert [t["id"] for t in waits["blocks"]] == [then] and waits["is_ready"] is True
    loop = server.request("PATCH", f"/api/v1/tasks/{first.id[:8]}", json_body={"after": [then]})
    assert loop.status == 409 and "would wait on itself" in loop.json()["error"]["message"]
    bad = server.request("PATCH", f"/api/v1/tasks/{then}", json_body={"no_after": "x"})
    assert bad.status == 422
    dropped = server.request("PATCH", f"/api/v1/tasks/{then}", json_body={"no_after": [first.id[:8]]})
    assert dropped.status == 200 and dropped.json()["after"] == []
    queue = server.request("GET", "/api/v1/projects/alpha/queue").json()
    assert [t["title"] for t in queue["ready"]] == ["first", "then"] and queue["cycles"] == []
    spec = server.request("GET", "/api/v1/openapi.json").json()
    assert {"/api/v1/ready", "/api/v1/projects/{project}/queue", "/api/v1/tasks/{task}/waits"} <= set(spec["paths"])
    assert "after" in spec["components"]["schemas"]["Task"]["properties"]


# --- what a peer may send: checked at the door; a self-wait is a cycle ----------------------------------

def _peer_event(n: int, event_type: str, payload: dict) -> dict:
    now = clare.now_ms()
    return {"uuid": f"d0000000-0000-4000-8000-{n:012d}", "hlc": f"{now:013d}.000000.peer", "machine_id": "peer",
            "event_type": event_type, "payload": payload, "created_at": clare.iso_ms(now)}


def test_a_malformed_wait_from_a_peer_is_refused_and_a_wait_on_itself_is_a_cycle():
    import pytest

    for bad in ("x", {"a b": True}, {"f" * 32: "yes"}, {f"{n:032x}": True for n in range(101)}):
        with pytest.raises(clare.ClareError, match="bad after"):
            clare.check_received(_peer_event(1, "task.updated", {"task_id": "a" * 32, "after": bad}))
    db = _db()
    clare.create_project(db, "alpha", now_ms=clare.now_ms())
    t = clare.create_task(db, "alpha", "selfish", now_ms=clare.now_ms())
    other = clare.create_task(db, "alpha", "waits on one not here yet", after=[t.id], now_ms=clare.now_ms())
    ev = clare.check_received(_peer_event(2, "task.updated", {"task_id": t.id, "after": {t.id: True,
                                                                                          "e" * 32: False}}))
    with clare.write_txn(db) as cur:
        clare.receive_events(db, cur, [ev], now_ms=clare.now_ms())
    assert clare.list_ready_tasks(db) == []
    waits = clare.get_task_waits(db, t.id[:8])
    assert waits.cycle == [t.id, t.id] and not waits.is_ready
    assert [x.id for x in waits.blocks] == [t.id, other.id]  # it blocks itself too
    later = clare.check_received(_peer_event(3, "task.updated", {"task_id": other.id, "after": {"c" * 32: True}}))
    with clare.write_txn(db) as cur:
        clare.receive_events(db, cur, [later], now_ms=clare.now_ms())
    assert clare.get_task_waits(db, other.id).unknown == ["c" * 32]  # its task has not arrived: it blocks
    clare.edit_task(db, other.id, no_after=["c" * 8, t.id[:8]], now_ms=clare.now_ms())
    assert [x.id for x in clare.list_ready_tasks(db)] == [other.id]


# --- waits merge per edge, like tags ---------------------------------------------------------------

def _sync(a, b, *, now_ms):
    for src, dst in ((a, b), (b, a)):
        with clare.write_txn(dst) as cur:
            clare.receive_events(dst, cur, list(clare.iter_events(src)), now_ms=now_ms)


def test_waits_added_apart_both_stay_and_the_newer_add_or_drop_of_one_wait_wins():
    a, b = _db("ash"), _db("birch")
    clare.create_project(a, "alpha", now_ms=T0)
    x, y, z = (clare.create_task(a, "alpha", n, now_ms=T0 + i) for i, n in enumerate("xyz", 1))
    _sync(a, b, now_ms=T0 + 5)
    clare.edit_task(a, z.id, after=[x.id], now_ms=T0 + 10)
    clare.edit_task(b, z.id, after=[y.id], now_ms=T0 + 11)
    _sync(a, b, now_ms=T0 + 12)
    for db in (a, b):
        assert clare.get_task(db, z.id).after == tuple(sorted([x.id, y.id]))
    clare.edit_task(a, z.id, no_after=[y.id], now_ms=T0 + 30)  # newer than b's re-add below
    clare.edit_task(b, z.id, after=[x.id], no_after=[x.id], now_ms=T0 + 20)  # --after wins: nothing changes
    assert x.id in clare.get_task(b, z.id).after
    clare.edit_task(b, z.id, no_after=[x.id], now_ms=T0 + 21)
    clare.edit_task(b, z.id, after=[x.id], now_ms=T0 + 22)
    _sync(a, b, now_ms=T0 + 40)
    for db in (a, b):
        assert clare.get_task(db, z.id).after == (x.id,)
        assert [t.id for t in clare.list_ready_tasks(db)] == [x.id, y.id]
    events = [e for e in clare.iter_events(a)]
    for order in (events, list(reversed(events))):
        c = _db("cedar")
        for ev in order:
            with clare.write_txn(c) as cur:
                clare.receive_events(c, cur, [ev], now_ms=T0 + 50)
        assert clare.get_task(c, z.id).after == (x.id,)
        assert [t.id for t in clare.list_ready_tasks(c)] == [x.id, y.id]
