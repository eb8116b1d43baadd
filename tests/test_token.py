"""`clare token`: the first service added by one declaration (a @here method of Services) and one command."""

import os
import pty
import subprocess
import sys

import clare
from conftest import CLARE_PY

TOKEN = "t0ken-of-this-host-" + "q" * 16


def _on_a_terminal(home, *argv: str, env: dict | None = None) -> tuple[int, str]:
    """Run clare as a real process whose stdout is a terminal; return its exit code and what it printed."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, str(CLARE_PY), "--home", str(home), *argv], stdout=slave,
                         stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the pty closes when the process exits
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(timeout=30), out.decode().replace("\r\n", "\n")


def test_token_prints_the_token_of_clare_toml_on_a_terminal(home):
    (home / "clare.toml").write_text(f'token = "{TOKEN}"\n')
    code, out = _on_a_terminal(home, "token")
    assert (code, out) == (0, TOKEN + "\n")
    code, out = _on_a_terminal(home, "token", env={"CLARE_TOKEN": "from-the-environment-" + "e" * 10})
    assert (code, out) == (0, "from-the-environment-" + "e" * 10 + "\n")  # the one resolver's order


def test_token_refuses_a_pipe_and_says_where_the_token_lives(home, run_clare):
    (home / "clare.toml").write_text(f'token = "{TOKEN}"\n')
    ran = run_clare("token")
    assert ran.code == 2 and TOKEN not in ran.out + ran.err
    assert ran.err == (f"clare: error: clare token prints the token to a terminal only; a script reads it where "
                       f"it lives: CLARE_TOKEN, else 'token' in {home / 'clare.toml'}\n")


def test_token_without_one_says_how_to_make_it(home):
    code, out = _on_a_terminal(home, "token")
    assert code == 1 and out.startswith("clare: error: this host has no API token") and "clare setup" in out


def test_token_is_a_service_of_this_host_only_refused_with_remote(cli):
    assert clare.SERVICE_APIS["get_token"][1] is None  # declared @here: no route, no remote call
    r = cli("--remote", "http://127.0.0.1:9", "token")
    assert r.code == 2 and r.err.startswith("clare: error: get_token works on this host only")
