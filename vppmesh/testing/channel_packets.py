"""Crafts attacks on the agents' channel for tests/test_forward_secrecy_attack_vpp.py; runs
inside the underlay namespace (scapy, raw frames on the bridge).

Usage:
  python channel_packets.py replay IFACE PCAP [SOURCE]
      every handshake Init of PCAP sent again as it was recorded; with SOURCE, a second
      copy of each with its IPv4 source rewritten to SOURCE (an attacker elsewhere on the
      path)
  python channel_packets.py flood IFACE MAC DST SENDER RECEIVER COUNT
      COUNT handshake Inits of the right size and header (node numbers SENDER ->
      RECEIVER) but random content, each from a random source address of DST's /24
      that no node has, to DST (MAC) port 4501
Prints one JSON line: how many frames were sent.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import struct
import sys

from scapy.all import IP, UDP, Ether, Raw, conf, rdpcap, sendp  # type: ignore[attr-defined]

PORT = 4501
VERSION = 2
INIT = 1
INIT_BYTES = 91


def replay(iface: str, pcap: str, source: str | None) -> int:
    frames = []
    for frame in rdpcap(pcap):
        if IP not in frame or UDP not in frame or bytes(frame[UDP].payload)[1:2] != bytes([INIT]):
            continue
        frames.append(frame)
        if source is not None:
            moved = frame.copy()
            moved[IP].src = source
            del moved[IP].chksum
            del moved[UDP].chksum
            frames.append(Ether(bytes(moved)))
    sendp(frames, iface=iface)
    return len(frames)


def flood(iface: str, mac: str, dst: str, sender: int, receiver: int, count: int) -> int:
    net = ipaddress.ip_network(f"{dst}/24", strict=False)
    frames = []
    for _ in range(count):
        src = str(net[random.randrange(100, 250)])
        body = struct.pack(">BBHH", VERSION, INIT, sender, receiver) + \
            os.urandom(INIT_BYTES - 6)
        frames.append(Ether(dst=mac) / IP(src=src, dst=dst) / UDP(sport=PORT, dport=PORT)
                      / Raw(body))
    sendp(frames, iface=iface)
    return len(frames)


def main() -> None:
    conf.verb = 0
    mode, iface = sys.argv[1:3]
    if mode == "replay":
        sent = replay(iface, sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        mac, dst, sender, receiver, count = sys.argv[3:8]
        sent = flood(iface, mac, dst, int(sender), int(receiver), int(count))
    print(json.dumps({"sent": sent}))


if __name__ == "__main__":
    main()
