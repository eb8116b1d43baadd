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

from conftest import CLARE_PY, Ran
from test_real_claude import API_KEY, _claude_binary

pytestmark = pytest.mark.slow


class RealHost:
    """A private HOME, Clare home and tmux folder, with the real Claude as [fleet] claude_command."""

    def __init__(self, *, is_trusted: bool):
        binary = _claude_binary()
        self.base = Path(tempfile.mkdtemp(prefix="clare-rd-"))  # short: a tmux socket path must fit in 108 bytes
        self.api = MockMessagesApi().start()
        home, self.clare_home, self.work = self.base / "home", self.base / "clare", self.base / "work"
        for d in (home / ".claude", self.clare_home, self.work):
            d.mkdir(parents=True)
        (home / ".claude.json").write_text(json.dumps({
            "hasCompletedOnboarding": True,
            "projects": {str(self.work): {"hasTrustDialogAccepted": True}} if is_trusted else {},
            "customApiKeyResponses": {"approved": [API_KEY[-20:]], "rejected": []}}))
        (self.clare_home / "clare.toml").write_text(f'[fleet]\nclaude_command = "{binary}"\npull_every_s = 0\n')
        # Clare starts the tmux server, so the panes get this environment: Claude reaches the mock.
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                    "TMUX_TMPDIR": str(self.base / "tmux"), "CLARE_HOME": str(self.clare_home),
                    "TERM": "xterm-256color", "LANG": "C.UTF-8", "ANTHROPIC_BASE_URL": self.api.url,
                    "ANTHROPIC_API_KEY": API_KEY, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
        assert self.clare("init").code == 0
        assert self.clare("project", "new", "real", "--dir", str(self.work)).code == 0

    def clare(self, *args: str) -> Ran:
        p = subprocess.run([sys.executable, str(CLARE_PY), *args], capture_output=True, text=True, timeout=120,
                           env=self.env)
        return Ran(p.returncode, p.stdout, p.stderr)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.base / "tmux" / f"tmux-{os.getuid()}" / "default"), "kill-server"],
                       capture_output=True, timeout=10)
        self.api.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def real_host():
    made = []

    def make(*, is_trusted: bool) -> RealHost:
        made.append(RealHost(is_trusted=is_trusted))
        return made[-1]
    yield make
    for host in made:
        host.close()


def test_real_claude_gets_the_task_as_first_prompt_and_reports_it_done(real_host):
    host = real_host(is_trusted=True)
    launcher = host.clare_home / "clare"
    task = host.clare("task", "add", "real", "make the parser", "--desc",
                      f'BASH:{launcher} update --done "parser made"', "--json").json()
    r = host.clare("session", "start", task["id"], "--json")
    assert r.code == 0, r.out + r.err
    order = r.json()
    assert order["result"] == "started", order
    assert host.clare("task", "show", task["id"], "--json").json()["session_id"] == order["session_id"]
    first = host.api.prompts()[0]
    assert first.startswith("make the parser\n\nBASH:") and f"{launcher} update --done" in first
    deadline = time.monotonic() + 90
    while (shown := host.clare("task", "show", task["id"], "--json").json())["status"] != "done":
        assert time.monotonic() < deadline, "Claude never reported the task done; prompts: " + repr(host.api.prompts())
        time.sleep(0.5)
    assert [u["text"] for u in shown["updates"]] == ["parser made"]
    [s] = host.clare("--json", "pull").json()["sessions"]
    assert (s["id"], s["state"]) == (order["session_id"], "waiting")  # no dialog was ever opened


def test_real_claude_trust_screen_is_reported_and_never_answered(real_host):
    host = real_host(is_trusted=False)
    task = host.clare("task", "add", "real", "make the parser", "--json").json()
    r = host.clare("session", "start", task["id"], "--json")
    order = r.json()
    assert r.code == 1 and order["result"] == "needs trust", order
    assert f"Claude asks whether to trust {host.work}" in order["reason"]
    time.sleep(1)  # an Enter typed by mistake would have trusted the folder and sent a prompt by now
    assert host.api.prompts() == []
    config = json.loads((Path(host.env["HOME"]) / ".claude.json").read_text())
    assert config.get("projects", {}).get(str(host.work), {}).get("hasTrustDialogAccepted") is not True
