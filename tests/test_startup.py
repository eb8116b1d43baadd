"""CLI start-up work (issue #20): each change keeps what Clare prints; structure only, never a timing."""

import subprocess
import sys
from pathlib import Path

import pytest

import clare

ROOT = Path(__file__).resolve().parent.parent


# The record helper: behaves as the frozen slotted dataclasses it replaced.

@clare.record_type(frozen=True, slots=True)
class Point:
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


@clare.record_type(frozen=True, slots=True, order=True)
class Version:
    major: int
    minor: int


@clare.record_type(slots=True)
class Tally:
    name: str
    seen: list[str] = clare.record_field(default_factory=list)


def test_a_record_has_the_fields_slots_repr_equality_and_hash_of_a_frozen_dataclass():
    p = Point(1, tags=("a",))
    assert Point.__slots__ == ("x", "y", "tags") and not hasattr(p, "__dict__")
    assert repr(p) == "Point(x=1, y=0, tags=('a',))"
    assert p == Point(x=1, y=0, tags=("a",)) and p != Point(2) and p != (1, 0, ("a",))
    assert hash(p) == hash(Point(1, 0, ("a",))) and len({p, Point(1, 0, ("a",))}) == 1
    with pytest.raises(AttributeError, match="cannot assign to field 'x'"):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, z=2)  # type: ignore[call-arg]
    assert Point.__match_args__ == ("x", "y", "tags")


def test_ordered_records_sort_like_their_tuples_and_mutable_ones_are_unhashable():
    assert sorted([Version(2, 0), Version(1, 9), Version(1, 10)]) == [Version(1, 9), Version(1, 10), Version(2, 0)]
    assert Version(1, 2) <= Version(1, 2) < Version(1, 3) and Version(2, 0) > Version(1, 99) >= Version(1, 99)
    a, b = Tally("a"), Tally("b")
    a.seen.append("x")
    assert b.seen == [] and a.seen == ["x"]  # a new list per record
    a.name = "c"
    assert a == Tally("c", ["x"])
    with pytest.raises(TypeError):
        hash(a)


def test_replace_and_fields_work_as_the_dataclasses_ones_did():
    p = Point(1, 2)
    assert clare.record_replace(p, y=5) == Point(1, 5) and p == Point(1, 2)
    with pytest.raises(TypeError):
        clare.record_replace(p, z=1)
    assert [(f.name, f.type) for f in clare.record_fields(Point)] == [("x", int), ("y", int), ("tags", tuple[str, ...])]
    assert clare.record_fields(p) == clare.record_fields(Point)
    # what Clare builds from them: the OpenAPI schemas and the JSON round trip of a change
    task_schema = clare.json_schema(clare.Task)
    assert task_schema["required"][:3] == ["id", "project_id", "project"]
    assert task_schema["properties"]["tags"] == {"type": "array"}


def test_import_clare_loads_neither_dataclasses_nor_inspect():
    code = "import sys, clare; print([m for m in ('dataclasses', 'inspect', 'ast', 'dis') if m in sys.modules])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_the_type_checker_still_sees_every_field_of_a_record(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import clare\np = clare.Paths(db='a', config=1)\np.db = 'x'\nclare.Hlc(1, 2)\n")
    p = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent", str(probe)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert 'incompatible type "int"; expected "str"' in p.stdout, p.stdout
    assert '"db" defined in "Paths" is read-only' in p.stdout, p.stdout
    assert 'Missing positional argument "machine_id"' in p.stdout, p.stdout


# `task list --json` written by SQLite prints what the Task objects printed: keys, order, values.

def populate(db) -> None:
    """A database with every kind of task the list shows: tags, sessions, live and removed groups, removals."""
    from conftest import observe

    svc = clare.Services(db)
    svc.create_project("alpha", goal="ship")
    svc.create_project("beta")
    svc.create_project("gamma")
    now = clare.now_ms()
    observe(db, ["5e55a1a1-0000-4000-8000-000000000001", "5e55a1a1-0000-4000-8000-000000000002"], now_ms=now)
    svc.create_group("web", cwd="/srv/app")
    svc.create_group("gone", cwd="/srv/old")
    titles = ["write the parser", "ünïcödé — 日本語 ✓", 'quotes " and \\ backslash', "tab\there\nnewline",
              "\x1b[31mred\x1b[0m escape", "emoji 🎉 and \u2028 separator", ""]
    made = []
    for i in range(40):
        t = svc.create_task(("alpha", "beta", "gamma")[i % 3], titles[i % len(titles)] or f"task {i}",
                            priority=i % 5, description="d" * (i % 4) + ("ß" if i % 2 else ""),
                            tags=[("backend", "p1", "ux:review", "a.b+c-d")[j] for j in range(i % 5)])
        made.append(t)
    for i, t in enumerate(made):
        if i % 4 == 1:  # waits on one or two earlier tasks (task list --json prints them as `after`)
            svc.edit_task(t.id, after=[made[i - 1].id, made[0].id][: 1 + i % 2])
    for i, t in enumerate(made):
        if i % 7 == 0:
            svc.assign_task(t.id, session_id="5e55a1a1-0000-4000-8000-000000000001")
        elif i % 7 == 1:
            svc.assign_task(t.id, group_ref="web")
        elif i % 7 == 2:
            svc.assign_task(t.id, group_ref="gone")
        if i % 6 == 3:
            svc.edit_task(t.id, status=("in_progress", "blocked", "done")[i % 3])
        if i % 11 == 5:
            svc.remove_task(t.id)
    svc.remove_group("gone")  # its tasks show no group: a removed group binds nothing
    svc.edit_project("gamma", status="paused")


FILTERS = ([], ["--all"], ["alpha"], ["--project", "beta"], ["--status", "done"], ["--status", "todo"],
           ["--assigned"], ["--unassigned"], ["--group", "web"], ["--session", "5e55a1a1-0000-4000-8000-000000000001"],
           ["--tag", "p1"],
           ["--prio", "0-2"], ["--search", "ÜNÏ"], ["--search", "nothing like it"], ["gamma", "--all"])


def ordered(text: str):
    """Parse JSON keeping each object's key order (a list of pairs)."""
    import json

    return json.loads(text, object_pairs_hook=list)


def test_task_list_json_from_sqlite_prints_what_the_task_objects_printed(db, cli):
    import json

    populate(db)
    svc = clare.Services(db)
    n_seen = 0
    for extra in FILTERS:
        ran = cli("task", "list", "--json", *extra)
        assert ran.code == 0, (extra, ran.err)
        # what `emit` printed before: the Task objects through to_json and json.dumps
        ctx = clare.Context(clare.build_parser().parse_args(["task", "list", "--json", *extra]))
        args = ctx.args
        project_ref = args.project or args.project_opt
        before = json.dumps(clare._jsonable(svc.list_tasks(
            project_id=svc.get_project(project_ref).id if project_ref else None, status=args.status,
            is_open=not (args.all or args.status), active_projects=not (args.all or project_ref),
            is_assigned=True if args.assigned else False if args.unassigned else None,
            session_id=svc.get_session(args.session).id if args.session else None,
            group_id=svc.get_group(args.group).id if args.group else None, tag=args.tag,
            priorities=clare.parse_priorities(args.prio) if args.prio else None, search=args.search,
            include_removed=args.all)), ensure_ascii=False, separators=(",", ":"))
        assert ordered(ran.out) == ordered(before), extra  # keys, order, values
        assert ran.out == before + "\n", extra  # and the very bytes: SQLite escapes as json.dumps does
        n_seen += len(json.loads(ran.out))
    assert n_seen > 100  # the filters saw tasks, not only empty lists


def test_task_list_json_is_the_same_locally_and_through_the_api(db, cli, server):
    populate(db)
    for extra in (["--all"], [], ["--tag", "backend"]):
        local = cli("task", "list", "--json", *extra)
        remote = cli("--remote", server.url, "task", "list", "--json", *extra)
        assert local.code == remote.code == 0, (local.err, remote.err)
        assert ordered(local.out) == ordered(remote.out), extra
        assert local.out == remote.out, extra


def test_every_task_field_has_its_sqlite_json_expression():
    # a field added to Task without one still prints right (through the objects), only slower: add it here
    assert [f.name for f in clare.record_fields(clare.Task)] == [
        name for name in clare._TASK_JSON_FIELDS if name in {f.name for f in clare.record_fields(clare.Task)}]
    assert {f.name for f in clare.record_fields(clare.Task)} == clare._TASK_JSON_FIELDS.keys()


# Schema 11: the list's order as an index, from the release database on.

def test_the_release_database_gets_the_task_order_index_and_lists_the_same(tmp_path):
    import json
    import shutil

    data = ROOT / "tests" / "data"
    shutil.copyfile(data / "release-0.1.0.db", tmp_path / "clare.db")
    db = clare.open_db(str(tmp_path / "clare.db"))
    try:
        assert db.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(
            clare.SCHEMA_VERSION)
        assert db.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'tasks_order'").fetchone()
        plan = " ".join(r[3] for r in db.conn.execute(
            "EXPLAIN QUERY PLAN " + clare._TASK_SELECT + clare._task_filters(include_removed=True)[0]))
        assert "USING COVERING INDEX tasks_order" in plan, plan  # no row of tasks is read ...
        assert "TEMP B-TREE" not in plan, plan  # ... and nothing is sorted, not even in part
        for filters in ({"include_removed": True}, {"is_open": True, "active_projects": True}):
            objects = json.dumps([t.to_json() for t in clare.list_tasks(db, **filters)], ensure_ascii=False)
            assert ordered(clare.list_tasks_json(db, **filters)) == ordered(objects)
        assert len(json.loads(clare.list_tasks_json(db, include_removed=True))) == 3
    finally:
        db.close()


# `task add` run as a program: no checkpoint on close, no teardown; in-process main(argv) closes as before.

def test_a_cli_write_run_as_a_program_leaves_the_checkpoint_to_sqlite_and_prints_everything(home, run_clare, cli):
    assert cli("project", "new", "alpha").code == 0  # in-process: closes, and so checkpoints
    wal = home / "clare.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    for i in range(3):
        ran = run_clare("task", "add", "alpha", f"task {i} " + "x" * 250)
        assert ran.code == 0, ran.err  # what it printed sat in Python's buffer until exit_now flushed it
        assert ran.out.startswith("added task ") and ran.out.endswith(f"task {i} " + "x" * 250 + " (P2)\n")
    assert wal.stat().st_size > 0  # the commits are in the WAL: nobody checkpointed on close
    listed = run_clare("task", "list", "--json")
    assert listed.code == 0 and len(listed.out) > 750  # all of it reached the pipe before os._exit
    assert [t["title"][:6] for t in __import__("json").loads(listed.out)] == ["task 0", "task 1", "task 2"]
    bad = run_clare("task", "add", "nosuch", "x")
    assert bad.code == 1 and bad.err.startswith("clare: error: ")  # errors keep their exit code and line


def test_event_hashes_from_the_built_in_sha256_are_hashlib_ones():
    import hashlib

    ev = clare.Event("u-1", "1700000000000.000000.m", "m", "task.created", {"a": "ü"}, "2023-11-14T22:13:20.000Z")
    text = "\x1f".join((ev.uuid, ev.hlc, ev.machine_id, ev.event_type, '{"a":"ü"}', ev.created_at))
    assert clare.event_hash(ev, '{"a":"ü"}') == hashlib.sha256(text.encode()).hexdigest()
    assert clare._builtin_sha256().__module__ in ("_sha256", "_sha2", "_hashlib")


# The README's first command runs Clare as `python3 -m clare` from its folder (cached bytecode).

def test_python_m_clare_from_its_folder_serves_and_lists_as_the_script_does(home, run_clare):
    import json
    import re
    import signal

    env = {**__import__("os").environ, "CLARE_HOME": str(home)}
    env.pop("PYTHONPATH", None)
    assert run_clare("project", "new", "alpha").code == 0
    assert run_clare("task", "add", "alpha", "write the parser").code == 0
    as_module = subprocess.run([sys.executable, "-m", "clare", "task", "list", "--json"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
    assert as_module.returncode == 0, as_module.stderr
    assert as_module.stdout == run_clare("task", "list", "--json").out
    assert [t["title"] for t in json.loads(as_module.stdout)] == ["write the parser"]
    serving = subprocess.Popen([sys.executable, "-m", "clare", "serve", "--port", "0", "--no-sync"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+/", serving.stdout.readline())[0]
        import urllib.request

        token = clare.resolve_token(clare.load_config(str(home / "clare.toml")), env={})  # serve made it
        request = urllib.request.Request(url + "api/v1/tasks", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert [t["title"] for t in json.loads(reply.read())] == ["write the parser"]
    finally:
        serving.send_signal(signal.SIGTERM)
        out, err = serving.communicate(timeout=30)
    assert serving.returncode == 0, err
