"""Answering permission dialogs (#14) with the fake Claude: only the dialog the person saw, re-read first, logged."""

import json
import os
import subprocess
import sys

import pytest

import clare
from conftest import CLARE_PY, wait_for
from test_act import TOKEN, get, hook, start_serve, stop_serve

S1 = "aaaa0001-0000-4000-8000-000000000001"
DIALOG = """ Bash command

   rm -rf build
   Clean the build folder

 Do you want to proceed?
 \u276f 1. Yes
   2. Yes, and don't ask again for rm commands in /srv/w/projA
   3. No, and tell Claude what to do differently (esc)
"""


def test_parse_dialog_reads_the_question_and_the_exact_wording_of_each_option():
    d = clare.parse_dialog(DIALOG)
    assert d.question == "Do you want to proceed?" and "rm -rf build" in d.about
    assert d.options == ((1, "Yes"), (2, "Yes, and don't ask again for rm commands in /srv/w/projA"),
                         (3, "No, and tell Claude what to do differently (esc)"))
    boxed = "\n".join(f"\u2502 {line:<70} \u2502" for line in DIALOG.splitlines())  # drawn inside a box
    assert clare.parse_dialog(boxed).options == d.options
    assert clare.parse_dialog("> write the tests\n") is None
    assert clare.parse_dialog("Do you want to proceed?\n 1. Yes\n") is None  # one option is no dialog


def test_the_dialog_identity_is_the_tool_use_its_pre_tool_use_reported(db):
    hook(db, S1, "SessionStart", at_ms=1000, source="startup")
    cmd = {"command": "rm -rf build"}
    hook(db, S1, "PreToolUse", at_ms=2000, tool_name="Bash", tool_input=cmd, tool_use_id="toolu_1")
    hook(db, S1, "PreToolUse", at_ms=2001, tool_name="Bash", tool_input={"command": "ls"}, tool_use_id="toolu_x")
    hook(db, S1, "PreToolUse", at_ms=2002, tool_name="Bash", tool_input=cmd, tool_use_id="toolu_2")
    hook(db, S1, "PermissionRequest", at_ms=3000, tool_name="Bash", tool_input=cmd)
    assert clare.list_sessions(db)[0].asked == {"tool": "Bash", "input": "rm -rf build", "tool_use_id": "toolu_1"}
    hook(db, S1, "PostToolUse", at_ms=3500, tool_name="Bash", tool_input=cmd, tool_use_id="toolu_1")
    hook(db, S1, "PermissionRequest", at_ms=4000, tool_name="Bash", tool_input=cmd)  # the same command again
    assert clare.list_sessions(db)[0].asked["tool_use_id"] == "toolu_2"  # two identical commands stay two
    hook(db, S1, "Stop", at_ms=5000)
    hook(db, S1, "PermissionRequest", at_ms=6000, tool_name="Bash", tool_input=cmd)  # no PreToolUse: no identity
    assert "tool_use_id" not in clare.list_sessions(db)[0].asked


def test_a_permission_request_ingested_before_its_pre_tool_use_is_named_when_that_comes(db):
    """Async hooks arrive out of order (seen on the real CLI): the later PreToolUse still names the dialog."""
    hook(db, S1, "SessionStart", at_ms=1000, source="startup")
    cmd = {"command": "touch x", "description": "mock"}
    hook(db, S1, "PermissionRequest", at_ms=3000, tool_name="Bash", tool_input=cmd)
    assert "tool_use_id" not in clare.list_sessions(db)[0].asked
    hook(db, S1, "PreToolUse", at_ms=2000, tool_name="Bash", tool_input=cmd, tool_use_id="toolu_late")
    [s] = clare.list_sessions(db)
    assert (s.state, s.asked) == ("permission", {"tool": "Bash", "input": "touch x", "tool_use_id": "toolu_late"})


def test_every_refusal_says_why_and_leaves_no_trace(db):
    hook(db, S1, "SessionStart", at_ms=1000, source="startup")
    n_events = clare.count_events(db)
    refused = {
        "asks nothing now": dict(answer="approve"),
    }
    for message, kw in refused.items():
        with pytest.raises(clare.Conflict, match=message):
            clare.answer_permission(db, S1, client="test", now_ms=2000, **kw)
    hook(db, S1, "PreToolUse", at_ms=2000, tool_name="Bash", tool_input={"command": "ls"}, tool_use_id="toolu_1")
    hook(db, S1, "PermissionRequest", at_ms=3000, tool_name="Bash", tool_input={"command": "ls"})
    n_events = clare.count_events(db)
    for error, message, kw in (
            (clare.UsageError, "answer 'option' needs", dict(answer="option")),
            (clare.UsageError, "only with answer 'option'", dict(answer="approve", option=2)),
            (clare.UsageError, "a reason goes only with deny", dict(answer="approve", reason="why")),
            (clare.UsageError, "answer 'maybe' is not one of", dict(answer="maybe")),
            (clare.Conflict, "asks about another tool use now", dict(answer="approve", tool_use_id="toolu_9"))):
        with pytest.raises(error, match=message):
            clare.answer_permission(db, S1, client="test", now_ms=4000, **kw)
    assert clare.count_events(db) == n_events


def answer_dialog(tmux, cli, db, tmp_path, name="work"):
    cli("hooks", "install")
    pane = tmux.spawn_claude(cwd=tmp_path / name, name=name)
    tmux.type_prompt(pane, "perm")
    wait_for(lambda: "Do you want to proceed?" in tmux.capture(pane), what="the dialog")
    [s] = wait_for(lambda: [x for x in clare.list_sessions(db) if x.asked and x.asked.get("tool_use_id")],
                   what="the PermissionRequest hook")
    assert cli("pull").code == 0
    return pane, clare.list_sessions(db)[0]


def test_approve_types_the_dialogs_own_key_once_and_logs_it_in_session_and_task_history(tmux, cli, db, tmp_path):
    pane, s = answer_dialog(tmux, cli, db, tmp_path)
    clare.create_project(db, "alpha", now_ms=1)
    t = clare.create_task(db, "alpha", "clean up", now_ms=2)
    clare.assign_task(db, t.id, session_id=s.id, now_ms=3)
    r = cli("--json", "approve", s.id[:8])
    assert r.code == 0, r.err
    got = r.json()
    assert (got["result"], got["tool_use_id"], got["client"].startswith("cli:")) == ("typed", "toolu_fake_001", True)
    assert got["note"] == "typed: typed 1 (Yes)"
    assert [x for x in tmux.received() if "prompt" not in x] == [
        {"session_id": s.id, "approved": True, "key": "1", "tool_use_id": "toolu_fake_001"}]
    for ids in ([s.id], [t.id]):
        text = clare.format_history(clare.list_history(db, ids))
        assert "answered approve to session" in text and "typed (typed 1 (Yes))" in text, ids
    assert clare.list_sessions(db)[0].state == "working"  # the typing host saw the dialog close
    r = cli("approve", s.id[:8])  # nothing asks any more
    assert r.code == 1 and "asks nothing now" in r.err and r.err.count("\n") == 1
    assert len([x for x in tmux.received() if "prompt" not in x]) == 1


def test_deny_with_a_reason_closes_the_dialog_then_tells_claude(tmux, cli, db, tmp_path):
    pane, s = answer_dialog(tmux, cli, db, tmp_path)
    r = cli("deny", s.id[:8], "--reason", "use make clean instead")
    assert r.code == 0, r.err
    assert "typed 2 (No, and tell Claude what to do differently (esc))" in r.out
    wait_for(lambda: any(x.get("prompt") == "use make clean instead" for x in tmux.received()), what="the reason")
    assert [x.get("key") for x in tmux.received() if "prompt" not in x] == ["2"]


def test_an_answer_whose_dialog_was_answered_at_the_terminal_types_nothing(tmux, cli, db, tmp_path):
    pane, s = answer_dialog(tmux, cli, db, tmp_path)
    tmux.run("send-keys", "-t", pane, "2")  # the person at the terminal was faster
    wait_for(lambda: "Do you want" not in tmux.capture(pane), what="the dialog to close")
    r = cli("--json", "approve", s.id[:8])
    assert r.code == 1 and r.json()["result"] == "stale" and "no dialog is on its screen" in r.json()["note"]
    assert [x.get("key") for x in tmux.received() if "prompt" not in x] == ["2"]  # only the terminal's key


def test_an_answer_for_one_of_two_identical_commands_reaches_only_that_one(tmux, cli, db, tmp_path):
    pane, s = answer_dialog(tmux, cli, db, tmp_path)
    early = clare.answer_permission(db, s.id, "approve", client="test", now_ms=clare.now_ms())  # not typed yet
    assert early.tool_use_id == "toolu_fake_001"
    tmux.run("send-keys", "-t", pane, "1")  # approved at the terminal meanwhile
    wait_for(lambda: "Do you want" not in tmux.capture(pane), what="the dialog to close")
    tmux.type_prompt(pane, "perm")  # the same command asks again: another dialog
    wait_for(lambda: (clare.list_sessions(db)[0].asked or {}).get("tool_use_id") == "toolu_fake_002",
             what="the second dialog")
    wait_for(lambda: "Do you want to proceed?" in tmux.capture(pane), what="the second dialog on screen")
    [done] = clare.deliver_answers(db, now_ms=clare.now_ms())
    assert done.result == "stale" and "another dialog is open now" in done.result_reason
    assert [x.get("tool_use_id") for x in tmux.received() if "prompt" not in x] == ["toolu_fake_001"]
    assert "Do you want to proceed?" in tmux.capture(pane)  # the second dialog waits for its own answer


def test_an_answer_expires_by_the_clock_of_the_host_that_stored_it(tmux, cli, db, tmp_path):
    pane, s = answer_dialog(tmux, cli, db, tmp_path)
    a = clare.answer_permission(db, s.id, "approve", client="test", now_ms=clare.now_ms())
    [done] = clare.deliver_answers(db, now_ms=clare.now_ms() + clare.ANSWER_TTL_MS + 1000)
    assert done.result == "expired" and "nothing was typed" in done.result_reason and done.id == a.id
    assert not [x for x in tmux.received() if "prompt" not in x] and "Do you want" in tmux.capture(pane)


def test_dashboard_answers_with_a_confirm_and_without_javascript_through_a_confirm_page(tmux, cli, db, tmp_path,
                                                                                        serve):
    pane, s = answer_dialog(tmux, cli, db, tmp_path)
    server = serve(token=TOKEN)
    html = wait_for(lambda: (h := get(server, f"/sessions/{s.id}")) and "3. " not in h and "Approve" in h and h,
                    what="the answer buttons")
    assert 'hx-confirm="Approve — Bash: rm -rf build?"' in html and 'name="tool_use_id" value="toolu_fake_001"' in html
    needs = get(server, "/frag/attention")
    assert f'action="/sessions/{s.id}/answer"' in needs  # the needs-you row answers too
    fields = {"view": "session", "answer": "approve", "option": "", "option_text": "", "tool_use_id": "toolu_fake_001"}
    r = server.request("POST", f"/sessions/{s.id}/answer", body=_form(server, fields), headers=_form_headers())
    assert r.status == 200 and "Send this answer?" in r.text and 'name="confirmed" value="1"' in r.text
    assert not [x for x in tmux.received() if "prompt" not in x]  # nothing before the confirmation
    r = server.request("POST", f"/sessions/{s.id}/answer", body=_form(server, {**fields, "confirmed": "1"}),
                       headers=_form_headers())
    assert r.status == 303 and r.headers["location"] == f"/sessions/{s.id}"
    assert [x.get("key") for x in tmux.received() if "prompt" not in x] == ["1"]
    assert "dashboard answered approve" in get(server, f"/frag/sessions/{s.id}/history")


def test_answer_routes_need_the_token_and_refuse_cross_site(tmux, cli, db, tmp_path, serve):
    pane, s = answer_dialog(tmux, cli, db, tmp_path)
    server = serve(token=TOKEN)
    body = json.dumps({"answer": "approve"}).encode()
    assert server.request("POST", f"/api/v1/sessions/{s.id}/answer", body=body, auth=False,
                          headers={"Content-Type": "application/json"}).status == 401
    assert server.request("POST", f"/api/v1/sessions/{s.id}/answer", body=body, headers={
        "Content-Type": "application/json", "Origin": "http://evil.example"}).status == 403
    assert server.request("POST", f"/api/v1/sessions/{s.id}/answer", body=body, headers={
        "Content-Type": "text/plain"}).status == 415
    form = _form(server, {"answer": "approve", "confirmed": "1"})
    assert server.request("POST", f"/sessions/{s.id}/answer", body=form, headers={
        **_form_headers(), "Sec-Fetch-Site": "cross-site"}).status == 403
    assert not [x for x in tmux.received() if "prompt" not in x]
    r = server.request("POST", f"/api/v1/sessions/{s.id}/answer", json_body={"answer": "approve", "client": "bot"})
    assert r.status == 201 and r.json()["result"] == "typed" and r.json()["client"] == "bot via api"


def _form(server, fields: dict) -> bytes:
    from urllib.parse import urlencode
    return urlencode({**fields, "csrf": server.config.csrf_token}).encode()


def _form_headers() -> dict:
    return {"Content-Type": "application/x-www-form-urlencoded"}


# --- across hosts: two real `serve` processes ---------------------------------------------------------

def test_an_answer_made_on_another_host_is_pushed_and_typed_there_or_expires(tmux, cli, db, tmp_path, serve, home,
                                                                             monkeypatch):
    b_home = tmp_path / "home-b"
    env = {**os.environ, "CLARE_HOME": str(b_home), "CLARE_TOKEN": TOKEN}
    assert subprocess.run([sys.executable, str(CLARE_PY), "init", "--machine-id", "hostb"], env=env,
                          capture_output=True, timeout=30).returncode == 0
    (b_home / "clare.toml").write_text("[fleet]\npull_every_s = 1\n")
    subprocess.run([sys.executable, str(CLARE_PY), "hooks", "install"], env=env, capture_output=True, timeout=30)
    proc, url_b = start_serve(b_home, env)
    try:
        pane = tmux.spawn_claude(cwd=tmp_path / "far", name="far")
        tmux.type_prompt(pane, "perm")
        monkeypatch.setenv("B_TOKEN", TOKEN)
        assert cli("peer", "add", url_b, "--name", "hostb", "--token-env", "B_TOKEN").code == 0

        def synced():
            assert cli("sync", "hostb").code == 0
            return [x for x in clare.list_sessions(db) if x.host == "hostb" and x.asked
                    and x.asked.get("tool_use_id")]
        [s] = wait_for(synced, timeout=20, what="b's dialog to reach a")
        r = cli("--json", "approve", s.id[:8])
        assert r.code == 0 and r.json()["result"] == "pending" and "sent to hostb" in r.json()["note"], r.out
        wait_for(lambda: [x for x in tmux.received() if x.get("key") == "1"], timeout=5, what="b to type it")

        def resolved(answer_id):
            cli("sync", "hostb")
            return [a for a in clare.list_answers(db, answer_id=answer_id) if a.result != "pending"]
        [a] = wait_for(lambda: resolved(r.json()["id"]), timeout=10, what="b's result to reach a")
        assert (a.result, a.result_reason) == ("typed", "typed 1 (Yes)")
        # b goes away; an answer made meanwhile reaches b late and expires there, untyped
        tmux.type_prompt(pane, "perm")
        wait_for(synced, timeout=20, what="b's second dialog")
        s2 = [x for x in clare.list_sessions(db) if x.host == "hostb"][0]
        assert s2.asked["tool_use_id"] == "toolu_fake_002"
    finally:
        stop_serve(proc)
    r = cli("--json", "approve", s2.id[:8])
    assert r.code == 0 and r.json()["result"] == "pending" and "sync will carry it" in r.json()["note"]
    import time
    (b_home / "clare.toml").write_text("[fleet]\npull_every_s = 1\n[answers]\nttl_s = 1\nclock_slack_s = 0\n")
    time.sleep(1.5)  # older than b's ttl_s + clock_slack_s (shortened for the test) when b stores it
    proc, url_b2 = start_serve(b_home, env)  # b is back (on another port)
    monkeypatch.setenv("CLARE_TOKEN", TOKEN)  # a's token for a peer named by URL only

    def verdict():
        assert cli("sync", url_b2).code == 0  # a's sync pushes the answer to b, and pulls b's verdict back
        return [a for a in clare.list_answers(db, answer_id=r.json()["id"]) if a.result != "pending"]
    try:
        [a] = wait_for(verdict, timeout=15, what="b's verdict")
        assert a.result == "expired" and "came late" in a.result_reason
        assert [x.get("key") for x in tmux.received() if "prompt" not in x] == ["1"]  # the second was never typed
        assert "Do you want to proceed?" in tmux.capture(pane)
    finally:
        stop_serve(proc)
