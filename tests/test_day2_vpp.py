"""Day-2 procedures of docs/operations.md ("Removing a node", "Adding a node"), followed as
written against real VPPs, with every agent running (`up --watch`): one node leaves the
mesh, then joins again as a new node (a new key, a new node number), while a ping between
the two other nodes' pods runs all along and must lose nothing, and their tunnels and SAs
stay untouched.

Three nodes (prefix vd2-). Skipped with the reason when no VPP binary is found or when not
root. Run alone:
    VPPMESH_VPP=/opt/vpp/bin/vpp .venv/bin/python -m pytest -s tests/test_day2_vpp.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from vppmesh.lab.testbed import Testbed
from vppmesh.testing import vpp_helpers
from vppmesh.testing.vpp_helpers import owned

pytestmark = [pytest.mark.vpp]
PREFIX = "vd2-"
BASE = Path("/run/vppmesh-vd2")
NEW_NUMBER = 7  # the node joining again takes a number no node had


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with vpp_helpers.testbed(nodes=3, tunnels=2, pods=1, workers=0, prefix=PREFIX,
                             base_dir=BASE) as bed:
        yield bed


@pytest.fixture(scope="module")
def agents(bed: Testbed) -> Iterator[dict[str, vpp_helpers.WatchAgent]]:
    started = {n.name: vpp_helpers.WatchAgent(bed, n) for n in bed.nodes}
    with vpp_helpers.running_agents(started) as running:
        yield running


def wait_until(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until predicate() held, or None."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.2)
    return None


def edit_mesh(bed: Testbed, edit: Callable[[list[dict[str, object]]], None]) -> None:
    """Change the mesh file's node list (the testbed's one file stands for the copy on
    every node)."""
    data = yaml.safe_load(bed.mesh_file.read_text())
    edit(data["nodes"])
    bed.mesh_file.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_node_leaves_and_joins_as_a_new_node_and_the_others_lose_nothing(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent]) -> None:
    n1, n2, n3 = bed.nodes
    assert wait_until(lambda: vpp_helpers.ping_ok(n1.pod_netns(0), str(n3.pod_address(0))),
                      30) is not None
    # The pairs settle on agreed keys first (generation 1): from then on, nothing of the
    # n1 <-> n2 pair may change.
    assert wait_until(lambda: vpp_helpers.settled_on_agreed_keys(bed.nodes), 30) is not None
    between_others = (owned(n1, n2.index), owned(n2, n1.index))
    old_public = next(n["public_key"] for n in yaml.safe_load(bed.mesh_file.read_text())["nodes"]
                      if n["name"] == "n3")
    events: list[str] = []
    with vpp_helpers.SteadyPing(n1.pod_netns(0), str(n2.pod_address(0))) as steady:
        # ---- Removing a node: 1. on the node, down with its agent stopped first.
        down = bed.run_vppmesh(n3, "down", "--state-dir", str(n3.dir), "--stop-agent",
                               check=False)
        assert down.returncode == 0, down.stdout + down.stderr
        assert agents["n3"].proc is not None
        assert agents["n3"].proc.wait(timeout=15) == 0, agents["n3"].text()
        assert owned(n3) == set(), down.stdout
        events.append(f"n3: down --stop-agent removed {down.stdout.count(chr(10)) - 1} "
                      "object(s), agent stopped")
        # 2. Its entry out of the mesh file: the others drop its tunnels, SAs and route.
        edit_mesh(bed, lambda nodes: nodes.remove(next(n for n in nodes if n["name"] == "n3")))
        gone = wait_until(lambda: not owned(n1, n3.index) and not owned(n2, n3.index), 20)
        assert gone is not None, "n3 left the mesh file but n1 or n2 kept its objects"
        events.append(f"n3 out of the mesh file: n1, n2 dropped it in {gone:.1f} s")

        # ---- Adding a node: 1. its key (a new identity), 2. its entry everywhere,
        # 3. its agent.
        made = subprocess.run([sys.executable, "-m", "vppmesh", "keygen", "--key",
                               str(n3.key_file), "--force"], capture_output=True, text=True,
                              check=True, timeout=60)
        public = made.stdout.strip()
        assert public != old_public
        edit_mesh(bed, lambda nodes: nodes.append({
            "name": "n3", "node_number": NEW_NUMBER,
            "underlay": [str(a) for a in n3.underlay], "pod_cidr": str(n3.pod_cidr),
            "public_key": public}))
        runs = agents["n3"].text().count("node n3: ")
        agents["n3"].start()
        assert wait_until(lambda: agents["n3"].text().count("node n3: ") > runs, 30), \
            agents["n3"].text()[-3000:]
        # The pod the node runs (a CNI ADD on a real node, once the node is in the mesh).
        bed.run_vppmesh(n3, "attach", *bed.attach_args(n3, 0))
        back = wait_until(lambda: vpp_helpers.ping_ok(n1.pod_netns(0), str(n3.pod_address(0)))
                          and vpp_helpers.ping_ok(n2.pod_netns(0), str(n3.pod_address(0))), 30)
        assert back is not None, agents["n3"].text()[-3000:]
        events.append(f"n3 joined as node {NEW_NUMBER} with a new key: both others reach "
                      f"its pod in {back:.1f} s")
        assert not owned(n1, 3) and not owned(n2, 3)  # nothing left of its old number
        assert owned(n1, NEW_NUMBER) and owned(n2, NEW_NUMBER)
        time.sleep(1)
    for line in events:
        print("  ", line)
    print("   n1 -> n2 pod ping all along:", steady.summary.splitlines()[-2:])
    assert steady.loss_percent() == 0.0, steady.summary
    assert (owned(n1, n2.index), owned(n2, n1.index)) == between_others
