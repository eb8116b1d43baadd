"""Every command of the README is run by a test exactly as written; the guard here names any that is not.

Console blocks (`$ clare ...` with what it prints) run here, each command in a shell as the README
prints it, on a host prepared as the page says (a host named apricot with Claude sessions in tmux,
`api` and `web`). The lines under a command are what it must print (in order; lines it prints
beyond them are allowed). Ids differ on every run: an id the README shows in an output stands for
the id printed at that place, and a later command that names it (or a prefix of it) gets the real
one. Times and ages are compared as such. The sh blocks of the reference run in
tests/test_readme_network.py (hosts with the README's addresses) and tests/test_hosts.py (setup).
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import CLARE_PY, ROOT, wait_for
from readme import blocks, console_steps, numbered_commands

HEX_ID = re.compile(r"\b[0-9a-f]{8}(?:[0-9a-f]{24}|-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?\b")
NOT_RUN = {  # README commands no test runs, and why
    "make test": "it runs this very suite (CI runs it: .ci/run)",
    "make test-fast": "it runs this very suite, less the slow tests",
    "python3 -m clare serve": "it serves on port 8765 until stopped: tests/test_startup.py runs it from the "
                              "folder of clare.py with --port 0",
}
VOLATILE = [  # what differs between runs and is not an id: compared by kind
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+Z)?"), "TIME"),
    (re.compile(r"\d{13}\.\d{6}\.[a-z0-9_-]+"), "HLC"),
    (re.compile(r"just now|\d+(\.\d+)? ?(s|min|h|d) ago"), "AGO"),
    (re.compile(r"/tmp/\S*tmux-\d+/\S+"), "SOCKET"),
]


def _normal(line: str) -> str:
    for rx, word in VOLATILE:
        line = rx.sub(word, line)
    return " ".join(line.split())


def _learn(expected: str, actual: str, ids: dict[str, str]) -> bool:
    """Match one expected line against one printed line, learning what each shown id stands for."""
    exp_ids, act_ids = HEX_ID.findall(expected), HEX_ID.findall(actual)
    if len(exp_ids) != len(act_ids):
        return False
    if _normal(HEX_ID.sub("ID", expected)) != _normal(HEX_ID.sub("ID", actual)):
        return False
    for shown, real in zip(exp_ids, act_ids, strict=True):
        if ids.setdefault(shown, real) != real and not ids[shown].startswith(real) and not real.startswith(ids[shown]):
            return False
    return True


def _substitute(command: str, ids: dict[str, str]) -> str:
    """Give a command the real ids for the ones (or prefixes of the ones) the README showed before."""
    def real(m: re.Match) -> str:
        word = m[0]
        for shown, actual in ids.items():
            if shown.startswith(word):
                return actual[:len(word)]
        return word
    return re.sub(r"(?<![\w/.-])[0-9a-f]{4,36}(?![\w/])", real, command)


def shell(line: str, env: dict[str, str], cwd: Path) -> str:
    """Run one README line in bash; return what it printed (the home as ~), failing if it fails."""
    p = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"README line {line!r} failed: {p.stdout}{p.stderr}"
    return (p.stdout + p.stderr).replace(env["HOME"], "~")


def in_a_terminal(line: str, env: dict[str, str], cwd: Path, *, until: str, keys: bytes) -> str:
    """Run one README line on a terminal (a pty); once it shows `until`, type `keys`; return what it printed."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the line, in a shell, on the terminal
        os.chdir(cwd)
        os.execvpe("bash", ["bash", "-c", line], {**env, "TERM": "xterm"})
    seen, sent_at, deadline = b"", 0.0, time.monotonic() + 30
    while time.monotonic() < deadline:
        if until.encode() in seen and time.monotonic() - sent_at > 1:  # typed again until it takes them
            os.write(fd, keys)
            sent_at = time.monotonic()
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the terminal closed: the program ended
            break
        if not chunk:
            break
        seen += chunk
    else:
        os.kill(pid, 9)  # still running after 30 s: fail below with what it printed
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    screen = seen.decode(errors="replace").replace("\x1b[?1049l", "\n")  # the program left the full screen
    text = re.sub(r"\x1b(\[[0-9;?>]*[A-Za-z]|[()][A-Z0-9]|[=>])", "", screen)
    assert os.waitstatus_to_exitcode(status) == 0 and sent_at, f"README line {line!r} on a terminal: {text[-2000:]}"
    return text.replace("\r", "").replace(env["HOME"], "~")


def run_page(heading: str, env: dict[str, str], cwd: Path, *, before=None, run=shell) -> None:
    """Run every console block under a README heading in order; fail on the first line that is not true.

    `before(command)` prepares the host for a command, as the page says it is (a dialog open...);
    `run(line, env, cwd)` runs a line (in a shell, unless a command needs a terminal).
    """
    ids: dict[str, str] = {}
    for steps in console_steps(heading):
        for command, expected in steps:
            line = _substitute(command, ids)
            if before:
                before(command)
            printed = run(line, env, cwd).splitlines()
            at = 0
            for want in expected:
                while at < len(printed) and not _learn(want, printed[at], ids):
                    at += 1
                assert at < len(printed), (f"README line {command!r} ran as {line!r}: {want!r} is not in what it "
                                           "printed:\n" + "\n".join(printed))
                at += 1


class Apricot:
    """The host the pages describe: named apricot, Clare installed, Claude sessions in tmux under ~/src."""

    def __init__(self, tmux, monkeypatch):
        self.short = Path(tempfile.mkdtemp(prefix="u"))  # a short home: the cwd column shows ~/src/api whole
        self.home, bin_dir = self.short / "home", self.short / "home" / ".local" / "bin"
        self.env = {**os.environ, "HOME": str(self.home), "CLARE_HOME": str(self.short / "clare"),
                    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("TMUX", None)
        monkeypatch.setenv("HOME", str(self.home))
        self.tmux = tmux
        tmux.claude_dir = self.home / ".claude"
        self.clare("install")
        self.clare("init", "--machine-id", "apricot")

    def clare(self, *argv: str) -> str:
        return subprocess.run([sys.executable, str(CLARE_PY), *argv], env=self.env, check=True,
                              capture_output=True, text=True, timeout=60).stdout

    def claude(self, name: str) -> str:
        return self.tmux.spawn_claude("--greet", cwd=self.home / "src" / name, name=name, env={"HOME": str(self.home)})

    def close(self) -> None:
        import shutil
        shutil.rmtree(self.short, ignore_errors=True)


@pytest.fixture
def apricot(tmux, monkeypatch):
    host = Apricot(tmux, monkeypatch)
    yield host
    host.close()


def test_the_daily_use_page_runs_as_written(apricot):
    for name in ("api", "web"):
        apricot.claude(name)
    run_page("Daily use", apricot.env, apricot.home)


def test_a_sessions_page_its_pane_and_answering_a_dialog_run_as_written(apricot):
    """A session asks for a permission: show it, attach to its pane (and detach), approve, pick an option, deny."""
    import json

    apricot.clare("hooks", "install")
    pane = apricot.claude("api")

    def asking() -> list:
        return json.loads(apricot.clare("--json", "sessions", "--state", "permission"))

    def a_dialog_open(command: str) -> None:
        if asking():
            return
        apricot.tmux.type_prompt(pane, "perm")
        wait_for(lambda: "Do you want to proceed?" in apricot.tmux.capture(pane), what="the dialog")
        wait_for(lambda: [s for s in asking() if (s["asked"] or {}).get("tool_use_id")], what="the dialog's hook")
        apricot.clare("pull")  # what serve does every second

    def run(line: str, env: dict[str, str], cwd: Path) -> str:
        if line.startswith("clare attach") and "--print" not in line.split("#")[0]:  # C-b d detaches it
            return in_a_terminal(line, env, cwd, until="[api]", keys=b"\x02d")
        return shell(line, env, cwd)

    run_page("A session's page, its live pane, the way in, notifications", apricot.env, apricot.home,
             before=a_dialog_open, run=run)


def test_the_runner_fails_on_a_line_that_is_not_printed():
    ids: dict[str, str] = {}
    assert _learn("added task 3f2a9c1d to alpha: x (P1)", "added task 0a1b2c3d to alpha: x (P1)", ids)
    assert ids == {"3f2a9c1d": "0a1b2c3d"}
    assert _substitute("clare task start 3f2a", ids) == "clare task start 0a1b"
    assert not _learn("added task 3f2a9c1d to alpha: y (P1)", "added task 0a1b2c3d to alpha: x (P1)", ids)
    assert _learn("2026-12-03 07:12:54  apricot  just now", "2027-01-01 00:00:00  apricot  5.0 min ago", ids)


# --- the guard: every command of the README is run by some test -----------------------------------

READERS = ("commands", "console_steps", "run_page")  # a test that runs README commands gets them through these

def claimed_headings() -> dict[str, str]:
    """Return the headings whose commands a test runs (heading -> test file): the first argument of every
    call of `commands`, `console_steps` or `run_page` in tests/*.py, a string or a module's string constant."""
    import ast

    claimed = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Constant) for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute)
                    and getattr(node.func, "id", getattr(node.func, "attr", None)) in READERS and node.args):
                arg = node.args[0]
                heading = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", None))
                if isinstance(heading, str):
                    claimed[heading] = path.name
    return claimed


def test_every_command_of_the_readme_is_run_by_a_test():
    claimed = claimed_headings()
    not_run = [f"README.md:{no} [{' > '.join(b.headings)}] {command}"
               for b in blocks() for no, command in numbered_commands(b)
               if not set(b.headings) & set(claimed) and command.split("  #")[0].strip() not in NOT_RUN]
    assert not not_run, ("no test runs these README commands; run them exactly as written from a test that gets "
                         "them with tests/readme.py's commands(HEADING) or console_steps(HEADING):\n"
                         + "\n".join(not_run))
    for heading, where in claimed.items():
        assert any(heading in b.headings for b in blocks()), f"{where} runs the commands under {heading!r}: none"
    assert {"Daily use", "Three hosts in ten minutes"} <= set(claimed)


def test_the_guard_sees_a_command_no_test_runs(tmp_path, monkeypatch):
    import readme
    fake = tmp_path / "README.md"
    fake.write_text("# X\n## Daily use\n```console\n$ clare status\n```\n## New part\n"
                    "Text.\n```sh\nclare new-verb --flag   # does a thing\nmake test\n```\n```toml\nx = 1\n```\n")
    monkeypatch.setattr(readme, "README", fake)
    with pytest.raises(AssertionError, match=r"README.md:9 \[X > New part\] clare new-verb --flag"):
        test_every_command_of_the_readme_is_run_by_a_test()
