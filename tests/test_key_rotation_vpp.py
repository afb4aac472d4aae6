"""A node key rotation (docs/operations.md, "Rotating a node's key"), followed step by step
against real VPPs with every agent running: `vppmesh keygen --rotate` on node 2 (the old
key kept as KEY.previous), its new public key published in each node's own mesh file one
node at a time, KEY.previous removed once `status` shows no peer on it. Pod pings across
every pair run all along and lose nothing; after each step a rekey from node 2 is agreed
with both peers; at the end every pair is forward secret and no agreed key was dropped
for want of the node's word for its old key.

Each node has its own mesh file, as on real hosts. Three nodes (prefix vkr-). Skipped
with the reason when no VPP or not root.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from vppmesh.keying.keys import key_previous_file
from vppmesh.lab.testbed import NodeHandle, Testbed
from vppmesh.testing import vpp_helpers
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vpp]
PREFIX = "vkr-"
BASE = Path("/run/vppmesh-vkr")


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with vpp_helpers.testbed(nodes=3, tunnels=2, pods=1, workers=0, prefix=PREFIX,
                             base_dir=BASE) as bed:
        vpp_helpers.on_demand_rekeys(bed, 2.0)
        yield bed


def publish(bed: Testbed, node: NodeHandle, rotating: NodeHandle, public_key: str) -> None:
    """Step 2 on `node`: its own mesh file names the rotating node's new key."""
    data = yaml.safe_load((node.dir / "mesh.yaml").read_text())
    for entry in data["nodes"]:
        if entry["name"] == rotating.name:
            entry["public_key"] = public_key
    (node.dir / "mesh.yaml").write_text(yaml.safe_dump(data, sort_keys=False))



def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> float:
    return wait_for(predicate, timeout, what, interval=0.2)

def test_key_rotation_step_by_step_loses_no_packet(bed: Testbed) -> None:
    n1, n2, n3 = bed.nodes
    for node in bed.nodes:
        (node.dir / "mesh.yaml").write_text(bed.mesh_file.read_text())
    agents = {n.name: vpp_helpers.OwnMeshAgent(bed, n) for n in bed.nodes}
    events: list[str] = []
    with vpp_helpers.running_agents(agents):
        wait_until("every pair on agreed keys",
                   lambda: vpp_helpers.settled_on_agreed_keys(bed.nodes), 60)
        pairs = ((n1, n2), (n2, n3), (n3, n1))
        for a, b in pairs:  # each path used once first (a first packet may meet ARP)
            wait_until(f"{a.name} pod -> {b.name} pod", lambda a=a, b=b: vpp_helpers.ping_ok(
                a.pod_netns(0), str(b.pod_address(0))), 20)
        pings = [vpp_helpers.SteadyPing(a.pod_netns(0), str(b.pod_address(0)))
                 for a, b in pairs]
        for ping in pings:
            ping.__enter__()
        t0 = time.monotonic()
        try:
            # 1. On node 2: the key moves to KEY.previous, a new one takes its place.
            out = subprocess.run([sys.executable, "-m", "vppmesh", "keygen", "--rotate",
                                  "--key", str(n2.key_file)], capture_output=True, text=True,
                                 check=False)
            assert out.returncode == 0, out.stdout + out.stderr
            new_public = out.stdout.strip().splitlines()[0]
            wait_until("node 2's peers on its previous key", lambda: "previous: " in
                       vpp_helpers.status_line(bed, n2, "channel key"), 30)
            took = vpp_helpers.rekey_agreed(bed, n2)
            events.append(f"t+{time.monotonic() - t0:.1f} s rotated on n2; rekey agreed in "
                          f"{took:.1f} s")
            # 2. The new public key in each node's mesh file, one node at a time.
            for node in (n1, n2, n3):
                publish(bed, node, n2, new_public)
                time.sleep(5)  # the agents read the file and meet under the new key
                took = vpp_helpers.rekey_agreed(bed, n2)
                events.append(f"t+{time.monotonic() - t0:.1f} s published at {node.name}: "
                              f"rekey of n2 agreed in {took:.1f} s")
            wait_until("no peer on node 2's previous key", lambda: "previous" not in
                       vpp_helpers.status_line(bed, n2, "channel key") and "current: " in
                       vpp_helpers.status_line(bed, n2, "channel key"), 200)
            # 3. KEY.previous removed.
            key_previous_file(n2.key_file).unlink()
            for node in bed.nodes:
                took = vpp_helpers.rekey_agreed(bed, node)
                events.append(f"t+{time.monotonic() - t0:.1f} s previous key removed: "
                              f"rekey of {node.name} agreed in {took:.1f} s")
        finally:
            for ping in pings:
                ping.__exit__(None, None, None)
        for node in bed.nodes:
            out = bed.run_vppmesh(node, "verify", "--require-forward-secrecy",
                                  *vpp_helpers.own_args(node), check=False)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "did not vouch" not in agents[node.name].text()
    for line in events:
        print("  ", line)
    for ping in pings:
        seen = {int(n) for n in re.findall(r"icmp_seq=(\d+) ", ping.output)}
        lost = sorted(set(range(1, max(seen, default=0))) - seen)
        print("  ", ping.args[-1], ping.summary.splitlines()[-2:],
              f"lost at t+{[round((n - 1) * 0.2, 1) for n in lost]} s")
        assert ping.loss_percent() == 0.0, ping.summary
