"""Starting a session for a task with the real Claude Code (the pinned version of the real-CLI suite).

Claude talks to the mock Messages API (tests/mock_messages_api.py); Clare runs as processes, as a
user runs it. The task's description asks Claude (through the mock's BASH: script) to run the
command the first prompt teaches, `LAUNCHER update --done "…"`: with the --allowedTools Clare
passes, it runs without a permission dialog and the task is done.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mock_messages_api import MockMessagesApi
from test_real_claude import API_KEY, _claude_binary

from conftest import CLARE_PY, Ran

pytestmark = pytest.mark.slow


def test_real_claude_gets_the_task_as_first_prompt_and_reports_it_done():
    binary = _claude_binary()
    base = Path(tempfile.mkdtemp(prefix="clare-rd-"))  # short: a tmux socket path must fit in 108 bytes
    api = MockMessagesApi().start()
    home, clare_home, work = base / "home", base / "clare", base / "work"
    for d in (home / ".claude", clare_home, work):
        d.mkdir(parents=True)
    (home / ".claude.json").write_text(json.dumps({
        "hasCompletedOnboarding": True, "projects": {str(work): {"hasTrustDialogAccepted": True}},
        "customApiKeyResponses": {"approved": [API_KEY[-20:]], "rejected": []}}))
    (clare_home / "clare.toml").write_text(f'[fleet]\nclaude_command = "{binary}"\npull_every_s = 0\n')
    # Clare starts the tmux server, so the panes get this environment: Claude reaches the mock.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMUX_TMPDIR": str(base / "tmux"),
           "CLARE_HOME": str(clare_home), "TERM": "xterm-256color", "LANG": "C.UTF-8",
           "ANTHROPIC_BASE_URL": api.url, "ANTHROPIC_API_KEY": API_KEY, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}

    def clare(*args: str) -> Ran:
        p = subprocess.run([sys.executable, str(CLARE_PY), *args], capture_output=True, text=True, timeout=120, env=env)
        return Ran(p.returncode, p.stdout, p.stderr)

    launcher = clare_home / "clare"
    try:
        assert clare("init").code == 0
        assert clare("project", "new", "real", "--dir", str(work)).code == 0
        task = clare("task", "add", "real", "make the parser", "--desc",
                     f'BASH:{launcher} update --done "parser made"', "--json").json()
        r = clare("session", "start", task["id"], "--json")
        assert r.code == 0, r.out + r.err
        order = r.json()
        assert order["result"] == "started", order
        assert clare("task", "show", task["id"], "--json").json()["session_id"] == order["session_id"]
        first = api.prompts()[0]
        assert first.startswith("make the parser\n\nBASH:") and f"{launcher} update --done" in first
        deadline = time.monotonic() + 90
        while (shown := clare("task", "show", task["id"], "--json").json())["status"] != "done":
            assert time.monotonic() < deadline, "Claude never reported the task done; prompts: " + repr(api.prompts())
            time.sleep(0.5)
        assert [u["text"] for u in shown["updates"]] == ["parser made"]
        [s] = clare("--json", "pull").json()["sessions"]
        assert (s["id"], s["state"]) == (order["session_id"], "waiting")  # no dialog was ever opened
    finally:
        subprocess.run(["tmux", "-S", str(base / "tmux" / f"tmux-{os.getuid()}" / "default"), "kill-server"],
                       capture_output=True, timeout=10)
        api.stop()
        shutil.rmtree(base, ignore_errors=True)
