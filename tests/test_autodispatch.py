"""Dispatch (issue #16, part B): a project's waiting sessions fed the next ready task, decided by one host.

With the fake Claude in a real private tmux server (the `fleet` fixture of test_dispatch), the
seeded multi-host simulation of test_sync's links, and the project page in Chromium.
"""

import json
import os
import subprocess

import pytest

import clare
from conftest import wait_for
from test_dispatch import fleet, received, set_config, write_claude  # noqa: F401  (fixtures and helpers)


def dispatching_project(cli, folder, *titles: str, max_sessions: int = 1) -> list[str]:
    """Make project api with its code in `folder`, dispatch on, and one task per title (P1, P2, ...)."""
    folder.mkdir(exist_ok=True)
    assert cli("project", "new", "api", "--dir", str(folder)).code == 0
    ids = [cli("task", "add", "api", title, "--prio", str(min(n, 4)), "--desc", f"about {title}",
               "--json").json()["id"] for n, title in enumerate(titles, 1)]
    r = cli("project", "set", "api", "--dispatch", "on", "--max-sessions", str(max_sessions))
    assert r.code == 0, r.err
    return ids


def pane_env(fleet, pane_id: str) -> dict:  # noqa: F811
    """The environment Claude's Bash tool gives the launcher in a pane."""
    return {**os.environ, "TMUX": f"{fleet.socket},1,0", "TMUX_PANE": pane_id, "CLARE_URL": "http://127.0.0.1:9"}


def done_from_pane(home, fleet, pane_id: str, summary: str) -> None:  # noqa: F811
    p = subprocess.run([str(home / "clare"), "update", "--done", summary], env=pane_env(fleet, pane_id),
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


# --- the settings: project set --dispatch / --max-sessions / --dispatcher -------------------------------

def test_dispatch_is_off_by_default_and_set_shown_and_undone_per_field(cli, db):
    assert cli("project", "new", "api").code == 0
    shown = cli("project", "show", "api", "--json").json()
    assert (shown["is_dispatching"], shown["max_sessions"], shown["dispatcher"]) == (False, 1, None)
    assert "dispatch: off (turn it on with: clare project set api --dispatch on)" in cli("project", "show", "api").out
    r = cli("project", "set", "api", "--dispatch", "on", "--max-sessions", "3")
    assert r.code == 0, r.err
    assert "dispatch: on, up to 3 sessions, decided by testhost" in r.out
    p = clare.get_project(db, "api")
    assert (p.is_dispatching, p.max_sessions, p.dispatcher) == (True, 3, "testhost")
    before = clare.count_events(db)
    assert cli("project", "set", "api", "--dispatch", "on").code == 0
    assert clare.count_events(db) == before  # the same values are not recorded again
    for args, code, says in ((("--max-sessions", "0"), 2, "--max-sessions 0 is outside 1-50"),
                             (("--dispatcher", "nowhere"), 1, "no host 'nowhere' is known here")):
        r = cli("project", "set", "api", *args)
        assert r.code == code and says in r.err, (args, r.err)
    assert clare.count_events(db) == before  # a refusal leaves no trace
    db.conn.execute("INSERT INTO sync_peers (url, name, machine_id) VALUES ('http://a:1', 'apricot', 'm-apricot')")
    r = cli("project", "set", "api", "--dispatcher", "apricot", "--json")
    assert r.json()["dispatcher"] == "m-apricot"
    assert cli("project", "set", "api", "--dispatch", "off", "--json").json()["is_dispatching"] is False
    assert cli("undo").code == 0
    assert clare.get_project(db, "api").is_dispatching is True
    history = cli("project", "show", "api", "--history").out
    assert "changed project: dispatch=True, dispatcher='testhost', max_sessions=3" in history
    assert "changed project: dispatcher='m-apricot'" in history


def test_a_bad_dispatch_template_is_refused_with_the_names_it_may_use():
    with pytest.raises(clare.ClareError, match=r"uses \$name; it may use \$title, \$description"):
        clare.dispatch_settings({"dispatch": {"template": "do $name"}})
    with pytest.raises(clare.ClareError, match="clear_between = 'yes' is not true or false"):
        clare.dispatch_settings({"dispatch": {"clear_between": "yes"}})
    template, is_clear = clare.dispatch_settings({"dispatch": {"template": "$title ($priority) costs $$5"}})
    task = clare.Task("ab" * 16, "p", "api", "Fix it", "", "todo", 1, "", None, None)
    assert clare.first_prompt(task, launcher="/x/clare", template=template) == "Fix it (P1) costs $5"
    assert not is_clear


# --- feeding waiting sessions, with the fake Claude in tmux ------------------------------------------------

def test_finishing_a_task_types_the_next_ready_one_into_the_same_session(cli, fleet, home, db, tmp_path):  # noqa: F811
    first, second = dispatching_project(cli, tmp_path / "code", "write the parser", "write the printer")
    assert cli("pull").code == 0  # no session on the project and 0 of 1 run: one is started for the first task
    [order] = clare.list_orders(db)
    assert (order.action, order.result, order.task_id) == ("start", "started", first)
    assert "no session of api waits and 0 of at most 1 run" in order.request["reason"]
    sid, pane = order.session_id, order.outcome["pane_id"]
    assert received(fleet, sid, "prompt")[0].startswith("write the parser\n\nabout write the parser\n\n")
    assert cli("pull").code == 0  # working on it: nothing more (1 of 1 runs, none waits)
    assert len(clare.list_orders(db)) == 1
    done_from_pane(home, fleet, pane, "parser written")
    assert cli("pull").code == 0  # it waits with no open task: the next ready one is typed in
    wait_for(lambda: len(received(fleet, sid, "prompt")) == 2, what="the second task typed in")
    assert received(fleet, sid, "prompt")[1].startswith("write the printer\n\nabout write the printer\n\n")
    assert f'{home / "clare"} update --done "one-line summary"' in received(fleet, sid, "prompt")[1]
    dispatch = next(o for o in clare.list_orders(db) if o.action == "dispatch")
    assert (dispatch.result, dispatch.session_id, dispatch.task_id) == ("typed", sid, second)
    task = cli("task", "show", second, "--json").json()
    assert (task["session_id"], task["status"]) == (sid, "in_progress")
    said = f"dispatch task {second[:8]} to session {sid[:8]} on testhost: session {sid[:8]} finished its task"
    assert said in cli("task", "show", second).out
    assert said in cli("log").out
    page = cli("sessions", "show", sid).out
    assert f"dispatch task {second[:8]}" in page
    done_from_pane(home, fleet, pane, "printer written")
    assert cli("pull").code == 0  # nothing ready any more: nothing happens
    assert len(clare.list_orders(db)) == 2


def test_a_draft_in_the_composer_fails_the_dispatch_and_leaves_the_task_ready(cli, fleet, home, db, tmp_path):  # noqa: F811
    first, second = dispatching_project(cli, tmp_path / "code", "write the parser", "write the printer")
    cli("pull")
    [order] = clare.list_orders(db)
    done_from_pane(home, fleet, order.outcome["pane_id"], "parser written")
    fleet.run("send-keys", "-t", order.outcome["pane_id"], "-l", "half a thought")  # the user's draft
    wait_for(lambda: "half a thought" in fleet.capture(order.outcome["pane_id"]), what="the draft on screen")
    cli("pull")
    dispatch = next(o for o in clare.list_orders(db) if o.action == "dispatch")
    assert dispatch.result == "refused" and "draft" in dispatch.reason
    task = cli("task", "show", second, "--json").json()
    assert (task["session_id"], task["status"]) == (None, "todo")  # ready again
    assert len(received(fleet, order.session_id, "prompt")) == 1  # nothing typed, the draft kept
    assert "draft" in cli("task", "show", second).out
    cli("pull")  # no retry storm: the same session and task are left alone for a while
    assert len(clare.list_orders(db)) == 2


def test_with_clear_between_the_task_goes_to_the_new_session_id_after_clear(cli, fleet, home, db, tmp_path):  # noqa: F811
    set_config(home, write_claude(fleet.bin), "[dispatch]\nclear_between = true\n")
    first, second = dispatching_project(cli, tmp_path / "code", "write the parser", "write the printer")
    cli("pull")
    [order] = clare.list_orders(db)
    done_from_pane(home, fleet, order.outcome["pane_id"], "parser written")
    cli("pull")
    dispatch = next(o for o in clare.list_orders(db) if o.action == "dispatch")
    assert dispatch.result == "typed", dispatch.reason
    new_id = dispatch.outcome["session_id"]
    assert new_id != order.session_id
    assert received(fleet, new_id, "prompt")[0].startswith("write the printer")
    assert cli("task", "show", second, "--json").json()["session_id"] == new_id
    assert cli("task", "show", first, "--json").json()["session_id"] == order.session_id  # done: it stays


def test_a_new_session_is_started_when_none_waits_up_to_the_maximum(cli, fleet, home, db, tmp_path):  # noqa: F811
    ids = dispatching_project(cli, tmp_path / "code", "one", "two", "three", max_sessions=2)
    cli("pull")
    starts = [o for o in clare.list_orders(db) if o.action == "start"]
    assert sorted(o.task_id for o in starts) == sorted(ids[:2]) and {o.result for o in starts} == {"started"}
    cli("pull")
    assert len(clare.list_orders(db)) == 2  # two run: the third waits
    assert cli("task", "show", ids[2], "--json").json()["session_id"] is None
    assert len(fleet.run("list-panes", "-a").splitlines()) == 2


def test_only_the_dispatcher_host_dispatches(cli, fleet, home, db, tmp_path):  # noqa: F811
    dispatching_project(cli, tmp_path / "code", "one")
    db.conn.execute("INSERT INTO sync_peers (url, name, machine_id) VALUES ('http://a:1', 'apricot', 'm-apricot')")
    assert cli("project", "set", "api", "--dispatcher", "apricot").code == 0
    cli("pull")
    assert clare.list_orders(db) == []
    assert not (fleet.claude_dir / "fake-started.jsonl").exists()
