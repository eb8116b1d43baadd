"""The bench keeps working: a quick run prints every row of its table. No timing is asserted."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_PY = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~47 s: `make test-fast` leaves it out
def test_quick_bench_prints_every_row_with_a_figure_or_a_reason(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(BENCH_PY), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(out.read_text())
    keys = load_bench().ROW_KEYS
    assert [r["key"] for r in report["rows"]] == list(keys)
    for row in report["rows"]:
        assert not row["note"].startswith("error"), row
        assert row["clare"] is not None or row["note"].startswith("n/a ("), row
        assert row["baseline"] is not None or row["note"] or row["key"] == "serve.rss", row
    lines = [line for line in p.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| metric | Clare | baseline | ratio | goal |")
    assert len(lines) == 1 + len(keys)
    assert all(row["metric"] in p.stdout for row in report["rows"])


# What the start-up figures rely on; structure only, never a timing.

HEAVY_MODULES = ("uuid", "hashlib", "http.server", "socketserver", "urllib.request", "email", "tomllib", "ssl",
                 "shutil", "platform")


def test_import_clare_and_parsing_a_command_load_no_heavy_module():
    code = (f"import sys, clare; clare.build_parser(['task', 'list']).parse_args(['task', 'list']); "
            f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=BENCH_PY.parent.parent)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_the_parser_built_for_one_command_parses_like_the_whole_tree():
    import clare

    for argv in (["--home", "h", "task", "add", "alpha", "a title", "--prio", "1", "--json"],
                 ["--db", "task", "task", "list", "--status", "todo"],
                 ["project", "set", "alpha", "--status", "paused"], ["assign", "3f2a", "--group", "g"],
                 ["--remote", "http://apricot:8765", "task", "list"]):
        assert clare._named_command(argv) is not None, argv
        assert vars(clare.build_parser(argv).parse_args(argv)) == vars(clare.build_parser().parse_args(argv))
    assert clare._named_command(["task", "--help"]) is None
    assert clare._named_command(["tsak", "list"]) is None


def test_new_uuid_is_a_random_rfc4122_uuid4():
    import uuid

    import clare

    made = {clare.new_uuid() for _ in range(1000)}
    assert len(made) == 1000
    for text in made:
        u = uuid.UUID(text)
        assert (str(u), u.version, u.variant) == (text, 4, uuid.RFC_4122)
        assert clare.UUID_RE.match(text)


def test_help_is_as_wide_as_argparse_would_make_it(monkeypatch):
    import shutil

    import clare

    for columns in ("60", "132", "0", "junk", None):
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", columns)
        assert clare._terminal_columns() == shutil.get_terminal_size().columns
