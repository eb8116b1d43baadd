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


@dataclass
class Reply:
    status: int
    headers: dict  # names lowercased
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


class Served:
    """A live Clare server on 127.0.0.1 and a small HTTP client for it."""

    def __init__(self, server, token):
        self.server = server
        self.config = server.config
        self.port = server.config.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token

    def request(self, method: str, path: str, *, json_body=None, body: bytes | None = None,
                headers: dict | None = None, auth: bool = True, timeout: float = 10) -> Reply:
        """Send one request on a fresh connection; the token goes along unless auth=False."""
        import http.client

        hdrs = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if auth and self.token:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def form(self, path: str, fields: dict, *, csrf: bool = True, headers: dict | None = None) -> Reply:
        """Post an urlencoded form as the dashboard's htmx would."""
        from urllib.parse import urlencode

        hdrs = {"Content-Type": "application/x-www-form-urlencoded", "HX-Request": "true", **(headers or {})}
        if csrf:
            hdrs["X-CSRF-Token"] = self.config.csrf_token
        return self.request("POST", path, body=urlencode(fields).encode(), headers=hdrs)


@pytest.fixture
def serve(home, db):
    """Start Clare servers on 127.0.0.1 port 0 (serve_forever in a daemon thread); stop them at teardown."""
    import threading

    started = []

    def start(*, token: str | None = None, timeout_s: float = clare.REQUEST_TIMEOUT_S,
              allowed_hosts: tuple = ()) -> Served:
        if allowed_hosts:
            (home / "clare.toml").write_text(f"allowed_hosts = {json.dumps(list(allowed_hosts))}\n")
        config = clare.web_config(clare.resolve_paths(), host="127.0.0.1", port=0,
                                  env={"CLARE_TOKEN": token} if token else {})
        server = clare.make_server(clare.dataclasses.replace(config, timeout_s=timeout_s))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        return Served(server, token)

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def server(serve) -> Served:
    """A live Clare server without a token on 127.0.0.1."""
    return serve()
