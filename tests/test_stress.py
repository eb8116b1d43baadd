"""`make stress` in short (issue #19): one quick case of each kind, on loopback, nothing acknowledged lost.

The long runs (network namespaces, minutes) are `make stress`; these run bench/stress.py --quick.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, require

STRESS_PY = ROOT / "bench" / "stress.py"
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def _needs(case: str) -> None:
    missing = {"diskfull": "root (a tmpfs)" if os.geteuid() != 0 else None,
               "clock": "libfaketime (apt-get install faketime)" if not os.path.exists(FAKETIME_LIB) else None}
    require(not missing.get(case), f"what the {case} stress case needs", str(missing.get(case)))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["partition", "kill9", "diskfull", "clock"])
def test_a_short_stress_case_loses_no_acknowledged_write_and_converges(case, tmp_path):
    _needs(case)
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "CLARE_SYNCHRONOUS"}  # the real default: FULL
    p = subprocess.run([sys.executable, str(STRESS_PY), "--quick", "--net", "loopback", "--only", case,
                        "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    [result] = json.loads(out.read_text())
    assert result["acknowledged"] > 0, result
    assert (result["lost"], result["diverged"]) == (0, 0), result
    assert result["converge_s"] is not None, result
    unexpected = {e: n for e, n in result["errors"].items() if "the disk is full (N bytes free at PATH); free "
                  "space and retry — nothing was lost" not in e}
    assert unexpected == {}, unexpected
    if case == "diskfull":
        assert result["errors"] and "reads worked" in result["done"]
    if case == "clock":
        assert "bound kept: True" in result["done"] and not result["note"].startswith("0 ")
    assert "| " + result["case"] + " |" in p.stdout  # the table
