"""The suite's own rules for CI: a missing program fails under CI=true instead of skipping; `slow` is a marker."""

import os
import subprocess
import sys

from conftest import ROOT

NEEDS = """from conftest import require_program


def test_needs_a_program():
    require_program("clare-no-such-program", "apt-get install it")
"""


def _run_pytest(tmp_path, *, ci: str | None):
    (tmp_path / "test_needs.py").write_text(NEEDS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           str(tmp_path / "test_needs.py")], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)


def test_a_missing_program_fails_the_test_under_ci_with_the_reason(tmp_path):
    p = _run_pytest(tmp_path, ci="true")
    assert p.returncode == 1, p.stdout
    assert "CI=true and clare-no-such-program is missing: apt-get install it" in p.stdout
    assert "1 failed" in p.stdout


def test_a_missing_program_skips_the_test_on_a_developer_machine(tmp_path):
    p = _run_pytest(tmp_path, ci=None)
    assert p.returncode == 0, p.stdout
    assert "clare-no-such-program is missing: apt-get install it" in p.stdout
    assert "1 skipped" in p.stdout


def test_make_test_fast_leaves_out_the_slow_tests_and_make_test_lints_first():
    dry = {target: subprocess.run(["make", "-n", target], capture_output=True, text=True, timeout=30,
                                  cwd=ROOT).stdout for target in ("test", "test-fast")}
    assert "ruff check" in dry["test"] and "mypy" in dry["test"] and '-m "not slow"' not in dry["test"]
    assert '-m "not slow"' in dry["test-fast"] and "mypy" not in dry["test-fast"]
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("\nmake test")
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                        "-m", "not slow", "tests/test_bench.py"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert "1 deselected" in p.stdout, p.stdout


def test_the_ci_entry_parses_and_no_tracked_file_holds_a_merge_conflict():
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], capture_output=True).returncode == 0
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    marked = [f for f in files if (ROOT / f).suffix not in (".db", ".png")
              and any(line.startswith(("<<<<<<< ", ">>>>>>> ")) for line in
                      (ROOT / f).read_text(errors="replace").splitlines())]
    assert marked == []
