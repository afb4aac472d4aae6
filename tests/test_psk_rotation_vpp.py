"""The PSK rotation of docs/operations.md, followed step by step against real VPPs with
every agent running: the new PSK staged as `PSK.next` on every node, promoted node by node
(the old one kept as `PSK.previous`), the old one dropped everywhere. Pod pings across
every pair run all along and lose nothing; after each step a rekey from the node that
moved is agreed with both peers (the channel works across the mixed mesh); at the end every
pair is forward secret (`verify --require-forward-secrecy`) and every channel session
runs on the new PSK.

Each node has its own PSK file (its own copy of the mesh file names it), as on real
hosts. Three nodes (prefix vpr-). Skipped with the reason when no VPP or not root.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from vppmesh.keying.keys import write_secret_file
from vppmesh.lab.testbed import NodeHandle, Testbed
from vppmesh.testing import vpp_helpers
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vpp]
PREFIX = "vpr-"
BASE = Path("/run/vppmesh-vpr")


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with vpp_helpers.testbed(nodes=3, tunnels=2, pods=1, workers=0, prefix=PREFIX,
                             base_dir=BASE) as bed:
        vpp_helpers.on_demand_rekeys(bed, 2.0)
        yield bed


def new_psk() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def psk(node: NodeHandle, suffix: str = "") -> Path:
    return node.dir / f"psk{suffix}"



def wait_until(what: str, predicate: Callable[[], bool], timeout: float) -> float:
    return wait_for(predicate, timeout, what, interval=0.2)

def test_psk_rotation_step_by_step_loses_no_packet(bed: Testbed) -> None:
    n1, n2, n3 = bed.nodes
    old = new_psk()
    for node in bed.nodes:
        write_secret_file(psk(node), old)
        data = yaml.safe_load(bed.mesh_file.read_text())
        data["settings"]["psk_file"] = str(psk(node))
        (node.dir / "mesh.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
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
            # 1. The new PSK staged as PSK.next on every node.
            new = new_psk()
            for node in bed.nodes:
                logged = agents[node.name].text().count("PSKs held now")
                write_secret_file(psk(node, ".next"), new)
                wait_until(f"{node.name} holds the next PSK",
                           lambda node=node, logged=logged:
                           agents[node.name].text().count("PSKs held now") > logged, 15)
            took = vpp_helpers.rekey_agreed(bed, n1)
            events.append(f"t+{time.monotonic() - t0:.1f} s staged on every node; rekey of "
                          f"n1 agreed in {took:.1f} s")
            # 2. Promoted node by node: PSK.previous keeps the old one.
            for node in bed.nodes:
                os.link(psk(node), psk(node, ".previous.tmp"))
                os.replace(psk(node, ".previous.tmp"), psk(node, ".previous"))
                os.replace(psk(node, ".next"), psk(node))
                took = vpp_helpers.rekey_agreed(bed, node)
                events.append(f"t+{time.monotonic() - t0:.1f} s {node.name} promoted: its "
                              f"rekey agreed with both peers in {took:.1f} s")
            # 3. The old PSK dropped everywhere.
            for node in bed.nodes:
                psk(node, ".previous").unlink()
            for node in bed.nodes:
                took = vpp_helpers.rekey_agreed(bed, node)
                events.append(f"t+{time.monotonic() - t0:.1f} s old PSK dropped: rekey of "
                              f"{node.name} agreed in {took:.1f} s")
            wait_until("every channel session on the new PSK", lambda: all(
                "previous" not in vpp_helpers.status_line(bed, n, "channel PSK")
                and "current" in vpp_helpers.status_line(bed, n, "channel PSK")
                for n in bed.nodes), 60)
        finally:
            for ping in pings:
                ping.__exit__(None, None, None)
        for node in bed.nodes:
            out = bed.run_vppmesh(node, "verify", "--require-forward-secrecy",
                                  *vpp_helpers.own_args(node), check=False)
            assert out.returncode == 0, out.stdout + out.stderr
    for line in events:
        print("  ", line)
    for ping in pings:
        seen = {int(n) for n in re.findall(r"icmp_seq=(\d+) ", ping.output)}
        lost = sorted(set(range(1, max(seen, default=0))) - seen)
        print("  ", ping.args[-1], ping.summary.splitlines()[-2:],
              f"lost at t+{[round((n - 1) * 0.2, 1) for n in lost]} s")
        assert ping.loss_percent() == 0.0, ping.summary
    assert not any(psk(n, ".next").exists() or psk(n, ".previous").exists() for n in bed.nodes)
