"""Fleet truth (#10, #11): states ordered by when they happened, hooks, broadcast; fast, with the fake claude.

The hook sequences are the ones recorded from the real Claude Code 2.1.197 (tests/data/claude-code-2.1.197/),
fed to real `clare hook` processes late and out of order, as async hooks arrive on a loaded machine.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import clare
from conftest import CLARE_PY, observe, wait_for

SAMPLES = Path(__file__).parent / "data" / "claude-code-2.1.197"
HOOKS = json.loads((SAMPLES / "hook-payloads.json").read_text())


def pull(cli) -> dict:
    r = cli("--json", "pull")
    assert r.code == 0, r.err
    return r.json()


def sample(name: str, session_id: str, cwd: Path) -> bytes:
    """Return a recorded hook payload, retargeted at one session and cwd."""
    payload = dict(HOOKS[name]["payload"], session_id=session_id, cwd=str(cwd))
    payload["transcript_path"] = ""
    return json.dumps(payload).encode()


class HookRun:
    """A `clare hook` process started now (as Claude starts an async hook) whose report is written later."""

    def __init__(self, home: Path, pane: str, socket: str):
        env = {**os.environ, "TMUX_PANE": pane, "TMUX": f"{socket},1,0"}
        self.proc = subprocess.Popen([sys.executable, str(CLARE_PY), "--db", str(home / "clare.db"), "hook"],
                                     stdin=subprocess.PIPE, env=env)

    def send(self, raw: bytes) -> None:
        self.proc.communicate(raw, timeout=30)
        assert self.proc.returncode == 0


def test_late_permission_notification_after_esc_does_not_stick(tmux, cli, db, home, tmp_path):
    """#10.1: the Notification sent 6 s into a dialog, recorded after the user's Esc, leaves no `permission`."""
    sid = HOOKS["PermissionRequest"]["payload"]["session_id"]
    cwd = tmp_path / "projA"
    pane = tmux.spawn_claude("--session-id", sid, cwd=cwd, name="a")  # no settings.json: it runs no hooks
    pull(cli)
    tmux.type_prompt(pane, "perm")
    tmux.wait_settled(1)
    pre = HookRun(home, pane, tmux.socket)  # Claude starts each hook when the event happens ...
    time.sleep(0.3)
    perm = HookRun(home, pane, tmux.socket)
    time.sleep(0.3)
    notif = HookRun(home, pane, tmux.socket)
    time.sleep(0.3)
    tmux.run("send-keys", "-t", pane, "Escape")  # the user closes the dialog right after the notification
    wait_for(lambda: "Do you want to proceed" not in tmux.capture(pane), what="the dialog to close")
    time.sleep(0.3)
    # ... and their reports are recorded late (a loaded machine) and out of order.
    perm.send(sample("PermissionRequest", sid, cwd))
    notif.send(sample("Notification-permission_prompt", sid, cwd))
    pre.send(sample("PreToolUse", sid, cwd))
    # Not even for a moment (a notification would fire): the late reports change no state at once ...
    assert [ev.payload.get("state") for ev in clare.iter_events(db)
            if ev.event_type == "session.changed" and ev.payload.get("state") == "permission"] == []
    # ... and the pull, weighing every signal by when it happened, says waiting.
    [s] = pull(cli)["sessions"]
    assert s["state"] == "waiting"
    r = cli("--json", "broadcast", f"session:{sid[:8]}", "--yes", "--", "carry on")
    assert r.code == 0, r.out + r.err
    assert r.json()["deliveries"][0]["result"] == "delivered"


def test_hook_reports_arriving_out_of_order_are_applied_in_the_order_they_happened(tmux, cli, db, home, tmp_path):
    """#10.2: a PreToolUse (working) recorded after the PermissionRequest it preceded does not hide the dialog."""
    sid = HOOKS["PermissionRequest"]["payload"]["session_id"]
    cwd = tmp_path / "projA"
    pane = tmux.spawn_claude("--session-id", sid, "--no-registry", cwd=cwd, name="a")
    pre = HookRun(home, pane, tmux.socket)
    time.sleep(0.3)
    perm = HookRun(home, pane, tmux.socket)
    time.sleep(0.2)
    perm.send(sample("PermissionRequest", sid, cwd))
    started = clare.now_ms()
    pre.send(sample("PreToolUse", sid, cwd))
    mark = clare.list_hook_marks(db)[sid]
    assert (mark.state, mark.hook_event) == ("permission", "PermissionRequest")
    assert mark.at_ms < started - 100  # stamped when Claude started the hook, not when it was recorded
    [s] = [s for s in clare.list_sessions(db) if s.id == sid]
    assert s.state == "permission"


def test_idle_prompt_notification_is_not_activity(db, home, tmp_path):
    """#10.3: idle_prompt 60 s after a turn neither restarts the idle clock nor flips idle back to waiting."""
    sid = HOOKS["Stop"]["payload"]["session_id"]
    env = {"TMUX_PANE": "%3", "TMUX": "/tmp/tmux-0/default,1,0"}
    stop_ms = clare.now_ms() - 61_000
    clare.run_hook(str(home / "clare.db"), sample("Stop", sid, tmp_path), env=env, at_ms=stop_ms)
    clare.run_hook(str(home / "clare.db"), sample("Notification-idle_prompt", sid, tmp_path), env=env,
                   at_ms=stop_ms + 60_000)
    mark = clare.list_hook_marks(db)[sid]
    assert (mark.state, mark.at_ms) == ("waiting", stop_ms)
    state = clare.derive_state(turn=None, turn_ms=None, registry=None, registry_ms=None, hook=mark.state,
                               hook_ms=mark.at_ms, shows_dialog=False, now_ms=stop_ms + 61_000,
                               idle_after_ms=30_000)
    assert state == "idle"


def test_registry_waiting_for_a_permission_prompt_is_permission():
    """#10.6: the registry's waitingFor is an exact permission signal, whatever else is newer."""
    registry = json.loads((SAMPLES / "registry-waiting-permission.json").read_text())
    at = registry["statusUpdatedAt"]
    state = clare.derive_state(turn="working", turn_ms=at + 50, registry=registry["status"], registry_ms=at,
                               hook="working", hook_ms=at + 40, shows_dialog=False, now_ms=at + 1000,
                               idle_after_ms=600_000, waiting_for=registry["waitingFor"])
    assert state == "permission"
    busy = json.loads((SAMPLES / "registry-busy.json").read_text())
    assert clare.derive_state(turn=None, turn_ms=None, registry=busy["status"], registry_ms=busy["statusUpdatedAt"],
                              hook=None, hook_ms=None, shows_dialog=False, now_ms=busy["statusUpdatedAt"],
                              idle_after_ms=600_000, waiting_for=busy.get("waitingFor")) == "working"


def test_registry_waiting_for_permission_is_seen_by_pull(tmux, cli, tmp_path):
    """#10.6 end to end: the fake writes waitingFor as Claude 2.1.197 does; pull says permission."""
    pane = tmux.spawn_claude(cwd=tmp_path / "p", name="a")
    tmux.type_prompt(pane, "perm")
    tmux.wait_settled(1)
    entry = json.loads(next((tmux.claude_dir / "sessions").glob("*.json")).read_text())
    assert entry["waitingFor"] == "permission prompt"
    assert pull(cli)["sessions"][0]["state"] == "permission"


def _install_hooks(cli) -> None:
    r = cli("hooks", "install")
    assert r.code == 0, r.err


def test_clear_hands_the_task_over_to_the_new_session_in_that_pane_with_hooks(tmux, cli, db, tmp_path):
    """#10.4: /clear starts a new id in the same process and pane; the task follows, the old one links on."""
    _install_hooks(cli)
    pane = tmux.spawn_claude(cwd=tmp_path / "p", name="a")
    [old] = pull(cli)["sessions"]
    cli("project", "new", "alpha")
    task = cli("--json", "task", "add", "alpha", "parse").json()["id"]
    assert cli("assign", task, old["id"]).code == 0
    tmux.type_prompt(pane, "/clear")
    tmux.wait_settled(1)
    new = wait_for(lambda: [s for s in clare.list_sessions(db) if s.id != old["id"] and s.state != "gone"],
                   what="the session after /clear")[0]
    assert clare.get_task(db, task).session_id == new.id
    assert clare.get_session(db, old["id"]).state == "gone"
    gone = [ev for ev in clare.list_history(db, [old["id"]]) if ev.event_type == "session.gone"]
    assert gone and gone[-1].payload["successor_id"] == new.id
    assert any(ev.event_type == "session.gone" for ev in clare.list_history(db, [new.id]))  # linked both ways
    pull(cli)
    assert clare.get_task(db, task).session_id == new.id


def test_clear_hands_the_task_over_without_hooks(tmux, cli, db, tmp_path):
    """#10.4 without hooks: pull sees another id in the same process and pane."""
    pane = tmux.spawn_claude(cwd=tmp_path / "p", name="a")
    [old] = pull(cli)["sessions"]
    cli("project", "new", "alpha")
    task = cli("--json", "task", "add", "alpha", "parse").json()["id"]
    assert cli("assign", task, old["id"]).code == 0
    tmux.type_prompt(pane, "/clear")
    tmux.wait_settled(1)
    [new] = [s for s in pull(cli)["sessions"] if s["state"] != "gone"]
    assert new["id"] != old["id"] and new["pane_id"] == pane
    assert clare.get_task(db, task).session_id == new["id"]
    gone = [ev for ev in clare.list_history(db, [old["id"]]) if ev.event_type == "session.gone"]
    assert gone[-1].payload["successor_id"] == new["id"]


def test_an_ambiguous_pane_never_makes_its_session_gone(tmux, cli, db, tmp_path):
    """#10.5: two Claude panes in one cwd without registry are ambiguous; the session last seen there lives on."""
    cwd = tmp_path / "shared"
    one = tmux.spawn_claude("--no-registry", cwd=cwd, name="a")
    tmux.spawn_claude("--no-registry", cwd=cwd, name="b")
    sid = "5e55a1a1-0000-4000-8000-000000000001"
    observe(db, [{"session_id": sid, "tmux_socket": tmux.socket, "pane_id": one, "cwd": str(cwd)}],
            now_ms=clare.now_ms())
    out = pull(cli)
    assert len(out["ambiguous"]) == 2
    assert clare.get_session(db, sid).state != "gone"


def test_hooks_install_and_uninstall_touch_only_clares_own_entries(cli, home):
    """#11.1: a user's command that merely looks like Clare's is kept; Clare's, from older paths too, are replaced."""
    settings = Path(os.environ["HOME"]) / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    users = [{"type": "command", "command": "/opt/clare/bin/notify hook"},
             {"type": "command", "command": "clare-notify --to me hook"},
             {"type": "command", "command": "python3 /home/me/clare/hooks.py hook"}]
    old_code = "import sys; sys.path.insert(0, '/old/place'); import clare; raise SystemExit(clare.main())"
    olds = [{"type": "command", "command": f"/usr/bin/python3 -I -c \"{old_code}\" --db /old/clare.db hook"},
            {"type": "command", "command": "/usr/bin/python3 /srv/old/clare.py --db /old/clare.db hook"}]
    settings.write_text(json.dumps({"hooks": {"Stop": [{"matcher": "", "hooks": users + olds}],
                                              "Notification": [{"matcher": "", "hooks": users[:1]}]}}))
    assert cli("--json", "hooks", "status").json()["events"]["Stop"] == "outdated"
    assert cli("hooks", "install").code == 0
    hooks = json.loads(settings.read_text())["hooks"]
    commands = [h["command"] for g in hooks["Stop"] for h in g["hooks"]]
    assert commands[:3] == [h["command"] for h in users] and len(commands) == 4
    assert clare.CLARE_HOOK_MARK in commands[3]
    assert [h["command"] for g in hooks["Notification"] for h in g["hooks"]][0] == users[0]["command"]
    assert cli("hooks", "install").code == 0 and json.loads(settings.read_text())["hooks"] == hooks  # idempotent
    assert cli("hooks", "uninstall").code == 0
    hooks = json.loads(settings.read_text())["hooks"]
    assert [h["command"] for g in hooks["Stop"] for h in g["hooks"]] == [h["command"] for h in users]
    assert [h["command"] for g in hooks["Notification"] for h in g["hooks"]] == [users[0]["command"]]
    assert set(hooks) == {"Stop", "Notification"}


def test_hooks_install_says_running_sessions_get_the_hooks(cli, home):
    """#11.7: Claude 2.1.x reloads settings.json while running; the message says so."""
    r = cli("hooks", "install")
    assert "running sessions report from now on" in r.out and "only when restarted" not in r.out


def test_broadcast_refuses_a_composer_holding_a_draft_and_never_submits_it(tmux, cli, tmp_path):
    """#11.2: the user's half-typed draft is never sent; an empty composer (dim placeholder) is no draft."""
    pane = tmux.spawn_claude(cwd=tmp_path / "p", name="a")
    [s] = pull(cli)["sessions"]
    tmux.run("send-keys", "-t", pane, "-l", "my unsent draft")
    wait_for(lambda: "my unsent draft" in tmux.capture(pane), what="the draft")
    r = cli("--json", "broadcast", f"session:{s['id'][:8]}", "--yes", "--", "hello from clare")
    assert r.code == 1
    [d] = r.json()["deliveries"]
    assert d["result"] == "refused" and "composer holds unsent text" in d["reason"]
    assert tmux.received() == []
    assert "hello from clare" not in tmux.capture(pane)
    for _ in "my unsent draft":
        tmux.run("send-keys", "-t", pane, "BSpace")
    wait_for(lambda: 'Try "fix the tests"' in tmux.capture(pane), what="the placeholder")
    r = cli("--json", "broadcast", f"session:{s['id'][:8]}", "--yes", "--", "hello from clare")
    assert r.code == 0, r.out
    assert [x["prompt"] for x in tmux.received()] == ["hello from clare"]


def test_broadcast_from_another_host_waits_for_the_draft_to_go(tmux, cli, db, tmp_path):
    """#11.2 remote: queued while the composer holds text (no new event per pull), typed once it is gone."""
    from test_fleet import _sent_line
    pane = tmux.spawn_claude(cwd=tmp_path / "p", name="a")
    [s] = pull(cli)["sessions"]
    tmux.run("send-keys", "-t", pane, "-l", "draft")
    wait_for(lambda: "> draft" in tmux.capture(pane), what="the draft")
    now = clare.now_ms()
    (tmp_path / "in.jsonl").write_text(_sent_line(s["id"], "from afar", hlc_ms=now, expires_ms=now + 60_000) + "\n")
    assert cli("import", str(tmp_path / "in.jsonl")).code == 0
    pull(cli)
    [d] = clare.list_deliveries(db)
    assert (d.result, d.reason) == ("queued", clare.DRAFT_WAIT_REASON)
    n_events = len(list(clare.iter_events(db)))
    pull(cli)
    assert len(list(clare.iter_events(db))) == n_events  # still waiting: nothing new in the log
    assert tmux.received() == []
    tmux.run("send-keys", "-t", pane, "Enter")  # the user sends the draft
    tmux.wait_settled(1)
    pull(cli)
    assert [x["prompt"] for x in tmux.received()] == ["draft", "from afar"]
    assert [d.result for d in clare.list_deliveries(db)] == ["delivered"]


def test_broadcast_with_a_tab_is_confirmed_as_claude_stores_it_with_one_enter(tmux, cli, tmp_path):
    """#11.3: Claude turns a TAB into 4 spaces; the delivery is confirmed and Enter is pressed once."""
    tmux.spawn_claude(cwd=tmp_path / "p", name="a")
    [s] = pull(cli)["sessions"]
    r = cli("--json", "broadcast", f"session:{s['id'][:8]}", "--yes", "--", "col1\tcol2")
    assert r.code == 0, r.out + r.err
    assert r.json()["deliveries"][0]["result"] == "delivered"
    time.sleep(0.5)
    assert [x.get("prompt") for x in tmux.received()] == ["col1    col2"]  # no empty prompt from a 2nd Enter


def test_project_broadcast_prints_a_line_for_every_task(tmux, cli, db, tmp_path):
    """#11.4: delivered, and 'no live session' for a task whose session is gone or whose group is empty; exit 1."""
    tmux.spawn_claude(cwd=tmp_path / "p", name="a")
    [s] = pull(cli)["sessions"]
    gone_id = "0dd0dd00-0000-4000-8000-000000000002"
    observe(db, [s["id"], gone_id], now_ms=clare.now_ms())
    pull(cli)  # the observed-only session is not running: gone
    assert clare.get_session(db, gone_id).state == "gone"
    cli("project", "new", "alpha")
    tasks = [cli("--json", "task", "add", "alpha", title).json()["id"] for title in ("live", "lost", "grouped")]
    cli("assign", tasks[0], s["id"])
    cli("assign", tasks[1], gone_id)
    cli("group", "add", "nobody", "--cwd", "/nowhere")
    cli("assign", tasks[2], "--group", "nobody")
    r = cli("broadcast", "alpha", "--yes", "--", "status please")
    assert r.code == 1, r.out + r.err
    lines = [line for line in r.out.splitlines() if not line.startswith("broadcast ")]
    assert r.out.splitlines()[-1].endswith(": 1 delivered, 2 no live session")
    assert any("delivered" in line for line in lines)
    assert sum("no live session" in line for line in lines) == 2
    assert any("'lost'" in line and "gone" in line for line in lines)
    assert any("'grouped'" in line for line in lines)
    j = cli("--json", "broadcast", "alpha", "--yes", "--", "again").json()
    assert {u["task_id"] for u in j["unreached"]} == set(tasks[1:])
    # Only real deliveries are in the log: the report's extra lines are not.
    assert {ev.payload["session_id"] for ev in clare.iter_events(db)
            if ev.event_type == "broadcast.delivered"} == {s["id"]}


def test_queued_broadcast_becomes_delivered_once_claude_takes_it(tmux, cli, db, tmp_path):
    """#11.5: queued while Claude works; delivered once the text is in the transcript."""
    pane = tmux.spawn_claude(cwd=tmp_path / "p", name="a")
    tmux.type_prompt(pane, "work")
    tmux.wait_settled(1)
    [s] = pull(cli)["sessions"]
    assert s["state"] == "working"
    r = cli("--json", "broadcast", f"session:{s['id'][:8]}", "--yes", "--", "after this turn")
    assert r.json()["deliveries"][0]["result"] == "queued"
    tmux.run("send-keys", "-t", pane, "Escape")  # the turn ends: Claude sends what it queued
    wait_for(lambda: any(x.get("prompt") == "after this turn" for x in tmux.received()), what="the queued prompt")
    pull(cli)
    assert [d.result for d in clare.list_deliveries(db)] == ["delivered"]


def test_deliveries_accept_the_broadcast_id_prefix_the_cli_prints(server, cli, db):
    """#11.6: GET /api/v1/deliveries?broadcast=<8 characters> finds the broadcast."""
    sid = "5e55a1a1-0000-4000-8000-000000000003"
    observe(db, [{"session_id": sid, "pane_id": None, "tmux_target": None}], now_ms=clare.now_ms())
    r = cli("--json", "broadcast", f"session:{sid[:8]}", "--yes", "--", "hi")
    broadcast_id = r.json()["broadcast_id"]
    got = server.request("GET", f"/api/v1/deliveries?broadcast={broadcast_id[:8]}").json()
    assert [d["session_id"] for d in got] == [sid]
    assert server.request("GET", f"/api/v1/deliveries?broadcast={broadcast_id}").json() == got


def test_a_killed_pane_is_gone_although_its_hooks_reported_lately(tmux, cli, db, tmp_path):
    """#11.4's 'gone' sessions: a recent hook report does not keep alive a session whose pane stopped running it."""
    _install_hooks(cli)
    pane = tmux.spawn_claude(cwd=tmp_path / "p", name="a")
    [s] = pull(cli)["sessions"]
    assert clare.list_hook_marks(db)[s["id"]].pane_id == pane
    tmux.run("kill-session", "-t", "a")
    pull(cli)
    assert clare.get_session(db, s["id"]).state == "gone"


def test_panes_are_captured_in_batches_tmux_accepts(tmux, tmp_path, monkeypatch):
    """#10.7: one tmux run per batch; 120 panes in one run is 'command too long' and a run per pane costs seconds."""
    panes = [tmux.spawn("bash", "-c", f"echo screen-{i}; exec sleep 600", cwd=tmp_path / "p", name=f"s{i}")
             for i in range(clare.CAPTURE_BATCH + 70)]
    wait_for(lambda: "screen-0" in tmux.capture(panes[0]), what="the first screen")
    wait_for(lambda: f"screen-{len(panes) - 1}" in tmux.capture(panes[-1]), what="the last screen")
    calls = []
    run_tmux = clare.run_tmux

    def counted(*args, **kw):
        calls.append(args[1])
        return run_tmux(*args, **kw)
    monkeypatch.setattr(clare, "run_tmux", counted)  # counts the real tmux runs
    screens = clare.capture_panes(tmux.socket, panes)
    assert [screens[p].split("\n")[0] for p in panes] == [f"screen-{i}" for i in range(len(panes))]
    assert len(calls) == 3  # batches of CAPTURE_BATCH, never one run per pane


def test_the_old_session_page_links_to_its_successor_after_clear(tmux, cli, db, server, tmp_path):
    """#10.4: the page of the session /clear ended links to the one that went on in its pane, and back."""
    pane = tmux.spawn_claude(cwd=tmp_path / "p", name="a")
    [old] = pull(cli)["sessions"]
    tmux.type_prompt(pane, "/clear")
    tmux.wait_settled(1)
    [new] = [s for s in pull(cli)["sessions"] if s["state"] != "gone"]
    page = server.request("GET", f"/sessions/{old['id']}").text
    assert f'Continued as <a href="/sessions/{new["id"]}"' in page
    page = server.request("GET", f"/sessions/{new['id']}").text
    assert f'Continues <a href="/sessions/{old["id"]}"' in page
