"""The README's reference commands that need a network, run exactly as written.

The reader's host is cherry (10.9.0.4), as in *Three hosts in ten minutes*: apricot (10.9.0.2),
banana (10.9.0.3) and fig (10.9.0.5) serve on the addresses the README names, each in its own
network namespace under its own host name, and share one token. On cherry, `clare` is the launcher
`clare install` writes, `python3` runs in the repository, and CLARE_TOKEN (and APRICOT_TOKEN, for
the `--token-env` example) hold the fleet's token, as the README asks of its reader. A line that
runs `serve` runs until it serves (its address answers), then gets SIGTERM and must exit 0; every
other line must exit 0, and a curl line must get JSON that is no error.
"""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CLARE_PY, ROOT, require_program, wait_for
from readme import commands
from test_network import PORT, NetHost, namespaces

pytestmark = pytest.mark.slow

TOKEN = "readme-fleet-token-0123456789"
SERVING = re.compile(r"serving http://([\d.]+|\[[\d:a-f]+\]):(\d+)/")


def run(host: NetHost, line: str) -> str:
    """Run one README line on the host, in a shell, from the repository (where `python3 clare.py` is)."""
    if re.search(r"\bserve\b", line.split("#")[0]):
        return serve_once(host, line)
    p = subprocess.run(host.argv("bash", "-c", line), cwd=ROOT, env=host.env, capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"README line {line!r} failed on {host.name}: {p.stdout}{p.stderr}"
    if line.startswith("curl"):
        answer = json.loads(p.stdout)
        assert not (isinstance(answer, dict) and "error" in answer), f"README line {line!r}: {p.stdout}"
    return p.stdout


def serve_once(host: NetHost, line: str) -> str:
    """Run a README line that serves: until its address answers; then SIGTERM, and it must stop cleanly."""
    return stop_serving(*start_serving(host, line))


def start_serving(host: NetHost, line: str) -> tuple[subprocess.Popen, str, str]:
    """Start a line that serves; return once the address it prints answers."""
    proc = subprocess.Popen(host.argv("bash", "-c", f"exec {line}"), cwd=ROOT, env=host.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    printed = ""
    for out in proc.stdout:
        printed += out
        if m := SERVING.search(out):
            addr, port = m[1].strip("[]"), m[2]
            addr = "127.0.0.1" if addr in ("0.0.0.0", "::") else addr
            probe = host.argv(sys.executable, "-c", f"import socket; socket.create_connection(({addr!r}, {port}), 2)")
            assert subprocess.run(probe, capture_output=True, timeout=20).returncode == 0, f"{line!r}: {out}"
            break
    return proc, printed, line


def stop_serving(proc: subprocess.Popen, printed: str, line: str) -> str:
    proc.send_signal(signal.SIGTERM)  # bash exec'd clare, under ip netns exec and unshare, which exec too
    text = printed + proc.communicate(timeout=30)[0]
    assert proc.returncode == 0 and SERVING.search(text), f"README line {line!r}: {text}"
    return text


def run_all(host: NetHost, lines: list[str]) -> None:
    for line in lines:
        run(host, line)


def announced(host: NetHost) -> set[str]:
    return {json.loads(e[3])["url"] for e in host.events().values() if e[2] == "host.announced"}


@pytest.fixture
def hosts(tmp_path):
    require_program("sqlite3", "apt-get install sqlite3 (.ci/run does it): the README's backup line runs it")
    with namespaces(f"rd{__import__('os').getpid() % 100000}", 5, subnet="10.9.0") as net:
        made = {name: NetHost(tmp_path, net, i, name) for i, name in
                ((2, "apricot"), (3, "banana"), (4, "cherry"), (5, "fig"))}
        for h in made.values():
            h.env.update(CLARE_TOKEN=TOKEN)
        try:
            yield made
        finally:
            for h in made.values():
                h.stop()


def test_the_reference_commands_run_as_written_on_the_readmes_hosts(hosts):
    apricot, banana, cherry, fig = (hosts[n] for n in ("apricot", "banana", "cherry", "fig"))
    apricot.ok("project", "new", "alpha")
    for h in (banana, fig):
        h.ok("peer", "add", apricot.url)
    for h in (apricot, banana, fig):
        h.serve([sys.executable, str(CLARE_PY), "serve", "--host", h.addr, "--port", str(PORT)])
    # cherry, the reader's host: the launcher on PATH, the fleet's token at hand, a project of its own.
    cherry.ok("install")
    cherry.env.update(PATH=f"{cherry.user}/.local/bin:{cherry.env['PATH']}", APRICOT_TOKEN=TOKEN)
    cherry.ok("project", "new", "alpha")

    run_all(cherry, [c for c in commands("Start here") if not c.startswith("make ")])  # make test runs this
    run_all(cherry, commands("The dashboard and the API: `clare serve`"))

    # The API on cherry's own serve, as its unit runs it.
    serving = start_serving(cherry, "clare serve")
    try:
        run_all(cherry, commands("JSON API (`/api/v1`, described by `GET /api/v1/openapi.json`, OpenAPI 3.1)"))
    finally:
        stop_serving(*serving)
    assert "write the parser" in cherry.ok("task", "list", "alpha").out

    run_all(cherry, commands("Driving a remote Clare: `--remote URL` / `CLARE_URL`"))
    assert "from my laptop" in apricot.ok("task", "list").out

    # Sync: banana and fig announced themselves to apricot, their peer.
    wait_for(lambda: {banana.url, fig.url} <= announced(apricot), timeout=30, what="banana and fig announced")
    run_all(cherry, commands("Sync: peers and how hosts converge"))
    config = (cherry.home / "clare.toml").read_text()
    assert fig.url in config and banana.url in config and apricot.url not in config  # added fig, all; rm apricot
    assert Path(cherry.user, "backups", "clare.db").exists()
    assert "from my laptop" in cherry.ok("task", "list").out  # restored, then synced: nothing lost
