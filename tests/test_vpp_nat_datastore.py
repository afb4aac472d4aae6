"""A node behind NAT joins through etcd: it publishes its public address and port.

Three testbed nodes, n3 behind the static NAT router (UDP 14500 forwarded to its 4500);
no mesh file, only agents (`up --watch --datastore`), n3's with
`--nat-public 192.0.2.250:14500`. Its peers learn the address and port from its record:
ESP in UDP towards 192.0.2.250:14500, pods ping both ways, and `plan` and `status` from the
datastore agree with VPP. Skipped with the reason when VPP, etcd or root is missing.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.netns import stop_process
from vppmesh.dataplane.state import is_owned_tunnel_instance
from vppmesh.dataplane.vpp import interfaces, ipip, ipsec
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.lab.testbed import NAT_OUTSIDE, NAT_STATIC_PORT, NodeHandle, Testbed
from vppmesh.testing import vpp_helpers
from vppmesh.testing.etcd_server import require_etcd
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vpp, pytest.mark.root]
PREFIX = "vmq-"
BASE = Path("/run/vppmesh-vmq")
ETCD_NS = f"{PREFIX}etcd"
PUBLIC = f"{NAT_OUTSIDE.ip}:{NAT_STATIC_PORT}"


@pytest.fixture(scope="module")
def bed() -> Iterator[tuple[Testbed, str]]:
    agents: list[subprocess.Popen[bytes]] = []
    with vpp_helpers.testbed(require_etcd, join=False, prefix=PREFIX, base_dir=BASE, nodes=3,
                             tunnels=1, pods=1, nat="static") as bed, \
            vpp_helpers.management_etcd(bed, ETCD_NS) as etcd:
        url = vpp_helpers.etcd_url(etcd)
        try:
            for node in bed.nodes:
                agents.append(start_agent(bed, node, url))
            yield bed, url
        finally:
            for proc in agents:
                stop_process(proc, grace=10.0)


def start_agent(bed: Testbed, node: NodeHandle, url: str) -> subprocess.Popen[bytes]:
    nat = ("--nat-public", PUBLIC) if node.behind_nat else ()
    return vpp_helpers.start_datastore_agent(bed, node, url, "--lease-ttl", "5", *nat)


def ready_peers(node: NodeHandle) -> int:
    """How many of our tunnels are up and protected in node's VPP."""
    with VppClient(node.instance.api_socket).connect() as api:
        # Tunnels first: one the agent creates between the dumps is simply not counted yet.
        tunnels = ipip.dump_tunnels(api)
        up = {i.sw_if_index for i in interfaces.dump_interfaces(api) if i.admin_up}
        protections = ipsec.dump_protections(api)
        return sum(1 for t in tunnels if is_owned_tunnel_instance(t.instance)
                   and t.sw_if_index in up and t.sw_if_index in protections)


def test_nat_node_publishes_its_public_address_through_etcd(
        bed: tuple[Testbed, str]) -> None:
    testbed, url = bed
    n1, n2, n3 = testbed.nodes
    for node in testbed.nodes:
        wait_for(lambda node=node: ready_peers(node) == 2, 90, f"{node.name} to mesh")
    for node in testbed.nodes:
        testbed.add_pod(node, 0)
    vpp_helpers.assert_pods_ping(((n1, n3), (n3, n1), (n2, n3), (n3, n2)), count=3)

    status = testbed.run_vppmesh(n1, "status", "--json", "--datastore", url, check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    peers = {p["name"]: p["tunnels"][0] for p in json.loads(status.stdout)["peers"]}
    assert peers["n3"]["dst"] == str(NAT_OUTSIDE.ip)
    assert peers["n3"]["encapsulation"] == f"esp-in-udp 4500->{NAT_STATIC_PORT}"
    assert peers["n2"]["encapsulation"] == "esp"
    # The agents agree keys (forward secrecy); the plan reads their generations.
    wait_for(lambda: vpp_helpers.settled_on_agreed_keys(list(testbed.nodes)), 60,
             "agreed keys on every pair")
    plan = testbed.run_vppmesh(n1, "plan", "--datastore", url, *testbed.state_args(n1),
                               check=False)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert vpp_helpers.plan_changes(plan.stdout) == 0, plan.stdout
