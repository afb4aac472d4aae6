"""The outcome of each test a VM guest ran (vppmesh/lab/vm.py runs tests/vm_guest_tap.py):
from its junit report, or from its `pytest -v` output when it stopped early."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """{test name: (passed | failed | skipped, message)} from a junit XML report."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                text = (child.get("message") or "") + "\n" + (child.text or "")
                break
        found[case.get("name", "")] = (outcome, text.strip())
    return found


# `pytest -v` prints each test's outcome as it ends: `tests/vm_guest_tap.py::name PASSED`.
VERBOSE_LINE = re.compile(r"^\S*::(\w+) (PASSED|FAILED|ERROR|SKIPPED)\b", re.MULTILINE)
VERBOSE_OUTCOME = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed",
                   "SKIPPED": "skipped"}


def outcomes_so_far(log: str, reason: str) -> dict[str, tuple[str, str]]:
    """What a guest that stopped early (its time limit) had finished, from its `pytest -v`
    output: the checks that passed stay passed, the rest fail with `reason`."""
    found: dict[str, tuple[str, str]] = {}
    for name, outcome in VERBOSE_LINE.findall(log):
        if outcome == "ERROR" and found.get(name, ("",))[0] == "passed":
            found[name] = ("failed", f"teardown error; {reason}")  # after its own PASSED
        else:
            found[name] = (VERBOSE_OUTCOME[outcome], "" if outcome == "PASSED" else reason)
    return found
