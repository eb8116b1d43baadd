"""The real Claude Code (pinned in tests/claude_code_version.txt) in a private tmux server and HOME.

It talks to a mock of the Messages API served here (tests/mock_messages_api.py); Clare runs as a
user runs it (`clare.py` processes, its hooks installed in the private HOME). Claude's own timers
set the pace: its permission Notification comes 6 s into a dialog and `idle_prompt` 60 s after a
turn, so the sessions run side by side and the one 60 s wait is shared by the whole module (the
idle session starts first, its test runs last). The module prints its duration.

Install the binary with `make claude-code` (CI: .ci/run). Under CI=true a missing binary fails
with the reason; elsewhere the module is skipped with the same reason.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest
from mock_messages_api import MockMessagesApi

import clare
from conftest import CLARE_PY, ROOT, Ran, require, require_program, wait_for

pytestmark = pytest.mark.slow

VERSION = (ROOT / "tests" / "claude_code_version.txt").read_text().strip()
CACHE = Path(os.environ.get("CLARE_TEST_CACHE") or Path.home() / ".cache" / "clare-tests")
PACKAGE = CACHE / f"claude-code-{VERSION}" / "node_modules" / "@anthropic-ai" / "claude-code"
BINARY = Path(os.environ.get("CLARE_CLAUDE_CODE") or PACKAGE / "bin" / "claude.exe")
API_KEY = "sk-ant-api03-" + "m" * 60 + "mockkey0123456789ABCD"
IDLE_AFTER_S = 30  # below Claude's 60 s idle_prompt: the notification must not flip idle back to waiting
N_ESC_TRIES = 5
# Every pane's cwd, trusted in ~/.claude.json before any Claude starts (a running Claude rewrites that file).
PANES = ("idle", *(f"esc{i}" for i in range(N_ESC_TRIES)), "perm", "draft", "cleared", "killed")


def _claude_binary() -> Path:
    """Return the pinned Claude Code binary, or fail (CI=true) / skip (elsewhere) saying why and how to fix it."""
    require_program("tmux", "apt install tmux (CI: .ci/run)")
    require(BINARY.exists(), f"Claude Code {VERSION} ({BINARY})",
            f"run `make claude-code` (npm install of @anthropic-ai/claude-code@{VERSION}; not with "
            "--ignore-scripts or --omit=optional: its native binary comes through those)")
    p = subprocess.run([str(BINARY), "--version"], capture_output=True, text=True, timeout=60)
    require(p.stdout.startswith(VERSION), f"Claude Code {VERSION} at {BINARY} (it says "
            f"{(p.stdout or p.stderr).strip()[:80]!r})", "run `make claude-code` to install the pinned version")
    return BINARY


class RealFleet:
    """Real Claude Code sessions in one private tmux server, HOME and Clare home."""

    def __init__(self, binary: Path, base: Path, api: MockMessagesApi):
        self.binary, self.base, self.api = binary, base, api
        self.home = base / "home"
        self.clare_home = base / "clare"
        self.tmux_dir = base / "tmux"
        for d in (self.home / ".claude", self.clare_home, self.tmux_dir):
            d.mkdir(parents=True)
        (self.clare_home / "clare.toml").write_text(f"[fleet]\nidle_after_s = {IDLE_AFTER_S}\n")
        (self.home / ".claude.json").write_text(json.dumps({
            "hasCompletedOnboarding": True,
            "projects": {str(base / "work" / name): {"hasTrustDialogAccepted": True} for name in PANES},
            "customApiKeyResponses": {"approved": [API_KEY[-20:]], "rejected": []}}))
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
                    "TMUX_TMPDIR": str(self.tmux_dir), "CLARE_HOME": str(self.clare_home), "TERM": "xterm-256color",
                    "LANG": "C.UTF-8"}
        self.claude_env = {"ANTHROPIC_BASE_URL": api.url, "ANTHROPIC_API_KEY": API_KEY,
                           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
        self.socket = str(self.tmux_dir / f"tmux-{os.getuid()}" / "real")
        self.panes: dict[str, str] = {}  # name -> pane id

    def tmux(self, *args: str, input: str | None = None, check: bool = True) -> str:
        p = subprocess.run(["tmux", "-L", "real", "-f", "/dev/null", *args], input=input, capture_output=True,
                           text=True, timeout=20, env=self.env)
        if check and p.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def clare(self, *args: str, timeout: float = 120) -> Ran:
        p = subprocess.run([sys.executable, str(CLARE_PY), *args], capture_output=True, text=True,
                           timeout=timeout, env=self.env)
        return Ran(p.returncode, p.stdout, p.stderr)

    def start(self, name: str) -> str:
        """Start Claude in a new tmux session with its own trusted cwd; return its pane (not waiting)."""
        assert name in PANES, f"add {name} to PANES: its folder must be trusted before Claude starts"
        cwd = self.base / "work" / name
        cwd.mkdir(parents=True)
        flags = [f for k, v in {**self.env, **self.claude_env}.items() for f in ("-e", f"{k}={v}")]
        pane = self.tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "40", "-c", str(cwd), *flags,
                         "-P", "-F", "#{pane_id}", str(self.binary)).strip()
        self.panes[name] = pane
        return pane

    def screen(self, name: str, *, styled: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if styled else []), "-t", self.panes[name], check=False)

    def wait(self, predicate, what: str, timeout: float = 90, explain=lambda: ""):
        return wait_for(predicate, timeout=timeout, what=what, explain=lambda: explain() + "; screens:\n" + "\n---\n"
                        .join(f"{n}:\n{self.screen(n)}" for n in self.panes))

    def wait_ready(self, name: str) -> dict:
        """Wait until Claude draws its composer and registers; return its registry entry."""
        self.wait(lambda: "\u276f" in self.screen(name) and "? for shortcuts" in self.screen(name),
                  f"Claude to start in {name}")
        return self.wait(lambda: self.registry(name), f"the registry entry of {name}")

    def registry(self, name: str) -> dict | None:
        cwd = str(self.base / "work" / name)
        for path in (self.home / ".claude" / "sessions").glob("*.json"):
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if entry.get("cwd") == cwd:
                return entry
        return None

    def type(self, name: str, text: str) -> None:
        self.tmux("send-keys", "-t", self.panes[name], "-l", text)
        time.sleep(0.3)  # an Enter in the same burst as the text is swallowed
        self.tmux("send-keys", "-t", self.panes[name], "Enter")

    def notified(self, session_id: str) -> int | None:
        """Return when Claude started the user's Notification hook for a session (epoch ms), if it did."""
        for path in sorted((self.base / "notified").glob("*.json")):
            with suppress(OSError, ValueError):
                if json.loads(path.read_text()).get("session_id") == session_id:
                    return int(path.name.split(".")[0]) // 1_000_000
        return None

    def marks(self) -> dict:
        db = clare.open_db(str(self.clare_home / "clare.db"))
        try:
            return clare.list_hook_marks(db)
        finally:
            db.close()

    def sessions(self) -> dict[str, dict]:
        """Pull, and return this host's live sessions by pane name."""
        r = self.clare("--json", "pull")
        assert r.code == 0, r.err
        by_pane = {p: n for n, p in self.panes.items()}
        return {by_pane[s["pane_id"]]: s for s in r.json()["sessions"] if s.get("pane_id") in by_pane}


@pytest.fixture(scope="module")
def real(request):
    binary = _claude_binary()
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="clare-real-"))  # short: a tmux socket path must fit in 108 bytes
    api = MockMessagesApi().start()
    fleet = RealFleet(binary, base, api)
    try:
        assert fleet.clare("init").code == 0
        # The user's own hook, beside Clare's: it notes when Claude sent each Notification (and must survive).
        (base / "notified").mkdir()
        fleet.user_hook = {"type": "command", "command": f"cat > {base}/notified/$(date +%s%N).json"}
        (fleet.home / ".claude" / "settings.json").write_text(json.dumps(
            {"hooks": {"Notification": [{"matcher": "", "hooks": [fleet.user_hook]}]}}))
        assert fleet.clare("hooks", "install").code == 0
        # The one 60 s idle wait of the module starts now: its session ends a turn first.
        fleet.start("idle")
        fleet.wait_ready("idle")
        fleet.type("idle", "first turn")
        fleet.wait(lambda: "ok: first turn" in fleet.screen("idle"), "the idle session's reply")
        fleet.idle_turn_over = time.time()
        yield fleet
    finally:
        fleet.tmux("kill-server", check=False)
        api.stop()
        shutil.rmtree(base, ignore_errors=True)
        # Through the terminal reporter: printed by `make test` too, where output is captured.
        plugins = request.config.pluginmanager
        reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
        line = f"real Claude Code {VERSION} suite: {time.monotonic() - started:.1f} s (goal: <= 600 s on 2 cores)"
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("\n" + line)
        else:
            print(line, file=sys.__stderr__)


def test_real_esc_right_after_the_permission_notification_never_sticks(real):
    """#10.1, 5/5: Esc ~0.3 s after Claude's 6 s Notification; every session reads waiting, none permission."""
    names = [f"esc{i}" for i in range(N_ESC_TRIES)]
    for name in names:
        real.start(name)
    for name in names:
        real.wait_ready(name)
    opened, escaped = {}, {}

    def one(name: str) -> None:
        real.type(name, f"BASH:touch {real.base}/{name}.txt")
        typed_since: list[float] = []

        def dialog() -> dict | None:
            entry = real.registry(name)
            if entry and entry.get("waitingFor"):
                return entry
            # On a loaded machine an Enter can be swallowed: press it again only while the text is still
            # in the composer (no dialog is open then, so this Enter cannot approve one).
            if "BASH:" in (clare.composer_text(real.screen(name, styled=True)) or ""):
                typed_since.append(time.monotonic())
                if typed_since[-1] - typed_since[0] > 3:
                    real.tmux("send-keys", "-t", real.panes[name], "Enter")
                    typed_since.clear()
            return None

        entry = real.wait(dialog, f"{name}'s dialog")
        opened[name] = entry["statusUpdatedAt"]
        sent = real.wait(lambda: real.notified(entry["sessionId"]), f"{name}'s permission Notification", timeout=40)
        time.sleep(max(0.0, sent / 1000 + 0.3 - time.time()))  # the user presses Esc right after it
        real.tmux("send-keys", "-t", real.panes[name], "Escape")
        escaped[name] = clare.now_ms()

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(escaped) == N_ESC_TRIES
    real.wait(lambda: all((e := real.registry(n)) and not e.get("waitingFor") for n in names), "the dialogs to close")
    time.sleep(3)  # let Clare's async reports land, late as they may be
    ids = {n: real.registry(n)["sessionId"] for n in names}
    sessions = real.sessions()
    marks = real.marks()
    states = {n: sessions[n]["state"] for n in names}
    timing = {n: (real.notified(ids[n]) - opened[n], escaped[n] - real.notified(ids[n]),
                  marks[ids[n]].hook_event) for n in names}
    print(f"\nEsc after notification: states {states}; (Notification sent - dialog open in the registry, "
          f"Esc - Notification sent, Clare's newest report), ms: {timing}")
    assert list(states.values()).count("waiting") == N_ESC_TRIES, states
    for n in names:
        r = real.clare("--json", "broadcast", f"session:{sessions[n]['id'][:8]}", "--yes", "--", f"go on {n}")
        assert r.code == 0, r.out + r.err
    # broadcast says Claude took each prompt; its request to the API follows a moment later
    real.wait(lambda: {f"go on {n}" for n in names} <= set(real.api.prompts()), "every 'go on' to reach the API",
              timeout=60)


def test_real_registry_and_hooks_say_permission_while_the_dialog_is_open(real):
    """#10.6 and the ordering measurement: the registry's waitingFor, and where the hook's start lies."""
    real.start("perm")
    real.wait_ready("perm")
    real.type("perm", f"BASH:touch {real.base}/perm.txt")
    entry = real.wait(lambda: (e := real.registry("perm")) and e.get("waitingFor") and e, "the dialog")
    assert entry["waitingFor"] == "permission prompt"
    sid = entry["sessionId"]
    mark = real.wait(lambda: (m := real.marks().get(sid)) and m.hook_event == "PermissionRequest" and m,
                     "the PermissionRequest report")
    print(f"\nPermissionRequest hook started {mark.at_ms - entry['statusUpdatedAt']:+d} ms from the registry's "
          "statusUpdatedAt")
    assert real.sessions()["perm"]["state"] == "permission"
    r = real.clare("--json", "broadcast", f"session:{sid[:8]}", "--yes", "--", "not now")
    assert r.code == 1 and "needs permission" in r.json()["deliveries"][0]["reason"]
    real.tmux("send-keys", "-t", real.panes["perm"], "Escape")
    real.wait(lambda: not (real.registry("perm") or {}).get("waitingFor"), "the dialog to close")
    assert "not now" not in real.api.prompts()


def test_real_broadcast_never_submits_a_draft_and_confirms_a_tab_once(real):
    """#11.2, #11.3, #11.7: a draft is refused (the placeholder is not a draft); TAB confirmed without hooks."""
    real.start("draft")
    real.wait_ready("draft")
    sid = real.sessions()["draft"]["id"]
    real.tmux("send-keys", "-t", real.panes["draft"], "-l", "my unsent draft")
    real.wait(lambda: "my unsent draft" in real.screen("draft"), "the draft")
    r = real.clare("--json", "broadcast", f"session:{sid[:8]}", "--yes", "--", "hello from clare")
    assert r.code == 1
    assert "composer holds unsent text" in r.json()["deliveries"][0]["reason"]
    real.tmux("send-keys", "-t", real.panes["draft"], "C-u")
    real.wait(lambda: clare.composer_text(real.screen("draft", styled=True)) == "", "the composer to empty")
    # Without hooks (uninstalled while Claude runs: 2.1.x reloads its settings), confirmation reads the transcript.
    assert real.clare("hooks", "uninstall").code == 0
    time.sleep(1.5)
    n_before = len(real.api.prompts())
    before = real.marks().get(sid)
    try:
        r = real.clare("--json", "broadcast", f"session:{sid[:8]}", "--yes", "--", "col1\tcol2")
        assert r.code == 0, r.out + r.err
        assert r.json()["deliveries"][0]["result"] == "delivered"
        time.sleep(1)
        assert real.api.prompts()[n_before:] == ["col1    col2"]  # once, as Claude stores a TAB
        assert real.marks().get(sid) == before  # uninstalled hooks stopped reporting at once
    finally:
        assert real.clare("hooks", "install").code == 0
    settings = json.loads((real.home / ".claude" / "settings.json").read_text())
    assert real.user_hook in settings["hooks"]["Notification"][0]["hooks"]  # the user's own hook survived both
    time.sleep(1.5)
    real.type("draft", "hooks again")
    real.wait(lambda: (m := real.marks().get(sid)) and m != before, "a hook report after install")


def test_real_project_broadcast_follows_clear_and_reports_every_task(real):
    """#10.4, #11.4: after /clear the task follows the pane; a killed session's task gets a 'no live session' line."""
    real.start("cleared")
    real.start("killed")
    real.wait_ready("cleared")
    real.wait_ready("killed")
    sessions = real.sessions()
    old_id, killed_id = sessions["cleared"]["id"], sessions["killed"]["id"]
    real.clare("project", "new", "realproj")
    tasks = [real.clare("--json", "task", "add", "realproj", t).json()["id"] for t in ("cleared", "killed")]
    real.clare("assign", tasks[0], old_id)
    real.clare("assign", tasks[1], killed_id)
    real.type("cleared", "/clear")
    real.wait(lambda: (e := real.registry("cleared")) and e["sessionId"] != old_id, "a new id after /clear")
    real.tmux("kill-session", "-t", "killed")
    real.wait(lambda: real.registry("killed") is None, "the killed session's registry to go")
    new_id = real.sessions()["cleared"]["id"]
    assert new_id != old_id
    task = real.clare("--json", "task", "show", tasks[0])
    assert task.code == 0, task.err
    assert json.dumps(task.json()).count(new_id) >= 1
    r = real.clare("broadcast", "realproj", "--yes", "--", "project wide")
    print("\n" + r.out)
    assert r.code == 1
    lines = [line for line in r.out.splitlines() if line.strip() and not line.startswith("broadcast ")]
    assert len(lines) == 2, r.out
    assert any(new_id[:8] in line and "delivered" in line for line in lines)
    assert any("no live session" in line and "'killed'" in line for line in lines)
    assert r.out.splitlines()[-1].endswith("1 delivered, 1 no live session")
    real.wait(lambda: "project wide" in real.api.prompts(), "the broadcast to reach the API")


def test_real_idle_prompt_does_not_bring_an_idle_session_back(real):
    """#10.3: runs last, sharing the module's one wait: 60 s after its turn Claude says idle_prompt; still idle."""
    sid = real.registry("idle")["sessionId"]
    remaining = real.idle_turn_over + 65 - time.time()
    if remaining > 0:
        time.sleep(remaining)
    state = real.sessions()["idle"]["state"]
    assert state == "idle", f"session {sid[:8]} is {state} {time.time() - real.idle_turn_over:.0f} s after its turn"
