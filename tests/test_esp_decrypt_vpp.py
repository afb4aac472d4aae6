"""The ESP decryptor (vppmesh/testing/esp_decrypt.py) against what real VPPs put on the wire.

A 2-node testbed pings pod to pod while tcpdump records the underlay bridge. The key VPP
holds for the outbound SA (`vppctl show ipsec sa <index>`) must open every recorded packet
of that SA: this is the positive control of the forward-secrecy check. Today's SA keys come
from the static schedule, so the keys static_schedule_keys computes from the seized files
must open them too, which proves the enumeration reaches the keys VPP uses.

Skipped with the reason when no VPP binary is found or when not root.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vppmesh.keying.epochs import GenerationStore
from vppmesh.keying.keys import spi_for, spi_tunnel
from vppmesh.testing import esp_decrypt, vpp_helpers
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vpp]
PREFIX = "ved-"
BASE = Path("/run/vppmesh-esp-decrypt")
PINGS = 5


def recorded(capture: Path) -> list[esp_decrypt.EspPacket]:
    return esp_decrypt.esp_packets(esp_decrypt.read_pcap(capture))


def test_vpp_sa_key_and_static_schedule_open_recorded_packets() -> None:
    with vpp_helpers.testbed(nodes=2, tunnels=2, pods=1, prefix=PREFIX,
                             base_dir=BASE) as bed:
        src, dst = bed.nodes
        capture = BASE / "underlay.pcap"
        dump = vpp_helpers.tcpdump(bed.underlay_ns, capture, snaplen=None)
        try:
            time.sleep(1.0)
            ping = vpp_helpers.pod_ping(src, dst, count=PINGS)
            assert ping.returncode == 0, ping.stdout
            # tcpdump writes what libpcap hands it, up to its buffer timeout after it came.
            wait_for(lambda: len(recorded(capture)) >= 2 * PINGS, 10, "the pings' ESP")
        finally:
            dump.terminate()
            dump.wait(timeout=10)
        out = GenerationStore(src.dir, src.name).load().peers[dst.name].out
        indices = esp_decrypt.vpp_sa_indices(vpp_helpers.vppctl(src, "show", "ipsec", "sa"))
        keys = {}
        for tunnel in range(bed.spec.tunnels):
            spi = spi_for(src.index, tunnel, out)
            keys[spi] = esp_decrypt.vpp_sa_key(vpp_helpers.vppctl(src, "show", "ipsec", "sa",
                                                      str(indices[spi])))
        seized = esp_decrypt.static_schedule_keys(
            bed.mesh_file, [n.dir for n in bed.nodes], [n.key_file for n in bed.nodes], None)
        packets = recorded(capture)  # the file goes with the testbed

    sent = [p for p in packets if p.spi in keys]
    # A pod pair's flow takes one tunnel; its requests are numbered from 1 (ESN low bits).
    assert len(sent) == PINGS, [(hex(p.spi), p.seq) for p in packets]
    assert len({p.spi for p in sent}) == 1
    assert [p.seq for p in sent] == list(range(1, PINGS + 1))
    key, salt = keys[sent[0].spi]
    assert all(esp_decrypt.decrypts(p, key, salt) for p in sent)
    # The ESN AAD is what VPP uses: without it, or with the salt's bytes swapped, no match.
    assert not any(esp_decrypt.decrypts(p, key, salt, esn=False) for p in sent)
    assert not any(esp_decrypt.decrypts(p, key, salt[::-1]) for p in sent)
    other = next(k for spi, k in keys.items() if spi != sent[0].spi)
    assert not any(esp_decrypt.decrypts(p, *other) for p in sent)

    # The static schedule opens both directions, each with the key of its pair, tunnel
    # and generation, and the outbound one is the key VPP held.
    replies = [p for p in packets if p.spi not in keys]
    assert len(replies) == PINGS
    matches = esp_decrypt.decrypting(packets, seized)
    assert {m.spi for m in matches} == {sent[0].spi, replies[0].spi}
    assert all(m.esn for m in matches)
    (forward,) = [m for m in matches if m.spi == sent[0].spi]
    assert forward.candidate[:2] == (key, salt)
    assert forward.candidate[2] == (f"static {src.name}->{dst.name} tunnel "
                                    f"{spi_tunnel(sent[0].spi)} generation {out}")
    (backward,) = [m for m in matches if m.spi == replies[0].spi]
    assert backward.candidate[2].startswith(f"static {dst.name}->{src.name} tunnel ")
    candidate = backward.candidate
    assert all(esp_decrypt.decrypts(p, candidate[0], candidate[1]) for p in replies)
