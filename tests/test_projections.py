"""Projections: applying events one by one, in any order, gives exactly the tables replay gives."""

import random

from hypothesis import HealthCheck, given, settings, strategies as st

import clare
from conftest import observe, projection_digest

HOSTS = ("ash", "birch", "cedar")
T0 = 1_750_000_000_000

OP = st.tuples(
    st.sampled_from(["project", "project_set", "task", "task_edit", "task_status", "assign", "assign_group",
                     "unassign", "group", "group_rm", "update", "sync", "sessions", "tag", "task_rm",
                     "task_restore", "undo", "after"]),
    st.integers(0, len(HOSTS) - 1),  # which host acts
    st.integers(0, 10**6),  # which entity / which value
    st.integers(-2_000, 5_000),  # how the acting host's wall clock moves
)


def _apply_op(dbs, clocks, op):
    """Run one random service call on one host; errors a user could meet are part of the game."""
    kind, h, pick, step = op
    db = dbs[h]
    clocks[h] = max(0, clocks[h] + step)
    now = T0 + clocks[h]
    projects, tasks, groups = clare.list_projects(db), clare.list_tasks(db, include_removed=True), clare.list_groups(db)
    sessions = clare.list_sessions(db, include_gone=True)
    try:
        if kind == "project":
            clare.create_project(db, f"p{pick % 7}", goal=f"g{pick}", now_ms=now)
        elif kind == "project_set" and projects:
            p = projects[pick % len(projects)]
            clare.edit_project(db, p.id, goal=f"goal {pick}",
                               status=clare.PROJECT_STATUSES[pick % 3], now_ms=now)
        elif kind == "task" and projects:
            clare.create_task(db, projects[pick % len(projects)].id, f"t{pick}", priority=pick % 5,
                              tags=[f"t{pick % 4}"] if pick % 3 == 0 else [], now_ms=now)
        elif kind == "task_edit" and tasks:
            clare.edit_task(db, tasks[pick % len(tasks)].id, title=f"title {pick}", priority=pick % 5, now_ms=now)
        elif kind == "task_status" and tasks:
            clare.edit_task(db, tasks[pick % len(tasks)].id, status=clare.TASK_STATUSES[pick % 4], now_ms=now)
        elif kind == "assign" and tasks and sessions:
            clare.assign_task(db, tasks[pick % len(tasks)].id, session_id=sessions[pick % len(sessions)].id,
                              now_ms=now)
        elif kind == "assign_group" and tasks and groups:
            clare.assign_task(db, tasks[pick % len(tasks)].id, group_ref=groups[pick % len(groups)].id, now_ms=now)
        elif kind == "sessions":  # this host now runs a random subset of six known sessions
            ids = [f"{h:x}{n:07x}-0000-4000-8000-000000000000" for n in range(6) if pick >> n & 1]
            observe(db, ids, now_ms=now, state=clare.SESSION_STATES[pick % len(clare.SESSION_STATES)])
        elif kind == "unassign" and tasks:
            clare.unassign_task(db, tasks[pick % len(tasks)].id, now_ms=now)
        elif kind == "group":
            clare.create_group(db, f"g{pick % 5}", cwd=f"/srv/{pick}", now_ms=now)
        elif kind == "group_rm" and groups:
            clare.remove_group(db, groups[pick % len(groups)].id, now_ms=now)
        elif kind == "update" and tasks:
            clare.post_update(db, f"note {pick}", task_ref=tasks[pick % len(tasks)].id, now_ms=now)
        elif kind == "tag" and tasks:  # a few tags from a small pool, some added and some removed
            tags = [f"t{n}" for n in range(4) if pick >> n & 1]
            untags = [f"t{n}" for n in range(4) if pick >> (n + 4) & 1 and f"t{n}" not in tags]
            clare.edit_task(db, tasks[pick % len(tasks)].id, tags=tags, untags=untags, now_ms=now)
        elif kind == "task_rm" and tasks:
            clare.remove_task(db, tasks[pick % len(tasks)].id, now_ms=now)
        elif kind == "task_restore" and tasks:
            clare.restore_task(db, tasks[pick % len(tasks)].id, now_ms=now)
        elif kind == "after" and len(tasks) > 1:  # waits added and dropped; local cycles are refused
            task = tasks[pick % len(tasks)]
            after = [x.id for n, x in enumerate(tasks) if pick >> (n % 12) & 1 and x.id != task.id][:3]
            no_after = [x for n, x in enumerate(task.after) if pick >> (n + 12) & 1 and x not in after]
            clare.edit_task(db, task.id, after=after, no_after=no_after, now_ms=now)
        elif kind == "undo":
            clare.undo_change(db, now_ms=now)
        elif kind == "sync":  # one host copies everything another has: partial, one-way
            src = dbs[pick % len(dbs)]
            with clare.write_txn(db) as cur:
                clare.receive_events(db, cur, list(clare.iter_events(src)), now_ms=now)
    except (clare.Conflict, clare.NotFound):  # a wait that would close a cycle, on a removed task ...
        pass


def _fresh(name="x"):
    return clare.open_db(":memory:", machine_id=name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OP, min_size=1, max_size=60), data=st.data())
def test_any_arrival_order_gives_the_tables_of_a_replay(ops, data):
    dbs = [_fresh(h) for h in HOSTS]
    clocks = [0, 0, 0]
    for op in ops:
        _apply_op(dbs, clocks, op)
    events = {ev.uuid: ev for db in dbs for ev in clare.iter_events(db)}
    order = data.draw(st.permutations(sorted(events)))

    incremental = _fresh()
    for uuid in order:  # one event per transaction, as sync may deliver them
        with clare.write_txn(incremental) as cur:
            clare.receive_events(incremental, cur, [events[uuid]], now_ms=T0)
    batch = _fresh()
    with clare.write_txn(batch) as cur:
        clare.receive_events(batch, cur, [events[u] for u in reversed(order)], now_ms=T0)
    expected = projection_digest(incremental)
    ready = [t.id for t in clare.list_ready_tasks(incremental)]  # readiness reads the tables: the same too
    assert projection_digest(batch) == expected
    assert [t.id for t in clare.list_ready_tasks(batch)] == ready
    clare.replay(incremental)
    assert projection_digest(incremental) == expected
    assert [t.id for t in clare.list_ready_tasks(incremental)] == ready


def test_a_late_old_title_edit_does_not_overwrite_a_newer_one():
    a, b = _fresh("ash"), _fresh("birch")
    p = clare.create_project(a, "alpha", now_ms=T0)
    t = clare.create_task(a, p.id, "first", now_ms=T0 + 1)
    with clare.write_txn(b) as cur:
        clare.receive_events(b, cur, list(clare.iter_events(a)), now_ms=T0 + 2)
    clare.edit_task(a, t.id, title="old edit", now_ms=T0 + 10)
    clare.edit_task(b, t.id, title="new edit", now_ms=T0 + 20)
    clare.edit_task(a, t.id, status="done", now_ms=T0 + 5)  # a's clock stays ahead of its own events
    for src, dst in ((a, b), (b, a)):
        with clare.write_txn(dst) as cur:
            clare.receive_events(dst, cur, list(clare.iter_events(src)), now_ms=T0 + 30)
    for db in (a, b):
        task = clare.get_task(db, t.id)
        assert (task.title, task.status) == ("new edit", "done")


def test_an_update_that_arrives_before_its_create_stays_hidden_until_the_create_arrives():
    a, b = _fresh("ash"), _fresh("birch")
    p = clare.create_project(a, "alpha", now_ms=T0)
    t = clare.create_task(a, p.id, "first", now_ms=T0 + 1)
    clare.edit_task(a, t.id, status="blocked", now_ms=T0 + 2)
    created, updated = [ev for ev in clare.iter_events(a) if ev.event_type.startswith("task.")]
    with clare.write_txn(b) as cur:
        clare.receive_events(b, cur, [updated], now_ms=T0 + 3)
    assert clare.list_tasks(b) == []
    with clare.write_txn(b) as cur:
        clare.receive_events(b, cur, [created], now_ms=T0 + 3)
    assert clare.get_task(b, t.id).status == "blocked"


def test_a_removed_group_stays_removed_whatever_the_order():
    a = _fresh("ash")
    g = clare.create_group(a, "backend", cwd="/srv/api", now_ms=T0)
    clare.remove_group(a, g.id, now_ms=T0 + 1)
    events = list(clare.iter_events(a))
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(events)
        b = _fresh("birch")
        for ev in events:
            with clare.write_txn(b) as cur:
                clare.receive_events(b, cur, [ev], now_ms=T0 + 2)
        assert clare.list_groups(b) == []


def _sync_both(a, b, *, now_ms):
    for src, dst in ((a, b), (b, a)):
        with clare.write_txn(dst) as cur:
            clare.receive_events(dst, cur, list(clare.iter_events(src)), now_ms=now_ms)


def test_a_task_assigned_to_a_group_removed_meanwhile_counts_as_unassigned_and_broadcast_works():
    a, b = _fresh("ash"), _fresh("birch")
    sid = "5e551011-0000-4000-8000-000000000001"
    observe(a, [sid], now_ms=T0)
    p = clare.create_project(a, "alpha", now_ms=T0)
    direct = clare.create_task(a, p.id, "direct", now_ms=T0 + 1)
    grouped = clare.create_task(a, p.id, "grouped", now_ms=T0 + 2)
    clare.assign_task(a, direct.id, session_id=sid, now_ms=T0 + 3)
    g = clare.create_group(a, "webs", cwd="/srv/web", now_ms=T0 + 4)
    _sync_both(a, b, now_ms=T0 + 5)
    clare.remove_group(a, g.id, now_ms=T0 + 10)
    clare.assign_task(b, grouped.id, group_ref=g.id, now_ms=T0 + 20)  # newer than the removal
    _sync_both(a, b, now_ms=T0 + 30)
    for db in (a, b):
        assert clare.get_task(db, grouped.id).group_id is None
        assert clare.list_tasks(db, group_id=g.id) == []
        assert [t.id for t in clare.list_assigned_tasks(db)] == [direct.id]
        assert [s.id for s in clare.list_broadcast_recipients(db, "alpha")] == [sid]
        assert clare.get_status(db, project_ref="alpha").projects[0].n_sessions == 1
