"""Every command an error or a help text tells the operator to run exists, with the
options it names: a message that names a wrong command leaves the operator stuck."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import typer

from vppmesh import cli
from vppmesh.cli import app

SOURCES = Path(cli.__file__).parent.parent
MENTION = re.compile(r"`(vppmesh [^`]*)`")


def mentions() -> list[tuple[str, int, str]]:
    """(file, line, command) of every `vppmesh ...` in a string of the package; an
    f-string's replacement fields read as X."""
    found = []
    for path in sorted(SOURCES.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "X"
                               for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            found += [(path.name, node.lineno, m.group(1)) for m in MENTION.finditer(text)]
    return found


def problems(words: list[str], root: Any) -> list[str]:
    """What is wrong with `vppmesh WORDS...`: an unknown command or option."""
    command, path = root, ["vppmesh"]
    words = words[1:]
    while words and hasattr(command, "commands") and words[0] in command.commands:
        command = command.commands[words[0]]
        path.append(words.pop(0))
    if hasattr(command, "commands"):
        if words and words[0] == "X":  # an f-string's command: named at run time
            return []
        if words and not words[0].startswith("-"):
            return [f"{' '.join(path)} has no command {words[0]!r}"]
        return []  # the group itself (`vppmesh uplink`)
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    found = []
    for i, word in enumerate(words):
        if word == "--":  # the rest goes to another command (install-unit: up, vm run)
            rest = words[i + 1:]
            if path[-1] == "install-unit":
                found += problems(["vppmesh", "up", *rest], root)
            elif rest and rest[0] == "vppmesh":
                found += problems(rest, root)
            break
        name = word.split("=", 1)[0]
        if name.startswith("--") and name not in options and not \
                (name == "--help" or (path[-1] == "bench" and name == "--help-bench")):
            found.append(f"{' '.join(path)} has no option {name}")
    return found


def test_every_command_named_in_a_message_exists_with_its_options() -> None:
    root = typer.main.get_command(app)
    found = mentions()
    assert len(found) > 50  # the scan sees the messages
    wrong = [f"{file}:{line}: `{text}`: {problem}" for file, line, text in found
             for problem in problems(text.split(), root)]
    assert not wrong, "\n".join(wrong)


def test_the_scan_finds_a_wrong_command() -> None:
    root = typer.main.get_command(app)

    def said(command: str) -> list[str]:
        return problems(command.split(" "), root)

    assert said("vppmesh keygen --psks X") == \
        ["vppmesh keygen has no option --psks"]
    assert said("vppmesh uplink give") == \
        ["vppmesh uplink has no command 'give'"]
    assert said("vppmesh install-unit -- --nod X") == \
        ["vppmesh up has no option --nod"]
    assert said("vppmesh vm run -- vppmesh demo --nodez 2") == \
        ["vppmesh demo has no option --nodez"]
