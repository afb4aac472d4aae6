"""A node behind a NAT that changes the source port, against real VPPs with agents.

n2 sits behind a Linux NAT (namespace vfn-nat) that masquerades its UDP to a random
port in 20000-30000, never the 4500 its record names, with no forward. Its peer n1 can
reach it only at the port the NAT chose for n2's ESP flow, and learns it from n2's
agent's authenticated channel datagrams, which share that flow (UDP 4500, non-ESP
marker). n2's agent sends RFC 3948 keepalives on the flow, so the mapping survives an
idle period longer than the NAT's UDP timeout (set to 30 s, Linux's default for a flow
without replies, for flows with replies too). Checks:

- with both `up --watch` agents running, pods ping both ways; n1's outbound SA sends to
  the port the NAT really maps n2's 4500 to (read from the NAT's conntrack), n1's VPP
  counts n2's keepalives as "NAT Keepalive", and the pair runs on agreed keys;
- after 45 s without pod traffic (past the NAT's timeout), pods ping both ways at
  once, over the same mapping;
- n1's agent restarts: it takes the learned port from its generation file, so its SAs
  stay, and a rekey is agreed with n2's agent through the NAT;
- the control: with the agents stopped, the same idle period loses the mapping, and n1
  can no longer reach n2.

Two nodes (prefix vfn-). Skipped with the reason when no VPP binary is found or when not
root. Select with `pytest -k forward_secrecy` or `pytest -k nat`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vppmesh.agent.nat import NAT_KEEPALIVE_INTERVAL
from vppmesh.config import load_mesh
from vppmesh.dataplane.vpp import ipsec, punt
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.host.underlay import NAT_T_PORT
from vppmesh.lab.testbed import NAT_OUTSIDE, NAT_RANDOM_PORTS, NodeHandle, Testbed, in_ns
from vppmesh.testing import vpp_helpers
from vppmesh.testing.vpp_helpers import all_forward_secret, peer_state
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vpp]
PREFIX = "vfn-"
BASE = Path("/run/vppmesh-vfn")
NAT_TIMEOUT = 30  # seconds: the NAT forgets a UDP flow idle this long
IDLE = 45.0
PUBLIC = str(NAT_OUTSIDE.ip)
TUNNELS = 2  # each tunnel's flow is its own NAT mapping, with a port of its own


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with vpp_helpers.testbed(nodes=2, tunnels=TUNNELS, pods=1, workers=0, prefix=PREFIX,
                             base_dir=BASE, nat="masquerade-random") as bed:
        vpp_helpers.on_demand_rekeys(bed, 1.0)
        for name in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
            in_ns(bed.nat_ns, "sysctl", "-qw", f"net.netfilter.{name}={NAT_TIMEOUT}")
        in_ns(bed.nat_ns, "conntrack", "-F", check=False)
        yield bed


@pytest.fixture(scope="module")
def agents(bed: Testbed) -> Iterator[dict[str, vpp_helpers.WatchAgent]]:
    started = {n.name: vpp_helpers.WatchAgent(bed, n, grace=10.0) for n in bed.nodes}
    with vpp_helpers.running_agents(started) as running:
        yield running


def pods_ping(src: NodeHandle, dst: NodeHandle, count: int = 3) -> bool:
    return vpp_helpers.pod_ping(src, dst, count=count).returncode == 0


def both_ways(bed: Testbed) -> bool:
    n1, n2 = bed.nodes
    return pods_ping(n1, n2, count=1) and pods_ping(n2, n1, count=1)


def outbound_ports(bed: Testbed, node: NodeHandle, peer: NodeHandle) -> dict[int, int]:
    """Per tunnel, the UDP destination port of node's outbound SA towards peer."""
    number = load_mesh(bed.mesh_file).node(peer.name).node_number
    with VppClient(node.instance.api_socket).connect() as api:
        found = [s.spec for s in ipsec.dump_sas(api)
                 if s.spec.direction == "out" and s.spec.peer_number == number
                 and s.spec.udp_encap]
    assert len(found) == TUNNELS, found  # one outbound SA per tunnel (no step under way)
    return {spec.tunnel: spec.udp_dst_port for spec in found}


def nat_mapped_ports(bed: Testbed) -> dict[int, int]:
    """Per tunnel, the public port the NAT maps n2's UDP 4500 flow to n1's address of that
    tunnel to (from the NAT's conntrack)."""
    n1, n2 = bed.nodes
    remotes = [str(a.ip) for a in n1.underlay]
    listing = in_ns(bed.nat_ns, "conntrack", "-L", "-p", "udp", check=False).stdout
    found = {}
    for line in listing.splitlines():
        tuples = re.findall(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)", line)
        if len(tuples) == 2:
            (osrc, odst, osport, odport), (_, rdst, _, rdport) = tuples
            if osrc == str(n2.underlay[0].ip) and odst in remotes and \
                    int(osport) == NAT_T_PORT and int(odport) == NAT_T_PORT:
                assert rdst == PUBLIC
                found[remotes.index(odst)] = int(rdport)
    return found


def test_forward_secrecy_nat_pair_comes_up_both_ways_on_the_learned_port(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent]) -> None:
    n1, n2 = bed.nodes
    took = wait_for(lambda: both_ways(bed), 90, "pods pinging both ways through the NAT",
                    interval=0.5)
    print(f"\npods ping both ways {took:.1f} s after the agents started", flush=True)
    mapped = nat_mapped_ports(bed)
    assert set(mapped) == set(range(TUNNELS)), "the NAT maps n2's 4500 flows incompletely"
    assert all(NAT_RANDOM_PORTS[0] <= p <= NAT_RANDOM_PORTS[1] for p in mapped.values())
    wait_for(lambda: outbound_ports(bed, n1, n2) == mapped, 60,
             "n1's ESP going where the NAT maps each tunnel's flow", interval=0.5)
    assert outbound_ports(bed, n2, n1) == dict.fromkeys(range(TUNNELS), NAT_T_PORT)
    for t, port in mapped.items():
        assert f"peer n2: its NAT maps its ESP in UDP (tunnel {t}) to {PUBLIC} port {port}" \
            in agents["n1"].text()
    assert pods_ping(n1, n2, count=5) and pods_ping(n2, n1, count=5)
    wait_for(lambda: all_forward_secret(bed), 60, "both directions on agreed keys")
    wait_for(lambda: vpp_helpers.nat_keepalives(n1) > 0, NAT_KEEPALIVE_INTERVAL + 5,
             "n2's NAT keepalives counted by n1's VPP")
    # VPP punts SPI 0 on UDP 4500 (the channel on the ESP flow) to the agent.
    with VppClient(n1.instance.api_socket).connect() as api:
        reasons = punt.reason_ids(api)
        listed = {int(d.punt.punt.exception.id): str(d.pathname)
                  for d in api.dump("punt_socket_dump", type=punt.PUNT_TYPE_EXCEPTION)}
    assert {reasons[name] for name in punt.SPI_UDP_0.values()} <= set(listed)
    # The learned port is kept with the generations, and verify checks the SAs against it.
    assert peer_state(n1, n2).nat_ports == [mapped[t] for t in range(TUNNELS)]
    result = bed.run_vppmesh(n1, "verify", "--capture", "--json", "--state-dir",
                             str(n1.dir), check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"], result.stdout + result.stderr
    assert report["capture"]["esp_in_udp"] > 0
    # verify's probes went over every tunnel: each reached n2 through its own mapping.
    number = load_mesh(bed.mesh_file).node(n1.name).node_number
    with VppClient(n2.instance.api_socket).connect() as api:
        arrived = {s.spec.tunnel for s in ipsec.dump_sas(api) if s.spec.direction == "in"
                   and s.spec.peer_number == number and s.last_seq_inbound > 0}
    assert arrived == set(range(TUNNELS))


def test_forward_secrecy_nat_mapping_survives_an_idle_period_past_the_nat_timeout(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent]) -> None:
    n1, n2 = bed.nodes
    wait_for(lambda: both_ways(bed), 90, "pods pinging both ways through the NAT",
             interval=0.5)
    mapped, keepalives = nat_mapped_ports(bed), vpp_helpers.nat_keepalives(n1)
    time.sleep(IDLE)  # no pod traffic: only the agents' keepalives and channel
    assert pods_ping(n1, n2), "n1 lost n2 after the idle period"  # n1 first: the test
    assert pods_ping(n2, n1)
    assert nat_mapped_ports(bed) == mapped, "the NAT mapped n2's ESP flows anew"
    assert outbound_ports(bed, n1, n2) == mapped
    grew = vpp_helpers.nat_keepalives(n1) - keepalives
    assert grew >= TUNNELS * int(IDLE // NAT_KEEPALIVE_INTERVAL), grew


def test_forward_secrecy_nat_restarted_agent_sends_to_the_learned_port_at_once(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent]) -> None:
    """n1's agent restarts with nothing in memory: it takes the port from its generation
    file, so its SAs stay where they are and its first handshakes pass the NAT."""
    n1, n2 = bed.nodes
    mapped = nat_mapped_ports(bed)
    generation = peer_state(n1, n2).out
    agents["n1"].stop()
    logged = len(agents["n1"].text())
    started = time.monotonic()
    agents["n1"].start()
    took = wait_for(lambda: pods_ping(n1, n2, count=1), 30, "n1 reaching n2's pod again",
                    interval=0.5)
    print(f"\nn1's agent restarted: its pod reaches n2's after {took:.1f} s", flush=True)
    assert outbound_ports(bed, n1, n2) == mapped
    # Its channel passes the NAT: a rekey is agreed with n2's agent over it.
    bed.run_vppmesh(n1, "rekey", *bed.state_args(n1))
    took = wait_for(lambda: peer_state(n1, n2).out > generation and all_forward_secret(bed),
                    60, "a generation agreed over the channel after the restart")
    print(f"a new generation agreed {time.monotonic() - started:.1f} s after the restart",
          flush=True)
    assert outbound_ports(bed, n1, n2) == mapped
    assert pods_ping(n1, n2, count=3) and pods_ping(n2, n1, count=3)
    assert "UDP encapsulation changed" not in agents["n1"].text()[logged:]


def test_forward_secrecy_nat_without_agents_the_idle_mapping_expires(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent]) -> None:
    """The control: the NAT's timeout is real. Runs last: it stops the agents."""
    n1, n2 = bed.nodes
    for agent in agents.values():
        agent.stop()
    assert pods_ping(n2, n1, count=1)  # n2 sends: a mapping is fresh
    assert outbound_ports(bed, n1, n2) == nat_mapped_ports(bed)
    time.sleep(NAT_TIMEOUT + 5)
    assert nat_mapped_ports(bed) == {}, "the NAT kept an idle mapping"
    assert not pods_ping(n1, n2, count=2), "n1 reached n2 with no mapping at the NAT"
