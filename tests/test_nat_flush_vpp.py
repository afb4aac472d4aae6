"""A NAT router's mappings flushed under traffic, against real VPPs with agents.

n2 sits behind a Linux NAT (namespace vnp-nat) that masquerades its UDP to a random port
in 20000-30000. With both `up --watch` agents running and the pods pinging each other
both ways (10 per second), `conntrack -F` on the router drops n2's mappings: n2's next
ESP leaves from new ports, and n1's ESP to the old ones dies at the router until n1
learns the new ones. The flush comes right after a round of n2's NAT keepalives (n1's
VPP counts them), the worst moment: without more, n1 would learn tunnel 0's new mapping
at n2's next channel keepalive (15 s later) and tunnel 1's at the next round (20 s).
n2's agent sees its outbound SAs count and its inbound ones not over a poll, and probes
every tunnel's flow at once (secrecy.FlowWatch): the longest gap in either ping is a
few seconds.

Two nodes (prefix vnp-). Skipped with the reason when no VPP binary is found or when not
root. Select with `pytest -k nat_flush`.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vppmesh.agent.nat import NAT_KEEPALIVE_INTERVAL
from vppmesh.lab.testbed import NodeHandle, Testbed, in_ns
from vppmesh.testing import vpp_helpers
from vppmesh.testing.vpp_helpers import all_forward_secret
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vpp]
PREFIX = "vnp-"
BASE = Path("/run/vppmesh-vnp")
INTERVAL = 0.1  # seconds between pings
BEFORE, AFTER = 3.0, 25.0  # pinging before (at least) and after the flush
COUNT = int((BEFORE + NAT_KEEPALIVE_INTERVAL + 5 + AFTER) / INTERVAL)  # ping -c (stopped)
MAX_GAP = 6.0  # seconds: well under NAT_KEEPALIVE_INTERVAL


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with vpp_helpers.testbed(nodes=2, tunnels=2, pods=1, workers=0, prefix=PREFIX,
                             base_dir=BASE, nat="masquerade-random") as bed:
        in_ns(bed.nat_ns, "conntrack", "-F", check=False)
        yield bed


@pytest.fixture(scope="module")
def agents(bed: Testbed) -> Iterator[dict[str, vpp_helpers.WatchAgent]]:
    started = {n.name: vpp_helpers.WatchAgent(bed, n, grace=10.0) for n in bed.nodes}
    with vpp_helpers.running_agents(started) as running:
        yield running


def pinging(src: NodeHandle, dst: NodeHandle, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", src.pod_netns(0), "ping", "-n", "-i", str(INTERVAL),
         "-W", "1", "-c", str(count), str(dst.pod_address(0))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def longest_gap(output: str) -> float:
    """Seconds of the longest run of lost pings (the outage a pod saw), from the start
    to the last ping sent."""
    answered = sorted({int(n) for n in re.findall(r"icmp_seq=(\d+)", output)})
    sent = re.search(r"(\d+) packets transmitted", output)
    assert answered and sent, output[-500:]
    edges = [0, *answered, int(sent.group(1)) + 1]  # ping numbers its requests from 1
    return max(b - a for a, b in itertools.pairwise(edges)) * INTERVAL


def test_nat_flush_outage_is_a_few_seconds(
        bed: Testbed, agents: dict[str, vpp_helpers.WatchAgent]) -> None:
    n1, n2 = bed.nodes
    wait_for(lambda: vpp_helpers.pod_ping(n1, n2, count=1).returncode == 0 and
             vpp_helpers.pod_ping(n2, n1, count=1).returncode == 0, 90,
             "pods pinging both ways through the NAT", interval=0.5)
    wait_for(lambda: all_forward_secret(bed), 60, "both directions on agreed keys")
    pings = {"n2 -> n1": pinging(n2, n1, COUNT), "n1 -> n2": pinging(n1, n2, COUNT)}
    time.sleep(BEFORE)
    rounds = vpp_helpers.nat_keepalives(n1)
    wait_for(lambda: vpp_helpers.nat_keepalives(n1) > rounds, NAT_KEEPALIVE_INTERVAL + 5,
             "a round of n2's NAT keepalives", interval=0.1)
    logged = len(agents["n1"].text())
    in_ns(bed.nat_ns, "conntrack", "-F")
    time.sleep(AFTER)
    for proc in pings.values():
        proc.send_signal(signal.SIGINT)  # ping prints what it sent and stops
    outputs = {way: proc.communicate(timeout=30)[0] for way, proc in pings.items()}
    gaps = {way: round(longest_gap(out), 1) for way, out in outputs.items()}
    print(f"\nconntrack -F on the NAT router: longest ping gap {gaps} s "
          f"(NAT keepalive every {NAT_KEEPALIVE_INTERVAL:.0f} s)", flush=True)
    assert max(gaps.values()) <= MAX_GAP, gaps
    relearned = agents["n1"].text()[logged:]
    for tunnel in (0, 1):  # n1 learned both tunnels' new mappings
        assert f"peer n2: its NAT maps its ESP in UDP (tunnel {tunnel})" in relearned
    wait_for(lambda: all_forward_secret(bed), 60, "both directions on agreed keys again")
