#!/usr/bin/env python3
"""Clare: project management for a fleet of Claude Code sessions.

Projects hold tasks; tasks are assigned to Claude sessions (or groups of them);
every change is an event in an append-only SQLite log, and the tables a user sees
are projections rebuilt from that log. Hosts exchange the events they miss and
converge to the same state.

    python3 clare.py --help

Sections (each uses only the ones above it):
    1. Constants and errors
    2. HLC
    3. Event store
    4. Projections
    5. Services
    6. Fleet
    7. Sync
    8. HTTP
    9. CLI
    10. main
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__version__ = "0.1.0"


# ==========================================================================
# 1. Constants and errors: the vocabulary, the limits, the error family, paths.
# ==========================================================================

PROJECT_STATUSES = ("active", "paused", "done")
TASK_STATUSES = ("todo", "in_progress", "blocked", "done")
PRIORITIES = range(0, 5)  # 0 is the most urgent, as in P0
DEFAULT_PRIORITY = 2
MAX_NAME_CHARS = 100
MAX_TITLE_CHARS = 300
MAX_TEXT_CHARS = 20_000  # descriptions, goals, update texts
MAX_PAYLOAD_BYTES = 64 * 1024  # one event's JSON payload, as stored
ID_PREFIX_RE = re.compile(r"\A[0-9a-f][0-9a-f-]*\Z")
SHORT_ID = 8  # characters of an id shown to people


class ClareError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    exit_code, http_status = 1, 400


class UsageError(ClareError):
    exit_code = 2


class NotFound(ClareError):
    http_status = 404


class Conflict(ClareError):
    http_status = 409


class Forbidden(ClareError):
    http_status = 403


@dataclass(frozen=True, slots=True)
class Paths:
    db: str  # the SQLite file that holds the log and its projections
    config: str  # clare.toml


def resolve_paths(*, home: str | None = None, db: str | None = None,
                  env: dict[str, str] | None = None) -> Paths:
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
    """Read clare.toml; a missing file is an empty config."""
    import tomllib  # only the verbs that need settings pay for it

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as err:
        raise ClareError(f"{path}: {err}; fix the TOML syntax there") from err


def now_ms() -> int:
    """Return the wall clock in integer milliseconds."""
    return time.time_ns() // 1_000_000


def iso_ms(ms: int) -> str:
    """Format epoch milliseconds as ISO-8601 UTC text with a Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def new_id() -> str:
    """Return a fresh random id: 32 lowercase hex digits (a uuid4 without dashes)."""
    return new_uuid().replace("-", "")


def new_uuid() -> str:
    """Return a fresh random uuid4 as text."""
    import uuid  # loads `platform` too (2 ms): commands that only read never pay for it

    return str(uuid.uuid4())


# ==========================================================================
# 2. HLC: hybrid logical clock values, their text form, tick and merge.
# ==========================================================================

MACHINE_ID_RE = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
HLC_RE = re.compile(r"\A(\d{13})\.(\d{6})\.([a-z0-9][a-z0-9_-]{0,62})\Z")
MAX_COUNTER = 999_999
MAX_WALL_MS = 10**13 - 1
MAX_OFFSET_MS = 5 * 60 * 1000  # how far a peer's clock may pull ours ahead of our wall clock


@dataclass(frozen=True, slots=True, order=True)
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


def default_machine_id() -> str:
    """Derive a machine id from the host name: its first label, lowercased, cleaned."""
    label = os.uname().nodename.split(".")[0].lower()
    label = re.sub(r"[^a-z0-9_-]+", "-", label).strip("-_")[:63]
    return label or "host-" + new_id()[:8]


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

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another before giving up
EVENT_TYPE_RE = re.compile(r"\A[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+\Z")
UUID_RE = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class InsertResult:
    inserted: list[Event]  # new to this host, in the order given
    n_duplicates: int  # already here, same content
    conflicts: list[str]  # uuids already here with different content (the stored one is kept)


class Db:
    """One SQLite connection with the identity of the log it holds."""

    __slots__ = ("conn", "path", "machine_id", "db_id")

    def __init__(self, conn: sqlite3.Connection, path: str, machine_id: str, db_id: str):
        self.conn = conn  # autocommit mode: write_txn() opens every write transaction
        self.path = path
        self.machine_id = machine_id  # stamps every event made here
        self.db_id = db_id  # changes when the file is reset, so peers restart their cursors

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


_MIGRATIONS: dict[int, list[str]] = {}  # version -> SQL scripts; filled by sections 3-4 below


def open_db(path: str, *, machine_id: str | None = None) -> Db:
    """Open (creating if needed) the Clare database at `path` and bring its schema up to date."""
    if path != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.row_factory = sqlite3.Row
        meta = _read_meta(conn)
        if meta.get("schema_version") != str(SCHEMA_VERSION) or "machine_id" not in meta:
            meta = _migrate(conn, meta, machine_id=machine_id)
    except sqlite3.DatabaseError as err:
        raise ClareError(f"cannot open database {path}: {err}; check the path, or move a damaged "
                         "file aside and restore it from a peer with 'clare sync'") from err
    return Db(conn, path, meta["machine_id"], meta["db_id"])


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
            for script in _MIGRATIONS[v]:
                for statement in script.split(";\n"):
                    if statement.strip():
                        conn.execute(statement)
        fresh = {"schema_version": str(SCHEMA_VERSION),
                 "machine_id": meta.get("machine_id") or check_machine_id(machine_id or default_machine_id()),
                 "db_id": meta.get("db_id") or new_uuid()}
        conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", fresh.items())
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return {**meta, **fresh}


_MIGRATIONS[1] = [EVENTS_SCHEMA]


@contextlib.contextmanager
def write_txn(db: Db) -> Iterator[sqlite3.Cursor]:
    """Run the block in one BEGIN IMMEDIATE transaction: all of it is stored, or none."""
    cur = db.conn.cursor()
    try:
        cur.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as err:
        raise ClareError(f"database {db.path} is busy ({err}); another Clare holds it too long, "
                         "try again") from err
    try:
        yield cur
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")


def get_meta(cur: sqlite3.Cursor, key: str) -> str | None:
    """Return one value of the meta table."""
    row = cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(cur: sqlite3.Cursor, key: str, value: str) -> None:
    """Store one value in the meta table."""
    cur.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


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
    import hashlib  # loads OpenSSL (2 ms): commands that only read never pay for it

    return hashlib.sha256(text.encode()).hexdigest()


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
    if len(obj["created_at"]) > 40:
        raise ClareError("event created_at is longer than 40 characters")
    if len(canonical_json(obj["payload"]).encode()) > MAX_PAYLOAD_BYTES:
        raise ClareError(f"event payload is over {MAX_PAYLOAD_BYTES} bytes")
    return Event(obj["uuid"], obj["hlc"], obj["machine_id"], obj["event_type"], obj["payload"],
                 obj["created_at"])


def insert_events(cur: sqlite3.Cursor, events: Iterable[Event]) -> InsertResult:
    """Store events not yet here (by uuid); report duplicates and same-uuid conflicts. In a txn."""
    inserted, conflicts, n_duplicates = [], [], 0
    for ev in events:
        payload_text = canonical_json(ev.payload)
        digest = event_hash(ev, payload_text)
        cur.execute(
            """INSERT OR IGNORE INTO events (uuid, hlc, machine_id, event_type, payload, created_at, hash)
               VALUES (?, ?, ?, ?, ?, ?, ?)""",
            (ev.uuid, ev.hlc, ev.machine_id, ev.event_type, payload_text, ev.created_at, digest))
        if cur.rowcount == 1:
            inserted.append(Event(ev.uuid, ev.hlc, ev.machine_id, ev.event_type, ev.payload, ev.created_at,
                                  cur.lastrowid))  # dataclasses.replace costs 3x as much
        elif cur.execute("SELECT hash FROM events WHERE uuid = ?", (ev.uuid,)).fetchone()[0] == digest:
            n_duplicates += 1
        else:
            conflicts.append(ev.uuid)
    return InsertResult(inserted, n_duplicates, conflicts)


def _event_from_row(row: Sequence[Any]) -> Event:
    rseq, uuid_, hlc, machine_id, event_type, payload, created_at = row  # as in _EVENT_COLUMNS
    return Event(uuid_, hlc, machine_id, event_type, json.loads(payload), created_at, rseq)


_EVENT_COLUMNS = "rseq, uuid, hlc, machine_id, event_type, payload, created_at"


def list_events(db: Db, *, limit: int = 50) -> list[Event]:
    """Return the newest `limit` events in (hlc, uuid) order, newest last."""
    rows = db.conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY hlc DESC, uuid DESC LIMIT ?", (limit,)).fetchall()
    return [_event_from_row(r) for r in reversed(rows)]


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


def get_events_by_uuid(db: Db, uuids: Iterable[str]) -> list[Event]:
    """Return the stored events among `uuids`, in (hlc, uuid) order."""
    wanted = list(uuids)
    found = []
    for i in range(0, len(wanted), 500):  # stay under SQLite's host-parameter limit
        chunk = wanted[i:i + 500]
        found += db.conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE uuid IN ({','.join('?' * len(chunk))})", chunk)
    return sorted(map(_event_from_row, found), key=lambda e: (e.hlc, e.uuid))


def count_events(db: Db) -> int:
    """Return how many events the log holds."""
    return db.conn.execute("SELECT count(*) FROM events").fetchone()[0]


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
PROJECTION_TABLES = ("projects", "tasks", "groups", "updates", "event_refs")
REF_KEYS = ("project_id", "task_id", "session_id", "group_id")
UPDATE_SOURCES = ("message", "pane-tail", "triage", "hook")

_MIGRATIONS[1].append(PROJECTIONS_SCHEMA)


@dataclass(frozen=True, slots=True)
class Project:
    id: str
    name: str
    goal: str
    owner: str
    status: str
    created_at: str
    task_counts: dict[str, int]  # status -> number of tasks

    def to_json(self) -> dict[str, Any]:
        """Return the project as the JSON object the CLI and API print."""
        return _as_json(self)


@dataclass(frozen=True, slots=True)
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

    def to_json(self) -> dict[str, Any]:
        """Return the task as the JSON object the CLI and API print."""
        return _as_json(self)


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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


def _as_json(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


APPLIERS: dict[str, Callable[[sqlite3.Cursor, Event], None]] = {}
PAYLOADS: dict[str, dict[str, Callable[[Any], bool]]] = {}  # event type -> field -> check; "name?" is optional


def applies(event_type: str, payload: dict[str, Callable[[Any], bool]]) -> Callable:
    """Register the decorated function as the applier of one event type with its payload's form."""
    def register(fn: Callable[[sqlite3.Cursor, Event], None]) -> Callable:
        APPLIERS[event_type] = fn
        PAYLOADS[event_type] = payload
        return fn
    return register


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= MAX_TEXT_CHARS


def _is_id(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 64


def _is_opt_str(v: Any) -> bool:
    return v is None or _is_str(v)


def _is_opt_id(v: Any) -> bool:
    return v is None or _is_id(v)


def _is_priority(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v in PRIORITIES


def _is_one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in choices


def check_payload(ev: Event) -> Event:
    """Check the payload of a known event type field by field; unknown types pass (a newer Clare)."""
    for key, check in PAYLOADS.get(ev.event_type, {}).items():
        name = key.rstrip("?")
        if name not in ev.payload:
            if key.endswith("?"):
                continue
            raise ClareError(f"{ev.event_type} payload lacks {name}")
        if not check(ev.payload[name]):
            raise ClareError(f"{ev.event_type} payload has a bad {name}: {str(ev.payload[name])[:60]!r}")
    return ev


def check_received(obj: object) -> Event:
    """Validate an event from outside (file, peer): its form and, for a known type, its payload."""
    return check_payload(check_event(obj))


def apply_event(cur: sqlite3.Cursor, ev: Event) -> None:
    """Fold one stored event into the projections; unknown types only get history refs."""
    for key in REF_KEYS:  # replay() does the same in bulk: keep the two rules alike
        ref = ev.payload.get(key)
        if isinstance(ref, str):
            cur.execute("INSERT OR IGNORE INTO event_refs (entity_id, hlc, uuid) VALUES (?, ?, ?)",
                        (ref, ev.hlc, ev.uuid))
    applier = APPLIERS.get(ev.event_type)
    if applier is not None:
        applier(cur, ev)


def record(db: Db, cur: sqlite3.Cursor, event_type: str, payload: dict[str, Any], *, now_ms: int) -> Event:
    """Append a new local event and apply it. Call inside write_txn."""
    ev = make_event(db, cur, event_type, payload, now_ms=now_ms)
    apply_event(cur, check_payload(ev))
    return ev


def receive_events(db: Db, cur: sqlite3.Cursor, events: list[Event], *, now_ms: int) -> InsertResult:
    """Store events made elsewhere, merge the clock once, apply the new ones. Call inside write_txn."""
    result = insert_events(cur, events)
    if result.inserted:
        newest = parse_hlc(max(ev.hlc for ev in result.inserted))  # the text sorts like the clock
        clock = load_clock(cur, machine_id=db.machine_id, now_ms=now_ms)
        save_clock(cur, merge(clock, newest, machine_id=db.machine_id, now_ms=now_ms))
        for ev in result.inserted:
            apply_event(cur, ev)
    return result


def replay(db: Db) -> int:
    """Rebuild every projection from the log; return how many events were applied."""
    n_events = 0
    with write_txn(db) as cur:
        for table in PROJECTION_TABLES:
            cur.execute(f"DELETE FROM {table}")
        # apply_event's history refs, for all events at once: in C, and in index order.
        for key in REF_KEYS:
            cur.execute(f"""INSERT OR IGNORE INTO event_refs (entity_id, hlc, uuid)
                            SELECT json_extract(payload, '$.{key}'), hlc, uuid FROM events
                             WHERE json_type(payload, '$.{key}') = 'text' ORDER BY 1, 2, 3""")
        appliers = APPLIERS
        for ev in iter_events(db, batch=5000):
            applier = appliers.get(ev.event_type)
            if applier is not None:
                applier(cur, ev)
            n_events += 1
    return n_events


_LWW_SQL: dict[tuple[str, tuple[str, ...]], str] = {}


def _lww(cur: sqlite3.Cursor, table: str, row_id: str, fields: dict[str, Any], ev: Event) -> None:
    """Set each field of one row whose stored version is older than this event's; create the row."""
    names = tuple(fields)
    sql = _LWW_SQL.get((table, names))
    if sql is None:
        cols = "".join(f", {n}, {n}_v" for n in names)
        sets = ", ".join(f"{n} = CASE WHEN {n}_v IS NULL OR {n}_v < excluded.{n}_v "
                         f"THEN excluded.{n} ELSE {n} END, {n}_v = max(coalesce({n}_v, ''), excluded.{n}_v)"
                         for n in names)
        sql = (f"INSERT INTO {table} (id{cols}) VALUES (?{', ?, ?' * len(names)}) "
               f"ON CONFLICT (id) DO UPDATE SET {sets}")
        _LWW_SQL[(table, names)] = sql
    version = f"{ev.hlc} {ev.uuid}"
    params = [row_id]
    for value in fields.values():
        params += (value, version)
    cur.execute(sql, params)


def _pick(payload: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {n: payload[n] for n in names if n in payload}


@applies("project.created", {"project_id": _is_id, "name": _is_str, "goal": _is_str, "owner": _is_str,
                             "status": _is_one_of(PROJECT_STATUSES)})
def apply_project_created(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid); the create sets every field."""
    p = ev.payload  # {project_id, name, goal, owner, status}
    _lww(cur, "projects", p["project_id"],
         {"created_at": ev.created_at, **_pick(p, ("name", "goal", "owner", "status"))}, ev)


@applies("project.updated", {"project_id": _is_id, "name?": _is_str, "goal?": _is_str, "owner?": _is_str,
                             "status?": _is_one_of(PROJECT_STATUSES)})
def apply_project_updated(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid): a late old edit never overwrites a newer one."""
    p = ev.payload  # {project_id, name?, goal?, owner?, status?}
    fields = _pick(p, ("name", "goal", "owner", "status"))
    if fields:
        _lww(cur, "projects", p["project_id"], fields, ev)


@applies("task.created", {"task_id": _is_id, "project_id": _is_id, "title": _is_str, "description": _is_str,
                          "priority": _is_priority, "status": _is_one_of(TASK_STATUSES)})
def apply_task_created(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid); the create sets every field."""
    p = ev.payload  # {task_id, project_id, title, description, priority, status}
    _lww(cur, "tasks", p["task_id"], {
        "created_at": ev.created_at,
        **_pick(p, ("project_id", "title", "description", "priority", "status"))}, ev)


@applies("task.updated", {"task_id": _is_id, "title?": _is_str, "description?": _is_str,
                          "priority?": _is_priority, "status?": _is_one_of(TASK_STATUSES)})
def apply_task_updated(cur: sqlite3.Cursor, ev: Event) -> None:
    """Per-field last writer wins, by (hlc, uuid): a title edit and a status change both survive."""
    p = ev.payload  # {task_id, title?, description?, priority?, status?}
    fields = _pick(p, ("title", "description", "priority", "status"))
    if fields:
        _lww(cur, "tasks", p["task_id"], fields, ev)


@applies("task.assigned", {"task_id": _is_id, "session_id?": _is_opt_id, "group_id?": _is_opt_id})
def apply_task_assigned(cur: sqlite3.Cursor, ev: Event) -> None:
    """Last writer wins per task, by (hlc, uuid): a late old event never overwrites."""
    p = ev.payload  # {task_id, session_id | group_id}
    target = f"session:{p['session_id']}" if p.get("session_id") else f"group:{p.get('group_id')}"
    _lww(cur, "tasks", p["task_id"], {"assignee": target}, ev)


@applies("task.unassigned", {"task_id": _is_id})
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


@applies("group.removed", {"group_id": _is_id})
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


_PROJECT_SELECT = """
SELECT p.id, p.name, p.goal, p.owner, p.status, p.created_at,
       (SELECT json_group_object(status, n) FROM
           (SELECT t.status, count(*) AS n FROM tasks t
             WHERE t.project_id = p.id AND t.created_at_v IS NOT NULL GROUP BY t.status)) AS counts
  FROM projects p
 WHERE p.created_at_v IS NOT NULL"""


def _project_from_row(row: sqlite3.Row) -> Project:
    counts = dict.fromkeys(TASK_STATUSES, 0) | json.loads(row["counts"] or "{}")
    return Project(row["id"], row["name"], row["goal"], row["owner"], row["status"], row["created_at"], counts)


def list_projects(db: Db, *, status: str | None = None) -> list[Project]:
    """Return the projects, by name (then id), optionally of one status."""
    sql, params = _PROJECT_SELECT, []
    if status:
        sql += " AND p.status = ?"
        params.append(status)
    rows = db.conn.execute(sql + " ORDER BY p.name, p.id", params).fetchall()
    return [_project_from_row(r) for r in rows]


def find_projects(db: Db, ref: str) -> list[Project]:
    """Return the projects named `ref`, or else those whose id starts with `ref`."""
    rows = db.conn.execute(_PROJECT_SELECT + " AND p.name = ? ORDER BY p.id", (ref,)).fetchall()
    if not rows and ID_PREFIX_RE.match(ref):
        rows = db.conn.execute(_PROJECT_SELECT + " AND p.id >= ? AND p.id < ? ORDER BY p.id LIMIT 10",
                               (ref, ref + "~")).fetchall()
    return [_project_from_row(r) for r in rows]


_TASK_SELECT = """
SELECT t.id, t.project_id, coalesce(p.name, '') AS project, t.title, t.description, t.status,
       t.priority, t.created_at, t.assignee
  FROM tasks t LEFT JOIN projects p ON p.id = t.project_id
 WHERE t.created_at_v IS NOT NULL"""


def _task_from_row(row: sqlite3.Row) -> Task:
    kind, _, target = (row["assignee"] or "").partition(":")
    return Task(row["id"], row["project_id"], row["project"], row["title"], row["description"],
                row["status"], row["priority"], row["created_at"],
                target if kind == "session" else None, target if kind == "group" else None)


def list_tasks(db: Db, *, project_id: str | None = None, status: str | None = None,
               session_id: str | None = None, group_id: str | None = None) -> list[Task]:
    """Return tasks, most urgent first, filtered by project, status or assignee."""
    sql, params = _TASK_SELECT, []
    if project_id:
        sql += " AND t.project_id = ?"
        params.append(project_id)
    if status:
        sql += " AND t.status = ?"
        params.append(status)
    if session_id or group_id:
        sql += " AND t.assignee = ?"
        params.append(f"session:{session_id}" if session_id else f"group:{group_id}")
    rows = db.conn.execute(sql + " ORDER BY t.priority, t.created_at_v", params).fetchall()
    return [_task_from_row(r) for r in rows]


def find_tasks(db: Db, prefix: str) -> list[Task]:
    """Return the tasks whose id starts with `prefix` (at most 10)."""
    rows = db.conn.execute(_TASK_SELECT + " AND t.id >= ? AND t.id < ? ORDER BY t.id LIMIT 10",
                           (prefix, prefix + "~")).fetchall()
    return [_task_from_row(r) for r in rows]


def list_assigned_tasks(db: Db) -> list[Task]:
    """Return every task that is assigned to a session or a group."""
    rows = db.conn.execute(_TASK_SELECT + " AND t.assignee IS NOT NULL ORDER BY t.priority, t.created_at_v")
    return [_task_from_row(r) for r in rows]


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


def list_history(db: Db, entity_ids: list[str], *, limit: int = 200) -> list[Event]:
    """Return the newest events that name any of these entities, oldest first."""
    marks = ",".join("?" * len(entity_ids))
    rows = db.conn.execute(
        f"""SELECT {', '.join('e.' + c for c in _EVENT_COLUMNS.split(', '))} FROM events e
             WHERE e.uuid IN (SELECT uuid FROM event_refs WHERE entity_id IN ({marks}))
             ORDER BY e.hlc DESC, e.uuid DESC LIMIT ?""", [*entity_ids, limit]).fetchall()
    return [_event_from_row(r) for r in reversed(rows)]


def projection_digest(db: Db) -> dict[str, list[tuple]]:
    """Return every projection table's rows, sorted: what 'the same state' means in tests and sync checks."""
    return {t: sorted(tuple(r) for r in db.conn.execute(f"SELECT * FROM {t}")) for t in PROJECTION_TABLES}


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


def _check_prefix(what: str, ref: object) -> str:
    if not isinstance(ref, str) or not ID_PREFIX_RE.match(ref):
        raise UsageError(f"{what} id {ref!r} is not a hex id or prefix; copy one from the list")
    return ref


def _one(what: str, ref: str, found: list, list_cmd: str) -> Any:
    """Return the single match, or raise naming the candidates or how to find one."""
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotFound(f"no {what} {ref!r}; list them with: {list_cmd}")
    ids = ", ".join(f"{x.id[:SHORT_ID + 4]}" + (f" ({x.name})" if hasattr(x, "name") else f" ({x.title})")
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
    return _one("group", ref, find_groups(db, ref), "clare group list")


def create_project(db: Db, name: str, *, goal: str = "", owner: str = "", now_ms: int) -> Project:
    """Create a project; its name must not be taken here."""
    name = _check_name(name)
    goal = _check_text("goal", goal, limit=MAX_TEXT_CHARS)
    owner = _check_text("owner", owner, limit=MAX_NAME_CHARS)
    project_id = new_id()
    with write_txn(db) as cur:
        _check_name_free(db, name)
        record(db, cur, "project.created", {"project_id": project_id, "name": name, "goal": goal,
                                            "owner": owner, "status": "active"}, now_ms=now_ms)
    return get_project(db, project_id)


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
                 owner: str | None = None, status: str | None = None, now_ms: int) -> Project:
    """Change some fields of a project; fields equal to the current value are not recorded."""
    changes: dict[str, Any] = {}
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
        changes = {k: v for k, v in changes.items() if getattr(project, k) != v}
        if "name" in changes:
            _check_name_free(db, changes["name"])
        if changes:
            record(db, cur, "project.updated", {"project_id": project.id, **changes}, now_ms=now_ms)
    return get_project(db, project.id)


def create_task(db: Db, project_ref: str, title: str, *, priority: int = DEFAULT_PRIORITY,
                description: str = "", now_ms: int) -> Task:
    """Add a task to a project, status todo."""
    title = _check_text("title", title, limit=MAX_TITLE_CHARS, required=True)
    description = _check_text("description", description, limit=MAX_TEXT_CHARS)
    priority = _check_priority(priority)
    task_id = new_id()
    with write_txn(db) as cur:
        project = get_project(db, project_ref)
        record(db, cur, "task.created", {"task_id": task_id, "project_id": project.id, "title": title,
                                         "description": description, "priority": priority,
                                         "status": "todo"}, now_ms=now_ms)
    return get_task(db, task_id)


def edit_task(db: Db, ref: str, *, title: str | None = None, description: str | None = None,
              priority: int | None = None, status: str | None = None, now_ms: int) -> Task:
    """Change some fields of a task; fields equal to the current value are not recorded."""
    changes: dict[str, Any] = {}
    if title is not None:
        changes["title"] = _check_text("title", title, limit=MAX_TITLE_CHARS, required=True)
    if description is not None:
        changes["description"] = _check_text("description", description, limit=MAX_TEXT_CHARS)
    if priority is not None:
        changes["priority"] = _check_priority(priority)
    if status is not None:
        changes["status"] = _check_choice("task status", status, TASK_STATUSES)
    with write_txn(db) as cur:
        task = get_task(db, ref)
        changes = {k: v for k, v in changes.items() if getattr(task, k) != v}
        if changes:
            record(db, cur, "task.updated", {"task_id": task.id, **changes}, now_ms=now_ms)
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
        target = ({"session_id": session_id} if session_id is not None
                  else {"group_id": get_group(db, group_ref).id})
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
        record(db, cur, "group.removed", {"group_id": group.id}, now_ms=now_ms)
        for task in list_tasks(db, group_id=group.id):
            record(db, cur, "task.unassigned", {"task_id": task.id}, now_ms=now_ms)
    return group


def post_update(db: Db, text: str, *, task_ref: str | None = None, session_id: str | None = None,
                source: str = "message", now_ms: int) -> Update:
    """Add a progress note (or pane tail, triage, hook note) to a task and/or a session."""
    text = _check_text("update text", text, limit=MAX_TEXT_CHARS, required=True)
    source = _check_choice("update source", source, UPDATE_SOURCES)
    if task_ref is None and session_id is None:
        raise UsageError("an update needs a task (clare update TASK TEXT) or must run inside a session's pane")
    update_id = new_id()
    with write_txn(db) as cur:
        task_id = get_task(db, task_ref).id if task_ref is not None else None
        record(db, cur, "update.posted", {"update_id": update_id, "task_id": task_id, "session_id": session_id,
                                          "source": source, "text": text}, now_ms=now_ms)
    return list_updates(db, update_id=update_id)[0]


def import_events(db: Db, lines: Iterable[str], *, now_ms: int) -> tuple[InsertResult, list[str]]:
    """Store the events of JSON lines not yet here; return the result and one reason per bad line."""
    good, bad = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            good.append(check_received(json.loads(line)))
        except (ClareError, ValueError) as err:
            bad.append(f"line {n}: {err}")
    with write_txn(db) as cur:
        result = receive_events(db, cur, good, now_ms=now_ms)
    return result, bad


def project_history(db: Db, project: Project, *, limit: int = 200) -> list[Event]:
    """Return the events about a project and its tasks, oldest first."""
    ids = [project.id] + [t.id for t in list_tasks(db, project_id=project.id)]
    return list_history(db, ids, limit=limit)


def describe_event(ev: Event) -> str:
    """Return one line saying what an event did, for people."""
    describe = DESCRIBE.get(ev.event_type)
    if describe is None:
        return f"{ev.event_type} (not known to this version)"
    try:
        return describe(ev.payload)
    except (KeyError, TypeError, ValueError):
        return f"{ev.event_type} (malformed payload)"


def _fields(p: dict[str, Any], skip: str) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in p.items() if k != skip)


DESCRIBE.update({
    "project.created": lambda p: f"created project {p['name']!r}",
    "project.updated": lambda p: f"changed project: {_fields(p, 'project_id')}",
    "task.created": lambda p: f"added task {p['task_id'][:SHORT_ID]} {p['title']!r} (P{p['priority']})",
    "task.updated": lambda p: f"changed task {p['task_id'][:SHORT_ID]}: {_fields(p, 'task_id')}",
    "task.assigned": lambda p: f"assigned task {p['task_id'][:SHORT_ID]} to "
                               + (f"session {p['session_id'][:SHORT_ID]}" if p.get("session_id")
                                  else f"group {p['group_id'][:SHORT_ID]}"),
    "task.unassigned": lambda p: f"unassigned task {p['task_id'][:SHORT_ID]}",
    "group.created": lambda p: f"created group {p['name']!r}",
    "group.removed": lambda p: f"removed group {p['group_id'][:SHORT_ID]}",
    "update.posted": lambda p: f"{p['source']} update" + (f" on task {p['task_id'][:SHORT_ID]}"
                                                         if p.get("task_id") else "") + f": {p['text'][:80]}",
})


class Services:
    """The services and queries bound to one database and the wall clock: what the CLI calls.

    A remote Clare offers the same names over HTTP, so a CLI handler never knows which it has.
    """

    __slots__ = ("db",)

    def __init__(self, db: Db):
        self.db = db

    def __getattr__(self, name: str) -> Callable:
        try:
            fn = SERVICES[name]
        except KeyError:
            raise AttributeError(name) from None
        code = fn.__code__
        if "now_ms" in code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]:
            return lambda *args, **kw: fn(self.db, *args, now_ms=now_ms(), **kw)
        return lambda *args, **kw: fn(self.db, *args, **kw)


SERVICES: dict[str, Callable] = {fn.__name__: fn for fn in (
    create_project, edit_project, get_project, list_projects, project_history,
    create_task, edit_task, get_task, list_tasks, assign_task, unassign_task,
    create_group, remove_group, get_group, list_groups,
    post_update, list_updates, list_history, list_events, import_events, replay, count_events,
)}


# ==========================================================================
# 6. Fleet: Claude Code sessions in tmux panes, their state, hooks, broadcast delivery.
# ==========================================================================


# ==========================================================================
# 7. Sync: the peer protocol, cursors per peer, and the client that pulls and pushes.
# ==========================================================================


# ==========================================================================
# 8. HTTP: routing table, HTML templates, JSON API and sync endpoints.
# ==========================================================================


# ==========================================================================
# 9. CLI: the argparse tree built from COMMANDS, handlers and text output.
# ==========================================================================

STATUS_LABEL = {"todo": "todo", "in_progress": "in progress", "blocked": "blocked", "done": "done"}


@dataclass(frozen=True, slots=True)
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
        self._db: Db | None = None

    @property
    def db(self) -> Db:
        """Open the local database (creating it on first use)."""
        if self._db is None:
            self._db = open_db(self.paths.db)
        return self._db

    @property
    def svc(self) -> Services:
        """Return the services this command runs against."""
        return Services(self.db)

    def close(self) -> None:
        """Close what was opened."""
        if self._db is not None:
            self._db.close()


def emit(ctx: Context, value: Any, text: str | Callable[[], str]) -> None:
    """Print `value` as JSON with --json, else the text (or what the callable returns)."""
    if ctx.as_json:
        print(json.dumps(_jsonable(value), ensure_ascii=False, indent=None if isinstance(value, list) else 2))
    else:
        out = text() if callable(text) else text
        if out:
            print(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def table(headers: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> str:
    """Return rows as aligned columns under a header; the last column is never padded."""
    rows = [tuple("" if c is None else str(c) for c in r) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [headers, *rows]]
    return "\n".join(lines)


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _when(created_at: str) -> str:
    return created_at[:19].replace("T", " ")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(s, 0)} {STATUS_LABEL[s]}" for s in TASK_STATUSES)


def _assignee(task: Task) -> str:
    if task.session_id:
        return f"session {task.session_id[:SHORT_ID]}"
    if task.group_id:
        return f"group {task.group_id[:SHORT_ID]}"
    return ""


def format_tasks(tasks: list[Task], *, with_project: bool = True) -> str:
    """Return a task table, or a line saying there are none."""
    if not tasks:
        return "no tasks"
    headers = ("ID", "PRI", "STATUS", *(("PROJECT",) if with_project else ()), "ASSIGNED", "TITLE")
    return table(headers, ((t.id[:SHORT_ID], f"P{t.priority}", STATUS_LABEL[t.status],
                            *((_short(t.project, 20),) if with_project else ()), _assignee(t),
                            _short(t.title, 70)) for t in tasks))


def format_history(events: list[Event]) -> str:
    """Return one line per event: when, where, what."""
    if not events:
        return "no history"
    return "\n".join(f"{_when(ev.created_at)}  {ev.machine_id:<12}  {describe_event(ev)}" for ev in events)


def cmd_init(args: argparse.Namespace, ctx: Context) -> None:
    """Create the database (idempotent); report its identity."""
    if args.machine_id:
        check_machine_id(args.machine_id)
    existed = os.path.exists(ctx.paths.db)
    db = open_db(ctx.paths.db, machine_id=args.machine_id)
    ctx._db = db
    if args.machine_id and db.machine_id != args.machine_id:
        raise Conflict(f"{db.path} already has machine id {db.machine_id!r}; a database keeps its machine id "
                       "(use another --home for another one)")
    info = {"db": db.path, "machine_id": db.machine_id, "db_id": db.db_id, "created": not existed}
    emit(ctx, info, f"{'initialized' if not existed else 'already initialized'} {db.path}\n"
                    f"machine id {db.machine_id}, db id {db.db_id}")


def cmd_project_new(args: argparse.Namespace, ctx: Context) -> None:
    """Create a project."""
    p = ctx.svc.create_project(args.name, goal=args.goal, owner=args.owner)
    emit(ctx, p, f"created project {p.name} ({p.id[:SHORT_ID]})")


def cmd_project_list(args: argparse.Namespace, ctx: Context) -> None:
    """List projects with their task counts."""
    projects = ctx.svc.list_projects(status=args.status)
    emit(ctx, projects, lambda: table(
        ("ID", "NAME", "STATUS", "TODO", "DOING", "BLOCKED", "DONE", "OWNER", "GOAL"),
        ((p.id[:SHORT_ID], p.name, p.status, *(p.task_counts[s] for s in TASK_STATUSES), p.owner,
          _short(p.goal, 50)) for p in projects)) if projects else "no projects; create one with: clare project new NAME")


def cmd_project_show(args: argparse.Namespace, ctx: Context) -> None:
    """Show one project, its tasks and, with --history, what happened to it."""
    p = ctx.svc.get_project(args.project)
    tasks = ctx.svc.list_tasks(project_id=p.id)
    history = ctx.svc.project_history(p) if args.history else None
    value = {**p.to_json(), "tasks": tasks, **({"history": history} if history is not None else {})}

    def text() -> str:
        lines = [f"{p.name}  ({p.id})  {p.status}", f"goal:  {p.goal or '-'}", f"owner: {p.owner or '-'}",
                 f"tasks: {_counts(p.task_counts)}", "", format_tasks(tasks, with_project=False)]
        if history is not None:
            lines += ["", "history:", format_history(history)]
        return "\n".join(lines)
    emit(ctx, value, text)


def cmd_project_set(args: argparse.Namespace, ctx: Context) -> None:
    """Change a project's name, goal, owner or status."""
    p = ctx.svc.edit_project(args.project, name=args.name, goal=args.goal, owner=args.owner, status=args.status)
    emit(ctx, p, f"project {p.name} ({p.id[:SHORT_ID]}): {p.status}, owner {p.owner or '-'}, goal {p.goal or '-'}")


def cmd_task_add(args: argparse.Namespace, ctx: Context) -> None:
    """Add a task to a project."""
    t = ctx.svc.create_task(args.project, args.title, priority=args.prio, description=args.desc)
    emit(ctx, t, f"added task {t.id[:SHORT_ID]} to {t.project}: {t.title} (P{t.priority})")


def cmd_task_list(args: argparse.Namespace, ctx: Context) -> None:
    """List tasks, most urgent first."""
    project_id = ctx.svc.get_project(args.project).id if args.project else None
    tasks = ctx.svc.list_tasks(project_id=project_id, status=args.status)
    emit(ctx, tasks, lambda: format_tasks(tasks, with_project=not args.project))


def cmd_task_show(args: argparse.Namespace, ctx: Context) -> None:
    """Show one task with its updates and history."""
    t = ctx.svc.get_task(args.task)
    updates = ctx.svc.list_updates(task_ids=[t.id])
    history = ctx.svc.list_history([t.id])
    value = {**t.to_json(), "updates": updates, "history": history}

    def text() -> str:
        lines = [f"{t.title}", f"id:       {t.id}", f"project:  {t.project} ({t.project_id[:SHORT_ID]})",
                 f"status:   {STATUS_LABEL[t.status]}", f"priority: P{t.priority}",
                 f"assigned: {_assignee(t) or '-'}", f"created:  {_when(t.created_at)}"]
        if t.description:
            lines += ["", t.description]
        if updates:
            lines += ["", "updates:"] + [f"{_when(u.created_at)}  [{u.source}]  {u.text}" for u in updates]
        lines += ["", "history:", format_history(history)]
        return "\n".join(lines)
    emit(ctx, value, text)


def _cmd_task_status(status: str, verb: str) -> Callable[[argparse.Namespace, Context], None]:
    def handler(args: argparse.Namespace, ctx: Context) -> None:
        t = ctx.svc.edit_task(args.task, status=status)
        emit(ctx, t, f"task {t.id[:SHORT_ID]} {verb}: {t.title}")
    handler.__name__ = f"cmd_task_{verb}"
    handler.__doc__ = f"Set a task's status to {status}."
    return handler


def cmd_task_edit(args: argparse.Namespace, ctx: Context) -> None:
    """Change a task's title, priority or description."""
    if args.title is None and args.prio is None and args.desc is None:
        raise UsageError("nothing to change; give --title, --prio or --desc")
    t = ctx.svc.edit_task(args.task, title=args.title, priority=args.prio, description=args.desc)
    emit(ctx, t, f"task {t.id[:SHORT_ID]}: {t.title} (P{t.priority}, {STATUS_LABEL[t.status]})")


def cmd_assign(args: argparse.Namespace, ctx: Context) -> None:
    """Assign a task to a session or a group."""
    t = ctx.svc.assign_task(args.task, session_id=args.session, group_ref=args.group)
    emit(ctx, t, f"task {t.id[:SHORT_ID]} assigned to {_assignee(t)}: {t.title}")


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
    """Add a progress note to a task."""
    u = ctx.svc.post_update(args.text, task_ref=args.task)
    emit(ctx, u, f"noted on task {u.task_id[:SHORT_ID]}: {_short(u.text, 70)}")


def cmd_status(args: argparse.Namespace, ctx: Context) -> None:
    """Show the roll-up: task counts per project."""
    projects = ctx.svc.list_projects()
    if args.project:
        projects = [ctx.svc.get_project(args.project)]
    emit(ctx, {"projects": projects}, lambda: table(
        ("PROJECT", "STATUS", "TODO", "DOING", "BLOCKED", "DONE"),
        ((p.name, p.status, *(p.task_counts[s] for s in TASK_STATUSES)) for p in projects))
        if projects else "no projects")


def cmd_log(args: argparse.Namespace, ctx: Context) -> None:
    """Print the newest events of the log, newest last."""
    if args.limit < 1:
        raise UsageError(f"--limit {args.limit} must be at least 1")
    events = ctx.svc.list_events(limit=args.limit)
    emit(ctx, events, lambda: "\n".join(
        f"{ev.hlc}  {ev.event_type:<16}  {describe_event(ev)}" for ev in events) or "the log is empty")


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
    with (contextlib.nullcontext(out) if out else open(args.file, "w", encoding="utf-8")) as f:
        n_events = 0
        for ev in iter_events(ctx.db):
            f.write(json.dumps(ev.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n")
            n_events += 1
    if out is None:
        print(f"exported {n_events} events to {args.file}", file=sys.stderr)


def cmd_import(args: argparse.Namespace, ctx: Context) -> int:
    """Add the events of a JSON-lines file that this log lacks (idempotent)."""
    try:
        f = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
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


GROUP_HELP = {
    "project": "create, list, show and change projects",
    "task": "add, list, show and move tasks",
    "group": "name groups of sessions by cwd, host or tmux session name",
}
_TASK_REF = arg("task", help="task id or unique prefix")
_JSON = arg("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of text")

COMMANDS: list[Command] = [
    Command(("init",), cmd_init, "create the database and this host's machine id (idempotent)",
            "clare init\n  clare --home /tmp/c2 init --machine-id apricot",
            (arg("--machine-id", help="this host's id in every event (default: the host name)"),)),
    Command(("project", "new"), cmd_project_new, "create a project",
            'clare project new alpha --goal "ship v1" --owner ana',
            (arg("name"), arg("--goal", default="", help="what done looks like"),
             arg("--owner", default="", help="who answers for it"))),
    Command(("project", "list"), cmd_project_list, "list projects with task counts",
            "clare project list --status active",
            (arg("--status", choices=PROJECT_STATUSES),)),
    Command(("project", "show"), cmd_project_show, "show a project, its tasks and history",
            "clare project show alpha --history",
            (arg("project", help="name or id prefix"), arg("--history", action="store_true",
                                                            help="also list what happened, oldest first"))),
    Command(("project", "set"), cmd_project_set, "change a project's name, goal, owner or status",
            "clare project set alpha --status paused",
            (arg("project", help="name or id prefix"), arg("--status", choices=PROJECT_STATUSES),
             arg("--goal"), arg("--owner"), arg("--name", help="rename it"))),
    Command(("task", "add"), cmd_task_add, "add a task to a project",
            'clare task add alpha "write the parser" --prio 1 --desc "tokens first"',
            (arg("project", help="name or id prefix"), arg("title"),
             arg("--prio", type=int, default=DEFAULT_PRIORITY, metavar="0-4", help="0 is the most urgent (default 2)"),
             arg("--desc", default="", help="description"))),
    Command(("task", "list"), cmd_task_list, "list tasks, most urgent first",
            "clare task list --project alpha --status todo",
            (arg("--project", help="name or id prefix"), arg("--status", choices=TASK_STATUSES))),
    Command(("task", "show"), cmd_task_show, "show a task with its updates and history",
            "clare task show 3f2a", (_TASK_REF,)),
    Command(("task", "start"), _cmd_task_status("in_progress", "started"), "mark a task in progress",
            "clare task start 3f2a", (_TASK_REF,)),
    Command(("task", "block"), _cmd_task_status("blocked", "blocked"), "mark a task blocked",
            "clare task block 3f2a", (_TASK_REF,)),
    Command(("task", "done"), _cmd_task_status("done", "done"), "mark a task done",
            "clare task done 3f2a", (_TASK_REF,)),
    Command(("task", "reopen"), _cmd_task_status("todo", "reopened"), "put a task back to todo",
            "clare task reopen 3f2a", (_TASK_REF,)),
    Command(("task", "edit"), cmd_task_edit, "change a task's title, priority or description",
            'clare task edit 3f2a --title "parse v2 files" --prio 0',
            (_TASK_REF, arg("--title"), arg("--prio", type=int, metavar="0-4"), arg("--desc"))),
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
    Command(("update",), cmd_update, "add a progress note to a task",
            'clare update 3f2a "blocked on review"', (_TASK_REF, arg("text"))),
    Command(("status",), cmd_status, "the roll-up: task counts per project",
            "clare status --project alpha", (arg("--project", help="name or id prefix"),)),
    Command(("log",), cmd_log, "print the newest events, newest last", "clare log --limit 20",
            (arg("--limit", type=int, default=50),)),
    Command(("replay",), cmd_replay, "rebuild every projection from the event log", "clare replay"),
    Command(("export",), cmd_export, "write the event log as JSON lines",
            "clare export backup.jsonl\n  clare export | gzip > backup.jsonl.gz",
            (arg("file", nargs="?", help="output file; '-' or none for stdout"),)),
    Command(("import",), cmd_import, "add the events of a JSON-lines file (idempotent)",
            "clare import backup.jsonl", (arg("file", help="input file; '-' for stdin"),)),
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Build the argparse tree from COMMANDS: all of it, or only the command that argv names.

    Every leaf costs argparse a quarter of a millisecond, so a run that names a whole
    command builds just that branch; help, errors and anything unrecognised get the full tree.
    """
    wanted = _named_command(argv) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="clare", description="Clare: projects and tasks for a fleet of Claude Code sessions.",
        epilog="example:\n  clare project new alpha --goal 'ship v1'\n  clare task add alpha 'write the parser'"
               "\n\nrun 'clare COMMAND --help' for the options of one command",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"clare {__version__}")
    parser.add_argument("--home", metavar="DIR", help="folder of clare.db and clare.toml (env CLARE_HOME)")
    parser.add_argument("--db", metavar="FILE", help="use this database file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {
        (): parser.add_subparsers(title="commands", metavar="COMMAND")}
    for cmd in COMMANDS:
        if wanted is not None and cmd.path != wanted:
            continue
        for depth in range(1, len(cmd.path)):
            prefix = cmd.path[:depth]
            if prefix not in groups:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=GROUP_HELP.get(prefix[-1]))
                sub.set_defaults(handler=_group_help(sub))
                groups[prefix] = sub.add_subparsers(title="commands", metavar="COMMAND")
        leaf = groups[cmd.path[:-1]].add_parser(
            cmd.path[-1], help=cmd.help, description=cmd.help[:1].upper() + cmd.help[1:] + ".",
            epilog=f"example:\n  {cmd.example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        for flags, options in (*cmd.args, _JSON):
            leaf.add_argument(*flags, **options)
        leaf.set_defaults(handler=cmd.handler)
    return parser


def _named_command(argv: list[str]) -> tuple[str, ...] | None:
    words = []
    tokens = iter(argv)
    for token in tokens:
        if token in ("--home", "--db"):
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
    """Run one CLI command; return its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    ctx = Context(args)
    try:
        return args.handler(args, ctx) or 0
    except ClareError as err:
        print(f"clare: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        sys.stderr.close()  # the reader (head, less) left: not an error
        return 0
    finally:
        ctx.close()


if __name__ == "__main__":
    raise SystemExit(main())
