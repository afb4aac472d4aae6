"""Crafts the hostile packets of tests/test_hostile.py; runs inside the underlay namespace.

Usage: python hostile_packets.py IFACE NODE_MAC SRC DST SPI [COUNT]
SRC is a real peer's underlay address (spoofed), DST the victim node's, SPI one of the
victim's inbound SPIs for that peer. One genuine ESP packet SRC -> DST is captured first
(traffic must be flowing) and replayed. Prints one JSON line: what was sent, by kind.
"""

from __future__ import annotations

import json
import os
import sys

from scapy.all import ESP, ICMP, IP, Ether, Raw, conf, sendp, sniff  # type: ignore[attr-defined]

OUTSIDE = "192.0.2.200"  # on the underlay, but no node's address


def main() -> None:
    iface, mac, src, dst, spi_text = sys.argv[1:6]
    count = int(sys.argv[6]) if len(sys.argv) > 6 else 5
    spi = int(spi_text, 0)
    conf.verb = 0
    captured = sniff(iface=iface, count=1, timeout=10,
                     lfilter=lambda p: IP in p and p[IP].proto == 50 and p[IP].src == src
                     and p[IP].dst == dst and p[ESP].spi == spi)
    if not captured:
        raise SystemExit("no genuine ESP packet seen to replay: is traffic flowing?")
    genuine = captured[0]
    seq = genuine[ESP].seq
    outer = Ether(dst=mac) / IP(src=src, dst=dst)
    inner = IP(src="198.18.1.99", dst="198.18.2.10") / ICMP(id=4242) / Raw(b"hostile")
    kinds = {
        # The very packet the peer sent, again: anti-replay must drop it.
        "replayed": [Ether(dst=mac) / genuine[IP]],
        # A sequence number far behind the window.
        "too_old": [outer / ESP(spi=spi, seq=1) / Raw(os.urandom(64))],
        # Ahead of the window (passes anti-replay) but forged: the ICV cannot match.
        "wrong_icv": [outer / ESP(spi=spi, seq=(seq + 100) & 0xFFFFFFFF)
                      / Raw(os.urandom(96))],
        "unknown_spi": [outer / ESP(spi=0x0BADF00D, seq=seq + 1) / Raw(os.urandom(64))],
        # Only half an ESP header.
        "truncated": [Ether(dst=mac) / IP(src=src, dst=dst, proto=50)
                      / Raw(spi.to_bytes(4, "big"))],
        "ipip_outside": [Ether(dst=mac) / IP(src=OUTSIDE, dst=dst, proto=4) / inner],
        # Plain IPIP whose outer addresses are exactly a tunnel's: only the guard stops it.
        "ipip_spoofed_peer": [Ether(dst=mac) / IP(src=src, dst=dst, proto=4) / inner],
    }
    for packets in kinds.values():
        sendp(packets * count, iface=iface)
    print(json.dumps({kind: count for kind in kinds}))


if __name__ == "__main__":
    main()
