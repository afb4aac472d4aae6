"""The storm's attacker on the underlay bridge (run inside the underlay namespace; scapy).

  python packets.py IFACE PCAP[,PCAP...] OUTSIDE COUNT
      every channel datagram and ESP packet of the PCAPs (recorded on the bridge) sent again as
      it was (replays), plus, per ESP flow seen, COUNT forged ESP packets ahead of its
      window (wrong ICV), COUNT with an unknown SPI, and COUNT replays of its packets from
      OUTSIDE (an address no node has)
Prints one JSON line: how many frames of each kind were sent.
"""

from __future__ import annotations

import json
import os
import sys

from scapy.all import ESP, IP, UDP, Ether, Raw, conf, rdpcap, sendp  # type: ignore[attr-defined]

PORT = 4501


def main() -> None:
    iface, pcap, outside, count_text = sys.argv[1:5]
    count = int(count_text)
    conf.verb = 0
    channel, esp = [], []
    frames = [f for path in pcap.split(",") for f in rdpcap(path)]
    for frame in frames:
        if IP not in frame:
            continue
        if UDP in frame and frame[UDP].dport == PORT:
            channel.append(frame)
        elif frame[IP].proto == 50:
            esp.append(frame)
    flows: dict[tuple[str, str, int], tuple[object, int]] = {}
    for frame in esp:
        raw = bytes(frame[IP].payload)
        if len(raw) >= 8:
            spi, seq = int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:8], "big")
            flows[(frame[IP].src, frame[IP].dst, spi)] = (frame, seq)
    forged, unknown, moved = [], [], []
    for (src, dst, spi), (frame, seq) in flows.items():
        mac = frame[Ether].dst
        for i in range(count):
            forged.append(Ether(dst=mac) / IP(src=src, dst=dst) /
                          ESP(spi=spi, seq=(seq + 100 + i) & 0xFFFFFFFF) / Raw(os.urandom(96)))
            unknown.append(Ether(dst=mac) / IP(src=src, dst=dst) /
                           ESP(spi=0x0BADF00D, seq=seq + 1 + i) / Raw(os.urandom(64)))
        copy = frame.copy()
        copy[IP].src = outside
        del copy[IP].chksum
        moved.extend([Ether(bytes(copy))] * count)
    kinds = {"channel_replayed": channel, "esp_replayed": esp[: count * 10],
             "esp_forged": forged, "esp_unknown_spi": unknown, "esp_from_outside": moved}
    for frames in kinds.values():
        if frames:
            sendp(frames, iface=iface)
    print(json.dumps({kind: len(frames) for kind, frames in kinds.items()}))


if __name__ == "__main__":
    main()
