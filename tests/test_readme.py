"""The README's daily-use page, run as written: every `$ clare ...` line of its console blocks.

Each command runs in a shell, exactly as the README prints it, on a host prepared as the page says
(a host named apricot with two Claude sessions in tmux, `api` and `web`). The lines under a command
are what it must print (in order; lines it prints beyond them are allowed). Ids differ on every
run: an id the README shows in an output stands for the id printed at that place, and a later
command that names it (or a prefix of it) gets the real one. Times and ages are compared as such.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import CLARE_PY, ROOT

README = ROOT / "README.md"
HEX_ID = re.compile(r"\b[0-9a-f]{8}(?:[0-9a-f]{24}|-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?\b")
VOLATILE = [  # what differs between runs and is not an id: compared by kind
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+Z)?"), "TIME"),
    (re.compile(r"\d{13}\.\d{6}\.[a-z0-9_-]+"), "HLC"),
    (re.compile(r"just now|\d+(\.\d+)? ?(s|min|h|d) ago"), "AGO"),
]


def console_blocks(section: str) -> list[list[tuple[str, list[str]]]]:
    """Return the console blocks of one `## ` section: per block, (command, expected lines) in order."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else None]
    blocks = []
    for block in re.findall(r"```console\n(.*?)```", body, flags=re.S):
        steps: list[tuple[str, list[str]]] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps and line.strip():
                steps[-1][1].append(line)
        blocks.append(steps)
    return blocks


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


def run_page(section: str, env: dict[str, str], cwd: Path) -> None:
    """Run every console block of a README section in order; fail on the first line that is not true.

    The user's home prints as ~ (the README's reader has another one).
    """
    ids: dict[str, str] = {}
    for steps in console_blocks(section):
        for command, expected in steps:
            line = _substitute(command, ids)
            p = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)
            assert p.returncode == 0, f"README line {command!r} ran as {line!r} and failed: {p.stderr}"
            printed = (p.stdout + p.stderr).replace(env["HOME"], "~").splitlines()
            at = 0
            for want in expected:
                while at < len(printed) and not _learn(want, printed[at], ids):
                    at += 1
                assert at < len(printed), (f"README line {command!r}: {want!r} is not in what it printed:\n"
                                           + "\n".join(printed))
                at += 1


def test_the_daily_use_page_runs_as_written(monkeypatch, tmux):
    short = Path(tempfile.mkdtemp(prefix="u"))  # a short home: the cwd column shows ~/src/api whole
    home, bin_dir = short / "home", short / "home" / ".local" / "bin"
    env = {**os.environ, "HOME": str(home), "CLARE_HOME": str(short / "clare"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    monkeypatch.setenv("HOME", str(home))
    tmux.claude_dir = home / ".claude"
    subprocess.run([sys.executable, str(CLARE_PY), "install"], env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, str(CLARE_PY), "init", "--machine-id", "apricot"], env=env, check=True,
                   capture_output=True)
    for name in ("api", "web"):
        tmux.spawn_claude("--greet", cwd=home / "src" / name, name=name, env={"HOME": str(home)})
    try:
        run_page("Daily use", env, home)
    finally:
        import shutil
        shutil.rmtree(short, ignore_errors=True)


def test_the_runner_fails_on_a_line_that_is_not_printed():
    ids: dict[str, str] = {}
    assert _learn("added task 3f2a9c1d to alpha: x (P1)", "added task 0a1b2c3d to alpha: x (P1)", ids)
    assert ids == {"3f2a9c1d": "0a1b2c3d"}
    assert _substitute("clare task start 3f2a", ids) == "clare task start 0a1b"
    assert not _learn("added task 3f2a9c1d to alpha: y (P1)", "added task 0a1b2c3d to alpha: x (P1)", ids)
    assert _learn("2026-12-03 07:12:54  apricot  just now", "2027-01-01 00:00:00  apricot  5.0 min ago", ids)
