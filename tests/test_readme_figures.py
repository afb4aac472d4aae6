"""Every measured figure in README.md names the results file it comes from.

A figure is a number with a unit of speed or time (Gbit/s, Mpps, clocks, CPU-s, ms, s).
The README's sections (down to `###`) are checked one by one, code blocks aside: a
section that states a figure must name a results file (`benchmarks/results/...`) that
exists, and the files one section names must all come from one machine, so no table or
paragraph mixes two machines' numbers.

Every relative link of README.md and docs/*.md leads somewhere: its file exists and its
`#anchor`, in a markdown file, is one of that file's headings as GitHub spells them.
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


LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation gone, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.*)$", FENCE.sub("", text), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    found = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            found.append(f"{path.name}: {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            found.append(f"{path.name}: {target}: no heading with that anchor")
    return found


def test_every_relative_link_and_anchor_exists() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert [b for page in pages for b in broken_links(page)] == []


def test_the_link_check_catches_a_missing_file_and_a_wrong_anchor(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Top\n\n## Measured here (2 cores)\n\n## Top\n")
    page = tmp_path / "b.md"
    page.write_text("[x](a.md#measured-here-2-cores) [y](a.md#top-1) [z](#b) "
                    "[w](https://example.com/#q)\n\n# B\n")
    assert broken_links(page) == []
    page.write_text("[x](a.md#measured-here) [y](gone.md)\n")
    assert broken_links(page) == ["b.md: a.md#measured-here: no heading with that anchor",
                                  "b.md: gone.md: no such file"]
