#!/usr/bin/env python3
"""Clare: project management for a fleet of Claude Code sessions.

Projects hold tasks; tasks are assigned to Claude sessions (or groups of them);
every change is an event in an append-only SQLite log, and the tables a user sees
are projections rebuilt from that log. Hosts exchange the events they miss and
converge to the same state.

    python3 clare.py --help

Sections, top to bottom. Each uses only the names of the sections above it and its own
(tests/test_shape.py checks that with symtable). Each section opens with a banner: # N. Title: what it owns.
    1. Constants and errors
         the vocabulary (statuses, states, sources, results), the limits, the error family, paths, the token
    2. HLC
         hybrid logical clock values, their text form, tick and merge
    3. Event store
         schema, migrations, append, query: the only code that writes `events`; SQL lives in 3 and 4 only
    4. Projections
         the tables derived from the log, their appliers (APPLIERS), replay and queries
    5. Services
         every business rule: validate, then one transaction; get_ / list_ queries
    6. Fleet
         Claude Code in tmux panes: discovery, states, hooks, broadcast delivery
    7. Sync
         the peer protocol and client, orders to other hosts; then the services declared once
         (class Services: each method's @api or @here) and their remote twin, RemoteServices
    8. HTTP
         8.1 the server (requests, the security checks, _dispatch); 8.2 the HTML kit (render, the page,
         the stylesheet and script); 8.3 the pages and their htmx fragments; 8.4 the JSON API (derived
         from the declared services) and OpenAPI; 8.5 the sync endpoints; then ROUTES
    9. CLI
         the argparse tree built from COMMANDS, handlers and text output
    10. main
         parse, dispatch, and turn errors into one line and an exit code
"""

import argparse
import contextlib
import errno
import functools
import json
import os
import re
import sqlite3
import string
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, NoReturn, ParamSpec, TypeVar

# The first statement after the imports, so that every command (and `import clare`) on an older
# Python says this in one line instead of a traceback. The lines above, and the grammar of this
# whole file, must stay readable by Python 3.8 (tests/test_hosts.py parses it so).
if sys.version_info < (3, 11):  # noqa: UP036 (ruff targets 3.11; this line is for the Pythons before it)
    sys.exit(f"clare: error: Clare needs Python 3.11 or newer, this is Python {sys.version_info[0]}."
             f"{sys.version_info[1]}; install python3.11 (e.g. apt install python3.11, or from python.org) "
             "and run: python3.11 clare.py ...")

__version__ = "0.1.0"


# ==========================================================================
# 1. Constants and errors: the vocabulary, the limits, the error family, paths.
# ==========================================================================

class _LazyPattern:
    """A regex compiled at its first use: most commands never use most of Clare's ~100 patterns
    (the routes matter only to `serve`), and compiling them all at import cost ~5 ms of every start."""

    def __init__(self, pattern: str, flags: int = 0):
        self.pattern, self.flags = pattern, flags

    def __getattr__(self, name: str) -> Any:  # only for what is not set yet: the first use
        compiled = re.compile(self.pattern, self.flags)
        for method in ("match", "fullmatch", "search", "sub", "subn", "split", "findall", "finditer", "groupindex"):
            setattr(self, method, getattr(compiled, method))  # plain attributes from now on: no detour per call
        return getattr(compiled, name)


def lazy_re(pattern: str, flags: int = 0) -> "re.Pattern[str]":
    """Return a regex that compiles at its first use; it reads as a compiled one."""
    return _LazyPattern(pattern, flags)  # type: ignore[return-value]  # it answers as re.Pattern does


PROJECT_STATUSES = ("active", "paused", "done")
TASK_STATUSES = ("todo", "in_progress", "blocked", "done")
STATUS_LABEL = {"todo": "todo", "in_progress": "in progress", "blocked": "blocked", "done": "done"}
SESSION_STATES = ("working", "waiting", "permission", "idle", "gone")
UPDATE_SOURCES = ("message", "pane-tail", "triage", "hook")
DELIVERY_RESULTS = ("queued", "delivered", "refused", "failed", "expired")
ANSWERS = ("approve", "deny", "option")  # what a person may answer to a permission dialog
ANSWER_RESULTS = ("pending", "typed", "stale", "expired", "failed")  # what became of an answer
# The reason of a queued delivery that was not typed: its host tries again at each pull until it expires.
DRAFT_WAIT_REASON = "the composer holds unsent text; the broadcast waits until the draft is sent or cleared"
PRIORITIES = range(5)  # 0 is the most urgent, as in P0
DEFAULT_PRIORITY = 2
MAX_NAME_CHARS = 100
MAX_TITLE_CHARS = 300
MAX_TEXT_CHARS = 20_000  # descriptions, goals, update texts
MAX_PAYLOAD_BYTES = 64 * 1024  # one event's JSON payload, as stored
MAX_EVENTS_PAGE = 1000  # events in one answer of the API or one page of an export
ID_PREFIX_RE = lazy_re(r"\A[0-9a-f][0-9a-f-]*\Z")
# Every id that enters from outside (sync, import, API): Clare's hex ids, Claude's uuids, tmux's %3,
# machine ids. SECURITY: no space, slash, quote or control character can ride into a URL or a header.
ID_RE = lazy_re(r"\A[A-Za-z0-9%][A-Za-z0-9._:@%+-]{0,63}\Z")
SHORT_ID = 8  # characters of an id shown to people
JSON_LIST_SEPARATORS = (",", ":")  # --json prints a list compact: the bytes SQLite's json_object writes
MIN_TOKEN_CHARS = 16  # a bearer token shorter than this is refused wherever it is read


class ClareError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    exit_code, http_status = 1, 400


class UsageError(ClareError):
    exit_code, http_status = 2, 422


class NotFound(ClareError):
    http_status = 404


class Conflict(ClareError):
    http_status = 409


class Forbidden(ClareError):
    http_status = 403


class DiskFull(ClareError):
    """No room to write: nothing of the refused write was stored, and nothing stored was lost."""

    http_status = 507

# Records: the immutable values that cross sections. Clare's own helper instead of dataclasses:
# `import dataclasses` loads inspect and ast (≈ 10 ms) and each class costs ≈ 0.4 ms (one exec
# per method); a record class gets its methods from one exec when its first record is made, so
# a command pays only for the classes it uses. The type checker reads `record_type` as a dataclass
# decorator (dataclass_transform), so every field and constructor call is still checked.
_T = TypeVar("_T")


class FrozenRecordError(AttributeError):
    """An assignment to a field of a frozen record."""


class RecordField:
    """One field of a record: its name and annotated type (what dataclasses.fields gives)."""

    __slots__ = ("name", "type")

    def __init__(self, name: str, tp: Any):
        self.name, self.type = name, tp


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]):
        self.make = make


def record_field(*, default_factory: Callable[[], _T]) -> _T:
    """Declare a record field whose default is made anew for each record (a list, a dict)."""
    return _Factory(default_factory)  # type: ignore[return-value]  # what the type checker sees is the value


def record_fields(record_or_class: Any) -> tuple[RecordField, ...]:
    """Return the fields of a record class (or record), in order."""
    return record_or_class.__record_fields__


def record_replace(obj: _T, /, **changes: Any) -> _T:
    """Return a copy of a record with some fields changed."""
    return type(obj)(**{**{name: getattr(obj, name) for name in obj.__slots__}, **changes})  # type: ignore[attr-defined]


_MISSING = object()  # a field_factory field the caller left out


def _record_class(cls: type, *, frozen: bool, order: bool) -> type:
    """Return cls rebuilt with slots; its dataclass methods are made when the first record is (_first_init)."""
    ann = cls.__dict__.get("__annotations__", {})
    names = tuple(ann)
    ns = {k: v for k, v in cls.__dict__.items() if k not in names and k not in ("__dict__", "__weakref__")}
    ns["__slots__"] = names
    new = type(cls)(cls.__name__, cls.__bases__, ns)
    new.__qualname__ = cls.__qualname__
    new.__init__ = _first_init  # type: ignore[misc]
    if not frozen:
        new.__hash__ = None  # type: ignore[assignment]  # mutable and compared by value: unhashable, as dataclasses
    new.__match_args__ = names  # type: ignore[misc, attr-defined]
    new.__record_fields__ = tuple(RecordField(n, ann[n]) for n in names)  # type: ignore[attr-defined]
    new.__record_spec__ = (frozen, order, {n: cls.__dict__[n] for n in names if n in cls.__dict__})  # type: ignore[attr-defined]
    return new


def _first_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """Make the class's methods (most record classes are never made by a given command), then init."""
    cls = type(self)
    _add_record_methods(cls, *cls.__record_spec__)
    cls.__init__(self, *args, **kwargs)


def _add_record_methods(cls: type, frozen: bool, order: bool, defaults: dict[str, Any]) -> None:
    """Give a record class __init__, __repr__, __eq__ (and __hash__, __setattr__, order) from one exec."""
    names = cls.__slots__  # type: ignore[attr-defined]
    glb: dict[str, Any] = {"_MISSING": _MISSING, "_Frozen": FrozenRecordError, "_name": cls.__qualname__}
    params, body = [], []
    for i, name in enumerate(names):
        default = defaults.get(name, _MISSING)
        glb[f"_s{i}"] = cls.__dict__[name].__set__  # the slot's own setter: frozen records use it in __init__
        value = name
        if isinstance(default, _Factory):
            glb[f"_f{i}"] = default.make
            params.append(f"{name}=_MISSING")
            value = f"_f{i}() if {name} is _MISSING else {name}"
        elif default is not _MISSING:
            glb[f"_d{i}"] = default
            params.append(f"{name}=_d{i}")
        else:
            params.append(name)
        body.append(f"    _s{i}(self, {value})")
    own = "(" + "".join(f"self.{n}," for n in names) + ")"
    other = "(" + "".join(f"other.{n}," for n in names) + ")"
    src = [f"def __init__(self, {', '.join(params)}):", *(body or ["    pass"]),
           "def __repr__(self):",
           "    return f'{_name}(" + ", ".join(f"{n}={{self.{n}!r}}" for n in names) + ")'",
           "def __eq__(self, other):",
           f"    return {own} == {other} if other.__class__ is self.__class__ else NotImplemented"]
    if frozen:
        src += [f"def __hash__(self):\n    return hash({own})",
                "def __setattr__(self, name, value):\n    raise _Frozen(f'cannot assign to field {name!r}')",
                "def __delattr__(self, name):\n    raise _Frozen(f'cannot delete field {name!r}')"]
    for op, method in (("<", "__lt__"), ("<=", "__le__"), (">", "__gt__"), (">=", "__ge__")) if order else ():
        src.append(f"def {method}(self, other):\n"
                   f"    return {own} {op} {other} if other.__class__ is self.__class__ else NotImplemented")
    methods: dict[str, Any] = {}
    exec("\n".join(src), glb, methods)  # one exec for every method of the class
    for method_name, fn in methods.items():
        fn.__qualname__ = f"{cls.__qualname__}.{method_name}"
        setattr(cls, method_name, fn)


if TYPE_CHECKING:
    from typing import dataclass_transform
else:
    def dataclass_transform(**_: Any) -> Callable[[_T], _T]:
        return lambda fn: fn


@dataclass_transform(field_specifiers=(record_field,))
def record_type(cls: type | None = None, /, *, frozen: bool = False, slots: bool = True, order: bool = False) -> Any:
    """Make a class a record (a slotted dataclass): `@record_type(frozen=True, slots=True)` above its fields."""
    if not slots:
        raise TypeError("records always have slots; leave out slots=False")
    if cls is None:
        return lambda c: _record_class(c, frozen=frozen, order=order)
    return _record_class(cls, frozen=frozen, order=order)


@record_type(frozen=True, slots=True)
class Paths:
    db: str  # the SQLite file that holds the log and its projections
    config: str  # clare.toml


def resolve_paths(*, home: str | None = None, db: str | None = None,
                  env: Mapping[str, str] | None = None) -> Paths:
    """Return where the database and config live: --db, --home, CLARE_HOME, then XDG."""
    env = os.environ if env is None else env
    home = home or env.get("CLARE_HOME")
    if home:
        home = os.path.abspath(os.path.expanduser(home))
        return Paths(db=db or os.path.join(home, "clare.db"), config=os.path.join(home, "clare.toml"))
    user = os.path.expanduser("~")
    data = env.get("XDG_DATA_HOME") or os.path.join(user, ".local", "share")
    config = env.get("XDG_CONFIG_HOME") or os.path.join(user, ".config")
    return Paths(db=db or os.path.join(data, "clare", "clare.db"),
                 config=os.path.join(config, "clare", "clare.toml"))


def load_config(path: str) -> dict[str, Any]:
    """Read clare.toml; a missing file is an empty config; refuse one others may change that holds a secret."""
    import tomllib  # only the verbs that need settings pay for it

    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as err:
        raise ClareError(f"{path}: {err}; fix the TOML syntax there") from err
    # SECURITY: whoever can write a file holding a command (or the token) runs code as this user.
    if mode & 0o022 and ("token" in config or _has_command(config)):
        raise ClareError(f"{path} holds a token or a command Clare runs, and other users may change it; "
                         f"make it yours alone: chmod 600 {path}")
    return config


def _has_command(table: dict[str, Any]) -> bool:
    return any(key == "command" or key.endswith("_command") or (isinstance(value, dict) and _has_command(value))
               for key, value in table.items())


def make_private_dir(folder: str) -> None:
    """Create a folder (and missing parents) that only this user can enter (0700)."""
    os.makedirs(folder, mode=0o700, exist_ok=True)


def write_private(path: str, text: str) -> None:
    """Replace a file by `text` at once, readable by this user alone (0600), its folder made 0700 if new."""
    make_private_dir(os.path.dirname(os.path.abspath(path)))
    staging = f"{path}.{os.getpid()}.tmp"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(staging, 0o600)  # O_CREAT's mode does not apply to a staging file left by a crash
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


def resolve_token(config: dict[str, Any], *, env: Mapping[str, str] | None = None,
                  path: str = "clare.toml") -> str | None:
    """Return the bearer token: CLARE_TOKEN, else `token` in clare.toml, else None; refuse a weak one.

    The one place the shared token is read, for the server, its peers and --remote alike.
    """
    env = os.environ if env is None else env
    if env.get("CLARE_TOKEN"):
        return check_token(env["CLARE_TOKEN"], where="$CLARE_TOKEN")
    return check_token(config.get("token") or None, where=f"'token' in {path}")


def ensure_token(path: str, config: dict[str, Any], *, env: Mapping[str, str] | None = None) -> str:
    """Return the host's token; without CLARE_TOKEN or `token` in clare.toml, make one and write it there."""
    token = resolve_token(config, env=env, path=path)
    if token is not None:
        return token
    import secrets
    import tomllib

    token = secrets.token_urlsafe(32)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    # A top-level key must come before the first [table]: the token goes on the first line.
    new_text = f"token = {json.dumps(token)}  # made by clare on first serve; the fleet may share one\n" + text
    if tomllib.loads(new_text) != {**config, "token": token}:
        raise ClareError(f"cannot add a token to {path} without changing its other settings; add a line "
                         "token = \"...\" at its top (python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    write_private(path, new_text)
    return token


def check_token(token: object, *, where: str) -> str | None:
    """Return the token if it is text of MIN_TOKEN_CHARS or more; None stays None."""
    if token is not None and (not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS):
        raise UsageError(f"the token in {where} is shorter than {MIN_TOKEN_CHARS} characters (or not text); make "
                         "one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


TOKEN_FP_ROUNDS = 100_000  # PBKDF2 rounds of a token fingerprint: ~70 ms here, once per announcement


def token_fingerprint(token: str, *, machine_id: str) -> str:
    """Return what a host's announcement tells of its token: enough to see a shared one, too little to guess it.

    The log goes to every peer: salted with the announcing host's machine id, slow, and cut to
    64 bits, so a short token cannot be looked up or cheaply searched from it.
    """
    import hashlib

    salt = f"clare token of {machine_id}".encode()
    return hashlib.pbkdf2_hmac("sha256", token.encode(), salt, TOKEN_FP_ROUNDS)[:8].hex()


def parse_json(data: str | bytes, *, is_lenient: bool = False) -> Any:
    """Parse standard JSON: NaN, Infinity and lone surrogates are refused with a ValueError naming them.

    `is_lenient` lets those through, for a batch whose items are checked one by one (check_event).
    """
    if is_lenient:
        return json.loads(data)
    if not _STRICT_JSON:
        _STRICT_JSON.append(json.JSONDecoder(parse_constant=_refuse_constant).decode)  # one, not one per call
    if isinstance(data, str):
        try:
            data.encode()
        except UnicodeEncodeError:
            raise ValueError("the text holds a lone surrogate, which is not UTF-8; send UTF-8 text") from None
        value = _STRICT_JSON[0](data)  # a line of an import: as json.loads would read its UTF-8
        escaped = _SURROGATE_ESCAPE_TEXT_RE.search(data) is not None
    else:
        value = json.loads(data, parse_constant=_refuse_constant)
        escaped = _SURROGATE_ESCAPE_RE.search(data) is not None
    # SECURITY: "\ud800" parses to text that no UTF-8 encoder (SQLite's, a socket's) accepts.
    if escaped:
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("a lone surrogate (\\ud800-\\udfff) is not text; send UTF-8 text") from None
    return value


_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_TEXT_RE = re.compile(r"\\u[dD][89a-fA-F]")
_STRICT_JSON: list[Callable[[str], Any]] = []  # the decoder that refuses NaN and Infinity, made on first use


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not standard JSON; send a number or null")


def now_ms() -> int:
    """Return the wall clock in integer milliseconds."""
    return time.time_ns() // 1_000_000


def iso_ms(ms: int) -> str:
    """Format epoch milliseconds as ISO-8601 UTC text with a Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def parse_iso_ms(text: object) -> int | None:
    """Return the epoch milliseconds of ISO-8601 text (a Z or an offset; naive is UTC), None if it is not one."""
    import datetime

    if not isinstance(text, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)


def _duration(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms / size:.1f} {unit}"
    return f"{ms} ms"


def new_id() -> str:
    """Return a fresh random id: 32 lowercase hex digits (a uuid4 without dashes)."""
    return new_uuid().replace("-", "")


def new_uuid() -> str:
    """Return a fresh random uuid4 as text, made as uuid.uuid4() makes it."""
    # Not `import uuid`: it loads `platform` (2.5 ms), paid by every write and every hook run.
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40  # version 4
    b[8] = b[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ==========================================================================
# 2. HLC: hybrid logical clock values, their text form, tick and merge.
# ==========================================================================

MACHINE_ID_RE = lazy_re(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
HLC_RE = lazy_re(r"\A(\d{13})\.(\d{6})\.([a-z0-9][a-z0-9_-]{0,62})\Z")
MAX_COUNTER = 999_999
MAX_WALL_MS = 10**13 - 1
MAX_OFFSET_MS = 5 * 60 * 1000  # how far a peer's clock may pull ours ahead of our wall clock
MACHINE_SUFFIX_CHARS = 6  # hex digits after the host name in a machine id init makes
MAX_LABEL_CHARS = 63 - 1 - MACHINE_SUFFIX_CHARS
MADE_MACHINE_ID_RE = lazy_re(r"\A(.+)-[0-9a-f]{6}\Z")


@record_type(frozen=True, slots=True, order=True)
class Hlc:
    wall_ms: int
    counter: int
    machine_id: str

    def __str__(self) -> str:
        # Fixed widths make the text sort exactly like the tuple.
        return f"{self.wall_ms:013d}.{self.counter:06d}.{self.machine_id}"


def parse_hlc(text: object) -> Hlc:
    """Parse the text form of an HLC; raise ClareError naming what is wrong."""
    m = HLC_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise ClareError(f"bad HLC {text!r}: expected WALLMS(13 digits).COUNTER(6 digits).MACHINE_ID")
    return Hlc(int(m[1]), int(m[2]), m[3])


def check_machine_id(machine_id: str) -> str:
    """Return machine_id if it is valid; raise UsageError saying the rule otherwise."""
    if not MACHINE_ID_RE.match(machine_id):
        raise UsageError(f"bad machine id {machine_id!r}: use 1-63 characters of a-z, 0-9, '-' or '_' "
                         "starting with a letter or digit (no dots, no capitals)")
    return machine_id


def host_label() -> str:
    """Return this host's name as a machine id would spell it: its first label, lowercased, cleaned."""
    label = os.uname().nodename.split(".")[0].lower()
    return re.sub(r"[^a-z0-9_-]+", "-", label).strip("-_")[:MAX_LABEL_CHARS] or "host"


def new_machine_id() -> str:
    """Return a machine id unique by construction: the host name plus a random suffix (apricot-3f9a2c).

    The host name alone collides: two homes on one machine, two containers, two hosts named
    alike. Two Clares with one id mark each other's sessions gone at every sync.
    """
    return f"{host_label()}-{new_id()[:MACHINE_SUFFIX_CHARS]}"


def machine_host_name(machine_id: str) -> str:
    """Return the display name in a machine id: the host name of an id made by new_machine_id, else all of it."""
    m = MADE_MACHINE_ID_RE.match(machine_id)
    return m[1] if m else machine_id


def tick(last: Hlc | None, *, machine_id: str, now_ms: int) -> Hlc:
    """Return the next HLC for a local event: after `last`, and at least the wall clock."""
    if last is None or now_ms > last.wall_ms:
        return Hlc(now_ms, 0, machine_id)
    if last.counter < MAX_COUNTER:
        return Hlc(last.wall_ms, last.counter + 1, machine_id)
    # The counter is full: carry into the wall field rather than growing a 7th digit.
    return Hlc(last.wall_ms + 1, 0, machine_id)


def merge(last: Hlc | None, remote: Hlc, *, machine_id: str, now_ms: int) -> Hlc:
    """Return the clock after seeing `remote`, never beyond now + MAX_OFFSET_MS.

    The next `tick` is then later than `remote`, unless remote lies beyond the bound:
    a peer whose clock runs ahead cannot drag this host's events into its future.
    """
    bound = Hlc(min(now_ms + MAX_OFFSET_MS, MAX_WALL_MS), 0, machine_id)
    seen = min(Hlc(remote.wall_ms, remote.counter, machine_id), bound)
    if last is None or seen > last:
        return seen
    return last


# ==========================================================================
# 3. Event store: schema, migrations, append, query. The only code that writes `events`.
# ==========================================================================

SCHEMA_VERSION = 11
BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another before giving up
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")  # systemd's, then D-Bus's copy
EVENT_TYPE_RE = lazy_re(r"\A[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+\Z")
UUID_RE = lazy_re(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
EVENT_KEYS = ("uuid", "hlc", "machine_id", "event_type", "payload", "created_at")

EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    rseq       INTEGER PRIMARY KEY AUTOINCREMENT,  -- local receipt order: the sync cursor
    uuid       TEXT NOT NULL UNIQUE,
    hlc        TEXT NOT NULL,
    machine_id TEXT NOT NULL,                      -- the host that made the event
    event_type TEXT NOT NULL,
    payload    TEXT NOT NULL,                      -- canonical JSON (sorted keys)
    created_at TEXT NOT NULL,                      -- wall clock, for people only
    hash       TEXT NOT NULL                       -- sha256 of the content, to spot uuid conflicts
);
CREATE INDEX IF NOT EXISTS events_order ON events (hlc, uuid);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
"""
SYNC_SCHEMA = """
CREATE TABLE IF NOT EXISTS sync_cursors (
    peer_machine_id TEXT NOT NULL,
    peer_db_id      TEXT NOT NULL,               -- a restored peer has a new db_id, so a new cursor at 0
    pulled_rseq     INTEGER NOT NULL DEFAULT 0,  -- this host holds every event of the peer's log up to here
    pushed_rseq     INTEGER NOT NULL DEFAULT 0,  -- the peer holds every event of this log up to here
    PRIMARY KEY (peer_machine_id, peer_db_id)
);
CREATE TABLE IF NOT EXISTS sync_peers (          -- what the last sync with each peer did, for people
    url          TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    machine_id   TEXT,
    db_id        TEXT,
    last_ok_ms   INTEGER,
    last_error   TEXT,
    last_try_ms  INTEGER,
    n_failures   INTEGER NOT NULL DEFAULT 0,      -- in a row: drives the background backoff
    n_behind     INTEGER,                         -- peer events not yet pulled, as of the last try
    offset_ms    INTEGER,                         -- peer wall clock minus ours
    n_pulled     INTEGER NOT NULL DEFAULT 0,      -- events new to this host, all time
    n_pushed     INTEGER NOT NULL DEFAULT 0       -- events new to the peer, all time
);
"""
DEFERRED_SCHEMA = """
CREATE TABLE IF NOT EXISTS sync_deferred (       -- peer events held back: stamped beyond now + MAX_OFFSET_MS
    peer_url   TEXT NOT NULL,                    -- where it is fetched from ('pull') or sent to ('push')
    direction  TEXT NOT NULL,                    -- 'pull' or 'push'
    uuid       TEXT NOT NULL,
    hlc        TEXT NOT NULL,                    -- retried once its wall time is within the bound
    reason     TEXT NOT NULL,
    since_ms   INTEGER NOT NULL,
    PRIMARY KEY (peer_url, direction, uuid)
);
"""
# Schema 8: the peer's head as its last answer said it, so `peer list` tells what is still to pull.
# (A comment after ADD COLUMN ends up inside the stored CREATE TABLE and breaks it: none here.)
PEER_HEAD_SCHEMA = """
ALTER TABLE sync_peers ADD COLUMN peer_head INTEGER
"""


@record_type(frozen=True, slots=True)
class Event:
    uuid: str
    hlc: str
    machine_id: str
    event_type: str
    payload: dict[str, Any]
    created_at: str
    rseq: int = 0  # 0 until this host stores it

    def to_json(self) -> dict[str, Any]:
        """Return the event as its portable JSON object (no local rseq)."""
        return {"uuid": self.uuid, "hlc": self.hlc, "machine_id": self.machine_id,
                "event_type": self.event_type, "payload": self.payload, "created_at": self.created_at}


@record_type(frozen=True, slots=True)
class InsertResult:
    inserted: list[Event]  # new to this host, in the order given
    n_duplicates: int  # already here, same content
    conflicts: list[str]  # uuids already here with different content (the stored one is kept)


@record_type(frozen=True, slots=True)
class PeerStatus:
    url: str
    name: str
    machine_id: str | None  # None until the first answer
    db_id: str | None
    last_ok_ms: int | None  # the end of the last round that succeeded
    last_error: str | None  # the message of the last round, if it failed
    last_try_ms: int | None
    n_failures: int  # failed rounds in a row
    n_behind: int | None  # the peer's events this host has not pulled yet
    offset_ms: int | None  # the peer's wall clock minus ours
    n_pulled: int
    n_pushed: int
    peer_head: int | None = None  # the peer's newest receipt number (on the db_id above), as of its last answer

    def to_json(self) -> dict[str, Any]:
        """Return the status as the JSON object the CLI and API print."""
        return {name: getattr(self, name) for name in self.__slots__}


class Db:
    """One SQLite connection with the identity of the log it holds."""

    __slots__ = ("conn", "path", "machine_id", "refusal", "warnings", "full")

    def __init__(self, conn: sqlite3.Connection, path: str, machine_id: str, *, refusal: str | None = None):
        self.conn = conn  # autocommit mode: write_txn() opens every write transaction
        self.path = path
        self.machine_id = machine_id  # stamps every event made here
        self.refusal = refusal  # why writes are refused (a copy made elsewhere: see check_home), or None
        self.warnings: list[str] = []  # what a write here should tell its user (a clock one peer finds off)
        self.full: DiskFull | None = None  # opened for reading only, as the disk was full: every write raises it

    @property
    def db_id(self) -> str:
        """Return the id of the log in the file now; a new one after a restore, so peers restart their cursors.

        Read at every use, never cached: a restore by another process (or a server's other
        connection) changes it under this one, and an old id would make peers skip events.
        """
        return self.conn.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()[0]

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


_MIGRATIONS: dict[int, list[str]] = {}  # version -> SQL scripts; filled by sections 3-4 below
# Run once after an upgrade's migrations (section 4 adds the replay): copying a newer clare.py over
# an older one is the whole upgrade, so what the older one stored without knowing it applies now.
AFTER_UPGRADE: list[Callable[[Db], Any]] = []


def open_db(path: str, *, machine_id: str | None = None, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Db:
    """Open (creating if needed) the Clare database at `path` and bring its schema up to date."""
    if path != ":memory:":
        folder = os.path.dirname(os.path.abspath(path))
        try:
            make_private_dir(folder)
            # SECURITY: the log holds every prompt and broadcast; SQLite gives -wal and -shm this mode too.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as err:
            raise ClareError(f"cannot create the folder {folder} for the database: {err.strerror}; "
                             "pick another --home or --db") from err
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_ms / 1000,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous_mode()}")
        conn.row_factory = sqlite3.Row
        meta = _read_meta(conn)
        if meta.get("schema_version") != str(SCHEMA_VERSION) or "machine_id" not in meta:
            meta = _migrate(conn, meta, machine_id=machine_id)
        refusal = None if path == ":memory:" else _check_home(conn, meta, path=os.path.realpath(path))
        if path != ":memory:":
            _check_served(conn, path, meta["db_id"])
    except sqlite3.DatabaseError as err:
        full = storage_error(path, err)
        if full is not None:
            return _open_read_only(path, full)
        raise ClareError(f"cannot open database {path}: {err}; check the path, or move a damaged "
                         "file aside and restore it from a peer with 'clare sync'") from err
    db = Db(conn, path, meta["machine_id"], refusal=refusal)
    if "needs_replay" in meta and refusal is None:
        _finish_upgrade(db)
    return db


def _finish_upgrade(db: Db) -> None:
    """Run what an upgrade leaves after its migrations, then forget it; a crash before the end runs it again."""
    for after_upgrade in AFTER_UPGRADE:
        after_upgrade(db)
    with write_txn(db) as cur:
        cur.execute("DELETE FROM meta WHERE key = 'needs_replay'")


SYNCHRONOUS_MODES = ("FULL", "NORMAL")


def synchronous_mode(env: dict[str, str] | None = None) -> str:
    """Return SQLite's synchronous setting: FULL unless CLARE_SYNCHRONOUS=NORMAL (test suites, throwaway hosts).

    FULL: an acknowledged write survives a power cut, not only kill -9. Measured on ext4 (2 cores):
    +7 ms per write transaction, a CLI write ~10 % slower, an API write 0.6 -> 8 ms; durability wins.
    """
    value = (os.environ if env is None else env).get("CLARE_SYNCHRONOUS", "FULL").upper()
    if value not in SYNCHRONOUS_MODES:
        raise UsageError(f"CLARE_SYNCHRONOUS={value[:20]!r} is not FULL or NORMAL; unset it for FULL")
    return value


SERVED_SUFFIX = ".served"  # beside the database: "DB_ID RSEQ", the highest receipt number peers were told of


def _check_served(conn: sqlite3.Connection, path: str, db_id: str) -> None:
    """Give the log a new db_id if it ends below a receipt number peers were told of (a lost -wal).

    A -wal lost after kill -9 (or a power cut under synchronous=NORMAL) takes the newest events
    with it, and the next events reuse their receipt numbers under the same db_id: a peer whose
    cursor is past them would skip them for good. The mark lives outside the database, so
    the loss cannot take it too; under a new db_id peers read this log again from 0.
    """
    served = read_served(path)
    if served is None or served[0] != db_id:
        return
    head = conn.execute("SELECT coalesce(max(rseq), 0) FROM events").fetchone()[0]
    if head < served[1]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()[0] == db_id:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'db_id'", (new_uuid(),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def read_served(path: str) -> tuple[str, int] | None:
    """Return (db_id, rseq) of the served mark beside the database, None if there is none (or it is garbled)."""
    try:
        with open(path + SERVED_SUFFIX, encoding="ascii") as f:
            db_id, rseq = f.read(200).split()
        return db_id, int(rseq)
    except (OSError, ValueError):
        return None


def note_served(db: Db, db_id: str, rseq: int) -> None:
    """Raise the served mark to `rseq` before peers are told of it; written only when it grows.

    Inside a write transaction, so two servers' threads never lower each other's mark; written
    to a new file, synced and renamed, so a crash leaves the old mark or the new one.
    """
    served = read_served(db.path)
    if db.path == ":memory:" or (served is not None and served[0] == db_id and served[1] >= rseq):
        return
    with write_txn(db):
        served = read_served(db.path)
        if served is not None and served[0] == db_id and served[1] >= rseq:
            return
        staging = f"{db.path}{SERVED_SUFFIX}.tmp"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = f"{db_id} {rseq}\n".encode()
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staging, db.path + SERVED_SUFFIX)


LOW_SPACE_BYTES = 1024 * 1024  # with less free than this, an I/O error while writing is a full disk


def storage_error(path: str, err: BaseException) -> DiskFull | None:
    """Return the plain error for a write that found no room (a full disk, or SQLite's size limit); else None.

    A full disk used to read "disk I/O error ... move a damaged file aside": advice that throws
    away an intact database and its unsynced writes.
    """
    code = getattr(err, "sqlite_errorcode", None)
    is_full = code is not None and code & 0xFF == 13  # SQLITE_FULL
    is_io = (code is not None and code & 0xFF == 10) or (isinstance(err, OSError) and err.errno == errno.ENOSPC)
    free = free_bytes(path)
    if not is_full and not (is_io and free is not None and free < LOW_SPACE_BYTES):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    return DiskFull(f"the disk is full ({'?' if free is None else free} bytes free at {folder}); free space and "
                    "retry — nothing was lost")


def free_bytes(path: str) -> int | None:
    """Return the bytes free for this user on the filesystem that holds `path`, None if unknown."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _open_read_only(path: str, full: DiskFull) -> "Db":
    """Open a database the full disk keeps from opening for writing, for reading only, if SQLite can.

    Without a -wal beside it the file holds every committed event, and an immutable read needs no
    -shm (which a full disk cannot create); every write through it raises `full` again.
    """
    if os.path.exists(path + "-wal") and os.path.getsize(path + "-wal") > 0:
        raise full  # its newest events are in the -wal: reading without it would show an older log
    try:
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?immutable=1", uri=True, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        meta = _read_meta(conn)
    except sqlite3.DatabaseError as err:
        raise full from err
    if "machine_id" not in meta:
        raise full
    db = Db(conn, path, meta["machine_id"])
    db.full = full
    return db


def _read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    try:
        return {r[0]: r[1] for r in conn.execute("SELECT key, value FROM meta")}
    except sqlite3.OperationalError:  # a new file: no meta table yet
        return {}


def _migrate(conn: sqlite3.Connection, meta: dict[str, str], *, machine_id: str | None) -> dict[str, str]:
    """Create or upgrade the schema in one transaction; refuse a newer database."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        meta = _read_meta(conn)  # again, now that we hold the write lock
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise ClareError(f"this database has schema version {version}, newer than this clare.py "
                             f"({__version__}, schema {SCHEMA_VERSION}) understands; upgrade clare.py")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for script in _MIGRATIONS.get(v, ()):  # a version may bring no SQL of its own
                for statement in script.split(";\n"):
                    if statement.strip():
                        conn.execute(statement)
        fresh = {"schema_version": str(SCHEMA_VERSION),
                 "machine_id": meta.get("machine_id") or check_machine_id(machine_id or new_machine_id()),
                 "db_id": meta.get("db_id") or new_uuid()}
        if 0 < version < SCHEMA_VERSION:
            fresh["needs_replay"] = "1"  # in this transaction: a crash before the replay leaves it to do
        conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", fresh.items())
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return {**meta, **fresh}


_MIGRATIONS[1] = [EVENTS_SCHEMA, SYNC_SCHEMA]
_MIGRATIONS[5] = [DEFERRED_SCHEMA]
_MIGRATIONS[8] = [PEER_HEAD_SCHEMA]  # section 4 adds the hosts table


# --- where the database runs: a copy made elsewhere must not write under the same machine id ----

def machine_key() -> str:
    """Return what names this machine: /etc/machine-id (or D-Bus's copy of it), else the host name."""
    for path in MACHINE_ID_FILES:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(path, encoding="ascii") as f:
                text = f.read(200).strip()
            if text:
                return text
    return "host:" + os.uname().nodename  # a container without a machine-id file: its own host name


def check_home(recorded: tuple[str, str] | None, *, machine: str, path: str,
               db_id: str, db_id_at: Callable[[str], str | None]) -> str | None:
    """Return why a database is a copy made elsewhere, or None when it may write here.

    `recorded` is the (machine, real path) the database last ran at. The rule:
    - another machine (a cloned VM or disk, a copied home): a copy;
    - the same machine, another path: a copy only while the recorded path still holds this
      very log (same db_id), i.e. two live copies; otherwise the file was moved, and may write.
    So a backup copied back over the same path, a moved home, and a test's fresh database in a
    new temporary folder all write; `cp -r ~/.local/share/clare /elsewhere` does not.
    """
    if recorded is None or recorded == (machine, path):
        return None
    was_machine, was_path = recorded
    if was_machine != machine:
        return (f"{path} was set up on another machine (machine-id {was_machine[:12]}, here {machine[:12]}): "
                "it is a copy")
    if db_id_at(was_path) == db_id:
        return f"{path} is a copy of {was_path}, which is still in use"
    return None


def _check_home(conn: sqlite3.Connection, meta: dict[str, str], *, path: str) -> str | None:
    machine = machine_key()
    recorded = (meta["home_machine"], meta["home_path"]) if "home_machine" in meta and "home_path" in meta else None
    problem = check_home(recorded, machine=machine, path=path, db_id=meta["db_id"], db_id_at=_db_id_at)
    if problem is not None:
        return (f"{problem}; writes are refused so that two Clares never share one machine id "
                f"({meta['machine_id']}): give this copy its own with: clare init --new-id (the log is kept)")
    if recorded != (machine, path):  # a new or older database, or a moved one: remember where it runs now
        conn.execute("BEGIN IMMEDIATE")
        try:
            _set_home(conn.cursor(), machine=machine, path=path)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return None


def _set_home(cur: sqlite3.Cursor, *, machine: str, path: str) -> None:
    cur.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (("home_machine", machine), ("home_path", path)))


def _db_id_at(path: str) -> str | None:
    """Return the db_id of the Clare database at `path`, or None if there is none (moved, deleted)."""
    if not os.path.exists(path):
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return _read_meta(conn).get("db_id")
        finally:
            conn.close()
    except sqlite3.DatabaseError:  # not a database any more: the copy is the one in use
        return None


_RECENT_HEADS: dict[str, tuple[int, float]] = {}  # db path -> (head, monotonic time it was read); see recent_head
_WRITTEN_AT: dict[str, float] = {}  # db path -> when this process last committed a write to it


@contextlib.contextmanager
def write_txn(db: Db) -> Iterator[sqlite3.Cursor]:
    """Run the block in one BEGIN IMMEDIATE transaction: all of it is stored, or none.

    A write that finds no room (SQLITE_FULL, or an I/O error on a full disk) rolls back and
    raises DiskFull: the database keeps everything committed before.
    """
    if db.refusal is not None:
        raise Conflict(db.refusal)
    if db.full is not None:
        raise db.full
    cur = db.conn.cursor()
    try:
        cur.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as err:
        full = storage_error(db.path, err)
        if full is not None:
            raise full from err
        raise ClareError(f"database {db.path} is busy ({err}); another Clare holds it too long, "
                         "try again") from err
    try:
        yield cur
        cur.execute("COMMIT")
        _RECENT_HEADS.pop(db.path, None)  # a reader of recent_head (below) sees this write at once
        _WRITTEN_AT[db.path] = time.monotonic()
    except BaseException as err:
        if db.conn.in_transaction:  # SQLite rolls back by itself after some SQLITE_FULL errors
            cur.execute("ROLLBACK")
        full = storage_error(db.path, err) if isinstance(err, (sqlite3.Error, OSError)) else None
        if full is not None:
            raise full from err
        raise


@contextlib.contextmanager
def read_txn(db: Db) -> Iterator[None]:
    """Run the block's reads on one snapshot of the file: a write or a restore meanwhile is not seen."""
    if db.conn.in_transaction:  # already inside one: that snapshot holds
        yield
        return
    db.conn.execute("BEGIN")
    try:
        yield
    finally:
        db.conn.execute("COMMIT")


def get_meta(cur: sqlite3.Cursor, key: str) -> str | None:
    """Return one value of the meta table."""
    row = cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(cur: sqlite3.Cursor, key: str, value: str) -> None:
    """Store one value in the meta table."""
    cur.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def get_secret(db: Db, name: str) -> str:
    """Return a random secret kept in this database's meta table, made on first use; never synced."""
    row = db.conn.execute("SELECT value FROM meta WHERE key = ?", (name,)).fetchone()
    if row is not None:
        return row[0]
    import secrets  # only the server needs secrets

    with write_txn(db) as cur:
        value = get_meta(cur, name) or secrets.token_urlsafe(32)
        set_meta(cur, name, value)
    return value


def load_clock(cur: sqlite3.Cursor, *, machine_id: str, now_ms: int) -> Hlc | None:
    """Return the last HLC this host issued or merged, seeded from the log when unknown.

    Read inside the write transaction, so concurrent writers on one file never reuse a value.
    """
    text = get_meta(cur, "clock")
    if text is not None:
        return parse_hlc(text)
    row = cur.execute("SELECT max(hlc) FROM events").fetchone()
    return merge(None, parse_hlc(row[0]), machine_id=machine_id, now_ms=now_ms) if row[0] else None


def save_clock(cur: sqlite3.Cursor, clock: Hlc) -> None:
    """Remember the clock so the next process continues after it."""
    set_meta(cur, "clock", str(clock))


def canonical_json(value: Any) -> str:
    """Return JSON with sorted keys and no spaces: one text per value, for hashes and storage."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_hash(ev: Event, payload_text: str) -> str:
    """Return the content hash of an event (everything but the local rseq)."""
    text = "\x1f".join((ev.uuid, ev.hlc, ev.machine_id, ev.event_type, payload_text, ev.created_at))
    if not _SHA256:
        _SHA256.append(_builtin_sha256())
    return _SHA256[0](text.encode()).hexdigest()


_SHA256: list[Callable[[bytes], Any]] = []  # _builtin_sha256(), found once: a batch hashes every event


def _builtin_sha256() -> Callable[[bytes], Any]:
    """Return Python's built-in SHA-256: hashlib's first use loads OpenSSL (≈ 9 ms of a `task add`)."""
    for name in ("_sha256", "_sha2"):  # its module in Python 3.11, and from 3.12 on
        with contextlib.suppress(ImportError):
            return __import__(name).sha256
    import hashlib  # pragma: no cover  # a build without the built-in one: the same digest, from OpenSSL

    return hashlib.sha256  # pragma: no cover


def make_event(db: Db, cur: sqlite3.Cursor, event_type: str, payload: dict[str, Any], *,
               now_ms: int) -> Event:
    """Append one new local event, stamped by this host's clock. Call inside write_txn."""
    clock = tick(load_clock(cur, machine_id=db.machine_id, now_ms=now_ms),
                 machine_id=db.machine_id, now_ms=now_ms)
    save_clock(cur, clock)
    ev = Event(new_uuid(), str(clock), db.machine_id, event_type, payload, iso_ms(now_ms))
    result = insert_events(cur, [check_event(ev.to_json())])
    return result.inserted[0]


def check_event(obj: object) -> Event:
    """Validate the form of one event from outside (peer, file); raise ClareError with the reason."""
    if not isinstance(obj, dict):
        raise ClareError("event is not a JSON object")
    missing = [k for k in EVENT_KEYS if k not in obj]
    if missing:
        raise ClareError(f"event lacks {', '.join(missing)}")
    for key in ("uuid", "hlc", "machine_id", "event_type", "created_at"):
        if not isinstance(obj[key], str):
            raise ClareError(f"event {key} must be a string")
    if not UUID_RE.match(obj["uuid"]):
        raise ClareError(f"event uuid {obj['uuid'][:60]!r} is not a lowercase uuid")
    hlc = parse_hlc(obj["hlc"])
    if hlc.machine_id != obj["machine_id"]:
        raise ClareError(f"event hlc {obj['hlc']!r} does not end with its machine_id {obj['machine_id']!r}")
    if not EVENT_TYPE_RE.match(obj["event_type"]) or len(obj["event_type"]) > 64:
        raise ClareError(f"event_type {obj['event_type'][:60]!r} is not of the form noun.verb")
    if not isinstance(obj["payload"], dict):
        raise ClareError("event payload must be a JSON object")
    if len(obj["created_at"]) > 40 or not obj["created_at"].isprintable() or not obj["created_at"].isascii():
        raise ClareError("event created_at is not ISO-8601 text of up to 40 characters")
    if not _ENCODE_PAYLOAD:
        _ENCODE_PAYLOAD.append(json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                                allow_nan=False).encode)
    try:  # canonical_json's text (NaN refused), made once: insert_events stores it
        text = _ENCODE_PAYLOAD[0](obj["payload"])
        size = len(text.encode())
    except ValueError as err:  # SECURITY: NaN/Infinity (allow_nan) and lone surrogates (UnicodeEncodeError)
        what = "a lone surrogate, which is not UTF-8 text" if isinstance(err, UnicodeEncodeError) else \
            "NaN or Infinity, which standard JSON lacks"
        raise ClareError(f"event payload holds {what}; send standard JSON") from None
    if size > MAX_PAYLOAD_BYTES:
        raise ClareError(f"event payload is over {MAX_PAYLOAD_BYTES} bytes")
    for key, value in obj["payload"].items():  # SECURITY: ids end up in URLs and headers (Location)
        ids = value if key.endswith("_ids") and isinstance(value, list) else [value] if key.endswith("_id") else []
        for one in ids:
            if isinstance(one, str) and not ID_RE.match(one):
                raise ClareError(f"event payload {key} {one[:60]!r} is not an id: up to 64 letters, digits "
                                 "and . _ : @ % + -")
    payload = CheckedPayload(obj["payload"])
    payload.text = text
    return Event(obj["uuid"], obj["hlc"], obj["machine_id"], obj["event_type"], payload, obj["created_at"])


_ENCODE_PAYLOAD: list[Callable[[Any], str]] = []  # canonical_json's encoder, refusing NaN: made once


class CheckedPayload(dict[str, Any]):
    """A payload as check_event let it in, with its canonical JSON text: a batch encodes each event once."""

    __slots__ = ("text",)
    text: str  # json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False): what canonical_json makes


def insert_events(cur: sqlite3.Cursor, events: Iterable[Event]) -> InsertResult:
    """Store events not yet here (by uuid); report duplicates and same-uuid conflicts. In a txn.

    A batch at once: written by one executemany, the receipt numbers of the new ones read back,
    and only the uuids that were here already looked up.
    """
    events = list(events)
    rows = []
    for ev in events:
        text = ev.payload.text if type(ev.payload) is CheckedPayload else canonical_json(ev.payload)
        rows.append((ev.uuid, ev.hlc, ev.machine_id, ev.event_type, text, ev.created_at, event_hash(ev, text)))
    head = head_rseq(cur)  # AUTOINCREMENT: every new rseq is past it, in the order inserted
    cur.executemany("""INSERT OR IGNORE INTO events (uuid, hlc, machine_id, event_type, payload, created_at, hash)
                       VALUES (?, ?, ?, ?, ?, ?, ?)""", rows)
    new = {r[1]: r[0] for r in cur.execute("SELECT rseq, uuid FROM events WHERE rseq > ?", (head,))}
    inserted, left = [], []
    for ev, row in zip(events, rows, strict=True):
        rseq = new.pop(ev.uuid, None)  # popped: a second copy in the batch was ignored, like one stored before
        if rseq is None:
            left.append((ev.uuid, row[-1]))
        else:  # dataclasses.replace costs 3x as much
            inserted.append(Event(ev.uuid, ev.hlc, ev.machine_id, ev.event_type, ev.payload, ev.created_at, rseq))
    conflicts, n_duplicates = [], 0
    for i in range(0, len(left), 500):  # stay under SQLite's host-parameter limit
        chunk = left[i:i + 500]
        stored = dict((r[0], r[1]) for r in cur.execute(
            f"SELECT uuid, hash FROM events WHERE uuid IN ({','.join('?' * len(chunk))})", [u for u, _ in chunk]))
        for uuid_, digest in chunk:
            if stored[uuid_] == digest:
                n_duplicates += 1
            else:
                conflicts.append(uuid_)
    return InsertResult(inserted, n_duplicates, conflicts)


def _event_from_row(row: Sequence[Any]) -> Event:
    rseq, uuid_, hlc, machine_id, event_type, payload, created_at = row  # as in _EVENT_COLUMNS
    return Event(uuid_, hlc, machine_id, event_type, _load_payload(payload), created_at, rseq)


_SCAN_JSON: list[Callable[[str, int], tuple[Any, int]]] = []  # json's C scanner, made on first use


def _load_payload(text: str) -> Any:
    """Return a stored payload parsed: its text is canonical (no blanks), so json's C scanner alone reads it."""
    # json.loads would first match the leading and trailing blanks with two regular expressions: a replay
    # of a million events spends a tenth of its time there.
    if not _SCAN_JSON:
        _SCAN_JSON.append(json.JSONDecoder().scan_once)  # type: ignore[attr-defined]  # the C scanner json.loads uses
    try:
        value, end = _SCAN_JSON[0](text, 0)
    except StopIteration:
        return json.loads(text)  # not JSON: json.loads says what is wrong
    return value if end == len(text) else json.loads(text)


_EVENT_COLUMNS = "rseq, uuid, hlc, machine_id, event_type, payload, created_at"


def list_events(db: Db, *, limit: int = 50) -> list[Event]:
    """Return the newest `limit` events in (hlc, uuid) order, newest last."""
    rows = db.conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY hlc DESC, uuid DESC LIMIT ?", (limit,)).fetchall()
    return [_event_from_row(r) for r in reversed(rows)]


def list_own_events(db: Db, types: Iterable[str], *, before_rseq: int | None = None, limit: int = 50) -> list[Event]:
    """Return this host's newest events of some types, newest first (by receipt, which for its own is creation)."""
    types = tuple(types)
    rows = db.conn.execute(
        f"""SELECT {_EVENT_COLUMNS} FROM events WHERE machine_id = ? AND rseq < ?
              AND event_type IN ({','.join('?' * len(types))}) ORDER BY rseq DESC LIMIT ?""",
        (db.machine_id, before_rseq or 2**62, *types, limit)).fetchall()
    return [_event_from_row(r) for r in rows]


def iter_events(db: Db, *, after: int = 0, batch: int = 1000) -> Iterator[Event]:
    """Yield every event with rseq > after, in local receipt order, a page at a time."""
    cur = db.conn.cursor()
    cur.row_factory = None  # plain tuples: a replay reads a million rows, sqlite3.Row costs a third more
    while True:
        rows = cur.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE rseq > ? ORDER BY rseq LIMIT ?",
                           (after, batch)).fetchall()
        yield from map(_event_from_row, rows)
        if len(rows) < batch:
            return
        after = rows[-1][0]


def list_events_after(db: Db, *, after: int, limit: int, max_chars: int) -> list[Event]:
    """Return up to `limit` events with rseq > after in receipt order, stopping once payloads pass max_chars."""
    cur = db.conn.cursor()
    cur.row_factory = None  # plain tuples, as in iter_events
    rows = cur.execute(f"SELECT {_EVENT_COLUMNS}, length(payload) FROM events WHERE rseq > ? ORDER BY rseq LIMIT ?",
                       (after, limit)).fetchall()
    events, n_chars = [], 0
    for row in rows:
        events.append(_event_from_row(row[:-1]))
        n_chars += row[-1]
        if n_chars >= max_chars:
            break
    return events


def get_events_by_uuid(db: Db, uuids: Iterable[str]) -> list[Event]:
    """Return the stored events among `uuids`, in (hlc, uuid) order."""
    wanted = list(uuids)
    found: list[sqlite3.Row] = []
    for i in range(0, len(wanted), 500):  # stay under SQLite's host-parameter limit
        chunk = wanted[i:i + 500]
        found += db.conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE uuid IN ({','.join('?' * len(chunk))})", chunk)
    return sorted(map(_event_from_row, found), key=lambda e: (e.hlc, e.uuid))


def count_events(db: Db) -> int:
    """Return how many events the log holds."""
    return db.conn.execute("SELECT count(*) FROM events").fetchone()[0]


def head_rseq(cur: sqlite3.Cursor | sqlite3.Connection) -> int:
    """Return the receipt number of the newest stored event, 0 for an empty log."""
    return cur.execute("SELECT coalesce(max(rseq), 0) FROM events").fetchone()[0]


HEAD_MAX_AGE_S = 0.005  # recent_head reads the log's head at most this often per database


def recent_head(db: Db) -> int:
    """Return head_rseq as read at most HEAD_MAX_AGE_S ago: a page cache asks it on every request.

    A write through this process forgets it (write_txn), so a client never misses its own
    write; another process's write is seen within HEAD_MAX_AGE_S.
    """
    now = time.monotonic()
    seen = _RECENT_HEADS.get(db.path)
    if seen is not None and now - seen[1] < HEAD_MAX_AGE_S:
        return seen[0]
    head = head_rseq(db.conn)
    _RECENT_HEADS[db.path] = (head, now)
    return head


def renew_identity(db: Db, *, machine_id: str | None = None) -> tuple[str, str]:
    """Give this database a new machine id and db_id, keep its log, and record where it runs now.

    The fix for a copy (check_home): events already made keep the id they were made under,
    and peers read this log again from 0 under its new db_id.
    """
    machine_id = check_machine_id(machine_id or new_machine_id())
    if machine_id == db.machine_id:
        raise UsageError(f"{machine_id!r} is this database's machine id already; give another, or none")
    db_id = new_uuid()
    db.refusal = None  # the one write a copy may make: the one that makes it a host of its own
    with write_txn(db) as cur:
        for key, value in (("machine_id", machine_id), ("db_id", db_id)):
            set_meta(cur, key, value)
        _set_home(cur, machine=machine_key(), path=os.path.realpath(db.path))
    db.machine_id = machine_id
    return machine_id, db_id


def restore_db(db: Db, backup_path: str) -> str:
    """Replace the whole database by a backup file of it under a new db_id; return that id.

    The new db_id makes every peer read this log again from 0: receipt numbers after the
    backup's last one will name other events than before. So the id is set in a copy of the
    backup first, and the copy goes into place in one SQLite write transaction: a crash leaves
    the old file or the restored one with its new id, never the backup's events under the old id.
    Not a file rename: open connections (a running server's) would keep the old file, and a
    stale -wal beside the renamed file would corrupt it.
    """
    if db.refusal is not None:
        raise Conflict(db.refusal)
    staging = f"{db.path}.restore"
    _remove_db_files(staging)  # left by a restore that crashed; a stale journal would be rolled into the copy
    try:
        src = sqlite3.connect(f"file:{os.path.abspath(backup_path)}?mode=ro", uri=True)
        copy = sqlite3.connect(staging, isolation_level=None)
        try:
            meta = _read_meta(src)
            if meta.get("machine_id") != db.machine_id:
                raise ClareError(f"{backup_path} is not a backup of this database (machine id "
                                 f"{meta.get('machine_id')!r}, not {db.machine_id!r}); give a copy of {db.path}")
            src.backup(copy)
            db_id = new_uuid()
            set_meta(copy.cursor(), "db_id", db_id)
            _set_home(copy.cursor(), machine=machine_key(), path=os.path.realpath(db.path))
            copy.backup(db.conn)
        finally:
            src.close()
            copy.close()
            _remove_db_files(staging)
    except sqlite3.DatabaseError as err:
        raise ClareError(f"cannot read {backup_path} as a Clare database ({err}); check the path") from err
    return db_id


def is_unreadable(path: str) -> bool:
    """Say whether the file at `path` exists but SQLite cannot read it as a database (damaged, or not one)."""
    if not os.path.exists(path):
        return False
    try:
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
        try:
            return conn.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok"
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return True


def restore_in_place_of(path: str, backup_path: str) -> tuple[str, str | None]:
    """Put a backup where an unreadable or missing database was, under a new db_id; return (db_id, damaged file).

    Nothing is written until the backup has been read and checked; the damaged file is kept
    beside under another name, never deleted: it may hold what no peer has.
    """
    staging = f"{path}.restore"
    _remove_db_files(staging)
    try:
        src = sqlite3.connect(f"file:{os.path.abspath(backup_path)}?mode=ro", uri=True)
        try:
            meta = _read_meta(src)
            if not meta.get("machine_id"):
                raise ClareError(f"{backup_path} is not a Clare database (it has no machine id); give a copy "
                                 "of clare.db made earlier")
            copy = sqlite3.connect(staging, isolation_level=None)
            try:
                src.backup(copy)
                db_id = new_uuid()
                set_meta(copy.cursor(), "db_id", db_id)
            finally:
                copy.close()
        finally:
            src.close()
    except BaseException as err:
        _remove_db_files(staging)
        if isinstance(err, sqlite3.DatabaseError):
            raise ClareError(f"cannot read {backup_path} as a Clare database ({err}); check the path") from err
        raise
    aside = None
    if os.path.exists(path):
        aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, aside + suffix)
    os.replace(staging, path)
    return db_id, aside


def _remove_db_files(path: str) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


def get_cursor(db: Db, peer_machine_id: str, peer_db_id: str) -> tuple[int, int]:
    """Return (pulled_rseq, pushed_rseq) for one peer log; (0, 0) for a log never synced."""
    row = db.conn.execute(
        """SELECT pulled_rseq, pushed_rseq FROM sync_cursors
            WHERE peer_machine_id = ? AND peer_db_id = ?""", (peer_machine_id, peer_db_id)).fetchone()
    return (row[0], row[1]) if row else (0, 0)


def save_cursor(cur: sqlite3.Cursor, peer_machine_id: str, peer_db_id: str, *,
                pulled_rseq: int | None = None, pushed_rseq: int | None = None, reset: bool = False) -> None:
    """Advance the cursors of one peer log (never backwards unless `reset`). Call inside write_txn.

    Two syncs with one peer may run at once (serve's thread and the CLI): each stored its
    page before this, so the larger of the two positions is right.
    """
    cur.execute("INSERT OR IGNORE INTO sync_cursors (peer_machine_id, peer_db_id) VALUES (?, ?)",
                (peer_machine_id, peer_db_id))
    for column, value in (("pulled_rseq", pulled_rseq), ("pushed_rseq", pushed_rseq)):
        if value is not None:
            new = "?" if reset else f"max({column}, ?)"
            cur.execute(f"""UPDATE sync_cursors SET {column} = {new}
                             WHERE peer_machine_id = ? AND peer_db_id = ?""",
                        (value, peer_machine_id, peer_db_id))


def iter_event_keys(db: Db) -> Iterator[tuple[str, str]]:
    """Yield (hlc, uuid) of every event in (hlc, uuid) order, from the index alone."""
    for row in db.conn.execute("SELECT hlc, uuid FROM events ORDER BY hlc, uuid"):
        yield row[0], row[1]


def list_uuids_between(db: Db, *, start_ms: int, end_ms: int) -> list[str]:
    """Return the uuids of the events whose HLC wall time is in [start_ms, end_ms), in (hlc, uuid) order."""
    rows = db.conn.execute("SELECT uuid FROM events WHERE hlc >= ? AND hlc < ? ORDER BY hlc, uuid",
                           (f"{start_ms:013d}", f"{end_ms:013d}"))
    return [r[0] for r in rows]


def save_peer_status(db: Db, url: str, *, name: str, now_ms: int, error: str | None = None,
                     machine_id: str | None = None, db_id: str | None = None, n_behind: int | None = None,
                     offset_ms: int | None = None, n_pulled: int = 0, n_pushed: int = 0,
                     peer_head: int | None = None) -> None:
    """Record how a round with one peer ended: its identity and lag on success, the message on failure."""
    with write_txn(db) as cur:
        cur.execute("INSERT OR IGNORE INTO sync_peers (url, name) VALUES (?, ?)", (url, name))
        if error is None:
            cur.execute(
                """UPDATE sync_peers SET name = ?, machine_id = ?, db_id = ?, last_ok_ms = ?, last_try_ms = ?,
                          last_error = NULL, n_failures = 0, n_behind = ?, offset_ms = ?,
                          n_pulled = n_pulled + ?, n_pushed = n_pushed + ?, peer_head = ?
                    WHERE url = ?""",
                (name, machine_id, db_id, now_ms, now_ms, n_behind, offset_ms, n_pulled, n_pushed, peer_head, url))
        else:
            cur.execute(
                """UPDATE sync_peers SET name = ?, last_error = ?, last_try_ms = ?, n_failures = n_failures + 1,
                          n_pulled = n_pulled + ?, n_pushed = n_pushed + ?
                    WHERE url = ?""", (name, error, now_ms, n_pulled, n_pushed, url))


def forget_peer_status(db: Db, url: str) -> None:
    """Drop what the syncs with one peer did; its cursors stay, so adding it again resumes."""
    with write_txn(db) as cur:
        cur.execute("DELETE FROM sync_peers WHERE url = ?", (url,))


def list_peer_status(db: Db) -> list[PeerStatus]:
    """Return what the last round with each peer did, by name."""
    rows = db.conn.execute(
        """SELECT url, name, machine_id, db_id, last_ok_ms, last_error, last_try_ms, n_failures, n_behind,
                  offset_ms, n_pulled, n_pushed, peer_head FROM sync_peers ORDER BY name, url""")
    return [PeerStatus(*r) for r in rows]


def count_unsent(db: Db, *, after: int, peer_machine_id: str) -> int:
    """Return how many events past receipt number `after` are still to send to a peer (not its own ones)."""
    return db.conn.execute("SELECT count(*) FROM events WHERE rseq > ? AND machine_id != ?",
                           (after, peer_machine_id)).fetchone()[0]


@record_type(frozen=True, slots=True)
class Deferred:
    peer_url: str
    direction: str  # 'pull': fetch it from the peer once within the bound; 'push': send it again then
    uuid: str
    hlc: str
    reason: str
    since_ms: int

    def to_json(self) -> dict[str, Any]:
        """Return the entry as the JSON object the CLI and API print."""
        return {name: getattr(self, name) for name in self.__slots__}


def save_deferred(cur: sqlite3.Cursor, peer_url: str, direction: str, held: Iterable[tuple[Event, str]], *,
                  now_ms: int) -> None:
    """Remember events held back from or by a peer, with the reason, to retry them later. In a txn."""
    cur.executemany(
        """INSERT OR IGNORE INTO sync_deferred (peer_url, direction, uuid, hlc, reason, since_ms)
           VALUES (?, ?, ?, ?, ?, ?)""",
        ((peer_url, direction, ev.uuid, ev.hlc, reason, now_ms) for ev, reason in held))


def drop_deferred(cur: sqlite3.Cursor, peer_url: str, direction: str, uuids: Iterable[str]) -> None:
    """Forget deferred entries that went through; and every 'pull' entry whose event is stored now. In a txn."""
    cur.executemany("DELETE FROM sync_deferred WHERE peer_url = ? AND direction = ? AND uuid = ?",
                    ((peer_url, direction, u) for u in uuids))
    cur.execute("""DELETE FROM sync_deferred WHERE direction = 'pull'
                    AND EXISTS (SELECT 1 FROM events WHERE events.uuid = sync_deferred.uuid)""")


def list_deferred(db: Db, *, peer_url: str | None = None, direction: str | None = None,
                  max_wall_ms: int | None = None) -> list[Deferred]:
    """Return the deferred entries (of one peer, one direction, stamped up to max_wall_ms), oldest stamp first."""
    rows = db.conn.execute(
        """SELECT peer_url, direction, uuid, hlc, reason, since_ms FROM sync_deferred
            WHERE (?1 IS NULL OR peer_url = ?1) AND (?2 IS NULL OR direction = ?2) AND (?3 IS NULL OR hlc < ?3)
            ORDER BY hlc, uuid""",
        (peer_url, direction, None if max_wall_ms is None else f"{max_wall_ms + 1:013d}"))
    return [Deferred(*r) for r in rows]


CLOCK_VOTE_MAX_AGE_MS = 15 * 60 * 1000  # a peer's clock offset measured longer ago than this no longer counts


@record_type(frozen=True, slots=True)
class ClockCheck:
    """What this host's peers say of its wall clock, and how far its stored HLC runs ahead of it."""

    n_votes: int  # reachable peers: a round succeeded with each lately
    ahead_of: tuple[str, ...]  # peers that find this clock ahead of theirs by more than MAX_OFFSET_MS
    behind: tuple[str, ...]  # ... and behind theirs
    offset_ms: int  # this clock minus the skewed peers' (their median), 0 when none is skewed
    hlc_ahead_ms: int  # the stored HLC minus the wall clock, when over MAX_OFFSET_MS; else 0

    @property
    def is_refused(self) -> bool:
        """Say whether user writes are refused: two or more reachable peers, a majority, agree it is off."""
        n = max(len(self.ahead_of), len(self.behind))
        return n >= 2 and 2 * n > self.n_votes

    @property
    def message(self) -> str | None:
        """Return the one line that says what is off and the fix; None when all is well."""
        peers = self.ahead_of if len(self.ahead_of) >= len(self.behind) else self.behind
        if not peers:
            return None
        way = "ahead of" if self.offset_ms > 0 else "behind"
        said = (f"this host's clock is {_duration(abs(self.offset_ms))} {way} {len(peers)} of its "
                f"{self.n_votes} reachable peers ({', '.join(peers)}), more than the {MAX_OFFSET_MS // 60000} min "
                "allowed")
        if self.is_refused:
            return (f"{said}: user writes are refused so they cannot win every conflict (nothing was written); "
                    "fix this host's clock (timedatectl set-ntp true, or chronyc makestep) and retry")
        return (f"{said}; one peer is not enough to refuse writes: check the clocks (timedatectl) of this host "
                "and that peer")

    @property
    def hlc_message(self) -> str | None:
        """Say that the stored HLC runs ahead of the wall clock (a clock that was ahead, then fixed)."""
        if not self.hlc_ahead_ms:
            return None
        return (f"this host's stored clock (HLC) is {_duration(self.hlc_ahead_ms)} ahead of its wall clock, "
                "as after a clock that ran ahead and was fixed: its new events carry that time, and peers hold "
                "them back (deferred) until real time is within "
                f"{MAX_OFFSET_MS // 60000} min of it; nothing is lost, it passes by itself")

    def to_json(self) -> dict[str, Any]:
        """Return the check as the JSON object status prints."""
        return {**{name: getattr(self, name) for name in self.__slots__}, "is_refused": self.is_refused,
                "message": self.message, "hlc_message": self.hlc_message}


def check_clock(cur: sqlite3.Cursor | sqlite3.Connection, *, machine_id: str, now_ms: int) -> ClockCheck:
    """Return what the peers' last rounds say of this host's clock, and its stored HLC's lead."""
    rows = cur.execute(
        """SELECT name, offset_ms FROM sync_peers
            WHERE offset_ms IS NOT NULL AND last_error IS NULL AND last_ok_ms BETWEEN ? AND ?
            ORDER BY name""", (now_ms - CLOCK_VOTE_MAX_AGE_MS, now_ms + 60_000)).fetchall()
    # A round measured before this clock was set back lies in the future: it is no vote on today's clock.
    ahead_of = tuple(r[0] for r in rows if r[1] < -MAX_OFFSET_MS)
    behind = tuple(r[0] for r in rows if r[1] > MAX_OFFSET_MS)
    skewed = sorted(-r[1] for r in rows if abs(r[1]) > MAX_OFFSET_MS
                    and (r[1] < 0) == (len(ahead_of) >= len(behind)))
    text = get_meta(cur if isinstance(cur, sqlite3.Cursor) else cur.cursor(), "clock")
    hlc_ahead = parse_hlc(text).wall_ms - now_ms if text else 0
    return ClockCheck(len(rows), ahead_of, behind, skewed[len(skewed) // 2] if skewed else 0,
                      hlc_ahead if hlc_ahead > MAX_OFFSET_MS else 0)


# ==========================================================================
# 4. Projections: the tables derived from the log, their appliers, replay and queries.
# ==========================================================================
# Every field of an entity carries the version `"{hlc} {uuid}"` of the event that set it
# and changes only for a newer version, so events applied in any order leave the same
# tables as a replay. The space sorts below every HLC character, so the joined text
# orders exactly like the pair (hlc, uuid). A row that exists only because an update
# arrived before its create has a NULL created_at_v and is invisible to queries.

PROJECTIONS_SCHEMA = """
CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    created_at TEXT, created_at_v TEXT,
    name TEXT, name_v TEXT,
    goal TEXT, goal_v TEXT,
    owner TEXT, owner_v TEXT,
    status TEXT, status_v TEXT
);
CREATE INDEX projects_name ON projects (name);
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    created_at TEXT, created_at_v TEXT,
    project_id TEXT, project_id_v TEXT,
    title TEXT, title_v TEXT,
    description TEXT, description_v TEXT,
    priority INTEGER, priority_v TEXT,
    status TEXT, status_v TEXT,
    assignee TEXT, assignee_v TEXT              -- 'session:ID', 'group:ID' or NULL
);
CREATE INDEX tasks_project ON tasks (project_id, priority);
-- the task counts of a project, read from this index alone (the rows are wide with versions)
CREATE INDEX tasks_counts ON tasks (project_id, status) WHERE created_at_v IS NOT NULL;
-- a session's or group's tasks, most urgent first: the fleet list asks this once per session
CREATE INDEX tasks_assignee ON tasks (assignee, priority, created_at_v) WHERE assignee IS NOT NULL;
CREATE TABLE groups (
    id TEXT PRIMARY KEY,
    created_at TEXT, created_at_v TEXT,
    name TEXT, name_v TEXT,
    cwd TEXT, cwd_v TEXT,                       -- substring of a session's cwd
    host TEXT, host_v TEXT,                     -- exact host (machine id)
    tmux_name TEXT, tmux_name_v TEXT,           -- fnmatch pattern over the tmux session name
    removed_at TEXT, removed_at_v TEXT          -- a removed group stays removed
);
CREATE TABLE updates (
    id TEXT PRIMARY KEY,
    task_id TEXT,
    session_id TEXT,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    hlc TEXT NOT NULL,
    created_at TEXT NOT NULL,
    machine_id TEXT NOT NULL
);
CREATE INDEX updates_task ON updates (task_id, hlc);
CREATE TABLE event_refs (                       -- which events name which entity: history pages
    entity_id TEXT NOT NULL,
    hlc TEXT NOT NULL,
    uuid TEXT NOT NULL,
    PRIMARY KEY (entity_id, hlc, uuid)
) WITHOUT ROWID;
"""
PROJECTION_TABLES = ("projects", "tasks", "task_tags", "task_after", "groups", "updates", "event_refs", "sessions",
                     "broadcasts", "deliveries", "project_dirs", "orders", "answers", "hosts")
REF_KEYS = ("project_id", "task_id", "session_id", "group_id", "successor_id")

_MIGRATIONS[1].append(PROJECTIONS_SCHEMA)
# Schema 11: the task list's order (priority, created_at_v, id) as an index, so a list reads in order
# instead of sorting every task, and a page of /api/v1/tasks seeks to its cursor. It also covers
# every column a list reads, so a list never reads the wide rows (each LWW field carries its
# 67-character version): `task list --json` at 10,000 tasks, 44 -> 31 ms for the order, -> 21 ms covered.
TASK_ORDER_SCHEMA = """
CREATE INDEX tasks_order ON tasks (priority, created_at_v, id, status, removed_at, project_id, assignee,
                                   created_at, title, description) WHERE created_at_v IS NOT NULL
"""
_MIGRATIONS[11] = [TASK_ORDER_SCHEMA]

TAG_RE = lazy_re(r"\A[A-Za-z0-9][A-Za-z0-9_.:+-]{0,39}\Z")  # one word: backend, p1, ux:review
MAX_TAGS = 20  # per task
# Schema 2: removal and tags. A removed task keeps its row (history, `task list --all`, restore);
# a tag is one row per (task, tag) whose `present` is last-writer-wins: an add/remove set that
# merges per tag, so concurrent tags from two hosts both survive and a removal wins only if newer.
TAGS_SCHEMA = """
ALTER TABLE tasks ADD COLUMN removed_at TEXT;
ALTER TABLE tasks ADD COLUMN removed_at_v TEXT;
CREATE TABLE task_tags (
    id TEXT PRIMARY KEY,                        -- task_id + ' ' + tag
    task_id TEXT, task_id_v TEXT,
    tag TEXT, tag_v TEXT,
    present INTEGER, present_v TEXT             -- 1 tagged, 0 untagged: last writer wins per tag
);
CREATE INDEX task_tags_task ON task_tags (task_id, tag) WHERE present = 1;
CREATE INDEX task_tags_tag ON task_tags (tag, task_id) WHERE present = 1;
DROP INDEX tasks_counts;
CREATE INDEX tasks_counts ON tasks (project_id, status) WHERE created_at_v IS NOT NULL AND removed_at IS NULL
"""
_MIGRATIONS[2] = [TAGS_SCHEMA]

MAX_AFTER = 50  # tasks one task waits on
# Schema 9: dependencies. "T waits on D" is one row per (T, D) whose `present` is last-writer-wins,
# the add/remove set of tags: two hosts adding edges at once both keep them, a removal wins only if
# newer. Nothing here forbids a cycle (two hosts apart can each close one): readiness reads it.
# COMPAT: an older peer stores and relays the `after` field without applying it; replay does after its upgrade.
AFTER_SCHEMA = """
CREATE TABLE task_after (
    id TEXT PRIMARY KEY,                        -- task_id + ' ' + after_id
    task_id TEXT, task_id_v TEXT,               -- the task that waits ...
    after_id TEXT, after_id_v TEXT,             -- ... on this one
    present INTEGER, present_v TEXT             -- 1 waits, 0 no longer: last writer wins per edge
);
CREATE INDEX task_after_task ON task_after (task_id, after_id) WHERE present = 1;
CREATE INDEX task_after_after ON task_after (after_id, task_id) WHERE present = 1
"""
_MIGRATIONS[9] = [AFTER_SCHEMA]

SESSION_FIELDS = ("host", "cwd", "tmux_socket", "tmux_target", "pane_id", "pid", "command", "state",
                  "last_activity_at", "label", "tokens", "asked")
MAX_ASKED_CHARS = 2000  # what a permission dialog asks, as kept with the session's state
TOKEN_KINDS = ("input", "output", "cache_creation", "cache_read")
MAX_RECIPIENTS = 500
# What a typed text must never hold: an ESC could end the bracketed paste ("\x1b[201~") and type
# the rest as keys; C1 codes are escapes to some terminals. Newline and tab stay.
CONTROL_CHARS_RE = lazy_re(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

FLEET_SCHEMA = """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,                        -- Claude's session uuid
    created_at TEXT, created_at_v TEXT,
    host TEXT, host_v TEXT,
    cwd TEXT, cwd_v TEXT,
    tmux_socket TEXT, tmux_socket_v TEXT,
    tmux_target TEXT, tmux_target_v TEXT,
    pane_id TEXT, pane_id_v TEXT,
    pid INTEGER, pid_v TEXT,
    command TEXT, command_v TEXT,
    state TEXT, state_v TEXT,
    state_at TEXT, state_at_v TEXT,
    last_activity_at TEXT, last_activity_at_v TEXT,
    label TEXT, label_v TEXT,
    tokens TEXT, tokens_v TEXT                  -- JSON {input, output, cache_creation, cache_read}
);
CREATE INDEX sessions_host ON sessions (host, state);
CREATE TABLE broadcasts (
    id TEXT PRIMARY KEY,
    created_at TEXT, created_at_v TEXT,
    target TEXT, target_v TEXT,                 -- as the sender named it: project, group:NAME or session:ID
    text TEXT, text_v TEXT,
    expires_at TEXT, expires_at_v TEXT          -- after this, an undelivered copy expires instead of arriving
);
CREATE TABLE deliveries (                       -- one per broadcast and recipient session
    id TEXT PRIMARY KEY,                        -- broadcast_id:session_id
    broadcast_id TEXT, broadcast_id_v TEXT,
    session_id TEXT, session_id_v TEXT,
    result TEXT, result_v TEXT,                 -- one of DELIVERY_RESULTS
    reason TEXT, reason_v TEXT,
    by_host TEXT, by_host_v TEXT,               -- the host that tried it; NULL until one did
    updated_at TEXT, updated_at_v TEXT
);
CREATE INDEX deliveries_broadcast ON deliveries (broadcast_id);
CREATE TABLE transcript_cache (                 -- this host's reading of its transcripts: a cache, never synced
    path TEXT PRIMARY KEY,
    session_id TEXT,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    info TEXT NOT NULL                          -- JSON: what the tail said, token sums and scan offset
);
CREATE INDEX transcript_cache_session ON transcript_cache (session_id);
CREATE TABLE hook_marks (                       -- the newest hook report per session on this host, never synced
    session_id TEXT PRIMARY KEY,
    tmux_socket TEXT,
    pane_id TEXT,
    state TEXT,
    hook_event TEXT NOT NULL,                   -- hook_event_name of the newest report
    at_ms INTEGER NOT NULL
);
"""
_MIGRATIONS[1].append(FLEET_SCHEMA)
# Schema 4: what a permission dialog asks is kept with the state; this host's notification marks.
ASKED_SCHEMA = """
-- asked: JSON {tool, input} while a permission dialog is open, else NULL
ALTER TABLE sessions ADD COLUMN asked TEXT;
ALTER TABLE sessions ADD COLUMN asked_v TEXT;
CREATE TABLE notify_marks (                     -- this host's notifications per session: never synced
    session_id TEXT PRIMARY KEY,
    state TEXT,                                 -- the state last seen by the notifier
    notified_ms INTEGER                         -- when the [notify] command last ran for it
);
"""
_MIGRATIONS[4] = [ASKED_SCHEMA]
# Schema 6: answers to permission dialogs, when this host stored each, and the tool uses that name dialogs.
ANSWERS_SCHEMA = """
CREATE TABLE answers (                          -- answers to permission dialogs, one per answer made anywhere
    id TEXT PRIMARY KEY,
    created_at TEXT, created_at_v TEXT,
    session_id TEXT, session_id_v TEXT,
    host TEXT, host_v TEXT,                     -- the session's host: the one that acts on it
    tool_use_id TEXT, tool_use_id_v TEXT,       -- the dialog's identity, when hooks told it
    tool TEXT, tool_v TEXT,                     -- what was asked, as the person answering saw it
    input TEXT, input_v TEXT,
    answer TEXT, answer_v TEXT,                 -- one of ANSWERS
    option INTEGER, option_v TEXT,              -- the dialog's option number, for answer 'option'
    option_text TEXT, option_text_v TEXT,       -- ... and its exact wording, when the person saw it
    reason TEXT, reason_v TEXT,                 -- with deny: what to tell Claude instead
    by_host TEXT, by_host_v TEXT,
    client TEXT, client_v TEXT,                 -- 'cli:user@host', 'dashboard' or 'api'
    result TEXT, result_v TEXT,                 -- one of ANSWER_RESULTS; 'pending' until its host acted
    result_reason TEXT, result_reason_v TEXT,
    resolved_at TEXT, resolved_at_v TEXT
);
CREATE INDEX answers_session ON answers (session_id);
CREATE TABLE answer_receipts (                  -- when this host stored each answer: its expiry clock, never synced
    answer_id TEXT PRIMARY KEY,
    received_ms INTEGER NOT NULL
);
CREATE TABLE tool_uses (                        -- this host's PreToolUse reports not yet done: never synced
    session_id TEXT NOT NULL,
    tool_use_id TEXT NOT NULL,
    input_key TEXT NOT NULL,                    -- a hash of the tool's input: how a PermissionRequest finds it
    at_ms INTEGER NOT NULL,
    is_asked INTEGER NOT NULL DEFAULT 0,        -- 1: a PermissionRequest took it; -1: a request waiting for it
    PRIMARY KEY (session_id, tool_use_id)
);
"""
_MIGRATIONS[6] = [ANSWERS_SCHEMA]
# Schema 7: what each session's newest PermissionRequest asked, kept even when the report changed no state.
ASKS_SCHEMA = """
CREATE TABLE asks (                             -- this host's newest PermissionRequest per session: never synced
    session_id TEXT PRIMARY KEY,
    asked TEXT NOT NULL,                        -- JSON {tool, input, tool_use_id?}
    at_ms INTEGER NOT NULL                      -- when its hook started
);
"""
_MIGRATIONS[7] = [ASKS_SCHEMA]

DEFAULT_DISPATCH_SESSIONS = 1  # project set --max-sessions, until set
MAX_DISPATCH_SESSIONS = 50
ORDER_ACTIONS = ("start", "resume", "stop", "dispatch")  # dispatch: type a task into a session that waits
# pending until the host takes it; claimed while it acts (a crash then leaves it claimed: at most once)
ORDER_RESULTS = ("pending", "claimed", "started", "needs trust", "stopped", "refused", "failed", "expired", "typed")
ORDER_FINAL = ("started", "needs trust", "stopped", "refused", "failed", "expired", "typed")
MAX_PATH_CHARS = 4096

DISPATCH_SCHEMA = """
CREATE TABLE project_dirs (                     -- where a project's code lives, per host
    id TEXT PRIMARY KEY,                        -- project_id:host
    project_id TEXT, project_id_v TEXT,
    host TEXT, host_v TEXT,                     -- machine id
    dir TEXT, dir_v TEXT                        -- absolute path on that host; NULL once removed
);
CREATE INDEX project_dirs_project ON project_dirs (project_id);
CREATE TABLE orders (                           -- start, resume or stop a session, carried out by one host
    id TEXT PRIMARY KEY,
    created_at TEXT, created_at_v TEXT,
    action TEXT, action_v TEXT,                 -- one of ORDER_ACTIONS
    host TEXT, host_v TEXT,                     -- the host that carries it out
    session_id TEXT, session_id_v TEXT,         -- for a start: the id Clare made and passes to Claude
    task_id TEXT, task_id_v TEXT,
    request TEXT, request_v TEXT,               -- JSON: the order.placed payload
    expires_at TEXT, expires_at_v TEXT,
    result TEXT, result_v TEXT,                 -- one of ORDER_RESULTS
    reason TEXT, reason_v TEXT,
    outcome TEXT, outcome_v TEXT,               -- JSON: pane, tmux target, cwd, branch of what was done
    by_host TEXT, by_host_v TEXT,
    updated_at TEXT, updated_at_v TEXT
);
CREATE INDEX orders_host ON orders (host, result);
CREATE INDEX orders_session ON orders (session_id);
"""
# This version adds tables only. COMPAT: an older peer stores and relays project.dir_set and the
# order events without applying them; `clare replay` after its upgrade applies what it kept.
_MIGRATIONS[3] = [DISPATCH_SCHEMA]

# Schema 8: where each host's `clare serve` answers, as that host announced it (host.announced), so
# a host that knows one peer learns the others. COMPAT: an older peer stores and relays the event.
HOSTS_SCHEMA = """
CREATE TABLE hosts (
    id TEXT PRIMARY KEY,                        -- the host's machine id
    name TEXT, name_v TEXT,                     -- its display name (host name)
    url TEXT, url_v TEXT,                       -- where its serve answers; unchecked: checked where offered
    token_fp TEXT, token_fp_v TEXT,             -- token_fingerprint of its token, to tell a shared one
    announced_at TEXT, announced_at_v TEXT
)
"""
_MIGRATIONS[8].append(HOSTS_SCHEMA)

# Schema 10: dispatch per project (project set --dispatch/--max-sessions/--dispatcher), each field
# last-writer-wins. COMPAT: an older peer stores and relays the new project.updated fields and the
# dispatch orders without applying them; `clare replay` after its upgrade applies what it kept.
PROJECT_DISPATCH_SCHEMA = """
ALTER TABLE projects ADD COLUMN dispatch INTEGER;
ALTER TABLE projects ADD COLUMN dispatch_v TEXT;
ALTER TABLE projects ADD COLUMN max_sessions INTEGER;
ALTER TABLE projects ADD COLUMN max_sessions_v TEXT;
ALTER TABLE projects ADD COLUMN dispatcher TEXT;
ALTER TABLE projects ADD COLUMN dispatcher_v TEXT
"""  # dispatch: 1 feeds idle sessions the next ready task; max_sessions: how many it keeps; dispatcher: machine id
_MIGRATIONS[10] = [PROJECT_DISPATCH_SCHEMA]


@record_type(frozen=True, slots=True)
class Project:
    id: str
    name: str
    goal: str
    owner: str
    status: str
    created_at: str
    task_counts: dict[str, int]  # status -> number of tasks
    dirs: dict[str, str] = record_field(default_factory=dict)  # host (machine id) -> where its code lives
    is_dispatching: bool = False  # its idle sessions are fed the next ready task (project set --dispatch on)
    max_sessions: int = DEFAULT_DISPATCH_SESSIONS  # ... by at most this many sessions
    dispatcher: str | None = None  # the one host (machine id) that dispatches for it

    def to_json(self) -> dict[str, Any]:
        """Return the project as the JSON object the CLI and API print."""
        return _as_json(self)


@record_type(frozen=True, slots=True)
class Task:
    id: str
    project_id: str
    project: str  # the project's name, for display
    title: str
    description: str
    status: str
    priority: int
    created_at: str
    session_id: str | None  # the assignment: one session ...
    group_id: str | None  # ... or one group, or neither
    tags: tuple[str, ...] = ()  # sorted
    removed_at: str | None = None  # set while the task is removed (task rm); it then leaves every list
    group: str | None = None  # the name of group_id's group, for display
    after: tuple[str, ...] = ()  # the ids of the tasks it waits on, sorted (last: keeps older JSON keys in place)

    def to_json(self) -> dict[str, Any]:
        """Return the task as the JSON object the CLI and API print."""
        return _as_json(self)


@record_type(frozen=True, slots=True)
class Group:
    id: str
    name: str
    cwd: str | None
    host: str | None
    tmux_name: str | None
    created_at: str

    def to_json(self) -> dict[str, Any]:
        """Return the group as the JSON object the CLI and API print."""
        return _as_json(self)


@record_type(frozen=True, slots=True)
class Update:
    id: str
    task_id: str | None
    session_id: str | None
    source: str
    text: str
    created_at: str
    machine_id: str

    def to_json(self) -> dict[str, Any]:
        """Return the update as the JSON object the CLI and API print."""
        return _as_json(self)


@record_type(frozen=True, slots=True)
class Session:
    id: str  # Claude's own session uuid
    host: str  # machine id of the host that runs it (only that host observes it)
    cwd: str
    tmux_socket: str | None  # the tmux server's socket path, None outside tmux
    tmux_target: str | None  # session:window.pane
    pane_id: str | None  # %N, stable for the pane's life on that server
    pid: int | None  # the Claude process
    command: str  # its command line
    state: str  # one of SESSION_STATES
    state_at: str | None  # when it entered that state
    last_activity_at: str | None
    label: str  # the transcript's summary title
    task_id: str | None  # the most urgent open task assigned to it (directly, else through a group)
    tokens: dict[str, int]  # usage summed over its transcript
    created_at: str  # first seen
    task_ids: tuple[str, ...] = ()  # every open task it holds, most urgent first (task_id is the first)
    group: str | None = None  # the name of the group that binds task_id to it, None when bound directly
    asked: dict[str, str] | None = None  # {tool, input} of the open permission dialog, as its hook reported it

    @property
    def tmux_session(self) -> str:
        """Return the tmux session name, or '' outside tmux."""
        return (self.tmux_target or "").rpartition(":")[0]

    def to_json(self) -> dict[str, Any]:
        """Return the session as the JSON object the CLI and API print."""
        return _as_json(self)


@record_type(frozen=True, slots=True)
class Order:
    """A start, resume or stop of a Claude session, placed anywhere and carried out once by its host."""

    id: str
    action: str  # one of ORDER_ACTIONS
    host: str  # the machine id that carries it out
    session_id: str
    task_id: str | None
    request: dict[str, Any]  # the order.placed payload: cwd, tmux_session, is_worktree, model, is_force ...
    expires_at: str
    result: str  # one of ORDER_RESULTS
    reason: str  # why it was refused or failed, or what the user must do (needs trust)
    outcome: dict[str, Any]  # what the host did: pane_id, tmux_target, tmux_socket, cwd, branch
    by_host: str | None
    created_at: str
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        """Return the order as the JSON object the CLI and API print."""
        return _as_json(self)


@record_type(frozen=True, slots=True)
class Delivery:
    broadcast_id: str
    session_id: str
    host: str | None  # the session's host, None when this host has not heard of the session
    tmux_target: str | None
    result: str  # one of DELIVERY_RESULTS
    reason: str
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        """Return the delivery as the JSON object the CLI and API print."""
        return _as_json(self)


@record_type(frozen=True, slots=True)
class Answer:
    id: str
    session_id: str
    host: str  # the session's host: the one that types it
    tool_use_id: str | None  # the dialog's identity, when hooks told it
    tool: str  # what was asked, as the person saw it
    input: str
    answer: str  # one of ANSWERS
    option: int | None  # the option number for answer 'option'
    option_text: str | None  # ... and its exact wording, when the person saw it
    reason: str  # with deny: what Claude is told instead
    by_host: str  # where it was made
    client: str  # 'cli:user@host', 'dashboard' or 'api'
    created_at: str
    result: str  # one of ANSWER_RESULTS
    result_reason: str
    resolved_at: str | None

    def to_json(self) -> dict[str, Any]:
        """Return the answer as the JSON object the CLI and API print."""
        return _as_json(self)


def _as_json(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


# COMPAT: an event written by a newer Clare (a new type, a new field, a new value of a known field)
# passes the door on its form alone (check_event, then PAYLOADS: ids, types, sizes), is stored and
# relayed, and is left out of the projections until a version that knows it replays the log.
# Refusing it would stop every older peer from storing or relaying it, and the fleet would diverge.
APPLIERS: dict[str, Callable[[sqlite3.Cursor, Event], None]] = {}
PAYLOADS: dict[str, dict[str, Callable[[Any], bool]]] = {}  # event type -> field -> form check; "name?": optional
# event type -> field -> the values this version knows (a field of the vocabulary: a status, a state)
KNOWN_VALUES: dict[str, dict[str, Any]] = {}
# event type -> (what a good payload does, check of the whole payload): rules across fields
PAYLOAD_RULES: dict[str, tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...]] = {}


def applies(event_type: str, payload: dict[str, Callable[[Any], bool]], *,
            rules: tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...] = ()) -> Callable:
    """Register the decorated function as the applier of one event type with its payload's form."""
    def register(fn: Callable[[sqlite3.Cursor, Event], None]) -> Callable:
        APPLIERS[event_type] = fn
        PAYLOADS[event_type] = payload
        KNOWN_VALUES[event_type] = {key.rstrip("?"): check.choices for key, check in payload.items()
                                    if isinstance(check, _OneOf)}
        PAYLOAD_RULES[event_type] = rules
        return fn
    return register


class _OneOf:
    """A field of the vocabulary: its form is checked at the door, its value only by the projections."""

    __slots__ = ("choices", "form")

    def __init__(self, choices: Sequence[Any], form: Callable[[Any], bool]):
        self.choices, self.form = choices, form

    def __call__(self, v: Any) -> bool:
        return self.form(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= MAX_TEXT_CHARS


def _is_id(v: Any) -> bool:
    return isinstance(v, str) and ID_RE.match(v) is not None


def _is_opt_str(v: Any) -> bool:
    return v is None or _is_str(v)


def _is_opt_id(v: Any) -> bool:
    return v is None or _is_id(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_word(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS


def _is_one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return _OneOf(choices, _is_word)


_is_priority: Callable[[Any], bool] = _OneOf(PRIORITIES, _is_int)


_PAYLOAD_FIELDS: dict[str, list[tuple[str, bool, Callable[[Any], bool]]]] = {}  # PAYLOADS as check_payload reads


def check_payload(ev: Event) -> Event:
    """Check the form of a known event type's payload field by field; unknown types pass (a newer Clare)."""
    fields = _PAYLOAD_FIELDS.get(ev.event_type)
    if fields is None:
        fields = _PAYLOAD_FIELDS[ev.event_type] = [(key.rstrip("?"), key.endswith("?"), check)
                                                   for key, check in PAYLOADS.get(ev.event_type, {}).items()]
    for name, is_optional, check in fields:
        if name not in ev.payload:
            if is_optional:
                continue
            raise ClareError(f"{ev.event_type} payload lacks {name}")
        if not check(ev.payload[name]):
            raise ClareError(f"{ev.event_type} payload has a bad {name}: {str(ev.payload[name])[:60]!r}")
    return ev


def not_understood(ev: Event) -> str | None:
    """Say why this version's projections leave a stored event out (a value or rule it does not know), or None."""
    if ev.event_type not in APPLIERS:
        return f"{ev.event_type} is not an event type of Clare {__version__}"
    for name, known in KNOWN_VALUES[ev.event_type].items():
        if name in ev.payload and ev.payload[name] not in known:
            return f"{ev.event_type} payload has a {name} Clare {__version__} does not know: " \
                   f"{str(ev.payload[name])[:60]!r}"
    for rule, check in PAYLOAD_RULES[ev.event_type]:
        if not check(ev.payload):
            return f"{ev.event_type} payload breaks a rule: it {rule}"
    return None


MAX_BROADCAST_EXPIRY_MS = 3_600_000  # a received broadcast may wait this long past its HLC time, no longer


def check_received(obj: object) -> Event:
    """Validate an event from outside (file, peer): its form and, for a known type, its payload."""
    ev = check_payload(check_event(obj))
    if ev.event_type == "broadcast.sent":
        # SECURITY: a broadcast types into agents; a peer must not queue one to arrive in a year.
        expires_ms = parse_iso_ms(ev.payload["expires_at"])
        if expires_ms is None or expires_ms > parse_hlc(ev.hlc).wall_ms + MAX_BROADCAST_EXPIRY_MS:
            raise ClareError(f"broadcast.sent expires_at {ev.payload['expires_at'][:40]!r} is not a time within "
                             f"{MAX_BROADCAST_EXPIRY_MS // 60_000} min of the broadcast's own time")
    return ev


def apply_event(cur: sqlite3.Cursor, ev: Event) -> None:
    """Fold one stored event into the projections; one they do not understand only gets history refs."""
    apply_events(cur, [ev])


def apply_events(cur: sqlite3.Cursor, events: list[Event]) -> None:
    """Fold stored events into the projections, in order: each row's fields folded first, then one upsert per row."""
    cur.executemany("INSERT OR IGNORE INTO event_refs (entity_id, hlc, uuid) VALUES (?, ?, ?)",
                    [(ev.payload[key], ev.hlc, ev.uuid) for ev in events for key in REF_KEYS
                     if isinstance(ev.payload.get(key), str)])  # _rebuild_refs() does the same in bulk: alike
    fold = LwwFold(cur.connection) if len(events) > 1 else cur
    for ev in events:
        if not_understood(ev) is None:
            APPLIERS[ev.event_type](fold, ev)
    if isinstance(fold, LwwFold):
        fold.flush()


def record(db: Db, cur: sqlite3.Cursor, event_type: str, payload: dict[str, Any], *, now_ms: int) -> Event:
    """Append a new local event and apply it. Call inside write_txn.

    A user's write is refused while this host's peers agree its clock is off (see ClockCheck);
    what the host observes (its sessions, hook reports, deliveries) is always recorded.
    """
    if not is_observation(event_type, payload):
        clock = check_clock(cur, machine_id=db.machine_id, now_ms=now_ms)
        if clock.is_refused:
            raise ClareError(clock.message)
        if clock.message and clock.message not in db.warnings:
            db.warnings.append(clock.message)
    ev = make_event(db, cur, event_type, payload, now_ms=now_ms)
    reason = not_understood(check_payload(ev))
    if reason is not None and event_type in APPLIERS:  # a bug in a service: its own events are understood
        raise ClareError(reason)
    apply_event(cur, ev)
    _note_receipts(cur, [ev], now_ms=now_ms)
    return ev


def _note_receipts(cur: sqlite3.Cursor, events: list[Event], *, now_ms: int) -> None:
    # An answer expires by the clock of the host that acts on it, counted from when that host stored
    # it: a sender's clock, or a sync that brings it hours late, never makes a stale answer look fresh.
    cur.executemany("INSERT OR IGNORE INTO answer_receipts (answer_id, received_ms) VALUES (?, ?)",
                    [(ev.payload["answer_id"], now_ms) for ev in events if ev.event_type == "permission.answered"
                     and isinstance(ev.payload.get("answer_id"), str)])


OBSERVED_EVENT_TYPES = frozenset({"session.appeared", "session.changed", "session.gone", "broadcast.delivered",
                                  "permission.resolved"})


def is_observation(event_type: str, payload: dict[str, Any]) -> bool:
    """Say whether an event records what this host saw (never refused) rather than what a user asked."""
    return event_type in OBSERVED_EVENT_TYPES or (event_type == "update.posted"
                                                  and payload.get("source") not in (None, "message"))


def receive_events(db: Db, cur: sqlite3.Cursor, events: list[Event], *, now_ms: int) -> InsertResult:
    """Store events made elsewhere, merge the clock once, apply the new ones. Call inside write_txn."""
    result = insert_events(cur, events)
    if result.inserted:
        newest = parse_hlc(max(ev.hlc for ev in result.inserted))  # the text sorts like the clock
        clock = load_clock(cur, machine_id=db.machine_id, now_ms=now_ms)
        save_clock(cur, merge(clock, newest, machine_id=db.machine_id, now_ms=now_ms))
        apply_events(cur, result.inserted)
        _note_receipts(cur, result.inserted, now_ms=now_ms)
    return result


def replay(db: Db) -> int:
    """Rebuild every projection from the log; return how many events were applied."""
    return _replay(db, with_refs=False)


def _replay(db: Db, *, with_refs: bool) -> int:
    """Rebuild the projections; event_refs too only `with_refs`.

    event_refs is a function of the log alone, kept by apply_event as each event is stored:
    only an upgrade rebuilds it (with_refs). The secondary indexes of the tables are dropped
    for the fold and made again after it: one sorted build each instead of an update per row.
    """
    n_events = 0
    tables = [t for t in PROJECTION_TABLES if with_refs or t != "event_refs"]
    with write_txn(db) as cur:
        for table in tables:
            cur.execute(f"DELETE FROM {table}")
        if with_refs:
            _rebuild_refs(cur)
        indexes = cur.execute(f"""SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL
                                     AND tbl_name IN ({','.join('?' * len(tables))})""", tables).fetchall()
        for name, _ in indexes:
            cur.execute(f'DROP INDEX "{name}"')
        appliers, fold = APPLIERS, LwwFold(db.conn)
        for ev in iter_events(db, batch=5000):
            if not_understood(ev) is None:
                appliers[ev.event_type](fold, ev)
            n_events += 1
        fold.flush()
        for _, sql in indexes:
            cur.execute(sql)
    return n_events


def _rebuild_refs(cur: sqlite3.Cursor) -> None:
    """Make apply_event's history refs of every event at once: in C, and in index order."""
    # COMPAT: a log written before NaN was refused at the door may hold payloads SQLite's JSON
    # functions reject ("malformed JSON"): CASE skips them there, and Python, which reads NaN
    # as a float, takes their refs as it always did.
    for key in REF_KEYS:
        cur.execute(f"""INSERT OR IGNORE INTO event_refs (entity_id, hlc, uuid)
                        SELECT json_extract(payload, '$.{key}'), hlc, uuid FROM events
                         WHERE CASE WHEN json_valid(payload) THEN json_type(payload, '$.{key}') = 'text' END
                         ORDER BY 1, 2, 3""")
    for row in cur.execute("SELECT payload, hlc, uuid FROM events WHERE NOT json_valid(payload)").fetchall():
        payload = json.loads(row[0])
        cur.executemany("INSERT OR IGNORE INTO event_refs (entity_id, hlc, uuid) VALUES (?, ?, ?)",
                        [(payload[k], row[1], row[2]) for k in REF_KEYS if isinstance(payload.get(k), str)])


# What the older version stored without knowing it (tags, orders...) applies now; its refs are made anew too.
AFTER_UPGRADE.append(functools.partial(_replay, with_refs=True))


_LWW_SQL: dict[tuple[str, tuple[str, ...]], str] = {}


def _lww(cur: sqlite3.Cursor, table: str, row_id: str, fields: dict[str, Any], ev: Event, *,
         is_default: bool = False) -> None:
    """Set each field of one row whose stored version is older than this event's; create the row.

    With `is_default` the fields get a version below every real one (a leading space sorts before
    any digit): a value that any event about the row overrides, whatever its HLC.
    """
    version = f"{' ' if is_default else ''}{ev.hlc} {ev.uuid}"
    if type(cur) is LwwFold:
        cur.hold(table, row_id, fields, version)
        return
    params = [row_id]
    for value in fields.values():
        params += (value, version)
    cur.execute(_lww_sql(table, tuple(fields)), params)


def _lww_sql(table: str, names: tuple[str, ...]) -> str:
    """Return the upsert of some fields of a row, each with its own version: a field changes only for a newer one."""
    sql = _LWW_SQL.get((table, names))
    if sql is None:
        cols = "".join(f", {n}, {n}_v" for n in names)
        sets = ", ".join(f"{n} = CASE WHEN {n}_v IS NULL OR {n}_v < excluded.{n}_v "
                         f"THEN excluded.{n} ELSE {n} END, {n}_v = max(coalesce({n}_v, ''), excluded.{n}_v)"
                         for n in names)
        sql = (f"INSERT INTO {table} (id{cols}) VALUES (?{', ?, ?' * len(names)}) "
               f"ON CONFLICT (id) DO UPDATE SET {sets}")
        _LWW_SQL[(table, names)] = sql
    return sql


class LwwFold(sqlite3.Cursor):
    """A cursor that holds _lww's writes in memory, per row and field, the newest version kept; flush() writes
    each row once. A batch (a replay, an import) sets a task's fields ~10 times: folded, one upsert.

    The rule is _lww's own (a field takes a value only with a newer version, rows made in the order
    first touched), so the tables come out the same; the appliers' other writes go straight through.
    """

    def __init__(self, conn: sqlite3.Connection):
        super().__init__(conn)
        self.rows: dict[tuple[str, str], dict[str, tuple[Any, str]]] = {}  # (table, id) -> field -> (value, version)

    def hold(self, table: str, row_id: str, fields: dict[str, Any], version: str) -> None:
        """Fold one _lww write into the rows held."""
        row = self.rows.get((table, row_id))
        if row is None:
            row = self.rows[(table, row_id)] = {}
        for name, value in fields.items():
            held = row.get(name)
            if held is None or held[1] < version:
                row[name] = (value, version)
        if len(self.rows) >= MAX_FOLDED_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the rows held, one upsert each (runs of the same fields as one executemany)."""
        import itertools

        def params(item: tuple[tuple[str, str], dict[str, tuple[Any, str]]]) -> list[Any]:
            out = [item[0][1]]
            for pair in item[1].values():
                out += pair
            return out
        for (table, names), run in itertools.groupby(self.rows.items(), lambda it: (it[0][0], tuple(it[1]))):
            self.executemany(_lww_sql(table, names), map(params, run))
        self.rows = {}


MAX_FOLDED_ROWS = 50_000  # rows an LwwFold holds before it writes them: its memory stays bounded


def _pick(payload: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {n: payload[n] for n in names if n in payload}


@applies("project.created", {"project_id": _is_id, "name": _is_str, "goal": _is_str, "owner": _is_str,
                             "status": _is_one_of(PROJECT_STATUSES)})
def apply_project_created(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid); the create sets every field."""
    p = ev.payload  # {project_id, name, goal, owner, status}
    _lww(cur, "projects", p["project_id"],
         {"created_at": ev.created_at, **_pick(p, ("name", "goal", "owner", "status"))}, ev)


def _is_max_sessions(v: Any) -> bool:
    return _is_int(v) and 1 <= v <= MAX_DISPATCH_SESSIONS


@applies("project.updated", {"project_id": _is_id, "name?": _is_str, "goal?": _is_str, "owner?": _is_str,
                             "status?": _is_one_of(PROJECT_STATUSES), "undoes?": _is_id, "dispatch?": _is_bool,
                             "max_sessions?": _is_max_sessions,
                             "dispatcher?": lambda v: isinstance(v, str) and MACHINE_ID_RE.match(v) is not None})
def apply_project_updated(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid): a late old edit never overwrites a newer one.

    The dispatcher field too: two hosts that set it while apart both dispatch until each hears
    of the newer value (the README's stated limit of "decided once").
    """
    p = ev.payload  # {project_id, name?, goal?, owner?, status?, dispatch?, max_sessions?, dispatcher?}
    fields = _pick(p, ("name", "goal", "owner", "status", "dispatch", "max_sessions", "dispatcher"))
    if fields:
        _lww(cur, "projects", p["project_id"], fields, ev)


def _is_tag(v: Any) -> bool:
    return isinstance(v, str) and TAG_RE.match(v) is not None


def _is_set_of(is_member: Callable[[Any], bool], limit: int) -> Callable[[Any], bool]:
    """A checker of a set field as an event carries it: a list of members when made, at most `limit`."""
    return lambda v: isinstance(v, list) and len(v) <= limit and all(map(is_member, v))


def _is_set_changes_of(is_member: Callable[[Any], bool], limit: int) -> Callable[[Any], bool]:
    """A checker of a set field's changes: member -> true (added) or false (removed), at most 2 * `limit`."""
    return lambda v: isinstance(v, dict) and len(v) <= 2 * limit and all(
        is_member(k) and isinstance(x, bool) for k, x in v.items())


def _set_members(cur: sqlite3.Cursor, table: str, column: str, task_id: str, changes: dict[str, bool],
                 ev: Event) -> None:
    """Apply a set field's changes to a task: one last-writer-wins row per member (tags, waits)."""
    for member, is_present in changes.items():
        _lww(cur, table, f"{task_id} {member}", {"task_id": task_id, column: member, "present": int(is_present)}, ev)


@applies("task.created", {"task_id": _is_id, "project_id": _is_id, "title": _is_str, "description": _is_str,
                          "priority": _is_priority, "status": _is_one_of(TASK_STATUSES),
                          "tags?": _is_set_of(_is_tag, MAX_TAGS), "after?": _is_set_of(_is_id, MAX_AFTER)})
def apply_task_created(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid); the create sets every field, adds its tags and its waits."""
    p = ev.payload  # {task_id, project_id, title, description, priority, status, tags?, after?: [task_id]}
    _lww(cur, "tasks", p["task_id"], {
        "created_at": ev.created_at,
        **_pick(p, ("project_id", "title", "description", "priority", "status"))}, ev)
    _set_members(cur, "task_tags", "tag", p["task_id"], dict.fromkeys(p.get("tags", ()), True), ev)
    _set_members(cur, "task_after", "after_id", p["task_id"], dict.fromkeys(p.get("after", ()), True), ev)


@applies("task.updated", {"task_id": _is_id, "title?": _is_str, "description?": _is_str,
                          "priority?": _is_priority, "status?": _is_one_of(TASK_STATUSES),
                          "tags?": _is_set_changes_of(_is_tag, MAX_TAGS),
                          "after?": _is_set_changes_of(_is_id, MAX_AFTER), "undoes?": _is_id})
def apply_task_updated(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid): a title edit and a status change both survive.

    Tags are an add/remove set: `tags` maps a tag to true (add) or false (remove), and each tag
    is its own last-writer-wins field, so two hosts tagging at once both keep their tags.
    `after` (the tasks this one waits on) is a set of the same kind, per edge.
    """
    p = ev.payload  # {task_id, title?, description?, priority?, status?, tags?: {tag: bool}, after?: {id: bool}, ...}
    fields = _pick(p, ("title", "description", "priority", "status"))
    if fields:
        _lww(cur, "tasks", p["task_id"], fields, ev)
    _set_members(cur, "task_tags", "tag", p["task_id"], p.get("tags", {}), ev)
    _set_members(cur, "task_after", "after_id", p["task_id"], p.get("after", {}), ev)


@applies("task.removed", {"task_id": _is_id, "undoes?": _is_id})
def apply_task_removed(cur: sqlite3.Cursor, ev: Event) -> None:
    """Last writer wins per task with task.restored; edits meanwhile are kept and show on restore."""
    p = ev.payload  # {task_id, undoes?}
    _lww(cur, "tasks", p["task_id"], {"removed_at": ev.created_at}, ev)


@applies("task.restored", {"task_id": _is_id, "undoes?": _is_id})
def apply_task_restored(cur: sqlite3.Cursor, ev: Event) -> None:
    """Last writer wins per task with task.removed: the newer of the two decides."""
    p = ev.payload  # {task_id, undoes?}
    _lww(cur, "tasks", p["task_id"], {"removed_at": None}, ev)


@applies("task.assigned", {"task_id": _is_id, "session_id?": _is_opt_id, "group_id?": _is_opt_id, "undoes?": _is_id},
         rules=(("must name exactly one of session_id and group_id",
                 lambda p: (p.get("session_id") is None) != (p.get("group_id") is None)),))
def apply_task_assigned(cur: sqlite3.Cursor, ev: Event) -> None:
    """Last writer wins per task, by (hlc, uuid): a late old event never overwrites.

    Versus group.removed: the binding is kept, and the queries read a binding to a removed group
    as no binding (_TASK_SELECT), so the result does not depend on which of the two came first.
    """
    p = ev.payload  # {task_id, session_id | group_id}
    target = f"session:{p['session_id']}" if p.get("session_id") else f"group:{p.get('group_id')}"
    _lww(cur, "tasks", p["task_id"], {"assignee": target}, ev)


@applies("task.unassigned", {"task_id": _is_id, "undoes?": _is_id})
def apply_task_unassigned(cur: sqlite3.Cursor, ev: Event) -> None:
    """Last writer wins per task with task.assigned: the newer of the two decides."""
    p = ev.payload  # {task_id}
    _lww(cur, "tasks", p["task_id"], {"assignee": None}, ev)


@applies("group.created", {"group_id": _is_id, "name": _is_str, "cwd": _is_opt_str, "host": _is_opt_str,
                           "tmux_name": _is_opt_str})
def apply_group_created(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid); the create sets the patterns."""
    p = ev.payload  # {group_id, name, cwd, host, tmux_name}
    _lww(cur, "groups", p["group_id"],
         {"created_at": ev.created_at, **_pick(p, ("name", "cwd", "host", "tmux_name"))}, ev)


@applies("group.removed", {"group_id": _is_id, "undoes?": _is_id})
def apply_group_removed(cur: sqlite3.Cursor, ev: Event) -> None:
    """Removal wins over everything: a removed group never comes back (make a new one)."""
    p = ev.payload  # {group_id}
    _lww(cur, "groups", p["group_id"], {"removed_at": ev.created_at}, ev)


@applies("update.posted", {"update_id": _is_id, "task_id?": _is_opt_id, "session_id?": _is_opt_id,
                          "source": _is_one_of(UPDATE_SOURCES), "text": _is_str})
def apply_update_posted(cur: sqlite3.Cursor, ev: Event) -> None:
    """Updates are immutable: insert once by id, whatever the order."""
    p = ev.payload  # {update_id, task_id?, session_id?, source, text}
    cur.execute(
        """INSERT OR IGNORE INTO updates (id, task_id, session_id, source, text, hlc, created_at, machine_id)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
        (p["update_id"], p.get("task_id"), p.get("session_id"), p["source"], p["text"], ev.hlc,
         ev.created_at, ev.machine_id))


def _session_fields(p: dict[str, Any], ev: Event) -> dict[str, Any]:
    fields = _pick(p, SESSION_FIELDS)
    if "tokens" in fields:
        fields["tokens"] = canonical_json(fields["tokens"])
    if "asked" in fields:
        fields["asked"] = None if fields["asked"] is None else canonical_json(fields["asked"])
    if "state" in fields:
        fields["state_at"] = ev.created_at
    return fields


def _is_opt_int(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _is_tokens(v: Any) -> bool:
    return isinstance(v, dict) and len(v) <= 8 and all(_is_id(k) and _is_opt_int(n) for k, n in v.items())


def _is_asked(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and {"tool", "input"} <= set(v) <= {"tool", "input", "tool_use_id"}
                         and all(isinstance(x, str) and len(x) <= MAX_ASKED_CHARS for x in v.values()))


_SESSION_PAYLOAD = {"session_id": _is_id, "host": _is_id, "cwd?": _is_str, "tmux_socket?": _is_opt_str,
                    "tmux_target?": _is_opt_str, "pane_id?": _is_opt_id, "pid?": _is_opt_int, "command?": _is_str,
                    "state?": _is_one_of(SESSION_STATES), "last_activity_at?": _is_opt_str, "label?": _is_str,
                    "tokens?": _is_tokens, "asked?": _is_asked}


@applies("session.appeared", {**_SESSION_PAYLOAD, "cwd": _is_str, "state": _is_one_of(SESSION_STATES)})
def apply_session_appeared(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid); the first sighting sets every field."""
    p = ev.payload  # {session_id, host, cwd, tmux_socket, tmux_target, pane_id, pid, command, state, ...}
    _lww(cur, "sessions", p["session_id"], {"created_at": ev.created_at, **_session_fields(p, ev)}, ev)


@applies("session.changed", _SESSION_PAYLOAD)
def apply_session_changed(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid): only the fields that changed are in the payload."""
    p = ev.payload  # {session_id, host, state?, tmux_target?, ..., last_activity_at, tokens}
    _lww(cur, "sessions", p["session_id"], _session_fields(p, ev), ev)


@applies("session.gone", {"session_id": _is_id, "host": _is_id, "reason?": _is_str, "successor_id?": _is_id})
def apply_session_gone(cur: sqlite3.Cursor, ev: Event) -> None:
    """Last writer wins on state: a newer sighting brings a gone session back (claude --resume).

    successor_id names the session that took over its process and pane (/clear); the history
    of both links the two (REF_KEYS).
    """
    p = ev.payload  # {session_id, host, reason, successor_id?}
    _lww(cur, "sessions", p["session_id"], _session_fields({**p, "state": "gone"}, ev), ev)


def typable_text(text: str) -> str:
    """Return a text as it may be typed into a pane: LF line ends, no control characters."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return CONTROL_CHARS_RE.sub("", text)


def _is_typable(v: Any) -> bool:
    # SECURITY: a peer's broadcast text is typed into this host's panes: refuse what could escape the paste.
    return _is_str(v) and typable_text(v) == v


@applies("broadcast.sent", {"broadcast_id": _is_id, "target": _is_str, "text": _is_typable, "expires_at": _is_str,
                            "session_ids": lambda v: isinstance(v, list) and len(v) <= MAX_RECIPIENTS
                            and all(map(_is_id, v))})
def apply_broadcast_sent(cur: sqlite3.Cursor, ev: Event) -> None:
    """Immutable once sent; each recipient starts queued, a default that any receipt overrides.

    A receipt is not always newer by HLC: the receiving host caps its clock at now + MAX_OFFSET_MS,
    so a sender whose clock runs ahead stamps the send later than the receipt. Queued by HLC
    would then win, and the owner would type the text again at every pull.
    """
    p = ev.payload  # {broadcast_id, target, text, expires_at, session_ids}
    _lww(cur, "broadcasts", p["broadcast_id"], {"created_at": ev.created_at, "target": p["target"],
                                                "text": p["text"], "expires_at": p["expires_at"]}, ev)
    for sid in p["session_ids"]:
        _lww(cur, "deliveries", f"{p['broadcast_id']}:{sid}",
             {"broadcast_id": p["broadcast_id"], "session_id": sid, "result": "queued", "reason": "",
              "by_host": None, "updated_at": ev.created_at}, ev, is_default=True)


@applies("broadcast.delivered", {"broadcast_id": _is_id, "session_id": _is_id,
                                 "result": _is_one_of(DELIVERY_RESULTS), "reason": _is_str})
def apply_broadcast_delivered(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins per (broadcast, session): the newest receipt is the result."""
    p = ev.payload  # {broadcast_id, session_id, result, reason}
    _lww(cur, "deliveries", f"{p['broadcast_id']}:{p['session_id']}",
         {"broadcast_id": p["broadcast_id"], "session_id": p["session_id"], "result": p["result"],
          "reason": p["reason"], "by_host": ev.machine_id, "updated_at": ev.created_at}, ev)


@applies("project.dir_set", {"project_id": _is_id, "host": _is_id, "dir": _is_opt_str})
def apply_project_dir_set(cur: sqlite3.Cursor, ev: Event) -> None:
    """Last writer wins per (project, host), by (hlc, uuid); a None dir removes that host's entry."""
    p = ev.payload  # {project_id, host, dir | None}
    _lww(cur, "project_dirs", f"{p['project_id']}:{p['host']}",
         {"project_id": p["project_id"], "host": p["host"], "dir": p["dir"]}, ev)


@applies("order.placed", {"order_id": _is_id, "action": _is_one_of(ORDER_ACTIONS), "host": _is_id,
                          "session_id": lambda v: isinstance(v, str) and bool(UUID_RE.match(v)),
                          "task_id": _is_opt_id, "cwd": _is_str, "tmux_session": _is_str, "expires_at": _is_str,
                          "is_worktree": _is_bool, "model": _is_opt_str, "is_force": _is_bool,
                          "template?": _is_typable, "reason?": _is_str, "is_clear?": _is_bool,
                          "is_dispatch?": _is_bool})
def apply_order_placed(cur: sqlite3.Cursor, ev: Event) -> None:
    """Immutable once placed; the result starts pending, a default that any receipt overrides.

    As with broadcast receipts, a receipt is not always newer by HLC than its order (a placer's
    clock ahead of the host's): pending must never win over a receipt.
    """
    p = ev.payload  # {order_id, action, host, session_id, task_id, cwd, tmux_session, expires_at, is_worktree, ...}
    _lww(cur, "orders", p["order_id"], {
        "created_at": ev.created_at, "action": p["action"], "host": p["host"], "session_id": p["session_id"],
        "task_id": p["task_id"], "request": canonical_json(p), "expires_at": p["expires_at"]}, ev)
    _lww(cur, "orders", p["order_id"], {"result": "pending", "reason": "", "outcome": "{}", "by_host": None,
                                        "updated_at": ev.created_at}, ev, is_default=True)


@applies("order.carried_out", {"order_id": _is_id, "result": _is_one_of(ORDER_RESULTS[1:]), "reason": _is_str,
                               "outcome": lambda v: isinstance(v, dict) and len(v) <= 16,
                               "session_id?": _is_id, "task_id?": _is_opt_id})
def apply_order_carried_out(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins per order: the newest receipt (claimed, then the result) is the result."""
    p = ev.payload  # {order_id, result, reason, outcome, session_id?, task_id? (for history pages)}
    _lww(cur, "orders", p["order_id"], {"result": p["result"], "reason": p["reason"],
                                        "outcome": canonical_json(p["outcome"]), "by_host": ev.machine_id,
                                        "updated_at": ev.created_at}, ev)


def _is_opt_option(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 9)


@applies("permission.answered", {"answer_id": _is_id, "session_id": _is_id, "host": _is_id,
                                 "tool_use_id?": _is_opt_str, "tool": _is_str, "input": _is_str,
                                 "answer": _is_one_of(ANSWERS), "option?": _is_opt_option, "option_text?": _is_opt_str,
                                 "reason": _is_typable, "client": _is_str, "task_id?": _is_opt_id})
def apply_permission_answered(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins per answer; its result starts 'pending' below any real result's version."""
    p = ev.payload  # {answer_id, session_id, host, tool_use_id, tool, input, answer, option, option_text, reason, ...}
    _lww(cur, "answers", p["answer_id"], {
        "created_at": ev.created_at, "session_id": p["session_id"], "host": p["host"],
        "tool_use_id": p.get("tool_use_id"), "tool": p["tool"], "input": p["input"], "answer": p["answer"],
        "option": p.get("option"), "option_text": p.get("option_text"), "reason": p["reason"],
        "by_host": ev.machine_id, "client": p["client"]}, ev)
    _lww(cur, "answers", p["answer_id"], {"result": "pending", "result_reason": "", "resolved_at": None}, ev,
         is_default=True)


@applies("permission.resolved", {"answer_id": _is_id, "session_id": _is_id, "result": _is_one_of(ANSWER_RESULTS),
                                 "reason": _is_str, "task_id?": _is_opt_id})
def apply_permission_resolved(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins per answer: what its host did with it (typed, stale, expired, failed)."""
    p = ev.payload  # {answer_id, session_id, result, reason}
    _lww(cur, "answers", p["answer_id"], {"result": p["result"], "result_reason": p["reason"],
                                          "resolved_at": ev.created_at}, ev)


@applies("host.announced", {"host": _is_id, "name": _is_id, "url": _is_str, "token_fp": _is_opt_id})
def apply_host_announced(cur: sqlite3.Cursor, ev: Event) -> None:
    """Last writer wins per host, by (hlc, uuid); a host speaks for itself only (host is the event's maker)."""
    p = ev.payload  # {host, name, url, token_fp | None}
    if p["host"] == ev.machine_id:  # SECURITY: no host can announce another's address
        _lww(cur, "hosts", p["host"], {"name": p["name"], "url": p["url"], "token_fp": p["token_fp"],
                                       "announced_at": ev.created_at}, ev)


_PROJECT_SELECT = """
SELECT p.id, p.name, p.goal, p.owner, p.status, p.created_at, p.dispatch, p.max_sessions, p.dispatcher,
       (SELECT json_group_object(status, n) FROM
           (SELECT t.status, count(*) AS n FROM tasks t
             WHERE t.project_id = p.id AND t.created_at_v IS NOT NULL AND t.removed_at IS NULL
             GROUP BY t.status)) AS counts,
       (SELECT json_group_object(d.host, d.dir) FROM project_dirs d
         WHERE d.project_id = p.id AND d.dir IS NOT NULL) AS dirs
  FROM projects p
 WHERE p.created_at_v IS NOT NULL"""


def _project_from_row(row: sqlite3.Row) -> Project:
    counts = dict.fromkeys(TASK_STATUSES, 0) | json.loads(row["counts"] or "{}")
    return Project(row["id"], row["name"], row["goal"], row["owner"], row["status"], row["created_at"], counts,
                   dict(sorted(json.loads(row["dirs"] or "{}").items())), bool(row["dispatch"]),
                   row["max_sessions"] or DEFAULT_DISPATCH_SESSIONS, row["dispatcher"])


def list_projects(db: Db, *, status: str | None = None) -> list[Project]:
    """Return the projects, by name (then id), optionally of one status."""
    sql, params = _PROJECT_SELECT, []
    if status:
        sql += " AND p.status = ?"
        params.append(status)
    rows = db.conn.execute(sql + " ORDER BY p.name, p.id", params).fetchall()
    return [_project_from_row(r) for r in rows]


def list_dispatched_projects(db: Db, host: str) -> list[Project]:
    """Return the active projects that dispatch with `host` as their dispatcher (one cheap look per pull)."""
    ids = [r[0] for r in db.conn.execute(
        """SELECT id FROM projects WHERE dispatch = 1 AND dispatcher = ? AND status = 'active'
            AND created_at_v IS NOT NULL ORDER BY name, id""", (host,))]
    return [p for pid in ids for p in find_projects(db, pid) if p.id == pid]


def find_projects(db: Db, ref: str) -> list[Project]:
    """Return the projects named `ref`, or else those whose id starts with `ref`."""
    rows = db.conn.execute(_PROJECT_SELECT + " AND p.name = ? ORDER BY p.id", (ref,)).fetchall()
    if not rows and ID_PREFIX_RE.match(ref):
        rows = db.conn.execute(_PROJECT_SELECT + " AND p.id >= ? AND p.id < ? ORDER BY p.id LIMIT 10",
                               (ref, ref + "~")).fetchall()
    return [_project_from_row(r) for r in rows]


# Delete versus assign: a task bound to a group that is removed (or not known here yet) counts
# as unassigned in every query. A newer assignment to a group that another host removed
# meanwhile must not leave a task bound to nothing that can be listed or messaged.
_LIVE_GROUP = "g.created_at_v IS NOT NULL AND g.removed_at_v IS NULL"
_TASK_SELECT = f"""
SELECT t.id, t.project_id, coalesce(p.name, '') AS project, t.title, t.description, t.status,
       t.priority, t.created_at,
       CASE WHEN substr(t.assignee, 1, 6) = 'group:' AND NOT ({_LIVE_GROUP}) THEN NULL
            ELSE t.assignee END AS assignee,
       (SELECT group_concat(tag, ' ') FROM (SELECT x.tag FROM task_tags x
         WHERE x.task_id = t.id AND x.present = 1 ORDER BY x.tag)) AS tags,
       t.removed_at, CASE WHEN {_LIVE_GROUP} THEN g.name END AS group_name,
       (SELECT group_concat(after_id, ' ') FROM (SELECT a.after_id FROM task_after a
         WHERE a.task_id = t.id AND a.present = 1 ORDER BY a.after_id)) AS after_ids
  FROM tasks t LEFT JOIN projects p ON p.id = t.project_id
       LEFT JOIN groups g ON substr(t.assignee, 1, 6) = 'group:' AND g.id = substr(t.assignee, 7)
 WHERE t.created_at_v IS NOT NULL"""


def _task_from_row(row: sqlite3.Row) -> Task:
    kind, _, target = (row["assignee"] or "").partition(":")
    return Task(row["id"], row["project_id"], row["project"], row["title"], row["description"],
                row["status"], row["priority"], row["created_at"],
                target if kind == "session" else None, target if kind == "group" else None,
                tuple((row["tags"] or "").split()), row["removed_at"], row["group_name"] if kind == "group" else None,
                tuple((row["after_ids"] or "").split()))


def list_tasks(db: Db, *, project_id: str | None = None, status: str | None = None,
               session_id: str | None = None, group_id: str | None = None, is_open: bool = False,
               active_projects: bool = False, is_assigned: bool | None = None, tag: str | None = None,
               priorities: tuple[int, int] | None = None, search: str | None = None,
               include_removed: bool = False, after: str | None = None, limit: int | None = None) -> list[Task]:
    """Return tasks, most urgent first, filtered by project, status, assignee, tag, priority or text.

    Removed tasks (task rm) are left out unless `include_removed`; `is_open` leaves out done
    tasks and `active_projects` the tasks of paused and done projects. `after` (a task_cursor)
    and `limit` read the list a page at a time.
    """
    sql, params = _task_filters(
        project_id=project_id, status=status, session_id=session_id, group_id=group_id, is_open=is_open,
        active_projects=active_projects, is_assigned=is_assigned, tag=tag, priorities=priorities, search=search,
        include_removed=include_removed, after=after, limit=limit)
    return [_task_from_row(r) for r in db.conn.execute(_TASK_SELECT + sql, params)]


# `task list --json` without a Python object per task: SQLite writes each task's JSON object
# (json_object), the same bytes json.dumps(ensure_ascii=False) writes for Task.to_json() with
# emit's compact separators, and Python joins them: 1.4x faster at 10,000 tasks. One expression
# per Task field, over the tables of _TASK_SELECT ("[SELECT col FROM ...]": a JSON list of the
# rows); a field missing here sends the list through Task objects (same output, slower).
_TASK_JSON_FIELDS = {
    "id": "t.id", "project_id": "t.project_id", "project": "coalesce(p.name, '')", "title": "t.title",
    "description": "t.description", "status": "t.status", "priority": "t.priority", "created_at": "t.created_at",
    "session_id": "CASE WHEN substr(t.assignee, 1, 8) = 'session:' THEN substr(t.assignee, 9) END",
    "group_id": f"CASE WHEN substr(t.assignee, 1, 6) = 'group:' AND {_LIVE_GROUP} THEN substr(t.assignee, 7) END",
    "tags": "[SELECT x.tag FROM task_tags x WHERE x.task_id = t.id AND x.present = 1 ORDER BY x.tag]",
    "removed_at": "t.removed_at",
    "group": f"CASE WHEN substr(t.assignee, 1, 6) = 'group:' AND {_LIVE_GROUP} THEN g.name END",
    "after": "[SELECT a.after_id FROM task_after a WHERE a.task_id = t.id AND a.present = 1 ORDER BY a.after_id]",
}


def _json_value_sql(expr: str) -> str:
    """Return SQL for one JSON value of json_object: "[SELECT col FROM ...]" becomes the JSON list of its rows."""
    if not (expr.startswith("[SELECT ") and expr.endswith("]")):
        return expr
    column, _, rest = expr[8:-1].partition(" FROM ")
    # json(): a scalar subquery drops the JSON subtype, and json_object would quote the list as text
    return f"json((SELECT json_group_array(v) FROM (SELECT {column} AS v FROM {rest})))"


def list_tasks_json(db: Db, **filters: Any) -> str:
    """Return list_tasks(**filters) as the JSON text emit prints for their to_json() objects."""
    names = [f.name for f in record_fields(Task)]
    if not set(names) <= _TASK_JSON_FIELDS.keys():  # a new field: correct first, fast once it is mapped
        return json.dumps([t.to_json() for t in list_tasks(db, **filters)], ensure_ascii=False,
                          separators=JSON_LIST_SEPARATORS)
    sql, params = _task_filters(**filters)
    fields = ", ".join(f"'{name}', {_json_value_sql(_TASK_JSON_FIELDS[name])}" for name in names)
    select = _TASK_SELECT.replace(_TASK_SELECT[:_TASK_SELECT.index("\n  FROM ")], f"SELECT json_object({fields})")
    return "[" + ",".join(row[0] for row in db.conn.execute(select + sql, params)) + "]"


def _task_filters(*, project_id: str | None = None, status: str | None = None, session_id: str | None = None,
                  group_id: str | None = None, is_open: bool = False, active_projects: bool = False,
                  is_assigned: bool | None = None, tag: str | None = None, priorities: tuple[int, int] | None = None,
                  search: str | None = None, include_removed: bool = False, after: str | None = None,
                  limit: int | None = None) -> tuple[str, list[Any]]:
    """Return the WHERE terms, ORDER BY and LIMIT that follow _TASK_SELECT for list_tasks' filters, and parameters."""
    sql, params = "", list[Any]()
    if not include_removed:
        sql += " AND t.removed_at IS NULL"
    if project_id:
        sql += " AND t.project_id = ?"
        params.append(project_id)
    if status:
        sql += " AND t.status = ?"
        params.append(status)
    if is_open:
        sql += " AND t.status != 'done'"
    if active_projects:
        sql += " AND p.status = 'active'"
    if session_id:
        sql += " AND t.assignee = ?"
        params.append(f"session:{session_id}")
    elif group_id:
        sql += f" AND t.assignee = ? AND {_LIVE_GROUP}"
        params.append(f"group:{group_id}")
    if is_assigned is not None:
        live = f"(t.assignee IS NOT NULL AND (substr(t.assignee, 1, 6) != 'group:' OR {_LIVE_GROUP}))"
        sql += f" AND {'' if is_assigned else 'NOT '}{live}"
    if tag:
        sql += " AND EXISTS (SELECT 1 FROM task_tags x WHERE x.task_id = t.id AND x.tag = ? AND x.present = 1)"
        params.append(tag)
    if priorities is not None:
        sql += " AND t.priority BETWEEN ? AND ?"
        params += map(str, priorities)
    if search:
        # instr over lower(): a search text is literal, never a LIKE pattern (% and _ mean themselves)
        sql += " AND (instr(lower(t.title), ?) > 0 OR instr(lower(t.description), ?) > 0)"
        params += (search.lower(), search.lower())
    if after is not None:
        sql += " AND (t.priority, t.created_at_v, t.id) > (?, ?, ?)"
        params += parse_task_cursor(after)
    sql += " ORDER BY t.priority, t.created_at_v, t.id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return sql, params


def task_cursor(db: Db, task_id: str) -> str:
    """Return where a task stands in the order of list_tasks, as the text of `after` that reads on past it."""
    priority, version = db.conn.execute("SELECT priority, created_at_v FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return f"{priority}~{version.replace(' ', '~')}~{task_id}"  # no part holds a ~, nor need it in a URL


def parse_task_cursor(text: str) -> tuple[int, str, str]:
    """Return (priority, version, task_id) of a task_cursor text; UsageError if it is not one."""
    # SECURITY: it comes from a query string; its parts are checked, then only travel as SQL parameters.
    parts = text.split("~")
    is_default = len(parts) == 5 and parts[1] == ""  # a version below every real one starts with a space
    if is_default:
        del parts[1]
    if len(parts) != 4 or not re.fullmatch(r"-?\d{1,9}", parts[0]) or not HLC_RE.match(parts[1]) or \
            not UUID_RE.match(parts[2]) or not ID_RE.match(parts[3]):
        raise UsageError(f"after={text[:80]!r} is not a task cursor; pass the next_after of the previous page")
    return int(parts[0]), f"{' ' * is_default}{parts[1]} {parts[2]}", parts[3]


def find_tasks(db: Db, prefix: str) -> list[Task]:
    """Return the tasks whose id starts with `prefix` (at most 10)."""
    rows = db.conn.execute(_TASK_SELECT + " AND t.id >= ? AND t.id < ? ORDER BY t.id LIMIT 10",
                           (prefix, prefix + "~")).fetchall()
    return [_task_from_row(r) for r in rows]


def list_assigned_tasks(db: Db) -> list[Task]:
    """Return every task that is assigned to a session or a group."""
    rows = db.conn.execute(_TASK_SELECT + f" AND t.assignee IS NOT NULL AND (g.id IS NULL OR {_LIVE_GROUP})"
                           " AND t.removed_at IS NULL ORDER BY t.priority, t.created_at_v")
    return [_task_from_row(r) for r in rows]


# Readiness is read from the tables, never stored: a task is ready when it is todo, not removed,
# of an active project, bound to no session or live group, waits on no task that is neither done
# nor removed (one not known here yet blocks), and is on no cycle of waits. The tables are the same
# after any arrival order, so readiness is too.
_READY_WHERE = f"""
   AND t.status = 'todo' AND t.removed_at IS NULL AND p.status = 'active'
   AND NOT (t.assignee IS NOT NULL AND (substr(t.assignee, 1, 6) != 'group:' OR {_LIVE_GROUP}))
   AND NOT EXISTS (SELECT 1 FROM task_after a LEFT JOIN tasks d ON d.id = a.after_id
                    WHERE a.task_id = t.id AND a.present = 1
                      AND NOT (d.created_at_v IS NOT NULL AND (d.status = 'done' OR d.removed_at IS NOT NULL)))"""


def list_ready_tasks(db: Db, *, project_id: str | None = None) -> list[Task]:
    """Return the tasks ready to hand out, most urgent first, then oldest first."""
    sql, params = _TASK_SELECT + _READY_WHERE, []
    if project_id:
        sql += " AND t.project_id = ?"
        params.append(project_id)
    tasks = [_task_from_row(r) for r in db.conn.execute(sql + " ORDER BY t.priority, t.created_at_v", params)]
    if any(t.after for t in tasks):  # only a task that waits on done tasks can still be on a cycle
        on_cycle = cycle_members(list_after_edges(db))
        tasks = [t for t in tasks if t.id not in on_cycle]
    return tasks


@record_type(frozen=True, slots=True)
class TaskWaits:
    """One task's place among the waits: what it waits on, what waits on it, a cycle it is on."""

    task_id: str
    waits_on: list[Task]  # the tasks it waits on that are known here, most urgent first (done and removed too)
    unknown: list[str]  # ids it waits on whose task has not reached this host yet (they block)
    blocks: list[Task]  # the tasks that wait on it (removed ones left out), most urgent first
    cycle: list[str]  # a shortest cycle of waits through it, [id, ..., id]: then it is never ready; or []
    is_ready: bool

    def to_json(self) -> dict[str, Any]:
        """Return the waits as the JSON object the CLI and API print."""
        return {"task_id": self.task_id, "waits_on": [t.to_json() for t in self.waits_on], "unknown": self.unknown,
                "blocks": [t.to_json() for t in self.blocks], "cycle": self.cycle, "is_ready": self.is_ready}


def read_task_waits(db: Db, task: Task, *, graph: Mapping[str, Sequence[str]] | None = None) -> TaskWaits:
    """Return what `task` waits on, what waits on it, and the cycle of waits it is on, if any."""
    graph = list_after_edges(db) if graph is None else graph
    marks = ",".join("?" * len(task.after))
    waits_on = [_task_from_row(r) for r in db.conn.execute(
        _TASK_SELECT + f" AND t.id IN ({marks}) ORDER BY t.priority, t.created_at_v", task.after)]
    blocks = [_task_from_row(r) for r in db.conn.execute(
        _TASK_SELECT + """ AND t.removed_at IS NULL AND t.id IN
            (SELECT task_id FROM task_after WHERE after_id = ? AND present = 1)
          ORDER BY t.priority, t.created_at_v""", (task.id,))]
    known = {t.id for t in waits_on}
    is_ready = task.id in {t.id for t in list_ready_tasks(db, project_id=task.project_id)}
    return TaskWaits(task.id, waits_on, [x for x in task.after if x not in known], blocks,
                     find_cycle(graph, task.id), is_ready)


def list_after_edges(db: Db) -> dict[str, tuple[str, ...]]:
    """Return every wait: task id -> the ids of the tasks it waits on, sorted (removed tasks' too)."""
    graph: dict[str, list[str]] = {}
    for task_id, after_id in db.conn.execute(
            "SELECT task_id, after_id FROM task_after WHERE present = 1 ORDER BY task_id, after_id"):
        graph.setdefault(task_id, []).append(after_id)
    return {k: tuple(v) for k, v in graph.items()}


def list_blocked_by(db: Db, task_id: str) -> list[str]:
    """Return the ids of the tasks that wait on `task_id`, sorted."""
    return [r[0] for r in db.conn.execute(
        "SELECT task_id FROM task_after WHERE after_id = ? AND present = 1 ORDER BY task_id", (task_id,))]


def find_cycle(graph: Mapping[str, Sequence[str]], start: str) -> list[str]:
    """Return a shortest cycle of waits through `start` as [start, ..., start], or [] if it is on none."""
    came_from: dict[str, str] = {}
    queue = [start]
    for node in queue:  # breadth first: the list grows while it is walked
        for nxt in graph.get(node, ()):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    return []


def cycle_members(graph: Mapping[str, Sequence[str]]) -> set[str]:
    """Return the ids of the tasks on some cycle of waits (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    members: set[str] = set()
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph.get(root, ())))]  # iterative: a long chain of waits must not hit the recursion limit
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.get(node, ()):
                        members.update(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph.get(child, ()))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return members


_GROUP_SELECT = """
SELECT id, name, cwd, host, tmux_name, created_at FROM groups
 WHERE created_at_v IS NOT NULL AND removed_at_v IS NULL"""


def list_groups(db: Db) -> list[Group]:
    """Return the groups that exist, by name."""
    return [Group(*r) for r in db.conn.execute(_GROUP_SELECT + " ORDER BY name, id")]


def find_groups(db: Db, ref: str) -> list[Group]:
    """Return the groups named `ref`, or else those whose id starts with `ref`."""
    rows = db.conn.execute(_GROUP_SELECT + " AND name = ? ORDER BY id", (ref,)).fetchall()
    if not rows and ID_PREFIX_RE.match(ref):
        rows = db.conn.execute(_GROUP_SELECT + " AND id >= ? AND id < ? ORDER BY id LIMIT 10",
                               (ref, ref + "~")).fetchall()
    return [Group(*r) for r in rows]


def list_updates(db: Db, *, task_ids: list[str] | None = None, update_id: str | None = None,
                 limit: int = 50) -> list[Update]:
    """Return the newest updates (of some tasks, one by id, or all), newest last."""
    sql = "SELECT id, task_id, session_id, source, text, created_at, machine_id FROM updates WHERE 1"
    params: list[Any] = []
    if task_ids is not None:
        sql += f" AND task_id IN ({','.join('?' * len(task_ids))})"
        params += task_ids
    if update_id is not None:
        sql += " AND id = ?"
        params.append(update_id)
    rows = db.conn.execute(sql + " ORDER BY hlc DESC, id DESC LIMIT ?", [*params, limit]).fetchall()
    return [Update(*r) for r in reversed(rows)]


_SESSION_SELECT = """
SELECT s.id, s.host, s.cwd, s.tmux_socket, s.tmux_target, s.pane_id, s.pid, s.command, s.state, s.state_at,
       s.last_activity_at, s.label, s.tokens, s.created_at, s.asked,
       (SELECT max(json_extract(c.info, '$.last_activity_at')) FROM transcript_cache c WHERE c.session_id = s.id)
           AS fresh_activity_at,
       (SELECT json_extract(c.info, '$.tokens') FROM transcript_cache c WHERE c.session_id = s.id
         ORDER BY c.mtime_ns DESC LIMIT 1) AS fresh_tokens,
       (SELECT t.id FROM tasks t WHERE t.assignee = 'session:' || s.id AND t.status != 'done'
           AND t.created_at_v IS NOT NULL AND t.removed_at IS NULL ORDER BY t.priority, t.created_at_v LIMIT 1)
           AS task_id,
       (SELECT group_concat(id, ' ') FROM (SELECT t.id FROM tasks t WHERE t.assignee = 'session:' || s.id
           AND t.status != 'done' AND t.created_at_v IS NOT NULL AND t.removed_at IS NULL
         ORDER BY t.priority, t.created_at_v)) AS task_ids
  FROM sessions s
 WHERE s.created_at_v IS NOT NULL"""


def _session_from_row(row: sqlite3.Row) -> Session:
    # This host's transcript cache is fresher than the last event (events are written only on a change).
    activity = max(filter(None, (row["last_activity_at"], row["fresh_activity_at"])), default=None)
    tokens = json.loads(row["fresh_tokens"] or row["tokens"] or "{}")
    return Session(row["id"], row["host"], row["cwd"] or "", row["tmux_socket"], row["tmux_target"],
                   row["pane_id"], row["pid"], row["command"] or "", row["state"], row["state_at"], activity,
                   row["label"] or "", row["task_id"], {k: int(tokens.get(k, 0)) for k in TOKEN_KINDS},
                   row["created_at"], tuple((row["task_ids"] or "").split()),
                   asked=json.loads(row["asked"]) if row["asked"] else None)


def find_sessions(db: Db, *, prefix: str | None = None, host: str | None = None,
                  include_gone: bool = True) -> list[Session]:
    """Return sessions by id prefix or host, ordered by host, tmux target and id."""
    sql, params = _SESSION_SELECT, list[str]()
    if prefix is not None:
        sql += " AND s.id >= ? AND s.id < ?"
        params += (prefix, prefix + "~")
    if host is not None:
        sql += " AND s.host = ?"
        params.append(host)
    if not include_gone:
        sql += " AND s.state != 'gone'"
    rows = db.conn.execute(sql + " ORDER BY s.host, s.tmux_target, s.id", params).fetchall()
    return [_session_from_row(r) for r in rows]


def list_project_session_ids(db: Db, project_id: str) -> list[str]:
    """Return the sessions whose newest task binding is to a task of a project (done or not): its sessions.

    Dispatch counts them against --max-sessions and feeds those that wait with no open task.
    """
    # SQLite: a bare column beside max() comes from the row that holds the max.
    return [r[0] for r in db.conn.execute(
        """SELECT substr(t.assignee, 9), t.project_id, max(t.assignee_v) FROM tasks t
            WHERE t.assignee LIKE 'session:%' AND t.created_at_v IS NOT NULL AND t.removed_at IS NULL
            GROUP BY t.assignee""") if r[1] == project_id]


def list_group_tasks(db: Db) -> list[tuple[str, str]]:
    """Return (group id, task id) of open group assignments, most urgent task first."""
    return [tuple(r) for r in db.conn.execute(
        f"""SELECT g.id, t.id FROM tasks t JOIN groups g ON g.id = substr(t.assignee, 7)
             WHERE t.assignee LIKE 'group:%' AND t.status != 'done' AND t.created_at_v IS NOT NULL
               AND t.removed_at IS NULL AND {_LIVE_GROUP} ORDER BY t.priority, t.created_at_v""")]


def get_transcript_cache(db: Db) -> dict[str, tuple[int, int, dict[str, Any]]]:
    """Return this host's transcript readings: path -> (size, mtime_ns, info)."""
    return {r[0]: (r[1], r[2], json.loads(r[3]))
            for r in db.conn.execute("SELECT path, size, mtime_ns, info FROM transcript_cache")}


def save_transcript_cache(db: Db, rows: list[tuple[str, str | None, int, int, dict[str, Any]]]) -> None:
    """Store new readings (path, session_id, size, mtime_ns, info) of transcripts."""
    with write_txn(db) as cur:
        cur.executemany("INSERT OR REPLACE INTO transcript_cache (path, session_id, size, mtime_ns, info) "
                        "VALUES (?, ?, ?, ?, ?)", [(*r[:4], canonical_json(r[4])) for r in rows])


@record_type(frozen=True, slots=True)
class HookMark:
    tmux_socket: str | None
    pane_id: str | None
    state: str | None  # the state the newest state-bearing report implied
    hook_event: str  # hook_event_name of the newest report
    at_ms: int


def list_hook_marks(db: Db, *, session_id: str | None = None) -> dict[str, HookMark]:
    """Return the newest hook report per session of this host (or of one session)."""
    sql = "SELECT session_id, tmux_socket, pane_id, state, hook_event, at_ms FROM hook_marks"
    rows = db.conn.execute(sql + " WHERE session_id = ?", (session_id,)) if session_id else db.conn.execute(sql)
    return {r[0]: HookMark(*r[1:]) for r in rows}


def save_hook_mark(cur: sqlite3.Cursor, session_id: str, mark: HookMark) -> None:
    """Remember a hook report unless a newer one is stored; keep the known pane and state. In a txn."""
    cur.execute(
        """INSERT INTO hook_marks (session_id, tmux_socket, pane_id, state, hook_event, at_ms)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (session_id) DO UPDATE SET
             tmux_socket = coalesce(excluded.tmux_socket, tmux_socket),
             pane_id = coalesce(excluded.pane_id, pane_id),
             state = coalesce(excluded.state, state),
             hook_event = excluded.hook_event,
             at_ms = excluded.at_ms
           WHERE excluded.at_ms >= at_ms""",
        (session_id, mark.tmux_socket, mark.pane_id, mark.state, mark.hook_event, mark.at_ms))


def list_notify_marks(db: Db) -> dict[str, tuple[str | None, int | None]]:
    """Return the notifier's marks on this host: session id -> (state last seen, when it last notified)."""
    return {r[0]: (r[1], r[2]) for r in db.conn.execute("SELECT session_id, state, notified_ms FROM notify_marks")}


def save_notify_marks(cur: sqlite3.Cursor, marks: dict[str, tuple[str | None, int | None]], *, after: int) -> None:
    """Store the notifier's marks and how far into the log it has read. In a txn."""
    cur.executemany("INSERT OR REPLACE INTO notify_marks (session_id, state, notified_ms) VALUES (?, ?, ?)",
                    [(sid, state, at) for sid, (state, at) in marks.items()])
    set_meta(cur, "notify_after", str(after))


_ANSWER_COLUMNS = ("id, session_id, host, tool_use_id, tool, input, answer, option, option_text, reason, by_host, "
                   "client, created_at, result, result_reason, resolved_at")


def list_answers(db: Db, *, session_id: str | None = None, answer_id: str | None = None,
                 pending_on: str | None = None, limit: int = 50) -> list[Answer]:
    """Return answers to permission dialogs, oldest first: of a session, one by id, or those pending on a host."""
    sql, params = f"SELECT {_ANSWER_COLUMNS} FROM answers WHERE created_at_v IS NOT NULL", list[Any]()
    for column, value in (("session_id", session_id), ("id", answer_id), ("host", pending_on)):
        if value is not None:
            sql += f" AND {column} = ?"
            params.append(value)
    if pending_on is not None:
        sql += " AND result = 'pending'"
    rows = db.conn.execute(f"SELECT * FROM ({sql} ORDER BY created_at_v DESC LIMIT ?) ORDER BY created_at",
                           [*params, limit]).fetchall()
    return [Answer(*r) for r in rows]


def answer_received_ms(db: Db, answer_id: str) -> int | None:
    """Return when this host stored an answer, by its own clock."""
    row = db.conn.execute("SELECT received_ms FROM answer_receipts WHERE answer_id = ?", (answer_id,)).fetchone()
    return row[0] if row else None


def save_tool_use(cur: sqlite3.Cursor, session_id: str, tool_use_id: str, input_key: str, *, at_ms: int) -> None:
    """Remember a PreToolUse report: a PermissionRequest with the same input takes its id. In a txn."""
    cur.execute("INSERT OR IGNORE INTO tool_uses (session_id, tool_use_id, input_key, at_ms) VALUES (?, ?, ?, ?)",
                (session_id, tool_use_id, input_key, at_ms))


def take_tool_use(cur: sqlite3.Cursor, session_id: str, input_key: str) -> str | None:
    """Return the oldest tool use of a session with this input that no PermissionRequest took yet; take it."""
    row = cur.execute("""SELECT tool_use_id FROM tool_uses WHERE session_id = ? AND input_key = ? AND is_asked = 0
                          ORDER BY at_ms, tool_use_id LIMIT 1""", (session_id, input_key)).fetchone()
    if row is None:
        return None
    cur.execute("UPDATE tool_uses SET is_asked = 1 WHERE session_id = ? AND tool_use_id = ?", (session_id, row[0]))
    return str(row[0])


def save_ask(cur: sqlite3.Cursor, session_id: str, asked: dict[str, str], *, at_ms: int) -> None:
    """Remember what a session's newest PermissionRequest asked, even when it changed no state. In a txn."""
    cur.execute("""INSERT INTO asks (session_id, asked, at_ms) VALUES (?, ?, ?)
                   ON CONFLICT (session_id) DO UPDATE SET asked = excluded.asked, at_ms = excluded.at_ms
                   WHERE excluded.at_ms >= at_ms""", (session_id, canonical_json(asked), at_ms))


def get_ask(cur: sqlite3.Cursor, session_id: str) -> tuple[dict[str, str], int] | None:
    """Return what a session's newest PermissionRequest asked and when, if no later signal ended it."""
    row = cur.execute("SELECT asked, at_ms FROM asks WHERE session_id = ?", (session_id,)).fetchone()
    return (json.loads(row[0]), int(row[1])) if row else None


def drop_ask(cur: sqlite3.Cursor, session_id: str, *, before_ms: int) -> None:
    """Forget a session's remembered ask older than a signal that says no dialog waits. In a txn."""
    cur.execute("DELETE FROM asks WHERE session_id = ? AND at_ms < ?", (session_id, before_ms))


def wait_for_tool_use(cur: sqlite3.Cursor, session_id: str, input_key: str, *, at_ms: int) -> None:
    """Remember a PermissionRequest whose PreToolUse has not arrived yet (async hooks come out of order)."""
    cur.execute("INSERT OR IGNORE INTO tool_uses (session_id, tool_use_id, input_key, at_ms, is_asked) "
                "VALUES (?, ?, ?, ?, -1)", (session_id, f"?{at_ms}", input_key, at_ms))


def claim_waiting_request(cur: sqlite3.Cursor, session_id: str, tool_use_id: str, input_key: str) -> bool:
    """Tell whether a PermissionRequest waits for this PreToolUse; if so, the tool use is taken by it."""
    row = cur.execute("""SELECT tool_use_id FROM tool_uses WHERE session_id = ? AND input_key = ? AND is_asked = -1
                          ORDER BY at_ms LIMIT 1""", (session_id, input_key)).fetchone()
    if row is None:
        return False
    cur.execute("DELETE FROM tool_uses WHERE session_id = ? AND tool_use_id = ?", (session_id, row[0]))
    cur.execute("UPDATE tool_uses SET is_asked = 1 WHERE session_id = ? AND tool_use_id = ?", (session_id, tool_use_id))
    return True


def finish_tool_use(cur: sqlite3.Cursor, session_id: str, tool_use_id: str | None) -> None:
    """Forget a tool use that ran (PostToolUse), or every one of a session whose turn is over (tool_use_id None)."""
    if tool_use_id is None:
        cur.execute("DELETE FROM tool_uses WHERE session_id = ?", (session_id,))
    else:
        cur.execute("DELETE FROM tool_uses WHERE session_id = ? AND tool_use_id = ?", (session_id, tool_use_id))


def list_deliveries(db: Db, *, broadcast_id: str | None = None, pending_on: str | None = None,
                    ) -> list[Delivery]:
    """Return deliveries of one broadcast (an id or a prefix), or those host `pending_on` has to try.

    To try: those no host has tried yet, and those waiting for a draft to go.
    """
    return _list_deliveries(db, broadcast_id=broadcast_id, pending_on=pending_on)


def list_unconfirmed_deliveries(db: Db, *, host: str) -> list[Delivery]:
    """Return the deliveries Claude took (queued) in sessions of `host` that are not confirmed yet."""
    return _list_deliveries(db, queued_on=host)


def _list_deliveries(db: Db, *, broadcast_id: str | None = None, pending_on: str | None = None,
                     queued_on: str | None = None) -> list[Delivery]:
    sql = """SELECT d.broadcast_id, d.session_id, s.host, s.tmux_target, d.result, d.reason, d.updated_at
               FROM deliveries d LEFT JOIN sessions s ON s.id = d.session_id WHERE 1"""
    params: list[Any] = []
    if broadcast_id is not None:
        sql += " AND d.broadcast_id = ?"
        params.append(get_broadcast_id(db, broadcast_id))
    if pending_on is not None:
        sql += " AND (d.by_host IS NULL OR (d.result = 'queued' AND d.reason = ?)) AND s.host = ?"
        params += [DRAFT_WAIT_REASON, pending_on]
    if queued_on is not None:
        sql += " AND d.result = 'queued' AND d.reason != ? AND s.host = ?"
        params += [DRAFT_WAIT_REASON, queued_on]
    return [Delivery(*r) for r in db.conn.execute(sql + " ORDER BY d.updated_at, d.id", params)]


def get_broadcast_id(db: Db, ref: str) -> str:
    """Return the id of the broadcast whose id starts with `ref` (the CLI prints 8 characters)."""
    if not isinstance(ref, str) or not ID_PREFIX_RE.match(ref):
        raise UsageError(f"broadcast id {ref!r} is not a hex id or prefix; copy one from the broadcast's output")
    rows = db.conn.execute("SELECT id FROM broadcasts WHERE id LIKE ? AND created_at_v IS NOT NULL",
                           (ref.lower() + "%",)).fetchall()
    if len(rows) > 1:
        raise UsageError(f"broadcast id {ref!r} is ambiguous ({len(rows)} broadcasts); give more characters")
    # An unknown id is no error here: a receipt can arrive before its broadcast.sent event.
    return rows[0][0] if rows else ref


def get_broadcast_text(db: Db, broadcast_id: str) -> tuple[str, str] | None:
    """Return (text, expires_at) of a broadcast, or None if unknown."""
    row = db.conn.execute("SELECT text, expires_at FROM broadcasts WHERE id = ? AND created_at_v IS NOT NULL",
                          (broadcast_id,)).fetchone()
    return (row[0], row[1]) if row else None


_ORDER_SELECT = """
SELECT id, action, host, session_id, task_id, request, expires_at, result, reason, outcome, by_host,
       created_at, updated_at
  FROM orders WHERE created_at_v IS NOT NULL"""


def _order_from_row(row: sqlite3.Row) -> Order:
    return Order(row["id"], row["action"], row["host"], row["session_id"], row["task_id"],
                 json.loads(row["request"] or "{}"), row["expires_at"], row["result"], row["reason"] or "",
                 json.loads(row["outcome"] or "{}"), row["by_host"], row["created_at"], row["updated_at"])


def list_orders(db: Db, *, order_id: str | None = None, session_id: str | None = None,
                pending_on: str | None = None) -> list[Order]:
    """Return orders, oldest first: one, a session's, or those still pending on one host."""
    sql, params = _ORDER_SELECT, []
    if order_id is not None:
        sql += " AND id = ?"
        params.append(order_id)
    if session_id is not None:
        sql += " AND session_id = ?"
        params.append(session_id)
    if pending_on is not None:
        sql += " AND host = ? AND result = 'pending'"
        params.append(pending_on)
    return [_order_from_row(r) for r in db.conn.execute(sql + " ORDER BY created_at_v, id", params)]


def list_recent_orders(db: Db, *, since_at: str) -> list[Order]:
    """Return the orders still open (pending, claimed) or changed since a time, oldest first: dispatch's view."""
    return [_order_from_row(r) for r in db.conn.execute(
        _ORDER_SELECT + " AND (updated_at >= ? OR result IN ('pending', 'claimed')) ORDER BY created_at_v, id",
        (since_at,))]


def list_known_hosts(db: Db) -> dict[str, set[str]]:
    """Return every host this log knows (machine id -> display names: its host name, peer names).

    Known: the makers of events, peers that answered, the hosts of sessions and of project directories.
    """
    hosts: dict[str, set[str]] = {db.machine_id: set()}
    for (machine_id,) in db.conn.execute("SELECT DISTINCT machine_id FROM events"):
        hosts.setdefault(machine_id, set())
    for (machine_id,) in db.conn.execute("""SELECT host FROM sessions WHERE host IS NOT NULL
                                            UNION SELECT host FROM project_dirs WHERE dir IS NOT NULL"""):
        hosts.setdefault(machine_id, set())
    for name, machine_id in db.conn.execute("SELECT name, machine_id FROM sync_peers WHERE machine_id IS NOT NULL"):
        hosts.setdefault(machine_id, set()).add(name)
    for h in list_announced_hosts(db):
        hosts.setdefault(h.host, set()).add(h.name)
    for machine_id, names in hosts.items():
        names.add(machine_host_name(machine_id))  # apricot-3f9a2c is "apricot" to people
    return hosts


@record_type(frozen=True, slots=True)
class AnnouncedHost:
    host: str  # machine id
    name: str  # display name
    url: str  # as announced: untrusted text until check_peer accepts it
    token_fp: str | None
    announced_at: str

    def to_json(self) -> dict[str, Any]:
        """Return the announcement as the JSON object the CLI and API print."""
        return _as_json(self)


def list_announced_hosts(db: Db) -> list[AnnouncedHost]:
    """Return each host's newest announcement of where its serve answers, by name."""
    rows = db.conn.execute("""SELECT id, name, url, token_fp, announced_at FROM hosts
                               WHERE url_v IS NOT NULL ORDER BY name, id""")
    return [AnnouncedHost(*r) for r in rows]


def last_update_text(db: Db, *, session_id: str, source: str) -> str | None:
    """Return the text of a session's newest update of one source."""
    row = db.conn.execute("SELECT text FROM updates WHERE session_id = ? AND source = ? ORDER BY hlc DESC LIMIT 1",
                          (session_id, source)).fetchone()
    return row[0] if row else None


def list_history(db: Db, entity_ids: list[str], *, limit: int = 200) -> list[Event]:
    """Return the newest events that name any of these entities, oldest first."""
    marks = ",".join("?" * len(entity_ids))
    rows = db.conn.execute(
        f"""SELECT {', '.join('e.' + c for c in _EVENT_COLUMNS.split(', '))} FROM events e
             WHERE e.uuid IN (SELECT uuid FROM event_refs WHERE entity_id IN ({marks}))
             ORDER BY e.hlc DESC, e.uuid DESC LIMIT ?""", [*entity_ids, limit]).fetchall()
    return [_event_from_row(r) for r in reversed(rows)]


# ==========================================================================
# 5. Services: every business rule; each call validates, then runs one transaction.
# ==========================================================================

DESCRIBE: dict[str, Callable[[dict[str, Any]], str]] = {}  # filled after the services


def _check_text(what: str, value: object, *, limit: int, required: bool = False) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{what} must be text")
    value = value.strip() if required else value
    if required and not value:
        raise UsageError(f"{what} is empty; give a non-empty {what}")
    if len(value) > limit:
        raise UsageError(f"{what} is {len(value)} characters long; the limit is {limit}")
    if "\x00" in value:
        raise UsageError(f"{what} contains a NUL character; remove it")
    return value


def _check_choice(what: str, value: object, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise UsageError(f"{what} {value!r} is not one of: {', '.join(map(str, choices))}")
    return value


def _check_priority(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in PRIORITIES:
        raise UsageError(f"priority {value!r} is outside 0-4; use 0 (most urgent) to 4")
    return value


def parse_priority(text: str) -> int:
    """Return the priority a word names (0 to 4, or P0 to P4); raise naming the range."""
    word = text.strip().upper().removeprefix("P")
    if not word.isdigit() or int(word) not in PRIORITIES:
        shown = text if text.isdigit() else repr(text[:40])
        raise UsageError(f"priority {shown} is outside 0-4; use a number from 0 (most urgent) to 4, e.g. --prio 1")
    return int(word)


def parse_priorities(text: str) -> tuple[int, int]:
    """Return the (lowest, highest) priority numbers of 'N' or a range 'N-M'."""
    low, _, high = text.partition("-")
    lo, hi = parse_priority(low), parse_priority(high) if high else parse_priority(low)
    return (lo, hi) if lo <= hi else (hi, lo)


LIST_COMMANDS = {"task": "clare task list", "session": "clare sessions", "project": "clare project list",
                 "group": "clare group list"}  # where a person finds the ids of each kind


def _check_prefix(what: str, ref: object) -> str:
    if not isinstance(ref, str) or not ID_PREFIX_RE.match(ref):
        raise UsageError(f"{what} id {str(ref)[:60]!r} is not a hex id or prefix; copy one from the list: "
                         f"{LIST_COMMANDS.get(what, 'clare --help')}")
    return ref


def _one(what: str, ref: str, found: list, list_cmd: str) -> Any:
    """Return the single match, or raise naming the candidates or how to find one."""
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotFound(f"no {what} {ref!r}; list them with: {list_cmd}")
    ids = ", ".join(f"{x.id[:SHORT_ID + 4]} ({getattr(x, 'name', None) or getattr(x, 'title', None) or x.cwd})"
                    for x in found)
    raise Conflict(f"{what} {ref!r} is ambiguous: {ids}; give more of the id")


def get_project(db: Db, ref: str) -> Project:
    """Return the project named `ref` or whose id starts with `ref`."""
    return _one("project", ref, find_projects(db, _check_text("project", ref, limit=MAX_NAME_CHARS,
                                                                   required=True)), "clare project list")


def get_task(db: Db, ref: str) -> Task:
    """Return the task whose id starts with `ref`."""
    return _one("task", ref, find_tasks(db, _check_prefix("task", ref)), "clare task list")


def get_group(db: Db, ref: str) -> Group:
    """Return the group named `ref` or whose id starts with `ref`."""
    return _one("group", ref, find_groups(db, _check_text("group", ref, limit=MAX_NAME_CHARS, required=True)),
                "clare group list")


def get_session(db: Db, ref: str) -> Session:
    """Return the session whose id starts with `ref` (gone ones too)."""
    return _one("session", ref, find_sessions(db, prefix=_check_prefix("session", ref)), "clare sessions --all")


def list_sessions(db: Db, *, host: str | None = None, include_gone: bool = False) -> list[Session]:
    """Return the sessions, with each one's tasks: its own, then its groups' (task_id: the most urgent)."""
    sessions = find_sessions(db, host=host, include_gone=include_gone)
    group_tasks = list_group_tasks(db)
    if not group_tasks:
        return sessions
    groups = {g.id: g for g in list_groups(db)}
    out = []
    for s in sessions:
        mine = [(g, t) for g, t in group_tasks if g in groups and _in_group(s, groups[g])]
        if mine:
            group = groups[mine[0][0]].name if s.task_id is None else None
            s = record_replace(s, task_id=s.task_id or mine[0][1], group=group,
                                    task_ids=tuple(dict.fromkeys([*s.task_ids, *(t for _, t in mine)])))
        out.append(s)
    return out


URGENCY = {"permission": 0, "waiting": 1, "working": 2, "idle": 3, "gone": 4}  # who needs a person first


def by_urgency(sessions: Iterable[Session]) -> list[Session]:
    """Return sessions most urgent first: a permission dialog, then waiting longest, then working, idle, gone."""
    return sorted(sessions, key=lambda s: (URGENCY.get(s.state, 5), s.state_at or "", s.host, s.tmux_target or "",
                                           s.id))


def _in_group(session: Session, group: Group) -> bool:
    import fnmatch  # only group matching needs it

    return ((group.cwd is None or group.cwd in session.cwd)
            and (group.host is None or group.host in (session.host, machine_host_name(session.host)))
            and (group.tmux_name is None or fnmatch.fnmatchcase(session.tmux_session, group.tmux_name)))


def list_group_sessions(db: Db, group_ref: str, *, include_gone: bool = False) -> list[Session]:
    """Return the sessions a group's patterns match now (membership is computed, never stored)."""
    group = get_group(db, group_ref)
    return [s for s in list_sessions(db, include_gone=include_gone) if _in_group(s, group)]


def create_project(db: Db, name: str, *, goal: str = "", owner: str = "", dirs: Sequence[str] = (),
                   now_ms: int) -> Project:
    """Create a project; its name must not be taken here. `dirs`: where its code lives (parse_dir_spec)."""
    name = _check_name(name)
    goal = _check_text("goal", goal, limit=MAX_TEXT_CHARS)
    owner = _check_text("owner", owner, limit=MAX_NAME_CHARS)
    project_id = new_id()
    with write_txn(db) as cur:
        _check_name_free(db, name)
        placed = _project_dirs(db, dirs)
        record(db, cur, "project.created", {"project_id": project_id, "name": name, "goal": goal,
                                            "owner": owner, "status": "active"}, now_ms=now_ms)
        for host, folder in placed.items():
            record(db, cur, "project.dir_set", {"project_id": project_id, "host": host, "dir": folder}, now_ms=now_ms)
    return get_project(db, project_id)


def name_clashes(projects: Iterable[Project]) -> dict[str, list[Project]]:
    """Return the names that several projects carry (made on two hosts while apart), each with its projects."""
    by_name: dict[str, list[Project]] = {}
    for p in projects:
        by_name.setdefault(p.name, []).append(p)
    return {name: found for name, found in sorted(by_name.items()) if len(found) > 1}


def clash_message(name: str, projects: list[Project]) -> str:
    """Say that several projects share a name, and how to end it."""
    ids = ", ".join(p.id[:SHORT_ID] for p in projects)
    return (f"{len(projects)} projects are named {name!r} ({ids}), made on hosts that were apart; a command "
            f"given that name refuses it: rename one with: clare project rename {projects[-1].id[:SHORT_ID]} NEW")


def resolve_host(db: Db, ref: str) -> str:
    """Return the machine id a host reference names: a machine id, or a display name only one host has."""
    ref = _check_text("host", ref, limit=MAX_NAME_CHARS, required=True)
    hosts = list_known_hosts(db)
    if ref in hosts:
        return ref
    named = sorted(m for m, names in hosts.items() if ref in names)
    if len(named) == 1:
        return named[0]
    if named:
        raise Conflict(f"host name {ref!r} is ambiguous: machine ids {', '.join(named)}; give the machine id")
    raise NotFound(f"no host {ref!r} is known here (known: {', '.join(sorted(hosts))}); give a machine id or a "
                   "peer name, after one sync with that host: clare sync")


def parse_dir_spec(spec: str) -> tuple[str | None, str | None]:
    """Split `--dir` text into (host or None for this host, absolute path or None to remove).

    `/srv/api` is this host's; `apricot:/srv/api` is apricot's; `apricot:` removes apricot's entry.
    """
    spec = _check_text("--dir", spec, limit=MAX_PATH_CHARS)
    host, colon, path = (None, "", spec) if spec.startswith(("/", "~")) else spec.partition(":")
    if not colon:
        host, path = None, spec
    if path == "" and host:
        return host, None
    path = os.path.expanduser(path) if host is None else path
    if not path.startswith("/"):
        raise UsageError(f"--dir {spec!r} is not an absolute path; give /PATH (this host) or HOST:/PATH")
    return host, os.path.normpath(path)


def _project_dirs(db: Db, specs: Sequence[str]) -> dict[str, str | None]:
    """Resolve `--dir` texts to machine id -> path (None removes); a host named twice is refused."""
    dirs: dict[str, str | None] = {}
    for spec in specs:
        ref, path = parse_dir_spec(spec)
        host = db.machine_id if ref is None else resolve_host(db, ref)
        if host in dirs:
            raise UsageError(f"--dir names host {host} twice; give one directory per host")
        dirs[host] = path
    return dirs


def _check_name(name: object) -> str:
    name = _check_text("project name", name, limit=MAX_NAME_CHARS, required=True)
    if ID_PREFIX_RE.match(name) and len(name) >= SHORT_ID:
        # A hex-looking name would be read as an id prefix by every command.
        raise UsageError(f"project name {name!r} looks like an id; add a letter outside a-f")
    return name


def _check_name_free(db: Db, name: str) -> None:
    taken = [p for p in find_projects(db, name) if p.name == name]
    if taken:
        raise Conflict(f"a project named {name!r} exists already ({taken[0].id[:SHORT_ID]}); "
                       "pick another name or change that one with: clare project set")


def edit_project(db: Db, ref: str, *, name: str | None = None, goal: str | None = None,
                 owner: str | None = None, status: str | None = None, dirs: Sequence[str] = (),
                 dispatch: bool | None = None, max_sessions: int | None = None, dispatcher: str | None = None,
                 now_ms: int) -> Project:
    """Change some fields of a project (and where its code lives); values equal to the current ones are not recorded.

    Turning dispatch on makes this host the dispatcher unless one is named or already set.
    """
    changes: dict[str, Any] = {}
    if dispatch is not None and not isinstance(dispatch, bool):
        raise UsageError(f"dispatch {str(dispatch)[:20]!r} is not on or off; give --dispatch on or --dispatch off")
    if max_sessions is not None and not _is_int(max_sessions):
        raise UsageError(f"max_sessions must be a whole number from 1 to {MAX_DISPATCH_SESSIONS}, not "
                         f"{json.dumps(max_sessions)[:20]}; give how many sessions dispatch may keep on it, e.g. 3")
    if max_sessions is not None and not _is_max_sessions(max_sessions):
        raise UsageError(f"--max-sessions {str(max_sessions)[:20]} is outside 1-{MAX_DISPATCH_SESSIONS}; "
                         "give how many sessions dispatch may keep on the project, e.g. --max-sessions 3")
    if dispatch is not None:
        changes["dispatch"] = dispatch
    if max_sessions is not None:
        changes["max_sessions"] = max_sessions
    if dispatcher is not None:
        changes["dispatcher"] = resolve_host(db, dispatcher)
    if name is not None:
        changes["name"] = _check_name(name)
    if goal is not None:
        changes["goal"] = _check_text("goal", goal, limit=MAX_TEXT_CHARS)
    if owner is not None:
        changes["owner"] = _check_text("owner", owner, limit=MAX_NAME_CHARS)
    if status is not None:
        changes["status"] = _check_choice("project status", status, PROJECT_STATUSES)
    with write_txn(db) as cur:
        project = get_project(db, ref)
        if dispatch and not project.dispatcher and "dispatcher" not in changes:
            changes["dispatcher"] = db.machine_id  # the host that turned dispatch on, until someone names another
        changes = {k: v for k, v in changes.items() if getattr(project, _PROJECT_FIELDS.get(k, k)) != v}
        if "name" in changes:
            _check_name_free(db, changes["name"])
        placed = _project_dirs(db, dirs)
        if changes:
            record(db, cur, "project.updated", {"project_id": project.id, **changes}, now_ms=now_ms)
        for host, folder in placed.items():
            if project.dirs.get(host) != folder:
                record(db, cur, "project.dir_set", {"project_id": project.id, "host": host, "dir": folder},
                       now_ms=now_ms)
    return get_project(db, project.id)


_PROJECT_FIELDS = {"dispatch": "is_dispatching"}  # a project.updated field -> the Project attribute it sets


def create_task(db: Db, project_ref: str, title: str, *, priority: int = DEFAULT_PRIORITY,
                description: str = "", tags: Iterable[str] = (), after: Iterable[str] = (), now_ms: int) -> Task:
    """Add a task to a project, status todo; `after`: the tasks (id prefixes) it waits on."""
    title = _check_text("title", title, limit=MAX_TITLE_CHARS, required=True)
    description = _check_text("description", description, limit=MAX_TEXT_CHARS)
    priority = _check_priority(priority)
    tags = sorted(set(_check_tags(tags)))
    after = [_check_prefix("task", ref) for ref in after]
    task_id = new_id()
    with write_txn(db) as cur:
        project = get_project(db, project_ref)
        waits = sorted(_resolve_waits(db, after))
        if len(waits) > MAX_AFTER:
            raise UsageError(f"a task waits on at most {MAX_AFTER} tasks; give fewer --after")
        record(db, cur, "task.created", {"task_id": task_id, "project_id": project.id, "title": title,
                                         "description": description, "priority": priority,
                                         "status": "todo", **({"tags": tags} if tags else {}),
                                         **({"after": waits} if waits else {})}, now_ms=now_ms)
    return get_task(db, task_id)


def ready_tasks(db: Db, project: str | None = None) -> list[Task]:
    """Return the tasks ready to hand out (of one project, by name or id prefix), most urgent then oldest first."""
    return list_ready_tasks(db, project_id=get_project(db, project).id if project else None)


def get_task_waits(db: Db, ref: str) -> TaskWaits:
    """Return what a task waits on, what waits on it, and the cycle of waits it is on, if any."""
    return read_task_waits(db, get_task(db, ref))


@record_type(frozen=True, slots=True)
class Queue:
    """A project's queue: what is ready, what waits on what, and the cycles that keep tasks from ever being ready."""

    project_id: str
    ready: list[Task]  # ready to hand out, most urgent then oldest first
    waiting: list[TaskWaits]  # its open tasks that wait on some task, most urgent first
    cycles: list[list[str]]  # cycles of waits through its tasks, each [id, ..., id]

    def to_json(self) -> dict[str, Any]:
        """Return the queue as the JSON object the CLI and API print."""
        return {"project_id": self.project_id, "ready": [t.to_json() for t in self.ready],
                "waiting": [w.to_json() for w in self.waiting], "cycles": self.cycles}


def get_queue(db: Db, project: str) -> Queue:
    """Return a project's queue: its ready tasks, its open tasks that wait (with what on), its cycles of waits."""
    p = get_project(db, project)
    graph = list_after_edges(db)
    tasks = list_tasks(db, project_id=p.id, include_removed=True)
    waiting = [read_task_waits(db, t, graph=graph) for t in tasks
               if t.after and t.status != "done" and t.removed_at is None]
    cycles: list[list[str]] = []
    seen: set[str] = set()
    for task_id in sorted(cycle_members(graph) & {t.id for t in tasks}):
        if task_id not in seen:
            cycles.append(find_cycle(graph, task_id))
            seen.update(cycles[-1])
    return Queue(p.id, list_ready_tasks(db, project_id=p.id), waiting, cycles)


def _resolve_waits(db: Db, refs: Iterable[str], *, waiter: str | None = None) -> set[str]:
    """Return the ids of the tasks `refs` name for a wait; one removed, or the waiter itself, is refused."""
    ids = set()
    for ref in refs:
        task = get_task(db, ref)
        if task.id == waiter:
            raise UsageError(f"task {task.id[:SHORT_ID]} may not wait on itself; give another task to --after")
        if task.removed_at is not None:
            raise Conflict(f"task {task.id[:SHORT_ID]} is removed, so nothing waits on it; give another task "
                           f"to --after, or bring it back with: clare task restore {task.id[:SHORT_ID]}")
        ids.add(task.id)
    return ids


def cycle_text(cycle: Sequence[str]) -> str:
    """Return a cycle of waits as people read it: 3f2a0b1c → 91bc22d0 → 3f2a0b1c."""
    return " → ".join(x[:SHORT_ID] for x in cycle)


def _refuse_cycles(db: Db, task_id: str, added: Iterable[str]) -> None:
    """Refuse new waits of `task_id` that would close a cycle, naming it and a wait to drop."""
    graph = list_after_edges(db)
    for after_id in sorted(added):
        # with the new wait as its only way out, a cycle through the task is one the wait closes
        cycle = find_cycle({**graph, task_id: (after_id,)}, task_id)
        if cycle:
            raise Conflict(f"task {task_id[:SHORT_ID]} would wait on itself: {cycle_text(cycle)}; drop one "
                           f"wait first with: clare task edit {cycle[1][:SHORT_ID]} --no-after {cycle[2][:SHORT_ID]}")


def _check_tags(tags: Iterable[str]) -> list[str]:
    tags = list(tags)
    for tag in tags:
        if not _is_tag(tag):
            raise UsageError(f"tag {str(tag)[:60]!r} is not one word of letters, digits and _ . : + - "
                             "(at most 40 characters); e.g. --tag backend")
    if len(set(tags)) > MAX_TAGS:
        raise UsageError(f"{len(set(tags))} tags; a task holds at most {MAX_TAGS}")
    return tags


def edit_task(db: Db, ref: str, *, title: str | None = None, description: str | None = None,
              priority: int | None = None, status: str | None = None, tags: Iterable[str] = (),
              untags: Iterable[str] = (), after: Iterable[str] = (), no_after: Iterable[str] = (),
              now_ms: int) -> Task:
    """Change some fields, tags and waits of a task; what equals the current value is not recorded.

    `after` adds tasks it waits on, `no_after` drops some (id prefixes); a wait that would close a
    cycle is refused here (cycles that two hosts close apart are read as never ready).
    """
    changes: dict[str, Any] = {}
    if title is not None:
        changes["title"] = _check_text("title", title, limit=MAX_TITLE_CHARS, required=True)
    if description is not None:
        changes["description"] = _check_text("description", description, limit=MAX_TEXT_CHARS)
    if priority is not None:
        changes["priority"] = _check_priority(priority)
    if status is not None:
        changes["status"] = _check_choice("task status", status, TASK_STATUSES)
    tag_changes = dict.fromkeys(_check_tags(untags), False) | dict.fromkeys(_check_tags(tags), True)
    after, no_after = [_check_prefix("task", r) for r in after], [_check_prefix("task", r) for r in no_after]
    with write_txn(db) as cur:
        task = get_task(db, ref)
        changes = {k: v for k, v in changes.items() if getattr(task, k) != v}
        tag_changes = {k: v for k, v in tag_changes.items() if (k in task.tags) != v}
        if len(set(task.tags) | {k for k, v in tag_changes.items() if v}) > MAX_TAGS:
            raise UsageError(f"a task holds at most {MAX_TAGS} tags; remove some with --untag")
        if tag_changes:
            changes["tags"] = dict(sorted(tag_changes.items()))
        wanted = _resolve_waits(db, after, waiter=task.id)
        added = wanted - set(task.after)
        dropped = _dropped_waits(db, task, no_after) - wanted  # named in both: --after wins, as --tag does
        if len((set(task.after) - dropped) | added) > MAX_AFTER:
            raise UsageError(f"a task waits on at most {MAX_AFTER} tasks; drop some with --no-after")
        _refuse_cycles(db, task.id, added)
        if added or dropped:
            changes["after"] = dict(sorted({**dict.fromkeys(dropped, False), **dict.fromkeys(added, True)}.items()))
        if changes:
            record(db, cur, "task.updated", {"task_id": task.id, **changes}, now_ms=now_ms)
    return get_task(db, task.id)


def _dropped_waits(db: Db, task: Task, refs: Iterable[str]) -> set[str]:
    """Return the waits of `task` that `refs` name; a known task it does not wait on names none."""
    dropped = set()
    for ref in refs:
        # matched among the waits first: one may name a task removed since, or one not known here yet
        hits = [x for x in task.after if x.startswith(ref)]
        if len(hits) > 1:
            raise Conflict(f"--no-after {ref!r} is ambiguous: task {task.id[:SHORT_ID]} waits on "
                           f"{', '.join(h[:SHORT_ID + 4] for h in hits)}; give more of the id")
        if hits:
            dropped.add(hits[0])
        else:
            get_task(db, ref)  # an unknown id is an error; a known task not waited on is nothing to drop
    return dropped


def remove_task(db: Db, ref: str, *, now_ms: int) -> Task:
    """Remove a task: it leaves every list and the dashboard, keeps its history, and can be restored."""
    with write_txn(db) as cur:
        task = get_task(db, ref)
        if task.removed_at is not None:
            raise Conflict(f"task {task.id[:SHORT_ID]} is removed already; bring it back with: "
                           f"clare task restore {task.id[:SHORT_ID]}")
        record(db, cur, "task.removed", {"task_id": task.id}, now_ms=now_ms)
    return get_task(db, task.id)


def restore_task(db: Db, ref: str, *, now_ms: int) -> Task:
    """Bring a removed task back, with every edit made meanwhile."""
    with write_txn(db) as cur:
        task = get_task(db, ref)
        if task.removed_at is None:
            raise Conflict(f"task {task.id[:SHORT_ID]} is not removed; remove it with: "
                           f"clare task rm {task.id[:SHORT_ID]}")
        record(db, cur, "task.restored", {"task_id": task.id}, now_ms=now_ms)
    return get_task(db, task.id)


def assign_task(db: Db, ref: str, *, session_id: str | None = None, group_ref: str | None = None,
                now_ms: int) -> Task:
    """Bind a task to one session or one group, ending any previous binding."""
    if (session_id is None) == (group_ref is None):
        raise UsageError("assign a task to a session or to a group (--group NAME), not both or neither")
    if session_id is not None:
        session_id = _check_prefix("session", session_id)
    with write_txn(db) as cur:
        task = get_task(db, ref)
        if session_id is not None:
            target = {"session_id": get_session(db, session_id).id}
        elif group_ref is not None:
            target = {"group_id": get_group(db, group_ref).id}
        if (task.session_id, task.group_id) != (target.get("session_id"), target.get("group_id")):
            record(db, cur, "task.assigned", {"task_id": task.id, **target}, now_ms=now_ms)
    return get_task(db, task.id)


def unassign_task(db: Db, ref: str, *, now_ms: int) -> Task:
    """End the binding of a task to its session or group."""
    with write_txn(db) as cur:
        task = get_task(db, ref)
        if task.session_id or task.group_id:
            record(db, cur, "task.unassigned", {"task_id": task.id}, now_ms=now_ms)
    return get_task(db, task.id)


# What `clare undo` can take back. A change is every event one service call recorded (they share
# the host and the wall-clock stamp); its undo records the inverse events, each naming the one it
# undoes in `undoes`, so the log only grows and every host sees the undo as an ordinary change.
CHANGE_TYPES = ("project.created", "project.updated", "task.created", "task.updated", "task.assigned",
                "task.unassigned", "task.removed", "task.restored", "group.created", "group.removed",
                "update.posted", "broadcast.sent")
MAX_UNDO_HISTORY = 10_000  # events of one entity read to find the values a change replaced
CANNOT_UNDO = {
    "project.created": "Clare keeps every project; close it with: clare project set NAME --status done",
    "group.removed": "a removed group never comes back; make it again with: clare group add NAME --cwd ...",
    "update.posted": "a posted note stays; add a correction with: clare update TASK TEXT",
    "broadcast.sent": "the text was typed into the sessions already; it cannot be taken back",
}


@record_type(frozen=True, slots=True)
class Change:
    events: list[Event]  # what one command recorded on this host, in order
    description: str
    refusal: str | None  # why it cannot be undone, or None

    def to_json(self) -> dict[str, Any]:
        """Return the change as the JSON object the CLI and API print."""
        return {"events": [e.to_json() for e in self.events], "description": self.description,
                "created_at": self.events[0].created_at, "can_undo": self.refusal is None, "refusal": self.refusal}


@record_type(frozen=True, slots=True)
class UndoResult:
    undone: Change
    recorded: list[Event]  # the inverse events
    n_kept: int  # fields another change has set since: left as they are

    def to_json(self) -> dict[str, Any]:
        """Return the result as the JSON object the CLI and API print."""
        return {**self.undone.to_json(), "recorded": [e.to_json() for e in self.recorded], "n_kept": self.n_kept}


def list_changes(db: Db, *, limit: int = 10) -> list[Change]:
    """Return this host's newest changes that are not undone yet, newest first: what undo takes next."""
    # One walk back through this host's changes: an undo event comes after the one it takes back,
    # so it is met first (no scan of the whole log for undo marks).
    undone: set[str] = set()
    before = None
    changes: list[Change] = []
    while len(changes) < limit:
        events = list_own_events(db, CHANGE_TYPES, before_rseq=before, limit=200)
        if not events:
            break
        before = events[-1].rseq
        for ev in events:
            if isinstance(ev.payload.get("undoes"), str):
                undone.add(ev.payload["undoes"])
                continue
            if ev.uuid in undone:
                continue
            if changes and changes[-1].events[0].created_at == ev.created_at \
                    and changes[-1].events[0].rseq - ev.rseq == 1:
                changes[-1] = _change([ev, *changes[-1].events])
            elif len(changes) < limit:
                changes.append(_change([ev]))
    return changes[:limit]


def _change(events: list[Event]) -> Change:
    refusal = next((CANNOT_UNDO[e.event_type] for e in events if e.event_type in CANNOT_UNDO), None)
    return Change(events, "; ".join(describe_event(e) for e in events), refusal)


def undo_change(db: Db, *, now_ms: int) -> UndoResult:
    """Undo this host's newest change not undone yet by recording its inverse; never delete an event."""
    with write_txn(db) as cur:
        changes = list_changes(db, limit=1)
        if not changes:
            raise NotFound("nothing to undo: this host has made no change that is not undone yet; "
                           "see what happened with: clare log")
        change = changes[0]
        if change.refusal is not None:
            raise Conflict(f"cannot undo the last change ({change.description}): {change.refusal}")
        recorded, n_kept = [], 0
        for ev in reversed(change.events):
            event_type, payload, kept = _inverse(db, ev)
            n_kept += kept
            recorded.append(record(db, cur, event_type, {**payload, "undoes": ev.uuid}, now_ms=now_ms))
    return UndoResult(change, recorded, n_kept)


_ENTITY_KEYS = {"project": "project_id", "task": "task_id", "group": "group_id"}


def _field_values(ev: Event) -> dict[str, Any]:
    """Return what an event sets on its entity, as field -> value (tags as 'tag:NAME' -> bool)."""
    p, kind = ev.payload, ev.event_type
    if kind in ("project.created", "project.updated", "task.created", "task.updated"):
        out = {k: p[k] for k in ("name", "goal", "owner", "title", "description", "priority", "status", "dispatch",
                                 "max_sessions", "dispatcher") if k in p}
        tags = dict.fromkeys(p.get("tags", ()), True) if kind == "task.created" else p.get("tags", {})
        waits = dict.fromkeys(p.get("after", ()), True) if kind == "task.created" else p.get("after", {})
        return out | {f"tag:{t}": v for t, v in tags.items()} | {f"after:{t}": v for t, v in waits.items()}
    if kind == "task.assigned":
        return {"assignee": {"session_id": p["session_id"]} if p.get("session_id") else {"group_id": p["group_id"]}}
    if kind == "task.unassigned":
        return {"assignee": None}
    if kind in ("task.removed", "task.restored"):
        return {"removed": kind == "task.removed"}
    return {}


def _inverse(db: Db, ev: Event) -> tuple[str, dict[str, Any], int]:
    """Return (event type, payload, fields left alone) of the event that takes `ev` back.

    A field that a later change (from any host) has set again keeps that newer value: undo
    takes back this host's change, never someone else's.
    """
    kind, _, action = ev.event_type.partition(".")
    key = _ENTITY_KEYS[kind]
    head = {key: ev.payload[key]}
    if ev.event_type == "task.created":
        return "task.removed", head, 0
    if ev.event_type == "group.created":
        return "group.removed", head, 0
    mine = sorted((e for e in list_history(db, [ev.payload[key]], limit=MAX_UNDO_HISTORY)
                   if e.event_type.startswith(kind + ".") and e.payload.get(key) == ev.payload[key]),
                  key=lambda e: (e.hlc, e.uuid))
    before: dict[str, Any] = {}
    now: dict[str, Any] = {}
    for e in mine:
        now.update(_field_values(e))
        if (e.hlc, e.uuid) < (ev.hlc, ev.uuid):
            before.update(_field_values(e))
    undo = {f: before.get(f, False if f.startswith(("tag:", "after:")) or f in ("removed", "dispatch") else None)
            for f, v in _field_values(ev).items() if now.get(f) == v}
    n_kept = len(_field_values(ev)) - len(undo)
    if "removed" in undo:
        return ("task.removed" if undo["removed"] else "task.restored"), head, n_kept
    if "assignee" in undo:
        return (("task.assigned", {**head, **undo["assignee"]}, n_kept) if undo["assignee"]
                else ("task.unassigned", head, n_kept))
    # What is left is an update; an empty one (all changed since) only marks the change as undone.
    tags = {f[4:]: v for f, v in undo.items() if f.startswith("tag:")}
    waits = {f[6:]: v for f, v in undo.items() if f.startswith("after:")}
    fields = {f: v for f, v in undo.items() if not f.startswith(("tag:", "after:")) and v is not None}
    return f"{kind}.updated", {**head, **fields, **({"tags": tags} if tags else {}),
                               **({"after": waits} if waits else {})}, n_kept


def create_group(db: Db, name: str, *, cwd: str | None = None, host: str | None = None,
                 tmux_name: str | None = None, now_ms: int) -> Group:
    """Create a named group of sessions matched by cwd substring, host and tmux session name."""
    name = _check_text("group name", name, limit=MAX_NAME_CHARS, required=True)
    patterns = {k: _check_text(k, v, limit=1000, required=True)
                for k, v in (("cwd", cwd), ("host", host), ("tmux_name", tmux_name)) if v is not None}
    if not patterns:
        raise UsageError("a group needs at least one pattern: --cwd SUBSTRING, --host HOST or --name PATTERN")
    group_id = new_id()
    with write_txn(db) as cur:
        if any(g.name == name for g in find_groups(db, name)):
            raise Conflict(f"a group named {name!r} exists already; remove it first with: clare group rm {name}")
        record(db, cur, "group.created", {"group_id": group_id, "name": name, "cwd": None, "host": None,
                                          "tmux_name": None, **patterns}, now_ms=now_ms)
    return get_group(db, group_id)


def remove_group(db: Db, ref: str, *, now_ms: int) -> Group:
    """Remove a group; tasks assigned to it keep the binding in their history only."""
    with write_txn(db) as cur:
        group = get_group(db, ref)
        bound = list_tasks(db, group_id=group.id)  # before the removal hides the binding
        record(db, cur, "group.removed", {"group_id": group.id}, now_ms=now_ms)
        for task in bound:
            record(db, cur, "task.unassigned", {"task_id": task.id}, now_ms=now_ms)
    return group


def post_update(db: Db, text: str, *, task_ref: str | None = None, session_id: str | None = None,
                pane: tuple[str | None, str] | None = None, source: str = "message", is_done: bool = False,
                now_ms: int) -> Update:
    """Add a progress note (or pane tail, triage, hook note) to a task and/or a session.

    `pane` is (tmux socket or None, pane id) of the caller's pane: the note goes to the task of
    the Claude session in that pane. With `is_done` the note is the summary and the task is done.
    """
    text = _check_text("update text", text, limit=MAX_TEXT_CHARS, required=True)
    source = _check_choice("update source", source, UPDATE_SOURCES)
    if task_ref is None and session_id is None and pane is None:
        raise UsageError("an update needs a task (clare update TASK TEXT) or must run inside a session's pane")
    if session_id is not None:
        _check_prefix("session", session_id)
    update_id = new_id()
    with write_txn(db) as cur:
        if pane is not None and task_ref is None:
            session = get_pane_session(db, *pane)
            if session.task_id is None:
                raise UsageError(f"session {session.id[:SHORT_ID]} in pane {pane[1]} has no task; assign one "
                                 f"with: clare assign TASK {session.id[:SHORT_ID]} (or name the task)")
            session_id, task_ref = session.id, session.task_id
        if session_id is not None:
            session_id = get_session(db, session_id).id
        task = get_task(db, task_ref) if task_ref is not None else None
        if is_done and task is None:
            raise UsageError("--done needs a task: name it (clare update TASK --done SUMMARY) or run inside its pane")
        record(db, cur, "update.posted", {"update_id": update_id, "task_id": task and task.id,
                                          "session_id": session_id, "source": source, "text": text}, now_ms=now_ms)
        if is_done and task is not None and task.status != "done":
            record(db, cur, "task.updated", {"task_id": task.id, "status": "done"}, now_ms=now_ms)
    return list_updates(db, update_id=update_id)[0]


def get_pane_session(db: Db, tmux_socket: str | None, pane_id: str) -> Session:
    """Return the live session this host last saw in a tmux pane."""
    found = [s for s in list_sessions(db, host=db.machine_id) if s.pane_id == pane_id]
    # Pane ids are per tmux server: prefer the caller's server, but a socket path spelled another
    # way (a symlinked TMUX_TMPDIR) must not hide the only match.
    found = [s for s in found if s.tmux_socket == tmux_socket] or found
    if not found:
        raise NotFound(f"no Claude session is known in tmux pane {pane_id}; run 'clare pull' first, "
                       "or name the task: clare update TASK TEXT")
    return max(found, key=lambda s: s.state_at or "")


@record_type(frozen=True, slots=True)
class Observation:
    """What one look at this host says about one of its Claude sessions."""

    session_id: str
    cwd: str
    tmux_socket: str | None
    tmux_target: str | None
    pane_id: str | None
    pid: int | None
    command: str
    state: str
    last_activity_ms: int | None
    label: str
    tokens: dict[str, int]


_OBSERVED_KEYS = ("cwd", "tmux_socket", "tmux_target", "pane_id", "pid", "command", "state", "label")


def observe_sessions(db: Db, seen: list[Observation], *, keep_sockets: Iterable[str] = (),
                     keep_ids: Iterable[str] = (), live_panes: Mapping[str, Iterable[str]] | None = None,
                     now_ms: int) -> list[Event]:
    """Record how this host's sessions changed since the last look: appeared, changed, gone.

    A session of this host that is not seen is gone, unless its tmux server could not be asked
    (keep_sockets) or other evidence says it lives (keep_ids). That evidence loses to tmux itself:
    when the session's tmux server answered (`live_panes`: socket -> its pane ids) without the
    session's pane, the pane was killed and the session is gone now. Nothing is written when nothing
    changed: the log must not grow with polling. Last activity and tokens ride along with an
    event but never cause one.
    """
    for ob in seen:
        _check_prefix("session", ob.session_id)
        _check_choice("session state", ob.state, SESSION_STATES)
    keep, keep_ids = set(keep_sockets), set(keep_ids)
    events = []
    seen_ids = {ob.session_id for ob in seen}
    with write_txn(db) as cur:
        known = {s.id: s for s in find_sessions(db, host=db.machine_id)}
        for ob in seen:
            payload = {"session_id": ob.session_id, "host": db.machine_id,
                       **{k: getattr(ob, k) for k in _OBSERVED_KEYS}}
            extra = {"last_activity_at": iso_ms(ob.last_activity_ms) if ob.last_activity_ms else None,
                     "tokens": ob.tokens}
            old = known.get(ob.session_id)
            if old is None:
                events.append(record(db, cur, "session.appeared", {**payload, **extra}, now_ms=now_ms))
                # /clear (or /resume inside Claude) starts another session in the same process and pane.
                before = next((s for s in known.values() if s.state != "gone" and s.id not in seen_ids
                               and ob.pid is not None and s.pid == ob.pid and ob.pane_id is not None
                               and (s.pane_id, s.tmux_socket) == (ob.pane_id, ob.tmux_socket)), None)
                if before is not None:
                    events += _hand_over(db, cur, before.id, ob.session_id, now_ms=now_ms)
                    known[before.id] = record_replace(before, state="gone")
                continue
            changed = {k: payload[k] for k in _OBSERVED_KEYS if getattr(old, k) != payload[k]}
            if "state" in changed and ob.state != "permission" and old.asked is not None:
                changed["asked"] = None  # the dialog is over: what it asked goes with it
            elif ob.state == "permission" and old.asked is None and (ask := get_ask(cur, ob.session_id)):
                changed["asked"] = ask[0]  # its PermissionRequest changed no state at once: it names the dialog
            if changed:
                events.append(record(db, cur, "session.changed", {"session_id": ob.session_id,
                                                                  "host": db.machine_id, **changed, **extra},
                                     now_ms=now_ms))
        seen_ids = {ob.session_id for ob in seen}
        panes = {socket: set(ids) for socket, ids in (live_panes or {}).items()}
        for s in known.values():
            pane_gone = s.tmux_socket in panes and s.pane_id is not None and s.pane_id not in panes[s.tmux_socket]
            if s.state != "gone" and s.id not in seen_ids and s.tmux_socket not in keep and (
                    s.id not in keep_ids or pane_gone):
                reason = f"its tmux pane {s.pane_id} is gone" if pane_gone else "no longer running"
                events.append(record(db, cur, "session.gone", {"session_id": s.id, "host": db.machine_id,
                                                               "reason": reason}, now_ms=now_ms))
    return events


def _hand_over(db: Db, cur: sqlite3.Cursor, old_id: str, new_id: str, *, now_ms: int) -> list[Event]:
    """Record that a session's process went on as another session: the old one is gone, its tasks follow."""
    events = [record(db, cur, "session.gone", {"session_id": old_id, "host": db.machine_id,
                                               "reason": f"cleared: the same process and pane went on as "
                                                         f"{new_id[:SHORT_ID]}", "successor_id": new_id},
                     now_ms=now_ms)]
    for task in list_tasks(db, session_id=old_id):
        if task.status != "done":
            events.append(record(db, cur, "task.assigned", {"task_id": task.id, "session_id": new_id},
                                 now_ms=now_ms))
    return events


def report_hook(db: Db, session_id: str, mark: HookMark, *, cwd: str, tmux_target: str | None = None,
                is_end: bool = False, is_clear: bool = False, asked: dict[str, str] | None = None,
                is_stale: bool = False, tool_use_id: str | None = None, input_key: str | None = None,
                now_ms: int) -> list[Event]:
    """Fold one hook report in: remember it, and record the session's new state at once.

    A report older than the one stored (a spooled report ingested late) is kept out of the state.
    `asked` ({tool, input}) is what a PermissionRequest asks: kept with the state until it leaves
    `permission`. `is_clear` (SessionStart after /clear) hands the session last seen in that pane
    over to this one. An `is_stale` report (newer signals exist already) is remembered but
    changes no state at once: the next pull weighs it against them. The dialog's identity is the
    tool use it asks about: a PreToolUse report (`tool_use_id`, `input_key`) is remembered, and the
    PermissionRequest with the same input key takes the oldest one not taken yet, so two identical
    commands stay two dialogs.
    """
    _check_prefix("session", session_id)
    if mark.state is not None:
        _check_choice("session state", mark.state, SESSION_STATES)
    if not _is_asked(asked):
        raise UsageError(f"asked must be {{tool, input}} texts of at most {MAX_ASKED_CHARS} characters")
    events: list[Event] = []
    with write_txn(db) as cur:
        if mark.hook_event == "PreToolUse" and tool_use_id and input_key:
            save_tool_use(cur, session_id, tool_use_id, input_key, at_ms=mark.at_ms)
            if claim_waiting_request(cur, session_id, tool_use_id, input_key):
                # Its PermissionRequest came first (async hooks arrive out of order): name the dialog now.
                ask = get_ask(cur, session_id)
                if ask is not None and "tool_use_id" not in ask[0]:
                    save_ask(cur, session_id, {**ask[0], "tool_use_id": tool_use_id}, at_ms=ask[1])
                now = next((x for x in find_sessions(db, prefix=session_id) if x.id == session_id), None)
                if now is not None and now.state == "permission" and now.asked and "tool_use_id" not in now.asked:
                    events.append(record(db, cur, "session.changed", {
                        "session_id": session_id, "host": db.machine_id,
                        "asked": {**now.asked, "tool_use_id": tool_use_id}}, now_ms=now_ms))
        elif mark.hook_event == "PostToolUse" and tool_use_id:
            finish_tool_use(cur, session_id, tool_use_id)
        elif mark.hook_event in ("Stop", "StopFailure", "SessionEnd"):
            finish_tool_use(cur, session_id, None)
        elif asked and input_key and "tool_use_id" not in asked:
            taken = take_tool_use(cur, session_id, input_key)
            if taken is None:
                wait_for_tool_use(cur, session_id, input_key, at_ms=mark.at_ms)
            asked = {**asked, "tool_use_id": taken} if taken else asked
        if asked:
            save_ask(cur, session_id, asked, at_ms=mark.at_ms)
        elif mark.state not in (None, "permission"):
            drop_ask(cur, session_id, before_ms=mark.at_ms)
        elif mark.state == "permission":
            # A permission report without the ask (a Notification; or its PermissionRequest was judged
            # stale and changed no state): the newest remembered ask is what this dialog asks.
            asked = (get_ask(cur, session_id) or (None, 0))[0]
        save_hook_mark(cur, session_id, mark)
        stored = list_hook_marks(db, session_id=session_id)[session_id]
        if (stored.at_ms, stored.hook_event) != (mark.at_ms, mark.hook_event) or is_stale:
            return events
        old = next((s for s in find_sessions(db, prefix=session_id) if s.id == session_id), None)
        head = {"session_id": session_id, "host": db.machine_id}
        if is_end:
            if old is not None and old.state != "gone":
                events.append(record(db, cur, "session.gone", {**head, "reason": "session ended"}, now_ms=now_ms))
        elif old is None and mark.state is not None:
            events.append(record(db, cur, "session.appeared", {
                **head, "cwd": cwd, "tmux_socket": mark.tmux_socket, "tmux_target": tmux_target,
                "pane_id": mark.pane_id, "pid": None, "command": "", "state": mark.state,
                "last_activity_at": iso_ms(mark.at_ms), "label": "", "tokens": {},
                **({"asked": asked} if asked else {})}, now_ms=now_ms))
            # The session that ended with reason clear in this pane (a pull may have called it gone
            # meanwhile), else the one live session last seen there.
            ended = {sid for sid, m in list_hook_marks(db).items() if m.hook_event == "SessionEnd"
                     and m.pane_id == mark.pane_id and m.tmux_socket in (None, mark.tmux_socket)}
            in_pane = [s for s in find_sessions(db, host=db.machine_id, include_gone=True) if is_clear
                       and mark.pane_id and s.id != session_id and s.pane_id == mark.pane_id
                       and (mark.tmux_socket is None or s.tmux_socket in (None, mark.tmux_socket))]
            before = [s for s in in_pane if s.id in ended] or [s for s in in_pane if s.state != "gone"]
            if len(before) == 1:
                events += _hand_over(db, cur, before[0].id, session_id, now_ms=now_ms)
        elif old is not None and mark.state is not None:
            changed: dict[str, Any] = {k: v for k, v in (("state", mark.state), ("pane_id", mark.pane_id),
                                         ("tmux_socket", mark.tmux_socket), ("tmux_target", tmux_target))
                       if v is not None and getattr(old, k) != v}
            if mark.state == "permission" and asked and old.asked != asked:
                changed["asked"] = asked
            elif mark.state != "permission" and old.asked is not None:
                changed["asked"] = None  # the dialog is over: what it asked goes with it
            if changed:
                events.append(record(db, cur, "session.changed", {
                    **head, **changed, "last_activity_at": iso_ms(mark.at_ms)}, now_ms=now_ms))
    return events


@record_type(frozen=True, slots=True)
class ProjectStatus:
    project: Project
    tokens: dict[str, int]  # usage of the sessions working on its open tasks, summed
    n_sessions: int

    def to_json(self) -> dict[str, Any]:
        """Return the project with its roll-up, as the CLI and API print it."""
        return {**self.project.to_json(), "tokens": self.tokens, "n_sessions": self.n_sessions}


@record_type(frozen=True, slots=True)
class StatusReport:
    projects: list[ProjectStatus]
    sessions: list[Session]
    tasks: dict[str, Task]  # the sessions' tasks, by id

    def task_tokens(self, task_id: str) -> dict[str, int]:
        """Return the token usage of the sessions working on one task, summed."""
        mine = [s for s in self.sessions if s.task_id == task_id]
        return {k: sum(s.tokens.get(k, 0) for s in mine) for k in TOKEN_KINDS}

    def to_json(self) -> dict[str, Any]:
        """Return the roll-up as the JSON object the CLI and API print."""
        return {"projects": [p.to_json() for p in self.projects], "sessions": [s.to_json() for s in self.sessions],
                "tasks": [{**t.to_json(), "tokens": self.task_tokens(t.id)} for t in self.tasks.values()]}


def get_status(db: Db, *, project_ref: str | None = None, group_ref: str | None = None) -> StatusReport:
    """Return the roll-up: per project its task counts and tokens, per live session its task and state.

    A session's tokens count for the task it works on now (its most urgent open one), so each
    session counts once; a project sums its tasks.
    """
    if project_ref is not None and group_ref is not None:
        raise UsageError("give --project or --group, not both")
    sessions = list_group_sessions(db, group_ref) if group_ref is not None else list_sessions(db)
    tasks = {t.id: t for t in list_assigned_tasks(db)}
    if project_ref is not None:
        project = get_project(db, project_ref)
        projects = [project]
        sessions = [s for s in sessions if s.task_id in tasks and tasks[s.task_id].project_id == project.id]
    elif group_ref is not None:
        wanted = {tasks[s.task_id].project_id for s in sessions if s.task_id in tasks}
        projects = [p for p in list_projects(db) if p.id in wanted]
    else:
        projects = list_projects(db)
    rollups = []
    for p in projects:
        mine = [s for s in sessions if s.task_id in tasks and tasks[s.task_id].project_id == p.id]
        rollups.append(ProjectStatus(p, {k: sum(s.tokens.get(k, 0) for s in mine) for k in TOKEN_KINDS}, len(mine)))
    return StatusReport(rollups, sessions, {t: tasks[t] for s in sessions for t in (s.task_id, *s.task_ids)
                                            if t in tasks})


NEEDS_PERSON = ("permission", "waiting")  # the states where a session waits on a person


def list_needs(db: Db) -> list[Session]:
    """Return the sessions that wait on a person, for triage: permission dialogs first, then the longest waiting."""
    return [s for s in by_urgency(list_sessions(db)) if s.state in NEEDS_PERSON]


@record_type(frozen=True, slots=True)
class SessionDetail:
    session: Session
    task: Task | None  # the task it works on now
    history: list[Event]  # the newest events about it, oldest first
    attach: list[str] | None  # the command that attaches a terminal here to its pane; None outside tmux

    def to_json(self) -> dict[str, Any]:
        """Return the session's fields with its task, history and attach command, as the API and CLI print."""
        return {**self.session.to_json(), "task": self.task.to_json() if self.task else None,
                "history": [{**e.to_json(), "text": describe_event(e)} for e in self.history], "attach": self.attach}


def get_session_detail(db: Db, ref: str, *, hosts: dict[str, Any] | None = None, limit: int = 50) -> SessionDetail:
    """Return one session by id prefix with its task, its history and how to attach to it from this host."""
    s = get_session(db, ref)
    task = get_task(db, s.task_id) if s.task_id else None  # directly, or through a group
    return SessionDetail(s, task, list_history(db, [s.id], limit=limit),
                         attach_command(s, here=db.machine_id, hosts=hosts or {}))


def attach_command(session: Session, *, here: str, hosts: dict[str, Any]) -> list[str] | None:
    """Return the command that attaches a terminal to a session's pane, from host `here`; None outside tmux.

    From another host it goes through ssh to `[hosts.NAME] ssh` of clare.toml (default: the host's name).
    """
    if not session.tmux_socket or not (session.tmux_target or session.pane_id):
        return None
    local = ["tmux", "-S", session.tmux_socket, "attach", "-t", session.tmux_target or session.pane_id or ""]
    if session.host == here:
        return local
    dest = (hosts.get(session.host) or {}).get("ssh") if isinstance(hosts.get(session.host), dict) else None
    return ["ssh", dest if isinstance(dest, str) and dest else session.host, "-t", *local]


MAX_REASON_CHARS = 2000  # what a denial tells Claude instead


def answer_permission(db: Db, session_ref: str, answer: str, *, option: int | None = None,
                      option_text: str | None = None, reason: str = "", tool_use_id: str | None = None,
                      client: str, now_ms: int) -> Answer:
    """Record a person's answer to a session's open permission dialog; its own host types it (see deliver_answers).

    `tool_use_id` is the dialog the person saw (from the page or the API); an answer for another
    dialog than the one open now is refused here already. The answer is an event: a session of
    another host gets it by push or sync, and that host re-checks everything before typing.
    """
    answer = _check_choice("answer", answer, ANSWERS)
    reason = typable_text(_check_text("reason", reason, limit=MAX_REASON_CHARS))
    if answer == "option" and (option is None or not _is_opt_option(option)):
        raise UsageError("answer 'option' needs the option's number, 1-9, as the dialog shows it")
    if answer != "option" and option is not None:
        raise UsageError("an option number goes only with answer 'option'")
    if reason and answer != "deny":
        raise UsageError("a reason goes only with deny: it tells Claude what to do instead")
    client = _check_text("client", client, limit=200, required=True)
    s = get_session(db, session_ref)
    if s.state != "permission" or not s.asked:
        raise Conflict(f"session {s.id[:SHORT_ID]} asks nothing now (it is {s.state}); nothing was sent")
    if tool_use_id and s.asked.get("tool_use_id") and tool_use_id != s.asked["tool_use_id"]:
        raise Conflict(f"session {s.id[:SHORT_ID]} asks about another tool use now ({s.asked['tool']}: "
                       f"{' '.join(s.asked['input'].split())[:60]}); nothing was sent, look again and answer that one")
    answer_id = new_id()
    task = s.task_id
    with write_txn(db) as cur:
        record(db, cur, "permission.answered", {
            "answer_id": answer_id, "session_id": s.id, "host": s.host,
            "tool_use_id": tool_use_id or s.asked.get("tool_use_id"), "tool": s.asked["tool"],
            "input": s.asked["input"], "answer": answer, "option": option,
            "option_text": option_text[:300] if option_text else None, "reason": reason, "client": client,
            **({"task_id": task} if task else {})}, now_ms=now_ms)
    return list_answers(db, answer_id=answer_id)[0]


def resolve_answer(db: Db, answer: Answer, *, result: str, reason: str, now_ms: int) -> Answer:
    """Record what this host did with an answer to one of its sessions: typed, stale, expired or failed."""
    _check_choice("answer result", result, ANSWER_RESULTS[1:])
    s = next((x for x in find_sessions(db, prefix=answer.session_id) if x.id == answer.session_id), None)
    with write_txn(db) as cur:
        record(db, cur, "permission.resolved", {
            "answer_id": answer.id, "session_id": answer.session_id, "result": result, "reason": reason[:500],
            **({"task_id": s.task_id} if s and s.task_id else {})}, now_ms=now_ms)
    return list_answers(db, answer_id=answer.id)[0]


BROADCAST_TTL_MS = 15 * 60 * 1000  # an undelivered broadcast older than this expires instead of arriving late
COMMAND_PREFIX = "[clare] "  # keeps a text that starts like a command out of Claude's command modes
COMMAND_CHARS = ("/", "!", "#", "@", "&")


@record_type(frozen=True, slots=True)
class BroadcastResult:
    broadcast_id: str
    target: str
    text: str  # as delivered (normalised, maybe prefixed)
    deliveries: list[Delivery]
    unreached: list[dict[str, Any]] = record_field(default_factory=list)  # {task_id, title, session_id, reason}

    def to_json(self) -> dict[str, Any]:
        """Return the result as the JSON object the CLI and API print."""
        return {"broadcast_id": self.broadcast_id, "target": self.target, "text": self.text,
                "deliveries": [d.to_json() for d in self.deliveries], "unreached": self.unreached}

    @property
    def is_complete(self) -> bool:
        """Tell whether every line is delivered or queued (the CLI's exit 0)."""
        return not self.unreached and all(d.result in ("delivered", "queued") for d in self.deliveries)


def list_broadcast_recipients(db: Db, target: str) -> list[Session]:
    """Return the live sessions a broadcast target names: a project's open tasks' sessions, a group, one session."""
    target = _check_text("broadcast target", target, limit=MAX_NAME_CHARS + 8, required=True)
    kind, colon, ref = target.partition(":")
    if kind in ("session", "group") and colon and not ref.strip():
        raise UsageError(f"broadcast target {target!r} lacks the {kind} after '{kind}:'; "
                         f"e.g. {kind}:{'5e55a1' if kind == 'session' else 'backend'}")
    if kind == "session" and ref:
        found = [get_session(db, ref)]
    elif kind == "group" and ref:
        found = list_group_sessions(db, ref)
    else:
        project = get_project(db, target)
        by_id = {s.id: s for s in list_sessions(db)}
        found = []
        for t in list_tasks(db, project_id=project.id):
            if t.status != "done" and t.session_id in by_id:
                found.append(by_id[t.session_id])
            elif t.status != "done" and t.group_id:
                found += list_group_sessions(db, t.group_id)
    unique = {s.id: s for s in found if s.state != "gone"}
    return sorted(unique.values(), key=lambda s: (s.host, s.tmux_target or "", s.id))


def list_unreached_tasks(db: Db, target: str) -> list[dict[str, Any]]:
    """Return the open assigned tasks of a project target that no live session works on, each with why.

    A broadcast reports them beside its deliveries (a line of the report, not a delivery in the log).
    """
    kind, colon, ref = target.partition(":")
    if colon and kind in ("session", "group"):
        return []
    project = get_project(db, target)
    sessions = {s.id: s for s in find_sessions(db)}
    unreached: list[dict[str, Any]] = []
    for t in list_tasks(db, project_id=project.id):
        if t.status == "done":
            continue
        if t.session_id:
            s = sessions.get(t.session_id)
            if s is None or s.state == "gone":
                unreached.append({"task_id": t.id, "title": t.title, "session_id": t.session_id,
                                  "reason": f"no live session: {t.session_id[:SHORT_ID]} is "
                                            f"{'gone' if s else 'not seen on any host'}"})
        elif t.group_id and not list_group_sessions(db, t.group_id):
            unreached.append({"task_id": t.id, "title": t.title, "session_id": None,
                              "reason": "no live session: its group matches none now"})
    return unreached


def no_recipients_error(target: str) -> NotFound:
    """Return the error for a broadcast target that reaches no live session."""
    return NotFound(f"broadcast target {target!r} reaches no live session; run 'clare pull' on the sessions' "
                    "hosts (a running 'clare serve' pulls by itself), or assign a task to a session "
                    "(clare assign TASK SESSION), then check: clare sessions")


def broadcast_text(text: str, *, is_command: bool = False) -> str:
    """Return the text as it will be typed: LF line ends, no control characters, command marks defused."""
    text = _check_text("broadcast text", text, limit=MAX_TEXT_CHARS, required=True)
    # SECURITY: an ESC could end the bracketed paste early ("\x1b[201~") and type the rest as keys.
    text = typable_text(text).rstrip("\n")
    if not is_command and text.lstrip().startswith(COMMAND_CHARS):
        text = COMMAND_PREFIX + text
    return text


def start_broadcast(db: Db, target: str, text: str, *, is_command: bool = False,
                    now_ms: int) -> tuple[str, str, list[Session]]:
    """Record a broadcast to a target's sessions; return its id, its text and the recipients."""
    text = broadcast_text(text, is_command=is_command)
    with write_txn(db) as cur:
        recipients = list_broadcast_recipients(db, target)
        if not recipients:
            raise no_recipients_error(target)
        if len(recipients) > MAX_RECIPIENTS:
            raise UsageError(f"{len(recipients)} recipients; the limit is {MAX_RECIPIENTS}: pick a smaller target")
        broadcast_id = new_id()
        record(db, cur, "broadcast.sent", {"broadcast_id": broadcast_id, "target": target, "text": text,
                                           "expires_at": iso_ms(now_ms + BROADCAST_TTL_MS),
                                           "session_ids": [s.id for s in recipients]}, now_ms=now_ms)
    return broadcast_id, text, recipients


def record_delivery(db: Db, broadcast_id: str, session_id: str, *, result: str, reason: str,
                    now_ms: int) -> Event:
    """Record this host's receipt for one recipient of a broadcast."""
    _check_choice("delivery result", result, DELIVERY_RESULTS)
    with write_txn(db) as cur:
        return record(db, cur, "broadcast.delivered", {"broadcast_id": broadcast_id, "session_id": session_id,
                                                       "result": result, "reason": reason[:500]}, now_ms=now_ms)


ORDER_TTL_MS = 15 * 60 * 1000  # an order its host has not taken by then expires instead of acting late
MODEL_RE = lazy_re(r"\A[A-Za-z0-9][A-Za-z0-9._:\[\]-]{0,99}\Z")


def tmux_session_name(name: str) -> str:
    """Return a project name as a tmux session name: tmux reads '.' and ':' in a target as separators."""
    return re.sub(r"[.:\s]", "_", name)[:MAX_NAME_CHARS] or "clare"


def _default_host(db: Db, project: Project) -> str:
    if db.machine_id in project.dirs:
        return db.machine_id
    if len(project.dirs) == 1:
        return next(iter(project.dirs))
    if not project.dirs:
        raise UsageError(f"project {project.name} does not say where its code lives; set it with: "
                         f"clare project set {project.name} --dir /PATH (or --dir HOST:/PATH)")
    raise UsageError(f"project {project.name} lives on several hosts ({', '.join(project.dirs)}); pick one with --host")


def _place(db: Db, cur: sqlite3.Cursor, action: str, *, host: str, session_id: str, task_id: str | None,
           cwd: str, tmux_session: str, is_worktree: bool = False, model: str | None = None,
           is_force: bool = False, extra: dict[str, Any] | None = None, now_ms: int) -> str:
    busy = [o for o in list_orders(db, session_id=session_id)
            if o.result in ("pending", "claimed") and o.expires_at > iso_ms(now_ms)]  # same form: sorts as time
    if busy:
        raise Conflict(f"session {session_id[:SHORT_ID]} has a {busy[0].action} order still {busy[0].result} on "
                       f"{busy[0].host} (order {busy[0].id[:SHORT_ID]}); wait for it: clare session orders")
    order_id = new_id()
    record(db, cur, "order.placed", {
        "order_id": order_id, "action": action, "host": host, "session_id": session_id, "task_id": task_id,
        "cwd": cwd, "tmux_session": tmux_session, "is_worktree": is_worktree, "model": model,
        "is_force": is_force, "expires_at": iso_ms(now_ms + ORDER_TTL_MS), **(extra or {})}, now_ms=now_ms)
    return order_id


def place_start(db: Db, task_ref: str, *, host: str | None = None, is_worktree: bool = False,
                model: str | None = None, reason: str | None = None, template: str | None = None,
                now_ms: int) -> Order:
    """Order a new Claude session for a task on a host, with the task bound to its session id at once.

    Clare makes the session id and passes it to Claude (--session-id), so the binding is part of
    the start, never a guess. The host defaults to this one when the project's code lives here,
    else the only host it lives on. A `reason` marks a start dispatch placed (see dispatch_round).
    """
    if model is not None and not MODEL_RE.match(model):
        raise UsageError(f"--model {model[:40]!r} is not a model name; e.g. --model sonnet or --model claude-opus-4-1")
    with write_txn(db) as cur:
        task = get_task(db, task_ref)
        if task.status == "done":
            raise Conflict(f"task {task.id[:SHORT_ID]} is done; reopen it first: "
                           f"clare task reopen {task.id[:SHORT_ID]}")
        if task.session_id:
            live = [s for s in find_sessions(db, prefix=task.session_id, include_gone=False) if s.id == task.session_id]
            waiting = [o for o in list_orders(db, session_id=task.session_id)
                       if o.result in ("pending", "claimed") and o.expires_at > iso_ms(now_ms)]
            if live or waiting:
                what = f"is {live[0].state} on {live[0].host}" if live else f"is being started on {waiting[0].host}"
                raise Conflict(f"task {task.id[:SHORT_ID]} has session {task.session_id[:SHORT_ID]}, which {what}; "
                               f"stop it first (clare session stop {task.session_id[:SHORT_ID]}) or unassign the task")
        project = get_project(db, task.project_id)
        machine = resolve_host(db, host) if host is not None else _default_host(db, project)
        folder = project.dirs.get(machine)
        if folder is None:
            raise UsageError(f"project {project.name} has no directory on host {machine}; say where its code "
                             f"lives there: clare project set {project.name} --dir {machine}:/PATH")
        session_id = new_uuid()
        order_id = _place(db, cur, "start", host=machine, session_id=session_id, task_id=task.id, cwd=folder,
                          tmux_session=tmux_session_name(project.name), is_worktree=is_worktree, model=model,
                          extra={"reason": reason[:500], "is_dispatch": True, "template": template} if reason else None,
                          now_ms=now_ms)
        record(db, cur, "task.assigned", {"task_id": task.id, "session_id": session_id}, now_ms=now_ms)
        if task.status == "todo":
            record(db, cur, "task.updated", {"task_id": task.id, "status": "in_progress"}, now_ms=now_ms)
    return list_orders(db, order_id=order_id)[0]


def place_dispatch(db: Db, task_id: str, session: Session, *, template: str, reason: str, is_clear: bool = False,
                   now_ms: int) -> Order:
    """Order the host of a waiting session to type a ready task in, with the task bound to it at once.

    Placed only by the project's dispatcher host (dispatch_round). The host fills the template in
    (its own launcher path goes in). A dispatch its host cannot carry out (pane gone, dialog open,
    a draft in the composer) frees the task again (record_order_result).
    """
    template = _check_text("[dispatch] template", typable_text(template), limit=MAX_TEXT_CHARS, required=True)
    with write_txn(db) as cur:
        task = get_task(db, task_id)
        if task.status != "todo" or task.session_id or task.group_id or task.removed_at:
            raise Conflict(f"task {task.id[:SHORT_ID]} is not ready any more ({task.status}"
                           f"{', assigned' if task.session_id or task.group_id else ''}); nothing was dispatched")
        order_id = _place(db, cur, "dispatch", host=session.host, session_id=session.id, task_id=task.id,
                          cwd=session.cwd, tmux_session=session.tmux_session,
                          extra={"template": template, "reason": reason[:500], "is_clear": is_clear,
                                 "is_dispatch": True},
                          now_ms=now_ms)
        record(db, cur, "task.assigned", {"task_id": task.id, "session_id": session.id}, now_ms=now_ms)
        record(db, cur, "task.updated", {"task_id": task.id, "status": "in_progress"}, now_ms=now_ms)
    return list_orders(db, order_id=order_id)[0]


def place_resume(db: Db, session_ref: str, *, now_ms: int) -> Order:
    """Order `claude --resume ID` for a gone session, on its host, in its cwd; its task stays bound."""
    with write_txn(db) as cur:
        session = get_session(db, session_ref)
        if session.state != "gone":
            raise Conflict(f"session {session.id[:SHORT_ID]} is {session.state} on {session.host} "
                           f"({session.tmux_target or 'no tmux'}); only a gone session is resumed")
        if not session.cwd:
            raise UsageError(f"session {session.id[:SHORT_ID]} has no known directory to resume in; "
                             "resume it by hand: claude --resume " + session.id)
        task = get_task(db, session.task_id) if session.task_id else None
        name = (tmux_session_name(task.project) if task else session.tmux_session) or "clare"
        order_id = _place(db, cur, "resume", host=session.host, session_id=session.id,
                          task_id=task.id if task else None, cwd=session.cwd, tmux_session=name, now_ms=now_ms)
    return list_orders(db, order_id=order_id)[0]


def place_stop(db: Db, session_ref: str, *, is_force: bool = False, now_ms: int) -> Order:
    """Order a session to end: /exit typed while it waits; with `is_force`, SIGTERM to Claude even while it works."""
    with write_txn(db) as cur:
        session = get_session(db, session_ref)
        if session.state == "gone":
            raise Conflict(f"session {session.id[:SHORT_ID]} is gone already; nothing to stop")
        if session.state in ("working", "permission") and not is_force:
            what = "is working" if session.state == "working" else "shows a dialog"
            raise Conflict(f"session {session.id[:SHORT_ID]} {what}; stop it once it waits, or now with --force "
                           "(SIGTERM to Claude)")
        order_id = _place(db, cur, "stop", host=session.host, session_id=session.id, task_id=session.task_id,
                          cwd=session.cwd, tmux_session=session.tmux_session, is_force=is_force, now_ms=now_ms)
    return list_orders(db, order_id=order_id)[0]


def record_order_result(db: Db, order_id: str, *, result: str, reason: str = "",
                        outcome: dict[str, Any] | None = None, now_ms: int) -> Order:
    """Record this host's receipt for an order: claimed first, then what came of it."""
    _check_choice("order result", result, ORDER_RESULTS[1:])
    with write_txn(db) as cur:
        placed = list_orders(db, order_id=order_id)[0]
        record(db, cur, "order.carried_out", {"order_id": order_id, "result": result, "reason": reason[:1000],
                                              "outcome": outcome or {}, "session_id": placed.session_id,
                                              "task_id": placed.task_id}, now_ms=now_ms)
        order = list_orders(db, order_id=order_id)[0]
        is_dispatch = bool(order.request.get("is_dispatch"))
        if order.task_id and (order.action == "start" and result in ("refused", "expired")
                              or is_dispatch and result in ("refused", "failed", "expired")):
            task = get_task(db, order.task_id)
            # No Claude runs under that id, or it did not get the task: the task is free (and ready) again.
            if task.session_id in (order.session_id, order.outcome.get("session_id")):
                record(db, cur, "task.unassigned", {"task_id": task.id}, now_ms=now_ms)
                if is_dispatch and task.status == "in_progress":
                    record(db, cur, "task.updated", {"task_id": task.id, "status": "todo"}, now_ms=now_ms)
    return order


def get_order(db: Db, ref: str) -> Order:
    """Return the order whose id starts with `ref`."""
    _check_prefix("order", ref)
    found = [o for o in list_orders(db) if o.id.startswith(ref)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotFound(f"no order {ref!r}; list them with: clare session orders")
    raise Conflict(f"order {ref!r} is ambiguous; give more of the id")


def import_events(db: Db, lines: Iterable[str], *, now_ms: int) -> tuple[InsertResult, list[str]]:
    """Store the events of JSON lines not yet here; return the result and one reason per bad line."""
    good, bad = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            line.encode()  # a file read with surrogateescape keeps bytes that are not UTF-8 visible here
            good.append(check_received(parse_json(line)))
        except UnicodeEncodeError:
            bad.append(f"line {n}: not UTF-8 text (bytes that are not UTF-8, or a lone surrogate)")
        except RecursionError:
            bad.append(f"line {n}: JSON nested too deeply")
        except (ClareError, ValueError) as err:
            bad.append(f"line {n}: {err}")
    with write_txn(db) as cur:
        result = receive_events(db, cur, good, now_ms=now_ms)
    return result, bad


@record_type(frozen=True, slots=True)
class EventPage:
    events: list[Event]  # in receipt order (rseq), or the newest in (hlc, uuid) order when paged from the end
    next_after: int  # the `after` that reads on from here
    has_more: bool  # more events follow past next_after


def page_events(db: Db, *, after: int | None = None, limit: int = 50) -> EventPage:
    """Return the events past receipt number `after` in receipt order; without it the newest `limit`, newest last."""
    if after is None:
        events, has_more = list_events(db, limit=limit), False
    else:
        import itertools

        events = list(itertools.islice(iter_events(db, after=after, batch=limit + 1), limit + 1))
        has_more, events = len(events) > limit, events[:limit]
    return EventPage(events, max((e.rseq for e in events), default=after or 0), has_more)


def restore_backup(path: str, backup_path: str) -> tuple[str, int, str | None]:
    """Replace the database at `path` by a backup copy of it, migrated to this version.

    Return (new db id, n_events, where a damaged file was moved). A readable database is
    replaced in place (a running server sees the restore); an unreadable or missing one is
    replaced by the backup's file: the case a restore is most needed for.
    """
    aside = None
    if os.path.exists(path) and not is_unreadable(path):
        db = open_db(path)
        try:
            db_id = restore_db(db, backup_path)
        finally:
            db.close()
    else:
        db_id, aside = restore_in_place_of(path, backup_path)
    restored = open_db(path)  # opening migrates an older backup
    try:
        return db_id, count_events(restored), aside
    finally:
        restored.close()


def get_token(config: dict[str, Any], *, path: str, env: Mapping[str, str] | None = None) -> str:
    """Return this host's API token, the one its server and --remote clients use (see resolve_token)."""
    token = resolve_token(config, env=env, path=path)
    if token is None:
        raise NotFound(f"this host has no API token: no CLARE_TOKEN and no 'token' in {path}; make one with: "
                       "clare setup")
    return token


def project_history(db: Db, project: Project, *, limit: int = 200) -> list[Event]:
    """Return the events about a project and its tasks, oldest first."""
    ids = [project.id] + [t.id for t in list_tasks(db, project_id=project.id, include_removed=True)]
    return list_history(db, ids, limit=limit)


def describe_event(ev: Event) -> str:
    """Return one line saying what an event did, for people."""
    describe = DESCRIBE.get(ev.event_type)
    if describe is None:
        return f"{ev.event_type} (not known to this version)"
    try:
        undoes = ev.payload.get("undoes")
        return ("undo: " if isinstance(undoes, str) else "") + describe(ev.payload)
    except (KeyError, TypeError, ValueError):
        return f"{ev.event_type} (malformed payload)"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _fields(p: dict[str, Any], skip: str) -> str:
    text = [f"{k}={v!r}" for k, v in p.items() if k not in (skip, "tags", "after", "undoes")]
    if isinstance(p.get("tags"), dict):
        text.append("tags " + " ".join(f"{'+' if v else '-'}{t}" for t, v in p["tags"].items()))
    if isinstance(p.get("after"), dict):
        text.append("waits " + " ".join(f"{'+' if v else '-'}{t[:SHORT_ID]}" for t, v in p["after"].items()))
    return ", ".join(text) or "nothing"


DESCRIBE.update({
    "project.created": lambda p: f"created project {p['name']!r}",
    "project.updated": lambda p: f"changed project: {_fields(p, 'project_id')}",
    "task.created": lambda p: f"added task {p['task_id'][:SHORT_ID]} {p['title']!r} (P{p['priority']})"
                              + "".join(f" #{t}" for t in p.get("tags", ()))
                              + (", waits on " + ", ".join(t[:SHORT_ID] for t in p["after"]) if p.get("after")
                                 else ""),
    "task.updated": lambda p: f"changed task {p['task_id'][:SHORT_ID]}: {_fields(p, 'task_id')}",
    "task.assigned": lambda p: f"assigned task {p['task_id'][:SHORT_ID]} to "
                               + (f"session {p['session_id'][:SHORT_ID]}" if p.get("session_id")
                                  else f"group {p['group_id'][:SHORT_ID]}"),
    "task.unassigned": lambda p: f"unassigned task {p['task_id'][:SHORT_ID]}",
    "task.removed": lambda p: f"removed task {p['task_id'][:SHORT_ID]}",
    "task.restored": lambda p: f"restored task {p['task_id'][:SHORT_ID]}",
    "group.created": lambda p: f"created group {p['name']!r}",
    "group.removed": lambda p: f"removed group {p['group_id'][:SHORT_ID]}",
    "session.appeared": lambda p: f"session {p['session_id'][:SHORT_ID]} appeared on {p['host']} "
                                  f"({p.get('tmux_target') or 'no tmux'}, {p['state']})",
    "session.changed": lambda p: f"session {p['session_id'][:SHORT_ID]}: "
                                 + _fields({k: v for k, v in p.items() if k in _OBSERVED_KEYS}, "session_id")
                                 + (f"; asks {p['asked']['tool']}: {p['asked']['input'][:80]!r}"
                                    if p.get("asked") else ""),
    "session.gone": lambda p: f"session {p['session_id'][:SHORT_ID]} is gone ({p.get('reason', '')})",
    "broadcast.sent": lambda p: f"broadcast to {p['target']} ({_n(len(p['session_ids']), 'session')}): "
                                f"{p['text'][:60]!r}",
    "broadcast.delivered": lambda p: f"broadcast {p['broadcast_id'][:SHORT_ID]} to session "
                                     f"{p['session_id'][:SHORT_ID]}: {p['result']}"
                                     + (f" ({p['reason']})" if p.get("reason") else ""),
    "permission.answered": lambda p: f"{p['client']} answered {p['answer']}"
                                     + (f" {p['option']} ({p['option_text']})" if p.get("option") else "")
                                     + f" to session {p['session_id'][:SHORT_ID]}'s {p['tool']}: {p['input'][:60]!r}"
                                     + (f", saying {p['reason'][:60]!r}" if p.get("reason") else ""),
    "permission.resolved": lambda p: f"answer {p['answer_id'][:SHORT_ID]} to session {p['session_id'][:SHORT_ID]}: "
                                     f"{p['result']} ({p['reason']})",
    "update.posted": lambda p: f"{p['source']} update" + (f" on task {p['task_id'][:SHORT_ID]}"
                                                         if p.get("task_id") else "") + f": {p['text'][:80]}",
    "project.dir_set": lambda p: (f"project {p['project_id'][:SHORT_ID]} lives in {p['dir']} on {p['host']}"
                                  if p.get("dir") else
                                  f"project {p['project_id'][:SHORT_ID]}: no directory on {p['host']}"),
    "order.placed": lambda p: (f"dispatch task {str(p.get('task_id'))[:SHORT_ID]} to session "
                               f"{p['session_id'][:SHORT_ID]} on {p['host']}" if p["action"] == "dispatch" else
                               f"{p['action']} session {p['session_id'][:SHORT_ID]} on {p['host']}"
                               + (f" for task {p['task_id'][:SHORT_ID]}" if p.get("task_id") else ""))
                              + (" after /clear" if p.get("is_clear") else "")
                              + (" in a new worktree" if p.get("is_worktree") else "")
                              + (" (--force)" if p.get("is_force") else "")
                              + (f": {p['reason'][:200]}" if p.get("reason") else ""),
    "order.carried_out": lambda p: (f"session {p['session_id'][:SHORT_ID]}" if p.get("session_id")
                                    else f"order {p['order_id'][:SHORT_ID]}") + f": {p['result']}"
                                   + (f" ({p['reason'][:120]})" if p.get("reason") else ""),
    "host.announced": lambda p: f"host {p['name']} ({p['host']}) serves at {p['url']}",
})


# ==========================================================================
# 6. Fleet: Claude Code sessions in tmux panes, their state, hooks, broadcast delivery.
# ==========================================================================

CLAUDE_ENV_DIR = "CLAUDE_CONFIG_DIR"
TMUX_TIMEOUT_S = 5.0
PANE_FORMAT = "\t".join(("#{pane_id}", "#{pane_pid}", "#{pane_in_mode}", "#{pane_dead}",
                         "#{session_name}:#{window_index}.#{pane_index}", "#{pane_current_command}",
                         "#{pane_current_path}", "#{pane_title}"))
TAIL_BLOCK_BYTES = 64 * 1024  # the first read from a transcript's end; grows 4x until the turn is known
TAIL_MAX_BYTES = 1024 * 1024  # never read more than this from a transcript's end per look
HEAD_BYTES = 16 * 1024  # the start of a transcript, for its title when the tail has none
TOKEN_SCAN_MAX_BYTES = 16 * 1024 * 1024  # a first look at a bigger transcript sums only its tail's usage
SCAN_BLOCK_BYTES = 1024 * 1024
RECENT_IDS = 64  # message ids remembered across looks: one response spans several lines
DEFAULT_IDLE_AFTER_S = 600
SCREEN_LINES = 40
CAPTURE_BATCH = 50  # panes captured per tmux run: 200 in one run is "command too long"
MAX_COMMAND_CHARS = 500
# Screen text of Claude Code's permission and choice dialogs, where Enter would approve: data, not code.
PERMISSION_SCREEN = (
    lazy_re(r"Do you want to (?:proceed|make this edit|create|overwrite|allow|run|fetch)"),
    lazy_re(r"^\W*(?:❯|›|>)\s*1\.\s*Yes\b", re.M),
)
# Claude's composer on a `capture-pane -e` screen: a prompt glyph line between two rules (2.1.x).
COMPOSER_GLYPHS = ("\u276f\xa0", "\u276f ", "> ")
RULE_RE = lazy_re(r"^\s*\u2500{20,}\s*$")
ANSI_RE = lazy_re(r"\x1b\[([0-9;:?<=>]*)([ -/]*[@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]")
DRAFT_REFUSAL = "the composer holds unsent text; send or clear that draft, then broadcast again"
INTERRUPT_MARK = "[Request interrupted by user"
# User lines that a local slash command writes (/clear, /model …): no turn starts with them.
LOCAL_COMMAND_MARKS = ("<command-name>", "<local-command-stdout>", "<local-command-caveat>", "<command-message>")
SESSION_ID_FLAGS = ("--session-id", "--resume", "-r")
# Registry status -> state; "waiting" is left out: it can mean a prompt or a dialog, the hook and screen tell.
REGISTRY_STATES = {"busy": "working", "shell": "working", "idle": "waiting"}
# The registry's waitingFor while a permission dialog is open (2.1.x: "permission prompt"): exact and cheap.
REGISTRY_PERMISSION_RE = lazy_re(r"permission", re.I)
TITLE_TYPES = {"summary": "summary", "custom-title": "customTitle", "ai-title": "aiTitle"}
RCLAUDE_TIMEOUT_S = 10
TRIAGE_TIMEOUT_S = 60
TAIL_LINES = 40
HOOK_EVENTS = ("SessionStart", "UserPromptSubmit", "PreToolUse", "PermissionRequest", "Notification", "Stop",
               "StopFailure", "SessionEnd")
HOOK_STATES = {"SessionStart": "waiting", "UserPromptSubmit": "working", "PreToolUse": "working",
               "PostToolUse": "working", "PermissionRequest": "permission", "Stop": "waiting",
               "StopFailure": "waiting"}
# idle_prompt (60 s after a turn) is not activity: it says what Stop said, and must not restart the idle clock.
NOTIFICATION_STATES = {"permission_prompt": "permission", "elicitation_dialog": "permission"}
HOOK_BUSY_TIMEOUT_MS = 250  # the hook waits this long for a busy database, then spools its report
MAX_HOOK_INPUT_BYTES = 32 * 1024 * 1024  # a prompt can be long; a report cut short would be lost
HOOK_TIMEOUT_S = 10
# Which field of a tool's input says what a dialog asks: Bash's command, Edit's file, WebFetch's URL...
ASKED_INPUT_KEYS = ("command", "file_path", "notebook_path", "url", "path", "pattern", "query", "prompt")
STALE_MARGIN_MS = 100  # Claude writes one event's transcript line and registry status within this of its hook
HOOK_ALIVE_MS = 10 * 60 * 1000  # a session that sent a hook report this recently is not gone
CLARE_HOOK_MARK = "# clare-hook"  # ends the -c code of the command only Clare writes: how it knows its own
# The -c code of Clare's hook commands, the mark optional: entries written before the mark are Clare's too.
CLARE_HOOK_CODE_RE = lazy_re(r"import sys; sys\.path\.insert\(0, '[^']*'\); import clare; "
                                r"raise SystemExit\(clare\.main\(\)\)(?:  # clare-hook)?")
BROADCAST_PAUSE_S = 0.3  # between the paste and its Enter: an Enter in the same burst is swallowed
BROADCAST_CONFIRM_S = 3.0  # how long to wait for Claude to take the prompt after each Enter
BROADCAST_ENTER_TRIES = 3
# How often `serve` looks at this host's sessions ([fleet] pull_every_s, 0 = never): with the
# dashboard's FLEET_POLL_S, a change without hooks shows within 3 s; a pull that finds nothing changed is cheap.
DEFAULT_PULL_EVERY_S = 1
DEFAULT_TAILS_EVERY_S = 300  # ... and stores assigned panes' tails (when changed); [fleet] tails_every_s, 0 = never
PANE_LINES = 60  # the live pane view shows this many last lines
MAX_PANE_LINES = 200  # ... and never more, whoever asks
MAX_PANE_CHARS = 32 * 1024  # one pane view's text at most (a peer's answer included)
PANE_MIN_INTERVAL_S = 1.0  # one capture per session per second at most, however many pages watch it
TURNS_TAIL_BYTES = 256 * 1024  # how much of a transcript's end the turns view reads
MAX_TURNS = 12  # transcript entries shown on a session page
TURN_CHARS = 300  # of each entry's text
# Terminal escapes (CSI, OSC, DCS and the two-byte ones), and the control characters left after them.
ESCAPE_RE = lazy_re(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[PX^_][^\x1b]*\x1b\\|[@-Z\\-_]?)")
PANE_CONTROL_RE = lazy_re(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
DEFAULT_NOTIFY_GAP_S = 60  # [notify] min_gap_s: one session notifies at most this often (against flapping)
DEFAULT_NOTIFY_TIMEOUT_S = 10  # [notify] timeout_s: the command is killed after this
NOTIFY_EVERY_S = 1.0  # how often `serve` acts on answers and looks for sessions that started to need a person
ANSWER_TTL_MS = 2 * 60 * 1000  # an answer not typed this long after its session's host stored it expires
ANSWER_CONFIRM_S = 3.0  # how long to wait for a dialog to close after its key was typed
# A permission dialog on screen, as data: the question, then numbered options (the chosen one marked ❯).
DIALOG_QUESTION_RE = lazy_re(r"Do you want to [^\n]*")
DIALOG_OPTION_RE = lazy_re(r"\A[\W_]*?(?:[❯›>]\s*)?([1-9])\.\s+(.+?)[\s│|]*\Z")


@record_type(frozen=True, slots=True)
class Pane:
    socket: str  # the tmux server's socket path
    pane_id: str
    pid: int
    in_mode: bool  # copy-mode or another mode that eats keys
    is_dead: bool
    target: str  # session:window.pane
    command: str  # tmux's guess at the foreground program: a hint only
    cwd: str
    title: str

    def to_json(self) -> dict[str, Any]:
        """Return the pane as a JSON object."""
        return _as_json(self)


@record_type(frozen=True, slots=True)
class PullResult:
    observations: list[Observation]
    events: list[Event]  # what changed, as recorded
    ambiguous: list[Pane]  # Claude panes whose session cannot be told apart from another's
    unreachable: list[str]  # tmux sockets that did not answer: their sessions are kept as they were
    updates: list[Update]  # pane tails and triage notes stored by this pull
    warnings: list[str]  # adapters and commands that failed; the pull went on without them
    dispatched: list[Order] = record_field(default_factory=list)  # what dispatch decided, as carried out here


def claude_home(env: Mapping[str, str] | None = None) -> str:
    """Return Claude Code's folder: $CLAUDE_CONFIG_DIR, else ~/.claude."""
    env = os.environ if env is None else env
    return env.get(CLAUDE_ENV_DIR) or os.path.join(os.path.expanduser("~"), ".claude")


def cwd_slug(cwd: str) -> str:
    """Return the folder name Claude Code keeps a cwd's transcripts under."""
    return re.sub(r"[^A-Za-z0-9]", "-", cwd)


def tmux_binary() -> str:
    """Return tmux's absolute path; a systemd service's PATH is minimal, so look in the usual places."""
    import shutil  # only the fleet verbs need it

    found = shutil.which("tmux") or next(
        (p for p in ("/usr/bin/tmux", "/usr/local/bin/tmux", "/opt/homebrew/bin/tmux") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise ClareError("tmux is not installed or not on PATH; install it (apt install tmux) to see sessions")
    return os.path.abspath(found)


def tmux_sockets(env: Mapping[str, str] | None = None) -> list[str]:
    """Return the socket of every tmux server of this user, found the way tmux finds its own."""
    import stat

    env = os.environ if env is None else env
    folder = os.path.join(env.get("TMUX_TMPDIR") or "/tmp", f"tmux-{os.getuid()}")
    found = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        entries = []
    for entry in entries:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(entry.stat().st_mode):
                found.append(entry.path)
    inside = (env.get("TMUX") or "").split(",")[0]
    if inside and inside not in found and os.path.exists(inside):
        found.append(inside)
    return found


def run_tmux(socket: str, *args: str, input_text: str | None = None) -> Any:
    """Run one tmux command against one server; the caller checks the return code (a timeout is one)."""
    import subprocess

    argv = [tmux_binary(), "-S", socket, *args]
    try:
        return subprocess.run(argv, input=input_text, capture_output=True, text=True, timeout=TMUX_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # A hung server must not stop the look at the others: report it like any failed command.
        return subprocess.CompletedProcess(argv, -1, "", f"tmux at {socket} did not answer within "
                                                         f"{TMUX_TIMEOUT_S:.0f} s")


def parse_panes(text: str, *, socket: str) -> list[Pane]:
    """Parse `list-panes -a -F PANE_FORMAT` output; skip lines that do not fit."""
    panes = []
    for line in text.splitlines():
        f = line.split("\t", 7)
        if len(f) != 8 or not f[0].startswith("%") or not f[1].isdigit():
            continue
        panes.append(Pane(socket, f[0], int(f[1]), f[2] == "1", f[3] == "1", f[4], f[5], f[6], f[7]))
    return panes


def list_panes(socket: str) -> list[Pane] | None:
    """Return every pane of one tmux server: [] when no server runs there, None when it fails."""
    p = run_tmux(socket, "list-panes", "-a", "-F", PANE_FORMAT)
    if p.returncode != 0:
        err = p.stderr.strip()
        # A socket file left by a server that exited (or is exiting) is normal: nothing runs there.
        if any(m in err for m in ("no server running", "Connection refused", "No such file", "server exited")):
            return []
        return None
    return parse_panes(p.stdout, socket=socket)


def capture_pane(socket: str, pane_id: str, *, lines: int | None = SCREEN_LINES) -> str | None:
    """Return the last lines of a pane (its history too), or with lines=None its visible screen only."""
    p = run_tmux(socket, "capture-pane", "-p", "-J", "-t", pane_id, *(("-S", f"-{lines}") if lines else ()))
    return p.stdout if p.returncode == 0 else None


def capture_panes(socket: str, pane_ids: list[str], *, lines: int | None = None) -> dict[str, str]:
    """Return the visible screens (or the last lines) of several panes of one server, asked in one tmux run.

    A dialog is judged on the visible screen only: one that closed may linger in the history.
    """
    if len(pane_ids) > CAPTURE_BATCH:  # tmux refuses a longer command line ("command too long")
        return {k: v for n in range(0, len(pane_ids), CAPTURE_BATCH)
                for k, v in capture_panes(socket, pane_ids[n:n + CAPTURE_BATCH], lines=lines).items()}
    mark = f"\x1eclare-{new_id()}"  # a line no screen shows: it separates the captures
    args: list[str] = []
    for pane_id in pane_ids:
        args += ["capture-pane", "-p", "-J", "-t", pane_id, *(("-S", f"-{lines}") if lines else ()), ";",
                 "display-message", "-p", mark, ";"]
    p = run_tmux(socket, *args[:-1]) if args else None
    if p is None or p.returncode != 0:  # tmux stops at a failed command: one pane closed meanwhile
        return {i: screen for i in pane_ids if (screen := capture_pane(socket, i, lines=lines)) is not None}
    return dict(zip(pane_ids, p.stdout.split(mark + "\n"), strict=False))


def shows_permission_dialog(screen: str) -> bool:
    """Tell whether a pane's screen shows a permission or choice dialog (Enter would approve it)."""
    tail = "\n".join(screen.rstrip("\n").splitlines()[-25:])
    return any(rule.search(tail) for rule in PERMISSION_SCREEN)


@record_type(frozen=True, slots=True)
class Dialog:
    question: str  # "Do you want to proceed?"
    options: tuple[tuple[int, str], ...]  # (number, exact wording), as on screen
    about: str  # the screen lines above the question: the tool and its command or file


def parse_dialog(screen: str) -> Dialog | None:
    """Return the permission dialog a pane's screen shows, with its options' exact wording, or None."""
    rows = clean_screen(screen, lines=80).split("\n")
    starts = [i for i, row in enumerate(rows) if DIALOG_QUESTION_RE.search(row)]
    if not starts:
        return None
    i = starts[-1]
    options: list[tuple[int, str]] = []
    for row in rows[i + 1:]:
        m = DIALOG_OPTION_RE.match(row.strip())
        if m and int(m[1]) == len(options) + 1:
            options.append((int(m[1]), m[2]))
        elif options and row.strip(" │|"):
            break
    if len(options) < 2:
        return None
    question = DIALOG_QUESTION_RE.search(rows[i])
    return Dialog(question[0].strip(" │|") if question else "", tuple(options), "\n".join(rows[max(0, i - 15):i]))


def strip_ansi(text: str) -> str:
    """Return a `capture-pane -e` screen without its escape sequences."""
    return ANSI_RE.sub("", text)


def composer_text(screen: str) -> str | None:
    """Return what is typed in Claude's composer on a `capture-pane -e` screen; None when no composer shows.

    Only typed text counts, not decoration: a placeholder is dim or grey and the cursor is a
    reverse-video cell, so characters in those styles are left out (a refusal for a placeholder
    would refuse every broadcast).
    """
    lines = screen.rstrip("\n").split("\n")
    plain = [strip_ansi(line) for line in lines]
    for i in range(len(plain) - 1, 0, -1):
        if plain[i].startswith(COMPOSER_GLYPHS) and RULE_RE.match(plain[i - 1]):
            end = next((j for j in range(i + 1, len(plain)) if RULE_RE.match(plain[j])), None)
            if end is None:
                continue
            typed = "\n".join(_typed_chars(line) for line in lines[i:end])
            for glyph in COMPOSER_GLYPHS:
                typed = typed.removeprefix(glyph.rstrip()).removeprefix(glyph)
            return typed.strip().replace("\xa0", " ")
    return None


def _typed_chars(line: str) -> str:
    out, is_dim, is_grey, is_reverse, pos = [], False, False, False, 0
    for m in ANSI_RE.finditer(line + "\x1b[0m"):
        if not (is_dim or is_grey or is_reverse):
            out.append(line[pos:m.start()])
        pos = m.end()
        if m.group(2) != "m":
            continue
        codes = (m.group(1) or "0").replace(":", ";").split(";")
        k = 0
        while k < len(codes):
            c = codes[k]
            if c in ("", "0"):
                is_dim = is_grey = is_reverse = False
            elif c in ("2", "22"):
                is_dim = c == "2"
            elif c in ("7", "27"):
                is_reverse = c == "7"
            elif c == "38" and k + 2 < len(codes) and codes[k + 1] == "5":
                n = int(codes[k + 2] or 0)
                is_grey, k = n == 8 or n >= 232, k + 2  # the grey ramp: placeholder colours
            elif c == "38" and k + 4 < len(codes) and codes[k + 1] == "2":
                is_grey, k = len(set(codes[k + 2:k + 5])) == 1, k + 4  # r = g = b: a grey
            elif c.isdigit() and (30 <= int(c) <= 39 or 90 <= int(c) <= 97):
                is_grey = c in ("30", "90")
            k += 1
    return "".join(out)


def claude_text(text: str) -> str:
    """Return a text as Claude Code stores a typed or pasted prompt: LF line ends, a TAB as 4 spaces."""
    return text.replace("\r\n", "\n").replace("\t", "    ").strip()


def clean_screen(screen: str, *, lines: int) -> str:
    """Return a pane's last `lines` lines as plain text: newlines kept, escapes and control characters gone."""
    text = PANE_CONTROL_RE.sub("", ESCAPE_RE.sub("", screen.replace("\r\n", "\n")))
    rows = [row.rstrip() for row in text.split("\n")]
    while rows and not rows[-1]:
        rows.pop()
    return "\n".join(rows[-lines:])[-MAX_PANE_CHARS:]


@record_type(frozen=True, slots=True)
class PaneView:
    session_id: str
    host: str  # the host that captured it
    text: str  # the last lines, plain text, newline-separated
    lines: int  # how many lines were asked for
    captured_at: str
    error: str | None = None  # why there is no text (no pane, tmux failed, host unreachable)

    def to_json(self) -> dict[str, Any]:
        """Return the view as the JSON object the API sends."""
        return _as_json(self)


_PANE_CACHE: dict[tuple[str, str, int], tuple[float, PaneView]] = {}  # (db, session, lines) -> (taken at, view)


def read_pane(db: Db, session: Session, *, lines: int = PANE_LINES, now_ms: int) -> PaneView:
    """Capture a session of this host: its pane's last lines, at most once a second per session.

    Read-only: nothing is ever typed. Sessions of other hosts are read by their own host.
    """
    if session.host != db.machine_id:
        raise Conflict(f"session {session.id[:SHORT_ID]} runs on {session.host}; its pane is read there")
    lines = max(1, min(int(lines), MAX_PANE_LINES))
    key, now = (db.path, session.id, lines), time.monotonic()
    hit = _PANE_CACHE.get(key)
    if hit is not None and now - hit[0] < PANE_MIN_INTERVAL_S:
        return hit[1]
    if session.pane_id is None or session.tmux_socket is None or session.state == "gone":
        view = PaneView(session.id, db.machine_id, "", lines, iso_ms(now_ms),
                        "this session has no live tmux pane" if session.state != "gone" else "this session is gone")
    else:
        screen = capture_pane(session.tmux_socket, session.pane_id, lines=lines + 20)
        view = PaneView(session.id, db.machine_id, clean_screen(screen or "", lines=lines), lines, iso_ms(now_ms),
                        None if screen is not None else f"tmux cannot show pane {session.pane_id} now")
    if len(_PANE_CACHE) > 512:
        _PANE_CACHE.clear()
    _PANE_CACHE[key] = (now, view)
    return view


def process_tree() -> tuple[dict[int, tuple[int, int]], dict[int, list[int]]]:
    """Return every process (pid -> (ppid, start ticks)) and each one's children."""
    procs = read_procs()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    return procs, children


def read_procs() -> dict[int, tuple[int, int]]:
    """Return every process of this host as pid -> (ppid, start time in clock ticks)."""
    procs: dict[int, tuple[int, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:  # no /proc (not Linux): no process is found, and the pull still works
        return procs
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the process ended while we looked
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        rest = stat[stat.rfind(b")") + 2:].split()
        procs[int(name)] = (int(rest[1]), int(rest[19]))
    return procs


def proc_argv(pid: int) -> list[str]:
    """Return a process's argv, [] when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def is_claude_argv(argv: list[str]) -> bool:
    """Tell whether a command line is Claude Code: argv[0] is claude, or node/bun running a claude script."""
    if not argv:
        return False
    if os.path.basename(argv[0]) == "claude":
        return True
    return (os.path.basename(argv[0]) in ("node", "bun") and len(argv) > 1
            and ("claude" in os.path.basename(argv[1]) or "claude-code" in argv[1]))


def find_claude(pid: int, children: dict[int, list[int]], argv_of: Callable[[int], list[str]], *,
                registered: Iterable[int] = ()) -> int | None:
    """Return the first Claude process at or below `pid`, walking the process tree breadth first.

    A process with a live registry entry is Claude whatever its argv (a versioned binary's name).
    """
    queue, registered = [pid], set(registered)
    while queue:
        p = queue.pop(0)
        if p in registered or is_claude_argv(argv_of(p)):
            return p
        queue += children.get(p, ())
    return None


def session_id_from_argv(argv: list[str]) -> str | None:
    """Return the session id given by --session-id or --resume on a command line."""
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if name in SESSION_ID_FLAGS:
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if UUID_RE.match(value):
                return value
    return None


def read_registry(claude_dir: str, procs: dict[int, tuple[int, int]]) -> dict[int, dict[str, Any]]:
    """Return Claude's live registry (sessions/<pid>.json) as pid -> entry, skipping dead or reused pids."""
    folder = os.path.join(claude_dir, "sessions")
    found = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    for name in names:
        stem = name.removesuffix(".json")
        if not stem.isdigit() or int(stem) not in procs:
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, ValueError):  # being rewritten, or not ours to judge
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("sessionId"), str):
            continue
        start = entry.get("procStart")
        if start is not None and str(start) != str(procs[int(stem)][1]):
            continue  # the pid was reused by another process
        found[int(stem)] = entry
    return found


def _boot_ms() -> int:
    with contextlib.suppress(OSError), open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1]) * 1000
    return 0


def find_transcript(claude_dir: str, cwd: str, session_id: str) -> str | None:
    """Return the transcript path of a session: in its cwd's folder, else in any project folder."""
    projects = os.path.join(claude_dir, "projects")
    path = os.path.join(projects, cwd_slug(cwd), session_id + ".jsonl")
    if os.path.exists(path):
        return path
    try:
        folders = list(os.scandir(projects))
    except OSError:
        return None
    for d in folders:  # a long cwd's folder carries a hash, and cwds can move
        path = os.path.join(d.path, session_id + ".jsonl")
        if os.path.exists(path):
            return path
    return None


def newest_transcript(claude_dir: str, cwd: str, *, since_ms: int) -> str | None:
    """Return the newest session transcript of a cwd's folder written after since_ms, if any."""
    projects = os.path.join(claude_dir, "projects")
    slug = cwd_slug(cwd)
    try:
        folders = [d.path for d in os.scandir(projects)
                   if d.name == slug or (len(slug) > 200 and d.name.startswith(slug[:200]))]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for folder in folders:
        for e in os.scandir(folder):
            if e.name.endswith(".jsonl") and UUID_RE.match(e.name[:-6]):
                mtime_ms = e.stat().st_mtime_ns // 1_000_000
                if mtime_ms >= since_ms and (best is None or mtime_ms > best[0]):
                    best = (mtime_ms, e.path)
    return best[1] if best else None


def _iso_to_ms(text: object) -> int | None:
    return parse_iso_ms(text)


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def turn_of_line(obj: dict[str, Any]) -> str | None:
    """Return what one transcript line says of the turn: 'working', 'waiting' or None (says nothing)."""
    kind = obj.get("type")
    if kind == "system":
        return "waiting" if obj.get("subtype") == "turn_duration" or "durationMs" in obj else None
    message = obj.get("message")
    if not isinstance(message, dict) or obj.get("isSidechain") or obj.get("isMeta"):
        return None
    content = message.get("content")
    if kind == "user":
        text = _text_of(content).lstrip()
        if text.startswith(LOCAL_COMMAND_MARKS):
            return None
        return "waiting" if text.startswith(INTERRUPT_MARK) else "working"
    if kind == "assistant":
        has_tool = isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_use" for b in content)
        return "working" if has_tool else "waiting"
    return None


def parse_tail(lines: list[bytes]) -> dict[str, Any]:
    """Return what the newest transcript lines say: turn, its time, last activity, last text, title.

    `lines` are oldest first; a line that does not parse (half-written, or not JSON) is skipped.
    """
    info: dict[str, Any] = {}
    for raw in reversed(lines):
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        key = TITLE_TYPES.get(str(obj.get("type")))
        if key and "label" not in info and isinstance(obj.get(key), str):
            info["label"] = obj[key]
        when = _iso_to_ms(obj.get("timestamp"))
        if when and not obj.get("isSidechain"):
            info["last_activity_ms"] = max(info.get("last_activity_ms", 0), when)
        if "turn" not in info:
            turn = turn_of_line(obj)
            if turn:
                info["turn"], info["turn_ms"] = turn, when
        if "last_text" not in info and obj.get("type") == "assistant" and not obj.get("isSidechain"):
            text = _text_of((obj.get("message") or {}).get("content"))
            if text:
                info["last_text"] = text[-2000:]
        if "cwd" not in info and isinstance(obj.get("cwd"), str):
            info["cwd"] = obj["cwd"]
        if {"turn", "label", "last_text", "cwd"} <= info.keys():
            break
    return info


def _first_prompt(lines: list[bytes]) -> str | None:
    for raw in lines:
        with contextlib.suppress(ValueError, AttributeError):
            obj = json.loads(raw)
            if obj.get("type") == "user" and not obj.get("isMeta") and not obj.get("isSidechain"):
                text = _text_of(obj["message"].get("content")).strip()
                if text and not text.startswith(("<", INTERRUPT_MARK)):
                    return " ".join(text.split())[:80]
    return None


def read_transcript(path: str, cached: tuple[int, int, dict[str, Any]] | None
                    ) -> tuple[int, int, dict[str, Any]] | None:
    """Return (size, mtime_ns, info) of a transcript, reading only what changed since `cached`.

    The tail is read from the end in growing blocks (at most TAIL_MAX_BYTES) and token usage is
    summed over the bytes appended since the last look: a transcript is never read whole twice,
    and one over TOKEN_SCAN_MAX_BYTES is never read whole at all (its tokens are then partial).
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
        return cached
    old = cached[2] if cached and cached[0] <= st.st_size else {}
    with open(path, "rb") as f:
        info = {**_read_tail(f, st.st_size)}
        if "label" not in info:
            f.seek(0)
            head = f.read(HEAD_BYTES).split(b"\n")[:-1]
            title = parse_tail(head).get("label") if head else None
            info["label"] = title or old.get("label") or _first_prompt(head) or ""
        info.update(_scan_tokens(f, st.st_size, old))
    info.setdefault("last_activity_ms", st.st_mtime_ns // 1_000_000)
    if info.get("turn") and not info.get("turn_ms"):
        info["turn_ms"] = st.st_mtime_ns // 1_000_000
    info["last_activity_at"] = iso_ms(info["last_activity_ms"])
    return st.st_size, st.st_mtime_ns, info


def parse_turns(lines: list[bytes], *, n: int = MAX_TURNS) -> list[dict[str, Any]]:
    """Return the last entries of a transcript, oldest first: {role, text, tools, at}, short.

    role is 'user' (a prompt, or an interrupt), 'assistant' (its text) or 'tool' (the tools it
    called, by name). Sub-agent lines, local command output and tool results are left out.
    """
    turns: list[dict[str, Any]] = []
    for raw in lines:
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("isSidechain") or obj.get("isMeta"):
            continue
        message, at = obj.get("message"), obj.get("timestamp") if isinstance(obj.get("timestamp"), str) else ""
        if not isinstance(message, dict) or obj.get("type") not in ("user", "assistant"):
            continue
        content = message.get("content")
        text = " ".join(_text_of(content).split())
        if obj["type"] == "user":
            if text and not text.startswith(LOCAL_COMMAND_MARKS):
                turns.append({"role": "user", "text": text[:TURN_CHARS], "tools": [], "at": at})
            continue
        tools = [str(b.get("name"))[:60] for b in content if isinstance(b, dict) and b.get("type") == "tool_use"] \
            if isinstance(content, list) else []
        if text:
            turns.append({"role": "assistant", "text": text[:TURN_CHARS], "tools": [], "at": at})
        if tools:
            turns.append({"role": "tool", "text": ", ".join(tools), "tools": tools, "at": at})
    return turns[-n:]


def read_turns(db: Db, session: Session, *, claude_dir: str, n: int = MAX_TURNS) -> list[dict[str, Any]]:
    """Return the last entries of a session's transcript on this host (see parse_turns)."""
    if session.host != db.machine_id:
        raise Conflict(f"session {session.id[:SHORT_ID]} runs on {session.host}; its transcript is read there")
    path = find_transcript(claude_dir, session.cwd, session.id)
    if path is None:
        return []
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - TURNS_TAIL_BYTES)
        f.seek(start)
        lines = f.read(size - start).split(b"\n")
    return parse_turns(lines[1:] if start else lines, n=n)


def _read_tail(f: Any, size: int) -> dict[str, Any]:
    want = TAIL_BLOCK_BYTES
    while True:
        start = max(0, size - want)
        f.seek(start)
        lines = f.read(size - start).split(b"\n")
        if start > 0:
            lines = lines[1:]  # cut mid-line
        info = parse_tail(lines)
        if "turn" in info or start == 0 or want >= TAIL_MAX_BYTES:
            return info
        want = min(want * 4, TAIL_MAX_BYTES)


def _scan_tokens(f: Any, size: int, old: dict[str, Any]) -> dict[str, Any]:
    totals = dict.fromkeys(TOKEN_KINDS, 0) | old.get("tokens", {})
    recent = list(old.get("recent_ids", []))
    start, is_partial = old.get("scanned_to", 0), old.get("is_partial", False)
    if not old and size > TOKEN_SCAN_MAX_BYTES:
        start, is_partial = size - TAIL_MAX_BYTES, True
    f.seek(start)
    carry, skip_first, pos = b"", bool(start and not old), start
    while pos < size:
        block = f.read(min(SCAN_BLOCK_BYTES, size - pos))
        if not block:
            break
        pos += len(block)
        lines = (carry + block).split(b"\n")
        carry = lines.pop()
        if skip_first and lines:
            lines, skip_first = lines[1:], False
        for line in lines:
            if b'"usage"' in line:
                _add_usage(line, totals, recent)
    return {"tokens": totals, "recent_ids": recent[-RECENT_IDS:], "scanned_to": pos - len(carry),
            "is_partial": is_partial}


def _add_usage(line: bytes, totals: dict[str, int], recent: list[str]) -> None:
    try:
        obj = json.loads(line)
        message = obj["message"]
        usage = message["usage"]
    except (ValueError, KeyError, TypeError):
        return
    if obj.get("type") != "assistant" or not isinstance(usage, dict):
        return
    key = message.get("id") or obj.get("uuid")
    if key in recent:
        return  # one response spans several lines that repeat its usage: count it once
    recent.append(key)
    del recent[:-RECENT_IDS]
    for kind in TOKEN_KINDS:
        value = usage.get("input_tokens" if kind == "input" else "output_tokens" if kind == "output"
                          else f"{kind}_input_tokens")
        if isinstance(value, int) and value > 0:
            totals[kind] += value


def derive_state(*, turn: str | None, turn_ms: int | None, registry: str | None, registry_ms: int | None,
                 hook: str | None, hook_ms: int | None, shows_dialog: bool, now_ms: int,
                 idle_after_ms: int, waiting_for: str | None = None) -> str:
    """Combine the signals into one state: the newest signal wins, a dialog open (screen or registry) beats all.

    Signals are ordered by when they happened (a hook report by its process's start, not when it
    was recorded), so a late report never outranks a newer interrupt. Each source has holes (no
    hook on an Esc interrupt, a transcript that lags the hook, a registry only in newer versions),
    so none is trusted alone; waiting turns into idle after idle_after_ms.
    """
    if shows_dialog or (waiting_for and REGISTRY_PERMISSION_RE.search(waiting_for)):
        return "permission"
    signals = [(ms or 0, i, s) for i, (ms, s) in enumerate(
        ((turn_ms, turn), (registry_ms, REGISTRY_STATES.get(registry or "")), (hook_ms, hook))) if s]
    if not signals:
        return "waiting"
    last_ms, _, state = max(signals)
    if state == "waiting" and last_ms and now_ms - last_ms >= idle_after_ms:
        return "idle"
    return state


def observe_host(db: Db, *, claude_dir: str, idle_after_ms: int, now_ms: int,
                 rclaude: dict[str, str] | None = None) -> tuple[list[Observation], list[Pane], list[str]]:
    """Look at this host's tmux panes, processes and Claude files; return sessions, ambiguous panes, failed sockets.

    Pane to session, strongest evidence first: Claude's registry entry of the pane's Claude
    process; the pane Clare's hook recorded; --session-id/--resume; rclaude's word (tmux target
    -> session id); the newest transcript of the cwd, only when no other Claude pane shares that cwd.
    """
    rclaude = rclaude or {}
    procs, children = process_tree()
    argv_cache: dict[int, list[str]] = {}

    def argv_of(pid: int) -> list[str]:
        if pid not in argv_cache:
            argv_cache[pid] = proc_argv(pid)
        return argv_cache[pid]

    registry = read_registry(claude_dir, procs)
    marks = list_hook_marks(db)
    hooked: dict[tuple[str | None, str], tuple[int, str]] = {}
    for marked, m in marks.items():
        if m.pane_id and (m.at_ms, marked) > hooked.get((m.tmux_socket, m.pane_id), (0, "")):
            hooked[(m.tmux_socket, m.pane_id)] = (m.at_ms, marked)
    boot_ms, tick_ms = _boot_ms(), 1000 / os.sysconf("SC_CLK_TCK")
    claude_panes, unreachable = [], []
    for socket in tmux_sockets():
        panes = list_panes(socket)
        if panes is None:
            unreachable.append(socket)
            continue
        for pane in panes:
            pid = None if pane.is_dead else find_claude(pane.pid, children, argv_of, registered=registry)
            if pid is not None:
                claude_panes.append((pane, pid))
    found: list[tuple[str, Pane, int]] = []
    unresolved = []
    for pane, pid in claude_panes:
        started_ms = boot_ms + int(procs[pid][1] * tick_ms) if pid in procs else 0
        hook = hooked.get((pane.socket, pane.pane_id)) or hooked.get((None, pane.pane_id))
        sid = ((registry.get(pid) or {}).get("sessionId")
               or (hook[1] if hook and hook[0] >= started_ms - 2000 else None)
               or session_id_from_argv(argv_of(pid)) or rclaude.get(pane.target))
        if sid:
            found.append((sid, pane, pid))
        else:
            unresolved.append((pane, pid, started_ms))
    cwd_of = {pid: _proc_cwd(pid) or pane.cwd for pane, pid in claude_panes}
    sharing: dict[str, int] = {}
    for _, pid in claude_panes:
        sharing[cwd_of[pid]] = sharing.get(cwd_of[pid], 0) + 1
    ambiguous = []
    for pane, pid, started_ms in unresolved:
        path = newest_transcript(claude_dir, cwd_of[pid], since_ms=started_ms - 2000)
        if sharing[cwd_of[pid]] == 1 and path:
            found.append((os.path.basename(path)[:-6], pane, pid))
        else:
            ambiguous.append(pane)
    in_panes = {pid for _, _, pid in found}
    kept = _one_pane_per_session(found, registry=registry, ambiguous=ambiguous)
    kept += [(e["sessionId"], None, pid) for pid, e in registry.items() if pid not in in_panes]
    return _observe(db, kept, registry=registry, marks=marks, cwd_of=cwd_of, argv_of=argv_of,
                    claude_dir=claude_dir, idle_after_ms=idle_after_ms, now_ms=now_ms), ambiguous, unreachable


def _one_pane_per_session(found: list[tuple[str, Pane, int]], *, registry: dict[int, dict[str, Any]],
                          ambiguous: list[Pane]) -> list[tuple[str, Pane | None, int]]:
    """Keep the sessions claimed by one pane; for one claimed by several, add the panes to `ambiguous`.

    Two panes can claim one id (two `claude --resume ID`, a stale hook binding): which one holds
    the session is a guess, so the session is kept without a pane and nothing is typed into either.
    """
    claims: dict[str, list[tuple[Pane, int]]] = {}
    for sid, pane, pid in found:
        claims.setdefault(sid, []).append((pane, pid))
    kept: list[tuple[str, Pane | None, int]] = []
    for sid, claimants in claims.items():
        if len(claimants) == 1:
            kept.append((sid, *claimants[0]))
            continue
        ambiguous += [pane for pane, _ in claimants]
        # The process only lends its cwd and command line: the registry's word first, if any.
        pid = next((p for _, p in claimants if (registry.get(p) or {}).get("sessionId") == sid), claimants[0][1])
        kept.append((sid, None, pid))
    return kept


def _proc_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _observe(db: Db, found: list[tuple[str, Pane | None, int]], *, registry: dict[int, dict[str, Any]],
             marks: dict[str, HookMark], cwd_of: dict[int, str], argv_of: Callable[[int], list[str]],
             claude_dir: str, idle_after_ms: int, now_ms: int) -> list[Observation]:
    cache = get_transcript_cache(db)
    screens: dict[tuple[str, str], str] = {}
    for socket in {pane.socket for _, pane, _ in found if pane}:
        ids = [pane.pane_id for _, pane, _ in found if pane and pane.socket == socket]
        screens.update({(socket, i): text for i, text in capture_panes(socket, ids).items()})
    fresh: list[tuple[str, str | None, int, int, dict[str, Any]]] = []
    observations, seen = [], set()
    for sid, pane, pid in found:
        if sid in seen or not UUID_RE.match(sid):
            continue
        seen.add(sid)
        entry = registry.get(pid) or {}
        cwd = cwd_of.get(pid) or entry.get("cwd") or _proc_cwd(pid) or ""
        path = find_transcript(claude_dir, cwd, sid)
        reading = read_transcript(path, cache.get(path)) if path else None
        if path is not None and reading is not None and reading is not cache.get(path):
            fresh.append((path, sid, *reading))
        info = reading[2] if reading else {}
        screen = screens.get((pane.socket, pane.pane_id)) if pane else None
        mark = marks.get(sid)
        registry_ms = entry.get("statusUpdatedAt")
        waiting_for = entry.get("waitingFor")
        state = derive_state(turn=info.get("turn"), turn_ms=info.get("turn_ms"), registry=str(entry.get("status")),
                             registry_ms=registry_ms if isinstance(registry_ms, int) else None,
                             hook=mark.state if mark else None,
                             hook_ms=mark.at_ms if mark else None,
                             shows_dialog=bool(screen and shows_permission_dialog(screen)), now_ms=now_ms,
                             idle_after_ms=idle_after_ms,
                             waiting_for=waiting_for if isinstance(waiting_for, str) else None)
        observations.append(Observation(
            sid, cwd, pane.socket if pane else None, pane.target if pane else None, pane.pane_id if pane else None,
            pid, " ".join(argv_of(pid))[:MAX_COMMAND_CHARS], state, info.get("last_activity_ms"),
            (info.get("label") or entry.get("name") or "")[:MAX_TITLE_CHARS], info.get("tokens") or {}))
    if fresh:
        save_transcript_cache(db, fresh)
    return observations


def pull_fleet(db: Db, *, config: dict[str, Any], now_ms: int, tails: bool = False,
               env: Mapping[str, str] | None = None) -> PullResult:
    """Look at this host's Claude sessions and record what changed (nothing when nothing did).

    Also: ingest spooled hook reports, carry out the orders placed for this host (start, resume,
    stop), dispatch on what it saw (dispatch_round; what it places here is carried out and looked
    at again at once), deliver other hosts' broadcasts, and with `tails` store
    each assigned pane's last lines (and the triage command's reading of them) when they changed.
    """
    ingest_spool(db, now_ms=now_ms)
    carry_out_pending(db, config=config, now_ms=now_ms)  # first: this look then sees what it started or stopped
    idle_after_s = config.get("fleet", {}).get("idle_after_s", DEFAULT_IDLE_AFTER_S)
    if isinstance(idle_after_s, bool) or not isinstance(idle_after_s, int | float) or idle_after_s < 0:
        raise ClareError(f"clare.toml: [fleet] idle_after_s = {idle_after_s!r} is not a number of seconds; fix it")
    idle_after_ms = int(idle_after_s * 1000)
    warnings: list[str] = []
    rclaude = read_rclaude(config.get("rclaude", {}), machine_id=db.machine_id, warnings=warnings)
    observations, ambiguous, unreachable, events = _look(db, claude_dir=claude_home(env), rclaude=rclaude,
                                                         idle_after_ms=idle_after_ms, now_ms=now_ms)
    started = time.monotonic()
    placed = dispatch_round(db, config=config, now_ms=now_ms, warnings=warnings)  # on what this look saw
    carried: dict[str, Order] = {}
    if any(o.host == db.machine_id for o in placed):  # carried out now, then looked at again
        carried = {o.id: o for o in carry_out_pending(db, config=config, now_ms=now_ms)}
        observations, ambiguous, unreachable, again = _look(
            db, claude_dir=claude_home(env), rclaude=rclaude, idle_after_ms=idle_after_ms,
            now_ms=now_ms + int((time.monotonic() - started) * 1000))
        events += again
    deliver_pending(db, now_ms=now_ms)
    deliver_answers(db, now_ms=now_ms, config=config)
    text = canonical_json([p.to_json() for p in ambiguous])
    if get_meta(db.conn.cursor(), "ambiguous_panes") != text:
        with write_txn(db) as cur:
            set_meta(cur, "ambiguous_panes", text)
    updates = post_pane_tails(db, triage=config.get("triage", {}), now_ms=now_ms, warnings=warnings) if tails else []
    return PullResult(observations, events, ambiguous, unreachable, updates, warnings,
                      [carried.get(o.id, o) for o in placed])


def _look(db: Db, *, claude_dir: str, rclaude: dict[str, str], idle_after_ms: int,
          now_ms: int) -> tuple[list[Observation], list[Pane], list[str], list[Event]]:
    """Look at this host's sessions once and record what changed: (observations, ambiguous, unreachable, events)."""
    observations, ambiguous, unreachable = observe_host(db, claude_dir=claude_dir, rclaude=rclaude,
                                                        idle_after_ms=idle_after_ms, now_ms=now_ms)
    # A session that reported through a hook lately lives even when this look cannot find it (an old
    # Claude outside tmux has no registry entry): marking it gone would flap at every hook.
    unsure = {(p.socket, p.pane_id) for p in ambiguous}
    alive = [sid for sid, m in list_hook_marks(db).items()
             if m.hook_event != "SessionEnd" and now_ms - m.at_ms < HOOK_ALIVE_MS]
    # A pane that cannot be told apart from another still runs Claude: its session is not gone.
    alive += [s.id for s in find_sessions(db, host=db.machine_id, include_gone=False)
              if (s.tmux_socket, s.pane_id) in unsure]
    # ... but not when its tmux server runs without its pane (killed, so no SessionEnd came): ask
    # only the servers of such sessions, which this look did not find.
    found = {ob.session_id for ob in observations}
    sockets = {s.tmux_socket for s in find_sessions(db, host=db.machine_id, include_gone=False)
               if s.id in alive and s.id not in found and s.tmux_socket and s.tmux_socket not in unreachable}
    live_panes = {socket: [p.pane_id for p in panes] for socket in sockets
                  if (panes := list_panes(socket)) is not None}
    events = observe_sessions(db, observations, keep_sockets=unreachable, keep_ids=alive, live_panes=live_panes,
                              now_ms=now_ms)
    return observations, ambiguous, unreachable, events


def start_background_pull(db_path: str, config: dict[str, Any], *, stop: Any,
                          log: Callable[[str], None]) -> Any:
    """Start a daemon thread that pulls this host's fleet every [fleet] pull_every_s until `stop` is set.

    Returns the thread, or None when the setting is 0. The thread has its own connection.
    """
    import threading

    every_s = config.get("fleet", {}).get("pull_every_s", DEFAULT_PULL_EVERY_S)
    if isinstance(every_s, bool) or not isinstance(every_s, int | float) or every_s < 0:
        raise ClareError(f"clare.toml: [fleet] pull_every_s = {every_s!r} is not a number of seconds; fix it")
    if not every_s:
        return None
    thread = threading.Thread(target=_pull_loop, name="clare-fleet", daemon=True,
                              args=(db_path, config), kwargs={"stop": stop, "log": log, "every_s": every_s})
    thread.start()
    return thread


def carry_out_soon(db_path: str, config: dict[str, Any]) -> Any:
    """Carry out this host's pending orders now, in a thread with its own connection (after a peer pushed one)."""
    import threading

    def run() -> None:
        db = open_db(db_path)
        try:
            pull_fleet(db, config=config, now_ms=now_ms())
        except ClareError:
            pass  # the background pull tries again and logs what fails
        finally:
            db.close()
    thread = threading.Thread(target=run, name="clare-orders", daemon=True)
    thread.start()
    return thread


def _pull_loop(db_path: str, config: dict[str, Any], *, stop: Any, log: Callable[[str], None],
               every_s: float) -> None:
    db = open_db(db_path)
    last_error = ""
    tails_every_s = config.get("fleet", {}).get("tails_every_s", DEFAULT_TAILS_EVERY_S)
    if isinstance(tails_every_s, bool) or not isinstance(tails_every_s, int | float) or tails_every_s < 0:
        log(f"fleet: [fleet] tails_every_s = {tails_every_s!r} is not a number of seconds; pane tails are off")
        tails_every_s = 0
    last_tails = -float("inf")
    try:
        while not stop.is_set():
            try:
                is_tails = bool(tails_every_s) and time.monotonic() - last_tails >= tails_every_s
                result = pull_fleet(db, config=config, now_ms=now_ms(), tails=is_tails)
                last_tails = time.monotonic() if is_tails else last_tails
                for warning in result.warnings:
                    log(f"fleet: warning: {warning}")
                last_error = ""
            except Exception as err:  # the background loop is an edge: a bad look never ends it
                if str(err) != last_error:  # say it once, not every few seconds
                    log(f"fleet: pull failed: {err}")
                last_error = str(err)
            stop.wait(every_s)
    finally:
        db.close()


def read_rclaude(section: dict[str, Any], *, machine_id: str, warnings: list[str]) -> dict[str, str]:
    """Run the optional rclaude adapter; return this host's tmux target -> session id.

    Contract: `sessions_command` prints JSON lines `{uuid, cwd, host, tmux_target, last_seen_ms}`,
    one per session; lines of other hosts and lines that do not fit are skipped.
    """
    import shlex
    import subprocess

    command = section.get("sessions_command")
    if not command:
        return {}
    try:
        p = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=RCLAUDE_TIMEOUT_S)
    except (OSError, ValueError, subprocess.TimeoutExpired) as err:
        warnings.append(f"rclaude sessions_command failed: {err}")
        return {}
    if p.returncode != 0:
        warnings.append(f"rclaude sessions_command exited {p.returncode}: {p.stderr.strip()[:200]}")
    return parse_rclaude(p.stdout, hosts=(machine_id, machine_host_name(machine_id), host_label()))


def parse_rclaude(text: str, *, hosts: tuple[str, ...]) -> dict[str, str]:
    """Parse rclaude's JSON lines into tmux target -> session id for the sessions of `hosts`."""
    found = {}
    for line in text.splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            obj = json.loads(line)
            host = str(obj.get("host") or "").split(".")[0].lower()
            if (not host or host in hosts) and UUID_RE.match(obj.get("uuid", "")) and obj.get("tmux_target"):
                found[str(obj["tmux_target"])] = obj["uuid"]
    return found


def post_pane_tails(db: Db, *, triage: dict[str, Any], now_ms: int, warnings: list[str]) -> list[Update]:
    """Store the last lines of each assigned pane of this host as a pane-tail update when they changed.

    With `[triage] command`, that command reads the tail on stdin and its stdout becomes a triage update.
    """
    posted = []
    for s in list_sessions(db, host=db.machine_id):
        if s.task_id is None or s.pane_id is None or s.tmux_socket is None:
            continue
        screen = capture_pane(s.tmux_socket, s.pane_id, lines=TAIL_LINES)
        tail = "\n".join(line.rstrip() for line in (screen or "").splitlines()).strip("\n")[-MAX_TEXT_CHARS:]
        if not tail.strip() or tail == last_update_text(db, session_id=s.id, source="pane-tail"):
            continue
        posted.append(post_update(db, tail, task_ref=s.task_id, session_id=s.id, source="pane-tail", now_ms=now_ms))
        verdict = run_triage(triage.get("command"), tail, warnings=warnings)
        if verdict:
            posted.append(post_update(db, verdict, task_ref=s.task_id, session_id=s.id, source="triage",
                                      now_ms=now_ms))
    return posted


def run_triage(command: str | None, tail: str, *, warnings: list[str]) -> str | None:
    """Run the triage command on a pane tail; return its verdict, or None."""
    import shlex
    import subprocess

    if not command:
        return None
    try:
        p = subprocess.run(shlex.split(command), input=tail, capture_output=True, text=True,
                           timeout=TRIAGE_TIMEOUT_S)
    except (OSError, ValueError, subprocess.TimeoutExpired) as err:
        warnings.append(f"triage command failed: {err}")
        return None
    if p.returncode != 0:
        warnings.append(f"triage command exited {p.returncode}: {p.stderr.strip()[:200]}")
        return None
    return p.stdout.strip()[:MAX_TEXT_CHARS] or None


def notify_changes(db: Db, *, config: dict[str, Any], base_url: str, now_ms: int,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run `[notify] command` once per session of this host that started to need a person; return what was sent.

    Follows the log from where it stopped: a change into `permission`, or into `waiting` from
    `working`, is one notification, unless that session notified less than `min_gap_s` ago (a
    flapping session). Marks are stored before the commands run: a crash never repeats one. Only
    the session's own host notifies. A failing command is logged and the next one runs anyway.
    """
    section = config.get("notify") or {}
    command, gap_s, timeout_s = notify_settings(section)
    marks = list_notify_marks(db)
    after_text = get_meta(db.conn.cursor(), "notify_after")
    if after_text is None:  # the first look starts from now: history is not news
        with write_txn(db) as cur:
            save_notify_marks(cur, {s.id: (s.state, None) for s in list_sessions(db, host=db.machine_id)},
                              after=head_rseq(cur))
        return []
    events = list_events_after(db, after=int(after_text), limit=1000, max_chars=4 * 1024 * 1024)
    due: dict[str, str] = {}
    for ev in events:
        p = ev.payload
        is_mine = p.get("host") == db.machine_id and _is_id(p.get("session_id"))
        if not ev.event_type.startswith("session.") or not is_mine:
            continue
        state = "gone" if ev.event_type == "session.gone" else p.get("state")
        sid = p["session_id"]
        old, notified = marks.get(sid, (None, None))
        if state is None or state == old:
            continue
        if state == "permission" or (state == "waiting" and old == "working"):
            if notified is None or now_ms - notified >= gap_s * 1000 or sid in due:
                due[sid] = state
                notified = now_ms
        marks[sid] = (state, notified)
    if not events:
        return []
    with write_txn(db) as cur:
        save_notify_marks(cur, marks, after=max(ev.rseq for ev in events))
    sent = []
    for sid, state in due.items():
        message = notify_message(db, sid, state, base_url=base_url)
        if command:
            error = run_notify(command, message, timeout_s=timeout_s)
            if error:
                log(f"notify: {error}")
        sent.append(message)
    return sent


def notify_settings(section: dict[str, Any]) -> tuple[list[str] | None, float, float]:
    """Return [notify]'s command (argv), min_gap_s and timeout_s; refuse values that do not fit."""
    import shlex

    command = section.get("command")
    if isinstance(command, str):
        try:
            command = shlex.split(command)
        except ValueError as err:
            raise ClareError(f"clare.toml: [notify] command cannot be split into words ({err}); "
                             "fix its quotes") from err
    if command is not None and (not isinstance(command, list) or not command
                                or not all(isinstance(w, str) for w in command)):
        raise ClareError("clare.toml: [notify] command must be a command line or a list of words")
    values = []
    for name, default in (("min_gap_s", DEFAULT_NOTIFY_GAP_S), ("timeout_s", DEFAULT_NOTIFY_TIMEOUT_S)):
        value = section.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ClareError(f"clare.toml: [notify] {name} = {value!r} is not a number of seconds; fix it")
        values.append(float(value))
    return command, values[0], values[1]


def notify_message(db: Db, session_id: str, state: str, *, base_url: str) -> dict[str, Any]:
    """Return the JSON object a notification carries: who needs you, where, for what, and the page's URL."""
    s = next(x for x in find_sessions(db, prefix=session_id) if x.id == session_id)
    task = next((t for t in list_tasks(db) if t.id == s.task_id), None) if s.task_id else None
    return {"session": s.id, "label": s.label, "host": s.host, "state": state, "since": s.state_at,
            "cwd": s.cwd, "tmux_target": s.tmux_target,
            "task": {"id": task.id, "title": task.title} if task else None,
            "project": {"id": task.project_id, "name": task.project} if task else None,
            "asked": s.asked if state == "permission" else None,
            "url": f"{base_url.rstrip('/')}/sessions/{s.id}"}


def run_notify(command: list[str], message: dict[str, Any], *, timeout_s: float) -> str | None:
    """Run the notify command (no shell) with the message as JSON on stdin; return why it failed, or None."""
    import subprocess

    try:
        p = subprocess.run(command, input=json.dumps(message, ensure_ascii=False) + "\n", capture_output=True,
                           text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"command {command[0]!r} did not finish within {timeout_s:g} s; it was stopped"
    except OSError as err:
        return f"command {command[0]!r} cannot run: {err.strerror or err}; fix [notify] command in clare.toml"
    if p.returncode != 0:
        first = (p.stderr.strip().splitlines() or [""])[0][:200]
        return f"command {command[0]!r} exited {p.returncode}" + (f": {first}" if first else "")
    return None


def start_background_act(db_path: str, config: dict[str, Any], *, base_url: str, stop: Any,
                         log: Callable[[str], None]) -> Any:
    """Start a daemon thread that, every second until `stop` is set, types the answers pending on this
    host's sessions and (with [notify]) runs the notify command for sessions that started to need a person."""
    import threading

    if config.get("notify"):
        notify_settings(config["notify"])  # a typo there stops `serve` at start, not later in a log line
    answer_settings(config)
    thread = threading.Thread(target=_act_loop, name="clare-act", daemon=True, args=(db_path, config),
                              kwargs={"base_url": base_url, "stop": stop, "log": log})
    thread.start()
    return thread


def _act_loop(db_path: str, config: dict[str, Any], *, base_url: str, stop: Any,
              log: Callable[[str], None]) -> None:
    db = open_db(db_path)
    last_error = ""
    try:
        while not stop.is_set():
            try:
                for a in deliver_answers(db, now_ms=now_ms(), config=config):
                    log(f"answer {a.id[:SHORT_ID]} to session {a.session_id[:SHORT_ID]}: {a.result} "
                        f"({a.result_reason})")
                if config.get("notify"):
                    notify_changes(db, config=config, base_url=base_url, now_ms=now_ms(), log=log)
                last_error = ""
            except Exception as err:  # the background loop is an edge: one bad look never ends it
                if str(err) != last_error:
                    log(f"notify: failed: {err}")
                last_error = str(err)
            stop.wait(NOTIFY_EVERY_S)
    finally:
        db.close()


def answer_settings(config: dict[str, Any]) -> tuple[int, int]:
    """Return [answers] ttl_s and clock_slack_s of clare.toml, in ms; refuse values that do not fit."""
    section = config.get("answers") or {}
    values = []
    for name, default in (("ttl_s", ANSWER_TTL_MS / 1000), ("clock_slack_s", MAX_OFFSET_MS / 1000)):
        value = section.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ClareError(f"clare.toml: [answers] {name} = {value!r} is not a number of seconds; fix it")
        values.append(int(value * 1000))
    return values[0], values[1]


def deliver_answers(db: Db, *, now_ms: int, config: dict[str, Any] | None = None,
                    confirm_s: float = ANSWER_CONFIRM_S) -> list[Answer]:
    """Type the pending answers to this host's sessions' dialogs; record what became of each.

    An answer expires `ttl_s` after this host stored it, by this host's clock; one whose maker's
    clock says it is older than ttl_s + clock_slack_s (it came hours late by sync) expires too.
    """
    ttl_ms, slack_ms = answer_settings(config or {})
    done = []
    with _delivery_lock(db):
        for a in list_answers(db, pending_on=db.machine_id):
            result, reason = _act_on_answer(db, a, now_ms=now_ms, confirm_s=confirm_s, ttl_ms=ttl_ms,
                                            slack_ms=slack_ms)
            done.append(resolve_answer(db, a, result=result, reason=reason, now_ms=now_ms))
    return done


def _act_on_answer(db: Db, a: Answer, *, now_ms: int, confirm_s: float, ttl_ms: int,
                   slack_ms: int) -> tuple[str, str]:
    """Re-read the session's latest signals and its screen; type the answer's key only if its dialog is open.

    Never Enter: a digit picks a dialog option and, if the dialog closed in between, lands as
    one character in Claude's composer, never submitted.
    """
    received = answer_received_ms(db, a.id) or now_ms
    if now_ms - received > ttl_ms:
        return "expired", (f"stored here {(now_ms - received) // 1000} s ago; answers expire after "
                           f"{ttl_ms // 1000} s, so nothing was typed")
    made_ms = _iso_to_ms(a.created_at) or now_ms
    if now_ms - made_ms > ttl_ms + slack_ms:
        return "expired", (f"made {(now_ms - made_ms) // 1000} s ago on {a.by_host} (it came late); answers expire "
                           f"after {ttl_ms // 1000} s, so nothing was typed")
    s = next((x for x in find_sessions(db, prefix=a.session_id) if x.id == a.session_id), None)
    if s is None or s.state == "gone":
        return "stale", "the session is gone: nothing was typed"
    if s.state != "permission" or not s.asked:
        return "stale", f"the session asks nothing now (it is {s.state}; answered at the terminal?): nothing was typed"
    if a.tool_use_id and s.asked.get("tool_use_id") and a.tool_use_id != s.asked["tool_use_id"]:
        return "stale", "another dialog is open now (a new request): nothing was typed"
    if (s.asked["tool"], s.asked["input"]) != (a.tool, a.input):
        return "stale", f"the session asks about {s.asked['tool']} now, not this: nothing was typed"
    if s.pane_id is None or s.tmux_socket is None:
        return "failed", "the session has no tmux pane to type into"
    # Only the visible screen: a dialog answered a moment ago still shows in the scrollback.
    dialog = parse_dialog(capture_pane(s.tmux_socket, s.pane_id, lines=None) or "")
    if dialog is None:
        return "stale", "no dialog is on its screen now (answered at the terminal?): nothing was typed"
    first = " ".join((a.input.strip().splitlines() or [""])[0].split())[:30]
    if first and first not in " ".join(dialog.about.split()):
        return "stale", f"the dialog on screen is not about {first!r}: nothing was typed"
    key = _dialog_key(a, dialog)
    if isinstance(key, str):
        return "stale", key
    n, wording = key
    p = run_tmux(s.tmux_socket, "send-keys", "-t", s.pane_id, "-l", str(n))
    if p.returncode != 0:
        return "failed", f"tmux could not type into {s.pane_id}: {p.stderr.strip()[:200]}"
    deadline = time.monotonic() + confirm_s
    while True:
        after = parse_dialog(capture_pane(s.tmux_socket, s.pane_id, lines=None) or "")
        if after is None or after != dialog:
            break
        if time.monotonic() > deadline:
            return "failed", f"typed {n} ({wording}), but the dialog is still open"
        time.sleep(0.1)
    said = f"typed {n} ({wording})"
    # First-hand evidence that the dialog closed: an approved tool runs, a denied turn stops. Later hooks win.
    state = "waiting" if wording.startswith("No") else "working"
    report_hook(db, s.id, HookMark(s.tmux_socket, s.pane_id, state, "ClareAnswer", int(time.time() * 1000)),
                cwd=s.cwd, now_ms=now_ms)
    s = next(x for x in find_sessions(db, prefix=s.id) if x.id == s.id)
    if a.answer == "deny" and a.reason:
        result, why = deliver_text(db, s, a.reason, confirm_s=confirm_s)
        said += f"; the reason was {result}" + (f" ({why})" if why else "")
    return "typed", said


def _dialog_key(a: Answer, dialog: Dialog) -> tuple[int, str] | str:
    """Return the option (number, wording) an answer picks in this dialog, or why none fits."""
    options = dict(dialog.options)
    if a.answer == "approve":
        found = [n for n, text in dialog.options if text == "Yes"]
    elif a.answer == "deny":
        found = [n for n, text in dialog.options if text.startswith("No")]
    else:
        found = [a.option] if a.option in options else []
        if found and a.option_text and options[found[0]] != a.option_text:
            return f"option {a.option} now reads {options[found[0]]!r}, not {a.option_text!r}: nothing was typed"
    if not found:
        return f"the dialog offers no option for {a.answer} ({'; '.join(t for _, t in dialog.options)})"
    return found[0], options[found[0]]


def list_ambiguous_panes(db: Db) -> list[Pane]:
    """Return the Claude panes the last pull could not tie to one session."""
    return [Pane(**p) for p in json.loads(get_meta(db.conn.cursor(), "ambiguous_panes") or "[]")]


def hook_state(payload: dict[str, Any]) -> str | None:
    """Return the session state a hook report implies, or None when it implies none."""
    event = payload.get("hook_event_name")
    if event != "Notification":
        return HOOK_STATES.get(str(event))
    state = NOTIFICATION_STATES.get(str(payload.get("notification_type")))
    message = str(payload.get("message", ""))
    # COMPAT: versions before notification_type said it only in the message.
    if state is None and "permission" in message:
        return "permission"
    return state


def spool_dir(db_path: str) -> str:
    """Return the folder where hook reports wait while the database cannot take them."""
    return os.path.join(os.path.dirname(os.path.abspath(db_path)), "spool")


def process_started_ms(pid: int | str = "self") -> int | None:
    """Return when a process started, in epoch ms, from the kernel's record (10 ms steps); None if unknown.

    A hook report is stamped with this, not with the time Python got to read it: a loaded machine
    takes a second or more to start Python, and async hooks start out of order (DESIGN §5).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rfind(b")") + 2:].split()[19])
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux: the caller uses the clock
        return None
    return now_ms() - max(0, int(age_s * 1000))


def run_hook(db_path: str, raw: bytes, *, env: dict[str, str], at_ms: int) -> None:
    """Take one Claude Code hook report: record it now, or spool it for the next pull; never raise.

    This is an edge (STYLE §5): Claude's session must never see Clare fail, so whatever goes
    wrong while recording ends in the spool, and whatever goes wrong while spooling is dropped.
    """
    try:
        payload = parse_json(raw)
    except (ValueError, RecursionError):
        return  # not a report (or not standard JSON): nothing to keep
    if not isinstance(payload, dict):
        return
    report = {"payload": payload, "tmux_pane": env.get("TMUX_PANE") or None,
              "tmux_socket": (env.get("TMUX") or "").split(",")[0] or None, "at_ms": at_ms}
    try:
        if not os.path.exists(db_path):
            raise ClareError(f"no database at {db_path} yet")
        db = open_db(db_path, busy_timeout_ms=HOOK_BUSY_TIMEOUT_MS)
        try:
            ingest_report(db, report, now_ms=at_ms)
        finally:
            db.close()
    except Exception:  # the hook runner is an edge: spool whatever it could not record
        with contextlib.suppress(OSError):
            spool_report(db_path, report)


def spool_report(db_path: str, report: dict[str, Any]) -> str:
    """Write one hook report to the spool, atomically; return its path."""
    folder = spool_dir(db_path)
    make_private_dir(folder)  # reports hold prompts
    path = os.path.join(folder, f"{report['at_ms']:013d}-{os.getpid()}-{new_id()[:8]}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)
    return path


def ingest_report(db: Db, report: dict[str, Any], *, now_ms: int) -> list[Event]:
    """Record one hook report (live or spooled); reports of sub-agents or without a session are ignored."""
    # SECURITY: the payload comes from a hook's stdin: only known fields of known types are used.
    p = report.get("payload") or {}
    sid = p.get("session_id")
    if not isinstance(sid, str) or not UUID_RE.match(sid) or p.get("agent_id"):
        return []
    event = str(p.get("hook_event_name", ""))[:64]
    state = hook_state(p)
    if state is None and event != "SessionEnd":
        return []  # says nothing of the state (idle_prompt is not activity): the stored report stays newest
    pane, socket = report.get("tmux_pane"), report.get("tmux_socket")
    mark = HookMark(socket if isinstance(socket, str) else None,
                    pane if isinstance(pane, str) and pane.startswith("%") else None,
                    state, event, int(report.get("at_ms") or now_ms))
    cwd = p["cwd"] if isinstance(p.get("cwd"), str) else ""
    asked = asked_of(p) if event == "PermissionRequest" else None
    # A permission report recorded late, after the user answered or pressed Esc, must not show (or
    # notify) `permission` even for the second until the next pull.
    is_stale = state == "permission" and _moved_on_since(sid, p.get("transcript_path"), mark.at_ms)
    # /clear ends a session and starts another in the same process: the second report hands over.
    tool_use_id = p["tool_use_id"][:100] if isinstance(p.get("tool_use_id"), str) else None
    input_key = input_key_of(p.get("tool_input")) if event in ("PreToolUse", "PermissionRequest") else None
    return report_hook(db, sid, mark, cwd=cwd[:4096], is_end=event == "SessionEnd" and p.get("reason") != "clear",
                       is_clear=event == "SessionStart" and p.get("source") == "clear", asked=asked,
                       is_stale=is_stale, tool_use_id=tool_use_id, input_key=input_key, now_ms=now_ms)


def input_key_of(tool_input: object) -> str:
    """Return a short fingerprint of a tool's input: equal inputs, equal keys (no secret involved)."""
    import hashlib

    return hashlib.sha256(json.dumps(tool_input, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def _moved_on_since(session_id: str, transcript_path: object, at_ms: int) -> bool:
    """Tell whether the transcript or the registry moved on after a permission report (no dialog waits then)."""
    # SECURITY: the path comes from the hook's stdin: only a transcript's metadata is read.
    if isinstance(transcript_path, str) and transcript_path.endswith(".jsonl"):
        with contextlib.suppress(OSError):
            if os.stat(transcript_path).st_mtime_ns // 1_000_000 > at_ms + STALE_MARGIN_MS:
                return True
    with contextlib.suppress(OSError):
        for entry in os.scandir(os.path.join(claude_home(), "sessions")):
            with contextlib.suppress(OSError, ValueError):
                with open(entry.path, encoding="utf-8") as f:
                    reg = json.load(f)
                if isinstance(reg, dict) and reg.get("sessionId") == session_id:
                    at = reg.get("statusUpdatedAt")
                    waiting_for = reg.get("waitingFor")
                    return (isinstance(at, int) and at > at_ms + STALE_MARGIN_MS
                            and not (isinstance(waiting_for, str) and REGISTRY_PERMISSION_RE.search(waiting_for)))
    return False


def asked_of(payload: dict[str, Any]) -> dict[str, str]:
    """Return what a PermissionRequest asks, {tool, input}: the tool and its command, file or URL as text."""
    # SECURITY: hook stdin; any JSON shape may come, so only text is kept, cut to size.
    tool = payload.get("tool_name")
    tool = tool[:100] if isinstance(tool, str) else "?"
    tool_input = payload.get("tool_input")
    if isinstance(tool_input, dict):
        text = next((tool_input[k] for k in ASKED_INPUT_KEYS if isinstance(tool_input.get(k), str)), None)
        if text is None:
            text = json.dumps(tool_input, ensure_ascii=False, sort_keys=True)
    else:
        text = "" if tool_input is None else json.dumps(tool_input, ensure_ascii=False)
    return {"tool": tool, "input": text[:MAX_ASKED_CHARS]}


def ingest_spool(db: Db, *, now_ms: int) -> int:
    """Record the hook reports spooled while the database was busy or missing; return how many."""
    folder = spool_dir(db.path)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    except FileNotFoundError:
        return 0
    n_reports = 0
    for name in names:
        path = os.path.join(folder, name)
        # Two pulls (the CLI and serve's thread) may read the spool at once: a file the other one
        # took meanwhile is simply done. Recording a report twice changes nothing.
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
        except FileNotFoundError:
            continue
        except ValueError:
            with contextlib.suppress(OSError):
                os.replace(path, path + ".bad")  # kept for a human, never read again
            continue
        ingest_report(db, report, now_ms=now_ms)
        n_reports += 1
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return n_reports


def settings_path(env: Mapping[str, str] | None = None) -> str:
    """Return Claude Code's user settings file."""
    return os.path.join(claude_home(env), "settings.json")


def hook_command(db_path: str) -> str:
    """Return the shell command Claude Code runs for Clare's hooks: this interpreter, file and database.

    It imports clare rather than running clare.py as a script: an imported module loads from its
    cached bytecode, a script is compiled on every run (about 2x the hook's cost).
    """
    import shlex

    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import clare; raise SystemExit(clare.main())  {CLARE_HOOK_MARK}")
    return shlex.join([sys.executable, "-I", "-c", code, "--db", os.path.abspath(db_path), "hook"])


def _read_settings(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise ClareError(f"{path} is not valid JSON ({err}); fix it, then run this again") from err
    if not isinstance(settings, dict) or not isinstance(settings.get("hooks", {}), dict):
        raise ClareError(f"{path} is not a settings object with a 'hooks' object; fix it, then run this again")
    return settings


def _write_settings(path: str, settings: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".clare-tmp", "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".clare-tmp", path)


def _is_clare_hook(h: object) -> bool:
    """Tell whether a hook entry is one Clare wrote (now or from an older path or version): exactly, never by a word."""
    import shlex

    if not isinstance(h, dict) or not isinstance(h.get("command"), str):
        return False
    try:
        argv = shlex.split(h["command"])
    except ValueError:
        return False
    if len(argv) == 7 and argv[1:3] == ["-I", "-c"] and argv[4] == "--db" and argv[6] == "hook":
        return bool(CLARE_HOOK_CODE_RE.fullmatch(argv[3]))
    # COMPAT: the first hooks ran the script itself: python /path/clare.py [--db DB] hook.
    return (len(argv) in (3, 5) and os.path.basename(argv[1]) == "clare.py" and argv[-1] == "hook"
            and (len(argv) == 3 or argv[2] == "--db"))


def _strip_clare_hooks(groups: list[Any]) -> bool:
    removed = False
    for g in list(groups):
        if isinstance(g, dict) and isinstance(g.get("hooks"), list):
            keep = [h for h in g["hooks"] if not _is_clare_hook(h)]
            if len(keep) != len(g["hooks"]):
                removed = True
                if keep:
                    g["hooks"] = keep
                else:
                    groups.remove(g)
    return removed


def install_hooks(path: str, command: str) -> list[str]:
    """Add Clare's hook to every event it reads, keeping the user's own hooks; return the events changed."""
    settings = _read_settings(path)
    hooks = settings.setdefault("hooks", {})
    entry = {"type": "command", "command": command, "timeout": HOOK_TIMEOUT_S, "async": True}
    changed = []
    for event in HOOK_EVENTS:
        groups = hooks.setdefault(event, [])
        if not isinstance(groups, list):
            raise ClareError(f"{path}: hooks.{event} is not a list; fix it, then run this again")
        ours = [h for g in groups if isinstance(g, dict) for h in g.get("hooks") or () if _is_clare_hook(h)]
        if ours == [entry]:
            continue
        _strip_clare_hooks(groups)
        groups.append({"matcher": "", "hooks": [entry]})
        changed.append(event)
    if changed:
        _write_settings(path, settings)
    return changed


def uninstall_hooks(path: str) -> list[str]:
    """Remove Clare's hooks and nothing else; return the events changed."""
    settings = _read_settings(path)
    hooks = settings.get("hooks", {})
    changed = [event for event, groups in hooks.items() if isinstance(groups, list) and _strip_clare_hooks(groups)]
    for event in changed:
        if not hooks[event]:
            del hooks[event]
    if changed:
        if not hooks:
            del settings["hooks"]
        _write_settings(path, settings)
    return changed


def hooks_status(path: str, command: str) -> dict[str, str]:
    """Return, per hook event Clare reads: installed, outdated (another Clare command) or missing."""
    hooks = _read_settings(path).get("hooks", {})
    status = {}
    for event in HOOK_EVENTS:
        groups = hooks.get(event) if isinstance(hooks.get(event), list) else []
        ours = [h for g in groups if isinstance(g, dict) for h in g.get("hooks") or () if _is_clare_hook(h)]
        status[event] = ("installed" if any(h.get("command") == command for h in ours)
                         else "outdated" if ours else "missing")
    return status


def send_broadcast(db: Db, target: str, text: str, *, now_ms: int, is_command: bool = False,
                   confirm_s: float = BROADCAST_CONFIRM_S,
                   on_delivery: Callable[[Session, str, str, int, int], None] | None = None) -> BroadcastResult:
    """Send a text to every live session of a target; type it into this host's panes now.

    Sessions of other hosts get it when their host next pulls (DESIGN §5): queued until then.
    Every result is recorded as a broadcast.delivered event, and returned; `on_delivery(session,
    result, reason, n_done, n_here)` hears of each of this host's as it lands (each takes seconds).
    """
    with _delivery_lock(db):
        broadcast_id, text, recipients = start_broadcast(db, target, text, is_command=is_command, now_ms=now_ms)
        started = time.monotonic()
        here = [s for s in recipients if s.host == db.machine_id]
        for n, s in enumerate(here, 1):
            result, reason = deliver_text(db, s, text, confirm_s=confirm_s)
            record_delivery(db, broadcast_id, s.id, result=result, reason=reason,
                            now_ms=now_ms + int((time.monotonic() - started) * 1000))
            if on_delivery is not None:
                on_delivery(s, result, reason, n, len(here))
    return BroadcastResult(broadcast_id, target, text, list_deliveries(db, broadcast_id=broadcast_id),
                           list_unreached_tasks(db, target))


@contextlib.contextmanager
def _delivery_lock(db: Db) -> Iterator[None]:
    """Hold this database's delivery lock: a pull must not type a broadcast that a sender is typing."""
    import fcntl

    path = os.path.join(os.path.dirname(os.path.abspath(db.path)), "delivery.lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def deliver_pending(db: Db, *, now_ms: int, confirm_s: float = BROADCAST_CONFIRM_S) -> list[Delivery]:
    """Deliver the broadcasts other hosts sent to this host's sessions; expire the stale ones.

    Also confirm the queued ones Claude has taken since: queued becomes delivered once the text is
    in the session's transcript.
    """
    done = [c for d in list_unconfirmed_deliveries(db, host=db.machine_id)
            if (c := _confirm_queued(db, d, now_ms=now_ms)) is not None]
    if not list_deliveries(db, pending_on=db.machine_id):
        return done
    with _delivery_lock(db):
        sessions = {s.id: s for s in list_sessions(db, host=db.machine_id, include_gone=True)}
        for d in list_deliveries(db, pending_on=db.machine_id):  # again, now that no one else delivers
            done.append(_deliver_one(db, d, sessions[d.session_id], now_ms=now_ms, confirm_s=confirm_s))
    return done


def _confirm_queued(db: Db, d: Delivery, *, now_ms: int) -> Delivery | None:
    """Record a queued delivery as delivered once its text is in the session's transcript."""
    text = (get_broadcast_text(db, d.broadcast_id) or ("", ""))[0]
    session = next((s for s in find_sessions(db, prefix=d.session_id) if s.id == d.session_id), None)
    path = session and find_transcript(claude_home(), session.cwd, session.id)
    if not text or not path or not _transcript_has_prompt(path, text, since_ms=(_iso_to_ms(d.updated_at) or 0) - 5000):
        return None
    record_delivery(db, d.broadcast_id, d.session_id, result="delivered", reason="", now_ms=now_ms)
    return record_replace(d, result="delivered", reason="")


def _deliver_one(db: Db, d: Delivery, session: Session, *, now_ms: int, confirm_s: float) -> Delivery:
    text, expires_at = get_broadcast_text(db, d.broadcast_id) or ("", "")
    # SECURITY: the text may come from a peer (or from a log older than the broadcast.sent check):
    # only the sending host ran broadcast_text(), so strip again what could escape the paste.
    text = typable_text(text)
    if (_iso_to_ms(expires_at) or 0) < now_ms:
        result, reason = "expired", f"not delivered before {expires_at}"
    else:
        result, reason = deliver_text(db, session, text, confirm_s=confirm_s)
    if (result, reason) == ("refused", DRAFT_REFUSAL):
        # The sender is not at this keyboard: never submit the user's draft, wait until it is gone.
        result, reason = "queued", DRAFT_WAIT_REASON
        if (d.result, d.reason) == (result, reason):
            return d  # still waiting: the log must not grow with polling
    record_delivery(db, d.broadcast_id, d.session_id, result=result, reason=reason, now_ms=now_ms)
    return record_replace(d, result=result, reason=reason)


def deliver_text(db: Db, session: Session, text: str, *, confirm_s: float,
                 is_done: Callable[[], bool] | None = None) -> tuple[str, str]:
    """Type a text into a session's tmux pane as one paste and an Enter; return (result, reason).

    Never into a pane that does not run Claude (a shell would run the text) and never while a
    permission dialog shows (Enter would approve it). The text goes through a tmux buffer loaded
    from stdin, never through a shell, so it arrives literally. `is_done` tells when a command
    (/exit) took effect, where no prompt is submitted to confirm it.
    """
    if session.state == "gone":
        return "refused", "the session is gone"
    if session.pane_id is None or session.tmux_socket is None:
        return "refused", "the session does not run in a tmux pane"
    pane = next((p for p in list_panes(session.tmux_socket) or () if p.pane_id == session.pane_id), None)
    if pane is None:
        return "refused", f"tmux pane {session.pane_id} is gone"
    procs, children = process_tree()
    registry = read_registry(claude_home(), procs)
    claude_pid = find_claude(pane.pid, children, proc_argv, registered=registry)
    if claude_pid is None:
        return "refused", f"pane {pane.pane_id} does not run Claude now; a shell would run the text"
    entry = registry.get(claude_pid)
    if entry is not None and entry["sessionId"] != session.id:
        return "refused", f"pane {pane.pane_id} now runs another session ({entry['sessionId'][:SHORT_ID]})"
    if pane.in_mode:
        run_tmux(pane.socket, "send-keys", "-t", pane.pane_id, "-X", "cancel")
    refusal = _dialog_refusal(db, session, pane, pid=claude_pid)
    if refusal:
        return "refused", refusal
    # Never submit someone's unsent draft: a paste is appended to it and Enter sends both.
    if composer_text(_capture_styled(pane) or ""):
        return "refused", DRAFT_REFUSAL
    name = f"clare-{new_id()}"  # buffer names are server-wide
    for args, stdin in ((("load-buffer", "-b", name, "-"), text),
                        (("paste-buffer", "-p", "-r", "-d", "-b", name, "-t", pane.pane_id), None)):
        p = run_tmux(pane.socket, *args, input_text=stdin)
        if p.returncode != 0:
            run_tmux(pane.socket, "delete-buffer", "-b", name)
            return "failed", f"tmux {args[0]}: {(p.stderr.strip().splitlines() or ['failed'])[0]}"
    was_working = session.state == "working"
    for _ in range(BROADCAST_ENTER_TRIES):
        time.sleep(BROADCAST_PAUSE_S)
        refusal = _dialog_refusal(db, session, pane, pid=claude_pid)
        if refusal:  # a dialog opened after the paste: leave the text in the composer
            return "refused", refusal + "; the text waits in the composer"
        sent_ms = now_ms()
        run_tmux(pane.socket, "send-keys", "-t", pane.pane_id, "Enter")
        if is_done is not None and _wait_until(is_done, timeout_s=confirm_s):
            return "delivered", ""
        if is_done is None and _wait_for_prompt(db, session, text, since_ms=sent_ms, timeout_s=confirm_s):
            return "delivered", ""
        # Once the text left the composer Claude has it (sent, or queued after its turn): another
        # Enter would send whatever the user types next.
        left = composer_text(_capture_styled(pane) or "") if is_done is None else None
        if was_working or left == "":
            return "queued", ("Claude is busy; it takes the text after this turn" if was_working
                              else "Claude took the text; it is not in the transcript yet")
    return "failed", f"Claude did not take the text after {BROADCAST_ENTER_TRIES} Enters"


def _wait_until(predicate: Callable[[], bool], *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _capture_styled(pane: Pane) -> str | None:
    p = run_tmux(pane.socket, "capture-pane", "-p", "-e", "-J", "-t", pane.pane_id)
    return p.stdout if p.returncode == 0 else None


def _dialog_refusal(db: Db, session: Session, pane: Pane, *, pid: int | None = None) -> str | None:
    screen = capture_pane(pane.socket, pane.pane_id, lines=None)
    if screen is None:
        return f"cannot read pane {pane.pane_id}'s screen; not typing blind"
    if shows_permission_dialog(screen):
        return "needs permission: a dialog is open (Enter would approve it)"
    entry = _registry_entry(pid) if pid else None
    waiting_for = (entry or {}).get("waitingFor")
    if isinstance(waiting_for, str) and REGISTRY_PERMISSION_RE.search(waiting_for):
        return "needs permission: Claude's registry says a permission prompt is open"
    # The hook is the dependable signal when the screen text changes between versions: a
    # permission report counts until the transcript or the registry moves on after it.
    mark = list_hook_marks(db, session_id=session.id).get(session.id)
    if mark and mark.state == "permission":
        path = find_transcript(claude_home(), session.cwd, session.id)
        newer = [(entry or {}).get("statusUpdatedAt")]
        with contextlib.suppress(OSError):
            newer.append(os.stat(path).st_mtime_ns // 1_000_000 if path else None)
        if not any(isinstance(t, int) and t > mark.at_ms for t in newer):
            return "needs permission: Claude asked for it and has not moved on since"
    return None


def _registry_entry(pid: int) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(claude_home(), "sessions", f"{pid}.json"), encoding="utf-8") as f:
            entry = json.load(f)
        return entry if isinstance(entry, dict) else None
    return None


def _wait_for_prompt(db: Db, session: Session, text: str, *, since_ms: int, timeout_s: float) -> bool:
    """Wait until the UserPromptSubmit hook or the transcript shows that Claude took the text."""
    path = find_transcript(claude_home(), session.cwd, session.id)
    deadline = time.monotonic() + timeout_s
    while True:
        mark = list_hook_marks(db, session_id=session.id).get(session.id)
        if mark and mark.hook_event == "UserPromptSubmit" and mark.at_ms >= since_ms:
            return True
        if path is None:
            path = find_transcript(claude_home(), session.cwd, session.id)
        if path and _transcript_has_prompt(path, text, since_ms=since_ms - 1000):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _transcript_has_prompt(path: str, text: str, *, since_ms: int) -> bool:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - TAIL_BLOCK_BYTES))
        lines = f.read().split(b"\n")
    for raw in reversed(lines):
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            obj = json.loads(raw)
            if obj.get("type") == "user" and (_iso_to_ms(obj.get("timestamp")) or 0) >= since_ms:
                if claude_text(_text_of(obj["message"].get("content"))) == claude_text(text):
                    return True
    return False


# --- starting, resuming and stopping sessions: the host's side of an order --------------------

START_READY_S = 30.0  # how long a new Claude may take to show its composer (or a screen Clare never answers)
STOP_WAIT_S = 10.0  # how long Claude may take to end after /exit or SIGTERM
WORKTREE_SLUG_CHARS = 40
# Screens where a typed prompt and Enter would answer for the user: data, not code. Clare never answers them.
TRUST_SCREEN = (lazy_re(r"Do you trust the files in this folder"), lazy_re(r"Is this a project you created"),
                lazy_re(r"I trust this folder"), lazy_re(r"Accessing workspace"))
ONBOARDING_SCREEN = (lazy_re(r"Choose the text style"), lazy_re(r"Select login method"),
                     lazy_re(r"use this API key\?"), lazy_re(r"Press Enter to continue"))
COMPOSER_SCREEN = lazy_re(r"^\s*[│|]?\s*[>❯](?:\s|$)", re.M)  # the prompt line of an empty composer
CLAUDE_PLACES = ("~/.local/bin", "~/.claude/local", "~/.npm-global/bin", "/usr/local/bin", "/usr/bin",
                 "/opt/homebrew/bin")


def default_tmux_socket(env: Mapping[str, str] | None = None) -> str:
    """Return the socket of the user's default tmux server (where plain `tmux attach` looks)."""
    env = os.environ if env is None else env
    return os.path.join(env.get("TMUX_TMPDIR") or "/tmp", f"tmux-{os.getuid()}", "default")


def claude_argv(config: dict[str, Any], *, env: Mapping[str, str] | None = None) -> list[str]:
    """Return [fleet] claude_command as argv with an absolute program path; a systemd unit's PATH is short."""
    import shlex
    import shutil

    text = config.get("fleet", {}).get("claude_command", "claude")
    try:
        argv = shlex.split(text) if isinstance(text, str) else []
    except ValueError:
        argv = []
    if not argv:
        raise ClareError(f"clare.toml: [fleet] claude_command = {text!r} is not a command; e.g. "
                         'claude_command = "/home/me/.local/bin/claude"')
    program = os.path.expanduser(argv[0])
    if "/" in program:
        found = program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    else:
        env = os.environ if env is None else env
        path = os.pathsep.join([env.get("PATH", ""), *map(os.path.expanduser, CLAUDE_PLACES)])
        found = shutil.which(program, path=path)
    if found is None:
        raise ClareError(f"the claude command {argv[0]!r} is not found on this host; set its full path in "
                         'clare.toml: [fleet] claude_command = "/full/path/to/claude" (see: which claude)')
    return [os.path.abspath(found), *argv[1:]]


def agent_launcher(db_path: str) -> str:
    """Write (when missing or stale) the launcher Claude runs to report to this database; return its path.

    It sits beside the database, runs this clare.py with this interpreter, and ignores CLARE_URL:
    an agent's `update --done` must reach the host that knows its pane.
    """
    folder = os.path.dirname(os.path.abspath(db_path))
    path = os.path.join(folder, "clare")
    here = os.path.dirname(os.path.abspath(__file__))
    text = (f"#!{sys.executable} -I\n# Written by Clare for the Claude sessions it starts: reports to one database.\n"
            f"import os, sys\nos.environ.pop('CLARE_URL', None)\nsys.path.insert(0, {here!r})\nimport clare\n"
            f"raise SystemExit(clare.main(['--db', {os.path.abspath(db_path)!r}, *sys.argv[1:]]))\n")
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as f:
        if f.read() == text:
            return path
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path + ".tmp", 0o700)
    os.replace(path + ".tmp", path)
    return path


DISPATCH_TEMPLATE = ("$title\n\n$description\n\n(Task $task_id of project $project, from Clare.) Post progress notes "
                     'with:\n  $clare update "what you did"\nWhen the task is finished, report it with:\n'
                     '  $clare update --done "one-line summary"')  # [dispatch] template in clare.toml replaces it
TEMPLATE_KEYS = ("title", "description", "task_id", "project", "priority", "clare")


def dispatch_settings(config: dict[str, Any], *, path: str = "clare.toml") -> tuple[str, bool]:
    """Return clare.toml's [dispatch] template and clear_between, checked; the defaults when unset."""
    section = config.get("dispatch", {})
    if not isinstance(section, dict):
        raise ClareError(f"{path}: [dispatch] must be a table; e.g. [dispatch] clear_between = true")
    template, is_clear = section.get("template", DISPATCH_TEMPLATE), section.get("clear_between", False)
    if not isinstance(is_clear, bool):
        raise ClareError(f"{path}: [dispatch] clear_between = {is_clear!r} is not true or false; fix it")
    if not isinstance(template, str) or not template.strip() or len(template) > MAX_TEXT_CHARS:
        raise ClareError(f"{path}: [dispatch] template must be non-empty text of at most {MAX_TEXT_CHARS} characters")
    t = string.Template(template)
    unknown = sorted(set(t.get_identifiers()) - set(TEMPLATE_KEYS))
    if not t.is_valid() or unknown:
        raise ClareError(f"{path}: [dispatch] template uses {', '.join('$' + u for u in unknown) or 'a lone $'}; "
                         f"it may use {', '.join('$' + k for k in TEMPLATE_KEYS)} (write $$ for a dollar sign)")
    return template, is_clear


def first_prompt(task: Task, *, launcher: str, template: str | None = None) -> str:
    """Return the text typed into a session for a task: the dispatch template filled in."""
    try:
        text = string.Template(template or DISPATCH_TEMPLATE).substitute(
            title=task.title, description=task.description.strip(), task_id=task.id[:SHORT_ID], project=task.project,
            priority=f"P{task.priority}", clare=launcher)
    except (KeyError, ValueError) as err:  # a template from a peer's clare.toml, checked there only
        raise ClareError(f"the dispatch template cannot be filled in ({err}); fix [dispatch] template") from None
    return broadcast_text(re.sub(r"\n{3,}", "\n\n", text).strip())


def _run(argv: list[str], *, cwd: str | None = None) -> Any:
    """Run a helper program (git, systemd-run); the caller checks the return code."""
    import subprocess

    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(argv, -1, "", str(err))


def _first_line(p: Any) -> str:
    return ((p.stderr or p.stdout or "").strip().splitlines() or ["failed"])[0][:300]


def worktree_branch(task: Task) -> str:
    """Return the branch a task's worktree gets: clare/<short id>-<slug of the title>."""
    slug = "-".join(re.findall(r"[a-z0-9]+", task.title.lower()))[:WORKTREE_SLUG_CHARS].strip("-")
    return f"clare/{task.id[:SHORT_ID]}-{slug or 'task'}"


def make_worktree(folder: str, branch: str, *, dry_run: bool = False) -> str:
    """Make a git worktree and branch beside the repository holding `folder`; return the folder to work in.

    Refused with the reason when `folder` is not in a git repository or the branch exists; with
    `dry_run` only these checks run.
    """
    import shutil

    git = shutil.which("git") or "/usr/bin/git"
    top = _run([git, "-C", folder, "rev-parse", "--show-toplevel"])
    if top.returncode != 0:
        raise ClareError(f"{folder} is not a git repository, so --worktree cannot branch it; start without "
                         "--worktree, or run 'git init' there")
    root = top.stdout.strip()
    if _run([git, "-C", root, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"]).returncode == 0:
        raise ClareError(f"branch {branch} exists in {root}; delete it (git -C {root} branch -D {branch}) "
                         "or start without --worktree")
    path = os.path.join(os.path.dirname(root), f"{os.path.basename(root)}-{branch.removeprefix('clare/')}")
    if os.path.exists(path):
        raise ClareError(f"{path} exists already; move it away or start without --worktree")
    if dry_run:
        return path
    made = _run([git, "-C", root, "worktree", "add", "-b", branch, path])
    if made.returncode != 0:
        raise ClareError(f"git worktree add {path} failed: {_first_line(made)}")
    return os.path.normpath(os.path.join(path, os.path.relpath(os.path.realpath(folder), root)))


def _outside_unit(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """Wrap a command that may start the tmux server so that the server leaves this systemd unit's cgroup.

    A unit's stop kills its whole cgroup: a tmux server started from `clare serve` would take
    every Claude session with it. clare.service also sets KillMode=process for hosts without a user bus.
    """
    import shutil

    if env.get("INVOCATION_ID") and shutil.which("systemd-run"):
        return ["systemd-run", "--user", "--scope", "--quiet", "--collect", *argv]
    return argv


def open_window(session_name: str, cwd: str, argv: list[str], *, env: Mapping[str, str] | None = None
                ) -> tuple[str, str, str]:
    """Run argv in a new tmux window of session `session_name` (made when missing); return (socket, pane, target)."""
    env = os.environ if env is None else env
    socket = default_tmux_socket(env)
    os.makedirs(os.path.dirname(socket), mode=0o700, exist_ok=True)
    fmt = "#{pane_id}\t#{session_name}:#{window_index}.#{pane_index}"
    # tmux ends a command at an argument ";": no argv word here is one (paths, a uuid, a checked model name).
    p = run_tmux(socket, "new-window", "-d", "-t", f"={session_name}:", "-c", cwd, "-P", "-F", fmt, "--", *argv)
    if p.returncode != 0:
        new_session = [tmux_binary(), "-S", socket, "new-session", "-d", "-s", session_name,
                       "-x", "200", "-y", "50", "-c", cwd, "-P", "-F", fmt, "--", *argv]
        wrapped = _outside_unit(new_session, env)
        made = _run(wrapped)
        if made.returncode != 0 and wrapped != new_session and "duplicate session" not in (made.stderr or ""):
            made = _run(new_session)  # no user bus after all: KillMode=process in clare.service is the fallback
        if made.returncode != 0 and "duplicate session" in (made.stderr or ""):  # made meanwhile by another start
            made = run_tmux(socket, "new-window", "-d", "-t", f"={session_name}:", "-c", cwd, "-P", "-F", fmt,
                            "--", *argv)
        if made.returncode != 0:
            raise ClareError(f"tmux could not open a window in session {session_name}: {_first_line(made)}")
        p = made
    pane_id, _, target = p.stdout.strip().partition("\t")
    return socket, pane_id, target


def wait_until_ready(socket: str, pane_id: str, *, timeout_s: float = START_READY_S) -> tuple[str, str]:
    """Wait until the Claude in a new pane shows its composer and can be told to be Claude; return ("ready", "")
    or why not.

    A trust or onboarding screen is never answered: Enter there would decide for the user. The
    composer can show before Claude registers and renames its process (the native binary starts
    as claude.exe): until then nothing could be typed safely, so that is waited for too.
    """
    deadline = time.monotonic() + timeout_s
    screen = ""
    while True:
        pane = next((x for x in list_panes(socket) or () if x.pane_id == pane_id), None)
        if pane is None or pane.is_dead:
            last = " | ".join(line.strip() for line in screen.strip().splitlines()[-3:] if line.strip())
            said = f"; its screen said: {last[:300]}" if last else ""
            return "failed", f"Claude ended at once in pane {pane_id}{said}"
        screen = capture_pane(socket, pane_id) or ""
        if any(rule.search(screen) for rule in TRUST_SCREEN):
            name = pane.target.rpartition(":")[0]
            return "needs trust", (f"Claude asks whether to trust {pane.cwd} in pane {pane_id} ({pane.target}); Clare "
                                   f"never answers that: answer it in the pane (tmux attach -t {name}) and give "
                                   "Claude the task there, or trust the folder once (run claude in it) and start again")
        if any(rule.search(screen) for rule in ONBOARDING_SCREEN):
            return "needs trust", (f"Claude shows its first-run setup in pane {pane_id} ({pane.target}); Clare never "
                                   "answers it: finish it once by running claude in a terminal on this host")
        if not shows_permission_dialog(screen) and COMPOSER_SCREEN.search(screen) and _runs_claude(pane):
            return "ready", ""
        if time.monotonic() > deadline:
            return "failed", f"Claude showed no composer in pane {pane_id} within {timeout_s:.0f} s; look at it there"
        time.sleep(0.1)


def _runs_claude(pane: Pane) -> bool:
    procs, children = process_tree()
    return find_claude(pane.pid, children, proc_argv, registered=read_registry(claude_home(), procs)) is not None


def carry_out_pending(db: Db, *, config: dict[str, Any], now_ms: int) -> list[Order]:
    """Carry out the orders placed for this host that no one took yet, each once; expire the stale ones."""
    if not list_orders(db, pending_on=db.machine_id):
        return []
    done = []
    with _delivery_lock(db):  # one typist per host: a pull, a start and a broadcast never type at once
        for order in list_orders(db, pending_on=db.machine_id):  # again, now that no one else acts
            done.append(carry_out(db, order, config=config, now_ms=now_ms))
    return done


def carry_out(db: Db, order: Order, *, config: dict[str, Any], now_ms: int) -> Order:
    """Carry out one order of this host and record its receipt; claimed first, so a crash never repeats it."""
    if (_iso_to_ms(order.expires_at) or 0) < now_ms:
        return record_order_result(db, order.id, result="expired", reason=f"not carried out before {order.expires_at}",
                                   now_ms=now_ms)
    record_order_result(db, order.id, result="claimed", now_ms=now_ms)
    started = time.monotonic()
    try:
        result, reason, outcome = ORDER_HANDLERS[order.action](db, order, config)
    except ClareError as err:
        result, reason, outcome = "refused", str(err), {}
    return record_order_result(db, order.id, result=result, reason=reason, outcome=outcome,
                               now_ms=now_ms + int((time.monotonic() - started) * 1000))


def check_launch(db: Db, folder: str, *, config: dict[str, Any], branch: str | None = None) -> list[str]:
    """Check on this host what a start or resume needs; return Claude's argv. Raise the reason when it cannot.

    Run by the host before it acts, and before anything is recorded when the host is this one.
    """
    if not os.path.isdir(folder):
        raise ClareError(f"directory {folder} does not exist on host {db.machine_id}; create it, or fix the "
                         f"project's directory: clare project set PROJECT --dir {db.machine_id}:/PATH")
    argv = claude_argv(config)
    if branch is not None:
        make_worktree(folder, branch, dry_run=True)
    return argv


def _launch(db: Db, order: Order, config: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Start (or resume) Claude for an order in a new tmux window; for a start, type the task in."""
    folder = order.request["cwd"]
    task = get_task(db, order.task_id) if order.task_id else None
    outcome: dict[str, Any] = {}
    if order.action == "start" and order.request.get("is_worktree"):
        if task is None:
            raise ClareError("a worktree is named after a task, and this order has none")
        outcome["branch"] = worktree_branch(task)
    argv = check_launch(db, folder, config=config, branch=outcome.get("branch"))
    if outcome.get("branch"):
        folder = make_worktree(folder, outcome["branch"])
    # SECURITY: the order may come from a peer: its words become argv and a tmux target, checked here again.
    model = order.request.get("model")
    if model is not None and not (isinstance(model, str) and MODEL_RE.match(model)):
        raise ClareError(f"the order's model {str(model)[:40]!r} is not a model name")
    launcher = agent_launcher(db.path)
    argv += (["--session-id", order.session_id] if order.action == "start" else ["--resume", order.session_id])
    argv += ["--model", model] if model else []
    argv += ["--allowedTools", f"Bash({launcher} update:*)"]  # reporting never opens a permission dialog
    socket, pane_id, target = open_window(tmux_session_name(order.request["tmux_session"]), folder, argv)
    outcome |= {"tmux_socket": socket, "pane_id": pane_id, "tmux_target": target, "cwd": folder}
    state, reason = wait_until_ready(socket, pane_id)
    if state != "ready" or order.action != "start" or task is None:
        return ("started" if state == "ready" else state), reason, outcome
    session = Session(id=order.session_id, host=db.machine_id, cwd=folder, tmux_socket=socket, tmux_target=target,
                      pane_id=pane_id, pid=None, command="", state="waiting", state_at=None, last_activity_at=None,
                      label="", task_id=task.id, tokens={}, created_at="")  # not recorded yet: the pull after does
    template = order.request.get("template") or dispatch_settings(config)[0]  # a dispatched start: the dispatcher's
    result, why = deliver_text(db, session, first_prompt(task, launcher=launcher, template=template),
                               confirm_s=BROADCAST_CONFIRM_S)
    if result != "delivered":
        return "failed", f"Claude started in pane {pane_id} ({target}) but the task was not typed in: {why}", outcome
    return "started", "", outcome


def _stop(db: Db, order: Order, config: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """End a session: /exit typed while it waits, SIGTERM with --force; its pane goes only if Clare made it."""
    import signal

    session = get_session(db, order.session_id)
    if session.pane_id is None or session.tmux_socket is None:
        raise ClareError(f"session {session.id[:SHORT_ID]} does not run in a tmux pane here; stop it where it runs")
    pane = next((p for p in list_panes(session.tmux_socket) or () if p.pane_id == session.pane_id), None)
    if pane is None:
        raise ClareError(f"tmux pane {session.pane_id} is gone; the session ended already")
    procs, children = process_tree()
    registry = read_registry(claude_home(), procs)
    pid = find_claude(pane.pid, children, proc_argv, registered=registry)
    if pid is None:
        raise ClareError(f"pane {pane.pane_id} does not run Claude now; nothing to stop there")
    entry = registry.get(pid) or {}
    if entry.get("sessionId") not in (None, session.id):
        raise ClareError(f"pane {pane.pane_id} now runs another session ({entry['sessionId'][:SHORT_ID]})")
    outcome = {"pane_id": pane.pane_id, "tmux_target": pane.target, "pid": pid}
    if order.request.get("is_force"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        how = "SIGTERM"
    else:
        if entry.get("status") == "busy":
            raise ClareError(f"session {session.id[:SHORT_ID]} is working; stop it once it waits, or now with "
                             "--force (SIGTERM to Claude)")
        result, why = deliver_text(db, record_replace(session, state="waiting"), "/exit", confirm_s=STOP_WAIT_S,
                                   is_done=lambda: not _is_alive(pid, procs))
        if result != "delivered":
            return "failed", f"/exit was not taken: {why}", outcome
        how = "/exit"
    deadline = time.monotonic() + STOP_WAIT_S
    while _is_alive(pid, procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _is_alive(pid, procs):
        return "failed", f"Claude (pid {pid}) still runs {STOP_WAIT_S:.0f} s after {how}", outcome
    ours = any(o.action in ("start", "resume") and o.outcome.get("pane_id") == pane.pane_id
               and o.outcome.get("tmux_socket") == pane.socket for o in list_orders(db, session_id=session.id))
    if ours:
        run_tmux(pane.socket, "kill-pane", "-t", pane.pane_id)  # ours: nothing of the user's lives in it
    return "stopped", f"ended by {how}" + ("; its pane was closed" if ours else "; the pane is left as it was"), outcome


def _is_alive(pid: int, procs: dict[int, tuple[int, int]]) -> bool:
    """Tell whether a process still runs as the same process (a reused pid has another start time)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    rest = stat[stat.rfind(b")") + 2:].split()
    return rest[0] != b"Z" and int(rest[19]) == procs.get(pid, (0, int(rest[19])))[1]


def _type_task(db: Db, order: Order, config: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Type a dispatched task into its waiting session, after /clear when the order says; 'typed' once Claude has it."""
    session = get_session(db, order.session_id)
    task = get_task(db, order.task_id) if order.task_id else None
    if task is None or task.session_id != session.id or task.status == "done":
        raise ClareError("the task is no longer bound to this session (someone changed it meanwhile); not typed")
    if session.state not in ("waiting", "idle"):
        raise ClareError(f"session {session.id[:SHORT_ID]} no longer waits (it is {session.state} now); not typed")
    # SECURITY: the template may come from a peer: checked at the door, filled in with this host's launcher.
    text = first_prompt(task, launcher=agent_launcher(db.path), template=order.request.get("template"))
    outcome: dict[str, Any] = {"pane_id": session.pane_id, "tmux_target": session.tmux_target}
    if order.request.get("is_clear"):
        new_id, why = _clear(db, session)
        if new_id is None:
            return "failed", why, outcome
        session = record_replace(session, id=new_id, state="waiting")
        outcome["session_id"] = new_id  # the task followed it (the /clear hand-over)
    result, why = deliver_text(db, session, text, confirm_s=BROADCAST_CONFIRM_S)
    return ("typed" if result in ("delivered", "queued") else result), why, outcome


def _clear(db: Db, session: Session) -> tuple[str | None, str]:
    """Type /clear into a session and hand its tasks to the session id Claude goes on with; return that id."""
    pid, socket = session.pid, session.tmux_socket
    if pid is None or socket is None:
        return None, f"cannot tell which process runs session {session.id[:SHORT_ID]}; not clearing blind"

    def new_id() -> str | None:
        sid = (_registry_entry(pid) or {}).get("sessionId")
        return sid if isinstance(sid, str) and sid != session.id and UUID_RE.match(sid) else None

    result, why = deliver_text(db, session, "/clear", confirm_s=STOP_WAIT_S, is_done=lambda: new_id() is not None)
    successor = new_id()
    if result != "delivered" or successor is None:
        return None, f"/clear was not taken: {why or 'Claude went on under the same session id'}"
    pane = next((p for p in list_panes(socket) or () if p.pane_id == session.pane_id), None)
    if pane is not None:  # the new conversation's composer shows once Claude redrew: type into that, not before
        _wait_until(lambda: composer_text(_capture_styled(pane) or "") == "", timeout_s=STOP_WAIT_S)
    with write_txn(db) as cur:  # as a pull would on seeing the new id in the same process and pane
        if list_tasks(db, session_id=session.id, is_open=True):  # else the SessionStart hook handed them over
            _hand_over(db, cur, session.id, successor, now_ms=now_ms())
    return successor, ""


ORDER_HANDLERS: dict[str, Callable[[Db, Order, dict[str, Any]], tuple[str, str, dict[str, Any]]]] = {
    "start": _launch, "resume": _launch, "stop": _stop, "dispatch": _type_task}
DISPATCH_RETRY_MS = 60_000  # a session or task whose dispatch failed is left alone this long (no retry storm)
NO_DIR_DISPATCH = "it cannot start sessions until the project says where its code lives"  # said by CLI and page
_DISPATCH_SAID: dict[tuple[str, str], str] = {}  # (database, project id) -> the last warning given: said once


def dispatch_round(db: Db, *, config: dict[str, Any], now_ms: int, warnings: list[str] | None = None) -> list[Order]:
    """Feed the waiting sessions of the projects this host dispatches for, and start sessions up to their maximum.

    Runs in every pull of this host (serve's background loop, `clare pull`); only the project's
    dispatcher host acts, so one host decides. Orders for this host are carried out by the same pull.
    """
    projects = list_dispatched_projects(db, db.machine_id)
    if not projects:
        return []
    try:
        template, is_clear = dispatch_settings(config)
    except ClareError as err:  # a typo in clare.toml stops dispatch, never the pull
        if warnings is not None:
            warnings.append(f"dispatch is stopped: {err}")
        return []
    placed: list[Order] = []
    with _dispatch_lock(db):
        orders = list_recent_orders(db, since_at=iso_ms(now_ms - ORDER_TTL_MS))  # all that can still matter
        for project in projects:
            try:
                placed += _dispatch_project(db, project, orders, template=template, is_clear=is_clear, now_ms=now_ms)
                said = ""
            except ClareError as err:
                said = f"dispatch for project {project.name}: {err}"
            if said != _DISPATCH_SAID.get((db.path, project.id), "") and warnings is not None and said:
                warnings.append(said)
            _DISPATCH_SAID[(db.path, project.id)] = said
    return placed


@contextlib.contextmanager
def _dispatch_lock(db: Db) -> Iterator[None]:
    """Hold this database's dispatch lock: a CLI pull and serve's loop never decide at once (one task, one order)."""
    import fcntl

    with open(os.path.join(os.path.dirname(os.path.abspath(db.path)), "dispatch.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _dispatch_project(db: Db, project: Project, orders: list[Order], *, template: str, is_clear: bool,
                      now_ms: int) -> list[Order]:
    """Place the dispatches and starts one project needs now; a start that cannot be placed raises why."""
    now_at, retry_at = iso_ms(now_ms), iso_ms(now_ms - DISPATCH_RETRY_MS)
    in_flight = {o.session_id for o in orders if o.result in ("pending", "claimed") and o.expires_at > now_at}
    failed = [o for o in orders if o.request.get("is_dispatch") and o.result in ("refused", "failed", "expired")
              and o.updated_at > retry_at]
    sessions = {s.id: s for s in find_sessions(db, include_gone=False)}
    mine = [sessions[sid] for sid in list_project_session_ids(db, project.id) if sid in sessions]
    # Starts placed but not seen yet as sessions count too (one on another host is seen after a sync).
    n_starting = sum(1 for o in orders if o.action == "start" and o.task_id and o.expires_at > now_at
                     and o.result in ("pending", "claimed", "started", "needs trust")
                     and not find_sessions(db, prefix=o.session_id)
                     and any(t.project_id == project.id for t in find_tasks(db, o.task_id)))
    idle = sorted((s for s in mine if s.state in ("waiting", "idle") and s.task_id is None and s.id not in in_flight
                   and s.id not in {o.session_id for o in failed}), key=lambda s: (s.state_at or "", s.id))
    skip = {o.task_id for o in failed}
    ready = [t for t in list_ready_tasks(db, project_id=project.id) if t.id not in skip]
    placed = []
    for session, task in zip(idle, ready, strict=False):
        reason = (f"session {session.id[:SHORT_ID]} finished its task and waits; {task.id[:SHORT_ID]} is the next "
                  f"ready task of {project.name} (P{task.priority})")
        placed.append(place_dispatch(db, task.id, session, template=template, reason=reason, is_clear=is_clear,
                                     now_ms=now_ms))
    n_sessions = len(mine) + n_starting
    for task in ready[len(placed):]:
        if n_sessions >= project.max_sessions:
            break
        reason = (f"no session of {project.name} waits and {n_sessions} of at most {project.max_sessions} run; "
                  f"a new one for the next ready task {task.id[:SHORT_ID]} (P{task.priority})")
        placed.append(place_start(db, task.id, reason=reason, template=template, now_ms=now_ms))
        n_sessions += 1
    return placed





# ==========================================================================
# 7. Sync: the peer protocol, cursors per peer, and the client that pulls and pushes.
# ==========================================================================
# A puller asks a peer for the events it stored after receipt number N (the peer's rseq,
# never an HLC: an event relayed to the peer later can carry an older HLC) and keeps one
# cursor per peer log. Storing a page, merging the clock and advancing the cursor are one
# transaction, so a crash anywhere leaves either all of it or none. Pushing is the same
# walk over this host's own rseq; the receiver stores idempotently by uuid.

# Pages and batches are large because the puller stores each in one transaction, and a
# transaction of 1,000 events costs ~30% more per event than one of 5,000 (measured).
SYNC_PAGE_LIMIT = 5000  # events per pulled page at most
SYNC_PAGE_CHARS = 4 * 1024 * 1024  # ... and a page ends once its payloads pass this size
MAX_SYNC_BATCH = 5000  # events in one pushed batch at most; a larger batch is refused whole
PUSH_BATCH_EVENTS = 5000
PUSH_BATCH_BYTES = 4 * 1024 * 1024  # half the 8 MB body limit of the sync endpoints
MAX_FETCH_UUIDS = 5000  # uuids asked for in one anti-entropy fetch
DAY_MS = 86_400_000
PROGRESS_MIN_EVENTS = 2000  # a transfer larger than this shows a progress line
SYNC_INTERVAL_S = 30.0  # background sync: the pause between two good rounds with a peer
MAX_BACKOFF_S = 120.0  # ... and the longest pause after failed ones (x1.25 jitter: a heal waits 150 s at most)
CONTACT_POLL_S = 0.5  # how often a loop in backoff looks whether its peer contacted this server
PEERS_RELOAD_S = 1.0  # how often a running serve looks whether clare.toml changed (a stat: cheap)
PEER_HEADER = "X-Clare-Peer"  # the machine id of the Clare that sends a sync request
PEER_TIMEOUT_S = 20.0  # one HTTP request to a peer
PEEK_TIMEOUT_S = 3.0  # a peer's live pane or transcript view: a page waits this long at most
MAX_PEEK_BYTES = 256 * 1024  # ... and takes an answer this large at most
MAX_RESPONSE_BYTES = 512 * 1024 * 1024  # a peer answer larger than this is refused unread
HTTP_ERRORS: dict[int, type[ClareError]] = {403: Forbidden, 404: NotFound, 409: Conflict, 422: UsageError}
PEER_NAME_RE = lazy_re(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
ENV_NAME_RE = lazy_re(r"\A[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
PEER_URL_RE = lazy_re(r"\Ahttps?://[^\s/?#]+(/[^\s?#]*)?\Z")
DAY_RE = lazy_re(r"\A\d{4}-\d{2}-\d{2}\Z")

Progress = Callable[[str, int, int], None]  # (what moves, events moved, events to move)


@record_type(frozen=True, slots=True)
class Peer:
    name: str  # what people call it in `peer list` and `sync NAME`
    url: str  # where its `clare serve` answers, without a trailing slash
    token_env: str | None  # the variable that holds its token; None: CLARE_TOKEN or clare.toml's token

    def to_json(self) -> dict[str, Any]:
        """Return the peer as the JSON object the CLI prints."""
        return {"name": self.name, "url": self.url, "token_env": self.token_env}


@record_type(slots=True)
class SyncReport:
    """What one round with one peer moved; mutable because it fills while the round runs,
    so a round that fails half-way still says what it stored."""

    name: str
    url: str
    machine_id: str | None = None
    db_id: str | None = None
    n_pulled: int = 0  # events new to this host
    n_pushed: int = 0  # events new to the peer
    n_duplicates: int = 0  # events sent that the other side held already
    conflicts: list[str] = record_field(default_factory=list)  # same uuid, different content
    rejected: list[dict[str, Any]] = record_field(default_factory=list)  # malformed, with reasons
    deferred: list[dict[str, Any]] = record_field(default_factory=list)  # {uuid, reason}: held back, retried
    n_deferred_stored: int = 0  # events held back earlier that went through in this round
    n_behind: int | None = None  # the peer's events not pulled yet, at the end of the round
    peer_head: int | None = None  # the peer's newest receipt number, as its last answer said
    offset_ms: int | None = None  # the peer's wall clock minus ours
    verify: dict[str, Any] | None = None  # what the anti-entropy check found, with --verify

    @property
    def is_skewed(self) -> bool:
        """Say whether the peer's clock is further from ours than MAX_OFFSET_MS."""
        return self.offset_ms is not None and abs(self.offset_ms) > MAX_OFFSET_MS

    def to_json(self) -> dict[str, Any]:
        """Return the report as the JSON object the CLI and API print."""
        return {**{name: getattr(self, name) for name in self.__slots__}, "is_skewed": self.is_skewed}


class PeerTransport:
    """How this host reaches a peer's sync endpoints: HTTP for real, a function call in tests."""

    url: str

    def pull(self, *, after: int, limit: int) -> dict[str, Any]:
        """GET /api/v1/sync/events: the peer's events stored after receipt number `after`."""
        raise NotImplementedError

    def push(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /api/v1/sync/events: give the peer a batch of events."""
        raise NotImplementedError

    def digest(self) -> dict[str, Any]:
        """GET /api/v1/sync/days: the peer's event count and uuid hash per day."""
        raise NotImplementedError

    def day(self, day: str) -> dict[str, Any]:
        """GET /api/v1/sync/days/DAY: the uuids of the peer's events of one day."""
        raise NotImplementedError

    def fetch(self, uuids: list[str]) -> dict[str, Any]:
        """POST /api/v1/sync/fetch: the peer's events among these uuids."""
        raise NotImplementedError


# --- the serving side: what the sync endpoints call ------------------------------------

def sync_page(db: Db, *, after: object, limit: object = SYNC_PAGE_LIMIT, now_ms: int) -> dict[str, Any]:
    """Return the events stored after receipt number `after`: GET /api/v1/sync/events."""
    after = _check_count("after", after)
    limit = min(max(_check_count("limit", limit), 1), SYNC_PAGE_LIMIT)
    with read_txn(db):  # the db_id names the log the page comes from, even if a restore runs meanwhile
        db_id = db.db_id
        events = list_events_after(db, after=after, limit=limit, max_chars=SYNC_PAGE_CHARS)
        next_after = events[-1].rseq if events else after
        head = head_rseq(db.conn)
    if events:
        note_served(db, db_id, next_after)  # before the peer's cursor can reach it
    return {"machine_id": db.machine_id, "db_id": db_id, "now_ms": now_ms,
            "events": [ev.to_json() for ev in events], "next_after": next_after,
            "has_more": next_after < head, "head": head}


def _check_count(what: str, value: object) -> int:
    # SECURITY: query parameters and JSON numbers from a peer.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ClareError(f"{what} must be a whole number from 0 up, not {str(value)[:40]!r}")
    return value


def sync_accept(db: Db, body: object, *, now_ms: int) -> dict[str, Any]:
    """Store a batch of events a peer pushed: POST /api/v1/sync/events.

    A batch of the wrong shape or size is refused whole; a malformed event is refused with
    its reason and the good ones of the batch are kept. Sending a batch twice stores it once.
    """
    # SECURITY: everything in body comes from the network.
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        raise ClareError('a sync batch must be a JSON object with an "events" list; '
                         'send {"events": [...]} as the body')
    if len(body["events"]) > MAX_SYNC_BATCH:
        raise ClareError(f"a sync batch holds {len(body['events'])} events, over the limit of {MAX_SYNC_BATCH}; "
                         "send smaller batches")
    sender = (body.get("machine_id"), body.get("db_id"))
    if all(isinstance(v, str) for v in sender):
        check_peer_identity(db, sender, where="the sending peer")  # type: ignore[arg-type]
    good, rejected = check_events(body["events"])
    good, future = split_future(good, now_ms=now_ms)
    with write_txn(db) as cur:
        db_id = get_meta(cur, "db_id") or ""  # in the transaction: the log the batch went into
        head_before = head_rseq(cur)
        result = receive_events(db, cur, good, now_ms=now_ms)
        head_after = head_rseq(cur)
    note_served(db, db_id, head_after)  # the pusher may set its pull cursor to head_after
    # head_before/head_after let a sender that had pulled up to head_before skip pulling its
    # own events back: nothing else can be stored inside this transaction.
    return {"machine_id": db.machine_id, "db_id": db_id, "now_ms": now_ms,
            "accepted": len(result.inserted), "duplicates": result.n_duplicates, "rejected": rejected,
            "conflicts": result.conflicts, "head_before": head_before, "head_after": head_after,
            "deferred": [{"uuid": ev.uuid, "reason": reason} for ev, reason in future]}


def split_future(events: list[Event], *, now_ms: int) -> tuple[list[Event], list[tuple[Event, str]]]:
    """Split received events into those to store and those stamped beyond now + MAX_OFFSET_MS, with a reason.

    An event from a clock that runs ahead would win every last-writer-wins conflict until real
    time passed it (one stamped in 2286 would freeze its fields for good); held back instead, it
    is stored once real time comes within MAX_OFFSET_MS of its stamp.
    """
    bound = now_ms + MAX_OFFSET_MS
    good, future = [], []
    for ev in events:
        wall = int(ev.hlc[:13])
        if wall <= bound:
            good.append(ev)
        else:
            future.append((ev, f"stamped {iso_ms(wall)}, {_duration(wall - now_ms)} ahead of this host's clock "
                               f"(over the {MAX_OFFSET_MS // 60000} min allowed): held back, stored once within it"))
    return good, future


def check_events(items: list[object]) -> tuple[list[Event], list[dict[str, Any]]]:
    """Split events from outside into the valid ones and {index, uuid, reason} for the others."""
    good, rejected = [], []
    for index, obj in enumerate(items):
        try:
            good.append(check_received(obj))
        except ClareError as err:
            uid = obj.get("uuid") if isinstance(obj, dict) else None
            rejected.append({"index": index, "uuid": uid[:60] if isinstance(uid, str) else None,
                             "reason": str(err)})
    return good, rejected


def sync_digest(db: Db, *, now_ms: int) -> dict[str, Any]:
    """Return the count and a hash of the uuids of the events of each day: GET /api/v1/sync/days.

    Days come from the HLC, which is part of the event, so two hosts holding the same
    events give the same digest; the (hlc, uuid) order makes the hash independent of arrival.
    """
    import hashlib  # see event_hash: read-only commands never load it

    days: dict[str, dict[str, Any]] = {}
    day, n_events, h = None, 0, hashlib.sha256()
    for hlc, uid in iter_event_keys(db):
        d = int(hlc[:13]) // DAY_MS
        if d != day:
            if day is not None:
                days[_day_name(day)] = {"n": n_events, "hash": h.hexdigest()}
            day, n_events, h = d, 0, hashlib.sha256()
        n_events += 1
        h.update(uid.encode())
    if day is not None:
        days[_day_name(day)] = {"n": n_events, "hash": h.hexdigest()}
    return {"machine_id": db.machine_id, "db_id": db.db_id, "now_ms": now_ms, "days": days}


def _day_name(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))


def sync_day(db: Db, day: str, *, now_ms: int) -> dict[str, Any]:
    """Return the uuids of the events of one UTC day (by HLC): GET /api/v1/sync/days/DAY."""
    import calendar  # only anti-entropy needs it

    # SECURITY: the day comes from the URL.
    try:
        if not isinstance(day, str) or not DAY_RE.match(day):
            raise ValueError(day)
        start_ms = calendar.timegm(time.strptime(day, "%Y-%m-%d")) * 1000
    except ValueError as err:
        raise ClareError(f"bad day {str(day)[:20]!r}; give a date as YYYY-MM-DD") from err
    return {"machine_id": db.machine_id, "db_id": db.db_id, "now_ms": now_ms, "day": day,
            "uuids": list_uuids_between(db, start_ms=start_ms, end_ms=start_ms + DAY_MS)}


def sync_fetch(db: Db, body: object, *, now_ms: int) -> dict[str, Any]:
    """Return the stored events among the uuids asked for: POST /api/v1/sync/fetch."""
    # SECURITY: everything in body comes from the network.
    uuids = body.get("uuids") if isinstance(body, dict) else None
    if not isinstance(uuids, list) or not all(isinstance(u, str) and UUID_RE.match(u) for u in uuids):
        raise ClareError('a fetch must be a JSON object with a "uuids" list of event uuids')
    if len(uuids) > MAX_FETCH_UUIDS:
        raise ClareError(f"a fetch asks for {len(uuids)} events, over the limit of {MAX_FETCH_UUIDS}; "
                         "ask in smaller parts")
    return {"machine_id": db.machine_id, "db_id": db.db_id, "now_ms": now_ms,
            "events": [ev.to_json() for ev in get_events_by_uuid(db, uuids)]}


# --- the pulling and pushing side --------------------------------------------------------

def sync_with(db: Db, peer: PeerTransport, *, name: str, wall: Callable[[], int] = now_ms,
              progress: Progress | None = None, verify: bool = False) -> SyncReport:
    """Run one round with one peer (pull, push, and with `verify` anti-entropy); record how it went.

    A failure is recorded in the peer's status and raised again for the caller's loop.
    """
    report = SyncReport(name=name, url=peer.url)
    try:
        pull_from(db, peer, report, wall=wall, progress=progress)
        push_to(db, peer, report, wall=wall, progress=progress)
        retry_deferred(db, peer, report, wall=wall)
        if verify:
            verify_with(db, peer, report, wall=wall)
    except ClareError as err:
        save_peer_status(db, peer.url, name=name, now_ms=wall(), error=str(err),
                         n_pulled=report.n_pulled, n_pushed=report.n_pushed)
        raise
    save_peer_status(db, peer.url, name=name, now_ms=wall(), machine_id=report.machine_id, db_id=report.db_id,
                     n_behind=report.n_behind, offset_ms=report.offset_ms,
                     n_pulled=report.n_pulled, n_pushed=report.n_pushed, peer_head=report.peer_head)
    return report


def pull_from(db: Db, peer: PeerTransport, report: SyncReport, *, wall: Callable[[], int] = now_ms,
              progress: Progress | None = None) -> None:
    """Store every event the peer holds past our cursor on its log, a page per transaction."""
    known = {s.url: (s.machine_id, s.db_id) for s in list_peer_status(db) if s.machine_id and s.db_id}.get(peer.url)
    after = get_cursor(db, *known)[0] if known else 0
    total, n_restarts = None, 0
    while True:
        page = _call_timed(peer.pull, report, wall, after=after, limit=SYNC_PAGE_LIMIT)
        identity, head, next_after = _check_page(page, after=after)
        check_peer_identity(db, identity, where=peer.url)
        if identity != known:  # first contact, or the peer was restored (new db_id) or replaced
            known, n_restarts = identity, n_restarts + 1
            if n_restarts > 3:
                raise ClareError(f"{peer.url} answers as a different Clare at every request; point the peer's "
                                 "url at one host, not at a load balancer")
            if get_cursor(db, *identity)[0] != after:
                after = get_cursor(db, *identity)[0]
                continue
        if head < after:
            # The peer's log is shorter than what we read of it: restored without a new db_id.
            with write_txn(db) as cur:
                save_cursor(cur, *identity, pulled_rseq=0, reset=True)
            after = 0
            continue
        report.machine_id, report.db_id = identity
        report.peer_head = head
        total = head - after if total is None else total
        events, rejected = check_events(page["events"])
        report.rejected += rejected
        if not page["events"] and next_after == after:
            report.n_behind = head - after
            return  # nothing new: no transaction at all
        now = wall()
        events, future = split_future(events, now_ms=now)
        with write_txn(db) as cur:
            head_before = head_rseq(cur)
            result = receive_events(db, cur, events, now_ms=now)
            save_deferred(cur, peer.url, "pull", future, now_ms=now)  # the cursor moves on: they are fetched by uuid
            save_cursor(cur, *identity, pulled_rseq=next_after)
            if get_cursor(db, *identity)[1] == head_before:
                # The peer held all of ours before this page, and the page is all that was
                # stored since: it need not be pushed back.
                save_cursor(cur, *identity, pushed_rseq=head_rseq(cur))
        report.n_pulled += len(result.inserted)
        report.n_duplicates += result.n_duplicates
        report.conflicts += result.conflicts
        report.deferred += [{"uuid": ev.uuid, "reason": reason} for ev, reason in future]
        report.n_behind = head - next_after
        if progress and total > PROGRESS_MIN_EVENTS:
            progress("pulled", max(total - report.n_behind, 0), total)
        if not page["has_more"]:
            return
        after = next_after


def retry_deferred(db: Db, peer: PeerTransport, report: SyncReport, *, wall: Callable[[], int] = now_ms) -> None:
    """Fetch by uuid the peer's events held back here, and send again ours it held back, once within the bound."""
    now = wall()
    wanted = [d.uuid for d in list_deferred(db, peer_url=peer.url, direction="pull", max_wall_ms=now + MAX_OFFSET_MS)]
    for i in range(0, len(wanted), MAX_FETCH_UUIDS):
        asked = wanted[i:i + MAX_FETCH_UUIDS]
        events, rejected = check_events(_answer_field(peer.fetch(asked), "events", list))
        report.rejected += rejected
        is_asked = set(asked).__contains__
        events, _ = split_future([ev for ev in events if is_asked(ev.uuid)], now_ms=now)  # still ahead: stays
        with write_txn(db) as cur:
            result = receive_events(db, cur, events, now_ms=now)
            drop_deferred(cur, peer.url, "pull", [ev.uuid for ev in events])
        report.n_pulled += len(result.inserted)
        report.n_deferred_stored += len(result.inserted)
    if report.machine_id is None or report.db_id is None:
        raise ClareError("retry before pull: the peer's identity is not known yet")
    identity = (report.machine_id, report.db_id)
    # The peer's clock decides there: an event is sent again once within the bound by the peer's offset.
    their_now = now + (report.offset_ms or 0)
    ours = [d.uuid for d in list_deferred(db, peer_url=peer.url, direction="push",
                                          max_wall_ms=their_now + MAX_OFFSET_MS)]
    for batch in _batches(get_events_by_uuid(db, ours)):
        answer = peer.push({"machine_id": db.machine_id, "db_id": db.db_id, "now_ms": wall(),
                            "events": [ev.to_json() for ev in batch]})
        before = report.n_pushed
        held = _count_accept(answer, identity, report)
        report.deferred = [d for d in report.deferred if d["uuid"] not in held]  # still held: not news
        with write_txn(db) as cur:
            drop_deferred(cur, peer.url, "push", [ev.uuid for ev in batch if ev.uuid not in held])
        report.n_deferred_stored += report.n_pushed - before


def check_peer_identity(db: Db, identity: tuple[str, str], *, where: str) -> None:
    """Refuse a peer that presents this host's own machine id: this very database, or a copy of it."""
    machine_id, db_id = identity
    if machine_id != db.machine_id:
        return
    if db_id == db.db_id:
        raise Conflict(f"{where} is this very database (machine id {machine_id}): remove it from the peers in "
                       "clare.toml; if it is another host, it is a copy of this one: run there clare init --new-id")
    raise Conflict(f"{where} presents this host's own machine id {machine_id} with another db id: one of the two "
                   "databases is a copy of the other; on the copy run: clare init --new-id")


def _check_page(page: object, *, after: int) -> tuple[tuple[str, str], int, int]:
    """Return the identity, head and next cursor of a pulled page; raise if it is malformed."""
    # SECURITY: the whole page comes from the network.
    try:
        if not (isinstance(page, dict) and isinstance(page.get("events"), list)
                and isinstance(page.get("has_more"), bool) and len(page["events"]) <= MAX_SYNC_BATCH):
            raise ClareError("no events list")
        identity = _check_identity(page)
        head = _check_count("head", page.get("head"))
        next_after = _check_count("next_after", page.get("next_after"))
    except ClareError as err:
        raise ClareError(f"the peer sent a malformed page ({err}); is it a Clare of this version?") from err
    is_stuck = page["has_more"] and next_after <= after
    if is_stuck or (head >= after and not after <= next_after <= head):
        raise ClareError(f"the peer sent a page that does not advance (after {after}, next {next_after}, "
                         f"head {head}); report this bug with both versions")
    return identity, head, next_after


def _check_identity(answer: dict[str, Any]) -> tuple[str, str]:
    machine_id, db_id = answer.get("machine_id"), answer.get("db_id")
    if not isinstance(machine_id, str) or not MACHINE_ID_RE.match(machine_id) or not isinstance(db_id, str) \
            or not 0 < len(db_id) <= 64:
        raise ClareError("bad machine_id or db_id")
    return machine_id, db_id


def _call_timed(call: Callable[..., dict[str, Any]], report: SyncReport, wall: Callable[[], int],
                *args: Any, **kw: Any) -> dict[str, Any]:
    """Call the peer and note its clock offset from the answer's now_ms (at the round trip's middle)."""
    sent_ms = wall()
    answer = call(*args, **kw)
    received_ms = wall()
    if isinstance(answer, dict) and isinstance(answer.get("now_ms"), int):
        report.offset_ms = answer["now_ms"] - (sent_ms + received_ms) // 2
    return answer


def push_to(db: Db, peer: PeerTransport, report: SyncReport, *, wall: Callable[[], int] = now_ms,
            progress: Progress | None = None) -> None:
    """Send the peer every event of ours past its push cursor, a batch per request."""
    if report.machine_id is None or report.db_id is None:
        raise ClareError("push before pull: the peer's identity is not known yet")
    identity = (report.machine_id, report.db_id)
    pushed = get_cursor(db, *identity)[1]
    total, moved = head_rseq(db.conn) - pushed, 0
    for batch in _batches(iter_events(db, after=pushed)):
        answer = _call_timed(peer.push, report, wall, {
            "machine_id": db.machine_id, "db_id": db.db_id, "now_ms": wall(),
            "events": [ev.to_json() for ev in batch]})
        held = _count_accept(answer, identity, report)
        report.peer_head = max(report.peer_head or 0, answer["head_after"])
        with write_txn(db) as cur:
            save_deferred(cur, peer.url, "push", [(ev, held[ev.uuid]) for ev in batch if ev.uuid in held],
                          now_ms=wall())
            save_cursor(cur, *identity, pushed_rseq=batch[-1].rseq)
            if get_cursor(db, *identity)[0] == answer["head_before"]:
                save_cursor(cur, *identity, pulled_rseq=answer["head_after"])  # our own events: no need to pull back
        moved += len(batch)
        if progress and total > PROGRESS_MIN_EVENTS:
            progress("pushed", moved, total)


def _batches(events: Iterable[Event]) -> Iterator[list[Event]]:
    """Group events into batches under PUSH_BATCH_EVENTS and PUSH_BATCH_BYTES."""
    batch: list[Event] = []
    n_bytes = 0
    for ev in events:
        # Bytes, not characters: a payload of CJK text is three times longer in UTF-8.
        size = len(canonical_json(ev.payload).encode()) + 300  # the payload dominates; 300 covers the rest
        if batch and (len(batch) == PUSH_BATCH_EVENTS or n_bytes + size > PUSH_BATCH_BYTES):
            yield batch
            batch, n_bytes = [], 0
        batch.append(ev)
        n_bytes += size
    if batch:
        yield batch


def _count_accept(answer: object, identity: tuple[str, str], report: SyncReport) -> dict[str, str]:
    """Check the answer to a push and add what it says to the report; return the held back uuids and why."""
    # SECURITY: the answer comes from the network.
    try:
        if not isinstance(answer, dict):
            raise ClareError("not an object")
        if _check_identity(answer) != identity:
            raise ClareError(f"it answers as {answer['machine_id']} {answer['db_id']}, not as {identity[0]} "
                             f"{identity[1]}: another Clare now answers at that address; sync again")
        counts = [_check_count(k, answer.get(k)) for k in ("accepted", "duplicates", "head_before", "head_after")]
        if not isinstance(answer.get("rejected"), list) or not isinstance(answer.get("conflicts"), list):
            raise ClareError("no rejected or conflicts list")
    except ClareError as err:
        raise ClareError(f"the peer's answer to a push is malformed ({err})") from err
    report.n_pushed += counts[0]
    report.n_duplicates += counts[1]
    report.rejected += answer["rejected"]
    report.conflicts += [c for c in answer["conflicts"] if isinstance(c, str)]
    # COMPAT: a peer of before the clock bound sends no "deferred" list.
    held = {d["uuid"]: str(d.get("reason"))[:300] for d in answer.get("deferred", [])
            if isinstance(answer.get("deferred"), list) and isinstance(d, dict) and isinstance(d.get("uuid"), str)
            and UUID_RE.match(d["uuid"])}
    report.deferred += [{"uuid": u, "reason": r} for u, r in held.items()]
    return held


def verify_with(db: Db, peer: PeerTransport, report: SyncReport, *, wall: Callable[[], int] = now_ms) -> None:
    """Compare per-day digests with the peer; fetch what we lack by uuid and push what it lacks."""
    theirs = _answer_field(_call_timed(peer.digest, report, wall), "days", dict)
    ours = sync_digest(db, now_ms=wall())["days"]
    # A day that starts beyond now + MAX_OFFSET_MS holds only events that would be held back: not compared.
    last_day = _day_name((wall() + MAX_OFFSET_MS) // DAY_MS)
    days = sorted(d for d in set(theirs) | set(ours)
                  if theirs.get(d) != ours.get(d) and DAY_RE.match(d) and d <= last_day)
    if report.machine_id is None or report.db_id is None:
        raise ClareError("verify before pull: the peer's identity is not known yet")
    identity = (report.machine_id, report.db_id)
    found: dict[str, Any] = {"days": len(set(theirs) | set(ours)), "days_differ": days, "fetched": 0, "sent": 0}
    for day in days:
        their_uuids = {u for u in _answer_field(peer.day(day), "uuids", list) if isinstance(u, str)} \
            if day in theirs else set()
        our_uuids = set(sync_day(db, day, now_ms=wall())["uuids"]) if day in ours else set()
        missing_here = sorted(their_uuids - our_uuids)
        for i in range(0, len(missing_here), MAX_FETCH_UUIDS):
            events, rejected = check_events(_answer_field(peer.fetch(missing_here[i:i + MAX_FETCH_UUIDS]),
                                                          "events", list))
            report.rejected += rejected
            now = wall()
            events, future = split_future(events, now_ms=now)
            report.deferred += [{"uuid": ev.uuid, "reason": reason} for ev, reason in future]
            with write_txn(db) as cur:
                result = receive_events(db, cur, events, now_ms=now)
                save_deferred(cur, peer.url, "pull", future, now_ms=now)
            found["fetched"] += len(result.inserted)
            report.n_pulled += len(result.inserted)
        for batch in _batches(get_events_by_uuid(db, sorted(our_uuids - their_uuids))):
            answer = peer.push({"machine_id": db.machine_id, "db_id": db.db_id, "now_ms": wall(),
                                "events": [ev.to_json() for ev in batch]})
            before = report.n_pushed
            held = _count_accept(answer, identity, report)
            if held:
                with write_txn(db) as cur:
                    save_deferred(cur, peer.url, "push", [(ev, held[ev.uuid]) for ev in batch if ev.uuid in held],
                                  now_ms=wall())
            found["sent"] += report.n_pushed - before
    report.verify = found


def _answer_field(answer: object, key: str, kind: type) -> Any:
    """Return one field of a peer's answer if it has the expected type; raise naming it otherwise."""
    # SECURITY: the answer comes from the network.
    value = answer.get(key) if isinstance(answer, dict) else None
    if not isinstance(value, kind):
        raise ClareError(f"the peer's answer lacks a {kind.__name__} {key!r}; is it a Clare of this version?")
    return value


# --- peers: clare.toml, the HTTP client, the background loop -------------------------------

class HttpPeer(PeerTransport):
    """A peer's sync endpoints over HTTP; urllib is imported on the first request."""

    def __init__(self, url: str, *, token: str | None, timeout_s: float = PEER_TIMEOUT_S,
                 machine_id: str | None = None):
        self.url = url.rstrip("/")
        self.token = token  # never printed: messages name the variable instead
        self.timeout_s = timeout_s
        self.machine_id = machine_id  # sent as PEER_HEADER: the peer then ends its backoff toward us

    def pull(self, *, after: int, limit: int) -> dict[str, Any]:
        """GET /api/v1/sync/events."""
        return self._call("GET", f"/api/v1/sync/events?after={after}&limit={limit}")

    def push(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /api/v1/sync/events."""
        return self._call("POST", "/api/v1/sync/events", body)

    def digest(self) -> dict[str, Any]:
        """GET /api/v1/sync/days."""
        return self._call("GET", "/api/v1/sync/days")

    def day(self, day: str) -> dict[str, Any]:
        """GET /api/v1/sync/days/DAY."""
        return self._call("GET", f"/api/v1/sync/days/{day}")

    def fetch(self, uuids: list[str]) -> dict[str, Any]:
        """POST /api/v1/sync/fetch."""
        return self._call("POST", "/api/v1/sync/fetch", {"uuids": uuids})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return http_json(self.url, path, method=method, body=body, token=self.token, timeout_s=self.timeout_s,
                         hint_401="set the peer's token: token_env in clare.toml, or CLARE_TOKEN",
                         headers={PEER_HEADER: self.machine_id} if self.machine_id else None)


def http_json(base: str, path: str, *, method: str = "GET", body: Any = None, token: str | None = None,
              timeout_s: float = PEER_TIMEOUT_S, hint_401: str = "", say_where: bool = True,
              max_bytes: int = MAX_RESPONSE_BYTES, headers: dict[str, str] | None = None) -> Any:
    """Send one JSON request to a Clare server, never through a proxy, and return its decoded answer.

    Every failure is one ClareError line: unreachable, truncated, too large or not JSON; an error status
    raises the class of HTTP_ERRORS with the server's message (after "BASE answered N to METHOD PATH: "
    when `say_where`). The token is never part of a message.
    """
    import http.client
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    headers = {"Accept": "application/json", "User-Agent": f"clare/{__version__}", **(headers or {})}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    # SECURITY: Clare servers are reached directly: an http_proxy meant for the internet must never see the
    # bearer token or fleet traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            raw = response.read(max_bytes + 1)
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) != len(raw) and len(raw) <= max_bytes:
                raise http.client.IncompleteRead(raw, int(length) - len(raw))  # read(n) returns a cut body as is
    except urllib.error.HTTPError as err:
        said = _error_body_message(err)
        message = said if said is not None and not say_where else \
            f"{base} answered {err.code} to {method} {path.split('?')[0]}: {said or err.reason}"
        if err.code == 401 and hint_401:
            message += f" ({hint_401})"
        if err.code == 413:
            message += " (the server takes smaller bodies than this Clare sends: run one Clare version on both)"
        raise HTTP_ERRORS.get(err.code, ClareError)(message[:600]) from err
    except http.client.HTTPException as err:  # SECURITY: a garbled status line, a body cut short
        said = " ".join(str(err).split())[:100]  # a garbled status line may hold any bytes, newlines too
        raise ClareError(f"{base} broke off or garbled its answer ({type(err).__name__}: {said}); "
                         "is it a Clare, and is it still running?") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        if data is not None and isinstance(reason, (BrokenPipeError, ConnectionResetError)):
            raise ClareError(f"{base} cut the connection while {method} {path} sent {len(data)} bytes; "
                             "it may refuse bodies that large (413): run one Clare version on both") from err
        raise ClareError(f"cannot reach {base} ({str(reason)[:200]}); check that 'clare serve' runs there "
                         "and that the address is right") from err
    if len(raw) > max_bytes:
        raise ClareError(f"{base} sent more than {max_bytes} bytes; is it a Clare?")
    try:
        return json.loads(raw or b"null")  # a 204 has no body
    except (ValueError, RecursionError) as err:  # SECURITY: a server may nest '[' deeper than the stack
        raise ClareError(f"{base} sent something that is not JSON ({str(err)[:100]}); is it a Clare?") from err


def _error_body_message(err: Any) -> str | None:
    """Return the message of a Clare error body (`{"error": {"message": ...}}`), or None for any other body."""
    import http.client

    try:
        return str(json.loads(err.read(64 * 1024))["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError, RecursionError, OSError, http.client.HTTPException):
        return None


def load_peers(config: dict[str, Any], *, path: str = "clare.toml") -> list[Peer]:
    """Return the peers of clare.toml's [[peers]] tables; raise naming a bad entry."""
    entries = config.get("peers", [])
    if not isinstance(entries, list):
        raise ClareError(f"{path}: 'peers' must be [[peers]] tables with name and url")
    peers = []
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ClareError(f"{path}: peer {n} is not a table; write it as [[peers]] with name = and url =")
        try:
            peers.append(check_peer(entry.get("url"), name=entry.get("name"), token_env=entry.get("token_env")))
        except ClareError as err:
            raise ClareError(f"{path}: peer {n}: {err}") from err
    return peers


def check_peer(url: object, *, name: object = None, token_env: object = None) -> Peer:
    """Return a Peer from raw values, its name taken from the URL's host when not given."""
    if not isinstance(url, str) or not PEER_URL_RE.match(url) or not _has_host_and_port(url):
        raise UsageError(f"peer url {str(url)[:80]!r} is not an http:// or https:// address; "
                         "give one like http://10.9.0.2:8765")
    url = url.rstrip("/")
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", url.split("://", 1)[1].split("/")[0]).strip("-.")
    if not isinstance(name, str) or not PEER_NAME_RE.match(name):
        raise UsageError(f"peer name {str(name)[:80]!r} is not 1-63 letters, digits, '.', '_' or '-'")
    if token_env is not None and (not isinstance(token_env, str) or not ENV_NAME_RE.match(token_env)):
        raise UsageError(f"token_env {str(token_env)[:80]!r} is not an environment variable name")
    return Peer(name, url, token_env)


def _has_host_and_port(url: str) -> bool:
    from urllib.parse import urlsplit  # urllib.parse alone is light; only sync and peer verbs get here

    try:
        parts = urlsplit(url)
        return bool(parts.hostname) and (parts.port is None or 0 < parts.port)
    except ValueError:  # an unclosed IPv6 bracket, a port out of range
        return False


def add_peer(path: str, url: str, *, name: str | None = None, token_env: str | None = None) -> Peer:
    """Append a [[peers]] table to clare.toml; refuse a name or url configured already."""
    peers = load_peers(load_config(path), path=path)
    peer = check_peer(url, name=name, token_env=token_env)
    for other in peers:
        if other.name == peer.name or other.url == peer.url:
            raise Conflict(f"peer {other.name} ({other.url}) is configured already; pick another --name, "
                           f"or edit {path}")
    # json.dumps of these validated strings is a valid TOML basic string.
    lines = ["[[peers]]", f"name = {json.dumps(peer.name)}", f"url = {json.dumps(peer.url)}"]
    if peer.token_env:
        lines.append(f"token_env = {json.dumps(peer.token_env)}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    write_private(path, text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "")
                  + "\n".join(lines) + "\n")
    return peer


def remove_peer(path: str, ref: str) -> Peer:
    """Remove one [[peers]] table (by name or url) from clare.toml, keeping every other line and comment."""
    config = load_config(path)
    peers = load_peers(config, path=path)
    index = next((i for i, p in enumerate(peers) if ref in (p.name, p.url, p.url + "/")), None)
    if index is None:
        names = ", ".join(p.name for p in peers) or "none"
        raise NotFound(f"no peer named {ref!r} in {path}; the peers are: {names}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    headers = [i for i, line in enumerate(lines) if _PEERS_HEADER_RE.match(line)]
    text = None
    if len(headers) == len(peers):  # else peers is written another way (an inline array): not edited here
        start = headers[index]
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        # Comments just above the next table are about that table: they stay; blank lines go with the peer.
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        while end < len(lines) and not lines[end].strip():
            end += 1
        text = "".join(lines[:start] + lines[end:])
    import tomllib

    expected = {**config, "peers": config["peers"][:index] + config["peers"][index + 1:]}
    if not expected["peers"]:
        del expected["peers"]
    if text is None or tomllib.loads(text) != expected:
        raise ClareError(f"cannot remove peer {peers[index].name} from {path} without touching other settings; "
                         "delete its [[peers]] table there by hand")
    write_private(path, text)  # clare.toml may hold a token: private, whatever its mode was
    return peers[index]


_PEERS_HEADER_RE = lazy_re(r"\A\s*\[\[\s*peers\s*\]\]\s*(#.*)?\Z", re.S)


def find_peer(peers: list[Peer], ref: str) -> Peer:
    """Return the configured peer named `ref` or at URL `ref`; a URL not configured is a new peer."""
    for peer in peers:
        if ref in (peer.name, peer.url, peer.url + "/"):
            return peer
    if "://" in ref:
        return check_peer(ref)
    raise NotFound(f"no peer named {ref!r}; list them with: clare peer list (or give its URL)")


def peer_token(peer: Peer, config: dict[str, Any], *, env: Mapping[str, str] | None = None) -> str | None:
    """Return the token to send to a peer: its token_env variable, else CLARE_TOKEN, else clare.toml's token."""
    env = os.environ if env is None else env
    if peer.token_env:
        token = env.get(peer.token_env)
        if not token:
            raise ClareError(f"the variable {peer.token_env} is not set; export the token of {peer.name} in it")
        return check_token(token, where=f"${peer.token_env}")
    return resolve_token(config, env=env)


# --- discovery: each host announces where its serve answers; the others offer it ----------------

def announce_host(db: Db, url: str, *, token: str | None, now_ms: int) -> Event | None:
    """Record where this host's serve answers (host.announced), unless the log says so already.

    With the announcement goes a fingerprint of the token, so that a host that learns of this
    one can tell whether the fleet shares one token before it ever sends its own there.
    """
    url = check_peer(url).url
    fp = token_fingerprint(token, machine_id=db.machine_id) if token else None
    said = next((h for h in list_announced_hosts(db) if h.host == db.machine_id), None)
    name = machine_host_name(db.machine_id)  # the host name it was set up under, as everywhere in Clare
    if said is not None and (said.name, said.url, said.token_fp) == (name, url, fp):
        return None  # a restart writes nothing: the log does not grow with restarts
    with write_txn(db) as cur:
        return record(db, cur, "host.announced", {"host": db.machine_id, "name": name, "url": url,
                                                  "token_fp": fp}, now_ms=now_ms)


def list_suggested_peers(db: Db, peers: Sequence[Peer], *, token: str | None) -> list[dict[str, Any]]:
    """Return the hosts announced in the log that are not peers here yet, and whether they take this host's token.

    is_token_shared: True when the host announced the fingerprint of this host's own token,
    False when another, None when it announced none or this host has no token.
    """
    status = {s.url: s.machine_id for s in list_peer_status(db)}
    peer_hosts = {status.get(p.url) for p in peers}
    urls, names = {p.url for p in peers}, {p.name for p in peers}
    rows = []
    for h in list_announced_hosts(db):
        if h.host == db.machine_id or h.host in peer_hosts:
            continue
        try:
            url = check_peer(h.url).url  # SECURITY: an announced url is text from the log: offered only if sound
        except ClareError:
            continue
        if url in urls:
            continue
        name = h.name if PEER_NAME_RE.match(h.name) and h.name not in names else h.host
        names.add(name)
        shared = None if token is None or h.token_fp is None else \
            h.token_fp == token_fingerprint(token, machine_id=h.host)
        rows.append({"name": name, "url": url, "host": h.host, "announced_by": h.host,
                     "announced_at": h.announced_at, "is_token_shared": shared})
    return rows


def check_suggested_token(row: dict[str, Any]) -> None:
    """Refuse to send this host's token to a suggested peer that did not announce that very token."""
    if row["is_token_shared"]:
        return
    why = ("announced a token other than this host's" if row["is_token_shared"] is False
           else "did not say which token it takes")
    var = re.sub(r"[^A-Z0-9_]", "_", row["name"].upper()) + "_TOKEN"
    raise Forbidden(f"{row['name']} ({row['url']}) {why}, so this host's token is not sent there; give it its own: "
                    f"export {var}=ITS_TOKEN; clare peer add {row['name']} --token-env {var}")


def add_suggested_peers(path: str, rows: list[dict[str, Any]], ref: str | None, *, name: str | None = None,
                        token_env: str | None = None) -> tuple[list[Peer], list[dict[str, Any]]]:
    """Add one suggested peer (by name or url; None: all of them) to clare.toml; return (added, skipped with why).

    Never one silently: each is added on the user's word. Without --token-env, only those that
    take this host's own token are added; the others are skipped with the command that adds them.
    """
    if ref is not None:
        rows = [r for r in rows if ref in (r["name"], r["url"], r["url"] + "/", r["host"])]
        if not rows:
            raise NotFound(f"no suggested peer {ref!r}; see them with: clare peer list --suggested")
    added, skipped = [], []
    for row in rows:
        try:
            if token_env is None:
                check_suggested_token(row)
            added.append(add_peer(path, row["url"], name=name or row["name"], token_env=token_env))
        except (Forbidden, Conflict) as err:
            if ref is not None:
                raise
            skipped.append({**row, "reason": str(err)})
    return added, skipped


def list_peers(db: Db, peers: Sequence[Peer]) -> list[dict[str, Any]]:
    """Return each configured peer with what its last sync did, then peers synced by URL only."""
    status = {s.url: s for s in list_peer_status(db)}
    rows = [{**p.to_json(), "is_configured": True, **_status_json(db, status.pop(p.url, None))} for p in peers]
    rows += [{"name": s.name, "url": s.url, "token_env": None, "is_configured": False, **_status_json(db, s)}
             for s in status.values()]
    deferred = list_deferred(db)
    hosts = list_announced_hosts(db)
    announced = {h.host: h for h in hosts} | {h.url: h for h in hosts}  # by machine id; before a sync, by url
    for row in rows:
        mine = [d for d in deferred if d.peer_url == row["url"]]
        row["n_deferred"] = len(mine)  # events held back, both ways: each retried once within the bound
        row["deferred_reason"] = mine[-1].reason if mine else None  # the furthest ahead says the most
        host = announced.get(row["machine_id"] or row["url"])
        row["host_name"] = host.name if host else machine_host_name(row["machine_id"]) if row["machine_id"] else None
    return rows


def _status_json(db: Db, s: PeerStatus | None) -> dict[str, Any]:
    """Return what the last round with a peer said, with what is still to move both ways counted now.

    To pull: the peer's head as its last answer said, minus our cursor on its log (events it
    pushed to us since move nothing here: they count until the next round). To push: our events
    past the push cursor that the peer did not make itself, counted now.
    """
    keys = ("machine_id", "last_ok_ms", "last_try_ms", "last_error", "n_failures", "n_behind", "offset_ms",
            "n_pulled", "n_pushed")
    if s is None:
        return {**dict.fromkeys(keys), "n_failures": 0, "n_pulled": 0, "n_pushed": 0, "is_skewed": False,
                "n_to_push": None}
    row = {k: getattr(s, k) for k in keys} | {
        "is_skewed": s.offset_ms is not None and abs(s.offset_ms) > MAX_OFFSET_MS, "n_to_push": None}
    if s.machine_id and s.db_id:
        pulled, pushed = get_cursor(db, s.machine_id, s.db_id)
        if s.peer_head is not None:
            row["n_behind"] = max(s.peer_head - pulled, 0)
        row["n_to_push"] = count_unsent(db, after=pushed, peer_machine_id=s.machine_id)
    return row


def clock_status(db: Db, *, now_ms: int) -> dict[str, Any]:
    """Return what `status` and the dashboard say of this host's clock and of the events held back."""
    deferred = list_deferred(db)
    check = check_clock(db.conn, machine_id=db.machine_id, now_ms=now_ms)
    return {**check.to_json(), "n_deferred": len(deferred),
            "n_deferred_pull": sum(d.direction == "pull" for d in deferred),
            "n_deferred_push": sum(d.direction == "push" for d in deferred),
            "deferred_reason": deferred[-1].reason if deferred else None}



def clock_lines(clock: dict[str, Any]) -> list[str]:
    """Return the sentences a person should read about the clock and deferred events; none when all is well."""
    lines = [m for m in (clock["message"], clock["hlc_message"]) if m]
    if clock["n_deferred"]:
        lines.append(f"{clock['n_deferred']} events held back ({clock['n_deferred_pull']} from peers, "
                     f"{clock['n_deferred_push']} by peers): the newest is {clock['deferred_reason']}; "
                     "see: clare peer list")
    return lines


def backoff_s(n_failures: int, *, interval_s: float = SYNC_INTERVAL_S) -> float:
    """Return the pause before the next round with a peer: doubled per failure in a row, capped, jittered."""
    if n_failures <= 0:
        return interval_s
    jitter = 0.75 + 0.5 * int.from_bytes(os.urandom(2), "big") / 65536  # peers that failed together spread out
    return min(interval_s * 2 ** min(n_failures, 30), MAX_BACKOFF_S) * jitter


def sync_interval_s(config: dict[str, Any], *, path: str = "clare.toml") -> float:
    """Return the pause between good background rounds: [sync] interval_s in clare.toml, else the default."""
    value = config.get("sync", {}).get("interval_s", SYNC_INTERVAL_S) if isinstance(config.get("sync"), dict) \
        else SYNC_INTERVAL_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.1 <= value <= 86_400:
        raise ClareError(f"{path}: [sync] interval_s must be a number of seconds from 0.1 to 86400")
    return float(value)


def sync_round(db: Db, peer: Peer, config: dict[str, Any], *, progress: Progress | None = None,
               verify: bool = False) -> SyncReport:
    """Run one round with a configured peer for `clare sync` and the background loop alike.

    The per-peer edge: any failure leaves as a ClareError, recorded in the peer's status.
    """
    try:
        return sync_with(db, HttpPeer(peer.url, token=peer_token(peer, config), machine_id=db.machine_id),
                         name=peer.name, progress=progress, verify=verify)
    except ClareError:
        raise
    except Exception as err:  # a bug or a broken database must not end the loop nor print a traceback
        with contextlib.suppress(ClareError, sqlite3.Error):  # a busy database: the next round records it
            save_peer_status(db, peer.url, name=peer.name, now_ms=now_ms(), error=f"internal error: {err!r}")
        raise ClareError(f"internal error ({err!r:.200}); run 'clare sync {peer.name}' again, and report it "
                         "if it stays") from err


class PeerContacts:
    """The sync requests peers made to this server, by machine id: one ends the backoff toward that peer.

    After a partition, the side whose backoff ends first reaches the other; that contact makes the
    other side sync at once instead of waiting out its own backoff.
    """

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}  # machine id -> requests served; bumped by the server's threads

    def note(self, machine_id: str | None) -> None:
        """Count one sync request from a peer (a bad or missing id is not counted)."""
        if machine_id and MACHINE_ID_RE.match(machine_id) and len(self.seen) < 10_000:
            self.seen[machine_id] = self.seen.get(machine_id, 0) + 1  # SECURITY: bounded, checked id


class PeerBook(Sequence[Peer]):
    """clare.toml's peers as a running server uses them: read again when the file changes.

    A bad edit (a TOML typo, a bad url) keeps the last good list; reload() says why, once per edit.
    """

    def __init__(self, path: str, settings: dict[str, Any], peers: Sequence[Peer], *,
                 overrides: dict[str, Any] | None = None):
        self.path = path  # clare.toml
        self.overrides = overrides or {}  # what serve set over the file (a token made at start), kept at reloads
        self.settings = settings  # clare.toml as last read well, with the overrides: peer tokens
        self.peers = tuple(peers)  # ... and its peers; swapped whole, so a reader never sees half a list
        self.stamp = _file_stamp(path)  # the file as last read (well or not): a change means read again
        self.pending: tuple[int, int, int] | None = None  # a change seen once: read when the next look agrees

    def __getitem__(self, index: Any) -> Any:
        return self.peers[index]

    def __len__(self) -> int:
        return len(self.peers)

    def reload(self) -> bool:
        """Read clare.toml again once a change holds for two looks; return True then. A bad edit raises."""
        stamp = _file_stamp(self.path)
        if stamp == self.stamp:
            return False
        if stamp != self.pending:  # maybe caught mid-write (an editor truncates, then writes): look again first
            self.pending = stamp
            return False
        self.stamp = stamp
        settings = {**load_config(self.path), **self.overrides}
        peers = tuple(load_peers(settings, path=self.path))
        sync_interval_s(settings, path=self.path)
        self.settings, self.peers = settings, peers
        return True


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino  # peer rm renames a new file into place: a new inode


def start_background_sync(db_path: str, book: PeerBook, *, stop: Any, log: Callable[[str], None],
                          interval_s: float = SYNC_INTERVAL_S, contacts: PeerContacts | None = None) -> Any:
    """Start the thread that runs one sync thread per peer of `book` until `stop` (a threading.Event) is set.

    One thread per peer, each with its own connection, so a dead peer that makes its thread
    wait for timeouts never delays the others or the server. `peer add` and `peer rm` take
    effect within PEERS_RELOAD_S, without a restart.
    """
    import threading

    thread = threading.Thread(target=_keep_peers, name="clare-peers", daemon=True, args=(db_path, book),
                              kwargs={"stop": stop, "log": log, "interval_s": interval_s, "contacts": contacts})
    thread.start()
    return thread


def _keep_peers(db_path: str, book: PeerBook, *, stop: Any, log: Callable[[str], None], interval_s: float,
                contacts: PeerContacts | None) -> None:
    """Keep a sync thread per peer of clare.toml: start new peers' and stop removed ones' as the file changes."""
    import threading

    running: dict[Peer, Any] = {}  # peer -> the Event that stops its thread
    settings = book.settings

    def start(peer: Peer) -> None:
        running[peer] = own = threading.Event()
        threading.Thread(target=_sync_loop, name=f"clare-sync-{peer.name}", daemon=True,
                         args=(db_path, peer, settings), kwargs={"stop": own, "log": log, "interval_s": interval_s,
                                                                 "contacts": contacts}).start()

    for peer in book.peers:
        start(peer)
    while not stop.wait(PEERS_RELOAD_S):
        try:
            if not book.reload():
                continue
        except ClareError as err:  # a typo never stops the syncs: the last good list stays
            names = ", ".join(p.name for p in running) or "none"
            log(f"{err}; still syncing with the peers read before ({names})")
            continue
        is_new_settings = {**book.settings, "peers": None} != {**settings, "peers": None}
        settings = book.settings
        for peer in [p for p in running if p not in book.peers or is_new_settings]:
            running.pop(peer).set()
            if peer not in book.peers:
                log(f"sync with {peer.name}: stopped, it is no longer in {book.path}")
        for peer in book.peers:
            if peer not in running:
                start(peer)
                log(f"sync with {peer.name} ({peer.url}): started, as {book.path} says; every {interval_s:g} s")
    for own in running.values():
        own.set()


def _sync_loop(db_path: str, peer: Peer, config: dict[str, Any], *, stop: Any, log: Callable[[str], None],
               interval_s: float, contacts: PeerContacts | None = None) -> None:
    """Sync with one peer until stopped, backing off while it fails; a contact from it ends the backoff."""
    db = open_db(db_path)
    n_failures, was_skewed = 0, False
    try:
        while not stop.is_set():
            try:
                report = sync_round(db, peer, config)
                if report.n_pulled and list_orders(db, pending_on=db.machine_id):
                    carry_out_soon(db_path, config)  # an order for this host came in: now, not at the next pull
                if n_failures:
                    log(f"sync with {peer.name}: reachable again")
                n_failures = 0
                if report.is_skewed and not was_skewed:
                    log(f"warning: {skew_message(peer.name, report.offset_ms or 0)}")
                was_skewed = report.is_skewed
            except ClareError as err:  # one peer's failure never ends the thread
                n_failures += 1
                log(f"sync with {peer.name} failed ({n_failures} in a row): {err}")
            if _wait_backoff(db, peer, stop=stop, seconds=backoff_s(n_failures, interval_s=interval_s),
                             contacts=contacts if n_failures else None):
                log(f"sync with {peer.name}: it contacted this host, trying again now")
                n_failures = 0
    finally:
        db.close()


def _wait_backoff(db: Db, peer: Peer, *, stop: Any, seconds: float, contacts: PeerContacts | None) -> bool:
    """Wait `seconds` or until stopped; return True early when the peer contacted this server meanwhile."""
    machine_id = next((s.machine_id for s in list_peer_status(db) if s.url == peer.url), None)
    if contacts is None or machine_id is None:
        stop.wait(seconds)
        return False
    seen = contacts.seen.get(machine_id, 0)
    deadline = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        if contacts.seen.get(machine_id, 0) != seen:
            return True
        stop.wait(min(CONTACT_POLL_S, max(deadline - time.monotonic(), 0)))
    return False


ORDER_WAIT_S = START_READY_S + 15  # how long a start pushed to its host is followed for its receipt


def push_order(db: Db, order: Order, *, config: dict[str, Any], wait_s: float = ORDER_WAIT_S) -> Order:
    """Sync now with the configured peer that is the order's host, then follow it until its receipt comes back.

    No such peer, or one that does not answer, is fine: the order waits in the log for the host's
    next sync (pending), until it expires.
    """
    known = {s.url: s.machine_id for s in list_peer_status(db)}
    for peer in load_peers(config):
        if known.get(peer.url) != order.host:
            continue
        deadline = time.monotonic() + wait_s
        try:
            sync_round(db, peer, config)  # the host carries it out as soon as the batch arrives
            while list_orders(db, order_id=order.id)[0].result not in ORDER_FINAL and time.monotonic() < deadline:
                time.sleep(0.5)
                sync_round(db, peer, config)
        except ClareError:
            continue  # unreachable now: the periodic sync is the fallback
        break
    return list_orders(db, order_id=order.id)[0]


def _send_order(db: Db, order: Order, *, config: dict[str, Any], now_ms: int) -> Order:
    if order.host != db.machine_id:
        return push_order(db, order, config=config)
    pull_fleet(db, config=config, now_ms=now_ms)  # carries it out, then sees the session
    return list_orders(db, order_id=order.id)[0]


def start_session(db: Db, task_ref: str, *, host: str | None = None, is_worktree: bool = False,
                  model: str | None = None, config: dict[str, Any], now_ms: int) -> Order:
    """Start a Claude session for a task: on this host at once, on another through the log, pushed there now."""
    if host is None or resolve_host(db, host) == db.machine_id:  # checked here first: a refusal leaves no trace
        task = get_task(db, task_ref)
        folder = get_project(db, task.project_id).dirs.get(db.machine_id)
        if folder is not None:
            check_launch(db, folder, config=config, branch=worktree_branch(task) if is_worktree else None)
    order = place_start(db, task_ref, host=host, is_worktree=is_worktree, model=model, now_ms=now_ms)
    return _send_order(db, order, config=config, now_ms=now_ms)


def resume_session(db: Db, session_ref: str, *, config: dict[str, Any], now_ms: int) -> Order:
    """Resume a gone session (claude --resume) on its host, in its directory; its task stays bound."""
    session = get_session(db, session_ref)
    if session.host == db.machine_id and session.state == "gone" and session.cwd:
        check_launch(db, session.cwd, config=config)  # here first: a refusal leaves no trace
    return _send_order(db, place_resume(db, session_ref, now_ms=now_ms), config=config, now_ms=now_ms)


def stop_session(db: Db, session_ref: str, *, is_force: bool = False, config: dict[str, Any], now_ms: int) -> Order:
    """Stop a session on its host: /exit while it waits; --force sends SIGTERM even while it works."""
    return _send_order(db, place_stop(db, session_ref, is_force=is_force, now_ms=now_ms), config=config,
                       now_ms=now_ms)


def peer_of_host(db: Db, peers: Iterable[Peer], host: str) -> Peer | None:
    """Return the configured peer whose last sync answered as machine `host`, or None (not a direct peer)."""
    ids = {s.url: s.machine_id for s in list_peer_status(db)}
    return next((p for p in peers if ids.get(p.url) == host), None)


def view_pane(db: Db, session: Session, *, peers: Iterable[Peer], settings: dict[str, Any],
              lines: int = PANE_LINES, now_ms: int) -> PaneView:
    """Return a session's live pane from whichever host runs it: here by tmux, elsewhere from that peer.

    Wire: GET PEER/api/v1/sessions/ID/pane?lines=N with the peer's bearer token, within
    PEEK_TIMEOUT_S, an answer of at most MAX_PEEK_BYTES; at most one request per session per
    PANE_MIN_INTERVAL_S from this host, however many pages watch. Never a key is sent.
    """
    if session.host == db.machine_id:
        return read_pane(db, session, lines=lines, now_ms=now_ms)
    lines = max(1, min(int(lines), MAX_PANE_LINES))
    key, now = (db.path, session.id, -lines), time.monotonic()
    hit = _PANE_CACHE.get(key)
    if hit is not None and now - hit[0] < PANE_MIN_INTERVAL_S:
        return hit[1]
    try:
        got = _peek(db, session, peers=peers, settings=settings, path=f"pane?lines={lines}")
        # SECURITY: a peer's text is untrusted like any pane: cleaned again here, cut to size, escaped when shown.
        if not isinstance(got, dict) or not isinstance(got.get("text"), str):
            raise ClareError(f"{session.host} sent a pane view this Clare cannot read; run one Clare version")
        error = got.get("error") if isinstance(got.get("error"), str) else None
        view = PaneView(session.id, session.host, clean_screen(got["text"], lines=lines), lines, iso_ms(now_ms),
                        error[:300] if error else None)
    except ClareError as err:
        view = PaneView(session.id, session.host, "", lines, iso_ms(now_ms), str(err)[:300])
    _PANE_CACHE[key] = (now, view)
    return view


def view_turns(db: Db, session: Session, *, peers: Iterable[Peer], settings: dict[str, Any],
               claude_dir: str) -> list[dict[str, Any]]:
    """Return the last entries of a session's transcript from whichever host runs it (see parse_turns)."""
    if session.host == db.machine_id:
        return read_turns(db, session, claude_dir=claude_dir)
    got = _peek(db, session, peers=peers, settings=settings, path="transcript")
    turns = got.get("turns") if isinstance(got, dict) else None
    if not isinstance(turns, list):
        raise ClareError(f"{session.host} sent a transcript view this Clare cannot read; run one Clare version")
    # SECURITY: from the network: only the known fields, as short text.
    return [{"role": t["role"], "text": PANE_CONTROL_RE.sub("", t["text"])[:TURN_CHARS], "tools": [],
             "at": str(t.get("at", ""))[:40]}
            for t in turns[-MAX_TURNS:] if isinstance(t, dict) and t.get("role") in ("user", "assistant", "tool")
            and isinstance(t.get("text"), str)]


def push_answer(db: Db, answer: Answer, *, peers: Iterable[Peer], settings: dict[str, Any]) -> str:
    """Push an answer made here to the host of its session at once; return what happens next, in one line.

    The push is the answer's event alone (POST PEER/api/v1/sync/events, idempotent by uuid);
    that host types it within a second. Periodic sync carries it too, should the push fail.
    """
    peer = peer_of_host(db, peers, answer.host)
    if peer is None:
        return (f"{answer.host} is not a direct peer of this host: the answer travels with sync and expires "
                f"{ANSWER_TTL_MS // 60000} min after {answer.host} stores it; to answer at once open the dashboard "
                f"of {answer.host}")
    events = [ev for ev in list_history(db, [answer.session_id], limit=200)
              if ev.event_type == "permission.answered" and ev.payload.get("answer_id") == answer.id]
    try:
        got = HttpPeer(peer.url, token=peer_token(peer, settings), timeout_s=PEEK_TIMEOUT_S).push({
            "machine_id": db.machine_id, "db_id": db.db_id, "now_ms": now_ms(),
            "events": [ev.to_json() for ev in events]})
    except ClareError as err:
        return f"sent to {peer.name} failed ({err}); sync will carry it, and it expires if it comes too late"
    if not isinstance(got, dict) or got.get("rejected"):
        return f"{peer.name} refused the answer: {str(got.get('rejected') if isinstance(got, dict) else got)[:200]}"
    return f"sent to {peer.name}, which types it within a second if the same dialog is still open"


@record_type(frozen=True, slots=True)
class AnswerResult:
    answer: Answer
    note: str  # what happened, or what happens next, in one line

    def to_json(self) -> dict[str, Any]:
        """Return the answer and the note, as the API and CLI print them."""
        return {**self.answer.to_json(), "note": self.note}


def answer_session(db: Db, session_ref: str, answer: str, *, option: int | None = None,
                   option_text: str | None = None, reason: str = "", tool_use_id: str | None = None,
                   client: str, peers: Iterable[Peer] = (), settings: dict[str, Any] | None = None,
                   now_ms: int) -> AnswerResult:
    """Answer a session's permission dialog from this host: typed here at once, or pushed to its host."""
    a = answer_permission(db, session_ref, answer, option=option, option_text=option_text, reason=reason,
                          tool_use_id=tool_use_id, client=client, now_ms=now_ms)
    if a.host != db.machine_id:
        return AnswerResult(a, push_answer(db, a, peers=peers, settings=settings or {}))
    deliver_answers(db, now_ms=now_ms, config=settings)
    a = list_answers(db, answer_id=a.id)[0]
    return AnswerResult(a, f"{a.result}: {a.result_reason}")


def _peek(db: Db, session: Session, *, peers: Iterable[Peer], settings: dict[str, Any], path: str) -> Any:
    peer = peer_of_host(db, peers, session.host)
    if peer is None:
        raise ClareError(f"{session.host} is not a direct peer of this host; open the dashboard of "
                         f"{session.host} (or of a host that syncs with it) to see this session live")
    return http_json(peer.url, f"/api/v1/sessions/{session.id}/{path}", token=peer_token(peer, settings),
                     timeout_s=PEEK_TIMEOUT_S, max_bytes=MAX_PEEK_BYTES, say_where=False,
                     hint_401="set the peer's token: token_env in clare.toml, or CLARE_TOKEN")


def skew_message(name: str, offset_ms: int) -> str:
    """Say loudly that a peer's clock is off, by how much, and what Clare does about it."""
    ahead = "ahead of" if offset_ms > 0 else "behind"
    return (f"{name}'s clock is {_duration(abs(offset_ms))} {ahead} this host's, more than the "
            f"{MAX_OFFSET_MS // 60000} min allowed: its events keep their times but never move this "
            "host's clock past that limit; fix the clock (NTP) on whichever host is wrong")


def _ago_ms(ms: int | None, now: int) -> str:
    if ms is None:
        return "never"
    return f"{_duration(max(now - ms, 0))} ago" if now - ms >= 1000 else "just now"


def _offset(ms: int | None) -> str:
    if ms is None:
        return ""
    text = ("+" if ms >= 0 else "-") + _duration(abs(ms))
    return text + " SKEWED" if abs(ms) > MAX_OFFSET_MS else text


# --- the services, each declared once ---------------------------------------------------------
# A method of Services is a service's one declaration: its signature (what the CLI and pages call),
# its HTTP form (@api: route, where each argument travels, the answer), or @here for what works on
# this host only. The remote client (RemoteServices, section 7), the JSON handlers and the OpenAPI
# document (section 8) are derived from it; nothing about a service is written out again elsewhere.

if TYPE_CHECKING:
    _S = TypeVar("_S", bound="Services")
else:  # a string bound costs typing a compile() at import (≈ 1 ms of every start); only mypy reads it
    _S = TypeVar("_S")
_P = ParamSpec("_P")
_R = TypeVar("_R")


@record_type(frozen=True, slots=True)
class Api:
    """How one service travels over HTTP. Arguments are named as in the signature; "arg=wire" renames one."""

    method: str
    path: str  # "/api/v1/tasks/{task}": each {wire} takes the next leading positional argument
    summary: str  # the OpenAPI summary
    query: tuple[str, ...] = ()
    body: tuple[str, ...] = ()
    status: int = 200
    resolve: dict[str, str] = record_field(default_factory=dict)  # arg -> getter: the server turns a ref into
    # that object (or its id, for a *_id or *_ids argument)
    here: dict[str, str] = record_field(default_factory=dict)  # arg -> why it cannot be sent (refused remotely)
    not_sent: tuple[str, ...] = ()  # arguments a remote call leaves out (the server uses its own defaults)
    server: dict[str, Callable[[Any], Any]] = record_field(default_factory=dict)  # arg -> what the server
    # passes instead, from the request (its own settings); a remote call leaves it out
    max_int: int = MAX_EVENTS_PAGE  # integer query arguments are within 1..max_int
    schema: str | None = None  # the OpenAPI answer, a component's name; None: from the return type
    body_schema: dict[str, Any] | None = None  # the OpenAPI request body; None: from the body arguments
    check: Callable[[dict[str, Any]], None] | None = None  # the server's extra check of a body
    to_wire: Callable[[Any, Any], Any] | None = None  # (request, result) -> the JSON answer; None: the result
    from_wire: Callable[[Any], Any] | None = None  # the JSON answer -> the result; None: from the return type
    is_routed: bool = True  # False: the remote client asks a route that answers more (count_events)
    is_lenient: bool = False  # a batch whose items are checked one by one: a bad item rejects that item only
    cursor: Callable[[Any, Any], str] | None = None  # a list that comes in pages: (db, last item) -> the `after`
    # that reads on past it. With ?limit=N the route answers {<last path word>: [...], next_after, has_more};
    # without, the whole list, streamed a page at a time; the remote client follows the pages.


SERVICE_APIS: dict[str, tuple[Callable[..., Any], Api | None]] = {}  # service -> (function, HTTP form or None)


def api(method: str, path: str, summary: str, **form: Any
        ) -> Callable[[Callable[Concatenate[_S, _P], _R]], Callable[Concatenate[_S, _P], _R]]:
    """Declare a Services method as a service offered over HTTP (see Api for the form)."""
    return _declare(Api(method, path, summary, **form))


def here(fn: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Declare a Services method as a service of this host only: its tmux, its hooks, its files."""
    return _declare(None)(fn)


def _declare(spec: Api | None) -> Callable[[Callable[Concatenate[_S, _P], _R]], Callable[Concatenate[_S, _P], _R]]:
    def register(fn: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
        SERVICE_APIS[fn.__name__] = (fn, spec)

        @functools.wraps(fn)
        def call(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            return self._run(fn, spec, args, kwargs)
        return call
    return register


def from_json(cls: type, obj: dict[str, Any]) -> Any:
    """Rebuild a dataclass from its JSON object (a JSON list back into a tuple field); added fields are ignored."""
    import typing

    return cls(**{f.name: tuple(obj[f.name]) if typing.get_origin(f.type) is tuple else obj[f.name]
                  for f in record_fields(cls) if f.name in obj})


def _change_from_json(obj: dict[str, Any]) -> Change:
    return Change([from_json(Event, e) for e in obj["events"]], obj["description"], obj["refusal"])


def _waits_from_json(obj: dict[str, Any]) -> TaskWaits:
    return TaskWaits(obj["task_id"], [from_json(Task, t) for t in obj["waits_on"]], obj["unknown"],
                     [from_json(Task, t) for t in obj["blocks"]], obj["cycle"], obj["is_ready"])


def _queue_from_json(obj: dict[str, Any]) -> Queue:
    return Queue(obj["project_id"], [from_json(Task, t) for t in obj["ready"]],
                 [_waits_from_json(w) for w in obj["waiting"]], obj["cycles"])


def _status_to_wire(req: Any, report: StatusReport) -> dict[str, Any]:
    return {**report.to_json(), "n_events": req.svc.count_events(), "machine_id": req.db.machine_id,
            "clock": req.svc.clock_status()}


def _status_from_wire(got: dict[str, Any]) -> StatusReport:
    return StatusReport([ProjectStatus(from_json(Project, p), p["tokens"], p["n_sessions"]) for p in got["projects"]],
                        [from_json(Session, x) for x in got["sessions"]],
                        {t["id"]: from_json(Task, t) for t in got["tasks"]})


def _server_config(req: Any) -> dict[str, Any]:
    return req.config.settings  # the server's own clare.toml, read at each request


def _answer_body(body: dict[str, Any]) -> None:
    for name, kind in (("option", int), ("option_text", str), ("reason", str), ("tool_use_id", str)):
        if body.get(name) is not None and (not isinstance(body[name], kind) or isinstance(body[name], bool)):
            raise UsageError(f"{name} must be {'an integer' if kind is int else 'text'}")
    # The server names the client in the history: what the caller says it is, marked as come through the API.
    said = body.get("client")
    body["client"] = f"{said} via api"[:200] if isinstance(said, str) and said else "api"
    if body.get("reason") is None:
        body.pop("reason", None)


def _only_message_updates(body: dict[str, Any]) -> None:
    # SECURITY: pane tails, triage verdicts and hook notes come from this host's pulls only: a
    # client that could post them would put words in a session's or a hook's mouth.
    if body.get("source", "message") != "message":
        raise UsageError(f"update source {body['source']!r} is not allowed here; only 'message' may be posted "
                         "(pane tails, triage and hook notes are written by 'clare pull')")


@record_type(frozen=True, slots=True)
class Wire:
    """Where one argument of a declared service goes: its place, its name there and its kind of value."""

    arg: str
    where: str  # "path", "query", "body", "here" (refused remotely unless at its default), "server" or "not_sent"
    name: str  # in the path, query or body
    kind: str  # "text", "int", "bool", "list", "range" (a (lo, hi) pair as "lo-hi") or "object" (a record)
    is_optional: bool  # None is a value of it
    is_required: bool  # it has no default
    default: Any
    resolver: str | None  # a getter the server turns the ref into the record (or its id) with


_WIRES: dict[str, tuple[Wire, ...]] = {}


def wire_args(name: str) -> tuple[Wire, ...]:
    """Return where each argument of a declared service goes: path, query and body in their declared order."""
    if name not in _WIRES:
        import inspect
        import types
        import typing

        fn, spec = SERVICE_APIS[name]
        params = list(inspect.signature(fn).parameters.values())[1:]  # after self
        spec = spec or Api("", "", "")
        placed = dict(zip(re.findall(r"\{(\w+)\}", spec.path), (p.name for p in params), strict=False))
        where = {arg: ("path", wire) for wire, arg in placed.items()}
        for place, specs in (("query", spec.query), ("body", spec.body)):
            for text in specs:
                arg, _, wire = text.partition("=")
                where[arg] = (place, wire or arg)
        where.update({arg: ("here", arg) for arg in spec.here})
        where.update({arg: ("not_sent", arg) for arg in spec.not_sent})
        where.update({arg: ("server", arg) for arg in spec.server})
        wires = []
        for p in params:
            if p.name not in where and SERVICE_APIS[name][1] is not None:
                raise TypeError(f"{name}: argument {p.name} is not placed in the path, query or body of its @api")
            ann = p.annotation
            is_optional = isinstance(ann, types.UnionType) and type(None) in typing.get_args(ann)
            base = next((a for a in typing.get_args(ann) if a is not type(None)), ann) if is_optional else ann
            origin = typing.get_origin(base) or base
            kind = {bool: "bool", int: "int", str: "text", list: "list", tuple: "range"}.get(origin) or \
                ("list" if origin in (Iterable, Sequence) else "object")
            place, wire = where.get(p.name, ("here", p.name))
            wires.append(Wire(p.name, place, wire, kind, is_optional, p.default is p.empty, p.default,
                              spec.resolve.get(p.name)))
        order = {"path": 0, "query": 1, "body": 2}
        _WIRES[name] = tuple(sorted(wires, key=lambda w: order.get(w.where, 3)))  # stable: declared order kept
    return _WIRES[name]


class Services:
    """The services and queries bound to one database and the wall clock: what the CLI and pages call.

    RemoteServices offers the same methods over HTTP, so a caller never knows which it has.
    """

    __slots__ = ("db",)

    def __init__(self, db: Db):
        self.db = db

    def _run(self, fn: Callable[..., _R], spec: Api | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _R:
        return fn(self, *args, **kwargs)

    @api("GET", "/api/v1/projects", "List projects with task counts", query=("status",))
    def list_projects(self, *, status: str | None = None) -> list[Project]:
        """Return the projects, with task counts."""
        return list_projects(self.db, status=status)

    @api("POST", "/api/v1/projects", "Create a project", body=("name", "goal", "owner", "dirs"), status=201)
    def create_project(self, name: str, *, goal: str = "", owner: str = "", dirs: Sequence[str] = ()) -> Project:
        """Create a project (dirs: "/path" here, "HOST:/path" on another host)."""
        return create_project(self.db, name, goal=goal, owner=owner, dirs=dirs, now_ms=now_ms())

    @api("GET", "/api/v1/projects/{project}", "Get a project by name or id prefix")
    def get_project(self, ref: str) -> Project:
        """Return the project named `ref` or whose id starts with `ref`."""
        return get_project(self.db, ref)

    @api("PATCH", "/api/v1/projects/{project}", 'Change a project (dirs: "/path", "HOST:/path", "HOST:" removes; '
         'dispatch on/off, max_sessions, dispatcher host)',
         body=("name", "goal", "owner", "status", "dirs", "dispatch", "max_sessions", "dispatcher"))
    def edit_project(self, ref: str, *, name: str | None = None, goal: str | None = None,
                     owner: str | None = None, status: str | None = None, dirs: Sequence[str] = (),
                     dispatch: bool | None = None, max_sessions: int | None = None,
                     dispatcher: str | None = None) -> Project:
        """Change some fields of a project, its directory per host, and its dispatch settings."""
        return edit_project(self.db, ref, name=name, goal=goal, owner=owner, status=status, dirs=dirs,
                            dispatch=dispatch, max_sessions=max_sessions, dispatcher=dispatcher, now_ms=now_ms())

    @api("GET", "/api/v1/projects/{project}/history", "Events about a project and its tasks", query=("limit",),
         resolve={"project": "get_project"})
    def project_history(self, project: Project, *, limit: int = 200) -> list[Event]:
        """Return the events about a project and its tasks, oldest first."""
        return project_history(self.db, project, limit=limit)

    @api("GET", "/api/v1/tasks", "List tasks, most urgent first (removed ones only with removed=1); "
         "limit=N gives a page, after=its next_after the next one",
         query=("project_id=project", "status", "session_id=session", "group_id=group", "is_open=open",
                "active_projects=active", "is_assigned=assigned", "tag", "priorities=priority", "search",
                "include_removed=removed", "after", "limit"),
         resolve={"project_id": "get_project", "group_id": "get_group"}, cursor=lambda db, t: task_cursor(db, t.id))
    def list_tasks(self, *, project_id: str | None = None, status: str | None = None,
                   session_id: str | None = None, group_id: str | None = None, is_open: bool = False,
                   active_projects: bool = False, is_assigned: bool | None = None, tag: str | None = None,
                   priorities: tuple[int, int] | None = None, search: str | None = None,
                   include_removed: bool = False, after: str | None = None, limit: int | None = None) -> list[Task]:
        """Return tasks, most urgent first; `limit` of them past the cursor `after` (a task_cursor)."""
        return list_tasks(self.db, project_id=project_id, status=status, session_id=session_id, group_id=group_id,
                          is_open=is_open, active_projects=active_projects, is_assigned=is_assigned, tag=tag,
                          priorities=priorities, search=search, include_removed=include_removed, after=after,
                          limit=limit)

    @here
    def list_tasks_json(self, **filters: Any) -> str:
        """Return list_tasks(**filters) as JSON text that SQLite writes: `task list --json` on this host."""
        return list_tasks_json(self.db, **filters)

    @api("POST", "/api/v1/tasks", "Add a task (after: the tasks it waits on)",
         body=("project_ref=project", "title", "priority", "description", "tags", "after"), status=201)
    def create_task(self, project_ref: str, title: str, *, priority: int = DEFAULT_PRIORITY,
                    description: str = "", tags: Iterable[str] = (), after: Iterable[str] = ()) -> Task:
        """Add a task to a project."""
        return create_task(self.db, project_ref, title, priority=priority, description=description, tags=tags,
                           after=after, now_ms=now_ms())

    @api("GET", "/api/v1/ready", "Tasks ready to hand out: todo, unassigned, waiting on nothing undone; "
         "most urgent, then oldest, first", query=("project",))
    def ready_tasks(self, project: str | None = None) -> list[Task]:
        """Return the tasks ready to hand out (of one project, by name or id prefix), most urgent then oldest first."""
        return ready_tasks(self.db, project)

    @api("GET", "/api/v1/projects/{project}/queue", "A project's queue: ready tasks, open tasks that wait "
         "(on what), cycles of waits", schema="Queue", from_wire=lambda got: _queue_from_json(got))
    def get_queue(self, project: str) -> Queue:
        """Return a project's ready tasks, its open tasks that wait and on what, and its cycles of waits."""
        return get_queue(self.db, project)

    @api("GET", "/api/v1/tasks/{task}/waits", "What a task waits on, what waits on it, the cycle it is on",
         schema="TaskWaits", from_wire=lambda got: _waits_from_json(got))
    def get_task_waits(self, ref: str) -> TaskWaits:
        """Return what a task waits on, what waits on it, and the cycle of waits it is on, if any."""
        return get_task_waits(self.db, ref)

    @api("GET", "/api/v1/tasks/{task}", "Get a task by id prefix (removed ones too)")
    def get_task(self, ref: str) -> Task:
        """Return the task whose id starts with `ref`."""
        return get_task(self.db, ref)

    @api("PATCH", "/api/v1/tasks/{task}", "Change a task; tags adds tags, untags removes them; after adds "
         "tasks it waits on, no_after drops some",
         body=("title", "description", "priority", "status", "tags", "untags", "after", "no_after"))
    def edit_task(self, ref: str, *, title: str | None = None, description: str | None = None,
                  priority: int | None = None, status: str | None = None, tags: Iterable[str] = (),
                  untags: Iterable[str] = (), after: Iterable[str] = (), no_after: Iterable[str] = ()) -> Task:
        """Change some fields, tags and waits of a task."""
        return edit_task(self.db, ref, title=title, description=description, priority=priority, status=status,
                         tags=tags, untags=untags, after=after, no_after=no_after, now_ms=now_ms())

    @api("DELETE", "/api/v1/tasks/{task}", "Remove a task: it leaves every list, keeps its history, can be restored")
    def remove_task(self, ref: str) -> Task:
        """Remove a task (it can be restored)."""
        return remove_task(self.db, ref, now_ms=now_ms())

    @api("POST", "/api/v1/tasks/{task}/restore", "Bring a removed task back")
    def restore_task(self, ref: str) -> Task:
        """Bring a removed task back."""
        return restore_task(self.db, ref, now_ms=now_ms())

    @api("GET", "/api/v1/undo", "This host's newest changes not undone yet, newest first", query=("limit",),
         max_int=100, from_wire=lambda got: [_change_from_json(c) for c in got])
    def list_changes(self, *, limit: int = 10) -> list[Change]:
        """Return this host's newest changes not undone yet, newest first."""
        return list_changes(self.db, limit=limit)

    @api("POST", "/api/v1/undo", "Undo this host's newest change by recording its inverse",
         body_schema={"type": "object"},
         from_wire=lambda got: UndoResult(_change_from_json(got), [from_json(Event, e) for e in got["recorded"]],
                                          got["n_kept"]))
    def undo_change(self) -> UndoResult:
        """Undo this host's newest change by recording its inverse."""
        return undo_change(self.db, now_ms=now_ms())

    @api("POST", "/api/v1/tasks/{task}/assignment", "Assign a task to a session or a group",
         body=("session_id", "group_ref=group"))
    def assign_task(self, ref: str, *, session_id: str | None = None, group_ref: str | None = None) -> Task:
        """Bind a task to one session or one group, ending any previous binding."""
        return assign_task(self.db, ref, session_id=session_id, group_ref=group_ref, now_ms=now_ms())

    @api("DELETE", "/api/v1/tasks/{task}/assignment", "End a task's assignment")
    def unassign_task(self, ref: str) -> Task:
        """End a task's binding."""
        return unassign_task(self.db, ref, now_ms=now_ms())

    @api("GET", "/api/v1/groups", "List groups")
    def list_groups(self) -> list[Group]:
        """Return the groups."""
        return list_groups(self.db)

    @api("POST", "/api/v1/groups", "Create a group", body=("name", "cwd", "host", "tmux_name"), status=201)
    def create_group(self, name: str, *, cwd: str | None = None, host: str | None = None,
                     tmux_name: str | None = None) -> Group:
        """Create a group of sessions by cwd, host or tmux session name."""
        return create_group(self.db, name, cwd=cwd, host=host, tmux_name=tmux_name, now_ms=now_ms())

    @api("GET", "/api/v1/groups/{group}", "Get a group by name or id prefix")
    def get_group(self, ref: str) -> Group:
        """Return the group named `ref` or whose id starts with `ref`."""
        return get_group(self.db, ref)

    @api("DELETE", "/api/v1/groups/{group}", "Remove a group")
    def remove_group(self, ref: str) -> Group:
        """Remove a group; its tasks become unassigned."""
        return remove_group(self.db, ref, now_ms=now_ms())

    @api("GET", "/api/v1/groups/{group}/sessions", "Sessions a group's patterns match now",
         query=("include_gone=all",))
    def list_group_sessions(self, group_ref: str, *, include_gone: bool = False) -> list[Session]:
        """Return the sessions a group's patterns match now."""
        return list_group_sessions(self.db, group_ref, include_gone=include_gone)

    @api("GET", "/api/v1/sessions", "List Claude sessions of every host", query=("host", "include_gone=all"))
    def list_sessions(self, *, host: str | None = None, include_gone: bool = False) -> list[Session]:
        """Return the sessions of every host."""
        return list_sessions(self.db, host=host, include_gone=include_gone)

    @api("GET", "/api/v1/sessions/{session}", "", is_routed=False)  # the route answers get_session_detail
    def get_session(self, ref: str) -> Session:
        """Return the session whose id starts with `ref` (gone ones too)."""
        return get_session(self.db, ref)

    @api("GET", "/api/v1/sessions/{session}", "Get a session by id prefix, with its task, history and attach command",
         query=("limit",), server={"hosts": lambda req: req.config.settings.get("hosts") or {}},
         from_wire=lambda got: SessionDetail(
             from_json(Session, got), from_json(Task, got["task"]) if got.get("task") else None,
             [from_json(Event, e) for e in got.get("history", [])], got.get("attach")))
    def get_session_detail(self, ref: str, *, hosts: dict[str, Any] | None = None, limit: int = 50) -> SessionDetail:
        """Return a session with its task, its newest history and the command that attaches to its pane."""
        return get_session_detail(self.db, ref, hosts=hosts, limit=limit)

    @api("POST", "/api/v1/tasks/{task}/sessions", "Start a Claude session for a task on a host (in a new worktree)",
         body=("host", "is_worktree", "model"), status=201, server={"config": _server_config})
    def start_session(self, task_ref: str, *, host: str | None = None, is_worktree: bool = False,
                      model: str | None = None, config: dict[str, Any]) -> Order:
        """Start a Claude session for a task, here or on another host (a server uses its own clare.toml)."""
        # SECURITY: this runs a program and types into an AI agent: the token and cross-site rules guard it.
        return start_session(self.db, task_ref, host=host, is_worktree=is_worktree, model=model, config=config,
                             now_ms=now_ms())

    @api("POST", "/api/v1/sessions/{session}/resume", "Resume a gone session on its host", status=201,
         body_schema={"type": "object", "required": [], "properties": {}, "additionalProperties": False},
         server={"config": _server_config})
    def resume_session(self, session_ref: str, *, config: dict[str, Any]) -> Order:
        """Resume a gone session (claude --resume) on its host, in its directory."""
        return resume_session(self.db, session_ref, config=config, now_ms=now_ms())

    @api("POST", "/api/v1/sessions/{session}/stop", "Stop a session: /exit while it waits, SIGTERM with is_force",
         body=("is_force",), status=201, server={"config": _server_config})
    def stop_session(self, session_ref: str, *, is_force: bool = False, config: dict[str, Any]) -> Order:
        """Stop a session on its host: /exit while it waits; is_force sends SIGTERM even while it works."""
        return stop_session(self.db, session_ref, is_force=is_force, config=config, now_ms=now_ms())

    @api("GET", "/api/v1/orders", "Session orders (start, resume, stop) and their results",
         query=("order_id=id", "session_id=session", "pending_on"))
    def list_orders(self, *, order_id: str | None = None, session_id: str | None = None,
                    pending_on: str | None = None) -> list[Order]:
        """Return the session orders and their results."""
        return list_orders(self.db, order_id=order_id, session_id=session_id, pending_on=pending_on)

    @api("GET", "/api/v1/needs", "Sessions waiting on a person: permission first, then the longest waiting")
    def list_needs(self) -> list[Session]:
        """Return the sessions that wait on a person: permission dialogs first, then the longest waiting."""
        return list_needs(self.db)

    @here
    def get_pane_session(self, tmux_socket: str | None, pane_id: str) -> Session:
        """Return the live session of this host in a tmux pane."""
        return get_pane_session(self.db, tmux_socket, pane_id)

    @here
    def observe_sessions(self, seen: list[Observation], *, keep_sockets: Iterable[str] = (),
                         keep_ids: Iterable[str] = (), live_panes: Mapping[str, Iterable[str]] | None = None
                         ) -> list[Event]:
        """Record what a look at this host's sessions found."""
        return observe_sessions(self.db, seen, keep_sockets=keep_sockets, keep_ids=keep_ids, live_panes=live_panes,
                                now_ms=now_ms())

    @here
    def report_hook(self, session_id: str, mark: HookMark, *, cwd: str, tmux_target: str | None = None,
                    is_end: bool = False, is_clear: bool = False, asked: dict[str, str] | None = None,
                    is_stale: bool = False, tool_use_id: str | None = None, input_key: str | None = None
                    ) -> list[Event]:
        """Record what a Claude Code hook on this host reported (and what a dialog asks)."""
        return report_hook(self.db, session_id, mark, cwd=cwd, tmux_target=tmux_target, is_end=is_end,
                           is_clear=is_clear, asked=asked, is_stale=is_stale, tool_use_id=tool_use_id,
                           input_key=input_key, now_ms=now_ms())

    @here
    def get_token(self, config: dict[str, Any], *, path: str, env: Mapping[str, str] | None = None) -> str:
        """Return this host's API token."""
        return get_token(config, path=path, env=env)

    @here
    def pull_fleet(self, *, config: dict[str, Any], tails: bool = False,
                   env: Mapping[str, str] | None = None) -> PullResult:
        """Look at this host's Claude sessions and record what changed."""
        return pull_fleet(self.db, config=config, now_ms=now_ms(), tails=tails, env=env)

    @api("GET", "/api/v1/panes/ambiguous", "Claude panes whose session cannot be told apart")
    def list_ambiguous_panes(self) -> list[Pane]:
        """Return the panes the last pull could not tie to one session."""
        return list_ambiguous_panes(self.db)

    @api("POST", "/api/v1/sessions/{session}/answer",
         "Answer a session's open permission dialog (approve, deny with a reason, or option N with its wording); "
         "typed by the session's host only if the same dialog is still open",
         body=("answer", "option", "option_text", "reason", "tool_use_id", "client"), status=201,
         schema="AnswerResult", check=_answer_body,
         server={"peers": lambda req: req.config.peers, "settings": lambda req: req.config.settings},
         from_wire=lambda got: AnswerResult(from_json(Answer, got), got.get("note", "")))
    def answer_session(self, session_ref: str, answer: str, *, option: int | None = None,
                       option_text: str | None = None, reason: str = "", tool_use_id: str | None = None,
                       client: str, peers: Iterable[Peer] = (), settings: dict[str, Any] | None = None
                       ) -> AnswerResult:
        """Answer a session's permission dialog: typed here at once, or pushed to the session's host."""
        # SECURITY: this types into an AI agent's dialog: the token and cross-site rules guard it, and
        # the session's host types only if the same dialog is still open.
        return answer_session(self.db, session_ref, answer, option=option, option_text=option_text, reason=reason,
                              tool_use_id=tool_use_id, client=client, peers=peers, settings=settings,
                              now_ms=now_ms())

    @api("POST", "/api/v1/broadcast", "Type a text into every live session of a target (project, group:NAME, "
         "session:ID)", body=("target", "text", "is_command"), not_sent=("confirm_s", "on_delivery"), status=201,
         from_wire=lambda got: BroadcastResult(got["broadcast_id"], got["target"], got["text"],
                                               [from_json(Delivery, d) for d in got["deliveries"]],
                                               list(got.get("unreached") or [])))
    def send_broadcast(self, target: str, text: str, *, is_command: bool = False,
                       confirm_s: float = BROADCAST_CONFIRM_S,
                       on_delivery: Callable[[Session, str, str, int, int], None] | None = None) -> BroadcastResult:
        """Send a text to every live session of a target (a server waits for confirmations its own way)."""
        # SECURITY: this types into AI agents that run shell commands; the server's token and
        # cross-site rules guard every POST, and the fleet refuses non-Claude panes and open dialogs.
        return send_broadcast(self.db, target, text, now_ms=now_ms(), is_command=is_command, confirm_s=confirm_s,
                              on_delivery=on_delivery)

    @api("GET", "/api/v1/broadcast/recipients", "The live sessions a broadcast target reaches", query=("target",))
    def list_broadcast_recipients(self, target: str) -> list[Session]:
        """Return the live sessions a broadcast target (project, group:NAME or session:ID) names."""
        return list_broadcast_recipients(self.db, target)

    @api("GET", "/api/v1/deliveries", "Per-session results of a broadcast",
         query=("broadcast_id=broadcast", "pending_on"))
    def list_deliveries(self, *, broadcast_id: str | None = None, pending_on: str | None = None) -> list[Delivery]:
        """Return the per-session results of broadcasts."""
        return list_deliveries(self.db, broadcast_id=broadcast_id, pending_on=pending_on)

    @api("GET", "/api/v1/updates", "List updates, newest last", query=("task_ids=task", "update_id=id", "limit"),
         resolve={"task_ids": "get_task"})
    def list_updates(self, *, task_ids: list[str] | None = None, update_id: str | None = None,
                     limit: int = 50) -> list[Update]:
        """Return the newest updates, newest last."""
        return list_updates(self.db, task_ids=task_ids, update_id=update_id, limit=limit)

    @api("POST", "/api/v1/updates", "Post a progress note (is_done: the task is done too)",
         body=("text", "task_ref=task", "source", "session_id", "is_done"), status=201, check=_only_message_updates,
         here={"pane": "a note from inside a pane finds its task on this host; name the task "
                       "(clare update TASK TEXT) or run without --remote"})
    def post_update(self, text: str, *, task_ref: str | None = None, session_id: str | None = None,
                    pane: tuple[str | None, str] | None = None, source: str = "message",
                    is_done: bool = False) -> Update:
        """Add a progress note to a task and/or a session (is_done: the task is done too)."""
        return post_update(self.db, text, task_ref=task_ref, session_id=session_id, pane=pane, source=source,
                           is_done=is_done, now_ms=now_ms())

    @api("GET", "/api/v1/status", "The roll-up", query=("project_ref=project", "group_ref=group"),
         schema="Status", to_wire=_status_to_wire, from_wire=_status_from_wire)
    def get_status(self, *, project_ref: str | None = None, group_ref: str | None = None) -> StatusReport:
        """Return the roll-up: per project its counts and tokens, the live sessions and their tasks."""
        return get_status(self.db, project_ref=project_ref, group_ref=group_ref)

    @api("GET", "/api/v1/status", "", from_wire=lambda got: got["clock"], is_routed=False)
    def clock_status(self) -> dict[str, Any]:
        """Return what this host's peers say of its clock, and the events it holds back."""
        return clock_status(self.db, now_ms=now_ms())

    @api("GET", "/api/v1/status", "", from_wire=lambda got: got["n_events"], is_routed=False)
    def count_events(self) -> int:
        """Return how many events the log holds."""
        return count_events(self.db)

    @api("GET", "/api/v1/events", "", query=("limit",), from_wire=lambda page: [
         from_json(Event, e) for e in page["events"]], is_routed=False)
    def list_events(self, *, limit: int = 50) -> list[Event]:
        """Return the newest events, newest last."""
        return list_events(self.db, limit=limit)

    @api("GET", "/api/v1/history", "Events naming any of the given entity ids", query=("entity_ids=entity", "limit"))
    def list_history(self, entity_ids: list[str], *, limit: int = 200) -> list[Event]:
        """Return the newest events naming any of these entities, oldest first."""
        return list_history(self.db, entity_ids, limit=limit)

    @api("POST", "/api/v1/import", "Store events given as JSON lines", body=("lines",), schema="ImportResult",
         is_lenient=True,  # a bad line rejects that line only
         body_schema={"type": "object", "required": ["lines"], "properties": {
             "lines": {"type": "array", "items": {"type": "string"}}}},
         to_wire=lambda req, r: {"inserted": r[0].inserted, "duplicates": r[0].n_duplicates,
                                 "conflicts": r[0].conflicts, "rejected": r[1]},
         from_wire=lambda got: (InsertResult([from_json(Event, e) for e in got["inserted"]], got["duplicates"],
                                             got["conflicts"]), got["rejected"]))
    def import_events(self, lines: Iterable[str]) -> tuple[InsertResult, list[str]]:
        """Store the events of JSON lines not yet here; return what happened and one reason per bad line."""
        return import_events(self.db, lines, now_ms=now_ms())

    @api("POST", "/api/v1/replay", "Rebuild every projection from the log", body_schema={"type": "object"},
         schema="ReplayResult", to_wire=lambda req, n: {"events": n}, from_wire=lambda got: got["events"])
    def replay(self) -> int:
        """Rebuild every projection from the log; return how many events were applied."""
        return replay(self.db)


# --- the remote twin of Services: the same methods, over a Clare server's JSON API ----------------

REMOTE_TIMEOUT_S = 30.0


class RemoteServices(Services):
    """The services of Services, run by a remote Clare: each call follows its service's @api declaration.

    Raises the same error classes as a local call, with the server's message.
    """

    __slots__ = ("url", "token")

    def __init__(self, url: str, *, token: str | None = None):
        self.url = url.rstrip("/")
        self.token = token

    def _run(self, fn: Callable[..., Any], spec: Api | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import inspect
        import urllib.parse

        if spec is None:
            raise UsageError(f"{fn.__name__} works on this host only (its tmux, hooks and files); run the command "
                             "on that host without --remote (and without CLARE_URL)")
        signature = inspect.signature(fn)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        path, query, body = spec.path, [], {}
        for w in wire_args(fn.__name__):
            value = bound.arguments[w.arg]
            if w.where == "here" and value != w.default:
                raise UsageError(spec.here.get(w.arg) or f"{w.arg} works on this host only; run without --remote")
            if w.where == "path":
                ref = value.id if w.kind == "object" else value
                path = path.replace(f"{{{w.name}}}", urllib.parse.quote(str(ref), safe=""))
            elif w.where == "query":
                if w.kind == "list" and value == []:
                    return []  # no ids: nothing matches, as locally
                query += _query_pairs(w, value, max_int=spec.max_int)
            elif w.where == "body" and (w.is_required or value not in (None, (), [])):
                body[w.name] = list(value) if w.kind == "list" else value
        if spec.cursor is not None:
            return self._follow_pages(signature, spec, path, query)
        path += "?" + urllib.parse.urlencode(query) if query else ""
        got = self._ask(spec, path, body)
        if spec.from_wire is not None:
            return spec.from_wire(got)
        answer = signature.return_annotation
        if getattr(answer, "__origin__", None) is list:
            return [from_json(answer.__args__[0], x) for x in got]
        return from_json(answer, got)


    def _ask(self, spec: Api, path: str, body: dict[str, Any]) -> Any:
        return http_json(self.url, path, method=spec.method, body=body if spec.method in ("POST", "PATCH") else None,
                         token=self.token, timeout_s=REMOTE_TIMEOUT_S, say_where=False,
                         hint_401=f"set CLARE_TOKEN to the token of the Clare at {self.url}: "
                                  "the 'token' in its clare.toml, or the CLARE_TOKEN it runs with")

    def _follow_pages(self, signature: Any, spec: Api, path: str, query: list[tuple[str, str]]) -> list[Any]:
        """Return a paged list: the one page a limit asks for, else every page in turn (each one answer's worth)."""
        import urllib.parse

        item_type, key = signature.return_annotation.__args__[0], spec.path.rsplit("/", 1)[1]
        is_one_page = any(name == "limit" for name, _ in query)
        query = [*query, ("limit", str(spec.max_int))] if not is_one_page else query
        items: list[Any] = []
        while True:
            got = self._ask(spec, f"{path}?{urllib.parse.urlencode(query)}", {})
            items += (from_json(item_type, x) for x in got[key])
            if is_one_page or not got["has_more"]:
                return items
            query = [(name, value) for name, value in query if name != "after"] + [("after", got["next_after"])]


def _query_pairs(w: Wire, value: Any, *, max_int: int) -> list[tuple[str, str]]:
    if value is None or (w.kind == "bool" and value is False and not w.is_optional):
        return []
    if w.kind == "bool":
        return [(w.name, str(int(value)))]
    if w.kind == "int":
        return [(w.name, str(min(value, max_int)))]
    if w.kind == "list":
        return [(w.name, x) for x in value]
    if w.kind == "range":
        return [(w.name, f"{value[0]}-{value[1]}")]
    return [(w.name, value)]


# ==========================================================================
# 8. HTTP: the server, the HTML kit, the pages, the JSON API and OpenAPI, the sync endpoints, ROUTES.
# ==========================================================================

# --- 8.1 The server: requests and responses, the security checks, _dispatch, the threaded server --------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_BODY_BYTES = 1024 * 1024  # JSON and form bodies; larger ones get 413 before a byte is read
MAX_SYNC_BODY_BYTES = 8 * 1024 * 1024  # a sync batch of events
MAX_DRAIN_BYTES = 64 * 1024 * 1024  # of a body refused as too large, read and dropped after the 413
SYNC_PATH_PREFIX = "/api/v1/sync/"
REQUEST_TIMEOUT_S = 10.0  # per socket read or write: a slow or silent client loses its connection
REQUEST_DEADLINE_S = 60.0  # a request's head and body, from its first byte: a trickling client is cut off
MAX_HANDLER_THREADS = 128  # requests handled at once; one more gets a quick 503
RESERVED_THREADS_SHARE = 8  # one handler slot in 8 (at least one) is kept for requests that carry the token
HEADER_DEADLINE_S = 2.0  # from a connection's first byte (or its accept) to the end of its request's head
MAX_HEAD_BYTES = 64 * 1024 + 1024  # a head this long goes to a handler, which refuses it (414, 431)
MAX_WAITING_CONNECTIONS = 4096  # connections waiting for a head; past it the oldest is closed
BUSY_WAIT_S = 1.0  # a request whose head is here waits this long for a free handler slot, then gets 503
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Connection: close\r\nContent-Length: 84\r\n\r\n"
               b'{"error": {"code": "busy", "message": "the server is busy; try again in a second"}}\n')  # past the cap
LISTEN_BACKLOG = 128  # with the default 5, p99 latency under load is near a second (DESIGN §8)
SHUTDOWN_GRACE_S = 10.0  # how long SIGTERM waits for requests in flight to finish
POLL_S = 5  # how often htmx refreshes a polled fragment
LOGIN_COOKIE = "clare_login"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 411: "length_required",
               413: "payload_too_large", 414: "uri_too_long", 415: "unsupported_media_type",
               422: "invalid", 431: "headers_too_large", 500: "internal", 501: "not_implemented"}
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
HTMX_VERSION = "2.0.11"  # static/htmx.min.js, from the npm package htmx.org; bump both (and its test's hash)
PANE_POLL_S = 2  # how often an open session page refreshes its live pane
FLEET_POLL_S = 2  # how often the dashboard's sessions refresh: a hook's report shows within 2.5 s
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on our own form posts.
    ("Referrer-Policy", "same-origin"),
    # Scripts and styles only from /static, never inline (STYLESHEET is /static/clare.css).
    ("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
)


class HttpError(ClareError):
    """A refusal decided by the HTTP layer itself: auth, size, media type, routing."""

    def __init__(self, http_status: int, message: str, *, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.http_status = http_status
        self.headers = headers


@record_type(frozen=True, slots=True)
class WebConfig:
    host: str  # the address the server binds
    port: int  # 0 picks a free port; the server then knows the real one
    token: str | None  # every route but /login and /static/ needs it (bearer or login cookie); None opens none
    allowed_hosts: frozenset[str]  # Host header names accepted (DNS rebinding defence)
    csrf_token: str  # per-install secret that every HTML form and htmx request carries
    db_path: str
    log_requests: bool = False  # one line per request costs ~16% throughput (DESIGN §8)
    timeout_s: float = REQUEST_TIMEOUT_S
    deadline_s: float = REQUEST_DEADLINE_S
    max_threads: int = MAX_HANDLER_THREADS
    peers: Sequence[Peer] = ()  # clare.toml's peers: under serve a PeerBook, read again as the file changes
    config_path: str = ""  # clare.toml: read where a request needs settings (see `settings`)
    contacts: PeerContacts = record_field(default_factory=PeerContacts)  # sync requests from peers

    @property
    def settings(self) -> dict[str, Any]:
        """Return clare.toml as it is now (peer tokens, [hosts.NAME] ssh, [fleet]): an edit needs no restart."""
        return load_config(self.config_path) if self.config_path else {}

    @property
    def login_cookie(self) -> str:
        """Return the login cookie's value: derived from the token, so the token itself never sits in a cookie."""
        return hmac_hex(self.token or "", "clare login cookie")


def hmac_hex(key: str, message: str) -> str:
    """Return HMAC-SHA256 of message under key, as hex."""
    import hashlib  # with hmac: only the server and the remote client need them
    import hmac

    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()


def same_secret(given: str | None, expected: str) -> bool:
    """Compare a secret in constant time; None never matches."""
    import hmac

    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def is_loopback(host: str) -> bool:
    """Tell whether binding `host` keeps the server on this machine."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def announce_url(bind_host: str, url: str, settings: dict[str, Any], *, path: str = "clare.toml") -> str | None:
    """Return the URL to announce: announce_url in clare.toml, else the bound one; None for loopback or all addresses.

    A loopback URL would name each reader's own host, and 0.0.0.0 names no host at all.
    """
    said = settings.get("announce_url")
    if said is not None:
        if said == "":
            return None  # announce_url = "": announce nothing
        try:
            return check_peer(said).url
        except ClareError as err:
            raise UsageError(f"{path}: announce_url: {err}") from err
    if is_loopback(bind_host) or bind_host in WILDCARD_HOSTS:
        return None
    return url


def web_config(paths: Paths, *, settings: dict[str, Any] | None = None, host: str = DEFAULT_HOST,
               port: int = DEFAULT_PORT, env: Mapping[str, str] | None = None, log_requests: bool = False) -> WebConfig:
    """Take token, allowed host names and peers from CLARE_TOKEN and clare.toml (`settings`, else read here).

    Every bind has a token: without CLARE_TOKEN or `token` in clare.toml, one is made and written there.
    """
    import socket

    config = load_config(paths.config) if settings is None else settings
    # SECURITY: loopback is no trust boundary (DESIGN §6): other users and every local agent reach it.
    token = ensure_token(paths.config, config, env=env)
    names = config.get("allowed_hosts", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{paths.config}: allowed_hosts must be a list of host names")
    allowed = {host.lower(), *LOOPBACK_HOSTS, *(n.lower() for n in names)}
    if host in WILDCARD_HOSTS:
        allowed.add(socket.gethostname().lower())
    db = open_db(paths.db)
    try:
        csrf = get_secret(db, "csrf_secret")
    finally:
        db.close()
    return WebConfig(host, port, token, frozenset(allowed), csrf, paths.db, log_requests,
                     peers=tuple(load_peers(config, path=paths.config)), config_path=paths.config)


@record_type(frozen=True, slots=True)
class Request:
    method: str
    path: str  # the raw (percent-encoded) path, without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercased
    body: bytes
    params: dict[str, str]  # the route's named groups, percent-decoded
    db: Db  # this thread's connection, borrowed for the request
    config: WebConfig

    @property
    def svc(self) -> Services:
        """Return the services bound to this request's database."""
        return Services(self.db)

    def arg(self, name: str, default: str | None = None) -> str | None:
        """Return the last value of one query parameter."""
        values = self.query.get(name)
        return values[-1] if values else default

    def int_arg(self, name: str, default: int, *, lo: int, hi: int) -> int:
        """Return an integer query parameter within [lo, hi]; 400 otherwise."""
        text = self.arg(name)
        if text is None or text == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise HttpError(400, f"query parameter {name}={text[:40]!r} is not an integer") from None
        if not lo <= value <= hi:
            raise HttpError(400, f"query parameter {name}={value} is outside {lo}-{hi}")
        return value

    def json(self, *, required: tuple[str, ...] = (), optional: tuple[str, ...] = (),
             is_lenient: bool = False) -> dict[str, Any]:
        """Return the JSON object body holding the required fields and no unknown ones.

        Standard JSON only, unless `is_lenient`: a batch whose items are checked one by one.
        """
        try:
            value = parse_json(self.body or b"{}", is_lenient=is_lenient)
        except (ValueError, RecursionError) as err:  # SECURITY: '[[[[...' nested deeper than the stack
            raise HttpError(400, f"the body is not valid JSON ({str(err)[:100]}); send a JSON object") from err
        if not isinstance(value, dict):
            raise UsageError("the body must be a JSON object")
        missing = [k for k in required if k not in value]
        if missing:
            raise UsageError(f"the body lacks {', '.join(missing)}")
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown:
            raise UsageError(f"unknown field {', '.join(unknown)}; known: {', '.join(required + optional)}")
        return value

    def form(self) -> dict[str, str]:
        """Return the urlencoded form body, the last value of each field."""
        from urllib.parse import parse_qsl

        try:
            return dict(parse_qsl(self.body.decode(), keep_blank_values=True, max_num_fields=200))
        except (UnicodeDecodeError, ValueError) as err:
            raise HttpError(400, f"the form body cannot be read ({err})") from err

    @property
    def is_htmx(self) -> bool:
        """Tell whether htmx sent this request (it then wants a fragment, not a page)."""
        return self.headers.get("hx-request") == "true"


@record_type(frozen=True, slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    chunks: Generator[bytes, None, None] | None = None  # instead of body: sent as made (chunked), never held whole


def _jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def json_response(value: Any, *, status: int = 200) -> Response:
    """Return a JSON response of a value, dataclasses included."""
    return Response(status, json.dumps(_jsonable(value), ensure_ascii=False).encode())


def error_json(status: int, message: str) -> bytes:
    """Return the JSON body of an error: {"error": {"code", "message"}}."""
    return json.dumps({"error": {"code": ERROR_CODES.get(status, "error"), "message": message}}).encode()


_LITERAL_ROUTES: dict[tuple[str, str], Callable[[Request], Response]] = {}  # (method, path) -> handler, for the
# routes without parameters ("/", "/frag/fleet"): found by the scan once, then by one dict lookup (a page poll's path)


def _route(method: str, path: str) -> tuple[Callable[[Request], Response], dict[str, str]]:
    """Find the handler of a path and method; 404 when no path matches, 405 with Allow when no method does."""
    known = _LITERAL_ROUTES.get((method, path))
    if known is not None:
        return known, {}
    from urllib.parse import unquote

    allowed = []
    for route_method, pattern, handler in ROUTES:
        m = pattern.fullmatch(path)
        if m is None:
            continue
        if route_method == method or (method == "HEAD" and route_method == "GET"):
            if not pattern.groups and re.sub(r"\\(.)", r"\1", pattern.pattern) == path:  # one key per route
                _LITERAL_ROUTES[(method, path)] = handler
            return handler, {k: unquote(v) for k, v in m.groupdict().items()}
        allowed.append(route_method)
    if allowed:
        allow = ", ".join(sorted(set(allowed) | ({"HEAD"} if "GET" in allowed else set())))
        raise HttpError(405, f"{method} is not allowed on {path}; use {allow}", headers=(("Allow", allow),))
    raise HttpError(404, f"no such path {path}; the API lives under /api/v1 (see /api/v1/openapi.json)")


def host_name(value: str) -> str:
    """Return the host part of a Host header value, lowercased, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    name, sep, port = value.rpartition(":")
    return name if sep and port.isdigit() else value


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check_host(config: WebConfig, hosts: list[str]) -> None:
    """Refuse a request whose Host is not a name this server answers to."""
    # SECURITY: DNS rebinding. A page on evil.example whose name is re-pointed at 127.0.0.1
    # reaches us with Host: evil.example. An IP literal cannot be rebound, so on a wildcard
    # bind (token required there) any literal address of this machine is fine.
    if len(hosts) != 1:
        raise HttpError(400, "a request needs exactly one Host header")
    name = host_name(hosts[0])
    if name in config.allowed_hosts or (config.host in WILDCARD_HOSTS and _is_ip(name)):
        return
    raise HttpError(403, f"host {name[:80]!r} is not one this server answers to; add it to allowed_hosts "
                         "in clare.toml if it is yours")


def check_origin(headers: dict[str, str]) -> None:
    """Refuse a state-changing request that a browser sent from another site."""
    # SECURITY: cross-site request forgery. Browsers send Origin on every non-GET fetch and
    # form post; a request with neither Origin nor Sec-Fetch-Site came from a non-browser client.
    if headers.get("sec-fetch-site", "").lower() == "cross-site":
        raise HttpError(403, "cross-site requests may not change anything here")
    origin = headers.get("origin")
    if origin is None:
        return
    from urllib.parse import urlsplit

    own = headers.get("host", "").lower()
    parts = urlsplit(origin.lower())
    if parts.scheme not in ("http", "https") or parts.netloc != own:
        raise HttpError(403, f"origin {origin[:80]!r} is not this server ({own}); "
                             "state changes must come from Clare's own pages or an API client")


def check_same_origin(headers: dict[str, str]) -> None:
    """Refuse a read of a pane or a transcript that a browser made for another site, even a same-site one."""
    # SECURITY: a page on another port of this host is "same-site"; only our own pages (same-origin)
    # and clients that are not browsers (no Sec-Fetch-Site, no Origin) may read what a session shows.
    site = headers.get("sec-fetch-site", "").lower()
    if site and site not in ("same-origin", "none"):
        raise HttpError(403, f"a {site} request may not read a session's pane or transcript; open Clare's own page")
    check_origin(headers)


def is_public(path: str) -> bool:
    """Tell whether a path is open without the token: the login page and the vendored static files."""
    return path == "/login" or path.startswith("/static/")


def is_authenticated(config: WebConfig, headers: dict[str, str]) -> bool:
    """Tell whether a request carries the bearer token or a valid login cookie."""
    if config.token is None:  # no token, no way in: a server is never open by mistake
        return False
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and same_secret(given.strip(), config.token):
        return True
    # SECURITY: any page on localhost (another port) can set a second clare_login cookie; browsers
    # send both, in an order it can influence. The valid one counts, wherever it stands.
    return any(same_secret(value, config.login_cookie) for value in _cookies(headers.get("cookie", ""), LOGIN_COOKIE))


def check_auth(config: WebConfig, path: str, headers: dict[str, str]) -> None:
    """Require the bearer token or the login cookie on every path but the public ones."""
    if is_public(path) or is_authenticated(config, headers):
        return
    raise HttpError(401, "missing or wrong token; send 'Authorization: Bearer TOKEN', or open the login URL "
                         "that 'clare serve' printed (the token is in clare.toml)",
                    headers=(("WWW-Authenticate", 'Bearer realm="clare"'),))


def _cookies(header: str, name: str) -> list[str]:
    values = []
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            values.append(value)
    return values


def check_media(config: WebConfig, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
    """Require JSON on the API and the CSRF token on forms, for a state-changing request."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if path.startswith("/api/"):
        # SECURITY: a cross-site page can POST text/plain or a form without a preflight;
        # application/json it cannot.
        if (body or method != "DELETE") and ctype != "application/json":
            raise HttpError(415, "send the body as JSON with 'Content-Type: application/json' "
                                 f"(got {ctype or 'none'!r})")
        return
    if body and ctype != "application/x-www-form-urlencoded":
        raise HttpError(415, f"send the form as application/x-www-form-urlencoded (got {ctype or 'none'!r})")
    token = headers.get("x-csrf-token")
    if token is None and body:
        from urllib.parse import parse_qs

        fields = parse_qs(body.decode(errors="replace"), max_num_fields=200).get("csrf")
        token = fields[-1] if fields else None
    # SECURITY: the per-install CSRF token rides in every page (hx-headers and a hidden field).
    if not same_secret(token, config.csrf_token):
        raise HttpError(403, "missing or stale form token; reload the page and try again")


def check_length(path: str, headers: dict[str, str], *, n_lengths: int = 1) -> int:
    """Return the declared body size; 411 without a length, 413 over the limit, before a byte is read."""
    if "transfer-encoding" in headers:
        raise HttpError(411, "chunked bodies are not accepted; send Content-Length")
    if n_lengths > 1:  # SECURITY: two lengths are how requests get smuggled past a proxy
        raise HttpError(400, "a request needs at most one Content-Length header")
    text = headers.get("content-length", "0").strip() or "0"
    if not _is_ascii_digits(text):  # SECURITY: '²'.isdigit() is True, and int('²') raises
        raise HttpError(400, f"bad Content-Length {text[:20]!r}; send the body's size in ASCII digits")
    size = int(text)
    limit = MAX_SYNC_BODY_BYTES if path.startswith(SYNC_PATH_PREFIX) else MAX_BODY_BYTES
    if size > limit:
        raise HttpError(413, f"the body is {size} bytes, over the limit of {limit}; send less at a time")
    return size


def _is_ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) < 19


def _error_response(err: ClareError, *, is_api: bool, is_htmx: bool) -> Response:
    """Return the answer to a refused request: JSON for the API, the message box for htmx, else a page."""
    extra = err.headers if isinstance(err, HttpError) else ()
    status = err.http_status
    if is_api:
        return Response(status, error_json(status, str(err)), headers=extra)
    if status == 401 and is_htmx:  # a poll after the login lapsed: the whole page goes to the login form
        return html_response(flash(str(err)), status=status, headers=(*extra, ("HX-Redirect", "/login")))
    if is_htmx:  # htmx swaps it into the page's message box instead of the fragment it asked for
        return html_response(flash(str(err)), status=status,
                             headers=(*extra, ("HX-Retarget", "#flash"), ("HX-Reswap", "outerHTML")))
    return html_response(error_page(status, str(err)), status=status, headers=extra)


def _discard_body(h: Any) -> bool:
    """Read and drop a refused request's body if its size passed the limit, so the client sees the answer."""
    # Closing with unread data makes the kernel send RST, and the client may lose our reply.
    if h.body_size is None:
        return False
    try:
        return len(h.rfile.read(h.body_size)) == h.body_size
    except OSError:
        return False


def _drain_refused_body(h: Any, headers: dict[str, str]) -> None:
    """Read and drop the body of a request answered 413, after the answer, up to MAX_DRAIN_BYTES.

    A client still sending it then reads our 413; closing on it unread makes the kernel send
    RST, and the client saw "broken pipe" instead of the limit.
    """
    text = headers.get("content-length", "").strip()
    n_left = min(int(text), MAX_DRAIN_BYTES) if _is_ascii_digits(text) else 0
    with contextlib.suppress(OSError):  # a client that stops sending times out like any slow one
        h.wfile.flush()
        while n_left > 0:
            chunk = h.rfile.read(min(n_left, 64 * 1024))
            if not chunk:
                return
            n_left -= len(chunk)


def _dispatch(h: Any, *, error: HttpError | None = None) -> None:
    """Answer one request: check it, route it, run its handler and write the response in one buffer.

    The only code that writes to the socket. `error` answers a request http.server refused to parse.
    """
    server, method, started = h.server, getattr(h, "command", None) or "GET", time.perf_counter()
    config: WebConfig = server.config
    path, _, query_text = str(getattr(h, "path", "/")).partition("?")
    message = getattr(h, "headers", None)  # absent when the request line itself was bad
    headers = {k.lower(): v for k, v in message.items()} if message is not None else {}
    is_api = path.startswith("/api/") or error is not None  # a broken request gets the plain JSON error
    db, resp = None, None
    h.body_is_read, h.body_size = False, None
    try:
        if error is not None or message is None:
            raise error or HttpError(400, "the request cannot be read")
        check_host(config, message.get_all("Host") or [])
        size = h.body_size = check_length(path, headers, n_lengths=len(message.get_all("Content-Length") or []))
        # SECURITY: the one door of the token, before routing: a route added later is guarded by default.
        check_auth(config, path, headers)
        handler, params = _route(method, path)
        if method in STATE_CHANGING:
            check_origin(headers)
        body = h.rfile.read(size) if size else b""
        if len(body) != size:
            raise ConnectionError("the client closed the connection inside the body")
        h.body_is_read = True
        if method in STATE_CHANGING:
            check_media(config, method, path, headers, body)
        from urllib.parse import parse_qs

        db = server.take_db()
        req = Request(method, path, parse_qs(query_text, max_num_fields=100), headers, body, params, db, config)
        resp = handler(req)
    except (TimeoutError, ConnectionError):
        h.close_connection = True  # the client is too slow or gone: nobody to answer
        return
    except ClareError as err:
        resp = _error_response(err, is_api=is_api, is_htmx=headers.get("hx-request") == "true")
    except Exception:
        import traceback

        traceback.print_exc(file=sys.stderr)
        resp = Response(500, error_json(500, "internal error; see the server's log"))
    finally:
        if db is not None and (resp is None or resp.chunks is None):  # a stream reads on while it is sent
            server.give_db(db)
            db = None
    # SECURITY: a body left unread (or of unknown length: chunked, a bad Content-Length) would be
    # parsed as the next request on this connection: request smuggling. Drop it, or close.
    # A stranger's body (401) is not worth reading: close instead.
    if not h.body_is_read and (h.body_size is None or (h.body_size and (
            resp.status == 401 or not _discard_body(h)))):
        h.close_connection = True
    if server.is_stopping:
        h.close_connection = True
    stream = resp.chunks
    resp, head = _response_head(resp, is_closing=h.close_connection)
    try:
        if resp.chunks is None:
            _send(h.connection, head, b"" if method == "HEAD" else resp.body)
        else:
            _send(h.connection, head)
            for chunk in resp.chunks if method != "HEAD" else ():
                if chunk:
                    _send(h.connection, b"%x\r\n" % len(chunk), chunk, b"\r\n")
            _send(h.connection, b"0\r\n\r\n")
    except (TimeoutError, ConnectionError):
        h.close_connection = True
    except Exception:  # a stream failed after its status went out: end the connection short, the answer cut
        import traceback

        traceback.print_exc(file=sys.stderr)
        h.close_connection = True
    finally:
        if stream is not None:
            stream.close()  # ends the stream's read transaction before its connection is lent again
        if db is not None:
            server.give_db(db)
    if resp.status == 413 and not h.body_is_read:
        _drain_refused_body(h, headers)
    if config.log_requests:
        h.log_message('"%s %s" %d %.1f ms', method, path, resp.status, (time.perf_counter() - started) * 1000)


def _send(sock: Any, *parts: bytes) -> None:
    """Write a response's parts (head, body) in one system call where the socket takes them: no copy, no Nagle stall."""
    n_sent = sock.sendmsg(parts)  # a dashboard is ~200 KB: head + body would copy it
    for part in parts:
        if n_sent >= len(part):
            n_sent -= len(part)
            continue
        sock.sendall(memoryview(part)[n_sent:])
        n_sent = 0


def _response_head(resp: Response, *, is_closing: bool) -> tuple[Response, bytes]:
    """Return the response and its status line and headers: a 500 instead if a header value holds a line break."""
    from http.server import BaseHTTPRequestHandler

    reason = BaseHTTPRequestHandler.responses.get(resp.status, ("",))[0]
    lines = [f"HTTP/1.1 {resp.status} {reason}", f"Content-Type: {resp.content_type}",
             "Transfer-Encoding: chunked" if resp.chunks is not None else f"Content-Length: {len(resp.body)}",
             *(f"{k}: {v}" for k, v in SECURITY_HEADERS)]
    if not any(k.lower() == "cache-control" for k, _ in resp.headers):
        lines.append("Cache-Control: no-store")
    lines += [f"{k}: {v}" for k, v in resp.headers]
    if is_closing:
        lines.append("Connection: close")
    # SECURITY: the one place headers are written. A value with CR or LF (an id from an old log,
    # a bug) would end the header and start another one (Set-Cookie...): refuse the whole answer.
    if any("\r" in line or "\n" in line for line in lines):
        print(f"clare: refused a {resp.status} answer: a header value holds a line break", file=sys.stderr)
        return _response_head(Response(500, error_json(500, "internal error; see the server's log")),
                              is_closing=is_closing)
    return resp, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


_SERVER_CLASS: list[type] = []  # made on first use: http.server is too heavy for every CLI start


def make_server(config: WebConfig) -> Any:
    """Bind a ThreadingHTTPServer for `config` (port 0 picks a free port); serve it with serve_forever."""
    if not _SERVER_CLASS:
        _SERVER_CLASS.append(_define_server())
    try:
        return _SERVER_CLASS[0](config)
    except OSError as err:
        raise ClareError(f"cannot listen on {config.host}:{config.port}: {err.strerror}; "
                         "pick another --port or stop what holds it") from err


def _head_is_authenticated(config: WebConfig, head: bytes) -> bool:
    """Tell whether a request's raw head carries the token (bearer or login cookie), before it is parsed."""
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        name, sep, value = line.partition(":")
        key = name.strip().lower()
        if sep and key in ("authorization", "cookie"):
            headers[key] = f"{headers[key]}; {value.strip()}" if key in headers else value.strip()
    return is_authenticated(config, headers)


def _define_server() -> type:
    # One piece on purpose (165 lines): its three classes subclass http.server's, which is imported here
    # only, on the first bind (an import of 15 ms that no CLI command should pay), and they share the
    # server's state (connection pool, busy count, thread slots). Split, they would each re-import it.
    import selectors
    import socket
    import socketserver
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class RequestReader:
        """A socket's reads for one request: the head the gate read first, then the socket, each read
        under timeout_s and all of them under one deadline. What is left over goes back to the gate."""

        def __init__(self, sock: socket.socket, head: bytes, *, timeout_s: float, deadline_s: float):
            self.sock, self.timeout_s = sock, timeout_s
            self.buf = bytearray(head)  # read from the socket, not yet taken by the handler
            self.deadline = time.monotonic() + deadline_s  # the head has arrived: the clock runs

        def _fill(self) -> bool:
            # SECURITY: a per-read timeout alone lets a client that sends a byte every few seconds hold
            # its thread forever (slowloris).
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request took too long to arrive")
            if left >= self.timeout_s:  # the socket has the per-read timeout (the gate set it): no syscall
                chunk = self.sock.recv(65536)
            else:
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(65536)
                finally:
                    self.sock.settimeout(self.timeout_s)  # writes keep the plain per-write timeout
            self.buf += chunk
            return bool(chunk)

        def readline(self, limit: int = -1) -> bytes:
            while True:
                end = self.buf.find(b"\n") + 1
                if end and (limit < 0 or end <= limit):
                    break
                if 0 <= limit <= len(self.buf):
                    end = limit
                    break
                if not self._fill():
                    end = len(self.buf)
                    break
            line = bytes(self.buf[:end])
            del self.buf[:end]
            return line

        def read(self, size: int = -1) -> bytes:
            while (size < 0 or len(self.buf) < size) and self._fill():
                pass
            data = bytes(self.buf if size < 0 else self.buf[:size])
            del self.buf[:len(data)]
            return data

        def close(self) -> None:
            pass

    class Handler(BaseHTTPRequestHandler):
        server: "Server"  # the class below: its config, enter() and leave()
        protocol_version = "HTTP/1.1"  # keep-alive
        server_version = f"clare/{__version__}"
        sys_version = ""

        def setup(self) -> None:
            # StreamRequestHandler.setup without its socket files and settimeout (a syscall per request):
            # the gate gave the socket its per-read and per-write timeout when it handed it over.
            config = self.server.config
            sock, head = self.request  # the gate hands over the connection with the head it read
            self.request = self.connection = sock
            self.reader = RequestReader(sock, head, timeout_s=config.timeout_s, deadline_s=config.deadline_s)
            self.rfile = self.reader  # type: ignore[assignment]  # readline() and read() are all http.server uses
            self.wfile = socketserver._SocketWriter(sock)  # type: ignore[attr-defined]  # what wbufsize 0 gives

        def handle(self) -> None:
            """Answer one request; the gate waits for the next one on this connection, without a thread."""
            self.close_connection = True
            try:
                self.handle_one_request()
            except (ConnectionError, TimeoutError):  # the client went away or is too slow: nothing to answer
                self.close_connection = True

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            self.close_connection = True
            _dispatch(self, error=HttpError(code, message or explain or "the request cannot be read"))

        def log_message(self, format: str, *args: Any) -> None:
            if self.server.config.log_requests:
                super().log_message(format, *args)

        def handle_one_request(self) -> None:
            self.is_counted = False
            try:
                super().handle_one_request()
            finally:
                if self.is_counted:
                    self.server.leave()

        def parse_request(self) -> bool:
            # Counted from the request line on (before a 100 Continue goes out), so SIGTERM waits for it.
            self.server.enter()
            self.is_counted = True
            return super().parse_request()

        def do_any(self) -> None:
            _dispatch(self)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_any

    class Gate:
        """The selectors loop in front of the handlers: a connection gets a handler thread only once
        its request's head has arrived, and waits (idle, or sending its head) without one.

        SECURITY: otherwise any local process holds every thread with idle connections, and on
        loopback a per-address cap cannot tell the attacker from the browser (both 127.0.0.1).
        """

        def __init__(self, server: Any):  # the Server below
            self.server = server
            self.selector = selectors.DefaultSelector()
            self.wake_r, self.wake_w = socket.socketpair()
            self.wake_r.setblocking(False)
            self.wake_w.setblocking(False)
            self.selector.register(self.wake_r, selectors.EVENT_READ)
            self.lock = threading.Lock()
            self.arrived: list[tuple[Any, Any, bytes, float]] = []  # (sock, address, head, deadline) from other threads
            self.waiting: dict[Any, list[Any]] = {}  # sock -> [address, head so far, deadline]; gate only
            self.queued: list[tuple[Any, Any, bytes, float]] = []  # heads here, no slot yet: (..., give up at)
            self.is_stopped = False
            self.thread = threading.Thread(target=self.run, name="clare-gate", daemon=True)
            self.thread.start()

        def add(self, sock: socket.socket, address: Any, head: bytes, *, wait_s: float) -> None:
            """Let the gate wait for the (rest of the) next request's head on a connection."""
            with self.lock:
                if self.is_stopped:
                    sock.close()
                    return
                self.arrived.append((sock, address, head, time.monotonic() + wait_s))
            self.wake()

        def wake(self) -> None:
            """Make the loop look again: a connection came, or a handler slot came free."""
            with contextlib.suppress(BlockingIOError, OSError):
                self.wake_w.send(b"x")

        def run(self) -> None:
            while not self.is_stopped:
                now = time.monotonic()
                timeout = min([w[2] for w in self.waiting.values()] + [q[3] for q in self.queued],
                              default=now + 0.5) - now
                for key, _ in self.selector.select(min(max(timeout, 0), 0.5)):
                    if key.fileobj is self.wake_r:
                        with contextlib.suppress(BlockingIOError, OSError):
                            self.wake_r.recv(4096)
                        self._take_arrived()
                    else:
                        self._read(key.fileobj)
                now = time.monotonic()
                for sock in [s for s, w in self.waiting.items() if w[2] <= now]:
                    self._drop(sock)  # silent or too slow: hung up without an answer, as before a head
                self._start_queued(now)

        def _start_queued(self, now: float) -> None:
            """Start the queued requests that get a slot now, first come first served; 503 those out of time."""
            kept = []
            for sock, address, head, give_up_at in self.queued:
                if self.server.try_start_handler(sock, address, head):
                    continue
                if give_up_at <= now:
                    self.server.refuse_busy(sock)
                else:
                    kept.append((sock, address, head, give_up_at))
            self.queued = kept

        def _take_arrived(self) -> None:
            with self.lock:
                taken = self.arrived
                self.arrived = []
            for sock, address, head, deadline in taken:
                if len(self.waiting) >= MAX_WAITING_CONNECTIONS:
                    self._drop(min(self.waiting, key=lambda s: self.waiting[s][2]))
                sock.setblocking(False)
                self.waiting[sock] = [address, head, deadline]
                self.selector.register(sock, selectors.EVENT_READ)
                if head:
                    self._hand_over_if_complete(sock)

        def _read(self, sock: Any) -> None:
            entry = self.waiting[sock]
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._drop(sock)
                return
            if not entry[1]:  # the first byte of a request: its head must be complete soon
                entry[2] = min(entry[2], time.monotonic() + min(HEADER_DEADLINE_S, self.server.config.deadline_s))
            entry[1] += chunk
            self._hand_over_if_complete(sock)

        def _hand_over_if_complete(self, sock: socket.socket) -> None:
            address, head, _ = self.waiting[sock]
            if b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_HEAD_BYTES:
                return
            self.selector.unregister(sock)
            del self.waiting[sock]
            sock.settimeout(self.server.config.timeout_s)  # every read and write of its handler
            self.queued.append((sock, address, head, time.monotonic() + BUSY_WAIT_S))
            self._start_queued(time.monotonic())

        def _drop(self, sock: socket.socket) -> None:
            self.selector.unregister(sock)
            del self.waiting[sock]
            self.server.shutdown_request(sock)

        def stop(self) -> None:
            """Stop the loop and close every connection still waiting."""
            with self.lock:
                self.is_stopped = True
                arrived = self.arrived
                self.arrived = []
            with contextlib.suppress(OSError):
                self.wake_w.send(b"x")
            self.thread.join(5)
            for late in arrived + self.queued:
                late[0].close()
            for sock in list(self.waiting):
                self._drop(sock)
            self.selector.close()
            self.wake_r.close()
            self.wake_w.close()

    class Server(ThreadingHTTPServer):
        daemon_threads = True  # idle keep-alive connections must not hold up exit; see drain()
        request_queue_size = LISTEN_BACKLOG

        def __init__(self, config: WebConfig):
            if ":" in config.host:
                self.address_family = socket.AF_INET6
            self.config = config
            self.is_stopping = False
            self._gate: Gate | None = None  # made once the socket is bound
            self._dbs: list[Db] = []  # idle connections: one per thread at a time, reused
            self._lock = threading.Lock()
            self._idle = threading.Condition(self._lock)
            self._n_busy = 0  # requests being handled now
            n_reserved = max(1, config.max_threads // RESERVED_THREADS_SHARE) if config.max_threads > 1 else 0
            self._slots = threading.BoundedSemaphore(config.max_threads - n_reserved)  # for any request
            self._reserved = threading.BoundedSemaphore(max(n_reserved, 1))  # only for requests with the token
            if not n_reserved:
                self._reserved.acquire()
            super().__init__((config.host, config.port), Handler)
            self.config = record_replace(config, port=self.server_address[1])
            self._gate = Gate(self)

        def process_request(self, request: Any, client_address: Any) -> None:
            """Give a new connection to the gate: it gets a thread once its request's head is here."""
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert self._gate is not None  # serve_forever runs only on a bound server
            self._gate.add(request, client_address, b"",
                           wait_s=min(HEADER_DEADLINE_S, self.config.deadline_s, self.config.timeout_s * 4))

        def try_start_handler(self, sock: socket.socket, address: Any, head: bytes) -> bool:
            """Run one request whose head has arrived in a thread of its own; False if no slot is free."""
            # SECURITY: strangers cannot take the reserved slots; a request with the token takes any.
            slot = self._slots if self._slots.acquire(blocking=False) else None
            if slot is None and _head_is_authenticated(self.config, head) and self._reserved.acquire(blocking=False):
                slot = self._reserved
            if slot is None:
                return False
            try:
                threading.Thread(target=self._handle, args=(sock, address, head, slot), daemon=True).start()
            except BaseException:
                slot.release()
                self.shutdown_request(sock)
                raise
            return True

        def refuse_busy(self, sock: socket.socket) -> None:
            """Answer 503 to a request that found no free handler slot in time, and close."""
            # This canned answer is the one write outside _dispatch: there is no handler thread to dispatch on.
            with contextlib.suppress(OSError):
                sock.settimeout(1)
                sock.send(BUSY_ANSWER)
            self.shutdown_request(sock)

        def _handle(self, sock: socket.socket, address: Any, head: bytes, slot: Any) -> None:
            is_kept, left = False, b""
            try:
                handler = Handler((sock, head), address, self)  # type: ignore[arg-type]  # setup() unpacks it
                is_kept, left = not handler.close_connection and not self.is_stopping, bytes(handler.reader.buf)
            except Exception:  # the edge of a handler thread: one connection lost, not the server
                self.handle_error(sock, address)
            finally:
                slot.release()
                if self._gate is not None:
                    self._gate.wake()  # a request may be queued for this slot
            if is_kept and self._gate is not None:  # keep-alive: the next request waits in the gate, threadless
                self._gate.add(sock, address, left, wait_s=self.config.timeout_s)
            else:
                self.shutdown_request(sock)

        def take_db(self) -> Db:
            """Borrow an open connection (a new connection per request costs ~4x, DESIGN §8)."""
            with self._lock:
                if self._dbs:
                    return self._dbs.pop()
            return open_db(self.config.db_path)

        def give_db(self, db: Db) -> None:
            """Return a borrowed connection."""
            if db.conn.in_transaction:  # a bug left a transaction open: do not lend this one again
                db.close()
                return
            with self._lock:
                self._dbs.append(db)

        def enter(self) -> None:
            with self._lock:
                self._n_busy += 1

        def leave(self) -> None:
            with self._lock:
                self._n_busy -= 1
                self._idle.notify_all()

        def drain(self, timeout_s: float) -> bool:
            """Wait until no request is being handled; say whether that happened in time."""
            self.is_stopping = True
            with self._lock:
                return self._idle.wait_for(lambda: self._n_busy == 0, timeout=timeout_s)

        def server_close(self) -> None:
            super().server_close()
            if self._gate is not None:
                self._gate.stop()
            with self._lock:
                dbs, self._dbs = self._dbs, []
            for db in dbs:
                db.close()

        @property
        def url(self) -> str:
            """Return the base URL people should open."""
            host = self.config.host
            host = "127.0.0.1" if host in WILDCARD_HOSTS else host
            return f"http://[{host}]:{self.config.port}" if ":" in host else f"http://{host}:{self.config.port}"

    return Server


def run_server(server: Any, *, on_start: Callable[[], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight and close."""
    import signal
    import threading

    def stop(signum: int, frame: Any) -> None:
        server.is_stopping = True
        # shutdown() waits for serve_forever, which runs in this very thread: ask from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_start is not None:
            on_start()
        server.serve_forever(poll_interval=0.2)
        server.drain(SHUTDOWN_GRACE_S)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.server_close()


def page_login(req: Request) -> Response:
    """Trade the token in ?token= for an HttpOnly, SameSite=Strict login cookie; without one, ask for it."""
    config = req.config
    given = req.arg("token")
    if config.token is None or not same_secret(given, config.token):  # the 401 page carries the login form
        raise HttpError(401, f"{'wrong' if given else 'this Clare needs its'} token; open the login URL that "
                             "'clare serve' printed, or paste the token (the token line of clare.toml)")
    cookie = f"{LOGIN_COOKIE}={config.login_cookie}; HttpOnly; SameSite=Strict; Path=/; Max-Age=31536000"
    return Response(303, b"", "text/plain", (("Location", "/"), ("Set-Cookie", cookie)))


# --- 8.2 The HTML kit: render and Html, the page around every view, the stylesheet, the script -------

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"})


class Html(str):
    """Text that is already safe HTML: render() inserts it as it is."""

    __slots__ = ()


def escape(value: object) -> Html:
    """Return a value as HTML text: Html stays as it is, anything else is escaped."""
    return value if isinstance(value, Html) else Html(str(value).translate(_ESCAPES))


def render(template: "string.Template", **values: Any) -> Html:
    """Fill a template, escaping every value that is not Html; a missing key raises KeyError."""
    return Html(template.substitute({k: escape(v) for k, v in values.items()}))


def join(parts: Iterable[Html]) -> Html:
    """Concatenate rendered pieces."""
    return Html("".join(parts))


POLL_ATTRS = string.Template('hx-get="$url" hx-trigger="every ${every}s" hx-swap="outerHTML"')
FORM_ATTRS = string.Template('method="post" action="$url" hx-post="$url" hx-target="$target" hx-swap="$swap" '
                             'hx-trigger="$trigger"')


def poll_attrs(url: str, *, every_s: int = POLL_S) -> Html:
    """Return the htmx attributes that make an element replace itself from `url` every few seconds."""
    return render(POLL_ATTRS, url=url, every=every_s)


def form_attrs(url: str, *, target: str, swap: str = "outerHTML", trigger: str = "submit") -> Html:
    """Return the attributes of a form that posts through htmx and still posts plainly without JavaScript."""
    return render(FORM_ATTRS, url=url, target=target, swap=swap, trigger=trigger)


def html_response(body: Html, *, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """Return an HTML response."""
    return Response(status, body.encode(), "text/html; charset=utf-8", headers)


def redirect(url: str) -> Response:
    """Return a 303 See Other to `url`: where a plain form post lands."""
    return Response(303, b"", "text/plain", (("Location", url),))


# The page's own script, served from memory at /static/clare.js (CSP: script-src 'self', nothing inline).
CLARE_JS = r"""// Clare's page script: keys, the tab title's count, opt-in browser notifications, copy buttons.
// Everything here is a convenience: with JavaScript off every page reads and every form posts.
(function () {
  "use strict";
  var baseTitle = document.title.replace(/^\(\d+\) /, "");
  var seen = null;  // the needs-you keys known already: only new ones notify
  var currentRow = null;  // the data-row (a URL) that j/k stand on, kept across polls

  function byId(id) { return document.getElementById(id); }

  function readNeeds() {
    var el = byId("nav-needs");
    if (!el) return;
    var n = parseInt(el.getAttribute("data-count") || "0", 10);
    document.title = (n > 0 ? "(" + n + ") " : "") + baseTitle;
    var items = [];
    try { items = JSON.parse(el.getAttribute("data-needs") || "[]"); } catch (err) { items = []; }
    var keys = items.map(function (x) { return x.key; });
    if (seen !== null && notifyOn()) {
      items.forEach(function (x) {
        if (seen.indexOf(x.key) >= 0) return;
        var note = new Notification(x.title, {body: x.body, tag: x.key});
        note.onclick = function () { window.focus(); location.href = x.url; };
      });
    }
    seen = keys;
  }

  function notifyOn() {
    return window.isSecureContext && "Notification" in window && Notification.permission === "granted" &&
      localStorage.getItem("clare-notify") === "on";
  }

  function setupOptIn() {
    var b = byId("notify-optin");
    if (!b || !window.isSecureContext || !("Notification" in window)) return;
    b.hidden = false;
    b.textContent = notifyOn() ? "Browser notifications: on" : "Notify me in this browser";
    b.addEventListener("click", function () {
      if (notifyOn()) { localStorage.removeItem("clare-notify"); setupLabel(b); return; }
      Notification.requestPermission().then(function (answer) {
        if (answer === "granted") localStorage.setItem("clare-notify", "on");
        setupLabel(b);
      });
    });
  }

  function setupLabel(b) {
    b.textContent = notifyOn() ? "Browser notifications: on" : "Notify me in this browser";
  }

  function rows() {
    return Array.prototype.slice.call(document.querySelectorAll("[data-row]")).filter(function (r) {
      return !r.hidden && r.offsetParent !== null;
    });
  }

  function mark() {
    rows().forEach(function (r) { r.classList.toggle("is-current", r.getAttribute("data-row") === currentRow); });
  }

  function move(step) {
    var rs = rows();
    if (!rs.length) return;
    var i = rs.map(function (r) { return r.getAttribute("data-row"); }).indexOf(currentRow);
    i = i < 0 ? (step > 0 ? 0 : rs.length - 1) : Math.max(0, Math.min(rs.length - 1, i + step));
    currentRow = rs[i].getAttribute("data-row");
    mark();
    rs[i].scrollIntoView({block: "nearest"});
  }

  function filter() {
    var f = byId("filter");
    if (!f) return;
    var q = f.value.trim().toLowerCase();
    document.querySelectorAll("[data-row]").forEach(function (r) {
      r.hidden = q !== "" && r.textContent.toLowerCase().indexOf(q) < 0;
    });
  }

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var t = e.target;
    if (t && (t.isContentEditable || /^(input|textarea|select)$/i.test(t.tagName))) {
      if (e.key === "Escape") t.blur();
      return;
    }
    if (e.key === "j") move(1);
    else if (e.key === "k") move(-1);
    else if (e.key === "o" || (e.key === "Enter" && currentRow)) {
      if (!currentRow) return;
      location.href = currentRow;
    } else if (e.key === "/") {
      var f = byId("filter");
      if (!f) return;
      f.focus();
      f.select();
    } else if (e.key === "?") {
      var k = byId("keys");
      if (!k) return;
      k.open = !k.open;
      if (k.open) k.scrollIntoView({block: "nearest"});
    } else return;
    e.preventDefault();
  });

  document.addEventListener("input", function (e) { if (e.target && e.target.id === "filter") filter(); });

  document.addEventListener("click", function (e) {
    var b = e.target.closest ? e.target.closest("[data-copy]") : null;
    if (b) {
      var src = byId(b.getAttribute("data-copy"));
      if (!src) return;
      var selectIt = function () {
        var range = document.createRange();
        range.selectNodeContents(src);
        var sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        b.textContent = "Selected: press Ctrl+C";
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(src.textContent).then(function () { b.textContent = "Copied"; }, selectIt);
      } else selectIt();
      return;
    }
    var flash = e.target.closest ? e.target.closest("#flash .flash") : null;
    if (flash) flash.remove();
  });

  document.addEventListener("htmx:afterSettle", function () {
    readNeeds();
    filter();
    mark();
    var ok = document.querySelector("#flash .flash.ok");
    if (ok) setTimeout(function () { if (ok.isConnected) ok.remove(); }, 5000);
  });

  readNeeds();
  setupOptIn();
})();
"""


def static_version(name: str) -> str:
    """Return a short hash of a file served from memory: its URL changes whenever its text does."""
    import hashlib

    return hashlib.sha256(STATIC_MEMORY[name]).hexdigest()[:12]


# htmx swaps 4xx bodies too, so a refused form shows its one-line reason in #flash.
HTMX_CONFIG = {"includeIndicatorStyles": False, "defaultSwapStyle": "outerHTML", "historyCacheSize": 0,
               "responseHandling": [{"code": "204", "swap": False}, {"code": "[23]..", "swap": True},
                                    {"code": "[45]..", "swap": True, "error": False}]}
NAV = (("/", "Dashboard"), ("/needs", "Needs you"), ("/projects", "Projects"), ("/sessions", "Sessions"),
       ("/broadcast", "Broadcast"))

# The dashboard's one stylesheet, served from memory as /static/clare.css (no inline CSS: the
# Content-Security-Policy has no 'unsafe-inline'). Its URL carries its hash, so it is cached for good.
STYLESHEET = """
:root{--bg:#f5f6f8;--fg:#1b2129;--muted:#5f6b78;--card:#fff;--line:#e1e5ea;--soft:#eef1f5;--accent:#3b5bdb;
--on-accent:#fff;--gray:#6b7785;--blue:#1c7ed6;--orange:#e8590c;--green:#2f9e44;--amber:#e67700;--red:#e03131;
--violet:#7048e8;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#0e1115;--fg:#e2e6eb;--muted:#939eab;--card:#161a20;--line:#272d36;
--soft:#1d222a;--accent:#7b93ff;--on-accent:#0e1115;--gray:#8d98a5;--blue:#4dabf7;--orange:#ff922b;--green:#51cf66;
--amber:#fcc419;--red:#ff6b6b;--violet:#9775fa}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",sans-serif}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
header.top{position:sticky;top:0;z-index:2;display:flex;flex-wrap:wrap;align-items:center;gap:.4rem 1.2rem;
padding:.6rem 1.2rem;background:var(--card);border-bottom:1px solid var(--line)}
.brand{font-weight:700;font-size:1.05rem;color:var(--fg);letter-spacing:.01em}
.brand:hover{text-decoration:none}.brand b{color:var(--accent)}
nav{display:flex;flex-wrap:wrap;gap:.15rem}
nav a{color:var(--muted);padding:.3rem .65rem;border-radius:7px;font-weight:500}
nav a:hover{background:var(--soft);text-decoration:none}
nav a[aria-current=page]{background:var(--soft);color:var(--fg)}
.host{margin-left:auto;color:var(--muted);font-size:.8rem}
main{max-width:76rem;margin:0 auto;padding:1.2rem 1.2rem 2rem}
h1{font-size:1.45rem;line-height:1.25;margin:.3rem 0 .3rem;overflow-wrap:anywhere}
h2{font-size:.8rem;margin:0 0 .75rem;color:var(--muted);text-transform:uppercase;letter-spacing:.06em}
.sub{color:var(--muted);margin:0 0 1.1rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:1rem 1.1rem;margin:0 0 1rem;
min-width:0}
.grid{display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(20rem,1fr));align-items:start}
.grid>.card{margin:0}.grid+.grid,.grid+.card,.card+.grid{margin-top:1rem}
.stats{display:grid;gap:.8rem;grid-template-columns:repeat(auto-fit,minmax(9rem,1fr));margin:0 0 1rem}
.stat{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:.75rem 1rem}
.stat b{display:block;font-size:1.6rem;line-height:1.2}.stat span{color:var(--muted);font-size:.82rem}
.scroll{overflow-x:auto;margin:0 -.3rem}
table{width:100%;border-collapse:collapse;font-size:.92rem}
th{text-align:left;color:var(--muted);font-weight:600;font-size:.72rem;text-transform:uppercase;letter-spacing:.05em;
padding:.35rem .45rem;border-bottom:1px solid var(--line);white-space:nowrap}
td{padding:.5rem .45rem;border-bottom:1px solid var(--line);vertical-align:middle}
tr:last-child td{border-bottom:0}
td.title{min-width:12rem;overflow-wrap:anywhere}
.badge{display:inline-block;padding:.05rem .55rem;border-radius:999px;font-size:.76rem;font-weight:600;
white-space:nowrap;color:var(--c);background:color-mix(in srgb,var(--c) 14%,transparent);
border:1px solid color-mix(in srgb,var(--c) 30%,transparent)}
.c-gray{--c:var(--gray)}.c-blue{--c:var(--blue)}.c-orange{--c:var(--orange)}.c-green{--c:var(--green)}
.c-amber{--c:var(--amber)}.c-red{--c:var(--red)}.c-violet{--c:var(--violet)}
.counts{display:flex;flex-wrap:wrap;gap:.3rem}
progress{width:6rem;height:.45rem;border:0;border-radius:4px;background:var(--soft);vertical-align:middle}
progress::-webkit-progress-bar{background:var(--soft);border-radius:4px}
progress::-webkit-progress-value{background:var(--green);border-radius:4px}
progress::-moz-progress-bar{background:var(--green);border-radius:4px}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.84em}
.muted{color:var(--muted)}.small{font-size:.85rem}
.empty{color:var(--muted);margin:.2rem 0}
ul.feed{list-style:none;margin:0;padding:0}
ul.feed li{padding:.45rem 0;border-bottom:1px solid var(--line);overflow-wrap:anywhere}
ul.feed li:last-child{border-bottom:0}
.attention{border-left:4px solid var(--amber)}label.check{flex-basis:100%;flex-direction:row;font-size:.85rem}
.line{display:flex;flex-wrap:wrap;gap:.2rem .5rem;align-items:center}
ul.feed time{display:block;color:var(--muted);font-size:.76rem}
pre.text{white-space:pre-wrap;overflow-wrap:anywhere;font:inherit;margin:.2rem 0}
form.row{display:flex;flex-wrap:wrap;gap:.55rem;align-items:flex-end;margin:0 0 .8rem}
form.row label{flex:1 1 10rem;min-width:0}select{max-width:100%}form.row label.wide{flex-basis:100%}
form.tight{display:inline-flex;gap:.3rem;align-items:center;margin:0}
label{display:flex;flex-direction:column;gap:.2rem;font-size:.78rem;color:var(--muted);font-weight:500}
input,select,textarea{font:inherit;font-size:.92rem;color:var(--fg);background:var(--bg);border:1px solid var(--line);
border-radius:7px;padding:.4rem .55rem;min-width:0}
textarea{min-height:4.5rem;resize:vertical}
input:focus,select:focus,textarea:focus{outline:2px solid color-mix(in srgb,var(--accent) 55%,transparent);
outline-offset:0;border-color:var(--accent)}
button{font:inherit;font-size:.9rem;font-weight:600;cursor:pointer;border-radius:7px;padding:.42rem .9rem;
border:1px solid var(--accent);background:var(--accent);color:var(--on-accent)}
button.ghost{background:transparent;color:var(--fg);border-color:var(--line)}
button:hover{filter:brightness(1.08)}
select.status{padding:.2rem .4rem;font-size:.85rem}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.35rem 1rem;margin:0}
dl.facts dt{color:var(--muted);font-size:.85rem}dl.facts dd{margin:0;overflow-wrap:anywhere}
#flash:empty{display:none}
.flash{border-radius:10px;padding:.65rem .9rem;margin:0 auto 1rem;max-width:76rem}
.flash.error{background:color-mix(in srgb,var(--red) 12%,var(--card));border:1px solid var(--red)}
.flash.ok{background:color-mix(in srgb,var(--green) 12%,var(--card));border:1px solid var(--green)}
.htmx-request{opacity:.65;transition:opacity .2s}
footer{color:var(--muted);font-size:.78rem;text-align:center;padding:1rem}
#flash{position:fixed;left:0;right:0;bottom:.8rem;z-index:5;padding:0 .8rem}#flash .flash{margin:0 auto;cursor:pointer;
box-shadow:0 4px 18px rgba(0,0,0,.18)}
.count{display:inline-block;min-width:1.2rem;margin-left:.3rem;padding:0 .35rem;border-radius:999px;font-size:.74rem;
text-align:center;background:var(--red);color:#fff}.count:empty{display:none}
pre.pane{margin:0;padding:.6rem .7rem;background:#0e1115;color:#d8dee6;border-radius:8px;font:12px/1.35 ui-monospace,
SFMono-Regular,Menlo,Consolas,monospace;white-space:pre;overflow:auto;max-height:70vh}
pre.tail{white-space:pre-wrap;overflow-wrap:anywhere;font:12px/1.35 ui-monospace,Menlo,Consolas,monospace;
margin:.2rem 0}
.cmd{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center}.cmd code{flex:1 1 16rem;overflow-wrap:anywhere;
padding:.4rem .55rem;background:var(--soft);border-radius:7px;font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}
[data-row].is-current{outline:2px solid var(--accent);outline-offset:-2px;border-radius:6px}
ul.feed li[data-row]{padding-left:.4rem;padding-right:.4rem}
.answer{margin-top:.9rem;padding-top:.8rem;border-top:1px solid var(--line)}.answer input{min-width:12rem}
.asked{font:13px/1.4 ui-monospace,Menlo,Consolas,monospace;overflow-wrap:anywhere}.actions{display:flex;gap:.6rem;
flex-wrap:wrap;margin-top:.2rem}.turn{display:grid;grid-template-columns:4.5rem 1fr;gap:.5rem}
kbd{font:12px ui-monospace,Menlo,monospace;border:1px solid var(--line);border-radius:4px;padding:0 .3rem}
details#keys{display:inline-block;margin-left:.6rem}
details#keys[open]{display:block;max-width:20rem;margin:.6rem auto 0;
text-align:left}button.small{font-size:.78rem;padding:.15rem .5rem}
@media (max-width:40rem){table.cards thead{display:none}table.cards tr{display:block;padding:.45rem 0;
border-bottom:1px solid var(--line)}table.cards tr:last-child{border-bottom:0}table.cards td{display:block;border:0;
padding:.1rem .2rem}table.cards td.hide-sm{display:none}table.cards td.title{min-width:0}.scroll{overflow-x:visible}
pre.pane{font-size:10.5px}}
@media (max-width:40rem){body{font-size:16px}main{padding:.8rem .7rem 1.5rem}header.top{padding:.55rem .75rem}
.host{display:none}.hide-sm{display:none}.stats{grid-template-columns:repeat(3,1fr);gap:.5rem}
.stat{padding:.5rem .65rem}.stat b{font-size:1.25rem}header.top{gap:.3rem .8rem}
nav a{padding:.25rem .4rem;font-size:.93rem}
.card{padding:.85rem .8rem;border-radius:10px}td,th{padding:.45rem .3rem}}
body.bare{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem}
h3{font-size:.85rem;margin:.9rem 0 .4rem}ol.queue,ul.waits{margin:0;padding-left:1.4rem}
ol.queue li,ul.waits li{padding:.25rem 0;overflow-wrap:anywhere}.dep{display:inline-block;margin-right:.6rem}
.dep.over a{text-decoration:line-through;color:var(--muted)}form.waits-form{margin:.9rem 0 0}
"""
STATIC_MEMORY = {"clare.js": CLARE_JS.encode(), "clare.css": STYLESHEET.encode()}  # files served from memory, by name

PAGE = string.Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="htmx-config" content="$htmx_config">
<link rel="icon" href="data:,">
<title>$count$title · Clare</title>
<link rel="stylesheet" href="/static/clare.css?v=$css_version">
<script src="/static/htmx.min.js?v=$htmx_version" defer></script>
<script src="/static/clare.js?v=$js_version" defer></script>
</head>
<body hx-headers="$hx_headers">
<header class="top"><a class="brand" href="/"><b>◆</b> Clare</a><nav>$nav</nav><span class="host">$host</span></header>
<main>
<div id="flash" role="status" aria-live="polite"></div>
$main
</main>
<footer>clare $version · parts of this page refresh every $poll_s s · <button type="button" class="ghost small"
id="notify-optin" hidden>Notify me in this browser</button>
<details id="keys"><summary>Keys</summary><dl class="facts keys">
<dt><kbd>j</kbd> <kbd>k</kbd></dt><dd>next, previous row</dd>
<dt><kbd>o</kbd></dt><dd>open the row</dd><dt><kbd>/</kbd></dt><dd>filter the list</dd>
<dt><kbd>?</kbd></dt><dd>show these keys</dd></dl></details></footer>
</body>
</html>
""")
NAV_LINK = string.Template('<a href="$href"$current>$label$count</a>')
NAV_NEEDS = string.Template(
    '<span id="nav-needs" class="count" $poll data-count="$n" data-needs="$needs">$label</span>')
FLASH = string.Template('<div id="flash" role="status" aria-live="polite"$oob>$message</div>')
FLASH_MESSAGE = string.Template('<p class="flash $kind">$text</p>')
ALERT = string.Template('<p class="flash error" role="alert">$text</p>')  # a standing problem, in a card


def page(req: Request, title: str, main: Html, *, status: int = 200) -> Response:
    """Return a full page: the shared head, styles, navigation and htmx setup around `main`."""
    current = "/" + req.path.split("/")[1] if req.path != "/" else "/"
    needs = list_needs(req.db)
    nav = join(render(NAV_LINK, href=href, label=label, count=nav_needs(needs) if href == "/needs" else Html(""),
                      current=Html(' aria-current="page"') if href == current else Html(""))
               for href, label in NAV)
    return html_response(render(
        PAGE, title=title, main=main, nav=nav, host=req.db.machine_id, version=__version__, poll_s=POLL_S,
        htmx_version=HTMX_VERSION, css_version=static_version("clare.css"), htmx_config=json.dumps(HTMX_CONFIG),
        js_version=static_version("clare.js"),
        count=f"({len(needs)}) " if needs else "",
        hx_headers=json.dumps({"X-CSRF-Token": req.config.csrf_token})), status=status)


def nav_needs(needs: list[Session]) -> Html:
    """Render the needs-you count of the navigation, polled; it carries the list the page script notifies from."""
    items = [{"key": f"{s.id}:{s.state}:{s.state_at}", "url": f"/sessions/{s.id}",
              "title": f"{SESSION_LABELS.get(s.state, s.state)}: {short_text(s.label or s.id[:SHORT_ID], 60)}",
              "body": short_text(f"{s.asked['tool']}: {s.asked['input']}" if s.asked else f"{s.host} · {s.cwd}", 120)}
             for s in needs]
    return render(NAV_NEEDS, poll=poll_attrs("/frag/nav-needs"), n=len(needs), label=len(needs) or "",
                  needs=json.dumps(items, ensure_ascii=False))


def flash(text: str, *, kind: str = "error", oob: bool = False) -> Html:
    """Return the #flash box with one message (empty text clears it); oob swaps it beside another answer."""
    return render(FLASH, oob=Html(' hx-swap-oob="true"') if oob else Html(""),
                  message=render(FLASH_MESSAGE, kind=kind, text=text) if text else Html(""))


def error_page(status: int, message: str) -> Html:
    """Return the full page shown for an HTTP error, without the database (it may be the problem).

    A 401 page carries the login form: a link back to the dashboard would only answer 401 again.
    """
    return render(PAGE_ERROR, status=status, message=message, css_version=static_version("clare.css"),
                  after=Html(LOGIN_FORM) if status == 401 else Html('<p><a href="/">Back to the dashboard</a></p>'))


# The token goes in the URL exactly as in the login link `clare serve` prints; /login trades it for a cookie.
LOGIN_FORM = """<form action="/login" method="get"><p><label for="token">Token</label><br>
<input id="token" name="token" type="password" autocomplete="current-password" required size="40">
<button type="submit">Log in</button></p></form>
<p>The token is the one in this server's clare.toml (<code>token = ...</code>) or the CLARE_TOKEN it was started
with; <code>clare serve</code> on a terminal prints a login URL that holds it.</p>"""


PAGE_ERROR = string.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark"><link rel="icon" href="data:,"><title>$status · Clare</title>
<link rel="stylesheet" href="/static/clare.css?v=$css_version"></head>
<body class="bare"><h1>$status</h1><p>$message</p>$after</body></html>
""")


PAGE_CACHE_TTL_S = 2.0  # "5m ago" and transcript activity move without events: serve a page this long at most
PAGE_MAX_STALE_S = 1.0  # while one thread rebuilds a page, others get the previous one if it is this young
PAGE_BUILD_WAIT_S = 30.0  # a request that may not have the previous page waits this long for the rebuild
MAX_CACHED_PAGES = 256  # by URL; a flood of distinct query strings empties the cache, never grows it
_PAGE_CACHE: dict[tuple[str, str], tuple[int, float, Response]] = {}  # (db, url) -> (log head, built at, page)
_PAGE_BUILDERS: dict[tuple[str, str], Any] = {}  # (db, url) -> threading.Event set when its rebuild ends;
# setdefault claims a rebuild atomically, so one thread rebuilds a page at a time


def cached(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """Wrap a GET page or fragment: answer from memory while the log has not grown, for up to 2 s.

    Every browser tab polls every fragment every 5 s; a dashboard of 200 sessions and 5,000
    tasks costs ~12 ms of CPU to build, and the projections change only when an event lands.
    When one does (a fleet with hooks writes several a second), exactly one thread rebuilds the
    page: in the background when another process wrote (a hook, a peer's sync), so no request
    waits for it; in the request when this process wrote since the page was built (its own
    client must see its write). The others answer the previous page meanwhile, if it was built
    less than PAGE_MAX_STALE_S ago, else they wait for the rebuild. So a change is on every
    answer started PAGE_MAX_STALE_S (+ HEAD_MAX_AGE_S) after it, and a busy log costs one build at a time.
    """
    def answer(req: Request) -> Response:
        import threading

        query = req.query
        key = (req.config.db_path, req.path + "?" + "&".join(f"{k}={v}" for k, v in sorted(query.items()))
               if query else req.path)
        while True:
            head, now = recent_head(req.db), time.monotonic()
            hit = _PAGE_CACHE.get(key)
            if hit is not None and hit[0] == head and now - hit[1] < PAGE_CACHE_TTL_S:
                return hit[2]
            # Only older by the clock, or young enough: the previous page may answer while it is rebuilt.
            is_usable = hit is not None and (hit[0] == head or now - hit[1] < PAGE_MAX_STALE_S)
            mine = threading.Event()
            building = _PAGE_BUILDERS.setdefault(key, mine)
            if building is mine:
                break
            if hit is not None and is_usable:
                return hit[2]  # another thread rebuilds it now: no stampede, bounded staleness
            if not building.wait(PAGE_BUILD_WAIT_S):
                return handler(req)  # the rebuild is stuck: build this one alone, uncached
        if hit is not None and is_usable and hit[1] > _WRITTEN_AT.get(req.db.path, 0.0):
            threading.Thread(target=_rebuild_page, args=(key, handler, req, mine), daemon=True,
                             name="clare-page").start()
            return hit[2]
        return _build_page(key, handler, req, mine, head=head, now=now)
    answer.__name__, answer.__doc__ = handler.__name__, handler.__doc__
    return answer


def _build_page(key: tuple[str, str], handler: Callable[[Request], Response], req: Request, mine: Any, *,
                head: int, now: float) -> Response:
    """Build a page and keep it; then let the requests waiting for it go (mine: the claim's threading.Event)."""
    try:
        resp = handler(req)
        if len(_PAGE_CACHE) >= MAX_CACHED_PAGES:
            _PAGE_CACHE.clear()
        _PAGE_CACHE[key] = (head, now, resp)
    finally:
        del _PAGE_BUILDERS[key]
        mine.set()
    return resp


def _rebuild_page(key: tuple[str, str], handler: Callable[[Request], Response], req: Request, mine: Any) -> None:
    """Build a page in a thread of its own, on a connection of its own (the request's goes back to the pool)."""
    try:
        db = open_db(req.config.db_path)
    except BaseException:
        del _PAGE_BUILDERS[key]
        mine.set()
        raise
    try:
        head, now = head_rseq(db.conn), time.monotonic()
        with contextlib.suppress(ClareError):  # a page that now refuses (a task gone) is answered by its next request
            _build_page(key, handler, record_replace(req, db=db), mine, head=head, now=now)
    finally:
        db.close()


# Text formatters, shared by the dashboard and the CLI.

def short_text(text: str, width: int) -> str:
    """Return text on one line, cut to `width` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def when_text(created_at: str) -> str:
    """Return an ISO time as 'YYYY-MM-DD HH:MM:SS' (UTC)."""
    return created_at[:19].replace("T", " ")


def tokens_text(tokens: dict[str, int]) -> str:
    """Return a token count compactly: 950, 1.5k, 2.3M, or '—' for none."""
    n = sum(v for v in tokens.values() if isinstance(v, int))
    return "—" if not n else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def ago_text(at: str | None, now: int) -> str:
    """Say how long ago an ISO time was ('2.0 min ago', 'just now'), or 'never' when unknown."""
    return _ago_ms(_iso_to_ms(at), now)


def get_static(req: Request) -> Response:
    """Serve the stylesheet, or a vendored file from static/, with a year-long cache (the URL carries its version)."""
    name = req.params["name"]
    kind = STATIC_TYPES.get(os.path.splitext(name)[1])
    path = os.path.join(STATIC_DIR, name)
    if kind is not None and name in STATIC_MEMORY:
        body = STATIC_MEMORY[name]
    elif kind is None or not os.path.isfile(path):
        raise NotFound(f"no static file {name!r}")
    else:
        with open(path, "rb") as f:
            body = f.read()
    return Response(200, body, kind, (("Cache-Control", "public, max-age=31536000, immutable"),))


# --- 8.3 The pages and their htmx fragments: dashboard, projects, tasks, needs, sessions, broadcast, peers ---

TASK_COLORS = {"todo": "gray", "in_progress": "blue", "blocked": "orange", "done": "green"}
PROJECT_COLORS = {"active": "blue", "paused": "amber", "done": "green"}

BADGE = string.Template('<span class="badge c-$color">$label</span>')
CSRF_FIELD = string.Template('<input type="hidden" name="csrf" value="$csrf">')
OPTION = string.Template('<option value="$value"$selected>$label</option>')
STAT = string.Template('<div class="stat"><b>$n</b><span>$label</span></div>')
EMPTY = string.Template('<p class="empty">$text</p>')
FEED = string.Template('<ul class="feed" hx-disable>$items</ul>')  # items quote pane and transcript text
FEED_ITEM = string.Template('<li>$text<time datetime="$at">$when · $where</time></li>')

FRAG_PROJECTS = string.Template("""<div id="frag-projects" $poll>
<div class="stats">$stats</div>
<section class="card"><h2>Projects</h2>$clashes$table</section>
</div>""")
PROJECTS_TABLE = string.Template("""<div class="scroll"><table>
<thead><tr><th>Project</th><th class="hide-sm">Status</th><th>Tasks</th><th class="hide-sm">Done</th>
<th class="hide-sm">Sessions</th>
<th class="hide-sm">Owner</th></tr></thead>
<tbody>$rows</tbody></table></div>""")
PROJECT_ROW = string.Template("""<tr><td class="title"><a href="/projects/$id">$name</a>$dispatch
<div class="muted small">$goal</div></td>
<td class="hide-sm">$status</td><td><div class="counts">$counts</div></td>
<td class="hide-sm"><progress value="$n_done" max="$n_total"
title="$n_done of $n_total done">$n_done/$n_total</progress></td>
<td class="hide-sm small">$n_sessions <span class="muted mono">$tokens</span></td>
<td class="hide-sm muted">$owner</td></tr>""")
READY_BADGE = string.Template('<span class="badge c-violet" title="todo, unassigned, waiting on nothing undone: '
                              'clare next">$n ready</span>')
FRAG_ACTIVITY = string.Template("""<section class="card" id="frag-activity" $poll>
<h2>Recent activity</h2>$body</section>""")
PROJECT_FORM = string.Template("""<section class="card" id="project-form"$oob>
<h2>New project</h2>
<form class="row" $attrs>$csrf
<label>Name<input name="name" required maxlength="100" placeholder="alpha" autocomplete="off"></label>
<label>Goal<input name="goal" maxlength="2000" placeholder="what done looks like"></label>
<label>Owner<input name="owner" maxlength="100" placeholder="who answers for it"></label>
<button type="submit">Create</button>
</form></section>""")
MAIN_DASHBOARD = string.Template("""<h1>Dashboard</h1>
<p class="sub">What needs you first, then where every project stands, then every session.</p>
$attention
$projects
$fleet
$peers
<div class="grid">$activity$project_form</div>""")
MAIN_PROJECTS = string.Template("""<h1>Projects</h1>
<p class="sub">Every project on this Clare, with its tasks by status.</p>
$project_form
$projects""")

MAIN_PROJECT = string.Template("""<p class="muted small"><a href="/projects">Projects</a> /</p>
<h1>$name</h1>
$head
$queue
$tasks
<div class="grid">
$task_form
<section class="card"><h2>About</h2>
<dl class="facts"><dt>Status</dt><dd><form class="tight" $status_attrs>$csrf
<select name="status" class="status" aria-label="project status">$status_options</select>
<noscript><button class="ghost">Set</button></noscript></form></dd>
<dt>Owner</dt><dd>$owner</dd><dt>Code</dt><dd>$dirs</dd>
<dt>Created</dt><dd>$created</dd><dt>Id</dt><dd class="mono">$id</dd></dl></section>
</div>
<div class="grid">
$dispatch
<section class="card"><h2>Recent updates</h2>$updates</section>
<section class="card"><h2>History</h2>$history</section>
</div>""")
DISPATCH_CARD = string.Template("""<section class="card" id="dispatch-card"><h2>Dispatch</h2>
<p>$state</p>
<form class="row" $attrs>$csrf
<label class="check wide"><span><input type="checkbox" name="dispatch" value="on"$checked> feed waiting sessions
the next ready task</span></label>
<label>Sessions, at most<input type="number" name="max_sessions" min="1" max="$max" value="$n" required></label>
<label>Dispatcher host<select name="dispatcher">$hosts</select></label>
<button type="submit">Save</button></form>
<p class="small muted">$note</p></section>""")
PROJECT_DIR = string.Template('<div><span class="mono small">$path</span> '
                              '<span class="muted small">on $host</span></div>')
START_BUTTON = string.Template("""<form class="tight" $attrs>$csrf<input type="hidden" name="view" value="$view">
<button class="ghost" type="submit" title="start a Claude session for this task">Start session</button></form>""")
START_CARD = string.Template("""<section class="card" id="start-session"><h2>Claude session</h2>
$current
<form class="row" $attrs>$csrf<input type="hidden" name="view" value="card">
<label>Host<select name="host">$hosts</select></label>
<label>Model<input name="model" placeholder="default" autocomplete="off" maxlength="100"></label>
<label><input type="checkbox" name="worktree" value="1"> in a new git worktree</label>
<button type="submit"$disabled>Start session</button></form>
<p class="small muted">$note</p></section>""")
SESSION_NOW = string.Template("""<div class="row"><p>Session <a class="mono" href="/sessions/$id">$short</a> is
$state on $host.</p>$button</div>""")
SESSION_BUTTON = string.Template("""<form class="tight" $attrs>$csrf<input type="hidden" name="view" value="card">$force
<button class="ghost" type="submit">$label</button></form>""")
FORCE_BOX = Html('<label class="small"><input type="checkbox" name="force" value="1"> even while it works</label>')
PROJECT_HEAD = string.Template('<p class="sub" id="project-head"$oob>$status $goal</p>')
FRAG_PROJECT_QUEUE = string.Template("""<section class="card" id="frag-queue" $poll>
<h2>Queue</h2>$cycles
<h3>Ready to hand out <span class="muted">$n_ready</span></h3>$ready
<h3>Who waits on what</h3>$waiting</section>""")
QUEUE_LIST = string.Template('<ol class="queue">$items</ol>')
QUEUE_ITEM = string.Template("""<li><span class="badge c-$pri_color">P$priority</span>
<a href="/tasks/$id">$title</a> <span class="mono muted small">$short_id</span>$tags</li>""")
WAITS_LIST = string.Template('<ul class="waits">$items</ul>')
WAITS_ITEM = string.Template("""<li><a href="/tasks/$id">$title</a> <span class="mono muted small">$short_id</span>
$ready<span class="muted small">waits on</span> $deps</li>""")
WAIT_DEP = string.Template('<span class="dep$done_class"><a href="/tasks/$id">$title</a> $state</span>')
WAIT_UNKNOWN = string.Template('<span class="dep"><span class="mono">$short_id</span> '
                               '<span class="muted small">not here yet</span></span>')
CYCLE_ALERT = string.Template('<p class="flash error" role="alert">Cycle of waits: $chain. These tasks are never '
                              'ready; drop one wait with <code>$fix</code></p>')
FRAG_PROJECT_TASKS = string.Template("""<section class="card" id="frag-tasks" $poll>
<h2>Tasks</h2>$table</section>""")
TASKS_TABLE = string.Template("""<div class="scroll"><table class="cards">
<thead><tr><th>Pri</th><th>Task</th><th>Status</th><th>Assigned</th><th class="hide-sm">Id</th></tr></thead>
<tbody>$rows</tbody></table></div>""")
TASK_ROW = string.Template("""<tr><td><span class="badge c-$pri_color">P$priority</span></td>
<td class="title"><a href="/tasks/$id">$title</a>$tags</td>
<td>$status_form</td><td>$assignee</td><td class="hide-sm mono muted">$short_id</td></tr>""")
STATUS_FORM = string.Template("""<form class="tight" $attrs>$csrf<input type="hidden" name="view" value="$view">
<select name="status" class="status" aria-label="task status">$options</select>
<noscript><button class="ghost">Set</button></noscript></form>""")
TASK_FORM = string.Template("""<section class="card" id="task-form"$oob>
<h2>Add a task</h2>
<form class="row" $attrs>$csrf
<label class="wide">Title<input name="title" required maxlength="300" placeholder="write the parser"
autocomplete="off"></label>
<label>Priority<select name="priority">$priorities</select></label>
<label>Waits on<input name="after" placeholder="task ids, e.g. 3f2a 91bc" autocomplete="off" maxlength="2000"></label>
<label class="wide">Description<textarea name="description" maxlength="20000"></textarea></label>
<button type="submit">Add task</button>
</form></section>""")

MAIN_TASK = string.Template("""<p class="muted small"><a href="/projects">Projects</a> /
<a href="/projects/$project_id">$project</a> /</p>
<h1>$title</h1>
<p class="sub">$short_id · P$priority</p>
<div class="grid">
$task_card
<section class="card"><h2>Assign</h2>
<form class="row" $assign_attrs>$csrf<input type="hidden" name="view" value="task">
$session_picker
<label>or group<select name="group"><option value="">—</option>$group_options</select></label>
<button type="submit">Assign</button></form></section>
$start_card
</div>
<div class="grid">
<section class="card"><h2>Updates</h2>
$update_form
$updates</section>
$history
</div>""")
FRAG_HISTORY = string.Template("""<section class="card" id="frag-history" $poll$oob><h2>History</h2>$feed</section>""")
FRAG_TASK = string.Template("""<section class="card" id="frag-task" $poll>
<h2>Task</h2>
$removed<dl class="facts"><dt>Status</dt><dd>$status_form</dd>
<dt>Assigned</dt><dd>$assignee $unassign</dd>
<dt>Priority</dt><dd>P$priority</dd><dt>Tags</dt><dd>$tags</dd>
<dt>Waits on</dt><dd>$waits_on</dd><dt>Blocks</dt><dd>$blocks</dd>
<dt>Created</dt><dd>$created</dd><dt>Id</dt><dd class="mono">$id</dd></dl>
$cycle$description
<form class="row waits-form" $waits_attrs>$csrf<input type="hidden" name="view" value="task">
<label>Wait on<input name="after" placeholder="task id, e.g. 3f2a" autocomplete="off" maxlength="2000"></label>
<label>Stop waiting on<input name="no_after" placeholder="task id" autocomplete="off" maxlength="2000"></label>
<button class="ghost" type="submit">Change waits</button></form></section>""")
UNASSIGN_FORM = string.Template("""<form class="tight" $attrs>$csrf<input type="hidden" name="view" value="task">
<button class="ghost" type="submit">Unassign</button></form>""")
UPDATE_FORM = string.Template("""<form class="row" id="update-form" $attrs$oob>$csrf
<label class="wide">Note<textarea name="text" required maxlength="20000" placeholder="what happened"></textarea></label>
<button type="submit">Post update</button></form>""")
FRAG_UPDATES = string.Template("""<div id="frag-updates" $poll>$items</div>""")
ASSIGNEE = string.Template('<span class="mono">$kind $id</span>')
SESSION_ASSIGNEE = string.Template('<a class="mono" href="/sessions/$full_id">session $id</a>')
REMOVED_NOTE = string.Template("""<p class="removed">$badge This task was removed $when; it shows in no list.
Bring it back with <code>clare task restore $short_id</code>
(or <code>clare undo</code> on the host that removed it).</p>""")
DESCRIPTION = string.Template('<pre class="text">$text</pre>')
TAIL = string.Template('<pre class="tail">$text</pre>')  # a pane tail: its lines are the point


def badge(label: str, color: str) -> Html:
    """Return a coloured state badge."""
    return render(BADGE, label=label, color=color)


def options(choices: Iterable[tuple[str, str]], selected: str | None) -> Html:
    """Return <option> elements, marking the selected value."""
    return join(render(OPTION, value=value, label=label,
                       selected=Html(" selected") if value == selected else Html("")) for value, label in choices)


def csrf_field(req: Request) -> Html:
    """Return the hidden CSRF field of a form that must also work without JavaScript."""
    return render(CSRF_FIELD, csrf=req.config.csrf_token)


def feed(events: list[Event], *, empty: str) -> Html:
    """Return events as a newest-first list of sentences."""
    if not events:
        return render(EMPTY, text=empty)
    return render(FEED, items=join(
        render(FEED_ITEM, text=describe_event(ev), at=ev.created_at, when=when_text(ev.created_at),
               where=ev.machine_id) for ev in reversed(events)))


def order_text(o: Order) -> str:
    """Return one line saying what came of an order, and the fix when it did not work."""
    what = f"{o.action} session {o.session_id[:SHORT_ID]} on {o.host}"
    where = " in " + o.outcome["tmux_target"] if o.outcome.get("tmux_target") else ""
    branch = f" (branch {o.outcome['branch']})" if o.outcome.get("branch") else ""
    if o.result == "pending":
        return (f"{what}: pending: {o.host} has not taken it yet (it gets the order when it next syncs with a host "
                f"that has it; expires {when_text(o.expires_at)}); follow it with: clare session orders")
    return f"{what}{where}{branch}: {o.result}" + (f": {o.reason}" if o.reason else "")


def assignee_text(task: Task) -> Html:
    """Return who a task is bound to, for a table cell."""
    if task.session_id:
        return render(SESSION_ASSIGNEE, full_id=task.session_id, id=task.session_id[:SHORT_ID])
    if task.group_id:
        return render(ASSIGNEE, kind="group", id=task.group or task.group_id[:SHORT_ID])
    return Html('<span class="muted">—</span>')


def projects_fragment(req: Request) -> Html:
    """Render the project roll-up (stat tiles and table), polled in place."""
    rollups = req.svc.get_status().projects
    projects = [r.project for r in rollups]
    totals = {s: sum(p.task_counts[s] for p in projects) for s in TASK_STATUSES}
    stats = join(render(STAT, n=n, label=label) for n, label in (
        (sum(p.status == "active" for p in projects), "active projects"),
        (totals["todo"], "tasks to do"), (totals["in_progress"], "in progress"), (totals["blocked"], "blocked"),
        (totals["done"], "done")))
    if not projects:
        table_html = render(EMPTY, text="No projects yet. Create one below, or: clare project new NAME")
    else:
        ready: dict[str, int] = {}
        for t in req.svc.ready_tasks():
            ready[t.project_id] = ready.get(t.project_id, 0) + 1
        table_html = render(PROJECTS_TABLE, rows=join(_project_row(r, n_ready=ready.get(r.project.id, 0))
                                                      for r in rollups))
    clashes = join(render(ALERT, text=clash_message(name, found))
                   for name, found in name_clashes(projects).items())
    return render(FRAG_PROJECTS, poll=poll_attrs("/frag/projects"), stats=stats, clashes=clashes, table=table_html)


def _project_row(rollup: ProjectStatus, *, n_ready: int = 0) -> Html:
    p = rollup.project
    ready = [render(READY_BADGE, n=n_ready)] if n_ready else []  # the ready queue's length: what dispatch takes
    return render(PROJECT_ROW, id=p.id, name=p.name, goal=p.goal, owner=p.owner or "—",
                  dispatch=join([Html(" "), badge("dispatch on", "violet")]) if p.is_dispatching else Html(""),
                  status=badge(p.status, PROJECT_COLORS.get(p.status, "gray")),
                  counts=join([*ready, *(badge(f"{p.task_counts[s]} {STATUS_LABEL[s]}", TASK_COLORS[s])
                                         for s in TASK_STATUSES if p.task_counts[s])])
                  or Html('<span class="muted">none</span>'),
                  n_done=p.task_counts["done"], n_total=sum(p.task_counts.values()) or 1,
                  n_sessions=rollup.n_sessions or "—",
                  tokens=tokens_text(rollup.tokens) if rollup.n_sessions else "")


def activity_fragment(req: Request) -> Html:
    """Render the newest events of the log, polled in place."""
    return render(FRAG_ACTIVITY, poll=poll_attrs("/frag/activity"),
                  body=feed(req.svc.list_events(limit=12), empty="Nothing has happened yet."))


def project_form(req: Request, *, oob: bool = False) -> Html:
    """Render the new-project form (oob: to reset it beside another answer)."""
    return render(PROJECT_FORM, csrf=csrf_field(req), attrs=form_attrs("/projects", target="#frag-projects"),
                  oob=Html(' hx-swap-oob="true"') if oob else Html(""))


def page_dashboard(req: Request) -> Response:
    """Show what needs attention, the project roll-up, the fleet and recent activity."""
    return page(req, "Dashboard", render(
        MAIN_DASHBOARD, attention=attention_fragment(req), projects=projects_fragment(req),
        fleet=fleet_fragment(req), peers=peers_fragment(req), activity=activity_fragment(req),
        project_form=project_form(req)))


def page_projects(req: Request) -> Response:
    """List the projects, with a form to create one."""
    return page(req, "Projects", render(MAIN_PROJECTS, projects=projects_fragment(req),
                                        project_form=project_form(req)))


def frag_projects(req: Request) -> Response:
    """Answer the projects poll."""
    return html_response(projects_fragment(req))


def frag_activity(req: Request) -> Response:
    """Answer the activity poll."""
    return html_response(activity_fragment(req))


def frag_create_project(req: Request) -> Response:
    """Create a project from the form; htmx gets the refreshed roll-up, a plain post a redirect."""
    f = req.form()
    p = req.svc.create_project(f.get("name", ""), goal=f.get("goal", ""), owner=f.get("owner", ""))
    if not req.is_htmx:
        return redirect(f"/projects/{p.id}")
    return html_response(join([projects_fragment(req), project_form(req, oob=True),
                               flash(f"Created project {p.name}.", kind="ok", oob=True)]))


def tasks_fragment(req: Request, project: Project) -> Html:
    """Render a project's task table, polled in place."""
    tasks = req.svc.list_tasks(project_id=project.id)
    if not tasks:
        table_html = render(EMPTY, text="No tasks yet. Add the first one below.")
    else:
        table_html = render(TASKS_TABLE, rows=join(render(
            TASK_ROW, id=t.id, short_id=t.id[:SHORT_ID], title=t.title, priority=t.priority,
            pri_color="red" if t.priority == 0 else "orange" if t.priority == 1 else "gray",
            status_form=status_form(req, t, view="tasks"), tags=tag_badges(t),
            assignee=join([assignee_text(t), start_button(req, t, view="tasks")
                           if project.dirs and t.status != "done" and not t.session_id else Html("")]))
            for t in tasks))
    return render(FRAG_PROJECT_TASKS, poll=poll_attrs(f"/frag/projects/{project.id}/tasks"), table=table_html)


def tag_badges(task: Task) -> Html:
    """Return a task's tags as small badges, each after a space."""
    return join(Html(f" {badge(f'#{tag}', 'gray')}") for tag in task.tags)
def start_button(req: Request, task: Task, *, view: str) -> Html:
    """Render the button that starts a session for a task where its project's code lives."""
    return render(START_BUTTON, csrf=csrf_field(req), view=view,
                  attrs=form_attrs(f"/tasks/{task.id}/sessions",
                                   target="#frag-task" if view == "task" else "#frag-tasks"))


def start_card(req: Request, task: Task) -> Html:
    """Render a task's session card: its session with Stop or Resume, and the form that starts a new one."""
    project = req.svc.get_project(task.project_id)
    here = req.db.machine_id
    hosts = sorted(project.dirs, key=lambda h: (h != here, h))
    note = (f"Claude runs in a new window of tmux session {tmux_session_name(project.name)} on that host, and gets "
            "the task as its first prompt." if hosts else
            f"Say where the code lives first: clare project set {project.name} --dir /PATH")
    found = [s for s in find_sessions(req.db, prefix=task.session_id) if s.id == task.session_id] \
        if task.session_id else []
    current, is_live = Html(""), bool(found) and found[0].state != "gone"
    if is_live:
        note = "One session per task: stop this one before starting another."
    if found:
        s = found[0]
        verb = "resume" if s.state == "gone" else "stop"
        current = render(SESSION_NOW, id=s.id, short=s.id[:SHORT_ID], state=SESSION_LABELS.get(s.state, s.state),
                         host=s.host, button=render(
                             SESSION_BUTTON, csrf=csrf_field(req), label=verb.capitalize(),
                             force=FORCE_BOX if verb == "stop" else Html(""),
                             attrs=form_attrs(f"/sessions/{s.id}/{verb}", target="#start-session")))
    return render(START_CARD, csrf=csrf_field(req), current=current,
                  attrs=form_attrs(f"/tasks/{task.id}/sessions", target="#start-session"),
                  hosts=options(((h, f"{h} · {project.dirs[h]}") for h in hosts), here),
                  disabled=Html("" if hosts and task.status != "done" and not is_live else " disabled"), note=note)


def status_form(req: Request, task: Task, *, view: str) -> Html:
    """Render the select that changes a task's status as soon as it changes."""
    target = "#frag-task" if view == "task" else "#frag-tasks"
    return render(STATUS_FORM, attrs=form_attrs(f"/tasks/{task.id}/status", target=target, trigger="change"),
                  csrf=csrf_field(req),
                  view=view, options=options(((s, STATUS_LABEL[s]) for s in TASK_STATUSES), task.status))


def task_form(req: Request, project: Project, *, oob: bool = False) -> Html:
    """Render the add-task form of a project."""
    return render(TASK_FORM, csrf=csrf_field(req), oob=Html(' hx-swap-oob="true"') if oob else Html(""),
                  attrs=form_attrs(f"/projects/{project.id}/tasks", target="#frag-tasks"),
                  priorities=options(((str(n), f"P{n}") for n in PRIORITIES), str(DEFAULT_PRIORITY)))


def queue_fragment(req: Request, project: Project) -> Html:
    """Render a project's queue: its ready tasks in order, what each waiting task waits on, its cycles; polled."""
    queue = req.svc.get_queue(project.id)
    titles = {t.id: t.title for w in queue.waiting for t in [*w.waits_on, *w.blocks]}
    titles.update((t.id, t.title) for t in req.svc.list_tasks(project_id=project.id, include_removed=True))

    def named(task_id: str) -> str:
        return f"{titles[task_id]} ({task_id[:SHORT_ID]})" if task_id in titles else task_id[:SHORT_ID]
    cycles = join(render(CYCLE_ALERT, chain=" → ".join(map(named, c)),
                         fix=f"clare task edit {c[0][:SHORT_ID]} --no-after {c[1][:SHORT_ID]}") for c in queue.cycles)
    ready = render(QUEUE_LIST, items=join(render(
        QUEUE_ITEM, id=t.id, short_id=t.id[:SHORT_ID], title=t.title, priority=t.priority, tags=tag_badges(t),
        pri_color="red" if t.priority == 0 else "orange" if t.priority == 1 else "gray") for t in queue.ready)) \
        if queue.ready else render(EMPTY, text="No task is ready: each open task waits, is assigned, or is not todo.")
    waiting = render(WAITS_LIST, items=join(render(
        WAITS_ITEM, id=w.task_id, short_id=w.task_id[:SHORT_ID], title=titles.get(w.task_id, ""),
        ready=join([badge("ready", "violet"), Html(" ")]) if w.is_ready else Html(""),
        deps=join([*(_wait_dep(t) for t in w.waits_on),
                   *(render(WAIT_UNKNOWN, short_id=x[:SHORT_ID]) for x in w.unknown)]))
        for w in queue.waiting)) if queue.waiting else render(EMPTY, text="No open task waits on another.")
    return render(FRAG_PROJECT_QUEUE, poll=poll_attrs(f"/frag/projects/{project.id}/queue"), cycles=cycles,
                  n_ready=str(len(queue.ready)), ready=ready, waiting=waiting)


def _wait_dep(task: Task) -> Html:
    """Render one task waited on: struck through once done (or removed), else with its status."""
    is_over = task.status == "done" or task.removed_at is not None
    state = badge("removed" if task.removed_at else STATUS_LABEL[task.status],
                  "gray" if task.removed_at else TASK_COLORS[task.status])
    return render(WAIT_DEP, id=task.id, title=task.title, state=state, done_class=Html(" over" if is_over else ""))


def frag_project_queue(req: Request) -> Response:
    """Answer the queue poll of a project."""
    return html_response(queue_fragment(req, req.svc.get_project(req.params["project"])))


def page_project(req: Request) -> Response:
    """Show a project: its tasks, a form to add one, its updates and history."""
    svc = req.svc
    p = svc.get_project(req.params["project"])
    tasks = svc.list_tasks(project_id=p.id)
    updates = svc.list_updates(task_ids=[t.id for t in tasks], limit=10)
    return page(req, p.name, render(
        MAIN_PROJECT, name=p.name, id=p.id, owner=p.owner or "—", created=when_text(p.created_at),
        head=project_head(p), csrf=csrf_field(req),
        status_attrs=form_attrs(f"/projects/{p.id}/status", target="body", swap="none", trigger="change"),
        status_options=options(((s, s) for s in PROJECT_STATUSES), p.status),
        dirs=join(render(PROJECT_DIR, path=d, host=h) for h, d in p.dirs.items()) if p.dirs else Html("—"),
        queue=queue_fragment(req, p), tasks=tasks_fragment(req, p), task_form=task_form(req, p),
        dispatch=dispatch_card(req, p),
        updates=updates_list(updates, empty="No updates on these tasks yet."),
        history=feed(svc.project_history(p, limit=30), empty="No history.")))


def dispatch_card(req: Request, project: Project) -> Html:
    """Render a project's dispatch switch: on or off, how many sessions, and the one host that decides."""
    here = req.db.machine_id
    hosts = sorted(set(list_known_hosts(req.db)) | {project.dispatcher or here}, key=lambda h: (h != here, h))
    if project.is_dispatching:
        state = (f"On: as a session of {project.name} finishes its task and waits, {project.dispatcher} types the "
                 f"next ready task into it, and starts sessions while fewer than {project.max_sessions} run.")
        if not project.dirs:
            state += f" But {NO_DIR_DISPATCH}: clare project set {project.name} --dir /PATH"
    else:
        state = "Off: sessions that finish a task wait for you."
    note = ("Only the dispatcher host dispatches (its clare serve does, every pull). Name another host while that "
            "one is away; two hosts that each changed it while apart may both dispatch until they sync.")
    return render(DISPATCH_CARD, state=state, csrf=csrf_field(req), note=note,
                  attrs=form_attrs(f"/projects/{project.id}/dispatch", target="#dispatch-card"),
                  checked=Html(" checked" if project.is_dispatching else ""), max=MAX_DISPATCH_SESSIONS,
                  n=project.max_sessions, hosts=options(((h, h + (" (this host)" if h == here else ""))
                                                         for h in hosts), project.dispatcher or here))


def frag_set_project_dispatch(req: Request) -> Response:
    """Turn a project's dispatch on or off, with its maximum and dispatcher host, from its card."""
    f = req.form()
    p = req.svc.edit_project(req.params["project"], dispatch=f.get("dispatch") == "on",
                             max_sessions=_form_int(f.get("max_sessions", ""), "Sessions, at most"),
                             dispatcher=f.get("dispatcher") or None)
    if not req.is_htmx:
        return redirect(f"/projects/{p.id}")
    return html_response(join([dispatch_card(req, p), flash(
        f"Dispatch for {p.name} is {'on, decided by ' + str(p.dispatcher) if p.is_dispatching else 'off'}.",
        kind="ok", oob=True)]))


def project_head(project: Project, *, oob: bool = False) -> Html:
    """Render the status badge and goal under a project's name."""
    return render(PROJECT_HEAD, status=badge(project.status, PROJECT_COLORS.get(project.status, "gray")),
                  goal=project.goal, oob=Html(' hx-swap-oob="true"') if oob else Html(""))


def updates_list(updates: list[Update], *, empty: str) -> Html:
    """Render progress notes, newest first."""
    if not updates:
        return render(EMPTY, text=empty)
    return render(FEED, items=join(
        render(FEED_ITEM, text=render(TAIL, text=u.text) if u.source == "pane-tail" else u.text, at=u.created_at,
               when=when_text(u.created_at), where=f"{u.source} · {u.machine_id}") for u in reversed(updates)))


def frag_project_tasks(req: Request) -> Response:
    """Answer the task-table poll of a project."""
    return html_response(tasks_fragment(req, req.svc.get_project(req.params["project"])))


def frag_add_task(req: Request) -> Response:
    """Add a task from the form; htmx gets the refreshed task table."""
    f = req.form()
    t = req.svc.create_task(req.params["project"], f.get("title", ""), description=f.get("description", ""),
                            priority=_form_int(f.get("priority", str(DEFAULT_PRIORITY)), "priority"),
                            after=_id_words(f.get("after", "")))
    if not req.is_htmx:
        return redirect(f"/projects/{t.project_id}")
    p = req.svc.get_project(t.project_id)
    return html_response(join([tasks_fragment(req, p), task_form(req, p, oob=True),
                               flash(f"Added {t.title}.", kind="ok", oob=True)]))


def _form_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{what} {text[:20]!r} is not a whole number; type one in digits, e.g. 3") from None


def frag_set_project_status(req: Request) -> Response:
    """Change a project's status from its select."""
    p = req.svc.edit_project(req.params["project"], status=req.form().get("status", ""))
    if not req.is_htmx:
        return redirect(f"/projects/{p.id}")
    return html_response(join([project_head(p, oob=True),
                               flash(f"Project {p.name} is now {p.status}.", kind="ok", oob=True)]))


def task_fragment(req: Request, task: Task) -> Html:
    """Render a task's facts card, polled in place."""
    unassign = (render(UNASSIGN_FORM, csrf=csrf_field(req),
                       attrs=form_attrs(f"/tasks/{task.id}/unassign", target="#frag-task"))
                if task.session_id or task.group_id else Html(""))
    removed = (render(REMOVED_NOTE, badge=badge("removed", "orange"), when=when_text(task.removed_at),
                      short_id=task.id[:SHORT_ID]) if task.removed_at else Html(""))
    waits = req.svc.get_task_waits(task.id)
    waits_on = join([*map(_wait_dep, waits.waits_on), *(render(WAIT_UNKNOWN, short_id=x[:SHORT_ID])
                                                         for x in waits.unknown)])
    cycle = render(CYCLE_ALERT, chain=cycle_text(waits.cycle),
                   fix=f"clare task edit {waits.cycle[0][:SHORT_ID]} --no-after {waits.cycle[1][:SHORT_ID]}") \
        if waits.cycle else Html("")
    return render(FRAG_TASK, poll=poll_attrs(f"/frag/tasks/{task.id}"), id=task.id, priority=task.priority,
                  waits_on=waits_on or "—", blocks=join(map(_wait_dep, waits.blocks)) or "—", cycle=cycle,
                  csrf=csrf_field(req), waits_attrs=form_attrs(f"/tasks/{task.id}/waits", target="#frag-task"),
                  removed=removed, tags=tag_badges(task) or "—",
                  status_form=status_form(req, task, view="task"), assignee=assignee_text(task), unassign=unassign,
                  created=when_text(task.created_at),
                  description=render(DESCRIPTION, text=task.description) if task.description else Html(""))


def updates_fragment(req: Request, task: Task) -> Html:
    """Render a task's updates, polled in place."""
    items = updates_list(req.svc.list_updates(task_ids=[task.id], limit=50), empty="No updates yet.")
    return render(FRAG_UPDATES, poll=poll_attrs(f"/frag/tasks/{task.id}/updates"), items=items)


def update_form(req: Request, task: Task, *, oob: bool = False) -> Html:
    """Render the post-update form of a task."""
    return render(UPDATE_FORM, csrf=csrf_field(req), oob=Html(' hx-swap-oob="true"') if oob else Html(""),
                  attrs=form_attrs(f"/tasks/{task.id}/updates", target="#frag-updates"))


def page_task(req: Request) -> Response:
    """Show a task: status, assignment, updates and history, with forms to change them."""
    svc = req.svc
    t = svc.get_task(req.params["task"])
    return page(req, t.title, render(
        MAIN_TASK, title=t.title, project=t.project, project_id=t.project_id, short_id=t.id[:SHORT_ID],
        priority=t.priority, task_card=task_fragment(req, t), csrf=csrf_field(req),
        assign_attrs=form_attrs(f"/tasks/{t.id}/assignment", target="#frag-task"),
        group_options=options(((g.name, g.name) for g in svc.list_groups()), None),
        session_picker=session_picker(req, t.session_id), start_card=start_card(req, t),
        update_form=update_form(req, t),
        updates=updates_fragment(req, t),
        history=history_fragment(req, [t.id], url=f"/frag/tasks/{t.id}/history")))


def history_fragment(req: Request, entity_ids: list[str], *, url: str, oob: bool = False) -> Html:
    """Render the history card of a task or a session, polled in place (oob: beside another answer)."""
    return render(FRAG_HISTORY, poll=poll_attrs(url), oob=Html(' hx-swap-oob="true"') if oob else Html(""),
                  feed=feed(req.svc.list_history(entity_ids, limit=50), empty="No history."))


def frag_task_history(req: Request) -> Response:
    """Answer the history poll of a task."""
    t = req.svc.get_task(req.params["task"])
    return html_response(history_fragment(req, [t.id], url=f"/frag/tasks/{t.id}/history"))


def frag_task(req: Request) -> Response:
    """Answer the task-card poll."""
    return html_response(task_fragment(req, req.svc.get_task(req.params["task"])))


def frag_task_updates(req: Request) -> Response:
    """Answer the updates poll of a task."""
    return html_response(updates_fragment(req, req.svc.get_task(req.params["task"])))


def _after_task_change(req: Request, task: Task, message: str, *, kind: str = "ok") -> Response:
    view = req.form().get("view")
    if not req.is_htmx:
        return redirect(f"/tasks/{task.id}" if view == "task" else f"/projects/{task.project_id}")
    if view == "task":
        body = join([task_fragment(req, task),
                     history_fragment(req, [task.id], url=f"/frag/tasks/{task.id}/history", oob=True)])
    else:
        body = tasks_fragment(req, req.svc.get_project(task.project_id))
    return html_response(join([body, flash(message, kind=kind, oob=True)]))


def frag_set_task_status(req: Request) -> Response:
    """Change a task's status from its select."""
    t = req.svc.edit_task(req.params["task"], status=req.form().get("status", ""))
    return _after_task_change(req, t, f"{t.title}: {STATUS_LABEL[t.status]}.")


def frag_set_task_waits(req: Request) -> Response:
    """Add and drop the tasks a task waits on, from its card's form (ids or prefixes, by spaces or commas)."""
    f = req.form()
    t = req.svc.edit_task(req.params["task"], after=_id_words(f.get("after", "")),
                          no_after=_id_words(f.get("no_after", "")))
    return _after_task_change(req, t, f"{t.title}: waits on {len(t.after)} task{'' if len(t.after) == 1 else 's'}.")


def _id_words(text: str) -> list[str]:
    return text.replace(",", " ").split()


def frag_assign_task(req: Request) -> Response:
    """Assign a task to the session id or the group of the form."""
    f = req.form()
    t = req.svc.assign_task(req.params["task"], session_id=f.get("session_id", "").strip() or None,
                            group_ref=f.get("group") or None)
    return _after_task_change(req, t, f"{t.title}: assigned.")


def frag_start_session(req: Request) -> Response:
    """Start a session for a task from its button or form; the flash says what came of it."""
    # SECURITY: this runs Claude and types into it: a POST under the token and the CSRF check.
    f = req.form()
    order = req.svc.start_session(req.params["task"], host=f.get("host") or None, is_worktree=f.get("worktree") == "1",
                                  model=f.get("model", "").strip() or None, config=req.config.settings)
    return _after_order(req, order, task_id=req.params["task"])


def _after_order(req: Request, order: Order, *, task_id: str | None) -> Response:
    """Answer a start, stop or resume: the task's session card (or task table) and a flash saying what came of it."""
    kind = "ok" if order.result in ("started", "stopped", "pending") else "error"
    ref = order.task_id or task_id
    task = req.svc.get_task(ref) if ref else None
    if req.form().get("view") != "card" or task is None:
        if task is None:
            return redirect(f"/sessions/{order.session_id}") if not req.is_htmx else \
                html_response(flash(order_text(order), kind=kind))
        return _after_task_change(req, task, order_text(order), kind=kind)
    if not req.is_htmx:
        return redirect(f"/tasks/{task.id}")
    return html_response(join([start_card(req, task), flash(order_text(order), kind=kind, oob=True)]))


def frag_stop_session(req: Request) -> Response:
    """Stop a task's session from its card: /exit, or SIGTERM when "even while it works" is ticked."""
    order = req.svc.stop_session(req.params["session"], is_force=req.form().get("force") == "1",
                                 config=req.config.settings)
    return _after_order(req, order, task_id=None)


def frag_resume_session(req: Request) -> Response:
    """Resume a task's gone session from its card."""
    order = req.svc.resume_session(req.params["session"], config=req.config.settings)
    return _after_order(req, order, task_id=None)


def frag_unassign_task(req: Request) -> Response:
    """End a task's assignment."""
    t = req.svc.unassign_task(req.params["task"])
    return _after_task_change(req, t, f"{t.title}: unassigned.")


def frag_post_update(req: Request) -> Response:
    """Post a progress note on a task; htmx gets the refreshed list and an empty form."""
    svc = req.svc
    t = svc.get_task(req.params["task"])
    svc.post_update(req.form().get("text", ""), task_ref=t.id)
    if not req.is_htmx:
        return redirect(f"/tasks/{t.id}")
    return html_response(join([updates_fragment(req, t), update_form(req, t, oob=True),
                               history_fragment(req, [t.id], url=f"/frag/tasks/{t.id}/history", oob=True),
                               flash("Update posted.", kind="ok", oob=True)]))


SESSION_COLORS = {"working": "blue", "waiting": "amber", "permission": "red", "idle": "gray", "gone": "gray"}
SESSION_LABELS = {"working": "working", "waiting": "waiting for you", "permission": "needs permission",
                  "idle": "idle", "gone": "gone"}

FRAG_ATTENTION = string.Template("""<section class="card attention" id="frag-attention" $poll>
<h2>Needs you</h2>$body</section>""")
ATTENTION_LIST = string.Template('<ul class="feed" hx-disable>$items</ul>')
NEEDS_LIST = string.Template('<ul class="feed">$items</ul>')  # each item's untrusted text sits under hx-disable
ATTENTION_ITEM = string.Template("""<li data-row="/sessions/$id"><div hx-disable><div class="line">$state
<a href="/sessions/$id"><b>$label</b></a>
<span class="muted small">$since</span></div>$asked
<div class="small">$project$task</div>
<div class="muted small"><span class="mono">$short_id</span> · $host · <span class="mono">$where</span> · $cwd</div>
</div><div class="actions small"><a href="/sessions/$id">Open</a><a href="/sessions/$id#attach">Attach</a>$answers
</div></li>""")
ASKED = string.Template('<div class="asked">$tool: $input</div>')
TASK_LINK = string.Template('task <a href="/tasks/$id">$title</a>')
PROJECT_LINK = string.Template('<a href="/projects/$id">$name</a> · ')
FILTER_FORM = string.Template("""<form class="row" method="get" action="/needs" role="search">
<label class="wide">Filter (press /)<input id="filter" name="q" value="$q" placeholder="project, task, host, folder"
autocomplete="off"></label><noscript><button class="ghost">Filter</button></noscript></form>""")
MAIN_NEEDS = string.Template("""<h1>Needs you</h1>
<p class="sub">Permission dialogs first, then the sessions that have waited longest. <kbd>j</kbd>/<kbd>k</kbd> move,
<kbd>o</kbd> opens, <kbd>/</kbd> filters, <kbd>?</kbd> lists the keys.</p>
$filter
$attention""")
FRAG_FLEET = string.Template("""<section class="card" id="frag-fleet" $poll>
<h2>Sessions</h2>$table</section>""")
FLEET_TABLE = string.Template("""<div class="scroll"><table class="cards">
<thead><tr><th>State</th><th>Session</th><th>Where</th><th>Task</th><th>Active</th><th class="hide-sm">Tokens</th>
</tr></thead>
<tbody hx-disable>$rows</tbody></table></div>""")
FLEET_ROW = string.Template("""<tr data-row="/sessions/$full_id"><td>$state</td>
<td class="title"><a href="/sessions/$full_id"><b>$label</b></a><div class="mono muted small">$id</div></td>
<td><span class="mono small">$host · $where</span><div class="muted small">$cwd</div></td>
<td class="title">$task</td><td class="muted small">$active</td><td class="hide-sm mono small">$tokens</td></tr>""")
TASK_CELL = string.Template('<a href="/tasks/$id">$title</a>')
MAIN_SESSIONS = string.Template("""<h1>Sessions</h1>
<p class="sub">Claude sessions on every host, as each host last saw them: a host's
<span class="mono">clare serve</span> looks at its own sessions every few seconds and its hooks report at once,
so there is nothing to run.</p>
$attention
$fleet
$ambiguous""")
AMBIGUOUS = string.Template("""<section class="card"><h2>Panes Clare cannot tell apart</h2>
<ul class="feed" hx-disable>$items</ul></section>""")
AMBIGUOUS_ITEM = string.Template(
    '<li><span class="mono">$target</span> in <span class="mono">$cwd</span>: Claude runs here, but its session '
    'cannot be told apart from another in this folder</li>')
SESSION_PICKER = string.Template("""<label class="wide">Session<select name="session_id">$options</select></label>""")


def session_badge(session: Session) -> Html:
    """Return the state badge of a session."""
    return badge(SESSION_LABELS.get(session.state, session.state), SESSION_COLORS.get(session.state, "gray"))


def asked_text(session: Session) -> Html:
    """Render what a session's permission dialog asks (tool and command), or nothing."""
    if session.state != "permission" or not session.asked:
        return Html("")
    return render(ASKED, tool=session.asked["tool"], input=short_text(session.asked["input"], 300))


def attention_fragment(req: Request, *, query: str = "") -> Html:
    """Render the sessions that wait for a person, for triage: permission dialogs first, then the longest waiting."""
    now = now_ms()
    svc = req.svc
    sessions = svc.list_needs()
    tasks = {t.id: t for t in svc.list_tasks()} if sessions else {}
    if query:
        q = query.lower()
        sessions = [s for s in sessions if q in " ".join((
            s.label, s.cwd, s.host, s.tmux_target or "", tasks[s.task_id].title if s.task_id in tasks else "",
            tasks[s.task_id].project if s.task_id in tasks else "")).lower()]
    # SECURITY: labels, cwds and what a dialog asks come from transcripts, hooks and panes: escaped, in hx-disable.
    body = render(NEEDS_LIST, items=join(render(
        ATTENTION_ITEM, state=session_badge(s), label=s.label or s.tmux_target or s.id[:SHORT_ID],
        since=ago_text(s.state_at or s.last_activity_at, now), id=s.id, short_id=s.id[:SHORT_ID], host=s.host,
        where=s.tmux_target or "-", cwd=s.cwd, asked=asked_text(s),
        project=render(PROJECT_LINK, id=tasks[s.task_id].project_id, name=tasks[s.task_id].project)
        if s.task_id in tasks else Html(""),
        task=render(TASK_LINK, id=s.task_id, title=tasks[s.task_id].title) if s.task_id in tasks
        else Html('<span class="muted">no task</span>'),
        answers=answer_forms(req, s, view="needs") if s.state == "permission" and s.asked else Html(""))
        for s in sessions)) if sessions else render(EMPTY, text="Nobody is waiting on you.")
    url = "/frag/attention" + (f"?q={quote_query(query)}" if query else "")
    return render(FRAG_ATTENTION, poll=poll_attrs(url), body=body)


def quote_query(text: str) -> str:
    """Return text quoted for a URL's query string."""
    from urllib.parse import quote

    return quote(text, safe="")


def fleet_fragment(req: Request) -> Html:
    """Render every live session with its state and current task."""
    now = now_ms()
    report = req.svc.get_status()
    sessions, tasks = report.sessions, report.tasks
    if not sessions:
        table_html = render(EMPTY, text="No Claude sessions seen yet. Each host's 'clare serve' finds the sessions "
                                        "in its tmux panes by itself; start it on the hosts that run Claude.")
    else:
        table_html = render(FLEET_TABLE, rows=join(render(
            FLEET_ROW, state=session_badge(s), label=s.label or "(no title yet)", id=s.id[:SHORT_ID], full_id=s.id,
            host=s.host,
            where=s.tmux_target or "-", cwd=s.cwd, active=ago_text(s.last_activity_at, now),
            tokens=tokens_text(s.tokens),
            task=render(TASK_CELL, id=s.task_id, title=tasks[s.task_id].title) if s.task_id in tasks
            else Html('<span class="muted">—</span>')) for s in sessions))
    return render(FRAG_FLEET, poll=poll_attrs("/frag/fleet", every_s=FLEET_POLL_S), table=table_html)


def session_picker(req: Request, selected: str | None) -> Html:
    """Render the live sessions to assign a task to: by label, project, host and folder, never by typed id."""
    svc = req.svc
    report = svc.get_status()

    def label(s: Session) -> str:
        project = report.tasks[s.task_id].project if s.task_id in report.tasks else "no project"
        return (f"{short_text(s.label or '(no title yet)', 50)} · {project} · {s.host} · "
                f"{short_text(s.cwd, 40)} · {SESSION_LABELS.get(s.state, s.state)}")
    choices = [("", "— pick a live session —")] + [(s.id, label(s)) for s in report.sessions]
    return render(SESSION_PICKER, options=options(choices, selected))


def page_needs(req: Request) -> Response:
    """Show who needs you, for triage, with a filter that also works without JavaScript."""
    query = (req.arg("q") or "").strip()[:100]
    return page(req, "Needs you", render(MAIN_NEEDS, filter=render(FILTER_FORM, q=query),
                                         attention=attention_fragment(req, query=query)))


def frag_nav_needs(req: Request) -> Response:
    """Answer the poll of the navigation's needs-you count."""
    return html_response(nav_needs(req.svc.list_needs()))


def page_sessions(req: Request) -> Response:
    """Show the fleet: who waits for a person, then every session with its task."""
    panes = req.svc.list_ambiguous_panes()
    ambiguous = render(AMBIGUOUS, items=join(render(AMBIGUOUS_ITEM, target=p.target, cwd=p.cwd) for p in panes)) \
        if panes else Html("")
    return page(req, "Sessions", render(MAIN_SESSIONS, attention=attention_fragment(req), fleet=fleet_fragment(req),
                                        ambiguous=ambiguous))


def frag_attention(req: Request) -> Response:
    """Answer the needs-you poll."""
    return html_response(attention_fragment(req, query=(req.arg("q") or "").strip()[:100]))


def frag_fleet(req: Request) -> Response:
    """Answer the sessions poll."""
    return html_response(fleet_fragment(req))


MAIN_SESSION = string.Template("""<p class="muted small"><a href="/sessions">Sessions</a> /</p>
<h1 hx-disable>$label</h1>
<p class="sub">$state $since · $host · <span class="mono">$where</span></p>
$lineage
<div class="grid">
$facts
<div>
<section class="card" id="attach"><h2>Attach</h2>$attach</section>
<section class="card" id="session-task"><h2>Task</h2>
<form class="row" $task_attrs>$csrf
<label class="wide">Work on<select name="task">$task_options</select></label>
<button type="submit">Set task</button></form></section>
</div>
</div>
$pane
<div class="grid">
$turns
$history
</div>""")
FRAG_SESSION = string.Template("""<section class="card" id="frag-session" $poll>
<h2>Session</h2>
<div hx-disable>$asked
<dl class="facts"><dt>State</dt><dd>$state <span class="muted small">since $since</span></dd>
<dt>Task</dt><dd>$task</dd>
<dt>Host</dt><dd>$host</dd><dt>Folder</dt><dd class="mono">$cwd</dd><dt>tmux</dt><dd class="mono">$where</dd>
<dt>Active</dt><dd>$active</dd><dt>Tokens</dt><dd class="mono" title="$tokens_title">$tokens</dd>
<dt>Command</dt><dd class="mono small">$command</dd><dt>Id</dt><dd class="mono">$id</dd></dl></div>
$answer</section>""")
ANSWER_BOX = string.Template("""<div class="answer" id="answer"><h2>Answer</h2><div class="actions">$forms</div>
<p class="small muted">Typed by $host only if this same dialog is still open there; expires after $ttl min.</p>
</div>""")
ANSWER_FORM = string.Template("""<form class="tight" $attrs $confirm>$csrf
<input type="hidden" name="view" value="$view"><input type="hidden" name="answer" value="$answer">
<input type="hidden" name="option" value="$option"><input type="hidden" name="option_text" value="$option_text">
<input type="hidden" name="tool_use_id" value="$tool_use_id">
$reason<button type="submit" class="$kind">$label</button></form>""")
REASON_INPUT = string.Template(
    '<input name="reason" maxlength="2000" placeholder="tell Claude instead (optional)" aria-label="reason">')
CONFIRM_ATTRS = string.Template('hx-confirm="$question" hx-vals="$vals"')
MAIN_CONFIRM = string.Template("""<p class="muted small"><a href="/sessions/$id">$label</a> /</p>
<h1>Send this answer?</h1>
<section class="card"><p hx-disable>$host asks: <span class="asked">$tool: $input</span></p>
<p>Your answer: <b>$answer_text</b>. $host types it only if this same dialog is still open there.</p>
<form class="row" method="post" action="/sessions/$id/answer">$csrf<input type="hidden" name="confirmed" value="1">
<input type="hidden" name="view" value="$view"><input type="hidden" name="answer" value="$answer">
<input type="hidden" name="option" value="$option"><input type="hidden" name="option_text" value="$option_text">
<input type="hidden" name="tool_use_id" value="$tool_use_id"><input type="hidden" name="reason" value="$reason">
<button type="submit">Yes, send it</button> <a href="/sessions/$id">Cancel</a></form></section>""")
ASKED_CARD = string.Template(
    """<p class="flash error"><b>Asks permission</b> · $tool<br><span class="asked">$input</span></p>""")
ATTACH = string.Template("""<p class="small muted">$where</p>
<div class="cmd"><code id="attach-cmd">$command</code>
<button type="button" class="ghost" data-copy="attach-cmd">Copy</button></div>
<p class="small muted">Or, from any terminal with Clare: <span class="mono">clare attach $short_id</span>.
This page only shows the pane; it never types into it.</p>""")
FRAG_PANE = string.Template("""<section class="card" id="frag-pane" $poll>
<h2>Pane <span class="muted">· $where · $when</span></h2>$body</section>""")
PANE_TEXT = string.Template('<pre class="pane" hx-disable>$text</pre>')
FRAG_TURNS = string.Template("""<section class="card" id="frag-turns" $poll><h2>Transcript</h2>$body</section>""")
TURN_ITEM = string.Template(
    '<li class="turn"><b class="small">$who</b><span>$text<time datetime="$at">$when</time></span></li>')
TURN_WHO = {"user": "prompt", "assistant": "Claude", "tool": "tools"}


def is_cross_site(headers: dict[str, str]) -> bool:
    """Tell whether a browser sent this request for another site (a link from elsewhere included)."""
    try:
        check_same_origin(headers)
    except HttpError:
        return True
    return False


def session_fragment(req: Request, s: Session, task: Task | None) -> Html:
    """Render a session's facts: state and since when, what a dialog asks, task, host, folder, pane, tokens."""
    now = now_ms()
    return render(
        FRAG_SESSION, poll=poll_attrs(f"/frag/sessions/{s.id}"), state=session_badge(s),
        since=ago_text(s.state_at, now), host=s.host, cwd=s.cwd or "—", where=s.tmux_target or "not in tmux",
        active=ago_text(s.last_activity_at, now), tokens=tokens_text(s.tokens),
        command=short_text(s.command, 200) or "—",
        tokens_title=", ".join(f"{k} {v}" for k, v in s.tokens.items()), id=s.id, answer=answer_box(req, s),
        asked=render(ASKED_CARD, tool=s.asked["tool"], input=s.asked["input"]) if s.state == "permission" and s.asked
        else Html(""),
        task=render(TASK_CELL, id=task.id, title=f"{task.project}: {task.title}") if task
        else Html('<span class="muted">none</span>'))


def answer_forms(req: Request, s: Session, *, view: str, options: tuple[tuple[int, str], ...] = ()) -> Html:
    """Render the buttons that answer a session's open dialog: approve, deny (with a reason), its other options."""
    assert s.asked is not None
    what = f"{s.asked['tool']}: {short_text(s.asked['input'], 80)}"
    choices: list[tuple[str, int | None, str, str, str]] = [("approve", None, "", "Approve", ""),
                                                           ("deny", None, "", "Deny", "ghost")]
    choices += [("option", n, text, f"{n}. {short_text(text, 60)}", "ghost") for n, text in options
                if text != "Yes" and not text.startswith("No")]

    def one(answer: str, option: int | None, text: str, label: str, kind: str) -> Html:
        question = f"{label} — {what}?" if answer != "option" else f"Answer '{text}' to {what}?"
        target = "#frag-session" if view == "session" else "#frag-attention"
        return render(ANSWER_FORM, attrs=form_attrs(f"/sessions/{s.id}/answer", target=target),
                      confirm=render(CONFIRM_ATTRS, question=question, vals=json.dumps({"confirmed": "1"})),
                      csrf=csrf_field(req), view=view, answer=answer, option="" if option is None else option,
                      option_text=text, tool_use_id=s.asked.get("tool_use_id", "") if s.asked else "",
                      reason=render(REASON_INPUT) if answer == "deny" and view == "session" else Html(""),
                      kind=kind, label=label)
    return join(one(*c) for c in choices)


def answer_box(req: Request, s: Session) -> Html:
    """Render the answer buttons of a session page while a dialog is open, with the options its screen shows."""
    if s.state != "permission" or not s.asked:
        return Html("")
    view = view_pane(req.db, s, peers=req.config.peers, settings=req.config.settings, now_ms=now_ms())
    dialog = parse_dialog(view.text) if view.text else None
    return render(ANSWER_BOX, forms=answer_forms(req, s, view="session", options=dialog.options if dialog else ()),
                  host=s.host, ttl=ANSWER_TTL_MS // 60000)


def frag_answer_session(req: Request) -> Response:
    """Answer a session's dialog from a button: a confirm page first without JavaScript, then typed or pushed."""
    f = req.form()
    svc = req.svc
    s = svc.get_session(req.params["session"])
    option = _form_int(f["option"], "option") if f.get("option") else None
    fields: dict[str, Any] = {"answer": f.get("answer", ""), "option": option,
                              "option_text": f.get("option_text") or None, "reason": f.get("reason", ""),
                              "tool_use_id": f.get("tool_use_id") or None}
    view = "needs" if f.get("view") == "needs" else "session"
    if f.get("confirmed") != "1":
        asked = s.asked or {"tool": "?", "input": "nothing now"}
        answer_text = fields["answer"] if fields["answer"] in ("approve", "deny") else \
            f"option {option}: {fields['option_text'] or ''}"
        return page(req, "Send this answer?", render(
            MAIN_CONFIRM, id=s.id, label=s.label or s.id[:SHORT_ID], host=s.host, tool=asked["tool"],
            input=asked["input"], answer_text=answer_text + (f" — {fields['reason']}" if fields["reason"] else ""),
            csrf=csrf_field(req), view=view, answer=fields["answer"], option="" if option is None else option,
            option_text=fields["option_text"] or "", tool_use_id=fields["tool_use_id"] or "", reason=fields["reason"]))
    got = svc.answer_session(s.id, fields["answer"], option=option, option_text=fields["option_text"],
                             reason=fields["reason"], tool_use_id=fields["tool_use_id"], client="dashboard",
                             peers=req.config.peers, settings=req.config.settings)
    if not req.is_htmx:
        return redirect("/needs" if view == "needs" else f"/sessions/{s.id}")
    is_ok = got.answer.result in ("typed", "pending")
    message = f"Answer {got.answer.answer}: {got.note}"
    if view == "needs":
        return html_response(join([attention_fragment(req), flash(message, kind="ok" if is_ok else "error", oob=True)]))
    d = svc.get_session_detail(s.id, hosts=req.config.settings.get("hosts") or {})
    return html_response(join([session_fragment(req, d.session, d.task),
                               history_fragment(req, [s.id], url=f"/frag/sessions/{s.id}/history", oob=True),
                               flash(message, kind="ok" if is_ok else "error", oob=True)]))


def attach_card(req: Request, s: Session, argv: list[str] | None) -> Html:
    """Render the exact command that attaches a terminal to a session's pane, with a copy button."""
    if argv is None:
        return render(EMPTY, text="This session runs outside tmux: there is no pane to attach to.")
    import shlex

    where = ("In a terminal on this host:" if s.host == req.db.machine_id
             else f"In a terminal here, through ssh to {s.host} ([hosts.{s.host}] ssh in clare.toml names it):")
    return render(ATTACH, command=shlex.join(argv), where=where, short_id=s.id[:SHORT_ID])


def pane_fragment(req: Request, s: Session, *, is_live: bool = True) -> Html:
    """Render the live view of a session's pane (read from its host), refreshed while the page is open."""
    poll = poll_attrs(f"/frag/sessions/{s.id}/pane", every_s=PANE_POLL_S) if s.state != "gone" else Html("")
    if not is_live:
        return render(FRAG_PANE, poll=poll, where=s.host, when="loading",
                      body=render(EMPTY, text="The pane shows once this page loads from Clare itself."))
    view = view_pane(req.db, s, peers=req.config.peers, settings=req.config.settings, now_ms=now_ms())
    body = render(PANE_TEXT, text=view.text) if view.text else render(EMPTY, text=view.error or "The pane is empty.")
    return render(FRAG_PANE, poll=poll, where=f"{view.host} {s.tmux_target or ''}".strip(),
                  when=f"{when_text(view.captured_at)} UTC", body=body)


def turns_fragment(req: Request, s: Session, *, is_live: bool = True) -> Html:
    """Render the last entries of a session's transcript: who said what, and the tools Claude called."""
    poll = poll_attrs(f"/frag/sessions/{s.id}/transcript") if s.state != "gone" else Html("")
    if not is_live:
        return render(FRAG_TURNS, poll=poll, body=render(EMPTY, text="The transcript shows once this page loads."))
    try:
        turns = view_turns(req.db, s, peers=req.config.peers, settings=req.config.settings,
                           claude_dir=claude_home())
    except (ClareError, OSError) as err:
        return render(FRAG_TURNS, poll=poll, body=render(EMPTY, text=f"The transcript cannot be read: {err}"))
    if not turns:
        return render(FRAG_TURNS, poll=poll, body=render(EMPTY, text="No transcript lines yet."))
    # SECURITY: transcript text is untrusted: escaped, inside hx-disable.
    items = join(render(TURN_ITEM, who=TURN_WHO.get(t["role"], t["role"]), text=t["text"], at=t["at"],
                        when=when_text(t["at"]) if t["at"] else "") for t in reversed(turns))
    return render(FRAG_TURNS, poll=poll, body=render(FEED, items=items))


def task_choices(req: Request, s: Session) -> Html:
    """Render the open tasks, by project, that a session can be set to work on."""
    tasks = [t for t in req.svc.list_tasks() if t.status != "done"]
    by_project: dict[str, list[tuple[str, str]]] = {}
    for t in tasks:
        elsewhere = t.session_id and t.session_id != s.id or t.group_id
        by_project.setdefault(t.project, []).append(
            (t.id, f"P{t.priority} {short_text(t.title, 60)}" + (" (assigned elsewhere)" if elsewhere else "")))
    return join([render(OPTION, value="", label="— no task —", selected=Html("")),
                 *(render(OPTGROUP, label=name, options=options(choices, s.task_id))
                   for name, choices in sorted(by_project.items()))])


def page_session(req: Request) -> Response:
    """Show one session: state, what it asks, task, the way in, its live pane, transcript and history."""
    d = req.svc.get_session_detail(req.params["session"], hosts=req.config.settings.get("hosts") or {})
    s, now = d.session, now_ms()
    is_live = not is_cross_site(req.headers)  # a link from elsewhere gets the page; the pane loads from here
    return page(req, s.label or s.id[:SHORT_ID], render(
        MAIN_SESSION, label=s.label or f"Session {s.id[:SHORT_ID]}", state=session_badge(s),
        since=ago_text(s.state_at, now), host=s.host, where=s.tmux_target or "not in tmux",
        facts=session_fragment(req, s, d.task), attach=attach_card(req, s, d.attach), csrf=csrf_field(req),
        task_attrs=form_attrs(f"/sessions/{s.id}/task", target="#frag-session"), task_options=task_choices(req, s),
        pane=pane_fragment(req, s, is_live=is_live), turns=turns_fragment(req, s, is_live=is_live),
        history=history_fragment(req, [s.id], url=f"/frag/sessions/{s.id}/history"),
        lineage=lineage_html(s.id, d.history)))


SESSION_LINEAGE = string.Template("""<p class="sub">$what <a href="/sessions/$id" class="mono">$short</a>
(the same Claude process and pane, after /clear)</p>""")


def lineage_html(session_id: str, history: list[Event]) -> Html:
    """Link a session to the one its process went on as after /clear, and to the one it went on from."""
    links = []
    for ev in history:
        p = ev.payload
        if ev.event_type == "session.gone" and p.get("successor_id"):
            if p["session_id"] == session_id:
                links.append(render(SESSION_LINEAGE, what="Continued as", id=p["successor_id"],
                                    short=p["successor_id"][:SHORT_ID]))
            elif p["successor_id"] == session_id:
                links.append(render(SESSION_LINEAGE, what="Continues", id=p["session_id"],
                                    short=p["session_id"][:SHORT_ID]))
    return join(links)


def frag_session(req: Request) -> Response:
    """Answer the poll of a session's facts."""
    d = req.svc.get_session_detail(req.params["session"])
    return html_response(session_fragment(req, d.session, d.task))


def frag_session_pane(req: Request) -> Response:
    """Answer the poll of a session's live pane; refused cross-site."""
    check_same_origin(req.headers)
    return html_response(pane_fragment(req, req.svc.get_session(req.params["session"])))


def frag_session_turns(req: Request) -> Response:
    """Answer the poll of a session's transcript; refused cross-site."""
    check_same_origin(req.headers)
    return html_response(turns_fragment(req, req.svc.get_session(req.params["session"])))


def frag_session_history(req: Request) -> Response:
    """Answer the history poll of a session."""
    s = req.svc.get_session(req.params["session"])
    return html_response(history_fragment(req, [s.id], url=f"/frag/sessions/{s.id}/history"))


def frag_set_session_task(req: Request) -> Response:
    """Set the task a session works on from the picker ("— no task —" ends its current one)."""
    svc = req.svc
    s = svc.get_session(req.params["session"])
    task_ref = req.form().get("task", "").strip()
    if task_ref:
        t = svc.assign_task(task_ref, session_id=s.id)
        message = f"{short_text(s.label or s.id[:SHORT_ID], 40)} now works on {t.title}."
    elif s.task_id:
        t = svc.get_task(s.task_id)
        if t.session_id != s.id:
            raise Conflict(f"{t.title} is assigned to a group, not to this session; change it on the task's page")
        svc.unassign_task(t.id)
        message = f"{t.title} is no longer assigned."
    else:
        raise UsageError("pick a task for this session to work on")
    if not req.is_htmx:
        return redirect(f"/sessions/{s.id}")
    d = svc.get_session_detail(s.id)
    return html_response(join([session_fragment(req, d.session, d.task),
                               history_fragment(req, [s.id], url=f"/frag/sessions/{s.id}/history", oob=True),
                               flash(message, kind="ok", oob=True)]))


DELIVERY_COLORS = {"delivered": "green", "queued": "blue", "refused": "orange", "failed": "red", "expired": "gray"}

MAIN_BROADCAST = string.Template("""<h1>Broadcast</h1>
<p class="sub">Type one message into every live Claude session of a project, a group or one session. It arrives
as if typed at each keyboard: Claude may run commands because of it.</p>
<div class="grid">
<section class="card"><h2>Message</h2>
<form class="row" id="broadcast-form" $attrs>$csrf
<label class="wide">To<select name="target" required $preview_attrs>$targets</select></label>
<label class="wide">Text<textarea name="text" required maxlength="20000"
placeholder="run the tests and commit"></textarea></label>
<label class="check"><span><input type="checkbox" name="is_command" value="1"> a Claude command (/compact, !ls):
send it without the [clare] prefix</span></label>
<noscript><button class="ghost" type="submit" formmethod="get" formaction="/broadcast">Show recipients</button>
</noscript>
<button type="submit">Send</button>
</form></section>
$recipients
</div>
$result""")
FRAG_RECIPIENTS = string.Template("""<section class="card" id="frag-recipients">
<h2>Recipients</h2>$body</section>""")
RECIPIENT_ITEM = string.Template("""<li><div class="line">$state
<a href="/sessions/$full_id"><b>$label</b></a></div>
<div class="muted small"><span class="mono">$id</span> · $host · <span class="mono">$where</span> · $cwd</div>
$note</li>""")
RECIPIENT_NOTE = string.Template('<div class="small muted">$text</div>')
COUNT_LINE = string.Template('<p class="small muted">$text</p>')
FRAG_BROADCAST = string.Template("""<section class="card" id="broadcast-result" $poll>
<h2>Broadcast $short_id</h2>$body</section>""")
DELIVERY_TABLE = string.Template("""<div class="scroll"><table>
<thead><tr><th>Session</th><th>Where</th><th>Result</th><th>Why</th></tr></thead>
<tbody hx-disable>$rows</tbody></table></div>""")
DELIVERY_ROW = string.Template("""<tr><td class="mono"><a href="/sessions/$full_id">$id</a></td>
<td class="mono small">$host · $where</td>
<td>$result</td><td class="small">$reason</td></tr>""")
OPTGROUP = string.Template('<optgroup label="$label">$options</optgroup>')
PREVIEW_ATTRS = string.Template('hx-get="$url" hx-trigger="change" hx-target="$target" hx-swap="outerHTML"')


def preview_attrs(url: str, *, target: str) -> Html:
    """Return the htmx attributes that fetch a preview fragment when a field changes."""
    return render(PREVIEW_ATTRS, url=url, target=target)


def broadcast_targets(req: Request, selected: str | None) -> Html:
    """Render the target choices: projects, groups, then live sessions."""
    svc = req.svc
    groups = [("Projects", [(p.id, p.name) for p in svc.list_projects()]),
              ("Groups", [(f"group:{g.name}", g.name) for g in svc.list_groups()]),
              ("Sessions", [(f"session:{s.id}", f"{short_text(s.label or os.path.basename(s.cwd), 40)} · {s.host} "
                                                f"{s.tmux_target or ''} · {SESSION_LABELS.get(s.state, s.state)}")
                            for s in svc.list_sessions()])]
    return join([render(OPTION, value="", label="— pick a project, group or session —", selected=Html("")),
                 *(render(OPTGROUP, label=label, options=options(choices, selected)) for label, choices in groups
                   if choices)])


def recipients_fragment(req: Request, target: str | None) -> Html:
    """Render who a broadcast to `target` would reach."""
    if not target:
        return render(FRAG_RECIPIENTS, body=render(EMPTY, text="Pick a project, group or session to see who gets it."))
    sessions = req.svc.list_broadcast_recipients(target)
    if not sessions:
        return render(FRAG_RECIPIENTS, body=render(EMPTY, text="No live session would get it."))
    # SECURITY: labels and cwds come from transcripts and panes: escaped, and hx-disable on the list.
    items = join(render(
        RECIPIENT_ITEM, state=session_badge(s), label=s.label or "(no title yet)", id=s.id[:SHORT_ID], full_id=s.id,
        host=s.host,
        where=s.tmux_target or "-", cwd=s.cwd,
        note=render(RECIPIENT_NOTE, text="a permission dialog is open: it will be refused, not answered")
        if s.state == "permission" else Html("")) for s in sessions)
    count = f"{len(sessions)} session{'s' if len(sessions) != 1 else ''}"
    return render(FRAG_RECIPIENTS, body=join([render(COUNT_LINE, text=count),
                                              render(ATTENTION_LIST, items=items)]))


def broadcast_fragment(req: Request, broadcast_id: str) -> Html:
    """Render the per-session results of a broadcast, polled while some wait for their host."""
    deliveries = req.svc.list_deliveries(broadcast_id=broadcast_id)
    if not deliveries:
        raise NotFound(f"no broadcast {broadcast_id!r}; send one from /broadcast")
    rows = join(render(DELIVERY_ROW, id=d.session_id[:SHORT_ID], full_id=d.session_id, host=d.host or "?",
                       where=d.tmux_target or "-",
                       result=badge(d.result, DELIVERY_COLORS.get(d.result, "gray")), reason=d.reason or "—")
                for d in deliveries)
    is_waiting = any(d.result == "queued" for d in deliveries)
    return render(FRAG_BROADCAST, short_id=broadcast_id[:SHORT_ID], body=render(DELIVERY_TABLE, rows=rows),
                  poll=poll_attrs(f"/frag/broadcasts/{broadcast_id}") if is_waiting else Html(""))


def page_broadcast(req: Request, *, result: Html = Html("")) -> Response:
    """Show the composer: pick a target, see its recipients, send."""
    target = req.arg("target") or None
    return page(req, "Broadcast", render(
        MAIN_BROADCAST, csrf=csrf_field(req), attrs=form_attrs("/broadcast", target="#broadcast-result"),
        preview_attrs=preview_attrs("/frag/broadcast/recipients", target="#frag-recipients"),
        targets=broadcast_targets(req, target), recipients=recipients_fragment(req, target),
        result=result or Html('<div id="broadcast-result"></div>')))


def frag_broadcast_recipients(req: Request) -> Response:
    """Answer the recipients preview of the target picked."""
    return html_response(recipients_fragment(req, req.arg("target")))


def frag_broadcast(req: Request) -> Response:
    """Answer the poll of one broadcast's results."""
    return html_response(broadcast_fragment(req, req.params["broadcast"]))


def frag_send_broadcast(req: Request) -> Response:
    """Send the composed broadcast; answer with its per-session results."""
    f = req.form()
    sent = req.svc.send_broadcast(f.get("target", ""), f.get("text", ""), is_command=f.get("is_command") == "1")
    result = broadcast_fragment(req, sent.broadcast_id)
    if not req.is_htmx:
        return page_broadcast(req, result=result)
    n_ok = sum(d.result in ("delivered", "queued") for d in sent.deliveries)
    return html_response(join([result, flash(f"Sent to {n_ok} of {len(sent.deliveries)} sessions.",
                                             kind="ok" if n_ok == len(sent.deliveries) else "error", oob=True)]))


FRAG_PEERS = string.Template("""<section class="card" id="frag-peers" $poll>
<h2>Peers</h2>$table</section>""")
PEERS_TABLE = string.Template("""<div class="scroll"><table>
<thead><tr><th>Sync</th><th>Peer</th><th>Last sync</th><th>Behind</th><th class="hide-sm">Clock</th>
<th>Deferred</th></tr></thead>
<tbody hx-disable>$rows</tbody></table></div>""")
PEER_ROW = string.Template("""<tr><td>$state</td>
<td class="title"><b>$name</b><div class="mono muted small">$url</div><div class="muted small">$error</div></td>
<td class="muted small">$last</td><td>$behind</td><td class="hide-sm mono small">$offset</td>
<td>$deferred<div class="muted small">$deferred_reason</div></td></tr>""")


def peers_fragment(req: Request) -> Html:
    """Render each peer with how its last sync went, polled in place."""
    peers = list_peers(req.db, req.config.peers)
    now = now_ms()

    def state(p: dict[str, Any]) -> Html:
        if p["last_error"]:
            return badge(f"failing ×{p['n_failures']}", "red")
        if p["last_ok_ms"] is None:
            return badge("never synced", "gray")
        return badge("clock skewed", "amber") if p["is_skewed"] else badge("in sync", "green")
    clock = join(render(ALERT, text=line) for line in clock_lines(clock_status(req.db, now_ms=now)))
    if not peers:
        table_html = render(EMPTY, text="No peers; add one with: clare peer add http://HOST:8765 --name NAME")
    else:
        # SECURITY: a peer's error text came from the network; render() escapes it. Tokens are never in it.
        table_html = render(PEERS_TABLE, rows=join(render(
            PEER_ROW, state=state(p), name=p["name"], url=p["url"], error=(p["last_error"] or "")[:160],
            last=_ago_ms(p["last_ok_ms"], now), behind="—" if p["n_behind"] is None else p["n_behind"],
            offset=_offset(p["offset_ms"]), deferred=p["n_deferred"] or "—",
            deferred_reason=(p["deferred_reason"] or "")[:200]) for p in peers))
    return render(FRAG_PEERS, poll=poll_attrs("/frag/peers"), table=join([clock, table_html]))


def frag_peers(req: Request) -> Response:
    """Answer the peers poll."""
    return html_response(peers_fragment(req))


# --- 8.4 The JSON API: the handlers derived from the declared services, a few others, OpenAPI ---------


def _event_json(ev: Event) -> dict[str, Any]:
    return {**ev.to_json(), "rseq": ev.rseq}


def _wire_value(value: Any) -> Any:
    """Return a service's answer ready for json_response: an event also carries its receipt number."""
    if isinstance(value, Event):
        return _event_json(value)
    if isinstance(value, list):
        return [_wire_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _wire_value(v) for k, v in value.items()}
    return value


def service_handler(name: str) -> Callable[[Request], Response]:
    """Return the JSON handler of a declared service: its path, query and body become the call's arguments."""
    spec = SERVICE_APIS[name][1]
    if spec is None:
        raise TypeError(f"{name} is a service of this host only: it has no route")

    def handle(req: Request) -> Response:
        wires = wire_args(name)
        svc = req.svc
        body_wires = [w for w in wires if w.where == "body"]
        body: dict[str, Any] = {}
        if body_wires or spec.body_schema is not None:
            body = req.json(required=tuple(w.name for w in body_wires if w.is_required),
                            optional=tuple(w.name for w in body_wires if not w.is_required),
                            is_lenient=spec.is_lenient)
        if spec.check is not None:
            spec.check(body)
        kwargs = {w.arg: _request_value(req, svc, w, body, max_int=spec.max_int) for w in wires
                  if w.where in ("path", "query") or (w.where == "body" and w.name in body)}
        kwargs.update({arg: fill(req) for arg, fill in spec.server.items()})
        if spec.cursor is not None:
            return _page_response(req, getattr(svc, name), spec, kwargs)
        value = getattr(svc, name)(**kwargs)
        return json_response(_wire_value(spec.to_wire(req, value) if spec.to_wire else value), status=spec.status)
    handle.__name__, handle.__doc__ = f"api_{name}", spec.summary
    return handle


STREAM_PAGE_ITEMS = 500  # items per page of a streamed list: its chunk, and the most of it held at once


def _page_response(req: Request, call: Callable[..., list[Any]], spec: Api, kwargs: dict[str, Any]) -> Response:
    """Answer a list that comes in pages: one page with ?limit=N, else the whole list, streamed a page at a time."""
    cursor = spec.cursor
    assert cursor is not None  # only lists declared with a cursor come here
    limit = kwargs.pop("limit", None)
    if limit is not None:
        with read_txn(req.db):  # the page and its cursor from one snapshot
            items = call(**kwargs, limit=limit + 1)
            page = items[:limit]
            after = cursor(req.db, page[-1]) if page else kwargs.get("after")
        return json_response({spec.path.rsplit("/", 1)[1]: _wire_value(page), "next_after": after,
                              "has_more": len(items) > limit})

    def chunks() -> Generator[bytes, None, None]:
        with read_txn(req.db):  # one snapshot for the whole list, as a single query would give
            after, sep = kwargs.pop("after", None), b"["
            while True:
                items = call(**kwargs, after=after, limit=STREAM_PAGE_ITEMS)
                text = json.dumps(_jsonable(_wire_value(items)), ensure_ascii=False)[1:-1].encode()
                if text or sep == b"[":  # the first page always: it opens the list
                    yield sep + text
                    sep = b"," if text else b""
                if len(items) < STREAM_PAGE_ITEMS:
                    break
                after = cursor(req.db, items[-1])
            yield b"]"

    stream = chunks()
    first = next(stream)  # the first page is read here: a bad argument is a 400, before any byte is sent

    def sent() -> Generator[bytes, None, None]:
        try:
            yield first
            yield from stream
        finally:
            stream.close()
    return Response(spec.status, chunks=sent())


def _request_value(req: Request, svc: Services, w: Wire, body: dict[str, Any], *, max_int: int) -> Any:
    """Return one argument of a service call from the request, as the remote client sent it."""
    if w.where == "path":
        value: Any = req.params[w.name]
    elif w.where == "body":
        value = body[w.name]
        if w.kind == "list" and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
            raise UsageError(f"{w.name} must be a list of strings")
        if w.kind == "bool" and not isinstance(value, bool):
            raise UsageError(f"{w.name} must be true or false")
        return value
    elif w.kind == "bool" and not w.is_optional:
        return req.arg(w.name) == "1"
    elif w.kind == "bool":
        flag = {"1": True, "0": False, None: None}
        text = req.arg(w.name)
        if text not in flag:
            raise UsageError(f"{w.name}={text!r} must be 1 or 0")
        return flag[text]
    elif w.kind == "int":
        return req.int_arg(w.name, w.default, lo=1, hi=max_int)
    elif w.kind == "range":
        text = req.arg(w.name)
        return parse_priorities(text) if text else None
    elif w.kind == "list":
        value = req.query.get(w.name)
        if w.is_required and (not value or len(value) > 100):
            raise HttpError(400, f"give 1 to 100 {w.name} ids as ?{w.name}=ID&{w.name}=ID")
        if value and w.resolver:
            value = [getattr(svc, w.resolver)(x).id for x in value]
        return value or None
    else:
        value = req.arg(w.name) or None
        if value is None and w.is_required:
            raise UsageError(f"give ?{w.name}=; it is required")
    if value is not None and w.resolver:
        found = getattr(svc, w.resolver)(value)
        return found if w.kind == "object" else found.id
    return value


def api_task_history(req: Request) -> Response:
    """Return the events about one task, oldest first."""
    svc = req.svc
    limit = req.int_arg("limit", 200, lo=1, hi=MAX_EVENTS_PAGE)
    return json_response([_event_json(e) for e in svc.list_history([svc.get_task(req.params["task"]).id],
                                                                   limit=limit)])


def api_session_pane(req: Request) -> Response:
    """Return the last lines of a session's pane, read by this host (its own sessions only); refused cross-site."""
    check_same_origin(req.headers)
    s = req.svc.get_session(req.params["session"])
    lines = req.int_arg("lines", PANE_LINES, lo=1, hi=MAX_PANE_LINES)
    return json_response(read_pane(req.db, s, lines=lines, now_ms=now_ms()))


def api_session_transcript(req: Request) -> Response:
    """Return the last entries of a session's transcript, read by this host (its own sessions only).

    Refused cross-site, like the pane.
    """
    check_same_origin(req.headers)
    s = req.svc.get_session(req.params["session"])
    return json_response({"session_id": s.id, "host": s.host,
                          "turns": read_turns(req.db, s, claude_dir=claude_home())})


def api_list_events(req: Request) -> Response:
    """Page through the log: ?after=RSEQ in receipt order, or without it the newest, newest last."""
    limit = req.int_arg("limit", 50, lo=1, hi=MAX_EVENTS_PAGE)
    after = req.int_arg("after", -1, lo=0, hi=2**62)
    page = page_events(req.db, after=None if after < 0 else after, limit=limit)
    return json_response({"events": [_event_json(e) for e in page.events], "next_after": page.next_after,
                          "has_more": page.has_more})


# The OpenAPI document.

_PRIMITIVES = {str: "string", int: "integer", bool: "boolean", float: "number", dict: "object", list: "array",
               tuple: "array"}


def json_schema(cls: type) -> dict[str, Any]:
    """Return the JSON Schema of a dataclass's to_json() object, from its field types."""
    import types
    import typing

    def one(tp: Any) -> dict[str, Any]:
        if isinstance(tp, types.UnionType):
            return {"type": [one(a)["type"] for a in typing.get_args(tp)]}
        if tp is type(None):
            return {"type": "null"}
        return {"type": _PRIMITIVES[typing.get_origin(tp) or tp]}

    found = record_fields(cls)
    return {"type": "object", "required": [f.name for f in found],
            "properties": {f.name: one(f.type) for f in found}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _array(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


def _body(required: tuple[str, ...], optional: tuple[str, ...], **types_: str) -> dict[str, Any]:
    props = {k: {"type": types_.get(k, "string")} for k in required + optional}
    return {"type": "object", "required": list(required), "properties": props, "additionalProperties": False}


def _sync_reply(**fields: str) -> dict[str, Any]:
    names = {"machine_id": "string", "db_id": "string", "now_ms": "integer", **fields}
    return {"type": "object", "required": list(names), "properties": {k: {"type": v} for k, v in names.items()}}


_OPEN_API_EXTRA_SCHEMAS: dict[str, dict[str, Any]] = {
    "SyncPage": _sync_reply(events="array", next_after="integer", has_more="boolean", head="integer"),
    "SyncAccepted": _sync_reply(accepted="integer", duplicates="integer", rejected="array", conflicts="array",
                                head_before="integer", head_after="integer"),
    "BroadcastResult": {"type": "object", "required": ["broadcast_id", "target", "text", "deliveries"], "properties": {
        "broadcast_id": {"type": "string"}, "target": {"type": "string"}, "text": {"type": "string"},
        "deliveries": _array("Delivery"),
        "unreached": {"type": "array", "description": "open tasks of a project target that no live session works on",
                      "items": {"type": "object", "properties": {
                          "task_id": {"type": "string"}, "title": {"type": "string"},
                          "session_id": {"type": ["string", "null"]}, "reason": {"type": "string"}}}}}},
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    "Status": {"type": "object", "required": ["projects", "sessions", "tasks", "n_events", "machine_id"],
               "properties": {"projects": _array("ProjectStatus"), "sessions": _array("Session"),
                              "tasks": _array("TaskStatus"), "n_events": {"type": "integer"},
                              "machine_id": {"type": "string"},
                              "clock": {"type": "object", "description": "what peers say of this host's "
                                        "clock, its stored HLC's lead, and the events held back (deferred)"}}},
    "EventPage": {"type": "object", "required": ["events", "next_after", "has_more"], "properties": {
        "events": _array("Event"), "next_after": {"type": "integer"}, "has_more": {"type": "boolean"}}},
    "ImportResult": {"type": "object", "required": ["inserted", "duplicates", "conflicts", "rejected"], "properties": {
        "inserted": _array("Event"), "duplicates": {"type": "integer"},
        "conflicts": {"type": "array", "items": {"type": "string"}},
        "rejected": {"type": "array", "items": {"type": "string"}}}},
    "ReplayResult": {"type": "object", "required": ["events"], "properties": {"events": {"type": "integer"}}},
    "SessionDetail": {"allOf": [_ref("Session"), {"type": "object", "required": ["task", "history", "attach"],
                                                  "properties": {"task": {"oneOf": [_ref("Task"), {"type": "null"}]},
                                                                 "history": _array("Event"),
                                                                 "attach": {"type": ["array", "null"],
                                                                            "items": {"type": "string"}}}}]},
    "AnswerResult": {"allOf": [_ref("Answer"), {"type": "object", "required": ["note"],
                                                "properties": {"note": {"type": "string"}}}]},
    "Turns": {"type": "object", "required": ["session_id", "host", "turns"], "properties": {
        "session_id": {"type": "string"}, "host": {"type": "string"}, "turns": {"type": "array", "items": {
            "type": "object", "required": ["role", "text", "tools", "at"], "properties": {
                "role": {"enum": ["user", "assistant", "tool"]}, "text": {"type": "string"},
                "tools": {"type": "array", "items": {"type": "string"}}, "at": {"type": "string"}}}}}},
}

# (method, path) -> summary, query parameters, request body schema, success status, response schema: the
# routes that are not services (those are described by their @api declarations: service_docs)
API_DOCS: dict[tuple[str, str], tuple[str, tuple[str, ...], dict[str, Any] | None, int, dict[str, Any]]] = {
    ("GET", "/api/v1/tasks/{task}/history"): ("Events about a task", ("limit",), None, 200, _array("Event")),
    ("GET", "/api/v1/sessions/{session}/pane"): ("The last lines of a session's pane, read by its own host (which "
                                                 "answers at most once a second per session)", ("lines",), None, 200,
                                                 _ref("PaneView")),
    ("GET", "/api/v1/sessions/{session}/transcript"): ("The last entries of a session's transcript, read by its "
                                                       "own host", (), None, 200, _ref("Turns")),
    ("GET", "/api/v1/events"): ("Page through the log by receipt order (after), or the newest (no after)",
                                ("after", "limit"), None, 200, _ref("EventPage")),
    ("GET", "/api/v1/openapi.json"): ("This document", (), None, 200, {"type": "object"}),
}


def _obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(props), "properties": {
        k: v if isinstance(v, dict) else {"type": v} for k, v in props.items()}}


_WAITS = {"task_id": "string", "waits_on": _array("Task"), "unknown": {"type": "array", "items": {"type": "string"}},
          "blocks": _array("Task"), "cycle": {"type": "array", "items": {"type": "string"}}, "is_ready": "boolean"}
_OPEN_API_EXTRA_SCHEMAS.update({
    "TaskWaits": _obj(**_WAITS),
    "Queue": _obj(project_id="string", ready=_array("Task"), waiting=_array("TaskWaits"), cycles={
        "type": "array", "items": {"type": "array", "items": {"type": "string"}}}),
})
_SYNC_HEAD = {"machine_id": "string", "db_id": "string", "now_ms": "integer"}
_CHANGE = {"events": _array("SyncEvent"), "description": "string", "created_at": "string", "can_undo": "boolean",
           "refusal": ["string", "null"]}
_OPEN_API_EXTRA_SCHEMAS.update({
    "Change": _obj(**_CHANGE),
    "UndoResult": _obj(**_CHANGE, recorded=_array("SyncEvent"), n_kept="integer"),
    "SyncEvent": _obj(uuid="string", hlc="string", machine_id="string", event_type="string", payload="object",
                      created_at="string"),
    "SyncPage": _obj(**_SYNC_HEAD, events=_array("SyncEvent"), next_after="integer", has_more="boolean",
                     head="integer"),
    "SyncAccepted": _obj(**_SYNC_HEAD, accepted="integer", duplicates="integer", rejected={
        "type": "array", "items": _obj(index="integer", uuid=["string", "null"], reason="string")},
        conflicts={"type": "array", "items": {"type": "string"}}, head_before="integer", head_after="integer",
        deferred={"type": "array", "items": _obj(uuid="string", reason="string")}),
    "SyncDigest": _obj(**_SYNC_HEAD, days={"type": "object", "additionalProperties": _obj(n="integer", hash="string")}),
    "SyncDay": _obj(**_SYNC_HEAD, day="string", uuids={"type": "array", "items": {"type": "string"}}),
    "SyncEvents": _obj(**_SYNC_HEAD, events=_array("SyncEvent")),
    "PeerStatus": _obj(name="string", url="string", token_env=["string", "null"], is_configured="boolean",
                       machine_id=["string", "null"], last_ok_ms=["integer", "null"], last_try_ms=["integer", "null"],
                       last_error=["string", "null"], n_failures="integer", n_behind=["integer", "null"],
                       offset_ms=["integer", "null"], n_pulled="integer", n_pushed="integer", is_skewed="boolean",
                       n_deferred="integer", deferred_reason=["string", "null"], n_to_push=["integer", "null"],
                       host_name=["string", "null"]),
})
API_DOCS.update({
    ("GET", "/api/v1/sync/events"): ("Sync: the events stored after receipt number `after` (the cursor)",
                                     ("after", "limit"), None, 200, _ref("SyncPage")),
    ("POST", "/api/v1/sync/events"): ("Sync: store a pushed batch; malformed events are refused one by one", (), {
        "type": "object", "required": ["events"], "additionalProperties": False, "properties": {
            "events": _array("SyncEvent"), **{k: {"type": v} for k, v in _SYNC_HEAD.items()}}},
        200, _ref("SyncAccepted")),
    ("GET", "/api/v1/sync/days"): ("Sync: per-day event counts and uuid hashes (anti-entropy)", (), None, 200,
                                   _ref("SyncDigest")),
    ("GET", "/api/v1/sync/days/{day}"): ("Sync: the uuids of one day's events (YYYY-MM-DD)", (), None, 200,
                                         _ref("SyncDay")),
    ("POST", "/api/v1/sync/fetch"): ("Sync: the events among the given uuids", (), {
        "type": "object", "required": ["uuids"], "additionalProperties": False,
        "properties": {"uuids": {"type": "array", "items": {"type": "string"}}}}, 200, _ref("SyncEvents")),
    ("GET", "/api/v1/sync/peers"): ("Sync: each peer and what its last sync did", (), None, 200, _array("PeerStatus")),
})


def service_docs() -> dict[tuple[str, str], tuple[str, tuple[str, ...], dict[str, Any] | None, int, dict[str, Any]]]:
    """Return the OpenAPI entries of the declared services, as API_DOCS holds the others'."""
    import inspect

    docs = {}
    for name, (fn, spec) in SERVICE_APIS.items():
        if spec is None or not spec.is_routed:
            continue
        wires = wire_args(name)
        body = [w for w in wires if w.where == "body"]
        types = {w.name: {"int": "integer", "bool": "boolean", "list": "array"}[w.kind] for w in body
                 if w.kind in ("int", "bool", "list")}
        body_schema = spec.body_schema if spec.body_schema is not None else _body(
            tuple(w.name for w in body if w.is_required), tuple(w.name for w in body if not w.is_required),
            **types) if body else None
        answer = inspect.signature(fn).return_annotation
        schema = _ref(spec.schema) if spec.schema else _array(answer.__args__[0].__name__) \
            if getattr(answer, "__origin__", None) is list else _ref(answer.__name__)
        if spec.cursor is not None:  # with ?limit=N, one page of the list
            key = spec.path.rsplit("/", 1)[1]
            schema = {"oneOf": [schema, {"type": "object", "required": [key, "next_after", "has_more"], "properties": {
                key: schema, "next_after": {"type": ["string", "null"]}, "has_more": {"type": "boolean"}}}]}
        docs[(spec.method, spec.path)] = (spec.summary, tuple(w.name for w in wires if w.where == "query"),
                                          body_schema, spec.status, schema)
    return docs


def openapi_document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 description of every /api/ route."""
    errors = {str(code): {"description": ERROR_CODES[code], "content": {"application/json": {"schema": _ref("Error")}}}
              for code in (400, 401, 403, 404, 405, 409, 413, 415, 422)}
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), (summary, query, body, status, schema) in {**service_docs(), **API_DOCS}.items():
        op: dict[str, Any] = {"summary": summary, "parameters": [
            *({"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in re.findall(r"\{(\w+)\}", path)),
            *({"name": name, "in": "query", "required": False, "schema": {"type": "string"}} for name in query)],
            "responses": {str(status): {"description": "OK", "content": {"application/json": {"schema": schema}}},
                          **errors}}
        if body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        paths.setdefault(path, {})[method.lower()] = op
    schemas = {cls.__name__: json_schema(cls)
               for cls in (Project, Task, Group, Update, Event, Session, Pane, Delivery, Order, PaneView, Answer)}
    for name, base, extra in (("ProjectStatus", "Project",
                               {"tokens": {"type": "object"}, "n_sessions": {"type": "integer"}}),
                              ("TaskStatus", "Task", {"tokens": {"type": "object"}})):  # the roll-up's additions
        schemas[name] = {**schemas[base], "required": [*schemas[base]["required"], *extra],
                         "properties": {**schemas[base]["properties"], **extra}}
    return {"openapi": "3.1.0",
            "info": {"title": "Clare", "version": __version__,
                     "description": "Projects and tasks for a fleet of Claude Code sessions. With a token configured, "
                                    "send 'Authorization: Bearer TOKEN'. Bodies are JSON (Content-Type: "
                                    "application/json), at most 1 MB."},
            "paths": paths,
            "components": {"schemas": {**schemas, **_OPEN_API_EXTRA_SCHEMAS},
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}, {}]}


def api_openapi(req: Request) -> Response:
    """Return the OpenAPI 3.1 document of this API."""
    return json_response(openapi_document())


# --- 8.5 The sync endpoints: thin wrappers over section 7 ------------------------------------------------

def sync_get_events(req: Request) -> Response:
    """Page through the log in receipt order for a peer: ?after=RSEQ&limit=N."""
    req.config.contacts.note(req.headers.get(PEER_HEADER.lower()))
    return json_response(sync_page(req.db, after=req.arg("after", "0"), limit=req.arg("limit", str(SYNC_PAGE_LIMIT)),
                                   now_ms=now_ms()))


def sync_post_events(req: Request) -> Response:
    """Store a batch of events a peer pushed: {events: [...], machine_id?, db_id?, now_ms?}."""
    # Lenient: a NaN or a lone surrogate in one event rejects that event only (check_event).
    body = req.json(required=("events",), optional=("machine_id", "db_id", "now_ms"), is_lenient=True)
    req.config.contacts.note(req.headers.get(PEER_HEADER.lower()))
    answer = sync_accept(req.db, body, now_ms=now_ms())
    if answer["accepted"] and list_orders(req.db, pending_on=req.db.machine_id):
        carry_out_soon(req.config.db_path, req.config.settings)  # pushed to us: act now
    return json_response(answer)


def sync_get_days(req: Request) -> Response:
    """Return the per-day event counts and uuid hashes (anti-entropy)."""
    return json_response(sync_digest(req.db, now_ms=now_ms()))


def sync_get_day(req: Request) -> Response:
    """Return the uuids of the events of one day (anti-entropy)."""
    return json_response(sync_day(req.db, req.params["day"], now_ms=now_ms()))


def sync_post_fetch(req: Request) -> Response:
    """Return the events among {uuids: [...]} (anti-entropy)."""
    return json_response(sync_fetch(req.db, req.json(required=("uuids",)), now_ms=now_ms()))


def sync_get_peers(req: Request) -> Response:
    """Return each peer with what its last sync did: for the dashboard and remote `peer list`."""
    return json_response(list_peers(req.db, req.config.peers))


# The routing table: the declared services' routes first, then the others.
_REF = r"(?P<%s>[^/]+)"
ROUTES: list[tuple[str, "re.Pattern[str]", Callable[[Request], Response]]] = [
    (method, lazy_re(pattern), handler) for method, pattern, handler in (
        *((spec.method, re.sub(r"\{(\w+)\}", lambda m: _REF % m[1], spec.path), service_handler(name))
          for name, (_, spec) in SERVICE_APIS.items() if spec is not None and spec.is_routed),
        ("GET", r"/api/v1/tasks/" + _REF % "task" + "/history", api_task_history),
        ("GET", r"/api/v1/sessions/" + _REF % "session" + "/pane", api_session_pane),
        ("GET", r"/api/v1/sessions/" + _REF % "session" + "/transcript", api_session_transcript),
        ("GET", r"/api/v1/events", api_list_events),
        ("GET", r"/api/v1/openapi\.json", api_openapi),
        ("GET", r"/api/v1/sync/events", sync_get_events),
        ("POST", r"/api/v1/sync/events", sync_post_events),
        ("GET", r"/api/v1/sync/days", sync_get_days),
        ("GET", r"/api/v1/sync/days/(?P<day>[0-9-]{10})", sync_get_day),
        ("POST", r"/api/v1/sync/fetch", sync_post_fetch),
        ("GET", r"/api/v1/sync/peers", sync_get_peers),
        ("GET", r"/", cached(page_dashboard)),
        ("GET", r"/projects", cached(page_projects)),
        ("POST", r"/projects", frag_create_project),
        ("GET", r"/projects/" + _REF % "project", cached(page_project)),
        ("POST", r"/projects/" + _REF % "project" + "/tasks", frag_add_task),
        ("POST", r"/projects/" + _REF % "project" + "/status", frag_set_project_status),
        ("POST", r"/projects/" + _REF % "project" + "/dispatch", frag_set_project_dispatch),
        ("GET", r"/tasks/" + _REF % "task", cached(page_task)),
        ("POST", r"/tasks/" + _REF % "task" + "/status", frag_set_task_status),
        ("POST", r"/tasks/" + _REF % "task" + "/waits", frag_set_task_waits),
        ("POST", r"/tasks/" + _REF % "task" + "/assignment", frag_assign_task),
        ("POST", r"/tasks/" + _REF % "task" + "/unassign", frag_unassign_task),
        ("POST", r"/tasks/" + _REF % "task" + "/sessions", frag_start_session),
        ("POST", r"/sessions/" + _REF % "session" + "/stop", frag_stop_session),
        ("POST", r"/sessions/" + _REF % "session" + "/resume", frag_resume_session),
        ("POST", r"/tasks/" + _REF % "task" + "/updates", frag_post_update),
        ("GET", r"/sessions", cached(page_sessions)),
        ("GET", r"/sessions/" + _REF % "session", page_session),
        ("POST", r"/sessions/" + _REF % "session" + "/task", frag_set_session_task),
        ("POST", r"/sessions/" + _REF % "session" + "/answer", frag_answer_session),
        ("GET", r"/needs", cached(page_needs)),
        ("GET", r"/broadcast", page_broadcast),
        ("POST", r"/broadcast", frag_send_broadcast),
        ("GET", r"/frag/broadcast/recipients", frag_broadcast_recipients),
        ("GET", r"/frag/broadcasts/(?P<broadcast>[0-9a-f]{32})", frag_broadcast),
        ("GET", r"/frag/attention", cached(frag_attention)),
        ("GET", r"/frag/fleet", cached(frag_fleet)),
        ("GET", r"/frag/nav-needs", cached(frag_nav_needs)),
        ("GET", r"/frag/sessions/" + _REF % "session", frag_session),
        ("GET", r"/frag/sessions/" + _REF % "session" + "/pane", frag_session_pane),
        ("GET", r"/frag/sessions/" + _REF % "session" + "/transcript", frag_session_turns),
        ("GET", r"/frag/sessions/" + _REF % "session" + "/history", cached(frag_session_history)),
        ("GET", r"/frag/peers", frag_peers),
        ("GET", r"/frag/projects", cached(frag_projects)),
        ("GET", r"/frag/activity", cached(frag_activity)),
        ("GET", r"/frag/projects/" + _REF % "project" + "/tasks", cached(frag_project_tasks)),
        ("GET", r"/frag/projects/" + _REF % "project" + "/queue", cached(frag_project_queue)),
        ("GET", r"/frag/tasks/" + _REF % "task", cached(frag_task)),
        ("GET", r"/frag/tasks/" + _REF % "task" + "/updates", cached(frag_task_updates)),
        ("GET", r"/frag/tasks/" + _REF % "task" + "/history", cached(frag_task_history)),
        ("GET", r"/static/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)", get_static),
        ("GET", r"/login", page_login),
    )
]


# ==========================================================================
# 9. CLI: the argparse tree built from COMMANDS, handlers and text output.
# ==========================================================================

STEP_MARKS = {"ok": "ok", "changed": "done", "planned": "plan", "todo": "todo", "failed": "FAIL"}  # setup, doctor
BIND_RE = lazy_re(r"\A[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?\Z")  # a host name or IPv4 (IPv6: _is_ip)
STEP_NAME_CHARS = 11  # the name column of setup's and doctor's lines
JOIN_FILE = "join-command.txt"  # beside clare.toml: setup's command for the other side, without a terminal
DOCTOR_TIMEOUT_S = 5.0  # per peer and for this host's own server
MIN_FREE_BYTES = 256 * 2**20  # doctor fails below this much free space beside the database
# The systemd user unit `clare setup` writes; clare.service in the repository is this, filled in with defaults.
UNIT_TEMPLATE = string.Template("""\
# systemd user unit for Clare: the dashboard, the JSON API and background peer sync.
# Written by `clare setup` to ~/.config/systemd/user/clare.service (run setup again to change it).
# Logs: journalctl --user -u clare    State: systemctl --user status clare    Check: clare doctor
[Unit]
Description=Clare: dashboard, JSON API and peer sync for a fleet of Claude Code sessions

[Service]
Type=simple
# The interpreter setup ran with and clare.py, by absolute path; serve reads its token from clare.toml.
ExecStart=$exec_start
$environment
Restart=on-failure
RestartSec=5
# SIGTERM lets serve finish in-flight writes before it exits.
KillSignal=SIGTERM
# Stopping or restarting Clare must never end the Claude sessions it started: only serve itself
# gets the signal, not the tmux servers it launched (it also starts them in their own scope with
# systemd-run --user --scope when a user bus is there).
KillMode=process
TimeoutStopSec=20
# Hardening that keeps what Clare needs: no PrivateTmp (tmux's sockets live in /tmp), no ProtectHome
# (~/.claude and the database live in the home), no PrivateUsers (the fleet reads Claude's /proc entries).
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=default.target
""")

@record_type(frozen=True, slots=True)
class Command:
    path: tuple[str, ...]  # ("task", "add") is `clare task add`
    handler: Callable[[argparse.Namespace, "Context"], int | None]
    help: str
    example: str  # the epilog: one or more example lines
    args: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Describe one argparse argument for a Command."""
    return flags, options


class Context:
    """What a handler needs beyond its arguments; the database opens on first use."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.paths = resolve_paths(home=args.home, db=args.db)
        self.as_json = bool(getattr(args, "json", False))
        self.remote_url: str | None = getattr(args, "remote", None) or os.environ.get("CLARE_URL") or None
        self._db: Db | None = None
        self._svc: Services | None = None
        self._config: dict[str, Any] | None = None  # clare.toml, read on first use

    @property
    def db(self) -> Db:
        """Open this host's database (creating it on first use); only LOCAL_COMMANDS handlers use it directly."""
        if self._db is None:
            self._db = open_db(self.paths.db)
        return self._db

    @property
    def config(self) -> dict[str, Any]:
        """Return clare.toml's settings, read once per command."""
        if self._config is None:
            self._config = load_config(self.paths.config)
        return self._config

    @property
    def svc(self) -> Services:
        """Return the services this command runs against: the local database, or --remote / CLARE_URL."""
        if self._svc is None:
            if self.remote_url is not None:
                token = resolve_token(self.config, path=self.paths.config)
                self._svc = RemoteServices(_check_url(self.remote_url), token=token)
            else:
                self._svc = Services(self.db)
        return self._svc

    def close(self, *, is_exiting: bool = False) -> None:
        """Say what the writes of this command should tell the user (a clock one peer finds off); close.

        is_exiting: the process ends right after (exit_now) and the connection is left open: closing
        the last connection checkpoints the WAL (≈ 11 ms), which SQLite's autocheckpoint does at a
        later commit anyway; every commit is already durable in the WAL.
        """
        if self._db is not None:
            for warning in self._db.warnings:
                print(f"clare: warning: {warning}", file=sys.stderr)
            if not is_exiting:
                self._db.close()


def _check_url(url: str) -> str:
    # One rule for every Clare server address: the one peers are checked with.
    if not PEER_URL_RE.match(url) or not _has_host_and_port(url):
        raise UsageError(f"remote URL {url!r} is not of the form http://HOST:PORT; check --remote or CLARE_URL")
    return url


TERMINAL_CONTROL_RE = lazy_re(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def emit(ctx: Context, value: Any, text: str | Callable[[], str]) -> None:
    """Print `value` as JSON with --json, else the text (or what the callable returns)."""
    if ctx.as_json:
        print(json.dumps(_jsonable(value), ensure_ascii=False, indent=None if isinstance(value, list) else 2,
                         separators=JSON_LIST_SEPARATORS if isinstance(value, list) else None))
    else:
        out = text() if callable(text) else text
        if out:
            # SECURITY: titles, notes and pane text may hold terminal escapes; show them, never obey them.
            print(TERMINAL_CONTROL_RE.sub(lambda m: f"\\x{ord(m[0]):02x}", out))


def table(headers: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> str:
    """Return rows as aligned columns under a header; the last column is never padded."""
    rows = [tuple("" if c is None else str(c) for c in r) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [headers, *rows]]
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(s, 0)} {STATUS_LABEL[s]}" for s in TASK_STATUSES)


def _assignee(task: Task) -> str:
    if task.session_id:
        return f"session {task.session_id[:SHORT_ID]}"
    if task.group_id:
        return f"group {task.group or task.group_id[:SHORT_ID]}"
    return ""


def format_tasks(tasks: list[Task], *, with_project: bool = True, empty: str = "no tasks") -> str:
    """Return a task table (tags after the title, removed tasks marked), or a line saying there are none."""
    if not tasks:
        return empty
    headers = ("ID", "PRI", "STATUS", *(("PROJECT",) if with_project else ()), "ASSIGNED", "TITLE")
    return table(headers, ((t.id[:SHORT_ID], f"P{t.priority}",
                            STATUS_LABEL[t.status] + (" (removed)" if t.removed_at else ""),
                            *((short_text(t.project, 20),) if with_project else ()), _assignee(t),
                            short_text(t.title, 70) + "".join(f" #{tag}" for tag in t.tags)) for t in tasks))


def format_history(events: list[Event]) -> str:
    """Return one line per event: when, where, what."""
    if not events:
        return "no history"
    return "\n".join(f"{when_text(ev.created_at)}  {ev.machine_id:<12}  {describe_event(ev)}" for ev in events)


def cmd_init(args: argparse.Namespace, ctx: Context) -> None:
    """Create the database (idempotent); report its identity; --new-id gives a copy one of its own."""
    info = init_host(ctx, machine_id=args.machine_id, is_new_id=args.new_id)
    verb = ("new identity for" if info["renewed"] else "initialized" if info["created"] else "already initialized")
    emit(ctx, info, f"{verb} {info['db']}\nmachine id {info['machine_id']} (host {info['host_name']}), "
                    f"db id {info['db_id']}")


def init_host(ctx: Context, *, machine_id: str | None = None, is_new_id: bool = False) -> dict[str, Any]:
    """Open or create the database and return its identity; with is_new_id give it a new one (log kept)."""
    if machine_id:
        check_machine_id(machine_id)
    existed = os.path.exists(ctx.paths.db)
    db = open_db(ctx.paths.db, machine_id=None if is_new_id else machine_id)
    ctx._db = db
    if is_new_id and existed:
        renew_identity(db, machine_id=machine_id)
    elif db.refusal is not None:
        raise Conflict(db.refusal)
    elif machine_id and db.machine_id != machine_id:
        raise Conflict(f"{db.path} already has machine id {db.machine_id!r}; a database keeps its machine id "
                       "(use another --home for another one, or init --new-id to change it)")
    return {"db": db.path, "machine_id": db.machine_id, "host_name": machine_host_name(db.machine_id),
            "db_id": db.db_id, "created": not existed, "renewed": is_new_id and existed}


def launcher_text(python: str, folder: str) -> str:
    """Return a `clare` launcher script that imports clare.py from `folder` with `python`.

    Python compiles a script on every run but loads an imported module from cached bytecode:
    for a file this size that is most of the CLI's start-up.
    """
    return (f"#!{python} -I\n# Written by 'python3 clare.py install': runs {folder}/clare.py as a module.\n"
            f"import sys\nsys.path.insert(0, {folder!r})\nimport clare\nraise SystemExit(clare.main())\n")


def cmd_install(args: argparse.Namespace, ctx: Context) -> None:
    """Write a `clare` launcher that starts faster than `python3 clare.py`."""
    path, _ = install_launcher(args.bin)
    folder = os.path.dirname(os.path.abspath(__file__))
    on_path = os.path.dirname(path) in os.environ.get("PATH", "").split(os.pathsep)
    emit(ctx, {"launcher": path, "clare_py": os.path.join(folder, "clare.py"), "on_path": on_path},
         f"wrote {path} (runs {folder}/clare.py with {sys.executable})"
         + ("" if on_path else f"\n{os.path.dirname(path)} is not on PATH; add it, or run {path} by its full path"))


def install_launcher(bin_dir: str, *, is_dry_run: bool = False) -> tuple[str, bool]:
    """Write the `clare` launcher into bin_dir; return its path and whether it changed."""
    folder = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.path.abspath(os.path.expanduser(bin_dir)), "clare")
    if os.path.abspath(path) == os.path.abspath(__file__):
        raise UsageError(f"{path} is clare.py itself; pick another --bin folder")
    text = launcher_text(sys.executable, folder)
    if _read_text(path) == text or is_dry_run:
        return path, _read_text(path) != text
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path + ".tmp", 0o755)
        os.replace(path + ".tmp", path)
    except OSError as err:
        raise ClareError(f"cannot write {path}: {err.strerror}; pick a writable folder with --bin") from err
    return path, True


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


# --- setup and doctor: one host's installation, done in steps and checked in lines -------------

@record_type(frozen=True, slots=True)
class Step:
    name: str  # what was set up or checked: "unit", "linger", "peer apricot"
    state: str  # a value of STEP_STATES
    detail: str  # one line: what was found or done
    fix: str = ""  # the command or action that fixes a failure or a to-do

    def to_json(self) -> dict[str, str]:
        """Return the step as the JSON object setup and doctor print."""
        return {"name": self.name, "state": self.state, "detail": self.detail, "fix": self.fix}


def unit_path(env: Mapping[str, str] | None = None) -> str:
    """Return where the systemd user unit lives: $XDG_CONFIG_HOME/systemd/user/clare.service."""
    env = os.environ if env is None else env
    config = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "systemd", "user", "clare.service")


def unit_text(*, home: str | None, host: str, port: int, db: str | None = None,
              env: Mapping[str, str] | None = None) -> str:
    """Return the unit setup writes: this interpreter and clare.py by absolute path, bound to host:port."""
    import shutil  # only setup and doctor need it

    env = os.environ if env is None else env
    script = os.path.abspath(__file__)
    places = [*(("--home", home) if home else ()), *(("--db", os.path.abspath(db)) if db else ())]
    argv = [sys.executable, script, *places, "serve", "--host", host, "--port", str(port)]
    # The folders of the programs serve runs (tmux, Claude Code): a user service starts with a minimal PATH.
    found = [shutil.which(p, path=env.get("PATH")) for p in ("tmux", "claude")]
    folders = [os.path.dirname(os.path.abspath(p)) for p in found if p] + ["/usr/local/bin", "/usr/bin", "/bin"]
    path = ":".join(dict.fromkeys(folders))
    settings = [(k, env[k]) for k in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", CLAUDE_ENV_DIR) if env.get(k) and not home]
    lines = [f"Environment={_unit_word(f'{k}={v}')}" for k, v in (("PATH", path), *settings)]
    return UNIT_TEMPLATE.substitute(exec_start=" ".join(map(_unit_word, argv)), environment="\n".join(lines))


def _unit_word(word: str) -> str:
    """Quote one word of a unit line: systemd expands % specifiers and $ variables, and splits at spaces."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_./:@+=,-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def setup_steps(ctx: Context, *, bind: str, port: int, peer_url: str | None, bin_dir: str,
                is_dry_run: bool, env: Mapping[str, str] | None = None) -> Iterator[Step]:
    """Set this host up, one step at a time (each idempotent); yield what each step found or did.

    Over 80 lines: one step after the other, in the order a user would do them by hand.
    """
    import shlex

    env = os.environ if env is None else env
    would = "would " if is_dry_run else ""
    home = ctx.args.home or env.get("CLARE_HOME") or None
    home = os.path.abspath(os.path.expanduser(home)) if home else None

    # 1. The database, with a machine id unique by construction.
    if is_dry_run:
        yield _dry_init_step(ctx.paths.db)
    else:
        info = init_host(ctx)
        yield Step("database", "changed" if info["created"] else "ok",
                   f"{'created' if info['created'] else 'kept'} {info['db']}, machine id {info['machine_id']}")

    # 2. The token every request and every peer needs, in clare.toml (0600).
    given = env.get("CLARE_TOKEN") or None
    if is_dry_run:
        has = bool(load_config(ctx.paths.config).get("token"))
        yield Step("token", "ok" if has else "changed",
                   f"{'keep the' if has else would + ('store CLARE_TOKEN as the' if given else 'make a')} "
                   f"token in {ctx.paths.config} (0600)")
        token = "TOKEN"
    else:
        token, done = setup_token(ctx.paths.config, given=given)
        yield Step("token", "ok" if done == "kept" else "changed",
                   {"kept": "kept the", "stored": "stored CLARE_TOKEN as the", "made": "made a new"}[done]
                   + f" token in {ctx.paths.config} (0600)")

    # 3. The launcher.
    launcher, changed = install_launcher(bin_dir, is_dry_run=is_dry_run)
    yield Step("launcher", "changed" if changed else "ok",
               f"{would + 'write' if changed and is_dry_run else 'wrote' if changed else 'kept'} {launcher} "
               f"(runs clare.py with {sys.executable})")

    # 4. The systemd user unit.
    path, text = unit_path(env), unit_text(home=home, host=bind, port=port, db=ctx.args.db, env=env)
    unit_changed = _read_text(path) != text
    if unit_changed and not is_dry_run:
        write_private(path, text)
    yield Step("unit", "changed" if unit_changed else "ok",
               f"{(would + 'write') if unit_changed and is_dry_run else 'wrote' if unit_changed else 'kept'} "
               f"{path} (serve on {bind}:{port})")

    # 5. systemd: reload, enable, start (restart when the unit changed).
    start_cmd = shlex.join(_unit_argv(text))
    systemd = _systemd_step(unit_changed=unit_changed, is_dry_run=is_dry_run, start_cmd=start_cmd)
    yield systemd

    # 6. Linger: without it a user unit stops at logout.
    yield _linger_step(has_systemd=systemd.state != "todo")

    # 7. Claude Code's hooks.
    settings = settings_path(env)
    if is_dry_run:
        status = hooks_status(settings, hook_command(ctx.paths.db))
        missing = [e for e, v in status.items() if v != "installed"]
        yield Step("hooks", "changed" if missing else "ok",
                   f"{would}install Clare's hooks for {len(missing)} events in {settings}" if missing
                   else f"Clare's hooks are in {settings}")
    else:
        added = install_hooks(settings, hook_command(ctx.paths.db))
        yield Step("hooks", "changed" if added else "ok",
                   f"installed Clare's hooks for {len(added)} events in {settings}" if added
                   else f"Clare's hooks are in {settings}")

    # 8. The peer, and the command that joins the other side to this host.
    if peer_url is not None:
        yield _peer_step(ctx.paths.config, peer_url, is_dry_run=is_dry_run)
    yield _join_step(ctx.paths.config, bind=bind, port=port, peer_url=peer_url, token=token,
                     is_dry_run=is_dry_run)


def setup_token(path: str, *, given: str | None) -> tuple[str, str]:
    """Return the fleet's token and what was done: kept, stored (`given`: CLARE_TOKEN, from another host) or made.

    clare.toml ends private (0600) either way: the unit's serve reads the token there.
    """
    config = load_config(path)
    token = check_token(config.get("token") or None, where=f"'token' in {path}")
    given = check_token(given, where="$CLARE_TOKEN")
    if token is not None and given is not None and token != given:
        raise Conflict(f"{path} holds another token than CLARE_TOKEN; a fleet shares one: unset CLARE_TOKEN to "
                       "keep this host's, or delete the token line there to take CLARE_TOKEN's")
    if token is not None:
        os.chmod(path, 0o600)
        return token, "kept"
    if given is None:
        return ensure_token(path, config, env={}), "made"
    text = _read_text(path) or ""
    # As ensure_token writes it: a top-level key goes before the first [table].
    write_private(path, f"token = {json.dumps(given)}  # the fleet's, given to setup in CLARE_TOKEN\n" + text)
    return given, "stored"


def _unit_argv(text: str) -> list[str]:
    """Return the command a unit's ExecStart runs, as words (for 'run this yourself')."""
    import shlex

    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line[len("ExecStart="):])]


def _dry_init_step(db_path: str) -> Step:
    if not os.path.exists(db_path):
        return Step("database", "changed", f"would create {db_path} with machine id {host_label()}-XXXXXX")
    conn = sqlite3.connect(f"file:{os.path.abspath(db_path)}?mode=ro", uri=True)
    try:
        meta = _read_meta(conn)
    finally:
        conn.close()
    return Step("database", "ok", f"keep {db_path}, machine id {meta.get('machine_id')}")


def run_tool(argv: list[str], *, timeout_s: float = 30) -> tuple[int, str]:
    """Run a system program (systemctl, loginctl); return its exit code and its output, or stderr's first line."""
    import subprocess

    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        return 127, str(err)
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        return p.returncode, lines[0] if lines else f"exit code {p.returncode}"
    return 0, p.stdout.strip()


def _systemd_step(*, unit_changed: bool, is_dry_run: bool, start_cmd: str) -> Step:
    import shutil

    systemctl = shutil.which("systemctl")
    yourself = f"start Clare yourself (under your container's supervisor, or tmux) with: {start_cmd}"
    if systemctl is None:
        return Step("systemd", "todo", "no systemctl here, so no unit runs Clare", yourself)
    if is_dry_run:
        verb = "restart" if unit_changed else "enable --now"
        return Step("systemd", "changed", f"would run systemctl --user daemon-reload and {verb} clare")
    code, out = run_tool([systemctl, "--user", "daemon-reload"])
    if code != 0:
        return Step("systemd", "todo", f"no user systemd answers here ({out})", yourself)
    runs = ([["enable", "clare"], ["restart", "clare"]] if unit_changed else [["enable", "--now", "clare"]])
    for words in runs:
        code, out = run_tool([systemctl, "--user", *words])
        if code != 0:
            return Step("systemd", "failed", f"systemctl --user {' '.join(words)} failed: {out}",
                        "see why with: systemctl --user status clare; journalctl --user -u clare")
    return Step("systemd", "changed" if unit_changed else "ok",
                "clare.service " + ("enabled and (re)started" if unit_changed else "enabled and running"))


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _linger_step(*, has_systemd: bool) -> Step:
    import shutil

    user = _user_name()
    fix = f"sudo loginctl enable-linger {user}"
    loginctl = shutil.which("loginctl")
    if not has_systemd:
        return Step("linger", "ok", "no user systemd here: linger does not apply")
    if loginctl is None:
        return Step("linger", "todo", "no loginctl here: cannot tell if the unit outlives your login", fix)
    code, out = run_tool([loginctl, "show-user", user, "--property=Linger", "--value"])
    if code != 0:
        return Step("linger", "todo", f"cannot tell if the unit outlives your login ({out})", fix)
    if out == "yes":
        return Step("linger", "ok", f"linger is on for {user}: the unit runs without a login")
    return Step("linger", "todo", f"linger is off for {user}: the unit stops when you log out", fix)


def _peer_step(config_path: str, url: str, *, is_dry_run: bool) -> Step:
    peer = check_peer(url)
    configured = {p.url for p in load_peers(load_config(config_path), path=config_path)}
    if peer.url in configured:
        return Step(f"peer {peer.name}", "ok", f"{peer.url} is a peer already")
    if not is_dry_run:
        add_peer(config_path, peer.url, name=peer.name)
    return Step(f"peer {peer.name}", "changed",
                f"{'would add' if is_dry_run else 'added'} {peer.url} to {config_path}; serve syncs with it")


def _join_step(config_path: str, *, bind: str, port: int, peer_url: str | None, token: str,
               is_dry_run: bool) -> Step:
    """Give the command that joins another host to this one, with the token: on a terminal only."""
    import socket
    from urllib.parse import urlsplit

    if is_loopback(bind):
        return Step("join", "ok", f"bound to {bind}: other hosts cannot reach this one",
                    "to join others, run setup again with --bind ADDRESS (this host's address on their network)")
    here = socket.gethostname() if bind in WILDCARD_HOSTS else bind
    url = f"http://{'[' + here + ']' if ':' in here else here}:{port}"
    there = urlsplit(peer_url).hostname if peer_url else "THEIR_ADDRESS"
    python = os.path.basename(sys.executable)  # python3.11 where python3 is older: the other host likely too
    python = python if re.fullmatch(r"python3(\.\d+)?", python) else "python3"
    line = f"CLARE_TOKEN={token} {python} clare.py setup --bind {there} --peer {url}"
    who = "on that host" if peer_url else "on each other host (its own address)"
    if is_dry_run:
        return Step("join", "ok", f"would give the command to run {who}")
    if sys.stdout.isatty():
        # SECURITY: the token goes to a person's terminal only, never into a log or a pipe.
        return Step("join", "todo", f"run {who}:", line)
    path = os.path.join(os.path.dirname(os.path.abspath(config_path)), JOIN_FILE)
    write_private(path, line + "\n")
    return Step("join", "todo", f"the command to run {who} (with the token) is in {path} (0600)",
                f"run what {path} holds {who}")


def format_steps(steps: list[Step]) -> str:
    """Return one line per step (and its fix), for setup and doctor."""
    width = max([STEP_NAME_CHARS, *(len(s.name) for s in steps)])
    lines = []
    for s in steps:
        lines.append(f"{STEP_MARKS[s.state]:<6} {s.name:<{width}}  {s.detail}")
        if s.fix:
            lines.append(f"{'':<6} {'':<{width}}  fix: {s.fix}" if s.state == "failed" else
                         f"{'':<6} {'':<{width}}  -> {s.fix}")
    return "\n".join(lines)


def cmd_setup(args: argparse.Namespace, ctx: Context) -> int:
    """Set this host up in one idempotent run: database, token, launcher, unit, systemd, linger, hooks, peer."""
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a port; give 1-65535 (default {DEFAULT_PORT})")
    if not BIND_RE.match(args.bind) and not _is_ip(args.bind):
        raise UsageError(f"--bind {args.bind[:80]!r} is not an address; give this host's IP address or name on "
                         "the peers' network (a port goes in --port)")
    if args.peer is not None:
        check_peer(args.peer)
    steps: list[Step] = []
    for step in setup_steps(ctx, bind=args.bind, port=args.port, peer_url=args.peer, bin_dir=args.bin,
                            is_dry_run=args.dry_run):
        if args.dry_run and step.state == "changed":
            step = record_replace(step, state="planned")
        steps.append(step)
        if not ctx.as_json:
            print(format_steps([step]), flush=True)  # each step as it is done: a slow one shows where it is
    n_todo = sum(s.state == "todo" for s in steps)
    failed = [s for s in steps if s.state == "failed"]
    summary = ("dry run: nothing was changed" if args.dry_run else
               f"setup failed at {failed[0].name}" if failed else
               f"set up; {n_todo} to do by hand (-> above), then check with: clare doctor" if n_todo else
               "set up; check with: clare doctor")
    emit(ctx, {"steps": steps, "dry_run": args.dry_run, "ok": not failed}, summary)
    return 1 if failed else 0


def doctor_checks(ctx: Context, *, env: Mapping[str, str] | None = None) -> Iterator[Step]:
    """Check a host: unit, bind, token, peers, hooks, tmux, Claude Code, schema, fingerprint, disk space."""
    import shutil

    env = os.environ if env is None else env
    unit = _read_text(unit_path(env))
    argv = _unit_argv(unit) if unit else []
    host, port = _arg_after(argv, "--host", DEFAULT_HOST), int(_arg_after(argv, "--port", str(DEFAULT_PORT)))
    yield _unit_check(unit is not None, unit_path(env))
    config, token, problem = _config_and_token(ctx)
    db = ctx.db if os.path.exists(ctx.paths.db) else None
    yield _bind_check(host, port, token=token, machine_id=db.machine_id if db else None)
    yield (Step("token", "failed", problem.split("; ")[0], f"chmod 600 {ctx.paths.config}, or fix what it says")
           if problem else _token_check(ctx.paths.config, token))
    if db is None:
        yield Step("database", "failed", f"no database at {ctx.paths.db}", "clare setup")
        return
    for peer in load_peers(config, path=ctx.paths.config):
        yield _peer_check(db, peer, config)
    status = hooks_status(settings_path(env), hook_command(ctx.paths.db))
    missing = [e for e, v in status.items() if v != "installed"]
    yield (Step("hooks", "failed", f"Clare's hooks are {'missing' if len(missing) == len(status) else 'not all'} "
                f"in {settings_path(env)} ({', '.join(missing)})", "clare hooks install")
           if missing else Step("hooks", "ok", f"installed in {settings_path(env)}"))
    try:
        yield Step("tmux", "ok", tmux_binary())
    except ClareError as err:
        yield Step("tmux", "failed", str(err).split(";")[0], "apt install tmux")
    try:
        yield Step("claude", "ok", claude_argv(config, env=env)[0])
    except ClareError as err:
        yield Step("claude", "failed", str(err).split(";")[0],
                   'install Claude Code, or set [fleet] claude_command = "/full/path/to/claude" in clare.toml')
    version = get_meta(db.conn.cursor(), "schema_version")
    yield Step("schema", "ok" if version == str(SCHEMA_VERSION) else "failed",
               f"schema {version}, this clare.py's is {SCHEMA_VERSION}", "" if version == str(SCHEMA_VERSION)
               else "upgrade clare.py on this host")
    yield (Step("fingerprint", "failed", db.refusal.split("; ")[0], "clare init --new-id (the log is kept)")
           if db.refusal else Step("fingerprint", "ok", f"this database was made here ({db.machine_id})"))
    yield _clock_check(db)
    usage = shutil.disk_usage(os.path.dirname(os.path.abspath(ctx.paths.db)))
    free = f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB"
    yield (Step("disk", "ok", f"{free} where the database is") if usage.free >= MIN_FREE_BYTES else
           Step("disk", "failed", f"only {free} where the database is (under {MIN_FREE_BYTES // 2**20} MiB)",
                f"free space on the disk of {ctx.paths.db}"))


def _clock_check(db: Db) -> Step:
    clock = clock_status(db, now_ms=now_ms())
    if clock["is_refused"]:
        return Step("clock", "failed", clock["message"].split(": user writes")[0] + ": user writes are refused",
                    "timedatectl set-ntp true (or chronyc makestep), then: clare sync")
    if clock["hlc_message"]:
        return Step("clock", "failed", clock["hlc_message"].split(": ")[0],
                    "nothing to do: it passes by itself once real time catches up; keep the clock on NTP")
    if clock["n_deferred"]:
        return Step("clock", "failed", f"{clock['n_deferred']} events held back: {clock['deferred_reason']}",
                    "fix the clock (NTP) of the host that made them; see: clare peer list")
    return Step("clock", "ok", clock["message"] or "no peer finds this clock off; no event is held back")


def _arg_after(argv: list[str], flag: str, default: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else default


def _config_and_token(ctx: Context) -> tuple[dict[str, Any], str | None, str | None]:
    try:
        config = ctx.config
        return config, resolve_token(config, path=ctx.paths.config), None
    except ClareError as err:
        return {}, None, str(err)  # the token check says what is wrong


def _unit_check(has_unit: bool, path: str) -> Step:
    import shutil

    systemctl = shutil.which("systemctl")
    if not has_unit:
        return Step("unit", "failed", f"no unit at {path}", "clare setup")
    if systemctl is None:  # a container: serve runs under something else, and the bind check sees it
        return Step("unit", "ok", "no systemd here: serve runs without the unit")
    code, out = run_tool([systemctl, "--user", "is-active", "clare"])
    if code == 0 and out == "active":
        return Step("unit", "ok", "clare.service is active")
    if out.startswith("Failed to connect"):
        return Step("unit", "ok", f"no user systemd answers here ({out}): serve runs without the unit")
    return Step("unit", "failed", f"clare.service is {out or 'not active'}",
                "systemctl --user enable --now clare; see why: journalctl --user -u clare")


def _bind_check(host: str, port: int, *, token: str | None, machine_id: str | None) -> Step:
    where = f"{'127.0.0.1' if host in WILDCARD_HOSTS else host}:{port}"
    try:
        answer = http_json(f"http://{where}", "/api/v1/sync/events?after=0&limit=1", method="GET", body=None,
                           token=token, timeout_s=DOCTOR_TIMEOUT_S, hint_401="the token in clare.toml is not the "
                           "one serve uses: restart it (systemctl --user restart clare)")
    except ClareError as err:
        return Step("bind", "failed", f"nothing answers as Clare on {where}: {str(err).split(';')[0]}",
                    "systemctl --user restart clare (or run: clare serve)")
    if machine_id is not None and answer.get("machine_id") != machine_id:
        return Step("bind", "failed", f"another Clare answers on {where} (machine id "
                    f"{str(answer.get('machine_id'))[:63]}, this database's is {machine_id})",
                    "stop the other one, or give this host another port: clare setup --port PORT")
    return Step("bind", "ok", f"Clare answers on {where} (machine id {machine_id})")


def _token_check(path: str, token: str | None) -> Step:
    if token is None:  # every bind needs one, and serve makes it at its first start
        return Step("token", "ok", f"no token in {path} yet: clare serve makes one when it starts")
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o600
    if mode & 0o077:
        return Step("token", "failed", f"{path} holds the token and others may read it (mode {mode:o})",
                    f"chmod 600 {path}")
    return Step("token", "ok", f"set, {path} is private ({mode:o})")


def _peer_check(db: Db, peer: Peer, config: dict[str, Any]) -> Step:
    report = SyncReport(name=peer.name, url=peer.url)
    try:
        transport = HttpPeer(peer.url, token=peer_token(peer, config), timeout_s=DOCTOR_TIMEOUT_S)
        page = _call_timed(transport.pull, report, now_ms, after=0, limit=1)
        check_peer_identity(db, _check_page(page, after=0)[0], where=peer.url)
    except ClareError as err:
        fix = "clare init --new-id (on the copy)" if "init --new-id" in str(err) else \
            f"check that clare serve runs on {peer.url} and shares this host's token"
        return Step(f"peer {peer.name}", "failed", str(err).split(";")[0], fix)
    offset = report.offset_ms or 0
    if abs(offset) > MAX_OFFSET_MS:
        return Step(f"peer {peer.name}", "failed", f"{peer.url} answers; {skew_message(peer.name, offset)}",
                    "fix the clock (NTP) on whichever host is wrong")
    return Step(f"peer {peer.name}", "ok", f"{peer.url} answers, clock {_offset(offset)}")


def cmd_doctor(args: argparse.Namespace, ctx: Context) -> int:
    """Check this host, one line per check with the fix for each failure; exit 1 if any failed."""
    steps: list[Step] = []
    for step in doctor_checks(ctx):
        steps.append(step)
        if not ctx.as_json:
            print(format_steps([step]), flush=True)  # a peer that times out shows which one it is
    failed = [s for s in steps if s.state == "failed"]
    emit(ctx, {"checks": steps, "ok": not failed},
         f"{len(failed)} of {len(steps)} checks failed" if failed else f"all {len(steps)} checks passed")
    return 1 if failed else 0


def cmd_project_new(args: argparse.Namespace, ctx: Context) -> None:
    """Create a project."""
    p = ctx.svc.create_project(args.name, goal=args.goal, owner=args.owner, dirs=args.dir)
    emit(ctx, p, f"created project {p.name} ({p.id[:SHORT_ID]})" + "".join(
        f"\ncode on {host}: {folder}" for host, folder in p.dirs.items()))


def cmd_project_list(args: argparse.Namespace, ctx: Context) -> None:
    """List projects with their task counts."""
    projects = ctx.svc.list_projects(status=args.status)
    for name, found in name_clashes(projects).items():
        print(f"clare: warning: {clash_message(name, found)}", file=sys.stderr)
    emit(ctx, projects, lambda: table(
        ("ID", "NAME", "STATUS", "TODO", "DOING", "BLOCKED", "DONE", "OWNER", "GOAL"),
        ((p.id[:SHORT_ID], p.name, p.status, *(p.task_counts[s] for s in TASK_STATUSES), p.owner,
          short_text(p.goal, 50)) for p in projects)) \
        if projects else "no projects; create one with: clare project new NAME")


def cmd_project_show(args: argparse.Namespace, ctx: Context) -> None:
    """Show one project, its tasks and, with --history, what happened to it."""
    p = ctx.svc.get_project(args.project)
    tasks = ctx.svc.list_tasks(project_id=p.id)
    history = ctx.svc.project_history(p) if args.history else None
    queue = ctx.svc.get_queue(p.id)
    value = {**p.to_json(), "tasks": tasks, **({"history": history} if history is not None else {}),
             "ready": [t.id for t in queue.ready], "cycles": queue.cycles}

    def text() -> str:
        lines = [f"{p.name}  ({p.id})  {p.status}", f"goal:  {p.goal or '-'}", f"owner: {p.owner or '-'}",
                 *(f"code:  {folder} on {host}" for host, folder in p.dirs.items()), dispatch_line(p),
                 f"tasks: {_counts(p.task_counts)}",
                 f"ready: {len(queue.ready)}" + (f" (see them with: clare next --project {p.name})"
                                                 if queue.ready else ""),
                 *(f"cycle: {cycle_text(c)}: never ready; drop one wait with: clare task edit {c[0][:SHORT_ID]} "
                   f"--no-after {c[1][:SHORT_ID]}" for c in queue.cycles),
                 "", format_tasks(tasks, with_project=False)]
        if history is not None:
            lines += ["", "history:", format_history(history)]
        return "\n".join(lines)
    emit(ctx, value, text)


def cmd_project_rename(args: argparse.Namespace, ctx: Context) -> None:
    """Give a project a new name (the way out of two projects of one name)."""
    p = ctx.svc.edit_project(args.project, name=args.name)
    emit(ctx, p, f"project {p.id[:SHORT_ID]} is now named {p.name}")


def cmd_project_set(args: argparse.Namespace, ctx: Context) -> None:
    """Change a project's name, goal, owner, status, directories or dispatch settings."""
    given = (args.name, args.goal, args.owner, args.status, args.dispatch, args.max_sessions, args.dispatcher)
    if given == (None,) * len(given) and not args.dir:
        raise UsageError("nothing to change; give --name, --goal, --owner, --status, --dir, --dispatch, "
                         "--max-sessions or --dispatcher")
    p = ctx.svc.edit_project(args.project, name=args.name, goal=args.goal, owner=args.owner, status=args.status,
                             dirs=args.dir, dispatch=None if args.dispatch is None else args.dispatch == "on",
                             max_sessions=args.max_sessions, dispatcher=args.dispatcher)
    emit(ctx, p, f"project {p.name} ({p.id[:SHORT_ID]}): {p.status}, owner {p.owner or '-'}, goal {p.goal or '-'}"
         + "".join(f"\ncode on {host}: {folder}" for host, folder in p.dirs.items())
         + (f"\n{dispatch_line(p)}" if p.is_dispatching or args.dispatch else ""))


def dispatch_line(p: Project) -> str:
    """Return one line on a project's dispatch: on or off, how many sessions, which host decides."""
    if not p.is_dispatching:
        return f"dispatch: off (turn it on with: clare project set {p.name} --dispatch on)"
    return (f"dispatch: on, up to {p.max_sessions} session{'s' if p.max_sessions != 1 else ''}, "
            f"decided by {p.dispatcher}"
            + ("" if p.dirs else f"; {NO_DIR_DISPATCH}: clare project set {p.name} --dir /PATH"))


def cmd_task_add(args: argparse.Namespace, ctx: Context) -> None:
    """Add a task to a project."""
    t = ctx.svc.create_task(args.project, args.title, priority=parse_priority(args.prio), description=args.desc,
                            tags=args.tag, after=args.after)
    emit(ctx, t, f"added task {t.id[:SHORT_ID]} to {t.project}: {t.title} (P{t.priority})"
                 + "".join(f" #{tag}" for tag in t.tags) + _after_text(t))


def _after_text(task: Task) -> str:
    return f", waits on {', '.join(x[:SHORT_ID] for x in task.after)}" if task.after else ""


def cmd_next(args: argparse.Namespace, ctx: Context) -> None:
    """List the tasks ready to hand out, most urgent first, then oldest first."""
    tasks = ctx.svc.ready_tasks(args.project)
    empty = ("no task is ready" + (f" in {args.project}" if args.project else "")
             + ": each open task waits, is assigned, or its project is paused; see them with: clare task list")
    emit(ctx, tasks, lambda: format_tasks(tasks, with_project=not args.project, empty=empty))


def cmd_task_list(args: argparse.Namespace, ctx: Context) -> None:
    """List tasks, most urgent first: open tasks of active projects unless --all, --status or a project says."""
    if args.project and args.project_opt and args.project != args.project_opt:
        raise UsageError(f"two projects named: {args.project!r} and --project {args.project_opt!r}; give one")
    project_ref = args.project or args.project_opt
    if args.assigned and args.unassigned:
        raise UsageError("give --assigned or --unassigned, not both")
    svc = ctx.svc
    project_id = svc.get_project(project_ref).id if project_ref else None
    filters: dict[str, Any] = dict(
        project_id=project_id, status=args.status, is_open=not (args.all or args.status),
        active_projects=not (args.all or project_ref), is_assigned=True if args.assigned else False if args.unassigned
        else None, session_id=svc.get_session(args.session).id if args.session else None,
        group_id=svc.get_group(args.group).id if args.group else None, tag=args.tag,
        priorities=parse_priorities(args.prio) if args.prio else None,
        search=args.search, include_removed=args.all)
    if ctx.as_json and ctx.remote_url is None:  # SQLite writes the JSON: the same objects, no Task per row
        print(svc.list_tasks_json(**filters))
        return
    tasks = svc.list_tasks(**filters)
    filtered = any((args.status, args.assigned, args.unassigned, args.session, args.group, args.tag, args.prio,
                    args.search))
    empty = ("no tasks match" if filtered else "no tasks" if args.all
             else "no open tasks" + ("" if project_ref else " in active projects")
             + "; see all with: clare task list --all")
    emit(ctx, tasks, lambda: format_tasks(tasks, with_project=not project_ref, empty=empty))


def cmd_task_rm(args: argparse.Namespace, ctx: Context) -> None:
    """Remove a task: it leaves lists and the dashboard, keeps its history, and can be restored."""
    t = ctx.svc.remove_task(args.task)
    emit(ctx, t, f"removed task {t.id[:SHORT_ID]}: {t.title}\n"
                 f"bring it back with: clare task restore {t.id[:SHORT_ID]} (or: clare undo)")


def cmd_task_restore(args: argparse.Namespace, ctx: Context) -> None:
    """Bring a removed task back."""
    t = ctx.svc.restore_task(args.task)
    emit(ctx, t, f"restored task {t.id[:SHORT_ID]}: {t.title} ({STATUS_LABEL[t.status]})")


def cmd_undo(args: argparse.Namespace, ctx: Context) -> None:
    """Undo this host's last change by recording its inverse, or list what undo would take back."""
    if args.list:
        changes = ctx.svc.list_changes(limit=args.limit)
        emit(ctx, changes, lambda: table(("WHEN", "CHANGE"), (
            (when_text(c.events[0].created_at), c.description + (f"  (cannot undo: {c.refusal})" if c.refusal else ""))
            for c in changes)) if changes else "nothing to undo on this host")
        return
    result = ctx.svc.undo_change()
    kept = (f"\n{_n(result.n_kept, 'field')} changed since by a newer change kept the newer value"
            if result.n_kept else "")
    emit(ctx, result, f"undid: {result.undone.description}{kept}")


def cmd_task_show(args: argparse.Namespace, ctx: Context) -> None:
    """Show one task with its updates and history."""
    t = ctx.svc.get_task(args.task)
    updates = ctx.svc.list_updates(task_ids=[t.id])
    history = ctx.svc.list_history([t.id])
    waits = ctx.svc.get_task_waits(t.id)
    value = {**t.to_json(), "updates": updates, "history": history,
             **{k: v for k, v in waits.to_json().items() if k != "task_id"}}

    def text() -> str:
        lines = [f"{t.title}", f"id:       {t.id}", f"project:  {t.project} ({t.project_id[:SHORT_ID]})",
                 f"status:   {STATUS_LABEL[t.status]}", f"priority: P{t.priority}",
                 f"assigned: {_assignee(t) or '-'}", f"tags:     {' '.join(f'#{x}' for x in t.tags) or '-'}",
                 f"created:  {when_text(t.created_at)}"]
        if t.removed_at:
            lines.append(f"removed:  {when_text(t.removed_at)} "
                         f"(bring it back with: clare task restore {t.id[:SHORT_ID]})")
        lines += _waits_lines(waits)
        if t.description:
            lines += ["", t.description]
        if updates:
            lines += ["", "updates:"] + [f"{when_text(u.created_at)}  [{u.source}]  {u.text}" for u in updates]
        lines += ["", "history:", format_history(history)]
        return "\n".join(lines)
    emit(ctx, value, text)


def _waits_lines(waits: TaskWaits) -> list[str]:
    """Return task show's lines on waits: what it waits on, what it blocks, its cycle, whether it is ready."""
    def one(t: Task) -> str:
        state = "removed" if t.removed_at else STATUS_LABEL[t.status]
        return f"{t.id[:SHORT_ID]} ({state}) {short_text(t.title, 50)}"
    lines = [f"waits on: {x}" if i == 0 else f"          {x}" for i, x in enumerate(
        [one(t) for t in waits.waits_on] + [f"{x[:SHORT_ID]} (not known here yet)" for x in waits.unknown])]
    lines += [f"blocks:   {x}" if i == 0 else f"          {x}" for i, x in enumerate(map(one, waits.blocks))]
    if waits.cycle:
        lines.append(f"cycle:    {cycle_text(waits.cycle)}: never ready; drop one wait with: "
                     f"clare task edit {waits.cycle[0][:SHORT_ID]} --no-after {waits.cycle[1][:SHORT_ID]}")
    lines.append(f"ready:    {'yes' if waits.is_ready else 'no'}")
    return lines


def _cmd_task_status(status: str, verb: str) -> Callable[[argparse.Namespace, Context], None]:
    def handler(args: argparse.Namespace, ctx: Context) -> None:
        t = ctx.svc.edit_task(args.task, status=status)
        emit(ctx, t, f"task {t.id[:SHORT_ID]} {verb}: {t.title}")
    handler.__name__ = f"cmd_task_{verb}"
    handler.__doc__ = f"Set a task's status to {status}."
    return handler


def cmd_task_edit(args: argparse.Namespace, ctx: Context) -> None:
    """Change a task's title, priority, description, tags or the tasks it waits on."""
    if (args.title, args.prio, args.desc) == (None, None, None) and not any(
            (args.tag, args.untag, args.after, args.no_after)):
        raise UsageError("nothing to change; give --title, --prio, --desc, --tag, --untag, --after or --no-after")
    priority = None if args.prio is None else parse_priority(args.prio)
    t = ctx.svc.edit_task(args.task, title=args.title, priority=priority, description=args.desc,
                          tags=args.tag, untags=args.untag, after=args.after, no_after=args.no_after)
    emit(ctx, t, f"task {t.id[:SHORT_ID]}: {t.title} (P{t.priority}, {STATUS_LABEL[t.status]})"
                 + "".join(f" #{tag}" for tag in t.tags) + _after_text(t))


def cmd_assign(args: argparse.Namespace, ctx: Context) -> None:
    """Assign a task to a session or a group; say where it came from when it moved."""
    before = ctx.svc.get_task(args.task)
    t = ctx.svc.assign_task(args.task, session_id=args.session, group_ref=args.group)
    moved = (f" (moved from {_assignee(before)})" if (before.session_id or before.group_id)
             and _assignee(before) != _assignee(t) else "")
    emit(ctx, t, f"task {t.id[:SHORT_ID]} assigned to {_assignee(t)}{moved}: {t.title}")


def cmd_unassign(args: argparse.Namespace, ctx: Context) -> None:
    """End a task's assignment."""
    t = ctx.svc.unassign_task(args.task)
    emit(ctx, t, f"task {t.id[:SHORT_ID]} is unassigned: {t.title}")


def cmd_group_add(args: argparse.Namespace, ctx: Context) -> None:
    """Create a group of sessions from patterns."""
    g = ctx.svc.create_group(args.name, cwd=args.cwd, host=args.host, tmux_name=args.tmux_name)
    emit(ctx, g, f"created group {g.name} ({g.id[:SHORT_ID]})")


def cmd_group_list(args: argparse.Namespace, ctx: Context) -> None:
    """List groups and their patterns."""
    groups = ctx.svc.list_groups()
    emit(ctx, groups, lambda: table(("ID", "NAME", "CWD", "HOST", "TMUX NAME"), (
        (g.id[:SHORT_ID], g.name, g.cwd or "*", g.host or "*", g.tmux_name or "*") for g in groups))
        if groups else "no groups; create one with: clare group add NAME --cwd /srv/api")


def cmd_group_rm(args: argparse.Namespace, ctx: Context) -> None:
    """Remove a group."""
    g = ctx.svc.remove_group(args.group)
    emit(ctx, g, f"removed group {g.name} ({g.id[:SHORT_ID]})")


def cmd_update(args: argparse.Namespace, ctx: Context) -> None:
    """Add a progress note to a task, or inside a Claude pane to that session's task; --done also finishes it."""
    if args.text is not None:
        u = ctx.svc.post_update(args.text, task_ref=args.task, is_done=args.done)
    elif ID_PREFIX_RE.match(args.task) and len(args.task) >= 4:
        raise UsageError(f"the update text is missing after the task id; e.g. clare update {args.task} "
                         "\"parser done, tests next\"")
    else:
        pane_id = os.environ.get("TMUX_PANE")
        if not pane_id:
            raise UsageError("not inside a tmux pane; name the task: clare update TASK TEXT")
        socket = os.environ.get("TMUX", "").split(",")[0] or None
        try:
            u = ctx.svc.post_update(args.task, pane=(socket, pane_id), is_done=args.done)
        except NotFound:  # Claude runs here before any pull saw it (a session just started): look once, ask again
            ctx.svc.pull_fleet(config=ctx.config)
            u = ctx.svc.post_update(args.task, pane=(socket, pane_id), is_done=args.done)
    emit(ctx, u, f"{'done' if args.done else 'noted on'} task {(u.task_id or '-')[:SHORT_ID]}: "
                 f"{short_text(u.text, 70)}")


def format_sessions(sessions: list[Session], ambiguous: Sequence[Pane] = (), *,
                    empty: str = "no Claude sessions seen; run 'clare pull' on each host") -> str:
    """Return a session table, then one line per pane whose session is unknown."""
    now = now_ms()
    lines = [table(("ID", "HOST", "TMUX", "STATE", "ACTIVE", "TASK", "CWD", "LABEL"), (
        (s.id[:SHORT_ID], s.host, s.tmux_target or "-", s.state, ago_text(s.last_activity_at, now),
         _session_tasks(s), short_text(s.cwd, 40), short_text(s.label, 40)) for s in sessions))
        if sessions else empty]
    lines += [f"? pane {p.pane_id} ({p.target}) in {p.cwd}: Claude runs here, but its session cannot be told "
              "apart from another in this cwd" for p in ambiguous]
    return "\n".join(lines)


def _session_tasks(s: Session) -> str:
    ids = [t[:SHORT_ID] for t in dict.fromkeys(filter(None, (s.task_id, *s.task_ids)))]
    return (", ".join(ids) or "-") + (f" (group {s.group})" if s.group else "")


def cmd_pull(args: argparse.Namespace, ctx: Context) -> None:
    """Look at this host's Claude sessions and record what changed."""
    result = ctx.svc.pull_fleet(config=ctx.config, tails=args.tails)
    sessions = ctx.svc.list_sessions(host=ctx.db.machine_id)
    counts = {t: sum(ev.event_type == f"session.{t}" for ev in result.events) for t in ("appeared", "changed", "gone")}
    value = {"sessions": sessions, "events": len(result.events), **counts, "ambiguous": result.ambiguous,
             "unreachable": result.unreachable, "updates": result.updates, "warnings": result.warnings,
             "dispatched": result.dispatched}
    for warning in result.warnings:
        print(f"clare: warning: {warning}", file=sys.stderr)

    def text() -> str:
        head = (f"{len(result.observations)} sessions here: {counts['appeared']} appeared, "
                f"{counts['changed']} changed, {counts['gone']} gone")
        warn = [f"tmux server {s} did not answer; its sessions keep their last state" for s in result.unreachable]
        notes = [f"stored {len(result.updates)} pane tails and triage notes"] if args.tails else []
        notes += map(dispatch_text, result.dispatched)
        return "\n".join([head, *warn, *notes, format_sessions(
            sessions, result.ambiguous, empty="no Claude session runs in this host's tmux servers now")])
    emit(ctx, value, text)


def dispatch_text(o: Order) -> str:
    """Return one line on what a dispatch did: typed in or started, or why not, and why it was made."""
    task = (o.task_id or "")[:SHORT_ID]
    what = (f"task {task} typed into session {o.session_id[:SHORT_ID]}" if o.action == "dispatch"
            else f"session {o.session_id[:SHORT_ID]} started for task {task}")
    if o.result not in ("typed", "started"):
        what = f"{what}: {o.result}" + (f" ({o.reason})" if o.reason else "")
    return f"dispatch on {o.host}: {what}; why: {o.request.get('reason', '')}"


def cmd_sessions(args: argparse.Namespace, ctx: Context) -> None:
    """List the Claude sessions of every host, as last pulled, the one that needs a person most first.

    `sessions show ID` shows one.
    """
    if args.verb == "show":
        return cmd_sessions_show(args, ctx)
    if args.session is not None:
        raise UsageError(f"unexpected {args.session!r}; to see one session: clare sessions show ID")
    sessions = by_urgency(ctx.svc.list_sessions(include_gone=args.all or args.state == "gone"))
    if args.state:
        sessions = [s for s in sessions if s.state == args.state]
    ambiguous = ctx.svc.list_ambiguous_panes()
    empty = f"no session is {args.state} now; see them all with: clare sessions" if args.state else \
        "no Claude sessions seen; run 'clare pull' on each host (a running 'clare serve' pulls by itself)"
    emit(ctx, sessions, lambda: format_sessions(sessions, ambiguous, empty=empty))


def cmd_session_start(args: argparse.Namespace, ctx: Context) -> int:
    """Start a Claude session for a task in a new tmux window, on this host or another."""
    o = ctx.svc.start_session(args.task, host=args.host, is_worktree=args.worktree, model=args.model,
                              config=ctx.config)
    emit(ctx, o, order_text(o))
    return 0 if o.result in ("started", "pending") else 1


def cmd_session_resume(args: argparse.Namespace, ctx: Context) -> int:
    """Resume a gone session (claude --resume) in a new tmux window of its host."""
    o = ctx.svc.resume_session(args.session, config=ctx.config)
    emit(ctx, o, order_text(o))
    return 0 if o.result in ("started", "pending") else 1


def cmd_session_stop(args: argparse.Namespace, ctx: Context) -> int:
    """Stop a session: /exit while it waits; --force sends SIGTERM even while it works."""
    o = ctx.svc.stop_session(args.session, is_force=args.force, config=ctx.config)
    emit(ctx, o, order_text(o))
    return 0 if o.result in ("stopped", "pending") else 1


def cmd_session_orders(args: argparse.Namespace, ctx: Context) -> None:
    """List the starts, resumes and stops ordered, with what came of each."""
    orders = ctx.svc.list_orders(session_id=ctx.svc.get_session(args.session).id if args.session else None)
    emit(ctx, orders, lambda: table(("ORDER", "WHEN", "ACTION", "SESSION", "HOST", "RESULT", "REASON"), (
        (o.id[:SHORT_ID], when_text(o.created_at), o.action, o.session_id[:SHORT_ID], o.host, o.result,
         short_text(o.reason, 90)) for o in orders)) if orders else "no session orders")
def cmd_sessions_show(args: argparse.Namespace, ctx: Context) -> None:
    """Show one session: state, what it asks, task, where, the command that attaches to it, history."""
    if args.session is None:
        raise UsageError("name the session: clare sessions show ID (ids: clare sessions)")
    d = ctx.svc.get_session_detail(args.session, hosts=ctx.config.get("hosts") or {})
    s, argv = d.session, d.attach

    def text() -> str:
        import shlex

        now = now_ms()
        facts = [("session", s.id), ("label", s.label or "-"),
                 ("state", f"{SESSION_LABELS.get(s.state, s.state)} since {ago_text(s.state_at, now)}"),
                 ("asks", f"{s.asked['tool']}: {s.asked['input']}" if s.state == "permission" and s.asked else "-"),
                 ("task", f"{d.task.id[:SHORT_ID]} {d.task.project}: {d.task.title}" if d.task else "-"),
                 ("host", s.host), ("cwd", s.cwd or "-"), ("tmux", s.tmux_target or "not in tmux"),
                 ("active", ago_text(s.last_activity_at, now)), ("tokens", tokens_text(s.tokens)),
                 ("attach", shlex.join(argv) if argv else "- (not in tmux)")]
        lines = [f"{k:<8} {v}" for k, v in facts]
        return "\n".join(lines + ["", "history:", format_history(d.history)])
    emit(ctx, d, text)


def _cmd_answer(answer: str) -> Callable[[argparse.Namespace, Context], int]:
    def handler(args: argparse.Namespace, ctx: Context) -> int:
        import getpass

        option = getattr(args, "option", None)
        got = ctx.svc.answer_session(
            args.session, "option" if option is not None else answer, option=option,
            reason=getattr(args, "reason", None) or "", client=f"cli:{getpass.getuser()}@{os.uname().nodename}",
            peers=() if ctx.remote_url else load_peers(ctx.config, path=ctx.paths.config), settings=ctx.config)
        a = got.answer
        emit(ctx, got, f"{answer} {a.tool}: {short_text(a.input, 60)} (session {a.session_id[:SHORT_ID]} on "
                       f"{a.host}): {got.note}")
        return 0 if a.result in ("typed", "pending") else 1
    handler.__name__ = f"cmd_{answer}"
    handler.__doc__ = f"{answer.capitalize()} a session's open permission dialog, if it is still the same one."
    return handler


def cmd_attach(args: argparse.Namespace, ctx: Context) -> int:
    """Attach this terminal to a session's tmux pane: switch-client inside tmux, attach outside, ssh to another host."""
    s = ctx.svc.get_session(args.session)
    argv = attach_command(s, here=ctx.db.machine_id, hosts=ctx.config.get("hosts") or {})
    if argv is None:
        raise ClareError(f"session {s.id[:SHORT_ID]} runs outside tmux: there is no pane to attach to")
    if s.state == "gone":
        raise ClareError(f"session {s.id[:SHORT_ID]} is gone; see live ones with: clare sessions")
    env = dict(os.environ)
    inside = (env.get("TMUX") or "").split(",")[0]
    if argv[0] == "tmux":
        argv[0] = tmux_binary()
        if inside and os.path.realpath(inside) == os.path.realpath(s.tmux_socket or ""):
            argv[3] = "switch-client"  # already in that server: move this client, never nest
        elif inside:
            env.pop("TMUX")  # another server: attach inside this pane, as tmux allows once TMUX is unset
    if args.print:
        emit(ctx, argv, lambda: " ".join(argv))
        return 0
    import subprocess

    try:
        return subprocess.run(argv, env=env).returncode  # the terminal is the user's: no capture, no timeout
    except OSError as err:
        raise ClareError(f"cannot run {argv[0]}: {err.strerror}; install it or attach by hand") from err


def cmd_hook(args: argparse.Namespace, ctx: Context) -> int:
    """Take one Claude Code hook report on stdin; print nothing and exit 0 whatever happens."""
    started_ms = process_started_ms() or now_ms()  # before anything else: when Claude started this hook
    run_hook(ctx.paths.db, sys.stdin.buffer.read(MAX_HOOK_INPUT_BYTES), env=dict(os.environ), at_ms=started_ms)
    return 0


def cmd_hooks_install(args: argparse.Namespace, ctx: Context) -> None:
    """Add Clare's hooks to Claude Code's settings, keeping the user's own."""
    path = settings_path()
    changed = install_hooks(path, hook_command(ctx.paths.db))
    emit(ctx, {"settings": path, "changed": changed},
         f"installed Clare's hooks for {len(changed)} events in {path}; Claude Code 2.1.x reloads this file, so "
         "running sessions report from now on too (older versions only after a restart; pull sees them either way)"
         if changed else f"Clare's hooks are already in {path}")


def cmd_hooks_uninstall(args: argparse.Namespace, ctx: Context) -> None:
    """Remove Clare's hooks from Claude Code's settings, and nothing else."""
    path = settings_path()
    changed = uninstall_hooks(path)
    emit(ctx, {"settings": path, "changed": changed},
         f"removed Clare's hooks from {len(changed)} events in {path}" if changed else f"no Clare hooks in {path}")


def cmd_hooks_status(args: argparse.Namespace, ctx: Context) -> None:
    """Show which hook events run Clare, and how many reports wait in the spool."""
    path = settings_path()
    status = hooks_status(path, hook_command(ctx.paths.db))
    folder = spool_dir(ctx.paths.db)
    n_spooled = len([n for n in os.listdir(folder) if n.endswith(".json")]) if os.path.isdir(folder) else 0
    emit(ctx, {"settings": path, "events": status, "spooled": n_spooled}, lambda: "\n".join([
        f"settings: {path}", table(("EVENT", "CLARE HOOK"), status.items()),
        f"{n_spooled} reports wait in {folder} for the next pull ('clare pull', or a running 'clare serve' by "
        "itself)" if n_spooled else "spool: empty"]))


def cmd_broadcast(args: argparse.Namespace, ctx: Context) -> int:
    """Type a text into every live session of a project, a group or one session."""
    text = " ".join(args.text)
    if not args.yes:
        recipients = ctx.svc.list_broadcast_recipients(args.target)
        if not recipients:
            raise no_recipients_error(args.target)
        n = len(recipients)
        print(f"{n} recipient{'s' * (n != 1)}:\n" + format_sessions(recipients), file=sys.stderr)
        if not sys.stdin.isatty():
            raise UsageError("no terminal to confirm on; add --yes to send to "
                             + ("this session" if n == 1 else f"these {n} sessions"))
        if input("send? [y/N] ").strip().lower() not in ("y", "yes"):
            print("not sent", file=sys.stderr)
            return 1
    landed = BroadcastLines(as_json=ctx.as_json)
    landed.start(args.target)
    # A server answers once, with every result: on_delivery is not sent, and the rest prints below.
    result = ctx.svc.send_broadcast(args.target, text, is_command=args.command, on_delivery=landed)
    landed.close()
    rest = [d for d in result.deliveries if d.session_id not in landed.shown]
    counts = {r: sum(d.result == r for d in result.deliveries) for r in ("delivered", *DELIVERY_RESULTS)}
    # Every open assigned task of a project target gets a line: those no live session works on too.
    counts["no live session"] = len(result.unreached)
    unreached = [TERMINAL_CONTROL_RE.sub("?", landed.line(
        u["session_id"] or "-", "-", "-", "no live session",
        f"task {u['task_id'][:SHORT_ID]} {u['title']!r}: " + u["reason"].removeprefix("no live session: ")))
        for u in result.unreached]
    emit(ctx, result, lambda: "\n".join([*(landed.line(d.session_id, d.host, d.tmux_target, d.result, d.reason)
                                           for d in rest), *unreached,
                                         f"broadcast {result.broadcast_id[:SHORT_ID]} to {result.target}: "
                                         + ", ".join(f"{n} {r}" for r, n in counts.items() if n)]))
    return 0 if result.is_complete else 1


class BroadcastLines:
    """Print one line per session of a broadcast as it lands, with a progress line on a terminal."""

    def __init__(self, *, as_json: bool, stream: Any = None):
        self.as_json = as_json
        self.stream = stream or sys.stderr
        self.is_tty = self.stream.isatty()
        self.shown: set[str] = set()  # session ids printed already

    @staticmethod
    def line(session_id: str, host: str | None, tmux_target: str | None, result: str, reason: str) -> str:
        """Return one session's result as a line: session, host, tmux target, result, reason."""
        return f"{session_id[:SHORT_ID]}  {host or '?':<12}  {tmux_target or '-':<14}  {result:<9}  {reason}".rstrip()

    def __call__(self, s: Session, result: str, reason: str, n_done: int, n_total: int) -> None:
        """Print the line of a session that was just typed into, then say how far the rest is."""
        self.shown.add(s.id)
        if self.is_tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        if not self.as_json:
            print(TERMINAL_CONTROL_RE.sub("?", self.line(s.id, s.host, s.tmux_target, result, reason)), flush=True)
        if self.is_tty and n_done < n_total:
            self.stream.write(f"typing into {n_done + 1} of {n_total} sessions on this host…")
            self.stream.flush()

    def start(self, target: str) -> None:
        """Say on a terminal that the typing has begun (the first session takes seconds)."""
        if self.is_tty:
            self.stream.write(f"broadcasting to {TERMINAL_CONTROL_RE.sub('?', target)}…")
            self.stream.flush()

    def close(self) -> None:
        """Clear the progress line."""
        if self.is_tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def cmd_status(args: argparse.Namespace, ctx: Context) -> None:
    """Show the roll-up: per project task counts and tokens, per session its task and state."""
    report = ctx.svc.get_status(project_ref=args.project, group_ref=args.group)

    def rows(sessions: list[Session], now: int) -> Iterator[tuple[str, ...]]:
        for s in sessions:
            ids: list[str | None] = [t for t in dict.fromkeys(filter(None, (s.task_id, *s.task_ids)))
                                     if t in report.tasks]
            for n, t in enumerate(ids or [None]):  # a session holding two tasks shows both, one line each
                task = (f"{t[:SHORT_ID]} {short_text(report.tasks[t].title, 50)}"
                        + (f" (group {s.group})" if s.group and t == s.task_id else "")) if t else "-"
                yield ((s.id[:SHORT_ID], s.host, s.tmux_target or "-", s.state, ago_text(s.state_at, now),
                        ago_text(s.last_activity_at, now), tokens_text(s.tokens), task) if n == 0
                       else ("", "", "", "", "", "", "", task))

    def text() -> str:
        now = now_ms()
        sessions = by_urgency(report.sessions)
        heads = ("SESSION", "HOST", "TMUX", "STATE", "SINCE", "ACTIVE", "TOKENS", "TASK")
        needy = [s for s in sessions if s.state in ("permission", "waiting")]
        needs_you = ("needs you:\n" + table(heads, rows(needy, now)) if needy
                     else "needs you: nothing (no session waits for an answer or a permission)")
        projects = table(("PROJECT", "STATUS", "TODO", "DOING", "BLOCKED", "DONE", "SESSIONS", "TOKENS"), (
            (r.project.name, r.project.status, *(r.project.task_counts[s] for s in TASK_STATUSES), r.n_sessions,
             tokens_text(r.tokens)) for r in report.projects)) if report.projects else "no projects"
        listed = table(heads, rows(sessions, now)) if sessions else "no live sessions"
        warnings = "\n".join(f"warning: {x}" for x in clock_lines(clock)) if clock else ""
        return "\n\n".join(x for x in (needs_you, projects, listed, warnings) if x)
    clock = ctx.svc.clock_status()
    emit(ctx, {**report.to_json(), "clock": clock}, text)


def cmd_log(args: argparse.Namespace, ctx: Context) -> None:
    """Print the newest events of the log, newest last."""
    if not 1 <= args.limit <= MAX_EVENTS_PAGE:
        raise UsageError(f"--limit {args.limit} must be from 1 to {MAX_EVENTS_PAGE}; "
                         "for the whole log use: clare export")
    events = ctx.svc.list_events(limit=args.limit)
    emit(ctx, events, lambda: "\n".join(
        f"{when_text(ev.created_at)}  {ev.machine_id:<12}  "
        + (f"{ev.hlc}  {ev.event_type:<16}  " if args.verbose else "") + describe_event(ev) for ev in events)
        or "the log is empty")


def cmd_replay(args: argparse.Namespace, ctx: Context) -> None:
    """Rebuild every projection from the log."""
    started = time.perf_counter()
    n_events = ctx.svc.replay()
    seconds = time.perf_counter() - started
    emit(ctx, {"events": n_events, "seconds": round(seconds, 3)},
         f"replayed {n_events} events in {seconds:.2f} s")


def cmd_export(args: argparse.Namespace, ctx: Context) -> None:
    """Write the whole log as JSON lines, in receipt order."""
    out = sys.stdout if args.file in (None, "-") else None
    try:
        target = contextlib.nullcontext(out) if out else open(args.file, "w", encoding="utf-8")
    except OSError as err:
        raise ClareError(f"cannot write {args.file}: {err.strerror}; check the folder exists and is writable") from err
    with target as f:
        n_events, page = 0, EventPage([], 0, True)
        while page.has_more:
            page = page_events(ctx.db, after=page.next_after, limit=MAX_EVENTS_PAGE)
            f.writelines(json.dumps(ev.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n"
                         for ev in page.events)
            n_events += len(page.events)
    if out is None:
        print(f"exported {n_events} events to {args.file}", file=sys.stderr)


def cmd_import(args: argparse.Namespace, ctx: Context) -> int:
    """Add the events of a JSON-lines file that this log lacks (idempotent)."""
    try:
        f = (open(sys.stdin.fileno(), encoding="utf-8", errors="surrogateescape", closefd=False) if args.file == "-"
             else open(args.file, encoding="utf-8", errors="surrogateescape"))
    except OSError as err:
        raise ClareError(f"cannot read {args.file}: {err.strerror}; check the path") from err
    with f:
        result, bad = ctx.svc.import_events(f)
    for reason in bad:
        print(f"clare: rejected {reason}", file=sys.stderr)
    summary = {"accepted": len(result.inserted), "duplicates": result.n_duplicates,
               "conflicts": result.conflicts, "rejected": len(bad)}
    emit(ctx, summary, f"imported {len(result.inserted)} events ({result.n_duplicates} already here, "
                       f"{len(result.conflicts)} conflicting, {len(bad)} rejected)")
    return 1 if bad or result.conflicts else 0


def cmd_peer_add(args: argparse.Namespace, ctx: Context) -> None:
    """Add a peer to clare.toml: a URL, a suggested peer, or every suggested one that takes this host's token."""
    if args.all_suggested and (args.url or args.name):
        raise UsageError("--all-suggested adds every suggested peer under its own name: give no url or --name")
    if not args.all_suggested and not args.url:
        raise UsageError("give the peer's url (clare peer add http://HOST:8765) or --all-suggested")
    ref = None if args.all_suggested else args.url
    is_suggested = ref is None or any(ref in (r["name"], r["url"], r["url"] + "/", r["host"])
                                      for r in _suggested(ctx, has_token=False))
    if not is_suggested:
        peer = add_peer(ctx.paths.config, args.url, name=args.name, token_env=args.token_env)
        token = (f"Clare sends it the token in ${peer.token_env}" if peer.token_env else
                 f"Clare sends it this host's own token ($CLARE_TOKEN, else the token line of {ctx.paths.config}); "
                 "give it --token-env VAR if it has another")
        emit(ctx, peer, f"added peer {peer.name} ({peer.url}) to {ctx.paths.config}; {token}\n"
                        f"a running 'clare serve' syncs with it within two seconds; now: clare sync {peer.name}")
        return
    added, skipped = add_suggested_peers(ctx.paths.config, _suggested(ctx), ref, name=args.name,
                                         token_env=args.token_env)
    lines = [f"added peer {p.name} ({p.url}) to {ctx.paths.config}" for p in added]
    lines += [f"not added: {r['reason']}" for r in skipped]
    if not added and not skipped:
        lines = ["no suggested peers: every host announced in the log is a peer already (clare peer list)"]
    elif added:
        lines.append("a running 'clare serve' syncs with them within two seconds")
    if ctx.as_json and ref is not None and added:
        emit(ctx, added[0], "")
        return
    emit(ctx, {"added": [p.to_json() for p in added], "skipped": skipped}, "\n".join(lines))


def _suggested(ctx: Context, *, has_token: bool = True) -> list[dict[str, Any]]:
    """Return the suggested peers; without `has_token`, without reading the token (nor comparing it)."""
    config = ctx.config
    return list_suggested_peers(ctx.db, load_peers(config, path=ctx.paths.config),
                                token=resolve_token(config, path=ctx.paths.config) if has_token else None)


def cmd_peer_rm(args: argparse.Namespace, ctx: Context) -> None:
    """Remove a peer from clare.toml and forget what its syncs did (its cursors stay)."""
    peer = remove_peer(ctx.paths.config, args.peer)
    forget_peer_status(ctx.db, peer.url)
    emit(ctx, peer, f"removed peer {peer.name} ({peer.url}) from {ctx.paths.config}; "
                    "a running 'clare serve' stops syncing with it within two seconds")


def cmd_token(args: argparse.Namespace, ctx: Context) -> None:
    """Print this host's API token, to a terminal only."""
    token = ctx.svc.get_token(ctx.config, path=ctx.paths.config)
    # SECURITY: a token printed into a pipe or a file ends up in logs and shell histories.
    if not sys.stdout.isatty():
        raise UsageError(f"clare token prints the token to a terminal only; a script reads it where it lives: "
                         f"CLARE_TOKEN, else 'token' in {ctx.paths.config}")
    emit(ctx, {"token": token, "config": ctx.paths.config}, token)


def cmd_peer_list(args: argparse.Namespace, ctx: Context) -> None:
    """List peers with their last sync, events to pull and push, clock offset and last error; or suggested peers."""
    if args.suggested:
        rows = _suggested(ctx)
        token = {True: "this host's", False: "its own", None: "unknown"}
        emit(ctx, rows, lambda: table(("NAME", "URL", "ANNOUNCED BY", "TOKEN"), (
            (r["name"], r["url"], f"{r['announced_by']} at {r['announced_at'][:19]}", token[r["is_token_shared"]])
            for r in rows)) + "\nadd them with: clare peer add NAME (or --all-suggested)" if rows else
             "no suggested peers: every host announced in the log is a peer already")
        return
    rows = list_peers(ctx.db, load_peers(ctx.config, path=ctx.paths.config))
    now = now_ms()
    emit(ctx, rows, lambda: table(("NAME", "HOST", "URL", "LAST SYNC", "TO PULL", "TO PUSH", "CLOCK", "DEFERRED",
                                   "ERROR"), (
        (r["name"] + ("" if r["is_configured"] else " (not in clare.toml)"), r["host_name"] or "", r["url"],
         _ago_ms(r["last_ok_ms"], now), "" if r["n_behind"] is None else r["n_behind"],
         "" if r["n_to_push"] is None else r["n_to_push"], _offset(r["offset_ms"]),
         f"{r['n_deferred']}: {short_text(r['deferred_reason'], 70)}" if r["n_deferred"] else "",
         short_text(r["last_error"], 80) + f" ({r['n_failures']} in a row)" if r["last_error"] else "")
        for r in rows)) if rows else "no peers; add one with: clare peer add http://HOST:8765 --name NAME")


def cmd_sync(args: argparse.Namespace, ctx: Context) -> int:
    """Run one round (pull, then push) with every configured peer or one; print what moved."""
    config = ctx.config
    peers = load_peers(config, path=ctx.paths.config)
    if args.peer:
        peers = [find_peer(peers, args.peer)]
    elif not peers:
        raise UsageError("no peers configured; add one with: clare peer add http://HOST:8765 --name NAME "
                         "(or sync once with: clare sync http://HOST:8765)")
    results: list[Any] = []
    for peer in peers:
        progress = ProgressLine(peer.name)
        try:
            report = sync_round(ctx.db, peer, config, progress=progress, verify=args.verify)
        except ClareError as err:  # the per-peer loop: one dead peer never stops the others
            progress.close()
            print(f"clare: error: {peer.name}: {err}", file=sys.stderr)
            results.append({"name": peer.name, "url": peer.url, "error": str(err)})
            continue
        progress.close()
        if report.is_skewed:
            print(f"clare: warning: {skew_message(peer.name, report.offset_ms or 0)}", file=sys.stderr)
        for r in report.rejected[:5]:
            print(f"clare: {peer.name}: event {r.get('uuid')} refused: {r.get('reason')}", file=sys.stderr)
        results.append(report)
    for name, found in name_clashes(list_projects(ctx.db)).items():
        print(f"clare: warning: {clash_message(name, found)}", file=sys.stderr)
    # A failure was said on stderr already; the summary repeats it only to place it among other peers.
    emit(ctx, results, lambda: "\n".join(
        f"{r['name']}: failed" if isinstance(r, dict) else format_sync_report(r) for r in results
        if len(results) > 1 or not isinstance(r, dict)))
    return 1 if any(isinstance(r, dict) for r in results) else 0


def format_sync_report(r: SyncReport) -> str:
    """Return one line saying what a round with one peer moved."""
    line = f"{r.name}: pulled {r.n_pulled}, pushed {r.n_pushed}"
    if r.offset_ms is not None:
        line += f", clock {_offset(r.offset_ms)}"
    if r.conflicts:
        line += f", {len(r.conflicts)} conflicting (same uuid, other content; ours kept)"
    if r.rejected:
        line += f", {len(r.rejected)} refused as malformed"
    if r.n_deferred_stored:
        line += f", {r.n_deferred_stored} held back earlier went through"
    if r.deferred:
        line += f", {len(r.deferred)} held back (stamped too far ahead; see: clare peer list)"
    if r.verify is not None:
        v = r.verify
        line += (f"; verify: {v['days']} days compared, {len(v['days_differ'])} differed, "
                 f"fetched {v['fetched']}, sent {v['sent']}")
    return line


class ProgressLine:
    """A progress line on stderr: rewritten in place on a terminal, else printed every few seconds."""

    def __init__(self, name: str, *, stream: Any = None):
        self.name = name
        self.stream = stream or sys.stderr
        self.is_tty = self.stream.isatty()
        self.last_s = -1e9
        self.is_open = False  # a rewritten line waits for its newline

    def __call__(self, what: str, moved: int, total: int) -> None:
        """Show how many of the events have moved."""
        now_s = time.monotonic()
        if moved < total and now_s - self.last_s < (0.1 if self.is_tty else 5.0):
            return
        self.last_s = now_s
        line = f"{self.name}: {what} {moved}/{total} events"
        self.stream.write(f"\r{line}\x1b[K" if self.is_tty else line + "\n")
        self.stream.flush()
        self.is_open = self.is_tty

    def close(self) -> None:
        """End the line."""
        if self.is_open:
            self.stream.write("\n")
            self.is_open = False


def cmd_serve(args: argparse.Namespace, ctx: Context) -> None:
    """Serve the dashboard and the JSON API until SIGTERM or Ctrl-C; sync and pull the fleet meanwhile."""
    import threading

    if ctx.db.refusal is not None:  # a copy: everything serve does in the background writes
        raise Conflict(ctx.db.refusal)
    config = web_config(ctx.paths, settings=ctx.config, host=args.host, port=args.port, log_requests=args.log)
    settings = {**ctx.config, "token": config.token}  # a token made just now goes to peers without token_env
    book = PeerBook(ctx.paths.config, settings, config.peers, overrides={"token": config.token})
    config = record_replace(config, peers=book)  # the dashboard's peers follow clare.toml too
    interval_s = sync_interval_s(settings, path=ctx.paths.config)
    server = make_server(config)
    stop = threading.Event()

    def log(line: str) -> None:
        print(f"clare: {line}", file=sys.stderr, flush=True)

    def started() -> None:
        print(f"clare: serving {server.url}/ (Ctrl-C stops)", flush=True)
        # SECURITY: under systemd stdout is the journal; the token goes only to a person's terminal.
        if sys.stdout.isatty():
            print(f"clare: log in once with {server.url}/login?token={config.token}", flush=True)
        else:
            print(f"clare: log in once with {server.url}/login?token=YOUR_TOKEN (the token line of "
                  f"{ctx.paths.config}, or $CLARE_TOKEN)", flush=True)
        url = announce_url(config.host, server.url, settings, path=ctx.paths.config)
        try:
            if url is not None and announce_host(ctx.db, url, token=config.token, now_ms=now_ms()) is not None:
                log(f"announced {url} to the fleet as {machine_host_name(ctx.db.machine_id)}: its peers' peers "
                    "can now offer this host")
        except ClareError as err:  # serving matters more than being offered: the next start tries again
            log(f"{url} not announced: {err}")
        if not args.no_sync:
            names = ", ".join(p.name for p in book) or "no peer yet (clare peer add URL: used within two seconds)"
            print(f"clare: syncing with {names} every {interval_s:g} s", flush=True)
            start_background_sync(ctx.paths.db, book, stop=stop, interval_s=interval_s, log=log,
                                  contacts=config.contacts)
        start_background_pull(ctx.paths.db, settings, stop=stop, log=log)
        base_url = str((settings.get("notify") or {}).get("url") or server.url)
        start_background_act(ctx.paths.db, settings, base_url=base_url, stop=stop, log=log)
    try:
        run_server(server, on_start=started)
    finally:
        stop.set()
    print("clare: stopped", flush=True)


def cmd_restore(args: argparse.Namespace, ctx: Context) -> None:
    """Replace the database by a backup copy of it; peers then send back what came after."""
    if not os.path.isfile(args.backup):
        raise UsageError(f"no file {args.backup!r}; give a copy of clare.db made earlier")
    if not args.yes:
        raise UsageError("restoring replaces everything in this database by the backup (events since then come "
                         "back only from peers); run again with --yes")
    path = ctx.paths.db  # not ctx.db: opening would create a new empty database, or fail on a damaged one
    db_id, n_events, aside = restore_backup(path, args.backup)
    emit(ctx, {"db": path, "db_id": db_id, "n_events": n_events, "damaged_file": aside},
         f"restored {path} from {args.backup}: {n_events} events, new db id {db_id}\n"
         + (f"the unreadable file is kept as {aside}\n" if aside else "")
         + "get back what peers hold since the backup with: clare sync")


GROUP_HELP = {
    "project": "create, list, show and change projects",
    "task": "add, list, show and move tasks",
    "group": "name groups of sessions by cwd, host or tmux session name",
    "hooks": "install, remove and check Clare's Claude Code hooks",
    "peer": "add, list and remove the hosts this one syncs with",
    "session": "start, resume and stop Claude sessions for tasks, on any host",
}
_TASK_REF = arg("task", help="task id or unique prefix")
_AFTER_ARG = arg("--after", action="append", default=[], metavar="ID",
                 help="wait on this task: ready only once it is done (id prefix; repeat for more)")
_GLOBAL_ARGS = (
    arg("--home", metavar="DIR", help="folder of clare.db and clare.toml (env CLARE_HOME)"),
    arg("--db", metavar="FILE", help="use this database file"),
    arg("--json", action="store_true", help="print JSON instead of text"),
    arg("--remote", metavar="URL", help="run the command on the Clare server at URL, e.g. http://apricot:8765 "
                                        "(env CLARE_URL; token from CLARE_TOKEN)"),
)
# The same options after the verb (`clare task list --home /tmp/c2`): SUPPRESS keeps a value given before it.
_LEAF_GLOBAL_ARGS = tuple((flags, {**options, "default": argparse.SUPPRESS}) for flags, options in _GLOBAL_ARGS)
_DIR_ARG = arg("--dir", action="append", default=[], metavar="[HOST:]PATH",
               help="where the code lives: /PATH on this host, HOST:/PATH on another (machine id, or a host or "
                    "peer name only one host has), HOST: to forget it; repeat per host")

_SERVE_ARGS = (
    arg("--host", default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}; every bind needs the token, made on first serve)"),
    arg("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)"),
    arg("--log", action="store_true", help="print one line per request to stderr"),
    arg("--no-sync", action="store_true", help="do not sync with the peers of clare.toml in the background"),
)

# Verbs that act on this host's own database file, config, tmux or hooks: --remote cannot carry them.
# `hook` is not here: Claude runs it with the user's environment (CLARE_URL too), and it must record
# locally and exit 0 whatever that environment says.
# The one statement of what works on this host only (its database file, tmux, Claude hooks,
# clare.toml): main() refuses these under --remote before they run. Only their handlers use
# ctx.db (a test keeps that true); the others reach data through ctx.svc, local or remote.
LOCAL_COMMANDS = frozenset({("init",), ("pull",), ("attach",), ("hooks", "install"), ("hooks", "uninstall"),
                            ("hooks", "status"), ("serve",), ("web",), ("peer", "add"), ("peer", "rm"),
                            ("peer", "list"), ("sync",), ("export",), ("restore",), ("install",),
                            ("setup",), ("doctor",)})

COMMANDS: list[Command] = [
    Command(("init",), cmd_init, "create the database and this host's machine id (idempotent)",
            "clare init\n  clare --home /tmp/c2 init --machine-id apricot\n  clare init --new-id   # on a copy",
            (arg("--machine-id", help="this host's id in every event (default: the host name and a random "
                 "suffix, e.g. apricot-3f9a2c; one you give must be unique in the fleet)"),
             arg("--new-id", action="store_true",
                 help="give this database a new machine id and db id, keeping its log: the fix for a copy "
                      "(a cloned VM or a copied home)"))),
    Command(("project", "new"), cmd_project_new, "create a project",
            'clare project new alpha --goal "ship v1" --owner ana'
            '\n  clare project new api --dir /srv/api --dir apricot:/home/ana/api',
            (arg("name"), arg("--goal", default="", help="what done looks like"),
             arg("--owner", default="", help="who answers for it"), _DIR_ARG)),
    Command(("project", "list"), cmd_project_list, "list projects with task counts",
            "clare project list --status active",
            (arg("--status", choices=PROJECT_STATUSES),)),
    Command(("project", "show"), cmd_project_show, "show a project, its tasks and history",
            "clare project show alpha --history",
            (arg("project", help="name or id prefix"), arg("--history", action="store_true",
                                                            help="also list what happened, oldest first"))),
    Command(("project", "set"), cmd_project_set, "change a project's name, goal, owner, status, dirs or dispatch",
            "clare project set alpha --status paused\n  clare project set alpha --dir apricot:/srv/api --dir fig:"
            "\n  clare project set alpha --dispatch on --max-sessions 3 --dispatcher apricot",
            (arg("project", help="name or id prefix"), arg("--status", choices=PROJECT_STATUSES),
             arg("--goal"), arg("--owner"), arg("--name", help="rename it"), _DIR_ARG,
             arg("--dispatch", choices=("on", "off"),
                 help="feed the project's sessions the next ready task as they finish one (off by default)"),
             arg("--max-sessions", type=int, metavar="N",
                 help=f"start sessions for ready tasks while fewer than N work on it (default "
                      f"{DEFAULT_DISPATCH_SESSIONS})"),
             arg("--dispatcher", metavar="HOST", help="the one host that dispatches (default: the host that "
                                                      "turned dispatch on)"))),
    Command(("project", "rename"), cmd_project_rename, "give a project a new name (two of one name: rename one)",
            "clare project rename 3f9a2c1b alpha-laptop",
            (arg("project", help="id prefix (or the name, when only one project has it)"), arg("name"))),
    Command(("task", "add"), cmd_task_add, "add a task to a project",
            'clare task add alpha "write the parser" --prio 1 --desc "tokens first" --tag backend'
            '\n  clare task add alpha "ship it" --after 3f2a --after 91bc   # ready once both are done',
            (arg("project", help="name or id prefix"), arg("title"),
             arg("--prio", default=str(DEFAULT_PRIORITY), metavar="0-4",
                 help="0 is the most urgent (default 2)"),
             arg("--desc", default="", help="description"),
             arg("--tag", action="append", default=[], metavar="TAG", help="a tag (repeat for more)"),
             _AFTER_ARG)),
    Command(("task", "list"), cmd_task_list, "list open tasks of active projects, most urgent first",
            "clare task list alpha\n  clare task list --tag backend --prio 0-1 --unassigned\n"
            "  clare task list --all --search parser",
            (arg("project", nargs="?", help="only this project (name or id prefix), whatever its status"),
             arg("--project", dest="project_opt", metavar="PROJECT", help="the same as the positional PROJECT"),
             arg("--all", action="store_true",
                 help="also done and removed tasks, and tasks of paused or done projects"),
             arg("--status", choices=TASK_STATUSES, help="only this status (done included)"),
             arg("--assigned", action="store_true", help="only tasks bound to a session or group"),
             arg("--unassigned", action="store_true", help="only tasks bound to nothing"),
             arg("--session", metavar="ID", help="only the tasks of this session (id prefix)"),
             arg("--group", metavar="G", help="only the tasks bound to this group"),
             arg("--prio", metavar="N|N-M", help="only this priority or range, e.g. 0-1"),
             arg("--tag", metavar="TAG", help="only tasks with this tag"),
             arg("--search", metavar="TEXT", help="only tasks whose title or description holds TEXT (any case)"))),
    Command(("next",), cmd_next, "list the tasks ready to hand out: todo, unassigned, waiting on nothing undone",
            "clare next\n  clare next --project alpha --json",
            (arg("--project", help="only this project (name or id prefix)"),)),
    Command(("task", "show"), cmd_task_show, "show a task with its updates, waits and history",
            "clare task show 3f2a", (_TASK_REF,)),
    Command(("task", "start"), _cmd_task_status("in_progress", "started"), "mark a task in progress",
            "clare task start 3f2a", (_TASK_REF,)),
    Command(("task", "block"), _cmd_task_status("blocked", "blocked"), "mark a task blocked",
            "clare task block 3f2a", (_TASK_REF,)),
    Command(("task", "done"), _cmd_task_status("done", "done"), "mark a task done",
            "clare task done 3f2a", (_TASK_REF,)),
    Command(("task", "reopen"), _cmd_task_status("todo", "reopened"), "put a task back to todo",
            "clare task reopen 3f2a", (_TASK_REF,)),
    Command(("task", "edit"), cmd_task_edit, "change a task's title, priority, description, tags or waits",
            'clare task edit 3f2a --title "parse v2 files" --prio 0\n  clare task edit 3f2a --tag urgent --untag later'
            '\n  clare task edit 3f2a --after 91bc --no-after 7c1e',
            (_TASK_REF, arg("--title"), arg("--prio", metavar="0-4"), arg("--desc"),
             arg("--tag", action="append", default=[], metavar="TAG", help="add a tag (repeat for more)"),
             arg("--untag", action="append", default=[], metavar="TAG", help="remove a tag (repeat for more)"),
             _AFTER_ARG,
             arg("--no-after", action="append", default=[], metavar="ID",
                 help="no longer wait on this task (id prefix; repeat for more)"))),
    Command(("task", "rm"), cmd_task_rm, "remove a task (it keeps its history; task restore brings it back)",
            "clare task rm 3f2a", (_TASK_REF,)),
    Command(("task", "restore"), cmd_task_restore, "bring a removed task back",
            "clare task restore 3f2a", (_TASK_REF,)),
    Command(("undo",), cmd_undo, "undo this host's last change (by recording its inverse; nothing is deleted)",
            "clare undo --list\n  clare undo",
            (arg("--list", action="store_true", help="only show what undo would take back next, newest first"),
             arg("--limit", type=int, default=10, help="how many changes --list shows (default 10)"))),
    Command(("assign",), cmd_assign, "assign a task to a Claude session or a group",
            "clare assign 3f2a 7c1e9b\n  clare assign 3f2a --group backend",
            (_TASK_REF, arg("session", nargs="?", help="session id or unique prefix"),
             arg("--group", help="group name or id prefix"))),
    Command(("unassign",), cmd_unassign, "end a task's assignment", "clare unassign 3f2a", (_TASK_REF,)),
    Command(("group", "add"), cmd_group_add, "create a group of sessions",
            "clare group add backend --cwd /srv/api\n  clare group add night --host apricot --name 'batch-*'",
            (arg("name"), arg("--cwd", help="substring of the session's working directory"),
             arg("--host", help="machine id of the session's host"),
             arg("--name", dest="tmux_name", help="glob over the tmux session name"))),
    Command(("group", "list"), cmd_group_list, "list groups", "clare group list"),
    Command(("group", "rm"), cmd_group_rm, "remove a group (its tasks become unassigned)",
            "clare group rm backend", (arg("group", help="name or id prefix"),)),
    Command(("update",), cmd_update, "add a progress note to a task (inside a Claude pane: to its task)",
            'clare update "parser done, starting tests"\n  clare update 3f2a "blocked on review"'
            '\n  clare update --done "parser and tests merged"',
            (arg("task", metavar="TASK|TEXT", help="task id or unique prefix; inside a Claude pane just the text"),
             arg("text", nargs="?"),
             arg("--done", action="store_true", help="the note is the summary and the task is done"))),
    Command(("status",), cmd_status, "the roll-up: per project task counts and tokens, per session its task",
            "clare status --project alpha\n  clare status --group backend --json",
            (arg("--project", help="name or id prefix"), arg("--group", help="group name or id prefix"))),
    Command(("sessions",), cmd_sessions, "list sessions, most urgent first (host, tmux, state, task); or show one",
            "clare sessions\n  clare sessions --state waiting\n  clare sessions --all --json"
            "\n  clare sessions show 7c1e9b",
            (arg("verb", nargs="?", choices=("show",), help="show: one session's page as text"),
             arg("session", nargs="?", help="with show: session id or unique prefix"),
             arg("--all", action="store_true", help="also sessions that are gone"),
             arg("--state", choices=SESSION_STATES, help="only sessions in this state"))),
    Command(("approve",), _cmd_answer("approve"), "approve a session's open permission dialog (typed only if "
            "the same dialog is still open)",
            "clare approve 7c1e9b\n  clare approve 7c1e9b --option 2   # e.g. 'Yes, and don't ask again for …'",
            (arg("session", help="session id or unique prefix"),
             arg("--option", type=int, metavar="N", help="pick the dialog's option N instead of Yes"))),
    Command(("deny",), _cmd_answer("deny"), "deny a session's open permission dialog, optionally telling Claude why",
            'clare deny 7c1e9b\n  clare deny 7c1e9b --reason "use make clean instead"',
            (arg("session", help="session id or unique prefix"),
             arg("--reason", help="what Claude should do instead (typed after the dialog closes)"))),
    Command(("session", "start"), cmd_session_start, "start a Claude session for a task in a new tmux window",
            "clare session start 3f2a\n  clare session start 3f2a --host apricot --worktree --model sonnet",
            (_TASK_REF, arg("--host", help="machine id, or a host or peer name only one host has (default: where "
                                           "the project's code is)"),
             arg("--worktree", action="store_true",
                 help="work in a new git worktree and branch clare/<id>-<title> beside the repository"),
             arg("--model", help="the model Claude uses (claude --model)"))),
    Command(("session", "resume"), cmd_session_resume, "resume a gone session in a new tmux window of its host",
            "clare session resume 7c1e9b", (arg("session", help="session id or unique prefix"),)),
    Command(("session", "stop"), cmd_session_stop, "stop a session: /exit while it waits (--force: SIGTERM)",
            "clare session stop 7c1e9b\n  clare session stop 7c1e9b --force",
            (arg("session", help="session id or unique prefix"),
             arg("--force", action="store_true", help="send SIGTERM to Claude even while it works"))),
    Command(("session", "orders"), cmd_session_orders, "list session starts, resumes and stops with their results",
            "clare session orders\n  clare session orders --session 7c1e9b --json",
            (arg("--session", help="only this session's (id or unique prefix)"),)),
    Command(("attach",), cmd_attach, "attach this terminal to a session's tmux pane (over ssh for another host)",
            "clare attach 7c1e9b\n  clare attach 7c1e9b --print",
            (arg("session", help="session id or unique prefix"),
             arg("--print", action="store_true", help="print the command instead of running it"))),
    Command(("pull",), cmd_pull, "look at this host's Claude sessions and record what changed",
            "clare pull\n  clare pull --tails --json",
            (arg("--tails", action="store_true",
                 help="also store each assigned pane's last lines (and [triage] command's note) when changed"),)),
    Command(("broadcast",), cmd_broadcast, "type a text into the Claude sessions of a project, group or session",
            'clare broadcast alpha --yes -- "run the tests and commit"\n  clare broadcast group:backend -- "pull main"'
            '\n  clare broadcast session:7c1e9b --yes --command -- "/compact"',
            (arg("target", help="project name or id, group:NAME or session:ID"),
             arg("text", nargs="+", help="the text (after --); several words are joined by spaces"),
             arg("--yes", action="store_true", help="send without asking (needed without a terminal)"),
             arg("--command", action="store_true",
                 help="let a leading / ! # @ & reach Claude as a command (otherwise it is prefixed)"))),
    Command(("hooks", "install"), cmd_hooks_install, "add Clare's hooks to ~/.claude/settings.json (idempotent)",
            "clare hooks install"),
    Command(("hooks", "uninstall"), cmd_hooks_uninstall, "remove Clare's hooks, keeping the user's own",
            "clare hooks uninstall"),
    Command(("hooks", "status"), cmd_hooks_status, "show which Claude Code hook events run Clare",
            "clare hooks status --json"),
    Command(("hook",), cmd_hook, "what Claude Code runs on a hook event (JSON on stdin; always exits 0)",
            "echo '{\"session_id\": \"…\", \"hook_event_name\": \"Stop\"}' | clare hook"),
    Command(("serve",), cmd_serve, "serve the dashboard and the JSON API (alias: web)",
            "clare serve\n  CLARE_TOKEN=$(cat ~/.clare-token) clare serve --host 0.0.0.0 --port 8765", _SERVE_ARGS),
    Command(("web",), cmd_serve, "the same as serve", "clare web --port 9000", _SERVE_ARGS),
    Command(("peer", "add"), cmd_peer_add, "add a peer to clare.toml (a running serve uses it within two seconds)",
            "clare peer add http://10.9.0.2:8765 --name apricot --token-env APRICOT_TOKEN\n"
            "  clare peer add fig            # a suggested peer: see clare peer list --suggested\n"
            "  clare peer add --all-suggested",
            (arg("url", nargs="?", help="where the peer's 'clare serve' answers, or a suggested peer's name"),
             arg("--name", help="what to call it (default: the name it announced, else from the URL's host)"),
             arg("--token-env", help="environment variable holding its token (default: CLARE_TOKEN)"),
             arg("--all-suggested", action="store_true",
                 help="add every suggested peer that takes this host's token (the others are listed, not added)"))),
    Command(("peer", "rm"), cmd_peer_rm, "remove a peer from clare.toml",
            "clare peer rm apricot\n  clare peer rm http://10.9.0.2:8765 --json",
            (arg("peer", help="the name (or url) of a configured peer"),)),
    Command(("token",), cmd_token, "print this host's API token (to a terminal only)",
            "clare token\n  clare token --json"),
    Command(("peer", "list"), cmd_peer_list,
            "list peers: last sync, events to pull and to push, clock offset, deferred events, last error",
            "clare peer list --json\n  clare peer list --suggested   # hosts announced in the log, not peers yet",
            (arg("--suggested", action="store_true",
                 help="list the hosts that announced themselves in the log and are not peers here yet"),)),
    Command(("sync",), cmd_sync, "sync once with every peer, or one: pull, then push; print what moved",
            "clare sync\n  clare sync apricot\n  clare sync http://10.9.0.2:8765 --verify",
            (arg("peer", nargs="?", help="a configured peer's name or URL, or any peer's URL"),
             arg("--verify", action="store_true",
                 help="also compare per-day digests and fetch or send anything missing (anti-entropy)"))),
    Command(("log",), cmd_log, "print the newest events, newest last: when, which host, what",
            "clare log --limit 20\n  clare log --verbose      # with each event's HLC and type",
            (arg("--limit", type=int, default=50),
             arg("--verbose", "-v", action="store_true", help="also print each event's HLC and type"))),
    Command(("export",), cmd_export, "write the event log as JSON lines",
            "clare export backup.jsonl\n  clare export | gzip > backup.jsonl.gz",
            (arg("file", nargs="?", help="output file; '-' or none for stdout"),)),
    Command(("import",), cmd_import, "add the events of a JSON-lines file (idempotent)",
            "clare import backup.jsonl", (arg("file", help="input file; '-' for stdin"),)),
    Command(("replay",), cmd_replay, "rebuild every projection from the event log", "clare replay"),
    Command(("restore",), cmd_restore, "replace the database by a backup copy of it (new db id)",
            "clare restore ~/backups/clare.db --yes",
            (arg("backup", help="a copy of this host's clare.db"),
             arg("--yes", action="store_true", help="really replace what the database holds now"))),
    Command(("setup",), cmd_setup, "set this host up: database, token, launcher, systemd unit, hooks, peer "
            "(idempotent)",
            "python3 clare.py setup --bind 10.9.0.2\n  python3 clare.py setup --bind 10.9.0.3 --peer "
            "http://10.9.0.2:8765\n  clare setup --dry-run",
            (arg("--bind", default=DEFAULT_HOST, metavar="ADDR",
                 help=f"the address serve listens on, this host's on the peers' network (default {DEFAULT_HOST}: "
                      "no peer can reach it)"),
             arg("--port", type=int, default=DEFAULT_PORT, help=f"its port (default {DEFAULT_PORT})"),
             arg("--peer", metavar="URL", help="a host to sync with, e.g. http://10.9.0.2:8765"),
             arg("--bin", default="~/.local/bin", help="folder for the launcher (default ~/.local/bin)"),
             arg("--dry-run", action="store_true", help="print each step and change nothing"))),
    Command(("doctor",), cmd_doctor, "check this host: unit, bind, token, peers, hooks, tmux, Claude Code, "
            "database, disk", "clare doctor\n  clare doctor --json"),
    Command(("install",), cmd_install, "write a `clare` launcher that starts faster than python3 clare.py",
            "python3 clare.py install          # writes ~/.local/bin/clare\n  clare task list",
            (arg("--bin", default="~/.local/bin", help="folder for the launcher (default ~/.local/bin)"),)),
]


def _skip_missing_translations() -> None:
    """Spare argparse its translation lookups when there is no catalog to find: the text is the answer.

    argparse asks gettext for each of its messages, and gettext searches the locale folders anew
    every time (os.stat per language): ~0.1 ms a message, dozens per command. Where the search
    finds no catalog, each answer would be the message itself, so the output stays the same.
    """
    import gettext

    if gettext.find("messages") is None:
        # identity, not str: argparse asks for _(None) too (a group without a description), and must get None back
        vars(argparse).update(_=lambda message: message,
                              ngettext=lambda singular, plural, n: singular if n == 1 else plural)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Build the argparse tree from COMMANDS: all of it, or only the command that argv names.

    Every leaf costs argparse a quarter of a millisecond, so a run that names a whole
    command builds just that branch; help, errors and anything unrecognised get the full tree.
    """
    wanted = _named_command(argv) if argv is not None else None
    _skip_missing_translations()
    parser = _Parser(
        prog="clare", description="Clare: projects and tasks for a fleet of Claude Code sessions.",
        epilog="example:\n  clare project new alpha --goal 'ship v1'\n  clare task add alpha 'write the parser'"
               "\n  clare pull && clare sessions\n  clare serve"
               "\n\nrun 'clare COMMAND --help' for the options of one command",
        formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"clare {__version__}")
    for flags, options in _GLOBAL_ARGS:
        parser.add_argument(*flags, **options)
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {
        (): parser.add_subparsers(title="commands", metavar="COMMAND")}
    for cmd in COMMANDS:
        if wanted is not None and cmd.path != wanted:
            continue
        for depth in range(1, len(cmd.path)):
            prefix = cmd.path[:depth]
            if prefix not in groups:
                examples = "\n  ".join(c.example.splitlines()[0] for c in COMMANDS if c.path[:depth] == prefix)
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=GROUP_HELP.get(prefix[-1]),
                                                     description=GROUP_HELP.get(prefix[-1]),
                                                     epilog=f"examples:\n  {examples}",
                                                     formatter_class=_HelpFormatter)
                sub.set_defaults(handler=_group_help(sub))
                groups[prefix] = sub.add_subparsers(title="commands", metavar="COMMAND")
        leaf = groups[cmd.path[:-1]].add_parser(
            cmd.path[-1], help=cmd.help, description=cmd.help[:1].upper() + cmd.help[1:] + ".",
            epilog=f"example:\n  {cmd.example}", formatter_class=_HelpFormatter)
        for flags, options in (*cmd.args, *_LEAF_GLOBAL_ARGS):
            leaf.add_argument(*flags, **options)
        leaf.set_defaults(handler=cmd.handler, command_path=cmd.path)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with Clare's error form: one line naming the problem and where the help is."""

    def error(self, message: str) -> Any:
        """Print the problem as one line and exit 2, as argparse does after its usage block."""
        typo = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)\Z", message)
        if typo:  # a mistyped word: name the nearest choice
            import difflib

            what, word, choices = typo[1], typo[2], re.findall(r"'([^']*)'", typo[3])
            near = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
            if what == "COMMAND":  # a verb: the nearest one says more than the list of all of them
                message = f"unknown command {word!r}"
            if near:
                self.exit(2, f"clare: error: {message}; did you mean {near[0]!r}? see: {self.prog} --help\n")
        self.exit(2, f"clare: error: {message}; see: {self.prog} --help\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, sized as argparse sizes it but without importing shutil (2 ms a start)."""

    def __init__(self, prog: str, **options: Any):
        options.setdefault("width", _terminal_columns() - 2)
        super().__init__(prog, **options)


def _terminal_columns() -> int:
    """Return the width shutil.get_terminal_size() would: $COLUMNS, the terminal, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]  # None: caught below
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def _named_command(argv: list[str]) -> tuple[str, ...] | None:
    words = []
    tokens = iter(argv)
    for token in tokens:
        if token in ("--home", "--db", "--remote"):  # the global options that take a value
            next(tokens, None)
        elif token in ("-h", "--help"):
            return None
        elif not token.startswith("-"):
            words.append(token)
    for cmd in COMMANDS:
        if tuple(words[:len(cmd.path)]) == cmd.path:
            return cmd.path
    return None


def _group_help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace, Context], int]:
    def handler(args: argparse.Namespace, ctx: Context) -> int:
        parser.print_help()
        return 2
    return handler


# ==========================================================================
# 10. main: parse, dispatch, and turn errors into one line and an exit code.
# ==========================================================================


def main(argv: list[str] | None = None) -> int:
    """Run one CLI command; return its exit code. Run as a program (no argv given), end the process there."""
    is_program = argv is None  # the __main__ path, the launcher, a hook; tests pass argv and keep running
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    ctx = Context(args)
    try:
        code = _run_command(args, ctx)
    finally:
        ctx.close(is_exiting=is_program)
    if is_program:
        exit_now(code)
    return code


def _run_command(args: argparse.Namespace, ctx: Context) -> int:
    try:
        if ctx.remote_url is not None and getattr(args, "command_path", ()) in LOCAL_COMMANDS:
            raise UsageError(f"clare {' '.join(args.command_path)} works on this host's own files, tmux or "
                             "Claude hooks; run it on that host without --remote (and unset CLARE_URL)")
        return args.handler(args, ctx) or 0
    except ClareError as err:
        print(f"clare: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        sys.stderr.close()  # the reader (head, less) left: not an error
        return 0
    except KeyboardInterrupt:
        print("clare: interrupted; what was committed before Ctrl-C is kept", file=sys.stderr)
        return 130


def exit_now(code: int) -> NoReturn:
    """End a CLI process: flush what it printed, then skip the interpreter's teardown (≈ 5 ms of module GC).

    A thread still running gets the ordinary exit, which waits for it.
    """
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the reader left (a closed pipe), or main closed stderr for it
            pass
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
