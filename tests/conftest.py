"""Fixtures shared by the test suite: a private Clare home, the CLI in-process and as a process."""

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import clare

ROOT = Path(__file__).resolve().parent.parent
CLARE_PY = ROOT / "clare.py"


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh CLARE_HOME; nothing of the real user's ~/.claude, XDG or tmux leaks in."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("CLARE_HOME", str(h))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    for var in ("CLARE_TOKEN", "CLARE_URL", "TMUX", "TMUX_PANE", "CLAUDE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    return h


@pytest.fixture
def db(home):
    """An open database in the private home."""
    d = clare.open_db(str(home / "clare.db"), machine_id="testhost")
    yield d
    d.close()


@pytest.fixture
def cli(home, capsys):
    """Run `clare ARGS...` in-process through main(); return code, stdout, stderr."""
    def run(*argv: str) -> Ran:
        capsys.readouterr()
        code = clare.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)
    return run


@pytest.fixture
def run_clare(home):
    """Run clare.py as a real process with this interpreter (not a version-manager shim)."""
    def run(*argv: str, input: str | None = None, env: dict | None = None, timeout: float = 60) -> Ran:
        p = subprocess.run([sys.executable, str(CLARE_PY), *map(str, argv)], input=input,
                           capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        return Ran(p.returncode, p.stdout, p.stderr)
    return run


def pytest_report_header(config):
    return f"CLARE_SEED={os.environ.get('CLARE_SEED', '(random per test)')}"


def seeds(n: int, salt: str) -> list[int]:
    """Return the seeds of a randomized test: CLARE_SEED alone when set, else n fixed ones."""
    if os.environ.get("CLARE_SEED"):
        return [int(os.environ["CLARE_SEED"])]
    rng = random.Random(salt)
    return [rng.randrange(2**32) for _ in range(n)]
