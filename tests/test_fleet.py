"""Fleet: Claude Code sessions in real tmux panes (a private server per test) with a fake claude."""

import json
import os
from pathlib import Path

import pytest

import clare
from conftest import projection_digest, seeds, wait_for

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
    tmux.wait_settled(1)
    assert pull(cli)["changed"] == 1
    assert cli("--json", "sessions").json()[0]["state"] == "working"
    assert pull(cli)["events"] == 0
    tmux.run("send-keys", "-t", pane, "Escape")  # an interrupt: no hook fires, the transcript shows it
    wait_for(lambda: "interrupted" in next((tmux.claude_dir / "projects").glob("*/*.jsonl")).read_text(),
             what="the interrupt marker")
    pull(cli)
    assert cli("--json", "sessions").json()[0]["state"] == "waiting"
    tmux.type_prompt(pane, "thanks")
    tmux.wait_settled(2)
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
    tmux.wait_settled(1)
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


def test_two_panes_claiming_one_session_are_ambiguous_and_nothing_is_typed_into_either(tmux, cli, tmp_path):
    sid = "0b7d5d1e-8f3c-4c4e-9d55-1e2f3a4b5c6d"
    a = tmux.spawn_claude("--no-registry", "--session-id", sid, cwd=tmp_path / "p1", name="a")
    b = tmux.spawn_claude("--no-registry", "--resume", sid, cwd=tmp_path / "p1", name="b")
    result = pull(cli)
    assert {p["pane_id"] for p in result["ambiguous"]} == {a, b}
    [s] = cli("--json", "sessions").json()
    assert s["id"] == sid and (s["pane_id"], s["tmux_target"]) == (None, None)
    text = cli("sessions").out
    assert f"? pane {a} (a:0.0)" in text and f"? pane {b} (b:0.0)" in text
    r = cli("--json", "broadcast", f"session:{sid}", "--yes", "--", "which one?")
    assert r.code == 1 and r.json()["deliveries"][0]["result"] == "refused"
    assert tmux.received() == []


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
    wait_for(lambda: pane not in tmux.run("list-panes", "-a", "-F", "#{pane_id}", check=False),
             what="the pane to close")
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
    before = projection_digest(db)
    clare.replay(db)
    assert projection_digest(db) == before
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
    assert ours["async"] is True and ours["command"].endswith(" hook") and "import clare" in ours["command"]
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


def _spool(db_path: str, event: str, *, at_ms: int, **fields) -> str:
    report = {"payload": json.loads(hook_payload(event, **fields)), "tmux_pane": None, "tmux_socket": None,
              "at_ms": at_ms}
    return clare.spool_report(db_path, report)


def test_pull_skips_a_spooled_report_another_pull_took_meanwhile(cli, db):
    path = Path(_spool(db.path, "UserPromptSubmit", at_ms=clare.now_ms(), prompt="go"))
    taken = path.parent / "0000000000000-1-taken.json"  # listed, then gone when opened
    taken.symlink_to(path.parent / "removed-by-the-other-pull.json")
    r = cli("--json", "pull")
    assert r.code == 0, r.err
    [s] = clare.list_sessions(db)
    assert s.state == "working" and not path.exists()


def test_two_pulls_ingesting_one_spool_at_once_both_finish(home, db):
    import threading
    now = clare.now_ms()
    for i in range(200):
        _spool(db.path, "UserPromptSubmit" if i % 2 else "Stop", at_ms=now + i, prompt="go")
    errors = []

    def ingest():
        mine = clare.open_db(db.path)
        try:
            clare.ingest_spool(mine, now_ms=now + 1000)
        except OSError as err:  # what a racing pull met, reported below
            errors.append(repr(err))
        finally:
            mine.close()
    threads = [threading.Thread(target=ingest) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert not list((home / "spool").glob("*.json"))
    [s] = clare.list_sessions(db)
    assert s.state == "working"  # the newest report (i = 199)


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


# --- broadcast ---------------------------------------------------------------------------------------

HOSTILE = ("it's \"quoted\" $(touch {marker}) `touch {marker}`; touch {marker} & echo ünïcödé ✓ 'single'\n"
           "second line \\ with a backslash\n\tindented third; exit")


def test_broadcast_types_hostile_multiline_text_literally(tmux, cli, db, tmp_path):
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    [s] = pull(cli)["sessions"]
    marker = tmp_path / "pwned"
    text = HOSTILE.format(marker=marker)
    r = cli("--json", "broadcast", f"session:{s['id'][:8]}", "--yes", "--", text)
    assert r.code == 0, r.err
    [d] = r.json()["deliveries"]
    assert (d["result"], d["session_id"], d["tmux_target"]) == ("delivered", s["id"], "work:0.0")
    assert [x["prompt"] for x in tmux.received()] == [text.replace("\t", "    ")]  # as Claude stores a TAB
    assert not marker.exists()
    results = [ev.payload["result"] for ev in clare.iter_events(db) if ev.event_type == "broadcast.delivered"]
    assert results == ["delivered"]
    assert "clare-" not in tmux.run("list-buffers")  # the named buffer was dropped
    assert tmux.capture(pane)  # the pane still runs


def test_broadcast_crlf_and_command_marks_are_normalised(tmux, cli, tmp_path):
    tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    [s] = pull(cli)["sessions"]
    cli("broadcast", f"session:{s['id']}", "--yes", "--", "/clear\r\nnow\x1b[201~ typed")
    cli("broadcast", f"session:{s['id']}", "--yes", "--command", "--", "/compact")
    assert [x["prompt"] for x in tmux.received()] == ["[clare] /clear\nnow[201~ typed", "/compact"]


def test_broadcast_is_refused_while_a_permission_dialog_shows(tmux, cli, db, tmp_path):
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    tmux.type_prompt(pane, "perm")
    wait_for(lambda: "Do you want to proceed?" in tmux.capture(pane), what="the dialog")
    [s] = pull(cli)["sessions"]
    r = cli("--json", "broadcast", f"session:{s['id']}", "--yes", "--", "go on")
    assert r.code == 1
    [d] = r.json()["deliveries"]
    assert d["result"] == "refused" and "permission" in d["reason"]
    assert not any(x.get("approved") for x in tmux.received())
    assert "go on" not in tmux.capture(pane)


def test_broadcast_is_refused_when_the_pane_no_longer_runs_claude(tmux, cli, tmp_path):
    import shlex
    import sys

    from conftest import FAKE_CLAUDE
    line = (f"(exec -a claude {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_CLAUDE))}); "
            "exec bash --norc --noprofile")
    pane = tmux.spawn("bash", "-c", line, cwd=tmp_path / "proj", name="work")
    wait_for(lambda: "fake claude" in tmux.capture(pane), what="fake claude")
    [s] = pull(cli)["sessions"]
    os.kill(s["pid"], 15)
    wait_for(lambda: not clare.proc_argv(s["pid"]), what="claude to exit")
    marker = tmp_path / "ran"
    r = cli("--json", "broadcast", f"session:{s['id']}", "--yes", "--", f"touch {marker}")
    [d] = r.json()["deliveries"]
    assert r.code == 1 and d["result"] == "refused" and "does not run Claude" in d["reason"]
    assert not marker.exists()


def test_broadcast_to_a_project_reaches_its_sessions_and_asks_first(tmux, cli, db, tmp_path):
    tmux.spawn_claude(cwd=tmp_path / "srv" / "api", name="api")
    tmux.spawn_claude(cwd=tmp_path / "srv" / "web", name="web")
    tmux.spawn_claude(cwd=tmp_path / "other", name="other")
    pull(cli)
    by_target = {s.tmux_target: s for s in clare.list_sessions(db)}
    cli("project", "new", "alpha")
    t1 = cli("--json", "task", "add", "alpha", "api").json()["id"]
    t2 = cli("--json", "task", "add", "alpha", "web").json()["id"]
    cli("assign", t1, by_target["api:0.0"].id)
    cli("group", "add", "webs", "--cwd", "/srv/web")
    cli("assign", t2, "--group", "webs")
    n_events = clare.count_events(db)
    r = cli("broadcast", "alpha", "--", "run the tests")  # no terminal here, no --yes
    assert r.code == 2 and "add --yes" in r.err and "api:0.0" in r.err and "other:0.0" not in r.err
    assert clare.count_events(db) == n_events and tmux.received() == []
    r = cli("--json", "broadcast", "alpha", "--yes", "--", "run the tests")
    assert r.code == 0
    assert sorted(d["tmux_target"] for d in r.json()["deliveries"]) == ["api:0.0", "web:0.0"]
    assert len(tmux.received()) == 2 and {x["prompt"] for x in tmux.received()} == {"run the tests"}


def test_broadcast_to_a_busy_session_is_queued(tmux, cli, db, tmp_path):
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    tmux.type_prompt(pane, "work")
    tmux.wait_settled(1)
    [s] = pull(cli)["sessions"]
    assert s["state"] == "working"
    result = clare.send_broadcast(db, f"session:{s['id']}", "after this, commit", now_ms=clare.now_ms(),
                                  confirm_s=0.5)
    [d] = result.deliveries
    assert d.result == "queued" and "busy" in d.reason
    assert tmux.received()[-1] == {"session_id": s["id"], "queued": "after this, commit"}


def test_broadcast_from_another_host_is_delivered_by_the_owner_on_pull_unless_expired(tmux, cli, db, tmp_path):
    tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    [s] = pull(cli)["sessions"]
    now = clare.now_ms()

    def sent(text: str, expires_ms: int) -> str:
        return json.dumps({"uuid": str(__import__("uuid").uuid4()),
                           "hlc": f"{now:013d}.000000.otherhost", "machine_id": "otherhost",
                           "event_type": "broadcast.sent", "created_at": clare.iso_ms(now),
                           "payload": {"broadcast_id": clare.new_id(), "target": f"session:{s['id']}",
                                       "text": text, "expires_at": clare.iso_ms(expires_ms),
                                       "session_ids": [s["id"]]}})
    (tmp_path / "in.jsonl").write_text(sent("from afar", now + 60_000) + "\n" + sent("too old", now - 1) + "\n")
    assert cli("import", str(tmp_path / "in.jsonl")).code == 0
    assert {d.result for d in clare.list_deliveries(db)} == {"queued"}
    pull(cli)
    assert [x["prompt"] for x in tmux.received()] == ["from afar"]
    assert sorted(d.result for d in clare.list_deliveries(db)) == ["delivered", "expired"]
    pull(cli)
    assert len(tmux.received()) == 1  # delivered once


def _sent_line(session_id: str, text: str, *, hlc_ms: int, expires_ms: int, host: str = "otherhost") -> str:
    """Return a broadcast.sent event of another host as one JSON line, as `clare import` reads it."""
    import uuid
    return json.dumps({"uuid": str(uuid.uuid4()), "hlc": f"{hlc_ms:013d}.000000.{host}", "machine_id": host,
                       "event_type": "broadcast.sent", "created_at": clare.iso_ms(hlc_ms),
                       "payload": {"broadcast_id": clare.new_id(), "target": f"session:{session_id}", "text": text,
                                   "expires_at": clare.iso_ms(expires_ms), "session_ids": [session_id]}})


def test_broadcast_from_a_host_whose_clock_runs_ahead_is_typed_once(tmux, cli, db, tmp_path):
    tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    [s] = pull(cli)["sessions"]
    now = clare.now_ms()
    ahead = now + 2 * clare.MAX_OFFSET_MS  # the receipt's HLC, capped at now + MAX_OFFSET, is older than this
    (tmp_path / "in.jsonl").write_text(_sent_line(s["id"], "from the future", hlc_ms=ahead,
                                                  expires_ms=ahead + 60_000) + "\n")
    assert cli("import", str(tmp_path / "in.jsonl")).code == 0
    pull(cli)
    pull(cli)
    assert [x["prompt"] for x in tmux.received()] == ["from the future"]
    assert [d.result for d in clare.list_deliveries(db)] == ["delivered"]


def test_a_peers_broadcast_that_could_escape_the_paste_is_refused_at_import(cli, db, tmp_path):
    sid = "5e551011-0000-4000-8000-000000000001"
    now = clare.now_ms()
    f = tmp_path / "in.jsonl"
    f.write_text(_sent_line(sid, "hi\x1b[201~rm -rf ~\r", hlc_ms=now, expires_ms=now + 60_000) + "\n")
    r = cli("import", str(f))
    assert r.code == 1 and "line 1: broadcast.sent payload has a bad text" in r.err
    assert clare.list_deliveries(db) == []


def test_a_stored_peer_broadcast_is_stripped_of_control_characters_when_typed(tmux, cli, db, tmp_path):
    tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    [s] = pull(cli)["sessions"]
    now = clare.now_ms()
    line = _sent_line(s["id"], "one\x1b[201~two\x07\r\nthree", hlc_ms=now, expires_ms=now + 60_000)
    with clare.write_txn(db) as cur:  # as a log from before the check holds it: received, never checked
        clare.receive_events(db, cur, [clare.check_event(json.loads(line))], now_ms=now)
    pull(cli)
    assert [x["prompt"] for x in tmux.received()] == ["one[201~two\nthree"]


# --- pane tails, triage, roll-up, rclaude ------------------------------------------------------------

def test_pull_tails_stores_assigned_pane_tails_and_triage_only_when_changed(tmux, cli, db, home, tmp_path):
    import shlex
    import sys
    stub = tmp_path / "triage.py"
    stub.write_text("import sys\n"
                    "print('triage: ' + [x for x in sys.stdin.read().splitlines() if x.startswith('> ')][-1])\n")
    (home / "clare.toml").write_text(f"[triage]\ncommand = {json.dumps(shlex.join([sys.executable, str(stub)]))}\n")
    pane = tmux.spawn_claude(cwd=tmp_path / "a", name="a")
    tmux.spawn_claude(cwd=tmp_path / "b", name="b")  # not assigned: no tail
    pull(cli)
    [s] = [s for s in clare.list_sessions(db) if s.pane_id == pane]
    cli("project", "new", "alpha")
    task = cli("--json", "task", "add", "alpha", "parse").json()["id"]
    cli("assign", task, s.id)
    tmux.type_prompt(pane, "half typed")  # stays on screen as the last prompt
    tmux.wait_settled(1)
    tmux.run("send-keys", "-t", pane, "-l", "draft")
    wait_for(lambda: "> draft" in tmux.capture(pane), what="the draft")
    r = cli("--json", "pull", "--tails")
    assert r.code == 0, r.err
    updates = r.json()["updates"]
    assert [u["source"] for u in updates] == ["pane-tail", "triage"]
    assert updates[0]["task_id"] == task and "> draft" in updates[0]["text"]
    assert updates[1]["text"] == "triage: > draft"
    assert cli("--json", "pull", "--tails").json()["updates"] == []
    tmux.run("send-keys", "-t", pane, "-l", " more")
    wait_for(lambda: "draft more" in tmux.capture(pane), what="more text")
    assert len(cli("--json", "pull", "--tails").json()["updates"]) == 2
    assert [u.source for u in clare.list_updates(db, task_ids=[task])].count("pane-tail") == 2


def test_status_rolls_up_tokens_per_project_and_shows_each_sessions_task(tmux, cli, db, tmp_path):
    a = tmux.spawn_claude(cwd=tmp_path / "srv" / "api", name="api")
    b = tmux.spawn_claude(cwd=tmp_path / "srv" / "web", name="web")
    for pane in (a, b):
        tmux.type_prompt(pane, "hello")
    tmux.wait_settled(2)
    pull(cli)
    by_pane = {s.pane_id: s for s in clare.list_sessions(db)}
    cli("project", "new", "alpha")
    cli("project", "new", "beta")
    t1 = cli("--json", "task", "add", "alpha", "api work").json()["id"]
    t2 = cli("--json", "task", "add", "beta", "web work").json()["id"]
    cli("assign", t1, by_pane[a].id)
    cli("group", "add", "webs", "--cwd", "/srv/web")
    cli("assign", t2, "--group", "webs")
    report = cli("--json", "status").json()
    per_project = {p["name"]: p for p in report["projects"]}
    one = {"input": 10, "output": 5, "cache_creation": 100, "cache_read": 1000}
    assert per_project["alpha"]["tokens"] == one and per_project["alpha"]["n_sessions"] == 1
    assert per_project["beta"]["tokens"] == one
    assert {s["tmux_target"]: s["task_id"] for s in report["sessions"]} == {"api:0.0": t1, "web:0.0": t2}
    assert {t["id"]: t["tokens"] for t in report["tasks"]} == {t1: one, t2: one}
    only = cli("--json", "status", "--group", "webs").json()
    assert [p["name"] for p in only["projects"]] == ["beta"] and len(only["sessions"]) == 1
    text = cli("status", "--project", "alpha").out
    assert "api work" in text and "1.1k" in text and "web work" not in text
    assert cli("status", "--project", "alpha", "--group", "webs").code == 2


def test_rclaude_adapter_tells_apart_panes_that_share_a_cwd(tmux, cli, db, home, tmp_path):
    import shlex
    import sys
    ids = {"a:0.0": "aaaaaaaa-0000-4000-8000-000000000001", "b:0.0": "bbbbbbbb-0000-4000-8000-000000000002"}
    for target, sid in ids.items():
        tmux.spawn_claude("--no-registry", cwd=tmp_path / "proj", name=target[0],
                          env={"FAKE_CLAUDE_SESSION_ID": sid})
    assert len(pull(cli)["ambiguous"]) == 2
    lines = [{"uuid": sid, "cwd": str(tmp_path / "proj"), "host": "testhost", "tmux_target": t,
              "last_seen_ms": 1} for t, sid in ids.items()]
    lines.append({"uuid": "cccccccc-0000-4000-8000-000000000003", "host": "elsewhere", "tmux_target": "a:0.0"})
    out = tmp_path / "rclaude.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    command = shlex.join([sys.executable, "-c", f"print(open({str(out)!r}).read(), end='')"])
    (home / "clare.toml").write_text(f"[rclaude]\nsessions_command = {json.dumps(command)}\n")
    result = pull(cli)
    assert result["ambiguous"] == [] and {s["tmux_target"]: s["id"] for s in result["sessions"]} == ids
    (home / "clare.toml").write_text('[rclaude]\nsessions_command = "/nonexistent/rclaude ls"\n')
    r = cli("pull")
    assert r.code == 0 and "warning: rclaude sessions_command failed" in r.err


def test_hooks_install_replaces_an_older_clare_hook_instead_of_adding_a_second(cli, home):
    settings = Path(os.environ["HOME"]) / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    old = {"type": "command", "command": "python3 /opt/old/clare.py hook"}
    mine = {"type": "command", "command": "notify-send done"}
    settings.write_text(json.dumps({"hooks": {"Stop": [{"matcher": "", "hooks": [old, mine]}]}}))
    assert cli("--json", "hooks", "status").json()["events"]["Stop"] == "outdated"
    cli("hooks", "install")
    stop = json.loads(settings.read_text())["hooks"]["Stop"]
    commands = [h["command"] for g in stop for h in g["hooks"]]
    assert commands[0] == "notify-send done" and len(commands) == 2 and "import clare" in commands[1]


def test_hook_binding_tells_apart_panes_that_share_a_cwd(tmux, cli, db, tmp_path):
    cli("hooks", "install")
    a = tmux.spawn_claude("--no-registry", cwd=tmp_path / "proj", name="a")
    b = tmux.spawn_claude("--no-registry", cwd=tmp_path / "proj", name="b")
    wait_for(lambda: len(clare.list_sessions(db)) == 2, what="both SessionStart hooks")
    result = pull(cli)
    assert result["ambiguous"] == []
    assert {s["pane_id"]: s["tmux_target"] for s in result["sessions"]} == {a: "a:0.0", b: "b:0.0"}


def test_claude_outside_tmux_is_seen_through_its_registry_entry(cli, db, home, tmp_path):
    import pty
    import signal
    import subprocess
    import sys

    from conftest import FAKE_CLAUDE
    master, slave = pty.openpty()
    (tmp_path / "proj").mkdir()
    p = subprocess.Popen(["claude", str(FAKE_CLAUDE)], executable=sys.executable, stdin=slave, stdout=slave,
                         stderr=slave, cwd=tmp_path / "proj", start_new_session=True)
    try:
        registry = Path(os.environ["HOME"]) / ".claude" / "sessions" / f"{p.pid}.json"
        wait_for(registry.exists, what="the registry entry")
        [s] = pull(cli)["sessions"]
        assert (s["pid"], s["tmux_target"], s["pane_id"], s["cwd"]) == (p.pid, None, None, str(tmp_path / "proj"))
        r = cli("--json", "broadcast", f"session:{s['id']}", "--yes", "--", "hi")
        assert r.json()["deliveries"][0]["result"] == "refused"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
        os.close(master)
        os.close(slave)
    assert pull(cli)["gone"] == 1


def test_broadcast_leaves_copy_mode_first(tmux, cli, tmp_path):
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    [s] = pull(cli)["sessions"]
    tmux.run("copy-mode", "-t", pane)
    assert tmux.run("display", "-p", "-t", pane, "#{pane_in_mode}").strip() == "1"
    r = cli("--json", "broadcast", f"session:{s['id']}", "--yes", "--", "look again")
    assert r.json()["deliveries"][0]["result"] == "delivered"
    assert [x["prompt"] for x in tmux.received()] == ["look again"]


def test_screens_of_several_panes_are_captured_in_one_run_and_kept_apart(tmux, cli, db, tmp_path):
    a = tmux.spawn_claude(cwd=tmp_path / "a", name="a")
    b = tmux.spawn_claude(cwd=tmp_path / "b", name="b")
    tmux.type_prompt(b, "perm")
    wait_for(lambda: "Do you want to proceed?" in tmux.capture(b), what="the dialog in b")
    screens = clare.capture_panes(tmux.socket, [a, b, "%999"])
    assert "Do you want to proceed?" in screens[b] and "Do you want" not in screens[a] and "%999" not in screens
    pull(cli)
    assert {s.pane_id: s.state for s in clare.list_sessions(db)} == {a: "waiting", b: "permission"}


def test_serve_pulls_the_fleet_in_the_background(tmux, db, home, tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import CLARE_PY
    (home / "clare.toml").write_text("[fleet]\npull_every_s = 0.2\n")
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    p = subprocess.Popen([sys.executable, str(CLARE_PY), "serve", "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        [s] = wait_for(lambda: clare.list_sessions(db), what="serve's background pull")
        assert s.pane_id == pane and s.state == "waiting"
        tmux.type_prompt(pane, "work")
        wait_for(lambda: clare.list_sessions(db)[0].state == "working", what="the next background pull")
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    assert p.returncode == 0 and "stopped" in out and "pull failed" not in err


def test_broadcast_through_the_api_and_the_remote_cli(tmux, server, cli, db, tmp_path):
    tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    [s] = pull(cli)["sessions"]
    target = f"session:{s['id'][:8]}"
    r = server.request("GET", f"/api/v1/broadcast/recipients?target={target}")
    assert [x["id"] for x in r.json()] == [s["id"]]
    r = server.request("POST", "/api/v1/broadcast", json_body={"target": target, "text": "from the API"})
    assert r.status == 201 and r.json()["deliveries"][0]["result"] == "delivered"
    r = cli("--remote", server.url, "--json", "broadcast", target, "--yes", "--", "from afar; $(x)")
    assert r.code == 0, r.err
    assert [x["prompt"] for x in tmux.received()] == ["from the API", "from afar; $(x)"]
    bid = r.json()["broadcast_id"]
    assert [d["result"] for d in server.request("GET", f"/api/v1/deliveries?broadcast={bid}").json()] == ["delivered"]
    assert server.request("POST", "/api/v1/broadcast", json_body={"target": "nope", "text": "x"}).status == 404


@pytest.mark.parametrize("line, turn", [
    ({"type": "user", "message": {"role": "user", "content": "fix it"}}, "working"),
    ({"type": "user", "message": {"role": "user", "content": [{"type": "tool_result", "content": "ok"}]}}, "working"),
    ({"type": "user", "message": {"role": "user", "content": "<command-name>/model</command-name>"}}, None),
    ({"type": "user", "isMeta": True, "message": {"role": "user", "content": "Caveat: ..."}}, None),
    ({"type": "user", "isSidechain": True, "message": {"role": "user", "content": "sub-agent"}}, None),
    ({"type": "assistant", "message": {"content": [{"type": "tool_use", "name": "Bash"}]}}, "working"),
    ({"type": "assistant", "message": {"content": [{"type": "text", "text": "done"}]}}, "waiting"),
    ({"type": "system", "subtype": "turn_duration", "durationMs": 5}, "waiting"),
    ({"type": "system", "subtype": "compact_boundary"}, None),
    ({"type": "file-history-snapshot"}, None),
])
def test_what_one_transcript_line_says_of_the_turn(line, turn):
    assert clare.turn_of_line(line) == turn


@pytest.mark.parametrize("seed", seeds(5, "fleet-any-order"), ids=lambda s: f"seed={s}")
def test_fleet_events_in_any_order_give_the_tables_of_a_replay(seed, tmp_path):
    import random
    rng = random.Random(seed)
    src = clare.open_db(str(tmp_path / "src.db"), machine_id="alpha")
    ids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(3)]
    now = 1_700_000_000_000
    for step in range(12):
        now += 1000
        seen = [clare.Observation(sid, "/srv", None, f"w:{i}.0", f"%{i}", 100 + i, "claude",
                                  rng.choice(["working", "waiting", "permission"]), now, rng.choice(["", "t"]),
                                  {"output": step}) for i, sid in enumerate(ids) if rng.random() < 0.8]
        clare.observe_sessions(src, seen, now_ms=now)
        mark = clare.HookMark(None, "%0", rng.choice(["working", "waiting"]), "Stop", now + 1)
        clare.report_hook(src, ids[0], mark, cwd="/srv", now_ms=now + 1)
    live = [s.id for s in clare.list_sessions(src)] or ids[:1]
    bid, _, _ = clare.start_broadcast(src, f"session:{live[0]}", "hi", now_ms=now + 2)
    clare.record_delivery(src, bid, live[0], result="delivered", reason="", now_ms=now + 3)
    # A sender whose clock runs ahead: its send has a newer HLC than the owner's receipt.
    skewed = clare.check_received(json.loads(_sent_line(live[0], "skewed", hlc_ms=now + 3 * clare.MAX_OFFSET_MS,
                                                        expires_ms=now + 4 * clare.MAX_OFFSET_MS, host="gamma")))
    with clare.write_txn(src) as cur:
        clare.receive_events(src, cur, [skewed], now_ms=now + 4)
    skewed_id = skewed.payload["broadcast_id"]
    clare.record_delivery(src, skewed_id, live[0], result="delivered", reason="", now_ms=now + 5)
    assert [d.result for d in clare.list_deliveries(src, broadcast_id=skewed_id)] == ["delivered"]
    events = list(clare.iter_events(src))
    expected = projection_digest(src)
    for n in range(3):
        dst = clare.open_db(str(tmp_path / f"dst{n}.db"), machine_id="beta")
        order = events[:]
        rng.shuffle(order)
        with clare.write_txn(dst) as cur:
            clare.receive_events(dst, cur, order, now_ms=now)
        for _ in range(2):  # as received in this order, then as a replay rebuilds it
            got = projection_digest(dst)
            assert {t: got[t] for t in ("sessions", "broadcasts", "deliveries")} == \
                   {t: expected[t] for t in ("sessions", "broadcasts", "deliveries")}
            clare.replay(dst)
        dst.close()
    src.close()


def test_a_registered_claude_is_found_whatever_its_argv0(tmux, cli, tmp_path):
    import shlex
    import sys

    from conftest import FAKE_CLAUDE
    line = f"exec -a 2.0.14 {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_CLAUDE))}"  # a versioned binary
    pane = tmux.spawn("bash", "-c", line, cwd=tmp_path / "proj", name="work")
    wait_for(lambda: list((tmux.claude_dir / "sessions").glob("*.json")), what="the registry entry")
    [s] = pull(cli)["sessions"]
    assert s["pane_id"] == pane and s["command"].startswith("2.0.14 ")


def test_a_session_known_only_from_hooks_is_not_gone_at_every_pull(run_clare, cli, db, tmux):
    assert run_clare("hook", input=hook_payload("UserPromptSubmit", prompt="go")).code == 0  # no tmux, no registry
    for _ in range(2):
        assert pull(cli)["events"] == 0
    [s] = clare.list_sessions(db)
    assert s.state == "working"
    run_clare("hook", input=hook_payload("SessionEnd", reason="exit"))
    assert clare.list_sessions(db) == [] and pull(cli)["events"] == 0
