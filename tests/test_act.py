"""Act: a page per session (its live pane, from any host), the way into it, notifications, needs-you."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import clare
from conftest import CLARE_PY, observe, projection_digest, wait_for

S1, S2, S3 = ("aaaa0001-0000-4000-8000-000000000001", "bbbb0002-0000-4000-8000-000000000002",
              "cccc0003-0000-4000-8000-000000000003")
TOKEN = "act-token-" + "x" * 20


def hook(db, session_id: str, event: str, *, at_ms: int, **fields) -> list:
    """Ingest one hook report as `clare hook` would."""
    payload = {"session_id": session_id, "hook_event_name": event, "cwd": "/srv/app", **fields}
    return clare.ingest_report(db, {"payload": payload, "tmux_pane": "%1", "tmux_socket": "/tmp/s", "at_ms": at_ms},
                               now_ms=at_ms)


def get(served, path: str, **headers) -> str:
    r = served.request("GET", path, headers=headers)
    assert r.status == 200, (path, r.status, r.body[:300])
    return r.text


# --- what a permission dialog asks ------------------------------------------------------------

def test_permission_request_keeps_what_it_asks_with_the_state_until_the_dialog_ends(db):
    hook(db, S1, "SessionStart", at_ms=1000, source="startup")
    hook(db, S1, "PermissionRequest", at_ms=2000, tool_name="Bash",
         tool_input={"command": "rm -rf build", "description": "clean"})
    [s] = clare.list_sessions(db)
    assert (s.state, s.asked) == ("permission", {"tool": "Bash", "input": "rm -rf build"})
    hook(db, S1, "Notification", at_ms=2500, notification_type="permission_prompt")  # still the same dialog
    assert clare.list_sessions(db)[0].asked == {"tool": "Bash", "input": "rm -rf build"}
    hook(db, S1, "PreToolUse", at_ms=3000, tool_name="Bash", tool_input={"command": "rm -rf build"})
    [s] = clare.list_sessions(db)
    assert (s.state, s.asked) == ("working", None)
    hook(db, S1, "PermissionRequest", at_ms=4000, tool_name="Edit", tool_input={"file_path": "/srv/app/x.py"})
    assert clare.list_sessions(db)[0].asked == {"tool": "Edit", "input": "/srv/app/x.py"}
    before = projection_digest(db)
    clare.replay(db)
    assert projection_digest(db) == before  # the asked field replays like every other
    assert "asks Edit: '/srv/app/x.py'" in clare.format_history(clare.list_history(db, [S1]))


def test_what_is_asked_is_cut_to_size_and_only_text_is_kept():
    asked = clare.asked_of({"tool_name": "Bash", "tool_input": {"command": "x" * 5000}})
    assert asked == {"tool": "Bash", "input": "x" * clare.MAX_ASKED_CHARS}
    assert clare.asked_of({"tool_name": 7, "tool_input": {"n": [1, 2]}}) == {"tool": "?", "input": '{"n": [1, 2]}'}


def test_a_peer_event_with_a_malformed_asked_field_is_refused(db):
    ev = clare.Event("11111111-1111-4111-8111-111111111111", "0000000001000.000000.peer", "peer", "session.changed",
                     {"session_id": S1, "host": "peer", "asked": {"tool": "Bash", "input": 5}}, "2026-01-01T00:00:00Z")
    with pytest.raises(clare.ClareError):
        clare.check_payload(ev)


def test_schema_1_database_upgrades_and_keeps_every_event(tmp_path):
    import shutil
    path = tmp_path / "old.db"
    shutil.copy(Path(__file__).parent / "data" / "release-0.1.0.db", path)
    d = clare.open_db(str(path))
    try:
        n_events = clare.count_events(d)
        version = d.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert version == str(clare.SCHEMA_VERSION)
        assert clare.replay(d) == n_events and all(s.asked is None for s in clare.list_sessions(d, include_gone=True))
    finally:
        d.close()


# --- pane and transcript, read-only --------------------------------------------------------------

def test_clean_screen_keeps_newlines_and_drops_escapes_and_controls():
    screen = "\x1b[1;31mred\x1b[0m line\r\n\x1b]0;title\x07second\tline\x00\n\x1bPdcs\x1b\\third\n\n\n"
    assert clare.clean_screen(screen, lines=60) == "red line\nsecond\tline\nthird"
    assert clare.clean_screen("\n".join(map(str, range(100))), lines=3) == "97\n98\n99"


def test_parse_turns_says_who_said_what_and_names_tools():
    lines = [json.dumps(x).encode() for x in (
        {"type": "user", "message": {"role": "user", "content": "fix the parser"}, "timestamp": "2026-01-01T00:00:00Z"},
        {"type": "assistant", "message": {"role": "assistant", "content": [
            {"type": "text", "text": "Looking."}, {"type": "tool_use", "name": "Bash", "input": {"command": "ls"}},
            {"type": "tool_use", "name": "Read", "input": {}}]}, "timestamp": "2026-01-01T00:00:01Z"},
        {"type": "user", "message": {"role": "user", "content": [{"type": "tool_result", "content": "x"}]}},
        {"type": "user", "isSidechain": True, "message": {"role": "user", "content": "sub-agent"}},
        {"type": "user", "message": {"role": "user", "content": "<command-name>/clear</command-name>"}},
        {"type": "assistant", "message": {"role": "assistant", "content": "done " * 200}})] + [b'{"half']
    turns = clare.parse_turns(lines)
    assert [(t["role"], t["text"][:20]) for t in turns] == [
        ("user", "fix the parser"), ("assistant", "Looking."), ("tool", "Bash, Read"),
        ("assistant", "done done done done ")]
    assert len(turns[-1]["text"]) == clare.TURN_CHARS and turns[2]["tools"] == ["Bash", "Read"]


def test_session_page_shows_state_ask_pane_transcript_attach_and_history(tmux, cli, db, tmp_path, serve):
    cli("hooks", "install")
    pane = tmux.spawn_claude("--greet", cwd=tmp_path / "proj", name="work")
    tmux.type_prompt(pane, "perm")
    wait_for(lambda: (clare.list_sessions(db) or [None])[0] and clare.list_sessions(db)[0].asked,
             what="the PermissionRequest hook")
    assert cli("pull").code == 0
    [s] = clare.list_sessions(db)
    server = serve(token=TOKEN)
    # The fake redraws its whole screen per key: wait for a capture between two draws.
    html = wait_for(lambda: (h := get(server, f"/sessions/{s.id}")) and "Do you want to proceed?\n" in h and h,
                    what="the pane on the page")
    assert "needs permission" in html and "Asks permission" in html and "rm -rf build" in html
    socket = tmux.socket
    assert f"tmux -S {socket} attach -t work:0.0" in html and 'data-copy="attach-cmd"' in html
    assert '<pre class="pane" hx-disable>' in html and "Do you want to proceed?\n" in html  # lines kept
    assert "hello to you" in html and f'hx-get="/frag/sessions/{s.id}/pane"' in html
    assert 'hx-trigger="every 2s"' in html and "appeared on testhost" in html
    frag = get(server, f"/frag/sessions/{s.id}/pane")
    assert frag.startswith('<section class="card" id="frag-pane"') and "\u276f 1. Yes\n" in frag
    got = server.request("GET", f"/api/v1/sessions/{s.id}").json()
    assert got["asked"] == {"tool": "Bash", "input": "rm -rf build", "tool_use_id": "toolu_fake_001"}
    assert got["attach"][:3] == ["tmux", "-S", socket]
    assert got["task"] is None and any("appeared" in e["text"] for e in got["history"])
    view = server.request("GET", f"/api/v1/sessions/{s.id}/pane?lines=3").json()
    assert view["text"].count("\n") <= 2 and view["host"] == "testhost" and view["error"] is None
    turns = server.request("GET", f"/api/v1/sessions/{s.id}/transcript").json()["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"] and turns[-1]["text"] == "perm"
    assert tmux.received() == [{"session_id": s.id, "prompt": "perm"}]  # nothing was typed by any view


def test_pane_and_transcript_need_the_token_and_refuse_cross_site(db, serve):
    observe(db, [S1], now_ms=1000)
    server = serve(token=TOKEN)
    for path in (f"/api/v1/sessions/{S1}/pane", f"/api/v1/sessions/{S1}/transcript", f"/frag/sessions/{S1}/pane",
                 f"/frag/sessions/{S1}/transcript", f"/sessions/{S1}"):
        assert server.request("GET", path, auth=False).status == 401, path
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Origin": "http://evil.example"}):
            r = server.request("GET", path, headers=headers)
            if path.startswith("/sessions/"):  # a link from elsewhere opens the page, without pane or transcript
                assert r.status == 200 and "once this page loads" in r.text, path
            else:
                assert r.status == 403, (path, headers, r.status)
        assert server.request("GET", path, headers={"Sec-Fetch-Site": "same-origin"}).status == 200, path


def test_a_session_of_another_host_is_not_read_here(db, serve):
    with clare.write_txn(db) as cur:
        clare.record(db, cur, "session.appeared", {"session_id": S2, "host": "far", "cwd": "/x", "state": "waiting",
                                                   "tmux_socket": "/tmp/s", "tmux_target": "w:0.0", "pane_id": "%1"},
                     now_ms=1000)
    server = serve(token=TOKEN)
    r = server.request("GET", f"/api/v1/sessions/{S2}/pane")
    assert r.status == 409 and "runs on far" in r.json()["error"]["message"]
    frag = get(server, f"/frag/sessions/{S2}/pane")
    assert "far is not a direct peer of this host" in frag
    html = get(server, f"/sessions/{S2}")
    assert "ssh far -t tmux -S /tmp/s attach -t w:0.0" in html


# --- the way in ---------------------------------------------------------------------------------

def test_attach_command_local_remote_and_configured_ssh_destination():
    s = clare.Session(S1, "apricot", "/srv", "/tmp/tmux-1/default", "work:1.0", "%3", None, "", "waiting", None, None,
                      "", None, {}, "")
    assert clare.attach_command(s, here="apricot", hosts={}) == ["tmux", "-S", "/tmp/tmux-1/default", "attach", "-t",
                                                                 "work:1.0"]
    assert clare.attach_command(s, here="fig", hosts={})[:3] == ["ssh", "apricot", "-t"]
    assert clare.attach_command(s, here="fig", hosts={"apricot": {"ssh": "ana@apricot.lan"}})[:2] == [
        "ssh", "ana@apricot.lan"]
    outside = clare.record_replace(s, tmux_socket=None, tmux_target=None, pane_id=None)
    assert clare.attach_command(outside, here="apricot", hosts={}) is None


def test_clare_attach_runs_tmux_attach_outside_and_switch_client_inside(tmux, cli, db, tmp_path, home):
    tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    assert cli("pull").code == 0
    [s] = clare.list_sessions(db)
    stub = tmp_path / "bin"
    stub.mkdir()
    log = tmp_path / "tmux-argv.jsonl"
    (stub / "tmux").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                               f"open({str(log)!r}, 'a').write(json.dumps([sys.argv[1:], os.environ.get('TMUX')])"
                               " + '\\n')\n")
    (stub / "tmux").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}"}
    env.pop("TMUX", None)
    run = [sys.executable, str(CLARE_PY), "attach", s.id[:8]]
    assert subprocess.run(run, env=env, timeout=30).returncode == 0
    assert subprocess.run(run, env={**env, "TMUX": f"{tmux.socket},1,0"}, timeout=30).returncode == 0
    assert subprocess.run(run, env={**env, "TMUX": "/tmp/other-server,1,0"}, timeout=30).returncode == 0
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert calls == [[["-S", tmux.socket, "attach", "-t", "work:0.0"], None],
                     [["-S", tmux.socket, "switch-client", "-t", "work:0.0"], f"{tmux.socket},1,0"],
                     [["-S", tmux.socket, "attach", "-t", "work:0.0"], None]]  # another server: nested, TMUX unset
    r = cli("--json", "attach", s.id[:8], "--print")
    assert r.code == 0 and r.json()[1:] == ["-S", tmux.socket, "attach", "-t", "work:0.0"]


def test_clare_attach_refuses_a_session_outside_tmux_in_one_line(cli, db):
    with clare.write_txn(db) as cur:
        clare.record(db, cur, "session.appeared", {"session_id": S3, "host": db.machine_id, "cwd": "/x",
                                                   "state": "waiting"}, now_ms=1000)
    r = cli("attach", S3[:8])
    assert r.code == 1 and r.err.count("\n") == 1 and "outside tmux" in r.err


def test_sessions_show_prints_the_page_as_text_and_json(cli, db):
    observe(db, [{"session_id": S1, "label": "parser work", "state": "permission"}], now_ms=1000)
    clare.create_project(db, "alpha", now_ms=1)
    t = clare.create_task(db, "alpha", "write the parser", now_ms=2)
    clare.assign_task(db, t.id, session_id=S1, now_ms=3)
    r = cli("sessions", "show", S1[:6])
    assert r.code == 0 and "parser work" in r.out and "alpha: write the parser" in r.out and "history:" in r.out
    got = cli("--json", "sessions", "show", S1[:6]).json()
    assert got["id"] == S1 and got["task"]["id"] == t.id and got["attach"] is None and got["history"]
    assert cli("sessions", "show").code == 2
    with pytest.raises(SystemExit) as exit_:  # argparse: "invalid choice ... see: clare sessions --help"
        cli("sessions", S1)
    assert exit_.value.code == 2


# --- notifications ------------------------------------------------------------------------------

def notify_config(tmp_path: Path, **extra) -> tuple[dict, Path]:
    out = tmp_path / "notified.jsonl"
    script = tmp_path / "notify.py"
    script.write_text("import json, os, sys\n"
                      "msg = json.load(sys.stdin)\n"
                      f"open({str(out)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'msg': msg}}) + '\\n')\n"
                      "if msg['state'] == 'waiting' and os.environ.get('NOTIFY_SLEEP'): import time; time.sleep(30)\n")
    return {"notify": {"command": [sys.executable, str(script), "a; touch $(pwd)/x", "*"], **extra}}, out


def sent(out: Path) -> list:
    return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []


def test_notify_runs_once_per_change_without_a_shell_and_with_the_page_url(db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, out = notify_config(tmp_path, min_gap_s=0)
    logged = []

    def look(at: int) -> list:
        return clare.notify_changes(db, config=config, base_url="http://apricot:8765/", now_ms=at, log=logged.append)
    observe(db, [{"session_id": S1, "state": "working"}], now_ms=1000)
    assert look(1000) == []  # the first look starts from now
    hook(db, S1, "PermissionRequest", at_ms=2000, tool_name="Bash", tool_input={"command": "rm -rf build"})
    hook(db, S1, "Notification", at_ms=2100, notification_type="permission_prompt")  # same state: no news
    assert [m["state"] for m in look(2200)] == ["permission"]
    assert look(2300) == []  # nothing new
    hook(db, S1, "PreToolUse", at_ms=3000, tool_name="Bash")
    hook(db, S1, "Stop", at_ms=4000)
    assert [m["state"] for m in look(4100)] == ["waiting"]  # waiting after working
    [first, second] = sent(out)
    assert first["argv"] == ["a; touch $(pwd)/x", "*"] and not (tmp_path / "x").exists()  # no shell ran it
    assert first["msg"] == {"session": S1, "label": "", "host": "testhost", "state": "permission",
                            "since": first["msg"]["since"], "cwd": "/srv/app", "tmux_target": "main:0.0",
                            "task": None, "project": None, "asked": {"tool": "Bash", "input": "rm -rf build"},
                            "url": f"http://apricot:8765/sessions/{S1}"}
    assert second["msg"]["asked"] is None and logged == []


def test_notify_holds_a_minimum_gap_against_flapping_and_only_for_this_hosts_sessions(db, tmp_path):
    config, out = notify_config(tmp_path, min_gap_s=60)
    look = lambda at: clare.notify_changes(db, config=config, base_url="http://h", now_ms=at, log=print)  # noqa: E731
    observe(db, [{"session_id": S1, "state": "working"}], now_ms=1000)
    look(1000)
    for i in range(5):  # flapping: permission, working, permission, ...
        hook(db, S1, "PermissionRequest", at_ms=2000 + i * 1000, tool_name="Bash", tool_input={"command": "ls"})
        look(2100 + i * 1000)
        hook(db, S1, "PreToolUse", at_ms=2500 + i * 1000, tool_name="Bash")
        look(2600 + i * 1000)
    assert len(sent(out)) == 1
    hook(db, S1, "PermissionRequest", at_ms=70_000, tool_name="Bash", tool_input={"command": "ls"})
    look(70_000)
    assert len(sent(out)) == 2  # after the gap it notifies again
    with clare.write_txn(db) as cur:  # another host's session: its own host notifies, never this one
        clare.record(db, cur, "session.appeared", {"session_id": S2, "host": "far", "cwd": "/x",
                                                   "state": "permission"}, now_ms=80_000)
    look(80_000)
    assert len(sent(out)) == 2


def test_a_hanging_or_failing_notify_command_is_stopped_and_reported(db, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SLEEP", "1")
    config, out = notify_config(tmp_path, min_gap_s=0, timeout_s=1)
    logged = []
    observe(db, [{"session_id": S1, "state": "working"}], now_ms=1000)
    clare.notify_changes(db, config=config, base_url="http://h", now_ms=1000, log=logged.append)
    hook(db, S1, "Stop", at_ms=2000)
    started = time.monotonic()
    clare.notify_changes(db, config=config, base_url="http://h", now_ms=2100, log=logged.append)
    assert time.monotonic() - started < 10
    assert logged == [f"notify: command {sys.executable!r} did not finish within 1 s; it was stopped"]
    bad = {"notify": {"command": "/nonexistent/notify --flag", "min_gap_s": 0}}
    hook(db, S1, "PermissionRequest", at_ms=3000, tool_name="Bash", tool_input={"command": "ls"})
    clare.notify_changes(db, config=bad, base_url="http://h", now_ms=3100, log=logged.append)
    assert "cannot run" in logged[-1] and "[notify] command" in logged[-1]
    with pytest.raises(clare.ClareError, match="min_gap_s"):
        clare.notify_settings({"command": "x", "min_gap_s": "soon"})


# --- a pane of another host, through a second real `serve` -----------------------------------------

def start_serve(home: Path, env: dict) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, str(CLARE_PY), "--home", str(home), "serve", "--port", "0", "--no-sync"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    assert "serving http://" in line, (line, p.stderr.read() if p.poll() is not None else "")
    return p, line.split("serving ")[1].split("/ ")[0]


def stop_serve(p: subprocess.Popen) -> str:
    p.terminate()
    try:
        _, err = p.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    return err


@pytest.fixture
def host_b(tmux, tmp_path, home):
    """A second host: its own home and machine id, a real `serve` process with a token, pulling its tmux every second,
    and a [notify] command."""
    b_home = tmp_path / "home-b"
    env = {**os.environ, "CLARE_HOME": str(b_home), "CLARE_TOKEN": TOKEN}
    assert subprocess.run([sys.executable, str(CLARE_PY), "init", "--machine-id", "hostb"], env=env,
                          capture_output=True, timeout=30).returncode == 0
    config, out = notify_config(tmp_path, min_gap_s=0)
    (b_home / "clare.toml").write_text(
        "[fleet]\npull_every_s = 1\n[notify]\nmin_gap_s = 0\n"
        f"command = {json.dumps(config['notify']['command'])}\n")
    proc, url = start_serve(b_home, env)
    yield url, out
    stop_serve(proc)


def test_a_pane_of_another_host_is_shown_through_its_serve_with_the_token(host_b, tmux, cli, serve, home, db,
                                                                          tmp_path, monkeypatch):
    url_b, notified = host_b
    pane = tmux.spawn_claude(cwd=tmp_path / "proj", name="far")
    monkeypatch.setenv("B_TOKEN", TOKEN)
    assert cli("peer", "add", url_b, "--name", "hostb", "--token-env", "B_TOKEN").code == 0

    def synced():
        assert cli("sync", "hostb").code == 0
        return [s for s in clare.list_sessions(db) if s.host == "hostb"]
    [s] = wait_for(synced, timeout=20, what="host b's session to reach host a")
    tmux.type_prompt(pane, "perm")
    server = serve()  # host a, in-process, with host b as its peer
    frag = wait_for(lambda: (f := get(server, f"/frag/sessions/{s.id}/pane")) and "Do you want to proceed?" in f
                    and f, timeout=10, what="b's pane through b's serve")
    assert "hostb far:0.0" in frag and f"fake claude {s.id}" in frag
    html = get(server, f"/sessions/{s.id}")
    assert f"ssh hostb -t tmux -S {tmux.socket} attach -t far:0.0" in html
    turns = get(server, f"/frag/sessions/{s.id}/transcript")
    assert "perm" in turns
    # b notified about its own session entering permission (hooks are not installed: b's pull saw the screen)
    msgs = wait_for(lambda: [m for m in sent(notified) if m["msg"]["state"] == "permission"], timeout=15,
                    what="b's [notify] command")
    assert msgs[0]["msg"]["host"] == "hostb" and msgs[0]["msg"]["url"] == f"{url_b}/sessions/{s.id}"
    # without the token b refuses, and a says why instead of showing anything
    monkeypatch.setenv("B_TOKEN", "wrong-token-" + "y" * 20)
    server2 = serve()
    frag = wait_for(lambda: (f := get(server2, f"/frag/sessions/{s.id}/pane")) and "token" in f and f, timeout=5,
                    what="a's refusal")  # once the 1 s cache of the good view has passed
    assert "Do you want" not in frag


# --- smaller frictions ------------------------------------------------------------------------------

def test_serve_takes_pane_tails_of_assigned_sessions_and_the_task_page_keeps_their_lines(tmux, cli, db, tmp_path,
                                                                                         server, home):
    import threading
    tmux.spawn_claude(cwd=tmp_path / "proj", name="work")
    assert cli("pull").code == 0
    [s] = clare.list_sessions(db)
    clare.create_project(db, "alpha", now_ms=1)
    t = clare.create_task(db, "alpha", "write the parser", now_ms=2)
    clare.assign_task(db, t.id, session_id=s.id, now_ms=3)
    stop = threading.Event()
    thread = clare.start_background_pull(str(home / "clare.db"), {"fleet": {"pull_every_s": 0.2, "tails_every_s": 60}},
                                         stop=stop, log=print)
    try:
        [u] = wait_for(lambda: clare.list_updates(db, task_ids=[t.id]), what="serve's pane tail")
    finally:
        stop.set()
        thread.join(10)
    assert u.source == "pane-tail" and u.text.startswith(f"* fake claude {s.id}\n")
    html = get(server, f"/tasks/{t.id}")
    assert f'<pre class="tail">* fake claude {s.id}\n' in html  # the lines stay lines
    assert f'<a class="mono" href="/sessions/{s.id}">session {s.id[:8]}</a>' in html  # linked where it appears
    assert f'href="/sessions/{s.id}"' in get(server, "/frag/fleet")


def test_task_history_card_follows_a_change_made_on_the_page(server, db):
    observe(db, [S1], now_ms=1000)
    clare.create_project(db, "alpha", now_ms=1)
    t = clare.create_task(db, "alpha", "write the parser", now_ms=2)
    r = server.form(f"/tasks/{t.id}/assignment", {"view": "task", "session_id": S1})
    assert r.status == 200 and 'id="frag-history" hx-get' in r.text and 'hx-swap-oob="true"' in r.text
    assert f"assigned task {t.id[:8]} to session {S1[:8]}" in r.text
    r = server.form(f"/tasks/{t.id}/updates", {"text": "halfway"})
    assert "update on task" in r.text.split('id="frag-history"')[1]
