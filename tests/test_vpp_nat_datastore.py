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
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_vpp, stop_process, wait_for
from etcd_server import require_etcd, running_etcd

from vppmesh.lab.testbed import (
    NAT_OUTSIDE,
    NAT_STATIC_PORT,
    NodeHandle,
    Testbed,
    TestbedSpec,
    in_ns,
    sh,
)
from vppmesh.state import is_owned_tunnel_instance
from vppmesh.vpp import interfaces, ipip, ipsec
from vppmesh.vpp.client import VppClient

pytestmark = [pytest.mark.vpp, pytest.mark.root]
PREFIX = "vmq-"
BASE = Path("/run/vppmesh-vmq")
ETCD_NS = f"{PREFIX}etcd"
ETCD_ADDRESS = "203.0.113.1"  # the management network, as in test_datastore_vpp
PUBLIC = f"{NAT_OUTSIDE.ip}:{NAT_STATIC_PORT}"


def management_network(bed: Testbed) -> None:
    sh("ip", "netns", "add", ETCD_NS)
    in_ns(ETCD_NS, "ip", "link", "set", "lo", "up")
    in_ns(ETCD_NS, "ip", "link", "add", "br0", "type", "bridge")
    in_ns(ETCD_NS, "ip", "addr", "add", f"{ETCD_ADDRESS}/24", "dev", "br0")
    in_ns(ETCD_NS, "ip", "link", "set", "br0", "up")
    for node in bed.nodes:
        port = f"mg-{node.name}"
        in_ns(ETCD_NS, "ip", "link", "add", port, "type", "veth", "peer", "name", "mgmt0",
              "netns", node.netns)
        in_ns(ETCD_NS, "ip", "link", "set", port, "master", "br0", "up")
        in_ns(node.netns, "ip", "addr", "add", f"203.0.113.{10 + node.index}/24", "dev",
              "mgmt0")
        in_ns(node.netns, "ip", "link", "set", "mgmt0", "up")


@pytest.fixture(scope="module")
def bed() -> Iterator[tuple[Testbed, str]]:
    require_vpp()
    require_etcd()
    bed = Testbed(TestbedSpec(prefix=PREFIX, base_dir=BASE, nodes=3, tunnels=1, pods=1,
                              nat="static"))
    bed.up(join=False)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        management_network(bed)
        (BASE / "etcd").mkdir()
        with running_etcd(ETCD_ADDRESS, wrap=["ip", "netns", "exec", ETCD_NS],
                          data_dir=BASE / "etcd") as etcd:
            url = f"etcd://{ETCD_ADDRESS}:{etcd.port}/vppmesh"
            try:
                for node in bed.nodes:
                    agents.append(start_agent(bed, node, url))
                yield bed, url
            finally:
                for proc in agents:
                    stop_process(proc, grace=10.0)
    finally:
        bed.down(quiet=True)


def start_agent(bed: Testbed, node: NodeHandle, url: str) -> subprocess.Popen[bytes]:
    log = open(node.dir / "agent.log", "w")  # noqa: SIM115 - handed to the child
    args = [sys.executable, "-m", "vppmesh", "up", "--watch", "--datastore", url,
            *bed.vppmesh_args(node), *bed.state_args(node), "--pod-cidr", str(node.pod_cidr),
            "--settings", str(bed.mesh_file), "--lease-ttl", "5"]
    args += [a for address in node.underlay for a in ("--underlay", str(address))]
    if node.behind_nat:
        args += ["--nat-public", PUBLIC]
    return subprocess.Popen(["ip", "netns", "exec", node.netns, *args], stdout=log,
                            stderr=subprocess.STDOUT)


def ready_peers(node: NodeHandle) -> int:
    """How many of our tunnels are up and protected in node's VPP."""
    with VppClient(node.instance.api_socket).connect() as api:
        ifaces = {i.sw_if_index: i for i in interfaces.dump_interfaces(api)}
        protections = ipsec.dump_protections(api)
        return sum(1 for t in ipip.dump_tunnels(api) if is_owned_tunnel_instance(t.instance)
                   and ifaces[t.sw_if_index].admin_up and t.sw_if_index in protections)


def test_nat_node_publishes_its_public_address_through_etcd(
        bed: tuple[Testbed, str]) -> None:
    testbed, url = bed
    n1, n2, n3 = testbed.nodes
    for node in testbed.nodes:
        wait_for(lambda node=node: ready_peers(node) == 2, 90, f"{node.name} to mesh")
    for node in testbed.nodes:
        testbed.add_pod(node, 0)
    for src, dst in ((n1, n3), (n3, n1), (n2, n3), (n3, n2)):
        ping = in_ns(src.pod_netns(0), "ping", "-c", "3", "-W", "2", str(dst.pod_address(0)),
                     check=False)
        assert ping.returncode == 0, f"{src.name} -> {dst.name}: {ping.stdout}"

    status = testbed.run_vppmesh(n1, "status", "--json", "--datastore", url, check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    peers = {p["name"]: p["tunnels"][0] for p in json.loads(status.stdout)["peers"]}
    assert peers["n3"]["dst"] == str(NAT_OUTSIDE.ip)
    assert peers["n3"]["encapsulation"] == f"esp-in-udp 4500->{NAT_STATIC_PORT}"
    assert peers["n2"]["encapsulation"] == "esp"
    plan = testbed.run_vppmesh(n1, "plan", "--datastore", url, *testbed.state_args(n1)[:2],
                               check=False)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert plan.stdout.strip().endswith("0 change(s)"), plan.stdout
