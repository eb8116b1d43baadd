"""Daily use (#22): task rm/restore, undo, task list filters, tags, and the CLI's habits, driven as a user would."""

import json

import pytest

import clare
from conftest import projection_digest

T0 = 1_750_000_000_000


def _add(run_clare, *argv):
    r = run_clare("task", "add", *argv, "--json")
    assert r.code == 0, r.err
    return r.json()["id"]


def test_task_rm_leaves_lists_keeps_history_and_restore_brings_it_back(run_clare):
    run_clare("project", "new", "alpha")
    keep = _add(run_clare, "alpha", "keep me")
    typo = _add(run_clare, "alpha", "wirte teh parser")
    r = run_clare("task", "rm", typo[:6])
    assert r.code == 0 and f"removed task {typo[:8]}: wirte teh parser" in r.out
    assert f"clare task restore {typo[:8]}" in r.out
    listed = run_clare("task", "list").out
    assert keep[:8] in listed and typo[:8] not in listed
    assert [t["id"] for t in run_clare("task", "list", "--json").json()] == [keep]
    everything = run_clare("task", "list", "--all").out
    assert f"{typo[:8]}  P2   todo (removed)" in everything
    assert "tasks: 1 todo" in run_clare("project", "show", "alpha").out
    history = run_clare("project", "show", "alpha", "--history").out
    assert f"removed task {typo[:8]}" in history
    assert "removed:  " in run_clare("task", "show", typo[:8]).out
    shown = run_clare("task", "show", typo[:8], "--json").json()
    assert shown["removed_at"] and shown["history"][-1]["event_type"] == "task.removed"
    again = run_clare("task", "rm", typo[:8])
    assert again.code == 1 and again.err == (f"clare: error: task {typo[:8]} is removed already; bring it back "
                                             f"with: clare task restore {typo[:8]}\n")
    r = run_clare("task", "restore", typo[:8])
    assert r.code == 0 and f"restored task {typo[:8]}" in r.out
    assert {t["id"] for t in run_clare("task", "list", "--json").json()} == {keep, typo}


def test_undo_records_the_inverse_event_prints_it_and_never_deletes(run_clare):
    run_clare("init", "--machine-id", "ash")
    run_clare("project", "new", "alpha")
    task = _add(run_clare, "alpha", "parser", "--tag", "backend")
    run_clare("task", "edit", task[:8], "--title", "parse v2", "--prio", "0", "--untag", "backend", "--tag", "x")
    run_clare("task", "done", task[:8])
    n_before = len(run_clare("log", "--json", "--limit", "1000").json())
    listed = run_clare("undo", "--list")
    assert listed.code == 0
    lines = listed.out.splitlines()
    assert lines[0].split() == ["WHEN", "CHANGE"]
    assert "changed task" in lines[1] and "status='done'" in lines[1]
    assert "cannot undo: Clare keeps every project" in lines[-1]
    r = run_clare("undo")
    assert r.code == 0 and r.out == f"undid: changed task {task[:8]}: status='done'\n"
    assert run_clare("task", "show", task[:8], "--json").json()["status"] == "todo"
    r = run_clare("undo")
    assert r.out.startswith(f"undid: changed task {task[:8]}: priority=0, title='parse v2', tags -backend +x")
    t = run_clare("task", "show", task[:8], "--json").json()
    assert (t["title"], t["priority"], t["tags"]) == ("parser", 2, ["backend"])
    r = run_clare("undo")
    assert r.out.startswith(f"undid: added task {task[:8]}")
    assert run_clare("task", "list", "--json").json() == []
    refused = run_clare("undo")
    assert refused.code == 1 and refused.err.startswith("clare: error: cannot undo the last change "
                                                        "(created project 'alpha'): Clare keeps every project")
    log = run_clare("log", "--json", "--limit", "1000").json()
    assert len(log) == n_before + 3  # three inverse events added, none deleted
    undos = [e for e in log if "undoes" in e["payload"]]
    assert [e["event_type"] for e in undos] == ["task.updated", "task.updated", "task.removed"]
    assert "undo: removed task" in run_clare("log").out


def test_undo_keeps_a_newer_change_from_another_host():
    a, b = clare.open_db(":memory:", machine_id="ash"), clare.open_db(":memory:", machine_id="birch")
    p = clare.create_project(a, "alpha", now_ms=T0)
    t = clare.create_task(a, p.id, "first", now_ms=T0 + 1)
    clare.edit_task(a, t.id, title="mine", priority=0, now_ms=T0 + 2)
    _copy(a, b, T0 + 3)
    clare.edit_task(b, t.id, title="theirs", now_ms=T0 + 4)
    _copy(b, a, T0 + 5)
    result = clare.undo_change(a, now_ms=T0 + 6)
    assert result.n_kept == 1  # the title another host set later stays
    got = clare.get_task(a, t.id)
    assert (got.title, got.priority) == ("theirs", 2)


def _copy(src, dst, now):
    with clare.write_txn(dst) as cur:
        clare.receive_events(dst, cur, list(clare.iter_events(src)), now_ms=now)


def test_tags_merge_across_hosts_as_a_set_with_add_and_remove_per_tag():
    a, b = clare.open_db(":memory:", machine_id="ash"), clare.open_db(":memory:", machine_id="birch")
    p = clare.create_project(a, "alpha", now_ms=T0)
    t = clare.create_task(a, p.id, "first", tags=["old", "shared"], now_ms=T0 + 1)
    _copy(a, b, T0 + 2)
    clare.edit_task(a, t.id, tags=["backend"], untags=["old"], now_ms=T0 + 10)  # concurrent with b's edit
    clare.edit_task(b, t.id, tags=["urgent", "old"], untags=["shared"], now_ms=T0 + 5)
    _copy(a, b, T0 + 20)
    _copy(b, a, T0 + 20)
    for db in (a, b):  # both adds survive; for 'old' the newer (a's removal) wins; 'shared' was removed by b
        assert clare.get_task(db, t.id).tags == ("backend", "urgent")
    assert projection_digest(a) == projection_digest(b)
    assert [x.id for x in clare.list_tasks(a, tag="urgent")] == [t.id]


def test_task_list_shows_open_tasks_of_active_projects_and_filters_like_taskwarrior(run_clare):
    run_clare("project", "new", "alpha")
    run_clare("project", "new", "beta")
    parser = _add(run_clare, "alpha", "write the parser", "--prio", "0", "--tag", "backend")
    docs = _add(run_clare, "alpha", "Docs for the PARSER", "--prio", "3")
    done = _add(run_clare, "alpha", "shipped", "--prio", "1")
    paused = _add(run_clare, "beta", "later", "--prio", "1")
    run_clare("task", "done", done[:8])
    run_clare("project", "set", "beta", "--status", "paused")
    run_clare("group", "add", "backend", "--cwd", "/srv/api")
    run_clare("assign", parser[:8], "--group", "backend")

    def ids(*argv):
        r = run_clare("task", "list", *argv, "--json")
        assert r.code == 0, r.err
        return [t["id"] for t in r.json()]
    assert ids() == [parser, docs]
    assert ids("--all") == [parser, done, paused, docs]
    assert ids("--status", "done") == [done]
    assert ids("beta") == [paused]  # a named project shows whatever its status
    assert ids("--project", "beta") == [paused]
    assert ids("--assigned") == [parser] and ids("--unassigned") == [docs]
    assert ids("--group", "backend") == [parser]
    assert ids("--prio", "0") == [parser] and ids("--prio", "1-3") == [docs]
    assert ids("--all", "--prio", "P1") == [done, paused]
    assert ids("--search", "parser") == [parser, docs]
    assert ids("--tag", "backend") == [parser]
    text = run_clare("task", "list").out
    assert "write the parser #backend" in text and "group " in text
    empty = run_clare("task", "list", "--tag", "nope")
    assert empty.code == 0 and empty.out == "no tasks match\n"
    assert run_clare("task", "list", "beta", "--status", "todo").out.startswith("ID")
    both = run_clare("task", "list", "--assigned", "--unassigned")
    assert both.code == 2 and both.err == "clare: error: give --assigned or --unassigned, not both\n"


def test_priority_words_are_refused_naming_the_range(run_clare):
    run_clare("project", "new", "alpha")
    r = run_clare("task", "add", "alpha", "x", "--prio", "high")
    assert r.code == 2 and r.err == ("clare: error: priority 'high' is outside 0-4; use a number from 0 "
                                     "(most urgent) to 4, e.g. --prio 1\n")
    assert run_clare("task", "list", "--all", "--json").json() == []
    assert run_clare("task", "add", "alpha", "x", "--prio", "P1", "--json").json()["priority"] == 1


def test_a_bad_tag_is_refused_and_writes_nothing(run_clare):
    run_clare("project", "new", "alpha")
    r = run_clare("task", "add", "alpha", "x", "--tag", "two words")
    assert r.code == 2 and "tag 'two words' is not one word" in r.err
    assert run_clare("task", "list", "--all", "--json").json() == []


def _seed_fleet(home):
    """Four sessions on this host, as two pulls would record them: two wait, one asks permission."""
    from conftest import observe

    db = clare.open_db(str(home / "clare.db"), machine_id="ash")
    now = clare.now_ms()
    ids = [f"{n}aaaaaaa-0000-4000-8000-000000000000" for n in range(1, 5)]
    first = [{"session_id": ids[0], "state": "working"}, {"session_id": ids[1], "state": "waiting"},
             {"session_id": ids[2], "state": "working", "cwd": "/srv/api/one"}, {"session_id": ids[3], "state": "idle"}]
    observe(db, first, now_ms=now - 600_000)
    later = [first[0], first[1], {**first[2], "state": "permission"}, {**first[3], "state": "waiting"}]
    observe(db, later, now_ms=now - 60_000)
    db.close()
    return ids


def test_sessions_are_sorted_by_urgency_filtered_by_state_and_name_the_group(home, run_clare):
    working, waiting_long, permission, waiting_new = _seed_fleet(home)
    run_clare("project", "new", "alpha")
    run_clare("group", "add", "backend", "--cwd", "/srv/api")
    grouped = _add(run_clare, "alpha", "api work")
    run_clare("assign", grouped[:8], "--group", "backend")
    got = [s["id"] for s in run_clare("sessions", "--json").json()]
    assert got == [permission, waiting_long, waiting_new, working]
    waiting = run_clare("sessions", "--state", "waiting", "--json").json()
    assert [s["id"] for s in waiting] == [waiting_long, waiting_new]
    text = run_clare("sessions").out.splitlines()
    assert text[1].startswith(permission[:8]) and f"{grouped[:8]} (group backend)" in text[1]
    none = run_clare("sessions", "--state", "gone")
    assert none.out == "no session is gone now; see them all with: clare sessions\n"


def test_status_puts_what_needs_you_first_and_shows_both_tasks_of_a_session(home, run_clare):
    working, waiting_long, permission, waiting_new = _seed_fleet(home)
    run_clare("project", "new", "alpha")
    one = _add(run_clare, "alpha", "first task", "--prio", "1")
    two = _add(run_clare, "alpha", "second task", "--prio", "2")
    run_clare("assign", one[:8], waiting_long[:8])
    moved = run_clare("assign", two[:8], working[:8])
    assert moved.out == f"task {two[:8]} assigned to session {working[:8]}: second task\n"
    moved = run_clare("assign", two[:8], waiting_long[:8])
    assert moved.out == (f"task {two[:8]} assigned to session {waiting_long[:8]} "
                         f"(moved from session {working[:8]}): second task\n")
    out = run_clare("status").out
    head, projects, sessions = out.split("\n\n")
    lines = head.splitlines()
    assert lines[0] == "needs you:"
    assert lines[2].startswith(permission[:8]) and "permission" in lines[2]
    assert lines[3].startswith(waiting_long[:8]) and f"{one[:8]} first task" in lines[3]
    assert lines[4].strip() == f"{two[:8]} second task"  # the same session's second task, on its own line
    assert lines[5].startswith(waiting_new[:8]) and len(lines) == 6
    assert projects.startswith("PROJECT")
    assert working[:8] in sessions and sessions.splitlines()[1].startswith(permission[:8])
    report = run_clare("status", "--json").json()
    assert {t["id"] for t in report["tasks"]} == {one, two}
    held = next(s for s in report["sessions"] if s["id"] == waiting_long)
    assert held["task_ids"] == [one, two]


def test_a_mistyped_verb_names_the_nearest_one(run_clare):
    r = run_clare("tsk", "list")
    assert r.code == 2 and r.err == "clare: error: unknown command 'tsk'; did you mean 'task'? see: clare --help\n"
    r = run_clare("task", "lst")
    assert r.err == "clare: error: unknown command 'lst'; did you mean 'list'? see: clare task --help\n"
    r = run_clare("task", "list", "--status", "don")
    assert r.code == 2 and r.err.endswith("did you mean 'done'? see: clare task list --help\n")
    assert run_clare("xyzzy").err == "clare: error: unknown command 'xyzzy'; see: clare --help\n"


def test_an_update_with_the_text_missing_says_so(run_clare):
    r = run_clare("update", "3620")
    assert r.code == 2 and r.err == ("clare: error: the update text is missing after the task id; "
                                     "e.g. clare update 3620 \"parser done, tests next\"\n")


def test_a_bad_id_names_the_command_that_lists_good_ones(run_clare):
    run_clare("project", "new", "alpha")
    task = _add(run_clare, "alpha", "x")
    assert run_clare("task", "show", "zz").err == ("clare: error: task id 'zz' is not a hex id or prefix; "
                                                   "copy one from the list: clare task list\n")
    assert run_clare("assign", task[:8], "qq").err == ("clare: error: session id 'qq' is not a hex id or prefix; "
                                                       "copy one from the list: clare sessions\n")


def test_global_options_are_taken_after_the_verb(run_clare, tmp_path):
    other = tmp_path / "other"
    assert run_clare("project", "new", "beta", "--home", str(other)).code == 0
    assert [p["name"] for p in run_clare("project", "list", "--json", "--home", str(other)).json()] == ["beta"]
    assert run_clare("project", "list", "--json").json() == []  # the default home was not touched
    assert run_clare("task", "list", "--db", str(other / "clare.db"), "--all").out == "no tasks\n"
    r = run_clare("task", "list", "--remote", "http://127.0.0.1:1")
    assert r.code == 1 and r.err.startswith("clare: error: cannot reach http://127.0.0.1:1")


def test_log_prints_times_a_person_reads_and_the_hlc_when_verbose(run_clare):
    run_clare("init", "--machine-id", "ash")
    run_clare("project", "new", "alpha")
    line = run_clare("log").out.splitlines()[-1]
    import re
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ash           created project 'alpha'", line), line
    verbose = run_clare("log", "--verbose").out.splitlines()[-1]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ash           \d{13}\.\d{6}\.ash  project\.created "
                        r"  created project 'alpha'", verbose), verbose
    assert "hlc" in run_clare("log", "--json").json()[-1]


def test_remote_without_the_token_says_to_set_clare_token(serve, run_clare):
    server = serve(token="a-token-of-sixteen-or-more")
    r = run_clare("task", "list", "--remote", server.url)
    assert r.code == 1 and "set CLARE_TOKEN to the token of the Clare at " + server.url in r.err
    assert len(r.err.splitlines()) == 1
    ok = run_clare("task", "list", "--remote", server.url, env={"CLARE_TOKEN": "a-token-of-sixteen-or-more"})
    assert ok.code == 0, ok.err


def test_a_session_whose_pane_was_killed_is_gone_at_the_next_pull_despite_a_recent_hook(home, tmux, run_clare):
    import json

    run_clare("init", "--machine-id", "ash")
    tmux.spawn("sleep", "600", cwd=home / "keep", name="keep")  # keeps the tmux server running
    pane = tmux.spawn("sleep", "600", cwd=home / "app", name="ghost")
    sid = "5e55a1b2-0000-4000-8000-000000000000"
    report = {"session_id": sid, "hook_event_name": "Stop", "cwd": str(home / "app")}
    hooked = run_clare("hook", input=json.dumps(report), env={"TMUX": f"{tmux.socket},1,0", "TMUX_PANE": pane})
    assert hooked.code == 0
    assert [(s["id"], s["state"], s["pane_id"]) for s in run_clare("sessions", "--json").json()] == [
        (sid, "waiting", pane)]
    tmux.run("kill-pane", "-t", pane)  # killed: Claude sends no SessionEnd
    assert run_clare("pull").code == 0
    assert run_clare("sessions", "--json").json() == []
    gone = run_clare("sessions", "--state", "gone", "--json").json()
    assert [(s["id"], s["state"]) for s in gone] == [(sid, "gone")]
    assert f"session {sid[:8]} is gone (its tmux pane {pane} is gone)" in run_clare("log").out


def test_broadcast_prints_each_session_as_it_lands_with_a_progress_line_on_a_terminal(home, tmux, run_clare, tmp_path):
    import os
    import pty
    import subprocess
    import sys
    import time

    from conftest import CLARE_PY

    tmux.spawn_claude(cwd=tmp_path / "a", name="a-idle")
    busy = tmux.spawn_claude(cwd=tmp_path / "b", name="b-busy")
    tmux.type_prompt(busy, "work")  # Claude is busy there: the text waits its 3 s for a confirmation, then queues
    tmux.wait_settled(1)
    sessions = run_clare("pull", "--json").json()["sessions"]
    by_target = {s["tmux_target"]: s["id"] for s in sessions}
    run_clare("project", "new", "alpha")
    for target in ("a-idle:0.0", "b-busy:0.0"):
        task = _add(run_clare, "alpha", f"work in {target}")
        run_clare("assign", task[:8], by_target[target][:8])
    master, slave = pty.openpty()  # stderr on a terminal: the progress line shows there
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(CLARE_PY), "broadcast", "alpha", "--yes", "--", "run the tests"],
                            stdout=subprocess.PIPE, stderr=slave, text=True, env=os.environ)
    os.close(slave)
    first = proc.stdout.readline()
    first_at = time.monotonic() - started
    assert proc.poll() is None  # the first session's line came while the second was still being typed into
    rest = proc.stdout.read()
    assert proc.wait(30) == 0
    total = time.monotonic() - started
    word = first.split()
    assert (word[0], word[2], word[3]) == (by_target["a-idle:0.0"][:8], "a-idle:0.0", "delivered")
    lines = rest.splitlines()
    assert lines[0].split()[2:4] == ["b-busy:0.0", "queued"]
    assert lines[1].startswith("broadcast ") and lines[1].endswith("to alpha: 1 delivered, 1 queued")
    assert total - first_at > 1.0  # the busy session's wait came after the first line, not before it
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    assert "broadcasting to alpha…".encode() in err
    assert "typing into 2 of 2 sessions on this host…".encode() in err
    assert err.endswith(b"\r\x1b[K")  # the progress line is cleared at the end


def test_undo_puts_an_assignment_back_where_it_was_and_removes_a_new_group():
    from conftest import observe

    db = clare.open_db(":memory:", machine_id="ash")
    a, b = "a0000000-0000-4000-8000-000000000000", "b0000000-0000-4000-8000-000000000000"
    observe(db, [a, b], now_ms=T0)
    p = clare.create_project(db, "alpha", now_ms=T0 + 1)
    t = clare.create_task(db, p.id, "first", now_ms=T0 + 2)
    clare.assign_task(db, t.id, session_id=a, now_ms=T0 + 3)
    clare.assign_task(db, t.id, session_id=b, now_ms=T0 + 4)
    assert clare.undo_change(db, now_ms=T0 + 5).undone.description == f"assigned task {t.id[:8]} to session b0000000"
    assert clare.get_task(db, t.id).session_id == a
    clare.undo_change(db, now_ms=T0 + 6)
    assert clare.get_task(db, t.id).session_id is None
    g = clare.create_group(db, "web", cwd="/srv/web", now_ms=T0 + 7)
    clare.assign_task(db, t.id, group_ref="web", now_ms=T0 + 8)
    clare.unassign_task(db, t.id, now_ms=T0 + 9)
    clare.undo_change(db, now_ms=T0 + 10)  # the unassign: bound to the group again
    assert clare.get_task(db, t.id).group_id == g.id
    clare.undo_change(db, now_ms=T0 + 11)  # the group assignment
    clare.undo_change(db, now_ms=T0 + 12)  # the group itself
    assert clare.list_groups(db) == []
    clare.undo_change(db, now_ms=T0 + 13)  # the task's creation: removed
    assert clare.list_tasks(db) == [] and clare.get_task(db, t.id).removed_at is not None
    with pytest.raises(clare.Conflict, match=r"cannot undo the last change \(created project 'alpha'\)"):
        clare.undo_change(db, now_ms=T0 + 14)


def test_an_older_clare_stores_and_relays_removal_tags_and_undo_and_a_replay_after_upgrade_applies_them(
        monkeypatch):
    new = clare.open_db(":memory:", machine_id="ash")
    p = clare.create_project(new, "alpha", now_ms=T0)
    t = clare.create_task(new, p.id, "first", tags=["backend"], now_ms=T0 + 1)
    clare.edit_task(new, t.id, tags=["urgent"], now_ms=T0 + 2)
    clare.remove_task(new, t.id, now_ms=T0 + 3)
    clare.undo_change(new, now_ms=T0 + 4)  # task.restored with undoes
    clare.remove_task(new, t.id, now_ms=T0 + 5)
    sent = [ev.to_json() for ev in clare.iter_events(new)]

    old = clare.open_db(":memory:", machine_id="birch")
    with monkeypatch.context() as m:  # this Clare as the one before #22: no removal types, no tags or undoes fields
        for kind in ("task.removed", "task.restored"):
            m.delitem(clare.APPLIERS, kind)
            m.delitem(clare.PAYLOADS, kind)
        for kind in ("task.created", "task.updated"):
            m.setitem(clare.PAYLOADS, kind, {k: v for k, v in clare.PAYLOADS[kind].items()
                                             if k not in ("tags?", "undoes?")})
        result, bad = clare.import_events(old, [json.dumps(e) for e in sent], now_ms=T0 + 10)
        assert bad == [] and len(result.inserted) == len(sent)  # stored, nothing refused
        relayed = [ev.to_json() for ev in clare.iter_events(old)]
        assert relayed == sent  # relayed byte for byte: nothing dropped from the payloads
    clare.replay(old)  # what the upgraded version does with what it kept
    got = clare.get_task(old, t.id)
    assert (got.tags, got.removed_at is not None) == (("backend", "urgent"), True)
    assert clare.list_tasks(old) == []


def test_a_task_bound_to_a_group_shows_the_groups_name(run_clare):
    run_clare("project", "new", "alpha")
    task = _add(run_clare, "alpha", "api work")
    run_clare("group", "add", "backend", "--cwd", "/srv/api")
    r = run_clare("assign", task[:8], "--group", "backend")
    assert r.out == f"task {task[:8]} assigned to group backend: api work\n"
    assert "group backend" in run_clare("task", "list").out
    assert run_clare("task", "show", task[:8], "--json").json()["group"] == "backend"
