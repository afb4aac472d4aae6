"""Hostile packets from the underlay against a real VPP: each kind is dropped and counted,
nothing reaches a pod, and traffic between the real pods continues meanwhile.

Skipped with the reason when no VPP binary is found or when not root. Testbed prefix vmr-.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vppmesh.dataplane.vpp import ipsec
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.keying.keys import spi_for
from vppmesh.lab.testbed import Testbed, _uplink_mac, in_ns
from vppmesh.testing import HOSTILE_PACKETS, vpp_helpers

pytestmark = [pytest.mark.vpp]
PREFIX = "vmr-"
BASE = Path("/run/vppmesh-vmr")
CRAFT = HOSTILE_PACKETS

bed = vpp_helpers.bed_fixture(lambda: pytest.importorskip("scapy"), nodes=2, tunnels=2, pods=1,
                              workers=0, prefix=PREFIX, base_dir=BASE)


def test_hostile_packets_are_dropped_and_counted_while_pods_keep_talking(
        bed: Testbed) -> None:
    n1, n2 = bed.nodes
    spi = spi_for(n1.index, 0, 0)
    with VppClient(n2.instance.api_socket).connect() as api:
        assert spi in {s.spec.spi for s in ipsec.dump_sas(api)}
        before = vpp_helpers.errors(api)
    pod_watch = subprocess.Popen(
        ["ip", "netns", "exec", n2.pod_netns(0), "tcpdump", "-ni", "eth0", "-c", "1", "-l",
         "icmp and src 198.18.1.99"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        with vpp_helpers.SteadyPing(n1.pod_netns(0), str(n2.pod_address(0))) as ping:
            time.sleep(1)
            craft = in_ns(bed.underlay_ns, sys.executable, str(CRAFT), "br0",
                          _uplink_mac(n2.index), str(n1.underlay[0].ip),
                          str(n2.underlay[0].ip), hex(spi), "5", check=False, timeout=60)
            assert craft.returncode == 0, craft.stdout + craft.stderr
            sent = json.loads(craft.stdout.strip().splitlines()[-1])
            assert set(sent) == {"replayed", "too_old", "wrong_icv", "unknown_spi",
                                 "truncated", "ipip_outside", "ipip_spoofed_peer"}
            time.sleep(2)  # ten more echoes after the hostile packets
    finally:
        time.sleep(1)
        pod_watch.terminate()
        pod_seen, _ = pod_watch.communicate(timeout=10)
    with VppClient(n2.instance.api_socket).connect() as api:
        after = vpp_helpers.errors(api)
    grew = {key: after[key] - before.get(key, 0) for key in after}
    print("error counters that grew:", {f"{k[0]}: {k[1]}": v for k, v in grew.items() if v})
    # Replayed and too-old packets: anti-replay, before any decryption.
    assert grew[("esp4-decrypt-tun", "SA replayed packet")] >= 10
    # A forged packet with a fresh sequence number fails AES-GCM's tag check.
    assert grew[("esp4-decrypt-tun", "ESP decryption failed")] >= 5
    assert grew[("ipsec4-tun-input", "no matching tunnel")] >= 5
    assert grew[("ipsec4-tun-input", "Too Short")] >= 5
    # Plain IPIP, from an outsider and with a tunnel's own addresses: the uplink guard.
    assert grew[("ip4-inacl", "input ACL hits")] >= 10
    assert grew.get(("ipip4-input", "packets decapsulated"), 0) == 0
    # Nothing reached the pod, and the real pods kept talking throughout.
    assert "198.18.1.99" not in pod_seen
    assert ping.loss_percent() < 5, ping.summary
