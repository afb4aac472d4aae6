"""No import cycle inside vppmesh/: every import of every module (function-level ones
included, and a package's __init__ that an import runs first) read with ast. Imports
under `if TYPE_CHECKING:` never run and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vppmesh"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of the tree but those under `if TYPE_CHECKING:`."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The vppmesh modules `name` imports, wherever in the file the import is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    parts = name.split(".")
    own_packages = {".".join(parts[:i]) for i in range(1, len(parts))}  # already running
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from vppmesh.dataplane.vpp import ipsec` imports a module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    targets = set()
    for target in found:
        while target and target not in known:  # `import vppmesh.x.y.attr`-like spellings
            target = target.rpartition(".")[0]
        if not target:  # not a vppmesh module
            continue
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first (unless they are
        # the importer's own packages, which always ran before it).
        chain = target.split(".")
        targets.update(p for p in (".".join(chain[:i]) for i in range(1, len(chain)))
                       if p in known and p not in own_packages)
        targets.add(target)
    targets.discard(name)
    return targets


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_vppmesh() -> None:
    known = modules()
    graph = {name: imports(name, path, set(known)) for name, path in known.items()}
    assert "vppmesh.agent.node" in graph["vppmesh.agent.loop"]  # the walk sees imports at all
    assert "vppmesh.agent.datastore.etcd" in graph["vppmesh.agent.node"]  # and function-level ones
    assert cycles(graph) == []


def test_a_run_and_the_keying_decision_import_no_channel_io() -> None:
    """node.up decides keys through an Agreement (keying/agreement.py): node.py and the
    keying/ package never import the channel's driver and I/O (secrecy.py) nor the
    channel's sockets, only the channel's sans-IO session (the channel agreement's)."""
    known = modules()
    graph = {name: imports(name, path, set(known)) for name, path in known.items()}
    io = {"vppmesh.agent.secrecy", "vppmesh.channel.transport", "vppmesh.channel.endpoint"}
    assert "vppmesh.keying.agreement" in graph["vppmesh.agent.node"]  # the walk sees it at all
    for name in ["vppmesh.agent.node", *(n for n in graph if n.startswith("vppmesh.keying"))]:
        assert not graph[name] & io, (name, graph[name] & io)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(
        tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from vppmesh.agent import loop\n"
                      "def f():\n    from vppmesh.agent import node\n")
    known = {"vppmesh.agent.node", "vppmesh.m", "vppmesh.agent.loop"}
    assert imports("vppmesh.m", source, known) == {"vppmesh.agent.node"}


# ---- test support is a package: no sys.path games, no test imports another ----------------

TESTS = ROOT / "tests"
TESTING = "vppmesh.testing"


def path_changes(path: Path) -> list[str]:
    """Every `sys.path.<insert|append|extend>(...)` call and `sys.path = ...` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = node.func if isinstance(node, ast.Call) else None
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [f"{path.name}:{node.lineno}" for t in targets
                      if ast.unparse(t) == "sys.path"]
        elif isinstance(target, ast.Attribute) and ast.unparse(target.value) == "sys.path" \
                and target.attr in ("insert", "append", "extend"):
            found.append(f"{path.name}:{node.lineno}")
    return sorted(found, key=lambda place: int(place.rpartition(":")[2]))


def imported_modules(path: Path) -> set[str]:
    """The absolute names of every module the file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def imports_of_test_modules(path: Path) -> set[str]:
    """The test modules (`test_*`, conftest) a file imports: tests share helpers through
    vppmesh/testing, never through each other or pytest's rootdir on sys.path."""
    return {name for name in imported_modules(path)
            if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest"}



def test_no_sys_path_games_under_tests_or_in_test_support() -> None:
    files = [*TESTS.rglob("*.py"), *(PACKAGE / "testing").rglob("*.py")]
    assert len(files) > 50  # the walk sees the tests at all
    assert [c for f in files for c in path_changes(f)] == []


def test_no_test_module_imports_another() -> None:
    files = [*TESTS.rglob("*.py"), *(PACKAGE / "testing").rglob("*.py")]
    found = {f.name: imports_of_test_modules(f) for f in files}
    assert {name: mods for name, mods in found.items() if mods} == {}


def test_vppmesh_never_imports_its_test_support() -> None:
    """The doubles are for tests: nothing the product runs imports vppmesh.testing."""
    product = {name: path for name, path in modules().items()
               if name != TESTING and not name.startswith(TESTING + ".")}
    known = set(modules())
    assert "vppmesh.testing.fake_vpp" in known and "vppmesh.agent.node" in product
    offenders = {name: sorted(m for m in imports(name, path, known) | imported_modules(path)
                              if m == TESTING or m.startswith(TESTING + "."))
                 for name, path in product.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_test_support_checks_find_what_they_forbid(tmp_path: Path) -> None:
    games = tmp_path / "test_games.py"
    games.write_text("import sys\nsys.path.insert(0, 'tests')\nsys.path.append('x')\n"
                     "sys.path += ['y']\ndef f():\n    from test_epochs import Pair\n"
                     "    import conftest\n    from vppmesh.testing.agents import Agents\n")
    assert path_changes(games) == ["test_games.py:2", "test_games.py:3", "test_games.py:4"]
    assert imports_of_test_modules(games) == {"test_epochs", "test_epochs.Pair",
                                                          "conftest"}
    product = tmp_path / "vppmesh" / "m.py"
    product.parent.mkdir()
    product.write_text("def f():\n    from vppmesh.testing import fake_vpp\n")
    known = {"vppmesh.m", "vppmesh.testing", "vppmesh.testing.fake_vpp"}
    assert "vppmesh.testing.fake_vpp" in imports("vppmesh.m", product, known)


# ---- uplink drivers: one module each, no driver branch outside them -------------------------

DRIVER_NAMES = {"af_packet", "af_xdp", "avf", "dpdk"}
DRIVER_MODULES = {f"vppmesh.host.uplink.{m}"
                  for m in ("base", "af_packet", "af_xdp", "avf", "dpdk")}
# The same words name other things elsewhere: a host link's or pod's attachment (`kind`,
# `attachment`: "af_packet") and VPP's plugins (`plugins`: "dpdk").
OTHER_MEANINGS = ("kind", "attachment", "plugins")


def driver_literals(node: ast.AST) -> set[str]:
    """The driver names a string literal, or a literal tuple/list/set of them, spells."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & DRIVER_NAMES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return {name for element in node.elts for name in driver_literals(element)}
    return set()


def names_a_driver(node: ast.AST) -> bool:
    """`spec.driver`, `driver`, `uplink_driver`, NIC_IN_VPP and the like."""
    return any((isinstance(n, ast.Name) and ("driver" in n.id or n.id == "NIC_IN_VPP"))
               or (isinstance(n, ast.Attribute) and ("driver" in n.attr
                                                      or n.attr == "NIC_IN_VPP"))
               for n in ast.walk(node))


def driver_branches(path: Path) -> list[str]:
    """Every comparison (`==`, `in`, `match`) of a driver's configured name in the file:
    with a driver-name literal (unless the other side is one of OTHER_MEANINGS), or of
    anything named after the driver."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Match):
            operands = [node.subject, *(c.pattern.value for c in node.cases
                                        if isinstance(c.pattern, ast.MatchValue))]
        else:
            continue
        others = [o for o in operands if not driver_literals(o)]
        literal = any(driver_literals(o) for o in operands) and not any(
            ast.unparse(o).endswith(OTHER_MEANINGS) for o in others)
        if literal or any(names_a_driver(o) for o in operands):
            found.append((node.lineno, f"{path.name}:{node.lineno}: "
                                       f"{ast.unparse(node).splitlines()[0]}"))
    return [place for _, place in sorted(found)]


def test_no_driver_name_is_compared_outside_the_uplink_drivers() -> None:
    known = modules()
    assert set(known) >= DRIVER_MODULES
    found = [b for name, path in sorted(known.items()) if name not in DRIVER_MODULES
             for b in driver_branches(path)]
    assert found == []


def test_the_driver_branch_check_finds_what_it_forbids(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "if spec.driver == 'af_packet': pass\n"
        "if driver in ('avf', 'dpdk'): pass\n"
        "if saved.spec.driver not in NIC_IN_VPP: pass\n"
        "if name == 'af_xdp': pass\n"
        "match spec.driver:\n    case 'avf': pass\n"
        "if spec.kind == 'af_packet': pass\n"  # a host link's attachment
        "if 'dpdk' in profile.plugins: pass\n"  # a VPP plugin
        "if driver_for(spec).nic_in_vpp: pass\n")  # asking the driver: no comparison
    assert [b.partition(": ")[0] for b in driver_branches(source)] == [
        "m.py:1", "m.py:2", "m.py:3", "m.py:4", "m.py:5"]
