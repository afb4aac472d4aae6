"""Crafts the hostile packets of tests/test_hostile.py; runs inside the underlay namespace.

Usage: python hostile_packets.py IFACE NODE_MAC SRC DST SPI [COUNT [udp:PORT]]
SRC is a real peer's underlay address (spoofed), DST the victim node's, SPI one of the
victim's inbound SPIs for that peer. One genuine ESP packet SRC -> DST is captured first
(traffic must be flowing) and replayed. With udp:PORT the ESP packets are in UDP from
4500 to PORT (RFC 3948; DST and NODE_MAC may then be a NAT's that forwards PORT to the
victim), and only the ESP kinds are sent. Prints one JSON line: what was sent, by kind.
"""

from __future__ import annotations

import json
import os
import sys

from scapy.all import (  # type: ignore[attr-defined]
    ESP,
    ICMP,
    IP,
    UDP,
    Ether,
    Raw,
    conf,
    sendp,
    sniff,
)

OUTSIDE = "192.0.2.200"  # on the underlay, but no node's address


def main() -> None:
    iface, mac, src, dst, spi_text = sys.argv[1:6]
    count = int(sys.argv[6]) if len(sys.argv) > 6 else 5
    udp_port = int(sys.argv[7].removeprefix("udp:")) if len(sys.argv) > 7 else None
    spi = int(spi_text, 0)
    conf.verb = 0
    captured = sniff(iface=iface, count=1, timeout=10,
                     lfilter=lambda p: IP in p and p[IP].src == src and p[IP].dst == dst
                     and esp_spi_seq(p, udp_port)[0] == spi)
    if not captured:
        raise SystemExit("no genuine ESP packet seen to replay: is traffic flowing?")
    genuine = captured[0]
    seq = esp_spi_seq(genuine, udp_port)[1]
    outer = Ether(dst=mac) / IP(src=src, dst=dst)
    if udp_port is not None:
        outer = outer / UDP(sport=4500, dport=udp_port)
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
    if udp_port is not None:  # plain IPIP and bare ESP do not cross a NAT
        kinds = {k: v for k, v in kinds.items()
                 if k in ("replayed", "too_old", "wrong_icv", "unknown_spi")}
    for packets in kinds.values():
        sendp(packets * count, iface=iface)
    print(json.dumps({kind: count for kind in kinds}))


def esp_spi_seq(packet: object, udp_port: int | None) -> tuple[int | None, int]:
    """SPI and sequence number of an ESP packet, bare or in UDP to `udp_port`."""
    ip = packet[IP]  # type: ignore[index]
    if udp_port is None:
        if ip.proto != 50:
            return None, 0
        payload = bytes(ip.payload)
    else:
        if ip.proto != 17 or UDP not in ip or ip[UDP].dport != udp_port:
            return None, 0
        payload = bytes(ip[UDP].payload)
    if len(payload) < 8:
        return None, 0
    return int.from_bytes(payload[:4], "big"), int.from_bytes(payload[4:8], "big")


if __name__ == "__main__":
    main()
