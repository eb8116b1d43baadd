"""Fleet: Claude Code sessions in real tmux panes (a private server per test) with a fake claude."""

import json
import os
from pathlib import Path

import pytest

import clare
from conftest import wait_for

DATA = Path(__file__).parent / "data"


def session_events(db) -> list:
    return [ev for ev in clare.iter_events(db) if ev.event_type.startswith("session.")]


def pull(cli) -> dict:
    r = cli("--json", "pull")
    assert r.code == 0, r.err
    return r.json()


def test_pull_finds_fake_claude_in_a_tmux_pane(tmux, cli, db, tmp_path):
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    result = pull(cli)
    assert result["appeared"] == 1
    [s] = cli("--json", "sessions").json()
    assert s["pane_id"] == pane and s["tmux_target"] == "work:0.0" and s["host"] == "testhost"
    assert s["cwd"] == str(tmp_path / "proj") and s["state"] == "waiting"
    assert s["command"].startswith("claude ") and "fake_claude.py" in s["command"]
    assert set(s) >= {"id", "host", "cwd", "tmux_target", "pane_id", "command", "state", "last_activity_at",
                      "label", "task_id", "tokens"}


def test_pull_without_change_writes_no_event(tmux, cli, db, tmp_path):
    tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    pull(cli)
    n_events = clare.count_events(db)
    for _ in range(3):
        assert pull(cli)["events"] == 0
    assert clare.count_events(db) == n_events


def test_state_follows_the_turn_and_is_recorded_only_on_change(tmux, cli, db, tmp_path):
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    pull(cli)
    tmux.type_prompt(pane, "work")
    wait_for(lambda: tmux.received(), what="the prompt to arrive")
    assert pull(cli)["changed"] == 1
    assert cli("--json", "sessions").json()[0]["state"] == "working"
    assert pull(cli)["events"] == 0
    tmux.type_prompt(pane, "thanks")
    wait_for(lambda: len(tmux.received()) == 2, what="the second prompt")
    pull(cli)
    [s] = cli("--json", "sessions").json()
    assert s["state"] == "waiting"
    assert s["tokens"] == {"input": 13, "output": 12, "cache_creation": 100, "cache_read": 1000}
    assert [ev.payload.get("state") for ev in session_events(db)] == ["waiting", "working", "waiting"]


def test_permission_dialog_on_screen_is_state_permission(tmux, cli, tmp_path):
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    tmux.type_prompt(pane, "perm")
    wait_for(lambda: "Do you want to proceed?" in tmux.capture(pane), what="the dialog")
    pull(cli)
    assert cli("--json", "sessions").json()[0]["state"] == "permission"


def test_waiting_session_turns_idle_after_the_configured_time(tmux, cli, home, tmp_path):
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    tmux.type_prompt(pane, "hello")
    wait_for(lambda: tmux.received(), what="the prompt")
    pull(cli)
    assert cli("--json", "sessions").json()[0]["state"] == "waiting"
    (home / "clare.toml").write_text("[fleet]\nidle_after_s = 0\n")
    pull(cli)
    assert cli("--json", "sessions").json()[0]["state"] == "idle"


def test_two_claude_panes_in_one_cwd_are_told_apart_by_the_registry(tmux, cli, tmp_path):
    a = tmux.spawn_claude(cwd=tmp_path / "proj", name="a")
    b = tmux.spawn_claude(cwd=tmp_path / "proj", name="b")
    ids = {json.loads(p.read_text())["sessionId"]
           for p in (tmux.claude_dir / "sessions").glob("*.json")}
    result = pull(cli)
    assert result["appeared"] == 2 and result["ambiguous"] == []
    sessions = cli("--json", "sessions").json()
    assert {s["id"] for s in sessions} == ids
    assert {s["pane_id"] for s in sessions} == {a, b}


def test_two_claude_panes_in_one_cwd_without_registry_are_ambiguous_not_guessed(tmux, cli, tmp_path):
    a = tmux.spawn_claude("--no-registry", "--greet", cwd=tmp_path / "proj", name="a")
    b = tmux.spawn_claude("--no-registry", "--greet", cwd=tmp_path / "proj", name="b")
    result = pull(cli)
    assert result["appeared"] == 0
    assert {p["pane_id"] for p in result["ambiguous"]} == {a, b}
    text = cli("sessions").out
    assert f"? pane {a} (a:0.0)" in text and f"? pane {b} (b:0.0)" in text


def test_lone_claude_pane_without_registry_takes_the_newest_transcript_of_its_cwd(tmux, cli, tmp_path):
    pane = tmux.spawn_claude("--no-registry", "--greet", cwd=tmp_path / "proj", name="a")
    [path] = (tmux.claude_dir / "projects").glob("*/*.jsonl")
    pull(cli)
    [s] = cli("--json", "sessions").json()
    assert s["id"] == path.stem and s["pane_id"] == pane and s["label"] == "hello"


def test_session_id_on_the_command_line_is_used(tmux, cli, tmp_path):
    sid = "0b7d5d1e-8f3c-4c4e-9d55-1e2f3a4b5c6d"
    tmux.spawn_claude("--no-registry", "--session-id", sid, cwd=tmp_path / "p1", name="a")
    tmux.spawn_claude("--no-registry", cwd=tmp_path / "p1", name="b")
    result = pull(cli)
    assert [s["id"] for s in result["sessions"]] == [sid] and len(result["ambiguous"]) == 1


def test_session_is_gone_when_its_pane_closes_and_back_when_seen_again(tmux, cli, db, tmp_path):
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    pull(cli)
    tmux.run("kill-pane", "-t", pane)
    wait_for(lambda: not list((tmux.claude_dir / "sessions").glob("*.json")), what="claude to exit")
    assert pull(cli)["gone"] == 1
    assert cli("--json", "sessions").json() == []
    [s] = cli("--json", "sessions", "--all").json()
    assert s["state"] == "gone"
    assert pull(cli)["events"] == 0
    tmux.spawn_claude("--resume", s["id"], "--no-registry", cwd=tmp_path / "proj", name="again")
    assert pull(cli)["changed"] == 1
    [again] = cli("--json", "sessions").json()
    assert again["id"] == s["id"] and again["state"] == "waiting" and again["tmux_target"] == "again:0.0"


def test_no_tmux_server_is_a_normal_state(tmux, cli):
    result = pull(cli)
    assert result["sessions"] == [] and result["unreachable"] == []


def test_a_non_claude_pane_is_not_a_session(tmux, cli, tmp_path):
    tmux.spawn("bash", "--norc", cwd=tmp_path / "proj", name="shell")
    assert pull(cli)["sessions"] == []


def test_assign_task_to_a_session_by_unique_prefix(tmux, cli, db, tmp_path):
    tmux.spawn_claude("--session-id", "7c1e9b00-0000-4000-8000-000000000001", cwd=tmp_path / "a", name="a")
    tmux.spawn_claude("--session-id", "7c1e9b00-0000-4000-8000-000000000002", cwd=tmp_path / "b", name="b")
    pull(cli)
    cli("project", "new", "alpha")
    task = cli("--json", "task", "add", "alpha", "write the parser").json()["id"]
    r = cli("assign", task[:6], "7c1e9b")
    assert r.code == 1 and "ambiguous" in r.err and "7c1e9b00-000" in r.err
    r = cli("assign", task[:6], "abcdef")
    assert r.code == 1 and "no session 'abcdef'" in r.err
    n_events = clare.count_events(db)
    r = cli("--json", "assign", task[:6], "7c1e9b00-0000-4000-8000-000000000002")
    assert r.code == 0 and r.json()["session_id"] == "7c1e9b00-0000-4000-8000-000000000002"
    assert clare.count_events(db) == n_events + 1
    sessions = {s["id"][-1]: s for s in cli("--json", "sessions").json()}
    assert sessions["2"]["task_id"] == task and sessions["1"]["task_id"] is None


def test_update_inside_a_claude_pane_lands_on_its_task(tmux, cli, db, tmp_path, monkeypatch):
    sid = "5e551011-0000-4000-8000-000000000001"
    pane = tmux.spawn_claude("--session-id", sid, cwd=tmp_path / "a", name="a")
    pull(cli)
    cli("project", "new", "alpha")
    task = cli("--json", "task", "add", "alpha", "parse").json()["id"]
    monkeypatch.setenv("TMUX_PANE", pane)
    r = cli("update", "parser done")
    assert r.code == 2 and "has no task" in r.err
    cli("assign", task, sid[:8])
    r = cli("--json", "update", "parser done, starting tests")
    assert r.code == 0, r.err
    assert r.json()["task_id"] == task and r.json()["session_id"] == sid
    monkeypatch.setenv("TMUX_PANE", "%99")
    r = cli("update", "lost")
    assert r.code == 1 and "no Claude session is known in tmux pane %99" in r.err


def test_group_membership_is_computed_from_patterns(tmux, cli, db, tmp_path):
    tmux.spawn_claude(cwd=tmp_path / "srv" / "api", name="api")
    tmux.spawn_claude(cwd=tmp_path / "srv" / "web", name="batch-1")
    pull(cli)
    cli("group", "add", "backend", "--cwd", "/srv/api")
    cli("group", "add", "night", "--name", "batch-*")
    [api] = clare.list_group_sessions(db, "backend")
    [web] = clare.list_group_sessions(db, "night")
    assert api.tmux_target == "api:0.0" and web.tmux_target == "batch-1:0.0"
    cli("project", "new", "alpha")
    task = cli("--json", "task", "add", "alpha", "serve").json()["id"]
    cli("assign", task, "--group", "backend")
    by_target = {s.tmux_target: s for s in clare.list_sessions(db)}
    assert by_target["api:0.0"].task_id == task and by_target["batch-1:0.0"].task_id is None


# --- recorded data: each input next to its expected result -------------------------------------

@pytest.mark.parametrize("name", ["transcript-turn-over", "transcript-interrupted", "transcript-tool-running"])
def test_transcript_reading_matches_recorded_expectation(name):
    expected = json.loads((DATA / f"{name}.expected.json").read_text())
    size, mtime_ns, info = clare.read_transcript(str(DATA / f"{name}.jsonl"), None)
    assert {k: info.get(k) for k in expected} == expected


def test_transcript_is_read_again_only_in_what_was_appended(tmp_path):
    src = (DATA / "transcript-turn-over.jsonl").read_text().rsplit("\n", 1)[0] + "\n"
    path = tmp_path / "t.jsonl"
    path.write_text(src)
    first = clare.read_transcript(str(path), None)
    assert clare.read_transcript(str(path), first) is first  # unchanged: the cache answers
    more = json.loads(src.splitlines()[-2])  # the last assistant line again: same message id
    more["message"]["id"] = "msg_C"
    more["timestamp"] = "2025-10-01T10:05:00.000Z"
    with path.open("a") as f:
        f.write(json.dumps(more) + "\n" + json.dumps({**more, "uuid": "dup"}) + "\n")
    size, _, info = clare.read_transcript(str(path), first)
    assert info["tokens"]["output"] == 90 + 40 and info["scanned_to"] == size
    assert info["turn"] == "waiting" and info["last_activity_ms"] == 1759313100000


def test_big_transcript_first_look_reads_only_its_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(clare, "TOKEN_SCAN_MAX_BYTES", 100_000)
    line = json.dumps({"type": "assistant", "message": {"id": "x", "content": "pad" * 100,
                                                        "usage": {"output_tokens": 1}}})
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(3000):
            f.write(line.replace('"x"', f'"m{i}"') + "\n")
    _, _, info = clare.read_transcript(str(path), None)
    assert info["is_partial"] and 0 < info["tokens"]["output"] < 3000


def test_parse_panes_matches_recorded_tmux_output():
    text = (DATA / "tmux-list-panes.txt").read_text()
    panes = clare.parse_panes(text, socket="/tmp/tmux-0/default")
    assert [p.to_json() for p in panes] == json.loads((DATA / "tmux-list-panes.expected.json").read_text())


@pytest.mark.parametrize("signals, expected", [
    ({"turn": "working", "turn_ms": 100}, "working"),
    ({"turn": "working", "turn_ms": 100, "hook": "waiting", "hook_ms": 200}, "waiting"),
    ({"turn": "waiting", "turn_ms": 300, "hook": "working", "hook_ms": 200}, "waiting"),  # Esc: no hook
    ({"turn": "working", "turn_ms": 100, "hook": "permission", "hook_ms": 200}, "permission"),
    ({"turn": "waiting", "turn_ms": 100, "registry": "busy", "registry_ms": 150}, "working"),
    ({"turn": "waiting", "turn_ms": 100, "shows_dialog": True}, "permission"),
    ({"turn": "waiting", "turn_ms": 100, "now_ms": 100 + 600_000}, "idle"),
    ({"turn": "working", "turn_ms": 100, "now_ms": 100 + 600_000}, "working"),
    ({}, "waiting"),
])
def test_state_is_the_newest_signal(signals, expected):
    args = {"turn": None, "turn_ms": None, "registry": None, "registry_ms": None, "hook": None,
            "hook_ms": None, "shows_dialog": False, "now_ms": 1000, "idle_after_ms": 600_000, **signals}
    assert clare.derive_state(**args) == expected


@pytest.mark.parametrize("screen, expected", [
    ("Bash command\n  rm -rf build\nDo you want to proceed?\n\u276f 1. Yes\n  2. No\n", True),
    ("Do you want to make this edit to parser.py?\n> 1. Yes\n", True),
    ("> run the tests and commit\n", False),
    ("\u2733 Done. Say yes to continue\n", False),
])
def test_permission_dialog_is_recognised_on_screen(screen, expected):
    assert clare.shows_permission_dialog(screen) is expected


@pytest.mark.parametrize("cwd, slug", [("/srv/my_app.v2", "-srv-my-app-v2"), ("/home/ana/x y", "-home-ana-x-y")])
def test_cwd_slug_replaces_every_other_character(cwd, slug):
    assert clare.cwd_slug(cwd) == slug


def test_session_id_from_command_line_flags():
    sid = "0b7d5d1e-8f3c-4c4e-9d55-1e2f3a4b5c6d"
    assert clare.session_id_from_argv(["claude", "--resume", sid]) == sid
    assert clare.session_id_from_argv(["node", "cli.js", f"--session-id={sid}"]) == sid
    assert clare.session_id_from_argv(["claude", "-r"]) is None
    assert clare.session_id_from_argv(["claude", "--resume", "not-a-uuid"]) is None


def test_session_events_replay_to_the_same_tables(db):
    obs = clare.Observation("0b7d5d1e-8f3c-4c4e-9d55-1e2f3a4b5c6d", "/srv", None, None, None, 1, "claude",
                            "working", 1000, "", {"output": 3})
    clare.observe_sessions(db, [obs], now_ms=1000)
    clare.observe_sessions(db, [clare.Observation(**{**{k: getattr(obs, k) for k in obs.__slots__},
                                                     "state": "waiting"})], now_ms=2000)
    clare.observe_sessions(db, [], now_ms=3000)
    before = clare.projection_digest(db)
    clare.replay(db)
    assert clare.projection_digest(db) == before
    assert [s.state for s in clare.list_sessions(db, include_gone=True)] == ["gone"]


# --- hooks -----------------------------------------------------------------------------------------

SID = "9d1c2b3a-4e5f-4a6b-8c7d-0e1f2a3b4c5d"


def hook_payload(event: str, **fields) -> str:
    """A hook report as Claude Code sends it on stdin."""
    return json.dumps({"session_id": SID, "transcript_path": f"/home/ana/.claude/projects/-srv-api/{SID}.jsonl",
                       "cwd": "/srv/api", "hook_event_name": event, "permission_mode": "default", **fields})


def test_hooks_install_keeps_the_users_hooks_and_twice_changes_nothing(cli, home):
    settings = Path(os.environ["HOME"]) / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    user_hook = {"matcher": "Bash", "hooks": [{"type": "command", "command": "~/bin/audit.sh"}]}
    settings.write_text(json.dumps({"model": "opus", "hooks": {"PreToolUse": [user_hook]}}))
    assert cli("hooks", "install").code == 0
    installed = settings.read_bytes()
    config = json.loads(installed)
    assert config["model"] == "opus" and config["hooks"]["PreToolUse"][0] == user_hook
    assert set(config["hooks"]) == set(clare.HOOK_EVENTS)
    [ours] = config["hooks"]["Stop"][0]["hooks"]
    assert ours["async"] is True and ours["command"].endswith(" hook") and "clare.py" in ours["command"]
    r = cli("hooks", "install")
    assert "already" in r.out and settings.read_bytes() == installed
    assert set(cli("--json", "hooks", "status").json()["events"].values()) == {"installed"}
    assert cli("hooks", "uninstall").code == 0
    assert json.loads(settings.read_text()) == {"model": "opus", "hooks": {"PreToolUse": [user_hook]}}
    assert set(cli("--json", "hooks", "status").json()["events"].values()) == {"missing"}


def test_hooks_install_refuses_a_broken_settings_file_and_leaves_it(cli, home):
    settings = Path(os.environ["HOME"]) / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text('{"hooks": {')
    r = cli("hooks", "install")
    assert r.code == 1 and "not valid JSON" in r.err and settings.read_text() == '{"hooks": {'


def test_hook_reports_set_the_exact_state_and_bind_the_pane(run_clare, db):
    env = {"TMUX_PANE": "%7", "TMUX": "/tmp/tmux-1000/default,4242,0"}
    for event, fields, state in [("SessionStart", {"source": "startup"}, "waiting"),
                                 ("UserPromptSubmit", {"prompt": "go"}, "working"),
                                 ("PermissionRequest", {"tool_name": "Bash"}, "permission"),
                                 ("PreToolUse", {"tool_name": "Bash"}, "working"),
                                 ("Notification", {"notification_type": "permission_prompt"}, "permission"),
                                 ("Stop", {"last_assistant_message": "done"}, "waiting")]:
        r = run_clare("hook", input=hook_payload(event, **fields), env=env)
        assert (r.code, r.out, r.err) == (0, "", "")
        [s] = clare.list_sessions(db)
        assert (s.state, s.pane_id, s.tmux_socket, s.cwd) == (state, "%7", "/tmp/tmux-1000/default", "/srv/api")
    n_events = clare.count_events(db)
    run_clare("hook", input=hook_payload("PreToolUse", agent_id="a1", tool_name="Read"), env=env)
    run_clare("hook", input=hook_payload("Stop"), env=env)  # same state: no event
    run_clare("hook", input="not json", env=env)
    assert clare.count_events(db) == n_events
    run_clare("hook", input=hook_payload("SessionEnd", reason="logout"), env=env)
    assert clare.list_sessions(db) == [] and clare.list_sessions(db, include_gone=True)[0].state == "gone"


def test_hook_under_a_write_lock_exits_at_once_and_pull_ingests_its_report(run_clare, db, cli, tmux):
    holder = clare.open_db(db.path)
    holder.conn.execute("BEGIN IMMEDIATE")
    try:
        r = run_clare("hook", input=hook_payload("PermissionRequest", tool_name="Bash"), timeout=10)
        assert (r.code, r.out, r.err) == (0, "", "")
    finally:
        holder.conn.execute("ROLLBACK")
        holder.close()
    spooled = list((Path(db.path).parent / "spool").glob("*.json"))
    assert len(spooled) == 1 and clare.list_sessions(db) == []
    assert cli("--json", "hooks", "status").json()["spooled"] == 1
    pull(cli)
    assert not list((Path(db.path).parent / "spool").glob("*.json"))
    [ev] = [e for e in session_events(db) if e.event_type == "session.appeared"]
    assert ev.payload["state"] == "permission"


def test_hook_without_a_database_spools_and_creates_nothing_else(run_clare, home):
    r = run_clare("hook", input=hook_payload("Stop"))
    assert r.code == 0 and not (home / "clare.db").exists()
    assert len(list((home / "spool").glob("*.json"))) == 1


def test_installed_hooks_run_by_claude_record_state_before_any_pull(tmux, cli, db, tmp_path):
    cli("hooks", "install")
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    [s] = wait_for(lambda: clare.list_sessions(db), what="the SessionStart hook to record the session")
    assert s.pane_id == pane and s.state == "waiting" and s.tmux_target is None
    tmux.type_prompt(pane, "perm")
    wait_for(lambda: clare.list_sessions(db)[0].state == "permission", what="the PermissionRequest hook")
    pull(cli)
    [s] = clare.list_sessions(db)
    assert s.state == "permission" and s.tmux_target == "work:0.0"
