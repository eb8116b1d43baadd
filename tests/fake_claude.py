"""A stand-in for Claude Code in a tmux pane: registry entry, transcript, hooks, bracketed paste.

Start it as `exec -a claude <python> fake_claude.py [--session-id ID] [--no-registry] [--greet]`
under bash (FAKE_CLAUDE_SESSION_ID in the environment sets the id without a flag), so that argv[0] is
`claude` as for the real program. It writes what it receives
(one JSON line per submitted prompt, and any Enter that would approve its permission dialog)
to $CLAUDE_CONFIG_DIR (or ~/.claude)/fake-received.jsonl.

`--resume ID` continues session ID; `--trust` first shows the trust-this-folder screen (Enter would
trust it: recorded as {"trusted": true}); each start is recorded as {"session_id", "argv", "cwd"} in
fake-started.jsonl.

Prompts it understands: `/exit` ends the session, `perm` opens a permission dialog (Enter or `1`
approves it, `2` or Esc denies it; each is recorded with the dialog's tool_use_id, which its
PreToolUse hook reported), `work` starts a turn that runs a tool and stays working until
Esc interrupts it, `/clear` starts a new session id in the same process; anything else gets a
one-line answer and ends the turn.

Where the real Claude Code 2.1.197 was seen to behave in a way Clare depends on, the fake does
the same: a TAB becomes 4 spaces; a paste is appended to a half-typed draft; prompts typed while
it works are queued and sent once, together, after the turn; the composer sits between two rules
and shows a dim placeholder when empty; the registry has `status` and, while a dialog is open,
`waitingFor: "permission prompt"`; the Notification `permission_prompt` comes
FAKE_CLAUDE_NOTIFY_S (6) seconds after a dialog opens and `idle_prompt` FAKE_CLAUDE_IDLE_S (60)
seconds after a turn ends.
"""

import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
import tty
import uuid

ROOT = os.environ.get("CLAUDE_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".claude")
NOTIFY_S = float(os.environ.get("FAKE_CLAUDE_NOTIFY_S", "6"))
IDLE_S = float(os.environ.get("FAKE_CLAUDE_IDLE_S", "60"))
RULE = "\u2500" * 60
PASTE_START, PASTE_END = b"\x1b[200~", b"\x1b[201~"


def iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class Fake:
    def __init__(self, argv: list[str]):
        flag = next((f for f in ("--session-id", "--resume") if f in argv), None)  # --resume keeps the id
        self.session_id = (argv[argv.index(flag) + 1] if flag
                           else os.environ.get("FAKE_CLAUDE_SESSION_ID") or str(uuid.uuid4()))
        self.trusting = "--trust" in argv  # shows the trust-this-folder screen first, as for a new folder
        self.has_registry = "--no-registry" not in argv
        self.cwd = os.getcwd()
        slug = re.sub(r"[^A-Za-z0-9]", "-", self.cwd)
        self.transcript = os.path.join(ROOT, "projects", slug, self.session_id + ".jsonl")
        self.registry = os.path.join(ROOT, "sessions", f"{os.getpid()}.json")
        self.received = os.path.join(ROOT, "fake-received.jsonl")
        self.parent = None
        self.dialog = False
        self.tool_use_id = None
        self.n_tools = 0
        self.working = False
        self.buffer = b""
        self.n_msg = 0
        self.queue: list[str] = []  # prompts typed while working: sent once, together, after the turn
        self.timers: dict[str, float] = {}  # notification -> when it fires (time.monotonic())
        os.makedirs(os.path.dirname(self.transcript), exist_ok=True)
        with open(os.path.join(ROOT, "fake-started.jsonl"), "a") as f:
            f.write(json.dumps({"session_id": self.session_id, "argv": argv, "cwd": self.cwd}) + "\n")
        self.set_status("idle")
        self.hook("SessionStart", source="startup")
        if "--greet" in argv:
            self.line("user", {"role": "user", "content": "hello"})
            self.answer("hello to you")

    def set_status(self, status: str, waiting_for: str | None = None) -> None:
        self.timers.pop("idle_prompt", None)
        if status == "idle":
            self.timers["idle_prompt"] = time.monotonic() + IDLE_S
        if not self.has_registry:
            return
        os.makedirs(os.path.dirname(self.registry), exist_ok=True)
        with open(f"/proc/{os.getpid()}/stat", "rb") as f:
            stat = f.read()
        entry = {"pid": os.getpid(), "procStart": stat[stat.rfind(b")") + 2:].split()[19].decode(),
                 "sessionId": self.session_id, "cwd": self.cwd, "status": status,
                 "statusUpdatedAt": int(time.time() * 1000), "version": "2.0.0-fake", "kind": "interactive",
                 **({"waitingFor": waiting_for} if waiting_for else {})}
        with open(self.registry + ".tmp", "w") as f:
            json.dump(entry, f)
        os.replace(self.registry + ".tmp", self.registry)

    def hook(self, event: str, **fields) -> None:
        try:
            with open(os.path.join(ROOT, "settings.json")) as f:
                groups = json.load(f).get("hooks", {}).get(event, [])
        except (OSError, ValueError):
            return
        payload = {"session_id": self.session_id, "transcript_path": self.transcript, "cwd": self.cwd,
                   "hook_event_name": event, "permission_mode": "default", **fields}
        for group in groups:
            for h in group.get("hooks", []):
                # Claude Code runs hook commands through a shell, as here.
                subprocess.run(h["command"], shell=True, input=json.dumps(payload), text=True,
                               capture_output=True, timeout=h.get("timeout", 60))

    def line(self, kind: str, message: dict | None = None, **extra) -> None:
        obj = {"parentUuid": self.parent, "isSidechain": False, "userType": "external", "cwd": self.cwd,
               "sessionId": self.session_id, "version": "2.0.0-fake", "gitBranch": "main", "type": kind,
               **({"message": message} if message else {}), **extra, "uuid": str(uuid.uuid4()),
               "timestamp": iso_now()}
        self.parent = obj["uuid"]
        with open(self.transcript, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def answer(self, text: str) -> None:
        self.n_msg += 1
        self.line("assistant", {"id": f"msg_{self.session_id[:8]}_{self.n_msg}", "type": "message",
                                "role": "assistant", "model": "claude-fake",
                                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                                "usage": {"input_tokens": 10, "cache_creation_input_tokens": 100,
                                          "cache_read_input_tokens": 1000, "output_tokens": 5}},
                  requestId=f"req_{self.n_msg}")
        self.line("system", None, subtype="turn_duration", durationMs=1200, isMeta=False)
        self.set_status("idle")
        self.hook("Stop", last_assistant_message=text, stop_hook_active=False)

    def record(self, **what) -> None:
        with open(self.received, "a") as f:
            f.write(json.dumps({"session_id": self.session_id, **what}) + "\n")

    def draw(self) -> None:
        out = "\x1b[2J\x1b[H" + f"* fake claude {self.session_id}\r\n"
        if self.trusting:
            out += (f"Accessing workspace:\r\n  {self.cwd}\r\nQuick safety check: Is this a project you created or "
                    "one you trust?\r\n\u276f 1. Yes, I trust this folder\r\n  2. No, exit\r\n")
        elif self.dialog:
            out += ("Bash command\r\n  rm -rf build\r\nDo you want to proceed?\r\n"
                    "\u276f 1. Yes\r\n  2. No, and tell Claude what to do differently (esc)\r\n")
        else:
            for text in self.queue:
                out += f"  queued: {text}\r\n"
            # As Claude draws it: the composer between two rules; a dim placeholder when empty.
            typed = self.buffer.decode(errors="replace").replace("\n", "\r\n  ")
            out += f"\x1b[38;5;244m{RULE}\x1b[39m\r\n> "
            out += (typed + "\x1b[7m \x1b[0m") if typed else '\x1b[7mT\x1b[0m\x1b[2mry "fix the tests"\x1b[0m'
            out += f"\r\n\x1b[38;5;244m{RULE}\x1b[39m\r\n"
        os.write(1, out.encode())

    def submit(self) -> None:
        self.handle(self.buffer.decode(errors="replace"))
        with open(os.path.join(ROOT, "fake-settled.txt"), "a") as f:
            f.write("1\n")  # this submit is fully written: transcript, registry, hooks

    def handle(self, text: str) -> None:
        self.buffer = b""
        if self.trusting:
            self.record(trusted=True)  # Enter on the trust screen trusts the folder: a test asserts never
            self.trusting = False
            return
        if self.dialog:
            self.record(approved=True)  # Enter in a permission dialog approves it: a test asserts never
            self.dialog = False
            return
        if self.working:
            self.record(queued=text)  # Claude queues a prompt typed during a turn
            self.queue.append(text)
            return
        if text == "/clear":
            self.clear()
            return
        self.record(prompt=text)
        if text == "/exit":  # a local command: no prompt line, no UserPromptSubmit; the session ends
            self.hook("SessionEnd", reason="prompt_input_exit")
            raise SystemExit(0)
        self.line("user", {"role": "user", "content": text})
        self.hook("UserPromptSubmit", prompt=text)
        if text == "perm":
            self.n_tools += 1
            self.tool_use_id = f"toolu_fake_{self.n_tools:03d}"
            self.hook("PreToolUse", tool_name="Bash", tool_input={"command": "rm -rf build"},
                      tool_use_id=self.tool_use_id)
            self.dialog = True
            self.set_status("waiting", "permission prompt")
            self.timers["permission_prompt"] = time.monotonic() + NOTIFY_S
            self.hook("PermissionRequest", tool_name="Bash", tool_input={"command": "rm -rf build"})
        elif text == "work":
            self.n_msg += 1
            self.line("assistant", {"id": f"msg_{self.session_id[:8]}_{self.n_msg}", "role": "assistant",
                                    "model": "claude-fake", "stop_reason": "tool_use",
                                    "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                                 "input": {"command": "sleep 1000"}}],
                                    "usage": {"input_tokens": 3, "output_tokens": 7}})
            self.set_status("busy")
            self.working = True
        else:
            self.answer(f"ok: {text[:60]}")

    def clear(self) -> None:
        """Start a new session id in this process, as /clear does."""
        self.hook("SessionEnd", reason="clear")
        self.session_id, self.parent = str(uuid.uuid4()), None
        self.transcript = os.path.join(os.path.dirname(self.transcript), self.session_id + ".jsonl")
        self.line("user", {"role": "user", "content": "<command-name>/clear</command-name>"})
        self.set_status("idle")
        self.hook("SessionStart", source="clear")

    def turn_over(self) -> None:
        """Send the prompts queued during the turn, once, as Claude does."""
        if self.queue:
            text, self.queue = "\n".join(self.queue), []
            self.handle(text)

    def tick(self) -> None:
        """Fire the notifications whose time has come."""
        for kind, at in list(self.timers.items()):
            if time.monotonic() >= at:
                del self.timers[kind]
                if kind == "permission_prompt" and self.dialog:
                    self.hook("Notification", notification_type=kind, message="Claude needs your permission")
                elif kind == "idle_prompt" and not self.working and not self.dialog:
                    self.hook("Notification", notification_type=kind, message="Claude is waiting for your input")

    def feed(self, data: bytes, *, flush: bool = False) -> None:
        self.buffer_raw = getattr(self, "buffer_raw", b"") + data
        while self.buffer_raw:
            raw = self.buffer_raw
            if getattr(self, "in_paste", False):
                end = raw.find(PASTE_END)
                if end < 0:
                    self.buffer, self.buffer_raw = self.buffer + raw, b""
                    return
                self.buffer += raw[:end].replace(b"\t", b"    ")  # appended to a draft, a TAB as 4 spaces
                self.buffer_raw, self.in_paste = raw[end + len(PASTE_END):], False
            elif raw.startswith(PASTE_START):
                self.buffer_raw, self.in_paste = raw[len(PASTE_START):], True
            elif not flush and len(raw) < len(PASTE_START) and PASTE_START.startswith(raw):
                return  # wait for the rest of the escape sequence
            else:
                ch, self.buffer_raw = raw[:1], raw[1:]
                if ch in (b"\r", b"\n"):
                    self.submit()
                elif ch == b"\x1b" and self.working:
                    # Esc interrupts the turn: a transcript marker and no hook, as with Claude Code.
                    self.working = False
                    self.line("user", {"role": "user", "content": [
                        {"type": "text", "text": "[Request interrupted by user]"}]})
                    self.set_status("idle")
                    self.turn_over()
                elif self.dialog and ch == b"1":
                    self.record(approved=True, key="1", tool_use_id=self.tool_use_id)
                    self.timers.pop("permission_prompt", None)
                    self.dialog = False
                    self.set_status("busy")  # the approved tool runs
                    self.hook("PostToolUse", tool_name="Bash", tool_input={"command": "rm -rf build"},
                              tool_use_id=self.tool_use_id)
                elif ch == b"\x1b" or (self.dialog and ch == b"2"):
                    if self.dialog:
                        self.record(denied=True, key=ch.decode(), tool_use_id=self.tool_use_id)
                        self.timers.pop("permission_prompt", None)
                        self.line("user", {"role": "user", "content": [
                            {"type": "text", "text": "[Request interrupted by user for tool use]"}]})
                        self.set_status("idle")
                    self.dialog = False
                elif ch == b"\x7f":
                    self.buffer = self.buffer[:-1]
                elif ch == b"\t" and not self.dialog:
                    self.buffer += b"    "
                elif not self.dialog:
                    self.buffer += ch

    def run(self) -> None:
        old = termios.tcgetattr(0)
        tty.setraw(0)
        os.write(1, b"\x1b[?2004h")  # ask the terminal for bracketed paste, as Claude Code does
        try:
            self.draw()
            while True:
                pending = getattr(self, "buffer_raw", b"")
                ready, _, _ = select.select([0], [], [], 0.05 if pending or self.timers else 1.0)
                self.tick()
                if ready:
                    data = os.read(0, 65536)
                    if not data:
                        break
                    self.feed(data)
                    self.draw()
                elif pending:  # a lone Esc: nothing followed it
                    self.feed(b"", flush=True)
                    self.draw()
        finally:
            if self.has_registry and os.path.exists(self.registry):
                os.remove(self.registry)
            try:
                termios.tcsetattr(0, termios.TCSADRAIN, old)
            except termios.error:  # the pane is already closed
                pass


if __name__ == "__main__":
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))  # leave the registry clean, as Claude does
    Fake(sys.argv[1:]).run()
