"""End to end: nodes join and leave a real-VPP mesh through etcd while traffic flows.

Four testbed nodes, each its own VPP; etcd runs in its own namespace on a management
network (203.0.113.0/24) that every node namespace reaches through a veth, the way
hosts reach their datastore over the host network. Three agents join, a fourth joins
while iperf3 runs between pods of the first two, then its agent stops and its lease
expires, `down` cleans it, and it joins again under the same key (both ends step to
their next key generation); last, one node's VPP is killed and started empty and is
healed the same way, with no operator step. Skipped with the reason when VPP, etcd or
root is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.netns import stop_process
from vppmesh.dataplane.state import is_owned_sa_id, is_owned_tunnel_instance, split_tunnel_instance
from vppmesh.dataplane.vpp import interfaces, ipip, ipsec
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.lab.testbed import NodeHandle, Testbed, in_ns
from vppmesh.testing import vpp_helpers
from vppmesh.testing.etcd_server import EtcdServer, require_etcd
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vpp, pytest.mark.root]
PREFIX = "vme-"
BASE = Path("/run/vppmesh-vme")
ETCD_NS = f"{PREFIX}etcd"
LEASE_TTL = 3
TUNNELS = 2


class Mesh:
    """The testbed, its etcd and the agents started so far."""

    def __init__(self, bed: Testbed, etcd: EtcdServer) -> None:
        self.bed = bed
        self.etcd = etcd
        self.url = vpp_helpers.etcd_url(etcd)
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    def start_agent(self, node: NodeHandle) -> subprocess.Popen[bytes]:
        proc = vpp_helpers.start_datastore_agent(self.bed, node, self.url,
                                                 "--lease-ttl", str(LEASE_TTL))
        self.agents[node.name] = proc
        return proc

    def stop_agents(self) -> None:
        for proc in self.agents.values():
            stop_process(proc, grace=10.0)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with vpp_helpers.testbed(require_etcd, join=False, prefix=PREFIX, base_dir=BASE, nodes=4,
                             tunnels=TUNNELS, pods=1) as bed, \
            vpp_helpers.management_etcd(bed, ETCD_NS) as etcd:
        state = Mesh(bed, etcd)
        try:
            yield state
        finally:
            state.stop_agents()


def in_etcd_ns(code: str) -> str:
    """Run a snippet in the etcd namespace (where the test can reach etcd) and return stdout."""
    result = in_ns(ETCD_NS, sys.executable, "-c", code, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def numbers(mesh: Mesh) -> dict[str, int]:
    """{node name: node number} as registered in etcd."""
    code = ("import json\nfrom vppmesh.agent.datastore.etcd import EtcdStore\n"
            "from vppmesh.agent.datastore.records import DatastoreUrl\n"
            f"snap = EtcdStore(DatastoreUrl.parse({mesh.url!r})).snapshot()\n"
            "print(json.dumps({'numbers': {v: k for k, v in snap.numbers.items()},\n"
            "                  'records': [r.name for r in snap.records]}))")
    data = json.loads(in_etcd_ns(code))
    return {name: number for name, number in data["numbers"].items()
            if name in data["records"]}


def mesh_view(node: NodeHandle) -> dict[int, list[tuple[int, bool]]]:
    """{peer number: [(sw_if_index, up and protected)]} of our tunnels in node's VPP.

    Three dumps while the agent may be programming: a tunnel made after the interface
    dump is not ready yet (the next look sees it)."""
    with VppClient(node.instance.api_socket).connect() as api:
        ifaces = {i.sw_if_index: i for i in interfaces.dump_interfaces(api)}
        protections = ipsec.dump_protections(api)
        out: dict[int, list[tuple[int, bool]]] = {}
        for t in ipip.dump_tunnels(api):
            if not is_owned_tunnel_instance(t.instance):
                continue
            peer, _ = split_tunnel_instance(t.instance)
            iface = ifaces.get(t.sw_if_index)
            ready = iface is not None and iface.admin_up and t.sw_if_index in protections
            out.setdefault(peer, []).append((t.sw_if_index, ready))
        return out


def sa_view(node: NodeHandle) -> dict[int, tuple[int, int]]:
    """{SA id: (stat index, outbound sequence number)} of our SAs."""
    with VppClient(node.instance.api_socket).connect() as api:
        return {s.spec.sa_id: (s.stat_index, s.seq_outbound) for s in ipsec.dump_sas(api)
                if is_owned_sa_id(s.spec.sa_id)}


def sending_generations(node: NodeHandle) -> dict[int, set[int]]:
    """{peer number: key generations of the outbound SAs protecting its tunnels}."""
    with VppClient(node.instance.api_socket).connect() as api:
        owned = {t.sw_if_index: split_tunnel_instance(t.instance)[0]
                 for t in ipip.dump_tunnels(api) if is_owned_tunnel_instance(t.instance)}
        out: dict[int, set[int]] = {}
        for sw_if_index, (sa_out, _) in ipsec.dump_protections(api).items():
            if sw_if_index in owned:
                out.setdefault(owned[sw_if_index], set()).add((sa_out >> 24) & 0xF)
        return out


def stepped(before: set[int], after: set[int]) -> bool:
    """One generation is used now, above every one used before."""
    return len(after) == 1 and len(before) > 0 and min(after) > max(before)


def meshed_with(node: NodeHandle, peer_numbers: set[int]) -> bool:
    view = mesh_view(node)
    return set(view) == peer_numbers and all(
        len(tunnels) == TUNNELS and all(ready for _, ready in tunnels)
        for tunnels in view.values())


def test_join_and_leave_through_etcd_under_traffic(mesh: Mesh) -> None:
    bed = mesh.bed
    n1, n2, n3, n4 = bed.nodes
    first = [n1, n2, n3]
    started = time.monotonic()
    for node in first:  # at once: the number claims must not collide
        mesh.start_agent(node)
    wait_for(lambda: len(numbers(mesh)) == 3, 30, "three registrations")
    number = numbers(mesh)
    assert sorted(number.values()) == [1, 2, 3]
    for node in first:
        others = {number[n.name] for n in first if n is not node}
        wait_for(lambda node=node, others=others: meshed_with(node, others), 60,
                 f"{node.name} to mesh")
    print(f"\nthree agents started to full mesh: {time.monotonic() - started:.1f} s")
    # The agents move every pair to agreed keys (forward secrecy), as `up --watch` does;
    # the baseline below is taken once they have settled there.
    wait_for(lambda: vpp_helpers.settled_on_agreed_keys(first), 60, "agreed keys on every pair")
    print(f"every pair on agreed keys: {time.monotonic() - started:.1f} s")
    for node in first:
        bed.add_pod(node, 0)

    # Baseline of the n1 <-> n2 pair, then iperf3 between their pods.
    tunnels_before = {n.name: mesh_view(n) for n in (n1, n2)}
    sas_before = {n.name: sa_view(n) for n in (n1, n2)}
    server = vpp_helpers.iperf3_server(n2.pod_netns(0))
    try:
        time.sleep(0.5)
        client = subprocess.Popen(
            ["ip", "netns", "exec", n1.pod_netns(0), "iperf3", "-c", str(n2.pod_address(0)),
             "-t", "12", "-P", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(2.5)

        # n4 joins while traffic flows.
        join_started = time.monotonic()
        mesh.start_agent(n4)
        wait_for(lambda: "n4" in numbers(mesh), 20, "n4 to register")
        registered = time.monotonic()
        number = numbers(mesh)
        everyone = {n.name: number[n.name] for n in bed.nodes}
        for node in bed.nodes:
            others = {v for k, v in everyone.items() if k != node.name}
            wait_for(lambda node=node, others=others: meshed_with(node, others), 30,
                     f"{node.name} to mesh with n4")
        done = time.monotonic()
        print(f"n4 join: registered {registered - join_started:.2f} s after its agent "
              f"started; all 4 VPPs meshed {done - registered:.2f} s after registration "
              f"(polling, 0.1 s)")
        out, _ = client.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
    result = json.loads(out)
    assert "error" not in result, result.get("error")
    assert result["end"]["sum_received"]["bytes"] > 0
    intervals = [i["sum"]["bits_per_second"] for i in result["intervals"]]
    gbits = result["end"]["sum_received"]["bits_per_second"] / 1e9
    print(f"iperf3 n1 -> n2 during the join: {gbits:.2f} Gbit/s, min interval "
          f"{min(intervals) / 1e6:.0f} Mbit/s")
    assert min(intervals) > 0, "an interval carried nothing"

    # Nothing of the n1 <-> n2 pair was recreated: same interfaces, same SAs, counters on.
    for node, peer in ((n1, n2), (n2, n1)):
        after = mesh_view(node)
        assert after[number[peer.name]] == tunnels_before[node.name][number[peer.name]]
        sas_after = sa_view(node)
        for sa_id, (stat_index, seq) in sas_before[node.name].items():
            assert sa_id in sas_after, f"SA {sa_id:#x} of {node.name} is gone"
            assert sas_after[sa_id][0] == stat_index
            assert sas_after[sa_id][1] >= seq, f"SA {sa_id:#x} of {node.name} restarted"
    status = in_ns(n1.netns, sys.executable, "-m", "vppmesh", "status", "--json",
                   "--datastore", mesh.url, *bed.vppmesh_args(n1), check=False)
    assert status.returncode == 0, status.stdout + status.stderr  # 3: a peer unhealthy
    peers = json.loads(status.stdout)["peers"]
    assert sorted(p["name"] for p in peers) == ["n2", "n3", "n4"]
    bed.add_pod(n4, 0)
    ping = vpp_helpers.pod_ping(n1, n4, count=2)
    assert ping.returncode == 0, ping.stdout

    sending = {n.name: sending_generations(n) for n in bed.nodes}

    # n4 leaves: its agent stops, its lease expires, every other node removes it.
    agent = mesh.agents["n4"]
    agent.terminate()
    agent.wait(timeout=10)
    stopped = time.monotonic()
    rest = [n1, n2, n3]
    for node in rest:
        others = {number[n.name] for n in rest if n is not node}
        wait_for(lambda node=node, others=others: meshed_with(node, others), LEASE_TTL + 20,
                 f"{node.name} to drop n4")
    print(f"n4 leave: removed from every VPP {time.monotonic() - stopped:.2f} s after its "
          f"agent stopped (lease TTL {LEASE_TTL} s)")
    assert "n4" not in numbers(mesh)
    for node, peer in ((n1, n2), (n2, n1)):
        assert mesh_view(node)[number[peer.name]] == tunnels_before[node.name][number[peer.name]]
    for node in rest:
        log = (node.dir / "agent.log").read_text()
        lines = [line.split(" INFO ")[-1] for line in log.splitlines()
                 if "membership +n4" in line or "membership -n4" in line]
        assert len(lines) == 2, log[-3000:]
        print(f"{node.name} agent: " + " | ".join(lines))

    # `down` on n4 cleans its VPP and releases its number.
    down = in_ns(n4.netns, sys.executable, "-m", "vppmesh", "down", "--datastore", mesh.url,
                 *bed.vppmesh_args(n4), "--state-dir", str(n4.dir), check=False)
    assert down.returncode == 0, down.stdout + down.stderr
    assert mesh_view(n4) == {}
    code = ("from vppmesh.agent.datastore.etcd import EtcdStore\n"
            "from vppmesh.agent.datastore.records import DatastoreUrl\n"
            f"print(sorted(EtcdStore(DatastoreUrl.parse({mesh.url!r})).snapshot().numbers))")
    assert in_etcd_ns(code).strip() == "[1, 2, 3]"

    # n4 comes back under the same key. Its VPP and its peers' lost the pair's SAs, so
    # every sender steps to its next key generation (the used-key ledgers would refuse the
    # old keys) and the mesh is whole again, with no operator step.
    key_before = n4.key_file.read_text()
    rejoin_started = time.monotonic()
    mesh.start_agent(n4)
    wait_for(lambda: "n4" in numbers(mesh), 30, "n4 to register again")
    number = numbers(mesh)
    for node in bed.nodes:
        others = {v for k, v in number.items() if k != node.name}
        wait_for(lambda node=node, others=others: meshed_with(node, others), 30,
                 f"{node.name} to mesh with n4 again")
    print(f"n4 rejoin: all 4 VPPs meshed {time.monotonic() - rejoin_started:.2f} s after its "
          "agent started again")
    assert n4.key_file.read_text() == key_before
    n4_now = sending_generations(n4)
    for node in rest:  # n1..n3 kept their numbers; n4 may have another one now
        peer = number[node.name]
        assert stepped(sending["n4"][peer], n4_now.get(peer, set())), (node.name, n4_now)
        assert stepped(sending[node.name][everyone["n4"]],
                       sending_generations(node).get(number["n4"], set())), node.name

    # n3's VPP crashes and comes back empty: its agent steps to its next generation
    # towards every peer (reinstalling its used outbound keys would repeat nonces), one the
    # peers accept already; the key and every other pair stay as they were.
    n3_before = sending_generations(n3)
    tunnels_before = {n.name: mesh_view(n) for n in (n1, n2)}
    sas_before = {n.name: sa_view(n) for n in (n1, n2)}
    key_before = n3.key_file.read_text()
    restarted = time.monotonic()
    bed.restart_vpp(n3)
    vpp_up = time.monotonic()
    for node in bed.nodes:
        others = {v for k, v in number.items() if k != node.name}
        wait_for(lambda node=node, others=others: meshed_with(node, others), 60,
                 f"{node.name} to mesh with the restarted n3")
    print(f"n3 VPP restart: VPP up again {vpp_up - restarted:.1f} s after the kill; every VPP "
          f"meshed {time.monotonic() - vpp_up:.2f} s later (n3 one generation on)")
    assert n3.key_file.read_text() == key_before
    n3_now = sending_generations(n3)
    for node in (n1, n2, n4):
        peer = number[node.name]
        assert stepped(n3_before[peer], n3_now.get(peer, set())), (node.name, n3_now)
    for node, peer in ((n1, n2), (n2, n1)):
        assert mesh_view(node)[number[peer.name]] == tunnels_before[node.name][number[peer.name]]
        sas_after = sa_view(node)
        for sa_id, (stat_index, seq) in sas_before[node.name].items():
            peer_of_sa = (sa_id >> 8) & 0xFFFF
            if peer_of_sa == number[peer.name]:
                assert sas_after[sa_id][0] == stat_index and sas_after[sa_id][1] >= seq
    ping = vpp_helpers.pod_ping(n1, n2, count=2)
    assert ping.returncode == 0, ping.stdout
