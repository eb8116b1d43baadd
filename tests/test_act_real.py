"""Answering permission dialogs (#14) against the real Claude Code and the mock Messages API.

Reuses the real-CLI harness of tests/test_real_claude.py (same pinned binary, private HOME, tmux
and Clare home); this module trusts its own folders and needs no 60 s wait.
"""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mock_messages_api import MockMessagesApi, _has_tool_result

import clare
import test_real_claude as harness

pytestmark = pytest.mark.slow
NAMES = ("approve", "deny", "terminal", "twice")


@pytest.fixture(scope="module")
def real(request):
    binary = harness._claude_binary()
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="clare-act-"))  # short: a tmux socket path must fit in 108 bytes
    api = MockMessagesApi().start()
    old, harness.PANES = harness.PANES, NAMES  # the folders this module's Claudes start in, trusted up front
    fleet = harness.RealFleet(binary, base, api)
    try:
        assert fleet.clare("init").code == 0
        assert fleet.clare("hooks", "install").code == 0
        for name in NAMES:
            fleet.start(name)
        for name in NAMES:
            fleet.wait_ready(name)
        yield fleet
    finally:
        harness.PANES = old
        fleet.tmux("kill-server", check=False)
        api.stop()
        shutil.rmtree(base, ignore_errors=True)
        print(f"\nact's real Claude Code suite: {time.monotonic() - started:.1f} s", file=sys.__stderr__)


def ask(real, name: str, command: str) -> dict:
    """Have Claude ask to run a command; return the session as Clare sees it, once its dialog is known by id."""
    real.type(name, f"BASH:{command}")
    real.wait(lambda: (e := real.registry(name)) and e.get("waitingFor"), f"{name}'s dialog")
    seen = []

    def named():
        s = real.sessions().get(name)
        seen[:] = [s and (s["state"], s.get("asked")), {k: (m.hook_event, m.state, m.at_ms)
                                                         for k, m in real.marks().items()}]
        return s and s["state"] == "permission" and (s.get("asked") or {}).get("tool_use_id") and s
    return real.wait(named, f"{name}'s dialog in Clare", timeout=30, explain=lambda: f"Clare saw {seen}")


def tool_results(real) -> list[dict]:
    """Return every tool_result block Claude sent to the API, in order."""
    found = []
    for r in real.api.requests:
        for m in r["body"].get("messages") or ():
            if m.get("role") == "user" and isinstance(m.get("content"), list):
                found += [b for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]
    unique = {}
    for b in found:
        unique.setdefault(b.get("tool_use_id"), b)
    return list(unique.values())


def test_real_approve_reaches_the_dialog_and_the_tool_runs(real):
    s = ask(real, "approve", f"touch {real.base}/approved.txt")
    r = real.clare("--json", "approve", s["id"][:8])
    assert r.code == 0, r.out + r.err
    got = r.json()
    assert got["result"] == "typed" and got["note"].startswith("typed: typed 1 (Yes)"), got
    assert got["tool_use_id"].startswith("toolu_mock_")  # the identity Claude itself gave the tool use
    real.wait(lambda: (real.base / "approved.txt").exists(), "the approved command to run")
    results = real.wait(lambda: [b for b in tool_results(real) if b.get("tool_use_id") == got["tool_use_id"]],
                        "the tool's result at the API")
    assert not results[0].get("is_error"), results


def test_real_deny_with_a_reason_refuses_the_tool_and_tells_claude(real):
    s = ask(real, "deny", f"touch {real.base}/denied.txt")
    r = real.clare("--json", "deny", s["id"][:8], "--reason", "use a dry run instead")
    assert r.code == 0, r.out + r.err
    got = r.json()
    assert got["result"] == "typed" and "No" in got["note"], got
    real.wait(lambda: "use a dry run instead" in real.api.prompts(), "the reason at the API")
    refused = [b for b in tool_results(real) if b.get("tool_use_id") == got["tool_use_id"]]
    assert refused and refused[0].get("is_error"), refused  # Claude reports the refusal as the tool's result
    assert not (real.base / "denied.txt").exists()


def test_real_a_dialog_answered_at_the_terminal_first_gets_nothing_typed(real):
    s = ask(real, "terminal", f"touch {real.base}/terminal.txt")
    n_requests = len(real.api.requests)
    real.tmux("send-keys", "-t", real.panes["terminal"], "Escape")  # the person at the terminal was faster
    real.wait(lambda: not (real.registry("terminal") or {}).get("waitingFor"), "the dialog to close")
    r = real.clare("--json", "approve", s["id"][:8])
    assert r.code == 1
    if r.out:  # refused after a re-read of the screen, or before, by the service: never typed either way
        assert r.json()["result"] == "stale", r.out
    else:
        assert "asks nothing now" in r.err
    time.sleep(2)
    assert not (real.base / "terminal.txt").exists()
    assert not any(_has_tool_result(x["body"]) for x in real.api.requests[n_requests:])


def test_real_an_answer_for_one_of_two_identical_commands_reaches_only_that_one(real):
    command = f"touch {real.base}/twice.txt"
    first = ask(real, "twice", command)
    db = clare.open_db(str(real.clare_home / "clare.db"))
    try:
        early = clare.answer_permission(db, first["id"], "approve", client="test", now_ms=clare.now_ms())
    finally:
        db.close()
    real.tmux("send-keys", "-t", real.panes["twice"], "1")  # the terminal approves the first meanwhile
    real.wait(lambda: len([b for b in tool_results(real) if b.get("tool_use_id") == early.tool_use_id]) == 1,
              "the first command's result")
    real.wait(lambda: not (real.registry("twice") or {}).get("waitingFor"), "the first dialog to close")
    second = ask(real, "twice", command)  # the very same command asks again
    assert second["asked"]["tool_use_id"] != early.tool_use_id
    r = real.clare("--json", "pull")  # the session's host acts on pending answers at each pull
    assert r.code == 0, r.err
    db = clare.open_db(str(real.clare_home / "clare.db"))
    try:
        [done] = clare.list_answers(db, answer_id=early.id)
    finally:
        db.close()
    assert done.result == "stale" and "another dialog is open now" in done.result_reason, done
    time.sleep(2)
    assert (real.registry("twice") or {}).get("waitingFor")  # the second dialog still waits for its own answer
    print("\nanswers:", json.dumps([done.result, done.result_reason]))
