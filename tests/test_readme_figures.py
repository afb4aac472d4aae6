"""Every measured figure in README.md names the results file it comes from.

A figure is a number with a unit of speed or time (Gbit/s, Mpps, clocks, CPU-s, ms, s).
The README's sections (down to `###`) are checked one by one, code blocks aside: a
section that states a figure must name a results file (`benchmarks/results/...`) that
exists, and the files one section names must all come from one machine, so no table or
paragraph mixes two machines' numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURE = re.compile(r"(?<![\w.])\d[\d,.]*(?:-\d[\d,.]*)?\s?"
                    r"(?:Gbit/s|Mbit/s|Mpps|clocks?|CPU-s(?:/GB)?|ms|s)(?![\w/-])")
CITED = re.compile(r"benchmarks/results/([\w.-]+\.(?:json|md))")
FENCE = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body without code blocks) of every section, the preamble included."""
    text = FENCE.sub("", text)
    parts = re.split(r"^(#{1,3} .*)$", text, flags=re.M)
    out = [("(top)", parts[0])]
    out += [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]
    return out


def machine_of(name: str) -> str:
    """The CPU model a results file was measured on (from its JSON)."""
    path = RESULTS / name
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    data = json.loads(path.read_text())
    machine = data.get("machine", {})
    return str(machine.get("cpu_model") or machine.get("cpu"))


def problems(text: str) -> list[str]:
    found = []
    for heading, body in sections(text):
        figures = FIGURE.findall(body)
        cited = CITED.findall(body)
        missing = [c for c in cited if not (RESULTS / c).exists()]
        if missing:
            found.append(f"{heading}: names {missing}, not in benchmarks/results/")
            continue
        if figures and not cited:
            found.append(f"{heading}: states {figures[:3]} but names no results file")
            continue
        machines = {machine_of(c) for c in cited}
        if len(machines) > 1:
            found.append(f"{heading}: mixes machines {sorted(machines)}")
    return found


def test_every_readme_figure_names_its_results_file() -> None:
    assert problems((ROOT / "README.md").read_text()) == []


def test_the_check_catches_a_figure_without_a_file_and_mixed_machines() -> None:
    assert problems("## A\n\nvppmesh does 2.3 Gbit/s here.\n") == [
        "## A: states ['2.3 Gbit/s'] but names no results file"]
    assert problems("## B\n\n40 ms ([x](benchmarks/results/none.json))\n") == [
        "## B: names ['none.json'], not in benchmarks/results/"]
    mixed = ("## C\n\n1 ms (benchmarks/results/20261122T034617Z-controlplane.md) and 607 "
             "clocks (benchmarks/results/20261130T051433Z-capacity.md)\n")
    assert problems(mixed) and "mixes machines" in problems(mixed)[0]
    fine = "## D\n\n607 clocks (benchmarks/results/20261130T051433Z-capacity.md)\n"
    assert problems(fine) == []
    assert problems("## E\n\n```\n3 s window\n```\n4 tunnels, 1500 bytes\n") == []
